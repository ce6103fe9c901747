//! Leaving QEMU: semihosting SYS_EXIT (QEMU runs with `-semihosting`), whose AArch64 form
//! takes a parameter block {reason, subcode}; with ADP_Stopped_ApplicationExit QEMU exits
//! with the subcode as its status.

use core::arch::asm;

/// Status when every check passed (as the x86 kernel's isa-debug-exit gives it).
pub const PASS: u64 = 33;
/// Status when a check failed.
pub const FAIL: u64 = 35;

const SYS_EXIT: u64 = 0x18;
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x2_0026;

/// Exits QEMU with `code`.
pub fn exit(code: u64) -> ! {
    let block = [ADP_STOPPED_APPLICATION_EXIT, code];
    // SAFETY: the semihosting call reads the two-word block (alive on this stack) and ends
    // the VM; `hlt #0xf000` is the AArch64 semihosting trap.
    unsafe { asm!("hlt #0xf000", in("x0") SYS_EXIT, in("x1") block.as_ptr(), options(nostack)) };
    loop {
        core::hint::spin_loop();
    }
}
