//! The device handle, its attachment, and the domain handle its strategies hold.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::error::{Error, Result};
use crate::front::strategy::{Direct, Identity, Invalidation, IommuOps, IommuPerMap};
use crate::front::{Tag, TagSpec};
use crate::iommu::{CoherenceIndex, Domain, FlushTicket};
use crate::iova::IovaAllocator;
use crate::pgtable::Prot;
use crate::platform::{CpuGuard, Platform};
use crate::sync::SpinLock;

use super::common::{DetachError, DmaDevice};
use super::hw::IommuHw;
use super::iommu::Iommu;
use super::strategy::DeviceStrategy;
use super::{DeviceTag, Policy};

/// The domain type of a device of `H`.
pub(super) type Dom<'i, H> = Domain<'i, <H as IommuHw>::Platform, <H as IommuHw>::Format, IovaAllocator, H>;

/// A device attached through a domain (module theory 4 and 5).
///
/// # Invariants
///
/// - While `attached`, `dev`'s context points at `domain`'s tables.
/// - `domain` is dropped only after `dev` was detached and a whole-domain invalidation that
///   started after the detach completed; otherwise it is leaked (never dropped).
pub(super) struct Attached<'i, 'p, H: IommuHw> {
    iommu: &'i Iommu<'p, H>,
    dev: H::DeviceId,
    /// Whether the context still points at the tables (false once torn down, or if the
    /// hardware refused the attach).
    attached: bool,
    /// Whether the domain (and its id) still need the teardown.
    live: bool,
    domain: ManuallyDrop<Dom<'i, H>>,
    /// The peer registry generation this domain's reservations cover (module theory 7).
    peer_gen: AtomicU64,
    /// The peer ranges this domain reserved.
    peer_reserved: SpinLock<Vec<AddrRange<Iova>>>,
}

impl<H: IommuHw> Attached<'_, '_, H> {
    /// Reserves every registered peer range this domain has not reserved yet (module theory
    /// 7); one atomic load when nothing changed.
    #[inline]
    fn sync_peers(&self) -> Result<()> {
        let reg = self.iommu.peers();
        if self.peer_gen.load(Ordering::Acquire) == reg.generation() {
            return Ok(());
        }
        self.sync_peers_slow()
    }

    #[cold]
    fn sync_peers_slow(&self) -> Result<()> {
        let mut done = self.peer_reserved.lock();
        let mut ranges = Vec::new();
        let generation = self.iommu.peers().snapshot(&mut ranges)?;
        let iova = self.domain.iova();
        let space = iova.space();
        for r in ranges {
            if done.iter().any(|d| d.contains_range(&r)) {
                continue;
            }
            if let Some(clip) = r.intersection(&space) {
                iova.reserve(clip)?;
            }
            done.try_reserve(1).map_err(|_| Error::NoMemory { requested: 1 })?;
            done.push(r);
        }
        self.peer_gen.store(generation, Ordering::Release);
        Ok(())
    }
}

impl<'i, 'p, H: IommuHw> Attached<'i, 'p, H> {
    /// Module theory 4 and 5. Idempotent: a second call does nothing.
    fn teardown(&mut self) -> Result<()> {
        if !self.live {
            return Ok(());
        }
        self.live = false;
        let id = self.domain.id();
        let was_attached = self.attached;
        if self.attached {
            self.attached = false;
            if let Err(e) = self.iommu.hw().detach(self.dev, Some(id)) {
                // (a) failed: the device may still walk the tables. Leak them and the id.
                self.iommu.count_leaked();
                return Err(e);
            }
        }
        // (b): nothing names the domain any more; drain its queues and prove its IOTLB empty.
        let g = self.iommu.platform().pin_cpu();
        let done = self.domain.flush(&g).and_then(|()| self.iommu.hw().invalidate_all(id));
        drop(g);
        if let Err(e) = done {
            self.iommu.count_leaked();
            return Err(e);
        }
        // SAFETY: `live` was true, so the domain was never dropped, and it is never used again
        // (`live` is now false and nothing else reads `domain` after teardown: the last handle
        // is gone or being consumed). INVARIANT: the device was detached and the whole-domain
        // invalidation above started after it and completed (theory 4 (c)).
        #[allow(unsafe_code)]
        unsafe {
            ManuallyDrop::drop(&mut self.domain)
        };
        self.iommu.hw().free_domain_id(id);
        if was_attached {
            self.iommu.count_detached();
        }
        Ok(())
    }
}

