//! Attributes in IOMMU entries, through the model IOMMU: the leaf busdma writes carries the
//! memory type the strategy chose (MMIO and peer BARs device, RAM normal), the direction's
//! rights, and on VT-d never SNP for device memory; the model's walker, written from the
//! specifications, decodes each entry to exactly that. Peer BARs registered on the IOMMU are
//! never handed out as IOVA, in existing or new domains.

use busdma::device::{Iommu, Policy};
use busdma::front::{Direction, MemKind, SgEntry, SgList, TagSpec};
use busdma::pgtable::{ArmLpaeS1, MemType, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl};
use busdma::quickmap::QuickMaps;
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    Context, DmaPort, FrameRequest, HostPlatform, IommuConfig, LPAE_MAIR, LeafAttrs, MachineConfig,
    MemoryType, ModelIommu, TableFormat,
};

const DEV: u32 = 0x40;

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

fn model(m: &HostPlatform) -> ModelIommu<'_> {
    ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap()
}

/// `pages` fresh pages filled with a pattern derived from `seed`.
fn pages(m: &HostPlatform, n: u64, seed: u8) -> (PhysAddr, Vec<u8>) {
    let pa = m.frames().alloc(FrameRequest::pages(n)).unwrap();
    let data: Vec<u8> =
        (0..n * PAGE_SIZE).map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1).collect();
    m.write_phys(pa, &data).unwrap();
    (pa, data)
}

const NORMAL: LeafAttrs = LeafAttrs { memory: MemoryType::Normal, snoop: false, privileged_only: false };
const DEVICE: LeafAttrs = LeafAttrs { memory: MemoryType::Device, snoop: false, privileged_only: false };

#[test]
fn an_mmio_run_is_mapped_as_device_memory_and_ram_as_normal_with_the_directions_rights() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(TagSpec::new(16 * PAGE_SIZE, 8)).unwrap();
    // A register window the test backs with RAM, so the device's reads can be checked.
    let (mmio, mmio_bytes) = pages(&m, 1, 7);
    let (ram, ram_bytes) = pages(&m, 2, 9);
    for (dir, read, write) in [
        (Direction::ToDevice, true, false),
        (Direction::FromDevice, false, true),
        (Direction::Bidirectional, true, true),
    ] {
        let mut map = tag.create_map().unwrap();
        let sg = [
            SgEntry { pa: ram, len: 2 * PAGE_SIZE, kind: MemKind::Page },
            SgEntry { pa: mmio, len: PAGE_SIZE, kind: MemKind::Mmio },
        ];
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        let segs = map.load(&unsafe { SgList::new(&sg) }, dir).unwrap().to_vec();
        // Bus pages in load order: two of RAM, then the register window's own page.
        let bus: Vec<u64> = segs
            .iter()
            .flat_map(|s| (0..s.len.div_ceil(PAGE_SIZE)).map(move |i| s.addr.raw() + i * PAGE_SIZE))
            .collect();
        assert_eq!(bus.len(), 3);
        let hw = iommu.hw();
        for (i, &at) in bus.iter().enumerate() {
            let leaf = hw.inspect(DEV, Iova::new(at)).unwrap();
            let want = if i < 2 { NORMAL } else { DEVICE };
            assert_eq!(leaf.attrs, want, "{dir:?}: leaf {i} at {at:#x}");
            assert_eq!((leaf.read, leaf.write), (read, write), "{dir:?}: rights at {at:#x}");
        }
        if read {
            let mut got = Vec::new();
            for s in &segs {
                let mut b = vec![0u8; s.len as usize];
                hw.port(DEV).dma_read(s.addr, &mut b).unwrap();
                got.extend(b);
            }
            let mut want = ram_bytes.clone();
            want.extend(&mmio_bytes);
            assert_eq!(got, want, "the device reads exactly the RAM bytes, then the register window's");
        }
        map.unload().unwrap();
    }
}

