//! The direct page index: user page number → (physical address, pinned page shift) in one
//! radix walk, the registry's fast path for [`ReadGuard::ua_to_pa`](super::ReadGuard::ua_to_pa).
//!
//! # Theory
//!
//! 1. **Why.** The interval index (`tree.rs`) finds the region holding an address in
//!    O(log n), then the page array gives the page: with 100 000 regions a random translation
//!    is a chain of about four dependent cache misses (leaf summary, start block, entry, the
//!    region's own page array, a different allocation for every region), 85 to 130 ns on the
//!    lab machine. A translation needs neither the region nor the search: only the physical
//!    address of the page and how large an IOMMU page may map it. So the registry keeps,
//!    beside the interval index, a radix table indexed by user page number whose leaf slots
//!    hold exactly that, for every registered page: four dependent loads, of which the upper
//!    three hit the same few lines for any nearby address, and the leaf slots are 8 bytes per
//!    registered page (100 000 pages: 800 KiB, which stays in L2, against ~15 MiB of index,
//!    regions and page arrays).
//! 2. **Shape.** User addresses below 2^48 ([`INDEXED_LIMIT`]): 36 bits of page number, four
//!    levels of 9 bits, each node 512 slots of 8 bytes (one 4 KiB allocation). Levels 3 to 1
//!    hold pointers to the next level, level 0 holds *slots*: `pa | page_shift << 1 | 1`
//!    (bit 0 present; `pa` is 4 KiB-aligned, so bits 1 to 11 are free and a shift of at most
//!    30 fits in bits 1 to 6). A page above the limit is simply not indexed: a miss falls back
//!    to the interval index, which answers for every address (so a miss costs the old path,
//!    and a miss is the error path `NotMapped` anyway).
//! 3. **Updates in place.** Unlike the interval index, the table is not copied on write:
//!    writers (under the registry's writer lock, so one at a time) store slots and node
//!    pointers with single atomic stores. A reader sees, per page, the slot before or after
//!    the store, both of them right: a registration stores the slots of pages already pinned;
//!    an unregistration clears them before it retires the region, and a reader that loaded
//!    the old slot is inside a read section that began before the retirement, so the region's
//!    pages stay pinned until it leaves (the epoch's grace period, `epoch.rs` section 5). The
//!    writer issues a `SeqCst` fence between clearing and retiring, which pairs with the
//!    reader's fence on entering: either the reader's load sees the cleared slot, or the
//!    writer's epoch advance sees the reader counted (the same store-load pattern).
//! 4. **Node lifetime.** Writers count the used slots of every node below the root (in a
//!    side table, `meta`, that readers never touch). When an unregistration empties a node it
//!    unlinks it from its parent (emptying the parent in turn, perhaps) and hands it to the
//!    registry, which retires it like any index memory: freed after the epoch's grace period,
//!    since a reader may still be walking it. So the index holds nodes only for windows that
//!    hold registered pages now: 4 KiB per 2 MiB-aligned window of user space holding one,
//!    plus the upper levels (4 KiB per 1 GiB and per 512 GiB window): for a VM's guest RAM
//!    registered in large regions, 0.2 % of the registered size; the worst case, one 4 KiB
//!    page registered per 2 MiB window, 4 KiB per such page. Node allocation is fallible: a
//!    registration that cannot allocate its nodes fails with [`Error::NoMemory`] and leaves
//!    no slot set (nodes it linked on the way stay, empty, for the next registration there).
//! 5. **Cost of a write.** One store per registered page (and per unregistered page), beside
//!    the interval index's copy-on-write update: O(pages) for a registration that already
//!    pinned O(pages).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ptr::{self, NonNull};

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::sync::{AtomicPtr, AtomicU64, Ordering, fence};

/// Slots per node: 512 of 8 bytes, one 4 KiB page, 9 bits of page number per level.
const FANOUT: usize = 512;
/// Bits of page number per level: log2 of [`FANOUT`].
const LEVEL_BITS: u32 = 9;
/// First user address not indexed: 2^48, four levels of 9 bits above the 12-bit page offset;
/// x86-64 (47 bits) and Arm64 (48 bits without LVA) user space lies below it.
pub(crate) const INDEXED_LIMIT: u64 = 1 << (PAGE_SHIFT + 4 * LEVEL_BITS);
/// Bit 0 of a slot: the page is registered.
const PRESENT: u64 = 1;
/// Bits 1 to 6 of a slot: the region's pinned page shift (at most 30).
const SHIFT_MASK: u64 = 0x3f;

