//! Shaping of capped links: a bounded FIFO per link direction, released at the link's
//! rate.
//!
//! A frame for a capped link goes at once while nothing waits and the link's bucket has
//! credit; otherwise it is copied into the link's queue, and [`LinkShaper::release`]
//! lets queued frames go, oldest first, as the bucket refills (the worker's timer calls
//! it at [`LinkShaper::next_at`]). The queue holds about 20 ms at the link's rate and at
//! least two super-frames; a frame that does not fit is dropped (the only drop), and an
//! ECN-capable frame that joins a queue more than half full is marked CE instead of
//! waiting for the queue to overflow. TCP behind it sees a slower link, not a policer's
//! loss.
//!
//! The queue's storage is allocated the first time the link backs up, then kept: frames
//! are copied into a ring of bytes, with no allocation per frame.

use super::police::Policer;
use super::switch::Size;
use crate::spec::Rate;
use std::collections::VecDeque;
use violin_common::wire::ecn::{self, Ecn};
use violin_common::wire::gso::Gso;

/// How long a full queue takes to drain at the link's rate.
pub const QUEUE_NS: u64 = 20_000_000;
/// The largest frame a queue takes: a super-frame (Ethernet header and 64 KiB of IP).
pub const MAX_QUEUED_FRAME: usize = 14 + 65535;
/// The smallest frame, which bounds how many records a queue can hold.
const MIN_FRAME: usize = 60;

/// What became of a frame offered to a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// It may go now (the bucket is charged).
    Send,
    /// It waits in the queue (`marked`: with CE set on the way in).
    Queued { marked: bool },
    /// The queue is full: drop it.
    Full,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    off: usize,
    len: usize,
    gso: Option<Gso>,
    size: Size,
}

/// One direction of a capped link.
#[derive(Debug)]
pub struct LinkShaper {
    bucket: Policer,
    /// Most wire bytes queued at once.
    limit: usize,
    /// The ring of frame bytes (empty until the link first backs up).
    buf: Vec<u8>,
    records: VecDeque<Record>,
    /// Where the next frame is written in `buf`.
    write: usize,
    queued_bytes: usize,
    /// Frames marked CE, and frames dropped for a full queue.
    pub marked: u64,
    pub overflowed: u64,
}

impl LinkShaper {
    pub fn new(rate: &Rate, now_ns: u64) -> Option<LinkShaper> {
        Some(LinkShaper {
            bucket: Policer::new(rate, now_ns)?,
            limit: Self::limit_for(rate),
            buf: Vec::new(),
            records: VecDeque::new(),
            write: 0,
            queued_bytes: 0,
            marked: 0,
            overflowed: 0,
        })
    }

    /// The queue's bound for `rate`: [`QUEUE_NS`] at the rate, at least two super-frames.
    pub fn limit_for(rate: &Rate) -> usize {
        let at_rate = u128::from(rate.bytes_per_sec) * u128::from(QUEUE_NS) / 1_000_000_000;
        (at_rate.min(usize::MAX as u128) as usize).max(2 * MAX_QUEUED_FRAME)
    }

    /// Offers a frame (`gso`: a super-frame, `size` what it is on the wire) at `now`.
    pub fn offer(&mut self, frame: &[u8], gso: Option<&Gso>, size: Size, now: u64) -> Offer {
        if self.records.is_empty() && self.bucket.allowance(now).is_some() {
            self.bucket.charge_n(size.frames, size.bytes, now);
            return Offer::Send;
        }
        if frame.len() > MAX_QUEUED_FRAME || self.queued_bytes + size.bytes > self.limit {
            self.overflowed += 1;
            return Offer::Full;
        }
        let Some(off) = self.place(frame.len()) else {
            self.overflowed += 1;
            return Offer::Full;
        };
        let stored = &mut self.buf[off..off + frame.len()];
        stored.copy_from_slice(frame);
        let marked = self.queued_bytes > self.limit / 2 && ecn::mark_ce(stored) == Ecn::Capable;
        self.marked += u64::from(marked);
        self.records.push_back(Record {
            off,
            len: frame.len(),
            gso: gso.copied(),
            size,
        });
        self.write = off + frame.len();
        self.queued_bytes += size.bytes;
        Offer::Queued { marked }
    }

