//! Pinned leaf windows: the last-level tables under an IOVA window, found once and written
//! directly (for `iommu-reserved`'s per-packet path).
//!
//! # Theory
//!
//! 1. **What it is.** [`PageTable::pin_leaves`] installs every table level over a window (as
//!    a map would, with the same lock-free install) and keeps a view of each last-level
//!    table the window touches: a [`LeafWindow`]. Writing or clearing a page of the window
//!    is then an index into one of those tables: no descent from the root, no leaf cache, no
//!    compare-and-swap.
//! 2. **Why the tables stay.** A table is detached only by an unmap whose range covers the
//!    table's whole span (module rule 4 of [`crate::pgtable`]). While the window is the
//!    caller's, no other caller owns an address of a span it touches, and the window's own
//!    pages are written and cleared only through the [`LeafWindow`] (the `# Safety` of every
//!    method here), which never detaches anything. So every table the window holds stays
//!    installed, hence allocated, for as long as the window is the caller's; once given up,
//!    the tables are ordinary empty tables of the page table (rule 4: freed by a later
//!    covering unmap after its invalidation, or with the table). A forgotten window leaks
//!    nothing and frees nothing.
//! 3. **Same checks as map and unmap.** [`PageTable::write_pinned`] checks alignment, the
//!    window's bounds, the output width and the rights before it writes, fails on an entry in
//!    use ([`Error::AlreadyMapped`], clearing what it wrote); [`PageTable::clear_pinned`]
//!    checks every page is mapped before it clears ([`Error::NotMapped`], no effect). A
//!    non-coherent walker gets every written entry cleaned, one call per table.
//! 4. **Blocks.** A pinned window maps 4 KiB leaves only: a block would replace a table the
//!    window holds.
#![allow(unsafe_code)] // views of table pages the window keeps installed (theory 2)

use alloc::vec::Vec;
use core::marker::PhantomData;
use core::sync::atomic::Ordering;

