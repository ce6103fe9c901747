//! The registry of one address space, its read sections, containers and registered buffers.
//!
//! See the module theory in `pin/mod.rs`; the index is in `tree.rs`, the grace periods in
//! `epoch.rs`, the counters in `region.rs`.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::ptr::NonNull;

use super::epoch::Epoch;
use super::pageidx::{PageIndex, PageMeta, RetiredNode};
use super::region::Region;
use super::tree::{Hit, Leaf, Snapshot, free_leaf};
use super::{NoBarrier, PinBackend, UnpinBarrier};
use crate::addr::{AddrRange, PAGE_SHIFT, PAGE_SIZE, PhysAddr, UserVa};
use crate::error::{Error, Result};
use crate::sync::{AtomicPtr, AtomicU64, Ordering, SpinLock, spin_hint};

/// What a registration produced: the region as registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// First user address.
    pub ua: UserVa,
    /// Size in bytes.
    pub size: u64,
    /// Registrations of the range after this one (`used`).
    pub used: u64,
    /// log2 of the largest IOMMU page that may map the region.
    pub page_shift: u32,
}

impl RegionInfo {
    fn of(r: &Region) -> Self {
        Self { ua: r.ua(), size: r.size(), used: r.used(), page_shift: r.page_shift() }
    }
}

/// Counters a user can read ([`Registry::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinStats {
    /// Regions registered now.
    pub regions: u64,
    /// Pages pinned through the backend, ever.
    pub pages_pinned: u64,
    /// Pages unpinned through the backend, ever.
    pub pages_unpinned: u64,
    /// Bytes charged against the memlock limit now.
    pub charged: u64,
    /// Retired objects (index versions, leaves, regions) waiting for their grace period.
    pub garbage: u64,
    /// Container releases whose unregistration answered EBUSY (the region stays registered
    /// until a later unregistration or the registry's teardown).
    pub busy_at_container_release: u64,
    /// Calls of the unpin barrier (one per batch of regions unpinned together, never one
    /// per DMA unload; `pin/mod.rs`, theory 7).
    pub unpin_barriers: u64,
    /// Barrier calls that failed (pin/mod.rs, theory 8): their regions stayed pinned for a
    /// later retry.
    pub unpin_barrier_failures: u64,
    /// Pages of released regions held pinned now because their barrier failed.
    pub pages_held: u64,
    /// Nodes of the direct page index linked now (4 KiB each; `pageidx.rs` theory 4).
    pub index_nodes: u64,
}

/// What tearing a registry down released.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Regions released.
    pub regions: u64,
    /// Pages unpinned (regions released now and retired ones freed at the same time).
    pub pages_unpinned: u64,
    /// Regions that were still DMA-mapped: `(ua, size, live mappings)`. Their pins are
    /// released anyway (the address space is gone); each was also reported to the backend.
    pub still_mapped: Vec<(UserVa, u64, u64)>,
    /// Pages left pinned for good because the unpin barrier failed at teardown (pin/mod.rs,
    /// theory 8): a device may still reach them, so they are never handed back.
    pub pins_held: u64,
    /// The barrier's error, if it failed.
    pub barrier_error: Option<crate::Error>,
}

/// Memory retired by a writer, freed after its grace period.
enum Garbage {
    Snapshot(NonNull<Snapshot>),
    Leaf(NonNull<Leaf>),
    Region(NonNull<Region>),
    /// A node of the direct page index an unregistration emptied.
    PageNode(RetiredNode),
}

/// State only writers touch, under the writer lock.
struct Writer {
    /// Bytes charged against the memlock limit (regions registered or being pinned).
    charged: u64,
    /// Retired memory and the epoch it was retired in.
    garbage: Vec<(usize, Garbage)>,
    /// The direct page index's side table (`pageidx.rs` theory 4).
    page_meta: PageMeta,
}

// SAFETY: the pointers in `Writer` are owned by it (retired memory no reader will reach once
// its grace period ends); moving that ownership between threads is sound because `Region`,
// `Leaf` and `Snapshot` hold only plain data, raw pointers to each other, and atomics.
unsafe impl Send for Writer {}

/// The pre-registered memory of one address space, waiting on `U` before it unpins
/// (`pin/mod.rs`, theory 7).
///
/// # Invariants
///
/// - `root` points to the current `Snapshot` (a leaked `Box`), null only after teardown. The
///   current snapshot's leaves and regions are owned by the registry; everything a previous
///   snapshot reached but the current one does not is in `Writer::garbage`.
/// - Every region reachable from `root` has `mapped >= 1`; a region whose `mapped` became 0
///   was unlinked under the same lock hold.
/// - `Writer::charged` is the total size of the regions in the index plus registrations being
///   pinned, and never exceeds `memlock_limit`.
/// - No page of a region that was ever published is unpinned before a call of `barrier`
///   that began after the region was unlinked (or, at teardown, after the last borrow ended).
pub struct Registry<B: PinBackend, U: UnpinBarrier = NoBarrier> {
    root: AtomicPtr<Snapshot>,
    /// The direct page index (`pageidx.rs`): the translation fast path.
    pages: PageIndex,
    epoch: Epoch,
    writer: SpinLock<Writer>,
    memlock_limit: u64,
    pages_pinned: AtomicU64,
    pages_unpinned: AtomicU64,
    busy_at_release: AtomicU64,
    unpin_barriers: AtomicU64,
    unpin_barrier_failures: AtomicU64,
    pages_held: AtomicU64,
    backend: B,
    barrier: U,
}

