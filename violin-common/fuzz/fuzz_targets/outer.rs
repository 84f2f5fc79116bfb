//! A tunnelled packet as the receive side reads it: arbitrary bytes as a whole packet
//! (`tunnel::parse_outer`, the AF_XDP path) and as a UDP payload (`tunnel::decap`, the
//! UDP-socket path). Beyond "no panic": what either returns is the packet's own bytes,
//! after at least the headers it parsed, and a VNI fits 24 bits. The same inputs go
//! through the XDP classifier in `violin-dp/tests/classifier.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use violin_common::wire::tunnel::{decap, parse_outer};

/// True when `inner` lies in `data` and starts at least `skip` bytes in.
fn within(data: &[u8], inner: &[u8], skip: usize) -> bool {
    let (d, i) = (data.as_ptr() as usize, inner.as_ptr() as usize);
    i >= d + skip && i + inner.len() <= d + data.len()
}

fuzz_target!(|data: &[u8]| {
    if let Ok((_, vni, inner)) = parse_outer(data, 4789) {
        assert!(vni < 1 << 24);
        // Ethernet 14 + IPv4 ≥ 20 + UDP 8 + VXLAN 8.
        assert!(within(data, inner, 50), "the inner frame is outside the packet");
    }
    if let Ok((vni, inner)) = decap(data) {
        assert!(vni < 1 << 24);
        assert_eq!(inner, &data[8..]);
    }
});
