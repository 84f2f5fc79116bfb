//! The control socket's server: many clients at once on one thread (a tokio runtime of
//! its own), each with a deadline to send its request and a bound on its size, so a
//! slow, silent or oversized client costs nothing but its own connection.
//!
//! Read-only requests (`status`, `stats`) are answered here from the manager's
//! published view and a worker snapshot, without waiting for changes in flight;
//! changes go to the manager's thread one at a time, in arrival order.

use crate::control::manager::{lock, HostView, ManagerMsg, SharedClassifier, SharedView};
use crate::control::protocol::{MonitorEvent, Request, Response, MAX_MONITOR_RATE, MAX_REQUEST};
use crate::datapath::monitor::{DropEvent, From};
use crate::datapath::timer::monotonic_ns;
use crate::datapath::worker::{Command, Counters, Subscribed, Workers};
use crate::xdp::events::XdpMonitor;
use anyhow::{anyhow, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, warn};
use violin_common::wire::EthernetAddress;
use violin_common::Verdict;

/// How long a client has to send its whole request line.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long a client has to take its response.
const RESPONSE_DEADLINE: Duration = Duration::from_secs(10);
/// Clients served at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 256;

/// What the server reads and whom it asks.
#[derive(Clone)]
pub struct Ctx {
    pub manager: Sender<ManagerMsg>,
    pub workers: Workers,
    pub view: SharedView,
    pub classifier: Option<SharedClassifier>,
    /// Monitors of the drops the XDP classifier reports (xdp plane).
    pub xdp_monitor: Option<XdpMonitor>,
}

/// The longest a reader waits for the packet workers' counters.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(2);

/// What this host looks like now: the manager's published view, the worker's counters
/// and (xdp plane) the classifier's verdicts.
pub struct Now {
    pub view: Arc<HostView>,
    pub counters: Counters,
    pub verdicts: Option<[u64; Verdict::COUNT]>,
}

impl Ctx {
    /// Reads [`Now`], waiting at most [`SNAPSHOT_DEADLINE`] for the worker.
    pub async fn now(&self) -> Result<Now> {
        let counters = tokio::time::timeout(SNAPSHOT_DEADLINE, self.workers.snapshot_async())
            .await
            .map_err(|_| {
                anyhow!("the packet workers did not answer within {SNAPSHOT_DEADLINE:?}")
            })??;
        Ok(Now {
            view: lock(&self.view).clone(),
            counters,
            verdicts: self.classifier.as_ref().map(|c| lock(c).verdicts()),
        })
    }
}

/// Serves `listener` until the process ends.
pub async fn serve(listener: std::os::unix::net::UnixListener, ctx: Ctx) -> Result<()> {
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let permit = slots.clone().acquire_owned().await?;
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("control accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = client(stream, &ctx).await {
                debug!("control client: {e:#}");
            }
            drop(permit);
        });
    }
}

async fn client(stream: UnixStream, ctx: &Ctx) -> Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = Vec::new();
    let mut limited = BufReader::new(rd).take(MAX_REQUEST as u64 + 1);
    let read = limited.read_until(b'\n', &mut line);
    let resp = match tokio::time::timeout(REQUEST_DEADLINE, read).await {
        Err(_) => Response::error(format!(
            "no complete request within {} s",
            REQUEST_DEADLINE.as_secs()
        )),
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            Response::error(format!("request larger than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(0)) => return Ok(()),
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(Request::Monitor { name, rate }) => {
                return monitor(limited, wr, ctx, &name, rate).await;
            }
            Ok(req) => answer(req, ctx).await,
            Err(e) => Response::error(format!("bad request: {e}")),
        },
    };
    drop(line);
    let mut text = serde_json::to_vec(&resp)?;
    text.push(b'\n');
    tokio::time::timeout(RESPONSE_DEADLINE, wr.write_all(&text))
        .await
        .map_err(|_| anyhow!("the client did not take its response"))??;
    Ok(())
}

/// Writes one line (a response or an event) within [`RESPONSE_DEADLINE`].
async fn write_line<T: serde::Serialize>(
    wr: &mut (impl tokio::io::AsyncWrite + Unpin),
    item: &T,
) -> Result<()> {
    let mut text = serde_json::to_vec(item)?;
    text.push(b'\n');
    tokio::time::timeout(RESPONSE_DEADLINE, wr.write_all(&text))
        .await
        .map_err(|_| anyhow!("the client did not take its response"))??;
    Ok(())
}

