//! loom models of deferred loads (busdma::front::defer): the unload side's wake-up (one
//! read-modify-write of the waiting count) racing a load that fails and queues itself, and a
//! cancellation racing the retry. A one-token strategy stands in for IOVA space or bounce
//! pages: a load takes the token or fails with `Exhausted`; an unload gives it back.
#![cfg(loom)]

mod common;

use busdma::front::load::Run;
use busdma::front::segments::{Segment, SegmentBuilder};
use busdma::front::strategy::{Invalidation, Strategy};
use busdma::front::{Deferrable, Direction, RawSegments, Tag, TagSpec};
use busdma::sync::{AtomicU64, AtomicUsize, Ordering};
use busdma::{Error, PAGE_SIZE, PhysAddr};
use loom::sync::Arc;
use loom::thread;

/// One CPU that loom's threads share: the deferred-load queue modelled here keeps no per-CPU
/// state.
type Bare = common::loom_bare::Bare<1>;

/// One token: a load takes it (CAS 1 → 0) or fails with `Exhausted`; an unload returns it.
#[derive(Clone)]
struct Token(std::sync::Arc<AtomicU64>);

impl Strategy<Bare> for Token {
    const NAME: &'static str = "token";
    type MapState = ();

    fn invalidation(&self) -> Invalidation {
        Invalidation::None
    }
    fn create(&self, _: &Bare, _: &TagSpec) -> busdma::Result<()> {
        Ok(())
    }
    fn load(
        &self,
        _: &Bare,
        _: &TagSpec,
        _: &mut (),
        runs: &[Run],
        _: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> busdma::Result<()> {
        if self.0.compare_exchange(1, 0, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(Error::Exhausted { size: PAGE_SIZE, limit: 0 });
        }
        for r in runs {
            if let Err(e) = segs.push(r.pa.raw(), r.len) {
                self.0.store(1, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }
    fn unload(&self, _: &Bare, _: &mut (), _: &[Run], _: &[Segment]) -> busdma::Result<()> {
        self.0.store(1, Ordering::Release);
        Ok(())
    }
    fn destroy(&self, _: &Bare, _: ()) {}
    fn wait_unmapped(&self, _: &Bare) -> busdma::Result<()> {
        // No IOMMU: nothing is cached between the device and the token.
        Ok(())
    }
}

static BARE: Bare = common::loom_bare::Bare;

fn spec() -> TagSpec {
    let mut s = TagSpec::new(PAGE_SIZE, 1);
    s.flags.may_wait = true;
    s
}

const SRC: [(PhysAddr, u64); 1] = [(PhysAddr::new(0x10_0000), PAGE_SIZE)];

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    // Two preemptions reach the lost-wake-up interleaving (the waiter's failed attempt, the
    // unload's free and check, then the waiter's queuing) and keep the model under a minute.
    b.preemption_bound = Some(2);
    b
}

#[test]
fn an_unload_racing_a_load_that_queues_itself_never_loses_the_wake_up() {
    builder().check(|| {
        let token = Token(std::sync::Arc::new(AtomicU64::new(1)));
        // Leaked per execution so both threads can borrow it for 'static (a few bytes each).
        let tag: &'static Tag<'static, Bare, Token> =
            Box::leak(Box::new(Tag::new_root(&BARE, token.clone(), spec()).unwrap()));
        let mut a = tag.create_map().unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        a.load(&unsafe { RawSegments::new(&SRC) }, Direction::ToDevice).unwrap();
        let b = tag.create_map().unwrap();
        let called = Arc::new(AtomicUsize::new(0));
        let c2 = called.clone();
        let unloader = thread::spawn(move || {
            a.unload().unwrap();
            drop(a);
        });
        let r = b
            .load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegments::new(&SRC) },
                Direction::ToDevice,
                Box::new(move |r| {
                    assert!(r.is_ok(), "{:?}", r.err());
                    c2.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
        unloader.join().unwrap();
        // Whatever the interleaving, once both are done B is loaded: at once (no callback) or
        // by its callback, exactly once.
        let b = match r {
            Deferrable::Loaded(b) => {
                assert_eq!(called.load(Ordering::SeqCst), 0);
                b
            }
            Deferrable::Deferred(p) => {
                assert_eq!(called.load(Ordering::SeqCst), 1, "lost wake-up");
                p.try_finish().unwrap()
            }
        };
        assert!(b.is_loaded());
        drop(b);
        assert_eq!(token.0.load(Ordering::SeqCst), 1, "the token is back");
        assert_eq!(tag.deferred_stats().waiting, 0);
    });
}

#[test]
fn a_cancellation_racing_the_retry_runs_the_callback_exactly_once() {
    builder().check(|| {
        let token = Token(std::sync::Arc::new(AtomicU64::new(1)));
        let tag: &'static Tag<'static, Bare, Token> =
            Box::leak(Box::new(Tag::new_root(&BARE, token.clone(), spec()).unwrap()));
        let mut a = tag.create_map().unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        a.load(&unsafe { RawSegments::new(&SRC) }, Direction::ToDevice).unwrap();
        let b = tag.create_map().unwrap();
        let outcomes = Arc::new(AtomicUsize::new(0));
        let o2 = outcomes.clone();
        let p = match b
            .load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegments::new(&SRC) },
                Direction::ToDevice,
                Box::new(move |r| {
                    // Ok counts 1, Cancelled counts 100: the sum says which ran and how often.
                    let n = if r.is_ok() { 1 } else { 100 };
                    o2.fetch_add(n, Ordering::SeqCst);
                }),
            )
            .unwrap()
        {
            Deferrable::Deferred(p) => p,
            Deferrable::Loaded(_) => panic!("the token is held: the load must wait"),
        };
        let unloader = thread::spawn(move || {
            a.unload().unwrap();
            drop(a);
        });
        // Destroy the map with its pending load while the unload may be retrying it.
        drop(p);
        unloader.join().unwrap();
        let n = outcomes.load(Ordering::SeqCst);
        assert!(n == 1 || n == 100, "callback ran {n} (1: Ok once, 100: Cancelled once)");
        assert_eq!(token.0.load(Ordering::SeqCst), 1, "the token is back whoever finished");
        assert_eq!(tag.deferred_stats().waiting, 0);
    });
}
