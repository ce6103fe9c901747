//! Quick maps: short-lived per-CPU kernel mappings of single physical pages (seed 000).
//!
//! # Theory
//!
//! 1. **The problem.** Bounce copies and cache maintenance must touch pages that may have no
//!    permanent kernel mapping (RAM above the direct map, user pages). A facility that can
//!    sleep to find a mapping would make `sync` unusable where drivers call it (interrupt
//!    threads, under locks, with preemption disabled). A quick map is the answer of seed 000:
//!    a mapping that **never sleeps and never fails** on RAM. **Only RAM:**
//!    [`Platform::quick_map`] may be given RAM only, so every safe entry point here that takes a caller's physical address ([`QuickMaps::enter_in`], the copies,
//!    [`QuickMaps::fill_phys`], [`maintain_phys`]) asks [`Platform::is_ram`] once for the whole
//!    range, before anything is mapped, and refuses the rest with [`Error::NotRam`]; the copy
//!    loops then enter pages without asking again (the check costs one call per copy, not
//!    one per page).
//! 2. **Two paths.** A page inside the direct map is "entered" at its direct-map address at no
//!    cost (no mapping change, one lookup). Any other page is mapped into one of the calling
//!    CPU's [`QUICK_SLOTS`] windows reserved at start-up ([`Platform::quick_map`]); the entry
//!    is a real page-table change and [`QuickMapping`]'s drop (or [`QuickMapping::remove`])
//!    undoes it.
//! 3. **Why preemption must be off.** The window belongs to a CPU. If the thread migrated, it
//!    would use another CPU's window, which that CPU may remap at any moment. So every entry
//!    takes a [`CpuGuard`] by reference and the mapping borrows it: the type system keeps the
//!    mapping from outliving the preemption-disabled section. Being callable with preemption
//!    disabled is thus not merely allowed but required.
//! 4. **Slots and nesting.** Each CPU has two copy slots: [`QuickSlot::First`] for a
//!    copy's source and [`QuickSlot::Second`] for its destination, the two-page extension seed
//!    000 anticipates ("copying between pages"). Entering a slot that is already held on this
//!    CPU is *nesting*, a caller bug: the per-CPU record `held[cpu][slot]` (the page entered,
//!    tagged) catches it, **whatever the path** (a direct-mapped entry is recorded too, so a
//!    nesting bug shows on machines with a full direct map, not only on those without). In
//!    debug builds the check panics with a [`Nesting`] report naming the CPU, the slot and both
//!    pages; in release builds it counts the violation ([`QuickMaps::nestings`]) and keeps
//!    memory consistent: the inner mapping remembers the outer one and restores it on drop,
//!    so the outer mapping keeps reaching its own page.
//! 5. **Copies.** [`QuickMaps::copy_phys_to_phys`], `copy_phys_to_slice`, `copy_slice_to_phys`,
//!    the `unsafe` KVA variants and [`QuickMaps::fill_phys`] move any number of bytes at any
//!    offsets. They walk both sides together; each step copies the largest chunk that is
//!    contiguous on both sides: a whole direct-mapped run (many pages, one `memcpy`) when the
//!    direct map covers it, otherwise up to the end of the quick-mapped page. A mapping is held
//!    only for one chunk's `memcpy`, never across anything that can block, and never across
//!    chunks.
//! 6. **Colour.** On a virtually indexed cache whose way is larger than a page, the lines of
//!    a byte depend on the virtual address that touched it (its *colour*: the page-number bits
//!    the index uses). Two kernel aliases of one page with different colours would hold two
//!    copies of a line, and maintenance through one would miss the other. So the platform
//!    gives every window of a page the page's *kernel colour*, whatever the CPU and the slot
//!    ([`Platform::quick_map`]): a page outside the direct map has, in effect, one kernel
//!    alias as far as the cache is concerned (MIPS's `kmap_coherent` picks a window by colour
//!    for the same reason; parisc's `tmpalias` does the same for its flushes). We choose this
//!    over maintenance by physical address through a platform method: most architectures
//!    maintain caches by virtual address only (Arm's `DC CVAC`, x86's `CLFLUSH`), a by-PA
//!    operation on a VIPT cache must visit every colour, and colour-matched windows are needed
//!    anyway for the CPU's own copies through two windows to agree. User aliases are another
//!    matter: pinning a user page cleans and drops its user alias (seed 003's
//!    `get_user_pages`), after which the kernel alias is the one that counts.
//! 7. **Maintenance of a page outside the direct map** ([`maintain_phys`]). Cache maintenance
//!    acts on a virtual range, and such a page has no permanent one; so it is maintained
//!    through the CPU's [`MAINTENANCE_SLOT`], page by page: enter, one maintenance call,
//!    remove. The slot is reserved for this, so it never disturbs a quick map the caller
//!    holds, and it is held across one call only, so it cannot nest on its CPU. Like every
//!    quick map it never sleeps and never fails. Pages the direct map covers are maintained
//!    at their direct-map address, with no mapping change.
//!
//! # Execution context
//!
//! Everything here never sleeps, never allocates and requires a [`CpuGuard`] (preemption
//! disabled). Mappings must be held briefly: no locks, no sleeping, no other quick map of the
//! same slot while one is held.
//!
//! # Memory access
//!
//! Quick-mapped and direct-mapped memory may be device-visible, so this module never creates
//! `&`/`&mut` to it: the mapping's bytes are reached by copy only.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use alloc::boxed::Box;

