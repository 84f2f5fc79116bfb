//! One UMEM and its rings, as every AF_XDP user here needs them: the fill ring kept
//! full with receive frames, a TX pool, batched transmission with the kicks copy mode
//! needs, and completions back into the pool. [`super::afxdp`] (the underlay) and
//! [`super::xdpport`] (fast guest ports) are built on it.
//!
//! Frame accounting: `fill` frames circulate fill ring → an RX ring → [`RxReader::rx`]
//! → fill ring; the others are the TX pool: pool → [`XskCore::send`] → TX ring →
//! completion ring → pool. Nothing else holds a frame, so the pool's free count returns
//! to `pool_frames` whenever the TX path is idle.
//!
//! The kernel takes receive frames for every socket on a queue from the queue's one
//! fill ring, so the sockets' RX rings may be read by different threads (each Violin's
//! by its own worker): the fill ring is a [`FillRing`], which each reader returns its
//! frames to under a lock, once per batch. The TX pool and the completion ring are the
//! core's owner's alone.

use super::Budget;
use anyhow::{anyhow, ensure, Context, Result};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use violin_common::Verdict;
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

pub const FRAME_SIZE: u32 = 2048;
/// What a frame holds after the kernel's XDP headroom: the longest packet one AF_XDP
/// descriptor carries, received or sent (checked against the UMEM's layout in
/// [`XskCore::open`]).
pub const FRAME_DATA: u32 = violin_common::XSK_FRAME_DATA as u32;

/// The longest frame the xdp plane carries as one frame on an underlay of MTU `mtu`:
/// longer, it is a super-frame (longer than the MTU) or a jumbo one (longer than an
/// AF_XDP frame's data), and goes through the kernel's UDP socket. The classifier
/// passes such frames to the kernel, and senders send a super-frame whole only when it
/// is longer.
pub fn largest_single_frame(mtu: u32) -> u32 {
    (mtu + 14).min(FRAME_DATA)
}
const BATCH: usize = 64;

pub use crate::stats::XskCounters;

/// libxdp opens AF_XDP sockets without `SOCK_CLOEXEC`: without this, every process the
/// daemon starts (guest relays) would inherit them and keep them bound after a crash.
pub fn set_cloexec(fd: RawFd) -> Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: `fd` is a live socket owned by this process for the duration of the call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

pub fn socket_config(rx: u32, tx: u32) -> SocketConfig {
    SocketConfig::builder()
        .rx_queue_size(QueueSize::new(rx).unwrap())
        .tx_queue_size(QueueSize::new(tx).unwrap())
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP)
        .build()
}

/// Opens further sockets on a core's UMEM and (interface, queue), sharing its fill
/// and completion rings. Binding and closing an AF_XDP socket wait for the kernel (an
/// RCU grace period, milliseconds), so the control thread does both, never a packet
/// worker.
#[derive(Clone)]
pub struct XskOpener {
    fill: FillRing,
    iface: Interface,
    queue: u32,
}

impl XskOpener {
    /// The fill ring every socket it opens takes its receive frames from.
    pub fn fill(&self) -> FillRing {
        self.fill.clone()
    }

    pub fn share(&self, rx_ring: u32) -> Result<(RxQueue, TxQueue)> {
        // SAFETY: the UMEM is shared and the (interface, queue) pair is bound already
        // (by the core's first socket): INHIBIT_PROG_LOAD is set, as xsk-rs requires.
        let (tx, rx, rings) = unsafe {
            Socket::new(
                socket_config(rx_ring, 64),
                &self.fill.umem,
                &self.iface,
                self.queue,
            )
        }
        .map_err(|e| anyhow!("binding an AF_XDP socket on the shared UMEM: {e}"))?;
        drop(rings); // None: the first socket owns them.
        set_cloexec(rx.fd().as_raw_fd())?;
        Ok((rx, tx))
    }
}

/// One queue's UMEM and fill ring, shared by the threads that read the queue's sockets.
#[derive(Clone)]
pub struct FillRing {
    umem: Umem,
    fq: Arc<Mutex<FillQueue>>,
}

/// Reads RX rings of one UMEM's sockets and gives their frames back to its fill ring:
/// one per thread that reads (a batch of descriptors, and the frames not yet returned).
pub struct RxReader {
    fill: FillRing,
    scratch: Vec<FrameDesc>,
    refill: Vec<FrameDesc>,
}

impl RxReader {
    pub fn new(fill: FillRing) -> RxReader {
        RxReader {
            fill,
            scratch: vec![FrameDesc::default(); BATCH],
            refill: Vec::with_capacity(BATCH),
        }
    }

    /// Receives frames from `rxq` within `budget` (its bytes overrun by one frame at
    /// most), calling `f` on each, then returns them to the fill ring (one lock). True
    /// when the budget ran out.
    pub fn rx(
        &mut self,
        rxq: &mut RxQueue,
        budget: &mut Budget,
        counters: &mut XskCounters,
        mut f: impl FnMut(&[u8]),
    ) -> bool {
        while budget.left() {
            let want = budget.batch(FRAME_DATA as usize, BATCH);
            // SAFETY: the descriptors are written by the kernel for frames of this UMEM.
            let n = unsafe { rxq.consume(&mut self.scratch[..want]) };
            for d in &self.scratch[..n] {
                // SAFETY: the frame was just consumed from the RX ring: no ring owns it.
                let frame = unsafe { self.fill.umem.data(d) }.contents();
                budget.spend(frame.len());
                f(frame);
            }
            counters.rx_frames += n as u64;
            self.refill.extend_from_slice(&self.scratch[..n]);
            if n < want {
                break;
            }
        }
        if !self.refill.is_empty() {
            let mut fq = self.fill.fq.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: these frames came off an RX ring of this UMEM and are in no ring now.
            let n = unsafe { fq.produce(&self.refill) };
            drop(fq);
            if n == self.refill.len() {
                self.refill.clear();
            } else {
                counters.fill_retry += 1;
            }
        }
        !budget.left()
    }
}

