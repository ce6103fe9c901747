//! The descriptor pool: table pages from per-CPU caches in front of a shared depot in front of
//! the platform.
//!
//! # Theory
//!
//! 1. **Layers.** Each CPU has a cache of up to [`CPU_CACHE_PAGES`] pages, touched only by the
//!    thread holding that CPU's [`CpuGuard`] (the guard keeps every other thread off the CPU,
//!    so the cache needs no lock). Behind the caches, a depot of up to [`DEPOT_MAX_PAGES`]
//!    pages under a [`SpinLock`]; behind the depot, [`Platform::alloc_table_page`] and
//!    [`Platform::free_table_page`]. A CPU whose cache is empty takes half a cache's worth
//!    from the depot in one lock hold; a CPU whose cache is full gives half to the depot; a
//!    full depot gives pages back to the platform. This is seed 002's per-CPU PTED pools: the
//!    common map/unmap pays no lock and no call into the platform.
//! 2. **Every cached page is zero** (and clean in memory, for non-coherent walkers). A page
//!    coming back from a page table is zeroed at free ([`TablePool::free_dirty`]), which the
//!    caller may do only once no walker can reach it (after the flush; see `Gather`).
//! 3. **Fault injection.** [`TablePool::fail_nth_alloc`] makes the n-th following allocation
//!    fail with [`Error::NoMemory`], whatever layer would have served it. It is an ordinary
//!    counter check in every build, so tests drive the production path. The page-table code
//!    routes its other allocation (room in a `Gather` for detached tables) through the same
//!    counter.
//! 4. **Counters** ([`PoolStats`]) are plain relaxed counters: statistics, not synchronisation.
//!
//! # Execution context
//!
//! Never sleeps; callable with preemption disabled (it needs the caller's guard).

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{KernVa, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::platform::{CpuGuard, Platform, TablePage};
use crate::sync::SpinLock;

/// Pages one CPU caches: 32 pages = 128 KiB per CPU. A map of up to 64 MiB needs at most 32
/// leaf tables plus a few upper ones, so ordinary bursts stay inside the cache, and a refill or
/// drain moves 16 pages per depot lock hold, amortising the lock over 16 allocations.
pub const CPU_CACHE_PAGES: usize = 32;
/// Pages the depot keeps before returning pages to the platform: 512 pages = 2 MiB, the table
/// pages of a 1 GiB mapping in 4 KiB pages; beyond that, memory goes back to the system.
pub const DEPOT_MAX_PAGES: usize = 512;
/// Pages moved between a CPU cache and the depot at once: half a cache, so a CPU that
/// alternates alloc and free at the boundary does not bounce on the lock.
const BATCH: usize = CPU_CACHE_PAGES / 2;

/// Counters of one pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Allocations served.
    pub allocs: u64,
    /// Pages given back to the pool.
    pub frees: u64,
    /// Pages obtained from the platform.
    pub from_platform: u64,
    /// Pages returned to the platform.
    pub to_platform: u64,
    /// Pages held by the pool now (CPU caches and depot).
    pub cached: u64,
    /// Allocations failed on purpose by [`TablePool::fail_nth_alloc`].
    pub injected_failures: u64,
}

struct CpuCache {
    len: usize,
    pages: [Option<TablePage>; CPU_CACHE_PAGES],
}

/// One CPU's cache, on its own cache line (64 bytes covers x86-64 and Arm cores) so CPUs do
/// not false-share.
#[repr(align(64))]
struct CpuSlot(UnsafeCell<CpuCache>);

