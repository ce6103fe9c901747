//! Instruction counts of the per-packet hot paths, for callgrind.
//!
//! `cargo build --release -p dmalab --example icount`, then
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*icount::hot*'
//! target/release/examples/icount <path> <ops>`: the `Collected` total divided by `<ops>` is
//! the instructions of one operation, setup and warm-up excluded. Each path holds what the
//! lab's benches hold (a bound CPU, created maps, a VT-d 48-bit domain on the model IOMMU with
//! its 1024-entry IOTLB, audit off, busdma's IOVA allocator with per-CPU caches):
//!
//! - `reserved-strict`, `per-map-strict`, `reserved-deferred`, `per-map-deferred`: one op is
//!   a 1-page load + unload of one of 32 maps (`dmalab bench map`'s loop, 1 page, 1 thread);
//! - `tcp-reserved-strict`, `tcp-reserved-deferred`, `tcp-passthrough`: one op is one packet
//!   of `dmalab tcpbench` without the NIC's read: load of a 3-fragment, 1500-byte chain
//!   (66 bytes at 0x80 in its page, two of 717), PREWRITE, POSTWRITE, unload, over a ring of
//!   256 maps;
//! - `tcp-nic-reserved-strict`, `tcp-nic-reserved-deferred`, `tcp-nic-passthrough`: the same
//!   with the NIC's DMA read of the packet through the model IOMMU (or straight to RAM); the
//!   deferred reserved maps have two windows each, used in turn, as in `dmalab tcpbench`;
//! - `tcp-premapped`, `tcp-nic-premapped`: the same packet through the pre-mapped pool
//!   (`busdma::premapped::Premapped`, one-page slots mapped once in a strict domain): the
//!   PREWRITE copies the 1500 bytes into the slot, the NIC reads the slot;
//! - `tcp-premapped-sized`, `tcp-nic-premapped-sized`: the same with the pool configured as
//!   `dmalab tcpbench` configures it, for 1500-byte loads (`PoolConfig::new(1500, 256)`, still
//!   one-page slots): each slot's packet at its colour (`busdma::premapped`, theory 8);
//! - `per-map-64k-strict`, `hybrid-64k-strict` (and `-deferred`): as `per-map-strict` with a 16-page (64 KiB)
//!   buffer; the hybrid's threshold is 64 KiB, so it maps every load with per-map strict, in
//!   a domain that also holds its pool as tcpbench's `--size 65536` has it (64 KiB slots, 256
//!   per CPU: 8 192 pages mapped);
//! - `iova`: an IOVA alloc + free pair of 4 pages (`dmalab bench iova`'s fast path).
//! - `tcp-premapped-zc`, `tcp-nic-premapped-zc`: `dmalab tcpbench`'s `premapped-zc`: the
//!   packet built in a pool buffer (`busdma::premapped::PoolBuf`, pool as `-sized`), loaded in
//!   place by a `PoolMap` (one segment, no copy), PREWRITE, POSTWRITE, unload (`take`).
//!
//! The IOVA allocator's other paths (mixed sizes, the tree alone) are in `examples/icount_iova.rs`:
//! a second caller of `alloc` here would change how it is inlined into `iova`'s loop, and with it
//! this path's count.
#![allow(missing_docs)]

use std::hint::black_box;

#[path = "shared/timing.rs"]
mod timing;
use timing::Timer;

use busdma::front::{
    Direct, Direction, IommuPerMap, IommuReserved, MemKind, RawSegments, SgEntry, SgList, Strategy, SyncOp,
    Tag, TagSpec,
};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::premapped::{Hybrid, PoolConfig, Premapped, PremappedPool};
use busdma::quickmap::QuickMaps;
use busdma::{AddrRange, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    Context, DirectPort, DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu,
    TableFormat,
};

const DEV: u32 = 9;
/// Maps cycled per batch, as `dmalab bench map` does.
const BATCH: usize = 32;
/// Ring of `dmalab tcpbench`.
const RING: usize = 256;

fn space() -> AddrRange<Iova> {
    AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 40)).expect("space")
}