// SAFETY: readers share only atomics and immutable published memory; writers serialise on the
// spin lock. The backend is shared by reference from several threads, hence `B: Sync`.
unsafe impl<B: PinBackend + Sync, U: UnpinBarrier + Sync> Sync for Registry<B, U> {}
// SAFETY: the registry owns its memory outright (leaked boxes reachable from `root` or the
// garbage list); moving it moves that ownership.
unsafe impl<B: PinBackend + Send, U: UnpinBarrier + Send> Send for Registry<B, U> {}

/// Checks a registration's range; returns its page count.
fn check_range(ua: UserVa, size: u64) -> Result<usize> {
    if size == 0 {
        return Err(Error::ZeroSize);
    }
    if !ua.is_aligned(PAGE_SIZE) {
        return Err(Error::Misaligned { value: ua.raw(), align: PAGE_SIZE });
    }
    if size % PAGE_SIZE != 0 {
        return Err(Error::Misaligned { value: size, align: PAGE_SIZE });
    }
    AddrRange::from_start_len(ua, size)?;
    usize::try_from(size >> PAGE_SHIFT).map_err(|_| Error::BadSize { size, limit: usize::MAX as u64 })
}

impl<B: PinBackend> Registry<B> {
    /// An empty registry pinning through `backend`, charging at most `memlock_limit` bytes,
    /// with no unpin barrier: for DMA through strict invalidation or no IOMMU (use
    /// [`Registry::with_barrier`] under deferred invalidation).
    ///
    /// Errors: [`Error::Unsupported`] if the backend pins pages other than 4 KiB.
    pub fn new(backend: B, memlock_limit: u64) -> Result<Self> {
        Registry::with_barrier(backend, memlock_limit, NoBarrier)
    }
}

impl<B: PinBackend, U: UnpinBarrier> Registry<B, U> {
    /// An empty registry pinning through `backend`, charging at most `memlock_limit` bytes,
    /// calling `barrier` before it unpins released regions (`pin/mod.rs`, theory 7): the
    /// IOMMU domains (or front-end tags) its registered buffers are loaded through.
    ///
    /// Errors: [`Error::Unsupported`] if the backend pins pages other than 4 KiB.
    pub fn with_barrier(backend: B, memlock_limit: u64, barrier: U) -> Result<Self> {
        if backend.page_shift() != PAGE_SHIFT {
            return Err(Error::Unsupported { what: "pin backend page size other than 4 KiB" });
        }
        let pages = PageIndex::new()?;
        let empty = Box::into_raw(Box::new(Snapshot::default()));
        Ok(Self {
            root: AtomicPtr::new(empty),
            pages,
            epoch: Epoch::new(),
            writer: SpinLock::new(Writer { charged: 0, garbage: Vec::new(), page_meta: PageMeta::default() }),
            memlock_limit,
            pages_pinned: AtomicU64::new(0),
            pages_unpinned: AtomicU64::new(0),
            busy_at_release: AtomicU64::new(0),
            unpin_barriers: AtomicU64::new(0),
            unpin_barrier_failures: AtomicU64::new(0),
            pages_held: AtomicU64::new(0),
            backend,
            barrier,
        })
    }

