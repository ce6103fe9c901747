//! Strategies: how a load's physical runs become bus addresses.
//!
//! # Theory
//!
//! 1. **One trait, one type per strategy.** [`Strategy`] has four steps matching the map's
//!    life: `create` (reserve what can be reserved), `load` (place runs in bus space, feeding
//!    the segment builder), `unload` (undo exactly what `load` did) and `destroy` (release the
//!    reservation). A tag is generic over its strategy, so the per-packet path is monomorphic:
//!    no virtual call, no allocation (per-map state lives in the map, sized at create).
//! 2. **A failed load leaves nothing behind.** `load` either succeeds or returns the strategy's
//!    per-map state to what `create` left, having released every IOVA, entry and reference it
//!    took.
//! 3. **The strategies** (see each file's theory):
//!    - [`direct`]: no IOMMU; the bus address is the physical address; memory the device
//!      cannot reach (beyond the DMA mask, misaligned) needs a bounce: [`bounce_hook`].
//!    - `iommu_per_segment`, `iommu_per_map`, `iommu_reserved`, `identity`: through an IOMMU
//!      domain ([`IommuOps`]).
//! 4. **The bounce hook.** Every "this run cannot be given to the device as it is" decision
//!    goes through [`bounce_hook`], which names the run and the reason. A plain strategy fails
//!    there with [`Error::Unsupported`]; bounce buffering is [`crate::bounce::Bounced`], which
//!    wraps a strategy, moves such runs into bounce pages before the strategy sees them, and
//!    does its copies in [`Strategy::sync`]. A run without a page and without a kernel mapping
//!    can never be bounced and fails with a message saying so.
#![deny(unsafe_code)]

pub mod direct;
pub mod domain;
pub mod identity;
pub mod iommu;
pub mod page_refs;
pub mod per_map;
pub mod per_segment;
pub mod reserve_levels;
pub mod reserved;
#[cfg(feature = "virtio-iommu")]
pub mod viommu;

use crate::error::{Error, Result};
use crate::platform::Platform;

use super::load::Run;
use super::segments::{Segment, SegmentBuilder};
use super::spec::TagSpec;
use crate::dir::Direction;
use crate::dir::SyncOp;

pub use direct::Direct;
pub use identity::Identity;
pub use iommu::{IommuOps, WindowSource};
pub use per_map::IommuPerMap;
pub use per_segment::IommuPerSegment;
pub use reserved::IommuReserved;

/// How a strategy invalidates IOTLBs (for reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// No IOMMU, nothing to invalidate.
    None,
    /// One ranged invalidation before unload returns.
    Strict,
    /// Queued, completed in batches later.
    Deferred,
}

impl Invalidation {
    /// The lower-case name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Invalidation::None => "none",
            Invalidation::Strict => "strict",
            Invalidation::Deferred => "deferred",
        }
    }
}

/// A way of turning physical runs into bus addresses. See the module theory.
pub trait Strategy<P: Platform>: Clone + Send + Sync {
    /// The strategy's name in reports (`direct`, `iommu-per-map`, ...).
    const NAME: &'static str;

    /// Per-map state (an IOVA range, a reserved window, ...), created at map create. `Send`:
    /// a map may be created on one CPU and used or destroyed on another, and a deferred load
    /// is completed by whichever thread frees its resources (`front::defer`).
    type MapState: Send;

    /// The invalidation mode (for reports).
    fn invalidation(&self) -> Invalidation;

    /// Whether an unload takes the loaded memory away from the device: once `unload` (and,
    /// under deferred invalidation, the flush it queued) completed, no bus address the load
    /// handed out reaches that memory. True for the IOMMU strategies that map each load
    /// (per-map, per-segment, reserved) and for copies into memory the device owns instead
    /// (the pre-mapped pool); false (the default) where the device keeps reaching it: no
    /// IOMMU, identity pages. Clients that free memory a device may still be using after an
    /// unload (`busdma::virtio`'s reclaim of shares a reset driver left posted) ask it first;
    /// a strategy must not answer true unless it is so.
    fn unload_revokes(&self) -> bool {
        false
    }

