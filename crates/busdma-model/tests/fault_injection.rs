//! Fault injection across the stack: for every strategy that allocates on the way to a loaded
//! map (the IOMMU strategies under strict and deferred invalidation, bounce over direct and
//! over the IOMMU), fail the N-th allocation for N = 1, 2, … until a whole `create_map` +
//! `load` completes. After each injected failure: an error is returned, the map (if it was
//! created) is not loaded, and every resource count is back where it started (live IOVA
//! ranges, table pages the platform handed out, table pages the pool handed out, bounce pages
//! in use, identity mappings); the same map then loads once the fault is gone and the device
//! reads the loaded bytes. Two allocators are swept, each with its own hook, both ordinary
//! counters in every build: the page-table pool (`TablePool::fail_nth_alloc`, every table page
//! and gather allocation, cache hits included) and the platform (`HostPlatform::fail_nth_alloc`,
//! every `alloc_table_page` and `alloc_pages`: bounce pages, table pages the pool refills from).

use busdma::bounce::{BounceZones, Bounced, ZoneConfig};
use busdma::front::{
    Direct, Direction, Identity, IommuPerMap, IommuPerSegment, IommuReserved, MemKind, SgEntry, SgList,
    Strategy, SyncOp, Tag, TagSpec,
};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::quickmap::QuickMaps;
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    Context, DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat,
};
use std::sync::atomic::Ordering;

const DEV: u32 = 0x40;
/// Sweeps stop here at the latest: far more allocation points than one load has.
const MAX_N: u64 = 200;

type Dom<'a> = Domain<'a, HostPlatform, VtdSl, IovaAllocator, ModelIommu<'a>>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layer {
    Pool,
    Platform,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    PerMap,
    PerSegment,
    Reserved,
    Identity,
    BounceDirect,
    BounceIommu,
}

/// Every resource count the sweep watches.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Counts {
    iova_live: u64,
    table_pages_platform: u64,
    table_pages_pool: u64,
    bounce_pages: u64,
    identity_pages: usize,
}

struct Setup {
    m: HostPlatform,
    /// Source buffer: 6 pages above 64 MiB (RAM starts at 16 MiB; a 26-bit tag bounces).
    src: PhysAddr,
}

fn setup() -> Setup {
    let m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap();
    let low = m.frames().alloc(FrameRequest::pages(12288)).unwrap();
    let src = m.frames().alloc(FrameRequest::pages(6)).unwrap();
    assert!(src.raw() >= 64 << 20, "source above 64 MiB");
    // SAFETY: `low` was allocated above and nothing refers to it.
    unsafe { m.free_pages(low, 12288) };
    let data: Vec<u8> = (0..6 * PAGE_SIZE).map(|i| (i * 7 % 253) as u8 | 1).collect();
    m.write_phys(src, &data).unwrap();
    Setup { m, src }
}

/// Three runs over five pages at odd offsets: several table pages, several segments.
fn sg(src: PhysAddr) -> Vec<SgEntry> {
    let s = src.raw();
    [(s + 0x100, 0x2000), (s + 0x3000, 0x1800), (s + 0x5000, 0x800)]
        .iter()
        .map(|&(pa, len)| SgEntry { pa: PhysAddr::new(pa), len, kind: MemKind::Page })
        .collect()
}