    /// The unpin barrier.
    pub fn barrier(&self) -> &U {
        &self.barrier
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The memlock limit in bytes.
    pub fn memlock_limit(&self) -> u64 {
        self.memlock_limit
    }

    /// The current index, seen by the writer-lock holder (`_w` proves it).
    fn current<'a>(&'a self, _w: &'a Writer) -> &'a Snapshot {
        // SAFETY: only writer-lock holders replace `root`, and a replaced snapshot is freed
        // only by a later lock holder after its grace period: while we hold the lock (the
        // borrow of `_w`) the current snapshot stays valid. Non-null: teardown needs `&mut`.
        unsafe { &*self.root.load(Ordering::Acquire) }
    }

    /// `Some` for an identical registration (after counting it), `None` if the range is
    /// free, an error if it overlaps a different registration.
    fn reuse_or_refuse(snap: &Snapshot, ua: UserVa, end: u64) -> Result<Option<RegionInfo>> {
        match snap.overlapping(ua.raw(), end) {
            None => Ok(None),
            Some(hit) if hit.start == ua.raw() && hit.end == end => {
                // SAFETY: regions reachable from the current snapshot are live (type invariant).
                let region = unsafe { hit.region.as_ref() };
                region.get();
                Ok(Some(RegionInfo::of(region)))
            }
            Some(hit) => Err(Error::AlreadyMapped { addr: hit.start.max(ua.raw()) }),
        }
    }

    /// Registers `[ua, ua + size)`: pins every page and records its physical address. The
    /// same range registered again counts one more `used` and pins nothing.
    ///
    /// Process context (allocates, calls the backend, may spin on the writer lock); never
    /// call it from inside a read section of this registry.
    ///
    /// Errors: [`Error::ZeroSize`]; [`Error::Misaligned`] (start or size not 4 KiB-aligned);
    /// [`Error::Overflow`] (the range wraps); [`Error::AlreadyMapped`] (overlaps a different
    /// registration); [`Error::LimitExceeded`] (memlock); [`Error::NoMemory`] (the array);
    /// whatever the backend answers ([`Error::NotMapped`] for memory not mapped in the
    /// address space). On error nothing stays pinned or charged.
    pub fn register(&self, ua: UserVa, size: u64) -> Result<RegionInfo> {
        let pages = check_range(ua, size)?;
        let end = ua.raw() + size; // checked by `check_range`
        {
            let mut w = self.writer.lock();
            if let Some(info) = Self::reuse_or_refuse(self.current(&w), ua, end)? {
                return Ok(info);
            }
            let requested = w.charged.saturating_add(size);
            if requested > self.memlock_limit {
                return Err(Error::LimitExceeded { what: "memlock", requested, limit: self.memlock_limit });
            }
            w.charged = requested;
        }
        // Pin outside the lock: the backend may sleep, and other writers need not wait.
        let uncharge = |e: Error| {
            self.writer.lock().charged -= size;
            Err(e)
        };
        let mut hpas = Vec::new();
        if hpas.try_reserve_exact(pages).is_err() {
            return uncharge(Error::NoMemory { requested: pages as u64 * 8 });
        }
        hpas.resize(pages, PhysAddr::new(0));
        if let Err(e) = self.backend.pin(ua, &mut hpas) {
            return uncharge(e);
        }
        self.pages_pinned.fetch_add(pages as u64, Ordering::Relaxed);
        let region = Box::new(Region::new(ua, hpas.into_boxed_slice()));

        let mut w = self.writer.lock();
        // Another writer may have registered an identical or overlapping range meanwhile.
        match Self::reuse_or_refuse(self.current(&w), ua, end) {
            Ok(None) => {}
            raced => {
                w.charged -= size;
                drop(w);
                self.release_pins(&region);
                return raced.map(|info| info.unwrap_or_else(|| RegionInfo::of(&region)));
            }
        }
        if let Err(e) = self.pages.insert(&mut w.page_meta, ua.raw(), region.hpas(), region.page_shift()) {
            // No slot was set (`PageIndex::insert`): undo the registration.
            w.charged -= size;
            drop(w);
            self.release_pins(&region);
            return Err(e);
        }
        let info = RegionInfo::of(&region);
        let region = Box::leak(region);
        let hit = Hit::of(ua.raw(), end, NonNull::from(&*region), region);
        let (next, old_leaf) = self.current(&w).inserted(hit);
        self.publish(&mut w, next, old_leaf.map(Garbage::Leaf), None);
        // A failing unpin barrier holds released regions back (theory 8 of pin/mod.rs): this
        // registration is done, and `synchronize` or the next writer retries them.
        let _held = self.finish(w);
        Ok(info)
    }

    /// Unregisters `[ua, ua + size)`, exactly as registered. With other registrations of it
    /// left (`used > 1`) this only counts one down; the last one unpins the pages (after the
    /// grace period), unless the region is DMA-mapped: then it answers EBUSY and `used`
    /// stays 1, so user space knows the memory is still pinned and retries later.
    ///
    /// Process context (may spin on the writer lock); never call it inside a read section.
    ///
    /// Errors: [`Error::NotMapped`] (no registration of exactly this range);
    /// [`Error::Busy`] (last registration, `count` DMA mappings live).
    pub fn unregister(&self, ua: UserVa, size: u64) -> Result<()> {
        let not_registered = Error::NotMapped { addr: ua.raw() };
        let mut w = self.writer.lock();
        let snap = self.current(&w);
        let hit = snap
            .find(ua.raw())
            .filter(|h| h.start == ua.raw() && Some(h.end) == ua.raw().checked_add(size))
            .ok_or(not_registered)?;
        // SAFETY: regions reachable from the current snapshot are live (type invariant).
        let region = unsafe { hit.region.as_ref() };
        if region.put() > 0 {
            return Ok(());
        }
        if let Err(mappings) = region.try_release() {
            region.get();
            return Err(Error::Busy { what: "registered region (still DMA-mapped)", count: mappings });
        }
        // INVARIANT: `mapped` is 0 now; unlink the region under this same lock hold.
        let Some((next, old_leaf)) = snap.removed(ua.raw()) else {
            // Unreachable: `find` just returned this range. Undo rather than panic.
            region.get();
            return Err(Error::BadState { what: "registry index lost a region" });
        };
        w.charged -= size;
        // Clear the page index (with its fence) before the region is retired in `publish`.
        let mut nodes = Vec::new();
        self.pages.remove(&mut w.page_meta, ua.raw(), region.pages() as usize, &mut nodes);
        let tag =
            self.publish(&mut w, next, Some(Garbage::Leaf(old_leaf)), Some(Garbage::Region(hit.region)));
        w.garbage.extend(nodes.into_iter().map(|n| (tag, Garbage::PageNode(n))));
        // The unregistration took effect; if the barrier fails, the pages stay pinned until a
        // later writer or `synchronize` gets it through (theory 8 of pin/mod.rs).
        let _held = self.finish(w);
        Ok(())
    }

    /// Publishes `next` as the current index and retires the old one with `extra`; returns
    /// the epoch they were retired in.
    fn publish(
        &self,
        w: &mut Writer,
        next: Snapshot,
        leaf: Option<Garbage>,
        region: Option<Garbage>,
    ) -> usize {
        let next = Box::into_raw(Box::new(next));
        // SeqCst: readers that load the old root are ordered before this store, and so before
        // the epoch advances that free what it reached (epoch.rs, section 5).
        let old = self.root.swap(next, Ordering::SeqCst);
        let tag = self.epoch.now();
        if let Some(old) = NonNull::new(old) {
            w.garbage.push((tag, Garbage::Snapshot(old)));
        }
        w.garbage.extend(leaf.map(|g| (tag, g)));
        w.garbage.extend(region.map(|g| (tag, g)));
        tag
    }

    /// Advances the epoch as far as readers allow, drops the lock, frees what is past its
    /// grace period. Returns whether garbage remains.
    ///
    /// Errors: the unpin barrier's (`pin/mod.rs`, theory 8). The regions it guarded went back
    /// on the garbage list, pinned; everything else past its grace period was freed.
    fn finish(&self, mut w: crate::sync::SpinGuard<'_, Writer>) -> Result<bool> {
        // Two advances: memory retired now becomes free at `now + 2` (epoch.rs, section 5).
        self.epoch.try_advance();
        self.epoch.try_advance();
        let mut ready = Vec::new();
        let mut i = 0;
        while i < w.garbage.len() {
            if self.epoch.is_safe(w.garbage[i].0) {
                ready.push(w.garbage.swap_remove(i));
            } else {
                i += 1;
            }
        }
        let remains = !w.garbage.is_empty();
        drop(w);
        let mut held = Ok(());
        if ready.iter().any(|(_, g)| matches!(g, Garbage::Region(_))) {
            // Theory 7: every unmap of these regions returned before they were unlinked.
            if let Err(e) = self.unpin_barrier() {
                // Theory 8: hold them back, unreachable but pinned, with their (past) grace
                // tags, so the next `finish` retries the barrier at once.
                let (regions, rest): (Vec<_>, Vec<_>) =
                    ready.into_iter().partition(|(_, g)| matches!(g, Garbage::Region(_)));
                ready = rest;
                self.writer.lock().garbage.extend(regions);
                held = Err(e);
            }
        }
        for (_, g) in ready {
            // SAFETY: each object was retired once, and its grace period has passed: no
            // reader can reach it any more.
            unsafe { self.free(g) };
        }
        held.map(|()| remains)
    }

    /// Frees one retired object; a region's pages are unpinned.
    ///
    /// # Safety
    ///
    /// `g` was retired once and no reader can reach it.
    unsafe fn free(&self, g: Garbage) {
        match g {
            // SAFETY: leaked boxes, unreachable, freed once (caller).
            Garbage::Snapshot(s) => drop(unsafe { Box::from_raw(s.as_ptr()) }),
            // SAFETY: as above.
            Garbage::Leaf(l) => unsafe { free_leaf(l) },
            Garbage::Region(r) => {
                // SAFETY: as above.
                let region = unsafe { Box::from_raw(r.as_ptr()) };
                self.release_pins(&region);
            }
            // SAFETY: as above.
            Garbage::PageNode(n) => unsafe { n.free() },
        }
    }

    /// Waits for the barrier (theory 7), counted, failures too (theory 8).
    fn unpin_barrier(&self) -> Result<()> {
        self.unpin_barriers.fetch_add(1, Ordering::Relaxed);
        let r = self.barrier.wait_unmapped();
        if r.is_err() {
            self.unpin_barrier_failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn release_pins(&self, region: &Region) {
        self.backend.unpin(region.ua(), region.hpas());
        self.pages_unpinned.fetch_add(region.pages(), Ordering::Relaxed);
    }

    /// Waits until every retired object has been freed (and retired regions unpinned).
    ///
    /// Spins while readers stay in their sections: never call it inside a read section.
    ///
    /// Errors: the unpin barrier's ([`crate::Error::InvalidationFailed`], `pin/mod.rs`
    /// theory 8): the released regions stay pinned and a later call retries them.
    pub fn synchronize(&self) -> Result<()> {
        while self.finish(self.writer.lock())? {
            spin_hint();
        }
        Ok(())
    }

    /// Enters a read section: lookups and translations without locks or allocation.
    ///
    /// Never sleeps, never blocks on writers; callable with preemption disabled.
    #[inline]
    pub fn read(&self) -> ReadGuard<'_, B, U> {
        let slot = self.epoch.enter();
        let snap = self.root.load(Ordering::Acquire);
        // INVARIANT: `root` is non-null while the registry is shared (teardown needs `&mut`),
        // and the snapshot stays valid until we leave the section.
        let snap = NonNull::new(snap).unwrap_or(NonNull::dangling());
        ReadGuard { reg: self, slot, snap, _not_send: PhantomData }
    }

    /// `ua` translated for an IOMMU page of `1 << iommu_shift` bytes, in a read section of its
    /// own (see [`ReadGuard::ua_to_pa`]).
    pub fn ua_to_pa(&self, ua: UserVa, iommu_shift: u32) -> Result<PhysAddr> {
        self.read().ua_to_pa(ua, iommu_shift)
    }

    /// The region containing `[ua, ua + size)`, described (see [`ReadGuard::lookup`]).
    pub fn lookup(&self, ua: UserVa, size: u64) -> Option<RegionInfo> {
        self.read().lookup(ua, size).map(RegionInfo::of)
    }

    /// Loads the registered user buffer `[ua, ua + len)` for DMA: pins nothing, counts one
    /// mapping (`mapped += 1`) until the returned buffer drops.
    ///
    /// Lock-free, allocation-free, never sleeps. Errors: [`Error::ZeroSize`],
    /// [`Error::Overflow`], [`Error::NotMapped`] (no region contains the whole buffer),
    /// [`Error::BadState`] (the region is being released: `mapped` reached 0).
    pub fn load(&self, ua: UserVa, len: u64) -> Result<RegisteredBuffer<'_, B, U>> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        AddrRange::from_start_len(ua, len)?;
        let guard = self.read();
        let region = guard.lookup(ua, len).ok_or(Error::NotMapped { addr: ua.raw() })?;
        region.mapped_inc()?;
        // INVARIANT: our count keeps `mapped >= 2`, so the last unregistration answers EBUSY
        // and the region is not freed; teardown needs `&mut self`, which our borrow excludes.
        Ok(RegisteredBuffer { reg: self, region: NonNull::from(region), ua, len })
    }

    /// Loads an iovec of registered user buffers (a `uio`: the pieces of one `readv`/`writev`)
    /// for DMA, one [`RegisteredBuffer`] per non-empty entry, in order. Empty entries are
    /// skipped, as `readv` does. All or nothing: on an error every count taken so far is
    /// given back before it returns.
    ///
    /// Allocates the entry vector; never sleeps. Errors: [`Error::ZeroSize`] (no byte in
    /// the whole iovec), [`Error::TooManySegments`] (more than [`IOV_MAX`] entries),
    /// [`Error::Overflow`] (the total does not fit in 64 bits), and those of
    /// [`Registry::load`] for the first entry that fails.
    pub fn load_iov(&self, iov: &[(UserVa, u64)]) -> Result<RegisteredIov<'_, B, U>> {
        if iov.len() > IOV_MAX {
            return Err(Error::TooManySegments { needed: iov.len() as u64, max: IOV_MAX as u64 });
        }
        let mut bufs = Vec::with_capacity(iov.len());
        let mut len = 0u64;
        for &(ua, n) in iov.iter().filter(|e| e.1 != 0) {
            len = len.checked_add(n).ok_or(Error::Overflow { base: len, len: n })?;
            bufs.push(self.load(ua, n)?);
        }
        if bufs.is_empty() {
            return Err(Error::ZeroSize);
        }
        Ok(RegisteredIov { bufs, len })
    }

