//! Owned loads: the map owns the memory it maps for as long as a translation may reach it.
//!
//! # Theory
//!
//! 1. **Ownership moves in.** [`OwnedMap::load`] takes a buffer by value: DMA memory from
//!    busdma ([`DmaMemory`], or part of one: [`Part`]), device memory the bus described once
//!    ([`DeviceRegion`] slices: MMIO, a peer's BAR, memory with no page and no kernel
//!    mapping), registered user memory ([`RegisteredBuffer`]: pinned once, mapped in parts
//!    again and again; an iovec of them, [`RegisteredIov`]), a chain of fragments (a packet or
//!    a block request, [`super::chain::FragChain`]), or any array, vector or tuple of them (the
//!    fragments of a packet, a scatter-gather list). Loading it needs no `unsafe`: nobody else can free, reuse or hold a
//!    reference to memory the map owns, and `mem::forget` of the map leaks the memory together
//!    with its mapping.
//! 2. **Ownership moves out only with proof.** [`OwnedMap::take`] hands the buffer back after
//!    the unload *and* the tag's proof that no translation reaches it
//!    ([`Tag::wait_unmapped`]: free for a healthy strict domain, one flush if a deferred unmap
//!    is still queued). [`OwnedMap::reload`] maps the buffer it holds again without handing it
//!    out, so a ring of per-packet maps pays the unmap and the map but no proof: the buffer
//!    never leaves the map while the IOTLB may still translate it. The CPU reaches an owned
//!    buffer by copy ([`OwnedMap::buffer`]: [`DmaMemory::read`]/[`DmaMemory::write`]), never
//!    by reference, whatever the device is doing.
//! 3. **Failure keeps it from everyone.** A map dropped with its buffer, or a `take` whose
//!    proof fails, gives the buffer's DMA memory to the tag's quarantine
//!    ([`super::quarantine`]) unless the proof is given; device regions are dropped (they are
//!    not RAM anyone reuses).
//! 4. **No allocation per load.** An owned load is the map's load (arrays sized at create)
//!    plus moving the buffer in; the buffer types are plain values (arrays, tuples) unless the
//!    caller chooses a vector.
//!
//! # Execution context
//!
//! As [`DmaMap`]: `load`, `reload`, `sync` and `unload` never allocate or sleep; `take` may
//! spin while an invalidation completes.
#![deny(unsafe_code)]

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::addr::{Iova, PhysAddr};
use crate::error::{Error, Result};
use crate::pin::{PinBackend, RegisteredBuffer, RegisteredIov, UnpinBarrier};
use crate::platform::Platform;

use super::cache_sync::{SyncOp, SyncStats};
use super::coherent::DmaMemory;
use super::load::{MemKind, Run, RunSource};
use super::map::{Direction, DmaMap};
use super::segments::Segment;
use super::strategy::Strategy;
use super::tag::Tag;

pub(super) mod sealed {
    pub trait Sealed {}
}

/// Memory a map can own while it is loaded (theory 1). Sealed: only busdma's owned memory
/// types and compositions of them qualify, because busdma's unsafe code trusts the runs they
/// report.
pub trait DmaBuffer<'p, P: Platform>: sealed::Sealed + Send {
    /// Calls `f` with each physical run of the buffer, in order.
    ///
    /// Errors: those of `f`.
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()>;

    /// Gives every piece of DMA memory in the buffer to `keep` (the quarantine); device
    /// regions are dropped.
    fn quarantine(self, keep: &mut dyn FnMut(DmaMemory<'p, P>));
}

impl<P: Platform> sealed::Sealed for DmaMemory<'_, P> {}
impl<'p, P: Platform> DmaBuffer<'p, P> for DmaMemory<'p, P> {
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        f(Run::page(p, self.pa(), self.len()))
    }

    fn quarantine(self, keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        keep(self);
    }
}

