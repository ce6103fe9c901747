//! The IOMMU strategies (per-segment, per-map, reserved, identity) through a domain: segments
//! honour the tag, the device reaches exactly the loaded bytes through the IO page table, and
//! nothing is reachable or leaked after unload; property-tested over random tags and loads.

mod common;

use busdma::front::segments::{Constraints, check_segments};
use busdma::front::{
    Direction, Identity, IommuPerMap, IommuPerSegment, IommuReserved, MemKind, Segment, SgEntry, SgList, Tag,
    TagSpec,
};
use busdma::pgtable::TablePool;
use busdma::{Error, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{FrameRequest, HostPlatform};
use common::ptdomain::PtDomain;
use proptest::prelude::*;
use std::sync::atomic::Ordering;

/// What the device reads through `segs`, translated page by page; `None` if any byte faults.
fn device_read(d: &PtDomain<'_>, m: &HostPlatform, segs: &[Segment]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for s in segs {
        let mut a = s.addr.raw();
        let end = s.end();
        while a < end {
            let n = (PAGE_SIZE - (a & (PAGE_SIZE - 1))).min(end - a);
            let pa = d.translate(a)?;
            let mut b = vec![0u8; n as usize];
            m.read_phys(pa, &mut b).ok()?;
            out.extend(b);
            a += n;
        }
    }
    Some(out)
}

fn any_reachable(d: &PtDomain<'_>, segs: &[Segment]) -> bool {
    segs.iter().any(|s| {
        let mut a = s.addr.raw() & !(PAGE_SIZE - 1);
        while a < s.end() {
            if d.translate(a).is_some() {
                return true;
            }
            a += PAGE_SIZE;
        }
        false
    })
}

/// Loads `sg` through `tag`, checks every property, unloads and checks again. Returns the
/// load's error, if any.
fn exercise<S: busdma::front::Strategy<HostPlatform>>(
    m: &HostPlatform,
    d: &PtDomain<'_>,
    tag: &Tag<'_, HostPlatform, S>,
    sg: &[SgEntry],
    want: &[u8],
) -> Result<(), Error> {
    let iova0 = d.live_iova_bytes();
    let mut map = tag.create_map().unwrap();
    let iova_created = d.live_iova_bytes();
    let inv0 = d.invalidations.load(Ordering::Relaxed);
    let r = map.load(&SgList(sg), Direction::Bidirectional).map(|s| s.to_vec());
    match r {
        Ok(segs) => {
            check_segments(&segs, &Constraints::of(tag.spec())).unwrap();
            assert_eq!(
                device_read(d, m, &segs).as_deref(),
                Some(want),
                "the device reads exactly the loaded bytes"
            );
            map.unload().unwrap();
            assert!(!any_reachable(d, &segs), "no page reachable after unload");
            assert_eq!(d.invalidations.load(Ordering::Relaxed) - inv0, 1, "one invalidation per unload");
            assert_eq!(d.live_iova_bytes(), iova_created, "unload returns the load's IOVA");
            drop(map);
            assert_eq!(d.live_iova_bytes(), iova0, "destroy returns the window");
            Ok(())
        }
        Err(e) => {
            assert!(!map.is_loaded());
            assert_eq!(d.live_iova_bytes(), iova_created, "a failed load leaks no IOVA");
            drop(map);
            assert_eq!(d.live_iova_bytes(), iova0);
            Err(e)
        }
    }
}

