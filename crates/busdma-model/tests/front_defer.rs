//! Deferred loads through the front end (`busdma::front::defer`): a may-wait load that cannot
//! get its resources (IOVA space, bounce pages, table pages) waits in arrival order and its
//! callback runs exactly once, with the segments or the final error, when an unload or destroy
//! frees them; a no-wait load fails at once and leaves nothing; cancellation and destroy of a
//! pending load have a defined callback outcome; nothing leaks; real threads racing loads,
//! unloads and cancellations complete every deferred load exactly once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use busdma::bounce::{BounceZones, Bounced, ZoneConfig};
use busdma::front::{
    Deferrable, DeferredCallback, Direct, Direction, DmaMap, IommuPerMap, MemKind, PendingLoad, RawSegment,
    RawSegments, Segment, SgEntry, SgList, Strategy, SyncOp, Tag, TagSpec,
};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::quickmap::QuickMaps;
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    Context, DirectPort, DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu,
    TableFormat,
};

const DEV: u32 = 0x50;
/// IOVA space of the small domain: 8 pages, so two 4-page loads fill it.
const SPACE_PAGES: u64 = 8;

type Dom<'a> = Domain<'a, HostPlatform, VtdSl, IovaAllocator, ModelIommu<'a>>;

fn machine(cpus: usize) -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

/// Runs `body` with a strict VT-d domain whose IOVA space is `SPACE_PAGES` pages (no per-CPU
/// caches, so exhaustion is exact), on an audited model IOMMU; checks the audit after.
fn with_small_domain<R>(
    m: &HostPlatform,
    body: impl FnOnce(&Dom<'_>, &ModelIommu<'_>, &TablePool<'_, HostPlatform>) -> R,
) -> R {
    let iommu = ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap();
    let pool = TablePool::new(m);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let space = AddrRange::new(Iova::new(1 << 20), Iova::new((1 << 20) + SPACE_PAGES * PAGE_SIZE)).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: false, guard_page: false })
        .unwrap();
    let d = Domain::new(m, pt, iova, &iommu, DomainConfig::new(1, InvalidationPolicy::Strict)).unwrap();
    let r = body(&d, &iommu, &pool);
    let rep = iommu.audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
    iommu.detach(DEV).unwrap();
    drop(d);
    r
}

fn may_wait(spec: TagSpec) -> TagSpec {
    let mut s = spec;
    s.flags.may_wait = true;
    s
}

/// `pages` pages of fresh RAM, each byte stamped with `seed`.
fn buffer(m: &HostPlatform, pages: u64, seed: u8) -> PhysAddr {
    let pa = m.frames().alloc(FrameRequest::pages(pages)).unwrap();
    let data: Vec<u8> = (0..pages * PAGE_SIZE).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
    m.write_phys(pa, &data).unwrap();
    pa
}

fn bytes(m: &HostPlatform, pa: PhysAddr, len: u64) -> Vec<u8> {
    let mut b = vec![0; len as usize];
    m.read_phys(pa, &mut b).unwrap();
    b
}

fn device_read(iommu: &ModelIommu<'_>, segs: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        iommu.port(DEV).dma_read(s.addr, &mut b).unwrap();
        out.extend(b);
    }
    out
}

/// A log of callback outcomes: (label, Ok(segments) or the error).
type Log = Arc<Mutex<Vec<(u32, Result<Vec<Segment>, Error>)>>>;

fn logging<'p, P: Platform, S: Strategy<P>>(log: &Log, label: u32) -> DeferredCallback<'p, P, S> {
    let log = log.clone();
    Box::new(move |r| {
        let r = r.map(|m| m.segments().to_vec());
        log.lock().unwrap().push((label, r));
    })
}

fn deferred<'p, P: Platform, S: Strategy<P>>(d: Deferrable<'p, P, S>) -> PendingLoad<'p, P, S> {
    match d {
        Deferrable::Deferred(p) => p,
        Deferrable::Loaded(_) => panic!("expected the load to be deferred"),
    }
}

fn loaded<'p, P: Platform, S: Strategy<P>>(d: Deferrable<'p, P, S>) -> DmaMap<'p, P, S> {
    match d {
        Deferrable::Loaded(m) => m,
        Deferrable::Deferred(_) => panic!("expected the load to complete at once"),
    }
}

fn labels(log: &Log) -> Vec<u32> {
    log.lock().unwrap().iter().map(|e| e.0).collect()
}

