//! Coherent (consistent) DMA memory: allocated to meet a tag, mapped for the device at once.
//!
//! # Theory
//!
//! 1. **Meeting the tag.** Pages come from [`Platform::alloc_pages`]: aligned to the tag's
//!    alignment (at least a page), below the DMA mask (so even the `direct` strategy reaches
//!    them), in the direct map (the CPU needs an address), and, when the buffer fits in one
//!    boundary window, aligned to the buffer's size rounded up to a power of two, so it cannot
//!    cross a boundary.
//! 2. **Cacheability** (seed 002): on a coherent tag the memory is write-back (the device
//!    snoops); on a non-coherent tag, or when the caller asks for no caching, it is uncached,
//!    so CPU and device never disagree and no sync is needed.
//! 3. **Teardown: unload, prove, then free.** Dropping a [`Coherent`] unloads its map (the
//!    device loses access), then gives the pages to its tag (`Tag::release_mem`), which frees
//!    them only once no translation can reach them (a deferred unmap flushed, a failed
//!    invalidation recovered) and quarantines them otherwise ([`super::quarantine`]). Unlike
//!    Linux's `dma_free_coherent`, the driver promises nothing about the IOTLB.
//! 4. **No references.** The CPU reaches the memory by copy ([`DmaMemory::read`],
//!    [`DmaMemory::write`]); the device may write it at any time.
#![deny(unsafe_code)] // two blocks: freeing pages in `DmaMemory::drop`, describing them in `MappedMem::load`

use crate::addr::{KernVa, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::platform::{MemAttr, PageRequest, Placement, Platform};

use super::cache_sync::{SyncOp, SyncStats};
use super::load::RawSegments;
use super::map::{Direction, DmaMap};
use super::segments::Segment;
use super::strategy::Strategy;
use super::tag::{Tag, TagSpec};

/// Contiguous RAM pages for DMA, given back on drop.
///
/// # Invariants
///
/// `(pa, pages)` is one allocation of `p.alloc_pages`, owned by this value.
pub struct DmaMemory<'p, P: Platform> {
    p: &'p P,
    pa: PhysAddr,
    pages: u64,
    len: u64,
    kva: Option<KernVa>,
    attr: MemAttr,
}

impl<'p, P: Platform> DmaMemory<'p, P> {
    /// Allocates `len` bytes meeting `spec` (theory 1), mapped `attr`.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::BadSize`] (beyond the tag's `max_size`),
    /// [`Error::NoMemory`].
    pub fn alloc(p: &'p P, spec: &TagSpec, len: u64, attr: MemAttr) -> Result<Self> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if len > spec.max_size {
            return Err(Error::BadSize { size: len, limit: spec.max_size });
        }
        let bytes =
            len.checked_next_multiple_of(PAGE_SIZE).ok_or(Error::Overflow { base: len, len: PAGE_SIZE })?;
        let mut align = spec.alignment.max(PAGE_SIZE);
        if spec.boundary != 0 && bytes <= spec.boundary {
            // A power-of-two-aligned block no larger than its alignment cannot cross a
            // multiple of a (larger or equal) power of two.
            align = align.max(bytes.next_power_of_two());
        }
        let req = PageRequest {
            pages: bytes / PAGE_SIZE,
            align,
            below: Some(PhysAddr::new(spec.coherent_mask.min(spec.reach_limit()).saturating_add(1))),
            placement: Placement::DirectMapped,
            attr,
        };
        let pa = p.alloc_pages(&req)?;
        // INVARIANT: one allocation, owned from here.
        Ok(Self { p, pa, pages: req.pages, len, kva: p.phys_to_kva(pa), attr })
    }

    /// First physical byte.
    pub fn pa(&self) -> PhysAddr {
        self.pa
    }

    /// Number of 4 KiB pages allocated.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Length in bytes as asked.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false (allocations are never empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The kernel virtual address of the first byte.
    pub fn kva(&self) -> Option<KernVa> {
        self.kva
    }

    /// How the CPU maps the memory.
    pub fn attr(&self) -> MemAttr {
        self.attr
    }

    /// The platform the memory came from.
    pub(crate) fn platform(&self) -> &'p P {
        self.p
    }

    /// Copies bytes at `offset` into `buf`.
    ///
    /// Errors: [`Error::OutOfRange`] beyond the allocation.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let pa = self.at(offset, buf.len() as u64)?;
        self.p.read_phys(pa, buf)
    }

    /// Copies `data` into the memory at `offset`.
    ///
    /// Errors: [`Error::OutOfRange`] beyond the allocation.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let pa = self.at(offset, data.len() as u64)?;
        self.p.write_phys(pa, data)
    }

    fn at(&self, offset: u64, n: u64) -> Result<PhysAddr> {
        crate::addr::checked_end(offset, n, self.len)?;
        Ok(PhysAddr::new(self.pa.raw() + offset))
    }
}

