//! The per-host daemon: one event loop that owns the switch, the transports and the
//! control socket, so the switch needs no locks.
//!
//! Each wake-up: read ready sockets (a bounded budget per socket, so one busy guest
//! cannot starve the rest), pass every frame through the switch, hand the outputs to
//! their transports, then serve control requests. Between bursts the loop sleeps in
//! `epoll_wait`; a half-second tick reaps and restarts lightweight-guest processes.

use crate::cgroup::GuestCgroup;
use crate::config::{DataplaneChoice, HostConfig};
use crate::control::{
    Applied, GuestStatus, HostStatus, HostViolinStats, Request, Response, ViolinStatus,
    XdpHostStats,
};
use crate::fastpath::switch::{Egress, Ingress, PortId, Switch};
use crate::netns;
use crate::spec::{GuestKind, MemberKind, PortKind, Violin};
use crate::transport::afxdp::{AfXdp, MAX_SLOTS, SHARED_SLOT};
use crate::transport::guest::{GuestPort, RxEvent};
use crate::transport::udp::{Received, UdpUnderlay};
use crate::transport::underlay::Underlay;
use crate::transport::xdpport::XdpPort;
use crate::transport::Port;
use crate::xdp::classifier::Classifier;
use anyhow::{anyhow, bail, Context, Result};
use aya::programs::xdp::XdpLinkId;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use violin_common::wire::{arp, EthernetAddress};
use violin_common::Verdict;

const UNDERLAY: Token = Token(0);
const CONTROL: Token = Token(1);
const WAKER: Token = Token(2);
const METRICS: Token = Token(3);
const PORT_BASE: usize = 16;
/// Tokens of the Violins' AF_XDP sockets: XSK_BASE + slot.
const XSK_BASE: usize = 1 << 40;
/// Frames read from one socket before the loop moves on to the others.
const BUDGET: usize = 64;
const TICK: Duration = Duration::from_millis(500);

fn port_token(p: PortId) -> Token {
    Token(PORT_BASE + 2 * p as usize)
}
fn conn_token(p: PortId) -> Token {
    Token(PORT_BASE + 2 * p as usize + 1)
}

struct PortState {
    port: Port,
    /// Fast port: the guest-port program's attachment to the host veth.
    xdp_link: Option<XdpLinkId>,
    violin: String,
    guest: String,
    kind: GuestKind,
    ip: String,
    mac: String,
    netns: Option<String>,
    /// Announce the guest with a gratuitous ARP once its port connects (after a move).
    announce: Option<(EthernetAddress, Ipv4Addr)>,
    /// A netns guest's resource limits.
    cgroup: Option<GuestCgroup>,
    /// A VM's directory and accelerator.
    vm: Option<(std::path::PathBuf, String)>,
}

/// A guest's process, supervised: a lightweight guest's relay, or a VM's QEMU.
struct GuestProc {
    violin: String,
    guest: String,
    /// A lightweight guest's namespace (deleted with it).
    netns: Option<String>,
    /// A VM's directory (removed with it).
    vm_dir: Option<std::path::PathBuf>,
    /// Run as this user and group (QEMU: unprivileged).
    uid: Option<(u32, u32)>,
    cmd: Vec<String>,
    log: std::path::PathBuf,
    child: Option<Child>,
    /// A process a previous daemon started that this one took over (not our child): a
    /// VM on a `dgram` socket, which needs no reconnect, survives a daemon restart.
    adopted: Option<i32>,
    restart_at: Option<Instant>,
    restarts: u32,
}

pub struct Daemon {
    cfg: HostConfig,
    poll: Poll,
    switch: Switch,
    ports: Vec<Option<PortState>>,
    underlay: Underlay,
    /// The XDP classifier, when the xdp data plane runs.
    classifier: Option<Classifier>,
    /// AF_XDP slot → Violin name (xdp data plane).
    slots: Vec<Option<String>>,
    /// VXLAN frames that came in through the kernel's UDP socket.
    udp_rx_frames: u64,
    /// Per-Violin sockets were refused: every Violin uses the shared socket.
    single_socket: bool,
    control: UnixListener,
    guests: Vec<GuestProc>,
    out: Vec<Egress>,
    scratch: Vec<u8>,
    again: VecDeque<Token>,
    start: Instant,
    /// This binary, which also runs lightweight guests (`violin-dp guest`).
    exe: String,
    shutdown: Arc<AtomicBool>,
    waker: Arc<Waker>,
    /// Prometheus metrics over HTTP, when configured.
    metrics: Option<mio::net::TcpListener>,
    /// During an apply: VMs to start waiting for a live migration.
    incoming: Vec<String>,
}

