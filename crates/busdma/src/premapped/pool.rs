//! The pre-mapped pool and the [`Premapped`] strategy.
//!
//! See the theory statement in [`crate::premapped`] (sections 2 to 6, 8 and 9).

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::addr::{AddrRange, Iova, KernVa, PAGE_SIZE, PhysAddr};
use crate::dir::{Direction, SyncOp};
use crate::error::{Error, Result};
use crate::front::load::{MemKind, Run};
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::{TagFlags, TagSpec};
use crate::front::strategy::iommu::{iova_limit, max_runs, prot_of};
use crate::front::strategy::{Invalidation, IommuOps, Strategy};
use crate::platform::{CpuGuard, MemAttr, PageRequest, Placement, Platform};
use crate::quickmap::{CacheMaint, QuickMaps, maintain_phys};
use crate::sync::SpinLock;

/// The shape of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Bytes of one slot, rounded up to pages: the largest load the pool copies. Loads of
    /// this size are spread over a slot's lines when it is smaller than the slot (theory 8).
    pub slot_size: u64,
    /// Slots on each CPU's free list at creation (a transmit ring's depth, say).
    pub slots_per_cpu: usize,
    /// Direct-map placement of the slots' pages (`NotDirectMapped` makes every copy go
    /// through quick maps).
    pub placement: Placement,
}

impl PoolConfig {
    /// `slots_per_cpu` slots of `slot_size` bytes per CPU, anywhere in RAM.
    pub const fn new(slot_size: u64, slots_per_cpu: usize) -> Self {
        Self { slot_size, slots_per_cpu, placement: Placement::Any }
    }
}

/// Counters of a pool (a snapshot, [`PremappedPool::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Slots in the pool.
    pub slots: u64,
    /// Slots free now.
    pub free_slots: u64,
    /// Bytes of one slot.
    pub slot_bytes: u64,
    /// Map requests the pool made: one per slot, at creation; never per I/O.
    pub map_requests: u64,
    /// Loads served from the pool.
    pub loads: u64,
    /// Bytes copied between clients and slots (both directions).
    pub bytes_copied: u64,
    /// Loads refused because no slot was free.
    pub exhausted: u64,
    /// Slots taken from another CPU's free list.
    pub steals: u64,
}

impl fmt::Display for PoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} slots of {} bytes ({} free), {} map requests, {} loads, {} bytes copied, {} exhausted, {} steals",
            self.slots,
            self.slot_bytes,
            self.free_slots,
            self.map_requests,
            self.loads,
            self.bytes_copied,
            self.exhausted,
            self.steals
        )
    }
}

/// A device's pre-mapped pool (theory 2 and 3).
///
/// # Invariants
///
/// Every slot `i` is `slot_pages` pages at `slots[i]`, owned by the pool, mapped at
/// `window.start + i × slot bytes` in `dom` from creation until drop; each slot index is on at
/// most one free list, held by at most one loaded map, or owned by one [`super::PoolBuf`].
pub struct PremappedPool<'p, P: Platform, D: IommuOps<P>> {
    p: &'p P,
    dom: D,
    qm: &'p QuickMaps,
    slot_bytes: u64,
    window: AddrRange<Iova>,
    slots: Vec<PhysAddr>,
    /// Per slot: its kernel address if the direct map covers all of it (copies then need no
    /// quick map), and its colour (theory 8).
    meta: Vec<SlotMeta>,
    /// Per CPU: free slots and counters.
    free: Vec<PerCpu>,
    exhausted: AtomicU64,
    steals: AtomicU64,
    /// Set if an unmap of the pool's pages elsewhere in the domain (the hybrid's calibration)
    /// could not be waited for: the drop leaks the pages.
    leak: AtomicBool,
}

