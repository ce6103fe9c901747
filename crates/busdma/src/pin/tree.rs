//! The registry's interval index: a two-level, copy-on-write sorted array of regions.
//!
//! # Theory
//!
//! 1. **Shape.** A [`Snapshot`] is a sorted array of *leaves* plus, for binary search, the
//!    first start address of each leaf. A [`Leaf`] holds up to [`LEAF_MAX`] disjoint
//!    registered ranges `[start, end)` sorted by start, with a pointer to each region. Lookup
//!    is two binary searches: O(log n), no lock, no allocation, no write.
//! 2. **Copy on write.** Nothing reachable from a published snapshot is ever modified. An
//!    insert or removal builds a new leaf (or two, on a split) and a new top level that shares
//!    every other leaf with the old one, and reports what the new snapshot no longer reaches
//!    (the replaced leaf) so the caller can retire it. The cost is O(`LEAF_MAX` + n /
//!    `LEAF_MAX`) copies per update, against O(n) for one flat array: registering 100 000
//!    regions one by one copies ~10^8 words instead of ~5·10^9.
//! 3. **Ownership.** Leaves are shared by consecutive snapshots, so a snapshot does not own
//!    them: the registry owns the leaves of the *current* snapshot; a replaced leaf is retired
//!    together with the snapshot that still reaches it, and freed with it after the grace
//!    period. Regions are owned the same way (see `registry.rs`).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use super::region::Region;
use crate::addr::PhysAddr;

/// Most ranges per leaf: 64, so that the leaf's starts form eight blocks of eight, each block
/// one 64-byte cache line, and a summary of the blocks (the first start of blocks 1 to 7)
/// fits in the leaf's first line beside its length. A search in a leaf then reads two lines
/// (the summary, one block) however full it is. An update copies at most 64 entries; the top
/// level has n/64 (regions registered in address order fill leaves) to n/32 entries: 1 600 to
/// 3 200 for 100 000 regions, 13 to 26 KiB, mostly cache-resident.
pub(crate) const LEAF_MAX: usize = 64;
/// Starts per block: one 64-byte cache line of `u64`s.
const BLOCK: usize = 8;
/// Blocks per leaf.
const BLOCKS: usize = LEAF_MAX / BLOCK;

/// Up to [`LEAF_MAX`] disjoint ranges, sorted by start, in one cache-line-aligned allocation:
/// line 0 holds the length and the block summary, lines 1 to 8 the starts in blocks of
/// eight, then per range everything a translation needs (end, page array, pinned page
/// shift), so a lookup reads four lines: summary, block, entry, and the page array's entry.
///
/// # Invariants
///
/// `len` is in `1..=LEAF_MAX`; for `i < len`: `starts[i] < entries[i].end <= starts[i + 1]`,
/// and `entries[i]` describes the live region registered at `[starts[i], entries[i].end)` for
/// as long as any snapshot reaching this leaf can be read. `summary[b] = starts[(b + 1) * 8]`
/// where that slot is used, `u64::MAX` otherwise; unused starts are `u64::MAX`.
#[repr(C, align(64))]
pub(crate) struct Leaf {
    len: usize,
    summary: [u64; BLOCKS - 1],
    starts: [u64; LEAF_MAX],
    entries: [Entry; LEAF_MAX],
}

/// Per-range data of a leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    end: u64,
    /// The region's page array (`(end - start) / 4 KiB` addresses); it lives as long as the
    /// region, which never moves it.
    hpas: *const PhysAddr,
    region: NonNull<Region>,
    page_shift: u32,
}

const UNUSED: Entry = Entry { end: 0, hpas: core::ptr::null(), region: NonNull::dangling(), page_shift: 0 };

/// One version of the index.
///
/// # Invariants
///
/// `firsts[i]` is the first start of `*leaves[i]`; leaves are sorted and their ranges disjoint
/// across leaves too. Every leaf pointer is valid while the snapshot is reachable by its
/// reader: a leaf is freed no earlier than every snapshot that reaches it (section 3).
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    firsts: Vec<u64>,
    leaves: Vec<NonNull<Leaf>>,
    len: usize,
}