/// Part of a [`DmaMemory`]: `[offset, offset + len)` of it, the rest of it not given to the
/// device (a packet in a larger buffer).
///
/// # Invariants
///
/// `len > 0` and `offset + len <= mem.len()`.
pub struct Part<'p, P: Platform> {
    mem: DmaMemory<'p, P>,
    offset: u64,
    len: u64,
}

impl<'p, P: Platform> Part<'p, P> {
    /// `[offset, offset + len)` of `mem`.
    ///
    /// Errors (the memory comes back): [`Error::ZeroSize`], [`Error::OutOfRange`] beyond the
    /// memory.
    #[allow(clippy::result_large_err)]
    pub fn new(
        mem: DmaMemory<'p, P>,
        offset: u64,
        len: u64,
    ) -> core::result::Result<Self, (Error, DmaMemory<'p, P>)> {
        if len == 0 {
            return Err((Error::ZeroSize, mem));
        }
        match offset.checked_add(len) {
            Some(end) if end <= mem.len() => Ok(Part { mem, offset, len }),
            _ => {
                let limit = mem.len();
                Err((Error::OutOfRange { addr: offset.saturating_add(len), limit }, mem))
            }
        }
    }

    /// The whole memory.
    pub fn memory(&self) -> &DmaMemory<'p, P> {
        &self.mem
    }

    /// Narrows the part by `front` bytes at its start and `back` at its end.
    ///
    /// The caller keeps the invariant: `front + back < self.len`.
    pub(super) fn narrow(&mut self, front: u64, back: u64) {
        debug_assert!(front + back < self.len);
        self.offset += front;
        self.len -= front + back;
    }

    /// The memory, given back.
    pub fn into_memory(self) -> DmaMemory<'p, P> {
        self.mem
    }

    /// Offset of the part in the memory.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length of the part.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<P: Platform> sealed::Sealed for Part<'_, P> {}
impl<'p, P: Platform> DmaBuffer<'p, P> for Part<'p, P> {
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        f(Run::page(p, PhysAddr::new(self.mem.pa().raw() + self.offset), self.len))
    }

    fn quarantine(self, keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        keep(self.mem);
    }
}

/// What a [`DeviceRegion`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Device registers (a doorbell, a controller memory buffer).
    Mmio,
    /// A BAR of a peer device; `bus` is where this device reaches it bypassing the IOMMU, if
    /// the fabric routes it so.
    PeerBar {
        /// Bus address of the region's first byte, bypassing the IOMMU.
        bus: Option<Iova>,
    },
    /// Memory with neither a page descriptor nor a kernel mapping (persistent memory the kernel
    /// does not map, another guest's memory).
    Unmapped,
}

/// A range of device memory (or memory outside the kernel's allocator) that devices may be
/// given, described once by the bus or platform code that owns it, then loaded by drivers
/// without `unsafe` ([`DeviceRegion::slice`]).
///
/// # Invariants
///
/// `[pa, pa + len)` is a valid, non-wrapping range that the `new` caller promised.
#[derive(Debug)]
pub struct DeviceRegion {
    pa: PhysAddr,
    len: u64,
    kind: RegionKind,
}

impl DeviceRegion {
    /// Describes `[pa, pa + len)` as device memory of `kind`.
    ///
    /// # Safety
    ///
    /// For as long as the returned region (or any slice of it) lives, the range is what `kind`
    /// says and any device busdma maps it for may access it: it is not RAM that Rust's
    /// allocator or anyone else hands out, and (for a peer BAR with `bus`) the device reaches
    /// it at that bus address. busdma never reads or writes it with the CPU.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::Overflow`] (the range wraps).
    #[allow(unsafe_code)]
    pub unsafe fn new(pa: PhysAddr, len: u64, kind: RegionKind) -> Result<Arc<Self>> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        pa.raw().checked_add(len).ok_or(Error::Overflow { base: pa.raw(), len })?;
        // INVARIANT: a non-wrapping range, promised by the caller.
        Ok(Arc::new(Self { pa, len, kind }))
    }

    /// First byte.
    pub fn pa(&self) -> PhysAddr {
        self.pa
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What the region is.
    pub fn kind(&self) -> RegionKind {
        self.kind
    }

    /// `[offset, offset + len)` of the region, as a loadable buffer that keeps the region
    /// alive.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::OutOfRange`] beyond the region.
    pub fn slice(self: &Arc<Self>, offset: u64, len: u64) -> Result<RegionSlice> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(RegionSlice { region: self.clone(), offset, len }),
            _ => Err(Error::OutOfRange { addr: offset.saturating_add(len), limit: self.len }),
        }
    }
}

