//! The SMMU as the domains' invalidation back end: `busdma::iommu`'s strict and deferred
//! policies call [`IotlbInvalidator`] with the domain id, which is the ASID of the domain's
//! context descriptor. Each call returns once a CMD_SYNC behind its TLBIs has completed, or
//! with [`crate::Error::InvalidationFailed`] (the domain then holds back what the command was
//! to make reusable; `busdma::iommu::Domain`, theory 8). An SMMUv3 never caches invalid
//! entries, so `invalidate_mapped` keeps the free default.

use crate::addr::{AddrRange, Iova};
use crate::error::Result;
use crate::iommu::{DomainId, IotlbInvalidator};
use crate::platform::Platform;

use super::unit::Smmu;

impl<P: Platform> IotlbInvalidator for Smmu<'_, P> {
    fn invalidate_range(&self, domain: DomainId, range: AddrRange<Iova>) -> Result<()> {
        self.flush_range(domain, range)
    }

    fn invalidate_all(&self, domain: DomainId) -> Result<()> {
        self.flush_asid(domain)
    }
}
