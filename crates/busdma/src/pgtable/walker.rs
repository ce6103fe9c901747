//! The generic walker: map, unmap, split and lookup over any [`PteFormat`].
//!
//! See the module documentation of [`crate::pgtable`] for the theory; this file follows it
//! rule by rule, with a comment at each ordering hazard.
//!
//! Table handles: the walker owns its root [`TablePage`]; every other table it reaches it sees
//! through a handle made from the entry that points at it (`table_at`) or from the root
//! (`root_view`), each valid only during the call on `&self` that made it (rule 4 keeps the
//! table installed meanwhile). The owning handles are the root's and those the gather holds.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering};

use super::format::{ENTRIES, height_shift, height_span};
use super::install::{self, Next, TableSource};
use super::{Gather, Prot, PteFormat, TablePool};
use crate::addr::{AddrRange, Iova, KernVa, PAGE_SIZE, PageSize, PhysAddr};
use crate::error::{Error, Result};
use crate::platform::{CpuGuard, Platform, TablePage};

mod leafwin;
pub use leafwin::{LeafTemplate, LeafWindow};

/// Splits one unmap may need: at each end of the range, a 1 GiB block splits into 2 MiB
/// blocks and the 2 MiB block holding the end splits into 4 KiB pages: 2 per end, 2 ends.
const MAX_SPLITS: usize = 4;

/// Entries of each CPU's leaf-table cache (see [`LeafCache`]): 64 last-level tables, i.e. the
/// 2 MiB spans of 64 recent maps. `dmalab bench map` cycles 32 maps whose reserved windows
/// each lie in their own span, and a NIC ring's windows share a handful; 64 covers both with
/// room, at 2 KiB per CPU, and a direct-mapped index (span number mod 64) costs one mask.
const LEAF_CACHE_SLOTS: usize = 64;

/// One remembered last-level table: the 2 MiB span number plus one (0: empty), the table's
/// physical and kernel virtual addresses, and the detach epoch it was found under.
#[derive(Default)]
struct LeafSlot {
    span: AtomicU64,
    pa: AtomicU64,
    kva: AtomicU64,
    epoch: AtomicU64,
}

/// One CPU's leaf-table cache, on its own cache lines.
///
/// # Theory
///
/// A small map or unmap (the per-packet case) spends most of its page-table time descending
/// from the root to the last-level table (three dependent entry reads and address
/// translations on a 4-level table) before touching one to three leaves. Consecutive maps
/// land in few last-level tables, so each CPU remembers the last-level table of recent
/// spans and goes straight to it.
///
/// 1. **Single writer.** Slots are read and written only by the CPU whose [`CpuGuard`] the
///    caller holds (no other thread runs there meanwhile), so relaxed atomic loads and stores
///    suffice (plain moves; the atomics only keep `&self` sound).
/// 2. **Validity.** A last-level table stops being the one for its span only when it is
///    detached (module rule 4: an unmap covering its whole span), and it is freed only after
///    that. Every detach increments [`PageTable`]'s `detach_epoch` before it clears the parent
///    entry; a slot is used only if the epoch still equals the one it was filled under. A
///    caller using a slot owns an IOVA range inside the span, so no detach of that table can
///    run concurrently (it would need the whole span); a detach that ran *before* reached the
///    caller through the hand-off of the IOVA (the allocator's locks and atomics: the range
///    was freed by the detaching unmap's owner and allocated since), so the caller's Acquire
///    load of the epoch sees its increment. An epoch change makes every slot stale at once
///    (detaches are rare: only unmaps covering 2 MiB).
/// 3. **Blocks.** Only tables found by a walk are cached; a span mapped by a block is never
///    cached, and a block can replace a table only after a detach.
#[repr(align(128))]
struct LeafCache([LeafSlot; LEAF_CACHE_SLOTS]);

impl LeafCache {
    fn new() -> Self {
        Self(core::array::from_fn(|_| LeafSlot::default()))
    }
}

/// The shape of a page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTableConfig {
    /// Input (IOVA) address width: 39 (3 levels) or 48 (4 levels).
    pub input_bits: u32,
    /// True if the IOMMU's table walker snoops the CPU caches (VT-d `ECAP.C = 1`, SMMU with
    /// coherent walks). False: every table update is cleaned to memory with
    /// [`Platform::cache_clean`] before it matters.
    pub coherent_walker: bool,
}

