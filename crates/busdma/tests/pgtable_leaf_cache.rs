//! The per-CPU leaf-table cache of `PageTable` (walker.rs, `LeafCache`): a cached last-level
//! table is never used once it has been detached, even when its page has come back from the
//! pool as another span's table, on the CPU that cached it or on another.
#![cfg(not(loom))]

use busdma::pgtable::{FlushDone, Gather, PageTable, PageTableConfig, Prot, TablePool, VtdSl};
use busdma::{AddrRange, CpuGuard, Iova, PAGE_SIZE, PageSize, PhysAddr, Platform};
use busdma_model::{HostPlatform, MachineConfig};

/// 2 MiB: the span of one last-level table.
const SPAN: u64 = 2 << 20;

fn unmap_and_flush(
    pt: &PageTable<'_, HostPlatform, VtdSl>,
    g: &CpuGuard<'_, HostPlatform>,
    r: AddrRange<Iova>,
) {
    let mut gather = Gather::new();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.unmap(g, r, &mut gather) }.unwrap();
    // SAFETY: no IOMMU walks these tables in this test; the "flush" is trivially complete.
    let proof = unsafe { FlushDone::for_range(gather.range().unwrap()) };
    gather.release_after_flush(proof, pt.pool(), g).unwrap();
}

/// Maps one page at `iova` to `pa` and checks every translation in `expect`.
fn check(pt: &PageTable<'_, HostPlatform, VtdSl>, expect: &[(u64, u64)]) {
    for &(iova, pa) in expect {
        assert_eq!(pt.iova_to_phys(Iova::new(iova)), Some(PhysAddr::new(pa)), "translation of {iova:#x}");
    }
}

#[test]
fn a_detached_leaf_table_reused_for_another_span_is_never_reached_through_the_cache() {
    let m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap();
    let pool = TablePool::new(&m);
    let cfg = PageTableConfig { input_bits: 48, coherent_walker: true };
    // Pages only: the whole-span map below builds a last-level table, not a block.
    let pt = PageTable::<_, VtdSl>::new(&pool, cfg).unwrap().with_max_leaf(PageSize::Size4K);
    let (s, s2) = (8 * SPAN, 40 * SPAN);
    let rw = Prot::READ_WRITE;
    let g = m.pin_cpu();
    // Cache span s's table on this CPU: a one-page map and unmap through it.
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(s + 5 * PAGE_SIZE), PhysAddr::new(0x10_0000), PAGE_SIZE, rw) }.unwrap();
    unmap_and_flush(&pt, &g, AddrRange::from_start_len(Iova::new(s + 5 * PAGE_SIZE), PAGE_SIZE).unwrap());
    // Map the whole span, then unmap it all: the table is detached and goes back to the pool.
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(s), PhysAddr::new(0x20_0000), SPAN, rw) }.unwrap();
    let before = pt.table_pages();
    unmap_and_flush(&pt, &g, AddrRange::from_start_len(Iova::new(s), SPAN).unwrap());
    assert_eq!(pt.table_pages(), before - 1, "the span's last-level table was detached");
    // Another span takes the freed page (the pool hands back the latest freed page first).
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(s2 + 5 * PAGE_SIZE), PhysAddr::new(0x30_0000), PAGE_SIZE, rw) }.unwrap();
    // Map at the same index of span s again: with a stale cache this would land in span s2's
    // table (here: AlreadyMapped, or s2's page overwritten).
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(s + 5 * PAGE_SIZE), PhysAddr::new(0x40_0000), PAGE_SIZE, rw) }.unwrap();
    check(&pt, &[(s + 5 * PAGE_SIZE, 0x40_0000), (s2 + 5 * PAGE_SIZE, 0x30_0000)]);
    assert_eq!(pt.iova_to_phys(Iova::new(s + 6 * PAGE_SIZE)), None);
    drop(g);

    // The other CPU cached span s's new table through a map of its own; a detach on this
    // CPU must make it stale there too.
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let _b = m.bind_cpu(1).unwrap();
            let g1 = m.pin_cpu();
            assert_eq!(g1.cpu(), 1);
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.map(&g1, Iova::new(s + 9 * PAGE_SIZE), PhysAddr::new(0x50_0000), PAGE_SIZE, rw) }
                .unwrap();
            unmap_and_flush(
                &pt,
                &g1,
                AddrRange::from_start_len(Iova::new(s + 9 * PAGE_SIZE), PAGE_SIZE).unwrap(),
            );
        });
    });
    let g = m.pin_cpu();
    unmap_and_flush(&pt, &g, AddrRange::from_start_len(Iova::new(s + 5 * PAGE_SIZE), PAGE_SIZE).unwrap());
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(s), PhysAddr::new(0x20_0000), SPAN, rw) }.unwrap();
    unmap_and_flush(&pt, &g, AddrRange::from_start_len(Iova::new(s), SPAN).unwrap());
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(s2 + 9 * PAGE_SIZE), PhysAddr::new(0x60_0000), PAGE_SIZE, rw) }.unwrap();
    drop(g);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let _b = m.bind_cpu(1).unwrap();
            let g1 = m.pin_cpu();
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { pt.map(&g1, Iova::new(s + 9 * PAGE_SIZE), PhysAddr::new(0x70_0000), PAGE_SIZE, rw) }
                .unwrap();
        });
    });
    check(
        &pt,
        &[(s + 9 * PAGE_SIZE, 0x70_0000), (s2 + 9 * PAGE_SIZE, 0x60_0000), (s2 + 5 * PAGE_SIZE, 0x30_0000)],
    );
}
