//! The host manager: the control thread's owner of this host's Violins.
//!
//! It keeps a record of each Violin here (spec, guests by port, AF_XDP slot, and
//! through the [`Supervisor`] their processes), so the switch is not the registry. A
//! change is carried out in steps that never make a packet worker wait: the worker
//! updates its switch ([`Command::Apply`]) and hands back the ports it let go; the
//! manager builds the new guests' ports (sockets, veths, namespaces, relays, VMs) on its
//! own thread and passes each one to the worker ([`Command::AttachPort`]). After each
//! change it publishes a [`HostView`] that read-only requests and metrics use with the
//! worker's [`Counters`], without waiting for the manager.

use crate::config::HostConfig;
use crate::control::balance::{self, ViolinLoad};
use crate::control::persist;
use crate::control::protocol::{
    Applied, GuestStatus, HostStatus, HostViolinStats, Request, ViolinStatus, XdpHostStats,
};
use crate::datapath::fastpath::switch::{PortId, Update};
use crate::datapath::transport::afxdp::{SlotOpener, MAX_SLOTS, SHARED_SLOT};
use crate::datapath::transport::guest::GuestPort;
use crate::datapath::transport::tap::TapPort;
use crate::datapath::transport::xdpport::XdpPort;
use crate::datapath::transport::Port;
use crate::datapath::worker::{Command, Counters, WorkerGone, Workers};
use crate::host::cgroup::GuestCgroup;
use crate::host::supervisor::{GuestProc, Supervisor};
use crate::host::{netns, vm};
use crate::spec::{Framing, GuestKind, MemberKind, PortKind, Violin};
use crate::xdp::classifier::Classifier;
use anyhow::{anyhow, bail, Context, Result};
use aya::programs::xdp::XdpLinkId;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::{error, info, warn};
use violin_common::wire::EthernetAddress;
use violin_common::Verdict;

/// A guest of a Violin on this host, as the control plane knows it.
struct GuestRecord {
    name: String,
    kind: GuestKind,
    ip: Ipv4Addr,
    prefix_len: u8,
    mac: EthernetAddress,
    netns: Option<String>,
    cgroup: Option<GuestCgroup>,
    /// A VM's directory and accelerator.
    vm: Option<(PathBuf, String)>,
    /// A fast port: the guest-port program's attachment, the host veth and the port's
    /// slot in the program's XskMap (its own, not its port number, which changes when
    /// its Violin moves to another worker).
    xdp: Option<(XdpLinkId, String, u32)>,
}

/// A Violin on this host.
struct ViolinRecord {
    spec: Violin,
    guests: BTreeMap<PortId, GuestRecord>,
}

/// What the control socket's read-only requests and the metrics read: published by
/// the manager after every change, never locked by a packet worker.
#[derive(Debug, Clone)]
pub struct HostView {
    pub host: String,
    pub underlay: Ipv4Addr,
    pub dataplane: String,
    pub violins: Vec<ViolinView>,
}

#[derive(Debug, Clone)]
pub struct ViolinView {
    pub spec: Violin,
    /// The AF_XDP slot whose socket carries this Violin's frames (xdp plane).
    pub slot: Option<usize>,
    /// The packet worker it lives on.
    pub worker: usize,
    pub guests: Vec<GuestView>,
}

#[derive(Debug, Clone)]
pub struct GuestView {
    pub port: PortId,
    pub name: String,
    pub kind: GuestKind,
    pub ip: String,
    pub mac: String,
    pub netns: Option<String>,
    /// The guest's cgroup (guests with limits), read for OOM kills.
    pub cgroup: Option<String>,
    pub vm: Option<(PathBuf, String)>,
    /// Where the VM waits for a live migration (QEMU's `-incoming` URI), if it does.
    pub incoming: Option<String>,
}

/// The published view, shared by the control thread (writer) and the servers.
pub type SharedView = Arc<Mutex<Arc<HostView>>>;

/// The XDP classifier, shared by the manager (map updates) and the servers (verdict
/// counters). Never touched by a packet worker.
pub type SharedClassifier = Arc<Mutex<Classifier>>;

pub struct Manager {
    cfg: HostConfig,
    /// The packet workers: a Violin's commands go to its home worker.
    workers: Workers,
    classifier: Option<SharedClassifier>,
    dataplane: &'static str,
    /// AF_XDP slot → Violin name (xdp plane, one socket per Violin).
    slots: Vec<Option<String>>,
    /// Per-Violin sockets were refused: every Violin uses the shared socket.
    single_socket: bool,
    /// Open Violins' AF_XDP sockets (xdp plane), here rather than on the workers: one
    /// per rx queue, the opener of queue `i` on worker `i`'s UMEM.
    openers: Vec<SlotOpener>,
    /// Slots whose socket is open (and served by the worker).
    open_slots: BTreeSet<usize>,
    records: BTreeMap<String, ViolinRecord>,
    supervisor: Supervisor,
    /// This binary, which also runs lightweight guests' relays (`violin-dp guest`).
    exe: String,
    view: SharedView,
    balance: Balance,
}

/// What deciding where Violins live needs between ticks ([`balance`]).
#[derive(Default)]
struct Balance {
    /// The last reading of each Violin's worker time, and when it was taken.
    busy: BTreeMap<u32, u64>,
    at: Option<Instant>,
    /// Violins that moved lately, and when: they stay put for [`SETTLE`].
    moved: BTreeMap<u32, Instant>,
    /// Each worker's time charged to all its Violins at the last check, and when.
    totals: Vec<u64>,
    checked: Option<Instant>,
}

/// How often each Violin's share of its worker is read, and moves are decided: a
/// flood is seen within two readings.
const BALANCE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// How long a Violin that moved stays on its new worker, whatever its load (no
/// Violin moves more often).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