#[test]
fn deferred_loads_complete_in_arrival_order_and_a_blocked_head_is_not_overtaken() {
    let m = machine(2);
    with_small_domain(&m, |d, iommu, _| {
        let tag =
            Tag::new_root(&m, IommuPerMap(d), may_wait(TagSpec::new(SPACE_PAGES * PAGE_SIZE, 8))).unwrap();
        let (a_pa, b_pa, c_pa, e_pa) =
            (buffer(&m, 4, 1), buffer(&m, 4, 2), buffer(&m, 8, 3), buffer(&m, 1, 4));
        // SAFETY: every segment is model RAM the test allocated and keeps until its maps drop.
        let src = |pa: PhysAddr, pages: u64| unsafe { RawSegment::new(pa, pages * PAGE_SIZE) };
        let log: Log = Arc::default();
        // A and B fill the space.
        let a = tag.create_map().unwrap();
        let mut a = loaded(a.load_or_defer(&src(a_pa, 4), Direction::ToDevice, logging(&log, 0)).unwrap());
        let b = tag.create_map().unwrap();
        let mut b = loaded(b.load_or_defer(&src(b_pa, 4), Direction::ToDevice, logging(&log, 0)).unwrap());
        // C needs the whole space; E needs one page and arrives after C.
        let c = tag.create_map().unwrap();
        let c = deferred(c.load_or_defer(&src(c_pa, 8), Direction::ToDevice, logging(&log, 3)).unwrap());
        let e = tag.create_map().unwrap();
        let e = deferred(e.load_or_defer(&src(e_pa, 1), Direction::ToDevice, logging(&log, 5)).unwrap());
        assert_eq!(tag.deferred_stats().waiting, 2);
        assert!(labels(&log).is_empty(), "immediate loads run no callback");

        // B's unload frees 4 pages: E would fit, but it is behind C, which does not.
        b.unload().unwrap();
        assert!(labels(&log).is_empty() && !c.is_done() && !e.is_done(), "E overtook C");
        // A's unload frees the rest: C completes; E waits again (the space is full).
        a.unload().unwrap();
        assert_eq!(labels(&log), [3]);
        assert!(c.is_done() && !e.is_done());
        let mut c = c.try_finish().expect("C completed");
        assert!(c.is_loaded() && c.len() == 8 * PAGE_SIZE);
        c.sync(SyncOp::PREWRITE).unwrap();
        assert_eq!(device_read(iommu, c.segments()), bytes(&m, c_pa, 8 * PAGE_SIZE));
        let e = e.try_finish().expect_err("E still waits");
        // C's segments are the ones its callback saw.
        assert_eq!(log.lock().unwrap()[0].1.as_deref(), Ok(c.segments()));
        // Destroying C (drop) frees the space: E completes.
        drop(c);
        assert_eq!(labels(&log), [3, 5]);
        let mut e = e.try_finish().expect("E completed");
        e.sync(SyncOp::PREWRITE).unwrap();
        assert_eq!(device_read(iommu, e.segments()), bytes(&m, e_pa, PAGE_SIZE));
        e.unload().unwrap();
        let st = tag.deferred_stats();
        assert_eq!((st.waiting, st.deferred, st.completed, st.failed, st.cancelled), (0, 2, 2, 0, 0));
        drop((a, b, e));
        assert_eq!(d.iova().stats().live_ranges, 0, "every IOVA range is back");
    });
}