    /// Checks that the strategy can serve a root tag's spec (an IOMMU aperture that covers
    /// the mask, say). Defaults to accepting.
    fn check_tag(&self, _p: &P, _spec: &TagSpec) -> Result<()> {
        Ok(())
    }

    /// Creates a map's state (reserving resources if the strategy reserves).
    fn create(&self, p: &P, spec: &TagSpec) -> Result<Self::MapState>;

    /// Places `runs` (at least one, coalesced, total ≤ `spec.max_size`) in bus space, pushing
    /// the bus runs into `segs` in order. On error, `state` is as `create` left it and every
    /// resource the call took is released.
    fn load(
        &self,
        p: &P,
        spec: &TagSpec,
        state: &mut Self::MapState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()>;

    /// Undoes a successful `load` of `runs` whose segments were `segs`. The unload is complete
    /// whatever it returns.
    ///
    /// Errors: the IOMMU failed the unload's invalidation ([`Error::InvalidationFailed`]):
    /// what the unload frees is held back by the domain until a later invalidation succeeds
    /// (`busdma::iommu::Domain`, theory 8), and the caller may act on it (retry a flush, stop
    /// the device).
    fn unload(&self, p: &P, state: &mut Self::MapState, runs: &[Run], segs: &[Segment]) -> Result<()>;

    /// Releases the map's state (the map is unloaded).
    fn destroy(&self, p: &P, state: Self::MapState);

    /// Returns once every unload of this strategy's maps that returned before the call is
    /// complete in the IOTLB: no device can reach what those loads mapped. Nothing to do
    /// without an IOMMU or under strict invalidation; a deferred domain flushes if an unmap
    /// is still queued. Registries wait on it before unpinning (the unpin barrier,
    /// `pin/mod.rs` theory 7). Process context; may spin while an invalidation completes.
    ///
    /// Errors: [`crate::Error::InvalidationFailed`] if the IOMMU failed that invalidation; the
    /// caller must keep the memory away from reuse (`pin/mod.rs` theory 8).
    fn wait_unmapped(&self, p: &P) -> Result<()>;

    /// The strategy's part of a sync of bytes `range` of the load (the whole load, or the
    /// part [`DmaMap::sync_range`](super::map::DmaMap::sync_range) names, already checked to
    /// lie within it), after the front end's cache maintenance of those bytes (bounce copies:
    /// `busdma::bounce::Bounced`). Defaults to nothing.
    fn sync(
        &self,
        _p: &P,
        _spec: &TagSpec,
        _state: &Self::MapState,
        _op: SyncOp,
        _range: core::ops::Range<u64>,
    ) -> Result<()> {
        Ok(())
    }
}

/// Why a run cannot be given to the device as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BounceReason {
    /// Some byte lies beyond the tag's DMA mask.
    BeyondMask,
    /// The run would open a segment at a bus address the tag's alignment forbids.
    Misaligned,
    /// An untrusted device would see the rest of a partially used page.
    UntrustedSubPage,
}

/// The bounce hook: called for every run that needs bouncing, with the reason.
///
/// A strategy reaches it only when not wrapped in [`crate::bounce::Bounced`] (which removes
/// such runs first): [`Error::Unsupported`] naming the reason, or, for a run that has neither
/// a page nor a kernel mapping (seed 003's entries), the error that such a run can never be
/// bounced.
pub fn bounce_hook(run: &Run, reason: BounceReason) -> Error {
    if !run.kind.bounceable() {
        return Error::Unsupported {
            what: "bounce of a run with no page and no kernel mapping (cannot be copied)",
        };
    }
    Error::Unsupported {
        what: match reason {
            BounceReason::BeyondMask => {
                "run beyond the tag's DMA mask needs bouncing (wrap the strategy in bounce::Bounced)"
            }
            BounceReason::Misaligned => {
                "run misaligned for the tag needs bouncing (wrap the strategy in bounce::Bounced)"
            }
            BounceReason::UntrustedSubPage => {
                "sub-page run for an untrusted device needs bouncing (wrap in bounce::Bounced)"
            }
        },
    }
}
