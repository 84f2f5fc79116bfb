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
