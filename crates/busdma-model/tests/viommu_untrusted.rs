//! Untrusted endpoints on virtio-iommu (`busdma::device::ViommuDevice` with
//! `Policy::Untrusted`, `device/viommu.rs` theory 3), against the request-level model in
//! `common/viommu.rs`: sub-page loads bounced through the unit's zones (the device sees the
//! buffer and zeros), a guard page after every load, strict whatever was asked, bounce pages
//! back in the zone only after their UNMAP completed, nothing left after the unit's reset.

mod common;

use std::sync::Arc;

use busdma::bounce::Bounced;
use busdma::device::{DeviceConfig, Policy, ViommuDevice};
use busdma::front::segments::SegmentBuilder;
use busdma::front::{
    Direction, Invalidation, IommuPerMap, MemKind, Run, Segment, SgEntry, SgList, Strategy, SyncOp, Tag,
    TagSpec,
};
use busdma::iommu::InvalidationPolicy;
use busdma::quickmap::QuickMaps;
use busdma::{Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{FrameRequest, HostPlatform, MachineConfig};
use common::viommu::on_machine;

const DEV: u32 = 0x30;
/// Deferred bounds no test reaches by itself: only an untrusted domain's strictness sends an
/// UNMAP before the detach.
const DEFERRED: InvalidationPolicy = InvalidationPolicy::Deferred { max_entries: 64, max_age_ns: u64::MAX };
/// The buffer: 100 bytes at offset 1000 of a page whose other bytes are someone's secrets.
const OFF: u64 = 1000;
const LEN: u64 = 100;
const SECRET: u8 = 0x5e;

fn machine() -> Arc<HostPlatform> {
    Arc::new(HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap())
}

/// The machine `$m`, the virtio-iommu model `$dev` and driver `$unit` on it, and endpoint
/// `DEV` attached untrusted as `$d`, declared in the caller's scope.
macro_rules! untrusted_rig {
    ($m:ident, $dev:ident, $unit:ident, $d:ident) => {
        let $m = machine();
        let qm = QuickMaps::for_platform(&*$m);
        let ($dev, $unit) = on_machine(&$m, &qm);
        let $d = ViommuDevice::attach(&$unit, DEV, Policy::Untrusted, untrusted_cfg()).unwrap();
    };
}

fn untrusted_cfg() -> DeviceConfig {
    DeviceConfig { deferred: DEFERRED, ..DeviceConfig::default() }
}

/// A page of secrets holding the 100-byte buffer at [`OFF`]; returns the buffer's address and
/// bytes.
fn secret_page(m: &HostPlatform) -> (PhysAddr, Vec<u8>) {
    let page = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    m.fill_phys(page, PAGE_SIZE, SECRET).unwrap();
    let buf = PhysAddr::new(page.raw() + OFF);
    let data: Vec<u8> = (0..LEN as u8).map(|i| i.wrapping_mul(7) | 1).collect();
    m.write_phys(buf, &data).unwrap();
    (buf, data)
}

fn page_of(bus: Iova) -> Iova {
    Iova::new(bus.raw() & !(PAGE_SIZE - 1))
}

#[test]
fn an_untrusted_endpoint_reading_the_whole_page_around_a_100_byte_load_sees_only_its_bytes_and_zeros() {
    untrusted_rig!(m, dev, unit, d);
    // The driver does not ask for untrusted tags: the endpoint's policy makes them so.
    let tag = d.tag(TagSpec::new(1 << 16, 8)).unwrap();
    assert!(tag.spec().flags.untrusted);
    let mut map = tag.create_map().unwrap();
    let (buf, data) = secret_page(&m);
    let sg = [SgEntry { pa: buf, len: LEN, kind: MemKind::Page }];
    for round in 0..2 {
        // SAFETY: memory the test allocated and never frees.
        map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap();
        map.sync(SyncOp::PREWRITE).unwrap();
        let seg = map.segments()[0];
        assert_eq!(seg.len, LEN);
        let whole = dev.dma_read(DEV, page_of(seg.addr), PAGE_SIZE).expect("the load's page is mapped");
        let off = (seg.addr.raw() & (PAGE_SIZE - 1)) as usize;
        assert_eq!(&whole[off..off + LEN as usize], &data[..], "round {round}");
        assert!(
            whole[..off].iter().chain(&whole[off + LEN as usize..]).all(|&b| b == 0),
            "round {round}: the device read more than the buffer"
        );
        map.unload().unwrap();
        assert_eq!(dev.dma_read(DEV, seg.addr, LEN), None, "round {round}: reachable after unload");
    }
    let bounced: u64 = unit.bounce_zones().stats().iter().map(|(_, s)| s.total_bounced).sum();
    assert_eq!(bounced, 2, "one bounce page per round, from the unit's zone");
}

#[test]
fn a_device_access_one_page_past_an_untrusted_load_faults_while_the_next_load_is_live() {
    untrusted_rig!(m, dev, unit, d);
    assert!(d.domain().untrusted());
    let tag = d.tag(TagSpec::new(4 * PAGE_SIZE, 4)).unwrap();
    let mut live = Vec::new();
    for _ in 0..4 {
        let pa = m.frames().alloc(FrameRequest::pages(1)).unwrap();
        m.fill_phys(pa, PAGE_SIZE, 0x33).unwrap();
        let mut map = tag.create_map().unwrap();
        let sg = [SgEntry { pa, len: PAGE_SIZE, kind: MemKind::Page }];
        // SAFETY: memory the test allocated and never frees.
        let bus = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap()[0].addr;
        live.push((map, bus));
    }
    for (_, bus) in &live {
        assert!(dev.dma_read(DEV, *bus, PAGE_SIZE).is_some(), "the load at {bus:?} is reachable");
        let past = Iova::new(bus.raw() + PAGE_SIZE);
        assert_eq!(dev.dma_read(DEV, past, 1), None, "the page past the load at {bus:?} is mapped");
    }
}

#[test]
fn an_untrusted_endpoint_is_strict_whatever_was_asked_its_unmap_is_sent_by_the_unload_never_queued() {
    untrusted_rig!(m, dev, unit, d);
    let tag = d.tag(TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let mut map = tag.create_map().unwrap();
    let (buf, _) = secret_page(&m);
    let sg = [SgEntry { pa: buf, len: LEN, kind: MemKind::Page }];
    for round in 1..=3u64 {
        // SAFETY: memory the test allocated and never frees.
        let bus = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap()[0].addr;
        map.unload().unwrap();
        assert_eq!(dev.requests(4), round, "the UNMAP was sent before the unload returned");
        // Sent by the domain's unmap itself, not by a flush of a queue after it: the bounce
        // page went back to the zone only after its UNMAP completed.
        assert_eq!((d.domain().pending(), d.domain().stats().flushes), (0, 0), "queued, then flushed");
        assert_eq!(dev.dma_read(DEV, page_of(bus), 1), None);
    }
    assert_eq!(d.domain().policy(), InvalidationPolicy::Strict);
}

#[test]
fn untrusted_bounce_pages_go_back_to_the_units_zone_at_unload_and_the_reset_unit_leaves_no_page_behind() {
    let m = machine();
    let (buf, _) = secret_page(&m);
    let qm = QuickMaps::for_platform(&*m);
    let before = m.frames().free_frames();
    let (_dev, unit) = on_machine(&m, &qm);
    let d = ViommuDevice::attach(&unit, DEV, Policy::Untrusted, untrusted_cfg()).unwrap();
    let tag = d.tag(TagSpec::new(2 * PAGE_SIZE, 2)).unwrap();
    let zone = |unit: &busdma::virtio_iommu::VirtioIommu<'_, HostPlatform>| {
        let z = unit.bounce_zones().stats();
        assert_eq!(z.len(), 1, "one zone for the unit");
        z[0].1
    };
    let mut maps: Vec<_> = (0..2).map(|_| tag.create_map().unwrap()).collect();
    let sg = [SgEntry { pa: buf, len: LEN, kind: MemKind::Page }];
    for map in &mut maps {
        // SAFETY: memory the test allocated and never frees.
        map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap();
    }
    let loaded = zone(&unit);
    assert_eq!(loaded.total_pages - loaded.free_pages, 2, "one bounce page per live load");
    for map in &mut maps {
        map.unload().unwrap();
    }
    let unloaded = zone(&unit);
    assert_eq!(unloaded.free_pages, unloaded.total_pages, "every bounce page back at unload");
    drop(maps);
    drop(tag);
    d.detach().unwrap();
    // SAFETY: no endpoint behind the model issues DMA from here on.
    unsafe { unit.reset() }.unwrap();
    assert_eq!(m.frames().free_frames(), before, "the zones' and the queues' pages all freed");
}

#[test]
fn a_failed_unmap_keeps_the_untrusted_loads_bounce_page_out_of_the_zone_forever() {
    untrusted_rig!(m, dev, unit, d);
    let tag = d.tag(TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let mut map = tag.create_map().unwrap();
    let (buf, data) = secret_page(&m);
    let sg = [SgEntry { pa: buf, len: LEN, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and never frees.
    let bus = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap()[0].addr;
    map.sync(SyncOp::PREWRITE).unwrap();
    dev.fail_unmaps(true);
    assert!(map.unload().is_err(), "the UNMAP failed");
    dev.fail_unmaps(false);
    assert_eq!(dev.dma_read(DEV, bus, LEN).as_deref(), Some(&data[..]), "still reachable: the UNMAP failed");
    let z = unit.bounce_zones().stats()[0].1;
    assert_eq!(z.total_pages - z.free_pages, 1, "the reachable bounce page is not free for reuse");
    // Another load of the same map must not be given the page the device still reaches.
    let other = PhysAddr::new(buf.raw() + 2 * LEN);
    let sg2 = [SgEntry { pa: other, len: LEN, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and never frees.
    map.load(&unsafe { SgList::new(&sg2) }, Direction::ToDevice).unwrap();
    map.sync(SyncOp::PREWRITE).unwrap();
    assert_eq!(dev.dma_read(DEV, bus, LEN).as_deref(), Some(&data[..]), "the old bounce page was reused");
    map.unload().unwrap();
}

/// An inner strategy watched: each `wait_unmapped` records how many bounce pages of `zones`
/// are still reserved when it is called.
#[derive(Clone)]
struct Watched<'a, 'p, S> {
    inner: S,
    zones: &'a busdma::bounce::BounceZones<'p, HostPlatform>,
    reserved_at_wait: &'a std::sync::Mutex<Vec<u64>>,
}

impl<S: Strategy<HostPlatform>> Strategy<HostPlatform> for Watched<'_, '_, S> {
    const NAME: &'static str = "watched";
    type MapState = S::MapState;
    fn invalidation(&self) -> Invalidation {
        self.inner.invalidation()
    }
    fn unload_revokes(&self) -> bool {
        self.inner.unload_revokes()
    }
    fn check_tag(&self, p: &HostPlatform, spec: &TagSpec) -> busdma::Result<()> {
        self.inner.check_tag(p, spec)
    }
    fn create(&self, p: &HostPlatform, spec: &TagSpec) -> busdma::Result<S::MapState> {
        self.inner.create(p, spec)
    }
    fn load(
        &self,
        p: &HostPlatform,
        spec: &TagSpec,
        state: &mut S::MapState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> busdma::Result<()> {
        self.inner.load(p, spec, state, runs, dir, segs)
    }
    fn unload(
        &self,
        p: &HostPlatform,
        state: &mut S::MapState,
        runs: &[Run],
        segs: &[Segment],
    ) -> busdma::Result<()> {
        self.inner.unload(p, state, runs, segs)
    }
    fn destroy(&self, p: &HostPlatform, state: S::MapState) {
        self.inner.destroy(p, state)
    }
    fn wait_unmapped(&self, p: &HostPlatform) -> busdma::Result<()> {
        let reserved = self.zones.stats().iter().map(|(_, s)| s.total_pages - s.free_pages).sum();
        self.reserved_at_wait.lock().unwrap().push(reserved);
        self.inner.wait_unmapped(p)
    }
    fn sync(
        &self,
        p: &HostPlatform,
        spec: &TagSpec,
        state: &S::MapState,
        op: SyncOp,
        range: std::ops::Range<u64>,
    ) -> busdma::Result<()> {
        self.inner.sync(p, spec, state, op, range)
    }
}

#[test]
fn bounced_over_a_deferred_endpoint_gives_a_bounce_page_back_only_after_its_queued_unmap_went_out() {
    // A driver composing `Bounced` by hand over a deferred endpoint's domain (no `Policy`
    // forces strict here): the front end's own untrusted wait comes after the strategy's
    // unload, so `Bounced` must wait first, or the page is free for another load while the
    // device still reaches it.
    let m = machine();
    let qm = QuickMaps::for_platform(&*m);
    let (dev, unit) = on_machine(&m, &qm);
    let d = ViommuDevice::attach(&unit, DEV, Policy::Deferred, untrusted_cfg()).unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let inner = Watched {
        inner: IommuPerMap(d.attachment().clone()),
        zones: unit.bounce_zones(),
        reserved_at_wait: &seen,
    };
    let mut spec = TagSpec::new(PAGE_SIZE, 1);
    spec.flags.untrusted = true;
    let tag =
        Tag::new_root(&*m, Bounced::over_iommu(inner, unit.bounce_zones(), unit.quick_maps()), spec).unwrap();
    let mut map = tag.create_map().unwrap();
    let (buf, _) = secret_page(&m);
    let sg = [SgEntry { pa: buf, len: LEN, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and never frees.
    map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap();
    map.unload().unwrap();
    assert_eq!(dev.requests(4), 1, "the queued UNMAP went out before the unload returned");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.first(),
        Some(&1),
        "the first wait for the UNMAP found the bounce page already free: {seen:?}"
    );
    let z = unit.bounce_zones().stats()[0].1;
    assert_eq!(z.free_pages, z.total_pages, "back in the zone after the wait");
}
