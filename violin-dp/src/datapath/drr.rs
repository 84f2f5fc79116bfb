//! The packet worker's service order: byte-based deficit round robin (Shreedhar and
//! Varghese; Linux `sch_drr`) over classes — one per Violin's guest ports, one per
//! Violin's AF_XDP socket, one for the host's shared underlay socket and hand-overs —
//! then round robin over the ready sources (sockets) of a class.
//!
//! Each round visits every class with a ready source once and adds a quantum (at least
//! one super-frame) to its deficit; the class's sources are read, in turn, for at most
//! a quantum each and at most what the deficit holds (a frame's size is known only once
//! it is read, so the last one may overshoot: the deficit goes below zero and the class
//! pays it back in later rounds). A source still holding frames goes to the back of its
//! class; a class still holding sources keeps its deficit for the next round, and an
//! emptied one loses it. So a flooding Violin gets one quantum
//! per round, whatever its frame sizes, and a quiet Violin's frame waits for at most
//! one quantum of each other class, never for a loud one's whole backlog.
//!
//! It knows sources only as poll tokens: reading them is the worker's (`serve`).

use mio::Token;
use std::collections::VecDeque;

/// Bytes a class may be served per round: one largest super-frame and some.
pub const QUANTUM: u64 = 66 * 1024;

/// What serving a source did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Bytes read (frames' lengths).
    pub bytes: u64,
    /// It still holds frames: serve it again next round.
    pub more: bool,
}

#[derive(Debug, Default)]
struct Class {
    /// Below zero after a frame overshot the budget: paid back in later rounds.
    deficit: i64,
    ready: VecDeque<Token>,
    listed: bool,
}

/// The classes with ready sources, and their deficits.
#[derive(Debug, Default)]
pub struct Drr {
    classes: Vec<Class>,
    active: VecDeque<usize>,
}

impl Drr {
    /// Makes room for classes up to `class` (control time, so that marking a source
    /// ready never allocates).
    pub fn reserve(&mut self, class: usize, sources: usize) {
        if self.classes.len() <= class {
            self.classes.resize_with(class + 1, Class::default);
        }
        let c = &mut self.classes[class];
        c.ready.reserve(sources.saturating_sub(c.ready.len()));
        let n = self.classes.len();
        self.active.reserve(n.saturating_sub(self.active.len()));
    }

    /// Source `src` of `class` has frames to read.
    pub fn ready(&mut self, class: usize, src: Token) {
        if self.classes.len() <= class {
            self.reserve(class, 4);
        }
        let c = &mut self.classes[class];
        if !c.ready.contains(&src) {
            c.ready.push_back(src);
        }
        if !c.listed {
            c.listed = true;
            self.active.push_back(class);
        }
    }

    /// Forgets a source (its port or socket went away).
    pub fn forget(&mut self, src: Token) {
        for c in &mut self.classes {
            c.ready.retain(|t| *t != src);
        }
    }

    /// Nothing is waiting to be read.
    pub fn is_idle(&self) -> bool {
        self.active.is_empty()
    }