/// Table pages for page tables, with per-CPU caches.
///
/// # Invariants
///
/// - `cpus[c]` is accessed only by the holder of a [`CpuGuard`] for CPU `c` of `platform`.
/// - Every page held (caches, depot) came from `platform.alloc_table_page`, is zero, and is
///   unreachable by any walker.
pub struct TablePool<'m, P: Platform> {
    platform: &'m P,
    cpus: Box<[CpuSlot]>,
    depot: SpinLock<Vec<TablePage>>,
    allocs: AtomicU64,
    frees: AtomicU64,
    from_platform: AtomicU64,
    to_platform: AtomicU64,
    cached: AtomicU64,
    injected: AtomicU64,
    /// Allocation attempts so far (the fault injector's clock).
    attempts: AtomicU64,
    /// The attempt number that fails; 0 = none.
    fail_at: AtomicU64,
}

// SAFETY: the per-CPU caches are reached only through a `CpuGuard` of the pool's platform
// for that CPU (checked at every entry), which excludes every other thread from the CPU while
// it lives; everything else is atomic or behind the spin lock. A `TablePage` is an owned
// handle to a page no walker reaches while the pool holds it.
unsafe impl<P: Platform> Sync for TablePool<'_, P> {}
// SAFETY: as above; the pool holds `&P` (P: Sync) and plain data.
unsafe impl<P: Platform> Send for TablePool<'_, P> {}

impl<'m, P: Platform> TablePool<'m, P> {
    /// An empty pool over `platform`'s table pages.
    pub fn new(platform: &'m P) -> Self {
        let empty = || CpuCache { len: 0, pages: [const { None }; CPU_CACHE_PAGES] };
        Self {
            platform,
            cpus: (0..platform.num_cpus()).map(|_| CpuSlot(UnsafeCell::new(empty()))).collect(),
            depot: SpinLock::new(Vec::new()),
            allocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            from_platform: AtomicU64::new(0),
            to_platform: AtomicU64::new(0),
            cached: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            fail_at: AtomicU64::new(0),
        }
    }

