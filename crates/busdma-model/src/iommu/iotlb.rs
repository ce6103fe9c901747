//! The model IOTLB: a set-associative cache of 4 KiB translations tagged by domain.
//!
//! # Theory
//!
//! 1. **It really caches.** A hit returns the cached page without reading the tables, so a
//!    table entry cleared without an invalidation still translates: exactly the hazard the
//!    invalidation protocol exists for, and the tests can see it.
//! 2. **Shape.** `entries` = `sets × WAYS`; an entry maps one 4 KiB page of one domain (a
//!    superpage is cached page by page, which costs hit rate, not correctness: a ranged
//!    invalidation drops every cached page inside the range, and a split block keeps the
//!    translations of the pages it still maps). Keys hash `(domain, page)` to a set;
//!    replacement inside a set is FIFO.
//! 3. **Cost.** A lookup locks one set and compares [`WAYS`] keys. A ranged invalidation of
//!    `n` pages probes `n` sets when `n` is at most the number of sets, else scans every set
//!    once (the scan is then no dearer than the probes): both are counted by the caller.
//! 4. **No stale fill.** A walk that raced with an invalidation must not insert what it read
//!    before the invalidation ran. Every invalidation increments a generation *before*
//!    clearing; a fill carries the generation its walk started under and is dropped if the
//!    generation moved (checked under the set's lock, so a fill either lands before the
//!    invalidation clears that set, or sees the new generation).
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use busdma::iommu::DomainId;
use busdma::sync::SpinLock;

/// Ways per set: 4, a common associativity for TLBs of a few hundred to a few thousand
/// entries; it keeps a lookup to four compares while making conflict misses rare.
pub(crate) const WAYS: usize = 4;

/// An unused way: no real key is all ones (the page number has at most 45 bits).
const EMPTY: u64 = u64::MAX;

/// A cached translation: the page's physical address with the rights in bits 0 (read) and
/// 1 (write).
pub(crate) type Cached = u64;

#[derive(Clone, Copy)]
struct Set {
    keys: [u64; WAYS],
    vals: [u64; WAYS],
    next: u8,
}

/// The cache.
pub(crate) struct Iotlb {
    sets: Box<[SpinLock<Set>]>,
    generation: AtomicU64,
}

/// The key of `page_number` (IOVA >> 12) in `domain`: domain in bits 63:48.
#[inline]
pub(crate) fn key(domain: DomainId, page_number: u64) -> u64 {
    (u64::from(domain) << 48) | page_number
}

/// Splits a key.
#[inline]
fn unkey(key: u64) -> (DomainId, u64) {
    ((key >> 48) as DomainId, key & ((1 << 48) - 1))
}

impl Iotlb {
    /// A cache of at least `entries` entries (rounded up to a power-of-two number of sets;
    /// zero disables caching).
    pub(crate) fn new(entries: usize) -> Self {
        let sets = if entries == 0 { 0 } else { entries.div_ceil(WAYS).next_power_of_two() };
        let empty = Set { keys: [EMPTY; WAYS], vals: [0; WAYS], next: 0 };
        Self { sets: (0..sets).map(|_| SpinLock::new(empty)).collect(), generation: AtomicU64::new(0) }
    }

    /// Number of entries.
    pub(crate) fn capacity(&self) -> usize {
        self.sets.len() * WAYS
    }

    /// Number of sets.
    pub(crate) fn sets(&self) -> usize {
        self.sets.len()
    }

    #[inline]
    fn set_of(&self, key: u64) -> &SpinLock<Set> {
        // Fibonacci hashing spreads neighbouring pages and domains over the sets.
        let h = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let i = (h >> 32) as usize & (self.sets.len() - 1);
        &self.sets[i]
    }

    /// The current generation: read it before a walk, pass it to [`Iotlb::fill`].
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Starts an invalidation: fills of walks begun before it are dropped from now on.
    #[inline]
    pub(crate) fn bump_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The cached translation of `key`, if any.
    #[inline]
    pub(crate) fn lookup(&self, key: u64) -> Option<Cached> {
        if self.sets.is_empty() {
            return None;
        }
        let s = self.set_of(key).lock();
        s.keys.iter().position(|&k| k == key).map(|i| s.vals[i])
    }

