//! A lightweight guest's tap, driven by the daemon itself (`port = "tap"`): no relay
//! process and no socket hop, and super-frames both ways.
//!
//! The tap has `IFF_VNET_HDR` and the offloads a virtio NIC offers (`TUNSETOFFLOAD`:
//! checksum, TSO4/6, USO4/6 where the kernel has them), so the guest's TCP hands over
//! frames of up to 64 KiB with a virtio-net header, and takes them back: frames switched
//! to this port are coalesced (TCP/IPv4, and UDP/IPv4 where the tap took USO:
//! [`Coalescer`]) until the end of the batch and written as one super-frame. A frame
//! whose checksum the guest left partial is completed on reading, unless it stays a
//! super-frame. Opening the tap in the guest's
//! namespace is control work ([`crate::host::guest::open_tap_port`]); this is the part
//! the packet worker drives.

use super::guest::{PortCounters, RxEvent};
use super::Budget;
use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use violin_common::wire::gso::{complete_checksum, Coalescer, Gso, Push};
use violin_common::wire::virtio::{self, VirtioNetRepr};
use violin_common::Verdict;

const VNET: usize = virtio::HEADER_LEN;
/// The largest frame a tap hands over: Ethernet header and a 64 KiB IP packet.
pub const MAX_SUPER: usize = 14 + 65535;

pub struct TapPort {
    file: File,
    netns: String,
    pub counters: PortCounters,
    coalescer: Coalescer,
    /// The super-frame being coalesced, after room for its virtio header.
    pending: Box<[u8]>,
    /// Rounds of a busy worker the pending super-frame has waited to grow.
    pending_rounds: u8,
}

/// Rounds a pending super-frame may wait for more segments while the worker is busy
/// (GRO holds segments across a NAPI poll the same way). Written at the end of every
/// round, a bulk flow took 1.4 × as many tap writes per byte, and its TCP ran at a
/// median 4.4 instead of 5.1 Gbit/s (udp plane, A/B runs on this machine).
const HOLD_ROUNDS: u8 = 2;

