//! The pre-registration registry (busdma::pin) over the machine model's user address spaces:
//! seed 001's counter semantics, translation, containers, teardown and bad input.

use busdma::pin::{Container, PinBackend, Registry};
use busdma::{Error, PAGE_SIZE, PhysAddr, UserVa};
use busdma_model::uspace::UserSpace;
use busdma_model::{HostPlatform, MachineConfig};
use std::sync::atomic::Ordering;

const MIB: u64 = 1 << 20;
const UA: UserVa = UserVa::new(0x1000_0000);

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig::with_ram(128 * MIB)).unwrap()
}

/// An address space with 64 pages mapped at `UA`.
fn space(m: &HostPlatform) -> UserSpace<'_> {
    let us = UserSpace::new(m);
    us.map(UA, 64 * PAGE_SIZE).unwrap();
    us
}

fn ua(page: u64) -> UserVa {
    UserVa::new(UA.raw() + page * PAGE_SIZE)
}

#[test]
fn registration_pins_every_page_with_used_1_and_mapped_1() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    let info = reg.register(UA, 8 * PAGE_SIZE).unwrap();
    assert_eq!((info.used, info.size, info.page_shift), (1, 8 * PAGE_SIZE, 12));
    for p in 0..8 {
        assert_eq!(us.pin_count(ua(p)), 1);
    }
    assert_eq!(us.pin_count(ua(8)), 0);
    let g = reg.read();
    let r = g.lookup(UA, 8 * PAGE_SIZE).unwrap();
    assert_eq!((r.used(), r.mapped()), (1, 1));
    assert_eq!(reg.stats().pages_pinned, 8);
}

#[test]
fn the_same_memory_registered_again_counts_used_and_pins_nothing() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, 16 * PAGE_SIZE).unwrap();
    reg.register(UA, 8 * PAGE_SIZE).unwrap();
    // Not charged again either: 3 x 8 pages would exceed the 16-page memlock limit.
    assert_eq!(reg.register(UA, 8 * PAGE_SIZE).unwrap().used, 2);
    assert_eq!(reg.register(UA, 8 * PAGE_SIZE).unwrap().used, 3);
    assert_eq!(us.pin_count(UA), 1);
    assert_eq!(reg.stats().charged, 8 * PAGE_SIZE);
    assert_eq!(reg.stats().regions, 1);
}

#[test]
fn unregister_with_registrations_left_only_decrements_used_even_while_mapped() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 4 * PAGE_SIZE).unwrap();
    reg.register(UA, 4 * PAGE_SIZE).unwrap();
    let buf = reg.load(ua(1), 100).unwrap();
    reg.unregister(UA, 4 * PAGE_SIZE).unwrap();
    let g = reg.read();
    let r = g.lookup(UA, PAGE_SIZE).unwrap();
    assert_eq!((r.used(), r.mapped()), (1, 2));
    assert_eq!(us.pin_count(UA), 1);
    drop(g);
    drop(buf);
}

#[test]
fn last_unregister_while_mapped_is_ebusy_and_used_stays_1() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 4 * PAGE_SIZE).unwrap();
    let a = reg.load(UA, 10).unwrap();
    let b = reg.load(ua(3), PAGE_SIZE).unwrap();
    let err = reg.unregister(UA, 4 * PAGE_SIZE).unwrap_err();
    assert!(matches!(err, Error::Busy { count: 2, .. }), "{err:?}");
    assert_eq!(err.errno(), busdma::error::errno::EBUSY);
    {
        let g = reg.read();
        let r = g.lookup(UA, PAGE_SIZE).unwrap();
        assert_eq!((r.used(), r.mapped()), (1, 3));
    }
    assert_eq!(us.pinned_pages(), 4, "EBUSY: the memory is still pinned");
    drop(a);
    assert!(matches!(reg.unregister(UA, 4 * PAGE_SIZE), Err(Error::Busy { count: 1, .. })));
    drop(b);
    // The retry succeeds once nothing is mapped.
    reg.unregister(UA, 4 * PAGE_SIZE).unwrap();
    reg.synchronize();
    assert_eq!(us.pinned_pages(), 0);
    assert_eq!(reg.lookup(UA, PAGE_SIZE), None);
}

