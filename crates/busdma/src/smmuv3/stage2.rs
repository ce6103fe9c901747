//! Stage-2 domains: [`Stage2Domains`] is the SMMU seen through its stage-2 side, the
//! `IotlbInvalidator` (domain id = VMID: TLBI_S2_IPA, TLBI_S12_VMALL) and `IommuHw` (tables in
//! [`ArmLpaeS2`] format, VMIDs as domain ids, stage-2 STEs) that `busdma::iommu::Domain` and
//! `busdma::device` drive. Stage 1 is the [`Smmu`] itself.

use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::device::IommuHw;
use crate::error::{Error, Result};
use crate::iommu::{DomainId, IotlbInvalidator};
use crate::pgtable::ArmLpaeS2;
use crate::platform::Platform;

use super::unit::Smmu;

/// The stage-2 side of an SMMU (a view: it borrows the driver).
pub struct Stage2Domains<'s, 'p, P: Platform>(&'s Smmu<'p, P>);

impl<'s, 'p, P: Platform> Stage2Domains<'s, 'p, P> {
    /// The stage-2 view of `smmu`.
    ///
    /// Errors: [`Error::Unsupported`] if the SMMU has no stage 2 (IDR0.S2P).
    pub fn new(smmu: &'s Smmu<'p, P>) -> Result<Self> {
        if !smmu.caps().stage2() {
            return Err(Error::Unsupported { what: "SMMUv3 stage 2 (IDR0.S2P = 0)" });
        }
        Ok(Self(smmu))
    }

    /// The driver.
    pub fn smmu(&self) -> &'s Smmu<'p, P> {
        self.0
    }
}

impl<P: Platform> IotlbInvalidator for Stage2Domains<'_, '_, P> {
    fn invalidate_range(&self, domain: DomainId, range: AddrRange<Iova>) -> Result<()> {
        self.0.flush_s2_range(domain, range)
    }

    fn invalidate_all(&self, domain: DomainId) -> Result<()> {
        self.0.flush_vmid(domain)
    }
}

// SAFETY: the tables are `ArmLpaeS2` tables whose width `attach_tables` writes in the STE's
// S2T0SZ/S2SL0, so the SMMU walks exactly them and faults beyond; the walker is coherent (the
// probe refuses the rest); VMIDs come from the driver's bitmap (never 0, each once until
// freed); attach invalidates the VMID; `detach` writes an abort STE, CFGI_STE and
// TLBI_S12_VMALL of the STE's VMID and waits for CMD_SYNC before `Ok`; every invalidation
// waits for CMD_SYNC.
#[allow(unsafe_code)]
unsafe impl<P: Platform> IommuHw for Stage2Domains<'_, '_, P> {
    type Platform = P;
    type Format = ArmLpaeS2;
    type DeviceId = u32;

    fn platform(&self) -> &P {
        self.0.platform()
    }

    fn input_bits(&self) -> u32 {
        self.0.input_bits()
    }

    fn coherent_walker(&self) -> bool {
        self.0.coherent()
    }

    fn alloc_domain_id(&self) -> Result<DomainId> {
        self.0.alloc_vmid()
    }

    fn free_domain_id(&self, id: DomainId) {
        // Only ids this trait allocated come back here.
        let _ = self.0.free_vmid(id);
    }

    unsafe fn attach_tables(&self, dev: u32, domain: DomainId, root: PhysAddr) -> Result<()> {
        // SAFETY: the caller's contract is `Smmu::attach_s2`'s.
        unsafe { self.0.attach_s2(dev, domain, root, self.0.input_bits()) }
    }

    fn attach_bypass(&self, _dev: u32) -> Result<()> {
        Err(Error::Unsupported { what: "SMMUv3 bypass through busdma::device (Smmu::bypass is unsafe)" })
    }

    fn detach(&self, dev: u32, domain: Option<DomainId>) -> Result<()> {
        let named = self.0.s2_vmid(dev);
        self.0.detach(dev)?;
        match (named, domain) {
            (Some(a), Some(d)) if a != d => self.0.flush_vmid(d),
            _ => Ok(()),
        }
    }
}