#[allow(unsafe_code)]
impl<P: Platform> Drop for DmaMemory<'_, P> {
    fn drop(&mut self) {
        // SAFETY: `(pa, pages)` is exactly one allocation from this platform (type invariant),
        // freed once (here). Owners that map it for a device ([`Coherent`], the typed buffers)
        // unload their map and hand the memory to their tag, which drops it only once no
        // translation can reach it (`Tag::release_mem`); a `DmaMemory` no map ever held was
        // never reachable.
        unsafe { self.p.free_pages(self.pa, self.pages) };
    }
}

/// A map and the memory it maps, torn down by theory 3: unload, then the tag's proof, then
/// the free (or the quarantine). What [`Coherent`] and the typed buffers ([`super::typed`])
/// are made of.
///
/// # Invariants
///
/// `mem` is `Some` until drop; `map` never holds anything but `mem`; the memory goes back
/// only through `Tag::release_mem`.
pub(crate) struct MappedMem<'p, P: Platform, S: Strategy<P>> {
    pub(crate) map: DmaMap<'p, P, S>,
    mem: Option<DmaMemory<'p, P>>,
}

impl<'p, P: Platform, S: Strategy<P>> MappedMem<'p, P, S> {
    /// `map` (of the tag that will release `mem`) and `mem`, nothing loaded yet.
    pub(crate) fn new(map: DmaMap<'p, P, S>, mem: DmaMemory<'p, P>) -> Self {
        // INVARIANT: `mem` is Some; the map is fresh.
        Self { map, mem: Some(mem) }
    }

    /// The memory.
    #[inline]
    pub(crate) fn mem(&self) -> &DmaMemory<'p, P> {
        // INVARIANT: `mem` is Some until drop.
        self.mem.as_ref().unwrap_or_else(|| unreachable!("mapped memory taken before drop"))
    }

    /// Loads the memory, whole, into the map in direction `dir`.
    pub(crate) fn load(&mut self, dir: Direction) -> Result<()> {
        let seg = [(self.mem().pa(), self.mem().len())];
        // SAFETY: `mem` is pages this value allocated and owns; it keeps them while the map
        // holds them (drop unloads before the release) and gives them back only through the
        // tag's proof (theory 3); nothing hands out a reference to them.
        #[allow(unsafe_code)]
        let src = unsafe { RawSegments::new(&seg) };
        self.map.load(&src, dir).map(|_| ())
    }
}

impl<P: Platform, S: Strategy<P>> Drop for MappedMem<'_, P, S> {
    fn drop(&mut self) {
        if self.map.is_loaded() {
            // Its outcome does not matter here: the tag proves the memory unreachable again
            // before it frees it.
            let _ = self.map.unload();
        }
        if let Some(mem) = self.mem.take() {
            self.map.tag().release_mem(mem);
        }
    }
}

/// Coherent DMA memory of a tag: the memory and its (loaded, bidirectional) map.
///
/// # Invariants
///
/// The map holds the memory loaded for the value's whole life.
pub struct Coherent<'p, P: Platform, S: Strategy<P>> {
    inner: MappedMem<'p, P, S>,
}

impl<'p, P: Platform, S: Strategy<P>> Tag<'p, P, S> {
    /// Allocates `len` bytes of coherent memory for this tag's device and maps it (theory 1, 2).
    /// `no_cache` asks for uncached memory even on a coherent tag.
    ///
    /// Errors: those of [`DmaMemory::alloc`], [`Tag::create_map`] and [`DmaMap::load`];
    /// nothing is leaked on error.
    pub fn alloc_coherent(&self, len: u64, no_cache: bool) -> Result<Coherent<'p, P, S>> {
        let attr = if no_cache || !self.spec.flags.coherent { MemAttr::Uncached } else { MemAttr::WriteBack };
        let mem = DmaMemory::alloc(self.platform, &self.spec, len, attr)?;
        let map = self.create_map()?;
        let mut inner = MappedMem::new(map, mem);
        // On error `inner` drops: nothing is loaded, and the tag proves it before the free.
        inner.load(Direction::Bidirectional)?;
        Ok(Coherent { inner })
    }
}

impl<'p, P: Platform, S: Strategy<P>> Coherent<'p, P, S> {
    /// The bus segments the device uses.
    pub fn segments(&self) -> &[Segment] {
        self.inner.map.segments()
    }

    /// The memory (CPU access by copy).
    pub fn memory(&self) -> &DmaMemory<'p, P> {
        self.inner.mem()
    }

    /// Makes the CPU's and the device's views agree (write-back memory of a non-coherent
    /// device; nothing to do on uncached memory). See [`DmaMap::sync`].
    pub fn sync(&mut self, op: SyncOp) -> Result<SyncStats> {
        self.inner.map.sync(op)
    }

    /// [`Coherent::sync`] of bytes `[offset, offset + len)` only ([`DmaMap::sync_range`]).
    pub fn sync_range(&mut self, op: SyncOp, offset: u64, len: u64) -> Result<SyncStats> {
        self.inner.map.sync_range(op, offset, len)
    }
}
