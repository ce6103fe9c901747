//! Pool buffers loaded in place: a map of a pre-mapped pool's tag that owns the pool buffer it
//! loads ([`PoolMap`]).
//!
//! # Theory
//!
//! 1. **Zero copy, zero map requests.** A [`PoolBuf`] is a slot of a
//!    [`PremappedPool`](crate::premapped::PremappedPool), mapped once for the pool's device
//!    (`premapped` theory 9). A stack that builds its packets there needs neither the copy of
//!    [`Premapped`](crate::premapped::Premapped)'s copying loads nor a map request: [`PoolMap::load`] gives the device one segment,
//!    the slot's bus address, and the map's runs are the slot's bytes, so the front end's
//!    syncs clean and invalidate exactly those (non-coherent tags; barriers only on coherent
//!    ones) and [`DmaMap::read`]/[`DmaMap::write`] reach them.
//! 2. **Ownership moves in.** The load takes the buffer by value and the map keeps it until
//!    [`PoolMap::take`] (which unloads first) or the drop (the map unloads, then the buffer
//!    goes back to its pool: field order). So a loaded buffer can be neither given back to the
//!    pool, where another load would take its slot, nor written by anyone but the map's
//!    owner; `mem::forget` of the map leaks the slot with its load, still the pool's memory,
//!    still mapped only for the pool's device. Giving a buffer back needs no proof: its pages
//!    stay the pool's, mapped for the pool's life.
//! 3. **The right IOVA or none.** The slot's bus address is valid in the pool's domain only:
//!    a buffer of another pool (whatever its domain) is refused with
//!    [`Error::InvalidArgument`] and handed back. Only a tag of a pool's strategy
//!    ([`PoolStrategy`], sealed: [`Premapped`](crate::premapped::Premapped) and
//!    [`Hybrid`](crate::premapped::Hybrid), whose copied loads already give the device the
//!    pool's slots) has a `PoolMap` at all (the type says so).
//! 4. **No allocation, no pin.** A load is the tag's checks on one segment (mask, alignment,
//!    boundary, sizes), a pool identity check and a few stores; an unload, a few stores.
//!
//! # Execution context
//!
//! As [`DmaMap`]: `load`, `sync`, `unload` and `take` never allocate or sleep.
#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use crate::platform::Platform;
use crate::premapped::{PoolBuf, PoolStrategy};

use super::cache_sync::{SyncOp, SyncStats};
use super::load::Run;
use super::map::{Direction, DmaMap};
use super::segments::{Segment, SegmentBuilder};
use super::tag::Tag;

/// The pool buffer type of a pool strategy `S`.
type Buf<'a, 'p, P, S> = PoolBuf<'a, 'p, P, <S as PoolStrategy<'a, 'p, P>>::Dom>;

/// A map of a pool's tag ([`Premapped`](crate::premapped::Premapped) or
/// [`Hybrid`](crate::premapped::Hybrid): [`PoolStrategy`]) that loads pool buffers in place
/// (theory 1–3).
///
/// # Invariants
///
/// `buf` is `Some` whenever `map` is loaded, and `map` holds nothing but `buf`'s slot. Field
/// order: the map drops (unloads) before the buffer goes back to its pool.
pub struct PoolMap<'a, 'p, P: Platform, S: PoolStrategy<'a, 'p, P>> {
    map: DmaMap<'p, P, S>,
    buf: Option<Buf<'a, 'p, P, S>>,
}

impl<'a, 'p, P: Platform, S: PoolStrategy<'a, 'p, P>> Tag<'p, P, S> {
    /// Creates a map that loads pool buffers of this tag's pool in place ([`PoolMap`]).
    ///
    /// Errors: those of [`Tag::create_map`].
    pub fn create_pool_map(&self) -> Result<PoolMap<'a, 'p, P, S>> {
        Ok(PoolMap { map: self.create_map()?, buf: None })
    }
}

impl<'a, 'p, P: Platform, S: PoolStrategy<'a, 'p, P>> PoolMap<'a, 'p, P, S> {
    /// Moves `buf` into the map and loads its [`PoolBuf::len`] bytes in place for a transfer
    /// in direction `dir`: one segment, the slot's bus address; no copy, no map request.
    ///
    /// Errors (the buffer comes back, nothing is loaded): [`Error::BadState`] (the map holds
    /// a buffer already), [`Error::InvalidArgument`] (a buffer of another pool: its bus address
    /// is not this tag's), [`Error::BadSize`] (beyond the tag's `max_size`), the tag's
    /// constraints on the segment ([`Error::TooManySegments`], alignment, boundary, mask).
    #[allow(clippy::result_large_err)]
    pub fn load(
        &mut self,
        buf: Buf<'a, 'p, P, S>,
        dir: Direction,
    ) -> core::result::Result<&[Segment], (Error, Buf<'a, 'p, P, S>)> {
        if self.buf.is_some() || self.map.is_loaded() {
            return Err((Error::BadState { what: "pool buffer load into a map that holds a buffer" }, buf));
        }
        match self.place(&buf, dir) {
            Ok(()) => {
                // INVARIANT: loaded exactly with `buf`'s slot, which the map now owns.
                self.buf = Some(buf);
                Ok(self.map.segments())
            }
            Err(e) => Err((e, buf)),
        }
    }

