//! `direct`: no IOMMU; the device emits physical addresses.
//!
//! # Theory
//!
//! 1. The bus address of a run is its physical address ([`crate::Iova::identity_of`]), or, for a
//!    peer BAR that carries one, its bypass bus address.
//! 2. Nothing is mapped, so load and unload touch no shared state: the whole cost is building
//!    segments.
//! 3. A run the device cannot reach (beyond the DMA mask) or that would start a segment
//!    misaligned goes to the bounce hook ([`super::bounce_hook`]), the one point where bounce
//!    buffering plugs in.
#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use crate::platform::Platform;

use super::{BounceReason, Invalidation, Strategy, bounce_hook};
use crate::dir::Direction;
use crate::front::load::{MemKind, Run};
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::TagSpec;

/// The direct strategy (stateless).
#[derive(Clone, Copy, Debug, Default)]
pub struct Direct;

impl<P: Platform> Strategy<P> for Direct {
    const NAME: &'static str = "direct";
    type MapState = ();

    fn invalidation(&self) -> Invalidation {
        Invalidation::None
    }

    /// Without an IOMMU there is no entry to make privileged-only: a privileged tag is
    /// refused rather than served unprotected.
    fn check_tag(&self, _p: &P, spec: &TagSpec) -> Result<()> {
        if spec.flags.privileged {
            return Err(Error::Unsupported { what: "privileged-only DMA without an IOMMU (direct)" });
        }
        Ok(())
    }

    fn create(&self, _p: &P, _spec: &TagSpec) -> Result<()> {
        Ok(())
    }

    #[inline]
    fn load(
        &self,
        _p: &P,
        _spec: &TagSpec,
        _state: &mut (),
        runs: &[Run],
        _dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        for run in runs {
            let bus = match run.kind {
                MemKind::PeerBar { bus: Some(b) } => b.raw(),
                _ => run.pa.raw(),
            };
            match segs.push(bus, run.len) {
                Ok(()) => {}
                Err(Error::OutOfRange { .. }) => return Err(bounce_hook(run, BounceReason::BeyondMask)),
                Err(Error::Misaligned { .. }) => return Err(bounce_hook(run, BounceReason::Misaligned)),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    #[inline]
    fn unload(&self, _p: &P, _state: &mut (), _runs: &[Run], _segs: &[Segment]) -> Result<()> {
        Ok(())
    }

    fn destroy(&self, _p: &P, _state: ()) {}

    fn wait_unmapped(&self, _p: &P) -> Result<()> {
        // No IOMMU: nothing is cached between the device and memory.
        Ok(())
    }
}