    /// The platform the pages come from.
    pub fn platform(&self) -> &'m P {
        self.platform
    }

    /// Makes the `n`-th allocation from now (1 = the next) fail with [`Error::NoMemory`];
    /// `None` cancels. One failure per call.
    pub fn fail_nth_alloc(&self, n: Option<u64>) {
        let at = n.map_or(0, |n| self.attempts.load(Ordering::Relaxed).saturating_add(n.max(1)));
        self.fail_at.store(at, Ordering::Relaxed);
    }

    /// Allocation attempts so far (including failed ones): lets a test count the allocation
    /// points a call goes through.
    pub fn alloc_attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PoolStats {
            allocs: l(&self.allocs),
            frees: l(&self.frees),
            from_platform: l(&self.from_platform),
            to_platform: l(&self.to_platform),
            cached: l(&self.cached),
            injected_failures: l(&self.injected),
        }
    }

    /// One allocation attempt of `bytes` by the page-table code (a table page here, room in a
    /// `Gather` in unmap): fails it if the fault injector says so.
    ///
    /// Errors: [`Error::NoMemory`] when the injector fires.
    pub(crate) fn fault_point(&self, bytes: u64) -> Result<()> {
        let attempt = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        if attempt == self.fail_at.load(Ordering::Relaxed) {
            self.fail_at.store(0, Ordering::Relaxed);
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(Error::NoMemory { requested: bytes });
        }
        Ok(())
    }

    /// The cache of the guard's CPU, after checking the guard belongs to this pool's platform.
    #[allow(clippy::mut_from_ref)]
    fn cache(&self, g: &CpuGuard<'_, P>) -> Result<&mut CpuCache> {
        if !core::ptr::eq(g.platform(), self.platform) {
            return Err(Error::BadState { what: "CPU guard of another platform" });
        }
        let slot = self
            .cpus
            .get(g.cpu())
            .ok_or(Error::OutOfRange { addr: g.cpu() as u64, limit: self.cpus.len() as u64 })?;
        // SAFETY: `g` is a live guard of this platform for CPU `g.cpu()`, so no other thread
        // runs on that CPU until it drops; the pool never holds this borrow across a call that
        // could re-enter the pool, so the `&mut` is unique.
        Ok(unsafe { &mut *slot.0.get() })
    }

    /// One zeroed, direct-mapped table page.
    ///
    /// Errors: [`Error::NoMemory`] (the platform has none, or the fault injector fired);
    /// [`Error::BadState`] if `g` belongs to another platform.
    pub fn alloc(&self, g: &CpuGuard<'_, P>) -> Result<TablePage> {
        let cache = self.cache(g)?;
        self.fault_point(PAGE_SIZE)?;
        if cache.len == 0 {
            let mut depot = self.depot.lock();
            while cache.len < BATCH {
                let Some(p) = depot.pop() else { break };
                cache.pages[cache.len] = Some(p);
                cache.len += 1;
            }
        }
        let page = if cache.len > 0 {
            cache.len -= 1;
            self.cached.fetch_sub(1, Ordering::Relaxed);
            cache.pages[cache.len].take().ok_or(Error::BadState { what: "pool cache slot empty" })?
        } else {
            let p = self.platform.alloc_table_page()?;
            self.from_platform.fetch_add(1, Ordering::Relaxed);
            p
        };
        self.allocs.fetch_add(1, Ordering::Relaxed);
        Ok(page)
    }

    /// Takes back a page that is still zero and was never reachable by a walker (e.g. the
    /// loser of an install race, or a spare split page).
    pub fn free_zeroed(&self, g: &CpuGuard<'_, P>, page: TablePage) {
        self.frees.fetch_add(1, Ordering::Relaxed);
        let Ok(cache) = self.cache(g) else {
            // A guard of another platform: the page cannot be cached safely; give it back.
            // SAFETY: the caller's contract: zero, unreachable, from this platform.
            unsafe { self.platform.free_table_page(page) };
            self.to_platform.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if cache.len == CPU_CACHE_PAGES {
            let mut spill: [Option<TablePage>; BATCH] = [const { None }; BATCH];
            for s in spill.iter_mut() {
                cache.len -= 1;
                *s = cache.pages[cache.len].take();
            }
            let mut depot = self.depot.lock();
            for p in spill.into_iter().flatten() {
                if depot.len() < DEPOT_MAX_PAGES && depot.try_reserve(1).is_ok() {
                    depot.push(p);
                } else {
                    self.cached.fetch_sub(1, Ordering::Relaxed);
                    self.to_platform.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: pages in the pool are unreachable by any walker (invariant).
                    unsafe { self.platform.free_table_page(p) };
                }
            }
        }
        cache.pages[cache.len] = Some(page);
        cache.len += 1;
        self.cached.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes back a page a page table used, zeroing it (and cleaning it to memory, for
    /// non-coherent walkers) so the next user finds it empty.
    ///
    /// The caller guarantees no walker can reach the page any more: it was detached and the
    /// invalidation covering it has completed (a [`super::FlushDone`] was presented), or it
    /// was never published.
    pub(crate) fn free_dirty(&self, g: &CpuGuard<'_, P>, page: TablePage) {
        for i in 0..TablePage::ENTRIES {
            if let Some(e) = page.entry(i) {
                e.store(0, Ordering::Relaxed);
            }
        }
        self.platform.cache_clean(KernVa::new(page.kva().raw()), PAGE_SIZE);
        self.free_zeroed(g, page);
    }
}

impl<P: Platform> Drop for TablePool<'_, P> {
    fn drop(&mut self) {
        let mut pages: Vec<TablePage> = core::mem::take(self.depot.get_mut());
        for slot in self.cpus.iter_mut() {
            let c = slot.0.get_mut();
            pages.extend(c.pages.iter_mut().take(c.len).filter_map(Option::take));
            c.len = 0;
        }
        for p in pages {
            // SAFETY: pages in the pool came from this platform and are unreachable (invariant).
            unsafe { self.platform.free_table_page(p) };
        }
    }
}
