//! One UMEM and its rings, as every AF_XDP user here needs them: the fill ring kept
//! full with receive frames, a TX pool, batched transmission with the kicks copy mode
//! needs, and completions back into the pool. [`super::afxdp`] (the underlay) and
//! [`super::xdpport`] (fast guest ports) are built on it.
//!
//! On a multi-buffer UMEM (`XDP_USE_SG`: an underlay whose frames outgrow one AF_XDP
//! frame) a packet may span several frames, every descriptor but the last marked
//! `XDP_PKT_CONTD`: [`RxReader`] puts such a packet together in a buffer of its own
//! ([`Reassembly`]) and [`XskTx::send`] writes one across as many frames as it needs.
//!
//! Frame accounting: `fill` frames circulate fill ring → an RX ring → [`RxReader::rx`]
//! → fill ring; the others are the TX pool: pool → a sender's batch ([`XskTx::send`])
//! → its TX ring → completion ring → pool. Nothing else holds a frame, so the pool's
//! free count returns to `pool_frames` whenever the TX path is idle.
//!
//! The kernel takes receive frames for every socket on a queue from the queue's one
//! fill ring, and puts every socket's sent frames on the queue's one completion ring.
//! So the sockets' RX rings may be read by different threads (each Violin's by its own
//! worker), and different threads may send, each through a socket of its own (a
//! [`XskTx`]: one per worker on a queue, so that a worker beyond the NIC's queues still
//! transmits through AF_XDP): the fill ring is a [`FillRing`] and the TX pool with the
//! completion ring a [`TxPool`], each shared under a lock taken per batch (the fill
//! ring's once, the pool's twice: for the batch's frames, and at its flush), never per
//! frame.

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

/// The longest tunnelled frame a receiver on an underlay of MTU `mtu` takes as one
/// frame by its length alone: senders send a run of frames (`UDP_SEGMENT`) whole only
/// when it is longer. A longer frame (a jumbo one, up to the MTU) goes to AF_XDP only
/// on multi-buffer sockets, and only when its inner frame states exactly its length:
/// otherwise it is a run, which the classifier passes to the kernel's UDP socket.
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

/// A socket's configuration; `multi_buffer` binds it with `XDP_USE_SG` (further
/// sockets on the same UMEM and queue share the first one's binding whatever they ask).
pub fn socket_config(rx: u32, tx: u32, multi_buffer: bool) -> SocketConfig {
    let mut flags = BindFlags::XDP_COPY | BindFlags::XDP_USE_NEED_WAKEUP;
    if multi_buffer {
        flags |= BindFlags::XDP_USE_SG;
    }
    SocketConfig::builder()
        .rx_queue_size(QueueSize::new(rx).unwrap())
        .tx_queue_size(QueueSize::new(tx).unwrap())
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(flags)
        .build()
}

/// A descriptor's option on every buffer of a multi-buffer frame but its last.
const XDP_PKT_CONTD: u32 = 1;

/// The longest frame put together from several buffers: an IPv4 packet of 64 KiB and
/// its Ethernet header (the classifier sends nothing longer than the underlay's MTU).
pub const MULTI_BUFFER_MAX: usize = 65535 + 14;

/// A frame arriving in several AF_XDP buffers (multi-buffer: every buffer but the last
/// has `XDP_PKT_CONTD`), put together in a buffer of its own, allocated once.
pub struct Reassembly {
    buf: Vec<u8>,
    open: bool,
    /// The frame being put together outgrew [`MULTI_BUFFER_MAX`]: its rest is skipped.
    over: bool,
}

/// What one buffer made of the frame being put together.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// More buffers of it to come.
    More,
    Whole(&'a [u8]),
    /// Longer than [`MULTI_BUFFER_MAX`]: dropped.
    TooLong,
}

impl Reassembly {
    /// Room for the longest frame where frames may come in several buffers
    /// (`multi_buffer`), none where they never do.
    pub fn new(multi_buffer: bool) -> Reassembly {
        Reassembly {
            buf: Vec::with_capacity(if multi_buffer { MULTI_BUFFER_MAX } else { 0 }),
            open: false,
            over: false,
        }
    }

    /// True while a frame is part way in.
    #[inline]
    pub fn open(&self) -> bool {
        self.open
    }

    /// Takes the next buffer (`more`: its descriptor had `XDP_PKT_CONTD`).
    pub fn push(&mut self, chunk: &[u8], more: bool) -> Piece<'_> {
        if !self.open {
            self.buf.clear();
            self.open = true;
            self.over = false;
        }
        if self.buf.len() + chunk.len() > MULTI_BUFFER_MAX {
            self.over = true;
        } else if !self.over {
            self.buf.extend_from_slice(chunk);
        }
        if more {
            return Piece::More;
        }
        self.open = false;
        match self.over {
            true => Piece::TooLong,
            false => Piece::Whole(&self.buf),
        }
    }
}