/// Part of a [`DeviceRegion`], loadable into an [`OwnedMap`].
///
/// # Invariants
///
/// `len > 0` and `offset + len <= region.len()`.
#[derive(Clone, Debug)]
pub struct RegionSlice {
    region: Arc<DeviceRegion>,
    offset: u64,
    len: u64,
}

impl sealed::Sealed for RegionSlice {}
impl<'p, P: Platform> DmaBuffer<'p, P> for RegionSlice {
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, _p: &P, f: &mut F) -> Result<()> {
        let pa = PhysAddr::new(self.region.pa.raw() + self.offset);
        let kind = match self.region.kind {
            RegionKind::Mmio => MemKind::Mmio,
            RegionKind::Unmapped => MemKind::Unmapped,
            RegionKind::PeerBar { bus } => {
                MemKind::PeerBar { bus: bus.map(|b| Iova::new(b.raw().wrapping_add(self.offset))) }
            }
        };
        f(Run { pa, len: self.len, kind, kva: None })
    }

    fn quarantine(self, _keep: &mut dyn FnMut(DmaMemory<'p, P>)) {}
}

impl<B: PinBackend, U: UnpinBarrier> sealed::Sealed for RegisteredBuffer<'_, B, U> {}
/// A registered user buffer (`crate::pin`) as an owned buffer: the map holds the buffer's
/// `mapped` count while it holds the buffer, so the region's last unregistration answers
/// EBUSY and its pages stay pinned; [`OwnedMap::take`] hands it back after the proof, and a
/// buffer whose proof fails is leaked with its count (the pages stay pinned for good, never
/// reused).
impl<'p, P: Platform, B: PinBackend + Sync, U: UnpinBarrier + Sync> DmaBuffer<'p, P>
    for RegisteredBuffer<'_, B, U>
{
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        for (pa, len) in self.segments() {
            f(Run::page(p, pa, len))?;
        }
        Ok(())
    }

    fn quarantine(self, _keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        core::mem::forget(self);
    }
}

impl<B: PinBackend, U: UnpinBarrier> sealed::Sealed for RegisteredIov<'_, B, U> {}
/// An iovec of registered user buffers (a `uio`): as a [`RegisteredBuffer`], entry by entry.
impl<'p, P: Platform, B: PinBackend + Sync, U: UnpinBarrier + Sync> DmaBuffer<'p, P>
    for RegisteredIov<'_, B, U>
{
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        self.buffers().iter().try_for_each(|b| DmaBuffer::<P>::for_each_run(b, p, f))
    }

    fn quarantine(self, _keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        core::mem::forget(self);
    }
}

impl<B: sealed::Sealed, const N: usize> sealed::Sealed for [B; N] {}
impl<'p, P: Platform, B: DmaBuffer<'p, P>, const N: usize> DmaBuffer<'p, P> for [B; N] {
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        self.iter().try_for_each(|b| b.for_each_run(p, f))
    }

    fn quarantine(self, keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        for b in self {
            b.quarantine(keep);
        }
    }
}

impl<B: sealed::Sealed> sealed::Sealed for Vec<B> {}
impl<'p, P: Platform, B: DmaBuffer<'p, P>> DmaBuffer<'p, P> for Vec<B> {
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        self.iter().try_for_each(|b| b.for_each_run(p, f))
    }

    fn quarantine(self, keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        for b in self {
            b.quarantine(keep);
        }
    }
}

