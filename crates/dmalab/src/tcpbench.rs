//! `dmalab tcpbench`: seed 002's single-stream tcpbench, every DMA-mapping design side by side.
//!
//! # The workload
//!
//! A model NIC transmits a stream of packets. Each packet is a chain of `segments` fragments
//! (by default 3, 1500 bytes in all: a 66-byte header and two payload fragments, each in its
//! own page, like an mbuf chain). Each worker thread (bound to one model CPU) owns a transmit
//! ring of `ring` descriptors (default 256), each holding a loaded DMA map. For every packet:
//!
//! 1. if the ring slot is still in flight, the NIC *transmits* it: it DMA-reads every segment
//!    of the slot's map through its port (the model IOMMU, or straight to RAM for
//!    passthrough) and checks every byte against what was sent; then the driver syncs
//!    (POSTWRITE) and unloads the map;
//! 2. the driver stamps the packet's sequence number into each fragment, loads the fragment
//!    chain into the slot's map (one scatter-gather load) and syncs (PREWRITE).
//!
//! So 256 packets are in flight, as in a NIC ring, and every strategy pays its real costs:
//! IOVA allocation, page-table updates, IOTLB invalidation (strict or deferred) and the NIC's
//! IOTLB misses.
//!
//! # The figures
//!
//! - `ns_per_packet`: wall-clock time of the run divided by the packets sent by all threads.
//!   It is the sum of three bills: the driver's, the simulated device's, and the lab's own
//!   work (stamping and verifying packets).
//! - `driver_ns_per_packet`: the driver's CPU time, inside load + PREWRITE sync + POSTWRITE
//!   sync + unload, per packet, invalidation waits included (they are spent on the calling
//!   CPU: `--iommu-cost`); read with the time-stamp counter around each call pair (a clock read
//!   costs a few ns, against ~25 ns for `Instant::now`) and converted with the run's own
//!   calibration.
//! - `device_ns_per_packet`: the simulated NIC's time, inside its DMA reads: for the IOMMU
//!   designs the model IOMMU's IOTLB lookups and table walks and the copy, for passthrough the
//!   copy alone. A real NIC spends this on its own clock, not the driver's CPU, so it is kept
//!   apart from the mapping cost.
//! - `mbit_s`: `size × 8` bits per `ns_per_packet`, the tcpbench-style figure.
//! - `overhead_vs_passthrough`: `driver_ns_per_packet / passthrough's − 1`, and
//!   `driver_overhead_ns` the difference in ns, from the same run: what the design costs the
//!   driver's CPU per packet beyond handing physical addresses to the NIC.
//! - The `memcpy` row: the cost of copying one packet's bytes once (from its fragments into a
//!   contiguous buffer), measured in the same run: the price of the copy-instead-of-map design.
//!
//! # The collapse, attributed
//!
//! Seed 002's first attempt (one IOVA allocation per segment from the `extent` allocator)
//! collapsed throughput; its fix changed two things at once: one allocation per map instead
//! of per segment, and busdma's allocator instead of `extent`. So per-segment and per-map each
//! run over both allocators (the `allocator` field), and one attribution row per invalidation
//! policy splits the driver-time ratio *collapse* = per-segment over `extent` ÷ per-map over
//! busdma's allocator into two factors whose product it is exactly: the allocator's
//! (per-segment over `extent` ÷ per-segment over busdma's) and the per-segment design's
//! (per-segment ÷ per-map, both over busdma's), with the allocator's share of the collapse on
//! a log scale and a generated sentence. The allocator factor measured with per-map
//! (`allocator_factor_per_map`) shows how much of it depends on the design.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use busdma::front::{
    Direct, Direction, Identity, IommuOps, IommuPerMap, IommuPerSegment, IommuReserved, MemKind, PoolMap,
    SgEntry, SgList, Strategy, SyncOp, Tag, TagSpec,
};
use busdma::iommu::InvalidationPolicy;
use busdma::iova::{IovaSource, extent::ExtentAllocator};
use busdma::pgtable::TablePool;
use busdma::premapped::{Hybrid, PoolBuf, PoolConfig, Premapped, PremappedPool};
use busdma::quickmap::QuickMaps;
use busdma::{PAGE_SIZE, Platform};
use busdma_model::{DirectPort, DmaPort, FrameBlock, FrameRequest, HostPlatform, ModelIommu};
use serde::Serialize;

use crate::cost::{Cost, CostArgs};
use crate::fixture;

/// Bytes of the first fragment when a packet has several: Ethernet (14) + IPv4 (20) + TCP
/// with the timestamp option (32), what a TCP stack puts in the header mbuf.
pub const HEADER_BYTES: u64 = 66;

/// Offset of the header inside its page: mbufs keep their header past a small leading area
/// (room to prepend headers), so a header never starts page-aligned.
pub const HEADER_OFFSET: u64 = 0x80;

/// Packets between two progress-bar updates per thread: rare enough to cost nothing
/// measurable (one atomic add per 4096 packets), frequent enough to move smoothly.
const PROGRESS_EVERY: u64 = 4096;

/// Options of `dmalab tcpbench`.
#[derive(clap::Args, Debug, Clone)]
pub struct TcpArgs {
    /// Packets per strategy (all threads together).
    #[arg(long, default_value_t = 200_000)]
    pub packets: u64,
    /// Worker threads (transmit queues), each bound to a model CPU.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Descriptors in flight per transmit ring.
    #[arg(long, default_value_t = 256)]
    pub ring: usize,
    /// Fragments per packet (header + payload fragments).
    #[arg(long, default_value_t = 3)]
    pub segments: usize,
    /// Packet size in bytes.
    #[arg(long, default_value_t = 1500)]
    pub size: u64,
    /// Run only these strategies (comma-separated names as printed); default all.
    #[arg(long, value_delimiter = ',')]
    pub strategy: Vec<String>,
    /// Write a plot of the results (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// A short run (20 000 packets per strategy) that finishes in a few seconds.
    #[arg(long)]
    pub quick: bool,
    /// The model IOMMU's assumed hardware cost.
    #[command(flatten)]
    pub cost: CostArgs,
}

impl TcpArgs {
    /// Packets per strategy after `--quick`.
    pub fn effective_packets(&self) -> u64 {
        if self.quick { self.packets.min(20_000) } else { self.packets }
    }

    /// Checks the options; returns the fragment lengths of one packet.
    pub fn fragments(&self) -> Result<Vec<u64>, String> {
        if self.segments == 0 || self.ring == 0 || self.threads == 0 {
            return Err("--segments, --ring and --threads must be at least 1".into());
        }
        if self.size < self.segments as u64 * 8 {
            return Err(format!(
                "--size {} too small: each of the {} fragments needs at least 8 bytes (the sequence stamp)",
                self.size, self.segments
            ));
        }
        if self.size > 64 * 1024 {
            return Err(format!("--size {} above 65536 (the largest TCP segment offload)", self.size));
        }
        if self.segments == 1 {
            return Ok(vec![self.size]);
        }
        let head = HEADER_BYTES.min(self.size / self.segments as u64);
        let rest = self.size - head;
        let n = (self.segments - 1) as u64;
        let mut v = vec![head];
        v.extend((0..n).map(|i| rest / n + u64::from(i < rest % n)));
        Ok(v)
    }
}

/// One result row of a strategy.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    pub strategy: String,
    pub invalidation: &'static str,
    pub allocator: &'static str,
    #[serde(flatten)]
    pub cost: Cost,
    pub packets: u64,
    pub ns_per_packet: f64,
    pub driver_ns_per_packet: f64,
    pub device_ns_per_packet: f64,
    pub mbit_s: f64,
    pub overhead_vs_passthrough: f64,
    pub driver_overhead_ns: f64,
}

