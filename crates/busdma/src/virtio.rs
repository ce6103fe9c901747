//! # rcore-os `virtio-drivers` on busdma (feature `virtio`)
//!
//! `virtio-drivers` (0.12) reaches DMA through its `Hal`: an `unsafe trait` of associated
//! functions (no `&self`) that allocates queue memory (`dma_alloc`), frees it (`dma_dealloc`),
//! and shares request buffers with the device (`share` / `unshare`). This module implements it
//! over a busdma tag of any strategy ([`VirtioDma<'a, P, S>`](VirtioDma) over a
//! [`Tag<'a, P, S>`](Tag)): any [`DmaDevice`] of [`crate::device`] (VT-d, SMMUv3,
//! virtio-iommu: [`VirtioDma::new`]), an IOMMU strategy over any domain, the pre-mapped pool
//! or the hybrid of [`crate::premapped`]; so its block, network and console drivers DMA through the IOMMU.
//!
//! ## Theory
//!
//! 1. **One device, one slot.** The `Hal` has no `&self`, so its state is global: a
//!    [`HalSlot`] (a `static` of the kernel's) names the [`VirtioDma`] that serves one device,
//!    and [`BusdmaHal<K>`] reaches it through `K::slot()` ([`VirtioKernel`]). A kernel with
//!    several virtio devices has one slot and one `K` per device. [`HalSlot::scope`] installs a
//!    `VirtioDma` for the length of a closure and removes it afterwards; every `Hal` call holds
//!    the slot's lock for its whole length, so a scope cannot end while a call through it runs.
//! 2. **Queue memory is coherent.** `dma_alloc` is [`crate::front::Tag::alloc_coherent`] of the
//!    device's queue tag (the share tag, or a mapping tag of the same device when shares are
//!    copied into a pre-mapped pool, [`VirtioDma::pooled`]): page-aligned, zeroed here, mapped for its whole life; the bus address it
//!    returns is the IOVA, never the physical address.
//! 3. **Shared buffers are always bounced.** `share` copies the caller's bytes (all of them,
//!    whatever the direction, so bytes the device does not write come back unchanged) into a
//!    page-multiple [`DmaMemory`] of busdma's and links it into the device's **bounce ring**,
//!    a two-step window ([`crate::front::DmaWindow`], 64 pages reserved once per device);
//!    `unshare` syncs for the CPU, copies the bytes back when the device may have written
//!    them, unlinks and commits. A reused bounce buffer holds earlier bytes of this same
//!    device past the new share; an untrusted tag's ring zeroes them first, so an untrusted
//!    device sees its buffer and zeros, as `Policy::Untrusted` promises. Strict and untrusted
//!    policies commit at once (the IOTLB is
//!    invalidated before `unshare` returns); a deferred policy commits lazily: the unlink is
//!    queued and the buffer returns to the ring, for reuse, only once a flush the domain does
//!    anyway covers it, so deferred devices share invalidations. A buffer that finds no room
//!    in the ring (or a policy without a domain) gets a streaming map of its own instead. The
//!    device never reaches the caller's memory — a stack or heap buffer of any alignment — or
//!    the rest of its page. The ring needs a domain to reserve its window in: tags whose
//!    strategy lends one ([`WindowSource`]; [`VirtioDma::windowed`]) get it, the others
//!    ([`VirtioDma::streaming`]: the pre-mapped pool, the hybrid, no IOMMU) load each bounce
//!    buffer through a streaming map of the tag, which under the pre-mapped pool is a copy
//!    into a slot mapped once (no IOMMU request per share). Why not map page-aligned buffers
//!    in place: `share`'s contract
//!    only promises the buffer for the length of the call, so only memory busdma owns may stay
//!    mapped after it returns (see "What virtio-drivers promises").
//! 4. **Bus address 0 is failure** to `virtio-drivers` (`dma_alloc`): busdma's devices never
//!    hand out IOVA 0 (their aperture starts at 1 MiB), and a bus address 0 from any tag
//!    (pass-through, a domain whose aperture includes 0) is turned into a failure.
//! 5. **No error path.** `dma_alloc` reports failure by bus address 0 (the driver returns
//!    `Error::DmaError`). `share` cannot fail: when busdma refuses (no memory, no IOVA, an
//!    invalidation failure) or the slot is empty, it panics with the error, rather than give
//!    the device an address that reaches nothing or something else. `unshare` and
//!    `dma_dealloc` of an address the slot's `VirtioDma` does not know do nothing (and
//!    `dma_dealloc` returns -1); an unload that fails quarantines the bounce memory
//!    ([`crate::front::quarantine`]) and counts it in [`VirtioStats::unload_errors`].
//! 6. **Leaks, never reuse.** A [`VirtioDma`] dropped while queue memory is still out (a
//!    driver that outlived its scope) leaks it: it stays mapped and allocated, because the
//!    driver holds pointers into it and the device may still use it, and so do shares that
//!    have a streaming map of their own ([`VirtioStats::leaked`]). Shares still linked in the
//!    ring go with the ring's window, which unmaps them and frees them only after the
//!    invalidation that proves no translation reaches them (the driver only ever saw their
//!    bus addresses). [`VirtioDma::reclaim_shares`] frees shares the driver left posted only
//!    when the tag's strategy takes unloaded memory away from the device
//!    ([`Strategy::unload_revokes`]); identity and pass-through tags refuse.
//! 7. **`VIRTIO_F_ACCESS_PLATFORM`.** A virtio-pci device behind an IOMMU (QEMU:
//!    `iommu_platform=on`) offers feature bit 33 and refuses `FEATURES_OK` unless the driver
//!    accepts it; without it the device would bypass the IOMMU. `virtio-drivers` never accepts
//!    it; [`AccessPlatform`] wraps any `Transport` and accepts it when offered.
//!
//! ## What virtio-drivers promises (and what this module relies on)
//!
//! - `dma_dealloc(paddr, vaddr, pages)`: `paddr`/`vaddr`/`pages` come from one `dma_alloc` of
//!   the same `Hal`, not yet freed. Not relied on: the address is looked up, an unknown one is
//!   refused.
//! - `share(buffer, direction)`: `buffer` is valid, non-empty and not accessed by another
//!   thread *for the duration of the call*. Relied on for the copy in, nothing after.
//! - `unshare(paddr, buffer, direction)`: `buffer` is valid and not accessed by another thread
//!   for the duration of the call; `paddr` is what the matching `share` returned. The copy
//!   back relies on the first; the second is checked (an unknown `paddr` does nothing).
//! - Not promised by the `Hal`, relied on nowhere: that the device has finished with a share
//!   when `unshare` comes (virtio-drivers unshares after the device returned the descriptor;
//!   if it did not, the device loses access at the unload and faults, busdma's memory stays
//!   ours until no translation reaches it).
//!
#![deny(unsafe_code)]

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::ptr::NonNull;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PAGE_SIZE as VIRTIO_PAGE_SIZE};

