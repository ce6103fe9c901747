//! `dmalab bench pin`: user address → physical address translation of pre-registered memory
//! (seed 001), busdma's registry against a list walk like Linux's `mm_iommu_lookup`, in one
//! run.
//!
//! Setup per region count `n`: a model address space backed by 2 MiB pages, `n` registered
//! regions of one 4 KiB page each (adjacent), and 2^20 query addresses (a random region, a
//! random byte in it) from a fixed-seed generator. Both designs translate the same queries and
//! must agree on every answer (checked by a checksum). Time is the thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`), not wall time: the lab machine is shared. `busdma` translates inside read
//! sections of `--batch` translations each (the section's cost is included), one `ua_to_pa`
//! call per translation (the direct page index); `busdma-tree` the same through the interval
//! index alone (`ua_to_pa_tree`, the design before the page index); `busdma-batch` translates the same sections with one `ua_to_pa_batch` call
//! each (lookups in lockstep, misses overlapped: H_PUT_TCE_INDIRECT's shape); `linear-list`
//! walks a singly linked list of separately allocated nodes, newest first, as Linux's
//! `list_for_each_entry_rcu` over `mm->context.iommu_group_mem_list` does (its RCU read lock
//! costs nothing, so none is modelled). Each measurement runs for `--seconds`; rounds
//! alternate the designs and the median is reported.

use std::hint::black_box;
use std::time::Duration;

use busdma::pin::Registry;
use busdma::{PAGE_SHIFT, PAGE_SIZE, PhysAddr, UserVa};
use busdma_model::uspace::UserSpace;
use busdma_model::{HostPlatform, MachineConfig};
use clap::Args;
use serde_json::json;

use crate::Common;
use crate::report::Report;
use crate::rng::Rng;

/// Arguments of `dmalab bench pin`.
#[derive(Args, Debug)]
pub struct PinArgs {
    #[command(flatten)]
    common: Common,
    /// Numbers of registered regions to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [10usize, 1000, 100_000])]
    regions: Vec<usize>,
    /// Translations per read section (busdma), and per batch (busdma-batch).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 0.3)]
    seconds: f64,
    /// Rounds per design (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Query stream: `random` (a random region per query: the worst case for caches) or
    /// `runs` (runs of 16 consecutive pages from a random start, as a TCE list maps
    /// consecutive guest pages).
    #[arg(long, value_enum, default_value_t = Pattern::Random)]
    pattern: Pattern,
}

/// The query streams of `--pattern`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// A random region for every query.
    Random,
    /// Runs of 16 consecutive pages from a random start.
    Runs,
}

/// Pages per run of `--pattern runs`: a small TCE list (H_PUT_TCE_INDIRECT takes up to 512).
const RUN: u64 = 16;

/// First user address of the registered space: 1 GiB-aligned, arbitrary otherwise.
const UA_BASE: u64 = 0x40_0000_0000;
/// Queries per setup: 2^20 addresses (8 MiB), far more than any cache holds, so the query
/// stream itself gives no design a warm-cache advantage.
const QUERIES: usize = 1 << 20;
/// 2 MiB: the huge pages backing the space (so that mapping 100 000 pages costs a few hundred
/// frame allocations, not 100 000).
const HUGE: u64 = 2 << 20;

/// One node of the reference list (Linux's `struct mm_iommu_table_group_mem_t`, reduced).
struct Node {
    ua: u64,
    size: u64,
    hpas: Box<[PhysAddr]>,
    next: Option<Box<Node>>,
}

/// The reference design: a singly linked list, newest registration first.
struct LinearList {
    head: Option<Box<Node>>,
}

impl LinearList {
    fn push(&mut self, ua: u64, hpas: &[PhysAddr]) {
        let size = hpas.len() as u64 * PAGE_SIZE;
        self.head = Some(Box::new(Node { ua, size, hpas: hpas.into(), next: self.head.take() }));
    }

    #[inline(never)]
    fn ua_to_pa(&self, ua: u64) -> Option<PhysAddr> {
        let mut n = self.head.as_deref();
        while let Some(node) = n {
            if ua >= node.ua && ua < node.ua + node.size {
                let off = ua - node.ua;
                let pa = node.hpas[(off >> PAGE_SHIFT) as usize];
                return Some(PhysAddr::new(pa.raw() | (off & (PAGE_SIZE - 1))));
            }
            n = node.next.as_deref();
        }
        None
    }
}

impl Drop for LinearList {
    fn drop(&mut self) {
        // Iteratively: a recursive drop of 100 000 nodes would overflow the stack.
        let mut n = self.head.take();
        while let Some(mut node) = n {
            n = node.next.take();
        }
    }
}

