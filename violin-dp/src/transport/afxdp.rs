//! The kernel-bypass underlay: per-Violin AF_XDP sockets sharing one UMEM on the
//! underlay interface's queue 0, fed by the XDP classifier.
//!
//! Frame accounting (one UMEM of [`FRAMES`] frames): [`FILL_FRAMES`] circulate through
//! the fill ring → a Violin's RX ring → [`AfXdp::rx`] → back to the fill ring; the rest
//! form the TX pool: pool → [`AfXdp::send`] (outer headers written, inner frame copied)
//! → TX ring → completion ring → pool. The fill frames exceed the sum of the Violins'
//! small RX rings ([`RX_RING`]), so a Violin that floods, or is not served, holds at
//! most its own ring's worth and the others keep receiving.
//!
//! The first socket on the queue is a permanent anchor: it owns the fill and
//! completion rings (shared by every socket on the queue) and transmits everything.
//! Violins' sockets come and go. Copy mode (veth has no zero-copy), need_wakeup on.

use crate::fastpath::encap::{self, Outer};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use violin_common::wire::EthernetAddress;
use violin_common::{Verdict, VXLAN_OVERHEAD};
use xsk_rs::config::{BindFlags, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

pub const FRAME_SIZE: u32 = 2048;
pub const FRAMES: u32 = 16384;
pub const FILL_FRAMES: usize = 8192;
pub const RX_RING: u32 = 256;
pub const TX_RING: u32 = 2048;
/// Most Violins on one host with the xdp data plane: their RX rings must fit in the
/// fill frames with room to spare.
pub const MAX_SLOTS: usize = FILL_FRAMES / RX_RING as usize / 2;
const BATCH: usize = 64;

/// Ring and pool counters (user-space side; per-socket kernel counters come from
/// `XDP_STATISTICS`, see [`SlotStats`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfXdpCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Received frames that were not valid VXLAN after all.
    pub rx_bad: u64,
    /// TX ring had no room for a batch (frames dropped).
    pub tx_ring_full: u64,
    /// No free frame in the TX pool (frame dropped).
    pub pool_empty: u64,
    /// Fill ring refused a refill batch (kept and retried).
    pub fill_retry: u64,
    /// Encapsulated frames sent through the kernel instead: no neighbour entry yet.
    pub neighbour_miss: u64,
}

/// Kernel counters of one Violin's socket.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStats {
    pub rx_dropped: u64,
    pub rx_ring_full: u64,
    pub rx_fill_ring_empty: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
}

/// A snapshot for `violin stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AfXdpStats {
    pub counters: AfXdpCounters,
    pub free_frames: usize,
    pub pool_frames: usize,
    /// Sent but not yet completed.
    pub completion_backlog: usize,
}

struct Slot {
    rx: RxQueue,
    _tx: TxQueue,
}

/// Why a frame could not go out through AF_XDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No neighbour entry for the destination: send it through the kernel instead.
    NoNeighbour,
    Dropped(Verdict),
}

pub struct AfXdp {
    umem: Umem,
    fq: FillQueue,
    cq: CompQueue,
    tx: TxQueue,
    _anchor_rx: RxQueue,
    slots: Vec<Option<Slot>>,
    free: Vec<FrameDesc>,
    refill: Vec<FrameDesc>,
    scratch: Vec<FrameDesc>,
    tx_pending: Vec<FrameDesc>,
    outer: Outer,
    neighbours: HashMap<Ipv4Addr, EthernetAddress>,
    iface: xsk_rs::config::Interface,
    pub counters: AfXdpCounters,
}

/// libxdp opens AF_XDP sockets without `SOCK_CLOEXEC`: without this, every process the
/// daemon starts (guest relays) would inherit them and keep them bound after a crash.
fn set_cloexec(fd: RawFd) -> anyhow::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: `fd` is a live socket owned by this process for the duration of the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

fn socket_config(rx: u32, tx: u32) -> SocketConfig {
    SocketConfig::builder()
        .rx_queue_size(QueueSize::new(rx).unwrap())
        .tx_queue_size(QueueSize::new(tx).unwrap())
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP)
        .build()
}

