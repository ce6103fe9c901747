//! The page-table conformance matrix: every property below runs over every format × input
//! width × page size (× coherent and non-coherent walker), on the hosted machine model.
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

/// One cell of the matrix.
#[derive(Clone, Copy, Debug)]
struct Case {
    format: &'static str,
    bits: u32,
    size: PageSize,
    coherent: bool,
}

fn height(size: PageSize) -> u32 {
    (size.shift() - 12) / 9
}

fn range(start: u64, len: u64) -> AddrRange<Iova> {
    AddrRange::from_start_len(Iova::new(start), len).unwrap()
}

/// Unmaps `r`, then releases the gather as a strict invalidation would.
fn unmap_and_flush<P: Platform, F: PteFormat>(
    pt: &PageTable<'_, P, F>,
    g: &busdma::CpuGuard<'_, P>,
    r: AddrRange<Iova>,
) {
    let mut gather = Gather::new();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.unmap(g, r, &mut gather) }.unwrap();
    // SAFETY: no IOMMU walks these tables in this test; the "flush" is trivially complete.
    let proof = unsafe { FlushDone::for_range(gather.range().unwrap()) };
    gather.release_after_flush(proof, pt.pool(), g).unwrap();
}

/// Runs `body::<F>` for every cell of the matrix.
macro_rules! matrix {
    (|$case:ident, $pt:ident, $g:ident, $m:ident| $body:block) => {{
        fn run<F: PteFormat>($case: Case) {
            let $m = machine();
            {
                let pool = TablePool::new(&$m);
                let cfg = PageTableConfig { input_bits: $case.bits, coherent_walker: $case.coherent };
                let $pt = PageTable::<_, F>::new(&pool, cfg).unwrap().with_max_leaf($case.size);
                let $g = $m.pin_cpu();
                $body
                drop($g);
                drop($pt);
            }
            assert_eq!(live(&$m), 0, "{:?}: table pages leaked", $case);
        }
        for bits in [39, 48] {
            for size in PageSize::ALL {
                for coherent in [true, false] {
                    run::<VtdSl>(Case { format: VtdSl::NAME, bits, size, coherent });
                    run::<ArmLpaeS1>(Case { format: ArmLpaeS1::NAME, bits, size, coherent });
                    run::<ArmLpaeS2>(Case { format: ArmLpaeS2::NAME, bits, size, coherent });
                }
            }
        }
    }};
}

#[test]
fn empty_tables_translate_nothing() {
    matrix!(|case, pt, g, m| {
        let limit = 1u64 << case.bits;
        for a in [0, 0x1000, 0x20_0000, 0x4000_0000, limit / 2, limit - 0x1000, limit - 1] {
            assert_eq!(pt.iova_to_phys(Iova::new(a)), None, "{case:?} {a:#x}");
        }
        assert_eq!(pt.iova_to_phys(Iova::new(limit)), None);
        assert_eq!(pt.table_pages(), 1, "{case:?}: an empty table is its root");
        assert_eq!(pt.levels(), if case.bits == 39 { 3 } else { 4 });
        let _ = (&g, &m);
    });
}

#[test]
fn every_size_maps_and_translates_with_a_leaf_of_that_size() {
    matrix!(|case, pt, g, m| {
        let s = case.size.bytes();
        // Two leaves of the size, IOVA and PA both aligned to it, PA far from IOVA.
        let iova = 3 * s;
        let pa = 0x80_0000_0000 + 5 * s;
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, Iova::new(iova), PhysAddr::new(pa), 2 * s, Prot::READ_WRITE) }.unwrap();
        for off in [0, 0x1000, s - 8, s, 2 * s - 1] {
            assert_eq!(
                pt.iova_to_phys(Iova::new(iova + off)),
                Some(PhysAddr::new(pa + off)),
                "{case:?} +{off:#x}"
            );
        }
        assert_eq!(pt.iova_to_phys(Iova::new(iova - 1)), None);
        assert_eq!(pt.iova_to_phys(Iova::new(iova + 2 * s)), None);
        let (pte, h) = pt.leaf_of(Iova::new(iova)).unwrap();
        assert_eq!(h, height(case.size), "{case:?}: leaf height");
        let _ = pte;
        unmap_and_flush(&pt, &g, range(iova, 2 * s));
        assert_eq!(pt.iova_to_phys(Iova::new(iova)), None);
        let _ = &m;
    });
}

