//! Entry and MMU bring-up.
//!
//! `_start` runs at EL1 with the MMU off (all memory Device-nGnRnE: no unaligned access,
//! no caching). It sets the stack, enables FP/SIMD (CPACR_EL1.FPEN = 0b11: the target's
//! code uses NEON registers, and a SIMD access with FPEN clear traps, which here hangs),
//! zeroes .bss, and turns the MMU on with an identity map before any Rust code runs:
//!
//! | VA = PA | what | memory type (MAIR index) |
//! |---|---|---|
//! | 0 - 1 GiB | flash, GIC, PL011, SMMU (0x0905_0000), PCIe 32-bit MMIO window (0x1000_0000) | Device-nGnRE (1) |
//! | 1 - 2 GiB | RAM (the runner gives 512 MiB) | Normal write-back, inner shareable (0) |
//! | 256 - 257 GiB | high PCIe ECAM (0x40_1000_0000) | Device-nGnRE (1) |
//!
//! One level-1 table of 1 GiB blocks (4 KiB granule, T0SZ = 25: 39-bit VAs, walks start at
//! level 1), TTBR1 walks disabled.

use core::arch::global_asm;

/// MAIR_EL1: attribute 0 Normal WB RA/WA (0xff), attribute 1 Device-nGnRE (0x04).
const MAIR: u64 = 0x04_ff;
/// TCR_EL1: T0SZ 25, IRGN0 = ORGN0 = WB-WA, SH0 inner, TG0 4 KiB, EPD1, IPS 40 bits.
const TCR: u64 = 25 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 32);
/// Block descriptor bits: valid block (0b01), AF.
const BLOCK: u64 = 0b01 | (1 << 10);
const NORMAL: u64 = BLOCK | (3 << 8);
/// Device: AttrIndx 1, execute-never (PXN, UXN).
const DEVICE: u64 = BLOCK | (1 << 2) | (1 << 53) | (1 << 54);

/// The level-1 table, filled by `_start` before the MMU goes on.
#[repr(C, align(4096))]
pub struct Table([u64; 512]);

/// The table's contents (a constant: `_start` copies nothing, the loader zero-fills nothing
/// of it; it lives in .data).
#[unsafe(no_mangle)]
static BOOT_L1: Table = {
    let mut t = [0u64; 512];
    t[0] = DEVICE;
    t[1] = 0x4000_0000 | NORMAL;
    t[256] = 0x40_0000_0000 | DEVICE;
    Table(t)
};

global_asm!(
    ".section .text.boot, \"ax\"",
    ".global _start",
    "_start:",
    "    mrs x0, mpidr_el1",
    "    and x0, x0, #0xff",
    "    cbnz x0, 9f",
    "    adrp x1, __stack_top",
    "    add x1, x1, :lo12:__stack_top",
    "    mov sp, x1",
    "    mov x1, #(3 << 20)",
    "    msr cpacr_el1, x1",
    "    isb",
    "    adrp x1, __bss_start",
    "    add x1, x1, :lo12:__bss_start",
    "    adrp x2, __bss_end",
    "    add x2, x2, :lo12:__bss_end",
    "1:  cmp x1, x2",
    "    b.hs 2f",
    "    str xzr, [x1], #8",
    "    b 1b",
    "2:  ldr x1, ={mair}",
    "    msr mair_el1, x1",
    "    ldr x1, ={tcr}",
    "    msr tcr_el1, x1",
    "    adrp x1, BOOT_L1",
    "    add x1, x1, :lo12:BOOT_L1",
    "    msr ttbr0_el1, x1",
    "    isb",
    "    tlbi vmalle1",
    "    dsb ish",
    "    isb",
    "    mrs x1, sctlr_el1",
    // M (0), C (2), I (12) on; A (1, alignment checks) off.
    "    orr x1, x1, #(1 << 0)",
    "    orr x1, x1, #(1 << 2)",
    "    orr x1, x1, #(1 << 12)",
    "    bic x1, x1, #(1 << 1)",
    "    msr sctlr_el1, x1",
    "    isb",
    "    bl kmain",
    "9:  wfe",
    "    b 9b",
    ".ltorg",
    mair = const MAIR,
    tcr = const TCR,
);
