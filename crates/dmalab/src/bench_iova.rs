//! `dmalab bench iova`: IOVA allocators side by side under a fragmented space.
//!
//! Setup, identical for every implementation: the space is laid out from its base as
//! `live` pairs of (hole, live range), each 1 to 16 pages long (a seeded random sequence), and
//! ends right after the last pair: every allocation must find a hole among the `live` ranges,
//! there is no untouched free area to fall into. The live ranges are entered as fixed
//! occupations (`reserve` / exact placement), which costs each allocator the same tree nodes
//! as allocations would, without an O(n^2) setup for the list-based baseline.
//!
//! One op is an alloc + free pair: each thread (bound to its own model CPU) allocates a
//! 1-16-page range and frees the one it allocated [`RING`] ops earlier, like a NIC ring
//! recycling its buffers, holding one CPU guard per batch of [`CHECK_EVERY`] ops (a driver's
//! poll loop). `ns_per_op` is wall-clock time divided by the ops of all threads together;
//! `cpu_ns_per_op` is the threads' CPU time divided the same way (on a shared host, the wall
//! clock also counts time other processes ran).
//!
//! Patterns (`--patterns`): `frag`, the original one (1-16 pages, [`RING`] in flight); `nic`,
//! a NIC's receive ring (1 page, 256 and 1024 in flight); `nvme`, a storage queue (1-32
//! pages, queue depths 32 and 1024). `--ring` and `--pages` override a pattern's depths and
//! size mix. For `nic` and `nvme`, below the fragmented layout the space has a free area big
//! enough for every thread's ring and caches, so deep rings never exhaust the space (each
//! allocator places high, so it searches the holes first; busdma's naturally aligned class
//! ranges mostly land in the free area). `frag` keeps the layout above exactly: no free area.
//!
//! Every row says which layer served the allocations over the measured interval:
//! `magazine_hit` (share of allocations served by a per-CPU magazine), `depot_hit` (share of
//! empty-magazine refills the depot could serve), `tree_share` (share that reached the tree);
//! `layer` is `cache+tree` for busdma with caches, `tree` otherwise (vm-allocator and extent
//! have no per-CPU cache: their rates are empty, the row says `no cache`). Compare cache with
//! cache (busdma rows) and tree with tree (busdma-tree, vm-allocator, extent).
//!
//! Implementations: `busdma` (caches on), `busdma-tree` (caches off: the O(log n) slow path),
//! `vm-allocator` (rust-vmm's `AddressAllocator` behind a `std::sync::Mutex`, last match),
//! `extent` (sorted-list best fit under one lock, OpenBSD extent(9)-like), and
//! `busdma-private`, a control rather than a design: one whole busdma allocator per thread
//! (each over its own copy of the layout, chosen by the guard's CPU), so that two threads share
//! no byte of allocator state. What its two-thread rows still lose against one thread is the
//! hardware's and the harness's (two cores' shared caches and memory, the bench's own loop),
//! the floor the shared allocator's two-thread ratio is to be read against.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::rng::Rng;
use busdma::iova::{ExtentAllocator, IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::{AddrRange, CpuGuard, Error, Iova, PAGE_SIZE, Platform};
use busdma_model::{HostPlatform, MachineConfig};
use clap::Args;
use serde::Serialize;

/// Ranges each thread keeps in flight: a small NIC ring's worth. It makes the pattern more
/// than "free what was just allocated" while keeping every thread's footprint far below the
/// space's holes.
pub const RING: usize = 16;

/// Ops between two looks at the stop flag, done under one CPU guard: cheap enough to be free
/// for fast allocators, and at most a few milliseconds of overshoot for the O(n) baseline at
/// 100 000 live ranges.
const CHECK_EVERY: u64 = 32;

/// Untimed ops per thread before the clock starts (fills caches and magazines).
const WARMUP: u64 = 2_000;

/// `dmalab bench iova` options.
#[derive(Args, Debug, Clone)]
pub struct IovaArgs {
    /// Live-range counts to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1_000u64, 10_000, 100_000])]
    pub live: Vec<u64>,
    /// Thread counts to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 2])]
    pub threads: Vec<usize>,
    /// Implementations to measure (comma separated): busdma, busdma-tree, vm-allocator, extent.
    #[arg(long, value_delimiter = ',', default_values_t = IMPLS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub impls: Vec<String>,
    /// Measured time per (impl, threads, live) point, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub millis: u64,
    /// Seed of the layout and request sizes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Patterns to measure (comma separated): frag, nic, nvme.
    #[arg(long, value_delimiter = ',', default_values_t = PATTERNS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub patterns: Vec<String>,
    /// Ranges in flight per thread (comma separated), instead of each pattern's own.
    #[arg(long, value_delimiter = ',')]
    pub ring: Vec<usize>,
    /// Size mix `MIN-MAX` (pages, uniform) or `N`, instead of each pattern's own.
    #[arg(long)]
    pub pages: Option<String>,
}

/// Every pattern, in report order.
pub const PATTERNS: [&str; 3] = ["frag", "nic", "nvme"];

/// A pattern's default ring depths and size mix (pages, inclusive).
fn pattern(name: &str) -> Result<(Vec<usize>, (u64, u64)), String> {
    match name {
        "frag" => Ok((vec![RING], (1, 16))),
        "nic" => Ok((vec![256, 1024], (1, 1))),
        "nvme" => Ok((vec![32, 1024], (1, 32))),
        other => Err(format!("unknown pattern {other:?} (known: {})", PATTERNS.join(", "))),
    }
}

/// Parses `MIN-MAX` or `N` (pages, 1 to 1024).
fn parse_pages(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("--pages {s:?}: expected MIN-MAX or N, 1 <= MIN <= MAX <= 1024");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let (a, b): (u64, u64) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    (1 <= a && a <= b && b <= 1024).then_some((a, b)).ok_or_else(bad)
}

/// Every implementation, in report order.
pub const IMPLS: [&str; 4] = ["busdma", "busdma-tree", "vm-allocator", "extent"];

/// The controls `--impls` also takes (not run by default): see the module's documentation.
pub const CONTROLS: [&str; 1] = ["busdma-private"];

/// One result row.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    #[serde(rename = "impl")]
    pub imp: String,
    pub pattern: String,
    pub ring: usize,
    pub pages: String,
    pub threads: usize,
    pub live: u64,
    pub ns_per_op: f64,
    /// CPU time the threads actually ran, per op (summed over threads): what an op costs
    /// when the host is shared and the wall clock includes time other processes ran.
    pub cpu_ns_per_op: f64,
    /// `cache+tree` or `tree`.
    pub layer: &'static str,
    /// Share of allocations a per-CPU magazine served (busdma with caches only).
    pub magazine_hit: Option<f64>,
    /// Share of refills (both magazines empty) the depot served (busdma with caches only).
    pub depot_hit: Option<f64>,
    /// Share of allocations that reached the tree (busdma only).
    pub tree_share: Option<f64>,
    /// What the row cannot show (`no cache` for vm-allocator and extent).
    pub note: &'static str,
}

