//! busdma programs the coherence index (seed 003): on a VIPT machine kept coherent by an IOMMU
//! with a local coherence index, a load through the IOMMU strategies indexes page-backed and
//! kernel-mapped entries by their kernel alias and page-less entries by the untouched line, so
//! the device sees what the kernel wrote without a single CPU flush.

mod common;

use std::sync::atomic::Ordering;

use busdma::front::{
    Direction, Invalidation, IommuOps, IommuPerMap, IommuPerSegment, KernelBuf, MemKind, Segment, SgEntry,
    SgList, SyncOp, Tag, TagSpec,
};
use busdma::iommu::{CoherenceIndex, IotlbInvalidator};
use busdma::pgtable::TablePool;
use busdma::{AddrRange, Iova, PAGE_SIZE, PhysAddr, Platform, Result};
use busdma_model::{
    CacheConfig, Coherence, Context, DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig,
    ModelIommu, Placement, TableFormat,
};
use common::ptdomain::PtDomain;

const DEV: u32 = 4;
const DOMAIN: u16 = 9;

fn machine() -> HostPlatform {
    let cache = CacheConfig::vipt_aliasing().with_coherence(Coherence::CoherenceIndex);
    let c = MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }.upper_half_not_direct_mapped();
    HostPlatform::new(c.with_cache(cache)).unwrap()
}

/// A domain whose IOMMU driver programs coherence indexes into the model IOMMU (or, with
/// `forward` false, one that ignores them, as a driver unaware of seed 003 would).
#[derive(Clone, Copy)]
struct Lci<'a, 'p> {
    d: &'a PtDomain<'p>,
    iommu: &'a ModelIommu<'p>,
    forward: bool,
}

// SAFETY: every method forwards to the wrapped domain's implementation, whose answers are
// trusted.
unsafe impl IommuOps<HostPlatform> for Lci<'_, '_> {
    type Ticket = ();
    fn invalidation(&self) -> Invalidation {
        Invalidation::Strict
    }
    fn max_iova(&self) -> u64 {
        self.d.max_iova()
    }
    fn alloc_iova(&self, g: &G<'_>, size: u64, align: u64, limit: u64) -> Result<AddrRange<Iova>> {
        self.d.alloc_iova(g, size, align, limit)
    }
    unsafe fn free_iova(&self, g: &G<'_>, range: AddrRange<Iova>) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.d.free_iova(g, range) }
    }
    unsafe fn map(
        &self,
        g: &G<'_>,
        iova: Iova,
        pa: PhysAddr,
        len: u64,
        prot: busdma::pgtable::Prot,
    ) -> Result<()> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.d.map(g, iova, pa, len, prot) }
    }
    unsafe fn unmap(&self, g: &G<'_>, mapped: &[AddrRange<Iova>], free: &[AddrRange<Iova>]) -> Result<()> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.d.unmap(g, mapped, free) }?;
        for r in mapped {
            self.iommu.invalidate_range(DOMAIN, *r)?;
        }
        Ok(())
    }
    fn ensure_flushed(&self, _: &G<'_>, _: ()) -> Result<()> {
        Ok(())
    }
    fn wait_unmapped(&self, _: &G<'_>) -> Result<()> {
        // Strict: every unmap invalidated its ranges before returning.
        Ok(())
    }
    unsafe fn reserve_tables(&self, g: &G<'_>, range: AddrRange<Iova>) -> Result<()> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.d.reserve_tables(g, range) }
    }
    fn set_coherence_index(&self, range: AddrRange<Iova>, index: CoherenceIndex) {
        if self.forward {
            self.iommu.set_coherence_index(DOMAIN, range, index);
        }
    }
}

type G<'a> = busdma::CpuGuard<'a, HostPlatform>;

fn device_read(iommu: &ModelIommu<'_>, segs: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        iommu.port(DEV).dma_read(s.addr, &mut b).unwrap();
        out.extend(b);
    }
    out
}

fn coherent_spec() -> TagSpec {
    let mut spec = TagSpec::new(64 << 10, 16);
    spec.flags.coherent = true; // coherent through the IOMMU's index: no CPU maintenance
    spec
}