#[test]
fn no_mapping_is_accepted_after_mapped_reaches_zero() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 2 * PAGE_SIZE).unwrap();
    let g = reg.read();
    let r = g.lookup(UA, PAGE_SIZE).unwrap();
    reg.unregister(UA, 2 * PAGE_SIZE).unwrap();
    assert_eq!(r.mapped(), 0);
    assert!(matches!(r.mapped_inc(), Err(Error::BadState { .. })));
    assert!(matches!(r.mapped_inc(), Err(Error::BadState { .. })));
    assert_eq!(r.mapped(), 0, "a refused mapping changes nothing");
    assert!(matches!(r.mapped_dec(), Err(Error::BadState { .. })));
    // And a new load finds nothing to map.
    assert!(matches!(reg.load(UA, 1), Err(Error::NotMapped { .. })));
    drop(g);
}

#[test]
fn a_released_region_stays_pinned_until_its_readers_leave() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 2 * PAGE_SIZE).unwrap();
    let g = reg.read();
    let r = g.lookup(UA, PAGE_SIZE).unwrap();
    let pa = r.ua_to_pa(UA, 12).unwrap();
    reg.unregister(UA, 2 * PAGE_SIZE).unwrap();
    // A later writer cannot free it while our section lasts.
    reg.register(ua(10), PAGE_SIZE).unwrap();
    reg.unregister(ua(10), PAGE_SIZE).unwrap();
    assert_eq!(us.pin_count(UA), 1);
    assert_eq!(r.ua_to_pa(UA, 12), Ok(pa), "the reader's view stays valid");
    assert!(reg.stats().garbage > 0);
    drop(g);
    reg.synchronize();
    assert_eq!(us.pinned_pages(), 0);
    assert_eq!(reg.stats().garbage, 0);
}

#[test]
fn mapped_dec_without_a_mapping_is_refused() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, PAGE_SIZE).unwrap();
    let g = reg.read();
    let r = g.lookup(UA, PAGE_SIZE).unwrap();
    assert!(matches!(r.mapped_dec(), Err(Error::BadState { .. })));
    assert_eq!(r.mapped(), 1);
    r.mapped_inc().unwrap();
    r.mapped_dec().unwrap();
    assert_eq!(r.mapped(), 1);
}

#[test]
fn each_container_registers_the_same_memory_once() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    let c1 = Container::new(&reg);
    let c2 = Container::new(&reg);
    c1.register(UA, 4 * PAGE_SIZE).unwrap();
    assert_eq!(c1.register(UA, 4 * PAGE_SIZE), Err(Error::AlreadyMapped { addr: UA.raw() }));
    assert_eq!(c2.register(UA, 4 * PAGE_SIZE).unwrap().used, 2);
    assert_eq!(c1.unregister(ua(8), PAGE_SIZE), Err(Error::NotMapped { addr: ua(8).raw() }));
    drop(c1);
    assert_eq!(reg.lookup(UA, PAGE_SIZE).unwrap().used, 1);
    drop(c2);
    reg.synchronize();
    assert_eq!(reg.lookup(UA, PAGE_SIZE), None);
    assert_eq!(us.pinned_pages(), 0);
}

#[test]
fn a_container_released_while_mapped_is_counted_and_teardown_frees_the_region() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    let c = Container::new(&reg);
    c.register(UA, 4 * PAGE_SIZE).unwrap();
    let buf = reg.load(UA, PAGE_SIZE).unwrap();
    drop(c);
    assert_eq!(reg.stats().busy_at_container_release, 1);
    assert_eq!(reg.lookup(UA, PAGE_SIZE).unwrap().used, 1);
    drop(buf);
    let report = reg.cleanup();
    assert_eq!((report.regions, report.pages_unpinned), (1, 4));
    assert!(report.still_mapped.is_empty());
    assert_eq!(us.pinned_pages(), 0);
}

#[test]
fn a_load_of_a_registered_buffer_pins_nothing_and_holds_one_mapping() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 16 * PAGE_SIZE).unwrap();
    let pins = us.counters().pins.load(Ordering::Relaxed);
    let start = UserVa::new(ua(2).raw() + 0x80);
    let buf = reg.load(start, 3 * PAGE_SIZE).unwrap();
    assert_eq!(us.counters().pins.load(Ordering::Relaxed), pins, "no pin per DMA");
    assert_eq!(buf.region().mapped(), 2);
    // The runs cover exactly the buffer and agree with the page table byte by byte.
    let mut off = 0;
    for (pa, len) in buf.segments() {
        for probe in [0, len - 1] {
            let ua = UserVa::new(start.raw() + off + probe);
            assert_eq!(us.translate(ua), Some(PhysAddr::new(pa.raw() + probe)));
        }
        off += len;
    }
    assert_eq!(off, 3 * PAGE_SIZE);
    drop(buf);
    assert_eq!(reg.read().lookup(UA, 1).unwrap().mapped(), 1);
    assert!(
        matches!(reg.load(ua(15), 2 * PAGE_SIZE), Err(Error::NotMapped { .. })),
        "must lie inside one region"
    );
    assert_eq!(reg.load(UA, 0).err(), Some(Error::ZeroSize));
}