/// One measured point's parameters.
#[derive(Clone, Copy, Debug)]
struct Point {
    threads: usize,
    live: u64,
    ring: usize,
    pages: (u64, u64),
    /// A free area below the layout (`nic`, `nvme`); `frag` keeps its layout exactly.
    free_area: bool,
}

/// Layer rates over the measured interval, from two snapshots of the counters.
type Rates = (Option<f64>, Option<f64>, Option<f64>);

fn rates(a: &busdma::iova::IovaStats, b: &busdma::iova::IovaStats, caches: bool) -> Rates {
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64;
    let allocs = d(a.allocations, b.allocations).max(1.0);
    let hits = d(a.cache_hits, b.cache_hits);
    let r4 = |x: f64| (x * 10_000.0).round() / 10_000.0;
    if !caches {
        return (None, None, Some(1.0));
    }
    let gets = d(a.depot_gets, b.depot_gets);
    let refills = gets + d(a.depot_misses, b.depot_misses);
    let depot = if refills > 0.0 { Some(r4(gets / refills)) } else { None };
    (Some(r4(hits / allocs)), depot, Some(r4((allocs - hits) / allocs)))
}

/// The counters `rates` reads, summed over the private allocators of `busdma-private`.
fn sum_stats(all: &[IovaAllocator]) -> busdma::iova::IovaStats {
    all.iter().map(IovaAllocator::stats).fold(Default::default(), |mut t, s| {
        t.allocations += s.allocations;
        t.cache_hits += s.cache_hits;
        t.depot_gets += s.depot_gets;
        t.depot_misses += s.depot_misses;
        t
    })
}

