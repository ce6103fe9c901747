//! DMA maps: create, load, sync, unload, destroy.
//!
//! # Theory
//!
//! 1. **Life.** A map is created from a tag (the strategy may reserve resources then), loaded
//!    with one buffer at a time, synced around each device access, unloaded, and destroyed.
//!    Dropping a loaded map unloads it first (seed 002: destroy unloads a loaded map), so a
//!    map can never leak its mappings.
//! 2. **No allocation per load.** At create the map allocates its segment array
//!    (`max_segments` entries) and its run array (`max_segments + pages(max_size) + 1`
//!    entries: between two segment breaks every run but the last covers whole pages, so no
//!    load that fits the tag needs more). `load` writes into them; it never allocates.
//! 3. **A load that cannot honour the tag fails and leaves nothing behind**: zero length,
//!    beyond `max_size`, too many segments, a bounce that is not available. The runs and
//!    segments are cleared, and the strategy releases what it took (its own rule 2).
//! 4. **Direction.** A load names its direction; it sets the IOMMU permissions and which syncs
//!    make sense (PREREAD/POSTREAD need a device that writes, PREWRITE/POSTWRITE one that
//!    reads). A sync that does not match is refused.
//! 5. **Ownership.** After a PREREAD sync the device may be writing the buffer; a CPU read
//!    through the map before the POSTREAD sync is refused. A partial POSTREAD
//!    ([`DmaMap::sync_range`]) gives its range back to the CPU, and reads within it are
//!    allowed; the rest stays the device's until a whole POSTREAD, and the next PREREAD (of
//!    any range) takes everything back. The typed API
//!    ([`super::typed`]) makes the same rule a compile-time one.
//! 6. **Tags.** A map belongs to the tag that created it; the bus_dma-style calls on the tag
//!    ([`Tag::load`], [`Tag::sync`], [`Tag::unload`], [`Tag::destroy`]) refuse a map of another
//!    tag.
//! 7. **Waiting.** [`DmaMap::load`] never waits. On a tag that may wait,
//!    [`DmaMap::load_or_defer`] queues a load short of resources and completes it by callback
//!    ([`super::defer`]); to that end everything a map owns besides its tag is one `Body`
//!    that moves into the map's wait node and back. Every unload and destroy retries the
//!    tree's waiting loads.
//! 8. **Untrusted tags are strict.** A tag with [`super::tag::TagFlags::untrusted`] unloads
//!    strictly even on a deferred domain: its unload waits for the IOTLB invalidation
//!    ([`Strategy::wait_unmapped`]) before it returns, as an untrusted domain does. (Its
//!    sub-page runs are bounced by the IOMMU strategies, `strategy::iommu` theory 4.)
//!
//! # Execution context
//!
//! `create` allocates (may not be called with preemption disabled in a kernel whose
//! allocator sleeps); `load`, `sync`, `unload` never allocate and never sleep (the IOMMU
//! strategies may spin briefly on their domain's locks). On a tree that may wait, `unload` and
//! destroy also run the callbacks of deferred loads they complete (see [`super::defer`],
//! theory 5, for what callbacks may do).
#![forbid(unsafe_code)]

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::platform::Platform;

use super::cache_sync::{SyncOp, SyncStats, sync_runs, sync_runs_in};
use super::defer::Node;
use super::load::{LoadSource, Run, RunSource};
use super::segments::{Segment, SegmentBuilder};
use super::strategy::{Invalidation, Strategy};
use super::tag::{Tag, TagData, TagSpec, next_id};
pub use crate::dir::Direction;

/// The current load of a map.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Loaded {
    dir: Direction,
    pub(crate) len: u64,
    /// PREREAD done and POSTREAD not yet: the device may be writing.
    device_writing: bool,
    /// While `device_writing`: the bytes a partial POSTREAD gave back to the CPU (theory 5).
    cpu_part: Option<(u64, u64)>,
}

