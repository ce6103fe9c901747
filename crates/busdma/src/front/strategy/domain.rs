//! `IommuOps` for `busdma::iommu::Domain`: the IOMMU strategies over a real domain.
//!
//! # Theory
//!
//! 1. A thin adapter: each `IommuOps` call is the domain's own (`alloc_iova`, `map`, `unmap`,
//!    `ensure_flushed`), with the direction and memory type turned into the entry's
//!    attributes ([`Prot`]) and the inclusive limit into
//!    the allocator's exclusive one. IOVA that was allocated but never mapped (a load that
//!    failed before mapping) goes straight back to the domain's IOVA source.
//! 2. Table levels of a reserved window are installed over the domain's own page table
//!    ([`super::reserve_levels`]).
//! 3. Coherence indexes (seed 003) go to the domain's IOMMU driver
//!    ([`Domain::set_coherence_index`]).
#![allow(unsafe_code)] // three blocks: the domain's map and unmap and reserve_levels are unsafe fns

use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::error::Result;
use crate::iommu::{CoherenceIndex, Domain, FlushTicket, InvalidationPolicy, IotlbInvalidator, PinnedRun};
use crate::iova::{IovaRequest, IovaSource};
use crate::pgtable::{LeafWindow, Prot, PteFormat};
use crate::platform::{CpuGuard, Platform};

use super::Invalidation;
use super::iommu::IommuOps;
use super::reserve_levels::reserve_levels;

// SAFETY: `alloc_iova` is the domain's allocator (exclusive, aligned, below the limit); map,
// unmap and the waits are the domain's own, which do what `IommuOps` says.
unsafe impl<P, F, S, H> IommuOps<P> for &Domain<'_, P, F, S, H>
where
    P: Platform,
    F: PteFormat,
    S: IovaSource,
    H: IotlbInvalidator,
{
    type Ticket = FlushTicket;

    #[inline]
    fn invalidation(&self) -> Invalidation {
        match self.policy() {
            InvalidationPolicy::Strict => Invalidation::Strict,
            InvalidationPolicy::Deferred { .. } => Invalidation::Deferred,
        }
    }

    #[inline]
    fn max_iova(&self) -> u64 {
        self.table().input_limit() - 1
    }

    #[inline]
    fn alloc_iova(&self, g: &CpuGuard<'_, P>, size: u64, align: u64, limit: u64) -> Result<AddrRange<Iova>> {
        let req = IovaRequest { size, align, boundary: 0, limit: Iova::new(limit.saturating_add(1)) };
        Domain::alloc_iova(self, g, &req)
    }

    #[inline]
    unsafe fn free_iova(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) {
        // Never mapped (or flushed): straight back to the allocator. An error here would be a
        // front-end bug (a range freed twice); the allocator refuses it and keeps its state.
        let _ = self.iova().free(g, range);
    }

    #[inline]
    unsafe fn map(&self, g: &CpuGuard<'_, P>, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<()> {
        // SAFETY: `IommuOps::map`'s contract is `Domain::map`'s: the caller holds the IOVA
        // range and may give the device the PA range.
        unsafe { Domain::map(self, g, iova, pa, len, prot) }
    }

    #[inline]
    unsafe fn unmap(
        &self,
        g: &CpuGuard<'_, P>,
        mapped: &[AddrRange<Iova>],
        free: &[AddrRange<Iova>],
    ) -> Result<FlushTicket> {
        // SAFETY: `IommuOps::unmap`'s contract is `Domain::unmap`'s: the caller holds every
        // range.
        unsafe { Domain::unmap(self, g, mapped, free) }
    }

    #[inline]
    fn ensure_flushed(&self, g: &CpuGuard<'_, P>, ticket: FlushTicket) -> Result<()> {
        Domain::ensure_flushed(self, g, ticket)
    }

    fn wait_unmapped(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        Domain::wait_unmapped(self, g)
    }

    #[inline]
    fn is_flushed(&self, ticket: FlushTicket) -> bool {
        // `DONE` (strict, or a deferred unmap already flushed), or a flush that started
        // after the ticket was taken has finished (a failed flush never advances `finished`).
        ticket.generation().is_none() || self.generations().is_some_and(|g| g.is_flushed(ticket))
    }

    unsafe fn reserve_tables(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<()> {
        // SAFETY: `IommuOps::reserve_tables`'s contract: the caller holds the window.
        unsafe { reserve_levels(self.table(), g, range) }
    }

    unsafe fn pin_window(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<Option<LeafWindow>> {
        // SAFETY: `IommuOps::pin_window`'s contract is `Domain::pin_window`'s.
        unsafe { Domain::pin_window(self, g, range) }.map(Some)
    }

    #[inline]
    unsafe fn map_pinned(&self, g: &CpuGuard<'_, P>, lw: &LeafWindow, runs: &[PinnedRun]) -> Result<()> {
        // SAFETY: `IommuOps::map_pinned`'s contract is `Domain::map_pinned`'s.
        unsafe { Domain::map_pinned(self, g, lw, runs) }
    }

    #[inline]
    unsafe fn unmap_pinned(
        &self,
        g: &CpuGuard<'_, P>,
        lw: &LeafWindow,
        runs: &[PinnedRun],
    ) -> Result<FlushTicket> {
        // SAFETY: `IommuOps::unmap_pinned`'s contract is `Domain::unmap_pinned`'s.
        unsafe { Domain::unmap_pinned(self, g, lw, runs) }
    }

    #[inline]
    fn set_coherence_index(&self, range: AddrRange<Iova>, index: CoherenceIndex) {
        Domain::set_coherence_index(self, range, index)
    }
}