/// CPU time consumed by the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// rust-vmm's allocator as a VMM author would share it: one `Mutex`.
struct VmAllocator(Mutex<vm_allocator::AddressAllocator>);

impl IovaSource for VmAllocator {
    fn alloc<P: Platform>(&self, _g: &CpuGuard<'_, P>, req: &IovaRequest) -> busdma::Result<AddrRange<Iova>> {
        let mut a = self.0.lock().map_err(|_| Error::BadState { what: "poisoned mutex" })?;
        let r = a
            .allocate(req.size, req.align, vm_allocator::AllocPolicy::LastMatch)
            .map_err(|_| Error::Exhausted { size: req.size, limit: req.limit.raw() })?;
        AddrRange::from_start_len(Iova::new(r.start()), r.len())
    }

    fn free<P: Platform>(&self, _g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> busdma::Result<()> {
        let mut a = self.0.lock().map_err(|_| Error::BadState { what: "poisoned mutex" })?;
        let key = vm_allocator::RangeInclusive::new(range.start().raw(), range.end().raw() - 1)
            .map_err(|_| Error::InvalidRange { start: range.start().raw(), end: range.end().raw() })?;
        a.free(&key).map_err(|_| Error::DoubleFree { addr: range.start().raw(), size: range.len() })
    }
}

/// `busdma-private`: one allocator per CPU, nothing shared between threads bound to
/// different CPUs.
struct PerCpu(Vec<IovaAllocator>);

impl PerCpu {
    fn of<P: Platform>(&self, g: &CpuGuard<'_, P>) -> busdma::Result<&IovaAllocator> {
        self.0.get(g.cpu()).ok_or(Error::BadState { what: "a CPU with no private allocator" })
    }
}

impl IovaSource for PerCpu {
    fn alloc<P: Platform>(&self, g: &CpuGuard<'_, P>, req: &IovaRequest) -> busdma::Result<AddrRange<Iova>> {
        self.of(g)?.alloc(g, req)
    }

