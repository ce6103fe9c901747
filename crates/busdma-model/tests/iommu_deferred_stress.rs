//! Deferred invalidation under load: 1 000 000 random map/unmap operations on two threads,
//! each bound to its own model CPU, on one domain of the model IOMMU with its audit on.
//!
//! What is checked, and by whom:
//! - **No early reuse (the model's audit).** Every IOVA range and table page the domain
//!   releases, and every range it maps, is checked against every translation the hardware may
//!   still cache (every walk since the last invalidation covering it). Any hit is a violation.
//! - **The device sees the right memory (the test).** After each map and before each unmap
//!   the device reads every page of small maps through the IOMMU (IOTLB included) and finds
//!   the tag written for this very map; an IOVA reused under a stale IOTLB entry would show
//!   another map's tag. Large maps are translated at both ends and the middle.
//! - **Bounded exposure (the model's audit).** From each unmap to the first invalidation that
//!   started after it: at most `cpus × max_entries` (+ one in flight per CPU) unmaps of the
//!   domain, and at most `max_age_ns` plus a few clock steps of the frozen, op-driven clock.
//! - **Both bounds and the table-page path are exercised**: busy phases (maps and unmaps only)
//!   fill queues, quiet phases (device reads and timer polls, few unmaps) let them age, so
//!   flushes by count and by age both happen on each thread however the host schedules it;
//!   large maps free leaf tables (counted), so the table-page check has teeth. Only maps and
//!   unmaps count toward the operation total.

use std::sync::atomic::{AtomicU64, Ordering};

use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest};
use busdma::pgtable::{ArmLpaeS1, PageTable, PageTableConfig, Prot, PteFormat, TablePool, VtdSl};
use busdma::{AddrRange, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{
    Context, DmaPort, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat,
};

const DEV: u32 = 0x30;
const CPUS: usize = 2;
/// Queue bounds small enough that both fire thousands of times: 32 unmaps of one CPU take
/// about 64 clock steps (half a thread's operations unmap; the clock steps once per iteration
/// of the slowest thread, see `LockstepClock`), so a
/// 100-step age bound and the count bound take turns.
const MAX_ENTRIES: usize = 32;
const MAX_AGE_NS: u64 = 100_000;
/// Clock advance per operation: 1 µs, so 100 operations of the domain make an entry due.
const STEP_NS: u64 = 1_000;
/// Live maps per thread at most: keeps the IOVA space and frames busy, and reuse frequent.
const LIVE: usize = 24;
/// Operations per busy phase (maps and unmaps only) and per quiet phase (90% device reads
/// and timer polls): a quiet phase of 500 clock steps outlasts the 100-step age bound.
const BUSY: u64 = 2000;
const QUIET: u64 = 500;
/// Data frames per thread (small maps use 1 to 4 of them, one per segment).
const FRAMES: u64 = 128;

/// xorshift64*: a small deterministic generator, seeded per thread.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Live {
    alloc: AddrRange<Iova>,
    segs: Vec<AddrRange<Iova>>,
    /// Small maps: each segment's frame and tag. Large maps: the PA of the first page.
    frames: Vec<(PhysAddr, u64)>,
    big_pa: Option<PhysAddr>,
}

fn check_live(iommu: &ModelIommu<'_>, l: &Live) {
    let port = iommu.port(DEV);
    match l.big_pa {
        None => {
            for (s, &(_, tag)) in l.segs.iter().zip(&l.frames) {
                let mut b = [0u8; 8];
                port.dma_read(s.start(), &mut b).unwrap_or_else(|f| panic!("live page faulted: {f}"));
                assert_eq!(
                    u64::from_le_bytes(b),
                    tag,
                    "device reached another map's page at {:?}",
                    s.start()
                );
            }
        }
        Some(pa) => {
            let s = l.segs[0];
            for off in [0, (s.len() / 2) & !(PAGE_SIZE - 1), s.len() - PAGE_SIZE] {
                let got = iommu.translate(DEV, Iova::new(s.start().raw() + off), true).unwrap();
                assert_eq!(got, PhysAddr::new(pa.raw() + off));
            }
        }
    }
}

/// The frozen clock, driven by the slowest thread (no thread runs more than one iteration
/// ahead of another): it advances one step each time *every*
/// running thread has finished one more iteration. A thread the host deschedules (say between
/// clearing entries and queueing them) therefore stops model time instead of watching its own
/// entries age while the other thread runs on: model time measures the domain's own progress,
/// as it would on a machine whose CPUs are not preempted inside unmap, and the exposure bound
/// is checked against it whatever the host does.
struct LockstepClock {
    iterations: [AtomicU64; CPUS],
    advanced: AtomicU64,
}

impl LockstepClock {
    const DONE: u64 = u64::MAX;

