//! Tap ports and super-frames end to end, on both data planes: tap guests hand over and
//! take TCP super-frames (far fewer port frames than wire segments, both ways), and
//! take UDP datagrams coalesced into USO super-frames, split back whole; a
//! super-frame to a socket guest or to a Linux kernel vxlan device is segmented with
//! correct checksums (TCP would stall otherwise) — between the daemons their checksums
//! travel partial (remote checksum offload) unless the cluster turns that off; a capped link still holds TCP under
//! its rate; and the host's own TCP keeps its segmentation offload with the xdp plane
//! attached. On an MTU 9000 underlay jumbo frames cross AF_XDP, the underlay's and
//! fast ports', in several buffers.
mod common;

use common::*;
use std::net::Ipv4Addr;
use std::time::Duration;
use violin_dp::cli::ClusterStats;

/// a (tap, h1) talks to b (tap, h2), s (socket, h2), p (tap, h2, behind a 50 Mbit/s
/// link) and the kernel vxlan device x.
const TAP_SPEC: &str = r#"
name = "tapv"
vni = 150
[[guest]]
name = "a"
host = "h1"
ip = "10.5.0.1/24"
port = "tap"
[[guest]]
name = "b"
host = "h2"
ip = "10.5.0.2/24"
port = "tap"
[[guest]]
name = "s"
host = "h2"
ip = "10.5.0.3/24"
[[guest]]
name = "p"
host = "h2"
ip = "10.5.0.4/24"
port = "tap"
[[link]]
between = ["a", "b"]
[[link]]
between = ["a", "s"]
[[link]]
between = ["a", "p"]
rate = "50mbit"
[[link]]
between = ["a", "x"]
[[external]]
name = "x"
underlay = "172.31.0.50"
mac = "02:aa:00:00:00:50"
"#;

/// TCP from `client_ns` to `to` (served in `server_ns`) for 2 s, then back: each way
/// must move more than `least` bit/s.
fn tcp_both_ways(what: &str, server_ns: &str, client_ns: &str, to: &str, least: f64) {
    let there = iperf(server_ns, client_ns, to, 2, false);
    let back = iperf(server_ns, client_ns, to, 2, true);
    eprintln!(
        "{what}: TCP {:.2} Gbit/s, back {:.2} Gbit/s",
        there / 1e9,
        back / 1e9
    );
    assert!(there > least && back > least, "{what}: {there} / {back}");
}

fn port(s: &ClusterStats, guest: &str) -> violin_dp::stats::PortCounters {
    s.hosts
        .iter()
        .flat_map(|h| &h.ports)
        .find(|p| p.name == guest)
        .unwrap_or_else(|| panic!("no port {guest}"))
        .counters
}

