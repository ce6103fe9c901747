//! Fuzz target 2: page-table op sequences against a reference map and the model walker.
//!
//! Every op is applied to a real `PageTable` (VT-d second level or Arm LPAE stage 1, 39- or
//! 48-bit input) and to a `BTreeMap` of page → (frame, writable). After each op: the op
//! succeeded exactly when the reference says it may (map over nothing mapped; unmap of
//! everything mapped); a failed op changed nothing; `iova_to_phys` and the model IOMMU's
//! hardware walk (reading the tables from RAM, no IOTLB) agree with the reference on every
//! touched page and its neighbours, permissions included; no table page leaks when the table
//! is dropped.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use busdma::pgtable::{
    ArmLpaeS1, FlushDone, Gather, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl,
};
use busdma::{AddrRange, Iova, PAGE_SIZE, PhysAddr};
use busdma_model::{Context, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat};
use libfuzzer_sys::fuzz_target;

const TWO_MB: u64 = 512;

#[derive(Arbitrary, Debug)]
enum Op {
    Map { page: u32, pages: u16, frame: u32, write: bool, huge: bool },
    Unmap { page: u32, pages: u16, huge: bool },
    MapTop { frame: u32 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    lpae: bool,
    wide: bool,
    ops: Vec<Op>,
}

fn machine() -> &'static HostPlatform {
    static M: OnceLock<HostPlatform> = OnceLock::new();
    M.get_or_init(|| {
        HostPlatform::new(MachineConfig {
            ram_size: 64 << 20,
            direct_map_size: 64 << 20,
            cpus: 1,
            ..MachineConfig::default()
        })
        .expect("machine")
    })
}