#[test]
fn rights_read_back_as_the_format_grants_them() {
    matrix!(|case, pt, g, m| {
        let s = case.size.bytes();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, Iova::new(0), PhysAddr::new(0x4000_0000), s, Prot::READ) }.unwrap();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, Iova::new(s), PhysAddr::new(0x4000_0000), s, Prot::WRITE) }.unwrap();
        let (ro, _) = pt.leaf_of(Iova::new(0)).unwrap();
        let (wo, _) = pt.leaf_of(Iova::new(s)).unwrap();
        if case.format == VtdSl::NAME {
            assert_eq!(VtdSl::prot(ro), Prot::READ);
            assert_eq!(VtdSl::prot(wo), Prot::WRITE);
        } else if case.format == ArmLpaeS2::NAME {
            assert_eq!(ArmLpaeS2::prot(ro), Prot::READ);
            assert_eq!(ArmLpaeS2::prot(wo), Prot::WRITE, "stage 2 expresses write-only");
        } else {
            assert_eq!(ArmLpaeS1::prot(ro), Prot::READ);
            assert_eq!(ArmLpaeS1::prot(wo), Prot::READ_WRITE, "stage 1 cannot deny reads");
        }
        let none = Prot::rw(false, false);
        assert!(matches!(
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.map(&g, Iova::new(2 * s), PhysAddr::new(0), s, none) },
            Err(Error::InvalidArgument { .. })
        ));
        unmap_and_flush(&pt, &g, range(0, 2 * s));
        let _ = &m;
    });
}

#[test]
fn overlapping_map_fails_with_the_first_mapped_iova_and_changes_nothing() {
    matrix!(|case, pt, g, m| {
        let s = case.size.bytes();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, Iova::new(4 * s), PhysAddr::new(0x1_0000_0000), s, Prot::READ_WRITE) }.unwrap();
        let before = pt.table_pages();
        // [2s, 5s) overlaps [4s, 5s): the first two leaves are written, then rolled back.
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        let r = unsafe { pt.map(&g, Iova::new(2 * s), PhysAddr::new(0x2_0000_0000), 3 * s, Prot::READ) };
        assert_eq!(r, Err(Error::AlreadyMapped { addr: 4 * s }), "{case:?}");
        assert_eq!(pt.iova_to_phys(Iova::new(2 * s)), None, "{case:?}: rolled back");
        assert_eq!(pt.iova_to_phys(Iova::new(4 * s - 0x1000)), None, "{case:?}: rolled back");
        assert_eq!(pt.iova_to_phys(Iova::new(4 * s)), Some(PhysAddr::new(0x1_0000_0000)), "{case:?}: intact");
        assert!(pt.table_pages() >= before);
        // A 4 KiB map inside an existing leaf of any size also fails.
        let inside = 4 * s + ((s / 2) & !0xfff);
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        let r = unsafe { pt.map(&g, Iova::new(inside), PhysAddr::new(0), 0x1000, Prot::READ) };
        assert_eq!(r, Err(Error::AlreadyMapped { addr: inside }), "{case:?}");
        unmap_and_flush(&pt, &g, range(4 * s, s));
        let _ = &m;
    });
}

#[test]
fn partial_unmap_of_a_block_splits_it_and_keeps_the_rest() {
    matrix!(|case, pt, g, m| {
        let s = case.size.bytes();
        let pa = 0x40_0000_0000u64;
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, Iova::new(s), PhysAddr::new(pa), s, Prot::READ_WRITE) }.unwrap();
        // Unmap one 4 KiB page in the middle (for 4 KiB leaves: the run's middle page of a
        // three-page run instead, since one page has no middle).
        let (hole, len) = if case.size == PageSize::Size4K {
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.map(&g, Iova::new(2 * s), PhysAddr::new(pa + s), 2 * s, Prot::READ_WRITE) }.unwrap();
            (2 * s, 0x1000)
        } else {
            (s + s / 2 + 0x3000, 0x1000)
        };
        let mut gather = Gather::new();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.unmap(&g, range(hole, len), &mut gather) }.unwrap();
        assert_eq!(gather.range(), Some(range(hole, len)), "{case:?}: gathered exactly the hole");
        assert_eq!(gather.freed_tables(), 0, "{case:?}: a split frees no table");
        assert_eq!(pt.iova_to_phys(Iova::new(hole)), None, "{case:?}");
        for a in [s, hole - 0x1000, hole + 0x1000, 2 * s - 0x1000] {
            assert_eq!(pt.iova_to_phys(Iova::new(a)), Some(PhysAddr::new(pa + a - s)), "{case:?} {a:#x}");
        }
        if case.size != PageSize::Size4K {
            assert_eq!(pt.leaf_of(Iova::new(hole + 0x1000)).unwrap().1, 0, "{case:?}: split down to pages");
        }
        if case.size == PageSize::Size1G {
            // The other 2 MiB parts of a split 1 GiB block stay 2 MiB blocks.
            assert_eq!(pt.leaf_of(Iova::new(s + s / 4)).unwrap().1, 1, "{case:?}");
            assert_eq!(pt.leaf_of(Iova::new(s)).unwrap().1, 1, "{case:?}");
        }
        // SAFETY: no IOMMU walks these tables in this test.
        gather.release_after_flush(unsafe { FlushDone::for_all() }, pt.pool(), &g).unwrap();
        // Unmapping the rest around the hole works; the hole itself is an error.
        assert_eq!(
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.unmap(&g, range(s, 2 * s), &mut gather) },
            Err(Error::NotMapped { addr: hole })
        );
        unmap_and_flush(&pt, &g, range(s, hole - s));
        let _ = &m;
    });
}

