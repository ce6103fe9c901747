//! `dmalab bench map`: the equivalent of Linux's dma_map_benchmark.
//!
//! Each thread binds a model CPU, owns `BATCH` maps of one shared tag, and repeats: load a
//! `pages`-page buffer into each map (timed as one batch), let the device read 8 bytes of
//! every page of every map through its port (timed as one batch: the model IOMMU's IOTLB
//! lookups and walks, so the unmaps that follow have cached translations to invalidate, as
//! after real DMA; `--no-device` skips it), unload each (timed as one batch).
//! Reported times are mean latency per operation per thread, with the standard deviation
//! over batches, as dma_map_benchmark reports them. Timing a batch rather than each call
//! keeps the clock's own cost (~20 ns per read) out of figures that are themselves ~20 ns.
//! `driver_ns_per_map` is the driver's CPU time of one load + unload (invalidation waits
//! included), `device_ns_per_map` the simulated device's time for its reads of that map,
//! kept apart: a real device spends it on its own clock.

use std::time::{Duration, Instant};

use busdma::front::{
    Direction, DmaMemory, Identity, Invalidation, IommuOps, IommuPerMap, IommuPerSegment, IommuReserved,
    RawSegments, Strategy, Tag, TagSpec, WindowSource,
};
use busdma::iommu::InvalidationPolicy;
use busdma::pgtable::TablePool;
use busdma::{MemAttr, PAGE_SIZE, PhysAddr};
use busdma_model::{DirectPort, DmaPort, FrameRequest, HostPlatform, ModelIommu};
use serde::Serialize;

use crate::cost::{Cost, CostArgs};
use crate::fixture;

/// Maps loaded per timed batch. 32: enough that the two clock reads around a batch cost
/// under 2 ns per operation, few enough that a batch's maps stay in the CPU caches.
pub const BATCH: usize = 32;

/// One result row.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    pub strategy: &'static str,
    pub invalidation: &'static str,
    #[serde(flatten)]
    pub cost: Cost,
    pub threads: usize,
    pub pages: u64,
    pub map_ns: f64,
    pub map_ns_std: f64,
    pub unmap_ns: f64,
    pub unmap_ns_std: f64,
    pub driver_ns_per_map: f64,
    pub device_ns_per_map: f64,
    /// Two-step window rows only: unlinks per IOTLB invalidation (one `commit` per batch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_batch: Option<usize>,
}

/// Per-batch mean latencies of one thread: (map, unmap, device).
type Samples = (Vec<f64>, Vec<f64>, Vec<f64>);

