//! `iommu-reserved`: IOVA window and table levels reserved at map create (seed 002's open
//! idea: "reserve IOVA during bus_dmamap_create(9)").
//!
//! # Theory
//!
//! 1. **Create** allocates a window of `max_size + max_segments × max(PAGE_SIZE, alignment)`
//!    bytes (the layout's waste bound, [`super::iommu`] theory 3) and installs every table
//!    level over it, so load and unload touch only leaf entries: no allocator call, no table
//!    allocation, on the per-packet path.
//! 2. **Load** lays the runs out at the window's start and maps leaves; **unload** clears them
//!    with one `unmap` that frees nothing (the window stays the map's) and keeps the ticket.
//! 3. **Reuse under deferred invalidation.** The next load may reuse IOVAs whose unmap is
//!    still queued: a device could reach the old pages through a stale IOTLB entry *and* now
//!    the new ones through the same IOVA, which is only harmless if the old invalidation has
//!    completed. So load first calls `ensure_flushed` on the previous unload's ticket (a no-op
//!    once the queue has been drained, a flush otherwise). Under strict invalidation the ticket
//!    is already complete. The cost of this (a forced flush per reuse when maps are recycled
//!    faster than the queue drains) is what `dmalab bench map` shows in its deferred rows.
//!    **Alternating windows** ([`IommuReserved::alternating`]): with `n` windows used in
//!    turn, a load waits for the unload of `n` loads ago; one forced flush completes every
//!    queued unload, so at most one load in `n` pays for a flush, for `n` times the IOVA.
//! 4. **Destroy** waits for each window's last invalidation, then frees the windows.
#![deny(unsafe_code)] // allowed only where the strategy calls `IommuOps`' unsafe mapping methods

use alloc::vec::Vec;

use crate::addr::{AddrRange, Iova, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::platform::Platform;

use super::iommu::{IommuOps, iova_limit, max_runs, window_align};
use super::per_map::{map_runs, push_segments};
use super::{Invalidation, Strategy};
use crate::dir::Direction;
use crate::front::load::Run;
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::TagSpec;

/// The reserved-window strategy over domain handle `D`.
#[derive(Clone, Debug)]
pub struct IommuReserved<D> {
    domain: D,
    windows: usize,
}

impl<D> IommuReserved<D> {
    /// One window per map.
    pub fn new(domain: D) -> Self {
        Self { domain, windows: 1 }
    }

    /// `n` (≥ 1) windows per map, used in turn (theory 3).
    pub fn alternating(domain: D, n: usize) -> Self {
        Self { domain, windows: n.max(1) }
    }
}

/// Per-map state: the windows with their last unload's ticket, the one in use, what the
/// current load mapped.
#[derive(Debug)]
pub struct ReservedState<T> {
    windows: Vec<(AddrRange<Iova>, Option<T>)>,
    cur: usize,
    mapped: Vec<AddrRange<Iova>>,
}

impl<T> ReservedState<T> {
    /// The window the current (or next) load uses.
    pub fn window(&self) -> AddrRange<Iova> {
        self.windows[self.cur].0
    }

    /// Every window of the map.
    pub fn windows(&self) -> impl Iterator<Item = AddrRange<Iova>> + '_ {
        self.windows.iter().map(|w| w.0)
    }
}

/// The window size for `spec` (theory 1).
pub fn window_size(spec: &TagSpec) -> Result<u64> {
    let per_seg = window_align(spec);
    let waste = per_seg
        .checked_mul(u64::from(spec.max_segments))
        .ok_or(Error::Overflow { base: per_seg, len: u64::from(spec.max_segments) })?;
    let raw = spec.max_size.checked_add(waste).ok_or(Error::Overflow { base: spec.max_size, len: waste })?;
    raw.checked_next_multiple_of(PAGE_SIZE).ok_or(Error::Overflow { base: raw, len: PAGE_SIZE })
}

#[allow(unsafe_code)]
impl<P: Platform, D: IommuOps<P> + Clone> Strategy<P> for IommuReserved<D> {
    const NAME: &'static str = "iommu-reserved";
    type MapState = ReservedState<<D as IommuOps<P>>::Ticket>;

    fn invalidation(&self) -> Invalidation {
        self.domain.invalidation()
    }

    fn unload_revokes(&self) -> bool {
        true
    }

    fn wait_unmapped(&self, p: &P) -> Result<()> {
        self.domain.wait_unmapped(&p.pin_cpu())
    }

