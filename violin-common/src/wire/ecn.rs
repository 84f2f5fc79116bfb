//! Explicit Congestion Notification (RFC 3168) in the IP header of an Ethernet frame:
//! what a shaper reads and writes when it marks a frame instead of dropping it.
//!
//! The two ECN bits are the low bits of IPv4's TOS byte and of IPv6's traffic class.
//! Marking sets them to CE (`0b11`) on a frame whose sender said it understands ECN
//! (ECT(0) or ECT(1)); an IPv4 header's checksum is updated incrementally (RFC 1624).
//! Frames under a VLAN tag, and anything but IPv4 and IPv6, are left alone.

use super::{get_u16, set_u16, EtherType};

/// The ECN field of a frame's IP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ecn {
    /// Not IPv4 or IPv6, or too short to hold the header.
    NotIp,
    /// The sender does not do ECN (`0b00`): a congested queue must drop it.
    NotEct,
    /// ECT(0) or ECT(1): may be marked.
    Capable,
    /// Already marked on the way.
    Ce,
}

const ETH: usize = 14;
const CE: u8 = 0b11;

fn of_bits(bits: u8) -> Ecn {
    match bits & CE {
        0 => Ecn::NotEct,
        CE => Ecn::Ce,
        _ => Ecn::Capable,
    }
}

/// Where the ECN bits are: the IP version and the offset of the byte holding them.
fn locate(frame: &[u8]) -> Option<(u8, usize)> {
    let ethertype = EtherType(get_u16(frame.get(..ETH)?, 12));
    let first = *frame.get(ETH)?;
    match (ethertype, first >> 4) {
        (EtherType::IPV4, 4) if frame.len() >= ETH + 20 && first & 0x0f >= 5 => Some((4, ETH + 1)),
        // IPv6: version (4 bits), traffic class (8), flow label (20); ECN is the
        // traffic class's low two bits, the high nibble's low two bits of byte 1.
        (EtherType::IPV6, 6) if frame.len() >= ETH + 40 => Some((6, ETH + 1)),
        _ => None,
    }
}

/// Reads the ECN field of `frame`.
pub fn ecn(frame: &[u8]) -> Ecn {
    match locate(frame) {
        None => Ecn::NotIp,
        Some((4, at)) => of_bits(frame[at]),
        Some((_, at)) => of_bits(frame[at] >> 4),
    }
}

/// Marks `frame` Congestion Experienced if it is ECN-capable. Returns the field as it
/// was: `Capable` means the frame is now marked.
pub fn mark_ce(frame: &mut [u8]) -> Ecn {
    let was = ecn(frame);
    if was != Ecn::Capable {
        return was;
    }
    match locate(frame) {
        Some((4, at)) => {
            let old = get_u16(frame, ETH);
            frame[at] |= CE;
            let new = get_u16(frame, ETH);
            // RFC 1624 eq. 3: HC' = ~(~HC + ~m + m').
            let hc = get_u16(frame, ETH + 10);
            let sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
            let folded = (sum & 0xffff) + (sum >> 16);
            let folded = (folded & 0xffff) + (folded >> 16);
            set_u16(frame, ETH + 10, !(folded as u16));
        }
        Some((_, at)) => frame[at] |= CE << 4,
        None => {}
    }
    was
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Ipv4Packet;

    /// An empty UDP datagram as Linux 6.x sent it with `IP_TOS` 0x02 (ECT(0)) from
    /// 10.0.0.1 to 10.0.0.2, captured on a veth (AF_PACKET): checksums the kernel's.
    const V4_ECT0: [u8; 42] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08,
        0x00, // Ethernet
        0x45, 0x02, 0x00, 0x1c, 0x1a, 0xb9, 0x40, 0x00, 0x40, 0x11, 0x0c, 0x14, // IPv4 …
        0x0a, 0x00, 0x00, 0x01, 0x0a, 0x00, 0x00, 0x02, // … addresses
        0x30, 0x39, 0x00, 0x35, 0x00, 0x08, 0x14, 0x1c, // UDP, empty
    ];

    #[test]
    fn fixture_checksum_is_valid() {
        assert!(Ipv4Packet::new_checked(&V4_ECT0[14..])
            .unwrap()
            .verify_checksum());
    }

    #[test]
    fn marks_ipv4_and_keeps_the_checksum_valid() {
        let mut f = V4_ECT0;
        assert_eq!(ecn(&f), Ecn::Capable);
        assert_eq!(mark_ce(&mut f), Ecn::Capable);
        assert_eq!(ecn(&f), Ecn::Ce);
        assert_eq!(f[15], 0x03);
        let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
        assert!(ip.verify_checksum());
        let marked = ip.checksum();
        // The same as a full recomputation.
        let mut full = f;
        Ipv4Packet::new_unchecked(&mut full[14..]).fill_checksum();
        assert_eq!(full, f);
        // Marking twice changes nothing.
        assert_eq!(mark_ce(&mut f), Ecn::Ce);
        assert_eq!(
            Ipv4Packet::new_checked(&f[14..]).unwrap().checksum(),
            marked
        );
    }

    #[test]
    fn every_dscp_and_checksum_stays_valid() {
        for tos in 0..=255u8 {
            let mut f = V4_ECT0;
            f[15] = tos;
            Ipv4Packet::new_unchecked(&mut f[14..]).fill_checksum();
            let was = mark_ce(&mut f);
            assert_eq!(was, of_bits(tos));
            let want = if was == Ecn::Capable { tos | 3 } else { tos };
            assert_eq!(f[15], want, "tos {tos:#x}");
            assert!(Ipv4Packet::new_checked(&f[14..]).unwrap().verify_checksum());
        }
    }

    #[test]
    fn leaves_not_ect_and_non_ip_alone() {
        let mut f = V4_ECT0;
        f[15] = 0;
        Ipv4Packet::new_unchecked(&mut f[14..]).fill_checksum();
        let before = f;
        assert_eq!(mark_ce(&mut f), Ecn::NotEct);
        assert_eq!(f, before);
        let mut arp = V4_ECT0;
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(mark_ce(&mut arp), Ecn::NotIp);
        assert_eq!(ecn(&V4_ECT0[..20]), Ecn::NotIp);
    }

    #[test]
    fn marks_ipv6_traffic_class() {
        let mut f = [0u8; 54];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        // Version 6, traffic class 0xb9 (DSCP 46, ECT(1)), flow label 0x12345.
        f[14..18].copy_from_slice(&[0x6b, 0x91, 0x23, 0x45]);
        assert_eq!(ecn(&f), Ecn::Capable);
        assert_eq!(mark_ce(&mut f), Ecn::Capable);
        assert_eq!(&f[14..18], &[0x6b, 0xb1, 0x23, 0x45]);
        assert_eq!(ecn(&f), Ecn::Ce);
    }
}