/// What a map owns apart from its tag: the strategy's state, the arrays a load writes, and
/// the current load. A deferred load ([`super::defer`]) moves it into the map's wait node and
/// back, so the map's storage travels without being copied or reallocated.
///
/// # Invariants
///
/// `segs.capacity() >= max_segments` and `runs.capacity() >= max_runs` (so loads never
/// allocate); `loaded.is_some()` exactly when the strategy holds a load in `state`; `state` is
/// `Some` until the map is destroyed (or while the body is away in a wait node: then the
/// map's own body is [`Body::EMPTY`]).
pub(crate) struct Body<M> {
    pub(crate) state: Option<M>,
    pub(crate) segs: Vec<Segment>,
    pub(crate) runs: Vec<Run>,
    pub(crate) max_runs: usize,
    pub(crate) loaded: Option<Loaded>,
}

impl<M> Body<M> {
    /// A body that owns nothing (no state, no storage): what a map keeps while its body is
    /// away. Building it allocates nothing.
    pub(crate) const EMPTY: Self =
        Self { state: None, segs: Vec::new(), runs: Vec::new(), max_runs: 0, loaded: None };
}

/// A DMA map. It holds a handle of its tag ([`Tag`] is reference-counted), so a map borrows
/// nothing and a driver's state struct can own it beside its tag.
///
/// # Invariants
///
/// `body` satisfies `Body`'s invariants; `node` is `Some` exactly for maps of a tag that
/// may wait ([`super::tag::TagFlags::may_wait`]): the wait node a deferred load uses,
/// allocated at create so deferring allocates nothing.
pub struct DmaMap<'p, P: Platform, S: Strategy<P>> {
    pub(crate) tag: Tag<'p, P, S>,
    pub(crate) body: Body<S::MapState>,
    pub(crate) id: u64,
    pub(crate) node: Option<Arc<Node<'p, P, S>>>,
}

impl<'p, P: Platform, S: Strategy<P>> Tag<'p, P, S> {
    /// Creates a map (theory 2). The strategy may reserve IOVA space and table levels.
    ///
    /// Errors: [`Error::NoMemory`] (the arrays), and the strategy's (an IOVA window that does
    /// not fit: [`Error::Exhausted`]).
    pub fn create_map(&self) -> Result<DmaMap<'p, P, S>> {
        let max_segs = self.spec.max_segments as usize;
        let max_runs =
            max_segs.saturating_add(self.spec.max_size.div_ceil(PAGE_SIZE) as usize).saturating_add(1);
        let mut segs = Vec::new();
        segs.try_reserve_exact(max_segs).map_err(|_| Error::NoMemory {
            requested: (max_segs * core::mem::size_of::<Segment>()) as u64,
        })?;
        let mut runs = Vec::new();
        runs.try_reserve_exact(max_runs)
            .map_err(|_| Error::NoMemory { requested: (max_runs * core::mem::size_of::<Run>()) as u64 })?;
        // The wait node before the strategy's state: a failure after `create` would have to
        // give the strategy's reservation back.
        let node = match &self.defer {
            Some(q) if self.spec.flags.may_wait => Some(q.new_node()?),
            _ => None,
        };
        let state = self.strategy.create(self.platform, &self.spec)?;
        // INVARIANT: capacities reserved above; nothing loaded yet; a node exactly for a
        // may-wait tag.
        let body = Body { state: Some(state), segs, runs, max_runs, loaded: None };
        Ok(DmaMap { tag: self.clone(), body, id: next_id(), node })
    }

    fn check_owner(&self, call: &'static str, map: &DmaMap<'p, P, S>) -> Result<()> {
        if map.tag.id == self.id {
            return Ok(());
        }
        #[cfg(feature = "dma-debug")]
        self.debug.report(super::debug::Violation::WrongTag {
            call,
            used: self.id,
            owner: map.tag.id,
            map: map.id,
        });
        let _ = call;
        Err(Error::InvalidArgument {
            what: "map used through a tag that does not own it (value: owner tag)",
            value: map.tag.id,
        })
    }

    /// bus_dma's `bus_dmamap_load`: [`DmaMap::load`] through this tag, which must own `map`.
    pub fn load<L: LoadSource>(&self, map: &mut DmaMap<'p, P, S>, src: &L, dir: Direction) -> Result<()> {
        self.check_owner("load", map)?;
        map.load(src, dir).map(|_| ())
    }

    /// bus_dma's `bus_dmamap_sync`: [`DmaMap::sync`] through this tag, which must own `map`.
    pub fn sync(&self, map: &mut DmaMap<'p, P, S>, op: SyncOp) -> Result<SyncStats> {
        self.check_owner("sync", map)?;
        map.sync(op)
    }

    /// bus_dma's `bus_dmamap_unload`: [`DmaMap::unload`] through this tag, which must own it.
    pub fn unload(&self, map: &mut DmaMap<'p, P, S>) -> Result<()> {
        self.check_owner("unload", map)?;
        map.unload()
    }

    /// bus_dma's `bus_dmamap_destroy`: drops `map` (unloading it if loaded). Through a tag that
    /// does not own it, the map is handed back with the error.
    #[allow(clippy::result_large_err)]
    pub fn destroy(&self, map: DmaMap<'p, P, S>) -> core::result::Result<(), (Error, DmaMap<'p, P, S>)> {
        match self.check_owner("destroy", &map) {
            Ok(()) => {
                drop(map);
                Ok(())
            }
            Err(e) => Err((e, map)),
        }
    }
}

