//! Bounce buffering on the machine model: a 28-bit device without IOMMU, deferred and
//! no-wait loads under pressure, untrusted sub-page buffers, and bad input.

use std::sync::{Arc, Mutex};

use busdma::bounce::{
    BounceLoad, BounceZone, BounceZones, ClientSeg, Constraint, DeviceSeg, ZoneConfig, ZoneKey, pages_needed,
};
use busdma::quickmap::QuickMaps;
use busdma::{Error, Iova, PAGE_SIZE, PhysAddr, Placement, Platform, SyncOp};
use busdma_model::{DirectPort, DmaPort, FrameRequest, HostPlatform, MachineConfig};
use proptest::prelude::*;

/// 2^28: the first bus address a 28-bit device cannot emit.
const LIMIT_28: u64 = 1 << 28;

/// 512 MiB of RAM at 16 MiB: [16 MiB, 528 MiB). The direct map covers the lower half,
/// [16 MiB, 272 MiB); a 28-bit device reaches [16 MiB, 256 MiB). So RAM has three bands: reachable
/// and direct-mapped, unreachable but direct-mapped, unreachable and outside the direct map.
fn machine() -> HostPlatform {
    let c = MachineConfig { ram_size: 512 << 20, cpus: 2, ..MachineConfig::default() }
        .upper_half_not_direct_mapped();
    HostPlatform::new(c).unwrap()
}

/// A device without IOMMU whose DMA mask has 28 bits (the model's `DirectPort`): bus address
/// = physical address, and an address it cannot emit is a fault, which fails the test.
struct Dev28<'a> {
    port: DirectPort<'a>,
}

impl Dev28<'_> {
    /// The device reads the segments (memory → device).
    fn read(&self, segs: &[DeviceSeg]) -> Vec<u8> {
        let mut out = Vec::new();
        for s in segs {
            let mut b = vec![0; s.len as usize];
            self.port.dma_read(Iova::new(s.addr.raw()), &mut b).unwrap_or_else(|f| panic!("{f}"));
            out.extend(b);
        }
        out
    }
    /// The device writes `data` across the segments (device → memory).
    fn write(&self, segs: &[DeviceSeg], data: &[u8]) {
        let mut off = 0;
        for s in segs {
            let n = (s.len as usize).min(data.len() - off);
            self.port
                .dma_write(Iova::new(s.addr.raw()), &data[off..off + n])
                .unwrap_or_else(|f| panic!("{f}"));
            off += n;
        }
    }
}

fn dev28(m: &HostPlatform) -> Dev28<'_> {
    Dev28 { port: DirectPort::new(m, 28, 28) }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1).collect()
}

fn read(m: &HostPlatform, segs: &[ClientSeg]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0; s.len() as usize];
        m.read_phys(s.pa(), &mut b).unwrap();
        out.extend(b);
    }
    out
}

fn write(m: &HostPlatform, segs: &[ClientSeg], data: &[u8]) {
    let mut off = 0;
    for s in segs {
        m.write_phys(s.pa(), &data[off..off + s.len() as usize]).unwrap();
        off += s.len() as usize;
    }
}

/// Frames at a given physical address band: the allocator hands out the lowest free run that
/// fits, so "below" plus a large enough filler places buffers where we want them.
fn frames_at(m: &HostPlatform, at_least: u64, pages: u64) -> PhysAddr {
    let below = PhysAddr::new(at_least + (64 << 20));
    let req = FrameRequest { below: Some(below), ..FrameRequest::pages(pages) };
    // Skip frames under `at_least` by holding them in a filler that we free afterwards.
    let start = m.ram().start().raw();
    let filler = (at_least.saturating_sub(start)) / PAGE_SIZE;
    // Fill every free frame below `at_least` with as few runs as possible (halving on failure).
    let mut held = Vec::new();
    let mut k = filler;
    while k > 0 {
        match m
            .frames()
            .alloc(FrameRequest { below: Some(PhysAddr::new(at_least)), ..FrameRequest::pages(k) })
        {
            Ok(pa) => held.push((pa, k)),
            Err(_) => k /= 2,
        }
    }
    let pa = m.frames().alloc(req).unwrap();
    for (pa, k) in held {
        m.frames().free(pa, k).unwrap();
    }
    assert!(pa.raw() >= at_least);
    pa
}

