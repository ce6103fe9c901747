//! `dmalab bench bounce`: the cost of bounce copies and of quick maps.
//!
//! One machine, one run, designs side by side: for each size (1500 B, 4 KiB, 64 KiB) it
//! measures
//! - `memcpy`: a plain copy between two direct-mapped buffers, the limit;
//! - `direct-map`: a bounced load's PREWRITE sync when the client is in the direct map (the
//!   copy goes through the direct map on both sides);
//! - `quick-map`: the same when the client is outside the direct map (each client page is
//!   quick-mapped into the CPU's window, a real `mmap(MAP_FIXED)` on the model);
//!
//! and the cost of one quick-map enter + remove, for a page outside the direct map
//! (`quick-map-enter-remove`) and, for comparison, inside it (`direct-map-enter-remove`).
//!
//! Measurements are interleaved: each round measures every row once, and the reported value
//! is the median over rounds, so a burst of noise from other processes hits all rows alike.
//! `gbps` is 10^9 bits per second of buffer bytes copied.

use std::time::Instant;

use busdma::bounce::{BounceLoad, BounceZone, ClientSeg, Constraint, ZoneConfig, ZoneKey};
use busdma::quickmap::QuickMaps;
use busdma::{PAGE_SIZE, PhysAddr, Placement, Platform, SyncOp};
use busdma_model::{FrameRequest, HostPlatform, MachineConfig};
use clap::Args;
use serde_json::{Value, json};
use std::sync::Arc;

/// Options of `dmalab bench bounce`.
#[derive(Args, Debug, Clone)]
pub struct BounceArgs {
    /// Rounds (each measures every row once; the median is reported).
    #[arg(long, default_value_t = 15)]
    pub rounds: usize,
    /// Target time per row per round, in microseconds.
    #[arg(long, default_value_t = 2000)]
    pub us_per_row: u64,
}

/// Buffer sizes measured: an Ethernet frame, a page, a large block I/O.
pub const SIZES: [u64; 3] = [1500, 4096, 65536];

/// The machine: 256 MiB of RAM, the first 128 MiB direct-mapped.
fn machine() -> Result<HostPlatform, String> {
    let c = MachineConfig {
        ram_size: 256 << 20,
        direct_map_size: 128 << 20,
        cpus: 2,
        ..MachineConfig::default()
    };
    HostPlatform::new(c).map_err(|e| format!("cannot build the machine model: {e}"))
}

