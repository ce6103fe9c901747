//! Pool buffers loaded in place (`busdma::premapped` theory 9, `busdma::front::pooled`): the
//! device reads and writes the owner's bytes at the slot's bus address with no copy and no
//! map request, a loaded buffer never goes back to the pool while loaded (nor when its map is
//! forgotten), a buffer of another pool is refused and handed back, a non-coherent tag's
//! syncs maintain the slot, and a segment the tag forbids leaves everything as before.

mod common;

use busdma::front::{Direction, SyncOp, Tag, TagSpec};
use busdma::pgtable::TablePool;
use busdma::premapped::{PoolConfig, Premapped, PremappedPool};
use busdma::quickmap::QuickMaps;
use busdma::{Error, PAGE_SIZE, Placement};
use common::ptdomain::{PtDomain, dev_read, dev_write};
use std::sync::atomic::Ordering;

/// The machine `$m`, its quick maps `$qm` and a page-table domain `$d` (over a table pool that
/// lives as long as they do), declared in the caller's scope.
macro_rules! rig {
    ($m:ident, $qm:ident, $d:ident) => {
        let $m = common::machine();
        let $qm = QuickMaps::for_platform(&$m);
        let tp = TablePool::new(&$m);
        let $d = PtDomain::new(&$m, &tp);
    };
}

fn packet(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

#[test]
fn a_pool_buffer_loads_in_place_with_no_copy_no_map_request_and_no_invalidation() {
    for outside_direct_map in [false, true] {
        rig!(m, qm, d);
        let mut cfg = PoolConfig::new(1500, 2);
        if outside_direct_map {
            cfg.placement = Placement::NotDirectMapped;
        }
        let pool = PremappedPool::new(&m, &d, &qm, cfg).unwrap();
        let (maps, invs) = (d.maps.load(Ordering::Relaxed), d.invalidations.load(Ordering::Relaxed));
        let slots = pool.stats().slots;
        let tag = Tag::new_root(&m, Premapped(&pool), TagSpec::new(PAGE_SIZE, 4)).unwrap();
        let mut pm = tag.create_pool_map().unwrap();
        for round in 0..3u8 {
            let data = packet(1500, round);
            let mut buf = pool.alloc_buf(1500).unwrap();
            assert_eq!(pool.stats().free_slots, slots - 1);
            buf.write(0, &data).unwrap();
            let segs = pm.load(buf, Direction::ToDevice).map_err(|(e, _)| e).unwrap().to_vec();
            pm.sync(SyncOp::PREWRITE).unwrap();
            // One segment, in the pool's window, reaching the bytes the owner wrote.
            assert_eq!(segs.len(), 1);
            let w = pool.window();
            assert!(segs[0].addr.raw() >= w.start().raw() && segs[0].addr.raw() + 1500 <= w.end().raw());
            assert_eq!(dev_read(&m, &d, segs[0].addr.raw(), 1500), data, "round {round}");
            pm.sync(SyncOp::POSTWRITE).unwrap();
            let buf = pm.take().unwrap();
            let mut back = vec![0u8; 1500];
            buf.read(0, &mut back).unwrap();
            assert_eq!(back, data);
            drop(buf);
            assert_eq!(pool.stats().free_slots, slots, "the buffer's drop gives its slot back");
        }
        let st = pool.stats();
        assert_eq!((st.loads, st.bytes_copied), (0, 0), "nothing copied: {st}");
        assert_eq!(d.maps.load(Ordering::Relaxed), maps, "no map request per load");
        assert_eq!(d.invalidations.load(Ordering::Relaxed), invs, "no invalidation per load");
    }
}

#[test]
fn what_the_device_writes_into_a_loaded_pool_buffer_its_owner_reads_after_postread() {
    rig!(m, qm, d);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(2048, 1)).unwrap();
    let tag = Tag::new_root(&m, Premapped(&pool), TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let mut pm = tag.create_pool_map().unwrap();
    let buf = pool.alloc_buf(2048).unwrap();
    let seg = pm.load(buf, Direction::FromDevice).map_err(|(e, _)| e).unwrap()[0];
    pm.sync(SyncOp::PREREAD).unwrap();
    let frame = packet(600, 9);
    dev_write(&m, &d, seg.addr.raw(), &frame);
    let mut got = vec![0u8; 600];
    assert!(matches!(pm.read(0, &mut got), Err(Error::BadState { .. })), "read before POSTREAD");
    pm.sync(SyncOp::POSTREAD).unwrap();
    pm.read(0, &mut got).unwrap();
    assert_eq!(got, frame);
    let buf = pm.take().unwrap();
    let mut got = vec![0u8; 600];
    buf.read(0, &mut got).unwrap();
    assert_eq!(got, frame);
}

#[test]
fn a_buffer_of_another_pool_is_refused_and_handed_back_whatever_its_domain() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let (d1, d2) = (PtDomain::new(&m, &tp), PtDomain::new(&m, &tp));
    let a = PremappedPool::new(&m, &d1, &qm, PoolConfig::new(PAGE_SIZE, 1)).unwrap();
    // Another domain, and another pool of the same domain: both have other bus addresses.
    let b = PremappedPool::new(&m, &d2, &qm, PoolConfig::new(PAGE_SIZE, 1)).unwrap();
    let c = PremappedPool::new(&m, &d1, &qm, PoolConfig::new(PAGE_SIZE, 1)).unwrap();
    for other in [&b, &c] {
        let tag = Tag::new_root(&m, Premapped(other), TagSpec::new(PAGE_SIZE, 1)).unwrap();
        let mut pm = tag.create_pool_map().unwrap();
        let mut buf = a.alloc_buf(100).unwrap();
        buf.write(0, b"kept").unwrap();
        let (e, buf) = pm.load(buf, Direction::ToDevice).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
        assert!(!pm.is_loaded() && pm.segments().is_empty() && pm.buffer().is_none());
        let mut got = [0u8; 4];
        buf.read(0, &mut got).unwrap();
        assert_eq!(&got, b"kept", "the buffer comes back whole");
    }
    assert_eq!(a.stats().free_slots, a.stats().slots, "the refused buffers went back to their pool");
}

