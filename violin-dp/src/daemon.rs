//! The per-host daemon: builds the data plane, then runs it as threads with one job
//! each, which talk by messages:
//!
//! - the **packet workers** ([`Worker`], one per served rx queue) each own the switch
//!   table, guest ports and buckets of the Violins whose home they are, one socket of
//!   the underlay's UDP group and (xdp plane) the AF_XDP sockets of one rx queue, and
//!   wait on nothing but their own poll;
//! - the **control thread** (this one; [`manager::run`]) carries out changes one at a
//!   time and supervises guests' processes;
//! - the **control server** serves the control socket (many clients, each with a
//!   deadline) and watches the neighbour table over one netlink socket;
//! - the **metrics server** answers scrapes on the metrics port.
//!
//! No control step, client or tenant can make a worker wait: changes reach it as
//! [`Command`](crate::datapath::worker::Command)s applied between batches.

use crate::config::{DataplaneChoice, HostConfig};
use crate::control::manager::{self, Manager, ManagerMsg, SharedClassifier};
use crate::control::server::Ctx;
use crate::datapath::transport::afxdp::{AfXdp, SlotOpener};
use crate::datapath::transport::udp::UdpUnderlay;
use crate::datapath::transport::underlay::Underlay;
use crate::datapath::worker::{Command, Worker, Workers};
use crate::xdp::classifier::Classifier;
use anyhow::{anyhow, Context, Result};
use std::os::unix::net::UnixListener;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use tracing::{info, warn};
use violin_common::XSK_FRAME_DATA;

pub struct Daemon {
    cfg: HostConfig,
    workers: Vec<Worker>,
    handles: Workers,
    classifier: Option<SharedClassifier>,
    openers: Vec<SlotOpener>,
    dataplane: &'static str,
    control: UnixListener,
    metrics: Option<std::net::TcpListener>,
    /// This binary, which also runs lightweight guests (`violin-dp guest`).
    exe: String,
    to_manager: Sender<ManagerMsg>,
    inbox: Receiver<ManagerMsg>,
}

