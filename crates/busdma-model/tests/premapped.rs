//! The pre-mapped pool (`busdma::premapped`): data round-trips through the pool, the device
//! reaches the pool's pages and nothing else, no map or invalidation per I/O, the counters
//! match a reference model, untrusted devices see their buffer and zeros, exhaustion is an
//! error or a deferral, a ring's loads spread over the lines of their slots within the tag's
//! rules, and the hybrid copies below its threshold and maps above it.

mod common;

use busdma::front::{
    Deferrable, Direction, IommuPerMap, MemKind, SgEntry, SgList, Strategy as DmaStrategy, SyncOp, Tag,
    TagSpec,
};
use busdma::pgtable::TablePool;
use busdma::premapped::{Hybrid, PoolConfig, Premapped, PremappedPool};
use busdma::quickmap::QuickMaps;
use busdma::{Error, PAGE_SIZE, PhysAddr, Placement, Platform};
use busdma_model::{FrameRequest, HostPlatform};
use common::ptdomain::{PtDomain, dev_read, dev_write};
use proptest::prelude::*;
use std::sync::atomic::Ordering;

/// The PRE sync of a load in `dir`.
fn pre(dir: Direction) -> SyncOp {
    match dir {
        Direction::ToDevice => SyncOp::PREWRITE,
        Direction::FromDevice => SyncOp::PREREAD,
        Direction::Bidirectional => SyncOp::PREWRITE.union(SyncOp::PREREAD),
    }
}

/// The POST sync of a load in `dir`.
fn post(dir: Direction) -> SyncOp {
    match dir {
        Direction::ToDevice => SyncOp::POSTWRITE,
        Direction::FromDevice => SyncOp::POSTREAD,
        Direction::Bidirectional => SyncOp::POSTWRITE.union(SyncOp::POSTREAD),
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Load map `k` with fragments `(offset, len)`, one per client page, in direction `dir`,
    /// then its PRE sync.
    Load { k: usize, frags: Vec<(u64, u64)>, dir: u8, seed: u8 },
    /// The device writes `len` bytes of `byte` at `off` of map `k`'s segment, if it may.
    DeviceWrite { k: usize, off: u64, len: u64, byte: u8 },
    /// Its POST sync, check the client's bytes, unload.
    Finish { k: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, proptest::collection::vec((0..3000u64, 1..1200u64), 1..4), 0..3u8, any::<u8>())
            .prop_map(|(k, frags, dir, seed)| Op::Load { k, frags, dir, seed }),
        (0..3usize, 0..4000u64, 1..400u64, any::<u8>()).prop_map(|(k, off, len, byte)| Op::DeviceWrite {
            k,
            off,
            len,
            byte
        }),
        (0..3usize).prop_map(|k| Op::Finish { k }),
    ]
}

