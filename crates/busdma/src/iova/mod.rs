//! The IOVA allocator: one allocation per map, per-CPU caches, O(log n) slow path.
//!
//! # Theory
//!
//! 1. **The job.** An IOMMU domain's bus addresses (IOVAs) form a space `[base, end)`. A map
//!    needs one contiguous IOVA range per load (never one per segment: seed 002 measured a NIC
//!    fall from 700 to 20 Mbit/s that way), honouring the device's constraints: alignment, a
//!    boundary the range must not cross, and a limit (its DMA mask + 1). Fixed holes (an MSI
//!    doorbell window, firmware-reserved RMRR regions) are never handed out. [`IovaRequest`]
//!    states a request; [`IovaSource`] is what the rest of busdma allocates through.
//!
//! 2. **Three layers**, after Bonwick and Adams' vmem (USENIX 2001) and Linux's iova.c, whose
//!    per-CPU "rcaches" came from Peleg et al. (USENIX ATC 2015):
//!    - the **slow path** (`tree`): a balanced tree (treap) of occupied ranges augmented with
//!      the largest free gap of each subtree, as FreeBSD's iommu_gas does; allocation walks it
//!      top-down in O(log n) for n live ranges and places each range at the highest fitting
//!      address (low addresses stay free for narrow DMA masks); a failed request is remembered
//!      per limit so that a full 32-bit window fails at once, and forgotten on the next free;
//!    - **per-CPU magazines** ([`magazine`]): size classes of 1, 2, 4, ..., 64 pages, two
//!      magazines per CPU per class; an allocation or free of a class size usually touches only
//!      the caller's CPU;
//!    - the **depot** ([`magazine::Depot`]): full and empty magazines exchanged between CPUs,
//!      grown on demand and trimmed back by a working-set rule.
//!
//!    [`IovaAllocator`] is all three; with `IovaConfig::caches == false` it is the slow path
//!    alone. [`extent::ExtentAllocator`] is the baseline the lab compares against.
//!
//! 3. **Size classes.** With caches on, a request of up to 64 pages occupies its class size
//!    (its page count rounded up to a power of two) *in the tree*, naturally aligned (a range
//!    of 2^k pages at a multiple of 2^k pages, as Linux's size-aligned IOVAs), so any cached
//!    range of a class serves any request of that class with an alignment up to the class size,
//!    and never crosses a boundary (a power of two at least the size, hence at least the
//!    class); the caller receives exactly the size it asked for. In a space too fragmented
//!    for a naturally aligned range, a class range with the request's own alignment is tried
//!    next. A magazine's top round serves a request only if it honours the request's
//!    alignment, boundary and limit (checked, not assumed); otherwise the request goes to the
//!    tree. If no class range fits, the request is placed exactly (its own size and
//!    alignment) as a plain, uncached allocation, so rounding never makes a request fail that
//!    could fit.
//!
//! 4. **Double frees are detected, never cached.** The tree knows every occupied range; a
//!    class range stays occupied in the tree while it sits in a cache. The *live map*
//!    (`livemap`) keeps one 16-bit mark per page: "a class range starting here is held by a
//!    caller who asked for exactly `n` pages" (`n` ≤ 64, the low 7 bits), and above it the
//!    mark's **owner**: `cpu + 1` for an allocation made under CPU `cpu`'s cache lock (every
//!    cache hit), 0 for one made under no CPU lock (a class range fresh from the tree) or by
//!    a CPU beyond the 511 the tag holds. An owned mark changes only under its owner's lock:
//!    the owner's free clears it by a plain load, compare and store (the fast path holds that
//!    lock already), another CPU's free takes the owner's lock to do the same and gives the
//!    round back to the owner's cache, its home, in that one lock hold (`free_foreign`: a
//!    transmit completion on another core costs one remote lock, as the compare-and-swap on
//!    the mark's remote line did); a mark with no owner is cleared by one compare-and-swap. Either way a mark is cleared exactly once per
//!    allocation however CPUs race (`tests/loom_iova_owner.rs` checks every interleaving of
//!    two CPUs' frees). A free whose mark holds another size is
//!    [`Error::WrongSize`], even one that rounds to the same class (6 pages freed as 7). A free
//!    whose mark is clear goes to the tree, which tells: a plain allocation is freed there; a
//!    class range (already cached) is a [`Error::DoubleFree`]; an unknown start is a
//!    [`Error::DoubleFree`]; a different size is [`Error::WrongSize`]. What is *not* detected:
//!    a free of a range that was reallocated in between (that is the caller's use-after-free;
//!    nothing can tell it from a legitimate free).
//!
//! 5. **Exhaustion.** When the tree has no fit (neither class-size nor exact), every CPU's
//!    magazines and the depot are
//!    flushed back to the tree (each CPU cache sits behind its own lock for exactly this
//!    reason, see [`magazine`]) and the request is retried once; only then is
//!    [`Error::Exhausted`] returned.
//!
//! 6. **Guard pages.** With `IovaConfig::guard_page`, every allocation and window occupies
//!    one more, never-mapped page after its end, so a device overrunning its buffer faults
//!    instead of reaching its neighbour's.
//!
//! 7. **Windows** ([`IovaWindow`]): a map created with a known maximum size and segment count
//!    reserves its IOVA once and carves every load from it without touching the allocator.
//!
//! 8. **The fast path and what CPUs share.** A request of a class size with no alignment beyond
//!    a page and no boundary (the NIC and storage common case) is served by the top round of
//!    the CPU's loaded magazine: `s + size <= limit` is its whole validation (a round is a
//!    range of the space). `alloc` and `free` are inline and either complete there or change
//!    nothing and call one cold function (`alloc_slow`, `free_slow`) that does it all again
//!    with every check, so the hot code holds no error construction and no `Validated`.
//!    Per pair it takes the CPU's own lock twice, as Linux's per-CPU rcache does, and no other
//!    locked instruction: the mark a cache hit stores is owned by this CPU (point 4), so the
//!    free on the same CPU clears it with a plain store under that lock. A cached round carries the address of its mark
//!    ([`magazine::MarkAddr`], set by the free that cached it), so a hit stores the mark with
//!    no lookup; a free finds the mark through a per-CPU one-entry hint
//!    ([`livemap::LeafHint`], through `get_hinted_own`: a key comparison, as the allocator's
//!    hints are never used with another map) instead of a radix walk; when the hint names
//!    another leaf (a CPU whose rounds lie in more than one home region), the free walks the
//!    map out of line and refills the hint, and stays on the fast path (measured: sending
//!    those frees down the slow path cost a quarter of a mixed-size ring's time). It trusts
//!    the mark only for
//!    a page-aligned start and a page count of 1..=64 equal to the mark. Nothing it writes is
//!    shared with another CPU by design: magazines are 128-byte-aligned boxes made with the
//!    cache (never a `Vec` whose heap neighbour is another CPU's), the counters are plain
//!    integers under the CPU's lock, and the tree's lock, the depot's classes and the rare
//!    counters each sit on lines of their own, away from the read-mostly fields every call
//!    reads. What remains shared is the live map's lines, only when two CPUs' hot ranges fall
//!    on one line (see `livemap`, theory 4), which home regions make rare (point 9). Any other request takes the general path (full
//!    validation, the same caches with the request's own checks). Without caches there is
//!    no per-CPU state at all (no CPU lock that would guard nothing): both fast paths find no
//!    CPU entry and hand the call to the tree (`alloc_no_cpu`, `free_no_cpu`), which takes its
//!    own lock alone; a pair costs two locked instructions, as Linux's `alloc_iova` and
//!    `free_iova` (it cost four, 44 vs 30 ns per tree pair on the lab VM).
//!
//! 9. **Home regions.** The marks two CPUs write must not share cache lines, or each cache
//!    hit of a deep ring (hundreds of ranges in flight per CPU, every one cycling through
//!    the CPU's magazines) misses on a line the other CPU just wrote: measured, the CPU time
//!    per pair of a 256-deep ring rose 1.7x with a second thread while a 1-deep ring stayed
//!    flat. The skewed layout of a leaf (`livemap`, theory 4) keeps neighbours apart, but two
//!    CPUs whose rings filled at the same time own interleaved ranges all over one leaf. So a
//!    class range fresh from the tree goes to a *home region* of the CPU whose cache will
//!    cycle it: the space below the request's limit (rounded down to [`HOME_REGION`], one
//!    live-map leaf) is cut into regions counted down from there, and CPU `c` of `n` owns
//!    regions `c`, `c + n`, `c + 2n`, ... . The tree finds the highest fit below a region's
//!    top and places it only at or above the region's floor (`Tree::alloc_above`); a miss
//!    names where the highest fit lies, so the next try is the CPU's first region at or below
//!    it (two searches place a range unless the space changed between them). The CPU
//!    remembers the region it last placed in (a hint, `home`), so a fragmented top of the
//!    space is searched past once, not on every miss. Naturally aligned in a home region
//!    first, then with the request's own alignment in one, then the plain placement of
//!    point 3: regions never make a request fail that could fit, and a CPU whose regions lie
//!    outside the space (a small space, a high CPU number) places as without them. A round
//!    freed on another CPU goes back to its owner's cache (point 4), so it stays home; the
//!    depot, which trades whole magazines between CPUs, can still move rounds to another
//!    CPU's cache (measured: mixed-size rings that exchange magazines often keep some
//!    sharing). Only the placement of fresh class ranges changes: the fast path is untouched.

