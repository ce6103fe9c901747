//! [`ViommuStrategy`]: the strategy of a virtio-iommu endpoint's tags, per map or untrusted
//! (`viommu.rs`, theory 3), as [`super::DeviceStrategy`] is for the table IOMMUs.
#![deny(unsafe_code)]

use crate::bounce::{Bounced, BouncedState};
use crate::error::{Error, Result};
use crate::front::cache_sync::SyncOp;
use crate::front::load::Run;
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::strategy::per_map::PerMapState;
use crate::front::strategy::{Invalidation, IommuPerMap, Strategy, WindowSource};
use crate::front::{Direction, TagSpec};
use crate::platform::Platform;

use super::viommu::ViommuAttachment;

/// The strategy of a virtio-iommu endpoint's tags: one variant per kind of policy, a `match`
/// per call. Both hold the endpoint's attachment, so tags and maps keep the domain alive.
pub enum ViommuStrategy<'v, 'p, P: Platform> {
    /// Strict or deferred: per-map IOVA in the endpoint's domain.
    PerMap(IommuPerMap<ViommuAttachment<'v, 'p, P>>),
    /// Untrusted: per-map IOVA in a strict, guard-paged domain, sub-page runs bounced first
    /// through the unit's zones.
    Untrusted(Bounced<'v, 'p, P, IommuPerMap<ViommuAttachment<'v, 'p, P>>>),
}

impl<P: Platform> Clone for ViommuStrategy<'_, '_, P> {
    fn clone(&self) -> Self {
        match self {
            Self::PerMap(s) => Self::PerMap(s.clone()),
            Self::Untrusted(s) => Self::Untrusted(s.clone()),
        }
    }
}

impl<'v, 'p, P: Platform> ViommuStrategy<'v, 'p, P> {
    /// The endpoint's attachment.
    pub fn attachment(&self) -> &ViommuAttachment<'v, 'p, P> {
        match self {
            Self::PerMap(s) => &s.0,
            Self::Untrusted(s) => &s.inner().0,
        }
    }
}

/// Per-map state of a [`ViommuStrategy`]: the state of the variant that created it.
pub enum ViommuMapState<'p, P: Platform> {
    /// Of [`ViommuStrategy::PerMap`].
    PerMap(PerMapState),
    /// Of [`ViommuStrategy::Untrusted`].
    Untrusted(BouncedState<'p, P, PerMapState>),
}

/// A state handed to a strategy variant that did not create it: a front-end bug, reported
/// rather than panicking.
#[cold]
fn mismatch() -> Error {
    Error::BadState { what: "virtio-iommu map state of another strategy variant" }
}

impl<'v, 'p, P: Platform> Strategy<P> for ViommuStrategy<'v, 'p, P> {
    const NAME: &'static str = "viommu";
    type MapState = ViommuMapState<'p, P>;

    #[inline]
    fn invalidation(&self) -> Invalidation {
        match self {
            Self::PerMap(s) => Strategy::<P>::invalidation(s),
            Self::Untrusted(s) => s.invalidation(),
        }
    }

    fn unload_revokes(&self) -> bool {
        true
    }

    fn check_tag(&self, p: &P, spec: &TagSpec) -> Result<()> {
        match self {
            Self::PerMap(s) => s.check_tag(p, spec),
            Self::Untrusted(s) => s.check_tag(p, spec),
        }
    }

    fn create(&self, p: &P, spec: &TagSpec) -> Result<Self::MapState> {
        Ok(match self {
            Self::PerMap(s) => ViommuMapState::PerMap(s.create(p, spec)?),
            Self::Untrusted(s) => ViommuMapState::Untrusted(s.create(p, spec)?),
        })
    }

    #[inline]
    fn load(
        &self,
        p: &P,
        spec: &TagSpec,
        state: &mut Self::MapState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        match (self, state) {
            (Self::PerMap(s), ViommuMapState::PerMap(m)) => s.load(p, spec, m, runs, dir, segs),
            (Self::Untrusted(s), ViommuMapState::Untrusted(m)) => s.load(p, spec, m, runs, dir, segs),
            _ => Err(mismatch()),
        }
    }

    #[inline]
    fn unload(&self, p: &P, state: &mut Self::MapState, runs: &[Run], segs: &[Segment]) -> Result<()> {
        match (self, state) {
            (Self::PerMap(s), ViommuMapState::PerMap(m)) => s.unload(p, m, runs, segs),
            (Self::Untrusted(s), ViommuMapState::Untrusted(m)) => s.unload(p, m, runs, segs),
            _ => Err(mismatch()),
        }
    }

    fn destroy(&self, p: &P, state: Self::MapState) {
        match (self, state) {
            (Self::PerMap(s), ViommuMapState::PerMap(m)) => s.destroy(p, m),
            (Self::Untrusted(s), ViommuMapState::Untrusted(m)) => s.destroy(p, m),
            // A foreign state (a front-end bug) is dropped: never created by this strategy,
            // it holds nothing of it.
            _ => {}
        }
    }

    fn wait_unmapped(&self, p: &P) -> Result<()> {
        match self {
            Self::PerMap(s) => s.wait_unmapped(p),
            Self::Untrusted(s) => s.wait_unmapped(p),
        }
    }

    #[inline]
    fn sync(
        &self,
        p: &P,
        spec: &TagSpec,
        state: &Self::MapState,
        op: SyncOp,
        range: core::ops::Range<u64>,
    ) -> Result<()> {
        match (self, state) {
            (Self::PerMap(s), ViommuMapState::PerMap(m)) => s.sync(p, spec, m, op, range),
            (Self::Untrusted(s), ViommuMapState::Untrusted(m)) => s.sync(p, spec, m, op, range),
            _ => Err(mismatch()),
        }
    }
}

/// An endpoint's tags lend its domain to two-step windows ([`crate::front::window`]), whatever
/// the policy (an untrusted tag's windows link whole pages only, as on the table IOMMUs).
impl<'v, 'p, P: Platform> WindowSource<P> for ViommuStrategy<'v, 'p, P> {
    type Ops = ViommuAttachment<'v, 'p, P>;

    fn window_ops(&self) -> Result<Self::Ops> {
        Ok(self.attachment().clone())
    }
}