impl<'p, P: Platform, D: IommuOps<P>> PremappedPool<'p, P, D> {
    /// Allocates the pool's pages and maps them in `dom` (theory 2): `config.slots_per_cpu`
    /// slots for each of the platform's CPUs.
    ///
    /// Errors: [`Error::ZeroSize`] (no slot or an empty slot), [`Error::NoMemory`] (pages),
    /// the domain's IOVA or map errors; whatever was mapped is unmapped and freed again.
    pub fn new(p: &'p P, dom: D, qm: &'p QuickMaps, config: PoolConfig) -> Result<Self> {
        let slot_pages = config.slot_size.div_ceil(PAGE_SIZE);
        let cpus = p.num_cpus();
        let n = config.slots_per_cpu.checked_mul(cpus).ok_or(Error::ZeroSize)?;
        if slot_pages == 0 || n == 0 || n > u32::MAX as usize {
            return Err(Error::ZeroSize);
        }
        let slot_bytes = slot_pages * PAGE_SIZE;
        let total =
            slot_bytes.checked_mul(n as u64).ok_or(Error::Overflow { base: slot_bytes, len: n as u64 })?;
        let g = p.pin_cpu();
        let window = dom.alloc_iova(&g, total, PAGE_SIZE, dom.max_iova())?;
        drop(g);
        let mut pool = Self {
            p,
            dom,
            qm,
            slot_bytes,
            window,
            slots: Vec::new(),
            meta: Vec::new(),
            free: Vec::new(),
            exhausted: AtomicU64::new(0),
            steals: AtomicU64::new(0),
            leak: AtomicBool::new(false),
        };
        // From here on `Drop` unmaps the slots mapped so far and frees their pages.
        pool.slots.try_reserve_exact(n).map_err(|_| Error::NoMemory { requested: (n * 8) as u64 })?;
        pool.meta
            .try_reserve_exact(n)
            .map_err(|_| Error::NoMemory { requested: (n * size_of::<SlotMeta>()) as u64 })?;
        let prot = prot_of(MemKind::Page, Direction::Bidirectional, TagFlags::default());
        for i in 0..n {
            let req = PageRequest {
                pages: slot_pages,
                align: PAGE_SIZE,
                below: None,
                placement: config.placement,
                attr: MemAttr::WriteBack,
            };
            let pa = p.alloc_pages(&req)?;
            let iova = Iova::new(window.start().raw() + i as u64 * slot_bytes);
            let g = p.pin_cpu();
            // SAFETY: `iova` lies in the window the pool allocated and holds, each slot's
            // range once; the pages are the pool's own (just allocated), freed only after the
            // unmap at drop has been invalidated (theory 3).
            if let Err(e) = unsafe { pool.dom.map(&g, iova, pa, slot_bytes, prot) } {
                drop(g);
                // SAFETY: allocated just above, never mapped (the failed map undid itself).
                unsafe { p.free_pages(pa, slot_pages) };
                return Err(e);
            }
            pool.slots.push(pa);
            let colour = colour(i as u64, config.slot_size, slot_bytes);
            // Slot `i`'s home list: the CPU it is created for (`n` is at most `u32::MAX`).
            let home = (i / config.slots_per_cpu).min(cpus - 1) as u32;
            pool.meta.push(SlotMeta { kva: direct_span(p, pa, slot_bytes), colour, home });
        }
        let per = config.slots_per_cpu;
        for c in 0..cpus {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| Error::NoMemory { requested: (n * 4) as u64 })?;
            v.extend((c * per..(c + 1) * per).rev().map(|i| i as u32));
            pool.free.push(PerCpu {
                list: SpinLock::new(v),
                loads: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                sync_bytes: AtomicU64::new(0),
            });
        }
        Ok(pool)
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            slots: self.slots.len() as u64,
            free_slots: self.free.iter().map(|f| f.list.lock().len() as u64).sum(),
            slot_bytes: self.slot_bytes,
            map_requests: self.slots.len() as u64,
            loads: self.free.iter().map(|f| f.loads.load(Ordering::Relaxed)).sum(),
            bytes_copied: self
                .free
                .iter()
                .map(|f| f.bytes.load(Ordering::Relaxed).wrapping_add(f.sync_bytes.load(Ordering::Relaxed)))
                .sum(),
            exhausted: self.exhausted.load(Ordering::Relaxed),
            steals: self.steals.load(Ordering::Relaxed),
        }
    }

    /// Bytes of one slot: the largest load the pool copies.
    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// The IOVA window every slot lies in: all the device can reach through the pool.
    pub fn window(&self) -> AddrRange<Iova> {
        self.window
    }

    /// The domain the pool is mapped in.
    pub fn domain(&self) -> &D {
        &self.dom
    }

    pub(crate) fn platform(&self) -> &'p P {
        self.p
    }

    /// Slot `i`'s bus address (its IOVA in the pool's domain).
    pub(super) fn slot_iova(&self, i: u32) -> u64 {
        self.window.start().raw() + u64::from(i) * self.slot_bytes
    }

    /// Where in slot `i` a load of `len` bytes (at most a slot) starts (theory 8): the slot's
    /// colour, lowered to the load's slack and to the tag's alignment in steps of
    /// [`COLOUR_STEP`]; 0 if that would put a boundary of the tag inside the load. No division:
    /// the colour was computed at creation.
    #[inline]
    pub(crate) fn place(&self, i: u32, len: u64, spec: &TagSpec) -> u64 {
        let slack = self.slot_bytes.saturating_sub(len);
        let mut at = self.meta[i as usize].colour.min(slack) & !(COLOUR_STEP - 1);
        if spec.alignment > COLOUR_STEP {
            // A power of two (the tag checks it).
            at &= !(spec.alignment - 1);
        }
        if at != 0 && spec.boundary != 0 && len != 0 {
            // A power of two (the tag checks it): the first and last byte in one window.
            let a = self.slot_iova(i) + at;
            if (a ^ (a + len - 1)) & !(spec.boundary - 1) != 0 {
                return 0;
            }
        }
        at
    }

    /// Whether a tag with `spec` can be given slots: the window lies within its reach and a
    /// slot starts on its alignment. (`max_size` is checked by [`Premapped`] only: the hybrid
    /// maps what does not fit.)
    pub(crate) fn check_reach(&self, spec: &TagSpec) -> Result<()> {
        let last = self.window.end().raw() - 1;
        let limit = iova_limit(&self.dom, spec);
        if last > limit {
            return Err(Error::OutOfRange { addr: last, limit });
        }
        if spec.alignment > PAGE_SIZE
            && (self.slot_bytes % spec.alignment != 0 || !self.window.start().is_aligned(spec.alignment))
        {
            return Err(Error::BadAlignment { align: spec.alignment });
        }
        Ok(())
    }

    /// The free list of CPU `cpu`: its own (every CPU of the platform has one), without a
    /// division on the load path; the remainder only guards a CPU number beyond the platform's.
    #[inline]
    fn list_of(&self, cpu: usize) -> usize {
        if cpu < self.free.len() { cpu } else { cpu % self.free.len() }
    }

    /// Takes a free slot, the calling CPU's first (`count`: in the steal and exhaustion
    /// counters; not for the calibration's own takes). Inlined into the copy load's path
    /// (a second caller, [`PremappedPool::alloc_buf`], made it a call: +19 instructions a
    /// packet, `examples/icount.rs tcp-premapped-sized`).
    #[inline(always)]
    pub(crate) fn take(&self, g: &CpuGuard<'_, P>, count: bool) -> Option<u32> {
        let cpu = self.list_of(g.cpu());
        if let Some(i) = self.free[cpu].list.lock().pop() {
            return Some(i);
        }
        for k in 1..self.free.len() {
            if let Some(i) = self.free[(cpu + k) % self.free.len()].list.lock().pop() {
                if count {
                    self.steals.fetch_add(1, Ordering::Relaxed);
                }
                return Some(i);
            }
        }
        if count {
            self.exhausted.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// Makes the drop leak the pages (an unmap of them elsewhere failed its invalidation).
    pub(crate) fn leak_on_drop(&self) {
        self.leak.store(true, Ordering::Release);
    }

    /// Gives slot `i` back to its home list (the CPU it was created for): no pin needed, the
    /// list's lock is all that guards it, and a slot stolen by another CPU goes home.
    pub(crate) fn give(&self, i: u32) {
        let home = self.meta[i as usize].home as usize;
        // The list was reserved for every slot: the push never allocates.
        self.free[home].list.lock().push(i);
    }

    /// Copies between the client runs and slot `i`, whose byte `at` holds buffer byte 0 (the
    /// load's colour), for buffer bytes `range` (`to_slot`: client → slot). Returns the bytes
    /// copied (the caller counts them).
    ///
    /// The packet path's case first: the whole load, a direct-mapped slot and every run
    /// reachable without a quick map: one memcpy per run, no offsets to clip. Anything else
    /// (a part of the load, a run needing a quick map) takes the general loop, from the start.
    pub(crate) fn copy(
        &self,
        i: u32,
        at: u64,
        runs: &[Run],
        range: Range<u64>,
        to_slot: bool,
    ) -> Result<u64> {
        if let (0, Some(k)) = (range.start, self.meta[i as usize].kva) {
            let mut off = 0u64;
            for r in runs {
                if off + r.len > range.end {
                    break;
                }
                let c = match r.kind {
                    MemKind::Page => direct_span(self.p, r.pa, r.len),
                    MemKind::Mapped { kva } => Some(kva),
                    _ => None,
                };
                let Some(c) = c else { break };
                let k = k.raw() + at + off;
                let (src, dst) = if to_slot { (c.raw(), k) } else { (k, c.raw()) };
                // SAFETY: as in `copy_general`: `k` maps bytes `[at + off, at + off + r.len)`
                // of slot `i` (within `range`, within the load, which lies in the slot at
                // `at`), all in the direct map;
                // `c` maps the run's bytes (direct map checked page by page, or the `Mapped`
                // run's own mapping); different memory, neither referenced by `&`/`&mut`.
                unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, r.len as usize) };
                off += r.len;
            }
            if off == range.end {
                return Ok(off);
            }
        }
        self.copy_general(i, at, runs, range, to_slot)
    }

    fn copy_general(&self, i: u32, at: u64, runs: &[Run], range: Range<u64>, to_slot: bool) -> Result<u64> {
        let base = self.slots[i as usize].raw() + at;
        let slot_kva = self.meta[i as usize].kva;
        let mut off = 0u64;
        let mut copied = 0u64;
        for r in runs {
            let (s, e) = (off.max(range.start), (off + r.len).min(range.end));
            if s < e {
                let (client_off, n) = (s - off, e - s);
                let slot = PhysAddr::new(base + s);
                // Both sides in the direct map: one copy, no quick map (theory 4).
                let client_kva = match r.kind {
                    MemKind::Page => direct_span(self.p, PhysAddr::new(r.pa.raw() + client_off), n),
                    MemKind::Mapped { kva } => Some(KernVa::new(kva.raw() + client_off)),
                    _ => None,
                };
                if let (Some(c), Some(k)) = (client_kva, slot_kva) {
                    let k = k.raw() + at + s;
                    let (src, dst) = if to_slot { (c.raw(), k) } else { (k, c.raw()) };
                    // SAFETY: `k` maps bytes `[at + s, at + s + n)` of slot `i` (the load lies
                    // in the slot at `at`), the pool's own RAM, all
                    // in the direct map (checked page by page at creation); `c` maps the
                    // client's `n` bytes: a `Page` run through the direct map (checked page by
                    // page just above; the run is the load's RAM, the load source's contract),
                    // a `Mapped` run through its own mapping (the load source's contract,
                    // `front::load` theory 2). Slot and client are different memory; neither
                    // is referenced by `&`/`&mut` (device-visible memory is reached by copy).
                    unsafe { core::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, n as usize) };
                    copied += n;
                    off += r.len;
                    if off >= range.end {
                        break;
                    }
                    continue;
                }
                let g = self.p.pin_cpu();
                match r.kind {
                    MemKind::Page => {
                        let c = PhysAddr::new(r.pa.raw() + client_off);
                        if to_slot {
                            self.qm.copy_phys_to_phys(&g, c, slot, n)?;
                        } else {
                            self.qm.copy_phys_to_phys(&g, slot, c, n)?;
                        }
                    }
                    MemKind::Mapped { kva } => {
                        let c = crate::addr::KernVa::new(kva.raw() + client_off);
                        if to_slot {
                            // SAFETY: a `Mapped` run's `kva` maps the run while it is loaded,
                            // not referenced during syncs (the load source's contract,
                            // `front::load` theory 2); `slot` is the pool's RAM.
                            unsafe { self.qm.copy_kva_to_phys(&g, c, slot, n)? };
                        } else {
                            // SAFETY: as above; the client's mapping is writable (a load of
                            // memory the device may write is a writable mapping).
                            unsafe { self.qm.copy_phys_to_kva(&g, slot, c, n)? };
                        }
                    }
                    _ => return Err(uncopyable()),
                }
                copied += n;
            }
            off += r.len;
            if off >= range.end {
                break;
            }
        }
        Ok(copied)
    }

    /// Zeroes slot `i`'s bytes `range`.
    pub(crate) fn zero(&self, i: u32, range: Range<u64>) -> Result<()> {
        if range.start >= range.end {
            return Ok(());
        }
        if let Some(k) = self.meta[i as usize].kva {
            debug_assert!(range.end <= self.slot_bytes);
            // SAFETY: `k` maps all of slot `i` through the direct map (checked page by page at
            // creation), the pool's own RAM, and `range` lies in the slot (callers pass ranges
            // within `slot_bytes`); nothing holds a reference to it (reached by copy only).
            unsafe {
                core::ptr::write_bytes(
                    (k.raw() + range.start) as *mut u8,
                    0,
                    (range.end - range.start) as usize,
                )
            };
            return Ok(());
        }
        let g = self.p.pin_cpu();
        self.qm.fill_phys(
            &g,
            PhysAddr::new(self.slots[i as usize].raw() + range.start),
            range.end - range.start,
            0,
        )
    }

    /// Cache maintenance of slot `i`'s bytes `range` (non-coherent tags).
    pub(crate) fn maintain(&self, i: u32, range: Range<u64>, op: CacheMaint) -> Result<()> {
        if range.start >= range.end {
            return Ok(());
        }
        let g = self.p.pin_cpu();
        maintain_phys(
            &g,
            PhysAddr::new(self.slots[i as usize].raw() + range.start),
            range.end - range.start,
            op,
        )
        .map(|_| ())
    }

    /// Slot `i`'s first physical byte.
    pub(super) fn slot_phys(&self, i: u32) -> PhysAddr {
        self.slots[i as usize]
    }

    /// Slot `i`'s direct-map address, if the direct map covers all of it.
    pub(super) fn slot_kva(&self, i: u32) -> Option<KernVa> {
        self.meta[i as usize].kva
    }

    /// Where in slot `i` a buffer of `len` bytes (at most a slot) starts when no tag is
    /// known yet (theory 9): the slot's colour lowered to the slack, in [`COLOUR_STEP`]s.
    pub(super) fn place_any(&self, i: u32, len: u64) -> u64 {
        let slack = self.slot_bytes.saturating_sub(len);
        self.meta[i as usize].colour.min(slack) & !(COLOUR_STEP - 1)
    }

    /// The physical address of slot `i` (tests and diagnostics).
    pub fn slot_pa(&self, i: usize) -> Option<PhysAddr> {
        self.slots.get(i).copied()
    }
}

