//! Switch decisions as a fixture table: (ingress, frame) → verdict and outputs.

use super::*;
use crate::spec;
use violin_common::wire::{EtherType, EthernetRepr};

const H1: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const H2: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
const X: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 50);
const VNI: u32 = 101;
/// Tunnel outputs: to h2's daemon (a peer), and to the external VTEP x.
const TO_H2: Egress = Egress::Tunnel {
    dst: H2,
    vni: VNI,
    peer: true,
};
const TO_X: Egress = Egress::Tunnel {
    dst: X,
    vni: VNI,
    peer: false,
};

/// a, d on h1 (local); b, c on h2; external x. Links: a–b (50 Mbit/s), b–c, a–d, a–x.
const SPEC: &str = r#"
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
[[guest]]
name = "d"
host = "h1"
ip = "10.0.0.4/24"
[[link]]
between = ["a", "b"]
rate = "50mbit"
[[link]]
between = ["b", "c"]
[[link]]
between = ["a", "d"]
[[link]]
between = ["a", "x"]
[[external]]
name = "x"
underlay = "172.31.0.50"
mac = "02:aa:00:00:00:50"
"#;

fn hosts() -> BTreeMap<String, Ipv4Addr> {
    [("h1".to_string(), H1), ("h2".to_string(), H2)].into()
}

struct Fixture {
    sw: Switch,
    spec: Violin,
    pa: PortId,
    pd: PortId,
}

fn fixture(text: &str) -> Fixture {
    let spec = spec::parse(text, &hosts()).unwrap();
    let mut sw = Switch::new();
    let ports = sw.add_violin(&spec, "h1", 0).unwrap();
    assert_eq!(ports.len(), 2, "a and d are local");
    Fixture {
        pa: ports[0].1,
        pd: ports[1].1,
        sw,
        spec,
    }
}

fn mac(f: &Fixture, name: &str) -> EthernetAddress {
    f.spec.members[f.spec.member(name).unwrap()].mac.0
}

/// A frame of a local experimental EtherType (the source guard, which reads IPv4 and
/// ARP, has its own table below).
fn frame(dst: EthernetAddress, src: EthernetAddress, len: usize) -> Vec<u8> {
    typed(dst, src, EtherType(0x88b5), &vec![0u8; len.max(14) - 14])[..len].to_vec()
}

fn typed(dst: EthernetAddress, src: EthernetAddress, t: EtherType, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 14 + payload.len()];
    buf[14..].copy_from_slice(payload);
    EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype: t,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    buf
}

const BCAST: EthernetAddress = EthernetAddress::BROADCAST;
const STRANGER: EthernetAddress = EthernetAddress([0x02, 0xde, 0xad, 0, 0, 1]);

