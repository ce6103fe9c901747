//! Property test: random map/unmap sequences against a reference model (a `BTreeMap` from page
//! to (PA, rights)), on a non-coherent walker whose view of memory is only what was cleaned.
//!
//! After every operation: the table translates every page of the window exactly as the
//! reference does (errors included: a map that overlaps fails with the first mapped IOVA, an
//! unmap with a hole fails with the first hole, and neither changes anything); a walker that
//! reads only words the page table cleaned to memory (`Platform::cache_clean`) agrees too, so
//! no update a non-coherent IOMMU would miss was left uncleaned; and no table page leaks.
#![cfg(not(loom))]

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use busdma::pgtable::{
    ArmLpaeS1, ArmLpaeS2, FlushDone, Gather, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl,
};
use busdma::platform::PageRequest;
use busdma::{AddrRange, Error, Iova, KernVa, PAGE_SIZE, PhysAddr, Platform, Result, TablePage};
use busdma_model::{HostPlatform, MachineConfig};
use proptest::prelude::*;

/// The hosted platform, plus "RAM as a non-coherent walker sees it": a word is known to the
/// walker only once it was cleaned (or the page was handed out zeroed).
struct Shadow {
    inner: HostPlatform,
    ram: Mutex<HashMap<u64, u64>>,
}

impl Shadow {
    fn word(&self, pa: u64) -> u64 {
        match self.ram.lock().unwrap().get(&pa) {
            Some(&v) => v,
            None => panic!("the walker read {pa:#x}, a word that was never cleaned to memory"),
        }
    }
}

// SAFETY: every answer busdma trusts is forwarded unchanged from the `HostPlatform` behind it
// (whose impl states why they hold); only cache maintenance is observed, which busdma's soundness
// does not rest on.
unsafe impl Platform for Shadow {
    fn read_phys(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<()> {
        self.inner.read_phys(pa, buf)
    }
    fn write_phys(&self, pa: PhysAddr, data: &[u8]) -> Result<()> {
        self.inner.write_phys(pa, data)
    }
    fn fill_phys(&self, pa: PhysAddr, len: u64, byte: u8) -> Result<()> {
        self.inner.fill_phys(pa, len, byte)
    }
    fn alloc_table_page(&self) -> Result<TablePage> {
        let p = self.inner.alloc_table_page()?;
        let mut ram = self.ram.lock().unwrap();
        for i in 0..512 {
            ram.insert(p.pa().raw() + i * 8, 0);
        }
        Ok(p)
    }
    unsafe fn free_table_page(&self, page: TablePage) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.free_table_page(page) }
    }
    fn alloc_pages(&self, req: &PageRequest) -> Result<PhysAddr> {
        self.inner.alloc_pages(req)
    }
    unsafe fn free_pages(&self, pa: PhysAddr, pages: u64) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.free_pages(pa, pages) }
    }
    fn is_ram(&self, pa: PhysAddr, len: u64) -> bool {
        self.inner.is_ram(pa, len)
    }
    fn phys_to_kva(&self, pa: PhysAddr) -> Option<KernVa> {
        self.inner.phys_to_kva(pa)
    }
    fn kva_to_phys(&self, kva: KernVa) -> Option<PhysAddr> {
        self.inner.kva_to_phys(kva)
    }
    fn num_cpus(&self) -> usize {
        self.inner.num_cpus()
    }
    fn preempt_disable(&self) -> usize {
        self.inner.preempt_disable()
    }
    fn preempt_enable(&self, cpu: usize) {
        self.inner.preempt_enable(cpu)
    }
    fn monotonic_ns(&self) -> u64 {
        self.inner.monotonic_ns()
    }
    fn cache_clean(&self, kva: KernVa, len: u64) {
        let pa = self.inner.kva_to_phys(kva).expect("clean of a KVA outside the direct map").raw();
        assert!(pa % 8 == 0 && len % 8 == 0, "clean of a partial entry");
        let mut ram = self.ram.lock().unwrap();
        for w in (pa..pa + len).step_by(8) {
            ram.insert(w, self.inner.read_phys_u64(PhysAddr::new(w)).unwrap());
        }
    }
    fn cache_invalidate(&self, kva: KernVa, len: u64) {
        self.inner.cache_invalidate(kva, len)
    }
    fn cache_clean_invalidate(&self, kva: KernVa, len: u64) {
        self.cache_clean(kva, len);
    }
    unsafe fn mmio_read32(&self, pa: PhysAddr) -> u32 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.mmio_read32(pa) }
    }
    unsafe fn mmio_write32(&self, pa: PhysAddr, value: u32) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.mmio_write32(pa, value) }
    }
    unsafe fn mmio_read64(&self, pa: PhysAddr) -> u64 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.mmio_read64(pa) }
    }
    unsafe fn mmio_write64(&self, pa: PhysAddr, value: u64) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.mmio_write64(pa, value) }
    }
    unsafe fn quick_map(&self, cpu: usize, slot: usize, pa: PhysAddr) -> KernVa {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.quick_map(cpu, slot, pa) }
    }
    unsafe fn quick_unmap(&self, cpu: usize, slot: usize) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.inner.quick_unmap(cpu, slot) }
    }
}

/// A walk of `F`'s tables reading only the shadow RAM (what a non-coherent IOMMU sees).
fn shadow_walk<F: PteFormat>(
    sh: &Shadow,
    root: PhysAddr,
    levels: u32,
    iova: u64,
) -> Option<(PhysAddr, Prot)> {
    let mut table = root.raw();
    for height in (0..levels).rev() {
        let shift = 12 + 9 * height;
        let pte = sh.word(table + ((iova >> shift) & 511) * 8);
        if !F::is_present(pte) {
            return None;
        }
        if F::is_leaf(pte, height) {
            return Some((
                PhysAddr::new(F::output(pte, height).raw() + (iova & ((1 << shift) - 1))),
                F::prot(pte),
            ));
        }
        table = F::output(pte, height).raw();
    }
    None
}

