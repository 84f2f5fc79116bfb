//! A Violin's life across the cluster's hosts: `up`, `apply`, `scale`, `migrate`, `down`.
//!
//! Every change is one new spec. On a cluster with etcd (the default) it is written to
//! etcd and every host takes its share; the CLI waits until each host it involves
//! reports that revision, and a host that refuses brings the previous spec back. On a
//! cluster without etcd the spec is pushed to each host's control socket
//! (`ApplyViolin`), the hosts that no longer have guests told to drop it, and a host
//! that refuses rolls the others back. Either way a change lands whole or not at all,
//! and the spec text is kept (in etcd, or the cluster's state directory) so `scale` and
//! `migrate` edit what the user wrote.

use crate::cluster::{self, ClusterState};
use crate::control::{self, Applied, HostStatus, Request};
use crate::probe;
use crate::spec::{self, GuestKind, MemberKind, Violin};
use crate::store::{MigrationOrder, MigrationPhase, Store};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the spec text of each Violin lives.
fn spec_path(st: &ClusterState, name: &str) -> PathBuf {
    cluster::state_dir(&st.run_dir, &st.name)
        .join("specs")
        .join(format!("{name}.toml"))
}

fn save_spec(st: &ClusterState, name: &str, text: &str) -> Result<()> {
    if let Some(mut s) = st.store()? {
        return s.put_spec(name, text).map(|_| ());
    }
    let p = spec_path(st, name);
    std::fs::create_dir_all(p.parent().unwrap())?;
    std::fs::write(&p, text).with_context(|| format!("saving {}", p.display()))
}

/// The spec text `name` was last created or changed from.
pub fn load_spec(st: &ClusterState, name: &str) -> Result<String> {
    if let Some(mut s) = st.store()? {
        return s
            .spec(name)?
            .map(|x| x.text)
            .ok_or_else(|| anyhow!("no Violin named {name:?} in etcd"));
    }
    let p = spec_path(st, name);
    std::fs::read_to_string(&p).with_context(|| {
        format!(
            "no saved spec for Violin {name:?} ({}); was it created with `violin up`?",
            p.display()
        )
    })
}

/// Each host's status, in the order of `st.hosts`: from etcd (what each host last
/// published; `down` when its lease expired), or asked of each daemon.
pub fn statuses(st: &ClusterState) -> Result<Vec<HostStatus>> {
    statuses_from(st, st.store()?.as_mut())
}

/// `statuses`, through an open connection to etcd if the cluster has one.
fn statuses_from(st: &ClusterState, store: Option<&mut Store>) -> Result<Vec<HostStatus>> {
    if let Some(s) = store {
        let views = s.hosts()?;
        return Ok(st
            .hosts
            .iter()
            .map(|h| {
                let v = views.iter().find(|v| v.record.name == h.name);
                let mut status = v
                    .and_then(|v| v.report.as_ref())
                    .map(|r| r.status.clone())
                    .unwrap_or_else(|| HostStatus {
                        host: h.name.clone(),
                        underlay: h.underlay,
                        dataplane: String::new(),
                        pid: 0,
                        violins: Vec::new(),
                        host_drops: Default::default(),
                        down: true,
                    });
                status.down = !v.is_some_and(|v| v.alive);
                status
            })
            .collect());
    }
    st.hosts
        .iter()
        .map(|h| {
            control::call::<HostStatus>(&h.control, &Request::Status)
                .with_context(|| format!("asking host {}", h.name))
        })
        .collect()
}

/// The spec a Violin runs with now: as stored in etcd, or as its hosts report it.
pub fn current(st: &ClusterState, name: &str) -> Result<Option<Violin>> {
    if let Some(mut s) = st.store()? {
        return s
            .spec(name)?
            .map(|x| parse_text(st, &x.text, &format!("the stored spec of {name}")))
            .transpose();
    }
    Ok(statuses(st)?
        .into_iter()
        .flat_map(|s| s.violins)
        .find(|x| x.name == name)
        .and_then(|x| x.spec))
}

fn parse_text(st: &ClusterState, text: &str, origin: &str) -> Result<Violin> {
    let hosts: BTreeMap<String, Ipv4Addr> = st
        .hosts
        .iter()
        .map(|h| (h.name.clone(), h.underlay))
        .collect();
    spec::parse(text, &hosts).map_err(|e| anyhow!("{origin}: {e}"))
}

/// Brings every host `new` or `old` uses to `new` (written as `text`), whole or not
/// at all: through etcd when the cluster has it, else over the hosts' sockets.
fn program(
    st: &ClusterState,
    old: Option<&Violin>,
    new: &Violin,
    text: &str,
    timeout: Duration,
    pb: &ProgressBar,
) -> Result<BTreeMap<String, Applied>> {
    match st.store()? {
        Some(mut s) => program_etcd(&mut s, old, new, text, timeout, pb),
        None => program_sockets(st, old, new, &[], pb),
    }
}

/// The hosts a change from `old` to `new` involves.
fn involved(old: Option<&Violin>, new: &Violin) -> BTreeSet<String> {
    new.hosts
        .keys()
        .chain(old.iter().flat_map(|o| o.hosts.keys()))
        .cloned()
        .collect()
}

