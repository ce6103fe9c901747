//! The DMA-API debug checker: each violation committed, and seen reported with its arguments.

mod common;

use busdma::front::debug::Violation;
use busdma::front::*;
use busdma::{Error, PhysAddr};
use busdma_model::FrameRequest;
use common::machine;

#[test]
fn a_cpu_read_after_preread_without_postread_is_reported() {
    let m = machine();
    let pa = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(1 << 16, 4)).unwrap();
    let log = tag.debug_log();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { RawSegment::new(pa, 128) }, Direction::FromDevice).unwrap();
    map.sync(SyncOp::PREREAD).unwrap();
    let mut b = [0u8; 16];
    assert!(map.read(8, &mut b).is_err());
    assert_eq!(
        log.take(),
        [Violation::CpuReadWithoutPostRead {
            tag: tag.id(),
            map: map.id(),
            dir: Direction::FromDevice,
            offset: 8,
            len: 16,
            bus: pa.raw()
        }]
    );
    map.sync(SyncOp::POSTREAD).unwrap();
    map.read(8, &mut b).unwrap();
    assert!(log.take().is_empty());
}

#[test]
fn a_sync_in_the_wrong_direction_is_reported() {
    let m = machine();
    let pa = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(1 << 16, 4)).unwrap();
    let log = tag.debug_log();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { RawSegment::new(pa, 128) }, Direction::ToDevice).unwrap();
    assert!(map.sync(SyncOp::POSTREAD).is_err());
    assert_eq!(
        log.take(),
        [Violation::SyncWrongDirection {
            tag: tag.id(),
            map: map.id(),
            dir: Direction::ToDevice,
            op: SyncOp::POSTREAD,
            bus: pa.raw()
        }]
    );
}

#[test]
fn a_double_unload_is_reported() {
    let m = machine();
    let pa = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(1 << 16, 4)).unwrap();
    let log = tag.debug_log();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { RawSegment::new(pa, 128) }, Direction::ToDevice).unwrap();
    map.unload().unwrap();
    assert!(matches!(map.unload(), Err(Error::BadState { .. })));
    assert_eq!(log.take(), [Violation::DoubleUnload { tag: tag.id(), map: map.id() }]);
}

#[test]
fn an_unload_or_sync_through_the_wrong_tag_is_reported() {
    let m = machine();
    let pa = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(1 << 16, 4)).unwrap();
    let other = tag.child(TagSpec::new(1 << 12, 1)).unwrap();
    let log = tag.debug_log();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    tag.load(&mut map, &unsafe { RawSegment::new(pa, 128) }, Direction::ToDevice).unwrap();
    assert!(other.sync(&mut map, SyncOp::PREWRITE).is_err());
    assert!(other.unload(&mut map).is_err());
    let (e, map) = other.destroy(map).err().unwrap();
    assert!(matches!(e, Error::InvalidArgument { .. }));
    let (t, o, id) = (tag.id(), other.id(), map.id());
    assert_eq!(
        log.take(),
        [
            Violation::WrongTag { call: "sync", used: o, owner: t, map: id },
            Violation::WrongTag { call: "unload", used: o, owner: t, map: id },
            Violation::WrongTag { call: "destroy", used: o, owner: t, map: id },
        ]
    );
    tag.destroy(map).ok().unwrap();
}

#[test]
fn maps_still_loaded_at_domain_teardown_are_reported() {
    let m = machine();
    let pa = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(1 << 16, 4)).unwrap();
    let log = tag.debug_log();
    let tag_id = tag.id();
    let map_id = {
        let mut map = tag.create_map().unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { RawSegment::new(PhysAddr::new(pa.raw() + 64), 128) }, Direction::ToDevice)
            .unwrap();
        let id = map.id();
        std::mem::forget(map); // a driver leaks a loaded map
        id
    };
    assert!(log.take().is_empty());
    tag.debug_teardown();
    assert_eq!(
        log.take(),
        [Violation::LoadedAtTeardown { tag: tag_id, map: map_id, bus: pa.raw() + 64, len: 128 }]
    );
    drop(tag);
    assert!(log.take().is_empty(), "the forgotten map keeps the tag alive: no teardown happens");
}