impl<A: sealed::Sealed, B: sealed::Sealed> sealed::Sealed for (A, B) {}
impl<'p, P: Platform, A: DmaBuffer<'p, P>, B: DmaBuffer<'p, P>> DmaBuffer<'p, P> for (A, B) {
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        self.0.for_each_run(p, f)?;
        self.1.for_each_run(p, f)
    }

    fn quarantine(self, keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        self.0.quarantine(keep);
        self.1.quarantine(keep);
    }
}

impl<A: sealed::Sealed, B: sealed::Sealed, C: sealed::Sealed> sealed::Sealed for (A, B, C) {}
impl<'p, P: Platform, A: DmaBuffer<'p, P>, B: DmaBuffer<'p, P>, C: DmaBuffer<'p, P>> DmaBuffer<'p, P>
    for (A, B, C)
{
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        self.0.for_each_run(p, f)?;
        self.1.for_each_run(p, f)?;
        self.2.for_each_run(p, f)
    }

    fn quarantine(self, keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        self.0.quarantine(keep);
        self.1.quarantine(keep);
        self.2.quarantine(keep);
    }
}

/// A buffer the map owns, as the run source of its map (private: built only by
/// [`OwnedMap`]). Trusted as a [`LoadSource`](super::load::LoadSource) is: the runs are those of memory the map owns,
/// DMA pages it holds by value (no one else can free, reuse or reference them; they leave the
/// map only after the proof of theory 2, or go to the quarantine) and device regions whose
/// `unsafe` description promised the rest; [`DmaBuffer`] is sealed, so every implementation is
/// this module's.
struct Owned<'x, B>(&'x B);

impl<'p, P: Platform, B: DmaBuffer<'p, P>> RunSource<P> for Owned<'_, B> {
    #[inline]
    fn runs<F: FnMut(Run) -> Result<()>>(&self, p: &P, mut f: F) -> Result<()> {
        self.0.for_each_run(p, &mut f)
    }
}

/// A map that owns what it maps (theory 1–3).
///
/// # Invariants
///
/// `buf` is `Some` whenever `map` is loaded, and `map` holds nothing but `buf`. Field order:
/// the map drops (unloads) before the buffer's teardown in `Drop`.
pub struct OwnedMap<'p, P: Platform, S: Strategy<P>, B: DmaBuffer<'p, P>> {
    map: DmaMap<'p, P, S>,
    buf: Option<B>,
}

impl<'p, P: Platform, S: Strategy<P>> Tag<'p, P, S> {
    /// Creates a map that owns the buffers it loads ([`OwnedMap`]).
    ///
    /// Errors: those of [`Tag::create_map`].
    pub fn create_owned_map<B: DmaBuffer<'p, P>>(&self) -> Result<OwnedMap<'p, P, S, B>> {
        Ok(OwnedMap { map: self.create_map()?, buf: None })
    }
}

