//! The model IOMMU, walking busdma's tables in guest RAM, agrees with the builder's own
//! `iova_to_phys` on every mapped page and faults on every unmapped one: over every format ×
//! input width × leaf size, before and after a partial unmap splits a block, and against a
//! reference model of random maps and unmaps. The walker shares no code with the builder
//! (it is written from the specifications), so a bit either of them misreads shows here.
//!
//! The IOTLB is off in these tests: every check is a real walk of the current tables.

use proptest::prelude::*;

use busdma::pgtable::{
    ArmLpaeS1, ArmLpaeS2, FlushDone, Gather, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl,
};
use busdma::{AddrRange, CpuGuard, Iova, PAGE_SIZE, PageSize, PhysAddr, Platform};
use busdma_model::{Context, FaultReason, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat};

const DEV: u32 = 0x10;

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

fn walker(m: &HostPlatform) -> ModelIommu<'_> {
    ModelIommu::new(m, IommuConfig { iotlb_entries: 0, ..IommuConfig::default() }).unwrap()
}

fn model_format<F: PteFormat>() -> TableFormat {
    match F::NAME {
        n if n == VtdSl::NAME => TableFormat::VtdSecondLevel,
        n if n == ArmLpaeS2::NAME => TableFormat::ArmLpaeStage2,
        _ => TableFormat::ArmLpaeStage1,
    }
}

fn range(start: u64, len: u64) -> AddrRange<Iova> {
    AddrRange::from_start_len(Iova::new(start), len).unwrap()
}

fn unmap<P: Platform, F: PteFormat>(pt: &PageTable<'_, P, F>, g: &CpuGuard<'_, P>, r: AddrRange<Iova>) {
    let mut gather = Gather::new();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.unmap(g, r, &mut gather) }.unwrap();
    // SAFETY: the model IOMMU's IOTLB is off; no cached walk can reach the pages.
    let proof = unsafe { FlushDone::for_all() };
    gather.release_after_flush(proof, pt.pool(), g).unwrap();
}