use crate::addr::{KernVa, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::platform::{CpuGuard, MAINTENANCE_SLOT, Platform, QUICK_SLOTS};

/// One of a CPU's quick-map slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuickSlot {
    /// Slot 0: a single mapping, or a copy's source.
    First = 0,
    /// Slot 1: a copy's destination (the two-page extension).
    Second = 1,
}

// The enum names exactly the platform's copy slots; the last slot is the maintenance slot.
const _: () = assert!(QUICK_SLOTS == 3 && MAINTENANCE_SLOT == 2);

/// `held` word of a free slot.
const FREE: u64 = 0;
/// Tag bit: the slot is held (so a page at physical address 0 is representable).
const HELD: u64 = 1;
/// Tag bit: the holder pointed the platform window at its page (not a direct-map entry).
const WINDOWED: u64 = 2;
// Both tags fit below the page offset of a page-aligned address.
const _: () = assert!(HELD + WINDOWED < PAGE_SIZE);

/// A nesting violation: a quick-map slot entered on a CPU while already held there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nesting {
    /// The CPU.
    pub cpu: usize,
    /// The slot.
    pub slot: QuickSlot,
    /// The page the slot already holds.
    pub held: PhysAddr,
    /// The page being entered.
    pub entering: PhysAddr,
}

impl fmt::Display for Nesting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "quick-map nesting on CPU {} slot {:?}: page {:#x} is still entered while entering page {:#x}",
            self.cpu,
            self.slot,
            self.held.raw(),
            self.entering.raw()
        )
    }
}

/// The per-CPU quick-map state of one machine: which page each slot holds.
///
/// # Invariants
///
/// `held[cpu * QUICK_SLOTS + slot]` is written only by a thread holding a [`CpuGuard`] for
/// `cpu` (so per-CPU words need no lock; they are atomics only so the value can be shared).
#[derive(Debug)]
pub struct QuickMaps {
    held: Box<[AtomicU64]>,
    nestings: AtomicU64,
}

impl QuickMaps {
    /// Quick-map state for a machine of `num_cpus` CPUs (use [`Platform::num_cpus`]).
    pub fn new(num_cpus: usize) -> Self {
        Self {
            held: (0..num_cpus.saturating_mul(QUICK_SLOTS)).map(|_| AtomicU64::new(FREE)).collect(),
            nestings: AtomicU64::new(0),
        }
    }

    /// Quick-map state sized for `platform`.
    pub fn for_platform<P: Platform>(platform: &P) -> Self {
        Self::new(platform.num_cpus())
    }

