//! One driver, two kinds of IOMMU: a driver written once against `busdma::device::DmaDevice`
//! runs unchanged on the model's table-walking IOMMU (`Device` over `ModelIommu`, the VT-d
//! shape) and on a virtio-iommu (`ViommuDevice` over the request-level model in
//! `common/viommu.rs`), strict, deferred and untrusted (`device` theory 8).

mod common;

use std::sync::Arc;

use busdma::device::{DetachError, DeviceConfig, DmaDevice, Iommu, Policy, ViommuDevice};
use busdma::front::{Direction, MemKind, SgEntry, SgList, SyncOp, TagSpec};
use busdma::iommu::InvalidationPolicy;
use busdma::quickmap::QuickMaps;
use busdma::{Error, Iova, PAGE_SIZE, Platform};
use busdma_model::{DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu};
use common::viommu::on_machine as viommu;

const DEV: u32 = 0x30;
/// Deferred bounds no test reaches by itself: only the detach flushes.
const DEFERRED: InvalidationPolicy = InvalidationPolicy::Deferred { max_entries: 64, max_age_ns: u64::MAX };

fn machine() -> Arc<HostPlatform> {
    Arc::new(HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap())
}

/// What the device read at `bus`, `len` bytes (`None`: blocked).
type Reader<'r> = &'r dyn Fn(Iova, u64) -> Option<Vec<u8>>;

