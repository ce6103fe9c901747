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
//! 6. **A load source is a promise** ([`LoadSource`] is an `unsafe trait`). busdma gives the
//!    device the runs a source reports, copies through their kernel addresses when it bounces,
//!    and maintains caches through them; it cannot check that the memory is the caller's to
//!    give or that it stays so. So every source that describes memory by raw address
//!    ([`KernelBuf`], [`PageList`], [`SgList`], [`RawSegments`]) is built by an `unsafe fn
//!    new` whose `# Safety` section is that promise, and the memory busdma owns (coherent
//!    memory, typed buffers, registered user buffers) is loaded through safe calls that keep
//!    it alive while it is mapped. A caller cannot invent an address in safe code:
//!
//! ```compile_fail
//! use busdma::front::{KernelBuf, MemKind, SgEntry, SgList};
//! use busdma::{KernVa, PhysAddr};
//! // Fields are private: a buffer is described only through `unsafe fn new`.
//! let a = KernelBuf { kva: KernVa::new(0x1000), len: 64 };
//! let e = [SgEntry { pa: PhysAddr::new(0), len: 64, kind: MemKind::Mapped { kva: KernVa::new(8) } }];
//! let b = SgList(&e);
//! ```
//!
//! ```compile_fail
//! use busdma::front::{SgEntry, SgList, MemKind};
//! use busdma::{KernVa, PhysAddr};
//! let e = [SgEntry { pa: PhysAddr::new(0), len: 64, kind: MemKind::Mapped { kva: KernVa::new(8) } }];
//! let b = SgList::new(&e); // error: call to unsafe function
//! ```
#![deny(unsafe_code)]

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
///
/// # Safety
///
/// For as long as a map holds a load of this source (from the load until its unload has
/// returned *and* the unload's IOTLB invalidation has completed: a strict unload that returned
/// `Ok`, or a later [`Tag::wait_unmapped`](super::tag::Tag::wait_unmapped) that returned `Ok`,
/// the only proof once a map was dropped loaded or unloaded under deferred invalidation),
/// every run
/// [`LoadSource::for_each_run`] reports must describe memory that:
/// - the caller may hand to the device in the load's direction, and that nobody else (no
///   allocator, no other owner) uses or reuses meanwhile;
/// - for [`MemKind::Page`] and [`MemKind::Mapped`], is RAM or kernel-mapped memory that busdma
///   may read and write by copy (bounce buffering) and maintain in the CPU cache;
/// - for [`MemKind::Mapped`], is mapped at `kva` for `len` bytes, and for a run's `kva`,
///   that address maps the run's physical bytes;
/// - for [`MemKind::PeerBar`] with a bus address, is reached by the device at that address.
///
/// The runs reported must be the same each time `for_each_run` is called during that time.
#[allow(unsafe_code)]
pub unsafe trait LoadSource {
    /// Calls `f` with each run of the source in buffer order; stops at the first error.
    ///
    /// Errors: those of `f`; [`Error::ZeroSize`] for an empty piece;
    /// [`Error::NotDirectMapped`] for a kernel address outside the direct map;
    /// [`Error::Overflow`] for a piece that wraps.
    fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, p: &P, f: F) -> Result<()>;
}

/// What the map collects runs from, inside the crate: every [`LoadSource`], and the owned
/// buffers of [`super::owned`] (whose platform type is fixed by the buffer, not chosen per
/// call). Implementations are trusted as [`LoadSource`]'s are.
pub(crate) trait RunSource<P: Platform> {
    /// As [`LoadSource::for_each_run`].
    fn runs<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: F) -> Result<()>;
}

impl<P: Platform, L: LoadSource> RunSource<P> for L {
    #[inline]
    fn runs<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: F) -> Result<()> {
        self.for_each_run(p, f)
    }
}

/// A kernel-virtual buffer in the direct map: `[kva, kva + len)`.
#[derive(Clone, Copy, Debug)]
pub struct KernelBuf {
    kva: KernVa,
    len: u64,
}

impl KernelBuf {
    /// Describes `[kva, kva + len)` of the direct map.
    ///
    /// # Safety
    ///
    /// The bytes are memory the caller owns and gives to the device for as long as a map
    /// holds this buffer loaded, as [`LoadSource`]'s contract says: not freed, not reused, and
    /// not read or written through a Rust reference while the device may access them.
    #[allow(unsafe_code)]
    pub const unsafe fn new(kva: KernVa, len: u64) -> Self {
        Self { kva, len }
    }