use super::{MapCtx, PageTable, check_aligned};
use crate::addr::{AddrRange, Iova, PAGE_SHIFT, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::pgtable::format::{ENTRIES, height_shift, height_span};
use crate::pgtable::{Prot, PteFormat};
use crate::platform::{CpuGuard, Platform, TablePage};

/// The last-level tables under one IOVA window (theory 1).
///
/// # Invariants
///
/// `tables[k]` is the last-level table of the `k`-th 2 MiB span the window touches, counted
/// from the span of `start`; `first` is the index of the window's first page in `tables[0]`;
/// `start` and `len` are page multiples.
#[derive(Debug)]
pub struct LeafWindow {
    start: u64,
    len: u64,
    first: usize,
    tables: Vec<TablePage>,
}

impl LeafWindow {
    /// The window.
    pub fn range(&self) -> AddrRange<Iova> {
        AddrRange::from_start_len(Iova::new(self.start), self.len)
            .unwrap_or(AddrRange::empty_at(Iova::new(0)))
    }

    /// The window's first IOVA.
    #[inline]
    pub fn start(&self) -> Iova {
        Iova::new(self.start)
    }

    /// The last-level tables held (one per 2 MiB span touched).
    pub fn tables(&self) -> usize {
        self.tables.len()
    }

    /// Calls `f` with each table chunk of pages `[first, first + n)` (checked in the window
    /// by the caller): the table and the entry indices `[i, j)` in it.
    #[inline]
    fn chunks(
        &self,
        first: u64,
        n: u64,
        mut f: impl FnMut(&TablePage, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut abs = self.first + first as usize;
        let end = abs + n as usize;
        while abs < end {
            let (k, i) = (abs / ENTRIES, abs % ENTRIES);
            let j = ENTRIES.min(i + (end - abs));
            let t = self
                .tables
                .get(k)
                .ok_or(Error::OutOfRange { addr: abs as u64, limit: self.len >> PAGE_SHIFT })?;
            f(t, i, j)?;
            abs += j - i;
        }
        Ok(())
    }

    /// The one table holding all of pages `[first, first + n)` (checked in the window by the
    /// caller) and the entry indices `[i, j)` in it, if they lie in one table (the usual
    /// load: a packet's few pages).
    #[inline]
    fn one_table(&self, first: u64, n: u64) -> Option<(&TablePage, usize, usize)> {
        let abs = self.first + first as usize;
        let (k, i) = (abs / ENTRIES, abs % ENTRIES);
        let j = i + n as usize;
        if j > ENTRIES {
            return None;
        }
        self.tables.get(k).map(|t| (t, i, j))
    }

    /// Checks `[off, off + len)` is a non-empty page-aligned part of the window; returns its
    /// first page and page count.
    #[inline]
    fn pages(&self, off: u64, len: u64) -> Result<(u64, u64)> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        check_aligned(off)?;
        check_aligned(len)?;
        let end = off.checked_add(len).ok_or(Error::Overflow { base: off, len })?;
        if end > self.len {
            return Err(Error::OutOfRange {
                addr: self.start.saturating_add(off),
                limit: self.start + self.len,
            });
        }
        Ok((off >> PAGE_SHIFT, len >> PAGE_SHIFT))
    }
}

/// A 4 KiB leaf of format `F` for physical address 0 ([`PageTable::leaf_template`]).
///
/// # Invariants
///
/// `pte` is `F::make_leaf(0, prot, 0)` for a `prot` passed through `F::effective_prot`.
#[derive(Debug)]
pub struct LeafTemplate<F> {
    pte: u64,
    _format: PhantomData<fn() -> F>,
}

impl<F> Clone for LeafTemplate<F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F> Copy for LeafTemplate<F> {}

impl<P: Platform, F: PteFormat> PageTable<'_, P, F> {
    /// Installs every table level over `window` and returns its last-level tables
    /// (theory 1).
    ///
    /// Errors: [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::ZeroSize`];
    /// [`Error::AlreadyMapped`] if a block maps part of the window; [`Error::NoMemory`]
    /// (tables installed before the failure stay, empty: module rule 6).
    ///
    /// # Safety
    ///
    /// `window` is the caller's (as for [`PageTable::map`]), and from now until it gives the
    /// window up, the caller maps and unmaps inside it only through the returned
    /// [`LeafWindow`] with [`PageTable::write_pinned`] and [`PageTable::clear_pinned`] (never
    /// [`PageTable::unmap`], which could detach a table the window holds).
    pub unsafe fn pin_leaves(&self, g: &CpuGuard<'_, P>, window: AddrRange<Iova>) -> Result<LeafWindow> {
        let (start, end) = (window.start().raw(), window.end().raw());
        check_aligned(start)?;
        check_aligned(end)?;
        if start == end {
            return Err(Error::ZeroSize);
        }
        self.check_input(start, end - start)?;
        let span = height_span(1);
        let n = (((end - 1) >> height_shift(1)) - (start >> height_shift(1)) + 1) as usize;
        let mut tables = Vec::new();
        tables.try_reserve_exact(n).map_err(|_| Error::NoMemory { requested: (n * 16) as u64 })?;
        let mut ctx = MapCtx {
            pool: self.pool,
            g,
            prot: Prot::READ,
            coherent: self.coherent,
            installed: false,
            done: start,
        };
        let mut a = start & !(span - 1);
        while a < end {
            // Installs missing levels (lock-free, module rule 3); a block is `AlreadyMapped`.
            tables.push(self.last_level_table_or_install(&mut ctx, a)?);
            a += span;
        }
        // INVARIANT: one table per span from `start`'s, in order.
        Ok(LeafWindow { start, len: end - start, first: ((start >> PAGE_SHIFT) as usize) % ENTRIES, tables })
    }

    /// The 4 KiB leaf template for `prot` (theory 3): what [`PageTable::write_pinned`]
    /// writes, built once per attribute set instead of once per run.
    ///
    /// Errors: [`Error::InvalidArgument`] (rights the format cannot express).
    pub fn leaf_template(&self, prot: Prot) -> Result<LeafTemplate<F>> {
        let prot = F::effective_prot(prot)?;
        // INVARIANT: the format's leaf for address 0 with the effective attributes.
        Ok(LeafTemplate { pte: F::make_leaf(PhysAddr::new(0), prot, 0), _format: PhantomData })
    }

    /// Maps the window's bytes `[off, off + len)` to `[pa, pa + len)` with the attributes of
    /// `leaf`, writing
    /// 4 KiB leaves straight into the window's tables (theory 3).
    ///
    /// Errors (nothing of the call left written): [`Error::ZeroSize`], [`Error::Misaligned`],
    /// [`Error::Overflow`], [`Error::OutOfRange`] (beyond the window or the output width),
    /// [`Error::AlreadyMapped`].
    ///
    /// # Safety
    ///
    /// `lw` came from [`PageTable::pin_leaves`] of this table and its window is still the
    /// caller's (that method's contract); `[pa, pa + len)` may be given to the device as for
    /// [`PageTable::map`].
    #[inline]
    pub unsafe fn write_pinned(
        &self,
        lw: &LeafWindow,
        off: u64,
        pa: PhysAddr,
        len: u64,
        leaf: &LeafTemplate<F>,
    ) -> Result<()> {
        let (first, n) = lw.pages(off, len)?;
        check_aligned(pa.raw())?;
        let pa_end = pa.raw().checked_add(len).ok_or(Error::Overflow { base: pa.raw(), len })?;
        let out_limit = 1u64 << F::OUTPUT_BITS;
        if pa_end > out_limit {
            return Err(Error::OutOfRange { addr: pa.raw().max(out_limit), limit: out_limit });
        }
        // The address field is linear (PteFormat): the leaf for `pa` is the template (built
        // for address 0) plus `pa`, and consecutive leaves differ by the page size.
        let mut pte = leaf.pte + pa.raw();
        let mut done = 0u64;
        let mut write = |t: &TablePage, i: usize, j: usize| {
            for x in i..j {
                let Some(slot) = t.entry(x) else {
                    return Err(Error::OutOfRange { addr: x as u64, limit: ENTRIES as u64 });
                };
                if slot.load(Ordering::Relaxed) != 0 {
                    return Err(Error::AlreadyMapped { addr: lw.start + off + done * PAGE_SIZE });
                }
                // Relaxed: only the window's owner writes these entries, and the device sees
                // the IOVA only after the caller's DMA barrier (as the walker's map).
                slot.store(pte, Ordering::Relaxed);
                pte += PAGE_SIZE;
                done += 1;
            }
            self.clean(t, i, j - i);
            Ok(())
        };
        // One table (the usual run): no chunk loop.
        let r = match lw.one_table(first, n) {
            Some((t, i, j)) => write(t, i, j),
            None => lw.chunks(first, n, write),
        };
        if r.is_err() && done > 0 {
            // Roll back this call's leaves (theory 3).
            let _ = self.store_zero(lw, first, done);
        }
        r
    }

    /// Clears the window's bytes `[off, off + len)`, after checking every page is mapped
    /// (theory 3). The caller invalidates the range before reusing it.
    ///
    /// Errors (nothing changed): [`Error::ZeroSize`], [`Error::Misaligned`],
    /// [`Error::Overflow`], [`Error::OutOfRange`], [`Error::NotMapped`] with the first page
    /// not mapped.
    ///
    /// # Safety
    ///
    /// As for [`PageTable::write_pinned`]: `lw` is this table's and its window the caller's.
    #[inline(always)]
    pub unsafe fn clear_pinned(&self, lw: &LeafWindow, off: u64, len: u64) -> Result<()> {
        let (first, n) = lw.pages(off, len)?;
        if let Some((t, i, j)) = lw.one_table(first, n) {
            // One table (the usual unload): checked whole before the first store, as below,
            // with one look-up instead of two passes.
            Self::check_present(t, i, j, lw.start + off)?;
            self.zero(t, i, j);
            return Ok(());
        }
        let mut p = first;
        lw.chunks(first, n, |t, i, j| {
            Self::check_present(t, i, j, lw.start + p * PAGE_SIZE)?;
            p += (j - i) as u64;
            Ok(())
        })?;
        self.store_zero(lw, first, n)
    }

    /// Checks entries `[i, j)` of `t` are all present; `addr` is the IOVA of entry `i`.
    #[inline]
    fn check_present(t: &TablePage, i: usize, j: usize, addr: u64) -> Result<()> {
        for x in i..j {
            if !t.entry(x).is_some_and(|e| F::is_present(e.load(Ordering::Relaxed))) {
                return Err(Error::NotMapped { addr: addr + (x - i) as u64 * PAGE_SIZE });
            }
        }
        Ok(())
    }

    /// Stores zero into entries `[i, j)` of `t` and cleans them.
    #[inline]
    fn zero(&self, t: &TablePage, i: usize, j: usize) {
        for x in i..j {
            // Relaxed: the owner's invalidation orders the hardware's view (as unmap).
            if let Some(e) = t.entry(x) {
                e.store(0, Ordering::Relaxed);
            }
        }
        self.clean(t, i, j - i);
    }

    /// Stores zero into pages `[first, first + n)` of the window and cleans them.
    #[inline]
    fn store_zero(&self, lw: &LeafWindow, first: u64, n: u64) -> Result<()> {
        lw.chunks(first, n, |t, i, j| {
            self.zero(t, i, j);
            Ok(())
        })
    }
}
