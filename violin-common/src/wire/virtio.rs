//! The virtio-net header (`struct virtio_net_hdr`, virtio 1.x §5.1.6): the 10 bytes a
//! tap with `IFF_VNET_HDR` puts before every frame, saying whether it is a super-frame
//! (GSO type and segment size) and where its checksum is still to be completed.
//! Little-endian, as a tap on a little-endian host speaks it.

use super::{Error, Result};

/// Length of the header (without the `num_buffers` of mergeable receive buffers).
pub const HEADER_LEN: usize = 10;

/// `flags`: the checksum from `csum_start` to the end is still to be computed and
/// stored at `csum_start + csum_offset`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was verified.
pub const F_DATA_VALID: u8 = 2;

/// What kind of super-frame a frame is (`gso_type`, ECN bit aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoType {
    None,
    TcpV4,
    TcpV6,
    /// UDP segmentation offload (`VIRTIO_NET_HDR_GSO_UDP_L4`), IPv4 or IPv6.
    UdpL4,
}

impl GsoType {
    const fn to_wire(self) -> u8 {
        match self {
            GsoType::None => 0,
            GsoType::TcpV4 => 1,
            GsoType::TcpV6 => 4,
            GsoType::UdpL4 => 5,
        }
    }
}

/// `gso_type` bit: the TCP super-frame carries CWR and must keep ECN semantics.
const GSO_ECN: u8 = 0x80;

/// The header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioNetRepr {
    pub flags: u8,
    pub gso_type: GsoType,
    /// Set together with `gso_type`: the ECN bit of a TCP super-frame.
    pub ecn: bool,
    /// Length of the headers before the payload (a hint: senders disagree on it).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetRepr {
    /// A plain frame with a complete checksum.
    pub const PLAIN: VirtioNetRepr = VirtioNetRepr {
        flags: 0,
        gso_type: GsoType::None,
        ecn: false,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads the first [`HEADER_LEN`] bytes of `b`. The legacy UDP fragmentation type
    /// (3) and unknown types are `Malformed`.
    pub fn parse(b: &[u8]) -> Result<VirtioNetRepr> {
        if b.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let le = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let gso_type = match b[1] & !GSO_ECN {
            0 => GsoType::None,
            1 => GsoType::TcpV4,
            4 => GsoType::TcpV6,
            5 => GsoType::UdpL4,
            _ => return Err(Error::Malformed),
        };
        Ok(VirtioNetRepr {
            flags: b[0],
            gso_type,
            ecn: b[1] & GSO_ECN != 0,
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    pub fn emit(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type.to_wire() | if self.ecn { GSO_ECN } else { 0 };
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a Linux tap handed over for a TCP/IPv4 super-frame of MSS 1398 (NEEDS_CSUM,
    /// TCPV4, hdr_len 66, gso_size 1398, csum_start 34, csum_offset 16).
    const TSO4: [u8; 10] = [0x01, 0x01, 0x42, 0x00, 0x76, 0x05, 0x22, 0x00, 0x10, 0x00];

    #[test]
    fn parse_emit_round_trip() {
        let r = VirtioNetRepr::parse(&TSO4).unwrap();
        assert_eq!(
            r,
            VirtioNetRepr {
                flags: F_NEEDS_CSUM,
                gso_type: GsoType::TcpV4,
                ecn: false,
                hdr_len: 66,
                gso_size: 1398,
                csum_start: 34,
                csum_offset: 16,
            }
        );
        let mut b = [0u8; HEADER_LEN];
        r.emit(&mut b);
        assert_eq!(b, TSO4);
    }

    #[test]
    fn refuses_short_and_unknown() {
        assert_eq!(VirtioNetRepr::parse(&TSO4[..9]), Err(Error::Truncated));
        let mut b = TSO4;
        b[1] = 3; // legacy UFO
        assert_eq!(VirtioNetRepr::parse(&b), Err(Error::Malformed));
        b[1] = 0x81; // TCPV4 | ECN
        let r = VirtioNetRepr::parse(&b).unwrap();
        assert!(r.ecn && r.gso_type == GsoType::TcpV4);
    }
}