pub struct XskCore {
    iface: Interface,
    queue: u32,
    reader: RxReader,
    cq: CompQueue,
    tx: TxQueue,
    free: Vec<FrameDesc>,
    scratch: Vec<FrameDesc>,
    tx_pending: Vec<FrameDesc>,
    pool_frames: usize,
    pub counters: XskCounters,
}

impl XskCore {
    /// A UMEM of `frames` frames and the first socket on (`iface`, `queue`), which owns
    /// the fill and completion rings; `fill` frames go to the fill ring.
    pub fn open(
        iface: &str,
        queue: u32,
        frames: u32,
        fill: usize,
        rx_ring: u32,
        tx_ring: u32,
    ) -> Result<(XskCore, RxQueue)> {
        let cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME_SIZE).unwrap())
            .fill_queue_size(QueueSize::new(fill.next_power_of_two() as u32).unwrap())
            .comp_queue_size(QueueSize::new(tx_ring).unwrap())
            .build()
            .context("UMEM configuration")?;
        ensure!(
            cfg.mtu() == FRAME_DATA,
            "AF_XDP frames hold {} bytes of packet, not the {FRAME_DATA} assumed",
            cfg.mtu()
        );
        let (umem, mut descs) = Umem::new(cfg, frames.try_into().context("frames")?, false)
            .map_err(|e| anyhow!("creating a UMEM of {frames} frames: {e}"))?;
        let ifname: Interface = iface
            .parse()
            .map_err(|e| anyhow!("interface {iface}: {e:?}"))?;
        // SAFETY: the first socket on this (UMEM, interface, queue); INHIBIT_PROG_LOAD is
        // set because our own program redirects.
        let (tx, rx, rings) =
            unsafe { Socket::new(socket_config(rx_ring, tx_ring), &umem, &ifname, queue) }
                .map_err(|e| anyhow!("binding an AF_XDP socket to {iface} queue {queue}: {e}"))?;
        set_cloexec(rx.fd().as_raw_fd())?;
        let (mut fq, cq) = rings.context("the first socket got no fill/completion rings")?;
        let to_fill: Vec<FrameDesc> = descs.drain(..fill).collect();
        // SAFETY: these frames belong to this UMEM and are in no other ring.
        let n = unsafe { fq.produce(&to_fill) };
        ensure!(n == fill, "the fill ring took {n} of {fill} frames");
        let core = XskCore {
            iface: ifname,
            queue,
            reader: RxReader::new(FillRing {
                umem,
                fq: Arc::new(Mutex::new(fq)),
            }),
            cq,
            tx,
            pool_frames: descs.len(),
            free: descs,
            scratch: vec![FrameDesc::default(); BATCH],
            tx_pending: Vec::with_capacity(BATCH),
            counters: XskCounters::default(),
        };
        Ok((core, rx))
    }

    /// What opens further sockets on this UMEM, from another thread.
    pub fn opener(&self) -> XskOpener {
        XskOpener {
            fill: self.reader.fill.clone(),
            iface: self.iface.clone(),
            queue: self.queue,
        }
    }

    /// Receives frames from `rxq` (a socket of this core's queue) within `budget`,
    /// calling `f` on each ([`RxReader::rx`]).
    pub fn rx(&mut self, rxq: &mut RxQueue, budget: &mut Budget, f: impl FnMut(&[u8])) -> bool {
        self.reader.rx(rxq, budget, &mut self.counters, f)
    }

    /// Copies `parts` into one frame and queues it; sent by [`Self::flush`] (or when a
    /// batch is full). Longer than [`FRAME_DATA`]: `Oversize`, nothing sent.
    pub fn send(&mut self, parts: &[&[u8]]) -> Result<(), Verdict> {
        if parts.iter().map(|p| p.len()).sum::<usize>() > FRAME_DATA as usize {
            return Err(Verdict::Oversize);
        }
        if self.free.is_empty() {
            self.reclaim();
        }
        let Some(mut d) = self.free.pop() else {
            self.counters.pool_empty += 1;
            return Err(Verdict::QueueFull);
        };
        {
            // SAFETY: `d` came from the pool: no ring owns it.
            let mut data = unsafe { self.reader.fill.umem.data_mut(&mut d) };
            let mut c = data.cursor();
            c.set_pos(0);
            for p in parts {
                // Cannot fail: the frame holds FRAME_DATA bytes, checked above.
                let _ = c.write_all(p);
            }
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
                // Ring full: let the kernel drain it, then try once more.
                self.kick(self.pool_frames);
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

    /// True when the TX pool is nearly empty: stop producing until it drains.
    pub fn congested(&self) -> bool {
        self.free.len() < 2 * BATCH
    }

    pub fn free_frames(&self) -> usize {
        self.free.len()
    }
    pub fn pool_frames(&self) -> usize {
        self.pool_frames
    }
    /// Queued by `send`, not yet handed to the TX ring.
    #[inline]
    pub fn pending(&self) -> usize {
        self.tx_pending.len()
    }
    /// Sent but not yet completed.
    pub fn backlog(&self) -> usize {
        self.pool_frames - self.free.len() - self.tx_pending.len()
    }
}
