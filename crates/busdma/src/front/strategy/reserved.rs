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
//!    not yet invalidated: a device could reach the old pages through a stale IOTLB entry
//!    *and* now the new ones through the same IOVA, which is only harmless if the old
//!    invalidation has completed. So load first calls `ensure_flushed` on the previous
//!    unload's ticket (a no-op once a flush has covered it, a flush otherwise). The unload
//!    queues nothing (it frees nothing): it is recorded on its CPU's record, which keeps the
//!    unpin barrier and the count and age bounds true for it (`iommu::flushq` rule 8). Under
//!    strict invalidation the ticket is already complete. The cost of this (a forced flush per
//!    reuse when maps are recycled faster than flushes come) is what `dmalab bench map` shows
//!    in its deferred rows.
//!    **Alternating windows** ([`IommuReserved::alternating`]): with `n` windows used in
//!    turn, a load waits for the unload of `n` loads ago; one forced flush completes every
//!    earlier unload, so at most one load in `n` pays for a flush, for `n` times the IOVA.
//! 4. **Destroy** waits for each window's last invalidation, then frees the windows.
//! 5. **Pinned windows** (a domain that has them, [`IommuOps::pin_window`]: busdma's own).
//!    Create also pins each window's last-level tables; a load then makes *one* layout pass
//!    that pushes the segments and lists each run's pages ([`PinnedRun`]), checks the size,
//!    and hands the list to [`IommuOps::map_pinned`], which writes the leaves straight into
//!    the pinned tables (no walk, no install, no per-run domain call); unload hands the same
//!    list to [`IommuOps::unmap_pinned`]. The window is used only through its pinned tables
//!    while the map lives, so they are never detached or freed under it (`pgtable`'s
//!    `LeafWindow` theory 2); destroy frees the window's IOVA after its last invalidation as
//!    before, the tables staying in the domain's page table, empty (a forgotten map leaks its
//!    window and frees nothing).
#![deny(unsafe_code)] // allowed only where the strategy calls `IommuOps`' unsafe mapping methods

use alloc::vec::Vec;

use crate::addr::{AddrRange, Iova, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::platform::Platform;

use super::iommu::{
    IommuOps, Layout, Place, builder_error, coherence_index, iova_limit, max_runs, prot_of, window_align,
};
use super::per_map::{map_runs, push_segments};
use super::{Invalidation, Strategy};
use crate::dir::Direction;
use crate::front::load::Run;
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::TagSpec;
use crate::iommu::PinnedRun;
use crate::pgtable::LeafWindow;

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
    /// Each window's pinned tables (theory 5), empty when the domain has none.
    pinned: Vec<LeafWindow>,
    cur: usize,
    mapped: Vec<AddrRange<Iova>>,
    /// The current load's runs in a pinned window.
    runs: Vec<PinnedRun>,
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

    /// Whether the windows' tables are pinned (theory 5).
    pub fn pinned(&self) -> bool {
        !self.pinned.is_empty()
    }
}

