//! Per-CPU emulation: CPU slots that threads bind to, and real preemption guards.
//!
//! # Theory
//!
//! 1. The machine has `n` CPU slots. A thread *binds* to a slot with
//!    [`HostPlatform::bind_cpu`](crate::HostPlatform::bind_cpu) and owns it until the
//!    returned [`CpuBinding`] drops; no other thread can bind it meanwhile. A bound thread's
//!    preemption guard costs a load and a compare: nobody else can run on its CPU.
//!    *Invariant*: the thread-local binding names `(machine, cpu)` only while that slot's
//!    owner word is this thread's token with `PERMANENT` set (bind claims the slot before it
//!    sets the binding; unbind clears the binding before it frees the slot; a
//!    [`CpuBinding`] is not `Send`, so both run on the bound thread). So a guard that finds
//!    the binding naming its machine reads neither the owner word nor the thread's token: the
//!    slot is its own (the guard a kernel's `preempt_disable` is, a depth count).
//! 2. An unbound thread is given a slot by a hash of its thread number; its preemption guard
//!    claims the slot with a compare-and-swap for the guard's lifetime, spinning (then
//!    yielding) while another thread holds it, exactly as a thread would wait to be scheduled
//!    on a busy CPU. So per-CPU data is never touched by two threads at once, bound or not.
//! 3. Guards nest on one thread (a depth count). Releasing a slot the thread does not hold is
//!    a bug in the caller and panics with both parties named: it would otherwise corrupt
//!    per-CPU state silently.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use busdma::{Error, Result};

/// Owner word: 0 = free; otherwise the owning thread's token, with [`PERMANENT`] set when the
/// thread bound the slot (as opposed to holding it for one guard).
const PERMANENT: u64 = 1 << 63;

/// Spins before a waiting thread yields its host CPU: long enough to cover a short critical
/// section of a busy peer (a few hundred ns), short enough not to burn a time slice when the
/// peer was descheduled by the host.
const SPINS_BEFORE_YIELD: u32 = 128;

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static TOKEN: u64 = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
    /// (machine id, cpu) this thread is bound to, machine id 0 meaning unbound.
    static BOUND: Cell<(u64, usize)> = const { Cell::new((0, 0)) };
}

pub(crate) fn thread_token() -> u64 {
    TOKEN.with(|t| *t)
}

/// One CPU slot, alone on its cache line (64 bytes on x86-64 and most Arm cores): two CPUs'
/// guards must not bounce one line between them.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct CpuSlot {
    owner: AtomicU64,
    depth: AtomicU32,
}

/// The CPU slots of one machine.
#[derive(Debug)]
pub(crate) struct Cpus {
    machine: u64,
    slots: Box<[CpuSlot]>,
}

static NEXT_MACHINE: AtomicU64 = AtomicU64::new(1);

