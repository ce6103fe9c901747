//! Tests of the model IOMMU with tables written by hand, bit by bit from the specifications
//! (busdma's table builder is tested against this walker elsewhere).

use std::sync::atomic::Ordering;

use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform, TablePage};

use super::*;
use crate::{FrameRequest, MachineConfig};

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

/// A hand-built table: `levels` table pages on one path, so one IOVA region is mappable.
struct Tables {
    pages: Vec<TablePage>,
    format: TableFormat,
}

const VTD_RW: u64 = 0b11;
const LPAE_TABLE: u64 = 0b11;
/// Page descriptor: valid | page, AF, AP[1] (unprivileged access).
const LPAE_PAGE_RW: u64 = 0b11 | 1 << 10 | 1 << 6;
const LPAE_RDONLY: u64 = 1 << 7;

impl Tables {
    /// Tables with one path covering IOVA `[0, 2 MiB)` (4-level / 48-bit).
    fn new(m: &HostPlatform, format: TableFormat) -> Self {
        let pages: Vec<TablePage> = (0..4).map(|_| m.alloc_table_page().unwrap()).collect();
        let link = match format {
            TableFormat::VtdSecondLevel => VTD_RW,
            TableFormat::ArmLpaeStage1 | TableFormat::ArmLpaeStage2 => LPAE_TABLE,
        };
        for i in 0..3 {
            pages[i].entry(0).unwrap().store(pages[i + 1].pa().raw() | link, Ordering::Release);
        }
        Self { pages, format }
    }

    fn root(&self) -> PhysAddr {
        self.pages[0].pa()
    }

    fn ctx(&self, domain: DomainId) -> Context {
        Context::new(domain, self.root(), self.format, 48)
    }

    /// Maps IOVA page `index` (< 512) to `pa`.
    fn map(&self, index: usize, pa: PhysAddr, writable: bool) {
        let e = match self.format {
            TableFormat::VtdSecondLevel => pa.raw() | if writable { VTD_RW } else { 0b01 },
            TableFormat::ArmLpaeStage1 => pa.raw() | LPAE_PAGE_RW | if writable { 0 } else { LPAE_RDONLY },
            // Stage 2: page, AF, MemAttr Normal WB, S2AP read (bit 6) and write (bit 7).
            TableFormat::ArmLpaeStage2 => {
                pa.raw() | 0b11 | 1 << 10 | 0b1111 << 2 | 1 << 6 | u64::from(writable) << 7
            }
        };
        self.pages[3].entry(index).unwrap().store(e, Ordering::Release);
    }

    fn clear(&self, index: usize) {
        self.pages[3].entry(index).unwrap().store(0, Ordering::Release);
    }
}

const FORMATS: [TableFormat; 3] =
    [TableFormat::VtdSecondLevel, TableFormat::ArmLpaeStage1, TableFormat::ArmLpaeStage2];

fn range(iova: u64, len: u64) -> AddrRange<Iova> {
    AddrRange::from_start_len(Iova::new(iova), len).unwrap()
}

#[test]
fn a_device_reaches_the_page_its_iova_maps_in_guest_ram() {
    for format in FORMATS {
        let m = machine();
        let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
        let t = Tables::new(&m, format);
        let data = m.alloc_frames(FrameRequest::pages(2)).unwrap();
        // Two IOVA pages mapped to the two data pages in reverse order: a DMA across the
        // IOVA page boundary lands in two separate places.
        t.map(5, data.pa().checked_add(PAGE_SIZE).unwrap(), true);
        t.map(6, data.pa(), true);
        // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
        unsafe { iommu.attach(9, t.ctx(1)) }.unwrap();
        let port = iommu.port(9);
        port.dma_write(Iova::new(6 * PAGE_SIZE - 3), b"abcdef").unwrap();
        let mut got = [0u8; 3];
        m.read_phys(data.pa().checked_add(2 * PAGE_SIZE - 3).unwrap(), &mut got).unwrap();
        assert_eq!(&got, b"abc", "{format:?}");
        m.read_phys(data.pa(), &mut got).unwrap();
        assert_eq!(&got, b"def", "{format:?}");
        let mut back = [0u8; 6];
        port.dma_read(Iova::new(6 * PAGE_SIZE - 3), &mut back).unwrap();
        assert_eq!(&back, b"abcdef");
        assert_eq!(
            iommu.translate(9, Iova::new(5 * PAGE_SIZE + 7), false).unwrap(),
            data.pa().checked_add(PAGE_SIZE + 7).unwrap()
        );
        assert!(iommu.faults().is_empty());
    }
}