impl Daemon {
    /// Sets the host up: the underlay socket, the XDP classifier and AF_XDP sockets
    /// (xdp plane), the control socket and the metrics port. Starts no thread, so
    /// [`Daemon::drop_capabilities`] covers every thread started later.
    pub fn new(cfg: HostConfig) -> Result<Daemon> {
        std::fs::create_dir_all(&cfg.run_dir)
            .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
        let iface = cfg.interface.clone();
        let link = crate::host::netlink::with_handle(|h| async move {
            crate::host::netlink::link_facts(&h, &iface).await
        });
        let rx_queues = link.as_ref().map_or(1, |l| l.rx_queues);
        let n = cfg.workers()?;
        cfg.loud_share()?;
        // xdp: the queues served, each by the worker of its number.
        let queues = n.min(rx_queues.max(1) as usize);
        let mut group =
            UdpUnderlay::bind_group(cfg.underlay, cfg.vxlan_port, n).with_context(|| {
                format!(
                    "binding the underlay socket {}:{}",
                    cfg.underlay, cfg.vxlan_port
                )
            })?;
        group
            .iter_mut()
            .for_each(|u| u.set_remote_checksum(cfg.remote_checksum));
        match &link {
            Ok(l) => {
                let largest = crate::datapath::transport::xsk::largest_single_frame(l.mtu) as usize;
                group.iter_mut().for_each(|u| u.set_largest_frame(largest));
            }
            Err(e) => warn!("the underlay's MTU is unknown ({e:#}): super-frames always go whole"),
        }
        let by_violin = match cfg.udp_steering {
            crate::config::UdpSteering::Violin => match setup_steering(&group) {
                Ok(s) => Some(Box::new(s)),
                Err(e) => {
                    warn!("each worker's Violins share its underlay socket: {e:#}");
                    None
                }
            },
            crate::config::UdpSteering::Worker => None,
        };
        let xdp = match cfg.dataplane {
            DataplaneChoice::Udp => None,
            DataplaneChoice::Xdp => Some(
                setup_xdp(&cfg, queues, link.as_ref().ok().map(|l| l.mtu))
                    .context("setting up the xdp data plane (--dataplane udp avoids it)")?,
            ),
            DataplaneChoice::Auto => {
                match setup_xdp(&cfg, queues, link.as_ref().ok().map(|l| l.mtu)) {
                    Ok(x) => Some(x),
                    Err(e) => {
                        warn!("dataplane auto: XDP is unavailable here ({e:#}); using udp");
                        None
                    }
                }
            }
        };
        let (underlays, classifier, openers): (Vec<Underlay>, _, _) = match xdp {
            Some((xsks, cls)) => {
                let openers = xsks.iter().map(AfXdp::opener).collect();
                // Workers beyond the queues send through senders of their own on the
                // queues' UMEMs (worker i on queue i mod queues): every small frame
                // with `xdp_tx = "ring"`, a round's lone frame with `"socket"`.
                let senders = (xsks.len()..group.len())
                    .map(|i| xsks[i % xsks.len()].sender())
                    .collect::<Result<Vec<_>>>()
                    .context("opening AF_XDP senders for the workers beyond the NIC's queues")?;
                info!(
                    "xdp: small frames leave as xdp_tx = \"{}\"",
                    cfg.xdp_tx.name()
                );
                let underlays = group
                    .into_iter()
                    .zip(xsks.into_iter().chain(senders))
                    .map(|(udp, xsk)| Underlay::Xdp {
                        udp,
                        xsk: Box::new(xsk),
                        tx: cfg.xdp_tx,
                    })
                    .collect();
                (underlays, Some(Arc::new(Mutex::new(cls))), openers)
            }
            None => (
                group.into_iter().map(Underlay::Udp).collect(),
                None,
                Vec::new(),
            ),
        };
        let dataplane = underlays[0].name();
        let (mut workers, handles) =
            Worker::team(underlays, by_violin).context("creating the packet workers")?;
        let spin = std::time::Duration::from_micros(cfg.busy_poll_us());
        for w in &mut workers {
            w.set_spin(crate::datapath::worker::Spin::new(spin));
        }
        let ctl_path = cfg.control_socket();
        let _ = std::fs::remove_file(&ctl_path);
        let control = UnixListener::bind(&ctl_path)
            .with_context(|| format!("binding {}", ctl_path.display()))?;
        let metrics = match cfg.metrics_port {
            Some(port) => {
                let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
                Some(
                    std::net::TcpListener::bind(addr)
                        .with_context(|| format!("binding the metrics port {addr}"))?,
                )
            }
            None => None,
        };
        let (to_manager, inbox) = mpsc::channel();
        info!(host = %cfg.name, underlay = %cfg.underlay, port = cfg.vxlan_port, dataplane, workers = n, steering = handles.steering(), rx_queues, xdp_queues = if classifier.is_some() { queues } else { 0 }, metrics = ?cfg.metrics_port, "violin-dp ready");
        Ok(Daemon {
            cfg,
            workers,
            handles,
            classifier,
            openers,
            dataplane,
            control,
            metrics,
            exe: own_binary()?,
            to_manager,
            inbox,
        })
    }

