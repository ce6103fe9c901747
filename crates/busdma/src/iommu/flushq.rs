//! Deferred invalidation: per-CPU flush queues and the generations that free them.
//!
//! # Theory
//!
//! 1. **What waits.** A deferred unmap clears its page-table entries, then queues what must
//!    not be reused yet (the IOVA ranges, the detached table pages) on its CPU's queue, with
//!    a *ticket* and the time. One whole-domain invalidation later releases many entries at
//!    once: that is the whole point, one command amortised over up to `max_entries` unmaps.
//! 2. **Generations.** [`FlushGenerations`] counts flushes *started* and flushes *finished*.
//!    The ticket of an unmap is the started count read after its entries were cleared. An
//!    entry may be released once `finished > ticket`: flushes run one at a time, so flush
//!    number `ticket + 1` has finished, and it started after the ticket was read, hence after
//!    the clear. (Flushes are serialised by a lock: an invalidation takes microseconds and a
//!    second flusher waiting for the first usually finds it already covers its clears, see 4.)
//! 3. **The ordering hazard.** The unmapper does `clear entries; fence(SeqCst); load started`;
//!    the flusher does `started += 1 (SeqCst); fence(SeqCst); invalidate`. By the two
//!    sequentially consistent fences, either the unmapper's load sees the increment (its ticket
//!    counts that flush, which therefore does not release it), or the flusher's invalidation,
//!    and every table walk the hardware makes after it, sees the cleared entries. Either way
//!    no entry is released by a flush that could have missed its clear.
//! 4. **Coalescing.** A flusher reads its own ticket first; if, once it holds the flush lock,
//!    `finished > ticket`, a flush that started after its clears has already finished and it
//!    issues no command of its own.
//! 5. **Bounds.** A queue holds at most `max_entries` entries: the push that fills it tells
//!    the caller to flush, and the flush empties it (every entry in it was pushed before the
//!    flush started). An entry is due when it is `max_age_ns` old; [`FlushQueues::due`] is
//!    cheap enough for every map and unmap (one atomic load and a compare: a domain-wide lower
//!    bound of the queues' oldest times, refreshed exactly only when it says "maybe due").
//!    So an unmapped page waits for at most `max_entries - 1` later unmaps on its CPU, and for
//!    at most `max_age_ns` plus the gap until the next map, unmap or [`FlushQueues::due`] poll
//!    of the domain on any CPU.
//! 6. **Per-CPU.** Each queue has its own spin lock: uncontended except while a flusher on
//!    another CPU drains it. Items are released by whoever drains them, under the queue's lock,
//!    through the caller's `release` closure.
//! 7. **Failures.** An invalidation can fail (the IOMMU reports an error or never answers). A
//!    failed flush releases nothing and its items stay queued; it keeps the number it took,
//!    and the next flush that succeeds covers every ticket below its own number.
//! 8. **Unmaps that free nothing are recorded, not queued.** An unmap of a reserved window
//!    (the window stays its map's; its pinned tables are never detached) gives nothing back:
//!    no IOVA goes to the allocator and no table page to the pool. A queue entry for it would
//!    carry an empty item, and its release would do nothing. What deferral must still
//!    guarantee for it is a matter of the *translation*, not of the IOVA:
//!    - the window is not re-pointed before an invalidation that saw the clear has finished
//!      (its owner keeps the unmap's ticket and calls `ensure_flushed` before it maps the
//!      window again: the ticket is the map's "invalidated up to generation g");
//!    - the *buffer* the entries pointed at is not handed back for reuse on a proof of
//!      unreachability (the unpin barrier, a quarantine's release: `Domain::flush_queued`)
//!      unless a covering invalidation has finished;
//!    - the count and age bounds of rule 5 still bound how long a device may reach it.
//!
//!    So each CPU keeps one `Record` instead of entries: the greatest ticket of the unmaps
//!    it recorded (later tickets are never smaller: the CPU's unmaps run one after another and
//!    `started` only grows, so a flush covering the record's ticket covers every unmap it
//!    recorded), how many it recorded since the record was last found covered, and the time
//!    of the first of those. [`FlushQueues::record`] is written only by the CPU that owns the
//!    record (the caller's guard: a plain load and store, as the domain's counters, and with
//!    their precondition: the domain is not re-entered from an interrupt on the same CPU,
//!    which would lose a ticket between the load and the store), and is
//!    published with a `Release` store of the ticket after the unmap's ticket was read (rule
//!    3 orders the clear before that read). Readers:
//!    - [`FlushQueues::unflushed`] (what `flush_queued` asks besides "is any queue
//!      non-empty"): an unmap that returned before the caller's call stored its ticket before
//!      returning, so an `Acquire` load of the record sees that ticket or a later one of the
//!      same CPU; if `finished > ticket` a flush that started after the clear has finished
//!      (rule 2), otherwise the caller flushes. Either way the buffer is proven unreachable
//!      before it is handed back (loom: `tests/loom_flushq.rs`, `a_recorded_unmap_*`).
//!    - The count bound: the record that reaches `max_entries` uncovered unmaps tells the
//!      caller to flush, as a full queue does.
//!    - The age bound: the first time of an uncovered record takes part in the queues'
//!      oldest time exactly as a queue's oldest entry (its store precedes the hint's
//!      `fetch_min`, so `raise_hint`'s argument holds unchanged), so `due` fires for it.
//!
//!    A failed flush leaves records uncovered (rule 7), and the next success covers them.
#![forbid(unsafe_code)]

