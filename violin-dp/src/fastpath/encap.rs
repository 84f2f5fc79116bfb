//! VXLAN encapsulation around the switch: the header a transport prepends to a frame
//! bound for a tunnel, and the check of a received VXLAN payload before switching.

use violin_common::wire::{VxlanPacket, VxlanRepr};
use violin_common::Verdict;

/// The 8-byte VXLAN header for `vni`.
#[inline]
pub fn header(vni: u32) -> [u8; 8] {
    VxlanRepr { vni }.to_bytes()
}

/// Splits a received UDP payload into (VNI, inner frame), or says why it is not VXLAN.
#[inline]
pub fn decap(payload: &[u8]) -> Result<(u32, &[u8]), Verdict> {
    let p = VxlanPacket::new_checked(payload)?;
    let r = VxlanRepr::parse(&p)?;
    Ok((r.vni, &payload[r.buffer_len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut pkt = header(0xabcdef).to_vec();
        pkt.extend_from_slice(&[1, 2, 3]);
        assert_eq!(decap(&pkt), Ok((0xabcdef, &[1u8, 2, 3][..])));
    }

    #[test]
    fn bad_vxlan() {
        assert_eq!(decap(&[0x08, 0, 0]), Err(Verdict::Truncated));
        assert_eq!(decap(&[0; 20]), Err(Verdict::Malformed));
    }
}
