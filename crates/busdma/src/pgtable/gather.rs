//! What an unmap leaves to invalidate, and the proof that frees it.
//!
//! # Theory
//!
//! 1. An unmap clears entries, but the IOMMU may still hold the old translations in its IOTLB
//!    and the old table pointers in its walk caches. Until an invalidation covering the
//!    cleared range has *completed*, the IOVAs must not be reused and the detached table pages
//!    must not be written (a walk through a cached pointer would read whatever we put there).
//! 2. A [`Gather`] accumulates, over one or more unmaps, the hull of the IOVA ranges cleared
//!    and the table pages detached. The invalidation code issues one ranged invalidation
//!    for [`Gather::range`] (a non-leaf one if [`Gather::freed_tables`] is non-zero, since walk
//!    caches must drop the detached tables too), waits for it, and then makes a
//!    [`FlushDone`]: the only way to release the pages, through [`Gather::release_after_flush`].
//! 3. [`FlushDone`] can only be made by `unsafe` code that promises the invalidation
//!    completed; it is consumed by the release, so one flush frees what it covered, once.
#![deny(unsafe_code)]

use alloc::vec::Vec;

use super::TablePool;
use crate::addr::{AddrRange, Iova};
use crate::error::{Error, Result};
use crate::platform::{CpuGuard, Platform, TablePage};

/// IOVA ranges an unmap cleared and table pages it detached, waiting for an invalidation.
///
/// # Invariants
///
/// Every page in `freed` was detached from a page table by an unmap whose cleared range is
/// inside `range`; no software walker will visit it again.
#[derive(Debug, Default)]
pub struct Gather {
    range: Option<AddrRange<Iova>>,
    freed: Vec<TablePage>,
}

/// Proof that an IOTLB (and walk-cache) invalidation covering some IOVA range has completed.
///
/// Made by the invalidation code after it waited for completion; consumed by
/// [`Gather::release_after_flush`]. Not `Clone`: one flush, one release.
#[derive(Debug)]
pub struct FlushDone {
    /// `None`: the whole address space (a domain-wide invalidation).
    covers: Option<AddrRange<Iova>>,
}

impl FlushDone {
    /// Proof for an invalidation of `range` (leaf and walk caches).
    ///
    /// # Safety
    ///
    /// An invalidation of every IOTLB and paging-structure cache entry the IOMMU may hold for
    /// `range` in this page table's domain has been issued *and has completed*.
    #[allow(unsafe_code)] // an unsafe constructor: a promise, no unsafe operation
    pub unsafe fn for_range(range: AddrRange<Iova>) -> Self {
        Self { covers: Some(range) }
    }

    /// Proof for an invalidation of the whole domain.
    ///
    /// # Safety
    ///
    /// A domain-wide invalidation (IOTLB and paging-structure caches) has completed.
    #[allow(unsafe_code)] // an unsafe constructor: a promise, no unsafe operation
    pub unsafe fn for_all() -> Self {
        Self { covers: None }
    }

    /// True if this flush covers `range`.
    pub fn covers(&self, range: &AddrRange<Iova>) -> bool {
        self.covers.is_none_or(|c| c.contains_range(range))
    }
}

impl Gather {
    /// An empty gather.
    pub const fn new() -> Self {
        Self { range: None, freed: Vec::new() }
    }

    /// The hull of every range cleared since the last release, if any.
    pub fn range(&self) -> Option<AddrRange<Iova>> {
        self.range
    }

    /// Table pages waiting for the flush.
    pub fn freed_tables(&self) -> usize {
        self.freed.len()
    }

    /// Physical addresses of the table pages waiting for the flush (for audits: a checking
    /// IOMMU model verifies none of them can still be reached through its caches).
    pub fn freed_pages(&self) -> impl Iterator<Item = crate::addr::PhysAddr> + '_ {
        self.freed.iter().map(|p| p.pa())
    }

    /// True if nothing waits for a flush.
    pub fn is_empty(&self) -> bool {
        self.range.is_none() && self.freed.is_empty()
    }

    /// Moves everything `other` waits for into `self` (e.g. to flush several unmaps with one
    /// invalidation); the range becomes the hull of both.
    ///
    /// Errors: [`Error::NoMemory`] if `self` cannot grow; nothing moves then.
    pub fn append(&mut self, other: &mut Gather) -> Result<()> {
        self.reserve(other.freed.len())?;
        self.freed.append(&mut other.freed);
        if let Some(r) = other.range.take() {
            self.add_range(r);
        }
        Ok(())
    }

    pub(crate) fn add_range(&mut self, r: AddrRange<Iova>) {
        self.range = Some(match self.range {
            None => r,
            Some(old) => {
                let start = old.start().min(r.start());
                let end = old.end().max(r.end());
                // start < end: both ranges are non-empty.
                AddrRange::new(start, end).unwrap_or(old)
            }
        });
    }

    /// Room for `n` more pages, or an error (then the caller keeps the tables installed).
    pub(crate) fn reserve(&mut self, n: usize) -> Result<()> {
        self.freed
            .try_reserve(n)
            .map_err(|_| Error::NoMemory { requested: (n * core::mem::size_of::<TablePage>()) as u64 })
    }

    /// Adds a detached page; room was reserved.
    pub(crate) fn push_reserved(&mut self, page: TablePage) {
        debug_assert!(self.freed.len() < self.freed.capacity());
        // INVARIANT: the caller detached `page` while clearing a range it added.
        self.freed.push(page);
    }

    /// Gives the detached pages back to `pool` (zeroed) and forgets the range, now that an
    /// invalidation covering it has completed. Returns the number of pages released.
    ///
    /// Errors: [`Error::BadState`] if `proof` does not cover [`Gather::range`]; nothing is
    /// released then and the gather keeps its contents.
    pub fn release_after_flush<P: Platform>(
        &mut self,
        proof: FlushDone,
        pool: &TablePool<'_, P>,
        g: &CpuGuard<'_, P>,
    ) -> Result<usize> {
        if let Some(r) = self.range {
            if !proof.covers(&r) {
                return Err(Error::BadState { what: "flush does not cover the gathered range" });
            }
        }
        let n = self.freed.len();
        for page in self.freed.drain(..) {
            // The proof says no walker, software or hardware, can reach the page any more.
            pool.free_dirty(g, page);
        }
        self.range = None;
        Ok(n)
    }
}

impl Drop for Gather {
    fn drop(&mut self) {
        // Pages dropped here are leaked, never reused: freeing them would need the flush proof.
        debug_assert!(
            self.freed.is_empty(),
            "Gather dropped holding {} table pages; release them",
            self.freed.len()
        );
    }
}
