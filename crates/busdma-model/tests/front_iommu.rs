//! The IOMMU strategies (per-segment, per-map, reserved, identity) through a real domain on
//! the model IOMMU (its IOTLB included): segments honour the tag, the device reaches exactly
//! the loaded bytes by DMA, and nothing is reachable or leaked after unload, under strict and
//! deferred invalidation; property-tested over random tags and loads.

use busdma::front::segments::{Constraints, check_segments};
use busdma::front::{
    Direction, Identity, IommuPerMap, IommuPerSegment, IommuReserved, MemKind, Segment, SgEntry, SgList,
    Strategy, Tag, TagSpec,
};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    Context, DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat,
};
use proptest::prelude::*;
use proptest::strategy::Strategy as _;

const DEV: u32 = 0x30;

type Dom<'a> = Domain<'a, HostPlatform, VtdSl, IovaAllocator, ModelIommu<'a>>;

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

/// Runs `body` with a VT-d domain (48-bit, IOVA from 1 MiB) attached to `DEV` on an audited
/// model IOMMU.
fn with_domain<R>(
    m: &HostPlatform,
    policy: InvalidationPolicy,
    body: impl FnOnce(&Dom<'_>, &ModelIommu<'_>, &TablePool<'_, HostPlatform>) -> R,
) -> R {
    let iommu = ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap();
    let pool = TablePool::new(m);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let space = AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 40)).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: true, guard_page: false })
        .unwrap();
    let d = Domain::new(m, pt, iova, &iommu, DomainConfig { id: 1, policy, untrusted: false }).unwrap();
    let r = body(&d, &iommu, &pool);
    let rep = iommu.audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
    iommu.detach(DEV).unwrap();
    drop(d);
    r
}

/// What the device reads through `segs` by DMA; `None` if any access faults.
fn device_read(iommu: &ModelIommu<'_>, segs: &[Segment]) -> Option<Vec<u8>> {
    let port = iommu.port(DEV);
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        port.dma_read(s.addr, &mut b).ok()?;
        out.extend(b);
    }
    Some(out)
}

fn any_reachable(iommu: &ModelIommu<'_>, segs: &[Segment]) -> bool {
    let port = iommu.port(DEV);
    segs.iter().any(|s| {
        let mut a = s.addr.raw();
        while a < s.end() {
            let mut b = [0u8; 1];
            if port.dma_read(Iova::new(a), &mut b).is_ok() {
                return true;
            }
            a = (a & !(PAGE_SIZE - 1)) + PAGE_SIZE;
        }
        false
    })
}

fn live_iova(d: &Dom<'_>) -> u64 {
    d.iova().stats().live_ranges
}

/// Loads `sg` through `tag`, checks every property, unloads and checks again; returns the
/// load's error, if any.
fn exercise<S: Strategy<HostPlatform>>(
    d: &Dom<'_>,
    iommu: &ModelIommu<'_>,
    tag: &Tag<'_, HostPlatform, S>,
    sg: &[SgEntry],
    want: &[u8],
) -> Result<(), Error> {
    let flush = || d.flush(&tag.platform().pin_cpu()).unwrap();
    flush();
    let iova0 = live_iova(d);
    let mut map = tag.create_map().unwrap();
    let iova_created = live_iova(d);
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let r = map.load(&unsafe { SgList::new(sg) }, Direction::Bidirectional).map(|s| s.to_vec());
    let out = match r {
        Ok(segs) => {
            check_segments(&segs, &Constraints::of(tag.spec())).unwrap();
            assert_eq!(
                device_read(iommu, &segs).as_deref(),
                Some(want),
                "the device reads exactly the loaded bytes"
            );
            let inv0 = iommu.stats().inv_range;
            map.unload().unwrap();
            if d.policy() == InvalidationPolicy::Strict {
                assert_eq!(iommu.stats().inv_range - inv0, 1, "strict: one ranged invalidation per unload");
            }
            flush();
            assert!(!any_reachable(iommu, &segs), "no page reachable after unload (and its invalidation)");
            assert_eq!(live_iova(d), iova_created, "unload returns the load's IOVA");
            Ok(())
        }
        Err(e) => {
            assert!(!map.is_loaded());
            flush();
            assert_eq!(live_iova(d), iova_created, "a failed load leaks no IOVA");
            Err(e)
        }
    };
    drop(map);
    flush();
    assert_eq!(live_iova(d), iova0, "destroy returns the window");
    out
}

