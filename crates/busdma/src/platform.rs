//! The platform seam: the one door from busdma to hardware.
//!
//! # Theory
//!
//! 1. **Everything physical goes through [`Platform`].** Physical memory, table pages, the
//!    direct map, CPUs and preemption, a monotonic clock, cache maintenance, barriers, MMIO and
//!    temporary (quick) mappings. Algorithms above the seam contain no `cfg(test)` and no knowledge of whether
//!    they run on the machine model (`busdma-model`) or on bare metal.
//! 2. **No references to device-visible memory.** Physical memory is read and written by copy
//!    ([`Platform::read_phys`], [`Platform::write_phys`]) or by single atomic words
//!    ([`TablePage`] entries); the seam never hands out `&`/`&mut` to memory a device can
//!    write, because the device may change it under the reference.
//! 3. **Table pages are direct-mapped.** [`Platform::alloc_table_page`] returns pages whose
//!    kernel virtual address stays valid until [`Platform::free_table_page`], so page-table code
//!    can update entries with atomic instructions through [`TablePage::entry`], and find a
//!    next-level table from the physical address stored in an entry through
//!    [`Platform::phys_to_kva`].
//! 4. **CPUs.** Per-CPU caches index arrays by [`CpuGuard::cpu`]. A [`CpuGuard`] disables
//!    preemption (and migration) for its lifetime: while it lives, no other thread runs on that
//!    CPU, so per-CPU data needs no lock, only the guard.
//! 5. **The seam is trusted.** busdma's `unsafe` code writes through the addresses it answers,
//!    so [`Platform`] is an `unsafe trait` (as `GlobalAlloc` is): its `# Safety` section lists
//!    each answer an implementation vouches for. Addresses that come from *callers* are not
//!    trusted: before a quick map of one, busdma asks [`Platform::is_ram`].
//!
//! # Execution context
//!
//! Unless a method says otherwise: it never sleeps, it may be called with preemption disabled
//! (inside a [`CpuGuard`]), and it is safe to call concurrently from every CPU.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering, fence};

use crate::addr::{KernVa, PAGE_SIZE, PhysAddr};
use crate::error::Result;

/// Number of quick-map slots each CPU owns: three. Slots 0 and 1 serve copies, a source and a
/// destination, so a copy can span or join two pages (the extension seed 000 anticipates);
/// slot [`MAINTENANCE_SLOT`] serves only cache maintenance of pages outside the direct map, so
/// a sync never disturbs a quick map its caller holds.
pub const QUICK_SLOTS: usize = 3;

/// The quick-map slot reserved for cache maintenance
/// ([`crate::quickmap::maintain_phys`]); held across one maintenance call of one page, never
/// across anything else, so it cannot nest on one CPU.
pub const MAINTENANCE_SLOT: usize = 2;

/// Where pages may lie with respect to the direct map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Anywhere in RAM.
    Any,
    /// Only where the direct map covers them (the CPU reaches them at a permanent KVA).
    DirectMapped,
    /// Only outside the direct map (the CPU reaches them through quick maps alone).
    NotDirectMapped,
}

/// How the CPU maps memory allocated for DMA (seed 002's cacheability question).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemAttr {
    /// Normal write-back cached memory: non-coherent devices need cache maintenance.
    WriteBack,
    /// Uncached: CPU accesses go straight to memory; no maintenance needed, slower CPU access.
    Uncached,
}

/// A request for contiguous, zeroed RAM pages for DMA (coherent buffers, bounce pages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Number of 4 KiB pages (> 0).
    pub pages: u64,
    /// Alignment of the first page in bytes: a power of two, at least [`PAGE_SIZE`].
    pub align: u64,
    /// Every byte lies below this physical address (a device's DMA limit), if set.
    pub below: Option<PhysAddr>,
    /// Direct-map placement.
    pub placement: Placement,
    /// CPU mapping attribute.
    pub attr: MemAttr,
}

impl PageRequest {
    /// `pages` write-back pages anywhere, page-aligned.
    pub const fn pages(pages: u64) -> Self {
        Self { pages, align: PAGE_SIZE, below: None, placement: Placement::Any, attr: MemAttr::WriteBack }
    }
}

