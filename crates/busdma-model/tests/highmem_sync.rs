//! Sync of pages outside the direct map ("highmem"), proved on the cache model: the CPU reaches
//! such a page only through quick maps, so that is where its cache lines come from, and the
//! front end's sync must maintain them (through its quick-map maintenance slot) for a
//! non-coherent device and the CPU to agree. Each test also checks the failure the fix
//! prevents, so a skip of these runs (the old behaviour) fails it.
//!
//! The CPU (the driver) touches the pages through `QuickMaps` windows and
//! `HostPlatform::cpu()` (the cache model); the device reads and writes RAM by bus address.

mod common;

use std::sync::atomic::Ordering;

use busdma::bounce::{BounceZones, Bounced, ZoneConfig};
use busdma::front::*;
use busdma::quickmap::{QuickMaps, QuickSlot};
use busdma::{PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{CacheConfig, FrameRequest, HostPlatform, MachineConfig, Placement};
use proptest::prelude::*;

/// 32 MiB of RAM, the upper half outside the direct map, two CPUs, a cache model.
fn machine(cache: CacheConfig) -> HostPlatform {
    let c = MachineConfig { cpus: 2, ..MachineConfig::with_ram(32 << 20) }.upper_half_not_direct_mapped();
    HostPlatform::new(c.with_cache(cache)).unwrap()
}

const CACHES: [CacheConfig; 2] = [CacheConfig::pipt(), CacheConfig::vipt_aliasing()];

/// `n` contiguous pages outside the direct map.
fn far_pages(m: &HostPlatform, n: u64) -> Vec<PhysAddr> {
    let r = FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(n) };
    let pa = m.frames().alloc(r).unwrap();
    assert!(m.phys_to_kva(pa).is_none());
    (0..n).map(|i| pa.checked_add(i * PAGE_SIZE).unwrap()).collect()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1).collect()
}

/// Calls `f(kva, at, n)` for each page piece of buffer `[offset, offset + len)` over `pages`,
/// with the page entered in `slot` of the calling thread's CPU.
fn through_quick_maps(
    m: &HostPlatform,
    slot: QuickSlot,
    pages: &[PhysAddr],
    offset: u64,
    len: u64,
    mut f: impl FnMut(busdma::KernVa, usize, usize),
) {
    let qm = QuickMaps::for_platform(m);
    let (mut at, mut pos) = (0u64, offset);
    while at < len {
        let page = pages[(pos / PAGE_SIZE) as usize];
        let off = pos % PAGE_SIZE;
        let n = (PAGE_SIZE - off).min(len - at);
        let g = m.pin_cpu();
        let q = qm.enter_in(&g, slot, page).unwrap();
        assert!(q.is_windowed());
        f(q.kva().checked_add(off).unwrap(), at as usize, n as usize);
        drop(q);
        at += n;
        pos += n;
    }
}

/// The CPU stores `data` into the buffer through quick maps (dirty lines of the windows).
fn cpu_write(m: &HostPlatform, slot: QuickSlot, pages: &[PhysAddr], offset: u64, data: &[u8]) {
    through_quick_maps(m, slot, pages, offset, data.len() as u64, |kva, at, n| {
        m.cpu().write(kva, &data[at..at + n]).unwrap()
    });
}

/// The CPU loads the buffer through quick maps.
fn cpu_read(m: &HostPlatform, slot: QuickSlot, pages: &[PhysAddr], offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    through_quick_maps(m, slot, pages, offset, len as u64, |kva, at, n| {
        m.cpu().read(kva, &mut out[at..at + n]).unwrap()
    });
    out
}

/// The CPU speculatively fills lines of the buffer through quick maps.
fn cpu_prefetch(m: &HostPlatform, slot: QuickSlot, pages: &[PhysAddr], offset: u64, len: u64) {
    through_quick_maps(m, slot, pages, offset, len, |kva, _, n| m.cpu().prefetch(kva, n as u64).unwrap());
}

fn device_read(m: &HostPlatform, segs: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        m.read_phys(PhysAddr::new(s.addr.raw()), &mut b).unwrap();
        out.extend_from_slice(&b);
    }
    out
}

fn device_write(m: &HostPlatform, segs: &[Segment], data: &[u8]) {
    let mut at = 0;
    for s in segs {
        m.write_phys(PhysAddr::new(s.addr.raw()), &data[at..at + s.len as usize]).unwrap();
        at += s.len as usize;
    }
}