#[test]
fn fixture_table() {
    let mut f = fixture(SPEC);
    let (pa, pd) = (f.pa, f.pd);
    let [a, b, c, d, x] = ["a", "b", "c", "d", "x"].map(|n| mac(&f, n));
    let t2 = TO_H2;
    let tx = TO_X;
    let from_h2 = Ingress::Tunnel { src: H2, vni: VNI };
    let from_x = Ingress::Tunnel { src: X, vni: VNI };
    use Verdict::*;
    #[rustfmt::skip]
    type Row = (&'static str, Ingress, Vec<u8>, Verdict, Vec<Egress>);
    let table: Vec<Row> = vec![
        (
            "a→b: unicast to a remote guest",
            Ingress::Port(pa),
            frame(b, a, 100),
            Forward,
            vec![t2],
        ),
        (
            "a→d: unicast to a local guest",
            Ingress::Port(pa),
            frame(d, a, 100),
            Forward,
            vec![Egress::Port(pd)],
        ),
        (
            "a→x: unicast to the external VTEP",
            Ingress::Port(pa),
            frame(x, a, 100),
            Forward,
            vec![tx],
        ),
        (
            "a→c: no link",
            Ingress::Port(pa),
            frame(c, a, 100),
            NoLink,
            vec![],
        ),
        (
            "d→b: no link",
            Ingress::Port(pd),
            frame(b, d, 100),
            NoLink,
            vec![],
        ),
        (
            "a sends as b",
            Ingress::Port(pa),
            frame(d, b, 100),
            Spoofed,
            vec![],
        ),
        (
            "a sends from a multicast MAC",
            Ingress::Port(pa),
            frame(d, BCAST, 100),
            Spoofed,
            vec![],
        ),
        ("a→a", Ingress::Port(pa), frame(a, a, 100), Hairpin, vec![]),
        (
            "a broadcasts: b (one copy to h2), d, x",
            Ingress::Port(pa),
            frame(BCAST, a, 60),
            Forward,
            vec![t2, Egress::Port(pd), tx],
        ),
        (
            "a → unknown unicast floods",
            Ingress::Port(pa),
            frame(STRANGER, a, 60),
            Forward,
            vec![t2, Egress::Port(pd), tx],
        ),
        (
            "d broadcasts: only a",
            Ingress::Port(pd),
            frame(BCAST, d, 60),
            Forward,
            vec![Egress::Port(pa)],
        ),
        (
            "zero-length frame",
            Ingress::Port(pa),
            vec![],
            ZeroLength,
            vec![],
        ),
        (
            "13-byte frame",
            Ingress::Port(pa),
            frame(b, a, 13),
            Truncated,
            vec![],
        ),
        (
            "frame over MTU 1450 + 18",
            Ingress::Port(pa),
            frame(b, a, 1469),
            Oversize,
            vec![],
        ),
        (
            "frame at the largest size",
            Ingress::Port(pa),
            frame(b, a, 1468),
            Forward,
            vec![t2],
        ),
        (
            "unknown port",
            Ingress::Port(999),
            frame(b, a, 100),
            PortDown,
            vec![],
        ),
        (
            "h2: b→a",
            from_h2,
            frame(a, b, 100),
            Forward,
            vec![Egress::Port(pa)],
        ),
        (
            "h2: b→d, no link",
            from_h2,
            frame(d, b, 100),
            NoLink,
            vec![],
        ),
        (
            "h2: c→a, no link",
            from_h2,
            frame(a, c, 100),
            NoLink,
            vec![],
        ),
        (
            "h2 sends as a, who lives here",
            from_h2,
            frame(d, a, 100),
            Spoofed,
            vec![],
        ),
        ("h2 sends as x", from_h2, frame(a, x, 100), Spoofed, vec![]),
        (
            "h2 sends from an unknown MAC",
            from_h2,
            frame(a, STRANGER, 100),
            Spoofed,
            vec![],
        ),
        (
            "h2: b broadcasts: a only (d has no link to b)",
            from_h2,
            frame(BCAST, b, 60),
            Forward,
            vec![Egress::Port(pa)],
        ),
        (
            "h2: c broadcasts: nobody here",
            from_h2,
            frame(BCAST, c, 60),
            NoDestination,
            vec![],
        ),
        (
            "h2: b→x: never tunnel to tunnel",
            from_h2,
            frame(x, b, 100),
            NoDestination,
            vec![],
        ),
        (
            "h2: b→c: not delivered here",
            from_h2,
            frame(c, b, 100),
            NoDestination,
            vec![],
        ),
        (
            "h2: truncated inner frame",
            from_h2,
            frame(a, b, 10),
            Truncated,
            vec![],
        ),
        (
            "non-member underlay source",
            Ingress::Tunnel {
                src: Ipv4Addr::new(172, 31, 0, 99),
                vni: VNI,
            },
            frame(a, b, 100),
            NotMember,
            vec![],
        ),
        (
            "unknown VNI",
            Ingress::Tunnel { src: H2, vni: 999 },
            frame(a, b, 100),
            UnknownVni,
            vec![],
        ),
        (
            "x→a",
            from_x,
            frame(a, x, 100),
            Forward,
            vec![Egress::Port(pa)],
        ),
        (
            "x broadcasts: a only",
            from_x,
            frame(BCAST, x, 60),
            Forward,
            vec![Egress::Port(pa)],
        ),
        (
            "x→a from a MAC behind x: learned",
            from_x,
            frame(a, STRANGER, 100),
            Forward,
            vec![Egress::Port(pa)],
        ),
        ("x→d: no link", from_x, frame(d, x, 100), NoLink, vec![]),
    ];
    let mut out = Vec::with_capacity(8);
    for (what, ingress, bytes, verdict, outputs) in table {
        let v = f.sw.process(ingress, &bytes, 1_000, &mut out);
        assert_eq!((v, &out), (verdict, &outputs), "{what}");
    }
    let s = f.sw.stats("blue").unwrap();
    assert_eq!(s.learned_macs, 1);
    assert_eq!(s.drops["spoofed"], 5);
    assert_eq!(s.drops["no_link"], 5);
    assert_eq!(s.drops["not_member"], 1);
    assert_eq!(f.sw.host_drops()["unknown_vni"], 1);
    assert_eq!(f.sw.host_drops()["port_down"], 1);
    // Edges count sends where the sender is policed: local a/d and external x.
    let edge = |from: &str, to: &str| {
        s.edges
            .iter()
            .find(|e| e.from == from && e.to == to)
            .map(|e| e.packets)
    };
    assert_eq!(edge("a", "b"), Some(4)); // unicast ×2 (one at max size), broadcast, unknown unicast
    assert_eq!(edge("x", "a"), Some(3));
    assert_eq!(edge("b", "a"), None, "b is policed and counted on h2");
}

#[test]
fn a_learned_mac_is_a_member_and_moves_with_its_vtep_only() {
    let mut f = fixture(SPEC);
    let mut out = Vec::new();
    let a = mac(&f, "a");
    let from_x = Ingress::Tunnel { src: X, vni: VNI };
    assert_eq!(
        f.sw.process(from_x, &frame(a, STRANGER, 64), 0, &mut out),
        Verdict::Forward
    );
    // Replies to the learned MAC go to x.
    assert_eq!(
        f.sw.process(Ingress::Port(f.pa), &frame(STRANGER, a, 64), 0, &mut out),
        Verdict::Forward
    );
    assert_eq!(out, vec![TO_X]);
    // h2 cannot claim it.
    let from_h2 = Ingress::Tunnel { src: H2, vni: VNI };
    assert_eq!(
        f.sw.process(from_h2, &frame(a, STRANGER, 64), 0, &mut out),
        Verdict::Spoofed
    );
}

/// The `i`th MAC behind external x in the learning tests.
fn learned_mac(i: u32) -> EthernetAddress {
    let b = i.to_be_bytes();
    EthernetAddress([0x02, 0x77, b[0], b[1], b[2], b[3]])
}

#[test]
fn learning_is_bounded() {
    let mut f = fixture(SPEC);
    let mut out = Vec::new();
    let a = mac(&f, "a");
    let from_x = Ingress::Tunnel { src: X, vni: VNI };
    for i in 0..(MAX_LEARNED as u32 + 10) {
        f.sw.process(from_x, &frame(a, learned_mac(i), 64), 0, &mut out);
    }
    let s = f.sw.stats("blue").unwrap();
    assert_eq!(s.learned_macs, MAX_LEARNED);
    assert_eq!(s.drops["spoofed"], 10);
}

#[test]
fn learned_macs_idle_for_the_ageing_time_make_room() {
    let mut f = fixture(SPEC);
    let mut out = Vec::new();
    let a = mac(&f, "a");
    let from_x = Ingress::Tunnel { src: X, vni: VNI };
    let learned = learned_mac;
    for i in 0..MAX_LEARNED as u32 {
        f.sw.process(from_x, &frame(a, learned(i), 64), 0, &mut out);
    }
    let newcomer = EthernetAddress([0x02, 0x88, 0, 0, 0, 1]);
    // Full, and nobody idle long enough yet.
    assert_eq!(
        f.sw.process(
            from_x,
            &frame(a, newcomer, 64),
            LEARNED_AGE_NS - 1,
            &mut out
        ),
        Verdict::Spoofed
    );
    // learned(0) speaks again; later, the newcomer takes an idle entry's place.
    let later = LEARNED_AGE_NS + 1;
    assert_eq!(
        f.sw.process(from_x, &frame(a, learned(0), 64), later, &mut out),
        Verdict::Forward
    );
    assert_eq!(
        f.sw.process(from_x, &frame(a, newcomer, 64), later, &mut out),
        Verdict::Forward
    );
    assert_eq!(f.sw.stats("blue").unwrap().learned_macs, MAX_LEARNED);
    // Both are reachable: replies to them go to x.
    for m in [learned(0), newcomer] {
        assert_eq!(
            f.sw.process(Ingress::Port(f.pa), &frame(m, a, 64), later, &mut out),
            Verdict::Forward
        );
        assert_eq!(out, vec![TO_X]);
    }
    // Exactly one of the idle ones was forgotten: frames to it are flooded (unknown
    // unicast), not sent to x alone.
    let to_x = vec![TO_X];
    let forgotten = (1..MAX_LEARNED as u32)
        .filter(|i| {
            f.sw.process(
                Ingress::Port(f.pa),
                &frame(learned(*i), a, 64),
                later,
                &mut out,
            );
            out != to_x
        })
        .count();
    assert_eq!(forgotten, 1);
}

#[test]
fn a_learned_mac_moves_to_another_external_vtep_at_once() {
    const Y: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 51);
    let text = SPEC.to_string()
        + "[[external]]\nname = \"y\"\nunderlay = \"172.31.0.51\"\nmac = \"02:aa:00:00:00:51\"\n\
           [[link]]\nbetween = [\"a\", \"y\"]\n";
    let mut f = fixture(&text);
    let mut out = Vec::new();
    let a = mac(&f, "a");
    let (from_x, from_y) = (
        Ingress::Tunnel { src: X, vni: VNI },
        Ingress::Tunnel { src: Y, vni: VNI },
    );
    assert_eq!(
        f.sw.process(from_x, &frame(a, STRANGER, 64), 0, &mut out),
        Verdict::Forward
    );
    // The machine behind x moved behind y: its next frame from there moves it.
    assert_eq!(
        f.sw.process(from_y, &frame(a, STRANGER, 64), 1, &mut out),
        Verdict::Forward
    );
    f.sw.process(Ingress::Port(f.pa), &frame(STRANGER, a, 64), 2, &mut out);
    assert_eq!(
        out,
        vec![Egress::Tunnel {
            dst: Y,
            vni: VNI,
            peer: false
        }]
    );
    assert_eq!(f.sw.stats("blue").unwrap().learned_macs, 1);
    // A guest host still cannot claim it, nor can a VTEP claim a configured member.
    let from_h2 = Ingress::Tunnel { src: H2, vni: VNI };
    assert_eq!(
        f.sw.process(from_h2, &frame(a, STRANGER, 64), 3, &mut out),
        Verdict::Spoofed
    );
    let b = mac(&f, "b");
    assert_eq!(
        f.sw.process(from_y, &frame(a, b, 64), 4, &mut out),
        Verdict::Spoofed
    );
}