#[test]
fn refused_accesses_fault_and_are_logged_with_device_iova_direction_and_reason() {
    for format in FORMATS {
        let m = machine();
        let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
        let t = Tables::new(&m, format);
        let data = m.alloc_frames(FrameRequest::pages(1)).unwrap();
        t.map(1, data.pa(), false);
        // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
        unsafe { iommu.attach(3, t.ctx(1)) }.unwrap();
        let port = iommu.port(3);
        let mut b = [0u8; 4];
        port.dma_read(Iova::new(PAGE_SIZE), &mut b).unwrap();
        let e = port.dma_write(Iova::new(PAGE_SIZE + 8), &b).unwrap_err();
        assert_eq!(
            e,
            DmaFault {
                device: 3,
                iova: Iova::new(PAGE_SIZE + 8),
                write: true,
                reason: FaultReason::Permission
            }
        );
        let e = port.dma_read(Iova::new(2 * PAGE_SIZE), &mut b).unwrap_err();
        assert_eq!(e.reason, FaultReason::NotPresent { level: 3 });
        let e = port.dma_read(Iova::new(1 << 48), &mut b).unwrap_err();
        assert_eq!(e.reason, FaultReason::BeyondInputWidth { input_bits: 48 });
        let e = iommu.port(4).dma_read(Iova::new(PAGE_SIZE), &mut b).unwrap_err();
        assert_eq!((e.device, e.reason), (4, FaultReason::NotAttached));
        let log = iommu.take_faults();
        assert_eq!(log.len(), 4);
        assert_eq!((log[0].device, log[0].write, log[0].iova), (3, true, Iova::new(PAGE_SIZE + 8)));
        assert!(iommu.faults().is_empty());
        assert_eq!(iommu.stats().faults, 4);
    }
}

#[test]
fn the_fault_log_is_bounded_and_counts_what_it_drops() {
    let m = machine();
    let cfg = IommuConfig { fault_log_entries: 3, ..IommuConfig::default() };
    let iommu = ModelIommu::new(&m, cfg).unwrap();
    let mut b = [0u8; 1];
    for i in 0..5 {
        assert!(iommu.port(i).dma_read(Iova::new(0), &mut b).is_err());
    }
    let log = iommu.take_faults();
    assert_eq!(log.iter().map(|f| f.device).collect::<Vec<_>>(), [0, 1, 2], "the first faults are kept");
    let s = iommu.stats();
    assert_eq!((s.faults, s.faults_dropped), (5, 2));
    assert!(iommu.port(9).dma_read(Iova::new(0), &mut b).is_err());
    assert_eq!(iommu.faults().len(), 1, "reading the log makes room");
}

#[test]
fn the_iotlb_serves_a_cleared_entry_until_it_is_invalidated() {
    for format in FORMATS {
        let m = machine();
        let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
        let t = Tables::new(&m, format);
        let data = m.alloc_frames(FrameRequest::pages(1)).unwrap();
        m.write_phys(data.pa(), b"secret").unwrap();
        t.map(7, data.pa(), true);
        // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
        unsafe { iommu.attach(1, t.ctx(5)) }.unwrap();
        let port = iommu.port(1);
        let mut b = [0u8; 6];
        port.dma_read(Iova::new(7 * PAGE_SIZE), &mut b).unwrap();
        // Unmap in the tables only: the IOTLB still holds the translation, and the device
        // still reads the page. This is the hazard invalidation exists for.
        t.clear(7);
        b = [0; 6];
        port.dma_read(Iova::new(7 * PAGE_SIZE), &mut b).unwrap();
        assert_eq!(&b, b"secret", "{format:?}: the stale IOTLB entry reaches memory");
        let walks = iommu.stats().walks;
        assert!(iommu.stats().iotlb_hits >= 1);
        // An invalidation of another domain, or of another range, changes nothing.
        iommu.invalidate_range(6, range(7 * PAGE_SIZE, PAGE_SIZE)).unwrap();
        iommu.invalidate_range(5, range(8 * PAGE_SIZE, PAGE_SIZE)).unwrap();
        port.dma_read(Iova::new(7 * PAGE_SIZE), &mut b).unwrap();
        assert_eq!(iommu.stats().walks, walks);
        // The covering invalidation makes the device fault.
        iommu.invalidate_range(5, range(7 * PAGE_SIZE + 100, 1)).unwrap();
        let e = port.dma_read(Iova::new(7 * PAGE_SIZE), &mut b).unwrap_err();
        assert_eq!(e.reason, FaultReason::NotPresent { level: 3 });
    }
}