impl Daemon {
    pub fn new(cfg: HostConfig) -> Result<Daemon> {
        std::fs::create_dir_all(&cfg.run_dir)
            .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let udp = UdpUnderlay::bind(cfg.underlay, cfg.vxlan_port).with_context(|| {
            format!(
                "binding the underlay socket {}:{}",
                cfg.underlay, cfg.vxlan_port
            )
        })?;
        let (underlay, classifier) = match cfg.dataplane {
            DataplaneChoice::Udp => (Underlay::Udp(udp), None),
            DataplaneChoice::Xdp => {
                let (xsk, cls) = setup_xdp(&cfg)
                    .context("setting up the xdp data plane (--dataplane udp avoids it)")?;
                (
                    Underlay::Xdp {
                        udp,
                        xsk: Box::new(xsk),
                    },
                    Some(cls),
                )
            }
            DataplaneChoice::Auto => match setup_xdp(&cfg) {
                Ok((xsk, cls)) => (
                    Underlay::Xdp {
                        udp,
                        xsk: Box::new(xsk),
                    },
                    Some(cls),
                ),
                Err(e) => {
                    warn!("dataplane auto: XDP is unavailable here ({e:#}); using udp");
                    (Underlay::Udp(udp), None)
                }
            },
        };
        let ctl_path = cfg.control_socket();
        let _ = std::fs::remove_file(&ctl_path);
        let control = UnixListener::bind(&ctl_path)
            .with_context(|| format!("binding {}", ctl_path.display()))?;
        control.set_nonblocking(true)?;
        poll.registry().register(
            &mut SourceFd(&underlay.udp().fd()),
            UNDERLAY,
            Interest::READABLE,
        )?;
        poll.registry().register(
            &mut SourceFd(&std::os::fd::AsRawFd::as_raw_fd(&control)),
            CONTROL,
            Interest::READABLE,
        )?;
        let metrics = match cfg.metrics_port {
            Some(port) => {
                let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
                let mut l = mio::net::TcpListener::bind(addr)
                    .with_context(|| format!("binding the metrics port {addr}"))?;
                poll.registry()
                    .register(&mut l, METRICS, Interest::READABLE)?;
                Some(l)
            }
            None => None,
        };
        info!(host = %cfg.name, underlay = %cfg.underlay, port = cfg.vxlan_port, dataplane = underlay.name(), metrics = ?cfg.metrics_port, "violin-dp ready");
        Ok(Daemon {
            cfg,
            poll,
            switch: Switch::new(),
            ports: Vec::new(),
            underlay,
            classifier,
            slots: Vec::new(),
            udp_rx_frames: 0,
            single_socket: false,
            control,
            guests: Vec::new(),
            out: Vec::with_capacity(64),
            scratch: vec![0u8; 65536 + 64],
            again: VecDeque::with_capacity(64),
            start: Instant::now(),
            exe: own_binary()?,
            shutdown: Arc::new(AtomicBool::new(false)),
            waker,
            metrics,
            incoming: Vec::new(),
        })
    }