/// The reference model of one map: what the client should hold at the end.
#[derive(Clone, Debug, Default)]
struct ModelMap {
    /// Direction, the bytes the client should hold, and which of them are defined: a trusted
    /// receive buffer's bytes the device did not write are whatever the slot held (as for
    /// bounce pages); everything else is defined.
    loaded: Option<(Direction, Vec<u8>, Vec<bool>)>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn data_round_trips_through_the_pool_the_device_reaches_only_the_pool_and_the_counters_match_a_model(
        ops in proptest::collection::vec(op(), 1..40),
        untrusted in any::<bool>(),
        outside_direct_map in any::<bool>(),
    ) {
        let m = common::machine();
        let qm = QuickMaps::for_platform(&m);
        let tp = TablePool::new(&m);
        let d = PtDomain::new(&m, &tp);
        // Four-page slots configured for loads of three pages and a byte: every other slot's
        // loads start near its end (theory 8), the others at its start.
        let mut cfg = PoolConfig::new(3 * PAGE_SIZE + 1, 2);
        if outside_direct_map {
            cfg.placement = Placement::NotDirectMapped;
        }
        let pool = PremappedPool::new(&m, &d, &qm, cfg).unwrap();
        let setup_maps = d.maps.load(Ordering::Relaxed);
        let slots = pool.stats().slots;
        prop_assert_eq!(setup_maps, slots);
        let window = pool.window();
        let slot_pas: Vec<PhysAddr> = (0..slots as usize).map(|i| pool.slot_pa(i).unwrap()).collect();
        let mut spec = TagSpec::new(4 * PAGE_SIZE, 4);
        spec.flags.untrusted = untrusted;
        let tag = Tag::new_root(&m, Premapped(&pool), spec).unwrap();
        let mut maps: Vec<_> = (0..3).map(|_| tag.create_map().unwrap()).collect();
        // Each map's client: three pages (one per fragment), the last outside the direct map.
        let client: Vec<Vec<PhysAddr>> = (0..3)
            .map(|_| (0..3).map(|_| m.frames().alloc(FrameRequest::pages(1)).unwrap()).collect())
            .collect();
        let mut model = vec![ModelMap::default(); 3];
        let (mut loads, mut copied) = (0u64, 0u64);
        let mut entries: Vec<Vec<SgEntry>> = vec![Vec::new(); 3];
        for op in ops {
            match op {
                Op::Load { k, frags, dir, seed } => {
                    if model[k].loaded.is_some() {
                        maps[k].unload().unwrap();
                        model[k].loaded = None;
                    }
                    let dir = [Direction::ToDevice, Direction::FromDevice, Direction::Bidirectional][dir as usize];
                    let mut bytes = Vec::new();
                    entries[k].clear();
                    for (f, &(off, len)) in frags.iter().enumerate() {
                        let len = len.min(PAGE_SIZE - off);
                        let pa = PhysAddr::new(client[k][f].raw() + off);
                        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (f as u8)).collect();
                        m.write_phys(pa, &data).unwrap();
                        bytes.extend_from_slice(&data);
                        entries[k].push(SgEntry { pa, len, kind: MemKind::Page });
                    }
                    // SAFETY: the test's own frames, kept until the maps are dropped.
                    maps[k].load(&unsafe { SgList::new(&entries[k]) }, dir).unwrap();
                    maps[k].sync(pre(dir)).unwrap();
                    loads += 1;
                    let total = bytes.len() as u64;
                    if untrusted {
                        copied += total; // the copy at load (theory 5)
                    }
                    if dir.device_reads() || untrusted {
                        copied += total;
                    }
                    let segs = maps[k].segments();
                    prop_assert_eq!(segs.len(), 1);
                    let s = segs[0];
                    prop_assert_eq!(s.len, total);
                    // The device was given the pool's IOVA, whose pages are the pool's.
                    prop_assert!(s.addr.raw() >= window.start().raw() && s.addr.raw() + s.len <= window.end().raw());
                    let slot = ((s.addr.raw() - window.start().raw()) / pool.slot_bytes()) as usize;
                    for pg in (s.addr.raw() & !(PAGE_SIZE - 1)..s.addr.raw() + s.len).step_by(PAGE_SIZE as usize) {
                        let pa = d.translate(pg).unwrap().raw();
                        let base = slot_pas[slot].raw();
                        prop_assert!(pa >= base && pa < base + pool.slot_bytes(), "{:#x} outside its slot", pa);
                    }
                    if dir.device_reads() || untrusted {
                        prop_assert_eq!(dev_read(&m, &d, s.addr.raw(), s.len), bytes.clone());
                    }
                    if untrusted {
                        // Zeros before the buffer from the start of the slot, and past it to
                        // the end of the slot.
                        let at = (s.addr.raw() - window.start().raw()) % pool.slot_bytes();
                        let rest = pool.slot_bytes() - at - s.len;
                        prop_assert!(dev_read(&m, &d, s.addr.raw() - at, at).iter().all(|&b| b == 0));
                        prop_assert!(dev_read(&m, &d, s.addr.raw() + s.len, rest).iter().all(|&b| b == 0));
                    }
                    let defined = vec![dir.device_reads() || untrusted; bytes.len()];
                    model[k].loaded = Some((dir, bytes, defined));
                }
                Op::DeviceWrite { k, off, len, byte } => {
                    let Some((dir, bytes, defined)) = model[k].loaded.as_mut() else { continue };
                    if !dir.device_writes() || bytes.is_empty() {
                        continue;
                    }
                    let off = off % bytes.len() as u64;
                    let len = len.min(bytes.len() as u64 - off);
                    let s = maps[k].segments()[0];
                    dev_write(&m, &d, s.addr.raw() + off, &vec![byte; len as usize]);
                    bytes[off as usize..(off + len) as usize].fill(byte);
                    defined[off as usize..(off + len) as usize].fill(true);
                }
                Op::Finish { k } => {
                    let Some((dir, bytes, defined)) = model[k].loaded.take() else { continue };
                    maps[k].sync(post(dir)).unwrap();
                    if dir.device_writes() {
                        copied += bytes.len() as u64;
                    }
                    // The client holds what the model says: its own bytes, or the device's.
                    let mut got = Vec::new();
                    for e in &entries[k] {
                        let mut b = vec![0u8; e.len as usize];
                        m.read_phys(e.pa, &mut b).unwrap();
                        got.extend_from_slice(&b);
                    }
                    for (i, ((g, w), d)) in got.iter().zip(&bytes).zip(&defined).enumerate() {
                        prop_assert!(!d || g == w, "byte {} of map {}: {:#x}, model {:#x}", i, k, g, w);
                    }
                    maps[k].unload().unwrap();
                }
            }
            let st = pool.stats();
            let live = model.iter().filter(|x| x.loaded.is_some()).count() as u64;
            prop_assert_eq!(st.free_slots, slots - live);
            prop_assert_eq!((st.loads, st.bytes_copied), (loads, copied));
            // Nothing mapped, unmapped or invalidated per I/O; the window is all that is live.
            prop_assert_eq!(d.maps.load(Ordering::Relaxed), setup_maps);
            prop_assert_eq!(d.invalidations.load(Ordering::Relaxed), 0);
            prop_assert_eq!(d.live_iova_bytes(), window.len());
        }
        drop(maps);
        drop(tag);
        drop(pool);
        // The pool unmapped its window with one invalidation and gave it back.
        prop_assert_eq!((d.invalidations.load(Ordering::Relaxed), d.live_iova_bytes()), (1, 0));
        prop_assert!(d.translate(window.start().raw()).is_none());
    }
}