/// Calls `put` on the pieces of `parts` (read as one run of bytes) that make up bytes
/// `range` of it: how a frame longer than one AF_XDP frame is written into several.
pub fn gather(parts: &[&[u8]], range: std::ops::Range<usize>, mut put: impl FnMut(&[u8])) {
    let mut at = 0;
    for p in parts {
        let (start, end) = (at, at + p.len());
        at = end;
        let (from, to) = (range.start.max(start), range.end.min(end));
        if from < to {
            put(&p[from - start..to - start]);
        }
        if end >= range.end {
            break;
        }
    }
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

    /// The queue's sockets are multi-buffer (`XDP_USE_SG`).
    pub fn multi_buffer(&self) -> bool {
        self.fill.multi_buffer
    }

    /// A socket of its own on the queue (RX ring of `rx_ring`, TX ring of `tx_ring`).
    pub fn share(&self, rx_ring: u32, tx_ring: u32) -> Result<(RxQueue, TxQueue)> {
        // SAFETY: the UMEM is shared and the (interface, queue) pair is bound already
        // (by the core's first socket): INHIBIT_PROG_LOAD is set, as xsk-rs requires.
        let (tx, rx, rings) = unsafe {
            Socket::new(
                socket_config(rx_ring, tx_ring, self.fill.multi_buffer),
                &self.fill.umem,
                &self.iface,
                self.queue,
            )
        }
        .map_err(|e| anyhow!("binding an AF_XDP socket on the shared UMEM: {e}"))?;
        drop(rings); // None: the first socket owns them.
        set_cloexec(rx.fd().as_raw_fd())?;
        super::busypoll::enable(rx.fd().as_raw_fd());
        Ok((rx, tx))
    }

    /// A sender of its own for another thread: a socket on the queue whose TX ring
    /// (`tx_ring`) it alone fills, from the UMEM's shared pool. The RX ring returned
    /// must live as long as the sender (it is the socket); nothing is redirected to it.
    pub fn sender(&self, tx_ring: u32) -> Result<(XskTx, RxQueue)> {
        let (rx, tx) = self.share(UNUSED_RING, tx_ring)?;
        Ok((
            XskTx::new(
                self.fill.umem.clone(),
                self.fill.pool.clone(),
                tx,
                self.fill.multi_buffer,
            ),
            rx,
        ))
    }
}

/// The size of a ring a socket must have but never uses: a sender's RX ring (no XSKMAP
/// entry points to it) and a Violin's socket's TX ring (its worker sends through its
/// own sender).
pub const UNUSED_RING: u32 = 64;

/// One queue's UMEM and fill ring, shared by the threads that read the queue's sockets.
#[derive(Clone)]
pub struct FillRing {
    umem: Umem,
    fq: Arc<Mutex<FillQueue>>,
    /// The UMEM's TX pool, for further senders ([`XskOpener::sender`]).
    pool: Arc<Mutex<TxPool>>,
    /// The queue's sockets are multi-buffer (`XDP_USE_SG`).
    multi_buffer: bool,
}

/// Reads RX rings of one UMEM's sockets and gives their frames back to its fill ring:
/// one per thread that reads (a batch of descriptors, and the frames not yet returned).
pub struct RxReader {
    fill: FillRing,
    scratch: Vec<FrameDesc>,
    refill: Vec<FrameDesc>,
    /// A multi-buffer frame part way in (a reader reads one socket).
    whole: Reassembly,
}

impl RxReader {
    pub fn new(fill: FillRing) -> RxReader {
        RxReader {
            whole: Reassembly::new(fill.multi_buffer),
            fill,
            scratch: vec![FrameDesc::default(); BATCH],
            refill: Vec::with_capacity(BATCH),
        }
    }

    /// Receives frames from `rxq` within `budget` (its bytes overrun by one frame at
    /// most), calling `f` on each, then returns them to the fill ring (one lock). True
    /// when the budget ran out. A frame in one buffer is read where it lies; one in
    /// several (multi-buffer) is put together first, and may span two calls.
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
                let chunk = unsafe { self.fill.umem.data(d) }.contents();
                let more = d.options() & XDP_PKT_CONTD != 0;
                if !more && !self.whole.open() {
                    budget.spend(chunk.len());
                    counters.rx_frames += 1;
                    f(chunk);
                    continue;
                }
                match self.whole.push(chunk, more) {
                    Piece::More => {}
                    Piece::Whole(frame) => {
                        budget.spend(frame.len());
                        counters.rx_frames += 1;
                        counters.rx_multi_buffer += 1;
                        f(frame);
                    }
                    Piece::TooLong => counters.rx_multi_buffer_dropped += 1,
                }
            }
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

