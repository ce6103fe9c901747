//! Per-CPU magazines and the depot (Bonwick and Adams, "Magazines and Vmem", USENIX 2001).
//!
//! # Theory
//!
//! 1. **Rounds and magazines.** A *round* is the start address of a cached range of one size
//!    class. A *magazine* ([`Magazine`]) is a boxed stack of at most `capacity` rounds
//!    ([`MAG_ROUNDS`] slots), 128-byte aligned so that no other CPU's data shares its lines.
//!    A CPU's two magazines per class are made with its cache and every depot exchange trades
//!    one magazine for another, so the hot paths never allocate and never check for a
//!    missing magazine: a pop is a length test and a load, a push a length test and a store.
//!    Each round is kept with a [`MarkAddr`], the address of its live mark, which the
//!    magazine stores and hands back but never dereferences (the allocator's hit stores the
//!    mark through it instead of looking it up).
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
//! 6. **Magazines go home.** A cache made for a CPU ([`CpuCache::for_cpu`]) stamps each full
//!    magazine it gives the depot with its CPU; taking a full one, it looks through the last
//!    [`HOME_SCAN`] of its class for its own before taking the most recent. A CPU whose
//!    sizes wander (a ring of mixed sizes trades magazines every few dozen operations) then
//!    gets its own rounds back, whose live marks lie in its own home regions (`iova` theory
//!    9) and whose magazine lines it wrote last, instead of another CPU's. Rounds still flow
//!    between CPUs when one frees what another allocates: a CPU with none of its own in
//!    reach takes any.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::error::{Error, Result};
use crate::sync::{AtomicU16, SpinLock};

/// Size classes: ranges of 1, 2, 4, ..., 64 pages (4 KiB to 256 KiB). 64 KiB covers a TSO
/// frame and a typical storage request, 256 KiB the largest common block I/O; larger
/// mappings are rare enough that the slow path's O(log n) is no bottleneck for them.
pub const CLASSES: usize = 7;

/// Rounds per magazine. With two magazines per CPU, a CPU reaches the depot at most once per
/// 64 operations of a class in one direction. A ring of mixed sizes is a random walk of each
/// class's count around its mean, and a walk leaves a window of `w` rounds after about `w²`
/// steps: doubling the magazine from 32 made the exchanges of such rings about four times
/// rarer, and each exchange is a lock on a line every CPU writes (measured in BENCHMARKS.md,
/// "IOVA fast path", round 5). The price is IOVA held per CPU: 2 x 64 rounds of each of the
/// 7 classes at most, 63.5 MiB of IOVA per CPU if every class is full (Linux keeps 2 x 127
/// per class and CPU).
pub const MAG_ROUNDS: usize = 64;

/// The CPU of a cache or magazine that has none (the loom models' caches; a magazine no
/// cache gave to the depot yet).
pub const NO_HOME: u32 = u32::MAX;

/// Full magazines of a class the depot looks through, most recent first, for one the taking
/// CPU gave (theory 6): a bounded scan under the class lock, a shift of at most this many
/// pointers to take one out of the middle.
pub const HOME_SCAN: usize = 8;

/// Depot operations of one class between two trims: long enough that a burst (a NIC ring
/// refill of 256 buffers is 8 magazines) does not trim what the next burst needs, short
/// enough that an idle class gives its space back after a few hundred exchanges.
pub const TRIM_INTERVAL: u32 = 256;

/// One CPU's counters (read by the allocator's `stats`). Plain integers under the CPU's own
/// lock, on the CPU's own cache lines: counting costs an add, never a shared line.
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
    /// Times both magazines were empty and the depot had no full one either.
    pub depot_misses: u64,
    /// Full magazines given to the depot.
    pub depot_puts: u64,
}

/// A stack of at most `capacity` rounds (the cache's capacity, at most [`MAG_ROUNDS`]).
///
/// Aligned to 128 bytes (two cache lines: x86's adjacent-line prefetcher pulls lines in
/// pairs) and sized to a multiple of it, so the top of one CPU's magazine never shares a line
/// with a magazine another CPU is using.
///
/// # Invariants
///
/// `len <= MAG_ROUNDS`; `rounds[..len]` are the rounds, bottom first, and `marks[..len]` the
/// [`MarkAddr`] pushed with each.
#[derive(Debug)]
#[repr(C, align(128))]
pub struct Magazine {
    len: usize,
    /// The CPU whose cache last gave it to the depot full ([`NO_HOME`] until then): the depot
    /// hands a CPU its own magazines back first (theory 6).
    home: u32,
    rounds: [u64; MAG_ROUNDS],
    marks: [MarkAddr; MAG_ROUNDS],
}

