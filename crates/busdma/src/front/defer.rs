//! Deferred loads: a load that may wait, and cannot get its resources now, waits in order and
//! completes by callback when an unload or destroy frees them (FreeBSD's `EINPROGRESS`).
//!
//! # Theory
//!
//! 1. **What waits.** A load on a tag with [`TagFlags::may_wait`](super::tag::TagFlags) made
//!    through [`DmaMap::load_or_defer`] that fails for want of a resource (bounce pages, IOVA
//!    space, table pages: the strategy's [`Error::Exhausted`] or [`Error::NoMemory`], see
//!    [`is_retryable`]) is queued instead of failing. Every other error is final and returned
//!    at once, as is every error of a tag that may not wait and of [`DmaMap::load`], the
//!    no-wait load: it fails with the strategy's error and leaves nothing behind.
//! 2. **Ownership.** `load_or_defer` consumes the map. A deferred load moves the map's body
//!    (the strategy's state, the segment and run arrays, the collected runs) into the map's
//!    *wait node* and hands the caller a [`PendingLoad`], which owns the rest of the map. So
//!    while a load is pending there is no [`DmaMap`] to sync, unload, reload or read: the type
//!    system, not a run-time check, forbids reuse. The pending load can be asked whether it is
//!    done, finished into its map ([`PendingLoad::try_finish`]), cancelled
//!    ([`PendingLoad::cancel`]) or dropped (theory 7). The source is read once, at
//!    `load_or_defer`: a retry places the runs it collected, so nothing borrowed from the
//!    caller is kept (the memory itself must stay valid, as for any load).
//! 3. **Order and fairness.** One FIFO per tree of tags (the root's; children share it; a
//!    child may wait only if its root may). Loads complete in arrival order: only the head is
//!    retried, and a head that still does not fit blocks those behind it, however small (a
//!    large request is never starved by small ones). A may-wait load that arrives while others
//!    wait is queued behind them without trying; a no-wait load that arrives while others wait
//!    is refused with [`Error::Busy`] (count: loads waiting) rather than taking what the head
//!    waits for. Only loads of the same tree are ordered: another tree on the same domain or
//!    bounce zone is not (as FreeBSD orders waiters per bounce zone, not per machine).
//! 4. **When loads are retried.** After every unload and every destroy of a map of the tree
//!    (they free IOVA, bounce pages, table entries, reserved windows), once right after a load
//!    is queued (so a resource freed between the failed attempt and the queuing is not
//!    missed), and on [`Tag::retry_deferred`](super::tag::Tag::retry_deferred), for resources
//!    freed outside the tree. The unload side decides whether to retry with one atomic
//!    read-modify-write of the waiting count, never a plain load: the queuing side's increment
//!    is also a read-modify-write, and two RMWs of one atomic are totally ordered, so either
//!    the unload sees the waiter or the waiter's retry (which follows its increment and
//!    acquires it) sees everything the unload freed before its RMW. No wake-up is lost, and a
//!    tree with no waiter pays one uncontended RMW per unload.
//! 5. **Execution context of callbacks.** A deferred load's callback runs on the thread of
//!    the call that made its resources available: the unload, destroy, `retry_deferred` or
//!    cancellation, or the `load_or_defer` itself if the retry just after queuing succeeds;
//!    after that call's own work is complete, with no busdma lock held, in the caller's
//!    preemption state. Platform rules therefore apply to callbacks as to the unload that
//!    runs them: a callback must not sleep and should be brief (program the device, sync,
//!    post a message); it may call busdma (load, unload, sync other maps, queue more loads):
//!    one servicer runs at a time per tree, and an unload inside a callback only flags the
//!    running servicer to look again, so callbacks never recurse.
//! 6. **Exactly once.** Every deferred load's callback runs exactly once: with
//!    `Ok(`[`DeferredMap`]`)` (the segments, and `sync`, so the callback can start the
//!    device), with the final error of a retry that failed for a reason other than a
//!    resource, or with [`Error::Cancelled`]. The callback is taken out of the wait node
//!    under its lock before it runs, so no second servicer can find it.
//! 7. **Cancellation and destroy.** [`PendingLoad::cancel`] of a queued load removes it, runs
//!    its callback with `Err(Error::Cancelled)` on the calling thread, and returns the map,
//!    unloaded. Dropping a [`PendingLoad`] is the destroy of a map with a pending load: a
//!    queued load is cancelled the same way, then the map is destroyed; a completed one is
//!    unloaded and destroyed. A load being retried at that moment (another thread holds its
//!    body) cannot be stopped: `cancel` refuses (the pending load comes back), drop marks it
//!    abandoned, and the retrying thread, seeing the mark, runs the callback with
//!    `Err(Error::Cancelled)` (or, if it already ran with the segments, nothing more) and
//!    unloads and destroys the body itself. Nobody waits for anybody, so a callback may even
//!    drop its own pending load. Removing a waiter retries those behind it.
//! 8. **Allocation.** Deferring allocates nothing: the wait node is allocated at map create
//!    (tags that may wait only), and the FIFO's capacity is kept at least the number of such
//!    maps, grown at create outside the lock; the callback's box is the caller's.
//! 9. **Locks.** The queue's [`SpinLock`] guards the FIFO and the servicer flags; each node's
//!    guards its slot; order: queue, then node. Neither is held across a strategy call or a
//!    callback. A wait node is `Idle` (its map holds its body), `Queued` (in the FIFO, body
//!    inside), `Running` (a servicer holds the body) or `Done` (body inside, outcome
//!    recorded).
#![forbid(unsafe_code)]

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;

