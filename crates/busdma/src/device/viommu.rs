//! One call attaches a virtio-iommu endpoint: [`ViommuDevice::attach`], the request-driven
//! counterpart of [`super::Iommu::attach`]; behind [`super::DmaDevice`] a driver cannot tell
//! them apart (module theory 8).
//!
//! # Theory
//!
//! 1. **Why a separate attach.** [`super::Iommu`] builds a page table and points the device's
//!    context at it ([`super::IommuHw::attach_tables`]); virtio-iommu has no table the driver
//!    owns, only ATTACH/MAP/UNMAP/DETACH requests ([`crate::virtio_iommu`]), so its domain is
//!    a [`ViommuDomain`], not a page-table `Domain`, and the attach is its own call. What the
//!    driver gets back has the same shape: [`ViommuDevice`] implements
//!    [`super::DmaDevice`] (tags from the handle, the policy, the id, the detach), so a
//!    driver generic over that trait runs unchanged on VT-d, SMMUv3 and virtio-iommu.
//! 2. **Lifetime.** [`ViommuDevice`] and the strategy handle its tags hold
//!    ([`ViommuAttachment`]) share one `Arc` of the domain. The domain's drop (after the last
//!    tag, map and window are gone) flushes its queued UNMAPs and sends DETACH; a forgotten map
//!    keeps the endpoint attached (a leak, never a reuse: the memory a map loaded is the
//!    caller's, and it was unmapped before its unload returned, strict, or is flushed before
//!    its IOVA or pages are reused, deferred). [`ViommuDevice::detach`] does the same now and
//!    reports: `Busy` (the device handed back) while a tag or map holds the domain.
//! 3. **Policies.** [`Policy::Strict`] and [`Policy::Deferred`] (bounded by
//!    [`DeviceConfig::deferred`]: UNMAPs queue and go out in batches, one notification per
//!    queue-full) map each load (`IommuPerMap`, [`ViommuStrategy::PerMap`]).
//!    [`Policy::Untrusted`] ([`ViommuStrategy::Untrusted`]) is the table IOMMUs' untrusted
//!    policy over requests: the domain is [`ViommuDomain::new_untrusted`] (strict whatever
//!    [`DeviceConfig::deferred`] says, so every UNMAP has completed when its unload returns;
//!    a never-mapped guard page after every load's IOVA), every tag is
//!    [`crate::front::TagFlags::untrusted`], and sub-page runs are bounced
//!    (`Bounced::over_iommu`) through the bounce zones and quick maps the *unit* owns
//!    ([`VirtioIommu::bounce_zones`], `crate::virtio_iommu` theory 9), shared by all its
//!    endpoints as an [`super::Iommu`]'s are by its devices, so no endpoint pins bounce
//!    memory of its own: the device sees the buffer and zeros, never a neighbour. A bounce
//!    page goes back to its zone when the domain's unmap returns, before the front end's own
//!    untrusted wait (`front::map` theory 8) runs, which is why the domain itself must be
//!    strict: its UNMAP has completed by then (a failed UNMAP keeps the page out forever).
//!    The others are refused with [`Error::Unsupported`] before any request is sent:
//!    - *identity*: every page a load touches would cost a MAP request at its physical
//!      address, kept reference counted; the table IOMMUs do that in memory, here it would be
//!      a VM exit per page with nothing gained over strict;
//!    - *bypass*: the spec lets an endpoint bypass only through the BYPASS feature or an
//!      ATTACH with the bypass flag (BYPASS_CONFIG); busdma negotiates neither (the unit turns
//!      bypass off, [`crate::virtio_iommu`] theory 2), as the VT-d driver refuses pass-through:
//!      a device that reaches all of memory is never one safe call away.
#![deny(unsafe_code)]

use alloc::sync::Arc;

use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::bounce::Bounced;
use crate::error::{Error, Result};
use crate::front::strategy::{Invalidation, IommuOps, IommuPerMap};
use crate::front::{Tag, TagSpec};
use crate::pgtable::Prot;
use crate::platform::{CpuGuard, Platform};
use crate::virtio_iommu::{ViommuDomain, ViommuTicket, VirtioIommu};

use super::common::{DetachError, DmaDevice};
use super::viommu_strategy::ViommuStrategy;
use super::{DEFAULT_APERTURE_START, DeviceConfig, Policy};

