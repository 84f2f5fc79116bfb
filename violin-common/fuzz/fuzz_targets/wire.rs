//! Every wire parser of `violin-common` on arbitrary bytes, nested as a frame would be:
//! Ethernet → ARP | IPv4 → UDP → VXLAN → Ethernet, TCP; and the virtio-net header and
//! the checksum on the whole input. Nothing may panic or read out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use violin_common::wire::tcp::TcpPacket;
use violin_common::wire::virtio::VirtioNetRepr;
use violin_common::wire::*;

fn ethernet(data: &[u8], depth: u8) {
    let Ok(f) = EthernetFrame::new_checked(data) else {
        return;
    };
    let _ = EthernetRepr::parse(&f);
    let p = f.payload();
    if let Ok(a) = ArpPacket::new_checked(p) {
        let _ = ArpRepr::parse(&a);
        let _ = (a.source_protocol_addr(), a.target_hardware_addr());
    }
    let Ok(ip) = Ipv4Packet::new_checked(p) else {
        return;
    };
    let Ok(r) = Ipv4Repr::parse(&ip) else {
        return;
    };
    let l4 = ip.payload();
    if let Ok(u) = UdpPacket::new_checked(l4) {
        let _ = UdpRepr::parse(&u, Some((r.src_addr, r.dst_addr)));
        if let Ok(v) = VxlanPacket::new_checked(u.payload()) {
            if VxlanRepr::parse(&v).is_ok() && depth < 2 {
                ethernet(v.payload(), depth + 1);
            }
        }
    }
    if let Ok(t) = TcpPacket::new_checked(l4) {
        let _ = (t.header_len(), t.seq(), t.flags());
    }
}

fuzz_target!(|data: &[u8]| {
    ethernet(data, 0);
    let _ = VirtioNetRepr::parse(data);
    let _ = checksum::sum(data);
    if let Ok(s) = core::str::from_utf8(data) {
        let _ = EthernetAddress::parse(s);
    }
});
