//! # `dma-api`'s `DmaOp` on busdma (feature `dma-api`)
//!
//! `dma-api` (0.10, rcore-os/tgoskits) is a bus_dma-like contract used by `eth-intel` (e1000)
//! and `nvme-driver`: a `DmaOp` backend allocates contiguous and coherent memory and maps
//! caller-owned buffers for streaming DMA, under `DmaConstraints { addr_mask, align, boundary,
//! max_segment_size }` — a tag. [`BusdmaDmaOp`] implements it over a busdma [`Device`].
//!
//! ## Theory
//!
//! 1. **Constraints are tags.** Each call's `DmaConstraints` become a [`TagSpec`] of the
//!    device (`addr_mask` → DMA mask, `align` → alignment, `boundary`, `max_segment_size`),
//!    with one segment: a `dma-api` handle carries one bus address, so the whole buffer must be
//!    one contiguous bus range (IOMMU policies give one; a load that cannot fails).
//! 2. **Allocations** (`alloc_contiguous`, `alloc_coherent`) are busdma coherent memory
//!    ([`crate::front::Coherent`]): mapped for their whole life, the handle's CPU pointer is
//!    their direct-map address and the bus address their IOVA. On a non-coherent device
//!    `alloc_coherent` asks for uncached memory (the platform must offer it).
//! 3. **Streaming maps** load the caller's buffer in place (`map_streaming`'s contract keeps it
//!    live until `unmap_streaming`); busdma bounces what the device's policy needs bounced
//!    (untrusted: sub-page runs), so `sync_map_for_device` / `sync_map_for_cpu` are busdma's
//!    syncs of that map (they copy bounce buffers and maintain caches), not `dma-api`'s
//!    default cache flushes.
//! 4. **Unknown handles do nothing**; a failed unmap or free is busdma's business: the memory
//!    is quarantined until a later invalidation proves no translation reaches it.
//! 5. **`'static`.** `DmaOp` is `'static`: the backend holds a device of a `'static` IOMMU (a
//!    kernel sets its IOMMUs up once, at boot, and keeps them).
//!
//! MSRV: `dma-api` 0.10 uses let chains, so this feature needs rustc 1.88 (the rest of the
//! crate builds on the workspace's 1.85).
#![deny(unsafe_code)]

use alloc::vec::Vec;
use core::alloc::Layout;
use core::num::NonZeroUsize;
use core::ptr::NonNull;

use dma_api::{
    DmaAddr, DmaAllocHandle, DmaCoherency, DmaConstraints, DmaDirection, DmaError, DmaMapHandle, DmaOp,
};

use crate::addr::{KernVa, PAGE_SIZE};
use crate::device::{Device, DeviceStrategy, IommuHw};
use crate::dir::{Direction, SyncOp};
use crate::error::{Error, Result};
use crate::front::{Coherent, DmaMap, KernelBuf, TagSpec};
use crate::platform::Platform;
use crate::sync::SpinLock;

type Coh<H> = Coherent<'static, <H as IommuHw>::Platform, DeviceStrategy<'static, 'static, H>>;
type Map<H> = DmaMap<'static, <H as IommuHw>::Platform, DeviceStrategy<'static, 'static, H>>;

/// `dma_api::DmaOp` over one busdma device (module theory).
pub struct BusdmaDmaOp<H: IommuHw + 'static> {
    dev: Device<'static, 'static, H>,
    coherent: bool,
    allocs: SpinLock<Vec<(u64, Coh<H>)>>,
    maps: SpinLock<Vec<(u64, Direction, Map<H>)>>,
    last_error: SpinLock<Option<Error>>,
}

