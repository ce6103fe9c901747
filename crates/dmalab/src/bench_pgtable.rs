//! `dmalab bench pgtable`: IO page-table map and unmap cost per page, busdma's walker beside
//! Google's `aarch64-paging` building the same Arm LPAE stage-1 mappings, in one run.
//!
//! Workload, per (impl, format, leaves, pages): one table, kept across rounds (the steady
//! state of an IOMMU domain, whose upper tables mostly exist). A round maps `ops` runs of
//! `pages` pages at consecutive `pages`-aligned IOVAs (timed as one batch), then unmaps them
//! (timed as one batch). `ns_per_page` is the median over rounds of batch time / (ops ×
//! pages); a first warm-up round is not counted. Batches keep the clock's cost (~20 ns a
//! read) out of 1-page figures.
//!
//! - `leaves = "4k"`: 4 KiB pages only (busdma `with_max_leaf(4K)`, aarch64-paging
//!   `Constraints::NO_BLOCK_MAPPINGS`): the like-for-like comparison.
//! - `leaves = "blocks"`: both may use 2 MiB / 1 GiB blocks where runs are aligned (a
//!   512-page run becomes one entry; a 262 144-page run one 1 GiB entry).
//! - busdma's unmap includes gathering and releasing the freed table pages to the pool
//!   (zeroing them) as after a completed flush; the IOTLB invalidation itself is not part of
//!   this benchmark (no IOMMU walks these tables). aarch64-paging's unmap invalidates every
//!   leaf with `modify_range` and keeps its tables, so its next map reuses them (its best
//!   case: no allocation); busdma's unmap of a range covering whole tables frees them, and
//!   its next map takes them back from the pool.
//! - Both build 48-bit (4-level) tables; busdma's pages come from its per-CPU pool over the
//!   machine model's RAM, aarch64-paging's from the Rust global allocator.

use std::time::Instant;

use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{Attributes, Constraints, MemoryRegion, TranslationRegime};
use busdma::pgtable::{
    ArmLpaeS1, FlushDone, Gather, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl,
};
use busdma::{AddrRange, Iova, PAGE_SIZE, PageSize, PhysAddr, Platform};
use busdma_model::HostPlatform;
use clap::Args;
use serde::Serialize;

/// Options of `dmalab bench pgtable`.
#[derive(Args, Debug, Clone)]
pub struct PgtableArgs {
    /// Timed rounds per configuration (after one warm-up round); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Run sizes in pages (default: 1, 512 and 262144).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1u64, 512, 262_144])]
    pub pages: Vec<u64>,
}

/// One result row.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    #[serde(rename = "impl")]
    pub imp: &'static str,
    pub format: &'static str,
    pub leaves: &'static str,
    pub op: &'static str,
    pub pages: u64,
    pub ops: u64,
    pub ns_per_page: f64,
}

/// First IOVA of the workload: 1 GiB, so a 262 144-page run is 1 GiB-aligned (a block when
/// blocks are allowed).
const BASE: u64 = 1 << 30;
/// PA the runs map to: 64 GiB, 1 GiB-aligned, below both formats' output widths.
const PA: u64 = 64 << 30;
/// Pages mapped per timed batch: 4096 one-page runs, 64 of 512, 1 of 262 144; at least
/// 4096 pages per batch keeps the clock under 0.01 ns a page.
fn ops_for(pages: u64) -> u64 {
    (4096 / pages).max(1)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `round` (returning map and unmap batch times in ns) `rounds + 1` times.
fn measure(
    rounds: usize,
    mut round: impl FnMut() -> Result<(f64, f64), String>,
) -> Result<(f64, f64), String> {
    round()?; // warm-up
    let (mut m, mut u) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        let (a, b) = round()?;
        m.push(a);
        u.push(b);
    }
    Ok((median(m), median(u)))
}