/// The memcpy row.
#[derive(Serialize, Debug, Clone)]
pub struct MemcpyRow {
    pub strategy: &'static str,
    #[serde(flatten)]
    pub cost: Cost,
    pub ns_per_packet: f64,
}

/// What one measured run of a strategy produced, before the relative figures.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub packets: u64,
    pub verified: u64,
    pub wall_ns: f64,
    /// The driver's time in load, sync and unload, all threads together.
    pub driver_ns: f64,
    /// The NIC's time in its DMA reads, all threads together.
    pub device_ns: f64,
}

impl Measured {
    /// Driver ns per packet.
    pub fn driver_per_packet(&self) -> f64 {
        self.driver_ns / self.packets.max(1) as f64
    }
}

/// One transmit ring's packet buffers: per slot, per fragment, a run of frames.
struct Ring<'m> {
    frags: Vec<Vec<(FrameBlock<'m>, SgEntry)>>,
    /// The bytes each slot's packet holds, sequence stamps zeroed.
    expected: Vec<Vec<u8>>,
}

fn pattern(slot: usize, frag: usize, i: u64) -> u8 {
    (slot as u64 * 7 + frag as u64 * 13 + i * 31 % 251) as u8
}

impl<'m> Ring<'m> {
    fn new(m: &'m HostPlatform, ring: usize, frag_lens: &[u64]) -> Result<Self, String> {
        let mut frags = Vec::with_capacity(ring);
        let mut expected = Vec::with_capacity(ring);
        for slot in 0..ring {
            let mut v = Vec::with_capacity(frag_lens.len());
            let mut bytes = Vec::new();
            for (f, &len) in frag_lens.iter().enumerate() {
                let off = if f == 0 && frag_lens.len() > 1 { HEADER_OFFSET } else { 0 };
                let pages = (off + len).div_ceil(PAGE_SIZE);
                let block =
                    m.alloc_frames(FrameRequest::pages(pages)).map_err(|e| format!("packet buffers: {e}"))?;
                let pa = block.pa().checked_add(off).ok_or("packet buffer address overflow")?;
                let data: Vec<u8> = (0..len).map(|i| if i < 8 { 0 } else { pattern(slot, f, i) }).collect();
                m.write_phys(pa, &data).map_err(|e| e.to_string())?;
                bytes.extend_from_slice(&data);
                v.push((block, SgEntry { pa, len, kind: MemKind::Page }));
            }
            frags.push(v);
            expected.push(bytes);
        }
        Ok(Self { frags, expected })
    }

