//! The hostile device behind the model IOMMU, with tables built by busdma's page-table code and
//! invalidations issued (or, to prove the judge can see it, not issued) by hand: the verdicts
//! come from what the device really reached, not from what the tables say.

use busdma::iommu::IotlbInvalidator;
use busdma::pgtable::{Gather, PageTable, PageTableConfig, Prot, TablePool, VtdSl};
use busdma::{AddrRange, Iova, PAGE_SIZE, Platform};
use busdma_model::audit::{metadata_exposed, reachable};
use busdma_model::hostile::{Access, AttackClass, HostileDevice, Outcome, public_fill, secret_fill};
use busdma_model::{
    Context, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat,
};

const ATTACKER: u32 = 1;
const VICTIM: u32 = 2;
const IOVA: u64 = 0x10_0000;

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(32 << 20) }).unwrap()
}

fn table<'p>(pool: &'p TablePool<'p, HostPlatform>) -> PageTable<'p, HostPlatform, VtdSl> {
    PageTable::new(pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap()
}

#[test]
fn an_iommu_confines_the_device_to_its_pages_and_read_only_means_read_only() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let (mine, theirs) = (table(&pool), table(&pool));
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(ATTACKER, Context::new(1, mine.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(VICTIM, Context::new(2, theirs.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let own = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    let secret = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    m.write_phys(own.pa(), &public_fill(1, PAGE_SIZE as usize)).unwrap();
    m.write_phys(secret.pa(), &secret_fill(2, PAGE_SIZE as usize)).unwrap();
    let g = m.pin_cpu();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { mine.map(&g, Iova::new(IOVA), own.pa(), PAGE_SIZE, Prot::READ) }.unwrap();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { theirs.map(&g, Iova::new(IOVA + PAGE_SIZE), secret.pa(), PAGE_SIZE, Prot::READ_WRITE) }.unwrap();
    drop(g);

    let port = iommu.port(ATTACKER);
    let mut d = HostileDevice::new(&m, 42);
    d.truth().grant(own.pa(), PAGE_SIZE, Access::Read);
    assert_eq!(d.try_read(AttackClass::RandomScan, &port, IOVA + 8, 64), Outcome::Contained);
    assert_eq!(d.try_write(AttackClass::WriteReadOnly, &port, IOVA, &[0; 8]), Outcome::Faulted);
    assert_eq!(d.tally(AttackClass::WriteReadOnly).escapes, 0);
    // The read of the write attempt succeeded, the write faulted: nothing was overwritten.
    let mut b = [0u8; 8];
    m.read_phys(own.pa(), &mut b).unwrap();
    assert_eq!(b.to_vec(), public_fill(1, 8));
    // The victim's IOVA means nothing in the attacker's domain.
    assert_eq!(d.try_read(AttackClass::OtherDomain, &port, IOVA + PAGE_SIZE, 64), Outcome::Faulted);
    for _ in 0..1000 {
        let bus = d.random() & ((1 << 48) - 1);
        assert_ne!(
            d.try_read(AttackClass::RandomScan, &port, bus, 16),
            Outcome::Escaped { bytes: 16 },
            "{bus:#x}"
        );
    }
    assert_eq!(d.total().escapes, 0);
    for t in [&mine, &theirs] {
        assert!(metadata_exposed(&m, &reachable::<VtdSl>(&m, t.root(), t.levels())).is_empty());
    }
}

#[test]
fn a_stale_iotlb_entry_is_an_escape_and_the_invalidation_closes_it() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let pt = table(&pool);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(ATTACKER, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let buf = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    let g = m.pin_cpu();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.map(&g, Iova::new(IOVA), buf.pa(), PAGE_SIZE, Prot::READ_WRITE) }.unwrap();
    let port = iommu.port(ATTACKER);
    let mut d = HostileDevice::new(&m, 5);
    d.truth().grant(buf.pa(), PAGE_SIZE, Access::ReadWrite);
    assert_eq!(d.try_read(AttackClass::AfterUnmap, &port, IOVA, 32), Outcome::Contained); // fills the IOTLB
    let mut gather = Gather::default();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { pt.unmap(&g, AddrRange::from_start_len(Iova::new(IOVA), PAGE_SIZE).unwrap(), &mut gather) }
        .unwrap();
    d.truth().revoke(buf.pa(), PAGE_SIZE, Access::ReadWrite);
    // The entry is gone from the table but not from the IOTLB: the device still gets through.
    assert_eq!(d.try_read(AttackClass::AfterUnmap, &port, IOVA, 32), Outcome::Escaped { bytes: 32 });
    iommu.invalidate_range(1, AddrRange::from_start_len(Iova::new(IOVA), PAGE_SIZE).unwrap()).unwrap();
    assert_eq!(d.try_read(AttackClass::AfterUnmap, &port, IOVA, 32), Outcome::Faulted);
    let t = d.tally(AttackClass::AfterUnmap);
    assert_eq!((t.attempts, t.escapes, t.bytes_leaked, t.faults), (3, 1, 32, 1));
}
