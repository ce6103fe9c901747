//! Domains on the model IOMMU: strict and deferred invalidation, reserved windows,
//! exhaustion, untrusted devices and failing allocations, each checked from the device's side
//! (what a DMA still reaches) and by the model's audit (what the hardware may still cache
//! when software releases an IOVA or a table page).

use std::sync::atomic::{AtomicU64, Ordering};

use busdma::iommu::{Domain, DomainConfig, DomainId, FlushTicket, InvalidationPolicy, IotlbInvalidator};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::pgtable::{ArmLpaeS1, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl};
use busdma::{AddrRange, CpuGuard, Error, Iova, PAGE_SIZE, PhysAddr, Platform, Result};
use busdma_model::{
    Context, DmaPort, FaultReason, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu,
    TableFormat,
};

const DEV: u32 = 0x20;
const DOM: DomainId = 7;
/// IOVA space of the tests' domains: 256 MiB at 1 GiB.
const SPACE: (u64, u64) = (1 << 30, 256 << 20);

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

fn audited(m: &HostPlatform) -> ModelIommu<'_> {
    ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap()
}

fn model_format<F: PteFormat>() -> TableFormat {
    if F::NAME == VtdSl::NAME { TableFormat::VtdSecondLevel } else { TableFormat::ArmLpaeStage1 }
}

fn iova_space(m: &HostPlatform, start: u64, len: u64) -> IovaAllocator {
    let space = AddrRange::from_start_len(Iova::new(start), len).unwrap();
    IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: true, guard_page: false }).unwrap()
}

/// Builds a domain of format `F` over `hw`, attaches `DEV` to it in the model, runs `body`.
fn with_domain<F: PteFormat, S: IovaSource, H: IotlbInvalidator, R>(
    m: &HostPlatform,
    iommu: &ModelIommu<'_>,
    hw: &H,
    iova: S,
    policy: InvalidationPolicy,
    untrusted: bool,
    body: impl FnOnce(&Domain<'_, HostPlatform, F, S, H>, &TablePool<'_, HostPlatform>) -> R,
) -> R {
    let pool = TablePool::new(m);
    let pt =
        PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(DOM, pt.root(), model_format::<F>(), 48)) }.unwrap();
    let cfg = DomainConfig { id: DOM, policy, untrusted };
    let d = Domain::new(m, pt, iova, hw, cfg).unwrap();
    let r = body(&d, &pool);
    iommu.detach(DEV).unwrap();
    drop(d);
    r
}

fn range(start: u64, len: u64) -> AddrRange<Iova> {
    AddrRange::from_start_len(Iova::new(start), len).unwrap()
}

fn read(iommu: &ModelIommu<'_>, iova: u64) -> std::result::Result<[u8; 8], FaultReason> {
    let mut b = [0u8; 8];
    iommu.port(DEV).dma_read(Iova::new(iova), &mut b).map(|_| b).map_err(|f| f.reason)
}

fn no_violations(iommu: &ModelIommu<'_>) {
    let rep = iommu.audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "{:?}", rep.violations);
}

/// Maps three segments of one IOVA allocation to three separate frames (tagged), reads each
/// through the device, and returns (allocation, segments, frames' PA).
fn map_three_segments<P: Platform, F: PteFormat, S: IovaSource, H: IotlbInvalidator>(
    m: &HostPlatform,
    d: &Domain<'_, P, F, S, H>,
    g: &CpuGuard<'_, P>,
    frames: PhysAddr,
) -> (AddrRange<Iova>, Vec<AddrRange<Iova>>) {
    let alloc = d.alloc_iova(g, &IovaRequest::pages(4)).unwrap();
    let base = alloc.start().raw();
    // Segments: pages 0, 1 and 3 of the allocation; page 2 stays unmapped.
    let segs: Vec<_> = [0u64, 1, 3].iter().map(|&i| range(base + i * PAGE_SIZE, PAGE_SIZE)).collect();
    for (i, s) in segs.iter().enumerate() {
        let pa = frames.checked_add(i as u64 * PAGE_SIZE).unwrap();
        m.write_phys(pa, &(0xa0 + i as u64).to_le_bytes()).unwrap();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { d.map(g, s.start(), pa, PAGE_SIZE, Prot::READ_WRITE) }.unwrap();
    }
    (alloc, segs)
}

