//! A tunnelled packet as it arrives: outer Ethernet → IPv4 → UDP → VXLAN → the inner
//! frame. The user-space counterpart of the XDP classifier's checks (the AF_XDP path
//! reads whole packets with [`parse_outer`]; the UDP-socket path gets the UDP payload
//! and reads it with [`decap`]). Each refusal is a `Verdict`.
//!
//! A frame whose header announces remote checksum offload leans on the outer UDP
//! checksum: the kernel verified it before a UDP socket got the datagram, and
//! [`parse_outer`] verifies it for the AF_XDP path (a zero one vouches for nothing).

use super::{
    EtherType, EthernetFrame, IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, VxlanPacket, VxlanRepr,
};
use crate::Verdict;
use core::net::Ipv4Addr;

/// Parses a whole tunnelled packet (outer Ethernet/IPv4/UDP/VXLAN) sent to UDP `port`:
/// returns (outer source, VXLAN header, inner frame).
#[inline]
pub fn parse_outer(pkt: &[u8], port: u16) -> Result<(Ipv4Addr, VxlanRepr, &[u8]), Verdict> {
    let eth = EthernetFrame::new_checked(pkt)?;
    if eth.ethertype() != EtherType::IPV4 {
        return Err(Verdict::Malformed);
    }
    let ip = Ipv4Packet::new_checked(eth.payload())?;
    let ipr = Ipv4Repr::parse(&ip)?;
    if ipr.protocol != IpProtocol::UDP {
        return Err(Verdict::Malformed);
    }
    // Slices of `pkt` itself (the views borrow only while they live): the header
    // checks above bound the IPv4 payload, and the UDP view's the UDP length.
    let hl = 14 + ip.header_len() as usize;
    let l4 = &pkt[hl..hl + ipr.payload_len];
    let udp = UdpPacket::new_checked(l4)?;
    if udp.dst_port() != port {
        return Err(Verdict::Malformed);
    }
    let (vx, inner) = decap(&l4[8..udp.len() as usize])?;
    if vx.rco.is_some() && (udp.checksum() == 0 || !udp.verify_checksum(ipr.src_addr, ipr.dst_addr))
    {
        return Err(Verdict::Malformed);
    }
    Ok((ipr.src_addr, vx, inner))
}

/// Splits a received UDP payload into (VXLAN header, inner frame), or says why it is
/// not VXLAN.
#[inline]
pub fn decap(payload: &[u8]) -> Result<(VxlanRepr, &[u8]), Verdict> {
    let p = VxlanPacket::new_checked(payload)?;
    let r = VxlanRepr::parse(&p)?;
    Ok((r, &payload[r.buffer_len()..]))
}

/// Bytes of an inner frame's start that [`stated_len`] reads: Ethernet, one VLAN tag,
/// and the IP length fields.
pub const STATED_HEAD: usize = 24;

/// The length an inner frame's own headers give it: Ethernet (and one VLAN tag) plus
/// the IPv4 total length, or the IPv6 header and payload length. `None` for any other
/// frame (ARP, an IPv6 jumbogram, a wrong IP version): nothing inside it vouches for
/// its length.
///
/// A tunnelled datagram holding exactly what its inner frame states is one frame. A
/// GSO run of several VXLAN datagrams (which XDP on a veth sees whole, before the
/// kernel segments it) holds more than its first inner frame states, so the classifier
/// tells the two apart by this, not by length alone. (Constant offsets only: the eBPF
/// verifier reads this too.)
#[inline(always)]
pub fn stated_len(h: &[u8; STATED_HEAD]) -> Option<usize> {
    if u16::from_be_bytes([h[12], h[13]]) == EtherType::VLAN.0 {
        let et = u16::from_be_bytes([h[16], h[17]]);
        ip_len(et, [h[18], h[20], h[21], h[22], h[23]]).map(|n| 18 + n)
    } else {
        let et = u16::from_be_bytes([h[12], h[13]]);
        ip_len(et, [h[14], h[16], h[17], h[18], h[19]]).map(|n| 14 + n)
    }
}

