//! `bench`: Violin's benchmarks, every configuration side by side in one run.
//!
//! Two simulated 2-host clusters are up at once (one per data plane), so each round
//! alternates every configuration; figures are medians over rounds and are reported
//! with their ratio to the physical baseline measured in the same run. Figures:
//! 64-byte UDP packet rate with CPU per packet, TCP throughput (1 and 4 streams),
//! round-trip latency (UDP ping-pong percentiles, ICMP), policing accuracy, and the
//! idle daemon's CPU. Results go to a JSON file; `--quick` is a short smoke run.
//!
//! Run it through `cargo xtask bench [--quick]` (root: it makes namespaces).

mod charts;
mod etcd_scale;
mod hpl;
mod load;
mod soak;
mod testbed;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use testbed::{Pair, Testbed};

#[derive(Parser)]
#[command(about = "Violin benchmarks: all configurations side by side, ratios to physical")]
struct Cli {
    /// Brief runs of every figure (a smoke test: its numbers are not results).
    #[arg(long)]
    quick: bool,
    /// Where the JSON results go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Also write the tables to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Measure nothing: print the tables of a results file and draw its charts (into
    /// `--out`).
    #[arg(long, value_name = "JSON")]
    from: Option<PathBuf>,
    /// Run the soak for this many minutes instead of the benchmarks.
    #[arg(long, value_name = "MINUTES")]
    soak: Option<f64>,
    /// Measure the cluster's state in etcd at scale instead (32 hosts, 16 Violins × 32
    /// guests; with --quick 4 hosts, 2 × 4), against a cluster without etcd.
    #[arg(long)]
    etcd_scale: bool,
    /// Run only figure 6 (HPL alone, with MPI ping-pong), into a results file of its own
    /// (`hpl-*.json`).
    #[arg(long)]
    hpl: bool,
    /// Run only figure 8 (a quiet Violin's round trips while a neighbour floods), into
    /// a results file of its own (`isolation-*.json`).
    #[arg(long)]
    isolation: bool,
    /// Run only figure 2c (TCP on an underlay of MTU 9000), into a results file of its
    /// own (`jumbo-*.json`).
    #[arg(long)]
    jumbo: bool,
    /// Run only figure 5 (N Violins flooding at once), into a results file of its own
    /// (`sharing-*.json`).
    #[arg(long)]
    sharing: bool,
    /// Run only figure 4 (UDP and TCP through rate caps), into a results file of its
    /// own (`caps-*.json`).
    #[arg(long)]
    caps: bool,
    /// Host counts of figure 6, e.g. `--hpl-hosts 4` (default 2,4; with --quick 2).
    #[arg(long, value_delimiter = ',')]
    hpl_hosts: Vec<usize>,
    /// Packet workers per host on every cluster (default: each host's own, one per
    /// CPU), to compare worker counts.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// How the xdp clusters send small frames (default: the hosts' own, `socket`), to
    /// compare the two ways out on any figure (figure 1b always measures both).
    #[arg(long, value_enum)]
    xdp_tx: Option<violin_dp::config::XdpTx>,
    /// Which underlay socket each Violin's datagrams queue on, on every cluster
    /// (default: the hosts' own, `violin`), to compare the two on any figure.
    #[arg(long, value_enum)]
    udp_steering: Option<violin_dp::config::UdpSteering>,
    /// Every cluster's `loud_violin_percent` (default: the hosts' own, 20; 0: Violins
    /// stay on the worker they were placed on), to compare on any figure.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    loud_violin_percent: Option<u32>,
}

struct Plan {
    rounds: usize,
    flood_secs: f64,
    tcp_secs: f64,
    pings: u64,
    icmp: u32,
    police_rates_mbit: Vec<u32>,
    police_secs: f64,
    /// (plane, port) pairs whose caps are measured.
    police_ports: Vec<(&'static str, &'static str)>,
    /// Round trips measured for the isolation figure, alone and under a flood.
    isolation_pings: u64,
    idle_violins: usize,
    idle_secs: f64,
    share_counts: Vec<usize>,
    share_secs: f64,
    mem_violins: usize,
    mem_guests: usize,
    /// Socket guests in one Violin on one host, for the per-guest memory figure.
    scale_guests: Vec<usize>,
    hpl_hosts: Vec<usize>,
    /// HPL's N, or where sizing starts when `hpl_seconds` is set.
    hpl_n: u32,
    /// N is sized so HPL in the host namespaces takes about this long.
    hpl_seconds: Option<f64>,
    hpl_rounds: usize,
    /// HPL again with the underlay shaped to this rate (tc's units).
    hpl_shaped: Option<&'static str>,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rounds: 1,
                flood_secs: 0.7,
                tcp_secs: 1.0,
                pings: 300,
                icmp: 30,
                police_rates_mbit: vec![10, 100],
                police_secs: 1.0,
                police_ports: vec![("udp", "socket"), ("udp", "tap"), ("xdp", "xdp")],
                isolation_pings: 300,
                idle_violins: 4,
                idle_secs: 1.0,
                share_counts: vec![1, 2],
                share_secs: 1.0,
                mem_violins: 2,
                mem_guests: 4,
                scale_guests: vec![100, 300],
                hpl_hosts: vec![2],
                hpl_n: 1000,
                hpl_seconds: None,
                hpl_rounds: 1,
                hpl_shaped: Some("1gbit"),
            }
        } else {
            Plan {
                rounds: 3,
                flood_secs: 4.0,
                tcp_secs: 5.0,
                pings: 5000,
                icmp: 300,
                police_rates_mbit: vec![1, 10, 100, 1000],
                police_secs: 10.0,
                police_ports: vec![
                    ("udp", "socket"),
                    ("udp", "tap"),
                    ("xdp", "socket"),
                    ("xdp", "tap"),
                    ("xdp", "xdp"),
                ],
                isolation_pings: 3000,
                idle_violins: 16,
                idle_secs: 10.0,
                share_counts: vec![1, 2, 4, 8, 16],
                share_secs: 4.0,
                mem_violins: 16,
                mem_guests: 32,
                scale_guests: vec![100, 1000, 3000],
                hpl_hosts: vec![2, 4],
                hpl_n: 2000,
                // At least 20 s in the host namespaces, so start-up and noise are small
                // beside the solve (about 22 min for the whole figure here).
                hpl_seconds: Some(28.0),
                hpl_rounds: 3,
                hpl_shaped: Some("1gbit"),
            }
        }
    }
}

