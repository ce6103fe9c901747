//! Failed invalidations on the model IOMMU: the model's hardware never fails a command, so a
//! wrapper fails the next N on demand (as a VT-d unit that reports an invalidation queue error
//! or times out), and the model's audit and the device's view check that nothing the failed
//! command was to invalidate is reused before a later one succeeds (`Domain`, theory 8).

use std::sync::atomic::{AtomicU32, Ordering};

use busdma::front::{
    Direction, IommuPerMap, IommuReserved, KernelBuf, MemKind, SgEntry, SgList, Tag, TagSpec,
};
use busdma::iommu::{Domain, DomainConfig, DomainId, InvalidationPolicy, IotlbInvalidator};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::pgtable::{PageTable, PageTableConfig, Prot, TablePool, VtdSl};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform, Result};
use busdma_model::{
    Context, DmaPort, FaultReason, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu,
    PageKind, TableFormat,
};

const DEV: u32 = 0x20;
const DOM: DomainId = 9;

/// The model IOMMU, failing the next `fail` invalidation commands without executing them.
struct Flaky<'a, 'm> {
    iommu: &'a ModelIommu<'m>,
    fail: AtomicU32,
}

impl Flaky<'_, '_> {
    fn fail_next(&self, n: u32) {
        self.fail.store(n, Ordering::Relaxed);
    }

    fn failing(&self, domain: DomainId) -> Result<()> {
        match self.fail.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)) {
            Ok(_) => Err(Error::InvalidationFailed { what: "injected", domain: domain.into(), status: 0x10 }),
            Err(_) => Ok(()),
        }
    }
}

impl IotlbInvalidator for Flaky<'_, '_> {
    fn invalidate_range(&self, domain: DomainId, range: AddrRange<Iova>) -> Result<()> {
        self.failing(domain)?;
        self.iommu.invalidate_range(domain, range)
    }
    fn invalidate_all(&self, domain: DomainId) -> Result<()> {
        self.failing(domain)?;
        self.iommu.invalidate_all(domain)
    }
    fn audit_unmapped(&self, domain: DomainId, ranges: &[AddrRange<Iova>]) {
        self.iommu.audit_unmapped(domain, ranges)
    }
    fn audit_iova_released(&self, domain: DomainId, range: AddrRange<Iova>) {
        self.iommu.audit_iova_released(domain, range)
    }
    fn audit_table_page_released(&self, domain: DomainId, page: PhysAddr) {
        self.iommu.audit_table_page_released(domain, page)
    }
    fn audit_mapping(&self, domain: DomainId, range: AddrRange<Iova>) {
        self.iommu.audit_mapping(domain, range)
    }
}

type Dom<'a> = Domain<'a, HostPlatform, VtdSl, IovaAllocator, Flaky<'a, 'a>>;

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

/// Builds a domain with `policy` over a flaky audited model IOMMU, attaches `DEV`, runs `body`
/// with the domain, the IOMMU and the table pool; then detaches and drops the domain.
fn with_domain<R>(
    policy: InvalidationPolicy,
    body: impl FnOnce(&HostPlatform, &Dom<'_>, &ModelIommu<'_>, &Flaky<'_, '_>, &TablePool<'_, HostPlatform>) -> R,
) -> R {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap();
    let flaky = Flaky { iommu: &iommu, fail: AtomicU32::new(0) };
    let pool = TablePool::new(&m);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(DOM, pt.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let space = AddrRange::from_start_len(Iova::new(1 << 30), 256 << 20).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: false, guard_page: false })
        .unwrap();
    let d = Domain::new(&m, pt, iova, &flaky, DomainConfig::new(DOM, policy)).unwrap();
    let r = body(&m, &d, &iommu, &flaky, &pool);
    iommu.detach(DEV).unwrap();
    drop(d);
    let rep = iommu.audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "{:?}", rep.violations);
    r
}

fn read(iommu: &ModelIommu<'_>, iova: Iova) -> std::result::Result<u64, FaultReason> {
    let mut b = [0u8; 8];
    iommu.port(DEV).dma_read(iova, &mut b).map(|_| u64::from_le_bytes(b)).map_err(|f| f.reason)
}