    /// Counters.
    pub fn stats(&self) -> PinStats {
        let w = self.writer.lock();
        PinStats {
            regions: self.current(&w).len() as u64,
            pages_pinned: self.pages_pinned.load(Ordering::Relaxed),
            pages_unpinned: self.pages_unpinned.load(Ordering::Relaxed),
            charged: w.charged,
            garbage: w.garbage.len() as u64,
            busy_at_container_release: self.busy_at_release.load(Ordering::Relaxed),
            unpin_barriers: self.unpin_barriers.load(Ordering::Relaxed),
            unpin_barrier_failures: self.unpin_barrier_failures.load(Ordering::Relaxed),
            pages_held: self.pages_held.load(Ordering::Relaxed),
            index_nodes: w.page_meta.nodes() as u64,
        }
    }

    /// Tears the registry down (the address space is going away): releases every region and
    /// every pin whatever the counters say, and reports regions still DMA-mapped.
    pub fn cleanup(mut self) -> CleanupReport {
        self.teardown()
    }

    fn teardown(&mut self) -> CleanupReport {
        let mut report = CleanupReport::default();
        let before = self.pages_unpinned.load(Ordering::Relaxed);
        // `&mut self`: no reader and no writer exists, every grace period is over.
        let garbage = core::mem::take(&mut self.writer.get_mut().garbage);
        let root = self.root.swap(core::ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: `root` is the current snapshot or null; nobody else can reach it now.
        let regions = NonNull::new(root).map_or(0, |r| unsafe { r.as_ref() }.len());
        if regions > 0 || garbage.iter().any(|(_, g)| matches!(g, Garbage::Region(_))) {
            // Theory 7: the last unmap of every region returned before `&mut self` existed.
            report.barrier_error = self.unpin_barrier().err();
        }
        let unpin = report.barrier_error.is_none();
        for (_, g) in garbage {
            match g {
                Garbage::Region(r) if !unpin => {
                    // SAFETY: retired once, and no reader exists any more.
                    let region = unsafe { Box::from_raw(r.as_ptr()) };
                    // Theory 8: a device may still reach these pages; they stay pinned.
                    report.pins_held += region.pages();
                }
                // SAFETY: retired once, and no reader exists any more.
                g => unsafe { self.free(g) },
            }
        }
        let Some(root) = NonNull::new(root) else { return report };
        // SAFETY: the current snapshot, a leaked box owned by the registry; nobody else can
        // reach it now.
        let snap = unsafe { Box::from_raw(root.as_ptr()) };
        for hit in snap.all() {
            // SAFETY: regions of the current snapshot are owned by the registry, freed once.
            let region = unsafe { Box::from_raw(hit.region.as_ptr()) };
            let mappings = region.mapped().saturating_sub(1);
            if mappings > 0 {
                self.backend.report_still_mapped(region.ua(), region.size(), mappings);
                report.still_mapped.push((region.ua(), region.size(), mappings));
            }
            if unpin {
                self.release_pins(&region);
            } else {
                report.pins_held += region.pages();
            }
            report.regions += 1;
        }
        for &leaf in snap.leaves() {
            // SAFETY: leaves of the current snapshot are owned by the registry, freed once.
            unsafe { free_leaf(leaf) };
        }
        self.writer.get_mut().charged = 0;
        // SAFETY: `&mut self`: no reader or writer; the index is only dropped after this.
        unsafe { self.pages.free_nodes(&mut self.writer.get_mut().page_meta) };
        report.pages_unpinned = self.pages_unpinned.load(Ordering::Relaxed) - before;
        report
    }
}

impl<B: PinBackend, U: UnpinBarrier> Drop for Registry<B, U> {
    fn drop(&mut self) {
        // Reports reach the backend (`report_still_mapped`) even when nobody called
        // `cleanup`: a registry dropped with regions still mapped is never a silent leak.
        self.teardown();
    }
}

/// Lookups [`ReadGuard::ua_to_pa_batch`] advances in lockstep: 16 independent cache misses in
/// flight is about what a core's fill buffers (10 to 16 on current x86 and Arm cores) sustain.
pub const BATCH_GROUP: usize = 16;

/// A read section of a [`Registry`]: lookups and translations without locks or allocation.
///
/// Hold it for a batch of translations, not one each (a section costs two atomic increments).
/// Never register or unregister while holding it.
pub struct ReadGuard<'r, B: PinBackend, U: UnpinBarrier = NoBarrier> {
    reg: &'r Registry<B, U>,
    slot: usize,
    snap: NonNull<Snapshot>,
    _not_send: PhantomData<*const ()>,
}