#[test]
fn a_no_wait_load_under_pressure_fails_at_once_and_leaves_nothing() {
    let m = machine(2);
    with_small_domain(&m, |d, _, pool| {
        let (a_pa, b_pa) = (buffer(&m, 8, 1), buffer(&m, 1, 2));
        // A tag that may not wait: load_or_defer is the no-wait load.
        let nowait = Tag::new_root(&m, IommuPerMap(d), TagSpec::new(SPACE_PAGES * PAGE_SIZE, 8)).unwrap();
        let mut a = nowait.create_map().unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        a.load(&unsafe { RawSegment::new(a_pa, 8 * PAGE_SIZE) }, Direction::ToDevice).unwrap();
        let tables = pool.stats().allocs - pool.stats().frees;
        let b = nowait.create_map().unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let r2 = ran.clone();
        let cb: DeferredCallback<'_, _, _> = Box::new(move |_| {
            r2.fetch_add(1, Ordering::SeqCst);
        });
        let (err, b) =
            // SAFETY: memory the test allocated and keeps until the map is dropped.
            b.load_or_defer(&unsafe { RawSegment::new(b_pa, PAGE_SIZE) }, Direction::ToDevice, cb).err().unwrap();
        assert!(matches!(err, Error::Exhausted { .. }), "{err:?}");
        assert!(!b.is_loaded() && b.segments().is_empty() && b.runs().is_empty());
        assert_eq!(ran.load(Ordering::SeqCst), 0, "a failed no-wait load runs no callback");
        assert_eq!(d.iova().stats().live_ranges, 1, "only A's window is live");
        assert_eq!(pool.stats().allocs - pool.stats().frees, tables, "no table page kept");
        assert_eq!(nowait.deferred_stats(), Default::default());

        // On a tree that may wait, a no-wait load does not overtake a waiter: Busy.
        let wait =
            Tag::new_root(&m, IommuPerMap(d), may_wait(TagSpec::new(SPACE_PAGES * PAGE_SIZE, 8))).unwrap();
        let log: Log = Arc::default();
        let w = wait.create_map().unwrap();
        let w = deferred(
            w.load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegment::new(b_pa, PAGE_SIZE) },
                Direction::ToDevice,
                logging(&log, 1),
            )
            .unwrap(),
        );
        let mut n = wait.create_map().unwrap();
        assert_eq!(
            // SAFETY: memory the test allocated and keeps until the map is dropped.
            n.load(&unsafe { RawSegment::new(b_pa, PAGE_SIZE) }, Direction::ToDevice).unwrap_err(),
            Error::Busy { what: "deferred loads of this tag tree waiting ahead", count: 1 }
        );
        assert!(!n.is_loaded() && n.runs().is_empty());
        assert_eq!(d.iova().stats().live_ranges, 1);
        // A child that may not wait is refused the same way (the queue is the tree's).
        let child = wait.child(TagSpec::new(PAGE_SIZE, 1)).unwrap();
        let mut cm = child.create_map().unwrap();
        assert!(matches!(
            // SAFETY: memory the test allocated and keeps until the map is dropped.
            cm.load(&unsafe { RawSegment::new(b_pa, PAGE_SIZE) }, Direction::ToDevice),
            Err(Error::Busy { .. })
        ));
        // A child may not claim waiting its parent lacks.
        assert!(matches!(
            nowait.child(may_wait(TagSpec::new(PAGE_SIZE, 1))),
            Err(Error::InvalidArgument { .. })
        ));
        // A's tag is another tree: its unload does not know this tree's waiters; the tree is
        // told to look again.
        a.unload().unwrap();
        assert!(!w.is_done());
        wait.retry_deferred();
        assert!(w.is_done() && labels(&log) == [1]);
        drop(w);
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        n.load(&unsafe { RawSegment::new(b_pa, PAGE_SIZE) }, Direction::ToDevice).unwrap();
        n.unload().unwrap();
        drop((a, b, n, cm));
        assert_eq!(d.iova().stats().live_ranges, 0);
    });
}

#[test]
fn cancelling_or_destroying_a_pending_load_runs_its_callback_once_with_cancelled_and_unblocks_the_next() {
    let m = machine(2);
    with_small_domain(&m, |d, iommu, _| {
        let tag =
            Tag::new_root(&m, IommuPerMap(d), may_wait(TagSpec::new(SPACE_PAGES * PAGE_SIZE, 8))).unwrap();
        let (a_pa, b_pa, c_pa) = (buffer(&m, 6, 1), buffer(&m, 8, 2), buffer(&m, 2, 3));
        let log: Log = Arc::default();
        let a = tag.create_map().unwrap();
        let mut a = loaded(
            a.load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegment::new(a_pa, 6 * PAGE_SIZE) },
                Direction::ToDevice,
                logging(&log, 0),
            )
            .unwrap(),
        );
        let b = tag.create_map().unwrap();
        let b = deferred(
            b.load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegment::new(b_pa, 8 * PAGE_SIZE) },
                Direction::ToDevice,
                logging(&log, 2),
            )
            .unwrap(),
        );
        let c = tag.create_map().unwrap();
        let c = deferred(
            c.load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegment::new(c_pa, 2 * PAGE_SIZE) },
                Direction::FromDevice,
                logging(&log, 3),
            )
            .unwrap(),
        );
        // C (2 pages) would fit the 2 free pages but waits behind B. Cancelling B runs B's
        // callback with Cancelled, returns B's map unloaded, and lets C through.
        let b = b.cancel().expect("B was queued");
        assert!(!b.is_loaded() && b.runs().is_empty());
        {
            let l = log.lock().unwrap();
            assert_eq!(l[0], (2, Err(Error::Cancelled)));
            assert_eq!(l[1].0, 3);
            assert!(l[1].1.is_ok());
        }
        let mut c = c.try_finish().expect("C completed after B's cancellation");
        assert!(c.is_loaded());
        // The cancelled map is a normal map again: it loads (no-wait) once space is free.
        a.unload().unwrap();
        let mut b = b;
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        b.load(&unsafe { RawSegment::new(b_pa, 6 * PAGE_SIZE) }, Direction::ToDevice).unwrap();
        b.sync(SyncOp::PREWRITE).unwrap();
        assert_eq!(device_read(iommu, b.segments()), bytes(&m, b_pa, 6 * PAGE_SIZE));

        // Destroying a map with a pending load (dropping the PendingLoad): the callback runs
        // once with Cancelled, the map is destroyed, nothing is kept.
        let before = d.iova().stats().live_ranges;
        let x = tag.create_map().unwrap();
        let x = deferred(
            x.load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegment::new(b_pa, 4 * PAGE_SIZE) },
                Direction::ToDevice,
                logging(&log, 4),
            )
            .unwrap(),
        );
        drop(x);
        assert_eq!(log.lock().unwrap().last().unwrap(), &(4, Err(Error::Cancelled)));
        assert_eq!(d.iova().stats().live_ranges, before);
        // Dropping a pending load that already completed unloads and destroys its map.
        c.unload().unwrap();
        let y = tag.create_map().unwrap();
        let y = deferred(
            y.load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegment::new(c_pa, 4 * PAGE_SIZE) },
                Direction::ToDevice,
                logging(&log, 5),
            )
            .unwrap(),
        );
        b.unload().unwrap();
        assert!(y.is_done() && y.outcome() == Some(Ok(())));
        assert_eq!(d.iova().stats().live_ranges, 1);
        drop(y);
        assert_eq!(d.iova().stats().live_ranges, 0, "a completed pending load is unloaded when dropped");
        let n = |l: u32| log.lock().unwrap().iter().filter(|e| e.0 == l).count();
        assert!((2..=5).all(|l| n(l) == 1), "every callback ran exactly once: {:?}", labels(&log));
        let st = tag.deferred_stats();
        assert_eq!((st.waiting, st.deferred, st.completed, st.cancelled), (0, 4, 2, 2));
    });
}