    /// Keeps only the capabilities the running daemon needs: NET_ADMIN (links, XDP
    /// attachment, AF_XDP binds), NET_RAW (AF_XDP sockets), IPC_LOCK (pinning the UMEMs
    /// of fast ports opened later) and SYS_ADMIN (guest network namespaces, BPF map and
    /// link operations), SETUID/SETGID/CHOWN/KILL (starting, and stopping, QEMU as an
    /// unprivileged user that owns only its VM's files). Everything else is dropped from every
    /// set, the bounding set included, so guest relays cannot regain it either.
    pub fn drop_capabilities(&self) -> Result<()> {
        use caps::{CapSet, Capability};
        let keep = [
            Capability::CAP_NET_ADMIN,
            Capability::CAP_NET_RAW,
            Capability::CAP_IPC_LOCK,
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_SETUID,
            Capability::CAP_SETGID,
            Capability::CAP_CHOWN,
            Capability::CAP_KILL,
        ];
        let mut dropped = 0;
        for cap in caps::all() {
            if keep.contains(&cap) {
                continue;
            }
            if caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, cap)
                    .map_err(|e| anyhow!("dropping {cap} from the bounding set: {e}"))?;
                dropped += 1;
            }
        }
        for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
            let mine = caps::read(None, set).map_err(|e| anyhow!("reading capabilities: {e}"))?;
            let want = mine.into_iter().filter(|c| keep.contains(c)).collect();
            caps::set(None, set, &want).map_err(|e| anyhow!("setting capabilities: {e}"))?;
        }
        info!(
            dropped,
            kept = "CAP_NET_ADMIN CAP_NET_RAW CAP_IPC_LOCK CAP_SYS_ADMIN CAP_SETUID CAP_SETGID CAP_CHOWN CAP_KILL",
            "capabilities dropped after setup"
        );
        Ok(())
    }

    /// A handle that stops the loop from another thread (a signal handler).
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let flag = self.shutdown.clone();
        let waker = self.waker.clone();
        move || {
            flag.store(true, Ordering::SeqCst);
            let _ = waker.wake();
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn run(mut self) -> Result<()> {
        let mut events = Events::with_capacity(256);
        let mut last_tick = Instant::now();
        let mut last_neigh = Instant::now();
        let mut seen_misses = 0;
        while !self.shutdown.load(Ordering::SeqCst) {
            let timeout = if self.again.is_empty() {
                Some(TICK)
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for ev in events.iter() {
                self.dispatch(ev.token(), ev.is_writable());
            }
            for _ in 0..self.again.len() {
                if let Some(t) = self.again.pop_front() {
                    self.dispatch(t, false);
                }
            }
            self.underlay.flush();
            // A frame went out through the kernel for want of a neighbour entry: the
            // kernel is resolving it now; pick it up soon rather than at the next tick.
            if let Some(xsk) = self.underlay.xsk() {
                let misses = xsk.stats().neighbour_miss;
                if misses != seen_misses && last_neigh.elapsed() >= Duration::from_millis(20) {
                    seen_misses = misses;
                    last_neigh = Instant::now();
                    self.refresh_neighbours();
                }
            }
            for ps in self.ports.iter_mut().flatten() {
                if let Port::Xdp(x) = &mut ps.port {
                    x.flush();
                }
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.supervise_guests();
                self.refresh_neighbours();
            }
        }
        info!("shutting down");
        self.teardown();
        Ok(())
    }

    fn dispatch(&mut self, t: Token, writable: bool) {
        match t {
            UNDERLAY => self.underlay_rx(),
            CONTROL => self.control_accept(),
            METRICS => self.metrics_accept(),
            WAKER => {}
            Token(n) if n >= XSK_BASE => self.xsk_rx(n - XSK_BASE),
            Token(n) if n >= PORT_BASE => {
                let p = ((n - PORT_BASE) / 2) as PortId;
                if (n - PORT_BASE).is_multiple_of(2) {
                    self.port_accept_or_rx(p);
                } else {
                    if writable {
                        self.port_flush(p);
                    }
                    self.port_rx(p);
                }
            }
            _ => {}
        }
    }

    // --- fast path ---------------------------------------------------------------------

    fn underlay_rx(&mut self) {
        let now = self.now();
        let Daemon {
            switch,
            ports,
            underlay,
            out,
            scratch,
            again,
            udp_rx_frames,
            ..
        } = self;
        let udp = underlay.udp();
        for _ in 0..BUDGET {
            match udp.recv(scratch) {
                Ok(Some(Received::Frame(src, vni, inner))) => {
                    *udp_rx_frames += 1;
                    if switch.process(Ingress::Tunnel { src, vni }, inner, now, out)
                        == Verdict::Forward
                    {
                        deliver(switch, ports, |d, v, f| udp.send(d, v, f), out, inner);
                    }
                }
                Ok(Some(Received::Bad(v))) => switch.count_host_drop(v),
                Ok(None) => return,
                Err(e) => {
                    warn!("underlay receive: {e}");
                    return;
                }
            }
        }
        again.push_back(UNDERLAY);
    }

    fn xsk_rx(&mut self, slot: usize) {
        let now = self.now();
        let Daemon {
            switch,
            ports,
            underlay,
            out,
            again,
            ..
        } = self;
        let Underlay::Xdp { udp, xsk } = underlay else {
            return;
        };
        // Tunnel → guest only (split horizon): the outputs are local ports.
        let more = xsk.rx(slot, BUDGET, |src, vni, inner| {
            if switch.process(Ingress::Tunnel { src, vni }, inner, now, out) == Verdict::Forward {
                deliver(switch, ports, |d, v, f| udp.send(d, v, f), out, inner);
            }
        });
        if more {
            again.push_back(Token(XSK_BASE + slot));
        }
    }

    fn refresh_neighbours(&mut self) {
        let iface = self.cfg.interface.clone();
        if let Some(xsk) = self.underlay.xsk() {
            match crate::netlink::with_handle(|h| async move {
                crate::netlink::neighbours(&h, &iface).await
            }) {
                Ok(n) => xsk.set_neighbours(
                    n.into_iter()
                        .map(|(ip, mac)| (ip, violin_common::wire::EthernetAddress(mac))),
                ),
                Err(e) => warn!("reading the neighbour table: {e:#}"),
            }
        }
    }

    fn port_rx(&mut self, p: PortId) {
        if self.underlay.congested() {
            // Back-pressure: read this guest again once the TX path has drained.
            if let Some(Some(ps)) = self.ports.get(p as usize) {
                self.again.push_back(conn_token_or_port(ps, p));
            }
            return;
        }
        let now = self.now();
        let Some(mut ps) = self.ports.get_mut(p as usize).and_then(Option::take) else {
            return;
        };
        let Daemon {
            switch,
            ports,
            underlay,
            out,
            scratch,
            ..
        } = self;
        let mut on_event = |ev: RxEvent<'_>| match ev {
            RxEvent::Frame(f) => {
                if switch.process(Ingress::Port(p), f, now, out) == Verdict::Forward {
                    deliver(switch, ports, |d, v, f| underlay.send(d, v, f), out, f);
                }
            }
            RxEvent::Drop(v) => switch.count_port_drop(p, v),
        };
        let r = match &mut ps.port {
            Port::Sock(g) => g.receive(scratch, BUDGET, on_event),
            Port::Xdp(x) => Ok(x.receive(BUDGET, |f| on_event(RxEvent::Frame(f)))),
        };
        match r {
            Ok(true) => self.again.push_back(conn_token_or_port(&ps, p)),
            Ok(false) => {}
            Err(e) => {
                info!(violin = %ps.violin, guest = %ps.guest, "guest disconnected: {e}");
                if let Some(fd) = ps.port.conn_fd() {
                    let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                }
                if let Port::Sock(g) = &mut ps.port {
                    g.disconnect();
                }
            }
        }
        self.ports[p as usize] = Some(ps);
    }

    fn port_flush(&mut self, p: PortId) {
        if let Some(Some(ps)) = self.ports.get_mut(p as usize) {
            ps.port.flush();
        }
    }

    fn port_accept_or_rx(&mut self, p: PortId) {
        let Some(Some(ps)) = self.ports.get_mut(p as usize) else {
            return;
        };
        let Port::Sock(g) = &mut ps.port else {
            return self.port_rx(p);
        };
        if !g.is_stream() {
            // dgram: the socket itself carries the frames.
            return self.port_rx(p);
        }
        match g.accept() {
            Ok((_, true)) => {
                if let Some(fd) = g.conn_fd() {
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut SourceFd(&fd), conn_token(p), interest)
                    {
                        warn!("registering a guest connection: {e}");
                    }
                }
                info!(violin = %ps.violin, guest = %ps.guest, "guest connected");
                self.announce(p);
                self.port_rx(p);
            }
            Ok((_, false)) => {}
            Err(e) => warn!("accept on a guest socket: {e}"),
        }
    }

    // --- control path ------------------------------------------------------------------

    fn control_accept(&mut self) {
        loop {
            match self.control.accept() {
                Ok((s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut line = String::new();
                    if BufReader::new(&s).read_line(&mut line).is_err() {
                        continue;
                    }
                    let resp = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => match self.handle(req) {
                            Ok(data) => Response {
                                ok: true,
                                error: None,
                                data,
                            },
                            Err(e) => Response {
                                ok: false,
                                error: Some(format!("{e:#}")),
                                data: serde_json::Value::Null,
                            },
                        },
                        Err(e) => Response {
                            ok: false,
                            error: Some(format!("bad request: {e}")),
                            data: serde_json::Value::Null,
                        },
                    };
                    let mut text = serde_json::to_string(&resp).unwrap_or_default();
                    text.push('\n');
                    let _ = (&s).write_all(text.as_bytes());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("control accept: {e}");
                    return;
                }
            }
        }
    }

    fn handle(&mut self, req: Request) -> Result<serde_json::Value> {
        Ok(match req {
            Request::Status => serde_json::to_value(self.status())?,
            Request::AddViolin { violin } => {
                self.add_violin(&violin)?;
                serde_json::Value::Null
            }
            Request::ApplyViolin {
                violin,
                announce,
                incoming,
            } => {
                self.incoming = incoming;
                let r = self.apply_violin(&violin, &announce);
                let incoming = std::mem::take(&mut self.incoming);
                let applied = r?;
                self.finish_incoming(&violin.name, &incoming);
                serde_json::to_value(applied)?
            }
            Request::RemoveViolin { name } => {
                self.remove_violin(&name)?;
                serde_json::Value::Null
            }
            Request::Stats { name } => {
                serde_json::to_value(self.host_violin_stats(&name).ok_or_else(|| {
                    anyhow!("no Violin named {name:?} on host {}", self.cfg.name)
                })?)?
            }
        })
    }

    fn host_violin_stats(&mut self, name: &str) -> Option<HostViolinStats> {
        let stats = self.switch.stats(name)?;
        Some(HostViolinStats {
            host: self.cfg.name.clone(),
            stats,
            ports: self.guest_statuses(name),
            host_drops: self.switch.host_drops(),
            dataplane: self.underlay.name().to_string(),
            udp_rx_frames: self.udp_rx_frames,
            xdp: self.xdp_stats(name),
        })
    }

    /// Answers metrics scrapes: one short request per connection, answered at once.
    fn metrics_accept(&mut self) {
        loop {
            let Some(l) = &self.metrics else { return };
            let (stream, _) = match l.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("metrics accept: {e}");
                    return;
                }
            };
            let mut stream = std::net::TcpStream::from(stream);
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
            let mut req = Vec::with_capacity(512);
            let mut buf = [0u8; 512];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
                match std::io::Read::read(&mut stream, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let resp = crate::metrics::http_response(&req, || {
                let names: Vec<String> = self.switch.violins().map(|v| v.name.clone()).collect();
                let all: Vec<HostViolinStats> = names
                    .iter()
                    .filter_map(|n| self.host_violin_stats(n))
                    .collect();
                let host_drops = self.switch.host_drops();
                crate::metrics::render(
                    &crate::metrics::HostCounters {
                        host: &self.cfg.name,
                        dataplane: self.underlay.name(),
                        host_drops: &host_drops,
                        udp_rx_frames: self.udp_rx_frames,
                    },
                    &all,
                )
            });
            let _ = stream.write_all(&resp);
        }
    }

    fn xdp_stats(&mut self, violin: &str) -> Option<XdpHostStats> {
        let cls = self.classifier.as_ref()?;
        let v = cls.verdicts();
        let verdicts = Verdict::ALL
            .iter()
            .filter(|x| v[**x as usize] > 0)
            .map(|x| (x.name().to_string(), v[*x as usize]))
            .collect();
        let slot = self
            .slots
            .iter()
            .position(|s| s.as_deref() == Some(violin))
            .or((self.single_socket || !self.cfg.xdp_socket_per_violin).then_some(SHARED_SLOT));
        let xsk = self.underlay.xsk()?;
        Some(XdpHostStats {
            verdicts,
            rings: xsk.stats(),
            socket: slot.and_then(|s| xsk.slot_stats(s)),
        })
    }

    fn status(&self) -> HostStatus {
        HostStatus {
            host: self.cfg.name.clone(),
            underlay: self.cfg.underlay,
            dataplane: self.underlay.name().to_string(),
            pid: std::process::id(),
            violins: self
                .switch
                .violins()
                .map(|v| ViolinStatus {
                    name: v.name.clone(),
                    vni: v.vni,
                    spec: v.clone(),
                    guests: self.guest_statuses(&v.name),
                })
                .collect(),
            host_drops: self.switch.host_drops(),
        }
    }

    fn guest_statuses(&self, violin: &str) -> Vec<GuestStatus> {
        self.ports
            .iter()
            .flatten()
            .filter(|ps| ps.violin == violin)
            .map(|ps| GuestStatus {
                name: ps.guest.clone(),
                kind: ps.kind,
                socket: ps.port.describe(),
                netns: ps.netns.clone(),
                connected: ps.port.connected(),
                ip: ps.ip.clone(),
                mac: ps.mac.clone(),
                counters: ps.port.counters(),
                oom_kills: ps.cgroup.as_ref().map(|c| c.oom_kills()),
                console: ps
                    .vm
                    .as_ref()
                    .map(|(d, _)| crate::vm::console_socket(d).display().to_string()),
                agent: ps
                    .vm
                    .as_ref()
                    .map(|(d, _)| crate::vm::agent_socket(d).display().to_string()),
                accel: ps.vm.as_ref().map(|(_, a)| a.clone()),
                qmp: ps
                    .vm
                    .as_ref()
                    .map(|(d, _)| crate::vm::qmp_socket(d).display().to_string()),
                incoming: ps.vm.as_ref().and_then(|(d, _)| {
                    self.guests
                        .iter()
                        .find(|g| g.violin == ps.violin && g.guest == ps.guest)
                        .filter(|g| g.cmd.iter().any(|a| a == "-incoming"))
                        .map(|_| crate::vm::migration_socket(d).display().to_string())
                }),
            })
            .collect()
    }

    fn add_violin(&mut self, v: &Violin) -> Result<()> {
        let now = self.now();
        let ports = self.switch.add_violin(v, &self.cfg.name, now)?;
        if let Err(e) = self
            .attach_guests(v, &ports)
            .and_then(|_| self.attach_xdp(v))
        {
            let _ = self.remove_violin(&v.name);
            return Err(e);
        }
        info!(violin = %v.name, vni = v.vni, local_guests = ports.len(), "violin added");
        if let Err(e) = self.persist(v) {
            warn!("saving Violin {} for restarts: {e:#}", v.name);
        }
        Ok(())
    }

    fn attach_guests(&mut self, v: &Violin, ports: &[(usize, PortId)]) -> Result<()> {
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
            if self.ports.len() <= p as usize {
                self.ports.resize_with(p as usize + 1, || None);
            }
            let cgroup = match &netns {
                Some(ns) if limits.millicpus.is_some() || limits.memory.is_some() => Some(
                    GuestCgroup::create(ns, limits)
                        .with_context(|| format!("limiting guest {}", member.name))?,
                ),
                _ => None,
            };
            let state = |port: Port, xdp_link: Option<XdpLinkId>, cgroup| PortState {
                port,
                xdp_link,
                violin: v.name.clone(),
                guest: member.name.clone(),
                kind: *kind,
                ip: format!("{ip}/{prefix_len}"),
                mac: member.mac.0.to_string(),
                netns: netns.clone(),
                announce: None,
                cgroup,
                vm: None,
            };
            if *port_kind == PortKind::Xdp {
                // A fast port: the daemon drives the host end of the guest's veth.
                let ns = netns.clone().unwrap_or_default();
                let Some(cls) = self.classifier.as_mut() else {
                    bail!("guest {} has port = \"xdp\", which needs the xdp data plane; host {} runs {}", member.name, self.cfg.name, self.underlay.name());
                };
                let host_if = crate::guest::veth_name(&ns);
                crate::guest::setup_veth_guest(
                    &ns,
                    &host_if,
                    member.mac.0,
                    *ip,
                    *prefix_len,
                    v.mtu,
                )
                .with_context(|| format!("setting up fast-port guest {}", member.name))?;
                let xp = XdpPort::open(&host_if)?;
                let link = cls.attach_port(&host_if, p, &xp.fd())?;
                self.poll.registry().register(
                    &mut SourceFd(&xp.fd()),
                    port_token(p),
                    Interest::READABLE,
                )?;
                self.ports[p as usize] = Some(state(Port::Xdp(Box::new(xp)), Some(link), cgroup));
                continue;
            }
            let path = self.cfg.guest_socket(&v.name, &member.name);
            let mut port = GuestPort::bind(&path, *framing)
                .with_context(|| format!("creating {}", path.display()))?;
            if *kind == GuestKind::Qemu {
                // Known before the VM sends anything: after a daemon restart, a VM that
                // kept running may have nothing to say until it is spoken to.
                let dir = self.cfg.vm_dir(&v.name, &member.name);
                port.set_default_peer(&crate::vm::net_socket(&dir));
            }
            self.poll.registry().register(
                &mut SourceFd(&port.socket_fd()),
                port_token(p),
                Interest::READABLE,
            )?;
            self.ports[p as usize] = Some(state(Port::Sock(Box::new(port)), None, cgroup));
            if *kind == GuestKind::Qemu {
                let g = self.vm_proc(v, m, &path)?;
                if let Some(ps) = self.ports[p as usize].as_mut() {
                    ps.vm = g
                        .vm_dir
                        .clone()
                        .map(|d| (d, crate::vm::accelerator().0.into()));
                }
                self.guests.push(g);
                continue;
            }
            if let Some(ns) = netns {
                let cmd = vec![
                    self.exe.clone(),
                    "guest".into(),
                    "--netns".into(),
                    ns.clone(),
                    "--socket".into(),
                    path.display().to_string(),
                    "--framing".into(),
                    match framing {
                        crate::spec::Framing::Stream => "stream".into(),
                        crate::spec::Framing::Dgram => "dgram".into(),
                    },
                    "--mac".into(),
                    member.mac.0.to_string(),
                    "--ip".into(),
                    format!("{ip}/{prefix_len}"),
                    "--mtu".into(),
                    v.mtu.to_string(),
                ];
                let log = path.with_extension("log");
                let mut g = GuestProc {
                    violin: v.name.clone(),
                    guest: member.name.clone(),
                    netns: Some(ns.clone()),
                    vm_dir: None,
                    uid: None,
                    cmd,
                    log,
                    child: None,
                    adopted: None,
                    restart_at: None,
                    restarts: 0,
                };
                // A relay left by a daemon that crashed still holds the guest's tap.
                crate::guest::kill_stale_relays(&ns);
                g.spawn()?;
                self.guests.push(g);
            }
        }
        Ok(())
    }

    /// Starts member `m`'s VM, attached to its port socket at `socket`.
    fn vm_proc(&mut self, v: &Violin, m: usize, socket: &std::path::Path) -> Result<GuestProc> {
        let member = &v.members[m];
        let MemberKind::Guest {
            ip,
            prefix_len,
            framing,
            limits,
            vm: Some(vm),
            ..
        } = &member.kind
        else {
            bail!("guest {} is not a VM", member.name);
        };
        let (kernel, initrd) = crate::vm::boot_files(vm);
        for f in std::iter::once(&kernel).chain(initrd.as_ref()) {
            if !f.exists() {
                bail!("guest {}: {} does not exist (`violin up` builds the default image; or run scripts/build-guest-image.sh {})", member.name, f.display(), f.parent().map(|p| p.display().to_string()).unwrap_or_default());
            }
        }
        let dir = self.cfg.vm_dir(&v.name, &member.name);
        let ns = self.cfg.guest_netns(&v.name, &member.name);
        let key = crate::vm::uid_key(&ns, &self.cfg.name);
        let (accel, why) = crate::vm::accelerator();
        let incoming = self.incoming.contains(&member.name);
        let mut cmd = crate::vm::command(&crate::vm::VmConfig {
            violin: &v.name,
            guest: &member.name,
            vm,
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
        if incoming {
            cmd.extend(crate::vm::incoming_args(&dir));
        }
        let mut g = GuestProc {
            violin: v.name.clone(),
            guest: member.name.clone(),
            netns: None,
            vm_dir: Some(dir.clone()),
            uid: None,
            cmd,
            log: dir.join("qemu.log"),
            child: None,
            adopted: None,
            restart_at: None,
            restarts: 0,
        };
        // A VM on a datagram socket that a previous daemon started with this very
        // command line keeps running: it sends to the socket's path, which this daemon
        // has just bound again. (A stream VM cannot reconnect: it is restarted.)
        let running = (*framing == crate::spec::Framing::Dgram && !incoming)
            .then(|| crate::vm::find_running(&g.cmd))
            .flatten();
        if let (Some(pid), Some(uid)) = (running, crate::uids::lookup(&key)) {
            crate::vm::hand_over(&dir, socket, uid)?;
            info!(violin = %v.name, guest = %member.name, pid, "VM still running: taking it over");
            g.uid = Some((uid, uid));
            g.adopted = Some(pid);
            return Ok(g);
        }
        crate::vm::kill_stale(&dir);
        // QEMU runs unprivileged, as a uid of the guest's own: it gets its directory and
        // port socket, nothing else of ours.
        let uid = crate::uids::locked(|| {
            crate::vm::prepare_dir(&dir)?;
            crate::uids::allocate(&key, &dir)
        })?;
        crate::vm::hand_over(&dir, socket, uid)?;
        info!(violin = %v.name, guest = %member.name, accel, reason = %why, incoming, "starting VM");
        g.uid = Some((uid, uid));
        g.spawn()?;
        Ok(g)
    }

    /// A VM that waited for a migration and is not waiting any more starts normally if
    /// it is ever restarted.
    fn finish_incoming(&mut self, violin: &str, still: &[String]) {
        for g in self.guests.iter_mut().filter(|g| g.violin == violin) {
            if !still.contains(&g.guest) {
                if let Some(i) = g.cmd.iter().position(|a| a == "-incoming") {
                    g.cmd.drain(i..i + 2);
                }
            }
        }
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
    /// `SHARED_SLOT`'s socket and the switch tells them apart by VNI.
    fn attach_xdp(&mut self, v: &Violin) -> Result<()> {
        if self.classifier.is_none() {
            return Ok(());
        }
        let members = self.member_sources(v);
        let per_violin = self.cfg.xdp_socket_per_violin && !self.single_socket;
        let free = self
            .slots
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.slots.len());
        if per_violin && free >= MAX_SLOTS {
            bail!("this host has {MAX_SLOTS} Violins with an AF_XDP socket each, the most its frame pool isolates; set xdp_socket_per_violin = false (violin cluster up --xdp-single-socket) to share one socket");
        }
        let slot = if per_violin { free } else { SHARED_SLOT };
        let (Some(cls), Some(xsk)) = (self.classifier.as_mut(), self.underlay.xsk()) else {
            return Ok(());
        };
        let fd = match xsk.slot_fd(slot) {
            Some(fd) => fd, // the shared socket, opened for an earlier Violin
            None => match xsk.add_slot(slot) {
                Ok(fd) => {
                    self.poll.registry().register(
                        &mut SourceFd(&fd),
                        Token(XSK_BASE + slot),
                        Interest::READABLE,
                    )?;
                    fd
                }
                Err(e) if per_violin => {
                    warn!("a per-Violin AF_XDP socket was refused ({e:#}); falling back to one socket per queue for every Violin");
                    self.single_socket = true;
                    return self.attach_xdp(v);
                }
                Err(e) => return Err(e.context("opening the AF_XDP socket shared by every Violin")),
            },
        };
        cls.set_socket(slot as u32, &fd)?;
        cls.add_vni(v.vni, slot as u32, &members)?;
        if per_violin {
            if self.slots.len() <= slot {
                self.slots.resize(slot + 1, None);
            }
            self.slots[slot] = Some(v.name.clone());
        }
        Ok(())
    }

    fn detach_xdp(&mut self, name: &str) {
        let Some(slot) = self.slots.iter().position(|s| s.as_deref() == Some(name)) else {
            return;
        };
        self.slots[slot] = None;
        let v = self.switch.violin(name).cloned();
        let members = v
            .as_ref()
            .map(|v| self.member_sources(v))
            .unwrap_or_default();
        if let Some(cls) = self.classifier.as_mut() {
            if let Some(v) = &v {
                cls.remove_vni(v.vni, &members);
            }
            cls.clear_socket(slot as u32);
        }
        if let Some(xsk) = self.underlay.xsk() {
            if let Some(fd) = xsk.slot_fd(slot) {
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            }
            xsk.remove_slot(slot);
        }
    }

    fn remove_violin(&mut self, name: &str) -> Result<()> {
        self.detach_xdp(name);
        let found = self.switch.violin(name).is_some();
        let ports: Vec<PortId> = self
            .ports
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|ps| ps.violin == name))
            .map(|(p, _)| p as PortId)
            .collect();
        for p in &ports {
            self.remove_port(*p);
        }
        self.switch.remove_violin(name);
        let _ = std::fs::remove_dir_all(self.cfg.run_dir.join("guests").join(name));
        if !self.shutdown.load(Ordering::SeqCst) {
            // Removed on request: forget it. (At shutdown it stays, for the next start.)
            let _ = std::fs::remove_file(self.violins_dir().join(format!("{name}.json")));
        }
        if !found && ports.is_empty() {
            bail!("no Violin named {name:?} on host {}", self.cfg.name);
        }
        info!(violin = %name, "violin removed");
        Ok(())
    }

    /// Tears down one guest's port: its relay process and namespace (lightweight
    /// guests), its fast-port veth and program, its socket. The switch has already
    /// forgotten the port.
    fn remove_port(&mut self, p: PortId) {
        let Some(mut ps) = self.ports.get_mut(p as usize).and_then(Option::take) else {
            return;
        };
        if let Some(i) = self
            .guests
            .iter()
            .position(|g| g.violin == ps.violin && g.guest == ps.guest)
        {
            let mut g = self.guests.swap_remove(i);
            g.stop();
            if let Some(ns) = &g.netns {
                if let Err(e) = netns::delete(ns) {
                    warn!("deleting {ns}: {e:#}");
                }
            }
            if let Some(d) = &g.vm_dir {
                let _ = std::fs::remove_dir_all(d);
                let ns = self.cfg.guest_netns(&g.violin, &g.guest);
                crate::uids::release(&crate::vm::uid_key(&ns, &self.cfg.name));
            }
        }
        if let (Port::Xdp(x), Some(link)) = (&ps.port, ps.xdp_link.take()) {
            let iface = x.iface().to_string();
            if let Some(cls) = self.classifier.as_mut() {
                cls.detach_port(link, &iface, p);
            }
            if let Some(ns) = &ps.netns {
                let _ = netns::delete(ns);
            }
            let _ = crate::netlink::with_handle(|h| async move {
                crate::netlink::del_link(&h, &iface).await
            });
        }
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&ps.port.socket_fd()));
        if let Some(fd) = ps.port.conn_fd() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
        if let Some(cg) = ps.cgroup.take() {
            cg.remove();
        }
        info!(violin = %ps.violin, guest = %ps.guest, "guest removed from this host");
    }

    /// Adds a Violin, or brings an existing one to this spec (`violin apply`, `scale`,
    /// `migrate`): guests whose attachment is unchanged keep running untouched. Guests
    /// named in `announce` send a gratuitous ARP once their port connects here.
    fn apply_violin(&mut self, v: &Violin, announce: &[String]) -> Result<Applied> {
        let Some(old) = self.switch.violin(&v.name).cloned() else {
            self.add_violin(v)?;
            let added = self.local_guests(&v.name);
            self.announce_guests(&v.name, announce);
            return Ok(Applied {
                added,
                ..Applied::default()
            });
        };
        let now = self.now();
        let up = self.switch.update_violin(v, &self.cfg.name, now)?;
        let name_of = |ports: &[Option<PortState>], p: PortId| {
            ports[p as usize]
                .as_ref()
                .map(|ps| ps.guest.clone())
                .unwrap_or_default()
        };
        let removed: Vec<String> = up
            .removed
            .iter()
            .map(|p| name_of(&self.ports, *p))
            .collect();
        for p in &up.removed {
            self.remove_port(*p);
        }
        if let Err(e) = self.attach_guests(v, &up.added) {
            // Back to the old spec, as far as it goes.
            if let Err(e2) = self.apply_violin(&old, &[]) {
                error!(violin = %v.name, "restoring the previous spec after a failed apply: {e2:#}");
            }
            return Err(e);
        }
        // xdp: the classifier accepts the Violin's frames from its new set of hosts.
        let (was, sources) = (self.member_sources(&old), self.member_sources(v));
        let slot = self
            .slots
            .iter()
            .position(|s| s.as_deref() == Some(&v.name));
        let shared = self.single_socket || !self.cfg.xdp_socket_per_violin;
        if let Some(cls) = self.classifier.as_mut() {
            if let Some(slot) = slot.or(shared.then_some(SHARED_SLOT)) {
                let gone: Vec<Ipv4Addr> =
                    was.into_iter().filter(|a| !sources.contains(a)).collect();
                cls.remove_vni(old.vni, &gone);
                cls.add_vni(v.vni, slot as u32, &sources)?;
            }
        }
        self.announce_guests(&v.name, announce);
        if let Err(e) = self.persist(v) {
            warn!("saving Violin {} for restarts: {e:#}", v.name);
        }
        let names =
            |l: &[(usize, PortId)]| l.iter().map(|(i, _)| v.members[*i].name.clone()).collect();
        info!(violin = %v.name, added = up.added.len(), removed = up.removed.len(), kept = up.kept.len(), "violin updated");
        Ok(Applied {
            added: names(&up.added),
            removed,
            kept: names(&up.kept),
        })
    }

    fn local_guests(&self, violin: &str) -> Vec<String> {
        self.ports
            .iter()
            .flatten()
            .filter(|ps| ps.violin == violin)
            .map(|ps| ps.guest.clone())
            .collect()
    }

    /// Marks guests to announce; ports without a connection step (dgram, fast ports)
    /// announce at once.
    fn announce_guests(&mut self, violin: &str, guests: &[String]) {
        let Some(spec) = self.switch.violin(violin).cloned() else {
            return;
        };
        for p in 0..self.ports.len() {
            let Some(ps) = self.ports[p].as_mut() else {
                continue;
            };
            if ps.violin != violin || !guests.contains(&ps.guest) {
                continue;
            }
            let Some(m) = spec.member(&ps.guest).map(|i| &spec.members[i]) else {
                continue;
            };
            let MemberKind::Guest { ip, .. } = m.kind else {
                continue;
            };
            ps.announce = Some((m.mac.0, ip));
            let waits = matches!(&ps.port, Port::Sock(g) if g.is_stream() && !g.connected());
            if !waits {
                self.announce(p as PortId);
            }
        }
    }

    /// Sends the pending gratuitous ARP of port `p` through the switch, as if the
    /// guest had sent it.
    fn announce(&mut self, p: PortId) {
        let Some((mac, ip)) = self
            .ports
            .get_mut(p as usize)
            .and_then(Option::as_mut)
            .and_then(|ps| ps.announce.take())
        else {
            return;
        };
        let mut garp = [0u8; arp::GRATUITOUS_LEN];
        arp::emit_gratuitous(&mut garp, mac, ip);
        let now = self.now();
        let Daemon {
            switch,
            ports,
            underlay,
            out,
            ..
        } = self;
        if switch.process(Ingress::Port(p), &garp, now, out) == Verdict::Forward {
            deliver(switch, ports, |d, v, f| underlay.send(d, v, f), out, &garp);
        }
        info!(%ip, %mac, "gratuitous ARP sent");
    }

    fn violins_dir(&self) -> std::path::PathBuf {
        self.cfg.run_dir.join("violins")
    }

    fn persist(&self, v: &Violin) -> Result<()> {
        let dir = self.violins_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{}.json", v.name));
        std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)?;
        std::fs::rename(&tmp, dir.join(format!("{}.json", v.name)))?;
        Ok(())
    }

    /// Re-creates the Violins this host had before a restart (or a crash).
    pub fn restore(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.violins_dir()) else {
            return;
        };
        let mut files: Vec<_> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for f in files {
            let r = std::fs::read(&f)
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice::<Violin>(&b).map_err(anyhow::Error::from))
                .and_then(|v| self.add_violin(&v).map(|_| v.name));
            match r {
                Ok(name) => info!(violin = %name, "restored after restart"),
                Err(e) => error!("restoring {}: {e:#}", f.display()),
            }
        }
    }

    fn supervise_guests(&mut self) {
        for g in &mut self.guests {
            if let Some(pid) = g.adopted {
                if !crate::guest::alive(pid) {
                    warn!(violin = %g.violin, guest = %g.guest, pid, "taken-over guest process exited; restarting");
                    g.adopted = None;
                    g.restart_at = Some(Instant::now());
                }
            }
            if let Some(c) = &mut g.child {
                if let Ok(Some(status)) = c.try_wait() {
                    warn!(violin = %g.violin, guest = %g.guest, %status, "guest process exited; restarting");
                    g.child = None;
                    g.restart_at = Some(
                        Instant::now()
                            + Duration::from_millis(200 * u64::from(g.restarts.min(10) + 1)),
                    );
                }
            }
            if g.child.is_none()
                && g.adopted.is_none()
                && g.restart_at.is_some_and(|t| Instant::now() >= t)
            {
                g.restarts += 1;
                if let Err(e) = g.spawn() {
                    error!(violin = %g.violin, guest = %g.guest, "restarting guest: {e:#}");
                    g.restart_at = Some(Instant::now() + Duration::from_secs(2));
                }
            }
        }
    }

    fn teardown(&mut self) {
        let names: Vec<String> = self.switch.violins().map(|v| v.name.clone()).collect();
        for n in names {
            let _ = self.remove_violin(&n);
        }
        let _ = std::fs::remove_file(self.cfg.control_socket());
    }
}