#[test]
fn an_untrusted_device_finds_only_its_buffer_and_zeros_in_a_slot_it_left_junk_in() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 1)).unwrap();
    let mut spec = TagSpec::new(PAGE_SIZE, 1);
    spec.flags.untrusted = true;
    let tag = Tag::new_root(&m, Premapped(&pool), spec).unwrap();
    let mut map = tag.create_map().unwrap();
    let page = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    m.fill_phys(page, PAGE_SIZE, 0x5e).unwrap(); // secrets sharing the buffer's page
    let buf = PhysAddr::new(page.raw() + 1000);
    let data: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(7) | 1).collect();
    m.write_phys(buf, &data).unwrap();
    let sg = [SgEntry { pa: buf, len: 100, kind: MemKind::Page }];
    for round in 0..3 {
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { SgList::new(&sg) }, Direction::Bidirectional).unwrap();
        map.sync(SyncOp::PREWRITE.union(SyncOp::PREREAD)).unwrap();
        let seg = map.segments()[0];
        let slot_start = seg.addr.raw() & !(PAGE_SIZE - 1);
        // Everything the device can read in the slot: the buffer, then zeros.
        let whole = dev_read(&m, &d, slot_start, PAGE_SIZE);
        let off = (seg.addr.raw() - slot_start) as usize;
        assert_eq!(&whole[off..off + 100], &data[..], "round {round}");
        assert!(
            whole[..off].iter().chain(&whole[off + 100..]).all(|&b| b == 0),
            "round {round}: the device saw more than the buffer and zeros"
        );
        // The device writes 10 bytes and stops short: the client keeps its other 90.
        dev_write(&m, &d, seg.addr.raw(), b"0123456789");
        // And leaves junk in the rest of its slot for the next load to find (it must not).
        dev_write(&m, &d, seg.addr.raw() + 100, &[0xaa; 500]);
        dev_write(&m, &d, slot_start + PAGE_SIZE - 16, &[0xab; 16]);
        map.sync(SyncOp::POSTREAD.union(SyncOp::POSTWRITE)).unwrap();
        let mut got = vec![0u8; 100];
        m.read_phys(buf, &mut got).unwrap();
        assert_eq!(&got[..10], b"0123456789");
        assert_eq!(&got[10..], &data[10..]);
        m.write_phys(buf, &data).unwrap();
        map.unload().unwrap();
        // The idle slot keeps nothing of the finished I/O.
        assert!(dev_read(&m, &d, seg.addr.raw(), 100).iter().all(|&b| b == 0), "round {round}");
    }
}