fn strict_unmap_case<F: PteFormat>() {
    let m = machine();
    let iommu = audited(&m);
    let frames = m.alloc_frames(FrameRequest::pages(3)).unwrap();
    with_domain::<F, _, _, _>(
        &m,
        &iommu,
        &iommu,
        iova_space(&m, SPACE.0, SPACE.1),
        InvalidationPolicy::Strict,
        false,
        |d, _| {
            let g = m.pin_cpu();
            for round in 0..3 {
                let (alloc, segs) = map_three_segments(&m, d, &g, frames.pa());
                for (i, s) in segs.iter().enumerate() {
                    assert_eq!(
                        read(&iommu, s.start().raw()),
                        Ok((0xa0 + i as u64).to_le_bytes()),
                        "{}",
                        F::NAME
                    );
                }
                let before = iommu.stats().inv_range;
                // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                let t = unsafe { d.unmap(&g, &segs, &[alloc]) }.unwrap();
                assert_eq!(t, FlushTicket::DONE);
                assert_eq!(
                    iommu.stats().inv_range - before,
                    1,
                    "{}: one invalidation per unmapped map (round {round})",
                    F::NAME
                );
                for s in &segs {
                    assert!(
                        matches!(read(&iommu, s.start().raw()), Err(FaultReason::NotPresent { .. })),
                        "{}: IOTLB included",
                        F::NAME
                    );
                }
            }
            assert_eq!(d.stats().range_invalidations, 3);
            assert_eq!(d.pending(), 0);
        },
    );
    no_violations(&iommu);
    assert_eq!(iommu.stats().inv_domain, 1, "only the domain's teardown invalidates everything");
}

#[test]
fn strict_unmap_leaves_the_device_no_path_to_the_pages_with_one_invalidation_per_map() {
    strict_unmap_case::<VtdSl>();
    strict_unmap_case::<ArmLpaeS1>();
}

/// An invalidator that loses ranged invalidations: a driver bug, to show what the tests
/// above would see if the domain skipped its invalidation.
struct LosesRangedInvalidations<'a, 'm>(&'a ModelIommu<'m>);

impl IotlbInvalidator for LosesRangedInvalidations<'_, '_> {
    fn invalidate_range(&self, _: DomainId, _: AddrRange<Iova>) -> busdma::Result<()> {
        Ok(())
    }
    fn invalidate_all(&self, domain: DomainId) -> busdma::Result<()> {
        self.0.invalidate_all(domain)
    }
    fn audit_iova_released(&self, domain: DomainId, range: AddrRange<Iova>) {
        self.0.audit_iova_released(domain, range)
    }
    fn audit_table_page_released(&self, domain: DomainId, page: PhysAddr) {
        self.0.audit_table_page_released(domain, page)
    }
}

#[test]
fn without_the_invalidation_the_stale_iotlb_entry_still_reaches_memory_and_the_audit_says_so() {
    let m = machine();
    let iommu = audited(&m);
    let lossy = LosesRangedInvalidations(&iommu);
    let frames = m.alloc_frames(FrameRequest::pages(3)).unwrap();
    with_domain::<VtdSl, _, _, _>(
        &m,
        &iommu,
        &lossy,
        iova_space(&m, SPACE.0, SPACE.1),
        InvalidationPolicy::Strict,
        false,
        |d, _| {
            let g = m.pin_cpu();
            let (alloc, segs) = map_three_segments(&m, d, &g, frames.pa());
            for s in &segs {
                read(&iommu, s.start().raw()).unwrap();
            }
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { d.unmap(&g, &segs, &[alloc]) }.unwrap();
            // The tables no longer map the pages, but the IOTLB does: the device reads the data.
            assert_eq!(d.table().iova_to_phys(segs[0].start()), None);
            assert_eq!(read(&iommu, segs[0].start().raw()), Ok(0xa0u64.to_le_bytes()));
            m.write_phys(frames.pa(), b"newowner").unwrap();
            assert_eq!(
                read(&iommu, segs[0].start().raw()),
                Ok(*b"newowner"),
                "the device reaches the page's next owner"
            );
        },
    );
    let rep = iommu.audit_report().unwrap();
    assert_eq!(rep.violation_count, 3, "each released page was still cached: {:?}", rep.violations);
}