    /// Keeps only the capabilities the running daemon needs: NET_ADMIN (links, XDP
    /// attachment, AF_XDP binds), NET_RAW (AF_XDP sockets), IPC_LOCK (pinning the UMEMs
    /// of fast ports opened later) and SYS_ADMIN (guest network namespaces, BPF map and
    /// link operations), SETUID/SETGID/CHOWN/KILL (starting, and stopping, QEMU as an
    /// unprivileged user that owns only its VM's files), SYS_NICE (the packet worker and
    /// guests' relays run ahead of control work: [`crate::datapath::prioritise_packet_work`]). Everything else is dropped from every
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
            Capability::CAP_SYS_NICE,
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
            kept = "CAP_NET_ADMIN CAP_NET_RAW CAP_IPC_LOCK CAP_SYS_ADMIN CAP_SETUID CAP_SETGID CAP_CHOWN CAP_KILL CAP_SYS_NICE",
            "capabilities dropped after setup"
        );
        Ok(())
    }

    /// A handle that stops the daemon from another thread (a signal handler).
    pub fn stopper(&self) -> impl Fn() + Send + Sync + 'static {
        let tx = self.to_manager.clone();
        move || {
            let _ = tx.send(ManagerMsg::Stop);
        }
    }

    /// Starts the threads, restores the Violins this host had, and serves until
    /// stopped; then tears every Violin down.
    pub fn run(self) -> Result<()> {
        let Daemon {
            cfg,
            workers,
            handles,
            classifier,
            openers,
            dataplane,
            control,
            metrics,
            exe,
            to_manager,
            inbox,
        } = self;
        let mut worker_threads = Vec::new();
        for (i, worker) in workers.into_iter().enumerate() {
            let t = std::thread::Builder::new()
                .name(format!("violin-worker-{i}"))
                .spawn(move || {
                    // A daemon without its data plane must not go on answering
                    // requests: it ends, and is restarted like any crashed daemon.
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()))
                        .is_err()
                    {
                        tracing::error!("packet worker {i} panicked; the daemon exits");
                        std::process::exit(70);
                    }
                })
                .context("starting a packet worker")?;
            worker_threads.push(t);
        }
        // From here on, this thread and the threads and processes it starts do control
        // work: kept off the CPUs packet work needs (guests' processes get every CPU
        // back when they start).
        let control_cpus = cfg.control_cpus();
        match crate::host::cpus::pin_control(&control_cpus) {
            Ok(()) if !control_cpus.is_empty() => {
                info!(cpus = ?control_cpus, "control work kept to these CPUs")
            }
            Ok(()) => {}
            Err(e) => warn!("control work is not pinned: {e:#}"),
        }
        let mut m = Manager::new(
            cfg.clone(),
            handles.clone(),
            classifier.clone(),
            openers,
            dataplane,
            exe,
        );
        // The classifier's drop reports, for `violin monitor`.
        let xdp_monitor = match classifier
            .as_ref()
            .and_then(|c| manager::lock(c).take_drop_events())
        {
            Some(ring) => {
                let m = crate::xdp::events::XdpMonitor::default();
                let reader = m.clone();
                std::thread::Builder::new()
                    .name("violin-xdp-events".into())
                    .spawn(move || crate::xdp::events::run(ring, reader))
                    .context("starting the XDP drop reader")?;
                Some(m)
            }
            None => None,
        };
        let ctx = Ctx {
            manager: to_manager,
            workers: handles.clone(),
            view: m.view(),
            classifier,
            xdp_monitor,
        };
        if let Some(l) = metrics {
            spawn_runtime(
                "violin-metrics",
                false,
                crate::control::metrics::serve(l, ctx.clone()),
            )?;
        }
        // The Violins this host had come back before anything from the underlay is
        // switched or any client is answered (a restart, or a crash).
        m.restore();
        handles
            .send_all(|| Command::OpenUnderlay)
            .map_err(|e| anyhow!("{e}"))?;
        if cfg.etcd.is_some() {
            spawn_runtime(
                "violin-etcd",
                true,
                crate::control::agent::run(cfg.clone(), ctx.clone()),
            )?;
        }
        let neighbours = (dataplane == "xdp").then(|| cfg.interface.clone());
        let server_ctx = ctx.clone();
        let nb_workers = handles.clone();
        spawn_runtime("violin-control", true, async move {
            if let Some(iface) = neighbours {
                tokio::spawn(crate::control::neighbours::watch(iface, nb_workers));
            }
            crate::control::server::serve(control, server_ctx).await
        })?;
        manager::run(m, inbox);
        // Every Violin is down: the workers hold no port any more.
        if let Ok(rest) = handles.ask_all(|reply| Command::Stop { reply }) {
            drop(rest);
        }
        for t in worker_threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(cfg.control_socket());
        Ok(())
    }
}