/// `ops` rounds of "load each of `BATCH` maps, unload each", one page.
#[inline(never)]
fn run_maps<S: Strategy<HostPlatform>>(tag: &Tag<'_, HostPlatform, S>, src: &RawSegments<'_>, ops: usize) {
    let mut maps: Vec<_> = (0..BATCH).map(|_| tag.create_map().expect("map")).collect();
    // Warm-up outside the counted function.
    warm(&mut maps, src);
    hot_batch(&mut maps, src, ops);
}

fn warm<S: Strategy<HostPlatform>>(
    maps: &mut [busdma::front::DmaMap<'_, HostPlatform, S>],
    src: &RawSegments<'_>,
) {
    for _ in 0..4 {
        for m in maps.iter_mut() {
            m.load(src, Direction::Bidirectional).expect("load");
        }
        for m in maps.iter_mut() {
            m.unload().expect("unload");
        }
    }
}

#[inline(never)]
fn hot_batch<S: Strategy<HostPlatform>>(
    maps: &mut [busdma::front::DmaMap<'_, HostPlatform, S>],
    src: &RawSegments<'_>,
    ops: usize,
) {
    for _ in 0..ops / BATCH {
        for m in maps.iter_mut() {
            m.load(src, Direction::Bidirectional).expect("load");
        }
        for m in maps.iter_mut() {
            m.unload().expect("unload");
        }
    }
}

/// One packet per op over a ring of `RING` maps; with `port`, the NIC reads each packet.
fn tcp<S: Strategy<HostPlatform>>(
    m: &HostPlatform,
    tag: &Tag<'_, HostPlatform, S>,
    port: Option<&dyn DmaPort>,
    ops: usize,
) {
    let lens = [66u64, 717, 717];
    let mut entries = Vec::new();
    for _ in 0..RING {
        let mut v = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let pa = m.frames().alloc(FrameRequest::pages(1)).expect("frame");
            let off = if i == 0 { 0x80 } else { 0 };
            v.push(SgEntry { pa: PhysAddr::new(pa.raw() + off), len, kind: MemKind::Page });
        }
        entries.push(v);
    }
    let mut maps: Vec<_> = (0..RING).map(|_| tag.create_map().expect("map")).collect();
    let mut buf = vec![0u8; 1500];
    tcp_loop(&mut maps, &entries, port, &mut buf, RING * 2);
    hot_tcp(&mut maps, &entries, port, &mut buf, ops);
}

#[inline(never)]
fn hot_tcp<S: Strategy<HostPlatform>>(
    maps: &mut [busdma::front::DmaMap<'_, HostPlatform, S>],
    entries: &[Vec<SgEntry>],
    port: Option<&dyn DmaPort>,
    buf: &mut [u8],
    ops: usize,
) {
    tcp_loop(maps, entries, port, buf, ops);
}

/// The NIC's read of a loaded packet's segments into `buf` (the `tcp-nic-*` paths; nothing
/// without a port).
#[inline(always)]
fn nic_read(port: Option<&dyn DmaPort>, segs: &[busdma::front::Segment], buf: &mut [u8]) {
    if let Some(p) = port {
        let mut off = 0;
        for s in segs {
            let len = s.len as usize;
            p.dma_read(s.addr, &mut buf[off..off + len]).expect("NIC read");
            off += len;
        }
    }
}

fn tcp_loop<S: Strategy<HostPlatform>>(
    maps: &mut [busdma::front::DmaMap<'_, HostPlatform, S>],
    entries: &[Vec<SgEntry>],
    port: Option<&dyn DmaPort>,
    buf: &mut [u8],
    ops: usize,
) {
    for i in 0..ops {
        let slot = i % maps.len();
        let map = &mut maps[slot];
        if map.is_loaded() {
            nic_read(port, map.segments(), buf);
            map.sync(SyncOp::POSTWRITE).expect("sync");
            map.unload().expect("unload");
        }
        // SAFETY: the lab's own model RAM, kept until every map of it is dropped.
        map.load(&unsafe { SgList::new(&entries[slot]) }, Direction::ToDevice).expect("load");
        map.sync(SyncOp::PREWRITE).expect("sync");
    }
    black_box(buf);
}

#[inline(never)]
fn hot_iova(m: &HostPlatform, a: &IovaAllocator, ops: usize) {
    let g = m.pin_cpu();
    let req = IovaRequest::pages(4);
    for _ in 0..ops {
        let r = a.alloc(&g, &req).expect("alloc");
        a.free(&g, black_box(r)).expect("free");
    }
}

fn spec(tcp: bool) -> TagSpec {
    if tcp {
        let mut s = TagSpec::new(1500, 3);
        s.flags.coherent = true;
        s
    } else {
        TagSpec::new(256 * PAGE_SIZE, 256)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map(String::as_str).unwrap_or("reserved-strict");
    let ops: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32_000);
    let m = HostPlatform::new(MachineConfig {
        ram_size: 256 << 20,
        direct_map_size: 256 << 20,
        cpus: 2,
        ..Default::default()
    })
    .expect("machine");
    let _b = m.bind_cpu(0).expect("bind");
    let iova =
        IovaAllocator::new(space(), IovaConfig { cpus: 2, caches: true, guard_page: false }).expect("iova");
    if path == "iova" {
        // Warm the caches, then count.
        let g = m.pin_cpu();
        let rs: Vec<_> = (0..64).map(|_| iova.alloc(&g, &IovaRequest::pages(4)).expect("alloc")).collect();
        for r in rs {
            iova.free(&g, r).expect("free");
        }
        drop(g);
        let t = Timer::start();
        hot_iova(&m, &iova, ops);
        t.report("pair", 4, 0, ops);
        return;
    }
    let pages = if path.contains("64k") { 16 } else { 1 };
    let buf = m.frames().alloc(FrameRequest::pages(pages)).expect("buffer");
    let run = [(buf, pages * PAGE_SIZE)];
    // SAFETY: the lab's own model RAM, kept until every map of it is dropped.
    let src = unsafe { RawSegments::new(&run) };
    if path.starts_with("tcp") && path.ends_with("passthrough") {
        let tag = Tag::new_root(&m, Direct, spec(true)).expect("tag");
        let port = DirectPort::new(&m, DEV, 64);
        tcp(&m, &tag, path.starts_with("tcp-nic").then_some(&port as &dyn DmaPort), ops);
        return;
    }
    let policy =
        if path.ends_with("deferred") { InvalidationPolicy::deferred() } else { InvalidationPolicy::Strict };
    let iommu = ModelIommu::new(&m, IommuConfig::default()).expect("iommu");
    let pool = TablePool::new(&m);
    let pt = PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true })
        .expect("pt");
    // SAFETY: `dom` owns the tables and lives until the run ends; no DMA is issued after it is dropped.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)) }
        .expect("attach");
    let dom =
        Domain::new(&m, pt, iova, &iommu, DomainConfig { id: 1, policy, untrusted: false }).expect("domain");
    let port = iommu.port(DEV);
    match path {
        "reserved-strict" | "reserved-deferred" => {
            run_maps(&Tag::new_root(&m, IommuReserved::new(&dom), spec(false)).expect("tag"), &src, ops)
        }
        "per-map-64k-strict" | "per-map-64k-deferred" => {
            run_maps(&Tag::new_root(&m, IommuPerMap(&dom), spec(false)).expect("tag"), &src, ops)
        }
        "hybrid-64k-strict" | "hybrid-64k-deferred" => {
            let qm = QuickMaps::for_platform(&m);
            let pool =
                PremappedPool::new(&m, &dom, &qm, PoolConfig::new(16 * PAGE_SIZE, RING)).expect("pool");
            let h = Hybrid::with_threshold(&pool, IommuPerMap(&dom), 16 * PAGE_SIZE);
            run_maps(&Tag::new_root(&m, h, spec(false)).expect("tag"), &src, ops)
        }
        "per-map-strict" | "per-map-deferred" => {
            run_maps(&Tag::new_root(&m, IommuPerMap(&dom), spec(false)).expect("tag"), &src, ops)
        }
        // As `dmalab tcpbench`: under deferred invalidation two windows per map, used in turn.
        "tcp-reserved-strict"
        | "tcp-nic-reserved-strict"
        | "tcp-reserved-deferred"
        | "tcp-nic-reserved-deferred" => {
            let n = if path.ends_with("deferred") { 2 } else { 1 };
            let nic = path.starts_with("tcp-nic").then_some(&port as &dyn DmaPort);
            tcp(
                &m,
                &Tag::new_root(&m, IommuReserved::alternating(&dom, n), spec(true)).expect("tag"),
                nic,
                ops,
            )
        }
        "tcp-premapped" | "tcp-nic-premapped" | "tcp-premapped-sized" | "tcp-nic-premapped-sized" => {
            let qm = QuickMaps::for_platform(&m);
            let size = if path.ends_with("sized") { 1500 } else { PAGE_SIZE };
            let pool = PremappedPool::new(&m, &dom, &qm, PoolConfig::new(size, RING)).expect("pool");
            let nic = path.starts_with("tcp-nic").then_some(&port as &dyn DmaPort);
            tcp(&m, &Tag::new_root(&m, Premapped(&pool), spec(true)).expect("tag"), nic, ops)
        }
        "tcp-premapped-zc" | "tcp-nic-premapped-zc" => {
            let qm = QuickMaps::for_platform(&m);
            let pool = PremappedPool::new(&m, &dom, &qm, PoolConfig::new(1500, RING)).expect("pool");
            let nic = path.starts_with("tcp-nic").then_some(&port as &dyn DmaPort);
            tcp_zc(&Tag::new_root(&m, Premapped(&pool), spec(true)).expect("tag"), &pool, nic, ops)
        }
        other => panic!("unknown path {other}"),
    }
}

/// `tcp-premapped-zc`: a ring of pool maps, each with its 1500-byte pool buffer.
fn tcp_zc<'a, 'p, D: busdma::front::IommuOps<HostPlatform>>(
    tag: &Tag<'p, HostPlatform, Premapped<'a, 'p, HostPlatform, D>>,
    pool: &'a PremappedPool<'p, HostPlatform, D>,
    port: Option<&dyn DmaPort>,
    ops: usize,
) {
    let mut maps: Vec<_> = (0..RING).map(|_| tag.create_pool_map().expect("map")).collect();
    let mut bufs: Vec<_> = (0..RING)
        .map(|i| {
            let mut b = pool.alloc_buf(1500).expect("pool buffer");
            b.write(0, &[i as u8; 1500]).expect("write");
            Some(b)
        })
        .collect();
    let mut buf = vec![0u8; 1500];
    tcp_zc_loop(&mut maps, &mut bufs, port, &mut buf, RING * 2);
    hot_tcp_zc(&mut maps, &mut bufs, port, &mut buf, ops);
}

type ZcBuf<'a, 'p, D> = Option<busdma::premapped::PoolBuf<'a, 'p, HostPlatform, D>>;

#[inline(never)]
fn hot_tcp_zc<'a, 'p, D: busdma::front::IommuOps<HostPlatform>>(
    maps: &mut [busdma::front::PoolMap<'a, 'p, HostPlatform, Premapped<'a, 'p, HostPlatform, D>>],
    bufs: &mut [ZcBuf<'a, 'p, D>],
    port: Option<&dyn DmaPort>,
    buf: &mut [u8],
    ops: usize,
) {
    tcp_zc_loop(maps, bufs, port, buf, ops);
}

fn tcp_zc_loop<'a, 'p, D: busdma::front::IommuOps<HostPlatform>>(
    maps: &mut [busdma::front::PoolMap<'a, 'p, HostPlatform, Premapped<'a, 'p, HostPlatform, D>>],
    bufs: &mut [ZcBuf<'a, 'p, D>],
    port: Option<&dyn DmaPort>,
    buf: &mut [u8],
    ops: usize,
) {
    for i in 0..ops {
        let slot = i % maps.len();
        let map = &mut maps[slot];
        if map.is_loaded() {
            nic_read(port, map.segments(), buf);
            map.sync(SyncOp::POSTWRITE).expect("sync");
            bufs[slot] = Some(map.take().expect("unload"));
        }
        let b = bufs[slot].take().expect("buffer");
        map.load(b, Direction::ToDevice).map_err(|(e, _)| e).expect("load");
        map.sync(SyncOp::PREWRITE).expect("sync");
    }
    black_box(buf);
}
