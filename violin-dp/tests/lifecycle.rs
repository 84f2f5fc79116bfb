//! A Violin's life on a simulated cluster (root: network namespaces): `apply`, `scale`,
//! `migrate`, and `up`/`down` that leave nothing behind when something fails.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

const BLUE: &str = include_str!("../../examples/blue.toml");

/// Starts `ping -c COUNT -i INTERVAL` from a guest in the background.
fn background_ping(
    c: &Cluster,
    guest: &str,
    ip: &str,
    count: u32,
    interval: &str,
) -> std::process::Child {
    let count = count.to_string();
    c.command(&[
        "exec", "blue", guest, "--", "ping", "-q", "-c", &count, "-i", interval, "-W", "1", ip,
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starting ping")
}

fn received(out: &std::process::Output) -> u32 {
    let s = String::from_utf8_lossy(&out.stdout);
    s.split(',')
        .find_map(|p| {
            p.trim()
                .strip_suffix(" received")
                .map(|n| n.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no ping summary in {s:?}"))
}

fn connects(c: &Cluster, guest: &str) -> u64 {
    c.stats("blue")
        .hosts
        .iter()
        .flat_map(|h| &h.ports)
        .find(|p| p.name == guest)
        .map(|p| p.counters.connects)
        .unwrap_or_else(|| panic!("no port for {guest}"))
}

#[test]
fn apply_adds_and_removes_links_without_disturbing_other_guests() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &[]);
    c.up_spec("blue.toml", PAIRS);
    assert!(c.ping("blue", "a", "10.0.0.2", 1));
    assert!(!c.ping("blue", "a", "10.0.0.3", 1), "a–c has no link yet");
    let (ca, cb) = (connects(&c, "a"), connects(&c, "b"));

    // a ↔ b talk the whole time: 300 pings, 10 ms apart.
    let flow = background_ping(&c, "b", "10.0.0.1", 300, "0.01");
    std::thread::sleep(Duration::from_millis(300));

    let with_ac = PAIRS.to_string() + "[[link]]\nbetween = [\"a\", \"c\"]\nrate = \"10mbit\"\n";
    let p = c.write_spec("blue-ac.toml", &with_ac);
    let out = c.command(&["apply", &p]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("+ link a–c"), "apply shows its plan: {err}");
    assert!(
        c.ping_until("blue", "a", "10.0.0.3", Duration::from_secs(5)),
        "the new link carries traffic"
    );

    // A spec with an error changes nothing.
    let broken = with_ac.replace(
        "host = \"h2\"\nip = \"10.0.0.3/24\"",
        "host = \"h9\"\nip = \"10.0.0.3/24\"",
    );
    let p_bad = c.write_spec("blue-bad.toml", &broken);
    let out = c.cmd(&["apply", &p_bad]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("guest[2].host"), "names the field: {err}");
    // So does a change of MTU, which running guests could not follow.
    let p_mtu = c.write_spec(
        "blue-mtu.toml",
        &with_ac.replace("vni = 101", "vni = 101\nmtu = 1400"),
    );
    let out = c.cmd(&["apply", &p_mtu]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("mtu:") && err.contains("1450 → 1400"),
        "{err}"
    );
    assert!(
        c.ping("blue", "a", "10.0.0.3", 1),
        "a–c still up after a rejected apply"
    );

    // Removing the link cuts the pair off again.
    let p = c.write_spec("blue.toml", PAIRS);
    c.ok(&["apply", &p]);
    assert!(!c.ping("blue", "a", "10.0.0.3", 2), "a–c removed");

    let out = flow.wait_with_output().unwrap();
    assert_eq!(
        received(&out),
        300,
        "a ↔ b lost packets during the applies: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        (connects(&c, "a"), connects(&c, "b")),
        (ca, cb),
        "a and b were never re-attached"
    );
    // Re-applying the same spec is a no-op.
    let out = c.cmd(&["apply", &p]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no changes"));
}

#[test]
fn scale_adds_a_guest_to_a_running_violin() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &[]);
    c.up_spec("blue.toml", PAIRS);
    let out = c.ok(&[
        "scale",
        "blue",
        "--add",
        "name=d,host=h1,ip=10.0.0.4/24",
        "--link",
        "b",
    ]);
    assert!(
        out.contains("10.0.0.4/24"),
        "summary lists the new guest: {out}"
    );
    assert!(c.ping_until("blue", "d", "10.0.0.2", Duration::from_secs(5)));
    assert!(!c.ping("blue", "d", "10.0.0.1", 1), "d has no link to a");
    // A bad guest spec is refused whole.
    let o = c.cmd(&["scale", "blue", "--add", "name=e,host=h1,ip=10.0.0.300/24"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ip"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn migrate_moves_a_guest_while_a_peer_pings_it() {
    if !can_run() {
        return;
    }
    // Through etcd (the hosts carry it out), and over the hosts' control sockets.
    migrate_a_while_b_pings(&Cluster::up_etcd(3, "udp", &[]));
    migrate_a_while_b_pings(&Cluster::up(3, "udp", &[]));
}

fn migrate_a_while_b_pings(c: &Cluster) {
    c.up_spec("blue.toml", PAIRS);
    assert!(c.ping("blue", "b", "10.0.0.1", 1));
    // b pings a throughout (independently of the CLI's own probe).
    let flow = background_ping(c, "b", "10.0.0.1", 150, "0.02");
    std::thread::sleep(Duration::from_millis(300));
    let out = c.ok(&["migrate", "blue", "a", "--to", "h3", "--json"]);
    let m: serde_json::Value = serde_json::from_str(&out).unwrap();
    eprintln!("migration: {m}");
    assert_eq!(m["probed_from"], "b");
    assert_eq!(m["resumed"], true, "{m}");
    let outage = m["outage_ms"].as_f64().unwrap();
    assert!(outage < 1000.0, "outage {outage} ms");

    let flow = flow.wait_with_output().unwrap();
    let got = received(&flow);
    assert!(got >= 150 - 50, "pings resumed after the move: {got}/150");
    assert!(c.ping("blue", "b", "10.0.0.1", 2));

    // Nothing left on h1; a lives on h3 with the same MAC.
    let s = c.stats("blue");
    let ports: Vec<(String, String, String)> = s
        .hosts
        .iter()
        .flat_map(|h| {
            h.ports
                .iter()
                .map(move |p| (h.host.clone(), p.name.clone(), p.mac.clone()))
        })
        .collect();
    assert!(
        !ports.iter().any(|(h, _, _)| h == "h1"),
        "h1 still has ports: {ports:?}"
    );
    let mac = violin_dp::spec::derive_mac(101, "a").to_string();
    assert!(ports.contains(&("h3".into(), "a".into(), mac)), "{ports:?}");
    let h1_guests = c
        .run_dir
        .join(&c.name)
        .join("h1")
        .join("guests")
        .join("blue");
    assert!(!h1_guests.join("a.sock").exists(), "a's socket left on h1");
    assert!(
        !c.host_log("h3").is_empty() && c.host_log("h3").contains("gratuitous ARP"),
        "h3 announced a"
    );
    // The moved guest reaches b from its new host.
    assert!(c.ping("blue", "a", "10.0.0.2", 2));
}

#[test]
fn a_failure_halfway_through_up_leaves_nothing_behind() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &[]);
    // h1 takes its guest; h2 refuses a fast port on the udp data plane.
    let spec = PAIRS.replace(
        "name = \"b\"\nhost = \"h2\"\nip = \"10.0.0.2/24\"",
        "name = \"b\"\nhost = \"h2\"\nip = \"10.0.0.2/24\"\nport = \"xdp\"",
    );
    let p = c.write_spec("half.toml", &spec);
    let o = c.cmd(&["up", &p]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("host h2 refused") && err.contains("nothing was left behind"),
        "{err}"
    );
    assert!(!c.ok(&["ls"]).contains("blue"));
    for g in ["a", "b", "c"] {
        assert!(
            !violin_dp::host::netns::exists(&c.guest_ns("blue", g)),
            "{g}'s namespace left behind"
        );
    }
    assert!(!c
        .run_dir
        .join(&c.name)
        .join("h1")
        .join("guests")
        .join("blue")
        .join("a.sock")
        .exists());
    // The same cluster takes a good spec afterwards, and down removes it all.
    c.up_spec("blue.toml", BLUE);
    assert!(c.ping("blue", "a", "10.0.0.2", 1));
    c.ok(&["down", "blue"]);
    for g in ["a", "b", "c"] {
        assert!(!violin_dp::host::netns::exists(&c.guest_ns("blue", g)));
    }
    let o = c.cmd(&["down", "blue"]);
    assert!(!o.status.success(), "a second down says there is nothing");
}

#[test]
fn up_is_idempotent() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &[]);
    c.up_spec("blue.toml", BLUE);
    let p = c.write_spec("blue.toml", BLUE);
    let o = c.cmd(&["up", &p]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already up"));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("GUEST") && table.contains("attached"),
        "{table}"
    );
}

