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
//!    once (the scan is then no dearer than the probes): both are counted by the caller. An
//!    invalidation reads a set's keys without its lock and locks only a set that holds a key
//!    it must drop (rule 4 says why that is enough), so invalidating pages that are not cached
//!    costs no locked instruction.
//! 4. **No stale fill.** A walk that raced with an invalidation must not insert what it read
//!    before the invalidation ran. Every invalidation increments a generation (a sequentially
//!    consistent read-modify-write) *before* reading the keys; a fill carries the generation
//!    its walk started under and, under the set's lock, first publishes its key, then re-reads
//!    the generation and withdraws the key if it moved (all `SeqCst`). In the single order of
//!    those operations either the fill's re-read comes after the increment (it sees the new
//!    generation and withdraws, before it unlocks, so no lookup ever sees the key), or its key
//!    store comes before the invalidation's read of the keys (the invalidation sees the key,
//!    locks the set and drops it). Keys change only under the set's lock.
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

/// What a set's lock protects besides its keys.
#[derive(Clone, Copy)]
struct Ways {
    vals: [u64; WAYS],
    next: u8,
}

/// One set: its keys are atomics written only under `lock` and read by invalidations
/// without it (rule 4).
struct Set {
    lock: SpinLock<Ways>,
    keys: [AtomicU64; WAYS],
}

impl Set {
    fn new() -> Self {
        Self {
            lock: SpinLock::new(Ways { vals: [0; WAYS], next: 0 }),
            keys: std::array::from_fn(|_| AtomicU64::new(EMPTY)),
        }
    }

    /// The way holding `key` (read under the lock, or racily by an invalidation's pre-check).
    #[inline]
    fn way_of(&self, key: u64) -> Option<usize> {
        self.keys.iter().position(|k| k.load(Ordering::SeqCst) == key)
    }
}

/// The cache.
pub(crate) struct Iotlb {
    sets: Box<[Set]>,
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
        Self { sets: (0..sets).map(|_| Set::new()).collect(), generation: AtomicU64::new(0) }
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
    fn set_of(&self, key: u64) -> &Set {
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
        let set = self.set_of(key);
        let w = set.lock.lock();
        set.keys.iter().position(|k| k.load(Ordering::Relaxed) == key).map(|i| w.vals[i])
    }

    /// Caches `val` for `key` if no invalidation started since `generation`.
    #[inline]
    pub(crate) fn fill(&self, key: u64, val: Cached, generation: u64) {
        if self.sets.is_empty() {
            return;
        }
        let set = self.set_of(key);
        let mut w = set.lock.lock();
        if self.generation.load(Ordering::SeqCst) != generation {
            return;
        }
        let way = match set.keys.iter().position(|k| k.load(Ordering::Relaxed) == key) {
            Some(i) => i,
            None => {
                let i = w.next as usize;
                w.next = ((i + 1) % WAYS) as u8;
                i
            }
        };
        w.vals[way] = val;
        // Rule 4: publish the key, then re-read the generation; withdraw if it moved.
        set.keys[way].store(key, Ordering::SeqCst);
        if self.generation.load(Ordering::SeqCst) != generation {
            set.keys[way].store(EMPTY, Ordering::SeqCst);
        }
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
            let set = self.set_of(k);
            // Rule 4: a set without the key needs no lock.
            if set.way_of(k).is_none() {
                continue;
            }
            let _w = set.lock.lock();
            if let Some(i) = set.way_of(k) {
                set.keys[i].store(EMPTY, Ordering::SeqCst);
                dropped += 1;
            }
        }
        dropped
    }

    /// Drops every cached page of `domain` in `first..=last` by scanning every set; returns
    /// how many entries went.
    pub(crate) fn scan_out(&self, domain: DomainId, first: u64, last: u64) -> u64 {
        let mut dropped = 0;
        let hit = |k: u64| {
            let (d, page) = unkey(k);
            k != EMPTY && d == domain && (first..=last).contains(&page)
        };
        for set in self.sets.iter() {
            // Rule 4: a set holding none of the keys needs no lock.
            if !set.keys.iter().any(|k| hit(k.load(Ordering::SeqCst))) {
                continue;
            }
            let _w = set.lock.lock();
            for k in set.keys.iter() {
                if hit(k.load(Ordering::SeqCst)) {
                    k.store(EMPTY, Ordering::SeqCst);
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