/// Runs one buffer through a load, both directions, checked through the device.
fn round_trip<'p>(
    m: &'p HostPlatform,
    zone: &Arc<BounceZone<'p, HostPlatform>>,
    qm: &'p QuickMaps,
    segs: &[ClientSeg],
) {
    let c = Constraint::dma_bits(28);
    let len: usize = segs.iter().map(|s| s.len() as usize).sum();
    let dev = dev28(m);
    // Memory → device.
    let out = pattern(len, 3);
    write(m, segs, &out);
    let load = BounceLoad::load(zone, qm, segs, &c).unwrap();
    load.sync(m, SyncOp::PREWRITE).unwrap();
    assert_eq!(dev.read(load.segments()), out, "device read wrong bytes");
    load.sync(m, SyncOp::POSTWRITE).unwrap();
    // Device → memory.
    load.sync(m, SyncOp::PREREAD).unwrap();
    let back = pattern(len, 200);
    dev.write(load.segments(), &back);
    load.sync(m, SyncOp::POSTREAD).unwrap();
    assert_eq!(read(m, segs), back, "client did not get the device's bytes");
    let bounced = load.segments().iter().any(|s| s.bounced);
    let reachable = segs.iter().all(|s| s.pa().raw() + s.len() <= LIMIT_28);
    assert_eq!(bounced, !reachable, "bounced iff some byte is beyond the mask");
}

#[test]
fn a_28_bit_device_gets_correct_data_both_ways_for_buffers_anywhere_in_ram() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let zone = zones.zone(Constraint::dma_bits(28).zone_key()).unwrap();
    zone.grow_for_map(64).unwrap();
    let direct_end = m.ram().start().raw() + m.config().direct_map_size;
    // Bands: reachable; beyond the mask but direct-mapped; outside the direct map; and
    // buffers straddling each boundary.
    let spots = [
        (m.ram().start().raw() + (8 << 20), "reachable, direct-mapped"),
        (LIMIT_28 + (4 << 20), "beyond the mask, direct-mapped"),
        (direct_end + (64 << 20), "outside the direct map"),
        (LIMIT_28 - PAGE_SIZE, "straddling the mask"),
        (direct_end - PAGE_SIZE, "straddling the direct map's end"),
    ];
    for (at, what) in spots {
        let pa = frames_at(&m, at, 4);
        for (off, len) in [(0, PAGE_SIZE), (1, 1), (100, 1500), (4000, 200), (7, 3 * PAGE_SIZE + 9)] {
            let seg = ClientSeg::phys(PhysAddr::new(pa.raw() + off), len);
            eprintln!("{what}: {:#x}+{len:#x}", seg.pa().raw());
            round_trip(&m, &zone, &qm, &[seg]);
        }
        // A scatter list of pieces in two non-adjacent pages of the band and one low page.
        let low = frames_at(&m, m.ram().start().raw(), 1);
        let list = [
            ClientSeg::phys(PhysAddr::new(pa.raw() + 3000), 1096),
            ClientSeg::phys(PhysAddr::new(pa.raw() + 2 * PAGE_SIZE), 700),
            ClientSeg::phys(low, 64),
            ClientSeg::phys(PhysAddr::new(pa.raw() + 3 * PAGE_SIZE + 5), 2000),
        ];
        round_trip(&m, &zone, &qm, &list);
    }
    let st = zone.stats();
    assert_eq!(st.free_pages, st.total_pages, "every page returned");
    assert!(st.total_bounced > 0);
}

