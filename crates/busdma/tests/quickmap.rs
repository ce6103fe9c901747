//! Quick maps on the machine model: both paths, preemption disabled, nesting caught, and the
//! copy helpers against a plain `Vec<u8>`.

use std::sync::atomic::Ordering;

use busdma::quickmap::{QuickMaps, QuickSlot};
use busdma::{Error, KernVa, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{FrameRequest, HostPlatform, MachineConfig, Placement};
use proptest::prelude::*;

/// 16 MiB of RAM, the upper half outside the direct map, two CPUs.
fn machine() -> HostPlatform {
    let c = MachineConfig { ram_size: 16 << 20, cpus: 2, ..MachineConfig::default() }
        .upper_half_not_direct_mapped();
    HostPlatform::new(c).unwrap()
}

fn page(m: &HostPlatform, placement: Placement) -> PhysAddr {
    m.frames().alloc(FrameRequest { placement, ..FrameRequest::pages(1) }).unwrap()
}

#[test]
fn direct_mapped_pages_are_entered_at_their_direct_address_with_no_mapping_change() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let pa = page(&m, Placement::DirectMapped);
    m.write_phys(pa, b"near").unwrap();
    let before = m.counters().quick_maps.load(Ordering::Relaxed);
    let g = m.pin_cpu();
    let q = qm.enter(&g, pa.checked_add(7).unwrap()).unwrap();
    assert_eq!(q.kva(), m.phys_to_kva(pa).unwrap());
    assert_eq!(q.pa(), pa);
    assert!(!q.is_windowed());
    let mut b = [0u8; 4];
    q.read(0, &mut b).unwrap();
    assert_eq!(&b, b"near");
    drop(q);
    assert_eq!(m.counters().quick_maps.load(Ordering::Relaxed), before);
}

#[test]
fn pages_outside_the_direct_map_are_reached_with_preemption_disabled() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let pa = page(&m, Placement::NotDirectMapped);
    assert!(m.phys_to_kva(pa).is_none());
    m.write_phys(pa.checked_add(4000).unwrap(), b"far away").unwrap();
    let before = m.counters().quick_maps.load(Ordering::Relaxed);
    let g = m.pin_cpu();
    let q = qm.enter(&g, pa).unwrap();
    assert!(q.is_windowed() && m.quick_window().contains(q.kva()));
    let mut b = [0u8; 8];
    q.read(4000, &mut b).unwrap();
    assert_eq!(&b, b"far away");
    q.write(0, b"written through the window").unwrap();
    assert_eq!(q.read(4090, &mut b), Err(Error::OutOfRange { addr: 4098, limit: PAGE_SIZE }));
    q.remove();
    assert_eq!(m.counters().quick_maps.load(Ordering::Relaxed), before + 1);
    let mut w = [0u8; 26];
    m.read_phys(pa, &mut w).unwrap();
    assert_eq!(&w, b"written through the window");
    // The slot is free again: entering it is not nesting.
    assert_eq!(qm.check_nesting(g.cpu(), QuickSlot::First, pa), None);
}

#[test]
fn two_slots_hold_two_pages_outside_the_direct_map_at_once() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let (a, b) = (page(&m, Placement::NotDirectMapped), page(&m, Placement::NotDirectMapped));
    m.write_phys(a, b"source").unwrap();
    let g = m.pin_cpu();
    let qa = qm.enter_in(&g, QuickSlot::First, a).unwrap();
    let qb = qm.enter_in(&g, QuickSlot::Second, b).unwrap();
    assert_ne!(qa.kva(), qb.kva());
    let mut t = [0u8; 6];
    qa.read(0, &mut t).unwrap();
    qb.write(10, &t).unwrap();
    drop((qa, qb));
    let mut got = [0u8; 6];
    m.read_phys(b.checked_add(10).unwrap(), &mut got).unwrap();
    assert_eq!(&got, b"source");
}

#[test]
#[should_panic(expected = "quick-map nesting on CPU")]
fn nesting_outside_the_direct_map_is_caught() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let (a, b) = (page(&m, Placement::NotDirectMapped), page(&m, Placement::NotDirectMapped));
    let g = m.pin_cpu();
    let _outer = qm.enter(&g, a).unwrap();
    let _inner = qm.enter(&g, b).unwrap();
}

