//! Per-CPU magazines and the depot (Bonwick and Adams, "Magazines and Vmem", USENIX 2001).
//!
//! # Theory
//!
//! 1. **Rounds and magazines.** A *round* is the start address of a cached range of one size
//!    class. A *magazine* is a stack of at most `capacity` rounds (a `Vec` whose capacity is
//!    fixed when it is made, so pushing never allocates).
//! 2. **Two magazines per CPU per class**, `loaded` and `previous`. An allocation pops from
//!    `loaded`; if it is empty and `previous` is full, the two swap; a free pushes to `loaded`;
//!    if it is full and `previous` is empty, they swap. So a CPU that alternates allocations and
//!    frees, or runs up to `capacity` of either in a row, never leaves its own cache: the
//!    depot is touched at most once per `capacity` operations (Bonwick's argument for two
//!    magazines rather than one: with one, a workload oscillating at a magazine boundary
//!    would hit the depot on every operation).
//! 3. **The depot** holds full and empty magazines per class, behind one [`SpinLock`] per class.
//!    A CPU whose `loaded` and `previous` are both empty (allocating) gives its empty
//!    `previous` to the depot and takes a full one; both full (freeing) gives a full and takes
//!    an empty one (or makes a new one). Cross-CPU frees need nothing special: a range freed on
//!    CPU 1 lands in CPU 1's magazine and flows through the depot to whoever allocates.
//! 4. **Growth and trimming** (no fixed cap). The depot grows as CPUs free more than they
//!    allocate. Every [`TRIM_INTERVAL`] depot operations of a class it trims: the smallest
//!    number of full magazines it held during the interval was never needed by anyone, so
//!    that many go back to the tree (the *working-set* rule of Bonwick's kmem, driven by
//!    operation count instead of a timer, which a `no_std` core does not have). Empty
//!    magazines are trimmed by the same rule and simply dropped.
//! 5. **Locking.** The allocator keeps each CPU's cache in its own [`SpinLock`], taken by the
//!    owning CPU (uncontended, so one atomic pair) and, rarely, by a flush of all caches from
//!    another CPU; this is what lets a flush reach every CPU's rounds. Lock order: CPU cache,
//!    then depot class, then tree; trimmed magazines are handed back to the caller so the
//!    tree lock is taken after the depot lock is released.

use alloc::vec::Vec;

use crate::sync::SpinLock;

/// Size classes: ranges of 1, 2, 4, ..., 64 pages (4 KiB to 256 KiB). 64 KiB covers a TSO
/// frame and a typical storage request, 256 KiB the largest common block I/O; larger
/// mappings are rare enough that the slow path's O(log n) is no bottleneck for them.
pub const CLASSES: usize = 7;

/// Rounds per magazine. With two magazines per CPU, a CPU reaches the depot at most once per
/// 32 operations, which amortises the depot's lock (~50 ns with its cache miss) to under 2 ns
/// per operation; a larger magazine would only hoard more IOVA space per CPU
/// (2 x 32 x 7 classes rounds per CPU at most).
pub const MAG_ROUNDS: usize = 32;

/// Depot operations of one class between two trims: long enough that a burst (a NIC ring
/// refill of 256 buffers is 8 magazines) does not trim what the next burst needs, short
/// enough that an idle class gives its space back after a few hundred exchanges.
pub const TRIM_INTERVAL: u32 = 256;

/// One CPU's counters (read by the allocator's `stats`).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuStats {
    /// Allocations served from a magazine.
    pub hits: u64,
    /// Allocations the magazines could not serve.
    pub misses: u64,
    /// Frees that went into a magazine.
    pub cached_frees: u64,
    /// Full magazines taken from the depot.
    pub depot_gets: u64,
    /// Full magazines given to the depot.
    pub depot_puts: u64,
}

/// The two magazines of one class on one CPU.
#[derive(Debug, Default)]
struct ClassCache {
    loaded: Vec<u64>,
    previous: Vec<u64>,
}

/// One CPU's magazines, all classes.
#[derive(Debug)]
pub struct CpuCache {
    capacity: usize,
    classes: [ClassCache; CLASSES],
    /// This CPU's counters.
    pub stats: CpuStats,
}

/// The depot's state for one class.
#[derive(Debug, Default)]
struct DepotClass {
    full: Vec<Vec<u64>>,
    empty: Vec<Vec<u64>>,
    min_full: usize,
    min_empty: usize,
    ops: u32,
    trimmed: u64,
}

/// The depot: full and empty magazines per class, shared by all CPUs.
#[derive(Debug)]
pub struct Depot {
    capacity: usize,
    classes: [SpinLock<DepotClass>; CLASSES],
}

