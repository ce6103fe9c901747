//! Fault injection: every allocation point of map (and of a splitting unmap) fails in turn;
//! each time the call returns `NoMemory`, nothing it did translates, and no table page leaks
//! (counted by the machine's live-page counter against the table's reachable pages and the
//! pool's cache).
#![cfg(not(loom))]

use std::sync::atomic::Ordering;

use busdma::pgtable::{
    ArmLpaeS1, ArmLpaeS2, FlushDone, Gather, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl,
};
use busdma::{AddrRange, Error, Iova, PageSize, PhysAddr, Platform};
use busdma_model::{HostPlatform, MachineConfig};

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

fn live(m: &HostPlatform) -> u64 {
    m.counters().table_pages_live.load(Ordering::Relaxed)
}

/// A map that needs many tables: 4 KiB pages across a 1 GiB boundary, touching 4 leaf tables
/// on each side, and (for 48-bit input) across two 1 GiB table subtrees.
const IOVA: u64 = (1 << 30) - (4 << 21);
const LEN: u64 = 8 << 21;

fn sweep<F: PteFormat>(bits: u32) {
    sweep_run::<F>(bits, IOVA, LEN, 9);
    // A small run inside one last-level table (the map fast path): one table per level.
    sweep_run::<F>(bits, 0x7f_f000, 0x2000, u64::from(bits / 9 - 2));
}

fn sweep_run<F: PteFormat>(bits: u32, iova: u64, len: u64, min_points: u64) {
    let m = machine();
    // Count the allocation points of a clean run.
    let points = {
        let pool = TablePool::new(&m);
        let pt = PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: bits, coherent_walker: false })
            .unwrap()
            .with_max_leaf(PageSize::Size4K);
        let g = m.pin_cpu();
        let before = pool.alloc_attempts();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, Iova::new(iova), PhysAddr::new(0x1_0000_0000), len, Prot::READ_WRITE) }.unwrap();
        pool.alloc_attempts() - before
    };
    assert!(points >= min_points, "{} {bits}: {points} allocation points", F::NAME);
    for n in 1..=points {
        {
            let pool = TablePool::new(&m);
            let pt =
                PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: bits, coherent_walker: false })
                    .unwrap()
                    .with_max_leaf(PageSize::Size4K);
            let g = m.pin_cpu();
            pool.fail_nth_alloc(Some(n));
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            let r =
                unsafe { pt.map(&g, Iova::new(iova), PhysAddr::new(0x1_0000_0000), len, Prot::READ_WRITE) };
            assert_eq!(r, Err(Error::NoMemory { requested: 4096 }), "{} {bits}: point {n}", F::NAME);
            assert_eq!(pool.stats().injected_failures, 1);
            for off in (0..len).step_by(0x1000) {
                assert_eq!(
                    pt.iova_to_phys(Iova::new(iova + off)),
                    None,
                    "{} {bits} point {n}: +{off:#x}",
                    F::NAME
                );
            }
            // Every live page is either in the table (empty tables may remain, reachable) or
            // cached in the pool.
            assert_eq!(
                live(&m),
                pt.table_pages() as u64 + pool.stats().cached,
                "{} {bits}: point {n}",
                F::NAME
            );
            // And the same map succeeds afterwards.
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.map(&g, Iova::new(iova), PhysAddr::new(0x1_0000_0000), len, Prot::READ_WRITE) }
                .unwrap();
            assert_eq!(
                pt.iova_to_phys(Iova::new(iova + len - 1)),
                Some(PhysAddr::new(0x1_0000_0000 + len - 1))
            );
        }
        assert_eq!(live(&m), 0, "{} {bits}: point {n}: pages leaked", F::NAME);
    }
}

#[test]
fn every_map_allocation_point_fails_cleanly_vtd_39() {
    sweep::<VtdSl>(39);
}

#[test]
fn every_map_allocation_point_fails_cleanly_vtd_48() {
    sweep::<VtdSl>(48);
}

#[test]
fn every_map_allocation_point_fails_cleanly_lpae_39() {
    sweep::<ArmLpaeS1>(39);
    sweep::<ArmLpaeS2>(39);
}

#[test]
fn every_map_allocation_point_fails_cleanly_lpae_48() {
    sweep::<ArmLpaeS1>(48);
}