use alloc::boxed::Box;
use alloc::collections::VecDeque;

use crate::error::{Error, Result};
use crate::sync::{AtomicU64, Ordering, SpinLock, fence};

/// Proof-of-order for one unmap: a flush that started after it must finish before what it
/// cleared is reused. `FlushTicket::DONE` is the ticket of an unmap already invalidated
/// (strict).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushTicket(Option<u64>);

impl FlushTicket {
    /// Nothing to wait for.
    pub const DONE: FlushTicket = FlushTicket(None);

    /// The started-flush count the ticket was taken at, if it waits for a flush.
    pub fn generation(&self) -> Option<u64> {
        self.0
    }
}

/// Flushes started and finished, and the lock that runs them one at a time.
///
/// # Invariants
///
/// `finished <= started`; both only grow; they change only under `lock`. `finished` is the
/// number of the last flush that completed; `started - finished` counts the flushes that
/// failed since then, plus one while a flush runs (rule 7).
///
/// Rule 7 (failures): a flush whose invalidation fails keeps its number taken and does not
/// advance `finished`, so it releases nothing. The next successful flush, numbered `s`, sets
/// `finished = s`: it started after every ticket below `s` was read (the failed numbers
/// included), so it covers them all.
#[derive(Debug)]
pub struct FlushGenerations {
    started: AtomicU64,
    finished: AtomicU64,
    lock: SpinLock<()>,
}

impl Default for FlushGenerations {
    fn default() -> Self {
        Self::new()
    }
}

impl FlushGenerations {
    /// No flush yet.
    pub fn new() -> Self {
        Self { started: AtomicU64::new(0), finished: AtomicU64::new(0), lock: SpinLock::new(()) }
    }

    /// The ticket of entries the caller has just cleared.
    #[inline]
    pub fn ticket(&self) -> FlushTicket {
        // Rule 3: the clear (earlier stores) is ordered before the load of `started`.
        fence(Ordering::SeqCst);
        FlushTicket(Some(self.started.load(Ordering::SeqCst)))
    }

    /// True if a flush that started after `t` was taken has finished.
    #[inline]
    pub fn is_flushed(&self, t: FlushTicket) -> bool {
        match t.0 {
            None => true,
            Some(g) => self.finished.load(Ordering::Acquire) > g,
        }
    }