/// Theory 5: one layout pass pushes the segments of the layout at `base` and lists the pages
/// each run maps in `out` (capacity: the map's run bound); returns the window size needed.
#[inline]
fn plan_pinned(
    runs: &[Run],
    align: u64,
    base: u64,
    dir: Direction,
    flags: crate::front::spec::TagFlags,
    segs: &mut SegmentBuilder<'_>,
    out: &mut Vec<PinnedRun>,
) -> Result<u64> {
    out.clear();
    let mut l = Layout::new(align);
    // The per-run work in this loop, not called back from `layout` (one call per run less).
    for r in runs {
        let (a, len) = match l.place(r) {
            Place::Bypass(b) => (b.raw(), r.len),
            Place::At { off, map_start, map_end, pa } => {
                if map_end > map_start {
                    if out.len() == out.capacity() {
                        return Err(Error::LimitExceeded {
                            what: "mapped ranges per load",
                            requested: out.len() as u64 + 1,
                            limit: out.capacity() as u64,
                        });
                    }
                    out.push(PinnedRun {
                        off: map_start,
                        pa,
                        len: map_end - map_start,
                        prot: prot_of(r.kind, dir, flags),
                        coherence: coherence_index(r, map_start as i64 - off as i64),
                    });
                }
                (base + off, r.len)
            }
        };
        segs.push(a, len).map_err(|e| builder_error(r, e))?;
    }
    segs.check()?;
    Ok(l.size())
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

impl<D> IommuReserved<D> {
    /// Theory 5: a load into pinned window `lw` (window number `cur`).
    #[allow(unsafe_code, clippy::too_many_arguments)]
    #[inline]
    fn load_pinned<P: Platform>(
        &self,
        p: &P,
        cur: usize,
        lw: &LeafWindow,
        windows: &mut [(AddrRange<Iova>, Option<D::Ticket>)],
        out: &mut Vec<PinnedRun>,
        runs: &[Run],
        align: u64,
        dir: Direction,
        spec: &TagSpec,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()>
    where
        D: IommuOps<P>,
    {
        let (window, pending) = &mut windows[cur];
        let size = plan_pinned(runs, align, window.start().raw(), dir, spec.flags, segs, out)?;
        if size > window.len() {
            out.clear();
            return Err(Error::Exhausted { size, limit: window.len() });
        }
        let d = &self.domain;
        let g = p.pin_cpu();
        if let Some(t) = *pending {
            // Theory 3; a failed flush keeps the window unused.
            if let Err(e) = d.ensure_flushed(&g, t) {
                out.clear();
                return Err(e);
            }
            *pending = None;
        }
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: `lw` is this map's window's pinned tables (create), the window is empty (its
        // last unmap flushed just above) and fits the layout (checked); the runs are this
        // load's (the Strategy contract).
        if let Err(e) = unsafe { d.map_pinned(&g, lw, out) } {
            // Nothing of it translates any more (map_pinned's contract).
            out.clear();
            return Err(e);
        }
        Ok(())
    }
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
        let mut runs = Vec::new();
        runs.try_reserve_exact(n).map_err(|_| Error::NoMemory { requested: (n * 64) as u64 })?;
        let mut pinned = Vec::new();
        let mut windows = Vec::new();
        windows
            .try_reserve_exact(self.windows)
            .map_err(|_| Error::NoMemory { requested: (self.windows * 32) as u64 })?;
        let size = window_size(spec)?;
        for _ in 0..self.windows {
            let w = d.alloc_iova(&g, size, window_align(spec), iova_limit(d, spec)).and_then(|w| {
                // SAFETY: `w` came from `alloc_iova` just now and is this map's; if pinned, it
                // is mapped only through its pinned tables until destroy frees it (theory 5).
                match unsafe { d.pin_window(&g, w) } {
                    Ok(lw) => {
                        if let Some(lw) = lw {
                            if pinned.try_reserve(1).is_err() {
                                // SAFETY: `w` is this map's, nothing mapped in it.
                                unsafe { d.free_iova(&g, w) };
                                return Err(Error::NoMemory { requested: 64 });
                            }
                            pinned.push(lw);
                        }
                        Ok(w)
                    }
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
        if !pinned.is_empty() && pinned.len() != windows.len() {
            // A domain pins every window or none; anything else is refused, not half used.
            for (w, _) in windows {
                // SAFETY: the windows allocated above, nothing mapped in them.
                unsafe { d.free_iova(&g, w) };
            }
            return Err(Error::BadState { what: "a domain pinned some reserved windows only" });
        }
        Ok(ReservedState { windows, pinned, cur: 0, mapped, runs })
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
        if let Some(lw) = st.pinned.get(st.cur) {
            return self.load_pinned(
                p,
                st.cur,
                lw,
                &mut st.windows,
                &mut st.runs,
                runs,
                align,
                dir,
                spec,
                segs,
            );
        }
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
        if let Some(lw) = st.pinned.get(st.cur) {
            if !st.runs.is_empty() {
                let g = p.pin_cpu();
                // As below: a lost ticket leaves the domain degraded, which recovers first.
                // SAFETY: the runs this map's load mapped in its own pinned window.
                let t = unsafe { self.domain.unmap_pinned(&g, lw, &st.runs) };
                st.windows[st.cur].1 = t.as_ref().ok().copied();
                r = t.map(|_| ());
            }
            st.runs.clear();
        } else if !st.mapped.is_empty() {
            let g = p.pin_cpu();
            // On a failed invalidation the ticket is lost, but the domain is degraded: its
            // next map (into this window too) first completes a whole-domain invalidation.
            // SAFETY: the ranges this map's load mapped in its own window, which it keeps.
            let t = unsafe { self.domain.unmap(&g, &st.mapped, &[]) };
            st.windows[st.cur].1 = t.as_ref().ok().copied();
            r = t.map(|_| ());
        }
        st.mapped.clear();
        // Windows in turn (theory 3); no division on the per-packet path.
        st.cur += 1;
        if st.cur >= st.windows.len() {
            st.cur = 0;
        }
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