    /// Nesting violations seen so far (only release builds survive one to count it).
    pub fn nestings(&self) -> u64 {
        self.nestings.load(Ordering::Relaxed)
    }

    /// The nesting a [`QuickMaps::enter_in`] of `pa` into `slot` on `cpu` would commit, if any.
    pub fn check_nesting(&self, cpu: usize, slot: QuickSlot, pa: PhysAddr) -> Option<Nesting> {
        let word = self.held.get(cpu * QUICK_SLOTS + slot as usize)?.load(Ordering::Relaxed);
        (word & HELD != 0).then(|| Nesting {
            cpu,
            slot,
            held: PhysAddr::new(word & !(PAGE_SIZE - 1)),
            entering: pa.page_base(),
        })
    }

    /// Maps the page holding `pa` in slot [`QuickSlot::First`] of the guard's CPU.
    ///
    /// Never sleeps. See [`QuickMaps::enter_in`].
    ///
    /// Errors: [`Error::NotRam`] if the page is not RAM.
    #[inline]
    pub fn enter<'a, 'p, P: Platform>(
        &'a self,
        guard: &'a CpuGuard<'p, P>,
        pa: PhysAddr,
    ) -> Result<QuickMapping<'a, 'p, P>> {
        self.enter_in(guard, QuickSlot::First, pa)
    }

    /// Maps the page holding `pa` in `slot` of the guard's CPU and returns the mapping;
    /// dropping it (or [`QuickMapping::remove`]) removes it.
    ///
    /// A direct-mapped page is entered at its direct-map address at no cost; any other page
    /// through the CPU's window. Never sleeps; never fails on RAM. Nesting (the slot is
    /// already held on this CPU) is a caller bug: a debug assertion reports it with a
    /// [`Nesting`]; release builds count it and restore the outer mapping when the inner one
    /// drops.
    ///
    /// Errors: [`Error::NotRam`] with the page if it is not RAM (theory 1); nothing is mapped.
    pub fn enter_in<'a, 'p, P: Platform>(
        &'a self,
        guard: &'a CpuGuard<'p, P>,
        slot: QuickSlot,
        pa: PhysAddr,
    ) -> Result<QuickMapping<'a, 'p, P>> {
        check_ram(guard.platform(), pa.page_base(), PAGE_SIZE)?;
        // SAFETY: the page was just checked to be RAM.
        Ok(unsafe { self.enter_ram(guard, slot, pa) })
    }

    /// [`QuickMaps::enter_in`] of a page known to be RAM.
    ///
    /// # Safety
    ///
    /// The page holding `pa` is RAM ([`Platform::is_ram`]).
    unsafe fn enter_ram<'a, 'p, P: Platform>(
        &'a self,
        guard: &'a CpuGuard<'p, P>,
        slot: QuickSlot,
        pa: PhysAddr,
    ) -> QuickMapping<'a, 'p, P> {
        let cpu = guard.cpu();
        let page = pa.page_base();
        let record = self.held.get(cpu * QUICK_SLOTS + slot as usize);
        let prev = record.map_or(FREE, |r| r.load(Ordering::Relaxed));
        if let Some(n) = self.check_nesting(cpu, slot, pa) {
            self.nestings.fetch_add(1, Ordering::Relaxed);
            debug_assert!(false, "{n}");
        }
        let platform = guard.platform();
        let (kva, windowed) = match platform.phys_to_kva(page) {
            Some(kva) => (kva, false),
            // SAFETY: we hold the guard for `cpu`; `page` is page-aligned and RAM by this
            // function's contract; the slot is free (or, after a reported nesting, its outer
            // holder is restored by our drop before it is used again).
            None => (unsafe { platform.quick_map(cpu, slot as usize, page) }, true),
        };
        if let Some(r) = record {
            r.store(page.raw() | HELD | if windowed { WINDOWED } else { 0 }, Ordering::Relaxed);
        }
        // INVARIANT: `kva` maps `page` for PAGE_SIZE bytes until this mapping drops: the direct
        // map is permanent, and the window is ours while the guard pins the CPU.
        QuickMapping { maps: self, guard, slot, page, kva, windowed, prev }
    }

