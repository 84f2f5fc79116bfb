//! The cluster's state in etcd, shared by the daemons and the CLI: where each record
//! lives, what it holds, a mirror of a prefix kept by list + watch, and the CLI's
//! blocking client.
//!
//! Keys, under `/violin/CLUSTER/`:
//! - `config/hosts/HOST`: a host's registration ([`HostRecord`]), written when it joins;
//! - `config/specs/VIOLIN`: the spec text a Violin runs with; its `mod_revision` names
//!   the change;
//! - `config/migrations/VIOLIN`: a guest of the Violin moving between two hosts
//!   ([`MigrationOrder`]), written by the CLI and removed once every host runs the
//!   spec with the guest on its new host;
//! - `state/alive/HOST`: present while the host keeps its lease alive;
//! - `state/status/HOST`: what the host runs and which revision it has taken
//!   ([`HostReport`]), written by that host.
//!
//! Daemons watch `config/` only, so hosts' status updates wake no other host.

use crate::config::EtcdTls;
use crate::control::HostStatus;
use anyhow::{anyhow, bail, Context, Result};
use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions, WatchResponse};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

/// The key layout of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    root: String,
}

impl Keys {
    pub fn new(cluster: &str) -> Keys {
        Keys {
            root: format!("/violin/{cluster}/"),
        }
    }
    /// What daemons watch: hosts and specs.
    pub fn config(&self) -> String {
        format!("{}config/", self.root)
    }
    pub fn hosts(&self) -> String {
        format!("{}config/hosts/", self.root)
    }
    pub fn host(&self, h: &str) -> String {
        format!("{}{h}", self.hosts())
    }
    pub fn specs(&self) -> String {
        format!("{}config/specs/", self.root)
    }
    pub fn spec(&self, v: &str) -> String {
        format!("{}{v}", self.specs())
    }
    pub fn migrations(&self) -> String {
        format!("{}config/migrations/", self.root)
    }
    pub fn migration(&self, v: &str) -> String {
        format!("{}{v}", self.migrations())
    }
    pub fn alive_prefix(&self) -> String {
        format!("{}state/alive/", self.root)
    }
    pub fn alive(&self, h: &str) -> String {
        format!("{}{h}", self.alive_prefix())
    }
    pub fn statuses(&self) -> String {
        format!("{}state/status/", self.root)
    }
    pub fn status(&self, h: &str) -> String {
        format!("{}{h}", self.statuses())
    }
    /// Every key of the cluster.
    pub fn all(&self) -> String {
        self.root.clone()
    }
}

/// A host's registration: what specs and peers need to know of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub name: String,
    pub underlay: Ipv4Addr,
    pub dataplane: String,
    pub mtu: u32,
    /// Most guests it takes over all Violins.
    pub max_guests: usize,
    /// The daemon's version.
    pub version: String,
    /// Its metrics server, where `violin stats` reads its counters.
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// How a host stands with one Violin's spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecState {
    /// The spec's `mod_revision` this host last acted on.
    pub revision: i64,
    /// Whether the spec has guests on this host (else the host keeps nothing of it).
    pub here: bool,
    /// Why this host could not run the spec (it keeps what it had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a host publishes about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostReport {
    /// Every change of `config/` up to this revision is carried out.
    pub revision: i64,
    pub specs: BTreeMap<String, SpecState>,
    pub status: HostStatus,
    /// Its part in each Violin's migration under way, by Violin.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub migrations: BTreeMap<String, MigrationReport>,
}

/// `violin migrate`: move `guest` from host `from` to host `to`. `spec` is the Violin's
/// spec with the guest on `to`; the CLI stores it as the Violin's spec once the guest's
/// state is there (at once for a netns guest; after QEMU's copy for a VM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationOrder {
    pub guest: String,
    pub from: String,
    pub to: String,
    /// A VM: `to` starts it waiting for its state, and `from` has QEMU send it.
    pub live: bool,
    pub spec: String,
}

