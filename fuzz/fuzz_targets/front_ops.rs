//! Fuzz target 3: front-end op sequences (create / load / sync / device access / unload /
//! destroy) with random tags and scatter-gather lists, over every strategy at once: direct,
//! bounce over direct, and the IOMMU strategies (per-map, per-segment, reserved, identity)
//! through a real `busdma::iommu::Domain` on the audited model IOMMU (strict or deferred).
//!
//! The reference model is per map: loaded or not, the bytes loaded (a shadow of the source
//! memory), the direction and the segments. Invariants checked after every op:
//! - a load succeeds only into an unloaded map; its segments honour every constraint of the
//!   tag (`check_segments`) and add up to the bytes loaded; a failed load leaves the map
//!   unloaded and every resource (live IOVA ranges, bounce pages) where it was;
//! - after `PREWRITE` the device reads exactly the loaded bytes by DMA (through the IOMMU's
//!   hardware walk for the IOMMU strategies, physical for direct and bounce);
//! - a device write followed by `POSTREAD` lands in the source memory (bounce copies back);
//! - syncs of an unloaded map or against the map's direction, loads into a loaded map and
//!   unloads of an unloaded map are refused without effect;
//! - after unload (and, for a deferred domain, a flush) no byte of the old segments is
//!   reachable through the IOMMU;
//! - at the end, with every map destroyed: no live IOVA range, no identity mapping, every
//!   bounce page free, every table page back (platform counter), the audit saw no violation.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use busdma::bounce::{BounceZones, Bounced, ZoneConfig};
use busdma::front::segments::{Constraints, check_segments};
use busdma::front::{
    Direct, Direction, Identity, IommuPerMap, IommuPerSegment, IommuReserved, MemKind, Segment, SgEntry,
    SgList, Strategy, SyncOp, Tag, TagSpec,
};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::quickmap::QuickMaps;
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    Context, DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat,
};
use libfuzzer_sys::fuzz_target;

const DEV: u32 = 0x30;
/// Map slots: each owns its own source region, so one map's device writes never change what
/// another map loaded (the reference stays exact).
const SLOTS: usize = 6;
/// Pages of source memory per slot: loads of up to 8 pages, at any offset.
const SLOT_PAGES: u64 = 8;
/// Deferred domains: a queue this small fills within a sequence, so both flush causes run.
const DEFERRED: InvalidationPolicy = InvalidationPolicy::Deferred { max_entries: 4, max_age_ns: 1_000_000 };

type Dom<'a> = Domain<'a, HostPlatform, VtdSl, IovaAllocator, ModelIommu<'a>>;

struct World {
    m: HostPlatform,
    /// Source memory: SLOTS regions above 64 MiB (RAM starts at 16 MiB), so 26-bit tags bounce.
    src: PhysAddr,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) })
            .expect("machine");
        // Take the RAM below 64 MiB first so that the source lies above the 26-bit limit.
        let low = m.frames().alloc(FrameRequest::pages(12288)).expect("low");
        let src = m.frames().alloc(FrameRequest::pages(SLOTS as u64 * SLOT_PAGES)).expect("source");
        // SAFETY: `low` was allocated just above, 12288 pages, and nothing refers to it.
        unsafe { m.free_pages(low, 12288) };
        assert!(src.raw() >= 64 << 20, "source above 64 MiB");
        World { m, src }
    })
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct SpecIn {
    align_log: u8,
    boundary_log: u8,
    seg_pages: u8,
    nsegs: u8,
    bits: u8,
    max_pages: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    deferred: bool,
    specs: [SpecIn; 6],
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Create { slot: u8 },
    Load { slot: u8, dir: u8, runs: Vec<(u8, u16, u16, bool)> },
    Sync { slot: u8, op: u8 },
    DeviceWrite { slot: u8, seed: u8 },
    Unload { slot: u8 },
    Destroy { slot: u8 },
    Flush,
}