use crate::error::{Error, Result};
use crate::platform::Platform;
use crate::sync::{AtomicU64, AtomicUsize, Ordering, SpinLock};

use super::cache_sync::{SyncOp, SyncStats};
use super::load::LoadSource;
use super::map::{Body, Ctx, Direction, DmaMap};
use super::segments::Segment;
use super::strategy::Strategy;
use super::tag::{Tag, TagSpec};

/// What a deferred load runs when it completes (theory 6): `Ok` with the loaded map's view,
/// or the final error ([`Error::Cancelled`] if it was cancelled).
pub type DeferredCallback<'p, P, S> = Box<dyn for<'a> FnOnce(Result<DeferredMap<'a, 'p, P, S>>) + Send + 'p>;

/// Whether a load that failed with `e` may succeed later without any change by the caller:
/// a resource ran short ([`Error::Exhausted`]: IOVA space, bounce pages; [`Error::NoMemory`]:
/// table pages, memory). Such a load is deferred on a tag that may wait.
#[inline]
pub fn is_retryable(e: Error) -> bool {
    matches!(e, Error::Exhausted { .. } | Error::NoMemory { .. })
}

/// Counters of a tree's deferred loads ([`Tag::deferred_stats`](super::tag::Tag::deferred_stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeferStats {
    /// Loads queued or being retried now.
    pub waiting: u64,
    /// Loads deferred so far.
    pub deferred: u64,
    /// Deferred loads that completed with their segments.
    pub completed: u64,
    /// Deferred loads that completed with a final error.
    pub failed: u64,
    /// Deferred loads cancelled (by `cancel` or by dropping their pending load).
    pub cancelled: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Queued,
    Running,
    Done,
}

/// What a retry needs to know about the waiting map.
#[derive(Clone, Copy, Debug)]
struct Job {
    spec: TagSpec,
    tag_id: u64,
    map_id: u64,
    dir: Direction,
}

/// # Invariants
///
/// `Queued` and `Done`: `body` and `job` are `Some`; `Queued`: `callback` is `Some` and the
/// node is in its queue's FIFO exactly once; `Running`: a servicer holds the body, the node is
/// in no FIFO; `Idle`: `body` is `None` (its map holds it).
struct Slot<'p, P: Platform, S: Strategy<P>> {
    phase: Phase,
    abandoned: bool,
    body: Option<Body<S::MapState>>,
    job: Option<Job>,
    callback: Option<DeferredCallback<'p, P, S>>,
    outcome: Option<Result<()>>,
}

