//! VXLAN headers (RFC 7348 §5): 8 bytes, the I flag and a 24-bit VNI.
//!
//! ```text
//!  0                   1                   2                   3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//! Reserved bits are sent as zero and ignored on receipt; a header without the I flag
//! carries no valid VNI and is `Malformed`.
//!
//! One extension, between Violin daemons only: remote checksum offload
//! (draft-herbert-vxlan-rco-00, Linux's `VXLAN_HF_RCO`). Flag bit 21 (`0x20` in the
//! second byte) says the inner L4 checksum was left partial (it holds the pseudo-header's
//! sum, as a virtio `NEEDS_CSUM` frame has it); the VNI word's last byte says where it
//! starts (bits 0-6: offset from the inner Ethernet header / 2) and which transport
//! (bit 7: UDP, else TCP). The outer UDP checksum, which covers the inner frame, stands
//! for it on the way; the receiver completes it only where the frame leaves for a
//! consumer that needs it.

use super::{Error, Result};

/// Byte offsets of the header's fields.
pub mod field {
    use core::ops::Range;
    pub const FLAGS: usize = 0;
    pub const VNI: Range<usize> = 4..7;
    pub const PAYLOAD: usize = 8;
}

/// Length of a VXLAN header.
pub const HEADER_LEN: usize = field::PAYLOAD;
/// The "VNI is valid" flag.
pub const FLAG_I: u8 = 0x08;
/// The remote-checksum-offload flag, in the second byte (bit 21 of the first word).
pub const FLAG_RCO: u8 = 0x20;
const RCO_UDP: u8 = 0x80;
const RCO_START: u8 = 0x7f;

/// Where a frame's partial inner L4 checksum lies (remote checksum offload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rco {
    /// Offset of the L4 header from the inner Ethernet header (even, at most 254).
    pub start: u16,
    /// UDP (checksum at `start + 6`), else TCP (`start + 16`).
    pub udp: bool,
}

impl Rco {
    /// The RCO for an L4 header at `start`, if the header can say it (even, ≤ 254).
    pub fn new(start: u16, udp: bool) -> Option<Rco> {
        (start.is_multiple_of(2) && start <= 2 * u16::from(RCO_START)).then_some(Rco { start, udp })
    }
    /// Offset of the checksum field from the L4 header.
    pub fn offset(&self) -> u16 {
        if self.udp {
            6
        } else {
            16
        }
    }
}