/// A host's part in one migration: the order (by its `mod_revision`) and how far it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub order: i64,
    pub phase: MigrationPhase,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum MigrationPhase {
    /// Source: waiting for the target to listen.
    Waiting,
    /// Target: the VM waits for its state at `uri` (QEMU's `-incoming`).
    Listening { uri: String },
    /// Source: QEMU is sending the VM's state.
    Copying { uri: String },
    /// Source: the copy completed; the VM is paused here and runs on the target.
    Copied {
        downtime_ms: Option<u64>,
        total_ms: Option<u64>,
        ram_bytes: Option<u64>,
    },
    /// Either side: the migration cannot go on; the guest keeps running on `from`.
    Failed { error: String },
}

/// The keys and values under a prefix as of `revision`, kept by list + watch.
#[derive(Debug, Default)]
pub struct Mirror {
    pub prefix: String,
    /// Key (without the prefix) → (value, mod_revision).
    pub kv: BTreeMap<String, (Vec<u8>, i64)>,
    /// Everything up to this revision is in `kv`.
    pub revision: i64,
    /// Times the mirror was listed whole (the first time, and after each compaction or
    /// lost watch that could not resume).
    pub lists: u64,
}

/// What one watch response does to a [`Mirror`].
#[derive(Debug, PartialEq)]
pub enum Step {
    /// These keys (without the prefix) changed.
    Changed(Vec<String>),
    /// The watch ended (its start was compacted away, or the server cancelled it):
    /// list again.
    Relist(String),
}

impl Mirror {
    pub fn new(prefix: &str) -> Mirror {
        Mirror {
            prefix: prefix.into(),
            ..Default::default()
        }
    }

    /// Lists the prefix whole; returns every key that is new, changed or gone.
    pub async fn list(&mut self, c: &mut Client) -> Result<Vec<String>> {
        let r = c
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .with_context(|| format!("listing {}", self.prefix))?;
        let revision = r.header().map_or(0, |h| h.revision());
        let mut kv = BTreeMap::new();
        for x in r.kvs() {
            if let Some(k) = x.key_str().ok().and_then(|k| k.strip_prefix(&self.prefix)) {
                kv.insert(k.to_string(), (x.value().to_vec(), x.mod_revision()));
            }
        }
        let changed: BTreeSet<String> = kv
            .iter()
            .filter(|(k, v)| self.kv.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .chain(self.kv.keys().filter(|k| !kv.contains_key(*k)).cloned())
            .collect();
        self.kv = kv;
        self.revision = revision;
        self.lists += 1;
        Ok(changed.into_iter().collect())
    }

    /// A watch of the prefix from the first revision the mirror lacks.
    pub async fn watch(&self, c: &mut Client) -> Result<etcd_client::WatchStream> {
        c.watch(
            self.prefix.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(self.revision + 1),
            ),
        )
        .await
        .with_context(|| format!("watching {}", self.prefix))
    }

    /// Takes one watch response in.
    pub fn apply(&mut self, w: &WatchResponse) -> Step {
        if w.compact_revision() > 0 {
            return Step::Relist(format!(
                "revision {} is compacted (oldest kept: {})",
                self.revision + 1,
                w.compact_revision()
            ));
        }
        if w.canceled() {
            return Step::Relist(format!("watch cancelled: {}", w.cancel_reason()));
        }
        let mut changed = BTreeSet::new();
        for e in w.events() {
            let Some(kv) = e.kv() else { continue };
            let Some(k) = kv.key_str().ok().and_then(|k| k.strip_prefix(&self.prefix)) else {
                continue;
            };
            match e.event_type() {
                etcd_client::EventType::Put => {
                    self.kv
                        .insert(k.to_string(), (kv.value().to_vec(), kv.mod_revision()));
                }
                etcd_client::EventType::Delete => {
                    self.kv.remove(k);
                }
            }
            self.revision = self.revision.max(kv.mod_revision());
            changed.insert(k.to_string());
        }
        if let Some(h) = w.header() {
            // Progress notifications move the revision on without events.
            if w.events().is_empty() && !w.created() {
                self.revision = self.revision.max(h.revision());
            }
        }
        Step::Changed(changed.into_iter().collect())
    }