/// Where a map body's operations take their platform, strategy and debug log from (`tag`:
/// any tag of the map's tree, which share them) and what is the map's own (`spec`, the ids).
/// A map uses its own tag; a deferred load completed by another map's unload uses that map's
/// tag with the waiting map's spec and ids ([`super::defer`]).
pub(crate) struct Ctx<'a, 'p, P: Platform, S: Strategy<P>> {
    pub(crate) tag: &'a TagData<'p, P, S>,
    pub(crate) spec: &'a TagSpec,
    pub(crate) tag_id: u64,
    pub(crate) map_id: u64,
}

impl<'a, 'p, P: Platform, S: Strategy<P>> Ctx<'a, 'p, P, S> {
    /// A copy (the fields are references and ids; `derive` would demand `P: Copy, S: Copy`).
    pub(crate) fn copy(&self) -> Ctx<'a, 'p, P, S> {
        Ctx { tag: self.tag, spec: self.spec, tag_id: self.tag_id, map_id: self.map_id }
    }

    /// Collects `src`'s runs into `body.runs`, coalesced; returns the load's length.
    /// On error the runs are partial: the caller clears them.
    #[inline]
    pub(crate) fn collect<L: RunSource<P>>(&self, body: &mut Body<S::MapState>, src: &L) -> Result<u64> {
        let spec = self.spec;
        let (runs, max_runs) = (&mut body.runs, body.max_runs);
        runs.clear();
        let mut total: u64 = 0;
        src.runs(self.tag.platform, |r| {
            if r.len == 0 {
                return Err(Error::ZeroSize);
            }
            total = total.checked_add(r.len).ok_or(Error::Overflow { base: total, len: r.len })?;
            if total > spec.max_size {
                return Err(Error::BadSize { size: total, limit: spec.max_size });
            }
            if let Some(last) = runs.last_mut() {
                if last.joins(&r) {
                    last.len += r.len;
                    return Ok(());
                }
            }
            if runs.len() == max_runs {
                return Err(Error::LimitExceeded {
                    what: "physical runs per load (max_segments + pages of max_size + 1)",
                    requested: max_runs as u64 + 1,
                    limit: max_runs as u64,
                });
            }
            // INVARIANT: len < max_runs <= capacity: no allocation.
            runs.push(r);
            Ok(())
        })?;
        if total == 0 {
            return Err(Error::ZeroSize);
        }
        Ok(total)
    }