/// Loads `n` maps of `tag` with `len` bytes of `page` each; the segments.
fn load_ring<'p, S: DmaStrategy<HostPlatform>>(
    tag: &Tag<'p, HostPlatform, S>,
    page: PhysAddr,
    len: u64,
    n: usize,
) -> (Vec<busdma::front::DmaMap<'p, HostPlatform, S>>, Vec<busdma::front::Segment>) {
    let sg = [SgEntry { pa: page, len, kind: MemKind::Page }];
    let mut maps: Vec<_> = (0..n).map(|_| tag.create_map().unwrap()).collect();
    let mut segs = Vec::new();
    for map in &mut maps {
        // SAFETY: memory the caller allocated and keeps until the maps are dropped.
        map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap();
        map.sync(SyncOp::PREWRITE).unwrap();
        assert_eq!(map.segments().len(), 1);
        segs.push(map.segments()[0]);
    }
    (maps, segs)
}

#[test]
fn a_ring_of_packets_spreads_over_the_lines_of_its_slots_pages() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    // Configured for 1500-byte packets: one-page slots, three places in a page.
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(1500, 6)).unwrap();
    let tag = Tag::new_root(&m, Premapped(&pool), TagSpec::new(1500, 1)).unwrap();
    let page = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let data: Vec<u8> = (0..1500u32).map(|i| (i * 7 % 253) as u8).collect();
    m.write_phys(page, &data).unwrap();
    let (maps, segs) = load_ring(&tag, page, 1500, 6);
    let w = pool.window();
    let mut places = Vec::new();
    for s in &segs {
        let at = (s.addr.raw() - w.start().raw()) % pool.slot_bytes();
        // Within its slot, on a 128-byte step, and the device reads the packet there.
        assert!(at + s.len <= pool.slot_bytes() && at % 128 == 0, "{at:#x}");
        assert_eq!(dev_read(&m, &d, s.addr.raw(), s.len), data);
        places.push(at);
    }
    places.sort_unstable();
    places.dedup();
    // Three places whose 24 lines cover the page's 64 (0, 1280 and 2560 bytes in).
    assert_eq!(places, [0, 1280, 2560]);
    // Another length in the same slot: the largest step that fits, the same place each time.
    drop(maps);
    let (_maps, mut again) = load_ring(&tag, page, 1500, 6);
    let mut before = segs.clone();
    before.sort_unstable_by_key(|s| s.addr);
    again.sort_unstable_by_key(|s| s.addr);
    assert_eq!(again, before, "the same slot and length give the same bus address");
    let (_short, short) = load_ring(&tag, page, 64, 1);
    assert!(short[0].addr.raw() % PAGE_SIZE < PAGE_SIZE - 64);
}

#[test]
fn a_packets_place_in_its_slot_keeps_the_tags_alignment_and_boundary() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(1500, 6)).unwrap();
    let page = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    // Aligned to 2 KiB: the places 0, 1280, 2560 become 0, 0, 2048.
    let mut aligned = TagSpec::new(1500, 1);
    aligned.alignment = 2048;
    aligned.max_segment_size = 2048;
    let tag = Tag::new_root(&m, Premapped(&pool), aligned).unwrap();
    let (maps, segs) = load_ring(&tag, page, 1500, 6);
    assert!(segs.iter().all(|s| s.addr.raw() % 2048 == 0), "{segs:?}");
    assert!(segs.iter().any(|s| s.addr.raw() % PAGE_SIZE == 2048), "{segs:?}");
    drop(maps);
    // No segment may cross a 2 KiB boundary, one segment a load: a place whose packet would
    // cross one (1280) falls back to the slot's start.
    let mut bounded = TagSpec::new(1500, 1);
    bounded.boundary = 2048;
    let tag = Tag::new_root(&m, Premapped(&pool), bounded).unwrap();
    let (_maps, segs) = load_ring(&tag, page, 1500, 6);
    for s in &segs {
        assert_eq!(s.addr.raw() / 2048, (s.addr.raw() + s.len - 1) / 2048, "{s:?}");
    }
    assert!(segs.iter().any(|s| s.addr.raw() % PAGE_SIZE == 2560), "{segs:?}");
}

