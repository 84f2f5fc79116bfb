//! Split and coalesce: fixed cases, and properties over pseudo-random super-frames
//! (split then coalesce gives the super-frame back; every segment is a valid packet).

extern crate std;

use super::*;
use crate::wire::virtio::HEADER_LEN as VNET_LEN;
use std::vec::Vec;

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A TCP/IPv4 super-frame as a Linux tap hands it over: total length of the whole,
/// valid IP checksum, TCP checksum field holding the pseudo-header's sum.
fn tcp4_super(payload: &[u8], opts: &[u8], flags: u8, seq: u32, id: u16) -> Vec<u8> {
    let thl = 20 + opts.len();
    let mut f = std::vec![0u8; 14 + 20 + thl + payload.len()];
    f[0..6].copy_from_slice(&MAC_B);
    f[6..12].copy_from_slice(&MAC_A);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let total = (20 + thl + payload.len()) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f[18..20].copy_from_slice(&id.to_be_bytes());
    f[20] = 0x40; // DF
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    let c = !checksum::sum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let t = 34;
    f[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
    f[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
    f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    f[t + 8..t + 12].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    f[t + 12] = ((thl / 4) as u8) << 4;
    f[t + 13] = flags;
    f[t + 14..t + 16].copy_from_slice(&502u16.to_be_bytes());
    f[t + 20..t + thl].copy_from_slice(opts);
    f[t + thl..].copy_from_slice(payload);
    let pseudo = checksum::pseudo_header(
        core::net::Ipv4Addr::new(10, 0, 0, 1),
        core::net::Ipv4Addr::new(10, 0, 0, 2),
        6,
        (thl + payload.len()) as u16,
    );
    f[t + 16..t + 18].copy_from_slice(&pseudo.to_be_bytes());
    f
}

/// A UDP/IPv4 super-frame as a Linux tap with USO hands it over: IP and UDP lengths
/// of the whole, valid IP checksum, UDP checksum field holding the pseudo-header's sum.
fn udp4_super(payload: &[u8], id: u16) -> Vec<u8> {
    let mut f = tcp4_super(payload, &[], 0, 0, id);
    // The 12 TCP header bytes a UDP header does not have.
    f.drain(34 + 8..34 + 20);
    let total = (20 + 8 + payload.len()) as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    f[23] = 17;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = !checksum::sum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let l4 = (8 + payload.len()) as u16;
    f[38..40].copy_from_slice(&l4.to_be_bytes());
    let pseudo = checksum::pseudo_header(
        core::net::Ipv4Addr::new(10, 0, 0, 1),
        core::net::Ipv4Addr::new(10, 0, 0, 2),
        17,
        l4,
    );
    f[40..42].copy_from_slice(&pseudo.to_be_bytes());
    f
}

fn uso4(seg: u16, f: &[u8]) -> Gso {
    let v = VirtioNetRepr {
        flags: F_NEEDS_CSUM,
        gso_type: GsoType::UdpL4,
        ecn: false,
        hdr_len: 0,
        gso_size: seg,
        csum_start: 34,
        csum_offset: 6,
    };
    Gso::from_virtio(&v, f).unwrap().unwrap()
}

fn tso4(seg: u16, f: &[u8]) -> Gso {
    let v = VirtioNetRepr {
        flags: F_NEEDS_CSUM,
        gso_type: GsoType::TcpV4,
        ecn: false,
        hdr_len: 0, // senders disagree on it: never read
        gso_size: seg,
        csum_start: 34,
        csum_offset: 16,
    };
    Gso::from_virtio(&v, f).unwrap().unwrap()
}

fn segments(g: &Gso, f: &[u8]) -> Vec<Vec<u8>> {
    (0..g.segments(f.len()))
        .map(|i| {
            let mut out = std::vec![0u8; 65600];
            let n = g.write_segment(f, i, &mut out);
            out.truncate(n);
            out
        })
        .collect()
}

/// Checks `s` is a whole, valid TCP/IPv4 packet; returns (seq, flags, payload).
fn check_tcp4(s: &[u8]) -> (u32, u8, Vec<u8>) {
    let ip = &s[14..];
    assert_eq!(usize::from(get_u16(ip, 2)), ip.len(), "IPv4 total length");
    assert_eq!(checksum::sum(&ip[..20]), 0xffff, "IPv4 checksum");
    let pseudo = checksum::pseudo_header(
        core::net::Ipv4Addr::new(10, 0, 0, 1),
        core::net::Ipv4Addr::new(10, 0, 0, 2),
        6,
        (ip.len() - 20) as u16,
    );
    let t = TcpPacket::new_checked(&ip[20..]).unwrap();
    assert!(t.verify_checksum(pseudo), "TCP checksum");
    (t.seq(), t.flags(), t.payload().to_vec())
}

#[test]
fn splits_a_tcp4_super_frame() {
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let nop_ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    let f = tcp4_super(
        &payload,
        &nop_ts,
        tcp::flags::ACK | tcp::flags::PSH,
        1000,
        7,
    );
    let g = tso4(1388, &f);
    assert_eq!(g.hdr_len, 14 + 20 + 32);
    assert_eq!(g.segments(f.len()), 3);
    assert_eq!(g.wire_len(f.len()), f.len() + 2 * 66);
    assert_eq!(g.largest(f.len()), 66 + 1388);
    let segs = segments(&g, &f);
    let (s0, f0, p0) = check_tcp4(&segs[0]);
    let (s1, f1, p1) = check_tcp4(&segs[1]);
    let (s2, f2, p2) = check_tcp4(&segs[2]);
    assert_eq!((s0, s1, s2), (1000, 2388, 3776));
    // PSH only on the last; ACK on all.
    assert_eq!((f0, f1, f2), (0x10, 0x10, 0x18));
    assert_eq!((p0.len(), p1.len(), p2.len()), (1388, 1388, 224));
    assert_eq!([p0, p1, p2].concat(), payload);
    // IPv4 IDs count up from the super-frame's.
    let ids: Vec<u16> = segs.iter().map(|s| get_u16(s, 18)).collect();
    assert_eq!(ids, [7, 8, 9]);
}

/// Coalesces `segs` (the split of super-frame `f`, layout `g`) and checks what comes
/// back: one segment as it was sent (complete checksum, `None`), more as `f` itself with
/// `g`'s virtio header (returned).
fn coalesce_back(
    c: &mut Coalescer,
    buf: &mut [u8],
    segs: &[Vec<u8>],
    f: &[u8],
    g: &Gso,
    case: usize,
) -> Option<VirtioNetRepr> {
    for s in segs {
        assert_eq!(c.push(buf, s), Push::Added, "case {case}");
    }
    let (v, n) = c.finish(buf).unwrap();
    assert!(c.is_empty());
    if segs.len() == 1 {
        assert_eq!(&buf[..n], &segs[0][..], "case {case}");
        assert_eq!(v.flags, F_DATA_VALID);
        return None;
    }
    assert_eq!(
        &buf[..n],
        f,
        "case {case}: seg {}, len {}",
        g.seg_size,
        f.len()
    );
    assert_eq!(v, g.to_virtio(), "case {case}");
    Some(v)
}

#[test]
fn coalescing_gives_the_super_frame_back_property() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut buf = std::vec![0u8; 14 + 65535];
    for case in 0..400 {
        let seg = TCP_MIN_SEG + rng.below(1460 - 87) as u16;
        let max_payload = (65535 - 20 - 32).min(seg as usize * 45);
        let len = 1 + rng.below(max_payload);
        let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let opts: &[u8] = if rng.below(2) == 0 {
            &[]
        } else {
            &[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]
        };
        let seq = rng.next() as u32; // wraps across 2^32 sometimes
        let id = rng.next() as u16;
        let f = tcp4_super(&payload, opts, tcp::flags::ACK | tcp::flags::PSH, seq, id);
        let g = tso4(seg, &f);
        let segs = segments(&g, &f);
        assert_eq!(segs.len(), len.div_ceil(seg as usize), "case {case}");
        for s in &segs {
            check_tcp4(s);
        }
        let mut c = Coalescer::default();
        let Some(v) = coalesce_back(&mut c, &mut buf, &segs, &f, &g, case) else {
            continue;
        };
        assert_eq!(v.hdr_len as usize, 14 + 20 + 20 + opts.len());
    }
}

#[test]
fn coalescing_udp_gives_the_super_frame_back_property() {
    let mut rng = Rng(0x5eed_1234_abcd_0002);
    let mut buf = std::vec![0u8; 14 + 65535];
    for case in 0..400 {
        let seg = 1 + rng.below(1472) as u16;
        let max_payload = (65535 - 20 - 8).min(seg as usize * UDP_MAX_SEGS);
        let len = 1 + rng.below(max_payload);
        let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let f = udp4_super(&payload, rng.next() as u16);
        let g = uso4(seg, &f);
        let segs = segments(&g, &f);
        coalesce_back(&mut Coalescer::new(true), &mut buf, &segs, &f, &g, case);
    }
}

#[test]
fn udp_coalesces_only_where_enabled_and_by_the_rules() {
    let mut buf = std::vec![0u8; 14 + 65535];
    let f = udp4_super(&[0x33; 4000], 9);
    let segs = segments(&uso4(1000, &f), &f);
    // Off by default: every datagram goes alone.
    let mut off = Coalescer::default();
    assert_eq!(off.push(&mut buf, &segs[0]), Push::Alone);
    let mut c = Coalescer::new(true);
    assert_eq!(c.push(&mut buf, &segs[0]), Push::Added);
    // Another flow (source port; no checksum, so it stays valid) does not join.
    let mut other = segs[1].clone();
    other[34] ^= 1;
    other[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(c.push(&mut buf, &other), Push::Flush);
    // A bad checksum is never coalesced; a zero one ("none") is.
    let mut bad = segs[1].clone();
    bad[50] ^= 0xff;
    assert_eq!(c.push(&mut buf, &bad), Push::Alone);
    let mut none = segs[1].clone();
    none[40..42].copy_from_slice(&[0, 0]);
    assert_eq!(c.push(&mut buf, &none), Push::Added);
    // A TCP segment is another kind: it does not join a UDP super-frame.
    let t = tcp4_super(&[1; 1000], &[], tcp::flags::ACK, 1, 1);
    let t = segments(&tso4(1000, &t), &t);
    assert_eq!(c.push(&mut buf, &t[0]), Push::Flush);
    // A shorter datagram ends it.
    let short = segments(&uso4(1000, &f), &udp4_super(&[0x33; 500], 9));
    assert_eq!(c.push(&mut buf, &short[0]), Push::Added);
    assert_eq!(c.push(&mut buf, &segs[2]), Push::Flush);
    let (v, n) = c.finish(&mut buf).unwrap();
    assert_eq!(
        (v.gso_type, v.gso_size, n),
        (GsoType::UdpL4, 1000, 42 + 2500)
    );
    // At most UDP_MAX_SEGS datagrams in one.
    let tiny = udp4_super(&[7; 8 * (UDP_MAX_SEGS + 1)], 1);
    let mut c = Coalescer::new(true);
    let parts = segments(
        &Gso {
            seg_size: 8,
            ..uso4(1000, &tiny)
        },
        &tiny,
    );
    for p in &parts[..UDP_MAX_SEGS] {
        assert_eq!(c.push(&mut buf, p), Push::Added);
    }
    assert_eq!(c.push(&mut buf, &parts[UDP_MAX_SEGS]), Push::Flush);
}

#[test]
fn coalescer_follows_gro_rules() {
    let payload = [0xabu8; 4000];
    let f = tcp4_super(&payload, &[], tcp::flags::ACK, 5000, 1);
    let g = tso4(1000, &f);
    let segs = segments(&g, &f);
    let mut buf = std::vec![0u8; 14 + 65535];
    let mut c = Coalescer::default();
    assert_eq!(c.push(&mut buf, &segs[0]), Push::Added);
    // A gap in sequence numbers: not this super-frame.
    assert_eq!(c.push(&mut buf, &segs[2]), Push::Flush);
    // A corrupted segment is never merged: the guest's own check drops it.
    let mut bad = segs[1].clone();
    bad[70] ^= 1;
    assert_eq!(c.push(&mut buf, &bad), Push::Alone);
    // Another flow (other port).
    let mut other = segs[1].clone();
    other[34..36].copy_from_slice(&40001u16.to_be_bytes());
    assert_eq!(c.push(&mut buf, &other), Push::Alone, "checksum now wrong");
    let sum_fix = |s: &mut Vec<u8>| {
        s[50..52].copy_from_slice(&[0, 0]);
        let pseudo = checksum::pseudo_header(
            core::net::Ipv4Addr::new(10, 0, 0, 1),
            core::net::Ipv4Addr::new(10, 0, 0, 2),
            6,
            (s.len() - 34) as u16,
        );
        let c = !checksum::combine(&[pseudo, checksum::sum(&s[34..])]);
        s[50..52].copy_from_slice(&c.to_be_bytes());
    };
    sum_fix(&mut other);
    assert_eq!(c.push(&mut buf, &other), Push::Flush);
    // A different window, then a FIN: not coalescable.
    let mut win = segs[1].clone();
    win[48] ^= 1;
    sum_fix(&mut win);
    assert_eq!(c.push(&mut buf, &win), Push::Flush);
    let mut fin = segs[1].clone();
    fin[47] |= tcp::flags::FIN;
    sum_fix(&mut fin);
    assert_eq!(c.push(&mut buf, &fin), Push::Alone);
    // The next in order is taken; a short one closes the super-frame.
    assert_eq!(c.push(&mut buf, &segs[1]), Push::Added);
    let mut short = tcp4_super(&payload[..10], &[], tcp::flags::ACK, 7000, 3);
    complete_checksum(&mut short, 34, 16).unwrap();
    assert_eq!(c.push(&mut buf, &short), Push::Added);
    assert_eq!(c.segments(), 3);
    assert_eq!(c.push(&mut buf, &segs[3]), Push::Flush);
    let (v, n) = c.finish(&mut buf).unwrap();
    assert_eq!((v.gso_size, n), (1000, 14 + 20 + 20 + 2010));
}

#[test]
fn splits_udp_and_tcp6() {
    // UDP/IPv4, 2500 bytes of payload in 1000-byte segments.
    let mut f = tcp4_super(&[0x11; 2500], &[], 0, 0, 100);
    f[23] = 17;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = !checksum::sum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    // Drop the 12 TCP header bytes a UDP header does not have.
    f.drain(34 + 8..34 + 20);
    let v = VirtioNetRepr {
        flags: F_NEEDS_CSUM,
        gso_type: GsoType::UdpL4,
        gso_size: 1000,
        csum_start: 34,
        csum_offset: 6,
        ..VirtioNetRepr::PLAIN
    };
    let g = Gso::from_virtio(&v, &f).unwrap().unwrap();
    assert_eq!((g.kind, g.hdr_len), (Kind::Udp4, 42));
    // 2500 bytes in 19-byte segments: 132, more than Linux sends at once.
    let tiny = VirtioNetRepr { gso_size: 19, ..v };
    assert_eq!(Gso::from_virtio(&tiny, &f), Err(Error::Malformed));
    let segs = segments(&g, &f);
    assert_eq!(segs.len(), 3);
    for (s, want) in segs.iter().zip([1000usize, 1000, 500]) {
        let ip = crate::wire::Ipv4Packet::new_checked(&s[14..]).unwrap();
        assert!(ip.verify_checksum());
        let u = crate::wire::UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(u.len() as usize, 8 + want);
        assert_ne!(u.checksum(), 0);
        assert!(u.verify_checksum(ip.src_addr(), ip.dst_addr()));
    }
    // TCP/IPv6: payload length per segment, no IP checksum, v6 pseudo-header.
    let mut f6 = std::vec![0u8; 14 + 40 + 20 + 3000];
    f6[12..14].copy_from_slice(&[0x86, 0xdd]);
    f6[14] = 0x60;
    f6[14 + 6] = 6;
    f6[14 + 7] = 64;
    f6[14 + 8 + 15] = 1;
    f6[14 + 24 + 15] = 2;
    f6[54 + 12] = 0x50;
    f6[54 + 13] = tcp::flags::ACK;
    let v6 = VirtioNetRepr {
        gso_type: GsoType::TcpV6,
        csum_start: 54,
        csum_offset: 16,
        ..v
    };
    let g6 = Gso::from_virtio(&v6, &f6).unwrap().unwrap();
    for s in segments(&g6, &f6) {
        let plen = usize::from(get_u16(&s, 14 + 4));
        assert_eq!(plen, s.len() - 54);
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        a.copy_from_slice(&s[22..38]);
        b.copy_from_slice(&s[38..54]);
        let pseudo = checksum::pseudo_header_v6(&a, &b, 6, plen as u32);
        assert!(TcpPacket::new_checked(&s[54..])
            .unwrap()
            .verify_checksum(pseudo));
    }
}

#[test]
fn refuses_what_its_headers_contradict() {
    let f = tcp4_super(&[0; 100], &[], tcp::flags::ACK, 0, 0);
    let mut v = VirtioNetRepr {
        flags: F_NEEDS_CSUM,
        gso_type: GsoType::TcpV4,
        gso_size: 88,
        csum_start: 34,
        csum_offset: 16,
        ..VirtioNetRepr::PLAIN
    };
    assert!(Gso::from_virtio(&v, &f).unwrap().is_some());
    assert_eq!(Gso::from_virtio(&VirtioNetRepr::PLAIN, &f), Ok(None));
    v.csum_offset = 6; // a UDP checksum position on TCP
    assert_eq!(Gso::from_virtio(&v, &f), Err(Error::Malformed));
    v.csum_offset = 16;
    v.gso_type = GsoType::TcpV6; // says IPv6, is IPv4
    assert_eq!(Gso::from_virtio(&v, &f), Err(Error::Malformed));
    v.gso_type = GsoType::TcpV4;
    v.gso_size = 0;
    assert_eq!(Gso::from_virtio(&v, &f), Err(Error::Malformed));
    v.gso_size = TCP_MIN_SEG - 1; // smaller than any Linux TCP segment
    assert_eq!(Gso::from_virtio(&v, &f), Err(Error::Malformed));
    v.gso_size = TCP_MIN_SEG;
    // Headers only, no payload.
    assert_eq!(Gso::from_virtio(&v, &f[..54]), Err(Error::Truncated));
    assert_eq!(Gso::from_virtio(&v, &f[..40]), Err(Error::Truncated));
}

#[test]
fn completes_a_partial_checksum() {
    let mut f = tcp4_super(&[9; 333], &[], tcp::flags::ACK, 42, 0);
    complete_checksum(&mut f, 34, 16).unwrap();
    check_tcp4(&f);
    assert_eq!(
        complete_checksum(&mut f[..40], 34, 16),
        Err(Error::Truncated)
    );
}

/// What Linux made of one super-frame (scripts/capture-gso-fixture.py: a tap with
/// offloads bridged to one without, so the kernel segmented it in software).
const KERNEL_IN: &[u8] = include_bytes!("fixtures/tso4_in.bin");
const KERNEL_OUT: &[u8] = include_bytes!("fixtures/tso4_out.bin");

#[test]
fn splits_byte_for_byte_as_the_linux_kernel_does() {
    let v = VirtioNetRepr::parse(KERNEL_IN).unwrap();
    let frame = &KERNEL_IN[VNET_LEN..];
    let g = Gso::from_virtio(&v, frame).unwrap().unwrap();
    let mut want = Vec::new();
    let mut rest = KERNEL_OUT;
    while !rest.is_empty() {
        let n = usize::from(get_u16(rest, 0));
        want.push(&rest[2..2 + n]);
        rest = &rest[2 + n..];
    }
    let ours = segments(&g, frame);
    assert_eq!(ours.len(), want.len());
    for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
        assert_eq!(&a[..], *b, "segment {i} differs from the kernel's");
    }
    // And they coalesce back into the super-frame the tap handed over.
    let mut buf = std::vec![0u8; 14 + 65535];
    let mut c = Coalescer::default();
    for s in &want {
        assert_eq!(c.push(&mut buf, s), Push::Added);
    }
    let (v2, n) = c.finish(&mut buf).unwrap();
    assert_eq!(&buf[..n], frame);
    assert_eq!((v2.gso_size, v2.csum_start), (v.gso_size, v.csum_start));
}

/// Remote checksum offload end to end: a super-frame split with partial checksums (no
/// payload read), each segment described by `from_rco` as the receiver would, is (a)
/// the complete split once `complete_checksum` runs where a consumer needs it, and (b)
/// the super-frame again through `push_partial`; a lone partial segment leaves the
/// coalescer with `NEEDS_CSUM`, and completing it gives the segment as sent.
#[test]
fn partial_checksums_complete_and_coalesce_like_full_ones_property() {
    let mut rng = Rng(0x5eed_1234_abcd_0003);
    let mut buf = std::vec![0u8; 14 + 65535];
    for case in 0..300 {
        let seg = TCP_MIN_SEG + rng.below(1460 - 87) as u16;
        let len = 1 + rng.below((65535 - 20 - 32).min(seg as usize * 45));
        let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let f = tcp4_super(&payload, &[], tcp::flags::ACK, rng.next() as u32, 9);
        let g = tso4(seg, &f);
        let full = segments(&g, &f);
        let mut c = Coalescer::default();
        for (i, want) in full.iter().enumerate() {
            let mut s = std::vec![0u8; 14 + 65535];
            let p = g.segment_header_partial(&f, i, &mut s);
            let hl = usize::from(g.hdr_len);
            s[hl..hl + p.len()].copy_from_slice(&f[p.clone()]);
            s.truncate(hl + p.len());
            let r = Rco::new(34, false).unwrap();
            let one = Gso::from_rco(r, &s).unwrap();
            assert!(one.is_one(s.len()), "case {case}");
            assert_eq!((one.l4, one.hdr_len), (34, g.hdr_len));
            // A per-frame consumer gets the segment complete.
            let mut done = std::vec![0u8; s.len()];
            assert_eq!(one.write_segment(&s, 0, &mut done), s.len());
            assert_eq!(&done, want, "case {case} segment {i}");
            let mut c2 = s.clone();
            complete_checksum(&mut c2, 34, 16).unwrap();
            assert_eq!(&c2, want, "case {case} segment {i}");
            assert_eq!(c.push_partial(&mut buf, &s), Push::Added, "case {case}");
        }
        let (v, n) = c.finish(&mut buf).unwrap();
        if full.len() > 1 {
            assert_eq!((&buf[..n], v), (&f[..], g.to_virtio()), "case {case}");
        } else {
            assert_eq!((v.flags, v.gso_type), (F_NEEDS_CSUM, GsoType::None));
            assert_eq!((v.csum_start, v.csum_offset), (34, 16));
            complete_checksum(&mut buf[..n], 34, 16).unwrap();
            assert_eq!(&buf[..n], &full[0][..], "case {case}");
        }
    }
}

/// `from_rco` believes no more than the frame's own headers: the checksum position must
/// be the frame's L4 header, of the transport the header names.
#[test]
fn a_partial_checksum_where_the_frame_has_none_is_refused() {
    let f = tcp4_super(&[7u8; 100], &[], tcp::flags::ACK, 1, 1);
    assert!(Gso::from_rco(Rco::new(34, false).unwrap(), &f).is_ok());
    for (start, udp) in [(36, false), (34, true), (14, false), (254, false)] {
        let r = Rco::new(start, udp).unwrap();
        assert!(Gso::from_rco(r, &f).is_err(), "start {start} udp {udp}");
    }
    let headers_only = &f[..54];
    assert!(Gso::from_rco(Rco::new(34, false).unwrap(), headers_only).is_err());
    let u = udp4_super(&[1u8; 40], 3);
    let one = Gso::from_rco(Rco::new(34, true).unwrap(), &u).unwrap();
    assert_eq!((one.kind, one.hdr_len), (Kind::Udp4, 42));
}