#[test]
fn nesting_is_caught_even_when_the_direct_map_makes_it_free_and_names_cpu_and_both_pages() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let (a, b) = (page(&m, Placement::DirectMapped), page(&m, Placement::NotDirectMapped));
    let g = m.pin_cpu();
    let outer = qm.enter(&g, a).unwrap();
    let n = qm.check_nesting(g.cpu(), QuickSlot::First, b.checked_add(5).unwrap()).unwrap();
    assert_eq!((n.cpu, n.slot, n.held, n.entering), (g.cpu(), QuickSlot::First, a, b));
    let msg = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _inner = qm.enter(&g, b).unwrap();
    }))
    .unwrap_err();
    let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains(&format!("CPU {}", g.cpu())), "{msg}");
    assert!(msg.contains(&format!("{:#x}", a.raw())) && msg.contains(&format!("{:#x}", b.raw())), "{msg}");
    assert_eq!(qm.nestings(), 1);
    // The outer mapping still reaches its own page.
    m.write_phys(a, b"outer").unwrap();
    let mut t = [0u8; 5];
    outer.read(0, &mut t).unwrap();
    assert_eq!(&t, b"outer");
    // The other slot is not nesting.
    assert_eq!(qm.check_nesting(g.cpu(), QuickSlot::Second, b), None);
}

#[test]
fn copies_with_preemption_disabled_on_every_cpu_at_once_do_not_interfere() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let run = |cpu: usize| {
        let _b = m.bind_cpu(cpu).unwrap();
        let src = m
            .frames()
            .alloc(FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(3) });
        let dst = m
            .frames()
            .alloc(FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(3) });
        let (src, dst) = (src.unwrap(), dst.unwrap());
        for round in 0..50u8 {
            let data: Vec<u8> =
                (0..3 * PAGE_SIZE as usize - 7).map(|i| (i as u8) ^ round ^ (cpu as u8 * 91)).collect();
            m.write_phys(src.checked_add(3).unwrap(), &data).unwrap();
            let g = m.pin_cpu();
            qm.copy_phys_to_phys(
                &g,
                src.checked_add(3).unwrap(),
                dst.checked_add(4).unwrap(),
                data.len() as u64,
            )
            .unwrap();
            drop(g);
            let mut got = vec![0; data.len()];
            m.read_phys(dst.checked_add(4).unwrap(), &mut got).unwrap();
            assert_eq!(got, data, "cpu {cpu} round {round}");
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| run(0));
        s.spawn(|| run(1));
    });
}

#[test]
fn bad_copy_arguments_are_errors() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let pa = page(&m, Placement::DirectMapped);
    let g = m.pin_cpu();
    assert!(matches!(
        qm.copy_phys_to_phys(&g, pa, pa.checked_add(100).unwrap(), 200),
        Err(Error::InvalidArgument { .. })
    ));
    let top = PhysAddr::new(u64::MAX - 10);
    assert_eq!(qm.copy_phys_to_phys(&g, top, pa, 100), Err(Error::Overflow { base: top.raw(), len: 100 }));
    assert!(matches!(qm.fill_phys(&g, top, 100, 0), Err(Error::Overflow { .. })));
    // Zero bytes is fine and touches nothing.
    qm.copy_phys_to_phys(&g, pa, pa, 0).unwrap();
}

/// A window of RAM straddling the direct-map boundary: the first half direct-mapped, the
/// second reachable only through quick maps.
const WINDOW_PAGES: u64 = 8;

#[derive(Debug, Clone)]
enum CopyOp {
    PhysToPhys { src: u64, dst: u64, len: u64 },
    PhysToSlice { src: u64, len: u64 },
    SliceToPhys { dst: u64, len: u64, seed: u8 },
    KvaToPhys { dst: u64, len: u64, seed: u8 },
    PhysToKva { src: u64, len: u64 },
    Fill { dst: u64, len: u64, byte: u8 },
}

