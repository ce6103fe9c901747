//! `dmalab soak --seconds N --threads T`: a random mixed workload with invariant checks.
//!
//! Each thread is bound to its own model CPU and owns its own source memory and one map of
//! every strategy: direct, bounce over direct (26-bit tag, source above that limit), and
//! per-map, per-segment, reserved and bounce-over-IOMMU through two real domains on the
//! audited model IOMMU, one strict and one deferred, both shared by every thread. One
//! operation loads a random scatter-gather list (1 to 4 runs anywhere in the thread's
//! memory, any direction) into a random map and checks:
//! - the device reads exactly the loaded bytes by DMA after `PREWRITE` (through the IOMMU's
//!   hardware walk and IOTLB for the IOMMU strategies);
//! - for directions the device writes, its bytes reach the source memory after `POSTREAD`;
//! - after unload from the strict domain no byte of the old segments is reachable.
//!
//! Deferred loads (`load_or_defer`): every thread also shares one waiting tag (`may_wait`) on a
//! third, strict domain whose IOVA space is only [`WAIT_SPACE_PAGES`] pages, and in one
//! operation of eight loads three maps at once (2 to 6 pages each), so loads queue for space
//! held by its own and the other threads' maps; a quarter of the queued loads are cancelled.
//! Checked: every callback runs exactly once, with success or `Cancelled`; a completed load
//! gives the device exactly its bytes; a queued load completes within 20 s of the thread
//! unloading everything it holds (no lost wake-up); at the end nothing waits and the queue's
//! counters balance (`deferred = completed + cancelled`, none failed).
//!
//! Two-step windows (`DmaWindow`): each thread also links owned buffers (1 or 2 pages) at
//! random offsets of a 16-page window on the strict domain and of one on the deferred domain,
//! unlinks, and commits (lazily, sometimes, on the deferred one), against a reference of what
//! occupies each page. Checked: a link succeeds exactly when its pages are free and below the
//! link limit, and otherwise gives its buffer back; the device reads a linked buffer's bytes at
//! its bus address; a commit gives back only unlinked buffers, a forced one all of them, after
//! which their bus addresses fault; every buffer comes back by the window's destroy.
//!
//! At the end, every map destroyed and both domains flushed, the counters must balance: no
//! live IOVA range in either domain, no bounce page in use, no model-audit violation, and
//! every table page back with the platform once the domains are gone. Every failed check is
//! counted as a violation (printed to stderr), never a panic, so the run reports them all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use busdma::MemAttr;
use busdma::bounce::{BounceZones, Bounced, ZoneConfig};
use busdma::front::{
    Deferrable, DeferredCallback, Direct, Direction, DmaMap, DmaMemory, DmaWindow, IommuPerMap,
    IommuPerSegment, IommuReserved, MemKind, PendingLoad, RawSegments, Segment, SgEntry, SgList, Strategy,
    SyncOp, Tag, TagSpec, WindowSource,
};
use busdma::iommu::InvalidationPolicy;
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::TablePool;
use busdma::quickmap::QuickMaps;
use busdma::{AddrRange, Iova};
use busdma::{PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu};
use clap::Args;

use crate::fixture;
use crate::rng::Rng;
use serde::Serialize;

/// Arguments of `dmalab soak`.
#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Worker threads, each bound to its own model CPU.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seed of the random workload (each thread derives its own).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The one result row.
#[derive(Serialize, Debug)]
pub struct SoakRow {
    pub seconds: u64,
    pub threads: usize,
    pub ops: u64,
    pub violations: u64,
}

/// Devices: one per domain.
const DEV_STRICT: u32 = 0x50;
const DEV_DEFERRED: u32 = 0x51;
const DEV_WAIT: u32 = 0x52;
/// IOVA pages of the waiting tag's domain: three 6-page loads do not fit, so loads queue.
pub const WAIT_SPACE_PAGES: u64 = 12;
/// Source pages per thread: loads of up to 4 runs of up to 3 pages each.
const THREAD_PAGES: u64 = 32;
/// Deferred domain: small queue and age bounds so both flush causes happen during a soak.
const DEFERRED: InvalidationPolicy = InvalidationPolicy::Deferred { max_entries: 16, max_age_ns: 200_000 };

type Dom<'a> = fixture::VtdDomain<'a, IovaAllocator>;