/// The pid of guest `guest`'s relay on host `host`, from the pidfile its daemon
/// wrote when it started it (if that process still runs).
fn relay_pid(c: &Cluster, host: &str, guest: &str) -> Option<i32> {
    relay_pid_of(c, "blue", host, guest)
}

fn relay_pid_of(c: &Cluster, violin: &str, host: &str, guest: &str) -> Option<i32> {
    let file = c
        .run_dir
        .join(&c.name)
        .join(host)
        .join("guests")
        .join(violin)
        .join(format!("{guest}.pid"));
    violin_dp::host::procs::live(&file)
}

#[test]
fn a_netns_guest_over_its_memory_limit_is_contained() {
    use violin_dp::host::cgroup::GuestCgroup;
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &[]);
    let spec = PAIRS.replace(
        "name = \"a\"\nhost = \"h1\"\nip = \"10.0.0.1/24\"",
        "name = \"a\"\nhost = \"h1\"\nip = \"10.0.0.1/24\"\nmemory = \"32mb\"\ncpus = 0.5\n\
         port = \"socket\"",
    );
    c.up_spec("blue.toml", &spec);
    let ns = c.guest_ns("blue", "a");
    let cg = GuestCgroup::open(&ns).expect("a has a cgroup");
    assert_eq!(cg.memory_limit(), Some(32 << 20));
    assert_eq!(cg.cpu_quota(), Some((50_000, 100_000)));
    // b has a cgroup too (every netns guest does), without limits.
    let b = GuestCgroup::open(&c.guest_ns("blue", "b")).expect("b has a cgroup");
    assert_eq!(
        (b.memory_limit(), b.cpu_quota()),
        (None, None),
        "b has no limits"
    );

    // a's relay (its NIC, run by the data plane) is outside a's limits.
    let relay = relay_pid(&c, "h1", "a").expect("a's relay");
    let cgroups = std::fs::read_to_string(format!("/proc/{relay}/cgroup")).unwrap();
    assert!(
        !cgroups.contains(&ns),
        "the relay is in the guest's cgroup: {cgroups}"
    );

    // 256 MiB inside a 32 MiB guest: the OOM killer ends it, inside the guest only.
    let hog = ["sh", "-c", "head -c 256m /dev/zero | tail > /dev/null"];
    let mut args = vec!["exec", "blue", "a", "--"];
    args.extend_from_slice(&hog);
    let o = c.cmd(&args);
    assert!(!o.status.success(), "the hog should have been killed");
    assert!(cg.oom_kills() >= 1, "no OOM kill inside a's cgroup");
    let s = c.stats("blue");
    let a = s
        .hosts
        .iter()
        .flat_map(|h| &h.ports)
        .find(|p| p.name == "a")
        .unwrap();
    assert!(a.oom_kills.unwrap_or(0) >= 1, "violin stats reports it");
    // Outside the guest the same allocation is fine, and the Violin still works.
    let o = std::process::Command::new(hog[0])
        .args(&hog[1..])
        .output()
        .unwrap();
    assert!(o.status.success(), "the same command outside any guest");
    assert_eq!(
        relay_pid(&c, "h1", "a"),
        Some(relay),
        "a's relay was not touched"
    );
    assert!(c.ping("blue", "a", "10.0.0.2", 2), "a still talks to b");
    assert!(c.ping("blue", "b", "10.0.0.1", 2), "b still talks to a");

    // Half a core: a busy loop is throttled.
    let before = cg.cpu_throttled();
    let o = c.cmd(&[
        "exec",
        "blue",
        "a",
        "--",
        "timeout",
        "1",
        "sh",
        "-c",
        "while :; do :; done",
    ]);
    assert_eq!(o.status.code(), Some(124), "timeout ends the loop");
    assert!(
        cg.cpu_throttled() > before,
        "a busy loop in a 0.5-cpu guest was never throttled"
    );

    c.ok(&["down", "blue"]);
    assert!(
        GuestCgroup::open(&ns).is_none(),
        "the cgroup is removed with the guest"
    );
}