    /// Writes `seq` into the first 8 bytes of every fragment of `slot` (the CPU's per-packet
    /// work: building headers).
    fn stamp(&self, m: &HostPlatform, slot: usize, seq: u64) -> Result<(), String> {
        for (_, e) in &self.frags[slot] {
            m.write_phys(e.pa, &seq.to_le_bytes()).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// The NIC's check of what it read for `slot` carrying `seq`.
    fn verify(&self, slot: usize, seq: u64, got: &[u8], frag_lens: &[u64]) -> bool {
        verify_packet(&self.expected[slot], seq, got, frag_lens)
    }
}

/// Whether `got` is the packet `want` (sequence stamps zeroed) stamped with `seq`.
/// The NIC reads a packet by DMA, piece after piece (`(bus address, length)`: a map's
/// segments or a window's links, named `what` in the error), into `nic_buf`; the bytes read.
fn nic_dma_read(
    port: &dyn DmaPort,
    pieces: impl Iterator<Item = (busdma::Iova, u64)>,
    nic_buf: &mut [u8],
    what: &str,
) -> Result<usize, String> {
    let mut off = 0usize;
    for (addr, len) in pieces {
        let len = len as usize;
        let dst = nic_buf.get_mut(off..off + len).ok_or_else(|| format!("{what} exceed the packet"))?;
        port.dma_read(addr, dst).map_err(|f| format!("NIC DMA fault: {f:?}"))?;
        off += len;
    }
    Ok(off)
}

fn verify_packet(want: &[u8], seq: u64, got: &[u8], frag_lens: &[u64]) -> bool {
    if got.len() != want.len() {
        return false;
    }
    let mut off = 0usize;
    for &len in frag_lens {
        let len = len as usize;
        if got[off..off + 8] != seq.to_le_bytes() || got[off + 8..off + len] != want[off + 8..off + len] {
            return false;
        }
        off += len;
    }
    true
}

/// Packets per window commit in `iommu-window` (one IOTLB invalidation per batch): 32, a
/// NIC driver's transmit-completion budget per interrupt is of this order (Linux's default
/// `tx_work_limit`-style budgets are 64–256; 32 keeps the ring's 256 slots eight batches).
pub const WINDOW_BATCH: usize = 32;

/// The fragments of one ring slot as owned DMA memory ([`busdma::front::Part`]s, the
/// header at [`HEADER_OFFSET`] of its page), for the two-step window design.
type OwnedFrag<'p> = busdma::front::Part<'p, HostPlatform>;

/// One transmit ring over a two-step window ([`busdma::front::DmaWindow`]): slot `s`'s
/// fragment `f` of buffer set `k` is always linked at `(k × ring + s) × stride +
/// frag_offs[f]`; per packet each fragment is linked and unlinked; one commit per
/// [`WINDOW_BATCH`] packets. `lazy` (deferred invalidation): two buffer sets used in turn
/// (packet `seq` uses set `(seq / ring) mod 2`) and `commit_lazy`, so a batch's unmap is only
/// queued and its buffers come back once a flush covers it; a packet whose set is not back yet
/// forces one (`commit`), so about one flush per ring cycle instead of one per batch.
#[allow(clippy::too_many_arguments)]
fn run_window_queue<'p, S>(
    m: &'p HostPlatform,
    tag: &Tag<'p, HostPlatform, S>,
    port: &dyn DmaPort,
    args: &TcpArgs,
    frag_lens: &[u64],
    cpu: usize,
    packets: u64,
    progress: &AtomicU64,
    lazy: bool,
) -> Result<QueueResult, String>
where
    S: busdma::front::WindowSource<HostPlatform>,
{
    let _bind = m.bind_cpu(cpu).map_err(|e| format!("bind cpu {cpu}: {e}"))?;
    let e = |what: &'static str| move |e: busdma::Error| format!("{what}: {e}");
    let sets = if lazy { 2 } else { 1 };
    // Fragment layout in a slot: each fragment's pages, one after the other.
    let mut frag_offs = Vec::with_capacity(frag_lens.len());
    let mut stride = 0u64;
    for (f, &len) in frag_lens.iter().enumerate() {
        frag_offs.push(stride);
        let off = if f == 0 && frag_lens.len() > 1 { HEADER_OFFSET } else { 0 };
        stride += (off + len).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    }
    // owned[set * ring + slot][fragment]: the buffers not linked now.
    let mut owned: Vec<Vec<Option<OwnedFrag<'p>>>> = Vec::with_capacity(sets * args.ring);
    let mut expected = Vec::with_capacity(args.ring);
    for idx in 0..sets * args.ring {
        let slot = idx % args.ring;
        let mut v = Vec::with_capacity(frag_lens.len());
        let mut bytes = Vec::new();
        for (f, &len) in frag_lens.iter().enumerate() {
            let off = if f == 0 && frag_lens.len() > 1 { HEADER_OFFSET } else { 0 };
            let pages = (off + len).div_ceil(PAGE_SIZE);
            // The NIC's tag bounds a packet (1500 bytes), not a buffer page: the buffer's own
            // spec, under the same mask.
            let mut bspec = TagSpec::new(pages * PAGE_SIZE, 1);
            bspec.dma_mask = tag.spec().dma_mask;
            let mem =
                busdma::front::DmaMemory::alloc(m, &bspec, pages * PAGE_SIZE, busdma::MemAttr::WriteBack)
                    .map_err(e("packet buffers"))?;
            let data: Vec<u8> = (0..len).map(|i| if i < 8 { 0 } else { pattern(slot, f, i) }).collect();
            mem.write(off, &data).map_err(e("packet buffers"))?;
            bytes.extend_from_slice(&data);
            v.push(Some(busdma::front::Part::new(mem, off, len).map_err(|(err, _)| err.to_string())?));
        }
        owned.push(v);
        if idx < args.ring {
            expected.push(bytes);
        }
    }
    let nfrags = frag_lens.len();
    let ring = args.ring as u64;
    let mut w = tag
        .create_window::<OwnedFrag<'p>>(stride * ring * sets as u64, sets * args.ring * nfrags)
        .map_err(e("create window"))?;
    // Where buffer `idx`'s fragment `f` is linked.
    let at = |idx: usize, f: usize| idx as u64 * stride + frag_offs[f];
    let back_to = |owned: &mut Vec<Vec<Option<OwnedFrag<'p>>>>, off: u64, part: OwnedFrag<'p>| {
        let idx = (off / stride) as usize;
        let f = frag_offs.iter().rposition(|&fo| fo <= off % stride).unwrap_or(0);
        owned[idx][f] = Some(part);
    };
    let mut linked: Vec<(usize, Vec<busdma::front::Linked>)> =
        vec![(0, Vec::with_capacity(nfrags)); args.ring];
    let mut inflight: Vec<Option<u64>> = vec![None; args.ring];
    let mut nic_buf = vec![0u8; args.size as usize];
    let (mut verified, mut dma_ticks, mut device_ticks) = (0u64, 0u64, 0u64);
    let batch = WINDOW_BATCH.min(args.ring) as u64;
    // The NIC transmits `slot`'s packet `old`; the driver syncs and unlinks its fragments.
    let retire = |w: &mut busdma::front::DmaWindow<'p, HostPlatform, S, OwnedFrag<'p>>,
                  slot: usize,
                  old: u64,
                  (idx, linked): &(usize, Vec<busdma::front::Linked>),
                  nic_buf: &mut [u8]|
     -> Result<(u64, u64), String> {
        let d0 = ticks();
        let off = nic_dma_read(port, linked.iter().map(|l| (l.iova, l.len)), nic_buf, "links")?;
        let device = ticks() - d0;
        if !verify_packet(&expected[slot], old, &nic_buf[..off], frag_lens) {
            return Err(format!("NIC read wrong bytes for packet {old} (slot {slot})"));
        }
        let t0 = ticks();
        for f in 0..nfrags {
            w.sync(at(*idx, f), SyncOp::POSTWRITE).map_err(|e| format!("sync POSTWRITE: {e}"))?;
            w.unlink(at(*idx, f)).map_err(|e| format!("unlink: {e}"))?;
        }
        Ok((ticks() - t0, device))
    };
    let start = Instant::now();
    let t_start = ticks();
    let mut seq = 0u64;
    while seq < packets {
        let first = seq % ring;
        let n = batch.min(ring - first).min(packets - seq);
        for slot in first..first + n {
            let slot = slot as usize;
            if let Some(old) = inflight[slot].take() {
                let (driver, device) = retire(&mut w, slot, old, &linked[slot], &mut nic_buf)?;
                (dma_ticks, device_ticks) = (dma_ticks + driver, device_ticks + device);
                verified += 1;
            }
        }
        let t0 = ticks();
        let r = if lazy {
            w.commit_lazy(|off, part| back_to(&mut owned, off, part))
        } else {
            w.commit(|off, part| back_to(&mut owned, off, part))
        };
        r.map_err(e("commit"))?;
        dma_ticks += ticks() - t0;
        for k in 0..n {
            let slot = (first + k) as usize;
            let s = seq + k;
            let idx = ((s / ring) as usize % sets) * args.ring + slot;
            if owned[idx].iter().any(Option::is_none) {
                // Its last unmap is still queued: force the flush (every retiring link back).
                let t0 = ticks();
                w.commit(|off, part| back_to(&mut owned, off, part)).map_err(e("commit"))?;
                dma_ticks += ticks() - t0;
            }
            for part in owned[idx].iter().flatten() {
                part.memory().write(part.offset(), &s.to_le_bytes()).map_err(e("stamp"))?;
            }
            let t0 = ticks();
            linked[slot].0 = idx;
            linked[slot].1.clear();
            for (f, part) in owned[idx].iter_mut().enumerate() {
                let part = part.take().ok_or("fragment buffer not back from the window")?;
                let l = w
                    .link(at(idx, f), part, Direction::ToDevice)
                    .map_err(|le| format!("link: {}", le.error))?;
                w.sync(at(idx, f), SyncOp::PREWRITE).map_err(e("sync PREWRITE"))?;
                linked[slot].1.push(l);
            }
            dma_ticks += ticks() - t0;
            inflight[slot] = Some(s);
            if s % PROGRESS_EVERY == PROGRESS_EVERY - 1 {
                progress.fetch_add(PROGRESS_EVERY, Ordering::Relaxed);
            }
        }
        seq += n;
    }
    for slot in 0..args.ring {
        if let Some(old) = inflight[slot].take() {
            let (driver, device) = retire(&mut w, slot, old, &linked[slot], &mut nic_buf)?;
            (dma_ticks, device_ticks) = (dma_ticks + driver, device_ticks + device);
            verified += 1;
        }
    }
    let t0 = ticks();
    w.commit(|_, part| drop(part)).map_err(e("commit"))?;
    dma_ticks += ticks() - t0;
    let run_ticks = ticks() - t_start;
    let run_ns = start.elapsed().as_nanos() as f64;
    progress.fetch_add(packets % PROGRESS_EVERY, Ordering::Relaxed);
    w.destroy(|_, part| drop(part)).map_err(e("destroy window"))?;
    Ok(QueueResult { packets, verified, dma_ticks, device_ticks, run_ticks, run_ns })
}

/// Runs the workload over two-step windows (one per ring) from `tag`'s domain.
pub fn measure_window<'p, S>(
    m: &'p HostPlatform,
    tag: &Tag<'p, HostPlatform, S>,
    port: &dyn DmaPort,
    args: &TcpArgs,
    progress: &AtomicU64,
    lazy: bool,
) -> Result<Measured, String>
where
    S: busdma::front::WindowSource<HostPlatform> + Sync,
{
    run_queues(m, args, |frag_lens, t, mine| {
        run_window_queue(m, tag, port, args, frag_lens, t, mine, progress, lazy)
    })
}