    /// Where a frame of `len` bytes fits in the ring, allocating it the first time.
    fn place(&mut self, len: usize) -> Option<usize> {
        if self.buf.is_empty() {
            self.buf = vec![0; self.limit + MAX_QUEUED_FRAME];
            self.records = VecDeque::with_capacity(self.limit / MIN_FRAME + 2);
        }
        if self.records.len() == self.records.capacity() {
            return None;
        }
        let Some(first) = self.records.front() else {
            return Some(0);
        };
        let read = first.off;
        if self.write >= read {
            // Unwrapped: room after the newest frame, else from the start up to the
            // oldest (strictly less, so a full ring never looks empty).
            if self.write + len <= self.buf.len() {
                Some(self.write)
            } else {
                (len < read).then_some(0)
            }
        } else {
            (self.write + len < read).then_some(self.write)
        }
    }

    /// Lets queued frames go, oldest first, while the bucket has credit at `now`; each
    /// goes to `send` with its GSO layout and wire size. Returns when the next can go (`None`: the
    /// queue is empty).
    pub fn release(
        &mut self,
        now: u64,
        mut send: impl FnMut(&[u8], Option<&Gso>, Size),
    ) -> Option<u64> {
        while let Some(r) = self.records.front().copied() {
            if self.bucket.allowance(now).is_none() {
                return Some(self.bucket.ready_at(now));
            }
            self.bucket.charge_n(r.size.frames, r.size.bytes, now);
            self.records.pop_front();
            self.queued_bytes -= r.size.bytes;
            send(&self.buf[r.off..r.off + r.len], r.gso.as_ref(), r.size);
        }
        self.write = 0;
        None
    }

    /// When the oldest queued frame can go; `None` when nothing waits.
    pub fn next_at(&mut self, now: u64) -> Option<u64> {
        if self.records.is_empty() {
            return None;
        }
        Some(self.bucket.ready_at(now))
    }

    /// Frames and wire bytes waiting.
    pub fn queued(&self) -> (usize, usize) {
        (self.records.len(), self.queued_bytes)
    }