#[test]
fn vtd_never_sets_snp_on_device_memory_even_when_asked_to_snoop() {
    let m = machine();
    let pool = TablePool::new(&m);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    let iommu = ModelIommu::new(&m, IommuConfig { iotlb_entries: 0, ..IommuConfig::default() }).unwrap();
    // SAFETY: the table is the test's and outlives the attachment's use.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let g = m.pin_cpu();
    let (pa, _) = pages(&m, 2, 1);
    let snoop = Prot { force_snoop: true, ..Prot::READ_WRITE };
    // SAFETY: the test owns this table's IOVA and the pages it maps.
    unsafe { pt.map(&g, Iova::new(0x10_0000), pa, PAGE_SIZE, snoop) }.unwrap();
    // SAFETY: as above.
    unsafe { pt.map(&g, Iova::new(0x20_0000), pa, PAGE_SIZE, snoop.with_mem(MemType::Device)) }.unwrap();
    let ram = iommu.inspect(DEV, Iova::new(0x10_0000)).unwrap();
    assert_eq!(ram.attrs, LeafAttrs { snoop: true, ..NORMAL }, "forced snoop on RAM: SNP set, EMT WB");
    let dev = iommu.inspect(DEV, Iova::new(0x20_0000)).unwrap();
    assert_eq!(dev.attrs, DEVICE, "device memory: SNP clear, EMT UC");
    assert_eq!(
        VtdSl::prot(VtdSl::make_leaf(pa, VtdSl::effective_prot(snoop.with_mem(MemType::Device)).unwrap(), 0))
            .mem,
        MemType::Device
    );
}

#[test]
fn arm_lpae_device_memory_uses_the_mair_device_attribute_and_privilege_clears_ap1() {
    assert_eq!(ArmLpaeS1::MAIR, LPAE_MAIR, "the format and the model's context descriptors agree");
    let m = machine();
    let pool = TablePool::new(&m);
    let pt = PageTable::<_, ArmLpaeS1>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true })
        .unwrap();
    let iommu = ModelIommu::new(&m, IommuConfig { iotlb_entries: 0, ..IommuConfig::default() }).unwrap();
    // SAFETY: the table is the test's and outlives the attachment's use.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::ArmLpaeStage1, 48)) }.unwrap();
    let g = m.pin_cpu();
    let (pa, _) = pages(&m, 1, 2);
    let cases = [
        (0x10_0000, Prot::READ, LeafAttrs { memory: MemoryType::Normal, ..NORMAL }, (true, false)),
        (0x20_0000, Prot::READ_WRITE.with_mem(MemType::Device), DEVICE, (true, true)),
        (0x30_0000, Prot::WRITE, NORMAL, (true, true)),
    ];
    for (iova, prot, attrs, rights) in cases {
        // SAFETY: the test owns this table's IOVA and the page it maps.
        unsafe { pt.map(&g, Iova::new(iova), pa, PAGE_SIZE, prot) }.unwrap();
        let leaf = iommu.inspect(DEV, Iova::new(iova)).unwrap();
        assert_eq!(leaf.attrs, attrs, "{prot:?}");
        assert_eq!((leaf.read, leaf.write), rights, "{prot:?}");
    }
    // A privileged-only entry: the walk decodes AP[1] = 0 and an unprivileged request faults.
    let privileged = Prot { privileged: true, ..Prot::READ };
    // SAFETY: as above.
    unsafe { pt.map(&g, Iova::new(0x40_0000), pa, PAGE_SIZE, privileged) }.unwrap();
    let leaf = iommu.inspect(DEV, Iova::new(0x40_0000)).unwrap();
    assert!(leaf.attrs.privileged_only);
    assert_eq!((leaf.read, leaf.write), (false, false), "unprivileged requests are refused");
}

