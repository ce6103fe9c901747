//! The front end over the `direct` strategy: tags, loads, segments, sync, coherent memory,
//! the typed API, and the bad inputs of issue 5.

mod common;

use busdma::front::typed::{Bidirectional, FromDevice, ToDevice};
use busdma::front::*;
use busdma::{Error, Iova, KernVa, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{FrameRequest, HostPlatform, Placement};
use common::{CacheOp, Recording, machine};

fn frames(m: &HostPlatform, pages: u64, placement: Placement) -> PhysAddr {
    let mut r = FrameRequest::pages(pages);
    r.placement = placement;
    m.frames().alloc(r).unwrap()
}

/// Reads what the device sees through `segs` (direct: bus address = physical address).
fn device_view(m: &HostPlatform, segs: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        m.read_phys(PhysAddr::new(s.addr.raw()), &mut b).unwrap();
        out.extend_from_slice(&b);
    }
    out
}

#[test]
fn a_kernel_buffer_loads_as_its_physical_runs_and_the_device_sees_its_bytes() {
    let m = machine();
    let pa = frames(&m, 4, Placement::DirectMapped);
    let kva = m.phys_to_kva(pa).unwrap();
    let data: Vec<u8> = (0..3 * PAGE_SIZE as usize).map(|i| (i * 7) as u8).collect();
    m.write_phys(PhysAddr::new(pa.raw() + 100), &data).unwrap();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    let segs = map
        .load(
            // SAFETY: memory the test allocated and keeps until the map is dropped.
            &unsafe { KernelBuf::new(KernVa::new(kva.raw() + 100), data.len() as u64) },
            Direction::ToDevice,
        )
        .unwrap();
    assert_eq!(segs, [Segment { addr: Iova::new(pa.raw() + 100), len: data.len() as u64 }]);
    assert_eq!(device_view(&m, map.segments()), data);
}

#[test]
fn segments_split_at_boundary_and_max_segment_size() {
    let m = machine();
    let pa = frames(&m, 4, Placement::DirectMapped);
    let mut spec = TagSpec::new(64 << 10, 8);
    spec.boundary = 0x1000;
    spec.max_segment_size = 0x800;
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let mut map = tag.create_map().unwrap();
    let base = pa.raw() + 0xc00;
    let segs =
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { RawSegment::new(PhysAddr::new(base), 0x1800) }, Direction::ToDevice).unwrap();
    let got: Vec<_> = segs.iter().map(|s| (s.addr.raw() - pa.raw(), s.len)).collect();
    assert_eq!(got, [(0xc00, 0x400), (0x1000, 0x800), (0x1800, 0x800), (0x2000, 0x400)]);
}

#[test]
fn a_peer_bar_with_a_bus_address_is_used_as_is() {
    let m = machine();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    let e = [SgEntry {
        pa: PhysAddr::new(0xf000_0000),
        len: 0x100,
        kind: MemKind::PeerBar { bus: Some(Iova::new(0x8000_0000)) },
    }];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let segs = map.load(&unsafe { SgList::new(&e) }, Direction::ToDevice).unwrap();
    assert_eq!(segs, [Segment { addr: Iova::new(0x8000_0000), len: 0x100 }]);
}

#[test]
fn sync_maintains_page_runs_at_their_kernel_address_or_through_a_quick_map_and_skips_page_less_runs() {
    let host = machine();
    let rec = Recording::new(&host);
    let mapped = frames(&host, 1, Placement::DirectMapped);
    let unmapped = frames(&host, 1, Placement::NotDirectMapped);
    let tag = Tag::new_root(&rec, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    let sg = [
        SgEntry { pa: mapped, len: 0x200, kind: MemKind::Page },
        SgEntry { pa: unmapped.checked_add(0x40).unwrap(), len: 0x200, kind: MemKind::Page },
        SgEntry { pa: PhysAddr::new(0xfe00_0000), len: 0x100, kind: MemKind::Mmio },
    ];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { SgList::new(&sg) }, Direction::Bidirectional).unwrap();
    let kva = host.phys_to_kva(mapped).unwrap().raw();
    // The page outside the direct map is maintained through a quick-map window, 0x40 into it.
    let in_window = |ops: Vec<CacheOp>| -> Vec<CacheOp> {
        ops.into_iter()
            .map(|op| match op {
                CacheOp::Clean(k, n) if host.quick_window().contains(KernVa::new(k)) => {
                    CacheOp::Clean(k % PAGE_SIZE, n)
                }
                CacheOp::CleanInvalidate(k, n) if host.quick_window().contains(KernVa::new(k)) => {
                    CacheOp::CleanInvalidate(k % PAGE_SIZE, n)
                }
                CacheOp::Invalidate(k, n) if host.quick_window().contains(KernVa::new(k)) => {
                    CacheOp::Invalidate(k % PAGE_SIZE, n)
                }
                op => op,
            })
            .collect()
    };
    let st = map.sync(SyncOp::PREWRITE).unwrap();
    assert_eq!((st.maintained, st.skipped, st.quick_mapped), (2, 1, 1));
    assert_eq!(in_window(rec.take()), [CacheOp::Clean(kva, 0x200), CacheOp::Clean(0x40, 0x200)]);
    map.sync(SyncOp::PREREAD).unwrap();
    assert_eq!(
        in_window(rec.take()),
        [CacheOp::CleanInvalidate(kva, 0x200), CacheOp::CleanInvalidate(0x40, 0x200)]
    );
    map.sync(SyncOp::POSTREAD | SyncOp::POSTWRITE).unwrap();
    assert_eq!(in_window(rec.take()), [CacheOp::Invalidate(kva, 0x200), CacheOp::Invalidate(0x40, 0x200)]);
}