impl<B: PinBackend, U: UnpinBarrier> ReadGuard<'_, B, U> {
    #[inline]
    fn snapshot(&self) -> &Snapshot {
        // SAFETY: the snapshot was current when the section began, and memory reachable then
        // is freed only after the section ends (epoch.rs, section 5).
        unsafe { self.snap.as_ref() }
    }

    #[inline]
    fn region(&self, hit: Hit) -> &Region {
        // SAFETY: as for the snapshot: the region was reachable when the section began.
        unsafe { hit.region.as_ref() }
    }

    /// The region containing the whole of `[ua, ua + size)`, if any (`mm_iommu_lookup`).
    #[inline]
    pub fn lookup(&self, ua: UserVa, size: u64) -> Option<&Region> {
        let hit = self.snapshot().find(ua.raw())?;
        let region = self.region(hit);
        region.contains(ua, size).then_some(region)
    }

    /// The region containing `ua`, if any.
    #[inline]
    pub fn find(&self, ua: UserVa) -> Option<&Region> {
        self.snapshot().find(ua.raw()).map(|h| self.region(h))
    }

    /// `ua` translated to its host physical address, for an IOMMU page of `1 << iommu_shift`
    /// bytes: O(1), one walk of the direct page index (`pageidx.rs`); addresses it does not
    /// answer for (not indexed, or a refusal to report) go to [`ReadGuard::ua_to_pa_tree`].
    ///
    /// Errors: [`Error::NotMapped`] (not registered); [`Error::BadSize`] (the IOMMU page is
    /// larger than the region's pinned page size); [`Error::InvalidArgument`] (below 4 KiB).
    #[inline]
    pub fn ua_to_pa(&self, ua: UserVa, iommu_shift: u32) -> Result<PhysAddr> {
        match self.reg.pages.translate(ua.raw(), iommu_shift) {
            Some(pa) => Ok(pa),
            None => self.ua_to_pa_tree(ua, iommu_shift),
        }
    }

    /// [`ReadGuard::ua_to_pa`] through the interval index alone: O(log n) to find the region,
    /// O(1) in its array. The fallback of `ua_to_pa`; public so that benchmarks can compare
    /// the two paths on the same registry.
    ///
    /// Errors: as [`ReadGuard::ua_to_pa`].
    #[inline]
    pub fn ua_to_pa_tree(&self, ua: UserVa, iommu_shift: u32) -> Result<PhysAddr> {
        let Some(hit) = self.snapshot().find(ua.raw()) else {
            return Err(Error::NotMapped { addr: ua.raw() });
        };
        if iommu_shift > hit.page_shift || iommu_shift < PAGE_SHIFT {
            // The rare refusals, with their exact errors.
            return self.region(hit).ua_to_pa(ua, iommu_shift);
        }
        // `find` returned the range holding `ua`: start <= ua < end.
        let off = ua.raw() - hit.start;
        // SAFETY: `hit.hpas` is the region's page array of `(end - start) / 4 KiB` entries
        // (leaf invariant), alive for the section like the region itself; `off < end - start`
        // makes the index in bounds.
        let pa = unsafe { *hit.hpas.add((off >> PAGE_SHIFT) as usize) };
        Ok(PhysAddr::new(pa.raw() | (off & (PAGE_SIZE - 1))))
    }

    /// Translates every address of `uas` into `out` (same length), as [`ReadGuard::ua_to_pa`]
    /// does one: the batch of H_PUT_TCE_INDIRECT, a list of up to 512 entries. Each group of
    /// [`BATCH_GROUP`](crate::pin::BATCH_GROUP) addresses goes through the direct page index;
    /// a group with an address the index does not answer for goes through the interval index,
    /// its lookups advancing in lockstep, each step prefetching what the next reads, so their
    /// cache misses overlap instead of queueing.
    ///
    /// Errors: as [`ReadGuard::ua_to_pa`], for the first address that fails (`out` is then
    /// partly written); [`Error::InvalidArgument`] if the lengths differ.
    pub fn ua_to_pa_batch(&self, uas: &[UserVa], iommu_shift: u32, out: &mut [PhysAddr]) -> Result<()> {
        if uas.len() != out.len() {
            return Err(Error::InvalidArgument { what: "batch output length", value: out.len() as u64 });
        }
        let snap = self.snapshot();
        let missing = |ua: &UserVa| Error::NotMapped { addr: ua.raw() };
        for (uas, out) in uas.chunks(BATCH_GROUP).zip(out.chunks_mut(BATCH_GROUP)) {
            // The direct page index first (one walk each, independent: the core overlaps
            // them); a group with any address it does not answer takes the interval path.
            let mut indexed = true;
            for (o, ua) in out.iter_mut().zip(uas) {
                match self.reg.pages.translate(ua.raw(), iommu_shift) {
                    Some(pa) => *o = pa,
                    None => {
                        indexed = false;
                        break;
                    }
                }
            }
            if indexed {
                continue;
            }
            let mut leaf = [0usize; BATCH_GROUP];
            for (k, ua) in uas.iter().enumerate() {
                leaf[k] = snap.locate(ua.raw()).ok_or_else(|| missing(ua))?;
                snap.prefetch_head(leaf[k]);
            }
            let mut block = [0usize; BATCH_GROUP];
            for (k, ua) in uas.iter().enumerate() {
                block[k] = snap.block(leaf[k], ua.raw());
            }
            let mut slot = [0usize; BATCH_GROUP];
            for (k, ua) in uas.iter().enumerate() {
                slot[k] = snap.slot(leaf[k], block[k], ua.raw()).ok_or_else(|| missing(ua))?;
                snap.prefetch_entry(leaf[k], slot[k]);
            }
            let mut at = [core::ptr::null::<PhysAddr>(); BATCH_GROUP];
            for (k, ua) in uas.iter().enumerate() {
                let hit = snap.hit_at(leaf[k], slot[k]);
                if ua.raw() >= hit.end {
                    return Err(missing(ua));
                }
                if iommu_shift > hit.page_shift || iommu_shift < PAGE_SHIFT {
                    return self.region(hit).ua_to_pa(*ua, iommu_shift).map(|_| ());
                }
                // In bounds: start <= ua < end (see `ua_to_pa`).
                at[k] = hit.hpas.wrapping_add(((ua.raw() - hit.start) >> PAGE_SHIFT) as usize);
                super::tree::prefetch(at[k]);
            }
            for ((o, ua), p) in out.iter_mut().zip(uas).zip(at) {
                // SAFETY: `p` points into a live region's page array, in bounds (above).
                let pa = unsafe { *p };
                *o = PhysAddr::new(pa.raw() | ua.page_offset());
            }
        }
        Ok(())
    }

    /// Number of regions in the section's view.
    pub fn regions(&self) -> usize {
        self.snapshot().len()
    }
}