/// Monitor ids, unique in this daemon.
static MONITORS: AtomicU64 = AtomicU64::new(1);
/// How often, and how far apart, a monitor asks again for a Violin that is moving
/// between packet workers (a move takes well under a millisecond).
const MOVING_TRIES: u32 = 100;
const MOVING_WAIT: Duration = Duration::from_millis(2);

/// Streams Violin `name`'s drop events to the client until it closes the connection
/// (or stops reading: a line it does not take within the deadline ends it). The
/// Violin's home worker describes the drops into a bounded channel, which a blocking
/// thread bridges to this task. (The metrics server streams the same over HTTP.)
pub(crate) async fn monitor(
    mut rd: impl tokio::io::AsyncRead + Unpin,
    mut wr: impl tokio::io::AsyncWrite + Unpin,
    ctx: &Ctx,
    name: &str,
    rate: u32,
) -> Result<()> {
    let view = lock(&ctx.view).clone();
    let Some(v) = view.violins.iter().find(|v| v.spec.name == name) else {
        let msg = format!("no Violin named {name:?} on host {}", view.host);
        return write_line(&mut wr, &Response::error(msg)).await;
    };
    if rate == 0 || rate > MAX_MONITOR_RATE {
        let msg = format!("rate must be 1 to {MAX_MONITOR_RATE} events a second, not {rate}");
        return write_line(&mut wr, &Response::error(msg)).await;
    }
    let vni = v.spec.vni;
    let id = MONITORS.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::sync_channel::<DropEvent>(256);
    let tx2 = tx.clone();
    // A Violin moving between workers is on neither for a moment: ask its new home.
    let mut tries = 0;
    let taken = loop {
        let events = tx.clone();
        let asked = ctx.workers.of_vni(vni).ask_async(|reply| Command::Monitor {
            id,
            vni,
            rate,
            events,
            reply,
        });
        match asked.await {
            Ok(Subscribed::NotHere) if tries < MOVING_TRIES => {
                tries += 1;
                tokio::time::sleep(MOVING_WAIT).await;
            }
            r => break r,
        }
    };
    drop(tx);
    let msg = match taken {
        Ok(Subscribed::Yes) => None,
        Ok(Subscribed::Full) => Some("too many monitors on this host; try again later".into()),
        Ok(Subscribed::NotHere) => Some(format!(
            "Violin {name:?} is on none of this host's packet workers (it is being removed?)"
        )),
        Err(e) => Some(e.to_string()),
    };
    if let Some(msg) = msg {
        return write_line(&mut wr, &Response::error(msg)).await;
    }
    // On the xdp plane the classifier's drops (a non-member's frames) come too.
    let xdp = ctx.xdp_monitor.as_ref().zip(ctx.classifier.as_ref());
    if let Some((m, c)) = xdp {
        let now = monotonic_ns();
        if lock(m).subscribe(id, vni, rate, tx2, now) {
            if let Err(e) = lock(c).watch(vni) {
                warn!("the classifier's drops are not monitored: {e:#}");
            }
        }
    }
    let r = relay_events(&mut rd, &mut wr, ctx, view, name, rx).await;
    // Its worker then may not be the one it subscribed on (a move).
    let _ = ctx.workers.send_all(|| Command::Unmonitor { id });
    if let Some((m, c)) = xdp {
        let mut m = lock(m);
        if m.unsubscribe(id) {
            lock(c).unwatch(vni);
        }
    }
    r
}