    /// Flushes started so far.
    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    /// Flushes finished so far.
    pub fn finished(&self) -> u64 {
        self.finished.load(Ordering::Acquire)
    }

    /// Makes sure a flush that started after the caller's earlier clears has finished: runs
    /// `invalidate` (which must complete the hardware invalidation before returning) as the
    /// next flush, unless one that started after them already finished. Returns true if it
    /// ran `invalidate`.
    ///
    /// Errors: `invalidate`'s; the flush then counts as not finished (rule 7).
    pub fn flush(&self, invalidate: impl FnOnce() -> Result<()>) -> Result<bool> {
        let mine = self.ticket();
        let _serial = self.lock.lock();
        if self.is_flushed(mine) {
            return Ok(false);
        }
        let number = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        // Rule 3: the increment is ordered before every read the invalidation (and the walks
        // after it) makes of the tables.
        fence(Ordering::SeqCst);
        invalidate()?;
        // INVARIANT: under the lock `number` is `started`, above every earlier `finished`.
        self.finished.store(number, Ordering::Release);
        Ok(true)
    }
}

struct Queued<T> {
    ticket: FlushTicket,
    at_ns: u64,
    item: T,
}

struct Queue<T> {
    ring: VecDeque<Queued<T>>,
}

/// One CPU's record of unmaps that queued nothing (rule 8), on its own cache lines.
///
/// # Invariants
///
/// Written only by the CPU that owns it. `ticket` is 0 (nothing recorded) or one more than
/// the greatest ticket generation recorded; `count` and `since` describe the unmaps recorded
/// since the record was last found covered (meaningless once it is covered).
#[repr(align(128))]
struct Record {
    ticket: AtomicU64,
    count: AtomicU64,
    since: AtomicU64,
}

/// What [`FlushQueues::record`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded; the record still has room.
    Recorded,
    /// Recorded, and the record now holds `max_entries` uncovered unmaps: the caller must
    /// flush.
    Full,
    /// Not recorded: no record for that CPU. The caller queues the unmap instead.
    NoRecord,
}

/// One queue per CPU of items waiting for a flush, bounded by count and age.
pub struct FlushQueues<T> {
    gens: FlushGenerations,
    queues: Box<[SpinLock<Queue<T>>]>,
    /// Per queue: the time of its oldest entry, `u64::MAX` when empty (written under the
    /// queue's lock, read without it).
    oldest: Box<[AtomicU64]>,
    /// A lower bound of `oldest` over all queues (`u64::MAX`: all empty, as far as known).
    hint: AtomicU64,
    /// Per CPU: the unmaps that queued nothing (rule 8).
    records: Box<[Record]>,
    max_entries: usize,
    max_age_ns: u64,
}

/// What [`FlushQueues::push`] did.
#[derive(Debug)]
pub enum Pushed<T> {
    /// Queued; the queue still has room.
    Queued,
    /// Queued, and the queue is now full: the caller must flush.
    QueuedFull,
    /// Not queued: the queue is full of entries no finished flush covers. The caller flushes
    /// and may then release the item itself (the flush started after its clear).
    NoRoom(T),
}