/// Buffer geometry: 5000 bytes from 100 bytes into the first of two pages.
const OFFSET: u64 = 100;
const LEN: usize = 5000;

#[test]
fn after_prewrite_the_device_reads_what_the_cpu_wrote_to_a_page_outside_the_direct_map() {
    for cache in CACHES {
        let m = machine(cache);
        let pages = far_pages(&m, 2);
        let data = pattern(1, LEN);
        cpu_write(&m, QuickSlot::First, &pages, OFFSET, &data);
        let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
        let mut map = tag.create_map().unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { PageList::new(&pages, OFFSET, LEN as u64) }, Direction::ToDevice).unwrap();
        // The CPU's bytes are still only in its cache: what a sync that skipped the run sees.
        assert_eq!(device_read(&m, map.segments()), vec![0; LEN], "{cache:?}: the data is not in RAM yet");
        let st = map.sync(SyncOp::PREWRITE).unwrap();
        assert_eq!((st.maintained, st.skipped, st.quick_mapped), (1, 0, 2), "{cache:?}");
        assert_eq!(device_read(&m, map.segments()), data, "{cache:?}");
        map.sync(SyncOp::POSTWRITE).unwrap();
    }
}

#[test]
fn after_postread_the_cpu_reads_what_the_device_wrote_to_a_page_outside_the_direct_map() {
    for cache in CACHES {
        let m = machine(cache);
        let pages = far_pages(&m, 2);
        cpu_write(&m, QuickSlot::First, &pages, OFFSET, &pattern(7, LEN)); // the driver initialised it
        let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
        let mut map = tag.create_map().unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { PageList::new(&pages, OFFSET, LEN as u64) }, Direction::FromDevice).unwrap();
        map.sync(SyncOp::PREREAD).unwrap();
        // PREREAD wrote the driver's bytes back and dropped every line: nothing dirty is left
        // to be evicted over the device's data (ground truth of the cache model).
        for &p in &pages {
            assert_eq!(m.cache().unwrap().lines_of_page(p), 0, "{cache:?}");
        }
        // The CPU speculates into the buffer while the DMA runs.
        cpu_prefetch(&m, QuickSlot::Second, &pages, OFFSET, LEN as u64);
        let data = pattern(9, LEN);
        device_write(&m, map.segments(), &data);
        assert_eq!(
            cpu_read(&m, QuickSlot::First, &pages, OFFSET, LEN),
            pattern(7, LEN),
            "{cache:?}: stale lines"
        );
        let st = map.sync(SyncOp::POSTREAD).unwrap();
        assert_eq!((st.maintained, st.quick_mapped), (1, 2), "{cache:?}");
        assert_eq!(cpu_read(&m, QuickSlot::First, &pages, OFFSET, LEN), data, "{cache:?}");
    }
}

