//! `dmalab bench inval`: the cost of a map/unmap cycle under strict and deferred IOTLB
//! invalidation, side by side in one run, on the model IOMMU.
//!
//! Workload, per (policy, pages, latency): one domain (VT-d second level, 48-bit, IOVA
//! allocator with per-CPU caches) on the model IOMMU; an operation allocates IOVA for `pages`
//! pages, maps them, lets the device translate the first page (so the IOTLB holds it, as after
//! real DMA), and unmaps it giving the IOVA back. `ns_per_op` is the median over rounds of the
//! batch time / ops, after a warm-up round; `invalidations_per_op` counts the model's commands
//! (ranged + whole-domain), `wait_ns_per_op` the measured part of `ns_per_op` spent in the
//! assumed command latencies below (invalidations, and map requests under `viommu`; on a
//! loaded host a wait overshoots what was asked).
//!
//! `iommu_cost` names the model IOMMU's cost profile (`--iommu-cost`, a list; default `none`
//! and `vtd-queued`) and `inval_latency_ns` the time each invalidation command spins before
//! completing ([`busdma_model::IommuConfig::invalidation_latency_ns`]): `none` measures
//! busdma's own software cost; the others stand for a hardware round trip, an *assumed*
//! figure (the lab does not measure hardware; sources in busdma-model's `iommu/cost.rs`), to
//! show where deferred invalidation pays. `--inval-latency-ns` gives explicit latencies
//! instead (profile `custom`). Deferred uses the default bounds (256 unmaps or 10 ms per CPU queue).

use std::time::Instant;

use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest};
use busdma::pgtable::{PageTable, PageTableConfig, Prot, TablePool, VtdSl};
use busdma::{AddrRange, Iova, PhysAddr, Platform};
use busdma_model::{Context, HostPlatform, ModelIommu, TableFormat};
use clap::Args;
use serde::Serialize;

use crate::cost::Cost;

/// Options of `dmalab bench inval`.
#[derive(Args, Debug, Clone)]
pub struct InvalArgs {
    /// Map/unmap operations per timed round.
    #[arg(long, default_value_t = 20_000)]
    pub ops: u64,
    /// Timed rounds per configuration (after one warm-up round); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Pages per map.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1u64, 16])]
    pub pages: Vec<u64>,
    /// The model IOMMU's cost profiles to run (a list: none, vtd-register, vtd-queued,
    /// smmuv3, viommu).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["none".to_string(), "vtd-queued".to_string()])]
    pub iommu_cost: Vec<String>,
    /// Explicit invalidation latencies in ns instead of profiles (a list; profile `custom`).
    #[arg(long, alias = "inv-latency-ns", value_delimiter = ',')]
    pub inval_latency_ns: Vec<u64>,
}

impl InvalArgs {
    /// The costs to run, in order.
    pub fn costs(&self) -> Result<Vec<Cost>, String> {
        if !self.inval_latency_ns.is_empty() {
            return Ok(self.inval_latency_ns.iter().map(|&ns| Cost::custom(ns)).collect());
        }
        self.iommu_cost.iter().map(|n| Cost::profile(n)).collect()
    }
}

/// One result row.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    pub policy: &'static str,
    pub format: &'static str,
    pub pages: u64,
    #[serde(flatten)]
    pub cost: Cost,
    pub ops: u64,
    pub ns_per_op: f64,
    pub invalidations_per_op: f64,
    /// Of `ns_per_op`, the measured time spent in the assumed command latencies (invalidation
    /// and map requests).
    pub wait_ns_per_op: f64,
}

