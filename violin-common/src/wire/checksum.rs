//! The Internet checksum (RFC 1071): ones'-complement sum of 16-bit words.

use core::net::Ipv4Addr;

/// Ones'-complement sum of `data` (odd trailing byte padded with zero), folded to 16 bits.
///
/// Sums native-endian 32-bit words into a 64-bit accumulator and swaps once at the end:
/// RFC 1071 §2(B) (the sum is independent of byte order, up to one swap) and §2(C) (any
/// word size folds to the same result). No per-word byte swap, so the loop vectorises;
/// super-frames are summed on the fast path, so this runs over every byte they carry.
pub fn sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    // The last 1-3 bytes, zero-padded in place (the pad byte of an odd length included).
    let rest = words.remainder();
    let mut last = [0u8; 4];
    last[..rest.len()].copy_from_slice(rest);
    acc += u64::from(u32::from_ne_bytes(last));
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    let native = acc as u16;
    if cfg!(target_endian = "little") {
        native.swap_bytes()
    } else {
        native
    }
}

/// Adds partial sums without losing carries.
pub fn combine(parts: &[u16]) -> u16 {
    fold(parts.iter().map(|&p| u32::from(p)).sum())
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sum of the IPv4 pseudo header used by UDP and TCP checksums.
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u16) -> u16 {
    let s = src.octets();
    let d = dst.octets();
    let mut hdr = [0u8; 12];
    hdr[0..4].copy_from_slice(&s);
    hdr[4..8].copy_from_slice(&d);
    hdr[9] = protocol;
    hdr[10..12].copy_from_slice(&length.to_be_bytes());
    sum(&hdr)
}

/// Sum of the IPv6 pseudo header (RFC 8200 §8.1) for an upper-layer length `length`.
pub fn pseudo_header_v6(src: &[u8; 16], dst: &[u8; 16], next_header: u8, length: u32) -> u16 {
    let mut hdr = [0u8; 40];
    hdr[0..16].copy_from_slice(src);
    hdr[16..32].copy_from_slice(dst);
    hdr[32..36].copy_from_slice(&length.to_be_bytes());
    hdr[39] = next_header;
    sum(&hdr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the sum of these words is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum(&data), 0xddf2);
    }

    #[test]
    fn wide_sum_matches_word_by_word() {
        // Every length 0..300 and several alignments of one pseudo-random buffer.
        let mut buf = [0u8; 300];
        let mut x: u32 = 0x1234_5678;
        for b in buf.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 16) as u8;
        }
        for start in 0..4 {
            for end in start..buf.len() {
                let d = &buf[start..end];
                let mut acc: u32 = 0;
                for c in d.chunks(2) {
                    acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
                }
                assert_eq!(sum(d), fold(acc), "{start}..{end}");
            }
        }
    }

    #[test]
    fn inputs_past_128_kib_do_not_overflow() {
        // 0xffff words: the old 32-bit accumulator overflowed at 131 076 bytes.
        static DATA: [u8; 1 << 18] = [0xff; 1 << 18];
        for len in [131_076usize, 1 << 18] {
            assert_eq!(sum(&DATA[..len]), 0xffff, "{len} bytes");
        }
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }
}
