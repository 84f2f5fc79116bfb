//! The per-Violin switch: given a frame and where it came from, decide where it goes.
//!
//! It knows nothing of transports: a frame enters from a guest port (`Ingress::Port`) or
//! from the underlay (`Ingress::Tunnel`, already decapsulated) and leaves as a list of
//! `Egress` (a port, or a tunnel to a host). UNIX sockets, UDP and AF_XDP only move
//! bytes around it. For each frame, in order:
//!
//! 1. length and source checks — a guest may send only with its own MAC; a tunnel peer
//!    only for members that live behind its underlay address;
//! 2. destination lookup — unicast to a known member, or flood (broadcast, multicast,
//!    unknown unicast) to every member the topology allows, one copy per remote host;
//! 3. topology — the (source, destination) pair must be an allowed link;
//! 4. rate caps — only where the sender is local (its own host caps it) or an external
//!    VTEP (capped where its frames arrive). The sender's guest bucket: a local guest's
//!    is charged, and the worker stops reading a guest in debt ([`Switch::allowance`]),
//!    so it is held back, never dropped; an external's polices (drops over the rate).
//!    Then the link's (per direction): a capped link shapes, through a queue released
//!    at its rate ([`LinkShaper`], [`Switch::release`]), dropping only when it is full;
//! 5. counting — per-edge packets/bytes on the sending side, drops by `Verdict`.
//!
//! No allocation, locking or logging per frame: tables are built when a Violin is added.

use super::pairs::PairTable;
use super::police::Policer;
use super::shape::{LinkShaper, Offer};
use crate::datapath::FastMap;
use crate::spec::{IpNet, Member, MemberKind, Rate, Violin};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use violin_common::wire::gso::Gso;
use violin_common::wire::{ArpPacket, EtherType, EthernetAddress, EthernetFrame, Ipv4Packet};
use violin_common::Verdict;

/// A guest port's index, unique on this host.
pub type PortId = u32;

/// Where a frame entered the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// From a local guest's port.
    Port(PortId),
    /// Decapsulated from the underlay: outer source address and VNI.
    Tunnel { src: Ipv4Addr, vni: u32 },
}

/// Where a frame leaves the switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    Port(PortId),
    /// Encapsulate with this VNI and send to this underlay address: another Violin
    /// daemon (`peer`), or an external VTEP.
    Tunnel {
        dst: Ipv4Addr,
        vni: u32,
        peer: bool,
    },
}

/// Most learned MACs one Violin keeps for its external members.
pub const MAX_LEARNED: usize = 256;
/// A learned MAC idle this long gives its place to a new one when the table is full
/// (the Linux bridge's default ageing time).
pub const LEARNED_AGE_NS: u64 = 300_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Location {
    Local(PortId),
    /// A guest on another host (index into `ViolinTable::hosts`).
    Remote(usize),
    /// A foreign VTEP at this underlay address.
    External(Ipv4Addr),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    #[inline]
    fn add(&mut self, size: Size) {
        self.packets += u64::from(size.frames);
        self.bytes += size.bytes as u64;
    }
}

/// What one switched frame stands for on the wire: a plain frame is one frame of its
/// length; a super-frame is the segments it becomes (their count, their bytes, and the
/// longest, which is what the Violin's largest frame bounds). Policing and counters
/// charge these, so a guest that sends super-frames pays what its segments cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub frames: u32,
    pub bytes: usize,
    pub largest: usize,
}

impl Size {
    pub fn plain(len: usize) -> Size {
        Size {
            frames: 1,
            bytes: len,
            largest: len,
        }
    }
    pub fn of(frame: &[u8], gso: Option<&Gso>) -> Size {
        match gso {
            None => Size::plain(frame.len()),
            Some(g) => Size {
                frames: g.segments(frame.len()) as u32,
                bytes: g.wire_len(frame.len()),
                largest: g.largest(frame.len()),
            },
        }
    }
}

/// A frame offered to the switch: its bytes, its GSO layout if it is a super-frame, and
/// what it is on the wire.
pub struct Offered<'a> {
    pub frame: &'a [u8],
    pub gso: Option<&'a Gso>,
    pub size: Size,
}

/// Drop counters indexed by `Verdict`.
pub type Drops = [u64; Verdict::COUNT];

/// One Violin's tables on this host.
pub struct ViolinTable {
    spec: Violin,
    max_frame: usize,
    loc: Vec<Location>,
    macs: FastMap<EthernetAddress, usize>,
    /// MACs learned behind external members: when each was last seen (ns).
    learned: FastMap<EthernetAddress, u64>,
    /// The linked pairs (both directions); `None` when every pair may talk.
    allowed: Option<PairTable<()>>,
    /// The capped link directions this host shapes (local senders and externals).
    shapers: Vec<Shaped>,
    /// (src, dst) → index into `shapers`.
    shaper_of: FastMap<(u32, u32), usize>,
    /// Shapers with frames queued (each once).
    backlog: Vec<usize>,
    guest_police: Vec<Option<Policer>>,
    /// Sent packets/bytes per (src, dst), counted where the sender is capped, when they
    /// leave (a frame a capped link queued counts once it is released). Only pairs
    /// that sent something (or are linked) are in it.
    edges: PairTable<Counter>,
    /// What was sent while `edges` had no room for a new pair (until the worker made
    /// room between batches).
    unrecorded: Counter,
    drops: Drops,
    /// Underlay addresses of the other hosts with guests of this Violin.
    hosts: Vec<Ipv4Addr>,
    /// Flood scratch: which remote hosts already got a copy.
    host_sent: Vec<bool>,
    /// Per member: the IPv4 sources a guest may use (externals are not guarded).
    guards: Vec<Option<SourceGuard>>,
    /// Nanoseconds its worker spent serving this Violin's sockets (the worker adds
    /// them: [`Switch::charge`]).
    busy_ns: u64,
}