#[test]
fn a_coherent_tag_skips_cache_maintenance() {
    let host = machine();
    let rec = Recording::new(&host);
    let pa = frames(&host, 1, Placement::DirectMapped);
    let mut spec = TagSpec::new(64 << 10, 8);
    spec.flags.coherent = true;
    let tag = Tag::new_root(&rec, Direct, spec).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { RawSegment::new(pa, 0x800) }, Direction::Bidirectional).unwrap();
    map.sync(SyncOp::PREWRITE | SyncOp::PREREAD).unwrap();
    map.sync(SyncOp::POSTREAD).unwrap();
    assert!(rec.take().is_empty());
}

#[test]
fn a_child_tag_inherits_and_may_only_narrow() {
    let m = machine();
    let mut parent = TagSpec::new(64 << 10, 8);
    parent.boundary = 1 << 16;
    parent.dma_mask = TagSpec::mask_of_bits(32);
    let root = Tag::new_root(&m, Direct, parent).unwrap();
    let mut ok = parent;
    ok.max_segments = 4;
    ok.alignment = 16;
    root.child(ok).unwrap();
    let widen = |f: &dyn Fn(&mut TagSpec)| {
        let mut s = parent;
        f(&mut s);
        root.child(s).err().unwrap()
    };
    assert!(
        matches!(widen(&|s| s.dma_mask = u64::MAX - 1), Error::InvalidArgument { what, .. } if what.contains("dma_mask"))
    );
    assert!(
        matches!(widen(&|s| s.boundary = 0), Error::InvalidArgument { what, .. } if what.contains("boundary"))
    );
    assert!(
        matches!(widen(&|s| s.max_segments = 9), Error::InvalidArgument { what, .. } if what.contains("max_segments"))
    );
    assert!(
        matches!(widen(&|s| s.max_size = 1 << 20), Error::InvalidArgument { what, .. } if what.contains("max_size"))
    );
    assert!(
        matches!(widen(&|s| s.flags.coherent = true), Error::InvalidArgument { what, .. } if what.contains("coherence"))
    );
    assert_eq!(widen(&|s| s.alignment = 3), Error::BadAlignment { align: 3 });
}