/// One registered range found in the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Hit {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) region: NonNull<Region>,
    /// The region's page array: `(end - start) / 4 KiB` physical addresses.
    pub(crate) hpas: *const PhysAddr,
    /// The region's pinned page shift.
    pub(crate) page_shift: u32,
}

impl Hit {
    /// The index entry of `region`, registered at `[start, end)`.
    pub(crate) fn of(start: u64, end: u64, region: NonNull<Region>, r: &Region) -> Self {
        Hit { start, end, region, hpas: r.hpas().as_ptr(), page_shift: r.page_shift() }
    }
}

impl Leaf {
    #[inline]
    fn hit(&self, i: usize) -> Hit {
        let e = self.entries[i];
        Hit { start: self.starts[i], end: e.end, region: e.region, hpas: e.hpas, page_shift: e.page_shift }
    }

    fn from_hits(hits: &[Hit]) -> NonNull<Leaf> {
        debug_assert!(!hits.is_empty() && hits.len() <= LEAF_MAX);
        let mut leaf = Box::new(Leaf {
            len: hits.len(),
            summary: [u64::MAX; BLOCKS - 1],
            starts: [u64::MAX; LEAF_MAX],
            entries: [UNUSED; LEAF_MAX],
        });
        for (i, h) in hits.iter().enumerate() {
            leaf.starts[i] = h.start;
            leaf.entries[i] = Entry { end: h.end, hpas: h.hpas, region: h.region, page_shift: h.page_shift };
        }
        for b in 1..BLOCKS {
            leaf.summary[b - 1] = leaf.starts[b * BLOCK];
        }
        NonNull::from(Box::leak(leaf))
    }

    /// The block that may hold `ua` (reads line 0).
    #[inline]
    fn block(&self, ua: u64) -> usize {
        self.summary.partition_point(|&f| f <= ua)
    }

    /// The slot of the greatest start `<= ua` within block `b` (reads one line).
    #[inline]
    fn slot_in(&self, b: usize, ua: u64) -> Option<usize> {
        let lo = b * BLOCK;
        let hi = (lo + BLOCK).min(self.len);
        let within = self.starts.get(lo..hi)?.partition_point(|&s| s <= ua);
        (lo + within).checked_sub(1)
    }

    fn hits(&self) -> Vec<Hit> {
        (0..self.len).map(|i| self.hit(i)).collect()
    }
}

/// A hint to start loading the cache line holding `p`. Never faults, whatever `p` is (the
/// instruction ignores invalid addresses), and has no other effect; a no-op where no stable
/// intrinsic exists.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 reads nothing architecturally and cannot fault on any address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Frees a leaf that no snapshot a reader can reach still holds.
///
/// # Safety
///
/// `leaf` came from this module (a leaked `Box`), is freed once, and no reader can reach it.
pub(crate) unsafe fn free_leaf(leaf: NonNull<Leaf>) {
    // SAFETY: the caller guarantees it is an unreachable, leaked box freed once.
    drop(unsafe { Box::from_raw(leaf.as_ptr()) });
}

