//! The x86 kernel's half of the shared `platform.rs`: the RAM the boot memory map reports
//! (identity-mapped in the low 4 GiB by boot.rs), cache maintenance by `clflush`, the HPET as
//! the clock.

use core::arch::asm;
use core::sync::atomic::{Ordering, fence};

use busdma::KernVa;
use busdma::sync::SpinLock;

/// Most RAM ranges the kernel remembers from the boot memory map (QEMU gives 2 or 3).
const MAX_RANGES: usize = 16;
/// x86 cache line: 64 bytes.
const LINE: u64 = 64;
/// The identity map covers the low 4 GiB (boot.rs builds it).
const IDENTITY_END: u64 = 1 << 32;

struct RamMap {
    ranges: [(u64, u64); MAX_RANGES],
    count: usize,
}

static RAM: SpinLock<RamMap> = SpinLock::new(RamMap { ranges: [(0, 0); MAX_RANGES], count: 0 });

/// Records a RAM range `[start, end)` from the boot memory map (clipped to the identity map).
pub fn add_ram(start: u64, end: u64) {
    let end = end.min(IDENTITY_END);
    let mut ram = RAM.lock();
    if start < end && ram.count < MAX_RANGES {
        let i = ram.count;
        ram.ranges[i] = (start, end);
        ram.count += 1;
    }
}

/// Whether `[start, start + len)` is RAM.
pub fn is_ram(start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else { return false };
    let ram = RAM.lock();
    ram.ranges[..ram.count].iter().any(|&(s, e)| s <= start && end <= e)
}

fn for_each_line(kva: KernVa, len: u64, f: impl Fn(u64)) {
    let start = kva.raw() & !(LINE - 1);
    let end = kva.raw().saturating_add(len);
    // SAFETY: mfence orders earlier stores before the flushes (clflush is ordered only by
    // fences) and touches no memory itself.
    unsafe { asm!("mfence", options(nostack, preserves_flags)) };
    let mut line = start;
    while line < end {
        f(line);
        line += LINE;
    }
    // SAFETY: as above; orders the flushes before whatever the caller does next (a doorbell).
    unsafe { asm!("mfence", options(nostack, preserves_flags)) };
}

fn clflush(line: u64) {
    // SAFETY: clflush on an identity-mapped address only writes the line back and drops it;
    // it never faults on mapped memory and changes no data.
    unsafe { asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags)) };
}

/// Writes back the lines of `[kva, kva + len)`.
pub fn cache_clean(kva: KernVa, len: u64) {
    for_each_line(kva, len, clflush);
}

/// Discards the lines of `[kva, kva + len)`. x86 has no "discard without write-back";
/// clflush writes back then discards, which is what the contract allows for lines the
/// caller owns.
pub fn cache_invalidate(kva: KernVa, len: u64) {
    for_each_line(kva, len, clflush);
}

/// Writes back and discards the lines of `[kva, kva + len)`.
pub fn cache_clean_invalidate(kva: KernVa, len: u64) {
    for_each_line(kva, len, clflush);
}

/// Earlier stores are visible to devices before later ones (x86 keeps stores in order).
pub fn dma_wmb() {
    fence(Ordering::Release);
}

/// Earlier loads complete before later ones (x86 keeps loads in order).
pub fn dma_rmb() {
    fence(Ordering::Acquire);
}

/// Nanoseconds since boot.
pub fn now_ns() -> u64 {
    crate::hpet::now_ns()
}