/// An IO page table in format `F`, its pages from a [`TablePool`].
///
/// `Send + Sync`: every operation takes `&self`; concurrent callers must work on disjoint IOVA
/// ranges (the module's rule 3).
///
/// # Invariants
///
/// - `root` and every table reachable from it came from `pool` and stay allocated while
///   reachable; entries are accessed only atomically.
/// - Every present entry was built by `F` for its height.
pub struct PageTable<'p, P: Platform, F: PteFormat> {
    pool: &'p TablePool<'p, P>,
    root: TablePage,
    levels: u32,
    input_bits: u32,
    coherent: bool,
    max_leaf_height: u32,
    /// Per-CPU leaf-table caches (empty if they could not be allocated: then every map and
    /// unmap walks from the root).
    leaf_cache: Box<[LeafCache]>,
    /// Detaches of a table so far ([`LeafCache`] rule 2).
    detach_epoch: AtomicU64,
    _format: PhantomData<fn() -> F>,
}

/// The map walk's state.
struct MapCtx<'a, 'p, P: Platform> {
    pool: &'a TablePool<'p, P>,
    g: &'a CpuGuard<'a, P>,
    prot: Prot,
    coherent: bool,
    /// Set by `published`: the last install was ours, its parent entry needs a clean.
    installed: bool,
    /// Every leaf of `[start, done)` was written by this call.
    done: u64,
}

impl<P: Platform> TableSource for MapCtx<'_, '_, P> {
    type Page = TablePage;

    fn alloc_table(&mut self) -> Result<(PhysAddr, TablePage)> {
        let page = self.pool.alloc(self.g)?;
        if !self.coherent {
            // Non-coherent walker: the zeroed page must be in memory before any entry points
            // to it.
            self.pool.platform().cache_clean(page.kva(), PAGE_SIZE);
        }
        Ok((page.pa(), page))
    }

    fn published(&mut self, _page: TablePage) {
        self.installed = true;
    }

    fn discard(&mut self, page: TablePage) {
        self.pool.free_zeroed(self.g, page);
    }
}

/// The unmap walk's state.
struct UnmapCtx<'a> {
    spares: [Option<TablePage>; MAX_SPLITS],
    gather: &'a mut Gather,
}

fn entry(t: &TablePage, i: usize) -> Result<&AtomicU64> {
    t.entry(i).ok_or(Error::OutOfRange { addr: i as u64, limit: ENTRIES as u64 })
}

#[inline]
fn index(addr: u64, height: u32) -> usize {
    ((addr >> height_shift(height)) as usize) & (ENTRIES - 1)
}

/// End of the entry at `height` holding `a`, clipped to `end`.
#[inline]
fn chunk_end(a: u64, end: u64, height: u32) -> u64 {
    let span = height_span(height);
    // a < 2^48, so this does not overflow.
    ((a | (span - 1)) + 1).min(end)
}

/// The entry indices `[first, last)` of the 4 KiB leaves of `[a, end)`, which lie in one
/// last-level table.
#[inline]
fn leaf_span(a: u64, end: u64) -> Result<(usize, usize)> {
    let first = index(a, 0);
    let last = first + ((end - a) / PAGE_SIZE) as usize;
    if last > ENTRIES {
        return Err(Error::OutOfRange { addr: last as u64, limit: ENTRIES as u64 });
    }
    Ok((first, last))
}

fn check_aligned(value: u64) -> Result<()> {
    if value % PAGE_SIZE != 0 { Err(Error::Misaligned { value, align: PAGE_SIZE }) } else { Ok(()) }
}

impl<'p, P: Platform, F: PteFormat> PageTable<'p, P, F> {
    /// An empty table: one zeroed root page from `pool`.
    ///
    /// Errors: [`Error::InvalidArgument`] for an input width the format does not support;
    /// [`Error::NoMemory`].
    pub fn new(pool: &'p TablePool<'p, P>, cfg: PageTableConfig) -> Result<Self> {
        let levels = F::levels(cfg.input_bits)?;
        let root = {
            let g = pool.platform().pin_cpu();
            let root = pool.alloc(&g)?;
            if !cfg.coherent_walker {
                pool.platform().cache_clean(root.kva(), PAGE_SIZE);
            }
            root
        };
        // The caches are an optimisation: without memory for them the table still works.
        let cpus = pool.platform().num_cpus();
        let mut caches = Vec::new();
        if caches.try_reserve_exact(cpus).is_ok() {
            caches.extend((0..cpus).map(|_| LeafCache::new()));
        }
        Ok(Self {
            pool,
            root,
            levels,
            input_bits: cfg.input_bits,
            coherent: cfg.coherent_walker,
            max_leaf_height: F::MAX_LEAF_HEIGHT,
            leaf_cache: caches.into_boxed_slice(),
            detach_epoch: AtomicU64::new(0),
            _format: PhantomData,
        })
    }