//! # Locking and execution context
//!
//! Lock order: a CPU's cache, then a depot class, then the tree; all are [`SpinLock`]s held
//! for bounded work (a magazine exchange, one tree operation, or a flush). No one holds two
//! CPUs' caches at once: a free clearing another CPU's mark takes that CPU's lock alone. Nothing sleeps;
//! every method may run with preemption disabled. Per-CPU state is indexed by
//! [`CpuGuard::cpu`]; with caches, a guard for a CPU at or beyond `IovaConfig::cpus` is an error (without them no
//! call looks at the CPU).

pub mod extent;
pub mod livemap;
pub mod magazine;
mod tree;
mod window;

use alloc::boxed::Box;
use alloc::vec::Vec;

pub use extent::ExtentAllocator;
pub use window::IovaWindow;

use crate::addr::{AddrRange, Iova, PAGE_SHIFT, PAGE_SIZE, is_pow2};
use crate::error::{Error, Result};
use crate::platform::{CpuGuard, Platform};
use crate::sync::{AtomicU16, AtomicU32, Ordering, SpinGuard, SpinLock};
use livemap::{LeafHint, LiveMap};
use magazine::{CLASSES, CpuCache, Depot, MAG_ROUNDS, Magazine, MarkAddr};
use tree::{Fit, Kind, Tree};

/// A request for IOVA space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaRequest {
    /// Bytes; non-zero and a multiple of [`PAGE_SIZE`].
    pub size: u64,
    /// A power of two; anything below [`PAGE_SIZE`] means a page.
    pub align: u64,
    /// 0 for none; else a power of two at least `size`: the range must not cross a multiple
    /// of it.
    pub boundary: u64,
    /// Exclusive: the range must end at or below it (the device's DMA mask + 1). Rounded down
    /// to a page.
    pub limit: Iova,
}

impl IovaRequest {
    /// `n` pages, page-aligned, no boundary, no limit beyond the space's own.
    pub fn pages(n: u64) -> Self {
        Self {
            size: n.saturating_mul(PAGE_SIZE),
            align: PAGE_SIZE,
            boundary: 0,
            limit: Iova::new(!(PAGE_SIZE - 1)),
        }
    }
}

/// Anything busdma can allocate IOVA ranges from.
///
/// Execution context: never sleeps; callable with preemption disabled, from any CPU.
pub trait IovaSource: Sync {
    /// Allocates a range of exactly `req.size` bytes honouring `req`.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::Misaligned`] (size not a page multiple),
    /// [`Error::BadAlignment`], [`Error::InvalidArgument`] (bad boundary, CPU out of range),
    /// [`Error::BadSize`] (larger than the space), [`Error::Exhausted`] (no fit below the
    /// limit, after flushing caches), [`Error::NoMemory`].
    fn alloc<P: Platform>(&self, g: &CpuGuard<'_, P>, req: &IovaRequest) -> Result<AddrRange<Iova>>;

    /// Frees a range returned by [`IovaSource::alloc`], as returned.
    ///
    /// Errors: [`Error::DoubleFree`] (already free, or never allocated at that start),
    /// [`Error::WrongSize`], [`Error::BadState`] (a reserved range or a window),
    /// [`Error::OutOfRange`] / [`Error::Misaligned`] (not a range of this space).
    fn free<P: Platform>(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<()>;
}

/// How an [`IovaAllocator`] is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaConfig {
    /// Number of CPUs whose guards may be passed (per-CPU caches are made for each).
    pub cpus: usize,
    /// Per-CPU magazines and depot in front of the tree.
    pub caches: bool,
    /// One unmapped page after every allocation and window.
    pub guard_page: bool,
}

/// Counters a user can read ([`IovaAllocator::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IovaStats {
    /// Successful allocations (cache hits and tree allocations; windows not included).
    pub allocations: u64,
    /// Successful frees.
    pub frees: u64,
    /// Allocations served by a per-CPU magazine.
    pub cache_hits: u64,
    /// Class-size allocations the magazines could not serve.
    pub cache_misses: u64,
    /// Full magazines taken from the depot.
    pub depot_gets: u64,
    /// Times a CPU's magazines of a class were both empty and the depot had no full one.
    pub depot_misses: u64,
    /// Full magazines given to the depot.
    pub depot_puts: u64,
    /// Magazines the depot gave back to the tree by trimming.
    pub depot_trims: u64,
    /// Flushes of every cache (on exhaustion or by [`IovaAllocator::flush_caches`]).
    pub flushes: u64,
    /// Tree nodes visited by searches, insertions, removals and lookups.
    pub tree_nodes_visited: u64,
    /// Requests refused at once by a remembered failure.
    pub fast_failures: u64,
    /// Bytes of IOVA held in magazines and the depot.
    pub bytes_cached: u64,
    /// Ranges held by callers (allocations not freed yet; windows and reservations excluded).
    pub live_ranges: u64,
    /// Windows currently reserved.
    pub windows: u64,
}