/// A map's wait node (theory 8, 9).
pub(crate) struct Node<'p, P: Platform, S: Strategy<P>> {
    slot: SpinLock<Slot<'p, P, S>>,
}

/// # Invariants
///
/// `q.capacity() >= nodes`, where `nodes` counts the wait nodes of live maps; each node is in
/// `q` at most once, so pushing a node that is not in `q` never allocates.
struct Fifo<'p, P: Platform, S: Strategy<P>> {
    q: VecDeque<Arc<Node<'p, P, S>>>,
    nodes: usize,
    servicing: bool,
    again: bool,
}

/// The deferred loads of one tree of tags.
pub(crate) struct DeferQueue<'p, P: Platform, S: Strategy<P>> {
    fifo: SpinLock<Fifo<'p, P, S>>,
    /// Nodes `Queued` or `Running` (theory 4: only ever read-modify-written on the wake path).
    waiting: AtomicUsize,
    deferred: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
}

/// What [`DeferQueue::take`] found.
enum Taken<'p, P: Platform, S: Strategy<P>> {
    /// Removed from the FIFO: the body and the callback, which the caller runs.
    Cancelled(Option<Body<S::MapState>>, Option<DeferredCallback<'p, P, S>>),
    /// A servicer holds it (and, if asked, it is now marked abandoned).
    Running,
    /// Completed: the body.
    Done(Option<Body<S::MapState>>),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TakeMode {
    /// Only a completed load.
    Finish,
    /// A completed or a queued one (cancelled).
    Cancel,
    /// Any: a running one is marked abandoned.
    Abandon,
}

impl<'p, P: Platform, S: Strategy<P>> DeferQueue<'p, P, S> {
    pub(crate) fn new() -> Self {
        Self {
            fifo: SpinLock::new(Fifo { q: VecDeque::new(), nodes: 0, servicing: false, again: false }),
            waiting: AtomicUsize::new(0),
            deferred: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        }
    }

    pub(crate) fn stats(&self) -> DeferStats {
        DeferStats {
            waiting: self.waiting.load(Ordering::Acquire) as u64,
            deferred: self.deferred.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
        }
    }

    /// A wait node for a new map, with room for it in the FIFO (theory 8). Allocates.
    ///
    /// Errors: [`Error::NoMemory`] (the FIFO could not grow).
    pub(crate) fn new_node(&self) -> Result<Arc<Node<'p, P, S>>> {
        let node = Arc::new(Node {
            slot: SpinLock::new(Slot {
                phase: Phase::Idle,
                abandoned: false,
                body: None,
                job: None,
                callback: None,
                outcome: None,
            }),
        });
        loop {
            let want = {
                let mut f = self.fifo.lock();
                if f.q.capacity() > f.nodes {
                    // INVARIANT: capacity >= nodes after the increment.
                    f.nodes += 1;
                    return Ok(node);
                }
                // Doubling keeps map creation amortised O(1); 4 spares small trees a
                // reallocation per map.
                (f.nodes + 1).max(f.q.capacity().saturating_mul(2)).max(4)
            };
            // Allocate outside the spin lock (an allocator may block).
            let mut bigger = VecDeque::new();
            bigger.try_reserve_exact(want).map_err(|_| Error::NoMemory {
                requested: (want * core::mem::size_of::<Arc<Node<'p, P, S>>>()) as u64,
            })?;
            let old = {
                let mut f = self.fifo.lock();
                if f.q.capacity() <= f.nodes && bigger.capacity() > f.q.len() {
                    // No allocation: `bigger` has room for every queued node.
                    bigger.extend(f.q.drain(..));
                    core::mem::swap(&mut f.q, &mut bigger);
                }
                bigger
            };
            // The smaller array (or the unused one) is freed outside the lock; loop to
            // re-check against maps created meanwhile.
            drop(old);
        }
    }

    /// A map with a wait node is gone.
    pub(crate) fn release_node(&self, node: Arc<Node<'p, P, S>>) {
        let mut f = self.fifo.lock();
        f.nodes = f.nodes.saturating_sub(1);
        drop(f);
        drop(node);
    }

    /// The no-wait fairness rule (theory 3).
    #[inline]
    pub(crate) fn refuse_if_waiters(&self) -> Result<()> {
        match self.waiting.load(Ordering::Acquire) {
            0 => Ok(()),
            n => Err(Error::Busy { what: "deferred loads of this tag tree waiting ahead", count: n as u64 }),
        }
    }

    /// After something was freed: retries if anyone waits (theory 4).
    #[inline]
    pub(crate) fn wake(&self, tag: &Tag<'p, P, S>) {
        // A read-modify-write, not a load: it pairs with `enqueue`'s increment (theory 4).
        if self.waiting.fetch_add(0, Ordering::AcqRel) != 0 {
            self.service(tag);
        }
    }

    fn enqueue(
        &self,
        node: &Arc<Node<'p, P, S>>,
        body: Body<S::MapState>,
        job: Job,
        cb: DeferredCallback<'p, P, S>,
    ) {
        let mut f = self.fifo.lock();
        {
            let mut s = node.slot.lock();
            // INVARIANT: Queued with body, job and callback.
            s.phase = Phase::Queued;
            s.abandoned = false;
            s.body = Some(body);
            s.job = Some(job);
            s.callback = Some(cb);
            s.outcome = None;
        }
        // No allocation: this node is counted in `nodes` and not in `q`, so len < capacity.
        f.q.push_back(node.clone());
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.deferred.fetch_add(1, Ordering::Relaxed);
    }

    /// Retries waiting loads head first until the FIFO is empty or its head does not fit
    /// (theory 3, 4); one servicer at a time.
    pub(crate) fn service(&self, tag: &Tag<'p, P, S>) {
        {
            let mut f = self.fifo.lock();
            if f.servicing {
                f.again = true;
                return;
            }
            f.servicing = true;
            f.again = false;
        }
        loop {
            let claimed = {
                let mut f = self.fifo.lock();
                let Some(node) = f.q.pop_front() else {
                    f.servicing = false;
                    return;
                };
                let mut s = node.slot.lock();
                s.phase = Phase::Running;
                let (body, job) = (s.body.take(), s.job);
                drop(s);
                (node, body, job)
            };
            let (node, Some(mut body), Some(job)) = claimed else {
                // Unreachable by the slot invariant; a node without its body cannot be retried.
                continue;
            };
            let cx = Ctx { tag: &**tag, spec: &job.spec, tag_id: job.tag_id, map_id: job.map_id };
            body.segs.clear();
            let r = cx.place(&mut body, job.dir);
            if let Err(e) = r {
                if is_retryable(e) {
                    let mut f = self.fifo.lock();
                    let mut s = node.slot.lock();
                    if !s.abandoned {
                        s.body = Some(body);
                        s.phase = Phase::Queued;
                        drop(s);
                        // No allocation: the node was just popped.
                        f.q.push_front(node);
                        if f.again {
                            // Something was freed while we tried: try again.
                            f.again = false;
                            continue;
                        }
                        f.servicing = false;
                        return;
                    }
                    drop(s);
                    drop(f);
                    self.complete(&cx, job, &node, body, Err(Error::Cancelled));
                    continue;
                }
            }
            self.complete(&cx, job, &node, body, r);
        }
    }

    /// Ends the `Running` load of `node` with `r` (theory 6, 7).
    fn complete(
        &self,
        cx: &Ctx<'_, 'p, P, S>,
        job: Job,
        node: &Node<'p, P, S>,
        mut body: Body<S::MapState>,
        r: Result<()>,
    ) {
        match r {
            Ok(()) => {
                let len = body.runs.iter().map(|r| r.len).sum();
                cx.set_loaded(&mut body, job.dir, len);
                self.completed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                body.runs.clear();
                body.segs.clear();
                let counter = if e == Error::Cancelled { &self.cancelled } else { &self.failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        let cb = node.slot.lock().callback.take();
        if let Some(cb) = cb {
            match r {
                Ok(()) => cb(Ok(DeferredMap { cx: cx.copy(), body: &mut body })),
                Err(e) => cb(Err(e)),
            }
        }
        let mut s = node.slot.lock();
        if s.abandoned {
            // The owner is gone: nobody else will ever see this body.
            s.phase = Phase::Idle;
            s.job = None;
            drop(s);
            cx.destroy(&mut body);
        } else {
            // INVARIANT: Done with body and job.
            s.outcome = Some(r);
            s.body = Some(body);
            s.phase = Phase::Done;
        }
    }

    /// Takes `node`'s load back from the queue as `mode` allows.
    fn take(&self, node: &Arc<Node<'p, P, S>>, mode: TakeMode) -> Taken<'p, P, S> {
        let mut f = self.fifo.lock();
        let mut s = node.slot.lock();
        match s.phase {
            Phase::Done => {
                s.phase = Phase::Idle;
                s.job = None;
                Taken::Done(s.body.take())
            }
            Phase::Queued if mode != TakeMode::Finish => {
                if let Some(i) = f.q.iter().position(|n| Arc::ptr_eq(n, node)) {
                    f.q.remove(i);
                }
                s.phase = Phase::Idle;
                s.job = None;
                s.outcome = Some(Err(Error::Cancelled));
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                self.cancelled.fetch_add(1, Ordering::Relaxed);
                let mut body = s.body.take();
                if let Some(b) = body.as_mut() {
                    // The runs were kept for retries; the map comes back unloaded.
                    b.runs.clear();
                    b.segs.clear();
                }
                Taken::Cancelled(body, s.callback.take())
            }
            Phase::Running if mode == TakeMode::Abandon => {
                s.abandoned = true;
                Taken::Running
            }
            // Queued and asked to finish, Running and not abandoning: still pending. Idle
            // cannot be (a pending load's node is never Idle): treat it as still pending.
            _ => Taken::Running,
        }
    }
}

/// The outcome of [`DmaMap::load_or_defer`] that did not fail at once.
pub enum Deferrable<'p, P: Platform, S: Strategy<P>> {
    /// Loaded at once (the callback was dropped without running).
    Loaded(DmaMap<'p, P, S>),
    /// Queued: the callback runs later, exactly once (theory 6).
    Deferred(PendingLoad<'p, P, S>),
}

impl<'p, P: Platform, S: Strategy<P>> Deferrable<'p, P, S> {
    /// Whether the load was deferred.
    pub fn is_deferred(&self) -> bool {
        matches!(self, Deferrable::Deferred(_))
    }
}

impl<'p, P: Platform, S: Strategy<P>> DmaMap<'p, P, S> {
    /// Loads `src` for a transfer in direction `dir`, or, if the tag may wait and a resource
    /// is short, queues the load (theory 1 to 4): `done` then runs exactly once, later, with
    /// the loaded map's segments or the final error, in the context theory 5 describes.
    ///
    /// On a tag that may not wait this is [`DmaMap::load`]: it fails at once. A map whose tag
    /// may wait allocates nothing here (beyond the caller's `done` box).
    ///
    /// Errors (the map comes back with the error, unloaded, nothing leaked): those of
    /// [`DmaMap::load`] except [`Error::Busy`] (a may-wait load queues behind waiters
    /// instead), and on a tag that may wait, exhaustion only if it is not retryable.
    #[allow(clippy::result_large_err)]
    pub fn load_or_defer<L: LoadSource>(
        mut self,
        src: &L,
        dir: Direction,
        done: DeferredCallback<'p, P, S>,
    ) -> core::result::Result<Deferrable<'p, P, S>, (Error, Self)> {
        let (q, node) = match (&self.tag.defer, &self.node) {
            (Some(q), Some(node)) if self.tag.spec.flags.may_wait => (q.clone(), node.clone()),
            _ => {
                return match self.load(src, dir) {
                    Ok(_) => Ok(Deferrable::Loaded(self)),
                    Err(e) => Err((e, self)),
                };
            }
        };
        if self.body.loaded.is_some() {
            return Err((Error::BadState { what: "load into a map that is already loaded" }, self));
        }
        let (cx, body) = self.cx();
        let len = match cx.collect(body, src) {
            Ok(len) => len,
            Err(e) => {
                body.runs.clear();
                return Err((e, self));
            }
        };
        if q.waiting.load(Ordering::Acquire) == 0 {
            match cx.place(body, dir) {
                Ok(()) => {
                    cx.set_loaded(body, dir, len);
                    return Ok(Deferrable::Loaded(self));
                }
                Err(e) if !is_retryable(e) => {
                    body.runs.clear();
                    body.segs.clear();
                    return Err((e, self));
                }
                Err(_) => body.segs.clear(),
            }
        }
        let body = core::mem::replace(&mut self.body, Body::EMPTY);
        let job = Job { spec: self.tag.spec, tag_id: self.tag.id, map_id: self.id, dir };
        q.enqueue(&node, body, job, done);
        let tag = self.tag.clone();
        // INVARIANT: the map's body is in its node, which is Queued (or later).
        let pending = PendingLoad { map: Some(self) };
        // Theory 4: a resource freed between the failed attempt and the queuing.
        q.service(&tag);
        Ok(Deferrable::Deferred(pending))
    }
}

/// A map whose load is deferred: owns the map until the load completes or is cancelled
/// (theory 2, 7). Dropping it destroys the map (cancelling the load if it is still queued).
///
/// # Invariants
///
/// `map` is `Some` until drop or hand-back; it has a wait node, and its body is in that node
/// (or held by a servicer) rather than in the map.
pub struct PendingLoad<'p, P: Platform, S: Strategy<P>> {
    map: Option<DmaMap<'p, P, S>>,
}

impl<'p, P: Platform, S: Strategy<P>> PendingLoad<'p, P, S> {
    fn node(&self) -> Option<&Arc<Node<'p, P, S>>> {
        self.map.as_ref().and_then(|m| m.node.as_ref())
    }

    /// The id of the waiting map.
    pub fn map_id(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.id)
    }

    /// Whether the load has completed (its callback has run).
    pub fn is_done(&self) -> bool {
        self.node().is_some_and(|n| n.slot.lock().phase == Phase::Done)
    }

    /// The load's outcome once completed: `Ok(())` loaded, or the final error.
    pub fn outcome(&self) -> Option<Result<()>> {
        self.node().and_then(|n| {
            let s = n.slot.lock();
            if s.phase == Phase::Done { s.outcome } else { None }
        })
    }

    /// Hands `body` back to the map and the map to the caller.
    fn hand_back(&mut self, body: Option<Body<S::MapState>>) -> Option<DmaMap<'p, P, S>> {
        let mut map = self.map.take()?;
        if let Some(body) = body {
            map.body = body;
        }
        Some(map)
    }

    /// The map, once the load has completed: loaded if it succeeded, unloaded (and the
    /// callback got the error) if not. While the load is pending, the pending load comes back.
    #[allow(clippy::result_large_err)]
    pub fn try_finish(mut self) -> core::result::Result<DmaMap<'p, P, S>, Self> {
        let (Some(node), Some(q)) =
            (self.node().cloned(), self.map.as_ref().and_then(|m| m.tag.defer.clone()))
        else {
            return Err(self);
        };
        match q.take(&node, TakeMode::Finish) {
            Taken::Done(body) => self.hand_back(body).ok_or(self),
            _ => Err(self),
        }
    }

    /// Cancels the load if it is still queued: its callback runs now, on this thread, with
    /// `Err(`[`Error::Cancelled`]`)`, and the map comes back unloaded; loads queued behind it
    /// are retried. A completed load's map comes back as it is (loaded if it succeeded). A
    /// load being retried on another thread right now cannot be cancelled: the pending load
    /// comes back.
    #[allow(clippy::result_large_err)]
    pub fn cancel(mut self) -> core::result::Result<DmaMap<'p, P, S>, Self> {
        let (Some(node), Some(q)) =
            (self.node().cloned(), self.map.as_ref().and_then(|m| m.tag.defer.clone()))
        else {
            return Err(self);
        };
        match q.take(&node, TakeMode::Cancel) {
            Taken::Done(body) => self.hand_back(body).ok_or(self),
            Taken::Cancelled(body, cb) => {
                let map = self.hand_back(body).ok_or(self)?;
                if let Some(cb) = cb {
                    cb(Err(Error::Cancelled));
                }
                q.service(&map.tag);
                Ok(map)
            }
            Taken::Running => Err(self),
        }
    }
}

