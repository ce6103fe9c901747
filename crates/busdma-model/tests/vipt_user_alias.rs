//! Seed 003 end to end: a user page on a VIPT machine whose IOMMU keeps one alias coherent by
//! a coherence index. The user writes through its own alias; busdma gives the IOMMU the kernel
//! alias. Loaded as a plain page list (nobody flushed the user alias) the device reads stale
//! memory: the problem. Loaded as a registered user buffer, the registration pinned the pages
//! the way get_user_pages does, flushing the user alias: the device reads what the user wrote.

use busdma::front::{Direction, IommuPerMap, PageList, Segment, Tag, TagSpec, load_registered};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::pin::Registry;
use busdma::{AddrRange, Iova, PAGE_SIZE, Platform, UserVa};
use busdma_model::uspace::UserSpace;
use busdma_model::{
    CacheConfig, Coherence, Context, DmaPort, HostPlatform, IommuConfig, MachineConfig, ModelIommu,
    TableFormat,
};

const DEV: u32 = 5;

fn device_read(iommu: &ModelIommu<'_>, segs: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        iommu.port(DEV).dma_read(s.addr, &mut b).unwrap();
        out.extend(b);
    }
    out
}

#[test]
fn a_user_alias_is_coherent_only_once_registration_flushed_it() {
    let cache = CacheConfig::vipt_aliasing().with_coherence(Coherence::CoherenceIndex);
    let m =
        HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }.with_cache(cache))
            .unwrap();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let table =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    let space = AddrRange::new(Iova::new(PAGE_SIZE), Iova::new(1 << 48)).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: false, guard_page: false })
        .unwrap();
    let d = Domain::new(&m, table, iova, &iommu, DomainConfig::new(3, InvalidationPolicy::Strict)).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(3, d.table().root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let mut spec = TagSpec::new(64 << 10, 16);
    spec.flags.coherent = true; // coherent through the IOMMU's index
    let tag = Tag::new_root(&m, IommuPerMap(&d), spec).unwrap();
    let us = UserSpace::new(&m);
    // A user page whose colour differs from its kernel alias's, wherever the host placed the
    // direct map: single pages mapped two pages apart advance the user colour by 2 per try
    // while the frames (allocated in order) advance the kernel colour by 1, so the two differ
    // within `colours` tries. (Consecutive pages of one mapping would keep the difference
    // constant, which is 0 for some direct-map placements.)
    let cfg = *m.cache().unwrap().config();
    let colours = cfg.colours();
    let mut ua = UserVa::new(0x7f00_0000_0000);
    for tries in 0.. {
        assert!(tries < 4 * colours, "no user page with a colour unlike its kernel alias's");
        us.map(ua, PAGE_SIZE).unwrap();
        let pa = us.translate(ua).unwrap();
        if cfg.colour_of(ua.raw()) != cfg.colour_of(m.phys_to_kva(pa).unwrap().raw()) {
            break;
        }
        ua = UserVa::new(ua.raw() + 2 * PAGE_SIZE);
    }
    let pa = us.translate(ua).unwrap();
    let data: Vec<u8> = (0..PAGE_SIZE as usize).map(|i| (i % 253) as u8 + 1).collect();
    us.write(ua, &data).unwrap();

    // The problem: the page loaded as it is; the index names the kernel alias, the dirty lines
    // are the user alias's.
    let mut map = tag.create_map().unwrap();
    let pages = [pa];
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { PageList::new(&pages, 0, PAGE_SIZE) }, Direction::ToDevice).unwrap();
    assert!(device_read(&iommu, map.segments()) != data, "seed 003: the user alias is not the indexed one");
    map.unload().unwrap();

    // busdma's way: register (pins, flushing the user alias), then load the registered buffer.
    let reg = Registry::new(&us, 1 << 20).unwrap();
    reg.register(ua, PAGE_SIZE).unwrap();
    let load = load_registered(&mut map, &reg, ua, PAGE_SIZE, Direction::ToDevice).unwrap();
    assert!(device_read(&iommu, load.segments()) == data, "the device reads what the user wrote");
    load.unload().unwrap();
    reg.unregister(ua, PAGE_SIZE).unwrap();
}