fn spec_of(s: SpecIn) -> TagSpec {
    let mut t = TagSpec::new(u64::from(s.max_pages % 12 + 1) * PAGE_SIZE, u32::from(s.nsegs % 12) + 1);
    t.alignment = if s.align_log % 4 == 0 { 1 << (s.align_log / 4 % 15) } else { 1 };
    t.boundary = match s.boundary_log % 8 {
        0..=5 => 0,
        _ => (1u64 << (12 + s.boundary_log / 8 % 6)).max(t.alignment),
    };
    t.max_segment_size = ((u64::from(s.seg_pages % 8) + 1) * PAGE_SIZE / 3).max(t.alignment);
    match s.bits % 4 {
        0 => t.dma_mask = TagSpec::mask_of_bits(26 + u32::from(s.bits / 4 % 14)),
        _ => {}
    }
    t
}

/// One map of any strategy, seen by the harness.
trait AnyMap {
    fn load(&mut self, sg: &[SgEntry], dir: Direction) -> Result<Vec<Segment>, Error>;
    fn sync(&mut self, op: SyncOp) -> Result<(), Error>;
    fn unload(&mut self) -> Result<(), Error>;
    fn is_loaded(&self) -> bool;
    fn segments(&self) -> Vec<Segment>;
}

impl<S: Strategy<HostPlatform>> AnyMap for busdma::front::DmaMap<'_, HostPlatform, S> {
    fn load(&mut self, sg: &[SgEntry], dir: Direction) -> Result<Vec<Segment>, Error> {
        // SAFETY: the target's own model RAM, kept until every map of it is dropped.
        busdma::front::DmaMap::load(self, &unsafe { SgList::new(sg) }, dir).map(|s| s.to_vec())
    }
    fn sync(&mut self, op: SyncOp) -> Result<(), Error> {
        busdma::front::DmaMap::sync(self, op).map(|_| ())
    }
    fn unload(&mut self) -> Result<(), Error> {
        busdma::front::DmaMap::unload(self)
    }
    fn is_loaded(&self) -> bool {
        busdma::front::DmaMap::is_loaded(self)
    }
    fn segments(&self) -> Vec<Segment> {
        busdma::front::DmaMap::segments(self).to_vec()
    }
}

/// The reference: what a slot's map holds.
struct Slot<'t> {
    map: Box<dyn AnyMap + 't>,
    /// Strategy index (see `run`): 0 direct, 1 bounce, 2.. through the IOMMU.
    kind: usize,
    /// Loaded: the runs `(pa, len)`, the direction, the segments.
    loaded: Option<(Vec<(u64, u64)>, Direction, Vec<Segment>)>,
}

fn iommu_kind(kind: usize) -> bool {
    kind >= 2
}

/// The device reads `segs`; `None` if any access faults.
fn device_read(w: &World, iommu: &ModelIommu<'_>, kind: usize, segs: &[Segment]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        if iommu_kind(kind) {
            iommu.port(DEV).dma_read(s.addr, &mut b).ok()?;
        } else {
            w.m.read_phys(PhysAddr::new(s.addr.raw()), &mut b).ok()?;
        }
        out.extend(b);
    }
    Some(out)
}

fn device_write(w: &World, iommu: &ModelIommu<'_>, kind: usize, segs: &[Segment], data: &[u8]) {
    let mut off = 0usize;
    for s in segs {
        let chunk = &data[off..off + s.len as usize];
        if iommu_kind(kind) {
            iommu.port(DEV).dma_write(s.addr, chunk).expect("device write through a loaded map");
        } else {
            w.m.write_phys(PhysAddr::new(s.addr.raw()), chunk).expect("device write");
        }
        off += s.len as usize;
    }
}

fn any_reachable(iommu: &ModelIommu<'_>, segs: &[Segment]) -> bool {
    let port = iommu.port(DEV);
    segs.iter().any(|s| {
        let mut a = s.addr.raw();
        while a < s.end() {
            let mut b = [0u8; 1];
            if port.dma_read(Iova::new(a), &mut b).is_ok() {
                return true;
            }
            a = (a & !(PAGE_SIZE - 1)) + PAGE_SIZE;
        }
        false
    })
}

