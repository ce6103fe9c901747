//! Loom model of the magazine/depot exchange between two CPUs (and a flush from a third
//! context): every interleaving of the real `iova::magazine` code, checking that no round is
//! lost or handed out twice.
#![cfg(loom)]

use busdma::iova::magazine::{CpuCache, Depot, MarkAddr};
use busdma::sync::SpinLock;
use loom::sync::Arc;
use loom::thread;

/// Magazines of one round: the smallest that still exercises both magazines and the depot.
const ROUNDS: usize = 1;
const CLASS: usize = 0;

struct Machine {
    depot: Depot,
    cpus: [SpinLock<CpuCache>; 2],
}

fn machine() -> Arc<Machine> {
    Arc::new(Machine {
        depot: Depot::new(),
        cpus: [SpinLock::new(CpuCache::new(ROUNDS).unwrap()), SpinLock::new(CpuCache::new(ROUNDS).unwrap())],
    })
}

fn drain_all(m: &Machine, out: &mut Vec<u64>) {
    for cpu in &m.cpus {
        cpu.lock().drain(|_, s| out.push(s));
    }
    m.depot.drain(|_, s| out.push(s));
}

#[test]
fn rounds_freed_on_one_cpu_are_allocated_once_on_the_other() {
    loom::model(|| {
        let m = machine();
        let m0 = m.clone();
        // CPU 0 frees three rounds: two fill its magazines, the third pushes a full magazine
        // into the depot.
        let t0 = thread::spawn(move || {
            for s in 0..3 {
                assert!(m0.cpus[0].lock().free(CLASS, s, MarkAddr::NONE, &m0.depot).0);
            }
        });
        // CPU 1 allocates what the depot offers (maybe nothing yet) and frees it back.
        let m1 = m.clone();
        let t1 = thread::spawn(move || {
            let got = m1.cpus[1].lock().alloc(CLASS, |_| true, &m1.depot).0;
            if let Some(s) = got {
                assert!(s < 3);
                assert!(m1.cpus[1].lock().free(CLASS, s, MarkAddr::NONE, &m1.depot).0);
            }
            got
        });
        t0.join().unwrap();
        let _ = t1.join().unwrap();
        let mut all = Vec::new();
        drain_all(&m, &mut all);
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2], "a round was lost or duplicated");
    });
}

#[test]
fn a_flush_racing_both_cpus_loses_and_duplicates_nothing() {
    loom::model(|| {
        let m = machine();
        // Preload: CPU 0 holds two rounds, the depot one full magazine.
        for s in 0..3 {
            assert!(m.cpus[0].lock().free(CLASS, s, MarkAddr::NONE, &m.depot).0);
        }
        let m1 = m.clone();
        let taker = thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..2 {
                if let Some(s) = m1.cpus[1].lock().alloc(CLASS, |_| true, &m1.depot).0 {
                    held.push(s);
                }
            }
            held
        });
        let m2 = m.clone();
        let flusher = thread::spawn(move || {
            let mut flushed = Vec::new();
            drain_all(&m2, &mut flushed);
            flushed
        });
        let mut all = taker.join().unwrap();
        all.extend(flusher.join().unwrap());
        drain_all(&m, &mut all);
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2], "a round was lost or duplicated");
    });
}
