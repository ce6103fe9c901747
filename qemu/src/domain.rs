//! One device, one domain: an edu device attached to the VT-d unit with its own domain id, and
//! a `busdma::iommu::Domain` (IOVA allocator + second-level page table + strict or deferred
//! invalidation) whose invalidations the VT-d driver executes.

use busdma::front::strategy::reserve_levels::reserve_levels;
use busdma::front::{Invalidation, IommuOps};
use busdma::iommu::{Domain, DomainConfig, FlushTicket, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::pgtable::{PageTable, PageTableConfig, Prot, TablePool};
use busdma::vtd::{DomainId, SecondLevel, SourceId, Vtd};
use busdma::{AddrRange, CpuGuard, Iova, PAGE_SIZE, PhysAddr, Platform, Result};

use crate::edu::Edu;
use crate::platform::{KernelPlatform, PLATFORM};

/// How the VT-d driver names `dev` (its requester id), for `device_check.rs`.
pub fn device_id(dev: &Edu) -> SourceId {
    SourceId(dev.bdf.source_id())
}

/// edu's DMA mask: 28 address bits; every IOVA handed to it lies below.
pub const EDU_LIMIT: u64 = 1 << 28;

/// The driver as the domains see it.
pub type Unit = Vtd<'static, KernelPlatform>;
/// A domain behind the VT-d unit.
pub type VtdDomain<'p> = Domain<'p, KernelPlatform, SecondLevel, IovaAllocator, Unit>;

/// A device in its own domain.
pub struct DevDomain<'p> {
    /// The device.
    pub dev: &'p Edu,
    /// Its domain id.
    pub did: DomainId,
    /// The domain.
    pub dom: VtdDomain<'p>,
    vtd: &'p Unit,
}

impl<'p> DevDomain<'p> {
    /// Allocates a domain id, builds a domain with `policy` and attaches `dev` to its table.
    pub fn attach(
        vtd: &'p Unit,
        pool: &'p TablePool<'p, KernelPlatform>,
        dev: &'p Edu,
        policy: InvalidationPolicy,
    ) -> Result<Self> {
        let did = vtd.alloc_domain_id()?;
        match Self::build(vtd, pool, dev, did, policy) {
            Ok(d) => Ok(d),
            Err(e) => {
                let _ = vtd.free_domain_id(did);
                Err(e)
            }
        }
    }

    fn build(
        vtd: &'p Unit,
        pool: &'p TablePool<'p, KernelPlatform>,
        dev: &'p Edu,
        did: DomainId,
        policy: InvalidationPolicy,
    ) -> Result<Self> {
        let levels = vtd.levels();
        let cfg = PageTableConfig { input_bits: levels.input_bits(), coherent_walker: vtd.coherent() };
        let table = PageTable::new(pool, cfg)?;
        // The whole input space but page 0 (an IOVA of 0 reads as "no address" too often).
        let space = AddrRange::new(Iova::new(PAGE_SIZE), Iova::new(1 << levels.input_bits()))?;
        let iova = IovaAllocator::new(
            space,
            IovaConfig { cpus: PLATFORM.num_cpus(), caches: true, guard_page: false },
        )?;
        let dom = Domain::new(&PLATFORM, table, iova, vtd, DomainConfig::new(did.0, policy))?;
        // SAFETY: the tables are `dom`'s, owned by the returned value; the test kernel never
        // drops a `DevDomain` while its device may still DMA: `detach` detaches first, and a
        // domain dropped without it is dropped at the end of the run, after the last DMA.
        unsafe { vtd.attach(SourceId(dev.bdf.source_id()), did, dom.table().root(), levels)? };
        Ok(Self { dev, did, dom, vtd })
    }

    /// The device's source id.
    pub fn sid(&self) -> SourceId {
        SourceId(self.dev.bdf.source_id())
    }

    /// `pages` pages of IOVA below edu's mask, aligned to `align`.
    pub fn alloc(&self, pages: u64, align: u64) -> Result<AddrRange<Iova>> {
        let g = PLATFORM.pin_cpu();
        let req = IovaRequest { align, limit: Iova::new(EDU_LIMIT), ..IovaRequest::pages(pages) };
        self.dom.alloc_iova(&g, &req)
    }

    /// Gives back IOVA that was never mapped.
    pub fn free_unmapped(&self, r: AddrRange<Iova>) -> Result<()> {
        let g = PLATFORM.pin_cpu();
        self.dom.iova().free(&g, r)
    }

    /// Maps `pages` pages at `pa` with `prot` at `iova`.
    pub fn map_at(&self, iova: Iova, pa: PhysAddr, pages: u64, prot: Prot) -> Result<()> {
        let g = PLATFORM.pin_cpu();
        // SAFETY: the kernel's tests call this with IOVA they own here and memory they own.
        unsafe { self.dom.map(&g, iova, pa, pages * PAGE_SIZE, prot) }
    }

