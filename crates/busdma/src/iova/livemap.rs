//! The live map: one 16-bit mark per page of the space, telling whether a size-class range
//! that starts on that page is live (held by a caller), for how many pages it was asked, and
//! which CPU's lock guards its mark (the allocator's encoding: `iova`, theory 4).
//!
//! # Theory
//!
//! 1. **Why.** The per-CPU caches must catch a double free without taking the tree lock (the
//!    tree knows every range but is shared by all CPUs). A free of a class range clears the
//!    range's mark once, from "live, this size" to "not live": under the lock of the CPU the
//!    mark names (a plain load and store), or by one compare-and-swap when it names none.
//!    Either way exactly one of racing frees succeeds, so a second free sees "not live" and
//!    goes to the tree, which reports it (see `iova::tree`, `Kind::Class`).
//! 2. **Shape.** A radix tree like a page table: leaves of [`LEAF_PAGES`] marks, interior
//!    nodes of [`FAN`] pointers, as many levels as the space needs (3 for a 48-bit space). Only
//!    the paths to pages where a class range was ever placed exist; they are installed by
//!    compare-and-swap and never removed before the map drops, so a reader holding `&self`
//!    can follow them without a lock.
//! 3. **Cost.** A lookup is `levels` dependent loads of hot lines plus the mark; memory is one
//!    8 KiB leaf per 16 MiB of IOVA space that ever held a class range (1/2048 of it).
//! 4. **No false sharing between CPUs.** Each CPU's magazines hand the same few ranges out
//!    again and again, and ranges placed near each other go to different CPUs; with marks in
//!    page order 32 neighbouring pages (128 KiB of IOVA) share one cache line, so two CPUs'
//!    writes to their own marks would bounce that line between them. Inside a leaf the marks
//!    are therefore laid out skewed (`slot_of`: the page's index in its leaf times 129,
//!    modulo the leaf): pages 1 to 126 apart land on different lines, and so do aligned
//!    ranges of up to 64 pages in a row (128 of them, or the 64 of 64 pages in a leaf); two
//!    marks share a line only 127 pages apart or further. 129 is the odd multiplier (the only
//!    bijections) with the widest such distance that also keeps the aligned runs apart (an
//!    exhaustive search over the odd ones: 65, the best for 8-bit marks, reaches only 63
//!    here); as `128 i + i`, it costs two instructions on the hot path. This does not make
//!    sharing impossible: two CPUs whose hot ranges (dozens each) sit in one leaf will have
//!    some marks on common lines; it only keeps neighbours apart.
//! 5. **Hints.** Each CPU keeps a [`LeafHint`]: the leaf it used last, with the map's
//!    identity. A CPU's magazines recycle a few ranges, nearly always in one leaf, so a lookup
//!    is one comparison instead of a walk of `levels` dependent loads; a miss walks and
//!    refills the hint. The hint is the CPU's own (kept under its cache lock); it only
//!    remembers a pointer that [`LiveMap::get`] would return, and leaves are never freed
//!    before the map, so a stale hint is impossible while its map lives; the identity check
//!    keeps a hint from ever being used with another map. An owner that never lends its
//!    hints to another map (the allocator: its hints live beside its map) skips that check
//!    with the `unsafe` `LiveMap::get_hinted_own`, a key comparison and a load on a hit, and
//!    refills through [`LiveMap::get_hinted`] on a miss.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr;

use crate::error::{Error, Result};
use crate::sync::{AtomicPtr, AtomicU16, Ordering};

/// log2 of the pages one leaf covers: a leaf is 4096 marks, 8 KiB.
const LEAF_BITS: u32 = 12;
/// Pages (marks) per leaf.
pub const LEAF_PAGES: usize = 1 << LEAF_BITS;
/// log2 of the children of an interior node: 512 pointers fill one 4 KiB page.
const FAN_BITS: u32 = 9;
/// Children per interior node.
pub const FAN: usize = 1 << FAN_BITS;