/// Pages in the window the test works in: 8 MiB, four 2 MiB block spans.
const WINDOW_PAGES: u64 = 2048;

#[derive(Clone, Debug)]
enum Op {
    Map { page: u64, pages: u64, pa_shift: u64, write: bool },
    Unmap { page: u64, pages: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    // Runs are short, or block-sized and block-aligned often enough to build 2 MiB blocks.
    let start = prop_oneof![0..WINDOW_PAGES, (0..WINDOW_PAGES / 512).prop_map(|b| b * 512)];
    let len = prop_oneof![1..40u64, Just(512u64), Just(1024u64), 500..600u64];
    // PA congruent to the IOVA modulo 2 MiB (blocks possible) or not.
    let shift = prop_oneof![Just(0u64), Just(512 * 3), 1..8u64];
    prop_oneof![
        (start.clone(), len.clone(), shift, any::<bool>())
            .prop_map(|(page, pages, pa_shift, write)| Op::Map { page, pages, pa_shift, write }),
        (start, len).prop_map(|(page, pages)| Op::Unmap { page, pages }),
    ]
}

fn run<F: PteFormat>(bits: u32, ops: &[Op]) {
    let sh = Shadow {
        inner: HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(32 << 20) }).unwrap(),
        ram: Mutex::new(HashMap::new()),
    };
    {
        let pool = TablePool::new(&sh);
        let pt = PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: bits, coherent_walker: false })
            .unwrap();
        let g = sh.pin_cpu();
        // The window sits at the top of the input space: the last page is covered too.
        let base = (1u64 << bits) - WINDOW_PAGES * PAGE_SIZE;
        let mut reference: BTreeMap<u64, (u64, Prot)> = BTreeMap::new();
        for op in ops {
            match *op {
                Op::Map { page, pages, pa_shift, write } => {
                    let pages = pages.min(WINDOW_PAGES - page);
                    let iova = base + page * PAGE_SIZE;
                    let pa = 0x40_0000_0000 + (page + pa_shift) * PAGE_SIZE;
                    let prot = if write { Prot::READ_WRITE } else { Prot::READ };
                    let first_mapped =
                        reference.range(page..page + pages).next().map(|(&p, _)| base + p * PAGE_SIZE);
                    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                    let r =
                        unsafe { pt.map(&g, Iova::new(iova), PhysAddr::new(pa), pages * PAGE_SIZE, prot) };
                    match first_mapped {
                        Some(addr) => assert_eq!(r, Err(Error::AlreadyMapped { addr }), "{op:?}"),
                        None => {
                            assert_eq!(r, Ok(()), "{op:?}");
                            let eff = F::effective_prot(prot).unwrap();
                            for k in 0..pages {
                                reference.insert(page + k, (pa + k * PAGE_SIZE, eff));
                            }
                        }
                    }
                }
                Op::Unmap { page, pages } => {
                    let pages = pages.min(WINDOW_PAGES - page);
                    let r = AddrRange::from_start_len(Iova::new(base + page * PAGE_SIZE), pages * PAGE_SIZE)
                        .unwrap();
                    let hole = (page..page + pages)
                        .find(|p| !reference.contains_key(p))
                        .map(|p| base + p * PAGE_SIZE);
                    let mut gather = Gather::new();
                    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                    let res = unsafe { pt.unmap(&g, r, &mut gather) };
                    match hole {
                        Some(addr) => {
                            assert_eq!(res, Err(Error::NotMapped { addr }), "{op:?}");
                            assert!(gather.is_empty());
                        }
                        None => {
                            assert_eq!(res, Ok(()), "{op:?}");
                            for p in page..page + pages {
                                reference.remove(&p);
                            }
                            // SAFETY: no IOMMU walks this table; the flush is trivially done.
                            let proof = unsafe { FlushDone::for_range(r) };
                            gather.release_after_flush(proof, &pool, &g).unwrap();
                        }
                    }
                }
            }
            for p in 0..WINDOW_PAGES {
                let iova = base + p * PAGE_SIZE + 8;
                let want = reference.get(&p).map(|&(pa, prot)| (PhysAddr::new(pa + 8), prot));
                let got = pt.iova_to_phys(Iova::new(iova));
                assert_eq!(got, want.map(|w| w.0), "after {op:?}: page {p}");
                assert_eq!(
                    shadow_walk::<F>(&sh, pt.root(), pt.levels(), iova),
                    want,
                    "non-coherent view, after {op:?}: page {p}"
                );
            }
            let live = sh.inner.counters().table_pages_live.load(Ordering::Relaxed);
            assert_eq!(live, pt.table_pages() as u64 + pool.stats().cached, "after {op:?}");
        }
    }
    assert_eq!(sh.inner.counters().table_pages_live.load(Ordering::Relaxed), 0, "leaked table pages");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn vtd_48_agrees_with_the_reference_map(ops in proptest::collection::vec(op(), 1..30)) {
        run::<VtdSl>(48, &ops);
    }

    #[test]
    fn lpae_39_agrees_with_the_reference_map(ops in proptest::collection::vec(op(), 1..30)) {
        run::<ArmLpaeS1>(39, &ops);
    }

    #[test]
    fn lpae_s2_48_agrees_with_the_reference_map(ops in proptest::collection::vec(op(), 1..30)) {
        run::<ArmLpaeS2>(48, &ops);
    }
}