fn op() -> impl Strategy<Value = CopyOp> {
    let w = WINDOW_PAGES * PAGE_SIZE;
    let range = (0..w).prop_flat_map(move |start| (Just(start), 0..=(w - start).min(3 * PAGE_SIZE)));
    prop_oneof![
        (0..w, 0..w)
            .prop_flat_map(move |(src, dst)| (
                Just(src),
                Just(dst),
                0..=(w - src.max(dst)).min(3 * PAGE_SIZE)
            ))
            .prop_map(|(src, dst, len)| CopyOp::PhysToPhys { src, dst, len }),
        range.clone().prop_map(|(src, len)| CopyOp::PhysToSlice { src, len }),
        (range.clone(), any::<u8>()).prop_map(|((dst, len), seed)| CopyOp::SliceToPhys { dst, len, seed }),
        (range.clone(), any::<u8>()).prop_map(|((dst, len), seed)| CopyOp::KvaToPhys { dst, len, seed }),
        range.clone().prop_map(|(src, len)| CopyOp::PhysToKva { src, len }),
        (range, any::<u8>()).prop_map(|((dst, len), byte)| CopyOp::Fill { dst, len, byte }),
    ]
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn copy_helpers_agree_with_a_vec_reference_across_page_and_direct_map_boundaries() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let boundary = m.ram().start().checked_add(m.config().direct_map_size).unwrap();
    let base = boundary.checked_sub(WINDOW_PAGES / 2 * PAGE_SIZE).unwrap();
    let w = (WINDOW_PAGES * PAGE_SIZE) as usize;
    let reference = std::cell::RefCell::new(pattern(w as u64, 7));
    m.write_phys(base, &reference.borrow()).unwrap();
    let at = |off: u64| base.checked_add(off).unwrap();
    let mut runner =
        proptest::test_runner::TestRunner::new(ProptestConfig { cases: 512, ..ProptestConfig::default() });
    runner
        .run(&proptest::collection::vec(op(), 1..8), |ops| {
            for op in ops {
                let g = m.pin_cpu();
                match op {
                    CopyOp::PhysToPhys { src, dst, len } => {
                        let (s, d) = (src as usize, dst as usize);
                        let overlap = len > 0 && s < d + len as usize && d < s + len as usize;
                        let r = qm.copy_phys_to_phys(&g, at(src), at(dst), len);
                        if overlap {
                            prop_assert!(matches!(r, Err(Error::InvalidArgument { .. })), "{:?}", r);
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            reference.borrow_mut().copy_within(s..s + len as usize, d);
                        }
                    }
                    CopyOp::PhysToSlice { src, len } => {
                        let mut out = vec![0u8; len as usize];
                        qm.copy_phys_to_slice(&g, at(src), &mut out).unwrap();
                        prop_assert_eq!(&out[..], &reference.borrow()[src as usize..(src + len) as usize]);
                    }
                    CopyOp::SliceToPhys { dst, len, seed } => {
                        let data = pattern(len, seed);
                        qm.copy_slice_to_phys(&g, &data, at(dst)).unwrap();
                        reference.borrow_mut()[dst as usize..(dst + len) as usize].copy_from_slice(&data);
                    }
                    CopyOp::KvaToPhys { dst, len, seed } => {
                        let data = pattern(len, seed);
                        let kva = KernVa::new(data.as_ptr() as u64);
                        // SAFETY: `data` is a live buffer of `len` bytes, not borrowed mutably.
                        unsafe { qm.copy_kva_to_phys(&g, kva, at(dst), len) }.unwrap();
                        reference.borrow_mut()[dst as usize..(dst + len) as usize].copy_from_slice(&data);
                    }
                    CopyOp::PhysToKva { src, len } => {
                        let mut out = vec![0u8; len as usize];
                        let kva = KernVa::new(out.as_mut_ptr() as u64);
                        // SAFETY: `out` is a live, exclusive buffer of `len` bytes.
                        unsafe { qm.copy_phys_to_kva(&g, at(src), kva, len) }.unwrap();
                        prop_assert_eq!(&out[..], &reference.borrow()[src as usize..(src + len) as usize]);
                    }
                    CopyOp::Fill { dst, len, byte } => {
                        qm.fill_phys(&g, at(dst), len, byte).unwrap();
                        reference.borrow_mut()[dst as usize..(dst + len) as usize].fill(byte);
                    }
                }
                drop(g);
                let mut now = vec![0; w];
                m.read_phys(base, &mut now).unwrap();
                prop_assert!(now == *reference.borrow(), "RAM and reference differ");
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(qm.nestings(), 0);
}

/// Cache maintenance of pages outside the direct map uses the CPU's own maintenance slot: a
/// quick map the caller holds in either copy slot keeps reaching its page, and the maintained
/// pages are reached through real mappings (one per page), the direct-mapped one at its
/// direct-map address with none.
#[test]
fn maintenance_through_quick_maps_never_disturbs_a_quick_map_the_caller_holds() {
    use busdma::quickmap::{CacheMaint, maintain_phys};
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let (a, b) = (page(&m, Placement::NotDirectMapped), page(&m, Placement::NotDirectMapped));
    let far = m
        .frames()
        .alloc(FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(3) })
        .unwrap();
    let near = page(&m, Placement::DirectMapped);
    m.write_phys(a, b"held A").unwrap();
    m.write_phys(b, b"held B").unwrap();
    let g = m.pin_cpu();
    let (qa, qb) =
        (qm.enter_in(&g, QuickSlot::First, a).unwrap(), qm.enter_in(&g, QuickSlot::Second, b).unwrap());
    let before = m.counters().quick_maps.load(Ordering::Relaxed);
    // 3 pages from 100 bytes into the first: pieces in each of them.
    let n = maintain_phys(&g, far.checked_add(100).unwrap(), 3 * PAGE_SIZE - 200, CacheMaint::Clean).unwrap();
    assert_eq!(n, 3);
    assert_eq!(m.counters().quick_maps.load(Ordering::Relaxed) - before, 3);
    assert_eq!(maintain_phys(&g, near, PAGE_SIZE, CacheMaint::CleanInvalidate).unwrap(), 0);
    let mut x = [0u8; 6];
    qa.read(0, &mut x).unwrap();
    assert_eq!(&x, b"held A");
    qb.read(0, &mut x).unwrap();
    assert_eq!(&x, b"held B");
    assert_eq!(qm.nestings(), 0);
    assert!(matches!(
        maintain_phys(&g, PhysAddr::new(u64::MAX - 10), 20, CacheMaint::Invalidate),
        Err(Error::Overflow { .. })
    ));
}

#[test]
fn quick_maps_copies_fills_and_maintenance_refuse_what_is_not_ram() {
    use busdma::quickmap::{CacheMaint, maintain_phys};
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let ram = m.ram();
    // Below RAM (the model's RAM starts at 16 MiB), and a range running off RAM's end.
    let hole = PhysAddr::new(ram.start().raw() - 2 * PAGE_SIZE);
    let last = PhysAddr::new(ram.end().raw() - PAGE_SIZE);
    let near = page(&m, Placement::DirectMapped);
    m.write_phys(last, &[0xab; 16]).unwrap();
    let g = m.pin_cpu();
    let before = m.counters().quick_maps.load(Ordering::Relaxed);
    let not_ram = |pa: PhysAddr, len: u64| Err::<(), _>(Error::NotRam { pa: pa.raw(), len });

    assert_eq!(qm.enter(&g, hole.checked_add(5).unwrap()).map(|_| ()), not_ram(hole, PAGE_SIZE));
    assert_eq!(qm.enter_in(&g, QuickSlot::Second, ram.end()).map(|_| ()), not_ram(ram.end(), PAGE_SIZE));
    assert_eq!(qm.copy_phys_to_phys(&g, hole, near, 64), not_ram(hole, 64));
    assert_eq!(qm.copy_phys_to_phys(&g, near, last, 2 * PAGE_SIZE), not_ram(last, 2 * PAGE_SIZE));
    assert_eq!(qm.copy_phys_to_slice(&g, hole, &mut [0u8; 8]), not_ram(hole, 8));
    assert_eq!(qm.copy_slice_to_phys(&g, &[1u8; 8], hole), not_ram(hole, 8));
    assert_eq!(qm.fill_phys(&g, last, PAGE_SIZE + 1, 0), not_ram(last, PAGE_SIZE + 1));
    let mut buf = [0u8; 8];
    let kva = KernVa::new(buf.as_mut_ptr() as u64);
    // SAFETY: `buf` is a live, writable 8-byte buffer with no reference into it meanwhile.
    assert_eq!(unsafe { qm.copy_phys_to_kva(&g, hole, kva, 8) }, not_ram(hole, 8));
    // SAFETY: as above, read only.
    assert_eq!(unsafe { qm.copy_kva_to_phys(&g, kva, hole, 8) }, not_ram(hole, 8));
    assert_eq!(maintain_phys(&g, hole, 64, CacheMaint::Clean).map(|_| ()), not_ram(hole, 64));

    // Refused before anything was mapped or written.
    assert_eq!(m.counters().quick_maps.load(Ordering::Relaxed), before);
    let mut got = [0u8; 16];
    m.read_phys(last, &mut got).unwrap();
    assert_eq!(got, [0xab; 16], "a refused fill wrote the RAM part of its range");
    assert_eq!(qm.nestings(), 0);
}
