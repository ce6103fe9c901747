//! The identity strategy's per-page reference counts: a fixed-capacity hash table that never
//! allocates on the load path.
//!
//! # Theory
//!
//! 1. **Why not a tree.** A `BTreeMap` allocates a node whenever a load brings pages it has
//!    not seen (and frees nodes as they empty), so every load could call the allocator. Here
//!    capacity is *reserved* by map creation: each map of the identity strategy reserves the
//!    most pages one of its loads can count ([`pages_bound`]), and the table keeps room for the
//!    sum of live reservations. Loads and unloads only probe and write slots.
//! 2. **The table.** Open addressing with linear probing over a power-of-two array of
//!    `(page frame, count)` slots; an empty slot holds [`EMPTY`] (no page frame number reaches
//!    it: a frame number is a physical address shifted right by 12). The home slot of a frame
//!    is Fibonacci hashing (multiply by 2^64 / φ, keep the top bits), which spreads the
//!    consecutive frame numbers of a buffer over the table.
//! 3. **Load factor at most 1/2.** Capacity is the next power of two at or above twice the
//!    reserved pages (8 at least), so a probe sequence meets an empty slot after few steps
//!    (expected ≤ 2.5 for a hit at 1/2, Knuth 6.4) and always terminates.
//! 4. **Deletion without tombstones.** Removing a slot shifts later members of its cluster
//!    back (Knuth's algorithm R), so lookups never walk over dead entries and the table never
//!    degrades however many loads come and go.
//! 5. **Growth** happens only at map create ([`PageRefs::grow_to`]): the caller allocates the
//!    new array outside the table's lock, then rehashes under it (no allocation), so the lock is
//!    never held across an allocator call.
#![forbid(unsafe_code)]

use alloc::vec::Vec;

use crate::addr::PAGE_SIZE;
use crate::error::{Error, Result};

use crate::front::spec::TagSpec;

use super::iommu::max_runs;

/// The frame number of no page: marks an empty slot.
pub const EMPTY: u64 = u64::MAX;

/// Smallest table: 8 slots, so a tree with one small map does not rehash on its second.
const MIN_CAPACITY: usize = 8;

/// The most pages one load under `spec` can count: its bytes' pages, plus, per run, the page
/// its start shares and the one its end shares (a run of `len` bytes touches at most
/// `len / 4 KiB + 2` pages), with the map's run bound (`front::map` theory 2).
pub fn pages_bound(spec: &TagSpec) -> usize {
    (spec.max_size.div_ceil(PAGE_SIZE) as usize).saturating_add(max_runs(spec).saturating_mul(2))
}

/// Slots needed to hold `reserved` pages at a load factor of at most 1/2 (theory 3).
pub fn capacity_for(reserved: usize) -> usize {
    reserved.saturating_mul(2).max(MIN_CAPACITY).checked_next_power_of_two().unwrap_or(usize::MAX)
}

/// Reference counts by page frame number.
///
/// # Invariants
///
/// `slots.len()` is 0 or a power of two ≥ `capacity_for(reserved)`; `len` counts the slots
/// whose frame is not [`EMPTY`], each frame at most once, each with a count ≥ 1; every member
/// lies in the probe sequence of its home slot without an empty slot between them.
#[derive(Debug, Default)]
pub struct PageRefs {
    slots: Vec<(u64, u32)>,
    len: usize,
    reserved: usize,
}

impl PageRefs {
    /// An empty table with no capacity.
    pub const fn new() -> Self {
        Self { slots: Vec::new(), len: 0, reserved: 0 }
    }