fn pattern(len: usize) -> Vec<u8> {
    pattern_from(1, len)
}

fn pattern_from(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i % 251) as u8).wrapping_add(seed) | 1).collect()
}

#[test]
fn page_backed_entries_are_indexed_by_their_kernel_alias_so_no_flush_is_needed() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let d = PtDomain::new(&m, &pool);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(DOMAIN, d.pt.root(), TableFormat::VtdSecondLevel, 39)) }.unwrap();
    let cache = m.cache().unwrap();
    let mut keep = Vec::new(); // distinct frames per round: a fresh mapping, not a remap
    for forward in [true, false] {
        let ops = Lci { d: &d, iommu: &iommu, forward };
        let f = m
            .alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(4) })
            .unwrap();
        // Three pages at an odd offset: each page has its own colour, all indexed right.
        let kva = m.phys_to_kva(f.pa()).unwrap().checked_add(0x123).unwrap();
        let data = pattern_from(u8::from(forward) * 100, 3 * PAGE_SIZE as usize);
        m.cpu().write(kva, &data).unwrap();
        let flushes = cache.counters().maintenance_calls.load(Ordering::Relaxed);
        let tag = Tag::new_root(&m, IommuPerMap(ops), coherent_spec()).unwrap();
        let mut map = tag.create_map().unwrap();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        map.load(&unsafe { KernelBuf::new(kva, data.len() as u64) }, Direction::ToDevice).unwrap();
        map.sync(SyncOp::PREWRITE).unwrap();
        let seen = device_read(&iommu, map.segments());
        if forward {
            assert!(seen == data, "the index made the kernel's dirty lines visible");
        } else {
            assert!(seen != data, "without the index the device reads stale RAM");
        }
        map.unload().unwrap();
        assert_eq!(cache.counters().maintenance_calls.load(Ordering::Relaxed), flushes, "no CPU flush");
        m.cpu().evict_all().unwrap();
        keep.push(f);
    }
}

#[test]
fn the_per_segment_strategy_programs_the_index_too() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let d = PtDomain::new(&m, &pool);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(DOMAIN, d.pt.root(), TableFormat::VtdSecondLevel, 39)) }.unwrap();
    let ops = Lci { d: &d, iommu: &iommu, forward: true };
    let f = m
        .alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(2) })
        .unwrap();
    let kva = m.phys_to_kva(f.pa()).unwrap().checked_add(0xf00).unwrap();
    let data = pattern(0x400);
    m.cpu().write(kva, &data).unwrap();
    let tag = Tag::new_root(&m, IommuPerSegment(ops), coherent_spec()).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { KernelBuf::new(kva, data.len() as u64) }, Direction::ToDevice).unwrap();
    assert_eq!(device_read(&iommu, map.segments()), data);
    map.unload().unwrap();
}

#[test]
fn entries_without_a_kernel_mapping_use_the_untouched_line_and_flush_nothing() {
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let d = PtDomain::new(&m, &pool);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(DOMAIN, d.pt.root(), TableFormat::VtdSecondLevel, 39)) }.unwrap();
    let ops = Lci { d: &d, iommu: &iommu, forward: true };
    let far = m
        .alloc_frames(FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(1) })
        .unwrap();
    m.write_phys(far.pa(), &pattern(512)).unwrap();
    let near = m
        .alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) })
        .unwrap();
    m.cpu().write(m.phys_to_kva(near.pa()).unwrap(), &pattern(256)).unwrap();
    let entries = [
        SgEntry { pa: far.pa(), len: 512, kind: MemKind::Unmapped },
        SgEntry { pa: near.pa(), len: 256, kind: MemKind::Page },
    ];
    let cache = m.cache().unwrap();
    let (flushes, snoops) = (
        cache.counters().maintenance_calls.load(Ordering::Relaxed),
        cache.counters().snoop_hits.load(Ordering::Relaxed),
    );
    let tag = Tag::new_root(&m, IommuPerMap(ops), coherent_spec()).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { SgList::new(&entries) }, Direction::ToDevice).unwrap();
    map.sync(SyncOp::PREWRITE).unwrap();
    let segs = map.segments().to_vec();
    let mut want = pattern(512);
    want.extend(pattern(256));
    assert_eq!(device_read(&iommu, &segs), want);
    // The page-backed entry's four dirty lines were found through its kernel alias; the
    // page-less entry's transfer found nothing to flush, and the CPU flushed nothing at all.
    assert_eq!(cache.counters().snoop_hits.load(Ordering::Relaxed) - snoops, 4);
    assert_eq!(cache.counters().maintenance_calls.load(Ordering::Relaxed), flushes);
    let untouched = iommu.untouched_line().unwrap();
    assert_eq!(cache.lines_of_page(m.kva_to_phys(untouched).unwrap()), 0);
    map.unload().unwrap();
}

