//! [`DeviceStrategy`]: one strategy type for a device's tags, whatever its policy.

use crate::bounce::{Bounced, BouncedState};
use crate::error::{Error, Result};
use crate::front::cache_sync::SyncOp;
use crate::front::load::Run;
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::strategy::identity::IdentityState;
use crate::front::strategy::per_map::PerMapState;
use crate::front::strategy::{Direct, Identity, Invalidation, IommuPerMap, Strategy};
use crate::front::{Direction, TagSpec};

use super::handle::{DeviceBypass, DeviceDomain};
use super::hw::IommuHw;
use super::iommu::Iommu;

/// The strategy of a device's tags (module theory 3): one variant per kind of policy, a
/// `match` per call. Every variant holds a handle to the device's attachment, so tags and
/// maps keep the domain alive.
pub enum DeviceStrategy<'i, 'p, H: IommuHw> {
    /// Strict or deferred: per-map IOVA in the device's domain.
    PerMap(IommuPerMap<DeviceDomain<'i, 'p, H>>),
    /// Untrusted: per-map IOVA, sub-page runs bounced first.
    Untrusted(Bounced<'i, 'p, H::Platform, IommuPerMap<DeviceDomain<'i, 'p, H>>>),
    /// Identity-mapped pages.
    Identity(Identity<DeviceDomain<'i, 'p, H>>),
    /// Pass-through: bus address = physical address.
    Bypass(Direct, DeviceBypass<'i, 'p, H>),
}

impl<H: IommuHw> Clone for DeviceStrategy<'_, '_, H> {
    fn clone(&self) -> Self {
        match self {
            Self::PerMap(s) => Self::PerMap(s.clone()),
            Self::Untrusted(s) => Self::Untrusted(s.clone()),
            Self::Identity(s) => Self::Identity(s.clone()),
            Self::Bypass(s, b) => Self::Bypass(*s, b.clone()),
        }
    }
}

impl<'i, 'p, H: IommuHw> DeviceStrategy<'i, 'p, H> {
    /// The peer registry of the device's IOMMU (module theory 7).
    fn peers(&self) -> &super::peer::PeerRegistry {
        match self {
            Self::PerMap(s) => s.0.peers(),
            Self::Untrusted(s) => s.inner().0.peers(),
            Self::Identity(s) => s.domain().peers(),
            Self::Bypass(_, b) => b.peers(),
        }
    }

    pub(super) fn untrusted(inner: IommuPerMap<DeviceDomain<'i, 'p, H>>, iommu: &'i Iommu<'p, H>) -> Self {
        Self::Untrusted(Bounced::over_iommu(inner, iommu.bounce_zones(), iommu.quick_maps()))
    }
}

/// Per-map state of a [`DeviceStrategy`]: the state of the variant that created it.
pub enum DeviceMapState<'p, P: crate::platform::Platform> {
    /// Of [`DeviceStrategy::PerMap`].
    PerMap(PerMapState),
    /// Of [`DeviceStrategy::Untrusted`].
    Untrusted(BouncedState<'p, P, PerMapState>),
    /// Of [`DeviceStrategy::Identity`].
    Identity(IdentityState),
    /// Of [`DeviceStrategy::Bypass`].
    Bypass,
}

/// A state handed to a strategy variant that did not create it: a front-end bug, reported
/// rather than panicking.
#[cold]
fn mismatch() -> Error {
    Error::BadState { what: "device map state of another strategy variant" }
}

impl<'i, 'p, H: IommuHw> Strategy<H::Platform> for DeviceStrategy<'i, 'p, H> {
    const NAME: &'static str = "device";
    type MapState = DeviceMapState<'p, H::Platform>;

    #[inline]
    fn invalidation(&self) -> Invalidation {
        match self {
            Self::PerMap(s) => Strategy::<H::Platform>::invalidation(s),
            Self::Untrusted(s) => s.invalidation(),
            Self::Identity(s) => Strategy::<H::Platform>::invalidation(s),
            Self::Bypass(s, _) => Strategy::<H::Platform>::invalidation(s),
        }
    }

    fn unload_revokes(&self) -> bool {
        matches!(self, Self::PerMap(_) | Self::Untrusted(_))
    }

    fn check_tag(&self, p: &H::Platform, spec: &TagSpec) -> Result<()> {
        match self {
            Self::PerMap(s) => s.check_tag(p, spec),
            Self::Untrusted(s) => s.check_tag(p, spec),
            Self::Identity(s) => s.check_tag(p, spec),
            Self::Bypass(s, _) => s.check_tag(p, spec),
        }
    }