#[test]
fn invalidations_are_counted_by_kind_and_large_ranges_scan() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let t = Tables::new(&m, TableFormat::VtdSecondLevel);
    let data = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    for i in 0..512 {
        t.map(i, data.pa(), true);
    }
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(1, t.ctx(1)) }.unwrap();
    let port = iommu.port(1);
    let mut b = [0u8; 1];
    for i in 0..512 {
        port.dma_read(Iova::new(i * PAGE_SIZE), &mut b).unwrap();
    }
    iommu.invalidate_range(1, range(0, 4 * PAGE_SIZE)).unwrap();
    // 2 MiB = 512 pages, more than the 256 sets: scanned.
    iommu.invalidate_range(1, range(0, 512 * PAGE_SIZE)).unwrap();
    iommu.invalidate_all(1).unwrap();
    let s = iommu.stats();
    assert_eq!((s.inv_range, s.inv_range_probed, s.inv_range_scanned, s.inv_domain), (2, 1, 1, 1));
    assert!(s.iotlb_entries_dropped >= 4, "{s:?}");
    for i in 0..512 {
        t.clear(i);
    }
    assert!(port.dma_read(Iova::new(300 * PAGE_SIZE), &mut b).is_err());
}

#[test]
fn a_disabled_iotlb_walks_every_time() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig { iotlb_entries: 0, ..IommuConfig::default() }).unwrap();
    let t = Tables::new(&m, TableFormat::ArmLpaeStage1);
    let data = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    t.map(0, data.pa(), true);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(1, t.ctx(1)) }.unwrap();
    let mut b = [0u8; 1];
    iommu.port(1).dma_read(Iova::new(0), &mut b).unwrap();
    t.clear(0);
    assert!(iommu.port(1).dma_read(Iova::new(0), &mut b).is_err());
    assert_eq!(iommu.stats().iotlb_hits, 0);
}

#[test]
fn attach_checks_its_context() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let t = Tables::new(&m, TableFormat::VtdSecondLevel);
    let mut c = t.ctx(1);
    c.input_bits = 40;
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    assert!(matches!(unsafe { iommu.attach(1, c) }, Err(Error::InvalidArgument { value: 40, .. })));
    c.format = TableFormat::ArmLpaeStage1;
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(1, c) }.unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    assert!(matches!(unsafe { iommu.attach(1, c) }, Err(Error::AlreadyMapped { addr: 1 })));
    assert_eq!(iommu.detach(1).unwrap(), c);
    assert!(matches!(iommu.detach(1), Err(Error::NotMapped { addr: 1 })));
    let mut c = t.ctx(1);
    c.root = PhysAddr::new(c.root.raw() + 8);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    assert!(matches!(unsafe { iommu.attach(1, c) }, Err(Error::Misaligned { .. })));
    c.root = PhysAddr::new(0x1000);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    assert!(matches!(unsafe { iommu.attach(1, c) }, Err(Error::OutOfRange { .. })));
    assert!(ModelIommu::new(&m, IommuConfig { output_bits: 52, ..IommuConfig::default() }).is_err());
}

fn audited(m: &HostPlatform) -> ModelIommu<'_> {
    ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap()
}