impl<'p, P: Platform, S: Strategy<P>, B: DmaBuffer<'p, P>> OwnedMap<'p, P, S, B> {
    /// Moves `buf` into the map and loads it for a transfer in direction `dir`; returns the
    /// segments.
    ///
    /// Errors (the buffer comes back, nothing is mapped): [`Error::BadState`] (the map holds a
    /// buffer already: [`OwnedMap::take`] it first), and those of [`DmaMap::load`].
    #[allow(clippy::result_large_err)]
    pub fn load(&mut self, buf: B, dir: Direction) -> core::result::Result<&[Segment], (Error, B)> {
        if self.buf.is_some() {
            return Err((Error::BadState { what: "owned load into a map that holds a buffer" }, buf));
        }
        match self.map.load_from(&Owned(&buf), dir).map(|_| ()) {
            Ok(()) => {
                // INVARIANT: loaded exactly with `buf`, which the map now owns.
                self.buf = Some(buf);
                Ok(self.map.segments())
            }
            Err(e) => Err((e, buf)),
        }
    }

    /// Unloads the held buffer and loads it again in direction `dir` (theory 2: the buffer
    /// never leaves the map, so no proof is needed).
    ///
    /// Errors: [`Error::BadState`] (no buffer held), those of [`DmaMap::unload`] (the map is
    /// unloaded all the same; the reload is not attempted) and of [`DmaMap::load`] (the map
    /// stays unloaded, the buffer held).
    pub fn reload(&mut self, dir: Direction) -> Result<&[Segment]> {
        let Some(buf) = self.buf.as_ref() else {
            return Err(Error::BadState { what: "reload of an owned map that holds no buffer" });
        };
        if self.map.is_loaded() {
            self.map.unload()?;
        }
        self.map.load_from(&Owned(buf), dir)
    }

    /// Unloads the map, keeping the buffer (reach it with [`OwnedMap::buffer`], load it again
    /// with [`OwnedMap::reload`], hand it out with [`OwnedMap::take`]).
    ///
    /// Errors: those of [`DmaMap::unload`].
    pub fn unload(&mut self) -> Result<()> {
        self.map.unload()
    }

    /// Hands the buffer back: unloads if loaded, then asks the tag's proof that no translation
    /// reaches it ([`Tag::wait_unmapped`]).
    ///
    /// Errors: [`Error::BadState`] (no buffer); the unload's or the proof's error
    /// ([`Error::InvalidationFailed`]): the buffer stays in the map (unloaded), and `take` may
    /// be retried; dropping the map then quarantines it.
    pub fn take(&mut self) -> Result<B> {
        if self.buf.is_none() {
            return Err(Error::BadState { what: "take from an owned map that holds no buffer" });
        }
        if self.map.is_loaded() {
            self.map.unload()?;
        }
        self.map.tag().wait_unmapped()?;
        self.buf.take().ok_or(Error::BadState { what: "owned buffer vanished" })
    }

    /// Makes the CPU's and the device's views agree ([`DmaMap::sync`]).
    ///
    /// Errors: those of [`DmaMap::sync`].
    pub fn sync(&mut self, op: SyncOp) -> Result<SyncStats> {
        self.map.sync(op)
    }

    /// Makes the CPU's and the device's views of bytes `[offset, offset + len)` of the load
    /// agree ([`DmaMap::sync_range`]).
    ///
    /// Errors: those of [`DmaMap::sync_range`].
    pub fn sync_range(&mut self, op: SyncOp, offset: u64, len: u64) -> Result<SyncStats> {
        self.map.sync_range(op, offset, len)
    }

    /// The segments of the current load (empty when unloaded).
    pub fn segments(&self) -> &[Segment] {
        self.map.segments()
    }

    /// Whether the map is loaded.
    pub fn is_loaded(&self) -> bool {
        self.map.is_loaded()
    }

    /// The held buffer, if any: its DMA memory is reached by copy
    /// ([`DmaMemory::read`]/[`DmaMemory::write`]), never by reference.
    pub fn buffer(&self) -> Option<&B> {
        self.buf.as_ref()
    }

    /// The underlying map (segments, runs, ids).
    pub fn map(&self) -> &DmaMap<'p, P, S> {
        &self.map
    }
}

impl<'p, P: Platform, S: Strategy<P>, B: DmaBuffer<'p, P>> Drop for OwnedMap<'p, P, S, B> {
    fn drop(&mut self) {
        let Some(buf) = self.buf.take() else { return };
        if self.map.is_loaded() {
            // Its outcome does not matter: the proof below covers a failed unload too (it
            // recovers the degraded domain or fails).
            let _ = self.map.unload();
        }
        let tag = self.map.tag();
        match tag.wait_unmapped() {
            Ok(()) => drop(buf),
            Err(_) => buf.quarantine(&mut |mem| tag.quarantine.hold(mem)),
        }
    }
}

impl<'p, P: Platform, S: Strategy<P>, B: DmaBuffer<'p, P> + core::fmt::Debug> core::fmt::Debug
    for OwnedMap<'p, P, S, B>
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("OwnedMap").field("map", &self.map).field("buf", &self.buf).finish()
    }
}
