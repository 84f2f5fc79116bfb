//! Types shared by the Violin eBPF classifier and user space: packet wire formats, the
//! single numbered list of verdicts/drop reasons, and the layouts of the eBPF maps.
//!
//! `no_std`, no allocation: every type here is usable from the XDP program.
#![no_std]

pub mod maps;
pub mod verdict;
pub mod wire;

pub use verdict::Verdict;

/// The IANA-assigned VXLAN UDP port (RFC 7348 §5).
pub const VXLAN_PORT: u16 = 4789;

/// Bytes a VXLAN tunnel adds around a guest frame on an IPv4 underlay:
/// outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8).
pub const VXLAN_OVERHEAD: usize = 14 + 20 + 8 + 8;

/// The largest VNI: VXLAN network identifiers are 24 bits.
pub const VNI_MAX: u32 = (1 << 24) - 1;

/// The bytes of one AF_XDP frame a packet can use: user space's UMEM frames are 2048
/// bytes, of which the kernel keeps the first `XDP_PACKET_HEADROOM` (256) for XDP. A
/// longer frame takes the kernel's UDP socket on the underlay (and cannot use a fast
/// guest port at all).
pub const XSK_FRAME_DATA: usize = 2048 - 256;