    /// Asks the strategy to place `body.runs` and builds the segments. On error the strategy
    /// has released everything (its rule 2) and the segments are partial: the caller clears
    /// them (and the runs, unless it will retry).
    #[inline]
    pub(crate) fn place(&self, body: &mut Body<S::MapState>, dir: Direction) -> Result<()> {
        let mut b = SegmentBuilder::for_tag(&mut body.segs, self.spec);
        let state = body.state.as_mut().ok_or(Error::BadState { what: "map state missing" })?;
        let (p, st) = (self.tag.platform, &self.tag.strategy);
        st.load(p, self.spec, state, &body.runs, dir, &mut b)?;
        if let Err(e) = b.finish() {
            // The strategy placed everything but the tag forbids the result: undo it (a failed
            // invalidation of the undo leaves the domain holding back what it frees).
            let _ = st.unload(p, state, &body.runs, &[]);
            return Err(e);
        }
        Ok(())
    }

    /// Records a completed load of `len` bytes.
    #[inline]
    pub(crate) fn set_loaded(&self, body: &mut Body<S::MapState>, dir: Direction, len: u64) {
        body.loaded = Some(Loaded { dir, len, device_writing: false, cpu_part: None });
        #[cfg(feature = "dma-debug")]
        self.tag.debug.loaded(self.tag_id, self.map_id, body.segs.first().map_or(0, |s| s.addr.raw()), len);
    }

    /// [`DmaMap::sync`] of a body.
    #[inline]
    pub(crate) fn sync(&self, body: &mut Body<S::MapState>, op: SyncOp) -> Result<SyncStats> {
        // The whole load: the per-packet path, kept apart from `sync_range` (no range to
        // check or clip; inlined into the caller's loop as before partial syncs existed).
        let Some(l) = body.loaded.as_mut() else {
            return Err(Error::BadState { what: "sync of a map that is not loaded" });
        };
        if !l.dir.allows(op) {
            return Err(self.wrong_direction(l.dir, op, body.segs.first().map_or(0, |s| s.addr.raw())));
        }
        let st = sync_runs(self.tag.platform, &body.runs, op, self.spec.flags.coherent)?;
        let state = body.state.as_ref().ok_or(Error::BadState { what: "map state missing" })?;
        self.tag.strategy.sync(self.tag.platform, self.spec, state, op, 0..l.len)?;
        if op.contains(SyncOp::POSTREAD) {
            l.device_writing = false;
        }
        if op.contains(SyncOp::PREREAD) {
            l.device_writing = true;
            l.cpu_part = None;
        }
        Ok(st)
    }

    /// The error (and the debug report) of a sync the load's direction does not allow.
    #[cold]
    fn wrong_direction(&self, dir: Direction, op: SyncOp, bus: u64) -> Error {
        #[cfg(feature = "dma-debug")]
        self.tag.debug.report(super::debug::Violation::SyncWrongDirection {
            tag: self.tag_id,
            map: self.map_id,
            dir,
            op,
            bus,
        });
        #[cfg(not(feature = "dma-debug"))]
        let _ = (dir, bus);
        Error::InvalidArgument {
            what: "sync operation for the load's direction",
            value: u64::from(op.bits()),
        }
    }

    /// [`DmaMap::sync_range`] of a body; `len: None` is the whole load from `offset` on.
    pub(crate) fn sync_range(
        &self,
        body: &mut Body<S::MapState>,
        op: SyncOp,
        offset: u64,
        len: Option<u64>,
    ) -> Result<SyncStats> {
        let Some(l) = body.loaded.as_mut() else {
            return Err(Error::BadState { what: "sync of a map that is not loaded" });
        };
        let len = len.unwrap_or(l.len.saturating_sub(offset));
        let end = offset.checked_add(len).ok_or(Error::Overflow { base: offset, len })?;
        if end > l.len {
            return Err(Error::OutOfRange { addr: end, limit: l.len });
        }
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if !l.dir.allows(op) {
            return Err(self.wrong_direction(l.dir, op, body.segs.first().map_or(0, |s| s.addr.raw())));
        }
        let st = sync_runs_in(self.tag.platform, &body.runs, op, self.spec.flags.coherent, offset..end)?;
        let state = body.state.as_ref().ok_or(Error::BadState { what: "map state missing" })?;
        self.tag.strategy.sync(self.tag.platform, self.spec, state, op, offset..end)?;
        if op.contains(SyncOp::POSTREAD) {
            if offset == 0 && end == l.len {
                l.device_writing = false;
            } else if l.device_writing {
                l.cpu_part = Some((offset, end));
            }
        }
        if op.contains(SyncOp::PREREAD) {
            l.device_writing = true;
            l.cpu_part = None;
        }
        Ok(st)
    }