/// Switches `fr` from port `p` at `now`: true when it left at once (not queued).
fn sent_now(f: &mut Fixture, p: PortId, fr: &[u8], now: u64, out: &mut Vec<Egress>) -> bool {
    f.sw.process(Ingress::Port(p), fr, now, out) == Verdict::Forward && !out.is_empty()
}

/// Releases what capped links queued, on the deadlines the switch gives, up to `until`:
/// (output, frame length, when) for each frame released.
fn release_until(f: &mut Fixture, mut now: u64, until: u64) -> Vec<(Egress, usize, u64)> {
    let mut got = Vec::new();
    while let Some(at) = f.sw.next_release(now) {
        if at > until {
            break;
        }
        now = at;
        f.sw.release(now, |e, fr, _| {
            got.push((e, fr.len(), now));
            Ok(())
        });
    }
    got
}

#[test]
fn a_capped_link_shapes_per_direction_with_time_passed_in() {
    let mut f = fixture(SPEC);
    let mut out = Vec::new();
    let (a, b) = (mac(&f, "a"), mac(&f, "b"));
    let rate = 6_250_000u64; // 50 Mbit/s
    let burst = spec::Rate::default_burst(rate);
    let fr = frame(b, a, 1000);
    let pa = f.pa;
    let (mut now_sent, mut forwarded) = (0u64, 0u64);
    for _ in 0..1000 {
        let sent = sent_now(&mut f, pa, &fr, 0, &mut out);
        now_sent += u64::from(sent);
        if !f
            .sw
            .stats("blue")
            .unwrap()
            .drops
            .contains_key("policed_link")
        {
            forwarded += 1;
        }
    }
    // The bucket's burst goes at once (the frame that crosses it into debt too)...
    assert_eq!(now_sent, burst.div_ceil(1000));
    // ...then the queue takes 20 ms at the rate (at least two super-frames), and only
    // what does not fit is dropped.
    let limit = super::super::shape::LinkShaper::limit_for(
        &f.spec.links.as_ref().unwrap()[0].rate.unwrap(),
    );
    let queued = (limit / 1000) as u64;
    assert_eq!(forwarded, now_sent + queued);
    let s = f.sw.stats("blue").unwrap();
    assert_eq!(s.drops["policed_link"], 1000 - now_sent - queued);
    // a→d has no rate: unaffected, even while a→b is backed up.
    let d = mac(&f, "d");
    assert!(sent_now(&mut f, pa, &frame(d, a, 1000), 0, &mut out));
    // The queue drains in order at 6.25 MB/s, to b's host.
    let got = release_until(&mut f, 0, 1_000_000_000);
    assert_eq!(got.len() as u64, queued);
    assert!(got.iter().all(|(e, n, _)| *e == TO_H2 && *n == 1000));
    let last = got.last().unwrap().2;
    let want = (queued * 1000 - 1) * 1_000_000_000 / rate; // after the burst's debt
    assert!(
        last.abs_diff(want) < 1_000_000,
        "drained at {last} ns, not ~{want}"
    );
    assert_eq!(f.sw.next_release(last), None);
    // The edge counts frames as they leave: the burst, then each release.
    let s = f.sw.stats("blue").unwrap();
    let ab = s
        .edges
        .iter()
        .find(|e| e.from == "a" && e.to == "b")
        .unwrap();
    assert_eq!(ab.packets, now_sent + queued);
    // b→a arrives from h2 and is not capped here (h2 did it).
    let from_h2 = Ingress::Tunnel { src: H2, vni: VNI };
    for _ in 0..1000 {
        f.sw.process(from_h2, &frame(a, b, 1000), 10_000_000, &mut out);
        assert_eq!(out, vec![Egress::Port(pa)]);
    }
}