fn gone(e: WorkerGone) -> anyhow::Error {
    anyhow!(e)
}

impl Manager {
    pub fn new(
        cfg: HostConfig,
        workers: Workers,
        classifier: Option<SharedClassifier>,
        openers: Vec<SlotOpener>,
        dataplane: &'static str,
        exe: String,
    ) -> Manager {
        let view = Arc::new(Mutex::new(Arc::new(HostView {
            host: cfg.name.clone(),
            underlay: cfg.underlay,
            dataplane: dataplane.into(),
            violins: Vec::new(),
        })));
        Manager {
            cfg,
            workers,
            classifier,
            dataplane,
            slots: Vec::new(),
            single_socket: false,
            openers,
            open_slots: BTreeSet::new(),
            records: BTreeMap::new(),
            supervisor: Supervisor::default(),
            exe,
            view,
            balance: Balance::default(),
        }
    }

    pub fn view(&self) -> SharedView {
        self.view.clone()
    }

    /// Carries out one request that changes this host.
    pub fn handle(&mut self, req: Request) -> Result<serde_json::Value> {
        // A spec is checked here as the CLI checked it: names become paths and
        // indices index tables, and the request may not come from our CLI.
        if let Request::AddViolin { violin }
        | Request::ApplyViolin { violin }
        | Request::PrepareIncoming { violin, .. } = &req
        {
            crate::spec::check(violin).map_err(|e| anyhow!("refused: {e}"))?;
        }
        let r = match req {
            Request::AddViolin { violin } => {
                if self.records.contains_key(&violin.name) {
                    bail!(
                        "a Violin named {:?} already exists on this host",
                        violin.name
                    );
                }
                self.apply_violin(&violin, &Incoming::NONE)?;
                serde_json::Value::Null
            }
            Request::ApplyViolin { violin } => {
                serde_json::to_value(self.apply_violin(&violin, &Incoming::NONE)?)?
            }
            Request::PrepareIncoming {
                violin,
                guests,
                listen,
            } => {
                let incoming = Incoming {
                    guests: &guests,
                    tcp: listen,
                };
                serde_json::to_value(self.apply_violin(&violin, &incoming)?)?
            }
            Request::Announce { name, guests } => {
                self.announce(&name, &guests)?;
                serde_json::Value::Null
            }
            Request::RemoveViolin { name } => {
                self.remove_violin(&name, true)?;
                serde_json::Value::Null
            }
            Request::Status | Request::Stats { .. } | Request::Monitor { .. } => {
                bail!("read-only requests are answered by the control server")
            }
        };
        self.publish();
        Ok(r)
    }

    /// Restarts guests' processes that exited; releases VMs that have booted.
    pub fn tick(&mut self) {
        self.supervisor.tick(Instant::now());
        self.release_booted_vms();
    }

    /// Reads each Violin's share of its worker over the last [`BALANCE_EVERY`] and
    /// moves the neighbours of loud Violins to workers without one ([`balance`]).
    /// Called between requests; does nothing until [`BALANCE_EVERY`] has passed.
    pub fn rebalance(&mut self) {
        let loud = self.cfg.loud_share().unwrap_or(0.0);
        if loud <= 0.0 || !self.workers.movable() || self.records.is_empty() {
            self.balance = Balance::default();
            return;
        }
        let now = Instant::now();
        if self
            .balance
            .checked
            .is_some_and(|t| now.duration_since(t) < BALANCE_EVERY)
        {
            return;
        }
        // No Violin can be loud on a worker that was not busy that long in all: then
        // the workers are not asked (nor woken).
        let totals: Vec<u64> = (0..self.workers.len())
            .map(|i| self.workers.get(i).busy_ns())
            .collect();
        let before = std::mem::replace(&mut self.balance.totals, totals);
        let hot = self.balance.checked.replace(now).is_some_and(|t| {
            let ns = now.duration_since(t).as_nanos() as f64;
            let t = &self.balance.totals;
            before.len() == t.len()
                && t.iter()
                    .zip(&before)
                    .any(|(a, b)| a.saturating_sub(*b) as f64 >= loud * ns)
        });
        if !hot {
            self.balance.busy.clear();
            self.balance.at = None;
            return;
        }
        let Ok(each) = self.workers.ask_all(|reply| Command::Busy { reply }) else {
            return;
        };
        let busy: BTreeMap<u32, u64> = each.into_iter().flatten().collect();
        let before = std::mem::replace(&mut self.balance.busy, busy);
        let Some(at) = self.balance.at.replace(now) else {
            return;
        };
        let ns = now.duration_since(at).as_nanos() as u64;
        let shares = balance::shares(&before, &self.balance.busy, ns);
        self.balance
            .moved
            .retain(|_, t| now.duration_since(*t) < SETTLE);
        let loads: Vec<ViolinLoad> = self
            .records
            .values()
            .filter_map(|r| {
                let vni = r.spec.vni;
                Some(ViolinLoad {
                    vni,
                    worker: self.workers.home(vni),
                    share: *shares.get(&vni)?,
                    settled: self.balance.moved.contains_key(&vni) || !self.workers.placed(vni),
                })
            })
            .collect();
        let moves = balance::moves(&loads, self.workers.len(), loud);
        let mut loud_at = vec![false; self.workers.len()];
        for l in loads.iter().filter(|l| l.share >= loud) {
            let w = moves
                .iter()
                .find(|(v, _)| *v == l.vni)
                .map_or(l.worker, |m| m.1);
            loud_at[w] = true;
        }
        self.workers.set_loud(loud_at);
        for &(vni, to) in &moves {
            let Some(name) = self
                .records
                .values()
                .find(|r| r.spec.vni == vni)
                .map(|r| r.spec.name.clone())
            else {
                continue;
            };
            let from = self.workers.home(vni);
            // Its worker's loudest Violin, for the log.
            let (by, share) = loads
                .iter()
                .filter(|l| l.worker == from)
                .max_by(|a, b| a.share.total_cmp(&b.share))
                .map(|l| (l.vni, l.share))
                .unwrap_or((vni, 0.0));
            match self.move_violin(&name, to) {
                Ok(()) => info!(
                    violin = %name,
                    from,
                    to,
                    loud_vni = by,
                    loud_percent = format!("{:.0}", share * 100.0),
                    "Violin moved to another packet worker, away from a loud Violin"
                ),
                Err(e) => {
                    warn!(violin = %name, from, to, "moving a Violin to another packet worker: {e:#}")
                }
            }
            self.balance.moved.insert(vni, now);
        }
        if !moves.is_empty() {
            self.publish();
        }
    }

