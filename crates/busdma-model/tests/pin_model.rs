//! Property test: the registry (busdma::pin) against a small reference model of seed 001's
//! semantics, over the machine model's user address space.

use std::collections::BTreeMap;

use busdma::pin::{RegisteredBuffer, Registry};
use busdma::{Error, PAGE_SIZE, UserVa};
use busdma_model::uspace::UserSpace;
use busdma_model::{HostPlatform, MachineConfig};
use proptest::prelude::*;

const BASE: u64 = 0x7000_0000;
/// Pages `0..MAPPED` are mapped; `MAPPED..PAGES` are not (to reach NotMapped).
const MAPPED: u64 = 16;
const PAGES: u64 = 20;
/// Memlock limit in pages: smaller than the mapped space, so the limit is reached.
const LIMIT: u64 = 10;

fn ua(page: u64) -> UserVa {
    UserVa::new(BASE + page * PAGE_SIZE)
}

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

/// The reference: regions by first page -> (pages, used); loads by region start.
#[derive(Default)]
struct Model {
    regions: BTreeMap<u64, (u64, u64)>,
    loads: Vec<u64>,
}

impl Model {
    fn charged(&self) -> u64 {
        self.regions.values().map(|r| r.0).sum()
    }
    fn mapped(&self, start: u64) -> u64 {
        1 + self.loads.iter().filter(|&&s| s == start).count() as u64
    }
    fn containing(&self, p: u64, n: u64) -> Option<u64> {
        self.regions.iter().find(|&(&s, &(len, _))| s <= p && p + n <= s + len).map(|(&s, _)| s)
    }
    fn register(&mut self, p: u64, n: u64) -> Result<u64, Error> {
        if n == 0 {
            return Err(Error::ZeroSize);
        }
        if let Some((_, used)) = self.regions.get_mut(&p).filter(|r| r.0 == n) {
            *used += 1;
            return Ok(*used);
        }
        if let Some((&s, _)) = self.regions.iter().find(|&(&s, &(len, _))| s < p + n && p < s + len) {
            return Err(Error::AlreadyMapped { addr: ua(s.max(p)).raw() });
        }
        if self.charged() + n > LIMIT {
            let requested = (self.charged() + n) * PAGE_SIZE;
            return Err(Error::LimitExceeded { what: "memlock", requested, limit: LIMIT * PAGE_SIZE });
        }
        if p + n > MAPPED {
            return Err(Error::NotMapped { addr: ua(p.max(MAPPED)).raw() });
        }
        self.regions.insert(p, (n, 1));
        Ok(1)
    }
    fn unregister(&mut self, p: u64, n: u64) -> Result<(), Error> {
        let mapped = self.mapped(p);
        let Some((_, used)) = self.regions.get_mut(&p).filter(|r| r.0 == n) else {
            return Err(Error::NotMapped { addr: ua(p).raw() });
        };
        if *used > 1 {
            *used -= 1;
            return Ok(());
        }
        if mapped > 1 {
            return Err(Error::Busy { what: "registered region (still DMA-mapped)", count: mapped - 1 });
        }
        self.regions.remove(&p);
        Ok(())
    }
}

fn check_same(reg: &Registry<&UserSpace<'_>>, us: &UserSpace<'_>, model: &Model) {
    let stats = reg.stats();
    assert_eq!(stats.regions, model.regions.len() as u64);
    assert_eq!(stats.charged, model.charged() * PAGE_SIZE);
    assert_eq!(stats.garbage, 0, "no reader: every grace period ends at once");
    assert_eq!(us.pinned_pages(), model.charged(), "pinned exactly the registered pages");
    let g = reg.read();
    for (&s, &(n, used)) in &model.regions {
        let r = g.lookup(ua(s), n * PAGE_SIZE).expect("registered region found");
        assert_eq!((r.ua(), r.size(), r.used(), r.mapped()), (ua(s), n * PAGE_SIZE, used, model.mapped(s)));
    }
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