fn arb_spec() -> impl proptest::strategy::Strategy<Value = TagSpec> {
    (
        prop_oneof![3 => Just(0u32), 1 => 0u32..=14],
        prop::option::of(12u32..=17),
        1u64..=8,
        1u32..=12,
        prop::option::of(33u32..=38),
    )
        .prop_map(|(al, bd, seg_pages, nsegs, bits)| {
            let mut s = TagSpec::new(16 * PAGE_SIZE, nsegs);
            s.alignment = 1 << al;
            s.boundary = bd.map_or(0, |b| (1u64 << b).max(s.alignment));
            s.max_segment_size = (seg_pages * PAGE_SIZE / 3).max(s.alignment);
            if let Some(b) = bits {
                s.dma_mask = TagSpec::mask_of_bits(b);
            }
            s
        })
}

fn arb_runs() -> impl proptest::strategy::Strategy<Value = Vec<(u64, u64, u64, bool)>> {
    prop::collection::vec((0u64..31, 0u64..PAGE_SIZE, 1u64..6000, prop::bool::weighted(0.3)), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn iommu_strategies_honour_the_tag_reach_exactly_the_loaded_bytes_and_leave_nothing(
        spec in arb_spec(),
        runs in arb_runs(),
        deferred in any::<bool>(),
    ) {
        let m = machine();
        let base = m.frames().alloc(FrameRequest::pages(32)).unwrap().raw();
        let pattern: Vec<u8> = (0..32 * PAGE_SIZE).map(|i| (i * 131 % 251) as u8).collect();
        m.write_phys(PhysAddr::new(base), &pattern).unwrap();
        let mut pr: Vec<(u64, u64)> = Vec::new();
        for &(page, off, len, adj) in &runs {
            let start = match (adj, pr.last()) { (true, Some(&(p, l))) => p + l, _ => base + page * PAGE_SIZE + off };
            let end = (start + len).min(base + 32 * PAGE_SIZE);
            if end > start { pr.push((start, end - start)); }
        }
        prop_assume!(!pr.is_empty());
        let sg: Vec<SgEntry> = pr.iter().map(|&(pa, len)| SgEntry { pa: PhysAddr::new(pa), len, kind: MemKind::Page }).collect();
        let mut want = Vec::new();
        for &(pa, len) in &pr {
            want.extend_from_slice(&pattern[(pa - base) as usize..(pa - base + len) as usize]);
        }
        let total: u64 = pr.iter().map(|r| r.1).sum();
        let policy = if deferred { InvalidationPolicy::deferred() } else { InvalidationPolicy::Strict };
        with_domain(&m, policy, |d, iommu, _| -> Result<(), TestCaseError> {
            let check_err = |e: Error| {
                // The only acceptable failures: too big, too many segments, or a bounce needed.
                prop_assert!(matches!(e, Error::BadSize { .. } | Error::TooManySegments { .. } | Error::Unsupported { .. }), "{e:?}");
                if matches!(e, Error::BadSize { .. }) { prop_assert!(total > spec.max_size); }
                Ok(())
            };
            let tag = Tag::new_root(&m, IommuPerMap(d), spec).unwrap();
            let per_map = exercise(d, iommu, &tag, &sg, &want);
            if let Err(e) = per_map { check_err(e)?; }
            let tag = Tag::new_root(&m, IommuPerSegment(d), spec).unwrap();
            if let Err(e) = exercise(d, iommu, &tag, &sg, &want) { check_err(e)?; }
            let tag = Tag::new_root(&m, IommuReserved::new(d), spec).unwrap();
            let reserved = exercise(d, iommu, &tag, &sg, &want);
            // Reserved and per-map lay loads out the same way: they succeed or fail together.
            prop_assert_eq!(reserved.is_ok(), per_map.is_ok(), "{:?} vs {:?}", reserved, per_map);
            if let Err(e) = reserved { check_err(e)?; }
            let id = Identity::new(d);
            let tag = Tag::new_root(&m, id.clone(), spec).unwrap();
            if let Err(e) = exercise(d, iommu, &tag, &sg, &want) { check_err(e)?; }
            prop_assert_eq!(id.mapped_pages(), 0);
            Ok(())
        })?;
    }
}

#[test]
fn identity_keeps_a_page_mapped_until_its_last_user_unloads() {
    let m = machine();
    with_domain(&m, InvalidationPolicy::Strict, |d, iommu, _| {
        let pa = m.frames().alloc(FrameRequest::pages(2)).unwrap();
        let id = Identity::new(d);
        let tag = Tag::new_root(&m, id.clone(), TagSpec::new(1 << 16, 4)).unwrap();
        let (mut a, mut b) = (tag.create_map().unwrap(), tag.create_map().unwrap());
        let first = [SgEntry { pa, len: 0x800, kind: MemKind::Page }];
        let second = [SgEntry { pa: PhysAddr::new(pa.raw() + 0x800), len: 0x1000, kind: MemKind::Page }];
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        a.load(&unsafe { SgList::new(&first) }, Direction::ToDevice).unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        b.load(&unsafe { SgList::new(&second) }, Direction::ToDevice).unwrap();
        assert_eq!((id.refcount(pa), id.refcount(PhysAddr::new(pa.raw() + PAGE_SIZE))), (2, 1));
        assert_eq!(a.segments()[0].addr.raw(), pa.raw(), "identity: bus address = physical address");
        let seg_a = a.segments().to_vec();
        a.unload().unwrap();
        assert!(any_reachable(iommu, &seg_a), "still mapped: the second map uses the page");
        let seg_b = b.segments().to_vec();
        b.unload().unwrap();
        assert!(!any_reachable(iommu, &seg_a) && !any_reachable(iommu, &seg_b));
        assert_eq!(id.mapped_pages(), 0);
    });
}

#[test]
fn reserved_maps_allocate_their_window_and_table_levels_at_create_only() {
    let m = machine();
    for policy in [InvalidationPolicy::Strict, InvalidationPolicy::deferred()] {
        with_domain(&m, policy, |d, iommu, pool| {
            let pa = m.frames().alloc(FrameRequest::pages(4)).unwrap();
            let tag = Tag::new_root(&m, IommuReserved::new(d), TagSpec::new(4 * PAGE_SIZE, 4)).unwrap();
            let mut map = tag.create_map().unwrap();
            let window = map.state().window();
            assert_eq!(window.len(), 8 * PAGE_SIZE, "max size plus one page per segment");
            let (iova, allocs) = (live_iova(d), pool.stats().allocs);
            for len in [100, PAGE_SIZE, 3 * PAGE_SIZE + 5] {
                m.write_phys(PhysAddr::new(pa.raw() + 7), &[len as u8; 1]).unwrap();
                let one = [SgEntry { pa: PhysAddr::new(pa.raw() + 7), len, kind: MemKind::Page }];
                // SAFETY: the test owns these frames and keeps them until the map is dropped.
                let one = unsafe { SgList::new(&one) };
                let segs = map.load(&one, Direction::ToDevice).unwrap().to_vec();
                assert!(window.contains(segs[0].addr));
                let mut b = [0u8; 1];
                iommu.port(DEV).dma_read(segs[0].addr, &mut b).unwrap();
                assert_eq!(b[0], len as u8, "the device reads this load's bytes, not a stale mapping's");
                map.unload().unwrap();
            }
            assert_eq!((live_iova(d), pool.stats().allocs), (iova, allocs), "load/unload allocate nothing");
            drop(map);
            d.flush(&m.pin_cpu()).unwrap();
            assert_eq!(live_iova(d), iova - 1);
        });
    }
}

#[test]
fn a_pinned_reserved_window_keeps_its_leaf_tables_when_a_load_covers_a_whole_span() {
    // A 4 MiB load covers at least one whole 2 MiB leaf table of its window: the walker's
    // unmap would detach that table (and free it after the flush) while the map still points
    // into it. The pinned window clears leaves only, so its tables stay installed.
    let m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(96 << 20) }).unwrap();
    for policy in [InvalidationPolicy::Strict, InvalidationPolicy::deferred()] {
        with_domain(&m, policy, |d, iommu, pool| {
            let len = 4 << 20;
            let pa = m.frames().alloc(FrameRequest::pages(len / PAGE_SIZE)).unwrap();
            let tag = Tag::new_root(&m, IommuReserved::new(d), TagSpec::new(len, 1)).unwrap();
            let mut map = tag.create_map().unwrap();
            assert!(map.state().pinned(), "busdma's domain pins reserved windows");
            let (tables, allocs) = (d.table().table_pages(), pool.stats().allocs);
            for round in 0..3u8 {
                m.write_phys(PhysAddr::new(pa.raw() + len - 1), &[round]).unwrap();
                let one = [SgEntry { pa, len, kind: MemKind::Page }];
                // SAFETY: the test owns these frames and keeps them until the map is dropped.
                let one = unsafe { SgList::new(&one) };
                let segs = map.load(&one, Direction::ToDevice).unwrap().to_vec();
                let mut b = [0u8; 1];
                iommu.port(DEV).dma_read(Iova::new(segs[0].addr.raw() + len - 1), &mut b).unwrap();
                assert_eq!(b[0], round, "the device reads this load's bytes");
                map.unload().unwrap();
                d.flush(&m.pin_cpu()).unwrap();
                assert!(!any_reachable(iommu, &segs), "nothing reachable after unload");
                assert_eq!(d.table().table_pages(), tables, "no leaf table detached");
            }
            assert_eq!(pool.stats().allocs, allocs, "load/unload allocate no table");
        });
    }
}