/// Maps a tagged frame at the first page of a fresh 2 MiB of IOVA (1 GiB-aligned, so the map
/// needs table pages of its own) and the rest of the 2 MiB to addresses outside RAM
/// (translation only; not 2 MiB-aligned, so leaf tables that the unmap frees), and reads the
/// tag through the device (its translation is now cached).
fn map_tagged(m: &HostPlatform, d: &Dom<'_>, iommu: &ModelIommu<'_>, tag: u64) -> AddrRange<Iova> {
    const PAGES: u64 = 512;
    let g = m.pin_cpu();
    let req = IovaRequest { align: 1 << 30, ..IovaRequest::pages(PAGES) };
    let r = d.alloc_iova(&g, &req).unwrap();
    let pa = frame(m);
    m.write_phys(pa, &tag.to_le_bytes()).unwrap();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { d.map(&g, r.start(), pa, PAGE_SIZE, Prot::READ) }.unwrap();
    let rest = Iova::new(r.start().raw() + PAGE_SIZE);
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe {
        d.map(&g, rest, PhysAddr::new(0x40_0000_0000 + PAGE_SIZE), (PAGES - 1) * PAGE_SIZE, Prot::READ)
    }
    .unwrap();
    assert_eq!(read(iommu, r.start()), Ok(tag));
    r
}

/// A frame for the test's lifetime (the machine goes at the end).
fn frame(m: &HostPlatform) -> PhysAddr {
    let block = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    let pa = block.pa();
    std::mem::forget(block);
    pa
}

fn is_injected(e: &Error) -> bool {
    matches!(e, Error::InvalidationFailed { what: "injected", domain, status: 0x10 } if *domain == u64::from(DOM))
}

#[test]
fn a_failed_strict_invalidation_holds_the_iova_and_tables_back_until_a_whole_domain_invalidation_succeeds() {
    with_domain(InvalidationPolicy::Strict, |m, d, iommu, flaky, _pool| {
        let r = map_tagged(m, d, iommu, 0xabcd);
        let live = d.iova().stats().live_ranges;
        let g = m.pin_cpu();
        flaky.fail_next(1);
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        let e = unsafe { d.unmap(&g, &[r], &[r]) }.unwrap_err();
        assert!(is_injected(&e), "{e:?}");
        let st = d.stats();
        assert_eq!(
            (st.invalidation_errors, st.held_back, st.iova_released, st.table_pages_released),
            (1, 1, 0, 0)
        );
        assert!(d.degraded());
        // The unit still caches the translation: this is why nothing may be reused.
        assert_eq!(read(iommu, r.start()), Ok(0xabcd), "the stale entry survives the failed command");
        assert_eq!(d.iova().stats().live_ranges, live, "the IOVA is held back, not freed");
        // A map while degraded first recovers; if that fails too, the map fails and maps nothing.
        flaky.fail_next(1);
        let req = IovaRequest::pages(1);
        let other = d.iova().alloc(&g, &req).unwrap();
        let pa = frame(m);
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        let e = unsafe { d.map(&g, other.start(), pa, PAGE_SIZE, Prot::READ) }.unwrap_err();
        assert!(is_injected(&e), "{e:?}");
        assert!(d.table().leaf_of(other.start()).is_none(), "a refused map maps nothing");
        assert!(d.degraded() && d.stats().held_back == 1);
        // Then it succeeds: one whole-domain invalidation, and everything held back goes.
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { d.map(&g, other.start(), pa, PAGE_SIZE, Prot::READ) }.unwrap();
        let st = d.stats();
        assert!(!d.degraded());
        assert_eq!((st.held_back, st.iova_released), (0, 1));
        assert!(st.table_pages_released > 0, "the unmap's table pages went back after the recovery");
        assert!(matches!(read(iommu, r.start()), Err(FaultReason::NotPresent { .. })));
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { d.unmap(&g, &[other], &[other]) }.unwrap();
    });
}

#[test]
fn a_failed_deferred_flush_releases_nothing_and_the_next_flush_releases_everything() {
    with_domain(InvalidationPolicy::deferred(), |m, d, iommu, flaky, _pool| {
        let r = map_tagged(m, d, iommu, 0x1234);
        let g = m.pin_cpu();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { d.unmap(&g, &[r], &[r]) }.unwrap();
        assert_eq!(d.pending(), 1);
        flaky.fail_next(1);
        let e = d.flush(&g).unwrap_err();
        assert!(is_injected(&e), "{e:?}");
        assert_eq!(d.pending(), 1, "the queued unmap stays queued");
        assert_eq!(d.stats().iova_released, 0);
        assert_eq!(read(iommu, r.start()), Ok(0x1234), "the stale entry survives the failed flush");
        d.flush(&g).unwrap();
        assert_eq!((d.pending(), d.stats().iova_released), (0, 1));
        assert!(matches!(read(iommu, r.start()), Err(FaultReason::NotPresent { .. })));
    });
}