/// A 4 KiB page-table page: its physical address (what entries and hardware registers store)
/// and its kernel virtual address (where the CPU updates it).
///
/// # Invariants
///
/// `kva` maps `pa` for 4 KiB, is 4 KiB-aligned, and stays valid until the page is given back
/// with [`Platform::free_table_page`].
///
/// Not `Copy` nor `Clone`: freeing the page takes the handle by value, so no safe copy can
/// outlive it and write into the page's next owner. Code that needs a second handle to a page
/// it knows is still allocated (a walker's view of a table reachable from its root) makes one
/// with the `unsafe` [`TablePage::new`].
///
/// ```compile_fail,E0382
/// fn after_free<P: busdma::Platform>(p: &P) -> busdma::Result<()> {
///     let a = p.alloc_table_page()?;
///     let b = a; // moves: there is no copy of a table page
///     // SAFETY: (for the test) the page is unreachable and freed once.
///     unsafe { p.free_table_page(b) };
///     a.entry(0); // E0382: use of moved value `a`
///     Ok(())
/// }
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct TablePage {
    pa: PhysAddr,
    kva: KernVa,
}

impl TablePage {
    /// Number of 64-bit entries in a table page.
    pub const ENTRIES: usize = (PAGE_SIZE / 8) as usize;

    /// Wraps a page.
    ///
    /// # Safety
    ///
    /// `kva` must map the 4 KiB page at `pa`, both 4 KiB-aligned, and stay valid (and not be
    /// used for anything else) until the page is freed.
    pub const unsafe fn new(pa: PhysAddr, kva: KernVa) -> Self {
        // INVARIANT: the caller guarantees the mapping and its lifetime.
        Self { pa, kva }
    }

    /// A second handle to the same page: the one explicit way to copy a `TablePage`.
    ///
    /// # Safety
    ///
    /// The page stays allocated for as long as the returned handle is used, and at most one
    /// of the handles is ever given to [`Platform::free_table_page`] (or to a pool that frees
    /// it); neither is used after that.
    #[inline]
    pub unsafe fn alias(&self) -> TablePage {
        // INVARIANT: the same page as `self`, which the caller keeps allocated meanwhile.
        TablePage { pa: self.pa, kva: self.kva }
    }

    /// The page's physical address.
    #[inline]
    pub fn pa(&self) -> PhysAddr {
        self.pa
    }

    /// The page's kernel virtual address.
    #[inline]
    pub fn kva(&self) -> KernVa {
        self.kva
    }

    /// Entry `index` (< 512) as an atomic word. Hardware walkers read it concurrently, so it
    /// is only ever accessed atomically.
    ///
    /// Returns `None` for an index out of the page.
    #[inline]
    pub fn entry(&self, index: usize) -> Option<&AtomicU64> {
        if index >= Self::ENTRIES {
            return None;
        }
        let ptr = (self.kva.raw() as usize + index * 8) as *mut u64;
        // SAFETY: by the type invariant `kva` maps 4 KiB of memory that lives until the page
        // is freed; `index < 512` keeps the 8-byte, 8-aligned word inside it. The memory is
        // only ever accessed atomically (here and by hardware walkers, which read whole
        // aligned words), so an `AtomicU64` view is sound. The borrow of `self` does not
        // outlive the page because freeing it takes the `TablePage` by value.
        Some(unsafe { AtomicU64::from_ptr(ptr) })
    }
}

/// The seam between busdma and the machine.
///
/// See the module documentation for the rules every implementation follows. Each method
/// states its execution context where it differs from the default (never sleeps, callable
/// with preemption disabled, callable concurrently).
///
/// # Safety
///
/// busdma's `unsafe` code writes through addresses this trait returns, so a wrong answer is
/// undefined behaviour in busdma, not merely a wrong result (as for [`core::alloc::GlobalAlloc`]).
/// An implementation guarantees:
///
/// - **Table pages.** [`Platform::alloc_table_page`] returns a page that is zeroed, 4 KiB,
///   direct-mapped (its `kva` maps its `pa` read-write and [`Platform::phys_to_kva`] of `pa`
///   answers that `kva`), and owned exclusively by the caller until it is given back with
///   [`Platform::free_table_page`]: no other allocation, and no other use, overlaps it.
/// - **Direct map.** Every `Some` answer of [`Platform::phys_to_kva`] and
///   [`Platform::kva_to_phys`] is a true, permanent mapping of RAM: the KVA maps the PA,
///   read-write, for the platform's lifetime, consistently page after page as answered.
/// - **RAM.** [`Platform::is_ram`] answers `true` only for ranges that are entirely RAM, which
///   [`Platform::quick_map`] can map and [`Platform::read_phys`]/[`Platform::write_phys`] can
///   reach; every page [`Platform::alloc_table_page`] or [`Platform::alloc_pages`] returns is
///   RAM.
/// - **Quick maps.** [`Platform::quick_map`] returns a window that maps exactly the page asked
///   for, read-write, for `PAGE_SIZE` bytes, until the slot is unmapped or remapped, and the
///   windows of distinct `(cpu, slot)` pairs do not overlap each other or the direct map.
/// - **CPUs.** [`Platform::num_cpus`] never changes; [`Platform::preempt_disable`] (and so
///   [`Platform::pin_cpu`]) returns an index `< num_cpus()` and, until the matching
///   [`Platform::preempt_enable`], no other thread runs on that CPU or uses that index, so
///   per-CPU data indexed by it needs no lock.
/// - **Pages.** [`Platform::alloc_pages`] returns zeroed RAM meeting the request, owned by the
///   caller until [`Platform::free_pages`].
/// - **Physical copies** ([`Platform::read_phys`], [`Platform::write_phys`],
///   [`Platform::fill_phys`]) touch exactly the bytes asked for, and fail rather than touch
///   anything outside RAM.
///
/// ```compile_fail,E0200
/// // A safe `impl` of the seam is rejected (E0200): implementing it is a trust boundary.
/// struct Liar;
/// impl busdma::Platform for Liar {
///     // ...
/// }
/// ```
pub unsafe trait Platform: Sync {
    // ---- physical memory -------------------------------------------------------------

