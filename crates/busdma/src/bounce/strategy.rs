//! Bounce buffering in the front end: [`Bounced`], a strategy that wraps another.
//!
//! # Theory
//!
//! 1. **Composition.** `Bounced<S>` runs in front of any strategy `S`: at load it decides which
//!    runs the device cannot be given as they are (the front end's bounce hook reasons:
//!    beyond the DMA mask or misaligned, for a device that emits physical addresses; sub-page,
//!    for an untrusted device), moves those into bounce pages ([`BounceLoad`]), and hands `S`
//!    the resulting runs: bounce pages in place of the bounced runs, the other runs untouched.
//!    `S` then places them as usual (`Direct`: bus address = PA; an IOMMU strategy: maps the
//!    bounce pages, whole pages, so an untrusted device sees the buffer and zeros).
//! 2. **Reach.** [`Bounced::direct`] bounces for the mask and alignment (no IOMMU between the
//!    device and RAM); [`Bounced::over_iommu`] only for untrusted sub-page runs (the IOMMU
//!    reaches everything below its aperture).
//! 3. **Zone at create.** A map whose tag could ever need bouncing (a mask below 2^64 - 1 or an
//!    alignment above one byte for `direct`, the untrusted flag for either) grows its zone by a
//!    maximum load's pages, up to the zone bound; other maps touch no zone.
//! 4. **Sync.** After the front end's cache maintenance of the client runs, PREWRITE copies
//!    client → bounce then cleans the bounce pages' cache lines; POSTREAD invalidates them, then
//!    copies bounce → client (so the copy's dirty client lines are never discarded by the
//!    client runs' invalidation, which already ran). Bounce pages outside the direct map are
//!    maintained through the CPU's quick-map maintenance slot, whose window has the colour
//!    of the windows the copies used ([`crate::quickmap`], theory 6 and 7). Coherent tags
//!    skip the maintenance.
//! 5. **Fast path.** A load with nothing to bounce is checked run by run without allocating and
//!    goes to `S` unchanged. A load that bounces allocates its bookkeeping (a known cost; the
//!    reservation itself never allocates from the platform).
//! 6. **Waiting.** A short zone fails the load with [`Error::Exhausted`], which the front end
//!    treats as a resource: on a tag that may wait, `DmaMap::load_or_defer` queues the load and
//!    the unload that returns pages completes it by callback ([`crate::front::defer`]); a
//!    no-wait load fails. The bounce layer's own [`BounceLoad::load_or_defer`] (the zone's
//!    waiter list) serves users of the bounce layer without the front end.
//! 7. **Unload.** A bounced load's pages go back to their zone when the inner strategy's
//!    unload returns `Ok` (over an IOMMU: the strict invalidation or UNMAP has completed, so
//!    the device can no longer reach them) and, for a deferred inner strategy, once its
//!    [`Strategy::wait_unmapped`] has returned `Ok` too (the front end's own wait for
//!    untrusted tags runs after this unload, too late for pages that another load could be
//!    handed meanwhile). An unload or a wait that fails keeps them out of the zone
//!    forever (the load is forgotten, holding its reservation and its zone): the device may
//!    still reach them, and a page handed to the next load, or freed with the zone, would
//!    give it another buffer's bytes.

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::dir::Direction;
use crate::error::{Error, Result};
use crate::front::load::{MemKind, Run};
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::TagSpec;
use crate::front::strategy::{Invalidation, Strategy};
use crate::platform::Platform;
use crate::quickmap::{CacheMaint, QuickMaps, maintain_phys};

use super::load::{BounceLoad, ClientSeg, Constraint};
use super::zone::{BounceZone, BounceZones};
use crate::dir::SyncOp;

/// A strategy `S` with bounce buffering in front of it (theory 1).
pub struct Bounced<'z, 'p, P: Platform, S> {
    inner: S,
    zones: &'z BounceZones<'p, P>,
    qm: &'p QuickMaps,
    physical_reach: bool,
}

impl<P: Platform, S: Clone> Clone for Bounced<'_, '_, P, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            zones: self.zones,
            qm: self.qm,
            physical_reach: self.physical_reach,
        }
    }
}

impl<'z, 'p, P: Platform, S> Bounced<'z, 'p, P, S> {
    /// `inner` for a device that emits physical addresses: bounce for the mask, the
    /// alignment, and (untrusted tags) sub-page runs.
    pub fn direct(inner: S, zones: &'z BounceZones<'p, P>, qm: &'p QuickMaps) -> Self {
        Self { inner, zones, qm, physical_reach: true }
    }

    /// `inner` for a device behind an IOMMU: bounce only untrusted sub-page runs.
    pub fn over_iommu(inner: S, zones: &'z BounceZones<'p, P>, qm: &'p QuickMaps) -> Self {
        Self { inner, zones, qm, physical_reach: false }
    }

