//! Fuzz target 5: deferred loads (`DmaMap::load_or_defer`) and their cancellation, on a waiting
//! tag over a strict domain whose IOVA space is only [`SPACE_PAGES`] pages (no per-CPU caches,
//! so shortage is exact), through the audited model IOMMU.
//!
//! Ops on [`SLOTS`] map slots: load (1 to 6 pages; queued when the space is short), cancel,
//! finish, device check, unload and destroy, in any order. Invariants checked after every op:
//! - a load never fails with a final error (every load fits the tag), and one loaded at once
//!   never runs its callback; a queued load's callback runs exactly once: with success when it
//!   completes, with `Cancelled` when it is cancelled or its map destroyed while queued;
//! - queued loads complete in arrival order (a later one never before an earlier one that still
//!   waits);
//! - no lost wake-up: while a load waits, something holds IOVA space (a loaded map, or a
//!   completed load not yet finished), since any one load fits the empty space;
//! - a loaded or completed map gives the device exactly its bytes; after its strict unload
//!   (when no queued load took the space back at once), none of its old bus addresses
//!   translates;
//! - at the end, every map destroyed: nothing waits, `deferred = completed + cancelled`, none
//!   failed, no live IOVA, the audit saw no violation.
#![no_main]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use busdma::front::{
    Deferrable, DeferredCallback, Direction, DmaMap, IommuPerMap, PendingLoad, RawSegments, Segment, SyncOp,
    Tag, TagSpec,
};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    Context, DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat,
};
use libfuzzer_sys::fuzz_target;

const DEV: u32 = 0x31;
const SLOTS: usize = 4;
/// IOVA pages of the domain: two loads of 4 pages fill it; any one load (≤ 6 pages) fits.
const SPACE_PAGES: u64 = 8;
/// Pages of source memory (loads start anywhere in the first `SRC_PAGES - 6`).
const SRC_PAGES: u64 = 16;

type Dom<'a> = Domain<'a, HostPlatform, VtdSl, IovaAllocator, ModelIommu<'a>>;
type S<'a> = IommuPerMap<&'a Dom<'a>>;

struct World {
    m: HostPlatform,
    src: PhysAddr,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let m = HostPlatform::new(MachineConfig { cpus: 1, ..MachineConfig::with_ram(32 << 20) })
            .expect("machine");
        let src = m.frames().alloc(FrameRequest::pages(SRC_PAGES)).expect("source");
        let data: Vec<u8> = (0..SRC_PAGES * PAGE_SIZE).map(|i| (i as u8).wrapping_mul(37) | 1).collect();
        m.write_phys(src, &data).expect("fill");
        World { m, src }
    })
}

#[derive(Arbitrary, Debug)]
enum Op {
    Load { slot: u8, pages: u8, at: u8 },
    Cancel { slot: u8 },
    Finish { slot: u8 },
    Check { slot: u8 },
    Unload { slot: u8 },
    Destroy { slot: u8 },
}

/// Callback log: load id -> the outcomes its callback was called with.
type Log = Arc<Mutex<BTreeMap<u64, Vec<Result<(), Error>>>>>;

enum State<'a> {
    Empty,
    Idle(DmaMap<'a, HostPlatform, S<'a>>),
    /// Loaded at once, or finished after completing: its run `(pa, len)` and load id.
    Loaded(DmaMap<'a, HostPlatform, S<'a>>, (u64, u64)),
    /// Queued (or completed, not yet finished): run, load id.
    Pending(PendingLoad<'a, HostPlatform, S<'a>>, (u64, u64), u64),
}

fn calls(log: &Log, id: u64) -> Vec<Result<(), Error>> {
    log.lock().unwrap().get(&id).cloned().unwrap_or_default()
}

/// Callbacks run so far.
fn completions(log: &Log) -> usize {
    log.lock().unwrap().values().map(Vec::len).sum()
}