impl<P: Platform, D: IommuOps<P>> Drop for PremappedPool<'_, P, D> {
    fn drop(&mut self) {
        let mapped = self.slots.len() as u64 * self.slot_bytes;
        let g = self.p.pin_cpu();
        let flushed = if mapped == 0 {
            // SAFETY: the pool's window, nothing mapped in it.
            unsafe { self.dom.free_iova(&g, self.window) };
            true
        } else {
            let range = AddrRange::new(self.window.start(), Iova::new(self.window.start().raw() + mapped));
            match range {
                Ok(range) => {
                    // SAFETY: the pool mapped `range` and holds its window; both are given up.
                    match unsafe { self.dom.unmap(&g, &[range], &[self.window]) } {
                        Ok(t) => self.dom.ensure_flushed(&g, t).is_ok(),
                        Err(_) => false,
                    }
                }
                Err(_) => false,
            }
        };
        drop(g);
        if !flushed || self.leak.load(Ordering::Acquire) {
            // The device may still reach the pages: leak them (theory 3).
            return;
        }
        let pages = self.slot_bytes / PAGE_SIZE;
        for &pa in &self.slots {
            // SAFETY: the pool's own pages, whose mappings' invalidation has completed.
            unsafe { self.p.free_pages(pa, pages) };
        }
    }
}