    /// Moves Violin `name` to packet worker `to` whole: switch table (counters,
    /// buckets, queues), guest ports, AF_XDP sockets, own underlay socket and monitors
    /// (what arrives meanwhile waits in those sockets); the manager's records follow
    /// its ports' new numbers. Where `to` refuses it, it goes back.
    fn move_violin(&mut self, name: &str, to: usize) -> Result<()> {
        let vni = self
            .records
            .get(name)
            .with_context(|| format!("no Violin named {name:?} on this host"))?
            .spec
            .vni;
        let from = self.workers.home(vni);
        if from == to {
            return Ok(());
        }
        anyhow::ensure!(
            self.workers.placed(vni),
            "Violin {name:?} stays on worker {from}: the kernel's steering cannot follow it"
        );
        // Snapshots taken meanwhile are taken again: the Violin is on neither worker.
        let _moving = self.workers.moving();
        let moving = self
            .workers
            .get(from)
            .ask(|reply| Command::Export {
                name: name.to_string(),
                to,
                reply,
            })
            .map_err(gone)?
            .with_context(|| format!("worker {from} does not have Violin {name:?}"))?;
        let imported = self
            .workers
            .get(to)
            .ask(|reply| Command::Import {
                violin: moving,
                reply,
            })
            .map_err(gone)?;
        match imported {
            Ok(ports) => {
                self.workers.rehome(vni, to);
                self.renumber(name, &ports);
                Ok(())
            }
            Err((e, back)) => {
                let ports = self
                    .workers
                    .get(from)
                    .ask(|reply| Command::Import {
                        violin: back,
                        reply,
                    })
                    .map_err(gone)?
                    .map_err(|(e2, _)| anyhow!("Violin {name:?} is lost between workers: {e2}"))?;
                self.renumber(name, &ports);
                bail!("worker {to} refused Violin {name:?}: {e}")
            }
        }
    }

    /// Re-keys a Violin's guests by the ports a worker numbered them anew, as (member
    /// index, port).
    fn renumber(&mut self, name: &str, ports: &[(usize, PortId)]) {
        let Some(rec) = self.records.get_mut(name) else {
            return;
        };
        let mut old = std::mem::take(&mut rec.guests);
        for &(m, p) in ports {
            let Some(member) = rec.spec.members.get(m) else {
                continue;
            };
            let key = old
                .iter()
                .find(|(_, g)| g.name == member.name)
                .map(|(k, _)| *k);
            if let Some(g) = key.and_then(|k| old.remove(&k)) {
                rec.guests.insert(p, g);
            }
        }
        for (k, g) in old {
            warn!(violin = %name, guest = %g.name, "a guest without a port after its Violin moved");
            rec.guests.entry(k).or_insert(g);
        }
    }

    /// A VM boots on the control CPUs (booting is control work: under TCG it takes a
    /// core for seconds) and gets every CPU once its NIC has sent a frame — or after
    /// [`BOOT_HOLD`], whatever it did.
    fn release_booted_vms(&mut self) {
        let held: Vec<(String, String, PortId, Instant)> = self
            .records
            .values()
            .flat_map(|r| r.guests.iter().map(move |(p, g)| (&r.spec.name, p, g)))
            .filter(|(_, _, g)| g.kind == GuestKind::Qemu)
            .filter_map(|(v, p, g)| {
                let since = self.supervisor.get(v, &g.name)?.held_since()?;
                Some((v.clone(), g.name.clone(), *p, since))
            })
            .collect();
        if held.is_empty() {
            return;
        }
        let Ok(c) = self.workers.snapshot() else {
            return;
        };
        for (v, g, p, since) in held {
            let spoke = c.ports.get(&p).is_some_and(|s| s.counters.rx_frames > 0);
            if spoke || since.elapsed() >= BOOT_HOLD {
                if let Some(proc_) = self.supervisor.get_mut(&v, &g) {
                    proc_.release();
                    info!(violin = %v, guest = %g, booted = spoke, "VM released to every CPU");
                }
            }
        }
    }

    fn publish(&self) {
        let violins = self
            .records
            .values()
            .map(|r| ViolinView {
                spec: r.spec.clone(),
                slot: self.slot_of(&r.spec.name),
                worker: self.workers.home(r.spec.vni),
                guests: r
                    .guests
                    .iter()
                    .map(|(p, g)| GuestView {
                        port: *p,
                        name: g.name.clone(),
                        kind: g.kind,
                        ip: format!("{}/{}", g.ip, g.prefix_len),
                        mac: g.mac.to_string(),
                        netns: g.netns.clone(),
                        cgroup: g.cgroup.as_ref().and(g.netns.clone()),
                        vm: g.vm.clone(),
                        incoming: self
                            .supervisor
                            .get(&r.spec.name, &g.name)
                            .and_then(|p| Some(p.incoming.as_ref()?[1].clone())),
                    })
                    .collect(),
            })
            .collect();
        let v = HostView {
            host: self.cfg.name.clone(),
            underlay: self.cfg.underlay,
            dataplane: self.dataplane.into(),
            violins,
        };
        *self.view.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
    }

