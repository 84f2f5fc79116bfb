//! Transports: they move bytes between the outside world and the switch, nothing more.
//!
//! - [`guest`]: a guest's UNIX socket (QEMU `-netdev stream` or `-netdev dgram` framing);
//! - [`udp`]: the underlay, VXLAN over a plain UDP socket;
//! - [`afxdp`]: the underlay through per-Violin AF_XDP sockets (kernel bypass);
//! - [`underlay`]: whichever of the two the daemon runs;
//! - [`xdpport`]: a fast guest port, a veth driven by AF_XDP;
//! - [`tap`]: a lightweight guest's tap, driven by the daemon, super-frames both ways;
//! - [`xsk`]: the UMEM and ring mechanics both AF_XDP users share;
//! - [`busypoll`]: preferred busy polling of the data path's sockets' NAPI instances.

pub mod afxdp;
pub mod busypoll;
pub mod guest;
pub mod tap;
pub mod udp;
pub mod underlay;
pub mod xdpport;
pub mod xsk;

/// Largest frame a guest socket reads; bigger stream records cannot be resynchronised
/// and close the connection.
pub const MAX_RECORD: usize = 65535;

use guest::{GuestPort, PortCounters};
use std::os::fd::RawFd;
use tap::TapPort;
use violin_common::wire::gso::Gso;
use violin_common::Verdict;
use xdpport::XdpPort;

/// A guest's port, whichever kind: the daemon moves frames through it the same way.
pub enum Port {
    Sock(Box<GuestPort>),
    Xdp(Box<XdpPort>),
    Tap(Box<TapPort>),
}

/// How much one visit to a socket may read: at most `frames` frames and about `bytes`
/// bytes (the frame that crosses the byte limit is still taken whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub frames: usize,
    pub bytes: u64,
}

impl Budget {
    pub fn new(frames: usize, bytes: u64) -> Budget {
        Budget { frames, bytes }
    }
    /// Another frame may be read.
    #[inline]
    pub fn left(&self) -> bool {
        self.frames > 0 && self.bytes > 0
    }
    /// Counts a frame of `len` bytes read.
    #[inline]
    pub fn spend(&mut self, len: usize) {
        self.frames = self.frames.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(len as u64);
    }

    /// How many frames of at most `longest` bytes to take from a ring in one go, at
    /// most `most`: no more than the byte budget could hold at that length, so a
    /// batch never crosses the byte limit by more than one frame (a guest with a few
    /// tokens left is not read 64 frames deep). At least 1 while any budget is left.
    #[inline]
    pub fn batch(&self, longest: usize, most: usize) -> usize {
        let by_bytes = self.bytes.div_ceil(longest.max(1) as u64);
        most.min(self.frames)
            .min(by_bytes.min(usize::MAX as u64) as usize)
    }
}

/// Hands each segment of super-frame `frame` to `send`, built in `buf` (software
/// segmentation, for a transport that takes one frame at a time). Stops at the first
/// refusal.
pub fn each_segment(
    g: &Gso,
    frame: &[u8],
    buf: &mut [u8],
    mut send: impl FnMut(&[u8]) -> Result<(), Verdict>,
) -> Result<(), Verdict> {
    for i in 0..g.segments(frame.len()) {
        let n = g.write_segment(frame, i, buf);
        send(&buf[..n])?;
    }
    Ok(())
}

impl Port {
    #[inline]
    pub fn send(&mut self, frame: &[u8]) -> Result<(), Verdict> {
        match self {
            Port::Sock(p) => p.send(frame),
            Port::Xdp(p) => p.send(frame),
            Port::Tap(p) => p.send(frame),
        }
    }

    /// Sends a super-frame: whole to a port that takes them, else segment by segment
    /// (built in `buf`).
    pub fn send_super(&mut self, g: &Gso, frame: &[u8], buf: &mut [u8]) -> Result<(), Verdict> {
        match self {
            Port::Tap(p) => p.send_super(g, frame),
            other => each_segment(g, frame, buf, |s| other.send(s)),
        }
    }