/// A Violin's whole table, off one worker's switch on its way to another's
/// ([`Switch::take_violin`], [`Switch::put_violin`]): counters, buckets, learned MACs,
/// shapers and the frames they queued go with it; only its ports are numbered anew.
pub struct Moving(Box<ViolinTable>);

impl Moving {
    pub fn vni(&self) -> u32 {
        self.0.spec.vni
    }
    pub fn name(&self) -> &str {
        &self.0.spec.name
    }
}

/// One shaped direction of a capped link.
#[derive(Debug)]
struct Shaped {
    s: usize,
    d: usize,
    rate: Rate,
    shaper: LinkShaper,
}

/// How much a port may send now, by its guest's cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    /// No cap on this guest.
    Free,
    /// Up to this many frames and bytes (one frame may overshoot: it goes into debt).
    Upto { frames: u64, bytes: u64 },
    /// In debt until this time (ns): do not read the port before.
    HeldUntil(u64),
}

/// The source guard of one guest: IPv4 only from its own address or its
/// `allowed_ips`, ARP only claiming those (or nothing: a probe), with its own MAC.
#[derive(Debug, Clone)]
struct SourceGuard {
    ip: Ipv4Addr,
    allowed: Vec<IpNet>,
}

impl SourceGuard {
    fn permits(&self, ip: Ipv4Addr) -> bool {
        ip == self.ip || self.allowed.iter().any(|n| n.contains(ip))
    }

    /// Checks the IPv4 or ARP packet of a frame from the guest (untagged, or under
    /// one 802.1Q tag); other EtherTypes pass.
    fn check(&self, eth: &EthernetFrame<&[u8]>) -> Result<(), Verdict> {
        let (mut ethertype, mut payload) = (eth.ethertype(), eth.payload());
        if ethertype == EtherType::VLAN {
            let Some(inner) = payload.get(4..) else {
                return Err(Verdict::Truncated);
            };
            ethertype = EtherType(u16::from_be_bytes([payload[2], payload[3]]));
            payload = inner;
        }
        if ethertype == EtherType::IPV4 {
            let ip = Ipv4Packet::new_checked(payload)?;
            if !self.permits(ip.src_addr()) {
                return Err(Verdict::SpoofedIp);
            }
        } else if ethertype == EtherType::ARP {
            let arp = ArpPacket::new_checked(payload)?;
            let claim = arp.source_protocol_addr();
            if arp.source_hardware_addr() != eth.src_addr()
                || !(claim.is_unspecified() || self.permits(claim))
            {
                return Err(Verdict::SpoofedArp);
            }
        }
        Ok(())
    }
}

impl ViolinTable {
    fn n(&self) -> usize {
        self.loc.len()
    }

    #[inline]
    fn allows(&self, s: usize, d: usize) -> bool {
        self.allowed.as_ref().is_none_or(|a| a.contains(s, d))
    }

    /// Counts what `s` sent to `d` (no allocation: see [`PairTable::entry`]).
    #[inline]
    fn count_edge(&mut self, s: usize, d: usize, size: Size) {
        count_edge(&mut self.edges, &mut self.unrecorded, s, d, size)
    }

    /// Applies the caps to a frame from `s` to `d`: the guest's bucket (charged for a
    /// local guest, policed for an external), then the link's shaper. `Ok(true)`: send
    /// it now; `Ok(false)`: the link queued it.
    #[inline]
    fn cap(&mut self, s: usize, d: usize, f: &Offered, now: u64) -> Result<bool, Verdict> {
        let len = f.size;
        let local = matches!(self.loc[s], Location::Local(_));
        if let Some(g) = &mut self.guest_police[s] {
            if local {
                g.charge_n(len.frames, len.bytes, now);
            } else if !g.admit_n(len.frames, len.bytes, now) {
                return Err(Verdict::PolicedGuest);
            }
        }
        if self.shapers.is_empty() {
            return Ok(true);
        }
        let Some(&k) = self.shaper_of.get(&(s as u32, d as u32)) else {
            return Ok(true);
        };
        let shaper = &mut self.shapers[k].shaper;
        let was_empty = shaper.queued().0 == 0;
        match shaper.offer(f.frame, f.gso, len, now) {
            Offer::Send => Ok(true),
            Offer::Queued { .. } => {
                if was_empty {
                    self.backlog.push(k);
                }
                Ok(false)
            }
            Offer::Full => {
                if let Some(g) = &mut self.guest_police[s] {
                    g.refund(len.frames, len.bytes);
                }
                Err(Verdict::PolicedLink)
            }
        }
    }