/// See the module documentation.
///
/// # Invariants
///
/// `root` points to a leaf of [`LEAF_PAGES`] `AtomicU16`s if `levels == 0`, else to an
/// interior node of [`FAN`] `AtomicPtr<u8>`s; an interior node at height `h` (leaves are at
/// height 0, the root at `levels`) holds null or pointers to nodes of height `h - 1`. Every
/// node was made by `Box::into_raw` of a boxed slice of that length and is freed only in `Drop`.
#[derive(Debug)]
pub struct LiveMap {
    levels: u32,
    root: *mut u8,
    /// This map's identity for [`LeafHint`]s: distinct among all maps ever made in the process.
    id: u64,
}

/// Identities of maps: a hint filled by one map never matches another, even one made at the
/// same address after the first was dropped. Touched once per map made, never on a hot path
/// (hence `core`'s atomic, not the model checker's: it is no part of any modelled protocol).
static NEXT_ID: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);

/// A one-entry memo of the leaf a CPU last used (theory 5): the key of the leaf (its first
/// page, shifted) and where its marks are, for one map.
///
/// # Invariants
///
/// `map` is 0 and `key` is `EMPTY_KEY` (an empty hint: no map has identity 0 and no leaf
/// has that key), or `leaf` holds the marks of leaf `key` of the map whose `id` is `map`;
/// leaves live as long as their map and identities are never reused, so `leaf` is valid
/// whenever `map` equals a live map's `id`.
#[derive(Debug)]
pub struct LeafHint {
    map: u64,
    key: u64,
    leaf: *const AtomicU16,
}

// SAFETY: the hint is an address that is only dereferenced through the map it belongs to
// (checked by identity), whose leaves are `Sync`; moving it to another thread moves no access.
unsafe impl Send for LeafHint {}

impl Default for LeafHint {
    fn default() -> Self {
        // INVARIANT: identity 0 and no leaf's key, an empty hint.
        Self { map: 0, key: EMPTY_KEY, leaf: ptr::null() }
    }
}

// SAFETY: the map owns its nodes; all shared access goes through atomics.
unsafe impl Send for LiveMap {}
// SAFETY: as above: `&self` methods only read pointers and marks atomically.
unsafe impl Sync for LiveMap {}

/// The key of an empty [`LeafHint`]: no leaf has it (a key is a page number shifted right by
/// [`LEAF_BITS`], below 2^52).
const EMPTY_KEY: u64 = u64::MAX;

/// log2 of the marks in one 64-byte cache line.
#[cfg(all(test, not(loom)))]
const LINE_BITS: u32 = 5;

/// The skew of the marks in a leaf (theory 4): odd, so `i -> i * SKEW mod LEAF_PAGES` is a
/// bijection.
const SKEW: u64 = 129;

/// The index of `page`'s mark in its leaf, always `< LEAF_PAGES`: the leaf's 128 lines × 32
/// marks are laid out so that nearby pages land on different cache lines (theory 4). For
/// `low`/`high` the page's low 7 and high 5 bits in the leaf, `i * 129 = low + 128 (low +
/// high)` modulo 4096; a bijection (129 is odd).
#[inline]
fn slot_of(page: u64) -> usize {
    (page.wrapping_mul(SKEW) as usize) & (LEAF_PAGES - 1)
}

fn new_leaf() -> Result<*mut u8> {
    let mut v: Vec<AtomicU16> = Vec::new();
    v.try_reserve_exact(LEAF_PAGES).map_err(|_| Error::NoMemory { requested: (LEAF_PAGES * 2) as u64 })?;
    v.extend((0..LEAF_PAGES).map(|_| AtomicU16::new(0)));
    Ok(Box::into_raw(v.into_boxed_slice()) as *mut AtomicU16 as *mut u8)
}

fn new_interior() -> Result<*mut u8> {
    let mut v: Vec<AtomicPtr<u8>> = Vec::new();
    v.try_reserve_exact(FAN).map_err(|_| Error::NoMemory { requested: (FAN * 8) as u64 })?;
    v.extend((0..FAN).map(|_| AtomicPtr::new(ptr::null_mut())));
    Ok(Box::into_raw(v.into_boxed_slice()) as *mut AtomicPtr<u8> as *mut u8)
}