impl<T> FlushQueues<T> {
    /// Queues for `cpus` CPUs, each holding at most `max_entries` items, due at
    /// `max_age_ns`.
    ///
    /// Errors: [`Error::InvalidArgument`] for zero CPUs, entries or age;
    /// [`Error::NoMemory`] if the rings cannot be allocated.
    pub fn new(cpus: usize, max_entries: usize, max_age_ns: u64) -> Result<Self> {
        if cpus == 0 {
            return Err(Error::InvalidArgument { what: "flush queue CPU count", value: 0 });
        }
        if max_entries == 0 || max_age_ns == 0 {
            return Err(Error::InvalidArgument {
                what: "flush queue bound (entries and age must be > 0)",
                value: 0,
            });
        }
        let mut queues = alloc::vec::Vec::new();
        let nomem = |n: usize| Error::NoMemory { requested: (n * core::mem::size_of::<Queued<T>>()) as u64 };
        queues.try_reserve_exact(cpus).map_err(|_| nomem(cpus))?;
        for _ in 0..cpus {
            let mut ring = VecDeque::new();
            ring.try_reserve_exact(max_entries).map_err(|_| nomem(max_entries))?;
            queues.push(SpinLock::new(Queue { ring }));
        }
        let oldest = (0..cpus).map(|_| AtomicU64::new(u64::MAX)).collect();
        let records = (0..cpus)
            .map(|_| Record { ticket: AtomicU64::new(0), count: AtomicU64::new(0), since: AtomicU64::new(0) })
            .collect();
        Ok(Self {
            gens: FlushGenerations::new(),
            queues: queues.into_boxed_slice(),
            oldest,
            hint: AtomicU64::new(u64::MAX),
            records,
            max_entries,
            max_age_ns,
        })
    }

    /// The generation counters.
    pub fn generations(&self) -> &FlushGenerations {
        &self.gens
    }

    /// The ticket of entries the caller has just cleared (see [`FlushGenerations::ticket`]).
    #[inline]
    pub fn ticket(&self) -> FlushTicket {
        self.gens.ticket()
    }

    /// The count bound.
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// The age bound.
    pub fn max_age_ns(&self) -> u64 {
        self.max_age_ns
    }

    /// Items queued on every CPU (a snapshot; takes each queue's lock).
    pub fn pending(&self) -> usize {
        self.queues.iter().map(|q| q.lock().ring.len()).sum()
    }

    /// Unmaps recorded (rule 8) that no finished flush covers yet, on every CPU (a snapshot;
    /// it may count an unmap that a flush has covered meanwhile, never miss one).
    pub fn recorded(&self) -> usize {
        self.records
            .iter()
            .filter(|r| self.uncovered(r))
            .map(|r| r.count.load(Ordering::Relaxed) as usize)
            .sum()
    }

    /// True if some recorded unmap (rule 8) that returned before this call is not yet covered
    /// by a finished flush.
    pub fn unflushed(&self) -> bool {
        self.records.iter().any(|r| self.uncovered(r))
    }

    /// The record holds an unmap no finished flush covers.
    #[inline]
    fn uncovered(&self, r: &Record) -> bool {
        match r.ticket.load(Ordering::Acquire) {
            0 => false,
            t => !self.gens.is_flushed(FlushTicket(Some(t - 1))),
        }
    }

    /// Rule 8: records an unmap that frees nothing, cleared under `ticket` at `now_ns`, on
    /// `cpu`'s record. The caller holds a guard for `cpu` (the record's single writer).
    #[inline]
    pub fn record(&self, cpu: usize, ticket: FlushTicket, now_ns: u64) -> Recorded {
        let (Some(r), Some(t)) = (self.records.get(cpu), ticket.0) else {
            return Recorded::NoRecord;
        };
        let t = t.wrapping_add(1);
        if !self.uncovered(r) {
            // A fresh record: its first unmap's time joins the age bound (rule 8), stored
            // before the hint is lowered (`raise_hint`'s hazard).
            r.count.store(1, Ordering::Relaxed);
            r.ticket.store(t, Ordering::Release);
            r.since.store(now_ns, Ordering::Release);
            self.hint.fetch_min(now_ns, Ordering::AcqRel);
            return if self.max_entries <= 1 { Recorded::Full } else { Recorded::Recorded };
        }
        let n = r.count.load(Ordering::Relaxed).wrapping_add(1);
        r.count.store(n, Ordering::Relaxed);
        // Single writer, tickets never decrease (rule 8): the greater one covers both.
        r.ticket.store(t.max(r.ticket.load(Ordering::Relaxed)), Ordering::Release);
        if n >= self.max_entries as u64 { Recorded::Full } else { Recorded::Recorded }
    }