#[test]
fn a_loaded_pool_buffer_never_goes_back_to_the_pool_before_its_map_gives_it_up() {
    rig!(m, qm, d);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 2)).unwrap();
    let slots = pool.stats().slots;
    let tag = Tag::new_root(&m, Premapped(&pool), TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let mut pm = tag.create_pool_map().unwrap();
    let buf = pool.alloc_buf(64).unwrap();
    let held = buf.slot();
    pm.load(buf, Direction::ToDevice).map_err(|(e, _)| e).unwrap();
    // Unloaded but still held: the slot stays the buffer's.
    pm.unload().unwrap();
    assert_eq!(pool.stats().free_slots, slots - 1);
    pm.reload(Direction::ToDevice).unwrap();
    // Every other slot, through buffers and copy loads alike: never the held one.
    let mut others = Vec::new();
    for _ in 0..slots - 1 {
        let b = pool.alloc_buf(64).unwrap();
        assert_ne!(b.slot(), held);
        others.push(b);
    }
    assert!(matches!(pool.alloc_buf(64), Err(Error::Exhausted { .. })));
    drop(others);
    let src = pool.alloc_buf(64).unwrap();
    let sg = [busdma::front::SgEntry { pa: src.pa(), len: 64, kind: busdma::front::MemKind::Page }];
    let mut copy_maps: Vec<_> = (0..slots - 2).map(|_| tag.create_map().unwrap()).collect();
    for map in &mut copy_maps {
        // SAFETY: a pool buffer's bytes, kept alive (`src`) until the maps are dropped below.
        map.load(&unsafe { busdma::front::SgList::new(&sg) }, Direction::ToDevice).unwrap();
        assert_ne!(map.state().slot(), Some(held));
    }
    drop(copy_maps);
    drop(src);
    assert_eq!(pool.stats().free_slots, slots - 1);
    // The map's drop unloads, then the buffer gives its slot back.
    drop(pm);
    assert_eq!(pool.stats().free_slots, slots);
}