/// A UMEM's free TX frames and its completion ring, shared by the sockets that send
/// from it. `held` counts the frames senders have taken for a batch and not yet given
/// to the kernel or back: the rest of the frames not free are the kernel's.
pub struct TxPool {
    free: Vec<FrameDesc>,
    cq: CompQueue,
    scratch: Vec<FrameDesc>,
    frames: usize,
    held: usize,
}

impl TxPool {
    /// Completed frames back into the free list.
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
}

/// The pool's figures at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolFigures {
    pub free: usize,
    pub frames: usize,
    /// Sent and not yet completed.
    pub in_flight: usize,
}

fn lock(pool: &Mutex<TxPool>) -> std::sync::MutexGuard<'_, TxPool> {
    // A sender that panicked left the pool consistent (every step is a whole move).
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// One thread's way of sending from a shared UMEM: its own AF_XDP socket's TX ring, and
/// the frames of the batch being built. Frames come from the [`TxPool`] a batch at a
/// time and what the batch did not use goes back at the flush, so an idle sender holds
/// none.
pub struct XskTx {
    umem: Umem,
    pool: Arc<Mutex<TxPool>>,
    tx: TxQueue,
    /// Taken from the pool for this batch, not yet written.
    local: Vec<FrameDesc>,
    /// Written, not yet on the TX ring.
    pending: Vec<FrameDesc>,
    /// Last seen free count of the pool (for `congested`, without a lock per frame).
    free_seen: usize,
    /// Frames may span several buffers (the socket is multi-buffer).
    multi_buffer: bool,
    /// Of `pending`, buffers that continue a frame (not counted as frames).
    pending_more: usize,
    pub counters: XskCounters,
}

impl XskTx {
    fn new(umem: Umem, pool: Arc<Mutex<TxPool>>, tx: TxQueue, multi_buffer: bool) -> XskTx {
        let free_seen = lock(&pool).free.len();
        XskTx {
            umem,
            pool,
            tx,
            local: Vec::with_capacity(BATCH),
            pending: Vec::with_capacity(BATCH + MULTI_BUFFER_MAX / FRAME_DATA as usize),
            free_seen,
            multi_buffer,
            pending_more: 0,
            counters: XskCounters::default(),
        }
    }

    /// The longest frame [`Self::send`] takes: one AF_XDP frame's data, or a whole
    /// IPv4 packet's worth across several when the socket is multi-buffer.
    pub fn longest(&self) -> usize {
        match self.multi_buffer {
            true => MULTI_BUFFER_MAX,
            false => FRAME_DATA as usize,
        }
    }

    /// Takes a batch's worth of free frames (one lock).
    fn take(&mut self) {
        let mut p = lock(&self.pool);
        if p.free.len() < BATCH {
            p.reclaim();
        }
        let n = BATCH.saturating_sub(self.pending.len()).min(p.free.len());
        let at = p.free.len() - n;
        self.local.extend(p.free.drain(at..));
        p.held += n;
        self.free_seen = p.free.len();
    }

    /// Copies `parts` into one frame and queues it; sent by [`Self::flush`] (or when a
    /// batch is full). Longer than one AF_XDP frame's data, it takes several buffers
    /// (multi-buffer sockets only; `XDP_PKT_CONTD` on all but the last). Longer than
    /// [`Self::longest`]: `Oversize`, nothing sent.
    pub fn send(&mut self, parts: &[&[u8]]) -> Result<(), Verdict> {
        let len = parts.iter().map(|p| p.len()).sum::<usize>();
        if len > self.longest() {
            return Err(Verdict::Oversize);
        }
        let buffers = len.div_ceil(FRAME_DATA as usize).max(1);
        if self.local.len() < buffers {
            if self.pending.len() + buffers > BATCH {
                self.flush();
            }
            self.take();
        }
        if self.local.len() < buffers {
            self.counters.pool_empty += 1;
            return Err(Verdict::QueueFull);
        }
        let at = self.local.len() - buffers;
        for (i, mut d) in self.local.drain(at..).enumerate() {
            let start = i * FRAME_DATA as usize;
            let end = len.min(start + FRAME_DATA as usize);
            {
                // SAFETY: `d` came from the pool: no ring owns it, and no other sender.
                let mut data = unsafe { self.umem.data_mut(&mut d) };
                let mut c = data.cursor();
                c.set_pos(0);
                // Cannot fail: at most FRAME_DATA bytes go into each frame.
                gather(parts, start..end, |p| {
                    let _ = c.write_all(p);
                });
            }
            d.set_options(if end < len { XDP_PKT_CONTD } else { 0 });
            self.pending.push(d);
        }
        self.pending_more += buffers - 1;
        if buffers > 1 {
            self.counters.tx_multi_buffer += 1;
        }
        if self.pending.len() >= BATCH {
            self.flush();
        }
        Ok(())
    }