/// The driver: loads a buffer through a tag of `d`, lets the device read it, unloads; the
/// detach is refused while the tag lives (the device handed back), completes after it, and
/// from then on the device's read of the old bus address is blocked. Returns the bus address.
fn driver<'a, D: DmaDevice<'a, Platform = HostPlatform>>(d: D, read: Reader<'_>) -> Iova {
    let p = d.platform();
    let len = 3 * PAGE_SIZE;
    let pa = p.frames().alloc(FrameRequest::pages(3)).unwrap();
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8 | 1).collect();
    p.write_phys(pa, &data).unwrap();
    let tag = d.tag(TagSpec::new(16 * PAGE_SIZE, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    let sg = [SgEntry { pa, len, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and never frees.
    let segs = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap().to_vec();
    map.sync(SyncOp::PREWRITE).unwrap();
    assert_eq!(segs.len(), 1);
    let bus = segs[0].addr;
    assert_ne!(bus.raw(), pa.raw(), "translated: the bus address is not the physical one");
    assert_eq!(read(bus, len).as_deref(), Some(&data[..]), "the device reads exactly the loaded bytes");
    map.unload().unwrap();
    drop(map);
    let d = match d.detach() {
        Err(DetachError::Busy { device, handles: 1 }) => device,
        Err(e) => panic!("detach with a live tag: {e:?}"),
        Ok(()) => panic!("detached while a tag was alive"),
    };
    drop(tag);
    d.detach().unwrap();
    assert_eq!(read(bus, len), None, "blocked after the detach");
    bus
}

/// The same driver behind the model IOMMU (page tables, `Device`).
fn on_model_iommu(policy: Policy) {
    let m = machine();
    let qm = QuickMaps::for_platform(&*m);
    let model = ModelIommu::new(&m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap();
    let iommu = Iommu::new(&*m, &qm, model).unwrap();
    let d = iommu.attach(DEV, policy).unwrap();
    let port = iommu.hw().port(DEV);
    driver(d, &|bus, len| {
        let mut b = vec![0u8; len as usize];
        port.dma_read(bus, &mut b).ok().map(|()| b)
    });
    assert_eq!(iommu.stats().leaked_domains, 0);
    assert_eq!(iommu.hw().audit_report().unwrap().violation_count, 0);
}

/// The same driver behind virtio-iommu (requests, `ViommuDevice`).
fn on_viommu(policy: Policy) {
    let m = machine();
    let qm = QuickMaps::for_platform(&*m);
    let (dev, unit) = viommu(&m, &qm);
    let cfg = DeviceConfig { deferred: DEFERRED, ..DeviceConfig::default() };
    let d = ViommuDevice::attach(&unit, DEV, policy, cfg).unwrap();
    let unmaps_before = dev.requests(4);
    driver(d, &|bus, len| dev.dma_read(DEV, bus, len));
    assert!(dev.requests(4) > unmaps_before, "the unload's UNMAP was sent by the detach at the latest");
    assert_eq!(dev.requests(2), 1, "one DETACH");
}

#[test]
fn one_driver_runs_unchanged_on_a_table_iommu_strict() {
    on_model_iommu(Policy::Strict);
}

#[test]
fn one_driver_runs_unchanged_on_a_table_iommu_deferred() {
    on_model_iommu(Policy::Deferred);
}

#[test]
fn one_driver_runs_unchanged_on_a_table_iommu_untrusted() {
    on_model_iommu(Policy::Untrusted);
}

#[test]
fn one_driver_runs_unchanged_on_virtio_iommu_strict() {
    on_viommu(Policy::Strict);
}

#[test]
fn one_driver_runs_unchanged_on_virtio_iommu_deferred() {
    on_viommu(Policy::Deferred);
}

#[test]
fn one_driver_runs_unchanged_on_virtio_iommu_untrusted() {
    on_viommu(Policy::Untrusted);
}

#[test]
fn a_deferred_virtio_iommu_unload_stays_reachable_until_its_batch_and_the_detach_sends_it() {
    let m = machine();
    let qm = QuickMaps::for_platform(&*m);
    let (dev, unit) = viommu(&m, &qm);
    let cfg = DeviceConfig { deferred: DEFERRED, ..DeviceConfig::default() };
    let d = ViommuDevice::attach(&unit, DEV, Policy::Deferred, cfg).unwrap();
    let pa = m.frames().alloc(FrameRequest::pages(1)).unwrap();
    m.fill_phys(pa, PAGE_SIZE, 0x77).unwrap();
    let tag = d.tag(TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let mut map = tag.create_map().unwrap();
    let sg = [SgEntry { pa, len: PAGE_SIZE, kind: MemKind::Page }];
    // SAFETY: memory the test allocated and never frees.
    let bus = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap()[0].addr;
    map.unload().unwrap();
    drop(map);
    drop(tag);
    assert_eq!(dev.requests(4), 0, "deferred: the UNMAP is queued, not sent");
    assert!(dev.dma_read(DEV, bus, 8).is_some(), "reachable until its batch goes out");
    d.detach().unwrap();
    assert_eq!(dev.requests(4), 1, "the detach sent the queued UNMAP");
    assert_eq!(dev.dma_read(DEV, bus, 8), None);
}

#[test]
fn virtio_iommu_refuses_identity_and_bypass_before_any_request() {
    let m = machine();
    let qm = QuickMaps::for_platform(&*m);
    let (dev, unit) = viommu(&m, &qm);
    for policy in [Policy::Identity, Policy::Bypass] {
        match ViommuDevice::attach(&unit, DEV, policy, DeviceConfig::default()) {
            Err(Error::Unsupported { .. }) => {}
            Err(e) => panic!("{policy:?}: {e}"),
            Ok(_) => panic!("{policy:?}: attached"),
        }
    }
    assert_eq!((dev.requests(1), unit.stats().requests), (0, 0));
}

/// One step of the reference-model property: load a fresh buffer of `pages` pages, or unload
/// the live map at `index % live`.
#[derive(Clone, Debug)]
enum Op {
    Load(u64),
    Unload(usize),
}

fn arb_ops() -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
    use proptest::prelude::*;
    proptest::collection::vec(
        prop_oneof![(1u64..4).prop_map(Op::Load), (0usize..8).prop_map(Op::Unload)],
        1..24,
    )
}

/// Runs `ops` through a tag of `d` (the same code for every backend) against a reference
/// model: a live map's bus range reads exactly its bytes; under strict invalidation (strict
/// and untrusted) an unloaded range reads none of its old bytes (blocked, or another live
/// map's); after the detach nothing is reachable.
fn reference_run<'a, D: DmaDevice<'a, Platform = HostPlatform>>(d: D, read: Reader<'_>, ops: &[Op]) {
    let p = d.platform();
    let strict = matches!(d.policy(), Policy::Strict | Policy::Untrusted);
    let tag = d.tag(TagSpec::new(4 * PAGE_SIZE, 4)).unwrap();
    let mut live = Vec::new();
    let mut gone: Vec<(Iova, Vec<u8>)> = Vec::new();
    for (n, op) in ops.iter().enumerate() {
        match *op {
            Op::Load(pages) => {
                let len = pages * PAGE_SIZE;
                let pa = p.frames().alloc(FrameRequest::pages(pages)).unwrap();
                let data: Vec<u8> = (0..len).map(|i| ((i + 1) * (n as u64 + 3) % 251) as u8 | 1).collect();
                p.write_phys(pa, &data).unwrap();
                let mut map = tag.create_map().unwrap();
                let sg = [SgEntry { pa, len, kind: MemKind::Page }];
                // SAFETY: memory the test allocated and never frees.
                let bus = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap()[0].addr;
                live.push((map, bus, data));
            }
            Op::Unload(i) if !live.is_empty() => {
                let (mut map, bus, data) = live.remove(i % live.len());
                map.unload().unwrap();
                gone.push((bus, data));
            }
            Op::Unload(_) => {}
        }
        for (_, bus, data) in &live {
            assert_eq!(read(*bus, data.len() as u64).as_deref(), Some(&data[..]), "live map at {bus:?}");
        }
        if strict {
            for (bus, data) in &gone {
                assert_ne!(read(*bus, data.len() as u64).as_deref(), Some(&data[..]), "unloaded at {bus:?}");
            }
        }
    }
    drop(live);
    drop(tag);
    d.detach().unwrap();
    for (bus, data) in &gone {
        assert_eq!(read(*bus, data.len() as u64), None, "reachable after the detach");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

    #[test]
    fn any_sequence_of_loads_and_unloads_matches_the_reference_on_both_iommus_under_every_translated_policy(
        ops in arb_ops(),
        policy in proptest::sample::select(vec![Policy::Strict, Policy::Deferred, Policy::Untrusted]),
    ) {
        let m = machine();
        let qm = QuickMaps::for_platform(&*m);
        let model = ModelIommu::new(&m, IommuConfig::default()).unwrap();
        let iommu = Iommu::new(&*m, &qm, model).unwrap();
        let port = iommu.hw().port(DEV);
        reference_run(iommu.attach(DEV, policy).unwrap(), &|bus, len| {
            let mut b = vec![0u8; len as usize];
            port.dma_read(bus, &mut b).ok().map(|()| b)
        }, &ops);
        let m2 = machine();
        let qm2 = QuickMaps::for_platform(&*m2);
        let (dev, unit) = viommu(&m2, &qm2);
        let cfg = DeviceConfig { deferred: DEFERRED, ..DeviceConfig::default() };
        let d = ViommuDevice::attach(&unit, DEV, policy, cfg).unwrap();
        reference_run(d, &|bus, len| dev.dma_read(DEV, bus, len), &ops);
    }
}