#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct Results {
    machine: String,
    quick: bool,
    started_unix: u64,
    seconds: f64,
    /// Packet workers per host when `--workers` set them (else each host's default).
    #[serde(default)]
    workers: Option<usize>,
    /// The xdp clusters' `xdp_tx` when `--xdp-tx` set it.
    #[serde(default)]
    xdp_tx: Option<violin_dp::config::XdpTx>,
    /// Every cluster's `udp_steering` when `--udp-steering` set it.
    #[serde(default)]
    udp_steering: Option<violin_dp::config::UdpSteering>,
    /// Every cluster's `loud_violin_percent` when `--loud-violin-percent` set it.
    #[serde(default)]
    loud_violin_percent: Option<u32>,
    configs: Vec<String>,
    /// Runs that failed (reported after the results are written).
    #[serde(default)]
    failures: Vec<String>,
    /// Figure 1: 64-byte UDP frames received per second, with CPU cost.
    packet_rate: BTreeMap<String, load::Flood>,
    /// Figure 1b: the xdp plane's tap ports with small frames sent through the UDP
    /// socket (`socket`) or AF_XDP's TX ring (`ring`).
    #[serde(default)]
    xdp_tx_ways: BTreeMap<String, Queues>,
    /// Figure 3b: packet rate and round trips with two rx queues (two workers) a host.
    #[serde(default)]
    queues2: BTreeMap<String, Queues>,
    /// Figure 2: TCP goodput, Gbit/s, by streams.
    tcp_gbps: BTreeMap<String, BTreeMap<String, f64>>,
    /// Figure 2: what that TCP cost, by streams.
    #[serde(default)]
    tcp_cost: BTreeMap<String, BTreeMap<String, TcpCost>>,
    /// Figure 2c: TCP goodput, Gbit/s, by streams, on an underlay of MTU 9000.
    #[serde(default)]
    tcp_jumbo_gbps: BTreeMap<String, BTreeMap<String, f64>>,
    #[serde(default)]
    tcp_jumbo_cost: BTreeMap<String, BTreeMap<String, TcpCost>>,
    /// Figure 2b: TCP goodput, Gbit/s, 1 stream, with the underlay shaped to 1 Gbit/s.
    tcp_shaped_gbps: BTreeMap<String, f64>,
    /// Figure 3: round-trip latency.
    latency: BTreeMap<String, load::Latency>,
    icmp_avg_us: BTreeMap<String, f64>,
    /// Figure 4: measured / configured rate through a cap, by config, then by what is
    /// capped and the rate (`link 10mbit`, `guest 10mbit`).
    policing: BTreeMap<String, BTreeMap<String, Policing>>,
    /// Figure 8: a quiet Violin's round trips alone and while a neighbour floods.
    #[serde(default)]
    isolation: BTreeMap<String, Isolation>,
    /// Figure 7: idle daemon CPU, % of one core, with `idle_violins` Violins.
    idle_cpu_percent: BTreeMap<String, f64>,
    idle_violins: usize,
    /// Figure 5: N Violins with the same addresses, each flooding on the same hosts.
    sharing: BTreeMap<String, Vec<Sharing>>,
    /// Daemon memory per guest beyond what it held with no Violin (the frame pool).
    memory: Option<Memory>,
    /// Daemon memory per guest as one Violin grows (socket guests, one host).
    #[serde(default)]
    scaling: Vec<Scaling>,
    /// Figure 6: HPL by config and number of hosts (one rank per host), medians.
    hpl: BTreeMap<String, BTreeMap<String, hpl::Hpl>>,
    /// Figure 6: the same with the underlay shaped (to 1 Gbit/s).
    #[serde(default)]
    hpl_shaped: BTreeMap<String, BTreeMap<String, hpl::Hpl>>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Memory {
    violins: usize,
    guests: usize,
    /// Both daemons' resident memory with no Violin, KiB (frame pool included).
    daemons_empty_kib: u64,
    daemons_loaded_kib: u64,
    daemon_kib_per_guest: f64,
    /// The guests' relay processes (the part QEMU would play), KiB per guest; 0 when
    /// there are none (netns guests on taps, their default now).
    relay_kib_per_guest: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Scaling {
    guests: usize,
    /// The daemon's resident memory before the Violin and with it, KiB.
    empty_kib: u64,
    loaded_kib: u64,
    /// Its peak while the Violin came up, KiB.
    peak_kib: u64,
    kib_per_guest: f64,
    up_secs: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Sharing {
    violins: usize,
    /// Sum of what every Violin's receiver got, Mbit/s (UDP payload).
    aggregate_mbit: f64,
    /// Aggregate relative to one Violin alone.
    relative_to_one: f64,
    /// Each Violin's rate relative to a fair share (aggregate / N).
    shares: Vec<f64>,
    /// Largest |share - 1|.
    max_deviation: f64,
    /// The same for the bytes the data plane wrote to each receiver's port (what the
    /// receivers' processes then lost from their sockets is not in it). Absent in
    /// results from before it was measured.
    #[serde(default)]
    port_shares: Vec<f64>,
    #[serde(default)]
    port_max_deviation: Option<f64>,
}

/// One configuration's packet rate and round trips (figures 1b and 3b).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Queues {
    flood: load::Flood,
    latency: load::Latency,
}

/// CPU per Gbit/s of TCP (medians of the rounds).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
struct TcpCost {
    /// Busy machine CPU-seconds (both cores, everything) per Gbit delivered.
    cpu_s_per_gbit: f64,
    /// The data-plane daemons' CPU-seconds per Gbit (0 for the kernel's paths).
    dp_cpu_s_per_gbit: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Isolation {
    alone: load::Latency,
    flooded: load::Latency,
    /// What the flooding neighbour's receiver got, Mbit/s.
    flood_mbit: f64,
    /// What the flood added to the p99 in each round, µs (the figure's p99s are
    /// medians over rounds; older results have none).
    #[serde(default)]
    added_p99_us: Vec<f64>,
    /// Whether the quiet Violin shares a packet worker with the flooding one on some
    /// host (`None`: not a Violin, or not known).
    #[serde(default)]
    shares_worker: Option<bool>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Policing {
    /// `link` (the a–b link is capped) or `guest` (guest a is).
    #[serde(default = "link_kind")]
    capped: String,
    configured_mbit: u32,
    udp_mbit: f64,
    udp_ratio: f64,
    tcp_mbit: f64,
    tcp_ratio: f64,
}

fn link_kind() -> String {
    "link".into()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Measures every configuration once a round, alternating, for the plan's rounds.
fn rounds<'a, T>(
    pairs: &'a [Pair],
    plan: &Plan,
    measure: impl Fn(&Pair) -> Result<T>,
) -> Result<BTreeMap<&'a str, Vec<T>>> {
    let mut v: BTreeMap<&str, Vec<T>> = BTreeMap::new();
    for _ in 0..plan.rounds {
        for p in pairs {
            v.entry(p.config).or_default().push(measure(p)?);
        }
    }
    Ok(v)
}

/// A 64-byte flood per configuration in alternating rounds; the medians of each
/// figure, each taken on its own.
fn flood_medians<'a>(pairs: &'a [Pair], plan: &Plan) -> Result<BTreeMap<&'a str, load::Flood>> {
    let floods = rounds(pairs, plan, |p| {
        let (c, s) = (&p.client, &p.server);
        load::udp_flood(&c.ns, &s.ns, s.ip, 18, plan.flood_secs, &p.daemons)
    })?;
    Ok(floods
        .into_iter()
        .map(|(c, fs)| (c, flood_median(&fs)))
        .collect())
}

/// Each figure's median over rounds, taken on its own.
fn flood_median(fs: &[load::Flood]) -> load::Flood {
    let m = |g: fn(&load::Flood) -> f64| median(fs.iter().map(g).collect());
    load::Flood {
        sent_pps: m(|f| f.sent_pps),
        received_pps: m(|f| f.received_pps),
        cpu_us_per_packet: m(|f| f.cpu_us_per_packet),
        dp_cpu_s_per_mpkt: m(|f| f.dp_cpu_s_per_mpkt),
    }
}

/// Figure 1b: the xdp plane's two ways out for small frames, the UDP socket's batches
/// (`xdp_tx = "socket"`) and AF_XDP's TX ring (`"ring"`): the main xdp cluster's tap
/// pair (the hosts' default, or `--xdp-tx`) against a cluster of its own with the
/// other way: round trips, then floods in alternating rounds.
fn xdp_tx_figure(r: &mut Results, plan: &Plan, id: u32, pairs: &[Pair]) -> Result<()> {
    use violin_dp::config::XdpTx;
    say("figure 1b: the xdp plane's small frames through the UDP socket or AF_XDP's TX ring");
    let main_way = testbed::XDP_TX.get().copied().unwrap_or_default();
    let other_way = match main_way {
        XdpTx::Socket => XdpTx::Ring,
        XdpTx::Ring => XdpTx::Socket,
    };
    let other_tb = Testbed::up_opts(
        &format!("xr{id}"),
        "xdp",
        &violin_dp::cluster::UpOptions {
            xdp_tx: other_way,
            ..Testbed::options("xdp", 2, None)
        },
    )?;
    let main = pairs
        .iter()
        .find(|p| p.config == "violin-xdp-tap")
        .context("no xdp tap pair")?;
    let other = other_tb.violin_pair("tap", 102, 3, "tap", None)?;
    let both = [(main_way.name(), main), (other_way.name(), &other)];
    // Round trips first, the idle cluster's first and a second after figure 1's last
    // flood (on the main pair): right after a flood they measure its tail.
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mut latencies = BTreeMap::new();
    for (way, p) in both.iter().rev().copied() {
        let l = load::udp_ping_pong(&p.client.ns, &p.server.ns, p.server.ip, plan.pings)?;
        latencies.insert(way, l);
    }
    let mut floods: BTreeMap<&str, Vec<load::Flood>> = BTreeMap::new();
    for _ in 0..plan.rounds {
        for (way, p) in both {
            let (c, s) = (&p.client, &p.server);
            let f = load::udp_flood(&c.ns, &s.ns, s.ip, 18, plan.flood_secs, &p.daemons)
                .with_context(|| format!("figure 1b, {way}"))?;
            floods.entry(way).or_default().push(f);
        }
    }
    for (way, _) in both {
        let flood = flood_median(&floods[way]);
        let latency = latencies
            .remove(way)
            .context("round trips without figures")?;
        r.xdp_tx_ways.insert(way.into(), Queues { flood, latency });
    }
    Ok(())
}

/// Figure 8: a quiet Violin's round trips alone and while a neighbour Violin floods the
/// same hosts, on each cluster (`[udp, xdp]`); the kernel overlay beside the udp plane's.
fn isolation_figure(
    r: &mut Results,
    plan: &Plan,
    [tu, tx]: [&Testbed; 2],
    pairs: &[Pair],
) -> Result<()> {
    say("figure 8: a quiet Violin's round trips while a neighbour floods");
    let quiet_of = |names: &[&str]| -> Vec<&Pair> {
        pairs.iter().filter(|p| names.contains(&p.config)).collect()
    };
    for (tb, quiet) in [
        (tu, quiet_of(&["kernel", "violin-udp", "violin-udp-tap"])),
        (
            tx,
            quiet_of(&["violin-xdp", "violin-xdp-fast", "violin-xdp-tap"]),
        ),
    ] {
        let noisy = tb.violin_pair("noisy", 250, 50, "tap", None)?;
        let mut each: BTreeMap<&str, Vec<Isolation>> = BTreeMap::new();
        for round in 0..plan.rounds {
            for q in &quiet {
                let i = quiet_beside_flood(tb, plan, q, &noisy)?;
                say(&format!(
                    "  {} (next to {}), round {}: p99 {:.0} us alone, {:.0} us flooded",
                    q.config,
                    noisy.config,
                    round + 1,
                    i.alone.p99_us,
                    i.flooded.p99_us
                ));
                each.entry(q.config).or_default().push(i);
            }
        }
        for (config, rounds) in each {
            r.isolation.insert(
                format!("{config} / {}", noisy.config),
                isolation_median(&rounds),
            );
        }
        tb.down_violin("noisy")?;
    }
    Ok(())
}

/// One round of figure 8 for quiet pair `q`: its round trips alone, then from 0.5 s into
/// a 1400-byte flood between `noisy`'s guests.
fn quiet_beside_flood(tb: &Testbed, plan: &Plan, q: &Pair, noisy: &Pair) -> Result<Isolation> {
    let alone = load::udp_ping_pong(
        &q.client.ns,
        &q.server.ns,
        q.server.ip,
        plan.isolation_pings,
    )?;
    let flood = {
        let (c, s, ip) = (
            noisy.client.ns.clone(),
            noisy.server.ns.clone(),
            noisy.server.ip,
        );
        let secs = 1.0 + plan.isolation_pings as f64 * 300e-6;
        std::thread::spawn(move || load::udp_flood(&c, &s, ip, 1400, secs, &[]))
    };
    std::thread::sleep(Duration::from_millis(500));
    let flooded = load::udp_ping_pong(
        &q.client.ns,
        &q.server.ns,
        q.server.ip,
        plan.isolation_pings,
    );
    let flood = flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood panicked"))??;
    let flooded = flooded?;
    // Violins share a worker when there are more of them than workers.
    let shares_worker = match &q.violin {
        Some(v) => {
            let (a, b) = (tb.workers_of(v)?, tb.workers_of("noisy")?);
            let known = a.iter().chain(&b).all(Option::is_some);
            known.then(|| a.iter().zip(&b).any(|(x, y)| x == y))
        }
        None => None,
    };
    Ok(Isolation {
        flood_mbit: flood.received_pps * 1400.0 * 8.0 / 1e6,
        added_p99_us: vec![flooded.p99_us - alone.p99_us],
        alone,
        flooded,
        shares_worker,
    })
}

