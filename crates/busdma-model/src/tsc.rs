//! The host clock behind the model's [`Platform::monotonic_ns`](busdma::Platform::monotonic_ns):
//! the time-stamp counter when the host kernel trusts it, `std::time::Instant` otherwise.
//!
//! # Theory
//!
//! 1. **Why.** Deferred invalidation reads the clock on every map and unmap (the flush
//!    queues' age bound), and the seam asks for a clock "cheap enough to read on every unmap
//!    (a TSC or generic-timer read on hardware)". `Instant::now` goes through
//!    `clock_gettime` (the vDSO) and `Duration` arithmetic: about a hundred instructions and
//!    20–40 ns on the lab's VM, as much as the rest of a deferred unmap's bookkeeping.
//! 2. **When the TSC is a clock.** It must tick at a constant rate and agree between CPUs.
//!    The Linux kernel checks both before it makes the TSC its clocksource, so the model uses
//!    it only on x86-64 hosts whose current clocksource is `tsc`; elsewhere (another
//!    architecture, a VM whose kernel chose `kvm-clock`, no `/sys`) it uses `Instant`.
//! 3. **Reading** is `lfence; rdtsc` (the kernel's `rdtsc_ordered`): the fence keeps the read
//!    after the loads before it, so a thread that saw another's clock-stamped store reads a
//!    later time, as with `clock_gettime`.
//! 4. **Conversion.** Once per process the TSC rate is measured against `Instant` over
//!    [`CALIBRATION_NS`]; a time is `ticks × mult >> 32`. The calibration's error (the jitter
//!    of two `Instant` reads, well under a microsecond, over 2 ms) is below 0.05 %: 5 µs over
//!    the flush queue's 10 ms age bound.
#![allow(unsafe_code)]

use std::sync::OnceLock;
use std::time::Instant;

/// Calibration interval: 2 ms. Long enough that the jitter of the reads around it (tens to
/// hundreds of ns) is a small fraction of it; short enough to pay once per process unnoticed.
const CALIBRATION_NS: u64 = 2_000_000;

/// Nanoseconds per tick as a 32.32 fixed-point multiplier, if the TSC is usable.
fn mult() -> Option<u64> {
    static MULT: OnceLock<Option<u64>> = OnceLock::new();
    *MULT.get_or_init(calibrate)
}

#[cfg(target_arch = "x86_64")]
fn calibrate() -> Option<u64> {
    let source =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource").ok()?;
    if source.trim() != "tsc" {
        return None;
    }
    let (i0, t0) = (Instant::now(), ticks());
    while i0.elapsed().as_nanos() < u128::from(CALIBRATION_NS) {
        std::hint::spin_loop();
    }
    let (ns, t1) = (i0.elapsed().as_nanos(), ticks());
    let dt = t1.checked_sub(t0).filter(|&d| d > 0)?;
    u64::try_from((ns << 32) / u128::from(dt)).ok()
}

#[cfg(not(target_arch = "x86_64"))]
fn calibrate() -> Option<u64> {
    None
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn ticks() -> u64 {
    // SAFETY: LFENCE and RDTSC have no preconditions on x86-64 (SSE2 is baseline); they read
    // a counter and order loads.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_mm_lfence();
        core::arch::x86_64::_rdtsc()
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
fn ticks() -> u64 {
    0
}

/// A monotonic clock counting from its creation.
#[derive(Debug)]
pub(crate) struct HostClock {
    origin: Instant,
    /// TSC at creation and the multiplier, when the TSC is used.
    tsc: Option<(u64, u64)>,
}

impl HostClock {
    pub(crate) fn new() -> Self {
        let tsc = mult().map(|m| (ticks(), m));
        Self { origin: Instant::now(), tsc }
    }

    /// Nanoseconds since creation (saturating: u64 nanoseconds last 584 years).
    #[inline]
    pub(crate) fn ns(&self) -> u64 {
        match self.tsc {
            Some((t0, m)) => {
                let dt = ticks().saturating_sub(t0);
                u64::try_from((u128::from(dt) * u128::from(m)) >> 32).unwrap_or(u64::MAX)
            }
            None => u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_clock_is_monotonic_and_agrees_with_instant() {
        let c = HostClock::new();
        let i = Instant::now();
        let mut last = c.ns();
        while i.elapsed().as_millis() < 20 {
            let now = c.ns();
            assert!(now >= last, "clock went back: {last} -> {now}");
            last = now;
        }
        let real = i.elapsed().as_nanos() as f64;
        let ours = c.ns() as f64;
        // Within 1 % over 20 ms (the calibration is far better; this leaves room for a
        // preempted read on a loaded host).
        assert!((ours - real).abs() < real * 0.01 + 200_000.0, "clock {ours} ns vs Instant {real} ns");
    }
}