/// CPU time of the calling thread. The lab machine is shared (two cores, other jobs
/// compiling): wall-clock time would count the time other processes held our core.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusive `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    debug_assert_eq!(rc, 0, "CLOCK_THREAD_CPUTIME_ID is always available on Linux");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `f` over the queries, cyclically, for at least `budget` of thread CPU time; returns ns
/// (CPU) per query and the checksum of the first full pass (or of what ran, if less).
fn measure(queries: &[UserVa], budget: Duration, mut f: impl FnMut(&[UserVa]) -> u64) -> (f64, u64, bool) {
    // Chunks of 4 096 queries between clock reads: a clock read is ~50 ns, about 1 % of a
    // chunk at 1 ns per query.
    const CHUNK: usize = 4096;
    let start = thread_cpu_time();
    let (mut done, mut sum, mut first) = (0usize, 0u64, None);
    while thread_cpu_time() - start < budget || done == 0 {
        for c in queries.chunks(CHUNK) {
            sum ^= f(c);
            done += c.len();
            if thread_cpu_time() - start >= budget {
                break;
            }
        }
        if done >= queries.len() && first.is_none() {
            first = Some(sum);
        }
    }
    let ns = (thread_cpu_time() - start).as_nanos() as f64 / done as f64;
    (ns, black_box(first.unwrap_or(sum)), first.is_some())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One region count: both designs, `rounds` alternating measurements each.
fn one(n: usize, args: &PinArgs, report: &mut Report) -> Result<(), String> {
    let e = |what: &'static str| move |err: busdma::Error| format!("bench pin ({n} regions): {what}: {err}");
    let span = (n as u64 * PAGE_SIZE).div_ceil(HUGE) * HUGE;
    // RAM for the space plus 16 MiB for the model's own needs, rounded to 2 MiB.
    let ram = span + (16 << 20);
    let m = HostPlatform::new(MachineConfig::with_ram(ram)).map_err(e("machine"))?;
    let us = UserSpace::new(&m);
    us.map_huge(UserVa::new(UA_BASE), span).map_err(e("map"))?;
    let reg = Registry::new(&us, u64::MAX).map_err(e("registry"))?;
    let mut list = LinearList { head: None };
    for i in 0..n as u64 {
        let ua = UserVa::new(UA_BASE + i * PAGE_SIZE);
        reg.register(ua, PAGE_SIZE).map_err(e("register"))?;
        let g = reg.read();
        let region = g.find(ua).ok_or_else(|| format!("region {i} not found after registering"))?;
        list.push(ua.raw(), region.hpas());
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut run_start = 0;
    let queries: Vec<UserVa> = (0..QUERIES as u64)
        .map(|q| {
            let r = rng.next();
            let page = match args.pattern {
                Pattern::Random => r % n as u64,
                Pattern::Runs => {
                    if q % RUN == 0 {
                        run_start = r % n as u64;
                    }
                    (run_start + q % RUN) % n as u64
                }
            };
            UserVa::new(UA_BASE + page * PAGE_SIZE + ((r >> 40) & (PAGE_SIZE - 1)))
        })
        .collect();
    let budget = Duration::from_secs_f64(args.seconds);
    let batch = args.batch.max(1);
    let (mut busdma_ns, mut batch_ns, mut list_ns) = (Vec::new(), Vec::new(), Vec::new());
    let mut tree_ns = Vec::new();
    let mut out = vec![PhysAddr::new(0); batch];
    for round in 0..args.rounds.max(1) {
        eprintln!("bench pin: {n} regions, round {}", round + 1);
        let (ns, a, _) = measure(&queries, budget, |c| {
            let mut acc = 0;
            for b in c.chunks(batch) {
                let g = reg.read();
                for &ua in b {
                    acc ^= g.ua_to_pa(ua, PAGE_SHIFT).map_or(1, |pa| pa.raw());
                }
            }
            acc
        });
        busdma_ns.push(ns);
        let (ns, t, _) = measure(&queries, budget, |c| {
            let mut acc = 0;
            for b in c.chunks(batch) {
                let g = reg.read();
                for &ua in b {
                    acc ^= g.ua_to_pa_tree(ua, PAGE_SHIFT).map_or(1, |pa| pa.raw());
                }
            }
            acc
        });
        tree_ns.push(ns);
        if a != t {
            return Err(format!("bench pin ({n} regions): page index and interval index disagree"));
        }
        let (ns, a2, _) = measure(&queries, budget, |c| {
            let mut acc = 0;
            for b in c.chunks(batch) {
                let g = reg.read();
                let out = &mut out[..b.len()];
                match g.ua_to_pa_batch(b, PAGE_SHIFT, out) {
                    Ok(()) => acc = out.iter().fold(acc, |acc, pa| acc ^ pa.raw()),
                    Err(_) => acc ^= 1,
                }
            }
            acc
        });
        batch_ns.push(ns);
        if a != a2 {
            return Err(format!("bench pin ({n} regions): single and batched translations disagree"));
        }
        let (ns, b, full) = measure(&queries, budget, |c| {
            c.iter().fold(0, |acc, &ua| acc ^ list.ua_to_pa(ua.raw()).map_or(1, |pa| pa.raw()))
        });
        list_ns.push(ns);
        // Both designs answered the same queries: compare when both made a full pass.
        if full && a != b {
            return Err(format!("bench pin ({n} regions): busdma and linear-list disagree"));
        }
    }
    // Spot-check agreement on the first queries whatever the list's speed.
    let g = reg.read();
    for &ua in queries.iter().take(256) {
        if g.ua_to_pa(ua, PAGE_SHIFT).ok() != list.ua_to_pa(ua.raw()) {
            return Err(format!("bench pin ({n} regions): designs disagree at {ua:?}"));
        }
    }
    drop(g);
    report.push(json!({"impl": "busdma", "regions": n, "ns_per_lookup": median(busdma_ns)}));
    report.push(json!({"impl": "busdma-tree", "regions": n, "ns_per_lookup": median(tree_ns)}));
    report.push(json!({"impl": "busdma-batch", "regions": n, "ns_per_lookup": median(batch_ns)}));
    report.push(json!({"impl": "linear-list", "regions": n, "ns_per_lookup": median(list_ns)}));
    Ok(())
}

/// Runs the benchmark and prints its report.
pub fn run(args: &PinArgs) -> Result<(), String> {
    let mut report = Report::new();
    for &n in &args.regions {
        if n == 0 {
            return Err("bench pin: --regions must be positive".into());
        }
        one(n, args, &mut report)?;
    }
    report.print(args.common.json);
    Ok(())
}