/// Figure 8's rounds of one pair as one row: each figure's median taken on its own,
/// each round's added p99 kept, and "shares a worker" if it did in any round.
fn isolation_median(rounds: &[Isolation]) -> Isolation {
    Isolation {
        alone: latency_median(rounds.iter().map(|i| &i.alone).collect()),
        flooded: latency_median(rounds.iter().map(|i| &i.flooded).collect()),
        flood_mbit: median(rounds.iter().map(|i| i.flood_mbit).collect()),
        added_p99_us: rounds.iter().flat_map(|i| i.added_p99_us.clone()).collect(),
        shares_worker: rounds
            .iter()
            .filter_map(|i| i.shares_worker)
            .reduce(|a, b| a || b),
    }
}

/// Round-trip figures over rounds: each quantile's median taken on its own, the
/// samples and losses summed, and the distribution of the round with the median p99.
fn latency_median(mut ls: Vec<&load::Latency>) -> load::Latency {
    let m = |g: fn(&load::Latency) -> f64| median(ls.iter().map(|l| g(l)).collect());
    let (p50_us, p99_us, p999_us) = (m(|l| l.p50_us), m(|l| l.p99_us), m(|l| l.p999_us));
    let (samples, lost) = (
        ls.iter().map(|l| l.samples).sum(),
        ls.iter().map(|l| l.lost).sum(),
    );
    ls.sort_by(|a, b| a.p99_us.total_cmp(&b.p99_us));
    load::Latency {
        p50_us,
        p99_us,
        p999_us,
        samples,
        lost,
        cdf: ls
            .get(ls.len() / 2)
            .map(|l| l.cdf.clone())
            .unwrap_or_default(),
    }
}