const DEV: u32 = 1;
/// The domain's IOVA space: 1 GiB at 4 GiB, far more than the workload holds at once.
const SPACE: (u64, u64) = (4 << 30, 1 << 30);
/// PA the maps point to: translation only, so it need not be RAM; 2 MiB-aligned.
const PA: u64 = 64 << 30;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn one(
    m: &HostPlatform,
    a: &InvalArgs,
    policy: InvalidationPolicy,
    pages: u64,
    cost: &Cost,
) -> Result<Row, String> {
    let e = |what: &str, err: busdma::Error| format!("{what}: {err}");
    let iommu = ModelIommu::new(m, cost.config()).map_err(|x| e("model IOMMU", x))?;
    let pool = TablePool::new(m);
    let pt = PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true })
        .map_err(|x| e("page table", x))?;
    let root = pt.root();
    let space = AddrRange::from_start_len(Iova::new(SPACE.0), SPACE.1).map_err(|x| e("space", x))?;
    let iova = IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: true, guard_page: false })
        .map_err(|x| e("IOVA allocator", x))?;
    let d = Domain::new(m, pt, iova, &iommu, DomainConfig { id: 1, policy, untrusted: false })
        .map_err(|x| e("domain", x))?;
    // SAFETY: `root` is `d`'s; `DEV` is detached below before `d` is dropped; on an early
    // return no DMA is issued before `d` and `iommu` are both dropped.
    unsafe { iommu.attach(DEV, Context::new(1, root, TableFormat::VtdSecondLevel, 48)) }
        .map_err(|x| e("attach", x))?;
    let req = IovaRequest::pages(pages);
    let mut times = Vec::new();
    for round in 0..=a.rounds {
        let before = iommu.stats();
        let g = m.pin_cpu();
        let t = Instant::now();
        for _ in 0..a.ops {
            let r = d.alloc_iova(&g, &req).map_err(|x| e("alloc_iova", x))?;
            // SAFETY: the benchmark owns the IOVA it allocated; the model device only translates it.
            unsafe { d.map(&g, r.start(), PhysAddr::new(PA), r.len(), Prot::READ_WRITE) }
                .map_err(|x| e("map", x))?;
            iommu.translate(DEV, r.start(), true).map_err(|f| format!("device: {f}"))?;
            // SAFETY: the benchmark owns the IOVA it allocated; the model device only translates it.
            unsafe { d.unmap(&g, &[r], &[r]) }.map_err(|x| e("unmap", x))?;
        }
        let ns = t.elapsed().as_nanos() as f64 / a.ops as f64;
        d.flush(&g).map_err(|x| e("flush", x))?;
        drop(g);
        if round > 0 {
            let after = iommu.stats();
            let cmds = (after.inv_range + after.inv_domain) - (before.inv_range + before.inv_domain);
            let wait =
                ((after.inv_wait_ns + after.map_wait_ns) - (before.inv_wait_ns + before.map_wait_ns)) as f64;
            times.push((ns, cmds as f64 / a.ops as f64, wait / a.ops as f64));
        }
    }
    iommu.detach(DEV).map_err(|x| e("detach", x))?;
    drop(d);
    let inv = median(times.iter().map(|t| t.1).collect());
    let wait = median(times.iter().map(|t| t.2).collect());
    Ok(Row {
        policy: match policy {
            InvalidationPolicy::Strict => "strict",
            InvalidationPolicy::Deferred { .. } => "deferred",
        },
        format: "vtd-sl",
        pages,
        cost: cost.clone(),
        ops: a.ops,
        ns_per_op: median(times.into_iter().map(|t| t.0).collect()),
        invalidations_per_op: inv,
        wait_ns_per_op: wait,
    })
}

/// Runs every configuration.
pub fn run(a: &InvalArgs, m: &HostPlatform) -> Result<Vec<Row>, String> {
    if a.ops == 0 || a.rounds == 0 {
        return Err("--ops and --rounds must be at least 1".into());
    }
    let mut rows = Vec::new();
    for cost in a.costs()? {
        for &pages in &a.pages {
            for policy in [InvalidationPolicy::Strict, InvalidationPolicy::deferred()] {
                eprintln!(
                    "bench inval: {policy:?}, {pages} pages, {} ({} ns per command)",
                    cost.iommu_cost, cost.inval_latency_ns
                );
                rows.push(one(m, a, policy, pages, &cost)?);
            }
        }
    }
    Ok(rows)
}