    /// The slot of this Violin's AF_XDP socket (its own, or the shared one).
    fn slot_of(&self, name: &str) -> Option<usize> {
        self.classifier.as_ref()?;
        self.slots
            .iter()
            .position(|s| s.as_deref() == Some(name))
            .or(self.shared_socket().then_some(SHARED_SLOT))
    }

    fn shared_socket(&self) -> bool {
        self.single_socket || !self.cfg.xdp_socket_per_violin
    }

    /// Adds a Violin, or brings an existing one to this spec (`violin apply`, `scale`,
    /// `migrate`): guests whose attachment is unchanged keep running untouched. VMs
    /// named in `incoming` start waiting for a live migration.
    fn apply_violin(&mut self, v: &Violin, incoming: &Incoming) -> Result<Applied> {
        let here = |spec: &Violin| {
            spec.members
                .iter()
                .filter(|m| m.host() == Some(self.cfg.name.as_str()))
                .count()
        };
        let others: usize = self
            .records
            .iter()
            .filter(|(name, _)| **name != v.name)
            .map(|(_, r)| here(&r.spec))
            .sum();
        let max = self.cfg.max_guests();
        if others + here(v) > max {
            bail!(
                "host {} would have {} guests with Violin {:?} ({} of its own), more than max_guests = {max} (host config)",
                self.cfg.name,
                others + here(v),
                v.name,
                here(v)
            );
        }
        let old = self.records.get(&v.name).map(|r| r.spec.clone());
        // An existing Violin's worker has it (and refuses a change of VNI).
        let home = match &old {
            Some(o) => self.workers.home(o.vni),
            None => {
                let others = self.records.values().map(|r| r.spec.vni);
                self.workers.place(v.vni, others)
            }
        };
        let applied = self.workers.get(home).ask(|reply| Command::Apply {
            spec: Box::new(v.clone()),
            local_host: self.cfg.name.clone(),
            reply,
        });
        let (up, released) = match applied {
            Ok(Ok(a)) => a,
            failed => {
                if old.is_none() {
                    self.workers.unplace(v.vni);
                }
                failed.map_err(gone)??
            }
        };
        let rec = self
            .records
            .entry(v.name.clone())
            .or_insert_with(|| ViolinRecord {
                spec: v.clone(),
                guests: BTreeMap::new(),
            });
        rec.spec = v.clone();
        let removed: Vec<String> = up
            .removed
            .iter()
            .filter_map(|p| rec.guests.get(p).map(|g| g.name.clone()))
            .collect();
        drop(released); // their sockets close; the rest of their teardown follows
        for p in &up.removed {
            self.teardown_guest(&v.name, *p);
        }
        let attached = self
            .attach_guests(v, &up.added, incoming)
            .and_then(|_| self.attach_xdp(v, old.as_ref()));
        if attached.is_ok() {
            self.pace_fast_ports(v, old.as_ref(), &up.added);
        }
        if let Err(e) = attached {
            match &old {
                // Back to the old spec, as far as it goes.
                Some(old) => {
                    if let Err(e2) = self.apply_violin(old, &Incoming::NONE) {
                        error!(violin = %v.name, "restoring the previous spec after a failed apply: {e2:#}");
                    }
                }
                None => {
                    let _ = self.remove_violin(&v.name, true);
                }
            }
            return Err(e);
        }
        // A VM that waited for a migration and does not any more starts normally if
        // it is ever restarted.
        if let Some(rec) = self.records.get(&v.name) {
            for g in rec.guests.values() {
                if !incoming.guests.contains(&g.name) {
                    if let Some(p) = self.supervisor.get_mut(&v.name, &g.name) {
                        p.incoming = None;
                    }
                }
            }
        }
        if let Err(e) = persist::save(&self.cfg, v) {
            warn!("saving Violin {} for restarts: {e:#}", v.name);
        }
        let names = |l: &[(usize, PortId)]| -> Vec<String> {
            l.iter().map(|(i, _)| v.members[*i].name.clone()).collect()
        };
        let Update { kept, added, .. } = &up;
        info!(violin = %v.name, vni = v.vni, added = added.len(), removed = removed.len(), kept = kept.len(), "violin applied");
        Ok(Applied {
            added: names(added),
            removed,
            kept: names(kept),
        })
    }

    fn attach_guests(
        &mut self,
        v: &Violin,
        ports: &[(usize, PortId)],
        incoming: &Incoming,
    ) -> Result<()> {
        for &(m, p) in ports {
            let member = &v.members[m];
            let MemberKind::Guest {
                ip,
                prefix_len,
                kind,
                framing,
                port: port_kind,
                limits,
                ..
            } = &member.kind
            else {
                continue;
            };
            let netns =
                (*kind == GuestKind::Netns).then(|| self.cfg.guest_netns(&v.name, &member.name));
            // Every netns guest gets a cgroup, limited or not: `violin exec` runs its
            // commands there, and removing the guest empties it.
            let limited = limits.millicpus.is_some() || limits.memory.is_some();
            let cgroup = match &netns {
                Some(ns) => match GuestCgroup::create(ns, limits) {
                    Ok(cg) => Some(cg),
                    Err(e) if limited => {
                        return Err(e.context(format!("limiting guest {}", member.name)))
                    }
                    Err(e) => {
                        warn!(guest = %member.name, "no cgroup for the guest ({e:#}); its uid range still ends its processes");
                        None
                    }
                },
                None => None,
            };
            let mut rec = GuestRecord {
                name: member.name.clone(),
                kind: *kind,
                ip: *ip,
                prefix_len: *prefix_len,
                mac: member.mac.0,
                netns: netns.clone(),
                cgroup,
                vm: None,
                xdp: None,
            };
            // Recorded first: a failure below tears down what was made.
            let port = match self.make_port(v, m, &mut rec, *port_kind, *framing, incoming) {
                Ok(port) => port,
                Err(e) => {
                    self.record_guest(&v.name, p, rec);
                    return Err(e);
                }
            };
            self.record_guest(&v.name, p, rec);
            self.workers
                .of_port(p)
                .send(Command::AttachPort { id: p, port })
                .map_err(gone)?;
        }
        Ok(())
    }

