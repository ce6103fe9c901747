//! The hosted platform: RAM arena, direct map, quick-map windows, CPUs and MMIO.
//!
//! See the crate documentation for the picture. Every `unsafe` block here touches one of
//! three mappings this type creates and owns for its whole life: the physical view, the
//! direct map, and the quick-map windows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use busdma::platform::QUICK_SLOTS;
use busdma::{
    AddrRange, Error, KernVa, MemAttr, PAGE_SIZE, PageRequest, PhysAddr, Platform, Result, TablePage,
};

use crate::cache::{Cache, CacheConfig, CachedCpu, Coherence, Memory, Snoop};
use crate::cpu::{CpuBinding, Cpus};
use crate::ram::{FrameAllocator, FrameBlock, FrameRequest, Placement};

/// Default RAM size: 1 GiB, enough for 262 144-page benchmarks with room to spare; sparse,
/// so it costs only what is touched.
pub const DEFAULT_RAM_SIZE: u64 = 1 << 30;
/// Default first physical address: 16 MiB. Not zero, so "PA == offset" bugs show; low enough
/// that 240 MiB of RAM lies below 2^28, the DMA limit of 28-bit devices such as QEMU's edu.
pub const DEFAULT_RAM_BASE: u64 = 16 << 20;

/// The machine's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// First physical address of RAM (page-aligned, non-zero is wise).
    pub ram_base: PhysAddr,
    /// RAM size in bytes (non-zero, page-aligned).
    pub ram_size: u64,
    /// Bytes of RAM, from its start, that the direct map covers (page-aligned, at most
    /// `ram_size`). RAM above is reachable by the CPU only through quick maps.
    pub direct_map_size: u64,
    /// Number of CPU slots (at least one).
    pub cpus: usize,
    /// The CPU cache model, if any (see [`crate::cache`]). `None`: no cache is modelled, CPU
    /// and devices see the same bytes at once.
    pub cache: Option<CacheConfig>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            ram_base: PhysAddr::new(DEFAULT_RAM_BASE),
            ram_size: DEFAULT_RAM_SIZE,
            direct_map_size: DEFAULT_RAM_SIZE,
            cpus: std::thread::available_parallelism().map_or(2, |n| n.get()),
            cache: None,
        }
    }
}

impl MachineConfig {
    /// A machine of `ram_size` bytes, all direct-mapped, with default base and CPUs.
    pub fn with_ram(ram_size: u64) -> Self {
        Self { ram_size, direct_map_size: ram_size, ..Self::default() }
    }

    /// The same machine with the upper half of RAM outside the direct map.
    pub fn upper_half_not_direct_mapped(mut self) -> Self {
        self.direct_map_size = (self.ram_size / 2) & !(PAGE_SIZE - 1);
        self
    }

    /// The same machine with a CPU cache model.
    pub fn with_cache(mut self, cache: CacheConfig) -> Self {
        self.cache = Some(cache);
        self
    }

    fn validate(&self) -> Result<()> {
        if let Some(c) = &self.cache {
            c.validate()?;
        }
        if self.ram_size == 0 {
            return Err(Error::ZeroSize);
        }
        for v in [self.ram_size, self.ram_base.raw(), self.direct_map_size] {
            if v % PAGE_SIZE != 0 {
                return Err(Error::Misaligned { value: v, align: PAGE_SIZE });
            }
        }
        AddrRange::from_start_len(self.ram_base, self.ram_size)?;
        if self.direct_map_size > self.ram_size {
            return Err(Error::BadSize { size: self.direct_map_size, limit: self.ram_size });
        }
        if self.cpus == 0 {
            return Err(Error::InvalidArgument { what: "CPU count", value: 0 });
        }
        if isize::try_from(self.ram_size).is_err() {
            return Err(Error::BadSize { size: self.ram_size, limit: isize::MAX as u64 });
        }
        Ok(())
    }
}

/// A device's registers, reachable through the platform's MMIO methods.
pub trait MmioHandler: Send + Sync {
    /// Reads `size` (4 or 8) bytes at `offset` into the register window.
    fn read(&self, offset: u64, size: u8) -> u64;
    /// Writes `size` (4 or 8) bytes at `offset` into the register window.
    fn write(&self, offset: u64, size: u8, value: u64);
}

struct MmioWindow {
    range: AddrRange<PhysAddr>,
    handler: Box<dyn MmioHandler>,
}

/// Counters a user can read.
#[derive(Debug, Default)]
pub struct HostCounters {
    /// Table pages currently allocated through [`Platform::alloc_table_page`].
    pub table_pages_live: AtomicU64,
    /// Quick-map entries that needed a real mapping change.
    pub quick_maps: AtomicU64,
    /// MMIO accesses that hit no registered device.
    pub mmio_unclaimed: AtomicU64,
    /// Calls to [`Platform::alloc_table_page`] and [`Platform::alloc_pages`] so far, failed
    /// ones included (the numbering [`HostPlatform::fail_nth_alloc`] counts in).
    pub alloc_attempts: AtomicU64,
    /// The attempt number that fails on purpose (0: none); see [`HostPlatform::fail_nth_alloc`].
    fail_alloc_at: AtomicU64,
    /// Allocations failed on purpose.
    pub injected_failures: AtomicU64,
}

