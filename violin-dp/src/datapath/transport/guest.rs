//! A guest's port: a UNIX socket in the daemon's runtime directory (mode 0660), spoken
//! the way QEMU speaks it, so a VM attaches with no tap and no root:
//!
//! - `stream` (`-netdev stream,server=off,addr.type=unix,addr.path=SOCK`): the daemon
//!   listens; each frame is a 4-byte big-endian length, then the frame. A new connection
//!   replaces the old one, so a guest that disconnects can reconnect.
//! - `dgram` (`-netdev dgram,local.type=unix,local.path=PEER,remote.type=unix,
//!   remote.path=SOCK`): one frame per datagram. The daemon sends to the address the
//!   guest last sent from, or to `<guest>.peer.sock` beside the port's socket until then.
//!
//! Sending to a guest never blocks: a stream port keeps a bounded byte queue
//! ([`TX_QUEUE`]) for a guest that reads slowly; when it is full, frames are dropped and
//! counted (`queue_full`), and other guests are unaffected. Framing errors are counted
//! at the port (`zero_length`, `oversize`).

use super::MAX_RECORD;
use crate::spec::Framing;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use violin_common::Verdict;

/// Bytes a stream port queues for a guest that reads slower than frames come (a relay
/// or a VM descheduled for milliseconds while a TCP flow runs at gigabits). Measured
/// here (TCP from a tap guest to a socket-port guest on another host, 5 s, 3 runs): at
/// 256 KiB the port dropped 47–52 k frames a run, which TCP took as loss (as many
/// retransmissions; 1.9–2.2 Gbit/s); at 1 MiB 12 k (2.5–2.7 Gbit/s); at 4 MiB none
/// (2.4–2.8 Gbit/s). Taken only while a backlog needs it.
pub const TX_QUEUE: usize = 4 * 1024 * 1024;
const RX_BUF: usize = 4 + MAX_RECORD;
/// Stream buffers start this small and double, up to their bounds, only when traffic
/// needs it (a full read, a record or a backlog that does not fit): a quiet guest costs
/// a few KiB, a busy one reads and queues in 64 KiB batches.
const BUF_START: usize = 4096;

pub use crate::stats::PortCounters;

/// A bounded ring of pending stream output (at most `TX_QUEUE` bytes): pushing and
/// writing out never move what is queued, whatever its length.
struct TxQueue {
    buf: VecDeque<u8>,
}