impl Snapshot {
    /// Number of registered ranges.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn leaf(&self, i: usize) -> &Leaf {
        // SAFETY: by the type invariant, the leaf lives while this snapshot is reachable, which
        // the borrow of `self` (held inside a read section or under the writer lock) ensures.
        unsafe { self.leaves[i].as_ref() }
    }

    /// The range with the greatest start `<= ua`, whether or not it contains `ua`.
    #[inline]
    fn floor(&self, ua: u64) -> Option<Hit> {
        let i = self.firsts.partition_point(|&f| f <= ua).checked_sub(1)?;
        let leaf = self.leaf(i);
        // Some: `firsts[i] <= ua` is the leaf's first start, and the summary picks a block
        // whose first start is `<= ua`.
        let j = leaf.slot_in(leaf.block(ua), ua)?;
        Some(leaf.hit(j))
    }

    // ---- the steps of `floor`, split for batched lookups (`ReadGuard::ua_to_pa_batch`) ----

    /// Step 1: the leaf that may hold `ua`.
    #[inline]
    pub(crate) fn locate(&self, ua: u64) -> Option<usize> {
        self.firsts.partition_point(|&f| f <= ua).checked_sub(1)
    }

    /// Asks the CPU to start fetching leaf `i`'s first line (what step 2 reads).
    #[inline]
    pub(crate) fn prefetch_head(&self, i: usize) {
        if let Some(leaf) = self.leaves.get(i) {
            prefetch(leaf.as_ptr());
        }
    }

    /// Step 2: the block of leaf `i` that may hold `ua`; prefetches it (for step 3).
    #[inline]
    pub(crate) fn block(&self, i: usize, ua: u64) -> usize {
        let leaf = self.leaf(i);
        let b = leaf.block(ua);
        prefetch(leaf.starts.as_ptr().wrapping_add(b * BLOCK));
        b
    }

    /// Step 3: the slot in block `b` of leaf `i` of the greatest start `<= ua`.
    #[inline]
    pub(crate) fn slot(&self, i: usize, b: usize, ua: u64) -> Option<usize> {
        self.leaf(i).slot_in(b, ua)
    }

    /// Asks the CPU to start fetching slot `j` of leaf `i` (what step 4 reads).
    #[inline]
    pub(crate) fn prefetch_entry(&self, i: usize, j: usize) {
        if let Some(e) = self.leaf(i).entries.get(j) {
            prefetch(e as *const Entry);
        }
    }

    /// Step 4: the range in slot `j` of leaf `i` (from steps 1 to 3).
    #[inline]
    pub(crate) fn hit_at(&self, i: usize, j: usize) -> Hit {
        self.leaf(i).hit(j)
    }

    /// The range containing `ua`.
    #[inline]
    pub(crate) fn find(&self, ua: u64) -> Option<Hit> {
        self.floor(ua).filter(|h| ua < h.end)
    }

    /// The first range starting after `ua`.
    fn successor(&self, ua: u64) -> Option<Hit> {
        let i = self.firsts.partition_point(|&f| f <= ua);
        if let Some(prev) = i.checked_sub(1) {
            let leaf = self.leaf(prev);
            let j = leaf.slot_in(leaf.block(ua), ua).map_or(0, |j| j + 1);
            if j < leaf.len {
                return Some(leaf.hit(j));
            }
        }
        (i < self.leaves.len()).then(|| self.leaf(i).hit(0))
    }

    /// The first range (lowest addresses) sharing a byte with `[start, end)` (`start < end`).
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> Option<Hit> {
        // Ranges are disjoint and sorted: either one contains `start`, or the first one after
        // `start` is the first candidate.
        self.find(start).or_else(|| self.successor(start).filter(|h| h.start < end))
    }

    /// Every range, in order (writers and teardown only).
    pub(crate) fn all(&self) -> Vec<Hit> {
        (0..self.leaves.len()).flat_map(|i| self.leaf(i).hits()).collect()
    }

    /// Every leaf (teardown only).
    pub(crate) fn leaves(&self) -> &[NonNull<Leaf>] {
        &self.leaves
    }

    /// A new snapshot with `hit` added (it must not overlap any range) and the leaf the new
    /// one no longer reaches, if any.
    pub(crate) fn inserted(&self, hit: Hit) -> (Snapshot, Option<NonNull<Leaf>>) {
        let mut firsts = self.firsts.clone();
        let mut leaves = self.leaves.clone();
        // The leaf to insert into: the last one starting at or below `hit.start`, or the first.
        let i = self.firsts.partition_point(|&f| f <= hit.start).saturating_sub(1);
        if leaves.is_empty() {
            firsts.push(hit.start);
            leaves.push(Leaf::from_hits(&[hit]));
            return (Snapshot { firsts, leaves, len: 1 }, None);
        }
        let old = self.leaves[i];
        let last = self.leaf(i);
        if i + 1 == leaves.len() && last.len == LEAF_MAX && last.starts[LEAF_MAX - 1] < hit.start {
            // Appending past a full last leaf (registrations in address order): open a new
            // leaf and leave the full one shared, so such leaves stay full, not half full.
            firsts.push(hit.start);
            leaves.push(Leaf::from_hits(&[hit]));
            return (Snapshot { firsts, leaves, len: self.len + 1 }, None);
        }
        let mut hits = last.hits();
        let at = hits.partition_point(|h| h.start < hit.start);
        hits.insert(at, hit);
        if hits.len() <= LEAF_MAX {
            firsts[i] = hits[0].start;
            leaves[i] = Leaf::from_hits(&hits);
        } else {
            let (lo, hi) = hits.split_at(hits.len() / 2);
            firsts[i] = lo[0].start;
            leaves[i] = Leaf::from_hits(lo);
            firsts.insert(i + 1, hi[0].start);
            leaves.insert(i + 1, Leaf::from_hits(hi));
        }
        (Snapshot { firsts, leaves, len: self.len + 1 }, Some(old))
    }

    /// A new snapshot without the range starting at `start`, and the leaf it no longer
    /// reaches; `None` if no range starts there.
    pub(crate) fn removed(&self, start: u64) -> Option<(Snapshot, NonNull<Leaf>)> {
        let i = self.firsts.partition_point(|&f| f <= start).checked_sub(1)?;
        let mut hits = self.leaf(i).hits();
        let at = hits.iter().position(|h| h.start == start)?;
        hits.remove(at);
        let mut firsts = self.firsts.clone();
        let mut leaves = self.leaves.clone();
        if hits.is_empty() {
            firsts.remove(i);
            leaves.remove(i);
        } else {
            firsts[i] = hits[0].start;
            leaves[i] = Leaf::from_hits(&hits);
        }
        Some((Snapshot { firsts, leaves, len: self.len - 1 }, self.leaves[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use proptest::prelude::*;

    /// Owns a snapshot's leaves the way the registry does, freeing replaced ones at once (no
    /// readers in these tests).
    struct Owner {
        snap: Snapshot,
    }

    impl Owner {
        fn insert(&mut self, start: u64, end: u64) {
            let hit =
                Hit { start, end, region: NonNull::dangling(), hpas: core::ptr::null(), page_shift: 12 };
            let (next, old) = self.snap.inserted(hit);
            self.snap = next;
            // SAFETY: the replaced leaf is unreachable from the new snapshot, and no reader exists.
            old.into_iter().for_each(|l| unsafe { free_leaf(l) });
        }
        fn remove(&mut self, start: u64) -> bool {
            match self.snap.removed(start) {
                Some((next, old)) => {
                    self.snap = next;
                    // SAFETY: as above.
                    unsafe { free_leaf(old) };
                    true
                }
                None => false,
            }
        }
    }

    impl Drop for Owner {
        fn drop(&mut self) {
            for &l in self.snap.leaves() {
                // SAFETY: the current snapshot's leaves, freed once.
                unsafe { free_leaf(l) };
            }
        }
    }

    proptest! {
        #[test]
        #[cfg_attr(
            miri,
            ignore = "over 70 s per case under Miri even cut to 300 ops (4 cases: 292 s), beyond the step's budget"
        )]
        fn index_matches_a_btreemap_through_splits_and_emptied_leaves(
            ops in prop::collection::vec((any::<bool>(), 0..2000u64, 1..4u64), 1..1500),
            probes in prop::collection::vec(0..8100u64, 64),
        ) {
            let mut t = Owner { snap: Snapshot::default() };
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            for (insert, slot, len) in ops {
                let (start, end) = (slot * 4, slot * 4 + len);
                let clash = model.range(..end).next_back().is_some_and(|(_, &e)| e > start);
                prop_assert_eq!(t.snap.overlapping(start, end).map(|h| h.start),
                    model.iter().find(|&(&s, &e)| s < end && start < e).map(|(&s, _)| s));
                if insert && !clash {
                    t.insert(start, end);
                    model.insert(start, end);
                } else if !insert {
                    prop_assert_eq!(t.remove(start), model.remove(&start).is_some());
                }
                prop_assert_eq!(t.snap.len(), model.len());
            }
            for ua in probes {
                let want = model.range(..=ua).next_back().filter(|&(_, &e)| ua < e).map(|(&s, &e)| (s, e));
                prop_assert_eq!(t.snap.find(ua).map(|h| (h.start, h.end)), want);
            }
            let all: alloc::vec::Vec<(u64, u64)> = t.snap.all().iter().map(|h| (h.start, h.end)).collect();
            prop_assert_eq!(all, model.into_iter().collect::<alloc::vec::Vec<_>>());
            for l in t.snap.leaves() {
                // SAFETY: live leaves of the current snapshot.
                let n = unsafe { l.as_ref() }.len;
                prop_assert!(n <= LEAF_MAX);
            }
        }
    }
}