/// Reads the time-stamp counter (or a monotonic clock off x86-64).
#[inline]
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // `_rdtsc` is an `unsafe fn` on older compilers and safe on newer ones.
        #[allow(unused_unsafe)]
        // SAFETY: RDTSC has no preconditions on x86-64; it reads a counter.
        unsafe {
            core::arch::x86_64::_rdtsc()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        static T0: OnceLock<Instant> = OnceLock::new();
        T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// Runs the workload for one strategy: `tag` maps, `port` is the NIC's view of bus space.
pub fn measure<S>(
    m: &HostPlatform,
    tag: &Tag<'_, HostPlatform, S>,
    port: &dyn DmaPort,
    args: &TcpArgs,
    progress: &AtomicU64,
) -> Result<Measured, String>
where
    S: Strategy<HostPlatform> + Sync,
    S::MapState: Send,
{
    run_queues(m, args, |frag_lens, t, mine| run_queue(m, tag, port, args, frag_lens, t, mine, progress))
}

/// Runs `args.threads` transmit queues, queue `t` on its own thread with its share `mine` of
/// the packets (`queue(frag_lens, t, mine)`), and adds up what they did.
fn run_queues<F>(m: &HostPlatform, args: &TcpArgs, queue: F) -> Result<Measured, String>
where
    F: Fn(&[u64], usize, u64) -> Result<QueueResult, String> + Sync,
{
    let frag_lens = args.fragments()?;
    let total = args.effective_packets();
    if args.threads > m.num_cpus() {
        return Err(format!("{} threads but the machine has {} CPUs", args.threads, m.num_cpus()));
    }
    let results: Vec<Result<QueueResult, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..args.threads)
            .map(|t| {
                let (frag_lens, queue) = (&frag_lens, &queue);
                s.spawn(move || {
                    let mine =
                        total / args.threads as u64 + u64::from((t as u64) < total % args.threads as u64);
                    queue(frag_lens, t, mine)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("tcpbench worker panicked".into()))).collect()
    });
    let (mut packets, mut verified, mut driver_ns, mut device_ns, mut wall_ns) = (0, 0, 0.0, 0.0, 0.0f64);
    for r in results {
        let q = r?;
        packets += q.packets;
        verified += q.verified;
        let ns_per_tick = if q.run_ticks > 0 { q.run_ns / q.run_ticks as f64 } else { 0.0 };
        driver_ns += q.dma_ticks as f64 * ns_per_tick;
        device_ns += q.device_ticks as f64 * ns_per_tick;
        wall_ns = wall_ns.max(q.run_ns);
    }
    Ok(Measured { packets, verified, wall_ns, driver_ns, device_ns })
}

/// What one transmit queue did.
struct QueueResult {
    packets: u64,
    verified: u64,
    /// Time-stamp-counter ticks inside load/sync/unload.
    dma_ticks: u64,
    /// Ticks inside the NIC's DMA reads.
    device_ticks: u64,
    /// Ticks of the whole run, and its nanoseconds: the calibration of `dma_ticks`.
    run_ticks: u64,
    run_ns: f64,
}

/// One transmit queue.
#[allow(clippy::too_many_arguments)]
fn run_queue<S>(
    m: &HostPlatform,
    tag: &Tag<'_, HostPlatform, S>,
    port: &dyn DmaPort,
    args: &TcpArgs,
    frag_lens: &[u64],
    cpu: usize,
    packets: u64,
    progress: &AtomicU64,
) -> Result<QueueResult, String>
where
    S: Strategy<HostPlatform>,
{
    let _bind = m.bind_cpu(cpu).map_err(|e| format!("bind cpu {cpu}: {e}"))?;
    let ring = Ring::new(m, args.ring, frag_lens)?;
    let entries: Vec<Vec<SgEntry>> = ring.frags.iter().map(|v| v.iter().map(|(_, e)| *e).collect()).collect();
    let mut maps = Vec::with_capacity(args.ring);
    for _ in 0..args.ring {
        maps.push(tag.create_map().map_err(|e| format!("create map: {e}"))?);
    }
    let mut inflight: Vec<Option<u64>> = vec![None; args.ring];
    let mut nic_buf = vec![0u8; args.size as usize];
    let (mut verified, mut dma_ticks, mut device_ticks) = (0u64, 0u64, 0u64);
    let transmit = |slot: usize,
                    seq: u64,
                    map: &mut busdma::front::DmaMap<'_, HostPlatform, S>,
                    nic_buf: &mut [u8]|
     -> Result<(u64, u64), String> {
        // The NIC reads the packet by DMA, segment after segment.
        let d0 = ticks();
        let off = nic_dma_read(port, map.segments().iter().map(|s| (s.addr, s.len)), nic_buf, "segments")?;
        let device = ticks() - d0;
        if !ring.verify(slot, seq, &nic_buf[..off], frag_lens) {
            return Err(format!("NIC read wrong bytes for packet {seq} (slot {slot})"));
        }
        let t0 = ticks();
        map.sync(SyncOp::POSTWRITE).map_err(|e| format!("sync POSTWRITE: {e}"))?;
        map.unload().map_err(|e| format!("unload: {e}"))?;
        Ok((ticks() - t0, device))
    };
    let start = Instant::now();
    let t_start = ticks();
    for seq in 0..packets {
        let slot = (seq % args.ring as u64) as usize;
        if let Some(old) = inflight[slot].take() {
            let (driver, device) = transmit(slot, old, &mut maps[slot], &mut nic_buf)?;
            (dma_ticks, device_ticks) = (dma_ticks + driver, device_ticks + device);
            verified += 1;
        }
        ring.stamp(m, slot, seq)?;
        let t0 = ticks();
        // SAFETY: the lab's own model RAM, kept until every map of it is dropped.
        // every map of them is unloaded and dropped.
        let sg = unsafe { SgList::new(&entries[slot]) };
        maps[slot].load(&sg, Direction::ToDevice).map_err(|e| format!("load: {e}"))?;
        maps[slot].sync(SyncOp::PREWRITE).map_err(|e| format!("sync PREWRITE: {e}"))?;
        dma_ticks += ticks() - t0;
        inflight[slot] = Some(seq);
        if seq % PROGRESS_EVERY == PROGRESS_EVERY - 1 {
            progress.fetch_add(PROGRESS_EVERY, Ordering::Relaxed);
        }
    }
    for slot in 0..args.ring {
        if let Some(old) = inflight[slot].take() {
            let (driver, device) = transmit(slot, old, &mut maps[slot], &mut nic_buf)?;
            (dma_ticks, device_ticks) = (dma_ticks + driver, device_ticks + device);
            verified += 1;
        }
    }
    let run_ticks = ticks() - t_start;
    let run_ns = start.elapsed().as_nanos() as f64;
    progress.fetch_add(packets % PROGRESS_EVERY, Ordering::Relaxed);
    drop(maps);
    Ok(QueueResult { packets, verified, dma_ticks, device_ticks, run_ticks, run_ns })
}

/// What `premapped-zc` needs that the other designs do not: said in its pool row.
pub const ZC_REQUIRES: &str =
    "a stack that allocates its packet buffers from the pool and builds packets there";