#[test]
fn bad_loads_fail_clearly_and_leave_the_map_unloaded() {
    let m = machine();
    let pa = frames(&m, 8, Placement::DirectMapped);
    let mut spec = TagSpec::new(4 * PAGE_SIZE, 2);
    spec.max_segment_size = PAGE_SIZE;
    spec.dma_mask = TagSpec::mask_of_bits(32);
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let mut map = tag.create_map().unwrap();
    // zero-length load
    assert_eq!(
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { RawSegment::new(pa, 0) }, Direction::ToDevice).unwrap_err(),
        Error::ZeroSize
    );
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    assert_eq!(map.load(&unsafe { SgList::new(&[]) }, Direction::ToDevice).unwrap_err(), Error::ZeroSize);
    // beyond max size
    assert_eq!(
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { RawSegment::new(pa, 5 * PAGE_SIZE) }, Direction::ToDevice).unwrap_err(),
        Error::BadSize { size: 5 * PAGE_SIZE, limit: 4 * PAGE_SIZE }
    );
    // too many segments
    assert_eq!(
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { RawSegment::new(pa, 3 * PAGE_SIZE) }, Direction::ToDevice).unwrap_err(),
        Error::TooManySegments { needed: 3, max: 2 }
    );
    // page-less entry where a bounce would be required (beyond the 32-bit mask)
    let far = [SgEntry { pa: PhysAddr::new(1 << 40), len: 64, kind: MemKind::Unmapped }];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    assert!(matches!(map.load(&unsafe { SgList::new(&far) }, Direction::ToDevice).unwrap_err(),
        Error::Unsupported { what } if what.contains("no page and no kernel mapping")));
    // a bounceable run beyond the mask reaches the bounce hook
    let far_page = [SgEntry { pa: PhysAddr::new(1 << 40), len: 64, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    assert!(matches!(map.load(&unsafe { SgList::new(&far_page) }, Direction::ToDevice).unwrap_err(),
        Error::Unsupported { what } if what.contains("bounce")));
    assert!(!map.is_loaded());
    assert!(map.segments().is_empty() && map.runs().is_empty());
    // sync and unload of an unloaded map
    assert!(matches!(map.sync(SyncOp::PREWRITE).unwrap_err(), Error::BadState { .. }));
    assert!(matches!(map.unload().unwrap_err(), Error::BadState { .. }));
    // load into a loaded map
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { RawSegment::new(pa, 64) }, Direction::ToDevice).unwrap();
    assert!(
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        matches!(map.load(&unsafe { RawSegment::new(pa, 64) }, Direction::ToDevice).unwrap_err(), Error::BadState { what } if what.contains("already loaded"))
    );
    assert_eq!(map.segments(), [Segment { addr: Iova::identity_of(pa), len: 64 }]);
}

#[test]
fn a_wrong_direction_sync_and_a_map_of_another_tag_are_refused() {
    let m = machine();
    let pa = frames(&m, 1, Placement::DirectMapped);
    let a = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let b = a.child(TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = a.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { RawSegment::new(pa, 64) }, Direction::ToDevice).unwrap();
    assert!(matches!(map.sync(SyncOp::PREREAD).unwrap_err(), Error::InvalidArgument { value: 2, .. }));
    assert!(matches!(b.sync(&mut map, SyncOp::PREWRITE).unwrap_err(), Error::InvalidArgument { .. }));
    assert!(matches!(b.unload(&mut map).unwrap_err(), Error::InvalidArgument { .. }));
    assert!(map.is_loaded());
    a.unload(&mut map).unwrap();
}

#[test]
fn the_cpu_reads_what_the_device_wrote_after_postread() {
    let m = machine();
    let pa = frames(&m, 1, Placement::DirectMapped);
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { RawSegment::new(pa, 256) }, Direction::FromDevice).unwrap();
    map.sync(SyncOp::PREREAD).unwrap();
    let mut b = [0u8; 4];
    assert!(matches!(map.read(0, &mut b).unwrap_err(), Error::BadState { .. }));
    m.write_phys(PhysAddr::new(map.segments()[0].addr.raw()), &[1, 2, 3, 4]).unwrap(); // the device writes
    map.sync(SyncOp::POSTREAD).unwrap();
    map.read(0, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
}

#[test]
fn coherent_memory_meets_the_tag_and_is_uncached_on_a_non_coherent_tag() {
    let m = machine();
    let mut spec = TagSpec::new(64 << 10, 1);
    spec.dma_mask = TagSpec::mask_of_bits(26);
    spec.boundary = 1 << 14;
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let c = tag.alloc_coherent(3 * PAGE_SIZE, false).unwrap();
    let s = c.segments();
    assert_eq!(s.len(), 1);
    assert!(s[0].addr.raw() + s[0].len - 1 <= spec.dma_mask);
    assert_eq!(s[0].addr.raw() / (1 << 14), (s[0].end() - 1) / (1 << 14));
    assert_eq!(m.mem_attr(c.memory().pa()), busdma::MemAttr::Uncached);
    c.memory().write(5, b"hello").unwrap();
    let mut b = [0u8; 5];
    m.read_phys(PhysAddr::new(s[0].addr.raw() + 5), &mut b).unwrap();
    assert_eq!(&b, b"hello");
    let free = m.frames().free_frames();
    drop(c);
    assert_eq!(m.frames().free_frames(), free + 3);
    let mut coh = spec;
    coh.flags.coherent = true;
    let tag = Tag::new_root(&m, Direct, coh).unwrap();
    let c = tag.alloc_coherent(PAGE_SIZE, false).unwrap();
    assert_eq!(m.mem_attr(c.memory().pa()), busdma::MemAttr::WriteBack);
}

