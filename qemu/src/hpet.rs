//! The HPET (q35 has one at 0xfed0_0000): the kernel's monotonic clock. Under `-icount` it
//! counts virtual time, so clock readings are deterministic run to run.

use core::sync::atomic::{AtomicU64, Ordering};

/// The HPET's register block on q35 (the ACPI HPET table says so too).
const BASE: u64 = 0xfed0_0000;
/// General capabilities: counter period in femtoseconds in bits 63:32.
const CAPS: u64 = 0x000;
/// General configuration: bit 0 enables the main counter.
const CONFIG: u64 = 0x010;
const ENABLE: u64 = 1 << 0;
/// Main counter value.
const COUNTER: u64 = 0x0f0;
/// The architectural maximum period: 100 ns = 10^8 fs; a larger one means no HPET.
const MAX_PERIOD_FS: u64 = 100_000_000;

/// Femtoseconds per tick, set by [`init`] (0 until then).
static PERIOD_FS: AtomicU64 = AtomicU64::new(0);

fn read(reg: u64) -> u64 {
    // SAFETY: the HPET's registers, identity-mapped uncached; only this module touches them.
    unsafe { core::ptr::read_volatile((BASE + reg) as *const u64) }
}

/// Starts the main counter. Errors if no HPET answers.
pub fn init() -> Result<(), &'static str> {
    let period = read(CAPS) >> 32;
    if period == 0 || period > MAX_PERIOD_FS {
        return Err("no HPET at 0xfed00000");
    }
    // SAFETY: as in `read`; setting ENABLE only starts the counter (no interrupts are routed).
    unsafe { core::ptr::write_volatile((BASE + CONFIG) as *mut u64, read(CONFIG) | ENABLE) };
    PERIOD_FS.store(period, Ordering::Relaxed);
    Ok(())
}

/// Nanoseconds since the counter started.
pub fn now_ns() -> u64 {
    let ticks = u128::from(read(COUNTER));
    (ticks * u128::from(PERIOD_FS.load(Ordering::Relaxed)) / 1_000_000) as u64
}
