//! A packet worker: a thread that owns the switch of its Violins, their guest ports
//! and AF_XDP sockets, one underlay socket (and on the xdp plane an AF_XDP TX ring of
//! its own), and does nothing but move frames.
//!
//! A host runs several workers ([`Workers`]). Each Violin has a home worker (the
//! least loaded when it arrived: [`Workers::place`]; a Violin beside a loud one later
//! moves whole to another: [`Command::Export`], [`Command::Import`],
//! [`crate::control::balance`]), which owns everything of it that
//! changes per packet: its switch table, buckets, counters, guest ports and AF_XDP
//! sockets (one per rx queue, all read by the home worker: the queue's fill ring is
//! the only thing shared, once per batch) and its own socket of the underlay's UDP
//! group — so no lock is taken per packet. The kernel steers the underlay's UDP
//! datagrams by VNI to the Violin's own socket ([`crate::xdp::steer`]), or where that
//! is not available to the home worker's socket, which its Violins share. A
//! frame that still reaches another worker (on the socket every Violin shares where
//! sockets are not per Violin, or where steering failed) is copied to the home worker
//! through a bounded queue ([`Handoff`]) and switched there. A worker beyond the
//! host's rx queues sends through an AF_XDP socket of its own on a queue's UMEM.
//!
//! Each wake-up: apply the control commands that arrived (between batches, never in
//! the middle of one); note which sockets are ready; release what capped links queued
//! and is now due, and resume guests whose cap has refilled; then one round of fair
//! service ([`Drr`]: byte-based deficit round robin across Violins, then across a
//! Violin's sockets), passing every frame through [`Fabric::switch_and_deliver`];
//! flush, wake the workers frames were handed to, and arm the timer for the next
//! release or refill. A guest in debt on its cap is not read until its bucket refills
//! (held back, not dropped: its own queue and TCP feel it). The worker blocks only in
//! its own `epoll_wait` (sockets, its waker, its timerfd); it does no control work:
//! specs, netlink, processes and persistence happen on the control thread, which sends
//! [`Command`]s through a [`WorkerHandle`] (a channel and a waker). Counters leave the
//! worker as [`Counters`] snapshots, on request.

use crate::datapath::drr::{Drr, Served};
use crate::datapath::fastpath::switch::{
    AddError, Allowance, Egress, Ingress, Moving, PortId, Switch, Update, ViolinStats,
};
use crate::datapath::monitor::{self, DropEvent, Monitor};
use crate::datapath::timer::{monotonic_ns, Timer};
use crate::datapath::transport::afxdp::{AfXdpStats, Slot, SlotStats};
use crate::datapath::transport::busypoll::{self, BusyPoll};
use crate::datapath::transport::guest::{PortCounters, RxEvent};
use crate::datapath::transport::udp::{
    steer, steering_program, Received, UdpUnderlay, MAX_STEERED,
};
use crate::datapath::transport::underlay::Underlay;
use crate::datapath::transport::{Budget, Port};
use crate::spec::Violin;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::{info, warn};
use violin_common::wire::gso::Gso;
use violin_common::wire::{arp, EthernetAddress, VxlanRepr};
use violin_common::Verdict;

const UNDERLAY: Token = Token(0);
const WAKER: Token = Token(1);
/// Frames handed over by other workers are waiting.
const HANDOFF: Token = Token(2);
/// The worker's timer: a capped link's release or a guest's refill is due.
const TIMER: Token = Token(3);
const PORT_BASE: usize = 16;
/// Tokens of the Violins' AF_XDP sockets: XSK_BASE + the socket's XskMap key.
const XSK_BASE: usize = 1 << 40;
/// Tokens of the Violins' own underlay sockets: OWN_BASE + the worker's index for it.
const OWN_BASE: usize = 1 << 41;
/// Most frames read from one socket per visit (bytes are the fair service's, [`Drr`]).
const BUDGET: usize = 64;

/// The fair-service class of the host's shared sockets (underlay, hand-overs).
const HOST_CLASS: usize = 0;
/// The class of the guest ports of the Violin in switch slot `v`.
fn port_class(v: usize) -> usize {
    1 + 3 * v
}
/// The class of AF_XDP socket slot `slot` (one Violin's tunnelled frames).
fn xsk_class(slot: usize) -> usize {
    2 + 3 * slot
}
/// The class of the worker's `i`th Violin-own underlay socket (one Violin's tunnelled
/// frames that came through the kernel's UDP stack).
fn own_class(i: usize) -> usize {
    3 + 3 * i
}

fn port_token(p: PortId) -> Token {
    Token(PORT_BASE + 2 * p as usize)
}
fn conn_token(p: PortId) -> Token {
    Token(PORT_BASE + 2 * p as usize + 1)
}
/// The port of a port or connection token's number.
fn port_of(token: usize) -> PortId {
    ((token - PORT_BASE) / 2) as PortId
}

/// The worker that owns the Violin with `vni` among `workers`: the index of the
/// underlay socket [`UdpUnderlay::bind_group`]'s steering program picks.
pub fn home_of(vni: u32, workers: usize) -> usize {
    vni as usize % workers.max(1)
}

/// The longest frame one worker hands another: an AF_XDP frame.
const HANDOFF_FRAME: usize = crate::datapath::transport::xsk::FRAME_SIZE as usize;
/// Frames waiting for one worker from the others; more are dropped (`handoff_full`).
const HANDOFF_DEPTH: usize = 1024;
/// How many times a handed-off frame is passed on after its Violin moved (a move
/// under way: workers' homes can differ until the control thread's `Homes` arrive).
const HANDOFF_HOPS: u8 = 3;

/// A tunnelled frame received by a worker that is not its Violin's home, copied for
/// the home worker (the channel holds these in place: no allocation per frame).
pub struct Handoff {
    src: Ipv4Addr,
    vni: u32,
    len: u16,
    /// Times it was passed on from a worker its Violin had left.
    hops: u8,
    frame: [u8; HANDOFF_FRAME],
}

/// A worker's place among the host's workers, and its ways to the others.
struct Team {
    index: usize,
    count: usize,
    /// To each other worker (`None` at our own index).
    peers: Vec<Option<(SyncSender<Handoff>, Arc<Waker>)>>,
    inbox: Receiver<Handoff>,
    /// The worker of each Violin the control thread placed ([`Workers::place`]), by
    /// VNI; others live at `VNI mod count`.
    homes: Vec<(u32, usize)>,
    /// Workers handed a frame since they were last woken (bit i: worker i).
    to_wake: u64,
    handed_off: u64,
    taken_over: u64,
}

impl Team {
    /// The worker a frame of `vni` belongs to, when it is not this one.
    #[inline]
    fn elsewhere(&self, vni: u32) -> Option<usize> {
        if self.count == 1 {
            return None;
        }
        let h = match self.homes.binary_search_by_key(&vni, |&(v, _)| v) {
            Ok(i) => self.homes[i].1,
            Err(_) => home_of(vni, self.count),
        };
        (h != self.index).then_some(h)
    }

    /// Worker `w` is the home of `vni` from now on (a move), ahead of the control
    /// thread's [`Command::Homes`].
    fn set_home(&mut self, vni: u32, w: usize) {
        match self.homes.binary_search_by_key(&vni, |&(v, _)| v) {
            Ok(i) => self.homes[i].1 = w,
            Err(i) => self.homes.insert(i, (vni, w)),
        }
    }

    /// Copies a frame for worker `to` (woken at the end of the batch).
    fn hand_off(
        &mut self,
        to: usize,
        src: Ipv4Addr,
        vni: u32,
        frame: &[u8],
        partial: Option<&Gso>,
    ) -> Result<(), Verdict> {
        if frame.len() > HANDOFF_FRAME {
            return Err(Verdict::Oversize);
        }
        let mut h = Handoff {
            src,
            vni,
            len: frame.len() as u16,
            hops: 0,
            frame: [0; HANDOFF_FRAME],
        };
        match partial {
            // A partial checksum is completed here: the handoff carries plain frames.
            Some(g) => {
                g.write_segment(frame, 0, &mut h.frame);
            }
            None => h.frame[..frame.len()].copy_from_slice(frame),
        }
        self.send(to, h)
    }

    /// Passes on a frame handed here whose Violin has moved to worker `to`.
    fn pass_on(&mut self, to: usize, mut h: Handoff) -> Result<(), Verdict> {
        h.hops += 1;
        self.send(to, h)
    }

    fn send(&mut self, to: usize, h: Handoff) -> Result<(), Verdict> {
        let Some(Some((tx, _))) = self.peers.get(to) else {
            // Our own index, or a worker beyond the team: nowhere to send it.
            return Err(Verdict::HandoffFull);
        };
        match tx.try_send(h) {
            Ok(()) => {
                self.handed_off += 1;
                self.to_wake |= 1 << to;
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Verdict::HandoffFull),
            Err(TrySendError::Disconnected(_)) => Err(Verdict::HandoffFull),
        }
    }

    /// Wakes every worker handed a frame in this batch.
    fn wake(&mut self) {
        while self.to_wake != 0 {
            let i = self.to_wake.trailing_zeros() as usize;
            self.to_wake &= self.to_wake - 1;
            if let Some(Some((_, w))) = self.peers.get(i) {
                let _ = w.wake();
            }
        }
    }

    /// A port's id among every worker's ports (workers number their own from 0).
    fn global(&self, local: PortId) -> PortId {
        local * self.count as PortId + self.index as PortId
    }
    fn local(&self, global: PortId) -> PortId {
        global / self.count as PortId
    }
}

/// Where a command's answer goes: the control thread waits on it (blocking), the
/// control socket's and metrics' servers await it.
pub type Reply<T> = oneshot::Sender<T>;

/// A change or a question from the control plane, applied between batches.
pub enum Command {
    /// Add the Violin (`Update::added` holds every local guest's port), or bring an
    /// existing one to this spec. Ports of `removed` guests are detached and returned.
    Apply {
        spec: Box<Violin>,
        local_host: String,
        reply: Reply<Result<(Update, Vec<Port>), AddError>>,
    },
    /// Forget a Violin; its ports are detached and returned for teardown.
    Remove {
        name: String,
        reply: Reply<(Option<ViolinStats>, Vec<Port>)>,
    },
    /// Give a port the switch assigned its transport (after the control thread made it).
    AttachPort {
        id: PortId,
        port: Port,
    },
    /// The guest behind `port` sends a gratuitous ARP once its port connects (a move).
    Announce {
        port: PortId,
        mac: EthernetAddress,
        ip: Ipv4Addr,
    },
    /// xdp: read a Violin's AF_XDP socket (opened by the control thread) on one rx
    /// queue: `slot` is the Violin's (its fair-service class), `key` the socket's in the
    /// classifier's XskMap.
    AttachSlot {
        slot: usize,
        key: usize,
        socket: Box<Slot>,
        /// The Violin whose socket it is (`None`: the socket every Violin shares).
        vni: Option<u32>,
    },
    /// xdp: stop reading `slot`'s sockets; they are returned, to be closed off the
    /// worker.
    DetachSlot {
        slot: usize,
        reply: Reply<Vec<Slot>>,
    },
    /// Read the Violin `vni`'s own socket of the underlay's group (the kernel steers
    /// its datagrams there: [`crate::xdp::steer`]).
    AttachOwnSocket {
        vni: u32,
        socket: std::net::UdpSocket,
    },
    /// Stop reading (and close) the Violin `vni`'s own socket.
    DetachOwnSocket {
        vni: u32,
    },
    /// Hand the Violin over whole, to be put on another worker ([`Command::Import`]):
    /// its switch table, guest ports, AF_XDP sockets, own underlay socket and monitors.
    /// What arrives meanwhile waits in those sockets.
    Export {
        name: String,
        /// The worker it goes to: frames of it that still reach this one go there.
        to: usize,
        reply: Reply<Option<Box<MovingViolin>>>,
    },
    /// Take over a Violin another worker exported; replies with its guests' ports as
    /// (member index, port), or hands it back when this worker has its name or VNI.
    Import {
        violin: Box<MovingViolin>,
        reply: Reply<Imported>,
    },
    /// Start reading the underlay's UDP sockets (once every port and membership is
    /// back after a start); what they queued before is discarded.
    OpenUnderlay,
    /// Where placed Violins live, sorted by VNI ([`Workers::place`]).
    Homes(Vec<(u32, usize)>),
    /// The underlay's resolved neighbours (xdp builds outer headers from them).
    Neighbours(Vec<(Ipv4Addr, EthernetAddress)>),
    Snapshot {
        reply: Reply<Counters>,
    },
    /// Each Violin's VNI and worker time so far (`busy_ns`): what deciding moves reads,
    /// four times a second, without a whole snapshot.
    Busy {
        reply: Reply<Vec<(u32, u64)>>,
    },
    /// Describe Violin `vni`'s dropped frames to `events`, at most `rate` a second.
    Monitor {
        id: u64,
        vni: u32,
        rate: u32,
        events: SyncSender<DropEvent>,
        reply: Reply<Subscribed>,
    },
    /// End subscription `id`.
    Unmonitor {
        id: u64,
    },
    /// Leave the loop; the remaining ports are returned for teardown.
    Stop {
        reply: Reply<Vec<Port>>,
    },
}