impl AfXdp {
    /// Creates the UMEM and the anchor socket on `iface` queue 0, and fills the fill ring.
    pub fn new(iface: &str, outer: Outer) -> anyhow::Result<AfXdp> {
        use anyhow::Context;
        let cfg = UmemConfig::builder()
            .frame_size(xsk_rs::config::FrameSize::new(FRAME_SIZE).unwrap())
            .fill_queue_size(QueueSize::new(FILL_FRAMES as u32).unwrap())
            .comp_queue_size(QueueSize::new(TX_RING).unwrap())
            .build()
            .context("UMEM configuration")?;
        let (umem, mut descs) = Umem::new(cfg, FRAMES.try_into().unwrap(), false)
            .map_err(|e| anyhow::anyhow!("creating the UMEM: {e}"))?;
        let ifname: xsk_rs::config::Interface = iface
            .parse()
            .map_err(|e| anyhow::anyhow!("interface {iface}: {e:?}"))?;
        // SAFETY: the first socket on this (UMEM, interface, queue); INHIBIT_PROG_LOAD is
        // set because our own program redirects.
        let (tx, rx, rings) = unsafe { Socket::new(socket_config(64, TX_RING), &umem, &ifname, 0) }
            .map_err(|e| anyhow::anyhow!("binding an AF_XDP socket to {iface} queue 0: {e}"))?;
        set_cloexec(rx.fd().as_raw_fd())?;
        let (mut fq, cq) = rings.context("the anchor socket got no fill/completion rings")?;
        let fill: Vec<FrameDesc> = descs.drain(..FILL_FRAMES).collect();
        // SAFETY: these frames belong to this UMEM and are in no other ring.
        let n = unsafe { fq.produce(&fill) };
        anyhow::ensure!(
            n == FILL_FRAMES,
            "the fill ring took {n} of {FILL_FRAMES} frames"
        );
        Ok(AfXdp {
            umem,
            fq,
            cq,
            tx,
            _anchor_rx: rx,
            slots: Vec::new(),
            free: descs,
            refill: Vec::with_capacity(FILL_FRAMES),
            scratch: vec![FrameDesc::default(); BATCH.max(TX_RING as usize)],
            tx_pending: Vec::with_capacity(BATCH),
            outer,
            neighbours: HashMap::new(),
            iface: ifname,
            counters: AfXdpCounters::default(),
        })
    }

    /// Opens the socket of Violin slot `slot`; returns its fd (for the XskMap and poll).
    pub fn add_slot(&mut self, slot: usize) -> anyhow::Result<RawFd> {
        anyhow::ensure!(
            slot < MAX_SLOTS,
            "at most {MAX_SLOTS} Violins per host on the xdp data plane"
        );
        // SAFETY: the UMEM is shared and the (interface, queue) pair is bound already:
        // INHIBIT_PROG_LOAD is set, as xsk-rs requires.
        let (tx, rx, rings) =
            unsafe { Socket::new(socket_config(RX_RING, 64), &self.umem, &self.iface, 0) }
                .map_err(|e| {
                    anyhow::anyhow!("binding a Violin's AF_XDP socket (shared UMEM): {e}")
                })?;
        drop(rings); // None: the anchor owns them.
        let fd = rx.fd().as_raw_fd();
        set_cloexec(fd)?;
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        self.slots[slot] = Some(Slot { rx, _tx: tx });
        Ok(fd)
    }

    /// Closes a slot's socket after taking back the frames in its RX ring. Remove it
    /// from the XskMap first.
    pub fn remove_slot(&mut self, slot: usize) {
        self.rx(slot, usize::MAX, |_, _, _| {});
        if let Some(s) = self.slots.get_mut(slot) {
            *s = None;
        }
    }

    pub fn slot_fd(&self, slot: usize) -> Option<RawFd> {
        Some(self.slots.get(slot)?.as_ref()?.rx.fd().as_raw_fd())
    }

    pub fn slot_stats(&self, slot: usize) -> Option<SlotStats> {
        let s = self.slots.get(slot)?.as_ref()?;
        let st = s.rx.fd().xdp_statistics().ok()?;
        Some(SlotStats {
            rx_dropped: st.rx_dropped(),
            rx_ring_full: st.rx_ring_full(),
            rx_fill_ring_empty: st.rx_fill_ring_empty_descs(),
            rx_invalid_descs: st.rx_invalid_descs(),
            tx_invalid_descs: st.tx_invalid_descs(),
        })
    }

