//! A domain: one IOVA space, one page table, one invalidation policy.
//!
//! # Theory
//!
//! 1. **Binding.** A [`Domain`] owns a [`PageTable`] and an [`IovaSource`] and talks to the
//!    hardware through an [`IotlbInvalidator`]. Callers allocate IOVA from it, map, and unmap
//!    with the list of IOVA ranges to give back; the domain decides *when* it is safe to give
//!    them back (module rule 1 of [`crate::iommu`]).
//! 2. **Strict unmap** clears every range of the map into one [`Gather`], issues exactly one
//!    ranged invalidation covering the gathered hull (however many segments the map had),
//!    and, once it has completed, releases the table pages the unmap detached and frees the
//!    IOVA ranges. The returned [`FlushTicket`] is [`FlushTicket::DONE`].
//! 3. **Deferred unmap** clears the ranges, takes a ticket, and queues the gather and the
//!    ranges to free on its CPU's flush queue ([`FlushQueues`]); a later whole-domain
//!    invalidation releases them. The queue forces a flush when it holds `max_entries` unmaps,
//!    and every map and unmap of the domain (and [`Domain::poll`], for a kernel's timer)
//!    flushes when the oldest queued unmap is `max_age_ns` old. An unmap whose free list
//!    cannot be queued (no memory for a long list) flushes at once and releases it.
//! 4. **Reserved windows.** A caller that keeps its IOVA (unmap with an empty `free` list) and
//!    maps into it again must first call [`Domain::ensure_flushed`] with the unmap's ticket:
//!    a flush that started after that unmap has finished when it returns.
//! 5. **Failed maps.** When [`PageTable::map`] fails it has cleared what it wrote, but a
//!    device may have cached a translation in between; the domain invalidates the range
//!    before returning the error, so the IOVA is reusable at once.
//! 6. **Exhaustion.** An IOVA allocation that finds the space exhausted while unmaps are
//!    queued flushes them (their IOVA goes back) and retries once.
//! 7. **Untrusted devices** get a strict domain whatever policy was asked for.
//! 8. **Failed invalidations.** When the IOMMU fails a command
//!    ([`Error::InvalidationFailed`]), nothing it was to invalidate may be reused, and the
//!    domain becomes *degraded*:
//!    - a strict unmap's table pages and IOVA are *held back* (the call returns the error);
//!    - a deferred flush releases nothing: its unmaps stay queued (rule 7 of [`super::flushq`]);
//!    - a map whose after-map invalidation (caching mode) or failure clean-up failed is
//!      undone and returns the error; its IOVA may be cached by the unit, so
//!    - every map of a degraded domain first *recovers*: one whole-domain invalidation (a
//!      flush, for a deferred domain), after which everything held back is released and the
//!      domain is healthy again. While that fails, maps fail with the error, so no IOVA the
//!      unit may still cache is mapped again (a reserved window included). Checking costs a
//!      map one relaxed load. [`Domain::flush`] recovers too (a kernel's retry timer).
//!    - Dropping a domain whose last invalidation fails leaks its table pages and what is
//!      held back, never frees them.
//! 9. **Pinned windows.** A reserved window ([`Domain::pin_window`]) keeps the last-level
//!    tables under it for as long as it is held, so [`Domain::map_pinned`] writes a load's
//!    leaves without a walk and [`Domain::unmap_pinned`] clears them; both keep the rules
//!    above (a degraded domain recovers before a map, a failed map is invalidated, an unmap
//!    is invalidated now or queued, or recorded (theory 10), and returns its ticket). The tables are never detached by
//!    these calls ([`crate::pgtable::LeafWindow`]), so nothing is freed on this path.
//! 10. **Unmaps that free nothing** (a kept window's, a pinned window's: no IOVA to give back,
//!     no table page detached) are *recorded* on the CPU's record of the flush queues instead
//!     of queued (rule 8 of [`super::flushq`], which has the argument): the caller keeps the
//!     ticket for [`Domain::ensure_flushed`] before the window is mapped again, the count and
//!     age bounds force flushes as for queued unmaps, and [`Domain::flush_queued`] (the unpin
//!     barrier, a quarantine's proof) flushes while a recorded unmap is uncovered, so no
//!     buffer is handed back for reuse before an invalidation that saw its clear finished.
//!     [`Domain::pending`] counts them; `DomainStats::queued` counts them as queued.
//!
//! # Execution context
//!
//! Every method takes the caller's [`CpuGuard`]: it never sleeps and runs with preemption
//! disabled; a flush spins until the hardware completes its invalidation.
#![allow(unsafe_code)] // map and unmap are unsafe fns: the caller owns the IOVA (theory 1)

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;

use super::flushq::{FlushGenerations, FlushQueues, FlushTicket, Pushed, Recorded};
use super::{DomainConfig, DomainId, InvalidationPolicy, IotlbInvalidator};
use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::error::{Error, Result};
use crate::iova::{IovaRequest, IovaSource};
use crate::pgtable::{FlushDone, Gather, LeafTemplate, LeafWindow, PageTable, Prot, PteFormat};
use crate::platform::{CpuGuard, Platform};
use crate::sync::{AtomicBool, AtomicU64, Ordering, SpinLock};

/// IOVA ranges one queued unmap frees without a heap allocation: a map holds one IOVA
/// allocation (seed 002: never one per segment), so one range is the common case; two
/// leaves room for a map and its neighbour released together. Longer lists go to the heap.
const INLINE_FREES: usize = 2;