#[test]
fn a_callback_syncs_and_starts_the_device_with_the_segments_it_is_given() {
    let m = machine(2);
    with_small_domain(&m, |d, iommu, _| {
        let tag =
            Tag::new_root(&m, IommuPerMap(d), may_wait(TagSpec::new(SPACE_PAGES * PAGE_SIZE, 8))).unwrap();
        let (a_pa, b_pa) = (buffer(&m, 8, 1), buffer(&m, 4, 2));
        let mut a = tag.create_map().unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        a.load(&unsafe { RawSegment::new(a_pa, 8 * PAGE_SIZE) }, Direction::ToDevice).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let iommu_ref: &ModelIommu<'_> = iommu;
        let want = bytes(&m, b_pa, 4 * PAGE_SIZE);
        let b = tag.create_map().unwrap();
        let b = deferred(
            b.load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegment::new(b_pa, 4 * PAGE_SIZE) },
                Direction::ToDevice,
                Box::new(move |r| {
                    let mut map = r.unwrap();
                    assert_eq!((map.len(), map.is_empty()), (4 * PAGE_SIZE, false));
                    map.sync(SyncOp::PREWRITE).unwrap();
                    assert!(
                        matches!(map.sync(SyncOp::POSTREAD), Err(Error::InvalidArgument { .. })),
                        "the load's direction is still checked"
                    );
                    s2.lock().unwrap().push(device_read(iommu_ref, map.segments()) == want);
                }),
            )
            .unwrap(),
        );
        assert!(seen.lock().unwrap().is_empty());
        drop(a);
        assert_eq!(*seen.lock().unwrap(), [true], "the device read B's bytes from inside the callback");
        let mut b = b.try_finish().ok().unwrap();
        b.sync(SyncOp::POSTWRITE).unwrap();
        drop(b);
        assert_eq!(d.iova().stats().live_ranges, 0);
    });
}