/// What the owner keeps with each round: the address of its live mark (see
/// `iova::livemap`), so that the allocation taking the round stores the mark without looking
/// it up. The magazine never dereferences it; the owner vouches for it (the loom models,
/// which have no marks, push [`MarkAddr::NONE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkAddr(*const AtomicU16);

impl MarkAddr {
    /// No mark.
    pub const NONE: Self = Self(core::ptr::null());

    /// The address of `mark`.
    #[inline]
    pub fn of(mark: &AtomicU16) -> Self {
        Self(mark)
    }

    /// The address, to be dereferenced by whoever can vouch that the mark still lives.
    #[inline]
    pub fn as_ptr(self) -> *const AtomicU16 {
        self.0
    }
}

// SAFETY: a magazine is rounds and mark addresses; it never dereferences the addresses, so
// moving it to another thread moves no access (its owner states when they may be used).
unsafe impl Send for Magazine {}

impl Magazine {
    /// A new, empty magazine on the heap, or [`Error::NoMemory`].
    fn boxed() -> Result<Box<Self>> {
        let mut v: Vec<Self> = Vec::new();
        v.try_reserve_exact(1)
            .map_err(|_| Error::NoMemory { requested: core::mem::size_of::<Self>() as u64 })?;
        // INVARIANT: len 0.
        v.push(Self { len: 0, home: NO_HOME, rounds: [0; MAG_ROUNDS], marks: [MarkAddr::NONE; MAG_ROUNDS] });
        let one = v.into_boxed_slice();
        // SAFETY: `one` is a boxed slice of exactly one `Magazine`, allocated with the layout of
        // one `Magazine` (a `[T]` of length 1 has the size and alignment of `T`), so it may be
        // owned as a `Box<Magazine>`.
        Ok(unsafe { Box::from_raw(Box::into_raw(one) as *mut Self) })
    }

    /// The rounds held, bottom first.
    #[inline]
    pub fn rounds(&self) -> &[u64] {
        self.rounds.get(..self.len).unwrap_or(&[])
    }

    #[inline]
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The top round, if any.
    #[inline]
    fn top(&self) -> Option<u64> {
        self.rounds.get(self.len.wrapping_sub(1)).copied()
    }

    /// The top round and its mark address, if any.
    #[inline]
    fn top_with_mark(&self) -> Option<(u64, MarkAddr)> {
        let i = self.len.wrapping_sub(1);
        Some((*self.rounds.get(i)?, *self.marks.get(i)?))
    }

    /// Pushes `s` with its mark address if fewer than `cap` rounds are held.
    ///
    /// # Safety
    ///
    /// `cap <= MAG_ROUNDS` (a [`CpuCache`]'s capacity is).
    #[inline]
    unsafe fn push(&mut self, cap: usize, s: u64, mark: MarkAddr) -> bool {
        let len = self.len;
        if len >= cap {
            return false;
        }
        debug_assert!(cap <= MAG_ROUNDS);
        // SAFETY: `len < cap` and `cap <= MAG_ROUNDS` (the caller's promise), so `len`
        // indexes `rounds` and `marks`.
        unsafe {
            *self.rounds.get_unchecked_mut(len) = s;
            *self.marks.get_unchecked_mut(len) = mark;
        }
        // INVARIANT: len < cap <= MAG_ROUNDS, so len + 1 <= MAG_ROUNDS.
        self.len = len + 1;
        true
    }
}

/// The two magazines of one class on one CPU (always both present: made with the cache, and
/// every exchange with the depot trades one magazine for another).
#[derive(Debug)]
struct ClassCache {
    loaded: Box<Magazine>,
    previous: Box<Magazine>,
}

/// One CPU's magazines, all classes.
///
/// # Invariants
///
/// `1 <= capacity <= MAG_ROUNDS`.
#[derive(Debug)]
pub struct CpuCache {
    capacity: usize,
    /// The CPU this cache belongs to, or [`NO_HOME`] (theory 6).
    home: u32,
    classes: [ClassCache; CLASSES],
    /// This CPU's counters.
    pub stats: CpuStats,
}