    fn free<P: Platform>(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> busdma::Result<()> {
        self.of(g)?.free(g, range)
    }
}

/// First address of every space: 4 GiB, above where a 32-bit device could reach, so the
/// layout never straddles it.
const BASE: u64 = 1 << 32;

/// The fragmented layout: `(live ranges as (start, len), end of space)`.
fn layout(live: u64, seed: u64) -> (Vec<(u64, u64)>, u64) {
    let mut rng = Rng::new(seed);
    let mut at = BASE;
    let mut ranges = Vec::with_capacity(live as usize);
    for _ in 0..live {
        at += rng.pages() * PAGE_SIZE; // hole
        let len = rng.pages() * PAGE_SIZE;
        ranges.push((at, len));
        at += len;
    }
    (ranges, at)
}

fn space_of(end: u64) -> Result<AddrRange<Iova>, String> {
    AddrRange::new(Iova::new(BASE), Iova::new(end)).map_err(|e| e.to_string())
}

/// Runs `threads` threads of alloc/free pairs against `a` for `dur`; returns ns per op.
fn drive<A: IovaSource>(
    m: &HostPlatform,
    a: &A,
    pt: Point,
    dur: Duration,
    seed: u64,
    mut snap: impl FnMut(),
) -> Result<(f64, f64), String> {
    let (threads, ring_len, (lo, hi)) = (pt.threads, pt.ring, pt.pages);
    let stop = AtomicBool::new(false);
    let go = std::sync::Barrier::new(threads + 1);
    let (ops, elapsed) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (stop, go) = (&stop, &go);
                s.spawn(move || -> Result<(u64, Instant, Duration), String> {
                    let bind = m.bind_cpu(t).map_err(|e| format!("bind cpu {t}: {e}"));
                    if bind.is_err() {
                        go.wait();
                    }
                    let _bind = bind?;
                    let mut rng = Rng::new(seed ^ (t as u64 + 1) << 32);
                    let mut ring: VecDeque<AddrRange<Iova>> = VecDeque::with_capacity(ring_len + 1);
                    let mut step = |g: &CpuGuard<'_, HostPlatform>,
                                    ring: &mut VecDeque<AddrRange<Iova>>|
                     -> Result<(), String> {
                        // Multiply-shift, not `%`: a division would cost the allocator's fast path again.
                        let n = lo + (((rng.next() >> 32) * (hi - lo + 1)) >> 32);
                        let r = a.alloc(g, &IovaRequest::pages(n)).map_err(|e| e.to_string())?;
                        ring.push_back(r);
                        if ring.len() > ring_len {
                            let old = ring.pop_front().expect("ring holds RING + 1 ranges");
                            a.free(g, old).map_err(|e| e.to_string())?;
                        }
                        Ok(())
                    };
                    let warm = (0..WARMUP).try_for_each(|_| step(&m.pin_cpu(), &mut ring));
                    // Reach the barrier even on failure, or the timer thread waits forever.
                    go.wait();
                    warm?;
                    let cpu0 = thread_cpu_time();
                    let mut n = 0u64;
                    // At least one batch, even when the timer stopped the point before this
                    // thread was scheduled (a loaded machine): a point of zero ops measures
                    // nothing and its layer rates would be 0/0.
                    loop {
                        // One preemption-disabled section per batch, as a driver's poll loop
                        // (NAPI) maps a batch of buffers.
                        let g = m.pin_cpu();
                        for _ in 0..CHECK_EVERY {
                            step(&g, &mut ring)?;
                        }
                        n += CHECK_EVERY;
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                    let end = Instant::now();
                    let cpu = thread_cpu_time().saturating_sub(cpu0);
                    let g = m.pin_cpu();
                    for r in ring.drain(..) {
                        a.free(&g, r).map_err(|e| e.to_string())?;
                    }
                    Ok((n, end, cpu))
                })
            })
            .collect();
        go.wait();
        snap();
        let start = Instant::now();
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        let (mut ops, mut last, mut cpu) = (0, start, Duration::ZERO);
        for h in hs {
            let (n, end, c) = h.join().map_err(|_| "bench thread panicked".to_string())??;
            ops += n;
            last = last.max(end);
            cpu += c;
        }
        snap();
        Ok::<_, String>((ops, (last - start, cpu)))
    })?;
    let per_op = |d: Duration| d.as_nanos() as f64 / ops.max(1) as f64;
    Ok((per_op(elapsed.0), per_op(elapsed.1)))
}

/// Free pages below the fragmented layout: room for every thread's ring (each range rounded
/// up to its class) twice over, and for full magazines of every class on every CPU.
fn free_area_pages(pt: Point) -> u64 {
    if !pt.free_area {
        return 0;
    }
    let class = pt.pages.1.next_power_of_two();
    let magazines = 2 * busdma::iova::magazine::MAG_ROUNDS as u64 * 127;
    pt.threads as u64 * (4 * pt.ring as u64 * class + magazines)
}

