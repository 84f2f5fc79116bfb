//! The per-packet path allocates nothing in steady state: a million frames through the
//! switch (local, remote, flooded, from the tunnel, learned behind an external member)
//! and the VXLAN encapsulation and decapsulation, under a global allocator that counts
//! the allocations of this thread while counting is on. The frames are IPv4 from the
//! sender's own address, so a local guest's go through its source guard too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use violin_common::wire::{
    EtherType, EthernetAddress, EthernetFrame, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr,
};
use violin_common::VXLAN_OVERHEAD;
use violin_dp::datapath::fastpath::encap::{self, Outer};
use violin_dp::datapath::fastpath::switch::{Egress, Ingress, Switch};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged; counting reads a
// const-initialised thread-local and bumps an atomic, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        note();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const H1: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const H2: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 2);
const X: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 50);

/// a, d on h1 (local); b on h2; external x. Links a–b (capped below what a offers it,
/// so its queue fills, overflows and is released), a–d, a–x.
const SPEC: &str = r#"
name = "blue"
vni = 101
[[guest]]
name = "a"
host = "h1"
ip = "10.0.0.1/24"
rate = "1gbit"
[[guest]]
name = "b"
host = "h2"
ip = "10.0.0.2/24"
[[guest]]
name = "d"
host = "h1"
ip = "10.0.0.4/24"
[[link]]
between = ["a", "b"]
rate = "50mbit"
[[link]]
between = ["a", "d"]
[[link]]
between = ["a", "x"]
[[external]]
name = "x"
underlay = "172.31.0.50"
mac = "02:aa:00:00:00:50"
"#;

/// An IPv4 frame from a's address (what a's source guard lets through).
fn frame(dst: EthernetAddress, src: EthernetAddress, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    EthernetRepr {
        src_addr: src,
        dst_addr: dst,
        ethertype: EtherType::IPV4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    Ipv4Repr {
        src_addr: Ipv4Addr::new(10, 0, 0, 1),
        dst_addr: Ipv4Addr::new(10, 0, 0, 2),
        protocol: IpProtocol::UDP,
        payload_len: len - 34,
        hop_limit: 64,
    }
    .emit(&mut Ipv4Packet::new_unchecked(&mut buf[14..]));
    buf
}

#[test]
fn a_million_frames_allocate_nothing() {
    let hosts: BTreeMap<String, Ipv4Addr> = [("h1".into(), H1), ("h2".into(), H2)].into();
    let spec = violin_dp::spec::parse(SPEC, &hosts).unwrap();
    let mac = |n: &str| spec.members[spec.member(n).unwrap()].mac.0;
    let (a, b, d, x) = (mac("a"), mac("b"), mac("d"), mac("x"));
    let mut sw = Switch::new();
    let ports = sw.add_violin(&spec, "h1", 0).unwrap();
    let pa = ports
        .iter()
        .find(|(m, _)| *m == spec.member("a").unwrap())
        .map(|(_, p)| *p)
        .expect("a is local");
    // Hosts behind the external VTEP x, learned as their frames arrive.
    let behind_x: Vec<EthernetAddress> = (0..16u8)
        .map(|i| EthernetAddress([0x02, 0xbb, 0, 0, 0, i]))
        .collect();
    let mut frames: Vec<(Ingress, Vec<u8>)> = vec![
        (Ingress::Port(pa), frame(b, a, 1400)),
        (Ingress::Port(pa), frame(d, a, 64)),
        (Ingress::Port(pa), frame(x, a, 200)),
        (Ingress::Port(pa), frame(EthernetAddress::BROADCAST, a, 60)),
        (Ingress::Tunnel { src: H2, vni: 101 }, frame(a, b, 1400)),
    ];
    for m in &behind_x {
        frames.push((Ingress::Tunnel { src: X, vni: 101 }, frame(a, *m, 100)));
        frames.push((Ingress::Port(pa), frame(*m, a, 100)));
    }
    let outer = Outer {
        src_mac: EthernetAddress([0x02, 0, 0, 0, 0, 1]),
        src_ip: H1,
        port: violin_common::VXLAN_PORT,
    };
    let mut out: Vec<Egress> = Vec::with_capacity(64);
    let mut wire = vec![0u8; VXLAN_OVERHEAD + 1500];
    let mut forwarded = 0u64;
    let mut released = 0u64;
    let mut now = 0u64;
    let mut run = |n: usize, sw: &mut Switch, now: &mut u64| {
        for i in 0..n {
            let (ingress, f) = &frames[i % frames.len()];
            *now += 1_000; // 1 µs a frame: the buckets refill as time passes
            if sw.process(*ingress, f, *now, &mut out) != violin_common::Verdict::Forward {
                continue;
            }
            forwarded += 1;
            if sw.next_release(*now).is_some_and(|at| at <= *now) {
                sw.release(*now, |_, f, _| {
                    released += 1;
                    assert!(f.len() >= 60);
                    Ok(())
                });
            }
            for e in &out {
                if let Egress::Tunnel { dst, vni, .. } = *e {
                    let len = VXLAN_OVERHEAD + f.len();
                    encap::write_outer(&mut wire[..len], &outer, b, dst, vni, f);
                    wire[VXLAN_OVERHEAD..len].copy_from_slice(f);
                    let (src, got_vni, inner) =
                        encap::parse_outer(&wire[..len], violin_common::VXLAN_PORT).unwrap();
                    assert_eq!((src, got_vni.vni, inner.len()), (H1, vni, f.len()));
                }
            }
        }
    };
    // Warm up: first-time growth (learning tables, counters) is not steady state.
    run(10_000, &mut sw, &mut now);
    COUNTING.with(|c| c.set(true));
    run(1_000_000, &mut sw, &mut now);
    COUNTING.with(|c| c.set(false));
    let n = ALLOCATIONS.load(Ordering::Relaxed);
    assert!(
        forwarded > 500_000,
        "only {forwarded} frames were forwarded"
    );
    assert_eq!(n, 0, "{n} allocations in 1 000 000 frames");
    assert!(
        released > 10_000,
        "the capped link's queue released {released}"
    );
}