    /// Releases the items of queue `cpu` that a finished flush covers, oldest first. Call
    /// with the queue's lock held (`q`).
    fn reclaim_locked(&self, cpu: usize, q: &mut Queue<T>, release: &mut impl FnMut(T)) -> usize {
        let mut n = 0;
        while let Some(front) = q.ring.front() {
            if !self.gens.is_flushed(front.ticket) {
                break;
            }
            if let Some(e) = q.ring.pop_front() {
                release(e.item);
                n += 1;
            }
        }
        let oldest = q.ring.front().map_or(u64::MAX, |e| e.at_ns);
        self.oldest[cpu].store(oldest, Ordering::Release);
        n
    }

    /// Queues `item`, cleared under `ticket` at `now_ns`, on `cpu`'s queue (the caller holds
    /// a guard for `cpu`, `cpu < cpus`). First releases that queue's flushed items through
    /// `release`.
    pub fn push(
        &self,
        cpu: usize,
        ticket: FlushTicket,
        now_ns: u64,
        item: T,
        release: &mut impl FnMut(T),
    ) -> Pushed<T> {
        let Some(queue) = self.queues.get(cpu) else {
            return Pushed::NoRoom(item);
        };
        let mut q = queue.lock();
        self.reclaim_locked(cpu, &mut q, release);
        if q.ring.len() >= self.max_entries {
            return Pushed::NoRoom(item);
        }
        let was_empty = q.ring.is_empty();
        // Capacity was reserved for max_entries: no allocation here.
        q.ring.push_back(Queued { ticket, at_ns: now_ns, item });
        if was_empty {
            self.oldest[cpu].store(now_ns, Ordering::Release);
            self.hint.fetch_min(now_ns, Ordering::AcqRel);
        }
        if q.ring.len() >= self.max_entries { Pushed::QueuedFull } else { Pushed::Queued }
    }

    /// True if some queued item is at least `max_age_ns` old at `now_ns`. One load and a
    /// compare unless the domain-wide hint says "maybe"; then the queues' oldest times are
    /// read and the hint refreshed.
    #[inline]
    pub fn due(&self, now_ns: u64) -> bool {
        let hint = self.hint.load(Ordering::Acquire);
        if hint == u64::MAX || now_ns.saturating_sub(hint) < self.max_age_ns {
            return false;
        }
        self.due_slow(hint, now_ns)
    }

    fn due_slow(&self, hint: u64, now_ns: u64) -> bool {
        let oldest = self.min_oldest();
        if oldest != u64::MAX && now_ns.saturating_sub(oldest) >= self.max_age_ns {
            return true;
        }
        self.raise_hint(hint, oldest);
        false
    }

    /// The queues' oldest entry time and the uncovered records' first times (rule 8),
    /// `u64::MAX` if all are empty.
    fn min_oldest(&self) -> u64 {
        let queued = self.oldest.iter().map(|o| o.load(Ordering::Acquire)).min().unwrap_or(u64::MAX);
        let recorded = self
            .records
            .iter()
            .filter_map(|r| {
                // `since` is stored after `ticket`: read first, a fresh record's time is
                // never seen with the covered ticket before it (an old time with a fresh
                // ticket only makes `due` early).
                let since = r.since.load(Ordering::Acquire);
                self.uncovered(r).then_some(since)
            })
            .min()
            .unwrap_or(u64::MAX);
        queued.min(recorded)
    }

    /// Raises the hint from `expected` to `oldest` (the queues' minimum as just read), unless a
    /// push lowered it meanwhile (its fetch_min then makes the CAS fail and its value stays).
    ///
    /// Hazard: a push whose time is not below the hint leaves the hint's *value* unchanged, so
    /// the CAS can succeed after such a push although `oldest` was read before it and misses
    /// its entry; the hint would then hide that entry from `due` until the next push. So after
    /// a successful raise the queues are read again: the push's store to `oldest[cpu]`
    /// (Release) precedes its fetch_min, which precedes our CAS in the hint's modification
    /// order (AcqRel on both), so the re-read sees it, and the hint is lowered to it. Pushes
    /// after our CAS lower the hint themselves.
    fn raise_hint(&self, expected: u64, oldest: u64) {
        if self.hint.compare_exchange(expected, oldest, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let again = self.min_oldest();
            if again < oldest {
                self.hint.fetch_min(again, Ordering::AcqRel);
            }
        }
    }