/// Sends `count` datagrams of `size` bytes from inside `ns`, pacing so that no queue
/// on the way drops any; a receiver in `to_ns` counts them. Returns datagrams received.
fn send_counted(from_ns: &str, to_ns: &str, dst: &str, size: usize, count: usize) -> usize {
    let (to_ns2, dst2) = (to_ns.to_string(), dst.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        violin_dp::host::netns::enter(&to_ns2).unwrap();
        let s = std::net::UdpSocket::bind(&dst2).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        tx.send(()).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        while s.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    });
    rx.recv().unwrap();
    let (from_ns, dst) = (from_ns.to_string(), dst.to_string());
    std::thread::spawn(move || {
        violin_dp::host::netns::enter(&from_ns).unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let buf = vec![0x5au8; size];
        for i in 0..count {
            s.send_to(&buf, &dst).unwrap();
            if i % 10 == 9 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
    .join()
    .unwrap();
    receiver.join().unwrap()
}

#[test]
fn profile_matrix_matches_what_was_sent() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &[]);
    c.up_spec("blue.toml", PAIRS);
    let ns = |g| c.guest_ns("blue", g);
    // Static ARP entries: only the datagrams cross, so the expected bytes are exact.
    let mac = |g| violin_dp::spec::derive_mac(101, g).to_string();
    for (g, ip, peer) in [
        ("a", "10.0.0.2", "b"),
        ("b", "10.0.0.3", "c"),
        ("b", "10.0.0.1", "a"),
        ("c", "10.0.0.2", "b"),
    ] {
        c.ok(&[
            "exec",
            "blue",
            g,
            "--",
            "ip",
            "neigh",
            "replace",
            ip,
            "lladdr",
            &mac(peer),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
    }
    let got_ab = send_counted(&ns("a"), &ns("b"), "10.0.0.2:7000", 1000, 1000);
    let got_bc = send_counted(&ns("b"), &ns("c"), "10.0.0.3:7001", 200, 500);
    assert_eq!((got_ab, got_bc), (1000, 500), "datagrams received");
    // Each datagram is a frame of payload + UDP 8 + IPv4 20 + Ethernet 14.
    let (want_ab, want_bc) = (1000 * (1000 + 42), 500 * (200 + 42));

    let out = c.ok(&["profile", "blue", "--json", "--interval", "0.5"]);
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    let flow = |f: &str, t: &str| {
        p["flows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["from"] == f && x["to"] == t)
            .cloned()
    };
    for (f, t, want) in [("a", "b", want_ab), ("b", "c", want_bc)] {
        let x = flow(f, t).unwrap_or_else(|| panic!("no {f}→{t} edge in {p}"));
        let bytes = x["bytes"].as_u64().unwrap();
        let err = (bytes as f64 - want as f64).abs() / want as f64;
        assert!(
            err <= 0.01,
            "{f}→{t}: {bytes} bytes, sent {want} ({:.2} % off)",
            err * 100.0
        );
        assert_eq!(
            x["bits_per_sec"].as_f64(),
            Some(0.0),
            "nothing moved during the interval"
        );
    }
    assert!(
        flow("a", "c").is_none() && flow("c", "a").is_none(),
        "no link, no traffic"
    );

    // While a sends, the a→b rate is positive.
    let (na, nb) = (ns("a"), ns("b"));
    let sender = std::thread::spawn(move || send_counted(&na, &nb, "10.0.0.2:7002", 1000, 3000));
    std::thread::sleep(Duration::from_millis(100));
    let out = c.ok(&["profile", "blue", "--json", "--interval", "0.3"]);
    sender.join().unwrap();
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ab = p["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["from"] == "a" && x["to"] == "b")
        .unwrap()
        .clone();
    assert!(ab["bits_per_sec"].as_f64().unwrap() > 1e6, "{ab}");

    // The table and the drawings.
    let table = c.ok(&["profile", "blue", "--interval", "0.1"]);
    assert!(
        table.contains("FROM \\ TO") && table.contains("RATE"),
        "{table}"
    );
    let dot = c.ok(&["profile", "blue", "--dot", "--interval", "0.1"]);
    assert!(
        dot.starts_with("digraph \"blue\"") && dot.contains("\"a\" -> \"b\""),
        "{dot}"
    );
    let svg = c.ok(&["profile", "blue", "--svg", "--interval", "0.1"]);
    let doc = roxmltree::Document::parse(&svg).expect("the SVG is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let edges: Vec<_> = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("edge"))
        .map(|n| {
            (
                n.attribute("data-from").unwrap().to_string(),
                n.attribute("data-to").unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        edges.contains(&("a".into(), "b".into())) && edges.contains(&("b".into(), "c".into())),
        "{edges:?}"
    );
    let nodes = doc
        .descendants()
        .filter(|n| n.attribute("class") == Some("node"))
        .count();
    assert_eq!(nodes, 3);
}

/// GET /metrics from inside namespace `ns`.
fn scrape(ns: &str, url_host: &str) -> std::io::Result<String> {
    let addr = format!("{url_host}:9464");
    violin_dp::host::netns::run_in(ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .map_err(|e| std::io::Error::other(format!("{e:#}")))
}

#[test]
fn daemons_serve_prometheus_metrics_inside_their_host() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "xdp", &[]);
    c.up_spec("blue.toml", BLUE);
    assert!(c.ping("blue", "a", "10.0.0.2", 3));
    // A unicast frame to c, which a has no link to: dropped and counted.
    let mac_c = violin_dp::spec::derive_mac(101, "c").to_string();
    c.ok(&[
        "exec", "blue", "a", "--", "ip", "neigh", "replace", "10.0.0.3", "lladdr", &mac_c, "dev",
        "eth0",
    ]);
    assert!(
        !c.ping("blue", "a", "10.0.0.3", 1),
        "no link: counted as a drop"
    );
    let info = c.info();
    assert_eq!(
        info.hosts[0].metrics.as_deref(),
        Some("http://172.31.0.1:9464/metrics")
    );
    // From h2's namespace, over the underlay, to h1's daemon.
    let h2 = &info.hosts[1].netns;
    let text = scrape(h2, "172.31.0.1").expect("scraping h1 from h2");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("Content-Type: text/plain; version=0.0.4"));
    let sample = |name: &str, labels: &str| -> u64 {
        let prefix = format!("{name}{{{labels}}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
            .parse()
            .unwrap()
    };
    assert!(
        sample(
            "violin_edge_packets_total",
            "host=\"h1\",violin=\"blue\",from=\"a\",to=\"b\""
        ) >= 3
    );
    assert!(
        sample(
            "violin_drops_total",
            "host=\"h1\",violin=\"blue\",reason=\"no_link\""
        ) >= 1
    );
    assert_eq!(
        sample("violin_guests_attached", "host=\"h1\",violin=\"blue\""),
        1
    );
    assert!(
        sample(
            "violin_port_rx_frames_total",
            "host=\"h1\",violin=\"blue\",guest=\"a\""
        ) >= 3
    );
    assert!(
        sample(
            "violin_xdp_verdicts_total",
            "host=\"h1\",verdict=\"forward\""
        ) >= 3
    );
    assert!(sample("violin_xdp_rx_frames_total", "host=\"h1\"") >= 3);
    // Guests live in other namespaces: the metrics port is not reachable from them.
    assert!(scrape(&c.guest_ns("blue", "a"), "172.31.0.1").is_err());
}

/// The outer uids of a process (`Uid:` line of /proc/PID/status: real, effective, saved, fs).
fn outer_uids(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    Some(
        line[4..]
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect(),
    )
}

#[test]
fn a_guest_is_root_inside_and_nobody_outside() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "xdp", &[]);
    // a has a socket port (relay + tap), b a tap the daemon drives (the default), c a
    // fast port (veth driven by AF_XDP).
    let spec = PAIRS
        .replace("10.0.0.1/24\"", "10.0.0.1/24\"\nport = \"socket\"")
        .replace("10.0.0.3/24\"", "10.0.0.3/24\"\nport = \"xdp\"")
        .replace("[\"b\", \"c\"]", "[\"a\", \"c\"]");
    c.up_spec("blue.toml", &spec);
    let uid = |g| {
        violin_dp::host::netns::guest_uid(&c.guest_ns("blue", g))
            .unwrap_or_else(|| panic!("{g} has no uid range"))
    };
    let (ua, ub, uc) = (uid("a"), uid("b"), uid("c"));
    assert!(ua != ub && ub != uc && ua != uc, "ranges {ua} {ub} {uc}");
    for (g, base) in [("a", ua), ("b", ub), ("c", uc)] {
        assert!(base >= 0x8_0000, "{g}'s range starts at {base}");
        assert_eq!(c.ok(&["exec", "blue", g, "--", "id", "-u"]).trim(), "0");
        let map = c.ok(&["exec", "blue", g, "--", "cat", "/proc/self/uid_map"]);
        let map: Vec<&str> = map.split_whitespace().collect();
        assert_eq!(map, ["0", &base.to_string(), "65536"], "{g}'s uid map");
        // The daemon still configures the namespace it no longer owns.
        let v6 = ["cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6"];
        let mut args = vec!["exec", "blue", g, "--"];
        args.extend_from_slice(&v6);
        assert_eq!(c.ok(&args).trim(), "1", "{g} has IPv6 off");
        // The guest sees its own interfaces in /sys, not the host's.
        let sys = c.ok(&["exec", "blue", g, "--", "ls", "/sys/class/net"]);
        let mut sys: Vec<&str> = sys.split_whitespace().collect();
        sys.sort_unstable();
        assert_eq!(sys, ["eth0", "lo"], "{g}'s /sys/class/net");
    }

    // Root inside administers the guest's own network.
    assert!(
        c.ping("blue", "a", "10.0.0.2", 2),
        "a pings b (socket port)"
    );
    assert!(c.ping("blue", "a", "10.0.0.3", 2), "a pings c (fast port)");
    c.ok(&[
        "exec", "blue", "c", "--", "ip", "link", "set", "eth0", "mtu", "1400",
    ]);
    c.ok(&[
        "exec", "blue", "c", "--", "ip", "link", "set", "eth0", "mtu", "1450",
    ]);
    assert!(c.ping("blue", "c", "10.0.0.1", 2), "c pings a");

    // Outside, a's processes run as a's first uid.
    let mut sleeper = c
        .command(&["exec", "blue", "a", "--", "sleep", "30"])
        .spawn()
        .unwrap();
    let pid = sleeper.id();
    let t0 = std::time::Instant::now();
    // Until the CLI has entered the guest and exec'd, the process is still root.
    while outer_uids(pid) != Some(vec![ua; 4]) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        outer_uids(pid),
        Some(vec![ua; 4]),
        "sleep's uids on the host"
    );
    // Another guest's root cannot signal it, nor can a's root write a root-owned file or
    // reach the daemon's control socket.
    let o = c.cmd(&["exec", "blue", "b", "--", "kill", &pid.to_string()]);
    assert!(!o.status.success(), "b's root killed a's process");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not permitted"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(outer_uids(pid).is_some(), "a's sleep is still there");
    let file = c.write_spec("root-owned", "root's\n");
    let o = c.cmd(&[
        "exec",
        "blue",
        "a",
        "--",
        "sh",
        "-c",
        &format!("echo guest >> {file}"),
    ]);
    assert!(
        !o.status.success(),
        "a's root appended to a root-owned file"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "root's\n");
    let control = c.info().hosts[0].control.display().to_string();
    let connect = format!(
        "use IO::Socket::UNIX; IO::Socket::UNIX->new(Peer => '{control}') or die \"$!\\n\""
    );
    let o = c.cmd(&["exec", "blue", "a", "--", "perl", "-e", &connect]);
    assert!(
        !o.status.success(),
        "a's root connected to h1's control socket"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The same connection from the host works (the test is not vacuous).
    let o = std::process::Command::new("perl")
        .args(["-e", &connect])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    c.ok(&["down", "blue"]);
    for g in ["a", "b", "c"] {
        let ns = c.guest_ns("blue", g);
        assert!(!violin_dp::host::netns::exists(&ns), "{ns} is left");
        assert!(
            violin_dp::host::netns::guest_uid(&ns).is_none(),
            "{ns}'s uid range is still recorded"
        );
    }
}

/// A guest's processes end with it: one started with `violin exec` (in the guest's
/// cgroup, which every netns guest has, limited or not) and one running as one of the
/// guest's uids outside the cgroup; after `violin down` neither runs, so a guest made
/// later with the same uid range cannot signal a leftover.
#[test]
fn a_guests_processes_end_with_it() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(1, "udp", &[]);
    let spec =
        "name = \"ends\"\nvni = 77\n[[guest]]\nname = \"a\"\nhost = \"h1\"\nip = \"10.7.0.1/24\"\n";
    c.up_spec("ends.toml", spec);
    let ns = c.guest_ns("ends", "a");
    let first = violin_dp::host::netns::guest_uid(&ns).expect("a has a uid range");
    let mut inside = c
        .command(&["exec", "ends", "a", "--", "sleep", "300"])
        .spawn()
        .unwrap();
    use std::os::unix::process::CommandExt;
    let mut outside = std::process::Command::new("sleep")
        .arg("300")
        .uid(first + 1000)
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while outer_uids(inside.id()) != Some(vec![first; 4]) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(outer_uids(inside.id()), Some(vec![first; 4]), "exec'd in a");
    c.ok(&["down", "ends"]);
    let ended = |child: &mut std::process::Child| {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    };
    assert!(
        ended(&mut inside),
        "a process exec'd in the guest outlived it"
    );
    assert!(
        ended(&mut outside),
        "a process running as the guest's uid outlived it"
    );
}

/// Whether each named guest's port is attached, as `violin stats` reports it.
fn attached(c: &Cluster, violin: &str) -> std::collections::BTreeMap<String, bool> {
    c.stats(violin)
        .hosts
        .iter()
        .flat_map(|h| h.ports.iter())
        .map(|p| (p.name.clone(), p.connected))
        .collect()
}

#[test]
fn a_guest_that_deletes_its_interface_is_shown_detached() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(1, "xdp", &[]);
    // One guest per netns port kind: a relay (s), a tap the daemon owns (t), a fast
    // port (x); p stays whole and pings.
    let spec = r#"
name = "health"
vni = 311
[[guest]]
name = "s"
host = "h1"
ip = "10.11.0.1/24"
port = "socket"
[[guest]]
name = "t"
host = "h1"
ip = "10.11.0.2/24"
port = "tap"
[[guest]]
name = "x"
host = "h1"
ip = "10.11.0.3/24"
port = "xdp"
[[guest]]
name = "p"
host = "h1"
ip = "10.11.0.4/24"
"#;
    c.up_spec("health.toml", spec);
    assert!(
        attached(&c, "health").values().all(|&a| a),
        "all attached first"
    );
    let relay = relay_pid_of(&c, "health", "h1", "s");
    assert!(relay.is_some(), "s has a relay");
    for g in ["s", "t", "x"] {
        c.ok(&["exec", "health", g, "--", "ip", "link", "del", "eth0"]);
    }
    // t and x cannot come back by themselves: they are shown detached, and stay so.
    let t0 = std::time::Instant::now();
    let mut now = attached(&c, "health");
    while (now["t"] || now["x"]) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        now = attached(&c, "health");
    }
    assert!(
        !now["t"],
        "the tap guest without its interface shows attached"
    );
    assert!(
        !now["x"],
        "the fast-port guest without its interface shows attached"
    );
    assert!(now["p"], "an untouched guest is still attached");
    // `ls` reads what the host publishes in etcd (within a quarter second of a change).
    let t0 = std::time::Instant::now();
    loop {
        let ls = c.ok(&["ls"]);
        let row: Vec<&str> = ls
            .lines()
            .find(|l| l.starts_with("health "))
            .expect("health listed")
            .split_whitespace()
            .collect();
        if row[3] != "4" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "`violin ls` counts every guest attached: {ls}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The relay's guest gets a new interface from a restarted relay (its old one ended
    // instead of spinning on a dead tap), and answers again.
    assert!(
        c.ping_until("health", "p", "10.11.0.1", Duration::from_secs(15)),
        "s never came back"
    );
    assert_ne!(
        relay_pid_of(&c, "health", "h1", "s"),
        relay,
        "s's relay was not restarted"
    );
    assert!(attached(&c, "health")["s"], "s is back but not attached");
    assert!(
        !c.ping("health", "p", "10.11.0.2", 1),
        "t answers without eth0"
    );
}

#[test]
fn a_daemon_that_dies_is_started_again() {
    if !can_run() {
        return;
    }
    let c = Cluster::up_etcd(2, "udp", &[]);
    c.up_spec("blue.toml", PAIRS);
    assert!(c.ping("blue", "a", "10.0.0.2", 1), "a pings b first");
    let before = c.info().hosts[0].pid;
    assert!(before > 0, "h1 has a daemon");
    // A crash: nobody runs `cluster restart`.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let mut after = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        after = c.info().hosts[0].pid;
        if after != 0 && after != before {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(after != 0 && after != before, "no new daemon on h1");
    assert!(
        c.ping_until("blue", "a", "10.0.0.2", Duration::from_secs(15)),
        "the new daemon restored the Violin"
    );
    let log = c.host_log("h1");
    assert!(log.contains("daemon died"), "the log says why: {log}");
    // A daemon stopped on purpose stays stopped: the keeper ends with it.
    let keeper = c.info().hosts[0].keeper;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(after as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    while violin_dp::host::procs::alive(keeper as i32) && t0.elapsed() < Duration::from_secs(10) {
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(keeper as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !violin_dp::host::procs::alive(keeper as i32),
        "the keeper outlived a daemon stopped on purpose"
    );
    assert_eq!(
        c.info().hosts[0].pid,
        0,
        "a daemon was started after a stop"
    );
    c.ok(&["cluster", "restart", "h1"]);
    assert!(c.ping_until("blue", "a", "10.0.0.2", Duration::from_secs(15)));
}