impl<P: Platform, S: Strategy<P>> Drop for PendingLoad<'_, P, S> {
    fn drop(&mut self) {
        let (Some(node), Some(q)) =
            (self.node().cloned(), self.map.as_ref().and_then(|m| m.tag.defer.clone()))
        else {
            return;
        };
        match q.take(&node, TakeMode::Abandon) {
            Taken::Done(body) => {
                // Dropping the map unloads and destroys it, and wakes waiters.
                drop(self.hand_back(body));
            }
            Taken::Cancelled(body, cb) => {
                let map = self.hand_back(body);
                if let Some(cb) = cb {
                    cb(Err(Error::Cancelled));
                }
                if let Some(map) = map {
                    let tag = map.tag.clone();
                    drop(map);
                    q.service(&tag);
                }
            }
            // Abandoned: the servicer finishes it (theory 7); the map's shell goes now.
            Taken::Running => drop(self.map.take()),
        }
    }
}

impl<P: Platform, S: Strategy<P>> core::fmt::Debug for PendingLoad<'_, P, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let phase = self.node().map(|n| n.slot.lock().phase);
        f.debug_struct("PendingLoad").field("map", &self.map_id()).field("phase", &phase).finish()
    }
}

impl<P: Platform, S: Strategy<P>> core::fmt::Debug for Deferrable<'_, P, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Deferrable::Loaded(m) => f.debug_tuple("Loaded").field(m).finish(),
            Deferrable::Deferred(p) => f.debug_tuple("Deferred").field(p).finish(),
        }
    }
}

