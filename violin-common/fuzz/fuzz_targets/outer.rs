//! A tunnelled packet as the receive side reads it: arbitrary bytes as a whole packet
//! (`tunnel::parse_outer`, the AF_XDP path) and as a UDP payload (`tunnel::decap`, the
//! UDP-socket path). Beyond "no panic": what either returns is the packet's own bytes,
//! after at least the headers it parsed, and a VNI fits 24 bits; a frame announced with
//! a partial checksum (remote checksum offload) is one segment that completes in place of
//! itself, or is refused. The same inputs go
//! through the XDP classifier in `violin-dp/tests/classifier.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use violin_common::wire::gso::Gso;
use violin_common::wire::tunnel::{decap, parse_outer};
use violin_common::wire::VxlanRepr;

/// True when `inner` lies in `data` and starts at least `skip` bytes in.
fn within(data: &[u8], inner: &[u8], skip: usize) -> bool {
    let (d, i) = (data.as_ptr() as usize, inner.as_ptr() as usize);
    i >= d + skip && i + inner.len() <= d + data.len()
}

/// A frame with a partial checksum: refused, or one segment of its own length.
fn one_segment(vx: VxlanRepr, inner: &[u8]) {
    let Some(r) = vx.rco else { return };
    if let Ok(g) = Gso::from_rco(r, inner) {
        assert!(g.is_one(inner.len()));
        let mut out = vec![0u8; inner.len()];
        assert_eq!(g.write_segment(inner, 0, &mut out), inner.len());
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((_, vx, inner)) = parse_outer(data, 4789) {
        assert!(vx.vni < 1 << 24);
        one_segment(vx, inner);
        // Ethernet 14 + IPv4 ≥ 20 + UDP 8 + VXLAN 8.
        assert!(within(data, inner, 50), "the inner frame is outside the packet");
    }
    if let Ok((vx, inner)) = decap(data) {
        assert!(vx.vni < 1 << 24);
        assert_eq!(inner, &data[8..]);
        one_segment(vx, inner);
    }
});