fn conn_token_or_port(ps: &PortState, p: PortId) -> Token {
    if ps.port.conn_fd().is_some() {
        conn_token(p)
    } else {
        port_token(p)
    }
}

/// Loads and attaches the classifier and opens the AF_XDP anchor socket on the
/// underlay interface.
fn setup_xdp(cfg: &HostConfig) -> Result<(AfXdp, Classifier)> {
    let path = crate::xdp::classifier::object_path()?;
    let obj = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut cls = Classifier::load(&obj, cfg.vxlan_port, 1)?;
    let iface = cfg.interface.clone();
    let mac =
        crate::netlink::with_handle(|h| async move { crate::netlink::mac_of(&h, &iface).await })?;
    // The anchor socket first: binding copies the interface's queue setup, then the
    // program starts redirecting.
    let outer = crate::fastpath::encap::Outer {
        src_mac: violin_common::wire::EthernetAddress(mac),
        src_ip: cfg.underlay,
        port: cfg.vxlan_port,
    };
    let xsk = AfXdp::new(&cfg.interface, outer)?;
    cls.attach(&cfg.interface)?;
    info!(interface = %cfg.interface, object = %path.display(), "XDP classifier attached; AF_XDP sockets on queue 0 (copy mode)");
    if !cfg.xdp_socket_per_violin {
        info!("one AF_XDP socket per queue for every Violin (xdp_socket_per_violin = false)");
    }
    Ok((xsk, cls))
}