impl<H: IommuHw + 'static> BusdmaDmaOp<H> {
    /// Serves `dev`. `coherent`: the device snoops CPU caches (PCIe devices on x86 do).
    pub fn new(dev: Device<'static, 'static, H>, coherent: bool) -> Self {
        Self {
            dev,
            coherent,
            allocs: SpinLock::new(Vec::new()),
            maps: SpinLock::new(Vec::new()),
            last_error: SpinLock::new(None),
        }
    }

    /// The device.
    pub fn device(&self) -> &Device<'static, 'static, H> {
        &self.dev
    }

    /// The last busdma error behind a failed call (`dma-api`'s errors cannot carry it).
    pub fn last_error(&self) -> Option<Error> {
        *self.last_error.lock()
    }

    /// Records `e` and turns it into the nearest `DmaError`.
    fn note(&self, e: Error) -> DmaError {
        *self.last_error.lock() = Some(e);
        match e {
            Error::BadSize { size, limit } => {
                DmaError::SegmentTooLarge { size: size as usize, max: limit as usize }
            }
            _ => DmaError::NoMemory,
        }
    }

    /// Allocations and streaming maps outstanding.
    pub fn outstanding(&self) -> (usize, usize) {
        (self.allocs.lock().len(), self.maps.lock().len())
    }

    /// The tag of `c` (theory 1).
    fn spec(&self, c: &DmaConstraints, size: u64, align: usize) -> TagSpec {
        let mut spec = TagSpec::new(size.max(1), 1);
        // "Any address" in dma-api is u64::MAX; busdma's platforms cap masks at their limit.
        let mask = c.addr_mask.min(self.dev.iommu().platform().dma_limit());
        spec.dma_mask = mask;
        spec.coherent_mask = mask;
        spec.alignment = (c.align.max(align).max(1)) as u64;
        spec.boundary = c.boundary.unwrap_or(0) as u64;
        if let Some(m) = c.max_segment_size {
            spec.max_segment_size = (m as u64).min(spec.max_segment_size);
        }
        spec.flags.coherent = self.coherent;
        spec
    }

    fn alloc(&self, c: DmaConstraints, layout: Layout, no_cache: bool) -> Result<DmaAllocHandle> {
        let size = (layout.size().max(1) as u64).next_multiple_of(PAGE_SIZE);
        let tag = self.dev.tag(self.spec(&c, size, layout.align()))?;
        let mem = tag.alloc_coherent(size, no_cache)?;
        let kva = mem.memory().kva().ok_or(Error::NotDirectMapped { pa: mem.memory().pa().raw() })?;
        let mut bus = mem.segments()[0].addr.raw();
        if mutant::PHYS {
            bus = mem.memory().pa().raw();
        }
        if mem.segments().len() != 1 || bus & (layout.align() as u64 - 1) != 0 {
            return Err(Error::BadState { what: "dma-api allocation: not one aligned segment" });
        }
        let ptr = NonNull::new(kva.raw() as *mut u8).ok_or(Error::NotDirectMapped { pa: 0 })?;
        // Zeroed: a previous owner's bytes are not the driver's to see.
        let zeros = [0u8; 256];
        let mut off = 0;
        while off < size {
            mem.memory().write(off, &zeros[..(size - off).min(256) as usize])?;
            off += 256;
        }
        self.allocs.lock().push((bus, mem));
        // SAFETY: `ptr` is the direct-map address of `size >= layout.size()` bytes of memory
        // this backend owns until `dealloc_*` names `bus` (theory 2), aligned to at least
        // `layout.align()` (the tag's alignment, a page at least); `bus` reaches exactly it.
        #[allow(unsafe_code)]
        Ok(unsafe { DmaAllocHandle::new(ptr, ptr, DmaAddr::from(bus), layout) })
    }

    fn dealloc(&self, bus: u64) -> bool {
        let mut a = self.allocs.lock();
        let Some(i) = a.iter().position(|(b, _)| *b == bus) else { return false };
        let (_, mem) = a.swap_remove(i);
        drop(a);
        // Unloads, then frees once no translation reaches it (or quarantines).
        drop(mem);
        true
    }

    fn map(&self, c: DmaConstraints, addr: NonNull<u8>, size: usize, dir: Direction) -> Result<DmaMapHandle> {
        let tag = self.dev.tag(self.spec(&c, size as u64, 1))?;
        let mut map = tag.create_map()?;
        // SAFETY: `map_streaming`'s caller keeps `[addr, addr + size)` live until
        // `unmap_streaming`, which unloads this map first; CPU access meanwhile follows the
        // sync contract (theory 3).
        #[allow(unsafe_code)]
        let buf = unsafe { KernelBuf::new(KernVa::new(addr.as_ptr() as u64), size as u64) };
        let segs = map.load(&buf, dir)?;
        if segs.len() != 1 {
            return Err(Error::BadState { what: "dma-api streaming map: not one segment" });
        }
        let bus = segs[0].addr.raw();
        map.sync(pre(dir))?;
        let layout = Layout::from_size_align(size, 1)
            .map_err(|_| Error::InvalidArgument { what: "dma-api streaming map size", value: size as u64 })?;
        self.maps.lock().push((bus, dir, map));
        // SAFETY: `bus` reaches `[addr, addr + size)` (or its bounce copy, which busdma's
        // syncs keep equal) until `unmap_streaming`; `bounce_ptr` is none because busdma's
        // syncs, not dma-api's, copy bounce buffers.
        #[allow(unsafe_code)]
        Ok(unsafe { DmaMapHandle::new(addr, DmaAddr::from(bus), layout, None) })
    }

    fn sync(&self, bus: u64, offset: usize, size: usize, to_device: bool) {
        let mut maps = self.maps.lock();
        if let Some((_, dir, map)) = maps.iter_mut().find(|(b, _, _)| *b == bus) {
            let op = if to_device { pre(*dir) } else { post(*dir) };
            let _ = map.sync_range(op, offset as u64, size as u64);
        }
    }

    fn unmap(&self, bus: u64) {
        let mut maps = self.maps.lock();
        let Some(i) = maps.iter().position(|(b, _, _)| *b == bus) else { return };
        let (_, _, mut map) = maps.swap_remove(i);
        drop(maps);
        // Theory 4: an unload unloads even when it reports an error; the domain recovers.
        let _ = map.unload();
    }
}

