//! QEMU's `edu` teaching device (1234:11e8) as a DMA engine.
//!
//! BAR0 registers: 0x80 source, 0x88 destination, 0x90 count, 0x98 command (bit 0 run, bit 1
//! direction: 1 = device buffer → RAM). The device buffer sits at device address 0x40000. The
//! device masks bus addresses to 28 bits (its DMA mask), so every bus address it is given must
//! lie below 2^28. QEMU 7.2 aborts on a transfer of the whole 4096-byte buffer (an off-by-one
//! in its range check), so transfers stay at most [`MAX_DMA`] bytes.

use crate::pci::Bdf;

/// edu's identity.
pub const VENDOR: u16 = 0x1234;
/// edu's device id.
pub const DEVICE: u16 = 0x11e8;
/// Where the device's 4 KiB buffer sits in its own address space.
pub const BUF: u64 = 0x40000;
/// The device's DMA mask: 28 address bits.
pub const DMA_BITS: u32 = 28;
/// Largest transfer QEMU 7.2's edu survives (4096 crashes it; see the module docs).
pub const MAX_DMA: u64 = 4095;

const REG_IDENT: u64 = 0x00;
const REG_SRC: u64 = 0x80;
const REG_DST: u64 = 0x88;
const REG_COUNT: u64 = 0x90;
const REG_CMD: u64 = 0x98;
const CMD_RUN: u64 = 1 << 0;
const CMD_TO_RAM: u64 = 1 << 1;
/// Identification register value: major 1, minor 0, 0xed.
const IDENT: u32 = 0x0100_00ed;

/// Direction of an edu transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The device reads RAM (bus address) into its buffer.
    FromRam,
    /// The device writes its buffer to RAM (bus address).
    ToRam,
}

/// One edu function, memory decoding and bus mastering on.
pub struct Edu {
    /// Where it sits.
    pub bdf: Bdf,
    bar: u64,
}

impl Edu {
    /// Takes the device at `bdf`: enables it and checks its identification register.
    pub fn new(bdf: Bdf) -> Result<Self, &'static str> {
        bdf.enable();
        let bar = bdf.bar0();
        if bar == 0 {
            return Err("edu BAR0 unassigned");
        }
        let edu = Self { bdf, bar };
        // SAFETY: BAR0 is edu's register block, owned by this driver.
        let ident = unsafe { core::ptr::read_volatile((bar + REG_IDENT) as *const u32) };
        if ident != IDENT {
            return Err("edu identification register mismatch");
        }
        Ok(edu)
    }

    fn write(&self, reg: u64, value: u64) {
        // SAFETY: BAR0 is identity-mapped MMIO of this device; edu accepts 8-byte accesses at
        // 0x80 and above.
        unsafe { core::ptr::write_volatile((self.bar + reg) as *mut u64, value) }
    }

    fn read(&self, reg: u64) -> u64 {
        // SAFETY: as in `write`.
        unsafe { core::ptr::read_volatile((self.bar + reg) as *const u64) }
    }

    /// Runs one transfer of `len` bytes between bus address `bus` and offset `off` of the
    /// device buffer, and waits for it (the device starts it from a 100 ms virtual timer;
    /// `-icount` makes that wait short and deterministic). A transfer the IOMMU blocks still
    /// completes from the device's point of view: only the IOMMU's fault record tells.
    pub fn dma(&self, dir: Dir, bus: u64, off: u64, len: u64) -> Result<(), &'static str> {
        if len == 0 || len > MAX_DMA || off + len > MAX_DMA + 1 {
            return Err("edu transfer outside its buffer");
        }
        let dev = BUF + off;
        let (src, dst, cmd) = match dir {
            Dir::FromRam => (bus, dev, CMD_RUN),
            Dir::ToRam => (dev, bus, CMD_RUN | CMD_TO_RAM),
        };
        self.write(REG_SRC, src);
        self.write(REG_DST, dst);
        self.write(REG_COUNT, len);
        self.write(REG_CMD, cmd);
        // Why 100 million polls: each MMIO read advances the virtual clock under -icount, so
        // the 100 ms timer fires after a few thousand polls; a hundred million means the device
        // is dead, not slow.
        for _ in 0..100_000_000u64 {
            if self.read(REG_CMD) & CMD_RUN == 0 {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err("edu DMA never completed")
    }
}
