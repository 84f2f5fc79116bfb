//! The daemon's side of the cluster state in etcd (`[etcd]` in the host config):
//! registers the host under a lease and keeps it alive, follows the hosts and specs
//! (list, then watch from the next revision; a watch whose start was compacted lists
//! again), brings this host to its share of every spec through the manager, and
//! publishes what it runs under its own key. Local state is a cache: at each start the
//! host is brought to what etcd says.

use crate::config::{EtcdConfig, HostConfig};
use crate::control::server::{answer, Ctx};
use crate::control::{HostStatus, Request};
use crate::spec::{self, Violin};
use crate::store::{self, HostRecord, HostReport, Keys, Mirror, SpecState, Step};
use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{Client, PutOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often a host looks for changes of its guests' state to publish (it publishes at
/// once after carrying out a change of specs).
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// Follows etcd until the daemon stops: a lost connection or lease starts a new session
/// (after a pause that doubles up to 10 s), which resumes the watch where it stopped.
pub async fn run(cfg: HostConfig, ctx: Ctx) -> Result<()> {
    let e = cfg
        .etcd
        .clone()
        .ok_or_else(|| anyhow!("no [etcd] in the host config"))?;
    let mut f = Follower::new(&cfg, &e);
    let mut pause = Duration::from_secs(1);
    loop {
        let t0 = Instant::now();
        if let Err(err) = session(&cfg, &e, &ctx, &mut f).await {
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
}

impl Follower {
    fn new(cfg: &HostConfig, e: &EtcdConfig) -> Follower {
        let keys = Keys::new(&e.cluster);
        Follower {
            me: cfg.name.clone(),
            mirror: Mirror::new(&keys.config()),
            keys,
            applied: BTreeMap::new(),
            specs: BTreeMap::new(),
            published: Vec::new(),
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
            .filter_map(|k| k.strip_prefix("specs/"))
            .map(str::to_string)
            .collect();
        if everything || changed.iter().any(|k| k.starts_with("hosts/")) {
            names.extend(self.mirror.under("specs/").map(|(k, _, _)| k.to_string()));
            names.extend(self.applied.keys().cloned());
        }
        let hosts = self.hosts();
        for name in names {
            self.one(ctx, &name, &hosts).await;
        }
    }

    async fn one(&mut self, ctx: &Ctx, name: &str, hosts: &BTreeMap<String, Ipv4Addr>) {
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
            Ok(v) if !v.hosts.contains_key(&self.me) => {
                self.remove(ctx, name).await;
                None
            }
            Ok(v) if self.applied.get(name) == Some(&v) => None,
            Ok(v) => match request(ctx, Request::ApplyViolin { violin: v.clone() }).await {
                Ok(_) => {
                    info!(violin = name, revision, "applied from etcd");
                    self.applied.insert(name.into(), v);
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
        let report = HostReport {
            revision: self.mirror.revision,
            specs: self.specs.clone(),
            status,
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

async fn request(ctx: &Ctx, req: Request) -> Result<serde_json::Value> {
    let r = answer(req, ctx).await;
    if r.ok {
        Ok(r.data)
    } else {
        Err(anyhow!(r.error.unwrap_or_else(|| "refused".into())))
    }
}

async fn session(cfg: &HostConfig, e: &EtcdConfig, ctx: &Ctx, f: &mut Follower) -> Result<()> {
    let mut c = store::connect(&e.endpoints, e.tls.as_ref()).await?;
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
        }
    }
}
