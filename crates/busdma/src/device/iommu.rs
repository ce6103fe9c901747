//! The IOMMU object: one per IOMMU, created by the kernel; attaches devices.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{AddrRange, Iova};
use crate::bounce::{BounceZones, ZoneConfig};
use crate::error::{Error, Result};
use crate::iommu::{Domain, DomainConfig, InvalidationPolicy};
use crate::iova::{IovaAllocator, IovaConfig};
use crate::pgtable::{PageTable, PageTableConfig, TablePool};
use crate::platform::Platform;
use crate::quickmap::QuickMaps;

use super::Policy;
use super::handle::Device;
use super::hw::IommuHw;
use super::peer::{PeerHandle, PeerRegistry};

/// Lowest IOVA a device's default aperture hands out: 1 MiB. IOVA 0 stays unmapped so a
/// device given a null bus address faults, and the low megabyte (legacy ISA and firmware
/// ranges, which some platforms reserve in every domain) is left out wholesale; what it costs
/// is 256 pages of a space of at least 2^39 bytes.
pub const DEFAULT_APERTURE_START: u64 = 1 << 20;

/// How a device is attached, beyond its policy. [`Default`] is what a driver wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The IOVA range the device's loads are placed in; `None`: from
    /// [`DEFAULT_APERTURE_START`] to the top of the hardware's input width. Clipped to the
    /// input width ([`crate::Error::InvalidArgument`] if nothing is left).
    pub aperture: Option<AddrRange<Iova>>,
    /// The bounds of a [`Policy::Deferred`] domain's flush queues.
    pub deferred: InvalidationPolicy,
    /// Per-CPU IOVA caches in front of the allocator's tree (on by default).
    pub iova_caches: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self { aperture: None, deferred: InvalidationPolicy::deferred(), iova_caches: true }
    }
}

/// Counters of an [`Iommu`] (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuStats {
    /// Successful attaches.
    pub attached: u64,
    /// Completed detaches (domain freed, id given back).
    pub detached: u64,
    /// Detaches whose invalidation failed: the domain, its tables and its id were leaked,
    /// never reused (theory 5).
    pub leaked_domains: u64,
}

/// An IOMMU as devices are attached to it (module theory 2): the hardware, the table pool
/// its domains share, and the bounce zones of its untrusted devices.
///
/// `'p` is the platform's lifetime; devices borrow the IOMMU itself.
pub struct Iommu<'p, H: IommuHw> {
    platform: &'p H::Platform,
    quick_maps: &'p QuickMaps,
    hw: H,
    pool: TablePool<'p, H::Platform>,
    zones: BounceZones<'p, H::Platform>,
    attached: AtomicU64,
    detached: AtomicU64,
    leaked: AtomicU64,
    peers: PeerRegistry,
}

impl<'p, H: IommuHw> Iommu<'p, H> {
    /// Takes over `hw`, an IOMMU in front of `platform`'s memory; `quick_maps` is the
    /// machine's quick-map state (bounce copies of untrusted devices use it).
    ///
    /// Errors: [`Error::InvalidArgument`] if `hw` reads another platform's memory.
    pub fn new(platform: &'p H::Platform, quick_maps: &'p QuickMaps, hw: H) -> Result<Self> {
        if !core::ptr::eq(platform, hw.platform()) {
            return Err(Error::InvalidArgument { what: "IOMMU of another platform", value: 0 });
        }
        Ok(Self {
            platform,
            quick_maps,
            hw,
            pool: TablePool::new(platform),
            zones: BounceZones::new(platform, ZoneConfig::default()),
            attached: AtomicU64::new(0),
            detached: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
            peers: PeerRegistry::new(),
        })
    }

    /// The hardware.
    pub fn hw(&self) -> &H {
        &self.hw
    }

