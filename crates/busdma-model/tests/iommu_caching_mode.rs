//! Caching mode on the model IOMMU (VT-d CAP.CM = 1): the unit caches not-present results too,
//! so a domain must invalidate after mapping (`IotlbInvalidator::invalidate_mapped`). A device
//! that touched an IOVA before it was mapped reaches the fresh mapping only because of that
//! invalidation; without caching mode the hook issues no command.

use busdma::front::{Direction, IommuPerMap, KernelBuf, Tag, TagSpec};
use busdma::iommu::{Domain, DomainConfig, DomainId, InvalidationPolicy, IotlbInvalidator};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest};
use busdma::pgtable::{PageTable, PageTableConfig, Prot, TablePool, VtdSl};
use busdma::{AddrRange, Iova, PAGE_SIZE, Platform, Result};
use busdma_model::{
    Context, DmaPort, FaultReason, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu,
    TableFormat,
};

const DEV: u32 = 0x30;
const DOM: DomainId = 4;

/// The model IOMMU with the after-map hook dropped (the default no-op): a driver that forgets
/// caching mode.
struct ForgetsCachingMode<'a, 'm>(&'a ModelIommu<'m>);

impl IotlbInvalidator for ForgetsCachingMode<'_, '_> {
    fn invalidate_range(&self, domain: DomainId, range: AddrRange<Iova>) -> Result<()> {
        self.0.invalidate_range(domain, range)
    }
    fn invalidate_all(&self, domain: DomainId) -> Result<()> {
        self.0.invalidate_all(domain)
    }
}

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

fn iommu(m: &HostPlatform, caching_mode: bool) -> ModelIommu<'_> {
    ModelIommu::new(m, IommuConfig { caching_mode, audit: true, ..IommuConfig::default() }).unwrap()
}

/// A strict domain over `hw` with `DEV` attached in `iommu`; runs `body`, then tears down and
/// checks the audit.
fn with_domain<H: IotlbInvalidator, R>(
    m: &HostPlatform,
    iommu: &ModelIommu<'_>,
    hw: &H,
    body: impl FnOnce(&Domain<'_, HostPlatform, VtdSl, IovaAllocator, H>) -> R,
) -> R {
    let pool = TablePool::new(m);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(DOM, pt.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let space = AddrRange::from_start_len(Iova::new(1 << 30), 256 << 20).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: false, guard_page: false })
        .unwrap();
    let d = Domain::new(m, pt, iova, hw, DomainConfig::new(DOM, InvalidationPolicy::Strict)).unwrap();
    let r = body(&d);
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

/// Touches a fresh IOVA (a fault, which a caching-mode unit caches), maps a tagged frame
/// there, and reads it again: what the device sees.
fn touch_then_map<H: IotlbInvalidator>(
    m: &HostPlatform,
    iommu: &ModelIommu<'_>,
    d: &Domain<'_, HostPlatform, VtdSl, IovaAllocator, H>,
) -> std::result::Result<u64, FaultReason> {
    let g = m.pin_cpu();
    let r = d.alloc_iova(&g, &IovaRequest::pages(1)).unwrap();
    assert!(matches!(read(iommu, r.start()), Err(FaultReason::NotPresent { .. })));
    let frame = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    m.write_phys(frame.pa(), &0x5eed_u64.to_le_bytes()).unwrap();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { d.map(&g, r.start(), frame.pa(), PAGE_SIZE, Prot::READ) }.unwrap();
    let got = read(iommu, r.start());
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { d.unmap(&g, &[r], &[r]) }.unwrap();
    got
}

#[test]
fn in_caching_mode_a_page_mapped_after_a_fault_is_reached_because_the_map_invalidates() {
    let m = machine();
    let iommu = iommu(&m, true);
    with_domain(&m, &iommu, &iommu, |d| {
        assert_eq!(touch_then_map(&m, &iommu, d), Ok(0x5eed));
        assert_eq!(iommu.stats().inv_after_map, 1);
        assert_eq!(iommu.stats().not_present_hits, 0);
    });
}

#[test]
fn in_caching_mode_without_the_after_map_invalidation_the_cached_not_present_entry_keeps_faulting() {
    let m = machine();
    let iommu = iommu(&m, true);
    let forgetful = ForgetsCachingMode(&iommu);
    with_domain(&m, &iommu, &forgetful, |d| {
        assert!(matches!(touch_then_map(&m, &iommu, d), Err(FaultReason::NotPresent { .. })));
        assert_eq!(iommu.stats().not_present_hits, 1);
    });
}

#[test]
fn without_caching_mode_the_after_map_hook_issues_no_command_and_faults_are_not_cached() {
    let m = machine();
    let iommu = iommu(&m, false);
    with_domain(&m, &iommu, &iommu, |d| {
        assert_eq!(touch_then_map(&m, &iommu, d), Ok(0x5eed));
        let st = iommu.stats();
        assert_eq!((st.inv_after_map, st.not_present_hits, st.inv_domain), (0, 0, 0));
        assert_eq!(st.inv_range, 1, "only the unmap invalidates");
    });
}

#[test]
fn in_caching_mode_loads_through_a_tag_reach_pages_a_device_touched_before_the_load() {
    let m = machine();
    let iommu = iommu(&m, true);
    with_domain(&m, &iommu, &iommu, |d| {
        let spec = TagSpec::new(PAGE_SIZE, 1);
        let tag = Tag::new_root(&m, IommuPerMap(d), spec).unwrap();
        let frame = m.alloc_frames(FrameRequest::pages(1)).unwrap();
        m.write_phys(frame.pa(), &0xfeed_u64.to_le_bytes()).unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        let buf = unsafe { KernelBuf::new(m.phys_to_kva(frame.pa()).unwrap(), PAGE_SIZE) };
        let mut map = tag.create_map().unwrap();
        // Learn where loads land, unload, let the device touch it (cached as not present),
        // and load again: the window comes back (one IOVA range, freed and reallocated).
        let first = map.load(&buf, Direction::ToDevice).unwrap()[0].addr;
        map.unload().unwrap();
        assert!(matches!(read(&iommu, first), Err(FaultReason::NotPresent { .. })));
        let again = map.load(&buf, Direction::ToDevice).unwrap()[0].addr;
        assert_eq!(again, first, "the test needs the same bus address back");
        assert_eq!(read(&iommu, again), Ok(0xfeed));
        map.unload().unwrap();
    });
}