impl<H: IommuHw> Drop for Attached<'_, '_, H> {
    fn drop(&mut self) {
        // A drop cannot report: a failure is counted, and what failed is leaked (theory 5).
        let _ = self.teardown();
    }
}

/// A device in bypass (no domain).
struct Bypassed<'i, 'p, H: IommuHw> {
    iommu: &'i Iommu<'p, H>,
    dev: H::DeviceId,
    live: bool,
}

impl<H: IommuHw> Bypassed<'_, '_, H> {
    fn teardown(&mut self) -> Result<()> {
        if !self.live {
            return Ok(());
        }
        self.live = false;
        match self.iommu.hw().detach(self.dev, None) {
            Ok(()) => {
                self.iommu.count_detached();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl<H: IommuHw> Drop for Bypassed<'_, '_, H> {
    fn drop(&mut self) {
        let _ = self.teardown();
    }
}

/// A device in bypass, as its tags hold it: keeps the pass-through attachment alive.
pub struct DeviceBypass<'i, 'p, H: IommuHw>(Arc<Bypassed<'i, 'p, H>>);

impl<H: IommuHw> Clone for DeviceBypass<'_, '_, H> {
    #[inline]
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

/// The domain of an attached device, as the IOMMU strategies use it: a reference-counted
/// handle that keeps the attachment (and so the domain and its tables) alive.
pub struct DeviceDomain<'i, 'p, H: IommuHw>(Arc<Attached<'i, 'p, H>>);

impl<H: IommuHw> Clone for DeviceDomain<'_, '_, H> {
    #[inline]
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<H: IommuHw> DeviceBypass<'_, '_, H> {
    pub(super) fn peers(&self) -> &super::peer::PeerRegistry {
        self.0.iommu.peers()
    }
}

impl<'i, 'p, H: IommuHw> DeviceDomain<'i, 'p, H> {
    pub(super) fn peers(&self) -> &super::peer::PeerRegistry {
        self.0.iommu.peers()
    }

    /// The domain.
    #[inline]
    pub fn domain(&self) -> &Dom<'i, H> {
        &self.0.domain
    }
}

// SAFETY: every method forwards to the `&Domain` implementation of the device's own domain,
// whose answers `IommuOps` trusts.
#[allow(unsafe_code)]
unsafe impl<'i, H: IommuHw> IommuOps<H::Platform> for DeviceDomain<'i, '_, H> {
    type Ticket = FlushTicket;

    #[inline]
    fn invalidation(&self) -> Invalidation {
        IommuOps::<H::Platform>::invalidation(&self.domain())
    }

    #[inline]
    fn max_iova(&self) -> u64 {
        IommuOps::<H::Platform>::max_iova(&self.domain())
    }

    #[inline]
    fn alloc_iova(
        &self,
        g: &CpuGuard<'_, H::Platform>,
        size: u64,
        align: u64,
        limit: u64,
    ) -> Result<AddrRange<Iova>> {
        self.0.sync_peers()?;
        IommuOps::alloc_iova(&self.domain(), g, size, align, limit)
    }

    #[inline]
    unsafe fn free_iova(&self, g: &CpuGuard<'_, H::Platform>, range: AddrRange<Iova>) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { IommuOps::free_iova(&self.domain(), g, range) }
    }

    #[inline]
    unsafe fn map(
        &self,
        g: &CpuGuard<'_, H::Platform>,
        iova: Iova,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
    ) -> Result<()> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { IommuOps::map(&self.domain(), g, iova, pa, len, prot) }
    }

    #[inline]
    unsafe fn unmap(
        &self,
        g: &CpuGuard<'_, H::Platform>,
        mapped: &[AddrRange<Iova>],
        free: &[AddrRange<Iova>],
    ) -> Result<FlushTicket> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { IommuOps::unmap(&self.domain(), g, mapped, free) }
    }

    #[inline]
    fn ensure_flushed(&self, g: &CpuGuard<'_, H::Platform>, ticket: FlushTicket) -> Result<()> {
        IommuOps::ensure_flushed(&self.domain(), g, ticket)
    }

    fn wait_unmapped(&self, g: &CpuGuard<'_, H::Platform>) -> Result<()> {
        IommuOps::wait_unmapped(&self.domain(), g)
    }

    #[inline]
    fn is_flushed(&self, ticket: FlushTicket) -> bool {
        IommuOps::<H::Platform>::is_flushed(&self.domain(), ticket)
    }

    unsafe fn reserve_tables(&self, g: &CpuGuard<'_, H::Platform>, range: AddrRange<Iova>) -> Result<()> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { IommuOps::reserve_tables(&self.domain(), g, range) }
    }

    #[inline]
    fn set_coherence_index(&self, range: AddrRange<Iova>, index: CoherenceIndex) {
        IommuOps::set_coherence_index(&self.domain(), range, index)
    }
}

/// How a device is attached, and what its tags are served by.
enum Kind<'i, 'p, H: IommuHw> {
    /// Strict, deferred or untrusted: loads mapped per map in the domain.
    PerMap(DeviceDomain<'i, 'p, H>),
    /// Identity: one reference table shared by every tag of the device (holding a second
    /// handle to the domain).
    Identity(DeviceDomain<'i, 'p, H>, Identity<DeviceDomain<'i, 'p, H>>),
    /// Pass-through.
    Bypass(DeviceBypass<'i, 'p, H>),
}

/// A device attached to an IOMMU (module theory 2): an owned, reference-counted handle.
/// Tags come from [`Device::tag`]; dropping the last handle (the device, its tags and maps)
/// detaches it.
pub struct Device<'i, 'p, H: IommuHw> {
    iommu: &'i Iommu<'p, H>,
    dev: H::DeviceId,
    policy: Policy,
    kind: Kind<'i, 'p, H>,
}

impl<'i, 'p, H: IommuHw> Device<'i, 'p, H> {
    pub(super) fn bypass(iommu: &'i Iommu<'p, H>, dev: H::DeviceId) -> Self {
        let b = DeviceBypass(Arc::new(Bypassed { iommu, dev, live: true }));
        Self { iommu, dev, policy: Policy::Bypass, kind: Kind::Bypass(b) }
    }

    /// Wraps `domain`, then points `dev` at it; on failure, drops the domain unattached.
    pub(super) fn attach_domain(
        iommu: &'i Iommu<'p, H>,
        dev: H::DeviceId,
        policy: Policy,
        domain: Dom<'i, H>,
    ) -> Result<Self> {
        let id = domain.id();
        let root = domain.table().root();
        let mut a = Attached {
            iommu,
            dev,
            attached: false,
            live: true,
            domain: ManuallyDrop::new(domain),
            peer_gen: AtomicU64::new(0),
            peer_reserved: SpinLock::new(Vec::new()),
        };
        // SAFETY: the tables at `root` belong to `a.domain`, which is dropped only by
        // `Attached::teardown`, after `dev` is detached and the detach returned `Ok` (or never,
        // if it fails); only the domain writes them. INVARIANT: `attached` is set below only
        // once the hardware points `dev` at them.
        #[allow(unsafe_code)]
        if let Err(e) = unsafe { iommu.hw().attach_tables(dev, id, root) } {
            // Never attached: the teardown skips the detach, invalidates the domain and frees it.
            drop(a);
            return Err(e);
        }
        a.attached = true;
        let d = DeviceDomain(Arc::new(a));
        let kind = match policy {
            Policy::Identity => Kind::Identity(d.clone(), Identity::new(d)),
            _ => Kind::PerMap(d),
        };
        Ok(Self { iommu, dev, policy, kind })
    }

    /// The device's id on its IOMMU.
    pub fn id(&self) -> H::DeviceId {
        self.dev
    }

    /// The policy it was attached with.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The IOMMU it is attached to.
    pub fn iommu(&self) -> &'i Iommu<'p, H> {
        self.iommu
    }

    /// The device's domain (`None` in bypass).
    pub fn domain(&self) -> Option<&DeviceDomain<'i, 'p, H>> {
        match &self.kind {
            Kind::PerMap(d) => Some(d),
            Kind::Identity(d, _) => Some(d),
            Kind::Bypass(_) => None,
        }
    }

    /// A root tag for the device's constraints `spec`, served by its domain (module theory
    /// 3). An untrusted device's tags are always untrusted.
    ///
    /// Errors: those of [`Tag::new_root`] (an invalid spec, a mask the domain cannot serve).
    pub fn tag(&self, mut spec: TagSpec) -> Result<DeviceTag<'i, 'p, H>> {
        let s = match &self.kind {
            Kind::PerMap(d) if self.policy == Policy::Untrusted => {
                spec.flags.untrusted = true;
                DeviceStrategy::untrusted(IommuPerMap(d.clone()), self.iommu)
            }
            Kind::PerMap(d) => DeviceStrategy::PerMap(IommuPerMap(d.clone())),
            Kind::Identity(_, i) => DeviceStrategy::Identity(i.clone()),
            Kind::Bypass(b) => DeviceStrategy::Bypass(Direct, b.clone()),
        };
        Tag::new_root(self.iommu.platform(), s, spec)
    }

    /// Detaches the device now (module theory 4), reporting failure.
    ///
    /// Errors: [`DetachError::Busy`] if tags or maps of the device are alive: the device is
    /// handed back, still attached. [`DetachError::Failed`] with the hardware's detach or
    /// invalidation error: the domain is leaked, never reused (theory 5).
    pub fn detach(self) -> core::result::Result<(), DetachError<Self>> {
        let Self { iommu, dev, policy, kind } = self;
        let busy = |kind, count: usize| {
            let device = Self { iommu, dev, policy, kind };
            Err(DetachError::Busy { device, handles: count.saturating_sub(1) })
        };
        let r = match kind {
            Kind::PerMap(DeviceDomain(a)) => match Arc::try_unwrap(a) {
                Ok(mut a) => a.teardown(),
                Err(a) => {
                    let n = Arc::strong_count(&a);
                    return busy(Kind::PerMap(DeviceDomain(a)), n);
                }
            },
            Kind::Identity(d, i) => {
                // `d` and `i` are the device's own two handles; no one else can clone them
                // while the count says they are the only ones (we own the device).
                let n = Arc::strong_count(&d.0);
                if n > 2 {
                    return busy(Kind::Identity(d, i), n - 1);
                }
                drop(i);
                match Arc::try_unwrap(d.0) {
                    Ok(mut a) => a.teardown(),
                    // Unreachable by the count above; the drop of the last handle detaches.
                    Err(_) => Ok(()),
                }
            }
            Kind::Bypass(DeviceBypass(b)) => match Arc::try_unwrap(b) {
                Ok(mut b) => b.teardown(),
                Err(b) => {
                    let n = Arc::strong_count(&b);
                    return busy(Kind::Bypass(DeviceBypass(b)), n);
                }
            },
        };
        r.map_err(DetachError::Failed)
    }
}

// The driver-facing trait: the inherent methods above, unchanged (module theory 8).
impl<'i, 'p, H: IommuHw> DmaDevice<'i> for Device<'i, 'p, H> {
    type Platform = H::Platform;
    type Strategy = DeviceStrategy<'i, 'p, H>;
    type DeviceId = H::DeviceId;

    fn platform(&self) -> &'i H::Platform {
        self.iommu.platform()
    }

    fn id(&self) -> H::DeviceId {
        Device::id(self)
    }

    fn policy(&self) -> Policy {
        Device::policy(self)
    }

    fn tag(&self, spec: TagSpec) -> Result<DeviceTag<'i, 'p, H>> {
        Device::tag(self, spec)
    }

    fn detach(self) -> core::result::Result<(), DetachError<Self>> {
        Device::detach(self)
    }
}