fn tap_ports_carry_super_frames_and_interoperate(dp: &str) {
    if !can_run() {
        return;
    }
    let c = Cluster::up(2, dp, &[]);
    c.up_spec("tapv.toml", TAP_SPEC);
    for to in ["10.5.0.2", "10.5.0.3", "10.5.0.4"] {
        assert!(c.ping("tapv", "a", to, 3), "a → {to}");
    }
    let st = c.stats("tapv");
    assert!(
        st.hosts
            .iter()
            .flat_map(|h| &h.ports)
            .any(|p| p.name == "a" && p.socket.starts_with("tap:")),
        "a is not on a tap port"
    );
    let (na, nb, ns, np) = (
        c.guest_ns("tapv", "a"),
        c.guest_ns("tapv", "b"),
        c.guest_ns("tapv", "s"),
        c.guest_ns("tapv", "p"),
    );

    // Tap to tap: super-frames both ways.
    let s0 = c.stats("tapv");
    let bps = iperf(&nb, &na, "10.5.0.2", 2, false);
    let s1 = c.stats("tapv");
    eprintln!("{dp}: TCP a → b, tap to tap: {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 50e6, "TCP a → b barely moved: {bps}");
    let segs = c.edge(&s1, "a", "b").0 - c.edge(&s0, "a", "b").0;
    let read = port(&s1, "a").rx_frames - port(&s0, "a").rx_frames;
    let written = port(&s1, "b").tx_frames - port(&s0, "b").tx_frames;
    eprintln!("{dp}: {segs} segments a → b from {read} frames read, {written} written");
    assert!(
        segs > 3 * read,
        "a's tap handed over {read} frames for {segs} segments: no super-frames"
    );
    assert!(
        segs > 3 * written,
        "b's tap took {written} frames for {segs} segments: nothing coalesced"
    );
    let back = iperf(&nb, &na, "10.5.0.2", 2, true);
    eprintln!("{dp}: TCP b → a, tap to tap: {:.2} Gbit/s", back / 1e9);
    assert!(back > 50e6, "TCP b → a barely moved: {back}");

    udp_datagrams_coalesce_and_arrive_whole(&c, dp, &na, &nb);

    // Tap to socket and back: segmented on the way out, coalesced on the way in.
    let to_s = iperf(&ns, &na, "10.5.0.3", 2, false);
    let from_s = iperf(&ns, &na, "10.5.0.3", 2, true);
    eprintln!(
        "{dp}: TCP a → s {:.0} Mbit/s, s → a {:.0} Mbit/s",
        to_s / 1e6,
        from_s / 1e6
    );
    assert!(to_s > 10e6 && from_s > 10e6, "{to_s} / {from_s}");

    // A capped link holds a tap guest's TCP under its rate.
    let capped = iperf(&np, &na, "10.5.0.4", 3, false);
    eprintln!(
        "{dp}: TCP a → p over a 50 Mbit/s link: {:.1} Mbit/s",
        capped / 1e6
    );
    assert!(capped > 0.0 && capped <= 56e6, "{capped}");

    // A Linux kernel vxlan device takes a tap guest's segments and sends it its own.
    use violin_dp::host::netlink;
    let ext = attach_to_underlay(&c, "ext", Ipv4Addr::new(172, 31, 0, 50), 24);
    violin_dp::host::netns::run_in(&ext, || {
        netlink::with_handle(|h| async move {
            let link = rtnetlink::LinkVxlan::new("vx0", 150)
                .port(4789)
                .local(Ipv4Addr::new(172, 31, 0, 50))
                .remote(Ipv4Addr::new(172, 31, 0, 1))
                .learning(false)
                .build();
            h.link().add(link).execute().await?;
            netlink::set_mac(&h, "vx0", mac_bytes("02:aa:00:00:00:50")).await?;
            netlink::set_mtu(&h, "vx0", 1450).await?;
            netlink::add_addr(&h, "vx0", Ipv4Addr::new(10, 5, 0, 50), 24).await?;
            netlink::set_up(&h, "vx0").await
        })?;
        // On a veth the kernel leaves the inner TCP checksum to an offload that never
        // happens (a NIC would compute it): make it compute checksums itself.
        netlink::disable_tx_checksum("eth0")
    })
    .unwrap();
    assert!(c.ping("tapv", "a", "10.5.0.50", 3), "a → kernel vxlan");
    tcp_both_ways(
        &format!("{dp}: a → kernel vxlan"),
        &ext,
        &na,
        "10.5.0.50",
        10e6,
    );
    let s = c.stats("tapv");
    for bad in ["malformed", "truncated", "oversize"] {
        assert_eq!(
            s.drops.get(bad).copied().unwrap_or(0),
            0,
            "{bad}: {:?}",
            s.drops
        );
    }
    // Removing the Violin removes the taps with their namespaces.
    c.ok(&["down", "tapv"]);
    assert!(violin_dp::host::netns::list(&format!("{}-tapv-", c.name)).is_empty());
}

/// UDP from a to b (taps on two hosts) in bursts of equal datagrams, each ending in a
/// shorter one, each burst sent at once: b's port coalesces them into USO super-frames
/// where the kernel's taps take USO (6.2+), and b's stack splits them back into the
/// datagrams a sent, whole, in order, none lost or merged.
fn udp_datagrams_coalesce_and_arrive_whole(c: &Cluster, dp: &str, na: &str, nb: &str) {
    const BURSTS: usize = 50;
    const PER_BURST: usize = 20;
    let size = |i: usize| {
        if i % PER_BURST == PER_BURST - 1 {
            300
        } else {
            1200
        }
    };
    let body = |i: usize, n: usize| -> Vec<u8> {
        let mut d = vec![(i % 251) as u8; n];
        d[..4].copy_from_slice(&(i as u32).to_be_bytes());
        d
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let nb_ = nb.to_string();
    let sink = std::thread::spawn(move || {
        violin_dp::host::netns::enter(&nb_).unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:6001").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = s.recv(&mut buf) {
            got.push(buf[..n].to_vec());
            if got.len() == BURSTS * PER_BURST {
                break;
            }
        }
        got
    });
    ready_rx.recv().unwrap();
    let s0 = c.stats("tapv");
    let na_ = na.to_string();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        violin_dp::host::netns::enter(&na_).unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        // Each burst leaves in one send (UDP_SEGMENT): a's tap hands it over as one
        // USO super-frame, so its datagrams travel, and reach b's port, together.
        let seg: libc::c_int = 1200;
        // SAFETY: setsockopt(2) reads one c_int from `seg`, which outlives the call.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&seg as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
        for b in 0..BURSTS {
            let burst: Vec<u8> = (b * PER_BURST..(b + 1) * PER_BURST)
                .flat_map(|i| body(i, size(i)))
                .collect();
            s.send_to(&burst, "10.5.0.2:6001").unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    })
    .join()
    .unwrap();
    let got = sink.join().unwrap();
    let s1 = c.stats("tapv");
    let written = port(&s1, "b").tx_frames - port(&s0, "b").tx_frames;
    eprintln!(
        "{dp}: UDP a → b: {} of {} datagrams arrived, in {written} tap writes",
        got.len(),
        BURSTS * PER_BURST
    );
    // Whole and in order: each is the datagram a sent with that number.
    let mut last = None;
    for d in &got {
        assert!(d.len() >= 4, "a datagram of {} bytes", d.len());
        let i = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
        assert!(last.is_none_or(|l| i > l), "datagram {i} after {last:?}");
        assert_eq!(d, &body(i, size(i)), "datagram {i} changed on the way");
        last = Some(i);
    }
    // UDP may lose a few under load; a handful at most here.
    assert!(
        got.len() + 10 >= BURSTS * PER_BURST,
        "{} of {} datagrams arrived",
        got.len(),
        BURSTS * PER_BURST
    );
    if kernel_at_least(6, 2) {
        assert!(
            (written as usize) * 2 < got.len(),
            "b's tap took {written} writes for {} datagrams: nothing coalesced",
            got.len()
        );
    } else {
        // No USO on the tap: every datagram is its own write.
        assert!(
            written as usize >= got.len(),
            "{written} writes, {}",
            got.len()
        );
    }
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = r
        .split(|ch: char| !ch.is_ascii_digit())
        .filter_map(|x| x.parse::<u32>().ok());
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (major, minor)
}