#[test]
fn unmapping_a_range_covering_whole_tables_detaches_them_into_the_gather() {
    matrix!(|case, pt, g, m| {
        if case.size != PageSize::Size4K {
            return;
        }
        // 3 MiB of pages from 1 MiB: one leaf table wholly covered ([2 MiB, 4 MiB)), one not.
        let (a, len) = (0x10_0000, 0x40_0000);
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, Iova::new(a), PhysAddr::new(0x8000_0000), len, Prot::READ) }.unwrap();
        let tables = pt.table_pages();
        let mut gather = Gather::new();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.unmap(&g, range(0x20_0000, 0x20_0000), &mut gather) }.unwrap();
        assert_eq!(gather.freed_tables(), 1, "{case:?}");
        assert_eq!(pt.table_pages(), tables - 1);
        let before = pt.pool().stats().cached;
        // SAFETY: no IOMMU walks these tables in this test.
        let wrong = unsafe { FlushDone::for_range(range(0, 0x1000)) };
        assert!(matches!(gather.release_after_flush(wrong, pt.pool(), &g), Err(Error::BadState { .. })));
        assert_eq!(gather.freed_tables(), 1, "a flush that does not cover the range frees nothing");
        // SAFETY: as above.
        let proof = unsafe { FlushDone::for_range(range(0, 0x100_0000)) };
        assert_eq!(gather.release_after_flush(proof, pt.pool(), &g), Ok(1));
        assert_eq!(pt.pool().stats().cached, before + 1);
        unmap_and_flush(&pt, &g, range(a, 0x10_0000));
        unmap_and_flush(&pt, &g, range(0x40_0000, 0x10_0000));
        let _ = &m;
    });
}

#[test]
fn the_last_page_below_the_input_limit_maps() {
    matrix!(|case, pt, g, m| {
        let s = case.size.bytes();
        let limit = 1u64 << case.bits;
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, Iova::new(limit - s), PhysAddr::new(0x10_0000_0000), s, Prot::READ_WRITE) }
            .unwrap();
        assert_eq!(pt.iova_to_phys(Iova::new(limit - 1)), Some(PhysAddr::new(0x10_0000_0000 + s - 1)));
        assert_eq!(pt.leaf_of(Iova::new(limit - 1)).unwrap().1, height(case.size));
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        let r = unsafe { pt.map(&g, Iova::new(limit - s), PhysAddr::new(0), 2 * s, Prot::READ) };
        assert_eq!(r, Err(Error::OutOfRange { addr: limit, limit }), "{case:?}");
        unmap_and_flush(&pt, &g, range(limit - s, s));
        let _ = &m;
    });
}