use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::device::{DeviceStrategy, DmaDevice, IommuHw};
use crate::dir::{Direction, SyncOp};
use crate::error::{Error, Result};
use crate::front::strategy::{Invalidation, Strategy, WindowSource};
use crate::front::{Coherent, DmaMemory, DmaWindow, OwnedMap, Tag, TagSpec};
use crate::platform::{MemAttr, Platform};
use crate::sync::{AtomicU64, Ordering, SpinLock};

/// `VIRTIO_F_ACCESS_PLATFORM` (virtio 1.2, 6): the device's DMA goes through the platform's
/// IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// Mutants (`qemu/run --mutants`, module `mutant` of the VT-d driver explains the scheme).
mod mutant {
    /// Hand the device physical addresses instead of bus addresses.
    pub(super) const PHYS: bool = cfg!(busdma_mutant = "virtio-phys-addr");
    /// Unload a share as soon as it is loaded, before the device has used it.
    pub(super) const UNMAP_EARLY: bool = cfg!(busdma_mutant = "virtio-unmap-early");
}

/// Counters of one [`VirtioDma`] (relaxed; read them between requests).
#[derive(Debug, Default)]
pub struct VirtioStats {
    /// `dma_alloc` calls that succeeded.
    pub allocs: AtomicU64,
    /// `dma_dealloc` calls that freed memory.
    pub deallocs: AtomicU64,
    /// `share` calls (each one streaming map of a bounce buffer).
    pub shares: AtomicU64,
    /// `unshare` calls that found their share.
    pub unshares: AtomicU64,
    /// Bytes copied into bounce buffers by `share` (the whole buffer, every direction).
    pub bounced_in: AtomicU64,
    /// Bytes copied back by `unshare` (buffers the device may have written).
    pub bounced_out: AtomicU64,
    /// Unloads that failed (the bounce memory is quarantined by busdma).
    pub unload_errors: AtomicU64,
    /// Shares unloaded by [`VirtioDma::reclaim_shares`].
    pub reclaimed: AtomicU64,
    /// Queue memory and shares left outstanding when the `VirtioDma` was dropped (leaked).
    pub leaked: AtomicU64,
}

impl VirtioStats {
    fn bump(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Queue memory handed out by `dma_alloc`.
struct QueueMem<'a, P: Platform, Q: Strategy<P>> {
    bus: u64,
    kva: u64,
    pages: usize,
    mem: Coherent<'a, P, Q>,
}

/// A shared (bounced) buffer outside the ring (theory 3: larger than the ring's free room, or
/// a strategy without a window).
struct Share<'a, P: Platform, S: Strategy<P>> {
    bus: u64,
    /// The direction it was loaded in.
    dir: Direction,
    map: OwnedMap<'a, P, S, DmaMemory<'a, P>>,
}

/// Pages of the two-step window that bounce buffers are linked into (256 KiB: room for every
/// request a virtio driver keeps in flight with 16-entry queues).
const RING_PAGES: u64 = 64;
/// Bounce buffers kept for reuse once a commit has handed them back.
const SPARE_MAX: usize = 32;

