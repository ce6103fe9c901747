//! Leaving QEMU with a verdict through `isa-debug-exit` (iobase 0xf4): writing `v` makes QEMU
//! exit with status `(v << 1) | 1`.

use crate::port::outb;

/// The `isa-debug-exit` port the runner configures (`-device isa-debug-exit,iobase=0xf4`).
const DEBUG_EXIT: u16 = 0xf4;

/// Every check passed: QEMU exits with 33 (`0x10 << 1 | 1`). Chosen away from 1 (QEMU's own
/// error status) and 0 (a guest-requested shutdown), so no other way of stopping looks like a
/// pass.
pub const PASS: u8 = 0x10;
/// Some check failed: QEMU exits with 35.
pub const FAIL: u8 = 0x11;

/// Exits QEMU with `code`; never returns (halts if the device is missing).
pub fn exit(code: u8) -> ! {
    // SAFETY: port 0xf4 is the debug-exit device; writing it ends the VM.
    unsafe { outb(DEBUG_EXIT, code) };
    loop {
        // SAFETY: `hlt` with interrupts off stops this CPU for good, which is the intent.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}
