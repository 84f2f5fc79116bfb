//! Token buckets of links and guests (bytes, and optionally packets).
//!
//! A bucket is used two ways. A *policer* admits a frame only if it holds its tokens
//! (`take`): what cannot be held back — frames arriving from an external VTEP — is
//! dropped over the rate. A *shaper* charges every frame it lets go (`charge`), which may
//! leave the bucket in debt, and nothing more goes until the debt is paid back
//! (`ready_at`): a guest over its cap is simply not read until then, and a capped link's
//! queue is released on that schedule ([`super::shape`]). Debt lets a 64 KiB
//! super-frame through a bucket shallower than itself, and keeps the long-run rate
//! exact whatever the frame sizes.
//!
//! Time is passed in as nanoseconds on any monotonic clock; nothing here reads a clock,
//! so the buckets are tested against an injected one. Refill arithmetic is exact: tokens
//! accrue as `elapsed_ns × rate / 1e9` in u128, and the sub-token remainder is carried
//! to the next refill instead of being lost (at 1 Mbit/s a frame arrives every ~12 µs,
//! so dropping remainders would skew low rates noticeably).

use crate::spec::Rate;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// One token bucket: `capacity` tokens deep, refilled at `rate` tokens per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: u64,
    rate: u64,
    /// Below zero while a shaper is in debt.
    tokens: i64,
    /// Numerator of a fractional token, in units of 1/1e9 token.
    remainder: u128,
    last_ns: u64,
}

impl TokenBucket {
    /// A full bucket. `None` when `rate` or `capacity` is zero (a disabled limit).
    pub fn new(rate: u64, capacity: u64, now_ns: u64) -> Option<TokenBucket> {
        (rate > 0 && capacity > 0).then_some(TokenBucket {
            capacity,
            rate,
            tokens: capacity.min(i64::MAX as u64) as i64,
            remainder: 0,
            last_ns: now_ns,
        })
    }

    fn refill(&mut self, now_ns: u64) {
        // A clock that steps back (another CPU's reading) adds nothing and keeps `last`.
        let Some(elapsed) = now_ns.checked_sub(self.last_ns) else {
            return;
        };
        self.last_ns = now_ns;
        let full = self.capacity as i64;
        if self.tokens >= full {
            self.remainder = 0;
            return;
        }
        let accrued = u128::from(elapsed) * u128::from(self.rate) + self.remainder;
        let whole = accrued / NANOS_PER_SEC;
        self.remainder = accrued % NANOS_PER_SEC;
        let room = (full - self.tokens) as u128;
        if whole >= room {
            self.tokens = full;
            self.remainder = 0;
        } else {
            self.tokens += whole as i64;
        }
    }