#[test]
fn a_guest_over_its_cap_is_held_back_not_dropped() {
    let text = SPEC.replace(
        "ip = \"10.0.0.1/24\"",
        "ip = \"10.0.0.1/24\"\nrate = \"8mbit\"\nburst = \"10kb\"",
    );
    let mut f = fixture(&text);
    let mut out = Vec::new();
    let (a, d) = (mac(&f, "a"), mac(&f, "d"));
    let x = mac(&f, "x");
    let pa = f.pa;
    // The worker reads a guest only within its allowance: its 10 KiB of tokens, and
    // into debt by up to the bucket's depth in one read (a ring read a batch at a time).
    assert_eq!(
        f.sw.allowance(pa, 0),
        Allowance::Upto {
            frames: i64::MAX as u64,
            bytes: 2 * 10_240
        }
    );
    let mut sent = 0;
    for i in 0.. {
        let Allowance::Upto { .. } = f.sw.allowance(pa, 0) else {
            break;
        };
        let dst = if i % 2 == 0 { d } else { x };
        assert!(sent_now(&mut f, pa, &frame(dst, a, 1000), 0, &mut out));
        sent += 1;
    }
    assert_eq!(sent, 11);
    // 760 bytes owed at 1 MB/s: held until 761 µs, then readable again.
    assert_eq!(f.sw.allowance(pa, 0), Allowance::HeldUntil(761_000));
    assert!(matches!(
        f.sw.allowance(pa, 761_000),
        Allowance::Upto { bytes: 10_241, .. }
    ));
    assert!(
        f.sw.stats("blue").unwrap().drops.is_empty(),
        "nothing dropped"
    );
    // An unlimited guest is free.
    assert_eq!(f.sw.allowance(f.pd, 0), Allowance::Free);
}

