//! PCIe configuration through the `virt` machine's high ECAM (0x40_1000_0000; the low ECAM
//! at 0x3f00_0000 is absent with a high one and touching it hangs), and BAR assignment: with `-kernel` no firmware runs, so every BAR reads 0 until the
//! kernel places it in the 32-bit MMIO window (0x1000_0000 up).
//!
//! The aarch64 kernel's half of the shared `pci.rs`.

use crate::pci::{BAR0, Bdf, HEADER_TYPE_WORD, scan_bus0};

/// The ECAM base: bus 0 at offset 0; each function 4 KiB (bus << 20 | dev << 15 | fn << 12).
const ECAM: u64 = 0x40_1000_0000;
/// The 32-bit memory window of `virt`'s PCIe host bridge: [0x1000_0000, 0x3eff_0000).
const MMIO_WINDOW: (u64, u64) = (0x1000_0000, 0x3eff_0000);

fn address(bdf: Bdf, offset: u16) -> u64 {
    ECAM + (u64::from(bdf.bus) << 20)
        + (u64::from(bdf.dev) << 15)
        + (u64::from(bdf.func) << 12)
        + u64::from(offset & 0xffc)
}

/// Reads the configuration dword at `offset` of `bdf`.
pub fn read32(bdf: Bdf, offset: u16) -> u32 {
    // SAFETY: the ECAM window is identity-mapped device memory (boot.rs); the address is a
    // 4-aligned dword of this function's 4 KiB configuration space.
    unsafe { core::ptr::read_volatile(address(bdf, offset) as *const u32) }
}

/// Writes the configuration dword at `offset` of `bdf`.
pub fn write32(bdf: Bdf, offset: u16, value: u32) {
    // SAFETY: as in `read32`.
    unsafe { core::ptr::write_volatile(address(bdf, offset) as *mut u32, value) }
}

/// Places every memory BAR of every type-0 function on bus 0 in the 32-bit window, each
/// naturally aligned (64-bit BARs get upper half 0). Returns the number of BARs placed.
///
/// Errors: the window is exhausted.
pub fn assign_bars() -> Result<usize, &'static str> {
    let mut next = MMIO_WINDOW.0;
    let mut placed = 0;
    let mut bdfs = [None; 64];
    let mut n = 0;
    scan_bus0(|bdf, _, _| {
        if n < bdfs.len() {
            bdfs[n] = Some(bdf);
            n += 1;
        }
    });
    for bdf in bdfs.iter().flatten().copied() {
        if (bdf.read32(HEADER_TYPE_WORD) >> 16) & 0x7f != 0 {
            continue; // not a type-0 header
        }
        let mut i = 0;
        while i < 6 {
            let off = BAR0 + 4 * i;
            let orig = bdf.read32(off);
            bdf.write32(off, 0xffff_ffff);
            let probe = bdf.read32(off);
            let is_io = orig & 1 != 0;
            let is64 = (orig >> 1) & 0b11 == 0b10;
            if is_io || probe & !0xf == 0 {
                bdf.write32(off, orig);
                i += 1;
                continue;
            }
            let size = u64::from(!(probe & !0xf)) + 1;
            let base = next.next_multiple_of(size);
            if base + size > MMIO_WINDOW.1 {
                return Err("PCI 32-bit MMIO window exhausted");
            }
            bdf.write32(off, base as u32);
            if is64 {
                bdf.write32(off + 4, 0);
                i += 1;
            }
            next = base + size;
            placed += 1;
            i += 1;
        }
    }
    Ok(placed)
}