    #[inline]
    fn egress_of(&self, d: usize) -> Egress {
        match self.loc[d] {
            Location::Local(p) => Egress::Port(p),
            Location::Remote(h) => Egress::Tunnel {
                dst: self.hosts[h],
                vni: self.spec.vni,
                peer: true,
            },
            Location::External(a) => Egress::Tunnel {
                dst: a,
                vni: self.spec.vni,
                peer: false,
            },
        }
    }

    fn drop(&mut self, v: Verdict) -> Verdict {
        self.drops[v as usize] += 1;
        v
    }

    /// A frame from local member `s`.
    fn rx_local(&mut self, s: usize, f: &Offered, now: u64, out: &mut Vec<Egress>) -> Verdict {
        let frame = f.frame;
        if frame.is_empty() {
            return self.drop(Verdict::ZeroLength);
        }
        if f.size.largest > self.max_frame {
            return self.drop(Verdict::Oversize);
        }
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return self.drop(Verdict::Truncated);
        };
        if eth.src_addr() != self.spec.members[s].mac.0 {
            return self.drop(Verdict::Spoofed);
        }
        if let Some(g) = &self.guards[s] {
            if let Err(v) = g.check(&eth) {
                return self.drop(v);
            }
        }
        let dst = eth.dst_addr();
        if dst.is_unicast() {
            if let Some(&d) = self.macs.get(&dst) {
                return self.unicast(s, d, f, now, out, true);
            }
        }
        self.flood(s, f, now, out, true)
    }

    /// A decapsulated frame from underlay address `src`.
    fn rx_tunnel(
        &mut self,
        src: Ipv4Addr,
        f: &Offered,
        now: u64,
        out: &mut Vec<Egress>,
    ) -> Verdict {
        let (frame, size) = (f.frame, f.size);
        let sender_host = self.hosts.iter().position(|h| *h == src);
        let sender_external = self.loc.contains(&Location::External(src));
        if sender_host.is_none() && !sender_external {
            return self.drop(Verdict::NotMember);
        }
        if size.largest > self.max_frame {
            return self.drop(Verdict::Oversize);
        }
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return self.drop(Verdict::Truncated);
        };
        let smac = eth.src_addr();
        if smac.is_multicast() {
            return self.drop(Verdict::Spoofed);
        }
        let s = match self.macs.get(&smac) {
            Some(&s) => {
                let ok = match self.loc[s] {
                    Location::Remote(h) => Some(h) == sender_host,
                    Location::External(a) => a == src,
                    Location::Local(_) => false,
                };
                // Learned MACs live behind externals: only their frames look them up.
                let learned = if sender_external {
                    self.learned.get_mut(&smac)
                } else {
                    None
                };
                match learned {
                    Some(seen) if ok => {
                        *seen = now;
                        s
                    }
                    // A learned MAC now behind another external VTEP has moved there.
                    Some(_) => match self.learn(smac, src, now) {
                        Ok(x) => x,
                        Err(v) => return self.drop(v),
                    },
                    None if ok => s,
                    None => return self.drop(Verdict::Spoofed),
                }
            }
            // An unknown MAC behind an external VTEP (e.g. a bridge behind a kernel
            // vxlan device): learn it as that member, up to a bound.
            None if sender_external => match self.learn(smac, src, now) {
                Ok(x) => x,
                Err(v) => return self.drop(v),
            },
            None => return self.drop(Verdict::Spoofed),
        };
        // Guests on other hosts were policed there; an external is policed here.
        let police_here = sender_external;
        let dst = eth.dst_addr();
        if dst.is_unicast() {
            return match self.macs.get(&dst) {
                Some(&d) if matches!(self.loc[d], Location::Local(_)) => {
                    self.unicast(s, d, f, now, out, police_here)
                }
                // Split horizon: never tunnel → tunnel. Unknown or remote: not ours.
                _ => self.drop(Verdict::NoDestination),
            };
        }
        self.flood(s, f, now, out, police_here)
    }

    /// Learns (or moves) `mac` as the external member at `src`. When the table is full,
    /// the entry idle longest gives way if it has been idle for [`LEARNED_AGE_NS`].
    fn learn(&mut self, mac: EthernetAddress, src: Ipv4Addr, now: u64) -> Result<usize, Verdict> {
        let Some(x) = self.loc.iter().position(|l| *l == Location::External(src)) else {
            return Err(Verdict::NotMember);
        };
        if !self.learned.contains_key(&mac) && self.learned.len() >= MAX_LEARNED {
            let idlest = self
                .learned
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(m, t)| (*m, *t));
            match idlest {
                Some((m, t)) if now.saturating_sub(t) >= LEARNED_AGE_NS => {
                    self.learned.remove(&m);
                    self.macs.remove(&m);
                }
                _ => return Err(Verdict::Spoofed),
            }
        }
        self.macs.insert(mac, x);
        self.learned.insert(mac, now);
        Ok(x)
    }

    fn unicast(
        &mut self,
        s: usize,
        d: usize,
        f: &Offered,
        now: u64,
        out: &mut Vec<Egress>,
        police: bool,
    ) -> Verdict {
        if s == d {
            return self.drop(Verdict::Hairpin);
        }
        if !self.allows(s, d) {
            return self.drop(Verdict::NoLink);
        }
        let mut now_out = true;
        if police {
            match self.cap(s, d, f, now) {
                Ok(go) => now_out = go,
                Err(v) => return self.drop(v),
            }
            if now_out {
                self.count_edge(s, d, f.size);
            }
        }
        if now_out {
            out.push(self.egress_of(d));
        }
        Verdict::Forward
    }

    /// Broadcast, multicast or unknown unicast from `s`. From a local sender: every
    /// allowed member, one copy per remote host. From the tunnel: local members only.
    fn flood(
        &mut self,
        s: usize,
        f: &Offered,
        now: u64,
        out: &mut Vec<Egress>,
        police: bool,
    ) -> Verdict {
        let len = f.size;
        let from_local = matches!(self.loc[s], Location::Local(_));
        let n = self.n();
        self.host_sent.iter_mut().for_each(|b| *b = false);
        let before = out.len();
        let mut queued = false;
        let mut denied = None;
        for d in 0..n {
            if d == s || !self.allows(s, d) {
                continue;
            }
            let loc = self.loc[d];
            if !from_local && !matches!(loc, Location::Local(_)) {
                continue;
            }
            if let Location::Remote(h) = loc {
                // Every allowed guest on that host gets it from the one copy; the far
                // side delivers to its own allowed members.
                if self.host_sent[h] {
                    if police {
                        self.count_edge(s, d, len);
                    }
                    continue;
                }
            }
            let mut go = true;
            if police {
                match self.cap(s, d, f, now) {
                    Ok(g) => go = g,
                    Err(v) => {
                        self.drops[v as usize] += 1;
                        denied = Some(v);
                        continue;
                    }
                }
                if go {
                    self.count_edge(s, d, len);
                }
            }
            if let Location::Remote(h) = loc {
                self.host_sent[h] = true;
            }
            if go {
                out.push(self.egress_of(d));
            } else {
                queued = true;
            }
        }
        if out.len() > before || queued {
            Verdict::Forward
        } else {
            match denied {
                Some(v) => v, // already counted per recipient
                None => self.drop(Verdict::NoDestination),
            }
        }
    }
}

