//! `busdma::device` on the model IOMMU: one call attaches a device with a policy; tags from
//! the device reach exactly the loaded bytes; detaching removes the context and invalidates
//! the domain before its tables can be reused, and leaks them when that cannot be proven
//! (issue 14, hole 8).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use busdma::device::{DetachError, Device, Iommu, IommuHw, Policy};
use busdma::front::{
    Direction, Invalidation, MemKind, RawSegment, SgEntry, SgList, Strategy, SyncOp, TagSpec,
};
use busdma::iommu::{DomainId, IotlbInvalidator};
use busdma::quickmap::QuickMaps;
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::dma::FaultReason;
use busdma_model::{DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu};

const DEV: u32 = 0x30;
const OTHER: u32 = 0x31;

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

fn model(m: &HostPlatform) -> ModelIommu<'_> {
    ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap()
}

/// `len` bytes of a recognisable pattern at a fresh page plus `off`, the page around them
/// filled with 0x5e (secrets the device must not see).
fn buffer(m: &HostPlatform, off: u64, len: u64) -> (PhysAddr, Vec<u8>) {
    let page = m.frames().alloc(FrameRequest::pages(len.div_ceil(PAGE_SIZE) + 1)).unwrap();
    m.fill_phys(page, 2 * PAGE_SIZE, 0x5e).unwrap();
    let pa = PhysAddr::new(page.raw() + off);
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8 | 1).collect();
    m.write_phys(pa, &data).unwrap();
    (pa, data)
}

fn read(model: &ModelIommu<'_>, dev: u32, at: Iova, len: u64) -> Result<Vec<u8>, FaultReason> {
    let mut b = vec![0u8; len as usize];
    model.port(dev).dma_read(at, &mut b).map_err(|f| f.reason)?;
    Ok(b)
}

fn spec() -> TagSpec {
    TagSpec::new(16 * PAGE_SIZE, 8)
}

/// Loads `len` bytes at page offset `off` through a tag of `d`, checks that the device reads
/// exactly them, unloads; returns the segment's bus address.
fn round_trip(m: &HostPlatform, d: &Device<'_, '_, ModelIommu<'_>>, off: u64, len: u64) -> (Iova, PhysAddr) {
    let (pa, data) = buffer(m, off, len);
    let tag = d.tag(spec()).unwrap();
    let mut map = tag.create_map().unwrap();
    let sg = [SgEntry { pa, len, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let segs = map.load(&unsafe { SgList::new(&sg) }, Direction::Bidirectional).unwrap().to_vec();
    map.sync(SyncOp::PREWRITE.union(SyncOp::PREREAD)).unwrap();
    assert_eq!(segs.len(), 1);
    let got = read(d.iommu().hw(), d.id(), segs[0].addr, len).unwrap();
    assert_eq!(got, data, "{:?}: the device reads exactly the loaded bytes", d.policy());
    map.sync(SyncOp::POSTREAD.union(SyncOp::POSTWRITE)).unwrap();
    map.unload().unwrap();
    (segs[0].addr, pa)
}

#[test]
fn every_policy_attaches_with_one_call_and_the_device_reads_exactly_the_loaded_bytes() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    for policy in [Policy::Strict, Policy::Deferred, Policy::Untrusted, Policy::Identity, Policy::Bypass] {
        let d = iommu.attach(DEV, policy).unwrap();
        round_trip(&m, &d, 0, 3 * PAGE_SIZE);
        round_trip(&m, &d, 100, 1000);
        d.detach().unwrap();
    }
    let s = iommu.stats();
    assert_eq!((s.attached, s.detached, s.leaked_domains), (5, 5, 0));
    assert_eq!(iommu.hw().domain_ids_in_use(), 0, "every domain id came back");
    let rep = iommu.hw().audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
}

#[test]
fn strict_invalidates_each_unload_and_deferred_batches_them_into_whole_domain_flushes() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    for (policy, want) in [(Policy::Strict, Invalidation::Strict), (Policy::Deferred, Invalidation::Deferred)]
    {
        let d = iommu.attach(DEV, policy).unwrap();
        assert_eq!(d.tag(spec()).unwrap().strategy().invalidation(), want);
        let before = iommu.hw().stats();
        for _ in 0..10 {
            round_trip(&m, &d, 0, PAGE_SIZE);
        }
        let after = iommu.hw().stats();
        let ranged = after.inv_range - before.inv_range;
        let whole = after.inv_domain - before.inv_domain;
        match policy {
            Policy::Strict => {
                assert_eq!((ranged, whole), (10, 0), "strict: one ranged invalidation per unload")
            }
            _ => {
                assert_eq!((ranged, whole), (0, 0), "deferred: nothing yet (10 < 256 queued)");
                assert_eq!(d.domain().unwrap().domain().pending(), 10);
            }
        }
        d.detach().unwrap();
    }
}