type Leaf = AtomicU64;
type L1 = AtomicPtr<Leaf>;
type L2 = AtomicPtr<L1>;
type L3 = AtomicPtr<L2>;

/// Allocates one node of [`FANOUT`] slots made by `mk`; returns its first slot.
fn alloc_node<T>(mk: impl Fn() -> T) -> Result<NonNull<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(FANOUT)
        .map_err(|_| Error::NoMemory { requested: (FANOUT * core::mem::size_of::<T>()) as u64 })?;
    v.extend((0..FANOUT).map(|_| mk()));
    // Capacity is exactly FANOUT: no reallocation.
    let b: Box<[T]> = v.into_boxed_slice();
    // SAFETY: `Box::into_raw` never returns null.
    Ok(unsafe { NonNull::new_unchecked(Box::into_raw(b).cast::<T>()) })
}

/// Frees a node from [`alloc_node`].
///
/// # Safety
///
/// `p` came from `alloc_node::<T>` and is freed once; nobody reaches it any more.
unsafe fn free_node<T>(p: NonNull<T>) {
    // SAFETY: `p` is the first element of a boxed slice of FANOUT elements (caller).
    drop(unsafe { Box::from_raw(ptr::slice_from_raw_parts_mut(p.as_ptr(), FANOUT)) });
}

/// Slot `i` of the node at `p`.
///
/// # Safety
///
/// `p` is a live node of [`FANOUT`] slots and `i < FANOUT`.
#[inline(always)]
unsafe fn at<'a, T>(p: *const T, i: usize) -> &'a T {
    // SAFETY: in bounds of a live node (caller).
    unsafe { &*p.add(i) }
}

#[inline(always)]
fn index(pn: u64, level: u32) -> usize {
    ((pn >> (level * LEVEL_BITS)) as usize) & (FANOUT - 1)
}

/// A node below the root.
#[derive(Clone, Copy)]
enum Node {
    L2(NonNull<L2>),
    L1(NonNull<L1>),
    Leaf(NonNull<Leaf>),
}

impl Node {
    /// Frees the node.
    ///
    /// # Safety
    ///
    /// The node is unreachable by readers and writers, and freed once.
    unsafe fn free(self) {
        // SAFETY: nodes come from `alloc_node` of their type (caller: unreachable, once).
        unsafe {
            match self {
                Node::L2(p) => free_node(p),
                Node::L1(p) => free_node(p),
                Node::Leaf(p) => free_node(p),
            }
        }
    }
}

/// A node below the root, for the writer's side table: what it is and how many of its slots
/// are used (present leaf slots, non-null child pointers).
struct Meta {
    node: Node,
    used: usize,
}

/// The writers' side table of the index (theory 4): every node linked below the root, keyed
/// by address, with the count of its used slots. It lives in the registry's writer state, so
/// the writer lock guards it and readers never see it.
#[derive(Default)]
pub(crate) struct PageMeta(BTreeMap<usize, Meta>);

// SAFETY: the table owns the nodes it lists (plain memory of atomics); moving that ownership
// between threads is sound.
unsafe impl Send for PageMeta {}

impl PageMeta {
    /// Nodes linked below the root.
    pub(crate) fn nodes(&self) -> usize {
        self.0.len()
    }
}

/// A node an unregistration unlinked: readers may still walk it until the grace period ends.
pub(crate) struct RetiredNode(Node);

impl RetiredNode {
    /// Frees the node.
    ///
    /// # Safety
    ///
    /// The grace period of its retirement has passed (no reader can reach it), and it is
    /// freed once.
    pub(crate) unsafe fn free(self) {
        // SAFETY: unlinked by `remove`, unreachable now (caller), freed once.
        unsafe { self.0.free() }
    }
}

/// The direct page index.
///
/// # Invariants
///
/// `root` and every node reachable from it are live allocations of [`alloc_node`] owned by
/// the index; the writers' [`PageMeta`] has exactly the nodes linked below the root, with the
/// count of their used slots; a present leaf slot describes a page that is pinned for at least
/// as long as any read section that could have loaded it (theory 3). Dropping the index frees
/// the root only: its owner frees the other nodes first ([`PageIndex::free_nodes`]).
pub(crate) struct PageIndex {
    root: NonNull<L3>,
}