/// Frees a node of height `h` and everything below it.
///
/// # Safety
///
/// `p` is a node of height `h` per the [`LiveMap`] invariants, not freed yet, and unreachable
/// by anyone else.
unsafe fn free_node(p: *mut u8, h: u32) {
    if h == 0 {
        // SAFETY: per the invariant, a leaf is a boxed slice of LEAF_PAGES marks.
        drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p as *mut AtomicU16, LEAF_PAGES)) });
        return;
    }
    // SAFETY: per the invariant, an interior node is a boxed slice of FAN pointers.
    let node = unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p as *mut AtomicPtr<u8>, FAN)) };
    for c in node.iter() {
        let c = c.load(Ordering::Relaxed);
        if !c.is_null() {
            // SAFETY: children of a height-h node are height h-1 nodes owned by it.
            unsafe { free_node(c, h - 1) };
        }
    }
}

impl LiveMap {
    /// A map for a space of `pages` pages.
    pub fn new(pages: u64) -> Result<Self> {
        let mut levels = 0;
        while levels < 8 && (pages.saturating_sub(1) >> (LEAF_BITS + FAN_BITS * levels)) != 0 {
            levels += 1;
        }
        let root = if levels == 0 { new_leaf()? } else { new_interior()? };
        let id = NEXT_ID.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        // INVARIANT: root is a fresh node of height `levels`.
        Ok(Self { levels, root, id })
    }

    /// The child slot of interior node `p` (height `h >= 1`) on the way to `page`.
    ///
    /// # Safety
    ///
    /// `p` is an interior node of height `h` of this map.
    #[inline]
    unsafe fn child(&self, p: *mut u8, h: u32, page: u64) -> &AtomicPtr<u8> {
        let idx = ((page >> (LEAF_BITS + FAN_BITS * (h - 1))) as usize) & (FAN - 1);
        // SAFETY: an interior node is FAN AtomicPtrs that live until the map drops (which
        // needs `&mut self`, so not while `&self` is borrowed); idx < FAN.
        unsafe { &*(p as *const AtomicPtr<u8>).add(idx) }
    }

    /// The mark of `page`, if its leaf exists. Lock-free.
    #[inline]
    pub fn get(&self, page: u64) -> Option<&AtomicU16> {
        // SAFETY: `leaf_of` returns a leaf of this map (LEAF_PAGES marks alive until it drops);
        // the index is masked below LEAF_PAGES.
        self.leaf_of(page).map(|p| unsafe { &*p.add(slot_of(page)) })
    }

    /// The mark of `page`, if its leaf exists, through the caller's `hint`: one comparison
    /// when the page's leaf is the one the hint remembers, else a walk that updates it.
    /// Lock-free.
    #[inline]
    pub fn get_hinted(&self, hint: &mut LeafHint, page: u64) -> Option<&AtomicU16> {
        let key = page >> LEAF_BITS;
        let leaf = if hint.key == key && hint.map == self.id {
            hint.leaf
        } else {
            let leaf = self.leaf_of(page)?;
            // INVARIANT: `leaf` is leaf `key` of this map.
            *hint = LeafHint { map: self.id, key, leaf };
            leaf
        };
        // SAFETY: by the hint's invariant and the identity check (or fresh from `leaf_of`),
        // `leaf` is a live leaf of this map: LEAF_PAGES marks alive until the map drops, which
        // cannot happen while `&self` is borrowed; the index is masked below LEAF_PAGES.
        Some(unsafe { &*leaf.add(slot_of(page)) })
    }

    /// The mark of `page` if `hint` remembers its leaf, else `None` (the caller then goes
    /// through [`LiveMap::get_hinted`], which walks and refills the hint): a comparison and a
    /// load. Lock-free.
    ///
    /// # Safety
    ///
    /// `hint` is empty or was last filled by this map's [`LiveMap::get_hinted`] (the owner
    /// never passes it to another map).
    #[inline]
    pub unsafe fn get_hinted_own(&self, hint: &LeafHint, page: u64) -> Option<&AtomicU16> {
        if hint.key != page >> LEAF_BITS {
            return None;
        }
        // SAFETY: the key matched, so the hint is not empty (no page has EMPTY_KEY's key); by
        // the caller's promise it was filled by this map, so by the hint's invariant `leaf`
        // is leaf `key` of this map, alive until the map drops, which cannot happen while
        // `&self` is borrowed; the index is masked below LEAF_PAGES.
        Some(unsafe { &*hint.leaf.add(slot_of(page)) })
    }