#[test]
fn bounce_pages_outside_the_direct_map_are_copied_through_quick_maps_on_both_sides() {
    // Direct map of 64 MiB only: bounce pages below 2^28 but above the direct map.
    let c =
        MachineConfig { ram_size: 512 << 20, direct_map_size: 64 << 20, cpus: 2, ..MachineConfig::default() };
    let m = HostPlatform::new(c).unwrap();
    let qm = QuickMaps::for_platform(&m);
    let config = ZoneConfig { placement: Placement::NotDirectMapped, ..ZoneConfig::default() };
    let zones = BounceZones::new(&m, config);
    let zone = zones.zone(Constraint::dma_bits(28).zone_key()).unwrap();
    zone.grow_for_map(8).unwrap();
    let before = m.counters().quick_maps.load(std::sync::atomic::Ordering::Relaxed);
    let pa = frames_at(&m, LIMIT_28 + (16 << 20), 3);
    assert!(m.phys_to_kva(pa).is_none());
    round_trip(&m, &zone, &qm, &[ClientSeg::phys(PhysAddr::new(pa.raw() + 77), 2 * PAGE_SIZE + 100)]);
    assert!(m.counters().quick_maps.load(std::sync::atomic::Ordering::Relaxed) > before);
}

#[test]
fn one_bounce_page_holds_the_end_of_one_client_page_and_the_start_of_the_next() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let zone = zones.zone(Constraint::dma_bits(28).zone_key()).unwrap();
    zone.grow_for_map(4).unwrap();
    let a = frames_at(&m, LIMIT_28 + (40 << 20), 1);
    let b = frames_at(&m, LIMIT_28 + (80 << 20), 1);
    let segs = [ClientSeg::phys(PhysAddr::new(a.raw() + 3000), 1096), ClientSeg::phys(b, 2000)];
    assert_eq!(pages_needed(&segs, &Constraint::dma_bits(28)).unwrap(), 1);
    let load = BounceLoad::load(&zone, &qm, &segs, &Constraint::dma_bits(28)).unwrap();
    assert_eq!(load.segments().len(), 1, "{load:?}");
    assert_eq!(load.segments()[0].len, 3096);
    drop(load);
    round_trip(&m, &zone, &qm, &segs);
}

#[test]
fn sync_copies_run_with_preemption_already_disabled_by_the_caller() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones =
        BounceZones::new(&m, ZoneConfig { placement: Placement::DirectMapped, ..ZoneConfig::default() });
    let c = Constraint::dma_bits(28);
    let zone = zones.zone(c.zone_key()).unwrap();
    zone.grow_for_map(2).unwrap();
    let direct_end = m.ram().start().raw() + m.config().direct_map_size;
    let far = frames_at(&m, direct_end + (1 << 20), 2);
    let data = pattern(5000, 4);
    m.write_phys(PhysAddr::new(far.raw() + 10), &data).unwrap();
    let load =
        BounceLoad::load(&zone, &qm, &[ClientSeg::phys(PhysAddr::new(far.raw() + 10), 5000)], &c).unwrap();
    // An interrupt handler's context: preemption is off around the sync (quick maps inside).
    let g = m.pin_cpu();
    load.sync(&m, SyncOp::PREWRITE).unwrap();
    drop(g);
    assert_eq!(dev28(&m).read(load.segments()), data);
}

#[test]
fn a_kernel_mapped_client_is_copied_through_its_own_mapping() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let zone = zones.zone(Constraint::dma_bits(28).zone_key()).unwrap();
    zone.grow_for_map(2).unwrap();
    let pa = frames_at(&m, LIMIT_28 + (8 << 20), 2);
    let kva = m.phys_to_kva(pa).unwrap();
    // SAFETY: kva is the direct-map address of pa, 2 pages, live for the machine's life.
    let seg =
        unsafe { ClientSeg::kernel(PhysAddr::new(pa.raw() + 9), busdma::KernVa::new(kva.raw() + 9), 5000) };
    round_trip(&m, &zone, &qm, &[seg]);
}

