//! One device, one domain: an edu device's stream pointed at a stage-1 context whose ASID is
//! the `busdma::iommu::Domain`'s id, whose tables are the domain's Arm LPAE tables, and whose
//! invalidations the SMMUv3 driver executes.

use busdma::iommu::{Domain, DomainConfig, FlushTicket, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::pgtable::{PageTable, PageTableConfig, Prot, TablePool};
use busdma::smmuv3::{Smmu, Stage1};
use busdma::{AddrRange, Iova, PAGE_SIZE, PhysAddr, Platform, Result};

use crate::edu::Edu;
use crate::platform::{KernelPlatform, PLATFORM};

/// How the SMMUv3 driver names `dev`: its StreamID, the PCI requester id.
pub fn device_id(dev: &Edu) -> u32 {
    u32::from(dev.bdf.source_id())
}

/// edu's DMA mask: 28 bits.
pub const EDU_LIMIT: u64 = 1 << crate::edu::DMA_BITS;

/// The driver as the domains see it.
pub type Unit = Smmu<'static, KernelPlatform>;
/// A domain behind the SMMU.
pub type SmmuDomain<'p> = Domain<'p, KernelPlatform, Stage1, IovaAllocator, Unit>;

/// A device in its own domain.
pub struct DevDomain<'p> {
    /// The device.
    pub dev: &'p Edu,
    /// The ASID (= the domain id).
    pub asid: u16,
    /// The domain.
    pub dom: SmmuDomain<'p>,
    smmu: &'p Unit,
}

impl<'p> DevDomain<'p> {
    /// Allocates an ASID, builds a domain with `policy` and `input_bits` of IOVA, and points
    /// `dev`'s stream at it.
    pub fn attach(
        smmu: &'p Unit,
        pool: &'p TablePool<'p, KernelPlatform>,
        dev: &'p Edu,
        policy: InvalidationPolicy,
        input_bits: u32,
    ) -> Result<Self> {
        let asid = smmu.alloc_asid()?;
        let built = (|| {
            let table =
                PageTable::new(pool, PageTableConfig { input_bits, coherent_walker: smmu.coherent() })?;
            let space = AddrRange::new(Iova::new(PAGE_SIZE), Iova::new(1 << input_bits))?;
            let iova = IovaAllocator::new(
                space,
                IovaConfig { cpus: PLATFORM.num_cpus(), caches: true, guard_page: false },
            )?;
            let dom = Domain::new(&PLATFORM, table, iova, smmu, DomainConfig::new(asid, policy))?;
            // SAFETY: the tables are `dom`'s, owned by the returned value; `detach` aborts the
            // stream before the domain (and its tables) is dropped, and a `DevDomain` dropped
            // without it is dropped with the SMMU turned off or at the end of the run.
            unsafe { smmu.attach(u32::from(dev.bdf.source_id()), asid, dom.table().root(), input_bits)? };
            Ok(dom)
        })();
        match built {
            Ok(dom) => Ok(Self { dev, asid, dom, smmu }),
            Err(e) => {
                let _ = smmu.free_asid(asid);
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

    /// Aborts the stream, drops the domain (its tables go back to the pool), frees the ASID.
    pub fn detach(self) -> Result<()> {
        let (smmu, asid, sid) = (self.smmu, self.asid, self.sid());
        smmu.detach(sid)?;
        drop(self.dom);
        smmu.free_asid(asid)
    }
}
