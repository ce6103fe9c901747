//! Fuzz target 4: registration op sequences (seed 001) against the reference model.
//!
//! Register / unregister / load / unload / translate on a registry over the machine model's
//! user address space, checked after every op against the same reference the property test
//! uses (`crates/busdma-model/tests/common/pin_reference.rs`): results and errors equal the
//! model's (EBUSY on the last unregister while mapped, `used` counting registrations, overlap,
//! memlock and not-mapped refusals), the registry's counts, charges and pins equal the model's,
//! translations equal the page table's; at the end every pin is released.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use busdma::pin::{RegisteredBuffer, Registry};
use busdma::{Error, PAGE_SIZE};
use busdma_model::uspace::UserSpace;
use busdma_model::{HostPlatform, MachineConfig};
use libfuzzer_sys::fuzz_target;

#[path = "../../crates/busdma-model/tests/common/pin_reference.rs"]
mod pin_reference;

use pin_reference::{LIMIT, MAPPED, Model, PAGES, check_same, ua};

#[derive(Arbitrary, Debug)]
enum Op {
    Register(u8, u8),
    Unregister(u8, u8),
    Load(u8, u8),
    Unload(u8),
    Translate(u8),
}

fn machine() -> &'static HostPlatform {
    static M: OnceLock<HostPlatform> = OnceLock::new();
    M.get_or_init(|| HostPlatform::new(MachineConfig::with_ram(16 << 20)).expect("machine"))
}

fuzz_target!(|ops: Vec<Op>| {
    let m = machine();
    let us = UserSpace::new(m);
    us.map(ua(0), MAPPED * PAGE_SIZE).unwrap();
    let reg = Registry::new(&us, LIMIT * PAGE_SIZE).unwrap();
    let mut model = Model::default();
    let mut loads: Vec<(u64, RegisteredBuffer<'_, &UserSpace<'_>>)> = Vec::new();
    for op in ops.into_iter().take(128) {
        match op {
            Op::Register(p, n) => {
                let (p, n) = (u64::from(p) % PAGES, u64::from(n) % 6);
                let got = reg.register(ua(p), n * PAGE_SIZE).map(|i| i.used);
                assert_eq!(got, model.register(p, n), "{op:?}");
            }
            Op::Unregister(p, n) => {
                let (p, n) = (u64::from(p) % PAGES, u64::from(n) % 5 + 1);
                assert_eq!(reg.unregister(ua(p), n * PAGE_SIZE), model.unregister(p, n), "{op:?}");
            }
            Op::Load(p, n) => {
                let (p, n) = (u64::from(p) % PAGES, u64::from(n) % 3 + 1);
                match (reg.load(ua(p), n * PAGE_SIZE), model.containing(p, n)) {
                    (Ok(buf), Some(start)) => {
                        assert_eq!(buf.region().ua(), ua(start));
                        model.loads.push(start);
                        loads.push((start, buf));
                    }
                    (Err(e), None) => assert_eq!(e, Error::NotMapped { addr: ua(p).raw() }),
                    (got, want) => panic!("{op:?}: got {:?}, model {want:?}", got.map(|b| b.ua())),
                }
            }
            Op::Unload(i) => {
                if !loads.is_empty() {
                    let (start, buf) = loads.swap_remove(usize::from(i) % loads.len());
                    drop(buf);
                    let at = model.loads.iter().position(|&s| s == start).unwrap();
                    model.loads.swap_remove(at);
                }
            }
            Op::Translate(p) => {
                let p = u64::from(p) % PAGES;
                let want = match model.containing(p, 1) {
                    Some(_) => Ok(us.translate(ua(p)).unwrap()),
                    None => Err(Error::NotMapped { addr: ua(p).raw() }),
                };
                assert_eq!(reg.ua_to_pa(ua(p), 12), want);
            }
        }
        check_same(&reg, &us, &model);
    }
    drop(loads);
    drop(reg);
    assert_eq!(us.pinned_pages(), 0, "every pin released at the end");
});