// SAFETY: the index is atomics and nodes owned by it; shared access is loads and (writers,
// serialised by the registry's lock) stores of atomics.
unsafe impl Send for PageIndex {}
// SAFETY: as above.
unsafe impl Sync for PageIndex {}

impl PageIndex {
    /// An empty index (its root node).
    ///
    /// Errors: [`Error::NoMemory`].
    pub(crate) fn new() -> Result<Self> {
        Ok(Self { root: alloc_node(|| AtomicPtr::new(ptr::null_mut()))? })
    }

    /// The slot of the page of `ua`: 0 if the page is not indexed.
    #[inline(always)]
    fn slot(&self, ua: u64) -> u64 {
        if ua >= INDEXED_LIMIT {
            return 0;
        }
        let pn = ua >> PAGE_SHIFT;
        // Acquire on node pointers: a node's slots were initialised before it was linked.
        // SAFETY: nodes reachable from the root are live for the index's life (invariant), and
        // `index` is below FANOUT.
        unsafe {
            let l2 = at(self.root.as_ptr(), index(pn, 3)).load(Ordering::Acquire);
            if l2.is_null() {
                return 0;
            }
            let l1 = at(l2, index(pn, 2)).load(Ordering::Acquire);
            if l1.is_null() {
                return 0;
            }
            let leaf = at(l1, index(pn, 1)).load(Ordering::Acquire);
            if leaf.is_null() {
                return 0;
            }
            // Relaxed: a slot is self-contained data (no pointer to follow).
            at(leaf, index(pn, 0)).load(Ordering::Relaxed)
        }
    }

    /// The physical address of `ua` for an IOMMU page of `1 << iommu_shift` bytes, if the
    /// page is indexed and the region's pinned page is at least that large; `None` sends the
    /// caller to the interval index (not indexed, or one of the refusals to report).
    #[inline(always)]
    pub(crate) fn translate(&self, ua: u64, iommu_shift: u32) -> Option<PhysAddr> {
        let s = self.slot(ua);
        let shift = (s >> 1) & SHIFT_MASK;
        if s & PRESENT == 0 || iommu_shift < PAGE_SHIFT || u64::from(iommu_shift) > shift {
            return None;
        }
        Some(PhysAddr::new((s & !(PAGE_SIZE - 1)) | (ua & (PAGE_SIZE - 1))))
    }

    /// The node `slot` (of the node at `parent`, `None` for the root) points to, allocating
    /// and linking it (made of `mk` slots) if `slot` is empty. Writer-lock holders only.
    fn child<T, U>(
        &self,
        meta: &mut PageMeta,
        parent: Option<*const U>,
        slot: &AtomicPtr<T>,
        mk: impl Fn() -> T,
        node: impl Fn(NonNull<T>) -> Node,
    ) -> Result<*mut T> {
        // Writers are serialised: a Relaxed load sees the writer's own earlier stores.
        let p = slot.load(Ordering::Relaxed);
        if !p.is_null() {
            return Ok(p);
        }
        let p = alloc_node(mk)?;
        meta.0.insert(p.as_ptr() as usize, Meta { node: node(p), used: 0 });
        if let Some(m) = parent.and_then(|q| meta.0.get_mut(&(q as usize))) {
            m.used += 1;
        }
        // Release: the node's slots are initialised before a reader can reach it.
        slot.store(p.as_ptr(), Ordering::Release);
        Ok(p.as_ptr())
    }

    /// The leaf node holding the slot of page number `pn`, allocating the path to it.
    /// Writer-lock holders only.
    fn leaf_for(&self, meta: &mut PageMeta, pn: u64) -> Result<*const Leaf> {
        // SAFETY: nodes reachable from the root are live (invariant); indexes < FANOUT.
        unsafe {
            let root = self.root.as_ptr();
            let l2 = self.child(
                meta,
                None::<*const L3>,
                at(root, index(pn, 3)),
                || AtomicPtr::new(ptr::null_mut()),
                Node::L2,
            )?;
            let l1 = self.child(
                meta,
                Some(l2),
                at(l2, index(pn, 2)),
                || AtomicPtr::new(ptr::null_mut()),
                Node::L1,
            )?;
            let leaf = self.child(meta, Some(l1), at(l1, index(pn, 1)), || AtomicU64::new(0), Node::Leaf)?;
            Ok(leaf)
        }
    }