    /// Caches `val` for `key` if no invalidation started since `generation`.
    #[inline]
    pub(crate) fn fill(&self, key: u64, val: Cached, generation: u64) {
        if self.sets.is_empty() {
            return;
        }
        let mut s = self.set_of(key).lock();
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let way = match s.keys.iter().position(|&k| k == key) {
            Some(i) => i,
            None => {
                let i = s.next as usize;
                s.next = ((i + 1) % WAYS) as u8;
                i
            }
        };
        s.keys[way] = key;
        s.vals[way] = val;
    }

    /// Drops the cached pages `first..=last` of `domain` by probing their sets; returns how
    /// many entries went.
    pub(crate) fn probe_out(&self, domain: DomainId, first: u64, last: u64) -> u64 {
        let mut dropped = 0;
        if self.sets.is_empty() {
            return 0;
        }
        for page in first..=last {
            let k = key(domain, page);
            let mut s = self.set_of(k).lock();
            if let Some(i) = s.keys.iter().position(|&x| x == k) {
                s.keys[i] = EMPTY;
                dropped += 1;
            }
        }
        dropped
    }

    /// Drops every cached page of `domain` in `first..=last` by scanning every set; returns
    /// how many entries went.
    pub(crate) fn scan_out(&self, domain: DomainId, first: u64, last: u64) -> u64 {
        let mut dropped = 0;
        for set in self.sets.iter() {
            let mut s = set.lock();
            for k in s.keys.iter_mut() {
                if *k == EMPTY {
                    continue;
                }
                let (d, page) = unkey(*k);
                if d == domain && (first..=last).contains(&page) {
                    *k = EMPTY;
                    dropped += 1;
                }
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_hit_what_was_filled_in_the_same_domain_only() {
        let t = Iotlb::new(64);
        assert_eq!(t.capacity(), 64);
        let g = t.generation();
        t.fill(key(1, 5), 0x7000 | 3, g);
        assert_eq!(t.lookup(key(1, 5)), Some(0x7000 | 3));
        assert_eq!(t.lookup(key(2, 5)), None);
        assert_eq!(t.lookup(key(1, 6)), None);
    }

    #[test]
    fn a_fill_from_before_an_invalidation_is_dropped() {
        let t = Iotlb::new(64);
        let g = t.generation();
        t.bump_generation();
        t.fill(key(1, 5), 0x7000, g);
        assert_eq!(t.lookup(key(1, 5)), None);
    }

    #[test]
    fn probing_and_scanning_drop_exactly_the_range() {
        let t = Iotlb::new(1024);
        let g = t.generation();
        for p in 0..100 {
            t.fill(key(1, p), p << 12, g);
            t.fill(key(2, p), p << 12, g);
        }
        assert_eq!(t.probe_out(1, 10, 19), 10);
        assert_eq!(t.scan_out(1, 50, 99), 50);
        for p in 0..100 {
            let gone = (10..20).contains(&p) || (50..100).contains(&p);
            assert_eq!(t.lookup(key(1, p)).is_none(), gone, "page {p}");
            assert!(t.lookup(key(2, p)).is_some());
        }
    }

    #[test]
    fn a_full_set_evicts_in_fifo_order_and_zero_entries_cache_nothing() {
        let t = Iotlb::new(WAYS); // one set: every key lands in it
        let g = t.generation();
        for p in 0..=WAYS as u64 {
            t.fill(key(0, p), p, g);
        }
        assert_eq!(t.lookup(key(0, 0)), None);
        assert!((1..=WAYS as u64).all(|p| t.lookup(key(0, p)) == Some(p)));
        let off = Iotlb::new(0);
        off.fill(key(0, 1), 1, off.generation());
        assert_eq!(off.lookup(key(0, 1)), None);
        assert_eq!(off.probe_out(0, 0, 10) + off.scan_out(0, 0, 10), 0);
    }
}
