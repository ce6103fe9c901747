//! PCI functions and the enumeration of bus 0, shared by both test kernels (the aarch64 one
//! includes this file by path). How a configuration dword is reached is each kernel's
//! `pci_access`: the legacy 0xcf8/0xcfc mechanism on x86 (q35 puts every `-device` without a
//! bus on the root complex, bus 0), the `virt` machine's ECAM on aarch64.

use crate::pci_access;

/// Offsets in the type-0 configuration header.
pub const VENDOR_DEVICE: u16 = 0x00;
pub const COMMAND: u16 = 0x04;
pub const HEADER_TYPE_WORD: u16 = 0x0c;
pub const BAR0: u16 = 0x10;
/// Command register bits: memory space decoding and bus mastering.
const CMD_MEMORY: u32 = 1 << 1;
const CMD_BUS_MASTER: u32 = 1 << 2;

/// A PCI function: bus, device, function. Its requester id is `bus << 8 | devfn`, what VT-d
/// fault records and SMMU events name.
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

    /// The 16-bit requester id: VT-d's source id, the SMMU's StreamID.
    pub fn source_id(self) -> u16 {
        (u16::from(self.bus) << 8) | u16::from(self.devfn())
    }

    /// Reads the configuration dword at `offset`.
    pub fn read32(self, offset: u16) -> u32 {
        pci_access::read32(self, offset)
    }

    /// Writes the configuration dword at `offset`.
    pub fn write32(self, offset: u16, value: u32) {
        pci_access::write32(self, offset, value)
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