fn arb_spec() -> impl Strategy<Value = TagSpec> {
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

fn arb_runs() -> impl Strategy<Value = Vec<(u64, u64, u64, bool)>> {
    prop::collection::vec((0u64..31, 0u64..PAGE_SIZE, 1u64..6000, prop::bool::weighted(0.3)), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn iommu_strategies_honour_the_tag_reach_exactly_the_loaded_bytes_and_leave_nothing(
        spec in arb_spec(),
        runs in arb_runs(),
    ) {
        let m = common::machine();
        let pool = TablePool::new(&m);
        let d = PtDomain::new(&m, &pool);
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
        let check_err = |e: Error| {
            // The only acceptable failures: the load is too big, needs too many segments, or
            // needs a bounce (a misaligned run start).
            prop_assert!(matches!(e, Error::BadSize { .. } | Error::TooManySegments { .. } | Error::Unsupported { .. }), "{e:?}");
            if matches!(e, Error::BadSize { .. }) { prop_assert!(total > spec.max_size); }
            Ok(())
        };
        let tag = Tag::new_root(&m, IommuPerMap(&d), spec).unwrap();
        let per_map = exercise(&m, &d, &tag, &sg, &want);
        if let Err(e) = per_map { check_err(e)?; }
        let tag = Tag::new_root(&m, IommuPerSegment(&d), spec).unwrap();
        if let Err(e) = exercise(&m, &d, &tag, &sg, &want) { check_err(e)?; }
        let tag = Tag::new_root(&m, IommuReserved(&d), spec).unwrap();
        let reserved = exercise(&m, &d, &tag, &sg, &want);
        // Reserved and per-map lay loads out the same way: they succeed or fail together.
        prop_assert_eq!(reserved.is_ok(), per_map.is_ok(), "{:?} vs {:?}", reserved, per_map);
        if let Err(e) = reserved { check_err(e)?; }
        let id = Identity::new(&d);
        let tag = Tag::new_root(&m, id.clone(), spec).unwrap();
        if let Err(e) = exercise(&m, &d, &tag, &sg, &want) { check_err(e)?; }
        prop_assert_eq!(id.mapped_pages(), 0);
        prop_assert_eq!(d.live_iova_bytes(), 0);
    }
}

#[test]
fn identity_keeps_a_page_mapped_until_its_last_user_unloads() {
    let m = common::machine();
    let pool = TablePool::new(&m);
    let d = PtDomain::new(&m, &pool);
    let pa = m.frames().alloc(FrameRequest::pages(2)).unwrap();
    let id = Identity::new(&d);
    let tag = Tag::new_root(&m, id.clone(), TagSpec::new(1 << 16, 4)).unwrap();
    let (mut a, mut b) = (tag.create_map().unwrap(), tag.create_map().unwrap());
    let first = [SgEntry { pa, len: 0x800, kind: MemKind::Page }];
    let second = [SgEntry { pa: PhysAddr::new(pa.raw() + 0x800), len: 0x1000, kind: MemKind::Page }];
    a.load(&SgList(&first), Direction::ToDevice).unwrap();
    b.load(&SgList(&second), Direction::ToDevice).unwrap();
    assert_eq!((id.refcount(pa), id.refcount(PhysAddr::new(pa.raw() + PAGE_SIZE))), (2, 1));
    assert_eq!(a.segments()[0].addr.raw(), pa.raw(), "identity: bus address = physical address");
    a.unload().unwrap();
    assert_eq!(d.translate(pa.raw()), Some(pa), "still mapped: the second map uses the page");
    b.unload().unwrap();
    assert_eq!(d.translate(pa.raw()), None);
    assert_eq!(d.translate(pa.raw() + PAGE_SIZE), None);
    assert_eq!(id.mapped_pages(), 0);
}

#[test]
fn reserved_maps_allocate_their_window_and_table_levels_at_create_only() {
    let m = common::machine();
    let pool = TablePool::new(&m);
    let d = PtDomain::new(&m, &pool);
    let pa = m.frames().alloc(FrameRequest::pages(4)).unwrap();
    let spec = TagSpec::new(4 * PAGE_SIZE, 4);
    let tag = Tag::new_root(&m, IommuReserved(&d), spec).unwrap();
    let mut map = tag.create_map().unwrap();
    let window = map.state().window();
    assert_eq!(window.len(), 4 * PAGE_SIZE + 4 * PAGE_SIZE, "max size plus one page per segment");
    let (iova, allocs) = (d.live_iova_bytes(), pool.stats().allocs);
    for len in [100, PAGE_SIZE, 3 * PAGE_SIZE + 5] {
        let segs = map
            .load(
                &SgList(&[SgEntry { pa: PhysAddr::new(pa.raw() + 7), len, kind: MemKind::Page }]),
                Direction::FromDevice,
            )
            .unwrap();
        assert!(window.contains(segs[0].addr));
        map.unload().unwrap();
    }
    assert_eq!((d.live_iova_bytes(), pool.stats().allocs), (iova, allocs), "load/unload allocate nothing");
    drop(map);
    assert_eq!(d.live_iova_bytes(), 0);
}

#[test]
fn a_per_segment_load_allocates_one_iova_per_run_and_unloads_with_one_invalidation() {
    let m = common::machine();
    let pool = TablePool::new(&m);
    let d = PtDomain::new(&m, &pool);
    let a = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let b = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let c = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let tag = Tag::new_root(&m, IommuPerSegment(&d), TagSpec::new(1 << 16, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    let sg: Vec<SgEntry> =
        [a, c, b].iter().map(|&pa| SgEntry { pa, len: 0x100, kind: MemKind::Page }).collect();
    map.load(&SgList(&sg), Direction::ToDevice).unwrap();
    assert_eq!(map.state().ranges().len(), 3);
    let inv = d.invalidations.load(Ordering::Relaxed);
    map.unload().unwrap();
    assert_eq!(d.invalidations.load(Ordering::Relaxed), inv + 1);
}

#[test]
fn an_untrusted_tag_refuses_sub_page_runs_until_bounce_buffering_exists() {
    let m = common::machine();
    let pool = TablePool::new(&m);
    let d = PtDomain::new(&m, &pool);
    let pa = m.frames().alloc(FrameRequest::pages(2)).unwrap();
    let mut spec = TagSpec::new(1 << 16, 8);
    spec.flags.untrusted = true;
    let tag = Tag::new_root(&m, IommuPerMap(&d), spec).unwrap();
    let mut map = tag.create_map().unwrap();
    let e =
        map.load(&SgList(&[SgEntry { pa, len: 100, kind: MemKind::Page }]), Direction::ToDevice).unwrap_err();
    assert!(matches!(e, Error::Unsupported { what } if what.contains("untrusted")));
    map.load(&SgList(&[SgEntry { pa, len: 2 * PAGE_SIZE, kind: MemKind::Page }]), Direction::ToDevice)
        .unwrap();
    assert_eq!(d.live_iova_bytes(), 2 * PAGE_SIZE);
}