    /// Runs one flush (see [`FlushGenerations::flush`]), then releases every covered item of
    /// every queue. Returns true if it ran `invalidate`.
    ///
    /// Errors: `invalidate`'s; nothing is released then, every item stays queued (rule 7).
    pub fn flush(
        &self,
        invalidate: impl FnOnce() -> Result<()>,
        release: &mut impl FnMut(T),
    ) -> Result<bool> {
        let ran = self.gens.flush(invalidate)?;
        let hint = self.hint.load(Ordering::Acquire);
        for (cpu, queue) in self.queues.iter().enumerate() {
            let mut q = queue.lock();
            self.reclaim_locked(cpu, &mut q, release);
        }
        self.raise_hint(hint, self.min_oldest());
        Ok(ran)
    }

    /// Releases, without flushing, every item of every queue that a finished flush covers.
    pub fn reclaim_all(&self, release: &mut impl FnMut(T)) -> usize {
        let mut n = 0;
        for (cpu, queue) in self.queues.iter().enumerate() {
            let mut q = queue.lock();
            n += self.reclaim_locked(cpu, &mut q, release);
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn an_item_is_released_only_by_a_flush_that_started_after_its_ticket() {
        let q = FlushQueues::new(2, 4, 1_000).unwrap();
        let mut out = Vec::new();
        let t = q.ticket();
        assert!(!q.generations().is_flushed(t));
        assert!(matches!(q.push(0, t, 10, 1u32, &mut |i| out.push(i)), Pushed::Queued));
        assert_eq!(q.reclaim_all(&mut |i| out.push(i)), 0);
        let mut ran = 0;
        assert!(
            q.flush(
                || {
                    ran += 1;
                    Ok(())
                },
                &mut |i| out.push(i)
            )
            .unwrap()
        );
        assert_eq!((ran, out.as_slice()), (1, &[1u32][..]));
        assert!(q.generations().is_flushed(t));
        assert_eq!((q.generations().started(), q.generations().finished()), (1, 1));
    }

    #[test]
    fn a_flush_already_covering_the_callers_clears_is_coalesced() {
        let g = FlushGenerations::new();
        let before = g.ticket();
        assert!(g.flush(|| Ok(())).unwrap());
        // Nothing cleared since that flush started? A new flush is still needed: the caller
        // may have cleared entries after it.
        assert!(g.flush(|| Ok(())).unwrap());
        assert!(g.is_flushed(before));
        assert!(g.is_flushed(FlushTicket::DONE));
    }

    #[test]
    fn the_push_that_fills_a_queue_asks_for_a_flush_and_the_flush_empties_it() {
        let q = FlushQueues::new(1, 3, u64::MAX).unwrap();
        let mut out = Vec::new();
        for i in 0..2 {
            assert!(matches!(q.push(0, q.ticket(), i, i, &mut |x| out.push(x)), Pushed::Queued));
        }
        assert!(matches!(q.push(0, q.ticket(), 2, 2, &mut |x| out.push(x)), Pushed::QueuedFull));
        assert!(matches!(q.push(0, q.ticket(), 3, 3, &mut |x| out.push(x)), Pushed::NoRoom(3)));
        q.flush(|| Ok(()), &mut |x| out.push(x)).unwrap();
        assert_eq!(out, [0, 1, 2]);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn age_makes_an_item_due_on_any_cpu() {
        let q = FlushQueues::new(2, 100, 1_000).unwrap();
        assert!(!q.due(u64::MAX - 1));
        let _ = q.push(1, q.ticket(), 500, 7u8, &mut |_| {});
        assert!(!q.due(1_499));
        assert!(q.due(1_500));
        q.flush(|| Ok(()), &mut |_| {}).unwrap();
        assert!(!q.due(10_000));
        let _ = q.push(0, q.ticket(), 20_000, 8u8, &mut |_| {});
        assert!(!q.due(20_999) && q.due(21_000));
    }

    /// One step of the reference test.
    #[derive(Clone, Copy, Debug)]
    enum Op {
        /// Push a new item on this CPU, after advancing the clock by this much.
        Push(usize, u64),
        /// Flush everything.
        Flush,
        /// Release what finished flushes cover.
        Reclaim,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            6 => (0usize..3, 0u64..400).prop_map(|(c, dt)| Op::Push(c, dt)),
            1 => Just(Op::Flush),
            1 => Just(Op::Reclaim),
        ]
    }

    proptest::proptest! {
        /// Against a reference of (item, cpu, time, flushes finished when pushed): an item is
        /// released exactly when a flush that started after its push has run, never twice;
        /// no queue exceeds its bound; `due` says exactly whether the oldest unreleased item
        /// is at least the age bound old.
        #[test]
        fn queues_release_exactly_what_a_later_flush_covers(ops in proptest::collection::vec(op(), 1..200)) {
            const MAX: usize = 4;
            const AGE: u64 = 1_000;
            let q = FlushQueues::new(3, MAX, AGE).unwrap();
            let mut now = 0u64;
            let mut next = 0u32;
            let mut flushes = 0u64;
            // Reference: unreleased items (id, cpu, time, flushes before the push).
            let mut live: Vec<(u32, usize, u64, u64)> = Vec::new();
            let mut released: Vec<u32> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(cpu, dt) => {
                        now += dt;
                        let id = next;
                        next += 1;
                        let t = q.ticket();
                        match q.push(cpu, t, now, id, &mut |i| released.push(i)) {
                            Pushed::Queued | Pushed::QueuedFull => live.push((id, cpu, now, flushes)),
                            Pushed::NoRoom(i) => {
                                proptest::prop_assert_eq!(i, id);
                                proptest::prop_assert_eq!(live.iter().filter(|l| l.1 == cpu).count(), MAX);
                                continue;
                            }
                        }
                    }
                    Op::Flush => {
                        proptest::prop_assert!(q.flush(|| Ok(()), &mut |i| released.push(i)).unwrap(), "single-threaded flushes always run");
                        flushes += 1;
                        let mut gone: Vec<u32> = live.iter().map(|l| l.0).collect();
                        live.clear();
                        gone.sort_unstable();
                        let mut got = core::mem::take(&mut released);
                        got.sort_unstable();
                        proptest::prop_assert_eq!(got, gone, "a flush releases everything pushed before it");
                    }
                    Op::Reclaim => {
                        q.reclaim_all(&mut |i| released.push(i));
                    }
                }
                // Nothing is released other than by a flush (every flush drained all).
                proptest::prop_assert!(released.is_empty(), "released without a covering flush: {:?}", released);
                for cpu in 0..3 {
                    proptest::prop_assert!(live.iter().filter(|l| l.1 == cpu).count() <= MAX);
                }
                proptest::prop_assert_eq!(q.pending(), live.len());
                let oldest = live.iter().map(|l| l.2).min();
                proptest::prop_assert_eq!(q.due(now), oldest.is_some_and(|o| now - o >= AGE));
                proptest::prop_assert!(live.iter().all(|l| l.3 == flushes));
            }
        }
    }