#[test]
fn a_real_domain_passes_the_index_to_its_iommu() {
    use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
    use busdma::iova::{IovaAllocator, IovaConfig};
    use busdma::pgtable::{PageTable, PageTableConfig, VtdSl};
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let table =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    let space = AddrRange::new(Iova::new(PAGE_SIZE), Iova::new(1 << 48)).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: false, guard_page: false })
        .unwrap();
    let d =
        Domain::new(&m, table, iova, &iommu, DomainConfig::new(DOMAIN, InvalidationPolicy::Strict)).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(DOMAIN, d.table().root(), TableFormat::VtdSecondLevel, 48)) }
        .unwrap();
    let f = m
        .alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(2) })
        .unwrap();
    let kva = m.phys_to_kva(f.pa()).unwrap().checked_add(0x80).unwrap();
    let data = pattern(0x1800);
    m.cpu().write(kva, &data).unwrap();
    let tag = Tag::new_root(&m, IommuPerMap(&d), coherent_spec()).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { KernelBuf::new(kva, data.len() as u64) }, Direction::ToDevice).unwrap();
    assert!(device_read(&iommu, map.segments()) == data);
    map.unload().unwrap();
}

/// A page outside the direct map is reached by the CPU only through quick-map windows, all of
/// the page's colour: indexing it by that colour makes what the CPU wrote through a window
/// visible to the device with no CPU flush (the untouched line, as for page-less memory, would
/// leave the device reading stale RAM).
#[test]
fn pages_outside_the_direct_map_are_indexed_by_their_quick_map_colour() {
    use busdma::front::PageList;
    use busdma::quickmap::QuickMaps;
    let m = machine();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let d = PtDomain::new(&m, &pool);
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(DOMAIN, d.pt.root(), TableFormat::VtdSecondLevel, 39)) }.unwrap();
    let ops = Lci { d: &d, iommu: &iommu, forward: true };
    let far = m
        .alloc_frames(FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(3) })
        .unwrap();
    let pages: Vec<PhysAddr> = (0..3).map(|i| far.pa().checked_add(i * PAGE_SIZE).unwrap()).collect();
    let data = pattern_from(40, 2 * PAGE_SIZE as usize);
    // The CPU writes the buffer, 0x200 into the first page, through quick maps.
    let qm = QuickMaps::for_platform(&m);
    let mut at = 0usize;
    for (i, &p) in pages.iter().enumerate() {
        let off = if i == 0 { 0x200 } else { 0 };
        let n = (PAGE_SIZE as usize - off).min(data.len() - at);
        let g = m.pin_cpu();
        let q = qm.enter(&g, p).unwrap();
        m.cpu().write(q.kva().checked_add(off as u64).unwrap(), &data[at..at + n]).unwrap();
        drop(q);
        at += n;
    }
    let cache = m.cache().unwrap();
    let flushes = cache.counters().maintenance_calls.load(Ordering::Relaxed);
    let tag = Tag::new_root(&m, IommuPerMap(ops), coherent_spec()).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { PageList::new(&pages, 0x200, data.len() as u64) }, Direction::ToDevice).unwrap();
    map.sync(SyncOp::PREWRITE).unwrap();
    assert!(device_read(&iommu, map.segments()) == data, "the index found the windows' dirty lines");
    assert_eq!(cache.counters().maintenance_calls.load(Ordering::Relaxed), flushes, "no CPU flush");
    map.unload().unwrap();
}