    /// [`DmaMap::unload`] of a body, without waking deferred loads (the caller does). A loaded
    /// body is unloaded whatever this returns.
    #[inline]
    pub(crate) fn unload(&self, body: &mut Body<S::MapState>) -> Result<()> {
        if body.loaded.is_none() {
            #[cfg(feature = "dma-debug")]
            self.tag
                .debug
                .report(super::debug::Violation::DoubleUnload { tag: self.tag_id, map: self.map_id });
            return Err(Error::BadState { what: "unload of a map that is not loaded" });
        }
        let mut r = Ok(());
        if let Some(state) = body.state.as_mut() {
            r = self.tag.strategy.unload(self.tag.platform, state, &body.runs, &body.segs);
            if r.is_ok() && (self.spec.flags.untrusted || self.tag.quarantine_holds()) {
                r = self.after_unload();
            }
        }
        body.loaded = None;
        body.runs.clear();
        body.segs.clear();
        #[cfg(feature = "dma-debug")]
        self.tag.debug.unloaded(self.map_id);
        r
    }

    /// The rare part of a successful unload, out of line: an untrusted device gets strict
    /// invalidation whatever its domain's policy (theory 8: the unload returns only once the
    /// IOTLB has forgotten the load), and a quarantine that holds memory is released if a
    /// proof is now given ([`super::quarantine`], theory 3).
    #[cold]
    #[inline(never)]
    fn after_unload(&self) -> Result<()> {
        let (p, st) = (self.tag.platform, &self.tag.strategy);
        if self.spec.flags.untrusted && st.invalidation() == Invalidation::Deferred {
            st.wait_unmapped(p)?;
        }
        self.tag.after_unload();
        Ok(())
    }

    /// Unloads a body if loaded and releases its strategy state; returns whether there was a
    /// state to release (so resources may have been freed).
    pub(crate) fn destroy(&self, body: &mut Body<S::MapState>) -> bool {
        if body.loaded.is_some() {
            let _ = self.unload(body);
        }
        match body.state.take() {
            Some(state) => {
                self.tag.strategy.destroy(self.tag.platform, state);
                true
            }
            None => false,
        }
    }
}

impl<'p, P: Platform, S: Strategy<P>> DmaMap<'p, P, S> {
    #[inline]
    pub(crate) fn cx(&mut self) -> (Ctx<'_, 'p, P, S>, &mut Body<S::MapState>) {
        let cx = Ctx { tag: &*self.tag, spec: &self.tag.spec, tag_id: self.tag.id, map_id: self.id };
        (cx, &mut self.body)
    }