/// The switch of one host: every Violin with a member here.
#[derive(Default)]
pub struct Switch {
    violins: Vec<Option<ViolinTable>>,
    by_vni: FastMap<u32, usize>,
    by_name: HashMap<String, usize>,
    /// Port → (violin slot, member index).
    ports: Vec<Option<(usize, usize)>>,
    /// Drops that belong to no Violin (unknown VNI, frames on a port being removed).
    drops: Drops,
}

/// Why a Violin could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddError {
    #[error("a Violin named {0:?} already exists on this host")]
    NameTaken(String),
    #[error("VNI {vni} is already used by Violin {by:?} on this host")]
    VniTaken { vni: u32, by: String },
    #[error("host {0:?} has no underlay address in the spec")]
    UnknownHost(String),
    #[error("no Violin named {0:?} on this host")]
    NoSuchViolin(String),
    #[error("a Violin's VNI cannot change ({from} → {to}): take it down and up again")]
    VniChange { from: u32, to: u32 },
}

/// What `Switch::update_violin` did to this host's ports, as (member index, port).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Local guests whose port (and connection) stays.
    pub kept: Vec<(usize, PortId)>,
    /// Local guests that need a new port: new, moved here, or attached differently.
    pub added: Vec<(usize, PortId)>,
    /// Ports of guests that left this host or the Violin, or are attached differently.
    pub removed: Vec<PortId>,
}

/// Whether a guest that stays local can keep its port: everything but rates the same.
fn same_attachment(a: &Member, b: &Member) -> bool {
    a.mac == b.mac && a.kind == b.kind
}

/// Moves the shapers of `old` whose link direction and rate are unchanged into `new`
/// (tokens and queued frames with them); frames queued on links that changed or went
/// away are dropped and counted (`no_link`).
fn carry_shapers(old: &mut ViolinTable, new: &mut ViolinTable) {
    for x in &mut old.shapers {
        let (from, to) = (&old.spec.members[x.s].name, &old.spec.members[x.d].name);
        let same = new
            .spec
            .member(from)
            .zip(new.spec.member(to))
            .and_then(|(s, d)| {
                let k = *new.shaper_of.get(&(s as u32, d as u32))?;
                (new.shapers[k].rate == x.rate).then_some(k)
            });
        match same {
            Some(k) => {
                std::mem::swap(&mut new.shapers[k].shaper, &mut x.shaper);
                if new.shapers[k].shaper.queued().0 > 0 {
                    new.backlog.push(k);
                }
            }
            None => {
                let lost = x.shaper.clear();
                new.drops[Verdict::NoLink as usize] += lost as u64;
            }
        }
    }
}

/// Whether `t` polices member `i`'s sending (it is local there, or an external).
fn polices_in(t: &ViolinTable, i: usize) -> bool {
    !matches!(t.loc[i], Location::Remote(_))
}

impl Switch {
    pub fn new() -> Switch {
        Switch::default()
    }

