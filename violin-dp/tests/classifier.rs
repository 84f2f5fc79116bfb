//! The XDP classifier as a fixture table through BPF_PROG_TEST_RUN (`Xdp::test_run`):
//! each input packet with its expected action and verdict counter. Needs root (loading
//! BPF); no traffic is sent anywhere.

mod common;

use aya::programs::{TestRun, TestRunOptions};
use std::net::Ipv4Addr;
use violin_common::wire::*;
use violin_common::Verdict;
use violin_dp::xdp::classifier::{read_object, Classifier};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const MEMBER: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 99);
const ME: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);

fn eth(ethertype: EtherType, payload: &[u8]) -> Vec<u8> {
    common::packets::eth([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1], ethertype, payload)
}

fn ipv4(src: Ipv4Addr, protocol: IpProtocol, payload: &[u8]) -> Vec<u8> {
    common::packets::ipv4(src, ME, protocol, payload)
}

fn udp(dst_port: u16, payload: &[u8]) -> Vec<u8> {
    common::packets::udp(49152, dst_port, payload)
}

fn vxlan(vni: u32) -> Vec<u8> {
    common::packets::vxlan(vni, &eth(EtherType::IPV4, &[0u8; 46])) // the inner frame
}

fn tunnelled(src: Ipv4Addr, vni: u32) -> Vec<u8> {
    eth(
        EtherType::IPV4,
        &ipv4(src, IpProtocol::UDP, &udp(4789, &vxlan(vni))),
    )
}

#[test]
fn classifier_fixture_table() {
    if !common::can_run() {
        return;
    }
    let ns = format!("tcls{}", std::process::id());
    let _guard = violin_dp::host::netns::NetnsGuard::create(&ns).unwrap();
    // Everything below runs inside the throwaway namespace (the veth and socket live there).
    violin_dp::host::netns::run_in(&ns, || {
        run_table();
        Ok(())
    })
    .unwrap();
}

/// The classifier loaded in the current namespace, VNI 101 (slot 0, a real AF_XDP
/// socket) and 102 (slot 1, no socket) from `MEMBER`, on a veth `xa` with 2 rx queues.
struct Loaded {
    cls: Classifier,
    // The socket goes before its UMEM (fields drop in order).
    _socket: (
        xsk_rs::TxQueue,
        xsk_rs::RxQueue,
        Option<(xsk_rs::FillQueue, xsk_rs::CompQueue)>,
    ),
    _umem: xsk_rs::Umem,
}

fn load() -> Loaded {
    use violin_dp::host::netlink;
    netlink::with_handle(|h| async move {
        // Two rx queues: the daemon serves queue 0 only (see the end of the table).
        netlink::add_veth_queues(&h, "xa", "xb", 2).await?;
        netlink::set_up(&h, "xa").await?;
        netlink::set_up(&h, "xb").await
    })
    .unwrap();
    let obj = read_object().unwrap();
    let mut cls = Classifier::load(&obj, 4789, 1).unwrap();
    cls.add_vni(101, 0, &[MEMBER], 9018).unwrap();
    cls.add_vni(102, 1, &[MEMBER], 9018).unwrap(); // slot 1 has no socket
    cls.add_vni(103, 0, &[MEMBER], 1518).unwrap(); // a Violin of MTU 1500
                                                   // A real AF_XDP socket in slot 0, as the daemon would put there.
    let (umem, _descs) = xsk_rs::Umem::new(
        xsk_rs::config::UmemConfig::default(),
        64.try_into().unwrap(),
        false,
    )
    .unwrap();
    let cfg = xsk_rs::config::SocketConfig::builder()
        .libxdp_flags(xsk_rs::config::LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(xsk_rs::config::BindFlags::XDP_COPY)
        .build();
    // SAFETY: a fresh, unshared UMEM; the socket is dropped before the UMEM.
    let socket = unsafe { xsk_rs::Socket::new(cfg, &umem, &"xa".parse().unwrap(), 0) }.unwrap();
    cls.set_socket(0, socket.1.fd()).unwrap();
    Loaded {
        cls,
        _socket: socket,
        _umem: umem,
    }
}

/// Runs the program on `pkt`: its action and the one verdict it counted.
fn run(cls: &mut Classifier, pkt: &[u8]) -> (u32, Vec<Verdict>) {
    let before = cls.verdicts();
    let r = cls
        .program()
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|e| panic!("test_run failed on {pkt:02x?}: {e}"));
    let after = cls.verdicts();
    let moved = Verdict::ALL
        .iter()
        .copied()
        .filter(|v| after[*v as usize] != before[*v as usize])
        .collect();
    (r.return_value, moved)
}