/// The direct-map address of `[pa, pa + n)` if the direct map covers all of it contiguously
/// (asked page by page: the platform's answers are trusted, its layout is not assumed).
fn direct_span<P: Platform>(p: &P, pa: PhysAddr, n: u64) -> Option<KernVa> {
    let k0 = p.phys_to_kva(pa)?;
    let end = pa.raw().checked_add(n)?;
    let mut page = pa.page_base().raw().checked_add(PAGE_SIZE)?;
    while page < end {
        if p.phys_to_kva(PhysAddr::new(page))?.raw() != k0.raw() + (page - pa.raw()) {
            return None;
        }
        page += PAGE_SIZE;
    }
    Some(k0)
}

/// Granule of a load's place in its slot (theory 8): 128 bytes, a cache line on every CPU
/// busdma targets or two (64-byte lines on x86-64 and most Arm cores, 128 on some), so a
/// load starts on a line as at slot byte 0 and cache maintenance of it touches no other
/// load's line.
const COLOUR_STEP: u64 = 128;

/// What a load needs of its slot besides the slot's address.
#[derive(Clone, Copy, Debug)]
struct SlotMeta {
    /// The slot's kernel address if the direct map covers all of it.
    kva: Option<KernVa>,
    /// Where a load of the pool's configured size starts in the slot (theory 8).
    colour: u64,
    /// The free list the slot goes back to: the CPU it was created for.
    home: u32,
}