#[test]
fn no_link_table_means_every_pair_talks() {
    let text: String = SPEC.split("[[link]]").next().unwrap().to_string()
        + "[[external]]\nname = \"x\"\nunderlay = \"172.31.0.50\"\nmac = \"02:aa:00:00:00:50\"\n";
    let mut f = fixture(&text);
    let mut out = Vec::new();
    let (a, c) = (mac(&f, "a"), mac(&f, "c"));
    assert_eq!(
        f.sw.process(Ingress::Port(f.pa), &frame(c, a, 100), 0, &mut out),
        Verdict::Forward
    );
    // Broadcast from d: a locally, b and c share one copy to h2, x.
    assert_eq!(
        f.sw.process(
            Ingress::Port(f.pd),
            &frame(BCAST, mac(&f, "d"), 60),
            0,
            &mut out
        ),
        Verdict::Forward
    );
    assert_eq!(out, vec![Egress::Port(f.pa), TO_H2, TO_X]);
}

#[test]
fn two_violins_with_the_same_addresses_stay_apart() {
    let mut f = fixture(SPEC);
    let red = spec::parse(
        &SPEC
            .replace("blue", "red")
            .replace("vni = 101", "vni = 102"),
        &hosts(),
    )
    .unwrap();
    let red_ports = f.sw.add_violin(&red, "h1", 0).unwrap();
    assert!(red_ports.iter().all(|(_, p)| *p != f.pa && *p != f.pd));
    let red_a = red_ports[0].1;
    let mut out = Vec::new();
    // blue a's frame to red b's MAC is unknown unicast in blue: flooded within blue only.
    let red_b = red.members[1].mac.0;
    assert_ne!(red_b, mac(&f, "b"), "MACs derive from the VNI");
    f.sw.process(
        Ingress::Port(f.pa),
        &frame(red_b, mac(&f, "a"), 60),
        0,
        &mut out,
    );
    assert!(
        out.iter().all(|e| match e {
            Egress::Port(p) => *p == f.pd,
            Egress::Tunnel { vni, .. } => *vni == VNI,
        }),
        "{out:?}"
    );
    // red a may not send with blue a's MAC (nor anything but its own).
    assert_eq!(
        f.sw.process(
            Ingress::Port(red_a),
            &frame(BCAST, mac(&f, "a"), 60),
            0,
            &mut out
        ),
        Verdict::Spoofed
    );
    // Same names, other VNI: frames tunnelled with VNI 102 reach red's ports only.
    let from_h2 = Ingress::Tunnel { src: H2, vni: 102 };
    f.sw.process(from_h2, &frame(BCAST, red_b, 60), 0, &mut out);
    assert_eq!(out, vec![Egress::Port(red_a)]);
    // Errors: same name or VNI twice.
    assert!(matches!(
        f.sw.add_violin(&red, "h1", 0),
        Err(AddError::NameTaken(_))
    ));
    let mut again = red.clone();
    again.name = "green".into();
    assert!(matches!(
        f.sw.add_violin(&again, "h1", 0),
        Err(AddError::VniTaken { vni: 102, .. })
    ));
    // Removing frees the ports and the VNI.
    assert!(f.sw.remove_violin("red").is_some());
    assert_eq!(
        f.sw.process(
            Ingress::Port(red_a),
            &frame(BCAST, red.members[0].mac.0, 60),
            0,
            &mut out
        ),
        Verdict::PortDown
    );
    assert_eq!(
        f.sw.process(from_h2, &frame(BCAST, red_b, 60), 0, &mut out),
        Verdict::UnknownVni
    );
    assert!(f.sw.add_violin(&again, "h1", 0).is_ok());
}

#[test]
fn update_keeps_unchanged_ports_and_follows_a_move() {
    let mut f = fixture(SPEC);
    let mut out = Vec::new();
    let (a, b, d) = (mac(&f, "a"), mac(&f, "b"), mac(&f, "d"));
    assert_eq!(
        f.sw.process(Ingress::Port(f.pa), &frame(d, a, 100), 0, &mut out),
        Verdict::Forward
    );
    // d moves h1 → h2; a new guest e joins on h1; the a–b rate changes.
    let moved = SPEC
        .replace(
            "name = \"d\"\nhost = \"h1\"",
            "name = \"d\"\nhost = \"h2\"",
        )
        .replace("rate = \"50mbit\"", "rate = \"10mbit\"")
        + "[[guest]]\nname = \"e\"\nhost = \"h1\"\nip = \"10.0.0.5/24\"\n[[link]]\nbetween = [\"a\", \"e\"]\n";
    let spec2 = spec::parse(&moved, &hosts()).unwrap();
    let up = f.sw.update_violin(&spec2, "h1", 1).unwrap();
    assert_eq!(up.kept, vec![(0, f.pa)], "a keeps its port");
    assert_eq!(up.removed, vec![f.pd], "d left this host");
    assert_eq!(up.added.len(), 1);
    let (ei, pe) = up.added[0];
    assert_eq!(spec2.members[ei].name, "e");
    // a → d now goes to h2; d's old port is gone.
    f.sw.process(Ingress::Port(f.pa), &frame(d, a, 100), 1, &mut out);
    assert_eq!(out, vec![TO_H2]);
    assert_eq!(
        f.sw.process(Ingress::Port(f.pd), &frame(a, d, 100), 1, &mut out),
        Verdict::PortDown
    );
    // d's frames are now accepted from h2, and e reaches a.
    let from_h2 = Ingress::Tunnel { src: H2, vni: VNI };
    f.sw.process(from_h2, &frame(a, d, 100), 1, &mut out);
    assert_eq!(out, vec![Egress::Port(f.pa)]);
    let e = spec2.members[ei].mac.0;
    f.sw.process(Ingress::Port(pe), &frame(a, e, 100), 1, &mut out);
    assert_eq!(out, vec![Egress::Port(f.pa)]);
    // Edge counters carried over by name: a→d counted twice (before and after).
    let s = f.sw.stats("blue").unwrap();
    let ad = s
        .edges
        .iter()
        .find(|x| x.from == "a" && x.to == "d")
        .unwrap();
    assert_eq!((ad.packets, ad.bytes), (2, 200));
    // The a→b bucket is new, at 10 Mbit/s: its default burst goes at once, then the
    // rest waits.
    let burst = spec::Rate::default_burst(1_250_000);
    let pa = f.pa;
    let passed = (0..100)
        .filter(|_| sent_now(&mut f, pa, &frame(b, a, 1000), 1, &mut out))
        .count();
    assert_eq!(passed as u64, burst.div_ceil(1000));
}