impl Cpus {
    pub(crate) fn new(n: usize) -> Self {
        Self {
            machine: NEXT_MACHINE.fetch_add(1, Ordering::Relaxed),
            slots: (0..n).map(|_| CpuSlot::default()).collect(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// The slot the calling thread runs on.
    pub(crate) fn current(&self) -> usize {
        let (m, cpu) = BOUND.with(Cell::get);
        if m == self.machine { cpu } else { (thread_token() % self.slots.len() as u64) as usize }
    }

    pub(crate) fn bind(&self, cpu: usize) -> Result<()> {
        if cpu >= self.slots.len() {
            return Err(Error::OutOfRange { addr: cpu as u64, limit: self.slots.len() as u64 });
        }
        if BOUND.with(Cell::get).0 == self.machine {
            return Err(Error::BadState { what: "thread already bound to a CPU of this machine" });
        }
        let me = thread_token() | PERMANENT;
        let slot = &self.slots[cpu];
        let mut spins = 0;
        loop {
            match slot.owner.compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => break,
                Err(o) if o & PERMANENT != 0 => {
                    return Err(Error::Busy { what: "CPU slot bound to another thread", count: 1 });
                }
                Err(_) => backoff(&mut spins),
            }
        }
        BOUND.with(|b| b.set((self.machine, cpu)));
        Ok(())
    }

    pub(crate) fn unbind(&self, cpu: usize) {
        BOUND.with(|b| b.set((0, 0)));
        let slot = &self.slots[cpu];
        assert_eq!(slot.depth.load(Ordering::Relaxed), 0, "CPU {cpu} unbound inside a preemption guard");
        slot.owner.store(0, Ordering::Release);
    }

    /// True if the calling thread holds a preemption guard on `cpu` (what a per-CPU resource
    /// such as a quick-map window requires).
    pub(crate) fn held_by_current(&self, cpu: usize) -> bool {
        self.slots.get(cpu).is_some_and(|s| {
            s.owner.load(Ordering::Relaxed) & !PERMANENT == thread_token()
                && s.depth.load(Ordering::Relaxed) > 0
        })
    }

    /// The CPU slot the calling thread holds right now (bound to it, or inside a preemption
    /// guard on it), if any: while it holds the slot no other thread can take it, so the
    /// caller is the only writer of that slot's per-CPU data until it lets go.
    #[inline]
    pub(crate) fn held_slot(&self) -> Option<usize> {
        let cpu = self.current();
        let owner = self.slots.get(cpu)?.owner.load(Ordering::Relaxed);
        (owner & !PERMANENT == thread_token()).then_some(cpu)
    }

    #[inline]
    pub(crate) fn preempt_disable(&self) -> usize {
        let (m, cpu) = BOUND.with(Cell::get);
        if m == self.machine {
            // Theory 1's invariant: the slot is this thread's, permanently; only it touches
            // depth (see below).
            let slot = &self.slots[cpu];
            slot.depth.store(slot.depth.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            return cpu;
        }
        self.preempt_disable_unbound()
    }

    /// [`Cpus::preempt_disable`] of a thread not bound to this machine (theory 2).
    #[inline(never)]
    fn preempt_disable_unbound(&self) -> usize {
        let cpu = self.current();
        let slot = &self.slots[cpu];
        let me = thread_token();
        let owner = slot.owner.load(Ordering::Relaxed);
        if owner & !PERMANENT != me {
            let mut spins = 0;
            while slot.owner.compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed).is_err() {
                backoff(&mut spins);
            }
        }
        // Only the owner touches depth, so a plain load and store (no locked instruction)
        // suffice; the owner word's Acquire/Release orders hand-overs between threads.
        slot.depth.store(slot.depth.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        cpu
    }

    #[inline]
    pub(crate) fn preempt_enable(&self, cpu: usize) {
        if BOUND.with(Cell::get) == (self.machine, cpu) {
            // Theory 1's invariant: the slot is this thread's, permanently (never released
            // here); a guard's depth is still checked (theory 3).
            let slot = &self.slots[cpu];
            let depth = slot.depth.load(Ordering::Relaxed);
            assert!(depth > 0, "preempt_enable(cpu {cpu}) by its bound thread outside any guard");
            slot.depth.store(depth - 1, Ordering::Relaxed);
            return;
        }
        self.preempt_enable_unbound(cpu)
    }

    /// [`Cpus::preempt_enable`] of a thread not bound to `cpu` of this machine.
    #[inline(never)]
    fn preempt_enable_unbound(&self, cpu: usize) {
        let slot = &self.slots[cpu];
        let owner = slot.owner.load(Ordering::Relaxed);
        let me = thread_token();
        let depth = slot.depth.load(Ordering::Relaxed);
        assert!(
            owner & !PERMANENT == me && depth > 0,
            "preempt_enable(cpu {cpu}) by thread {me} which does not hold it (owner {owner:#x})"
        );
        // Only the owner touches depth (see preempt_disable).
        slot.depth.store(depth - 1, Ordering::Relaxed);
        if depth == 1 && owner & PERMANENT == 0 {
            slot.owner.store(0, Ordering::Release);
        }
    }
}

/// `N` event counters per CPU slot, plus one shared block for threads that hold no slot.
///
/// A thread that holds its CPU slot ([`Cpus::held_slot`]) is the slot's only writer, so it
/// bumps its block with a plain load and store (atomic accesses, no locked instruction: a
/// locked add costs as much as a model IOTLB lookup); any other thread uses the shared block
/// with a locked add. A reader sums the blocks.
#[derive(Debug)]
pub(crate) struct SlotCounters<const N: usize> {
    blocks: Box<[SlotBlock<N>]>,
    shared: SlotBlock<N>,
}

/// One slot's counters, alone on a 64-byte line pair (see [`CpuSlot`]).
#[derive(Debug)]
#[repr(align(128))]
struct SlotBlock<const N: usize>([AtomicU64; N]);

impl<const N: usize> SlotBlock<N> {
    fn new() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> SlotCounters<N> {
    pub(crate) fn new(cpus: usize) -> Self {
        Self { blocks: (0..cpus).map(|_| SlotBlock::new()).collect(), shared: SlotBlock::new() }
    }

    /// Adds `n` to counter `i` (< `N`).
    #[inline]
    pub(crate) fn add(&self, cpus: &Cpus, i: usize, n: u64) {
        match cpus.held_slot().and_then(|c| self.blocks.get(c)) {
            Some(b) => {
                let a = &b.0[i];
                a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
            }
            None => {
                self.shared.0[i].fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Counter `i` summed over every block.
    pub(crate) fn sum(&self, i: usize) -> u64 {
        self.blocks
            .iter()
            .chain(std::iter::once(&self.shared))
            .fold(0u64, |acc, b| acc.wrapping_add(b.0[i].load(Ordering::Relaxed)))
    }
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < SPINS_BEFORE_YIELD {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// A thread's binding to a CPU slot; dropping it unbinds.
#[derive(Debug)]
pub struct CpuBinding<'a> {
    pub(crate) cpus: &'a Cpus,
    pub(crate) cpu: usize,
    pub(crate) _not_send: std::marker::PhantomData<*const ()>,
}

impl CpuBinding<'_> {
    /// The bound CPU.
    pub fn cpu(&self) -> usize {
        self.cpu
    }
}

impl Drop for CpuBinding<'_> {
    fn drop(&mut self) {
        self.cpus.unbind(self.cpu);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(c: &Cpus, cpu: usize) -> u64 {
        c.slots[cpu].owner.load(Ordering::Relaxed)
    }

    #[test]
    fn a_bound_threads_nested_guards_keep_its_slot_and_count_depth() {
        let c = Cpus::new(2);
        c.bind(1).unwrap();
        let a = c.preempt_disable();
        let b = c.preempt_disable();
        assert_eq!((a, b), (1, 1));
        assert_eq!(c.slots[1].depth.load(Ordering::Relaxed), 2);
        c.preempt_enable(b);
        c.preempt_enable(a);
        assert_eq!(c.slots[1].depth.load(Ordering::Relaxed), 0);
        assert_eq!(owner(&c, 1), thread_token() | PERMANENT, "the guard's end keeps a bound slot");
        c.unbind(1);
        assert_eq!(owner(&c, 1), 0);
    }

    #[test]
    fn a_guard_after_unbind_claims_its_slot_for_the_guard_only() {
        let c = Cpus::new(2);
        c.bind(0).unwrap();
        c.unbind(0);
        // The binding is gone: the guard claims a slot by compare-and-swap (theory 2).
        let cpu = c.preempt_disable();
        assert_eq!(owner(&c, cpu), thread_token());
        c.preempt_enable(cpu);
        assert_eq!(owner(&c, cpu), 0, "an unbound guard frees its slot");
    }

    #[test]
    fn a_thread_bound_on_one_machine_claims_its_slot_on_another() {
        let (a, b) = (Cpus::new(2), Cpus::new(2));
        a.bind(1).unwrap();
        // Bound on `a` only: `b`'s slot is not this thread's until its guard claims it.
        let cpu = b.preempt_disable();
        assert_eq!(owner(&b, cpu), thread_token());
        b.preempt_enable(cpu);
        assert_eq!(owner(&b, cpu), 0);
        a.unbind(1);
    }

    #[test]
    #[should_panic(expected = "outside any guard")]
    fn a_bound_threads_enable_without_a_guard_panics() {
        let c = Cpus::new(1);
        c.bind(0).unwrap();
        c.preempt_enable(0);
    }

    #[test]
    #[should_panic(expected = "does not hold it")]
    fn an_enable_of_another_cpus_slot_panics_on_a_bound_thread() {
        let c = Cpus::new(2);
        c.bind(0).unwrap();
        c.preempt_enable(1);
    }
}