/// The pages of `[start, start + len)` a check visits: every page, or for spans too long to
/// walk page by page in a debug build (1 GiB leaves), every 257th page (so page offsets inside
/// 2 MiB vary) plus 16 pages on each side of every point in `near`.
fn pages(start: u64, len: u64, near: &[u64]) -> Vec<u64> {
    if len <= 64 << 20 {
        return (0..len / PAGE_SIZE).map(|i| start + i * PAGE_SIZE).collect();
    }
    let mut v: Vec<u64> = (0..len / PAGE_SIZE).step_by(257).map(|i| start + i * PAGE_SIZE).collect();
    for &p in near {
        for i in 0..32u64 {
            let a = (p + i * PAGE_SIZE).wrapping_sub(16 * PAGE_SIZE);
            if (start..start + len).contains(&a) {
                v.push(a);
            }
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Checks `pages` of the device's space: the builder maps a page exactly where `mapped`
/// says; where it does, the model translates reads to the same address, and writes too if
/// the leaf is writable (else a permission fault); where it does not, the model faults "not
/// present".
fn agree<P: Platform, F: PteFormat>(
    iommu: &ModelIommu<'_>,
    pt: &PageTable<'_, P, F>,
    pages: &[u64],
    mapped: impl Fn(u64) -> bool,
    what: &str,
) {
    for &a in pages {
        // A byte inside the page, so the page offset is checked too.
        let iova = Iova::new(a + 0x18);
        let pa = pt.iova_to_phys(iova);
        assert_eq!(pa.is_some(), mapped(a), "{what}: {} builder at {iova:?}", F::NAME);
        match pa {
            Some(pa) => {
                assert_eq!(iommu.translate(DEV, iova, false), Ok(pa), "{what}: {} read of {iova:?}", F::NAME);
                let (pte, _) = pt.leaf_of(iova).unwrap();
                let w = iommu.translate(DEV, iova, true).map_err(|f| f.reason);
                if F::prot(pte).write {
                    assert_eq!(w, Ok(pa), "{what}: {} write of {iova:?}", F::NAME);
                } else {
                    assert_eq!(w, Err(FaultReason::Permission), "{what}: {} write of {iova:?}", F::NAME);
                }
            }
            None => {
                let f = iommu.translate(DEV, iova, false).unwrap_err();
                assert!(
                    matches!(f.reason, FaultReason::NotPresent { .. }),
                    "{what}: {} {iova:?}: {f}",
                    F::NAME
                );
            }
        }
    }
    iommu.take_faults();
}

fn every_size_case<F: PteFormat>(bits: u32, size: PageSize) {
    let m = machine();
    let iommu = walker(&m);
    let pool = TablePool::new(&m);
    let pt = PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: bits, coherent_walker: true })
        .unwrap()
        .with_max_leaf(size);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), model_format::<F>(), bits)) }.unwrap();
    let g = m.pin_cpu();
    let what = format!("{bits}-bit, {size:?} leaves");
    let s = size.bytes();
    let limit = 1u64 << bits;
    let (iova, pa) = (3 * s, 0x80_0000_0000 + 5 * s);
    // A page inside the first leaf (the second 4 KiB leaf when leaves are 4 KiB).
    let h = (s / 2).max(PAGE_SIZE);
    let hole = iova + h;
    let span = pages(
        iova - PAGE_SIZE,
        4 * s + 2 * PAGE_SIZE,
        &[iova, hole, iova + s, iova + 2 * s, iova + 3 * s, iova + 4 * s],
    );
    let top = pages(limit - 2 * PAGE_SIZE, 2 * PAGE_SIZE, &[]);
    // Nothing translates in an empty table.
    agree(&iommu, &pt, &span, |_| false, &what);
    agree(&iommu, &pt, &top, |_| false, &what);
    // Two leaves of the size, read-write, IOVA and PA aligned to it, PA far from the IOVA
    // (translation never touches the data, so the PA need not be RAM); one read-only leaf
    // after a one-leaf gap; the last page below the input limit.
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(iova), PhysAddr::new(pa), 2 * s, Prot::READ_WRITE) }.unwrap();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(iova + 3 * s), PhysAddr::new(pa), s, Prot::READ) }.unwrap();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe {
        pt.map(&g, Iova::new(limit - PAGE_SIZE), PhysAddr::new(0x1234_5000), PAGE_SIZE, Prot::READ_WRITE)
    }
    .unwrap();
    let layout = |a: u64| (iova..iova + 2 * s).contains(&a) || (iova + 3 * s..iova + 4 * s).contains(&a);
    agree(&iommu, &pt, &span, layout, &what);
    agree(&iommu, &pt, &top, |a| a == limit - PAGE_SIZE, &what);
    let f = iommu.translate(DEV, Iova::new(limit), false).unwrap_err();
    assert_eq!(f.reason, FaultReason::BeyondInputWidth { input_bits: bits });
    // A partial unmap of one page inside the first leaf splits it: the hole faults, every
    // other page still translates to the same place.
    unmap(&pt, &g, range(hole, PAGE_SIZE));
    agree(&iommu, &pt, &span, |a| layout(a) && a != hole, &what);
    // Unmapping the rest leaves nothing translating.
    unmap(&pt, &g, range(iova, h));
    let rest = 2 * s - h - PAGE_SIZE;
    if rest > 0 {
        unmap(&pt, &g, range(hole + PAGE_SIZE, rest));
    }
    unmap(&pt, &g, range(iova + 3 * s, s));
    unmap(&pt, &g, range(limit - PAGE_SIZE, PAGE_SIZE));
    agree(&iommu, &pt, &span, |_| false, &what);
    agree(&iommu, &pt, &top, |_| false, &what);
    assert_eq!(iommu.stats().iotlb_hits, 0, "every check was a walk");
}