#[test]
fn untrusted_forces_strict_and_untrusted_tags_and_bounces_a_sub_page_buffer() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Untrusted).unwrap();
    let tag = d.tag(spec()).unwrap();
    assert!(tag.spec().flags.untrusted, "the device's tags are untrusted whatever the spec said");
    assert_eq!(tag.strategy().invalidation(), Invalidation::Strict);
    assert!(d.domain().unwrap().domain().policy() == busdma::iommu::InvalidationPolicy::Strict);
    let (pa, data) = buffer(&m, 1000, 100);
    let mut map = tag.create_map().unwrap();
    let sg = [SgEntry { pa, len: 100, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let seg = map.load(&unsafe { SgList::new(&sg) }, Direction::Bidirectional).unwrap()[0];
    map.sync(SyncOp::PREWRITE.union(SyncOp::PREREAD)).unwrap();
    // The whole IOMMU page around the segment: the buffer, and zeros where the client page
    // holds its secrets.
    let page = Iova::new(seg.addr.raw() & !(PAGE_SIZE - 1));
    let whole = read(iommu.hw(), DEV, page, PAGE_SIZE).unwrap();
    let off = (seg.addr.raw() - page.raw()) as usize;
    assert_eq!(&whole[off..off + 100], &data[..]);
    assert!(
        whole[..off].iter().chain(&whole[off + 100..]).all(|&b| b == 0),
        "bounced: only the buffer and zeros"
    );
    map.unload().unwrap();
    assert!(read(iommu.hw(), DEV, page, 1).is_err(), "strict: unreachable once unloaded");
}

#[test]
fn identity_maps_each_page_at_its_physical_address_and_bypass_gives_physical_addresses() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    for policy in [Policy::Identity, Policy::Bypass] {
        let d = iommu.attach(DEV, policy).unwrap();
        let (bus, pa) = round_trip(&m, &d, 24, 5000);
        assert_eq!(bus.raw(), pa.raw(), "{policy:?}: bus address = physical address");
        match policy {
            Policy::Identity => {
                assert!(d.domain().is_some());
                assert!(read(iommu.hw(), DEV, bus, 1).is_err(), "identity: unmapped once unloaded");
            }
            _ => {
                assert!(d.domain().is_none(), "bypass: no domain");
                assert!(read(iommu.hw(), DEV, bus, 1).is_ok(), "bypass: untranslated, all of RAM");
            }
        }
        d.detach().unwrap();
        assert_eq!(read(iommu.hw(), DEV, bus, 1), Err(FaultReason::NotAttached));
    }
}

#[test]
fn attaching_a_device_twice_is_an_error_and_leaves_the_first_attachment_working() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    for policy in [Policy::Strict, Policy::Identity, Policy::Bypass] {
        assert!(
            matches!(iommu.attach(DEV, policy), Err(Error::AlreadyMapped { addr }) if addr == u64::from(DEV)),
            "{policy:?}"
        );
    }
    assert_eq!(iommu.hw().domain_ids_in_use(), 1, "the refused attaches gave their ids back");
    assert_eq!((iommu.stats().attached, iommu.stats().detached), (1, 0));
    round_trip(&m, &d, 0, PAGE_SIZE);
    let b = iommu.attach(OTHER, Policy::Bypass).unwrap();
    assert!(matches!(iommu.attach(OTHER, Policy::Strict), Err(Error::AlreadyMapped { .. })));
    drop(b);
    d.detach().unwrap();
}