    /// The same table with leaves no larger than `size` (4 KiB: no blocks; 2 MiB: no 1 GiB
    /// blocks). For hardware without large-page support (VT-d `CAP.SLLPS`) and for
    /// comparisons with walkers that build only pages.
    pub fn with_max_leaf(mut self, size: PageSize) -> Self {
        let h = match size {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
            PageSize::Size1G => 2,
        };
        self.max_leaf_height = h.min(F::MAX_LEAF_HEIGHT);
        self
    }

    /// The root table's physical address: what the hardware is programmed with (VT-d context
    /// entry SLPTPTR, SMMU context descriptor TTB0).
    pub fn root(&self) -> PhysAddr {
        self.root.pa()
    }

    /// Number of levels (3 for 39-bit input, 4 for 48-bit).
    pub fn levels(&self) -> u32 {
        self.levels
    }

    /// Input address width in bits.
    pub fn input_bits(&self) -> u32 {
        self.input_bits
    }

    /// The first IOVA the table cannot map: `2^input_bits`.
    pub fn input_limit(&self) -> u64 {
        1 << self.input_bits
    }

    /// True if the walker snoops CPU caches (no cleaning).
    pub fn coherent_walker(&self) -> bool {
        self.coherent
    }

    /// The pool the table's pages come from.
    pub fn pool(&self) -> &'p TablePool<'p, P> {
        self.pool
    }

    /// A handle to the root table for a walk (the root is freed only when the table drops).
    #[inline]
    fn root_view(&self) -> TablePage {
        // SAFETY: the root stays allocated until `drop`, which frees it through the handle
        // it makes itself; views made here live only inside one call on `&self`.
        unsafe { self.root.alias() }
    }

    fn top(&self) -> u32 {
        self.levels - 1
    }