#[test]
fn a_deferred_bounce_load_completes_when_pages_return_and_the_28_bit_device_reads_its_bytes() {
    let m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(512 << 20) }).unwrap();
    let qm = QuickMaps::for_platform(&m);
    // A zone of 4 pages: one 4-page bounced load takes them all.
    let zones = BounceZones::new(&m, ZoneConfig { bound_pages: 4, ..ZoneConfig::default() });
    let mut spec = may_wait(TagSpec::new(4 * PAGE_SIZE, 4));
    spec.dma_mask = TagSpec::mask_of_bits(28);
    let tag = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), spec).unwrap();
    // Client buffers above 256 MiB: the device cannot reach them, every byte bounces.
    let mut held = Vec::new();
    let high = loop {
        let pa = m.frames().alloc(FrameRequest::pages(64)).unwrap();
        if pa.raw() >= 1 << 28 {
            break pa;
        }
        held.push(pa);
    };
    // Give the RAM below back: the zone's bounce pages come from there.
    for pa in held {
        m.frames().free(pa, 64).unwrap();
    }
    let src = |i: u64| PhysAddr::new(high.raw() + i * 4 * PAGE_SIZE);
    for i in 0..3 {
        m.write_phys(src(i), &vec![0x40 | i as u8; 4 * PAGE_SIZE as usize]).unwrap();
    }
    let sg = |i: u64| [SgEntry { pa: src(i), len: 4 * PAGE_SIZE, kind: MemKind::Page }];
    let sgs = [sg(0), sg(1), sg(2)];
    let dev = DirectPort::new(&m, 1, 28);
    let read_dev = |segs: &[Segment]| {
        let mut out = Vec::new();
        for s in segs {
            let mut b = vec![0; s.len as usize];
            dev.dma_read(s.addr, &mut b).unwrap();
            out.extend(b);
        }
        out
    };
    let zone_free = || zones.stats()[0].1.free_pages;
    let log: Log = Arc::default();
    let a = tag.create_map().unwrap();
    let mut a = loaded(
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        a.load_or_defer(&unsafe { SgList::new(&sgs[0]) }, Direction::ToDevice, logging(&log, 0)).unwrap(),
    );
    assert_eq!(zone_free(), 0);
    let b = tag.create_map().unwrap();
    let b = deferred(
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        b.load_or_defer(&unsafe { SgList::new(&sgs[1]) }, Direction::ToDevice, logging(&log, 1)).unwrap(),
    );
    let c = tag.create_map().unwrap();
    let c = deferred(
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        c.load_or_defer(&unsafe { SgList::new(&sgs[2]) }, Direction::ToDevice, logging(&log, 2)).unwrap(),
    );
    a.sync(SyncOp::PREWRITE).unwrap();
    assert_eq!(read_dev(a.segments()), vec![0x40; 4 * PAGE_SIZE as usize]);
    a.unload().unwrap();
    assert_eq!(labels(&log), [1], "B first, C still waits");
    let mut b = b.try_finish().ok().unwrap();
    b.sync(SyncOp::PREWRITE).unwrap();
    assert_eq!(read_dev(b.segments()), vec![0x41; 4 * PAGE_SIZE as usize]);
    assert!(b.segments().iter().all(|s| s.end() <= 1 << 28), "bounced below the mask");
    b.unload().unwrap();
    let mut c = c.try_finish().ok().unwrap();
    c.sync(SyncOp::PREWRITE).unwrap();
    assert_eq!(read_dev(c.segments()), vec![0x42; 4 * PAGE_SIZE as usize]);
    drop((a, b, c));
    let z = zones.stats()[0].1;
    assert_eq!((z.free_pages, z.total_pages, z.waiting), (4, 4, 0), "every bounce page is back");
}

#[test]
fn a_load_short_of_table_pages_is_deferred_not_failed_and_the_retry_after_queuing_completes_it() {
    let m = machine(2);
    with_small_domain(&m, |d, iommu, pool| {
        let tag =
            Tag::new_root(&m, IommuPerMap(d), may_wait(TagSpec::new(SPACE_PAGES * PAGE_SIZE, 8))).unwrap();
        let pa = buffer(&m, 2, 9);
        let log: Log = Arc::default();
        let map = tag.create_map().unwrap();
        // The first table-page allocation of the load fails: NoMemory is a resource, so the
        // load is queued; the page is there again for the retry made right after queuing
        // (theory 4), which completes it before `load_or_defer` returns.
        pool.fail_nth_alloc(Some(1));
        let injected = pool.stats().injected_failures;
        let p = deferred(
            map.load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegment::new(pa, 2 * PAGE_SIZE) },
                Direction::ToDevice,
                logging(&log, 1),
            )
            .unwrap(),
        );
        assert_eq!(
            pool.stats().injected_failures,
            injected + 1,
            "the first attempt hit the injected failure"
        );
        assert!(p.is_done() && p.outcome() == Some(Ok(())));
        assert_eq!(labels(&log), [1]);
        let mut map = p.try_finish().ok().unwrap();
        map.sync(SyncOp::PREWRITE).unwrap();
        assert_eq!(device_read(iommu, map.segments()), bytes(&m, pa, 2 * PAGE_SIZE));
        map.unload().unwrap();
        let st = tag.deferred_stats();
        assert_eq!((st.deferred, st.completed, st.waiting), (1, 1, 0));
        // A final error is not deferred: a run the tag cannot take fails at once.
        let map = tag.create_map().unwrap();
        let (e, _map) = map
            .load_or_defer(
                // SAFETY: memory the test allocated and keeps until the map is dropped.
                &unsafe { RawSegment::new(pa, 9 * PAGE_SIZE) },
                Direction::ToDevice,
                logging(&log, 2),
            )
            .err()
            .unwrap();
        assert!(matches!(e, Error::BadSize { .. }), "{e:?}");
        assert_eq!(labels(&log), [1]);
    });
}