/// Deferred loads as they complete: (name, load).
type Completed<'p> = Arc<Mutex<Vec<(&'static str, BounceLoad<'p, HostPlatform>)>>>;

#[test]
fn deferred_loads_complete_in_order_when_pages_are_released() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let config = ZoneConfig { bound_pages: 4, ..ZoneConfig::default() };
    let zones = BounceZones::new(&m, config);
    let c = Constraint::dma_bits(28);
    let zone = zones.zone(c.zone_key()).unwrap();
    zone.grow_for_map(4).unwrap();
    let far = frames_at(&m, LIMIT_28 + (8 << 20), 8);
    let seg = |page: u64, pages: u64| {
        ClientSeg::phys(PhysAddr::new(far.raw() + page * PAGE_SIZE), pages * PAGE_SIZE)
    };
    let a = BounceLoad::load(&zone, &qm, &[seg(0, 3)], &c).unwrap();
    let done: Completed<'_> = Arc::new(Mutex::new(Vec::new()));
    let defer = |name: &'static str, s: ClientSeg| {
        let done = done.clone();
        BounceLoad::load_or_defer(
            &zone,
            &qm,
            vec![s],
            c,
            Box::new(move |r| done.lock().unwrap().push((name, r.unwrap()))),
        )
    };
    // B needs 2 pages (1 free): deferred. C needs 1 page (1 free) but must wait behind B.
    assert!(matches!(defer("B", seg(3, 2)), Err(Error::InProgress)));
    assert!(matches!(defer("C", seg(5, 1)), Err(Error::InProgress)));
    assert!(done.lock().unwrap().is_empty(), "C overtook B");
    // A no-wait load does not jump the queue either.
    assert!(matches!(BounceLoad::load(&zone, &qm, &[seg(6, 1)], &c), Err(Error::Exhausted { .. })));
    assert_eq!(zone.stats().waiting, 2);
    assert_eq!(zone.stats().total_deferred, 2);
    drop(a); // 4 free: B (2) then C (1), in order.
    let names: Vec<&str> = done.lock().unwrap().iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["B", "C"]);
    // The completed loads are real: the device reaches their bytes.
    let data = pattern(2 * PAGE_SIZE as usize, 9);
    m.write_phys(seg(3, 2).pa(), &data).unwrap();
    {
        let d = done.lock().unwrap();
        d[0].1.sync(&m, SyncOp::PREWRITE).unwrap();
        assert_eq!(dev28(&m).read(d[0].1.segments()), data);
    }
    done.lock().unwrap().clear();
    let st = zone.stats();
    assert_eq!((st.free_pages, st.total_pages, st.waiting), (4, 4, 0));
}

#[test]
fn a_no_wait_load_under_pressure_fails_cleanly_and_leaks_nothing() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let frames_before = m.frames().free_frames();
    {
        let config = ZoneConfig { bound_pages: 3, ..ZoneConfig::default() };
        let zones = BounceZones::new(&m, config);
        let c = Constraint::dma_bits(28);
        let zone = zones.zone(c.zone_key()).unwrap();
        zone.grow_for_map(3).unwrap();
        let far = frames_at(&m, LIMIT_28 + (8 << 20), 4);
        let held = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(far, 2 * PAGE_SIZE)], &c).unwrap();
        let before = zone.stats();
        let r = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(far, 2 * PAGE_SIZE)], &c);
        assert_eq!(r.err(), Some(Error::Exhausted { size: 2 * PAGE_SIZE, limit: LIMIT_28 }));
        assert_eq!(zone.stats(), before, "the failed load kept something");
        // Over the bound: never satisfiable, so not even deferred.
        let r = BounceLoad::load_or_defer(
            &zone,
            &qm,
            vec![ClientSeg::phys(far, 4 * PAGE_SIZE)],
            c,
            Box::new(|_| {}),
        );
        assert!(matches!(r, Err(Error::LimitExceeded { requested: 4, limit: 3, .. })));
        assert!(matches!(zone.grow_for_map(4), Err(Error::LimitExceeded { .. })));
        drop(held);
        assert_eq!(zone.stats().free_pages, 3);
        m.frames().free(far, 4).unwrap();
    }
    assert_eq!(m.frames().free_frames(), frames_before, "bounce pages leaked");
}

