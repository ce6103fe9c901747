//! PCIe configuration through the `virt` machine's high ECAM (0x40_1000_0000; the low ECAM
//! at 0x3f00_0000 is absent with a high one and touching it hangs), enumeration of bus 0,
//! and BAR assignment: with `-kernel` no firmware runs, so every BAR reads 0 until the
//! kernel places it in the 32-bit MMIO window (0x1000_0000 up).
//!
//! Same interface as the x86 kernel's `pci` (what `edu.rs`, shared, uses).

/// The ECAM base: bus 0 at offset 0; each function 4 KiB (bus << 20 | dev << 15 | fn << 12).
const ECAM: u64 = 0x40_1000_0000;
/// The 32-bit memory window of `virt`'s PCIe host bridge: [0x1000_0000, 0x3eff_0000).
const MMIO_WINDOW: (u64, u64) = (0x1000_0000, 0x3eff_0000);

const VENDOR_DEVICE: u16 = 0x00;
const COMMAND: u16 = 0x04;
const HEADER_TYPE_WORD: u16 = 0x0c;
const BAR0: u16 = 0x10;
const CMD_MEMORY: u32 = 1 << 1;
const CMD_BUS_MASTER: u32 = 1 << 2;

/// A PCI function.
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

    /// The 16-bit requester id: the SMMU's StreamID for this function.
    pub fn source_id(self) -> u16 {
        (u16::from(self.bus) << 8) | u16::from(self.devfn())
    }

    fn address(self, offset: u16) -> u64 {
        ECAM + (u64::from(self.bus) << 20)
            + (u64::from(self.dev) << 15)
            + (u64::from(self.func) << 12)
            + u64::from(offset & 0xffc)
    }

    /// Reads the configuration dword at `offset`.
    pub fn read32(self, offset: u16) -> u32 {
        // SAFETY: the ECAM window is identity-mapped device memory (boot.rs); the address is
        // a 4-aligned dword of this function's 4 KiB configuration space.
        unsafe { core::ptr::read_volatile(self.address(offset) as *const u32) }
    }

    /// Writes the configuration dword at `offset`.
    pub fn write32(self, offset: u16, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { core::ptr::write_volatile(self.address(offset) as *mut u32, value) }
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
