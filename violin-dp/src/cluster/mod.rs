//! A simulated cluster on one machine: N host network namespaces on an underlay bridge
//! (the bridge itself has no address), one `violin-dp` per host.
//!
//! Names derive from the cluster name so several clusters can coexist (tests use unique
//! names): bridge `vb-NAME`, host namespaces `NAME-h1…`, guest namespaces
//! `NAME-VIOLIN-GUEST`. State lives in `RUN_DIR/NAME/` (cluster.json, host configs,
//! daemon logs, sockets).
//!
//! The cluster's state is in etcd ([`etcd`]: members in namespaces on the underlay)
//! unless it is brought up with `--etcd-members 0`; then the CLI drives each daemon over
//! its control socket.

pub mod etcd;
pub mod pki;

use crate::config::{DataplaneChoice, EtcdTls, HostConfig};
use crate::control::{self, HostStatus, Request};
use crate::host::{netlink, netns, procs};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    pub name: String,
    pub bridge: String,
    pub subnet: String,
    pub dataplane: DataplaneChoice,
    pub hosts: Vec<HostEntry>,
    /// The cluster's etcd members (none: the CLI drives the daemons' sockets).
    #[serde(default)]
    pub etcd: Vec<etcd::Member>,
    /// The CLI's and the administrator's (`root`) TLS identities for etcd.
    #[serde(default)]
    pub etcd_tls: Option<EtcdTls>,
    #[serde(default)]
    pub etcd_admin: Option<EtcdTls>,
    /// Endpoints and identity given on the command line (`--etcd…`), which win.
    #[serde(skip)]
    pub etcd_override: Vec<String>,
    #[serde(skip)]
    pub etcd_tls_override: Option<EtcdTls>,
    /// Where this state was loaded from (set by `load`).
    #[serde(skip)]
    pub run_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostEntry {
    pub name: String,
    pub netns: String,
    pub underlay: Ipv4Addr,
    pub interface: String,
    pub control: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The running daemon (0 while there is none): read from its pidfile on load.
    pub pid: u32,
    /// The keeper that runs the daemon and restarts it when it dies.
    #[serde(default)]
    pub keeper: u32,
    /// Where the daemon serves Prometheus metrics (inside the host's namespace).
    #[serde(default)]
    pub metrics: Option<String>,
    /// Its address on the management link from this machine (clusters with etcd).
    #[serde(default)]
    pub mgmt: Option<Ipv4Addr>,
}

impl ClusterState {
    /// Where the CLI reaches the cluster's etcd.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        if !self.etcd_override.is_empty() {
            return self.etcd_override.clone();
        }
        self.etcd.iter().map(etcd::Member::mgmt_url).collect()
    }

    /// The identity the CLI shows etcd.
    pub fn etcd_identity(&self) -> Option<&EtcdTls> {
        self.etcd_tls_override.as_ref().or(self.etcd_tls.as_ref())
    }

    /// The cluster's etcd as the CLI sees it, if it has one.
    pub fn store(&self) -> Result<Option<crate::store::Store>> {
        let e = self.etcd_endpoints();
        if e.is_empty() {
            return Ok(None);
        }
        crate::store::Store::connect(&e, self.etcd_identity(), &self.name).map(Some)
    }

    pub fn host(&self, name: &str) -> Option<&HostEntry> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The namespace of a lightweight guest (the same name on whichever host runs it).
    pub fn guest_netns(&self, violin: &str, guest: &str) -> String {
        format!("{}-{violin}-{guest}", self.name)
    }
}

/// Where clusters keep their state (`VIOLIN_RUN_DIR`, default /run/violin).
pub fn default_run_dir() -> PathBuf {
    std::env::var_os("VIOLIN_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/violin"))
}

pub fn state_dir(run_dir: &Path, cluster: &str) -> PathBuf {
    run_dir.join(cluster)
}

fn state_file(run_dir: &Path, cluster: &str) -> PathBuf {
    state_dir(run_dir, cluster).join("cluster.json")
}

pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 10
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !ok {
        bail!("cluster name {name:?} must be 1-10 characters of a-z and 0-9, starting with a letter (it becomes part of interface names)");
    }
    Ok(())
}