/// Figure 5: N Violins with the same addresses flooding at once, on each cluster
/// (`[udp, xdp]`), which it empties first.
fn sharing_figure(r: &mut Results, plan: &Plan, [tu, tx]: [&Testbed; 2]) -> Result<()> {
    say("figure 5: sharing the hosts among N Violins with the same addresses");
    for tb in [tu, tx] {
        // Start from an empty cluster: the figure's Violins are the only ones.
        for v in tb.violin_names()? {
            tb.down_violin(&v)?;
        }
        let mut pairs = Vec::new();
        let mut rows = Vec::new();
        for &n in &plan.share_counts {
            while pairs.len() < n {
                let i = pairs.len();
                pairs.push(tb.violin_pair(
                    &format!("share{i}"),
                    400 + i as u32,
                    50,
                    "socket",
                    None,
                )?);
                load::udp_ping_pong(
                    &pairs[i].client.ns,
                    &pairs[i].server.ns,
                    pairs[i].server.ip,
                    5,
                )?;
            }
            // What the data plane delivered to each receiver's port over the flood,
            // next to what the receiver's process took from its socket.
            let before = delivered_to(tb, &pairs[..n], "b")?;
            let rates: Vec<f64> = std::thread::scope(|s| {
                let hs: Vec<_> = pairs[..n]
                    .iter()
                    .map(|p| {
                        s.spawn(move || {
                            load::udp_flood(
                                &p.client.ns,
                                &p.server.ns,
                                p.server.ip,
                                1400,
                                plan.share_secs,
                                &[],
                            )
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap()
                            .map(|f| f.received_pps * 1400.0 * 8.0 / 1e6)
                    })
                    .collect::<Result<Vec<_>>>()
            })?;
            let after = delivered_to(tb, &pairs[..n], "b")?;
            let port: Vec<f64> = after
                .iter()
                .zip(&before)
                .map(|(a, b)| (a - b) as f64)
                .collect();
            let port_fair = port.iter().sum::<f64>() / n as f64;
            let port_shares: Vec<f64> = port.iter().map(|p| p / port_fair).collect();
            let agg: f64 = rates.iter().sum();
            let fair = agg / n as f64;
            let shares: Vec<f64> = rates.iter().map(|r| r / fair).collect();
            let one = rows
                .first()
                .map(|s: &Sharing| s.aggregate_mbit)
                .unwrap_or(agg);
            rows.push(Sharing {
                violins: n,
                aggregate_mbit: agg,
                relative_to_one: agg / one,
                max_deviation: max_deviation(&shares),
                shares,
                port_max_deviation: Some(max_deviation(&port_shares)),
                port_shares,
            });
        }
        r.sharing.insert(format!("violin-{}", tb.dataplane), rows);
    }
    Ok(())
}

/// Largest |share - 1|.
fn max_deviation(shares: &[f64]) -> f64 {
    shares.iter().map(|s| (s - 1.0).abs()).fold(0.0, f64::max)
}

/// Bytes each pair's Violin has written to its guest `guest`'s port so far.
fn delivered_to(tb: &Testbed, pairs: &[testbed::Pair], guest: &str) -> Result<Vec<u64>> {
    pairs
        .iter()
        .map(|p| {
            let v = p.violin.as_deref().context("a Violin pair")?;
            let st = tb.stats(v)?;
            st.hosts
                .iter()
                .flat_map(|h| &h.ports)
                .find(|x| x.name == guest)
                .map(|x| x.counters.tx_bytes)
                .with_context(|| format!("{v} has no port {guest}"))
        })
        .collect()
}

/// Writes the results as `PREFIX-STARTED[-quick].json` into `--out`, prints `text`
/// and writes it to `--report`; returns the JSON's path.
/// Writes the results of a run of one figure alone (`--hpl`, `--caps`, …) with its
/// table, and says where.
fn write_alone(
    r: &mut Results,
    cli: &Cli,
    t0: Instant,
    prefix: &str,
    table: fn(&Results) -> String,
) -> Result<()> {
    r.seconds = t0.elapsed().as_secs_f64();
    let text = format!("{}{}", workers_line(r), table(r));
    let file = write_results(r, cli, prefix, &text)?;
    say(&format!("results in {}", file.display()));
    Ok(())
}

fn write_results(r: &Results, cli: &Cli, prefix: &str, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(&cli.out)?;
    let file = cli.out.join(format!(
        "{prefix}-{}{}.json",
        r.started_unix,
        if cli.quick { "-quick" } else { "" }
    ));
    std::fs::write(&file, serde_json::to_string_pretty(r)?)?;
    print!("{text}");
    if let Some(p) = &cli.report {
        std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(file)
}

/// Figure 2c: TCP with 1, 4 and 8 streams on two more clusters whose underlay has MTU
/// 9000 (guests 8950). Returns the configurations measured.
fn jumbo_figure(r: &mut Results, plan: &Plan, id: u32) -> Result<Vec<String>> {
    let ju = Testbed::up_mtu(&format!("ju{id}"), "udp", 9000)?;
    let jx = Testbed::up_mtu(&format!("jx{id}"), "xdp", 9000)?;
    let jumbo: Vec<Pair> = vec![
        ju.physical(),
        Pair {
            config: "physical-xdp",
            ..jx.physical()
        },
        ju.kernel_overlay()?,
        ju.violin_pair("perf", 100, 1, "socket", None)?,
        ju.violin_pair("tap", 102, 3, "tap", None)?,
        jx.violin_pair("perf", 100, 1, "socket", None)?,
        jx.violin_pair("fast", 101, 2, "xdp", None)?,
        jx.violin_pair("tap", 102, 3, "tap", None)?,
    ];
    say("  (not ovs: its userspace datapath runs without offloads here)");
    for streams in [1u32, 4, 8] {
        for (c, (g, cost)) in tcp_medians(&jumbo, streams, plan)? {
            let s = format!("{streams}");
            r.tcp_jumbo_gbps
                .entry(c.into())
                .or_default()
                .insert(s.clone(), g);
            r.tcp_jumbo_cost
                .entry(c.into())
                .or_default()
                .insert(s, cost);
        }
    }
    Ok(jumbo.iter().map(|p| p.config.to_string()).collect())
}

/// Figure 6 for every host count of the plan.
fn hpl_figures(r: &mut Results, plan: &Plan, id: u32) -> Result<()> {
    for &hosts in &plan.hpl_hosts {
        hpl_figure(r, plan, &format!("bh{id}"), hosts)?;
    }
    Ok(())
}

/// Figure 6 on `hosts` simulated hosts: N sized so HPL in the host namespaces takes
/// `plan.hpl_seconds` (if set), then alternating rounds of every configuration, on the
/// plain underlay and on one shaped to `plan.hpl_shaped`. A failed run is reported (and
/// fails the check) after the results are written, instead of losing the whole run.
fn hpl_figure(r: &mut Results, plan: &Plan, name: &str, hosts: usize) -> Result<()> {
    const NB: u32 = 128;
    let tb = Testbed::up_hosts(name, "xdp", hosts)?;
    let configs = [
        ("physical", tb.hosts(), "172.31.0.0/24".to_string()),
        (
            "violin-xdp-fast",
            tb.violin_per_host("hplf", 601, 71, "xdp")?,
            "10.71.0.0/24".into(),
        ),
        (
            "violin-xdp-tap",
            tb.violin_per_host("hplt", 602, 72, "tap")?,
            "10.72.0.0/24".into(),
        ),
    ];
    let work = tb.run_dir.join("hpl");
    let mut n = plan.hpl_n;
    if let Some(target) = plan.hpl_seconds {
        let (_, ranks, subnet) = &configs[0];
        let h = match hpl::run(ranks, subnet, n, NB, &work) {
            Ok(h) => h,
            Err(e) => {
                let msg = format!("HPL with {hosts} hosts: the sizing run: {e:#}");
                say(&msg);
                r.failures.push(msg);
                return Ok(());
            }
        };
        n = hpl::size_for(n, h.hpl_seconds, target, NB);
        say(&format!(
            "HPL with {hosts} hosts: N = {} took {:.1} s in the host namespaces; N = {n} for {target} s",
            h.n, h.hpl_seconds
        ));
    }
    let shapes = std::iter::once(None).chain(plan.hpl_shaped.map(Some));
    for shape in shapes {
        tb.shape_underlay(shape)?;
        let mut runs: BTreeMap<&str, Vec<hpl::Hpl>> = BTreeMap::new();
        for _ in 0..plan.hpl_rounds {
            for (c, ranks, subnet) in &configs {
                match hpl::run(ranks, subnet, n, NB, &work) {
                    Ok(h) => runs.entry(c).or_default().push(h),
                    Err(e) => {
                        let on = shape.map(|s| format!(", underlay {s}")).unwrap_or_default();
                        let msg = format!("HPL on {c} with {hosts} hosts{on}: {e:#}");
                        say(&msg);
                        r.failures.push(msg);
                    }
                }
            }
        }
        tb.shape_underlay(None)?;
        let into = if shape.is_some() {
            &mut r.hpl_shaped
        } else {
            &mut r.hpl
        };
        for (c, v) in runs {
            let m = |g: fn(&hpl::Hpl) -> f64| median(v.iter().map(g).collect());
            into.entry(c.into()).or_default().insert(
                format!("{hosts}"),
                hpl::Hpl {
                    gflops: m(|h| h.gflops),
                    hpl_seconds: m(|h| h.hpl_seconds),
                    wall_seconds: m(|h| h.wall_seconds),
                    latency_us: m(|h| h.latency_us),
                    bandwidth_mbs: m(|h| h.bandwidth_mbs),
                    ..v[0]
                },
            );
        }
    }
    Ok(())
}

fn say(msg: &str) {
    eprintln!("\x1b[1m[bench]\x1b[0m {msg}");
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.workers {
        let _ = testbed::WORKERS.set(n);
    }
    if let Some(t) = cli.xdp_tx {
        let _ = testbed::XDP_TX.set(t);
    }
    if let Some(s) = cli.udp_steering {
        let _ = testbed::UDP_STEERING.set(s);
    }
    if let Some(p) = cli.loud_violin_percent {
        let _ = testbed::LOUD.set(p);
    }
    if let Some(json) = &cli.from {
        let text =
            std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let r: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a results file", json.display()))?;
        print!("{}", tables(&r));
        let charts = draw_charts(&r, &cli.out)?;
        say(&format!("{} charts in {}", charts.len(), cli.out.display()));
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks make network namespaces: run as root");
    }
    if let Some(minutes) = cli.soak {
        let r = soak::run(minutes)?;
        std::fs::create_dir_all(&cli.out)?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let json = cli.out.join(format!("soak-{stamp}.json"));
        std::fs::write(&json, serde_json::to_string_pretty(&r)?)?;
        let md = soak::report(&r);
        std::fs::write(json.with_extension("md"), &md)?;
        print!("{md}");
        say(&format!("results in {}", json.display()));
        return soak::check(&r);
    }
    if cli.etcd_scale {
        let e = etcd_scale::measure(cli.quick, &say)?;
        std::fs::create_dir_all(&cli.out)?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let json = cli.out.join(format!(
            "etcd-scale-{stamp}{}.json",
            if cli.quick { "-quick" } else { "" }
        ));
        std::fs::write(&json, serde_json::to_string_pretty(&e)?)?;
        let md = etcd_scale::report(&e);
        std::fs::write(json.with_extension("md"), &md)?;
        print!("{md}");
        say(&format!("results in {}", json.display()));
        return Ok(());
    }
    let mut plan = Plan::new(cli.quick);
    if !cli.hpl_hosts.is_empty() {
        plan.hpl_hosts = cli.hpl_hosts.clone();
    }
    let t0 = Instant::now();
    let mut r = Results {
        machine: machine(),
        quick: cli.quick,
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
        idle_violins: plan.idle_violins,
        workers: cli.workers,
        xdp_tx: cli.xdp_tx,
        udp_steering: cli.udp_steering,
        loud_violin_percent: cli.loud_violin_percent,
        ..Default::default()
    };
    let id = std::process::id() % 10000;
    if cli.hpl {
        say("figure 6 only: HPL alone, one MPI rank per host, physical vs in a Violin");
        hpl_figures(&mut r, &plan, id)?;
        write_alone(&mut r, &cli, t0, "hpl", hpl_table)?;
        let problems = [hpl_problems(&r), r.failures.clone()].concat();
        if !problems.is_empty() {
            bail!("figure 6 is incomplete: {}", problems.join("; "));
        }
        return Ok(());
    }
    if cli.jumbo {
        say("figure 2c only: TCP throughput on an underlay of MTU 9000");
        r.configs = jumbo_figure(&mut r, &plan, id)?;
        write_alone(&mut r, &cli, t0, "jumbo", jumbo_table)?;
        return Ok(());
    }
    say("bringing up two simulated 2-host clusters (udp and xdp data planes)");
    let tu = Testbed::up(&format!("bu{id}"), "udp")?;
    let tx = Testbed::up(&format!("bx{id}"), "xdp")?;
    say("bringing up Open vSwitch (userspace datapath, VXLAN) on a third cluster");
    let mut to = Testbed::up(&format!("bo{id}"), "udp")?;
    // The host namespaces of the xdp cluster: the hosts' own traffic with the xdp
    // plane attached (the udp plane attaches nothing: that is `physical`).
    let host_xdp = Pair {
        config: "physical-xdp",
        ..tx.physical()
    };
    let pairs: Vec<Pair> = vec![
        tu.physical(),
        host_xdp,
        tu.kernel_overlay()?,
        to.ovs_overlay()?,
        tu.violin_pair("perf", 100, 1, "socket", None)?,
        tu.violin_pair("dgram", 103, 4, "dgram", None)?,
        tu.violin_pair("tap", 102, 3, "tap", None)?,
        tx.violin_pair("perf", 100, 1, "socket", None)?,
        tx.violin_pair("dgram", 103, 4, "dgram", None)?,
        tx.violin_pair("fast", 101, 2, "xdp", None)?,
        tx.violin_pair("tap", 102, 3, "tap", None)?,
    ];
    r.configs = pairs.iter().map(|p| p.config.to_string()).collect();
    if cli.sharing {
        sharing_figure(&mut r, &plan, [&tu, &tx])?;
        write_alone(&mut r, &cli, t0, "sharing", sharing_table)?;
        return Ok(());
    }
    if cli.caps {
        caps_figure(&mut r, &plan, [&tu, &tx])?;
        write_alone(&mut r, &cli, t0, "caps", caps_table)?;
        return Ok(());
    }
    if cli.isolation {
        isolation_figure(&mut r, &plan, [&tu, &tx], &pairs)?;
        write_alone(&mut r, &cli, t0, "isolation", isolation_table)?;
        return Ok(());
    }
    for p in &pairs {
        load::udp_ping_pong(&p.client.ns, &p.server.ns, p.server.ip, 20)
            .with_context(|| format!("{}: warm-up", p.config))?;
    }

    say("figure 1: 64-byte UDP packet rate");
    for (c, f) in flood_medians(&pairs, &plan)? {
        r.packet_rate.insert(c.into(), f);
    }
    xdp_tx_figure(&mut r, &plan, id, &pairs)?;

    say("figure 2: TCP throughput, 1, 4 and 8 streams");
    for streams in [1u32, 4, 8] {
        for (c, (g, cost)) in tcp_medians(&pairs, streams, &plan)? {
            let s = format!("{streams}");
            r.tcp_gbps.entry(c.into()).or_default().insert(s.clone(), g);
            r.tcp_cost.entry(c.into()).or_default().insert(s, cost);
        }
    }

    say("figure 2c: TCP throughput on an underlay of MTU 9000");
    jumbo_figure(&mut r, &plan, id)?;

    say("figure 2b: TCP throughput, 1 stream, underlay shaped to 1 Gbit/s");
    tu.shape_underlay(Some("1gbit"))?;
    tx.shape_underlay(Some("1gbit"))?;
    to.shape_underlay(Some("1gbit"))?;
    let shaped = tcp_medians(&pairs, 1, &plan).map(|m| {
        r.tcp_shaped_gbps = m
            .into_iter()
            .map(|(c, (g, _))| (c.to_string(), g))
            .collect();
    });
    tu.shape_underlay(None)?;
    tx.shape_underlay(None)?;
    to.shape_underlay(None)?;
    shaped?;

    say("figure 3: round-trip latency");
    for p in &pairs {
        r.latency.insert(
            p.config.into(),
            load::udp_ping_pong(&p.client.ns, &p.server.ns, p.server.ip, plan.pings)?,
        );
        r.icmp_avg_us.insert(
            p.config.into(),
            load::icmp_avg_us(&p.client.ns, p.server.ip, plan.icmp)?,
        );
    }

    say("figure 3b: two rx queues (a packet worker each): packet rate and round trips");
    {
        let q2 = |name: &str, dp: &'static str| {
            Testbed::up_opts(
                name,
                dp,
                &violin_dp::cluster::UpOptions {
                    queues: 2,
                    ..Testbed::options(dp, 2, None)
                },
            )
        };
        let qu = q2(&format!("qu{id}"), "udp")?;
        let qx = q2(&format!("qx{id}"), "xdp")?;
        let two: Vec<Pair> = vec![
            qu.physical(),
            qu.violin_pair("tap", 102, 3, "tap", None)?,
            qx.violin_pair("fast", 101, 2, "xdp", None)?,
            qx.violin_pair("tap", 102, 3, "tap", None)?,
        ];
        let mut floods = flood_medians(&two, &plan)?;
        for p in &two {
            let flood = floods.remove(p.config).context("a flood without figures")?;
            let latency = load::udp_ping_pong(&p.client.ns, &p.server.ns, p.server.ip, plan.pings)?;
            r.queues2.insert(p.config.into(), Queues { flood, latency });
        }
    }

    caps_figure(&mut r, &plan, [&tu, &tx])?;

    isolation_figure(&mut r, &plan, [&tu, &tx], &pairs)?;

    say(&format!(
        "figure 7: idle daemons with {} Violins",
        plan.idle_violins
    ));
    for tb in [&tu, &tx] {
        // perf and tap (and fast on xdp) are up already.
        let existing = tb.violin_names()?.len();
        for i in existing..plan.idle_violins {
            tb.violin_pair(
                &format!("idle{i}"),
                300 + i as u32,
                100 + i as u8,
                "socket",
                None,
            )?;
        }
        std::thread::sleep(Duration::from_millis(500));
        let pids = tb.daemons();
        let c0 = load::process_ticks(&pids);
        std::thread::sleep(Duration::from_secs_f64(plan.idle_secs));
        let used = (load::process_ticks(&pids) - c0) as f64 / load::ticks_per_second();
        // Per daemon, % of one core.
        r.idle_cpu_percent.insert(
            format!("violin-{}", tb.dataplane),
            used / plan.idle_secs / pids.len() as f64 * 100.0,
        );
    }
    sharing_figure(&mut r, &plan, [&tu, &tx])?;
    say(&format!(
        "memory: {} Violins × {} guests on the xdp data plane",
        plan.mem_violins, plan.mem_guests
    ));
    for v in tx.violin_names()? {
        tx.down_violin(&v)?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let empty = load::rss_kib(&tx.daemons());
    for i in 0..plan.mem_violins {
        tx.violin_many(&format!("mem{i}"), 500 + i as u32, plan.mem_guests)?;
    }
    // Exercise every guest's port once (buffers are touched on first use).
    for i in 0..plan.mem_violins {
        let ns = tx.guest_ns(&format!("mem{i}"), "g0");
        let _ = load::icmp_avg_us(&ns, std::net::Ipv4Addr::new(10, 60, 0, 2), 2);
    }
    let loaded = load::rss_kib(&tx.daemons());
    let guests = plan.mem_violins * plan.mem_guests;
    let relays = tx.relay_pids();
    r.memory = Some(Memory {
        violins: plan.mem_violins,
        guests,
        daemons_empty_kib: empty,
        daemons_loaded_kib: loaded,
        daemon_kib_per_guest: loaded.saturating_sub(empty) as f64 / guests as f64,
        relay_kib_per_guest: load::rss_kib(&relays) as f64 / relays.len().max(1) as f64,
    });
    drop(tx);
    drop(tu);
    drop(to);
    say("memory per guest: one Violin of socket guests on one host");
    for &n in &plan.scale_guests {
        // A fresh daemon each time: memory freed by an earlier run stays mapped.
        let tb = Testbed::up_with(&format!("bm{id}"), "udp", 1, Some(n.max(2048)))?;
        let empty = load::rss_kib(&tb.daemons());
        let t = Instant::now();
        tb.violin_sockets("scale", 900, n)?;
        let up_secs = t.elapsed().as_secs_f64();
        tb.stats("scale")?;
        let loaded = load::rss_kib(&tb.daemons());
        let peak = load::peak_kib(&tb.daemons());
        r.scaling.push(Scaling {
            guests: n,
            empty_kib: empty,
            loaded_kib: loaded,
            peak_kib: peak,
            kib_per_guest: loaded.saturating_sub(empty) as f64 / n as f64,
            up_secs,
        });
    }
    say("figure 6: HPL alone, one MPI rank per host, physical vs in a Violin");
    hpl_figures(&mut r, &plan, id)?;
    r.seconds = t0.elapsed().as_secs_f64();
    let file = write_results(&r, &cli, "bench", &tables(&r))?;
    // Charts before the check: a run with a failed figure still draws the rest.
    let charts = draw_charts(
        &r,
        &cli.out.join(format!(
            "charts-{}{}",
            r.started_unix,
            if cli.quick { "-quick" } else { "" }
        )),
    );
    check(&r)?;
    let charts = charts?;
    say(&format!(
        "results: {} and {} charts ({:.0} s)",
        file.display(),
        charts.len(),
        r.seconds
    ));
    Ok(())
}

/// TCP goodput in Gbit/s per configuration and its CPU cost, the medians of
/// alternating rounds.
fn tcp_medians<'a>(
    pairs: &'a [Pair],
    streams: u32,
    plan: &Plan,
) -> Result<BTreeMap<&'a str, (f64, TcpCost)>> {
    let v = rounds(pairs, plan, |p| {
        let (c, s) = (&p.client, &p.server);
        load::tcp_throughput(&c.ns, &s.ns, s.ip, streams, plan.tcp_secs, &p.daemons)
            .with_context(|| format!("{}: TCP, {streams} streams", p.config))
    })?;
    Ok(v.into_iter()
        .map(|(c, x)| {
            let m = |g: fn(&load::Tcp) -> f64| median(x.iter().map(g).collect());
            let cost = TcpCost {
                cpu_s_per_gbit: m(|t| t.cpu_s_per_gbit),
                dp_cpu_s_per_gbit: m(|t| t.dp_cpu_s_per_gbit),
            };
            (c, (m(|t| t.bits_per_second) / 1e9, cost))
        })
        .collect())
}

/// Figure 4: UDP and TCP through each plan's cap, a link's and a guest's, on each
/// cluster (`[udp, xdp]`).
fn caps_figure(r: &mut Results, plan: &Plan, [tu, tx]: [&Testbed; 2]) -> Result<()> {
    say("figure 4: rate caps (a link's, a guest's)");
    for &(plane, port) in &plan.police_ports {
        let tb = if plane == "xdp" { tx } else { tu };
        for capped in ["link", "guest"] {
            for (i, &mbit) in plan.police_rates_mbit.iter().enumerate() {
                let name = format!("pol{i}");
                let subnet = 20 + i as u8;
                let rate = format!("{mbit}mbit");
                let cap = match capped {
                    "link" => testbed::Cap::Link(&rate),
                    _ => testbed::Cap::Guest(&rate),
                };
                let pair = tb.violin_pair_capped(&name, 200 + i as u32, subnet, port, cap)?;
                let p = police(tb, &name, &pair, capped, mbit, plan.police_secs)?;
                say(&format!(
                    "  {} {capped} cap {rate}: UDP {:.3} x, TCP {:.3} x",
                    pair.config, p.udp_ratio, p.tcp_ratio
                ));
                r.policing
                    .entry(pair.config.into())
                    .or_default()
                    .insert(format!("{capped} {rate}"), p);
                tb.down_violin(&name)?;
            }
        }
    }
    Ok(())
}

/// Seconds a capped flood runs before the UDP rate is measured, and after.
const POLICE_LEAD: f64 = 1.0;
const POLICE_TAIL: f64 = 0.5;

/// Floods the capped a→b link (or capped guest a) with UDP, then runs TCP over it;
/// rates from the switch's edge counters (L2 bytes) and from iperf3 (goodput). The UDP
/// rate is what the switch let through between two snapshots taken while the flood
/// runs: after [`POLICE_LEAD`] (the bucket's first burst spent, the guest's queue
/// full) and `secs` later, so neither the burst nor the backlog a held-back guest
/// drains after the flood counts.
fn police(
    tb: &Testbed,
    violin: &str,
    p: &Pair,
    capped: &str,
    mbit: u32,
    secs: f64,
) -> Result<Policing> {
    load::udp_ping_pong(&p.client.ns, &p.server.ns, p.server.ip, 5)?;
    let edge = |s: &violin_dp::cli::ClusterStats| {
        s.edges
            .iter()
            .find(|e| e.from == "a" && e.to == "b")
            .map(|e| e.bytes)
            .unwrap_or(0)
    };
    let flood = {
        let (c, s, ip) = (p.client.ns.clone(), p.server.ns.clone(), p.server.ip);
        let run = POLICE_LEAD + secs + POLICE_TAIL;
        std::thread::spawn(move || load::udp_flood(&c, &s, ip, 1400, run, &[]))
    };
    // udp_flood warms up for 0.3 s before its own `secs` begin.
    std::thread::sleep(Duration::from_secs_f64(0.3 + POLICE_LEAD));
    // Each snapshot's time is the middle of the call that took it.
    let snapshot = || {
        let t = Instant::now();
        let s = tb.stats(violin);
        (s, t + t.elapsed() / 2)
    };
    let (s0, t0) = snapshot();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (s1, t1) = snapshot();
    let dt = (t1 - t0).as_secs_f64();
    flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood panicked"))??;
    let udp_mbit = (edge(&s1?) - edge(&s0?)) as f64 * 8.0 / dt / 1e6;
    let tcp_mbit = load::tcp_throughput(&p.client.ns, &p.server.ns, p.server.ip, 1, secs, &[])?
        .bits_per_second
        / 1e6;
    Ok(Policing {
        capped: capped.into(),
        configured_mbit: mbit,
        udp_mbit,
        udp_ratio: udp_mbit / mbit as f64,
        tcp_mbit,
        tcp_ratio: tcp_mbit / mbit as f64,
    })
}

fn draw_charts(r: &Results, dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    use charts::{Chart, Series};
    std::fs::create_dir_all(dir)?;
    let mut files = Vec::new();
    let rel = |v: Option<f64>, base: Option<f64>| match (v, base) {
        (Some(v), Some(b)) if b > 0.0 => v / b,
        _ => f64::NAN,
    };
    let pps = |c: &str| r.packet_rate.get(c).map(|f| f.received_pps);
    let series = vec![Series {
        name: "packet rate / physical".into(),
        values: r
            .configs
            .iter()
            .map(|c| rel(pps(c), pps("physical")))
            .collect(),
    }];
    files.extend(charts::draw(
        dir,
        "fig1-packet-rate",
        &Chart::Bars {
            title: "64-byte UDP packet rate relative to physical",
            y_label: "ratio",
            categories: &r.configs,
            series: &series,
        },
    )?);
    let tcp = |c: &str, s: &str| r.tcp_gbps.get(c).and_then(|m| m.get(s)).copied();
    let series: Vec<Series> = ["1", "4", "8"]
        .iter()
        .map(|s| Series {
            name: format!("{s} stream(s)"),
            values: r
                .configs
                .iter()
                .map(|c| rel(tcp(c, s), tcp("physical", s)))
                .collect(),
        })
        .collect();
    files.extend(charts::draw(
        dir,
        "fig2-tcp",
        &Chart::Bars {
            title: "TCP throughput relative to physical",
            y_label: "ratio",
            categories: &r.configs,
            series: &series,
        },
    )?);
    // Figure 6 like the paper's Figure 2: HPL relative to physical, by number of hosts.
    let hpl_cats: Vec<String> = ["violin-xdp", "violin-xdp-fast", "violin-xdp-tap"]
        .iter()
        .filter(|c| r.hpl.contains_key(**c) || r.hpl_shaped.contains_key(**c))
        .map(|c| c.to_string())
        .collect();
    let mut series: Vec<Series> = Vec::new();
    for (under, m) in [("", &r.hpl), (", 1 Gbit/s underlay", &r.hpl_shaped)] {
        for h in m.get("physical").into_iter().flat_map(|m| m.keys()) {
            series.push(Series {
                name: format!("{h} hosts{under}"),
                values: hpl_cats
                    .iter()
                    .map(|c| {
                        let g = |c: &str| m.get(c).and_then(|m| m.get(h)).map(|x| x.gflops);
                        rel(g(c), g("physical"))
                    })
                    .collect(),
            });
        }
    }
    if !hpl_cats.is_empty() {
        files.extend(charts::draw(
            dir,
            "fig6-hpl",
            &Chart::Bars {
                title: "HPL Gflops in a Violin relative to physical",
                y_label: "ratio",
                categories: &hpl_cats,
                series: &series,
            },
        )?);
    }
    let lines: Vec<(String, Vec<(f64, f64)>)> = r
        .configs
        .iter()
        .filter_map(|c| r.latency.get(c).map(|l| (c.clone(), l.cdf.clone())))
        .collect();
    files.extend(charts::draw(
        dir,
        "fig3-latency-cdf",
        &Chart::Cdf {
            title: "UDP round trip (64 B), CDF",
            lines: &lines,
        },
    )?);
    let mut cats = Vec::new();
    let (mut udp, mut tcpr) = (Vec::new(), Vec::new());
    for (c, m) in &r.policing {
        for p in m.values() {
            cats.push(format!(
                "{} {} {}M",
                c.trim_start_matches("violin-"),
                p.capped,
                p.configured_mbit
            ));
            udp.push(p.udp_ratio);
            tcpr.push(p.tcp_ratio);
        }
    }
    let series = vec![
        Series {
            name: "UDP".into(),
            values: udp,
        },
        Series {
            name: "TCP".into(),
            values: tcpr,
        },
    ];
    files.extend(charts::draw(
        dir,
        "fig4-policing",
        &Chart::Bars {
            title: "Rate caps: measured / configured rate",
            y_label: "ratio",
            categories: &cats,
            series: &series,
        },
    )?);
    if let Some(first) = r.sharing.values().next() {
        let cats: Vec<String> = first
            .iter()
            .map(|s| format!("{} Violin(s)", s.violins))
            .collect();
        let series: Vec<Series> = r
            .sharing
            .iter()
            .map(|(c, rows)| Series {
                name: c.clone(),
                values: rows.iter().map(|s| s.relative_to_one).collect(),
            })
            .collect();
        files.extend(charts::draw(
            dir,
            "fig5-sharing",
            &Chart::Bars {
                title: "Aggregate throughput of N Violins relative to one",
                y_label: "ratio",
                categories: &cats,
                series: &series,
            },
        )?);
    }
    Ok(files)
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs, {model}, Linux {}", kernel.trim())
}

/// The configurations of figure 2c (TCP on an MTU 9000 underlay).
const JUMBO_CONFIGS: [&str; 8] = [
    "physical",
    "physical-xdp",
    "kernel",
    "violin-udp",
    "violin-udp-tap",
    "violin-xdp",
    "violin-xdp-fast",
    "violin-xdp-tap",
];

fn ratio(x: f64, base: f64) -> String {
    if base > 0.0 && x.is_finite() {
        format!("{:.2}", x / base)
    } else {
        "-".into()
    }
}

/// Figure 5 as a table.
fn caps_table(r: &Results) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n4. Rate caps: measured / configured rate, the a→b link or guest a capped \
         (UDP: L2 bytes the switch let through; TCP: iperf3 goodput)"
    );
    let _ = writeln!(
        o,
        "{:<17} {:>6} {:>9} {:>10} {:>7} {:>10} {:>7}",
        "config", "capped", "cap", "UDP Mbit", "ratio", "TCP Mbit", "ratio"
    );
    for (c, m) in &r.policing {
        for p in m.values() {
            let _ = writeln!(
                o,
                "{:<17} {:>6} {:>5}mbit {:>10.2} {:>7.3} {:>10.2} {:>7.3}",
                c, p.capped, p.configured_mbit, p.udp_mbit, p.udp_ratio, p.tcp_mbit, p.tcp_ratio
            );
        }
    }
    o
}