fn busdma<F: PteFormat>(
    m: &HostPlatform,
    pool: &TablePool<'_, HostPlatform>,
    leaves: PageSize,
    pages: u64,
    rounds: usize,
) -> Result<(f64, f64), String> {
    let cfg = PageTableConfig { input_bits: 48, coherent_walker: true };
    let pt = PageTable::<_, F>::new(pool, cfg).map_err(|e| format!("page table: {e}"))?.with_max_leaf(leaves);
    let g = m.pin_cpu();
    let ops = ops_for(pages);
    let len = pages * PAGE_SIZE;
    let mut gather = Gather::new();
    measure(rounds, || {
        let t0 = Instant::now();
        for i in 0..ops {
            // SAFETY: the benchmark owns this table's IOVA; no device walks it, so the PA is inert.
            unsafe {
                pt.map(&g, Iova::new(BASE + i * len), PhysAddr::new(PA + i * len), len, Prot::READ_WRITE)
            }
            .map_err(|e| format!("busdma map: {e}"))?;
        }
        let t1 = Instant::now();
        for i in 0..ops {
            let r = AddrRange::from_start_len(Iova::new(BASE + i * len), len).map_err(|e| e.to_string())?;
            // SAFETY: the benchmark owns this table's IOVA; no device walks it, so the PA is inert.
            unsafe { pt.unmap(&g, r, &mut gather) }.map_err(|e| format!("busdma unmap: {e}"))?;
            // SAFETY: no IOMMU walks this benchmark's tables, so the "invalidation" is complete.
            let proof = unsafe { FlushDone::for_range(r) };
            gather.release_after_flush(proof, pool, &g).map_err(|e| e.to_string())?;
        }
        let t2 = Instant::now();
        Ok(((t1 - t0).as_nanos() as f64, (t2 - t1).as_nanos() as f64))
    })
}

/// The same stage-1 attributes busdma's `ArmLpaeS1` writes for read-write: AttrIndx 0, inner
/// shareable, AP\[1\] (unprivileged), AF, PXN, UXN, valid.
fn apg_flags() -> Attributes {
    Attributes::ATTRIBUTE_INDEX_0
        | Attributes::INNER_SHAREABLE
        | Attributes::USER
        | Attributes::ACCESSED
        | Attributes::PXN
        | Attributes::UXN
        | Attributes::VALID
}

fn aarch64_paging(blocks: bool, pages: u64, rounds: usize) -> Result<(f64, f64), String> {
    // Root level 0: 48-bit input, 4 levels, as busdma's table.
    let mut map = IdMap::new(1, 0, TranslationRegime::El1And0);
    let constraints = if blocks { Constraints::empty() } else { Constraints::NO_BLOCK_MAPPINGS };
    let ops = ops_for(pages);
    let len = (pages * PAGE_SIZE) as usize;
    let base = BASE as usize;
    measure(rounds, || {
        let t0 = Instant::now();
        for i in 0..ops as usize {
            let r = MemoryRegion::new(base + i * len, base + (i + 1) * len);
            map.map_range_with_constraints(&r, apg_flags(), constraints)
                .map_err(|e| format!("aarch64-paging map: {e:?}"))?;
        }
        let t1 = Instant::now();
        for i in 0..ops as usize {
            let r = MemoryRegion::new(base + i * len, base + (i + 1) * len);
            // Invalidate every leaf, keeping the tables (as busdma keeps tables a partial unmap
            // empties): the next round's map then reuses them, aarch64-paging's best case.
            map.modify_range(&r, &|_, d, level| {
                if level < 3 && d.is_table_or_page() {
                    Ok(()) // a table descriptor: kept
                } else {
                    d.modify_flags(Attributes::empty(), Attributes::VALID);
                    Ok(())
                }
            })
            .map_err(|e| format!("aarch64-paging unmap: {e:?}"))?;
        }
        let t2 = Instant::now();
        Ok(((t1 - t0).as_nanos() as f64, (t2 - t1).as_nanos() as f64))
    })
}

/// Runs the benchmark; one row per (impl, format, leaves, op, pages).
pub fn run(args: &PgtableArgs, m: &HostPlatform) -> Result<Vec<Row>, String> {
    let _bind = m.bind_cpu(0).map_err(|e| format!("bind cpu 0: {e}"))?;
    let pool = TablePool::new(m);
    let mut rows = Vec::new();
    for &pages in &args.pages {
        if pages == 0 || (BASE + pages * PAGE_SIZE * ops_for(pages)) > (1 << 47) {
            return Err(format!("bad run size {pages} pages"));
        }
        let ops = ops_for(pages);
        let per_page = |ns: f64| ns / (ops * pages) as f64;
        for (leaves, size, blocks) in [("4k", PageSize::Size4K, false), ("blocks", PageSize::Size1G, true)] {
            eprintln!("bench pgtable: {pages} pages, {leaves} leaves");
            let mut push = |imp: &'static str, format: &'static str, (map_ns, unmap_ns): (f64, f64)| {
                for (op, ns) in [("map", map_ns), ("unmap", unmap_ns)] {
                    rows.push(Row { imp, format, leaves, op, pages, ops, ns_per_page: per_page(ns) });
                }
            };
            push("busdma", ArmLpaeS1::NAME, busdma::<ArmLpaeS1>(m, &pool, size, pages, args.rounds)?);
            push("aarch64-paging", ArmLpaeS1::NAME, aarch64_paging(blocks, pages, args.rounds)?);
            push("busdma", VtdSl::NAME, busdma::<VtdSl>(m, &pool, size, pages, args.rounds)?);
        }
    }
    Ok(rows)
}