    /// Hands queued frames to the kernel and kicks it; gives unused frames back and
    /// reclaims completions (one lock).
    pub fn flush(&mut self) {
        let mut produced = 0;
        if !self.pending.is_empty() {
            // SAFETY: pending frames are this sender's alone until the kernel completes them.
            let mut n = unsafe { self.tx.produce(&self.pending) };
            if n == 0 {
                // Ring full: let the kernel drain it (frames accounted for already),
                // then try once more.
                self.kick(self.pending.len().max(TX_KICK * 4));
                // SAFETY: as above.
                n = unsafe { self.tx.produce(&self.pending) };
            }
            if n == 0 {
                self.counters.tx_ring_full += 1;
                self.local.append(&mut self.pending);
            } else {
                self.counters.tx_frames += (n - self.pending_more) as u64;
                produced = n;
                self.pending.clear();
            }
            self.pending_more = 0;
        }
        {
            // Before the kick: once kicked, the frames may complete at once, and another
            // sender reclaiming them must not find them still counted as held.
            let mut p = lock(&self.pool);
            p.held -= produced + self.local.len();
            p.free.append(&mut self.local);
            p.reclaim();
            self.free_seen = p.free.len();
        }
        if produced > 0 {
            self.kick(produced);
        }
    }

    /// Copy mode transmits in sendto(), at most [`TX_KICK`] frames per call (the
    /// kernel's per-socket budget): kick often enough for `n` frames.
    fn kick(&mut self, n: usize) {
        for _ in 0..n.div_ceil(TX_KICK) {
            if self.tx.wakeup().is_err() {
                break;
            }
        }
    }

    /// True when the TX pool is nearly empty (as of this sender's last batch): stop
    /// producing until it drains.
    pub fn congested(&self) -> bool {
        self.free_seen + self.local.len() < 2 * BATCH
    }

    /// Queued by `send`, not yet handed to the TX ring.
    #[inline]
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The pool's figures, after reclaiming completions (one lock: control time).
    pub fn pool(&self) -> PoolFigures {
        let mut p = lock(&self.pool);
        p.reclaim();
        PoolFigures {
            free: p.free.len(),
            frames: p.frames,
            in_flight: {
                debug_assert!(
                    p.free.len() + p.held <= p.frames,
                    "a TX frame counted twice"
                );
                p.frames.saturating_sub(p.free.len() + p.held)
            },
        }
    }
}

/// Frames copy mode transmits per `sendto` (the kernel's `MAX_PER_SOCKET_BUDGET`).
const TX_KICK: usize = 32;

/// A UMEM with its fill ring and TX pool, and the first socket on (interface, queue),
/// which owns the rings: what one thread needs to receive and send (a fast port), and
/// what further sockets on the same queue share ([`XskOpener`]).
pub struct XskCore {
    iface: Interface,
    queue: u32,
    reader: RxReader,
    tx: XskTx,
    /// What this core's reader received (its TX figures are the sender's).
    rx_counters: XskCounters,
}