#[test]
fn a_per_segment_load_allocates_one_iova_per_run_and_unloads_with_one_invalidation() {
    let m = machine();
    with_domain(&m, InvalidationPolicy::Strict, |d, iommu, _| {
        let frames: Vec<_> = (0..3).map(|_| m.frames().alloc(FrameRequest::pages(1)).unwrap()).collect();
        let tag = Tag::new_root(&m, IommuPerSegment(d), TagSpec::new(1 << 16, 8)).unwrap();
        let mut map = tag.create_map().unwrap();
        let sg: Vec<SgEntry> =
            [0, 2, 1].iter().map(|&i| SgEntry { pa: frames[i], len: 0x100, kind: MemKind::Page }).collect();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap();
        assert_eq!(map.state().ranges().len(), 3);
        let inv = iommu.stats().inv_range;
        map.unload().unwrap();
        assert_eq!(iommu.stats().inv_range, inv + 1);
    });
}

#[test]
fn a_load_that_runs_out_of_table_pages_midway_leaves_nothing_behind() {
    let m = machine();
    with_domain(&m, InvalidationPolicy::Strict, |d, iommu, pool| {
        // 600 pages cross at least one 2 MiB line: the map needs a new leaf table midway.
        let pa = m.frames().alloc(FrameRequest::pages(600)).unwrap();
        let tag = Tag::new_root(&m, IommuPerMap(d), TagSpec::new(600 * PAGE_SIZE, 1)).unwrap();
        let mut map = tag.create_map().unwrap();
        let iova = live_iova(d);
        pool.fail_nth_alloc(Some(pool.alloc_attempts() + 2));
        let big = [SgEntry { pa, len: 600 * PAGE_SIZE, kind: MemKind::Page }];
        // SAFETY: the test owns these frames and keeps them until the map is dropped.
        let big = unsafe { SgList::new(&big) };
        let e = map.load(&big, Direction::ToDevice).unwrap_err();
        assert!(matches!(e, Error::NoMemory { .. }), "{e:?}");
        assert!(!map.is_loaded());
        assert_eq!(live_iova(d), iova, "no IOVA leaked");
        assert_eq!(iommu.stats().faults, 0);
        // The same load succeeds once memory is back.
        map.load(&big, Direction::ToDevice).unwrap();
    });
}