/// One transmit queue of `premapped-zc`: the lab's client is a stack that allocates its packet
/// buffers from the pool (`busdma::premapped` theory 9) and builds each packet there, so a
/// load copies nothing. The same bill as [`run_queue`]'s: each ring descriptor's packet is
/// written once at setup (here into its pool buffer instead of its fragments) and stamped per
/// packet with the same `write_phys` of 8 bytes at each fragment's offset; the driver's ticks
/// cover load + PREWRITE and POSTWRITE + unload (`take`, which unloads and hands the buffer
/// back); the device's, the NIC's DMA reads; the NIC verifies every byte.
#[allow(clippy::too_many_arguments)]
fn run_zc_queue<'a, 'p, D: IommuOps<HostPlatform>>(
    m: &HostPlatform,
    tag: &Tag<'p, HostPlatform, Premapped<'a, 'p, HostPlatform, D>>,
    pool: &'a PremappedPool<'p, HostPlatform, D>,
    port: &dyn DmaPort,
    args: &TcpArgs,
    frag_lens: &[u64],
    cpu: usize,
    packets: u64,
    progress: &AtomicU64,
) -> Result<QueueResult, String> {
    let _bind = m.bind_cpu(cpu).map_err(|e| format!("bind cpu {cpu}: {e}"))?;
    let e = |what: &'static str| move |e: busdma::Error| format!("{what}: {e}");
    // Each fragment's offset in the packet: where its stamp goes.
    let offs: Vec<u64> = frag_lens.iter().scan(0, |o, &l| Some(std::mem::replace(o, *o + l))).collect();
    let mut bufs: Vec<Option<PoolBuf<'a, 'p, HostPlatform, D>>> = Vec::with_capacity(args.ring);
    let mut expected = Vec::with_capacity(args.ring);
    for slot in 0..args.ring {
        let mut bytes = Vec::with_capacity(args.size as usize);
        for (f, &len) in frag_lens.iter().enumerate() {
            bytes.extend((0..len).map(|i| if i < 8 { 0 } else { pattern(slot, f, i) }));
        }
        let mut b = pool.alloc_buf(args.size).map_err(e("pool buffer"))?;
        b.write(0, &bytes).map_err(e("pool buffer"))?;
        bufs.push(Some(b));
        expected.push(bytes);
    }
    let mut maps: Vec<PoolMap<'a, 'p, HostPlatform, Premapped<'a, 'p, HostPlatform, D>>> =
        Vec::with_capacity(args.ring);
    for _ in 0..args.ring {
        maps.push(tag.create_pool_map().map_err(e("create map"))?);
    }
    let mut inflight: Vec<Option<u64>> = vec![None; args.ring];
    let mut nic_buf = vec![0u8; args.size as usize];
    let (mut verified, mut dma_ticks, mut device_ticks) = (0u64, 0u64, 0u64);
    let transmit = |slot: usize,
                    seq: u64,
                    pm: &mut PoolMap<'a, 'p, HostPlatform, Premapped<'a, 'p, HostPlatform, D>>,
                    nic_buf: &mut [u8]|
     -> Result<(u64, u64, PoolBuf<'a, 'p, HostPlatform, D>), String> {
        let d0 = ticks();
        let off = nic_dma_read(port, pm.segments().iter().map(|s| (s.addr, s.len)), nic_buf, "segments")?;
        let device = ticks() - d0;
        if !verify_packet(&expected[slot], seq, &nic_buf[..off], frag_lens) {
            return Err(format!("NIC read wrong bytes for packet {seq} (slot {slot})"));
        }
        let t0 = ticks();
        pm.sync(SyncOp::POSTWRITE).map_err(|e| format!("sync POSTWRITE: {e}"))?;
        let buf = pm.take().map_err(|e| format!("unload: {e}"))?;
        Ok((ticks() - t0, device, buf))
    };
    let start = Instant::now();
    let t_start = ticks();
    for seq in 0..packets {
        let slot = (seq % args.ring as u64) as usize;
        if let Some(old) = inflight[slot].take() {
            let (driver, device, buf) = transmit(slot, old, &mut maps[slot], &mut nic_buf)?;
            (dma_ticks, device_ticks) = (dma_ticks + driver, device_ticks + device);
            bufs[slot] = Some(buf);
            verified += 1;
        }
        let buf = bufs[slot].take().ok_or("pool buffer not back from its map")?;
        // The stamp, as `Ring::stamp` writes the other designs' fragments.
        for &o in &offs {
            let pa = buf.pa().checked_add(o).ok_or("pool buffer address overflow")?;
            m.write_phys(pa, &seq.to_le_bytes()).map_err(|e| e.to_string())?;
        }
        let t0 = ticks();
        maps[slot].load(buf, Direction::ToDevice).map_err(|(err, _)| format!("load: {err}"))?;
        maps[slot].sync(SyncOp::PREWRITE).map_err(|e| format!("sync PREWRITE: {e}"))?;
        dma_ticks += ticks() - t0;
        inflight[slot] = Some(seq);
        if seq % PROGRESS_EVERY == PROGRESS_EVERY - 1 {
            progress.fetch_add(PROGRESS_EVERY, Ordering::Relaxed);
        }
    }
    for slot in 0..args.ring {
        if let Some(old) = inflight[slot].take() {
            let (driver, device, buf) = transmit(slot, old, &mut maps[slot], &mut nic_buf)?;
            (dma_ticks, device_ticks) = (dma_ticks + driver, device_ticks + device);
            bufs[slot] = Some(buf);
            verified += 1;
        }
    }
    let run_ticks = ticks() - t_start;
    let run_ns = start.elapsed().as_nanos() as f64;
    progress.fetch_add(packets % PROGRESS_EVERY, Ordering::Relaxed);
    drop(maps);
    drop(bufs);
    Ok(QueueResult { packets, verified, dma_ticks, device_ticks, run_ticks, run_ns })
}

/// Runs `premapped-zc` ([`run_zc_queue`]) over `pool`'s tag, one queue per thread.
pub fn measure_zc<'a, 'p, D: IommuOps<HostPlatform> + Sync>(
    m: &HostPlatform,
    tag: &Tag<'p, HostPlatform, Premapped<'a, 'p, HostPlatform, D>>,
    pool: &'a PremappedPool<'p, HostPlatform, D>,
    port: &dyn DmaPort,
    args: &TcpArgs,
    progress: &AtomicU64,
) -> Result<Measured, String> {
    run_queues(m, args, |frag_lens, t, mine| {
        run_zc_queue(m, tag, pool, port, args, frag_lens, t, mine, progress)
    })
}