/// Counts and reports one violation.
struct Violations(AtomicU64);
impl Violations {
    fn report(&self, what: std::fmt::Arguments<'_>) {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        if n < 20 {
            eprintln!("soak: VIOLATION: {what}");
        }
    }
}

/// How the device reaches a map's segments.
#[derive(Clone, Copy)]
enum Path<'a, 'm> {
    Physical,
    Iommu(&'a ModelIommu<'m>, u32),
}

impl Path<'_, '_> {
    fn read(&self, m: &HostPlatform, s: &Segment, buf: &mut [u8]) -> bool {
        match self {
            Path::Physical => m.read_phys(PhysAddr::new(s.addr.raw()), buf).is_ok(),
            Path::Iommu(iommu, dev) => iommu.port(*dev).dma_read(s.addr, buf).is_ok(),
        }
    }
    fn write(&self, m: &HostPlatform, s: &Segment, data: &[u8]) -> bool {
        match self {
            Path::Physical => m.write_phys(PhysAddr::new(s.addr.raw()), data).is_ok(),
            Path::Iommu(iommu, dev) => iommu.port(*dev).dma_write(s.addr, data).is_ok(),
        }
    }
}

/// One operation on `map`: load, check, maybe device write, unload, check.
#[allow(clippy::too_many_arguments)]
fn one_op<S: Strategy<HostPlatform>>(
    m: &HostPlatform,
    map: &mut DmaMap<'_, HostPlatform, S>,
    path: Path<'_, '_>,
    strict: bool,
    base: u64,
    rng: &mut Rng,
    v: &Violations,
    name: &str,
) {
    // 1..=4 non-overlapping runs in the thread's memory.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for _ in 0..=rng.below(4) {
        let start = base + rng.below(THREAD_PAGES - 3) * PAGE_SIZE + rng.below(PAGE_SIZE);
        let len = 1 + rng.below(2 * PAGE_SIZE);
        if runs.iter().all(|&(p, l)| start + len <= p || p + l <= start) {
            runs.push((start, len));
        }
    }
    let sg: Vec<SgEntry> =
        runs.iter().map(|&(pa, len)| SgEntry { pa: PhysAddr::new(pa), len, kind: MemKind::Page }).collect();
    let dir = [Direction::ToDevice, Direction::FromDevice, Direction::Bidirectional][rng.below(3) as usize];
    // SAFETY: the lab's own model RAM, kept until every map of it is dropped.
    let segs = match map.load(&unsafe { SgList::new(&sg) }, dir) {
        Ok(s) => s.to_vec(),
        Err(e) => return v.report(format_args!("{name}: load of {runs:x?} failed: {e}")),
    };
    let total: u64 = runs.iter().map(|r| r.1).sum();
    if segs.iter().map(|s| s.len).sum::<u64>() != total {
        v.report(format_args!("{name}: segments do not add up to the load"));
    }
    let read_src = || {
        let mut out = Vec::new();
        for &(pa, len) in &runs {
            let mut b = vec![0u8; len as usize];
            let _ = m.read_phys(PhysAddr::new(pa), &mut b);
            out.extend(b);
        }
        out
    };
    if dir.device_reads() {
        if let Err(e) = map.sync(SyncOp::PREWRITE) {
            v.report(format_args!("{name}: PREWRITE: {e}"));
        }
        let mut got = Vec::new();
        for s in &segs {
            let mut b = vec![0u8; s.len as usize];
            if !path.read(m, s, &mut b) {
                v.report(format_args!("{name}: device read of a loaded segment faulted"));
            }
            got.extend(b);
        }
        if got != read_src() {
            v.report(format_args!("{name}: the device read other bytes than were loaded"));
        }
        let _ = map.sync(SyncOp::POSTWRITE);
    }
    if dir.device_writes() {
        if let Err(e) = map.sync(SyncOp::PREREAD) {
            v.report(format_args!("{name}: PREREAD: {e}"));
        }
        let seed = rng.next() as u8 | 1;
        let data: Vec<u8> = (0..total).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)).collect();
        let mut off = 0usize;
        for s in &segs {
            if !path.write(m, s, &data[off..off + s.len as usize]) {
                v.report(format_args!("{name}: device write to a loaded segment faulted"));
            }
            off += s.len as usize;
        }
        if let Err(e) = map.sync(SyncOp::POSTREAD) {
            v.report(format_args!("{name}: POSTREAD: {e}"));
        }
        if read_src() != data {
            v.report(format_args!("{name}: the device's bytes did not reach the loaded memory"));
        }
    }
    if let Err(e) = map.unload() {
        v.report(format_args!("{name}: unload: {e}"));
    }
    if strict {
        if let Path::Iommu(iommu, dev) = path {
            let port = iommu.port(dev);
            let reachable = segs.iter().any(|s| {
                let mut b = [0u8; 1];
                port.dma_read(s.addr, &mut b).is_ok()
            });
            if reachable {
                v.report(format_args!("{name}: a segment is reachable after a strict unload"));
            }
        }
    }
}