/// A validated request, limit clipped to the space.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Validated {
    pub size: u64,
    pub align: u64,
    pub boundary: u64,
    pub limit: u64,
}

fn check_space(space: AddrRange<Iova>) -> Result<()> {
    for v in [space.start().raw(), space.end().raw()] {
        if v % PAGE_SIZE != 0 {
            return Err(Error::Misaligned { value: v, align: PAGE_SIZE });
        }
    }
    Ok(())
}

impl Validated {
    #[inline]
    pub(crate) fn new(req: &IovaRequest, space: AddrRange<Iova>) -> Result<Self> {
        let size = req.size;
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        if size % PAGE_SIZE != 0 {
            return Err(Error::Misaligned { value: size, align: PAGE_SIZE });
        }
        if !is_pow2(req.align) {
            return Err(Error::BadAlignment { align: req.align });
        }
        if req.boundary != 0 && !is_pow2(req.boundary) {
            return Err(Error::InvalidArgument {
                what: "boundary (not a power of two)",
                value: req.boundary,
            });
        }
        if req.boundary != 0 && req.boundary < size {
            return Err(Error::InvalidArgument {
                what: "boundary (smaller than the size)",
                value: req.boundary,
            });
        }
        if size > space.len() {
            return Err(Error::BadSize { size, limit: space.len() });
        }
        let limit = (req.limit.raw() & !(PAGE_SIZE - 1)).min(space.end().raw());
        if limit < space.start().raw() + size {
            return Err(Error::Exhausted { size, limit: req.limit.raw() });
        }
        Ok(Self { size, align: req.align.max(PAGE_SIZE), boundary: req.boundary, limit })
    }

    fn fit(&self, guard: u64) -> Fit {
        Fit {
            size: self.size,
            total: self.size + guard,
            align: self.align,
            boundary: self.boundary,
            limit: self.limit,
        }
    }

    /// The lowest start in `[lo, hi)` honouring the request (used by the extent baseline).
    pub(crate) fn lowest_fit(&self, lo: u64, hi: u64) -> Option<u64> {
        let hi = hi.min(self.limit);
        let mut s = lo.checked_add(self.align - 1)? & !(self.align - 1);
        if self.boundary != 0 && (s ^ (s + self.size - 1)) & !(self.boundary - 1) != 0 {
            s = (s + self.size - 1) & !(self.boundary - 1);
        }
        (s.checked_add(self.size)? <= hi).then_some(s)
    }
}

/// A CPU's cache on its own cache lines. 128 bytes: two 64-byte lines, because x86's adjacent
/// line prefetcher pulls lines in pairs, so 64-byte padding would still share.
#[repr(align(128))]
struct Padded<T>(T);

/// Largest class: 2^(CLASSES-1) pages.
const MAX_CLASS_PAGES: u64 = 1 << (CLASSES - 1);

/// Bytes of IOVA in one home region for class ranges (theory 9): the span of one live-map
/// leaf, so two CPUs' hot marks never share a leaf, hence never a line.
pub const HOME_REGION: u64 = (livemap::LEAF_PAGES as u64) << PAGE_SHIFT;
/// Tree searches a fresh class range makes at most for a home region before it is placed
/// as without regions (two suffice unless the space changed between them).
const HOME_TRIES: usize = 4;

/// A live mark's low bits: the allocation's page count, 1..=[`MAX_CLASS_PAGES`] (theory 4).
const MARK_OWNER_SHIFT: u32 = 7;
/// The page count of a mark.
const MARK_PAGES_MASK: u64 = (1 << MARK_OWNER_SHIFT) - 1;
/// CPUs `0..MAX_OWNER` own their marks (tag `cpu + 1` in the 9 bits above the page count);
/// the marks of CPUs beyond have no owner (tag 0) and are cleared by compare-and-swap.
const MAX_OWNER: usize = (1 << (16 - MARK_OWNER_SHIFT)) - 1;
/// The "CPU" of a mark set under no CPU's lock: no owner.
const UNOWNED: usize = usize::MAX;
const _: () =
    assert!(MAX_CLASS_PAGES <= MARK_PAGES_MASK && MAX_OWNER << MARK_OWNER_SHIFT <= u16::MAX as usize);

/// What one CPU owns: its magazines and its live-map leaf hint, behind its own lock.
struct PerCpu {
    cache: CpuCache,
    hint: LeafHint,
}

/// The IOVA allocator (see the module documentation).
///
/// Field layout (theory 8): the fields every fast-path call reads and nobody writes after
/// `new` come first; everything a CPU writes on a slower path (the tree's lock, the depot's
/// classes, the rare counters) sits on cache lines of its own, so it never invalidates the
/// read-mostly line in the other CPUs' caches.
///
/// # Invariants
///
/// Every round in the CPUs' magazines and the depot was pushed with the address of its live
/// mark in `live` (the mark of `page_of(round)`), and every CPU's `hint` is empty or was
/// filled by `live`. (Rounds enter the caches only in the free paths, after clearing that
/// very mark; `live` drops with the caches.) A live mark naming an owner CPU changes only
/// while that CPU's entry of `cpus` is locked (theory 4).
pub struct IovaAllocator {
    space: AddrRange<Iova>,
    cfg: IovaConfig,
    guard: u64,
    cpus: Box<[Padded<SpinLock<PerCpu>>]>,
    live: LiveMap,
    depot: Depot,
    tree: Padded<SpinLock<Tree>>,
    counters: Padded<SpinLock<Counters>>,
    /// Per CPU with caches: which of its home regions its last fresh class range went to
    /// (theory 9). A hint read and written by its CPU on the slow path under the tree's
    /// lock; any value is safe.
    home: Box<[AtomicU32]>,
}

/// Counters that no other lock covers (bumped on rare paths only).
#[derive(Default)]
struct Counters {
    flushes: u64,
    trims: u64,
    windows: u64,
}

impl core::fmt::Debug for IovaAllocator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IovaAllocator")
            .field("space", &self.space)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// The class of a size in bytes (pages rounded up to a power of two), if it has one: a
/// non-zero multiple of a page, at most the largest class. A zero size has no class (an empty
/// range is never a class range).
#[inline]
fn class_of(size: u64) -> Option<usize> {
    if size.wrapping_sub(1) >= MAX_CLASS_PAGES << PAGE_SHIFT || size % PAGE_SIZE != 0 {
        return None;
    }
    CLASS_OF_PAGES.get((size >> PAGE_SHIFT) as usize).map(|&c| usize::from(c))
}

/// The class of a page count in `1..=MAX_CLASS_PAGES` (index 0 unused): ceil(log2(pages)), a
/// load instead of a bit scan on the hot paths.
const CLASS_OF_PAGES: [u8; MAX_CLASS_PAGES as usize + 1] = {
    let mut t = [0u8; MAX_CLASS_PAGES as usize + 1];
    let mut n = 2;
    while n <= MAX_CLASS_PAGES as usize {
        t[n] = (usize::BITS - (n - 1).leading_zeros()) as u8;
        n += 1;
    }
    t
};

