//! A hand-written epoch scheme: lock-free, allocation-free read sections for the registry.
//!
//! # Theory
//!
//! 1. **What it protects.** Writers (register, unregister) never change memory a reader can
//!    reach; they build a new index next to the old one, publish it with one pointer store and
//!    *retire* what the new index no longer reaches (the old top level, a replaced leaf, an
//!    unregistered region). Retired memory is freed only after every reader that could have
//!    seen it has left its read section: that waiting is what this module decides.
//! 2. **State.** A global epoch number `now` and two reader counters, one per epoch parity.
//!    A reader entering during epoch `e` is counted in `readers[e & 1]` until it leaves.
//! 3. **Entering** (readers, lock-free, allocation-free, never blocks on a writer): load `e`,
//!    increment `readers[e & 1]`, load `now` again; if it moved, undo and retry. A reader whose
//!    re-check succeeded is counted in the parity of an epoch that was current *after* its
//!    increment, so a writer that later advances past that epoch sees it: a `SeqCst` fence
//!    between the reader's increment and its re-check, and another before the writer's counter
//!    load, order the two sides (the store-load pattern of Dekker's algorithm). Retrying is
//!    bounded: `now` moves only when a writer completes an operation.
//! 4. **Advancing** (writers, under the registry's writer lock, so one at a time): from `e` to
//!    `e + 1` only when `readers[(e + 1) & 1]`, the counter of epoch `e - 1`, is zero. The
//!    advance never waits: when readers remain, it simply does not happen now.
//! 5. **Grace period.** Memory unlinked during epoch `e` is freed once `now >= e + 2`.
//!    Proof: a reader that can reach it loaded the index before the unlink, hence re-checked
//!    the epoch before it, at some `e' <= e`. If `e' = e` it was counted in `readers[e & 1]`,
//!    which had to drain for the advance `e + 1 -> e + 2`; if `e' = e - 1`, in
//!    `readers[(e - 1) & 1]`, drained for `e -> e + 1`; if `e' <= e - 2` it had to leave before
//!    the advance into `e` (which drained its parity), i.e. before the unlink, a contradiction.
//! 6. **Cost.** A read section is two atomic increments of a shared word and two loads; it is
//!    meant to cover a batch of translations (real-mode TCE updates translate many entries
//!    under one section), not one each. Writers pay nothing extra and never block: garbage
//!    waits in a list until a later write, or an explicit `synchronize`, frees it.

use crate::sync::{AtomicUsize, Ordering, fence, spin_hint};

/// The epoch clock and its reader counters.
///
/// # Invariants
///
/// `now` is modified only by [`Epoch::try_advance`], which callers serialise (the registry's
/// writer lock). `readers[p]` counts the readers inside a section entered during an epoch of
/// parity `p` (plus, transiently, readers about to retry).
#[derive(Debug)]
pub(crate) struct Epoch {
    now: AtomicUsize,
    readers: [AtomicUsize; 2],
}

impl Epoch {
    pub(crate) fn new() -> Self {
        // Epoch 2, not 0, so that "retired at e, free once now >= e + 2" needs no special case
        // for the first epochs (nothing is ever tagged below 2).
        Self { now: AtomicUsize::new(2), readers: [AtomicUsize::new(0), AtomicUsize::new(0)] }
    }

    /// Enters a read section; returns the parity slot to pass to [`Epoch::exit`].
    #[inline]
    pub(crate) fn enter(&self) -> usize {
        loop {
            let e = self.now.load(Ordering::SeqCst);
            let slot = e & 1;
            self.readers[slot].fetch_add(1, Ordering::SeqCst);
            // Store-load order (Dekker): our increment before our re-check and our load of the
            // index, against a writer's index swap and epoch store before its counter load
            // (the matching fence is in `try_advance`). SeqCst accesses alone do not promise
            // this in every model (loom treats them as AcqRel); SeqCst fences do.
            fence(Ordering::SeqCst);
            if self.now.load(Ordering::SeqCst) == e {
                return slot;
            }
            // A writer advanced between our load and our increment: we might be counted in a
            // parity it has already checked. Undo and enter the new epoch instead.
            self.readers[slot].fetch_sub(1, Ordering::SeqCst);
            spin_hint();
        }
    }

    /// Leaves a read section entered with [`Epoch::enter`].
    #[inline]
    pub(crate) fn exit(&self, slot: usize) {
        // Release: every load the reader made in its section happens before a writer's
        // acquire load that sees the counter drained, hence before any free that follows it.
        self.readers[slot].fetch_sub(1, Ordering::Release);
    }

    /// The current epoch (the tag of memory retired now). Writers only.
    #[inline]
    pub(crate) fn now(&self) -> usize {
        self.now.load(Ordering::SeqCst)
    }

    /// Advances the epoch by one if no reader of the previous epoch remains; returns the epoch
    /// now current. Writers only, serialised by the caller.
    pub(crate) fn try_advance(&self) -> usize {
        // Pairs with the fence in `enter`: the index swap and the previous epoch store come
        // before the counter load below, so a reader that loaded the old index is seen.
        fence(Ordering::SeqCst);
        let e = self.now.load(Ordering::SeqCst);
        if self.readers[(e + 1) & 1].load(Ordering::SeqCst) != 0 {
            return e;
        }
        self.now.store(e + 1, Ordering::SeqCst);
        e + 1
    }

    /// True if memory retired during epoch `tag` may be freed now (section 5).
    #[inline]
    pub(crate) fn is_safe(&self, tag: usize) -> bool {
        self.now() >= tag + 2
    }
}