    /// The load of `buf` (theory 1, 3); on error the map is as before.
    fn place(&mut self, buf: &Buf<'a, 'p, P, S>, dir: Direction) -> Result<()> {
        let (cx, body) = self.map.cx();
        let strategy = &cx.tag.strategy;
        if !core::ptr::eq(strategy.pool(), buf.pool()) {
            return Err(Error::InvalidArgument {
                what: "pool buffer of another pool: its bus address is not this tag's (value: its bus address)",
                value: buf.bus(),
            });
        }
        let len = buf.len();
        if len > cx.spec.max_size {
            return Err(Error::BadSize { size: len, limit: cx.spec.max_size });
        }
        let state = body.state.as_mut().ok_or(Error::BadState { what: "map state missing" })?;
        body.runs.clear();
        // INVARIANT: `max_runs >= 1`, reserved at create: no allocation.
        body.runs.push(Run::page(cx.tag.platform, buf.pa(), len));
        let mut b = SegmentBuilder::for_tag(&mut body.segs, cx.spec);
        let r = strategy.load_owned(state, buf.slot(), buf.at(), len, dir, &mut b).and_then(|()| {
            b.finish().map(|_| ()).inspect_err(|_| {
                // The tag forbids the segment: undo the load (a pool buffer's unload only
                // forgets its slot).
                let _ = strategy.unload(cx.tag.platform, state, &[], &[]);
            })
        });
        match r {
            Ok(()) => {
                cx.set_loaded(body, dir, len);
                Ok(())
            }
            Err(e) => {
                body.runs.clear();
                body.segs.clear();
                Err(e)
            }
        }
    }

    /// Unloads the held buffer and loads it again in direction `dir` (its current
    /// [`PoolBuf::len`]).
    ///
    /// Errors: [`Error::BadState`] (no buffer held); those of [`PoolMap::load`] (the map stays
    /// unloaded, the buffer held).
    pub fn reload(&mut self, dir: Direction) -> Result<&[Segment]> {
        let Some(buf) = self.buf.take() else {
            return Err(Error::BadState { what: "reload of a pool map that holds no buffer" });
        };
        if self.map.is_loaded() {
            // A pool buffer's unload cannot fail (no invalidation).
            let _ = self.map.unload();
        }
        let r = self.place(&buf, dir);
        self.buf = Some(buf);
        r.map(|()| self.map.segments())
    }

    /// Unloads the map, keeping the buffer.
    ///
    /// Errors: those of [`DmaMap::unload`].
    pub fn unload(&mut self) -> Result<()> {
        self.map.unload()
    }

    /// Hands the buffer back, unloading it first if loaded. No proof is needed (theory 2):
    /// the slot stays the pool's, mapped for the pool's device.
    ///
    /// Errors: [`Error::BadState`] (no buffer).
    pub fn take(&mut self) -> Result<Buf<'a, 'p, P, S>> {
        if self.buf.is_none() {
            return Err(Error::BadState { what: "take from a pool map that holds no buffer" });
        }
        if self.map.is_loaded() {
            // Cannot fail for a pool buffer (no invalidation); the map is unloaded whatever.
            let _ = self.map.unload();
        }
        self.buf.take().ok_or(Error::BadState { what: "pool buffer vanished" })
    }

    /// Makes the CPU's and the device's views agree ([`DmaMap::sync`]): cache maintenance of
    /// the slot's bytes on a non-coherent tag, barriers on a coherent one; nothing is copied.
    ///
    /// Errors: those of [`DmaMap::sync`].
    pub fn sync(&mut self, op: SyncOp) -> Result<SyncStats> {
        self.map.sync(op)
    }

    /// [`PoolMap::sync`] of bytes `[offset, offset + len)` of the load only
    /// ([`DmaMap::sync_range`]).
    ///
    /// Errors: those of [`DmaMap::sync_range`].
    pub fn sync_range(&mut self, op: SyncOp, offset: u64, len: u64) -> Result<SyncStats> {
        self.map.sync_range(op, offset, len)
    }

    /// Copies bytes of the loaded buffer at `offset` into `buf` ([`DmaMap::read`]: refused
    /// while the device may be writing).
    ///
    /// Errors: those of [`DmaMap::read`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.map.read(offset, buf)
    }

    /// The segments of the current load (empty when unloaded).
    pub fn segments(&self) -> &[Segment] {
        self.map.segments()
    }

    /// Whether the map is loaded.
    pub fn is_loaded(&self) -> bool {
        self.map.is_loaded()
    }

    /// The held buffer, if any: read-only (writing a held buffer takes `&mut`, which the map
    /// never lends).
    pub fn buffer(&self) -> Option<&Buf<'a, 'p, P, S>> {
        self.buf.as_ref()
    }

    /// The underlying map (segments, runs, ids).
    pub fn map(&self) -> &DmaMap<'p, P, S> {
        &self.map
    }
}

impl<'a, 'p, P: Platform, S: PoolStrategy<'a, 'p, P>> core::fmt::Debug for PoolMap<'a, 'p, P, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PoolMap").field("map", &self.map).field("buf", &self.buf).finish()
    }
}
