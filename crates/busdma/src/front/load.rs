//! What can be loaded: every source reduces to physical runs `(PA, len, kind)`.
//!
//! # Theory
//!
//! 1. **One currency.** A load source ([`LoadSource`]) produces [`Run`]s in buffer order: a
//!    physical range, what kind of memory it is ([`MemKind`]), and the kernel virtual address
//!    the CPU reaches it at, if any. Strategies see only runs, so a new source (the registered
//!    user buffers of `busdma::pin`, say) is one more `impl LoadSource` in a file of its own.
//! 2. **No page descriptor required** (seed 003). A scatter-gather entry may describe memory
//!    with a page descriptor ([`MemKind::Page`]), memory the kernel maps but that has no page
//!    descriptor ([`MemKind::Mapped`]: persistent memory, an `ioremap`), or memory with
//!    neither ([`MemKind::Unmapped`], [`MemKind::Mmio`], [`MemKind::PeerBar`]). Only the first
//!    two can be bounced (a bounce copies through a kernel mapping or a quick map of a page),
//!    and only they get CPU cache maintenance (a page with no kernel mapping through a quick
//!    map, [`super::cache_sync`]).
//! 3. **Peer-to-peer.** A BAR of another device may carry a bus address at which the device
//!    reaches it without the IOMMU; every strategy then uses that address as is.
//! 4. **The sources**: a kernel-virtual buffer ([`KernelBuf`], walked through the direct map
//!    page by page), a list of physical pages with an offset and a length ([`PageList`]), a
//!    scatter-gather list ([`SgList`]), and raw physical segments ([`RawSegments`], as
//!    `bus_dmamap_load_raw` takes from `bus_dmamem_alloc`).
//! 5. **Coalescing happens in the map**, not here: sources emit runs as they find them, the map
//!    merges neighbours that are contiguous in both physical and virtual space.
#![forbid(unsafe_code)]

use crate::addr::{Iova, KernVa, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::platform::Platform;

/// What a physical run is, as far as DMA mapping cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemKind {
    /// RAM with a page descriptor. Its kernel mapping, if any, is the direct map's.
    Page,
    /// Memory with a kernel mapping at `kva` but no page descriptor (persistent memory,
    /// `ioremap`ped memory).
    Mapped {
        /// Kernel virtual address of the run's first byte.
        kva: KernVa,
    },
    /// Memory with neither a page descriptor nor a kernel mapping (unmapped persistent
    /// memory, memory of another guest).
    Unmapped,
    /// Device registers: no page, no kernel mapping, never cached.
    Mmio,
    /// A BAR of a peer device. `bus` is the bus address at which this device reaches it
    /// without going through the IOMMU, if the fabric routes it so.
    PeerBar {
        /// Bus address of the run's first byte, bypassing the IOMMU.
        bus: Option<Iova>,
    },
}

impl MemKind {
    /// Whether a bounce copy can reach this memory (through a page or a kernel mapping).
    #[inline]
    pub fn bounceable(self) -> bool {
        matches!(self, MemKind::Page | MemKind::Mapped { .. })
    }
}

/// One physical run of a load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First physical byte.
    pub pa: PhysAddr,
    /// Length in bytes (> 0).
    pub len: u64,
    /// What the memory is.
    pub kind: MemKind,
    /// Where the CPU reaches the first byte, if anywhere (drives cache maintenance).
    pub kva: Option<KernVa>,
}

impl Run {
    /// A run of RAM with a page descriptor, its kernel mapping looked up in the direct map.
    pub fn page<P: Platform>(p: &P, pa: PhysAddr, len: u64) -> Self {
        Self { pa, len, kind: MemKind::Page, kva: p.phys_to_kva(pa) }
    }

    /// One past the last physical byte.
    #[inline]
    pub fn pa_end(&self) -> u64 {
        self.pa.raw().wrapping_add(self.len)
    }

    /// Whether `next` continues this run in physical space, in kind and in virtual space
    /// (so the two can be one run).
    #[inline]
    pub fn joins(&self, next: &Run) -> bool {
        let kind_ok = match (self.kind, next.kind) {
            (MemKind::PeerBar { bus: Some(a) }, MemKind::PeerBar { bus: Some(b) }) => {
                a.raw().checked_add(self.len) == Some(b.raw())
            }
            (MemKind::Mapped { .. }, MemKind::Mapped { .. }) => true,
            (a, b) => a == b,
        };
        let kva_ok = match (self.kva, next.kva) {
            (Some(a), Some(b)) => a.raw().checked_add(self.len) == Some(b.raw()),
            (None, None) => true,
            _ => false,
        };
        kind_ok && kva_ok && self.pa.raw().checked_add(self.len) == Some(next.pa.raw())
    }
}

/// Something that can be loaded into a map.
pub trait LoadSource {
    /// Calls `f` with each run of the source in buffer order; stops at the first error.
    ///
    /// Errors: those of `f`; [`Error::ZeroSize`] for an empty piece;
    /// [`Error::NotDirectMapped`] for a kernel address outside the direct map;
    /// [`Error::Overflow`] for a piece that wraps.
    fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, p: &P, f: F) -> Result<()>;
}

