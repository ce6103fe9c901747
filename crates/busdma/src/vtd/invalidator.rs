//! The driver as the domains' invalidation back end: `busdma::iommu`'s strict and deferred
//! policies call [`IotlbInvalidator`], and the VT-d unit executes it.
//!
//! The trait's commands cannot fail: each returns only once the hardware has completed it,
//! because the caller frees IOVAs and table pages right after. A VT-d invalidation that the
//! unit refuses or never completes (an invalidation-queue error, a time-out) is retried once
//! at domain granularity; if that fails too, the unit cannot be trusted to forget anything,
//! and returning would let memory a device may still reach be reused. The driver then panics,
//! as Linux does for a DMAR unit that times out: that is the one panic of the module.

use crate::addr::{AddrRange, Iova};
use crate::iommu::{DomainId as IommuDomainId, IotlbInvalidator};
use crate::platform::Platform;

use super::entry::DomainId;
use super::unit::Vtd;

impl<P: Platform> Vtd<'_, P> {
    #[cold]
    fn invalidation_failed(&self, domain: IommuDomainId, first: crate::Error) {
        if let Err(again) = self.flush_domain(DomainId(domain)) {
            panic!(
                "VT-d: IOTLB invalidation of domain {domain} failed ({first}), and again at domain \
                 granularity ({again}); the unit can no longer guarantee that unmapped memory is unreachable"
            );
        }
    }
}

impl<P: Platform> IotlbInvalidator for Vtd<'_, P> {
    fn invalidate_range(&self, domain: IommuDomainId, range: AddrRange<Iova>) {
        if let Err(e) = self.flush_range(DomainId(domain), range) {
            self.invalidation_failed(domain, e);
        }
    }

    fn invalidate_all(&self, domain: IommuDomainId) {
        if let Err(e) = self.flush_domain(DomainId(domain)) {
            self.invalidation_failed(domain, e);
        }
    }
}
