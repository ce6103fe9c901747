//! Loom models of the deferred-invalidation flush queues: every interleaving of unmappers,
//! flushers and a device's table walks, with the real `FlushQueues` / `FlushGenerations`
//! code (built with loom's atomics under `--cfg loom`).
//!
//! The "hardware" is one IOTLB slot per mapping: a walk reads the page-table entry and, if it
//! is present, caches it; an invalidation empties the slot. A walk and an invalidation
//! exclude each other (hardware completes an invalidation only after the walks in flight),
//! which is what the model IOMMU's generation rule implements. The property: when an item is
//! released (its IOVA could be reused), no IOTLB slot holds its old translation.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

use busdma::iommu::flushq::{FlushQueues, Pushed, Recorded};

const PA: u64 = 0x7000;

struct Hw {
    pte: [AtomicU64; 2],
    tlb: Mutex<[u64; 2]>,
}

impl Hw {
    fn new(cached: bool) -> Self {
        let c = if cached { PA } else { 0 };
        Self { pte: [AtomicU64::new(PA), AtomicU64::new(PA)], tlb: Mutex::new([c, c]) }
    }

    fn walk(&self, i: usize) {
        let mut t = self.tlb.lock().unwrap();
        let v = self.pte[i].load(Ordering::Acquire);
        if v != 0 {
            t[i] = v;
        }
    }

    fn invalidate_all(&self) -> busdma::Result<()> {
        *self.tlb.lock().unwrap() = [0, 0];
        Ok(())
    }