    fn create(&self, p: &P, spec: &TagSpec) -> Result<Self::MapState> {
        let d = &self.domain;
        let g = p.pin_cpu();
        let mut mapped = Vec::new();
        let n = max_runs(spec);
        mapped.try_reserve_exact(n).map_err(|_| Error::NoMemory { requested: (n * 16) as u64 })?;
        let mut windows = Vec::new();
        windows
            .try_reserve_exact(self.windows)
            .map_err(|_| Error::NoMemory { requested: (self.windows * 32) as u64 })?;
        let size = window_size(spec)?;
        for _ in 0..self.windows {
            let w = d.alloc_iova(&g, size, window_align(spec), iova_limit(d, spec)).and_then(|w| {
                // SAFETY: `w` came from `alloc_iova` just now and is this map's.
                match unsafe { d.reserve_tables(&g, w) } {
                    Ok(()) => Ok(w),
                    Err(e) => {
                        // SAFETY: `w` is this map's, nothing mapped in it.
                        unsafe { d.free_iova(&g, w) };
                        Err(e)
                    }
                }
            });
            match w {
                Ok(w) => windows.push((w, None)),
                Err(e) => {
                    for (w, _) in windows {
                        // SAFETY: the windows allocated above, nothing mapped in them.
                        unsafe { d.free_iova(&g, w) };
                    }
                    return Err(e);
                }
            }
        }
        Ok(ReservedState { windows, cur: 0, mapped })
    }

    #[inline]
    fn load(
        &self,
        p: &P,
        spec: &TagSpec,
        st: &mut Self::MapState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        super::iommu::check_untrusted(spec, runs)?;
        let d = &self.domain;
        let align = window_align(spec);
        let (window, pending) = &mut st.windows[st.cur];
        let base = window.start().raw();
        // One pass builds the segments and sizes the layout; nothing is mapped before the
        // size is checked against the window.
        let size = push_segments(runs, align, base, segs)?;
        if size > window.len() {
            return Err(Error::Exhausted { size, limit: window.len() });
        }
        let g = p.pin_cpu();
        if let Some(t) = *pending {
            // The IOMMU failed the flush: the window may still be cached, so it stays unused.
            d.ensure_flushed(&g, t)?;
            *pending = None;
        }
        // SAFETY: the window is this map's (allocated at create, reserved, never freed while
        // the map lives), empty (its last unmap is flushed: `ensure_flushed` above), and the
        // layout was checked to fit it; the runs are this load's.
        if let Err(e) = unsafe { map_runs(d, &g, runs, align, base, dir, spec.flags, &mut st.mapped) } {
            if !st.mapped.is_empty() {
                // SAFETY: the ranges just mapped in this map's window; the window is kept.
                *pending = unsafe { d.unmap(&g, &st.mapped, &[]) }.ok();
            }
            st.mapped.clear();
            return Err(e);
        }
        Ok(())
    }

    #[inline]
    fn unload(&self, p: &P, st: &mut Self::MapState, _runs: &[Run], _segs: &[Segment]) -> Result<()> {
        let mut r = Ok(());
        if !st.mapped.is_empty() {
            let g = p.pin_cpu();
            // On a failed invalidation the ticket is lost, but the domain is degraded: its
            // next map (into this window too) first completes a whole-domain invalidation.
            // SAFETY: the ranges this map's load mapped in its own window, which it keeps.
            let t = unsafe { self.domain.unmap(&g, &st.mapped, &[]) };
            st.windows[st.cur].1 = t.as_ref().ok().copied();
            r = t.map(|_| ());
        }
        st.mapped.clear();
        st.cur = (st.cur + 1) % st.windows.len();
        r
    }

    fn destroy(&self, p: &P, st: Self::MapState) {
        let g = p.pin_cpu();
        for (w, t) in st.windows {
            if let Some(t) = t {
                if self.domain.ensure_flushed(&g, t).is_err() {
                    // Never proven unreachable: the window's IOVA is leaked, never reused.
                    continue;
                }
            }
            // SAFETY: the map's own window, unloaded (nothing mapped), its last unmap proven
            // flushed just above; given up as the map is destroyed.
            unsafe { self.domain.free_iova(&g, w) };
        }
    }
}

impl<P: Platform, D: IommuOps<P> + Clone> super::iommu::WindowSource<P> for IommuReserved<D> {
    type Ops = D;
    fn window_ops(&self) -> Result<D> {
        Ok(self.domain.clone())
    }
}