    /// Copies `len` bytes of physical memory from `src` to `dst`, which must not overlap.
    ///
    /// Uses slot First for the source and Second for the destination when they are outside the
    /// direct map (so the caller must hold no quick map on this CPU).
    ///
    /// Errors: [`Error::Overflow`] (a range wraps), [`Error::InvalidArgument`] (the ranges
    /// overlap), [`Error::NotRam`] (a range is not RAM); nothing is copied then.
    pub fn copy_phys_to_phys<P: Platform>(
        &self,
        guard: &CpuGuard<'_, P>,
        src: PhysAddr,
        dst: PhysAddr,
        len: u64,
    ) -> Result<()> {
        let s_end = end_of(src.raw(), len)?;
        let d_end = end_of(dst.raw(), len)?;
        if len > 0 && src.raw() < d_end && dst.raw() < s_end {
            return Err(Error::InvalidArgument {
                what: "overlapping physical copy, source",
                value: src.raw(),
            });
        }
        check_ram(guard.platform(), src, len)?;
        check_ram(guard.platform(), dst, len)?;
        // SAFETY: both ends are physical (no caller pointers involved) and RAM (checked).
        unsafe { self.copy(guard, End::Phys(src), End::Phys(dst), len) }
    }

    /// Copies `dst.len()` bytes of physical memory starting at `src` into `dst`.
    ///
    /// Errors: [`Error::Overflow`]; [`Error::NotRam`] (nothing is copied).
    pub fn copy_phys_to_slice<P: Platform>(
        &self,
        guard: &CpuGuard<'_, P>,
        src: PhysAddr,
        dst: &mut [u8],
    ) -> Result<()> {
        end_of(src.raw(), dst.len() as u64)?;
        check_ram(guard.platform(), src, dst.len() as u64)?;
        // SAFETY: `dst` is an exclusive buffer of `dst.len()` bytes; the source is RAM.
        unsafe { self.copy(guard, End::Phys(src), End::Ptr(dst.as_mut_ptr() as u64), dst.len() as u64) }
    }

    /// Copies `src` into physical memory starting at `dst`.
    ///
    /// Errors: [`Error::Overflow`]; [`Error::NotRam`] (nothing is copied).
    pub fn copy_slice_to_phys<P: Platform>(
        &self,
        guard: &CpuGuard<'_, P>,
        src: &[u8],
        dst: PhysAddr,
    ) -> Result<()> {
        end_of(dst.raw(), src.len() as u64)?;
        check_ram(guard.platform(), dst, src.len() as u64)?;
        // SAFETY: `src` is a readable buffer of `src.len()` bytes; the destination is RAM.
        unsafe { self.copy(guard, End::Ptr(src.as_ptr() as u64), End::Phys(dst), src.len() as u64) }
    }

    /// Copies `len` bytes from physical memory at `src` to kernel virtual memory at `dst`.
    ///
    /// # Safety
    ///
    /// `[dst, dst + len)` is mapped, writable, and not referenced by any `&`/`&mut` during the
    /// call.
    ///
    /// Errors: [`Error::Overflow`]; [`Error::NotRam`] (nothing is copied).
    pub unsafe fn copy_phys_to_kva<P: Platform>(
        &self,
        guard: &CpuGuard<'_, P>,
        src: PhysAddr,
        dst: KernVa,
        len: u64,
    ) -> Result<()> {
        end_of(src.raw(), len)?;
        end_of(dst.raw(), len)?;
        check_ram(guard.platform(), src, len)?;
        // SAFETY: the caller guarantees the destination; the source is RAM (checked).
        unsafe { self.copy(guard, End::Phys(src), End::Ptr(dst.raw()), len) }
    }