#[test]
fn preread_keeps_a_dirty_line_outside_the_direct_map_from_overwriting_the_devices_data() {
    for cache in CACHES {
        for preread in [false, true] {
            let m = machine(cache);
            let pages = far_pages(&m, 1);
            cpu_write(&m, QuickSlot::First, &pages, 0, &pattern(3, 512));
            let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
            let mut map = tag.create_map().unwrap();
            // SAFETY: memory the test allocated and keeps until the map is dropped.
            map.load(&unsafe { PageList::new(&pages, 0, 512) }, Direction::FromDevice).unwrap();
            if preread {
                map.sync(SyncOp::PREREAD).unwrap();
            }
            let data = pattern(4, 512);
            device_write(&m, map.segments(), &data);
            m.cpu().evict_all().unwrap(); // cache pressure after the device wrote
            map.sync(SyncOp::POSTREAD).unwrap();
            let seen = cpu_read(&m, QuickSlot::First, &pages, 0, 512);
            if preread {
                assert_eq!(seen, data, "{cache:?}");
            } else {
                assert_eq!(seen, pattern(3, 512), "{cache:?}: the evicted dirty line won");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// With the full protocol, whatever the buffer's offset and length over pages outside the
    /// direct map, the cache's shape, the quick-map slots the CPU touched it through, and what
    /// the cache does meanwhile, each side sees the other's data.
    #[test]
    fn the_full_protocol_is_sufficient_outside_the_direct_map(
        offset in 0u64..PAGE_SIZE,
        len in 1u64..3 * PAGE_SIZE,
        vipt in any::<bool>(),
        write_slot in any::<bool>(),
        read_slot in any::<bool>(),
        prefetch_before in any::<bool>(),
        evict_after in any::<bool>(),
        seed in any::<u8>(),
    ) {
        let slot = |b: bool| if b { QuickSlot::Second } else { QuickSlot::First };
        let m = machine(if vipt { CacheConfig::vipt_aliasing() } else { CacheConfig::pipt() });
        let pages = far_pages(&m, 4);
        let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
        let mut map = tag.create_map().unwrap();
        let out = pattern(seed, len as usize);
        cpu_write(&m, slot(write_slot), &pages, offset, &out);
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { PageList::new(&pages, offset, len) }, Direction::Bidirectional).unwrap();
        map.sync(SyncOp::PREWRITE | SyncOp::PREREAD).unwrap();
        prop_assert_eq!(&device_read(&m, map.segments()), &out);
        if prefetch_before {
            cpu_prefetch(&m, slot(read_slot), &pages, offset, len);
        }
        let back = pattern(seed.wrapping_add(1), len as usize);
        device_write(&m, map.segments(), &back);
        if evict_after {
            m.cpu().evict_all().unwrap();
        }
        map.sync(SyncOp::POSTREAD | SyncOp::POSTWRITE).unwrap();
        prop_assert_eq!(cpu_read(&m, slot(read_slot), &pages, offset, len as usize), back);
    }
}

/// The CPU wrote the page through a window of another CPU and another slot than the one sync
/// maintains through; on the VIPT cache only a window of the page's own colour meets those
/// lines, which is what `Platform::quick_map` promises for every window.
#[test]
fn a_quick_map_of_another_cpu_and_slot_is_maintained_through_the_pages_colour() {
    let m = machine(CacheConfig::vipt_aliasing());
    let pages = far_pages(&m, 4); // four pages: one of each colour
    let data = pattern(5, 4 * PAGE_SIZE as usize);
    std::thread::scope(|s| {
        s.spawn(|| {
            let _on = m.bind_cpu(1).unwrap();
            cpu_write(&m, QuickSlot::Second, &pages, 0, &data);
        });
    });
    let _on = m.bind_cpu(0).unwrap();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { PageList::new(&pages, 0, 4 * PAGE_SIZE) }, Direction::ToDevice).unwrap();
    let before = m.cache().unwrap().counters().maintenance_lines.load(Ordering::Relaxed);
    map.sync(SyncOp::PREWRITE).unwrap();
    let lines = m.cache().unwrap().counters().maintenance_lines.load(Ordering::Relaxed) - before;
    assert_eq!(lines, 4 * PAGE_SIZE / busdma_model::cache::LINE_SIZE, "every dirty line was found");
    assert_eq!(device_read(&m, map.segments()), data);
}

#[test]
fn every_quick_map_window_of_a_page_has_the_pages_colour() {
    let m = machine(CacheConfig::vipt_aliasing());
    let colours = CacheConfig::vipt_aliasing().colours();
    let pages = far_pages(&m, colours);
    let qm = QuickMaps::for_platform(&m);
    for cpu in 0..2 {
        let _on = m.bind_cpu(cpu).unwrap();
        for slot in [QuickSlot::First, QuickSlot::Second] {
            for &p in &pages {
                let g = m.pin_cpu();
                let q = qm.enter_in(&g, slot, p).unwrap();
                let c = CacheConfig::vipt_aliasing();
                assert_eq!(c.colour_of(q.kva().raw()), c.colour_of(p.raw()), "cpu {cpu} {slot:?} {p:?}");
                assert_eq!(m.cpu_translate(q.kva()), Some(p));
            }
        }
    }
}

/// Seed 003's entries with no page and no kernel mapping are still skipped, next to a page
/// outside the direct map that is now maintained.
#[test]
fn page_less_entries_are_still_skipped_next_to_a_maintained_page_outside_the_direct_map() {
    let m = machine(CacheConfig::vipt_aliasing());
    let far = far_pages(&m, 2);
    let entries = [
        SgEntry { pa: far[0], len: 512, kind: MemKind::Page },
        SgEntry { pa: far[1], len: 512, kind: MemKind::Unmapped },
        SgEntry { pa: PhysAddr::new(0xfe00_0000), len: 256, kind: MemKind::Mmio },
        SgEntry { pa: PhysAddr::new(0xfd00_0000), len: 256, kind: MemKind::PeerBar { bus: None } },
    ];
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { SgList::new(&entries) }, Direction::Bidirectional).unwrap();
    let quick_maps = || m.counters().quick_maps.load(Ordering::Relaxed);
    let before = quick_maps();
    let st = map.sync(SyncOp::PREWRITE | SyncOp::PREREAD).unwrap();
    assert_eq!((st.maintained, st.skipped, st.quick_mapped), (1, 3, 1));
    assert_eq!(quick_maps() - before, 1, "only the page was mapped, once");
    assert_eq!(m.cache().unwrap().counters().maintenance_unmapped.load(Ordering::Relaxed), 0);
}

