//! Loom model of the IOVA live map (`busdma::iova::livemap`), the lock-free piece that catches
//! double and wrong-size frees without the tree lock: every interleaving of the real code.
//!
//! - Two CPUs creating marks under the same missing leaf install exactly one leaf: a mark one
//!   of them stores is seen by the other through the same path (a lost leaf would lose it).
//! - A live mark (the allocation's exact page count) is cleared by exactly one of two racing
//!   frees of the right size (the other is a double free), while a free of a wrong size in
//!   the same class never clears it.
//! - A CPU's hinted lookup (its one-leaf memo) racing another CPU's creation of the leaf sees
//!   no leaf or the published mark, never a torn one, and afterwards reaches the same mark.
//! - Two CPUs freeing one allocation through their own hints (`get_hinted_own`, the fast
//!   free) reach the mark their walk reached, and exactly one of them clears it.
#![cfg(loom)]

use busdma::iova::livemap::{LEAF_PAGES, LeafHint, LiveMap};
use busdma::sync::Ordering;
use loom::sync::Arc;
use loom::thread;

/// Every interleaving, with room for the node allocations and frees: a leaf is 4096 marks and an
/// interior node 512 pointers, each of whose accesses at creation and drop is a loom branch
/// point (single-threaded there, so they add no interleavings, only branches).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.max_branches = 1 << 20;
    b.check(f);
}

/// Two leaves' worth of pages: the root is an interior node, leaves are installed on demand.
const PAGES: u64 = 2 * LEAF_PAGES as u64;

#[test]
fn racing_creations_under_one_missing_leaf_install_it_once() {
    model(|| {
        let map = Arc::new(LiveMap::new(PAGES).unwrap());
        let (a, b) = (map.clone(), map.clone());
        let t0 = thread::spawn(move || {
            a.get_or_create(LEAF_PAGES as u64 + 1).unwrap().store(3, Ordering::Release)
        });
        let t1 = thread::spawn(move || {
            b.get_or_create(LEAF_PAGES as u64 + 2).unwrap().store(5, Ordering::Release)
        });
        t0.join().unwrap();
        t1.join().unwrap();
        let get = |p: u64| map.get(p).map(|m| m.load(Ordering::Acquire));
        assert_eq!(
            (get(LEAF_PAGES as u64 + 1), get(LEAF_PAGES as u64 + 2)),
            (Some(3), Some(5)),
            "a leaf was lost"
        );
        assert_eq!(get(0), None, "the other leaf was never created");
    });
}

#[test]
fn a_live_mark_is_cleared_by_exactly_one_free_of_its_exact_size() {
    model(|| {
        let map = Arc::new(LiveMap::new(PAGES).unwrap());
        // An allocation of 6 pages (class 8) is live at page 7.
        map.get_or_create(7).unwrap().store(6, Ordering::Release);
        let free = |size: u16| {
            let map = map.clone();
            thread::spawn(move || {
                map.get(7).unwrap().compare_exchange(size, 0, Ordering::AcqRel, Ordering::Acquire)
            })
        };
        let (f0, f1, wrong) = (free(6), free(6), free(7));
        let (r0, r1, rw) = (f0.join().unwrap(), f1.join().unwrap(), wrong.join().unwrap());
        assert!(r0.is_ok() != r1.is_ok(), "two frees of one allocation both succeeded, or neither");
        assert!(matches!(rw, Err(6) | Err(0)), "a free of the wrong size cleared the mark: {rw:?}");
        assert_eq!(map.get(7).unwrap().load(Ordering::Acquire), 0);
    });
}

#[test]
fn a_hinted_lookup_racing_a_leaf_creation_finds_the_published_mark() {
    model(|| {
        let map = Arc::new(LiveMap::new(PAGES).unwrap());
        let page = LEAF_PAGES as u64 + 3;
        let a = map.clone();
        let t = thread::spawn(move || a.get_or_create(page).unwrap().store(4, Ordering::Release));
        let mut hint = LeafHint::default();
        let seen = map.get_hinted(&mut hint, page).map(|m| m.load(Ordering::Acquire));
        assert!(matches!(seen, None | Some(0) | Some(4)), "{seen:?}");
        t.join().unwrap();
        // Through the hint (a hit, or a walk that refills it): the one mark, cleared once.
        let m = map.get_hinted(&mut hint, page).unwrap();
        assert_eq!(m.compare_exchange(4, 0, Ordering::AcqRel, Ordering::Acquire), Ok(4));
        let again = map.get_hinted(&mut hint, page).unwrap();
        assert_eq!(again.compare_exchange(4, 0, Ordering::AcqRel, Ordering::Acquire), Err(0));
        assert_eq!(map.get(page).unwrap().load(Ordering::Acquire), 0);
    });
}

/// The allocator's fast free: each CPU reaches the mark through its own hint (empty until a
/// walk fills it, then a key comparison), and of two CPUs freeing one allocation that way at
/// once exactly one clears the mark.
#[test]
fn lookups_through_owned_hints_reach_the_walked_mark_and_clear_it_once() {
    model(|| {
        let map = Arc::new(LiveMap::new(PAGES).unwrap());
        let page = LEAF_PAGES as u64 + 5;
        map.get_or_create(page).unwrap().store(2, Ordering::Release);
        let free = || {
            let map = map.clone();
            thread::spawn(move || {
                let mut hint = LeafHint::default();
                // SAFETY: the hint is empty.
                assert!(unsafe { map.get_hinted_own(&hint, page) }.is_none(), "an empty hint hit");
                let walked: *const _ = map.get_hinted(&mut hint, page).unwrap();
                // SAFETY: the hint was filled by this map and no other.
                let m = unsafe { map.get_hinted_own(&hint, page) }.unwrap();
                assert!(core::ptr::eq(m, walked), "the hint reached another mark");
                m.compare_exchange(2, 0, Ordering::AcqRel, Ordering::Relaxed)
            })
        };
        let (a, b) = (free(), free());
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        assert!(ra.is_ok() != rb.is_ok(), "two frees of one allocation both succeeded, or neither");
        assert_eq!(map.get(page).unwrap().load(Ordering::Acquire), 0);
    });
}