    /// Copies `len` bytes from kernel virtual memory at `src` to physical memory at `dst`.
    ///
    /// # Safety
    ///
    /// `[src, src + len)` is mapped and readable and not written through a `&mut` during the
    /// call.
    ///
    /// Errors: [`Error::Overflow`]; [`Error::NotRam`] (nothing is copied).
    pub unsafe fn copy_kva_to_phys<P: Platform>(
        &self,
        guard: &CpuGuard<'_, P>,
        src: KernVa,
        dst: PhysAddr,
        len: u64,
    ) -> Result<()> {
        end_of(src.raw(), len)?;
        end_of(dst.raw(), len)?;
        check_ram(guard.platform(), dst, len)?;
        // SAFETY: the caller guarantees the source; the destination is RAM (checked).
        unsafe { self.copy(guard, End::Ptr(src.raw()), End::Phys(dst), len) }
    }

    /// Sets `len` bytes of physical memory at `dst` to `byte`, through the direct map or slot
    /// Second.
    ///
    /// Errors: [`Error::Overflow`]; [`Error::NotRam`] (nothing is written).
    pub fn fill_phys<P: Platform>(
        &self,
        guard: &CpuGuard<'_, P>,
        dst: PhysAddr,
        len: u64,
        byte: u8,
    ) -> Result<()> {
        end_of(dst.raw(), len)?;
        check_ram(guard.platform(), dst, len)?;
        let mut done = 0;
        while done < len {
            let pa = PhysAddr::new(dst.raw() + done);
            // SAFETY: `pa` lies in `[dst, dst + len)`, checked to be RAM above.
            let (ptr, n, m) = unsafe { self.resolve(guard, QuickSlot::Second, pa, len - done) };
            // SAFETY: `resolve` returns a pointer valid for `n` bytes while `m` lives.
            unsafe { core::ptr::write_bytes(ptr as *mut u8, byte, n as usize) };
            drop(m);
            done += n;
        }
        Ok(())
    }

    /// The copy loop: each step copies the largest chunk contiguous on both sides.
    ///
    /// # Safety
    ///
    /// `End::Ptr` ends are valid for `len` bytes (readable source, writable destination),
    /// `End::Phys` ends are RAM for `len` bytes, and the two sides do not overlap.
    unsafe fn copy<P: Platform>(&self, guard: &CpuGuard<'_, P>, src: End, dst: End, len: u64) -> Result<()> {
        let mut done = 0;
        while done < len {
            let left = len - done;
            // Resolve the source first, bounded by what is left; then the destination, bounded
            // by the source's chunk, so neither mapping covers bytes this step does not copy.
            let (s_ptr, s_n, s_map) = match src {
                End::Ptr(p) => (p + done, left, None),
                // SAFETY: inside the source range, RAM by this function's contract.
                End::Phys(pa) => unsafe {
                    self.resolve(guard, QuickSlot::First, PhysAddr::new(pa.raw() + done), left)
                },
            };
            let (d_ptr, n, d_map) = match dst {
                End::Ptr(p) => (p + done, s_n, None),
                // SAFETY: inside the destination range, RAM by this function's contract.
                End::Phys(pa) => unsafe {
                    self.resolve(guard, QuickSlot::Second, PhysAddr::new(pa.raw() + done), s_n)
                },
            };
            // SAFETY: both pointers are valid for `n <= s_n` bytes: caller pointers by this
            // function's contract, resolved ones while their mappings live (until the drops
            // below); the sides do not overlap.
            unsafe { core::ptr::copy_nonoverlapping(s_ptr as *const u8, d_ptr as *mut u8, n as usize) };
            drop(d_map);
            drop(s_map);
            done += n;
        }
        Ok(())
    }