/// The hosted implementation of [`busdma::Platform`].
pub struct HostPlatform {
    config: MachineConfig,
    fd: libc::c_int,
    /// Physical view: all of RAM.
    phys: *mut u8,
    /// Direct map: the first `direct_map_size` bytes of RAM.
    direct: *mut u8,
    /// Quick-map windows: `cpus * QUICK_SLOTS` groups of `colours` pages, the group of slot
    /// `s` of CPU `c` at index `c * QUICK_SLOTS + s`, its page `k` of colour `k` (the start is
    /// aligned to a whole group), so a page is always mapped at a window of its own colour.
    quick: *mut u8,
    /// The reservation holding the windows (aligned up to `quick`): start and length.
    quick_reservation: (*mut u8, u64),
    /// Colours of the cache model (1 without one, or with a PIPT one).
    colours: u64,
    frames: FrameAllocator,
    cpus: Cpus,
    mmio: RwLock<Vec<MmioWindow>>,
    /// Runs allocated uncached: first PA -> pages.
    uncached: Mutex<BTreeMap<u64, u64>>,
    counters: HostCounters,
    /// The CPU cache model (`config.cache`).
    cache: Option<Cache>,
    /// The page each quick-map slot maps (`NO_PAGE` when none), so cache maintenance through a
    /// quick-map address finds its physical lines.
    quick_pa: Box<[AtomicU64]>,
    /// What the platform handed each frame out for: ground truth for ownership checks.
    kinds: crate::audit::PageKinds,
    /// Threads currently recording bus accesses ([`HostPlatform::watch_bus`]); zero keeps the
    /// data path to one relaxed load.
    watchers: AtomicU64,
    /// The monotonic clock behind [`Platform::monotonic_ns`].
    clock: Clock,
    /// [`Platform::dma_limit`]: what the modelled bus carries ([`HostPlatform::limit_dma`]).
    dma_limit: AtomicU64,
}

/// The machine's monotonic clock: host time since the machine was built, or, once frozen, a
/// value that moves only when a test advances it (so time-bounded behaviour is reproducible
/// on a loaded machine).
#[derive(Debug)]
struct Clock {
    origin: crate::tsc::HostClock,
    frozen: std::sync::atomic::AtomicBool,
    manual_ns: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Self {
            origin: crate::tsc::HostClock::new(),
            frozen: std::sync::atomic::AtomicBool::new(false),
            manual_ns: AtomicU64::new(0),
        }
    }

    #[inline]
    fn host_ns(&self) -> u64 {
        self.origin.ns()
    }

    #[inline]
    fn now(&self) -> u64 {
        if self.frozen.load(Ordering::Acquire) {
            self.manual_ns.load(Ordering::Acquire)
        } else {
            self.host_ns()
        }
    }
}

/// `quick_pa` value of an empty slot: not a page-aligned address, so never a page.
const NO_PAGE: u64 = u64::MAX;

/// RAM as it is, under any cache: what the cache model fills from and writes back to.
pub(crate) struct RawRam<'a>(pub(crate) &'a HostPlatform);

impl Memory for RawRam<'_> {
    fn load(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<()> {
        self.0.raw_read(pa, buf)
    }
    fn store(&self, pa: PhysAddr, data: &[u8]) -> Result<()> {
        self.0.raw_write(pa, data)
    }
}

// SAFETY: the raw pointers are addresses of mappings owned by this value for its whole life;
// all access through them is bounds-checked and uses atomics or copies, never references
// held across calls, so sharing the value between threads is sound.
unsafe impl Send for HostPlatform {}
// SAFETY: as above; mutable state other than RAM bytes is behind atomics or locks.
unsafe impl Sync for HostPlatform {}

fn os_error(what: &'static str) -> Error {
    let _ = std::io::Error::last_os_error();
    Error::Unsupported { what }
}

fn map(
    addr: *mut u8,
    len: u64,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    off: u64,
) -> Result<*mut u8> {
    // SAFETY: mmap with a null hint creates a new mapping; with MAP_FIXED callers pass an
    // address inside a reservation they own. Arguments are checked by the kernel.
    let p = unsafe { libc::mmap(addr.cast(), len as usize, prot, flags, fd, off as libc::off_t) };
    if p == libc::MAP_FAILED { Err(os_error("mmap of the RAM arena")) } else { Ok(p.cast()) }
}