pub fn load(run_dir: &Path, cluster: &str) -> Result<ClusterState> {
    let p = state_file(run_dir, cluster);
    let text = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "cluster {cluster:?} is not up (no {}); start it with `violin cluster up`",
            p.display()
        )
    })?;
    let mut st: ClusterState =
        serde_json::from_str(&text).with_context(|| format!("reading {}", p.display()))?;
    st.run_dir = run_dir.to_path_buf();
    for h in &mut st.hosts {
        // The keeper may have started a new daemon since the file was written.
        h.pid = procs::live(&daemon_pidfile(&h.config)).map_or(0, |p| p as u32);
    }
    Ok(st)
}

/// The cluster's state file, its etcd endpoints replaced by `etcd` if given; or, with
/// no state file here, what etcd holds (hosts on other machines: nothing local).
pub fn load_or_etcd(
    run_dir: &Path,
    cluster: &str,
    etcd: &[String],
    tls: Option<&EtcdTls>,
) -> Result<ClusterState> {
    if etcd.is_empty() || state_file(run_dir, cluster).exists() {
        let mut st = load(run_dir, cluster)?;
        if !etcd.is_empty() {
            st.etcd_override = etcd.to_vec();
            st.etcd_tls_override = tls.cloned();
        }
        return Ok(st);
    }
    let mut s = crate::store::Store::connect(etcd, tls, cluster)?;
    let views = s.hosts()?;
    if views.is_empty() {
        bail!(
            "no host of cluster {cluster:?} is registered in etcd at {}",
            etcd.join(",")
        );
    }
    Ok(ClusterState {
        name: cluster.into(),
        bridge: String::new(),
        subnet: String::new(),
        dataplane: DataplaneChoice::Auto,
        hosts: views
            .into_iter()
            .map(|v| HostEntry {
                netns: format!("{cluster}-{}", v.record.name),
                name: v.record.name,
                underlay: v.record.underlay,
                interface: String::new(),
                control: PathBuf::new(),
                config: PathBuf::new(),
                log: PathBuf::new(),
                pid: 0,
                keeper: 0,
                metrics: v.record.endpoint.map(|e| format!("{e}/metrics")),
                mgmt: None,
            })
            .collect(),
        etcd: Vec::new(),
        etcd_tls: None,
        etcd_admin: None,
        etcd_override: etcd.to_vec(),
        etcd_tls_override: tls.cloned(),
        run_dir: run_dir.to_path_buf(),
    })
}

/// Where a host's keeper records its daemon's pid: beside the host's config.
fn daemon_pidfile(config: &Path) -> PathBuf {
    config.with_extension("pid")
}

/// The `violin-dp` binary: `VIOLIN_DP`, else beside the running executable.
pub fn daemon_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VIOLIN_DP") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("violin-dp");
    if !p.exists() {
        bail!(
            "violin-dp not found beside {} (build the workspace, or set VIOLIN_DP)",
            exe.display()
        );
    }
    Ok(p)
}

/// Parses `172.31.0.0/24` into (network, prefix length).
pub fn parse_subnet(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, p) = s
        .split_once('/')
        .context("--subnet needs a prefix length, e.g. 172.31.0.0/24")?;
    let a: Ipv4Addr = a
        .parse()
        .with_context(|| format!("{a:?} is not an IPv4 address"))?;
    let p: u8 = p
        .parse()
        .ok()
        .filter(|p| (8..=29).contains(p))
        .context("--subnet prefix must be 8 to 29")?;
    let mask = u32::MAX << (32 - p);
    Ok((Ipv4Addr::from(u32::from(a) & mask), p))
}