impl XskCore {
    /// A UMEM of `frames` frames and the first socket on (`iface`, `queue`), which owns
    /// the fill and completion rings; `fill` frames go to the fill ring, the rest are
    /// the TX pool.
    pub fn open(
        iface: &str,
        queue: u32,
        frames: u32,
        fill: usize,
        rx_ring: u32,
        tx_ring: u32,
        multi_buffer: bool,
    ) -> Result<(XskCore, RxQueue)> {
        let pool_frames = (frames as usize)
            .checked_sub(fill)
            .context("more fill frames than frames")?;
        let cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME_SIZE).unwrap())
            .fill_queue_size(QueueSize::new(fill.next_power_of_two() as u32).unwrap())
            // Room for every pool frame: however many sockets send, a completion never
            // waits for space.
            .comp_queue_size(QueueSize::new(pool_frames.max(1).next_power_of_two() as u32).unwrap())
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
        let (tx, rx, rings) = unsafe {
            Socket::new(
                socket_config(rx_ring, tx_ring, multi_buffer),
                &umem,
                &ifname,
                queue,
            )
        }
        .map_err(|e| anyhow!("binding an AF_XDP socket to {iface} queue {queue}: {e}"))?;
        set_cloexec(rx.fd().as_raw_fd())?;
        super::busypoll::enable(rx.fd().as_raw_fd());
        let (mut fq, cq) = rings.context("the first socket got no fill/completion rings")?;
        let to_fill: Vec<FrameDesc> = descs.drain(..fill).collect();
        // SAFETY: these frames belong to this UMEM and are in no other ring.
        let n = unsafe { fq.produce(&to_fill) };
        ensure!(n == fill, "the fill ring took {n} of {fill} frames");
        let pool = Arc::new(Mutex::new(TxPool {
            frames: descs.len(),
            free: descs,
            cq,
            scratch: vec![FrameDesc::default(); BATCH],
            held: 0,
        }));
        let core = XskCore {
            iface: ifname,
            queue,
            tx: XskTx::new(umem.clone(), pool.clone(), tx, multi_buffer),
            reader: RxReader::new(FillRing {
                umem,
                fq: Arc::new(Mutex::new(fq)),
                pool,
                multi_buffer,
            }),
            rx_counters: XskCounters::default(),
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
        self.reader.rx(rxq, budget, &mut self.rx_counters, f)
    }

    /// The longest packet its sender takes ([`XskTx::longest`]).
    pub fn tx_longest(&self) -> usize {
        self.tx.longest()
    }

    /// Splits the core into its sender and the rest (the UMEM and rings stay alive as
    /// long as either does).
    pub fn into_tx(self) -> XskTx {
        self.tx
    }

    pub fn send(&mut self, parts: &[&[u8]]) -> Result<(), Verdict> {
        self.tx.send(parts)
    }

    pub fn flush(&mut self) {
        self.tx.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 9000-byte frame as the kernel hands it over in 1792-byte buffers comes out
    /// whole and in order; a frame in one buffer after it is not mixed in.
    #[test]
    fn buffers_of_a_multi_buffer_frame_come_out_as_the_frame() {
        let frame: Vec<u8> = (0..9000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut r = Reassembly::new(true);
        let chunks: Vec<&[u8]> = frame.chunks(FRAME_DATA as usize).collect();
        assert_eq!(chunks.len(), 6);
        for (i, c) in chunks.iter().enumerate() {
            let more = i + 1 < chunks.len();
            match r.push(c, more) {
                Piece::More => assert!(more && r.open()),
                Piece::Whole(w) => assert!(!more && w == &frame[..]),
                Piece::TooLong => panic!("9000 bytes is not too long"),
            }
        }
        assert!(!r.open());
        assert_eq!(r.push(b"next", false), Piece::Whole(&b"next"[..]));
    }

    /// A chain longer than any IPv4 packet is dropped whole, and the next frame is
    /// read right.
    #[test]
    fn a_chain_longer_than_an_ip_packet_is_dropped() {
        let mut r = Reassembly::new(true);
        let chunk = [0xabu8; FRAME_DATA as usize];
        let n = MULTI_BUFFER_MAX / chunk.len() + 2;
        for _ in 1..n {
            assert_eq!(r.push(&chunk, true), Piece::More);
        }
        assert_eq!(r.push(&chunk, false), Piece::TooLong);
        assert_eq!(r.push(&[1, 2], true), Piece::More);
        assert_eq!(r.push(&[3], false), Piece::Whole(&[1, 2, 3][..]));
    }

    /// `gather` yields exactly the bytes of a range across the parts (a header and a
    /// frame, as `AfXdp::send` passes them), for every buffer a frame is split into.
    #[test]
    fn gather_cuts_parts_into_buffers() {
        let hdr: Vec<u8> = (0..50).collect();
        let body: Vec<u8> = (0..4000u32).map(|i| (i % 253) as u8).collect();
        let whole = [&hdr[..], &body[..]].concat();
        let fd = FRAME_DATA as usize;
        let mut again = Vec::new();
        for start in (0..whole.len()).step_by(fd) {
            let end = whole.len().min(start + fd);
            let mut got = Vec::new();
            gather(&[&hdr, &body], start..end, |p| got.extend_from_slice(p));
            assert_eq!(got, &whole[start..end], "{start}..{end}");
            again.extend(got);
        }
        assert_eq!(again, whole);
        let mut got = Vec::new();
        gather(&[&hdr, &body], 10..60, |p| got.extend_from_slice(p));
        assert_eq!(got, &whole[10..60], "across the parts' border");
        gather(&[&hdr, &[][..], &body], 0..0, |_| panic!("nothing to give"));
    }
}