#[test]
fn a_failed_map_clean_up_degrades_the_domain_so_the_iova_is_not_mapped_again_before_an_invalidation() {
    with_domain(InvalidationPolicy::Strict, |m, d, iommu, flaky, pool| {
        let g = m.pin_cpu();
        let r = d.iova().alloc(&g, &IovaRequest::pages(1)).unwrap();
        let pa = frame(m);
        // The map fails (no table page), and so does its clean-up invalidation.
        pool.fail_nth_alloc(Some(1));
        flaky.fail_next(1);
        assert!(matches!(
            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
            unsafe { d.map(&g, r.start(), pa, PAGE_SIZE, Prot::READ) },
            Err(Error::NoMemory { .. })
        ));
        assert!(d.degraded(), "a clean-up that failed leaves the domain degraded");
        assert_eq!(d.stats().invalidation_errors, 1);
        // The next map of that IOVA first completes a whole-domain invalidation.
        let before = iommu.stats().inv_domain;
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { d.map(&g, r.start(), pa, PAGE_SIZE, Prot::READ) }.unwrap();
        assert_eq!(iommu.stats().inv_domain, before + 1);
        assert!(!d.degraded());
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { d.unmap(&g, &[r], &[r]) }.unwrap();
    });
}

#[test]
fn a_domain_whose_last_invalidation_fails_leaks_its_table_pages_instead_of_freeing_them() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let flaky = Flaky { iommu: &iommu, fail: AtomicU32::new(0) };
    let pool = TablePool::new(&m);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    let space = AddrRange::from_start_len(Iova::new(1 << 30), 256 << 20).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: 2, caches: false, guard_page: false }).unwrap();
    let d = Domain::new(&m, pt, iova, &flaky, DomainConfig::new(DOM, InvalidationPolicy::Strict)).unwrap();
    {
        let g = m.pin_cpu();
        let r = d.iova().alloc(&g, &IovaRequest::pages(1)).unwrap();
        let pa = frame(&m);
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { d.map(&g, r.start(), pa, PAGE_SIZE, Prot::READ) }.unwrap();
    }
    let frees = pool.stats().frees;
    flaky.fail_next(u32::MAX);
    drop(d);
    assert_eq!(pool.stats().frees, frees, "no table page went back to the pool");
    // The same domain with a working unit frees them.
    flaky.fail_next(0);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: 2, caches: false, guard_page: false }).unwrap();
    let d = Domain::new(&m, pt, iova, &flaky, DomainConfig::new(DOM, InvalidationPolicy::Strict)).unwrap();
    drop(d);
    assert!(pool.stats().frees > frees);
}

#[test]
fn a_map_unload_whose_invalidation_fails_returns_the_error_and_is_unloaded_all_the_same() {
    with_domain(InvalidationPolicy::Strict, |m, d, iommu, flaky, _pool| {
        let tag = Tag::new_root(m, IommuPerMap(d), TagSpec::new(PAGE_SIZE, 1)).unwrap();
        let pa = frame(m);
        m.write_phys(pa, &0x7a9_u64.to_le_bytes()).unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        let buf = unsafe { KernelBuf::new(m.phys_to_kva(pa).unwrap(), PAGE_SIZE) };
        let mut map = tag.create_map().unwrap();
        let bus = map.load(&buf, Direction::ToDevice).unwrap()[0].addr;
        assert_eq!(read(iommu, bus), Ok(0x7a9));
        flaky.fail_next(1);
        let e = map.unload().unwrap_err();
        assert!(is_injected(&e), "{e:?}");
        assert!(!map.is_loaded(), "unloaded all the same");
        assert!(d.degraded() && d.stats().held_back == 1);
        assert_eq!(read(iommu, bus), Ok(0x7a9), "the stale entry the error warns about");
        assert!(matches!(map.unload(), Err(Error::BadState { .. })), "a second unload is a double unload");
        // The next load recovers the domain first: the stale entry is gone.
        map.load(&buf, Direction::ToDevice).unwrap();
        assert!(!d.degraded() && d.stats().held_back == 0);
        map.unload().unwrap();
        assert!(matches!(read(iommu, bus), Err(FaultReason::NotPresent { .. })));
    });
}

