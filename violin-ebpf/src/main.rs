//! Violin's XDP classifier on the underlay NIC. This first version passes every frame
//! to the kernel and counts it; classification into per-Violin AF_XDP queues by VNI
//! comes with the kernel-bypass data plane.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};
use violin_common::Verdict;

/// Per-CPU packet counters indexed by `Verdict`.
#[map(name = "VERDICTS")]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Verdict::COUNT as u32, 0);

#[xdp]
pub fn violin_xdp(_ctx: XdpContext) -> u32 {
    count(Verdict::Pass);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(v: Verdict) {
    if let Some(c) = VERDICTS.get_ptr_mut(v as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