    /// The wrapped strategy.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn constraint(&self, spec: &TagSpec) -> Constraint {
        let (below, excluded, align) = if self.physical_reach {
            // The mask, and the exclusion window under it (`TagSpec::reach_limit` is the
            // conservative single limit the IOVA side uses; here memory above the window is
            // reachable as is).
            let excluded = spec.exclusion.filter(|w| w.low < spec.dma_mask).map(|w| (w.low, w.high));
            (spec.dma_mask.checked_add(1).map(PhysAddr::new), excluded, spec.alignment)
        } else {
            (None, None, 1)
        };
        // Mutant `untrusted-no-bounce` (qemu/run --mutants): sub-page runs of an untrusted
        // device mapped in place, exposing the rest of their pages.
        let untrusted = spec.flags.untrusted && !cfg!(busdma_mutant = "untrusted-no-bounce");
        Constraint { below, excluded, align, untrusted_granule: untrusted.then_some(PAGE_SIZE) }
    }

    fn may_bounce(&self, spec: &TagSpec) -> bool {
        spec.flags.untrusted
            || (self.physical_reach
                && (spec.reach_limit() < TagSpec::new(1, 1).dma_mask || spec.alignment > 1))
    }
}

/// Per-map state of [`Bounced`]: the inner strategy's, the zone, and the current bounced load.
pub struct BouncedState<'p, P: Platform, M> {
    inner: M,
    zone: Option<Arc<BounceZone<'p, P>>>,
    load: Option<BounceLoad<'p, P>>,
    runs: Vec<Run>,
}

impl<'p, P: Platform, M> BouncedState<'p, P, M> {
    /// The inner strategy's state.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// The current load's bounce state, if it bounced.
    pub fn bounce(&self) -> Option<&BounceLoad<'p, P>> {
        self.load.as_ref()
    }
}

fn client_of(r: &Run) -> ClientSeg {
    match r.kind {
        MemKind::Page => ClientSeg::phys(r.pa, r.len),
        // SAFETY: a `Mapped` run's `kva` maps the run for as long as it is loaded: the front
        // end's load-source contract (`front::load`, theory 2).
        MemKind::Mapped { kva } => unsafe { ClientSeg::kernel(r.pa, kva, r.len) },
        MemKind::Unmapped | MemKind::Mmio | MemKind::PeerBar { .. } => ClientSeg::pageless(r.pa, r.len),
    }
}