    #[test]
    fn a_failed_flush_releases_nothing_and_the_next_success_covers_every_earlier_ticket() {
        let q = FlushQueues::new(1, 8, u64::MAX).unwrap();
        let mut out = Vec::new();
        let t1 = q.ticket();
        let _ = q.push(0, t1, 0, 1u32, &mut |i| out.push(i));
        let broken = Error::InvalidationFailed { what: "test", domain: 1, status: 0 };
        assert_eq!(q.flush(|| Err(broken), &mut |i| out.push(i)), Err(broken));
        assert!(out.is_empty() && q.pending() == 1 && !q.generations().is_flushed(t1));
        // A ticket read after the failed flush took its number.
        let t2 = q.ticket();
        let _ = q.push(0, t2, 0, 2u32, &mut |i| out.push(i));
        assert_eq!(q.flush(|| Err(broken), &mut |i| out.push(i)), Err(broken));
        assert_eq!((q.generations().started(), q.generations().finished()), (2, 0));
        assert!(q.flush(|| Ok(()), &mut |i| out.push(i)).unwrap());
        assert_eq!(out, [1, 2]);
        assert!(q.generations().is_flushed(t1) && q.generations().is_flushed(t2));
        assert_eq!((q.generations().started(), q.generations().finished()), (3, 3));
    }