/// An IP packet's length from its bytes 0, 2, 3, 4 and 5 (`b`), under ethertype `et`.
#[inline(always)]
fn ip_len(et: u16, b: [u8; 5]) -> Option<usize> {
    let (version, ihl) = (b[0] >> 4, (b[0] & 0x0f) as usize * 4);
    match et {
        0x0800 if version == 4 && ihl >= 20 => {
            let total = u16::from_be_bytes([b[1], b[2]]) as usize;
            (total >= ihl).then_some(total)
        }
        0x86dd if version == 6 => {
            let payload = u16::from_be_bytes([b[3], b[4]]) as usize;
            (payload != 0).then_some(40 + payload)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tunnelled ARP request from 172.31.0.2 to VNI 101 (checksums valid), as the
    /// classifier's fixture table builds it.
    const PACKET: [u8; 92] = [
        0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00, // Ethernet
        0x45, 0, 0, 78, 0, 0, 0x40, 0, 64, 17, 0xe2, 0x5d, 172, 31, 0, 2, 172, 31, 0,
        1, // IPv4
        0xc0, 0x00, 0x12, 0xb5, 0, 58, 0, 0, // UDP to 4789
        0x08, 0, 0, 0, 0, 0, 101, 0, // VXLAN, VNI 101
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0x09, 0x08,
        0x06, // inner Ethernet
        0, 1, 0x08, 0, 6, 4, 0, 1, 0x02, 0, 0, 0, 0, 0x09, 10, 0, 0, 9, 0, 0, 0, 0, 0, 0, 10, 0, 0,
        1, // ARP
    ];

    #[test]
    fn a_tunnelled_packet_gives_its_source_vni_and_inner_frame() {
        let (src, vx, inner) = parse_outer(&PACKET, 4789).unwrap();
        assert_eq!(
            (src, vx),
            (Ipv4Addr::new(172, 31, 0, 2), VxlanRepr::new(101))
        );
        assert_eq!(inner, &PACKET[50..]);
        assert_eq!(
            decap(&PACKET[42..]),
            Ok((VxlanRepr::new(101), &PACKET[50..]))
        );
    }

    #[test]
    fn what_is_not_vxlan_to_our_port_is_refused_with_a_reason() {
        assert_eq!(parse_outer(&PACKET, 4790), Err(Verdict::Malformed));
        assert_eq!(parse_outer(&PACKET[..40], 4789), Err(Verdict::Truncated));
        let mut bad_sum = PACKET;
        bad_sum[24] ^= 1;
        assert_eq!(parse_outer(&bad_sum, 4789), Err(Verdict::Malformed));
        let mut no_i = PACKET;
        no_i[42] = 0;
        assert_eq!(parse_outer(&no_i, 4789), Err(Verdict::Malformed));
        let mut udp_len = PACKET;
        udp_len[39] = 200; // longer than the IPv4 payload
        assert_eq!(parse_outer(&udp_len, 4789), Err(Verdict::Truncated));
        assert_eq!(decap(&[0x08, 0, 0]), Err(Verdict::Truncated));
        assert_eq!(decap(&[0; 20]), Err(Verdict::Malformed));
    }

    /// An inner frame's stated length, from the fixtures' bytes: IPv4, IPv4 behind a
    /// VLAN tag, IPv6; nothing for ARP, a jumbogram or a version that does not match.
    #[test]
    fn an_inner_frame_states_its_length_through_its_ip_header() {
        let head = |b: &[u8]| -> [u8; STATED_HEAD] {
            let mut h = [0u8; STATED_HEAD];
            h[..b.len()].copy_from_slice(b);
            h
        };
        let mac = [0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        let v4 = |total: u16| {
            let t = total.to_be_bytes();
            head(&[&mac[..], &[0x08, 0x00, 0x45, 0, t[0], t[1], 0, 0, 0x40, 0]].concat())
        };
        assert_eq!(stated_len(&v4(8986)), Some(9000));
        assert_eq!(stated_len(&v4(20)), Some(34));
        assert_eq!(stated_len(&v4(19)), None, "shorter than its own header");
        let tagged = head(
            &[
                &mac[..],
                &[0x81, 0x00, 0, 5, 0x08, 0x00, 0x46, 0, 0x05, 0xdc, 0, 0],
            ]
            .concat(),
        );
        assert_eq!(stated_len(&tagged), Some(18 + 1500));
        let v6 = head(&[&mac[..], &[0x86, 0xdd, 0x60, 0, 0, 0, 0x22, 0xb8]].concat());
        assert_eq!(stated_len(&v6), Some(14 + 40 + 8888));
        let mut jumbogram = v6;
        jumbogram[18..20].copy_from_slice(&[0, 0]);
        assert_eq!(stated_len(&jumbogram), None);
        let mut v6_as_v4 = v6;
        v6_as_v4[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(
            stated_len(&v6_as_v4),
            None,
            "version 6 under the IPv4 ethertype"
        );
        // The fixture packet's inner frame is ARP.
        assert_eq!(stated_len(PACKET[50..74].try_into().unwrap()), None);
    }

    /// A partial inner checksum is taken only under an outer UDP checksum that holds.
    #[test]
    fn remote_checksum_offload_needs_a_valid_outer_checksum() {
        use crate::wire::checksum;
        let mut rco = PACKET;
        rco[43] |= crate::wire::vxlan::FLAG_RCO;
        rco[49] = 17;
        // The fixture's UDP checksum is zero: nothing vouches for the inner frame.
        assert_eq!(parse_outer(&rco, 4789), Err(Verdict::Malformed));
        let src = Ipv4Addr::new(172, 31, 0, 2);
        let dst = Ipv4Addr::new(172, 31, 0, 1);
        let c = !checksum::combine(&[
            checksum::pseudo_header(src, dst, 17, 58),
            checksum::sum(&rco[34..92]),
        ]);
        rco[40..42].copy_from_slice(&c.to_be_bytes());
        let (_, vx, _) = parse_outer(&rco, 4789).unwrap();
        assert_eq!(vx.rco, crate::wire::vxlan::Rco::new(34, false));
        rco[60] ^= 1; // the inner frame changed on the way
        assert_eq!(parse_outer(&rco, 4789), Err(Verdict::Malformed));
    }
}