#[test]
fn an_untrusted_device_finds_zeros_before_a_packet_placed_inside_its_slot() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(1500, 3)).unwrap();
    let mut spec = TagSpec::new(1500, 1);
    spec.flags.untrusted = true;
    let tag = Tag::new_root(&m, Premapped(&pool), spec).unwrap();
    let page = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let data: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8 | 1).collect();
    m.write_phys(page, &data).unwrap();
    let (mut maps, segs) = load_ring(&tag, page, 1500, 3);
    let k = segs.iter().position(|s| s.addr.raw() % PAGE_SIZE != 0).expect("a packet placed inside its slot");
    let slot_start = segs[k].addr.raw() & !(PAGE_SIZE - 1);
    // The device fills all of the slot with junk, before the packet too, and the I/O ends.
    dev_write(&m, &d, slot_start, &vec![0xee; PAGE_SIZE as usize]);
    maps[k].sync(SyncOp::POSTWRITE).unwrap();
    maps[k].unload().unwrap();
    let sg = [SgEntry { pa: page, len: 1500, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and keeps until the maps are dropped.
    maps[k].load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap();
    let s = maps[k].segments()[0];
    assert_eq!(s, segs[k], "the same slot, the same place");
    let whole = dev_read(&m, &d, slot_start, PAGE_SIZE);
    let at = (s.addr.raw() - slot_start) as usize;
    assert_eq!(&whole[at..at + 1500], &data[..]);
    assert!(
        whole[..at].iter().chain(&whole[at + 1500..]).all(|&b| b == 0),
        "the device saw more than the packet and zeros"
    );
}

#[test]
fn an_exhausted_pool_refuses_a_no_wait_load_with_the_slot_size_and_defers_a_may_wait_one() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 1)).unwrap();
    let slots = pool.stats().slots as usize;
    let mut spec = TagSpec::new(PAGE_SIZE, 1);
    spec.flags.may_wait = true;
    let tag = Tag::new_root(&m, Premapped(&pool), spec).unwrap();
    let page = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    let sg = [SgEntry { pa: page, len: 64, kind: MemKind::Page }];
    let mut held: Vec<_> = (0..slots).map(|_| tag.create_map().unwrap()).collect();
    for map in &mut held {
        // SAFETY: memory the test allocated and keeps until the maps are dropped.
        map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap();
    }
    let mut extra = tag.create_map().unwrap();
    // SAFETY: as above.
    let e = extra.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap_err();
    assert_eq!(e, Error::Exhausted { size: PAGE_SIZE, limit: pool.window().end().raw() });
    assert_eq!((pool.stats().free_slots, pool.stats().exhausted), (0, 1));
    // SAFETY: as above.
    let pending = match extra.load_or_defer(
        &unsafe { SgList::new(&sg) },
        Direction::ToDevice,
        Box::new(|r| assert!(r.is_ok())),
    ) {
        Ok(Deferrable::Deferred(p)) => p,
        other => panic!("expected a deferral, got loaded: {}", matches!(other, Ok(Deferrable::Loaded(_)))),
    };
    assert!(!pending.is_done());
    held[0].unload().unwrap();
    let done =
        pending.try_finish().unwrap_or_else(|_| panic!("the unload's slot completes the deferred load"));
    let s = done.segments()[0];
    assert!(s.addr.raw() >= pool.window().start().raw() && s.addr.raw() < pool.window().end().raw());
}