/// The domain of an attached virtio-iommu endpoint, as the IOMMU strategies (and the
/// pre-mapped pool) hold it: a reference-counted handle that keeps the attachment alive.
pub struct ViommuAttachment<'v, 'p, P: Platform>(Arc<ViommuDomain<'v, 'p, P>>);

impl<P: Platform> Clone for ViommuAttachment<'_, '_, P> {
    #[inline]
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<'v, 'p, P: Platform> ViommuAttachment<'v, 'p, P> {
    /// The domain.
    #[inline]
    pub fn domain(&self) -> &ViommuDomain<'v, 'p, P> {
        &self.0
    }

    #[inline]
    fn ops(&self) -> &ViommuDomain<'v, 'p, P> {
        &self.0
    }
}

// SAFETY: every method forwards to the `&ViommuDomain` implementation of the endpoint's own
// domain (front/strategy/viommu.rs), whose answers `IommuOps` trusts; the `Arc` keeps that
// domain alive for as long as any handle exists.
#[allow(unsafe_code)]
unsafe impl<P: Platform> IommuOps<P> for ViommuAttachment<'_, '_, P> {
    type Ticket = ViommuTicket;

    #[inline]
    fn invalidation(&self) -> Invalidation {
        IommuOps::<P>::invalidation(&self.ops())
    }
    #[inline]
    fn max_iova(&self) -> u64 {
        IommuOps::<P>::max_iova(&self.ops())
    }
    #[inline]
    fn alloc_iova(&self, g: &CpuGuard<'_, P>, size: u64, align: u64, limit: u64) -> Result<AddrRange<Iova>> {
        self.ops().alloc_iova(g, size, align, limit)
    }
    #[inline]
    unsafe fn free_iova(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) {
        // SAFETY: our caller's contract is the forwarded one.
        unsafe { self.ops().free_iova(g, range) }
    }
    #[inline]
    unsafe fn map(&self, g: &CpuGuard<'_, P>, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<()> {
        // SAFETY: our caller's contract is the forwarded one.
        unsafe { IommuOps::<P>::map(&self.ops(), g, iova, pa, len, prot) }
    }
    #[inline]
    unsafe fn unmap(
        &self,
        g: &CpuGuard<'_, P>,
        mapped: &[AddrRange<Iova>],
        free: &[AddrRange<Iova>],
    ) -> Result<ViommuTicket> {
        // SAFETY: our caller's contract is the forwarded one.
        unsafe { IommuOps::<P>::unmap(&self.ops(), g, mapped, free) }
    }
    #[inline]
    fn ensure_flushed(&self, g: &CpuGuard<'_, P>, ticket: ViommuTicket) -> Result<()> {
        IommuOps::<P>::ensure_flushed(&self.ops(), g, ticket)
    }
    #[inline]
    fn wait_unmapped(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        IommuOps::<P>::wait_unmapped(&self.ops(), g)
    }
    #[inline]
    fn is_flushed(&self, ticket: ViommuTicket) -> bool {
        IommuOps::<P>::is_flushed(&self.ops(), ticket)
    }
    #[inline]
    unsafe fn reserve_tables(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<()> {
        // SAFETY: our caller's contract is the forwarded one.
        unsafe { IommuOps::<P>::reserve_tables(&self.ops(), g, range) }
    }
}

/// A tag served by a virtio-iommu endpoint ([`ViommuDevice::tag`]).
pub type ViommuTag<'v, 'p, P> = Tag<'v, P, ViommuStrategy<'v, 'p, P>>;

/// A virtio-iommu endpoint attached to a domain of its own (module theory).
pub struct ViommuDevice<'v, 'p, P: Platform> {
    unit: &'v VirtioIommu<'p, P>,
    endpoint: u32,
    dom: ViommuAttachment<'v, 'p, P>,
    policy: Policy,
}

impl<'v, 'p, P: Platform> ViommuDevice<'v, 'p, P> {
    /// Attaches `endpoint` (its PCI requester id) with `policy`: a domain over `cfg.aperture`
    /// (default: from [`DEFAULT_APERTURE_START`] to the top of the device's input range),
    /// PROBE's reserved regions kept out, ATTACH sent; [`Policy::Untrusted`]: the domain is
    /// [`ViommuDomain::new_untrusted`] (module theory 3). Process context; allocates; spins
    /// on the request queue.
    ///
    /// Errors: [`Error::Unsupported`] (identity, bypass; nothing sent); those of
    /// [`ViommuDomain::new`] (the device's request errors, an aperture outside its input
    /// range, [`Error::NoMemory`]).
    pub fn attach(
        unit: &'v VirtioIommu<'p, P>,
        endpoint: u32,
        policy: Policy,
        cfg: DeviceConfig,
    ) -> Result<Self> {
        let invalidation = match policy {
            Policy::Strict | Policy::Untrusted => crate::iommu::InvalidationPolicy::Strict,
            Policy::Deferred => cfg.deferred,
            Policy::Identity => {
                return Err(Error::Unsupported { what: "identity-mapped virtio-iommu endpoint" });
            }
            Policy::Bypass => {
                return Err(Error::Unsupported { what: "virtio-iommu bypass (not negotiated)" });
            }
        };
        let aperture = match cfg.aperture {
            Some(a) => a,
            None => {
                let input = unit.input_range()?;
                AddrRange::new(Iova::new(DEFAULT_APERTURE_START.max(input.start().raw())), input.end())?
            }
        };
        let dom = if policy == Policy::Untrusted {
            ViommuDomain::new_untrusted(unit, endpoint, aperture)?
        } else {
            ViommuDomain::new(unit, endpoint, aperture, invalidation)?
        };
        Ok(Self { unit, endpoint, dom: ViommuAttachment(Arc::new(dom)), policy })
    }

