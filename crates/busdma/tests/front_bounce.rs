//! Bounce buffering through the bus_dma front end: `Bounced<Direct>` for a 28-bit device
//! without IOMMU (QEMU's edu), checked through the model's `DirectPort`.

use busdma::bounce::{BounceZones, Bounced, BouncedState, ZoneConfig, ZoneStats};
use busdma::front::*;
use busdma::quickmap::QuickMaps;
use busdma::{Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{DirectPort, DmaPort, FrameRequest, HostPlatform, MachineConfig, Placement};

const LIMIT_28: u64 = 1 << 28;

/// 512 MiB at 16 MiB; the direct map covers the lower half ([16, 272) MiB).
fn machine() -> HostPlatform {
    let c = MachineConfig { ram_size: 512 << 20, cpus: 2, ..MachineConfig::default() }
        .upper_half_not_direct_mapped();
    HostPlatform::new(c).unwrap()
}

fn spec28() -> TagSpec {
    TagSpec { dma_mask: TagSpec::mask_of_bits(28), ..TagSpec::new(64 << 10, 32) }
}

/// Frames whose first byte is at or above `at_least` (the allocator is first-fit, so fill
/// everything below and give it back afterwards).
fn frames_above(m: &HostPlatform, at_least: u64, pages: u64, placement: Placement) -> PhysAddr {
    let mut held = Vec::new();
    let mut k = (at_least - m.ram().start().raw()) / PAGE_SIZE;
    while k > 0 {
        match m
            .frames()
            .alloc(FrameRequest { below: Some(PhysAddr::new(at_least)), ..FrameRequest::pages(k) })
        {
            Ok(pa) => held.push((pa, k)),
            Err(_) => k /= 2,
        }
    }
    let pa = m.frames().alloc(FrameRequest { placement, ..FrameRequest::pages(pages) }).unwrap();
    for (p, k) in held {
        m.frames().free(p, k).unwrap();
    }
    assert!(pa.raw() >= at_least);
    pa
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1).collect()
}

fn zone_stats(zones: &BounceZones<'_, HostPlatform>) -> ZoneStats {
    zones.stats().first().map(|z| z.1).unwrap_or_default()
}

/// Loads `src` both ways through `map` and checks the bytes through the 28-bit device.
fn both_ways<'p, S>(
    m: &HostPlatform,
    map: &mut DmaMap<'p, HostPlatform, S>,
    src: &impl LoadSource,
    client: &[(PhysAddr, u64)],
) where
    S: Strategy<HostPlatform>,
{
    let dev = DirectPort::new(m, 1, 28);
    let len: u64 = client.iter().map(|c| c.1).sum();
    let write_client = |data: &[u8]| {
        let mut off = 0;
        for &(pa, n) in client {
            m.write_phys(pa, &data[off..off + n as usize]).unwrap();
            off += n as usize;
        }
    };
    let read_client = || {
        let mut out = Vec::new();
        for &(pa, n) in client {
            let mut b = vec![0; n as usize];
            m.read_phys(pa, &mut b).unwrap();
            out.extend(b);
        }
        out
    };
    // Memory → device.
    let out = pattern(len as usize, 5);
    write_client(&out);
    map.load(src, Direction::ToDevice).unwrap();
    map.sync(SyncOp::PREWRITE).unwrap();
    let mut seen = Vec::new();
    for s in map.segments() {
        let mut b = vec![0; s.len as usize];
        dev.dma_read(s.addr, &mut b).unwrap_or_else(|f| panic!("device fault: {f}"));
        seen.extend(b);
    }
    assert_eq!(seen, out, "the device read wrong bytes");
    map.sync(SyncOp::POSTWRITE).unwrap();
    map.unload().unwrap();
    // Device → memory.
    map.load(src, Direction::FromDevice).unwrap();
    map.sync(SyncOp::PREREAD).unwrap();
    let back = pattern(len as usize, 111);
    let mut off = 0;
    for s in map.segments() {
        dev.dma_write(s.addr, &back[off..off + s.len as usize])
            .unwrap_or_else(|f| panic!("device fault: {f}"));
        off += s.len as usize;
    }
    map.sync(SyncOp::POSTREAD).unwrap();
    assert_eq!(read_client(), back, "the client did not get the device's bytes");
    map.unload().unwrap();
}