#[test]
fn ua_to_pa_agrees_with_the_page_table_for_every_byte_offset_class() {
    let m = machine();
    let us = space(&m);
    // Scatter the frames so contiguity is not an accident.
    for p in (0..64).step_by(3) {
        us.migrate(ua(p)).unwrap();
    }
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 32 * PAGE_SIZE).unwrap();
    reg.register(ua(40), 8 * PAGE_SIZE).unwrap();
    let g = reg.read();
    for p in (0..32).chain(40..48) {
        for off in [0, 1, 0x7ff, 0xfff] {
            let a = UserVa::new(ua(p).raw() + off);
            assert_eq!(g.ua_to_pa(a, 12), Ok(us.translate(a).unwrap()));
        }
    }
    assert_eq!(g.ua_to_pa(ua(35), 12), Err(Error::NotMapped { addr: ua(35).raw() }));
    assert_eq!(g.ua_to_pa(ua(48), 12), Err(Error::NotMapped { addr: ua(48).raw() }));
}

#[test]
fn an_iommu_page_larger_than_the_pinned_page_is_refused() {
    let m = machine();
    let us = space(&m);
    let huge = UserVa::new(0x4000_0000);
    us.map_huge(huge, 4 * MIB).unwrap();
    let reg = Registry::new(&us, u64::MAX).unwrap();
    assert_eq!(reg.register(UA, 64 * PAGE_SIZE).unwrap().page_shift, 12);
    assert_eq!(reg.register(huge, 4 * MIB).unwrap().page_shift, 21);
    assert_eq!(reg.ua_to_pa(UA, 21), Err(Error::BadSize { size: 2 * MIB, limit: PAGE_SIZE }));
    assert_eq!(reg.ua_to_pa(UA, 30), Err(Error::BadSize { size: 1 << 30, limit: PAGE_SIZE }));
    let second = UserVa::new(huge.raw() + 2 * MIB);
    assert_eq!(reg.ua_to_pa(second, 21), Ok(us.translate(second).unwrap()));
    assert_eq!(reg.ua_to_pa(huge, 30), Err(Error::BadSize { size: 1 << 30, limit: 2 * MIB }));
    // Half of the huge mapping, registered alone, is still made of 4 KiB-aligned runs only
    // when it does not cover a whole 2 MiB page.
    reg.unregister(huge, 4 * MIB).unwrap();
    assert_eq!(reg.register(huge, MIB).unwrap().page_shift, 12);
}

#[test]
fn dropping_the_registry_releases_every_pin() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    for i in 0..8 {
        reg.register(ua(i * 8), 8 * PAGE_SIZE).unwrap();
    }
    reg.register(ua(0), 8 * PAGE_SIZE).unwrap();
    reg.unregister(ua(8), 8 * PAGE_SIZE).unwrap();
    // No reader: the unregistered region's grace period ended at once.
    assert_eq!(us.pinned_pages(), 56);
    drop(reg);
    assert_eq!(us.pinned_pages(), 0);
    let c = us.counters();
    assert_eq!(c.pins.load(Ordering::Relaxed), 64);
    assert_eq!(c.unpins.load(Ordering::Relaxed), 64, "every pin released, counted");
    assert_eq!(c.still_mapped_reports.load(Ordering::Relaxed), 0);
}

#[test]
fn a_registry_torn_down_with_regions_still_mapped_reports_them() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 4 * PAGE_SIZE).unwrap();
    reg.register(ua(4), 4 * PAGE_SIZE).unwrap();
    {
        // Two raw mappings never unmapped (a driver that leaked them).
        let g = reg.read();
        g.lookup(ua(4), 1).unwrap().mapped_inc().unwrap();
        g.lookup(ua(4), 1).unwrap().mapped_inc().unwrap();
    }
    let report = reg.cleanup();
    assert_eq!(report.still_mapped, vec![(ua(4), 4 * PAGE_SIZE, 2)]);
    assert_eq!((report.regions, report.pages_unpinned), (2, 8));
    assert_eq!(us.counters().still_mapped_reports.load(Ordering::Relaxed), 1);
    assert_eq!(us.pinned_pages(), 0);

    // Dropped without `cleanup`: the backend hears of it all the same.
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, PAGE_SIZE).unwrap();
    reg.read().lookup(UA, 1).unwrap().mapped_inc().unwrap();
    drop(reg);
    assert_eq!(us.counters().still_mapped_reports.load(Ordering::Relaxed), 2);
    assert_eq!(us.pinned_pages(), 0);
}

