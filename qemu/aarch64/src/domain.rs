//! One device, one domain: an edu device's stream pointed at a stage-1 context (ASID) or a
//! stage-2 STE (VMID) whose id is the `busdma::iommu::Domain`'s, whose tables are the domain's
//! Arm LPAE tables, and whose invalidations the SMMUv3 driver executes. The stage is the
//! `busdma::device::IommuHw` the domain is built over.

use busdma::device::IommuHw;
use busdma::iommu::{Domain, DomainConfig, FlushTicket, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::pgtable::{PageTable, PageTableConfig, Prot, TablePool};
use busdma::smmuv3::Smmu;
use busdma::{AddrRange, Iova, PAGE_SIZE, PhysAddr, Platform, Result};

use crate::edu::Edu;
use crate::platform::{KernelPlatform, PLATFORM};

/// How the SMMUv3 driver names `dev`: its StreamID, the PCI requester id.
pub fn device_id(dev: &Edu) -> u32 {
    u32::from(dev.bdf.source_id())
}

/// edu's DMA mask: 28 bits.
pub const EDU_LIMIT: u64 = 1 << crate::edu::DMA_BITS;

/// The driver as the domains see it (stage 1; `busdma::smmuv3::Stage2Domains` is stage 2).
pub type Unit = Smmu<'static, KernelPlatform>;
/// A domain behind the SMMU at the stage `H` drives.
pub type SmmuDomain<'p, H> = Domain<'p, KernelPlatform, <H as IommuHw>::Format, IovaAllocator, H>;

/// A device in its own domain, at the stage `H` drives (the SMMU itself: stage 1;
/// `Stage2Domains`: stage 2).
pub struct DevDomain<'p, H: IommuHw<Platform = KernelPlatform, DeviceId = u32>> {
    /// The device.
    pub dev: &'p Edu,
    /// The domain id: the ASID (stage 1) or VMID (stage 2).
    pub id: u16,
    /// The domain.
    pub dom: SmmuDomain<'p, H>,
    hw: &'p H,
}

impl<'p, H: IommuHw<Platform = KernelPlatform, DeviceId = u32>> DevDomain<'p, H> {
    /// Allocates a domain id, builds a domain with `policy` and the hardware's input width,
    /// and points `dev`'s stream at it.
    pub fn attach(
        hw: &'p H,
        pool: &'p TablePool<'p, KernelPlatform>,
        dev: &'p Edu,
        policy: InvalidationPolicy,
    ) -> Result<Self> {
        let id = hw.alloc_domain_id()?;
        let input_bits = hw.input_bits();
        let built = (|| {
            let cfg = PageTableConfig { input_bits, coherent_walker: hw.coherent_walker() };
            let table = PageTable::new(pool, cfg)?;
            let space = AddrRange::new(Iova::new(PAGE_SIZE), Iova::new(1 << input_bits))?;
            let iova = IovaAllocator::new(
                space,
                IovaConfig { cpus: PLATFORM.num_cpus(), caches: true, guard_page: false },
            )?;
            let dom = Domain::new(&PLATFORM, table, iova, hw, DomainConfig::new(id, policy))?;
            // SAFETY: the tables are `dom`'s, owned by the returned value; the checks always
            // `detach` (which aborts the stream and invalidates) before the domain is dropped.
            unsafe { hw.attach_tables(device_id(dev), id, dom.table().root())? };
            Ok(dom)
        })();
        match built {
            Ok(dom) => Ok(Self { dev, id, dom, hw }),
            Err(e) => {
                hw.free_domain_id(id);
                Err(e)
            }
        }
    }

    /// The device's StreamID.
    pub fn sid(&self) -> u32 {
        u32::from(self.dev.bdf.source_id())
    }

    /// `pages` pages of IOVA below edu's mask.
    pub fn alloc(&self, pages: u64) -> Result<AddrRange<Iova>> {
        let g = PLATFORM.pin_cpu();
        let req = IovaRequest { limit: Iova::new(EDU_LIMIT), ..IovaRequest::pages(pages) };
        self.dom.alloc_iova(&g, &req)
    }

    /// Allocates IOVA and maps `pages` pages at `pa` there.
    pub fn map(&self, pa: PhysAddr, pages: u64, prot: Prot) -> Result<AddrRange<Iova>> {
        let r = self.alloc(pages)?;
        let g = PLATFORM.pin_cpu();
        // SAFETY: the checks pass IOVA they own here and memory they own.
        if let Err(e) = unsafe { self.dom.map(&g, r.start(), pa, pages * PAGE_SIZE, prot) } {
            let _ = self.dom.iova().free(&g, r);
            return Err(e);
        }
        Ok(r)
    }

    /// Unmaps and frees one mapping made by [`DevDomain::map`].
    pub fn unmap(&self, r: AddrRange<Iova>) -> Result<FlushTicket> {
        let g = PLATFORM.pin_cpu();
        // SAFETY: as in `map`.
        unsafe { self.dom.unmap(&g, &[r], &[r]) }
    }

    /// Drains the deferred queues (and recovers a degraded domain).
    pub fn flush(&self) -> Result<()> {
        let g = PLATFORM.pin_cpu();
        self.dom.flush(&g)
    }

    /// Aborts the stream, drops the domain (its tables go back to the pool), frees the id.
    pub fn detach(self) -> Result<()> {
        let (hw, id, sid) = (self.hw, self.id, self.sid());
        hw.detach(sid, Some(id))?;
        drop(self.dom);
        hw.free_domain_id(id);
        Ok(())
    }
}
