//! The kernel-bypass underlay of one rx queue: per-Violin AF_XDP sockets ([`Slot`])
//! sharing one UMEM on one queue of the underlay interface, fed by the XDP classifier.
//! A host serves as many queues as it has packet workers (or fewer, where it has fewer
//! queues), each queue's worker with an [`AfXdp`] of its own.
//!
//! The UMEM's fill frames exceed the sum of the Violins' small RX rings twice over
//! ([`QueueSizes`]), so a Violin that floods, or is not served, holds at most its own
//! ring's worth and the others keep receiving. The first socket on the queue is a
//! permanent anchor: it creates the fill ring (shared by every socket on the queue, and
//! by the workers reading them: [`super::xsk::FillRing`]) and the completion ring with
//! the TX pool (shared by the queue's senders: [`super::xsk::TxPool`]), and transmits
//! everything its worker sends. A worker beyond the NIC's queues sends through a socket
//! of its own on a queue's UMEM ([`AfXdp::sender`]), so every worker's frames bypass the
//! kernel's stack alike. Violins' sockets come and go, each read by its Violin's own
//! worker, whichever queue it is on. (Frames the classifier redirected to the anchor
//! itself were never seen on its RX ring here, so receiving is always on a socket of its
//! own, even with one socket for all Violins.) Outer headers are written here
//! ([`encap::write_outer`]), with destination MACs from the kernel's neighbour table.
//! Copy mode (veth has no zero-copy), need_wakeup on; multi-buffer (`XDP_USE_SG`) where
//! the underlay's frames outgrow one AF_XDP frame (MTU 9000), so jumbo frames cross
//! AF_XDP both ways.

use super::xsk::{PoolFigures, RxReader, XskCore, XskOpener, XskTx, UNUSED_RING};
use super::Budget;
use crate::datapath::fastpath::encap::{self, Outer};
use crate::datapath::FastMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use violin_common::wire::{EthernetAddress, VxlanRepr};
use violin_common::{Verdict, VXLAN_OVERHEAD};
use xsk_rs::{RxQueue, TxQueue};

pub use crate::stats::XskCounters;

pub const TX_RING: u32 = 2048;
/// Most Violins on one host with the xdp data plane: their RX rings must fit in half
/// the fill frames ([`QueueSizes`]).
pub const MAX_SLOTS: usize = 16;

/// One queue's UMEM and its Violins' RX rings, by whether its sockets are multi-buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSizes {
    /// AF_XDP frames in the UMEM (2 KiB each): the fill frames, the rest for TX.
    pub frames: u32,
    /// Frames given to the fill ring, shared by the queue's sockets.
    pub fill: usize,
    /// Descriptors in each Violin's RX ring.
    pub rx_ring: u32,
}

impl QueueSizes {
    /// A frame per descriptor: 256 frames in a Violin's ring, a 32 MiB UMEM.
    pub const SINGLE: QueueSizes = QueueSizes {
        frames: 16384,
        fill: 8192,
        rx_ring: 256,
    };
    /// A jumbo frame takes up to six descriptors (9014 bytes in 1792-byte frames), so
    /// a ring of 256 held 42 of them and overflowed under one TCP stream (its losses
    /// were the stream's retransmits). A ring four times as deep holds 170, and the fill
    /// frames grow with it, so [`MAX_SLOTS`] rings still take half of them: an 80 MiB
    /// UMEM, only where the underlay's MTU is over 1778.
    pub const MULTI: QueueSizes = QueueSizes {
        frames: 40960,
        fill: 32768,
        rx_ring: 1024,
    };

    pub const fn of(multi_buffer: bool) -> QueueSizes {
        if multi_buffer {
            Self::MULTI
        } else {
            Self::SINGLE
        }
    }

    /// Every Violin's ring fits in half the fill frames, and the TX pool (the frames
    /// left over) holds at least one TX ring's worth.
    const fn isolates(self) -> bool {
        self.fill >= 2 * MAX_SLOTS * self.rx_ring as usize
            && self.frames as usize >= self.fill + TX_RING as usize
    }
}

const _: () = assert!(QueueSizes::SINGLE.isolates() && QueueSizes::MULTI.isolates());

/// The slot of the one socket every Violin shares when per-Violin sockets are off or
/// refused (one socket per queue).
pub const SHARED_SLOT: usize = MAX_SLOTS;

pub use crate::stats::{AfXdpStats, SlotStats};