    /// A CPU pointer to `pa` valid for the returned number of bytes (at most `max`, at least
    /// one), and the mapping that keeps it valid. A direct-mapped run extends over as many
    /// pages as the direct map keeps contiguous; a quick-mapped one ends at its page.
    ///
    /// # Safety
    ///
    /// The page holding `pa` is RAM.
    unsafe fn resolve<'a, 'p, P: Platform>(
        &'a self,
        guard: &'a CpuGuard<'p, P>,
        slot: QuickSlot,
        pa: PhysAddr,
        max: u64,
    ) -> (u64, u64, Option<QuickMapping<'a, 'p, P>>) {
        // SAFETY: the caller guarantees the page is RAM.
        let m = unsafe { self.enter_ram(guard, slot, pa) };
        let off = pa.page_offset();
        let mut run = PAGE_SIZE - off;
        if !m.windowed {
            let platform = guard.platform();
            let base = m.kva.raw();
            while run < max {
                let next = PhysAddr::new(m.page.raw() + off + run);
                match platform.phys_to_kva(next) {
                    Some(k) if k.raw() == base + off + run => run += PAGE_SIZE,
                    _ => break,
                }
            }
        }
        (m.kva.raw() + off, run.min(max), Some(m))
    }
}

/// A cache-maintenance operation of the platform seam.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheMaint {
    /// [`Platform::cache_clean`]: write dirty lines back.
    Clean,
    /// [`Platform::cache_invalidate`]: discard lines.
    Invalidate,
    /// [`Platform::cache_clean_invalidate`]: write back, then discard.
    CleanInvalidate,
}

impl CacheMaint {
    /// Applies the operation to `[kva, kva + len)`.
    #[inline]
    pub fn apply<P: Platform>(self, p: &P, kva: KernVa, len: u64) {
        match self {
            CacheMaint::Clean => p.cache_clean(kva, len),
            CacheMaint::Invalidate => p.cache_invalidate(kva, len),
            CacheMaint::CleanInvalidate => p.cache_clean_invalidate(kva, len),
        }
    }
}

/// Applies `op` to the CPU cache's lines of physical RAM `[pa, pa + len)` (theory 7): through
/// the direct map where it covers a page, otherwise through the guard's CPU's
/// [`MAINTENANCE_SLOT`] window, one page at a time. Returns the number of pages maintained
/// through the window.
///
/// Never sleeps, never fails on RAM.
///
/// Errors: [`Error::Overflow`] (the range wraps); [`Error::NotRam`] (the range is not all RAM:
/// nothing is maintained).
pub fn maintain_phys<P: Platform>(
    guard: &CpuGuard<'_, P>,
    pa: PhysAddr,
    len: u64,
    op: CacheMaint,
) -> Result<u64> {
    let end = end_of(pa.raw(), len)?;
    let (p, cpu) = (guard.platform(), guard.cpu());
    check_ram(p, pa, len)?;
    let mut at = pa.raw();
    let mut windowed = 0;
    while at < end {
        let page = PhysAddr::new(at).page_base();
        let off = at - page.raw();
        let mut n = (PAGE_SIZE - off).min(end - at);
        match p.phys_to_kva(page) {
            Some(kva) => {
                // One call for as many pages as the direct map keeps contiguous.
                let start = kva.raw() + off;
                while at + n < end {
                    match p.phys_to_kva(PhysAddr::new(at + n)) {
                        Some(k) if k.raw() == start + n => n += PAGE_SIZE.min(end - at - n),
                        _ => break,
                    }
                }
                op.apply(p, KernVa::new(start), n)
            }
            None => {
                // SAFETY: we hold the guard for `cpu`; `page` is page-aligned and RAM (the
                // range was checked above); the maintenance slot is used only here and released
                // before this iteration ends, so it is free (theory 7).
                let kva = unsafe { p.quick_map(cpu, MAINTENANCE_SLOT, page) };
                op.apply(p, KernVa::new(kva.raw() + off), n);
                // SAFETY: same guard; we mapped the slot just above and do not use it again.
                unsafe { p.quick_unmap(cpu, MAINTENANCE_SLOT) };
                windowed += 1;
            }
        }
        at += n;
    }
    Ok(windowed)
}

/// One side of a copy.
#[derive(Clone, Copy, Debug)]
enum End {
    /// Physical memory, reached through the direct map or a quick map.
    Phys(PhysAddr),
    /// A CPU pointer the caller vouches for.
    Ptr(u64),
}