/// The QEMU suite's mutant of this adapter (`qemu/run --mutants`; see `crate::vtd`'s mutant
/// module for why a mutant is a cfg, not a feature): allocations hand the device their
/// physical address instead of their IOVA. In every other build the switch is `false`.
mod mutant {
    pub(super) const PHYS: bool = cfg!(busdma_mutant = "dmaop-phys-addr");
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

fn direction(d: DmaDirection) -> Direction {
    match d {
        DmaDirection::ToDevice => Direction::ToDevice,
        DmaDirection::FromDevice => Direction::FromDevice,
        DmaDirection::Bidirectional => Direction::Bidirectional,
    }
}

// SAFETY: every method reaches the device, its tags, maps and memory through `&self` only:
// busdma's handles are `Send + Sync` when the IOMMU's are (the bounds), and the lists sit
// behind spin locks.
#[allow(unsafe_code)]
unsafe impl<H: IommuHw + 'static> Send for BusdmaDmaOp<H> where Device<'static, 'static, H>: Send + Sync {}
// SAFETY: as for `Send`.
#[allow(unsafe_code)]
unsafe impl<H: IommuHw + 'static> Sync for BusdmaDmaOp<H> where Device<'static, 'static, H>: Send + Sync {}

#[allow(unsafe_code)]
impl<H: IommuHw + 'static> DmaOp for BusdmaDmaOp<H>
where
    Device<'static, 'static, H>: Send + Sync,
{
    fn page_size(&self) -> usize {
        PAGE_SIZE as usize
    }

    unsafe fn alloc_contiguous(&self, constraints: DmaConstraints, layout: Layout) -> Option<DmaAllocHandle> {
        self.alloc(constraints, layout, false).map_err(|e| self.note(e)).ok()
    }

    unsafe fn dealloc_contiguous(&self, handle: DmaAllocHandle) {
        self.dealloc(handle.dma_addr().as_u64());
    }

    unsafe fn alloc_coherent(&self, constraints: DmaConstraints, layout: Layout) -> Option<DmaAllocHandle> {
        self.alloc(constraints, layout, !self.coherent).map_err(|e| self.note(e)).ok()
    }

    unsafe fn dealloc_coherent(&self, handle: DmaAllocHandle) -> core::result::Result<(), DmaError> {
        self.dealloc(handle.dma_addr().as_u64());
        Ok(())
    }

    unsafe fn map_streaming(
        &self,
        constraints: DmaConstraints,
        addr: NonNull<u8>,
        size: NonZeroUsize,
        direction: DmaDirection,
    ) -> core::result::Result<DmaMapHandle, DmaError> {
        self.map(constraints, addr, size.get(), self::direction(direction)).map_err(|e| self.note(e))
    }

    unsafe fn unmap_streaming(&self, handle: DmaMapHandle) {
        self.unmap(handle.dma_addr().as_u64());
    }

    fn sync_map_for_device(
        &self,
        handle: &DmaMapHandle,
        offset: usize,
        size: usize,
        _direction: DmaDirection,
        _coherency: DmaCoherency,
    ) {
        self.sync(handle.dma_addr().as_u64(), offset, size, true);
    }

    fn sync_map_for_cpu(
        &self,
        handle: &DmaMapHandle,
        offset: usize,
        size: usize,
        _direction: DmaDirection,
        _coherency: DmaCoherency,
    ) {
        self.sync(handle.dma_addr().as_u64(), offset, size, false);
    }
}