type WaitTag<'a> = Tag<'a, HostPlatform, IommuPerMap<&'a Dom<'a>>>;
type WaitMap<'a> = DmaMap<'a, HostPlatform, IommuPerMap<&'a Dom<'a>>>;
type WaitPending<'a> = PendingLoad<'a, HostPlatform, IommuPerMap<&'a Dom<'a>>>;

/// One deferred-load operation (module doc): three loads through the waiting tag, some queued,
/// some cancelled, all completed or cancelled before it returns, every map back in `maps`.
fn wait_op<'a>(
    m: &HostPlatform,
    tag: &WaitTag<'a>,
    maps: &mut Vec<WaitMap<'a>>,
    iommu: &ModelIommu<'_>,
    base: u64,
    rng: &mut Rng,
    v: &Violations,
) {
    type Calls = std::sync::Arc<AtomicU64>;
    let check = |map: &mut WaitMap<'a>, run: (u64, u64), calls: &Calls| {
        if calls.load(Ordering::SeqCst) != 1 {
            v.report(format_args!(
                "deferred: a loaded map's callback ran {} times",
                calls.load(Ordering::SeqCst)
            ));
        }
        if let Err(e) = map.sync(SyncOp::PREWRITE) {
            v.report(format_args!("deferred: PREWRITE: {e}"));
        }
        let port = iommu.port(DEV_WAIT);
        let mut got = Vec::new();
        for s in map.segments() {
            let mut b = vec![0u8; s.len as usize];
            if port.dma_read(s.addr, &mut b).is_err() {
                v.report(format_args!("deferred: device read of a completed load faulted"));
            }
            got.extend(b);
        }
        let mut want = vec![0u8; run.1 as usize];
        let _ = m.read_phys(PhysAddr::new(run.0), &mut want);
        if got != want {
            v.report(format_args!("deferred: the device read other bytes than were loaded"));
        }
        let _ = map.sync(SyncOp::POSTWRITE);
        if let Err(e) = map.unload() {
            v.report(format_args!("deferred: unload: {e}"));
        }
    };
    let mut pending: Vec<(WaitPending<'a>, (u64, u64), Calls)> = Vec::new();
    let mut loaded: Vec<(WaitMap<'a>, (u64, u64), Calls)> = Vec::new();
    for _ in 0..3 {
        let Some(map) = maps.pop() else { break };
        let pages = 2 + rng.below(5);
        let run = (base + rng.below(THREAD_PAGES - pages + 1) * PAGE_SIZE, pages * PAGE_SIZE);
        let calls: Calls = Calls::default();
        let c = calls.clone();
        let cb: DeferredCallback<'a, HostPlatform, IommuPerMap<&'a Dom<'a>>> = Box::new(move |res| {
            c.fetch_add(1, Ordering::SeqCst);
            if let Err(e) = res {
                // Cancelled is counted by the caller; anything else is a failure the soak reports.
                if e != busdma::Error::Cancelled {
                    c.fetch_add(1000, Ordering::SeqCst);
                }
            }
        });
        let src = [(PhysAddr::new(run.0), run.1)];
        // SAFETY: the lab's own model RAM, kept until every map of it is dropped.
        match map.load_or_defer(&unsafe { RawSegments::new(&src) }, Direction::ToDevice, cb) {
            // Loaded at once: the callback was dropped without running; count it as run.
            Ok(Deferrable::Loaded(mm)) => {
                calls.fetch_add(1, Ordering::SeqCst);
                loaded.push((mm, run, calls));
            }
            Ok(Deferrable::Deferred(p)) => pending.push((p, run, calls)),
            Err((e, mm)) => {
                v.report(format_args!("deferred: load_or_defer of {pages} pages failed: {e}"));
                maps.push(mm);
            }
        }
    }
    // Cancel a quarter of the queued loads.
    let mut kept = Vec::new();
    for (p, run, calls) in pending {
        if rng.below(4) != 0 {
            kept.push((p, run, calls));
            continue;
        }
        match p.cancel() {
            Ok(mut mm) if mm.is_loaded() => {
                check(&mut mm, run, &calls); // completed before the cancel: a normal load
                maps.push(mm);
            }
            Ok(mm) => {
                if calls.load(Ordering::SeqCst) != 1 {
                    v.report(format_args!(
                        "deferred: a cancelled load's callback ran {} times",
                        calls.load(Ordering::SeqCst)
                    ));
                }
                maps.push(mm);
            }
            Err(back) => kept.push((back, run, calls)), // being retried right now
        }
    }
    for (mut mm, run, calls) in loaded {
        check(&mut mm, run, &calls);
        maps.push(mm);
    }
    // Everything this thread held is unloaded: each queued load now waits only for the other
    // threads' loads, which they unload in bounded time.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !kept.is_empty() {
        let mut still = Vec::new();
        for (p, run, calls) in kept {
            match p.try_finish() {
                Ok(mut mm) => {
                    if mm.is_loaded() {
                        check(&mut mm, run, &calls);
                    } else {
                        v.report(format_args!(
                            "deferred: a queued load failed (callback count {})",
                            calls.load(Ordering::SeqCst)
                        ));
                    }
                    maps.push(mm);
                }
                Err(p) => still.push((p, run, calls)),
            }
        }
        kept = still;
        if Instant::now() > deadline {
            v.report(format_args!(
                "deferred: {} queued loads not completed in 20 s (lost wake-up?): {:?}",
                kept.len(),
                tag.deferred_stats()
            ));
            // Leave them queued; the end-of-run check reports the queue too.
            for (p, _, _) in kept.drain(..) {
                std::mem::forget(p);
            }
            break;
        }
        std::thread::yield_now();
    }
}