    /// The platform.
    pub fn platform(&self) -> &'p H::Platform {
        self.platform
    }

    /// The table pool every domain of this IOMMU draws from.
    pub fn pool(&self) -> &TablePool<'p, H::Platform> {
        &self.pool
    }

    /// The bounce zones of untrusted devices.
    pub fn bounce_zones(&self) -> &BounceZones<'p, H::Platform> {
        &self.zones
    }

    pub(super) fn quick_maps(&self) -> &'p QuickMaps {
        self.quick_maps
    }

    /// Registers a peer device's BAR at bus addresses `bar` (page-aligned): from now on no
    /// domain of this IOMMU hands out IOVA inside it (module theory 7), and loads of the
    /// peer's BAR (a `DeviceRegion` of kind `PeerBar`) are counted against the registration.
    ///
    /// Errors: [`Error::Misaligned`], [`Error::ZeroSize`], [`Error::InvalidArgument`] for a
    /// range overlapping a registered peer (naming that peer's start), [`Error::NoMemory`].
    pub fn register_peer(&self, bar: AddrRange<Iova>) -> Result<PeerHandle> {
        self.peers.register(bar)
    }

    /// Unregisters a peer: new domains stop reserving its range (module theory 7: existing
    /// domains keep the hole).
    ///
    /// Errors: [`Error::Busy`] (with the number of loaded runs) while loads reach the BAR,
    /// [`Error::BadState`] for a handle of another IOMMU; the handle comes back with it.
    pub fn unregister_peer(&self, h: PeerHandle) -> core::result::Result<(), (Error, PeerHandle)> {
        self.peers.unregister(h)
    }

    /// The registered peer BARs' ranges.
    pub fn peer_ranges(&self) -> alloc::vec::Vec<AddrRange<Iova>> {
        self.peers.ranges()
    }

    pub(super) fn peers(&self) -> &PeerRegistry {
        &self.peers
    }

    /// The counters.
    pub fn stats(&self) -> IommuStats {
        IommuStats {
            attached: self.attached.load(Ordering::Relaxed),
            detached: self.detached.load(Ordering::Relaxed),
            leaked_domains: self.leaked.load(Ordering::Relaxed),
        }
    }

    pub(super) fn count_detached(&self) {
        self.detached.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_leaked(&self) {
        self.leaked.fetch_add(1, Ordering::Relaxed);
    }

    /// Attaches `dev` with `policy` and the default [`DeviceConfig`].
    ///
    /// Errors: as [`Iommu::attach_with`].
    pub fn attach<'i>(&'i self, dev: H::DeviceId, policy: Policy) -> Result<Device<'i, 'p, H>> {
        self.attach_with(dev, policy, DeviceConfig::default())
    }

    /// Attaches `dev` with `policy`: builds its page table in the hardware's format, its IOVA
    /// allocator over the aperture, its domain, and points the device at it (module theory
    /// 3). Process context; allocates; never sleeps.
    ///
    /// Errors: the hardware's ([`Error::AlreadyMapped`] for a device attached already, through
    /// this call or any other; [`Error::Unsupported`] for a bypass the hardware cannot do;
    /// [`Error::Exhausted`] when no domain id is left); [`Error::InvalidArgument`] (an
    /// aperture beyond the input width, deferred bounds of zero); [`Error::NoMemory`].
    pub fn attach_with<'i>(
        &'i self,
        dev: H::DeviceId,
        policy: Policy,
        cfg: DeviceConfig,
    ) -> Result<Device<'i, 'p, H>> {
        let d = if policy == Policy::Bypass {
            self.hw.attach_bypass(dev)?;
            Device::bypass(self, dev)
        } else {
            self.attach_translated(dev, policy, &cfg)?
        };
        self.attached.fetch_add(1, Ordering::Relaxed);
        Ok(d)
    }

    fn attach_translated<'i>(
        &'i self,
        dev: H::DeviceId,
        policy: Policy,
        cfg: &DeviceConfig,
    ) -> Result<Device<'i, 'p, H>> {
        let input_bits = self.hw.input_bits();
        let top = if input_bits >= 64 { u64::MAX } else { 1u64 << input_bits };
        let space = match cfg.aperture {
            Some(a) => a,
            None => AddrRange::new(Iova::new(DEFAULT_APERTURE_START), Iova::new(top))?,
        };
        if space.end().raw() > top {
            return Err(Error::InvalidArgument {
                what: "device aperture beyond the IOMMU's input width",
                value: space.end().raw(),
            });
        }
        let iova = IovaAllocator::new(
            space,
            IovaConfig {
                cpus: self.platform.num_cpus(),
                caches: cfg.iova_caches,
                // A hostile device must not run off the end of one buffer into the next.
                guard_page: policy == Policy::Untrusted,
            },
        )?;
        let (invalidation, untrusted) = match policy {
            Policy::Deferred => (cfg.deferred, false),
            Policy::Untrusted => (InvalidationPolicy::Strict, true),
            _ => (InvalidationPolicy::Strict, false),
        };
        let id = self.hw.alloc_domain_id()?;
        let table = match PageTable::<'_, H::Platform, H::Format>::new(
            &self.pool,
            PageTableConfig { input_bits, coherent_walker: self.hw.coherent_walker() },
        ) {
            Ok(t) => t,
            Err(e) => {
                self.hw.free_domain_id(id);
                return Err(e);
            }
        };
        let domain = match Domain::new(
            self.platform,
            table,
            iova,
            &self.hw,
            DomainConfig { id, policy: invalidation, untrusted },
        ) {
            Ok(d) => d,
            Err(e) => {
                // The table was never attached: dropping it frees pages no device saw.
                self.hw.free_domain_id(id);
                return Err(e);
            }
        };
        Device::attach_domain(self, dev, policy, domain)
    }
}