/// What the bounce ring needs of a two-step window, its strategy erased (a ring exists only
/// for strategies that lend a window: [`VirtioDma::windowed`]).
trait RingWindow<'a, P: Platform> {
    /// Links `mem` at `off`; its bus address, or the error and the buffer when given back.
    fn link(
        &mut self,
        off: u64,
        mem: DmaMemory<'a, P>,
        dir: Direction,
    ) -> core::result::Result<u64, (Error, Option<DmaMemory<'a, P>>)>;
    fn unlink(&mut self, off: u64) -> Result<()>;
    /// `lazy`: `commit_lazy` (buffers come back once a flush the domain does anyway covers
    /// them), else `commit`.
    fn commit(&mut self, lazy: bool, back: &mut dyn FnMut(u64, DmaMemory<'a, P>)) -> Result<usize>;
    fn sync(&mut self, off: u64, op: SyncOp) -> Result<()>;
    fn buffer(&self, off: u64) -> Option<&DmaMemory<'a, P>>;
}

impl<'a, P: Platform, S: WindowSource<P>> RingWindow<'a, P> for DmaWindow<'a, P, S, DmaMemory<'a, P>> {
    fn link(
        &mut self,
        off: u64,
        mem: DmaMemory<'a, P>,
        dir: Direction,
    ) -> core::result::Result<u64, (Error, Option<DmaMemory<'a, P>>)> {
        DmaWindow::link(self, off, mem, dir).map(|l| l.iova.raw()).map_err(|e| (e.error, e.buffer))
    }
    fn unlink(&mut self, off: u64) -> Result<()> {
        DmaWindow::unlink(self, off)
    }
    fn commit(&mut self, lazy: bool, back: &mut dyn FnMut(u64, DmaMemory<'a, P>)) -> Result<usize> {
        if lazy { self.commit_lazy(back) } else { DmaWindow::commit(self, back) }
    }
    fn sync(&mut self, off: u64, op: SyncOp) -> Result<()> {
        DmaWindow::sync(self, off, op).map(|_| ())
    }
    fn buffer(&self, off: u64) -> Option<&DmaMemory<'a, P>> {
        DmaWindow::buffer(self, off)
    }
}

/// The bounce ring (theory 3): a two-step window of the device's domain, its pages' use, the
/// live shares by bus address and offset, and bounce buffers handed back for reuse.
struct Ring<'a, P: Platform> {
    win: Box<dyn RingWindow<'a, P> + 'a>,
    /// Per window page: linked, marked or retiring (the window refuses to link over it).
    taken: Vec<bool>,
    live: Vec<(u64, u64)>,
    spare: Vec<DmaMemory<'a, P>>,
    /// Deferred policy: unlinked buffers come back once a flush the domain does anyway covers
    /// them (`commit_lazy`); strict and untrusted: at once, after their invalidation.
    lazy: bool,
}

impl<'a, P: Platform> Ring<'a, P> {
    /// First free run of `pages` window pages.
    fn free_run(&self, pages: usize) -> Option<usize> {
        let mut run = 0;
        for (i, &t) in self.taken.iter().enumerate() {
            run = if t { 0 } else { run + 1 };
            if run == pages {
                return Some(i + 1 - pages);
            }
        }
        None
    }

    /// Ends the batch of unlinks; buffers that come back free their pages and are kept for
    /// reuse. `forced`: wait for the invalidation even under deferred.
    fn commit(&mut self, forced: bool) -> Result<usize> {
        let (taken, spare) = (&mut self.taken, &mut self.spare);
        let mut back = |off: u64, mem: DmaMemory<'a, P>| {
            let first = (off / PAGE_SIZE) as usize;
            let end = (first + mem.pages() as usize).min(taken.len());
            taken[first..end].iter_mut().for_each(|t| *t = false);
            if spare.len() < SPARE_MAX {
                spare.push(mem);
            }
        };
        self.win.commit(self.lazy && !forced, &mut back)
    }
}

/// The tag spec a [`VirtioDma`] needs: loads of up to `max_size` bytes (queue memory or one
/// shared buffer) as one segment, anywhere in 64 bits; `coherent`: the device snoops CPU
/// caches (virtio-pci devices on x86 do), so queue memory is write-back and syncs maintain no
/// cache; otherwise queue memory is uncached, which the platform must offer.
pub fn tag_spec(max_size: u64, coherent: bool) -> TagSpec {
    let mut spec = TagSpec::new(max_size, 1);
    spec.flags.coherent = coherent;
    spec
}

/// The busdma side of a virtio device: the tag its queue memory comes from (strategy `Q`),
/// the tag its shares are loaded through (strategy `S`, by default the same), the queue memory
/// and shares it has handed out, and counters. Install it in a [`HalSlot`] with
/// [`HalSlot::scope`].
pub struct VirtioDma<'a, P: Platform, Q: Strategy<P>, S: Strategy<P> = Q> {
    queue_tag: Tag<'a, P, Q>,
    tag: Tag<'a, P, S>,
    queues: SpinLock<Vec<QueueMem<'a, P, Q>>>,
    shares: SpinLock<Vec<Share<'a, P, S>>>,
    ring: SpinLock<Option<Ring<'a, P>>>,
    stats: VirtioStats,
    last_error: SpinLock<Option<Error>>,
    /// The strategy's unload takes memory away from the device ([`Strategy::unload_revokes`]:
    /// strict, deferred, untrusted, the pre-mapped pool): an unloaded share is unreachable,
    /// whatever the device does.
    translated: bool,
}

