//! `IommuOps` for `busdma::virtio_iommu::ViommuDomain`: the IOMMU strategies (`IommuPerMap` &
//! co.) over a virtio-iommu domain, so tags, maps and loads work unchanged behind it.
//!
//! # Theory
//!
//! 1. **A domain without a table.** Each `IommuOps` call becomes the domain's requests: `map`
//!    one MAP, `unmap` the UNMAPs of the load's ranges (strict: one batch, complete on
//!    return; deferred: queued in the domain's batch, whose number is the ticket),
//!    `ensure_flushed` / `wait_unmapped` a flush of the queued batch. There are no table
//!    levels to reserve, so `reserve_tables` does nothing.
//! 2. **Granule.** The strategies lay loads out in 4 KiB pages; a device whose smallest page
//!    is larger cannot take such maps, so allocation and mapping refuse with
//!    [`Error::Unsupported`] unless the domain's granule is [`PAGE_SIZE`].
//! 3. **Memory type.** MMIO mappings would need the MMIO feature, which the driver does not
//!    negotiate: a device-memory run is refused with [`Error::Unsupported`].
//! 4. **Coherence index**: virtio-iommu has none; the default (ignore) applies.
#![allow(unsafe_code)] // the trait impl and the domain's map are unsafe

use crate::addr::{AddrRange, Iova, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::iommu::InvalidationPolicy;
use crate::pgtable::{MemType, Prot};
use crate::platform::{CpuGuard, Platform};
use crate::virtio_iommu::{ViommuDomain, ViommuTicket};

use super::Invalidation;
use super::iommu::IommuOps;

impl<P: Platform> ViommuDomain<'_, '_, P> {
    fn page_granule(&self) -> Result<()> {
        if self.granule() == PAGE_SIZE {
            Ok(())
        } else {
            Err(Error::Unsupported { what: "virtio-iommu granule larger than the strategies' 4 KiB page" })
        }
    }
}

// SAFETY: `alloc_iova` is the domain's own allocator (exclusive ranges of the size and
// alignment asked, below the limit, in the space the device translates for the attached
// endpoint); `unmap` returns only once its UNMAPs completed (strict) or queues them with the
// IOVA held until a flush completed them; `ensure_flushed`, `wait_unmapped` and `is_flushed`
// answer from completed flushes only.
unsafe impl<P: Platform> IommuOps<P> for &ViommuDomain<'_, '_, P> {
    type Ticket = ViommuTicket;

    fn invalidation(&self) -> Invalidation {
        match self.policy() {
            InvalidationPolicy::Strict => Invalidation::Strict,
            InvalidationPolicy::Deferred { .. } => Invalidation::Deferred,
        }
    }

    fn max_iova(&self) -> u64 {
        self.space().end().raw() - 1
    }

    fn alloc_iova(&self, g: &CpuGuard<'_, P>, size: u64, align: u64, limit: u64) -> Result<AddrRange<Iova>> {
        self.page_granule()?;
        ViommuDomain::alloc(self, g, size, align, Iova::new(limit.saturating_add(1)))
    }

    unsafe fn free_iova(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) {
        // Never mapped (or flushed): straight back. An error would be a front-end bug (a
        // range freed twice); the allocator refuses it and keeps its state.
        let _ = self.free_range(g, range);
    }

    unsafe fn map(&self, _g: &CpuGuard<'_, P>, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<()> {
        self.page_granule()?;
        if prot.mem != MemType::Normal {
            return Err(Error::Unsupported {
                what: "virtio-iommu mapping of device memory (MMIO not negotiated)",
            });
        }
        // SAFETY: `IommuOps::map`'s contract is `map_range`'s: the caller holds the IOVA and
        // may give the device the memory until the unmap completed.
        unsafe { self.map_range(iova, pa, len, prot) }
    }

    unsafe fn unmap(
        &self,
        g: &CpuGuard<'_, P>,
        mapped: &[AddrRange<Iova>],
        free: &[AddrRange<Iova>],
    ) -> Result<ViommuTicket> {
        self.unmap_ranges(g, mapped, free)
    }

    fn ensure_flushed(&self, g: &CpuGuard<'_, P>, ticket: ViommuTicket) -> Result<()> {
        ViommuDomain::ensure_flushed(self, g, ticket)
    }

    fn wait_unmapped(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        self.flush(g)
    }

    fn is_flushed(&self, ticket: ViommuTicket) -> bool {
        ViommuDomain::is_flushed(self, ticket)
    }

    unsafe fn reserve_tables(&self, _g: &CpuGuard<'_, P>, _range: AddrRange<Iova>) -> Result<()> {
        // No tables: a MAP into a reserved window allocates nothing the driver could lack.
        Ok(())
    }
}
