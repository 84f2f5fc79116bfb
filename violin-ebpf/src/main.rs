//! Violin's XDP classifier on the underlay NIC: VXLAN frames for a Violin on this host
//! go to that Violin's AF_XDP socket; everything else goes to the kernel untouched.
//!
//! Ethernet → IPv4 → UDP to the VXLAN port → VXLAN header with the I flag → VNI in
//! `VNIS` → outer source in `MEMBERS` for that VNI → redirect to
//! `XSKS[slot × queues + rx queue]`. Not Violin traffic (ARP, IPv6, VLAN-tagged, other
//! UDP, fragments), or Violin traffic on an rx queue beyond the served ones: XDP_PASS. Truncated or malformed headers, an unknown VNI or a
//! non-member source: XDP_DROP. Each outcome is counted per CPU by `Verdict`, the list
//! user space counts with too. Header layouts come from `violin_common::wire`.
//!
//! A frame longer than one AF_XDP frame, or in several buffers, is a jumbo frame or a
//! GSO run of frames from the veth peer (which keeps GSO because this program is
//! frags-aware). A jumbo frame goes to the Violin's socket when the sockets are
//! multi-buffer and its inner frame states exactly its length; anything else long is
//! handed to the kernel, whose UDP socket the daemon reads with GRO.
//!
//! `violin_port` runs on the host end of fast guest ports (veths driven by AF_XDP) and
//! hands every frame to that port's socket.
//!
//! `violin_steer` (`sk_reuseport`, on the underlay's UDP socket group, both planes)
//! picks the socket of the datagram's Violin among the group's, so that the kernel
//! queues each Violin's datagrams apart and a flood fills only its own socket.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{sk_action, xdp_action},
    helpers::{bpf_skb_load_bytes, bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    macros::{map, sk_reuseport, xdp},
    maps::{Array, HashMap, PerCpuArray, ReusePortSockArray, RingBuf, XskMap},
    programs::{SkReuseportContext, XdpContext},
    EbpfContext,
};
use violin_common::maps::{
    MemberKey, VniEntry, XdpDropEvent, CONFIG_MAX_FRAME, CONFIG_MULTI_BUFFER, CONFIG_PORT,
    CONFIG_QUEUES, DROP_EVENT_HEAD, STEER_SOCKETS_MAX, STEER_VNIS_MAX,
};
use violin_common::wire::tunnel::{stated_len, STATED_HEAD};
use violin_common::wire::{ethernet, ipv4, udp, vxlan, EtherType};
use violin_common::{Verdict, XSK_FRAME_DATA};

/// `CONFIG_PORT`: VXLAN UDP port; `CONFIG_QUEUES`: rx queues of the interface.
#[map(name = "CONFIG")]
static CONFIG: Array<u32> = Array::with_max_entries(4, 0);

#[map(name = "VNIS")]
static VNIS: HashMap<u32, VniEntry> = HashMap::with_max_entries(4096, 0);

#[map(name = "MEMBERS")]
static MEMBERS: HashMap<MemberKey, u32> = HashMap::with_max_entries(65536, 0);

#[map(name = "XSKS")]
static XSKS: XskMap = XskMap::with_max_entries(1024, 0);

/// Per-CPU packet counters indexed by `Verdict`.
#[map(name = "VERDICTS")]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Verdict::COUNT as u32, 0);

/// VNIs a `violin monitor` watches (value unused): their dropped frames are reported.
#[map(name = "MONITORED")]
static MONITORED: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Dropped frames of monitored Violins, for the daemon to describe.
#[map(name = "DROP_EVENTS")]
static DROP_EVENTS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// Frags-aware (`xdp.frags`): otherwise veth strips GSO from its peer, and every TCP
/// stream of the host itself would be segmented on its way in.
#[xdp(frags)]
pub fn violin_xdp(ctx: XdpContext) -> u32 {
    match classify(&ctx) {
        Ok(action) => action,
        Err(v) => {
            count(v);
            match v {
                Verdict::Pass | Verdict::OtherQueue | Verdict::Jumbo => xdp_action::XDP_PASS,
                _ => xdp_action::XDP_DROP,
            }
        }
    }
}

#[inline(always)]
fn count(v: Verdict) {
    if let Some(c) = VERDICTS.get_ptr_mut(v as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe { *c += 1 };
    }
}

/// A pointer to `len` bytes at `off`, or `Truncated` if the packet is shorter.
#[inline(always)]
fn at(ctx: &XdpContext, off: usize, len: usize) -> Result<*const u8, Verdict> {
    let start = ctx.data();
    if start + off + len > ctx.data_end() {
        return Err(Verdict::Truncated);
    }
    Ok((start + off) as *const u8)
}