/// The [`VirtioDma`] of a device attached by [`crate::device`].
pub type DeviceVirtioDma<'i, 'p, H> = VirtioDma<'i, <H as IommuHw>::Platform, DeviceStrategy<'i, 'p, H>>;

impl<'a, P: Platform, S: WindowSource<P> + 'a> VirtioDma<'a, P, S> {
    /// Serves `dev` (any [`DmaDevice`]: VT-d, SMMUv3, virtio-iommu) through a tag of it
    /// ([`tag_spec`]`(max_size, coherent)`), with the bounce ring when its policy has a
    /// domain ([`VirtioDma::windowed`]).
    ///
    /// Errors: those of [`DmaDevice::tag`] and [`VirtioDma::windowed`].
    pub fn new<D: DmaDevice<'a, Platform = P, Strategy = S>>(
        dev: &D,
        max_size: u64,
        coherent: bool,
    ) -> Result<Self> {
        Self::windowed(dev.tag(tag_spec(max_size, coherent))?)
    }

    /// Serves the device of `tag` (a root or child tag of at most one segment per load,
    /// [`tag_spec`]) with the bounce ring (theory 3) in a window of the tag's domain, or,
    /// when the strategy has no domain to lend (identity, pass-through), with a streaming map
    /// per share. Deferred invalidation commits the ring lazily.
    ///
    /// Errors: those of [`Tag::create_window`] other than [`Error::Unsupported`].
    pub fn windowed(tag: Tag<'a, P, S>) -> Result<Self> {
        let ring = match tag.create_window::<DmaMemory<'a, P>>(RING_PAGES * PAGE_SIZE, RING_PAGES as usize) {
            Ok(win) => Some(Ring {
                win: Box::new(win),
                taken: alloc::vec![false; RING_PAGES as usize],
                live: Vec::new(),
                spare: Vec::new(),
                lazy: tag.strategy().invalidation() == Invalidation::Deferred,
            }),
            Err(Error::Unsupported { .. }) => None,
            Err(e) => return Err(e),
        };
        Ok(Self::with_ring(tag.clone(), tag, ring))
    }
}

impl<'a, P: Platform, S: Strategy<P>> VirtioDma<'a, P, S> {
    /// Serves the device of `tag` (of any mapping strategy; at most one segment per load,
    /// [`tag_spec`]): queue memory from `tag`, a streaming map of `tag` per share.
    pub fn streaming(tag: Tag<'a, P, S>) -> Self {
        Self::with_ring(tag.clone(), tag, None)
    }
}

impl<'a, P: Platform, Q: Strategy<P>, S: Strategy<P>> VirtioDma<'a, P, Q, S> {
    /// Queue memory from `queues`, shares through a streaming map of `shares` each: the
    /// pre-mapped pool ([`crate::premapped::Premapped`]) or the hybrid copy a share into a
    /// slot mapped once, so a share costs the device's IOMMU no request. `queues` must map
    /// memory in place (the device and the driver use the rings continuously, with no sync
    /// between): a per-map strategy of the same domain, not a copying one.
    pub fn pooled(queues: Tag<'a, P, Q>, shares: Tag<'a, P, S>) -> Self {
        Self::with_ring(queues, shares, None)
    }

    fn with_ring(queue_tag: Tag<'a, P, Q>, tag: Tag<'a, P, S>, ring: Option<Ring<'a, P>>) -> Self {
        let translated = tag.strategy().unload_revokes();
        Self {
            queue_tag,
            tag,
            queues: SpinLock::new(Vec::new()),
            shares: SpinLock::new(Vec::new()),
            ring: SpinLock::new(ring),
            stats: VirtioStats::default(),
            last_error: SpinLock::new(None),
            translated,
        }
    }