#[test]
fn a_zone_that_cannot_grow_below_its_limit_keeps_what_it_got_and_says_no_memory() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let start = m.ram().start().raw();
    // Only three free pages below the limit: hold everything else under it.
    let limit = start + (1 << 20);
    let mut held = Vec::new();
    let mut left = (1 << 20) / PAGE_SIZE - 3;
    let mut k = left;
    while left > 0 {
        match m.frames().alloc(FrameRequest { below: Some(PhysAddr::new(limit)), ..FrameRequest::pages(k) }) {
            Ok(pa) => {
                held.push((pa, k));
                left -= k;
                k = k.min(left);
            }
            Err(_) => k = (k / 2).max(1),
        }
    }
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let c =
        Constraint { below: Some(PhysAddr::new(limit)), excluded: None, align: 1, untrusted_granule: None };
    let zone = zones.zone(c.zone_key()).unwrap();
    assert_eq!(zone.grow_for_map(5), Err(Error::NoMemory { requested: 5 * PAGE_SIZE }));
    let st = zone.stats();
    assert_eq!((st.total_pages, st.free_pages), (3, 3));
    // The three pages serve loads that fit.
    let far = PhysAddr::new(start + (300 << 20));
    let load = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(far, 3 * PAGE_SIZE)], &c).unwrap();
    assert!(load.segments().iter().all(|s| s.addr.raw() + s.len <= limit));
    drop(load);
    for (pa, k) in held {
        m.frames().free(pa, k).unwrap();
    }
}

#[test]
fn zones_are_shared_per_constraint_and_distinct_across_constraints() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let a = zones.zone(Constraint::dma_bits(28).zone_key()).unwrap();
    let b = zones.zone(ZoneKey::below(Some(PhysAddr::new(LIMIT_28)))).unwrap();
    let c = zones.zone(Constraint::dma_bits(32).zone_key()).unwrap();
    let d = zones.zone(ZoneKey { below: Some(PhysAddr::new(LIMIT_28)), align: 1 << 16 }).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert!(!Arc::ptr_eq(&a, &c) && !Arc::ptr_eq(&a, &d));
    assert_eq!(zones.stats().len(), 3);
    d.grow_for_map(2).unwrap();
    let load = BounceLoad::load(
        &d,
        &qm,
        &[ClientSeg::phys(PhysAddr::new(LIMIT_28 + 4096), 10)],
        &Constraint {
            below: Some(PhysAddr::new(LIMIT_28)),
            excluded: None,
            align: 1 << 16,
            untrusted_granule: None,
        },
    )
    .unwrap();
    assert!(load.segments()[0].addr.is_aligned(1 << 16), "{load:?}");
    assert!(matches!(zones.zone(ZoneKey { below: None, align: 3 }), Err(Error::BadAlignment { align: 3 })));
}

