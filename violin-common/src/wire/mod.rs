//! Zero-copy views of the packet headers Violin reads and writes.
//!
//! Each format has a `Packet`/`Frame` view over any `AsRef<[u8]>` buffer
//! (`new_unchecked` → `check_len` → `new_checked`; after `check_len` passes no accessor
//! panics) and a `Repr`, the validated high-level form, with `parse`, `buffer_len` and
//! `emit`. The design follows smoltcp's `wire` module.

pub mod arp;
pub mod checksum;
pub mod ecn;
pub mod ethernet;
pub mod gso;
pub mod ipv4;
pub mod tcp;
pub mod tunnel;
pub mod udp;
pub mod virtio;
pub mod vxlan;

pub use arp::{ArpOperation, ArpPacket, ArpRepr};
pub use ethernet::{EtherType, EthernetAddress, EthernetFrame, EthernetRepr};
pub use ipv4::{IpProtocol, Ipv4Packet, Ipv4Repr};
pub use udp::{UdpPacket, UdpRepr};
pub use vxlan::{Rco, VxlanPacket, VxlanRepr};

/// Why a buffer could not be read as a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The buffer is shorter than the header (or than a length field says).
    Truncated,
    /// A field holds a value the format does not allow (bad version, checksum, flags…).
    Malformed,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::Truncated => "truncated",
            Error::Malformed => "malformed",
        })
    }
}

pub type Result<T> = core::result::Result<T, Error>;

#[inline]
pub(crate) fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub(crate) fn set_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