/// The depot's state for one class.
#[derive(Debug, Default)]
#[allow(clippy::vec_box, reason = "an exchange with a CPU swaps a pointer, not 384 bytes of magazine")]
struct DepotClass {
    full: Vec<Box<Magazine>>,
    empty: Vec<Box<Magazine>>,
    min_full: usize,
    min_empty: usize,
    ops: u32,
    trimmed: u64,
}

/// A depot class on its own pair of cache lines: CPUs exchanging magazines of one class do
/// not disturb those of another, nor the allocator's read-mostly fields.
#[derive(Debug)]
#[repr(align(128))]
struct PaddedClass(SpinLock<DepotClass>);

/// The depot: full and empty magazines per class, shared by all CPUs.
#[derive(Debug)]
pub struct Depot {
    classes: [PaddedClass; CLASSES],
}

/// What a magazine operation did besides the push or pop: whether it exchanged a magazine
/// with the depot (the caller then gives the depot a chance to trim, outside the CPU lock).
pub type DepotTouched = bool;

impl CpuCache {
    /// A cache whose magazines hold `capacity` rounds (the allocator uses [`MAG_ROUNDS`]; the
    /// loom model uses tiny magazines to reach the depot quickly), its two magazines per
    /// class made now so that the hot paths never allocate.
    ///
    /// Errors: [`Error::InvalidArgument`] if `capacity` is 0 or above [`MAG_ROUNDS`];
    /// [`Error::NoMemory`].
    pub fn new(capacity: usize) -> Result<Self> {
        if capacity == 0 || capacity > MAG_ROUNDS {
            return Err(Error::InvalidArgument {
                what: "magazine capacity (0 or above MAG_ROUNDS)",
                value: capacity as u64,
            });
        }
        let mut classes = Vec::new();
        classes.try_reserve_exact(CLASSES).map_err(|_| Error::NoMemory { requested: CLASSES as u64 })?;
        for _ in 0..CLASSES {
            classes.push(ClassCache { loaded: Magazine::boxed()?, previous: Magazine::boxed()? });
        }
        let classes = <[ClassCache; CLASSES]>::try_from(classes)
            .map_err(|_| Error::BadState { what: "CpuCache::new made the wrong number of classes" })?;
        // INVARIANT: capacity checked above.
        Ok(Self { capacity, home: NO_HOME, classes, stats: CpuStats::default() })
    }

    /// [`CpuCache::new`] for CPU `cpu`: the full magazines it gives the depot come back to it
    /// first (theory 6).
    ///
    /// Errors: those of [`CpuCache::new`].
    pub fn for_cpu(capacity: usize, cpu: usize) -> Result<Self> {
        let home = u32::try_from(cpu).unwrap_or(NO_HOME);
        Ok(Self { home, ..Self::new(capacity)? })
    }

    /// Pops the top round of class `c` if `fits(start)` accepts it (the request's limit,
    /// alignment and boundary). Returns `None` on a miss (the caller goes to the tree). Only
    /// the top round is tried: scanning a magazine would cost more than the tree for the
    /// rare request whose constraints differ from its CPU's usual ones.
    #[inline]
    pub fn alloc(
        &mut self,
        c: usize,
        fits: impl Fn(u64) -> bool,
        depot: &Depot,
    ) -> (Option<u64>, DepotTouched) {
        let Some(cc) = self.classes.get_mut(c) else { return (None, false) };
        if let Some(s) = cc.loaded.top() {
            if fits(s) {
                // INVARIANT: top() found a round, so len >= 1.
                cc.loaded.len -= 1;
                self.stats.hits += 1;
                return (Some(s), false);
            }
            self.stats.misses += 1;
            return (None, false);
        }
        self.alloc_refill(c, fits, depot)
    }