#[test]
fn the_model_walk_agrees_with_iova_to_phys_for_every_format_width_and_size() {
    for bits in [39, 48] {
        for size in PageSize::ALL {
            every_size_case::<VtdSl>(bits, size);
            every_size_case::<ArmLpaeS1>(bits, size);
            every_size_case::<ArmLpaeS2>(bits, size);
        }
    }
}

/// One step of the random test: map `pages` pages at page `at` (to a PA derived from `pa`),
/// or unmap the run at `at` if there is one.
#[derive(Clone, Copy, Debug)]
struct Op {
    at: u64,
    pages: u64,
    pa: u64,
    writable: bool,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    // A 4 MiB window (1024 pages): runs of up to 600 pages reach across a 2 MiB boundary and
    // get block entries when aligned; `at` is snapped to 2 MiB half the time.
    let op = (0u64..1024, 1u64..600, 0u64..1 << 20, any::<bool>(), any::<bool>()).prop_map(
        |(at, pages, pa, snap, writable)| {
            let at = if snap { at & !511 } else { at };
            Op { at, pages: pages.min(1024 - at), pa, writable }
        },
    );
    proptest::collection::vec(op, 1..24)
}

fn random_case<F: PteFormat>(bits: u32, ops: &[Op]) -> Result<(), TestCaseError> {
    let m = machine();
    let iommu = walker(&m);
    let pool = TablePool::new(&m);
    let pt =
        PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: bits, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), model_format::<F>(), bits)) }.unwrap();
    let g = m.pin_cpu();
    // The window sits just below the input limit, so the last pages are exercised.
    let base = (1u64 << bits) - 1024 * PAGE_SIZE;
    let mut runs: Vec<(u64, u64)> = Vec::new(); // (first page, pages), disjoint
    let mut reference = std::collections::BTreeMap::new(); // page -> pa
    for op in ops {
        let hit = runs.iter().position(|&(a, n)| op.at < a + n && a < op.at + op.pages);
        match hit {
            Some(i) => {
                let (a, n) = runs.swap_remove(i);
                unmap(&pt, &g, range(base + a * PAGE_SIZE, n * PAGE_SIZE));
                for p in a..a + n {
                    reference.remove(&p);
                }
            }
            None => {
                // Same alignment as the IOVA modulo 2 MiB, so aligned runs can use blocks.
                let pa = ((op.pa << 21) | (op.at & 511) << 12) + 0x100_0000_0000;
                let prot = if op.writable { Prot::READ_WRITE } else { Prot::READ };
                // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                unsafe {
                    pt.map(
                        &g,
                        Iova::new(base + op.at * PAGE_SIZE),
                        PhysAddr::new(pa),
                        op.pages * PAGE_SIZE,
                        prot,
                    )
                }
                .unwrap();
                runs.push((op.at, op.pages));
                for p in 0..op.pages {
                    reference.insert(op.at + p, pa + p * PAGE_SIZE);
                }
            }
        }
        for p in 0..1024u64 {
            let iova = Iova::new(base + p * PAGE_SIZE + 0x20);
            let want = reference.get(&p).map(|&pa| PhysAddr::new(pa + 0x20));
            prop_assert_eq!(pt.iova_to_phys(iova), want, "builder vs reference at page {}", p);
            prop_assert_eq!(
                iommu.translate(DEV, iova, false).ok(),
                want,
                "model walk vs reference at page {}",
                p
            );
        }
        iommu.take_faults();
    }
    for (a, n) in runs {
        unmap(&pt, &g, range(base + a * PAGE_SIZE, n * PAGE_SIZE));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_maps_and_unmaps_translate_alike_in_builder_model_and_reference(ops in ops(), wide in any::<bool>()) {
        let bits = if wide { 48 } else { 39 };
        random_case::<VtdSl>(bits, &ops)?;
        random_case::<ArmLpaeS1>(bits, &ops)?;
        random_case::<ArmLpaeS2>(bits, &ops)?;
    }
}