    /// The byte bound of the queue.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Drops everything queued (the link went away); returns how many frames.
    pub fn clear(&mut self) -> usize {
        let n = self.records.len();
        self.records.clear();
        self.queued_bytes = 0;
        self.write = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn rate(bytes_per_sec: u64, burst: u64) -> Rate {
        Rate {
            bytes_per_sec,
            burst_bytes: burst,
            pps: None,
        }
    }

    /// An Ethernet + IPv4 frame of `len` bytes whose first payload byte is `tag`, with
    /// the given TOS.
    fn frame(len: usize, tag: u8, tos: u8) -> Vec<u8> {
        let mut f = vec![0u8; len];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[15] = tos;
        f[34] = tag;
        f
    }

    fn offer(s: &mut LinkShaper, f: &[u8], now: u64) -> Offer {
        s.offer(f, None, Size::plain(f.len()), now)
    }

    #[test]
    fn goes_at_once_while_the_bucket_has_credit() {
        let mut s = LinkShaper::new(&rate(125_000, 3000), 0).unwrap();
        let f = frame(1500, 0, 0);
        assert_eq!(offer(&mut s, &f, 0), Offer::Send);
        assert_eq!(offer(&mut s, &f, 0), Offer::Send);
        // 3000 − 3000 = 0 credit: the third waits, and so does everything after it.
        assert_eq!(offer(&mut s, &f, 0), Offer::Queued { marked: false });
        assert_eq!(s.queued(), (1, 1500));
        assert_eq!(s.next_at(0), Some(8_000)); // one byte at 125 kB/s
    }

    #[test]
    fn releases_in_order_at_the_rate() {
        // 1 Mbit/s; 100 frames of 1250 bytes offered at once; released on the deadlines
        // the shaper gives (as the worker's timer would) for 10 s.
        let mut s = LinkShaper::new(&rate(125_000, 1250), 0).unwrap();
        for i in 0..100u8 {
            let o = offer(&mut s, &frame(1250, i, 0), 0);
            assert!(matches!(o, Offer::Send | Offer::Queued { .. }), "{o:?}");
        }
        let mut got: Vec<(u8, u64)> = Vec::new();
        let mut now = 0;
        let mut next = s.next_at(now);
        while let Some(t) = next {
            now = t;
            next = s.release(now, |f, _, _| got.push((f[34], now)));
        }
        assert_eq!(got.len(), 99, "one went at once");
        assert!(got.windows(2).all(|w| w[0].0 + 1 == w[1].0), "in order");
        // The first queued goes once the bucket holds a byte again (8 µs), each next
        // one 1250 bytes at 125 000 bytes/s later: 10 ms apart.
        assert_eq!(got[0].1, 8_000);
        assert!(got.windows(2).all(|w| w[1].1 - w[0].1 == 10 * MS));
        assert_eq!(got.last().unwrap().1, 980 * MS + 8_000);
    }

    #[test]
    fn drops_only_when_full_and_marks_ect_past_half() {
        let r = rate(125_000_000, 1500); // 1 Gbit/s: a 2.5 MB queue
        let mut s = LinkShaper::new(&r, 0).unwrap();
        assert_eq!(s.limit(), 2_500_000);
        let plain = frame(1500, 0, 0x00);
        let ect = frame(1500, 0, 0x02);
        assert_eq!(offer(&mut s, &plain, 0), Offer::Send);
        let mut marked = 0;
        let mut queued = 0;
        loop {
            match offer(&mut s, &ect, 0) {
                Offer::Queued { marked: m } => {
                    queued += 1;
                    marked += usize::from(m);
                    assert_eq!(m, (queued - 1) * 1500 > 1_250_000, "frame {queued}");
                }
                Offer::Full => break,
                Offer::Send => panic!("no credit left"),
            }
        }
        assert_eq!(queued, 2_500_000 / 1500);
        assert_eq!(marked as u64, s.marked);
        assert!(marked > 0);
        assert_eq!(offer(&mut s, &plain, 0), Offer::Full);
        assert_eq!(s.overflowed, 2);
        // Marked copies carry CE; the first half does not.
        let mut ces = Vec::new();
        let mut now = 0;
        while let Some(t) = s.next_at(now) {
            now = t;
            s.release(now, |f, _, _| ces.push(ecn::ecn(f)));
        }
        // 2.5 MB at 125 MB/s: 20 ms.
        assert!((19 * MS..=20 * MS).contains(&now), "drained at {now} ns");
        assert_eq!(ces.len(), queued);
        assert_eq!(ces.iter().filter(|e| **e == Ecn::Ce).count(), marked);
        assert_eq!(ces[0], Ecn::Capable);
    }

    #[test]
    fn the_ring_wraps_and_keeps_frames_whole() {
        // A small queue (two super-frames) cycled many times with mixed sizes: what comes
        // out is what went in, in order.
        let r = rate(1_000_000, 1);
        let mut s = LinkShaper::new(&r, 0).unwrap();
        assert_eq!(s.limit(), 2 * MAX_QUEUED_FRAME);
        let sizes = [60usize, 1514, 65_549, 9000, 777, 40_000];
        let mut now = 0;
        let (mut sent, mut out) = (Vec::new(), Vec::new());
        for i in 0..600usize {
            let f = frame(sizes[i % sizes.len()], i as u8, 0);
            match offer(&mut s, &f, now) {
                Offer::Full => {
                    // Make room: release what is due a while later, until it fits.
                    let mut tries = 0;
                    loop {
                        now += 20 * MS;
                        s.release(now, |f, _, _| out.push((f.len(), f[34])));
                        match offer(&mut s, &f, now) {
                            Offer::Full => tries += 1,
                            Offer::Send => break out.push((f.len(), f[34])),
                            Offer::Queued { .. } => break,
                        }
                        assert!(tries < 20, "no room after 400 ms at 1 MB/s");
                    }
                }
                Offer::Send => out.push((f.len(), f[34])),
                Offer::Queued { .. } => {}
            }
            sent.push((f.len(), i as u8));
        }
        while let Some(t) = s.next_at(now) {
            now = t;
            s.release(now, |f, _, _| out.push((f.len(), f[34])));
        }
        assert_eq!(out, sent);
    }

    #[test]
    fn super_frames_are_charged_their_segments_and_keep_their_layout() {
        use violin_common::wire::gso::Kind;
        let mut s = LinkShaper::new(&rate(1_000_000, 1), 0).unwrap();
        let g = Gso {
            kind: Kind::Tcp4,
            l4: 34,
            hdr_len: 54,
            seg_size: 1448,
        };
        let f = frame(54 + 10 * 1448, 7, 0);
        let size = Size {
            frames: 10,
            bytes: 10 * (54 + 1448),
            largest: 54 + 1448,
        };
        assert_eq!(s.offer(&f, Some(&g), size, 0), Offer::Send);
        assert_eq!(
            s.offer(&f, Some(&g), size, 0),
            Offer::Queued { marked: false }
        );
        assert_eq!(s.queued(), (1, size.bytes));
        // The first left 15 019 bytes of debt: at 1 MB/s, 15.02 ms.
        assert_eq!(s.next_at(0), Some(15_020_000));
        let mut seen = None;
        assert_eq!(
            s.release(15_020_000, |b, gso, _| seen = Some((b.len(), gso.copied()))),
            None
        );
        assert_eq!(seen, Some((f.len(), Some(g))));
    }
}