#[inline]
fn class_bytes(c: usize) -> u64 {
    PAGE_SIZE << c
}

impl IovaAllocator {
    /// An allocator over `space` (page-aligned, non-empty).
    ///
    /// Errors: [`Error::Misaligned`] (space not page-aligned), [`Error::InvalidArgument`]
    /// (`cfg.cpus == 0`), [`Error::NoMemory`].
    pub fn new(space: AddrRange<Iova>, cfg: IovaConfig) -> Result<Self> {
        check_space(space)?;
        if cfg.cpus == 0 {
            return Err(Error::InvalidArgument { what: "IovaConfig::cpus (zero)", value: 0 });
        }
        // Without caches no CPU state is made: the fast paths find no CPU entry and go
        // straight to the slow paths, which take the tree's lock alone (theory 8).
        let ncpus = if cfg.caches { cfg.cpus } else { 0 };
        let mut cpus = Vec::new();
        cpus.try_reserve_exact(ncpus).map_err(|_| Error::NoMemory { requested: ncpus as u64 * 128 })?;
        for cpu in 0..ncpus {
            let cache = CpuCache::for_cpu(MAG_ROUNDS, cpu)?;
            cpus.push(Padded(SpinLock::new(PerCpu { cache, hint: LeafHint::default() })));
        }
        let mut home = Vec::new();
        home.try_reserve_exact(ncpus).map_err(|_| Error::NoMemory { requested: ncpus as u64 * 4 })?;
        home.extend((0..ncpus).map(|_| AtomicU32::new(0)));
        let home = home.into_boxed_slice();
        let pages = if cfg.caches { space.end().raw() >> PAGE_SHIFT } else { 1 };
        Ok(Self {
            space,
            cfg,
            guard: if cfg.guard_page { PAGE_SIZE } else { 0 },
            cpus: cpus.into_boxed_slice(),
            live: LiveMap::new(pages)?,
            depot: Depot::new(),
            tree: Padded(SpinLock::new(Tree::new(space.start().raw(), space.end().raw())?)),
            counters: Padded(SpinLock::new(Counters::default())),
            home,
        })
    }

    /// The space this allocator covers.
    pub fn space(&self) -> AddrRange<Iova> {
        self.space
    }

    /// The configuration it was built with.
    pub fn config(&self) -> IovaConfig {
        self.cfg
    }

    /// The live map's index of the page at `addr`: its page number (not its offset in the
    /// space: a subtraction less on the hot paths; the map is made for pages up to the
    /// space's end, so every page of the space has its own mark).
    #[inline]
    fn page_of(addr: u64) -> u64 {
        addr >> PAGE_SHIFT
    }

    #[inline]
    fn cpu_cache(&self, cpu: usize) -> Result<&SpinLock<PerCpu>> {
        self.cpus.get(cpu).map(|p| &p.0).ok_or(Self::bad_cpu(cpu))
    }

    #[cold]
    fn bad_cpu(cpu: usize) -> Error {
        Error::InvalidArgument { what: "CPU index (beyond IovaConfig::cpus)", value: cpu as u64 }
    }

    /// Marks the class range at `start` live, held by a caller who asked for `size` bytes
    /// (at most the largest class), with no owner: no CPU lock is held here, so the mark is
    /// cleared by compare-and-swap (theory 4).
    #[inline]
    fn mark_live(&self, start: u64, size: u64) -> Result<()> {
        let page = Self::page_of(start);
        let mark = match self.live.get(page) {
            Some(m) => m,
            None => self.live.get_or_create(page)?,
        };
        // Release: a free on another CPU that reads this mark (by its CAS) must see the range
        // as this allocation's; the caller's own hand-off orders the rest.
        mark.store(Self::mark_of(size, UNOWNED), Ordering::Release);
        Ok(())
    }

    /// The live mark of a class-size allocation of `size` bytes made under the lock of CPU
    /// `cpu` (theory 4): its exact page count (1..=64, so never 0, which means "not live") in
    /// the low [`MARK_OWNER_SHIFT`] bits, and above them `cpu + 1` if that fits, else 0 (no
    /// owner). [`UNOWNED`] as `cpu` gives the mark of an allocation made under no CPU lock.
    #[inline]
    fn mark_of(size: u64, cpu: usize) -> u16 {
        let tag = if cpu < MAX_OWNER { (cpu as u16 + 1) << MARK_OWNER_SHIFT } else { 0 };
        (size >> PAGE_SHIFT) as u16 | tag
    }

    /// What a fast free on CPU `cpu` ORs with the freed page count to get the one mark it may
    /// clear (theory 4): the mark of that many pages owned by `cpu`; for a CPU beyond
    /// [`MAX_OWNER`] (whose marks have no owner), low bits that make a page count of 127,
    /// which no mark holds (at most 64), so its fast free never matches.
    #[inline]
    fn owned_by(cpu: usize) -> u16 {
        if cpu < MAX_OWNER { (cpu as u16 + 1) << MARK_OWNER_SHIFT } else { MARK_PAGES_MASK as u16 }
    }

    /// Runs `f` on the tree; on [`Error::Exhausted`] flushes every cache and runs it once more.
    fn with_retry<T>(&self, mut f: impl FnMut(&mut Tree) -> Result<T>) -> Result<T> {
        let r = f(&mut self.tree.0.lock());
        match r {
            Err(Error::Exhausted { .. } | Error::AlreadyMapped { .. }) if self.cfg.caches => {
                self.flush_caches();
                f(&mut self.tree.0.lock())
            }
            r => r,
        }
    }

    #[inline]
    fn range(start: u64, size: u64) -> Result<AddrRange<Iova>> {
        AddrRange::from_start_len(Iova::new(start), size)
    }

    /// A class range of fit `natural` placed in one of CPU `cpu`'s home regions (theory 9),
    /// under the tree's lock `t`: `None` when none of them has room (the caller places it as
    /// without regions).
    fn alloc_home(&self, t: &mut Tree, natural: &Fit, cpu: usize) -> Result<Option<u64>> {
        let n = self.cfg.cpus as u64;
        let Some(cursor) = self.home.get(cpu) else { return Ok(None) };
        if n < 2 {
            return Ok(None);
        }
        let base = natural.limit & !(HOME_REGION - 1);
        let lo = self.space.start().raw();
        let c = cpu as u64;
        let mut k = u64::from(cursor.load(Ordering::Relaxed));
        for _ in 0..HOME_TRIES {
            // CPU `c`'s `k`-th region is region `c + k n` counted down from `base`.
            let j = k.checked_mul(n).and_then(|x| x.checked_add(c));
            let top = j.and_then(|j| j.checked_mul(HOME_REGION)).and_then(|d| base.checked_sub(d));
            let room = top.filter(|&top| top >= lo.saturating_add(natural.total));
            let Some(top) = room else {
                // Past the bottom of the space: start again from the top, once.
                if k == 0 {
                    return Ok(None);
                }
                k = 0;
                continue;
            };
            let floor = top.saturating_sub(HOME_REGION).max(lo);
            match t.alloc_above(&Fit { limit: top, ..*natural }, floor, Kind::Class)? {
                Ok(s) => {
                    cursor.store(k as u32, Ordering::Relaxed);
                    return Ok(Some(s));
                }
                // Nothing fits below this region's top: maybe above it (a region passed
                // over when it was full); start again from the top, once.
                Err(None) if k > 0 => k = 0,
                Err(None) => return Ok(None),
                // The highest fit lies at `s`, below the region: every region above `s` is
                // full for this fit. Next: this CPU's first region at or below `s`.
                Err(Some(s)) => {
                    let region = (base - s - 1) / HOME_REGION;
                    k = region.saturating_sub(c).div_ceil(n);
                    if k > u64::from(u32::MAX) {
                        return Ok(None);
                    }
                }
            }
        }
        Ok(None)
    }