    /// First byte.
    pub fn kva(&self) -> KernVa {
        self.kva
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the buffer is empty (a load of it fails with [`Error::ZeroSize`]).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// SAFETY: the runs are the pages of `[kva, kva + len)` as the platform's direct map
// translates them; the memory promise is `KernelBuf::new`'s caller's.
#[allow(unsafe_code)]
unsafe impl LoadSource for KernelBuf {
    #[inline]
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
    pages: &'a [PhysAddr],
    offset: u64,
    len: u64,
}

impl<'a> PageList<'a> {
    /// Describes `len` bytes starting `offset` bytes (< 4 KiB) into the first of `pages`
    /// (page-aligned physical addresses of RAM pages with page descriptors).
    ///
    /// # Safety
    ///
    /// The pages are RAM the caller owns and gives to the device for as long as a map holds
    /// this list loaded ([`LoadSource`]'s contract): not freed, not reused meanwhile.
    #[allow(unsafe_code)]
    pub const unsafe fn new(pages: &'a [PhysAddr], offset: u64, len: u64) -> Self {
        Self { pages, offset, len }
    }
}

// SAFETY: the runs are the listed pages' bytes; the memory promise is `PageList::new`'s
// caller's.
#[allow(unsafe_code)]
unsafe impl LoadSource for PageList<'_> {
    #[inline]
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
pub struct SgList<'a>(&'a [SgEntry]);

impl<'a> SgList<'a> {
    /// A list of `entries`.
    ///
    /// # Safety
    ///
    /// Every entry describes memory the caller gives to the device for as long as a map holds
    /// this list loaded ([`LoadSource`]'s contract): a [`MemKind::Page`] entry is RAM the
    /// caller owns; a [`MemKind::Mapped`] entry's `kva` maps its `len` bytes (busdma copies and
    /// maintains caches through it); MMIO, peer and unmapped entries are ranges the device may
    /// access.
    #[allow(unsafe_code)]
    pub const unsafe fn new(entries: &'a [SgEntry]) -> Self {
        Self(entries)
    }

    /// The entries.
    pub fn entries(&self) -> &'a [SgEntry] {
        self.0
    }
}

// SAFETY: the runs are the entries as given; the memory promise is `SgList::new`'s caller's.
#[allow(unsafe_code)]
unsafe impl LoadSource for SgList<'_> {
    #[inline]
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

/// One raw physical segment of RAM, `[pa, pa + len)`: [`RawSegments`] of one entry, held by
/// value.
#[derive(Clone, Copy, Debug)]
pub struct RawSegment {
    pa: PhysAddr,
    len: u64,
}

impl RawSegment {
    /// The segment `[pa, pa + len)` of RAM.
    ///
    /// # Safety
    ///
    /// As for [`RawSegments::new`]: RAM the caller owns and gives to the device for as long as
    /// a map holds it loaded ([`LoadSource`]'s contract).
    #[allow(unsafe_code)]
    pub const unsafe fn new(pa: PhysAddr, len: u64) -> Self {
        Self { pa, len }
    }
}

// SAFETY: the run is the segment as given; the memory promise is `RawSegment::new`'s caller's.
#[allow(unsafe_code)]
unsafe impl LoadSource for RawSegment {
    #[inline]
    fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, p: &P, mut f: F) -> Result<()> {
        if self.len == 0 {
            return Err(Error::ZeroSize);
        }
        self.pa.raw().checked_add(self.len).ok_or(Error::Overflow { base: self.pa.raw(), len: self.len })?;
        f(Run::page(p, self.pa, self.len))
    }
}

/// Raw physical segments of RAM (what `bus_dmamem_alloc` returns), in order.
#[derive(Clone, Copy, Debug)]
pub struct RawSegments<'a>(&'a [(PhysAddr, u64)]);

impl<'a> RawSegments<'a> {
    /// Segments `(pa, len)` of RAM.
    ///
    /// # Safety
    ///
    /// Every segment is RAM the caller owns and gives to the device for as long as a map
    /// holds these segments loaded ([`LoadSource`]'s contract).
    #[allow(unsafe_code)]
    pub const unsafe fn new(segments: &'a [(PhysAddr, u64)]) -> Self {
        Self(segments)
    }
}

// SAFETY: the runs are the segments as given; the memory promise is `RawSegments::new`'s
// caller's.
#[allow(unsafe_code)]
unsafe impl LoadSource for RawSegments<'_> {
    #[inline]
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