    /// The tag shares are loaded through.
    pub fn tag(&self) -> &Tag<'a, P, S> {
        &self.tag
    }

    /// Whether shares go through the bounce ring (else through a streaming map each).
    pub fn has_ring(&self) -> bool {
        self.ring.lock().is_some()
    }

    /// The counters.
    pub fn stats(&self) -> &VirtioStats {
        &self.stats
    }

    /// The last error busdma returned to a `dma_alloc` or `share` (the `Hal` cannot carry it
    /// to the driver, which sees `DmaError` or panics).
    pub fn last_error(&self) -> Option<Error> {
        *self.last_error.lock()
    }

    fn note<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            *self.last_error.lock() = Some(*e);
        }
        r
    }

    /// Unloads and frees every share the driver never unshared (virtio-drivers leaves posted
    /// receive buffers shared when a driver is dropped: its console, for one), once the device
    /// is reset. Safe: the driver never saw these buffers (they are busdma's bounce memory,
    /// known to it by bus address only), and on a translated policy the unload cuts the device
    /// off before the memory is freed (and a later `unshare` of the address does nothing).
    /// Returns how many were reclaimed.
    ///
    /// Errors: [`Error::BadState`] on an identity or pass-through policy, where the unload
    /// would not stop a device that still DMAs (nothing is reclaimed).
    pub fn reclaim_shares(&self) -> Result<usize> {
        if !self.translated {
            return Err(Error::BadState { what: "virtio reclaim_shares on an untranslated device" });
        }
        let shares = core::mem::take(&mut *self.shares.lock());
        let mut n = shares.len();
        // Each drop unloads and frees once no translation reaches the memory (or quarantines).
        drop(shares);
        if let Some(ring) = self.ring.lock().as_mut() {
            for (_, off) in core::mem::take(&mut ring.live) {
                n += usize::from(ring.win.unlink(off).is_ok());
            }
            ring.commit(true)?;
        }
        VirtioStats::bump(&self.stats.reclaimed, n as u64);
        Ok(n)
    }

    /// Queue allocations and shares outstanding.
    pub fn outstanding(&self) -> (usize, usize) {
        let ring = self.ring.lock().as_ref().map_or(0, |r| r.live.len());
        (self.queues.lock().len(), self.shares.lock().len() + ring)
    }

    fn alloc(&self, pages: usize) -> Result<(u64, NonNull<u8>)> {
        let len = (pages as u64)
            .checked_mul(PAGE_SIZE)
            .ok_or(Error::Overflow { base: pages as u64, len: PAGE_SIZE })?;
        let mem = self.queue_tag.alloc_coherent(len, false)?;
        let kva = mem.memory().kva().ok_or(Error::NotDirectMapped { pa: mem.memory().pa().raw() })?;
        let bus = if mutant::PHYS { mem.memory().pa().raw() } else { mem.segments()[0].addr.raw() };
        if mem.segments().len() != 1 || bus == 0 {
            return Err(Error::BadState { what: "virtio queue memory: not one segment, or bus address 0" });
        }
        let ptr = NonNull::new(kva.raw() as *mut u8).ok_or(Error::NotDirectMapped { pa: 0 })?;
        mem.view().fill(0, len, 0)?;
        self.queues.lock().push(QueueMem { bus, kva: kva.raw(), pages, mem });
        VirtioStats::bump(&self.stats.allocs, 1);
        Ok((bus, ptr))
    }

    fn dealloc(&self, bus: u64, kva: u64, pages: usize) -> bool {
        let mut q = self.queues.lock();
        let Some(i) = q.iter().position(|m| m.bus == bus && m.kva == kva && m.pages == pages) else {
            return false;
        };
        let m = q.swap_remove(i);
        drop(q);
        // Dropping unloads, then frees once no translation reaches the pages.
        drop(m.mem);
        VirtioStats::bump(&self.stats.deallocs, 1);
        true
    }

    fn share(&self, bytes: &[u8], dir: Direction) -> Result<u64> {
        match self.ring_share(bytes, dir) {
            Ok(bus) => Ok(bus),
            Err(_) => self.map_share(bytes, dir),
        }
    }

    /// `share` through the bounce ring (theory 3): a page-multiple bounce buffer (reused when
    /// one came back) linked into the window; no IOVA allocation, no table allocation.
    fn ring_share(&self, bytes: &[u8], dir: Direction) -> Result<u64> {
        let len = bytes.len() as u64;
        let pages = len.div_ceil(PAGE_SIZE).max(1);
        let mut guard = self.ring.lock();
        let ring = guard.as_mut().ok_or(Error::Unsupported { what: "no bounce ring" })?;
        let first = match ring.free_run(pages as usize) {
            Some(f) => f,
            None => {
                ring.commit(true)?;
                ring.free_run(pages as usize).ok_or(Error::BadState { what: "virtio bounce ring full" })?
            }
        };
        let (mem, reused) = match ring.spare.iter().position(|m| m.pages() == pages) {
            Some(i) => (ring.spare.swap_remove(i), true),
            None => (
                DmaMemory::alloc(
                    self.tag.platform(),
                    self.tag.spec(),
                    pages * PAGE_SIZE,
                    MemAttr::WriteBack,
                )?,
                false,
            ),
        };
        // Every byte, whatever the direction (theory 3); the rest of a reused buffer holds
        // only earlier bytes of this same device, zeroed for an untrusted one (fresh pages
        // come zeroed).
        mem.write(0, bytes)?;
        let rest = pages * PAGE_SIZE - len;
        if reused && rest > 0 && self.tag.spec().flags.untrusted {
            mem.view().fill(len, rest, 0)?;
        }
        let pa = mem.pa().raw();
        let off = first as u64 * PAGE_SIZE;
        let iova = match ring.win.link(off, mem, dir) {
            Ok(iova) => iova,
            Err((e, buffer)) => {
                if let Some(m) = buffer {
                    ring.spare.push(m);
                }
                return Err(e);
            }
        };
        ring.taken[first..first + pages as usize].iter_mut().for_each(|t| *t = true);
        VirtioStats::bump(&self.stats.bounced_in, len);
        VirtioStats::bump(&self.stats.shares, 1);
        let bus = if mutant::PHYS { pa } else { iova };
        if iova == 0 || ring.win.sync(off, pre(dir)).is_err() || mutant::UNMAP_EARLY {
            let _ = ring.win.unlink(off);
            ring.commit(true)?;
            if !mutant::UNMAP_EARLY {
                return Err(Error::BadState { what: "virtio share: bus address 0, or sync failed" });
            }
            return Ok(bus);
        }
        ring.live.push((bus, off));
        Ok(bus)
    }

    /// `unshare` of a ring share: `None` if `bus` is not one.
    fn ring_unshare(&self, bus: u64, out: Option<&mut [u8]>, dir: Direction) -> Option<bool> {
        let mut guard = self.ring.lock();
        let ring = guard.as_mut()?;
        let i = ring.live.iter().position(|&(b, _)| b == bus)?;
        let (_, off) = ring.live.swap_remove(i);
        let mut ok = ring.win.sync(off, post(dir)).is_ok();
        if let (Some(out), true) = (out, dir.device_writes()) {
            match ring.win.buffer(off) {
                Some(mem) if mem.read(0, out).is_ok() => {
                    VirtioStats::bump(&self.stats.bounced_out, out.len() as u64)
                }
                _ => ok = false,
            }
        }
        // Strict: the device loses access before this returns; deferred: at the domain's next
        // flush, the buffer coming back to the ring only after it.
        ok &= ring.win.unlink(off).is_ok();
        ok &= ring.commit(false).is_ok();
        Some(ok)
    }

    /// `share` through a streaming map of its own (theory 3's fallback).
    fn map_share(&self, bytes: &[u8], dir: Direction) -> Result<u64> {
        let len = bytes.len() as u64;
        let mem = DmaMemory::alloc(self.tag.platform(), self.tag.spec(), len, MemAttr::WriteBack)?;
        // Every byte, whatever the direction: bytes the device does not write come back as
        // they were (theory 3).
        mem.write(0, bytes)?;
        VirtioStats::bump(&self.stats.bounced_in, len);
        let pa = mem.pa().raw();
        let mut map: OwnedMap<'a, P, S, DmaMemory<'a, P>> = self.tag.create_owned_map()?;
        // A receive buffer is loaded both ways: a copying strategy (the pre-mapped pool) must
        // copy the caller's bytes in too, or bytes the device does not write would come back
        // as whatever the slot last held (theory 3). The device may read the bounce buffer,
        // which holds the caller's own bytes and nothing else.
        let dir = if dir == Direction::FromDevice { Direction::Bidirectional } else { dir };
        let segs = map.load(mem, dir).map_err(|(e, _)| e)?;
        if segs.len() != 1 || segs[0].addr.raw() == 0 {
            return Err(Error::BadState { what: "virtio share: not one segment, or bus address 0" });
        }
        let bus = if mutant::PHYS { pa } else { segs[0].addr.raw() };
        map.sync(pre(dir))?;
        if mutant::UNMAP_EARLY {
            map.unload()?;
        }
        self.shares.lock().push(Share { bus, dir, map });
        VirtioStats::bump(&self.stats.shares, 1);
        Ok(bus)
    }

    /// Syncs for the CPU, copies the bounce buffer back into `out` when the device may have
    /// written it, unloads. False if `bus` is no share of ours.
    fn unshare(&self, bus: u64, mut out: Option<&mut [u8]>, dir: Direction) -> bool {
        if let Some(ok) = self.ring_unshare(bus, out.as_deref_mut(), dir) {
            if !ok {
                VirtioStats::bump(&self.stats.unload_errors, 1);
            }
            VirtioStats::bump(&self.stats.unshares, 1);
            return true;
        }
        let mut s = self.shares.lock();
        let Some(i) = s.iter().position(|m| m.bus == bus) else { return false };
        let Share { mut map, dir: loaded, .. } = s.swap_remove(i);
        drop(s);
        let mut ok = map.sync(post(loaded)).is_ok();
        if let (Some(out), true) = (out, dir.device_writes()) {
            match map.buffer() {
                Some(mem) if mem.read(0, out).is_ok() => {
                    VirtioStats::bump(&self.stats.bounced_out, out.len() as u64)
                }
                _ => ok = false,
            }
        }
        // The take unloads (strict: the IOTLB is invalidated first) and gives the memory back
        // once no translation reaches it; on failure the map keeps it and quarantines it.
        match map.take() {
            Ok(mem) => drop(mem),
            Err(_) => ok = false,
        }
        if !ok {
            VirtioStats::bump(&self.stats.unload_errors, 1);
        }
        VirtioStats::bump(&self.stats.unshares, 1);
        true
    }
}