#[test]
fn an_untrusted_device_reading_the_whole_page_around_a_100_byte_buffer_sees_only_its_bytes_and_zeros() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig { bound_pages: 1, ..ZoneConfig::default() });
    let c = Constraint::untrusted();
    let zone = zones.zone(c.zone_key()).unwrap();
    zone.grow_for_map(1).unwrap();
    // Leave stale data in the (only) bounce page.
    let junk = frames_at(&m, m.ram().start().raw(), 1);
    m.fill_phys(junk, PAGE_SIZE, 0xaa).unwrap();
    let stale = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(junk, PAGE_SIZE - 1)], &c).unwrap();
    let stale_page = stale.segments()[0].addr;
    drop(stale);
    // The client's page holds a secret around the buffer.
    let page = frames_at(&m, m.ram().start().raw() + (32 << 20), 1);
    m.fill_phys(page, PAGE_SIZE, 0x55).unwrap();
    let buf = PhysAddr::new(page.raw() + 1000);
    let data = pattern(100, 1);
    m.write_phys(buf, &data).unwrap();
    for op in [SyncOp::PREWRITE, SyncOp::PREREAD] {
        let load = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(buf, 100)], &c).unwrap();
        load.sync(&m, op).unwrap();
        let seg = load.segments()[0];
        assert_eq!((seg.addr.page_base(), seg.len, seg.bounced), (stale_page, 100, true));
        // The IOMMU maps the whole page: that is what the device can read.
        let mut seen = vec![0; PAGE_SIZE as usize];
        m.read_phys(seg.addr.page_base(), &mut seen).unwrap();
        let off = seg.addr.page_offset() as usize;
        assert_eq!(&seen[off..off + 100], &data[..], "{op:?}");
        assert!(seen[..off].iter().chain(&seen[off + 100..]).all(|&b| b == 0), "{op:?}: padding not zero");
    }
    // A whole, page-aligned page is not bounced.
    let load = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(page, PAGE_SIZE)], &c).unwrap();
    assert_eq!(load.segments(), [DeviceSeg { addr: page, len: PAGE_SIZE, bounced: false }]);
}

#[test]
fn an_untrusted_device_that_writes_short_exposes_nothing_stale() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig { bound_pages: 1, ..ZoneConfig::default() });
    let c = Constraint::untrusted();
    let zone = zones.zone(c.zone_key()).unwrap();
    zone.grow_for_map(1).unwrap();
    let junk = frames_at(&m, m.ram().start().raw(), 1);
    m.fill_phys(junk, PAGE_SIZE, 0xaa).unwrap();
    drop(BounceLoad::load(&zone, &qm, &[ClientSeg::phys(junk, 300)], &c).unwrap());
    let buf = frames_at(&m, m.ram().start().raw() + (32 << 20), 1);
    let before = pattern(100, 77);
    m.write_phys(buf, &before).unwrap();
    let load = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(buf, 100)], &c).unwrap();
    load.sync(&m, SyncOp::PREREAD).unwrap();
    m.write_phys(load.segments()[0].addr, b"0123456789").unwrap(); // the device writes 10 bytes
    load.sync(&m, SyncOp::POSTREAD).unwrap();
    let mut after = vec![0; 100];
    m.read_phys(buf, &mut after).unwrap();
    assert_eq!(&after[..10], b"0123456789");
    assert_eq!(&after[10..], &before[10..], "stale bounce bytes reached the client");
}