#[test]
fn threads_racing_loads_unloads_and_cancellations_complete_every_deferred_load_exactly_once() {
    const THREADS: usize = 4;
    const ROUNDS: u64 = 300;
    let m = machine(THREADS);
    with_small_domain(&m, |d, iommu, _| {
        let tag =
            Tag::new_root(&m, IommuPerMap(d), may_wait(TagSpec::new(SPACE_PAGES * PAGE_SIZE, 8))).unwrap();
        let bufs: Vec<PhysAddr> = (0..THREADS).map(|t| buffer(&m, 5, t as u8 + 1)).collect();
        let start = std::sync::Barrier::new(THREADS);
        // One slot per load (thread, round): how many times its callback ran.
        let calls: Arc<Vec<AtomicU64>> =
            Arc::new((0..THREADS as u64 * ROUNDS).map(|_| AtomicU64::new(0)).collect());
        let deferred_n = AtomicU64::new(0);
        let cancelled_n = AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (tag, calls, bufs, deferred_n, cancelled_n) =
                    (&tag, &calls, &bufs, &deferred_n, &cancelled_n);
                let start = &start;
                let m = &m;
                s.spawn(move || {
                    let _bind = m.bind_cpu(t).unwrap();
                    let mut map = Some(tag.create_map().unwrap());
                    start.wait();
                    for r in 0..ROUNDS {
                        // 3 to 5 pages of an 8-page space: two loads at once may not fit.
                        let pages = 3 + (r + t as u64) % 3;
                        let slot = t as u64 * ROUNDS + r;
                        let c = calls.clone();
                        let cb: DeferredCallback<'_, _, _> = Box::new(move |res| {
                            if let Ok(mm) = &res {
                                assert_eq!(mm.len(), pages * PAGE_SIZE);
                            }
                            c[slot as usize].fetch_add(1, Ordering::SeqCst);
                        });
                        let src = [(bufs[t], pages * PAGE_SIZE)];
                        let mut loaded_map = match map.take().unwrap().load_or_defer(
                            // SAFETY: memory the test allocated and keeps until the map is dropped.
                            &unsafe { RawSegments::new(&src) },
                            Direction::ToDevice,
                            cb,
                        ) {
                            Ok(Deferrable::Loaded(mm)) => mm,
                            Ok(Deferrable::Deferred(mut p)) => {
                                deferred_n.fetch_add(1, Ordering::SeqCst);
                                // Every seventh deferred load is cancelled (or destroyed).
                                if r % 7 == 3 {
                                    match p.cancel() {
                                        Ok(mm) => {
                                            cancelled_n.fetch_add(1, Ordering::SeqCst);
                                            if !mm.is_loaded() {
                                                map = Some(mm);
                                                continue;
                                            }
                                            mm
                                        }
                                        Err(back) => {
                                            drop(back); // being retried right now: destroy it
                                            map = Some(tag.create_map().unwrap());
                                            continue;
                                        }
                                    }
                                } else {
                                    let deadline = Instant::now() + Duration::from_secs(20);
                                    loop {
                                        match p.try_finish() {
                                            Ok(mm) => break mm,
                                            Err(back) => p = back,
                                        }
                                        assert!(
                                            Instant::now() < deadline,
                                            "lost wake-up: {:?}",
                                            tag.deferred_stats()
                                        );
                                        std::thread::yield_now();
                                    }
                                }
                            }
                            Err((e, mm)) => panic!("thread {t} round {r}: {e:?} (loaded {})", mm.is_loaded()),
                        };
                        assert!(loaded_map.is_loaded(), "a completed deferred load is loaded");
                        loaded_map.sync(SyncOp::PREWRITE).unwrap();
                        let got = device_read(iommu, loaded_map.segments());
                        assert!(
                            got == bytes(m, bufs[t], pages * PAGE_SIZE),
                            "thread {t} round {r}: wrong bytes"
                        );
                        // The device's time with the buffer: 20 µs, so loads of different
                        // threads overlap even when the host runs them on one core in turn.
                        let until = Instant::now() + Duration::from_micros(20);
                        while Instant::now() < until {
                            std::thread::yield_now();
                        }
                        loaded_map.unload().unwrap();
                        map = Some(loaded_map);
                    }
                });
            }
        });
        let st = tag.deferred_stats();
        assert_eq!(st.waiting, 0);
        assert_eq!(st.deferred, deferred_n.load(Ordering::SeqCst));
        assert_eq!(st.completed + st.failed + st.cancelled, st.deferred, "{st:?}");
        assert_eq!(st.failed, 0);
        assert!(st.deferred > 0, "the space was never short: the test proves nothing");
        let ran: u64 = calls.iter().map(|c| c.load(Ordering::SeqCst)).sum();
        assert!(calls.iter().all(|c| c.load(Ordering::SeqCst) <= 1), "a callback ran twice");
        assert_eq!(ran, st.deferred, "every deferred load's callback ran exactly once");
        eprintln!("{st:?}, {} cancel attempts", cancelled_n.load(Ordering::SeqCst));
        assert_eq!(d.iova().stats().live_ranges, 0, "nothing leaked");
    });
}