    /// Allocates IOVA and maps `pages` pages at `pa` there: the IOVA range.
    pub fn map(&self, pa: PhysAddr, pages: u64, prot: Prot) -> Result<AddrRange<Iova>> {
        let r = self.alloc(pages, PAGE_SIZE)?;
        if let Err(e) = self.map_at(r.start(), pa, pages, prot) {
            let _ = self.free_unmapped(r);
            return Err(e);
        }
        Ok(r)
    }

    /// Unmaps `mapped` and gives `free` back to the allocator once no device can reach it
    /// (strict: before returning; deferred: after a later flush).
    pub fn unmap(&self, mapped: &[AddrRange<Iova>], free: &[AddrRange<Iova>]) -> Result<FlushTicket> {
        let g = PLATFORM.pin_cpu();
        // SAFETY: the kernel's tests call this with IOVA they own here and memory they own.
        unsafe { self.dom.unmap(&g, mapped, free) }
    }

    /// Unmaps and frees one mapping made by [`DevDomain::map`].
    pub fn unmap_one(&self, r: AddrRange<Iova>) -> Result<FlushTicket> {
        self.unmap(&[r], &[r])
    }

    /// Drains the deferred flush queues now, and recovers a degraded domain (nothing for a
    /// healthy strict domain).
    pub fn flush(&self) -> Result<()> {
        let g = PLATFORM.pin_cpu();
        self.dom.flush(&g)
    }

    /// Detaches the device (its DMA is blocked from here on), drops the domain (flushing and
    /// freeing its tables), then frees the domain id.
    pub fn detach(self) -> Result<()> {
        let (vtd, did, sid) = (self.vtd, self.did, self.sid());
        vtd.detach(sid)?;
        drop(self.dom);
        vtd.free_domain_id(did)
    }
}

/// The front end's view of a device's domain: the IOMMU strategies (`IommuPerMap` & co.) load
/// and unload maps through this, so tags and maps drive the real `Domain` and, below it, the
/// VT-d driver.
// SAFETY: the allocator hands out exclusive ranges; map, unmap and the waits are the VT-d
// domain's own, which invalidate before they report success.
unsafe impl IommuOps<KernelPlatform> for &DevDomain<'_> {
    type Ticket = FlushTicket;

    fn invalidation(&self) -> Invalidation {
        match self.dom.policy() {
            InvalidationPolicy::Strict => Invalidation::Strict,
            InvalidationPolicy::Deferred { .. } => Invalidation::Deferred,
        }
    }

    fn max_iova(&self) -> u64 {
        self.dom.table().input_limit() - 1
    }

    fn alloc_iova(
        &self,
        g: &CpuGuard<'_, KernelPlatform>,
        size: u64,
        align: u64,
        limit: u64,
    ) -> Result<AddrRange<Iova>> {
        let req = IovaRequest { size, align, boundary: 0, limit: Iova::new(limit.saturating_add(1)) };
        self.dom.alloc_iova(g, &req)
    }

    unsafe fn free_iova(&self, g: &CpuGuard<'_, KernelPlatform>, range: AddrRange<Iova>) {
        if let Err(e) = self.dom.iova().free(g, range) {
            // The front end gives back only what it allocated: a failure is a bug worth a
            // loud stop of the test kernel.
            panic!("freeing IOVA {range:?} that the front end allocated: {e}");
        }
    }

    unsafe fn map(
        &self,
        g: &CpuGuard<'_, KernelPlatform>,
        iova: Iova,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
    ) -> Result<()> {
        // SAFETY: the front end passes IOVA it allocated here and memory its load holds.
        unsafe { self.dom.map(g, iova, pa, len, prot) }
    }

    unsafe fn unmap(
        &self,
        g: &CpuGuard<'_, KernelPlatform>,
        mapped: &[AddrRange<Iova>],
        free: &[AddrRange<Iova>],
    ) -> Result<FlushTicket> {
        // SAFETY: the front end passes IOVA it allocated here and memory its load holds.
        unsafe { self.dom.unmap(g, mapped, free) }
    }

    fn ensure_flushed(&self, g: &CpuGuard<'_, KernelPlatform>, ticket: FlushTicket) -> Result<()> {
        self.dom.ensure_flushed(g, ticket)
    }

    fn wait_unmapped(&self, g: &CpuGuard<'_, KernelPlatform>) -> Result<()> {
        self.dom.wait_unmapped(g)
    }

    unsafe fn reserve_tables(&self, g: &CpuGuard<'_, KernelPlatform>, range: AddrRange<Iova>) -> Result<()> {
        // SAFETY: the front end passes IOVA it allocated here and memory its load holds.
        unsafe { reserve_levels(self.dom.table(), g, range) }
    }
}
