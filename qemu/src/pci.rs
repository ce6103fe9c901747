//! PCI configuration through the legacy 0xcf8/0xcfc mechanism, and enumeration of bus 0
//! (q35 puts every `-device` without a bus on the root complex, bus 0).

use crate::port::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Offsets in the type-0 configuration header.
const VENDOR_DEVICE: u8 = 0x00;
const COMMAND: u8 = 0x04;
const HEADER_TYPE_WORD: u8 = 0x0c;
const BAR0: u8 = 0x10;
/// Command register bits: memory space decoding and bus mastering.
const CMD_MEMORY: u32 = 1 << 1;
const CMD_BUS_MASTER: u32 = 1 << 2;

/// A PCI function: bus, device, function. Its requester (source) id is `bus << 8 | devfn`,
/// what VT-d fault records name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (< 32).
    pub dev: u8,
    /// Function number (< 8).
    pub func: u8,
}

impl Bdf {
    /// `dev << 3 | func`.
    pub fn devfn(self) -> u8 {
        (self.dev << 3) | self.func
    }

    /// The 16-bit requester id.
    pub fn source_id(self) -> u16 {
        (u16::from(self.bus) << 8) | u16::from(self.devfn())
    }

    fn address(self, offset: u8) -> u32 {
        // Bit 31 enables the access; offset is dword-aligned.
        (1 << 31)
            | (u32::from(self.bus) << 16)
            | (u32::from(self.dev) << 11)
            | (u32::from(self.func) << 8)
            | u32::from(offset & 0xfc)
    }

    /// Reads the configuration dword at `offset`.
    pub fn read32(self, offset: u8) -> u32 {
        // SAFETY: the 0xcf8/0xcfc pair is the PCI configuration mechanism, used only from this
        // single-threaded kernel with interrupts off, so address and data stay paired.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            inl(CONFIG_DATA)
        }
    }

    /// Writes the configuration dword at `offset`.
    pub fn write32(self, offset: u8, value: u32) {
        // SAFETY: as in `read32`.
        unsafe {
            outl(CONFIG_ADDRESS, self.address(offset));
            outl(CONFIG_DATA, value);
        }
    }

    /// (vendor, device), or `None` if nothing answers.
    pub fn ids(self) -> Option<(u16, u16)> {
        let v = self.read32(VENDOR_DEVICE);
        if v & 0xffff == 0xffff { None } else { Some((v as u16, (v >> 16) as u16)) }
    }

    /// BAR0 as a 32-bit memory BAR's base address (flag bits masked off).
    pub fn bar0(self) -> u64 {
        u64::from(self.read32(BAR0) & !0xf)
    }

    /// Turns on memory decoding and bus mastering.
    pub fn enable(self) {
        let cmd = self.read32(COMMAND);
        self.write32(COMMAND, cmd | CMD_MEMORY | CMD_BUS_MASTER);
    }
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// Calls `found` for every function on bus 0 with its (vendor, device).
pub fn scan_bus0(mut found: impl FnMut(Bdf, u16, u16)) {
    for dev in 0..32 {
        let f0 = Bdf { bus: 0, dev, func: 0 };
        let Some((v, d)) = f0.ids() else { continue };
        found(f0, v, d);
        // Header type bit 7: multi-function device.
        let multi = (f0.read32(HEADER_TYPE_WORD) >> 16) & 0x80 != 0;
        if multi {
            for func in 1..8 {
                let bdf = Bdf { bus: 0, dev, func };
                if let Some((v, d)) = bdf.ids() {
                    found(bdf, v, d);
                }
            }
        }
    }
}
