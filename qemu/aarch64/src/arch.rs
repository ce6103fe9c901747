//! The aarch64 kernel's half of the shared `platform.rs`: `virt`'s RAM (identity-mapped by
//! boot.rs), cache maintenance by `dc` to the point of coherency, the generic timer as the
//! clock, `dsb` barriers.

use core::arch::asm;

use busdma::KernVa;

/// RAM of `virt` with the runner's `-m 512M`: [1 GiB, 1.5 GiB).
const RAM: (u64, u64) = (0x4000_0000, 0x6000_0000);

/// Whether `[start, start + len)` is RAM.
pub fn is_ram(start: u64, len: u64) -> bool {
    start.checked_add(len).is_some_and(|end| RAM.0 <= start && end <= RAM.1)
}

/// The smallest data cache line (CTR_EL0.DminLine, words as log2).
fn line() -> u64 {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effect.
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    4 << ((ctr >> 16) & 0xf)
}

macro_rules! dc_range {
    ($op:literal, $kva:expr, $len:expr) => {{
        let l = line();
        let mut a = $kva.raw() & !(l - 1);
        let end = $kva.raw().saturating_add($len);
        while a < end {
            // SAFETY: cache maintenance by VA on identity-mapped RAM the caller owns; it
            // changes no data the caller did not ask to write back or discard.
            unsafe { asm!(concat!("dc ", $op, ", {}"), in(reg) a, options(nostack, preserves_flags)) };
            a += l;
        }
        // SAFETY: a barrier; completes the maintenance before what follows.
        unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
    }};
}

/// Writes back the lines of `[kva, kva + len)` to the point of coherency.
pub fn cache_clean(kva: KernVa, len: u64) {
    dc_range!("cvac", kva, len);
}

/// Discards the lines of `[kva, kva + len)`.
pub fn cache_invalidate(kva: KernVa, len: u64) {
    // `dc ivac` would drop dirty lines the caller may share a line with: clean+invalidate
    // is what the contract allows too.
    dc_range!("civac", kva, len);
}

/// Writes back and discards the lines of `[kva, kva + len)`.
pub fn cache_clean_invalidate(kva: KernVa, len: u64) {
    dc_range!("civac", kva, len);
}

/// Earlier stores are observable by devices before later ones.
pub fn dma_wmb() {
    // SAFETY: a barrier: earlier stores are observable by devices before later ones.
    unsafe { asm!("dsb st", options(nostack, preserves_flags)) };
}

/// Earlier loads complete before later ones.
pub fn dma_rmb() {
    // SAFETY: a barrier for earlier loads.
    unsafe { asm!("dsb ld", options(nostack, preserves_flags)) };
}

/// Nanoseconds since boot, from the generic timer.
pub fn now_ns() -> u64 {
    let (cnt, frq): (u64, u64);
    // SAFETY: reading the generic timer's counter and frequency has no side effect.
    unsafe {
        asm!("isb", "mrs {c}, cntvct_el0", "mrs {f}, cntfrq_el0", c = out(reg) cnt, f = out(reg) frq,
             options(nomem, nostack, preserves_flags))
    };
    ((u128::from(cnt) * 1_000_000_000) / u128::from(frq.max(1))) as u64
}