pub fn slot_stats(rx: &RxQueue) -> Option<SlotStats> {
    let st = rx.fd().xdp_statistics().ok()?;
    Some(SlotStats {
        rx_dropped: st.rx_dropped(),
        rx_ring_full: st.rx_ring_full(),
        rx_fill_ring_empty: st.rx_fill_ring_empty_descs(),
        rx_invalid_descs: st.rx_invalid_descs(),
        tx_invalid_descs: st.tx_invalid_descs(),
        busy_poll: super::busypoll::is_on(rx.fd().as_raw_fd()),
        napi_id: super::busypoll::napi_id(rx.fd().as_raw_fd()),
    })
}

/// One Violin's socket on a queue's shared UMEM, opened by a [`SlotOpener`] (on the
/// control thread) and read by its Violin's worker, which gives the frames back to the
/// queue's fill ring.
pub struct Slot {
    rx: RxQueue,
    _tx: TxQueue,
    reader: RxReader,
    /// The underlay's VXLAN port (outer headers are checked against it).
    port: u16,
}

impl Slot {
    /// The socket's fd (for the XskMap and poll).
    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// The kernel's counters of this socket.
    pub fn stats(&self) -> Option<SlotStats> {
        slot_stats(&self.rx)
    }

    /// Receives frames within `budget`, calling `f(outer source, VXLAN header, inner)`
    /// for each valid one (the others count in `rx_bad`). True when the budget ran out.
    pub fn rx(
        &mut self,
        budget: &mut Budget,
        counters: &mut XskCounters,
        rx_bad: &mut u64,
        mut f: impl FnMut(Ipv4Addr, VxlanRepr, &[u8]),
    ) -> bool {
        let port = self.port;
        self.reader.rx(
            &mut self.rx,
            budget,
            counters,
            |pkt| match encap::parse_outer(pkt, port) {
                Ok((src, vx, inner)) => f(src, vx, inner),
                Err(_) => *rx_bad += 1,
            },
        )
    }

    /// Gives back every frame waiting in its RX ring (before it is closed).
    pub fn drain(&mut self, counters: &mut XskCounters) {
        let mut bad = 0;
        self.rx(
            &mut Budget::new(usize::MAX, u64::MAX),
            counters,
            &mut bad,
            |_, _, _| {},
        );
    }
}

impl AsRawFd for Slot {
    fn as_raw_fd(&self) -> RawFd {
        self.fd()
    }
}

/// Opens Violins' sockets on an [`AfXdp`]'s UMEM, away from its worker.
#[derive(Clone)]
pub struct SlotOpener {
    opener: XskOpener,
    port: u16,
}

impl SlotOpener {
    pub fn open(&self) -> anyhow::Result<Slot> {
        let rx_ring = QueueSizes::of(self.opener.multi_buffer()).rx_ring;
        let (rx, tx) = self.opener.share(rx_ring, UNUSED_RING)?;
        Ok(Slot {
            rx,
            _tx: tx,
            reader: RxReader::new(self.opener.fill()),
            port: self.port,
        })
    }
}

/// Why a frame could not go out through AF_XDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No neighbour entry for the destination: send it through the kernel instead.
    NoNeighbour,
    /// Longer than AF_XDP carries here (a jumbo frame without multi-buffer sockets):
    /// send it through the kernel.
    TooLong,
    Dropped(Verdict),
}

/// One worker's AF_XDP side of the underlay on one queue: a socket whose TX ring it
/// alone fills, from the queue's shared UMEM. The queue's own worker sends through the
/// anchor, a worker beyond the NIC's queues through a socket of its own on the same
/// queue ([`AfXdp::sender`]).
pub struct AfXdp {
    tx: XskTx,
    /// The sending socket (nothing is redirected to its RX ring).
    _rx: RxQueue,
    opener: XskOpener,
    /// Reports the queue's TX pool (the anchor's worker does; the pool is counted once).
    reports_pool: bool,
    outer: Outer,
    /// The longest packet sent through AF_XDP: the underlay's MTU + 14 with
    /// multi-buffer sockets, one AF_XDP frame's data without.
    longest: usize,
    neighbours: FastMap<Ipv4Addr, EthernetAddress>,
    neighbour_miss: u64,
}

impl AfXdp {
    /// Creates the UMEM and the anchor socket on `iface` rx queue `queue`, and fills
    /// the fill ring. With `multi_buffer` the queue's sockets are bound `XDP_USE_SG`
    /// and carry packets up to `largest` bytes (the underlay's MTU + 14) across
    /// several AF_XDP frames; without, one frame's data.
    pub fn new(
        iface: &str,
        queue: u32,
        outer: Outer,
        multi_buffer: bool,
        largest: usize,
    ) -> anyhow::Result<AfXdp> {
        let sizes = QueueSizes::of(multi_buffer);
        let (core, anchor) = XskCore::open(
            iface,
            queue,
            sizes.frames,
            sizes.fill,
            sizes.rx_ring,
            TX_RING,
            multi_buffer,
        )?;
        let tx = core.tx_longest();
        Ok(AfXdp {
            opener: core.opener(),
            tx: core.into_tx(),
            _rx: anchor,
            reports_pool: true,
            outer,
            longest: largest.min(tx),
            neighbours: FastMap::default(),
            neighbour_miss: 0,
        })
    }