/// Pages of each thread's windows.
const WINDOW_PAGES: u64 = 16;
/// Links a window holds at most.
const WINDOW_LINKS: usize = 6;

/// A window and its reference: page offset -> (pages, bytes, unlinked), free buffers.
struct WindowRig<'a, S: WindowSource<HostPlatform>> {
    w: DmaWindow<'a, HostPlatform, S, DmaMemory<'a, HostPlatform>>,
    links: std::collections::BTreeMap<u64, (u64, bool)>,
    free: Vec<DmaMemory<'a, HostPlatform>>,
    path: Path<'a, 'a>,
    deferred: bool,
    name: &'static str,
}

impl<'a, S: WindowSource<HostPlatform>> WindowRig<'a, S> {
    fn new(
        m: &'a HostPlatform,
        tag: &Tag<'a, HostPlatform, S>,
        path: Path<'a, 'a>,
        deferred: bool,
        name: &'static str,
    ) -> Result<Self, String> {
        let w =
            tag.create_window(WINDOW_PAGES * PAGE_SIZE, WINDOW_LINKS).map_err(|e| format!("{name}: {e}"))?;
        let mut free = Vec::new();
        // At most the tag's maximum segment (2 pages): a link is one segment.
        for pages in [1, 1, 2, 2, 1, 2, 1, 2] {
            let d = DmaMemory::alloc(m, tag.spec(), pages * PAGE_SIZE, MemAttr::WriteBack)
                .map_err(|e| format!("{name}: {e}"))?;
            free.push(d);
        }
        Ok(Self { w, links: Default::default(), free, path, deferred, name })
    }

    /// Pages `[at, at + pages)` are free in the reference.
    fn pages_free(&self, at: u64, pages: u64) -> bool {
        self.links.iter().all(|(&o, &(n, _))| at + pages <= o || o + n <= at)
    }

