//! The driver as the domains' invalidation back end: `busdma::iommu`'s strict and deferred
//! policies call [`IotlbInvalidator`], and the VT-d unit executes it.
//!
//! Each command returns only once the hardware has completed it, or with
//! [`crate::Error::InvalidationFailed`] when the unit rejected it (an invalidation queue
//! error, a refused register command) or never completed it (a time-out). The driver does not
//! retry: the domain holds back what the command was to make reusable and retries with a
//! whole-domain invalidation before its next map (`busdma::iommu::Domain`, theory 8). A
//! failure never panics.
//!
//! In caching mode (CAP.CM) the unit may cache not-present entries, so a map is followed by a
//! page-selective invalidation of its range ([`IotlbInvalidator::invalidate_mapped`]); with
//! CM clear that call returns at once.

use crate::addr::{AddrRange, Iova};
use crate::error::Result;
use crate::iommu::{DomainId as IommuDomainId, IotlbInvalidator};
use crate::platform::Platform;

use super::entry::DomainId;
use super::unit::Vtd;

impl<P: Platform> IotlbInvalidator for Vtd<'_, P> {
    fn invalidate_range(&self, domain: IommuDomainId, range: AddrRange<Iova>) -> Result<()> {
        self.flush_range(DomainId(domain), range)
    }

    fn invalidate_all(&self, domain: IommuDomainId) -> Result<()> {
        self.flush_domain(DomainId(domain))
    }

    #[inline]
    fn invalidate_mapped(&self, domain: IommuDomainId, range: AddrRange<Iova>) -> Result<()> {
        self.flush_mapped(DomainId(domain), range)
    }
}