/// A kernel-virtual buffer in the direct map: `[kva, kva + len)`.
#[derive(Clone, Copy, Debug)]
pub struct KernelBuf {
    /// First byte.
    pub kva: KernVa,
    /// Length in bytes.
    pub len: u64,
}

impl LoadSource for KernelBuf {
    fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, p: &P, mut f: F) -> Result<()> {
        if self.len == 0 {
            return Err(Error::ZeroSize);
        }
        let end = self
            .kva
            .raw()
            .checked_add(self.len)
            .ok_or(Error::Overflow { base: self.kva.raw(), len: self.len })?;
        let mut va = self.kva.raw();
        while va < end {
            // One page at a time: the direct map is contiguous in PA, but a kernel that
            // implements the seam may not be; the map coalesces contiguous pages again.
            let chunk = (PAGE_SIZE - (va & (PAGE_SIZE - 1))).min(end - va);
            let kva = KernVa::new(va);
            let pa = p.kva_to_phys(kva).ok_or(Error::NotDirectMapped { pa: va })?;
            f(Run { pa, len: chunk, kind: MemKind::Page, kva: Some(kva) })?;
            va += chunk;
        }
        Ok(())
    }
}

/// A list of physical pages, `offset` bytes into the first and `len` bytes in all (FreeBSD's
/// `bus_dmamap_load_ma`, Linux's bio vectors).
#[derive(Clone, Copy, Debug)]
pub struct PageList<'a> {
    /// Page-aligned physical addresses of RAM pages with page descriptors.
    pub pages: &'a [PhysAddr],
    /// Offset into the first page (< 4 KiB).
    pub offset: u64,
    /// Total length in bytes.
    pub len: u64,
}

impl LoadSource for PageList<'_> {
    fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, p: &P, mut f: F) -> Result<()> {
        if self.len == 0 {
            return Err(Error::ZeroSize);
        }
        if self.offset >= PAGE_SIZE {
            return Err(Error::InvalidArgument {
                what: "page list offset (≥ one page)", value: self.offset
            });
        }
        let cover =
            self.offset.checked_add(self.len).ok_or(Error::Overflow { base: self.offset, len: self.len })?;
        let need = cover.div_ceil(PAGE_SIZE);
        if need > self.pages.len() as u64 {
            return Err(Error::BadSize {
                size: self.len,
                limit: self.pages.len() as u64 * PAGE_SIZE - self.offset,
            });
        }
        let mut left = self.len;
        let mut off = self.offset;
        for &pg in &self.pages[..need as usize] {
            if !pg.is_aligned(PAGE_SIZE) {
                return Err(Error::Misaligned { value: pg.raw(), align: PAGE_SIZE });
            }
            let chunk = (PAGE_SIZE - off).min(left);
            f(Run::page(p, PhysAddr::new(pg.raw() + off), chunk))?;
            left -= chunk;
            off = 0;
        }
        Ok(())
    }
}

/// One entry of a scatter-gather list: a physical run and what it is. No entry kind needs a
/// page descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgEntry {
    /// First physical byte.
    pub pa: PhysAddr,
    /// Length in bytes (> 0).
    pub len: u64,
    /// What the memory is.
    pub kind: MemKind,
}

/// A scatter-gather list.
#[derive(Clone, Copy, Debug)]
pub struct SgList<'a>(pub &'a [SgEntry]);

impl LoadSource for SgList<'_> {
    fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, p: &P, mut f: F) -> Result<()> {
        if self.0.is_empty() {
            return Err(Error::ZeroSize);
        }
        for e in self.0 {
            if e.len == 0 {
                return Err(Error::ZeroSize);
            }
            e.pa.raw().checked_add(e.len).ok_or(Error::Overflow { base: e.pa.raw(), len: e.len })?;
            let kva = match e.kind {
                MemKind::Page => p.phys_to_kva(e.pa),
                MemKind::Mapped { kva } => Some(kva),
                MemKind::Unmapped | MemKind::Mmio | MemKind::PeerBar { .. } => None,
            };
            f(Run { pa: e.pa, len: e.len, kind: e.kind, kva })?;
        }
        Ok(())
    }
}

/// Raw physical segments of RAM (what `bus_dmamem_alloc` returns), in order.
#[derive(Clone, Copy, Debug)]
pub struct RawSegments<'a>(pub &'a [(PhysAddr, u64)]);

impl LoadSource for RawSegments<'_> {
    fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, p: &P, mut f: F) -> Result<()> {
        if self.0.is_empty() {
            return Err(Error::ZeroSize);
        }
        for &(pa, len) in self.0 {
            if len == 0 {
                return Err(Error::ZeroSize);
            }
            pa.raw().checked_add(len).ok_or(Error::Overflow { base: pa.raw(), len })?;
            f(Run::page(p, pa, len))?;
        }
        Ok(())
    }
}