/// Writes `new` to etcd and waits until every involved host has taken it; if one
/// refuses, writes the previous spec back (or removes the new one) and waits for that.
fn program_etcd(
    s: &mut Store,
    old: Option<&Violin>,
    new: &Violin,
    text: &str,
    timeout: Duration,
    pb: &ProgressBar,
) -> Result<BTreeMap<String, Applied>> {
    let before = s.spec(&new.name)?;
    let hosts = involved(old, new);
    let rev = s.put_spec(&new.name, text)?;
    match wait_revision(s, &new.name, &hosts, rev, timeout, pb) {
        Ok(()) => {}
        Err(Wait::Refused(h, why)) => {
            pb.set_message("putting the previous spec back");
            let back = match &before {
                Some(b) => s.put_spec(&new.name, &b.text)?,
                None => s.delete_spec(&new.name)?,
            };
            if let Err(e) = wait_revision(s, &new.name, &hosts, back, timeout, pb) {
                eprintln!("warning: putting the previous spec back: {e}");
            }
            let what = if before.is_some() {
                "the previous spec is back in place"
            } else {
                "nothing was left behind"
            };
            bail!("host {h} refused Violin {}: {why}; {what}", new.name);
        }
        Err(e) => bail!(
            "{e}; the spec stays in etcd at revision {rev}, and the hosts take it when they can"
        ),
    }
    // What each host added: new guests, and guests whose spec changed (re-created).
    let mut applied = BTreeMap::new();
    for m in &new.members {
        let Some(h) = m.host() else { continue };
        let same = old.is_some_and(|o| o.members.iter().any(|x| x == m));
        let a: &mut Applied = applied.entry(h.to_string()).or_default();
        if same {
            a.kept.push(m.name.clone());
        } else {
            a.added.push(m.name.clone());
        }
    }
    Ok(applied)
}

/// Why a wait for hosts ended early.
#[derive(Debug)]
enum Wait {
    Refused(String, String),
    Timeout(String),
    Store(anyhow::Error),
}

impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wait::Refused(h, why) => write!(f, "host {h} refused: {why}"),
            Wait::Timeout(m) => write!(f, "{m}"),
            Wait::Store(e) => write!(f, "{e:#}"),
        }
    }
}