/// What [`Command::Monitor`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscribed {
    Yes,
    /// The worker has too many subscribers.
    Full,
    /// The Violin is not on this worker (it moved, or is moving): ask its home again.
    NotHere,
}

/// What [`Command::Import`] did: the Violin's guests' new ports as (member index,
/// port), or why it was refused, with the Violin handed back.
pub type Imported = Result<Vec<(usize, PortId)>, (AddError, Box<MovingViolin>)>;

/// A Violin between two workers ([`Command::Export`], [`Command::Import`]).
pub struct MovingViolin {
    table: Moving,
    /// Its guests' ports, by member index.
    ports: Vec<(usize, Port)>,
    /// Its AF_XDP sockets: (slot, XskMap key, socket).
    slots: Vec<(usize, usize, Slot)>,
    own: Option<std::net::UdpSocket>,
    monitors: Vec<monitor::Subscriber>,
}

impl MovingViolin {
    pub fn vni(&self) -> u32 {
        self.table.vni()
    }
}

/// One worker's counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub violins: Vec<ViolinStats>,
    /// By port id.
    pub ports: BTreeMap<PortId, PortSnapshot>,
    pub host_drops: BTreeMap<String, u64>,
    /// VXLAN frames received through the kernel's UDP socket.
    pub udp_rx_frames: u64,
    pub rings: Option<AfXdpStats>,
    pub slots: BTreeMap<usize, SlotStats>,
    /// Each worker's own figures (one entry per worker once merged).
    pub workers: Vec<WorkerStats>,
}

pub use crate::stats::WorkerStats;

impl Counters {
    /// The host's counters from each worker's: Violins and ports are each one
    /// worker's; host drops, rings and sockets (one per queue) add up.
    pub fn merge(all: Vec<Counters>) -> Counters {
        let mut m = Counters::default();
        for c in all {
            m.violins.extend(c.violins);
            m.ports.extend(c.ports);
            for (k, v) in c.host_drops {
                *m.host_drops.entry(k).or_default() += v;
            }
            m.udp_rx_frames += c.udp_rx_frames;
            m.rings = match (m.rings, c.rings) {
                (Some(a), Some(b)) => Some(a.plus(&b)),
                (a, b) => a.or(b),
            };
            for (k, v) in c.slots {
                add_slot(&mut m.slots, k, v);
            }
            m.workers.extend(c.workers);
        }
        m
    }
}

#[derive(Debug, Clone, Default)]
pub struct PortSnapshot {
    pub counters: PortCounters,
    pub connected: bool,
    pub describe: String,
}

/// The control side's end of a worker: send commands, wake it.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: Sender<Command>,
    waker: Arc<Waker>,
    /// The time the worker charged all its Violins so far (ns; stored once per round
    /// with work), read without waking it.
    busy: Arc<std::sync::atomic::AtomicU64>,
}

/// The worker stopped (it panicked or was stopped): nothing can be applied.
#[derive(Debug, thiserror::Error)]
#[error("the packet worker is not running")]
pub struct WorkerGone;

impl WorkerHandle {
    /// The time the worker charged its Violins so far, in ns (no command: it is not
    /// woken).
    pub fn busy_ns(&self) -> u64 {
        self.busy.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn send(&self, c: Command) -> Result<(), WorkerGone> {
        self.tx.send(c).map_err(|_| WorkerGone)?;
        self.waker.wake().map_err(|_| WorkerGone)
    }

    /// Sends a question and waits for the answer (control thread only: it blocks).
    pub fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, WorkerGone> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.blocking_recv().map_err(|_| WorkerGone)
    }

    /// The same, for async callers (the control socket's and metrics' servers).
    pub async fn ask_async<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, WorkerGone> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| WorkerGone)
    }
}

/// Every packet worker of the host, as the control side addresses them: a Violin's
/// commands go to its home worker, a port's to the worker that numbered it, questions
/// about the whole host to all of them.
#[derive(Clone)]
pub struct Workers {
    handles: Arc<[WorkerHandle]>,
    homes: Arc<Mutex<Homes>>,
    /// Moves begun and ended (odd: a Violin is between two workers, on neither):
    /// a snapshot taken across a move is taken again ([`Workers::snapshot_async`]).
    moves: Arc<std::sync::atomic::AtomicU64>,
}

/// A move under way ([`Workers::moving`]); ends when dropped.
pub struct MoveGuard(Arc<std::sync::atomic::AtomicU64>);

impl Drop for MoveGuard {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

/// How many times (about a millisecond apart) a snapshot waits out a move under way,
/// or is taken again when one overlapped it; then it is what it is.
const SNAPSHOT_TRIES: usize = 50;

/// Which worker each Violin lives on. By default `VNI mod n` ([`home_of`]). Where the
/// kernel's steering can be changed (the underlay's socket group, on either plane:
/// on the xdp plane a Violin's AF_XDP sockets go to its worker too), each new Violin
/// goes to the worker with the fewest Violins instead: Violins share a worker, and its
/// CPU time, only when there are more of them than workers. A quiet Violin's frame
/// then wakes a worker of its own, which runs at once (a short time slice,
/// [`crate::datapath::PACKET_SLICE_NS`]), instead of waiting for a flooding
/// neighbour's worker, always runnable and never woken, to get the CPU back.
struct Homes {
    /// Placed Violins: VNI → worker (others live at `VNI mod n`).
    placed: BTreeMap<u32, usize>,
    steering: Steering,
    /// Workers with a loud Violin at the last reading ([`Workers::set_loud`]): new
    /// Violins go elsewhere while they can.
    loud: Vec<bool>,
}

/// How the kernel picks a socket of the underlay's group for a datagram.
pub enum Steering {
    /// Socket `VNI mod n`, fixed (one worker, or no way to change it).
    Fixed,
    /// Classic BPF over the workers' sockets, re-steered through this one as Violins
    /// are placed: a worker's Violins share its socket.
    Workers(std::os::fd::OwnedFd),
    /// Each placed Violin's own socket (eBPF), read by its worker.
    Violins(Box<crate::xdp::steer::VniSteering>),
}

impl Steering {
    /// What the daemon's log calls it.
    pub fn name(&self) -> &'static str {
        match self {
            Steering::Fixed => "fixed",
            Steering::Workers(_) => "worker",
            Steering::Violins(_) => "violin",
        }
    }
}