/// Keeps the batches no slower than 4× the median (see `MapArgs::trim`). 4×: a batch of
/// 32 operations that lost the CPU once is slower by a scheduler slice (~ms), hundreds of
/// times its normal ~µs; 4× keeps every batch that only met cache or IOTLB misses.
fn trimmed(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let median = s.get(s.len() / 2).copied().unwrap_or(0.0);
    v.iter().copied().filter(|&x| x <= 4.0 * median).collect()
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// The tag every strategy is measured with: loads up to 256 pages in up to 256 segments.
pub fn bench_spec() -> TagSpec {
    TagSpec::new(256 * PAGE_SIZE, 256)
}

/// Measures one strategy at `threads` threads and `pages` pages for `duration` per thread.
#[allow(clippy::too_many_arguments)]
pub fn measure<S>(
    m: &HostPlatform,
    tag: &Tag<'_, HostPlatform, S>,
    label: &'static str,
    threads: usize,
    pages: u64,
    duration: Duration,
    trim: bool,
    cost: &Cost,
    port: Option<&dyn DmaPort>,
) -> Result<Row, String>
where
    S: Strategy<HostPlatform> + Sync,
{
    let per_thread: Vec<Result<Samples, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<Samples, String> {
                    let _bind = m.bind_cpu(t).map_err(|e| format!("bind cpu {t}: {e}"))?;
                    let buf = m
                        .frames()
                        .alloc(FrameRequest::pages(pages))
                        .map_err(|e| format!("buffer of {pages} pages: {e}"))?;
                    let run = [(PhysAddr::new(buf.raw()), pages * PAGE_SIZE)];
                    // SAFETY: the lab's own model RAM, kept until every map of it is dropped.
                    let src = unsafe { RawSegments::new(&run) };
                    let mut maps = Vec::with_capacity(BATCH);
                    for _ in 0..BATCH {
                        maps.push(tag.create_map().map_err(|e| format!("create map: {e}"))?);
                    }
                    let (mut map_t, mut unmap_t, mut dev_t) = (Vec::new(), Vec::new(), Vec::new());
                    let mut word = [0u8; 8];
                    let start = Instant::now();
                    let mut warm = 3;
                    while start.elapsed() < duration || map_t.len() < 10 {
                        let t0 = Instant::now();
                        for map in maps.iter_mut() {
                            map.load(&src, Direction::Bidirectional).map_err(|e| format!("load: {e}"))?;
                        }
                        let t1 = Instant::now();
                        if let Some(port) = port {
                            for map in &maps {
                                for seg in map.segments() {
                                    for off in (0..seg.len).step_by(PAGE_SIZE as usize) {
                                        let at = seg.addr.checked_add(off).ok_or("bus address overflow")?;
                                        port.dma_read(at, &mut word)
                                            .map_err(|f| format!("device DMA fault: {f:?}"))?;
                                    }
                                }
                            }
                        }
                        let t1d = Instant::now();
                        for map in maps.iter_mut() {
                            map.unload().map_err(|e| format!("unload: {e}"))?;
                        }
                        let t2 = Instant::now();
                        if warm > 0 {
                            warm -= 1;
                            continue;
                        }
                        map_t.push((t1 - t0).as_nanos() as f64 / BATCH as f64);
                        dev_t.push((t1d - t1).as_nanos() as f64 / BATCH as f64);
                        unmap_t.push((t2 - t1d).as_nanos() as f64 / BATCH as f64);
                    }
                    drop(maps);
                    m.frames().free(buf, pages).map_err(|e| format!("free buffer: {e}"))?;
                    Ok((map_t, unmap_t, dev_t))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("bench thread panicked".into()))).collect()
    });
    let (mut maps, mut unmaps, mut devs) = (Vec::new(), Vec::new(), Vec::new());
    for r in per_thread {
        let (a, b, c) = r?;
        maps.extend(a);
        unmaps.extend(b);
        devs.extend(c);
    }
    if trim {
        maps = trimmed(&maps);
        unmaps = trimmed(&unmaps);
        devs = trimmed(&devs);
    }
    let device_ns = if port.is_some() { mean_std(&devs).0 } else { 0.0 };
    let (map_ns, map_ns_std) = mean_std(&maps);
    let (unmap_ns, unmap_ns_std) = mean_std(&unmaps);
    Ok(Row {
        strategy: label,
        invalidation: tag.strategy().invalidation().name(),
        cost: cost.clone(),
        threads,
        pages,
        map_ns,
        map_ns_std,
        unmap_ns,
        unmap_ns_std,
        driver_ns_per_map: map_ns + unmap_ns,
        device_ns_per_map: device_ns,
        sync_batch: None,
    })
}

