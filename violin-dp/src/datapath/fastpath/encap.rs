//! VXLAN encapsulation around the switch: the header a transport prepends to a frame
//! bound for a tunnel, and the full outer headers where no kernel builds them (AF_XDP).
//! The checks of a received packet before switching are `violin_common::wire::tunnel`'s.

use std::net::Ipv4Addr;
/// The receive side's parsers live with the wire formats (fuzzed there).
pub use violin_common::wire::tunnel::{decap, parse_outer};
use violin_common::wire::{
    EtherType, EthernetAddress, EthernetFrame, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr,
    UdpPacket, UdpRepr, VxlanPacket, VxlanRepr,
};
use violin_common::VXLAN_OVERHEAD;

/// The fixed parts of this host's outer headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    pub src_mac: EthernetAddress,
    pub src_ip: Ipv4Addr,
    pub port: u16,
}

/// Writes outer Ethernet/IPv4/UDP/VXLAN headers for an `inner_len`-byte frame into the
/// first `VXLAN_OVERHEAD` bytes of `buf`. The UDP source port carries flow entropy
/// (RFC 7348 §5) from the inner MACs; the UDP checksum is zero, as RFC 7348 allows.
pub fn write_outer(
    buf: &mut [u8],
    o: &Outer,
    dst_mac: EthernetAddress,
    dst_ip: Ipv4Addr,
    vni: u32,
    inner: &[u8],
) {
    EthernetRepr {
        src_addr: o.src_mac,
        dst_addr: dst_mac,
        ethertype: EtherType::IPV4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..14]));
    let udp_len = 8 + 8 + inner.len();
    Ipv4Repr {
        src_addr: o.src_ip,
        dst_addr: dst_ip,
        protocol: IpProtocol::UDP,
        payload_len: udp_len,
        hop_limit: 64,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut buf[14..34]));
    UdpRepr {
        src_port: entropy_port(inner),
        dst_port: o.port,
        payload_len: 8 + inner.len(),
    }
    .emit(&mut UdpPacket::new_unchecked(&mut buf[34..42]));
    VxlanRepr::new(vni).emit(&mut VxlanPacket::new_unchecked(
        &mut buf[42..VXLAN_OVERHEAD],
    ));
}

/// A source port in 49152..65535 derived from the inner Ethernet addresses.
#[inline]
fn entropy_port(inner: &[u8]) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in inner.iter().take(12) {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    49152 | (h as u16 & 0x3fff)
}

/// The 8-byte VXLAN header for `vni`.
#[inline]
pub fn header(vni: u32) -> [u8; 8] {
    VxlanRepr::new(vni).to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use violin_common::Verdict;

    #[test]
    fn round_trip() {
        let mut pkt = header(0xabcdef).to_vec();
        pkt.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            decap(&pkt),
            Ok((VxlanRepr::new(0xabcdef), &[1u8, 2, 3][..]))
        );
    }

    #[test]
    fn outer_headers_round_trip_and_are_valid() {
        let o = Outer {
            src_mac: EthernetAddress([2, 0, 0, 0, 0, 1]),
            src_ip: Ipv4Addr::new(172, 31, 0, 1),
            port: 4789,
        };
        let inner: Vec<u8> = (0..60u8).collect();
        let mut pkt = vec![0u8; VXLAN_OVERHEAD + inner.len()];
        let dst_mac = EthernetAddress([2, 0, 0, 0, 0, 2]);
        write_outer(
            &mut pkt,
            &o,
            dst_mac,
            Ipv4Addr::new(172, 31, 0, 2),
            101,
            &inner,
        );
        pkt[VXLAN_OVERHEAD..].copy_from_slice(&inner);
        // Fixed bytes: addresses, ethertype, IPv4 version/IHL, TTL/protocol, ports, VXLAN.
        assert_eq!(
            &pkt[..14],
            &[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]
        );
        assert_eq!(pkt[14], 0x45);
        assert_eq!(&pkt[16..18], &((20 + 8 + 8 + 60) as u16).to_be_bytes());
        assert_eq!(&pkt[22..24], &[64, 17]);
        assert_eq!(&pkt[26..34], &[172, 31, 0, 1, 172, 31, 0, 2]);
        assert_eq!(&pkt[36..38], &4789u16.to_be_bytes());
        assert_eq!(&pkt[38..40], &((8 + 8 + 60) as u16).to_be_bytes());
        assert_eq!(&pkt[40..42], &[0, 0], "no UDP checksum");
        assert_eq!(&pkt[42..50], &[0x08, 0, 0, 0, 0, 0, 101, 0]);
        let sport = u16::from_be_bytes([pkt[34], pkt[35]]);
        assert!(sport >= 49152);
        assert!(Ipv4Packet::new_checked(&pkt[14..])
            .unwrap()
            .verify_checksum());
        assert_eq!(
            parse_outer(&pkt, 4789),
            Ok((
                Ipv4Addr::new(172, 31, 0, 1),
                VxlanRepr::new(101),
                &inner[..]
            ))
        );
        assert_eq!(parse_outer(&pkt, 4790), Err(Verdict::Malformed));
        assert_eq!(parse_outer(&pkt[..40], 4789), Err(Verdict::Truncated));
    }
}