fn sharing_table(r: &Results) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n5. Sharing: N Violins with the same addresses, each flooding (1400-byte UDP)"
    );
    let _ = writeln!(
        o,
        "   (max |share-1|: each receiver's rate against a fair share; at port: the same for\n\
         \x20   the bytes the data plane wrote to the receivers' ports, before their sockets)"
    );
    let _ = writeln!(
        o,
        "{:<13} {:>3} {:>14} {:>10} {:>14} {:>8}",
        "config", "N", "aggregate Mbit", "/ N=1", "max |share-1|", "at port"
    );
    for (c, rows) in &r.sharing {
        for s in rows {
            let port = s
                .port_max_deviation
                .map_or_else(|| "-".to_string(), |d| format!("{d:.3}"));
            let _ = writeln!(
                o,
                "{:<13} {:>3} {:>14.1} {:>10.3} {:>14.3} {:>8}",
                c, s.violins, s.aggregate_mbit, s.relative_to_one, s.max_deviation, port
            );
        }
    }
    o
}

/// Figure 8 (4b in the tables) as a table.
fn isolation_table(r: &Results) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n4b. Isolation: a quiet pair's UDP round trips (µs) alone and while a neighbour \
         Violin floods the same hosts (1400-byte UDP)"
    );
    let _ = writeln!(
        o,
        "   (medians over rounds; +p99: the median of what the flood added in each round, \
         whose figures follow)"
    );
    let _ = writeln!(
        o,
        "{:<38} {:>9} {:>9} {:>9} {:>9} {:>11} {:>12}  rounds' +p99",
        "quiet / flooding", "p50", "p99", "p99 fl.", "+p99", "flood Mbit", "same worker"
    );
    for (c, i) in &r.isolation {
        let added = if i.added_p99_us.is_empty() {
            i.flooded.p99_us - i.alone.p99_us
        } else {
            median(i.added_p99_us.clone())
        };
        let each: Vec<String> = i.added_p99_us.iter().map(|a| format!("{a:.0}")).collect();
        let _ = writeln!(
            o,
            "{:<38} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11.1} {:>12}  {}",
            c,
            i.alone.p50_us,
            i.alone.p99_us,
            i.flooded.p99_us,
            added,
            i.flood_mbit,
            match i.shares_worker {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            },
            each.join(" / ")
        );
    }
    o
}