/// Builds implementation `imp` over the layout and measures it.
fn measure(m: &HostPlatform, imp: &str, pt: Point, args: &IovaArgs) -> Result<(f64, f64, Rates), String> {
    let (mut ranges, mut end) = layout(pt.live, args.seed);
    let shift = free_area_pages(pt) * PAGE_SIZE;
    ranges.iter_mut().for_each(|r| r.0 += shift);
    end += shift;
    let space = space_of(end)?;
    let dur = Duration::from_millis(args.millis);
    let e = |e: Error| e.to_string();
    let none = (None, None, None);
    match imp {
        "busdma" | "busdma-tree" | "busdma-private" => {
            let caches = imp != "busdma-tree";
            let cfg = IovaConfig { cpus: m.num_cpus(), caches, guard_page: false };
            let build = || -> Result<IovaAllocator, String> {
                let a = IovaAllocator::new(space, cfg).map_err(e)?;
                for &(s, len) in &ranges {
                    a.reserve(AddrRange::from_start_len(Iova::new(s), len).map_err(e)?).map_err(e)?;
                }
                Ok(a)
            };
            let mut snaps = Vec::with_capacity(2);
            let (wall, cpu) = if imp == "busdma-private" {
                let a = PerCpu((0..pt.threads).map(|_| build()).collect::<Result<_, _>>()?);
                drive(m, &a, pt, dur, args.seed, || snaps.push(sum_stats(&a.0)))?
            } else {
                let a = build()?;
                drive(m, &a, pt, dur, args.seed, || snaps.push(a.stats()))?
            };
            let r = match snaps.as_slice() {
                [s0, s1] => rates(s0, s1, caches),
                _ => none,
            };
            Ok((wall, cpu, r))
        }
        "extent" => {
            let a = ExtentAllocator::new(space).map_err(e)?;
            for &(s, len) in &ranges {
                a.reserve(AddrRange::from_start_len(Iova::new(s), len).map_err(e)?).map_err(e)?;
            }
            drive(m, &a, pt, dur, args.seed, || {}).map(|(w, c)| (w, c, none))
        }
        "vm-allocator" => {
            let mut v = vm_allocator::AddressAllocator::new(BASE, end - BASE).map_err(|e| e.to_string())?;
            for &(s, len) in &ranges {
                v.allocate(len, PAGE_SIZE, vm_allocator::AllocPolicy::ExactMatch(s))
                    .map_err(|e| e.to_string())?;
            }
            // Last match: vm-allocator's first match would fill the free area below the
            // layout and never search the holes; the last match searches from the top, as
            // the other allocators place.
            let a = VmAllocator(Mutex::new(v));
            drive(m, &a, pt, dur, args.seed, || {}).map(|(w, c)| (w, c, none))
        }
        other => Err(format!(
            "unknown implementation {other:?} (known: {}, and the control {})",
            IMPLS.join(", "),
            CONTROLS.join(", ")
        )),
    }
}

