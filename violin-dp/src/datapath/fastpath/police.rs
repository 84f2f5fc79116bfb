//! Token-bucket policing of links and guests (bytes, and optionally packets).
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
    tokens: u64,
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
            tokens: capacity,
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
        if self.tokens == self.capacity {
            self.remainder = 0;
            return;
        }
        let accrued = u128::from(elapsed) * u128::from(self.rate) + self.remainder;
        let whole = accrued / NANOS_PER_SEC;
        self.remainder = accrued % NANOS_PER_SEC;
        let room = u128::from(self.capacity - self.tokens);
        if whole >= room {
            self.tokens = self.capacity;
            self.remainder = 0;
        } else {
            self.tokens += whole as u64;
        }
    }

    /// Takes `n` tokens if the bucket holds them.
    pub fn take(&mut self, n: u64, now_ns: u64) -> bool {
        self.refill(now_ns);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Returns tokens taken for a frame that was then dropped elsewhere.
    pub fn give_back(&mut self, n: u64) {
        self.tokens = (self.tokens + n).min(self.capacity);
    }

    pub fn tokens(&self) -> u64 {
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