impl TapPort {
    /// Wraps a tap opened with `IFF_VNET_HDR` (non-blocking) in namespace `netns`;
    /// `uso`: it took USO, so UDP datagrams coalesce too.
    pub fn new(file: File, netns: &str, uso: bool) -> TapPort {
        TapPort {
            file,
            netns: netns.to_string(),
            counters: PortCounters {
                connects: 1,
                ..Default::default()
            },
            coalescer: Coalescer::new(uso),
            pending: vec![0u8; VNET + MAX_SUPER].into_boxed_slice(),
            pending_rounds: 0,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// True while the tap still has its interface: once the guest deletes `eth0`,
    /// `TUNGETIFF` fails with `EBADFD`. One system call: for status, not the packet path.
    pub fn alive(&self) -> bool {
        const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
        let mut ifreq = [0u8; 40];
        // SAFETY: TUNGETIFF writes at most a `struct ifreq` (40 bytes) into the buffer,
        // which lives for the duration of the call.
        unsafe { libc::ioctl(self.fd(), TUNGETIFF as _, ifreq.as_mut_ptr()) == 0 }
    }

    /// Reads within `budget` into `buf` (at least `VNET + MAX_SUPER` bytes) and
    /// hands each frame on: plain frames with their checksum complete, super-frames whole.
    /// True when the budget ran out.
    pub fn receive(
        &mut self,
        buf: &mut [u8],
        budget: &mut Budget,
        mut f: impl FnMut(RxEvent<'_>),
    ) -> io::Result<bool> {
        while budget.left() {
            let n = match (&self.file).read(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            budget.spend(n.saturating_sub(VNET));
            let (hdr, frame) = buf[..n].split_at_mut(VNET.min(n));
            let ev = match VirtioNetRepr::parse(hdr) {
                Err(e) => RxEvent::Drop(e.into()),
                Ok(v) => match Gso::from_virtio(&v, frame) {
                    Err(e) => RxEvent::Drop(e.into()),
                    Ok(Some(g)) => RxEvent::Super(frame, g),
                    Ok(None) => {
                        let start = usize::from(v.csum_start);
                        let done = !v.needs_csum()
                            || complete_checksum(frame, start, usize::from(v.csum_offset)).is_ok();
                        if done {
                            RxEvent::Frame(frame)
                        } else {
                            RxEvent::Drop(Verdict::Truncated)
                        }
                    }
                },
            };
            if let RxEvent::Frame(fr) | RxEvent::Super(fr, _) = &ev {
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += fr.len() as u64;
            }
            f(ev);
        }
        Ok(true)
    }

    /// Takes a plain frame for the guest: it joins the pending super-frame, or is
    /// written now.
    pub fn send(&mut self, frame: &[u8]) -> Result<(), Verdict> {
        self.offer(frame, None)
    }

    /// `frame` (`partial`: its L4 checksum is partial, as `partial` lays it out) joins
    /// the pending super-frame, or is written now.
    fn offer(&mut self, frame: &[u8], partial: Option<&Gso>) -> Result<(), Verdict> {
        loop {
            let buf = &mut self.pending[VNET..];
            let pushed = match partial {
                None => self.coalescer.push(buf, frame),
                Some(_) => self.coalescer.push_partial(buf, frame),
            };
            match pushed {
                Push::Added => return Ok(()),
                Push::Flush => self.flush_pending()?,
                Push::Alone => {
                    self.flush_pending()?;
                    let v = match partial {
                        None => VirtioNetRepr::PLAIN,
                        Some(g) => g.to_virtio_one(),
                    };
                    return self.write(&v, frame);
                }
            }
        }
    }

    /// Takes a super-frame for the guest, written as it is (after what is pending); a
    /// one-segment one (a partial checksum: remote checksum offload) may coalesce.
    pub fn send_super(&mut self, g: &Gso, frame: &[u8]) -> Result<(), Verdict> {
        if g.is_one(frame.len()) {
            return self.offer(frame, Some(g));
        }
        self.flush_pending()?;
        self.write(&g.to_virtio(), frame)
    }

    /// Writes the pending super-frame (the end of a batch).
    pub fn flush(&mut self) -> Result<(), Verdict> {
        self.flush_pending()
    }

    /// The end of a worker's round: the pending super-frame is written, unless the
    /// worker is `busy` (more frames may join it) and it has waited less than
    /// [`HOLD_ROUNDS`] rounds.
    pub fn end_round(&mut self, busy: bool) -> Result<(), Verdict> {
        if self.coalescer.is_empty() {
            return Ok(());
        }
        if busy && self.pending_rounds < HOLD_ROUNDS {
            self.pending_rounds += 1;
            return Ok(());
        }
        self.flush_pending()
    }

    fn flush_pending(&mut self) -> Result<(), Verdict> {
        self.pending_rounds = 0;
        let Some((v, n)) = self.coalescer.finish(&mut self.pending[VNET..]) else {
            return Ok(());
        };
        v.emit(&mut self.pending[..VNET]);
        let (hdr, frame) = self.pending[..VNET + n].split_at(VNET);
        write_counted(&self.file, &mut self.counters, hdr, frame)
    }

    fn write(&mut self, v: &VirtioNetRepr, frame: &[u8]) -> Result<(), Verdict> {
        let mut hdr = [0u8; VNET];
        v.emit(&mut hdr);
        write_counted(&self.file, &mut self.counters, &hdr, frame)
    }
}

/// Writes a virtio header and its frame; a tap takes them whole or not at all. Counts
/// what was written.
fn write_counted(
    file: &File,
    c: &mut PortCounters,
    hdr: &[u8],
    frame: &[u8],
) -> Result<(), Verdict> {
    match (&*file).write_vectored(&[IoSlice::new(hdr), IoSlice::new(frame)]) {
        Ok(n) if n == hdr.len() + frame.len() => {
            c.tx_frames += 1;
            c.tx_bytes += frame.len() as u64;
            Ok(())
        }
        _ => Err(Verdict::QueueFull),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use violin_common::wire::checksum;
    use violin_common::wire::virtio::{GsoType, F_NEEDS_CSUM};
    use violin_common::wire::{
        EtherType, EthernetAddress, EthernetFrame, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr,
    };

    /// Three TCP/IPv4 segments of 1000 bytes of one flow, in order, as the kernel's
    /// segmentation of one super-frame makes them.
    fn segments() -> Vec<Vec<u8>> {
        let payload = vec![7u8; 3000];
        let mut f = vec![0u8; 54 + payload.len()];
        EthernetRepr {
            src_addr: EthernetAddress([0x02, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress([0x02, 0, 0, 0, 0, 2]),
            ethertype: EtherType::IPV4,
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
        Ipv4Repr {
            src_addr: std::net::Ipv4Addr::new(10, 0, 0, 1),
            dst_addr: std::net::Ipv4Addr::new(10, 0, 0, 2),
            protocol: IpProtocol::TCP,
            payload_len: 20 + payload.len(),
            hop_limit: 64,
        }
        .emit(&mut Ipv4Packet::new_unchecked(&mut f[14..]));
        f[34..36].copy_from_slice(&40000u16.to_be_bytes());
        f[36..38].copy_from_slice(&5201u16.to_be_bytes());
        f[46] = 5 << 4;
        f[47] = 0x10; // ACK
        f[48..50].copy_from_slice(&502u16.to_be_bytes());
        f[54..].copy_from_slice(&payload);
        let pseudo = checksum::pseudo_header(
            std::net::Ipv4Addr::new(10, 0, 0, 1),
            std::net::Ipv4Addr::new(10, 0, 0, 2),
            6,
            (20 + payload.len()) as u16,
        );
        f[50..52].copy_from_slice(&pseudo.to_be_bytes());
        let v = VirtioNetRepr {
            flags: F_NEEDS_CSUM,
            gso_type: GsoType::TcpV4,
            ecn: false,
            hdr_len: 54,
            gso_size: 1000,
            csum_start: 34,
            csum_offset: 16,
        };
        let g = Gso::from_virtio(&v, &f).unwrap().unwrap();
        (0..3)
            .map(|i| {
                let mut out = vec![0u8; 2000];
                let n = g.write_segment(&f, i, &mut out);
                out.truncate(n);
                out
            })
            .collect()
    }

    /// A tap port writing into a pipe, and the pipe's read end (non-blocking).
    fn port() -> (TapPort, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2(2) writes two new fds into `fds`.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
            0
        );
        // SAFETY: both fds were just created and are owned by nothing else.
        let (r, w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        (TapPort::new(w, "test", false), r)
    }

    /// What the port wrote: one record (virtio header and frame) per read.
    fn written(r: &mut File) -> Vec<usize> {
        let mut lens = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = r.read(&mut buf) {
            lens.push(n - VNET);
        }
        lens
    }

    #[test]
    fn a_busy_worker_lets_a_super_frame_grow_for_two_rounds_at_most() {
        let (mut p, mut r) = port();
        let s = segments();
        p.send(&s[0]).unwrap();
        p.end_round(true).unwrap();
        p.send(&s[1]).unwrap();
        p.end_round(true).unwrap();
        assert!(written(&mut r).is_empty(), "held while the worker is busy");
        p.end_round(true).unwrap();
        assert_eq!(written(&mut r), vec![54 + 2000], "two segments, one write");
        // An idle worker writes at once.
        p.send(&s[2]).unwrap();
        p.end_round(false).unwrap();
        assert_eq!(written(&mut r), vec![54 + 1000]);
        assert_eq!(p.counters.tx_frames, 2);
    }
}
