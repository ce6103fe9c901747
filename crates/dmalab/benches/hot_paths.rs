//! Criterion micro-benchmarks of the per-packet hot paths (`cargo bench -p dmalab`).
//!
//! Each benchmark holds what a driver holds (a bound CPU, a created map) and measures one
//! round trip: an IOVA alloc+free pair; a page-table map+unmap of one page (release after a
//! completed invalidation included); a front-end load+unload of one page per strategy through
//! the model IOMMU under strict invalidation.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};

use busdma::front::{Direct, Direction, IommuPerMap, IommuReserved, RawSegments, Strategy, Tag, TagSpec};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::pgtable::{FlushDone, Gather, PageTable, PageTableConfig, Prot, TablePool, VtdSl};
use busdma::{AddrRange, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    Context, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat,
};

const DEV: u32 = 9;

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig {
        ram_size: 256 << 20,
        direct_map_size: 256 << 20,
        cpus: 2,
        ..Default::default()
    })
    .expect("machine")
}

fn space() -> AddrRange<Iova> {
    AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 40)).expect("space")
}

fn iova_pair(c: &mut Criterion) {
    let m = machine();
    let _b = m.bind_cpu(0).expect("bind");
    let a =
        IovaAllocator::new(space(), IovaConfig { cpus: 2, caches: true, guard_page: false }).expect("alloc");
    let g = m.pin_cpu();
    let req = IovaRequest::pages(4);
    c.bench_function("iova alloc+free, 4 pages, per-CPU caches", |b| {
        b.iter(|| {
            let r = a.alloc(&g, &req).expect("alloc");
            a.free(&g, r).expect("free");
        })
    });
}

fn pgtable_pair(c: &mut Criterion) {
    let m = machine();
    let _b = m.bind_cpu(0).expect("bind");
    let pool = TablePool::new(&m);
    let pt = PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true })
        .expect("pt");
    let g = m.pin_cpu();
    let iova = Iova::new(0x4000_0000);
    let page = AddrRange::from_start_len(iova, PAGE_SIZE).expect("range");
    // Install the levels once, as a reserved map would.
    // SAFETY: the benchmark owns this table's IOVA; no device walks it, so the PA is inert.
    unsafe { pt.map(&g, iova, PhysAddr::new(0x10_0000), PAGE_SIZE, Prot::READ_WRITE) }.expect("map");
    let mut gather = Gather::new();
    // SAFETY: the benchmark owns this table's IOVA; no device walks it, so the PA is inert.
    unsafe { pt.unmap(&g, page, &mut gather) }.expect("unmap");
    c.bench_function("pgtable map+unmap, 1 page, VT-d", |b| {
        b.iter(|| {
            // SAFETY: the benchmark owns this table's IOVA; no device walks it, so the PA is inert.
            unsafe { pt.map(&g, iova, PhysAddr::new(0x10_0000), PAGE_SIZE, Prot::READ) }.expect("map");
            // SAFETY: the benchmark owns this table's IOVA; no device walks it, so the PA is inert.
            unsafe { pt.unmap(&g, page, &mut gather) }.expect("unmap");
            // SAFETY: no IOMMU walks this table in the benchmark, so nothing caches the page:
            // the invalidation it needs is vacuously complete.
            let proof = unsafe { FlushDone::for_range(page) };
            gather.release_after_flush(proof, &pool, &g).expect("release");
        })
    });
}

fn front_pair<S: Strategy<HostPlatform>>(c: &mut Criterion, name: &str, m: &HostPlatform, strategy: S) {
    let tag = Tag::new_root(m, strategy, TagSpec::new(16 * PAGE_SIZE, 16)).expect("tag");
    let buf = m.frames().alloc(FrameRequest::pages(1)).expect("buffer");
    let run = [(buf, PAGE_SIZE)];
    // SAFETY: the lab's own model RAM, kept until every map of it is dropped.
    let src = unsafe { RawSegments::new(&run) };
    let mut map = tag.create_map().expect("map");
    c.bench_function(name, |b| {
        b.iter(|| {
            map.load(&src, Direction::ToDevice).expect("load");
            map.unload().expect("unload");
        })
    });
    drop(map);
    m.frames().free(buf, 1).expect("free");
}

fn front(c: &mut Criterion) {
    let m = machine();
    let _b = m.bind_cpu(0).expect("bind");
    front_pair(c, "front load+unload, 1 page, direct", &m, Direct);
    let iommu = ModelIommu::new(&m, IommuConfig::default()).expect("iommu");
    let pool = TablePool::new(&m);
    let pt = PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true })
        .expect("pt");
    // SAFETY: `dom` owns the tables and lives until the bench ends; no DMA is issued after it is dropped.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)) }
        .expect("attach");
    let iova =
        IovaAllocator::new(space(), IovaConfig { cpus: 2, caches: true, guard_page: false }).expect("iova");
    let cfg = DomainConfig { id: 1, policy: InvalidationPolicy::Strict, untrusted: false };
    let dom = Domain::new(&m, pt, iova, &iommu, cfg).expect("domain");
    front_pair(c, "front load+unload, 1 page, iommu-per-map strict", &m, IommuPerMap(&dom));
    front_pair(c, "front load+unload, 1 page, iommu-reserved strict", &m, IommuReserved::new(&dom));
}

criterion_group!(benches, iova_pair, pgtable_pair, front);
criterion_main!(benches);
