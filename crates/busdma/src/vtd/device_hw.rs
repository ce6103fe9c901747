//! The VT-d driver behind `busdma::device`: [`IommuHw`] for [`Vtd`].
//!
//! Domains get the unit's depth ([`Vtd::levels`]) in [`super::SecondLevel`] format, domain ids
//! from the unit's bitmap, and the unit's attach and detach, which invalidate the device's
//! context-cache entry and the domain's IOTLB before they return. Pass-through (context
//! translation type 10b) is not programmed by this driver yet: the bypass policy is refused.

use crate::addr::PhysAddr;
use crate::device::IommuHw;
use crate::error::{Error, Result};
use crate::iommu::DomainId as IommuDomainId;
use crate::platform::Platform;

use super::entry::{DomainId, SourceId};
use super::unit::Vtd;

// SAFETY: the tables are built in `SecondLevel` format at the unit's depth (`levels`), which
// `attach_tables` writes in the context entry's AW field, so the unit walks exactly them and
// refuses IOVA beyond their width; `coherent_walker` is ECAP.C; `platform` is the one the unit
// was brought up on; domain ids come from the unit's bitmap (never 0, each once until freed);
// `detach` clears the context entry, then invalidates the device's context-cache entry and the
// domain's IOTLB and waits for completion before returning `Ok`; every invalidation command
// waits for completion (`invalidator.rs`).
#[allow(unsafe_code)]
unsafe impl<P: Platform> IommuHw for Vtd<'_, P> {
    type Platform = P;
    type Format = super::SecondLevel;
    type DeviceId = SourceId;

    fn platform(&self) -> &P {
        Vtd::platform(self)
    }

    fn input_bits(&self) -> u32 {
        self.levels().input_bits()
    }

    fn coherent_walker(&self) -> bool {
        self.coherent()
    }

    fn alloc_domain_id(&self) -> Result<IommuDomainId> {
        Vtd::alloc_domain_id(self).map(|d| d.0)
    }

    fn free_domain_id(&self, id: IommuDomainId) {
        // Only ids this trait allocated come back here: a double free cannot happen.
        let _ = Vtd::free_domain_id(self, DomainId(id));
    }

    unsafe fn attach_tables(&self, dev: SourceId, domain: IommuDomainId, root: PhysAddr) -> Result<()> {
        // SAFETY: the caller's contract is `Vtd::attach`'s.
        unsafe { Vtd::attach(self, dev, DomainId(domain), root, self.levels()) }
    }

    fn attach_bypass(&self, _dev: SourceId) -> Result<()> {
        Err(Error::Unsupported { what: "VT-d pass-through (context translation type 10b) in this driver" })
    }

    fn detach(&self, dev: SourceId, domain: Option<IommuDomainId>) -> Result<()> {
        let attached = self.context_of(dev).map(|(_, _, d)| d.0);
        Vtd::detach(self, dev)?;
        match (attached, domain) {
            // The unit invalidated the domain the entry named; another one the caller names
            // is invalidated too.
            (Some(a), Some(d)) if a != d => self.flush_domain(DomainId(d)),
            _ => Ok(()),
        }
    }
}

/// A shared unit: a kernel that drives the unit for other purposes too (its own domains, fault
/// polling) hands `busdma::device` a reference.
impl<P: Platform> crate::iommu::IotlbInvalidator for &Vtd<'_, P> {
    fn invalidate_range(
        &self,
        domain: IommuDomainId,
        range: crate::addr::AddrRange<crate::addr::Iova>,
    ) -> Result<()> {
        (**self).invalidate_range(domain, range)
    }

    fn invalidate_all(&self, domain: IommuDomainId) -> Result<()> {
        (**self).invalidate_all(domain)
    }

    #[inline]
    fn invalidate_mapped(
        &self,
        domain: IommuDomainId,
        range: crate::addr::AddrRange<crate::addr::Iova>,
    ) -> Result<()> {
        (**self).invalidate_mapped(domain, range)
    }
}

// SAFETY: every answer is the unit's own (the impl above).
#[allow(unsafe_code)]
unsafe impl<P: Platform> IommuHw for &Vtd<'_, P> {
    type Platform = P;
    type Format = super::SecondLevel;
    type DeviceId = SourceId;

    fn platform(&self) -> &P {
        Vtd::platform(self)
    }

    fn input_bits(&self) -> u32 {
        IommuHw::input_bits(*self)
    }

    fn coherent_walker(&self) -> bool {
        IommuHw::coherent_walker(*self)
    }

    fn alloc_domain_id(&self) -> Result<IommuDomainId> {
        IommuHw::alloc_domain_id(*self)
    }

    fn free_domain_id(&self, id: IommuDomainId) {
        IommuHw::free_domain_id(*self, id)
    }

    unsafe fn attach_tables(&self, dev: SourceId, domain: IommuDomainId, root: PhysAddr) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { IommuHw::attach_tables(*self, dev, domain, root) }
    }

    fn attach_bypass(&self, dev: SourceId) -> Result<()> {
        IommuHw::attach_bypass(*self, dev)
    }

    fn detach(&self, dev: SourceId, domain: Option<IommuDomainId>) -> Result<()> {
        IommuHw::detach(*self, dev, domain)
    }
}
