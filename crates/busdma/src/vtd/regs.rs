//! VT-d remapping-unit register offsets and bits (Intel VT-d specification, chapter 11).
//! Pure constants: everything here is checked by the unit tests of the modules that use it
//! and, end to end, by the QEMU suite.
#![forbid(unsafe_code)]

/// Version (32-bit).
pub const VER: u64 = 0x00;
/// Capabilities (64-bit).
pub const CAP: u64 = 0x08;
/// Extended capabilities (64-bit).
pub const ECAP: u64 = 0x10;
/// Global command (32-bit, write).
pub const GCMD: u64 = 0x18;
/// Global status (32-bit, read).
pub const GSTS: u64 = 0x1c;
/// Root table address (64-bit).
pub const RTADDR: u64 = 0x20;
/// Context command (64-bit): register-based context-cache invalidation.
pub const CCMD: u64 = 0x28;
/// Fault status (32-bit).
pub const FSTS: u64 = 0x34;
/// Fault event control (32-bit).
pub const FECTL: u64 = 0x38;
/// Invalidation queue head (64-bit).
pub const IQH: u64 = 0x80;
/// Invalidation queue tail (64-bit).
pub const IQT: u64 = 0x88;
/// Invalidation queue address (64-bit).
pub const IQA: u64 = 0x90;
/// Invalidation completion status (32-bit).
pub const ICS: u64 = 0x9c;

/// Offset of the invalidate-address register within the IOTLB register pair at
/// `ECAP.IRO * 16`.
pub const IVA_IN_IOTLB_PAIR: u64 = 0x0;
/// Offset of the IOTLB invalidate register within that pair.
pub const IOTLB_IN_IOTLB_PAIR: u64 = 0x8;

/// GCMD/GSTS bits. Each command bit in GCMD has its status twin at the same position in GSTS.
pub mod gcmd {
    /// Translation enable (persistent).
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer (one-shot; GSTS.RTPS reports completion).
    pub const SRTP: u32 = 1 << 30;
    /// Set fault log (one-shot).
    pub const SFL: u32 = 1 << 29;
    /// Advanced fault logging enable (persistent).
    pub const EAFL: u32 = 1 << 28;
    /// Write-buffer flush (one-shot; GSTS.WBFS is set while it runs).
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable (persistent).
    pub const QIE: u32 = 1 << 26;
    /// Interrupt remapping enable (persistent).
    pub const IRE: u32 = 1 << 25;
    /// Set interrupt remap table pointer (one-shot).
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility-format interrupts (persistent).
    pub const CFI: u32 = 1 << 23;
    /// The persistent bits: when software writes GCMD to change one of them it must write
    /// back the current state of the others (read from GSTS) and must not echo the one-shot
    /// status bits, or it would re-trigger their commands.
    pub const PERSISTENT: u32 = TE | EAFL | QIE | IRE | CFI;
}

/// RTADDR: translation table mode in bits 11:10; 00 = legacy root/context tables.
pub const RTADDR_TTM_LEGACY: u64 = 0;

/// CCMD fields.
pub mod ccmd {
    /// Invalidate context cache: set to request, hardware clears it when done.
    pub const ICC: u64 = 1 << 63;
    /// Request granularity (bits 62:61): global.
    pub const CIRG_GLOBAL: u64 = 1 << 61;
    /// Request granularity: domain-selective.
    pub const CIRG_DOMAIN: u64 = 2 << 61;
    /// Request granularity: device-selective.
    pub const CIRG_DEVICE: u64 = 3 << 61;
    /// Actual granularity (bits 60:59) reported by hardware; 0 = request failed.
    pub const CAIG_SHIFT: u32 = 59;
    /// Source-id field shift (bits 31:16).
    pub const SID_SHIFT: u32 = 16;
}

/// IOTLB invalidate register fields.
pub mod iotlb {
    /// Invalidate IOTLB: set to request, cleared by hardware when done.
    pub const IVT: u64 = 1 << 63;
    /// Request granularity (bits 61:60): global.
    pub const IIRG_GLOBAL: u64 = 1 << 60;
    /// Request granularity: domain-selective.
    pub const IIRG_DOMAIN: u64 = 2 << 60;
    /// Request granularity: page-selective within a domain.
    pub const IIRG_PAGE: u64 = 3 << 60;
    /// Actual granularity (bits 58:57); 0 = request failed.
    pub const IAIG_SHIFT: u32 = 57;
    /// Drain reads (when CAP.DRD).
    pub const DR: u64 = 1 << 49;
    /// Drain writes (when CAP.DWD).
    pub const DW: u64 = 1 << 48;
    /// Domain id field shift (bits 47:32).
    pub const DID_SHIFT: u32 = 32;
}

/// FSTS bits.
pub mod fsts {
    /// Primary fault overflow (write 1 to clear).
    pub const PFO: u32 = 1 << 0;
    /// Primary pending fault (read-only summary of the records' F bits).
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error (write 1 to clear).
    pub const IQE: u32 = 1 << 4;
    /// Invalidation completion error (write 1 to clear).
    pub const ICE: u32 = 1 << 5;
    /// Invalidation time-out error (write 1 to clear).
    pub const ITE: u32 = 1 << 6;
    /// Fault record index (bits 15:8): the first record that holds a fault.
    pub const FRI_SHIFT: u32 = 8;
}

/// FECTL: interrupt mask (bit 31). The driver polls, so it keeps fault interrupts masked.
pub const FECTL_IM: u32 = 1 << 31;

/// ICS: invalidation wait descriptor complete (write 1 to clear).
pub const ICS_IWC: u32 = 1 << 0;