#[test]
fn bad_inputs_are_clear_errors_and_change_nothing() {
    matrix!(|case, pt, g, m| {
        let limit = 1u64 << case.bits;
        let out =
            1u64 << if case.format == VtdSl::NAME { VtdSl::OUTPUT_BITS } else { ArmLpaeS1::OUTPUT_BITS };
        let rw = Prot::READ_WRITE;
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        let map = |i: u64, p: u64, l: u64| unsafe { pt.map(&g, Iova::new(i), PhysAddr::new(p), l, rw) };
        assert_eq!(map(0x1800, 0x1000, 0x1000), Err(Error::Misaligned { value: 0x1800, align: 0x1000 }));
        assert_eq!(map(0x1000, 0x1010, 0x1000), Err(Error::Misaligned { value: 0x1010, align: 0x1000 }));
        assert_eq!(map(0x1000, 0x1000, 0x1001), Err(Error::Misaligned { value: 0x1001, align: 0x1000 }));
        assert_eq!(map(0x1000, 0x1000, 0), Err(Error::ZeroSize));
        assert_eq!(map(limit, 0x1000, 0x1000), Err(Error::OutOfRange { addr: limit, limit }));
        assert_eq!(map(!0xfffu64, 0, 0x2000), Err(Error::Overflow { base: !0xfffu64, len: 0x2000 }));
        assert_eq!(map(0x1000, out, 0x1000), Err(Error::OutOfRange { addr: out, limit: out }), "{case:?}");
        assert_eq!(map(0x1000, out - 0x1000, 0x2000), Err(Error::OutOfRange { addr: out, limit: out }));
        assert_eq!(pt.table_pages(), 1, "{case:?}: rejected before any change");
        // Map over an existing mapping, unmap of what is not mapped.
        map(0x20_0000, 0x20_0000, 0x20_0000).unwrap();
        assert_eq!(map(0x3f_f000, 0, 0x2000), Err(Error::AlreadyMapped { addr: 0x3f_f000 }));
        assert_eq!(pt.iova_to_phys(Iova::new(0x40_0000)), None, "{case:?}: rolled back");
        let mut gather = Gather::new();
        assert_eq!(
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.unmap(&g, range(0x10_0000, 0x10_0000), &mut gather) },
            Err(Error::NotMapped { addr: 0x10_0000 })
        );
        assert_eq!(
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.unmap(&g, range(0x3f_f000, 0x2000), &mut gather) },
            Err(Error::NotMapped { addr: 0x40_0000 })
        );
        assert_eq!(
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.unmap(&g, range(0x20_0800, 0x1000), &mut gather) },
            Err(Error::Misaligned { value: 0x20_0800, align: 0x1000 })
        );
        assert_eq!(
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.unmap(&g, range(limit - 0x1000, 0x2000), &mut gather) },
            Err(Error::OutOfRange { addr: limit, limit })
        );
        assert_eq!(
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.unmap(&g, AddrRange::empty_at(Iova::new(0)), &mut gather) },
            Err(Error::ZeroSize)
        );
        assert!(gather.is_empty(), "{case:?}: failed unmaps gather nothing");
        assert_eq!(pt.iova_to_phys(Iova::new(0x3f_f000)), Some(PhysAddr::new(0x3f_f000)), "{case:?}: intact");
        unmap_and_flush(&pt, &g, range(0x20_0000, 0x20_0000));
        let _ = &m;
    });
}

#[test]
fn unsupported_input_widths_are_refused() {
    let m = machine();
    let pool = TablePool::new(&m);
    for bits in [0, 32, 40, 47, 52, 57, 64] {
        let r =
            PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: bits, coherent_walker: true });
        assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{bits}");
    }
}

#[test]
fn page_tables_and_pools_are_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PageTable<'static, HostPlatform, VtdSl>>();
    send_sync::<PageTable<'static, HostPlatform, ArmLpaeS1>>();
    send_sync::<TablePool<'static, HostPlatform>>();
    send_sync::<Gather>();
}

#[test]
fn appended_gathers_cover_the_hull_and_release_together() {
    let m = machine();
    let pool = TablePool::new(&m);
    let pt = PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 39, coherent_walker: true })
        .unwrap()
        .with_max_leaf(PageSize::Size4K);
    let g = m.pin_cpu();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(0), PhysAddr::new(0), 0x60_0000, Prot::READ) }.unwrap();
    let (mut a, mut b) = (Gather::new(), Gather::new());
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.unmap(&g, range(0x20_0000, 0x20_0000), &mut a) }.unwrap();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.unmap(&g, range(0x1000, 0x1000), &mut b) }.unwrap();
    a.append(&mut b).unwrap();
    assert!(b.is_empty());
    assert_eq!(a.range(), Some(range(0x1000, 0x3f_f000)));
    assert_eq!(a.freed_tables(), 1);
    // SAFETY: no IOMMU walks this table.
    let proof = unsafe { FlushDone::for_range(range(0x1000, 0x3f_f000)) };
    assert_eq!(a.release_after_flush(proof, &pool, &g), Ok(1));
    assert!(a.is_empty());
}
