//! Instruction counts of the IOVA allocator beyond its 4-page fast path (which
//! `examples/icount.rs` counts alone, so no other caller changes how it is inlined), for
//! callgrind.
//!
//! `cargo build --release -p dmalab --example icount_iova`, then
//! `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*icount_iova::hot*'
//! target/release/examples/icount_iova <path> <ops>`. Warm-up is counted with the path: run
//! `<ops>` = N and 2N and divide the difference of the `Collected` totals by N.
//!
//! - `frag`: `dmalab bench iova --patterns frag`'s step: a ring of 16 ranges, each step frees
//!   the oldest and allocates 1-16 pages (xorshift sizes), per-CPU caches on.
//! - `tree-1k`, `tree-100k`: the tree alone (no per-CPU caches): a 1-page alloc + free pair
//!   among 1 000 / 100 000 live 1-page ranges separated by 1-page holes.
//! - `cross`: timed only (not a callgrind path): CPU 0's thread allocates batches of 256 1-page
//!   ranges, CPU 1's thread frees each batch (a transmit completion on another core), the two
//!   taking turns; prints each side's CPU ns per range.
//! - `tree-ring-1k`, `tree-ring-100k`: the same spaces, but each step frees the oldest of 16
//!   ranges in flight and allocates one (a NIC ring on the tree: never the range just
//!   allocated, so the tree's retake of the last freed node does not apply).
#![allow(missing_docs)]

use std::hint::black_box;

#[path = "shared/timing.rs"]
mod timing;
use timing::{Timer, thread_cpu_ns};

use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::{AddrRange, Iova, Platform};
use busdma_model::{HostPlatform, MachineConfig};

#[inline(never)]
fn hot_frag(m: &HostPlatform, a: &IovaAllocator, ring: &mut [Option<AddrRange<Iova>>], ops: usize) {
    let g = m.pin_cpu();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..ops {
        let slot = i % ring.len();
        if let Some(r) = ring[slot].take() {
            a.free(&g, black_box(r)).expect("free");
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ring[slot] = Some(a.alloc(&g, &IovaRequest::pages(1 + x % 16)).expect("alloc"));
    }
}

#[inline(never)]
fn hot_tree(m: &HostPlatform, a: &IovaAllocator, ops: usize) {
    let g = m.pin_cpu();
    let req = IovaRequest::pages(1);
    for _ in 0..ops {
        let r = a.alloc(&g, &req).expect("alloc");
        a.free(&g, black_box(r)).expect("free");
    }
}

#[inline(never)]
fn hot_ring(m: &HostPlatform, a: &IovaAllocator, ring: &mut [Option<AddrRange<Iova>>], ops: usize) {
    let g = m.pin_cpu();
    let req = IovaRequest::pages(1);
    for i in 0..ops {
        let slot = i % ring.len();
        if let Some(r) = ring[slot].take() {
            a.free(&g, black_box(r)).expect("free");
        }
        ring[slot] = Some(a.alloc(&g, &req).expect("alloc"));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map(String::as_str).unwrap_or("frag");
    let ops: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(32_000);
    let m =
        HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(16 << 20) }).expect("machine");
    let _b = m.bind_cpu(0).expect("bind");
    let space = AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 40)).expect("space");
    let live = match path {
        "frag" => {
            let a = IovaAllocator::new(space, IovaConfig { cpus: 2, caches: true, guard_page: false })
                .expect("iova");
            let mut ring = vec![None; 16];
            hot_frag(&m, &a, &mut ring, 4096); // every size class cached
            hot_frag(&m, &a, &mut ring, ops);
            return;
        }
        "cross" => {
            drop(_b);
            cross(&m, space, ops);
            return;
        }
        "tree-1k" | "tree-ring-1k" => 1_000,
        "tree-100k" | "tree-ring-100k" => 100_000,
        other => panic!("unknown path {other}: frag, tree-1k, tree-100k, tree-ring-1k, tree-ring-100k"),
    };
    let a =
        IovaAllocator::new(space, IovaConfig { cpus: 2, caches: false, guard_page: false }).expect("iova");
    let g = m.pin_cpu();
    let all: Vec<_> = (0..2 * live).map(|_| a.alloc(&g, &IovaRequest::pages(1)).expect("alloc")).collect();
    for r in all.into_iter().skip(1).step_by(2) {
        a.free(&g, r).expect("free");
    }
    drop(g);
    if path.starts_with("tree-ring") {
        let mut ring = vec![None; 16];
        hot_ring(&m, &a, &mut ring, 64); // the ring full
        let t = Timer::start();
        hot_ring(&m, &a, &mut ring, ops);
        t.report("tree-ring", 1, live, ops);
        return;
    }
    let t = Timer::start();
    hot_tree(&m, &a, ops);
    t.report("tree", 1, live, ops);
}

/// The `cross` path: allocations on CPU 0, their frees on CPU 1, in turns of `BATCH`.
fn cross(m: &HostPlatform, space: AddrRange<Iova>, ops: usize) {
    const BATCH: usize = 256;
    let a = IovaAllocator::new(space, IovaConfig { cpus: 2, caches: true, guard_page: false }).expect("iova");
    let (to_free, freed) = (std::sync::Mutex::new(Vec::new()), std::sync::Barrier::new(2));
    let rounds = ops.div_ceil(BATCH);
    let (alloc_ns, free_ns) = std::thread::scope(|s| {
        let allocator = s.spawn(|| {
            let _b = m.bind_cpu(0).expect("bind 0");
            let mut cpu = 0;
            for _ in 0..rounds {
                let t = thread_cpu_ns();
                let g = m.pin_cpu();
                let batch: Vec<_> =
                    (0..BATCH).map(|_| a.alloc(&g, &IovaRequest::pages(1)).expect("alloc")).collect();
                drop(g);
                cpu += thread_cpu_ns() - t;
                *to_free.lock().unwrap() = batch;
                freed.wait(); // handed over
                freed.wait(); // freed
            }
            cpu
        });
        let freer = s.spawn(|| {
            let _b = m.bind_cpu(1).expect("bind 1");
            let mut cpu = 0;
            for _ in 0..rounds {
                freed.wait();
                let batch = core::mem::take(&mut *to_free.lock().unwrap());
                let t = thread_cpu_ns();
                let g = m.pin_cpu();
                for r in batch {
                    a.free(&g, black_box(r)).expect("free");
                }
                drop(g);
                cpu += thread_cpu_ns() - t;
                freed.wait();
            }
            cpu
        });
        (allocator.join().expect("allocator"), freer.join().expect("freer"))
    });
    let n = (rounds * BATCH) as f64;
    println!(
        "{{\"impl\":\"busdma\",\"mode\":\"cross\",\"pairs\":{},\"alloc_cpu_ns\":{:.2},\"free_cpu_ns\":{:.2}}}",
        rounds * BATCH,
        alloc_ns as f64 / n,
        free_ns as f64 / n
    );
}