impl TxQueue {
    fn new() -> TxQueue {
        TxQueue {
            buf: VecDeque::with_capacity(BUF_START),
        }
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    /// Appends all of `parts` or nothing.
    fn push(&mut self, parts: &[&[u8]]) -> bool {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        if self.buf.len() + n > TX_QUEUE {
            return false;
        }
        if self.buf.len() + n > self.buf.capacity() {
            let want = (self.buf.len() + n).next_power_of_two().min(TX_QUEUE);
            self.buf.reserve_exact(want - self.buf.len());
        }
        for p in parts {
            self.buf.extend(p.iter());
        }
        true
    }
    /// Writes as much as the socket takes.
    fn flush(&mut self, w: &mut impl Write) -> io::Result<()> {
        while !self.buf.is_empty() {
            let (a, b) = self.buf.as_slices();
            match w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.buf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

struct StreamConn {
    stream: UnixStream,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx: TxQueue,
}

enum Sock {
    Stream {
        listener: UnixListener,
        conn: Option<StreamConn>,
    },
    Dgram {
        sock: UnixDatagram,
        peer: Option<SocketAddr>,
        default_peer: PathBuf,
    },
}

/// What reading a port produced, frame by frame.
pub enum RxEvent<'a> {
    Frame(&'a [u8]),
    /// A super-frame (from a tap with offloads): the segments it stands for.
    Super(&'a [u8], violin_common::wire::gso::Gso),
    /// A framing error: count it for this port.
    Drop(Verdict),
}

/// One guest's socket.
pub struct GuestPort {
    path: PathBuf,
    sock: Sock,
    pub counters: PortCounters,
}

fn bind_fresh(path: &Path) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(())
}

impl GuestPort {
    /// Creates the socket at `path` (replacing a stale one), mode 0660, non-blocking.
    pub fn bind(path: &Path, framing: Framing) -> io::Result<GuestPort> {
        bind_fresh(path)?;
        let sock = match framing {
            Framing::Stream => {
                let listener = UnixListener::bind(path)?;
                listener.set_nonblocking(true)?;
                Sock::Stream {
                    listener,
                    conn: None,
                }
            }
            Framing::Dgram => {
                let sock = UnixDatagram::bind(path)?;
                sock.set_nonblocking(true)?;
                Sock::Dgram {
                    sock,
                    peer: None,
                    default_peer: peer_path(path),
                }
            }
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        Ok(GuestPort {
            path: path.to_path_buf(),
            sock,
            counters: PortCounters::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_stream(&self) -> bool {
        matches!(self.sock, Sock::Stream { .. })
    }

    /// The listening / datagram socket's fd.
    pub fn socket_fd(&self) -> RawFd {
        match &self.sock {
            Sock::Stream { listener, .. } => listener.as_raw_fd(),
            Sock::Dgram { sock, .. } => sock.as_raw_fd(),
        }
    }

    /// The current stream connection's fd, if any.
    pub fn conn_fd(&self) -> Option<RawFd> {
        match &self.sock {
            Sock::Stream { conn: Some(c), .. } => Some(c.stream.as_raw_fd()),
            _ => None,
        }
    }

    /// True when a guest is attached (stream: connected; dgram: a peer is known or its
    /// conventional peer socket exists).
    pub fn connected(&self) -> bool {
        match &self.sock {
            Sock::Stream { conn, .. } => conn.is_some(),
            Sock::Dgram {
                peer, default_peer, ..
            } => peer.is_some() || default_peer.exists(),
        }
    }

    /// Accepts pending connections; the newest replaces any older one. Returns the
    /// replaced connection's fd (to deregister) and whether a new one was accepted.
    pub fn accept(&mut self) -> io::Result<(Option<RawFd>, bool)> {
        let Sock::Stream { listener, conn } = &mut self.sock else {
            return Ok((None, false));
        };
        let mut old = None;
        let mut accepted = false;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(true)?;
                    if let Some(c) = conn.take() {
                        old.get_or_insert(c.stream.as_raw_fd());
                        drop(c);
                    }
                    *conn = Some(StreamConn {
                        stream,
                        rx: vec![0u8; BUF_START],
                        rx_start: 0,
                        rx_end: 0,
                        tx: TxQueue::new(),
                    });
                    self.counters.connects += 1;
                    accepted = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((old, accepted)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops the stream connection (EOF or error).
    pub fn disconnect(&mut self) {
        if let Sock::Stream { conn, .. } = &mut self.sock {
            *conn = None;
        }
    }

    /// Reads what is available, up to `budget` frames, calling `f` for each frame or
    /// framing error. `scratch` receives datagrams. Returns `Ok(true)` when the budget
    /// ran out with data possibly left, `Err` when the connection is gone.
    pub fn receive(
        &mut self,
        scratch: &mut [u8],
        budget: &mut super::Budget,
        mut f: impl FnMut(RxEvent<'_>),
    ) -> io::Result<bool> {
        let counters = &mut self.counters;
        match &mut self.sock {
            Sock::Dgram { sock, peer, .. } => {
                while budget.left() {
                    match sock.recv_from(scratch) {
                        Ok((n, from)) => {
                            budget.spend(n);
                            if from.as_pathname().is_some()
                                && peer.as_ref().and_then(|p| p.as_pathname()) != from.as_pathname()
                            {
                                *peer = Some(from);
                                counters.connects += 1;
                            }
                            counters.rx_frames += 1;
                            counters.rx_bytes += n as u64;
                            if n == 0 {
                                f(RxEvent::Drop(Verdict::ZeroLength));
                            } else if n > MAX_RECORD {
                                f(RxEvent::Drop(Verdict::Oversize));
                            } else {
                                f(RxEvent::Frame(&scratch[..n]));
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(true)
            }
            Sock::Stream { conn: None, .. } => Ok(false),
            Sock::Stream { conn: Some(c), .. } => {
                loop {
                    // Parse whole records already buffered.
                    while c.rx_end - c.rx_start >= 4 {
                        let hdr = &c.rx[c.rx_start..c.rx_start + 4];
                        let len = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
                        if len > MAX_RECORD {
                            // The stream cannot be resynchronised: close it.
                            f(RxEvent::Drop(Verdict::Oversize));
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "record length over 65535",
                            ));
                        }
                        if c.rx_end - c.rx_start < 4 + len {
                            break;
                        }
                        let frame = &c.rx[c.rx_start + 4..c.rx_start + 4 + len];
                        c.rx_start += 4 + len;
                        counters.rx_frames += 1;
                        counters.rx_bytes += len as u64;
                        if len == 0 {
                            f(RxEvent::Drop(Verdict::ZeroLength));
                        } else {
                            f(RxEvent::Frame(frame));
                        }
                        budget.spend(len);
                        if !budget.left() {
                            return Ok(true);
                        }
                    }
                    if c.rx_start == c.rx_end {
                        c.rx_start = 0;
                        c.rx_end = 0;
                    } else if c.rx_start > 0 {
                        c.rx.copy_within(c.rx_start..c.rx_end, 0);
                        c.rx_end -= c.rx_start;
                        c.rx_start = 0;
                    }
                    // No room (a record bigger than the buffer), or the last read
                    // filled it (a backlog): read in bigger batches from now on.
                    if c.rx_end == c.rx.len() && c.rx.len() < RX_BUF {
                        let grown = (c.rx.len() * 2).min(RX_BUF);
                        c.rx.resize(grown, 0);
                    }
                    match c.stream.read(&mut c.rx[c.rx_end..]) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => {
                            c.rx_end += n;
                            if c.rx_end == c.rx.len() && c.rx.len() < RX_BUF {
                                let grown = (c.rx.len() * 2).min(RX_BUF);
                                c.rx.resize(grown, 0);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Sends one frame to the guest without blocking.
    /// Where a `dgram` port sends until its guest has sent something (then: to where
    /// the guest sends from). No effect on a `stream` port.
    pub fn set_default_peer(&mut self, to: &Path) {
        if let Sock::Dgram { default_peer, .. } = &mut self.sock {
            *default_peer = to.to_path_buf();
        }
    }

    pub fn send(&mut self, frame: &[u8]) -> Result<(), Verdict> {
        let r = match &mut self.sock {
            Sock::Stream { conn: None, .. } => Err(Verdict::PortDown),
            Sock::Stream { conn: Some(c), .. } => {
                let hdr = (frame.len() as u32).to_be_bytes();
                if !c.tx.is_empty() {
                    // Keep order: behind what is already queued.
                    if c.tx.push(&[&hdr, frame]) {
                        let _ = c.tx.flush(&mut c.stream);
                        Ok(())
                    } else {
                        Err(Verdict::QueueFull)
                    }
                } else {
                    match c
                        .stream
                        .write_vectored(&[IoSlice::new(&hdr), IoSlice::new(frame)])
                    {
                        Ok(n) if n == 4 + frame.len() => Ok(()),
                        Ok(n) => {
                            // Partial write: queue the rest (always fits: the queue is empty).
                            let (h, f) = if n < 4 {
                                (&hdr[n..], frame)
                            } else {
                                (&hdr[..0], &frame[n - 4..])
                            };
                            c.tx.push(&[h, f]);
                            Ok(())
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if c.tx.push(&[&hdr, frame]) {
                                Ok(())
                            } else {
                                Err(Verdict::QueueFull)
                            }
                        }
                        Err(_) => Err(Verdict::PortDown),
                    }
                }
            }
            Sock::Dgram {
                sock,
                peer,
                default_peer,
            } => {
                let r = match peer {
                    Some(p) => sock.send_to_addr(frame, p),
                    None => sock.send_to(frame, &*default_peer),
                };
                match r {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Verdict::QueueFull),
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Err(Verdict::QueueFull),
                    Err(_) => {
                        *peer = None;
                        Err(Verdict::PortDown)
                    }
                }
            }
        };
        if r.is_ok() {
            self.counters.tx_frames += 1;
            self.counters.tx_bytes += frame.len() as u64;
        }
        r
    }

    /// Writes queued output after the connection became writable.
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.sock {
            Sock::Stream { conn: Some(c), .. } => c.tx.flush(&mut c.stream),
            _ => Ok(()),
        }
    }

    /// Removes the socket file.
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for GuestPort {
    fn drop(&mut self) {
        self.unlink();
    }
}

/// Where a dgram guest conventionally binds its own end: `<guest>.peer.sock`.
pub fn peer_path(port: &Path) -> PathBuf {
    let stem = port.file_stem().and_then(|s| s.to_str()).unwrap_or("guest");
    port.with_file_name(format!("{stem}.peer.sock"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    /// A temporary directory removed on drop, also when the test fails.
    pub(crate) struct TmpDir(PathBuf);

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fresh directory for test `name`, and a socket path in it.
    pub(crate) fn tmp(name: &str) -> (TmpDir, PathBuf) {
        let d = std::env::temp_dir().join(format!("violin-port-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let sock = d.join("g.sock");
        (TmpDir(d), sock)
    }

    fn drain(p: &mut GuestPort) -> (Vec<Vec<u8>>, Vec<Verdict>, io::Result<bool>) {
        let mut frames = Vec::new();
        let mut drops = Vec::new();
        let mut scratch = vec![0u8; 70000];
        let r = p.receive(
            &mut scratch,
            &mut super::super::Budget::new(64, u64::MAX),
            |e| match e {
                RxEvent::Frame(f) | RxEvent::Super(f, _) => frames.push(f.to_vec()),
                RxEvent::Drop(v) => drops.push(v),
            },
        );
        (frames, drops, r)
    }

    fn wait_readable(fd: RawFd) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 2000) };
    }

    /// The stream port's ring keeps bytes in order across partial writes, refusals and
    /// wrap-around, and refuses whole what would pass its bound.
    #[test]
    fn the_tx_ring_keeps_order_across_partial_writes() {
        /// Takes at most 1000 bytes a call, and every third call nothing (EAGAIN).
        struct Slow(Vec<u8>, usize);
        impl Write for Slow {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.write_vectored(&[IoSlice::new(b)])
            }
            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                self.1 += 1;
                if self.1.is_multiple_of(3) {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let mut n = 0;
                for b in bufs {
                    let take = (1000 - n).min(b.len());
                    self.0.extend_from_slice(&b[..take]);
                    n += take;
                }
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut q, mut w, mut want) = (TxQueue::new(), Slow(Vec::new(), 0), Vec::new());
        for i in 0..5000u32 {
            let body = vec![i as u8; 1 + (i as usize * 37) % 1500];
            if q.push(&[&i.to_be_bytes(), &body]) {
                want.extend_from_slice(&i.to_be_bytes());
                want.extend_from_slice(&body);
            }
            if i % 7 == 0 {
                q.flush(&mut w).unwrap();
            }
        }
        while !q.is_empty() {
            q.flush(&mut w).unwrap();
        }
        assert_eq!(w.0.len(), want.len());
        assert!(w.0 == want, "bytes out of order");
        let mut q = TxQueue::new();
        assert!(q.push(&[&vec![1u8; TX_QUEUE - 10]]));
        assert!(!q.push(&[&[0u8; 5], &[0u8; 6]]), "11 bytes past the bound");
        assert!(q.push(&[&[0u8; 10]]));
    }

    #[test]
    fn stream_buffers_grow_for_big_records_and_backlogs() {
        let (_dir, path) = tmp("grow");
        let mut port = GuestPort::bind(&path, Framing::Stream).unwrap();
        let mut guest = UnixStream::connect(&path).unwrap();
        wait_readable(port.socket_fd());
        port.accept().unwrap();
        // One record far bigger than the starting buffer, then 50 small ones.
        let big: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
        let mut bytes = (big.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&big);
        for i in 0..50u8 {
            bytes.extend_from_slice(&[0, 0, 0, 3, i, i, i]);
        }
        let writer = std::thread::spawn(move || {
            guest.write_all(&bytes).unwrap();
            guest
        });
        let mut frames = Vec::new();
        let t0 = std::time::Instant::now();
        while frames.len() < 51 && t0.elapsed() < Duration::from_secs(5) {
            let (f, d, _) = drain(&mut port);
            assert!(d.is_empty(), "{d:?}");
            frames.extend(f);
        }
        assert_eq!(frames.len(), 51);
        assert_eq!(frames[0], big, "the big record arrived whole");
        assert_eq!(frames[50], vec![49, 49, 49]);
        // The daemon → guest queue grows past its start, up to its bound.
        let mut guest = writer.join().unwrap();
        let frame = vec![7u8; 1500];
        let queued = (0..100).filter(|_| port.send(&frame).is_ok()).count();
        assert!(queued * 1504 > BUF_START, "queued {queued}");
        let mut got = vec![0u8; 1504];
        guest.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &1500u32.to_be_bytes());
    }

    #[test]
    fn stream_framing_errors_and_reconnect() {
        let (_dir, path) = tmp("stream");
        let mut port = GuestPort::bind(&path, Framing::Stream).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(!port.connected());
        assert_eq!(port.send(b"x"), Err(Verdict::PortDown));

        let mut guest = UnixStream::connect(&path).unwrap();
        wait_readable(port.socket_fd());
        assert_eq!(port.accept().unwrap(), (None, true));
        assert!(port.connected());
        // Two frames and a zero-length record, split across writes.
        let mut bytes = Vec::new();
        for f in [&b"hello"[..], b"", b"world!"] {
            bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
            bytes.extend_from_slice(f);
        }
        guest.write_all(&bytes[..7]).unwrap();
        wait_readable(port.conn_fd().unwrap());
        std::thread::sleep(Duration::from_millis(20));
        let (frames, drops, _) = drain(&mut port);
        assert!(
            frames.is_empty() && drops.is_empty(),
            "half a record is not a frame"
        );
        guest.write_all(&bytes[7..]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (frames, drops, r) = drain(&mut port);
        assert_eq!(frames, vec![b"hello".to_vec(), b"world!".to_vec()]);
        assert_eq!(drops, vec![Verdict::ZeroLength]);
        assert!(matches!(r, Ok(false)));
        // Daemon → guest.
        port.send(b"reply").unwrap();
        let mut got = [0u8; 9];
        guest.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\0\0\0\x05reply");
        // An impossible record length closes the connection.
        guest.write_all(&0x0100_0000u32.to_be_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (_, drops, r) = drain(&mut port);
        assert_eq!(drops, vec![Verdict::Oversize]);
        assert!(r.is_err());
        port.disconnect();
        assert!(!port.connected());
        // The guest reconnects and traffic flows again.
        let mut guest2 = UnixStream::connect(&path).unwrap();
        wait_readable(port.socket_fd());
        assert!(port.accept().unwrap().1);
        guest2.write_all(b"\0\0\0\x02hi").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(drain(&mut port).0, vec![b"hi".to_vec()]);
        assert_eq!(port.counters.connects, 2);
        drop(port);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[test]
    fn a_guest_that_stops_reading_fills_only_its_queue() {
        let (_dir, path) = tmp("slow");
        let mut port = GuestPort::bind(&path, Framing::Stream).unwrap();
        let _guest = UnixStream::connect(&path).unwrap(); // never reads
        wait_readable(port.socket_fd());
        port.accept().unwrap();
        let frame = [0x55u8; 1400];
        let mut full = 0;
        for _ in 0..10_000 {
            if port.send(&frame) == Err(Verdict::QueueFull) {
                full += 1;
            }
        }
        assert!(full > 0, "the bounded queue overflowed");
        assert!(port.counters.tx_frames < 10_000);
        assert_eq!(port.counters.tx_bytes, port.counters.tx_frames * 1400);
        // What was accepted fits in the kernel's send buffer and the port's own queue:
        // the rest was refused, not buffered without bound.
        let fd = port.conn_fd().expect("connected");
        let sndbuf =
            crate::datapath::transport::udp::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)
                .expect("SO_SNDBUF");
        let accepted = port.counters.tx_bytes as usize;
        assert!(
            accepted <= sndbuf as usize + TX_QUEUE,
            "accepted {accepted} bytes, more than SO_SNDBUF {sndbuf} + TX_QUEUE {TX_QUEUE}"
        );
    }

    #[test]
    fn dgram_learns_its_peer_and_counts_zero_length() {
        let (_dir, path) = tmp("dgram");
        let mut port = GuestPort::bind(&path, Framing::Dgram).unwrap();
        assert!(!port.connected());
        assert_eq!(port.send(b"nobody"), Err(Verdict::PortDown));
        let guest_path = peer_path(&path);
        let guest = UnixDatagram::bind(&guest_path).unwrap();
        assert!(port.connected(), "the conventional peer socket exists");
        port.send(b"early").unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(guest.recv(&mut buf).unwrap(), 5);
        guest.send_to(b"frame", &path).unwrap();
        guest.send_to(b"", &path).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (frames, drops, _) = drain(&mut port);
        assert_eq!(frames, vec![b"frame".to_vec()]);
        assert_eq!(drops, vec![Verdict::ZeroLength]);
        port.send(b"back").unwrap();
        assert_eq!(guest.recv(&mut buf).unwrap(), 4);
    }
}