#[test]
fn deferred_unmaps_are_released_only_by_a_flush_and_the_window_closes_then() {
    let m = machine();
    let iommu = audited(&m);
    let frames = m.alloc_frames(FrameRequest::pages(3)).unwrap();
    let space = iova_space(&m, SPACE.0, SPACE.1);
    let free0 = space.free_bytes();
    with_domain::<ArmLpaeS1, _, _, _>(
        &m,
        &iommu,
        &iommu,
        space,
        InvalidationPolicy::deferred(),
        false,
        |d, _| {
            let g = m.pin_cpu();
            let (alloc, segs) = map_three_segments(&m, d, &g, frames.pa());
            for s in &segs {
                read(&iommu, s.start().raw()).unwrap();
            }
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            let t = unsafe { d.unmap(&g, &segs, &[alloc]) }.unwrap();
            assert_ne!(t, FlushTicket::DONE);
            assert_eq!((d.pending(), iommu.stats().inv_range, iommu.stats().inv_domain), (1, 0, 0));
            // The exposure window: the IOTLB still translates, and the IOVA is not free yet.
            assert!(read(&iommu, segs[0].start().raw()).is_ok());
            assert_eq!(d.iova().free_bytes(), free0 - 4 * PAGE_SIZE);
            d.ensure_flushed(&g, t).unwrap();
            assert_eq!((d.pending(), iommu.stats().inv_domain), (0, 1));
            d.iova().flush_caches();
            assert_eq!(d.iova().free_bytes(), free0);
            assert!(read(&iommu, segs[0].start().raw()).is_err());
            // Already flushed: nothing more to do.
            d.ensure_flushed(&g, t).unwrap();
            assert_eq!(iommu.stats().inv_domain, 1);
        },
    );
    no_violations(&iommu);
}

#[test]
fn an_untrusted_device_gets_a_strict_domain_whatever_was_asked() {
    let m = machine();
    let iommu = audited(&m);
    let frames = m.alloc_frames(FrameRequest::pages(3)).unwrap();
    with_domain::<VtdSl, _, _, _>(
        &m,
        &iommu,
        &iommu,
        iova_space(&m, SPACE.0, SPACE.1),
        InvalidationPolicy::deferred(),
        true,
        |d, _| {
            assert_eq!(d.policy(), InvalidationPolicy::Strict);
            let g = m.pin_cpu();
            let (alloc, segs) = map_three_segments(&m, d, &g, frames.pa());
            read(&iommu, segs[1].start().raw()).unwrap();
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            assert_eq!(unsafe { d.unmap(&g, &segs, &[alloc]) }.unwrap(), FlushTicket::DONE);
            assert!(read(&iommu, segs[1].start().raw()).is_err());
            assert_eq!(iommu.stats().inv_range, 1);
        },
    );
    no_violations(&iommu);
}