#[test]
fn update_keeps_bucket_state_when_the_rate_is_unchanged() {
    let mut f = fixture(SPEC);
    let mut out = Vec::new();
    let (a, b) = (mac(&f, "a"), mac(&f, "b"));
    let drain = |f: &mut Fixture, out: &mut Vec<Egress>| {
        let pa = f.pa;
        (0..1000)
            .filter(|_| sent_now(f, pa, &frame(b, a, 1000), 0, out))
            .count()
    };
    assert!(drain(&mut f, &mut out) > 0);
    assert!(f.sw.next_release(0).is_some(), "a→b backed up");
    // Removing link a–d changes nothing for a–b: its emptied bucket stays empty.
    let text = SPEC.replace("[[link]]\nbetween = [\"a\", \"d\"]\n", "");
    let spec2 = spec::parse(&text, &hosts()).unwrap();
    let up = f.sw.update_violin(&spec2, "h1", 0).unwrap();
    assert_eq!(up.kept.len(), 2);
    assert!(up.added.is_empty() && up.removed.is_empty());
    assert_eq!(drain(&mut f, &mut out), 0, "no fresh burst from an apply");
    // What the link queued before the apply is still released, in order.
    let got = release_until(&mut f, 0, 1_000_000_000);
    assert!(got.len() > 100, "{} released", got.len());
    assert!(!f.sw.stats("blue").unwrap().drops.contains_key("no_link"));
    let d = mac(&f, "d");
    assert_eq!(
        f.sw.process(Ingress::Port(f.pa), &frame(d, a, 100), 0, &mut out),
        Verdict::NoLink
    );
}

#[test]
fn update_rejects_a_vni_change_and_changes_nothing() {
    let mut f = fixture(SPEC);
    let text = SPEC.replace("vni = 101", "vni = 102");
    let spec2 = spec::parse(&text, &hosts()).unwrap();
    assert_eq!(
        f.sw.update_violin(&spec2, "h1", 0),
        Err(AddError::VniChange { from: 101, to: 102 })
    );
    let mut out = Vec::new();
    let (a, d) = (mac(&f, "a"), mac(&f, "d"));
    f.sw.process(Ingress::Port(f.pa), &frame(d, a, 100), 0, &mut out);
    assert_eq!(out, vec![Egress::Port(f.pd)]);
}

/// An IPv4 packet (20-byte header, valid checksum) from `src` with 8 bytes of payload.
fn ipv4_from(src: Ipv4Addr) -> Vec<u8> {
    use violin_common::wire::{IpProtocol, Ipv4Packet, Ipv4Repr};
    let mut b = vec![0u8; 28];
    Ipv4Repr {
        src_addr: src,
        dst_addr: Ipv4Addr::new(10, 0, 0, 4),
        protocol: IpProtocol::UDP,
        payload_len: 8,
        hop_limit: 64,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut b[..]));
    b
}

/// An ARP request from hardware address `sha` claiming `spa`.
fn arp_from(sha: EthernetAddress, spa: Ipv4Addr) -> Vec<u8> {
    use violin_common::wire::{ArpOperation, ArpPacket, ArpRepr};
    let mut b = vec![0u8; 28];
    ArpRepr {
        operation: ArpOperation::Request,
        source_hardware_addr: sha,
        source_protocol_addr: spa,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: Ipv4Addr::new(10, 0, 0, 4),
    }
    .emit(&mut ArpPacket::new_unchecked(&mut b[..]));
    b
}

