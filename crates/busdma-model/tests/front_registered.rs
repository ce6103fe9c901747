//! Loads of pre-registered user buffers through the front end (issue 7): the device sees the
//! user's bytes, nothing is pinned per DMA, `mapped` counts the load until unload.

use std::sync::atomic::Ordering;

use busdma::front::{Direct, Direction, SyncOp, Tag, TagSpec, load_registered};
use busdma::pin::Registry;
use busdma::{Error, PAGE_SIZE, PhysAddr, Platform, UserVa};
use busdma_model::uspace::UserSpace;
use busdma_model::{HostPlatform, MachineConfig};

const UA: UserVa = UserVa::new(0x5000_0000);

#[test]
fn a_registered_buffer_load_pins_nothing_and_counts_mapped_until_unload() {
    let m = HostPlatform::new(MachineConfig::with_ram(64 << 20)).unwrap();
    let us = UserSpace::new(&m);
    us.map(UA, 16 * PAGE_SIZE).unwrap();
    // Scatter the frames so the load has several runs.
    for p in (0..16).step_by(2) {
        us.migrate(UserVa::new(UA.raw() + p * PAGE_SIZE)).unwrap();
    }
    let data: Vec<u8> = (0..5 * PAGE_SIZE as usize).map(|i| (i * 13) as u8).collect();
    let start = UserVa::new(UA.raw() + PAGE_SIZE + 0x40);
    us.write(start, &data).unwrap();
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 16 * PAGE_SIZE).unwrap();
    let pins = us.counters().pins.load(Ordering::Relaxed);

    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 16)).unwrap();
    let mut map = tag.create_map().unwrap();
    let mut load = load_registered(&mut map, &reg, start, data.len() as u64, Direction::ToDevice).unwrap();
    load.sync(SyncOp::PREWRITE).unwrap();
    // The device (direct: bus = physical) reads exactly the user's bytes.
    let mut seen = Vec::new();
    for s in load.segments() {
        let mut b = vec![0u8; s.len as usize];
        m.read_phys(PhysAddr::new(s.addr.raw()), &mut b).unwrap();
        seen.extend(b);
    }
    assert_eq!(seen, data);
    assert!(load.segments().len() > 1);
    assert_eq!(us.counters().pins.load(Ordering::Relaxed), pins, "nothing pinned per DMA");
    assert_eq!(load.buffer().region().mapped(), 2);
    // While loaded, the last unregistration is refused and the memory stays pinned.
    assert!(matches!(reg.unregister(UA, 16 * PAGE_SIZE), Err(Error::Busy { count: 1, .. })));
    load.sync(SyncOp::POSTWRITE).unwrap();
    load.unload().unwrap();
    assert!(!map.is_loaded());
    assert_eq!(reg.read().lookup(UA, 1).unwrap().mapped(), 1);

    // Dropping the load unloads and releases the count too.
    let load = load_registered(&mut map, &reg, UA, PAGE_SIZE, Direction::FromDevice).unwrap();
    drop(load);
    assert!(!map.is_loaded());
    assert_eq!(reg.read().lookup(UA, 1).unwrap().mapped(), 1);
    reg.unregister(UA, 16 * PAGE_SIZE).unwrap();
    reg.synchronize().unwrap();
    assert_eq!(us.pinned_pages(), 0);
}

#[test]
fn a_failed_registered_load_leaves_mapped_unchanged() {
    let m = HostPlatform::new(MachineConfig::with_ram(64 << 20)).unwrap();
    let us = UserSpace::new(&m);
    us.map(UA, 16 * PAGE_SIZE).unwrap();
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 16 * PAGE_SIZE).unwrap();
    // The tag allows 2 pages per load: a 4-page buffer is refused by the map.
    let tag = Tag::new_root(&m, Direct, TagSpec::new(2 * PAGE_SIZE, 16)).unwrap();
    let mut map = tag.create_map().unwrap();
    let err = load_registered(&mut map, &reg, UA, 4 * PAGE_SIZE, Direction::ToDevice).err();
    assert!(matches!(err, Some(Error::BadSize { .. })), "{err:?}");
    assert_eq!(reg.read().lookup(UA, 1).unwrap().mapped(), 1);
    // Not registered at all, or straddling the region's end.
    assert!(matches!(
        load_registered(
            &mut map,
            &reg,
            UserVa::new(UA.raw() + 15 * PAGE_SIZE),
            2 * PAGE_SIZE,
            Direction::ToDevice
        )
        .err(),
        Some(Error::NotMapped { .. })
    ));
    assert!(!map.is_loaded());
    reg.unregister(UA, 16 * PAGE_SIZE).unwrap();
    assert!(matches!(
        load_registered(&mut map, &reg, UA, 1, Direction::ToDevice).err(),
        Some(Error::NotMapped { .. })
    ));
}

#[test]
fn an_owned_map_holds_a_registered_part_so_unregistration_is_ebusy_until_it_is_taken_back() {
    let m = HostPlatform::new(MachineConfig::with_ram(64 << 20)).unwrap();
    let us = UserSpace::new(&m);
    us.map(UA, 16 * PAGE_SIZE).unwrap();
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 16 * PAGE_SIZE).unwrap();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 16)).unwrap();
    let mut map = tag.create_owned_map().unwrap();
    // Register once, map parts again and again: no unsafe, no pin per load.
    for part in 0..4u64 {
        let buf = reg.load(UserVa::new(UA.raw() + part * 4 * PAGE_SIZE), 4 * PAGE_SIZE).unwrap();
        us.write(buf.ua(), &[part as u8; 64]).unwrap();
        let segs = map.load(buf, Direction::ToDevice).ok().unwrap().to_vec();
        let mut b = [0u8; 64];
        m.read_phys(PhysAddr::new(segs[0].addr.raw()), &mut b).unwrap();
        assert_eq!(b, [part as u8; 64]);
        assert!(matches!(reg.unregister(UA, 16 * PAGE_SIZE), Err(Error::Busy { count: 1, .. })));
        drop(map.take().unwrap());
    }
    reg.unregister(UA, 16 * PAGE_SIZE).unwrap();
    reg.synchronize().unwrap();
    assert_eq!(us.pinned_pages(), 0);
}