fn pre(dir: Direction) -> SyncOp {
    match dir {
        Direction::ToDevice => SyncOp::PREWRITE,
        Direction::FromDevice => SyncOp::PREREAD,
        Direction::Bidirectional => SyncOp::PREWRITE.union(SyncOp::PREREAD),
    }
}

fn post(dir: Direction) -> SyncOp {
    match dir {
        Direction::ToDevice => SyncOp::POSTWRITE,
        Direction::FromDevice => SyncOp::POSTREAD,
        Direction::Bidirectional => SyncOp::POSTWRITE.union(SyncOp::POSTREAD),
    }
}

fn direction(d: BufferDirection) -> Direction {
    match d {
        BufferDirection::DriverToDevice => Direction::ToDevice,
        BufferDirection::DeviceToDriver => Direction::FromDevice,
        BufferDirection::Both => Direction::Bidirectional,
    }
}

impl<P: Platform, Q: Strategy<P>, S: Strategy<P>> Drop for VirtioDma<'_, P, Q, S> {
    fn drop(&mut self) {
        // Theory 6: whatever is still out may still be used by a driver or a device.
        let queues = core::mem::take(&mut *self.queues.lock());
        let shares = core::mem::take(&mut *self.shares.lock());
        VirtioStats::bump(&self.stats.leaked, (queues.len() + shares.len()) as u64);
        // Each entry is leaked (never unmapped or freed); the vectors' own buffers are ours.
        queues.into_iter().for_each(core::mem::forget);
        shares.into_iter().for_each(core::mem::forget);
    }
}