impl<B: PinBackend, U: UnpinBarrier> Drop for ReadGuard<'_, B, U> {
    #[inline]
    fn drop(&mut self) {
        self.reg.epoch.exit(self.slot);
    }
}

/// A registered user buffer loaded for DMA ([`Registry::load`]): it pinned nothing, and holds
/// one count of its region's `mapped` until dropped.
///
/// # Invariants
///
/// `region` is live: our count keeps its `mapped >= 2`, so it cannot be released, and the
/// borrow of the registry excludes teardown. `[ua, ua + len)` lies inside it.
pub struct RegisteredBuffer<'r, B: PinBackend, U: UnpinBarrier = NoBarrier> {
    reg: &'r Registry<B, U>,
    region: NonNull<Region>,
    ua: UserVa,
    len: u64,
}

// SAFETY: the buffer only reads immutable region data and updates an atomic counter.
unsafe impl<B: PinBackend + Sync, U: UnpinBarrier + Sync> Send for RegisteredBuffer<'_, B, U> {}
// SAFETY: as above.
unsafe impl<B: PinBackend + Sync, U: UnpinBarrier + Sync> Sync for RegisteredBuffer<'_, B, U> {}

impl<'r, B: PinBackend, U: UnpinBarrier> RegisteredBuffer<'r, B, U> {
    /// The region the buffer lies in.
    pub fn region(&self) -> &Region {
        // SAFETY: type invariant.
        unsafe { self.region.as_ref() }
    }

