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