#[test]
fn a_pinned_reserved_window_is_not_mapped_again_while_its_failed_invalidation_is_unproven() {
    with_domain(InvalidationPolicy::Strict, |m, d, iommu, flaky, _pool| {
        let tag = Tag::new_root(m, IommuReserved::new(d), TagSpec::new(PAGE_SIZE, 1)).unwrap();
        let mut map = tag.create_map().unwrap();
        assert!(map.state().pinned());
        let (old, new) = (frame(m), frame(m));
        m.write_phys(old, &0x01d_u64.to_le_bytes()).unwrap();
        m.write_phys(new, &0x11e_u64.to_le_bytes()).unwrap();
        let (e_old, e_new) = (
            [SgEntry { pa: old, len: 8, kind: MemKind::Page }],
            [SgEntry { pa: new, len: 8, kind: MemKind::Page }],
        );
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        let (sg_old, sg_new) = unsafe { (SgList::new(&e_old), SgList::new(&e_new)) };
        let bus = map.load(&sg_old, Direction::ToDevice).unwrap()[0].addr;
        assert_eq!(read(iommu, bus), Ok(0x01d), "the device caches the translation");
        flaky.fail_next(1);
        assert!(is_injected(&map.unload().unwrap_err()));
        assert_eq!(read(iommu, bus), Ok(0x01d), "the stale entry the error warns about");
        // The window is the same IOVA: while no invalidation succeeds, it is not mapped again.
        flaky.fail_next(1);
        assert!(is_injected(&map.load(&sg_new, Direction::ToDevice).unwrap_err()));
        assert!(!map.is_loaded() && d.degraded());
        // Once one succeeds, the new load reaches the new page, never the stale one.
        assert_eq!(map.load(&sg_new, Direction::ToDevice).unwrap()[0].addr, bus);
        assert!(!d.degraded());
        assert_eq!(read(iommu, bus), Ok(0x11e));
        map.unload().unwrap();
        assert!(matches!(read(iommu, bus), Err(FaultReason::NotPresent { .. })));
    });
}

// ---- quarantine: memory busdma owns is never freed while a translation may reach it ----

/// Whether the platform still holds `pa` as a DMA page (allocated, not given back).
fn still_allocated(m: &HostPlatform, pa: PhysAddr) -> bool {
    m.page_kind(pa) == PageKind::Dma
}

#[test]
fn coherent_memory_whose_unload_invalidation_fails_is_quarantined_until_a_later_invalidation_succeeds() {
    with_domain(InvalidationPolicy::Strict, |m, d, _iommu, flaky, _pool| {
        let tag = Tag::new_root(m, IommuPerMap(d), TagSpec::new(4 * PAGE_SIZE, 4)).unwrap();
        let c = tag.alloc_coherent(PAGE_SIZE, false).unwrap();
        let pa = c.memory().pa();
        // The unload's ranged invalidation and the proof's recovery both fail.
        flaky.fail_next(2);
        drop(c);
        let q = tag.quarantine_stats();
        assert_eq!((q.held, q.held_pages, q.quarantined, q.released), (1, 1, 1, 0), "{q:?}");
        assert!(still_allocated(m, pa), "a page the device may still reach was freed");
        // The unit works again: the next proof releases the page.
        tag.reclaim().unwrap();
        let q = tag.quarantine_stats();
        assert_eq!((q.held, q.released, q.leaked), (0, 1, 0), "{q:?}");
        assert!(!still_allocated(m, pa), "the proven page goes back");
    });
}

#[test]
fn to_cpu_reports_a_failed_invalidation_and_keeps_the_buffer_from_everyone() {
    use busdma::front::typed::ToDevice;
    with_domain(InvalidationPolicy::Strict, |m, d, _iommu, flaky, _pool| {
        let tag = Tag::new_root(m, IommuPerMap(d), TagSpec::new(4 * PAGE_SIZE, 4)).unwrap();
        let buf = tag.alloc_buffer::<ToDevice>(PAGE_SIZE).unwrap();
        buf.write(0, b"payload").unwrap();
        let dev = buf.to_device().ok().unwrap();
        let bus = dev.segments()[0].addr;
        flaky.fail_next(2);
        let e = dev.to_cpu().err().unwrap();
        assert!(is_injected(&e), "{e:?}");
        assert_eq!(tag.quarantine_stats().held, 1);
        // A later successful unload through the tag is the proof that releases it.
        let again = tag.alloc_buffer::<ToDevice>(PAGE_SIZE).unwrap().to_device().ok().unwrap();
        assert_ne!(again.segments()[0].addr, bus, "the stale IOVA was held back, not reused");
        drop(again.to_cpu().unwrap());
        assert_eq!(tag.quarantine_stats().held, 0, "released at the next proof");
    });
}