fn read_src(w: &World, runs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(pa, len) in runs {
        let mut b = vec![0u8; len as usize];
        w.m.read_phys(PhysAddr::new(pa), &mut b).unwrap();
        out.extend(b);
    }
    out
}

fn sync_op(i: u8) -> SyncOp {
    [SyncOp::PREWRITE, SyncOp::PREREAD, SyncOp::POSTWRITE, SyncOp::POSTREAD][usize::from(i % 4)]
}

fn direction(i: u8) -> Direction {
    [Direction::ToDevice, Direction::FromDevice, Direction::Bidirectional][usize::from(i % 3)]
}

fuzz_target!(|input: Input| {
    let w = world();
    let m = &w.m;
    let table_pages0 = m.counters().table_pages_live.load(std::sync::atomic::Ordering::Relaxed);
    let policy = if input.deferred { DEFERRED } else { InvalidationPolicy::Strict };
    let iommu = ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap();
    let pool = TablePool::new(m);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: the tables live until the end of the run, after the device's last DMA.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)).unwrap() };
    let space = AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 40)).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: 2, caches: true, guard_page: false }).unwrap();
    let d: Dom<'_> =
        Domain::new(m, pt, iova, &iommu, DomainConfig { id: 1, policy, untrusted: false }).unwrap();
    let qm = QuickMaps::for_platform(m);
    let zones = BounceZones::new(m, ZoneConfig::default());
    let id = Identity::new(&d);
    // Fill the source with a pattern of this input.
    for i in 0..SLOTS as u64 * SLOT_PAGES {
        m.fill_phys(PhysAddr::new(w.src.raw() + i * PAGE_SIZE), PAGE_SIZE, (i as u8).wrapping_mul(37) | 1)
            .unwrap();
    }
    {
        let sp = input.specs;
        let t0 = Tag::new_root(m, Direct, spec_of(sp[0]));
        let t1 = Tag::new_root(m, Bounced::direct(Direct, &zones, &qm), spec_of(sp[1]));
        let t2 = Tag::new_root(m, IommuPerMap(&d), spec_of(sp[2]));
        let t3 = Tag::new_root(m, IommuPerSegment(&d), spec_of(sp[3]));
        let t4 = Tag::new_root(m, IommuReserved::alternating(&d, 2), spec_of(sp[4]));
        let t5 = Tag::new_root(m, id.clone(), spec_of(sp[5]));
        let mut slots: Vec<Option<Slot<'_>>> = (0..SLOTS).map(|_| None).collect();
        let live_iova = || d.iova().stats().live_ranges;
        let bounce_free = || zones.stats().iter().map(|z| z.1.total_pages - z.1.free_pages).sum::<u64>();
        let flush = || d.flush(&m.pin_cpu()).expect("the model IOMMU never fails an invalidation");
        for op in input.ops.into_iter().take(128) {
            match op {
                Op::Create { slot } => {
                    let i = usize::from(slot) % SLOTS;
                    if slots[i].is_some() {
                        continue;
                    }
                    let kind = usize::from(slot) / SLOTS % 6;
                    let map: Result<Box<dyn AnyMap + '_>, Error> = match kind {
                        0 => t0
                            .as_ref()
                            .map_err(|e| *e)
                            .and_then(|t| Ok(Box::new(t.create_map()?) as Box<dyn AnyMap>)),
                        1 => t1
                            .as_ref()
                            .map_err(|e| *e)
                            .and_then(|t| Ok(Box::new(t.create_map()?) as Box<dyn AnyMap>)),
                        2 => t2
                            .as_ref()
                            .map_err(|e| *e)
                            .and_then(|t| Ok(Box::new(t.create_map()?) as Box<dyn AnyMap>)),
                        3 => t3
                            .as_ref()
                            .map_err(|e| *e)
                            .and_then(|t| Ok(Box::new(t.create_map()?) as Box<dyn AnyMap>)),
                        4 => t4
                            .as_ref()
                            .map_err(|e| *e)
                            .and_then(|t| Ok(Box::new(t.create_map()?) as Box<dyn AnyMap>)),
                        _ => t5
                            .as_ref()
                            .map_err(|e| *e)
                            .and_then(|t| Ok(Box::new(t.create_map()?) as Box<dyn AnyMap>)),
                    };
                    if let Ok(map) = map {
                        slots[i] = Some(Slot { map, kind, loaded: None });
                    }
                }
                Op::Load { slot, dir, runs } => {
                    let i = usize::from(slot) % SLOTS;
                    let Some(s) = slots[i].as_mut() else { continue };
                    let spec = *[
                        &t0.as_ref().map(|t| *t.spec()),
                        &t1.as_ref().map(|t| *t.spec()),
                        &t2.as_ref().map(|t| *t.spec()),
                        &t3.as_ref().map(|t| *t.spec()),
                        &t4.as_ref().map(|t| *t.spec()),
                        &t5.as_ref().map(|t| *t.spec()),
                    ][s.kind]
                        .as_ref()
                        .unwrap();
                    let base = w.src.raw() + i as u64 * SLOT_PAGES * PAGE_SIZE;
                    let end_all = base + SLOT_PAGES * PAGE_SIZE;
                    let mut pr: Vec<(u64, u64)> = Vec::new();
                    for &(page, off, len, adj) in runs.iter().take(8) {
                        let start = match (adj, pr.last()) {
                            (true, Some(&(p, l))) => p + l,
                            _ => base + u64::from(page) % SLOT_PAGES * PAGE_SIZE + u64::from(off) % PAGE_SIZE,
                        };
                        let end = (start + u64::from(len) % (3 * PAGE_SIZE) + 1).min(end_all);
                        // Runs never overlap: a device write to one byte through two
                        // segments would leave whichever came last.
                        let clash = pr.iter().any(|&(p, l)| p < end && start < p + l);
                        if end > start && !clash {
                            pr.push((start, end - start));
                        }
                    }
                    if pr.is_empty() {
                        continue;
                    }
                    let sg: Vec<SgEntry> = pr
                        .iter()
                        .map(|&(pa, len)| SgEntry { pa: PhysAddr::new(pa), len, kind: MemKind::Page })
                        .collect();
                    let dir = direction(dir);
                    let before = (live_iova(), bounce_free());
                    let was = s.map.is_loaded();
                    let old = s.map.segments();
                    match s.map.load(&sg, dir) {
                        Ok(segs) => {
                            assert!(!was, "a load into a loaded map was accepted");
                            check_segments(&segs, &Constraints::of(&spec)).unwrap();
                            let total: u64 = pr.iter().map(|r| r.1).sum();
                            assert_eq!(
                                segs.iter().map(|s| s.len).sum::<u64>(),
                                total,
                                "segments cover the load"
                            );
                            s.loaded = Some((pr, dir, segs));
                        }
                        Err(e) => {
                            if was {
                                assert!(
                                    s.map.is_loaded() && s.map.segments() == old,
                                    "a refused load changed the map"
                                );
                            } else {
                                assert!(!s.map.is_loaded(), "a failed load left the map loaded");
                                if input.deferred {
                                    flush();
                                }
                                assert_eq!((live_iova(), bounce_free()), before, "failed load {e:?} leaked");
                                assert!(
                                    matches!(
                                        e,
                                        Error::BadSize { .. }
                                            | Error::TooManySegments { .. }
                                            | Error::Unsupported { .. }
                                            | Error::LimitExceeded { .. }
                                    ),
                                    "unexpected load error {e:?} (kind {}, spec {spec:?}, runs {sg:?})",
                                    s.kind
                                );
                            }
                        }
                    }
                    // The device sees the loaded bytes once the CPU has handed them over.
                    if let Some((pr, dir, segs)) = &s.loaded {
                        if !was && dir.device_reads() {
                            s.map.sync(SyncOp::PREWRITE).expect("PREWRITE of a loaded map");
                            let want = read_src(w, pr);
                            let got = device_read(w, &iommu, s.kind, segs);
                            let bad = got.as_ref().map(|g| g.iter().zip(&want).position(|(a, b)| a != b));
                            assert!(
                                bad == Some(None),
                                "the device reads exactly the loaded bytes (kind {}): fault or first differing byte {bad:?}, runs {pr:x?}, segments {segs:x?}",
                                s.kind
                            );
                            s.map.sync(SyncOp::POSTWRITE).expect("POSTWRITE of a loaded map");
                        }
                    }
                }
                Op::Sync { slot, op } => {
                    let Some(s) = slots[usize::from(slot) % SLOTS].as_mut() else { continue };
                    let op = sync_op(op);
                    let r = s.map.sync(op);
                    match &s.loaded {
                        None => assert!(r.is_err(), "sync of an unloaded map accepted"),
                        Some((_, dir, _)) if !dir.allows(op) => {
                            assert!(r.is_err(), "{op:?} against {dir:?} accepted")
                        }
                        Some(_) => r.expect("a sync the direction allows"),
                    }
                }
                Op::DeviceWrite { slot, seed } => {
                    let Some(s) = slots[usize::from(slot) % SLOTS].as_mut() else { continue };
                    let Some((pr, dir, segs)) = &s.loaded else { continue };
                    if !dir.device_writes() {
                        continue;
                    }
                    let total: u64 = pr.iter().map(|r| r.1).sum();
                    let data: Vec<u8> =
                        (0..total).map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed)).collect();
                    s.map.sync(SyncOp::PREREAD).expect("PREREAD of a loaded map");
                    device_write(w, &iommu, s.kind, segs, &data);
                    s.map.sync(SyncOp::POSTREAD).expect("POSTREAD of a loaded map");
                    let got = read_src(w, pr);
                    let bad = got.iter().zip(&data).position(|(a, b)| a != b);
                    assert!(
                        bad.is_none(),
                        "the device's bytes reach the loaded memory (kind {}): first differing byte {bad:?} of {total}, runs {pr:x?}, segments {segs:x?}",
                        s.kind
                    );
                }
                Op::Unload { slot } => {
                    let Some(s) = slots[usize::from(slot) % SLOTS].as_mut() else { continue };
                    let r = s.map.unload();
                    match s.loaded.take() {
                        None => assert!(r.is_err(), "unload of an unloaded map accepted"),
                        Some((_, _, segs)) => {
                            r.expect("unload of a loaded map");
                            assert!(!s.map.is_loaded());
                            if iommu_kind(s.kind) {
                                flush();
                                assert!(
                                    !any_reachable(&iommu, &segs),
                                    "reachable after unload (kind {})",
                                    s.kind
                                );
                            }
                        }
                    }
                }
                Op::Destroy { slot } => {
                    if let Some(s) = slots[usize::from(slot) % SLOTS].take() {
                        let segs = s.loaded.map(|l| l.2);
                        drop(s.map);
                        if let (Some(segs), true) = (segs, iommu_kind(s.kind)) {
                            flush();
                            assert!(
                                !any_reachable(&iommu, &segs),
                                "reachable after destroy (kind {})",
                                s.kind
                            );
                        }
                    }
                }
                Op::Flush => flush(),
            }
        }
        drop(slots);
        flush();
        assert_eq!(live_iova(), 0, "every IOVA range comes back");
        assert_eq!(bounce_free(), 0, "every bounce page comes back");
        assert_eq!(id.mapped_pages(), 0, "no identity mapping is left");
    }
    let rep = iommu.audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
    iommu.detach(DEV).unwrap();
    drop(id);
    drop(d);
    drop(pool);
    assert_eq!(
        m.counters().table_pages_live.load(std::sync::atomic::Ordering::Relaxed),
        table_pages0,
        "every table page comes back to the platform"
    );
});