/// [`Error::NotRam`] unless `[pa, pa + len)` is RAM; an empty range touches nothing and passes.
#[inline]
fn check_ram<P: Platform>(p: &P, pa: PhysAddr, len: u64) -> Result<()> {
    if len == 0 || p.is_ram(pa, len) { Ok(()) } else { Err(Error::NotRam { pa: pa.raw(), len }) }
}

/// `start + len`, checked.
fn end_of(start: u64, len: u64) -> Result<u64> {
    start.checked_add(len).ok_or(Error::Overflow { base: start, len })
}

/// One entered page: its kernel virtual address stays valid until the mapping drops.
///
/// # Invariants
///
/// `kva` maps the 4 KiB page `page` (read-write) while this value lives; the value borrows the
/// [`CpuGuard`] that keeps the CPU (and so its window) ours.
pub struct QuickMapping<'a, 'p, P: Platform> {
    maps: &'a QuickMaps,
    guard: &'a CpuGuard<'p, P>,
    slot: QuickSlot,
    page: PhysAddr,
    kva: KernVa,
    windowed: bool,
    /// The slot's record before this entry (FREE unless a nesting was reported).
    prev: u64,
}

impl<P: Platform> QuickMapping<'_, '_, P> {
    /// Kernel virtual address of the page's first byte.
    #[inline]
    pub fn kva(&self) -> KernVa {
        self.kva
    }

    /// Physical address of the page.
    #[inline]
    pub fn pa(&self) -> PhysAddr {
        self.page
    }

    /// True if the page was mapped through the CPU's window (a real mapping change), false if
    /// it was entered at its direct-map address.
    #[inline]
    pub fn is_windowed(&self) -> bool {
        self.windowed
    }

    /// The slot this mapping holds.
    #[inline]
    pub fn slot(&self) -> QuickSlot {
        self.slot
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= PAGE_SIZE => Ok(()),
            _ => Err(Error::OutOfRange { addr: offset.saturating_add(len), limit: PAGE_SIZE }),
        }
    }

    /// Copies bytes of the page starting at `offset` into `buf`.
    ///
    /// Errors: [`Error::OutOfRange`] if the bytes run past the page.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        // SAFETY: by the type invariant the page is mapped at `kva`; the bytes are inside it.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (self.kva.raw() + offset) as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Copies `data` into the page starting at `offset`.
    ///
    /// Errors: [`Error::OutOfRange`] if the bytes run past the page.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        // SAFETY: by the type invariant the page is mapped writable at `kva`; in bounds.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), (self.kva.raw() + offset) as *mut u8, data.len())
        };
        Ok(())
    }

    /// Removes the mapping now (the same as dropping it).
    #[inline]
    pub fn remove(self) {}
}

impl<P: Platform> Drop for QuickMapping<'_, '_, P> {
    fn drop(&mut self) {
        let cpu = self.guard.cpu();
        if let Some(r) = self.maps.held.get(cpu * QUICK_SLOTS + self.slot as usize) {
            r.store(self.prev, Ordering::Relaxed);
        }
        if !self.windowed {
            return;
        }
        let platform = self.guard.platform();
        if self.prev & WINDOWED != 0 {
            // Release build after a nesting: point the window back at the outer page.
            // SAFETY: we hold the guard; the outer page was RAM when it was entered.
            unsafe {
                platform.quick_map(cpu, self.slot as usize, PhysAddr::new(self.prev & !(PAGE_SIZE - 1)))
            };
        } else {
            // SAFETY: we hold the guard for `cpu` and mapped this slot; nothing uses the
            // window after this (our borrowers are gone).
            unsafe { platform.quick_unmap(cpu, self.slot as usize) };
        }
    }
}

impl<P: Platform> fmt::Debug for QuickMapping<'_, '_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuickMapping")
            .field("cpu", &self.guard.cpu())
            .field("slot", &self.slot)
            .field("page", &self.page)
            .field("kva", &self.kva)
            .field("windowed", &self.windowed)
            .finish()
    }
}