/// Figure 2c's table (empty if it was not measured).
fn jumbo_table(r: &Results) -> String {
    let mut o = String::new();
    if !r.tcp_jumbo_gbps.is_empty() {
        tcp_table(
            &mut o,
            "2c. TCP throughput on an underlay of MTU 9000 (guests 8950), Gbit/s",
            &r.configs,
            &r.tcp_jumbo_gbps,
            &r.tcp_jumbo_cost,
        );
    }
    o
}

/// Figure 6 as a table: HPL and MPI ping-pong, unshaped and shaped.
fn hpl_table(r: &Results) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\n6. HPL alone, one MPI rank per host over TCP (median of rounds), with MPI \
         ping-pong from the same runs"
    );
    let _ = writeln!(
        o,
        "{:<16} {:>9} {:>5} {:>6} {:>8} {:>6} {:>7} {:>8} {:>9}",
        "config", "underlay", "hosts", "N", "Gflops", "/phys", "HPL s", "lat µs", "MB/s"
    );
    for (under, m) in [("plain", &r.hpl), ("shaped", &r.hpl_shaped)] {
        for c in [
            "physical",
            "violin-xdp",
            "violin-xdp-fast",
            "violin-xdp-tap",
        ] {
            for (hosts, h) in m.get(c).into_iter().flatten() {
                let base = m
                    .get("physical")
                    .and_then(|m| m.get(hosts))
                    .map(|p| p.gflops)
                    .unwrap_or(f64::NAN);
                let _ = writeln!(
                    o,
                    "{:<16} {:>9} {:>5} {:>6} {:>8.3} {:>6} {:>7.1} {:>8.1} {:>9.0}",
                    c,
                    under,
                    hosts,
                    h.n,
                    h.gflops,
                    ratio(h.gflops, base),
                    h.hpl_seconds,
                    h.latency_us,
                    h.bandwidth_mbs
                );
            }
        }
    }
    o
}

