//! A Violin's life on a simulated cluster (root: network namespaces): `apply`, `scale`,
//! `migrate`, and `up`/`down` that leave nothing behind when something fails.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

const BLUE: &str = include_str!("../../examples/blue.toml");

/// a on h1; b, c on h2; links a–b and b–c only.
const PAIRS: &str = r#"
name = "blue"
vni = 101
[[guest]]
name = "a"
host = "h1"
ip = "10.0.0.1/24"
[[guest]]
name = "b"
host = "h2"
ip = "10.0.0.2/24"
[[guest]]
name = "c"
host = "h2"
ip = "10.0.0.3/24"
[[link]]
between = ["a", "b"]
[[link]]
between = ["b", "c"]
"#;

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
    let c = Cluster::up(2, "udp", &[]);
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
    let c = Cluster::up(2, "udp", &[]);
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
    let c = Cluster::up(3, "udp", &[]);
    c.up_spec("blue.toml", PAIRS);
    assert!(c.ping("blue", "b", "10.0.0.1", 1));
    // b pings a throughout (independently of the CLI's own probe).
    let flow = background_ping(&c, "b", "10.0.0.1", 150, "0.02");
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
    let c = Cluster::up(2, "udp", &[]);
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
            !violin_dp::netns::exists(&c.guest_ns("blue", g)),
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
        assert!(!violin_dp::netns::exists(&c.guest_ns("blue", g)));
    }
    let o = c.cmd(&["down", "blue"]);
    assert!(!o.status.success(), "a second down says there is nothing");
}

#[test]
fn up_is_idempotent() {
    if !can_run() {
        return;
    }
    let c = Cluster::up(2, "udp", &[]);
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

#[test]
fn a_netns_guest_over_its_memory_limit_is_contained() {
    use violin_dp::cgroup::GuestCgroup;
    if !can_run() {
        return;
    }
    let c = Cluster::up(2, "udp", &[]);
    let spec = PAIRS.replace(
        "name = \"a\"\nhost = \"h1\"\nip = \"10.0.0.1/24\"",
        "name = \"a\"\nhost = \"h1\"\nip = \"10.0.0.1/24\"\nmemory = \"32mb\"\ncpus = 0.5",
    );
    c.up_spec("blue.toml", &spec);
    let ns = c.guest_ns("blue", "a");
    let cg = GuestCgroup::open(&ns).expect("a has a cgroup");
    assert_eq!(cg.memory_limit(), Some(32 << 20));
    assert_eq!(cg.cpu_quota(), Some((50_000, 100_000)));
    assert!(
        GuestCgroup::open(&c.guest_ns("blue", "b")).is_none(),
        "b has no limits"
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