pub struct UpOptions {
    pub hosts: usize,
    pub subnet: String,
    pub dataplane: DataplaneChoice,
    pub mtu: u32,
    /// xdp: one AF_XDP socket per queue for all Violins instead of one per Violin.
    pub xdp_single_socket: bool,
    /// Host configs say `remote_checksum = false`.
    pub no_remote_checksum: bool,
    /// Host configs say `xdp_multi_buffer = false`.
    pub no_xdp_multi_buffer: bool,
    /// Rx/tx queues of each host's veth.
    pub queues: u32,
    /// Packet workers per host (`None`: the daemon's default, one per queue).
    pub workers: Option<usize>,
    /// xdp: how the classifier attaches to each host's veth.
    pub xdp_attach: crate::config::XdpAttach,
    /// xdp: how small frames leave each host.
    pub xdp_tx: crate::config::XdpTx,
    /// Which underlay socket each Violin's datagrams queue on.
    pub udp_steering: crate::config::UdpSteering,
    /// Most guests per host (`None`: the daemon's default).
    pub max_guests: Option<usize>,
    /// Packet workers' spin after work, µs (`None`: the daemon's default).
    pub busy_poll_us: Option<u64>,
    /// Percent of a core that makes a Violin loud (`None`: the daemon's default).
    pub loud_violin_percent: Option<u32>,
    /// etcd members (0: none; the CLI then drives the daemons' sockets).
    pub etcd_members: usize,
    /// Seconds a host's registration outlives its last keep-alive.
    pub lease_ttl: u64,
}