/// The figures as text tables (printed, and written with `--report`).
/// A TCP figure: goodput for 1, 4 and 8 streams against physical and the kernel
/// overlay, then what each Gbit cost in CPU.
fn tcp_table(
    o: &mut String,
    title: &str,
    configs: &[String],
    gbps: &BTreeMap<String, BTreeMap<String, f64>>,
    cost: &BTreeMap<String, BTreeMap<String, TcpCost>>,
) {
    use std::fmt::Write;
    let _ = writeln!(o, "\n{title}");
    let _ = writeln!(
        o,
        "{:<17} {:>9} {:>7} {:>8} {:>9} {:>7} {:>8} {:>9} {:>8}",
        "config",
        "1 stream",
        "/phys",
        "/kernel",
        "4 streams",
        "/phys",
        "/kernel",
        "8 streams",
        "/kernel"
    );
    let at = |c: &str, s: &str| {
        gbps.get(c)
            .and_then(|m| m.get(s))
            .copied()
            .unwrap_or(f64::NAN)
    };
    for c in configs.iter().filter(|c| gbps.contains_key(*c)) {
        let (a, b, e) = (at(c, "1"), at(c, "4"), at(c, "8"));
        let _ = writeln!(
            o,
            "{:<17} {:>9.2} {:>7} {:>8} {:>9.2} {:>7} {:>8} {:>9.2} {:>8}",
            c,
            a,
            ratio(a, at("physical", "1")),
            ratio(a, at("kernel", "1")),
            b,
            ratio(b, at("physical", "4")),
            ratio(b, at("kernel", "4")),
            e,
            ratio(e, at("kernel", "8"))
        );
    }
    if cost.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "   CPU per Gbit: busy machine CPU-seconds (both cores: iperf3, guests' stacks,\n    daemons, softirq) per Gbit delivered; dp: the daemons' part"
    );
    let _ = writeln!(
        o,
        "{:<17} {:>9} {:>8} {:>7} {:>9} {:>8} {:>7} {:>9} {:>8} {:>7}",
        "config",
        "1: CPU s",
        "/kernel",
        "dp",
        "4: CPU s",
        "/kernel",
        "dp",
        "8: CPU s",
        "/kernel",
        "dp"
    );
    let cpu = |c: &str, s: &str| cost.get(c).and_then(|m| m.get(s)).copied();
    let cell = |c: &str, s: &str| match cpu(c, s) {
        Some(t) => {
            let dp = if t.dp_cpu_s_per_gbit > 0.0 {
                format!("{:.3}", t.dp_cpu_s_per_gbit)
            } else {
                "-".into()
            };
            let kern = cpu("kernel", s).map_or(f64::NAN, |k| k.cpu_s_per_gbit);
            format!(
                "{:>9.3} {:>8} {:>7}",
                t.cpu_s_per_gbit,
                ratio(t.cpu_s_per_gbit, kern),
                dp
            )
        }
        None => format!("{:>9} {:>8} {:>7}", "-", "-", "-"),
    };
    for c in configs.iter().filter(|c| cost.contains_key(*c)) {
        let _ = writeln!(
            o,
            "{:<17} {} {} {}",
            c,
            cell(c, "1"),
            cell(c, "4"),
            cell(c, "8")
        );
    }
}

/// The worker count `--workers` set, as a line above the tables (empty if unset).
fn workers_line(r: &Results) -> String {
    let mut o = r
        .workers
        .map(|n| format!("packet workers per host: {n} (--workers)\n"))
        .unwrap_or_default();
    if let Some(t) = r.xdp_tx {
        o.push_str(&format!(
            "xdp clusters' small frames: {} (--xdp-tx)\n",
            t.name()
        ));
    }
    if let Some(t) = r.udp_steering {
        o.push_str(&format!(
            "underlay datagrams queue on: {} sockets (--udp-steering)\n",
            t.name()
        ));
    }
    if let Some(p) = r.loud_violin_percent {
        o.push_str(&format!(
            "a Violin is loud from {p} % of a core (--loud-violin-percent)\n"
        ));
    }
    o
}

fn tables(r: &Results) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nViolin benchmarks{} — {}",
        if r.quick {
            " (quick: smoke run, not results)"
        } else {
            ""
        },
        r.machine
    );
    o.push_str(&workers_line(r));
    let phys = r
        .packet_rate
        .get("physical")
        .map(|f| f.received_pps)
        .unwrap_or(f64::NAN);
    let kern = r
        .packet_rate
        .get("kernel")
        .map(|f| f.received_pps)
        .unwrap_or(f64::NAN);
    let _ = writeln!(o, "\n1. 64-byte UDP packet rate, guest → remote guest");
    let _ = writeln!(
        o,
        "   (kpps/core: packets per second of machine CPU, generator and sink included: the\n    cost per packet with the 2 cores' sharing taken out)"
    );
    let _ = writeln!(
        o,
        "{:<17} {:>10} {:>8} {:>9} {:>11} {:>10} {:>9} {:>14}",
        "config", "pps", "/phys", "/kernel", "CPU µs/pkt", "kpps/core", "/kernel", "dp CPU s/Mpkt"
    );
    let kern_core = r
        .packet_rate
        .get("kernel")
        .map(|f| 1e3 / f.cpu_us_per_packet)
        .unwrap_or(f64::NAN);
    for c in &r.configs {
        if let Some(f) = r.packet_rate.get(c) {
            let dp = if f.dp_cpu_s_per_mpkt.is_finite() && f.dp_cpu_s_per_mpkt > 0.0 {
                format!("{:.2}", f.dp_cpu_s_per_mpkt)
            } else {
                "-".into()
            };
            let per_core = 1e3 / f.cpu_us_per_packet;
            let _ = writeln!(
                o,
                "{:<17} {:>10.0} {:>8} {:>9} {:>11.2} {:>10.0} {:>9} {:>14}",
                c,
                f.received_pps,
                ratio(f.received_pps, phys),
                ratio(f.received_pps, kern),
                f.cpu_us_per_packet,
                per_core,
                ratio(per_core, kern_core),
                dp
            );
        }
    }
    if let (Some(sock), Some(ring)) = (r.xdp_tx_ways.get("socket"), r.xdp_tx_ways.get("ring")) {
        let _ = writeln!(
            o,
            "\n1b. The xdp plane's small frames through the UDP socket's batches, a round's lone frame\n    through the TX ring (xdp_tx = socket, the default), or all through AF_XDP's TX ring\n    (ring); tap ports, round trips, then alternating floods"
        );
        let _ = writeln!(
            o,
            "{:<17} {:>10} {:>8} {:>11} {:>14} {:>8} {:>8}",
            "xdp_tx", "pps", "/ring", "CPU µs/pkt", "dp CPU s/Mpkt", "p50", "p99"
        );
        for (way, q) in [("socket", sock), ("ring", ring)] {
            let _ = writeln!(
                o,
                "{:<17} {:>10.0} {:>8} {:>11.2} {:>14.2} {:>8.1} {:>8.1}",
                way,
                q.flood.received_pps,
                ratio(q.flood.received_pps, ring.flood.received_pps),
                q.flood.cpu_us_per_packet,
                q.flood.dp_cpu_s_per_mpkt,
                q.latency.p50_us,
                q.latency.p99_us
            );
        }
    }
    tcp_table(
        &mut o,
        "2. TCP throughput (iperf3), Gbit/s",
        &r.configs,
        &r.tcp_gbps,
        &r.tcp_cost,
    );
    o.push_str(&jumbo_table(r));
    let _ = writeln!(
        o,
        "\n2b. TCP throughput, 1 stream, underlay shaped to 1 Gbit/s (tc tbf), Gbit/s"
    );
    let ps = r
        .tcp_shaped_gbps
        .get("physical")
        .copied()
        .unwrap_or(f64::NAN);
    for c in &r.configs {
        if let Some(v) = r.tcp_shaped_gbps.get(c) {
            let _ = writeln!(o, "{:<17} {:>9.3} {:>7}", c, v, ratio(*v, ps));
        }
    }
    let _ = writeln!(
        o,
        "\n3. Round-trip latency, µs (UDP ping-pong, 64 B; ICMP average)"
    );
    let _ = writeln!(
        o,
        "{:<17} {:>8} {:>8} {:>8} {:>12} {:>9}",
        "config", "p50", "p99", "p99.9", "p99 - phys", "ICMP avg"
    );
    let p99 = r
        .latency
        .get("physical")
        .map(|l| l.p99_us)
        .unwrap_or(f64::NAN);
    for c in &r.configs {
        if let Some(l) = r.latency.get(c) {
            let _ = writeln!(
                o,
                "{:<17} {:>8.1} {:>8.1} {:>8.1} {:>12.1} {:>9.1}",
                c,
                l.p50_us,
                l.p99_us,
                l.p999_us,
                l.p99_us - p99,
                r.icmp_avg_us.get(c).copied().unwrap_or(f64::NAN)
            );
        }
    }
    if !r.queues2.is_empty() {
        let _ = writeln!(
            o,
            "\n3b. Two rx queues a host (a packet worker each): 64-byte packet rate and round trips,\n    against the same configuration with one queue (figures 1 and 3)"
        );
        let _ = writeln!(
            o,
            "{:<17} {:>9} {:>8} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "config",
            "pps",
            "/1 queue",
            "CPU µs/pkt",
            "/1 queue",
            "p50",
            "p99",
            "p99.9",
            "/1 queue"
        );
        for (c, q) in &r.queues2 {
            let one = r.packet_rate.get(c);
            let one_p99 = r.latency.get(c).map_or(f64::NAN, |l| l.p99_us);
            let _ = writeln!(
                o,
                "{:<17} {:>9.0} {:>8} {:>11.2} {:>8} {:>8.1} {:>8.1} {:>8.1} {:>8}",
                c,
                q.flood.received_pps,
                ratio(
                    q.flood.received_pps,
                    one.map_or(f64::NAN, |f| f.received_pps)
                ),
                q.flood.cpu_us_per_packet,
                ratio(
                    q.flood.cpu_us_per_packet,
                    one.map_or(f64::NAN, |f| f.cpu_us_per_packet)
                ),
                q.latency.p50_us,
                q.latency.p99_us,
                q.latency.p999_us,
                ratio(q.latency.p99_us, one_p99)
            );
        }
    }
    o.push_str(&caps_table(r));
    o.push_str(&isolation_table(r));
    o.push_str(&sharing_table(r));
    if let Some(m) = &r.memory {
        let _ = writeln!(
            o,
            "\n8. Memory with {} Violins x {} guests ({} guests)",
            m.violins,
            m.guests / m.violins.max(1),
            m.guests
        );
        let relays = if m.relay_kib_per_guest > 0.0 {
            format!("relays {:.0} KiB each", m.relay_kib_per_guest)
        } else {
            "no relay processes (the guests' taps are the daemons')".into()
        };
        let _ = writeln!(o, "daemons (both) empty {} KiB, loaded {} KiB: {:.1} KiB per guest beyond the frame pool; {relays}", m.daemons_empty_kib, m.daemons_loaded_kib, m.daemon_kib_per_guest);
    }
    if !r.scaling.is_empty() {
        let _ = writeln!(
            o,
            "\n8b. Daemon memory as one Violin of socket guests grows (one host, udp plane)"
        );
        let _ = writeln!(
            o,
            "{:>7} {:>10} {:>10} {:>10} {:>10} {:>6}",
            "guests", "empty KiB", "with KiB", "peak KiB", "KiB/guest", "up s"
        );
        for s in &r.scaling {
            let _ = writeln!(
                o,
                "{:>7} {:>10} {:>10} {:>10} {:>10.1} {:>6.1}",
                s.guests, s.empty_kib, s.loaded_kib, s.peak_kib, s.kib_per_guest, s.up_secs
            );
        }
    }
    o.push_str(&hpl_table(r));
    let _ = writeln!(
        o,
        "\n7. Idle daemon CPU with {} Violins configured (per daemon, % of one core)",
        r.idle_violins
    );
    for (c, v) in &r.idle_cpu_percent {
        let _ = writeln!(o, "{c:<17} {v:>8.3} %");
    }
    o
}

