//! One device, one domain: an edu device attached to the VT-d unit with its own domain id and
//! second-level table, and the IOVA bookkeeping the checks need.
//!
//! This is the test kernel's own glue between `busdma::pgtable::PageTable` and
//! `busdma::vtd::Vtd`: map = IOVA + table entries, unmap = clear entries, ranged invalidation
//! through the driver, then release the detached table pages with the flush's proof.

use busdma::pgtable::{FlushDone, Gather, PageTable, PageTableConfig, Prot, TablePool};
use busdma::vtd::{DomainId, SecondLevel, SourceId, Vtd};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform, Result};

use crate::edu::Edu;
use crate::platform::{KernelPlatform, PLATFORM};

/// edu's DMA mask: 28 address bits. IOVAs are handed out below it.
pub const EDU_LIMIT: u64 = 1 << 28;

/// A device in its own domain.
pub struct DevDomain<'v, 'p> {
    /// The device.
    pub dev: &'v Edu,
    /// Its domain id.
    pub did: DomainId,
    vtd: &'v Vtd<'static, KernelPlatform>,
    table: PageTable<'p, KernelPlatform, SecondLevel>,
    /// Next IOVA to hand out, top-down from the DMA mask (never reused: each check takes
    /// fresh IOVAs so no earlier cached translation can help or hide anything).
    next: u64,
}

impl<'v, 'p> DevDomain<'v, 'p> {
    /// Allocates a domain id and a table, and attaches `dev`.
    pub fn attach(
        vtd: &'v Vtd<'static, KernelPlatform>,
        pool: &'p TablePool<'p, KernelPlatform>,
        dev: &'v Edu,
    ) -> Result<Self> {
        let did = vtd.alloc_domain_id()?;
        let cfg = PageTableConfig { input_bits: vtd.levels().input_bits(), coherent_walker: vtd.coherent() };
        let table = match PageTable::new(pool, cfg) {
            Ok(t) => t,
            Err(e) => {
                let _ = vtd.free_domain_id(did);
                return Err(e);
            }
        };
        if let Err(e) = vtd.attach(Self::sid_of(dev), did, table.root(), vtd.levels()) {
            let _ = vtd.free_domain_id(did);
            return Err(e);
        }
        Ok(Self { dev, did, vtd, table, next: EDU_LIMIT })
    }

    fn sid_of(dev: &Edu) -> SourceId {
        SourceId(dev.bdf.source_id())
    }

    /// The device's source id.
    pub fn sid(&self) -> SourceId {
        Self::sid_of(self.dev)
    }

    /// A fresh, never used IOVA range of `pages` pages below the DMA mask (not mapped).
    pub fn fresh_iova(&mut self, pages: u64) -> Result<Iova> {
        let bytes = pages * PAGE_SIZE;
        if self.next < bytes + PAGE_SIZE {
            return Err(Error::Exhausted { size: bytes, limit: EDU_LIMIT });
        }
        self.next -= bytes;
        Ok(Iova::new(self.next))
    }

    /// Maps `pages` pages at `pa` at a fresh IOVA with `prot`; returns the IOVA.
    pub fn map(&mut self, pa: PhysAddr, pages: u64, prot: Prot) -> Result<Iova> {
        let iova = self.fresh_iova(pages)?;
        self.map_at(iova, pa, pages, prot)?;
        Ok(iova)
    }

    /// Maps `pages` pages at `pa` at the given IOVA.
    pub fn map_at(&self, iova: Iova, pa: PhysAddr, pages: u64, prot: Prot) -> Result<()> {
        let g = PLATFORM.pin_cpu();
        self.table.map(&g, iova, pa, pages * PAGE_SIZE, prot)
    }

    /// Clears the entries of `[iova, iova + pages)` without invalidating: the gather comes
    /// back for [`DevDomain::flush`].
    pub fn unmap_no_flush(&self, iova: Iova, pages: u64) -> Result<Gather> {
        let g = PLATFORM.pin_cpu();
        let mut gather = Gather::new();
        self.table.unmap(&g, AddrRange::from_start_len(iova, pages * PAGE_SIZE)?, &mut gather)?;
        Ok(gather)
    }

    /// Invalidates what `gather` covers through the driver (a ranged invalidation), then
    /// frees its table pages with the proof.
    pub fn flush(&self, mut gather: Gather) -> Result<()> {
        let Some(range) = gather.range() else { return Ok(()) };
        self.vtd.flush_range(self.did, range)?;
        let g = PLATFORM.pin_cpu();
        // SAFETY: `flush_range` returned Ok: a ranged invalidation of `range` in this domain
        // (IOTLB and paging-structure caches: the driver never sets the leaf-only hint) has
        // completed.
        let proof = unsafe { FlushDone::for_range(range) };
        gather.release_after_flush(proof, self.table.pool(), &g).map(|_| ())
    }

    /// Strict unmap: clear, invalidate, release.
    pub fn unmap(&self, iova: Iova, pages: u64) -> Result<()> {
        let gather = self.unmap_no_flush(iova, pages)?;
        self.flush(gather)
    }

    /// Detaches the device and frees the domain id (the table drops with `self`).
    pub fn detach(self) -> Result<()> {
        self.vtd.detach(self.sid())?;
        self.vtd.free_domain_id(self.did)
    }
}
