//! Segmentation and coalescing on arbitrary input, with the properties the data path
//! relies on checked:
//! - a super-frame's layout (`Gso::from_virtio`) either is refused or can be split: every
//!   segment is written within `Gso::largest` bytes, within Linux's bounds (at most 128
//!   UDP segments; TCP segments of at least 88 bytes);
//! - checksum completion stays inside the frame or refuses;
//! - the coalescer, fed frames of any kind, only ever finishes super-frames whose
//!   virtio header describes them (`Gso::from_virtio` accepts them).
//!
//! Input: a 10-byte virtio-net header and a frame, then the same bytes read as a
//! sequence of frames, each after its big-endian u16 length, for the coalescer (the
//! format of the kernel fixture `tso4_out.bin`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use violin_common::wire::gso::{
    complete_checksum, Coalescer, Gso, Kind, Push, TCP_MIN_SEG, UDP_MAX_SEGS,
};
use violin_common::wire::virtio::{VirtioNetRepr, F_NEEDS_CSUM, HEADER_LEN};

const BUF: usize = 14 + 65535 + 64;

fuzz_target!(|data: &[u8]| {
    if data.len() >= HEADER_LEN {
        let (hdr, frame) = data.split_at(HEADER_LEN);
        if let Ok(v) = VirtioNetRepr::parse(hdr) {
            if let Ok(Some(g)) = Gso::from_virtio(&v, frame) {
                let n = g.segments(frame.len());
                // Linux's own bounds: 128 UDP segments, TCP segments of 88 bytes or more.
                if matches!(g.kind, Kind::Udp4 | Kind::Udp6) {
                    assert!(n <= UDP_MAX_SEGS, "{n} UDP segments");
                } else {
                    assert!(
                        g.seg_size >= TCP_MIN_SEG,
                        "{} bytes per segment",
                        g.seg_size
                    );
                }
                let largest = g.largest(frame.len());
                let mut out = vec![0u8; BUF];
                for i in 0..n {
                    let len = g.write_segment(frame, i, &mut out);
                    assert!(len <= largest, "segment {i}: {len} > {largest}");
                }
                let _ = g.wire_len(frame.len());
            }
            if v.flags & F_NEEDS_CSUM != 0 {
                let mut f = frame.to_vec();
                let _ = complete_checksum(&mut f, v.csum_start.into(), v.csum_offset.into());
            }
        }
    }
    // UDP on: TCP coalesces the same either way, so this covers both.
    let mut c = Coalescer::new(true);
    let mut buf = vec![0u8; BUF];
    let mut rest = data;
    let mut finish = |c: &mut Coalescer, buf: &mut [u8]| {
        if let Some((v, len)) = c.finish(buf) {
            assert!(
                matches!(Gso::from_virtio(&v, &buf[..len]), Ok(Some(_)) | Ok(None)),
                "a coalesced super-frame its own header does not describe: {v:?}"
            );
        }
    };
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let f = &rest[2..2 + n];
        rest = &rest[2 + n..];
        match c.push(&mut buf, f) {
            Push::Added => {}
            Push::Flush => {
                finish(&mut c, &mut buf);
                if let Push::Alone = c.push(&mut buf, f) {
                    finish(&mut c, &mut buf);
                }
            }
            Push::Alone => finish(&mut c, &mut buf),
        }
    }
    finish(&mut c, &mut buf);
});