    /// A root tag of the endpoint with `spec` (loads mapped per map in its domain; an
    /// untrusted endpoint's tags are always untrusted, their sub-page runs bounced: module
    /// theory 3).
    ///
    /// Errors: those of [`Tag::new_root`] (an invalid spec).
    pub fn tag(&self, mut spec: TagSpec) -> Result<ViommuTag<'v, 'p, P>> {
        let per_map = IommuPerMap(self.dom.clone());
        let s = if self.policy == Policy::Untrusted {
            spec.flags.untrusted = true;
            let unit = self.unit;
            ViommuStrategy::Untrusted(Bounced::over_iommu(per_map, unit.bounce_zones(), unit.quick_maps()))
        } else {
            ViommuStrategy::PerMap(per_map)
        };
        Tag::new_root(self.unit.platform(), s, spec)
    }

    /// The domain handle (for a pre-mapped pool of the endpoint, say).
    pub fn attachment(&self) -> &ViommuAttachment<'v, 'p, P> {
        &self.dom
    }

    /// The domain.
    pub fn domain(&self) -> &ViommuDomain<'v, 'p, P> {
        self.dom.domain()
    }

    /// The policy it was attached with.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The endpoint (its PCI requester id).
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// The unit it is attached to.
    pub fn unit(&self) -> &'v VirtioIommu<'p, P> {
        self.unit
    }

    /// Detaches the endpoint now (module theory 2): queued UNMAPs sent, then DETACH.
    ///
    /// Errors: [`DetachError::Busy`] if tags, maps or windows of the device hold its domain:
    /// the device is handed back, still attached, nothing sent. [`DetachError::Failed`] with
    /// the device's request error ([`ViommuDomain::detach`]).
    pub fn detach(self) -> core::result::Result<(), DetachError<Self>> {
        let Self { unit, endpoint, dom, policy } = self;
        match Arc::try_unwrap(dom.0) {
            Ok(d) => d.detach().map_err(DetachError::Failed),
            Err(a) => {
                let handles = Arc::strong_count(&a).saturating_sub(1);
                let device = Self { unit, endpoint, dom: ViommuAttachment(a), policy };
                Err(DetachError::Busy { device, handles })
            }
        }
    }
}

// The driver-facing trait: the inherent methods above (module theory 1).
impl<'v, 'p, P: Platform> DmaDevice<'v> for ViommuDevice<'v, 'p, P> {
    type Platform = P;
    type Strategy = ViommuStrategy<'v, 'p, P>;
    type DeviceId = u32;

    fn platform(&self) -> &'v P {
        self.unit.platform()
    }

    fn id(&self) -> u32 {
        self.endpoint
    }

    fn policy(&self) -> Policy {
        self.policy
    }

    fn tag(&self, spec: TagSpec) -> Result<ViommuTag<'v, 'p, P>> {
        ViommuDevice::tag(self, spec)
    }

    fn detach(self) -> core::result::Result<(), DetachError<Self>> {
        ViommuDevice::detach(self)
    }
}
