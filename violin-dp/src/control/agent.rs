//! The daemon's side of the cluster state in etcd (`[etcd]` in the host config):
//! registers the host under a lease and keeps it alive, follows the hosts and specs
//! (list, then watch from the next revision; a watch whose start was compacted lists
//! again), brings this host to its share of every spec through the manager, and
//! publishes what it runs under its own key. Local state is a cache: at each start the
//! host is brought to what etcd says.
//!
//! A migration order (`config/migrations/VIOLIN`) moves a guest between two hosts, which
//! carry it out between them: the target starts the VM waiting for its state on TCP and
//! publishes where; the source reads that from the target's report and has QEMU send
//! the state there; each reports how far it got. The CLI then stores the spec with the
//! guest on the target, and removes the order; the target announces the guest.

use crate::config::{EtcdConfig, HostConfig};
use crate::control::server::{answer, Ctx};
use crate::control::{GuestStatus, HostStatus, Request};
use crate::spec::{self, Violin};
use crate::store::{
    self, HostRecord, HostReport, Keys, MigrationOrder, MigrationPhase, MigrationReport, Mirror,
    SpecState, Step,
};
use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{Client, PutOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// How often a host looks for changes of its guests' state to publish (it publishes at
/// once after carrying out a change of specs).
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// How long a source waits for the target of a live migration to listen.
const TARGET_READY_WITHIN: Duration = Duration::from_secs(120);
/// How long a VM started for a live migration may take to listen for its state.
const LISTEN_WITHIN: Duration = Duration::from_secs(30);
/// How long QEMU may take to copy a VM over.
const COPY_WITHIN: Duration = Duration::from_secs(600);
/// How long a guest moving here waits for its namespace's name to be free (hosts that
/// share a machine, as simulated ones do, share names: the old host removes it first).
const NAME_FREE_WITHIN: Duration = Duration::from_secs(5);

/// A source's progress on a live migration: Violin, order revision, phase.
type Progress = (String, i64, MigrationPhase);

/// Follows etcd until the daemon stops: a lost connection or lease starts a new session
/// (after a pause that doubles up to 10 s), which resumes the watch where it stopped.
pub async fn run(cfg: HostConfig, ctx: Ctx) -> Result<()> {
    let e = cfg
        .etcd
        .clone()
        .ok_or_else(|| anyhow!("no [etcd] in the host config"))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut f = Follower::new(&cfg, &e, tx);
    let mut pause = Duration::from_secs(1);
    loop {
        let t0 = Instant::now();
        if let Err(err) = session(&cfg, &e, &ctx, &mut f, &mut rx).await {
            warn!("etcd: {err:#}; again in {} s", pause.as_secs());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            pause = Duration::from_secs(1);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}

/// What this host knows of the cluster and has done about it.
struct Follower {
    me: String,
    keys: Keys,
    mirror: Mirror,
    /// The spec each Violin on this host runs with.
    applied: BTreeMap<String, Violin>,
    specs: BTreeMap<String, SpecState>,
    published: Vec<u8>,
    cfg: HostConfig,
    /// Each Violin's migration order as last seen, and the revision that wrote it.
    orders: BTreeMap<String, (MigrationOrder, i64)>,
    /// This host's part in them (published).
    migrations: BTreeMap<String, MigrationReport>,
    /// Violins to apply again even if their spec did not change (a VM that waited for
    /// its state now runs, or the copy prepared for it goes).
    force: BTreeSet<String>,
    /// The session's connection, for the sources' copies.
    client: Option<Client>,
    progress: mpsc::UnboundedSender<Progress>,
    /// Specs not applied yet because a guest's namespace name is still taken: since
    /// when, and the spec's revision (this host does not report it taken).
    deferred: BTreeMap<String, (Instant, i64)>,
}

impl Follower {
    fn new(
        cfg: &HostConfig,
        e: &EtcdConfig,
        progress: mpsc::UnboundedSender<Progress>,
    ) -> Follower {
        let keys = Keys::new(&e.cluster);
        Follower {
            me: cfg.name.clone(),
            mirror: Mirror::new(&keys.config()),
            keys,
            applied: BTreeMap::new(),
            specs: BTreeMap::new(),
            published: Vec::new(),
            cfg: cfg.clone(),
            orders: BTreeMap::new(),
            migrations: BTreeMap::new(),
            force: BTreeSet::new(),
            client: None,
            progress,
            deferred: BTreeMap::new(),
        }
    }

    /// Netns guests `v` adds to this host whose namespace name exists here already.
    fn names_taken(&self, name: &str, v: &Violin) -> Vec<String> {
        let had = self.applied.get(name);
        v.members
            .iter()
            .filter(|m| m.host() == Some(self.me.as_str()))
            .filter(|m| {
                matches!(
                    m.kind,
                    spec::MemberKind::Guest {
                        kind: spec::GuestKind::Netns,
                        ..
                    }
                )
            })
            .filter(|m| {
                !had.is_some_and(|h| {
                    h.members
                        .iter()
                        .any(|x| x.name == m.name && x.host() == m.host())
                })
            })
            .map(|m| self.cfg.guest_netns(name, &m.name))
            .filter(|ns| crate::host::netns::exists(ns))
            .collect()
    }

    /// Whether to wait with `v` (at `revision`) for a namespace name to be free.
    fn defer(&mut self, name: &str, v: &Violin, revision: i64) -> bool {
        let taken = self.names_taken(name, v);
        if taken.is_empty() {
            self.deferred.remove(name);
            return false;
        }
        let since = self
            .deferred
            .entry(name.into())
            .or_insert((Instant::now(), revision));
        since.1 = revision;
        if since.0.elapsed() < NAME_FREE_WITHIN {
            return true;
        }
        self.deferred.remove(name);
        warn!(
            violin = name,
            "namespaces {taken:?} still exist after {} s",
            NAME_FREE_WITHIN.as_secs()
        );
        false
    }

    /// Tries the deferred specs again.
    async fn retry(&mut self, ctx: &Ctx) {
        let names: Vec<String> = self.deferred.keys().cloned().collect();
        let hosts = self.hosts();
        for name in names {
            self.one(ctx, &name, &hosts).await;
        }
    }

    fn order(&self, name: &str) -> Option<(MigrationOrder, i64)> {
        let (v, r) = self.mirror.kv.get(&format!("migrations/{name}"))?;
        match serde_json::from_slice(v) {
            Ok(o) => Some((o, *r)),
            Err(e) => {
                warn!(
                    violin = name,
                    "ignoring a migration order that does not parse: {e}"
                );
                None
            }
        }
    }

    fn hosts(&self) -> BTreeMap<String, Ipv4Addr> {
        self.mirror
            .under("hosts/")
            .filter_map(|(k, v, _)| {
                let r: HostRecord = serde_json::from_slice(v).ok()?;
                Some((k.to_string(), r.underlay))
            })
            .collect()
    }

    /// Brings this host to the specs named by `changed` keys (`specs/NAME`); a changed
    /// host (`hosts/NAME`) re-reads every spec, and so does `everything`.
    async fn reconcile(&mut self, ctx: &Ctx, changed: &[String], everything: bool) {
        let mut names: BTreeSet<String> = changed
            .iter()
            .filter_map(|k| {
                k.strip_prefix("specs/")
                    .or_else(|| k.strip_prefix("migrations/"))
            })
            .map(str::to_string)
            .collect();
        if everything || changed.iter().any(|k| k.starts_with("hosts/")) {
            names.extend(self.mirror.under("specs/").map(|(k, _, _)| k.to_string()));
            names.extend(
                self.mirror
                    .under("migrations/")
                    .map(|(k, _, _)| k.to_string()),
            );
            names.extend(self.applied.keys().cloned());
            names.extend(self.orders.keys().cloned());
        }
        let hosts = self.hosts();
        for name in names {
            self.one(ctx, &name, &hosts).await;
        }
    }

    async fn one(&mut self, ctx: &Ctx, name: &str, hosts: &BTreeMap<String, Ipv4Addr>) {
        // A migration order that ended (or was replaced): the target announces the guest
        // once the order is gone, and what was prepared for it is reconciled with the spec.
        let order = self.order(name);
        let mut announce = None;
        if let Some((old, rev)) = self.orders.get(name).cloned() {
            if order.as_ref().map(|o| o.1) != Some(rev) {
                self.orders.remove(name);
                if self.migrations.remove(name).is_some() && old.to == self.me {
                    self.force.insert(name.to_string());
                }
                if order.is_none() && old.to == self.me {
                    announce = Some(old.guest);
                }
            }
        }
        if let Some((o, rev)) = &order {
            self.orders.insert(name.to_string(), (o.clone(), *rev));
            if o.live && !self.migrations.contains_key(name) {
                if o.to == self.me {
                    self.prepare(ctx, name, o, *rev, hosts).await;
                } else if o.from == self.me {
                    self.send_state(ctx, name, o, *rev).await;
                }
            }
        }
        // While a VM waits here for its state, this host runs the order's spec.
        let waiting = order.as_ref().is_some_and(|(o, _)| {
            o.to == self.me
                && matches!(
                    self.migrations.get(name).map(|m| &m.phase),
                    Some(MigrationPhase::Listening { .. })
                )
        });
        let stored = self
            .mirror
            .kv
            .get(&format!("specs/{name}"))
            .map(|(v, r)| (String::from_utf8_lossy(v).into_owned(), *r));
        let Some((text, revision)) = stored else {
            self.remove(ctx, name).await;
            self.specs.remove(name);
            return;
        };
        let error = match spec::parse(&text, hosts) {
            Err(e) => Some(format!("{e}")),
            Ok(v) if waiting && self.applied.get(name) != Some(&v) => None,
            Ok(v) if !v.hosts.contains_key(&self.me) => {
                self.remove(ctx, name).await;
                None
            }
            Ok(v) if self.defer(name, &v, revision) => return,
            Ok(v) if self.applied.get(name) == Some(&v) && !self.force.contains(name) => None,
            Ok(v) => match request(ctx, Request::ApplyViolin { violin: v.clone() }).await {
                Ok(_) => {
                    info!(violin = name, revision, "applied from etcd");
                    self.applied.insert(name.into(), v);
                    self.force.remove(name);
                    None
                }
                Err(e) => {
                    warn!(violin = name, revision, "refused: {e:#}");
                    Some(format!("{e:#}"))
                }
            },
        };
        let here = self.applied.contains_key(name);
        self.specs.insert(
            name.into(),
            SpecState {
                revision,
                here,
                error,
            },
        );
        if let Some(g) = announce.filter(|g| {
            self.applied.get(name).is_some_and(|v| {
                v.members
                    .iter()
                    .any(|m| &m.name == g && m.host() == Some(&self.me))
            })
        }) {
            match request(
                ctx,
                Request::Announce {
                    name: name.into(),
                    guests: vec![g.clone()],
                },
            )
            .await
            {
                Ok(_) => info!(violin = name, guest = %g, "migrated here: announced"),
                Err(e) => warn!(violin = name, guest = %g, "announcing: {e:#}"),
            }
        }
    }

    /// Target of a live migration: start the VM waiting for its state on TCP, under the
    /// order's spec, and publish where it waits.
    async fn prepare(
        &mut self,
        ctx: &Ctx,
        name: &str,
        o: &MigrationOrder,
        rev: i64,
        hosts: &BTreeMap<String, Ipv4Addr>,
    ) {
        let r = async {
            let v = spec::parse(&o.spec, hosts).map_err(|e| anyhow!("{e}"))?;
            request(
                ctx,
                Request::PrepareIncoming {
                    violin: v.clone(),
                    guests: vec![o.guest.clone()],
                    listen: Some(self.cfg.underlay),
                },
            )
            .await?;
            // What was prepared goes again when the order does.
            self.applied.insert(name.into(), v);
            self.force.insert(name.into());
            let uri = guest_status(ctx, name, &o.guest)
                .await?
                .and_then(|g| g.incoming)
                .ok_or_else(|| {
                    anyhow!("{} was started but does not wait for its state", o.guest)
                })?;
            // The source may connect once QEMU listens.
            let (addr, port) = crate::host::vm::tcp_uri(&uri)
                .ok_or_else(|| anyhow!("{} waits at {uri}, not on TCP", o.guest))?;
            let t0 = Instant::now();
            while !crate::host::vm::tcp_listening(addr, port) {
                if t0.elapsed() > LISTEN_WITHIN {
                    bail!(
                        "QEMU did not listen at {uri} within {} s",
                        LISTEN_WITHIN.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(uri)
        }
        .await;
        let phase = match r {
            Ok(uri) => {
                info!(violin = name, guest = %o.guest, from = %o.from, %uri, "waiting for a live migration");
                MigrationPhase::Listening { uri }
            }
            Err(e) => {
                warn!(violin = name, guest = %o.guest, "preparing a live migration: {e:#}");
                MigrationPhase::Failed {
                    error: format!("{}: {e:#}", self.me),
                }
            }
        };
        self.migrations
            .insert(name.into(), MigrationReport { order: rev, phase });
    }

    /// Source of a live migration: once the target listens, have QEMU send the VM's
    /// state there (on a task of its own; progress comes back to the session).
    async fn send_state(&mut self, ctx: &Ctx, name: &str, o: &MigrationOrder, rev: i64) {
        let qmp = guest_status(ctx, name, &o.guest).await.and_then(|g| {
            g.and_then(|g| g.qmp)
                .ok_or_else(|| anyhow!("{} on {} has no QMP socket", o.guest, self.me))
        });
        let (qmp, client) = match (qmp, self.client.clone()) {
            (Ok(q), Some(c)) => (q, c),
            (Err(e), _) => {
                let error = format!("{e:#}");
                self.migrations.insert(
                    name.into(),
                    MigrationReport {
                        order: rev,
                        phase: MigrationPhase::Failed { error },
                    },
                );
                return;
            }
            (_, None) => return,
        };
        self.migrations.insert(
            name.into(),
            MigrationReport {
                order: rev,
                phase: MigrationPhase::Waiting,
            },
        );
        let (keys, tx, name, o) = (
            self.keys.clone(),
            self.progress.clone(),
            name.to_string(),
            o.clone(),
        );
        tokio::spawn(async move {
            let phase = match copy(client, &keys, &name, &o, rev, &qmp, &tx).await {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => MigrationPhase::Failed {
                    error: format!("{e:#}"),
                },
            };
            let _ = tx.send((name, rev, phase));
        });
    }

    /// A source's copy moved on: published if its order still stands.
    fn progressed(&mut self, (name, rev, phase): Progress) {
        if self.orders.get(&name).is_some_and(|(_, r)| *r == rev) {
            match &phase {
                MigrationPhase::Failed { error } => {
                    warn!(violin = %name, "live migration failed: {error}")
                }
                p => info!(violin = %name, phase = ?p, "live migration"),
            }
            self.migrations
                .insert(name, MigrationReport { order: rev, phase });
        }
    }

    async fn remove(&mut self, ctx: &Ctx, name: &str) {
        if self.applied.remove(name).is_some() {
            match request(ctx, Request::RemoveViolin { name: name.into() }).await {
                Ok(_) => info!(violin = name, "removed (no longer in etcd for this host)"),
                Err(e) => warn!(violin = name, "removing: {e:#}"),
            }
        }
    }

    /// Writes this host's report if it changed.
    async fn publish(&mut self, c: &mut Client, ctx: &Ctx) -> Result<()> {
        let mut status: HostStatus = serde_json::from_value(request(ctx, Request::Status).await?)?;
        // State, not traffic: counters would rewrite the key every second (and grow
        // etcd's history); whether a guest has sent a frame yet stays.
        status.host_drops.clear();
        // The specs are in etcd already: a host's report grows with its guests only.
        for v in &mut status.violins {
            v.spec = None;
        }
        for g in status.violins.iter_mut().flat_map(|v| v.guests.iter_mut()) {
            let seen = g.counters.rx_frames.min(1);
            g.counters = Default::default();
            g.counters.rx_frames = seen;
        }
        // A deferred spec is not taken yet.
        let revision = self
            .deferred
            .values()
            .map(|(_, r)| r - 1)
            .fold(self.mirror.revision, i64::min);
        let report = HostReport {
            revision,
            specs: self.specs.clone(),
            status,
            migrations: self.migrations.clone(),
        };
        let bytes = serde_json::to_vec(&report)?;
        if bytes != self.published {
            c.put(self.keys.status(&self.me), bytes.clone(), None)
                .await
                .context("publishing this host's status")?;
            self.published = bytes;
        }
        Ok(())
    }
}

/// Waits for the target of order `rev` to listen, then has QEMU send the VM's state
/// there. None: the order went away meanwhile.
async fn copy(
    mut c: Client,
    keys: &Keys,
    name: &str,
    o: &MigrationOrder,
    rev: i64,
    qmp: &str,
    tx: &mpsc::UnboundedSender<Progress>,
) -> Result<Option<MigrationPhase>> {
    let t0 = Instant::now();
    let uri = loop {
        let order = c.get(keys.migration(name), None).await?;
        if order.kvs().first().map(|x| x.mod_revision()) != Some(rev) {
            return Ok(None);
        }
        let r = c.get(keys.status(&o.to), None).await?;
        let report: Option<HostReport> = r
            .kvs()
            .first()
            .and_then(|x| serde_json::from_slice(x.value()).ok());
        match report
            .as_ref()
            .and_then(|r| r.migrations.get(name))
            .filter(|m| m.order == rev)
            .map(|m| &m.phase)
        {
            Some(MigrationPhase::Listening { uri }) => break uri.clone(),
            Some(MigrationPhase::Failed { error }) => {
                return Ok(Some(MigrationPhase::Failed {
                    error: error.clone(),
                }))
            }
            _ if t0.elapsed() > TARGET_READY_WITHIN => bail!(
                "{} did not start {} waiting for its state within {} s",
                o.to,
                o.guest,
                TARGET_READY_WITHIN.as_secs()
            ),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let _ = tx.send((
        name.into(),
        rev,
        MigrationPhase::Copying { uri: uri.clone() },
    ));
    let qmp = qmp.to_string();
    let m = tokio::task::spawn_blocking(move || {
        crate::host::vm::live_migrate(std::path::Path::new(&qmp), &uri, COPY_WITHIN)
    })
    .await??;
    Ok(Some(MigrationPhase::Copied {
        downtime_ms: m.downtime_ms,
        total_ms: m.total_ms,
        ram_bytes: m.ram_transferred,
    }))
}

/// What this host's daemon reports of `guest` of Violin `violin`, if it runs here.
async fn guest_status(ctx: &Ctx, violin: &str, guest: &str) -> Result<Option<GuestStatus>> {
    let st: HostStatus = serde_json::from_value(request(ctx, Request::Status).await?)?;
    Ok(st
        .violins
        .into_iter()
        .filter(|x| x.name == violin)
        .flat_map(|x| x.guests)
        .find(|g| g.name == guest))
}

async fn request(ctx: &Ctx, req: Request) -> Result<serde_json::Value> {
    let r = answer(req, ctx).await;
    if r.ok {
        Ok(r.data)
    } else {
        Err(anyhow!(r.error.unwrap_or_else(|| "refused".into())))
    }
}

async fn session(
    cfg: &HostConfig,
    e: &EtcdConfig,
    ctx: &Ctx,
    f: &mut Follower,
    progress: &mut mpsc::UnboundedReceiver<Progress>,
) -> Result<()> {
    let mut c = store::connect(&e.endpoints, e.tls.as_ref()).await?;
    f.client = Some(c.clone());
    let status: HostStatus = serde_json::from_value(request(ctx, Request::Status).await?)?;
    let iface = cfg.interface.clone();
    let mtu = tokio::task::spawn_blocking(move || {
        crate::host::netlink::with_handle(|h| async move {
            crate::host::netlink::mtu_and_kind(&h, &iface).await
        })
    })
    .await?
    .map_or(0, |(m, _)| m);
    let record = HostRecord {
        name: cfg.name.clone(),
        underlay: cfg.underlay,
        dataplane: status.dataplane.clone(),
        mtu,
        max_guests: cfg.max_guests.unwrap_or(crate::config::DEFAULT_MAX_GUESTS),
        version: env!("CARGO_PKG_VERSION").into(),
        endpoint: e.advertise.clone().or_else(|| {
            cfg.metrics_port
                .map(|p| format!("http://{}:{p}", cfg.underlay))
        }),
    };
    c.put(f.keys.host(&f.me), serde_json::to_vec(&record)?, None)
        .await
        .context("registering this host")?;
    let ttl = e.lease_ttl.max(2) as i64;
    let lease = c
        .lease_grant(ttl, None)
        .await
        .context("taking a lease")?
        .id();
    c.put(
        f.keys.alive(&f.me),
        Vec::new(),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .context("marking this host alive")?;
    let (mut keeper, mut kept) = c.lease_keep_alive(lease).await?;
    // What this host runs now (restored from its cache, or left by the last session).
    f.applied = status
        .violins
        .into_iter()
        .filter_map(|v| Some((v.name, v.spec?)))
        .collect();
    if f.mirror.lists == 0 {
        let changed = f.mirror.list(&mut c).await?;
        f.reconcile(ctx, &changed, true).await;
    } else {
        f.reconcile(ctx, &[], true).await;
    }
    info!(
        revision = f.mirror.revision,
        violins = f.applied.len(),
        "joined the cluster through etcd (lease {ttl} s)"
    );
    f.publish(&mut c, ctx).await?;
    let mut watch = f.mirror.watch(&mut c).await?;
    let mut keep_every = tokio::time::interval(Duration::from_millis((ttl as u64 * 1000) / 3));
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    let mut again = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            m = watch.message() => {
                let Some(w) = m.context("watching the cluster's specs")? else {
                    bail!("the watch ended");
                };
                match f.mirror.apply(&w) {
                    Step::Changed(keys) if keys.is_empty() => {}
                    Step::Changed(keys) => {
                        f.reconcile(ctx, &keys, false).await;
                        f.publish(&mut c, ctx).await?;
                    }
                    Step::Relist(why) => {
                        warn!("etcd: {why}; listing again");
                        let changed = f.mirror.list(&mut c).await?;
                        f.reconcile(ctx, &changed, true).await;
                        f.publish(&mut c, ctx).await?;
                        watch = f.mirror.watch(&mut c).await?;
                    }
                }
            }
            _ = keep_every.tick() => keeper.keep_alive().await.context("keeping the lease")?,
            k = kept.message() => match k.context("keeping the lease")? {
                Some(r) if r.ttl() <= 0 => bail!("the lease expired: this host was shown down"),
                Some(_) => {}
                None => bail!("the lease's keep-alive stream ended"),
            },
            _ = tick.tick() => f.publish(&mut c, ctx).await?,
            _ = again.tick(), if !f.deferred.is_empty() => {
                f.retry(ctx).await;
                if f.deferred.is_empty() {
                    f.publish(&mut c, ctx).await?;
                }
            }
            Some(p) = progress.recv() => {
                f.progressed(p);
                f.publish(&mut c, ctx).await?;
            }
        }
    }
}
