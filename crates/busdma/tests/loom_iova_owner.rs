//! Loom model of the IOVA allocator's owned live marks (`busdma::iova`, theory 4): a mark set
//! under CPU 0's lock is cleared by CPU 0's fast free with a plain load and store, and by any
//! other CPU's free only under CPU 0's lock. Every interleaving of the real allocator code:
//! of two CPUs freeing one allocation at once, exactly one succeeds, the other is told it is a
//! double free, and the range is cached once (never handed out twice).
#![cfg(loom)]

mod common;

use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, Platform};
use common::loom_bare::{Bare, CPU};
use loom::sync::Arc;
use loom::thread;

/// Two CPUs, each loom thread on the one it sets in `CPU`; nothing else behind it.
type TwoCpus = Bare<2>;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    // A leaf of marks is 4096 atomics, each a branch point at creation (single-threaded).
    b.max_branches = 1 << 20;
    b.check(f);
}

/// A range allocated on CPU 0 from its cache (so its mark is owned by CPU 0), then freed at
/// once by CPU 0 (the fast free) and by CPU 1 (whose fast free finds the mark another
/// CPU's, so it takes the slow free, under CPU 0's lock).
#[test]
fn an_owned_mark_is_cleared_by_exactly_one_of_two_cpus_freeing_it() {
    model(|| {
        let space = AddrRange::new(Iova::new(16 * PAGE_SIZE), Iova::new(32 * PAGE_SIZE)).unwrap();
        let a = Arc::new(
            IovaAllocator::new(space, IovaConfig { cpus: 2, caches: true, guard_page: false }).unwrap(),
        );
        let p: TwoCpus = Bare;
        let one = IovaRequest::pages(1);
        // CPU 1 allocates and frees a range of the same leaf first, so its leaf hint is warm
        // and its free below takes the fast path's check (the hint hits), not only the walk.
        CPU.with(|c| c.set(1));
        {
            let g = p.pin_cpu();
            let other = a.alloc(&g, &one).unwrap();
            a.free(&g, other).unwrap();
        }
        CPU.with(|c| c.set(0));
        // From the tree (an unowned mark), cached by its free, then from CPU 0's cache.
        let r = {
            let g = p.pin_cpu();
            let r = a.alloc(&g, &one).unwrap();
            a.free(&g, r).unwrap();
            a.alloc(&g, &one).unwrap()
        };
        let free_on = |cpu: usize| {
            let a = a.clone();
            thread::spawn(move || {
                CPU.with(|c| c.set(cpu));
                let p: TwoCpus = Bare;
                let g = p.pin_cpu();
                a.free(&g, r)
            })
        };
        let (t0, t1) = (free_on(0), free_on(1));
        let (r0, r1) = (t0.join().unwrap(), t1.join().unwrap());
        assert!(r0.is_ok() != r1.is_ok(), "two frees of one allocation: {r0:?}, {r1:?}");
        let lost = if r0.is_ok() { r1 } else { r0 };
        assert!(matches!(lost, Err(Error::DoubleFree { .. })), "{lost:?}");
        // Cached once: CPU 0 and CPU 1 each take a range, never the same one.
        let x = a.alloc(&p.pin_cpu(), &one).unwrap();
        let y = thread::spawn({
            let a = a.clone();
            move || {
                CPU.with(|c| c.set(1));
                a.alloc(&Bare::<2>.pin_cpu(), &IovaRequest::pages(1)).unwrap()
            }
        })
        .join()
        .unwrap();
        assert!(!x.overlaps(&y), "one range handed out twice: {x:?}, {y:?}");
    });
}
