//! The underlay over a plain UDP socket: VXLAN (RFC 7348) with the kernel building the
//! outer IPv4/UDP headers. Used where XDP is unavailable, and as the reference the
//! kernel-bypass path must match.
//!
//! Receive: `recvmmsg` of up to [`RX_BATCH`] messages with `UDP_GRO`, so the kernel
//! hands over several datagrams, each message a run of same-sized datagrams of one
//! flow (the segment size in a control message), in one call → each datagram's VXLAN
//! header checked → (VNI, inner frame). Send: a frame joins a batch
//! (copied beside its VXLAN header) that leaves in one `sendmmsg` when it is full, at
//! the end of the worker's round, or before anything that must not overtake it; a
//! longer frame is `sendmsg` of two iovecs, header and frame, never copied; a
//! super-frame is one `sendmsg` with `UDP_SEGMENT` per up to [`GSO_MAX`] segments, each
//! segment's VXLAN and inner headers built beside it and its payload sent from where it
//! lies.
//! When the kernel refuses segmentation offload (`EIO`), the socket says so once and
//! sends segment by segment from then on.

use crate::datapath::fastpath::encap;
use nix::sys::socket::{sendmsg, MsgFlags, SockaddrIn};
use std::cell::{Cell, RefCell};
use std::io::{self, IoSlice};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use tracing::warn;
use violin_common::wire::gso::Gso;
use violin_common::wire::{Rco, VxlanRepr};
use violin_common::Verdict;

/// Segments per `UDP_SEGMENT` send (the kernel's `UDP_MAX_SEGMENTS` is 64 or 128).
pub const GSO_MAX: usize = 64;
/// The largest UDP payload one send may carry (an IPv4 packet of 64 KiB).
const UDP_PAYLOAD_MAX: usize = 65535 - 20 - 8;
const VXLAN_HDR: usize = 8;
/// Datagrams per `sendmmsg`: one worker round's read of a guest port
/// (`worker::BUDGET`, 64 frames), so a round of small frames leaves in one message.
pub const TX_BATCH: usize = 64;
/// Messages per `recvmmsg`, each with room for a whole GRO run.
pub const RX_BATCH: usize = 8;
const RX_SLOT: usize = 65536;
/// Room for one batched datagram: a VXLAN header and a frame of a 1500-byte MTU with
/// two VLAN tags; longer frames are sent at once.
const TX_SLOT: usize = 1536;
// A batch never holds more segments than one UDP_SEGMENT send takes; a run of long
// datagrams also stops at UDP_PAYLOAD_MAX bytes (see `flush`).
const _: () = assert!(TX_BATCH <= GSO_MAX);

pub struct UdpUnderlay {
    sock: UdpSocket,
    port: u16,
    /// Segmentation offload works on this socket (cleared at the first `EIO`).
    gso: Cell<bool>,
    /// Super-frames to peers leave with partial checksums (remote checksum offload).
    rco: bool,
    /// The longest frame a receiver takes as one, when known (see
    /// [`UdpUnderlay::set_largest_frame`]).
    largest_frame: usize,
    tx: RefCell<TxBatch>,
    rx: RefCell<Box<[u8]>>,
    /// VXLAN datagrams the kernel took (batched, alone, or segments of super-frames).
    sent: Cell<u64>,
}

/// Datagrams waiting for one `sendmmsg`, and those the kernel refused.
struct TxBatch {
    buf: Box<[u8]>,
    len: [usize; TX_BATCH],
    to: [libc::sockaddr_in; TX_BATCH],
    vni: [u32; TX_BATCH],
    n: usize,
    /// (destination, VNI) of each datagram the last flushes could not send, until
    /// [`UdpUnderlay::take_failed`] (its capacity is kept: no allocation per frame).
    failed: Vec<(Ipv4Addr, u32)>,
}

impl TxBatch {
    fn new() -> TxBatch {
        TxBatch {
            buf: vec![0u8; TX_BATCH * TX_SLOT].into_boxed_slice(),
            len: [0; TX_BATCH],
            to: [unsafe_zeroed_sockaddr(); TX_BATCH],
            vni: [0; TX_BATCH],
            n: 0,
            failed: Vec::with_capacity(4 * TX_BATCH),
        }
    }
}