/// A guest's tap outlives a daemon crash (it persists), and the restarted daemon takes
/// it back: the guest keeps its address and its TCP connection.
fn a_tap_guest_survives_a_daemon_crash(dp: &str) {
    if !can_run() {
        return;
    }
    let c = Cluster::up(2, dp, &[]);
    c.up_spec("tapv.toml", TAP_SPEC);
    assert!(c.ping("tapv", "a", "10.5.0.2", 3));
    c.ok(&["cluster", "restart", "h1", "--hard"]);
    assert!(
        c.ping_until("tapv", "a", "10.5.0.2", Duration::from_secs(20)),
        "a → b after h1's daemon crashed and came back"
    );
    let (na, nb) = (c.guest_ns("tapv", "a"), c.guest_ns("tapv", "b"));
    assert!(iperf(&nb, &na, "10.5.0.2", 1, false) > 10e6);
}

/// `count` pings of `size` bytes (not fragmented) from guest `from` of Violin `violin`
/// to `to`: ping's output.
fn ping_in(c: &Cluster, violin: &str, from: &str, to: &str, size: u32, count: u32) -> String {
    let (size, count) = (size.to_string(), count.to_string());
    let o = c.cmd(&[
        "exec", violin, from, "--", "ping", "-q", "-c", &count, "-i", "0.2", "-W", "1", "-s",
        &size, "-M", "do", to,
    ]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The same in Violin `tapv`.
fn ping_whole(c: &Cluster, from: &str, to: &str, size: u32, count: u32) -> String {
    ping_in(c, "tapv", from, to, size, count)
}

/// A cluster of two hosts on an MTU 9000 underlay, with Violin `tapv` at MTU 8950.
fn jumbo_cluster(dp: &str, flags: &[&str]) -> Cluster {
    let c = Cluster::up(2, dp, &[&["--mtu", "9000"], flags].concat());
    c.up_spec(
        "tapv.toml",
        &TAP_SPEC.replace("vni = 150", "vni = 150\nmtu = 8950"),
    );
    c
}

/// On an MTU 9000 underlay, 8000-byte frames (no fragmentation allowed) cross between
/// hosts, tap to tap, tap to socket and back: on the xdp plane they are longer than an
/// AF_XDP frame, and cross AF_XDP in several (multi-buffer sockets) both ways.
fn jumbo_frames_cross_an_mtu_9000_underlay(dp: &str) {
    if !can_run() {
        return;
    }
    let c = jumbo_cluster(dp, &[]);
    let ping = |from: &str, to: &str, size: u32, count: u32| ping_whole(&c, from, to, size, count);
    for (from, to) in [("a", "10.5.0.2"), ("a", "10.5.0.3"), ("s", "10.5.0.1")] {
        let out = ping(from, to, 8000, 3);
        assert!(
            out.contains("3 received"),
            "{dp}: 8000-byte ping {from} → {to}: {out}"
        );
    }
    if dp == "xdp" {
        // The jumbo frames crossed AF_XDP both ways, each in several buffers
        // (multi-buffer sockets): none went to the kernel's socket.
        c.assert_dataplane("tapv", "xdp");
        for h in &c.stats("tapv").hosts {
            let x = h.xdp.as_ref().expect("xdp counters");
            eprintln!(
                "{}: verdicts {:?}, rings {:?}",
                h.host, x.verdicts, x.rings.counters
            );
            assert_eq!(
                x.verdicts.get("jumbo"),
                None,
                "host {}: {:?}",
                h.host,
                x.verdicts
            );
            let k = x.rings.counters;
            assert!(
                k.rx_multi_buffer >= 3 && k.tx_multi_buffer >= 3,
                "host {}: {k:?}",
                h.host
            );
            assert_eq!(k.rx_multi_buffer_dropped, 0, "host {}: {k:?}", h.host);
        }
        jumbo_flood_leaves_the_pool_whole(&c);
        fast_ports_carry_jumbo_frames(&c);
    }
    // Around the longest frame one AF_XDP frame carries (1792 bytes after the kernel's
    // headroom: an inner frame of 1742 bytes, a 1700-byte ping), and up to a whole 2 KiB
    // frame: the xdp plane once sent 1743..1998-byte frames truncated through AF_XDP,
    // and the frames were lost.
    for size in [1700, 1701, 1760, 1850, 1956, 1957] {
        let out = ping("a", "10.5.0.2", size, 2);
        assert!(
            out.contains("2 received"),
            "{dp}: {size}-byte ping a → b: {out}"
        );
    }
    let (na, ns) = (c.guest_ns("tapv", "a"), c.guest_ns("tapv", "s"));
    let bps = iperf(&ns, &na, "10.5.0.3", 2, false);
    eprintln!("{dp}: TCP a → s at MTU 8950: {:.2} Gbit/s", bps / 1e9);
    assert!(bps > 10e6, "{bps}");
    let s = c.stats("tapv");
    assert_eq!(
        s.drops.get("oversize").copied().unwrap_or(0),
        0,
        "{:?}",
        s.drops
    );
}

/// A 2-second flood of 8000-byte datagrams from a (h1) to b (h2) through multi-buffer
/// AF_XDP both ways: b gets them (less what h2's AF_XDP ring overflowed, which the
/// kernel counts), nothing is dropped as too long, and once it is over every TX frame
/// of h1's pool is back (a frame sent in 5 buffers gives back 5).
fn jumbo_flood_leaves_the_pool_whole(c: &Cluster) {
    // Bytes written to b's tap: datagrams of one flow coalesce into USO super-frames
    // there, so its frame count is not the datagrams'.
    let delivered = |c: &Cluster| {
        let s = c.stats("tapv");
        let b = s
            .hosts
            .iter()
            .flat_map(|h| &h.ports)
            .find(|p| p.name == "b");
        b.expect("port b").counters.tx_bytes
    };
    let before = delivered(c);
    let until = std::time::Instant::now() + Duration::from_secs(2);
    let sent = udp_flood(&c.guest_ns("tapv", "a"), "10.5.0.2:9", 8000, until, false)
        .join()
        .unwrap();
    let s = c.tx_pool_back("tapv", "h1");
    let got = delivered(c) - before;
    let r = s
        .hosts
        .iter()
        .find(|h| h.host == "h1")
        .unwrap()
        .xdp
        .as_ref()
        .unwrap()
        .rings;
    let h2 = s.hosts.iter().find(|h| h.host == "h2").unwrap();
    let k = h2.xdp.as_ref().unwrap().rings.counters;
    eprintln!(
        "jumbo flood: {sent} datagrams sent, {got} bytes delivered to b; h1 {:?}; h2 {k:?}",
        r.counters
    );
    assert!(r.counters.tx_multi_buffer > 1000, "{:?}", r.counters);
    assert!(
        got > 1000 * 8000 && got <= sent * 8042,
        "{got} bytes delivered of {sent} datagrams"
    );
    assert!(
        k.rx_multi_buffer > 1000 && k.rx_multi_buffer_dropped == 0,
        "{k:?}"
    );
}

/// Fast ports (veths driven by AF_XDP) of a Violin of MTU 8950: f1 on h1, f2 and f3 on
/// h2.
const FAST_JUMBO_SPEC: &str = r#"
name = "fastj"
vni = 151
mtu = 8950
[[guest]]
name = "f1"
host = "h1"
ip = "10.6.0.1/24"
port = "xdp"
[[guest]]
name = "f2"
host = "h2"
ip = "10.6.0.2/24"
port = "xdp"
[[guest]]
name = "f3"
host = "h2"
ip = "10.6.0.3/24"
port = "xdp"
"#;

/// Fast ports take a jumbo MTU: their sockets are multi-buffer, so 8000-byte frames
/// (no fragmentation allowed) cross them both ways, between hosts and between two
/// fast ports of one host, and a TCP stream moves in frames of several AF_XDP frames
/// each (the ports' bytes per frame), none dropped as too long; a guest that raises its
/// MTU beyond its Violin's gets no longer frame to its port.
fn fast_ports_carry_jumbo_frames(c: &Cluster) {
    c.up_spec("fastj.toml", FAST_JUMBO_SPEC);
    for (from, to) in [("f1", "10.6.0.2"), ("f2", "10.6.0.1"), ("f2", "10.6.0.3")] {
        let out = ping_in(c, "fastj", from, to, 8000, 3);
        assert!(
            out.contains("3 received"),
            "8000-byte ping {from} → {to} through fast ports: {out}"
        );
    }
    let (n1, n2) = (c.guest_ns("fastj", "f1"), c.guest_ns("fastj", "f2"));
    let s0 = c.stats("fastj");
    let bps = iperf(&n2, &n1, "10.6.0.2", 2, false);
    let s1 = c.stats("fastj");
    let (f1, f2) = (
        (port(&s0, "f1"), port(&s1, "f1")),
        (port(&s0, "f2"), port(&s1, "f2")),
    );
    let (read, read_frames) = (
        f1.1.rx_bytes - f1.0.rx_bytes,
        f1.1.rx_frames - f1.0.rx_frames,
    );
    let (written, written_frames) = (
        f2.1.tx_bytes - f2.0.tx_bytes,
        f2.1.tx_frames - f2.0.tx_frames,
    );
    eprintln!(
        "fast ports at MTU 8950: TCP f1 → f2 {:.2} Gbit/s; f1's port read {read} bytes in \
         {read_frames} frames, f2's wrote {written} in {written_frames}",
        bps / 1e9
    );
    assert!(bps > 10e6, "TCP through fast ports at MTU 8950: {bps}");
    // f1's port reads the stream's data (its ACKs go the other way), as f2's writes
    // it: frames averaging far more than one AF_XDP frame holds.
    assert!(
        read > 4000 * read_frames && written > 4000 * written_frames,
        "no jumbo frames through the fast ports"
    );
    assert_eq!(
        s1.drops.get("oversize").copied().unwrap_or(0),
        0,
        "{:?}",
        s1.drops
    );

    // A guest that raises its own MTU past its Violin's cannot send its longer
    // frames: the port's host end has the Violin's MTU, and veth refuses frames longer
    // than the receiving end's (the guest's own `eth0` counts them as dropped).
    c.ok(&[
        "exec", "fastj", "f3", "--", "ip", "link", "set", "eth0", "mtu", "16000",
    ]);
    let before = port(&c.stats("fastj"), "f3").rx_bytes;
    let out = ping_in(c, "fastj", "f3", "10.6.0.2", 12000, 3);
    assert!(
        out.contains(" 0 received"),
        "12000-byte ping from f3: {out}"
    );
    let got = port(&c.stats("fastj"), "f3").rx_bytes - before;
    let refused = c.ok(&[
        "exec",
        "fastj",
        "f3",
        "--",
        "cat",
        "/sys/class/net/eth0/statistics/tx_dropped",
    ]);
    eprintln!(
        "f3 at MTU 16000: its port read {got} bytes; its eth0 dropped {}",
        refused.trim()
    );
    assert!(
        got < 12000,
        "a frame of f3's longer than its Violin's MTU reached the port"
    );
    assert!(refused.trim().parse::<u64>().unwrap() >= 3, "{refused}");
    let out = ping_in(c, "fastj", "f1", "10.6.0.2", 8000, 2);
    assert!(
        out.contains("2 received"),
        "f1 → f2 after f3's frames: {out}"
    );
}

/// With multi-buffer AF_XDP sockets off (`--no-xdp-multi-buffer`: what the daemon falls
/// back to where the kernel refuses them), jumbo frames take the kernel's UDP socket
/// both ways: the classifier passes them (verdict `jumbo`), and they arrive all the same.
#[test]
fn jumbo_frames_without_multi_buffer_take_the_kernel_socket() {
    if !can_run() {
        return;
    }
    let c = jumbo_cluster("xdp", &["--no-xdp-multi-buffer"]);
    for (from, to) in [("a", "10.5.0.2"), ("b", "10.5.0.1")] {
        let out = ping_whole(&c, from, to, 8000, 3);
        assert!(
            out.contains("3 received"),
            "8000-byte ping {from} → {to}: {out}"
        );
    }
    for h in &c.stats("tapv").hosts {
        let x = h.xdp.as_ref().expect("xdp counters");
        let k = x.rings.counters;
        eprintln!(
            "{}: verdicts {:?}, rings {k:?}, kernel socket {}",
            h.host, x.verdicts, h.udp_rx_frames
        );
        let jumbo = x.verdicts.get("jumbo").copied().unwrap_or(0);
        assert!(
            jumbo >= 6 && h.udp_rx_frames >= 6,
            "host {}: {:?}",
            h.host,
            x.verdicts
        );
        assert_eq!(
            (k.rx_multi_buffer, k.tx_multi_buffer),
            (0, 0),
            "host {}: {k:?}",
            h.host
        );
    }
}

on_both_dataplanes!(
    tap_ports_carry_super_frames_and_interoperate,
    a_tap_guest_survives_a_daemon_crash,
    jumbo_frames_cross_an_mtu_9000_underlay,
);

/// With remote checksum offload off (`--no-remote-checksum`: a cluster that still has
/// daemons older than it), super-frames between the daemons carry complete checksums,
/// and tap guests' TCP runs the same way.
#[test]
fn tap_guests_without_remote_checksum_offload() {
    if !can_run() {
        return;
    }
    let c = Cluster::up(2, "udp", &["--no-remote-checksum"]);
    for h in ["h1", "h2"] {
        let p = violin_dp::cluster::state_dir(&c.run_dir, &c.name).join(format!("{h}.toml"));
        let cfg = violin_dp::config::HostConfig::load(&p).unwrap();
        assert!(!cfg.remote_checksum, "{h}'s config turns it off");
    }
    c.up_spec("tapv.toml", TAP_SPEC);
    assert!(c.ping("tapv", "a", "10.5.0.2", 3), "a → b");
    let (na, nb) = (c.guest_ns("tapv", "a"), c.guest_ns("tapv", "b"));
    tcp_both_ways("no RCO: a → b", &nb, &na, "10.5.0.2", 50e6);
    let s = c.stats("tapv");
    assert_eq!(
        s.drops.get("malformed").copied().unwrap_or(0),
        0,
        "{:?}",
        s.drops
    );
}

/// The xdp plane attaches generic on a veth, so the host's own TCP keeps segmentation
/// offload; attached native it would arrive segmented. Behaviour, not speed: the veth
/// peer's TSO feature is what decides.
#[test]
fn the_xdp_plane_leaves_the_hosts_own_segmentation_offload_alone() {
    if !can_run() {
        return;
    }
    let tso_of_peer = |c: &Cluster| {
        let info = c.info();
        let ns = &info.hosts[0].netns;
        // The host's eth0 peer sits on the bridge, in this namespace: find it by index.
        let o = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "ip", "-o", "link", "show", "eth0"])
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&o.stdout).into_owned();
        let peer = line
            .split("@if")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .unwrap_or_else(|| panic!("no peer index in {line}"))
            .to_string();
        let links = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap();
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        let name = links
            .lines()
            .find(|l| l.starts_with(&format!("{peer}: ")))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|n| n.split('@').next())
            .unwrap_or_else(|| panic!("no link {peer}"))
            .to_string();
        let k = std::process::Command::new("ethtool")
            .args(["-k", &name])
            .output()
            .unwrap();
        let k = String::from_utf8_lossy(&k.stdout).into_owned();
        k.lines()
            .find(|l| l.trim_start().starts_with("tx-tcp-segmentation:"))
            .map(|l| l.contains(": on"))
            .unwrap_or_else(|| panic!("ethtool -k {name}: {k}"))
    };
    let c = Cluster::up(2, "xdp", &[]);
    assert!(
        tso_of_peer(&c),
        "generic XDP (the default on a veth) kept TSO"
    );
    drop(c);
    let c = Cluster::up(2, "xdp", &["--xdp-attach", "native"]);
    assert!(
        !tso_of_peer(&c),
        "native XDP on a veth strips TSO from the peer (what generic avoids)"
    );
}