    fn platform(&self) -> &'p P {
        self.pool.platform()
    }

    /// The cached last-level table of `a`'s span on the guard's CPU, if still valid
    /// ([`LeafCache`] rule 2).
    #[inline]
    fn cached_leaf_table(&self, g: &CpuGuard<'_, P>, a: u64) -> Option<TablePage> {
        let span = a >> height_shift(1);
        let slot = &self.leaf_cache.get(g.cpu())?.0[span as usize % LEAF_CACHE_SLOTS];
        if slot.span.load(Ordering::Relaxed) != span + 1
            || slot.epoch.load(Ordering::Relaxed) != self.detach_epoch.load(Ordering::Acquire)
        {
            return None;
        }
        let (pa, kva) = (slot.pa.load(Ordering::Relaxed), slot.kva.load(Ordering::Relaxed));
        // SAFETY: the slot was filled from a table this page table reached by a walk, under
        // the current detach epoch: the table has not been detached since, so it is still
        // installed, hence allocated and direct-mapped at `kva` (LeafCache rule 2).
        Some(unsafe { TablePage::new(PhysAddr::new(pa), KernVa::new(kva)) })
    }

    /// Remembers `t` as the last-level table of `a`'s span on the guard's CPU; `epoch` is the
    /// detach epoch read before the walk that found it.
    #[inline]
    fn cache_leaf_table(&self, g: &CpuGuard<'_, P>, a: u64, t: &TablePage, epoch: u64) {
        let span = a >> height_shift(1);
        if let Some(c) = self.leaf_cache.get(g.cpu()) {
            let slot = &c.0[span as usize % LEAF_CACHE_SLOTS];
            slot.span.store(span + 1, Ordering::Relaxed);
            slot.pa.store(t.pa().raw(), Ordering::Relaxed);
            slot.kva.store(t.kva().raw(), Ordering::Relaxed);
            slot.epoch.store(epoch, Ordering::Relaxed);
        }
    }

    /// The table page at `pa`, found in a present non-leaf entry.
    fn table_at(&self, pa: PhysAddr) -> Result<TablePage> {
        let kva = self.platform().phys_to_kva(pa).ok_or(Error::NotDirectMapped { pa: pa.raw() })?;
        // SAFETY: `pa` was read from a present table entry of this page table, which only ever
        // points to pool pages (direct-mapped, from `alloc_table_page`) that stay allocated
        // while reachable; callers own disjoint ranges, and only a caller whose range covers a
        // table's whole span detaches it, so no other caller is walking it.
        Ok(unsafe { TablePage::new(pa, kva) })
    }

    /// Cleans entries `[first, first + n)` of `t` to memory for a non-coherent walker.
    #[inline]
    fn clean(&self, t: &TablePage, first: usize, n: usize) {
        if !self.coherent && n > 0 {
            let kva = KernVa::new(t.kva().raw() + first as u64 * 8);
            self.platform().cache_clean(kva, n as u64 * 8);
        }
    }

    /// Checks `[start, start + len)` fits the input width; returns its end.
    fn check_input(&self, start: u64, len: u64) -> Result<u64> {
        let end = start.checked_add(len).ok_or(Error::Overflow { base: start, len })?;
        let limit = self.input_limit();
        if end > limit {
            return Err(Error::OutOfRange { addr: start.max(limit), limit });
        }
        Ok(end)
    }

    // ---- map ---------------------------------------------------------------------------

    /// Maps `[iova, iova + len)` to `[pa, pa + len)` with rights `prot`, using blocks where
    /// the run is aligned and long enough.
    ///
    /// Errors (nothing changed, except empty intermediate tables may remain; see the module's
    /// rule 6): [`Error::ZeroSize`]; [`Error::Misaligned`] (IOVA, PA or length not 4 KiB
    /// multiples); [`Error::Overflow`]; [`Error::OutOfRange`] (IOVA beyond the input width,
    /// PA beyond the format's output width); [`Error::InvalidArgument`] (no rights);
    /// [`Error::AlreadyMapped`] with the first mapped IOVA met; [`Error::NoMemory`].
    ///
    /// # Safety
    ///
    /// - **The IOVA range is the caller's.** No other call maps, unmaps or reserves any part
    ///   of `[iova, iova + len)` in this table while this call runs or while the mapping
    ///   lives (module rule 3): the caller got the range from the IOVA allocator or a window
    ///   of this table's domain and has not given it back. Another caller's unmap covering a
    ///   table this call walks could otherwise free the table under it.
    /// - **The physical range may be given to the device.** `[pa, pa + len)` is memory (or
    ///   device memory) that the caller may let the devices behind this table access with
    ///   `prot` until the mapping is unmapped *and* the invalidation covering that unmap has
    ///   completed; it is not freed or handed to anyone else before.
    ///
    /// ```compile_fail,E0133
    /// use busdma::pgtable::{PageTable, Prot, PteFormat};
    /// use busdma::{CpuGuard, Iova, PhysAddr, Platform};
    /// // Mapping without `unsafe` is rejected (E0133): the caller vouches for both ranges.
    /// fn map_any<P: Platform, F: PteFormat>(t: &PageTable<'_, P, F>, g: &CpuGuard<'_, P>) {
    ///     let _ = t.map(g, Iova::new(0), PhysAddr::new(0), 4096, Prot::READ);
    /// }
    /// ```
    pub unsafe fn map(
        &self,
        g: &CpuGuard<'_, P>,
        iova: Iova,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
    ) -> Result<()> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        check_aligned(iova.raw())?;
        check_aligned(pa.raw())?;
        check_aligned(len)?;
        let prot = F::effective_prot(prot)?;
        let end = self.check_input(iova.raw(), len)?;
        let pa_end = pa.raw().checked_add(len).ok_or(Error::Overflow { base: pa.raw(), len })?;
        let out_limit = 1u64 << F::OUTPUT_BITS;
        if pa_end > out_limit {
            return Err(Error::OutOfRange { addr: pa.raw().max(out_limit), limit: out_limit });
        }
        let mut ctx =
            MapCtx { pool: self.pool, g, prot, coherent: self.coherent, installed: false, done: iova.raw() };
        let r = if len < height_span(1) && iova.raw() >> height_shift(1) == (end - 1) >> height_shift(1) {
            // Fast path: the run lies inside one last-level table and cannot be a block (the
            // common map of a small buffer): one descent, then the pages.
            match self.cached_leaf_table(g, iova.raw()) {
                Some(t) => self.map_pages(&mut ctx, &t, iova.raw(), end, pa.raw()),
                None => {
                    let epoch = self.detach_epoch.load(Ordering::Acquire);
                    self.last_level_table_or_install(&mut ctx, iova.raw()).and_then(|t| {
                        self.cache_leaf_table(g, iova.raw(), &t, epoch);
                        self.map_pages(&mut ctx, &t, iova.raw(), end, pa.raw())
                    })
                }
            }
        } else {
            self.map_in(&mut ctx, self.root_view(), self.top(), iova.raw(), end, pa.raw())
        };
        if r.is_err() && ctx.done > iova.raw() {
            // Roll back: clear every leaf this call wrote. Tables stay (rule 4).
            let _ = self.clear_leaves(self.root_view(), self.top(), iova.raw(), ctx.done);
        }
        r
    }

    /// The last-level table for `a`, installing missing levels.
    fn last_level_table_or_install(&self, ctx: &mut MapCtx<'_, '_, P>, a: u64) -> Result<TablePage> {
        let mut t = self.root_view();
        for height in (1..self.levels).rev() {
            let i = index(a, height);
            let next = install::table_or_install::<F, _, _>(entry(&t, i)?, height, ctx)?;
            if core::mem::take(&mut ctx.installed) {
                self.clean(&t, i, 1);
            }
            t = match next {
                Next::Table(tpa) => self.table_at(tpa)?,
                Next::Leaf(_) => return Err(Error::AlreadyMapped { addr: a }),
            };
        }
        Ok(t)
    }

    /// Maps `[a, end)` (inside table `t`'s span, at `height`) to `pa...`.
    fn map_in(
        &self,
        ctx: &mut MapCtx<'_, '_, P>,
        t: TablePage,
        height: u32,
        mut a: u64,
        end: u64,
        mut pa: u64,
    ) -> Result<()> {
        if height == 0 {
            return self.map_pages(ctx, &t, a, end, pa);
        }
        let span = height_span(height);
        while a < end {
            let i = index(a, height);
            let e = chunk_end(a, end, height);
            let slot = entry(&t, i)?;
            let whole = a % span == 0 && e - a == span && pa % span == 0;
            if whole && height <= self.max_leaf_height {
                // Acquire: if another caller installed a table here earlier, see its contents.
                let cur = slot.load(Ordering::Acquire);
                if cur == 0 {
                    // Relaxed suffices: only the owner of [a, e) writes this entry, and the
                    // hardware uses it only after the caller publishes the IOVA to the device,
                    // which orders with the platform's DMA barrier / MMIO doorbell.
                    slot.store(F::make_leaf(PhysAddr::new(pa), ctx.prot, height), Ordering::Relaxed);
                    self.clean(&t, i, 1);
                    ctx.done = e;
                    a = e;
                    pa += span;
                    continue;
                }
                if F::is_leaf(cur, height) {
                    return Err(Error::AlreadyMapped { addr: a });
                }
                // An empty table left by a partial unmap: map below it (it cannot be replaced
                // by a block without a flush; map has no gather).
            }
            let next = install::table_or_install::<F, _, _>(slot, height, ctx)?;
            if core::mem::take(&mut ctx.installed) {
                // Non-coherent walker: the new table was cleaned before the CAS; now the entry.
                self.clean(&t, i, 1);
            }
            match next {
                Next::Table(tpa) => {
                    let child = self.table_at(tpa)?;
                    self.map_in(ctx, child, height - 1, a, e, pa)?;
                }
                Next::Leaf(_) => return Err(Error::AlreadyMapped { addr: a }),
            }
            pa += e - a;
            a = e;
        }
        Ok(())
    }

    /// Writes 4 KiB leaves for `[a, end)` in the last-level table `t`.
    fn map_pages(&self, ctx: &mut MapCtx<'_, '_, P>, t: &TablePage, a: u64, end: u64, pa: u64) -> Result<()> {
        let (first, last) = leaf_span(a, end)?;
        // Consecutive leaves differ by the page size in their address field (PteFormat's
        // invariant), so the loop adds instead of rebuilding each entry.
        let mut pte = F::make_leaf(PhysAddr::new(pa), ctx.prot, 0);
        for i in first..last {
            let slot = entry(t, i)?;
            if slot.load(Ordering::Relaxed) != 0 {
                self.clean(t, first, i - first);
                ctx.done = a + (i - first) as u64 * PAGE_SIZE;
                return Err(Error::AlreadyMapped { addr: ctx.done });
            }
            // Relaxed: as for blocks in `map_in`, only the owner writes, and the device sees
            // the IOVA only after the caller's DMA barrier.
            slot.store(pte, Ordering::Relaxed);
            pte += PAGE_SIZE;
        }
        self.clean(t, first, last - first);
        ctx.done = end;
        Ok(())
    }

    /// Clears every leaf in `[a, end)`, keeping tables (map's rollback). `[a, end)` holds only
    /// whole leaves this call wrote.
    fn clear_leaves(&self, t: TablePage, height: u32, mut a: u64, end: u64) -> Result<()> {
        while a < end {
            let i = index(a, height);
            let e = chunk_end(a, end, height);
            let slot = entry(&t, i)?;
            let cur = slot.load(Ordering::Acquire);
            if F::is_present(cur) {
                if F::is_leaf(cur, height) {
                    slot.store(0, Ordering::Relaxed);
                    self.clean(&t, i, 1);
                } else {
                    let child = self.table_at(F::output(cur, height))?;
                    self.clear_leaves(child, height - 1, a, e)?;
                }
            }
            a = e;
        }
        Ok(())
    }

    // ---- unmap -------------------------------------------------------------------------

    /// Unmaps `range`, splitting blocks it covers partly. Adds the cleared range and the
    /// detached table pages to `gather`; the caller invalidates the IOTLB for
    /// [`Gather::range`] and then releases the pages with [`Gather::release_after_flush`].
    ///
    /// Errors (nothing changed): [`Error::Misaligned`]; [`Error::OutOfRange`] (beyond the
    /// input width); [`Error::NotMapped`] with the first IOVA of the range not mapped;
    /// [`Error::NoMemory`] (a split needs a page and none is left).
    ///
    /// # Safety
    ///
    /// `range` is the caller's (as for [`PageTable::map`]): no other call maps, unmaps or
    /// reserves any part of it in this table while this call runs. An unmap of a range
    /// another caller owns detaches tables that caller may be walking, and ends translations
    /// its device relies on.
    ///
    /// ```compile_fail,E0133
    /// use busdma::pgtable::{Gather, PageTable, PteFormat};
    /// use busdma::{AddrRange, CpuGuard, Iova, Platform};
    /// // Unmapping without `unsafe` is rejected (E0133).
    /// fn unmap_any<P: Platform, F: PteFormat>(t: &PageTable<'_, P, F>, g: &CpuGuard<'_, P>, r: AddrRange<Iova>) {
    ///     let _ = t.unmap(g, r, &mut Gather::new());
    /// }
    /// ```
    pub unsafe fn unmap(
        &self,
        g: &CpuGuard<'_, P>,
        range: AddrRange<Iova>,
        gather: &mut Gather,
    ) -> Result<()> {
        let (start, end) = (range.start().raw(), range.end().raw());
        if start == end {
            return Err(Error::ZeroSize);
        }
        check_aligned(start)?;
        check_aligned(end)?;
        self.check_input(start, end - start)?;
        // Fast path: the range lies inside one last-level table without covering all of it
        // (the common unmap of a small buffer): one descent, check, clear.
        if end - start < height_span(1) && start >> height_shift(1) == (end - 1) >> height_shift(1) {
            if let Some(t) = self.cached_leaf_table(g, start) {
                return self.unmap_pages(&t, start, end, gather);
            }
            let epoch = self.detach_epoch.load(Ordering::Acquire);
            if let Some(t) = self.last_level_table(start)? {
                self.cache_leaf_table(g, start, &t, epoch);
                return self.unmap_pages(&t, start, end, gather);
            }
        }
        let mut splits = 0;
        self.check_mapped(self.root_view(), self.top(), start, end, &mut splits)?;
        let mut ctx = UnmapCtx { spares: [const { None }; MAX_SPLITS], gather };
        for s in ctx.spares.iter_mut().take(splits) {
            match self.pool.alloc(g) {
                Ok(p) => *s = Some(p),
                Err(e) => {
                    self.return_spares(g, &mut ctx.spares);
                    return Err(e);
                }
            }
        }
        let r = self.clear(&mut ctx, self.root_view(), self.top(), start, end);
        self.return_spares(g, &mut ctx.spares);
        ctx.gather.add_range(range);
        r
    }

    /// The last-level table holding `a`'s leaf; `None` if a block maps `a` (the general path
    /// splits it). Errors: [`Error::NotMapped`] at `a` if an upper entry is empty.
    fn last_level_table(&self, a: u64) -> Result<Option<TablePage>> {
        let mut t = self.root_view();
        for height in (1..self.levels).rev() {
            let cur = entry(&t, index(a, height))?.load(Ordering::Acquire);
            if !F::is_present(cur) {
                return Err(Error::NotMapped { addr: a });
            }
            if F::is_leaf(cur, height) {
                return Ok(None);
            }
            t = self.table_at(F::output(cur, height))?;
        }
        Ok(Some(t))
    }

    /// Unmaps `[a, end)`, all inside the last-level table `t`: checks every page is mapped,
    /// then clears them.
    fn unmap_pages(&self, t: &TablePage, a: u64, end: u64, gather: &mut Gather) -> Result<()> {
        let (first, last) = leaf_span(a, end)?;
        self.check_pages(t, a, end)?;
        for i in first..last {
            // Relaxed: only the owner of the range writes these entries; the invalidation the
            // caller issues for the gathered range orders the hardware's view.
            entry(t, i)?.store(0, Ordering::Relaxed);
        }
        self.clean(t, first, last - first);
        gather.add_range(AddrRange::new(Iova::new(a), Iova::new(end))?);
        Ok(())
    }

    /// Checks every 4 KiB leaf of `[a, end)` in the last-level table `t` is present.
    fn check_pages(&self, t: &TablePage, a: u64, end: u64) -> Result<()> {
        let (first, last) = leaf_span(a, end)?;
        for i in first..last {
            if !F::is_present(entry(t, i)?.load(Ordering::Relaxed)) {
                return Err(Error::NotMapped { addr: a + (i - first) as u64 * PAGE_SIZE });
            }
        }
        Ok(())
    }

    fn return_spares(&self, g: &CpuGuard<'_, P>, spares: &mut [Option<TablePage>; MAX_SPLITS]) {
        for p in spares.iter_mut().filter_map(Option::take) {
            // Never published; the split that took it filled and published it instead.
            self.pool.free_zeroed(g, p);
        }
    }

    /// Checks every page of `[a, end)` is mapped; counts the splits unmapping it needs.
    fn check_mapped(
        &self,
        t: TablePage,
        height: u32,
        mut a: u64,
        end: u64,
        splits: &mut usize,
    ) -> Result<()> {
        if height == 0 {
            return self.check_pages(&t, a, end);
        }
        let span = height_span(height);
        while a < end {
            let i = index(a, height);
            let e = chunk_end(a, end, height);
            let cur = entry(&t, i)?.load(Ordering::Acquire);
            if !F::is_present(cur) {
                return Err(Error::NotMapped { addr: a });
            }
            if F::is_leaf(cur, height) {
                if a % span != 0 || e - a != span {
                    *splits += split_cost(height, a, e);
                }
            } else {
                self.check_mapped(self.table_at(F::output(cur, height))?, height - 1, a, e, splits)?;
            }
            a = e;
        }
        if *splits > MAX_SPLITS {
            return Err(Error::BadState { what: "unmap would need more splits than two range ends can" });
        }
        Ok(())
    }

    /// Clears `[a, end)` (checked mapped) in table `t` at `height`.
    fn clear(&self, ctx: &mut UnmapCtx<'_>, t: TablePage, height: u32, mut a: u64, end: u64) -> Result<()> {
        let span = height_span(height);
        let (first, mut last) = (index(a, height), index(a, height));
        while a < end {
            let i = index(a, height);
            last = i;
            let e = chunk_end(a, end, height);
            let slot = entry(&t, i)?;
            let cur = slot.load(Ordering::Acquire);
            let whole = a % span == 0 && e - a == span;
            if !F::is_present(cur) {
                return Err(Error::NotMapped { addr: a });
            }
            if F::is_leaf(cur, height) {
                if whole {
                    slot.store(0, Ordering::Relaxed);
                } else {
                    let child = self.split(ctx, slot, cur, height)?;
                    self.clear(ctx, child, height - 1, a, e)?;
                }
            } else {
                let child = self.table_at(F::output(cur, height))?;
                if whole && self.detach(ctx, slot, &child, height - 1)? {
                    // Detached: the subtree is in the gather, cleared with the entry.
                } else {
                    self.clear(ctx, child, height - 1, a, e)?;
                }
            }
            a = e;
        }
        // One clean for the run of entries this table had written.
        self.clean(&t, first, last + 1 - first);
        Ok(())
    }

    /// Replaces the block `cur` in `slot` (at `height`) by a table of the next smaller leaves
    /// mapping the same memory; returns the new table.
    fn split(&self, ctx: &mut UnmapCtx<'_>, slot: &AtomicU64, cur: u64, height: u32) -> Result<TablePage> {
        let page = ctx
            .spares
            .iter_mut()
            .find_map(Option::take)
            .ok_or(Error::BadState { what: "split without a reserved page" })?;
        let child0 = F::split_block(cur, height);
        let step = height_span(height - 1);
        for k in 0..ENTRIES {
            entry(&page, k)?.store(child0 + k as u64 * step, Ordering::Relaxed);
        }
        self.clean(&page, 0, ENTRIES);
        // Release: the new table's entries happen-before any walk that finds it. The block and
        // the table translate the unmapped part identically until it is cleared, and the
        // caller's flush covers it, so a stale block in the IOTLB is harmless.
        slot.store(F::make_table(page.pa()), Ordering::Release);
        Ok(page)
    }

    /// Detaches the table `child` (at `height`) below `slot` into the gather, if the gather
    /// has room for its whole subtree; false (nothing changed) if not.
    fn detach(
        &self,
        ctx: &mut UnmapCtx<'_>,
        slot: &AtomicU64,
        child: &TablePage,
        height: u32,
    ) -> Result<bool> {
        let n = self.count_tables(child, height)?;
        let bytes = (n * core::mem::size_of::<TablePage>()) as u64;
        if self.pool.fault_point(bytes).and_then(|()| ctx.gather.reserve(n)).is_err() {
            // No room to hold the pages until the flush: keep the tables installed (the caller
            // clears their leaves instead); they stay reachable, nothing leaks.
            return Ok(false);
        }
        // LeafCache rule 2: every CPU's cached last-level tables go stale before any table
        // of the subtree leaves the tree (and long before it is freed, after the flush).
        self.detach_epoch.fetch_add(1, Ordering::AcqRel);
        // The hardware may still walk the detached subtree through its caches until the flush;
        // the subtree's pages are not reused before it (they go to the gather untouched).
        slot.store(0, Ordering::Relaxed);
        // The gather takes its own handle; the caller's view is not used again.
        self.collect(ctx.gather, self.table_at(child.pa())?, height)?;
        Ok(true)
    }

    fn count_tables(&self, t: &TablePage, height: u32) -> Result<usize> {
        let mut n = 1;
        if height > 0 {
            for i in 0..ENTRIES {
                let cur = entry(t, i)?.load(Ordering::Acquire);
                if F::is_present(cur) && !F::is_leaf(cur, height) {
                    n += self.count_tables(&self.table_at(F::output(cur, height))?, height - 1)?;
                }
            }
        }
        Ok(n)
    }

    fn collect(&self, gather: &mut Gather, t: TablePage, height: u32) -> Result<()> {
        if height > 0 {
            for i in 0..ENTRIES {
                let cur = entry(&t, i)?.load(Ordering::Acquire);
                if F::is_present(cur) && !F::is_leaf(cur, height) {
                    self.collect(gather, self.table_at(F::output(cur, height))?, height - 1)?;
                }
            }
        }
        gather.push_reserved(t);
        Ok(())
    }

    // ---- lookup ------------------------------------------------------------------------

    /// The physical address `iova` translates to, or `None` if it is not mapped.
    pub fn iova_to_phys(&self, iova: Iova) -> Option<PhysAddr> {
        let a = iova.raw();
        if a >= self.input_limit() {
            return None;
        }
        let mut t = self.root_view();
        let mut height = self.top();
        loop {
            let cur = t.entry(index(a, height))?.load(Ordering::Acquire);
            if !F::is_present(cur) {
                return None;
            }
            if F::is_leaf(cur, height) {
                let off = a & (height_span(height) - 1);
                return F::output(cur, height).checked_add(off);
            }
            t = self.table_at(F::output(cur, height)).ok()?;
            height -= 1;
        }
    }

    /// The leaf translating `iova`: its entry value and height, or `None`.
    pub fn leaf_of(&self, iova: Iova) -> Option<(u64, u32)> {
        let a = iova.raw();
        if a >= self.input_limit() {
            return None;
        }
        let (mut t, mut height) = (self.root_view(), self.top());
        loop {
            let cur = t.entry(index(a, height))?.load(Ordering::Acquire);
            if !F::is_present(cur) {
                return None;
            }
            if F::is_leaf(cur, height) {
                return Some((cur, height));
            }
            t = self.table_at(F::output(cur, height)).ok()?;
            height -= 1;
        }
    }

    /// Table pages reachable from the root, the root included.
    pub fn table_pages(&self) -> usize {
        self.count_tables(&self.root, self.top()).unwrap_or(0)
    }

    fn free_tree(&self, g: &CpuGuard<'_, P>, t: TablePage, height: u32) {
        if height > 0 {
            for i in 0..ENTRIES {
                let Some(e) = t.entry(i) else { continue };
                let cur = e.load(Ordering::Acquire);
                if F::is_present(cur) && !F::is_leaf(cur, height) {
                    if let Ok(child) = self.table_at(F::output(cur, height)) {
                        self.free_tree(g, child, height - 1);
                    }
                }
            }
        }
        self.pool.free_dirty(g, t);
    }
}

/// Pages splitting the block at `height` needs to unmap `[a, e)` from it (partly covered).
fn split_cost(height: u32, a: u64, e: u64) -> usize {
    if height == 0 {
        return 0;
    }
    let h = height - 1;
    if h == 0 {
        return 1;
    }
    let sub = height_span(h);
    let partial = |s: u64| a.max(s) != s || e.min(s + sub) != s + sub;
    let first = a & !(sub - 1);
    let last = (e - 1) & !(sub - 1);
    let mut n = 1;
    if partial(first) {
        n += split_cost(h, a, e.min(first + sub));
    }
    if last != first && partial(last) {
        n += split_cost(h, a.max(last), e);
    }
    n
}

impl<P: Platform, F: PteFormat> Drop for PageTable<'_, P, F> {
    /// Frees every table page. Dropping a page table asserts that no walker can reach it any
    /// more: its owner (the domain) detached it from every device and invalidated the
    /// domain's IOTLB and walk caches first.
    fn drop(&mut self) {
        let g = self.platform().pin_cpu();
        self.free_tree(&g, self.root_view(), self.top());
    }
}