fn sockaddr(dst: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One received datagram, decapsulated.
pub enum Received<'a> {
    /// (outer source, VXLAN header — its VNI, and where the inner frame's L4 checksum
    /// is partial if it came with remote checksum offload — inner frame).
    Frame(Ipv4Addr, VxlanRepr, &'a [u8]),
    /// Not valid VXLAN: count it.
    Bad(Verdict),
}

/// An integer socket option of `fd`.
pub(super) fn getsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the live c_int `v`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            opt,
            &mut v as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

pub(super) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Most Violins a steering program names ([`steering_program`]): two instructions
/// each, well within the kernel's 4096 (`BPF_MAXINSNS`). Others go by `VNI mod n`.
pub const MAX_STEERED: usize = 2000;

/// The classic BPF program that picks a socket of a [`UdpUnderlay::bind_group`] for
/// each datagram: the socket `homes` names for its VNI, else socket `VNI mod n`, the
/// VNI read from the VXLAN header (the kernel runs it with the packet starting at the
/// UDP payload). `homes` is looked up in order, two instructions per Violin (at most
/// [`MAX_STEERED`]). A datagram too short for a VXLAN header makes the load fail and
/// the program return 0: socket 0, whose worker drops it as malformed.
pub fn steering_program(n: u32, homes: &[(u32, usize)]) -> Vec<libc::sock_filter> {
    let op = |code: u32, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf,
        k,
    };
    let mut p = Vec::with_capacity(4 + 2 * homes.len().min(MAX_STEERED));
    // A = 32-bit word at payload offset 4 (VNI << 8 | reserved), host order.
    p.push(op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 4));
    p.push(op(libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K, 0, 8));
    for &(vni, socket) in homes.iter().take(MAX_STEERED) {
        // A == vni: the next instruction (return its socket), else skip it.
        p.push(op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 1, vni));
        p.push(op(libc::BPF_RET | libc::BPF_K, 0, socket as u32));
    }
    p.push(op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, n.max(1)));
    p.push(op(libc::BPF_RET | libc::BPF_A, 0, 0));
    p
}

/// Makes `prog` the steering program of the `SO_REUSEPORT` group socket `fd` is in
/// (it replaces the one before, at once for every socket of the group).
pub fn steer(fd: RawFd, prog: &[libc::sock_filter]) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: setsockopt reads the `sock_fprog` and the instructions it points to,
    // which live until the call returns (the kernel copies them).
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("steering the underlay sockets by VNI (SO_ATTACH_REUSEPORT_CBPF): {e}"),
        ));
    }
    Ok(())
}

impl UdpUnderlay {
    /// Binds `addr:port` (non-blocking) with large socket buffers and GRO on receive.
    pub fn bind(addr: Ipv4Addr, port: u16) -> io::Result<UdpUnderlay> {
        Ok(Self::bind_group(addr, port, 1)?.remove(0))
    }