/// One step of the reference-model test.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// `load_or_defer` of `pages` bounce pages into map `map` (if it is idle).
    Load { map: usize, pages: u64 },
    /// Unload map `map` (if loaded).
    Unload { map: usize },
    /// Cancel map `map`'s pending load (if pending).
    Cancel { map: usize },
    /// Take map `map` back from its completed pending load (if done).
    Finish { map: usize },
}

const MODEL_MAPS: usize = 5;
const ZONE_PAGES: u64 = 8;

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let m = 0..MODEL_MAPS;
    prop_oneof![
        3 => (m.clone(), 1..=4u64).prop_map(|(map, pages)| Op::Load { map, pages }),
        2 => m.clone().prop_map(|map| Op::Unload { map }),
        1 => m.clone().prop_map(|map| Op::Cancel { map }),
        1 => m.prop_map(|map| Op::Finish { map }),
    ]
}

/// The reference: a count of free pages and a FIFO of waiting loads (map, pages); a head that
/// does not fit blocks the rest (theory 3 of `front::defer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModelMap {
    Idle,
    Loaded(u64),
    Waiting(u64),
    Done(u64),
}

struct Model {
    free: u64,
    maps: [ModelMap; MODEL_MAPS],
    fifo: std::collections::VecDeque<usize>,
    /// Callbacks in order: (map, completed with segments) or (map, cancelled).
    completed: Vec<(usize, bool)>,
}

impl Model {
    fn service(&mut self) {
        while let Some(&i) = self.fifo.front() {
            let ModelMap::Waiting(k) = self.maps[i] else { unreachable!() };
            if k > self.free {
                return;
            }
            self.fifo.pop_front();
            self.free -= k;
            self.maps[i] = ModelMap::Done(k);
            self.completed.push((i, true));
        }
    }
}