    /// The registry it came from.
    pub fn registry(&self) -> &'r Registry<B, U> {
        self.reg
    }

    /// First user address.
    pub fn ua(&self) -> UserVa {
        self.ua
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a buffer holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The buffer as runs of physically contiguous memory `(pa, len)`, in order.
    pub fn segments(&self) -> Segments<'_> {
        let region = self.region();
        // Inside the region by the type invariant.
        let off = self.ua.raw() - region.ua().raw();
        Segments { hpas: region.hpas(), off, left: self.len }
    }
}

impl<B: PinBackend, U: UnpinBarrier> Drop for RegisteredBuffer<'_, B, U> {
    fn drop(&mut self) {
        // Our count is there (type invariant), so the decrement cannot fail.
        let r = self.region().mapped_dec();
        debug_assert!(r.is_ok(), "registered buffer lost its mapped count: {r:?}");
    }
}

/// The most entries [`Registry::load_iov`] takes (POSIX `IOV_MAX` on Linux and FreeBSD).
pub const IOV_MAX: usize = 1024;

/// An iovec of registered user buffers loaded for DMA ([`Registry::load_iov`]): each entry
/// holds its region's `mapped` count until the iovec drops, so none of the regions can be
/// unregistered (EBUSY) while a map holds it.
///
/// # Invariants
///
/// `bufs` is non-empty and `len` is the sum of their lengths.
pub struct RegisteredIov<'r, B: PinBackend, U: UnpinBarrier = NoBarrier> {
    bufs: Vec<RegisteredBuffer<'r, B, U>>,
    len: u64,
}