    fn alloc_port(&mut self, violin: usize, member: usize) -> PortId {
        let slot = match self.ports.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.ports.push(None);
                self.ports.len() - 1
            }
        };
        self.ports[slot] = Some((violin, member));
        slot as PortId
    }

    /// The slot a new Violin with this spec takes, unless one here has its name or VNI.
    fn room_for(&self, spec: &Violin) -> Result<usize, AddError> {
        if self.by_name.contains_key(&spec.name) {
            return Err(AddError::NameTaken(spec.name.clone()));
        }
        if let Some(&i) = self.by_vni.get(&spec.vni) {
            let by = self.violins[i]
                .as_ref()
                .map(|v| v.spec.name.clone())
                .unwrap_or_default();
            return Err(AddError::VniTaken { vni: spec.vni, by });
        }
        Ok(self
            .violins
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.violins.len()))
    }

    /// Adds a Violin as seen from host `local`. Returns the port of each local guest
    /// as (member index, port).
    pub fn add_violin(
        &mut self,
        spec: &Violin,
        local: &str,
        now: u64,
    ) -> Result<Vec<(usize, PortId)>, AddError> {
        let slot = self.room_for(spec)?;
        let mut ports = Vec::new();
        let table = self.build_table(spec, local, now, None, |sw, i| {
            let p = sw.alloc_port(slot, i);
            ports.push((i, p));
            p
        });
        let table = match table {
            Ok(t) => t,
            Err(e) => {
                for (_, p) in &ports {
                    self.ports[*p as usize] = None;
                }
                return Err(e);
            }
        };
        if slot == self.violins.len() {
            self.violins.push(Some(table));
        } else {
            self.violins[slot] = Some(table);
        }
        self.by_vni.insert(spec.vni, slot);
        self.by_name.insert(spec.name.clone(), slot);
        Ok(ports)
    }

    /// Replaces a Violin's spec in place (`violin apply`, `scale`, `migrate`). A local
    /// guest whose attachment is unchanged keeps its port, and so its connection;
    /// buckets whose rate is unchanged keep their tokens; edge and drop counters carry
    /// over by member name. Frames in flight see either the old table or the new one.
    pub fn update_violin(
        &mut self,
        spec: &Violin,
        local: &str,
        now: u64,
    ) -> Result<Update, AddError> {
        let Some(&slot) = self.by_name.get(&spec.name) else {
            return Err(AddError::NoSuchViolin(spec.name.clone()));
        };
        let mut old = self.violins[slot]
            .take()
            .expect("by_name points at a table");
        if old.spec.vni != spec.vni {
            let vni = old.spec.vni;
            self.violins[slot] = Some(old);
            return Err(AddError::VniChange {
                from: vni,
                to: spec.vni,
            });
        }
        let mut up = Update::default();
        let mut reused = vec![false; old.n()];
        let table = self.build_table(spec, local, now, Some(&old), |sw, i| {
            let m = &spec.members[i];
            let same = old.spec.member(&m.name).and_then(|j| match old.loc[j] {
                Location::Local(p) if same_attachment(&old.spec.members[j], m) => Some((j, p)),
                _ => None,
            });
            match same {
                Some((j, p)) => {
                    reused[j] = true;
                    sw.ports[p as usize] = Some((slot, i));
                    up.kept.push((i, p));
                    p
                }
                None => {
                    let p = sw.alloc_port(slot, i);
                    up.added.push((i, p));
                    p
                }
            }
        });
        let table = match table {
            Ok(t) => t,
            Err(e) => {
                for (_, p) in &up.added {
                    self.ports[*p as usize] = None;
                }
                for (j, loc) in old.loc.iter().enumerate() {
                    if let Location::Local(p) = loc {
                        self.ports[*p as usize] = Some((slot, j));
                    }
                }
                self.violins[slot] = Some(old);
                return Err(e);
            }
        };
        for (j, loc) in old.loc.iter().enumerate() {
            if let (Location::Local(p), false) = (loc, reused[j]) {
                self.ports[*p as usize] = None;
                up.removed.push(*p);
            }
        }
        let mut table = table;
        carry_shapers(&mut old, &mut table);
        self.violins[slot] = Some(table);
        Ok(up)
    }

    /// Builds the tables of `spec` as seen from host `local`; `port` gives each local
    /// member its port. With `old`, state whose configuration is unchanged carries over.
    fn build_table(
        &mut self,
        spec: &Violin,
        local: &str,
        now: u64,
        old: Option<&ViolinTable>,
        mut port: impl FnMut(&mut Switch, usize) -> PortId,
    ) -> Result<ViolinTable, AddError> {
        let n = spec.members.len();
        let mut hosts: Vec<Ipv4Addr> = Vec::new();
        let mut loc = Vec::with_capacity(n);
        for (i, m) in spec.members.iter().enumerate() {
            loc.push(match &m.kind {
                MemberKind::Guest { host, .. } if host == local => Location::Local(port(self, i)),
                MemberKind::Guest { host, .. } => {
                    let Some(addr) = spec.hosts.get(host) else {
                        return Err(AddError::UnknownHost(host.clone()));
                    };
                    let h = hosts.iter().position(|a| a == addr).unwrap_or_else(|| {
                        hosts.push(*addr);
                        hosts.len() - 1
                    });
                    Location::Remote(h)
                }
                MemberKind::External { underlay } => Location::External(*underlay),
            });
        }
        // Index in the old table of each new member, by name.
        let prev: Vec<Option<usize>> = spec
            .members
            .iter()
            .map(|m| old.and_then(|o| o.spec.member(&m.name)))
            .collect();
        let allowed = spec.links.as_ref().map(|links| {
            let mut a = PairTable::with_capacity(2 * links.len());
            for l in links {
                a.insert(l.a, l.b, ());
                a.insert(l.b, l.a, ());
            }
            a
        });
        // Buckets exist where this host caps the sender: local guests and externals.
        // Shapers start fresh; `update_violin` moves unchanged ones over, queue and all.
        let polices = |i: usize| !matches!(loc[i], Location::Remote(_));
        let mut shapers = Vec::new();
        for l in spec.links.iter().flatten() {
            let Some(rate) = &l.rate else { continue };
            for (s, d) in [(l.a, l.b), (l.b, l.a)] {
                if let (true, Some(shaper)) = (polices(s), LinkShaper::new(rate, now)) {
                    shapers.push(Shaped {
                        s,
                        d,
                        rate: *rate,
                        shaper,
                    });
                }
            }
        }
        let shaper_of = shapers
            .iter()
            .enumerate()
            .map(|(k, x)| ((x.s as u32, x.d as u32), k))
            .collect();
        let guest_police = (0..n)
            .map(|i| {
                let rate = spec.members[i].rate.as_ref().filter(|_| polices(i))?;
                let kept = old.zip(prev[i]).and_then(|(o, j)| {
                    let same = o.spec.members[j].rate.as_ref() == Some(rate) && polices_in(o, j);
                    same.then(|| o.guest_police[j].clone()).flatten()
                });
                kept.or_else(|| Policer::new(rate, now))
            })
            .collect();
        let mut macs: FastMap<EthernetAddress, usize> = spec
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.mac.0, i))
            .collect();
        // Learning never allocates on the fast path: room for every learned MAC up front
        // (only where there are externals to learn behind).
        let externals = loc.iter().any(|l| matches!(l, Location::External(_)));
        let room = if externals { MAX_LEARNED } else { 0 };
        macs.reserve(room);
        // Room for every linked pair, or a few peers per member; more is made as pairs
        // start to talk. Counts carry over for members that stay.
        let pairs = spec.links.as_ref().map_or(4 * n, |l| 2 * l.len());
        let mut edges = PairTable::with_capacity(pairs);
        let mut unrecorded = Counter::default();
        if let Some(o) = old {
            let mut now_at = vec![None; o.n()];
            for (i, p) in prev.iter().enumerate() {
                if let Some(j) = p {
                    now_at[*j] = Some(i);
                }
            }
            for (os, od, c) in o.edges.iter() {
                if let (Some(s), Some(d)) = (now_at[os], now_at[od]) {
                    edges.insert(s, d, *c);
                }
            }
            unrecorded = o.unrecorded;
        }
        let guards = spec
            .members
            .iter()
            .map(|m| match &m.kind {
                MemberKind::Guest {
                    ip, allowed_ips, ..
                } => Some(SourceGuard {
                    ip: *ip,
                    allowed: allowed_ips.clone(),
                }),
                MemberKind::External { .. } => None,
            })
            .collect();
        Ok(ViolinTable {
            guards,
            busy_ns: old.map_or(0, |o| o.busy_ns),
            max_frame: spec.max_frame(),
            spec: spec.clone(),
            host_sent: vec![false; hosts.len()],
            hosts,
            loc,
            macs,
            // MACs learned behind externals are learned again.
            learned: FastMap::with_capacity_and_hasher(room, Default::default()),
            allowed,
            backlog: Vec::with_capacity(shapers.len()),
            shapers,
            shaper_of,
            guest_police,
            edges,
            unrecorded,
            drops: old.map_or([0; Verdict::COUNT], |o| o.drops),
        })
    }

    /// The ports of a Violin's local guests.
    pub fn ports_of(&self, name: &str) -> Vec<PortId> {
        let Some(&slot) = self.by_name.get(name) else {
            return Vec::new();
        };
        (0..self.ports.len())
            .filter(|&p| matches!(self.ports[p], Some((v, _)) if v == slot))
            .map(|p| p as PortId)
            .collect()
    }

    /// Takes a Violin off this switch whole, to put it on another worker's
    /// ([`Switch::put_violin`]); its ports are freed here and returned as (member
    /// index, port).
    pub fn take_violin(&mut self, name: &str) -> Option<(Moving, Vec<(usize, PortId)>)> {
        let slot = self.by_name.remove(name)?;
        let table = self.violins[slot].take()?;
        self.by_vni.remove(&table.spec.vni);
        let mut ports = Vec::new();
        for (m, loc) in table.loc.iter().enumerate() {
            if let Location::Local(p) = loc {
                self.ports[*p as usize] = None;
                ports.push((m, *p));
            }
        }
        Some((Moving(Box::new(table)), ports))
    }

    /// Puts a Violin taken off another switch here, everything of it as it was; its
    /// local guests get ports of this switch, returned as (member index, port). Refused
    /// (and handed back) when a Violin here has its name or VNI.
    pub fn put_violin(&mut self, m: Moving) -> Result<Vec<(usize, PortId)>, (AddError, Moving)> {
        let slot = match self.room_for(&m.0.spec) {
            Ok(slot) => slot,
            Err(e) => return Err((e, m)),
        };
        let mut table = *m.0;
        let mut ports = Vec::new();
        for m in 0..table.loc.len() {
            if let Location::Local(_) = table.loc[m] {
                let p = self.alloc_port(slot, m);
                table.loc[m] = Location::Local(p);
                ports.push((m, p));
            }
        }
        self.by_vni.insert(table.spec.vni, slot);
        self.by_name.insert(table.spec.name.clone(), slot);
        if slot == self.violins.len() {
            self.violins.push(Some(table));
        } else {
            self.violins[slot] = Some(table);
        }
        Ok(ports)
    }

    /// The switch slot of the Violin with `vni` (what [`Switch::charge`] takes).
    #[inline]
    pub fn slot_of_vni(&self, vni: u32) -> Option<usize> {
        self.by_vni.get(&vni).copied()
    }

    /// Each Violin's VNI and worker time so far ([`Switch::charge`]).
    pub fn busy(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.violins
            .iter()
            .flatten()
            .map(|t| (t.spec.vni, t.busy_ns))
    }

    /// Adds `ns` of its worker's time to the Violin in switch slot `v`.
    #[inline]
    pub fn charge(&mut self, v: usize, ns: u64) {
        if let Some(t) = self.violins.get_mut(v).and_then(Option::as_mut) {
            t.busy_ns += ns;
        }
    }

    /// Removes a Violin and frees its ports. Returns its final statistics.
    pub fn remove_violin(&mut self, name: &str) -> Option<ViolinStats> {
        let slot = self.by_name.remove(name)?;
        let table = self.violins[slot].take()?;
        self.by_vni.remove(&table.spec.vni);
        for p in self.ports.iter_mut() {
            if matches!(p, Some((v, _)) if *v == slot) {
                *p = None;
            }
        }
        Some(stats_of(&table))
    }

    /// Switches one frame. Outputs are appended to `out` (cleared first); the verdict is
    /// `Forward` when at least one output was produced, else why not (already counted).
    pub fn process(
        &mut self,
        ingress: Ingress,
        frame: &[u8],
        now: u64,
        out: &mut Vec<Egress>,
    ) -> Verdict {
        self.process_gso(ingress, frame, None, now, out)
    }

    /// The same for a frame that may be a super-frame (`gso`): it is switched whole and
    /// charged what its segments are on the wire. A frame a capped link queued is
    /// `Forward` with no output here: [`Switch::release`] sends it later.
    pub fn process_gso(
        &mut self,
        ingress: Ingress,
        frame: &[u8],
        gso: Option<&Gso>,
        now: u64,
        out: &mut Vec<Egress>,
    ) -> Verdict {
        out.clear();
        let f = Offered {
            frame,
            gso,
            size: Size::of(frame, gso),
        };
        match ingress {
            Ingress::Port(p) => {
                let Some(&Some((v, m))) = self.ports.get(p as usize) else {
                    self.drops[Verdict::PortDown as usize] += 1;
                    return Verdict::PortDown;
                };
                match &mut self.violins[v] {
                    Some(t) => t.rx_local(m, &f, now, out),
                    None => Verdict::PortDown,
                }
            }
            Ingress::Tunnel { src, vni } => {
                let Some(&v) = self.by_vni.get(&vni) else {
                    self.drops[Verdict::UnknownVni as usize] += 1;
                    return Verdict::UnknownVni;
                };
                match &mut self.violins[v] {
                    Some(t) => t.rx_tunnel(src, &f, now, out),
                    None => Verdict::UnknownVni,
                }
            }
        }
    }

    /// How much the guest behind port `p` may send at `now`: the worker reads a port
    /// only within it, and not at all while its guest is in debt. A guest with tokens
    /// may go into debt by up to its bucket's depth in one read, so a ring is read a
    /// batch at a time even at a cap's edge (a fast-port guest at 1 Gbit/s read only as
    /// deep as its tokens overflowed its AF_XDP ring more often: TCP through the cap
    /// 0.86 x against 0.90 x with this); a burst of twice the depth at most, so a cap
    /// still holds within a bucket's depth over any window.
    pub fn allowance(&mut self, p: PortId, now: u64) -> Allowance {
        let Some(&Some((v, m))) = self.ports.get(p as usize) else {
            return Allowance::Free;
        };
        let Some(g) = self.violins[v]
            .as_mut()
            .and_then(|t| t.guest_police[m].as_mut())
        else {
            return Allowance::Free;
        };
        match g.allowance(now) {
            Some((frames, bytes)) => Allowance::Upto {
                frames,
                bytes: bytes.saturating_add(g.depth()),
            },
            None => Allowance::HeldUntil(g.ready_at(now)),
        }
    }

    /// The Violin (its slot in this switch) port `p` belongs to: what the worker's fair
    /// service counts it under.
    /// The VNI of the Violin guest port `p` belongs to.
    pub fn vni_of_port(&self, p: PortId) -> Option<u32> {
        let v = self.violin_of_port(p)?;
        self.violins[v].as_ref().map(|t| t.spec.vni)
    }

    pub fn violin_of_port(&self, p: PortId) -> Option<usize> {
        self.ports
            .get(p as usize)
            .copied()
            .flatten()
            .map(|(v, _)| v)
    }

    /// Lets go what capped links queued and may send by `now`, oldest first per link:
    /// `send` gets each frame with its output and GSO layout, and says whether it was
    /// delivered (failures are counted). Returns when the next queued frame is due.
    pub fn release(
        &mut self,
        now: u64,
        mut send: impl FnMut(Egress, &[u8], Option<&Gso>) -> Result<(), Verdict>,
    ) -> Option<u64> {
        let mut next: Option<u64> = None;
        for t in self.violins.iter_mut().flatten() {
            let mut i = 0;
            while i < t.backlog.len() {
                let k = t.backlog[i];
                let (s, d) = (t.shapers[k].s, t.shapers[k].d);
                let e = t.egress_of(d);
                let (edges, unrecorded) = (&mut t.edges, &mut t.unrecorded);
                let drops = &mut t.drops;
                let due = t.shapers[k].shaper.release(now, |f, g, size| {
                    count_edge(edges, unrecorded, s, d, size);
                    if let Err(v) = send(e, f, g) {
                        drops[v as usize] += 1;
                    }
                });
                match due {
                    Some(at) => {
                        next = Some(next.map_or(at, |n| n.min(at)));
                        i += 1;
                    }
                    None => {
                        t.backlog.swap_remove(i);
                    }
                }
            }
        }
        next
    }

    /// When the next queued frame of a capped link is due (`None`: nothing is queued).
    /// Grows the pair tables that asked for room (allocates: call it between batches,
    /// never while frames are being switched).
    pub fn make_room(&mut self) {
        for t in self.violins.iter_mut().flatten() {
            if t.edges.wants_room() {
                t.edges.make_room();
            }
        }
    }

    pub fn next_release(&mut self, now: u64) -> Option<u64> {
        let mut next: Option<u64> = None;
        for t in self.violins.iter_mut().flatten() {
            for &k in &t.backlog {
                if let Some(at) = t.shapers[k].shaper.next_at(now) {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        next
    }

    /// Counts a drop that happened after switching (transport could not deliver).
    pub fn count_egress_drop(&mut self, e: Egress, v: Verdict) {
        let slot = match e {
            Egress::Port(p) => self
                .ports
                .get(p as usize)
                .copied()
                .flatten()
                .map(|(s, _)| s),
            Egress::Tunnel { vni, .. } => self.by_vni.get(&vni).copied(),
        };
        match slot.and_then(|s| self.violins[s].as_mut()) {
            Some(t) => t.drops[v as usize] += 1,
            None => self.drops[v as usize] += 1,
        }
    }

    /// Counts a drop at a port before the frame reached the switch (framing errors).
    pub fn count_port_drop(&mut self, p: PortId, v: Verdict) {
        self.count_egress_drop(Egress::Port(p), v)
    }

    /// Counts a drop at the underlay before switching (bad outer headers).
    pub fn count_host_drop(&mut self, v: Verdict) {
        self.drops[v as usize] += 1;
    }

    pub fn violin(&self, name: &str) -> Option<&Violin> {
        self.by_name
            .get(name)
            .and_then(|&s| self.violins[s].as_ref())
            .map(|t| &t.spec)
    }

    pub fn violins(&self) -> impl Iterator<Item = &Violin> {
        self.violins.iter().flatten().map(|t| &t.spec)
    }

    pub fn stats(&self, name: &str) -> Option<ViolinStats> {
        self.by_name
            .get(name)
            .and_then(|&s| self.violins[s].as_ref())
            .map(stats_of)
    }

    pub fn host_drops(&self) -> BTreeMap<String, u64> {
        drops_map(&self.drops)
    }
}

pub use crate::stats::{EdgeStats, ViolinStats};

/// Counts `size` on the pair's counter, or as unrecorded when the table has no room
/// for a new pair.
#[inline]
fn count_edge(
    edges: &mut PairTable<Counter>,
    unrecorded: &mut Counter,
    s: usize,
    d: usize,
    size: Size,
) {
    match edges.entry(s, d) {
        Some(c) => c.add(size),
        None => unrecorded.add(size),
    }
}

fn drops_map(d: &Drops) -> BTreeMap<String, u64> {
    Verdict::ALL
        .iter()
        .filter(|v| v.is_drop() && d[**v as usize] > 0)
        .map(|v| (v.name().to_string(), d[*v as usize]))
        .collect()
}

fn stats_of(t: &ViolinTable) -> ViolinStats {
    let mut sent: Vec<(usize, usize, Counter)> = t
        .edges
        .iter()
        .filter(|(_, _, c)| c.packets > 0)
        .map(|(s, d, c)| (s, d, *c))
        .collect();
    sent.sort_unstable_by_key(|(s, d, _)| (*s, *d));
    let edges = sent
        .into_iter()
        .map(|(s, d, c)| EdgeStats {
            from: t.spec.members[s].name.clone(),
            to: t.spec.members[d].name.clone(),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    ViolinStats {
        name: t.spec.name.clone(),
        vni: t.spec.vni,
        edges,
        drops: drops_map(&t.drops),
        learned_macs: t.learned.len(),
        ecn_marked: t.shapers.iter().map(|x| x.shaper.marked).sum(),
        queued_frames: t.shapers.iter().map(|x| x.shaper.queued().0 as u64).sum(),
        queued_bytes: t.shapers.iter().map(|x| x.shaper.queued().1 as u64).sum(),
        unrecorded_packets: t.unrecorded.packets,
        busy_ns: t.busy_ns,
    }
}

#[cfg(test)]
#[path = "switch_tests.rs"]
mod tests;
