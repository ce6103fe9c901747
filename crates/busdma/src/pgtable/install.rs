//! The lock-free installation of a table level, over an abstract entry word.
//!
//! The walker calls [`table_or_install`] on real [`TablePage`](crate::TablePage) entries; the
//! loom model (`tests/loom_pgtable_install.rs`) calls the same function on loom atomics in a
//! small arena, so the model checks the code that runs.
//!
//! # Ordering
//!
//! - A new table is zeroed (and, for a non-coherent walker, cleaned) *before* the
//!   compare-and-swap that publishes it; the CAS is `Release`, so a thread that reads the entry
//!   with `Acquire` and finds the table sees it zeroed, never a previous owner's entries.
//! - The walk's load of the entry is `Acquire` for the same reason: the loser of a race, or a
//!   later caller, writes into a table another CPU installed.
//! - The loser's page was never reachable (its CAS failed), so it goes straight back to the
//!   pool: no walker, software or hardware, can have seen it.
#![forbid(unsafe_code)]

use core::sync::atomic::Ordering;

use super::PteFormat;
use crate::addr::PhysAddr;
use crate::error::Result;

/// One entry word of a page table, as the install step sees it.
pub trait PteSlot {
    /// Atomic load.
    fn load(&self, order: Ordering) -> u64;
    /// Atomic compare-and-swap; `Err` carries the value found.
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> core::result::Result<u64, u64>;
}

impl PteSlot for core::sync::atomic::AtomicU64 {
    #[inline]
    fn load(&self, order: Ordering) -> u64 {
        core::sync::atomic::AtomicU64::load(self, order)
    }
    #[inline]
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> core::result::Result<u64, u64> {
        core::sync::atomic::AtomicU64::compare_exchange(self, current, new, success, failure)
    }
}

#[cfg(loom)]
impl PteSlot for loom::sync::atomic::AtomicU64 {
    fn load(&self, order: Ordering) -> u64 {
        loom::sync::atomic::AtomicU64::load(self, order)
    }
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> core::result::Result<u64, u64> {
        loom::sync::atomic::AtomicU64::compare_exchange(self, current, new, success, failure)
    }
}

/// Where new table pages come from, for [`table_or_install`].
pub trait TableSource {
    /// A page handle.
    type Page;
    /// A zeroed page, ready to publish (for a non-coherent walker: cleaned to memory), and
    /// its physical address.
    fn alloc_table(&mut self) -> Result<(PhysAddr, Self::Page)>;
    /// Called after the page was published in `slot`'s table (e.g. to clean the entry).
    fn published(&mut self, page: Self::Page);
    /// Takes back a page that lost the race: it was never reachable.
    fn discard(&mut self, page: Self::Page);
}

/// What a present entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// A next-level table at this physical address.
    Table(PhysAddr),
    /// A leaf (page or block): the entry's value.
    Leaf(u64),
}

/// Classifies a present entry at `height`.
#[inline]
pub fn classify<F: PteFormat>(pte: u64, height: u32) -> Next {
    if F::is_leaf(pte, height) { Next::Leaf(pte) } else { Next::Table(F::output(pte, height)) }
}

/// The table below the entry `slot` (at `height` ≥ 1), installing a new one if the entry is
/// empty; or the leaf found there.
///
/// Lock-free: two callers racing on one empty entry both allocate; one CAS wins; the loser
/// discards its page and returns the winner's table.
///
/// Errors: the source's allocation error; nothing is changed then.
#[inline]
pub fn table_or_install<F, S, A>(slot: &S, height: u32, source: &mut A) -> Result<Next>
where
    F: PteFormat,
    S: PteSlot + ?Sized,
    A: TableSource,
{
    debug_assert!(height >= 1);
    // Acquire: pairs with the Release CAS below of whoever installed this table, so its zeroed
    // contents are visible before we write into it.
    let cur = slot.load(Ordering::Acquire);
    if F::is_present(cur) {
        return Ok(classify::<F>(cur, height));
    }
    let (pa, page) = source.alloc_table()?;
    // Release: the page's zeroing (and cache clean) happens-before any walk that finds it.
    match slot.compare_exchange(cur, F::make_table(pa), Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            source.published(page);
            Ok(Next::Table(pa))
        }
        Err(won) => {
            // Lost: our page was never reachable; the winner's table (or, for a caller
            // overlapping another's range, its leaf) is what the entry holds now.
            source.discard(page);
            Ok(classify::<F>(won, height))
        }
    }
}
