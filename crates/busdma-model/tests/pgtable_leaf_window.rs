//! Pinned leaf windows (`pgtable` rule 9, `walker/leafwin.rs`): random writes and clears
//! through a `LeafWindow` that straddles two last-level tables agree with a reference model
//! (a map from page to physical address), as the table's own lookup and the model IOMMU's
//! independent walk both see it; a refused write or clear changes nothing; every format and a
//! non-coherent walker take the same path.

use std::collections::BTreeMap;

use proptest::prelude::*;

use busdma::pgtable::{ArmLpaeS1, ArmLpaeS2, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{Context, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat};

const DEV: u32 = 0x11;
/// The window: 24 pages ending 8 pages past a 2 MiB line, so it holds two leaf tables.
const START: u64 = (5 << 21) - 16 * PAGE_SIZE;
const PAGES: u64 = 24;

#[derive(Clone, Debug)]
enum Op {
    /// Map `n` pages from page `at` to the frame `frame + k` for page `k`.
    Write { at: u64, n: u64, frame: u64 },
    /// Clear `n` pages from page `at`.
    Clear { at: u64, n: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..PAGES + 2, 1..6u64, 0..64u64).prop_map(|(at, n, frame)| Op::Write { at, n, frame }),
        (0..PAGES + 2, 1..6u64).prop_map(|(at, n)| Op::Clear { at, n }),
    ]
}

fn model_format<F: PteFormat>() -> TableFormat {
    match F::NAME {
        n if n == VtdSl::NAME => TableFormat::VtdSecondLevel,
        n if n == ArmLpaeS2::NAME => TableFormat::ArmLpaeStage2,
        _ => TableFormat::ArmLpaeStage1,
    }
}

/// Runs `ops` on a pinned window of a fresh table in format `F`, checking after each.
fn run<F: PteFormat>(coherent: bool, ops: &[Op]) {
    let m = HostPlatform::new(MachineConfig { cpus: 1, ..MachineConfig::with_ram(16 << 20) }).unwrap();
    let iommu = ModelIommu::new(&m, IommuConfig { iotlb_entries: 0, ..IommuConfig::default() }).unwrap();
    let pool = TablePool::new(&m);
    let pt =
        PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: coherent }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), model_format::<F>(), 48)) }.unwrap();
    let g = m.pin_cpu();
    let window = AddrRange::from_start_len(Iova::new(START), PAGES * PAGE_SIZE).unwrap();
    // SAFETY: the test owns this table's IOVA and maps the window only through `lw`.
    let lw = unsafe { pt.pin_leaves(&g, window) }.unwrap();
    assert_eq!(lw.tables(), 2);
    let tables = pt.table_pages();
    let leaf = pt.leaf_template(Prot::READ).unwrap();
    let base = 0x40_0000_0000u64;
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    for o in ops {
        match *o {
            Op::Write { at, n, frame } => {
                let pa = PhysAddr::new(base + frame * PAGE_SIZE);
                // SAFETY: the window is the test's; the PA range is outside RAM (translation
                // only).
                let r = unsafe { pt.write_pinned(&lw, at * PAGE_SIZE, pa, n * PAGE_SIZE, &leaf) };
                let fits = at + n <= PAGES;
                let free = (at..at + n).all(|p| !model.contains_key(&p));
                match r {
                    Ok(()) => {
                        assert!(fits && free, "{o:?} accepted");
                        for k in 0..n {
                            model.insert(at + k, pa.raw() + k * PAGE_SIZE);
                        }
                    }
                    Err(Error::OutOfRange { .. }) => assert!(!fits, "{o:?}"),
                    Err(Error::AlreadyMapped { addr }) => {
                        assert!(fits && !free, "{o:?}");
                        let first = (at..at + n).find(|p| model.contains_key(p)).unwrap();
                        assert_eq!(addr, START + first * PAGE_SIZE, "the first page in use");
                    }
                    Err(e) => panic!("{o:?}: {e:?}"),
                }
            }
            Op::Clear { at, n } => {
                // SAFETY: the window is the test's.
                let r = unsafe { pt.clear_pinned(&lw, at * PAGE_SIZE, n * PAGE_SIZE) };
                let fits = at + n <= PAGES;
                let mapped = (at..at + n).all(|p| model.contains_key(&p));
                match r {
                    Ok(()) => {
                        assert!(fits && mapped, "{o:?} accepted");
                        for p in at..at + n {
                            model.remove(&p);
                        }
                    }
                    Err(Error::OutOfRange { .. }) => assert!(!fits, "{o:?}"),
                    Err(Error::NotMapped { addr }) => {
                        assert!(fits && !mapped, "{o:?}");
                        let first = (at..at + n).find(|p| !model.contains_key(p)).unwrap();
                        assert_eq!(addr, START + first * PAGE_SIZE, "the first page not mapped");
                    }
                    Err(e) => panic!("{o:?}: {e:?}"),
                }
            }
        }
        for p in 0..PAGES {
            let iova = Iova::new(START + p * PAGE_SIZE);
            let want = model.get(&p).copied();
            assert_eq!(pt.iova_to_phys(iova).map(|a| a.raw()), want, "page {p} after {o:?}");
            let walked = iommu.inspect(DEV, iova).ok().map(|l| l.page.raw());
            assert_eq!(walked, want, "the model IOMMU's walk of page {p} after {o:?}");
        }
        assert_eq!(pt.table_pages(), tables, "a pinned window never adds or detaches a table");
    }
    iommu.detach(DEV).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn pinned_writes_and_clears_match_a_reference_model(ops in proptest::collection::vec(op(), 1..24)) {
        run::<VtdSl>(true, &ops);
        run::<ArmLpaeS1>(true, &ops);
        run::<ArmLpaeS2>(true, &ops);
        run::<VtdSl>(false, &ops);
    }
}