/// Waits until each of `hosts` reports revision `rev` or later, with Violin `name` at
/// `rev` or later without an error.
fn wait_revision(
    s: &mut Store,
    name: &str,
    hosts: &BTreeSet<String>,
    rev: i64,
    timeout: Duration,
    pb: &ProgressBar,
) -> std::result::Result<(), Wait> {
    let t0 = Instant::now();
    loop {
        let views = s.hosts().map_err(Wait::Store)?;
        let mut waiting = Vec::new();
        for h in hosts {
            let v = views.iter().find(|v| &v.record.name == h);
            let report = v.and_then(|v| v.report.as_ref());
            match (v, report) {
                (None, _) => waiting.push(format!("{h} (never registered)")),
                (Some(v), _) if !v.alive => waiting.push(format!(
                    "{h} (down; last at revision {})",
                    report.map_or(0, |r| r.revision)
                )),
                (_, None) => waiting.push(format!("{h} (no report yet)")),
                (_, Some(r)) if r.revision < rev => {
                    waiting.push(format!("{h} (at revision {})", r.revision))
                }
                (_, Some(r)) => {
                    if let Some(st) = r.specs.get(name).filter(|x| x.revision >= rev) {
                        if let Some(e) = &st.error {
                            return Err(Wait::Refused(h.clone(), e.clone()));
                        }
                    }
                }
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        pb.set_message(format!(
            "waiting for revision {rev}: {}",
            waiting.join(", ")
        ));
        if t0.elapsed() > timeout {
            return Err(Wait::Timeout(format!(
                "not every host took revision {rev} within {} s: {}",
                timeout.as_secs(),
                waiting.join(", ")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pushes `new` to every host it or `old` uses, `first` and `last` ordered as named;
/// a host that refuses rolls back the hosts already changed.
fn program_sockets(
    st: &ClusterState,
    old: Option<&Violin>,
    new: &Violin,
    order: &[&str],
    pb: &ProgressBar,
) -> Result<BTreeMap<String, Applied>> {
    let mut hosts: Vec<&str> = order.to_vec();
    let all = involved(old, new);
    let all: BTreeSet<&str> = all.iter().map(String::as_str).collect();
    let rest: Vec<&str> = all.iter().copied().filter(|h| !hosts.contains(h)).collect();
    hosts.splice(0..0, rest);
    hosts.retain(|h| all.contains(h));
    let mut done: Vec<&str> = Vec::new();
    let mut applied = BTreeMap::new();
    for h in hosts {
        let entry = st
            .host(h)
            .ok_or_else(|| anyhow!("host {h} is not in cluster {}", st.name))?;
        pb.set_message(format!("programming {h}"));
        let r = if new.hosts.contains_key(h) {
            control::call::<Applied>(
                &entry.control,
                &Request::ApplyViolin {
                    violin: new.clone(),
                },
            )
            .map(|a| {
                applied.insert(h.to_string(), a);
            })
        } else {
            control::call::<serde_json::Value>(
                &entry.control,
                &Request::RemoveViolin {
                    name: new.name.clone(),
                },
            )
            .map(|_| ())
        };
        if let Err(e) = r {
            for d in done.iter().rev() {
                let c = &st.host(d).unwrap().control;
                let undo = match old.filter(|o| o.hosts.contains_key(*d)) {
                    Some(o) => {
                        control::call::<Applied>(c, &Request::ApplyViolin { violin: o.clone() })
                            .map(|_| ())
                    }
                    None => control::call::<serde_json::Value>(
                        c,
                        &Request::RemoveViolin {
                            name: new.name.clone(),
                        },
                    )
                    .map(|_| ()),
                };
                if let Err(u) = undo {
                    eprintln!("warning: rolling back host {d}: {u:#}");
                }
            }
            let what = if old.is_some() {
                "the previous spec is back in place"
            } else {
                "nothing was left behind"
            };
            return Err(e.context(format!("host {h} refused Violin {}; {what}", new.name)));
        }
        done.push(h);
    }
    Ok(applied)
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {prefix} {wide_msg} [{elapsed}]")
            .expect("valid template"),
    );
    pb.set_prefix(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// Waits until the named guests of `v` are attached (socket guests count at once).
fn wait_attached(
    st: &ClusterState,
    v: &Violin,
    guests: &BTreeSet<String>,
    timeout: Duration,
) -> Result<()> {
    if guests.is_empty() {
        return Ok(());
    }
    let pb = ProgressBar::new(guests.len() as u64);
    pb.set_style(
        ProgressStyle::with_template(
            "  {bar:30} {pos}/{len} guests attached {wide_msg} [{elapsed}]",
        )
        .expect("valid template"),
    );
    pb.enable_steady_tick(Duration::from_millis(100));
    let t0 = Instant::now();
    // One connection for the whole wait; hosts publish a change within 250 ms.
    let mut store = st.store()?;
    let every = Duration::from_millis(if store.is_some() { 200 } else { 50 });
    loop {
        let mut waiting = Vec::new();
        let mut up = 0;
        for s in statuses_from(st, store.as_mut())? {
            for x in s.violins.iter().filter(|x| x.name == v.name) {
                for g in x.guests.iter().filter(|g| guests.contains(&g.name)) {
                    if let Some(log) = g
                        .console
                        .as_ref()
                        .map(|c| Path::new(c).with_file_name("console.log"))
                    {
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        if let Some(why) = crate::host::vm::boot_failure(&text) {
                            pb.abandon();
                            bail!(
                                "guest {}@{} did not boot: {why} (its console: {})",
                                g.name,
                                s.host,
                                log.display()
                            );
                        }
                    }
                    if ready(g) {
                        up += 1;
                    } else {
                        waiting.push(format!("{}@{}", g.name, s.host));
                    }
                }
            }
        }
        pb.set_position(up);
        pb.set_message(if waiting.is_empty() {
            String::new()
        } else {
            format!("waiting: {}", waiting.join(" "))
        });
        if up as usize >= guests.len() {
            pb.finish_and_clear();
            eprintln!(
                "  · {up}/{} guests attached in {:.1} s",
                guests.len(),
                t0.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if t0.elapsed() > timeout {
            pb.abandon();
            bail!(
                "only {up} of {} guests attached within {} s (still waiting: {}); see the logs under {}",
                guests.len(),
                timeout.as_secs(),
                waiting.join(", "),
                cluster::state_dir(&st.run_dir, &st.name).display()
            );
        }
        std::thread::sleep(every);
    }
}

/// Attached, and for a VM booted: its init announces itself with a first frame.
fn ready(g: &crate::control::GuestStatus) -> bool {
    match g.kind {
        GuestKind::Socket => true,
        GuestKind::Qemu => g.connected && g.counters.rx_frames > 0,
        GuestKind::Netns => g.connected,
    }
}

/// Builds the default images the Violin's VMs boot, where missing.
fn ensure_images(v: &Violin) -> Result<()> {
    let sets: BTreeSet<Vec<String>> = v
        .members
        .iter()
        .filter_map(|m| match &m.kind {
            MemberKind::Guest { vm: Some(vm), .. } if vm.kernel.is_none() => {
                Some(vm.packages.clone())
            }
            _ => None,
        })
        .collect();
    for p in sets {
        let dir = crate::host::vm::image_dir(&p);
        if !crate::host::vm::image_ready(&dir) {
            eprintln!(
                "  · building the guest image {} (once; downloads a Debian kernel)",
                dir.display()
            );
            crate::host::vm::ensure_image(&p)?;
        }
    }
    Ok(())
}

fn guest_names(v: &Violin) -> BTreeSet<String> {
    v.members
        .iter()
        .filter(|m| m.host().is_some())
        .map(|m| m.name.clone())
        .collect()
}

/// `violin up SPEC`: create the Violin; re-running with the same spec changes nothing.
pub fn up(st: &ClusterState, path: &PathBuf, timeout: Duration) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v = parse_text(st, &text, &path.display().to_string())?;
    // Every host's copy of the Violins with this name or VNI (etcd: the stored spec).
    let (existing, copies): (Vec<Violin>, usize) = match st.store()? {
        Some(mut s) => {
            let all: Vec<Violin> = s
                .specs()?
                .into_iter()
                .filter_map(|(n, x)| parse_text(st, &x.text, &format!("stored spec {n}")).ok())
                .filter(|x| x.name == v.name || x.vni == v.vni)
                .collect();
            let n = if all.is_empty() { 0 } else { v.hosts.len() };
            (all, n)
        }
        None => {
            let all: Vec<Violin> = statuses(st)?
                .into_iter()
                .flat_map(|s| s.violins)
                .filter(|x| x.name == v.name || x.vni == v.vni)
                .filter_map(|x| x.spec)
                .collect();
            let n = all.len();
            (all, n)
        }
    };
    if !existing.is_empty() {
        if let Some(other) = existing.iter().find(|x| x.name != v.name) {
            bail!("VNI {} is already used by Violin {:?}", v.vni, other.name);
        }
        if existing.iter().all(|x| *x == v) && copies == v.hosts.len() {
            eprintln!("Violin {} is already up with this spec", v.name);
            wait_attached(st, &v, &guest_names(&v), timeout)?;
            return print_summary(st, &v.name);
        }
        bail!(
            "a Violin named {:?} is already up with a different spec: `violin apply {}` changes it in place",
            v.name,
            path.display()
        );
    }
    eprintln!(
        "Creating Violin {} (VNI {}): {} guest(s) on {} host(s)",
        v.name,
        v.vni,
        guest_names(&v).len(),
        v.hosts.len()
    );
    ensure_images(&v)?;
    let pb = spinner("  ");
    let r = program(st, None, &v, &text, timeout, &pb);
    pb.finish_and_clear();
    r?;
    if st.etcd_endpoints().is_empty() {
        save_spec(st, &v.name, &text)?;
    }
    if let Err(e) = wait_attached(st, &v, &guest_names(&v), timeout) {
        eprintln!("removing the half-created Violin {}", v.name);
        let _ = down(st, &v.name);
        return Err(e);
    }
    print_summary(st, &v.name)
}

/// What changes between two specs of a Violin, one line each.
pub fn plan(old: &Violin, new: &Violin) -> Vec<String> {
    let mut out = Vec::new();
    let host = |v: &Violin, n: &str| {
        v.member(n)
            .and_then(|i| v.members[i].host().map(str::to_string))
    };
    for m in &new.members {
        match old.member(&m.name).map(|i| &old.members[i]) {
            None => out.push(format!(
                "+ guest {} on {}",
                m.name,
                m.host().unwrap_or("(external)")
            )),
            Some(o) if o.host() != m.host() => out.push(format!(
                "~ guest {} moves {} → {}",
                m.name,
                o.host().unwrap_or("-"),
                m.host().unwrap_or("-")
            )),
            Some(o) if o != m => out.push(format!("~ guest {} changes (re-created)", m.name)),
            _ => {}
        }
    }
    for m in &old.members {
        if new.member(&m.name).is_none() {
            out.push(format!(
                "- guest {} on {}",
                m.name,
                host(old, &m.name).unwrap_or_else(|| "(external)".into())
            ));
        }
    }
    let links = |v: &Violin| -> BTreeMap<(String, String), Option<String>> {
        v.links
            .iter()
            .flatten()
            .map(|l| {
                let (a, b) = (&v.members[l.a].name, &v.members[l.b].name);
                let k = if a < b {
                    (a.clone(), b.clone())
                } else {
                    (b.clone(), a.clone())
                };
                (
                    k,
                    l.rate
                        .map(|r| crate::profile::human_rate(r.bytes_per_sec as f64 * 8.0)),
                )
            })
            .collect()
    };
    let (lo, ln) = (links(old), links(new));
    if old.links.is_some() != new.links.is_some() {
        out.push(match new.links {
            Some(_) => "~ links: only the listed pairs may talk now".into(),
            None => "~ links: every pair may talk now".into(),
        });
    }
    for (k, r) in &ln {
        match lo.get(k) {
            None => out.push(format!("+ link {}–{}", k.0, k.1)),
            Some(o) if o != r => out.push(format!(
                "~ link {}–{} rate {} → {}",
                k.0,
                k.1,
                o.as_deref().unwrap_or("uncapped"),
                r.as_deref().unwrap_or("uncapped")
            )),
            _ => {}
        }
    }
    for k in lo.keys().filter(|k| !ln.contains_key(*k)) {
        out.push(format!("- link {}–{}", k.0, k.1));
    }
    out
}

/// `violin apply SPEC`: bring a running Violin to this spec (or create it).
pub fn apply_file(st: &ClusterState, path: &PathBuf, timeout: Duration) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v = parse_text(st, &text, &path.display().to_string())?;
    if current(st, &v.name)?.is_none() {
        return up(st, path, timeout);
    }
    apply(st, &v, &text, timeout)?;
    print_summary(st, &v.name)
}

fn apply(st: &ClusterState, v: &Violin, text: &str, timeout: Duration) -> Result<()> {
    let old = current(st, &v.name)?.ok_or_else(|| anyhow!("no Violin named {:?}", v.name))?;
    if old.vni != v.vni {
        bail!(
            "vni: a running Violin's VNI cannot change ({} → {}); `violin down {}` and up again",
            old.vni,
            v.vni,
            v.name
        );
    }
    if old.mtu != v.mtu {
        // Running guests keep the MTU their interfaces were made with, and a fast
        // port's socket is single- or multi-buffer by it: changing it in place would
        // leave guests that cannot take the Violin's frames.
        bail!(
            "mtu: a running Violin's MTU cannot change ({} → {}); `violin down {}` and up again",
            old.mtu,
            v.mtu,
            v.name
        );
    }
    let changes = plan(&old, v);
    if changes.is_empty() {
        eprintln!("Violin {}: no changes", v.name);
        save_spec(st, &v.name, text)?;
        return Ok(());
    }
    eprintln!("Applying to Violin {}:", v.name);
    for c in &changes {
        eprintln!("  {c}");
    }
    ensure_images(v)?;
    let pb = spinner("  ");
    let r = program(st, Some(&old), v, text, timeout, &pb);
    pb.finish_and_clear();
    let applied = r?;
    if st.etcd_endpoints().is_empty() {
        save_spec(st, &v.name, text)?;
    }
    let added: BTreeSet<String> = applied.values().flat_map(|a| a.added.clone()).collect();
    wait_attached(st, v, &added, timeout)
}

/// Parses `name=e,host=h2,ip=10.0.0.5/24` into a `[[guest]]` table; values are TOML
/// values where they parse as one (numbers), strings otherwise.
pub fn guest_table(arg: &str) -> Result<toml::Table> {
    let mut t = toml::Table::new();
    for kv in arg.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            anyhow!("--add: {kv:?} is not key=value (e.g. name=e,host=h2,ip=10.0.0.5/24)")
        })?;
        let value = format!("x = {v}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut x| x.remove("x"))
            .unwrap_or_else(|| toml::Value::String(v.to_string()));
        t.insert(k.trim().to_string(), value);
    }
    Ok(t)
}

/// `violin scale VIOLIN --add GUEST-SPEC [--link PEER]...`
pub fn scale(
    st: &ClusterState,
    name: &str,
    add: &str,
    links: &[String],
    timeout: Duration,
) -> Result<()> {
    let mut doc: toml::Table = load_spec(st, name)?
        .parse()
        .context("the saved spec is not TOML")?;
    let g = guest_table(add)?;
    let gname = g
        .get("name")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("--add needs name=..."))?
        .to_string();
    push_table(&mut doc, "guest", g)?;
    let has_links = doc.contains_key("link");
    for peer in links {
        if !has_links {
            bail!(
                "--link {peer}: Violin {name} has no [[link]] table, so every pair already talks"
            );
        }
        let mut l = toml::Table::new();
        l.insert(
            "between".into(),
            toml::Value::Array(vec![gname.clone().into(), peer.clone().into()]),
        );
        push_table(&mut doc, "link", l)?;
    }
    let text = toml::to_string(&doc)?;
    let v = parse_text(st, &text, &format!("{name} with --add {add}"))?;
    apply(st, &v, &text, timeout)?;
    print_summary(st, name)
}

fn push_table(doc: &mut toml::Table, key: &str, t: toml::Table) -> Result<()> {
    match doc.entry(key).or_insert_with(|| toml::Value::Array(vec![])) {
        toml::Value::Array(a) => {
            a.push(toml::Value::Table(t));
            Ok(())
        }
        _ => bail!("the saved spec's {key} is not an array of tables"),
    }
}

/// What `violin migrate` did and measured.
#[derive(Debug, serde::Serialize)]
pub struct Migration {
    pub guest: String,
    pub from: String,
    pub to: String,
    /// From the first host switching to the target announcing the guest.
    pub control_ms: f64,
    /// The peer guest that pinged the moving one, if any.
    pub probed_from: Option<String>,
    /// Longest time without replies at that peer.
    pub outage_ms: Option<f64>,
    pub probes_sent: Option<u64>,
    pub probes_lost: Option<u64>,
    pub resumed: Option<bool>,
    /// VMs: how long QEMU paused the VM for the final copy, and the whole copy.
    pub vm_downtime_ms: Option<u64>,
    pub vm_total_ms: Option<u64>,
}

/// `violin migrate VIOLIN GUEST --to HOST`: every host but the target switches first
/// (the guest leaves its old host), then the target re-creates it with the same MAC
/// and IP and announces it with a gratuitous ARP. Returns what a peer measured.
pub fn migrate(
    st: &ClusterState,
    name: &str,
    guest: &str,
    to: &str,
    timeout: Duration,
) -> Result<Migration> {
    let old = current(st, name)?.ok_or_else(|| anyhow!("no Violin named {name:?}"))?;
    let i = old
        .member(guest)
        .ok_or_else(|| anyhow!("Violin {name} has no guest {guest:?}"))?;
    let MemberKind::Guest { host, ip, kind, .. } = &old.members[i].kind else {
        bail!("{guest} is an external member: it lives outside the cluster");
    };
    if host == to {
        bail!("{guest} already runs on {to}");
    }
    if st.host(to).is_none() {
        bail!("host {to:?} is not in cluster {}", st.name);
    }
    if *kind == GuestKind::Socket {
        bail!("{guest} is a socket guest: whoever runs it moves it (Violin only owns its socket)");
    }
    let mut doc: toml::Table = load_spec(st, name)?
        .parse()
        .context("the saved spec is not TOML")?;
    let g = doc
        .get_mut("guest")
        .and_then(|g| g.as_array_mut())
        .and_then(|a| {
            a.iter_mut()
                .find(|g| g.get("name").and_then(|n| n.as_str()) == Some(guest))
        })
        .and_then(|g| g.as_table_mut())
        .ok_or_else(|| anyhow!("guest {guest} is not in the saved spec"))?;
    g.insert("host".into(), to.into());
    let text = toml::to_string(&doc)?;
    let v = parse_text(st, &text, &format!("{name} with {guest} on {to}"))?;
    // A peer that pings the guest through the move measures the outage (if it runs on
    // this machine).
    let peer = probe_peer(&old, i).filter(|p| crate::host::netns::exists(&st.guest_netns(name, p)));
    let prober = match &peer {
        Some(p) => Some(probe::Prober::start(
            &st.guest_netns(name, p),
            *ip,
            Duration::from_millis(5),
        )?),
        None => None,
    };
    if let Some(p) = &prober {
        p.wait_first_reply(Duration::from_secs(3));
    }
    eprintln!("Migrating {guest} of Violin {name}: {host} → {to}");
    let t0 = Instant::now();
    let live = match st.store()? {
        Some(mut s) => {
            let order = MigrationOrder {
                guest: guest.into(),
                from: host.clone(),
                to: to.into(),
                live: *kind == GuestKind::Qemu,
                spec: text.clone(),
            };
            let live = migrate_etcd(&mut s, &old, &v, &order, timeout)?;
            wait_attached(st, &v, &[guest.to_string()].into(), timeout)?;
            live
        }
        None => {
            let live = if *kind == GuestKind::Qemu {
                // The VM keeps running on the source until QEMU has copied it over.
                Some(live_migrate_vm(st, &old, &v, guest, host, to, timeout)?)
            } else {
                None
            };
            let pb = spinner("  ");
            let r = program_sockets(st, Some(&old), &v, &[to], &pb);
            pb.finish_and_clear();
            r?;
            save_spec(st, name, &text)?;
            wait_attached(st, &v, &[guest.to_string()].into(), timeout)?;
            // Announce once every host agrees where the guest lives.
            let target = st.host(to).unwrap();
            control::call::<serde_json::Value>(
                &target.control,
                &Request::Announce {
                    name: v.name.clone(),
                    guests: vec![guest.to_string()],
                },
            )?;
            live
        }
    };
    let switched = t0.elapsed();
    let outage = match prober {
        Some(p) => {
            let o = p.finish(Duration::from_millis(300), Duration::from_secs(5));
            Some(o)
        }
        None => None,
    };
    match (&outage, &peer) {
        (Some(o), Some(p)) => eprintln!(
            "  · {guest} now on {to}; control path took {:.0} ms; outage seen by {p}: {}",
            switched.as_secs_f64() * 1e3,
            o
        ),
        _ => eprintln!(
            "  · {guest} now on {to}; control path took {:.0} ms (no netns peer to measure the outage from)",
            switched.as_secs_f64() * 1e3
        ),
    }
    Ok(Migration {
        guest: guest.into(),
        from: host.clone(),
        to: to.into(),
        control_ms: switched.as_secs_f64() * 1e3,
        probed_from: peer,
        outage_ms: outage.as_ref().map(|o| o.gap.as_secs_f64() * 1e3),
        probes_sent: outage.as_ref().map(|o| o.sent),
        probes_lost: outage.as_ref().map(|o| o.sent.saturating_sub(o.received)),
        resumed: outage.as_ref().map(|o| o.resumed),
        vm_downtime_ms: live.as_ref().and_then(|l| l.downtime_ms),
        vm_total_ms: live.as_ref().and_then(|l| l.total_ms),
    })
}

/// `migrate` through etcd: stores the order; for a VM waits until the source reports
/// its state copied to the target (the two daemons do the copy); then stores the spec
/// with the guest on its new host, waits for every involved host, and removes the
/// order, on which the target announces the guest. A migration of the same guest to
/// the same host that a CLI left unfinished is taken up again.
fn migrate_etcd(
    s: &mut Store,
    old: &Violin,
    new: &Violin,
    order: &MigrationOrder,
    timeout: Duration,
) -> Result<Option<crate::host::vm::LiveMigration>> {
    let name = &new.name;
    let (g, from, to) = (&order.guest, &order.from, &order.to);
    let rev = match s.create_migration(name, order)? {
        Some(r) => r,
        None => match s.migration(name)? {
            Some((o, r)) if o.guest == *g && o.to == *to => {
                eprintln!("  · taking up the migration of {g} to {to} stored at revision {r}");
                r
            }
            Some((o, r)) => bail!(
                "Violin {name} has a migration under way (revision {r}): {} from {} to {}; run `violin migrate {name} {} --to {}` to finish it first",
                o.guest, o.from, o.to, o.guest, o.to
            ),
            None => bail!("Violin {name}'s migration order changed while it was written; try again"),
        },
    };
    let pb = spinner("  ");
    let mut live = None;
    if order.live {
        let t0 = Instant::now();
        let copied = loop {
            let views = s.hosts()?;
            let phase = |h: &str| {
                views
                    .iter()
                    .find(|v| v.record.name == h)
                    .and_then(|v| v.report.as_ref())
                    .and_then(|r| r.migrations.get(name))
                    .filter(|m| m.order == rev)
                    .map(|m| m.phase.clone())
            };
            let (src, dst) = (phase(from), phase(to));
            let failed = [(from, &src), (to, &dst)]
                .into_iter()
                .find_map(|(h, p)| match p {
                    Some(MigrationPhase::Failed { error }) => Some(format!("{h}: {error}")),
                    _ => None,
                });
            if let Some(why) = failed {
                pb.finish_and_clear();
                s.delete_migration(name)?;
                bail!("migrating {g}: {why}; {g} keeps running on {from}");
            }
            if let Some(MigrationPhase::Copied {
                downtime_ms,
                total_ms,
                ram_bytes,
            }) = src
            {
                break crate::host::vm::LiveMigration {
                    downtime_ms,
                    total_ms,
                    ram_transferred: ram_bytes,
                };
            }
            let doing = match (&src, &dst) {
                (Some(MigrationPhase::Copying { uri }), _) => {
                    format!("{from} copying {g} to {to} ({uri})")
                }
                (_, Some(MigrationPhase::Listening { uri })) => {
                    format!("{to} waits for {g}'s state at {uri}")
                }
                _ => format!("waiting for {to} to start {g} waiting for its state"),
            };
            pb.set_message(doing.clone());
            if t0.elapsed() > timeout {
                pb.finish_and_clear();
                s.delete_migration(name)?;
                bail!(
                    "migrating {g}: not copied within {} s ({doing}); cancelled, {g} keeps running on {from}",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        eprintln!(
            "  · QEMU live migration done: {} ms in all, paused {} ms, {} KiB copied",
            copied.total_ms.unwrap_or(0),
            copied.downtime_ms.unwrap_or(0),
            copied.ram_transferred.unwrap_or(0) / 1024
        );
        live = Some(copied);
    }
    let hosts = involved(Some(old), new);
    let spec_rev = s.put_spec(name, &order.spec)?;
    let r = wait_revision(s, name, &hosts, spec_rev, timeout, &pb);
    if let Err(e) = r {
        pb.finish_and_clear();
        bail!("{e}; the spec with {g} on {to} is stored, and the migration order stays (run the same `violin migrate` again to finish it)");
    }
    let done = s.delete_migration(name)?;
    // The target announces the guest when it sees the order go.
    if let Err(e) = wait_revision(s, name, &[to.clone()].into(), done, timeout, &pb) {
        eprintln!("warning: {to} has not announced {g} yet: {e}");
    }
    pb.finish_and_clear();
    Ok(live)
}

/// Starts the VM on `to` waiting for its state, has QEMU on `from` send it, and waits
/// until the copy completes. On failure the target's copy is removed again.
fn live_migrate_vm(
    st: &ClusterState,
    old: &Violin,
    new: &Violin,
    guest: &str,
    from: &str,
    to: &str,
    timeout: Duration,
) -> Result<crate::host::vm::LiveMigration> {
    let target = st.host(to).unwrap();
    let pb = spinner("  ");
    pb.set_message(format!("starting {guest} on {to}, waiting for its state"));
    control::call::<Applied>(
        &target.control,
        &Request::PrepareIncoming {
            violin: new.clone(),
            guests: vec![guest.to_string()],
            listen: None,
        },
    )?;
    let undo = || {
        let r = match old.hosts.contains_key(to) {
            true => control::call::<Applied>(
                &target.control,
                &Request::ApplyViolin {
                    violin: old.clone(),
                },
            )
            .map(|_| ()),
            false => control::call::<serde_json::Value>(
                &target.control,
                &Request::RemoveViolin {
                    name: old.name.clone(),
                },
            )
            .map(|_| ()),
        };
        if let Err(e) = r {
            eprintln!("warning: removing the target's copy of {guest}: {e:#}");
        }
    };
    let find = |host: &str| -> Result<Option<crate::control::GuestStatus>> {
        let h = st.host(host).unwrap();
        let s: HostStatus = control::call(&h.control, &Request::Status)?;
        Ok(s.violins
            .into_iter()
            .filter(|x| x.name == new.name)
            .flat_map(|x| x.guests)
            .find(|g| g.name == guest))
    };
    let r = (|| -> Result<crate::host::vm::LiveMigration> {
        let t0 = Instant::now();
        let incoming = loop {
            let g = find(to)?;
            if let Some(uri) = g.as_ref().and_then(|g| g.incoming.clone()) {
                let path = uri.strip_prefix("unix:").unwrap_or_default();
                if std::path::Path::new(path).exists() {
                    break uri;
                }
            }
            if t0.elapsed() > timeout {
                bail!(
                    "the target VM on {to} did not start listening for its state within {} s",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let qmp = find(from)?
            .and_then(|g| g.qmp)
            .ok_or_else(|| anyhow!("{guest} on {from} has no QMP socket"))?;
        pb.set_message(format!("copying {guest} {from} → {to}"));
        crate::host::vm::live_migrate(std::path::Path::new(&qmp), &incoming, timeout)
    })();
    pb.finish_and_clear();
    match r {
        Ok(m) => {
            eprintln!(
                "  · QEMU live migration done: {} ms in all, paused {} ms, {} KiB copied",
                m.total_ms.unwrap_or(0),
                m.downtime_ms.unwrap_or(0),
                m.ram_transferred.unwrap_or(0) / 1024
            );
            Ok(m)
        }
        Err(e) => {
            undo();
            Err(e.context(format!("{guest} keeps running on {from}")))
        }
    }
}

/// A netns guest (other than `i`) allowed to talk to member `i`.
fn probe_peer(v: &Violin, i: usize) -> Option<String> {
    let allowed = |j: usize| match &v.links {
        None => true,
        Some(ls) => ls
            .iter()
            .any(|l| (l.a, l.b) == (i, j) || (l.b, l.a) == (i, j)),
    };
    v.members
        .iter()
        .enumerate()
        .find(|(j, m)| {
            *j != i
                && allowed(*j)
                && matches!(
                    m.kind,
                    MemberKind::Guest {
                        kind: GuestKind::Netns,
                        ..
                    }
                )
        })
        .map(|(_, m)| m.name.clone())
}

pub fn print_summary(st: &ClusterState, name: &str) -> Result<()> {
    println!(
        "{:<10} {:<6} {:<9} {:<18} {:<18} STATE",
        "GUEST", "HOST", "KIND", "IP", "MAC"
    );
    for s in statuses(st)? {
        for x in s.violins.iter().filter(|x| x.name == name) {
            for g in &x.guests {
                let state = match (ready(g), g.connected) {
                    _ if s.down => "lost",
                    (true, _) if g.kind == GuestKind::Qemu => "running",
                    (true, _) => "attached",
                    (false, true) => "booting",
                    (false, false) => "waiting",
                };
                let mut kind = format!("{:?}", g.kind).to_lowercase();
                if let Some(a) = &g.accel {
                    kind = format!("{kind}/{a}");
                }
                println!(
                    "{:<10} {:<6} {:<9} {:<18} {:<18} {}",
                    g.name, s.host, kind, g.ip, g.mac, state
                );
            }
        }
    }
    Ok(())
}

/// `violin down NAME`: removes the Violin from every host that has it, then anything a
/// half-finished `up` may have left (guest namespaces of the saved spec).
pub fn down(st: &ClusterState, name: &str) -> Result<()> {
    down_within(st, name, Duration::from_secs(30))
}

/// `down`, waiting at most `timeout` for the hosts (a cluster with etcd).
pub fn down_within(st: &ClusterState, name: &str, timeout: Duration) -> Result<()> {
    let mut found = false;
    let mut errors = Vec::new();
    if let Some(mut s) = st.store()? {
        let Some(spec) = s.spec(name)? else {
            bail!("no Violin named {name:?} on cluster {}", st.name);
        };
        let hosts: BTreeSet<String> = match parse_text(st, &spec.text, "the stored spec") {
            Ok(v) => v.hosts.keys().cloned().collect(),
            Err(_) => st.hosts.iter().map(|h| h.name.clone()).collect(),
        };
        let rev = s.delete_spec(name)?;
        let pb = spinner("  ");
        let r = wait_revision(&mut s, name, &hosts, rev, timeout, &pb);
        pb.finish_and_clear();
        if let Err(e) = r {
            bail!("removing {name}: {e}; the spec is gone from etcd, and the hosts that did not answer remove it when they return");
        }
        if let Ok(v) = parse_text(st, &spec.text, "the stored spec") {
            for g in guest_names(&v) {
                let ns = st.guest_netns(name, &g);
                if crate::host::netns::exists(&ns) {
                    if let Err(e) = crate::host::netns::delete(&ns) {
                        errors.push(format!("{ns}: {e:#}"));
                    }
                }
            }
        }
        if !errors.is_empty() {
            bail!("removing {name}: {}", errors.join("; "));
        }
        eprintln!("Violin {name} removed");
        return Ok(());
    }
    for (h, s) in st.hosts.iter().zip(statuses(st)?) {
        if s.violins.iter().any(|x| x.name == name) {
            found = true;
            if let Err(e) = control::call::<serde_json::Value>(
                &h.control,
                &Request::RemoveViolin { name: name.into() },
            ) {
                errors.push(format!("{}: {e:#}", h.name));
            }
        }
    }
    let saved = load_spec(st, name).ok();
    if let Some(text) = &saved {
        if let Ok(v) = parse_text(st, text, "saved spec") {
            for g in guest_names(&v) {
                let ns = st.guest_netns(name, &g);
                if crate::host::netns::exists(&ns) {
                    found = true;
                    if let Err(e) = crate::host::netns::delete(&ns) {
                        errors.push(format!("{ns}: {e:#}"));
                    }
                }
            }
        }
        let _ = std::fs::remove_file(spec_path(st, name));
        found |= saved.is_some();
    }
    if !found {
        bail!("no Violin named {name:?} on cluster {}", st.name);
    }
    if !errors.is_empty() {
        bail!("removing {name}: {}", errors.join("; "));
    }
    eprintln!("Violin {name} removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> BTreeMap<String, Ipv4Addr> {
        [
            ("h1".to_string(), Ipv4Addr::new(172, 31, 0, 1)),
            ("h2".to_string(), Ipv4Addr::new(172, 31, 0, 2)),
        ]
        .into()
    }

    const BASE: &str = r#"
name = "blue"
vni = 101
[[guest]]
name = "a"
host = "h1"
ip = "10.0.0.1/24"
[[guest]]
name = "b"
host = "h2"
ip = "10.0.0.2/24"
[[link]]
between = ["a", "b"]
rate = "50mbit"
"#;

    #[test]
    fn plan_lists_every_change() {
        let old = spec::parse(BASE, &hosts()).unwrap();
        assert!(plan(&old, &old).is_empty());
        let text = BASE
            .replace("rate = \"50mbit\"", "rate = \"10mbit\"")
            .replace("name = \"b\"\nhost = \"h2\"", "name = \"b\"\nhost = \"h1\"")
            + "[[guest]]\nname = \"c\"\nhost = \"h2\"\nip = \"10.0.0.3/24\"\n[[link]]\nbetween = [\"b\", \"c\"]\n";
        let new = spec::parse(&text, &hosts()).unwrap();
        let p = plan(&old, &new);
        assert_eq!(
            p,
            vec![
                "~ guest b moves h2 → h1",
                "+ guest c on h2",
                "~ link a–b rate 50.00 Mbit/s → 10.00 Mbit/s",
                "+ link b–c",
            ],
            "{p:#?}"
        );
        let back = plan(&new, &old);
        assert!(back.contains(&"- guest c on h2".to_string()), "{back:?}");
        assert!(back.contains(&"- link b–c".to_string()), "{back:?}");
    }

    #[test]
    fn guest_tables_from_the_command_line() {
        let t = guest_table("name=e,host=h2,ip=10.0.0.5/24,cpus=0.5,pps=1000").unwrap();
        assert_eq!(t["name"].as_str(), Some("e"));
        assert_eq!(t["ip"].as_str(), Some("10.0.0.5/24"));
        assert_eq!(t["cpus"].as_float(), Some(0.5));
        assert_eq!(t["pps"].as_integer(), Some(1000));
        let e = guest_table("name=e,host").unwrap_err().to_string();
        assert!(e.contains("\"host\" is not key=value"), "{e}");
    }
}