    /// The slow path for a class-size request: a class range (cacheable), else an exact
    /// plain allocation (not cacheable: rounding must never make a fitting request fail);
    /// when neither fits, flush every cache and try both once more. A class range is placed
    /// in a home region of `cpu` (the CPU whose cache will hold it) where one has room
    /// (theory 9).
    #[cold]
    fn alloc_class_slow(&self, v: &Validated, c: usize, cpu: usize) -> Result<AddrRange<Iova>> {
        let cb = class_bytes(c);
        // Naturally aligned first; a boundary is a power of two at least the size, hence at
        // least the class size, so such a range never crosses one. In a space too fragmented
        // for that, a class range with the request's own alignment and boundary (still
        // cacheable: every cache hit checks its round against the request).
        let natural = Fit {
            size: cb,
            total: cb + self.guard,
            align: v.align.max(cb),
            boundary: v.boundary,
            limit: v.limit,
        };
        let loose = Fit { align: v.align, ..natural };
        for attempt in 0..2 {
            let mut t = self.tree.0.lock();
            // Home first, naturally aligned, then with the request's alignment (a fragmented
            // space may hold no naturally aligned range), then anywhere, in the same order.
            let home = match self.alloc_home(&mut t, &natural, cpu)? {
                None if loose != natural => self.alloc_home(&mut t, &loose, cpu)?,
                h => h,
            };
            let class = match home {
                Some(s) => Ok(s),
                None => match t.alloc(&natural, Kind::Class) {
                    Err(Error::Exhausted { .. }) if loose != natural => t.alloc(&loose, Kind::Class),
                    r => r,
                },
            };
            match class {
                Ok(s) => {
                    drop(t);
                    if let Err(e) = self.mark_live(s, v.size) {
                        // It cannot be tracked, so it must not be handed out.
                        let _ = self.tree.0.lock().free(s, cb, cb + self.guard, Kind::Class, None);
                        return Err(e);
                    }
                    return Self::range(s, v.size);
                }
                Err(Error::Exhausted { .. }) => {}
                Err(e) => return Err(e),
            }
            match t.alloc(&v.fit(self.guard), Kind::Allocated) {
                Ok(s) => return Self::range(s, v.size),
                Err(Error::Exhausted { .. }) if attempt == 0 => {}
                Err(e) => return Err(e),
            }
            drop(t);
            self.flush_caches();
        }
        Err(Error::Exhausted { size: v.size, limit: v.limit })
    }

    /// Lets the depot trim class `c` after a magazine exchange, returning what it trimmed to
    /// the tree.
    #[cold]
    fn trim(&self, c: usize) {
        self.give_back(c, self.depot.trim(c));
    }

    #[allow(clippy::vec_box, reason = "the depot's own boxed magazines, handed over as they are")]
    fn give_back(&self, c: usize, mags: Vec<Box<Magazine>>) {
        if mags.is_empty() {
            return;
        }
        let cb = class_bytes(c);
        let mut t = self.tree.0.lock();
        for &s in mags.iter().flat_map(|m| m.rounds()) {
            let r = t.free(s, cb, cb + self.guard, Kind::Class, None);
            debug_assert!(r.is_ok(), "a cached round was not a class range: {r:?}");
        }
        drop(t);
        self.counters.0.lock().trims += 1;
    }

    /// Reserves `range` (page-aligned, inside the space) so it is never handed out: an MSI
    /// doorbell window, a firmware-reserved region. Permanent.
    ///
    /// Errors: [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::AlreadyMapped`] if part
    /// of it is allocated (cached ranges are flushed first, so only live ones conflict).
    pub fn reserve(&self, range: AddrRange<Iova>) -> Result<()> {
        let (s, e) = (range.start().raw(), range.end().raw());
        for v in [s, e] {
            if v % PAGE_SIZE != 0 {
                return Err(Error::Misaligned { value: v, align: PAGE_SIZE });
            }
        }
        if !self.space.contains_range(&range) {
            let bad = if s < self.space.start().raw() { s } else { e };
            return Err(Error::OutOfRange { addr: bad, limit: self.space.end().raw() });
        }
        self.with_retry(|t| t.occupy(s, e, Kind::Reserved))
    }

    /// Reserves a window for a map of at most `max_size` bytes in at most `max_segments`
    /// segments: `max_size` rounded up to pages plus one page per segment, aligned to
    /// `req_align` (at least a page), ending at or below `limit`.
    ///
    /// Errors: as [`IovaSource::alloc`]; [`Error::ZeroSize`] for a zero size or segment count.
    pub fn reserve_window<P: Platform>(
        &self,
        g: &CpuGuard<'_, P>,
        max_size: u64,
        max_segments: u64,
        req_align: u64,
        limit: Iova,
    ) -> Result<IovaWindow> {
        let _ = g;
        if max_size == 0 || max_segments == 0 {
            return Err(Error::ZeroSize);
        }
        let overflow = Error::Overflow { base: max_size, len: max_segments };
        let size = max_size
            .checked_add(PAGE_SIZE - 1)
            .map(|v| v & !(PAGE_SIZE - 1))
            .and_then(|v| max_segments.checked_mul(PAGE_SIZE).and_then(|x| v.checked_add(x)))
            .ok_or(overflow)?;
        let req = IovaRequest { size, align: req_align, boundary: 0, limit };
        let v = Validated::new(&req, self.space)?;
        let s = self.with_retry(|t| t.alloc(&v.fit(self.guard), Kind::Window))?;
        self.counters.0.lock().windows += 1;
        Ok(IovaWindow::new(Self::range(s, size)?))
    }

    /// Gives a window's range back to the allocator.
    ///
    /// Errors: [`Error::BadState`] if the window is not one of this allocator's.
    pub fn release_window<P: Platform>(&self, g: &CpuGuard<'_, P>, w: IovaWindow) -> Result<()> {
        let _ = g;
        let r = w.range();
        if !self.space.contains_range(&r) {
            return Err(Error::BadState { what: "release_window of a window from another allocator" });
        }
        self.tree.0.lock().free(r.start().raw(), r.len(), r.len() + self.guard, Kind::Window, None)?;
        self.counters.0.lock().windows -= 1;
        Ok(())
    }