/// What a [`HalSlot`] calls: [`VirtioDma`] with its lifetimes and IOMMU erased.
trait Backend {
    fn alloc(&self, pages: usize) -> Result<(u64, NonNull<u8>)>;
    fn dealloc(&self, bus: u64, kva: u64, pages: usize) -> bool;
    fn share(&self, bytes: &[u8], dir: Direction) -> Result<u64>;
    fn unshare(&self, bus: u64, out: Option<&mut [u8]>, dir: Direction) -> bool;
}

impl<P: Platform, Q: Strategy<P>, S: Strategy<P>> Backend for VirtioDma<'_, P, Q, S> {
    fn alloc(&self, pages: usize) -> Result<(u64, NonNull<u8>)> {
        self.note(VirtioDma::alloc(self, pages))
    }
    fn dealloc(&self, bus: u64, kva: u64, pages: usize) -> bool {
        VirtioDma::dealloc(self, bus, kva, pages)
    }
    fn share(&self, bytes: &[u8], dir: Direction) -> Result<u64> {
        self.note(VirtioDma::share(self, bytes, dir))
    }
    fn unshare(&self, bus: u64, out: Option<&mut [u8]>, dir: Direction) -> bool {
        VirtioDma::unshare(self, bus, out, dir)
    }
}

/// A pointer to an installed backend, its lifetime erased.
///
/// # Invariants
///
/// Points to a live backend for as long as it sits in a [`HalSlot`] ([`HalSlot::scope`]
/// removes it before the borrow it came from ends).
struct Installed(NonNull<dyn Backend + 'static>);

// SAFETY: `Installed` is only dereferenced under the slot's lock, and the backends are
// `VirtioDma`s, whose state sits behind spin locks.
#[allow(unsafe_code)]
unsafe impl Send for Installed {}

/// The global home of one device's [`VirtioDma`] (theory 1): a `static` of the kernel's.
pub struct HalSlot {
    inner: SpinLock<Option<Installed>>,
}

impl Default for HalSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl HalSlot {
    /// An empty slot.
    pub const fn new() -> Self {
        Self { inner: SpinLock::new(None) }
    }

    /// Installs `dma` for the length of `f`: `BusdmaHal<K>` with `K::slot() == self` serves
    /// from it while `f` runs (and answers "failed" before and after).
    ///
    /// Errors: [`Error::BadState`] if the slot already serves a device (nothing runs).
    pub fn scope<P: Platform, Q: Strategy<P>, S: Strategy<P>, R>(
        &self,
        dma: &VirtioDma<'_, P, Q, S>,
        f: impl FnOnce() -> R,
    ) -> Result<R> {
        {
            let mut slot = self.inner.lock();
            if slot.is_some() {
                return Err(Error::BadState { what: "virtio HalSlot already serves a device" });
            }
            let short: NonNull<dyn Backend + '_> = NonNull::from(dma as &dyn Backend);
            // SAFETY: only the trait object's lifetime bound changes (same layout). INVARIANT:
            // the pointer is removed from the slot below, before `dma`'s borrow ends, and the
            // guard removes it if `f` unwinds; every use takes the slot's lock, which the removal
            // takes too, so no use outlasts the borrow.
            #[allow(unsafe_code)]
            let erased: NonNull<dyn Backend + 'static> = unsafe { core::mem::transmute(short) };
            *slot = Some(Installed(erased));
        }
        struct Remove<'a>(&'a HalSlot);
        impl Drop for Remove<'_> {
            fn drop(&mut self) {
                *self.0.inner.lock() = None;
            }
        }
        let _remove = Remove(self);
        Ok(f())
    }

    /// Runs `f` on the installed backend under the slot's lock, or returns `None`.
    fn with<R>(&self, f: impl FnOnce(&dyn Backend) -> R) -> Option<R> {
        let slot = self.inner.lock();
        let installed = slot.as_ref()?;
        // SAFETY: `Installed`'s invariant: the backend is alive while it sits in the slot, and
        // we hold the slot's lock, so it cannot be removed during `f`.
        #[allow(unsafe_code)]
        let backend = unsafe { installed.0.as_ref() };
        Some(f(backend))
    }
}