    /// One round: every class ready at its start is visited once; `serve(src, budget)`
    /// reads up to `budget` bytes from `src` (a frame may overshoot it).
    pub fn round(&mut self, mut serve: impl FnMut(Token, u64) -> Served) {
        for _ in 0..self.active.len() {
            let Some(k) = self.active.pop_front() else {
                break;
            };
            let c = &mut self.classes[k];
            c.deficit = c.deficit.saturating_add(QUANTUM as i64);
            for _ in 0..c.ready.len() {
                if c.deficit <= 0 {
                    break;
                }
                let Some(src) = c.ready.pop_front() else {
                    break;
                };
                let s = serve(src, (c.deficit as u64).min(QUANTUM));
                c.deficit = c
                    .deficit
                    .saturating_sub(s.bytes.min(i64::MAX as u64) as i64);
                if s.more {
                    c.ready.push_back(src);
                }
            }
            if c.ready.is_empty() {
                c.deficit = 0;
                c.listed = false;
            } else {
                self.active.push_back(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    /// Sources with queued frames of fixed sizes; serving reads whole frames until the
    /// budget is spent (the last may overshoot it), like the worker's transports.
    struct Backlog(HashMap<Token, (u64, usize)>);

    impl Backlog {
        fn serve(&mut self, src: Token, budget: u64, log: &mut Vec<(Token, u64)>) -> Served {
            let (size, left) = self.0.get_mut(&src).unwrap();
            let mut bytes = 0;
            while *left > 0 && bytes < budget {
                *left -= 1;
                bytes += *size;
                log.push((src, *size));
            }
            Served {
                bytes,
                more: *left > 0,
            }
        }
    }

    #[test]
    fn a_quiet_class_waits_for_one_quantum_of_a_loud_one_at_most() {
        let (loud, quiet) = (Token(1), Token(2));
        let mut b = Backlog(HashMap::from([(loud, (65_549, 1000)), (quiet, (100, 1))]));
        let mut d = Drr::default();
        d.ready(1, loud);
        d.ready(2, quiet);
        let mut log = Vec::new();
        d.round(|s, budget| b.serve(s, budget, &mut log));
        let before: u64 = log
            .iter()
            .take_while(|(s, _)| *s != quiet)
            .map(|(_, n)| n)
            .sum();
        assert!(
            log.iter().any(|(s, _)| *s == quiet),
            "served in the first round"
        );
        // A quantum, and the frame that crossed it.
        assert!(
            before <= QUANTUM + 65_549,
            "{before} bytes of the loud class first"
        );
    }

    #[test]
    fn classes_get_equal_bytes_whatever_their_frame_sizes() {
        // Small frames, MTU frames and super-frames, all backlogged for 200 rounds.
        let srcs = [(Token(1), 64u64), (Token(2), 1514), (Token(3), 65_549)];
        let mut b = Backlog(srcs.iter().map(|&(t, n)| (t, (n, usize::MAX))).collect());
        let mut d = Drr::default();
        for (i, (t, _)) in srcs.iter().enumerate() {
            d.ready(i, *t);
        }
        let mut log = Vec::new();
        for _ in 0..200 {
            d.round(|s, budget| b.serve(s, budget, &mut log));
        }
        let mut got: BTreeMap<Token, u64> = BTreeMap::new();
        for (s, n) in log {
            *got.entry(s).or_default() += n;
        }
        let (lo, hi) = (got.values().min().unwrap(), got.values().max().unwrap());
        // Within one frame's overshoot per class, out of 200 quanta each.
        assert!(hi - lo <= 2 * 65_549, "{got:?}");
        assert!(*lo >= 199 * QUANTUM, "{got:?}");
    }

    #[test]
    fn sources_of_a_class_share_its_quantum_in_turn() {
        // One Violin with three busy guests and another with one: the lone guest gets
        // half the bytes, the three a sixth each.
        let mut b = Backlog((1..=4).map(|i| (Token(i), (1514u64, usize::MAX))).collect());
        let mut d = Drr::default();
        for i in 1..=3 {
            d.ready(7, Token(i));
        }
        d.ready(9, Token(4));
        let mut log = Vec::new();
        for _ in 0..600 {
            d.round(|s, budget| b.serve(s, budget, &mut log));
        }
        let mut got: BTreeMap<Token, u64> = BTreeMap::new();
        for (s, n) in log {
            *got.entry(s).or_default() += n;
        }
        let total: u64 = got.values().sum();
        let share = |t| got[&Token(t)] as f64 / total as f64;
        assert!((share(4) - 0.5).abs() < 0.01, "{got:?}");
        for i in 1..=3 {
            assert!((share(i) - 1.0 / 6.0).abs() < 0.01, "{got:?}");
        }
    }

    #[test]
    fn an_emptied_class_loses_its_deficit_and_idle_means_idle() {
        let t = Token(5);
        let mut b = Backlog(HashMap::from([(t, (1000u64, 3))]));
        let mut d = Drr::default();
        d.ready(0, t);
        d.ready(0, t); // twice: listed once
        assert_eq!(d.classes[0].ready.len(), 1);
        let mut log = Vec::new();
        d.round(|s, budget| b.serve(s, budget, &mut log));
        assert_eq!(log.len(), 3);
        assert!(d.is_idle());
        assert_eq!(d.classes[0].deficit, 0);
        d.ready(0, t);
        d.forget(t);
        d.round(|_, _| panic!("a forgotten source is not served"));
        assert!(d.is_idle());
    }
}
