//! `iommu-per-segment`: one IOVA allocation per physical run (seed 002's first attempt, kept
//! as the baseline it was measured against).
//!
//! # Theory
//!
//! 1. **Load**: for each run, allocate an IOVA range covering its pages, place the run at its
//!    page offset in it; then build the segments; then map. `n` runs cost `n` allocator calls:
//!    the cost seed 002 measured at 700 → 20 Mbit/s.
//! 2. **Unload**: one `unmap` of every range, freeing them all after one invalidation.
//! 3. **Failure** frees what was allocated (unmapped ranges directly, mapped ones through
//!    unmap).
#![deny(unsafe_code)] // allowed only where the strategy calls `IommuOps`' unsafe mapping methods

use alloc::vec::Vec;

use crate::addr::{AddrRange, Iova, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::platform::Platform;

use super::iommu::{
    IommuOps, builder_error, check_untrusted, coherence_index, iova_limit, max_runs, prot_of, window_align,
};
use super::{Invalidation, Strategy};
use crate::dir::Direction;
use crate::front::load::{MemKind, Run};
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::TagSpec;

/// The per-segment strategy over domain handle `D`.
#[derive(Clone, Debug)]
pub struct IommuPerSegment<D>(pub D);

/// Per-map state: one IOVA range per run of the current load.
#[derive(Debug)]
pub struct PerSegmentState {
    ranges: Vec<AddrRange<Iova>>,
}

impl PerSegmentState {
    /// The IOVA ranges of the current load.
    pub fn ranges(&self) -> &[AddrRange<Iova>] {
        &self.ranges
    }
}

#[allow(unsafe_code)]
impl<P: Platform, D: IommuOps<P> + Clone> Strategy<P> for IommuPerSegment<D> {
    const NAME: &'static str = "iommu-per-segment";
    type MapState = PerSegmentState;

    fn invalidation(&self) -> Invalidation {
        self.0.invalidation()
    }

    fn unload_revokes(&self) -> bool {
        true
    }

    fn wait_unmapped(&self, p: &P) -> Result<()> {
        self.0.wait_unmapped(&p.pin_cpu())
    }

    fn create(&self, _p: &P, spec: &TagSpec) -> Result<PerSegmentState> {
        let mut ranges = Vec::new();
        let n = max_runs(spec);
        ranges.try_reserve_exact(n).map_err(|_| Error::NoMemory { requested: (n * 16) as u64 })?;
        Ok(PerSegmentState { ranges })
    }

    fn load(
        &self,
        p: &P,
        spec: &TagSpec,
        st: &mut PerSegmentState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        check_untrusted(spec, runs)?;
        let d = &self.0;
        let align = window_align(spec);
        st.ranges.clear();
        let g = p.pin_cpu();
        let placed = (|| {
            for r in runs {
                if let MemKind::PeerBar { bus: Some(b) } = r.kind {
                    segs.push(b.raw(), r.len).map_err(|e| builder_error(r, e))?;
                    continue;
                }
                let off = r.pa.page_offset();
                let size = (off + r.len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
                let range = d.alloc_iova(&g, size, align, iova_limit(d, spec))?;
                // INVARIANT: at most one range per run; capacity is the run bound.
                st.ranges.push(range);
                segs.push(range.start().raw() + off, r.len).map_err(|e| builder_error(r, e))?;
            }
            segs.check()
        })();
        if let Err(e) = placed {
            for &r in &st.ranges {
                // SAFETY: each range came from `alloc_iova` above; nothing is mapped yet.
                unsafe { d.free_iova(&g, r) };
            }
            st.ranges.clear();
            return Err(e);
        }
        let mut i = 0;
        for r in runs {
            if let MemKind::PeerBar { bus: Some(_) } = r.kind {
                continue;
            }
            let range = st.ranges[i];
            let pa = r.pa.page_base();
            let prot = prot_of(r.kind, dir, spec.flags);
            // SAFETY: the run's own range from `alloc_iova` above, sized to its pages; the run
            // is this load's memory (the Strategy contract).
            if let Err(e) = unsafe { d.map(&g, range.start(), pa, range.len(), prot) } {
                // SAFETY: the ranges mapped so far, and every range this load allocated.
                let _ = unsafe { d.unmap(&g, &st.ranges[..i], &st.ranges) };
                st.ranges.clear();
                return Err(e);
            }
            d.set_coherence_index(range, coherence_index(r, -(r.pa.page_offset() as i64)));
            i += 1;
        }
        Ok(())
    }

    fn unload(&self, p: &P, st: &mut PerSegmentState, _runs: &[Run], _segs: &[Segment]) -> Result<()> {
        let mut r = Ok(());
        if !st.ranges.is_empty() {
            let g = p.pin_cpu();
            // SAFETY: the load's own ranges, all mapped by its load, given up here.
            r = unsafe { self.0.unmap(&g, &st.ranges, &st.ranges) }.map(|_| ());
        }
        st.ranges.clear();
        r
    }

    fn destroy(&self, _p: &P, _st: PerSegmentState) {}
}
