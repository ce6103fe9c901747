//! A strict IOMMU domain for the front-end tests, built from the real page table (VT-d
//! second level) and a first-fit IOVA list, with counters: live IOVA bytes, unmap calls
//! (one invalidation each), table pages. It stands in until `busdma::iommu::Domain` lands;
//! the tests only see it through `IommuOps`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use busdma::front::strategy::reserve_levels::reserve_levels;
use busdma::front::{Direction, Invalidation, IommuOps};
use busdma::pgtable::{FlushDone, Gather, PageTable, PageTableConfig, Prot, TablePool, VtdSl};
use busdma::{AddrRange, Error, Iova, PhysAddr, Platform, Result};
use busdma_model::HostPlatform;

pub struct PtDomain<'p> {
    pub m: &'p HostPlatform,
    pub pt: PageTable<'p, HostPlatform, VtdSl>,
    /// start -> len of allocated IOVA.
    live: Mutex<BTreeMap<u64, u64>>,
    pub invalidations: AtomicU64,
}

impl<'p> PtDomain<'p> {
    pub fn new(m: &'p HostPlatform, pool: &'p TablePool<'p, HostPlatform>) -> Self {
        let pt = PageTable::new(pool, PageTableConfig { input_bits: 39, coherent_walker: true }).unwrap();
        Self { m, pt, live: Mutex::new(BTreeMap::new()), invalidations: AtomicU64::new(0) }
    }
    pub fn live_iova_bytes(&self) -> u64 {
        self.live.lock().unwrap().values().sum()
    }
    /// What the device reaches at `iova` (a software walk of the very tables the hardware
    /// would walk).
    pub fn translate(&self, iova: u64) -> Option<PhysAddr> {
        self.pt.iova_to_phys(Iova::new(iova))
    }
}

impl IommuOps for &PtDomain<'_> {
    type Ticket = ();

    fn invalidation(&self) -> Invalidation {
        Invalidation::Strict
    }

    fn max_iova(&self) -> u64 {
        self.pt.input_limit() - 1
    }

    fn alloc_iova(&self, size: u64, align: u64, limit: u64) -> Result<AddrRange<Iova>> {
        let mut live = self.live.lock().unwrap();
        // First fit above 1 MiB (IOVA 0 is never handed out).
        let mut cand = 1u64 << 20;
        for (&s, &l) in live.iter() {
            let c = cand.next_multiple_of(align);
            if c + size <= s {
                break;
            }
            cand = cand.max(s + l);
        }
        let c = cand.next_multiple_of(align);
        if c + size - 1 > limit {
            return Err(Error::Exhausted { size, limit });
        }
        live.insert(c, size);
        AddrRange::from_start_len(Iova::new(c), size)
    }

    fn free_iova(&self, range: AddrRange<Iova>) {
        let l = self.live.lock().unwrap().remove(&range.start().raw());
        assert_eq!(l, Some(range.len()), "free of IOVA that was not allocated so: {range:?}");
    }

    fn map(&self, iova: Iova, pa: PhysAddr, len: u64, dir: Direction) -> Result<()> {
        let prot = Prot { read: dir.device_reads(), write: dir.device_writes() };
        let g = self.m.pin_cpu();
        self.pt.map(&g, iova, pa, len, prot)
    }

    fn unmap(&self, mapped: &[AddrRange<Iova>], free: &[AddrRange<Iova>]) {
        let g = self.m.pin_cpu();
        let mut gather = Gather::default();
        for r in mapped {
            self.pt.unmap(&g, *r, &mut gather).expect("unmap of a mapped range");
        }
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = gather.range() {
            // SAFETY: this domain has no IOTLB: clearing the entries is the invalidation.
            let proof = unsafe { FlushDone::for_range(r) };
            gather.release_after_flush(proof, self.pt.pool(), &g).unwrap();
        }
        for r in free {
            self.free_iova(*r);
        }
    }

    fn ensure_flushed(&self, _ticket: ()) {}

    fn reserve_tables(&self, range: AddrRange<Iova>) -> Result<()> {
        let g = self.m.pin_cpu();
        reserve_levels(&self.pt, &g, range)
    }
}