async fn relay_events(
    rd: &mut (impl tokio::io::AsyncRead + Unpin),
    wr: &mut (impl tokio::io::AsyncWrite + Unpin),
    ctx: &Ctx,
    mut view: Arc<HostView>,
    name: &str,
    rx: std::sync::mpsc::Receiver<DropEvent>,
) -> Result<()> {
    write_line(
        wr,
        &Response::from_result(Ok(serde_json::json!({ "violin": name }))),
    )
    .await?;
    // The worker's clock is CLOCK_MONOTONIC; events carry wall time.
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let offset = wall.wrapping_sub(monotonic_ns());
    let (etx, mut erx) = tokio::sync::mpsc::channel::<DropEvent>(256);
    let bridge = tokio::task::spawn_blocking(move || loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(e) => {
                if etx.blocking_send(e).is_err() {
                    return;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !etx.is_closed() => {}
            Err(_) => return,
        }
    });
    let mut scratch = [0u8; 256];
    let r = loop {
        tokio::select! {
            got = rd.read(&mut scratch) => match got {
                // The client closed its end (or sent something it should not have).
                Ok(_) | Err(_) => break Ok(()),
            },
            e = erx.recv() => {
                let Some(e) = e else { break Ok(()) };
                let guest = |v: &HostView| {
                    v.violins
                        .iter()
                        .flat_map(|x| x.guests.iter())
                        .find(|g| matches!(e.from, From::Port(p) if p == g.port))
                        .map(|g| g.name.clone())
                };
                let from = match e.from {
                    From::Tunnel(a) => format!("underlay {a}"),
                    From::Port(p) => match guest(&view) {
                        Some(n) => n,
                        None => {
                            // A guest added since the monitor started.
                            view = lock(&ctx.view).clone();
                            guest(&view).unwrap_or_else(|| format!("port {p}"))
                        }
                    },
                };
                let ev = MonitorEvent {
                    unix_ns: e.at_ns.wrapping_add(offset),
                    host: view.host.clone(),
                    violin: name.to_string(),
                    reason: e.reason.name().to_string(),
                    from,
                    src_mac: EthernetAddress(e.src_mac).to_string(),
                    dst_mac: EthernetAddress(e.dst_mac).to_string(),
                    src_ip: e.src_ip,
                    dst_ip: e.dst_ip,
                    len: e.len,
                    missed: e.missed,
                };
                if let Err(err) = write_line(wr, &ev).await {
                    break Err(err);
                }
            }
        }
    };
    drop(erx);
    let _ = bridge.await;
    r
}

pub(crate) async fn answer(req: Request, ctx: &Ctx) -> Response {
    if req.is_read_only() {
        return Response::from_result(read_only(req, ctx).await);
    }
    let (tx, rx) = oneshot::channel();
    if ctx.manager.send(ManagerMsg::Request(req, tx)).is_err() {
        return Response::error("the daemon is shutting down".into());
    }
    rx.await
        .unwrap_or_else(|_| Response::error("the daemon is shutting down".into()))
}

async fn read_only(req: Request, ctx: &Ctx) -> Result<serde_json::Value> {
    let Now {
        view,
        counters,
        verdicts,
    } = ctx.now().await?;
    Ok(match req {
        Request::Status => serde_json::to_value(view.status(&counters))?,
        Request::Stats { name } => {
            let s = view
                .violin_stats(&name, &counters, verdicts.as_ref())
                .ok_or_else(|| anyhow!("no Violin named {name:?} on host {}", view.host))?;
            serde_json::to_value(s)?
        }
        _ => unreachable!("only read-only requests come here"),
    })
}

#[cfg(test)]
mod tests {
    //! The server over a real packet worker (UDP underlay on loopback) and host manager:
    //! no root, no namespaces.
    use super::*;
    use crate::config::HostConfig;
    use crate::control::manager::{self, Manager};
    use crate::control::protocol::{call, HostStatus};
    use crate::datapath::transport::udp::UdpUnderlay;
    use crate::datapath::transport::underlay::Underlay;
    use crate::datapath::worker::{Command, Worker};
    use std::io::{Read, Write};
    use std::net::Ipv4Addr;
    use std::os::unix::net::UnixStream as StdUnixStream;
    use std::path::PathBuf;
    use std::time::Instant;

    struct Host {
        socket: PathBuf,
        dir: PathBuf,
        workers: Workers,
    }