    /// Paces each of this host's fast-port guests that is new or whose cap changed at
    /// its cap, in its own `eth0` queue ([`crate::host::guest::pace_veth_guest`]). A
    /// failure leaves the data plane's enforcement as it is and is logged: the guest's
    /// frames over the cap then wait in its port's ring.
    fn pace_fast_ports(&self, v: &Violin, old: Option<&Violin>, added: &[(usize, PortId)]) {
        for (m, member) in v.members.iter().enumerate() {
            let MemberKind::Guest {
                host,
                kind: GuestKind::Netns,
                port: PortKind::Xdp,
                ..
            } = &member.kind
            else {
                continue;
            };
            if *host != self.cfg.name {
                continue;
            }
            let was = old
                .and_then(|o| o.members.iter().find(|x| x.name == member.name))
                .map(|x| x.rate);
            let fresh = added.iter().any(|(i, _)| *i == m);
            if (fresh && member.rate.is_none()) || (!fresh && was == Some(member.rate)) {
                continue;
            }
            let ns = self.cfg.guest_netns(&v.name, &member.name);
            if let Err(e) = crate::host::guest::pace_veth_guest(&ns, member.rate.as_ref(), v.mtu) {
                warn!(violin = %v.name, guest = %member.name, "pacing the guest at its cap in its own queue: {e:#}; what it sends over the cap waits in its port's ring instead");
            }
        }
    }

    /// The lowest slot of the guest-port program's XskMap no fast port has.
    fn free_port_slot(&self) -> u32 {
        let used: BTreeSet<u32> = self
            .records
            .values()
            .flat_map(|r| r.guests.values())
            .filter_map(|g| g.xdp.as_ref().map(|x| x.2))
            .collect();
        (0..).find(|s| !used.contains(s)).unwrap_or(0)
    }

    fn record_guest(&mut self, violin: &str, p: PortId, g: GuestRecord) {
        if let Some(r) = self.records.get_mut(violin) {
            r.guests.insert(p, g);
        }
    }

    /// Builds guest `m`'s port and starts its process (relay or VM).
    #[allow(clippy::too_many_arguments)]
    fn make_port(
        &mut self,
        v: &Violin,
        m: usize,
        rec: &mut GuestRecord,
        port_kind: PortKind,
        framing: Framing,
        incoming: &Incoming,
    ) -> Result<Port> {
        let member = &v.members[m];
        if port_kind == PortKind::Tap {
            // The daemon drives the guest's tap itself: no relay process.
            let ns = rec.netns.clone().unwrap_or_default();
            let (tap, uso) = crate::host::guest::setup_tap_guest(
                &ns,
                member.mac.0,
                rec.ip,
                rec.prefix_len,
                v.mtu,
            )
            .with_context(|| format!("setting up tap-port guest {}", member.name))?;
            return Ok(Port::Tap(Box::new(TapPort::new(tap, &ns, uso))));
        }
        if port_kind == PortKind::Xdp {
            // A fast port: the daemon drives the host end of the guest's veth.
            let ns = rec.netns.clone().unwrap_or_default();
            let Some(cls) = self.classifier.clone() else {
                bail!(
                    "guest {} has port = \"xdp\", which needs the xdp data plane; host {} runs {}",
                    member.name,
                    self.cfg.name,
                    self.dataplane
                );
            };
            let host_if = crate::host::guest::veth_name(&ns);
            crate::host::guest::setup_veth_guest(
                &ns,
                &host_if,
                member.mac.0,
                rec.ip,
                rec.prefix_len,
                v.mtu,
            )
            .with_context(|| format!("setting up fast-port guest {}", member.name))?;
            let xp = XdpPort::open(&host_if, v.max_frame())
                .with_context(|| format!("fast port of guest {}", member.name))?;
            let slot = self.free_port_slot();
            let link = lock(&cls).attach_port(&host_if, slot, &xp.fd())?;
            rec.xdp = Some((link, host_if, slot));
            return Ok(Port::Xdp(Box::new(xp)));
        }
        let path = self.cfg.guest_socket(&v.name, &member.name);
        let mut port = GuestPort::bind(&path, framing)
            .with_context(|| format!("creating {}", path.display()))?;
        if rec.kind == GuestKind::Qemu {
            // Known before the VM sends anything: after a daemon restart, a VM that
            // kept running may have nothing to say until it is spoken to.
            let dir = self.cfg.vm_dir(&v.name, &member.name);
            port.set_default_peer(&vm::net_socket(&dir));
            let waits = incoming.guests.contains(&member.name);
            let g = self.vm_proc(v, m, &path, waits.then_some(incoming.tcp))?;
            rec.vm = Some((dir, vm::accelerator().0.into()));
            self.supervisor.add(g);
        } else if let Some(ns) = &rec.netns {
            let cmd = vec![
                self.exe.clone(),
                "guest".into(),
                "--netns".into(),
                ns.clone(),
                "--socket".into(),
                path.display().to_string(),
                "--framing".into(),
                match framing {
                    Framing::Stream => "stream".into(),
                    Framing::Dgram => "dgram".into(),
                },
                "--mac".into(),
                member.mac.0.to_string(),
                "--ip".into(),
                format!("{}/{}", rec.ip, rec.prefix_len),
                "--mtu".into(),
                v.mtu.to_string(),
            ];
            let mut g = GuestProc::new(
                &v.name,
                &member.name,
                cmd,
                path.with_extension("log"),
                path.with_extension("pid"),
            );
            g.packet_path = true;
            // A relay left by a daemon that crashed still holds the guest's tap.
            g.kill_recorded();
            g.spawn()?;
            self.supervisor.add(g);
        }
        Ok(Port::Sock(Box::new(port)))
    }