/// Measures two-step mapping (`busdma::front::window`): each thread reserves one window of
/// `BATCH` slots of `pages` pages from `tag`'s domain and repeats: link a `pages`-page owned
/// buffer into every slot (timed as the batch's "map"), the device reads as in [`measure`],
/// unlink every slot and commit once (timed as the batch's "unmap": `BATCH` unlinks, one IOTLB
/// invalidation). The per-operation figures are per I/O, as the per-map rows'.
#[allow(clippy::too_many_arguments)]
pub fn measure_window<'p, S>(
    m: &'p HostPlatform,
    tag: &Tag<'p, HostPlatform, S>,
    label: &'static str,
    threads: usize,
    pages: u64,
    duration: Duration,
    trim: bool,
    cost: &Cost,
    port: Option<&dyn DmaPort>,
) -> Result<Row, String>
where
    S: WindowSource<HostPlatform> + Sync,
{
    let per_thread: Vec<Result<Samples, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || -> Result<Samples, String> {
                    let _bind = m.bind_cpu(t).map_err(|e| format!("bind cpu {t}: {e}"))?;
                    let slot = pages * PAGE_SIZE;
                    let mut bufs = Vec::with_capacity(BATCH);
                    for _ in 0..BATCH {
                        let b = DmaMemory::alloc(m, tag.spec(), slot, MemAttr::WriteBack)
                            .map_err(|e| format!("buffer of {pages} pages: {e}"))?;
                        bufs.push(Some(b));
                    }
                    let mut w = tag
                        .create_window::<DmaMemory<'p, HostPlatform>>(slot * BATCH as u64, BATCH)
                        .map_err(|e| format!("create window: {e}"))?;
                    let mut linked = Vec::with_capacity(BATCH);
                    let (mut map_t, mut unmap_t, mut dev_t) = (Vec::new(), Vec::new(), Vec::new());
                    let mut word = [0u8; 8];
                    let start = Instant::now();
                    let mut warm = 3;
                    while start.elapsed() < duration || map_t.len() < 10 {
                        linked.clear();
                        let t0 = Instant::now();
                        for (i, b) in bufs.iter_mut().enumerate() {
                            let b = b.take().ok_or("window buffer missing")?;
                            let l = w
                                .link(i as u64 * slot, b, Direction::Bidirectional)
                                .map_err(|e| format!("link: {}", e.error))?;
                            linked.push(l);
                        }
                        let t1 = Instant::now();
                        if let Some(port) = port {
                            for l in &linked {
                                for off in (0..l.len).step_by(PAGE_SIZE as usize) {
                                    let at = l.iova.checked_add(off).ok_or("bus address overflow")?;
                                    port.dma_read(at, &mut word)
                                        .map_err(|f| format!("device DMA fault: {f:?}"))?;
                                }
                            }
                        }
                        let t1d = Instant::now();
                        for i in 0..BATCH {
                            w.unlink(i as u64 * slot).map_err(|e| format!("unlink: {e}"))?;
                        }
                        w.commit(|off, b| bufs[(off / slot) as usize] = Some(b))
                            .map_err(|e| format!("commit: {e}"))?;
                        let t2 = Instant::now();
                        if warm > 0 {
                            warm -= 1;
                            continue;
                        }
                        map_t.push((t1 - t0).as_nanos() as f64 / BATCH as f64);
                        dev_t.push((t1d - t1).as_nanos() as f64 / BATCH as f64);
                        unmap_t.push((t2 - t1d).as_nanos() as f64 / BATCH as f64);
                    }
                    w.destroy(|_, b| drop(b)).map_err(|e| format!("destroy window: {e}"))?;
                    Ok((map_t, unmap_t, dev_t))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("bench thread panicked".into()))).collect()
    });
    let (mut maps, mut unmaps, mut devs) = (Vec::new(), Vec::new(), Vec::new());
    for r in per_thread {
        let (a, b, c) = r?;
        maps.extend(a);
        unmaps.extend(b);
        devs.extend(c);
    }
    if trim {
        maps = trimmed(&maps);
        unmaps = trimmed(&unmaps);
        devs = trimmed(&devs);
    }
    let device_ns = if port.is_some() { mean_std(&devs).0 } else { 0.0 };
    let (map_ns, map_ns_std) = mean_std(&maps);
    let (unmap_ns, unmap_ns_std) = mean_std(&unmaps);
    Ok(Row {
        strategy: label,
        invalidation: tag.strategy().invalidation().name(),
        cost: cost.clone(),
        threads,
        pages,
        map_ns,
        map_ns_std,
        unmap_ns,
        unmap_ns_std,
        driver_ns_per_map: map_ns + unmap_ns,
        device_ns_per_map: device_ns,
        sync_batch: Some(BATCH),
    })
}

/// Measures the four IOMMU strategies over domain handle `d` for every threads × pages.
pub fn measure_iommu<D>(
    m: &HostPlatform,
    d: D,
    args: &MapArgs,
    cost: &Cost,
    port: Option<&dyn DmaPort>,
    rows: &mut Vec<Row>,
) -> Result<(), String>
where
    D: IommuOps<HostPlatform> + Clone + Sync,
{
    let dur = Duration::from_millis(args.ms);
    let spec = bench_spec();
    let per_map = Tag::new_root(m, IommuPerMap(d.clone()), spec).map_err(|e| e.to_string())?;
    let reserved = Tag::new_root(m, IommuReserved::new(d.clone()), spec).map_err(|e| e.to_string())?;
    // Two windows per map, used in turn: under deferred invalidation a load waits for the
    // unload before last, so at most every other load forces a flush.
    let reserved2 =
        Tag::new_root(m, IommuReserved::alternating(d.clone(), 2), spec).map_err(|e| e.to_string())?;
    let per_seg = Tag::new_root(m, IommuPerSegment(d.clone()), spec).map_err(|e| e.to_string())?;
    let identity = Tag::new_root(m, Identity::new(d.clone()), spec).map_err(|e| e.to_string())?;
    for &threads in &args.threads {
        for &pages in &args.pages {
            let inv = d.invalidation().name();
            eprintln!("bench map: iommu strategies ({inv}) threads={threads} pages={pages}");
            rows.push(measure(m, &per_map, "iommu-per-map", threads, pages, dur, args.trim, cost, port)?);
            rows.push(measure(m, &reserved, "iommu-reserved", threads, pages, dur, args.trim, cost, port)?);
            if d.invalidation() == Invalidation::Strict {
                // Two-step mapping: link + unlink per I/O, one invalidation per `BATCH`.
                rows.push(measure_window(
                    m,
                    &per_map,
                    "iommu-window",
                    threads,
                    pages,
                    dur,
                    args.trim,
                    cost,
                    port,
                )?);
            }
            if d.invalidation() == Invalidation::Deferred {
                rows.push(measure(
                    m,
                    &reserved2,
                    "iommu-reserved-2win",
                    threads,
                    pages,
                    dur,
                    args.trim,
                    cost,
                    port,
                )?);
            }
            rows.push(measure(m, &per_seg, "iommu-per-segment", threads, pages, dur, args.trim, cost, port)?);
            rows.push(measure(m, &identity, "identity", threads, pages, dur, args.trim, cost, port)?);
        }
    }
    Ok(())
}