    fn new() -> Self {
        Self { iterations: [const { AtomicU64::new(0) }; CPUS], advanced: AtomicU64::new(0) }
    }

    /// Counts one iteration of `cpu`, advances the platform's clock to the slowest running
    /// thread's count, then waits until no running thread is more than one iteration behind.
    ///
    /// The wait bounds the lead: without it a thread could run many iterations ahead, and when
    /// it is descheduled mid-unmap (between clearing entries and queueing them, or between
    /// finding the queues due and invalidating) the slower thread would catch up and move the
    /// clock by that whole lead. With a lead of at most one, model time moves at most one step
    /// inside any iteration of any thread, which is what the exposure bound below relies on.
    fn tick(&self, m: &HostPlatform, cpu: usize) {
        let mine = self.iterations[cpu].fetch_add(1, Ordering::SeqCst) + 1;
        self.catch_up(m);
        let mut spins = 0u32;
        while self.iterations.iter().any(|i| i.load(Ordering::SeqCst) < mine - 1) {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// `cpu` runs no more iterations: it no longer holds the clock back.
    fn finish(&self, m: &HostPlatform, cpu: usize) {
        self.iterations[cpu].store(Self::DONE, Ordering::SeqCst);
        self.catch_up(m);
    }

    fn catch_up(&self, m: &HostPlatform) {
        let Some(min) =
            self.iterations.iter().map(|i| i.load(Ordering::SeqCst)).filter(|&v| v != Self::DONE).min()
        else {
            return;
        };
        let mut seen = self.advanced.load(Ordering::SeqCst);
        while min > seen {
            match self.advanced.compare_exchange(seen, min, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => {
                    m.advance_clock((min - seen) * STEP_NS);
                    return;
                }
                Err(now) => seen = now,
            }
        }
    }
}

fn stress<F: PteFormat>(format: TableFormat, ops_per_thread: u64) {
    // The two tests of this file run one at a time: four busy threads on a 2-CPU host would
    // make every run a preemption test.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let clock = LockstepClock::new();
    let m = HostPlatform::new(MachineConfig { cpus: CPUS, ..MachineConfig::with_ram(64 << 20) }).unwrap();
    m.freeze_clock();
    let iommu = ModelIommu::new(&m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap();
    let pool = TablePool::new(&m);
    let pt =
        PageTable::<_, F>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(3, pt.root(), format, 48)) }.unwrap();
    let space = AddrRange::from_start_len(Iova::new(1 << 32), 256 << 20).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: CPUS, caches: true, guard_page: false }).unwrap();
    let policy = InvalidationPolicy::Deferred { max_entries: MAX_ENTRIES, max_age_ns: MAX_AGE_NS };
    let d = Domain::new(&m, pt, iova, &iommu, DomainConfig { id: 3, policy, untrusted: false }).unwrap();
    let maps = AtomicU64::new(0);
    let tags = AtomicU64::new(1);
    std::thread::scope(|s| {
        for cpu in 0..CPUS {
            let (m, d, iommu, maps, tags, clock) = (&m, &d, &iommu, &maps, &tags, &clock);
            s.spawn(move || {
                let _bind = m.bind_cpu(cpu).unwrap();
                let frames = m.alloc_frames(FrameRequest::pages(FRAMES)).unwrap();
                let mut free_frames: Vec<u64> = (0..FRAMES).collect();
                // Large maps point far outside RAM (translation only), at an address that is
                // not 2 MiB-aligned so they are built of leaf tables, which their unmaps free.
                let big_base = 0x40_0000_0000 * (cpu as u64 + 1) + PAGE_SIZE;
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (cpu as u64 + 1));
                let mut live: Vec<Live> = Vec::new();
                let mut done = 0u64;
                for i in 0u64.. {
                    if done == ops_per_thread {
                        clock.finish(m, cpu);
                        break;
                    }
                    clock.tick(m, cpu);
                    let g = m.pin_cpu();
                    // The machine's timer: every clock step checks the queues' age, as Linux's
                    // flush-queue timer does, so an aged entry is flushed even while its CPU
                    // only maps (the age bound is enforced by timer or by the next unmap).
                    d.poll(&g).unwrap();
                    // Quiet phases: mostly DMA to live maps and a timer poll, so queues fill
                    // slowly and the age bound fires; busy phases: only maps and unmaps, so
                    // the count bound fires. Each thread sees both, however it is scheduled.
                    if i % (BUSY + QUIET) >= BUSY && rng.below(10) != 0 {
                        if !live.is_empty() {
                            check_live(iommu, &live[rng.below(live.len() as u64) as usize]);
                        }
                        d.poll(&g).unwrap();
                        continue;
                    }
                    done += 1;
                    let map = live.is_empty() || (live.len() < LIVE && rng.below(2) == 0);
                    if !map {
                        let l = live.swap_remove(rng.below(live.len() as u64) as usize);
                        check_live(iommu, &l);
                        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                        unsafe { d.unmap(&g, &l.segs, &[l.alloc]) }.unwrap();
                        free_frames.extend(
                            l.frames.iter().map(|&(pa, _)| (pa.raw() - frames.pa().raw()) / PAGE_SIZE),
                        );
                        continue;
                    }
                    let big = rng.below(10) == 0;
                    let l = if big {
                        let pages = 512 + rng.below(513);
                        let req = IovaRequest {
                            size: pages * PAGE_SIZE,
                            align: 2 << 20,
                            ..IovaRequest::pages(pages)
                        };
                        let alloc = d.alloc_iova(&g, &req).unwrap();
                        let pa = PhysAddr::new(big_base + rng.below(64) * (4 << 20));
                        // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                        unsafe { d.map(&g, alloc.start(), pa, alloc.len(), Prot::READ_WRITE) }.unwrap();
                        Live { alloc, segs: vec![alloc], frames: Vec::new(), big_pa: Some(pa) }
                    } else {
                        let n = 1 + rng.below(4);
                        let alloc = d.alloc_iova(&g, &IovaRequest::pages(n)).unwrap();
                        let mut segs = Vec::new();
                        let mut fr = Vec::new();
                        for i in 0..n {
                            let k = free_frames.swap_remove(rng.below(free_frames.len() as u64) as usize);
                            let pa = frames.pa().checked_add(k * PAGE_SIZE).unwrap();
                            let tag = tags.fetch_add(1, Ordering::Relaxed);
                            m.write_phys(pa, &tag.to_le_bytes()).unwrap();
                            let seg = AddrRange::from_start_len(
                                Iova::new(alloc.start().raw() + i * PAGE_SIZE),
                                PAGE_SIZE,
                            )
                            .unwrap();
                            // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                            unsafe { d.map(&g, seg.start(), pa, PAGE_SIZE, Prot::READ) }.unwrap();
                            segs.push(seg);
                            fr.push((pa, tag));
                        }
                        Live { alloc, segs, frames: fr, big_pa: None }
                    };
                    maps.fetch_add(1, Ordering::Relaxed);
                    check_live(iommu, &l);
                    live.push(l);
                }
                let g = m.pin_cpu();
                for l in live.drain(..) {
                    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
                    unsafe { d.unmap(&g, &l.segs, &[l.alloc]) }.unwrap();
                }
                d.flush(&g).unwrap();
            });
        }
    });
    let g = m.pin_cpu();
    d.flush(&g).unwrap();
    drop(g);
    let st = d.stats();
    let rep = iommu.audit_report().unwrap();
    let hw = iommu.stats();
    let name = F::NAME;
    eprintln!("{name}: {st:?}\n{name}: {rep:?}\n{name}: {hw:?}");
    assert_eq!(rep.violation_count, 0, "{name}: released or remapped while cached: {:?}", rep.violations);
    assert_eq!(st.release_errors, 0);
    assert_eq!(st.iova_released, maps.load(Ordering::Relaxed), "{name}: every map's IOVA came back");
    assert_eq!((d.pending(), rep.pending), (0, 0), "{name}: everything flushed");
    assert!(st.table_pages_released > 100, "{name}: the table-page path ran ({st:?})");
    assert!(rep.exposures > 0);
    let count_bound = (CPUS * MAX_ENTRIES + CPUS) as u64;
    // No flush drains more than the count bound, so at least unmaps / count_bound flushes ran
    // (how many more, by age, depends on how the host schedules the two threads).
    assert!(
        st.flushes >= st.unmaps / count_bound && st.flushes > 500 && hw.inv_domain >= st.flushes,
        "{name}: {st:?}"
    );
    assert!(
        rep.max_exposure_unmaps <= count_bound,
        "{name}: exposure of {} unmaps > {count_bound}",
        rep.max_exposure_unmaps
    );
    let age_bound = MAX_AGE_NS + 4 * STEP_NS;
    assert!(rep.max_exposure_ns <= age_bound, "{name}: exposure of {} ns > {age_bound}", rep.max_exposure_ns);
    assert!(st.flushes_full >= 10 && st.flushes_aged >= 10, "{name}: both bounds fired ({st:?})");
    iommu.detach(DEV).unwrap();
}

#[test]
fn a_million_random_deferred_ops_on_two_cpus_never_reuse_before_the_covering_flush() {
    stress::<VtdSl>(TableFormat::VtdSecondLevel, 500_000);
}

#[test]
fn deferred_ops_on_arm_tables_never_reuse_before_the_covering_flush() {
    stress::<ArmLpaeS1>(TableFormat::ArmLpaeStage1, 50_000);
}