#[test]
fn memory_unloaded_under_deferred_invalidation_is_freed_only_after_the_flush() {
    with_domain(
        InvalidationPolicy::Deferred { max_entries: 1000, max_age_ns: u64::MAX },
        |m, d, iommu, _flaky, _pool| {
            let tag = Tag::new_root(m, IommuPerMap(d), TagSpec::new(4 * PAGE_SIZE, 4)).unwrap();
            let c = tag.alloc_coherent(PAGE_SIZE, false).unwrap();
            let (pa, bus) = (c.memory().pa(), c.segments()[0].addr);
            c.memory().write(0, &0x5ec2e7u64.to_le_bytes()).unwrap();
            assert_eq!(read(iommu, bus), Ok(0x5ec2e7), "the device's translation is cached");
            drop(c);
            assert_eq!(d.pending(), 0, "the release waited for the queued unmap's flush");
            assert!(!still_allocated(m, pa));
            assert!(read(iommu, bus).is_err(), "the freed page is unreachable");
            assert_eq!(tag.quarantine_stats().quarantined, 0);
        },
    );
}

#[test]
fn an_untrusted_tag_unloads_strictly_on_a_deferred_domain() {
    with_domain(
        InvalidationPolicy::Deferred { max_entries: 1000, max_age_ns: u64::MAX },
        |m, d, iommu, _flaky, _pool| {
            let mut spec = TagSpec::new(4 * PAGE_SIZE, 4);
            spec.flags.untrusted = true;
            let tag = Tag::new_root(m, IommuPerMap(d), spec).unwrap();
            let pa = frame(m);
            m.write_phys(pa, &0x77u64.to_le_bytes()).unwrap();
            let mut map = tag.create_map().unwrap();
            // SAFETY: a frame the test holds for its whole life.
            let src = unsafe { busdma::front::RawSegment::new(pa, PAGE_SIZE) };
            let bus = map.load(&src, Direction::ToDevice).unwrap()[0].addr;
            assert_eq!(read(iommu, bus), Ok(0x77));
            map.unload().unwrap();
            assert_eq!(d.pending(), 0, "nothing left queued");
            assert!(read(iommu, bus).is_err(), "the device lost the page when unload returned");
        },
    );
}

#[test]
fn an_owned_buffer_leaves_its_map_only_after_the_deferred_unmap_is_flushed() {
    with_domain(
        InvalidationPolicy::Deferred { max_entries: 1000, max_age_ns: u64::MAX },
        |m, d, iommu, _flaky, _pool| {
            let spec = TagSpec::new(4 * PAGE_SIZE, 4);
            let tag = Tag::new_root(m, IommuPerMap(d), spec).unwrap();
            let mut map = tag.create_owned_map::<busdma::front::DmaMemory<'_, _>>().unwrap();
            let buf =
                busdma::front::DmaMemory::alloc(m, &spec, PAGE_SIZE, busdma::MemAttr::WriteBack).unwrap();
            buf.write(0, &0x99u64.to_le_bytes()).unwrap();
            let bus = map.load(buf, Direction::ToDevice).ok().unwrap()[0].addr;
            assert_eq!(read(iommu, bus), Ok(0x99));
            let bus2 = map.reload(Direction::ToDevice).unwrap()[0].addr;
            assert_eq!(read(iommu, bus2), Ok(0x99));
            assert!(d.pending() > 0, "the reload's unmap is queued: no flush per packet");
            let buf = map.take().unwrap();
            assert_eq!(d.pending(), 0, "take proved the buffer unreachable first");
            assert!(read(iommu, bus).is_err() && read(iommu, bus2).is_err(), "nothing reachable once taken");
            drop(buf);
        },
    );
}

#[test]
fn an_owned_map_dropped_when_its_invalidation_fails_quarantines_its_memory() {
    with_domain(InvalidationPolicy::Strict, |m, d, _iommu, flaky, _pool| {
        let spec = TagSpec::new(4 * PAGE_SIZE, 4);
        let tag = Tag::new_root(m, IommuPerMap(d), spec).unwrap();
        let mut map = tag.create_owned_map::<busdma::front::DmaMemory<'_, _>>().unwrap();
        let buf = busdma::front::DmaMemory::alloc(m, &spec, PAGE_SIZE, busdma::MemAttr::WriteBack).unwrap();
        let pa = buf.pa();
        map.load(buf, Direction::FromDevice).ok().unwrap();
        flaky.fail_next(2);
        drop(map);
        assert_eq!(tag.quarantine_stats().held, 1);
        assert!(still_allocated(m, pa));
        tag.reclaim().unwrap();
        assert!(!still_allocated(m, pa));
    });
}