    fn op(&mut self, m: &HostPlatform, rng: &mut Rng, v: &Violations) {
        let name = self.name;
        match rng.below(8) {
            0..=3 if !self.free.is_empty() => {
                let buf = self.free.swap_remove(rng.below(self.free.len() as u64) as usize);
                let pages = buf.len() / PAGE_SIZE;
                let at = rng.below(WINDOW_PAGES - pages + 1);
                let seed = rng.next() as u8 | 1;
                let data: Vec<u8> =
                    (0..buf.len()).map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed)).collect();
                if buf.write(0, &data).is_err() {
                    v.report(format_args!("{name}: the CPU could not fill a buffer"));
                }
                let expect_ok = self.pages_free(at, pages) && self.links.len() < WINDOW_LINKS;
                match self.w.link(at * PAGE_SIZE, buf, Direction::ToDevice) {
                    Ok(l) => {
                        if !expect_ok {
                            v.report(format_args!(
                                "{name}: a link over taken pages or past the limit succeeded"
                            ));
                        }
                        let mut got = vec![0u8; l.len as usize];
                        let seg = Segment { addr: l.iova, len: l.len };
                        if !self.path.read(m, &seg, &mut got) || got != data {
                            v.report(format_args!("{name}: the device did not read the linked bytes"));
                        }
                        self.links.insert(at, (pages, false));
                    }
                    Err(e) => {
                        if expect_ok {
                            v.report(format_args!("{name}: a link of free pages failed: {:?}", e.error));
                        }
                        match e.buffer {
                            Some(b) => self.free.push(b),
                            None => v.report(format_args!("{name}: a refused link kept its buffer")),
                        }
                    }
                }
            }
            4 | 5 => {
                let live: Vec<u64> = self.links.iter().filter(|l| !l.1.1).map(|l| *l.0).collect();
                if !live.is_empty() {
                    let at = live[rng.below(live.len() as u64) as usize];
                    match self.w.unlink(at * PAGE_SIZE) {
                        Ok(()) => {
                            if let Some(l) = self.links.get_mut(&at) {
                                l.1 = true;
                            }
                        }
                        Err(e) => v.report(format_args!("{name}: unlink of a link failed: {e}")),
                    }
                }
            }
            _ => {
                let lazy = self.deferred && rng.below(2) == 0;
                let marked: Vec<u64> = self.links.iter().filter(|l| l.1.1).map(|l| *l.0).collect();
                let mut back = Vec::new();
                let r = if lazy {
                    self.w.commit_lazy(|off, b| back.push((off, b)))
                } else {
                    self.w.commit(|off, b| back.push((off, b)))
                };
                if let Err(e) = r {
                    v.report(format_args!("{name}: commit: {e}"));
                }
                for (off, b) in back {
                    match self.links.remove(&(off / PAGE_SIZE)) {
                        Some((_, true)) => {}
                        _ => v.report(format_args!("{name}: a buffer came back that was not unlinked")),
                    }
                    self.free.push(b);
                }
                if !lazy {
                    if self.links.values().any(|l| l.1) {
                        v.report(format_args!("{name}: a forced commit kept an unlinked buffer"));
                    }
                    let base = self.w.iova().start().raw();
                    for at in marked {
                        let seg = Segment { addr: Iova::new(base + at * PAGE_SIZE), len: 1 };
                        if !self.links.contains_key(&at) && self.path.read(m, &seg, &mut [0u8; 1]) {
                            v.report(format_args!(
                                "{name}: an unlinked page is reachable after a forced commit"
                            ));
                        }
                    }
                }
            }
        }
    }

    fn finish(self, v: &Violations) {
        let name = self.name;
        let mut n = 0usize;
        let want = self.links.len();
        let st = self.w.stats();
        if st.links == 0 || st.batches == 0 || st.refused == 0 {
            v.report(format_args!("{name}: links, batches or refusals never happened: {st:?}"));
        }
        if let Err(e) = self.w.destroy(|_, _| n += 1) {
            v.report(format_args!("{name}: destroy: {e}"));
        }
        if n != want {
            v.report(format_args!("{name}: destroy gave back {n} buffers of {want}"));
        }
    }
}

fn domain<'a>(
    m: &'a HostPlatform,
    iommu: &'a ModelIommu<'a>,
    pool: &'a TablePool<'a, HostPlatform>,
    dev: u32,
    id: u16,
    policy: InvalidationPolicy,
) -> Result<Dom<'a>, String> {
    // SAFETY: `run` detaches both devices before the domains are dropped.
    unsafe { fixture::vtd_domain(m, iommu, pool, dev, id, policy, fixture::iova_allocator(m, true)?) }
}