    /// Pages with a count.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no page has a count.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pages reserved by live maps.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// Slots in the table.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn home(&self, pfn: u64) -> usize {
        // Fibonacci hashing: 2^64 / φ, the top log2(capacity) bits (theory 2).
        let bits = self.slots.len().trailing_zeros();
        (pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    /// `Ok(index)` of `pfn`'s slot, or `Err(index)` of the empty slot where it would go
    /// (`Err(usize::MAX)` for a table with no slots).
    #[inline]
    fn find(&self, pfn: u64) -> core::result::Result<usize, usize> {
        if self.slots.is_empty() {
            return Err(usize::MAX);
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(pfn);
        // Terminates: the load factor is at most 1/2, so an empty slot exists (theory 3).
        loop {
            match self.slots[i].0 {
                EMPTY => return Err(i),
                f if f == pfn => return Ok(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// The count of `pfn` (0 if none).
    pub fn get(&self, pfn: u64) -> u32 {
        self.find(pfn).map_or(0, |i| self.slots[i].1)
    }

    /// Adds one reference to `pfn`; returns the new count. Never allocates.
    ///
    /// Errors: [`Error::LimitExceeded`] when more pages would be counted than maps reserved
    /// (a reservation bug: the count is unchanged).
    #[inline]
    pub fn incr(&mut self, pfn: u64) -> Result<u32> {
        match self.find(pfn) {
            Ok(i) => {
                let c = &mut self.slots[i].1;
                *c = c.saturating_add(1);
                Ok(*c)
            }
            Err(i) if i != usize::MAX && self.len < self.slots.len() / 2 => {
                self.slots[i] = (pfn, 1);
                self.len += 1;
                Ok(1)
            }
            Err(_) => Err(Error::LimitExceeded {
                what: "identity reference table (pages counted beyond what maps reserved)",
                requested: self.len as u64 + 1,
                limit: (self.slots.len() / 2) as u64,
            }),
        }
    }

    /// Drops one reference to `pfn`; returns the new count (0: the page left the table), or
    /// `None` if `pfn` had no count. Never allocates.
    #[inline]
    pub fn decr(&mut self, pfn: u64) -> Option<u32> {
        let i = self.find(pfn).ok()?;
        let c = &mut self.slots[i].1;
        *c -= 1;
        if *c > 0 {
            return Some(*c);
        }
        self.remove_at(i);
        Some(0)
    }

    /// Empties slot `i` and shifts the rest of its cluster back (theory 4).
    fn remove_at(&mut self, mut i: usize) {
        let mask = self.slots.len() - 1;
        self.slots[i] = (EMPTY, 0);
        self.len -= 1;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let (pfn, _) = self.slots[j];
            if pfn == EMPTY {
                return;
            }
            let k = self.home(pfn);
            // Slot j's member may fill the hole at i unless its home lies cyclically in (i, j].
            let stays = if i <= j { i < k && k <= j } else { i < k || k <= j };
            if !stays {
                self.slots[i] = self.slots[j];
                self.slots[j] = (EMPTY, 0);
                i = j;
            }
        }
    }

    /// Reserves `pages` more (a new map). Returns `Err(capacity)` if the table must first
    /// grow to `capacity` slots ([`PageRefs::grow_to`]); the reservation is then not taken.
    pub fn try_reserve(&mut self, pages: usize) -> core::result::Result<(), usize> {
        let want = self.reserved.saturating_add(pages);
        let cap = capacity_for(want);
        if self.slots.len() >= cap {
            self.reserved = want;
            Ok(())
        } else {
            Err(cap)
        }
    }

    /// Gives back a reservation of `pages` (a destroyed map). The table does not shrink.
    pub fn unreserve(&mut self, pages: usize) {
        self.reserved = self.reserved.saturating_sub(pages);
    }

    /// Rehashes into `fresh` (allocated by the caller outside any lock, with capacity for
    /// `capacity` slots) if it is larger than the table; returns the array to free (the old
    /// one, or `fresh` unused). Never allocates: `fresh.capacity() >= capacity`.
    pub fn grow_to(&mut self, mut fresh: Vec<(u64, u32)>, capacity: usize) -> Vec<(u64, u32)> {
        if capacity <= self.slots.len() || !capacity.is_power_of_two() || fresh.capacity() < capacity {
            return fresh;
        }
        fresh.clear();
        fresh.resize(capacity, (EMPTY, 0));
        let old = core::mem::replace(&mut self.slots, fresh);
        let n = self.len;
        self.len = 0;
        for &(pfn, c) in old.iter().filter(|s| s.0 != EMPTY) {
            if let Err(i) = self.find(pfn) {
                self.slots[i] = (pfn, c);
                self.len += 1;
            }
        }
        debug_assert_eq!(n, self.len, "rehash lost a page");
        old
    }

    /// The array `grow_to` needs: `capacity` slots, allocated (fallibly) by the caller.
    ///
    /// Errors: [`Error::NoMemory`].
    pub fn alloc_slots(capacity: usize) -> Result<Vec<(u64, u32)>> {
        let mut v = Vec::new();
        v.try_reserve_exact(capacity).map_err(|_| Error::NoMemory {
            requested: (capacity * core::mem::size_of::<(u64, u32)>()) as u64,
        })?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    fn table(reserved: usize) -> PageRefs {
        let mut t = PageRefs::new();
        let cap = t.try_reserve(reserved).unwrap_err();
        let old = t.grow_to(PageRefs::alloc_slots(cap).unwrap(), cap);
        assert!(old.is_empty());
        t.try_reserve(reserved).unwrap();
        t
    }

    #[test]
    fn counting_beyond_the_reservation_is_refused_and_changes_nothing() {
        let mut t = table(4);
        assert_eq!(t.capacity(), 8);
        for pfn in 0..4 {
            assert_eq!(t.incr(pfn), Ok(1));
        }
        assert!(matches!(t.incr(99), Err(Error::LimitExceeded { requested: 5, limit: 4, .. })));
        assert_eq!((t.len(), t.get(99)), (4, 0));
        assert_eq!(t.incr(3), Ok(2), "an existing page still counts");
    }

    #[test]
    fn growth_keeps_every_count() {
        let mut t = table(4);
        for pfn in 0..4 {
            t.incr(pfn * 1000).unwrap();
        }
        t.incr(0).unwrap();
        let cap = t.try_reserve(100).unwrap_err();
        let old = t.grow_to(PageRefs::alloc_slots(cap).unwrap(), cap);
        assert_eq!(old.len(), 8);
        t.try_reserve(100).unwrap();
        assert_eq!((t.capacity(), t.len(), t.get(0), t.get(3000)), (256, 4, 2, 1));
    }

    proptest! {
        /// Any sequence of increments and decrements agrees with a `BTreeMap` reference, and
        /// the table never holds an empty count.
        #[test]
        fn the_table_matches_a_btreemap(ops in proptest::collection::vec((any::<bool>(), 0u64..48), 1..400)) {
            // Clustered frame numbers (a small range, high bits set) make long probe runs
            // and wrap-around deletions.
            let mut t = table(48);
            let mut r: BTreeMap<u64, u32> = BTreeMap::new();
            for (up, k) in ops {
                let pfn = (1 << 40) | k;
                if up {
                    prop_assert_eq!(t.incr(pfn).unwrap(), { let c = r.entry(pfn).or_insert(0); *c += 1; *c });
                } else {
                    let want = r.get_mut(&pfn).map(|c| { *c -= 1; *c });
                    if want == Some(0) {
                        r.remove(&pfn);
                    }
                    prop_assert_eq!(t.decr(pfn), want);
                }
                prop_assert_eq!(t.len(), r.len());
            }
            for k in 0..48 {
                let pfn = (1 << 40) | k;
                prop_assert_eq!(t.get(pfn), r.get(&pfn).copied().unwrap_or(0));
            }
        }
    }
}