/// Options of `dmalab bench map`.
#[derive(clap::Args, Debug, Clone)]
pub struct MapArgs {
    /// Page counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 16, 256])]
    pub pages: Vec<u64>,
    /// Thread counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    pub threads: Vec<usize>,
    /// Milliseconds per measurement.
    #[arg(long, default_value_t = 300)]
    pub ms: u64,
    /// Drop batches slower than 4× the median batch (a batch the host preempted: on a shared
    /// machine one preemption adds milliseconds to a batch of nanosecond operations) before
    /// computing mean and deviation. Off by default: the default statistics are
    /// dma_map_benchmark's, over every batch.
    #[arg(long)]
    pub trim: bool,
    /// The model IOMMU's assumed hardware cost.
    #[command(flatten)]
    pub cost: CostArgs,
    /// No device reads between load and unload (the IOTLB then caches nothing the unmaps
    /// must drop; `device_ns_per_map` is 0).
    #[arg(long)]
    pub no_device: bool,
}

/// The bench's device.
const DEV: u32 = 0x42;

/// Runs every strategy × invalidation × threads × pages and returns the rows.
pub fn run(args: &MapArgs, m: &HostPlatform) -> Result<Vec<Row>, String> {
    let d = Duration::from_millis(args.ms);
    let mut rows = Vec::new();
    let cpus = busdma::Platform::num_cpus(m);
    if let Some(&t) = args.threads.iter().find(|&&t| t == 0 || t > cpus) {
        return Err(format!("{t} threads but the machine has {cpus} CPUs"));
    }
    if let Some(&p) = args.pages.iter().find(|&&p| p == 0 || p > 256) {
        return Err(format!("pages must be 1..=256 (the bench tag's max size), not {p}"));
    }
    let cost = args.cost.resolve()?;
    let tag = Tag::new_root(m, busdma::front::Direct, bench_spec()).map_err(|e| e.to_string())?;
    let direct = DirectPort::new(m, DEV, 64);
    let direct_port: Option<&dyn DmaPort> = if args.no_device { None } else { Some(&direct) };
    for &threads in &args.threads {
        for &pages in &args.pages {
            eprintln!("bench map: direct threads={threads} pages={pages}");
            rows.push(measure(m, &tag, "direct", threads, pages, d, args.trim, &cost, direct_port)?);
        }
    }
    for policy in [InvalidationPolicy::Strict, InvalidationPolicy::deferred()] {
        // A VT-d second-level domain (4 levels, 48-bit IOVA) on the model IOMMU, the device
        // attached, audit off (the model's own cost is then its IOTLB bookkeeping).
        let iommu = ModelIommu::new(m, cost.config()).map_err(|e| e.to_string())?;
        let pool = TablePool::new(m);
        // Per-CPU caches on: the allocator's fast path.
        let iova = fixture::iova_allocator(m, true)?;
        // SAFETY: `DEV` is driven only by this bench, which issues no DMA once `dom` is
        // dropped and drops `iommu` with it.
        let dom = unsafe { fixture::vtd_domain(m, &iommu, &pool, DEV, 1, policy, iova)? };
        let port = iommu.port(DEV);
        let port: Option<&dyn DmaPort> = if args.no_device { None } else { Some(&port) };
        measure_iommu(m, &dom, args, &cost, port, &mut rows)?;
    }
    Ok(rows)
}