/// Slot `i`'s colour for loads of `len` bytes in slots of `slot_bytes` (theory 8): position
/// `i mod k` of the `k = ⌈slot_bytes / len⌉` positions spread evenly over the slack
/// `slot_bytes − len`, rounded down to [`COLOUR_STEP`]; 0 without slack.
fn colour(i: u64, len: u64, slot_bytes: u64) -> u64 {
    let slack = slot_bytes.saturating_sub(len);
    if slack == 0 || len == 0 {
        return 0;
    }
    // At least 2 (`len < slot_bytes`); `slack / (k − 1) × j ≤ slack` for `j < k`.
    let k = slot_bytes.div_ceil(len);
    (slack / (k - 1) * (i % k)) & !(COLOUR_STEP - 1)
}

/// One CPU's free slots and counters, on cache lines of their own.
#[repr(align(128))]
struct PerCpu {
    list: SpinLock<Vec<u32>>,
    /// Loads served and bytes copied at load on this CPU: written only by the thread holding
    /// the CPU's preemption guard ([`bump`]), read by anyone.
    loads: AtomicU64,
    bytes: AtomicU64,
    /// Bytes copied by syncs of this list's slots, from any CPU: atomic adds only.
    sync_bytes: AtomicU64,
}

/// Adds `n` to a per-CPU counter: a load and a store, no locked add. Only the holder of the
/// CPU's guard writes it (the platform's guard excludes every other thread from the CPU), so
/// no update is lost.
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