    /// Returns every cached range (all CPUs' magazines and the depot) to the tree.
    pub fn flush_caches(&self) {
        if !self.cfg.caches {
            return;
        }
        let guard = self.guard;
        for cpu in self.cpus.iter() {
            let mut pc = cpu.0.lock();
            let mut t = self.tree.0.lock();
            pc.cache.drain(|c, s| {
                let cb = class_bytes(c);
                let r = t.free(s, cb, cb + guard, Kind::Class, None);
                debug_assert!(r.is_ok(), "a cached round was not a class range: {r:?}");
            });
        }
        self.depot.drain(|c, s| {
            let cb = class_bytes(c);
            let r = self.tree.0.lock().free(s, cb, cb + guard, Kind::Class, None);
            debug_assert!(r.is_ok(), "a cached round was not a class range: {r:?}");
        });
        self.counters.0.lock().flushes += 1;
    }

    /// A snapshot of the counters (takes every lock in turn; not for hot paths).
    pub fn stats(&self) -> IovaStats {
        let mut st = IovaStats::default();
        let mut cached_ranges = 0;
        let mut tally = |rounds: [usize; CLASSES]| {
            for (c, n) in rounds.iter().enumerate() {
                st.bytes_cached += *n as u64 * class_bytes(c);
                cached_ranges += *n as u64;
            }
        };
        for cpu in self.cpus.iter() {
            let pc = cpu.0.lock();
            tally(pc.cache.rounds());
            let s = pc.cache.stats;
            st.cache_hits += s.hits;
            st.cache_misses += s.misses;
            st.depot_gets += s.depot_gets;
            st.depot_misses += s.depot_misses;
            st.depot_puts += s.depot_puts;
            st.frees += s.cached_frees;
        }
        let (depot_rounds, _) = self.depot.census();
        tally(depot_rounds);
        let t = self.tree.0.lock();
        // Windows are not allocations, and a class range returned by the caches was counted
        // as freed when the caches took it.
        let (allocs, frees) = (t.stats.allocs, t.stats.frees);
        st.allocations = st.cache_hits + allocs[Kind::Allocated as usize] + allocs[Kind::Class as usize];
        st.frees += frees[Kind::Allocated as usize];
        st.tree_nodes_visited = t.stats.visited;
        st.fast_failures = t.stats.fast_failures;
        st.live_ranges = t.counts[0] + t.counts[1] - cached_ranges;
        drop(t);
        let k = self.counters.0.lock();
        st.depot_trims = k.trims;
        st.flushes = k.flushes;
        st.windows = k.windows;
        st
    }

    /// Bytes of the space not occupied in the tree (cached ranges count as occupied).
    pub fn free_bytes(&self) -> u64 {
        self.tree.0.lock().free_bytes()
    }

    /// Bytes the tree holds for the range starting at `start` (its size, rounded up to its
    /// class if it has one, plus the guard page), or `None` if no range starts there.
    pub fn occupied_len(&self, start: Iova) -> Option<u64> {
        self.tree.0.lock().occupied_len(start.raw()).map(|(len, _)| len)
    }

    /// Checks the tree's invariants (O(n); for tests and debugging).
    pub fn check_invariants(&self) -> core::result::Result<(), &'static str> {
        self.tree.0.lock().check()
    }
}

impl IovaSource for IovaAllocator {
    #[inline(always)]
    fn alloc<P: Platform>(&self, g: &CpuGuard<'_, P>, req: &IovaRequest) -> Result<AddrRange<Iova>> {
        // The fast path (theory 8): a class-size request with no alignment beyond a page and
        // no boundary, served by the top round of the CPU's loaded magazine, which comes with
        // the address of its live mark. It either completes or changes nothing and hands the
        // request to `alloc_slow`, which does it all again with every check.
        let size = req.size;
        if req.align <= PAGE_SIZE && req.boundary == 0 {
            if let Some(c) = class_of(size) {
                let Some(pc) = self.cpus.get(g.cpu()) else {
                    return self.alloc_no_cpu(g, req);
                };
                let mut pc = pc.0.lock();
                let hit = pc.cache.pop_with(c, |s| {
                    // A round is a class range of the space, so `s + size` cannot wrap; and as
                    // it is page-aligned, `<= limit` is `<=` the limit rounded down to a page
                    // (and to the space, which every round is inside).
                    s.checked_add(size).filter(|&e| e <= req.limit.raw())
                });
                if let Some((s, mark, end)) = hit {
                    // SAFETY: every round in this allocator's caches carries the address of
                    // its live mark in `self.live` (the type's invariant), which lives as
                    // long as `self`.
                    let mark = unsafe { &*mark.as_ptr() };
                    // Owned by this CPU: we hold its lock (theory 4). Release: a free on
                    // another CPU that reads this mark must see the range as this allocation's.
                    mark.store(Self::mark_of(size, g.cpu()), Ordering::Release);
                    drop(pc);
                    return AddrRange::new(Iova::new(s), Iova::new(end));
                }
            }
        }
        self.alloc_slow(g, req)
    }

    #[inline(always)]
    fn free<P: Platform>(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<()> {
        // The fast path (theory 8): the range's live mark, found through the CPU's leaf hint,
        // holds exactly its page count and names this CPU as its owner, so it is a live class
        // range (an allocation set the mark; nothing else does) whose mark only changes under
        // the lock we take: clear it by a plain store and push the round. Anything else (a
        // mark of another CPU or of none, a clear mark, another size) changes nothing and goes
        // to `free_slow`, which does it all again with every check.
        let (s, len) = (range.start().raw(), range.len());
        // A page-aligned start (a mark is per page) and 1..=64 whole pages (the mark holds
        // 1..=64; a larger count must not reach the owner bits), in one test: `len - PAGE_SIZE`
        // (wrapping) is a multiple of a page below 64 pages exactly for those lengths.
        const FAST_FREE_MASK: u64 = !((MAX_CLASS_PAGES - 1) << PAGE_SHIFT);
        if (len.wrapping_sub(PAGE_SIZE) | (s & (PAGE_SIZE - 1))) & FAST_FREE_MASK == 0 {
            let pages = (len >> PAGE_SHIFT) as usize;
            // SAFETY: the test above holds only for 1..=64 pages, and the table has an entry
            // for each of 0..=MAX_CLASS_PAGES (64).
            let c = unsafe { *CLASS_OF_PAGES.get_unchecked(pages) };
            let Some(pc) = self.cpus.get(g.cpu()) else {
                return self.free_no_cpu(g, range);
            };
            {
                let mut pc = pc.0.lock();
                let PerCpu { cache, hint } = &mut *pc;
                let page = Self::page_of(s);
                // SAFETY: `hint` is this CPU's, used with no map but `self.live` (the type's
                // invariant). (And a start outside the space finds no mark: the hint's key is
                // compared whole, so no page aliases another, and past the space's end in the
                // last leaf no allocation ever set one.)
                let mark = match unsafe { self.live.get_hinted_own(hint, page) } {
                    Some(mark) => Some(mark),
                    // Another leaf than the last one: walk to it here (theory 9: a CPU's
                    // rounds may lie in more than one home region) rather than redo the
                    // whole free on the slow path.
                    None => self.walk_hint(hint, page),
                };
                if let Some(mark) = mark {
                    // `pages` is 1..=64 (checked above), so this is exactly the mark of that
                    // many pages owned by this CPU, or for a CPU whose marks have no owner a
                    // value no mark holds (`free_slow` then).
                    if mark.load(Ordering::Acquire) == pages as u16 | Self::owned_by(g.cpu()) {
                        // This CPU owns the mark and we hold its lock: nothing else can clear
                        // or set it until we release (theory 4), so a plain store clears it
                        // exactly once. Release: pairs with whoever reads it next.
                        mark.store(0, Ordering::Release);
                        if cache.push(usize::from(c), s, MarkAddr::of(mark)) {
                            return Ok(());
                        }
                        return self.free_full(pc, usize::from(c), s, mark);
                    }
                    return self.free_foreign(pc, g, range, usize::from(c), mark);
                }
            }
        }
        self.free_slow(g, range)
    }
}

impl IovaAllocator {
    /// The mark of `page` through a walk of the live map, refilling the CPU's `hint` (a fast
    /// free whose hint remembered another leaf). A page outside the space finds no mark (the
    /// walk refuses a page beyond the map's levels, and past the space's end inside them no
    /// mark was ever set): the free then goes to `free_slow`, which reports it. Out of line:
    /// the fast path stays a comparison and a load when the hint holds.
    #[inline(never)]
    fn walk_hint(&self, hint: &mut LeafHint, page: u64) -> Option<&AtomicU16> {
        self.live.get_hinted(hint, page)
    }

