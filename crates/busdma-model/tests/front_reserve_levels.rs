//! Reserving table levels: after `reserve_levels`, maps and unmaps inside the window allocate
//! no table page, in both formats.

mod common;

use busdma::front::strategy::reserve_levels::reserve_levels;
use busdma::pgtable::{ArmLpaeS1, Gather, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl};
use busdma::{AddrRange, Iova, PAGE_SIZE, PhysAddr, Platform};

fn check<F: PteFormat>(input_bits: u32, coherent_walker: bool) {
    let m = common::machine();
    let pool = TablePool::new(&m);
    let pt: PageTable<'_, _, F> =
        PageTable::new(&pool, PageTableConfig { input_bits, coherent_walker }).unwrap();
    let g = m.pin_cpu();
    // A window straddling a 2 MiB line and a 1 GiB line: two leaf tables, two level-1 tables.
    let start = (1u64 << 30) - 3 * PAGE_SIZE;
    let window = AddrRange::from_start_len(Iova::new(start), 8 * PAGE_SIZE).unwrap();
    let before = pt.table_pages();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { reserve_levels(&pt, &g, window) }.unwrap();
    let reserved = pt.table_pages() - before;
    assert_eq!(reserved, if input_bits == 39 { 4 } else { 5 }, "{}", F::NAME);
    // Reserving again changes nothing.
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { reserve_levels(&pt, &g, window) }.unwrap();
    assert_eq!(pt.table_pages() - before, reserved);
    let allocs = pool.stats().allocs;
    let pa = PhysAddr::new(m.ram().start().raw() + 0x10_0000);
    for i in 0..8 {
        let iova = Iova::new(start + i * PAGE_SIZE);
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.map(&g, iova, pa, PAGE_SIZE, Prot::READ_WRITE) }.unwrap();
        assert_eq!(pt.iova_to_phys(iova), Some(pa));
        let mut gather = Gather::default();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { pt.unmap(&g, AddrRange::from_start_len(iova, PAGE_SIZE).unwrap(), &mut gather) }.unwrap();
        assert_eq!(gather.freed_tables(), 0);
    }
    assert_eq!(pool.stats().allocs, allocs, "maps inside a reserved window allocate no table");
}

#[test]
fn reserved_levels_make_maps_inside_the_window_allocate_nothing() {
    check::<VtdSl>(39, true);
    check::<VtdSl>(48, false);
    check::<ArmLpaeS1>(39, false);
    check::<ArmLpaeS1>(48, true);
}
