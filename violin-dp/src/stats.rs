//! The counters packet workers publish and the control protocol carries: plain
//! serde types with no dependency on the data path's transports (no aya, no xsk-rs),
//! so the CLI and the control plane can use them without the fast path.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Counters of one Violin on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolinStats {
    pub name: String,
    pub vni: u32,
    /// Sent traffic per (from, to), counted where the sender is policed; zero edges omitted.
    pub edges: Vec<EdgeStats>,
    /// Drops by reason (`Verdict::name`), zero reasons omitted.
    pub drops: BTreeMap<String, u64>,
    /// MACs learned behind external members.
    pub learned_macs: usize,
    /// Frames of capped links marked CE instead of dropped (ECN).
    #[serde(default)]
    pub ecn_marked: u64,
    /// Frames waiting in capped links' queues, and their bytes (at the snapshot).
    #[serde(default)]
    pub queued_frames: u64,
    #[serde(default)]
    pub queued_bytes: u64,
    /// Packets sent while the pair table had no room for a new pair (counted in no
    /// edge; the worker makes room between batches, so this stays 0 but under a burst
    /// of new pairs).
    #[serde(default)]
    pub unrecorded_packets: u64,
    /// Nanoseconds its packet worker spent reading and switching this Violin's frames
    /// (what moves a loud Violin's neighbours to another worker).
    #[serde(default)]
    pub busy_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeStats {
    pub from: String,
    pub to: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Kernel counters of one Violin's socket (`XDP_STATISTICS`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStats {
    pub rx_dropped: u64,
    pub rx_ring_full: u64,
    pub rx_fill_ring_empty: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// Preferred busy polling is on for the socket (`SO_PREFER_BUSY_POLL`).
    #[serde(default)]
    pub busy_poll: bool,
    /// The NAPI instance its worker busy-polls (0: the device names none, as generic
    /// XDP and a veth do: nothing to poll, frames come by the softirq alone).
    #[serde(default)]
    pub napi_id: u32,
}

/// A snapshot for `violin stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfXdpStats {
    pub counters: XskCounters,
    /// Received frames that were not valid VXLAN after all.
    pub rx_bad: u64,
    /// Encapsulated frames sent through the kernel instead: no neighbour entry yet.
    pub neighbour_miss: u64,
    pub free_frames: usize,
    pub pool_frames: usize,
    /// Sent but not yet completed.
    pub completion_backlog: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct XskCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// The TX ring had no room for a batch even after a kick (frames dropped).
    pub tx_ring_full: u64,
    /// No free frame in the TX pool (frame dropped).
    pub pool_empty: u64,
    /// The fill ring refused a refill batch (kept and retried).
    pub fill_retry: u64,
    /// Of `rx_frames`, those that came in several buffers (multi-buffer: jumbo frames).
    #[serde(default)]
    pub rx_multi_buffer: u64,
    /// Multi-buffer frames longer than any IPv4 packet (dropped).
    #[serde(default)]
    pub rx_multi_buffer_dropped: u64,
    /// Of `tx_frames`, those sent in several buffers.
    #[serde(default)]
    pub tx_multi_buffer: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Connections accepted (stream) or peers seen (dgram).
    pub connects: u64,
}

/// One packet worker's own figures: what it received on its rx queue, and the frames
/// it handed to other workers (their Violins' home) or took over from them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// The worker's index: the rx queue and the underlay socket it serves.
    pub index: usize,
    /// Violins whose home it is, and their guest ports.
    pub violins: usize,
    pub ports: usize,
    pub udp_rx_frames: u64,
    pub xsk_rx_frames: u64,
    /// Frames it sent through AF_XDP (its own TX ring: the queue's anchor, or a sender
    /// of its own where it is beyond the NIC's queues).
    #[serde(default)]
    pub xsk_tx_frames: u64,
    /// VXLAN datagrams it sent through its UDP socket.
    #[serde(default)]
    pub udp_tx_frames: u64,
    /// Of `udp_rx_frames`, those read from its Violins' own sockets of the underlay's
    /// group (steering by Violin).
    #[serde(default)]
    pub udp_rx_own_frames: u64,
    pub handed_off: u64,
    pub taken_over: u64,
}

impl AfXdpStats {
    /// Two queues' figures together.
    pub fn plus(&self, o: &AfXdpStats) -> AfXdpStats {
        let (a, b) = (&self.counters, &o.counters);
        AfXdpStats {
            counters: XskCounters {
                rx_frames: a.rx_frames + b.rx_frames,
                tx_frames: a.tx_frames + b.tx_frames,
                tx_ring_full: a.tx_ring_full + b.tx_ring_full,
                pool_empty: a.pool_empty + b.pool_empty,
                fill_retry: a.fill_retry + b.fill_retry,
                rx_multi_buffer: a.rx_multi_buffer + b.rx_multi_buffer,
                rx_multi_buffer_dropped: a.rx_multi_buffer_dropped + b.rx_multi_buffer_dropped,
                tx_multi_buffer: a.tx_multi_buffer + b.tx_multi_buffer,
            },
            rx_bad: self.rx_bad + o.rx_bad,
            neighbour_miss: self.neighbour_miss + o.neighbour_miss,
            free_frames: self.free_frames + o.free_frames,
            pool_frames: self.pool_frames + o.pool_frames,
            completion_backlog: self.completion_backlog + o.completion_backlog,
        }
    }
}

impl SlotStats {
    /// A Violin's sockets on two queues together.
    pub fn plus(&self, o: &SlotStats) -> SlotStats {
        SlotStats {
            rx_dropped: self.rx_dropped + o.rx_dropped,
            rx_ring_full: self.rx_ring_full + o.rx_ring_full,
            rx_fill_ring_empty: self.rx_fill_ring_empty + o.rx_fill_ring_empty,
            rx_invalid_descs: self.rx_invalid_descs + o.rx_invalid_descs,
            tx_invalid_descs: self.tx_invalid_descs + o.tx_invalid_descs,
            busy_poll: self.busy_poll && o.busy_poll,
            napi_id: if self.napi_id != 0 {
                self.napi_id
            } else {
                o.napi_id
            },
        }
    }
}
