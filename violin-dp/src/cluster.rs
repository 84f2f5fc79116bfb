//! A simulated cluster on one machine: N host network namespaces on an underlay bridge
//! (the bridge itself has no address), one `violin-dp` per host.
//!
//! Names derive from the cluster name so several clusters can coexist (tests use unique
//! names): bridge `vb-NAME`, host namespaces `NAME-h1…`, guest namespaces
//! `NAME-VIOLIN-GUEST`. State lives in `RUN_DIR/NAME/` (cluster.json, host configs,
//! daemon logs, sockets).

use crate::config::{DataplaneChoice, HostConfig};
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
}

impl ClusterState {
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
    /// Rx/tx queues of each host's veth.
    pub queues: u32,
    /// Packet workers per host (`None`: the daemon's default, one per queue).
    pub workers: Option<usize>,
    /// xdp: how the classifier attaches to each host's veth.
    pub xdp_attach: crate::config::XdpAttach,
    /// Most guests per host (`None`: the daemon's default).
    pub max_guests: Option<usize>,
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
    if (opts.hosts as u64) + 2 > 1u64 << (32 - prefix) {
        bail!(
            "subnet {} has room for fewer than {} hosts",
            opts.subnet,
            opts.hosts
        );
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
        for i in 1..=opts.hosts {
            let host = format!("h{i}");
            let ns = format!("{name}-{host}");
            let underlay = Ipv4Addr::from(u32::from(net) + i as u32);
            progress(&format!("creating host {host} ({ns}, {underlay})"));
            netns::create(&ns)?;
            let (outer, inner) = (format!("v{name}h{i}"), format!("u{name}h{i}"));
            let nsfile = netns::open(&ns)?;
            let (o, inn, br) = (outer.clone(), inner.clone(), bridge.clone());
            let queues = opts.queues;
            netlink::with_handle(|h| async move {
                netlink::add_veth_queues(&h, &o, &inn, queues).await?;
                netlink::set_mtu(&h, &o, mtu).await?;
                netlink::set_master(&h, &o, &br).await?;
                netlink::set_up(&h, &o).await?;
                netlink::move_to_netns(&h, &inn, &nsfile).await
            })?;
            netns::run_in(&ns, || {
                netlink::with_handle(|h| async move {
                    netlink::rename(&h, &inner, "eth0").await?;
                    netlink::set_mtu(&h, "eth0", mtu).await?;
                    netlink::add_addr(&h, "eth0", underlay, prefix).await?;
                    netlink::set_up(&h, "eth0").await?;
                    netlink::set_up(&h, "lo").await
                })
            })?;
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
                metrics_port: Some(crate::config::DEFAULT_METRICS_PORT),
                control_cpus: None,
                // A simulated multi-queue NIC gets a worker per queue.
                workers: opts
                    .workers
                    .or((opts.queues > 1).then_some(opts.queues as usize)),
                max_guests: opts.max_guests,
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

/// Starts a host's daemon in namespace `ns` under a keeper (`violin-dp keep`), which
/// starts a new daemon when it dies; returns the keeper's pid.
fn spawn_daemon(bin: &Path, cfg: &Path, ns: &str, log: &Path) -> Result<u32> {
    let nsfile = netns::open(ns)?;
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let fd = nsfile.as_raw_fd();
    let mut cmd = Command::new(bin);
    cmd.arg("keep")
        .arg("--pidfile")
        .arg(daemon_pidfile(cfg))
        .arg("--")
        .arg("--config")
        .arg(cfg)
        .stdin(Stdio::null())
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
        .with_context(|| format!("starting {}", bin.display()))?;
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
