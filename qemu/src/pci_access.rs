//! PCI configuration access through the legacy 0xcf8/0xcfc mechanism (the x86 kernel's half of
//! `pci.rs`).

use crate::pci::Bdf;
use crate::port::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

fn address(bdf: Bdf, offset: u16) -> u32 {
    // Bit 31 enables the access; the offset is dword-aligned, within the 256-byte space.
    (1 << 31)
        | (u32::from(bdf.bus) << 16)
        | (u32::from(bdf.dev) << 11)
        | (u32::from(bdf.func) << 8)
        | u32::from(offset & 0xfc)
}

/// Reads the configuration dword at `offset` of `bdf`.
pub fn read32(bdf: Bdf, offset: u16) -> u32 {
    // SAFETY: the 0xcf8/0xcfc pair is the PCI configuration mechanism, used only from this
    // single-threaded kernel with interrupts off, so address and data stay paired.
    unsafe {
        outl(CONFIG_ADDRESS, address(bdf, offset));
        inl(CONFIG_DATA)
    }
}

/// Writes the configuration dword at `offset` of `bdf`.
pub fn write32(bdf: Bdf, offset: u16, value: u32) {
    // SAFETY: as in `read32`.
    unsafe {
        outl(CONFIG_ADDRESS, address(bdf, offset));
        outl(CONFIG_DATA, value);
    }
}