/// Brings a cluster up; on any failure, removes what it made.
pub fn up(
    run_dir: &Path,
    name: &str,
    opts: &UpOptions,
    progress: &dyn Fn(&str),
) -> Result<ClusterState> {
    validate_name(name)?;
    if opts.hosts == 0 || opts.hosts > 250 {
        bail!("--hosts must be 1 to 250");
    }
    let (net, prefix) = parse_subnet(&opts.subnet)?;
    if (opts.hosts + opts.etcd_members) as u64 + 2 > 1u64 << (32 - prefix) {
        bail!(
            "subnet {} has room for fewer than {} hosts and {} etcd members",
            opts.subnet,
            opts.hosts,
            opts.etcd_members
        );
    }
    if opts.etcd_members > 7 {
        bail!("--etcd-members must be 0 to 7");
    }
    if state_file(run_dir, name).exists() {
        bail!("cluster {name:?} is already up (`violin cluster down` removes it)");
    }
    let bridge = format!("vb-{name}");
    if netns::exists(&format!("{name}-h1"))
        || netlink::with_handle(|h| async move { netlink::index(&h, &format!("vb-{name}")).await })?
            .is_some()
    {
        bail!("leftovers of a cluster {name:?} exist (bridge {bridge} or namespace {name}-h1): run `violin cluster down --cluster {name}`");
    }
    let dp = daemon_binary()?;
    let dir = state_dir(run_dir, name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut state = ClusterState {
        name: name.into(),
        bridge: bridge.clone(),
        subnet: format!("{net}/{prefix}"),
        dataplane: opts.dataplane,
        hosts: Vec::new(),
        etcd: Vec::new(),
        etcd_tls: None,
        etcd_admin: None,
        etcd_override: Vec::new(),
        etcd_tls_override: None,
        run_dir: run_dir.to_path_buf(),
    };
    let r = (|| -> Result<()> {
        progress(&format!("creating underlay bridge {bridge}"));
        let br = bridge.clone();
        let mtu = opts.mtu;
        netlink::with_handle(|h| async move {
            netlink::add_bridge(&h, &br).await?;
            netlink::set_mtu(&h, &br, mtu).await?;
            netlink::set_up(&h, &br).await
        })?;
        let mut pki = None;
        // Management links: one per etcd member, then one per host.
        let blocks = if opts.etcd_members > 0 {
            etcd::free_blocks(name, opts.etcd_members + opts.hosts)?
        } else {
            Vec::new()
        };
        if opts.etcd_members > 0 {
            progress("making the cluster's CA and certificates");
            let p = pki::Pki::create(&dir.join("pki"), name)?;
            let admin = p.issue("root", &[], false)?;
            let sf = state_file(run_dir, name);
            let mut st2 = state.clone();
            state.etcd = etcd::start(
                name,
                &bridge,
                net,
                prefix,
                mtu,
                &blocks[..opts.etcd_members],
                &dir,
                &p,
                &admin,
                progress,
                &mut |m| {
                    // Recorded as soon as it runs, so a failed `up` stops it.
                    st2.etcd.push(m.clone());
                    std::fs::write(&sf, serde_json::to_string_pretty(&st2)?)?;
                    Ok(())
                },
            )?;
            progress("creating etcd's users and roles; turning authentication on");
            let hosts: Vec<String> = (1..=opts.hosts).map(|i| format!("h{i}")).collect();
            let endpoints = state.etcd_endpoints();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut c = crate::store::connect(&endpoints, Some(&admin)).await?;
                pki::enable_auth(&mut c, name, &hosts).await
            })?;
            state.etcd_tls = Some(p.issue(pki::CLI_USER, &[], false)?);
            state.etcd_admin = Some(admin);
            pki = Some(p);
        }
        for i in 1..=opts.hosts {
            let host = format!("h{i}");
            let ns = format!("{name}-{host}");
            let underlay = Ipv4Addr::from(u32::from(net) + i as u32);
            progress(&format!("creating host {host} ({ns}, {underlay})"));
            netns::create(&ns)?;
            plug_into_underlay(
                &bridge,
                &ns,
                (&format!("v{name}h{i}"), &format!("u{name}h{i}")),
                (underlay, prefix),
                mtu,
                opts.queues,
            )?;
            // The CLI's way to the daemon's metrics server (stats, profile).
            let mgmt = match blocks.get(opts.etcd_members + i - 1) {
                Some(&b) => Some(etcd::mgmt_link(
                    &format!("w{name}h{i}"),
                    &format!("m{name}h{i}"),
                    &ns,
                    b,
                )?),
                None => None,
            };
            let cfg = HostConfig {
                name: host.clone(),
                underlay,
                interface: "eth0".into(),
                vxlan_port: violin_common::VXLAN_PORT,
                run_dir: dir.join(&host),
                netns_prefix: format!("{name}-"),
                dataplane: opts.dataplane,
                xdp_socket_per_violin: !opts.xdp_single_socket,
                xdp_attach: opts.xdp_attach,
                xdp_tx: opts.xdp_tx,
                udp_steering: opts.udp_steering,
                metrics_port: Some(crate::config::DEFAULT_METRICS_PORT),
                control_cpus: None,
                // A simulated multi-queue NIC gets a worker per queue.
                workers: opts
                    .workers
                    .or((opts.queues > 1).then_some(opts.queues as usize)),
                max_guests: opts.max_guests,
                remote_checksum: !opts.no_remote_checksum,
                xdp_multi_buffer: !opts.no_xdp_multi_buffer,
                busy_poll_us: opts.busy_poll_us,
                loud_violin_percent: opts.loud_violin_percent,
                etcd: match &pki {
                    Some(p) => Some(crate::config::EtcdConfig {
                        endpoints: state.etcd.iter().map(etcd::Member::underlay_url).collect(),
                        cluster: name.to_string(),
                        lease_ttl: opts.lease_ttl,
                        tls: Some(p.issue(&host, &[underlay], false)?),
                        advertise: mgmt
                            .map(|m| format!("http://{m}:{}", crate::config::DEFAULT_METRICS_PORT)),
                    }),
                    None => None,
                },
            };
            let cfg_path = dir.join(format!("{host}.toml"));
            std::fs::write(&cfg_path, toml::to_string(&cfg)?)?;
            let log = dir.join(format!("{host}.log"));
            let keeper = spawn_daemon(&dp, &cfg_path, &ns, &log)?;
            state.hosts.push(HostEntry {
                name: host,
                netns: ns,
                underlay,
                interface: "eth0".into(),
                control: cfg.control_socket(),
                config: cfg_path,
                log,
                pid: 0,
                keeper,
                metrics: cfg
                    .metrics_port
                    .map(|p| format!("http://{underlay}:{p}/metrics")),
                mgmt,
            });
            std::fs::write(
                state_file(run_dir, name),
                serde_json::to_string_pretty(&state)?,
            )?;
        }
        progress("waiting for the daemons");
        for h in &mut state.hosts {
            wait_ready(h, Duration::from_secs(15))?;
            h.pid = procs::live(&daemon_pidfile(&h.config)).map_or(0, |p| p as u32);
        }
        std::fs::write(
            state_file(run_dir, name),
            serde_json::to_string_pretty(&state)?,
        )?;
        Ok(())
    })();
    if let Err(e) = r {
        let _ = down(run_dir, name, &|_| {});
        return Err(e);
    }
    Ok(state)
}