/// The loaded map a deferred load's callback sees (theory 6): its segments, and `sync`, so
/// the callback can start the device. The map itself stays with its [`PendingLoad`].
pub struct DeferredMap<'a, 'p, P: Platform, S: Strategy<P>> {
    cx: Ctx<'a, 'p, P, S>,
    body: &'a mut Body<S::MapState>,
}

impl<P: Platform, S: Strategy<P>> DeferredMap<'_, '_, P, S> {
    /// The id of the loaded map.
    pub fn map_id(&self) -> u64 {
        self.cx.map_id
    }

    /// The segments of the load.
    pub fn segments(&self) -> &[Segment] {
        &self.body.segs
    }

    /// Bytes loaded.
    pub fn len(&self) -> u64 {
        self.body.loaded.map_or(0, |l| l.len)
    }

    /// Whether nothing is loaded (never, for a completed load).
    pub fn is_empty(&self) -> bool {
        self.body.loaded.is_none()
    }

    /// [`DmaMap::sync`] of the loaded map.
    pub fn sync(&mut self, op: SyncOp) -> Result<SyncStats> {
        self.cx.sync(self.body, op)
    }

    /// [`DmaMap::sync_range`] of the loaded map.
    pub fn sync_range(&mut self, op: SyncOp, offset: u64, len: u64) -> Result<SyncStats> {
        self.cx.sync_range(self.body, op, offset, Some(len))
    }
}