/// Runs the soak; returns its one row.
pub fn run(args: &SoakArgs) -> Result<SoakRow, String> {
    let threads = args.threads.max(1);
    let cfg = MachineConfig { cpus: threads, ..MachineConfig::with_ram(128 << 20) };
    let m = HostPlatform::new(cfg).map_err(|e| format!("cannot build the machine model: {e}"))?;
    // RAM starts at 16 MiB: take everything below 64 MiB so that the sources lie above the
    // 26-bit limit of the bounce tag, then give it back for bounce pages and tables.
    let low = m.frames().alloc(FrameRequest::pages(12288)).map_err(|e| e.to_string())?;
    let src =
        m.frames().alloc(FrameRequest::pages(THREAD_PAGES * threads as u64)).map_err(|e| e.to_string())?;
    // SAFETY: `low` was allocated just above and nothing refers to it.
    unsafe { m.free_pages(low, 12288) };
    let table_pages0 = m.counters().table_pages_live.load(Ordering::Relaxed);
    let iommu = ModelIommu::new(&m, IommuConfig { audit: true, ..IommuConfig::default() })
        .map_err(|e| e.to_string())?;
    let pool = TablePool::new(&m);
    let v = Violations(AtomicU64::new(0));
    let ops = AtomicU64::new(0);
    {
        let strict = domain(&m, &iommu, &pool, DEV_STRICT, 1, InvalidationPolicy::Strict)?;
        let deferred = domain(&m, &iommu, &pool, DEV_DEFERRED, 2, DEFERRED)?;
        let wait_space =
            AddrRange::new(Iova::new(1 << 20), Iova::new((1 << 20) + WAIT_SPACE_PAGES * PAGE_SIZE))
                .map_err(|e| e.to_string())?;
        let wait_iova =
            IovaAllocator::new(wait_space, IovaConfig { cpus: threads, caches: false, guard_page: false })
                .map_err(|e| format!("IOVA allocator: {e}"))?;
        // SAFETY: `run` detaches the device before the domain is dropped.
        let waitd = unsafe {
            fixture::vtd_domain(&m, &iommu, &pool, DEV_WAIT, 3, InvalidationPolicy::Strict, wait_iova)?
        };
        let mut wait_spec = TagSpec::new(8 * PAGE_SIZE, 8);
        wait_spec.flags.may_wait = true;
        let wait_tag = Tag::new_root(&m, IommuPerMap(&waitd), wait_spec).map_err(|e| e.to_string())?;
        let qm = QuickMaps::for_platform(&m);
        let zones = BounceZones::new(&m, ZoneConfig::default());
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        std::thread::scope(|sc| {
            for t in 0..threads {
                let (m, strict, deferred, qm, zones, v, ops, iommu, wait_tag) =
                    (&m, &strict, &deferred, &qm, &zones, &v, &ops, &iommu, &wait_tag);
                sc.spawn(move || {
                    let _bind = match m.bind_cpu(t) {
                        Ok(b) => b,
                        Err(e) => return v.report(format_args!("thread {t}: cannot bind to its CPU: {e}")),
                    };
                    let mut rng =
                        Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(t as u64 + 1) | 1);
                    let base = src.raw() + t as u64 * THREAD_PAGES * PAGE_SIZE;
                    let mut spec = TagSpec::new(16 * PAGE_SIZE, 16);
                    spec.max_segment_size = 2 * PAGE_SIZE;
                    let mut low = spec;
                    low.dma_mask = TagSpec::mask_of_bits(26);
                    let mut untrusted = spec;
                    untrusted.flags.untrusted = true;
                    let tags = (
                        Tag::new_root(m, Direct, spec),
                        Tag::new_root(m, Bounced::direct(Direct, zones, qm), low),
                        Tag::new_root(m, IommuPerMap(strict), spec),
                        Tag::new_root(m, IommuPerSegment(deferred), spec),
                        Tag::new_root(m, IommuReserved::new(strict), spec),
                        Tag::new_root(m, IommuReserved::alternating(deferred, 2), spec),
                        Tag::new_root(m, Bounced::over_iommu(IommuPerMap(strict), zones, qm), untrusted),
                    );
                    let (Ok(t0), Ok(t1), Ok(t2), Ok(t3), Ok(t4), Ok(t5), Ok(t6)) = tags else {
                        return v.report(format_args!("thread {t}: a tag was refused"));
                    };
                    let maps = (
                        t0.create_map(),
                        t1.create_map(),
                        t2.create_map(),
                        t3.create_map(),
                        t4.create_map(),
                        t5.create_map(),
                        t6.create_map(),
                    );
                    let (Ok(mut m0), Ok(mut m1), Ok(mut m2), Ok(mut m3), Ok(mut m4), Ok(mut m5), Ok(mut m6)) =
                        maps
                    else {
                        return v.report(format_args!("thread {t}: a map could not be created"));
                    };
                    let Ok(mut wait_maps) =
                        (0..3).map(|_| wait_tag.create_map()).collect::<Result<Vec<_>, _>>()
                    else {
                        return v.report(format_args!("thread {t}: a waiting map could not be created"));
                    };
                    let (ps, pd) = (Path::Iommu(iommu, DEV_STRICT), Path::Iommu(iommu, DEV_DEFERRED));
                    let windows = (
                        WindowRig::new(m, &t2, ps, false, "window strict"),
                        WindowRig::new(m, &t3, pd, true, "window deferred"),
                    );
                    let (Ok(mut ws), Ok(mut wd)) = windows else {
                        return v.report(format_args!("thread {t}: a window could not be created"));
                    };
                    let r = &mut rng;
                    while Instant::now() < deadline {
                        for _ in 0..64 {
                            match r.below(10) {
                                7 => wait_op(m, wait_tag, &mut wait_maps, iommu, base, r, v),
                                8 => ws.op(m, r, v),
                                9 => wd.op(m, r, v),
                                0 => one_op(m, &mut m0, Path::Physical, false, base, r, v, "direct"),
                                1 => one_op(m, &mut m1, Path::Physical, false, base, r, v, "bounce"),
                                2 => one_op(m, &mut m2, ps, true, base, r, v, "per-map strict"),
                                3 => one_op(m, &mut m3, pd, false, base, r, v, "per-segment deferred"),
                                4 => one_op(m, &mut m4, ps, true, base, r, v, "reserved strict"),
                                5 => one_op(m, &mut m5, pd, false, base, r, v, "reserved deferred"),
                                _ => one_op(m, &mut m6, ps, true, base, r, v, "bounce over IOMMU"),
                            }
                        }
                        ops.fetch_add(64, Ordering::Relaxed);
                    }
                    ws.finish(v);
                    wd.finish(v);
                });
            }
        });
        // Every map is gone: the counters must balance.
        let g = m.pin_cpu();
        strict.flush(&g).map_err(|e| format!("strict flush: {e}"))?;
        deferred.flush(&g).map_err(|e| format!("deferred flush: {e}"))?;
        drop(g);
        for (name, d) in [("strict", &strict), ("deferred", &deferred)] {
            let live = d.iova().stats().live_ranges;
            if live != 0 {
                v.report(format_args!("{name} domain: {live} IOVA ranges live after every map is gone"));
            }
        }
        let st = wait_tag.deferred_stats();
        if st.waiting != 0 || st.failed != 0 || st.deferred != st.completed + st.cancelled {
            v.report(format_args!("deferred loads do not balance at the end: {st:?}"));
        }
        if st.deferred == 0 && args.seconds > 0 {
            v.report(format_args!("no load was ever deferred: the deferred path was not exercised"));
        }
        eprintln!(
            "soak: deferred loads: {} queued, {} completed, {} cancelled",
            st.deferred, st.completed, st.cancelled
        );
        drop(wait_tag);
        if waitd.iova().stats().live_ranges != 0 {
            v.report(format_args!("waiting domain: IOVA ranges live after every map is gone"));
        }
        let in_use: u64 = zones.stats().iter().map(|z| z.1.total_pages - z.1.free_pages).sum();
        if in_use != 0 {
            v.report(format_args!("{in_use} bounce pages in use after every map is gone"));
        }
        let _ = iommu.detach(DEV_STRICT);
        let _ = iommu.detach(DEV_DEFERRED);
        let _ = iommu.detach(DEV_WAIT);
    }
    if let Some(rep) = iommu.audit_report() {
        for _ in 0..rep.violation_count {
            v.report(format_args!("model IOMMU audit: {:?}", rep.violations.first()));
        }
    }
    drop(pool);
    let tables = m.counters().table_pages_live.load(Ordering::Relaxed);
    if tables != table_pages0 {
        v.report(format_args!("{} table pages not given back", tables.saturating_sub(table_pages0)));
    }
    Ok(SoakRow {
        seconds: args.seconds,
        threads,
        ops: ops.load(Ordering::Relaxed),
        violations: v.0.load(Ordering::Relaxed),
    })
}
