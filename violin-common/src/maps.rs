//! Layouts of the eBPF maps shared by the classifier and the daemon. Plain `#[repr(C)]`
//! integers only: no `bool`, no `Option`, no implicit padding.

/// Value of the VNI map (key: VNI as `u32`): where that Violin's frames go on this host.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VniEntry {
    /// Index of the Violin's AF_XDP socket slot (XskMap key = slot × queues + rx queue).
    pub slot: u32,
    /// Number of member underlay addresses in `MEMBERS` for this VNI (informational).
    pub members: u32,
    /// The Violin's largest inner frame (its MTU + 18). A tunnelled frame longer than
    /// one AF_XDP frame whose inner frame states more is a GSO super-frame seen whole,
    /// which the kernel must segment. 0: no bound.
    pub max_frame: u32,
}

/// Key of the member map: (VNI, outer source IPv4 address in network order).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberKey {
    pub vni: u32,
    pub addr: u32,
}

/// Bytes of a dropped frame's inner (tunnelled) frame an [`XdpDropEvent`] carries:
/// Ethernet, IPv4 and the start of what follows.
pub const DROP_EVENT_HEAD: usize = 64;

/// A frame the classifier dropped for a monitored Violin (`violin monitor`), as it
/// goes through the `DROP_EVENTS` ring buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpDropEvent {
    pub vni: u32,
    /// The `Verdict`.
    pub reason: u32,
    /// The outer source IPv4 address, in network order.
    pub src: u32,
    /// The inner (tunnelled) frame's length.
    pub len: u32,
    /// How many bytes of `head` hold the inner frame's start (0, 14, 34, 42 or 64).
    pub head_len: u32,
    pub _pad: u32,
    pub head: [u8; DROP_EVENT_HEAD],
}

/// Name of the map of monitored VNIs (key: VNI; value unused): the classifier reports
/// those Violins' drops to `DROP_EVENTS`.
pub const MONITORED_MAP: &str = "MONITORED";
/// Name of the ring buffer of [`XdpDropEvent`]s.
pub const DROP_EVENT_RING: &str = "DROP_EVENTS";

/// Name of the per-CPU verdict counter array in the eBPF object.
pub const VERDICT_COUNTERS: &str = "VERDICTS";
/// Name of the VNI map in the eBPF object.
pub const VNI_MAP: &str = "VNIS";
/// Name of the member map in the eBPF object.
pub const MEMBER_MAP: &str = "MEMBERS";
/// Name of the configuration array (index 0: the VXLAN UDP port).
pub const CONFIG_MAP: &str = "CONFIG";

/// `CONFIG[CONFIG_PORT]`: the VXLAN UDP port (host order).
pub const CONFIG_PORT: u32 = 0;
/// `CONFIG[CONFIG_QUEUES]`: rx queues of the underlay interface.
pub const CONFIG_QUEUES: u32 = 1;
/// `CONFIG[CONFIG_MAX_FRAME]`: the longest single frame the underlay carries, its MTU
/// plus 14. A longer tunnelled frame is a GSO super-frame (XDP on a veth sees those
/// whole): the kernel's UDP socket takes it. 0: no limit.
///
/// Up to one AF_XDP frame's data ([`crate::XSK_FRAME_DATA`]) a frame is taken as it
/// is: senders send a run of frames whole only when it is longer. Longer frames (jumbo
/// ones, up to this) go to AF_XDP only with `CONFIG_MULTI_BUFFER` on and only when
/// their inner frame states exactly their length ([`crate::wire::tunnel::stated_len`]).
pub const CONFIG_MAX_FRAME: u32 = 2;
/// `CONFIG[CONFIG_MULTI_BUFFER]`: 1 when the AF_XDP sockets are bound multi-buffer
/// (`XDP_USE_SG`) and take frames across several AF_XDP frames.
pub const CONFIG_MULTI_BUFFER: u32 = 3;
/// Name of the XskMap of per-(Violin, rx queue) AF_XDP sockets.
pub const XSK_MAP: &str = "XSKS";
/// Name of the classifier program in the object.
pub const PROGRAM: &str = "violin_xdp";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with no padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::VniEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MemberKey {}
    // SAFETY: as above (the padding is an explicit field).
    unsafe impl aya::Pod for super::XdpDropEvent {}
}

/// The guest-port program and its maps (ingress ifindex → slot, slot → AF_XDP socket).
pub const PORT_PROGRAM: &str = "violin_port";
pub const PORT_SLOT_MAP: &str = "PORT_SLOTS";
pub const PORT_XSK_MAP: &str = "PORT_XSKS";

/// The underlay's socket steering (`SO_ATTACH_REUSEPORT_EBPF`): the program picks, for
/// each VXLAN datagram the kernel delivers to the daemon's UDP port, the socket of the
/// port's `SO_REUSEPORT` group that `STEER_VNIS` names for its VNI (the Violin's own,
/// or its worker's), else socket `VNI mod STEER_CONFIG[0]` (the workers' sockets sit
/// at indices 0..n of `STEER_SOCKETS`).
pub const STEER_PROGRAM: &str = "violin_steer";
/// VNI → index in [`STEER_SOCKET_MAP`].
pub const STEER_VNI_MAP: &str = "STEER_VNIS";
/// The group's sockets (`REUSEPORT_SOCKARRAY`).
pub const STEER_SOCKET_MAP: &str = "STEER_SOCKETS";
/// `STEER_CONFIG[0]`: how many workers' sockets sit at the front of the array.
pub const STEER_CONFIG_MAP: &str = "STEER_CONFIG";
/// Entries of [`STEER_SOCKET_MAP`]: the workers' sockets and one per Violin.
pub const STEER_SOCKETS_MAX: u32 = 4160;
/// Entries of [`STEER_VNI_MAP`].
pub const STEER_VNIS_MAX: u32 = 4096;