pub(crate) fn uncopyable() -> Error {
    Error::Unsupported { what: "pre-mapped pool: memory with no page and no kernel mapping cannot be copied" }
}

/// The pre-mapped pool strategy: every load copied into a slot of `pool` (theory 2 to 6).
pub struct Premapped<'a, 'p, P: Platform, D: IommuOps<P>>(pub &'a PremappedPool<'p, P, D>);

impl<P: Platform, D: IommuOps<P>> Clone for Premapped<'_, '_, P, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P: Platform, D: IommuOps<P>> Copy for Premapped<'_, '_, P, D> {}

/// Per-map state of [`Premapped`]: the slot of the current load, where in it the load
/// starts, and its runs.
#[derive(Debug)]
pub struct PremappedState {
    slot: Option<u32>,
    /// The slot is a pool buffer's ([`super::PoolBuf`], theory 9), loaded in place: its
    /// owner keeps it at unload (no give-back, no scrub) and syncs copy nothing.
    owned: bool,
    /// Slot byte of buffer byte 0 (theory 8).
    at: u64,
    len: u64,
    dir: Direction,
    untrusted: bool,
    runs: Vec<Run>,
}

impl PremappedState {
    pub(crate) fn new(spec: &TagSpec) -> Result<Self> {
        let n = max_runs(spec);
        let mut runs = Vec::new();
        runs.try_reserve_exact(n)
            .map_err(|_| Error::NoMemory { requested: (n * size_of::<Run>()) as u64 })?;
        Ok(Self { slot: None, owned: false, at: 0, len: 0, dir: Direction::ToDevice, untrusted: false, runs })
    }