/// Allocates IOVA ranges of `pages` pages through tags of `d` until the domain's space
/// below `limit` is used up; returns every bus address handed out.
fn drain_iova(
    d: &busdma::device::Device<'_, '_, ModelIommu<'_>>,
    m: &HostPlatform,
    limit: u64,
) -> Vec<AddrRange<Iova>> {
    let (pa, _) = pages(m, 1, 3);
    let tag = d.tag(TagSpec { dma_mask: limit - 1, ..TagSpec::new(256 * PAGE_SIZE, 1) }).unwrap();
    let mut maps = Vec::new();
    let mut got = Vec::new();
    loop {
        let mut map = tag.create_map().unwrap();
        let sg = [SgEntry { pa, len: PAGE_SIZE, kind: MemKind::Page }];
        // SAFETY: memory the test allocated; the maps are dropped before the machine.
        match map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice) {
            Ok(s) => {
                got.push(AddrRange::from_start_len(s[0].addr, s[0].len).unwrap());
                maps.push(map);
            }
            Err(_) => break,
        }
    }
    got
}

#[test]
fn a_registered_peer_bar_is_never_handed_out_as_iova_in_existing_or_new_domains() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    // A small space so the tests can use all of it: 1 MiB .. 3 MiB, the BAR at 2 MiB .. 2.5 MiB.
    let cfg = busdma::device::DeviceConfig {
        aperture: Some(AddrRange::new(Iova::new(1 << 20), Iova::new(3 << 20)).unwrap()),
        iova_caches: false,
        ..Default::default()
    };
    let bar = AddrRange::new(Iova::new(2 << 20), Iova::new((2 << 20) + (512 << 10))).unwrap();
    let existing = iommu.attach_with(DEV, Policy::Strict, cfg).unwrap();
    let peer = iommu.register_peer(bar).unwrap();
    let later = iommu.attach_with(DEV + 1, Policy::Deferred, cfg).unwrap();
    for d in [&existing, &later] {
        let got = drain_iova(d, &m, 3 << 20);
        assert_eq!(got.len() as u64, (2 << 20) / PAGE_SIZE - 128, "every page but the BAR's was handed out");
        assert!(got.iter().all(|r| !r.overlaps(&bar)), "no IOVA inside the peer's BAR");
    }
    assert_eq!(iommu.peer_ranges(), vec![bar]);
    iommu.unregister_peer(peer).unwrap();
    assert!(iommu.peer_ranges().is_empty());
}

#[test]
fn a_peer_bar_cannot_be_unregistered_while_a_load_reaches_it() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let (bar_pa, bar_bytes) = pages(&m, 4, 5);
    let bar = AddrRange::from_start_len(Iova::new(bar_pa.raw()), 4 * PAGE_SIZE).unwrap();
    let peer = iommu.register_peer(bar).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(TagSpec::new(16 * PAGE_SIZE, 4)).unwrap();
    let mut map = tag.create_map().unwrap();
    let sg = [SgEntry {
        pa: PhysAddr::new(bar_pa.raw() + 0x100),
        len: 0x1000,
        kind: MemKind::PeerBar { bus: None },
    }];
    // SAFETY: memory the test allocated (standing in for the BAR) and keeps.
    let segs = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).unwrap().to_vec();
    assert!(!bar.contains(segs[0].addr), "the BAR's own bus range is not the IOVA");
    let leaf = iommu.hw().inspect(DEV, segs[0].addr).unwrap();
    assert_eq!(leaf.attrs.memory, MemoryType::Device);
    let mut got = vec![0u8; 0x1000];
    iommu.hw().port(DEV).dma_read(segs[0].addr, &mut got).unwrap();
    assert_eq!(&got[..], &bar_bytes[0x100..0x1100], "the device reads exactly the BAR's bytes");
    let (e, peer) = iommu.unregister_peer(peer).unwrap_err();
    assert_eq!(e, Error::Busy { what: "peer BAR reached by live loads", count: 1 });
    map.unload().unwrap();
    iommu.unregister_peer(peer).unwrap();
}

