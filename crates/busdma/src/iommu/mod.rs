//! IOMMU domains: an IOVA space, a page table and an invalidation policy, bound together.
//!
//! # Theory
//!
//! 1. **What the hardware must forget.** An IOMMU caches translations (the IOTLB) and the
//!    table entries that led to them (paging-structure caches). Clearing a page-table entry
//!    does not stop a device: until an invalidation command covering the address has
//!    *completed*, the device may still reach the old page through the cache. So an IOVA, or
//!    a table page that was part of a walk, may be used again only after an invalidation
//!    that *started after* its entries were cleared has *finished*.
//! 2. **The command interface** is [`IotlbInvalidator`]: a ranged invalidation and a
//!    whole-domain one, each complete when the call returns (the driver waits for the
//!    hardware's completion). The machine model implements it (`busdma_model::ModelIommu`),
//!    and so does a real driver. Its `audit_*` methods are debug hooks that a checking model
//!    uses to verify the rule above; hardware drivers leave them as the no-op defaults.
//! 3. **Caching not-present entries.** Some IOMMUs may also cache what they found *absent*
//!    (VT-d caching mode, CAP.CM = 1: the unit is usually a hypervisor's virtual IOMMU that
//!    shadows the tables and learns about new entries only from invalidations). For them a
//!    map must be followed by an invalidation of its range too:
//!    [`IotlbInvalidator::invalidate_mapped`], which every other IOMMU leaves as the free
//!    default.
//! 4. **Failure.** A command can fail: the hardware reports an error, or never answers. It
//!    then returns [`crate::Error::InvalidationFailed`], and nothing the command was meant to
//!    make reusable may be reused: [`Domain`] holds it back until a later whole-domain
//!    invalidation succeeds (see its theory).
//! 5. **Policies.** *Strict*: the unmap of a map issues exactly one ranged invalidation
//!    covering all its segments, waits for it, then frees the table pages and the IOVA.
//!    *Deferred*: unmaps go on a per-CPU flush queue and one whole-domain invalidation drains
//!    many of them, bounded by a count and an age ([`InvalidationPolicy`]). A domain for an
//!    *untrusted* device is always strict: the exposure window of deferred invalidation is
//!    exactly what a hostile device would use.
//!
//! [`Domain`] applies these policies; [`flushq`] holds the deferred queues and generations.
#![deny(unsafe_code)]

#[cfg(feature = "alloc")]
mod domain;
#[cfg(feature = "alloc")]
pub mod flushq;

#[cfg(feature = "alloc")]
pub use domain::{Domain, DomainStats, PinnedRun};
#[cfg(feature = "alloc")]
pub use flushq::FlushTicket;

use crate::addr::{AddrRange, Iova, KernVa, PhysAddr};
use crate::error::Result;

/// An IOMMU domain number: the tag the hardware keys its caches by (VT-d's 16-bit domain id,
/// an SMMU's ASID/VMID).
pub type DomainId = u16;

/// The invalidation commands of an IOMMU, as its driver issues them.
///
/// # Execution context
///
/// Every method may be called with preemption disabled and from several CPUs at once; each
/// returns only when the hardware has completed the command (it spins, never sleeps), or has
/// failed it.
///
/// # Errors
///
/// The invalidation commands return [`crate::Error::InvalidationFailed`] when the hardware
/// reported an error or did not complete in time: the caller must then treat everything the
/// command was to invalidate as possibly still cached (theory 4).
pub trait IotlbInvalidator: Sync {
    /// Invalidates every cached translation (IOTLB and paging-structure caches) of `domain`
    /// that covers any byte of `range`. Complete when it returns `Ok`.
    fn invalidate_range(&self, domain: DomainId, range: AddrRange<Iova>) -> Result<()>;

    /// Invalidates every cached translation of `domain`. Complete when it returns `Ok`.
    fn invalidate_all(&self, domain: DomainId) -> Result<()>;

    /// Entries for `range` of `domain` have just been made present. An IOMMU that may cache
    /// not-present entries (VT-d caching mode) invalidates the range so that devices see the
    /// new entries (theory 3); every other IOMMU returns at once (the default).
    #[inline]
    fn invalidate_mapped(&self, domain: DomainId, range: AddrRange<Iova>) -> Result<()> {
        let _ = (domain, range);
        Ok(())
    }

    /// Programs the coherence index of the mapping of `range` in `domain` (parisc's local
    /// coherence index, seed 003): the virtual cache index the IOMMU uses to keep one CPU alias
    /// of each page coherent during DMA. Called after the range is mapped. IOMMUs without a
    /// coherence index ignore it (the default).
    fn set_coherence_index(&self, domain: DomainId, range: AddrRange<Iova>, index: CoherenceIndex) {
        let _ = (domain, range, index);
    }