/// A zero-copy view of a VXLAN packet (header + inner Ethernet frame).
#[derive(Debug, Clone)]
pub struct VxlanPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VxlanPacket<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        VxlanPacket { buffer }
    }
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    pub fn check_len(&self) -> Result<()> {
        if self.buffer.as_ref().len() < HEADER_LEN {
            Err(Error::Truncated)
        } else {
            Ok(())
        }
    }
    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }
    pub fn vni(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::VNI];
        u32::from_be_bytes([0, b[0], b[1], b[2]])
    }
    /// The remote checksum offload the header announces, if any.
    pub fn rco(&self) -> Option<Rco> {
        let b = self.buffer.as_ref();
        (b[1] & FLAG_RCO != 0).then(|| Rco {
            start: u16::from(b[7] & RCO_START) << 1,
            udp: b[7] & RCO_UDP != 0,
        })
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VxlanPacket<T> {
    /// Writes the I flag and the VNI, zeroing every reserved bit.
    pub fn set_header(&mut self, vni: u32) {
        let b = self.buffer.as_mut();
        b[..HEADER_LEN].fill(0);
        b[field::FLAGS] = FLAG_I;
        b[field::VNI].copy_from_slice(&vni.to_be_bytes()[1..]);
    }
    /// Announces a partial inner checksum (`Rco::new` bounds `start`).
    pub fn set_rco(&mut self, r: Rco) {
        let b = self.buffer.as_mut();
        b[1] |= FLAG_RCO;
        b[7] = (r.start >> 1) as u8 & RCO_START | if r.udp { RCO_UDP } else { 0 };
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// A VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanRepr {
    pub vni: u32,
    /// Remote checksum offload: the inner frame's L4 checksum is partial.
    pub rco: Option<Rco>,
}

impl VxlanRepr {
    pub fn parse<T: AsRef<[u8]>>(p: &VxlanPacket<T>) -> Result<VxlanRepr> {
        p.check_len()?;
        if p.flags() & FLAG_I == 0 {
            return Err(Error::Malformed);
        }
        Ok(VxlanRepr {
            vni: p.vni(),
            rco: p.rco(),
        })
    }
    /// A plain header for `vni`.
    pub const fn new(vni: u32) -> VxlanRepr {
        VxlanRepr { vni, rco: None }
    }
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }
    /// The header as bytes, for transports that send it from its own buffer.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.emit(&mut VxlanPacket::new_unchecked(&mut b[..]));
        b
    }
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut VxlanPacket<T>) {
        p.set_header(self.vni);
        if let Some(r) = self.rco {
            p.set_rco(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // VNI 101 = 0x000065, then a 2-byte stand-in for the inner frame.
    static PACKET: [u8; 10] = [0x08, 0, 0, 0, 0x00, 0x00, 0x65, 0x00, 0xab, 0xcd];

    #[test]
    fn deconstruct() {
        let p = VxlanPacket::new_checked(&PACKET[..]).unwrap();
        assert_eq!(VxlanRepr::parse(&p).unwrap(), VxlanRepr::new(101));
        assert_eq!(p.payload(), &[0xab, 0xcd]);
    }

    #[test]
    fn construct() {
        let mut buf = [0xffu8; 10];
        buf[8..].copy_from_slice(&[0xab, 0xcd]);
        VxlanRepr::new(101).emit(&mut VxlanPacket::new_unchecked(&mut buf[..]));
        assert_eq!(buf, PACKET);
        assert_eq!(VxlanRepr::new(101).to_bytes(), PACKET[..8]);
    }

    #[test]
    fn largest_vni() {
        let b = VxlanRepr::new(0xff_ffff).to_bytes();
        assert_eq!(b, [0x08, 0, 0, 0, 0xff, 0xff, 0xff, 0]);
        let p = VxlanPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.vni(), 0xff_ffff);
    }

    #[test]
    fn reserved_bits_ignored_i_flag_required() {
        let mut b = PACKET;
        b[0] = 0x88; // a reserved bit set as well
        b[7] = 0x5a; // read only with the RCO flag
        let p = VxlanPacket::new_checked(&b[..]).unwrap();
        assert_eq!(VxlanRepr::parse(&p).unwrap(), VxlanRepr::new(101));
        b[0] = 0x00;
        let p = VxlanPacket::new_checked(&b[..]).unwrap();
        assert_eq!(VxlanRepr::parse(&p).unwrap_err(), Error::Malformed);
    }

    /// What Linux's vxlan driver sends with `remcsumtx` for TCP/IPv4 (inner L4 header at
    /// 34: start 17; TCP) and UDP/IPv6 (at 54: 27 | 0x80), VNI 101.
    #[test]
    fn remote_checksum_offload_round_trips_linux_encoding() {
        let tcp = [0x08, 0x20, 0, 0, 0x00, 0x00, 0x65, 17];
        let udp6 = [0x08, 0x20, 0, 0, 0x00, 0x00, 0x65, 0x80 | 27];
        for (bytes, start, udp) in [(tcp, 34, false), (udp6, 54, true)] {
            let r = VxlanRepr {
                vni: 101,
                rco: Rco::new(start, udp),
            };
            assert_eq!(r.to_bytes(), bytes);
            let p = VxlanPacket::new_checked(&bytes[..]).unwrap();
            assert_eq!(VxlanRepr::parse(&p).unwrap(), r);
        }
        assert_eq!(Rco::new(34, false).unwrap().offset(), 16);
        assert_eq!(Rco::new(54, true).unwrap().offset(), 6);
        assert_eq!(Rco::new(35, false), None, "odd offsets cannot be said");
        assert_eq!(Rco::new(256, false), None);
        assert!(Rco::new(254, false).is_some());
    }

    #[test]
    fn impossible_length() {
        assert_eq!(
            VxlanPacket::new_checked(&PACKET[..7]).unwrap_err(),
            Error::Truncated
        );
    }
}