    /// Copies `buf.len()` bytes of physical memory starting at `pa` into `buf`.
    ///
    /// Errors: [`crate::Error::OutOfRange`] if any byte is outside RAM.
    fn read_phys(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<()>;

    /// Copies `data` into physical memory starting at `pa`.
    ///
    /// Errors: [`crate::Error::OutOfRange`] if any byte is outside RAM.
    fn write_phys(&self, pa: PhysAddr, data: &[u8]) -> Result<()>;

    /// Sets `len` bytes of physical memory starting at `pa` to `byte`.
    ///
    /// Errors: [`crate::Error::OutOfRange`] if any byte is outside RAM.
    fn fill_phys(&self, pa: PhysAddr, len: u64, byte: u8) -> Result<()>;

    // ---- table pages -----------------------------------------------------------------

    /// Allocates one zeroed, direct-mapped 4 KiB page for page tables (or other memory that
    /// hardware reads and the CPU updates atomically).
    ///
    /// Never sleeps. Errors: [`crate::Error::NoMemory`] when no page is free.
    fn alloc_table_page(&self) -> Result<TablePage>;

    /// Returns a page obtained from [`Platform::alloc_table_page`].
    ///
    /// # Safety
    ///
    /// The page must have come from this platform's `alloc_table_page`, be freed once, and no
    /// hardware walker may reach it any more (the invalidation that covers its last use has
    /// completed).
    unsafe fn free_table_page(&self, page: TablePage);

    /// Allocates contiguous zeroed RAM pages meeting `req` (for coherent DMA buffers and
    /// bounce pages). Never sleeps.
    ///
    /// Errors: [`crate::Error::ZeroSize`], [`crate::Error::BadAlignment`],
    /// [`crate::Error::NoMemory`] (no run fits the constraints).
    fn alloc_pages(&self, req: &PageRequest) -> Result<PhysAddr>;

    /// Returns pages obtained from [`Platform::alloc_pages`].
    ///
    /// # Safety
    ///
    /// `(pa, pages)` must be exactly one earlier allocation, freed once, that no device can
    /// reach any more.
    unsafe fn free_pages(&self, pa: PhysAddr, pages: u64);

    /// True if every byte of `[pa, pa + len)` is RAM: memory with a page behind it, which
    /// [`Platform::quick_map`] may map and the physical copies may reach (not MMIO, not a
    /// hole, not a peer's BAR). `len == 0` asks about the byte at `pa`; a range that wraps is
    /// not RAM.
    ///
    /// busdma calls it once per call that takes a caller-given physical address to a quick map
    /// ([`crate::quickmap`]), not per page, so it should be cheap (a compare against the RAM
    /// layout, or a walk of a short list of ranges).
    fn is_ram(&self, pa: PhysAddr, len: u64) -> bool;

    /// The highest bus address (inclusive) the platform's interconnect carries for DMA: a
    /// bridge or SoC fabric narrower than 64 bits cuts off what a device emits above it.
    /// A root tag whose DMA or coherent mask is wider is refused ([`crate::front::Tag::new_root`]);
    /// [`crate::front::TagSpec::of_platform`] is the spec a driver narrows its own against.
    /// The default carries every address.
    fn dma_limit(&self) -> u64 {
        u64::MAX - 1
    }

    // ---- direct map ------------------------------------------------------------------

    /// The direct-map kernel virtual address of `pa`, or `None` if `pa` has no permanent
    /// kernel mapping (outside RAM, or RAM outside the direct map).
    fn phys_to_kva(&self, pa: PhysAddr) -> Option<KernVa>;

    /// The physical address behind a direct-map `kva`, or `None` if `kva` is not in the
    /// direct map.
    fn kva_to_phys(&self, kva: KernVa) -> Option<PhysAddr>;

    // ---- CPUs and preemption ---------------------------------------------------------

    /// Number of CPUs; CPU indices are `0..num_cpus()`.
    fn num_cpus(&self) -> usize;

    /// Disables preemption and migration for the calling thread and returns the index of the
    /// CPU it now runs on. Nests: each call is paired with one [`Platform::preempt_enable`].
    /// Prefer [`Platform::pin_cpu`], which pairs them for you.
    fn preempt_disable(&self) -> usize;

    /// Undoes one [`Platform::preempt_disable`] on `cpu`.
    fn preempt_enable(&self, cpu: usize);

    /// Disables preemption until the returned guard drops.
    #[inline]
    fn pin_cpu(&self) -> CpuGuard<'_, Self>
    where
        Self: Sized,
    {
        let cpu = self.preempt_disable();
        CpuGuard { platform: self, cpu, _not_send: PhantomData }
    }

    // ---- time ------------------------------------------------------------------------

    /// Nanoseconds on a monotonic clock: never goes backwards, counts from an arbitrary
    /// origin (the model: the platform's creation), and is comparable across CPUs. Deferred
    /// IOTLB invalidation bounds the age of its flush queues with it.
    ///
    /// Execution context: never sleeps, callable with preemption disabled and from every CPU
    /// at once; cheap enough to read on every unmap (a TSC or generic-timer read on hardware).
    fn monotonic_ns(&self) -> u64;

    // ---- cache maintenance (by kernel virtual range) ---------------------------------

    /// Writes back dirty lines of `[kva, kva + len)` to memory (before a device reads it).
    fn cache_clean(&self, kva: KernVa, len: u64);

    /// Discards lines of `[kva, kva + len)` without writing back (before the CPU reads what a
    /// device wrote). Callers must own whole lines or clean the partial ones first.
    fn cache_invalidate(&self, kva: KernVa, len: u64);

    /// Writes back then discards lines of `[kva, kva + len)`.
    fn cache_clean_invalidate(&self, kva: KernVa, len: u64);

    // ---- barriers --------------------------------------------------------------------

    /// Orders the CPU's earlier writes to memory before later writes that a device observes
    /// (a descriptor's payload before its doorbell). Defaults to a release fence.
    #[inline]
    fn dma_wmb(&self) {
        fence(Ordering::Release);
    }

    /// Orders the CPU's earlier reads of device-written status before later reads of the data
    /// it describes. Defaults to an acquire fence.
    #[inline]
    fn dma_rmb(&self) {
        fence(Ordering::Acquire);
    }

    /// A full barrier. Defaults to a sequentially consistent fence.
    #[inline]
    fn mb(&self) {
        fence(Ordering::SeqCst);
    }

    // ---- MMIO ------------------------------------------------------------------------

    /// Reads a 32-bit device register.
    ///
    /// # Safety
    ///
    /// `pa` must be a 4-aligned register of a device the caller owns; reads may have side
    /// effects.
    unsafe fn mmio_read32(&self, pa: PhysAddr) -> u32;

    /// Writes a 32-bit device register.
    ///
    /// # Safety
    ///
    /// As for [`Platform::mmio_read32`].
    unsafe fn mmio_write32(&self, pa: PhysAddr, value: u32);

    /// Reads a 64-bit device register.
    ///
    /// # Safety
    ///
    /// As for [`Platform::mmio_read32`], with 8-byte alignment.
    unsafe fn mmio_read64(&self, pa: PhysAddr) -> u64;

    /// Writes a 64-bit device register.
    ///
    /// # Safety
    ///
    /// As for [`Platform::mmio_read64`].
    unsafe fn mmio_write64(&self, pa: PhysAddr, value: u64);

    /// Reads an 8-bit device register (virtio's device status). The default reads the aligned
    /// 32-bit word that holds it: correct only for devices that accept word reads of it and
    /// whose reads have no side effect; a platform with byte-lane MMIO overrides it.
    ///
    /// # Safety
    ///
    /// As for [`Platform::mmio_read32`], for the register at `pa` (any alignment).
    unsafe fn mmio_read8(&self, pa: PhysAddr) -> u8 {
        let word = PhysAddr::new(pa.raw() & !3);
        // SAFETY: the caller owns the register, and so the aligned word that holds it.
        (unsafe { self.mmio_read32(word) } >> ((pa.raw() & 3) * 8)) as u8
    }

    /// Writes an 8-bit device register. The default is a read-modify-write of the aligned
    /// 32-bit word (see [`Platform::mmio_read8`]); a platform with byte-lane MMIO overrides it.
    ///
    /// # Safety
    ///
    /// As for [`Platform::mmio_read8`].
    unsafe fn mmio_write8(&self, pa: PhysAddr, value: u8) {
        let word = PhysAddr::new(pa.raw() & !3);
        let shift = (pa.raw() & 3) * 8;
        // SAFETY: the caller owns the register, and so the aligned word that holds it.
        unsafe {
            let old = self.mmio_read32(word);
            self.mmio_write32(word, (old & !(0xff << shift)) | (u32::from(value) << shift));
        }
    }

    /// Reads a 16-bit device register (2-aligned). Default: as [`Platform::mmio_read8`].
    ///
    /// # Safety
    ///
    /// As for [`Platform::mmio_read32`], with 2-byte alignment.
    unsafe fn mmio_read16(&self, pa: PhysAddr) -> u16 {
        let word = PhysAddr::new(pa.raw() & !3);
        // SAFETY: the caller owns the register, and so the aligned word that holds it.
        (unsafe { self.mmio_read32(word) } >> ((pa.raw() & 2) * 8)) as u16
    }

    /// Writes a 16-bit device register (2-aligned). Default: as [`Platform::mmio_write8`].
    ///
    /// # Safety
    ///
    /// As for [`Platform::mmio_read16`].
    unsafe fn mmio_write16(&self, pa: PhysAddr, value: u16) {
        let word = PhysAddr::new(pa.raw() & !3);
        let shift = (pa.raw() & 2) * 8;
        // SAFETY: the caller owns the register, and so the aligned word that holds it.
        unsafe {
            let old = self.mmio_read32(word);
            self.mmio_write32(word, (old & !(0xffff << shift)) | (u32::from(value) << shift));
        }
    }

    // ---- quick (temporary per-CPU) mappings ------------------------------------------

    /// Points quick-map slot `slot` (< [`QUICK_SLOTS`]) of CPU `cpu` at the 4 KiB page `pa`
    /// and returns the slot's kernel virtual address. Never sleeps, never fails.
    ///
    /// **Colour.** On a machine whose data cache is virtually indexed with more than one
    /// colour (a way larger than a page), the returned address has the page's *kernel colour*,
    /// the same whatever the CPU and the slot: its physical page number modulo the number of
    /// colours. Every kernel alias of a page outside the direct map then meets the same cache
    /// lines, so maintenance through one window reaches what a copy through another left
    /// (MIPS's `kmap_coherent`, parisc's `tmpalias`; see [`crate::quickmap`], theory 6). A
    /// platform does this by reserving one window page per colour for each slot.
    ///
    /// # Safety
    ///
    /// The caller holds a [`CpuGuard`] for `cpu`, `pa` is page-aligned RAM, and the slot is
    /// not in use (no nesting; `busdma::quickmap` checks this).
    unsafe fn quick_map(&self, cpu: usize, slot: usize, pa: PhysAddr) -> KernVa;

    /// Unmaps quick-map slot `slot` of CPU `cpu`. Never sleeps, never fails.
    ///
    /// # Safety
    ///
    /// The caller holds a [`CpuGuard`] for `cpu` and mapped the slot with
    /// [`Platform::quick_map`]; nothing uses the slot's address afterwards.
    unsafe fn quick_unmap(&self, cpu: usize, slot: usize);
}

/// Preemption (and migration) disabled on one CPU for the guard's lifetime.
///
/// `!Send`: it belongs to the thread that created it. While it lives the thread stays on
/// [`CpuGuard::cpu`] and no other thread runs there, so per-CPU state indexed by it needs no
/// lock.
pub struct CpuGuard<'p, P: Platform> {
    platform: &'p P,
    cpu: usize,
    _not_send: PhantomData<*const ()>,
}

impl<P: Platform> CpuGuard<'_, P> {
    /// The CPU this guard pins.
    #[inline]
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// The platform the guard belongs to.
    #[inline]
    pub fn platform(&self) -> &P {
        self.platform
    }
}

impl<P: Platform> Drop for CpuGuard<'_, P> {
    #[inline]
    fn drop(&mut self) {
        self.platform.preempt_enable(self.cpu);
    }
}