    /// The fast path's pop: offers the top round of class `c`'s loaded magazine to `take`,
    /// and takes it (counting a hit) only if `take` accepts it, returning the round, the mark
    /// address pushed with it and what `take` returned. `None` (nothing changed) if the
    /// loaded magazine is empty or `take` refuses: the caller then goes through
    /// [`CpuCache::alloc`], which refills and counts the miss.
    #[inline(always)]
    pub fn pop_with<R>(
        &mut self,
        c: usize,
        take: impl FnOnce(u64) -> Option<R>,
    ) -> Option<(u64, MarkAddr, R)> {
        let cc = self.classes.get_mut(c)?;
        let (s, mark) = cc.loaded.top_with_mark()?;
        let r = take(s)?;
        // INVARIANT: top_with_mark() found a round, so len >= 1.
        cc.loaded.len -= 1;
        self.stats.hits += 1;
        Some((s, mark, r))
    }

    /// The fast path's push: `start` onto class `c`'s loaded magazine if it has room
    /// (counting a cached free). `false` (nothing changed) if it is full: the caller then
    /// goes through [`CpuCache::free`].
    #[inline(always)]
    pub fn push(&mut self, c: usize, start: u64, mark: MarkAddr) -> bool {
        let cap = self.capacity;
        let Some(cc) = self.classes.get_mut(c) else { return false };
        // SAFETY: `cap` is this cache's capacity, at most MAG_ROUNDS (its invariant).
        let pushed = unsafe { cc.loaded.push(cap, start, mark) };
        self.stats.cached_frees += u64::from(pushed);
        pushed
    }

    /// `alloc` when the loaded magazine is empty: swap with `previous`, or trade an empty
    /// magazine for a full one at the depot.
    #[cold]
    fn alloc_refill(
        &mut self,
        c: usize,
        fits: impl Fn(u64) -> bool,
        depot: &Depot,
    ) -> (Option<u64>, DepotTouched) {
        let Some(cc) = self.classes.get_mut(c) else { return (None, false) };
        let mut touched = false;
        if !cc.previous.is_empty() {
            core::mem::swap(&mut cc.loaded, &mut cc.previous);
        } else if depot.trade_empty_for_full(c, &mut cc.previous, self.home) {
            // `previous` is now the full one; the empty `loaded` becomes `previous`.
            core::mem::swap(&mut cc.loaded, &mut cc.previous);
            self.stats.depot_gets += 1;
            touched = true;
        } else {
            self.stats.depot_misses += 1;
        }
        match cc.loaded.top() {
            Some(s) if fits(s) => {
                cc.loaded.len -= 1;
                self.stats.hits += 1;
                (Some(s), touched)
            }
            _ => {
                self.stats.misses += 1;
                (None, touched)
            }
        }
    }

    /// Pushes a round of class `c`. Returns `false` if it could not be cached (no empty
    /// magazine could be made): the caller frees it to the tree.
    #[inline(always)]
    pub fn free(&mut self, c: usize, start: u64, mark: MarkAddr, depot: &Depot) -> (bool, DepotTouched) {
        let cap = self.capacity;
        let Some(cc) = self.classes.get_mut(c) else { return (false, false) };
        // SAFETY: `cap` is this cache's capacity, at most MAG_ROUNDS (its invariant).
        if unsafe { cc.loaded.push(cap, start, mark) } {
            self.stats.cached_frees += 1;
            return (true, false);
        }
        self.free_spill(c, start, mark, depot)
    }

    /// `free` when the loaded magazine is full: swap with an empty `previous`, or trade the
    /// full `previous` for an empty magazine at the depot.
    #[cold]
    fn free_spill(&mut self, c: usize, start: u64, mark: MarkAddr, depot: &Depot) -> (bool, DepotTouched) {
        let cap = self.capacity;
        let Some(cc) = self.classes.get_mut(c) else { return (false, false) };
        let mut touched = false;
        if cc.previous.is_empty() {
            core::mem::swap(&mut cc.loaded, &mut cc.previous);
        } else {
            // Both full: the previous one goes to the depot, an empty one comes back.
            cc.previous.home = self.home;
            if !depot.trade_full_for_empty(c, &mut cc.previous) {
                return (false, false);
            }
            core::mem::swap(&mut cc.loaded, &mut cc.previous);
            self.stats.depot_puts += 1;
            touched = true;
        }
        // SAFETY: `cap` is this cache's capacity, at most MAG_ROUNDS (its invariant).
        let pushed = unsafe { cc.loaded.push(cap, start, mark) };
        if pushed {
            self.stats.cached_frees += 1;
        }
        (pushed, touched)
    }