/// Runs every requested point; progress goes to stderr.
pub fn run(args: &IovaArgs) -> Result<Vec<Row>, String> {
    let cpus = args.threads.iter().copied().max().unwrap_or(1).max(1);
    let m = HostPlatform::new(MachineConfig {
        ram_size: 16 << 20,
        direct_map_size: 16 << 20,
        cpus,
        ..Default::default()
    })
    .map_err(|e| format!("cannot build the machine model: {e}"))?;
    let mut rows = Vec::new();
    for pat in &args.patterns {
        let (rings, mix) = pattern(pat)?;
        let rings = if args.ring.is_empty() { rings } else { args.ring.clone() };
        let pages = args.pages.as_deref().map(parse_pages).transpose()?.unwrap_or(mix);
        for &ring in &rings {
            for &live in &args.live {
                for imp in &args.impls {
                    for &threads in &args.threads {
                        let pt = Point { threads, live, ring: ring.max(1), pages, free_area: pat != "frag" };
                        eprintln!("bench iova: {imp} {pat} ring={ring} threads={threads} live={live}");
                        let (wall, cpu, (mag, depot, tree)) = measure(&m, imp, pt, args)?;
                        let r2 = |x: f64| (x * 100.0).round() / 100.0;
                        let cached = imp == "busdma" || imp == "busdma-private";
                        rows.push(Row {
                            imp: imp.clone(),
                            pattern: pat.clone(),
                            ring: pt.ring,
                            pages: if pages.0 == pages.1 {
                                pages.0.to_string()
                            } else {
                                format!("{}-{}", pages.0, pages.1)
                            },
                            threads,
                            live,
                            ns_per_op: r2(wall),
                            cpu_ns_per_op: r2(cpu),
                            layer: if cached { "cache+tree" } else { "tree" },
                            magazine_hit: mag,
                            depot_hit: depot,
                            tree_share: tree,
                            note: match imp.as_str() {
                                "vm-allocator" | "extent" => "no cache",
                                "busdma-private" => "control: one allocator per thread",
                                _ => "",
                            },
                        });
                    }
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_implementation_runs_and_reports_a_row_per_point() {
        let args = IovaArgs {
            live: vec![1000],
            threads: vec![1, 2],
            impls: IMPLS.iter().map(|s| s.to_string()).collect(),
            millis: 5,
            seed: 7,
            patterns: vec!["frag".into()],
            ring: vec![],
            pages: None,
        };
        let rows = run(&args).unwrap();
        assert_eq!(rows.len(), 2 * IMPLS.len());
        for r in &rows {
            assert!(r.ns_per_op > 0.0 && r.cpu_ns_per_op >= 0.0, "{r:?}");
            assert_eq!(r.note == "no cache", r.magazine_hit.is_none() && r.tree_share.is_none(), "{r:?}");
        }
        assert!(run(&IovaArgs { impls: vec!["nope".into()], ..args }).is_err());
    }

    #[test]
    fn layout_alternates_holes_and_live_ranges_of_one_to_sixteen_pages() {
        let (ranges, end) = layout(1000, 3);
        let mut at = BASE;
        for &(s, len) in &ranges {
            let hole = s - at;
            assert!(
                (PAGE_SIZE..=16 * PAGE_SIZE).contains(&hole) && (PAGE_SIZE..=16 * PAGE_SIZE).contains(&len)
            );
            at = s + len;
        }
        assert_eq!(at, end);
    }
}

#[cfg(test)]
mod pattern_tests {
    use super::*;

    #[test]
    fn nic_and_nvme_patterns_report_layer_rates_and_never_exhaust_the_space() {
        let args = IovaArgs {
            live: vec![1000],
            threads: vec![1, 2],
            impls: vec!["busdma".into(), "busdma-tree".into(), "extent".into()],
            millis: 5,
            seed: 3,
            patterns: vec!["nic".into(), "nvme".into()],
            ring: vec![256],
            pages: None,
        };
        let rows = run(&args).unwrap();
        assert_eq!(rows.len(), 2 * 3 * 2);
        for r in &rows {
            match r.imp.as_str() {
                "busdma" => {
                    let (m, t) = (r.magazine_hit.unwrap(), r.tree_share.unwrap());
                    assert!((m + t - 1.0).abs() < 1e-3 && m > 0.5, "{r:?}");
                }
                "busdma-tree" => assert_eq!(r.tree_share, Some(1.0), "{r:?}"),
                _ => assert_eq!(r.note, "no cache"),
            }
        }
        assert_eq!(rows.iter().filter(|r| r.pattern == "nvme" && r.pages == "1-32").count(), 6);
    }

    #[test]
    fn the_private_control_gives_each_thread_its_own_allocator_and_counts_both() {
        let args = IovaArgs {
            live: vec![1000],
            threads: vec![2],
            impls: vec!["busdma-private".into()],
            millis: 5,
            seed: 3,
            patterns: vec!["nic".into()],
            ring: vec![256],
            pages: None,
        };
        let rows = run(&args).unwrap();
        let [r] = rows.as_slice() else { panic!("one row expected: {rows:?}") };
        assert!(r.note.starts_with("control"), "{r:?}");
        // Both threads' allocations are counted and each went to its CPU's allocator: the
        // rows' shares would look the same with one allocator's counters, so count directly.
        let m = HostPlatform::new(MachineConfig {
            ram_size: 16 << 20,
            direct_map_size: 16 << 20,
            cpus: 2,
            ..Default::default()
        })
        .unwrap();
        let space = space_of(BASE + (1 << 30)).unwrap();
        let cfg = IovaConfig { cpus: 2, caches: true, guard_page: false };
        let a =
            PerCpu(vec![IovaAllocator::new(space, cfg).unwrap(), IovaAllocator::new(space, cfg).unwrap()]);
        let mut held = Vec::new();
        for cpu in 0..2 {
            let _b = m.bind_cpu(cpu).unwrap();
            let g = m.pin_cpu();
            held.push(a.alloc(&g, &IovaRequest::pages(1)).unwrap());
        }
        // Each CPU's range came from its own allocator.
        assert_eq!(held.len(), 2);
        assert_eq!(sum_stats(&a.0).allocations, 2);
        assert_eq!(a.0.iter().map(|x| x.stats().allocations).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn size_mixes_parse_or_are_refused_with_the_input() {
        assert_eq!(parse_pages("1-32"), Ok((1, 32)));
        assert_eq!(parse_pages("4"), Ok((4, 4)));
        for bad in ["0", "5-2", "x", "1-2000"] {
            assert!(parse_pages(bad).unwrap_err().contains(bad), "{bad}");
        }
        assert!(pattern("nope").is_err());
    }
}