#[test]
fn the_hybrid_copies_below_its_threshold_and_maps_at_or_above_it() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(4 * PAGE_SIZE, 1)).unwrap();
    let maps0 = d.maps.load(Ordering::Relaxed);
    let h = Hybrid::with_threshold(&pool, IommuPerMap(&d), 1000);
    assert_eq!((h.threshold(), h.calibration()), (1000, None));
    let tag = Tag::new_root(&m, h, TagSpec::new(8 * PAGE_SIZE, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    let pages = m.frames().alloc(FrameRequest::pages(8)).unwrap();
    let w = pool.window();
    let inside = |a: u64| a >= w.start().raw() && a < w.end().raw();
    for (len, copied) in [(999u64, true), (1000, false), (5 * PAGE_SIZE, false), (1, true)] {
        let sg = [SgEntry { pa: pages, len, kind: MemKind::Page }];
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap();
        map.sync(SyncOp::PREWRITE).unwrap();
        let s = map.segments()[0];
        assert_eq!(inside(s.addr.raw()), copied, "{len} bytes");
        let new_maps = d.maps.load(Ordering::Relaxed) - maps0;
        let mut want = vec![0u8; len as usize];
        m.read_phys(pages, &mut want).unwrap();
        assert_eq!(dev_read(&m, &d, s.addr.raw(), len), want, "{len} bytes");
        map.unload().unwrap();
        let _ = new_maps;
    }
    // Two mapped loads: two unmaps (invalidations); the copies none.
    assert_eq!(d.invalidations.load(Ordering::Relaxed), 2);
    assert_eq!(pool.stats().loads, 2);
}

#[test]
fn the_hybrid_calibration_keeps_its_figures_and_its_threshold_follows_them() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(16 * PAGE_SIZE, 1)).unwrap();
    let spec = TagSpec::new(16 * PAGE_SIZE, 4);
    let h = Hybrid::calibrated(&pool, IommuPerMap(&d), &spec).unwrap();
    let c = *h.calibration().unwrap();
    assert_eq!((c.small_bytes, c.large_bytes, h.threshold()), (512, 16 * PAGE_SIZE, c.threshold));
    // Nothing of the calibration is counted as I/O.
    let st = pool.stats();
    assert_eq!((st.loads, st.bytes_copied, st.exhausted, st.steals), (0, 0, 0, 0));
    assert!(c.copy_small_ns > 0.0 && c.copy_large_ns > 0.0 && c.map_page_ns > 0.0 && c.map_large_ns > 0.0);
    assert!(c.threshold >= 64 && c.threshold <= 16 * PAGE_SIZE + 1, "{c}");
    assert!(c.to_string().contains(&format!("threshold {} B", c.threshold)));
    // The calibration gave back its slots and the map path's IOVA.
    assert_eq!(pool.stats().free_slots, pool.stats().slots);
    assert_eq!(d.live_iova_bytes(), pool.window().len());
    // The driver can override it.
    let h = h.set_threshold(4096);
    assert_eq!((h.threshold(), h.calibration().map(|c| c.threshold)), (4096, Some(c.threshold)));
    assert_eq!(
        <Hybrid<'_, '_, HostPlatform, &PtDomain<'_>, IommuPerMap<&PtDomain<'_>>> as DmaStrategy<
            HostPlatform,
        >>::NAME,
        "hybrid"
    );
}

#[test]
fn a_premapped_tag_larger_than_a_slot_or_out_of_the_pools_reach_is_refused() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 1)).unwrap();
    assert!(matches!(
        Tag::new_root(&m, Premapped(&pool), TagSpec::new(2 * PAGE_SIZE, 1)),
        Err(Error::LimitExceeded { .. })
    ));
    let mut spec = TagSpec::new(PAGE_SIZE, 1);
    spec.dma_mask = TagSpec::mask_of_bits(16);
    assert!(matches!(Tag::new_root(&m, Premapped(&pool), spec), Err(Error::OutOfRange { .. })));
    // MMIO cannot be copied: refused at load, nothing taken.
    let tag = Tag::new_root(&m, Premapped(&pool), TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let mut map = tag.create_map().unwrap();
    let sg = [SgEntry { pa: PhysAddr::new(0xfee0_0000), len: 64, kind: MemKind::Mmio }];
    // SAFETY: never reached: the load is refused before anything touches it.
    let src = unsafe { SgList::new(&sg) };
    assert!(matches!(map.load(&src, Direction::ToDevice), Err(Error::Unsupported { .. })));
    assert_eq!(pool.stats().free_slots, pool.stats().slots);
}
