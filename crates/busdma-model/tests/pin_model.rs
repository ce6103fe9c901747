//! Property test: the registry (busdma::pin) against a small reference model of seed 001's
//! semantics, over the machine model's user address space.

use busdma::pin::{RegisteredBuffer, Registry};
use busdma::{Error, PAGE_SIZE};
use busdma_model::uspace::UserSpace;
use busdma_model::{HostPlatform, MachineConfig};
use proptest::prelude::*;

#[path = "common/pin_reference.rs"]
mod pin_reference;

use pin_reference::{LIMIT, MAPPED, Model, PAGES, check_same, ua};

#[derive(Clone, Debug)]
enum Op {
    Register(u64, u64),
    Unregister(u64, u64),
    Load(u64, u64),
    Unload(usize),
    Translate(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PAGES, 0..6u64).prop_map(|(p, n)| Op::Register(p, n)),
        2 => (0..PAGES, 1..6u64).prop_map(|(p, n)| Op::Unregister(p, n)),
        2 => (0..PAGES, 1..4u64).prop_map(|(p, n)| Op::Load(p, n)),
        2 => any::<usize>().prop_map(Op::Unload),
        1 => (0..PAGES).prop_map(Op::Translate),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn registry_matches_the_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        let m = HostPlatform::new(MachineConfig::with_ram(16 << 20)).unwrap();
        let us = UserSpace::new(&m);
        us.map(ua(0), MAPPED * PAGE_SIZE).unwrap();
        let reg = Registry::new(&us, LIMIT * PAGE_SIZE).unwrap();
        let mut model = Model::default();
        let mut loads: Vec<(u64, RegisteredBuffer<'_, &UserSpace<'_>>)> = Vec::new();
        for op in ops {
            match op {
                Op::Register(p, n) => {
                    let got = reg.register(ua(p), n * PAGE_SIZE).map(|i| i.used);
                    prop_assert_eq!(got, model.register(p, n), "{:?}", op);
                }
                Op::Unregister(p, n) => {
                    prop_assert_eq!(reg.unregister(ua(p), n * PAGE_SIZE), model.unregister(p, n), "{:?}", op);
                }
                Op::Load(p, n) => match (reg.load(ua(p), n * PAGE_SIZE), model.containing(p, n)) {
                    (Ok(buf), Some(start)) => {
                        prop_assert_eq!(buf.region().ua(), ua(start));
                        model.loads.push(start);
                        loads.push((start, buf));
                    }
                    (Err(e), None) => prop_assert_eq!(e, Error::NotMapped { addr: ua(p).raw() }),
                    (got, want) => prop_assert!(false, "{:?}: got {:?}, model {:?}", op, got.map(|b| b.ua()), want),
                },
                Op::Unload(i) => {
                    if !loads.is_empty() {
                        let (start, buf) = loads.swap_remove(i % loads.len());
                        drop(buf);
                        let at = model.loads.iter().position(|&s| s == start).unwrap();
                        model.loads.swap_remove(at);
                    }
                }
                Op::Translate(p) => {
                    let want = match model.containing(p, 1) {
                        Some(_) => Ok(us.translate(ua(p)).unwrap()),
                        None => Err(Error::NotMapped { addr: ua(p).raw() }),
                    };
                    prop_assert_eq!(reg.ua_to_pa(ua(p), 12), want);
                    // The direct page index and the interval index answer alike.
                    prop_assert_eq!(reg.read().ua_to_pa_tree(ua(p), 12), want);
                }
            }
            check_same(&reg, &us, &model);
        }
        drop(loads);
        drop(reg);
        prop_assert_eq!(us.pinned_pages(), 0);
        let c = us.counters();
        prop_assert_eq!(c.pins.load(std::sync::atomic::Ordering::Relaxed), c.unpins.load(std::sync::atomic::Ordering::Relaxed));
    }
}
