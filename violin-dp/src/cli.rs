//! The `violin` command line: the simulated cluster, Violins on it, and their counters.

use crate::cluster::{self, ClusterState, UpOptions};
use crate::config::DataplaneChoice;
use crate::control::{self, GuestStatus, HostViolinStats, Request};
use crate::lifecycle::{self, statuses};
use crate::profile;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "violin",
    version,
    about = "Isolated virtual distributed environments on a shared cluster"
)]
pub struct Cli {
    /// Which simulated cluster (several may coexist).
    #[arg(long, global = true, env = "VIOLIN_CLUSTER", default_value = "violin")]
    pub cluster: String,
    /// Where cluster state lives.
    #[arg(
        long,
        global = true,
        env = "VIOLIN_RUN_DIR",
        default_value = "/run/violin"
    )]
    pub run_dir: PathBuf,
    /// The cluster's etcd (client URLs, comma-separated). Default: the simulated
    /// cluster's, from its state file. With it, the CLI needs no state file.
    #[arg(long, global = true, env = "VIOLIN_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// With `--etcd`: the CA of the members' certificates, and the CLI's certificate
    /// and key (its CN is its etcd user).
    #[arg(long, global = true, env = "VIOLIN_ETCD_CA", requires_all = ["etcd_cert", "etcd_key"])]
    pub etcd_ca: Option<PathBuf>,
    #[arg(long, global = true, env = "VIOLIN_ETCD_CERT", requires = "etcd_ca")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "VIOLIN_ETCD_KEY", requires = "etcd_ca")]
    pub etcd_key: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// The simulated cluster: host namespaces on an underlay bridge, a daemon in each.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Create a Violin from a spec (TOML): its guests on their hosts, the daemons programmed.
    Up {
        spec: PathBuf,
        /// Seconds to wait for every guest to attach.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Change a running Violin to a new spec: add/remove guests and links, change rates.
    /// Unaffected guests keep running; a spec with errors changes nothing.
    Apply {
        spec: PathBuf,
        /// Seconds to wait for new guests to attach.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Add a guest to a running Violin.
    Scale {
        violin: String,
        /// The new guest as key=value pairs of a [[guest]] table, e.g.
        /// `name=e,host=h2,ip=10.0.0.5/24`.
        #[arg(long)]
        add: String,
        /// Also allow the new guest to talk to PEER (Violins with a [[link]] table).
        #[arg(long = "link", value_name = "PEER")]
        links: Vec<String>,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Move a guest to another host while the others keep running; reports the outage
    /// a peer guest measured.
    Migrate {
        violin: String,
        guest: String,
        #[arg(long)]
        to: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Print the measured outage as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove a Violin: its guests, sockets and switch state on every host.
    Down {
        name: String,
        /// Seconds to wait for every host to report the removal (clusters with etcd).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// List the Violins on the cluster.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Attach to a VM's serial console (Ctrl-] leaves).
    Console { violin: String, guest: String },
    /// Run a command inside a guest (VMs: through an agent; output is stdout and stderr
    /// merged, the exit status is the command's).
    Exec {
        violin: String,
        guest: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The traffic matrix: who sends how much to whom, with rates over an interval.
    Profile {
        violin: String,
        /// Seconds between the two samples the rates come from.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long, conflicts_with_all = ["dot", "svg"])]
        json: bool,
        /// A Graphviz digraph (edge width: rate).
        #[arg(long, conflicts_with = "svg")]
        dot: bool,
        /// An SVG drawing (edge width: rate).
        #[arg(long)]
        svg: bool,
        /// Refresh every interval until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Per-edge traffic and drops by reason, summed over the hosts.
    Stats {
        violin: String,
        #[arg(long)]
        json: bool,
    },
    /// Stream the Violin's dropped frames as they happen (time, host, reason, where
    /// from, MACs, IPs, length), with a summary each second; Ctrl-C stops.
    Monitor {
        violin: String,
        /// Only the drops: no summaries.
        #[arg(long)]
        drops: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// At most this many drops described a second per host (the rest are counted).
        #[arg(long, default_value_t = crate::control::protocol::DEFAULT_MONITOR_RATE)]
        rate: u32,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<f64>,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Create N host namespaces on a bridge and start a violin-dp in each.
    Up {
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        #[arg(long, default_value = "172.31.0.0/24")]
        subnet: String,
        #[arg(long, value_enum, default_value = "auto")]
        dataplane: DataplaneChoice,
        /// Underlay MTU.
        #[arg(long, default_value_t = 1500)]
        mtu: u32,
        /// xdp: one AF_XDP socket per queue shared by all Violins (what the daemon falls
        /// back to where a driver refuses shared UMEM), instead of one per Violin.
        #[arg(long)]
        xdp_single_socket: bool,
        /// Super-frames between the daemons carry complete checksums (no VXLAN remote
        /// checksum offload: `remote_checksum = false` in each host's config).
        #[arg(long)]
        no_remote_checksum: bool,
        /// xdp: jumbo frames take the kernel's UDP socket instead of multi-buffer AF_XDP
        /// sockets (`xdp_multi_buffer = false` in each host's config).
        #[arg(long)]
        no_xdp_multi_buffer: bool,
        /// Rx/tx queues of each host's NIC (a veth): more than one simulates a multi-queue
        /// NIC. Each host runs a packet worker per queue (unless --workers says otherwise).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
        queues: u32,
        /// Packet workers per host (default: one per queue).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=32))]
        workers: Option<u32>,
        /// xdp: attach the classifier generic (keeps the host's segmentation offload on a
        /// veth: the default here) or native (in the driver).
        #[arg(long, value_enum, default_value = "auto")]
        xdp_attach: crate::config::XdpAttach,
        /// xdp: how small frames leave each host (`xdp_tx` in the host config): the UDP
        /// socket's batches (the default) or AF_XDP's TX ring.
        #[arg(long, value_enum, default_value = "socket")]
        xdp_tx: crate::config::XdpTx,
        /// Which underlay socket each Violin's datagrams queue on (`udp_steering` in the
        /// host config): a socket of its own (the default) or its worker's.
        #[arg(long, value_enum, default_value = "violin")]
        udp_steering: crate::config::UdpSteering,
        /// Most guests per host over all Violins (`max_guests` in the host config;
        /// default 2048).
        #[arg(long)]
        max_guests: Option<usize>,
        /// Microseconds each packet worker keeps polling after a round with work before
        /// it sleeps (`busy_poll_us` in the host config; default 200, 0: off).
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        busy_poll_us: Option<u64>,
        /// Percent of a core a packet worker spends on a Violin that makes it loud: its
        /// neighbours move to a worker without a loud Violin (`loud_violin_percent` in
        /// the host config; default 20, 0: Violins stay where they were placed).
        #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
        loud_violin_percent: Option<u32>,
        /// etcd members, each in a namespace on the underlay (0: no etcd; the CLI then
        /// drives each daemon over its control socket).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=7))]
        etcd_members: u32,
        /// Seconds a host stays registered after its last keep-alive: a host silent
        /// this long is shown down and its guests lost.
        #[arg(long, default_value_t = crate::config::DEFAULT_LEASE_TTL, value_parser = clap::value_parser!(u64).range(2..=3600))]
        lease_ttl: u64,
    },
    /// Show the bridge, subnet and each host's namespace and underlay address.
    Info {
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemons and remove every namespace, link and file of the cluster.
    Down,
    /// Restart one host's daemon; it restores the host's Violins.
    Restart {
        host: String,
        /// Kill it with SIGKILL first, as a crash would.
        #[arg(long)]
        hard: bool,
    },
}

fn progress(msg: &str) {
    eprintln!("  · {msg}");
}

pub fn run(cli: Cli) -> Result<()> {
    let (run_dir, name) = (&cli.run_dir, cli.cluster.as_str());
    let etcd = cli.etcd.clone();
    let tls = match (&cli.etcd_ca, &cli.etcd_cert, &cli.etcd_key) {
        (Some(ca), Some(cert), Some(key)) => Some(crate::config::EtcdTls {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => None,
    };
    let load =
        |run_dir: &PathBuf, name: &str| cluster::load_or_etcd(run_dir, name, &etcd, tls.as_ref());
    match cli.cmd {
        Cmd::Cluster(ClusterCmd::Up {
            hosts,
            subnet,
            dataplane,
            mtu,
            xdp_single_socket,
            no_remote_checksum,
            no_xdp_multi_buffer,
            queues,
            workers,
            xdp_attach,
            xdp_tx,
            udp_steering,
            max_guests,
            busy_poll_us,
            loud_violin_percent,
            etcd_members,
            lease_ttl,
        }) => {
            eprintln!("Bringing up cluster {name} ({hosts} hosts)");
            let st = cluster::up(
                run_dir,
                name,
                &UpOptions {
                    hosts,
                    subnet,
                    dataplane,
                    mtu,
                    xdp_single_socket,
                    no_remote_checksum,
                    no_xdp_multi_buffer,
                    queues,
                    workers: workers.map(|w| w as usize),
                    xdp_attach,
                    xdp_tx,
                    udp_steering,
                    max_guests,
                    busy_poll_us,
                    loud_violin_percent,
                    etcd_members: etcd_members as usize,
                    lease_ttl,
                },
                &progress,
            )?;
            print_cluster(&st);
            Ok(())
        }
        Cmd::Cluster(ClusterCmd::Info { json }) => {
            let st = cluster::load(run_dir, name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print_cluster(&st);
            }
            Ok(())
        }
        Cmd::Cluster(ClusterCmd::Down) => {
            cluster::down(run_dir, name, &progress)?;
            eprintln!("cluster {name} removed");
            Ok(())
        }
        Cmd::Cluster(ClusterCmd::Restart { host, hard }) => {
            let h = cluster::restart_host(run_dir, name, &host, hard)?;
            eprintln!("daemon of {host} restarted (pid {})", h.pid);
            Ok(())
        }
        Cmd::Up { spec, timeout } => {
            lifecycle::up(&load(run_dir, name)?, &spec, Duration::from_secs(timeout))
        }
        Cmd::Apply { spec, timeout } => {
            lifecycle::apply_file(&load(run_dir, name)?, &spec, Duration::from_secs(timeout))
        }
        Cmd::Scale {
            violin,
            add,
            links,
            timeout,
        } => lifecycle::scale(
            &load(run_dir, name)?,
            &violin,
            &add,
            &links,
            Duration::from_secs(timeout),
        ),
        Cmd::Migrate {
            violin,
            guest,
            to,
            timeout,
            json,
        } => {
            let m = lifecycle::migrate(
                &load(run_dir, name)?,
                &violin,
                &guest,
                &to,
                Duration::from_secs(timeout),
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            }
            Ok(())
        }
        Cmd::Down { name: v, timeout } => {
            lifecycle::down_within(&load(run_dir, name)?, &v, Duration::from_secs(timeout))
        }
        Cmd::Ls { json } => violin_ls(&load(run_dir, name)?, json),
        Cmd::Console { violin, guest } => violin_console(&load(run_dir, name)?, &violin, &guest),
        Cmd::Exec { violin, guest, cmd } => {
            violin_exec(&load(run_dir, name)?, &violin, &guest, &cmd)
        }
        Cmd::Profile {
            violin,
            interval,
            json,
            dot,
            svg,
            watch,
        } => {
            let format = match (json, dot, svg) {
                (true, _, _) => ProfileFormat::Json,
                (_, true, _) => ProfileFormat::Dot,
                (_, _, true) => ProfileFormat::Svg,
                _ => ProfileFormat::Table,
            };
            violin_profile(&load(run_dir, name)?, &violin, interval, format, watch)
        }
        Cmd::Stats { violin, json } => violin_stats(&load(run_dir, name)?, &violin, json),
        Cmd::Monitor {
            violin,
            drops,
            json,
            rate,
            seconds,
        } => crate::monitor::run(
            &load(run_dir, name)?,
            &violin,
            &crate::monitor::Options {
                drops_only: drops,
                json,
                rate,
                seconds,
            },
        ),
    }
}

fn print_cluster(st: &ClusterState) {
    println!(
        "cluster {}  bridge {}  subnet {}  dataplane {:?}",
        st.name, st.bridge, st.subnet, st.dataplane
    );
    println!(
        "{:<6} {:<16} {:<16} {:<10} METRICS (from the host's namespace)",
        "HOST", "NETNS", "UNDERLAY", "DAEMON PID"
    );
    for h in &st.hosts {
        println!(
            "{:<6} {:<16} {:<16} {:<10} {}",
            h.name,
            h.netns,
            h.underlay,
            h.pid,
            h.metrics.as_deref().unwrap_or("-")
        );
    }
    if st.etcd.is_empty() {
        println!("no etcd: the CLI drives each daemon over its control socket");
    }
    for m in &st.etcd {
        println!(
            "etcd {:<6} {:<16} {:<16} {:<10} {} (this machine)",
            m.name,
            m.netns,
            m.underlay,
            m.pid,
            m.mgmt_url()
        );
    }
    if let Some(t) = &st.etcd_tls {
        println!(
            "the CLI's etcd certificate: {} (CA {})",
            t.cert.display(),
            t.ca.display()
        );
    }
}

#[derive(Serialize)]
struct LsEntry {
    name: String,
    vni: u32,
    guests: usize,
    attached: usize,
    /// Guests on hosts shown down (their lease in etcd expired).
    lost: usize,
    hosts: Vec<String>,
}

fn violin_ls(st: &ClusterState, json: bool) -> Result<()> {
    let mut map: BTreeMap<String, LsEntry> = BTreeMap::new();
    for s in statuses(st)? {
        for x in &s.violins {
            let e = map.entry(x.name.clone()).or_insert_with(|| LsEntry {
                name: x.name.clone(),
                vni: x.vni,
                guests: 0,
                attached: 0,
                lost: 0,
                hosts: Vec::new(),
            });
            e.guests += x.guests.len();
            if s.down {
                e.lost += x.guests.len();
                e.hosts.push(format!("{}(down)", s.host));
            } else {
                e.attached += x.guests.iter().filter(|g| g.connected).count();
                e.hosts.push(s.host.clone());
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&map.values().collect::<Vec<_>>())?
        );
        return Ok(());
    }
    println!(
        "{:<16} {:>9} {:>8} {:>9} {:>5}  HOSTS",
        "VIOLIN", "VNI", "GUESTS", "ATTACHED", "LOST"
    );
    for e in map.values() {
        println!(
            "{:<16} {:>9} {:>8} {:>9} {:>5}  {}",
            e.name,
            e.vni,
            e.guests,
            e.attached,
            e.lost,
            e.hosts.join(",")
        );
    }
    Ok(())
}

/// A guest's status, if it runs on this machine; else an error naming its host.
fn find_guest(st: &ClusterState, violin: &str, guest: &str) -> Result<GuestStatus> {
    let (host, g) = statuses(st)?
        .into_iter()
        .flat_map(|s| {
            let h = (s.host.clone(), s.underlay, s.down);
            s.violins
                .into_iter()
                .filter(|x| x.name == violin)
                .flat_map(|x| x.guests)
                .map(move |g| (h.clone(), g))
        })
        .find(|(_, g)| g.name == guest)
        .ok_or_else(|| anyhow!("no guest {guest:?} in Violin {violin:?}"))?;
    let here = match (&g.netns, &g.agent) {
        (_, Some(agent)) => std::path::Path::new(agent).exists(),
        (Some(ns), None) => crate::host::netns::exists(ns),
        (None, None) => true,
    };
    if !here {
        let (name, addr, down) = host;
        bail!(
            "guest {guest} runs on host {name} ({addr}{}), not on this machine: run the command there",
            if down { ", shown down" } else { "" }
        );
    }
    Ok(g)
}

fn violin_exec(st: &ClusterState, violin: &str, guest: &str, cmd: &[String]) -> Result<()> {
    let g = find_guest(st, violin, guest)?;
    if let Some(agent) = &g.agent {
        // A VM: through its agent on a virtio serial port.
        let status =
            crate::host::vm::exec(std::path::Path::new(agent), cmd, &mut std::io::stdout())?;
        std::process::exit(status);
    }
    let ns = g.netns.ok_or_else(|| {
        anyhow!(
            "guest {guest} is a socket guest: attach to {} instead",
            g.socket
        )
    })?;
    // Commands run inside the guest's limits, like the guest's own processes.
    if let Some(cg) = crate::host::cgroup::GuestCgroup::open(&ns) {
        cg.add(std::process::id())?;
    }
    // Root in the guest, the guest's own unprivileged uid on the host.
    crate::host::netns::enter_guest(&ns)?;
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&cmd[0]).args(&cmd[1..]).exec();
    bail!("running {:?} in {ns}: {err}", cmd[0])
}

fn violin_console(st: &ClusterState, violin: &str, guest: &str) -> Result<()> {
    let g = find_guest(st, violin, guest)?;
    match &g.console {
        Some(c) => crate::host::vm::console(std::path::Path::new(c)),
        None => {
            bail!("guest {guest} is not a VM: use `violin exec {violin} {guest} -- sh` for a shell")
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ProfileFormat {
    Table,
    Json,
    Dot,
    Svg,
}

fn edge_sample(st: &ClusterState, violin: &str) -> Result<profile::Sample> {
    Ok(gather_stats(st, violin)?
        .edges
        .into_iter()
        .map(|e| ((e.from, e.to), (e.packets, e.bytes)))
        .collect())
}

fn violin_profile(
    st: &ClusterState,
    violin: &str,
    interval: f64,
    format: ProfileFormat,
    watch: bool,
) -> Result<()> {
    if !(interval > 0.0 && interval <= 3600.0) {
        bail!("--interval must be between 0 and 3600 seconds, not {interval}");
    }
    let spec = lifecycle::current(st, violin)?
        .ok_or_else(|| anyhow!("no Violin named {violin:?} on cluster {}", st.name))?;
    let members: Vec<String> = spec.members.iter().map(|m| m.name.clone()).collect();
    let mut before = edge_sample(st, violin)?;
    let mut t0 = std::time::Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let after = edge_sample(st, violin)?;
        let now = std::time::Instant::now();
        let p = profile::Profile::between(violin, members.clone(), &before, &after, now - t0);
        let out = match format {
            ProfileFormat::Table => p.table(),
            ProfileFormat::Json => serde_json::to_string(&p)? + "\n",
            ProfileFormat::Dot => p.dot(),
            ProfileFormat::Svg => p.svg(),
        };
        if watch && format == ProfileFormat::Table {
            // Clear the screen and home the cursor, like watch(1).
            print!("\x1b[2J\x1b[H");
        }
        print!("{out}");
        use std::io::Write;
        std::io::stdout().flush()?;
        if !watch {
            return Ok(());
        }
        (before, t0) = (after, now);
    }
}

/// A Violin's counters summed over every host.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ClusterStats {
    pub name: String,
    pub vni: u32,
    pub edges: Vec<crate::stats::EdgeStats>,
    pub drops: BTreeMap<String, u64>,
    pub hosts: Vec<HostViolinStats>,
}

/// Each host's metrics server, as registered in etcd (`None`: a cluster without etcd).
pub fn metrics_endpoints(st: &ClusterState) -> Result<Option<BTreeMap<String, Option<String>>>> {
    Ok(match st.store()? {
        Some(mut s) => Some(
            s.hosts()?
                .into_iter()
                .map(|v| (v.record.name, v.record.endpoint))
                .collect(),
        ),
        None => None,
    })
}

/// Host `h`'s metrics server among `endpoints`.
pub fn endpoint_of(endpoints: &BTreeMap<String, Option<String>>, h: &str) -> Result<String> {
    endpoints
        .get(h)
        .cloned()
        .flatten()
        .ok_or_else(|| anyhow!("host {h} publishes no metrics endpoint"))
}

/// Each host's counters of a Violin, summed: read from each host's metrics server
/// (found through etcd), or asked over its control socket (a cluster without etcd).
pub fn gather_stats(st: &ClusterState, violin: &str) -> Result<ClusterStats> {
    let endpoints = metrics_endpoints(st)?;
    let mut hosts = Vec::new();
    for (h, s) in st.hosts.iter().zip(statuses(st)?) {
        if !s.violins.iter().any(|x| x.name == violin) {
            continue;
        }
        let Some(endpoints) = &endpoints else {
            hosts.push(control::call::<HostViolinStats>(
                &h.control,
                &Request::Stats {
                    name: violin.into(),
                },
            )?);
            continue;
        };
        if s.down {
            eprintln!(
                "warning: host {} is down: its counters are left out",
                h.name
            );
            continue;
        }
        let ep = endpoint_of(endpoints, &h.name)?;
        hosts.push(
            control::http_get_json::<HostViolinStats>(&format!("{ep}/violins/{violin}/stats"))
                .with_context(|| format!("reading the counters of host {}", h.name))?,
        );
    }
    if hosts.is_empty() {
        bail!("no Violin named {violin:?} on cluster {}", st.name);
    }
    let mut edges: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let mut drops: BTreeMap<String, u64> = BTreeMap::new();
    for h in &hosts {
        for e in &h.stats.edges {
            let c = edges.entry((e.from.clone(), e.to.clone())).or_default();
            c.0 += e.packets;
            c.1 += e.bytes;
        }
        for (k, v) in &h.stats.drops {
            *drops.entry(k.clone()).or_default() += v;
        }
    }
    Ok(ClusterStats {
        name: violin.into(),
        vni: hosts[0].stats.vni,
        edges: edges
            .into_iter()
            .map(|((from, to), (packets, bytes))| crate::stats::EdgeStats {
                from,
                to,
                packets,
                bytes,
            })
            .collect(),
        drops,
        hosts,
    })
}

fn violin_stats(st: &ClusterState, violin: &str, json: bool) -> Result<()> {
    let s = gather_stats(st, violin)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("Violin {} (VNI {})", s.name, s.vni);
    println!(
        "\n{:<10} {:<10} {:>12} {:>14}",
        "FROM", "TO", "PACKETS", "BYTES"
    );
    for e in &s.edges {
        println!(
            "{:<10} {:<10} {:>12} {:>14}",
            e.from, e.to, e.packets, e.bytes
        );
    }
    println!("\n{:<18} {:>12}", "DROP REASON", "PACKETS");
    if s.drops.is_empty() {
        println!("{:<18} {:>12}", "(none)", 0);
    }
    for (k, v) in &s.drops {
        println!("{k:<18} {v:>12}");
    }
    let marked: u64 = s.hosts.iter().map(|h| h.stats.ecn_marked).sum();
    let (qf, qb) = s.hosts.iter().fold((0, 0), |(f, b), h| {
        (f + h.stats.queued_frames, b + h.stats.queued_bytes)
    });
    if marked + qf > 0 {
        println!(
            "\ncapped links: {marked} frames marked CE (ECN); {qf} frames ({qb} bytes) queued now"
        );
    }
    println!(
        "\n{:<10} {:<6} {:>10} {:>12} {:>10} {:>12} {:>8}",
        "GUEST", "HOST", "RX FRAMES", "RX BYTES", "TX FRAMES", "TX BYTES", "CONNECTS"
    );
    for h in &s.hosts {
        for p in &h.ports {
            let c = p.counters;
            println!(
                "{:<10} {:<6} {:>10} {:>12} {:>10} {:>12} {:>8}",
                p.name, h.host, c.rx_frames, c.rx_bytes, c.tx_frames, c.tx_bytes, c.connects
            );
        }
    }
    println!("\n{:<6} {:<5} {:>10}  DETAIL", "HOST", "PLANE", "UDP RX");
    for h in &s.hosts {
        println!("{:<6} {:<5} {:>10}", h.host, h.dataplane, h.udp_rx_frames);
        if let Some(x) = &h.xdp {
            let v: Vec<String> = x.verdicts.iter().map(|(k, n)| format!("{k}={n}")).collect();
            println!(
                "{:24}classifier: {}",
                "",
                if v.is_empty() {
                    "-".into()
                } else {
                    v.join(" ")
                }
            );
            let r = &x.rings;
            println!(
                "{:24}rings: rx={} (multi-buffer {}, dropped {}) tx={} (multi-buffer {}) free={}/{} backlog={} tx_ring_full={} pool_empty={} fill_retry={} rx_bad={} neighbour_miss={}",
                "",
                r.counters.rx_frames,
                r.counters.rx_multi_buffer,
                r.counters.rx_multi_buffer_dropped,
                r.counters.tx_frames,
                r.counters.tx_multi_buffer,
                r.free_frames,
                r.pool_frames,
                r.completion_backlog,
                r.counters.tx_ring_full,
                r.counters.pool_empty,
                r.counters.fill_retry,
                r.rx_bad,
                r.neighbour_miss
            );
            if let Some(k) = &x.socket {
                println!(
                    "{:24}{}'s socket: rx_ring_full={} rx_dropped={} fill_ring_empty={} invalid={} busy_poll={}",
                    "",
                    s.name,
                    k.rx_ring_full,
                    k.rx_dropped,
                    k.rx_fill_ring_empty,
                    k.rx_invalid_descs + k.tx_invalid_descs,
                    match (k.busy_poll, k.napi_id) {
                        (false, _) => "off".to_string(),
                        (true, 0) => "on (no NAPI id from the device)".to_string(),
                        (true, n) => format!("napi {n}"),
                    }
                );
            }
        }
        if !h.host_drops.is_empty() {
            let d: Vec<String> = h
                .host_drops
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            println!("{:24}host drops (no Violin): {}", "", d.join(" "));
        }
    }
    Ok(())
}