    /// Writes what is queued (stream output, AF_XDP TX batch, a coalesced super-frame).
    pub fn flush(&mut self) -> Result<(), Verdict> {
        match self {
            Port::Sock(p) => {
                let _ = p.flush();
                Ok(())
            }
            Port::Xdp(p) => {
                p.flush();
                Ok(())
            }
            Port::Tap(p) => p.flush(),
        }
    }

    /// The end of a worker's round (`busy`: it has more to read): AF_XDP TX batches
    /// go now; a tap's pending super-frame may wait a round or two to grow.
    pub fn end_round(&mut self, busy: bool) -> Result<(), Verdict> {
        match self {
            Port::Tap(p) => p.end_round(busy),
            other => other.flush(),
        }
    }

    /// True when output waits for the end of the batch ([`Port::flush`]).
    pub fn batches(&self) -> bool {
        matches!(self, Port::Xdp(_) | Port::Tap(_))
    }

    /// True when the guest is attached: a socket port's guest is connected, a fast
    /// port's or tap's interface still exists (system calls for the last two: for
    /// status, not the packet path).
    pub fn connected(&self) -> bool {
        match self {
            Port::Sock(p) => p.connected(),
            Port::Xdp(p) => p.alive(),
            Port::Tap(p) => p.alive(),
        }
    }

    pub fn counters(&self) -> PortCounters {
        match self {
            Port::Sock(p) => p.counters,
            Port::Xdp(p) => p.counters,
            Port::Tap(p) => p.counters,
        }
    }

    /// The fd polled for new connections or frames.
    pub fn socket_fd(&self) -> RawFd {
        match self {
            Port::Sock(p) => p.socket_fd(),
            Port::Xdp(p) => p.fd(),
            Port::Tap(p) => p.fd(),
        }
    }

    /// A stream port's current connection.
    pub fn conn_fd(&self) -> Option<RawFd> {
        match self {
            Port::Sock(p) => p.conn_fd(),
            Port::Xdp(_) | Port::Tap(_) => None,
        }
    }

    /// Where the guest attaches: a socket path, `xdp:<host veth>` or `tap:<netns>`.
    pub fn describe(&self) -> String {
        match self {
            Port::Sock(p) => p.path().display().to_string(),
            Port::Xdp(p) => format!("xdp:{}", p.iface()),
            Port::Tap(p) => format!("tap:{}", p.netns()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Budget;

    /// Reads frames of `len` bytes the way a ring reader does, a batch at a time, and
    /// returns the bytes taken.
    fn drain(mut b: Budget, len: usize, longest: usize) -> u64 {
        let mut taken = 0;
        while b.left() {
            for _ in 0..b.batch(longest, 64) {
                b.spend(len);
                taken += len as u64;
            }
        }
        taken
    }

    #[test]
    fn a_batch_stays_within_the_byte_budget_but_for_one_frame() {
        // One token left: one frame, not 64.
        assert_eq!(Budget::new(64, 1).batch(1792, 64), 1);
        assert_eq!(Budget::new(64, 0).batch(1792, 64), 0);
        assert_eq!(Budget::new(3, u64::MAX).batch(1792, 64), 3);
        assert_eq!(Budget::new(usize::MAX, u64::MAX).batch(1792, 64), 64);
        // A DRR quantum of 66 KiB holds 38 frames of the longest kind.
        assert_eq!(Budget::new(64, 66 * 1024).batch(1792, 64), 38);
        for bytes in [1, 100, 1441, 1442, 6072, 12_500, 66 * 1024, 200_000] {
            for len in [60, 1442, 1792] {
                let taken = drain(Budget::new(usize::MAX, bytes), len, 1792);
                assert!(
                    taken >= bytes && taken < bytes + len as u64,
                    "{bytes} bytes of budget, frames of {len}: took {taken}"
                );
            }
        }
        // The frame budget still binds.
        assert_eq!(drain(Budget::new(10, u64::MAX), 60, 1792), 600);
    }
}