#[test]
fn bad_peer_ranges_are_refused_with_their_values() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let r = |s: u64, e: u64| AddrRange::new(Iova::new(s), Iova::new(e)).unwrap();
    assert_eq!(
        iommu.register_peer(r(0x1000_0100, 0x1000_2000)),
        Err(Error::Misaligned { value: 0x1000_0100, align: PAGE_SIZE })
    );
    let _keep = iommu.register_peer(r(0x1000_0000, 0x1010_0000)).unwrap();
    assert_eq!(
        iommu.register_peer(r(0x1008_0000, 0x1020_0000)),
        Err(Error::InvalidArgument {
            what: "peer BAR overlapping a registered peer (its start given)",
            value: 0x1000_0000
        })
    );
}

#[test]
fn a_privileged_tag_maps_privileged_only_entries_where_the_format_can_and_is_refused_where_it_cannot() {
    use busdma::front::{Direct, IommuPerMap, RawSegment, Tag};
    use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
    use busdma::iova::{IovaAllocator, IovaConfig};
    let m = machine();
    let mut spec = TagSpec::new(4 * PAGE_SIZE, 4);
    spec.flags.privileged = true;
    let (pa, _) = pages(&m, 2, 3);
    // Arm LPAE stage 1 has a privilege bit: the load's leaves are privileged-only.
    {
        let pool = TablePool::new(&m);
        let pt =
            PageTable::<_, ArmLpaeS1>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true })
                .unwrap();
        let iommu = model(&m);
        // SAFETY: the table is the domain's, detached below before the domain goes.
        unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::ArmLpaeStage1, 48)) }.unwrap();
        let space = AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 30)).unwrap();
        let iova =
            IovaAllocator::new(space, IovaConfig { cpus: 2, caches: false, guard_page: false }).unwrap();
        let d = Domain::new(&m, pt, iova, &iommu, DomainConfig::new(1, InvalidationPolicy::Strict)).unwrap();
        {
            let tag = Tag::new_root(&m, IommuPerMap(&d), spec).unwrap();
            let plain = Tag::new_root(&m, IommuPerMap(&d), TagSpec::new(4 * PAGE_SIZE, 4)).unwrap();
            let (mut pm, mut um) = (tag.create_map().unwrap(), plain.create_map().unwrap());
            // SAFETY: memory the test allocated and keeps until the maps are dropped.
            let src = unsafe { RawSegment::new(pa, 2 * PAGE_SIZE) };
            let ps = pm.load(&src, Direction::Bidirectional).unwrap()[0].addr;
            let us = um.load(&src, Direction::Bidirectional).unwrap()[0].addr;
            for page in 0..2 {
                let p = iommu.inspect(DEV, Iova::new(ps.raw() + page * PAGE_SIZE)).unwrap();
                let u = iommu.inspect(DEV, Iova::new(us.raw() + page * PAGE_SIZE)).unwrap();
                assert!(p.attrs.privileged_only && !u.attrs.privileged_only, "page {page}");
            }
            // The model's device issues unprivileged requests: refused on the privileged load.
            let mut b = [0u8; 8];
            assert!(iommu.port(DEV).dma_read(ps, &mut b).is_err());
            assert!(iommu.port(DEV).dma_read(us, &mut b).is_ok());
        }
        assert_eq!(iommu.audit_report().map(|r| r.violation_count), Some(0));
        iommu.detach(DEV).unwrap();
    }
    // VT-d second level has none: the load is refused rather than mapped unprivileged.
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let dev = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = dev.tag(spec).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: as above.
    let e = map.load(&unsafe { RawSegment::new(pa, PAGE_SIZE) }, Direction::ToDevice).err().unwrap();
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e:?}");
    assert!(!map.is_loaded());
    // No IOMMU, or shared identity pages: nothing can enforce it, so the tag is refused.
    assert!(matches!(Tag::new_root(&m, Direct, spec).err(), Some(Error::Unsupported { .. })));
    let idev = iommu.attach(DEV + 1, Policy::Identity).unwrap();
    assert!(matches!(idev.tag(spec).err(), Some(Error::Unsupported { .. })));
}