    /// Receives up to `budget` frames from a slot, calling `f(outer source, VNI, inner)`
    /// for each valid one, then returns the frames to the fill ring. True when the
    /// budget ran out.
    pub fn rx(
        &mut self,
        slot: usize,
        budget: usize,
        mut f: impl FnMut(Ipv4Addr, u32, &[u8]),
    ) -> bool {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return false;
        };
        let mut done = 0;
        let port = self.outer.port;
        loop {
            let want = BATCH.min(budget - done);
            // SAFETY: the descriptors are written by the kernel for frames of this UMEM.
            let n = unsafe { s.rx.consume(&mut self.scratch[..want]) };
            for d in &self.scratch[..n] {
                // SAFETY: the frame was just consumed from the RX ring: no ring owns it.
                let data = unsafe { self.umem.data(d) };
                match encap::parse_outer(data.contents(), port) {
                    Ok((src, vni, inner)) => {
                        self.counters.rx_frames += 1;
                        f(src, vni, inner)
                    }
                    Err(_) => self.counters.rx_bad += 1,
                }
            }
            self.refill.extend_from_slice(&self.scratch[..n]);
            done += n;
            if n < want || done >= budget {
                break;
            }
        }
        self.refill_ring();
        done >= budget
    }

    fn refill_ring(&mut self) {
        if self.refill.is_empty() {
            return;
        }
        // SAFETY: these frames came off an RX ring and are in no ring now.
        let n = unsafe { self.fq.produce(&self.refill) };
        if n == self.refill.len() {
            self.refill.clear();
        } else {
            self.counters.fill_retry += 1;
        }
    }

    /// Takes completed TX frames back into the pool.
    fn reclaim(&mut self) {
        loop {
            // SAFETY: completions are frames of this UMEM the kernel is done with.
            let n = unsafe { self.cq.consume(&mut self.scratch[..BATCH]) };
            self.free.extend_from_slice(&self.scratch[..n]);
            if n < BATCH {
                break;
            }
        }
    }

    /// Updates the neighbour table used for outer destination MACs.
    pub fn set_neighbours(&mut self, n: impl IntoIterator<Item = (Ipv4Addr, EthernetAddress)>) {
        self.neighbours.clear();
        self.neighbours.extend(n);
    }

    /// Encapsulates `frame` for `dst` and queues it for transmission ([`Self::flush`]).
    pub fn send(&mut self, dst: Ipv4Addr, vni: u32, frame: &[u8]) -> Result<(), SendError> {
        let Some(&mac) = self.neighbours.get(&dst) else {
            self.counters.neighbour_miss += 1;
            return Err(SendError::NoNeighbour);
        };
        if VXLAN_OVERHEAD + frame.len() > FRAME_SIZE as usize {
            return Err(SendError::Dropped(Verdict::Oversize));
        }
        if self.free.is_empty() {
            self.reclaim();
        }
        let Some(mut d) = self.free.pop() else {
            self.counters.pool_empty += 1;
            return Err(SendError::Dropped(Verdict::TunnelTxError));
        };
        let mut hdr = [0u8; VXLAN_OVERHEAD];
        encap::write_outer(&mut hdr, &self.outer, mac, dst, vni, frame);
        {
            // SAFETY: `d` came from the pool: no ring owns it.
            let mut data = unsafe { self.umem.data_mut(&mut d) };
            let mut c = data.cursor();
            c.set_pos(0);
            // Cannot fail: the frame holds FRAME_SIZE bytes, checked above.
            let _ = c.write_all(&hdr);
            let _ = c.write_all(frame);
        }
        self.tx_pending.push(d);
        if self.tx_pending.len() >= BATCH {
            self.flush();
        }
        Ok(())
    }

    /// Hands queued frames to the kernel and kicks it; reclaims completions.
    pub fn flush(&mut self) {
        if !self.tx_pending.is_empty() {
            // SAFETY: pending frames are ours alone until the kernel completes them.
            let mut n = unsafe { self.tx.produce(&self.tx_pending) };
            if n == 0 {
                // Ring full: let the kernel drain what it has, then try once more.
                self.kick(TX_RING as usize);
                // SAFETY: as above.
                n = unsafe { self.tx.produce(&self.tx_pending) };
            }
            if n == 0 {
                self.counters.tx_ring_full += 1;
                self.free.extend_from_slice(&self.tx_pending);
            } else {
                self.counters.tx_frames += n as u64;
                self.kick(n);
            }
            self.tx_pending.clear();
        }
        self.reclaim();
    }

    /// Copy mode transmits in sendto(), at most 32 frames per call (the kernel's
    /// per-socket budget): kick often enough for `n` frames.
    fn kick(&mut self, n: usize) {
        for _ in 0..n.div_ceil(32) {
            if self.tx.wakeup().is_err() {
                break;
            }
        }
    }

    /// True when the TX path is backed up: the daemon then stops reading guests (their
    /// sockets fill and push back) instead of dropping frames here.
    pub fn congested(&self) -> bool {
        self.free.len() < BATCH * 2
    }

    pub fn stats(&self) -> AfXdpStats {
        let pool = FRAMES as usize - FILL_FRAMES;
        AfXdpStats {
            counters: self.counters,
            free_frames: self.free.len(),
            pool_frames: pool,
            completion_backlog: pool - self.free.len() - self.tx_pending.len(),
        }
    }
}