#[inline(always)]
fn be16(p: *const u8, off: usize) -> u16 {
    // SAFETY: callers obtained `p` from `at` with a length covering `off + 2`.
    unsafe { u16::from_be_bytes([*p.add(off), *p.add(off + 1)]) }
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> Result<u32, Verdict> {
    let eth = at(ctx, 0, ethernet::HEADER_LEN)?;
    let ethertype = be16(eth, ethernet::field::ETHERTYPE);
    if ethertype != EtherType::IPV4.0 {
        // ARP, IPv6, VLAN-tagged…: the host's business.
        return Err(Verdict::Pass);
    }
    let l3 = ethernet::HEADER_LEN;
    let ip = at(ctx, l3, ipv4::HEADER_LEN)?;
    // SAFETY: `ip` covers the 20-byte fixed header.
    let (ver_ihl, protocol) = unsafe {
        (
            *ip.add(ipv4::field::VER_IHL),
            *ip.add(ipv4::field::PROTOCOL),
        )
    };
    if ver_ihl >> 4 != 4 || (ver_ihl & 0x0f) < 5 {
        return Err(Verdict::Malformed);
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if protocol != 17 {
        return Err(Verdict::Pass);
    }
    // Fragments (MF set or offset ≠ 0) are reassembled by the kernel, not by us.
    if be16(ip, ipv4::field::FLG_OFF) & 0x3fff != 0 {
        return Err(Verdict::Pass);
    }
    // SAFETY: `ip` covers the fixed header, which holds the source address.
    let src = unsafe {
        let s = ipv4::field::SRC_ADDR.start;
        u32::from_ne_bytes([*ip.add(s), *ip.add(s + 1), *ip.add(s + 2), *ip.add(s + 3)])
    };
    let l4 = l3 + ihl;
    let u = at(ctx, l4, udp::HEADER_LEN)?;
    let port = CONFIG
        .get(CONFIG_PORT)
        .copied()
        .unwrap_or(violin_common::VXLAN_PORT as u32);
    if u32::from(be16(u, udp::field::DST_PORT)) != port {
        return Err(Verdict::Pass);
    }
    let vx = at(ctx, l4 + udp::HEADER_LEN, vxlan::HEADER_LEN)?;
    // SAFETY: `vx` covers the 8-byte VXLAN header.
    let (flags, vni) = unsafe {
        let v = vxlan::field::VNI.start;
        (
            *vx.add(vxlan::field::FLAGS),
            u32::from_be_bytes([0, *vx.add(v), *vx.add(v + 1), *vx.add(v + 2)]),
        )
    };
    if flags & vxlan::FLAG_I == 0 {
        return Err(Verdict::Malformed);
    }
    // SAFETY: map values are plain integers; the reference does not outlive this call.
    let Some(entry) = (unsafe { VNIS.get(&vni) }) else {
        return Err(Verdict::UnknownVni);
    };
    let key = MemberKey { vni, addr: src };
    // SAFETY: as above.
    if unsafe { MEMBERS.get(&key) }.is_none() {
        report(
            ctx,
            vni,
            src,
            Verdict::NotMember,
            l4 + udp::HEADER_LEN + vxlan::HEADER_LEN,
        );
        return Err(Verdict::NotMember);
    }
    let queues = CONFIG.get(CONFIG_QUEUES).copied().unwrap_or(1).max(1);
    let queue = ctx.rx_queue_index();
    if queue >= queues {
        // No sockets on this queue (and slot × queues + queue would be another Violin's
        // slot): the kernel's UDP socket takes it, and the daemon reads that too.
        return Err(Verdict::OtherQueue);
    }
    // Up to one AF_XDP frame's data, a frame is one frame (senders send a run of
    // frames whole only when it is longer). Longer, or in several buffers, it is a
    // jumbo frame or a GSO run (XDP on a veth sees a sender's run whole): only a frame
    // whose inner frame states its whole length, within the Violin's largest, goes
    // to a multi-buffer socket; the kernel's UDP socket takes the rest, with GRO.
    // SAFETY: the helper only reads the xdp_md this program was given.
    let whole = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as usize;
    let max = match CONFIG.get(CONFIG_MAX_FRAME).copied().unwrap_or(0) {
        0 => usize::MAX,
        m => m as usize,
    };
    if whole > max {
        return Err(Verdict::Jumbo);
    }
    if whole > ctx.data_end() - ctx.data() || whole > XSK_FRAME_DATA {
        let inner = l4 + udp::HEADER_LEN + vxlan::HEADER_LEN;
        if CONFIG.get(CONFIG_MULTI_BUFFER).copied().unwrap_or(0) == 0
            || !one_frame(ctx, inner, whole, entry.max_frame as usize)
        {
            return Err(Verdict::Jumbo);
        }
    }
    let slot = entry.slot * queues + queue;
    count(Verdict::Forward);
    // No socket in the slot (the daemon is restarting): the frame is dropped.
    Ok(XSKS
        .redirect(slot, u64::from(xdp_action::XDP_DROP))
        .unwrap_or(xdp_action::XDP_DROP))
}

/// True when the inner frame at `inner` states exactly the `whole` packet's remaining
/// length, within `largest` (0: any): one frame, not a run of several.
#[inline(always)]
fn one_frame(ctx: &XdpContext, inner: usize, whole: usize, largest: usize) -> bool {
    let mut head = [0u8; STATED_HEAD];
    // SAFETY: the helper writes at most STATED_HEAD bytes into `head`, which holds that many.
    let r = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            inner as u32,
            head.as_mut_ptr().cast(),
            STATED_HEAD as u32,
        )
    };
    match stated_len(&head) {
        Some(n) if r == 0 => inner + n == whole && (largest == 0 || n <= largest),
        _ => false,
    }
}