fn run_table() {
    use violin_dp::host::netlink;
    let mut loaded = load();
    let cls = &mut loaded.cls;
    let good = tunnelled(MEMBER, 101);
    let mut vlan = good.clone();
    vlan[12..14].copy_from_slice(&[0x81, 0x00]);
    let mut ihl4 = good.clone();
    ihl4[14] = 0x44;
    let mut no_i_flag = good.clone();
    no_i_flag[14 + 20 + 8] = 0x00;
    let mut fragment = good.clone();
    fragment[14 + 6] = 0x20; // more fragments
    let with_options = {
        // IHL 6: a 4-byte NOP option before the UDP header.
        let mut ip = ipv4(MEMBER, IpProtocol::UDP, &udp(4789, &vxlan(101)));
        ip.splice(20..20, [1u8, 1, 1, 1]);
        ip[0] = 0x46;
        let total = ip.len() as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        eth(EtherType::IPV4, &ip)
    };
    let arp = eth(EtherType::ARP, &[0u8; 28]);
    let ipv6 = eth(EtherType::IPV6, &[0x60; 48]);
    let tcp = eth(EtherType::IPV4, &ipv4(MEMBER, IpProtocol::TCP, &[0u8; 20]));
    let dns = eth(
        EtherType::IPV4,
        &ipv4(MEMBER, IpProtocol::UDP, &udp(53, &[0u8; 12])),
    );
    use Verdict::*;
    #[rustfmt::skip]
    let table: Vec<(&str, Vec<u8>, u32, Verdict)> = vec![
        ("VXLAN to a known VNI from a member", good.clone(), XDP_REDIRECT, Forward),
        ("same, IPv4 header with options", with_options, XDP_REDIRECT, Forward),
        ("known VNI whose socket is missing", tunnelled(MEMBER, 102), XDP_DROP, Forward),
        ("unknown VNI", tunnelled(MEMBER, 999), XDP_DROP, UnknownVni),
        ("non-member outer source", tunnelled(STRANGER, 101), XDP_DROP, NotMember),
        ("VXLAN without the I flag", no_i_flag, XDP_DROP, Malformed),
        ("IPv4 IHL below 5", ihl4, XDP_DROP, Malformed),
        ("truncated in the IPv4 header", good[..14 + 12].to_vec(), XDP_DROP, Truncated),
        ("truncated in the UDP header", good[..14 + 20 + 4].to_vec(), XDP_DROP, Truncated),
        ("truncated in the VXLAN header", good[..14 + 20 + 8 + 5].to_vec(), XDP_DROP, Truncated),
        ("non-VXLAN UDP", dns, XDP_PASS, Pass),
        ("TCP", tcp, XDP_PASS, Pass),
        ("IPv4 fragment", fragment, XDP_PASS, Pass),
        ("ARP", arp, XDP_PASS, Pass),
        ("IPv6", ipv6, XDP_PASS, Pass),
        ("VLAN-tagged", vlan, XDP_PASS, Pass),
    ];
    for (what, pkt, action, verdict) in table {
        let (got, moved) = run(cls, &pkt);
        assert_eq!(got, action, "{what}: action");
        assert_eq!(moved, vec![verdict], "{what}: counters");
    }
    // The same good frame on rx queue 1 of xa, where no socket is: to the kernel (the
    // daemon's UDP socket), not into slot 0 × 1 + 1, which is another Violin's.
    let xa =
        netlink::with_handle(|h| async move { netlink::require_index(&h, "xa").await }).unwrap();
    for (queue, action, verdict) in [(0, XDP_REDIRECT, Forward), (1, XDP_PASS, OtherQueue)] {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex (test_run wants data 0 and data_end the packet's length).
        let md: Vec<u8> = [0, good.len() as u32, 0, xa, queue, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let before = cls.verdicts();
        let r = cls
            .program()
            .test_run(TestRunOptions {
                data_in: Some(&good),
                ctx_in: Some(&md),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("rx queue {queue}: test_run failed: {e}"));
        let after = cls.verdicts();
        assert_eq!(r.return_value, action, "rx queue {queue}: action");
        assert_eq!(
            after[verdict as usize],
            before[verdict as usize] + 1,
            "rx queue {queue}: {verdict:?} counted"
        );
    }
    long_frames(cls);
    // A frame shorter than an Ethernet header: the kernel refuses to run the program on
    // it (test_run needs 14 bytes), so it is checked by the Truncated rows above instead.
    cls.remove_vni(101, &[MEMBER]);
    let r = cls
        .program()
        .test_run(TestRunOptions {
            data_in: Some(&good),
            ..TestRunOptions::new()
        })
        .unwrap();
    assert_eq!(r.return_value, XDP_DROP, "a removed VNI is unknown");
}

/// A tunnelled frame to VNI `vni` from a member holding `inner`.
fn tunnelling(vni: u32, inner: &[u8]) -> Vec<u8> {
    eth(
        EtherType::IPV4,
        &ipv4(
            MEMBER,
            IpProtocol::UDP,
            &udp(4789, &common::packets::vxlan(vni, inner)),
        ),
    )
}

/// An inner IPv4 frame of `len` bytes.
fn inner_ipv4(len: usize) -> Vec<u8> {
    let ip = common::packets::ipv4(
        Ipv4Addr::new(10, 0, 0, 1),
        Ipv4Addr::new(10, 0, 0, 2),
        IpProtocol::UDP,
        &vec![0x5a; len - 34],
    );
    eth(EtherType::IPV4, &ip)
}

/// Frames longer than one AF_XDP frame on an underlay of MTU 9000 (test_run hands the
/// program those over a page long in several buffers, as veth does): one jumbo frame
/// goes to the Violin's socket when the sockets are multi-buffer; a GSO run of frames
/// (which XDP on a veth sees whole), a frame whose inner length nothing vouches for, one
/// beyond the Violin's or the underlay's largest, and any of them without multi-buffer
/// sockets, to the kernel.
fn long_frames(cls: &mut Classifier) {
    cls.set_underlay_mtu(9000).unwrap();
    cls.set_multi_buffer(true).unwrap();
    let jumbo = tunnelling(101, &inner_ipv4(8964));
    assert_eq!(jumbo.len(), 9014);
    let mid = tunnelling(101, &inner_ipv4(3000));
    let gso_run = {
        // Two VXLAN datagrams of one UDP_SEGMENT send, as XDP sees them before the
        // kernel segments them: the first one's inner frame states 1500 bytes.
        let one = common::packets::vxlan(101, &inner_ipv4(1500));
        let two = [&one[..], &one[..]].concat();
        eth(
            EtherType::IPV4,
            &ipv4(MEMBER, IpProtocol::UDP, &udp(4789, &two)),
        )
    };
    let not_ip = tunnelling(101, &eth(EtherType(0x88b5), &[0u8; 3000]));
    use Verdict::*;
    #[rustfmt::skip]
    let table: Vec<(&str, Vec<u8>, u32, Verdict)> = vec![
        ("a 9000-byte jumbo frame", jumbo.clone(), XDP_REDIRECT, Forward),
        ("a 3050-byte one (one page)", mid.clone(), XDP_REDIRECT, Forward),
        ("a small frame", tunnelled(MEMBER, 101), XDP_REDIRECT, Forward),
        ("longer than the underlay's MTU", tunnelling(101, &inner_ipv4(8965)), XDP_PASS, Jumbo),
        ("a GSO run of two frames", gso_run, XDP_PASS, Jumbo),
        ("an inner frame that is not IP", not_ip, XDP_PASS, Jumbo),
        ("beyond its Violin's largest frame", tunnelling(103, &inner_ipv4(3000)), XDP_PASS, Jumbo),
    ];
    for (what, pkt, action, verdict) in table {
        let (got, moved) = run(cls, &pkt);
        assert_eq!(got, action, "{what}: action");
        assert_eq!(moved, vec![verdict], "{what}: counters");
    }
    cls.set_multi_buffer(false).unwrap();
    for (what, pkt) in [("jumbo", &jumbo), ("3050 bytes", &mid)] {
        assert_eq!(
            run(cls, pkt),
            (XDP_PASS, vec![Jumbo]),
            "{what}, single-buffer sockets"
        );
    }
}

/// The fuzz target `outer`'s inputs (its seeds, the corpus a fuzz run left, and every
/// truncation and many one-byte changes of the seeds) through the XDP classifier and
/// the user-space parser (`tunnel::parse_outer`, what the AF_XDP path runs): the
/// classifier never drops or passes what user space would switch, and what it sends to
/// a Violin's socket user space reads as the same Violin and source, or refuses (then
/// counted as `rx_bad`).
#[test]
fn the_classifier_agrees_with_the_user_space_parser_on_the_fuzz_inputs() {
    if !common::can_run() {
        return;
    }
    let ns = format!("tdif{}", std::process::id());
    let _guard = violin_dp::host::netns::NetnsGuard::create(&ns).unwrap();
    violin_dp::host::netns::run_in(&ns, || {
        differential();
        Ok(())
    })
    .unwrap();
}

fn fuzz_inputs() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../violin-common/fuzz");
    let read = |sub: &str| -> Vec<Vec<u8>> {
        std::fs::read_dir(dir.join(sub))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read(e.path()).ok())
            .collect()
    };
    let seeds = read("seeds/outer");
    assert!(seeds.len() >= 3, "the outer seeds are missing");
    let mut all = read("corpus/outer");
    for s in &seeds {
        for n in 0..=s.len() {
            all.push(s[..n].to_vec());
        }
        for i in 0..s.len().min(64) {
            for f in [|b: u8| b ^ 0x01, |b: u8| b ^ 0x80, |_| 0x00, |_| 0xff] {
                let mut m = s.clone();
                m[i] = f(m[i]);
                all.push(m);
            }
        }
    }
    all.extend(seeds);
    all
}

fn differential() {
    use violin_common::wire::tunnel::parse_outer;
    let mut loaded = load();
    let cls = &mut loaded.cls;
    let (mut runs, mut both, mut refused_after) = (0, 0, 0);
    for pkt in fuzz_inputs() {
        // The kernel runs XDP on 14 bytes to a page's worth (less its headroom).
        if pkt.len() < 14 || pkt.len() > 3000 {
            continue;
        }
        runs += 1;
        let (action, moved) = run(cls, &pkt);
        assert_eq!(
            moved.len(),
            1,
            "one verdict per packet: {moved:?} for {pkt:02x?}"
        );
        let v = moved[0];
        let fragment = pkt.len() >= 22 && u16::from_be_bytes([pkt[20], pkt[21]]) & 0x3fff != 0;
        match parse_outer(&pkt, 4789) {
            Ok((src, vx, _)) if !fragment => {
                let vni = vx.vni;
                let want = match (src == MEMBER, vni) {
                    (true, 101) => Verdict::Forward,
                    (true, 102) => Verdict::Forward, // no socket: dropped after counting
                    (_, 101 | 102) => Verdict::NotMember,
                    _ => Verdict::UnknownVni,
                };
                assert_eq!(v, want, "user space reads ({src}, {vni}) from {pkt:02x?}");
                if vni == 101 && src == MEMBER {
                    assert_eq!(action, XDP_REDIRECT, "{pkt:02x?}");
                    both += 1;
                }
            }
            _ if v == Verdict::Forward => refused_after += 1,
            _ => {}
        }
    }
    eprintln!(
        "{runs} inputs through the classifier: {both} switched by both, \
         {refused_after} sent to a socket and refused by user space (rx_bad)"
    );
    assert!(runs >= 500 && both >= 10, "too few inputs ({runs}, {both})");
}