    /// Indexes the pinned pages `hpas` of the region at the page-aligned `ua` with pinned
    /// page shift `page_shift`. Pages at or above [`INDEXED_LIMIT`] are left out. Writer-lock
    /// holders only.
    ///
    /// Errors: [`Error::NoMemory`] (a node); then no slot of the region is set (nodes
    /// allocated on the way stay, empty, owned by the index).
    pub(crate) fn insert(
        &self,
        meta: &mut PageMeta,
        ua: u64,
        hpas: &[PhysAddr],
        page_shift: u32,
    ) -> Result<()> {
        let pages = Self::indexed_pages(ua, hpas.len());
        // First every node (the only step that can fail), then the slots.
        let mut pn = ua >> PAGE_SHIFT;
        let end = pn + pages as u64;
        while pn < end {
            self.leaf_for(meta, pn)?;
            // Next leaf node: the next multiple of FANOUT pages.
            pn = (pn | (FANOUT as u64 - 1)) + 1;
        }
        let tag = (u64::from(page_shift) & SHIFT_MASK) << 1 | PRESENT;
        for (i, pa) in hpas[..pages].iter().enumerate() {
            let pn = (ua >> PAGE_SHIFT) + i as u64;
            let leaf = self.leaf_for(meta, pn)?;
            // SAFETY: a live leaf node (just found), index < FANOUT.
            let slot = unsafe { at(leaf, index(pn, 0)) };
            if slot.load(Ordering::Relaxed) == 0 {
                if let Some(m) = meta.0.get_mut(&(leaf as usize)) {
                    m.used += 1;
                }
            }
            slot.store(pa.raw() | tag, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Clears the slots of the `pages` pages at the page-aligned `ua`, unlinks the nodes that
    /// leaves empty and pushes them to `retired` (theory 4), then fences so that a reader
    /// entering a section after the caller retires the region (and the nodes) cannot load
    /// them (theory 3). Writer-lock holders only.
    pub(crate) fn remove(&self, meta: &mut PageMeta, ua: u64, pages: usize, retired: &mut Vec<RetiredNode>) {
        let pages = Self::indexed_pages(ua, pages);
        let meta = &mut meta.0;
        // Counts one slot of the node at `p` cleared; true if the node is now empty (then it
        // leaves the side table and is retired).
        let mut release = |p: usize, retired: &mut Vec<RetiredNode>| -> bool {
            let Some(m) = meta.get_mut(&p) else { return false };
            m.used = m.used.saturating_sub(1);
            if m.used > 0 {
                return false;
            }
            if let Some(m) = meta.remove(&p) {
                retired.push(RetiredNode(m.node));
            }
            true
        };
        for i in 0..pages as u64 {
            let pn = (ua >> PAGE_SHIFT) + i;
            // SAFETY: nodes reachable from the root are live (invariant); indexes < FANOUT.
            unsafe {
                let s3 = at(self.root.as_ptr(), index(pn, 3));
                let l2 = s3.load(Ordering::Relaxed);
                if l2.is_null() {
                    continue;
                }
                let s2 = at(l2, index(pn, 2));
                let l1 = s2.load(Ordering::Relaxed);
                if l1.is_null() {
                    continue;
                }
                let s1 = at(l1, index(pn, 1));
                let leaf = s1.load(Ordering::Relaxed);
                if leaf.is_null() {
                    continue;
                }
                let slot = at(leaf, index(pn, 0));
                if slot.load(Ordering::Relaxed) == 0 {
                    continue;
                }
                slot.store(0, Ordering::Relaxed);
                // Emptied nodes are unlinked bottom-up; readers that loaded them before keep
                // a valid node until the grace period ends.
                if release(leaf as usize, retired) {
                    s1.store(ptr::null_mut(), Ordering::Relaxed);
                    if release(l1 as usize, retired) {
                        s2.store(ptr::null_mut(), Ordering::Relaxed);
                        if release(l2 as usize, retired) {
                            s3.store(ptr::null_mut(), Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        fence(Ordering::SeqCst);
    }

    /// Frees every node linked below the root (teardown).
    ///
    /// # Safety
    ///
    /// No reader or writer uses the index any more, and it is only dropped afterwards.
    pub(crate) unsafe fn free_nodes(&self, meta: &mut PageMeta) {
        // Slots hold no owned data, so the order of frees does not matter. Retired nodes are
        // the registry's garbage, not in `meta`.
        for (_, m) in core::mem::take(&mut meta.0) {
            // SAFETY: each node of `meta` is a live node of the index, listed once, and unused
            // from now on (caller).
            unsafe { m.node.free() };
        }
    }

    /// How many of the `pages` pages at `ua` lie below [`INDEXED_LIMIT`].
    fn indexed_pages(ua: u64, pages: usize) -> usize {
        if ua >= INDEXED_LIMIT {
            return 0;
        }
        pages.min(((INDEXED_LIMIT - ua) >> PAGE_SHIFT) as usize)
    }
}

impl Drop for PageIndex {
    fn drop(&mut self) {
        // The other nodes were freed by the owner (`free_nodes`, type invariant).
        // SAFETY: the root, allocated by `new`, freed once.
        unsafe { free_node(self.root) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pas(first: u64, n: usize) -> Vec<PhysAddr> {
        (0..n as u64).map(|i| PhysAddr::new(first + i * PAGE_SIZE)).collect()
    }

    #[test]
    fn an_indexed_page_translates_every_byte_and_a_cleared_one_misses() {
        let ix = PageIndex::new().unwrap();
        let mut meta = PageMeta::default();
        // Three pages across a leaf-node boundary (page numbers 511, 512, 513).
        let ua = 511 * PAGE_SIZE;
        ix.insert(&mut meta, ua, &pas(0x7000_0000, 3), PAGE_SHIFT).unwrap();
        for (i, off) in [(0, 0), (1, 0x123), (2, 0xfff)] {
            let at = ua + i * PAGE_SIZE + off;
            assert_eq!(ix.translate(at, 12), Some(PhysAddr::new(0x7000_0000 + i * PAGE_SIZE + off)));
        }
        assert_eq!(ix.translate(ua - 1, 12), None);
        assert_eq!(ix.translate(ua + 3 * PAGE_SIZE, 12), None);
        let mut retired = Vec::new();
        ix.remove(&mut meta, ua, 1, &mut retired);
        assert_eq!(ix.translate(ua, 12), None);
        assert!(ix.translate(ua + PAGE_SIZE, 12).is_some());
        // Page 511 was alone in its leaf: that leaf is retired; its path holds the other leaf.
        assert_eq!((retired.len(), meta.nodes()), (1, 3));
        ix.remove(&mut meta, ua + PAGE_SIZE, 2, &mut retired);
        assert!((0..3).all(|i| ix.translate(ua + i * PAGE_SIZE, 12).is_none()));
        // Empty now: every node below the root retired, none linked.
        assert_eq!((retired.len(), meta.nodes()), (4, 0));
        for r in retired {
            // SAFETY: no reader exists in this test; each retired once.
            unsafe { r.free() };
        }
    }

    #[test]
    fn an_iommu_page_larger_than_the_pinned_page_or_below_4k_is_left_to_the_interval_index() {
        let ix = PageIndex::new().unwrap();
        let mut meta = PageMeta::default();
        ix.insert(&mut meta, 1 << 30, &pas(1 << 31, 512), 21).unwrap();
        assert!(ix.translate(1 << 30, 21).is_some());
        assert_eq!(ix.translate(1 << 30, 30), None);
        assert_eq!(ix.translate(1 << 30, 11), None);
        assert_eq!(meta.nodes(), 3);
        // SAFETY: the index is dropped right after.
        unsafe { ix.free_nodes(&mut meta) };
    }

    #[test]
    fn pages_at_or_above_the_indexed_limit_are_not_indexed() {
        let ix = PageIndex::new().unwrap();
        let mut meta = PageMeta::default();
        let ua = INDEXED_LIMIT - PAGE_SIZE;
        ix.insert(&mut meta, ua, &pas(0x1000, 2), PAGE_SHIFT).unwrap();
        assert_eq!(ix.translate(ua, 12), Some(PhysAddr::new(0x1000)));
        assert_eq!(ix.translate(INDEXED_LIMIT, 12), None);
        ix.insert(&mut meta, !(PAGE_SIZE - 1), &pas(0x9000, 1), PAGE_SHIFT).unwrap();
        assert_eq!(ix.translate(u64::MAX, 12), None);
        let mut retired = Vec::new();
        ix.remove(&mut meta, ua, 2, &mut retired);
        assert_eq!(ix.translate(ua, 12), None);
        assert_eq!((retired.len(), meta.nodes()), (3, 0));
        for r in retired {
            // SAFETY: no reader exists in this test; each retired once.
            unsafe { r.free() };
        }
    }
}
