//! The cluster's state at scale (`cargo xtask bench -- --etcd-scale`): 32 simulated
//! hosts, 16 Violins × 32 lightweight guests (512 guests, every Violin on every host),
//! each Violin created with `violin up` through etcd and, as the baseline in the same
//! run, on a cluster without etcd whose CLI drives each daemon's control socket. Per
//! run: the time to bring the cluster up, each Violin's `up` (spec written until every
//! host reports its revision and every guest is attached), the bytes and requests etcd
//! served per Violin, the size of its database, and each daemon's resident memory.

use crate::load;
use crate::testbed::Testbed;
use anyhow::{Context, Result};
use serde::Serialize;
use std::time::Instant;
use violin_dp::cluster::UpOptions;
use violin_dp::config::DataplaneChoice;

#[derive(Debug, Clone, Copy)]
pub struct Size {
    pub hosts: usize,
    pub violins: usize,
    pub guests: usize,
}

impl Size {
    pub fn new(quick: bool) -> Size {
        if quick {
            Size {
                hosts: 4,
                violins: 2,
                guests: 4,
            }
        } else {
            Size {
                hosts: 32,
                violins: 16,
                guests: 32,
            }
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    pub cluster_up_secs: f64,
    /// Each Violin's `violin up`, in order.
    pub violin_up_secs: Vec<f64>,
    pub all_up_secs: f64,
    pub daemon_rss_kib_mean: f64,
    pub daemon_rss_kib_max: u64,
    /// etcd's gRPC bytes (both ways) and requests while the Violins came up, per Violin.
    pub etcd_bytes_per_violin: Option<f64>,
    pub etcd_requests_per_violin: Option<f64>,
    /// etcd's database in use at the end.
    pub etcd_db_bytes: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EtcdScale {
    pub hosts: usize,
    pub violins: usize,
    pub guests_per_violin: usize,
    pub etcd: Run,
    pub sockets: Run,
}

fn spec(v: usize, size: Size) -> String {
    let mut s = format!("name = \"e{v}\"\nvni = {}\n", 900 + v);
    for g in 0..size.guests {
        s += &format!(
            "[[guest]]\nname = \"g{g}\"\nhost = \"h{}\"\nip = \"10.80.{}.{}/16\"\n",
            (v + g) % size.hosts + 1,
            g / 250,
            g % 250 + 1
        );
    }
    s
}

/// etcd's Prometheus metrics, summed by name.
fn metrics(addr: std::net::SocketAddrV4) -> Result<std::collections::BTreeMap<String, f64>> {
    let text = violin_dp::control::http_get(&format!("http://{addr}/metrics"))
        .with_context(|| format!("etcd metrics at {addr}"))?;
    let mut out = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((k, v)) = l.rsplit_once(' ') else {
            continue;
        };
        let name = k.split('{').next().unwrap_or(k).to_string();
        if let Ok(v) = v.parse::<f64>() {
            *out.entry(name).or_default() += v;
        }
    }
    Ok(out)
}

fn run(id: &str, size: Size, etcd: bool, say: &dyn Fn(&str)) -> Result<Run> {
    let opts = UpOptions {
        hosts: size.hosts,
        subnet: "172.31.0.0/24".into(),
        dataplane: DataplaneChoice::Udp,
        mtu: 1500,
        xdp_single_socket: false,
        no_remote_checksum: false,
        no_xdp_multi_buffer: false,
        queues: 1,
        workers: None,
        xdp_attach: Default::default(),
        xdp_tx: Default::default(),
        udp_steering: Default::default(),
        max_guests: None,
        busy_poll_us: None,
        loud_violin_percent: None,
        etcd_members: usize::from(etcd),
        lease_ttl: violin_dp::config::DEFAULT_LEASE_TTL,
    };
    let t = Instant::now();
    let tb = Testbed::up_opts(id, "udp", &opts)?;
    let mut r = Run {
        cluster_up_secs: t.elapsed().as_secs_f64(),
        ..Default::default()
    };
    let m = tb.state.etcd.first().map(|m| m.metrics_addr());
    let before = m.map(metrics).transpose()?;
    let t_all = Instant::now();
    for v in 0..size.violins {
        let t = Instant::now();
        tb.up_spec(&format!("e{v}"), &spec(v, size))?;
        r.violin_up_secs.push(t.elapsed().as_secs_f64());
        say(&format!(
            "  {} Violin e{v}: {:.1} s",
            if etcd { "etcd" } else { "sockets" },
            t.elapsed().as_secs_f64()
        ));
    }
    r.all_up_secs = t_all.elapsed().as_secs_f64();
    if let (Some(m), Some(b)) = (m, before) {
        let a = metrics(m)?;
        let d = |k: &str| a.get(k).copied().unwrap_or(0.0) - b.get(k).copied().unwrap_or(0.0);
        let n = size.violins as f64;
        r.etcd_bytes_per_violin = Some(
            (d("etcd_network_client_grpc_received_bytes_total")
                + d("etcd_network_client_grpc_sent_bytes_total"))
                / n,
        );
        r.etcd_requests_per_violin = Some(d("grpc_server_handled_total") / n);
        r.etcd_db_bytes = a.get("etcd_mvcc_db_total_size_in_use_in_bytes").copied();
    }
    let rss: Vec<u64> = tb.daemons().iter().map(|p| load::rss_kib(&[*p])).collect();
    r.daemon_rss_kib_mean = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64;
    r.daemon_rss_kib_max = rss.iter().copied().max().unwrap_or(0);
    Ok(r)
}

pub fn measure(quick: bool, say: &dyn Fn(&str)) -> Result<EtcdScale> {
    let size = Size::new(quick);
    say(&format!(
        "etcd at scale: {} hosts, {} Violins × {} guests, through etcd",
        size.hosts, size.violins, size.guests
    ));
    let etcd = run("bse", size, true, say)?;
    say("  baseline: the same without etcd (the CLI drives each daemon's socket)");
    let sockets = run("bss", size, false, say)?;
    Ok(EtcdScale {
        hosts: size.hosts,
        violins: size.violins,
        guests_per_violin: size.guests,
        etcd,
        sockets,
    })
}

pub fn report(e: &EtcdScale) -> String {
    let mut s = format!(
        "## etcd at scale: {} hosts, {} Violins × {} guests ({} guests)\n\n",
        e.hosts,
        e.violins,
        e.guests_per_violin,
        e.violins * e.guests_per_violin
    );
    s += "| | through etcd | sockets (baseline) | ratio |\n|---|---:|---:|---:|\n";
    let row = |name: &str, a: f64, b: f64, unit: &str| {
        format!(
            "| {name} | {a:.1} {unit} | {b:.1} {unit} | {:.2} |\n",
            if b > 0.0 { a / b } else { f64::NAN }
        )
    };
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    s += &row(
        "cluster up",
        e.etcd.cluster_up_secs,
        e.sockets.cluster_up_secs,
        "s",
    );
    s += &row(
        "every Violin up",
        e.etcd.all_up_secs,
        e.sockets.all_up_secs,
        "s",
    );
    s += &row(
        "one Violin up (median)",
        med(&e.etcd.violin_up_secs),
        med(&e.sockets.violin_up_secs),
        "s",
    );
    s += &row(
        "daemon RSS (mean)",
        e.etcd.daemon_rss_kib_mean / 1024.0,
        e.sockets.daemon_rss_kib_mean / 1024.0,
        "MiB",
    );
    s += &row(
        "daemon RSS (max)",
        e.etcd.daemon_rss_kib_max as f64 / 1024.0,
        e.sockets.daemon_rss_kib_max as f64 / 1024.0,
        "MiB",
    );
    if let (Some(b), Some(q), Some(db)) = (
        e.etcd.etcd_bytes_per_violin,
        e.etcd.etcd_requests_per_violin,
        e.etcd.etcd_db_bytes,
    ) {
        s += &format!(
            "\netcd per Violin: {:.1} KiB of gRPC traffic, {q:.0} requests; database in use at the end: {:.1} MiB.\n",
            b / 1024.0,
            db / 1048576.0
        );
    }
    s
}