/// Runs `f` (which does `per` bytes or operations) enough times to last about `us`; returns
/// nanoseconds per call.
fn time(us: u64, mut f: impl FnMut()) -> f64 {
    // Calibrate: one call, then a batch sized to the target.
    let t = Instant::now();
    f();
    let one = t.elapsed().as_nanos().max(1) as u64;
    let n = ((us * 1000) / one).clamp(1, 1_000_000);
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the bench; returns the rows.
pub fn run(args: &BounceArgs) -> Result<Vec<Value>, String> {
    let m = machine()?;
    let _bind = m.bind_cpu(0).map_err(|e| format!("bind CPU 0: {e}"))?;
    let qm = QuickMaps::for_platform(&m);
    let start = m.ram().start().raw();
    let e = |e: busdma::Error| e.to_string();
    // The device reaches the first 64 MiB: clients at +96 MiB (direct-mapped) and +192 MiB
    // (outside the direct map) must bounce, into direct-mapped pages below +64 MiB.
    let key = ZoneKey::below(Some(PhysAddr::new(start + (64 << 20))));
    let c = Constraint { below: key.below, excluded: None, align: 1, untrusted_granule: None };
    let config = ZoneConfig { placement: Placement::DirectMapped, ..ZoneConfig::default() };
    let zone = Arc::new(BounceZone::new(&m, key, config).map_err(e)?);
    // Every size, near and far, loaded at once: 2 × (1 + 1 + 16) pages.
    zone.grow_for_map(2 * (1 + 1 + 65536 / PAGE_SIZE)).map_err(e)?;
    let pages = 65536 / PAGE_SIZE + 1;
    let at = |off: u64, placement| {
        let below = Some(PhysAddr::new(start + off + (32 << 20)));
        let mut held = Vec::new();
        let mut k = off / PAGE_SIZE;
        while k > 0 {
            match m
                .frames()
                .alloc(FrameRequest { below: Some(PhysAddr::new(start + off)), ..FrameRequest::pages(k) })
            {
                Ok(pa) => held.push((pa, k)),
                Err(_) => k /= 2,
            }
        }
        let r = m.frames().alloc(FrameRequest { below, placement, ..FrameRequest::pages(pages) });
        for (pa, k) in held {
            let _ = m.frames().free(pa, k);
        }
        r.map_err(e)
    };
    let near = at(96 << 20, Placement::DirectMapped)?;
    let far = at(192 << 20, Placement::NotDirectMapped)?;
    if m.phys_to_kva(far).is_some() || m.phys_to_kva(near).is_none() {
        return Err("bench machine layout is not as intended".into());
    }
    // memcpy between two direct-mapped buffers (the client and a spare run).
    let spare = at(100 << 20, Placement::DirectMapped)?;
    let (src, dst) = (
        m.phys_to_kva(near).ok_or("near buffer not direct-mapped")?.raw() as *const u8,
        m.phys_to_kva(spare).ok_or("spare buffer not direct-mapped")?.raw() as *mut u8,
    );
    m.fill_phys(near, pages * PAGE_SIZE, 0x5a).map_err(e)?;
    m.fill_phys(far, pages * PAGE_SIZE, 0xa5).map_err(e)?;

    let mut loads = Vec::new();
    for &bytes in &SIZES {
        // Client buffers start 64 bytes into a page, as a received frame usually does.
        let n = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(PhysAddr::new(near.raw() + 64), bytes)], &c);
        let f = BounceLoad::load(&zone, &qm, &[ClientSeg::phys(PhysAddr::new(far.raw() + 64), bytes)], &c);
        loads.push((bytes, n.map_err(e)?, f.map_err(e)?));
    }
    let qpage = far;
    let dpage = near;
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len() * 3 + 2];
    for round in 0..args.rounds {
        eprintln!("bench bounce: round {}/{}", round + 1, args.rounds);
        for (i, (bytes, near_load, far_load)) in loads.iter().enumerate() {
            let b = *bytes as usize;
            samples[i * 3].push(time(args.us_per_row, || {
                // SAFETY: both buffers are direct-mapped runs of 17 pages we own, b ≤ 64 KiB + 64.
                unsafe { std::ptr::copy_nonoverlapping(src.add(64), dst.add(64), b) };
                std::hint::black_box(dst);
            }));
            samples[i * 3 + 1].push(time(args.us_per_row, || {
                let _ = std::hint::black_box(near_load.sync(&m, SyncOp::PREWRITE));
            }));
            samples[i * 3 + 2].push(time(args.us_per_row, || {
                let _ = std::hint::black_box(far_load.sync(&m, SyncOp::PREWRITE));
            }));
        }
        let g = m.pin_cpu();
        let k = SIZES.len() * 3;
        samples[k].push(time(args.us_per_row, || {
            let q = qm.enter(&g, qpage).expect("quick map of RAM");
            std::hint::black_box(q.kva());
        }));
        samples[k + 1].push(time(args.us_per_row, || {
            let q = qm.enter(&g, dpage).expect("quick map of RAM");
            std::hint::black_box(q.kva());
        }));
    }
    // The copies really happened: the bounce pages hold the clients' bytes.
    for (_, near_load, far_load) in &loads {
        for (l, byte) in [(near_load, 0x5a), (far_load, 0xa5)] {
            let s = l.segments()[0];
            let mut b = vec![0; s.len as usize];
            m.read_phys(s.addr, &mut b).map_err(e)?;
            if b.iter().any(|&x| x != byte) {
                return Err("a bounce copy did not copy".into());
            }
        }
    }
    let mut rows = Vec::new();
    for (i, &bytes) in SIZES.iter().enumerate() {
        for (j, path) in ["memcpy", "direct-map", "quick-map"].iter().enumerate() {
            let ns = median(samples[i * 3 + j].clone());
            rows.push(json!({"path": path, "bytes": bytes, "gbps": bytes as f64 * 8.0 / ns}));
        }
    }
    let k = SIZES.len() * 3;
    rows.push(json!({"path": "quick-map-enter-remove", "ns_per_op": median(samples[k].clone())}));
    rows.push(json!({"path": "direct-map-enter-remove", "ns_per_op": median(samples[k + 1].clone())}));
    Ok(rows)
}