#[test]
fn forgetting_a_loaded_pool_map_leaks_its_slot_and_no_later_buffer_gets_it() {
    rig!(m, qm, d);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 2)).unwrap();
    let slots = pool.stats().slots;
    let tag = Tag::new_root(&m, Premapped(&pool), TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let mut pm = tag.create_pool_map().unwrap();
    let buf = pool.alloc_buf(64).unwrap();
    let held = buf.slot();
    pm.load(buf, Direction::ToDevice).map_err(|(e, _)| e).unwrap();
    std::mem::forget(pm);
    assert_eq!(pool.stats().free_slots, slots - 1);
    let all: Vec<_> = (0..slots - 1).map(|_| pool.alloc_buf(64).unwrap()).collect();
    assert!(all.iter().all(|b| b.slot() != held));
    assert!(matches!(pool.alloc_buf(64), Err(Error::Exhausted { .. })));
    // A forgotten buffer leaks its slot the same way.
    drop(all);
    std::mem::forget(pool.alloc_buf(64).unwrap());
    assert_eq!(pool.stats().free_slots, slots - 2);
}

#[test]
fn a_non_coherent_tag_maintains_the_slots_bytes_at_each_sync_and_a_coherent_one_does_not() {
    rig!(m, qm, d);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 1)).unwrap();
    for coherent in [false, true] {
        let mut spec = TagSpec::new(PAGE_SIZE, 1);
        spec.flags.coherent = coherent;
        let tag = Tag::new_root(&m, Premapped(&pool), spec).unwrap();
        let mut pm = tag.create_pool_map().unwrap();
        let buf = pool.alloc_buf(512).unwrap();
        let pa = buf.pa();
        pm.load(buf, Direction::Bidirectional).map_err(|(e, _)| e).unwrap();
        // The map's runs are the slot's bytes: what the front end's syncs maintain.
        assert_eq!(pm.map().runs().len(), 1);
        assert_eq!((pm.map().runs()[0].pa, pm.map().runs()[0].len), (pa, 512));
        let want = u32::from(!coherent);
        assert_eq!(pm.sync(SyncOp::PREWRITE.union(SyncOp::PREREAD)).unwrap().maintained, want);
        assert_eq!(pm.sync(SyncOp::POSTREAD.union(SyncOp::POSTWRITE)).unwrap().maintained, want);
        assert_eq!(pool.stats().bytes_copied, 0);
    }
}

#[test]
fn a_segment_the_tag_forbids_or_a_buffer_beyond_its_size_is_refused_and_nothing_is_held() {
    rig!(m, qm, d);
    // One-page slots for 1500-byte loads: some buffers start inside their slot (theory 8).
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(1500, 4)).unwrap();
    let slots = pool.stats().slots;
    let mut spec = TagSpec::new(4096, 1);
    spec.alignment = 4096;
    let tag = Tag::new_root(&m, Premapped(&pool), spec).unwrap();
    let mut pm = tag.create_pool_map().unwrap();
    let bufs: Vec<_> = (0..slots).map(|_| pool.alloc_buf(1500).unwrap()).collect();
    let mut refused = 0;
    for buf in bufs {
        let inside = buf.pa().raw() % PAGE_SIZE != 0;
        match pm.load(buf, Direction::ToDevice) {
            Ok(_) => {
                assert!(!inside);
                drop(pm.take().unwrap());
            }
            Err((e, buf)) => {
                assert!(inside, "{e:?}");
                assert!(!pm.is_loaded() && pm.segments().is_empty() && pm.map().runs().is_empty());
                refused += 1;
                drop(buf);
            }
        }
    }
    assert!(refused > 0, "some buffer was placed inside its slot");
    let small = Tag::new_root(&m, Premapped(&pool), TagSpec::new(1024, 1)).unwrap();
    let mut pm = small.create_pool_map().unwrap();
    let (e, _buf) = pm.load(pool.alloc_buf(1500).unwrap(), Direction::ToDevice).unwrap_err();
    assert!(matches!(e, Error::BadSize { size: 1500, limit: 1024 }), "{e:?}");
    // A held buffer refuses a second one.
    let mut one = pool.alloc_buf(1000).unwrap();
    one.set_len(800).unwrap();
    assert_eq!(pm.load(one, Direction::ToDevice).map_err(|(e, _)| e).unwrap()[0].len, 800);
    let (e, _) = pm.load(pool.alloc_buf(10).unwrap(), Direction::ToDevice).unwrap_err();
    assert!(matches!(e, Error::BadState { .. }), "{e:?}");
    drop(pm);
    drop(_buf);
    assert_eq!(pool.stats().free_slots, slots);
}

