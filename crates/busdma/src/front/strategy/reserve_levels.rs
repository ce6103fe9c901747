//! Reserving table levels over an IOVA window (for `iommu-reserved`).
//!
//! # Theory
//!
//! 1. **What it does.** For every 2 MiB span (every leaf table) an IOVA window touches, it
//!    installs the intermediate tables down to the leaf table, with the page-table layer's own
//!    lock-free step ([`install::table_or_install`]), and writes no leaf. A later map inside the
//!    window then only writes leaf entries: no table allocation, no compare-and-swap on the
//!    per-packet path.
//! 2. **Why they stay.** The page-table layer detaches a table only when an unmap covers the
//!    table's whole span (`pgtable` theory 4). A reserved map's unload unmaps what its load
//!    mapped, which covers a whole leaf table only if a single load maps an entire aligned
//!    2 MiB span: with windows under 2 MiB (every tag whose max size is under 2 MiB minus
//!    its per-segment slack) that never happens; above, such a load pays one table
//!    re-installation, and nothing is wrong.
//! 3. **Non-coherent walkers.** A new table is cleaned to memory before it is published, and
//!    the entry that points to it is cleaned after, exactly as the walker's own map does.
//! 4. **Errors.** [`Error::NoMemory`] from the pool; tables installed before the failure stay
//!    (empty, harmless, reused by later maps: `pgtable` theory 6).
#![allow(unsafe_code)] // one block: viewing a table page found in a present entry

use crate::addr::{AddrRange, Iova, KernVa, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::pgtable::install::{self, Next, TableSource};
use crate::pgtable::{PageTable, PteFormat, height_shift};
use crate::platform::{CpuGuard, Platform, TablePage};

/// Entries per table (512: 4 KiB of 8-byte entries).
const ENTRIES: usize = TablePage::ENTRIES;

struct Source<'a, 'p, P: Platform> {
    pt_pool: &'a crate::pgtable::TablePool<'p, P>,
    g: &'a CpuGuard<'a, P>,
    coherent: bool,
}

impl<P: Platform> TableSource for Source<'_, '_, P> {
    type Page = TablePage;

    fn alloc_table(&mut self) -> Result<(PhysAddr, TablePage)> {
        let page = self.pt_pool.alloc(self.g)?;
        if !self.coherent {
            self.pt_pool.platform().cache_clean(page.kva(), PAGE_SIZE);
        }
        Ok((page.pa(), page))
    }

    fn published(&mut self, _page: TablePage) {}

    fn discard(&mut self, page: TablePage) {
        self.pt_pool.free_zeroed(self.g, page);
    }
}

/// Installs every table level above the leaves over `window` (theory 1).
///
/// # Safety
///
/// `window` is the caller's, as for [`PageTable::map`]: allocated to it from the table's
/// domain and not given back, so no other call unmaps a range covering a table this walk
/// descends through while it runs (`pgtable` theory 4).
pub unsafe fn reserve_levels<P: Platform, F: PteFormat>(
    pt: &PageTable<'_, P, F>,
    g: &CpuGuard<'_, P>,
    window: AddrRange<Iova>,
) -> Result<()> {
    let p = pt.pool().platform();
    let mut src = Source { pt_pool: pt.pool(), g, coherent: pt.coherent_walker() };
    let leaf_span = 1u64 << height_shift(1);
    let mut a = window.start().raw() & !(leaf_span - 1);
    let end = window.end().raw();
    while a < end {
        let mut table = pt.root();
        // Descend from the top level to height 1 (whose entries point to leaf tables).
        for height in (1..pt.levels()).rev() {
            let kva = p.phys_to_kva(table).ok_or(Error::NotDirectMapped { pa: table.raw() })?;
            // SAFETY: `table` is the root or was read from a present table entry of `pt`;
            // table pages are direct-mapped pool pages that stay allocated while reachable,
            // and nobody detaches a table our window lies under while the window is
            // allocated to us (this function's contract; pgtable theory 4: only an unmap
            // covering its span can).
            let t = unsafe { TablePage::new(table, kva) };
            let i = ((a >> height_shift(height)) as usize) & (ENTRIES - 1);
            let slot = t.entry(i).ok_or(Error::OutOfRange { addr: i as u64, limit: ENTRIES as u64 })?;
            match install::table_or_install::<F, _, _>(slot, height, &mut src)? {
                Next::Table(next) => {
                    if !src.coherent {
                        p.cache_clean(KernVa::new(kva.raw() + i as u64 * 8), 8);
                    }
                    table = next;
                }
                // A block already maps this span: nothing below to reserve.
                Next::Leaf(_) => break,
            }
        }
        a = a.checked_add(leaf_span).ok_or(Error::Overflow { base: a, len: leaf_span })?;
    }
    Ok(())
}