/// What a kernel supplies to [`BusdmaHal`]: which slot serves the device, and its own MMIO
/// mappings.
///
/// # Safety
///
/// `mmio_phys_to_virt` must meet `virtio_drivers::Hal::mmio_phys_to_virt`'s implementation
/// contract: for a BAR range the PCI transport read from the device, a valid pointer to that
/// MMIO range that aliases no Rust allocation or reference.
#[allow(unsafe_code)]
pub unsafe trait VirtioKernel: 'static {
    /// The slot of this device.
    fn slot() -> &'static HalSlot;

    /// The kernel's virtual address of the MMIO range `[pa, pa + size)`.
    ///
    /// # Safety
    ///
    /// `pa` and `size` describe a BAR range of a virtio device.
    unsafe fn mmio_phys_to_virt(pa: PhysAddr, size: usize) -> NonNull<u8>;
}

/// `virtio_drivers::Hal` over the [`VirtioDma`] in `K::slot()` (module theory).
pub struct BusdmaHal<K>(PhantomData<K>);

// SAFETY: the `Hal`'s implementation contract, item by item:
// - `dma_alloc`: the pointer is the direct-map address of coherent memory this call allocated
//   (so valid and page-aligned: allocations are whole pages at page alignment, and
//   `virtio_drivers::PAGE_SIZE` is busdma's `PAGE_SIZE`, asserted below), zeroed here, owned by
//   the `VirtioDma` until `dma_dealloc` names it (or leaked, never freed: theory 6), so it
//   aliases no other allocation. The bus address is the device's IOVA; 0 on any failure, with a
//   dangling pointer that virtio-drivers never dereferences (it checks the address first).
// - `mmio_phys_to_virt`: the kernel's answer, under `VirtioKernel`'s safety contract.
// - `share`: the device gets the bus address of a bounce buffer that busdma owns while the
//   share exists; the caller's buffer is read during the call only, as `share` allows.
// - `unshare`: writes the caller's buffer during the call only, as `unshare` allows.
#[allow(unsafe_code)]
unsafe impl<K: VirtioKernel> Hal for BusdmaHal<K> {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (virtio_drivers::PhysAddr, NonNull<u8>) {
        const _: () = assert!(VIRTIO_PAGE_SIZE as u64 == PAGE_SIZE);
        match K::slot().with(|b| b.alloc(pages)) {
            Some(Ok((bus, ptr))) => (bus, ptr),
            _ => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: virtio_drivers::PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let kva = vaddr.as_ptr() as u64;
        match K::slot().with(|b| b.dealloc(paddr, kva, pages)) {
            Some(true) => 0,
            _ => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: virtio_drivers::PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: our caller's contract (a valid MMIO region of the device) is the kernel's.
        unsafe { K::mmio_phys_to_virt(PhysAddr::new(paddr), size) }
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> virtio_drivers::PhysAddr {
        // SAFETY: `share`'s contract: `buffer` is valid for reads and not accessed by another
        // thread during this call; the slice does not outlive it.
        let bytes = unsafe { &*(buffer.as_ptr() as *const [u8]) };
        match K::slot().with(|b| b.share(bytes, self::direction(direction))) {
            Some(Ok(bus)) => bus,
            // Theory 5: the Hal has no error path.
            Some(Err(e)) => panic!("busdma virtio share of {} bytes failed: {e}", bytes.len()),
            None => panic!("busdma virtio share outside HalSlot::scope"),
        }
    }

    unsafe fn unshare(paddr: virtio_drivers::PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let dir = self::direction(direction);
        // SAFETY: `unshare`'s contract: `buffer` is valid and not accessed by another thread
        // during this call; the slice does not outlive it. It is only made when the device may
        // have written the buffer (a receive or both-ways buffer is writable memory).
        let out = dir.device_writes().then(|| unsafe { &mut *buffer.as_ptr() });
        let _ = K::slot().with(|b| b.unshare(paddr, out, dir));
    }
}

/// A `Transport` that also accepts `VIRTIO_F_ACCESS_PLATFORM` when the device offers it
/// (theory 7); everything else is the wrapped transport's.
pub struct AccessPlatform<T> {
    inner: T,
    offered: bool,
}

impl<T: Transport> AccessPlatform<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self { inner, offered: false }
    }

    /// Whether the device offered (and so the driver accepted) `VIRTIO_F_ACCESS_PLATFORM`.
    pub fn access_platform(&self) -> bool {
        self.offered
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

impl<T: Transport> Transport for AccessPlatform<T> {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }
    fn read_device_features(&mut self) -> u64 {
        let f = self.inner.read_device_features();
        self.offered = f & VIRTIO_F_ACCESS_PLATFORM != 0;
        f
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        let extra = if self.offered { VIRTIO_F_ACCESS_PLATFORM } else { 0 };
        self.inner.write_driver_features(driver_features | extra)
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }
    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }
    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status)
    }
    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }
    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }
    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: virtio_drivers::PhysAddr,
        driver_area: virtio_drivers::PhysAddr,
        device_area: virtio_drivers::PhysAddr,
    ) {
        self.inner.queue_set(queue, size, descriptors, driver_area, device_area)
    }
    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }
    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }
    fn read_config_space<V: zerocopy::FromBytes + zerocopy::IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<V> {
        self.inner.read_config_space(offset)
    }
    fn write_config_space<V: zerocopy::IntoBytes + zerocopy::Immutable>(
        &mut self,
        offset: usize,
        value: V,
    ) -> virtio_drivers::Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