impl<'r, B: PinBackend, U: UnpinBarrier> RegisteredIov<'r, B, U> {
    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: an iovec holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The entries, in order (empty ones skipped).
    pub fn buffers(&self) -> &[RegisteredBuffer<'r, B, U>] {
        &self.bufs
    }

    /// The entries, given back (each still holding its count).
    pub fn into_buffers(self) -> Vec<RegisteredBuffer<'r, B, U>> {
        self.bufs
    }
}

/// Physically contiguous runs of a [`RegisteredBuffer`], from its page array.
#[derive(Clone, Debug)]
pub struct Segments<'a> {
    hpas: &'a [PhysAddr],
    /// Offset of the next byte from the region's start.
    off: u64,
    left: u64,
}

impl Iterator for Segments<'_> {
    type Item = (PhysAddr, u64);

    fn next(&mut self) -> Option<(PhysAddr, u64)> {
        if self.left == 0 {
            return None;
        }
        let page = |off: u64| self.hpas.get((off >> PAGE_SHIFT) as usize).copied();
        let start = PhysAddr::new(page(self.off)?.raw() + (self.off & (PAGE_SIZE - 1)));
        let mut len = (PAGE_SIZE - (self.off & (PAGE_SIZE - 1))).min(self.left);
        while len < self.left {
            let next = self.off + len;
            match page(next) {
                Some(pa) if pa.raw() == start.raw() + len => len = (len + PAGE_SIZE).min(self.left),
                _ => break,
            }
        }
        self.off += len;
        self.left -= len;
        Some((start, len))
    }
}

/// One user of a registry (a VFIO container): registers a given range at most once, and
/// unregisters what it registered when it goes away.
pub struct Container<'r, B: PinBackend, U: UnpinBarrier = NoBarrier> {
    reg: &'r Registry<B, U>,
    mine: SpinLock<Vec<(UserVa, u64)>>,
}

impl<'r, B: PinBackend, U: UnpinBarrier> Container<'r, B, U> {
    /// A container using `reg`.
    pub fn new(reg: &'r Registry<B, U>) -> Self {
        Self { reg, mine: SpinLock::new(Vec::new()) }
    }

    /// Registers `[ua, ua + size)` for this container ([`Registry::register`]).
    ///
    /// Errors: [`Error::AlreadyMapped`] if this container already registered it (the same
    /// memory is registered once per container), then as [`Registry::register`].
    pub fn register(&self, ua: UserVa, size: u64) -> Result<RegionInfo> {
        let mut mine = self.mine.lock();
        if mine.contains(&(ua, size)) {
            return Err(Error::AlreadyMapped { addr: ua.raw() });
        }
        let info = self.reg.register(ua, size)?;
        mine.push((ua, size));
        Ok(info)
    }

    /// Unregisters a range this container registered ([`Registry::unregister`]).
    ///
    /// Errors: [`Error::NotMapped`] if this container did not register it, then as
    /// [`Registry::unregister`] (on EBUSY the container still holds its registration).
    pub fn unregister(&self, ua: UserVa, size: u64) -> Result<()> {
        let mut mine = self.mine.lock();
        let at = mine.iter().position(|&r| r == (ua, size)).ok_or(Error::NotMapped { addr: ua.raw() })?;
        self.reg.unregister(ua, size)?;
        mine.swap_remove(at);
        Ok(())
    }

    /// Ranges this container has registered.
    pub fn registrations(&self) -> Vec<(UserVa, u64)> {
        self.mine.lock().clone()
    }
}

impl<B: PinBackend, U: UnpinBarrier> Drop for Container<'_, B, U> {
    fn drop(&mut self) {
        for (ua, size) in core::mem::take(self.mine.get_mut()) {
            if self.reg.unregister(ua, size).is_err() {
                // Still DMA-mapped: the region stays registered (used 1) until unregistered
                // again or the registry is torn down. Counted, not hidden.
                self.reg.busy_at_release.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
