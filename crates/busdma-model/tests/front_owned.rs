//! Owned loads (`busdma::front::owned`): the map owns what it maps, with no `unsafe` in the
//! caller; the buffer leaves the map only after the proof that no translation reaches it.

mod common;

use busdma::front::{
    DeviceRegion, Direct, Direction, DmaMemory, OwnedMap, Part, RegionKind, SyncOp, Tag, TagSpec,
};
use busdma::{Error, Iova, MemAttr, PAGE_SIZE, PhysAddr};
use busdma_model::{DirectPort, DmaPort, HostPlatform, PageKind};
use common::machine;

fn mem<'p>(m: &'p HostPlatform, spec: &TagSpec, fill: u8) -> DmaMemory<'p, HostPlatform> {
    let d = DmaMemory::alloc(m, spec, PAGE_SIZE, MemAttr::WriteBack).unwrap();
    d.write(0, &[fill; PAGE_SIZE as usize]).unwrap();
    d
}

#[test]
fn a_three_fragment_packet_is_owned_by_its_map_and_the_device_reads_exactly_it() {
    let m = machine();
    let spec = TagSpec::new(4 * PAGE_SIZE, 4);
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let mut map: OwnedMap<'_, _, _, [Part<'_, _>; 3]> = tag.create_owned_map().unwrap();
    let frags = [
        Part::new(mem(&m, &spec, 0x11), 0x80, 66).ok().unwrap(),
        Part::new(mem(&m, &spec, 0x22), 0, 717).ok().unwrap(),
        Part::new(mem(&m, &spec, 0x33), 100, 717).ok().unwrap(),
    ];
    let segs = map.load(frags, Direction::ToDevice).ok().unwrap().to_vec();
    map.sync(SyncOp::PREWRITE).unwrap();
    let mut seen = Vec::new();
    for s in &segs {
        let mut b = vec![0u8; s.len as usize];
        DirectPort::new(&m, 1, 64).dma_read(s.addr, &mut b).unwrap();
        seen.extend(b);
    }
    let want: Vec<u8> = [(0x11u8, 66usize), (0x22, 717), (0x33, 717)]
        .iter()
        .flat_map(|&(b, n)| std::iter::repeat_n(b, n))
        .collect();
    assert_eq!(seen, want);
    map.sync(SyncOp::POSTWRITE).unwrap();
    // Per packet: unload and map the held buffer again, no proof needed.
    map.reload(Direction::ToDevice).unwrap();
    let back = map.take().unwrap();
    assert!(!map.is_loaded() && map.buffer().is_none());
    assert_eq!(back[1].len(), 717);
}

#[test]
fn a_second_load_into_a_map_that_holds_a_buffer_gives_the_buffer_back() {
    let m = machine();
    let spec = TagSpec::new(4 * PAGE_SIZE, 4);
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let mut map = tag.create_owned_map::<DmaMemory<'_, _>>().unwrap();
    map.load(mem(&m, &spec, 1), Direction::ToDevice).ok().unwrap();
    let (e, again) = map.load(mem(&m, &spec, 2), Direction::ToDevice).err().unwrap();
    assert!(matches!(e, Error::BadState { .. }), "{e:?}");
    let mut b = [0u8; 1];
    again.read(0, &mut b).unwrap();
    assert_eq!(b, [2]);
}

#[test]
fn forgetting_an_owned_map_leaks_its_memory_with_the_mapping_never_frees_it() {
    let m = machine();
    let spec = TagSpec::new(4 * PAGE_SIZE, 4);
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let mut map = tag.create_owned_map::<DmaMemory<'_, _>>().unwrap();
    let buf = mem(&m, &spec, 7);
    let pa = buf.pa();
    map.load(buf, Direction::FromDevice).ok().unwrap();
    std::mem::forget(map);
    drop(tag);
    assert_eq!(m.page_kind(pa), PageKind::Dma, "the mapped page is never given back");
}

#[test]
fn device_regions_load_without_unsafe_in_the_driver_and_are_never_copied() {
    let m = machine();
    let spec = TagSpec::new(4 * PAGE_SIZE, 4);
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    // The bus code describes the peer's BAR once (its trust boundary) ...
    // SAFETY: an address range outside the model's RAM, standing for a peer's BAR.
    let bar = unsafe {
        DeviceRegion::new(
            PhysAddr::new(0x80_0000_0000),
            1 << 20,
            RegionKind::PeerBar { bus: Some(Iova::new(0x9000_0000)) },
        )
    }
    .unwrap();
    // ... and the driver loads slices of it with RAM, safely.
    let mut map = tag.create_owned_map::<(Part<'_, _>, busdma::front::RegionSlice)>().unwrap();
    let buf = (Part::new(mem(&m, &spec, 3), 0, 512).ok().unwrap(), bar.slice(0x1000, 0x800).unwrap());
    let segs = map.load(buf, Direction::FromDevice).ok().unwrap().to_vec();
    assert_eq!(segs.len(), 2);
    assert_eq!(segs[1].addr, Iova::new(0x9000_1000), "the peer is reached at its bus address");
    assert!(bar.slice(0, 2 << 20).is_err(), "a slice beyond the region is refused");
    // A bounce or cache maintenance would need a CPU mapping the region does not have.
    map.sync(SyncOp::PREREAD).unwrap();
    map.sync(SyncOp::POSTREAD).unwrap();
}

#[test]
fn a_heap_buffer_outside_the_direct_map_is_refused_and_comes_back_intact() {
    // The hosted model's direct map is its own RAM; the host process's heap is not in it, so
    // the load must fail at the translation (a kernel's heap in its direct map loads: the
    // QEMU suite's `heap buffer` check proves that path).
    let m = machine();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(4 * PAGE_SIZE, 4)).unwrap();
    let mut map = tag.create_owned_map::<busdma::front::HeapBuffer>().unwrap();
    let mut buf = busdma::front::HeapBuffer::new_zeroed(5000).unwrap();
    buf.bytes_mut()[4999] = 0x5a;
    let (e, mut back) = map.load(buf, Direction::ToDevice).err().unwrap();
    assert!(matches!(e, Error::NotDirectMapped { .. }), "{e:?}");
    assert!(!map.is_loaded());
    assert_eq!(back.bytes_mut()[4999], 0x5a);
}
