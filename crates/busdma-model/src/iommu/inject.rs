//! Fault injection: invalidation commands that fail.
//!
//! The model's hardware never fails a command of its own accord; a real unit does (VT-d
//! reports an invalidation queue error in FSTS.IQE or a wait descriptor times out; an SMMU
//! raises CMDQ_ERR). [`ModelIommu::fail_next_invalidations`] makes the next `n` commands of
//! [`IotlbInvalidator`](busdma::iommu::IotlbInvalidator) (`invalidate_range`,
//! `invalidate_all`) return [`Error::InvalidationFailed`] *without executing*: no cached page
//! is dropped, so every translation the command was to remove still works, as on a unit whose
//! queue stopped. The software above must then reuse nothing the command was to make
//! unreachable. `invalidate_mapped` (caching mode) is not affected. Each failed command is
//! counted ([`IommuStats::inv_failed`](super::IommuStats::inv_failed)) and is not counted as
//! an executed one.
//!
//! The check is one relaxed load in every build, so a test drives the very path a real
//! failure takes (STYLE: a fault-injection setting for every failure point).

use std::sync::atomic::Ordering;

use busdma::iommu::DomainId;
use busdma::{Error, Result};

use super::{ModelIommu, Stat};

/// The status an injected failure reports: VT-d FSTS.IQE (bit 4), invalidation queue error.
pub const INJECTED_STATUS: u64 = 1 << 4;

impl ModelIommu<'_> {
    /// Fault injection: the next `n` invalidation commands (`invalidate_range`,
    /// `invalidate_all`, any domain) fail with [`Error::InvalidationFailed`] (status
    /// [`INJECTED_STATUS`]) without executing; the IOTLB keeps what they were to drop.
    /// `0` cancels; `u64::MAX` fails every command until cancelled. Replaces any earlier
    /// setting.
    pub fn fail_next_invalidations(&self, n: u64) {
        self.fail_invalidations.store(n, Ordering::Relaxed);
    }

    /// Invalidation commands still to fail ([`ModelIommu::fail_next_invalidations`]).
    pub fn invalidations_to_fail(&self) -> u64 {
        self.fail_invalidations.load(Ordering::Relaxed)
    }

    /// Fails this command if the injection says so (counted), else lets it run.
    #[inline]
    pub(super) fn injected_failure(&self, domain: DomainId) -> Result<()> {
        if self.fail_invalidations.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let taken = self.fail_invalidations.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match n {
            0 => None,
            u64::MAX => Some(u64::MAX),
            n => Some(n - 1),
        });
        if taken.is_err() {
            return Ok(());
        }
        self.bump(Stat::InvFailed, 1);
        Err(Error::InvalidationFailed {
            what: "injected invalidation queue error (model IOMMU fault injection)",
            domain: domain.into(),
            status: INJECTED_STATUS,
        })
    }
}
