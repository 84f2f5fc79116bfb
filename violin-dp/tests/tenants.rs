//! A tenant's packets never wait for control work (root): idle, slow and half-finished
//! clients on every control socket and metrics port, and other Violins going up and
//! down on the same hosts, while one Violin's guests ping each other every 10 ms.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Round trips of one or more `ping -i 0.01` runs from blue's a to b.
#[derive(Default, Debug)]
struct Pings {
    sent: u32,
    received: u32,
    /// Milliseconds, one per reply.
    rtts: Vec<f64>,
}

impl Pings {
    fn add(&mut self, o: Pings) {
        self.sent += o.sent;
        self.received += o.received;
        self.rtts.extend(o.rtts);
    }

    fn p99(&self) -> f64 {
        let mut r = self.rtts.clone();
        assert!(!r.is_empty(), "no replies");
        r.sort_by(f64::total_cmp);
        r[((r.len() as f64 * 0.99).ceil() as usize).clamp(1, r.len()) - 1]
    }
}

/// `ping -c COUNT -i 0.01` from a to b, every reply's time.
fn ping(c: &Cluster, count: u32) -> Pings {
    let n = count.to_string();
    let o = c.cmd(&[
        "exec", "blue", "a", "--", "ping", "-n", "-c", &n, "-i", "0.01", "-W", "1", "10.0.0.2",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {text:?}"));
    let num = |word: &str| -> u32 {
        summary
            .split(',')
            .find(|p| p.contains(word))
            .and_then(|p| p.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {word:?} in {summary:?}"))
    };
    Pings {
        sent: num("transmitted"),
        received: num("received"),
        rtts,
    }
}

/// Pings in runs of 200 until `busy` has finished, however it ended (at least one run):
/// a thread that panicked must fail the test at its join, not leave it pinging.
fn ping_while<T>(c: &Cluster, busy: &std::thread::JoinHandle<T>) -> Pings {
    let mut all = Pings::default();
    loop {
        all.add(ping(c, 200));
        if busy.is_finished() {
            return all;
        }
    }
}

/// A 2-host cluster with blue's a (h1) and b (h2) talking, and their undisturbed
/// round trips; `None` where the test cannot run here.
fn blue_pinging(dp: &str) -> Option<(Cluster, Pings)> {
    if !can_run() {
        return None;
    }
    let c = Cluster::up(2, dp, &[]);
    c.up_spec("blue.toml", PAIRS);
    assert!(c.ping_until("blue", "a", "10.0.0.2", Duration::from_secs(10)));
    let base = ping(&c, 500);
    Some((c, base))
}

/// What the machine itself adds to a disturbed round trip, whatever the daemon does:
/// on these 2-core test machines the kernel is not preemptible (PREEMPT_NONE) and a
/// kernel thread of the VM host (`kdamond`, DAMON reclaim) runs up to 3.7 ms at a time
/// (`perf sched` during the churn below), so a worker woken on its CPU waits that long;
/// a booting TCG VM takes the other CPU. Control work that stalled the packet path —
/// seconds, before the workers — still fails: a sleep in the worker per control command
/// took the churn's p99 to 10.2 ms (10 ms sleeps; fails) and 5.0–5.5 ms (5 ms; at the
/// bound, failed twice).
const MACHINE_MS: f64 = 3.0;

/// The disturbed run loses nothing and keeps its p99 within 2 × the undisturbed p99
/// + [`MACHINE_MS`].
fn assert_undisturbed(what: &str, base: &Pings, under: &Pings) {
    let (b, u) = (base.p99(), under.p99());
    eprintln!(
        "{what}: undisturbed p99 {b:.3} ms ({} pings), disturbed p99 {u:.3} ms ({} pings, {} lost)",
        base.sent,
        under.sent,
        under.sent - under.received
    );
    assert_eq!(
        under.received, under.sent,
        "{what}: pings lost while disturbed"
    );
    assert!(
        u <= 2.0 * b + MACHINE_MS,
        "{what}: p99 {u:.3} ms > 2 × {b:.3} + {MACHINE_MS} ms"
    );
}

/// GET /metrics from inside namespace `ns`; the time until the whole answer arrived.
fn timed_scrape(ns: &str, addr: std::net::SocketAddr) -> Duration {
    violin_dp::host::netns::run_in(ns, move || {
        use std::io::Read;
        let t = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        anyhow::ensure!(out.starts_with("HTTP/1.1 200"), "scrape: {out:.200}");
        anyhow::ensure!(out.contains("violin_host_info"), "scrape: {out:.200}");
        Ok(t.elapsed())
    })
    .expect("scraping the metrics")
}

/// Clients that hold connections and say nothing, or too little, until dropped.
struct Crowd {
    _tcp: Vec<TcpStream>,
    _unix: Vec<UnixStream>,
}

/// Per host: `idle_tcp` connections to the metrics port (from the other host, across
/// the underlay), `idle_unix` clients on the control socket and one that sends half a
/// request and goes silent. Arrives over about a second.
fn crowd(c: &Cluster, idle_tcp: usize, idle_unix: usize) -> Crowd {
    let info = c.info();
    let (mut tcp, mut unix) = (Vec::new(), Vec::new());
    for (i, h) in info.hosts.iter().enumerate() {
        let from = &info.hosts[(i + 1) % info.hosts.len()].netns;
        let addr = std::net::SocketAddr::from((h.underlay, 9464));
        for _ in 0..5 {
            let batch = violin_dp::host::netns::run_in(from, move || {
                (0..idle_tcp / 5)
                    .map(|_| {
                        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                            .map_err(anyhow::Error::from)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .expect("connecting to the metrics port");
            tcp.extend(batch);
            std::thread::sleep(Duration::from_millis(50));
        }
        for _ in 0..idle_unix {
            unix.push(UnixStream::connect(&h.control).expect("connecting to the control socket"));
        }
        let mut half = UnixStream::connect(&h.control).unwrap();
        half.write_all(br#"{"op":"sta"#).unwrap();
        unix.push(half);
    }
    Crowd {
        _tcp: tcp,
        _unix: unix,
    }
}

/// Until `stop`: per host one metrics client that sends a byte every 150 ms and one
/// control client that sends a byte every second.
fn dribblers(c: &Cluster, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let info = c.info();
    let mut metrics = Vec::new();
    let mut control = Vec::new();
    for (i, h) in info.hosts.iter().enumerate() {
        let from = &info.hosts[(i + 1) % info.hosts.len()].netns;
        let addr = std::net::SocketAddr::from((h.underlay, 9464));
        metrics.push(
            violin_dp::host::netns::run_in(from, move || Ok(TcpStream::connect(addr)?)).unwrap(),
        );
        control.push(UnixStream::connect(&h.control).unwrap());
    }
    std::thread::spawn(move || {
        let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            for s in &mut metrics {
                let _ = s.write_all(&req[i % req.len()..i % req.len() + 1]);
            }
            if i % 7 == 0 {
                for s in &mut control {
                    let _ = s.write_all(b"{");
                }
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(150));
        }
    })
}

fn idle_and_slow_control_clients_cost_a_tenant_nothing(dp: &str) {
    let Some((c, base)) = blue_pinging(dp) else {
        return;
    };

    // The crowd arrives while the ping runs.
    let stop = Arc::new(AtomicBool::new(false));
    let arriving = {
        let (name, run_dir) = (c.name.clone(), c.run_dir.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let c = Cluster::attach(&name, &run_dir);
            crowd(&c, 100, 20)
        })
    };
    let mut under = ping(&c, 300);
    let held = arriving.join().expect("the crowd");
    let slow = dribblers(&c, stop.clone());

    // (c) A scrape answers within 100 ms while the connections are held (median of 5).
    let info = c.info();
    for h in &info.hosts {
        let addr = std::net::SocketAddr::from((h.underlay, 9464));
        let mut t: Vec<Duration> = (0..5).map(|_| timed_scrape(&h.netns, addr)).collect();
        t.sort();
        eprintln!(
            "{dp}: scrapes of {} with 100 idle connections held: {t:?}",
            h.name
        );
        assert!(
            t[2] <= Duration::from_millis(100),
            "{dp}: a scrape of {} took {:?} (median of 5)",
            h.name,
            t[2]
        );
    }
    // The control socket answers others at once.
    let t = Instant::now();
    let s = c.stats("blue");
    assert_eq!(s.hosts.len(), 2);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{dp}: `violin stats` took {:?} behind idle clients",
        t.elapsed()
    );
    under.add(ping(&c, 300));
    stop.store(true, Ordering::SeqCst);
    slow.join().unwrap();
    drop(held);
    assert_undisturbed(&format!("{dp}, idle and slow clients"), &base, &under);
}

/// Violin `vN` with a netns guest on each host, and with `vm` a QEMU guest too.
fn other(n: u32, vm: bool) -> String {
    let mut s = format!(
        r#"
name = "v{n}"
vni = {}
[[guest]]
name = "x"
host = "h1"
ip = "10.0.0.1/24"
[[guest]]
name = "y"
host = "h2"
ip = "10.0.0.2/24"
"#,
        200 + n
    );
    if vm {
        s.push_str(
            r#"
[[guest]]
name = "vm"
host = "h2"
ip = "10.0.0.3/24"
kind = "qemu"
socket = "dgram"
memory = "128mb"
"#,
        );
    }
    s
}

fn other_violins_going_up_and_down_cost_a_tenant_nothing(dp: &str) {
    let Some((c, base)) = blue_pinging(dp) else {
        return;
    };

    let files: Vec<String> = (1..=8)
        .map(|n| c.write_spec(&format!("v{n}.toml"), &other(n, n == 8)))
        .collect();
    let churn = {
        let (name, run_dir) = (c.name.clone(), c.run_dir.clone());
        std::thread::spawn(move || {
            let c = Cluster::attach(&name, &run_dir);
            let t = Instant::now();
            for _ in 0..2 {
                for f in &files {
                    c.ok(&["up", f]);
                }
                for n in 1..=8 {
                    c.ok(&["down", &format!("v{n}")]);
                }
            }
            t.elapsed()
        })
    };
    let under = ping_while(&c, &churn);
    let took = churn.join().expect("the other Violins' churn");
    eprintln!("{dp}: 8 Violins (one with a VM) up and down twice in {took:?}");
    assert_undisturbed(&format!("{dp}, 8 Violins up and down"), &base, &under);
}

on_both_dataplanes!(
    idle_and_slow_control_clients_cost_a_tenant_nothing,
    other_violins_going_up_and_down_cost_a_tenant_nothing,
);