/// Runs `fut` on a current-thread tokio runtime in a thread of its own; if it fails
/// and is `vital`, the daemon exits (a daemon nobody can reach is restarted).
fn spawn_runtime(
    name: &str,
    vital: bool,
    fut: impl std::future::Future<Output = Result<()>> + Send + 'static,
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let label = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = rt.block_on(fut) {
                tracing::error!("{label} stopped: {e:#}");
                if vital {
                    std::process::exit(70);
                }
            }
        })
        .with_context(|| format!("starting {name}"))?;
    Ok(())
}

/// Attaches the steering by Violin (`crate::xdp::steer`) to the underlay's group.
fn setup_steering(group: &[UdpUnderlay]) -> Result<crate::xdp::steer::VniSteering> {
    let obj = crate::xdp::classifier::read_object()?;
    let at = group[0].local()?;
    let fds: Vec<_> = group
        .iter()
        // SAFETY: the group's sockets outlive the call (the map keeps its own references).
        .map(|u| unsafe { std::os::fd::BorrowedFd::borrow_raw(u.fd()) })
        .collect();
    crate::xdp::steer::VniSteering::attach(&obj, at, &fds)
}

/// Loads and attaches the classifier and opens an AF_XDP anchor socket on each of
/// the first `queues` rx queues of the underlay interface (one per packet worker).
/// Where the underlay's frames (`mtu` + 14) outgrow one AF_XDP frame, the sockets are
/// multi-buffer, or, where the kernel refuses that, such frames take its UDP socket.
fn setup_xdp(
    cfg: &HostConfig,
    queues: usize,
    mtu: Option<u32>,
) -> Result<(Vec<AfXdp>, Classifier)> {
    let path = crate::xdp::classifier::object_path()?;
    let obj = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut cls = Classifier::load(&obj, cfg.vxlan_port, queues as u32)?;
    let iface = cfg.interface.clone();
    let mac = crate::host::netlink::with_handle(|h| async move {
        crate::host::netlink::mac_of(&h, &iface).await
    })?;
    // The anchor sockets first: binding copies the interface's queue setup, then the
    // program starts redirecting.
    let outer = crate::datapath::fastpath::encap::Outer {
        src_mac: violin_common::wire::EthernetAddress(mac),
        src_ip: cfg.underlay,
        port: cfg.vxlan_port,
    };
    let largest = mtu.map_or(XSK_FRAME_DATA, |m| m as usize + 14);
    let open = |multi_buffer| {
        (0..queues as u32)
            .map(|q| AfXdp::new(&cfg.interface, q, outer, multi_buffer, largest))
            .collect::<Result<Vec<_>>>()
    };
    let (xsks, multi_buffer) = match largest > XSK_FRAME_DATA && cfg.xdp_multi_buffer {
        false => (open(false)?, false),
        true => match open(true) {
            Ok(x) => (x, true),
            Err(e) => {
                warn!("multi-buffer AF_XDP sockets refused ({e:#}): frames longer than {XSK_FRAME_DATA} bytes take the kernel's UDP socket");
                (open(false)?, false)
            }
        },
    };
    cls.set_multi_buffer(multi_buffer)?;
    let mode = cls.attach(&cfg.interface, cfg.xdp_attach)?;
    info!(interface = %cfg.interface, object = %path.display(), mode, queues, multi_buffer, "XDP classifier attached; AF_XDP sockets on each served queue (copy mode)");
    if !cfg.xdp_socket_per_violin {
        info!("one AF_XDP socket per queue for every Violin (xdp_socket_per_violin = false)");
    }
    Ok((xsks, cls))
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