impl Workers {
    fn new(handles: Vec<WorkerHandle>, steering: Steering) -> Workers {
        Workers {
            handles: handles.into(),
            moves: Arc::default(),
            homes: Arc::new(Mutex::new(Homes {
                placed: BTreeMap::new(),
                steering,
                loud: Vec::new(),
            })),
        }
    }
    pub fn len(&self) -> usize {
        self.handles.len()
    }
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
    /// Worker `i` (the one serving rx queue `i`).
    pub fn get(&self, i: usize) -> &WorkerHandle {
        &self.handles[i]
    }
    /// The index of the home worker of the Violin with `vni`.
    pub fn home(&self, vni: u32) -> usize {
        let homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        homes
            .placed
            .get(&vni)
            .copied()
            .unwrap_or_else(|| home_of(vni, self.len()))
    }
    /// The home worker of the Violin with `vni`.
    pub fn of_vni(&self, vni: u32) -> &WorkerHandle {
        &self.handles[self.home(vni)]
    }
    /// Gives the Violin with `vni` a home before its first command (control thread):
    /// the worker with the fewest Violins among `others` (the VNIs of the host's other
    /// Violins). Every worker learns it (for frames the kernel could not steer) before
    /// the kernel steers by it. Where steering cannot change, or fails, the Violin
    /// stays at `VNI mod n`.
    pub fn place(&self, vni: u32, others: impl Iterator<Item = u32>) -> usize {
        let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&w) = homes.placed.get(&vni) {
            return w;
        }
        let n = self.len();
        let movable = match &homes.steering {
            Steering::Fixed => false,
            Steering::Workers(_) => n > 1 && homes.placed.len() < MAX_STEERED,
            Steering::Violins(s) => homes.placed.len() < s.capacity(),
        };
        if !movable {
            return home_of(vni, n);
        }
        let mut load = vec![0usize; n];
        for o in others.filter(|&o| o != vni) {
            load[homes
                .placed
                .get(&o)
                .copied()
                .unwrap_or_else(|| home_of(o, n))] += 1;
        }
        // The least loaded without a loud Violin; of equals, `VNI mod n` first, then
        // the lowest.
        let modulo = home_of(vni, n);
        let loud = |i: usize| homes.loud.get(i).copied().unwrap_or(false);
        let w = (0..n)
            .min_by_key(|&i| (loud(i), load[i], i != modulo, i))
            .unwrap_or(modulo);
        homes.placed.insert(vni, w);
        if let Err(e) = self.publish(&homes) {
            // The kernel keeps the program it had, which sends this VNI to `VNI mod n`;
            // the workers are told so again.
            warn!(vni, "a Violin stays on worker {modulo}: {e}");
            homes.placed.remove(&vni);
            if let Err(e) = self.publish(&homes) {
                warn!("re-steering the underlay: {e}");
            }
            return modulo;
        }
        if let Steering::Violins(s) = &mut homes.steering {
            // A socket of its own, given to its worker before the kernel steers to it;
            // failing that, the kernel steers it to its worker's socket.
            let handle = &self.handles[w];
            let given = s.open(vni, |socket| {
                handle
                    .send(Command::AttachOwnSocket { vni, socket })
                    .map_err(anyhow::Error::from)
            });
            if let Err(e) = given {
                warn!(vni, "the Violin shares its worker's underlay socket: {e:#}");
                if let Err(e) = s.to_worker(vni, w) {
                    warn!(vni, "{e:#}");
                }
            }
        }
        w
    }
    /// Forgets where the Violin with `vni` lived, after it is removed.
    pub fn unplace(&self, vni: u32) {
        let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = homes.placed.remove(&vni) {
            if let Steering::Violins(s) = &mut homes.steering {
                s.forget(vni);
                let _ = self.handles[w].send(Command::DetachOwnSocket { vni });
            }
            if let Err(e) = self.publish(&homes) {
                warn!(vni, "re-steering the underlay after a Violin left: {e}");
            }
        }
    }
    /// Which workers have a loud Violin now (control thread, [`crate::control::balance`]).
    pub fn set_loud(&self, loud: Vec<bool>) {
        let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        homes.loud = loud;
    }

    /// Whether the Violin with `vni` was placed ([`Workers::place`]), so that it can
    /// move.
    pub fn placed(&self, vni: u32) -> bool {
        let homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        homes.placed.contains_key(&vni)
    }

    /// Whether a Violin can change workers once placed: more than one worker, and the
    /// kernel's steering follows (see [`Workers::place`]).
    pub fn movable(&self) -> bool {
        let homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        self.len() > 1 && !matches!(homes.steering, Steering::Fixed)
    }

    /// Makes worker `to` the home of the placed Violin `vni`, whose state went there
    /// ([`Command::Export`], [`Command::Import`]; control thread). Its own socket went
    /// with it, so the kernel's steering stays; where it has none (steering by worker,
    /// or its socket was refused) the kernel steers it to `to`'s socket from now on,
    /// and other workers hand what still reaches them to `to`.
    pub fn rehome(&self, vni: u32, to: usize) {
        let mut homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        match homes.placed.get_mut(&vni) {
            Some(w) if to < self.handles.len() => *w = to,
            _ => {
                warn!(vni, to, "re-homing a Violin that was never placed");
                return;
            }
        }
        if let Steering::Violins(s) = &mut homes.steering {
            if !s.owns(vni) {
                if let Err(e) = s.to_worker(vni, to) {
                    warn!(vni, "{e:#}");
                }
            }
        }
        if let Err(e) = self.publish(&homes) {
            warn!(vni, "re-steering the underlay after a Violin moved: {e}");
        }
    }

    /// How the underlay's datagrams are steered ([`Steering::name`]).
    pub fn steering(&self) -> &'static str {
        let homes = self.homes.lock().unwrap_or_else(|p| p.into_inner());
        homes.steering.name()
    }
    /// Tells every worker, then the kernel, where placed Violins live.
    fn publish(&self, homes: &Homes) -> std::io::Result<()> {
        let table: Vec<(u32, usize)> = homes.placed.iter().map(|(&v, &w)| (v, w)).collect();
        self.send_all(|| Command::Homes(table.clone()))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        match &homes.steering {
            Steering::Workers(fd) => {
                steer(fd.as_raw_fd(), &steering_program(self.len() as u32, &table))
            }
            // Each placed Violin is steered as it is placed.
            Steering::Violins(_) | Steering::Fixed => Ok(()),
        }
    }
    /// The worker that owns port `p`.
    pub fn of_port(&self, p: PortId) -> &WorkerHandle {
        &self.handles[p as usize % self.len()]
    }
    pub fn send_all(&self, make: impl Fn() -> Command) -> Result<(), WorkerGone> {
        self.handles.iter().try_for_each(|w| w.send(make()))
    }
    /// Asks every worker (control thread only: it blocks).
    pub fn ask_all<T>(&self, make: impl Fn(Reply<T>) -> Command) -> Result<Vec<T>, WorkerGone> {
        self.handles.iter().map(|w| w.ask(&make)).collect()
    }
    /// The host's counters, merged from every worker's (control thread).
    pub fn snapshot(&self) -> Result<Counters, WorkerGone> {
        Ok(Counters::merge(
            self.ask_all(|reply| Command::Snapshot { reply })?,
        ))
    }
    /// The same, for async callers (the control socket's and metrics' servers). A
    /// Violin moving between workers ([`Workers::moving`]) is on neither for a moment:
    /// a snapshot that overlapped a move is taken again, so no Violin is missing.
    pub async fn snapshot_async(&self) -> Result<Counters, WorkerGone> {
        use std::sync::atomic::Ordering::Acquire;
        let mut tries = 0;
        loop {
            let before = self.moves.load(Acquire);
            if before % 2 == 1 && tries < SNAPSHOT_TRIES {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let c = self.snapshot_once().await?;
            if self.moves.load(Acquire) == before || tries >= SNAPSHOT_TRIES {
                return Ok(c);
            }
            tries += 1;
        }
    }

    async fn snapshot_once(&self) -> Result<Counters, WorkerGone> {
        let mut all = Vec::with_capacity(self.len());
        for w in self.handles.iter() {
            all.push(w.ask_async(|reply| Command::Snapshot { reply }).await?);
        }
        Ok(Counters::merge(all))
    }

    /// Marks a move under way until the guard drops (control thread).
    pub fn moving(&self) -> MoveGuard {
        self.moves
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        MoveGuard(self.moves.clone())
    }
}

/// A guest port as the worker holds it.
struct WPort {
    port: Port,
    /// A gratuitous ARP to send once the port connects.
    announce: Option<(EthernetAddress, Ipv4Addr)>,
}

/// The switch and the ports it delivers to: one place where a frame is switched and
/// handed to its outputs, whichever transport it came from.
struct Fabric {
    switch: Switch,
    ports: Vec<Option<WPort>>,
    out: Vec<Egress>,
    /// Where a super-frame's segments (or their headers) are built for a transport
    /// that takes one frame at a time.
    seg: Box<[u8]>,
    /// Who is told of dropped frames (`violin monitor`).
    monitor: Monitor,
}

/// Bytes for one segment, or for the headers of one `UDP_SEGMENT` send.
const SEG_BUF: usize = 14 + 65535 + 64 * 128;

/// Where tunnel outputs go: the underlay the frame did not come from.
trait TunnelTx {
    fn tunnel(&mut self, dst: Ipv4Addr, vni: u32, frame: &[u8]) -> Result<(), Verdict>;
    /// To a `peer` daemon, segments may leave with partial checksums.
    fn tunnel_super(
        &mut self,
        dst: Ipv4Addr,
        vni: u32,
        g: &Gso,
        frame: &[u8],
        seg: &mut [u8],
        peer: bool,
    ) -> Result<(), Verdict>;
}
/// Both underlays send the same way; the frame goes to whichever the worker holds.
macro_rules! tunnel_tx {
    ($t:ty) => {
        impl TunnelTx for $t {
            fn tunnel(&mut self, dst: Ipv4Addr, vni: u32, frame: &[u8]) -> Result<(), Verdict> {
                self.send(dst, vni, frame)
            }
            fn tunnel_super(
                &mut self,
                dst: Ipv4Addr,
                vni: u32,
                g: &Gso,
                frame: &[u8],
                seg: &mut [u8],
                peer: bool,
            ) -> Result<(), Verdict> {
                self.send_super(dst, vni, g, frame, seg, peer)
            }
        }
    };
}
tunnel_tx!(&UdpUnderlay);
tunnel_tx!(&mut Underlay);

/// Adds `ns` to Violin (switch slot) `v`'s charges this round.
fn charge(charges: &mut Vec<(usize, u64)>, v: usize, ns: u64) {
    match charges.last_mut() {
        Some((w, n)) if *w == v => *n += ns,
        _ => charges.push((v, ns)),
    }
}

/// The bytes one visit to a shared socket read for each Violin, in runs of one VNI
/// (reused: no allocation once it has grown to a batch's runs).
#[derive(Default)]
struct SharedVisit {
    runs: Vec<(u32, u64)>,
}

impl SharedVisit {
    #[inline]
    fn add(&mut self, vni: u32, bytes: usize) {
        let b = bytes as u64;
        match self.runs.last_mut() {
            Some((v, n)) if *v == vni => *n += b,
            _ => self.runs.push((vni, b)),
        }
    }

    /// Charges the visit's `ns` to the Violins still on `sw` by the bytes read for
    /// each, and starts the next visit.
    fn share(&mut self, ns: u64, sw: &Switch, charges: &mut Vec<(usize, u64)>) {
        let total: u64 = self.runs.iter().map(|(_, b)| b).sum();
        for &(vni, b) in &self.runs {
            if let Some(v) = sw.slot_of_vni(vni) {
                let part = u128::from(ns) * u128::from(b) / u128::from(total.max(1));
                charge(charges, v, part as u64);
            }
        }
        self.runs.clear();
    }
}

impl Fabric {
    /// A tunnelled frame this worker received: switched here if its Violin lives here,
    /// else copied to the worker that owns it.
    /// A frame whose header `vx` announces remote checksum offload has a partial L4
    /// checksum: it is switched as a one-segment super-frame, which a tap takes as it is
    /// and any other output completes; handed to another worker, it is completed on the
    /// way.
    #[inline]
    fn tunnel_in(
        &mut self,
        team: &mut Team,
        src: Ipv4Addr,
        vx: VxlanRepr,
        inner: &[u8],
        now: u64,
        tx: impl TunnelTx,
    ) {
        let vni = vx.vni;
        let one = match vx.rco.map(|r| Gso::from_rco(r, inner)) {
            None => None,
            Some(Ok(g)) => Some(g),
            Some(Err(e)) => return self.switch.count_host_drop(e.into()),
        };
        match team.elsewhere(vni) {
            Some(home) => {
                if let Err(v) = team.hand_off(home, src, vni, inner, one.as_ref()) {
                    self.switch.count_host_drop(v);
                }
            }
            None => {
                let ingress = Ingress::Tunnel { src, vni };
                self.switch_and_deliver(ingress, inner, one.as_ref(), now, tx)
            }
        }
    }

    /// Switches one frame (a super-frame when `gso` says so) and hands it to each
    /// output's transport; failures are counted as drops.
    #[inline]
    fn switch_and_deliver(
        &mut self,
        ingress: Ingress,
        frame: &[u8],
        gso: Option<&Gso>,
        now: u64,
        mut tx: impl TunnelTx,
    ) {
        let Fabric {
            switch,
            ports,
            out,
            seg,
            monitor,
        } = self;
        let v = switch.process_gso(ingress, frame, gso, now, out);
        if v != Verdict::Forward {
            if v.is_drop() && monitor.is_on() {
                tell(monitor, switch, ingress, v, frame, now);
            }
            return;
        }
        for &e in out.iter() {
            if let Err(v) = deliver(ports, seg, &mut tx, e, frame, gso) {
                switch.count_egress_drop(e, v);
                if monitor.is_on() {
                    tell(monitor, switch, ingress, v, frame, now);
                }
            }
        }
    }

    /// Sends what capped links queued and may go by `now`; returns when more is due.
    fn release(&mut self, now: u64, mut tx: impl TunnelTx) -> Option<u64> {
        let Fabric {
            switch, ports, seg, ..
        } = self;
        switch.release(now, |e, frame, gso| {
            deliver(ports, seg, &mut tx, e, frame, gso)
        })
    }
}

/// Offers a dropped frame to the monitor's subscribers of its Violin (cold: only while
/// someone monitors).
#[cold]
fn tell(
    monitor: &mut Monitor,
    switch: &Switch,
    ingress: Ingress,
    v: Verdict,
    frame: &[u8],
    now: u64,
) {
    let (vni, from) = match ingress {
        Ingress::Port(p) => match switch.vni_of_port(p) {
            Some(vni) => (vni, monitor::From::Port(p)),
            None => return,
        },
        Ingress::Tunnel { src, vni } => (vni, monitor::From::Tunnel(src)),
    };
    monitor.offer(vni, v, from, frame, now);
}