/// Reports a dropped frame of Violin `vni` to `DROP_EVENTS` if a monitor watches it
/// (one map lookup otherwise). A full ring loses the event, not the verdict's count.
#[inline(always)]
fn report(ctx: &XdpContext, vni: u32, src: u32, v: Verdict, inner: usize) {
    // SAFETY: map values are plain integers; the reference is not kept.
    if unsafe { MONITORED.get(&vni) }.is_none() {
        return;
    }
    let Some(mut slot) = DROP_EVENTS.reserve::<XdpDropEvent>(0) else {
        return;
    };
    let mut e = XdpDropEvent {
        vni,
        reason: v as u32,
        src,
        // SAFETY: the helper only reads the xdp_md this program was given.
        len: (unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as u32).saturating_sub(inner as u32),
        head_len: 0,
        _pad: 0,
        head: [0; DROP_EVENT_HEAD],
    };
    // As much of the inner frame's start as there is, in constant sizes the verifier
    // accepts: a whole head, Ethernet + ARP, Ethernet + IPv4, or Ethernet alone.
    for n in [DROP_EVENT_HEAD, 42, 34, 14] {
        // SAFETY: the helper writes at most `n` bytes into `head`, which holds 64.
        let r = unsafe {
            bpf_xdp_load_bytes(ctx.ctx, inner as u32, e.head.as_mut_ptr().cast(), n as u32)
        };
        if r == 0 {
            e.head_len = n as u32;
            break;
        }
    }
    slot.write(e);
    slot.submit(0);
}

/// Host ends of fast guest ports: ingress ifindex → slot in `PORT_XSKS`.
#[map(name = "PORT_SLOTS")]
static PORT_SLOTS: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

#[map(name = "PORT_XSKS")]
static PORT_XSKS: XskMap = XskMap::with_max_entries(4096, 0);

/// On the host end of a fast guest port's veth: every frame the guest sends goes to the
/// port's AF_XDP socket (the switch decides from there, as for socket ports).
/// Frags-aware (`xdp.frags`): otherwise veth caps the guest's MTU at what one page
/// holds, and a jumbo frame (a Violin of MTU 9000) could not reach the port's
/// multi-buffer socket. Frames of up to a page arrive linear either way, which is all a
/// port of a smaller MTU gets (the guest's `eth0` has no segmentation offload: veth
/// takes it away while a program is attached, and its TX checksum is off).
#[xdp(frags)]
pub fn violin_port(ctx: XdpContext) -> u32 {
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: plain integer map value, read immediately.
    match unsafe { PORT_SLOTS.get(&ifindex) } {
        Some(&slot) => {
            count(Verdict::Forward);
            PORT_XSKS
                .redirect(slot, u64::from(xdp_action::XDP_DROP))
                .unwrap_or(xdp_action::XDP_DROP)
        }
        None => xdp_action::XDP_PASS,
    }
}

/// VNI → the index of its socket in `STEER_SOCKETS` (a Violin's own, or its worker's).
#[map(name = "STEER_VNIS")]
static STEER_VNIS: HashMap<u32, u32> = HashMap::with_max_entries(STEER_VNIS_MAX, 0);

/// The underlay's `SO_REUSEPORT` group: the workers' sockets first, then the Violins'.
#[map(name = "STEER_SOCKETS")]
static STEER_SOCKETS: ReusePortSockArray =
    ReusePortSockArray::with_max_entries(STEER_SOCKETS_MAX, 0);

/// `[0]`: how many workers' sockets sit at the front of `STEER_SOCKETS`.
#[map(name = "STEER_CONFIG")]
static STEER_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

/// Picks the socket of a datagram's Violin: `STEER_VNIS[VNI]`, else the worker socket
/// `VNI mod workers`. The packet starts at the UDP header; a datagram too short for a
/// VXLAN header goes to socket 0, whose worker counts it as malformed. Should the pick
/// fail (a socket closing), the kernel falls back to the group's hash.
#[sk_reuseport]
pub fn violin_steer(ctx: SkReuseportContext) -> u32 {
    // The VXLAN header's second word: VNI << 8 | reserved.
    let mut word = [0u8; 4];
    // SAFETY: the helper copies 4 bytes into `word`, which is 4 bytes long, or fails.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            (udp::HEADER_LEN + vxlan::field::VNI.start) as u32,
            word.as_mut_ptr().cast(),
            4,
        )
    };
    let index = if r != 0 {
        0
    } else {
        let vni = u32::from_be_bytes(word) >> 8;
        // SAFETY: plain integer map value, read immediately.
        match unsafe { STEER_VNIS.get(&vni) } {
            Some(&i) => i,
            None => vni % STEER_CONFIG.get(0).copied().unwrap_or(1).max(1),
        }
    };
    let _ = STEER_SOCKETS.select_reuseport(&ctx, index);
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
