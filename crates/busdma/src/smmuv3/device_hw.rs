//! The SMMUv3 driver behind `busdma::device`: [`IommuHw`] for [`Smmu`].
//!
//! Domains get stage-1 tables in [`super::Stage1`] format of [`Smmu::input_bits`] input, ASIDs
//! from the driver's bitmap as domain ids, the driver's attach (CD + STE, CFGI, TLBI_NH_ASID)
//! and detach (abort STE, CFGI_STE, TLBI_NH_ASID, CMD_SYNC). Pass-through is refused here:
//! [`Smmu::bypass`] is `unsafe` (the device reaches all memory), and this safe entry point
//! cannot carry that contract.

use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::device::IommuHw;
use crate::error::{Error, Result};
use crate::iommu::{DomainId, IotlbInvalidator};
use crate::platform::Platform;

use super::entry::ContextDescriptor;
use super::unit::Smmu;

// SAFETY: the tables are `Stage1` tables whose width (`input_bits`) `attach_tables` writes in
// the CD's T0SZ, so the SMMU walks exactly them and faults on IOVA beyond; `coherent_walker`
// is IDR0.COHACC (the probe refuses non-coherent SMMUs); `platform` is the one the SMMU was
// brought up on; ASIDs come from the driver's bitmap (never 0, each once until freed) and
// attach invalidates the ASID before returning; `detach` writes an abort STE, then CFGI_STE and
// TLBI_NH_ASID of the ASID the CD named, and waits for CMD_SYNC before returning `Ok`; every
// invalidation waits for CMD_SYNC (`invalidator.rs`).
#[allow(unsafe_code)]
unsafe impl<P: Platform> IommuHw for Smmu<'_, P> {
    type Platform = P;
    type Format = super::Stage1;
    type DeviceId = u32;

    fn platform(&self) -> &P {
        Smmu::platform(self)
    }

    fn input_bits(&self) -> u32 {
        Smmu::input_bits(self)
    }

    fn coherent_walker(&self) -> bool {
        self.coherent()
    }

    fn alloc_domain_id(&self) -> Result<DomainId> {
        self.alloc_asid()
    }

    fn free_domain_id(&self, id: DomainId) {
        // Only ids this trait allocated come back here: a double free cannot happen.
        let _ = self.free_asid(id);
    }

    unsafe fn attach_tables(&self, dev: u32, domain: DomainId, root: PhysAddr) -> Result<()> {
        // SAFETY: the caller's contract is `Smmu::attach`'s.
        unsafe { Smmu::attach(self, dev, domain, root, Smmu::input_bits(self)) }
    }

    fn attach_bypass(&self, _dev: u32) -> Result<()> {
        Err(Error::Unsupported { what: "SMMUv3 bypass through busdma::device (Smmu::bypass is unsafe)" })
    }

    fn detach(&self, dev: u32, domain: Option<DomainId>) -> Result<()> {
        let named = self.cd_asid(dev);
        Smmu::detach(self, dev)?;
        match (named, domain) {
            // The driver invalidated the ASID the CD named; another one the caller names too.
            (Some(a), Some(d)) if a != d => self.flush_asid(d),
            _ => Ok(()),
        }
    }
}

/// A shared SMMU: a kernel that also polls faults or attaches streams itself hands
/// `busdma::device` a reference.
impl<P: Platform> IotlbInvalidator for &Smmu<'_, P> {
    fn invalidate_range(&self, domain: DomainId, range: AddrRange<Iova>) -> Result<()> {
        (**self).invalidate_range(domain, range)
    }

    fn invalidate_all(&self, domain: DomainId) -> Result<()> {
        (**self).invalidate_all(domain)
    }
}

// SAFETY: every answer is the SMMU's own (the impl above).
#[allow(unsafe_code)]
unsafe impl<P: Platform> IommuHw for &Smmu<'_, P> {
    type Platform = P;
    type Format = super::Stage1;
    type DeviceId = u32;

    fn platform(&self) -> &P {
        Smmu::platform(self)
    }

    fn input_bits(&self) -> u32 {
        Smmu::input_bits(self)
    }

    fn coherent_walker(&self) -> bool {
        IommuHw::coherent_walker(*self)
    }

    fn alloc_domain_id(&self) -> Result<DomainId> {
        IommuHw::alloc_domain_id(*self)
    }

    fn free_domain_id(&self, id: DomainId) {
        IommuHw::free_domain_id(*self, id)
    }

    unsafe fn attach_tables(&self, dev: u32, domain: DomainId, root: PhysAddr) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { IommuHw::attach_tables(*self, dev, domain, root) }
    }

    fn attach_bypass(&self, dev: u32) -> Result<()> {
        IommuHw::attach_bypass(*self, dev)
    }

    fn detach(&self, dev: u32, domain: Option<DomainId>) -> Result<()> {
        IommuHw::detach(*self, dev, domain)
    }
}

impl<P: Platform> Smmu<'_, P> {
    /// The ASID the CD of stream `sid` names, if it is attached at stage 1.
    pub fn cd_asid(&self, sid: u32) -> Option<u16> {
        self.cd_word0(sid).map(ContextDescriptor::asid_of)
    }
}