    /// A fast free whose mark is not this CPU's of that size: when it is another CPU's live
    /// mark of that size (a range freed on another core than the one that allocated it),
    /// clear it under the owner's lock and give the round back to the owner's cache, its
    /// home, in that one lock hold (the owner's next allocation takes it with no depot
    /// exchange); anything else goes to `free_slow`.
    #[cold]
    #[inline(never)]
    fn free_foreign<P: Platform>(
        &self,
        pc: SpinGuard<'_, PerCpu>,
        g: &CpuGuard<'_, P>,
        range: AddrRange<Iova>,
        c: usize,
        mark: &AtomicU16,
    ) -> Result<()> {
        drop(pc);
        let (s, len) = (range.start().raw(), range.len());
        let seen = mark.load(Ordering::Acquire);
        let tag = usize::from(seen >> MARK_OWNER_SHIFT);
        if u64::from(seen) & MARK_PAGES_MASK != len >> PAGE_SHIFT || tag == 0 || tag - 1 == g.cpu() {
            return self.free_slow(g, range);
        }
        let Ok(owner) = self.cpu_cache(tag - 1) else {
            return self.free_slow(g, range);
        };
        let mut oc = owner.lock();
        // An owned mark changes only under its owner's lock (theory 4): if it still reads as
        // it did, it is still that live allocation's, and only we can clear it now.
        if mark.load(Ordering::Acquire) != seen {
            drop(oc);
            return self.free_slow(g, range);
        }
        mark.store(0, Ordering::Release);
        let (cached, touched) = oc.cache.free(c, s, MarkAddr::of(mark), &self.depot);
        drop(oc);
        if touched || !cached {
            return self.free_spilled(c, s, cached, touched);
        }
        Ok(())
    }

    /// Every allocation the fast path did not complete: the fast path again with every
    /// check (counting a miss, refilling the hint), the general path, the tree.
    #[cold]
    #[inline(never)]
    fn alloc_slow<P: Platform>(&self, g: &CpuGuard<'_, P>, req: &IovaRequest) -> Result<AddrRange<Iova>> {
        if !self.cfg.caches {
            return self.alloc_tree(req);
        }
        let size = req.size;
        if req.align <= PAGE_SIZE && req.boundary == 0 {
            if let Some(c) = class_of(size) {
                let limit = (req.limit.raw() & !(PAGE_SIZE - 1)).min(self.space.end().raw());
                let mut pc = self.cpu_cache(g.cpu())?.lock();
                let PerCpu { cache, hint } = &mut *pc;
                let (hit, touched) = cache.alloc(c, |s| s + size <= limit, &self.depot);
                if let Some(s) = hit {
                    let Some(mark) = self.live.get_hinted(hint, Self::page_of(s)) else {
                        drop(pc);
                        return Err(self.untracked_round(c, s));
                    };
                    // Owned by this CPU (we hold its lock). Release: as in `alloc`.
                    mark.store(Self::mark_of(size, g.cpu()), Ordering::Release);
                    drop(pc);
                    if touched {
                        self.trim(c);
                    }
                    return Self::range(s, size);
                }
                drop(pc);
                if touched {
                    self.trim(c);
                }
                return self.alloc_class_slow(&Validated::new(req, self.space)?, c, g.cpu());
            }
        }
        self.alloc_general(g, req)
    }

    /// Every free the fast path did not complete: full validation, the mark through a walk
    /// when the hint misses, errors, plain ranges and double frees through the tree.
    #[cold]
    #[inline(never)]
    fn free_slow<P: Platform>(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<()> {
        if !self.cfg.caches {
            return self.free_tree(range);
        }
        let (s, len) = self.check_freed(&range)?;
        let mut class_total = None;
        if let Some(c) = class_of(len) {
            class_total = Some(class_bytes(c) + self.guard);
            let cpu = self.cpu_cache(g.cpu())?;
            let mut pc = cpu.lock();
            if let Some(mark) = self.live.get_hinted(&mut pc.hint, Self::page_of(s)) {
                // Under this CPU's lock when the mark is this CPU's or no one's (one lock
                // hold, as the fast path); another CPU's mark under that CPU's lock alone.
                let mut cleared = self.clear_mark(mark, len, Some(g.cpu()))?;
                if cleared == Cleared::ElsewhereOwned {
                    drop(pc);
                    cleared = self.clear_mark(mark, len, None)?;
                    pc = cpu.lock();
                }
                match cleared {
                    Cleared::Yes => {
                        let (cached, touched) = pc.cache.free(c, s, MarkAddr::of(mark), &self.depot);
                        drop(pc);
                        if touched || !cached {
                            return self.free_spilled(c, s, cached, touched);
                        }
                        return Ok(());
                    }
                    Cleared::NotLive | Cleared::ElsewhereOwned => {}
                    Cleared::OtherSize(pages) => {
                        return Err(Error::WrongSize { addr: s, given: len, actual: pages << PAGE_SHIFT });
                    }
                }
            }
        }
        self.tree.0.lock().free(s, len, len + self.guard, Kind::Allocated, class_total)
    }
}

impl IovaAllocator {
    /// A freed range's start and length, if it is a page-aligned range of the space.
    #[inline]
    fn check_freed(&self, range: &AddrRange<Iova>) -> Result<(u64, u64)> {
        let (s, len) = (range.start().raw(), range.len());
        if !self.space.contains_range(range) {
            return Err(Error::OutOfRange { addr: s, limit: self.space.end().raw() });
        }
        if (s | len) % PAGE_SIZE != 0 {
            return Err(Error::Misaligned { value: s | len, align: PAGE_SIZE });
        }
        Ok((s, len))
    }