    /// Debug hook: one unmap has just cleared the entries of `ranges` in `domain`. A checking
    /// model stamps them to measure how long a device could still use them. Hardware drivers
    /// do nothing (the default).
    fn audit_unmapped(&self, domain: DomainId, ranges: &[AddrRange<Iova>]) {
        let _ = (domain, ranges);
    }

    /// Debug hook: `range` of `domain` is going back to the IOVA allocator. A checking model
    /// verifies that it may no longer cache any translation in it.
    fn audit_iova_released(&self, domain: DomainId, range: AddrRange<Iova>) {
        let _ = (domain, range);
    }

    /// Debug hook: the table page at `page`, once part of `domain`'s tables, is going back
    /// to the pool. A checking model verifies that no translation it may still cache was
    /// walked through it.
    fn audit_table_page_released(&self, domain: DomainId, page: PhysAddr) {
        let _ = (domain, page);
    }

    /// Debug hook: entries for `range` of `domain` are about to be written. A checking model
    /// verifies that it may no longer cache a translation of the range (an IOVA reused, for
    /// instance inside a reserved window, before the flush that covers its last unmap).
    fn audit_mapping(&self, domain: DomainId, range: AddrRange<Iova>) {
        let _ = (domain, range);
    }
}

/// Which CPU alias an IOMMU with a coherence index keeps coherent during a transfer (seed 003).
///
/// A virtually indexed cache can hold one physical line under several virtual aliases; the
/// IOMMU can flush only one of them per transfer, the one its mapping's index names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CoherenceIndex {
    /// The kernel alias of the range's first page: page `i` of the range is indexed by this
    /// address plus `i` pages. For page-backed and kernel-mapped memory; any other alias (a user
    /// mapping) must have been made coherent before the load (pinning cleans it, as
    /// `get_user_pages` does).
    Alias(KernVa),
    /// Memory with no kernel mapping: the CPU never cached it through a kernel alias, so the
    /// driver programs a line it knows the kernel never touches and the transfer flushes
    /// nothing (a zero index would work too, but would flush the poor zero line every time).
    Untouched,
}

/// When the IOTLB is invalidated after an unmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidationPolicy {
    /// Before unmap returns: one ranged invalidation per unmap of a map.
    Strict,
    /// In batches: per-CPU flush queues drained by one whole-domain invalidation when a
    /// queue holds `max_entries` unmaps or its oldest is `max_age_ns` old, whichever first.
    Deferred {
        /// Unmaps a per-CPU queue holds before it forces a flush (≥ 1).
        max_entries: usize,
        /// Age of the oldest queued unmap that forces a flush, in nanoseconds (≥ 1).
        max_age_ns: u64,
    },
}

impl InvalidationPolicy {
    /// Per-CPU queue bound by count: 256 unmaps. Linux's flush queue holds 256 entries per
    /// CPU too (IOVA_FQ_SIZE); it amortises one whole-domain invalidation (~1–2 µs of queued
    /// invalidation on VT-d, dominated by the wait descriptor) over 256 unmaps, under 10 ns
    /// each, while bounding the IOVA space and table pages held back to 256 maps per CPU.
    pub const DEFAULT_MAX_ENTRIES: usize = 256;
    /// Per-CPU queue bound by age: 10 ms, Linux's IOVA_FQ_TIMEOUT. Long enough that a busy
    /// CPU flushes by count long before (256 unmaps take well under 1 ms at line rate), short
    /// enough that an idle device's stale translations live at most one scheduler tick or so.
    pub const DEFAULT_MAX_AGE_NS: u64 = 10_000_000;

    /// Deferred with the default bounds (256 entries or 10 ms, whichever first).
    pub const fn deferred() -> Self {
        InvalidationPolicy::Deferred {
            max_entries: Self::DEFAULT_MAX_ENTRIES,
            max_age_ns: Self::DEFAULT_MAX_AGE_NS,
        }
    }
}

impl Default for InvalidationPolicy {
    /// Strict: safe unless the caller chooses speed.
    fn default() -> Self {
        InvalidationPolicy::Strict
    }
}

/// How a domain is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DomainConfig {
    /// The tag the hardware keys its caches by.
    pub id: DomainId,
    /// The invalidation policy (forced to strict for untrusted devices).
    pub policy: InvalidationPolicy,
    /// True for a device assumed hostile (external port): always strict.
    pub untrusted: bool,
}

impl DomainConfig {
    /// A trusted domain with the given policy.
    pub const fn new(id: DomainId, policy: InvalidationPolicy) -> Self {
        Self { id, policy, untrusted: false }
    }

    /// The policy the domain really applies: strict for untrusted devices.
    pub const fn effective_policy(&self) -> InvalidationPolicy {
        if self.untrusted { InvalidationPolicy::Strict } else { self.policy }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_domains_are_always_strict() {
        let mut c = DomainConfig::new(1, InvalidationPolicy::deferred());
        assert_eq!(c.effective_policy(), InvalidationPolicy::deferred());
        c.untrusted = true;
        assert_eq!(c.effective_policy(), InvalidationPolicy::Strict);
    }
}