#[test]
fn the_audit_flags_an_iova_released_before_its_invalidation() {
    let m = machine();
    let iommu = audited(&m);
    let t = Tables::new(&m, TableFormat::VtdSecondLevel);
    let data = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    t.map(3, data.pa(), true);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(1, t.ctx(2)) }.unwrap();
    let mut b = [0u8; 1];
    iommu.port(1).dma_read(Iova::new(3 * PAGE_SIZE), &mut b).unwrap();
    t.clear(3);
    let r = range(3 * PAGE_SIZE, PAGE_SIZE);
    iommu.audit_unmapped(2, &[r]);
    // Released with the translation possibly cached: a violation, with the page named.
    iommu.audit_iova_released(2, r);
    let rep = iommu.audit_report().unwrap();
    assert_eq!(rep.violation_count, 1);
    assert_eq!(
        rep.violations[0],
        Violation::IovaReleasedWhileCached { domain: 2, iova: Iova::new(3 * PAGE_SIZE), pa: data.pa() }
    );
    // After the covering invalidation the same release is clean.
    iommu.invalidate_range(2, r).unwrap();
    iommu.audit_iova_released(2, r);
    let rep = iommu.audit_report().unwrap();
    assert_eq!((rep.violation_count, rep.exposures, rep.pending, rep.cached), (1, 1, 0, 0));
}

#[test]
fn the_audit_flags_a_table_page_released_while_a_walk_through_it_may_be_cached() {
    let m = machine();
    let iommu = audited(&m);
    let t = Tables::new(&m, TableFormat::ArmLpaeStage1);
    let data = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    t.map(0, data.pa(), true);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(1, t.ctx(2)) }.unwrap();
    let mut b = [0u8; 1];
    iommu.port(1).dma_read(Iova::new(0), &mut b).unwrap();
    iommu.audit_table_page_released(2, t.pages[3].pa());
    iommu.audit_table_page_released(3, t.pages[3].pa()); // another domain never walked it
    let rep = iommu.audit_report().unwrap();
    assert_eq!(
        rep.violations,
        [Violation::TablePageReleasedWhileCached { domain: 2, page: t.pages[3].pa(), iova: Iova::new(0) }]
    );
    iommu.invalidate_all(2).unwrap();
    iommu.audit_table_page_released(2, t.pages[3].pa());
    assert_eq!(iommu.audit_report().unwrap().violation_count, 1);
}

#[test]
fn the_audit_measures_exposure_from_unmap_to_the_first_invalidation_that_started_after_it() {
    let m = machine();
    m.freeze_clock();
    let iommu = audited(&m);
    let r = range(0x10_0000, 2 * PAGE_SIZE);
    iommu.audit_unmapped(1, &[r]);
    m.advance_clock(1_000);
    iommu.audit_unmapped(1, &[range(0x20_0000, PAGE_SIZE), range(0x28_0000, PAGE_SIZE)]);
    iommu.audit_unmapped(1, &[range(0x30_0000, PAGE_SIZE)]);
    m.advance_clock(500);
    iommu.invalidate_range(1, r).unwrap();
    let rep = iommu.audit_report().unwrap();
    assert_eq!((rep.exposures, rep.max_exposure_ns, rep.max_exposure_unmaps, rep.pending), (1, 1_500, 2, 3));
    iommu.invalidate_all(1).unwrap();
    let rep = iommu.audit_report().unwrap();
    assert_eq!((rep.exposures, rep.max_exposure_ns, rep.pending), (4, 1_500, 0));
}

#[test]
fn injected_invalidation_failures_execute_nothing_and_are_counted_until_the_count_runs_out() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let t = Tables::new(&m, TableFormat::VtdSecondLevel);
    let data = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    m.write_phys(data.pa(), b"stale!").unwrap();
    t.map(3, data.pa(), true);
    // SAFETY: the tables live until the end of the test, after the device's last DMA.
    unsafe { iommu.attach(1, t.ctx(4)).unwrap() };
    let port = iommu.port(1);
    let mut b = [0u8; 6];
    port.dma_read(Iova::new(3 * PAGE_SIZE), &mut b).unwrap();
    t.clear(3);
    let is_injected = |e: Error| matches!(e, Error::InvalidationFailed { domain: 4, status, .. } if status == INJECTED_STATUS);
    // Two failures: one ranged, one whole-domain; neither drops the cached page.
    iommu.fail_next_invalidations(2);
    assert!(is_injected(iommu.invalidate_range(4, range(3 * PAGE_SIZE, PAGE_SIZE)).unwrap_err()));
    assert_eq!(iommu.invalidations_to_fail(), 1);
    assert!(is_injected(iommu.invalidate_all(4).unwrap_err()));
    b = [0; 6];
    port.dma_read(Iova::new(3 * PAGE_SIZE), &mut b).unwrap();
    assert_eq!(&b, b"stale!", "a failed command leaves the IOTLB as it was");
    let s = iommu.stats();
    assert_eq!((s.inv_failed, s.inv_range, s.inv_domain, s.iotlb_entries_dropped), (2, 0, 0, 0));
    // The count ran out: the next command executes.
    iommu.invalidate_range(4, range(3 * PAGE_SIZE, PAGE_SIZE)).unwrap();
    assert!(port.dma_read(Iova::new(3 * PAGE_SIZE), &mut b).is_err());
    assert_eq!((iommu.stats().inv_failed, iommu.stats().inv_range), (2, 1));
    // u64::MAX fails every command until cancelled with 0.
    iommu.fail_next_invalidations(u64::MAX);
    for _ in 0..3 {
        assert!(is_injected(iommu.invalidate_all(4).unwrap_err()));
    }
    assert_eq!(iommu.invalidations_to_fail(), u64::MAX);
    iommu.fail_next_invalidations(0);
    iommu.invalidate_all(4).unwrap();
    assert_eq!((iommu.stats().inv_failed, iommu.stats().inv_domain), (5, 1));
}