    /// Moves every round of every class out, calling `sink(class, start)` for each.
    pub fn drain(&mut self, mut sink: impl FnMut(usize, u64)) {
        for (c, cc) in self.classes.iter_mut().enumerate() {
            for m in [&mut cc.loaded, &mut cc.previous] {
                for &s in m.rounds() {
                    sink(c, s);
                }
                m.len = 0;
            }
        }
    }

    /// Rounds held, per class.
    pub fn rounds(&self) -> [usize; CLASSES] {
        core::array::from_fn(|c| self.classes[c].loaded.len + self.classes[c].previous.len)
    }
}

impl Default for Depot {
    fn default() -> Self {
        Self::new()
    }
}

impl Depot {
    /// An empty depot (the magazines it makes have room for [`MAG_ROUNDS`] rounds; each
    /// CPU cache fills them up to its own capacity).
    pub fn new() -> Self {
        Self { classes: core::array::from_fn(|_| PaddedClass(SpinLock::new(DepotClass::default()))) }
    }

    /// If the depot holds a full magazine of class `c`, swaps it into `*empty` and keeps the
    /// empty one, returning `true`; else leaves `*empty` alone and returns `false`. Among
    /// the last [`HOME_SCAN`] full magazines, one that CPU `home` gave is taken first.
    fn trade_empty_for_full(&self, c: usize, empty: &mut Box<Magazine>, home: u32) -> bool {
        let Some(l) = self.classes.get(c) else { return false };
        let mut d = l.0.lock();
        let n = d.full.len();
        let own = match home {
            NO_HOME => None,
            h => d.full.iter().rev().take(HOME_SCAN).position(|m| m.home == h).map(|i| n - 1 - i),
        };
        let full = match own {
            Some(i) => d.full.remove(i),
            None => match d.full.pop() {
                Some(m) => m,
                None => return false,
            },
        };
        d.min_full = d.min_full.min(d.full.len());
        let old = core::mem::replace(empty, full);
        // Never fails to find room in practice; if it does, the empty magazine is dropped.
        if d.empty.try_reserve(1).is_ok() {
            d.empty.push(old);
        }
        d.ops += 1;
        true
    }

    /// Swaps the full magazine `*full` for an empty one (the depot's, or a new one),
    /// returning `true`; `false` if no empty magazine exists and none can be made (`*full`
    /// is left in place).
    fn trade_full_for_empty(&self, c: usize, full: &mut Box<Magazine>) -> bool {
        let Some(l) = self.classes.get(c) else { return false };
        let mut d = l.0.lock();
        let empty = match d.empty.pop() {
            Some(e) => {
                d.min_empty = d.min_empty.min(d.empty.len());
                e
            }
            None => match Magazine::boxed() {
                Ok(m) => m,
                Err(_) => return false,
            },
        };
        if d.full.try_reserve(1).is_err() {
            d.empty.push(empty);
            return false;
        }
        let old = core::mem::replace(full, empty);
        d.full.push(old);
        d.ops += 1;
        true
    }