/// The smoke test's check: every figure has every configuration, with finite, positive
/// numbers. Never a timing threshold.
/// What is missing or malformed in figure 6.
fn hpl_problems(r: &Results) -> Vec<String> {
    let mut problems = Vec::new();
    for (under, m) in [("", &r.hpl), (" (shaped underlay)", &r.hpl_shaped)] {
        for c in ["physical", "violin-xdp-fast", "violin-xdp-tap"] {
            let ok = m.get(c).is_some_and(|m| {
                !m.is_empty()
                    && m.values().all(|h| {
                        h.gflops > 0.0
                            && h.hpl_seconds > 0.0
                            && h.latency_us > 0.0
                            && h.bandwidth_mbs > 0.0
                    })
            });
            if !ok {
                problems.push(format!("HPL of {c}{under}"));
            }
        }
    }
    problems
}

fn check(r: &Results) -> Result<()> {
    let mut problems = Vec::new();
    for c in &r.configs {
        match r.packet_rate.get(c) {
            Some(f) if f.received_pps > 0.0 && f.cpu_us_per_packet.is_finite() => {}
            other => problems.push(format!("packet rate of {c}: {other:?}")),
        }
        for s in ["1", "4", "8"] {
            if !r
                .tcp_gbps
                .get(c)
                .and_then(|m| m.get(s))
                .is_some_and(|v| *v > 0.0)
            {
                problems.push(format!("TCP {s} stream(s) of {c}"));
            }
            if !r
                .tcp_cost
                .get(c)
                .and_then(|m| m.get(s))
                .is_some_and(|t| t.cpu_s_per_gbit > 0.0 && t.cpu_s_per_gbit.is_finite())
            {
                problems.push(format!("CPU per Gbit of TCP, {s} stream(s), of {c}"));
            }
        }
        if !r
            .latency
            .get(c)
            .is_some_and(|l| l.samples > 0 && l.p50_us > 0.0 && l.p99_us >= l.p50_us)
        {
            problems.push(format!("latency of {c}"));
        }
        if !r.tcp_shaped_gbps.get(c).is_some_and(|v| *v > 0.0) {
            problems.push(format!("TCP over the shaped underlay of {c}"));
        }
        if !r.icmp_avg_us.get(c).is_some_and(|v| *v > 0.0) {
            problems.push(format!("ICMP of {c}"));
        }
    }
    for way in ["socket", "ring"] {
        if !r.xdp_tx_ways.get(way).is_some_and(|q| {
            q.flood.received_pps > 0.0
                && q.flood.dp_cpu_s_per_mpkt > 0.0
                && q.latency.samples > 0
                && q.latency.p99_us >= q.latency.p50_us
        }) {
            problems.push(format!("xdp small frames through the {way}"));
        }
    }
    for c in [
        "physical",
        "violin-udp-tap",
        "violin-xdp-fast",
        "violin-xdp-tap",
    ] {
        if !r.queues2.get(c).is_some_and(|q| {
            q.flood.received_pps > 0.0
                && q.flood.cpu_us_per_packet.is_finite()
                && q.latency.samples > 0
                && q.latency.p99_us >= q.latency.p50_us
        }) {
            problems.push(format!("two rx queues: {c}"));
        }
    }
    for c in JUMBO_CONFIGS {
        for s in ["1", "4", "8"] {
            if !r
                .tcp_jumbo_gbps
                .get(c)
                .and_then(|m| m.get(s))
                .is_some_and(|v| *v > 0.0)
            {
                problems.push(format!("TCP at MTU 9000, {s} stream(s), of {c}"));
            }
        }
    }
    for c in ["violin-udp", "violin-udp-tap", "violin-xdp-fast"] {
        if !r.policing.get(c).is_some_and(|m| {
            m.len() >= 2 && m.values().all(|p| p.udp_mbit > 0.0 && p.tcp_mbit > 0.0)
        }) {
            problems.push(format!("rate caps of {c}"));
        }
    }
    if r.isolation.len() < 6
        || r.isolation
            .values()
            .any(|i| i.alone.samples == 0 || i.flooded.samples == 0 || i.flood_mbit <= 0.0)
    {
        problems.push("isolation".into());
    }
    for c in ["violin-udp", "violin-xdp"] {
        let ok = r.sharing.get(c).is_some_and(|rows| {
            rows.len() >= 2
                && rows.iter().all(|s| {
                    s.aggregate_mbit > 0.0
                        && s.shares.len() == s.violins
                        && s.shares.iter().all(|x| x.is_finite())
                })
        });
        if !ok {
            problems.push(format!("sharing of {c}"));
        }
    }
    if !r.memory.as_ref().is_some_and(|m| {
        m.daemons_loaded_kib > 0
            && m.daemon_kib_per_guest.is_finite()
            && m.relay_kib_per_guest >= 0.0
    }) {
        problems.push("memory".into());
    }
    problems.extend(hpl_problems(r));
    if r.idle_cpu_percent.len() != 2 || r.idle_cpu_percent.values().any(|v| !v.is_finite()) {
        problems.push("idle CPU".into());
    }
    problems.extend(r.failures.iter().cloned());
    if !problems.is_empty() {
        bail!("benchmark output is malformed: {}", problems.join("; "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p50: f64, p99: f64) -> load::Latency {
        load::Latency {
            p50_us: p50,
            p99_us: p99,
            p999_us: p99 * 2.0,
            samples: 100,
            lost: 1,
            cdf: vec![(0.99, p99)],
        }
    }

    fn round(alone: f64, flooded: f64, shares: Option<bool>) -> Isolation {
        Isolation {
            alone: latency(alone / 2.0, alone),
            flooded: latency(flooded / 2.0, flooded),
            flood_mbit: flooded,
            added_p99_us: vec![flooded - alone],
            shares_worker: shares,
        }
    }

    #[test]
    fn isolation_rounds_give_medians_and_keep_each_rounds_addition() {
        let m = isolation_median(&[
            round(100.0, 5000.0, Some(false)),
            round(300.0, 400.0, Some(true)),
            round(200.0, 250.0, Some(false)),
        ]);
        assert_eq!((m.alone.p50_us, m.alone.p99_us), (100.0, 200.0));
        assert_eq!((m.flooded.p99_us, m.flooded.p999_us), (400.0, 800.0));
        assert_eq!(
            m.flooded.cdf,
            vec![(0.99, 400.0)],
            "the median round's distribution"
        );
        assert_eq!((m.alone.samples, m.alone.lost), (300, 3));
        assert_eq!(m.added_p99_us, vec![4900.0, 100.0, 50.0]);
        assert_eq!(m.flood_mbit, 400.0);
        assert_eq!(m.shares_worker, Some(true), "shared in one round");
        let none = isolation_median(&[round(1.0, 2.0, None)]);
        assert_eq!(none.shares_worker, None);
    }
}