#[test]
fn a_28_bit_device_gets_correct_data_both_ways_for_buffers_anywhere_in_ram_through_the_front_end() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let tag = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), spec28()).unwrap();
    let mut map = tag.create_map().unwrap();
    let direct_end = m.ram().start().raw() + m.config().direct_map_size;
    // Reachable (no bounce), beyond the mask in the direct map, outside the direct map.
    let low = frames_above(&m, m.ram().start().raw() + (4 << 20), 4, Placement::DirectMapped);
    let mid = frames_above(&m, LIMIT_28, 4, Placement::DirectMapped);
    let far = frames_above(&m, direct_end, 4, Placement::NotDirectMapped);
    assert!(m.phys_to_kva(far).is_none() && m.phys_to_kva(mid).is_some());
    for pa in [low, mid, far] {
        let at = |off: u64| PhysAddr::new(pa.raw() + off);
        // Raw segments: odd offsets and lengths, spanning pages.
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        both_ways(&m, &mut map, &unsafe { RawSegment::new(at(3), 5000) }, &[(at(3), 5000)]);
        // A page list (pages in a scrambled order: every bounce page spans two client pages).
        let pages = [at(2 * PAGE_SIZE), at(0), at(3 * PAGE_SIZE)];
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        let list = unsafe { PageList::new(&pages, 1000, 2 * PAGE_SIZE + 500) };
        let client =
            [(at(2 * PAGE_SIZE + 1000), PAGE_SIZE - 1000), (at(0), PAGE_SIZE), (at(3 * PAGE_SIZE), 1500)];
        both_ways(&m, &mut map, &list, &client);
    }
    // A kernel buffer in the direct map above the mask.
    let kva = m.phys_to_kva(mid).unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let kb = unsafe { KernelBuf::new(busdma::KernVa::new(kva.raw() + 17), 1500) };
    both_ways(&m, &mut map, &kb, &[(PhysAddr::new(mid.raw() + 17), 1500)]);
    // Reachable buffers were not bounced; the rest were, and every page came back.
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { RawSegment::new(low, 100) }, Direction::ToDevice).unwrap();
    assert_eq!(map.segments(), [Segment { addr: Iova::new(low.raw()), len: 100 }]);
    let st: &BouncedState<'_, HostPlatform, ()> = map.state();
    assert!(st.bounce().is_none());
    map.unload().unwrap();
    let z = zone_stats(&zones);
    assert!(z.total_bounced > 0 && z.free_pages == z.total_pages && z.total_pages == 17, "{z:?}");
}

#[test]
fn the_zone_is_grown_at_map_create_only_for_tags_that_can_need_it() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let wide = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), TagSpec::new(64 << 10, 8)).unwrap();
    let _a = wide.create_map().unwrap();
    assert!(zones.stats().is_empty(), "a 64-bit tag made a zone");
    let narrow = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), spec28()).unwrap();
    let _b = narrow.create_map().unwrap();
    let _c = narrow.create_map().unwrap();
    assert_eq!(zones.stats().len(), 1);
    assert_eq!(zones.stats()[0].1.total_pages, 2 * 17, "each map adds a maximum load's pages (16 + 1)");
}

#[test]
fn a_zone_exhausted_without_waiting_fails_the_load_cleanly() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig { bound_pages: 17, ..ZoneConfig::default() });
    let tag = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), spec28()).unwrap();
    let mut a = tag.create_map().unwrap();
    let mut b = tag.create_map().unwrap();
    let far = frames_above(&m, LIMIT_28, 16, Placement::Any);
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    a.load(&unsafe { RawSegment::new(far, 64 << 10) }, Direction::ToDevice).unwrap();
    let before = zones.stats()[0].1;
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let r = b.load(&unsafe { RawSegment::new(far, 2 * PAGE_SIZE) }, Direction::ToDevice);
    assert_eq!(r.err(), Some(Error::Exhausted { size: 2 * PAGE_SIZE, limit: LIMIT_28 }));
    assert!(!b.is_loaded() && b.segments().is_empty());
    assert_eq!(zones.stats()[0].1, before, "the failed load kept pages");
    a.unload().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    b.load(&unsafe { RawSegment::new(far, 2 * PAGE_SIZE) }, Direction::ToDevice).unwrap();
}

#[test]
fn a_page_less_mmio_entry_beyond_the_mask_is_refused_with_its_address() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let tag = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), spec28()).unwrap();
    let mut map = tag.create_map().unwrap();
    let e = [SgEntry { pa: PhysAddr::new(0xfe00_0000), len: 0x100, kind: MemKind::Mmio }];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let r = map.load(&unsafe { SgList::new(&e) }, Direction::ToDevice);
    assert_eq!(
        r.err(),
        Some(Error::InvalidArgument {
            what: "page-less (MMIO) entry would need bouncing; its address",
            value: 0xfe00_0000
        })
    );
    assert!(!map.is_loaded());
    let z = zones.stats()[0].1;
    assert_eq!(z.free_pages, z.total_pages);
}

#[test]
fn an_untrusted_device_sees_only_the_buffer_and_zeros_in_its_page() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let mut spec = TagSpec::new(64 << 10, 8);
    spec.flags.untrusted = true;
    let tag = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), spec).unwrap();
    let mut map = tag.create_map().unwrap();
    let page = frames_above(&m, m.ram().start().raw() + (8 << 20), 1, Placement::DirectMapped);
    m.fill_phys(page, PAGE_SIZE, 0x5e).unwrap(); // secrets around the buffer
    let data = pattern(100, 9);
    m.write_phys(PhysAddr::new(page.raw() + 2000), &data).unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { RawSegment::new(PhysAddr::new(page.raw() + 2000), 100) }, Direction::ToDevice)
        .unwrap();
    map.sync(SyncOp::PREWRITE).unwrap();
    let seg = map.segments()[0];
    assert_eq!(seg.len, 100);
    let dev = DirectPort::new(&m, 2, 64);
    let mut whole = vec![0; PAGE_SIZE as usize];
    dev.dma_read(Iova::new(seg.addr.raw() & !(PAGE_SIZE - 1)), &mut whole).unwrap();
    let off = (seg.addr.raw() & (PAGE_SIZE - 1)) as usize;
    assert_eq!(&whole[off..off + 100], &data[..]);
    assert!(
        whole[..off].iter().chain(&whole[off + 100..]).all(|&b| b == 0),
        "the device saw more than the buffer"
    );
}