#[test]
fn the_source_guard_holds_a_guest_to_its_own_addresses() {
    let text = SPEC.replacen(
        "ip = \"10.0.0.4/24\"",
        "ip = \"10.0.0.4/24\"\nallowed_ips = [\"192.168.0.0/16\"]",
        1,
    );
    let mut f = fixture(&text);
    let (pa, pd) = (f.pa, f.pd);
    let [a, b, d] = ["a", "b", "d"].map(|n| mac(&f, n));
    let from_h2 = Ingress::Tunnel { src: H2, vni: VNI };
    let ip = |x: u8| Ipv4Addr::new(10, 0, 0, x);
    let mut tagged = vec![0x00, 0x05, 0x08, 0x00]; // VLAN 5, then IPv4
    tagged.extend(ipv4_from(ip(4)));
    let v4 = EtherType::IPV4;
    use Verdict::*;
    type Row = (&'static str, Ingress, Vec<u8>, Verdict);
    let table: Vec<Row> = vec![
        (
            "a: IPv4 from its own address",
            Ingress::Port(pa),
            typed(d, a, v4, &ipv4_from(ip(1))),
            Forward,
        ),
        (
            "a: IPv4 from d's address",
            Ingress::Port(pa),
            typed(d, a, v4, &ipv4_from(ip(4))),
            SpoofedIp,
        ),
        (
            "a: IPv4 from an outside address",
            Ingress::Port(pa),
            typed(d, a, v4, &ipv4_from(Ipv4Addr::new(8, 8, 8, 8))),
            SpoofedIp,
        ),
        (
            "a: IPv4 from d's address under a VLAN tag",
            Ingress::Port(pa),
            typed(d, a, EtherType::VLAN, &tagged),
            SpoofedIp,
        ),
        (
            "a: a truncated IPv4 header",
            Ingress::Port(pa),
            typed(d, a, v4, &[0x45, 0, 0, 20]),
            Truncated,
        ),
        (
            "a: ARP claiming its own address",
            Ingress::Port(pa),
            typed(BCAST, a, EtherType::ARP, &arp_from(a, ip(1))),
            Forward,
        ),
        (
            "a: an ARP probe (claims nothing)",
            Ingress::Port(pa),
            typed(
                BCAST,
                a,
                EtherType::ARP,
                &arp_from(a, Ipv4Addr::UNSPECIFIED),
            ),
            Forward,
        ),
        (
            "a: ARP claiming d's address",
            Ingress::Port(pa),
            typed(BCAST, a, EtherType::ARP, &arp_from(a, ip(4))),
            SpoofedArp,
        ),
        (
            "a: ARP with another hardware address",
            Ingress::Port(pa),
            typed(BCAST, a, EtherType::ARP, &arp_from(b, ip(1))),
            SpoofedArp,
        ),
        (
            "d: IPv4 from its allowed_ips",
            Ingress::Port(pd),
            typed(a, d, v4, &ipv4_from(Ipv4Addr::new(192, 168, 3, 3))),
            Forward,
        ),
        (
            "d: IPv4 from outside its allowed_ips",
            Ingress::Port(pd),
            typed(a, d, v4, &ipv4_from(Ipv4Addr::new(172, 16, 0, 1))),
            SpoofedIp,
        ),
        (
            "d: ARP claiming an allowed address",
            Ingress::Port(pd),
            typed(
                BCAST,
                d,
                EtherType::ARP,
                &arp_from(d, Ipv4Addr::new(192, 168, 0, 1)),
            ),
            Forward,
        ),
        // Guests on other hosts are guarded where they live.
        (
            "b via h2: IPv4 from any address",
            from_h2,
            typed(a, b, v4, &ipv4_from(ip(9))),
            Forward,
        ),
    ];
    let mut out = Vec::with_capacity(8);
    for (what, ingress, bytes, verdict) in table {
        let v = f.sw.process(ingress, &bytes, 1_000, &mut out);
        assert_eq!(v, verdict, "{what}");
    }
    let s = f.sw.stats("blue").unwrap();
    assert_eq!((s.drops["spoofed_ip"], s.drops["spoofed_arp"]), (4, 2));
}

/// A Violin of `n` guests on h1 and no link table (every pair may talk).
fn many(n: usize) -> (Switch, Vec<(PortId, EthernetAddress)>) {
    let mut text = String::from("name = \"many\"\nvni = 77\n");
    for i in 0..n {
        text += &format!(
            "[[guest]]\nname = \"g{i}\"\nhost = \"h1\"\nip = \"10.{}.{}.1/8\"\n",
            i / 250,
            i % 250 + 1
        );
    }
    let spec = spec::parse(&text, &hosts()).unwrap();
    let mut sw = Switch::new();
    let ports = sw.add_violin(&spec, "h1", 0).unwrap();
    let guests = (0..n)
        .map(|i| (ports[i].1, spec.members[i].mac.0))
        .collect();
    (sw, guests)
}

#[test]
fn every_pair_that_talks_is_counted_as_the_pair_table_grows_between_batches() {
    let n = 120; // 14 280 pairs against room for 4 × 120 at the start
    let (mut sw, g) = many(n);
    let mut out = Vec::new();
    for (s, &(ps, ms)) in g.iter().enumerate() {
        for (d, &(_, md)) in g.iter().enumerate() {
            if s != d {
                out.clear();
                let v = sw.process(Ingress::Port(ps), &frame(md, ms, 60), 0, &mut out);
                assert_eq!(v, Verdict::Forward);
            }
        }
        // What the worker does between batches.
        sw.make_room();
    }
    let st = sw.stats("many").unwrap();
    assert_eq!(st.unrecorded_packets, 0);
    assert_eq!(st.edges.len(), n * (n - 1));
    assert!(st.edges.iter().all(|e| e.packets == 1 && e.bytes == 60));
}

#[test]
fn pairs_beyond_the_room_of_one_batch_are_counted_as_unrecorded_not_lost() {
    let n = 60;
    let (mut sw, g) = many(n);
    let mut out = Vec::new();
    let mut sent = 0;
    for &(ps, ms) in &g {
        for &(pd, md) in &g {
            if ps != pd {
                out.clear();
                sw.process(Ingress::Port(ps), &frame(md, ms, 60), 0, &mut out);
                sent += 1;
            }
        }
    }
    let st = sw.stats("many").unwrap();
    let counted: u64 = st.edges.iter().map(|e| e.packets).sum();
    assert!(st.unrecorded_packets > 0, "no room was ever made");
    assert_eq!(counted + st.unrecorded_packets, sent);
    // Once room is made, new pairs are counted again.
    sw.make_room();
    out.clear();
    sw.process(
        Ingress::Port(g[0].0),
        &frame(g[1].1, g[0].1, 60),
        0,
        &mut out,
    );
    let after = sw.stats("many").unwrap();
    assert_eq!(after.unrecorded_packets, st.unrecorded_packets);
}

#[test]
fn a_violin_moves_to_another_switch_whole_with_its_ports_renumbered() {
    let mut f = fixture(SPEC);
    let mut out = Vec::new();
    let (a, b, d) = (mac(&f, "a"), mac(&f, "b"), mac(&f, "d"));
    let pa = f.pa;
    // Traffic before: counters, a full queue on the capped a→b link, a drop.
    for _ in 0..1000 {
        f.sw.process(Ingress::Port(pa), &frame(b, a, 1000), 0, &mut out);
    }
    f.sw.charge(f.sw.slot_of_vni(VNI).unwrap(), 12_345);
    let before = f.sw.stats("blue").unwrap();
    assert!(before.queued_frames > 0 && before.drops["policed_link"] > 0);
    // The other switch already numbered ports of a Violin of its own.
    let mut other = Switch::new();
    let red = spec::parse(&SPEC.replace("blue", "red").replace("101", "102"), &hosts()).unwrap();
    let red_ports = other.add_violin(&red, "h1", 0).unwrap();
    let (moving, freed) = f.sw.take_violin("blue").unwrap();
    assert_eq!(
        freed,
        vec![(0, f.pa), (3, f.pd)],
        "a and d, by member index"
    );
    assert!(f.sw.stats("blue").is_none() && f.sw.slot_of_vni(VNI).is_none());
    assert_eq!(
        f.sw.process(
            Ingress::Tunnel { src: H2, vni: VNI },
            &frame(a, b, 64),
            1,
            &mut out
        ),
        Verdict::UnknownVni,
        "gone from the first switch"
    );
    let ports = other.put_violin(moving).map_err(|(e, _)| e).unwrap();
    let (na, nd) = (ports[0].1, ports[1].1);
    assert_eq!((ports[0].0, ports[1].0), (0, 3));
    assert!(
        red_ports.iter().all(|(_, p)| *p != na && *p != nd),
        "fresh ports"
    );
    // Everything came along: counters, drops, worker time, the queue.
    let after = other.stats("blue").unwrap();
    assert_eq!(after, before);
    assert_eq!(after.busy_ns, 12_345);
    // The queue drains from the new switch, to b's host.
    let got = {
        let mut f2 = Fixture {
            sw: other,
            spec: f.spec.clone(),
            pa: na,
            pd: nd,
        };
        let got = release_until(&mut f2, 0, 1_000_000_000);
        other = f2.sw;
        got
    };
    assert_eq!(got.len() as u64, before.queued_frames);
    assert!(got.iter().all(|(e, _, _)| *e == TO_H2));
    // Frames switch between the new ports; the red Violin's are untouched.
    other.process(Ingress::Port(na), &frame(d, a, 64), 0, &mut out);
    assert_eq!(out, vec![Egress::Port(nd)]);
    other.process(
        Ingress::Tunnel { src: H2, vni: VNI },
        &frame(a, b, 64),
        0,
        &mut out,
    );
    assert_eq!(out, vec![Egress::Port(na)]);
    let red_mac = |n: &str| red.members[red.member(n).unwrap()].mac.0;
    let (ra, rd) = (red_mac("a"), red_mac("d"));
    other.process(
        Ingress::Port(red_ports[0].1),
        &frame(rd, ra, 64),
        0,
        &mut out,
    );
    assert_eq!(out, vec![Egress::Port(red_ports[1].1)]);
    // A switch that has a Violin of the same name or VNI hands it back.
    let (moving, _) = other.take_violin("blue").unwrap();
    let mut third = Switch::new();
    third.add_violin(&f.spec, "h1", 0).unwrap();
    let (e, back) = third.put_violin(moving).map(|_| ()).unwrap_err();
    assert_eq!(e, AddError::NameTaken("blue".into()));
    assert_eq!(back.vni(), VNI);
}