impl HostPlatform {
    /// Builds a machine.
    ///
    /// Errors: [`Error::ZeroSize`] (no RAM), [`Error::Misaligned`] (size, base or direct-map
    /// size not page-aligned), [`Error::Overflow`] (RAM wraps), [`Error::BadSize`],
    /// [`Error::InvalidArgument`] (no CPUs), [`Error::Unsupported`] (the OS refused the memfd).
    pub fn new(config: MachineConfig) -> Result<Self> {
        config.validate()?;
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"busdma-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(os_error("memfd_create"));
        }
        // SAFETY: fd is the memfd just created.
        if unsafe { libc::ftruncate(fd, config.ram_size as libc::off_t) } != 0 {
            // SAFETY: closing our own fd.
            unsafe { libc::close(fd) };
            return Err(os_error("ftruncate of the RAM memfd"));
        }
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let shared = libc::MAP_SHARED | libc::MAP_NORESERVE;
        let phys = map(std::ptr::null_mut(), config.ram_size, rw, shared, fd, 0)?;
        let direct = if config.direct_map_size > 0 {
            map(std::ptr::null_mut(), config.direct_map_size, rw, shared, fd, 0)?
        } else {
            std::ptr::null_mut()
        };
        // One window page per colour per slot, and colours - 1 pages more so the windows can
        // start on a colour-0 page (the platform's side of `Platform::quick_map`'s colour rule).
        let colours = config.cache.map_or(1, |c| c.colours());
        let group = colours * PAGE_SIZE;
        let quick_len = (config.cpus * QUICK_SLOTS) as u64 * group + (colours - 1) * PAGE_SIZE;
        let reservation = map(
            std::ptr::null_mut(),
            quick_len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )?;
        let skip = (group - reservation as u64 % group) % group;
        // SAFETY: `skip` < one group, and the reservation has colours - 1 spare pages past the
        // windows, so the aligned start and every window stay inside it.
        let quick = unsafe { reservation.add(skip as usize) };
        Ok(Self {
            config,
            fd,
            phys,
            direct,
            quick,
            quick_reservation: (reservation, quick_len),
            colours,
            frames: FrameAllocator::new(
                config.ram_base,
                config.ram_size / PAGE_SIZE,
                config.direct_map_size / PAGE_SIZE,
            ),
            cpus: Cpus::new(config.cpus),
            mmio: RwLock::new(Vec::new()),
            uncached: Mutex::new(BTreeMap::new()),
            counters: HostCounters::default(),
            clock: Clock::new(),
            cache: config.cache.map(Cache::new).transpose()?,
            quick_pa: (0..config.cpus * QUICK_SLOTS).map(|_| AtomicU64::new(NO_PAGE)).collect(),
            kinds: crate::audit::PageKinds::new(config.ram_base, config.ram_size / PAGE_SIZE),
            watchers: AtomicU64::new(0),
            dma_limit: AtomicU64::new(u64::MAX - 1),
        })
    }

    /// Models a bus that carries DMA addresses up to `limit` (inclusive) only, as a narrow
    /// bridge or fabric does: [`Platform::dma_limit`] answers `limit` from now on.
    pub fn limit_dma(&self, limit: u64) {
        self.dma_limit.store(limit, Ordering::Relaxed);
    }

    /// The machine's configuration.
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// RAM as a physical range.
    pub fn ram(&self) -> AddrRange<PhysAddr> {
        // Validated at construction.
        AddrRange::from_start_len(self.config.ram_base, self.config.ram_size)
            .unwrap_or_else(|_| unreachable!())
    }

    /// The frame allocator.
    pub fn frames(&self) -> &FrameAllocator {
        &self.frames
    }

    /// Counters.
    pub fn counters(&self) -> &HostCounters {
        &self.counters
    }

    /// Fault injection: makes the `n`-th page allocation from now (1 = the next) through
    /// [`Platform::alloc_table_page`] or [`Platform::alloc_pages`] fail with
    /// [`Error::NoMemory`]; `None` cancels. One failure per call. The check is an ordinary
    /// counter in every build, so a test drives the very paths a real out-of-memory takes
    /// (illumos vmem's `mtbf`, made deterministic).
    pub fn fail_nth_alloc(&self, n: Option<u64>) {
        let now = self.counters.alloc_attempts.load(Ordering::Relaxed);
        let at = n.map_or(0, |n| now.saturating_add(n.max(1)));
        self.counters.fail_alloc_at.store(at, Ordering::Relaxed);
    }

    /// Page allocations attempted so far (see [`HostPlatform::fail_nth_alloc`]).
    pub fn alloc_attempts(&self) -> u64 {
        self.counters.alloc_attempts.load(Ordering::Relaxed)
    }

    /// Counts one allocation attempt of `pages` pages; fails it if it is the chosen one.
    fn injected_failure(&self, pages: u64) -> Result<()> {
        let n = self.counters.alloc_attempts.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.counters.fail_alloc_at.load(Ordering::Relaxed) {
            self.counters.fail_alloc_at.store(0, Ordering::Relaxed);
            self.counters.injected_failures.fetch_add(1, Ordering::Relaxed);
            return Err(Error::NoMemory { requested: pages * PAGE_SIZE });
        }
        Ok(())
    }

    /// Allocates a run of frames, returned to the allocator when the block drops.
    pub fn alloc_frames(&self, req: FrameRequest) -> Result<FrameBlock<'_>> {
        let pa = self.frames.alloc(req)?;
        Ok(FrameBlock { alloc: &self.frames, pa, pages: req.pages })
    }

    /// The CPU mapping attribute of the page holding `pa` (as allocated by
    /// [`Platform::alloc_pages`]; everything else is write-back).
    pub fn mem_attr(&self, pa: PhysAddr) -> MemAttr {
        let u = self.uncached.lock().unwrap_or_else(|e| e.into_inner());
        match u.range(..=pa.raw()).next_back() {
            Some((&start, &pages)) if pa.raw() < start + pages * PAGE_SIZE => MemAttr::Uncached,
            _ => MemAttr::WriteBack,
        }
    }

    /// Stops the machine's clock ([`Platform::monotonic_ns`]) at its current value; from now on
    /// it moves only by [`HostPlatform::advance_clock`]. Tests of time-bounded behaviour use
    /// it so that a host that deschedules a thread for 100 ms does not make them flaky.
    pub fn freeze_clock(&self) {
        if !self.clock.frozen.load(Ordering::Acquire) {
            self.clock.manual_ns.fetch_max(self.clock.host_ns(), Ordering::AcqRel);
            self.clock.frozen.store(true, Ordering::Release);
        }
    }

    /// Keeps the calling CPU busy for `ns` nanoseconds of host time, spinning on the machine's
    /// calibrated clock (never sleeping: a driver polling a completion keeps its CPU), and
    /// returns the nanoseconds really spent (at least `ns`; more if the host preempted the
    /// thread). On a frozen clock it spins all the same and then advances the model clock by
    /// exactly `ns`, so time-bounded behaviour sees the wait. The model IOMMU's cost profiles
    /// (`iommu::CostProfile`) spend their latencies here.
    pub fn spend_ns(&self, ns: u64) -> u64 {
        if ns == 0 {
            return 0;
        }
        let start = self.clock.host_ns();
        let deadline = start.saturating_add(ns);
        let mut now = start;
        // No pause hint in the loop: under a hypervisor with pause-loop exiting, each pause
        // can cost microseconds and the wait would overshoot several times.
        while now < deadline {
            now = self.clock.host_ns();
        }
        if self.clock.frozen.load(Ordering::Acquire) {
            self.advance_clock(ns);
        }
        now - start
    }

    /// Advances a frozen clock by `ns` (saturating) and returns the new time; on a running
    /// clock it changes nothing and returns the current time.
    pub fn advance_clock(&self, ns: u64) -> u64 {
        if !self.clock.frozen.load(Ordering::Acquire) {
            return self.clock.now();
        }
        let old = self.clock.manual_ns.fetch_add(ns, Ordering::AcqRel);
        old.saturating_add(ns)
    }

    /// Binds the calling thread to CPU slot `cpu` until the binding drops.
    ///
    /// Errors: [`Error::OutOfRange`] (no such CPU), [`Error::Busy`] (another thread bound it),
    /// [`Error::BadState`] (this thread is already bound on this machine).
    pub fn bind_cpu(&self, cpu: usize) -> Result<CpuBinding<'_>> {
        self.cpus.bind(cpu)?;
        Ok(CpuBinding { cpus: &self.cpus, cpu, _not_send: std::marker::PhantomData })
    }

    /// Places a device's register window at `range`.
    ///
    /// Errors: [`Error::AlreadyMapped`] if it overlaps another window or RAM.
    pub fn add_mmio(&self, range: AddrRange<PhysAddr>, handler: Box<dyn MmioHandler>) -> Result<()> {
        if range.overlaps(&self.ram()) {
            return Err(Error::AlreadyMapped { addr: range.start().raw() });
        }
        let mut w = self.mmio.write().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = w.iter().find(|o| o.range.overlaps(&range)) {
            return Err(Error::AlreadyMapped { addr: o.range.start().raw() });
        }
        w.push(MmioWindow { range, handler });
        Ok(())
    }

    /// Offset of `[pa, pa + len)` into RAM, checked.
    #[inline]
    fn ram_offset(&self, pa: PhysAddr, len: u64) -> Result<u64> {
        let off = pa.raw().wrapping_sub(self.config.ram_base.raw());
        if pa < self.config.ram_base || len > self.config.ram_size || off > self.config.ram_size - len {
            return Err(Error::OutOfRange {
                addr: pa.raw(),
                limit: self.config.ram_base.raw() + self.config.ram_size,
            });
        }
        Ok(off)
    }

    fn mmio_access<R>(&self, pa: PhysAddr, f: impl FnOnce(&dyn MmioHandler, u64) -> R) -> Option<R> {
        let w = self.mmio.read().unwrap_or_else(|e| e.into_inner());
        let win = w.iter().find(|win| win.range.contains(pa))?;
        Some(f(win.handler.as_ref(), pa.raw() - win.range.start().raw()))
    }

    /// The window of slot `slot` of CPU `cpu` for pages of `pa`'s colour.
    fn quick_slot_ptr(&self, cpu: usize, slot: usize, pa: u64) -> *mut u8 {
        assert!(cpu < self.config.cpus && slot < QUICK_SLOTS, "quick slot ({cpu}, {slot}) out of range");
        let page = (cpu * QUICK_SLOTS + slot) as u64 * self.colours + self.colour_of_pa(pa);
        // SAFETY: (cpu, slot) is inside the window reservation, checked above, and the colour
        // is below `colours`, so the page is one of the slot's group.
        unsafe { self.quick.add((page * PAGE_SIZE) as usize) }
    }

    /// Points one window page back at an inaccessible page, so a stale use of the slot faults
    /// instead of reading whatever page was there.
    fn unmap_window(&self, win: *mut u8) {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE;
        let r = map(win, PAGE_SIZE, libc::PROT_NONE, flags, -1, 0);
        assert!(r.is_ok(), "quick_unmap: mmap(MAP_FIXED) failed");
    }

    /// The kernel colour of physical page `pa`: what every window of it has.
    fn colour_of_pa(&self, pa: u64) -> u64 {
        (pa / PAGE_SIZE) % self.colours
    }

    /// Panics unless the calling thread holds a preemption guard on `cpu`: a quick-map window
    /// belongs to its CPU, and touching it unpinned would race with that CPU's owner. A kernel
    /// would not check; the model does, so tests catch the misuse.
    fn check_quick_owner(&self, cpu: usize, slot: usize) {
        assert!(
            self.cpus.held_by_current(cpu),
            "quick map of CPU {cpu} slot {slot} by a thread without a preemption guard on that CPU"
        );
    }

    /// The quick-map windows as a kernel virtual range (for "is this a quick-map address?").
    pub fn quick_window(&self) -> AddrRange<KernVa> {
        let len = (self.config.cpus * QUICK_SLOTS) as u64 * self.colours * PAGE_SIZE;
        AddrRange::from_start_len(KernVa::new(self.quick as u64), len).unwrap_or_else(|_| unreachable!())
    }

    /// The CPU cache model, if the machine has one.
    pub fn cache(&self) -> Option<&Cache> {
        self.cache.as_ref()
    }

    /// The CPU's loads and stores, through the cache model when there is one.
    pub fn cpu(&self) -> CachedCpu<'_> {
        CachedCpu::new(self)
    }

    /// The physical address behind a kernel virtual address the CPU can use: the direct map,
    /// or a quick-map slot while it maps a page.
    pub fn cpu_translate(&self, kva: KernVa) -> Option<PhysAddr> {
        if let Some(pa) = self.kva_to_phys(kva) {
            return Some(pa);
        }
        let off = kva.offset_from(self.quick_window().start())?;
        let page = off / PAGE_SIZE;
        let held = self.quick_pa.get((page / self.colours) as usize)?.load(Ordering::Acquire);
        // Only the window of the held page's colour maps it; the group's others map nothing.
        (held != NO_PAGE && self.colour_of_pa(held) == page % self.colours)
            .then(|| PhysAddr::new(held + off % PAGE_SIZE))
    }

    /// What the platform handed the frame holding `pa` out for (see [`crate::audit`]).
    pub fn page_kind(&self, pa: PhysAddr) -> crate::audit::PageKind {
        self.kinds.get(pa)
    }

    /// Runs `f` and returns, with its result, every bus-side access (`read_phys`,
    /// `write_phys`, `fill_phys`, `bus_read`, `bus_write`) the calling thread made meanwhile:
    /// the physical bytes a device really reached, whatever translated its addresses. Page-table
    /// walks (`read_phys_u64`) are the IOMMU's own reads and are not recorded.
    pub fn watch_bus<R>(&self, f: impl FnOnce() -> R) -> (R, Vec<crate::audit::BusAccess>) {
        self.watchers.fetch_add(1, Ordering::AcqRel);
        let outer = crate::audit::start_recording();
        let r = f();
        let seen = crate::audit::stop_recording(outer);
        self.watchers.fetch_sub(1, Ordering::AcqRel);
        (r, seen)
    }

    #[inline]
    fn record(&self, pa: PhysAddr, len: u64, write: bool) {
        if self.watchers.load(Ordering::Relaxed) != 0 {
            crate::audit::record(crate::audit::BusAccess { pa, len, write });
        }
    }

    /// A device (bus-side) read of RAM at `pa`, with an explicit snoop: what a model IOMMU
    /// with a coherence index uses. Without a cache model the snoop is moot.
    ///
    /// Errors: [`Error::OutOfRange`] if any byte is outside RAM.
    pub fn bus_read(&self, pa: PhysAddr, buf: &mut [u8], snoop: Snoop) -> Result<()> {
        self.record(pa, buf.len() as u64, false);
        match &self.cache {
            Some(c) if snoop != Snoop::None => c.device_read(&RawRam(self), pa, buf, snoop),
            _ => self.raw_read(pa, buf),
        }
    }

    /// A device (bus-side) write of RAM at `pa`, with an explicit snoop.
    ///
    /// Errors: [`Error::OutOfRange`] if any byte is outside RAM.
    pub fn bus_write(&self, pa: PhysAddr, data: &[u8], snoop: Snoop) -> Result<()> {
        self.record(pa, data.len() as u64, true);
        match &self.cache {
            Some(c) if snoop != Snoop::None => c.device_write(&RawRam(self), pa, data, snoop),
            _ => self.raw_write(pa, data),
        }
    }

    /// The snoop every `read_phys`/`write_phys` makes: physical on a snooping machine, none
    /// otherwise (a coherence-index machine snoops only through its IOMMU's mappings).
    fn default_snoop(&self) -> Snoop {
        match self.cache.as_ref().map(|c| c.config().coherence) {
            Some(Coherence::Snooping) => Snoop::Physical,
            _ => Snoop::None,
        }
    }

    /// Applies a cache-maintenance operation of the platform seam to the model cache, page by
    /// page (each page of a KVA range may be a different physical page).
    fn maintain(&self, kva: KernVa, len: u64, op: fn(&Cache, &dyn Memory, u64, PhysAddr, u64) -> Result<()>) {
        let Some(cache) = &self.cache else {
            std::sync::atomic::fence(Ordering::SeqCst);
            return;
        };
        let mut done = 0;
        while done < len {
            let va = kva.raw().wrapping_add(done);
            let n = (PAGE_SIZE - va % PAGE_SIZE).min(len - done);
            match self.cpu_translate(KernVa::new(va)) {
                Some(pa) => {
                    let r = op(cache, &RawRam(self), va, pa, n);
                    debug_assert!(r.is_ok(), "cache maintenance of {va:#x}: {r:?}");
                }
                None => {
                    cache.counters().maintenance_unmapped.fetch_add(1, Ordering::Relaxed);
                }
            }
            done += n;
        }
    }

    /// Zeroes (or fills) freshly allocated pages, dropping any line a previous owner left in the
    /// cache first (as a kernel does before handing pages to DMA), so that no stale dirty line
    /// is written back over the new owner's data later.
    fn fill_fresh(&self, pa: PhysAddr, len: u64) -> Result<()> {
        if self.cache.is_none() {
            return self.fill_phys(pa, len, 0);
        }
        let zero = [0u8; PAGE_SIZE as usize];
        let mut done = 0;
        while done < len {
            let n = PAGE_SIZE.min(len - done);
            let at = pa.checked_add(done).ok_or(Error::Overflow { base: pa.raw(), len })?;
            self.bus_write(at, &zero[..n as usize], Snoop::Physical)?;
            done += n;
        }
        Ok(())
    }

    /// The machine's CPU slots (for per-CPU data of the model's devices).
    pub(crate) fn cpu_slots(&self) -> &Cpus {
        &self.cpus
    }

    pub(crate) fn raw_read(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<()> {
        let off = self.ram_offset(pa, buf.len() as u64)?;
        // SAFETY: the source bytes are inside the physical view (checked); copying bytes a
        // device may write concurrently is a plain data race on raw memory we never reference,
        // which is what DMA is; the destination is the caller's exclusive buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.phys.add(off as usize), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    pub(crate) fn raw_write(&self, pa: PhysAddr, data: &[u8]) -> Result<()> {
        let off = self.ram_offset(pa, data.len() as u64)?;
        // SAFETY: destination inside the physical view (checked), never referenced elsewhere.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.phys.add(off as usize), data.len()) };
        Ok(())
    }

    /// Reads a little-endian u64 of physical memory atomically (what a hardware walker does).
    ///
    /// Errors: [`Error::OutOfRange`], [`Error::Misaligned`].
    #[inline]
    pub fn read_phys_u64(&self, pa: PhysAddr) -> Result<u64> {
        if !pa.is_aligned(8) {
            return Err(Error::Misaligned { value: pa.raw(), align: 8 });
        }
        let off = self.ram_offset(pa, 8)?;
        // SAFETY: the word is inside the physical view (checked) and 8-aligned; RAM words are
        // only accessed atomically or by byte copies, never through references.
        let a = unsafe { AtomicU64::from_ptr(self.phys.add(off as usize).cast()) };
        Ok(a.load(Ordering::Acquire))
    }
}