#[test]
fn the_typed_api_hands_buffers_back_and_forth_and_frees_them_on_drop() {
    let m = machine();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let free = m.frames().free_frames();
    let tx = tag.alloc_buffer::<ToDevice>(1500).unwrap();
    tx.write(0, b"packet").unwrap();
    let dev = tx.to_device().ok().unwrap();
    let mut b = [0u8; 6];
    m.read_phys(PhysAddr::new(dev.segments()[0].addr.raw()), &mut b).unwrap();
    assert_eq!(&b, b"packet");
    let tx = dev.to_cpu().unwrap();
    drop(tx);
    let rx = tag.alloc_buffer::<FromDevice>(64).unwrap().to_device().ok().unwrap();
    m.write_phys(PhysAddr::new(rx.segments()[0].addr.raw()), b"reply").unwrap();
    let rx = rx.to_cpu().unwrap();
    let mut r = [0u8; 5];
    rx.read(0, &mut r).unwrap();
    assert_eq!(&r, b"reply");
    let both = tag.alloc_buffer::<Bidirectional>(64).unwrap().to_device().ok().unwrap();
    drop(both); // unloads, destroys, frees
    drop(rx);
    assert_eq!(m.frames().free_frames(), free);
}

#[test]
fn page_lists_load_with_offset_and_length() {
    let m = machine();
    let a = frames(&m, 1, Placement::DirectMapped);
    let b = frames(&m, 1, Placement::NotDirectMapped);
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    let pages = [a, b];
    let segs = map
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        .load(&unsafe { PageList::new(&pages, 0xf00, 0x200) }, Direction::ToDevice)
        .unwrap()
        .to_vec();
    assert_eq!(
        segs,
        [
            Segment { addr: Iova::new(a.raw() + 0xf00), len: 0x100 },
            Segment { addr: Iova::identity_of(b), len: 0x100 }
        ]
    );
    assert_eq!(map.runs()[1].kva, None);
    map.unload().unwrap();
    assert!(matches!(
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { PageList::new(&pages, 0xf00, 0x2000) }, Direction::ToDevice).unwrap_err(),
        Error::BadSize { .. }
    ));
}

#[test]
fn a_kernel_buffer_outside_the_direct_map_is_refused() {
    let m = machine();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let e = map.load(&unsafe { KernelBuf::new(KernVa::new(0x1000), 64) }, Direction::ToDevice).unwrap_err();
    assert_eq!(e, Error::NotDirectMapped { pa: 0x1000 });
    assert!(!map.is_loaded());
}

#[test]
fn a_device_with_a_28_bit_mask_reaches_what_a_28_bit_tag_loads() {
    use busdma_model::{DirectPort, DmaPort};
    let m = machine();
    let pa = frames(&m, 1, Placement::DirectMapped);
    let mut spec = TagSpec::new(64 << 10, 8);
    spec.dma_mask = TagSpec::mask_of_bits(28);
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let mut map = tag.create_map().unwrap();
    m.write_phys(pa, b"abcd").unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let seg = map.load(&unsafe { RawSegment::new(pa, 4) }, Direction::ToDevice).unwrap()[0];
    let mut b = [0u8; 4];
    DirectPort::new(&m, 1, 28).dma_read(seg.addr, &mut b).unwrap();
    assert_eq!(&b, b"abcd");
}

#[test]
fn a_sync_of_raw_segments_outside_ram_is_an_error_not_a_panic() {
    let m = machine();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    // Past the end of RAM: no page, no direct-map address; a non-coherent sync would have to
    // quick-map it.
    let pa = m.ram().end().checked_add(PAGE_SIZE).unwrap();
    // SAFETY: not RAM, so this breaks `RawSegment::new`'s contract on purpose, to show the
    // defence behind it: nothing owns the range, no device is given the bus address, and the
    // syncs below must refuse it (`Platform::is_ram`) rather than quick-map it.
    map.load(&unsafe { RawSegment::new(pa, 0x100) }, Direction::Bidirectional).unwrap();
    for op in [SyncOp::PREWRITE, SyncOp::PREREAD, SyncOp::POSTREAD] {
        assert_eq!(map.sync(op).unwrap_err(), Error::NotRam { pa: pa.raw(), len: 0x100 });
    }
    map.unload().unwrap();
}