/// The ranges an unmap gives back.
enum FreeList {
    Inline(usize, [AddrRange<Iova>; INLINE_FREES]),
    Heap(Vec<AddrRange<Iova>>),
}

impl FreeList {
    fn new(free: &[AddrRange<Iova>]) -> Result<Self> {
        if free.is_empty() {
            return Ok(Self::none());
        }
        if free.len() <= INLINE_FREES {
            let mut a = [AddrRange::empty_at(Iova::new(0)); INLINE_FREES];
            a[..free.len()].copy_from_slice(free);
            return Ok(FreeList::Inline(free.len(), a));
        }
        let mut v = Vec::new();
        v.try_reserve_exact(free.len())
            .map_err(|_| Error::NoMemory { requested: core::mem::size_of_val(free) as u64 })?;
        v.extend_from_slice(free);
        Ok(FreeList::Heap(v))
    }

    /// Frees nothing (no allocation).
    fn none() -> Self {
        FreeList::Inline(0, [AddrRange::empty_at(Iova::new(0)); INLINE_FREES])
    }

    fn as_slice(&self) -> &[AddrRange<Iova>] {
        match self {
            FreeList::Inline(n, a) => &a[..*n],
            FreeList::Heap(v) => v,
        }
    }
}

/// One queued unmap: what it detached and what it frees.
struct Pending {
    gather: Gather,
    free: FreeList,
}

/// One run of a load into a pinned window ([`Domain::map_pinned`]): the window's bytes
/// `[off, off + len)` (page multiples) map `[pa, pa + len)` with `prot`, and the IOMMU keeps
/// the alias `coherence` coherent (seed 003).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedRun {
    /// Offset of the run's first page in the window.
    pub off: u64,
    /// Physical address of that page.
    pub pa: PhysAddr,
    /// Bytes mapped (a page multiple).
    pub len: u64,
    /// The entries' attributes.
    pub prot: Prot,
    /// The coherence index of the run's first page.
    pub coherence: super::CoherenceIndex,
}

/// Counters a user can read (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainStats {
    /// Successful maps.
    pub maps: u64,
    /// Failed maps (each followed by an invalidation of its range).
    pub map_failures: u64,
    /// Unmaps (calls).
    pub unmaps: u64,
    /// Ranged invalidations issued (strict unmaps, failed maps).
    pub range_invalidations: u64,
    /// Whole-domain invalidations issued by flushes.
    pub flushes: u64,
    /// Flushes that found a later flush had already covered them and issued nothing.
    pub flushes_coalesced: u64,
    /// Flushes forced by a full queue (the count bound).
    pub flushes_full: u64,
    /// Flushes forced by a queued unmap reaching the age bound.
    pub flushes_aged: u64,
    /// Unmaps queued for a deferred flush.
    pub queued: u64,
    /// Table pages given back to the pool after their invalidation.
    pub table_pages_released: u64,
    /// IOVA ranges given back to the allocator after their invalidation.
    pub iova_released: u64,
    /// IOVA allocations retried after a flush because the space was exhausted.
    pub exhaustion_retries: u64,
    /// Releases that failed (a double free of IOVA reported by the allocator); the first
    /// error of a strict unmap is also returned to its caller.
    pub release_errors: u64,
    /// Invalidation commands the IOMMU failed (theory 8).
    pub invalidation_errors: u64,
    /// Unmaps and undone maps held back after a failed invalidation, not yet released.
    pub held_back: u64,
}

/// One counter of [`DomainStats`]: its index in a CPU's counter block.
#[derive(Clone, Copy)]
enum Stat {
    Maps,
    MapFailures,
    Unmaps,
    RangeInvalidations,
    Flushes,
    FlushesCoalesced,
    FlushesFull,
    FlushesAged,
    Queued,
    TablePagesReleased,
    IovaReleased,
    ExhaustionRetries,
    ReleaseErrors,
    InvalidationErrors,
}

/// Number of [`Stat`]s.
const STATS: usize = Stat::InvalidationErrors as usize + 1;

/// One CPU's counters, on their own cache lines (128 bytes: x86's adjacent-line prefetcher
/// pairs 64-byte lines, so two CPUs' blocks never share a pair).
#[repr(align(128))]
struct CpuCounters([AtomicU64; STATS]);