fn device_reads_exactly(w: &World, iommu: &ModelIommu<'_>, segs: &[Segment], run: (u64, u64)) {
    let mut got = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        iommu.port(DEV).dma_read(s.addr, &mut b).expect("device read of a loaded map");
        got.extend(b);
    }
    let mut want = vec![0u8; run.1 as usize];
    w.m.read_phys(PhysAddr::new(run.0), &mut want).expect("source");
    assert!(got == want, "the device read other bytes than were loaded");
}

fn unreachable(iommu: &ModelIommu<'_>, segs: &[Segment]) -> bool {
    segs.iter().all(|s| {
        let mut b = [0u8; 1];
        iommu.port(DEV).dma_read(s.addr, &mut b).is_err()
    })
}

fn run(ops: &[Op]) {
    let w = world();
    let m = &w.m;
    let iommu = ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).expect("iommu");
    let pool = TablePool::new(m);
    let pt = PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true })
        .expect("table");
    // SAFETY: the domain below outlives every DMA of the device; it is detached before the
    // domain is dropped.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)) }
        .expect("attach");
    let space = AddrRange::new(Iova::new(1 << 20), Iova::new((1 << 20) + SPACE_PAGES * PAGE_SIZE)).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: 1, caches: false, guard_page: false }).unwrap();
    let d: Dom<'_> =
        Domain::new(m, pt, iova, &iommu, DomainConfig::new(1, InvalidationPolicy::Strict)).unwrap();
    {
        let mut spec = TagSpec::new(8 * PAGE_SIZE, 8);
        spec.flags.may_wait = true;
        let tag = Tag::new_root(m, IommuPerMap(&d), spec).expect("tag");
        let log: Log = Arc::default();
        let mut slots: Vec<State<'_>> = (0..SLOTS).map(|_| State::Empty).collect();
        // Arrival order of the loads that were queued, and the order they completed in.
        let mut queued: Vec<u64> = Vec::new();
        let mut next_id = 0u64;
        let _bind = m.bind_cpu(0).expect("bind");
        for op in ops {
            match *op {
                Op::Load { slot, pages, at } => {
                    let i = slot as usize % SLOTS;
                    let map = match std::mem::replace(&mut slots[i], State::Empty) {
                        State::Empty => tag.create_map().expect("create"),
                        State::Idle(map) => map,
                        other => {
                            slots[i] = other;
                            continue;
                        }
                    };
                    let pages = 1 + u64::from(pages) % 6;
                    let run = (w.src.raw() + u64::from(at) % (SRC_PAGES - 6) * PAGE_SIZE, pages * PAGE_SIZE);
                    next_id += 1;
                    let id = next_id;
                    let l = log.clone();
                    let cb: DeferredCallback<'_, _, _> = Box::new(move |res| {
                        l.lock().unwrap().entry(id).or_default().push(res.map(|_| ()));
                    });
                    let src = [(PhysAddr::new(run.0), run.1)];
                    // SAFETY: the target's own model RAM, kept for the whole process.
                    match map.load_or_defer(&unsafe { RawSegments::new(&src) }, Direction::ToDevice, cb) {
                        Ok(Deferrable::Loaded(map)) => {
                            assert!(calls(&log, id).is_empty(), "a load done at once ran its callback");
                            slots[i] = State::Loaded(map, run);
                        }
                        Ok(Deferrable::Deferred(p)) => {
                            queued.push(id);
                            slots[i] = State::Pending(p, run, id);
                        }
                        Err((e, _)) => panic!("a load that fits the tag failed: {e:?}"),
                    }
                }
                Op::Cancel { slot } => {
                    let i = slot as usize % SLOTS;
                    if let State::Pending(p, run, id) = std::mem::replace(&mut slots[i], State::Empty) {
                        let was_done = p.is_done();
                        let map = p.cancel().ok().expect("one thread: a pending load is never being retried");
                        let c = calls(&log, id);
                        if map.is_loaded() {
                            assert!(was_done && c == [Ok(())], "cancel of a completed load: {c:?}");
                            slots[i] = State::Loaded(map, run);
                        } else {
                            assert_eq!(c, [Err(Error::Cancelled)], "a cancelled load's callback");
                            slots[i] = State::Idle(map);
                        }
                    }
                }
                Op::Finish { slot } => {
                    let i = slot as usize % SLOTS;
                    if let State::Pending(p, run, id) = std::mem::replace(&mut slots[i], State::Empty) {
                        match p.try_finish() {
                            Ok(map) => {
                                assert_eq!(calls(&log, id), [Ok(())], "a finished load's callback");
                                assert!(map.is_loaded());
                                slots[i] = State::Loaded(map, run);
                            }
                            Err(p) => {
                                assert!(calls(&log, id).is_empty(), "a waiting load's callback ran");
                                slots[i] = State::Pending(p, run, id);
                            }
                        }
                    }
                }
                Op::Check { slot } => {
                    if let State::Loaded(map, run) = &mut slots[slot as usize % SLOTS] {
                        map.sync(SyncOp::PREWRITE).expect("sync");
                        device_reads_exactly(w, &iommu, map.segments(), *run);
                        map.sync(SyncOp::POSTWRITE).expect("sync");
                    }
                }
                Op::Unload { slot } => {
                    let i = slot as usize % SLOTS;
                    if let State::Loaded(mut map, _) = std::mem::replace(&mut slots[i], State::Empty) {
                        let segs = map.segments().to_vec();
                        let before = completions(&log);
                        map.unload().expect("unload");
                        // Unless a queued load just took the space (and maybe the same IOVA).
                        if completions(&log) == before {
                            assert!(unreachable(&iommu, &segs), "a strict unload left a translation");
                        }
                        slots[i] = State::Idle(map);
                    }
                }
                Op::Destroy { slot } => {
                    let i = slot as usize % SLOTS;
                    match std::mem::replace(&mut slots[i], State::Empty) {
                        State::Pending(p, _, id) => {
                            let was_done = p.is_done();
                            drop(p);
                            let c = calls(&log, id);
                            let want: &[Result<(), Error>] =
                                if was_done { &[Ok(())] } else { &[Err(Error::Cancelled)] };
                            assert_eq!(c, want, "a destroyed pending load's callback");
                        }
                        State::Loaded(map, _) => {
                            let segs = map.segments().to_vec();
                            let before = completions(&log);
                            drop(map);
                            if completions(&log) == before {
                                assert!(unreachable(&iommu, &segs), "a destroyed map left a translation");
                            }
                        }
                        _ => {}
                    }
                }
            }
            // Arrival order: the queued loads that completed did so in the order they queued.
            let done: Vec<u64> = {
                let l = log.lock().unwrap();
                queued.iter().copied().filter(|id| l.get(id).is_some_and(|c| c == &[Ok(())])).collect()
            };
            let waiting: Vec<u64> = {
                let l = log.lock().unwrap();
                queued.iter().copied().filter(|id| !l.contains_key(id)).collect()
            };
            if let (Some(&first_waiting), Some(&last_done)) = (waiting.first(), done.last()) {
                assert!(
                    last_done < first_waiting,
                    "load {last_done} completed before {first_waiting}, queued earlier"
                );
            }
            // No lost wake-up: something holds space while a load waits.
            if !waiting.is_empty() {
                let holds = slots.iter().any(|s| match s {
                    State::Loaded(..) => true,
                    State::Pending(p, _, _) => p.is_done(),
                    _ => false,
                });
                assert!(holds, "loads {waiting:?} wait while the space is empty: {:?}", tag.deferred_stats());
            }
        }
        drop(slots);
        let st = tag.deferred_stats();
        assert_eq!(st.waiting, 0, "{st:?}");
        assert_eq!(st.failed, 0, "{st:?}");
        assert_eq!(st.deferred, st.completed + st.cancelled, "{st:?}");
        assert_eq!(st.deferred, queued.len() as u64, "{st:?}");
        let l = log.lock().unwrap();
        for id in &queued {
            assert_eq!(l.get(id).map(Vec::len), Some(1), "queued load {id}'s callback");
        }
    }
    assert_eq!(d.iova().stats().live_ranges, 0, "IOVA left live");
    let rep = iommu.audit_report().expect("audit");
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
    iommu.detach(DEV).expect("detach");
    drop(d);
}

fuzz_target!(|ops: Vec<Op>| {
    run(&ops);
});