    /// Starts member `m`'s VM attached to its port socket at `socket`, or takes over
    /// the one a previous daemon started (a `dgram` VM needs no reconnect).
    fn vm_proc(
        &mut self,
        v: &Violin,
        m: usize,
        socket: &std::path::Path,
        incoming: Option<Option<Ipv4Addr>>,
    ) -> Result<GuestProc> {
        let member = &v.members[m];
        let MemberKind::Guest {
            ip,
            prefix_len,
            framing,
            limits,
            vm: Some(vmspec),
            ..
        } = &member.kind
        else {
            bail!("guest {} is not a VM", member.name);
        };
        let (kernel, initrd) = vm::boot_files(vmspec);
        for f in std::iter::once(&kernel).chain(initrd.as_ref()) {
            if !f.exists() {
                bail!("guest {}: {} does not exist (`violin up` builds the default image; or run scripts/build-guest-image.sh {})", member.name, f.display(), f.parent().map(|p| p.display().to_string()).unwrap_or_default());
            }
        }
        let dir = self.cfg.vm_dir(&v.name, &member.name);
        let ns = self.cfg.guest_netns(&v.name, &member.name);
        let key = vm::uid_key(&ns, &self.cfg.name);
        let (accel, why) = vm::accelerator();
        let cmd = vm::command(&vm::VmConfig {
            violin: &v.name,
            guest: &member.name,
            vm: vmspec,
            limits,
            mac: member.mac.0,
            ip: *ip,
            prefix_len: *prefix_len,
            mtu: v.mtu,
            framing: *framing,
            socket,
            dir: &dir,
            accel,
        });
        let mut g = GuestProc::new(
            &v.name,
            &member.name,
            cmd,
            dir.join("qemu.log"),
            vm::pid_file(&dir),
        );
        if let Some(tcp) = incoming {
            g.incoming = Some(vm::incoming_args(&dir, tcp)?);
        }
        let incoming = incoming.is_some();
        // A VM on a datagram socket that a previous daemon started keeps running: it
        // sends to the socket's path, which this daemon has just bound again. It is
        // found by its pidfile, whatever command line it was started with. (A stream
        // VM cannot reconnect: it is restarted.)
        if *framing == Framing::Dgram && !incoming {
            if let Some(uid) = crate::host::uids::lookup(&key) {
                if let Some(pid) = g.adopt_recorded() {
                    vm::hand_over(&dir, socket, uid)?;
                    info!(violin = %v.name, guest = %member.name, pid, "VM still running: taking it over");
                    g.uid = Some((uid, uid));
                    return Ok(g);
                }
            }
        }
        g.kill_recorded();
        // QEMU runs unprivileged, as a uid of the guest's own: it gets its directory and
        // port socket, nothing else of ours.
        let uid = crate::host::uids::locked(|| {
            vm::prepare_dir(&dir)?;
            crate::host::uids::allocate(&key, &dir)
        })?;
        vm::hand_over(&dir, socket, uid)?;
        info!(violin = %v.name, guest = %member.name, accel, reason = %why, incoming, "starting VM");
        g.uid = Some((uid, uid));
        g.spawn()?;
        Ok(g)
    }

    /// The underlay addresses the classifier accepts this Violin's frames from.
    fn member_sources(&self, v: &Violin) -> Vec<Ipv4Addr> {
        let mut m: Vec<Ipv4Addr> = v
            .hosts
            .values()
            .copied()
            .filter(|a| *a != self.cfg.underlay)
            .collect();
        m.extend(v.members.iter().filter_map(|x| match x.kind {
            MemberKind::External { underlay } => Some(underlay),
            _ => None,
        }));
        m
    }

    /// xdp data plane: a socket slot for the Violin, in the XskMap, and its VNI and
    /// member sources in the classifier's maps. With one socket per queue (configured,
    /// or because a per-Violin socket was refused), every Violin shares slot
    /// `SHARED_SLOT`'s socket and the switch tells them apart by VNI. `old`: the spec
    /// this host had, whose member sources no longer in `v` are removed.
    fn attach_xdp(&mut self, v: &Violin, old: Option<&Violin>) -> Result<()> {
        let Some(cls) = self.classifier.clone() else {
            return Ok(());
        };
        let members = self.member_sources(v);
        let slot = match self.slot_of(&v.name) {
            Some(s) => s,
            None => {
                let free = self
                    .slots
                    .iter()
                    .position(Option::is_none)
                    .unwrap_or(self.slots.len());
                if free >= MAX_SLOTS {
                    bail!("this host has {MAX_SLOTS} Violins with an AF_XDP socket each, the most its frame pool isolates; set xdp_socket_per_violin = false (violin cluster up --xdp-single-socket) to share one socket");
                }
                free
            }
        };
        let per_violin = slot != SHARED_SLOT;
        if !self.open_slots.contains(&slot) {
            anyhow::ensure!(
                !self.openers.is_empty(),
                "the xdp data plane has no AF_XDP sockets"
            );
            // One socket on each served rx queue, all opened before any is used.
            let sockets: Result<Vec<_>> = self.openers.iter().map(|o| o.open()).collect();
            let sockets = match sockets {
                Ok(s) => s,
                Err(e) if per_violin => {
                    warn!("a per-Violin AF_XDP socket was refused ({e:#}); falling back to one socket per queue for every Violin");
                    self.single_socket = true;
                    return self.attach_xdp(v, old);
                }
                Err(e) => return Err(e.context("opening the AF_XDP socket shared by every Violin")),
            };
            for (queue, socket) in sockets.into_iter().enumerate() {
                let key = self.xsk_key(slot, queue);
                lock(&cls).set_socket(key, &socket)?;
                // A Violin's own sockets are read by its home worker, whatever their
                // queue; the one every Violin shares by its queue's worker, which hands
                // other workers' frames over.
                let reader = match per_violin {
                    true => self.workers.of_vni(v.vni),
                    false => self.workers.get(queue),
                };
                reader
                    .send(Command::AttachSlot {
                        slot,
                        key: key as usize,
                        socket: Box::new(socket),
                        vni: per_violin.then_some(v.vni),
                    })
                    .map_err(gone)?;
            }
            self.open_slots.insert(slot);
        }
        let mut c = lock(&cls);
        if let Some(old) = old {
            let was = self.member_sources(old);
            let gone: Vec<Ipv4Addr> = was.into_iter().filter(|a| !members.contains(a)).collect();
            c.remove_vni(old.vni, &gone);
        }
        c.add_vni(v.vni, slot as u32, &members, v.max_frame())?;
        if per_violin {
            if self.slots.len() <= slot {
                self.slots.resize(slot + 1, None);
            }
            self.slots[slot] = Some(v.name.clone());
        }
        Ok(())
    }