    /// `n` sockets on `addr:port` (`SO_REUSEPORT`), one per packet worker, with the
    /// kernel steering each datagram to socket `VNI mod n` ([`steering_program`]; the
    /// control thread re-steers Violins it places elsewhere, [`steer`], or replaces the
    /// program with one that picks each Violin's own socket, `crate::xdp::steer`): every
    /// frame of a Violin reaches the worker that owns it. The group is open to more
    /// sockets of this process's user ([`UdpUnderlay::member`]) even with one worker.
    pub fn bind_group(addr: Ipv4Addr, port: u16, n: usize) -> io::Result<Vec<UdpUnderlay>> {
        let mut at = SocketAddrV4::new(addr, port);
        let mut group = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let sock = Self::member(at)?;
            if i == 0 {
                at.set_port(sock.local_addr()?.port());
                if n > 1 {
                    steer(sock.as_raw_fd(), &steering_program(n as u32, &[]))?;
                }
            }
            group.push(Self::from_socket(sock)?);
        }
        Ok(group)
    }

    /// One more socket of the `SO_REUSEPORT` group on `at`, set up as the workers' are
    /// (non-blocking, large buffers, GRO on receive): a Violin's own, which its worker
    /// reads with [`UdpUnderlay::recv_on`].
    pub fn member(at: SocketAddrV4) -> io::Result<UdpSocket> {
        use nix::sys::socket::{setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType};
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        setsockopt(&fd, sockopt::ReusePort, &true)?;
        nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrIn::from(at))?;
        for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, opt, 4 << 20);
        }
        // Without GRO the kernel hands over one datagram per call, as before.
        if let Err(e) = setsockopt_int(fd.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1) {
            warn!("UDP_GRO unavailable on an underlay socket: {e}");
        }
        super::busypoll::enable(fd.as_raw_fd());
        Ok(UdpSocket::from(fd))
    }

    fn from_socket(sock: UdpSocket) -> io::Result<UdpUnderlay> {
        let port = sock.local_addr()?.port();
        Ok(UdpUnderlay {
            sock,
            port,
            gso: Cell::new(true),
            rco: true,
            largest_frame: 0,
            tx: RefCell::new(TxBatch::new()),
            rx: RefCell::new(vec![0u8; RX_BATCH * RX_SLOT].into_boxed_slice()),
            sent: Cell::new(0),
        })
    }

    /// Where the group is bound.
    pub fn local(&self) -> io::Result<SocketAddrV4> {
        match self.sock.local_addr()? {
            std::net::SocketAddr::V4(a) => Ok(a),
            a => Err(io::Error::other(format!("the underlay socket is on {a}"))),
        }
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The longest Ethernet frame a receiver takes as one frame
    /// ([`super::xsk::largest_single_frame`]). Up to that length a receiver's XDP
    /// classifier tells a super-frame from a frame by its length alone (generic XDP
    /// sees either whole; longer, by what the inner frame states), so a super-frame is
    /// sent as one only when even its shortest possible form (a full segment and a
    /// one-byte one) is longer; shorter segments go one by one.
    pub fn set_largest_frame(&mut self, bytes: usize) {
        self.largest_frame = bytes;
    }

    /// Whether super-frames to peers leave with partial checksums (default: yes). Off
    /// for a cluster whose other daemons predate remote checksum offload: they would
    /// hand such segments to guests unfinished.
    pub fn set_remote_checksum(&mut self, on: bool) {
        self.rco = on;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Receives what is waiting, up to [`RX_BATCH`] messages (each a datagram or a GRO
    /// run of them) in one call, and hands each datagram on decapsulated. Returns how
    /// many datagrams there were (0: nothing waiting).
    pub fn recv(&self, f: impl FnMut(Received<'_>)) -> io::Result<usize> {
        self.recv_on(self.fd(), f)
    }

    /// The same from another socket of the group (a Violin's own, [`UdpUnderlay::member`]),
    /// into this one's buffers.
    pub fn recv_on(&self, fd: RawFd, mut f: impl FnMut(Received<'_>)) -> io::Result<usize> {
        let mut bufs = self.rx.borrow_mut();
        let mut from = [unsafe_zeroed_sockaddr(); RX_BATCH];
        // Room for one int-sized control message (the GRO segment size) per message.
        let mut cbuf = [[0u64; 4]; RX_BATCH];
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; RX_BATCH];
        // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
        let mut msgs: [libc::mmsghdr; RX_BATCH] = unsafe { std::mem::zeroed() };
        for (i, m) in msgs.iter_mut().enumerate() {
            iov[i] = libc::iovec {
                iov_base: bufs[i * RX_SLOT..].as_mut_ptr().cast(),
                iov_len: RX_SLOT,
            };
            let h = &mut m.msg_hdr;
            h.msg_name = (&mut from[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_control = cbuf[i].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of_val(&cbuf[i]);
        }
        let got = loop {
            // SAFETY: every message points at live locals (`from`, `iov`, `cbuf`) and
            // at `bufs`, all of which outlive the call.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    msgs.as_mut_ptr(),
                    RX_BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(0),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            break r as usize;
        };
        let mut count = 0;
        for (i, m) in msgs.iter().enumerate().take(got) {
            count += 1;
            if from[i].sin_family != libc::AF_INET as libc::sa_family_t {
                f(Received::Bad(Verdict::NotMember));
                continue;
            }
            let n = m.msg_len as usize;
            let src = Ipv4Addr::from(u32::from_be(from[i].sin_addr.s_addr));
            let seg = gro_segment_size(&m.msg_hdr)
                .filter(|&s| s > 0)
                .unwrap_or(n.max(1));
            let data = &bufs[i * RX_SLOT..i * RX_SLOT + n];
            for (k, d) in data.chunks(seg).enumerate() {
                count += usize::from(k > 0);
                f(match encap::decap(d) {
                    Ok((vx, inner)) => Received::Frame(src, vx, inner),
                    Err(v) => Received::Bad(v),
                });
            }
        }
        Ok(count)
    }

    /// Encapsulates `frame` with `vni` for `dst` on the VXLAN port: into the batch, or
    /// (longer than a batch slot) sent at once after it.
    pub fn send(&self, dst: Ipv4Addr, vni: u32, frame: &[u8]) -> Result<(), Verdict> {
        if self.sends_alone(frame) {
            self.flush();
            return self.send_now(dst, vni, frame);
        }
        let full = {
            let mut b = self.tx.borrow_mut();
            let i = b.n;
            let slot = &mut b.buf[i * TX_SLOT..(i + 1) * TX_SLOT];
            slot[..VXLAN_HDR].copy_from_slice(&encap::header(vni));
            slot[VXLAN_HDR..VXLAN_HDR + frame.len()].copy_from_slice(frame);
            b.len[i] = VXLAN_HDR + frame.len();
            b.to[i] = sockaddr(dst, self.port);
            b.vni[i] = vni;
            b.n += 1;
            b.n == TX_BATCH
        };
        if full {
            self.flush();
        }
        Ok(())
    }

    /// True when `frame` is too long for a batch's slot: [`Self::send`] sends it at
    /// once, alone.
    #[inline]
    pub fn sends_alone(&self, frame: &[u8]) -> bool {
        VXLAN_HDR + frame.len() > TX_SLOT
    }

    /// VXLAN datagrams sent so far.
    pub fn sent_frames(&self) -> u64 {
        self.sent.get()
    }

    /// When the batch holds one datagram, offers its frame to `f` (destination, VNI,
    /// inner frame) and forgets it if `f` took it.
    pub fn take_lone(&self, f: impl FnOnce(Ipv4Addr, u32, &[u8]) -> bool) {
        let mut b = self.tx.borrow_mut();
        if b.n != 1 {
            return;
        }
        let dst = Ipv4Addr::from(u32::from_be(b.to[0].sin_addr.s_addr));
        if f(dst, b.vni[0], &b.buf[VXLAN_HDR..b.len[0]]) {
            b.n = 0;
        }
    }

    /// Sends the batch in one `sendmmsg` (more if the kernel takes part of it). A run
    /// of datagrams of one VNI to one destination, all as long as the first but the
    /// last, leaves as one `UDP_SEGMENT` message (what wireguard-go's
    /// `coalesceMessages` does): one trip through the kernel's stack and the underlay for the run, and one
    /// `UDP_GRO` message at the receiver. A run is sent so only when it is longer than
    /// the longest frame a receiver takes as one ([`UdpUnderlay::set_largest_frame`]),
    /// so an xdp-plane receiver's classifier hands it to its socket whole. A datagram
    /// the kernel refuses is dropped (a run: every datagram of it) and kept for
    /// [`UdpUnderlay::take_failed`].
    pub fn flush(&self) {
        let mut b = self.tx.borrow_mut();
        let n = b.n;
        if n == 0 {
            return;
        }
        let TxBatch {
            buf,
            len,
            to,
            vni,
            failed,
            ..
        } = &mut *b;
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; TX_BATCH];
        for i in 0..n {
            iov[i] = libc::iovec {
                iov_base: buf[i * TX_SLOT..].as_mut_ptr().cast(),
                iov_len: len[i],
            };
        }
        // Runs: message m carries datagrams first[m]..first[m] + count[m].
        let mut first = [0usize; TX_BATCH];
        let mut count = [0usize; TX_BATCH];
        let mut m = 0;
        let mut i = 0;
        while i < n {
            let mut k = 1;
            if self.gso.get() {
                // One destination and one Violin: the receiver's kernel steers the run
                // by its first datagram (`bind_group`), and Violins never share one.
                let same = |j: usize| {
                    to[j].sin_addr.s_addr == to[i].sin_addr.s_addr
                        && vni[j] == vni[i]
                        && len[j] <= len[i]
                };
                // Every datagram but the last as long as the first, and all of them
                // within one UDP datagram's 64 KiB.
                let mut bytes = len[i];
                while i + k < n
                    && same(i + k)
                    && len[i + k - 1] == len[i]
                    && bytes + len[i + k] <= UDP_PAYLOAD_MAX
                {
                    bytes += len[i + k];
                    k += 1;
                }
                if 14 + 20 + 8 + bytes <= self.largest_frame {
                    k = 1;
                }
            }
            first[m] = i;
            count[m] = k;
            m += 1;
            i += k;
        }
        // One control message (SOL_UDP / UDP_SEGMENT / u16) per run.
        let mut cbuf = [[0u64; 4]; TX_BATCH];
        // SAFETY: an all-zero mmsghdr is valid (null pointers, zero lengths).
        let mut msgs: [libc::mmsghdr; TX_BATCH] = unsafe { std::mem::zeroed() };
        for j in 0..m {
            let h = &mut msgs[j].msg_hdr;
            h.msg_name = (&mut to[first[j]] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iov[first[j]];
            h.msg_iovlen = count[j];
            if count[j] > 1 {
                segment_cmsg(h, &mut cbuf[j], len[first[j]] as u16);
            }
        }
        let mut sent = 0;
        while sent < m {
            // SAFETY: `msgs[sent..m]` point at `iov`, `to`, `cbuf` and `buf`, which
            // outlive the call; the kernel reads them and writes only `msg_len`.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd(),
                    msgs[sent..].as_mut_ptr(),
                    (m - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                let took: usize = count[sent..sent + r as usize].iter().sum();
                self.sent.set(self.sent.get() + took as u64);
                sent += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            if r < 0 && e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            let (at, k) = (first[sent], count[sent]);
            if k > 1 && e.raw_os_error() == Some(libc::EIO) {
                warn!(
                    "the kernel refused UDP segmentation offload on the underlay; \
                     sending datagrams one by one from now on"
                );
                self.gso.set(false);
                for d in at..at + k {
                    let dst = Ipv4Addr::from(u32::from_be(to[d].sin_addr.s_addr));
                    let payload = &buf[d * TX_SLOT + VXLAN_HDR..d * TX_SLOT + len[d]];
                    if self.send_now(dst, vni[d], payload).is_err() {
                        failed.push((dst, vni[d]));
                    }
                }
                sent += 1;
                continue;
            }
            // The kernel refused the first message left (a full socket buffer, an
            // unreachable address): its datagrams are dropped, the rest tried again.
            for d in at..at + k {
                failed.push((Ipv4Addr::from(u32::from_be(to[d].sin_addr.s_addr)), vni[d]));
            }
            sent += 1;
        }
        b.n = 0;
    }

    /// Hands over (destination, VNI) of each datagram a flush dropped.
    pub fn take_failed(&self, mut f: impl FnMut(Ipv4Addr, u32)) {
        let mut b = self.tx.borrow_mut();
        for (dst, vni) in b.failed.drain(..) {
            f(dst, vni);
        }
    }

    /// Sends one datagram now: the VXLAN header and `frame`, two iovecs.
    fn send_now(&self, dst: Ipv4Addr, vni: u32, frame: &[u8]) -> Result<(), Verdict> {
        let hdr = encap::header(vni);
        let iov = [IoSlice::new(&hdr), IoSlice::new(frame)];
        let addr = SockaddrIn::from(SocketAddrV4::new(dst, self.port));
        match sendmsg(
            self.sock.as_raw_fd(),
            &iov,
            &[],
            MsgFlags::MSG_DONTWAIT,
            Some(&addr),
        ) {
            Ok(_) => {
                self.sent.set(self.sent.get() + 1);
                Ok(())
            }
            Err(_) => Err(Verdict::TunnelTxError),
        }
    }

    /// Sends super-frame `frame` as the VXLAN datagrams of its segments: one
    /// `UDP_SEGMENT` send per [`GSO_MAX`] segments. Headers are built in `scratch`
    /// (at least `GSO_MAX × (8 + g.hdr_len)` bytes). To a `peer` (another Violin
    /// daemon) the segments' L4 checksums stay partial, announced by remote checksum
    /// offload: the payload is not read here, and the outer UDP checksum, which the
    /// kernel offloads, covers it on the way.
    pub fn send_super(
        &self,
        dst: Ipv4Addr,
        vni: u32,
        g: &Gso,
        frame: &[u8],
        scratch: &mut [u8],
        peer: bool,
    ) -> Result<(), Verdict> {
        let n = g.segments(frame.len());
        let hl = usize::from(g.hdr_len);
        let datagram = VXLAN_HDR + hl + usize::from(g.seg_size);
        let shortest = 14 + 20 + 8 + datagram + VXLAN_HDR + hl + 1;
        if !self.gso.get() || n == 1 || shortest <= self.largest_frame {
            return super::each_segment(g, frame, scratch, |s| self.send(dst, vni, s));
        }
        // What was batched before goes first.
        self.flush();
        let per_send = (UDP_PAYLOAD_MAX / datagram).clamp(1, GSO_MAX);
        let rco = Rco::new(g.l4, !g.kind.tcp()).filter(|_| peer && self.rco);
        let vx = VxlanRepr { vni, rco }.to_bytes();
        let addr = sockaddr(dst, self.port);
        let mut first = 0;
        while first < n {
            let k = per_send.min(n - first);
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2 * GSO_MAX];
            let step = VXLAN_HDR + hl;
            for j in 0..k {
                let h = &mut scratch[j * step..(j + 1) * step];
                h[..VXLAN_HDR].copy_from_slice(&vx);
                let p = match rco {
                    Some(_) => g.segment_header_partial(frame, first + j, &mut h[VXLAN_HDR..]),
                    None => g.segment_header(frame, first + j, &mut h[VXLAN_HDR..]),
                };
                iov[2 * j] = libc::iovec {
                    iov_base: h.as_mut_ptr().cast(),
                    iov_len: step,
                };
                let payload = &frame[p];
                iov[2 * j + 1] = libc::iovec {
                    iov_base: payload.as_ptr() as *mut libc::c_void,
                    iov_len: payload.len(),
                };
            }
            match self.sendmsg_gso(&addr, &iov[..2 * k], datagram as u16) {
                Ok(()) => self.sent.set(self.sent.get() + k as u64),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    warn!(
                        "the kernel refused UDP segmentation offload on the underlay; \
                         sending super-frames segment by segment from now on"
                    );
                    self.gso.set(false);
                    return self.send_super(dst, vni, g, frame, scratch, peer);
                }
                Err(_) => return Err(Verdict::TunnelTxError),
            }
            first += k;
        }
        Ok(())
    }

    fn sendmsg_gso(
        &self,
        addr: &libc::sockaddr_in,
        iov: &[libc::iovec],
        seg: u16,
    ) -> io::Result<()> {
        let mut cbuf = [0u64; 4];
        // SAFETY: an all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = addr as *const libc::sockaddr_in as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        segment_cmsg(&mut msg, &mut cbuf, seg);
        // SAFETY: `msg` points at `addr`, `iov` and `cbuf`, which outlive the call.
        if unsafe { libc::sendmsg(self.fd(), &msg, libc::MSG_DONTWAIT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Makes `cbuf` `msg`'s control message: SOL_UDP / UDP_SEGMENT / `seg` (a u16).
fn segment_cmsg(msg: &mut libc::msghdr, cbuf: &mut [u64; 4], seg: u16) {
    // SAFETY: CMSG_* stay within `cbuf` (sized for a u16 payload, checked against
    // CMSG_SPACE), which `msg` points at from here on.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
        debug_assert!(space <= std::mem::size_of_val(cbuf));
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space;
        let c = libc::CMSG_FIRSTHDR(msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), seg);
    }
}

fn unsafe_zeroed_sockaddr() -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// The GRO segment size in a received message's control data, if any.
fn gro_segment_size(msg: &libc::msghdr) -> Option<usize> {
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk only within
    // `msg_controllen`, and the payload is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything waiting on `u`, as VNIs.
    fn drain_vnis(u: &UdpUnderlay) -> Vec<u32> {
        let mut got = Vec::new();
        while u
            .recv(|r| {
                if let Received::Frame(_, vx, _) = r {
                    got.push(vx.vni)
                }
            })
            .unwrap()
            > 0
        {}
        got
    }

    #[test]
    fn a_socket_group_steers_each_vni_to_one_socket() {
        let group = UdpUnderlay::bind_group(Ipv4Addr::LOCALHOST, 0, 3).unwrap();
        let port = group[0].port();
        assert!(group.iter().all(|u| u.port() == port));
        // Different source ports: without steering the kernel would hash them apart.
        let senders: Vec<UdpUnderlay> = (0..4)
            .map(|_| UdpUnderlay::bind(Ipv4Addr::new(127, 0, 0, 3), 0).unwrap())
            .collect();
        let vnis = [1u32, 2, 3, 4, 5, 6, 100, 0xff_ffff];
        for s in &senders {
            for &vni in &vnis {
                let hdr = encap::header(vni);
                let d = [&hdr[..], b"inner frame"].concat();
                s.sock
                    .send_to(&d, SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
                    .unwrap();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut total = 0;
        for (i, u) in group.iter().enumerate() {
            let got = drain_vnis(u);
            total += got.len();
            assert!(
                got.iter().all(|v| *v as usize % 3 == i),
                "socket {i} got VNIs {got:?}"
            );
        }
        assert_eq!(total, senders.len() * vnis.len());
    }

    #[test]
    fn encapsulates_and_decapsulates_over_loopback() {
        let a = UdpUnderlay::bind(Ipv4Addr::LOCALHOST, 0).unwrap();
        // Same port on another loopback address, as hosts use the same VXLAN port.
        let b = UdpUnderlay::bind(Ipv4Addr::new(127, 0, 0, 2), a.port()).unwrap();
        a.send(Ipv4Addr::new(127, 0, 0, 2), 101, b"inner frame")
            .unwrap();
        a.flush();
        let mut got = None;
        for _ in 0..200 {
            let n = b
                .recv(|r| {
                    got = Some(match r {
                        Received::Frame(src, vx, f) => Ok((src, vx.vni, f.to_vec())),
                        Received::Bad(v) => Err(v),
                    })
                })
                .unwrap();
            if n > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            got,
            Some(Ok((Ipv4Addr::LOCALHOST, 101, b"inner frame".to_vec())))
        );
        // A datagram that is not VXLAN is reported, not passed on.
        let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
        raw.send_to(&[0u8; 4], ("127.0.0.2", a.port())).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut bad = None;
        assert_eq!(
            b.recv(|r| {
                if let Received::Bad(v) = r {
                    bad = Some(v)
                }
            })
            .unwrap(),
            1
        );
        assert_eq!(bad, Some(Verdict::Truncated));
    }

    #[test]
    fn small_frames_leave_in_batches_in_order_and_refusals_are_counted() {
        let a = UdpUnderlay::bind(Ipv4Addr::LOCALHOST, 0).unwrap();
        let b = UdpUnderlay::bind(Ipv4Addr::new(127, 0, 0, 4), a.port()).unwrap();
        let to = Ipv4Addr::new(127, 0, 0, 4);
        let frame = |i: usize| format!("frame {i:03}").into_bytes();
        let read_all = |b: &UdpUnderlay| {
            let mut got = Vec::new();
            std::thread::sleep(std::time::Duration::from_millis(30));
            while b
                .recv(|r| {
                    if let Received::Frame(_, VxlanRepr { vni: 7, .. }, f) = r {
                        got.push(f.to_vec())
                    }
                })
                .unwrap()
                > 0
            {}
            got
        };
        // Fewer than a batch: nothing leaves until the flush.
        for i in 0..5 {
            a.send(to, 7, &frame(i)).unwrap();
        }
        assert!(read_all(&b).is_empty(), "sent before the flush");
        // More than a batch: a full batch leaves by itself, in order; a long frame
        // (sent at once) does not overtake the batch before it.
        for i in 5..TX_BATCH + 10 {
            a.send(to, 7, &frame(i)).unwrap();
        }
        let long = vec![0xabu8; TX_SLOT + 100];
        a.send(to, 7, &long).unwrap();
        // A datagram the kernel refuses (broadcast without SO_BROADCAST) is dropped
        // alone and reported.
        a.send(to, 7, &frame(100)).unwrap();
        a.send(Ipv4Addr::BROADCAST, 9, &frame(101)).unwrap();
        a.send(to, 7, &frame(102)).unwrap();
        a.flush();
        let mut want: Vec<Vec<u8>> = (0..TX_BATCH + 10).map(frame).collect();
        want.push(long);
        want.push(frame(100));
        want.push(frame(102));
        assert_eq!(read_all(&b), want);
        let mut failed = Vec::new();
        a.take_failed(|dst, vni| failed.push((dst, vni)));
        assert_eq!(failed, vec![(Ipv4Addr::BROADCAST, 9)]);
        a.take_failed(|_, _| panic!("reported twice"));
    }

    /// A batch of one datagram is offered whole (destination, VNI, inner frame) and,
    /// taken, is not sent; refused, it is; a batch of two is not offered.
    #[test]
    fn a_lone_datagram_is_offered_and_a_batch_is_not() {
        let a = UdpUnderlay::bind(Ipv4Addr::LOCALHOST, 0).unwrap();
        let to = Ipv4Addr::new(127, 0, 0, 8);
        let b = UdpUnderlay::bind(to, a.port()).unwrap();
        let wait = || std::thread::sleep(std::time::Duration::from_millis(30));
        a.send(to, 21, b"lone").unwrap();
        let mut offered = None;
        a.take_lone(|dst, vni, frame| {
            offered = Some((dst, vni, frame.to_vec()));
            true
        });
        assert_eq!(offered, Some((to, 21, b"lone".to_vec())));
        a.flush();
        wait();
        assert_eq!(drain_vnis(&b), Vec::<u32>::new(), "taken: not sent");
        a.send(to, 22, b"kept").unwrap();
        a.take_lone(|_, _, _| false);
        a.flush();
        a.send(to, 23, b"one").unwrap();
        a.send(to, 24, b"two").unwrap();
        a.take_lone(|_, _, _| panic!("a batch of two offered"));
        a.flush();
        wait();
        assert_eq!(drain_vnis(&b), vec![22, 23, 24]);
    }

    #[test]
    fn one_receive_takes_a_batch_of_datagrams() {
        let mut a = UdpUnderlay::bind(Ipv4Addr::LOCALHOST, 0).unwrap();
        // 20 one-byte frames are shorter than the longest single frame: they leave as
        // 20 datagrams, not one run.
        a.set_largest_frame(1514);
        let b = UdpUnderlay::bind(Ipv4Addr::new(127, 0, 0, 5), a.port()).unwrap();
        for i in 0..20u32 {
            a.send(Ipv4Addr::new(127, 0, 0, 5), 1000 + i, b"x").unwrap();
        }
        a.flush();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mut vnis = Vec::new();
        let first = b
            .recv(|r| {
                if let Received::Frame(_, vx, _) = r {
                    vnis.push(vx.vni)
                }
            })
            .unwrap();
        assert_eq!(first, RX_BATCH, "one call, a batch");
        vnis.extend(drain_vnis(&b));
        assert_eq!(vnis, (1000..1020).collect::<Vec<u32>>());
    }

    /// Runs of equal datagrams of one VNI to one destination (the last may be shorter)
    /// leave as one `UDP_SEGMENT` message each and arrive as one GRO message: one
    /// receive call takes all of them, in order; a shorter datagram ends a run, and
    /// another destination or VNI, or a run too short to pass for a super-frame, goes
    /// datagram by datagram.
    #[test]
    fn runs_of_equal_datagrams_leave_and_arrive_as_one_message() {
        let mut a = UdpUnderlay::bind(Ipv4Addr::LOCALHOST, 0).unwrap();
        a.set_largest_frame(1514);
        let b = UdpUnderlay::bind(Ipv4Addr::new(127, 0, 0, 6), a.port()).unwrap();
        let c = UdpUnderlay::bind(Ipv4Addr::new(127, 0, 0, 7), a.port()).unwrap();
        let (to_b, to_c) = (Ipv4Addr::new(127, 0, 0, 6), Ipv4Addr::new(127, 0, 0, 7));
        let frame = |i: u32, len: usize| {
            let mut f = vec![i as u8; len];
            f[0] = 0xee;
            f
        };
        // To b, VNI 7: 20 of 100 bytes and one of 60 (a run of 21), then 6 of 200
        // bytes (1248 bytes in all: not longer than a single frame, so 6 datagrams).
        // To c, in between: 10 of 400 bytes, each of another VNI (10 datagrams).
        let mut want_b: Vec<(u32, Vec<u8>)> = (0..20).map(|i| (7, frame(i, 100))).collect();
        want_b.push((7, frame(20, 60)));
        let want_c: Vec<(u32, Vec<u8>)> = (0..10).map(|i| (100 + i, frame(i, 400))).collect();
        want_b.extend((21..27).map(|i| (7, frame(i, 200))));
        for (vni, f) in &want_b[..21] {
            a.send(to_b, *vni, f).unwrap();
        }
        for (vni, f) in &want_c {
            a.send(to_c, *vni, f).unwrap();
        }
        for (vni, f) in &want_b[21..] {
            a.send(to_b, *vni, f).unwrap();
        }
        a.flush();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let take = |u: &UdpUnderlay| {
            let mut got = Vec::new();
            let mut calls = Vec::new();
            loop {
                let n = u
                    .recv(|r| {
                        if let Received::Frame(_, vx, f) = r {
                            got.push((vx.vni, f.to_vec()))
                        }
                    })
                    .unwrap();
                if n == 0 {
                    return (got, calls);
                }
                calls.push(n);
            }
        };
        let (got_b, calls_b) = take(&b);
        assert_eq!(got_b, want_b);
        // The run of 21 and the 6 single datagrams, all in one recvmmsg (7 messages).
        assert_eq!(
            calls_b,
            vec![27],
            "21 + 6 frames from 7 messages in one call"
        );
        let (got_c, calls_c) = take(&c);
        assert_eq!(got_c, want_c);
        assert_eq!(calls_c, vec![RX_BATCH, 10 - RX_BATCH], "one message each");
    }

    /// A full batch of full-sized datagrams is longer than one UDP datagram may be: its
    /// run leaves as two `UDP_SEGMENT` messages, each within 64 KiB, and nothing is
    /// refused.
    #[test]
    fn a_run_of_long_datagrams_stops_at_64_kib() {
        let mut a = UdpUnderlay::bind(Ipv4Addr::LOCALHOST, 0).unwrap();
        a.set_largest_frame(1514);
        let b = UdpUnderlay::bind(Ipv4Addr::new(127, 0, 0, 8), a.port()).unwrap();
        let want: Vec<Vec<u8>> = (0..TX_BATCH).map(|i| vec![i as u8; 1400]).collect();
        const { assert!(TX_BATCH * (VXLAN_HDR + 1400) > UDP_PAYLOAD_MAX) };
        for f in &want {
            a.send(Ipv4Addr::new(127, 0, 0, 8), 7, f).unwrap();
        }
        a.flush();
        let mut failed = 0;
        a.take_failed(|_, _| failed += 1);
        assert_eq!(failed, 0, "datagrams refused");
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mut got = Vec::new();
        let n = b
            .recv(|r| {
                if let Received::Frame(_, _, f) = r {
                    got.push(f.to_vec())
                }
            })
            .unwrap();
        assert_eq!(n, TX_BATCH, "two messages, one receive");
        assert_eq!(got, want);
    }

    /// A TCP/IPv4 super-frame as a tap hands it over (checksum left partial).
    fn super_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[8, 0]);
        f[14] = 0x45;
        let total = (40 + payload) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[46] = 0x50;
        f[47] = 0x10;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    /// To an external VTEP (`peer` false) every segment carries a complete checksum; to
    /// a peer daemon it leaves partial under remote checksum offload, the payload unread.
    #[test]
    fn a_super_frame_crosses_loopback_in_segments_and_comes_back_whole() {
        for peer in [false, true] {
            super_frame_crosses_loopback(peer);
        }
    }

    fn super_frame_crosses_loopback(peer: bool) {
        use violin_common::wire::gso::{Coalescer, Push};
        use violin_common::wire::virtio::{GsoType, VirtioNetRepr, F_NEEDS_CSUM};
        let a = UdpUnderlay::bind(Ipv4Addr::LOCALHOST, 0).unwrap();
        let b = UdpUnderlay::bind(Ipv4Addr::new(127, 0, 0, 3), a.port()).unwrap();
        let f = super_frame(20_000);
        let v = VirtioNetRepr {
            flags: F_NEEDS_CSUM,
            gso_type: GsoType::TcpV4,
            gso_size: 1400,
            csum_start: 34,
            csum_offset: 16,
            ..VirtioNetRepr::PLAIN
        };
        let g = Gso::from_virtio(&v, &f).unwrap().unwrap();
        let mut scratch = vec![0u8; 70_000];
        a.send_super(Ipv4Addr::new(127, 0, 0, 3), 42, &g, &f, &mut scratch, peer)
            .unwrap();
        // Every segment arrives as its own VXLAN datagram (in one or more GRO runs) and
        // is a whole TCP segment, checksummed or announced partial: they coalesce into
        // the super-frame.
        let mut out = vec![0u8; 14 + 65535];
        let mut c = Coalescer::default();
        let mut got = 0;
        let mut calls = 0;
        for _ in 0..200 {
            let n = b
                .recv(|r| match r {
                    Received::Frame(src, VxlanRepr { vni, rco }, inner) => {
                        assert_eq!((src, vni), (Ipv4Addr::LOCALHOST, 42));
                        if peer {
                            assert_eq!(rco, Rco::new(34, false));
                            let mut probe = Coalescer::default();
                            let mut tmp = vec![0u8; 14 + 65535];
                            assert_eq!(
                                probe.push(&mut tmp, inner),
                                Push::Alone,
                                "a partial checksum verified"
                            );
                            assert_eq!(c.push_partial(&mut out, inner), Push::Added);
                        } else {
                            assert_eq!(rco, None);
                            assert_eq!(c.push(&mut out, inner), Push::Added);
                        }
                        got += 1;
                    }
                    Received::Bad(v) => panic!("{v:?}"),
                })
                .unwrap();
            calls += usize::from(n > 0);
            if got == g.segments(f.len()) {
                break;
            }
            if n == 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        assert_eq!(got, 15);
        assert!(calls < got, "UDP GRO handed over one datagram per call");
        let (v2, n) = c.finish(&mut out).unwrap();
        assert_eq!((v2.gso_size, n), (1400, f.len()));
        // The super-frame back, but for the IP ID and the partial checksum.
        assert_eq!(&out[54..n], &f[54..]);
    }
}