    fn create(&self, p: &H::Platform, spec: &TagSpec) -> Result<Self::MapState> {
        Ok(match self {
            Self::PerMap(s) => DeviceMapState::PerMap(s.create(p, spec)?),
            Self::Untrusted(s) => DeviceMapState::Untrusted(s.create(p, spec)?),
            Self::Identity(s) => DeviceMapState::Identity(s.create(p, spec)?),
            Self::Bypass(s, _) => {
                Strategy::<H::Platform>::create(s, p, spec)?;
                DeviceMapState::Bypass
            }
        })
    }

    #[inline]
    fn load(
        &self,
        p: &H::Platform,
        spec: &TagSpec,
        state: &mut Self::MapState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        match (self, state) {
            (Self::PerMap(s), DeviceMapState::PerMap(m)) => s.load(p, spec, m, runs, dir, segs),
            (Self::Untrusted(s), DeviceMapState::Untrusted(m)) => s.load(p, spec, m, runs, dir, segs),
            (Self::Identity(s), DeviceMapState::Identity(m)) => s.load(p, spec, m, runs, dir, segs),
            (Self::Bypass(s, _), DeviceMapState::Bypass) => s.load(p, spec, &mut (), runs, dir, segs),
            _ => Err(mismatch()),
        }?;
        self.peers().count_loads(runs, true);
        Ok(())
    }

    #[inline]
    fn unload(
        &self,
        p: &H::Platform,
        state: &mut Self::MapState,
        runs: &[Run],
        segs: &[Segment],
    ) -> Result<()> {
        let r = match (self, state) {
            (Self::PerMap(s), DeviceMapState::PerMap(m)) => s.unload(p, m, runs, segs),
            (Self::Untrusted(s), DeviceMapState::Untrusted(m)) => s.unload(p, m, runs, segs),
            (Self::Identity(s), DeviceMapState::Identity(m)) => s.unload(p, m, runs, segs),
            (Self::Bypass(s, _), DeviceMapState::Bypass) => s.unload(p, &mut (), runs, segs),
            _ => return Err(mismatch()),
        };
        // An unload unloads all the same when it reports an error (the front end's rule).
        self.peers().count_loads(runs, false);
        r
    }

    fn destroy(&self, p: &H::Platform, state: Self::MapState) {
        match (self, state) {
            (Self::PerMap(s), DeviceMapState::PerMap(m)) => s.destroy(p, m),
            (Self::Untrusted(s), DeviceMapState::Untrusted(m)) => s.destroy(p, m),
            (Self::Identity(s), DeviceMapState::Identity(m)) => s.destroy(p, m),
            (Self::Bypass(s, _), DeviceMapState::Bypass) => Strategy::<H::Platform>::destroy(s, p, ()),
            // A foreign state (a front-end bug) is dropped: never created by this strategy,
            // it holds nothing of it.
            _ => {}
        }
    }

    fn wait_unmapped(&self, p: &H::Platform) -> Result<()> {
        match self {
            Self::PerMap(s) => s.wait_unmapped(p),
            Self::Untrusted(s) => s.wait_unmapped(p),
            Self::Identity(s) => s.wait_unmapped(p),
            Self::Bypass(s, _) => Strategy::<H::Platform>::wait_unmapped(s, p),
        }
    }

    #[inline]
    fn sync(
        &self,
        p: &H::Platform,
        spec: &TagSpec,
        state: &Self::MapState,
        op: SyncOp,
        range: core::ops::Range<u64>,
    ) -> Result<()> {
        match (self, state) {
            (Self::PerMap(s), DeviceMapState::PerMap(m)) => s.sync(p, spec, m, op, range),
            (Self::Untrusted(s), DeviceMapState::Untrusted(m)) => s.sync(p, spec, m, op, range),
            (Self::Identity(s), DeviceMapState::Identity(m)) => s.sync(p, spec, m, op, range),
            (Self::Bypass(s, _), DeviceMapState::Bypass) => s.sync(p, spec, &(), op, range),
            _ => Err(mismatch()),
        }
    }
}

/// A device's tags lend its domain to two-step windows ([`crate::front::window`]): strict,
/// deferred and untrusted policies have one (an untrusted tag's windows link whole pages
/// only); identity and pass-through do not.
impl<'i, 'p, H: IommuHw> crate::front::strategy::WindowSource<H::Platform> for DeviceStrategy<'i, 'p, H> {
    type Ops = DeviceDomain<'i, 'p, H>;

    fn window_ops(&self) -> Result<Self::Ops> {
        match self {
            Self::PerMap(s) => Ok(s.0.clone()),
            Self::Untrusted(s) => Ok(s.inner().0.clone()),
            Self::Identity(_) => {
                Err(Error::Unsupported { what: "two-step window on an identity-mapped device" })
            }
            Self::Bypass(..) => Err(Error::Unsupported { what: "two-step window on a pass-through device" }),
        }
    }
}