    #[test]
    fn a_recorded_unmap_is_due_by_age_on_any_cpu_until_a_flush_covers_it() {
        let q = FlushQueues::<u8>::new(2, 100, 1_000).unwrap();
        assert_eq!(q.record(1, q.ticket(), 500), Recorded::Recorded);
        assert_eq!(q.record(1, q.ticket(), 900), Recorded::Recorded);
        assert_eq!((q.pending(), q.recorded()), (0, 2));
        assert!(q.unflushed());
        // Aged by the first recorded unmap's time, as a queue by its oldest entry.
        assert!(!q.due(1_499) && q.due(1_500));
        q.flush(|| Ok(()), &mut |_| {}).unwrap();
        assert!(!q.unflushed() && q.recorded() == 0 && !q.due(10_000));
        // A fresh record after the flush counts from its own first time.
        assert_eq!(q.record(0, q.ticket(), 20_000), Recorded::Recorded);
        assert!(!q.due(20_999) && q.due(21_000));
    }

    #[test]
    fn the_record_that_reaches_the_count_bound_asks_for_a_flush_and_the_flush_resets_it() {
        let q = FlushQueues::<u8>::new(1, 3, u64::MAX).unwrap();
        assert_eq!(q.record(0, q.ticket(), 0), Recorded::Recorded);
        assert_eq!(q.record(0, q.ticket(), 0), Recorded::Recorded);
        assert_eq!(q.record(0, q.ticket(), 0), Recorded::Full);
        assert_eq!(q.recorded(), 3);
        q.flush(|| Ok(()), &mut |_| {}).unwrap();
        assert_eq!(q.recorded(), 0);
        assert_eq!(q.record(0, q.ticket(), 0), Recorded::Recorded);
        assert_eq!(q.recorded(), 1);
        // No record for a CPU beyond the count, nor for an already invalidated unmap.
        assert_eq!(q.record(1, q.ticket(), 0), Recorded::NoRecord);
        assert_eq!(q.record(0, FlushTicket::DONE, 0), Recorded::NoRecord);
    }

    #[test]
    fn a_failed_flush_leaves_a_record_uncovered_and_the_next_success_covers_it() {
        let q = FlushQueues::<u8>::new(1, 8, u64::MAX).unwrap();
        let _ = q.record(0, q.ticket(), 0);
        let broken = Error::InvalidationFailed { what: "test", domain: 1, status: 0 };
        assert_eq!(q.flush(|| Err(broken), &mut |_| {}), Err(broken));
        assert!(q.unflushed() && q.recorded() == 1);
        q.flush(|| Ok(()), &mut |_| {}).unwrap();
        assert!(!q.unflushed());
    }

    #[test]
    fn bad_bounds_are_errors() {
        assert!(FlushQueues::<u8>::new(0, 1, 1).is_err());
        assert!(FlushQueues::<u8>::new(1, 0, 1).is_err());
        assert!(FlushQueues::<u8>::new(1, 1, 0).is_err());
    }
}