    impl Drop for Host {
        fn drop(&mut self) {
            let _ = self.workers.send_all(|| Command::Stop {
                reply: oneshot::channel().0,
            });
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn host(name: &str) -> Host {
        host_with(name, 1)
    }

    /// A host with `n` packet workers, each over a socket of one UDP group.
    fn host_with(name: &str, n: usize) -> Host {
        host_config(name, n, "")
    }

    /// `extra`: more lines of host config.
    fn host_config(name: &str, n: usize, extra: &str) -> Host {
        let dir = std::env::temp_dir().join(format!("violin-srv-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg: HostConfig = toml::from_str(&format!(
            "name = \"h1\"\nunderlay = \"127.0.0.1\"\nvxlan_port = 0\nrun_dir = \"{}\"\ncontrol_cpus = []\n{extra}",
            dir.display()
        ))
        .unwrap();
        let group = UdpUnderlay::bind_group(cfg.underlay, 0, n).unwrap();
        let (team, handles) =
            Worker::team(group.into_iter().map(Underlay::Udp).collect(), None).unwrap();
        for w in team {
            std::thread::spawn(move || w.run());
        }
        let m = Manager::new(
            cfg.clone(),
            handles.clone(),
            None,
            Vec::new(),
            "udp",
            "true".into(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let ctx = Ctx {
            manager: tx,
            workers: handles.clone(),
            view: m.view(),
            classifier: None,
            xdp_monitor: None,
        };
        std::thread::spawn(move || manager::run(m, rx));
        let socket = cfg.control_socket();
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(serve(listener, ctx))
        });
        Host {
            socket,
            dir,
            workers: handles,
        }
    }

    fn socket_violin(name: &str, vni: u32) -> crate::spec::Violin {
        let hosts = [("h1".to_string(), Ipv4Addr::LOCALHOST)].into();
        crate::spec::parse(
            &format!(
                "name = \"{name}\"\nvni = {vni}\n\
                 [[guest]]\nname = \"a\"\nhost = \"h1\"\nip = \"10.0.0.1/24\"\nkind = \"socket\"\n\
                 [[guest]]\nname = \"b\"\nhost = \"h1\"\nip = \"10.0.0.2/24\"\nkind = \"socket\"\n"
            ),
            &hosts,
        )
        .unwrap()
    }

    /// Specs that did not come from our CLI: each is refused with the field named, the
    /// daemon makes nothing of it (no path from a bad name), and goes on serving.
    #[test]
    fn crafted_specs_are_refused_and_the_daemon_goes_on() {
        let h = host("crafted");
        let good = socket_violin("ok", 100);
        let mut cases: Vec<(&str, crate::spec::Violin)> = Vec::new();
        let mut v = good.clone();
        v.members[0].name = "../../../../victim".into();
        cases.push(("member[0].name", v));
        let mut v = good.clone();
        v.links = Some(vec![crate::spec::Link {
            a: 0,
            b: 7,
            rate: None,
        }]);
        cases.push(("link[0]", v));
        let mut v = good.clone();
        v.vni = 0;
        cases.push(("vni", v));
        let mut v = good.clone();
        v.members[1].mac = v.members[0].mac;
        cases.push(("member[1].mac", v));
        let mut v = good.clone();
        v.hosts.clear();
        cases.push(("member[0].host", v));
        for (field, v) in cases {
            for req in [
                Request::AddViolin { violin: v.clone() },
                Request::ApplyViolin { violin: v.clone() },
                Request::PrepareIncoming {
                    violin: v.clone(),
                    guests: vec![],
                    listen: None,
                },
            ] {
                let e = call::<serde_json::Value>(&h.socket, &req).unwrap_err();
                let e = format!("{e:#}");
                assert!(e.contains("refused") && e.contains(field), "{field}: {e}");
            }
        }
        assert!(!h.dir.join("victim.sock").exists() && !h.dir.join("guests").exists());
        let st: HostStatus = call(&h.socket, &Request::Status).unwrap();
        assert!(st.violins.is_empty());
        call::<serde_json::Value>(&h.socket, &Request::AddViolin { violin: good }).unwrap();
        let st: HostStatus = call(&h.socket, &Request::Status).unwrap();
        assert_eq!(st.violins.len(), 1);
    }

    /// A host takes at most `max_guests`: a Violin that would pass it is refused whole
    /// with the numbers, and what the host has stays.
    #[test]
    fn a_host_refuses_guests_past_max_guests() {
        let h = host_config("max", 1, "max_guests = 3\n");
        let add = |name: &str, vni: u32| {
            call::<serde_json::Value>(
                &h.socket,
                &Request::AddViolin {
                    violin: socket_violin(name, vni),
                },
            )
        };
        add("first", 100).unwrap();
        let e = format!("{:#}", add("second", 101).unwrap_err());
        assert!(
            e.contains("would have 4 guests") && e.contains("max_guests = 3"),
            "{e}"
        );
        let st: HostStatus = call(&h.socket, &Request::Status).unwrap();
        assert_eq!(st.violins.len(), 1);
        assert_eq!(h.workers.snapshot().unwrap().ports.len(), 2);
        // Applying the same Violin again does not count its guests twice.
        call::<serde_json::Value>(
            &h.socket,
            &Request::ApplyViolin {
                violin: socket_violin("first", 100),
            },
        )
        .unwrap();
    }

    /// Two workers: each Violin lives on its home worker (VNI modulo 2), ports are
    /// numbered apart, and the host's figures are both workers' together.
    #[test]
    fn two_workers_each_own_the_violins_of_their_vnis() {
        let h = host_with("two", 2);
        for (name, vni) in [("even", 100), ("odd", 101), ("odd2", 103)] {
            let v = socket_violin(name, vni);
            call::<serde_json::Value>(&h.socket, &Request::AddViolin { violin: v }).unwrap();
        }
        let c = h.workers.snapshot().unwrap();
        assert_eq!(c.workers.len(), 2);
        let by = |i: usize| c.workers.iter().find(|w| w.index == i).unwrap();
        assert_eq!((by(0).violins, by(0).ports), (1, 2), "{:?}", c.workers);
        assert_eq!((by(1).violins, by(1).ports), (2, 4), "{:?}", c.workers);
        assert_eq!(c.ports.len(), 6, "port ids are unique across workers");
        let st: HostStatus = call(&h.socket, &Request::Status).unwrap();
        let mut sockets: Vec<String> = st
            .violins
            .iter()
            .flat_map(|v| v.guests.iter().map(|g| g.socket.clone()))
            .collect();
        sockets.sort();
        sockets.dedup();
        assert_eq!(sockets.len(), 6, "{sockets:?}");
        // A Violin removed from worker 1 leaves worker 0's alone.
        call::<serde_json::Value>(&h.socket, &Request::RemoveViolin { name: "odd".into() })
            .unwrap();
        let c = h.workers.snapshot().unwrap();
        assert_eq!(c.violins.len(), 2);
        assert_eq!(c.ports.len(), 4);
    }

    #[test]
    fn silent_and_half_finished_clients_hold_up_nobody() {
        let h = host("silent");
        let mut held: Vec<StdUnixStream> = (0..20)
            .map(|_| StdUnixStream::connect(&h.socket).unwrap())
            .collect();
        let mut half = StdUnixStream::connect(&h.socket).unwrap();
        half.write_all(br#"{"op":"sta"#).unwrap();
        held.push(half);
        for _ in 0..3 {
            let t = Instant::now();
            let s: HostStatus = call(&h.socket, &Request::Status).unwrap();
            assert_eq!(s.host, "h1");
            assert!(
                t.elapsed() < Duration::from_millis(500),
                "status took {:?} behind silent clients",
                t.elapsed()
            );
        }
        // A change the manager refuses is answered with its error, promptly too.
        let e = call::<serde_json::Value>(
            &h.socket,
            &Request::RemoveViolin {
                name: "nope".into(),
            },
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("no Violin named \"nope\""),
            "{e:#}"
        );
        // The half-finished client gets an error once its deadline passes.
        let mut half = held.pop().unwrap();
        half.set_read_timeout(Some(REQUEST_DEADLINE + Duration::from_secs(5)))
            .unwrap();
        let mut answer = String::new();
        half.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("no complete request within"), "{answer}");
    }

    #[test]
    fn an_oversized_request_is_refused_and_the_server_goes_on() {
        let h = host("big");
        let mut s = StdUnixStream::connect(&h.socket).unwrap();
        let writer = {
            let mut s = s.try_clone().unwrap();
            std::thread::spawn(move || {
                // Stops at the first error: the server closes after its answer.
                let chunk = vec![b' '; 1 << 20];
                for _ in 0..(MAX_REQUEST >> 20) + 2 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.contains("request larger than"), "{answer:.200}");
        drop(s);
        writer.join().unwrap();
        let st: HostStatus = call(&h.socket, &Request::Status).unwrap();
        assert_eq!(st.violins.len(), 0);
        let bad = call::<serde_json::Value>(&h.socket, &Request::Stats { name: "x".into() });
        assert!(bad.is_err());
    }
}
