//! Tables keyed by a (source, destination) pair of a Violin's members: which pairs a
//! spec links, and what each pair sent. They hold only the pairs that exist (linked, or
//! that exchanged frames), so a Violin's tables grow with its links and its traffic,
//! not with the square of its members.
//!
//! Open addressing with linear probing over power-of-two arrays. Lookups and counting
//! never allocate: a pair that finds no room (the table is 3/4 full) is refused, and
//! the table asks for room ([`PairTable::wants_room`]), which its owner grants between
//! batches ([`PairTable::make_room`], doubling) — never while switching a frame.

/// A pair's key: source in the high half, destination in the low half.
#[inline]
fn key(s: usize, d: usize) -> u64 {
    ((s as u64) << 32) | d as u64
}

const EMPTY: u64 = u64::MAX;
const MIN_SLOTS: usize = 16;

pub struct PairTable<V> {
    keys: Box<[u64]>,
    vals: Box<[V]>,
    len: usize,
}

impl<V: Copy + Default> PairTable<V> {
    /// Room for `pairs` pairs before it asks for more.
    pub fn with_capacity(pairs: usize) -> Self {
        let slots = (pairs * 2).max(MIN_SLOTS).next_power_of_two();
        PairTable {
            keys: vec![EMPTY; slots].into_boxed_slice(),
            vals: vec![V::default(); slots].into_boxed_slice(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn home(&self, k: u64) -> usize {
        // Fibonacci hashing: the top bits of the product spread consecutive indices.
        let bits = self.keys.len().trailing_zeros();
        (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    /// The slot holding `k`, or the empty slot where it would go.
    #[inline]
    fn slot(&self, k: u64) -> usize {
        let mask = self.keys.len() - 1;
        let mut i = self.home(k);
        while self.keys[i] != k && self.keys[i] != EMPTY {
            i = (i + 1) & mask;
        }
        i
    }

    #[inline]
    pub fn get(&self, s: usize, d: usize) -> Option<&V> {
        let k = key(s, d);
        let i = self.slot(k);
        (self.keys[i] == k).then(|| &self.vals[i])
    }

    #[inline]
    pub fn contains(&self, s: usize, d: usize) -> bool {
        self.get(s, d).is_some()
    }

    /// The pair's value, added (as the default) if missing and there is room; `None`
    /// when the table is too full to take it (see [`PairTable::make_room`]).
    #[inline]
    pub fn entry(&mut self, s: usize, d: usize) -> Option<&mut V> {
        let k = key(s, d);
        let i = self.slot(k);
        if self.keys[i] != k {
            if self.full() {
                return None;
            }
            self.keys[i] = k;
            self.len += 1;
        }
        Some(&mut self.vals[i])
    }

    /// At 3/4 of its slots the table takes no new pair.
    #[inline]
    fn full(&self) -> bool {
        self.len * 4 >= self.keys.len() * 3
    }

    /// More than half full: the next [`PairTable::make_room`] doubles it.
    #[inline]
    pub fn wants_room(&self) -> bool {
        self.len * 2 > self.keys.len()
    }

    /// Doubles the slots while more than half are used (allocates: between batches).
    pub fn make_room(&mut self) {
        while self.wants_room() {
            let mut bigger = PairTable::<V> {
                keys: vec![EMPTY; self.keys.len() * 2].into_boxed_slice(),
                vals: vec![V::default(); self.keys.len() * 2].into_boxed_slice(),
                len: 0,
            };
            for (s, d, v) in self.iter() {
                *bigger.entry(s, d).expect("a doubled table has room") = *v;
            }
            *self = bigger;
        }
    }

    /// Adds the pair, growing as needed (control side: may allocate).
    pub fn insert(&mut self, s: usize, d: usize, v: V) {
        if self.full() {
            self.make_room();
        }
        *self.entry(s, d).expect("room was made") = v;
        self.make_room();
    }

    /// Every pair with its value, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize, &V)> + '_ {
        self.keys
            .iter()
            .zip(self.vals.iter())
            .filter(|(k, _)| **k != EMPTY)
            .map(|(k, v)| ((k >> 32) as usize, (k & 0xffff_ffff) as usize, v))
    }

    /// Bytes this table holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.keys.len() * (8 + std::mem::size_of::<V>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_found_and_distinct_by_direction() {
        let mut t = PairTable::<u32>::with_capacity(4);
        t.insert(1, 2, 12);
        t.insert(2, 1, 21);
        assert_eq!(t.get(1, 2), Some(&12));
        assert_eq!(t.get(2, 1), Some(&21));
        assert_eq!(t.get(1, 3), None);
        assert!(t.contains(2, 1) && !t.contains(2, 2));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_full_table_refuses_new_pairs_until_room_is_made_and_keeps_what_it_had() {
        let mut t = PairTable::<u64>::with_capacity(8); // 16 slots
        let mut taken = 0;
        for d in 0..100 {
            match t.entry(0, d) {
                Some(v) => {
                    *v += d as u64;
                    taken += 1;
                }
                None => break,
            }
        }
        assert_eq!(taken, 12, "3/4 of 16 slots");
        assert!(t.wants_room());
        // A pair already in it is still counted when full.
        *t.entry(0, 5).unwrap() += 1;
        t.make_room();
        assert!(!t.wants_room());
        for d in 12..100 {
            *t.entry(0, d).expect("room") += d as u64;
            t.make_room();
        }
        assert_eq!(t.len(), 100);
        for d in 0..100 {
            assert_eq!(
                t.get(0, d),
                Some(&(d as u64 + u64::from(d == 5))),
                "pair 0→{d}"
            );
        }
        let mut all: Vec<(usize, usize)> = t.iter().map(|(s, d, _)| (s, d)).collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).map(|d| (0, d)).collect::<Vec<_>>());
    }

    #[test]
    fn memory_follows_the_pairs_not_the_square_of_the_members() {
        // 3000 members in a ring: 6000 directed pairs.
        let n = 3000;
        let mut t = PairTable::<(u64, u64)>::with_capacity(2 * n);
        for i in 0..n {
            t.insert(i, (i + 1) % n, (1, 1));
            t.insert((i + 1) % n, i, (1, 1));
        }
        assert_eq!(t.len(), 2 * n);
        assert!(t.heap_bytes() <= 2 * n * 24 * 4, "{} bytes", t.heap_bytes());
        assert!(t.contains(n - 1, 0) && !t.contains(0, 2));
    }
}
