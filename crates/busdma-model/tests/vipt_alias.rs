//! Seed 003 on the model: a virtually indexed cache, an IOMMU with a coherence index (LCI), and
//! the two aliases of a page, user and kernel, of which one index can keep only one coherent.
//! These tests program the index by hand, as a driver would (the hardware level of the
//! mechanism).

use std::sync::atomic::Ordering;

use busdma::iommu::{CoherenceIndex, IotlbInvalidator};
use busdma::pgtable::{PageTable, PageTableConfig, Prot, TablePool, VtdSl};
use busdma::{AddrRange, Iova, KernVa, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    CacheConfig, Coherence, Context, DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig,
    ModelIommu, Placement, TableFormat,
};

const DEV: u32 = 3;
const IOVA: u64 = 0x40_0000;

fn machine() -> HostPlatform {
    let cache = CacheConfig::vipt_aliasing().with_coherence(Coherence::CoherenceIndex);
    let c = MachineConfig { cpus: 2, ..MachineConfig::with_ram(32 << 20) }.upper_half_not_direct_mapped();
    HostPlatform::new(c.with_cache(cache)).unwrap()
}

/// A user alias of `kva`'s page with a different colour.
fn user_alias(m: &HostPlatform, kva: KernVa) -> u64 {
    let cfg = m.cache().unwrap().config();
    let ua = 0x7f00_0000_0000 + ((cfg.colour_of(kva.raw()) + 1) % cfg.colours()) * PAGE_SIZE;
    assert_ne!(cfg.colour_of(ua), cfg.colour_of(kva.raw()));
    ua
}

struct Rig<'m> {
    m: &'m HostPlatform,
    iommu: ModelIommu<'m>,
    pt: PageTable<'m, HostPlatform, VtdSl>,
}

fn rig<'m>(m: &'m HostPlatform, pool: &'m TablePool<'m, HostPlatform>) -> Rig<'m> {
    let iommu = ModelIommu::new(m, IommuConfig::default()).unwrap();
    let pt = PageTable::new(pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(7, pt.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    Rig { m, iommu, pt }
}

impl Rig<'_> {
    fn map(&self, pa: PhysAddr, index: CoherenceIndex) {
        let g = self.m.pin_cpu();
        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
        unsafe { self.pt.map(&g, Iova::new(IOVA), pa, PAGE_SIZE, Prot::READ_WRITE) }.unwrap();
        self.index(index);
    }

    fn index(&self, index: CoherenceIndex) {
        let range = AddrRange::from_start_len(Iova::new(IOVA), PAGE_SIZE).unwrap();
        self.iommu.set_coherence_index(7, range, index);
    }

    fn device_read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.iommu.port(DEV).dma_read(Iova::new(IOVA + off), &mut b).unwrap();
        b
    }
}

#[test]
fn one_index_keeps_the_kernel_alias_coherent_but_not_a_dirty_user_alias() {
    let m = machine();
    let pool = TablePool::new(&m);
    let r = rig(&m, &pool);
    let page = m
        .alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) })
        .unwrap();
    let kva = m.phys_to_kva(page.pa()).unwrap();
    let ua = user_alias(&m, kva);
    // The user wrote the first line through its alias, the kernel the second through its own.
    m.cpu().write_alias(ua, page.pa(), b"written by the user").unwrap();
    m.cpu().write(kva.checked_add(64).unwrap(), b"written by the kernel").unwrap();
    r.map(page.pa(), CoherenceIndex::Alias(kva));
    assert_eq!(r.device_read(64, 21), b"written by the kernel", "the index flushed the kernel alias");
    assert_eq!(r.device_read(0, 19), vec![0; 19], "seed 003: the dirty user alias is not the indexed one");
    // What get_user_pages does on parisc: flush the user alias before the I/O. Now both agree.
    m.cpu().clean_alias(ua, page.pa(), PAGE_SIZE).unwrap();
    assert_eq!(r.device_read(0, 19), b"written by the user");
}

#[test]
fn an_index_naming_the_wrong_colour_misses_the_kernel_alias() {
    let m = machine();
    let pool = TablePool::new(&m);
    let r = rig(&m, &pool);
    let page = m
        .alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) })
        .unwrap();
    let kva = m.phys_to_kva(page.pa()).unwrap();
    m.cpu().write(kva, b"kernel data").unwrap();
    // Index the page by its physical address, as a physically indexed IOMMU would assume.
    let wrong = KernVa::new(user_alias(&m, kva));
    r.map(page.pa(), CoherenceIndex::Alias(wrong));
    assert_eq!(r.device_read(0, 11), vec![0; 11]);
    // A device write through the wrong index leaves a stale kernel line in place.
    let at = kva.checked_add(128).unwrap();
    let mut got = [0u8; 6];
    m.cpu().prefetch(at, 6).unwrap();
    r.iommu.port(DEV).dma_write(Iova::new(IOVA + 128), b"device").unwrap();
    m.cpu().read(at, &mut got).unwrap();
    assert_eq!(got, [0; 6]);
    // With the right index the same write drops it.
    r.index(CoherenceIndex::Alias(kva));
    let at = kva.checked_add(192).unwrap();
    m.cpu().prefetch(at, 6).unwrap();
    r.iommu.port(DEV).dma_write(Iova::new(IOVA + 192), b"device").unwrap();
    m.cpu().read(at, &mut got).unwrap();
    assert_eq!(&got, b"device");
    assert_eq!(r.device_read(0, 11), b"kernel data");
}

#[test]
fn memory_without_a_kernel_mapping_is_indexed_by_an_untouched_line_that_flushes_nothing() {
    let m = machine();
    let pool = TablePool::new(&m);
    let r = rig(&m, &pool);
    let untouched = r.iommu.untouched_line().expect("a coherence-index machine reserves one");
    let far = m
        .alloc_frames(FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(1) })
        .unwrap();
    assert!(m.phys_to_kva(far.pa()).is_none());
    m.write_phys(far.pa(), b"persistent memory").unwrap();
    r.map(far.pa(), CoherenceIndex::Untouched);
    let cache = m.cache().unwrap();
    let (snoops, flushes) = (
        cache.counters().snoop_hits.load(Ordering::Relaxed),
        cache.counters().maintenance_calls.load(Ordering::Relaxed),
    );
    for _ in 0..100 {
        assert_eq!(r.device_read(0, 17), b"persistent memory");
        r.iommu.port(DEV).dma_write(Iova::new(IOVA + 256), b"x").unwrap();
    }
    assert_eq!(cache.counters().snoop_hits.load(Ordering::Relaxed), snoops, "nothing was found to flush");
    assert_eq!(cache.counters().maintenance_calls.load(Ordering::Relaxed), flushes, "no CPU flush either");
    assert_eq!(cache.lines_of_page(m.kva_to_phys(untouched).unwrap()), 0, "the line stays untouched");
}

#[test]
fn machines_without_a_coherence_index_ignore_it() {
    let m = HostPlatform::new(
        MachineConfig { cpus: 1, ..MachineConfig::with_ram(16 << 20) }
            .with_cache(CacheConfig::vipt_aliasing()),
    )
    .unwrap();
    let pool = TablePool::new(&m);
    let r = rig(&m, &pool);
    assert!(r.iommu.untouched_line().is_none());
    let page = m
        .alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) })
        .unwrap();
    let kva = m.phys_to_kva(page.pa()).unwrap();
    m.cpu().write(kva, b"dirty").unwrap();
    r.map(page.pa(), CoherenceIndex::Alias(kva));
    assert_eq!(r.device_read(0, 5), vec![0; 5], "non-coherent: only a clean helps");
}