impl Drop for HostPlatform {
    fn drop(&mut self) {
        let (quick, len) = self.quick_reservation;
        // SAFETY: unmapping the mappings this value created; nothing refers to them after drop
        // (frame blocks and guards borrow the platform, so they are gone).
        unsafe {
            libc::munmap(self.phys.cast(), self.config.ram_size as usize);
            if !self.direct.is_null() {
                libc::munmap(self.direct.cast(), self.config.direct_map_size as usize);
            }
            libc::munmap(quick.cast(), len as usize);
            libc::close(self.fd);
        }
    }
}

// SAFETY: table pages are fresh frames from the frame allocator (owned until freed), zeroed by
// `fill_fresh` and answered at their direct-map address; the direct map is one fixed mapping of
// the memfd for the platform's life, and `phys_to_kva`/`kva_to_phys` answer only inside it;
// `is_ram` answers from the RAM layout (`ram_offset`), the range every physical access checks;
// quick maps `MAP_FIXED` exactly the asked page into a per-(CPU, slot, colour) window of our
// own reservation; `num_cpus` is fixed at construction and the CPU set gives each
// preempt-disabled thread a CPU no other thread holds until it enables preemption again.
unsafe impl Platform for HostPlatform {
    // With a cache model, physical accesses are bus-side (what a device sees): RAM, snooped
    // only on a `Coherence::Snooping` machine. The CPU's own view is `HostPlatform::cpu()`.
    fn read_phys(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<()> {
        self.bus_read(pa, buf, self.default_snoop())
    }

    fn write_phys(&self, pa: PhysAddr, data: &[u8]) -> Result<()> {
        self.bus_write(pa, data, self.default_snoop())
    }

    fn fill_phys(&self, pa: PhysAddr, len: u64, byte: u8) -> Result<()> {
        if self.default_snoop() != Snoop::None {
            let page = [byte; PAGE_SIZE as usize];
            let mut done = 0;
            while done < len {
                let n = PAGE_SIZE.min(len - done);
                let at = pa.checked_add(done).ok_or(Error::Overflow { base: pa.raw(), len })?;
                self.bus_write(at, &page[..n as usize], Snoop::Physical)?;
                done += n;
            }
            return Ok(());
        }
        self.record(pa, len, true);
        let off = self.ram_offset(pa, len)?;
        // SAFETY: destination inside the physical view (checked).
        unsafe { std::ptr::write_bytes(self.phys.add(off as usize), byte, len as usize) };
        Ok(())
    }

    fn alloc_table_page(&self) -> Result<TablePage> {
        self.injected_failure(1)?;
        let req = FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) };
        let pa = self.frames.alloc(req)?;
        self.fill_fresh(pa, PAGE_SIZE)?;
        let kva = self.phys_to_kva(pa).ok_or(Error::NotDirectMapped { pa: pa.raw() })?;
        self.kinds.set(pa, 1, crate::audit::PageKind::Table);
        self.counters.table_pages_live.fetch_add(1, Ordering::Relaxed);
        // SAFETY: kva is the direct-map address of the frame just allocated, which stays
        // mapped for the platform's life and is ours until freed.
        Ok(unsafe { TablePage::new(pa, kva) })
    }

    unsafe fn free_table_page(&self, page: TablePage) {
        let r = self.frames.free(page.pa(), 1);
        debug_assert!(r.is_ok(), "table page free failed: {r:?}");
        self.kinds.set(page.pa(), 1, crate::audit::PageKind::Other);
        if r.is_ok() {
            self.counters.table_pages_live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn alloc_pages(&self, req: &PageRequest) -> Result<PhysAddr> {
        self.injected_failure(req.pages)?;
        let fr =
            FrameRequest { pages: req.pages, align: req.align, below: req.below, placement: req.placement };
        let pa = self.frames.alloc(fr)?;
        self.fill_fresh(pa, req.pages * PAGE_SIZE)?;
        if req.attr == MemAttr::Uncached {
            self.uncached.lock().unwrap_or_else(|e| e.into_inner()).insert(pa.raw(), req.pages);
        }
        self.kinds.set(pa, req.pages, crate::audit::PageKind::Dma);
        Ok(pa)
    }

    unsafe fn free_pages(&self, pa: PhysAddr, pages: u64) {
        self.uncached.lock().unwrap_or_else(|e| e.into_inner()).remove(&pa.raw());
        let r = self.frames.free(pa, pages);
        debug_assert!(r.is_ok(), "free_pages failed: {r:?}");
        if r.is_ok() {
            self.kinds.set(pa, pages, crate::audit::PageKind::Other);
        }
    }

    #[inline]
    fn is_ram(&self, pa: PhysAddr, len: u64) -> bool {
        self.ram_offset(pa, len.max(1)).is_ok()
    }

    #[inline]
    fn phys_to_kva(&self, pa: PhysAddr) -> Option<KernVa> {
        let off = pa.raw().checked_sub(self.config.ram_base.raw())?;
        (off < self.config.direct_map_size).then(|| KernVa::new(self.direct as u64 + off))
    }

    #[inline]
    fn kva_to_phys(&self, kva: KernVa) -> Option<PhysAddr> {
        let off = kva.raw().checked_sub(self.direct as u64)?;
        (off < self.config.direct_map_size).then(|| PhysAddr::new(self.config.ram_base.raw() + off))
    }

    fn num_cpus(&self) -> usize {
        self.cpus.len()
    }

    fn dma_limit(&self) -> u64 {
        self.dma_limit.load(Ordering::Relaxed)
    }

    #[inline]
    fn monotonic_ns(&self) -> u64 {
        self.clock.now()
    }

    #[inline]
    fn preempt_disable(&self) -> usize {
        self.cpus.preempt_disable()
    }

    #[inline]
    fn preempt_enable(&self, cpu: usize) {
        self.cpus.preempt_enable(cpu)
    }

    // Without a cache model the host's caches are coherent with the model's devices, which
    // read RAM through the same physical memory, and a fence keeps ordering honest. With one,
    // maintenance acts on the model cache through the alias `kva` (see `crate::cache`).
    fn cache_clean(&self, kva: KernVa, len: u64) {
        self.maintain(kva, len, Cache::clean);
    }

    fn cache_invalidate(&self, kva: KernVa, len: u64) {
        self.maintain(kva, len, Cache::invalidate);
    }

    fn cache_clean_invalidate(&self, kva: KernVa, len: u64) {
        self.maintain(kva, len, Cache::clean_invalidate);
    }

    unsafe fn mmio_read32(&self, pa: PhysAddr) -> u32 {
        self.mmio_access(pa, |h, off| h.read(off, 4) as u32).unwrap_or_else(|| {
            self.counters.mmio_unclaimed.fetch_add(1, Ordering::Relaxed);
            u32::MAX // a read nobody claims returns all-ones, as a PCI master abort does
        })
    }

    unsafe fn mmio_write32(&self, pa: PhysAddr, value: u32) {
        if self.mmio_access(pa, |h, off| h.write(off, 4, value.into())).is_none() {
            self.counters.mmio_unclaimed.fetch_add(1, Ordering::Relaxed);
        }
    }

    unsafe fn mmio_read64(&self, pa: PhysAddr) -> u64 {
        self.mmio_access(pa, |h, off| h.read(off, 8)).unwrap_or_else(|| {
            self.counters.mmio_unclaimed.fetch_add(1, Ordering::Relaxed);
            u64::MAX
        })
    }

    unsafe fn mmio_write64(&self, pa: PhysAddr, value: u64) {
        if self.mmio_access(pa, |h, off| h.write(off, 8, value)).is_none() {
            self.counters.mmio_unclaimed.fetch_add(1, Ordering::Relaxed);
        }
    }

    // The contract, checked: never sleeps (no lock, no allocation: one `mmap` system call on
    // a reservation we own), never fails (a refused `mmap` inside our own reservation would
    // mean the process is out of mappings, and panics), and is only called with preemption
    // disabled on `cpu` (checked below: using another CPU's window would race with its owner).
    unsafe fn quick_map(&self, cpu: usize, slot: usize, pa: PhysAddr) -> KernVa {
        self.check_quick_owner(cpu, slot);
        // A quick map never fails: a PA outside RAM is a caller bug (the contract says RAM).
        let off = match self.ram_offset(pa, PAGE_SIZE) {
            Ok(off) if pa.is_aligned(PAGE_SIZE) => off,
            _ => panic!("quick_map of {pa:?}: not a page of RAM"),
        };
        // The slot may still hold a page of another colour (a nesting `busdma::quickmap`
        // reported and is undoing): that window must not keep mapping it.
        let held = self.quick_pa[cpu * QUICK_SLOTS + slot].load(Ordering::Acquire);
        if held != NO_PAGE && self.colour_of_pa(held) != self.colour_of_pa(pa.raw()) {
            self.unmap_window(self.quick_slot_ptr(cpu, slot, held));
        }
        // The window of the page's colour (`Platform::quick_map`'s colour rule).
        let win = self.quick_slot_ptr(cpu, slot, pa.raw());
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        // A real mapping change: the memfd page at `off` replaces whatever the slot held.
        let r = map(win, PAGE_SIZE, rw, libc::MAP_SHARED | libc::MAP_FIXED, self.fd, off);
        // The reservation exists, so MAP_FIXED inside it fails only if the process runs out of
        // mappings; a kernel's quick map cannot fail, so neither may ours.
        assert!(r.is_ok(), "quick_map: mmap(MAP_FIXED) failed: {}", std::io::Error::last_os_error());
        self.quick_pa[cpu * QUICK_SLOTS + slot].store(pa.raw(), Ordering::Release);
        self.counters.quick_maps.fetch_add(1, Ordering::Relaxed);
        KernVa::new(win as u64)
    }

    unsafe fn quick_unmap(&self, cpu: usize, slot: usize) {
        self.check_quick_owner(cpu, slot);
        let held = self.quick_pa[cpu * QUICK_SLOTS + slot].swap(NO_PAGE, Ordering::AcqRel);
        if held != NO_PAGE {
            self.unmap_window(self.quick_slot_ptr(cpu, slot, held));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> MachineConfig {
        MachineConfig { ram_size: 16 << 20, direct_map_size: 8 << 20, cpus: 2, ..MachineConfig::default() }
    }

    #[test]
    fn bad_configurations_are_errors() {
        let mut c = small();
        c.ram_size = 0;
        assert_eq!(HostPlatform::new(c).err(), Some(Error::ZeroSize));
        c.ram_size = 4097;
        assert!(matches!(HostPlatform::new(c), Err(Error::Misaligned { value: 4097, .. })));
        let mut c = small();
        c.ram_base = PhysAddr::new(!0xfff);
        assert!(matches!(HostPlatform::new(c), Err(Error::Overflow { .. })));
        let mut c = small();
        c.direct_map_size = c.ram_size * 2;
        assert!(matches!(HostPlatform::new(c), Err(Error::BadSize { .. })));
        let mut c = small();
        c.cpus = 0;
        assert!(HostPlatform::new(c).is_err());
    }

    #[test]
    fn phys_access_outside_ram_is_an_error() {
        let m = HostPlatform::new(small()).unwrap();
        let end = m.ram().end();
        let mut b = [0u8; 8];
        assert!(matches!(m.read_phys(end, &mut b), Err(Error::OutOfRange { .. })));
        assert!(m.read_phys(end.checked_sub(8).unwrap(), &mut b).is_ok());
        assert!(m.read_phys(end.checked_sub(4).unwrap(), &mut b).is_err());
        assert!(m.write_phys(PhysAddr::new(0), &b).is_err());
        assert!(m.read_phys(PhysAddr::new(u64::MAX - 2), &mut b).is_err());
    }

    #[test]
    fn direct_map_refuses_pas_outside_it() {
        let m = HostPlatform::new(small()).unwrap();
        let base = m.ram().start();
        let kva = m.phys_to_kva(base).unwrap();
        assert_eq!(m.kva_to_phys(kva), Some(base));
        let last = base.checked_add((8 << 20) - 1).unwrap();
        assert!(m.phys_to_kva(last).is_some());
        assert_eq!(m.phys_to_kva(base.checked_add(8 << 20).unwrap()), None);
        assert_eq!(m.phys_to_kva(base.checked_sub(1).unwrap()), None);
        assert_eq!(m.phys_to_kva(m.ram().end()), None);
    }

    #[test]
    fn direct_map_and_physical_view_see_the_same_bytes() {
        let m = HostPlatform::new(small()).unwrap();
        let f = m
            .alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) })
            .unwrap();
        m.write_phys(f.pa(), b"hello").unwrap();
        let kva = m.phys_to_kva(f.pa()).unwrap();
        let mut got = [0u8; 5];
        // SAFETY: kva is the direct-map address of a frame we own, 5 bytes in range.
        unsafe { std::ptr::copy_nonoverlapping(kva.raw() as *const u8, got.as_mut_ptr(), 5) };
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn quick_map_reaches_memory_outside_the_direct_map() {
        let m = HostPlatform::new(small()).unwrap();
        let f = m
            .alloc_frames(FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(1) })
            .unwrap();
        assert!(m.phys_to_kva(f.pa()).is_none());
        m.write_phys(f.pa(), b"far").unwrap();
        let g = m.pin_cpu();
        // SAFETY: we hold the guard for g.cpu(), the page is RAM, slot 0 is unused.
        let kva = unsafe { m.quick_map(g.cpu(), 0, f.pa()) };
        let mut got = [0u8; 3];
        // SAFETY: the slot maps the page for 4 KiB until quick_unmap.
        unsafe { std::ptr::copy_nonoverlapping(kva.raw() as *const u8, got.as_mut_ptr(), 3) };
        // SAFETY: same guard, the slot was mapped above and is no longer used.
        unsafe { m.quick_unmap(g.cpu(), 0) };
        assert_eq!(&got, b"far");
        assert!(m.quick_window().contains(kva));
    }

    #[test]
    #[should_panic(expected = "without a preemption guard")]
    fn quick_map_without_a_cpu_guard_is_refused() {
        let m = HostPlatform::new(small()).unwrap();
        let cpu = {
            let g = m.pin_cpu();
            g.cpu()
        };
        // SAFETY: deliberately breaks the guard contract; the model must refuse before mapping.
        unsafe { m.quick_map(cpu, 0, m.ram().start()) };
    }

    #[test]
    fn quick_map_windows_of_different_cpus_are_independent() {
        let m = HostPlatform::new(small()).unwrap();
        let req = FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(2) };
        let f = m.alloc_frames(req).unwrap();
        let pages = [f.pa(), f.pa().checked_add(PAGE_SIZE).unwrap()];
        std::thread::scope(|s| {
            for (cpu, &pa) in pages.iter().enumerate() {
                let m = &m;
                s.spawn(move || {
                    let _b = m.bind_cpu(cpu).unwrap();
                    for round in 0..200u8 {
                        let g = m.pin_cpu();
                        // SAFETY: we hold the guard for our bound CPU; the page is RAM.
                        let kva = unsafe { m.quick_map(g.cpu(), 0, pa) };
                        let v = [cpu as u8 ^ round; 64];
                        // SAFETY: the window maps our page for 4 KiB until quick_unmap.
                        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), kva.raw() as *mut u8, 64) };
                        let mut back = [0u8; 64];
                        // SAFETY: as above.
                        unsafe {
                            std::ptr::copy_nonoverlapping(kva.raw() as *const u8, back.as_mut_ptr(), 64)
                        };
                        // SAFETY: same guard, slot mapped above, no further use.
                        unsafe { m.quick_unmap(g.cpu(), 0) };
                        assert_eq!(back, v, "CPU {cpu} saw another CPU's window");
                    }
                });
            }
        });
    }

    #[test]
    fn table_pages_are_zeroed_direct_mapped_and_counted() {
        let m = HostPlatform::new(small()).unwrap();
        let p = m.alloc_table_page().unwrap();
        assert!(p.entry(511).unwrap().load(Ordering::Relaxed) == 0 && p.entry(512).is_none());
        p.entry(3).unwrap().store(0xdead_b000, Ordering::Relaxed);
        assert_eq!(m.read_phys_u64(p.pa().checked_add(24).unwrap()).unwrap(), 0xdead_b000);
        assert_eq!(m.counters().table_pages_live.load(Ordering::Relaxed), 1);
        let free = m.frames().free_frames();
        // SAFETY: allocated above, freed once, no walker uses it.
        unsafe { m.free_table_page(p) };
        assert_eq!(m.frames().free_frames(), free + 1);
    }

    #[test]
    fn dma_pages_honour_limit_placement_and_attribute() {
        let m = HostPlatform::new(small()).unwrap();
        let below = m.ram().start().checked_add(1 << 20).unwrap();
        let req = PageRequest { below: Some(below), attr: MemAttr::Uncached, ..PageRequest::pages(3) };
        let pa = m.alloc_pages(&req).unwrap();
        assert!(pa.raw() + 3 * PAGE_SIZE <= below.raw());
        assert_eq!(m.mem_attr(pa.checked_add(2 * PAGE_SIZE).unwrap()), MemAttr::Uncached);
        assert_eq!(m.mem_attr(pa.checked_add(3 * PAGE_SIZE).unwrap()), MemAttr::WriteBack);
        let far = PageRequest { placement: Placement::NotDirectMapped, ..PageRequest::pages(1) };
        let q = m.alloc_pages(&far).unwrap();
        assert!(m.phys_to_kva(q).is_none());
        let free = m.frames().free_frames();
        // SAFETY: both runs were allocated above, are freed once, and no device reaches them.
        unsafe {
            m.free_pages(pa, 3);
            m.free_pages(q, 1);
        }
        assert_eq!(m.frames().free_frames(), free + 4);
        assert_eq!(m.mem_attr(pa), MemAttr::WriteBack);
    }

    #[test]
    fn frame_blocks_return_their_frames_on_drop() {
        let m = HostPlatform::new(small()).unwrap();
        let before = m.frames().free_frames();
        {
            let _a = m.alloc_frames(FrameRequest::pages(7)).unwrap();
            assert_eq!(m.frames().free_frames(), before - 7);
        }
        assert_eq!(m.frames().free_frames(), before);
    }

    #[test]
    fn preemption_guards_exclude_other_threads_from_a_cpu() {
        let mut c = small();
        c.cpus = 1;
        let m = HostPlatform::new(c).unwrap();
        let counter = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..2000 {
                        let _g = m.pin_cpu();
                        // A non-atomic read-modify-write: lost updates would show if two
                        // threads were inside a guard of the one CPU at once.
                        let v = counter.load(Ordering::Relaxed);
                        std::hint::spin_loop();
                        counter.store(v + 1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(counter.load(Ordering::Relaxed), 8000);
    }

    #[test]
    fn the_clock_is_monotonic_and_a_frozen_clock_moves_only_when_advanced() {
        let m = HostPlatform::new(small()).unwrap();
        let a = m.monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = m.monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} -> {b}");
        m.freeze_clock();
        let c = m.monotonic_ns();
        assert!(c >= b);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(m.monotonic_ns(), c);
        assert_eq!(m.advance_clock(500), c + 500);
        assert_eq!(m.monotonic_ns(), c + 500);
    }

    #[test]
    fn binding_is_exclusive_and_released_on_drop() {
        let m = HostPlatform::new(small()).unwrap();
        let b = m.bind_cpu(1).unwrap();
        assert_eq!(m.pin_cpu().cpu(), 1);
        std::thread::scope(|s| {
            s.spawn(|| assert!(matches!(m.bind_cpu(1), Err(Error::Busy { .. }))));
        });
        drop(b);
        std::thread::scope(|s| {
            s.spawn(|| assert!(m.bind_cpu(1).is_ok()));
        });
        assert!(matches!(m.bind_cpu(2), Err(Error::OutOfRange { .. })));
    }
}