    /// Any free without caches: the tree alone, under its lock.
    #[inline(never)]
    fn free_tree(&self, range: AddrRange<Iova>) -> Result<()> {
        let (s, len) = self.check_freed(&range)?;
        self.tree.0.lock().free(s, len, len + self.guard, Kind::Allocated, None)
    }
}

/// What [`IovaAllocator::clear_mark`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cleared {
    /// The mark held the freed size and this call cleared it.
    Yes,
    /// The mark was clear (a double free, or a plain range: the tree tells).
    NotLive,
    /// The mark holds another page count.
    OtherSize(u64),
    /// The mark is owned by a CPU whose lock the caller does not hold, and the caller holds
    /// one (so this call could not take the owner's): nothing changed; call again holding none.
    ElsewhereOwned,
}

impl IovaAllocator {
    /// Clears `mark` if it holds a live allocation of `len` bytes (theory 4): under the lock
    /// of the CPU the mark names, by a plain load and store, or by compare-and-swap when it
    /// names none. `held`: the CPU whose cache lock the caller holds, if any; holding one, it
    /// never takes another (no two CPU locks at once) and answers `ElsewhereOwned` instead;
    /// holding none, it takes at most one, the owner's.
    fn clear_mark(&self, mark: &AtomicU16, len: u64, held: Option<usize>) -> Result<Cleared> {
        let mut seen = mark.load(Ordering::Acquire);
        loop {
            let pages = u64::from(seen) & MARK_PAGES_MASK;
            if seen == 0 {
                return Ok(Cleared::NotLive);
            }
            if pages != len >> PAGE_SHIFT {
                return Ok(Cleared::OtherSize(pages));
            }
            let tag = usize::from(seen >> MARK_OWNER_SHIFT);
            if tag == 0 {
                match mark.compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return Ok(Cleared::Yes),
                    Err(now) => seen = now,
                }
                continue;
            }
            if held == Some(tag - 1) {
                // Ours, and we hold our lock: nothing else can change it (see below).
                mark.store(0, Ordering::Release);
                return Ok(Cleared::Yes);
            }
            if held.is_some() {
                return Ok(Cleared::ElsewhereOwned);
            }
            // The owner's lock: an owned mark changes only under it, so what we read under it
            // stays until we release.
            let _owner = self.cpu_cache(tag - 1)?.lock();
            let now = mark.load(Ordering::Acquire);
            if now == seen {
                mark.store(0, Ordering::Release);
                return Ok(Cleared::Yes);
            }
            // Freed meanwhile (and maybe allocated again, by any CPU): decide on what is there.
            seen = now;
        }
    }

    /// The fast paths found no CPU entry: without caches there are none (the tree alone);
    /// with them, `g` names a CPU beyond `IovaConfig::cpus` (the slow path reports it).
    #[cold]
    #[inline(never)]
    fn alloc_no_cpu<P: Platform>(&self, g: &CpuGuard<'_, P>, req: &IovaRequest) -> Result<AddrRange<Iova>> {
        if self.cfg.caches { self.alloc_slow(g, req) } else { self.alloc_tree(req) }
    }

    /// As [`IovaAllocator::alloc_no_cpu`], for a free.
    #[cold]
    #[inline(never)]
    fn free_no_cpu<P: Platform>(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<()> {
        if self.cfg.caches { self.free_slow(g, range) } else { self.free_tree(range) }
    }

    /// Any request without caches: the tree alone, under its lock.
    #[inline(never)]
    fn alloc_tree(&self, req: &IovaRequest) -> Result<AddrRange<Iova>> {
        let v = Validated::new(req, self.space)?;
        let s = self.tree.0.lock().alloc(&v.fit(self.guard), Kind::Allocated)?;
        Self::range(s, v.size)
    }

    /// A request the fast path does not take: no caches, no class, or an alignment or
    /// boundary the top round cannot be assumed to honour.
    #[inline(never)]
    fn alloc_general<P: Platform>(&self, g: &CpuGuard<'_, P>, req: &IovaRequest) -> Result<AddrRange<Iova>> {
        if !self.cfg.caches {
            return self.alloc_tree(req);
        }
        let v = Validated::new(req, self.space)?;
        let cache = self.cpu_cache(g.cpu())?;
        let Some(c) = class_of(v.size) else {
            let s = self.with_retry(|t| t.alloc(&v.fit(self.guard), Kind::Allocated))?;
            return Self::range(s, v.size);
        };
        let (size, align, limit) = (v.size, v.align, v.limit);
        let boundary_mask = !v.boundary.wrapping_sub(1);
        let fits = |s: u64| {
            s & (align - 1) == 0
                && s + size <= limit
                && (v.boundary == 0 || (s ^ (s + size - 1)) & boundary_mask == 0)
        };
        let mut pc = cache.lock();
        let PerCpu { cache, hint } = &mut *pc;
        let (hit, touched) = cache.alloc(c, fits, &self.depot);
        if let Some(s) = hit {
            let Some(mark) = self.live.get_hinted(hint, Self::page_of(s)) else {
                drop(pc);
                return Err(self.untracked_round(c, s));
            };
            // Owned by this CPU (we hold its lock). Release: as in `alloc`.
            mark.store(Self::mark_of(size, g.cpu()), Ordering::Release);
        }
        drop(pc);
        if touched {
            self.trim(c);
        }
        match hit {
            Some(s) => Self::range(s, size),
            None => self.alloc_class_slow(&v, c, g.cpu()),
        }
    }

    /// A cached round whose live mark does not exist. Cannot happen (the mark's leaf is made
    /// with the range and never removed); keep the range out of circulation rather than hand
    /// it out untracked.
    #[cold]
    fn untracked_round(&self, c: usize, s: u64) -> Error {
        let cb = class_bytes(c);
        let _ = self.tree.0.lock().free(s, cb, cb + self.guard, Kind::Class, None);
        Error::BadState { what: "a cached IOVA round without its live mark" }
    }

    /// A cached free whose loaded magazine is full (its mark already cleared): swap, or
    /// trade with the depot, then let the depot trim.
    #[cold]
    #[inline(never)]
    fn free_full(&self, mut pc: SpinGuard<'_, PerCpu>, c: usize, s: u64, mark: &AtomicU16) -> Result<()> {
        let (cached, touched) = pc.cache.free(c, s, MarkAddr::of(mark), &self.depot);
        drop(pc);
        self.free_spilled(c, s, cached, touched)
    }

    /// The end of a cached free that exchanged a magazine with the depot (`touched`: let the
    /// depot trim) or could not cache the round (no empty magazine could be made: free it
    /// to the tree).
    #[cold]
    fn free_spilled(&self, c: usize, s: u64, cached: bool, touched: bool) -> Result<()> {
        if touched {
            self.trim(c);
        }
        if !cached {
            let cb = class_bytes(c);
            self.tree.0.lock().free(s, cb, cb + self.guard, Kind::Class, None)?;
        }
        Ok(())
    }
}