    /// Another worker's sender on the same queue and UMEM: its own socket and TX ring,
    /// frames from the shared pool. Opened at startup, on the control thread.
    pub fn sender(&self) -> anyhow::Result<AfXdp> {
        let (tx, rx) = self.opener.sender(TX_RING)?;
        Ok(AfXdp {
            tx,
            _rx: rx,
            opener: self.opener.clone(),
            reports_pool: false,
            outer: self.outer,
            longest: self.longest,
            neighbours: FastMap::default(),
            neighbour_miss: 0,
        })
    }

    pub fn opener(&self) -> SlotOpener {
        SlotOpener {
            opener: self.opener.clone(),
            port: self.outer.port,
        }
    }

    /// Updates the neighbour table used for outer destination MACs.
    pub fn set_neighbours(&mut self, n: impl IntoIterator<Item = (Ipv4Addr, EthernetAddress)>) {
        self.neighbours.clear();
        self.neighbours.extend(n);
    }

    /// Encapsulates `frame` for `dst` and queues it for transmission ([`Self::flush`]).
    pub fn send(&mut self, dst: Ipv4Addr, vni: u32, frame: &[u8]) -> Result<(), SendError> {
        if VXLAN_OVERHEAD + frame.len() > self.longest {
            return Err(SendError::TooLong);
        }
        let Some(&mac) = self.neighbours.get(&dst) else {
            self.neighbour_miss += 1;
            return Err(SendError::NoNeighbour);
        };
        let mut hdr = [0u8; VXLAN_OVERHEAD];
        encap::write_outer(&mut hdr, &self.outer, mac, dst, vni, frame);
        self.tx.send(&[&hdr, frame]).map_err(|v| match v {
            Verdict::QueueFull => SendError::Dropped(Verdict::TunnelTxError),
            v => SendError::Dropped(v),
        })
    }

    pub fn flush(&mut self) {
        self.tx.flush()
    }

    /// Sends what waits in the TX batch now, if anything does (no system call
    /// otherwise): before a frame that takes the kernel's socket instead.
    #[inline]
    pub fn flush_pending(&mut self) {
        if self.tx.pending() > 0 {
            self.tx.flush()
        }
    }

    /// True when the TX path is backed up: the daemon then stops reading guests (their
    /// sockets fill and push back) instead of dropping frames here.
    pub fn congested(&self) -> bool {
        self.tx.congested()
    }

    /// This sender's figures (what its worker sent; what it received is the worker's),
    /// and, from the anchor's worker, the queue's TX pool.
    pub fn stats(&self) -> AfXdpStats {
        let pool = if self.reports_pool {
            self.tx.pool()
        } else {
            PoolFigures::default()
        };
        AfXdpStats {
            counters: self.tx.counters,
            rx_bad: 0,
            neighbour_miss: self.neighbour_miss,
            free_frames: pool.free,
            pool_frames: pool.frames,
            completion_backlog: pool.in_flight,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::transport::xsk::FRAME_DATA;

    /// Frames of an underlay's MTU (plus the Ethernet header) a Violin's ring holds.
    fn frames_in_ring(multi_buffer: bool, mtu: usize) -> usize {
        let descriptors = (mtu + 14).div_ceil(FRAME_DATA as usize);
        QueueSizes::of(multi_buffer).rx_ring as usize / descriptors
    }

    /// A multi-buffer queue's rings hold at least half as many jumbo frames as a
    /// single-buffer queue's hold frames of 1500 bytes, not a sixth.
    #[test]
    fn a_violins_ring_holds_about_as_many_jumbo_frames_as_small_ones() {
        let small = frames_in_ring(false, 1500);
        assert_eq!(small, 256);
        let jumbo = frames_in_ring(true, 9000);
        assert!(jumbo * 2 >= small, "{jumbo} jumbo frames against {small}");
        // Both UMEMs isolate MAX_SLOTS Violins (also checked at compile time), with
        // the same TX pool.
        for s in [QueueSizes::SINGLE, QueueSizes::MULTI] {
            assert!(s.isolates(), "{s:?}");
            assert_eq!(s.frames as usize - s.fill, 8192, "{s:?}");
        }
    }
}