/// Hands one switched frame (a super-frame with `gso`) to output `e`'s transport.
#[inline]
fn deliver(
    ports: &mut [Option<WPort>],
    seg: &mut [u8],
    tx: &mut impl TunnelTx,
    e: Egress,
    frame: &[u8],
    gso: Option<&Gso>,
) -> Result<(), Verdict> {
    match (e, gso) {
        (Egress::Port(q), _) => match ports.get_mut(q as usize).and_then(Option::as_mut) {
            Some(wp) => match gso {
                None => wp.port.send(frame),
                Some(g) => wp.port.send_super(g, frame, seg),
            },
            None => Err(Verdict::PortDown),
        },
        (Egress::Tunnel { dst, vni, .. }, None) => tx.tunnel(dst, vni, frame),
        (Egress::Tunnel { dst, vni, peer }, Some(g)) => {
            tx.tunnel_super(dst, vni, g, frame, seg, peer)
        }
    }
}

pub struct Worker {
    poll: Poll,
    fabric: Fabric,
    underlay: Underlay,
    commands: Receiver<Command>,
    scratch: Vec<u8>,
    /// Sockets with frames to read, served fairly.
    drr: Drr,
    /// Guest ports held back until their cap refills: (when, token).
    held: Vec<(u64, Token)>,
    timer: Timer,
    /// When the next capped-link release is due (as of the end of the last round).
    release_at: Option<u64>,
    udp_rx_frames: u64,
    /// Of those, through its Violins' own sockets.
    own_rx_frames: u64,
    /// Its Violins' own underlay sockets (VNI, socket), by their index in its tokens
    /// and classes ([`own_class`]).
    own: Vec<Option<(u32, std::net::UdpSocket)>>,
    /// The underlay's sockets are read (after [`Command::OpenUnderlay`]).
    open: bool,
    /// xdp: the AF_XDP sockets this worker reads (its Violins'; on its own queue, also
    /// the one every Violin shares where sockets are not per Violin), by XskMap key,
    /// with their slots.
    xsks: Vec<Option<(usize, Slot)>>,
    /// The Violin of each AF_XDP slot this worker reads (`None`: shared), by slot.
    slot_vni: Vec<Option<u32>>,
    /// This round's visits to Violins' sockets: (switch slot, ns), to charge them.
    charges: Vec<(usize, u64)>,
    /// What the current visit to a socket several Violins share (the underlay's, the
    /// hand-off inbox, a shared AF_XDP socket) read, by Violin: its time is shared out
    /// by these bytes.
    shared: SharedVisit,
    /// All it charged so far, published for the control thread ([`WorkerHandle::busy_ns`]).
    busy: Arc<std::sync::atomic::AtomicU64>,
    charged: u64,
    /// What reading them did (frames, refills retried, frames that were not VXLAN).
    xsk_reads: AfXdpStats,
    team: Team,
    stop: Option<Reply<Vec<Port>>>,
    /// When to poll without blocking instead of sleeping in `epoll_wait`.
    spin: Spin,
    /// Its sockets' NAPI instances, run by the worker itself while it spins.
    busy_poll: BusyPoll,
}

/// Adds a socket's counters to its slot's (a Violin's sockets on several queues).
fn add_slot(slots: &mut BTreeMap<usize, SlotStats>, slot: usize, st: SlotStats) {
    slots
        .entry(slot)
        .and_modify(|e| *e = e.plus(&st))
        .or_insert(st);
}

/// How long a worker keeps off spinning after finding its CPU shared mid-spin.
pub const SPIN_BACKOFF_NS: u64 = 100_000_000;

/// Involuntary switches in one spin window that are still "brief": the guest that was
/// to answer runs once and blocks again. More mean a thread that wants the CPU for
/// longer (an MPI rank polling for its message, a busy neighbour).
pub const SPIN_SHARED_SWITCHES: u64 = 2;

/// Spin, then sleep: after a round with work a worker polls without blocking for a
/// window, so the answer to what it just forwarded costs no wake-up. Spinning is only
/// free while nothing else wants the CPU: when the kernel switched the worker out
/// involuntarily during a window (a runnable thread on this CPU: an MPI rank polling for
/// its message, the guest that is to answer), the worker stops and sleeps through
/// windows for [`SPIN_BACKOFF_NS`]. Time and the switch count are passed in.
#[derive(Debug, Default)]
pub struct Spin {
    window_ns: u64,
    /// More involuntary switches than this in one window: the CPU is shared.
    shared_after: u64,
    worked: u64,
    /// The thread's involuntary switches when this window's spinning began.
    base: Option<u64>,
    off_until: u64,
}

impl Spin {
    /// A window of `window` (zero: always sleep when there is nothing to do).
    pub fn new(window: Duration) -> Spin {
        Spin {
            window_ns: window.as_nanos() as u64,
            shared_after: SPIN_SHARED_SWITCHES,
            ..Spin::default()
        }
    }

    /// Spins through whole windows however often the thread is switched out.
    pub fn regardless_of_sharing(self) -> Spin {
        Spin {
            shared_after: u64::MAX,
            ..self
        }
    }

    /// A round had work at `now`: a new window starts.
    pub fn worked(&mut self, now: u64) {
        self.worked = now;
        self.base = None;
    }

    /// Whether to poll without blocking at `now`; `switches` reads the thread's
    /// involuntary context switches (only called inside a window).
    pub fn spin(&mut self, now: u64, switches: impl FnOnce() -> u64) -> bool {
        if self.window_ns == 0
            || now.saturating_sub(self.worked) >= self.window_ns
            || now < self.off_until
        {
            return false;
        }
        let n = switches();
        match self.base {
            None => {
                self.base = Some(n);
                true
            }
            Some(b) if n.saturating_sub(b) > self.shared_after => {
                self.off_until = now + SPIN_BACKOFF_NS;
                false
            }
            Some(_) => true,
        }
    }
}

/// This thread's involuntary context switches so far (`ru_nivcsw`).
fn involuntary_switches() -> u64 {
    // SAFETY: an all-zero rusage is valid; getrusage(2) fills it for RUSAGE_THREAD.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_nivcsw as u64
}

impl Worker {
    /// How it busy-polls after each round with work (spin, then sleep).
    pub fn set_spin(&mut self, spin: Spin) {
        self.spin = spin;
    }

    /// One worker per underlay (worker `i` serves `underlays[i]`, rx queue `i`), and
    /// the handles that command them. With `by_violin` (the steering program attached
    /// to the underlays' group), each placed Violin gets a socket of its own.
    pub fn team(
        underlays: Vec<Underlay>,
        by_violin: Option<Box<crate::xdp::steer::VniSteering>>,
    ) -> std::io::Result<(Vec<Worker>, Workers)> {
        let n = underlays.len();
        // `Team::to_wake` has a bit per worker.
        assert!((1..=64).contains(&n), "1 to 64 workers");
        // The control thread places Violins and re-steers the underlay's socket group
        // (on the xdp plane it carries what the classifier passes to the kernel: super-
        // and jumbo frames); a Violin's AF_XDP sockets, whatever queue the NIC picks,
        // are read by its own worker.
        let steering = match (by_violin, n) {
            (Some(s), _) => Steering::Violins(s),
            (None, 1) => Steering::Fixed,
            (None, _) => Steering::Workers({
                let fd = underlays[0].udp().fd();
                // SAFETY: `fd` is an open socket for the duration of the call.
                unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?
            }),
        };
        let mut built = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        let mut doors = Vec::with_capacity(n);
        for underlay in underlays {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let timer = Timer::new()?;
            poll.registry()
                .register(&mut SourceFd(&timer.fd()), TIMER, Interest::READABLE)?;
            let (tx, rx) = mpsc::channel();
            let (htx, hrx) = mpsc::sync_channel(HANDOFF_DEPTH);
            let busy = Arc::new(std::sync::atomic::AtomicU64::new(0));
            handles.push(WorkerHandle {
                tx,
                waker: waker.clone(),
                busy: busy.clone(),
            });
            doors.push((htx, waker));
            built.push((poll, underlay, rx, hrx, timer, busy));
        }
        let workers = built
            .into_iter()
            .enumerate()
            .map(|(i, (poll, underlay, commands, inbox, timer, busy))| {
                let team = Team {
                    index: i,
                    count: n,
                    peers: doors
                        .iter()
                        .enumerate()
                        .map(|(j, d)| (j != i).then(|| d.clone()))
                        .collect(),
                    inbox,
                    homes: Vec::new(),
                    to_wake: 0,
                    handed_off: 0,
                    taken_over: 0,
                };
                Worker {
                    poll,
                    fabric: Fabric {
                        switch: Switch::new(),
                        ports: Vec::new(),
                        out: Vec::with_capacity(64),
                        seg: vec![0u8; SEG_BUF].into_boxed_slice(),
                        monitor: Monitor::of_worker(i, n),
                    },
                    underlay,
                    commands,
                    scratch: vec![0u8; 16 + 14 + 65535 + 64],
                    drr: {
                        let mut d = Drr::default();
                        d.reserve(HOST_CLASS, 2);
                        d
                    },
                    held: Vec::with_capacity(64),
                    timer,
                    release_at: None,
                    udp_rx_frames: 0,
                    own_rx_frames: 0,
                    own: Vec::new(),
                    open: false,
                    xsks: Vec::new(),
                    slot_vni: Vec::new(),
                    charges: Vec::with_capacity(256),
                    shared: SharedVisit::default(),
                    busy,
                    charged: 0,
                    xsk_reads: AfXdpStats::default(),
                    team,
                    stop: None,
                    spin: Spin::default(),
                    busy_poll: BusyPoll::default(),
                }
            })
            .collect();
        Ok((workers, Workers::new(handles, steering)))
    }

    fn now(&self) -> u64 {
        monotonic_ns()
    }

    /// The loop; returns when told to stop, or when every handle is gone.
    pub fn run(mut self) {
        if let Err(e) = crate::datapath::prioritise_packet_work() {
            warn!("packet worker at the default priority: {e}");
        }
        // Timers of this thread fire within 1 µs of their deadline (the default slack
        // is 50 µs: a shaped link's pacing would be that coarse).
        // SAFETY: prctl(2) PR_SET_TIMERSLACK takes one integer argument.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
        let mut events = Events::with_capacity(256);
        loop {
            if !self.apply_commands() {
                break;
            }
            let idle = self.drr.is_idle();
            let spinning = idle && self.spin.spin(self.now(), involuntary_switches);
            let timeout = (spinning || !idle).then_some(Duration::ZERO);
            if spinning {
                // Whatever else wants this CPU (the guest that is to answer) goes first.
                // SAFETY: sched_yield(2) takes no arguments.
                unsafe { libc::sched_yield() };
                self.busy_poll_sockets();
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("packet worker: poll failed: {e}");
                break;
            }
            if !events.is_empty() {
                self.spin.worked(self.now());
            }
            for ev in events.iter() {
                self.on_event(ev.token(), ev.is_readable(), ev.is_writable());
            }
            let start = self.now();
            self.due();
            let mut drr = std::mem::take(&mut self.drr);
            let (mut t, mut visits) = (self.now(), 0);
            self.charges.clear();
            drr.round(|src, bytes| {
                let served = self.serve(src, bytes);
                let t2 = self.now();
                let ns = t2.saturating_sub(t);
                visits += ns;
                if let Some(v) = self.violin_of(src) {
                    charge(&mut self.charges, v, ns);
                } else {
                    self.shared
                        .share(ns, &self.fabric.switch, &mut self.charges);
                }
                t = t2;
                served
            });
            self.drr = drr;
            self.flush_underlay();
            self.team.wake();
            self.end_port_rounds(!self.drr.is_idle());
            // Between batches: pair tables that filled up during the round grow here.
            self.fabric.switch.make_room();
            self.charge_round(start, visits);
            self.arm_timer();
        }
        let ports = self.detach_all();
        if let Some(reply) = self.stop.take() {
            let _ = reply.send(ports);
        }
        info!("packet worker stopped");
    }