#[test]
fn an_untrusted_tag_refuses_sub_page_runs_until_bounce_buffering_exists() {
    let m = machine();
    with_domain(&m, InvalidationPolicy::Strict, |d, _, _| {
        let pa = m.frames().alloc(FrameRequest::pages(2)).unwrap();
        let mut spec = TagSpec::new(1 << 16, 8);
        spec.flags.untrusted = true;
        let tag = Tag::new_root(&m, IommuPerMap(d), spec).unwrap();
        let mut map = tag.create_map().unwrap();
        let iova = live_iova(d);
        let (small, whole) = (
            [SgEntry { pa, len: 100, kind: MemKind::Page }],
            [SgEntry { pa, len: 2 * PAGE_SIZE, kind: MemKind::Page }],
        );
        // SAFETY: the test owns these frames and keeps them until the map is dropped.
        let (small, whole) = unsafe { (SgList::new(&small), SgList::new(&whole)) };
        let e = map.load(&small, Direction::ToDevice).unwrap_err();
        assert!(matches!(e, Error::Unsupported { what } if what.contains("untrusted")));
        assert_eq!(live_iova(d), iova);
        map.load(&whole, Direction::ToDevice).unwrap();
    });
}

#[test]
fn the_device_gets_only_the_rights_of_the_direction() {
    let m = machine();
    with_domain(&m, InvalidationPolicy::Strict, |d, iommu, _| {
        let pa = m.frames().alloc(FrameRequest::pages(1)).unwrap();
        let tag = Tag::new_root(&m, IommuPerMap(d), TagSpec::new(1 << 16, 4)).unwrap();
        let mut map = tag.create_map().unwrap();
        let sg = [SgEntry { pa, len: 64, kind: MemKind::Page }];
        let port = iommu.port(DEV);
        let mut b = [0u8; 8];
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        let bus = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap()[0].addr;
        assert!(port.dma_read(bus, &mut b).is_ok());
        assert!(port.dma_write(bus, &b).is_err(), "a to-device buffer is read-only for the device");
        map.unload().unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        let bus = map.load(&unsafe { SgList::new(&sg) }, Direction::FromDevice).unwrap()[0].addr;
        assert!(port.dma_write(bus, &b).is_ok());
        map.unload().unwrap();
        iommu.take_faults();
    });
}
