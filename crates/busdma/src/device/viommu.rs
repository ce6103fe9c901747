//! One call attaches a virtio-iommu endpoint: [`ViommuDevice::attach`], the request-driven
//! counterpart of [`super::Iommu::attach`].
//!
//! # Theory
//!
//! 1. **Why a separate handle.** [`super::Iommu`] builds a page table and points the device's
//!    context at it ([`super::IommuHw::attach_tables`]); virtio-iommu has no table the driver
//!    owns, only ATTACH/MAP/UNMAP/DETACH requests ([`crate::virtio_iommu`]), so its domain is
//!    a [`ViommuDomain`], not a page-table `Domain`. The handle here gives a driver the same
//!    shape: one call with a [`Policy`] (and a [`DeviceConfig`]), tags from the handle, the
//!    domain kept alive by every tag and map.
//! 2. **Lifetime.** [`ViommuDevice`] and the strategy handle its tags hold
//!    ([`ViommuAttachment`]) share one `Arc` of the domain. The domain's drop (after the last
//!    tag, map and window are gone) flushes its queued UNMAPs and sends DETACH; a forgotten map
//!    keeps the endpoint attached (a leak, never a reuse: the memory a map loaded is the
//!    caller's, and it was unmapped before its unload returned, strict, or is flushed before
//!    its IOVA or pages are reused, deferred).
//! 3. **Policies.** [`Policy::Strict`] and [`Policy::Deferred`] (bounded by
//!    [`DeviceConfig::deferred`]) map each load (`IommuPerMap`). Untrusted (sub-page bouncing
//!    needs the IOMMU's bounce zones), identity (a MAP of every page used) and bypass (the
//!    BYPASS feature is not negotiated: busdma turns bypass off) are refused with
//!    [`Error::Unsupported`] before any request.
#![deny(unsafe_code)]

use alloc::sync::Arc;

use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::error::{Error, Result};
use crate::front::strategy::{Invalidation, IommuOps, IommuPerMap};
use crate::front::{Tag, TagSpec};
use crate::pgtable::Prot;
use crate::platform::{CpuGuard, Platform};
use crate::virtio_iommu::{ViommuDomain, ViommuTicket, VirtioIommu};

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

/// The strategy of a virtio-iommu endpoint's tags.
pub type ViommuStrategy<'v, 'p, P> = IommuPerMap<ViommuAttachment<'v, 'p, P>>;

/// A tag served by a virtio-iommu endpoint ([`ViommuDevice::tag`]).
pub type ViommuTag<'v, 'p, P> = Tag<'p, P, ViommuStrategy<'v, 'p, P>>;

/// A virtio-iommu endpoint attached to a domain of its own (module theory).
pub struct ViommuDevice<'v, 'p, P: Platform> {
    unit: &'v VirtioIommu<'p, P>,
    dom: ViommuAttachment<'v, 'p, P>,
    policy: Policy,
}

impl<'v, 'p, P: Platform> ViommuDevice<'v, 'p, P> {
    /// Attaches `endpoint` (its PCI requester id) with `policy`: a domain over `cfg.aperture`
    /// (default: from [`DEFAULT_APERTURE_START`] to the top of the device's input range),
    /// PROBE's reserved regions kept out, ATTACH sent. Process context; allocates; spins on
    /// the request queue.
    ///
    /// Errors: [`Error::Unsupported`] (untrusted, identity, bypass; nothing sent); those of
    /// [`ViommuDomain::new`] (the device's request errors, an aperture outside its input
    /// range, [`Error::NoMemory`]).
    pub fn attach(
        unit: &'v VirtioIommu<'p, P>,
        endpoint: u32,
        policy: Policy,
        cfg: DeviceConfig,
    ) -> Result<Self> {
        let invalidation = match policy {
            Policy::Strict => crate::iommu::InvalidationPolicy::Strict,
            Policy::Deferred => cfg.deferred,
            Policy::Untrusted => return Err(Error::Unsupported { what: "untrusted virtio-iommu endpoint" }),
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
        let dom = ViommuDomain::new(unit, endpoint, aperture, invalidation)?;
        Ok(Self { unit, dom: ViommuAttachment(Arc::new(dom)), policy })
    }

    /// A root tag of the endpoint with `spec` (loads mapped per map in its domain).
    ///
    /// Errors: those of [`Tag::new_root`] (an invalid spec).
    pub fn tag(&self, spec: TagSpec) -> Result<ViommuTag<'v, 'p, P>> {
        Tag::new_root(self.unit.platform(), IommuPerMap(self.dom.clone()), spec)
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
}