/// Plugs namespace `ns` into the underlay bridge: a veth pair (`names`: the bridge's
/// end, then the one moved into `ns`, which becomes `eth0` with `addr`) of `queues`
/// rx/tx queues.
pub(crate) fn plug_into_underlay(
    bridge: &str,
    ns: &str,
    names: (&str, &str),
    addr: (Ipv4Addr, u8),
    mtu: u32,
    queues: u32,
) -> Result<()> {
    let nsfile = netns::open(ns)?;
    let (o, inn, br) = (names.0.to_string(), names.1.to_string(), bridge.to_string());
    netlink::with_handle(|h| async move {
        netlink::add_veth_queues(&h, &o, &inn, queues).await?;
        netlink::set_mtu(&h, &o, mtu).await?;
        netlink::set_master(&h, &o, &br).await?;
        netlink::set_up(&h, &o).await?;
        netlink::move_to_netns(&h, &inn, &nsfile).await
    })?;
    let inner = names.1.to_string();
    netns::run_in(ns, || {
        netlink::with_handle(|h| async move {
            netlink::rename(&h, &inner, "eth0").await?;
            netlink::set_mtu(&h, "eth0", mtu).await?;
            netlink::add_addr(&h, "eth0", addr.0, addr.1).await?;
            netlink::set_up(&h, "eth0").await?;
            netlink::set_up(&h, "lo").await
        })
    })
}

/// Starts a host's daemon in namespace `ns` under a keeper (`violin-dp keep`), which
/// starts a new daemon when it dies; returns the keeper's pid.
fn spawn_daemon(bin: &Path, cfg: &Path, ns: &str, log: &Path) -> Result<u32> {
    let mut cmd = Command::new(bin);
    cmd.arg("keep")
        .arg("--pidfile")
        .arg(daemon_pidfile(cfg))
        .arg("--")
        .arg("--config")
        .arg(cfg);
    spawn_in(cmd, ns, log)
}

/// Starts `cmd` in network namespace `ns`, in a process group of its own (Ctrl-C on
/// the CLI does not reach it), its output appended to `log`; returns its pid.
pub(crate) fn spawn_in(mut cmd: Command, ns: &str, log: &Path) -> Result<u32> {
    let nsfile = netns::open(ns)?;
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let fd = nsfile.as_raw_fd();
    cmd.stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .process_group(0);
    // SAFETY: setns is async-signal-safe; `fd` stays open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", cmd.get_program().to_string_lossy()))?;
    Ok(child.id())
}