    fn detach_xdp(&mut self, v: &Violin) {
        let Some(cls) = self.classifier.clone() else {
            return;
        };
        let members = self.member_sources(v);
        let mut c = lock(&cls);
        c.remove_vni(v.vni, &members);
        let Some(slot) = self
            .slots
            .iter()
            .position(|s| s.as_deref() == Some(&v.name))
        else {
            return;
        };
        self.slots[slot] = None;
        for queue in 0..self.openers.len() {
            c.clear_socket(self.xsk_key(slot, queue));
        }
        drop(c);
        self.open_slots.remove(&slot);
        // Closed here, not on the workers: closing waits for the kernel.
        let closed = self
            .workers
            .ask_all(|reply| Command::DetachSlot { slot, reply });
        drop(closed);
    }

    /// The XskMap key of a Violin's socket on one rx queue (the classifier's rule).
    fn xsk_key(&self, slot: usize, queue: usize) -> u32 {
        (slot * self.openers.len().max(1) + queue) as u32
    }

    /// Removes a Violin from this host; `forget`: also from what the next start
    /// restores (on request; at shutdown it stays).
    fn remove_violin(&mut self, name: &str, forget: bool) -> Result<()> {
        let Some(rec) = self.records.get(name) else {
            bail!("no Violin named {name:?} on host {}", self.cfg.name);
        };
        let spec = rec.spec.clone();
        let ports: Vec<PortId> = rec.guests.keys().copied().collect();
        self.detach_xdp(&spec);
        let (_, released) = self
            .workers
            .of_vni(spec.vni)
            .ask(|reply| Command::Remove {
                name: name.into(),
                reply,
            })
            .map_err(gone)?;
        self.workers.unplace(spec.vni);
        drop(released);
        for p in ports {
            self.teardown_guest(name, p);
        }
        self.records.remove(name);
        let _ = std::fs::remove_dir_all(self.cfg.run_dir.join("guests").join(name));
        if forget {
            persist::forget(&self.cfg, name);
        }
        info!(violin = %name, "violin removed");
        Ok(())
    }

    /// Tears down one guest: its process and namespace (lightweight guests), its VM
    /// directory and uid range, its fast-port veth and program, its cgroup. The worker
    /// has already let go of its port.
    fn teardown_guest(&mut self, violin: &str, p: PortId) {
        let Some(g) = self
            .records
            .get_mut(violin)
            .and_then(|r| r.guests.remove(&p))
        else {
            return;
        };
        if let Some(mut proc_) = self.supervisor.take(violin, &g.name) {
            proc_.stop();
        }
        if let Some(ns) = &g.netns {
            if let Err(e) = netns::delete(ns) {
                warn!("deleting {ns}: {e:#}");
            }
        }
        if let Some((d, _)) = &g.vm {
            let _ = std::fs::remove_dir_all(d);
            let ns = self.cfg.guest_netns(violin, &g.name);
            crate::host::uids::release(&vm::uid_key(&ns, &self.cfg.name));
        }
        if let Some((link, iface, slot)) = g.xdp {
            if let Some(cls) = &self.classifier {
                lock(cls).detach_port(link, &iface, slot);
            }
            let _ = crate::host::netlink::with_handle(|h| async move {
                crate::host::netlink::del_link(&h, &iface).await
            });
        }
        if let Some(cg) = g.cgroup {
            cg.remove();
        }
        info!(violin = %violin, guest = %g.name, "guest removed from this host");
    }

    /// Has the worker send a gratuitous ARP for each named guest once its port is
    /// connected (a guest that moved here).
    fn announce(&mut self, violin: &str, guests: &[String]) -> Result<()> {
        let Some(rec) = self.records.get(violin) else {
            bail!("no Violin named {violin:?} on host {}", self.cfg.name);
        };
        for name in guests {
            let Some((p, g)) = rec.guests.iter().find(|(_, g)| &g.name == name) else {
                bail!(
                    "guest {name:?} of Violin {violin:?} is not on host {}",
                    self.cfg.name
                );
            };
            self.workers
                .of_port(*p)
                .send(Command::Announce {
                    port: *p,
                    mac: g.mac,
                    ip: g.ip,
                })
                .map_err(gone)?;
        }
        Ok(())
    }

