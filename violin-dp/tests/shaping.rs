//! Rate caps TCP can live with, end to end on both data planes: a capped link queues
//! and releases at its rate (dropping only what overflows its queue), a capped guest is
//! held back rather than dropped, and an ECN-capable sender is told of the queue by CE
//! marks instead of losses.
mod common;

use common::*;

const CAP_MBIT: f64 = 20.0;

/// a (tap, h1) → b (tap, h2) over a 20 Mbit/s link; c (socket, h1) capped at 20 Mbit/s
/// itself, → d (tap, h2).
const SPEC: &str = r#"
name = "caps"
vni = 160
[[guest]]
name = "a"
host = "h1"
ip = "10.6.0.1/24"
port = "tap"
[[guest]]
name = "b"
host = "h2"
ip = "10.6.0.2/24"
port = "tap"
[[guest]]
name = "c"
host = "h1"
ip = "10.6.0.3/24"
rate = "20mbit"
[[guest]]
name = "d"
host = "h2"
ip = "10.6.0.4/24"
port = "tap"
[[link]]
between = ["a", "b"]
rate = "20mbit"
[[link]]
between = ["c", "d"]
"#;

fn drops(c: &Cluster, violin: &str, reason: &str) -> u64 {
    c.stats(violin).drops.get(reason).copied().unwrap_or(0)
}

fn tcp_through_a_capped_link_and_a_capped_guest(dp: &str) {
    if !can_run() {
        return;
    }
    let c = Cluster::up(2, dp, &[]);
    c.up_spec("caps.toml", SPEC);
    assert!(c.ping("caps", "a", "10.6.0.2", 2));
    assert!(c.ping("caps", "c", "10.6.0.4", 2));
    let ns = |g: &str| c.guest_ns("caps", g);

    // TCP's goodput is at most 1448/1514 of the L2 rate the cap counts (0.956).
    let link = iperf(&ns("b"), &ns("a"), "10.6.0.2", 4, false) / 1e6;
    let link_drops = drops(&c, "caps", "policed_link");
    let guest = iperf(&ns("d"), &ns("c"), "10.6.0.4", 4, false) / 1e6;
    eprintln!(
        "{dp}: TCP through a {CAP_MBIT} Mbit/s link {link:.2} Mbit/s ({link_drops} frames \
         overflowed its queue), through a {CAP_MBIT} Mbit/s guest cap {guest:.2} Mbit/s"
    );
    for (what, got) in [("link", link), ("guest", guest)] {
        assert!(
            (0.8 * CAP_MBIT..=1.0 * CAP_MBIT).contains(&got),
            "TCP through the capped {what}: {got:.2} Mbit/s for a {CAP_MBIT} Mbit/s cap"
        );
    }
    assert_eq!(
        drops(&c, "caps", "policed_guest"),
        0,
        "a capped guest is held back, never dropped"
    );

    // With ECN, the queue marks instead of overflowing.
    for g in ["a", "b"] {
        let o = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns(g),
                "sysctl",
                "-qw",
                "net.ipv4.tcp_ecn=1",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    }
    let before = c.stats("caps");
    let marked0: u64 = before.hosts.iter().map(|h| h.stats.ecn_marked).sum();
    let ecn = iperf(&ns("b"), &ns("a"), "10.6.0.2", 4, false) / 1e6;
    let after = c.stats("caps");
    let marked: u64 = after.hosts.iter().map(|h| h.stats.ecn_marked).sum::<u64>() - marked0;
    let overflowed = drops(&c, "caps", "policed_link") - link_drops;
    eprintln!(
        "{dp}: TCP with ECN: {ecn:.2} Mbit/s, {marked} frames marked CE, {overflowed} overflowed"
    );
    assert!(
        marked > 0,
        "an ECN-capable flow through a full queue is marked"
    );
    assert!(
        (0.8 * CAP_MBIT..=1.0 * CAP_MBIT).contains(&ecn),
        "TCP with ECN: {ecn:.2} Mbit/s"
    );
}