/// One attempt: fresh domain, pool and zones; arm `n` on `layer`; create a map and load.
/// Returns `Err` (the injected failure was hit, everything checked) or `Ok(())` (the load
/// completed; everything checked).
fn attempt(
    s: &Setup,
    kind: Kind,
    policy: InvalidationPolicy,
    layer: Layer,
    n: Option<u64>,
    clean: Option<Counts>,
) -> Result<Counts, Error> {
    let m = &s.m;
    let table_pages0 = m.counters().table_pages_live.load(Ordering::Relaxed);
    let iommu = ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap();
    let pool = TablePool::new(m);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let space = AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 40)).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: 2, caches: true, guard_page: false }).unwrap();
    let d: Dom<'_> =
        Domain::new(m, pt, iova, &iommu, DomainConfig { id: 1, policy, untrusted: false }).unwrap();
    let qm = QuickMaps::for_platform(m);
    let zones = BounceZones::new(m, ZoneConfig::default());
    let id = Identity::new(&d);
    let mut spec = TagSpec::new(16 * PAGE_SIZE, 8);
    spec.max_segment_size = 3 * PAGE_SIZE;
    if matches!(kind, Kind::BounceDirect) {
        spec.dma_mask = TagSpec::mask_of_bits(26);
    }
    if matches!(kind, Kind::BounceIommu) {
        spec.flags.untrusted = true;
    }
    let counts = || {
        d.flush(&m.pin_cpu()).unwrap();
        let p = pool.stats();
        Counts {
            iova_live: d.iova().stats().live_ranges,
            table_pages_platform: m.counters().table_pages_live.load(Ordering::Relaxed),
            table_pages_pool: p.allocs - p.frees,
            bounce_pages: zones.stats().iter().map(|z| z.1.total_pages - z.1.free_pages).sum(),
            identity_pages: id.mapped_pages(),
        }
    };
    let sg = sg(s.src);
    let before = counts();
    let r = match kind {
        Kind::PerMap => one(
            m,
            &iommu,
            Tag::new_root(m, IommuPerMap(&d), spec).unwrap(),
            &sg,
            &pool,
            layer,
            n,
            before,
            clean,
            &counts,
            true,
        ),
        Kind::PerSegment => one(
            m,
            &iommu,
            Tag::new_root(m, IommuPerSegment(&d), spec).unwrap(),
            &sg,
            &pool,
            layer,
            n,
            before,
            clean,
            &counts,
            true,
        ),
        Kind::Reserved => one(
            m,
            &iommu,
            Tag::new_root(m, IommuReserved::new(&d), spec).unwrap(),
            &sg,
            &pool,
            layer,
            n,
            before,
            clean,
            &counts,
            true,
        ),
        Kind::Identity => one(
            m,
            &iommu,
            Tag::new_root(m, id.clone(), spec).unwrap(),
            &sg,
            &pool,
            layer,
            n,
            before,
            clean,
            &counts,
            true,
        ),
        Kind::BounceDirect => {
            let t = Tag::new_root(m, Bounced::direct(Direct, &zones, &qm), spec).unwrap();
            one(m, &iommu, t, &sg, &pool, layer, n, before, clean, &counts, false)
        }
        Kind::BounceIommu => {
            let t = Tag::new_root(m, Bounced::over_iommu(IommuPerMap(&d), &zones, &qm), spec).unwrap();
            one(m, &iommu, t, &sg, &pool, layer, n, before, clean, &counts, true)
        }
    };
    // After a completed load and its unload the table keeps the upper levels it built (by
    // design: they serve the next map); they go back with the domain, checked below.
    let after = counts();
    if let Some(clean) = clean {
        assert_eq!(
            after, clean,
            "{kind:?} {layer:?} n={n:?}: the failure left more than a clean load and unload"
        );
    }
    assert_eq!(
        (after.iova_live, after.bounce_pages, after.identity_pages),
        (before.iova_live, before.bounce_pages, before.identity_pages),
        "{kind:?} {layer:?} n={n:?}: unload and destroy give everything back"
    );
    let rep = iommu.audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
    iommu.detach(DEV).unwrap();
    drop(id);
    drop(d);
    drop(zones);
    drop(pool);
    assert_eq!(
        m.counters().table_pages_live.load(Ordering::Relaxed),
        table_pages0,
        "every table page comes back"
    );
    r.map(|()| after)
}

#[allow(clippy::too_many_arguments)]
fn one<S: Strategy<HostPlatform>>(
    m: &HostPlatform,
    iommu: &ModelIommu<'_>,
    tag: Tag<'_, HostPlatform, S>,
    sg: &[SgEntry],
    pool: &TablePool<'_, HostPlatform>,
    layer: Layer,
    n: Option<u64>,
    before: Counts,
    clean: Option<Counts>,
    counts: &dyn Fn() -> Counts,
    through_iommu: bool,
) -> Result<(), Error> {
    match layer {
        Layer::Pool => pool.fail_nth_alloc(n),
        Layer::Platform => m.fail_nth_alloc(n),
    }
    let injected = || pool.stats().injected_failures + m.counters().injected_failures.load(Ordering::Relaxed);
    let inj0 = injected();
    let mut map = match tag.create_map() {
        Ok(map) => map,
        Err(e) => {
            pool.fail_nth_alloc(None);
            m.fail_nth_alloc(None);
            assert_eq!(
                injected(),
                inj0 + 1,
                "n={n:?}: create failed without an injected fault: {e:?} (attempts {})",
                m.alloc_attempts()
            );
            check_failed(counts(), before, clean, n);
            // Fault gone: a fresh map loads.
            let mut map = tag.create_map().unwrap();
            // SAFETY: memory the test allocated and keeps until the map is dropped.
            map.load(&unsafe { SgList::new(sg) }, Direction::ToDevice).unwrap();
            map.unload().unwrap();
            return Err(e);
        }
    };
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let r = map.load(&unsafe { SgList::new(sg) }, Direction::ToDevice).map(|s| s.to_vec());
    pool.fail_nth_alloc(None);
    m.fail_nth_alloc(None);
    match r {
        Err(e) => {
            assert_eq!(injected(), inj0 + 1, "n={n:?}: load failed without an injected fault: {e:?}");
            assert!(!map.is_loaded(), "n={n:?}: a failed load left the map loaded");
            assert_eq!(
                e,
                Error::NoMemory { requested: e_requested(e) },
                "n={n:?}: the injected failure is reported"
            );
            drop(map);
            check_failed(counts(), before, clean, n);
            // Fault gone: a fresh map loads.
            let mut map = tag.create_map().unwrap();
            // SAFETY: memory the test allocated and keeps until the map is dropped.
            map.load(&unsafe { SgList::new(sg) }, Direction::ToDevice).unwrap();
            map.unload().unwrap();
            Err(e)
        }
        Ok(segs) => {
            map.sync(SyncOp::PREWRITE).unwrap();
            let mut want = Vec::new();
            for e in sg {
                let mut b = vec![0u8; e.len as usize];
                m.read_phys(e.pa, &mut b).unwrap();
                want.extend(b);
            }
            let mut got = Vec::new();
            for s in &segs {
                let mut b = vec![0u8; s.len as usize];
                if through_iommu {
                    iommu.port(DEV).dma_read(s.addr, &mut b).unwrap();
                } else {
                    m.read_phys(PhysAddr::new(s.addr.raw()), &mut b).unwrap();
                }
                got.extend(b);
            }
            assert!(got == want, "the device reads the loaded bytes");
            map.sync(SyncOp::POSTWRITE).unwrap();
            map.unload().unwrap();
            Ok(())
        }
    }
}