#[test]
fn tags_and_maps_outliving_the_device_value_keep_its_domain_attached_and_sound() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(spec()).unwrap();
    let mut map = tag.create_map().unwrap();
    let d = match d.detach() {
        Err(DetachError::Busy { device, handles }) => {
            assert_eq!(handles, 1, "the tag");
            device
        }
        r => panic!("detach with a live tag: {r:?}"),
    };
    drop(d);
    assert_eq!(iommu.stats().detached, 0, "still attached: the tag holds the domain");
    let (pa, data) = buffer(&m, 0, PAGE_SIZE);
    let sg = [SgEntry { pa, len: PAGE_SIZE, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let seg = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap()[0];
    assert_eq!(read(iommu.hw(), DEV, seg.addr, PAGE_SIZE).unwrap(), data);
    map.unload().unwrap();
    drop(map);
    drop(tag);
    assert_eq!(iommu.stats().detached, 1, "the last handle detached");
    assert_eq!(read(iommu.hw(), DEV, seg.addr, 1), Err(FaultReason::NotAttached));
}

#[test]
fn a_dropped_device_never_reaches_the_next_domain_that_reuses_its_table_pages() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let old = iommu.attach(DEV, Policy::Strict).unwrap();
    let old_root = old.domain().unwrap().domain().table().root();
    let (bus, _) = round_trip(&m, &old, 0, PAGE_SIZE);
    drop(old);
    // The next domain: its tables come from the same pool, its IOVA from the same aperture.
    let new = iommu.attach(OTHER, Policy::Strict).unwrap();
    let new_root = new.domain().unwrap().domain().table().root();
    assert_eq!(new_root, old_root, "the hazard is real: the pool handed the old root to the new domain");
    let (secret, data) = buffer(&m, 0, PAGE_SIZE);
    let tag = new.tag(spec()).unwrap();
    let mut map = tag.create_map().unwrap();
    let sg = [SgEntry { pa: secret, len: PAGE_SIZE, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let seg = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap()[0];
    assert_eq!(seg.addr, bus, "the new domain maps its secret at the old device's bus address");
    assert_eq!(read(iommu.hw(), OTHER, seg.addr, PAGE_SIZE).unwrap(), data);
    assert_eq!(read(iommu.hw(), DEV, bus, PAGE_SIZE), Err(FaultReason::NotAttached), "the old device faults");
    map.unload().unwrap();
    let rep = iommu.hw().audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
}

/// The model IOMMU with a log of the attach calls and failures on demand.
struct Flaky<'m> {
    model: ModelIommu<'m>,
    log: Mutex<Vec<String>>,
    fail_detach: AtomicBool,
    fail_invalidate_all: AtomicBool,
}

impl IotlbInvalidator for Flaky<'_> {
    fn invalidate_range(&self, domain: DomainId, range: AddrRange<Iova>) -> busdma::Result<()> {
        self.model.invalidate_range(domain, range)
    }
    fn invalidate_all(&self, domain: DomainId) -> busdma::Result<()> {
        self.log.lock().unwrap().push(format!("invalidate_all {domain}"));
        if self.fail_invalidate_all.load(Ordering::Relaxed) {
            return Err(Error::InvalidationFailed { what: "injected", domain: domain.into(), status: 0 });
        }
        self.model.invalidate_all(domain)
    }
}