    /// Re-creates the Violins this host had before a restart (or a crash).
    pub fn restore(&mut self) {
        for (file, r) in persist::load_all(&self.cfg) {
            match r.and_then(|v| self.apply_violin(&v, &Incoming::NONE).map(|_| v.name)) {
                Ok(name) => info!(violin = %name, "restored after restart"),
                Err(e) => error!("restoring {}: {e:#}", file.display()),
            }
        }
        self.publish();
    }

    /// Tears every Violin down (daemon shutdown); their specs stay for the next start.
    pub fn teardown(&mut self) {
        let names: Vec<String> = self.records.keys().cloned().collect();
        for n in names {
            let _ = self.remove_violin(&n, false);
        }
    }
}

/// The VMs an apply starts waiting for a live migration instead of booting, and the
/// address they wait on (TCP, for a source on another machine; else a UNIX socket).
pub struct Incoming<'a> {
    pub guests: &'a [String],
    pub tcp: Option<Ipv4Addr>,
}

impl Incoming<'_> {
    pub const NONE: Incoming<'static> = Incoming {
        guests: &[],
        tcp: None,
    };
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HostView {
    fn guest_statuses(&self, v: &ViolinView, c: &Counters) -> Vec<GuestStatus> {
        v.guests
            .iter()
            .map(|g| {
                let port = c.ports.get(&g.port);
                GuestStatus {
                    name: g.name.clone(),
                    kind: g.kind,
                    socket: port.map(|p| p.describe.clone()).unwrap_or_default(),
                    netns: g.netns.clone(),
                    connected: port.is_some_and(|p| p.connected),
                    ip: g.ip.clone(),
                    mac: g.mac.clone(),
                    counters: port.map(|p| p.counters).unwrap_or_default(),
                    oom_kills: g
                        .cgroup
                        .as_deref()
                        .map(|n| GuestCgroup::open(n).map_or(0, |c| c.oom_kills())),
                    console: g
                        .vm
                        .as_ref()
                        .map(|(d, _)| vm::console_socket(d).display().to_string()),
                    agent: g
                        .vm
                        .as_ref()
                        .map(|(d, _)| vm::agent_socket(d).display().to_string()),
                    accel: g.vm.as_ref().map(|(_, a)| a.clone()),
                    qmp: g
                        .vm
                        .as_ref()
                        .map(|(d, _)| vm::qmp_socket(d).display().to_string()),
                    incoming: g.vm.as_ref().and(g.incoming.clone()),
                }
            })
            .collect()
    }

    /// `violin ls` / `status`: this host's Violins and guests.
    pub fn status(&self, c: &Counters) -> HostStatus {
        HostStatus {
            host: self.host.clone(),
            underlay: self.underlay,
            dataplane: self.dataplane.clone(),
            pid: std::process::id(),
            violins: self
                .violins
                .iter()
                .map(|v| ViolinStatus {
                    name: v.spec.name.clone(),
                    vni: v.spec.vni,
                    spec: Some(v.spec.clone()),
                    guests: self.guest_statuses(v, c),
                })
                .collect(),
            host_drops: c.host_drops.clone(),
            down: false,
        }
    }

    /// One Violin's counters here; `verdicts`: the classifier's (xdp plane).
    pub fn violin_stats(
        &self,
        name: &str,
        c: &Counters,
        verdicts: Option<&[u64; Verdict::COUNT]>,
    ) -> Option<HostViolinStats> {
        let v = self.violins.iter().find(|v| v.spec.name == name)?;
        let stats = c.violins.iter().find(|s| s.name == name)?.clone();
        let xdp = match (verdicts, &c.rings) {
            (Some(vs), Some(rings)) => Some(XdpHostStats {
                verdicts: Verdict::ALL
                    .iter()
                    .filter(|x| vs[**x as usize] > 0)
                    .map(|x| (x.name().to_string(), vs[*x as usize]))
                    .collect(),
                rings: *rings,
                socket: v.slot.and_then(|s| c.slots.get(&s).cloned()),
            }),
            _ => None,
        };
        Some(HostViolinStats {
            host: self.host.clone(),
            stats,
            ports: self.guest_statuses(v, c),
            host_drops: c.host_drops.clone(),
            dataplane: self.dataplane.clone(),
            udp_rx_frames: c.udp_rx_frames,
            xdp,
            worker: Some(v.worker),
            workers: c.workers.clone(),
        })
    }

    /// Every Violin's counters here.
    pub fn all_stats(
        &self,
        c: &Counters,
        verdicts: Option<&[u64; Verdict::COUNT]>,
    ) -> Vec<HostViolinStats> {
        self.violins
            .iter()
            .filter_map(|v| self.violin_stats(&v.spec.name, c, verdicts))
            .collect()
    }
}

/// What the control thread receives.
pub enum ManagerMsg {
    /// A request that changes this host, and where its response goes.
    Request(
        Request,
        tokio::sync::oneshot::Sender<crate::control::Response>,
    ),
    /// Tear everything down and stop.
    Stop,
}

/// The longest a VM is held on the control CPUs while it boots.
const BOOT_HOLD: std::time::Duration = std::time::Duration::from_secs(60);

/// How often guests' processes are checked (and restarted when they exited).
const TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// The control thread: carries out changes one at a time and supervises guests'
/// processes between them, until told to stop (then tears every Violin down).
pub fn run(mut m: Manager, rx: std::sync::mpsc::Receiver<ManagerMsg>) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut last_tick = Instant::now();
    loop {
        match rx.recv_timeout(BALANCE_EVERY) {
            Ok(ManagerMsg::Request(req, reply)) => {
                let r = m.handle(req);
                let _ = reply.send(crate::control::Response::from_result(r));
            }
            Ok(ManagerMsg::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            m.tick();
        }
        m.rebalance();
    }
    info!("shutting down");
    m.teardown();
}