/// This executable's path; if it was replaced on disk while running (a rebuild), the
/// path it had, where the new build now is.
fn own_binary() -> Result<String> {
    let exe = std::env::current_exe().context("finding the violin-dp binary")?;
    let s = exe.display().to_string();
    Ok(s.strip_suffix(" (deleted)")
        .map(str::to_string)
        .unwrap_or(s))
}

/// Hands a switched frame to each output's transport; failures are counted as drops.
/// `tunnel` encapsulates and sends to a host.
#[inline]
fn deliver(
    switch: &mut Switch,
    ports: &mut [Option<PortState>],
    mut tunnel: impl FnMut(Ipv4Addr, u32, &[u8]) -> Result<(), Verdict>,
    out: &[Egress],
    frame: &[u8],
) {
    for &e in out {
        let r = match e {
            Egress::Port(q) => match ports.get_mut(q as usize).and_then(Option::as_mut) {
                Some(ps) => ps.port.send(frame),
                None => Err(Verdict::PortDown),
            },
            Egress::Tunnel { dst, vni } => tunnel(dst, vni, frame),
        };
        if let Err(v) = r {
            switch.count_egress_drop(e, v);
        }
    }
}

impl GuestProc {
    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.cmd[0]);
        if let Some((uid, gid)) = self.uid {
            cmd.uid(uid).gid(gid);
            // The user's sockets (a VM's dgram end) must be writable by the daemon, which
            // has no CAP_DAC_OVERRIDE; their directory (0770) keeps everyone else out.
            // SAFETY: umask(2) is async-signal-safe and touches no memory.
            unsafe {
                cmd.pre_exec(|| {
                    libc::umask(0);
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting guest {}/{}", self.violin, self.guest))?;
        self.child = Some(child);
        self.restart_at = None;
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(pid) = self.adopted.take() {
            crate::guest::terminate(pid);
        }
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(e) = c.kill() {
                warn!(violin = %self.violin, guest = %self.guest, "killing the guest's process: {e}");
            }
            // Never block the event loop on a process that will not die.
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            error!(violin = %self.violin, guest = %self.guest, pid = c.id(), "the guest's process survived SIGKILL; leaving it");
        }
    }
}