/// After a failed create or load: exactly as before, except for upper table levels installed
/// before the failure: empty, held by the domain for the next map, never more than a clean load
/// and unload leave (the caller then retries, and `attempt` checks that the end state equals a
/// clean run's).
fn check_failed(c: Counts, before: Counts, clean: Option<Counts>, n: Option<u64>) {
    assert_eq!(
        (c.iova_live, c.bounce_pages, c.identity_pages),
        (before.iova_live, before.bounce_pages, before.identity_pages),
        "n={n:?}: a failed create or load leaks"
    );
    let clean = clean.expect("the clean run never fails");
    assert!(c.table_pages_pool <= clean.table_pages_pool, "n={n:?}: table pages {c:?} > clean {clean:?}");
    assert!(
        c.table_pages_platform <= clean.table_pages_platform,
        "n={n:?}: table pages {c:?} > clean {clean:?}"
    );
}

fn e_requested(e: Error) -> u64 {
    match e {
        Error::NoMemory { requested } => requested,
        _ => u64::MAX,
    }
}

/// Sweeps N = 1, 2, … on `layer` until a load completes; returns how many loads failed.
fn sweep(kind: Kind, policy: InvalidationPolicy, layer: Layer) -> u64 {
    let s = setup();
    let clean = attempt(&s, kind, policy, layer, None, None).expect("a load without injected faults");
    for n in 1..=MAX_N {
        if attempt(&s, kind, policy, layer, Some(n), Some(clean)).is_ok() {
            return n - 1;
        }
    }
    panic!("{kind:?} {layer:?}: no load completed within {MAX_N} injected failures");
}

const POLICIES: [InvalidationPolicy; 2] =
    [InvalidationPolicy::Strict, InvalidationPolicy::Deferred { max_entries: 4, max_age_ns: 1_000_000_000 }];

#[test]
fn every_failed_table_allocation_fails_the_load_cleanly_for_every_iommu_strategy() {
    for policy in POLICIES {
        for kind in [Kind::PerMap, Kind::PerSegment, Kind::Reserved, Kind::Identity, Kind::BounceIommu] {
            let failures = sweep(kind, policy, Layer::Pool);
            // A fresh domain needs at least the three table levels below the root.
            assert!(failures >= 3, "{kind:?} {policy:?}: only {failures} allocation points");
            eprintln!("pool sweep {kind:?} {policy:?}: {failures} failing points, then a complete load");
        }
    }
}

#[test]
fn every_failed_page_allocation_fails_the_load_cleanly_for_bounce_and_iommu_strategies() {
    for kind in [
        Kind::PerMap,
        Kind::PerSegment,
        Kind::Reserved,
        Kind::Identity,
        Kind::BounceDirect,
        Kind::BounceIommu,
    ] {
        let failures = sweep(kind, InvalidationPolicy::Strict, Layer::Platform);
        assert!(failures >= 1, "{kind:?}: no platform allocation point");
        eprintln!("platform sweep {kind:?}: {failures} failing points, then a complete load");
    }
}
