//! UDP headers (RFC 768) over IPv4.

use super::{checksum, get_u16, set_u16, Error, Result};
use core::net::Ipv4Addr;

/// Byte offsets of the header's fields.
pub mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
    pub const PAYLOAD: usize = 8;
}

/// Length of a UDP header.
pub const HEADER_LEN: usize = field::PAYLOAD;

/// A zero-copy view of a UDP datagram.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        UdpPacket { buffer }
    }
    pub fn new_checked(buffer: T) -> Result<Self> {
        let p = Self::new_unchecked(buffer);
        p.check_len()?;
        Ok(p)
    }
    /// Checks the header fits and the length field lies between 8 and the buffer length.
    pub fn check_len(&self) -> Result<()> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let field_len = self.len() as usize;
        if field_len < HEADER_LEN {
            return Err(Error::Malformed);
        }
        if len < field_len {
            return Err(Error::Truncated);
        }
        Ok(())
    }
    pub fn src_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::SRC_PORT)
    }
    pub fn dst_port(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::DST_PORT)
    }
    pub fn len(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::LENGTH)
    }
    pub fn is_empty(&self) -> bool {
        self.len() as usize == HEADER_LEN
    }
    pub fn checksum(&self) -> u16 {
        get_u16(self.buffer.as_ref(), field::CHECKSUM)
    }
    /// True when the checksum is absent (zero, allowed over IPv4) or correct.
    pub fn verify_checksum(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        let len = self.len();
        let data = &self.buffer.as_ref()[..len as usize];
        checksum::combine(&[
            checksum::pseudo_header(src, dst, 17, len),
            checksum::sum(data),
        ]) == 0xffff
    }
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.len() as usize]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    pub fn set_src_port(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::SRC_PORT, v)
    }
    pub fn set_dst_port(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::DST_PORT, v)
    }
    pub fn set_len(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::LENGTH, v)
    }
    pub fn set_checksum(&mut self, v: u16) {
        set_u16(self.buffer.as_mut(), field::CHECKSUM, v)
    }
    /// Computes the checksum over header and payload (the length field must be set).
    pub fn fill_checksum(&mut self, src: Ipv4Addr, dst: Ipv4Addr) {
        self.set_checksum(0);
        let len = self.len();
        let sum = checksum::combine(&[
            checksum::pseudo_header(src, dst, 17, len),
            checksum::sum(&self.buffer.as_ref()[..len as usize]),
        ]);
        // RFC 768: a computed zero is sent as all ones.
        let c = !sum;
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.len() as usize;
        &mut self.buffer.as_mut()[HEADER_LEN..len]
    }
}

/// A UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpRepr {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload_len: usize,
}

impl UdpRepr {
    /// Parses the header; the checksum is checked only when `addrs` is given.
    pub fn parse<T: AsRef<[u8]>>(
        p: &UdpPacket<T>,
        addrs: Option<(Ipv4Addr, Ipv4Addr)>,
    ) -> Result<UdpRepr> {
        p.check_len()?;
        if let Some((s, d)) = addrs {
            if !p.verify_checksum(s, d) {
                return Err(Error::Malformed);
            }
        }
        Ok(UdpRepr {
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            payload_len: p.len() as usize - HEADER_LEN,
        })
    }
    pub const fn buffer_len(&self) -> usize {
        HEADER_LEN
    }
    /// Writes the header with a zero checksum (RFC 7348 §5 allows it for VXLAN over
    /// IPv4); call `fill_checksum` after the payload is in place to compute one.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, p: &mut UdpPacket<T>) {
        p.set_src_port(self.src_port);
        p.set_dst_port(self.dst_port);
        p.set_len((HEADER_LEN + self.payload_len) as u16);
        p.set_checksum(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

    // 49152 → 4789, 4 bytes payload, checksum computed by hand below.
    static PACKET: [u8; 12] = [
        0xc0, 0x00, 0x12, 0xb5, 0x00, 0x0c, 0x00, 0x00, 0xaa, 0x00, 0x00, 0xff,
    ];

    #[test]
    fn deconstruct() {
        let p = UdpPacket::new_checked(&PACKET[..]).unwrap();
        assert_eq!(p.src_port(), 49152);
        assert_eq!(p.dst_port(), 4789);
        assert_eq!(p.len(), 12);
        assert_eq!(p.payload(), &[0xaa, 0, 0, 0xff]);
        assert!(p.verify_checksum(SRC, DST), "zero checksum means none");
        let r = UdpRepr::parse(&p, Some((SRC, DST))).unwrap();
        assert_eq!(
            r,
            UdpRepr {
                src_port: 49152,
                dst_port: 4789,
                payload_len: 4
            }
        );
    }

    #[test]
    fn construct_and_checksum() {
        let mut buf = [0u8; 12];
        let mut p = UdpPacket::new_unchecked(&mut buf[..]);
        UdpRepr {
            src_port: 49152,
            dst_port: 4789,
            payload_len: 4,
        }
        .emit(&mut p);
        p.payload_mut().copy_from_slice(&[0xaa, 0, 0, 0xff]);
        assert_eq!(buf, PACKET);
        let mut p = UdpPacket::new_unchecked(&mut buf[..]);
        p.fill_checksum(SRC, DST);
        // Pseudo header: c0a8+0101+c0a8+0102+0011+000c = 0x1_8370 → 0x8371;
        // datagram: c000+12b5+000c+aa00+00ff = 0x1_7dc0 → 0x7dc1; total 0x1_0132 → 0x0133.
        assert_eq!(p.checksum(), !0x0133u16);
        assert!(p.verify_checksum(SRC, DST));
        buf[9] ^= 1;
        let p = UdpPacket::new_checked(&buf[..]).unwrap();
        assert!(!p.verify_checksum(SRC, DST));
        assert_eq!(
            UdpRepr::parse(&p, Some((SRC, DST))).unwrap_err(),
            Error::Malformed
        );
    }

    #[test]
    fn impossible_lengths() {
        assert_eq!(
            UdpPacket::new_checked(&PACKET[..7]).unwrap_err(),
            Error::Truncated
        );
        assert_eq!(
            UdpPacket::new_checked(&PACKET[..11]).unwrap_err(),
            Error::Truncated
        );
        let mut bad = PACKET;
        bad[5] = 7;
        assert_eq!(
            UdpPacket::new_checked(&bad[..]).unwrap_err(),
            Error::Malformed
        );
    }
}