    /// Runs the NAPI instances its sockets receive from (the underlay's queues through
    /// its AF_XDP and UDP sockets, fast ports' veths), each once, so what arrived is in
    /// the sockets for the poll that follows ([`BusyPoll`]).
    fn busy_poll_sockets(&mut self) {
        let now = self.now();
        let Worker {
            busy_poll,
            xsks,
            fabric,
            underlay,
            own,
            ..
        } = self;
        let fast = fabric
            .ports
            .iter()
            .flatten()
            .filter_map(|wp| match &wp.port {
                Port::Xdp(x) => Some(x.fd()),
                _ => None,
            });
        let udp = std::iter::once(underlay.udp().fd());
        let own = own.iter().flatten().map(|(_, s)| s.as_raw_fd());
        let fds = xsks
            .iter()
            .flatten()
            .map(|(_, s)| s.fd())
            .chain(fast)
            .chain(udp)
            .chain(own);
        if busy_poll.refresh(now, fds, busypoll::napi_id) {
            let napi: Vec<u32> = busy_poll.napi_ids().collect();
            info!(?napi, "busy polling the sockets' NAPI instances");
        }
        busy_poll.poll(busypoll::poll_once);
    }

    /// Ends the round on every port that batches its writes (`busy`: more rounds
    /// follow at once, so a port may keep a short batch for the next).
    fn end_port_rounds(&mut self, busy: bool) {
        let Fabric { switch, ports, .. } = &mut self.fabric;
        for (p, wp) in ports.iter_mut().enumerate() {
            if let Some(wp) = wp.as_mut().filter(|wp| wp.port.batches()) {
                if let Err(v) = wp.port.end_round(busy) {
                    switch.count_egress_drop(Egress::Port(p as PortId), v);
                }
            }
        }
    }

