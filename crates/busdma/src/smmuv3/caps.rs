//! The SMMU's identification registers, decoded, and the refusal of what this driver cannot
//! drive ([`Capabilities::check`]).
#![forbid(unsafe_code)]

use crate::error::{Error, Result};

/// IDR0–IDR5 as read at probe (IDR2 and IDR4 carry nothing this driver needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// IDR0.
    pub idr0: u32,
    /// IDR1.
    pub idr1: u32,
    /// IDR3.
    pub idr3: u32,
    /// IDR5.
    pub idr5: u32,
}

impl Capabilities {
    /// Wraps raw register values.
    pub const fn new(idr0: u32, idr1: u32, idr3: u32, idr5: u32) -> Self {
        Self { idr0, idr1, idr3, idr5 }
    }

    /// IDR0.S1P: stage-1 translation.
    pub fn stage1(&self) -> bool {
        self.idr0 & (1 << 1) != 0
    }
    /// IDR0.S2P: stage-2 translation.
    pub fn stage2(&self) -> bool {
        self.idr0 & 1 != 0
    }
    /// IDR0.TTF (bits 3:2): 2 = AArch64 tables only, 3 = both.
    pub fn aarch64_tables(&self) -> bool {
        (self.idr0 >> 2) & 0b11 >= 2
    }
    /// IDR0.COHACC: the SMMU's table walks and queue accesses snoop the CPU caches.
    pub fn coherent(&self) -> bool {
        self.idr0 & (1 << 4) != 0
    }
    /// IDR0.HTTU (bits 7:6): hardware access-flag / dirty updates (0 = software sets AF).
    pub fn httu(&self) -> u32 {
        (self.idr0 >> 6) & 0b11
    }
    /// IDR0.VMID16.
    pub fn vmid16(&self) -> bool {
        self.idr0 & (1 << 18) != 0
    }
    /// IDR0.ASID16.
    pub fn asid16(&self) -> bool {
        self.idr0 & (1 << 12) != 0
    }
    /// IDR0.ST_LEVEL (bits 28:27): 1 = 2-level stream tables supported.
    pub fn two_level_stream_table(&self) -> bool {
        (self.idr0 >> 27) & 0b11 == 1
    }
    /// IDR0.TTENDIAN (bits 22:21): 0 mixed, 2 little, 3 big.
    pub fn little_endian_tables(&self) -> bool {
        matches!((self.idr0 >> 21) & 0b11, 0 | 2)
    }
    /// IDR0.STALL_MODEL (bits 25:24): 1 = stalls not supported (terminate only).
    pub fn stall_model(&self) -> u32 {
        (self.idr0 >> 24) & 0b11
    }
    /// IDR1.SIDSIZE: stream-id bits.
    pub fn sid_bits(&self) -> u32 {
        self.idr1 & 0x3f
    }
    /// IDR1.CMDQS: log2 of the largest command queue.
    pub fn cmdq_max_log2(&self) -> u32 {
        (self.idr1 >> 21) & 0x1f
    }
    /// IDR1.EVENTQS: log2 of the largest event queue.
    pub fn eventq_max_log2(&self) -> u32 {
        (self.idr1 >> 16) & 0x1f
    }
    /// IDR1.TABLES_PRESET / QUEUES_PRESET: base registers fixed by the implementation.
    pub fn preset(&self) -> bool {
        self.idr1 & (0b11 << 29) != 0
    }
    /// IDR3.RIL: range invalidation (TLBI with NUM/SCALE/TG).
    pub fn range_invalidation(&self) -> bool {
        self.idr3 & (1 << 10) != 0
    }
    /// IDR5.GRAN4K.
    pub fn granule_4k(&self) -> bool {
        self.idr5 & (1 << 4) != 0
    }
    /// IDR5.OAS (bits 2:0), the encoding CD.IPS takes.
    pub fn oas_field(&self) -> u32 {
        self.idr5 & 0b111
    }
    /// Output address bits (IDR5.OAS decoded).
    pub fn oas_bits(&self) -> u32 {
        match self.oas_field() {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            5 => 48,
            _ => 52,
        }
    }

    /// Refuses an SMMU this driver cannot drive: no stage 1, no AArch64 table format, no
    /// 4 KiB granule, big-endian-only walks, non-coherent (the driver does not clean queue
    /// entries: it needs COHACC), preset tables or queues, a stall-only fault model, or
    /// hardware AF updates forced on (HTTU is fine: the CD leaves HA/HD clear).
    ///
    /// Errors: [`Error::Unsupported`] naming the first missing feature.
    pub fn check(&self) -> Result<()> {
        let need = [
            (self.stage1(), "SMMUv3 without stage-1 translation (IDR0.S1P)"),
            (self.aarch64_tables(), "SMMUv3 without AArch64 tables (IDR0.TTF)"),
            (self.granule_4k(), "SMMUv3 without the 4 KiB granule (IDR5.GRAN4K)"),
            (self.little_endian_tables(), "SMMUv3 with big-endian table walks only (IDR0.TTENDIAN)"),
            (self.coherent(), "non-coherent SMMUv3 (IDR0.COHACC = 0)"),
            (!self.preset(), "SMMUv3 with preset tables or queues (IDR1)"),
            (self.stall_model() != 2, "SMMUv3 that forces stalls (IDR0.STALL_MODEL = 2)"),
            (self.sid_bits() > 0, "SMMUv3 with no stream-id bits (IDR1.SIDSIZE = 0)"),
            (self.cmdq_max_log2() >= 1 && self.eventq_max_log2() >= 1, "SMMUv3 queues too small"),
        ];
        for (ok, what) in need {
            if !ok {
                return Err(Error::Unsupported { what });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2's `virt` SMMUv3, as the aarch64 test kernel read it (qemu/aarch64).
    const QEMU72: Capabilities = Capabilities::new(0x0d40_101a, 0x0273_0010, 0x0000_1404, 0x0000_0074);

    #[test]
    fn qemu_72_smmu_decodes_and_is_accepted() {
        let c = QEMU72;
        assert!(c.stage1() && !c.stage2() && c.aarch64_tables() && c.coherent() && c.asid16());
        assert!(c.two_level_stream_table() && c.little_endian_tables() && c.range_invalidation());
        assert_eq!((c.sid_bits(), c.cmdq_max_log2(), c.eventq_max_log2()), (16, 19, 19));
        assert_eq!((c.oas_bits(), c.httu(), c.stall_model()), (44, 0, 1));
        assert_eq!(c.check(), Ok(()));
    }

    #[test]
    fn what_the_driver_cannot_drive_is_refused() {
        let no_s1 = Capabilities { idr0: QEMU72.idr0 & !2, ..QEMU72 };
        let no_coh = Capabilities { idr0: QEMU72.idr0 & !(1 << 4), ..QEMU72 };
        let no_4k = Capabilities { idr5: QEMU72.idr5 & !(1 << 4), ..QEMU72 };
        let aarch32 = Capabilities { idr0: QEMU72.idr0 & !(0b11 << 2) | (1 << 2), ..QEMU72 };
        let preset = Capabilities { idr1: QEMU72.idr1 | (1 << 30), ..QEMU72 };
        for c in [no_s1, no_coh, no_4k, aarch32, preset] {
            assert!(matches!(c.check(), Err(Error::Unsupported { .. })), "{c:x?} accepted");
        }
    }
}