on_both_dataplanes!(tcp_through_a_capped_link_and_a_capped_guest);

/// e (fast port, h1) capped at 20 Mbit/s → f (fast port, h2).
const FAST: &str = r#"
name = "fastcap"
vni = 161
[[guest]]
name = "e"
host = "h1"
ip = "10.6.1.1/24"
port = "xdp"
rate = "20mbit"
[[guest]]
name = "f"
host = "h2"
ip = "10.6.1.2/24"
port = "xdp"
[[link]]
between = ["e", "f"]
"#;

/// The guest's `eth0` root qdisc, from `tc -j -s` (its kind, options and counters).
fn root_qdisc(ns: &str) -> serde_json::Value {
    let o = std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "tc", "-j", "-s", "qdisc", "show", "dev", "eth0",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    j.as_array()
        .and_then(|a| a.iter().find(|q| q["root"] == true))
        .cloned()
        .unwrap_or_else(|| panic!("no root qdisc on {ns}'s eth0: {j}"))
}

/// A fast-port guest's frames reach the daemon through an AF_XDP ring its TCP cannot
/// feel: the guest is paced at its cap in its own `eth0` queue instead, which follows
/// `violin apply` and goes with the cap. TCP through it gets the cap, with nothing
/// dropped on the way (neither by the data plane nor by the guest's queue).
#[test]
fn xdp_a_capped_fast_port_guest_is_paced_in_its_own_queue() {
    if !can_run() {
        return;
    }
    let c = Cluster::up(2, "xdp", &[]);
    c.up_spec("fastcap.toml", FAST);
    assert!(c.ping("fastcap", "e", "10.6.1.2", 2));
    let (e, f) = (c.guest_ns("fastcap", "e"), c.guest_ns("fastcap", "f"));
    let q = root_qdisc(&e);
    assert_eq!(q["kind"], "tbf", "the capped guest's eth0: {q}");
    assert_eq!(q["options"]["rate"], 2_500_000, "20 Mbit/s in bytes: {q}");
    assert_eq!(
        q["options"]["burst"], 25_000,
        "the cap's default depth, 10 ms: {q}"
    );
    let q = root_qdisc(&f);
    assert_ne!(q["kind"], "tbf", "an uncapped guest is not paced: {q}");

    let got = iperf(&f, &e, "10.6.1.2", 4, false) / 1e6;
    let q = root_qdisc(&e);
    eprintln!(
        "TCP through a {CAP_MBIT} Mbit/s fast-port guest cap: {got:.2} Mbit/s; its queue: {q}"
    );
    assert!(
        (0.85 * CAP_MBIT..=1.0 * CAP_MBIT).contains(&got),
        "TCP through the capped fast-port guest: {got:.2} Mbit/s for a {CAP_MBIT} Mbit/s cap"
    );
    assert!(
        q["bytes"].as_u64().unwrap() > 5_000_000,
        "the stream went through the queue: {q}"
    );
    assert_eq!(
        q["drops"], 0,
        "TCP is held back by its own queue, not dropped: {q}"
    );
    assert_eq!(
        drops(&c, "fastcap", "policed_guest"),
        0,
        "nothing dropped by the data plane"
    );

    // A new cap changes the pacing; no cap takes it away.
    let p = c.write_spec("fastcap.toml", &FAST.replace("20mbit", "5mbit"));
    c.ok(&["apply", &p]);
    let q = root_qdisc(&e);
    assert_eq!(q["kind"], "tbf", "{q}");
    assert_eq!(q["options"]["rate"], 625_000, "5 Mbit/s after apply: {q}");
    let p = c.write_spec("fastcap.toml", &FAST.replace("rate = \"20mbit\"\n", ""));
    c.ok(&["apply", &p]);
    let q = root_qdisc(&e);
    assert_ne!(
        q["kind"], "tbf",
        "the cap is gone, and the pacing with it: {q}"
    );
    assert!(c.ping("fastcap", "e", "10.6.1.2", 2));
}