    /// The release check: item `i`'s translation is gone from the IOTLB.
    fn released(&self, i: usize, count: &AtomicU64) {
        assert_eq!(self.tlb.lock().unwrap()[i], 0, "item {i} released while its translation is cached");
        count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Clears entry `i` (an unmap), queues it on `cpu`, and flushes when the queue says so.
fn unmap(hw: &Hw, fq: &FlushQueues<usize>, released: &AtomicU64, cpu: usize, i: usize) {
    hw.pte[i].store(0, Ordering::Release);
    let t = fq.ticket();
    let mut release = |it: usize| hw.released(it, released);
    match fq.push(cpu, t, 0, i, &mut release) {
        Pushed::Queued => {}
        Pushed::QueuedFull => {
            fq.flush(|| hw.invalidate_all(), &mut release).unwrap();
        }
        Pushed::NoRoom(it) => {
            fq.flush(|| hw.invalidate_all(), &mut release).unwrap();
            release(it);
        }
    }
}

/// Clears entry `i` (an unmap that frees nothing: a reserved window's), records it on `cpu`
/// (flushq rule 8) and flushes when the record says so; returns the ticket the window's owner
/// keeps.
fn unmap_recorded(hw: &Hw, fq: &FlushQueues<usize>, cpu: usize, i: usize) -> busdma::iommu::FlushTicket {
    hw.pte[i].store(0, Ordering::Release);
    let t = fq.ticket();
    match fq.record(cpu, t, 0) {
        Recorded::Recorded => {}
        Recorded::Full => {
            fq.flush(|| hw.invalidate_all(), &mut |_| {}).unwrap();
        }
        Recorded::NoRecord => panic!("cpu {cpu} has a record"),
    }
    t
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    // Three preemptions find the store-buffering and coalescing races (each needs two) and
    // keep every model well under the 60 s budget.
    b.preemption_bound = Some(3);
    b.check(f);
}

#[test]
fn an_item_is_released_only_after_an_invalidation_that_saw_its_clear() {
    model(|| {
        let hw = Arc::new(Hw::new(true));
        // One entry per queue: the unmap that queues it also flushes.
        let fq = Arc::new(FlushQueues::new(2, 1, u64::MAX).unwrap());
        let released = Arc::new(AtomicU64::new(0));
        let device = {
            let hw = hw.clone();
            thread::spawn(move || hw.walk(0))
        };
        let flusher = {
            let (hw, fq, r) = (hw.clone(), fq.clone(), released.clone());
            thread::spawn(move || {
                fq.flush(|| hw.invalidate_all(), &mut |it| hw.released(it, &r)).unwrap();
            })
        };
        unmap(&hw, &fq, &released, 0, 0);
        device.join().unwrap();
        flusher.join().unwrap();
        assert_eq!(released.load(Ordering::Relaxed), 1, "released exactly once");
    });
}

#[test]
fn a_coalesced_flush_never_skips_an_invalidation_a_clear_needs() {
    model(|| {
        let hw = Arc::new(Hw::new(false));
        let fq = Arc::new(FlushQueues::new(2, 1, u64::MAX).unwrap());
        let released = Arc::new(AtomicU64::new(0));
        let other = {
            let (hw, fq, r) = (hw.clone(), fq.clone(), released.clone());
            thread::spawn(move || {
                hw.walk(1);
                unmap(&hw, &fq, &r, 1, 1);
            })
        };
        hw.walk(0);
        unmap(&hw, &fq, &released, 0, 0);
        other.join().unwrap();
        assert_eq!(released.load(Ordering::Relaxed), 2);
        let g = fq.generations();
        assert!(g.started() == g.finished() && (1..=2).contains(&g.finished()));
    });
}

#[test]
fn an_item_left_queued_is_released_by_a_later_flush_from_another_cpu() {
    model(|| {
        let hw = Arc::new(Hw::new(true));
        // Room for two: the unmap queues without flushing.
        let fq = Arc::new(FlushQueues::new(2, 2, u64::MAX).unwrap());
        let released = Arc::new(AtomicU64::new(0));
        let t = {
            let (hw, fq, r) = (hw.clone(), fq.clone(), released.clone());
            thread::spawn(move || unmap(&hw, &fq, &r, 0, 0))
        };
        // Another CPU flushes concurrently: it may run before the clear (then it must not
        // release the item, and does not) or after.
        fq.flush(|| hw.invalidate_all(), &mut |it| hw.released(it, &released)).unwrap();
        t.join().unwrap();
        fq.flush(|| hw.invalidate_all(), &mut |it| hw.released(it, &released)).unwrap();
        assert_eq!(released.load(Ordering::Relaxed), 1);
        assert_eq!(fq.pending(), 0);
    });
}

/// `Domain::flush_queued` (the unpin barrier of registered memory) flushes only if some
/// queue is non-empty. The claim: once an unmap has returned, a barrier that finds every queue
/// empty may skip the flush, because the unmap's entry left its queue only after a covering
/// flush finished. The barrier here is the same two steps, racing another CPU's flush.
#[test]
fn an_unpin_barrier_after_an_unmap_returned_leaves_no_translation_cached() {
    model(|| {
        let hw = Arc::new(Hw::new(true));
        // Room for two: the unmap queues without flushing.
        let fq = Arc::new(FlushQueues::new(2, 2, u64::MAX).unwrap());
        let released = Arc::new(AtomicU64::new(0));
        let returned = Arc::new(AtomicU64::new(0));
        let unmapper = {
            let (hw, fq, r, done) = (hw.clone(), fq.clone(), released.clone(), returned.clone());
            thread::spawn(move || {
                unmap(&hw, &fq, &r, 0, 0);
                done.store(1, Ordering::Release);
            })
        };
        let flusher = {
            let (hw, fq, r) = (hw.clone(), fq.clone(), released.clone());
            thread::spawn(move || {
                fq.flush(|| hw.invalidate_all(), &mut |it| hw.released(it, &r)).unwrap();
            })
        };
        // The registry's side: the unmap returned before the barrier began (the region's
        // `mapped` dropped after it), then the barrier, then the pages would be unpinned.
        if returned.load(Ordering::Acquire) == 1 {
            if fq.pending() > 0 {
                fq.flush(|| hw.invalidate_all(), &mut |it| hw.released(it, &released)).unwrap();
            }
            assert_eq!(hw.tlb.lock().unwrap()[0], 0, "unpinned while its translation is cached");
        }
        unmapper.join().unwrap();
        flusher.join().unwrap();
    });
}

#[test]
fn a_failed_flush_racing_an_unmap_releases_nothing_and_the_next_flush_releases_it() {
    model(|| {
        let hw = Arc::new(Hw::new(true));
        // Room for two: the unmap queues without flushing.
        let fq = Arc::new(FlushQueues::new(2, 2, u64::MAX).unwrap());
        let released = Arc::new(AtomicU64::new(0));
        let t = {
            let (hw, fq, r) = (hw.clone(), fq.clone(), released.clone());
            thread::spawn(move || unmap(&hw, &fq, &r, 0, 0))
        };
        // Another CPU's flush fails: the hardware invalidated nothing.
        let broken = busdma::Error::InvalidationFailed { what: "loom", domain: 1, status: 0 };
        let got = fq.flush(|| Err(broken), &mut |it| hw.released(it, &released));
        assert_eq!(got, Err(broken));
        t.join().unwrap();
        assert_eq!(released.load(Ordering::Relaxed), 0, "a failed flush released an item");
        fq.flush(|| hw.invalidate_all(), &mut |it| hw.released(it, &released)).unwrap();
        assert_eq!((released.load(Ordering::Relaxed), fq.pending()), (1, 0));
    });
}

/// Flushq rule 8, the buffer: an unmap that freed nothing queued nothing, only its CPU's
/// record. A barrier (another CPU) that starts after the unmap returned, racing a third CPU's
/// flush, flushes unless the record is covered; either way the translation is gone when it
/// returns. Fails if the barrier looks only at the queues (`pending`).
#[test]
fn a_recorded_unmap_that_returned_before_an_unpin_barrier_leaves_no_translation_cached() {
    model(|| {
        let hw = Arc::new(Hw::new(true));
        let fq = Arc::new(FlushQueues::new(3, 2, u64::MAX).unwrap());
        let returned = Arc::new(AtomicU64::new(0));
        let unmapper = {
            let (hw, fq, done) = (hw.clone(), fq.clone(), returned.clone());
            thread::spawn(move || {
                unmap_recorded(&hw, &fq, 0, 0);
                done.store(1, Ordering::Release);
            })
        };
        let flusher = {
            let (hw, fq) = (hw.clone(), fq.clone());
            thread::spawn(move || {
                fq.flush(|| hw.invalidate_all(), &mut |_| {}).unwrap();
            })
        };
        if returned.load(Ordering::Acquire) == 1 {
            // `Domain::flush_queued`.
            if fq.pending() > 0 || fq.unflushed() {
                fq.flush(|| hw.invalidate_all(), &mut |_| {}).unwrap();
            }
            assert_eq!(hw.tlb.lock().unwrap()[0], 0, "handed back while its translation is cached");
        }
        unmapper.join().unwrap();
        flusher.join().unwrap();
    });
}

/// Flushq rule 8, the window: the owner of a window keeps its recorded unmap's ticket and,
/// before mapping the window again, flushes unless a finished flush covers it
/// (`Domain::ensure_flushed`). Two unmaps on the same CPU (the second's ticket replaces the
/// first's in the record) race another CPU's flush and a device walk.
#[test]
fn a_recorded_unmaps_window_is_repointed_only_after_an_invalidation_that_saw_its_clear() {
    model(|| {
        let hw = Arc::new(Hw::new(false));
        let fq = Arc::new(FlushQueues::new(2, 4, u64::MAX).unwrap());
        let device = {
            let hw = hw.clone();
            thread::spawn(move || {
                hw.walk(0);
                hw.walk(1);
            })
        };
        let flusher = {
            let (hw, fq) = (hw.clone(), fq.clone());
            thread::spawn(move || {
                fq.flush(|| hw.invalidate_all(), &mut |_| {}).unwrap();
            })
        };
        let t0 = unmap_recorded(&hw, &fq, 0, 0);
        let t1 = unmap_recorded(&hw, &fq, 0, 1);
        for t in [t0, t1] {
            if !fq.generations().is_flushed(t) {
                fq.flush(|| hw.invalidate_all(), &mut |_| {}).unwrap();
            }
        }
        assert_eq!(
            *hw.tlb.lock().unwrap(),
            [0, 0],
            "a window re-pointed while its old translation is cached"
        );
        device.join().unwrap();
        flusher.join().unwrap();
        assert!(!fq.unflushed() && fq.recorded() == 0);
    });
}