    /// Takes `n` tokens if the bucket holds them (policing).
    pub fn take(&mut self, n: u64, now_ns: u64) -> bool {
        self.refill(now_ns);
        if self.tokens >= n as i64 {
            self.tokens -= n as i64;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens whatever the bucket holds, into debt if need be (shaping).
    pub fn charge(&mut self, n: u64, now_ns: u64) {
        self.refill(now_ns);
        self.tokens = self.tokens.saturating_sub(n.min(i64::MAX as u64) as i64);
    }

    /// The tokens held at `now_ns` (negative: the debt).
    pub fn credit(&mut self, now_ns: u64) -> i64 {
        self.refill(now_ns);
        self.tokens
    }

    /// When the bucket next holds at least one token: `now_ns` if it does now.
    pub fn ready_at(&mut self, now_ns: u64) -> u64 {
        self.refill(now_ns);
        if self.tokens > 0 {
            return now_ns;
        }
        // Whole tokens still owed, in 1e-9 tokens, less the fraction already accrued.
        let owed = (1 - self.tokens) as u128 * NANOS_PER_SEC - self.remainder;
        let wait = owed.div_ceil(u128::from(self.rate));
        now_ns.saturating_add(wait.min(u128::from(u64::MAX)) as u64)
    }

    /// Returns tokens taken for a frame that was then dropped elsewhere.
    pub fn give_back(&mut self, n: u64) {
        self.tokens = (self.tokens + n as i64).min(self.capacity as i64);
    }

    pub fn tokens(&self) -> i64 {
        self.tokens
    }
    pub fn capacity(&self) -> u64 {
        self.capacity
    }
}

/// A byte bucket and an optional packet bucket, policed together the way Firecracker's
/// rate limiter does: take the packet token, then the bytes; if the bytes fail, give the
/// packet token back.
#[derive(Debug, Clone)]
pub struct Policer {
    bytes: TokenBucket,
    packets: Option<TokenBucket>,
}

impl Policer {
    pub fn new(rate: &Rate, now_ns: u64) -> Option<Policer> {
        let bytes = TokenBucket::new(rate.bytes_per_sec, rate.burst_bytes, now_ns)?;
        let packets = rate
            .pps
            .and_then(|p| TokenBucket::new(p, rate.burst_packets(), now_ns));
        Some(Policer { bytes, packets })
    }

    /// Admits a frame of `len` bytes, or leaves both buckets as they were.
    pub fn admit(&mut self, len: usize, now_ns: u64) -> bool {
        self.admit_n(1, len, now_ns)
    }

    /// Admits `frames` frames of `bytes` bytes in all (the segments of a super-frame),
    /// all or nothing.
    pub fn admit_n(&mut self, frames: u32, bytes: usize, now_ns: u64) -> bool {
        if let Some(p) = &mut self.packets {
            if !p.take(u64::from(frames), now_ns) {
                return false;
            }
        }
        if self.bytes.take(bytes as u64, now_ns) {
            return true;
        }
        if let Some(p) = &mut self.packets {
            p.give_back(u64::from(frames));
        }
        false
    }

    /// Charges `frames` frames of `bytes` bytes that are let go (shaping: into debt if
    /// need be).
    pub fn charge_n(&mut self, frames: u32, bytes: usize, now_ns: u64) {
        if let Some(p) = &mut self.packets {
            p.charge(u64::from(frames), now_ns);
        }
        self.bytes.charge(bytes as u64, now_ns);
    }

    /// What may go now before the buckets run dry: (frames, bytes), each at least 1
    /// when nothing is owed; `None` while in debt.
    pub fn allowance(&mut self, now_ns: u64) -> Option<(u64, u64)> {
        let bytes = self.bytes.credit(now_ns);
        let frames = match &mut self.packets {
            Some(p) => p.credit(now_ns),
            None => i64::MAX,
        };
        (bytes > 0 && frames > 0).then_some((frames as u64, bytes as u64))
    }

    /// When both buckets next hold a token (`now_ns` if they do).
    pub fn ready_at(&mut self, now_ns: u64) -> u64 {
        let b = self.bytes.ready_at(now_ns);
        match &mut self.packets {
            Some(p) => b.max(p.ready_at(now_ns)),
            None => b,
        }
    }

    /// Undoes one `admit_n` (the frames were then refused by a later check).
    pub fn refund(&mut self, frames: u32, bytes: usize) {
        self.bytes.give_back(bytes as u64);
        if let Some(p) = &mut self.packets {
            p.give_back(u64::from(frames));
        }
    }

    /// The most bytes one admission can take.
    pub fn depth(&self) -> u64 {
        self.bytes.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    #[test]
    fn disabled_when_zero() {
        assert!(TokenBucket::new(0, 100, 0).is_none());
        assert!(TokenBucket::new(100, 0, 0).is_none());
    }

    #[test]
    fn starts_full_and_empties() {
        let mut b = TokenBucket::new(1000, 1500, 0).unwrap();
        assert!(b.take(1500, 0));
        assert!(!b.take(1, 0));
        // 1 ms at 1000 tokens/s = 1 token.
        assert!(b.take(1, MS));
        assert!(!b.take(1, MS));
    }

    #[test]
    fn refill_is_capped_at_capacity() {
        let mut b = TokenBucket::new(1_000_000, 2000, 0).unwrap();
        assert!(b.take(2000, 0));
        assert!(!b.take(2001, 100 * SEC));
        assert_eq!(b.tokens(), 2000);
    }

    #[test]
    fn fractional_tokens_are_carried_not_lost() {
        // 3 tokens/s, refilled every 100 ms: each refill accrues 0.3 tokens. Without the
        // carried remainder nothing would ever accrue.
        let mut b = TokenBucket::new(3, 10, 0).unwrap();
        assert!(b.take(10, 0));
        let mut got = 0;
        for i in 1..=100u64 {
            if b.take(1, i * 100 * MS) {
                got += 1;
            }
        }
        assert_eq!(got, 30, "10 s at 3 tokens/s");
    }

    #[test]
    fn clock_going_backwards_adds_nothing() {
        let mut b = TokenBucket::new(1000, 1000, 10 * SEC).unwrap();
        assert!(b.take(1000, 10 * SEC));
        assert!(!b.take(1, 5 * SEC));
        assert!(b.take(1, 10 * SEC + MS));
    }

    #[test]
    fn a_shaper_goes_into_debt_and_says_when_it_is_out() {
        // 1000 bytes/s, 100 deep: a 1500-byte frame leaves 1400 owed.
        let mut b = TokenBucket::new(1000, 100, 0).unwrap();
        b.charge(1500, 0);
        assert_eq!(b.credit(0), -1400);
        // One token back needs 1401 tokens: 1.401 s.
        assert_eq!(b.ready_at(0), 1_401 * MS);
        assert_eq!(
            b.ready_at(SEC),
            1_401 * MS,
            "the same deadline from later on"
        );
        assert!(b.credit(1_400 * MS) <= 0);
        assert_eq!(b.credit(1_401 * MS), 1);
        assert_eq!(b.ready_at(1_401 * MS), 1_401 * MS);
    }

    #[test]
    fn ready_at_counts_the_fraction_already_accrued() {
        // 3 tokens/s: after 0.2 s, 0.6 of the token owed has accrued; the rest takes
        // 0.1333… s, rounded up to the nanosecond.
        let mut b = TokenBucket::new(3, 10, 0).unwrap();
        b.charge(10, 0);
        assert_eq!(b.credit(200 * MS), 0);
        assert_eq!(b.ready_at(200 * MS), 333_333_334);
        assert_eq!(b.credit(333_333_334), 1);
    }

    #[test]
    fn shaping_keeps_the_long_run_rate_whatever_the_frame_sizes() {
        // A sender that sends whenever the shaper allows, frames of 64 B to 64 KiB, for
        // 10 s of injected time at 1 Mbit/s with a small bucket.
        let rate = Rate {
            bytes_per_sec: 125_000,
            burst_bytes: 6_000,
            pps: None,
        };
        let mut p = Policer::new(&rate, 0).unwrap();
        let sizes = [64usize, 1514, 65_000, 300, 9_000];
        let (mut sent, mut t, mut i) = (0u64, 0u64, 0usize);
        while t < 10 * SEC {
            if p.allowance(t).is_some() {
                let n = sizes[i % sizes.len()];
                p.charge_n(1, n, t);
                sent += n as u64;
                i += 1;
            } else {
                t = p.ready_at(t);
            }
        }
        // What went is the rate, the bucket, and at most one frame of overshoot.
        let expected = 10 * rate.bytes_per_sec + rate.burst_bytes;
        assert!(sent >= expected, "{sent} < {expected}");
        assert!(sent <= expected + 65_000, "{sent} bytes for {expected}");
    }

    #[test]
    fn allowance_is_the_smaller_of_both_buckets() {
        let rate = Rate {
            bytes_per_sec: 1_000_000,
            burst_bytes: 10_000,
            pps: Some(1000),
        };
        let mut p = Policer::new(&rate, 0).unwrap();
        assert_eq!(p.allowance(0), Some((rate.burst_packets(), 10_000)));
        p.charge_n(rate.burst_packets() as u32, 64, 0);
        assert_eq!(p.allowance(0), None, "out of packets");
        assert_eq!(p.ready_at(0), MS, "one packet token per ms");
        assert_eq!(p.allowance(MS).map(|a| a.0), Some(1));
    }

    #[test]
    fn long_run_rate_matches_configuration() {
        // 50 Mbit/s, 1442-byte frames offered at 2× the rate for 10 s of injected time.
        let rate = Rate {
            bytes_per_sec: 6_250_000,
            burst_bytes: 62_500,
            pps: None,
        };
        let mut p = Policer::new(&rate, 0).unwrap();
        let frame = 1442u64;
        let interval = frame * SEC / (2 * rate.bytes_per_sec);
        let (mut passed, mut t) = (0u64, 0u64);
        while t < 10 * SEC {
            if p.admit(frame as usize, t) {
                passed += frame;
            }
            t += interval;
        }
        let expected = rate.bytes_per_sec * 10 + rate.burst_bytes;
        let err = (passed as f64 - expected as f64).abs() / expected as f64;
        assert!(
            err < 0.005,
            "passed {passed} bytes, expected {expected} ({:.3}%)",
            err * 100.0
        );
    }

    #[test]
    fn packet_bucket_limits_small_frames_and_refunds() {
        let rate = Rate {
            bytes_per_sec: 1_000_000_000,
            burst_bytes: 1_000_000,
            pps: Some(1000),
        };
        let mut p = Policer::new(&rate, 0).unwrap();
        let burst = rate.burst_packets();
        for _ in 0..burst {
            assert!(p.admit(64, 0));
        }
        assert!(!p.admit(64, 0), "packet bucket empty");
        assert!(p.admit(64, MS), "1 ms at 1000 pps");
        // Bytes fail → the packet token comes back.
        let rate = Rate {
            bytes_per_sec: 1000,
            burst_bytes: 1600,
            pps: Some(1000),
        };
        let mut p = Policer::new(&rate, 0).unwrap();
        assert!(p.admit(1500, 0));
        let before = p.packets.as_ref().unwrap().tokens();
        assert!(!p.admit(1500, 0));
        assert_eq!(p.packets.as_ref().unwrap().tokens(), before);
        p.refund(1, 1500);
        assert!(p.admit(1500, 0));
    }
}
