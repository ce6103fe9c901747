//! `iommu-per-map`: one IOVA allocation for the whole load (seed 002's fix).
//!
//! # Theory
//!
//! 1. **Load**: lay the runs out ([`super::iommu::layout`]) to size the window, allocate it
//!    once, build the segments (failing before anything is mapped if the tag forbids them),
//!    then map each run's new pages. One allocator call per load, however many segments: the
//!    change that took seed 002's tcpbench from 20 back to 700 Mbit/s.
//! 2. **Unload**: one `unmap` of the mapped ranges (usually one range) that also frees the
//!    window after its invalidation: strict, one ranged invalidation per load.
//! 3. **Failure** midway through mapping unmaps what was mapped and frees the window through
//!    the same path, so the IOVA is reused only after the invalidation.
#![deny(unsafe_code)] // allowed only where the strategy calls `IommuOps`' unsafe mapping methods

use alloc::vec::Vec;

use crate::addr::{AddrRange, Iova};
use crate::error::{Error, Result};
use crate::platform::{CpuGuard, Platform};

use super::iommu::{
    IommuOps, Place, builder_error, check_untrusted, coherence_index, iova_limit, layout, max_runs, prot_of,
    push_range, window_align,
};
use super::{Invalidation, Strategy};
use crate::dir::Direction;
use crate::front::load::Run;
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::{TagFlags, TagSpec};

/// The per-map strategy over domain handle `D`.
#[derive(Clone, Debug)]
pub struct IommuPerMap<D>(pub D);

/// Per-map state: the window of the current load and the ranges mapped in it.
#[derive(Debug)]
pub struct PerMapState {
    window: Option<AddrRange<Iova>>,
    mapped: Vec<AddrRange<Iova>>,
}

impl PerMapState {
    /// The IOVA window of the current load.
    pub fn window(&self) -> Option<AddrRange<Iova>> {
        self.window
    }
}

/// Maps the runs into the window at `base` per the layout, recording ranges in `mapped`.
///
/// # Safety
///
/// The caller holds the window `[base, base + layout size)` exclusively, nothing is mapped in
/// it, and the runs are the memory of a load (a load source's promise or an owned buffer).
#[allow(unsafe_code)]
// Eight plain values on the hot path; a struct of them would be built and torn down per load.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn map_runs<P: Platform, D: IommuOps<P>>(
    d: &D,
    g: &CpuGuard<'_, P>,
    runs: &[Run],
    align: u64,
    base: u64,
    dir: Direction,
    flags: TagFlags,
    mapped: &mut Vec<AddrRange<Iova>>,
) -> Result<()> {
    mapped.clear();
    layout(runs, align, |r, place| {
        if let Place::At { off, map_start, map_end, pa } = place {
            if map_end > map_start {
                let prot = prot_of(r.kind, dir, flags);
                // SAFETY: inside the caller's window (the layout stays within its size), each
                // page mapped once; the runs are the load's (this fn's contract).
                unsafe { d.map(g, Iova::new(base + map_start), pa, map_end - map_start, prot)? };
                push_range(mapped, base + map_start, base + map_end)?;
                let range = AddrRange::new(Iova::new(base + map_start), Iova::new(base + map_end))?;
                d.set_coherence_index(range, coherence_index(r, map_start as i64 - off as i64));
            }
        }
        Ok(())
    })
    .map(|_| ())
}

/// Pushes the segments of the layout at `base` into `segs`; returns the window size the
/// layout needs.
pub(crate) fn push_segments(
    runs: &[Run],
    align: u64,
    base: u64,
    segs: &mut SegmentBuilder<'_>,
) -> Result<u64> {
    let size = layout(runs, align, |r, place| {
        let (a, l) = match place {
            Place::Bypass(b) => (b.raw(), r.len),
            Place::At { off, .. } => (base + off, r.len),
        };
        segs.push(a, l).map_err(|e| builder_error(r, e))
    })?;
    segs.check()?;
    Ok(size)
}

#[allow(unsafe_code)]
impl<P: Platform, D: IommuOps<P> + Clone> Strategy<P> for IommuPerMap<D> {
    const NAME: &'static str = "iommu-per-map";
    type MapState = PerMapState;

    fn invalidation(&self) -> Invalidation {
        self.0.invalidation()
    }

    fn unload_revokes(&self) -> bool {
        true
    }

    fn wait_unmapped(&self, p: &P) -> Result<()> {
        self.0.wait_unmapped(&p.pin_cpu())
    }

    fn create(&self, _p: &P, spec: &TagSpec) -> Result<PerMapState> {
        let mut mapped = Vec::new();
        let n = max_runs(spec);
        mapped.try_reserve_exact(n).map_err(|_| Error::NoMemory { requested: (n * 16) as u64 })?;
        Ok(PerMapState { window: None, mapped })
    }

    fn load(
        &self,
        p: &P,
        spec: &TagSpec,
        st: &mut PerMapState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        check_untrusted(spec, runs)?;
        let d = &self.0;
        let align = window_align(spec);
        let size = layout(runs, align, |_, _| Ok(()))?;
        if size == 0 {
            // Only bypass runs: nothing to map.
            return push_segments(runs, align, 0, segs).map(|_| ());
        }
        let g = p.pin_cpu();
        let window = d.alloc_iova(&g, size, align, iova_limit(d, spec))?;
        let base = window.start().raw();
        if let Err(e) = push_segments(runs, align, base, segs) {
            // SAFETY: the window came from `alloc_iova` just above; nothing is mapped in it.
            unsafe { d.free_iova(&g, window) };
            return Err(e);
        }
        // SAFETY: the window came from `alloc_iova` just above and was sized by the same
        // layout; the runs are this load's (the Strategy contract).
        if let Err(e) = unsafe { map_runs(d, &g, runs, align, base, dir, spec.flags, &mut st.mapped) } {
            // SAFETY: what `map_runs` mapped lies in this load's window, which it gives back.
            let _ = unsafe { d.unmap(&g, &st.mapped, &[window]) };
            st.mapped.clear();
            return Err(e);
        }
        st.window = Some(window);
        Ok(())
    }

    fn unload(&self, p: &P, st: &mut PerMapState, _runs: &[Run], _segs: &[Segment]) -> Result<()> {
        let mut r = Ok(());
        if let Some(w) = st.window.take() {
            let g = p.pin_cpu();
            // SAFETY: the load's own window and the ranges it mapped in it, given up here.
            r = unsafe { self.0.unmap(&g, &st.mapped, &[w]) }.map(|_| ());
        }
        st.mapped.clear();
        r
    }

    fn destroy(&self, _p: &P, _st: PerMapState) {}
}