impl<'p, P: Platform, S: Strategy<P>> Strategy<P> for Bounced<'_, 'p, P, S> {
    const NAME: &'static str = S::NAME;
    type MapState = BouncedState<'p, P, S::MapState>;

    fn invalidation(&self) -> Invalidation {
        self.inner.invalidation()
    }

    fn unload_revokes(&self) -> bool {
        // Bounced runs reached bounce pages only; the rest the inner strategy mapped.
        self.inner.unload_revokes()
    }

    fn check_tag(&self, p: &P, spec: &TagSpec) -> Result<()> {
        self.inner.check_tag(p, spec)
    }

    fn create(&self, p: &P, spec: &TagSpec) -> Result<Self::MapState> {
        let zone = if self.may_bounce(spec) {
            let zone = self.zones.zone(self.constraint(spec).zone_key())?;
            // A maximum load's pages, plus one for a start that is not page-aligned.
            zone.grow_for_map(
                spec.max_size.div_ceil(PAGE_SIZE).saturating_add(1).min(zone.stats().bound_pages),
            )?;
            Some(zone)
        } else {
            None
        };
        let max_runs =
            (spec.max_segments as usize).saturating_add(spec.max_size.div_ceil(PAGE_SIZE) as usize) + 1;
        let mut runs = Vec::new();
        runs.try_reserve_exact(max_runs)
            .map_err(|_| Error::NoMemory { requested: (max_runs * core::mem::size_of::<Run>()) as u64 })?;
        Ok(BouncedState { inner: self.inner.create(p, spec)?, zone, load: None, runs })
    }

    fn load(
        &self,
        p: &P,
        spec: &TagSpec,
        state: &mut Self::MapState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        let Some(zone) = state.zone.as_ref() else {
            return self.inner.load(p, spec, &mut state.inner, runs, dir, segs);
        };
        let c = self.constraint(spec);
        let mut any = false;
        for r in runs {
            any |= c.needs_bounce(&client_of(r))?;
        }
        if !any {
            return self.inner.load(p, spec, &mut state.inner, runs, dir, segs);
        }
        let clients: Vec<ClientSeg> = runs.iter().map(client_of).collect();
        let load = BounceLoad::load(zone, self.qm, &clients, &c)?;
        // The inner strategy sees bounce pages in place of bounced runs (theory 1).
        state.runs.clear();
        let mut unbounced = runs.iter().filter(|r| !c.needs_bounce(&client_of(r)).unwrap_or(true));
        for d in load.segments() {
            let run = if d.bounced {
                Run { pa: d.addr, len: d.len, kind: MemKind::Page, kva: p.phys_to_kva(d.addr) }
            } else {
                *unbounced.next().ok_or(Error::BadState { what: "bounce layout lost a run" })?
            };
            if state.runs.len() == state.runs.capacity() {
                return Err(Error::LimitExceeded {
                    what: "runs per bounced load",
                    requested: state.runs.len() as u64 + 1,
                    limit: state.runs.capacity() as u64,
                });
            }
            state.runs.push(run);
        }
        // Sub-page bounce runs own their pages: the inner strategy need not check them again.
        let mut inner_spec = *spec;
        inner_spec.flags.untrusted = false;
        self.inner.load(p, &inner_spec, &mut state.inner, &state.runs, dir, segs)?;
        state.load = Some(load);
        Ok(())
    }

    fn unload(&self, p: &P, state: &mut Self::MapState, runs: &[Run], segs: &[Segment]) -> Result<()> {
        if let Some(load) = state.load.take() {
            let mut r = self.inner.unload(p, &mut state.inner, &state.runs, segs);
            state.runs.clear();
            if r.is_ok() && self.inner.invalidation() == Invalidation::Deferred {
                // A deferred inner strategy leaves the bounce pages reachable until its queue
                // is flushed: wait for that before they go back (theory 7).
                r = self.inner.wait_unmapped(p);
            }
            if r.is_ok() {
                // The pages go back to the zone (and may complete deferred loads).
                drop(load);
            } else {
                // The inner unload failed (an invalidation or UNMAP that did not complete):
                // the device may still reach the bounce pages, so they never go back to the
                // zone (theory 7). Forgetting the load keeps its reservation, and with it the
                // zone, alive forever: a leak, never a reuse.
                core::mem::forget(load);
            }
            r
        } else {
            self.inner.unload(p, &mut state.inner, runs, segs)
        }
    }

    fn destroy(&self, p: &P, state: Self::MapState) {
        self.inner.destroy(p, state.inner);
    }

    fn wait_unmapped(&self, p: &P) -> Result<()> {
        self.inner.wait_unmapped(p)
    }

    fn sync(
        &self,
        p: &P,
        spec: &TagSpec,
        state: &Self::MapState,
        op: SyncOp,
        range: core::ops::Range<u64>,
    ) -> Result<()> {
        let Some(load) = state.load.as_ref() else {
            return self.inner.sync(p, spec, &state.inner, op, range);
        };
        let maintain = !spec.flags.coherent;
        let (off, len) = (range.start, range.end - range.start);
        // A partial sync maintains the bounce bytes of its range only; `None`: the whole load.
        let part = (off != 0 || len != load.len()).then_some(&range);
        if op.contains(SyncOp::PREREAD) {
            load.sync_range(p, SyncOp::PREREAD, off, len)?;
        }
        if op.contains(SyncOp::PREWRITE) {
            load.sync_range(p, SyncOp::PREWRITE, off, len)?;
        }
        if maintain && (op.contains(SyncOp::PREWRITE) || op.contains(SyncOp::PREREAD)) {
            maintain_bounce_pages(p, load, CacheMaint::CleanInvalidate, part);
        }
        if op.contains(SyncOp::POSTREAD) {
            if maintain {
                maintain_bounce_pages(p, load, CacheMaint::Invalidate, part);
            }
            load.sync_range(p, SyncOp::POSTREAD, off, len)?;
        }
        self.inner.sync(p, spec, &state.inner, op, range)
    }
}

/// Applies `op` to the cache lines of each bounced segment (`part` is `None`: the whole
/// load), or of the bounce bytes that hold buffer bytes `part` (a partial sync): at their
/// direct-map address, or, for bounce pages outside the direct map, through the CPU's
/// quick-map maintenance slot (the copies reached them through quick-map windows of the same
/// colour, whose lines a device would not see; `crate::quickmap`, theory 6 and 7).
fn maintain_bounce_pages<P: Platform>(
    p: &P,
    load: &BounceLoad<'_, P>,
    op: CacheMaint,
    part: Option<&core::ops::Range<u64>>,
) {
    let each = |addr: PhysAddr, len: u64| {
        let g = p.pin_cpu();
        // A bounce span lies inside its bounce page (RAM from `alloc_pages`), so it never
        // wraps and is RAM: this never fails.
        let _ = maintain_phys(&g, addr, len, op);
    };
    match part {
        None => load.segments().iter().filter(|d| d.bounced).for_each(|d| each(d.addr, d.len)),
        Some(r) => load.bounce_spans(r.start, r.end).for_each(|(a, n)| each(a, n)),
    }
}