    /// The slot of the current load, if loaded.
    pub fn slot(&self) -> Option<u32> {
        self.slot
    }

    pub(crate) fn is_loaded(&self) -> bool {
        self.slot.is_some()
    }
}

impl<'p, P: Platform, D: IommuOps<P>> PremappedPool<'p, P, D> {
    /// Loads `runs` into a slot (theory 2, 5, 6). On error `st` is unloaded and holds nothing.
    /// `count`: in the counters (not for the hybrid's calibration).
    pub(crate) fn load_into(
        &self,
        spec: &TagSpec,
        st: &mut PremappedState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
        count: bool,
    ) -> Result<()> {
        let mut len = 0u64;
        for r in runs {
            if !r.kind.bounceable() {
                return Err(uncopyable());
            }
            len = len.checked_add(r.len).ok_or(Error::Overflow { base: len, len: r.len })?;
        }
        if len > self.slot_bytes {
            return Err(Error::LimitExceeded {
                what: "bytes per pre-mapped slot",
                requested: len,
                limit: self.slot_bytes,
            });
        }
        if runs.len() > st.runs.capacity() {
            return Err(Error::LimitExceeded {
                what: "runs per pre-mapped load",
                requested: runs.len() as u64,
                limit: st.runs.capacity() as u64,
            });
        }
        // One pin for the slot and the load's counters (a second pin and unpin cost 50
        // instructions of a 1730-instruction packet, `examples/icount.rs tcp-premapped`); an
        // untrusted load's zeroing and copy run pinned too (bounded by the slot's size).
        let g = self.p.pin_cpu();
        let Some(i) = self.take(&g, count) else {
            return Err(Error::Exhausted { size: self.slot_bytes, limit: self.window.end().raw() });
        };
        let at = self.place(i, len, spec);
        let r = segs.push(self.slot_iova(i) + at, len).and_then(|_| segs.check()).and_then(|_| {
            if spec.flags.untrusted {
                // Theory 5: zeros around the buffer, the client's bytes in it whatever the
                // direction.
                self.zero(i, 0..at)?;
                self.zero(i, at + len..self.slot_bytes)?;
                return self.copy(i, at, runs, 0..len, true);
            }
            Ok(0)
        });
        let copied = match r {
            Ok(n) => n,
            Err(e) => {
                self.give(i);
                return Err(e);
            }
        };
        st.runs.clear();
        st.runs.extend_from_slice(runs);
        (st.slot, st.at, st.len, st.dir, st.untrusted) = (Some(i), at, len, dir, spec.flags.untrusted);
        if count {
            let c = &self.free[self.list_of(g.cpu())];
            bump(&c.loads, 1);
            bump(&c.bytes, copied);
        }
        Ok(())
    }

    /// Loads slot `i`, held by a pool buffer whose bytes `[at, at + len)` are the load, in
    /// place (theory 9): one segment at the slot's bus address, no copy, no map request.
    /// The caller checked that the buffer is this pool's and keeps it until the unload.
    pub(crate) fn load_owned(
        &self,
        st: &mut PremappedState,
        i: u32,
        at: u64,
        len: u64,
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        if st.slot.is_some() {
            return Err(Error::BadState { what: "pool buffer load into a map whose slot is taken" });
        }
        segs.push(self.slot_iova(i) + at, len)?;
        segs.check()?;
        st.runs.clear();
        (st.slot, st.owned, st.at, st.len, st.dir, st.untrusted) = (Some(i), true, at, len, dir, false);
        Ok(())
    }