    /// Charges each Violin served in the round that began at `start` its visits' time,
    /// and its part (by that time) of the round's other work (`visits`: all visits'
    /// time): releasing queued frames, sending the underlay's batches, flushing ports.
    fn charge_round(&mut self, start: u64, visits: u64) {
        if self.charges.is_empty() {
            return;
        }
        let rest = self.now().saturating_sub(start).saturating_sub(visits);
        let own: u64 = self.charges.iter().map(|(_, n)| n).sum();
        for &(v, n) in &self.charges {
            let part = (u128::from(rest) * u128::from(n) / u128::from(own.max(1))) as u64;
            self.fabric.switch.charge(v, n + part);
        }
        self.charged += own + rest;
        self.busy
            .store(self.charged, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends what waits in the underlay's batches; what the kernel refused counts as
    /// its Violin's `tunnel_tx_error`.
    fn flush_underlay(&mut self) {
        self.underlay.flush();
        let sw = &mut self.fabric.switch;
        self.underlay.udp().take_failed(|dst, vni| {
            // Only the VNI picks the counter.
            let e = Egress::Tunnel {
                dst,
                vni,
                peer: true,
            };
            sw.count_egress_drop(e, Verdict::TunnelTxError)
        });
    }

    /// Applies every queued command, and sends what they sent (an announcement) before
    /// the worker waits; false once the worker is to stop.
    fn apply_commands(&mut self) -> bool {
        let mut applied = false;
        loop {
            match self.commands.try_recv() {
                Ok(Command::Stop { reply }) => {
                    self.stop = Some(reply);
                    return false;
                }
                Ok(c) => {
                    self.apply(c);
                    applied = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        if applied {
            self.flush_underlay();
        }
        true
    }

    fn apply(&mut self, c: Command) {
        match c {
            Command::Apply {
                spec,
                local_host,
                reply,
            } => {
                let now = self.now();
                let sw = &mut self.fabric.switch;
                let r = if sw.violin(&spec.name).is_some() {
                    sw.update_violin(&spec, &local_host, now)
                } else {
                    sw.add_violin(&spec, &local_host, now).map(|added| Update {
                        added,
                        ..Update::default()
                    })
                };
                let r = r.map(|up| {
                    let gone = up.removed.iter().filter_map(|p| self.detach(*p)).collect();
                    let t = &self.team;
                    let global = |v: Vec<(usize, PortId)>| {
                        v.into_iter().map(|(m, p)| (m, t.global(p))).collect()
                    };
                    let up = Update {
                        kept: global(up.kept),
                        added: global(up.added),
                        removed: up.removed.into_iter().map(|p| t.global(p)).collect(),
                    };
                    (up, gone)
                });
                let _ = reply.send(r);
            }
            Command::Remove { name, reply } => {
                let mine: Vec<PortId> = self.fabric.switch.ports_of(&name);
                let stats = self.fabric.switch.remove_violin(&name);
                if let Some(s) = &stats {
                    self.fabric.monitor.forget(s.vni);
                }
                let gone = mine.into_iter().filter_map(|p| self.detach(p)).collect();
                let _ = reply.send((stats, gone));
            }
            Command::AttachPort { id, port } => self.attach(self.team.local(id), port),
            Command::Announce { port, mac, ip } => {
                let port = self.team.local(port);
                let Some(wp) = self.port_mut(port) else {
                    return;
                };
                wp.announce = Some((mac, ip));
                let waits = matches!(&wp.port, Port::Sock(g) if g.is_stream() && !g.connected());
                if !waits {
                    self.announce(port);
                }
            }
            Command::AttachSlot {
                slot,
                key,
                socket,
                vni,
            } => self.attach_slot(slot, key, *socket, vni),
            Command::Export { name, to, reply } => {
                let v = self.export(&name);
                if let Some(v) = &v {
                    self.team.set_home(v.vni(), to);
                }
                let _ = reply.send(v.map(Box::new));
            }
            Command::Import { violin, reply } => {
                let _ = reply.send(self.import(*violin));
            }
            Command::DetachSlot { slot, reply } => {
                let _ = reply.send(self.detach_slot(slot));
            }
            Command::AttachOwnSocket { vni, socket } => self.attach_own(vni, socket),
            Command::DetachOwnSocket { vni } => self.detach_own(vni),
            Command::OpenUnderlay => self.open_underlay(),
            Command::Homes(h) => self.team.homes = h,
            Command::Neighbours(n) => {
                if let Some(xsk) = self.underlay.xsk() {
                    xsk.set_neighbours(n);
                }
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::Busy { reply } => {
                let _ = reply.send(self.fabric.switch.busy().collect());
            }
            Command::Monitor {
                id,
                vni,
                rate,
                events,
                reply,
            } => {
                let now = self.now();
                let r = if self.fabric.switch.slot_of_vni(vni).is_none() {
                    Subscribed::NotHere
                } else if self.fabric.monitor.subscribe(id, vni, rate, events, now) {
                    Subscribed::Yes
                } else {
                    Subscribed::Full
                };
                let _ = reply.send(r);
            }
            Command::Unmonitor { id } => {
                self.fabric.monitor.unsubscribe(id);
            }
            Command::Stop { .. } => unreachable!("handled by apply_commands"),
        }
    }

    fn open_underlay(&mut self) {
        let udp = self.underlay.udp();
        let mut stale = 0u64;
        let fds =
            std::iter::once(udp.fd()).chain(self.own.iter().flatten().map(|(_, s)| s.as_raw_fd()));
        for fd in fds {
            while let Ok(n @ 1..) = udp.recv_on(fd, |_| {}) {
                stale += n as u64;
            }
        }
        if stale > 0 {
            info!(
                datagrams = stale,
                "discarded what the underlay sockets queued before this host was ready"
            );
        }
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut SourceFd(&udp.fd()), UNDERLAY, Interest::READABLE)
        {
            warn!("registering the underlay socket: {e}");
        }
        self.open = true;
        for i in 0..self.own.len() {
            self.register_own(i);
        }
    }

    /// Reads Violin `vni`'s own socket from now on (once the underlay is open).
    fn attach_own(&mut self, vni: u32, socket: std::net::UdpSocket) {
        if self.own.iter().flatten().any(|(v, _)| *v == vni) {
            warn!(
                vni,
                "a second underlay socket for one Violin; the first is kept"
            );
            return;
        }
        let i = match self.own.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.own.push(None);
                self.own.len() - 1
            }
        };
        self.own[i] = Some((vni, socket));
        self.busy_poll.invalidate();
        self.drr.reserve(own_class(i), 1);
        if self.open {
            self.register_own(i);
        }
    }

    fn register_own(&mut self, i: usize) {
        let Some((vni, s)) = &self.own[i] else {
            return;
        };
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&s.as_raw_fd()),
            Token(OWN_BASE + i),
            Interest::READABLE,
        ) {
            warn!(vni, "registering a Violin's underlay socket: {e}");
        }
        // Datagrams may have arrived since the kernel steered them here.
        self.drr.ready(own_class(i), Token(OWN_BASE + i));
    }

    /// Stops reading Violin `vni`'s own socket, and closes it.
    fn detach_own(&mut self, vni: u32) {
        drop(self.take_own(vni));
    }

    /// Stops reading Violin `vni`'s own socket and returns it.
    fn take_own(&mut self, vni: u32) -> Option<std::net::UdpSocket> {
        let i = self
            .own
            .iter()
            .position(|o| o.as_ref().is_some_and(|(v, _)| *v == vni))?;
        let (_, s) = self.own[i].take()?;
        self.busy_poll.invalidate();
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&s.as_raw_fd()));
        self.drr.forget(Token(OWN_BASE + i));
        Some(s)
    }

    /// The switch slot of the Violin whose socket `t` is (`None`: a socket shared by
    /// every Violin), to charge it the time its frames took.
    fn violin_of(&self, t: Token) -> Option<usize> {
        let sw = &self.fabric.switch;
        match t {
            Token(n) if n >= OWN_BASE => sw.slot_of_vni(self.own.get(n - OWN_BASE)?.as_ref()?.0),
            Token(n) if n >= XSK_BASE => {
                let (slot, _) = self.xsks.get(n - XSK_BASE)?.as_ref()?;
                sw.slot_of_vni((*self.slot_vni.get(*slot)?)?)
            }
            Token(n) if n >= PORT_BASE => sw.violin_of_port(port_of(n)),
            _ => None,
        }
    }

    /// Takes Violin `name` off this worker whole ([`Command::Export`]).
    fn export(&mut self, name: &str) -> Option<MovingViolin> {
        self.fabric.switch.violin(name)?;
        // What other workers handed here before the move is switched here first, and
        // written out: frames handed here later are passed on ([`Team::pass_on`]).
        self.handoff_rx(&mut Budget::new(usize::MAX, u64::MAX));
        self.shared.runs.clear();
        self.end_port_rounds(false);
        self.team.wake();
        let (table, ports) = self.fabric.switch.take_violin(name)?;
        let vni = table.vni();
        let ports = ports
            .into_iter()
            .filter_map(|(m, p)| Some((m, self.detach(p)?)))
            .collect();
        let mut slots = Vec::new();
        for slot in 0..self.slot_vni.len() {
            if self.slot_vni[slot] == Some(vni) {
                let taken = self.take_slot(slot).into_iter();
                slots.extend(taken.map(|(key, socket)| (slot, key, socket)));
            }
        }
        let own = self.take_own(vni);
        let monitors = self.fabric.monitor.take(vni);
        Some(MovingViolin {
            table,
            ports,
            slots,
            own,
            monitors,
        })
    }

    /// Puts a Violin another worker exported here ([`Command::Import`]); its sockets
    /// are read from the next round on, with what queued in them meanwhile.
    fn import(&mut self, v: MovingViolin) -> Imported {
        let MovingViolin {
            table,
            ports,
            slots,
            own,
            monitors,
        } = v;
        let vni = table.vni();
        let numbered = match self.fabric.switch.put_violin(table) {
            Ok(n) => n,
            Err((e, table)) => {
                let back = MovingViolin {
                    table,
                    ports,
                    slots,
                    own,
                    monitors,
                };
                return Err((e, Box::new(back)));
            }
        };
        for (m, port) in ports {
            if let Some(&(_, p)) = numbered.iter().find(|(i, _)| *i == m) {
                self.attach(p, port);
            }
        }
        for (slot, key, socket) in slots {
            self.attach_slot(slot, key, socket, Some(vni));
        }
        if let Some(s) = own {
            self.attach_own(vni, s);
        }
        self.fabric.monitor.adopt(monitors);
        self.team.set_home(vni, self.team.index);
        let t = &self.team;
        Ok(numbered
            .into_iter()
            .map(|(m, p)| (m, t.global(p)))
            .collect())
    }

    fn port_mut(&mut self, p: PortId) -> Option<&mut WPort> {
        self.fabric
            .ports
            .get_mut(p as usize)
            .and_then(Option::as_mut)
    }

    fn attach(&mut self, id: PortId, port: Port) {
        let i = id as usize;
        if self.fabric.ports.len() <= i {
            self.fabric.ports.resize_with(i + 1, || None);
        }
        if let Some(old) = self.detach(id) {
            warn!(
                port = id,
                "a port was attached twice; the older transport is closed"
            );
            drop(old);
        }
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&port.socket_fd()),
            port_token(id),
            Interest::READABLE,
        ) {
            warn!(port = id, "registering a guest port: {e}");
        }
        // A stream port that moved here with its Violin is connected already.
        let conn = port.conn_fd();
        if let Some(fd) = conn {
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut SourceFd(&fd), conn_token(id), interest)
            {
                warn!(port = id, "registering a guest connection: {e}");
            }
        }
        self.fabric.ports[i] = Some(WPort {
            port,
            announce: None,
        });
        self.busy_poll.invalidate();
        if let Some(v) = self.fabric.switch.violin_of_port(id) {
            self.drr.reserve(port_class(v), 2 * self.fabric.ports.len());
        }
        // A dgram or fast port may already hold frames, a connection too.
        self.port_ready(id, port_token(id));
        if conn.is_some() {
            self.port_ready(id, conn_token(id));
        }
    }

    fn detach(&mut self, id: PortId) -> Option<Port> {
        let wp = self.fabric.ports.get_mut(id as usize)?.take()?;
        self.busy_poll.invalidate();
        for t in [port_token(id), conn_token(id)] {
            self.drr.forget(t);
            self.held.retain(|(_, h)| *h != t);
        }
        let reg = self.poll.registry();
        let _ = reg.deregister(&mut SourceFd(&wp.port.socket_fd()));
        if let Some(fd) = wp.port.conn_fd() {
            let _ = reg.deregister(&mut SourceFd(&fd));
        }
        Some(wp.port)
    }

    fn detach_all(&mut self) -> Vec<Port> {
        (0..self.fabric.ports.len() as PortId)
            .filter_map(|p| self.detach(p))
            .collect()
    }

    fn attach_slot(&mut self, slot: usize, key: usize, socket: Slot, vni: Option<u32>) {
        if self.slot_vni.len() <= slot {
            self.slot_vni.resize(slot + 1, None);
        }
        self.slot_vni[slot] = vni;
        let fd = socket.fd();
        if self.xsks.len() <= key {
            self.xsks.resize_with(key + 1, || None);
        }
        if self.xsks[key].is_some() {
            warn!(
                slot,
                key, "an AF_XDP socket for a key this worker reads already"
            );
            return;
        }
        self.xsks[key] = Some((slot, socket));
        self.busy_poll.invalidate();
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(XSK_BASE + key),
            Interest::READABLE,
        ) {
            warn!(slot, "registering an AF_XDP socket: {e}");
        }
        // Frames may have arrived between the bind and now.
        let sockets = self
            .xsks
            .iter()
            .flatten()
            .filter(|(s, _)| *s == slot)
            .count();
        self.drr.reserve(xsk_class(slot), sockets);
        self.drr.ready(xsk_class(slot), Token(XSK_BASE + key));
    }

    /// Stops reading `slot`'s sockets after giving back the frames in their RX rings,
    /// and returns them (to be closed off the worker). The classifier stops
    /// redirecting to them first.
    fn detach_slot(&mut self, slot: usize) -> Vec<Slot> {
        let mut gone = self.take_slot(slot);
        for (_, socket) in &mut gone {
            socket.drain(&mut self.xsk_reads.counters);
        }
        gone.into_iter().map(|(_, socket)| socket).collect()
    }

    /// Stops reading `slot`'s sockets (frames stay in their RX rings) and returns
    /// them by XskMap key.
    fn take_slot(&mut self, slot: usize) -> Vec<(usize, Slot)> {
        if let Some(v) = self.slot_vni.get_mut(slot) {
            *v = None;
        }
        let mut taken = Vec::new();
        for (key, entry) in self.xsks.iter_mut().enumerate() {
            let Some((_, socket)) = entry.take_if(|(s, _)| *s == slot) else {
                continue;
            };
            let _ = self.poll.registry().deregister(&mut SourceFd(&socket.fd()));
            self.drr.forget(Token(XSK_BASE + key));
            taken.push((key, socket));
        }
        self.busy_poll.invalidate();
        taken
    }

    fn snapshot(&mut self) -> Counters {
        let sw = &self.fabric.switch;
        let violins: Vec<ViolinStats> = sw.violins().filter_map(|v| sw.stats(&v.name)).collect();
        let ports: BTreeMap<PortId, PortSnapshot> = self
            .fabric
            .ports
            .iter()
            .enumerate()
            .filter_map(|(i, wp)| {
                let wp = wp.as_ref()?;
                Some((
                    self.team.global(i as PortId),
                    PortSnapshot {
                        counters: wp.port.counters(),
                        connected: wp.port.connected(),
                        describe: wp.port.describe(),
                    },
                ))
            })
            .collect();
        let host_drops = sw.host_drops();
        let mut slots: BTreeMap<usize, SlotStats> = BTreeMap::new();
        for (slot, socket) in self.xsks.iter().flatten() {
            if let Some(st) = socket.stats() {
                add_slot(&mut slots, *slot, st);
            }
        }
        let reads = self.xsk_reads;
        let own = self.underlay.xsk().map(|x| x.stats());
        let rings = match own {
            Some(x) => Some(x.plus(&reads)),
            None if self.xsks.iter().any(Option::is_some) || reads.counters.rx_frames > 0 => {
                Some(reads)
            }
            None => None,
        };
        let me = WorkerStats {
            index: self.team.index,
            violins: violins.len(),
            ports: ports.len(),
            udp_rx_frames: self.udp_rx_frames,
            xsk_rx_frames: rings.map_or(0, |r| r.counters.rx_frames),
            xsk_tx_frames: own.map_or(0, |x| x.counters.tx_frames),
            udp_tx_frames: self.underlay.udp().sent_frames(),
            udp_rx_own_frames: self.own_rx_frames,
            handed_off: self.team.handed_off,
            taken_over: self.team.taken_over,
        };
        Counters {
            violins,
            ports,
            host_drops,
            udp_rx_frames: self.udp_rx_frames,
            rings,
            slots,
            workers: vec![me],
        }
    }

    /// Notes what a poll event says: a socket to read (served fairly, later in the
    /// round), a stream connection to accept or flush now, the timer.
    fn on_event(&mut self, t: Token, readable: bool, writable: bool) {
        match t {
            UNDERLAY => self.drr.ready(HOST_CLASS, UNDERLAY),
            // Commands were applied at the top of the loop; frames handed over are
            // switched in the round, so what they produce is flushed before the next poll.
            WAKER | HANDOFF if self.team.count > 1 => self.drr.ready(HOST_CLASS, HANDOFF),
            TIMER => self.timer.expired(),
            Token(n) if n >= OWN_BASE => self.drr.ready(own_class(n - OWN_BASE), t),
            Token(n) if n >= XSK_BASE => {
                if let Some(Some((slot, _))) = self.xsks.get(n - XSK_BASE) {
                    self.drr.ready(xsk_class(*slot), t);
                }
            }
            Token(n) if n >= PORT_BASE => {
                let p = port_of(n);
                if (n - PORT_BASE).is_multiple_of(2) {
                    self.port_accept_or_ready(p);
                } else {
                    if writable {
                        if let Some(wp) = self.port_mut(p) {
                            let _ = wp.port.flush();
                        }
                    }
                    if readable {
                        self.port_ready(p, t);
                    }
                }
            }
            _ => {}
        }
    }

    /// Marks guest port `p`'s socket `t` as having frames, unless its guest is held
    /// back (the timer brings it back).
    fn port_ready(&mut self, p: PortId, t: Token) {
        if self.held.iter().any(|(_, h)| *h == t) {
            return;
        }
        match self.fabric.switch.violin_of_port(p) {
            Some(v) => self.drr.ready(port_class(v), t),
            // A port being removed: read (and count) what it holds.
            None => self.drr.ready(HOST_CLASS, t),
        }
    }

    /// Releases what capped links queued and is due, and resumes held-back guests
    /// whose cap has refilled.
    fn due(&mut self) {
        let now = self.now();
        if self.release_at.is_some_and(|t| t <= now) {
            self.release_at = self.fabric.release(now, &mut self.underlay);
        }
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].0 <= now {
                let (_, t) = self.held.swap_remove(i);
                if let Token(n @ PORT_BASE..) = t {
                    let p = port_of(n);
                    if let Some(v) = self.fabric.switch.violin_of_port(p) {
                        self.drr.ready(port_class(v), t);
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    /// Arms the timer for the earliest release or refill (or disarms it).
    fn arm_timer(&mut self) {
        // Frames queued during this round may be due before what was due so far.
        self.release_at = self.fabric.switch.next_release(self.now());
        let refill = self.held.iter().map(|(t, _)| *t).min();
        let at = match (self.release_at, refill) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Err(e) = self.timer.set(at) {
            warn!("arming the worker's timer: {e}");
        }
    }

    /// Reads socket `t` for up to `bytes` (the fair service's budget for it).
    fn serve(&mut self, t: Token, bytes: u64) -> Served {
        let mut budget = Budget::new(BUDGET, bytes);
        let more = match t {
            UNDERLAY => self.underlay_rx(None, &mut budget),
            HANDOFF => self.handoff_rx(&mut budget),
            Token(n) if n >= OWN_BASE => self.underlay_rx(Some(n - OWN_BASE), &mut budget),
            Token(n) if n >= XSK_BASE => self.xsk_rx(n - XSK_BASE, &mut budget),
            Token(n) if n >= PORT_BASE => {
                let p = port_of(n);
                return self.port_rx(p, t, bytes);
            }
            _ => false,
        };
        Served {
            bytes: bytes.saturating_sub(budget.bytes),
            more,
        }
    }

    // --- the per-packet path ------------------------------------------------------------

    /// Reads the underlay's UDP socket, or the worker's `own`th Violin socket, within
    /// `budget`; true if it may hold more.
    fn underlay_rx(&mut self, own: Option<usize>, budget: &mut Budget) -> bool {
        let now = self.now();
        let Worker {
            fabric,
            underlay,
            udp_rx_frames,
            own_rx_frames,
            own: owned,
            team,
            shared,
            ..
        } = self;
        let udp = underlay.udp();
        let fd = match own {
            None => udp.fd(),
            Some(i) => match owned.get(i) {
                Some(Some((_, s))) => s.as_raw_fd(),
                _ => return false,
            },
        };
        let from_own = u64::from(own.is_some());
        while budget.left() {
            let r = udp.recv_on(fd, |r| match r {
                Received::Frame(src, vx, inner) => {
                    *udp_rx_frames += 1;
                    *own_rx_frames += from_own;
                    budget.spend(inner.len());
                    if own.is_none() {
                        shared.add(vx.vni, inner.len());
                    }
                    // Handed over only if the kernel did not steer by VNI (bind_group).
                    fabric.tunnel_in(team, src, vx, inner, now, udp);
                }
                Received::Bad(v) => fabric.switch.count_host_drop(v),
            });
            match r {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) => {
                    warn!("underlay receive: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Reads the AF_XDP socket with XskMap key `key` within `budget`; true if it may
    /// hold more.
    fn xsk_rx(&mut self, key: usize, budget: &mut Budget) -> bool {
        let now = self.now();
        let Worker {
            fabric,
            underlay,
            team,
            xsks,
            xsk_reads,
            slot_vni,
            shared,
            ..
        } = self;
        let Some(Some((slot, socket))) = xsks.get_mut(key) else {
            return false;
        };
        let is_shared = slot_vni.get(*slot).copied().flatten().is_none();
        let udp = underlay.udp();
        // Tunnel → guest only (split horizon): outputs are local ports, or an
        // external member reached through the kernel's socket. A socket every Violin
        // shares carries frames of Violins that live on other workers (`tunnel_in`).
        let AfXdpStats {
            counters, rx_bad, ..
        } = xsk_reads;
        socket.rx(budget, counters, rx_bad, |src, vx, inner| {
            if is_shared {
                shared.add(vx.vni, inner.len());
            }
            fabric.tunnel_in(team, src, vx, inner, now, udp)
        })
    }

    /// Switches the frames other workers received for this worker's Violins, within
    /// `budget`; true if more may wait.
    fn handoff_rx(&mut self, budget: &mut Budget) -> bool {
        if self.team.count == 1 {
            return false;
        }
        let now = self.now();
        let Worker {
            fabric,
            underlay,
            team,
            shared,
            ..
        } = self;
        let udp = underlay.udp();
        while budget.left() {
            let Ok(h) = team.inbox.try_recv() else {
                return false;
            };
            team.taken_over += 1;
            budget.spend(usize::from(h.len));
            if h.hops < HANDOFF_HOPS && fabric.switch.slot_of_vni(h.vni).is_none() {
                if let Some(home) = team.elsewhere(h.vni) {
                    // Its Violin moved on since the frame was handed here.
                    if let Err(v) = team.pass_on(home, h) {
                        fabric.switch.count_host_drop(v);
                    }
                    continue;
                }
            }
            shared.add(h.vni, usize::from(h.len));
            let ingress = Ingress::Tunnel {
                src: h.src,
                vni: h.vni,
            };
            fabric.switch_and_deliver(ingress, &h.frame[..h.len as usize], None, now, udp);
        }
        true
    }

    /// Reads guest port `p` (socket `t`) for up to `bytes`, and no further than its
    /// guest's cap allows: a guest in debt is held back until its bucket refills.
    fn port_rx(&mut self, p: PortId, t: Token, bytes: u64) -> Served {
        let idle = Served {
            bytes: 0,
            more: false,
        };
        if self.underlay.congested() {
            // Back-pressure: read this guest again once the TX path has drained.
            return Served {
                bytes: 0,
                more: true,
            };
        }
        let now = self.now();
        let mut budget = Budget::new(BUDGET, bytes);
        match self.fabric.switch.allowance(p, now) {
            Allowance::Free => {}
            Allowance::Upto { frames, bytes } => {
                budget.frames = budget.frames.min(frames.min(usize::MAX as u64) as usize);
                budget.bytes = budget.bytes.min(bytes);
            }
            Allowance::HeldUntil(at) => {
                self.held.push((at, t));
                return idle;
            }
        }
        let Some(mut wp) = self.fabric.ports.get_mut(p as usize).and_then(Option::take) else {
            return idle;
        };
        let given = budget;
        let Worker {
            fabric,
            underlay,
            scratch,
            ..
        } = self;
        let mut on_event = |ev: RxEvent<'_>| match ev {
            RxEvent::Frame(f) => {
                fabric.switch_and_deliver(Ingress::Port(p), f, None, now, &mut *underlay)
            }
            RxEvent::Super(f, g) => {
                fabric.switch_and_deliver(Ingress::Port(p), f, Some(&g), now, &mut *underlay)
            }
            RxEvent::Drop(v) => fabric.switch.count_port_drop(p, v),
        };
        let r = match &mut wp.port {
            Port::Sock(g) => g.receive(scratch, &mut budget, on_event),
            Port::Xdp(x) => Ok(x.receive(&mut budget, |f| on_event(RxEvent::Frame(f)))),
            Port::Tap(t) => t.receive(scratch, &mut budget, on_event),
        };
        let used = given.bytes.saturating_sub(budget.bytes);
        let more = match r {
            Ok(more) => more,
            Err(e) => {
                info!(port = p, socket = %wp.port.describe(), "guest disconnected: {e}");
                if let Some(fd) = wp.port.conn_fd() {
                    let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                }
                if let Port::Sock(g) = &mut wp.port {
                    g.disconnect();
                }
                false
            }
        };
        self.fabric.ports[p as usize] = Some(wp);
        Served { bytes: used, more }
    }

    /// A guest port's socket polled readable: a stream port's listener accepts its
    /// guest (now: control of the connection, not frames), any other has frames.
    fn port_accept_or_ready(&mut self, p: PortId) {
        let Some(wp) = self
            .fabric
            .ports
            .get_mut(p as usize)
            .and_then(Option::as_mut)
        else {
            return;
        };
        let Port::Sock(g) = &mut wp.port else {
            return self.port_ready(p, port_token(p));
        };
        if !g.is_stream() {
            // dgram: the socket itself carries the frames.
            return self.port_ready(p, port_token(p));
        }
        match g.accept() {
            Ok((_, true)) => {
                if let Some(fd) = g.conn_fd() {
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut SourceFd(&fd), conn_token(p), interest)
                    {
                        warn!("registering a guest connection: {e}");
                    }
                }
                info!(port = p, socket = %g.path().display(), "guest connected");
                self.announce(p);
                self.port_ready(p, conn_token(p));
            }
            Ok((_, false)) => {}
            Err(e) => warn!("accept on a guest socket: {e}"),
        }
    }

    /// Sends the pending gratuitous ARP of port `p` through the switch, as if the
    /// guest had sent it.
    fn announce(&mut self, p: PortId) {
        let Some((mac, ip)) = self.port_mut(p).and_then(|wp| wp.announce.take()) else {
            return;
        };
        let mut garp = [0u8; arp::GRATUITOUS_LEN];
        arp::emit_gratuitous(&mut garp, mac, ip);
        let now = self.now();
        self.fabric
            .switch_and_deliver(Ingress::Port(p), &garp, None, now, &mut self.underlay);
        info!(%ip, %mac, "gratuitous ARP sent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fastpath::encap;
    use crate::datapath::transport::udp::UdpUnderlay;
    use std::os::unix::thread::JoinHandleExt;

    /// CPU time a thread has used.
    fn cpu_of(t: &std::thread::JoinHandle<()>) -> Duration {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: the thread is alive (its handle is held and it only returns when
        // stopped); `clock` is a valid out-pointer.
        assert_eq!(
            unsafe { libc::pthread_getcpuclockid(t.as_pthread_t(), &mut clock) },
            0
        );
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer; `clock` names a live thread's clock.
        assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// A worker (spinning `spin` after work) on a loopback socket: its thread, the
    /// handle that stops it, and its port.
    fn worker(spin: Duration) -> (std::thread::JoinHandle<()>, Workers, u16) {
        let u = UdpUnderlay::bind_group(Ipv4Addr::LOCALHOST, 0, 1).unwrap();
        let port = u[0].port();
        let (mut team, handles) =
            Worker::team(u.into_iter().map(Underlay::Udp).collect(), None).unwrap();
        let mut w = team.pop().unwrap();
        // Other tests share the CPUs: the window is what this checks, not sharing.
        w.set_spin(Spin::new(spin).regardless_of_sharing());
        handles.send_all(|| Command::OpenUnderlay).unwrap();
        (std::thread::spawn(move || w.run()), handles, port)
    }

    fn stop(t: std::thread::JoinHandle<()>, h: Workers) {
        let _ = h.send_all(|| Command::Stop {
            reply: oneshot::channel().0,
        });
        t.join().unwrap();
    }

    /// The VNIs waiting on worker `w`'s underlay socket.
    fn received_vnis(w: &mut Worker) -> Vec<u32> {
        let mut got = Vec::new();
        while w
            .underlay
            .udp()
            .recv(|r| {
                if let Received::Frame(_, vx, _) = r {
                    got.push(vx.vni)
                }
            })
            .unwrap()
            > 0
        {}
        got.sort();
        got
    }

    #[test]
    fn violins_go_to_the_least_loaded_worker_and_the_kernel_follows() {
        let u = UdpUnderlay::bind_group(Ipv4Addr::LOCALHOST, 0, 3).unwrap();
        let port = u[0].port();
        let (mut team, workers) =
            Worker::team(u.into_iter().map(Underlay::Udp).collect(), None).unwrap();
        // 3, 6, 9 and 12 are all 0 mod 3.
        assert_eq!(workers.place(3, [].into_iter()), 0);
        assert_eq!(workers.place(6, [3].into_iter()), 1);
        assert_eq!(workers.place(9, [3, 6].into_iter()), 2);
        // All equal: VNI mod n.
        assert_eq!(workers.place(12, [3, 6, 9].into_iter()), 0);
        assert_eq!(workers.place(6, [3, 9, 12].into_iter()), 1, "kept");
        // A Violin placed by `VNI mod n` before (none placed) counts where it lives.
        assert_eq!(workers.home(7), 1);
        assert_eq!(workers.home(6), 1);

        let send_all = |vnis: &[u32]| {
            let s = std::net::UdpSocket::bind("127.0.0.3:0").unwrap();
            for &vni in vnis {
                let d = [&encap::header(vni)[..], b"inner frame"].concat();
                s.send_to(&d, (Ipv4Addr::LOCALHOST, port)).unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        send_all(&[3, 6, 9, 12, 7, 8]);
        let got: Vec<Vec<u32>> = team.iter_mut().map(received_vnis).collect();
        assert_eq!(got, [vec![3, 12], vec![6, 7], vec![8, 9]]);
        // Every worker knows, for frames the kernel could not steer.
        for w in &mut team {
            assert!(w.apply_commands());
        }
        assert_eq!(team[0].team.elsewhere(6), Some(1));
        assert_eq!(team[0].team.elsewhere(9), Some(2));
        assert_eq!(team[1].team.elsewhere(3), Some(0), "3 lives on 0 = 3 mod 3");
        assert_eq!(team[0].team.elsewhere(3), None);

        // Gone: back to VNI mod n, in the kernel and in the workers.
        workers.unplace(6);
        assert_eq!(workers.home(6), 0);
        send_all(&[6, 9]);
        let got: Vec<Vec<u32>> = team.iter_mut().map(received_vnis).collect();
        assert_eq!(got, [vec![6], vec![], vec![9]]);
        for w in &mut team {
            assert!(w.apply_commands());
        }
        assert_eq!(team[0].team.elsewhere(6), None);
        assert_eq!(team[1].team.elsewhere(6), Some(0));
    }

    fn answer<T>(mut rx: oneshot::Receiver<T>) -> T {
        rx.try_recv()
            .expect("the worker answered while applying the command")
    }

    /// Violin "blue" (VNI 100, so at home on worker 0 of 2): guest a on h1 (this
    /// host, 127.0.0.1) and `more` guests (name, host) on `hosts`, linked to a.
    fn blue(more: &[(&str, &str)], hosts: &[(&str, Ipv4Addr)]) -> Violin {
        let guest = |ip: usize, (n, h): &(&str, &str)| {
            format!("[[guest]]\nname = '{n}'\nhost = '{h}'\nip = '10.0.0.{ip}/24'\n")
        };
        let mut text = "name = 'blue'\nvni = 100\n".to_string() + &guest(1, &("a", "h1"));
        for (i, g) in more.iter().enumerate() {
            text += &guest(i + 2, g);
            text += &format!("[[link]]\nbetween = ['a', '{}']\n", g.0);
        }
        let hosts = std::iter::once(("h1".to_string(), Ipv4Addr::LOCALHOST))
            .chain(hosts.iter().map(|(h, a)| (h.to_string(), *a)))
            .collect();
        crate::spec::parse(&text, &hosts).unwrap()
    }

    #[test]
    fn frames_handed_over_during_a_move_follow_the_violin() {
        use crate::datapath::transport::guest::{peer_path, GuestPort};
        use violin_common::wire::{EtherType, EthernetFrame, EthernetRepr};
        const H2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
        let spec = blue(&[("b", "h2")], &[("h2", H2)]);
        let mac = |n: &str| spec.members[spec.member(n).unwrap()].mac.0;
        let u = UdpUnderlay::bind_group(Ipv4Addr::LOCALHOST, 0, 2).unwrap();
        let (mut team, _workers) =
            Worker::team(u.into_iter().map(Underlay::Udp).collect(), None).unwrap();

        // The Violin lives on worker 0 (100 mod 2); guest a's port is a datagram socket.
        let (tx, rx) = oneshot::channel();
        team[0].apply(Command::Apply {
            spec: Box::new(spec.clone()),
            local_host: "h1".into(),
            reply: tx,
        });
        let up = answer(rx).unwrap();
        let (_dir, path) = crate::datapath::transport::guest::tests::tmp("handoff");
        let port = GuestPort::bind(&path, crate::spec::Framing::Dgram).unwrap();
        let guest = std::os::unix::net::UnixDatagram::bind(peer_path(&path)).unwrap();
        guest.set_nonblocking(true).unwrap();
        let id = up.0.added[0].1;
        team[0].apply(Command::AttachPort {
            id,
            port: Port::Sock(Box::new(port)),
        });

        // b → a, as worker 1 got them on the socket every Violin shares.
        let mut frame = vec![0u8; 100];
        EthernetRepr {
            src_addr: mac("b"),
            dst_addr: mac("a"),
            ethertype: EtherType(0x88b5),
        }
        .emit(&mut EthernetFrame::new_unchecked(&mut frame[..]));
        let hand = |w: &mut Worker, n: usize| {
            for _ in 0..n {
                w.team.hand_off(0, H2, 100, &frame, None).unwrap();
            }
        };
        hand(&mut team[1], 5);

        // The Violin moves to worker 1 with five frames for it in worker 0's inbox.
        let (tx, rx) = oneshot::channel();
        team[0].apply(Command::Export {
            name: "blue".into(),
            to: 1,
            reply: tx,
        });
        let moving = answer(rx).expect("exported");
        // Those five were switched on worker 0 before it let the Violin go, in order.
        let mut buf = [0u8; 256];
        let mut received = |want: usize| {
            let mut got = 0;
            while let Ok(n) = guest.recv(&mut buf) {
                assert_eq!(&buf[..n], &frame[..]);
                got += 1;
            }
            assert_eq!(got, want);
        };
        received(5);
        // A monitor asked of the old worker is told to ask again.
        let subscribe = |w: &mut Worker| {
            let (tx, rx) = oneshot::channel();
            w.apply(Command::Monitor {
                id: 1,
                vni: 100,
                rate: 10,
                events: mpsc::sync_channel(1).0,
                reply: tx,
            });
            answer(rx)
        };
        assert_eq!(subscribe(&mut team[0]), Subscribed::NotHere);
        // Worker 1 still hands the Violin's frames to 0 until it takes the Violin; 0
        // passes them on; 1, not there yet, passes them back; 0 passes them on again.
        hand(&mut team[1], 3);
        let all = || Budget::new(usize::MAX, u64::MAX);
        assert!(!team[0].handoff_rx(&mut all()));
        assert!(!team[1].handoff_rx(&mut all()));
        assert!(!team[0].handoff_rx(&mut all()));

        let (tx, rx) = oneshot::channel();
        team[1].apply(Command::Import {
            violin: moving,
            reply: tx,
        });
        assert!(answer(rx).is_ok());
        assert_eq!(subscribe(&mut team[1]), Subscribed::Yes);
        assert!(!team[1].handoff_rx(&mut all()));
        team[1].end_port_rounds(false);

        received(3);
        for w in &mut team {
            let c = w.snapshot();
            assert_eq!(c.host_drops.get("unknown_vni"), None, "{:?}", c.host_drops);
        }
        // Homes that disagree cannot bounce a frame for ever: it is passed on at most
        // HANDOFF_HOPS times, then switched where it is (here, where the Violin is).
        team[1].team.set_home(100, 0);
        hand(&mut team[1], 1);
        for i in 0..=HANDOFF_HOPS as usize {
            assert!(!team[i % 2].handoff_rx(&mut all()));
        }
        assert!(team[0].team.inbox.try_recv().is_err());
        assert!(team[1].team.inbox.try_recv().is_err());
        team[1].end_port_rounds(false);
        received(1);
    }

    #[test]
    fn a_snapshot_waits_out_a_move() {
        let spec = blue(&[], &[]);
        let u = UdpUnderlay::bind_group(Ipv4Addr::LOCALHOST, 0, 2).unwrap();
        let (team, workers) =
            Worker::team(u.into_iter().map(Underlay::Udp).collect(), None).unwrap();
        let threads: Vec<_> = team
            .into_iter()
            .map(|w| std::thread::spawn(move || w.run()))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        workers
            .get(0)
            .ask(|reply| Command::Apply {
                spec: Box::new(spec),
                local_host: "h1".into(),
                reply,
            })
            .unwrap()
            .unwrap();
        let names = |c: Counters| c.violins.into_iter().map(|v| v.name).collect::<Vec<_>>();
        // A move: the Violin is on neither worker between the export and the import,
        // while a snapshot is asked for.
        let guard = workers.moving();
        let export = |reply| Command::Export {
            name: "blue".into(),
            to: 1,
            reply,
        };
        let moving = workers.get(0).ask(export).unwrap().unwrap();
        let w2 = workers.clone();
        let snap = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
                .block_on(w2.snapshot_async())
        });
        std::thread::sleep(Duration::from_millis(5));
        let import = |reply| Command::Import {
            violin: moving,
            reply,
        };
        assert!(workers.get(1).ask(import).unwrap().is_ok());
        drop(guard);
        assert_eq!(names(snap.join().unwrap().unwrap()), ["blue"]);
        assert_eq!(
            names(rt.block_on(workers.snapshot_async()).unwrap()),
            ["blue"]
        );
        let _ = workers.send_all(|| Command::Stop {
            reply: oneshot::channel().0,
        });
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn one_worker_places_nothing() {
        let u = UdpUnderlay::bind_group(Ipv4Addr::LOCALHOST, 0, 1).unwrap();
        let (mut team, workers) =
            Worker::team(u.into_iter().map(Underlay::Udp).collect(), None).unwrap();
        assert_eq!(workers.place(5, [1, 2].into_iter()), 0);
        assert!(team[0].apply_commands());
        assert!(team[0].team.homes.is_empty());
    }

    #[test]
    fn spins_for_its_window_after_work_only() {
        let never = || -> u64 { panic!("switches read outside a window") };
        assert!(!Spin::new(Duration::ZERO).spin(5, never));
        let mut s = Spin::new(Duration::from_micros(200));
        assert!(!s.spin(1_000_000, never), "no work yet");
        s.worked(1_000_000);
        assert!(s.spin(1_000_000, || 7));
        assert!(s.spin(1_199_999, || 7));
        assert!(!s.spin(1_200_000, never), "the window is over");
    }

    #[test]
    fn a_shared_cpu_stops_spinning_for_the_backoff() {
        let w = 200_000;
        let mut s = Spin::new(Duration::from_nanos(w));
        s.worked(0);
        assert!(s.spin(10, || 100));
        // The answering guest ran in between: brief, keep spinning.
        assert!(s.spin(20, || 100 + SPIN_SHARED_SWITCHES));
        // A thread that keeps wanting the CPU: stop, and stay off for the backoff,
        // new windows included.
        assert!(!s.spin(30, || 101 + SPIN_SHARED_SWITCHES));
        s.worked(50);
        assert!(!s.spin(60, || panic!("no reading while backing off")));
        s.worked(30 + SPIN_BACKOFF_NS);
        assert!(
            s.spin(30 + SPIN_BACKOFF_NS, || 500),
            "spins again after the backoff"
        );
        assert!(s.spin(40 + SPIN_BACKOFF_NS, || 500));
        // Each window counts its own switches.
        s.worked(w + 40 + SPIN_BACKOFF_NS);
        assert!(s.spin(w + 50 + SPIN_BACKOFF_NS, || 600));
        assert!(s.spin(w + 60 + SPIN_BACKOFF_NS, || 600 + SPIN_SHARED_SWITCHES));
        let mut r = Spin::new(Duration::from_nanos(w)).regardless_of_sharing();
        r.worked(0);
        assert!(r.spin(1, || 0) && r.spin(2, || 1_000_000));
    }

    #[test]
    fn a_worker_spins_only_for_its_window_after_work() {
        let (t, h, port) = worker(Duration::from_millis(50));
        let (t0, h0, port0) = worker(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(100));
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Idle: neither spins.
        let (a, a0) = (cpu_of(&t), cpu_of(&t0));
        std::thread::sleep(Duration::from_millis(200));
        let idle = cpu_of(&t) - a;
        assert!(idle < Duration::from_millis(5), "idle worker used {idle:?}");
        assert!(cpu_of(&t0) - a0 < Duration::from_millis(5));
        // A datagram (not VXLAN: dropped and counted) is work: the spinning worker
        // polls for its window, then sleeps again; the other goes back to sleep at once.
        s.send_to(b"not vxlan", ("127.0.0.1", port)).unwrap();
        s.send_to(b"not vxlan", ("127.0.0.1", port0)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let (spun, slept) = (cpu_of(&t) - a - idle, cpu_of(&t0) - a0);
        assert!(
            spun > Duration::from_millis(2) && spun < Duration::from_millis(150),
            "a 50 ms window cost {spun:?}"
        );
        assert!(slept < Duration::from_millis(5), "no window, yet {slept:?}");
        let b = cpu_of(&t);
        std::thread::sleep(Duration::from_millis(200));
        assert!(cpu_of(&t) - b < Duration::from_millis(5), "still spinning");
        stop(t, h);
        stop(t0, h0);
    }
}
