//! The reference model of seed 001's registration semantics, shared by the property test
//! (`tests/pin_model.rs`) and the registration fuzz target (`fuzz/fuzz_targets/pin_ops.rs`),
//! which include this file by path.
#![allow(dead_code)]

use std::collections::BTreeMap;

use busdma::pin::Registry;
use busdma::{Error, PAGE_SIZE, UserVa};
use busdma_model::uspace::UserSpace;

pub const BASE: u64 = 0x7000_0000;
/// Pages `0..MAPPED` are mapped; `MAPPED..PAGES` are not (to reach NotMapped).
pub const MAPPED: u64 = 16;
pub const PAGES: u64 = 20;
/// Memlock limit in pages: smaller than the mapped space, so the limit is reached.
pub const LIMIT: u64 = 10;

pub fn ua(page: u64) -> UserVa {
    UserVa::new(BASE + page * PAGE_SIZE)
}

/// The reference: regions by first page -> (pages, used); loads by region start.
#[derive(Default)]
pub struct Model {
    pub regions: BTreeMap<u64, (u64, u64)>,
    pub loads: Vec<u64>,
}

impl Model {
    pub fn charged(&self) -> u64 {
        self.regions.values().map(|r| r.0).sum()
    }
    pub fn mapped(&self, start: u64) -> u64 {
        1 + self.loads.iter().filter(|&&s| s == start).count() as u64
    }
    pub fn containing(&self, p: u64, n: u64) -> Option<u64> {
        self.regions.iter().find(|&(&s, &(len, _))| s <= p && p + n <= s + len).map(|(&s, _)| s)
    }
    pub fn register(&mut self, p: u64, n: u64) -> Result<u64, Error> {
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
    pub fn unregister(&mut self, p: u64, n: u64) -> Result<(), Error> {
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

/// Asserts that the registry and the user address space agree with the model.
pub fn check_same(reg: &Registry<&UserSpace<'_>>, us: &UserSpace<'_>, model: &Model) {
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