/// An empty magazine that can hold `capacity` rounds, or `None` if memory ran out.
fn new_magazine(capacity: usize) -> Option<Vec<u64>> {
    let mut v = Vec::new();
    v.try_reserve_exact(capacity).ok()?;
    Some(v)
}

impl CpuCache {
    /// An empty cache whose magazines hold `capacity` rounds (the allocator uses
    /// [`MAG_ROUNDS`]; the loom model uses tiny magazines to reach the depot quickly).
    pub fn new(capacity: usize) -> Self {
        Self { capacity, classes: Default::default(), stats: CpuStats::default() }
    }

    /// Pops the top round of class `c` if `fits(start)` accepts it (the request's limit,
    /// alignment and boundary). Returns `None` on a miss (the caller goes to the tree). Only
    /// the top round is tried: scanning a magazine would cost more than the tree for the
    /// rare request whose constraints differ from its CPU's usual ones.
    #[inline]
    pub fn alloc(&mut self, c: usize, fits: impl Fn(u64) -> bool, depot: &Depot) -> Option<u64> {
        let cc = &mut self.classes[c];
        if cc.loaded.is_empty() {
            if !cc.previous.is_empty() {
                core::mem::swap(&mut cc.loaded, &mut cc.previous);
            } else if let Some(full) = depot.get_full(c, &mut cc.previous) {
                // `previous` (empty) went to the depot; `loaded` (empty) becomes previous.
                cc.previous = core::mem::replace(&mut cc.loaded, full);
                self.stats.depot_gets += 1;
            }
        }
        match cc.loaded.last() {
            Some(&s) if fits(s) => {
                cc.loaded.pop();
                self.stats.hits += 1;
                Some(s)
            }
            _ => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Pushes a round of class `c`. Returns `false` if it could not be cached (no magazine
    /// could be made): the caller frees it to the tree.
    #[inline]
    pub fn free(&mut self, c: usize, start: u64, depot: &Depot) -> bool {
        let cap = self.capacity;
        let cc = &mut self.classes[c];
        // A `Vec` with less capacity than a magazine is an empty placeholder (first use of the
        // class on this CPU, or the slot a magazine left when it went to the depot).
        for m in [&mut cc.loaded, &mut cc.previous] {
            if m.capacity() < cap {
                let Some(fresh) = new_magazine(cap) else { return false };
                *m = fresh;
            }
        }
        if cc.loaded.len() == cap {
            if cc.previous.is_empty() {
                core::mem::swap(&mut cc.loaded, &mut cc.previous);
            } else {
                // Both full: the previous one goes to the depot, an empty one comes back.
                let Some(empty) = depot.put_full(c, &mut cc.previous) else { return false };
                cc.previous = core::mem::replace(&mut cc.loaded, empty);
                self.stats.depot_puts += 1;
            }
        }
        cc.loaded.push(start);
        self.stats.cached_frees += 1;
        true
    }

    /// Moves every round of every class out, calling `sink(class, start)` for each.
    pub fn drain(&mut self, mut sink: impl FnMut(usize, u64)) {
        for (c, cc) in self.classes.iter_mut().enumerate() {
            for s in cc.loaded.drain(..).chain(cc.previous.drain(..)) {
                sink(c, s);
            }
        }
    }

    /// Rounds held, per class.
    pub fn rounds(&self) -> [usize; CLASSES] {
        core::array::from_fn(|c| self.classes[c].loaded.len() + self.classes[c].previous.len())
    }
}

impl Depot {
    /// An empty depot for magazines of `capacity` rounds.
    pub fn new(capacity: usize) -> Self {
        Self { capacity, classes: core::array::from_fn(|_| SpinLock::new(DepotClass::default())) }
    }

    /// Takes a full magazine of class `c`, giving `empty` (replaced by an empty `Vec`) in
    /// exchange; `None` if the depot has no full magazine (`empty` is left in place).
    fn get_full(&self, c: usize, empty: &mut Vec<u64>) -> Option<Vec<u64>> {
        let mut d = self.classes[c].lock();
        let full = d.full.pop()?;
        d.min_full = d.min_full.min(d.full.len());
        if empty.capacity() >= self.capacity {
            // Never fails to find room in practice; if it does, the magazine is just dropped.
            if d.empty.try_reserve(1).is_ok() {
                d.empty.push(core::mem::take(empty));
            }
        }
        d.ops += 1;
        Some(full)
    }

    /// Gives the full magazine `full` (replaced by an empty `Vec`), returning an empty one;
    /// `None` if no empty magazine exists and none can be made (`full` is left in place).
    fn put_full(&self, c: usize, full: &mut Vec<u64>) -> Option<Vec<u64>> {
        let mut d = self.classes[c].lock();
        let empty = match d.empty.pop() {
            Some(e) => {
                d.min_empty = d.min_empty.min(d.empty.len());
                e
            }
            None => new_magazine(self.capacity)?,
        };
        if d.full.try_reserve(1).is_err() {
            d.empty.push(empty);
            return None;
        }
        d.full.push(core::mem::take(full));
        d.ops += 1;
        Some(empty)
    }

    /// If class `c` has done [`TRIM_INTERVAL`] operations since its last trim, removes the full
    /// magazines nobody needed during the interval and returns them (the caller frees their
    /// rounds to the tree); drops unneeded empty ones.
    pub fn trim(&self, c: usize) -> Vec<Vec<u64>> {
        let mut d = self.classes[c].lock();
        if d.ops < TRIM_INTERVAL {
            return Vec::new();
        }
        let excess_full = d.min_full;
        let keep_empty = d.empty.len() - d.min_empty;
        let at = d.full.len() - excess_full;
        let out = d.full.split_off(at);
        d.empty.truncate(keep_empty);
        d.trimmed += out.len() as u64;
        d.ops = 0;
        d.min_full = d.full.len();
        d.min_empty = d.empty.len();
        out
    }

    /// Removes every full magazine of every class, calling `sink(class, start)` for each round.
    pub fn drain(&self, mut sink: impl FnMut(usize, u64)) {
        for (c, l) in self.classes.iter().enumerate() {
            let full = {
                let mut d = l.lock();
                d.min_full = 0;
                core::mem::take(&mut d.full)
            };
            for s in full.into_iter().flatten() {
                sink(c, s);
            }
        }
    }

    /// Full magazines and rounds held, per class, and magazines trimmed so far (all classes).
    pub fn census(&self) -> ([usize; CLASSES], u64) {
        let mut rounds = [0; CLASSES];
        let mut trimmed = 0;
        for (c, l) in self.classes.iter().enumerate() {
            let d = l.lock();
            rounds[c] = d.full.iter().map(Vec::len).sum();
            trimmed += d.trimmed;
        }
        (rounds, trimmed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn alternating_alloc_free_never_reaches_the_depot() {
        let depot = Depot::new(4);
        let mut cpu = CpuCache::new(4);
        for i in 0..4 {
            assert!(cpu.free(0, i * 0x1000, &depot));
        }
        for _ in 0..1000 {
            let s = cpu.alloc(0, |_| true, &depot).unwrap();
            assert!(cpu.free(0, s, &depot));
        }
        assert_eq!((cpu.stats.depot_gets, cpu.stats.depot_puts), (0, 0));
    }

    #[test]
    fn rounds_flow_between_cpus_through_the_depot() {
        let depot = Depot::new(2);
        let (mut a, mut b) = (CpuCache::new(2), CpuCache::new(2));
        for i in 0..10 {
            assert!(a.free(3, i, &depot));
        }
        // a holds 4 in its two magazines, the depot 3 full magazines (6 rounds).
        assert_eq!(depot.census().0[3], 6);
        let mut got = Vec::new();
        while let Some(s) = b.alloc(3, |_| true, &depot) {
            got.push(s);
        }
        assert_eq!(got.len(), 6);
        a.drain(|_, s| got.push(s));
        got.sort_unstable();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_round_above_the_limit_is_a_miss_not_a_hit() {
        let depot = Depot::new(2);
        let mut a = CpuCache::new(2);
        assert!(a.free(0, 0x10_0000, &depot));
        assert_eq!(a.alloc(0, |s| s + 0x1000 <= 0x10_0000, &depot), None);
        assert_eq!(a.alloc(0, |s| s + 0x1000 <= 0x10_1000, &depot), Some(0x10_0000));
    }

    #[test]
    fn depot_trims_what_the_working_set_did_not_use() {
        let depot = Depot::new(1);
        let (mut a, mut b) = (CpuCache::new(1), CpuCache::new(1));
        for i in 0..12 {
            assert!(a.free(0, i, &depot));
        }
        assert_eq!(depot.census().0[0], 10);
        // b churns through the depot, three rounds out and back each time: its working set
        // is one or two depot magazines; the other eight sat unused.
        let mut trimmed = Vec::new();
        for _ in 0..TRIM_INTERVAL {
            let got: Vec<u64> = (0..3).map(|_| b.alloc(0, |_| true, &depot).unwrap()).collect();
            for s in got {
                assert!(b.free(0, s, &depot));
            }
            trimmed.extend(depot.trim(0));
        }
        let mut all: Vec<u64> = trimmed.into_iter().flatten().collect();
        assert!(all.len() >= 6, "only {} rounds trimmed", all.len());
        depot.drain(|_, s| all.push(s));
        a.drain(|_, s| all.push(s));
        b.drain(|_, s| all.push(s));
        all.sort_unstable();
        assert_eq!(all, (0..12).collect::<Vec<_>>(), "rounds lost or duplicated");
    }
}