fn wait_ready(h: &HostEntry, timeout: Duration) -> Result<HostStatus> {
    let t0 = Instant::now();
    loop {
        match control::call::<HostStatus>(&h.control, &Request::Status) {
            Ok(s) => return Ok(s),
            Err(e) if t0.elapsed() > timeout => {
                let log = std::fs::read_to_string(&h.log).unwrap_or_default();
                let tail: Vec<&str> = log
                    .lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                bail!(
                    "daemon of {} did not come up: {e:#}\n--- {} ---\n{}",
                    h.name,
                    h.log.display(),
                    tail.join("\n")
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Restarts one host's daemon: gracefully, or `hard` (SIGKILL, as a crash would). The
/// new daemon restores the host's Violins.
pub fn restart_host(run_dir: &Path, name: &str, host: &str, hard: bool) -> Result<HostEntry> {
    let mut state = load(run_dir, name)?;
    let i = state
        .hosts
        .iter()
        .position(|h| h.name == host)
        .with_context(|| format!("no host {host} in cluster {name}"))?;
    let h = state.hosts[i].clone();
    if hard {
        // The keeper first, or it would start a daemon of its own.
        for pid in [h.keeper, h.pid] {
            kill_now(pid);
        }
    } else {
        // The keeper passes SIGTERM on and ends with its daemon.
        stop_daemon(h.keeper);
        stop_daemon(h.pid);
    }
    let keeper = spawn_daemon(&daemon_binary()?, &h.config, &h.netns, &h.log)?;
    state.hosts[i].keeper = keeper;
    wait_ready(&state.hosts[i], Duration::from_secs(15))?;
    state.hosts[i].pid = procs::live(&daemon_pidfile(&h.config)).map_or(0, |p| p as u32);
    std::fs::write(
        state_file(run_dir, name),
        serde_json::to_string_pretty(&state)?,
    )?;
    Ok(state.hosts[i].clone())
}

/// SIGKILL, as a crash would, and wait (at most 5 s) until the process is gone.
fn kill_now(pid: u32) {
    if pid == 0 {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    let t0 = Instant::now();
    while pid_alive(pid) && t0.elapsed() < Duration::from_secs(5) {
        // Reap it if it is our child (tests start clusters in-process).
        let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pid_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

/// Stops a daemon: SIGTERM (it removes its guests and sockets), then SIGKILL after 5 s.
pub fn stop_daemon(pid: u32) {
    use nix::sys::signal::{kill, Signal};
    if pid == 0 {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid as i32);
    if kill(p, Signal::SIGTERM).is_err() {
        return;
    }
    let t0 = Instant::now();
    while pid_alive(pid) && t0.elapsed() < Duration::from_secs(5) {
        // Reap it if it is our child (tests start clusters in-process).
        let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(20));
    }
    if pid_alive(pid) {
        let _ = kill(p, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(p, None);
    }
}

/// Removes everything a cluster made, even after a partial `up` or a lost state file.
/// Every step is attempted; the errors are collected.
pub fn down(run_dir: &Path, name: &str, progress: &dyn Fn(&str)) -> Result<()> {
    validate_name(name)?;
    let mut errors = Vec::new();
    if let Ok(state) = load(run_dir, name) {
        for h in &state.hosts {
            progress(&format!("stopping the daemon of {}", h.name));
            stop_daemon(h.keeper);
            stop_daemon(h.pid);
        }
        for m in &state.etcd {
            progress(&format!("stopping etcd member {}", m.name));
            stop_daemon(m.pid);
        }
    }
    // Stray processes in this cluster's namespaces (guest relays, daemons of a lost state).
    let prefix = format!("{name}-");
    for ns in netns::list(&prefix) {
        kill_processes_in(&ns);
    }
    for ns in netns::list(&prefix) {
        progress(&format!("deleting namespace {ns}"));
        if let Err(e) = netns::delete(&ns) {
            errors.push(format!("{e:#}"));
        }
    }
    let bridge = format!("vb-{name}");
    progress(&format!("deleting bridge {bridge}"));
    let r = netlink::with_handle(|h| async move {
        netlink::del_link(&h, &bridge).await?;
        for i in 1..=250 {
            if netlink::index(&h, &format!("v{name}h{i}")).await?.is_some() {
                netlink::del_link(&h, &format!("v{name}h{i}")).await?;
            }
        }
        for i in 1..=7 {
            for l in [format!("v{name}e{i}"), format!("ve{name}{i}")] {
                netlink::del_link(&h, &l).await?;
            }
        }
        for i in 1..=250 {
            netlink::del_link(&h, &format!("w{name}h{i}")).await?;
        }
        Ok(())
    });
    if let Err(e) = r {
        errors.push(format!("{e:#}"));
    }
    let dir = state_dir(run_dir, name);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
    }
    // The VMs' uid ranges (the namespaces' went with them).
    crate::host::uids::release_prefix(&prefix);
    if !errors.is_empty() {
        bail!(
            "cluster {name} was not removed cleanly:\n  {}",
            errors.join("\n  ")
        );
    }
    Ok(())
}

/// Kills every process whose network namespace is the named one.
pub fn kill_processes_in(ns: &str) {
    for pid in netns::pids_in(ns) {
        let p = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    }
}