mod cost {
    use super::*;

    fn range() -> AddrRange<Iova> {
        AddrRange::from_start_len(Iova::new(0x10_0000), 4 * PAGE_SIZE).unwrap()
    }

    /// Issues `n` ranged and `n` whole-domain invalidations and `n` map notifications.
    fn commands(iommu: &ModelIommu<'_>, n: u64) {
        for _ in 0..n {
            iommu.invalidate_range(1, range()).unwrap();
            iommu.invalidate_all(1).unwrap();
            iommu.invalidate_mapped(1, range()).unwrap();
        }
    }

    #[test]
    fn every_profile_is_named_once_and_says_where_its_figures_come_from() {
        for p in PROFILES {
            assert_eq!(CostProfile::named(p.name), Some(p));
            assert_eq!(PROFILES.iter().filter(|q| q.name == p.name).count(), 1);
            assert!(!p.source.is_empty(), "{}", p.name);
        }
        assert!(CostProfile::named(DEFAULT_PROFILE).is_some());
        assert_eq!(CostProfile::named("no-such-profile"), None);
    }

    #[test]
    fn a_profiles_invalidations_take_at_least_its_latency_on_the_model_clock() {
        let m = machine();
        let p = CostProfile::named("vtd-queued").unwrap();
        let iommu = ModelIommu::new(&m, p.apply(IommuConfig::default())).unwrap();
        let n = 20;
        let t0 = m.monotonic_ns();
        commands(&iommu, n);
        let spent = m.monotonic_ns() - t0;
        let want = 2 * n * p.invalidation_latency_ns;
        assert!(spent >= want, "{spent} ns for {} commands of {} ns", 2 * n, p.invalidation_latency_ns);
        let s = iommu.stats();
        assert!(s.inv_wait_ns >= want, "{s:?}");
        assert_eq!(s.map_wait_ns, 0, "a bare-metal profile charges nothing per map");
    }

    #[test]
    fn on_a_frozen_clock_each_command_advances_the_model_clock_by_exactly_its_latency() {
        let m = machine();
        m.freeze_clock();
        let p = CostProfile::named("viommu").unwrap();
        let iommu = ModelIommu::new(&m, p.apply(IommuConfig::default())).unwrap();
        let t0 = m.monotonic_ns();
        commands(&iommu, 5);
        let want = 5 * (2 * p.invalidation_latency_ns + p.map_latency_ns);
        assert_eq!(m.monotonic_ns() - t0, want);
        let s = iommu.stats();
        assert!(s.map_wait_ns >= 5 * p.map_latency_ns, "{s:?}");
    }

    #[test]
    fn the_none_profile_adds_no_time() {
        let m = machine();
        m.freeze_clock();
        let p = CostProfile::named("none").unwrap();
        let iommu = ModelIommu::new(&m, p.apply(IommuConfig::default())).unwrap();
        let t0 = m.monotonic_ns();
        commands(&iommu, 50);
        assert_eq!(m.monotonic_ns(), t0);
        let s = iommu.stats();
        assert_eq!((s.inv_wait_ns, s.map_wait_ns), (0, 0));
        assert_eq!((s.inv_range, s.inv_domain), (50, 50));
    }
}