fn run<F: PteFormat>(input: &Input, format: TableFormat) {
    let m = machine();
    let bits = if input.wide { 48 } else { 39 };
    let pool = TablePool::new(m);
    let table: PageTable<'_, _, F> =
        PageTable::new(&pool, PageTableConfig { input_bits: bits, coherent_walker: true }).unwrap();
    let iommu = ModelIommu::new(m, IommuConfig { iotlb_entries: 0, ..IommuConfig::default() }).unwrap();
    // SAFETY: the tables live until the end of the run, after the device's last DMA.
    unsafe { iommu.attach(7, Context::new(1, table.root(), format, bits)).unwrap() };
    let top_page = (1u64 << bits) / PAGE_SIZE - 1;
    // Pages live in a window of 4 GiB of IOVA (and of frames), so ops collide often.
    let window = 1u64 << 20;
    let mut reference: BTreeMap<u64, (u64, bool)> = BTreeMap::new();
    let mut touched = Vec::new();
    let g = busdma::Platform::pin_cpu(m);
    for op in input.ops.iter().take(64) {
        touched.clear();
        match *op {
            Op::Map { page, pages, frame, write, huge } => {
                let (mut p, mut n, mut f) = (
                    u64::from(page) % window,
                    u64::from(pages) % 1100 + 1,
                    u64::from(frame) % window + 0x1000,
                );
                if huge {
                    p = p / TWO_MB * TWO_MB;
                    f = f / TWO_MB * TWO_MB + TWO_MB;
                    n = TWO_MB * (n % 3 + 1);
                }
                let free = (p..p + n).all(|q| !reference.contains_key(&q));
                // SAFETY: the fuzz target owns this table's IOVA; no device walks it, so the PA is inert.
                let r = unsafe {
                    table.map(
                        &g,
                        Iova::new(p * PAGE_SIZE),
                        PhysAddr::new(f * PAGE_SIZE),
                        n * PAGE_SIZE,
                        Prot::rw(true, write),
                    )
                };
                assert_eq!(r.is_ok(), free, "map {op:?}: {r:?}");
                if r.is_ok() {
                    for q in 0..n {
                        reference.insert(p + q, (f + q, write));
                    }
                }
                touched.extend([p.saturating_sub(1), p, p + n / 2, p + n - 1, p + n]);
            }
            Op::Unmap { page, pages, huge } => {
                let (mut p, mut n) = (u64::from(page) % window, u64::from(pages) % 1100 + 1);
                if huge {
                    p = p / TWO_MB * TWO_MB;
                }
                if huge && n > TWO_MB {
                    n = TWO_MB;
                }
                let all = (p..p + n).all(|q| reference.contains_key(&q));
                let range = AddrRange::from_start_len(Iova::new(p * PAGE_SIZE), n * PAGE_SIZE).unwrap();
                let mut gather = Gather::new();
                // SAFETY: the fuzz target owns this table's IOVA; no device walks it, so the PA is inert.
                let r = unsafe { table.unmap(&g, range, &mut gather) };
                assert_eq!(r.is_ok(), all, "unmap {op:?}: {r:?}");
                if r.is_ok() {
                    for q in p..p + n {
                        reference.remove(&q);
                    }
                    let covered = gather.range().expect("an unmap gathers its range");
                    assert!(covered.contains_range(&range), "gather {covered:?} misses {range:?}");
                    // SAFETY: no IOTLB in this model configuration, so nothing caches the
                    // cleared range: the "invalidation" is complete by construction.
                    let proof = unsafe { FlushDone::for_range(covered) };
                    gather.release_after_flush(proof, &pool, &g).unwrap();
                } else {
                    assert!(gather.is_empty(), "a failed unmap gathered something");
                }
                touched.extend([p.saturating_sub(1), p, p + n / 2, p + n - 1, p + n]);
            }
            Op::MapTop { frame } => {
                let f = u64::from(frame) % window;
                let free = !reference.contains_key(&top_page);
                // SAFETY: the fuzz target owns this table's IOVA; no device walks it, so the PA is inert.
                let r = unsafe {
                    table.map(
                        &g,
                        Iova::new(top_page * PAGE_SIZE),
                        PhysAddr::new(f * PAGE_SIZE),
                        PAGE_SIZE,
                        Prot::READ,
                    )
                };
                assert_eq!(r.is_ok(), free, "map of the last page: {r:?}");
                if r.is_ok() {
                    reference.insert(top_page, (f, false));
                }
                // One past the input width is refused.
                // SAFETY: the fuzz target owns this table's IOVA; no device walks it, so the PA is inert.
                let beyond = unsafe {
                    table.map(
                        &g,
                        Iova::new((top_page + 1) * PAGE_SIZE),
                        PhysAddr::new(0),
                        PAGE_SIZE,
                        Prot::READ,
                    )
                };
                assert!(beyond.is_err(), "a map beyond the input width was accepted");
                touched.extend([top_page, top_page - 1]);
            }
        }
        for &q in &touched {
            let iova = Iova::new(q * PAGE_SIZE + 0x18);
            let want = reference.get(&q).copied();
            let sw = table.iova_to_phys(iova);
            assert_eq!(
                sw,
                want.map(|(f, _)| PhysAddr::new(f * PAGE_SIZE + 0x18)),
                "iova_to_phys of page {q:#x}"
            );
            let hw_read = iommu.translate(7, iova, false).ok();
            assert_eq!(hw_read, sw, "hardware walk (read) of page {q:#x}");
            let hw_write = iommu.translate(7, iova, true).is_ok();
            assert_eq!(hw_write, want.is_some_and(|(_, w)| w), "hardware walk (write) of page {q:#x}");
        }
    }
    // Tear down: unmap everything, release, and every table page but the root goes back.
    let pages: Vec<u64> = reference.keys().copied().collect();
    for q in pages {
        let range = AddrRange::from_start_len(Iova::new(q * PAGE_SIZE), PAGE_SIZE).unwrap();
        let mut gather = Gather::new();
        // SAFETY: the fuzz target owns this table's IOVA; no device walks it, so the PA is inert.
        unsafe { table.unmap(&g, range, &mut gather) }.unwrap();
        // SAFETY: as above, no IOTLB.
        let proof = unsafe { FlushDone::for_range(gather.range().unwrap()) };
        gather.release_after_flush(proof, &pool, &g).unwrap();
    }
    drop(g);
    drop(table);
    let _ = iommu.take_faults();
}

fuzz_target!(|input: Input| {
    if input.lpae {
        run::<ArmLpaeS1>(&input, TableFormat::ArmLpaeStage1);
    } else {
        run::<VtdSl>(&input, TableFormat::VtdSecondLevel);
    }
});
