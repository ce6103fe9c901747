//! SMMUv3 register offsets and fields (Arm IHI 0070, chapter 6), the ones this driver uses.
//! Page 1 registers (EVENTQ_PROD/CONS) sit at 0x1_0000 + their offset.
#![forbid(unsafe_code)]

/// Identification registers 0-5 (32 bits each).
pub const IDR0: u64 = 0x00;
/// IDR1: queue and stream-id sizes.
pub const IDR1: u64 = 0x04;
/// IDR3: range invalidation and friends.
pub const IDR3: u64 = 0x0c;
/// IDR5: output address size, granules.
pub const IDR5: u64 = 0x14;
/// Control register 0 (enables).
pub const CR0: u64 = 0x20;
/// CR0 acknowledge.
pub const CR0ACK: u64 = 0x24;
/// Control register 1 (table and queue cacheability).
pub const CR1: u64 = 0x28;
/// Control register 2.
pub const CR2: u64 = 0x2c;
/// Global bypass attribute (what traffic gets while SMMUEN is clear).
pub const GBPA: u64 = 0x44;
/// Interrupt enables.
pub const IRQ_CTRL: u64 = 0x50;
/// Global errors (toggle bits).
pub const GERROR: u64 = 0x60;
/// Global error acknowledge (software toggles a bit to match GERROR).
pub const GERRORN: u64 = 0x64;
/// Stream table base (64 bits).
pub const STRTAB_BASE: u64 = 0x80;
/// Stream table format, size, split.
pub const STRTAB_BASE_CFG: u64 = 0x88;
/// Command queue base (64 bits).
pub const CMDQ_BASE: u64 = 0x90;
/// Command queue producer index (32 bits).
pub const CMDQ_PROD: u64 = 0x98;
/// Command queue consumer index and error code (32 bits).
pub const CMDQ_CONS: u64 = 0x9c;
/// Event queue base (64 bits).
pub const EVENTQ_BASE: u64 = 0xa0;
/// Event queue producer index, page 1.
pub const EVENTQ_PROD: u64 = 0x1_00a8;
/// Event queue consumer index, page 1.
pub const EVENTQ_CONS: u64 = 0x1_00ac;

/// CR0 bits.
pub mod cr0 {
    /// Translation on.
    pub const SMMUEN: u32 = 1 << 0;
    /// Event queue on.
    pub const EVENTQEN: u32 = 1 << 2;
    /// Command queue on.
    pub const CMDQEN: u32 = 1 << 3;
}

/// CR1: tables and queues are inner-shareable write-back cacheable (coherent SMMU): IC/OC
/// = 1 (write-back), SH = 3 (inner shareable), for both the queues (bits 11:6) and the
/// tables (bits 5:0).
pub const CR1_COHERENT_WB: u32 = (3 << 10) | (1 << 8) | (1 << 6) | (3 << 4) | (1 << 2) | 1;

/// GBPA bits.
pub mod gbpa {
    /// Abort incoming traffic while SMMUEN is clear.
    pub const ABORT: u32 = 1 << 20;
    /// Write 1 with the new value; the SMMU clears it when done.
    pub const UPDATE: u32 = 1 << 31;
}

/// GERROR bits.
pub mod gerror {
    /// The command queue stopped on an error (CMDQ_CONS.ERR says which).
    pub const CMDQ_ERR: u32 = 1 << 0;
    /// The event queue could not be written.
    pub const EVTQ_ABT_ERR: u32 = 1 << 2;
    /// Service failure mode.
    pub const SFM_ERR: u32 = 1 << 8;
    /// Every error bit this driver knows (0, 2-8).
    pub const ALL: u32 = 0x1fd;
}

/// CMDQ_CONS.ERR (bits 30:24) values.
pub mod cerror {
    /// No error.
    pub const NONE: u32 = 0;
    /// An illegal command (unknown opcode, reserved field).
    pub const ILL: u32 = 1;
    /// An abort reading the command.
    pub const ABT: u32 = 2;
    /// An ATC invalidation sync failed.
    pub const ATC_INV_SYNC: u32 = 3;
    /// Field shift.
    pub const SHIFT: u32 = 24;
    /// Field mask (after the shift).
    pub const MASK: u32 = 0x7f;
}

/// STRTAB_BASE_CFG.FMT = 2-level (bits 17:16).
pub const STRTAB_FMT_2LVL: u32 = 1 << 16;
/// STRTAB_BASE_CFG.SPLIT shift (bits 10:6).
pub const STRTAB_SPLIT_SHIFT: u32 = 6;
/// Queue and table base registers: RA/WA (read-allocate) hint, bit 62.
pub const BASE_RA: u64 = 1 << 62;
/// Queue base address field, bits 51:5.
pub const Q_BASE_ADDR_MASK: u64 = ((1 << 52) - 1) & !0x1f;
/// Event queue PROD.OVFLG, bit 31.
pub const EVENTQ_PROD_OVFLG: u32 = 1 << 31;