#[test]
fn bad_registrations_are_clear_errors_and_leave_nothing_pinned_or_charged() {
    let m = machine();
    let us = space(&m);
    let reg = Registry::new(&us, 16 * PAGE_SIZE).unwrap();
    reg.register(ua(8), 4 * PAGE_SIZE).unwrap();
    let cases: &[(UserVa, u64, Error)] = &[
        (UA, 0, Error::ZeroSize),
        (UserVa::new(UA.raw() + 8), PAGE_SIZE, Error::Misaligned { value: UA.raw() + 8, align: PAGE_SIZE }),
        (UA, 100, Error::Misaligned { value: 100, align: PAGE_SIZE }),
        (
            UserVa::new(u64::MAX - 0xfff),
            2 * PAGE_SIZE,
            Error::Overflow { base: u64::MAX - 0xfff, len: 2 * PAGE_SIZE },
        ),
        // Pages 60..63 are mapped, 64.. are not: nothing may stay pinned.
        (ua(60), 8 * PAGE_SIZE, Error::NotMapped { addr: ua(64).raw() }),
        (ua(10), 4 * PAGE_SIZE, Error::AlreadyMapped { addr: ua(10).raw() }),
        (ua(6), 4 * PAGE_SIZE, Error::AlreadyMapped { addr: ua(8).raw() }),
        (ua(8), 2 * PAGE_SIZE, Error::AlreadyMapped { addr: ua(8).raw() }),
        (ua(0), 13 * PAGE_SIZE, Error::AlreadyMapped { addr: ua(8).raw() }),
        (
            ua(20),
            13 * PAGE_SIZE,
            Error::LimitExceeded { what: "memlock", requested: 17 * PAGE_SIZE, limit: 16 * PAGE_SIZE },
        ),
    ];
    for &(a, size, want) in cases {
        assert_eq!(reg.register(a, size), Err(want), "register({a:?}, {size:#x})");
        assert_eq!(us.pinned_pages(), 4);
        assert_eq!(reg.stats().charged, 4 * PAGE_SIZE);
    }
    assert_eq!(reg.register(ua(20), 12 * PAGE_SIZE).unwrap().used, 1, "up to the limit is fine");
    assert_eq!(reg.unregister(ua(40), PAGE_SIZE), Err(Error::NotMapped { addr: ua(40).raw() }));
    assert_eq!(
        reg.unregister(ua(8), 2 * PAGE_SIZE),
        Err(Error::NotMapped { addr: ua(8).raw() }),
        "wrong size"
    );
    assert_eq!(
        reg.unregister(ua(9), PAGE_SIZE),
        Err(Error::NotMapped { addr: ua(9).raw() }),
        "inside, not the start"
    );
    assert_eq!(reg.stats().regions, 2);
}

#[test]
fn a_backend_pinning_other_than_4k_pages_is_refused() {
    struct Huge;
    impl PinBackend for Huge {
        fn pin(&self, _: UserVa, _: &mut [PhysAddr]) -> busdma::Result<()> {
            Ok(())
        }
        fn unpin(&self, _: UserVa, _: &[PhysAddr]) {}
        fn page_shift(&self) -> u32 {
            16
        }
    }
    assert!(matches!(Registry::new(Huge, 0), Err(Error::Unsupported { .. })));
}

#[test]
fn readers_translate_correctly_while_writers_register_and_unregister() {
    let m = machine();
    let us = UserSpace::new(&m);
    us.map(UA, 256 * PAGE_SIZE).unwrap();
    let reg = Registry::new(&us, u64::MAX).unwrap();
    // Even pages stay registered; odd ones come and go.
    for p in (0..256).step_by(2) {
        reg.register(ua(p), PAGE_SIZE).unwrap();
    }
    let truth: Vec<PhysAddr> = (0..256).map(|p| us.translate(ua(p)).unwrap()).collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            for round in 0..20 {
                for p in (1..256).step_by(2) {
                    reg.register(ua(p), PAGE_SIZE).unwrap();
                }
                for p in (1..256).step_by(2) {
                    reg.unregister(ua(p), PAGE_SIZE).unwrap();
                }
                let _ = round;
            }
        });
        for _ in 0..2 {
            s.spawn(|| {
                for i in 0..200_000u64 {
                    let p = i.wrapping_mul(0x9e37_79b9) % 256;
                    let g = reg.read();
                    match g.ua_to_pa(ua(p), 12) {
                        Ok(pa) => assert_eq!(pa, truth[p as usize]),
                        Err(e) => {
                            assert!(p % 2 == 1 && e == Error::NotMapped { addr: ua(p).raw() }, "{p}: {e:?}")
                        }
                    }
                }
            });
        }
    });
    reg.synchronize();
    assert_eq!(us.pinned_pages(), 128);
    assert_eq!(reg.stats().garbage, 0);
}