/// What the test holds for one map.
enum Real<'p, S: Strategy<HostPlatform>> {
    Idle(DmaMap<'p, HostPlatform, S>),
    Loaded(DmaMap<'p, HostPlatform, S>, u64),
    Pending(PendingLoad<'p, HostPlatform, S>, u64),
    Gone,
}

/// The model test's machine and its client buffers (4 pages per map, above the 28-bit mask:
/// every page bounces), made once for every case.
fn model_machine() -> &'static (HostPlatform, PhysAddr) {
    static M: std::sync::OnceLock<(HostPlatform, PhysAddr)> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(512 << 20) }).unwrap();
        // First fit: fill the first 256 MiB, take the buffers above, give the fill back (the
        // zones' bounce pages come from there).
        let fill = m.frames().alloc(FrameRequest::pages(1 << 16)).unwrap();
        let high = m.frames().alloc(FrameRequest::pages(4 * MODEL_MAPS as u64)).unwrap();
        m.frames().free(fill, 1 << 16).unwrap();
        assert!(high.raw() >= 1 << 28);
        (m, high)
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Random loads, unloads, cancellations and hand-backs of bounced loads on an 8-page zone
    /// agree with the FIFO reference step by step: which loads complete and when, in what
    /// order their callbacks run (each exactly once), and how many pages are free.
    #[test]
    fn deferred_loads_match_a_fifo_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        let (m, high) = model_machine();
        let high = *high;
        let qm = QuickMaps::for_platform(m);
        let zones = BounceZones::new(m, ZoneConfig { bound_pages: ZONE_PAGES, ..ZoneConfig::default() });
        let mut spec = may_wait(TagSpec::new(4 * PAGE_SIZE, 4));
        spec.dma_mask = TagSpec::mask_of_bits(28);
        let tag = Tag::new_root(m, Bounced::direct(Direct, &zones, &qm), spec).unwrap();
        let mut real: Vec<Real<'_, _>> =
            (0..MODEL_MAPS).map(|_| Real::Idle(tag.create_map().unwrap())).collect();
        let zone_free = || zones.stats()[0].1.free_pages;
        proptest::prop_assert_eq!(zones.stats()[0].1.total_pages, ZONE_PAGES);
        let mut model = Model { free: ZONE_PAGES, maps: [ModelMap::Idle; MODEL_MAPS], fifo: Default::default(), completed: Vec::new() };
        let order: Arc<Mutex<Vec<(usize, bool)>>> = Arc::default();
        for op in ops {
            match op {
                Op::Load { map, pages } => {
                    let dm = match std::mem::replace(&mut real[map], Real::Gone) {
                        Real::Idle(dm) => dm,
                        other => {
                            real[map] = other;
                            continue;
                        }
                    };
                    let o = order.clone();
                    let cb: DeferredCallback<'_, _, _> = Box::new(move |r| match r {
                        Ok(_) => o.lock().unwrap().push((map, true)),
                        Err(Error::Cancelled) => o.lock().unwrap().push((map, false)),
                        Err(e) => panic!("map {map}: {e:?}"),
                    });
                    let src = [(PhysAddr::new(high.raw() + map as u64 * 4 * PAGE_SIZE), pages * PAGE_SIZE)];
                    // SAFETY: memory the test allocated and keeps until the map is dropped.
                    match dm.load_or_defer(&unsafe { RawSegments::new(&src) }, Direction::ToDevice, cb).unwrap() {
                        Deferrable::Loaded(dm) => real[map] = Real::Loaded(dm, pages),
                        Deferrable::Deferred(p) => real[map] = Real::Pending(p, pages),
                    }
                    if model.fifo.is_empty() && pages <= model.free {
                        model.free -= pages;
                        model.maps[map] = ModelMap::Loaded(pages);
                    } else {
                        model.maps[map] = ModelMap::Waiting(pages);
                        model.fifo.push_back(map);
                        model.service();
                    }
                }
                Op::Unload { map } => {
                    let (mut dm, pages) = match std::mem::replace(&mut real[map], Real::Gone) {
                        Real::Loaded(dm, pages) => (dm, pages),
                        other => {
                            real[map] = other;
                            continue;
                        }
                    };
                    dm.unload().unwrap();
                    real[map] = Real::Idle(dm);
                    model.maps[map] = ModelMap::Idle;
                    model.free += pages;
                    model.service();
                }
                Op::Cancel { map } => {
                    let (p, pages) = match std::mem::replace(&mut real[map], Real::Gone) {
                        Real::Pending(p, pages) => (p, pages),
                        other => {
                            real[map] = other;
                            continue;
                        }
                    };
                    let dm = p.cancel().expect("no other thread: never running");
                    if dm.is_loaded() {
                        // Already completed: it comes back loaded.
                        real[map] = Real::Loaded(dm, pages);
                        proptest::prop_assert_eq!(model.maps[map], ModelMap::Done(pages));
                        model.maps[map] = ModelMap::Loaded(pages);
                    } else {
                        real[map] = Real::Idle(dm);
                        proptest::prop_assert_eq!(model.maps[map], ModelMap::Waiting(pages));
                        model.fifo.retain(|&i| i != map);
                        model.maps[map] = ModelMap::Idle;
                        model.completed.push((map, false));
                        model.service();
                    }
                }
                Op::Finish { map } => {
                    let (p, pages) = match std::mem::replace(&mut real[map], Real::Gone) {
                        Real::Pending(p, pages) => (p, pages),
                        other => {
                            real[map] = other;
                            continue;
                        }
                    };
                    match p.try_finish() {
                        Ok(dm) => {
                            proptest::prop_assert!(dm.is_loaded());
                            real[map] = Real::Loaded(dm, pages);
                            proptest::prop_assert_eq!(model.maps[map], ModelMap::Done(pages));
                            model.maps[map] = ModelMap::Loaded(pages);
                        }
                        Err(p) => {
                            real[map] = Real::Pending(p, pages);
                            proptest::prop_assert_eq!(model.maps[map], ModelMap::Waiting(pages));
                        }
                    }
                }
            }
            // After every step: the same loads are done, in the same order, and the zone has
            // the pages the model has free.
            proptest::prop_assert_eq!(&*order.lock().unwrap(), &model.completed);
            proptest::prop_assert_eq!(zone_free(), model.free);
            for (i, r) in real.iter().enumerate() {
                let done = match r {
                    Real::Pending(p, _) => p.is_done(),
                    _ => continue,
                };
                proptest::prop_assert_eq!(done, matches!(model.maps[i], ModelMap::Done(_)), "map {}", i);
            }
            proptest::prop_assert_eq!(tag.deferred_stats().waiting, model.fifo.len() as u64);
        }
        drop(real);
        proptest::prop_assert_eq!(zone_free(), ZONE_PAGES, "every bounce page is back");
    }
}