#[test]
fn bad_input_gets_clear_errors() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig { bound_pages: 2, ..ZoneConfig::default() });
    let c = Constraint::dma_bits(28);
    let zone = zones.zone(c.zone_key()).unwrap();
    zone.grow_for_map(2).unwrap();
    let far = frames_at(&m, LIMIT_28 + (8 << 20), 2);
    // Sync beyond the loaded length.
    let load = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(far, 1000)], &c).unwrap();
    assert_eq!(
        load.sync_range(&m, SyncOp::PREWRITE, 900, 101),
        Err(Error::OutOfRange { addr: 1001, limit: 1000 })
    );
    assert_eq!(
        load.sync_range(&m, SyncOp::POSTREAD, u64::MAX, 2),
        Err(Error::Overflow { base: u64::MAX, len: 2 })
    );
    load.sync_range(&m, SyncOp::POSTREAD, 900, 100).unwrap();
    drop(load);
    // A page-less (MMIO) entry beyond the mask would need bouncing: the CPU cannot copy it.
    let mmio = PhysAddr::new(0xfe00_0000);
    let r = BounceLoad::load(&zone, &qm, &[ClientSeg::pageless(mmio, 256)], &c);
    assert_eq!(
        r.err(),
        Some(Error::InvalidArgument {
            what: "page-less (MMIO) entry would need bouncing; its address",
            value: mmio.raw()
        })
    );
    // ... but a reachable one passes through.
    let low_mmio = PhysAddr::new(0x0800_0000);
    let ok = BounceLoad::load(&zone, &qm, &[ClientSeg::pageless(low_mmio, 256)], &c).unwrap();
    assert_eq!(ok.segments(), [DeviceSeg { addr: low_mmio, len: 256, bounced: false }]);
    assert_eq!(ok.bounce_pages(), 0);
    // Zone exhausted, no-wait.
    let held = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(far, 2 * PAGE_SIZE)], &c).unwrap();
    let r = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(far, 1)], &c);
    assert_eq!(r.err(), Some(Error::Exhausted { size: PAGE_SIZE, limit: LIMIT_28 }));
    drop(held);
    // The wrong zone for the constraint.
    let other = zones.zone(Constraint::dma_bits(32).zone_key()).unwrap();
    assert!(matches!(
        BounceLoad::load(&other, &qm, &[ClientSeg::phys(far, 1)], &c),
        Err(Error::InvalidArgument { .. })
    ));
    // Bad alignment, wrapping segments, unsupported IOMMU page sizes.
    let odd = Constraint { align: 3, ..c };
    assert!(matches!(
        BounceLoad::load(&zone, &qm, &[ClientSeg::phys(far, 1)], &odd),
        Err(Error::BadAlignment { .. })
    ));
    let wrap = ClientSeg::phys(PhysAddr::new(u64::MAX - 1), 10);
    assert!(matches!(BounceLoad::load(&zone, &qm, &[wrap], &c), Err(Error::Overflow { .. })));
    let big = Constraint { untrusted_granule: Some(1 << 16), ..Constraint::untrusted() };
    assert!(matches!(pages_needed(&[ClientSeg::phys(far, 1)], &big), Err(Error::Unsupported { .. })));
    assert_eq!(zone.stats().free_pages, 2);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random scatter lists in random bands: the device reads exactly the client's bytes,
    /// the client gets exactly the device's bytes, and the page count is what the load takes.
    #[test]
    fn bounced_scatter_lists_round_trip_through_a_28_bit_device(
        pieces in proptest::collection::vec((0u64..6, 0u64..2 * PAGE_SIZE, 1u64..3 * PAGE_SIZE), 1..6),
    ) {
        let m = HostPlatform::new(
            MachineConfig { ram_size: 512 << 20, cpus: 2, ..MachineConfig::default() }.upper_half_not_direct_mapped(),
        ).unwrap();
        let qm = QuickMaps::for_platform(&m);
        let zones = BounceZones::new(&m, ZoneConfig::default());
        let zone = zones.zone(Constraint::dma_bits(28).zone_key()).unwrap();
        zone.grow_for_map(64).unwrap();
        let bands = [16 << 20, LIMIT_28 - 3 * PAGE_SIZE, LIMIT_28 + (1 << 20), 272 << 20, 300 << 20, 400 << 20];
        let mut segs = Vec::new();
        for (i, &(band, off, len)) in pieces.iter().enumerate() {
            let base = bands[band as usize] + (i as u64) * (8 << 20);
            let pa = PhysAddr::new(base + off);
            prop_assume!(m.ram().contains(PhysAddr::new(pa.raw() + len)));
            // Pieces of one buffer never overlap (the client writes each byte once).
            prop_assume!(segs.iter().all(|s: &ClientSeg| pa.raw() + len <= s.pa().raw() || s.pa().raw() + s.len() <= pa.raw()));
            segs.push(ClientSeg::phys(pa, len));
        }
        let need = pages_needed(&segs, &Constraint::dma_bits(28)).unwrap();
        let free = zone.stats().free_pages;
        round_trip(&m, &zone, &qm, &segs);
        let load = BounceLoad::load(&zone, &qm, &segs, &Constraint::dma_bits(28)).unwrap();
        prop_assert_eq!(load.bounce_pages() as u64, need);
        prop_assert_eq!(zone.stats().free_pages, free - need);
    }
}