#[test]
fn a_kept_window_is_mapped_again_only_after_ensure_flushed_and_the_audit_catches_a_skip() {
    let m = machine();
    let iommu = audited(&m);
    let frames = m.alloc_frames(FrameRequest::pages(3)).unwrap();
    with_domain::<VtdSl, _, _, _>(
        &m,
        &iommu,
        &iommu,
        iova_space(&m, SPACE.0, SPACE.1),
        InvalidationPolicy::deferred(),
        false,
        |d, _| {
            let g = m.pin_cpu();
            let (alloc, segs) = map_three_segments(&m, d, &g, frames.pa());
            read(&iommu, segs[0].start().raw()).unwrap();
            // Keep the IOVA (a reserved window): nothing to free.
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            let t = unsafe { d.unmap(&g, &segs, &[]) }.unwrap();
            d.ensure_flushed(&g, t).unwrap();
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { d.map(&g, segs[0].start(), frames.pa(), PAGE_SIZE, Prot::READ) }.unwrap();
            no_violations(&iommu);
            read(&iommu, segs[0].start().raw()).unwrap();
            // Again without ensure_flushed: mapping over a translation the IOTLB may hold.
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { d.unmap(&g, &segs[..1], &[]) }.unwrap();
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { d.map(&g, segs[0].start(), frames.pa(), PAGE_SIZE, Prot::READ) }.unwrap();
            assert_eq!(iommu.audit_report().unwrap().violation_count, 1);
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { d.unmap(&g, &segs[..1], &[alloc]) }.unwrap();
        },
    );
}

#[test]
fn an_exhausted_space_flushes_queued_unmaps_and_retries() {
    let m = machine();
    let iommu = audited(&m);
    // 16 pages of IOVA, queues large enough never to flush by themselves.
    let policy = InvalidationPolicy::Deferred { max_entries: 1000, max_age_ns: u64::MAX };
    with_domain::<VtdSl, _, _, _>(
        &m,
        &iommu,
        &iommu,
        iova_space(&m, SPACE.0, 16 * PAGE_SIZE),
        policy,
        false,
        |d, _| {
            let g = m.pin_cpu();
            let a = d.alloc_iova(&g, &IovaRequest::pages(16)).unwrap();
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { d.map(&g, a.start(), PhysAddr::new(0x10_0000_0000), a.len(), Prot::READ) }.unwrap();
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { d.unmap(&g, &[a], &[a]) }.unwrap();
            assert_eq!(d.pending(), 1);
            let b = d.alloc_iova(&g, &IovaRequest::pages(16)).unwrap();
            assert_eq!(b, a);
            assert_eq!((d.stats().exhaustion_retries, d.pending()), (1, 0));
            // Nothing queued: exhaustion is an error carrying the request.
            let e = d.alloc_iova(&g, &IovaRequest::pages(1)).unwrap_err();
            assert!(matches!(e, Error::Exhausted { size: 4096, .. }), "{e:?}");
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { d.unmap(&g, &[], &[b]) }.unwrap();
            d.flush(&g).unwrap();
        },
    );
    no_violations(&iommu);
}

/// An IOVA source whose `n`-th allocation fails (fault injection at the IOVA allocation
/// point of a map), over a real allocator.
struct FailingIova {
    inner: IovaAllocator,
    fail_at: AtomicU64,
    attempts: AtomicU64,
}