#[test]
fn batched_translation_agrees_with_one_by_one_and_reports_the_first_failure() {
    let m = machine();
    let us = UserSpace::new(&m);
    us.map(UA, 400 * PAGE_SIZE).unwrap();
    let reg = Registry::new(&us, u64::MAX).unwrap();
    // 200 one-page regions (several leaves) at even pages.
    for p in (0..400).step_by(2) {
        reg.register(ua(p), PAGE_SIZE).unwrap();
    }
    let uas: Vec<UserVa> =
        (0..100u64).map(|i| UserVa::new(ua(((i * 74) % 400) & !1).raw() + (i * 41) % 4096)).collect();
    let g = reg.read();
    let mut out = vec![PhysAddr::new(0); uas.len()];
    g.ua_to_pa_batch(&uas, 12, &mut out).unwrap();
    for (ua, pa) in uas.iter().zip(&out) {
        assert_eq!(g.ua_to_pa(*ua, 12), Ok(*pa));
        assert_eq!(us.translate(*ua), Some(*pa));
    }
    let mut bad = uas.clone();
    bad[37] = ua(41);
    assert_eq!(g.ua_to_pa_batch(&bad, 12, &mut out), Err(Error::NotMapped { addr: ua(41).raw() }));
    assert_eq!(g.ua_to_pa_batch(&uas, 21, &mut out), Err(Error::BadSize { size: 2 * MIB, limit: PAGE_SIZE }));
    assert!(matches!(g.ua_to_pa_batch(&uas, 12, &mut out[1..]), Err(Error::InvalidArgument { .. })));
    assert_eq!(
        g.ua_to_pa_batch(&[UserVa::new(0x10)], 12, &mut out[..1]),
        Err(Error::NotMapped { addr: 0x10 })
    );
}

#[test]
fn the_page_index_holds_nodes_only_for_windows_registered_now() {
    let m = machine();
    let us = UserSpace::new(&m);
    // One page in each of 8 windows 2 MiB apart, across a 1 GiB boundary.
    let base = UserVa::new((1 << 30) - 4 * 2 * MIB);
    let at = |i: u64| UserVa::new(base.raw() + i * 2 * MIB);
    for i in 0..8 {
        us.map(at(i), PAGE_SIZE).unwrap();
    }
    let reg = Registry::new(&us, u64::MAX).unwrap();
    assert_eq!(reg.stats().index_nodes, 0);
    for i in 0..8 {
        reg.register(at(i), PAGE_SIZE).unwrap();
    }
    // 8 leaves, 2 level-1 nodes (one per GiB), 1 level-2 node.
    assert_eq!(reg.stats().index_nodes, 11);
    for i in 0..8 {
        assert_eq!(reg.ua_to_pa(at(i), 12), Ok(us.translate(at(i)).unwrap()));
    }
    for i in 0..4 {
        reg.unregister(at(i), PAGE_SIZE).unwrap();
    }
    assert_eq!(reg.stats().index_nodes, 6, "the first GiB's leaves and level-1 node went");
    assert_eq!(reg.ua_to_pa(at(0), 12), Err(Error::NotMapped { addr: at(0).raw() }));
    assert_eq!(reg.ua_to_pa(at(5), 12), Ok(us.translate(at(5)).unwrap()));
    for i in 4..8 {
        reg.unregister(at(i), PAGE_SIZE).unwrap();
    }
    reg.synchronize();
    assert_eq!((reg.stats().index_nodes, reg.stats().garbage), (0, 0));
    // The windows work again after their nodes were freed.
    reg.register(at(2), PAGE_SIZE).unwrap();
    assert_eq!(reg.ua_to_pa(at(2), 12), Ok(us.translate(at(2)).unwrap()));
}
