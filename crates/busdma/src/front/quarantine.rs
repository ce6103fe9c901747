//! Quarantine: memory a device may still reach is never given back.
//!
//! # Theory
//!
//! 1. **The rule.** Memory that busdma owns for a mapping (coherent memory, typed buffers) goes
//!    back to the platform only once no translation can reach it: its map is unloaded *and*
//!    the unload's IOTLB invalidation has completed. A strict unload that returned `Ok` proves
//!    the second; a deferred one does not (the unmap is queued), and a failed invalidation
//!    ([`Error::InvalidationFailed`](crate::Error::InvalidationFailed)) proves the opposite:
//!    the device may still hold the old translation.
//! 2. **Proof before release.** Every owner that frees mapped memory asks its tag for the proof
//!    first ([`Strategy::wait_unmapped`](super::strategy::Strategy::wait_unmapped): nothing for
//!    a healthy strict domain, one flush if an unmap is still queued, the recovery of a
//!    degraded domain). Proven: the pages go back. Not proven: the memory moves into the tag's
//!    quarantine, still allocated, still counted.
//! 3. **Release at the next proof.** While the quarantine holds memory, every successful
//!    unload through the tag asks for the proof again (one relaxed load decides whether to
//!    ask; an empty quarantine costs nothing more), as does [`Tag::reclaim`](super::Tag) (for
//!    a kernel's retry timer). The first proof releases everything held: a whole-domain
//!    invalidation that completed after the memory was quarantined covers it.
//! 4. **Never before.** If the tag goes away with memory still held, one last proof is asked;
//!    without it the memory is leaked on purpose (never freed), as the domain leaks its
//!    tables when its last invalidation fails.
//! 5. **Counted.** [`QuarantineStats`]: what is held now, what was released, what was leaked.
//!
//! # Execution context
//!
//! Holding memory may allocate (the quarantine's list grows on the failure path only; if it
//! cannot, the memory is leaked and counted); releasing frees pages. Neither sleeps.
#![forbid(unsafe_code)]

use alloc::vec::Vec;

use crate::platform::Platform;
use crate::sync::{AtomicU64, AtomicUsize, Ordering, SpinLock};

use super::coherent::DmaMemory;

/// Counters of a tag's quarantine (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuarantineStats {
    /// Buffers held now.
    pub held: u64,
    /// Pages held now.
    pub held_pages: u64,
    /// Buffers ever quarantined.
    pub quarantined: u64,
    /// Buffers released after a later proof.
    pub released: u64,
    /// Buffers leaked on purpose (no proof before the tag went away, or no memory to hold
    /// them): never freed.
    pub leaked: u64,
}

/// Memory waiting for proof that no translation reaches it (theory 2, 3).
pub(crate) struct Quarantine<'p, P: Platform> {
    held: SpinLock<Vec<DmaMemory<'p, P>>>,
    /// `held.len()`, read without the lock by the unload path (theory 3).
    count: AtomicUsize,
    pages: AtomicU64,
    quarantined: AtomicU64,
    released: AtomicU64,
    leaked: AtomicU64,
}

impl<'p, P: Platform> Quarantine<'p, P> {
    pub(crate) fn new() -> Self {
        Self {
            held: SpinLock::new(Vec::new()),
            count: AtomicUsize::new(0),
            pages: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            released: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
        }
    }

    /// Whether anything waits for a proof (one relaxed load).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.count.load(Ordering::Relaxed) == 0
    }

    /// Keeps `mem` allocated until [`Quarantine::release_all`]; if the list cannot grow, leaks
    /// it (theory 4).
    pub(crate) fn hold(&self, mem: DmaMemory<'p, P>) {
        self.quarantined.fetch_add(1, Ordering::Relaxed);
        let mut held = self.held.lock();
        if held.try_reserve(1).is_err() {
            drop(held);
            self.leak(mem);
            return;
        }
        self.pages.fetch_add(mem.pages(), Ordering::Relaxed);
        held.push(mem);
        self.count.store(held.len(), Ordering::Relaxed);
    }

    /// Gives everything held back to the platform: the caller has just proven that no
    /// translation reaches any of it (theory 3).
    pub(crate) fn release_all(&self) {
        let taken = {
            let mut held = self.held.lock();
            self.count.store(0, Ordering::Relaxed);
            core::mem::take(&mut *held)
        };
        for mem in taken {
            self.pages.fetch_sub(mem.pages(), Ordering::Relaxed);
            self.released.fetch_add(1, Ordering::Relaxed);
            drop(mem);
        }
    }

    /// Leaks everything held (theory 4).
    pub(crate) fn leak_all(&self) {
        let taken = {
            let mut held = self.held.lock();
            self.count.store(0, Ordering::Relaxed);
            core::mem::take(&mut *held)
        };
        for mem in taken {
            self.pages.fetch_sub(mem.pages(), Ordering::Relaxed);
            self.leak(mem);
        }
    }

    fn leak(&self, mem: DmaMemory<'p, P>) {
        self.leaked.fetch_add(1, Ordering::Relaxed);
        core::mem::forget(mem);
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> QuarantineStats {
        QuarantineStats {
            held: self.count.load(Ordering::Relaxed) as u64,
            held_pages: self.pages.load(Ordering::Relaxed),
            quarantined: self.quarantined.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            leaked: self.leaked.load(Ordering::Relaxed),
        }
    }
}

impl<P: Platform> Drop for Quarantine<'_, P> {
    /// The owner ([`super::tag::TagData`]) releases or leaks what is held before this runs;
    /// anything still here has no proof, so it is leaked, never freed (theory 4).
    fn drop(&mut self) {
        self.leak_all();
    }
}