impl IovaSource for FailingIova {
    fn alloc<P: Platform>(&self, g: &CpuGuard<'_, P>, req: &IovaRequest) -> Result<AddrRange<Iova>> {
        let n = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.fail_at.load(Ordering::Relaxed) {
            return Err(Error::NoMemory { requested: req.size });
        }
        self.inner.alloc(g, req)
    }
    fn free<P: Platform>(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<()> {
        self.inner.free(g, range)
    }
}

fn injection_case<F: PteFormat>(policy: InvalidationPolicy) {
    let m = machine();
    let iommu = audited(&m);
    let iova = FailingIova {
        inner: iova_space(&m, SPACE.0, SPACE.1),
        fail_at: AtomicU64::new(0),
        attempts: AtomicU64::new(0),
    };
    let free0 = iova.inner.free_bytes();
    let mut points = 0;
    let mut clean = 0;
    with_domain::<F, _, _, _>(&m, &iommu, &iommu, iova, policy, false, |d, pool| {
        let g = m.pin_cpu();
        // A map that needs every level below the root: 3 pages straddling a 2 MiB line.
        for n in 1u64.. {
            let req = IovaRequest::pages(4);
            // Allocation points in order: the IOVA, then each table page the map installs.
            d.iova().fail_at.store(d.iova().attempts.load(Ordering::Relaxed) + n, Ordering::Relaxed);
            let table_n = n.saturating_sub(1);
            pool.fail_nth_alloc((table_n > 0).then_some(table_n));
            let attempts_before = pool.alloc_attempts();
            let r = d.alloc_iova(&g, &req).and_then(|a| {
                // A fresh 512 GiB region each round (one root entry each), so every level
                // below the root needs new tables: the directory levels and two leaf tables.
                let at = Iova::new((n << 39) + (2 << 20) - PAGE_SIZE);
                // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                let res =
                    unsafe { d.map(&g, at, PhysAddr::new(0x20_0000_0000), 3 * PAGE_SIZE, Prot::READ_WRITE) };
                match res {
                    Ok(()) => Ok((a, at)),
                    Err(e) => {
                        // Nothing of it translates; the IOVA goes straight back.
                        for p in 0..3 {
                            assert_eq!(d.table().iova_to_phys(Iova::new(at.raw() + p * PAGE_SIZE)), None);
                        }
                        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                        unsafe { d.unmap(&g, &[], &[a]) }.unwrap();
                        Err(e)
                    }
                }
            });
            pool.fail_nth_alloc(None);
            match r {
                Ok((a, at)) => {
                    // Every point failed once; this round ran clean through all of them.
                    clean = pool.alloc_attempts() - attempts_before;
                    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                    unsafe { d.unmap(&g, &[AddrRange::from_start_len(at, 3 * PAGE_SIZE).unwrap()], &[a]) }
                        .unwrap();
                    break;
                }
                Err(e) => {
                    assert!(matches!(e, Error::NoMemory { .. }), "{e:?}");
                    points += 1;
                    assert!(points < 20, "runaway");
                }
            }
        }
        d.flush(&g).unwrap();
        d.iova().inner.flush_caches();
        assert_eq!(d.iova().inner.free_bytes(), free0, "{}: no IOVA leaked", F::NAME);
    });
    // The IOVA point, then the table pages: two directory levels and two leaf tables below
    // the existing root of a 4-level table.
    assert_eq!((points, clean), (5, 4), "{}", F::NAME);
    assert_eq!(m.counters().table_pages_live.load(Ordering::Relaxed), 0, "{}: no table page leaked", F::NAME);
    no_violations(&iommu);
}

#[test]
fn every_allocation_point_of_a_map_fails_in_turn_with_an_error_and_nothing_leaked() {
    for policy in [InvalidationPolicy::Strict, InvalidationPolicy::deferred()] {
        injection_case::<VtdSl>(policy);
        injection_case::<ArmLpaeS1>(policy);
    }
}

#[test]
fn unmapping_what_is_not_mapped_is_an_error_and_frees_nothing() {
    let m = machine();
    let iommu = audited(&m);
    for policy in [InvalidationPolicy::Strict, InvalidationPolicy::deferred()] {
        let frames = m.alloc_frames(FrameRequest::pages(3)).unwrap();
        with_domain::<VtdSl, _, _, _>(
            &m,
            &iommu,
            &iommu,
            iova_space(&m, SPACE.0, SPACE.1),
            policy,
            false,
            |d, _| {
                let g = m.pin_cpu();
                let (alloc, segs) = map_three_segments(&m, d, &g, frames.pa());
                let hole = range(alloc.start().raw() + 2 * PAGE_SIZE, PAGE_SIZE);
                // The first two ranges are unmapped (and invalidated); the hole stops the call.
                // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                let e = unsafe { d.unmap(&g, &[segs[0], segs[1], hole, segs[2]], &[alloc]) }.unwrap_err();
                assert!(matches!(e, Error::NotMapped { .. }), "{e:?}");
                assert_eq!((d.stats().iova_released, d.pending()), (0, 0));
                assert!(read(&iommu, segs[0].start().raw()).is_err());
                assert!(
                    read(&iommu, segs[2].start().raw()).is_ok(),
                    "after the failing range, nothing changed"
                );
                // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                unsafe { d.unmap(&g, &segs[2..], &[alloc]) }.unwrap();
                d.flush(&g).unwrap();
                assert_eq!(d.stats().iova_released, 1);
            },
        );
    }
    no_violations(&iommu);
}