// SAFETY: every answer is the model's (whose impl is trusted); the injected failures only make
// `detach` and `invalidate_all` report errors after doing nothing, which the contract allows.
unsafe impl<'m> IommuHw for Flaky<'m> {
    type Platform = HostPlatform;
    type Format = <ModelIommu<'m> as IommuHw>::Format;
    type DeviceId = u32;
    fn platform(&self) -> &HostPlatform {
        IommuHw::platform(&self.model)
    }
    fn input_bits(&self) -> u32 {
        self.model.input_bits()
    }
    fn coherent_walker(&self) -> bool {
        self.model.coherent_walker()
    }
    fn alloc_domain_id(&self) -> busdma::Result<DomainId> {
        self.model.alloc_domain_id()
    }
    fn free_domain_id(&self, id: DomainId) {
        self.model.free_domain_id(id)
    }
    unsafe fn attach_tables(&self, dev: u32, domain: DomainId, root: PhysAddr) -> busdma::Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.model.attach_tables(dev, domain, root) }
    }
    fn attach_bypass(&self, dev: u32) -> busdma::Result<()> {
        self.model.attach_bypass(dev)
    }
    fn detach(&self, dev: u32, domain: Option<DomainId>) -> busdma::Result<()> {
        self.log.lock().unwrap().push(format!("detach {dev}"));
        if self.fail_detach.load(Ordering::Relaxed) {
            return Err(Error::BadState { what: "injected detach failure" });
        }
        IommuHw::detach(&self.model, dev, domain)
    }
}

fn flaky(m: &HostPlatform) -> Flaky<'_> {
    Flaky {
        model: model(m),
        log: Mutex::new(Vec::new()),
        fail_detach: AtomicBool::new(false),
        fail_invalidate_all: AtomicBool::new(false),
    }
}

#[test]
fn detach_removes_the_context_and_invalidates_the_domain_before_its_table_pages_go_back() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, flaky(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let id = d.domain().unwrap().domain().id();
    let tag = d.tag(spec()).unwrap();
    let mut map = tag.create_map().unwrap();
    let (pa, _) = buffer(&m, 0, PAGE_SIZE);
    let sg = [SgEntry { pa, len: PAGE_SIZE, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap();
    map.unload().unwrap();
    drop(map);
    drop(tag);
    let frees = iommu.pool().stats().frees;
    iommu.hw().log.lock().unwrap().clear();
    d.detach().unwrap();
    let log = iommu.hw().log.lock().unwrap().clone();
    assert_eq!(log[0], format!("detach {DEV}"), "the context goes first: {log:?}");
    assert_eq!(log[1], format!("invalidate_all {id}"), "then a whole-domain invalidation: {log:?}");
    assert!(iommu.pool().stats().frees > frees, "then the tables go back to the pool");
    assert_eq!(iommu.stats().leaked_domains, 0);
}

#[test]
fn a_failed_detach_or_invalidation_leaks_the_domain_its_tables_and_its_id_and_counts_it() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, flaky(&m)).unwrap();
    for (fail_detach, fail_inval) in [(true, false), (false, true)] {
        let d = iommu.attach(DEV + u32::from(fail_inval), Policy::Deferred).unwrap();
        let tag = d.tag(spec()).unwrap();
        let mut map = tag.create_map().unwrap();
        let (pa, _) = buffer(&m, 0, PAGE_SIZE);
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { RawSegment::new(pa, PAGE_SIZE) }, Direction::ToDevice).unwrap();
        map.unload().unwrap();
        drop(map);
        drop(tag);
        let (frees, ids) = (iommu.pool().stats().frees, iommu.hw().model.domain_ids_in_use());
        iommu.hw().fail_detach.store(fail_detach, Ordering::Relaxed);
        iommu.hw().fail_invalidate_all.store(fail_inval, Ordering::Relaxed);
        match d.detach() {
            Err(DetachError::Failed(e)) => {
                assert!(matches!(e, Error::BadState { .. } | Error::InvalidationFailed { .. }))
            }
            r => panic!("{r:?}"),
        }
        iommu.hw().fail_detach.store(false, Ordering::Relaxed);
        iommu.hw().fail_invalidate_all.store(false, Ordering::Relaxed);
        assert_eq!(iommu.pool().stats().frees, frees, "no table page went back");
        assert_eq!(iommu.hw().model.domain_ids_in_use(), ids, "the id is never reused");
    }
    assert_eq!(iommu.stats().leaked_domains, 2);
    assert_eq!(iommu.stats().detached, 0);
}

#[test]
fn the_device_handle_and_its_tags_are_send_and_sync() {
    fn both<T: Send + Sync>() {}
    both::<Device<'static, 'static, ModelIommu<'static>>>();
    both::<busdma::device::DeviceTag<'static, 'static, ModelIommu<'static>>>();
    let _ = HostPlatform::num_cpus;
}