impl CpuCounters {
    fn new() -> Self {
        Self(core::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// The domain's counters: one block per CPU, written only by the CPU that owns it.
///
/// Theory: a counter is bumped on every map and unmap, so a shared atomic would cost a locked
/// read-modify-write each time (≈ 8 ns on the lab's VM, about as much as the rest of a map's
/// bookkeeping) and bounce one line between CPUs. Every bump runs under the caller's
/// [`CpuGuard`]: no other thread runs on that CPU while it lives (the platform's rule 4), so
/// the CPU's own block has a single writer and a plain load and store update it (atomic
/// accesses, so a concurrent [`Domain::stats`] reads whole values; a snapshot is the sum of
/// the blocks, each exact as of its read). The domain is not re-entered from an interrupt
/// on the same CPU (its flush-queue locks forbid that already), so no update is lost. A guard
/// for a CPU beyond the count given at construction uses `shared`, with locked adds.
struct Counters {
    cpus: Box<[CpuCounters]>,
    shared: CpuCounters,
}

impl Counters {
    fn new(cpus: usize) -> Result<Self> {
        let mut v = Vec::new();
        v.try_reserve_exact(cpus).map_err(|_| Error::NoMemory {
            requested: (cpus * core::mem::size_of::<CpuCounters>()) as u64,
        })?;
        v.extend((0..cpus).map(|_| CpuCounters::new()));
        Ok(Self { cpus: v.into_boxed_slice(), shared: CpuCounters::new() })
    }

    /// Adds `n` to counter `s` of the guard's CPU.
    #[inline]
    fn add<P: Platform>(&self, g: &CpuGuard<'_, P>, s: Stat, n: u64) {
        match self.cpus.get(g.cpu()) {
            Some(c) => {
                // Single writer (see the type's theory): no locked instruction needed.
                let a = &c.0[s as usize];
                a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
            }
            None => {
                self.shared.0[s as usize].fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// The sum of counter `s` over every CPU.
    fn sum(&self, s: Stat) -> u64 {
        let i = s as usize;
        self.cpus
            .iter()
            .chain(core::iter::once(&self.shared))
            .fold(0u64, |acc, c| acc.wrapping_add(c.0[i].load(Ordering::Relaxed)))
    }
}

/// An IOMMU domain: an IOVA space, a page table and an invalidation policy.
///
/// # Invariants
///
/// - Every IOVA range and table page an unmap gave up is released only after an
///   invalidation that started after its entries were cleared has completed: at once for
///   strict domains, through `fq` for deferred ones.
/// - `fq` is `Some` exactly when the effective policy is deferred.
/// - `degraded` is set whenever an invalidation failed and no whole-domain invalidation has
///   succeeded since; `held` is empty unless it is set.
pub struct Domain<'p, P: Platform, F: PteFormat, S: IovaSource, H: IotlbInvalidator> {
    platform: &'p P,
    /// Dropped by hand: leaked if the last invalidation fails (theory 8).
    table: ManuallyDrop<PageTable<'p, P, F>>,
    iova: S,
    hw: &'p H,
    cfg: DomainConfig,
    fq: Option<FlushQueues<Pending>>,
    counters: Counters,
    /// Theory 8: an invalidation failed and none of the whole domain succeeded since.
    degraded: AtomicBool,
    /// Theory 8: what failed invalidations left unproven.
    held: SpinLock<Vec<Pending>>,
}

impl<'p, P: Platform, F: PteFormat, S: IovaSource, H: IotlbInvalidator> Domain<'p, P, F, S, H> {
    /// Binds `table` and `iova` under `cfg`, invalidating through `hw`. A deferred policy
    /// gets one flush queue per CPU of `platform`; an untrusted device gets a strict domain.
    ///
    /// Errors: [`Error::InvalidArgument`] (a deferred bound of zero), [`Error::NoMemory`]
    /// (the queues).
    pub fn new(
        platform: &'p P,
        table: PageTable<'p, P, F>,
        iova: S,
        hw: &'p H,
        cfg: DomainConfig,
    ) -> Result<Self> {
        let fq = match cfg.effective_policy() {
            InvalidationPolicy::Strict => None,
            InvalidationPolicy::Deferred { max_entries, max_age_ns } => {
                Some(FlushQueues::new(platform.num_cpus(), max_entries, max_age_ns)?)
            }
        };
        // INVARIANT: fq is Some exactly for an effective deferred policy.
        let counters = Counters::new(platform.num_cpus())?;
        Ok(Self {
            platform,
            table: ManuallyDrop::new(table),
            iova,
            hw,
            cfg,
            fq,
            counters,
            degraded: AtomicBool::new(false),
            held: SpinLock::new(Vec::new()),
        })
    }

    /// The domain id.
    pub fn id(&self) -> DomainId {
        self.cfg.id
    }

    /// The policy really applied (strict for untrusted devices).
    pub fn policy(&self) -> InvalidationPolicy {
        self.cfg.effective_policy()
    }

    /// The page table.
    pub fn table(&self) -> &PageTable<'p, P, F> {
        &self.table
    }

    /// The IOVA allocator.
    pub fn iova(&self) -> &S {
        &self.iova
    }

    /// The flush generations, if the policy is deferred.
    pub fn generations(&self) -> Option<&FlushGenerations> {
        self.fq.as_ref().map(|fq| fq.generations())
    }

    /// Unmaps queued and not yet released, or recorded and not yet covered by a flush
    /// (theory 10; 0 for a strict domain).
    pub fn pending(&self) -> usize {
        self.fq.as_ref().map_or(0, |fq| fq.pending() + fq.recorded())
    }

    /// The counters.
    pub fn stats(&self) -> DomainStats {
        let c = |s| self.counters.sum(s);
        DomainStats {
            maps: c(Stat::Maps),
            map_failures: c(Stat::MapFailures),
            unmaps: c(Stat::Unmaps),
            range_invalidations: c(Stat::RangeInvalidations),
            flushes: c(Stat::Flushes),
            flushes_coalesced: c(Stat::FlushesCoalesced),
            flushes_full: c(Stat::FlushesFull),
            flushes_aged: c(Stat::FlushesAged),
            queued: c(Stat::Queued),
            table_pages_released: c(Stat::TablePagesReleased),
            iova_released: c(Stat::IovaReleased),
            exhaustion_retries: c(Stat::ExhaustionRetries),
            release_errors: c(Stat::ReleaseErrors),
            invalidation_errors: c(Stat::InvalidationErrors),
            held_back: self.held.lock().len() as u64,
        }
    }

    /// Whether an invalidation failed and no whole-domain invalidation succeeded since
    /// (theory 8).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Allocates IOVA space; if the space is exhausted while unmaps are queued or held back,
    /// flushes them and retries once.
    ///
    /// Errors: those of [`IovaSource::alloc`]; [`Error::InvalidationFailed`] if that flush
    /// fails.
    pub fn alloc_iova(&self, g: &CpuGuard<'_, P>, req: &IovaRequest) -> Result<AddrRange<Iova>> {
        match self.iova.alloc(g, req) {
            Err(Error::Exhausted { .. }) if self.pending() > 0 || self.degraded() => {
                self.counters.add(g, Stat::ExhaustionRetries, 1);
                self.flush(g)?;
                self.iova.alloc(g, req)
            }
            r => r,
        }
    }

    /// Maps `[iova, iova + len)` to `[pa, pa + len)` with `prot`. On failure nothing of the
    /// range translates; the IOVA may be given back to the allocator at once (no later map
    /// reuses it while the unit may cache it: theory 8).
    ///
    /// Errors: those of [`PageTable::map`] (misaligned or out-of-range arguments, an
    /// existing mapping, no memory for a table page); [`Error::InvalidationFailed`] if the
    /// domain is degraded and cannot recover, or the after-map invalidation failed (theory 8).
    ///
    /// # Safety
    ///
    /// As for [`PageTable::map`]: the caller owns `[iova, iova + len)` exclusively (it got it
    /// from [`Domain::alloc_iova`] or a window of this domain and has not given it back), and
    /// `[pa, pa + len)` is memory the caller may let the domain's devices access with `prot`
    /// until the range is unmapped and the unmap's invalidation has completed (its ticket
    /// passed [`Domain::ensure_flushed`], or a strict unmap returned).
    ///
    /// ```compile_fail,E0133
    /// use busdma::iommu::{Domain, IotlbInvalidator};
    /// use busdma::iova::IovaSource;
    /// use busdma::pgtable::{Prot, PteFormat};
    /// use busdma::{CpuGuard, Iova, PhysAddr, Platform};
    /// // Mapping without `unsafe` is rejected (E0133): the caller vouches for both ranges.
    /// fn map_any<P: Platform, F: PteFormat, S: IovaSource, H: IotlbInvalidator>(
    ///     d: &Domain<'_, P, F, S, H>,
    ///     g: &CpuGuard<'_, P>,
    /// ) {
    ///     let _ = d.map(g, Iova::new(0), PhysAddr::new(0), 4096, Prot::READ);
    /// }
    /// ```
    pub unsafe fn map(
        &self,
        g: &CpuGuard<'_, P>,
        iova: Iova,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
    ) -> Result<()> {
        if self.degraded.load(Ordering::Relaxed) {
            self.recover(g)?;
        }
        self.flush_if_due(g);
        let range = AddrRange::from_start_len(iova, len)?;
        self.hw.audit_mapping(self.cfg.id, range);
        // SAFETY: the caller owns the IOVA range and may give the device the PA range (this
        // function's contract, which is the table's).
        match unsafe { self.table.map(g, iova, pa, len, prot) } {
            Ok(()) => match self.hw.invalidate_mapped(self.cfg.id, range) {
                Ok(()) => {
                    self.counters.add(g, Stat::Maps, 1);
                    Ok(())
                }
                Err(e) => Err(self.undo_map(g, range, e)),
            },
            Err(e) => {
                // Rule 5: the table cleared what it wrote; a walk in between may have cached
                // part of it.
                self.counters.add(g, Stat::MapFailures, 1);
                self.counters.add(g, Stat::RangeInvalidations, 1);
                if self.hw.invalidate_range(self.cfg.id, range).is_err() {
                    self.hold(g, None);
                }
                Err(e)
            }
        }
    }

    /// Unmaps `ranges` (the segments of one map) and gives `free` back to the IOVA allocator
    /// once no device can reach it. Strict: one ranged invalidation covering every range,
    /// then the release, before returning. Deferred: the release is queued. Returns the
    /// ticket to pass to [`Domain::ensure_flushed`] before mapping into a kept range again.
    ///
    /// Errors: those of [`PageTable::unmap`] (a range not mapped, misaligned, no memory for a
    /// block split). Ranges before the failing one are unmapped, invalidated and their table
    /// pages released; nothing of `free` is freed. In a strict domain, the first error the
    /// IOVA allocator reports for `free` (a double free) after everything else is done.
    /// [`Error::InvalidationFailed`] if an invalidation the unmap issued failed: the ranges
    /// are unmapped all the same, and what they free is held back (theory 8).
    ///
    /// # Safety
    ///
    /// Every range of `ranges` and `free` is the caller's, as for [`Domain::map`]: mapped (or
    /// allocated) by it in this domain and not given back, and no other call maps or unmaps
    /// any part of them meanwhile. The caller stops using the ranges of `free`: the domain
    /// gives them to the allocator once the unmap's invalidation has completed.
    pub unsafe fn unmap(
        &self,
        g: &CpuGuard<'_, P>,
        ranges: &[AddrRange<Iova>],
        free: &[AddrRange<Iova>],
    ) -> Result<FlushTicket> {
        self.counters.add(g, Stat::Unmaps, 1);
        let mut gather = Gather::new();
        let mut failed = None;
        let mut cleared = 0;
        for &r in ranges {
            // SAFETY: the caller owns every range of `ranges` (this function's contract).
            if let Err(e) = unsafe { self.table.unmap(g, r, &mut gather) } {
                failed = Some(e);
                break;
            }
            cleared += 1;
        }
        self.hw.audit_unmapped(self.cfg.id, &ranges[..cleared]);
        self.finish_unmap(g, gather, failed, free)
    }

    /// The second half of an unmap whose entries are cleared into `gather` (`failed`: the
    /// error that stopped the clearing): strict (or failed) invalidates now and releases,
    /// deferred queues (theory 2, 3, 8).
    // Always: both unmaps are on the per-packet path, and a call here cost per-map's
    // 1-page unmap 64 instructions (callgrind, `icount per-map-strict`).
    #[inline(always)]
    fn finish_unmap(
        &self,
        g: &CpuGuard<'_, P>,
        gather: Gather,
        failed: Option<Error>,
        free: &[AddrRange<Iova>],
    ) -> Result<FlushTicket> {
        let fq = match (&self.fq, failed) {
            (Some(fq), None) => fq,
            (_, failed) => {
                if let Some(hull) = gather.range() {
                    self.counters.add(g, Stat::RangeInvalidations, 1);
                    if let Err(e) = self.hw.invalidate_range(self.cfg.id, hull) {
                        // Theory 8: nothing of this unmap is proven unreachable.
                        let free = if failed.is_none() { free } else { &[] };
                        match FreeList::new(free) {
                            Ok(free) => self.hold(g, Some(Pending { gather, free })),
                            Err(_) => {
                                // No memory to hold the list: leaked, never reused.
                                core::mem::forget(gather);
                                self.hold(g, None);
                            }
                        }
                        return Err(e);
                    }
                }
                self.release_gather(g, gather);
                if let Some(e) = failed {
                    return Err(e);
                }
                let mut first = Ok(FlushTicket::DONE);
                for &r in free {
                    if let Err(e) = self.release_iova(g, r) {
                        first = first.and(Err(e));
                    }
                }
                return first;
            }
        };
        let ticket = fq.ticket();
        let now = self.platform.monotonic_ns();
        if free.is_empty() && gather.freed_tables() == 0 {
            // Theory 10: nothing to release later, so nothing is queued.
            match fq.record(g.cpu(), ticket, now) {
                Recorded::Recorded => {
                    self.counters.add(g, Stat::Queued, 1);
                    if fq.due(now) {
                        self.counters.add(g, Stat::FlushesAged, 1);
                        self.flush_now(g, fq)?;
                    }
                    return Ok(ticket);
                }
                Recorded::Full => {
                    self.counters.add(g, Stat::Queued, 1);
                    self.counters.add(g, Stat::FlushesFull, 1);
                    self.flush_now(g, fq)?;
                    return Ok(ticket);
                }
                Recorded::NoRecord => {}
            }
        }
        let item = match FreeList::new(free) {
            Ok(free) => Pending { gather, free },
            Err(_) => {
                // No memory to queue a long free list: flush now (it starts after the clear),
                // then the ranges are free to go.
                if let Err(e) = self.flush_now(g, fq) {
                    // Not even the memory to hold the list: its IOVA is leaked.
                    self.hold(g, Some(Pending { gather, free: FreeList::none() }));
                    return Err(e);
                }
                self.release_gather(g, gather);
                for &r in free {
                    let _ = self.release_iova(g, r);
                }
                return Ok(FlushTicket::DONE);
            }
        };
        self.counters.add(g, Stat::Queued, 1);
        match fq.push(g.cpu(), ticket, now, item, &mut |p| self.release(g, p)) {
            Pushed::Queued => {
                if fq.due(now) {
                    self.counters.add(g, Stat::FlushesAged, 1);
                    self.flush_now(g, fq)?;
                }
            }
            Pushed::QueuedFull => {
                self.counters.add(g, Stat::FlushesFull, 1);
                self.flush_now(g, fq)?;
            }
            Pushed::NoRoom(p) => {
                self.counters.add(g, Stat::FlushesFull, 1);
                if let Err(e) = self.flush_now(g, fq) {
                    self.hold(g, Some(p));
                    return Err(e);
                }
                self.release(g, p);
            }
        }
        Ok(ticket)
    }

    /// Pins the last-level tables of a reserved window (theory 9): installs every level over
    /// it and returns the tables, so later loads write leaves without a walk.
    ///
    /// Errors: those of [`PageTable::pin_leaves`].
    ///
    /// # Safety
    ///
    /// As for [`PageTable::pin_leaves`]: `window` is the caller's (from
    /// [`Domain::alloc_iova`]), and until it gives the window up it maps and unmaps inside it
    /// only with [`Domain::map_pinned`] and [`Domain::unmap_pinned`] on the returned window.
    pub unsafe fn pin_window(&self, g: &CpuGuard<'_, P>, window: AddrRange<Iova>) -> Result<LeafWindow> {
        // SAFETY: this function's contract is the table's.
        unsafe { self.table.pin_leaves(g, window) }
    }

    /// Maps every run of `runs` into the pinned window `lw` (theory 9): the checks of
    /// [`Domain::map`] once per load (a degraded domain recovers first, an aged queue is
    /// flushed), each run's leaves written straight into the window's tables. On failure
    /// nothing of `runs` translates any more and the range was invalidated (theory 5) or
    /// held back (theory 8).
    ///
    /// Errors: those of [`PageTable::write_pinned`]; [`Error::InvalidationFailed`] as for
    /// [`Domain::map`].
    ///
    /// # Safety
    ///
    /// `lw` came from [`Domain::pin_window`] of this domain and its window is still the
    /// caller's; each run's `off` is a page of that window with nothing mapped there, and its
    /// physical range may be given to the devices with its rights, as for [`Domain::map`].
    #[inline(always)]
    pub unsafe fn map_pinned(&self, g: &CpuGuard<'_, P>, lw: &LeafWindow, runs: &[PinnedRun]) -> Result<()> {
        if self.degraded.load(Ordering::Relaxed) {
            self.recover(g)?;
        }
        self.flush_if_due(g);
        let base = lw.start().raw();
        // One template per attribute set (runs of a load usually share one).
        let mut leaf: Option<(Prot, LeafTemplate<F>)> = None;
        // The written pages whose caching-mode invalidation is still to come: runs laid out on
        // consecutive pages (the usual load) are invalidated as one range.
        let mut pending: Option<(u64, u64)> = None;
        for (i, r) in runs.iter().enumerate() {
            let t = match leaf {
                Some((p, t)) if p == r.prot => t,
                _ => match self.table.leaf_template(r.prot) {
                    Ok(t) => {
                        leaf = Some((r.prot, t));
                        t
                    }
                    Err(e) => return Err(self.undo_pinned(g, lw, &runs[..i], e)),
                },
            };
            let end = r.off.wrapping_add(r.len);
            let range = match AddrRange::new(
                Iova::new(base.wrapping_add(r.off)),
                Iova::new(base.wrapping_add(end)),
            ) {
                Ok(range) => range,
                Err(e) => return Err(self.undo_pinned(g, lw, &runs[..i], e)),
            };
            self.hw.audit_mapping(self.cfg.id, range);
            // SAFETY: `lw` is this domain's and its window the caller's; the run's physical
            // range may be given to the device (this function's contract).
            if let Err(e) = unsafe { self.table.write_pinned(lw, r.off, r.pa, r.len, &t) } {
                return Err(self.undo_pinned(g, lw, &runs[..i], e));
            }
            self.hw.set_coherence_index(self.cfg.id, range, r.coherence);
            pending = match pending {
                Some((start, e)) if e == r.off => Some((start, end)),
                Some((start, e)) => {
                    if let Err(e) = self.invalidate_mapped(base, start, e) {
                        return Err(self.undo_pinned(g, lw, &runs[..=i], e));
                    }
                    Some((r.off, end))
                }
                None => Some((r.off, end)),
            };
        }
        if let Some((start, end)) = pending {
            if let Err(e) = self.invalidate_mapped(base, start, end) {
                return Err(self.undo_pinned(g, lw, runs, e));
            }
        }
        self.counters.add(g, Stat::Maps, 1);
        Ok(())
    }

    /// The caching-mode invalidation of [`Domain::map`] for the window's bytes `[start, end)`,
    /// just written.
    #[inline]
    fn invalidate_mapped(&self, base: u64, start: u64, end: u64) -> Result<()> {
        let range = AddrRange::new(Iova::new(base.wrapping_add(start)), Iova::new(base.wrapping_add(end)))?;
        self.hw.invalidate_mapped(self.cfg.id, range)
    }

    /// Theory 5 and 8 for [`Domain::map_pinned`]: clears `written` (every run written so far,
    /// announced to the IOMMU or not), then invalidates their hull; holds it back if that
    /// fails.
    #[cold]
    fn undo_pinned(&self, g: &CpuGuard<'_, P>, lw: &LeafWindow, written: &[PinnedRun], why: Error) -> Error {
        self.counters.add(g, Stat::MapFailures, 1);
        let base = lw.start().raw();
        let mut gather = Gather::new();
        for r in written {
            // SAFETY: written by the caller's `map_pinned` just now, in its window.
            let _ = unsafe { self.table.clear_pinned(lw, r.off, r.len) };
            if let Ok(range) = AddrRange::from_start_len(Iova::new(base.wrapping_add(r.off)), r.len) {
                gather.add_range(range);
            }
        }
        if let Some(hull) = gather.range() {
            self.counters.add(g, Stat::RangeInvalidations, 1);
            if self.hw.invalidate_range(self.cfg.id, hull).is_err() {
                self.hold(g, Some(Pending { gather, free: FreeList::none() }));
            }
        }
        why
    }

    /// Unmaps the runs a [`Domain::map_pinned`] mapped in `lw`, as [`Domain::unmap`] with an
    /// empty free list: one ranged invalidation (strict) or one queued entry (deferred); the
    /// window stays the caller's. Returns the ticket to pass to [`Domain::ensure_flushed`]
    /// before the window is mapped again.
    ///
    /// Errors: as [`Domain::unmap`] ([`Error::NotMapped`] stops at the first run not mapped:
    /// the runs before it are unmapped and invalidated).
    ///
    /// # Safety
    ///
    /// As for [`Domain::map_pinned`]: `lw` is this domain's, its window the caller's, and
    /// `runs` what the caller mapped in it.
    #[inline(always)]
    pub unsafe fn unmap_pinned(
        &self,
        g: &CpuGuard<'_, P>,
        lw: &LeafWindow,
        runs: &[PinnedRun],
    ) -> Result<FlushTicket> {
        self.counters.add(g, Stat::Unmaps, 1);
        let base = lw.start().raw();
        let mut gather = Gather::new();
        let mut failed = None;
        // Runs laid out on consecutive pages (the usual load) are cleared as one range.
        let mut i = 0;
        while i < runs.len() {
            let (off, mut end) = (runs[i].off, runs[i].off.wrapping_add(runs[i].len));
            i += 1;
            while i < runs.len() && runs[i].off == end {
                end = end.wrapping_add(runs[i].len);
                i += 1;
            }
            let len = end.wrapping_sub(off);
            let range = match AddrRange::from_start_len(Iova::new(base.wrapping_add(off)), len) {
                Ok(range) => range,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            // SAFETY: the caller's window and what it mapped there (this function's contract).
            if let Err(e) = unsafe { self.table.clear_pinned(lw, off, len) } {
                failed = Some(e);
                break;
            }
            gather.add_range(range);
            self.hw.audit_unmapped(self.cfg.id, core::slice::from_ref(&range));
        }
        self.finish_unmap(g, gather, failed, &[])
    }

    /// Programs the coherence index of the mapped `range` (seed 003; see
    /// [`super::CoherenceIndex`]) through the IOMMU's driver: IOMMUs without one ignore it.
    pub fn set_coherence_index(&self, range: AddrRange<Iova>, index: super::CoherenceIndex) {
        self.hw.set_coherence_index(self.cfg.id, range, index);
    }

    /// Drains every flush queue now: one whole-domain invalidation (unless a later one
    /// already finished), then every queued release. A degraded domain recovers (theory 8).
    /// Nothing to do for a healthy strict domain.
    ///
    /// Errors: [`Error::InvalidationFailed`]; everything stays queued or held back.
    pub fn flush(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        if self.degraded.load(Ordering::Relaxed) {
            return self.recover(g);
        }
        match &self.fq {
            Some(fq) => self.flush_now(g, fq),
            None => Ok(()),
        }
    }

    /// Returns once a flush that started after the unmap of `t` has finished (flushing if
    /// none has yet).
    ///
    /// Errors: [`Error::InvalidationFailed`] if that flush fails: the range of `t` must not
    /// be mapped again yet.
    #[inline]
    pub fn ensure_flushed(&self, g: &CpuGuard<'_, P>, t: FlushTicket) -> Result<()> {
        match &self.fq {
            Some(fq) if !fq.generations().is_flushed(t) => self.flush_for(g, fq),
            _ => Ok(()),
        }
    }

    /// The flush of [`Domain::ensure_flushed`], out of the load path's line.
    #[cold]
    #[inline(never)]
    fn flush_for(&self, g: &CpuGuard<'_, P>, fq: &FlushQueues<Pending>) -> Result<()> {
        self.flush_now(g, fq)
    }

    /// Returns once every unmap that returned before the call has been invalidated: flushes
    /// if some unmap is still queued, recovers a degraded domain (theory 8), issues nothing
    /// otherwise (a healthy strict domain, or every queue empty). The unpin barrier of
    /// registered memory (`crate::pin::UnpinBarrier`).
    ///
    /// Why an empty queue is enough: an unmap returns only after it queued its entry (or
    /// completed an invalidation itself), and an entry leaves its queue only once a flush that
    /// started after its clear has finished (`flushq.rs`, rule 2), under the queue's lock,
    /// which [`Domain::pending`] takes too. So an entry of an unmap that returned before the
    /// call is either seen queued (and the flush below covers it) or already covered. An unmap
    /// that queued nothing (theory 10) stored its ticket in its CPU's record before returning,
    /// so the record shows that ticket (or a later one) uncovered, or a covering flush has
    /// finished (`flushq.rs`, rule 8). An unmap whose invalidation failed has left the domain
    /// degraded until a recovery succeeds.
    ///
    /// Errors: [`Error::InvalidationFailed`]; nothing is proven then.
    pub fn flush_queued(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        if self.degraded.load(Ordering::Relaxed) {
            return self.recover(g);
        }
        if let Some(fq) = &self.fq {
            // Theory 10: an unmap that queued nothing is in its CPU's record.
            if fq.pending() > 0 || fq.unflushed() {
                return self.flush_now(g, fq);
            }
        }
        Ok(())
    }

    /// The unpin barrier of this domain (`crate::pin::UnpinBarrier`, `Strategy::wait_unmapped`):
    /// [`Domain::flush_queued`], once.
    ///
    /// Errors: [`Error::InvalidationFailed`] if that flush (or the recovery of a degraded
    /// domain) fails; the caller then keeps the memory away from reuse (the registry holds
    /// the pages pinned and retries later) instead of spinning or panicking. Process context.
    pub fn wait_unmapped(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        self.flush_queued(g)
    }

    /// Flushes if the oldest queued unmap is due by age, and retries the recovery of a
    /// degraded domain: what a kernel's timer calls so that an idle domain's queues drain
    /// within the age bound.
    ///
    /// Errors: [`Error::InvalidationFailed`] from that flush.
    pub fn poll(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        if self.degraded.load(Ordering::Relaxed) {
            return self.recover(g);
        }
        if let Some(fq) = &self.fq {
            if fq.due(self.platform.monotonic_ns()) {
                self.counters.add(g, Stat::FlushesAged, 1);
                return self.flush_now(g, fq);
            }
        }
        Ok(())
    }

    /// The age check of maps: a failed flush leaves its unmaps queued (counted), and the map
    /// goes on.
    #[inline]
    fn flush_if_due(&self, g: &CpuGuard<'_, P>) {
        if let Some(fq) = &self.fq {
            if fq.due(self.platform.monotonic_ns()) {
                self.flush_aged(g, fq);
            }
        }
    }

    /// The flush of [`Domain::flush_if_due`], out of the map path's line.
    #[cold]
    #[inline(never)]
    fn flush_aged(&self, g: &CpuGuard<'_, P>, fq: &FlushQueues<Pending>) {
        self.counters.add(g, Stat::FlushesAged, 1);
        let _ = self.flush_now(g, fq);
    }

    fn flush_now(&self, g: &CpuGuard<'_, P>, fq: &FlushQueues<Pending>) -> Result<()> {
        match fq.flush(|| self.hw.invalidate_all(self.cfg.id), &mut |p| self.release(g, p)) {
            Ok(ran) => {
                self.counters.add(g, if ran { Stat::Flushes } else { Stat::FlushesCoalesced }, 1);
                Ok(())
            }
            Err(e) => {
                self.counters.add(g, Stat::InvalidationErrors, 1);
                Err(e)
            }
        }
    }

    /// Theory 8: a failed map's clean-up needs no holding; an undone map holds its gather.
    #[cold]
    fn undo_map(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>, why: Error) -> Error {
        self.counters.add(g, Stat::MapFailures, 1);
        let mut gather = Gather::new();
        // The range was mapped whole just now: unmapping it cannot fail (a fresh map has no
        // block to split).
        // SAFETY: `range` is the one the failing `map` call mapped just now, which its caller
        // owns (map's contract) until this call returns.
        let _ = unsafe { self.table.unmap(g, range, &mut gather) };
        self.hold(g, Some(Pending { gather, free: FreeList::none() }));
        why
    }

    /// Theory 8: counts a failed invalidation, holds `p` back (if any) and marks the domain
    /// degraded. Without memory to hold `p`, leaks it: never reused, never freed.
    #[cold]
    fn hold(&self, g: &CpuGuard<'_, P>, p: Option<Pending>) {
        self.counters.add(g, Stat::InvalidationErrors, 1);
        let mut held = self.held.lock();
        if let Some(p) = p {
            if held.try_reserve(1).is_ok() {
                held.push(p);
            } else {
                core::mem::forget(p);
            }
        }
        // INVARIANT: set under the lock, after the push.
        self.degraded.store(true, Ordering::Relaxed);
    }

    /// Theory 8: one whole-domain invalidation (a flush for a deferred domain), then the
    /// release of everything held back; the domain is healthy again.
    ///
    /// Errors: [`Error::InvalidationFailed`]; the domain stays degraded.
    #[cold]
    fn recover(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        let mut held = self.held.lock();
        if !self.degraded.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Everything in `held` was cleared before it was pushed, hence before this starts.
        match &self.fq {
            Some(fq) => self.flush_now(g, fq)?,
            None => {
                self.counters.add(g, Stat::Flushes, 1);
                if let Err(e) = self.hw.invalidate_all(self.cfg.id) {
                    self.counters.add(g, Stat::InvalidationErrors, 1);
                    return Err(e);
                }
            }
        }
        for p in held.drain(..) {
            self.release(g, p);
        }
        self.degraded.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Releases a queued unmap: a flush that started after its clear has finished.
    fn release(&self, g: &CpuGuard<'_, P>, p: Pending) {
        self.release_gather(g, p.gather);
        for &r in p.free.as_slice() {
            let _ = self.release_iova(g, r);
        }
    }

    /// Gives the gathered table pages back. Only called once an invalidation covering the
    /// gathered range has completed (the callers above).
    fn release_gather(&self, g: &CpuGuard<'_, P>, mut gather: Gather) {
        if gather.freed_tables() == 0 {
            // The common unmap detaches no table: nothing to release (the range is forgotten
            // with the gather).
            return;
        }
        for pa in gather.freed_pages() {
            self.hw.audit_table_page_released(self.cfg.id, pa);
        }
        // SAFETY: (a promise, no unsafe operation) every caller runs this after a ranged
        // invalidation of the gathered hull or a whole-domain flush that started after the
        // entries were cleared has completed: the domain's invariant.
        #[allow(unsafe_code)]
        let proof = unsafe { FlushDone::for_all() };
        match gather.release_after_flush(proof, self.table.pool(), g) {
            Ok(0) => {}
            Ok(n) => self.counters.add(g, Stat::TablePagesReleased, n as u64),
            Err(_) => self.counters.add(g, Stat::ReleaseErrors, 1),
        }
    }

    fn release_iova(&self, g: &CpuGuard<'_, P>, r: AddrRange<Iova>) -> Result<()> {
        self.hw.audit_iova_released(self.cfg.id, r);
        match self.iova.free(g, r) {
            Ok(()) => {
                self.counters.add(g, Stat::IovaReleased, 1);
                Ok(())
            }
            Err(e) => {
                self.counters.add(g, Stat::ReleaseErrors, 1);
                Err(e)
            }
        }
    }
}

/// A domain is the unpin barrier of the registries whose buffers it maps
/// ([`Domain::flush_queued`] on the calling CPU).
impl<P: Platform, F: PteFormat, S: IovaSource, H: IotlbInvalidator> crate::pin::UnpinBarrier
    for Domain<'_, P, F, S, H>
{
    fn wait_unmapped(&self) -> Result<()> {
        Domain::wait_unmapped(self, &self.platform.pin_cpu())
    }
}

impl<P: Platform, F: PteFormat, S: IovaSource, H: IotlbInvalidator> Drop for Domain<'_, P, F, S, H> {
    /// Drains the queues and what is held back, and invalidates the whole domain, so that the
    /// page table, dropped next, frees pages no cache reaches. The caller has detached every
    /// device first. If an invalidation fails, the table pages and everything still queued
    /// or held back are leaked instead (theory 8).
    fn drop(&mut self) {
        let g = self.platform.pin_cpu();
        let done = self.flush(&g).and_then(|()| self.hw.invalidate_all(self.cfg.id));
        drop(g);
        if done.is_err() {
            core::mem::forget(self.fq.take());
            core::mem::forget(core::mem::take(self.held.get_mut()));
            return;
        }
        // SAFETY: dropped once, here, and never used again; the whole-domain invalidation
        // above completed after every entry of the table was last used.
        #[allow(unsafe_code)]
        unsafe {
            ManuallyDrop::drop(&mut self.table)
        };
    }
}