fn split_sweep<F: PteFormat>() {
    let m = machine();
    let pool = TablePool::new(&m);
    let pt =
        PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    let g = m.pin_cpu();
    let gb = 1u64 << 30;
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(gb), PhysAddr::new(2 * gb), gb, Prot::READ) }.unwrap();
    // Unmapping two pages from the middle of a 1 GiB block at unaligned ends needs 1 + 2
    // pages (the 1 GiB split, and two 2 MiB splits if the ends fall in different 2 MiB blocks).
    let hole = AddrRange::from_start_len(Iova::new(gb + (3 << 21) - 0x1000), 0x2000).unwrap();
    let mut gather = Gather::new();
    for n in 1..=3 {
        pool.fail_nth_alloc(Some(n));
        assert_eq!(
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.unmap(&g, hole, &mut gather) },
            Err(Error::NoMemory { requested: 4096 }),
            "point {n}"
        );
        assert!(gather.is_empty());
        assert_eq!(pt.leaf_of(Iova::new(gb)).unwrap().1, 2, "point {n}: the block is intact");
        assert_eq!(live(&m), pt.table_pages() as u64 + pool.stats().cached);
    }
    let before = pool.alloc_attempts();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.unmap(&g, hole, &mut gather) }.unwrap();
    assert_eq!(pool.alloc_attempts() - before, 3, "exactly three split pages");
    assert_eq!(pt.iova_to_phys(hole.start()), None);
    assert_eq!(
        pt.iova_to_phys(Iova::new(hole.end().raw())),
        Some(PhysAddr::new(2 * gb + (3 << 21) + 0x1000))
    );
    // SAFETY: no IOMMU walks this table.
    gather.release_after_flush(unsafe { FlushDone::for_all() }, &pool, &g).unwrap();
}

#[test]
fn every_split_allocation_point_fails_with_the_block_intact_vtd() {
    split_sweep::<VtdSl>();
}

#[test]
fn every_split_allocation_point_fails_with_the_block_intact_lpae() {
    split_sweep::<ArmLpaeS1>();
    split_sweep::<ArmLpaeS2>();
}

#[test]
fn concurrent_mappers_under_one_missing_table_share_one_install() {
    // Threads map disjoint pages below the same missing tables at once; every page translates,
    // and the table holds exactly the tables one thread alone would have built (losers gave
    // their pages back).
    let m = HostPlatform::new(MachineConfig { cpus: 4, ..MachineConfig::with_ram(64 << 20) }).unwrap();
    for round in 0..50u64 {
        let pool = TablePool::new(&m);
        let pt = PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true })
            .unwrap();
        let base = round << 30;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (pt, m) = (&pt, &m);
                s.spawn(move || {
                    let _b = m.bind_cpu(t as usize).unwrap();
                    let g = m.pin_cpu();
                    for k in 0..8u64 {
                        let iova = base + (k * 4 + t) * 0x1000;
                        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                        unsafe {
                            pt.map(
                                &g,
                                Iova::new(iova),
                                PhysAddr::new(iova + 0x1_0000_0000),
                                0x1000,
                                Prot::READ,
                            )
                        }
                        .unwrap();
                    }
                });
            }
        });
        for p in 0..32u64 {
            let iova = base + p * 0x1000;
            assert_eq!(pt.iova_to_phys(Iova::new(iova)), Some(PhysAddr::new(iova + 0x1_0000_0000)));
        }
        assert_eq!(pt.table_pages(), 4, "root + one table per lower level");
        assert_eq!(live(&m), 4 + pool.stats().cached);
        drop(pt);
        drop(pool);
        assert_eq!(live(&m), 0);
    }
}

fn detach_sweep<F: PteFormat>() {
    // An unmap covering whole tables needs room in the gather for them (one allocation point
    // per detached subtree). Failing it is not an error: the tables stay installed and their
    // leaves are cleared one by one; nothing leaks, nothing stays mapped.
    let m = machine();
    let pool = TablePool::new(&m);
    let pt = PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: false })
        .unwrap()
        .with_max_leaf(PageSize::Size4K);
    let g = m.pin_cpu();
    let r = AddrRange::from_start_len(Iova::new(IOVA), LEN).unwrap();
    for n in 1..=3 {
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, Iova::new(IOVA), PhysAddr::new(0x1_0000_0000), LEN, Prot::READ_WRITE) }.unwrap();
        let tables = pt.table_pages();
        pool.fail_nth_alloc(Some(n));
        let mut gather = Gather::new();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        assert_eq!(unsafe { pt.unmap(&g, r, &mut gather) }, Ok(()), "{} point {n}", F::NAME);
        assert_eq!(pool.stats().injected_failures, n, "the injector fired at point {n}");
        assert_eq!(pt.table_pages() + gather.freed_tables(), tables, "every table is installed or gathered");
        assert!(pt.table_pages() > 1, "point {n}: the refused subtree stayed installed");
        for off in (0..LEN).step_by(0x1000) {
            assert_eq!(pt.iova_to_phys(Iova::new(IOVA + off)), None, "point {n}: +{off:#x}");
        }
        // SAFETY: no IOMMU walks this table.
        gather.release_after_flush(unsafe { FlushDone::for_all() }, &pool, &g).unwrap();
        assert_eq!(live(&m), pt.table_pages() as u64 + pool.stats().cached);
    }
}