    /// The entries under a sub-prefix (`hosts/`), with it stripped.
    pub fn under<'a>(&'a self, sub: &'a str) -> impl Iterator<Item = (&'a str, &'a [u8], i64)> {
        self.kv
            .iter()
            .filter_map(move |(k, (v, r))| Some((k.strip_prefix(sub)?, v.as_slice(), *r)))
    }
}

/// Connects to one member of `endpoints` that answers, trying them from a place that
/// varies between calls (so hosts spread over the members). One member at a time: a
/// channel balanced over all of them keeps sending requests to a dead one.
pub async fn connect(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<Client> {
    if endpoints.is_empty() {
        bail!("no etcd endpoint given (--etcd URL,… or VIOLIN_ETCD)");
    }
    let n = endpoints.len();
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize)
        % n;
    let mut errors = Vec::new();
    for i in 0..n {
        let ep = &endpoints[(start + i) % n];
        match connect_one(ep, tls).await {
            Ok(c) => return Ok(c),
            Err(e) => errors.push(format!("{ep}: {e:#}")),
        }
    }
    bail!("no etcd member answered: {}", errors.join("; "))
}

async fn connect_one(ep: &str, tls: Option<&EtcdTls>) -> Result<Client> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    if let Some(t) = tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        opts = opts.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca)?))
                .identity(etcd_client::Identity::from_pem(
                    read(&t.cert)?,
                    read(&t.key)?,
                )),
        );
    }
    let mut c = Client::connect([ep], Some(opts)).await?;
    tokio::time::timeout(Duration::from_secs(2), c.status())
        .await
        .map_err(|_| anyhow!("no answer within 2 s"))??;
    Ok(c)
}

/// Keys under a prefix (with it stripped), their values and `mod_revision`s.
type Entries = Vec<(String, Vec<u8>, i64)>;

/// The CLI's view of one cluster in etcd: blocking calls on a runtime of its own.
pub struct Store {
    rt: tokio::runtime::Runtime,
    client: Client,
    pub keys: Keys,
    pub endpoints: Vec<String>,
    tls: Option<EtcdTls>,
}

/// Whether a request may succeed if tried again (elsewhere).
fn transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown
        ),
        _ => false,
    }
}

/// A spec as stored: its text and the revision it was written at.
#[derive(Debug, Clone)]
pub struct StoredSpec {
    pub text: String,
    pub revision: i64,
}

/// Every host's registration, liveness and last report.
#[derive(Debug, Clone)]
pub struct HostView {
    pub record: HostRecord,
    pub alive: bool,
    pub report: Option<HostReport>,
}