/// Issue 6's case on a machine with a cache: a 28-bit device with no IOMMU and a client buffer
/// outside the direct map and above its reach. The bounce copy reads the client's pages from
/// RAM, so the client's dirty lines must be written back first, and dropped before the copy
/// back lands.
#[test]
fn a_bounced_buffer_outside_the_direct_map_carries_the_cpus_bytes_both_ways() {
    for cache in CACHES {
        let c =
            MachineConfig { cpus: 2, ..MachineConfig::with_ram(512 << 20) }.upper_half_not_direct_mapped();
        let m = HostPlatform::new(c.with_cache(cache)).unwrap();
        let pages = far_pages(&m, 2);
        assert!(pages[0].raw() >= 1 << 28, "the client lies beyond the device's reach");
        let (qm, zones) = (QuickMaps::for_platform(&m), BounceZones::new(&m, ZoneConfig::default()));
        let mut spec = TagSpec::new(64 << 10, 8);
        spec.dma_mask = TagSpec::mask_of_bits(28);
        let tag = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), spec).unwrap();
        let mut map = tag.create_map().unwrap();
        let out = pattern(11, LEN);
        cpu_write(&m, QuickSlot::First, &pages, OFFSET, &out);
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { PageList::new(&pages, OFFSET, LEN as u64) }, Direction::Bidirectional).unwrap();
        assert!(map.segments().iter().all(|s| s.addr.raw() + s.len <= 1 << 28));
        map.sync(SyncOp::PREWRITE | SyncOp::PREREAD).unwrap();
        assert_eq!(device_read(&m, map.segments()), out, "{cache:?}: to the device");
        cpu_prefetch(&m, QuickSlot::Second, &pages, OFFSET, LEN as u64);
        let back = pattern(12, LEN);
        device_write(&m, map.segments(), &back);
        map.sync(SyncOp::POSTREAD | SyncOp::POSTWRITE).unwrap();
        assert_eq!(cpu_read(&m, QuickSlot::First, &pages, OFFSET, LEN), back, "{cache:?}: from the device");
    }
}

/// Bounce pages outside the direct map are written by the CPU through quick-map windows, so
/// their lines must be cleaned before the device reads them, through a window of their colour.
#[test]
fn bounce_pages_outside_the_direct_map_are_maintained_through_a_quick_map() {
    let host = machine(CacheConfig::vipt_aliasing());
    let rec = common::Recording::new(&host);
    let qm = QuickMaps::for_platform(&rec);
    let zones =
        BounceZones::new(&rec, ZoneConfig { placement: Placement::NotDirectMapped, ..ZoneConfig::default() });
    let mut spec = TagSpec::new(64 << 10, 8);
    spec.flags.untrusted = true; // a sub-page buffer of an untrusted device is bounced
    let tag = Tag::new_root(&rec, Bounced::direct(Direct, &zones, &qm), spec).unwrap();
    let mut map = tag.create_map().unwrap();
    let r = FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) };
    let client = host.phys_to_kva(host.frames().alloc(r).unwrap()).unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { KernelBuf::new(client, 100) }, Direction::ToDevice).unwrap();
    let bus = PhysAddr::new(map.segments()[0].addr.raw());
    assert!(host.phys_to_kva(bus).is_none(), "the device reads a bounce page outside the direct map");
    rec.take();
    map.sync(SyncOp::PREWRITE).unwrap();
    let windowed: Vec<_> = rec
        .take()
        .into_iter()
        .filter_map(|op| match op {
            common::CacheOp::CleanInvalidate(k, n)
                if host.quick_window().contains(busdma::KernVa::new(k)) =>
            {
                Some((k, n))
            }
            _ => None,
        })
        .collect();
    assert_eq!(windowed.len(), 1, "one bounce page, cleaned through a window");
    let c = CacheConfig::vipt_aliasing();
    assert_eq!(c.colour_of(windowed[0].0), c.colour_of(bus.raw()), "a window of the page's colour");
    assert_eq!(windowed[0].0 % PAGE_SIZE, bus.raw() % PAGE_SIZE);
}