#[test]
fn a_gather_allocation_failure_keeps_tables_installed_and_still_unmaps_vtd() {
    detach_sweep::<VtdSl>();
}

#[test]
fn a_gather_allocation_failure_keeps_tables_installed_and_still_unmaps_lpae() {
    detach_sweep::<ArmLpaeS1>();
    detach_sweep::<ArmLpaeS2>();
}

#[test]
fn two_threads_mapping_and_unmapping_neighbouring_ranges_never_disturb_each_other() {
    // Each thread owns every other 64 KiB unit of a 4 MiB window (so both write into the same
    // last-level tables) and every other 2 MiB span of a 16 MiB window (so one thread installs
    // and detaches whole last-level tables while the other does the same beside it, under the
    // same upper tables). Random map/unmap of owned units; each thread checks its own units
    // after every step; at the end, the table holds exactly what the threads left mapped.
    const UNIT: u64 = 16 * 0x1000;
    const SPAN: u64 = 2 << 20;
    const SHARED: u64 = 1 << 30; // window of 64 KiB units
    const SPANS: u64 = 2 << 30; // window of 2 MiB spans
    let m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap();
    let pool = TablePool::new(&m);
    let pt =
        PageTable::<_, ArmLpaeS1>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: false })
            .unwrap()
            .with_max_leaf(PageSize::Size4K);
    let units: Vec<(u64, u64)> =
        (0..64).map(|u| (SHARED + u * UNIT, UNIT)).chain((0..8).map(|v| (SPANS + v * SPAN, SPAN))).collect();
    let pa_of = |iova: u64| PhysAddr::new(iova + 0x10_0000_0000);
    let mapped: Vec<Vec<bool>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2usize)
            .map(|t| {
                let (pt, pool, m, units) = (&pt, &pool, &m, &units);
                s.spawn(move || {
                    let _b = m.bind_cpu(t).unwrap();
                    let mine: Vec<usize> = (0..units.len()).filter(|i| i % 2 == t).collect();
                    let mut state = vec![false; units.len()];
                    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ t as u64;
                    for _ in 0..3000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let i = mine[(x % mine.len() as u64) as usize];
                        let (iova, len) = units[i];
                        let g = m.pin_cpu();
                        if state[i] {
                            let mut gather = Gather::new();
                            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                            unsafe {
                                pt.unmap(
                                    &g,
                                    AddrRange::from_start_len(Iova::new(iova), len).unwrap(),
                                    &mut gather,
                                )
                            }
                            .unwrap();
                            // SAFETY: no IOMMU walks this table.
                            gather.release_after_flush(unsafe { FlushDone::for_all() }, pool, &g).unwrap();
                        } else {
                            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                            unsafe { pt.map(&g, Iova::new(iova), pa_of(iova), len, Prot::READ_WRITE) }
                                .unwrap();
                        }
                        state[i] = !state[i];
                        for &j in &mine {
                            let (a, l) = units[j];
                            for probe in [a, a + l - 0x1000] {
                                let want = state[j].then(|| pa_of(probe));
                                assert_eq!(pt.iova_to_phys(Iova::new(probe)), want, "thread {t}: unit {j}");
                            }
                        }
                    }
                    state
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, &(iova, len)) in units.iter().enumerate() {
        let want = mapped[i % 2][i];
        for off in (0..len).step_by(0x1000) {
            assert_eq!(
                pt.iova_to_phys(Iova::new(iova + off)),
                want.then(|| pa_of(iova + off)),
                "unit {i} +{off:#x}"
            );
        }
    }
    assert_eq!(live(&m), pt.table_pages() as u64 + pool.stats().cached);
}
