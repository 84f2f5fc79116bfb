//! Frames built for tests from the wire module's emitters: Ethernet, IPv4, UDP, VXLAN.

use std::net::Ipv4Addr;
use violin_common::wire::*;

pub fn eth(src: [u8; 6], dst: [u8; 6], ethertype: EtherType, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 14 + payload.len()];
    let mut f = EthernetFrame::new_unchecked(&mut b[..]);
    EthernetRepr {
        src_addr: EthernetAddress(src),
        dst_addr: EthernetAddress(dst),
        ethertype,
    }
    .emit(&mut f);
    f.payload_mut().copy_from_slice(payload);
    b
}

/// An IPv4 packet with a valid header checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: IpProtocol, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 20 + payload.len()];
    let mut p = Ipv4Packet::new_unchecked(&mut b[..]);
    Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        protocol,
        payload_len: payload.len(),
        hop_limit: 64,
    }
    .emit(&mut p);
    p.payload_mut().copy_from_slice(payload);
    b
}

/// A UDP datagram with no checksum (allowed over IPv4).
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 8 + payload.len()];
    let mut p = UdpPacket::new_unchecked(&mut b[..]);
    UdpRepr {
        src_port,
        dst_port,
        payload_len: payload.len(),
    }
    .emit(&mut p);
    p.payload_mut().copy_from_slice(payload);
    b
}

/// A VXLAN header and the inner frame.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut b = VxlanRepr::new(vni).to_bytes().to_vec();
    b.extend_from_slice(inner);
    b
}