#[test]
fn a_pool_buffers_copies_and_length_stay_within_its_capacity() {
    rig!(m, qm, d);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(1500, 1)).unwrap();
    assert!(matches!(pool.alloc_buf(0), Err(Error::ZeroSize)));
    assert!(matches!(pool.alloc_buf(PAGE_SIZE + 1), Err(Error::LimitExceeded { .. })));
    let mut buf = pool.alloc_buf(100).unwrap();
    assert!(matches!(buf.write(90, &[1; 11]), Err(Error::OutOfRange { .. })));
    assert!(matches!(buf.write(u64::MAX, &[1]), Err(Error::OutOfRange { .. } | Error::Overflow { .. })));
    assert!(matches!(buf.read(0, &mut [0; 101]), Err(Error::OutOfRange { .. })));
    assert!(matches!(buf.set_len(101), Err(Error::OutOfRange { addr: 101, limit: 100 })));
    assert!(matches!(buf.set_len(0), Err(Error::ZeroSize)));
    buf.write(90, &[7; 10]).unwrap();
    buf.set_len(40).unwrap();
    assert_eq!((buf.len(), buf.capacity()), (40, 100));
}

#[test]
fn a_pool_buffer_dropped_on_another_thread_goes_back_to_its_home_list() {
    rig!(m, qm, d);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 4)).unwrap();
    let slots = pool.stats().slots;
    let tag = Tag::new_root(&m, Premapped(&pool), TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let mut pm = tag.create_pool_map().unwrap();
    pm.load(pool.alloc_buf(64).unwrap(), Direction::ToDevice).map_err(|(e, _)| e).unwrap();
    let bufs: Vec<_> = (0..3).map(|_| pool.alloc_buf(64).unwrap()).collect();
    std::thread::scope(|s| {
        s.spawn(move || drop(bufs));
        // The loaded map moves to another thread and is dropped there.
        s.spawn(move || drop(pm));
    });
    assert_eq!(pool.stats().free_slots, slots);
}

#[test]
fn a_hybrid_tag_loads_a_pool_buffer_in_place_whatever_its_threshold_and_refuses_another_pools() {
    rig!(m, qm, d);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 2)).unwrap();
    let other = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 1)).unwrap();
    let slots = pool.stats().slots;
    // Threshold 0: the hybrid maps every client buffer.
    let h = busdma::premapped::Hybrid::with_threshold(&pool, busdma::front::IommuPerMap(&d), 0);
    let tag = Tag::new_root(&m, h, TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let mut pm = tag.create_pool_map().unwrap();
    let maps = d.maps.load(Ordering::Relaxed);
    let data = packet(700, 3);
    let mut buf = pool.alloc_buf(700).unwrap();
    buf.write(0, &data).unwrap();
    let seg = pm.load(buf, Direction::ToDevice).map_err(|(e, _)| e).unwrap()[0];
    pm.sync(SyncOp::PREWRITE).unwrap();
    assert!(pm.map().state().copied(), "the pool's path");
    assert!(seg.addr.raw() >= pool.window().start().raw() && seg.addr.raw() < pool.window().end().raw());
    assert_eq!(dev_read(&m, &d, seg.addr.raw(), 700), data);
    assert_eq!(d.maps.load(Ordering::Relaxed), maps, "no map request");
    pm.sync(SyncOp::POSTWRITE).unwrap();
    pm.unload().unwrap();
    assert_eq!(pool.stats().free_slots, slots - 1, "the unload keeps the buffer's slot");
    assert_eq!((pool.stats().loads, pool.stats().bytes_copied), (0, 0));
    // A buffer of another pool is refused here too.
    let mut pm2 = tag.create_pool_map().unwrap();
    let (e, _b) = pm2.load(other.alloc_buf(64).unwrap(), Direction::ToDevice).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    drop(pm.take().unwrap());
    assert_eq!(pool.stats().free_slots, slots);
}