    /// If class `c` has done [`TRIM_INTERVAL`] operations since its last trim, removes the full
    /// magazines nobody needed during the interval and returns them (the caller frees their
    /// rounds to the tree); drops unneeded empty ones.
    pub fn trim(&self, c: usize) -> Vec<Box<Magazine>> {
        let Some(l) = self.classes.get(c) else { return Vec::new() };
        let mut d = l.0.lock();
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
                let mut d = l.0.lock();
                d.min_full = 0;
                core::mem::take(&mut d.full)
            };
            for m in full {
                for &s in m.rounds() {
                    sink(c, s);
                }
            }
        }
    }

    /// Full magazines and rounds held, per class, and magazines trimmed so far (all classes).
    pub fn census(&self) -> ([usize; CLASSES], u64) {
        let mut rounds = [0; CLASSES];
        let mut trimmed = 0;
        for (c, l) in self.classes.iter().enumerate() {
            let d = l.0.lock();
            rounds[c] = d.full.iter().map(|m| m.len).sum();
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
        let depot = Depot::new();
        let mut cpu = CpuCache::new(4).unwrap();
        for i in 0..4 {
            assert!(cpu.free(0, i * 0x1000, MarkAddr::NONE, &depot).0);
        }
        for _ in 0..1000 {
            let s = cpu.alloc(0, |_| true, &depot).0.unwrap();
            assert!(cpu.free(0, s, MarkAddr::NONE, &depot).0);
        }
        assert_eq!((cpu.stats.depot_gets, cpu.stats.depot_puts), (0, 0));
    }

    #[test]
    fn rounds_flow_between_cpus_through_the_depot() {
        let depot = Depot::new();
        let (mut a, mut b) = (CpuCache::new(2).unwrap(), CpuCache::new(2).unwrap());
        for i in 0..10 {
            assert!(a.free(3, i, MarkAddr::NONE, &depot).0);
        }
        // a holds 4 in its two magazines, the depot 3 full magazines (6 rounds).
        assert_eq!(depot.census().0[3], 6);
        let mut got = Vec::new();
        while let Some(s) = b.alloc(3, |_| true, &depot).0 {
            got.push(s);
        }
        assert_eq!(got.len(), 6);
        a.drain(|_, s| got.push(s));
        got.sort_unstable();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }

    /// Theory 6: a CPU whose magazines ran dry gets the full magazine it gave the depot back,
    /// even when another CPU gave one after it; a CPU with none of its own takes any.
    #[test]
    fn the_depot_hands_a_cpu_its_own_full_magazine_first() {
        let depot = Depot::new();
        let (mut a, mut b) = (CpuCache::for_cpu(1, 0).unwrap(), CpuCache::for_cpu(1, 1).unwrap());
        let mut c = CpuCache::for_cpu(1, 2).unwrap();
        // Three frees fill a's two one-round magazines and put the first one in the depot.
        for s in [10, 11, 12] {
            assert!(a.free(0, s, MarkAddr::NONE, &depot).0);
        }
        for s in [20, 21, 22] {
            assert!(b.free(0, s, MarkAddr::NONE, &depot).0);
        }
        assert_eq!(depot.census().0[0], 2);
        // a empties its own magazines, then refills from the depot: its own round 10, not
        // b's 20 (the most recent).
        let mine: Vec<u64> = (0..3).map(|_| a.alloc(0, |_| true, &depot).0.unwrap()).collect();
        assert_eq!(mine, [12, 11, 10]);
        assert_eq!(c.alloc(0, |_| true, &depot).0, Some(20), "no magazine of its own: any");
    }

    #[test]
    fn a_round_above_the_limit_is_a_miss_not_a_hit() {
        let depot = Depot::new();
        let mut a = CpuCache::new(2).unwrap();
        assert!(a.free(0, 0x10_0000, MarkAddr::NONE, &depot).0);
        assert_eq!(a.alloc(0, |s| s + 0x1000 <= 0x10_0000, &depot).0, None);
        assert_eq!(a.alloc(0, |s| s + 0x1000 <= 0x10_1000, &depot).0, Some(0x10_0000));
    }

    #[test]
    fn depot_trims_what_the_working_set_did_not_use() {
        let depot = Depot::new();
        let (mut a, mut b) = (CpuCache::new(1).unwrap(), CpuCache::new(1).unwrap());
        for i in 0..12 {
            assert!(a.free(0, i, MarkAddr::NONE, &depot).0);
        }
        assert_eq!(depot.census().0[0], 10);
        // b churns through the depot, three rounds out and back each time: its working set
        // is one or two depot magazines; the other eight sat unused.
        let mut trimmed = Vec::new();
        for _ in 0..TRIM_INTERVAL {
            let got: Vec<u64> = (0..3).map(|_| b.alloc(0, |_| true, &depot).0.unwrap()).collect();
            for s in got {
                assert!(b.free(0, s, MarkAddr::NONE, &depot).0);
            }
            trimmed.extend(depot.trim(0));
        }
        let mut all: Vec<u64> = trimmed.iter().flat_map(|m| m.rounds().iter().copied()).collect();
        assert!(all.len() >= 6, "only {} rounds trimmed", all.len());
        depot.drain(|_, s| all.push(s));
        a.drain(|_, s| all.push(s));
        b.drain(|_, s| all.push(s));
        all.sort_unstable();
        assert_eq!(all, (0..12).collect::<Vec<_>>(), "rounds lost or duplicated");
    }
}