/// The cost of copying one packet's bytes once, from its fragments into a contiguous buffer
/// (what a copy-based design pays instead of mapping).
pub fn measure_memcpy(m: &HostPlatform, args: &TcpArgs) -> Result<f64, String> {
    let frag_lens = args.fragments()?;
    let ring = Ring::new(m, args.ring, &frag_lens)?;
    let srcs: Vec<Vec<(*const u8, usize)>> = ring
        .frags
        .iter()
        .map(|v| {
            v.iter()
                .map(|(_, e)| {
                    let kva = m.phys_to_kva(e.pa).ok_or("packet buffer outside the direct map")?;
                    Ok((kva.raw() as *const u8, e.len as usize))
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .collect::<Result<_, _>>()?;
    let mut dst = vec![0u8; args.size as usize];
    let n = args.effective_packets();
    let start = Instant::now();
    for i in 0..n {
        let mut off = 0;
        for &(src, len) in &srcs[(i % args.ring as u64) as usize] {
            // SAFETY: `src` is the direct-map address of `len` bytes of a packet buffer the
            // ring owns (alive until `ring` drops below); `dst` has room for the whole packet
            // and does not overlap RAM. No device writes these buffers during the copy.
            unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr().add(off), len) };
            off += len;
        }
        std::hint::black_box(&mut dst);
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    drop(ring);
    Ok(ns)
}

/// Turns a measurement into a row (relative figures need passthrough's driver ns per packet).
pub fn row(
    (name, invalidation, allocator): Design,
    cost: &Cost,
    size: u64,
    r: &Measured,
    passthrough_driver_ns: f64,
) -> Row {
    let ns = r.wall_ns / r.packets.max(1) as f64;
    let driver = r.driver_per_packet();
    Row {
        strategy: name.to_string(),
        invalidation,
        allocator,
        cost: cost.clone(),
        packets: r.packets,
        ns_per_packet: ns,
        driver_ns_per_packet: driver,
        device_ns_per_packet: r.device_ns / r.packets.max(1) as f64,
        mbit_s: if ns > 0.0 { size as f64 * 8.0 / ns * 1000.0 } else { 0.0 },
        overhead_vs_passthrough: if passthrough_driver_ns > 0.0 {
            driver / passthrough_driver_ns - 1.0
        } else {
            0.0
        },
        driver_overhead_ns: driver - passthrough_driver_ns,
    }
}

/// The tag of the NIC: one packet of at most `size` bytes in at most `segments` segments.
/// The NIC is cache-coherent (as x86 NICs are), so syncs do no cache maintenance.
pub fn nic_spec(args: &TcpArgs) -> TagSpec {
    let mut spec = TagSpec::new(args.size, args.segments as u32);
    spec.flags.coherent = true;
    spec
}

/// The NIC's device id on the model bus.
pub const NIC_DEVICE: u32 = 1;

/// Everything one `tcpbench` run produced.
#[derive(Debug)]
pub struct Results {
    /// One row per strategy × invalidation, passthrough first.
    pub rows: Vec<Row>,
    /// The memcpy reference.
    pub memcpy: MemcpyRow,
    /// One row per invalidation policy for which all four per-segment / per-map × allocator
    /// rows ran.
    pub attribution: Vec<Attribution>,
    /// One row per pre-mapped design that ran: its pool's counters and the hybrid's
    /// calibration.
    pub pools: Vec<PoolRow>,
}

/// What part of the per-segment collapse each cause explains, on the driver's time.
#[derive(Serialize, Debug, Clone)]
pub struct Attribution {
    pub attribution: &'static str,
    #[serde(flatten)]
    pub cost: Cost,
    /// Per-segment over `extent` ÷ per-map over busdma's allocator.
    pub collapse: f64,
    /// Per-segment over `extent` ÷ per-segment over busdma's allocator.
    pub allocator_factor: f64,
    /// Per-segment ÷ per-map, both over busdma's allocator.
    pub design_factor: f64,
    /// Per-map over `extent` ÷ per-map over busdma's allocator.
    pub allocator_factor_per_map: f64,
    /// ln(allocator_factor) / ln(collapse), when the collapse is a slowdown.
    pub allocator_share: Option<f64>,
    /// The finding in one sentence.
    pub summary: String,
}

impl Attribution {
    /// The attribution of `policy` from `rows`, if the four rows it needs ran.
    fn from_rows(rows: &[Row], policy: &'static str, cost: &Cost) -> Option<Self> {
        let driver = |s: &str, a: &str| {
            rows.iter()
                .find(|r| r.strategy == s && r.invalidation == policy && r.allocator == a)
                .map(|r| r.driver_ns_per_packet)
                .filter(|&ns| ns > 0.0)
        };
        let (seg_ext, seg_bus) =
            (driver("iommu-per-segment", "extent")?, driver("iommu-per-segment", "busdma")?);
        let (map_ext, map_bus) = (driver("iommu-per-map", "extent")?, driver("iommu-per-map", "busdma")?);
        let collapse = seg_ext / map_bus;
        let (alloc, design) = (seg_ext / seg_bus, seg_bus / map_bus);
        let share = (collapse > 1.0).then(|| alloc.ln() / collapse.ln());
        let summary = format!(
            "{policy}, {}: per-segment over extent costs the driver {collapse:.1}x per-map over busdma's \
             allocator; the allocator explains {alloc:.1}x (per-segment, extent vs busdma's; \
             {:.1}x under per-map) and the per-segment design {design:.1}x (per-segment vs per-map, \
             both over busdma's){}",
            cost.iommu_cost,
            map_ext / map_bus,
            share.map_or(String::new(), |s| format!(
                ": {:.0}% of the collapse (log scale) is the allocator",
                s * 100.0
            )),
        );
        Some(Self {
            attribution: policy,
            cost: cost.clone(),
            collapse,
            allocator_factor: alloc,
            design_factor: design,
            allocator_factor_per_map: map_ext / map_bus,
            allocator_share: share,
            summary,
        })
    }
}

/// A design: strategy, invalidation policy, IOVA allocator.
pub type Design = (&'static str, &'static str, &'static str);

/// Every strategy × invalidation × IOVA allocator this command runs, in order: passthrough
/// (no IOMMU), then each IOMMU strategy under strict and deferred invalidation; per-segment
/// and per-map each over both allocators (`extent`, `busdma`), to attribute the collapse.
///
/// - `identity`: IOVA = PA, per-page reference counts (the design seed 002 replaced).
/// - `iommu-per-segment`: one IOVA allocation per segment; over the `extent` allocator (a
///   sorted list under one lock, as OpenBSD's extent(9)) it is seed 002's first attempt.
/// - `iommu-per-map`: one allocation per load; over busdma's IOVA allocator it is seed 002's
///   fix.
/// - `iommu-reserved`: IOVA window and table levels reserved at map create, per-CPU caches in
///   the allocator and the table-page pool: the seed's open idea plus its per-CPU pools.
/// - `iommu-window`: a two-step window per ring (`busdma::front::window`): each slot's
///   fragments at fixed offsets, linked and unlinked per packet, one commit (one IOTLB
///   invalidation) per [`WINDOW_BATCH`] packets; owned DMA buffers. Under deferred
///   invalidation lazy commits over two buffer sets (`run_window_queue`).
/// - `premapped`: every packet copied into a slot of a pool mapped once per device and CPU
///   (`busdma::premapped`): no map request and no invalidation per packet.
/// - `premapped-zc`: the same pool, but the client is a stack that allocates its packet
///   buffers from the pool and builds each packet there (`busdma::premapped` theory 9,
///   [`run_zc_queue`]): a load copies nothing and makes no map request. It needs such a stack
///   ([`ZC_REQUIRES`], printed in its pool row); a driver handed arbitrary buffers cannot use it.
/// - `hybrid`: per load, a copy into that pool below a threshold measured at creation (copy
///   vs map + unmap on this domain), a per-map load over busdma's allocator above it.
pub const STRATEGIES: [Design; 19] = [
    ("passthrough", "none", "none"),
    ("identity", "strict", "none"),
    ("identity", "deferred", "none"),
    ("iommu-per-segment", "strict", "extent"),
    ("iommu-per-segment", "deferred", "extent"),
    ("iommu-per-segment", "strict", "busdma"),
    ("iommu-per-segment", "deferred", "busdma"),
    ("iommu-per-map", "strict", "extent"),
    ("iommu-per-map", "deferred", "extent"),
    ("iommu-per-map", "strict", "busdma"),
    ("iommu-per-map", "deferred", "busdma"),
    ("iommu-reserved", "strict", "busdma"),
    ("iommu-reserved", "deferred", "busdma"),
    ("iommu-window", "strict", "busdma"),
    ("iommu-window", "deferred", "busdma"),
    ("premapped", "none", "busdma"),
    ("premapped-zc", "none", "busdma"),
    ("hybrid", "strict", "busdma"),
    ("hybrid", "deferred", "busdma"),
];

/// How many designs a run with these options measures (passthrough always runs).
pub fn runs(args: &TcpArgs) -> usize {
    let wanted = |name: &str| args.strategy.is_empty() || args.strategy.iter().any(|s| s == name);
    1 + STRATEGIES[1..].iter().filter(|d| wanted(d.0)).count()
}

/// The IOMMU strategies.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Identity,
    PerSegment,
    PerMap,
    Reserved,
    Window,
    Premapped,
    PremappedZc,
    Hybrid,
}

/// What a pre-mapped design's pool did in one run (printed under the table).
#[derive(Serialize, Debug, Clone)]
pub struct PoolRow {
    pub pool: String,
    pub invalidation: &'static str,
    #[serde(flatten)]
    pub cost: Cost,
    /// Map requests the pool made (all at setup).
    pub setup_map_requests: u64,
    /// IOTLB invalidation commands during the measured run, per packet.
    pub invalidations_per_packet: f64,
    /// Packets copied into the pool (the rest were mapped).
    pub copied_packets: u64,
    /// The hybrid's threshold in bytes (loads below it are copied).
    pub threshold_bytes: Option<u64>,
    /// The hybrid's calibration, as measured.
    pub calibration: Option<String>,
    /// What the design needs of the client beyond a driver's loads (`premapped-zc`).
    pub requires: Option<&'static str>,
}

/// Measures `strategy` through `port`.
fn measure_strategy<S>(
    m: &HostPlatform,
    args: &TcpArgs,
    strategy: S,
    port: &dyn DmaPort,
    progress: &AtomicU64,
) -> Result<Measured, String>
where
    S: Strategy<HostPlatform> + Sync,
    S::MapState: Send,
{
    let tag = Tag::new_root(m, strategy, nic_spec(args)).map_err(|e| e.to_string())?;
    measure(m, &tag, port, args, progress)
}

/// Builds a fresh model IOMMU and VT-d domain (48-bit, 4 levels) with IOVA source `iova`,
/// attaches the NIC, and measures strategy `kind` through the NIC's IOMMU port.
#[allow(clippy::too_many_arguments)]
fn measure_domain<I: IovaSource>(
    m: &HostPlatform,
    args: &TcpArgs,
    policy: InvalidationPolicy,
    iova: I,
    progress: &AtomicU64,
    kind: Kind,
    cost: &Cost,
    pools: &mut Vec<PoolRow>,
) -> Result<Measured, String> {
    let e = |e: busdma::Error| e.to_string();
    let iommu = ModelIommu::new(m, cost.config()).map_err(e)?;
    let pool = TablePool::new(m);
    // SAFETY: the NIC is driven only by this run, which issues no DMA once `dom` is dropped
    // and drops `iommu` with it.
    let dom = unsafe { fixture::vtd_domain(m, &iommu, &pool, NIC_DEVICE, 1, policy, iova)? };
    let port = iommu.port(NIC_DEVICE);
    let r = match kind {
        Kind::Identity => measure_strategy(m, args, Identity::new(&dom), &port, progress)?,
        Kind::PerSegment => measure_strategy(m, args, IommuPerSegment(&dom), &port, progress)?,
        Kind::PerMap => measure_strategy(m, args, IommuPerMap(&dom), &port, progress)?,
        // Under deferred invalidation a map's window may be reused only after the flush that
        // covers its last unload: two windows per map, used in turn, let the flush queue's
        // own bounds retire the older one instead of forcing a flush at every load.
        Kind::Reserved if matches!(policy, InvalidationPolicy::Deferred { .. }) => {
            measure_strategy(m, args, IommuReserved::alternating(&dom, 2), &port, progress)?
        }
        Kind::Reserved => measure_strategy(m, args, IommuReserved::new(&dom), &port, progress)?,
        Kind::Premapped | Kind::PremappedZc | Kind::Hybrid => {
            let qm = QuickMaps::for_platform(m);
            // One slot per ring descriptor on each CPU, a packet each.
            let pool = PremappedPool::new(m, &dom, &qm, PoolConfig::new(args.size, args.ring)).map_err(e)?;
            let inv = |s: busdma_model::IommuStats| s.inv_range + s.inv_domain;
            let (before, r, threshold, calibration) = if matches!(kind, Kind::Premapped) {
                let before = inv(iommu.stats());
                (before, measure_strategy(m, args, Premapped(&pool), &port, progress)?, None, None)
            } else if matches!(kind, Kind::PremappedZc) {
                let tag = Tag::new_root(m, Premapped(&pool), nic_spec(args)).map_err(e)?;
                let before = inv(iommu.stats());
                (before, measure_zc(m, &tag, &pool, &port, args, progress)?, None, None)
            } else {
                let h = Hybrid::calibrated(&pool, IommuPerMap(&dom), &nic_spec(args)).map_err(e)?;
                let (t, c) = (h.threshold(), h.calibration().map(|c| c.to_string()));
                let before = inv(iommu.stats());
                (before, measure_strategy(m, args, h, &port, progress)?, Some(t), c)
            };
            let stats = pool.stats();
            pools.push(PoolRow {
                pool: match kind {
                    Kind::Hybrid => "hybrid".into(),
                    Kind::PremappedZc => "premapped-zc".into(),
                    _ => "premapped".into(),
                },
                invalidation: if threshold.is_some() { policy_name(policy) } else { "none" },
                cost: cost.clone(),
                setup_map_requests: stats.map_requests,
                invalidations_per_packet: (inv(iommu.stats()) - before) as f64 / r.packets.max(1) as f64,
                copied_packets: stats.loads,
                threshold_bytes: threshold,
                calibration,
                requires: matches!(kind, Kind::PremappedZc).then_some(ZC_REQUIRES),
            });
            r
        }
        Kind::Window => {
            let tag = Tag::new_root(m, IommuPerMap(&dom), nic_spec(args)).map_err(e)?;
            // Deferred: lazy commits over two buffer sets (the flush queue's bounds, or one
            // forced flush per ring cycle, hand buffers back); strict: one proof per batch.
            let lazy = matches!(policy, InvalidationPolicy::Deferred { .. });
            measure_window(m, &tag, &port, args, progress, lazy)?
        }
    };
    let g = m.pin_cpu();
    dom.flush(&g).map_err(|e| format!("flush: {e}"))?;
    drop(g);
    let faults = iommu.take_faults();
    if !faults.is_empty() {
        return Err(format!("{} NIC DMA faults, first {:?}", faults.len(), faults[0]));
    }
    Ok(r)
}

fn policy_name(p: InvalidationPolicy) -> &'static str {
    if matches!(p, InvalidationPolicy::Strict) { "strict" } else { "deferred" }
}

/// Runs every selected strategy side by side.
pub fn run(args: &TcpArgs, m: &HostPlatform, progress: &AtomicU64) -> Result<Results, String> {
    for s in &args.strategy {
        if !STRATEGIES.iter().any(|d| d.0 == s) {
            let mut names: Vec<&str> = STRATEGIES.iter().map(|d| d.0).collect();
            names.dedup();
            return Err(format!("unknown strategy {s:?}; known: {}", names.join(", ")));
        }
    }
    let wanted = |name: &str| args.strategy.is_empty() || args.strategy.iter().any(|s| s == name);
    let cost = args.cost.resolve()?;
    let spec = nic_spec(args);
    let err = |e: busdma::Error| e.to_string();
    // Passthrough always runs: every relative figure is against it.
    let nic = DirectPort::new(m, NIC_DEVICE, 64);
    let tag = Tag::new_root(m, Direct, spec).map_err(err)?;
    let pt = measure(m, &tag, &nic, args, progress)?;
    check_honest("passthrough", &pt)?;
    let pt_ns = pt.driver_per_packet();
    let mut rows = Vec::new();
    let mut pools = Vec::new();
    if wanted("passthrough") {
        rows.push(row(STRATEGIES[0], &cost, args.size, &pt, pt_ns));
    }
    for &design in &STRATEGIES[1..] {
        let (name, inv, allocator) = design;
        if !wanted(name) {
            continue;
        }
        let policy =
            if inv == "strict" { InvalidationPolicy::Strict } else { InvalidationPolicy::deferred() };
        let kind = match name {
            "identity" => Kind::Identity,
            "iommu-per-segment" => Kind::PerSegment,
            "iommu-per-map" => Kind::PerMap,
            "iommu-window" => Kind::Window,
            "premapped" => Kind::Premapped,
            "premapped-zc" => Kind::PremappedZc,
            "hybrid" => Kind::Hybrid,
            _ => Kind::Reserved,
        };
        let r = if allocator == "extent" {
            let extent = ExtentAllocator::new(fixture::iova_space()?).map_err(err)?;
            measure_domain(m, args, policy, extent, progress, kind, &cost, &mut pools)?
        } else {
            measure_domain(
                m,
                args,
                policy,
                fixture::iova_allocator(m, true)?,
                progress,
                kind,
                &cost,
                &mut pools,
            )?
        };
        check_honest(name, &r)?;
        rows.push(row(design, &cost, args.size, &r, pt_ns));
    }
    let attribution =
        ["strict", "deferred"].into_iter().filter_map(|p| Attribution::from_rows(&rows, p, &cost)).collect();
    let memcpy = MemcpyRow { strategy: "memcpy", cost, ns_per_packet: measure_memcpy(m, args)? };
    Ok(Results { rows, memcpy, attribution, pools })
}

/// The workload is honest only if the NIC read and verified every packet sent.
fn check_honest(name: &str, r: &Measured) -> Result<(), String> {
    if r.verified != r.packets {
        return Err(format!("{name}: {} packets sent but the NIC verified {}", r.packets, r.verified));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use busdma::Iova;
    use busdma_model::{DmaFault, MachineConfig};

    fn small_args() -> TcpArgs {
        TcpArgs {
            packets: 3000,
            threads: 1,
            ring: 16,
            segments: 3,
            size: 1500,
            strategy: Vec::new(),
            plot: None,
            quick: false,
            cost: CostArgs::default(),
        }
    }

    fn machine() -> HostPlatform {
        HostPlatform::new(MachineConfig {
            ram_size: 64 << 20,
            direct_map_size: 64 << 20,
            cpus: 2,
            ..Default::default()
        })
        .unwrap()
    }

    /// A NIC port that flips one bit of everything it reads: the workload must notice.
    struct CorruptingPort<'m>(DirectPort<'m>);

    impl DmaPort for CorruptingPort<'_> {
        fn dma_read(&self, bus: Iova, buf: &mut [u8]) -> Result<(), DmaFault> {
            self.0.dma_read(bus, buf)?;
            if let Some(b) = buf.last_mut() {
                *b ^= 1;
            }
            Ok(())
        }
        fn dma_write(&self, bus: Iova, data: &[u8]) -> Result<(), DmaFault> {
            self.0.dma_write(bus, data)
        }
    }

    #[test]
    fn fragments_add_up_to_the_packet_and_bad_shapes_are_refused() {
        let a = small_args();
        assert_eq!(a.fragments().unwrap(), vec![66, 717, 717]);
        let odd = TcpArgs { size: 1001, segments: 4, ..small_args() };
        assert_eq!(odd.fragments().unwrap().iter().sum::<u64>(), 1001);
        assert!(TcpArgs { segments: 0, ..small_args() }.fragments().is_err());
        assert!(TcpArgs { size: 20, ..small_args() }.fragments().is_err());
        assert!(TcpArgs { size: 1 << 20, ..small_args() }.fragments().is_err());
    }

    #[test]
    fn the_nic_verifies_every_packet_sent() {
        let m = machine();
        let args = small_args();
        let tag = Tag::new_root(&m, Direct, nic_spec(&args)).unwrap();
        let nic = DirectPort::new(&m, NIC_DEVICE, 64);
        let r = measure(&m, &tag, &nic, &args, &AtomicU64::new(0)).unwrap();
        assert_eq!((r.packets, r.verified), (3000, 3000));
        assert!(r.wall_ns > 0.0 && r.driver_ns > 0.0 && r.device_ns > 0.0);
        assert!(r.driver_ns + r.device_ns < r.wall_ns, "{r:?}");
    }

    #[test]
    fn a_nic_reading_wrong_bytes_fails_the_run() {
        let m = machine();
        let args = small_args();
        let tag = Tag::new_root(&m, Direct, nic_spec(&args)).unwrap();
        let nic = CorruptingPort(DirectPort::new(&m, NIC_DEVICE, 64));
        let e = measure(&m, &tag, &nic, &args, &AtomicU64::new(0)).unwrap_err();
        assert!(e.contains("wrong bytes"), "{e}");
    }

    #[test]
    fn every_strategy_runs_honestly_side_by_side() {
        let m = machine();
        let args = TcpArgs { packets: 2000, ..small_args() };
        let res = run(&args, &m, &AtomicU64::new(0)).unwrap();
        let names: Vec<(&str, &str, &str)> =
            res.rows.iter().map(|r| (r.strategy.as_str(), r.invalidation, r.allocator)).collect();
        assert_eq!(names, STRATEGIES.to_vec());
        assert_eq!(res.attribution.len(), 2);
        for a in &res.attribution {
            // The two factors multiply to the collapse exactly.
            assert!((a.allocator_factor * a.design_factor / a.collapse - 1.0).abs() < 1e-9, "{a:?}");
        }
        for r in &res.rows {
            assert_eq!(r.packets, 2000, "{r:?}");
            assert!(r.ns_per_packet > 0.0 && r.mbit_s > 0.0, "{r:?}");
            assert!(r.driver_ns_per_packet > 0.0 && r.device_ns_per_packet > 0.0, "{r:?}");
            assert!(r.driver_ns_per_packet + r.device_ns_per_packet < r.ns_per_packet, "{r:?}");
        }
        // Overhead is on the driver's time: passthrough's own is exactly none.
        assert_eq!((res.rows[0].overhead_vs_passthrough, res.rows[0].driver_overhead_ns), (0.0, 0.0));
        assert!(res.memcpy.ns_per_packet > 0.0);
        // The pool designs: mapped at setup only, nothing invalidated per packet; premapped
        // copies every packet, the hybrid reports its calibrated threshold.
        let pools: Vec<(&str, &str)> = res.pools.iter().map(|p| (p.pool.as_str(), p.invalidation)).collect();
        assert_eq!(
            pools,
            [("premapped", "none"), ("premapped-zc", "none"), ("hybrid", "strict"), ("hybrid", "deferred")]
        );
        assert_eq!(res.pools[0].invalidations_per_packet, 0.0);
        assert_eq!(res.pools[0].copied_packets, 2000);
        // premapped-zc: the stack builds its packets in the pool; nothing copied or invalidated,
        // and its row says what it needs.
        assert_eq!((res.pools[1].invalidations_per_packet, res.pools[1].copied_packets), (0.0, 0));
        assert_eq!(res.pools[1].requires, Some(ZC_REQUIRES));
        for p in &res.pools {
            assert!(p.setup_map_requests > 0, "{p:?}");
        }
        assert!(res.pools[2..].iter().all(|p| p.threshold_bytes.is_some() && p.calibration.is_some()));
    }
}