    /// The marks of `page`'s leaf, if it exists; `None` for a page beyond what the map's
    /// levels cover, which each level's slice of the page number would otherwise alias to a
    /// page inside.
    #[inline]
    fn leaf_of(&self, page: u64) -> Option<*const AtomicU16> {
        if page.checked_shr(LEAF_BITS + self.levels * FAN_BITS).unwrap_or(0) != 0 {
            return None;
        }
        let mut p = self.root;
        let mut h = self.levels;
        while h > 0 {
            // SAFETY: p is an interior node of height h (invariant, by induction from root).
            p = unsafe { self.child(p, h, page) }.load(Ordering::Acquire);
            if p.is_null() {
                return None;
            }
            h -= 1;
        }
        Some(p as *const AtomicU16)
    }

    /// The mark of `page`, creating the path to it if needed.
    ///
    /// Errors: [`Error::NoMemory`] if a node cannot be allocated (nothing changes).
    pub fn get_or_create(&self, page: u64) -> Result<&AtomicU16> {
        let mut p = self.root;
        let mut h = self.levels;
        while h > 0 {
            // SAFETY: p is an interior node of height h.
            let slot = unsafe { self.child(p, h, page) };
            let mut c = slot.load(Ordering::Acquire);
            if c.is_null() {
                let fresh = if h == 1 { new_leaf()? } else { new_interior()? };
                // Release publishes the zeroed node before its pointer.
                match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => c = fresh,
                    Err(winner) => {
                        // SAFETY: `fresh` was never published; it is a node of height h-1.
                        unsafe { free_node(fresh, h - 1) };
                        c = winner;
                    }
                }
            }
            p = c;
            h -= 1;
        }
        // SAFETY: as in `get`.
        Ok(unsafe { &*(p as *const AtomicU16).add(slot_of(page)) })
    }
}

impl Drop for LiveMap {
    fn drop(&mut self) {
        // SAFETY: root is a node of height `levels` owned by us; `&mut self` excludes readers.
        unsafe { free_node(self.root, self.levels) };
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn marks_are_created_once_and_found_again() {
        let m = LiveMap::new(1 << 36).unwrap();
        assert_eq!(m.levels, 3);
        assert!(m.get(12345).is_none());
        m.get_or_create(12345).unwrap().store(7, Ordering::Relaxed);
        assert_eq!(m.get(12345).unwrap().load(Ordering::Relaxed), 7);
        assert_eq!(m.get(12346).unwrap().load(Ordering::Relaxed), 0);
        assert!(m.get((1 << 36) - 1).is_none());
        m.get_or_create((1 << 36) - 1).unwrap().store(1, Ordering::Relaxed);
        assert_eq!(m.get(12345).unwrap().load(Ordering::Relaxed), 7);
        let small = LiveMap::new(16).unwrap();
        assert_eq!(small.levels, 0);
        assert!(small.get(3).is_some());
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "index arithmetic only (slot_of, no unsafe or memory access to check) over ~10^5 page pairs: over 100 s under Miri"
    )]
    fn every_page_of_a_leaf_has_its_own_mark_and_neighbours_are_on_other_lines() {
        let line = |page: u64| slot_of(page) >> LINE_BITS;
        let mut seen = alloc::vec![false; LEAF_PAGES];
        for page in 0..LEAF_PAGES as u64 {
            let s = slot_of(page + 7 * LEAF_PAGES as u64);
            assert!(s < LEAF_PAGES && !seen[s], "page {page}: slot {s} twice");
            seen[s] = true;
        }
        for page in 0..(LEAF_PAGES - 128) as u64 {
            for d in 1..127 {
                assert_ne!(line(page), line(page + d), "pages {page} and {}", page + d);
            }
        }
        // Aligned ranges in a row (128 of them, of 1 to 32 pages; the 64 of 64 pages in a
        // leaf): each on a line of its own.
        for size in [1, 2, 4, 8, 16, 32, 64] {
            let n = (LEAF_PAGES as u64 / size).min(128);
            let lines: alloc::collections::BTreeSet<_> = (0..n).map(|k| line(k * size)).collect();
            assert_eq!(lines.len() as u64, n, "{size}-page ranges");
        }
    }
}
