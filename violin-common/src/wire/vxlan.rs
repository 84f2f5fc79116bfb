//! VXLAN headers (RFC 7348 §5): 8 bytes, the I flag and a 24-bit VNI.
//!
//! ```text
//!  0                   1                   2                   3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//! Reserved bits are sent as zero and ignored on receipt; a header without the I flag
//! carries no valid VNI and is `Malformed`.

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
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// A VXLAN header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanRepr {
    pub vni: u32,
}

impl VxlanRepr {
    pub fn parse<T: AsRef<[u8]>>(p: &VxlanPacket<T>) -> Result<VxlanRepr> {
        p.check_len()?;
        if p.flags() & FLAG_I == 0 {
            return Err(Error::Malformed);
        }
        Ok(VxlanRepr { vni: p.vni() })
    }
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }
    /// The header as bytes, for transports that send it from its own buffer.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        VxlanPacket::new_unchecked(&mut b[..]).set_header(self.vni);
        b
    }
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut VxlanPacket<T>) {
        p.set_header(self.vni)
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
        assert_eq!(VxlanRepr::parse(&p).unwrap(), VxlanRepr { vni: 101 });
        assert_eq!(p.payload(), &[0xab, 0xcd]);
    }

    #[test]
    fn construct() {
        let mut buf = [0xffu8; 10];
        buf[8..].copy_from_slice(&[0xab, 0xcd]);
        VxlanRepr { vni: 101 }.emit(&mut VxlanPacket::new_unchecked(&mut buf[..]));
        assert_eq!(buf, PACKET);
        assert_eq!(VxlanRepr { vni: 101 }.to_bytes(), PACKET[..8]);
    }

    #[test]
    fn largest_vni() {
        let b = VxlanRepr { vni: 0xff_ffff }.to_bytes();
        assert_eq!(b, [0x08, 0, 0, 0, 0xff, 0xff, 0xff, 0]);
        let p = VxlanPacket::new_checked(&b[..]).unwrap();
        assert_eq!(p.vni(), 0xff_ffff);
    }

    #[test]
    fn reserved_bits_ignored_i_flag_required() {
        let mut b = PACKET;
        b[0] = 0x88; // a reserved bit set as well
        b[7] = 0x5a;
        let p = VxlanPacket::new_checked(&b[..]).unwrap();
        assert_eq!(VxlanRepr::parse(&p).unwrap(), VxlanRepr { vni: 101 });
        b[0] = 0x00;
        let p = VxlanPacket::new_checked(&b[..]).unwrap();
        assert_eq!(VxlanRepr::parse(&p).unwrap_err(), Error::Malformed);
    }

    #[test]
    fn impossible_length() {
        assert_eq!(
            VxlanPacket::new_checked(&PACKET[..7]).unwrap_err(),
            Error::Truncated
        );
    }
}
