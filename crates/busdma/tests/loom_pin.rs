//! loom models of the pre-registration registry (busdma::pin): every interleaving of
//! `unregister` against `mapped_inc`, and of readers against writers retiring regions.
#![cfg(loom)]

use busdma::pin::{PinBackend, Registry};
use busdma::sync::{AtomicU64, Ordering};
use busdma::{Error, PAGE_SIZE, PhysAddr, UserVa};
use loom::sync::Arc;
use loom::thread;

/// A backend whose frames are `ua + OFFSET`, counting pins (no page table to walk: the model
/// checks the registry's protocol, not a pager).
#[derive(Default)]
struct Frames {
    pins: AtomicU64,
    unpins: AtomicU64,
}

const OFFSET: u64 = 0x1_0000_0000;
const UA: UserVa = UserVa::new(0x10_0000);
const UA2: UserVa = UserVa::new(0x20_0000);

impl PinBackend for Frames {
    fn pin(&self, ua: UserVa, out: &mut [PhysAddr]) -> busdma::Result<()> {
        for (i, pa) in out.iter_mut().enumerate() {
            *pa = PhysAddr::new(ua.raw() + OFFSET + i as u64 * PAGE_SIZE);
        }
        self.pins.fetch_add(out.len() as u64, Ordering::SeqCst);
        Ok(())
    }
    fn unpin(&self, _ua: UserVa, hpas: &[PhysAddr]) {
        self.unpins.fetch_add(hpas.len() as u64, Ordering::SeqCst);
    }
}

#[test]
fn unregister_racing_mapped_inc_lets_exactly_one_win() {
    loom::model(|| {
        let reg = Arc::new(Registry::new(Frames::default(), u64::MAX).unwrap());
        reg.register(UA, PAGE_SIZE).unwrap();
        let r2 = reg.clone();
        let mapper = thread::spawn(move || {
            let g = r2.read();
            let Some(region) = g.lookup(UA, 1) else { return false };
            let ok = region.mapped_inc().is_ok();
            // Whatever happened, the region we can see is still pinned (grace period).
            assert_eq!(r2.backend().unpins.load(Ordering::SeqCst), 0);
            if ok {
                assert!(region.mapped() >= 2);
            }
            ok
        });
        let unregistered = reg.unregister(UA, PAGE_SIZE);
        let mapped = mapper.join().unwrap();
        match unregistered {
            Ok(()) => assert!(!mapped, "a mapping was accepted after mapped reached 0"),
            Err(Error::Busy { count: 1, .. }) => {
                assert!(mapped);
                let g = reg.read();
                let r = g.lookup(UA, 1).unwrap();
                assert_eq!((r.used(), r.mapped()), (1, 2), "EBUSY leaves used at 1");
                r.mapped_dec().unwrap();
                drop(g);
                reg.unregister(UA, PAGE_SIZE).unwrap();
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
        reg.synchronize();
        assert_eq!(reg.backend().unpins.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn a_reader_never_sees_a_region_unpinned_while_writers_retire_it() {
    // The reader walks the direct page index (four loads) while the writer clears it, retires
    // the emptied nodes with the region, and frees them after the grace period. Three
    // preemptions cover every race of the epoch scheme (each needs two: the store-load
    // pattern) and keep the model under the 60 s budget (unbounded: 80 s).
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(|| {
        let reg = Arc::new(Registry::new(Frames::default(), u64::MAX).unwrap());
        reg.register(UA, PAGE_SIZE).unwrap();
        let r2 = reg.clone();
        let reader = thread::spawn(move || {
            let g = r2.read();
            match g.ua_to_pa(UA, 12) {
                Ok(pa) => {
                    assert_eq!(pa.raw(), UA.raw() + OFFSET);
                    // Still pinned for as long as we can translate through it.
                    assert_eq!(r2.backend().unpins.load(Ordering::SeqCst), 0);
                }
                Err(e) => assert_eq!(e, Error::NotMapped { addr: UA.raw() }),
            }
        });
        // Unregister, then a second write whose epoch advances try to free the first region.
        reg.unregister(UA, PAGE_SIZE).unwrap();
        reg.register(UA2, PAGE_SIZE).unwrap();
        reader.join().unwrap();
        reg.synchronize();
        assert_eq!(reg.backend().unpins.load(Ordering::SeqCst), 1);
        assert_eq!(reg.stats().garbage, 0);
    });
}