impl Store {
    pub fn connect(endpoints: &[String], tls: Option<&EtcdTls>, cluster: &str) -> Result<Store> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = rt.block_on(connect(endpoints, tls))?;
        Ok(Store {
            rt,
            client,
            keys: Keys::new(cluster),
            endpoints: endpoints.to_vec(),
            tls: tls.cloned(),
        })
    }

    /// Runs one request; a transient failure (an election, a member gone) is retried on
    /// another member for up to 10 s.
    fn call<T, F, Fut>(&mut self, what: &str, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let t0 = std::time::Instant::now();
        loop {
            match self.rt.block_on(f(self.client.clone())) {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) && t0.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(200));
                    if let Ok(c) = self
                        .rt
                        .block_on(connect(&self.endpoints, self.tls.as_ref()))
                    {
                        self.client = c;
                    }
                }
                Err(e) => return Err(e).with_context(|| what.to_string()),
            }
        }
    }

    fn get_prefix(&mut self, prefix: &str) -> Result<(i64, Entries)> {
        let key = prefix.to_string();
        let r = self.call(&format!("reading {prefix} from etcd"), |mut c| {
            let key = key.clone();
            async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
        })?;
        let rev = r.header().map_or(0, |h| h.revision());
        Ok((
            rev,
            r.kvs()
                .iter()
                .filter_map(|x| {
                    let k = x.key_str().ok()?.strip_prefix(prefix)?.to_string();
                    Some((k, x.value().to_vec(), x.mod_revision()))
                })
                .collect(),
        ))
    }

    /// The registered hosts, whether each is alive, and what each last reported.
    pub fn hosts(&mut self) -> Result<Vec<HostView>> {
        let (_, recs) = self.get_prefix(&self.keys.hosts())?;
        let (_, alive) = self.get_prefix(&self.keys.alive_prefix())?;
        let (_, reports) = self.get_prefix(&self.keys.statuses())?;
        let alive: BTreeSet<String> = alive.into_iter().map(|(k, _, _)| k).collect();
        let mut reports: BTreeMap<String, HostReport> = reports
            .into_iter()
            .filter_map(|(k, v, _)| Some((k, serde_json::from_slice(&v).ok()?)))
            .collect();
        let mut out = Vec::new();
        for (k, v, _) in recs {
            let record: HostRecord = serde_json::from_slice(&v)
                .with_context(|| format!("host record {k} in etcd is not valid"))?;
            out.push(HostView {
                alive: alive.contains(&k),
                report: reports.remove(&k),
                record,
            });
        }
        Ok(out)
    }

    pub fn spec(&mut self, name: &str) -> Result<Option<StoredSpec>> {
        let key = self.keys.spec(name);
        let r = self.call(&format!("reading {key} from etcd"), |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(r.kvs().first().map(|x| StoredSpec {
            text: String::from_utf8_lossy(x.value()).into_owned(),
            revision: x.mod_revision(),
        }))
    }

    pub fn specs(&mut self) -> Result<BTreeMap<String, StoredSpec>> {
        let (_, all) = self.get_prefix(&self.keys.specs())?;
        Ok(all
            .into_iter()
            .map(|(k, v, r)| {
                (
                    k,
                    StoredSpec {
                        text: String::from_utf8_lossy(&v).into_owned(),
                        revision: r,
                    },
                )
            })
            .collect())
    }

    /// Stores a spec; returns the revision that names this change.
    pub fn put_spec(&mut self, name: &str, text: &str) -> Result<i64> {
        let key = self.keys.spec(name);
        self.put_raw(&key, text.as_bytes(), None)
    }

    /// Removes a spec; returns the revision of the removal.
    pub fn delete_spec(&mut self, name: &str) -> Result<i64> {
        let key = self.keys.spec(name);
        self.delete_raw(&key)
    }

    /// The Violin's migration under way, if any, and the revision that wrote it.
    pub fn migration(&mut self, name: &str) -> Result<Option<(MigrationOrder, i64)>> {
        let key = self.keys.migration(name);
        let r = self.call(&format!("reading {key} from etcd"), |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        match r.kvs().first() {
            None => Ok(None),
            Some(x) => Ok(Some((
                serde_json::from_slice(x.value())
                    .with_context(|| format!("{key} in etcd is not a migration order"))?,
                x.mod_revision(),
            ))),
        }
    }

    /// Stores a migration order unless the Violin has one already; returns its revision,
    /// or None when another order is there.
    pub fn create_migration(&mut self, name: &str, o: &MigrationOrder) -> Result<Option<i64>> {
        use etcd_client::{Compare, CompareOp, Txn, TxnOp};
        let key = self.keys.migration(name);
        let value = serde_json::to_vec(o)?;
        let r = self.call(&format!("writing {key} to etcd"), |mut c| {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
            async move { c.txn(txn).await }
        })?;
        Ok(match r.succeeded() {
            true => r.header().map(|h| h.revision()),
            false => None,
        })
    }

    pub fn delete_migration(&mut self, name: &str) -> Result<i64> {
        let key = self.keys.migration(name);
        self.delete_raw(&key)
    }

    fn delete_raw(&mut self, key: &str) -> Result<i64> {
        let r = self.call(&format!("removing {key} from etcd"), |mut c| {
            let key = key.to_string();
            async move { c.delete(key, None).await }
        })?;
        r.header()
            .map(|h| h.revision())
            .ok_or_else(|| anyhow!("etcd answered a delete without a header"))
    }

    /// Writes a key; `lease` attaches it to a lease. Returns the revision.
    pub fn put_raw(&mut self, key: &str, value: &[u8], lease: Option<i64>) -> Result<i64> {
        let r = self.call(&format!("writing {key} to etcd"), |mut c| {
            let (key, value) = (key.to_string(), value.to_vec());
            async move {
                c.put(key, value, lease.map(|l| PutOptions::new().with_lease(l)))
                    .await
            }
        })?;
        r.header()
            .map(|h| h.revision())
            .ok_or_else(|| anyhow!("etcd answered a put without a header"))
    }

    /// Compacts the history up to `revision` (tests: a watch must survive it).
    pub fn compact(&mut self, revision: i64) -> Result<()> {
        self.call("compacting etcd", |mut c| async move {
            c.compact(revision, None).await
        })?;
        Ok(())
    }

    /// The cluster's current revision.
    pub fn revision(&mut self) -> Result<i64> {
        Ok(self.get_prefix(&self.keys.all())?.0)
    }

    /// Bytes of keys and values the cluster holds in etcd now, and how many keys.
    pub fn footprint(&mut self) -> Result<(usize, usize)> {
        let (_, all) = self.get_prefix(&self.keys.all())?;
        Ok((
            all.iter().map(|(k, v, _)| k.len() + v.len()).sum(),
            all.len(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout() {
        let k = Keys::new("prod");
        assert_eq!(k.host("h1"), "/violin/prod/config/hosts/h1");
        assert_eq!(k.spec("blue"), "/violin/prod/config/specs/blue");
        assert_eq!(k.alive("h1"), "/violin/prod/state/alive/h1");
        assert_eq!(k.status("h1"), "/violin/prod/state/status/h1");
        // What daemons watch holds hosts and specs, and nothing hosts write often.
        assert!(k.host("h1").starts_with(&k.config()));
        assert!(k.spec("x").starts_with(&k.config()));
        assert!(!k.status("h1").starts_with(&k.config()));
        assert!(!k.alive("h1").starts_with(&k.config()));
        // One cluster's prefix is not another's.
        assert!(!Keys::new("prod2").all().starts_with(&k.all()));
    }

    #[test]
    fn a_mirror_reads_sub_prefixes() {
        let mut m = Mirror::new("/violin/c/config/");
        m.kv.insert("hosts/h1".into(), (b"1".to_vec(), 3));
        m.kv.insert("specs/blue".into(), (b"2".to_vec(), 5));
        let hosts: Vec<_> = m.under("hosts/").collect();
        assert_eq!(hosts, vec![("h1", &b"1"[..], 3)]);
        let specs: Vec<_> = m.under("specs/").map(|(k, _, r)| (k, r)).collect();
        assert_eq!(specs, vec![("blue", 5)]);
    }

    #[test]
    fn host_records_from_older_daemons_still_read() {
        let r: HostRecord = serde_json::from_str(
            r#"{"name":"h1","underlay":"10.0.0.1","dataplane":"udp","mtu":1500,"max_guests":2048,"version":"0.1.0"}"#,
        )
        .unwrap();
        assert_eq!(r.endpoint, None);
    }
}