    /// The map's unique id.
    #[inline]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The tag that owns the map.
    #[inline]
    pub fn tag(&self) -> &Tag<'p, P, S> {
        &self.tag
    }

    /// Whether a buffer is loaded.
    #[inline]
    pub fn is_loaded(&self) -> bool {
        self.body.loaded.is_some()
    }

    /// The segments of the current load (empty when unloaded).
    #[inline]
    pub fn segments(&self) -> &[Segment] {
        &self.body.segs
    }

    /// The physical runs of the current load (empty when unloaded).
    #[inline]
    pub fn runs(&self) -> &[Run] {
        &self.body.runs
    }

    /// Bytes loaded (0 when unloaded).
    #[inline]
    pub fn len(&self) -> u64 {
        self.body.loaded.map_or(0, |l| l.len)
    }

    /// Whether nothing is loaded.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.body.loaded.is_none()
    }

    /// The strategy's per-map state (for the lab and tests).
    #[inline]
    pub fn state(&self) -> &S::MapState {
        // INVARIANT: `state` is Some until drop (a map whose body is away in a wait node is
        // owned by its `PendingLoad`, which hands out no `&DmaMap`).
        self.body.state.as_ref().unwrap_or_else(|| unreachable!("map state taken before drop"))
    }

    /// Loads `src` for a transfer in direction `dir` and returns its segments. This is the
    /// no-wait load: it never defers (see [`DmaMap::load_or_defer`] for loads that may wait).
    ///
    /// Errors (the map stays unloaded, nothing is leaked): [`Error::BadState`] (already
    /// loaded), [`Error::ZeroSize`], [`Error::BadSize`] (beyond `max_size`),
    /// [`Error::TooManySegments`], [`Error::LimitExceeded`] (more physical runs than the map
    /// can track), [`Error::Unsupported`] (a bounce would be needed: the bounce hook),
    /// [`Error::Busy`] (deferred loads of the tag's tree are waiting: a no-wait load does not
    /// overtake them, [`super::defer`] theory 3), the source's and the strategy's errors
    /// (exhaustion: [`Error::Exhausted`], [`Error::NoMemory`]).
    #[inline]
    pub fn load<L: LoadSource>(&mut self, src: &L, dir: Direction) -> Result<&[Segment]> {
        self.load_from(src, dir)
    }

    /// [`DmaMap::load`] from any run source of the crate (owned buffers included).
    #[inline]
    pub(crate) fn load_from<L: RunSource<P>>(&mut self, src: &L, dir: Direction) -> Result<&[Segment]> {
        if self.body.loaded.is_some() {
            return Err(Error::BadState { what: "load into a map that is already loaded" });
        }
        self.tag.refuse_if_waiters()?;
        let (cx, body) = self.cx();
        match cx.collect(body, src).and_then(|len| cx.place(body, dir).map(|()| len)) {
            Ok(len) => {
                cx.set_loaded(body, dir, len);
                Ok(&body.segs)
            }
            Err(e) => {
                body.runs.clear();
                body.segs.clear();
                Err(e)
            }
        }
    }

    /// Makes the CPU's and the device's views agree ([`super::cache_sync`]).
    ///
    /// Errors: [`Error::BadState`] (not loaded), [`Error::InvalidArgument`] (an operation the
    /// load's direction does not allow; value: the operation's bits).
    #[inline]
    pub fn sync(&mut self, op: SyncOp) -> Result<SyncStats> {
        let (cx, body) = self.cx();
        cx.sync(body, op)
    }

    /// Makes the CPU's and the device's views of bytes `[offset, offset + len)` of the load
    /// agree, and of those only (theory 5): cache maintenance and bounce copies are limited
    /// to the range. What a receive path with copybreak needs: after the device wrote a short
    /// frame into a large buffer, POSTREAD the frame's bytes, copy them out with
    /// [`DmaMap::read`], and PREREAD them again to give the buffer back to the device.
    ///
    /// Errors: those of [`DmaMap::sync`]; [`Error::OutOfRange`] (the range runs past the
    /// load; value: its end and the load's length), [`Error::Overflow`], [`Error::ZeroSize`].
    /// Nothing is synced on error.
    pub fn sync_range(&mut self, op: SyncOp, offset: u64, len: u64) -> Result<SyncStats> {
        let (cx, body) = self.cx();
        cx.sync_range(body, op, offset, Some(len))
    }

    /// Unloads the map: the device can no longer reach the buffer once this returns (strict
    /// invalidation) or once the domain's next flush completes (deferred). Deferred loads of
    /// the tag's tree that now fit complete before it returns ([`super::defer`]).
    ///
    /// Errors: [`Error::BadState`] (not loaded: a double unload; nothing changes).
    /// [`Error::InvalidationFailed`]: the IOMMU failed the unload's invalidation; the map is
    /// unloaded all the same, and its domain holds back the IOVA and table pages until a later
    /// invalidation succeeds (`busdma::iommu::Domain`, theory 8): the device may still reach
    /// the buffer through a stale translation, so a careful caller stops the device or retries
    /// the domain's flush before reusing the buffer.
    pub fn unload(&mut self) -> Result<()> {
        let was_loaded = self.body.loaded.is_some();
        let (cx, body) = self.cx();
        let r = cx.unload(body);
        if was_loaded {
            self.tag.wake_deferred();
        }
        r
    }

    /// Copies `buf.len()` bytes at `offset` of the loaded buffer into `buf` (the CPU's view, by
    /// copy: no reference to device-visible memory is ever formed).
    ///
    /// Errors: [`Error::BadState`] (not loaded, or the device may be writing: PREREAD without
    /// POSTREAD), [`Error::OutOfRange`] (beyond the load).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let l = self.body.loaded.ok_or(Error::BadState { what: "CPU read of a map that is not loaded" })?;
        let end = offset.saturating_add(buf.len() as u64);
        let given_back = l.cpu_part.is_some_and(|(s, e)| s <= offset && end <= e);
        if l.device_writing && !given_back {
            #[cfg(feature = "dma-debug")]
            self.tag.debug.report(super::debug::Violation::CpuReadWithoutPostRead {
                tag: self.tag.id,
                map: self.id,
                dir: l.dir,
                offset,
                len: buf.len() as u64,
                bus: self.body.segs.first().map_or(0, |s| s.addr.raw()),
            });
            return Err(Error::BadState {
                what: "CPU read of a buffer the device may be writing (no POSTREAD sync)",
            });
        }
        let p = self.tag.platform;
        let mut done = 0usize;
        self.walk(offset, buf.len() as u64, |pa, at, n| {
            p.read_phys(pa, &mut buf[at..at + n])?;
            done += n;
            Ok(())
        })
    }

    /// Copies `data` into the loaded buffer at `offset` (the CPU's view, by copy).
    ///
    /// Errors: [`Error::BadState`] (not loaded), [`Error::OutOfRange`] (beyond the load).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.body.loaded.is_none() {
            return Err(Error::BadState { what: "CPU write to a map that is not loaded" });
        }
        let p = self.tag.platform;
        self.walk(offset, data.len() as u64, |pa, at, n| p.write_phys(pa, &data[at..at + n]))
    }

    /// Calls `f(pa, buffer_offset_relative_to_offset, len)` for each physical piece of
    /// `[offset, offset + len)` of the load.
    fn walk(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(PhysAddr, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let end = offset.checked_add(len).ok_or(Error::Overflow { base: offset, len })?;
        if end > self.len() {
            return Err(Error::OutOfRange { addr: end, limit: self.len() });
        }
        let mut pos = 0u64;
        for r in &self.body.runs {
            let (rs, re) = (pos, pos + r.len);
            pos = re;
            let (s, e) = (rs.max(offset), re.min(end));
            if s >= e {
                continue;
            }
            let pa = PhysAddr::new(r.pa.raw() + (s - rs));
            f(pa, (s - offset) as usize, (e - s) as usize)?;
        }
        Ok(())
    }
}

impl<P: Platform, S: Strategy<P>> core::fmt::Debug for DmaMap<'_, P, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DmaMap")
            .field("id", &self.id)
            .field("tag", &self.tag.id)
            .field("len", &self.len())
            .field("segments", &self.body.segs)
            .finish()
    }
}

impl<P: Platform, S: Strategy<P>> Drop for DmaMap<'_, P, S> {
    fn drop(&mut self) {
        // Unload if loaded, then the strategy's destroy; either may free what deferred loads
        // wait for. A shell whose body is away (or was already destroyed) frees nothing.
        let (cx, body) = self.cx();
        if cx.destroy(body) {
            self.tag.wake_deferred();
        }
        if let (Some(node), Some(q)) = (self.node.take(), self.tag.defer.as_ref()) {
            q.release_node(node);
        }
    }
}