    /// Unloads `st`'s slot (untrusted: scrubbed first).
    pub(crate) fn unload_from(&self, st: &mut PremappedState) -> Result<()> {
        let Some(i) = st.slot.take() else { return Ok(()) };
        if st.owned {
            // A pool buffer's slot (theory 9): its owner gives it back, its bytes are its own.
            st.owned = false;
            return Ok(());
        }
        let r = if st.untrusted { self.zero(i, st.at..st.at + st.len) } else { Ok(()) };
        // No pin: the slot goes to its home list, under that list's lock.
        self.give(i);
        st.runs.clear();
        r
    }

    /// The strategy's sync of buffer bytes `range` (theory 4); `count`: as for `load_into`.
    pub(crate) fn sync_of(
        &self,
        spec: &TagSpec,
        st: &PremappedState,
        op: SyncOp,
        range: Range<u64>,
        count: bool,
    ) -> Result<()> {
        let Some(i) = st.slot else { return Ok(()) };
        if st.owned {
            // The load's runs are the slot itself: the front end's cache maintenance of them
            // is all a sync needs (theory 9).
            return Ok(());
        }
        let maintain = !spec.flags.coherent;
        // The slot's bytes of buffer bytes `range`.
        let in_slot = st.at + range.start..st.at + range.end;
        let pre_write = op.contains(SyncOp::PREWRITE) && st.dir.device_reads();
        let pre_read = op.contains(SyncOp::PREREAD) && st.untrusted;
        let mut copied = 0;
        if pre_write || pre_read {
            copied += self.copy(i, st.at, &st.runs, range.clone(), true)?;
            if maintain {
                self.maintain(i, in_slot.clone(), CacheMaint::CleanInvalidate)?;
            }
        } else if maintain && op.contains(SyncOp::PREREAD) {
            self.maintain(i, in_slot.clone(), CacheMaint::CleanInvalidate)?;
        }
        if op.contains(SyncOp::POSTREAD) && st.dir.device_writes() {
            if maintain {
                self.maintain(i, in_slot, CacheMaint::Invalidate)?;
            }
            copied += self.copy(i, st.at, &st.runs, range, false)?;
        }
        if count && copied > 0 {
            // No pin: an atomic add to the slot's home counter of sync copies (written by
            // any CPU, so never by `bump`'s unlocked load and store).
            let home = self.meta[i as usize].home as usize;
            self.free[home].sync_bytes.fetch_add(copied, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl<'p, P: Platform, D: IommuOps<P>> Strategy<P> for Premapped<'_, 'p, P, D> {
    const NAME: &'static str = "premapped";
    type MapState = PremappedState;

    /// Nothing is invalidated per I/O (the pool's mappings live as long as it does).
    fn invalidation(&self) -> Invalidation {
        Invalidation::None
    }

    fn unload_revokes(&self) -> bool {
        // The device reaches the pool's slots, never the loaded memory (theory 3).
        true
    }

    fn check_tag(&self, _p: &P, spec: &TagSpec) -> Result<()> {
        if spec.max_size > self.0.slot_bytes {
            return Err(Error::LimitExceeded {
                what: "tag max_size above the pre-mapped slot size",
                requested: spec.max_size,
                limit: self.0.slot_bytes,
            });
        }
        self.0.check_reach(spec)
    }

    fn create(&self, _p: &P, spec: &TagSpec) -> Result<PremappedState> {
        PremappedState::new(spec)
    }

    fn load(
        &self,
        _p: &P,
        spec: &TagSpec,
        st: &mut PremappedState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        self.0.load_into(spec, st, runs, dir, segs, true)
    }

    fn unload(&self, _p: &P, st: &mut PremappedState, _runs: &[Run], _segs: &[Segment]) -> Result<()> {
        self.0.unload_from(st)
    }

    fn destroy(&self, _p: &P, mut st: PremappedState) {
        let _ = self.0.unload_from(&mut st);
    }

    /// Client memory is never mapped: nothing to wait for.
    fn wait_unmapped(&self, _p: &P) -> Result<()> {
        Ok(())
    }

    fn sync(&self, _p: &P, spec: &TagSpec, st: &PremappedState, op: SyncOp, range: Range<u64>) -> Result<()> {
        self.0.sync_of(spec, st, op, range, true)
    }
}
