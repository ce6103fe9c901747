//! Capability decoding: CAP and ECAP say what this remapping unit does, and the driver
//! follows them (VT-d specification, sections 11.4.2 and 11.4.3).
#![forbid(unsafe_code)]

use crate::error::{Error, Result};

/// Second-level paging depth: how many table levels a domain's page table has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Levels {
    /// 3 levels, 39-bit input addresses (AGAW 39).
    Three,
    /// 4 levels, 48-bit input addresses (AGAW 48).
    Four,
}

impl Levels {
    /// Input address bits this depth translates: 12 + 9 per level.
    pub const fn input_bits(self) -> u32 {
        match self {
            Levels::Three => 39,
            Levels::Four => 48,
        }
    }

    /// Table levels.
    pub const fn count(self) -> u32 {
        match self {
            Levels::Three => 3,
            Levels::Four => 4,
        }
    }

    /// The context entry's AW field (also the SAGAW bit index) for this depth.
    pub const fn aw(self) -> u64 {
        match self {
            Levels::Three => 1,
            Levels::Four => 2,
        }
    }

    /// The depth whose input width is `bits` (39 or 48).
    pub const fn from_input_bits(bits: u32) -> Option<Levels> {
        match bits {
            39 => Some(Levels::Three),
            48 => Some(Levels::Four),
            _ => None,
        }
    }
}

/// The capabilities the driver uses, decoded from CAP and ECAP.
///
/// # Invariants
///
/// `cap` and `ecap` are the raw register values; every field below is derived from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Raw CAP.
    pub cap: u64,
    /// Raw ECAP.
    pub ecap: u64,
}

const fn field(v: u64, lo: u32, width: u32) -> u64 {
    (v >> lo) & ((1 << width) - 1)
}

impl Capabilities {
    /// Wraps raw CAP and ECAP values.
    pub const fn new(cap: u64, ecap: u64) -> Self {
        Self { cap, ecap }
    }

    /// CAP.ND (bits 2:0): the unit supports 2^(4 + 2·ND) domain ids.
    pub const fn domains(&self) -> u32 {
        let nd = field(self.cap, 0, 3) as u32;
        // ND = 7 is reserved; treat it as the largest defined value (6: 2^16 ids).
        let nd = if nd > 6 { 6 } else { nd };
        1 << (4 + 2 * nd)
    }

    /// CAP.RWBF (bit 4): software must flush the write buffer after updating tables.
    pub const fn rwbf(&self) -> bool {
        field(self.cap, 4, 1) != 0
    }

    /// CAP.CM (bit 7): caching mode; not-present entries may be cached, so even a
    /// not-present → present change needs an invalidation.
    pub const fn caching_mode(&self) -> bool {
        field(self.cap, 7, 1) != 0
    }

    /// CAP.SAGAW (bits 12:8): supported adjusted guest address widths; bit 1 = 39-bit
    /// (3-level), bit 2 = 48-bit (4-level), bit 3 = 57-bit (5-level).
    pub const fn sagaw(&self) -> u64 {
        field(self.cap, 8, 5)
    }

    /// CAP.MGAW (bits 21:16) + 1: the widest guest address the unit translates.
    pub const fn mgaw_bits(&self) -> u32 {
        field(self.cap, 16, 6) as u32 + 1
    }

    /// CAP.FRO (bits 33:24) × 16: byte offset of the first fault recording register.
    pub const fn fault_record_offset(&self) -> u64 {
        field(self.cap, 24, 10) * 16
    }

    /// CAP.SLLPS bit 0 (bit 34): 2 MiB second-level pages.
    pub const fn large_2m(&self) -> bool {
        field(self.cap, 34, 1) != 0
    }

    /// CAP.SLLPS bit 1 (bit 35): 1 GiB second-level pages.
    pub const fn large_1g(&self) -> bool {
        field(self.cap, 35, 1) != 0
    }

    /// CAP.PSI (bit 39): page-selective IOTLB invalidation.
    pub const fn psi(&self) -> bool {
        field(self.cap, 39, 1) != 0
    }

    /// CAP.NFR (bits 47:40) + 1: number of fault recording registers.
    pub const fn fault_records(&self) -> u32 {
        field(self.cap, 40, 8) as u32 + 1
    }

    /// CAP.MAMV (bits 53:48): the largest address mask a page-selective invalidation takes
    /// (2^MAMV pages at once).
    pub const fn mamv(&self) -> u32 {
        field(self.cap, 48, 6) as u32
    }

    /// CAP.DWD (bit 54): write draining.
    pub const fn drain_writes(&self) -> bool {
        field(self.cap, 54, 1) != 0
    }

    /// CAP.DRD (bit 55): read draining.
    pub const fn drain_reads(&self) -> bool {
        field(self.cap, 55, 1) != 0
    }

    /// ECAP.C (bit 0): hardware page walks snoop the CPU caches. When clear, every update of
    /// a structure the unit walks (root, context, page tables) must be written back from the
    /// cache before the unit may read it.
    pub const fn coherent(&self) -> bool {
        field(self.ecap, 0, 1) != 0
    }

    /// ECAP.QI (bit 1): queued invalidation.
    pub const fn queued_invalidation(&self) -> bool {
        field(self.ecap, 1, 1) != 0
    }

    /// ECAP.IRO (bits 17:8) × 16: byte offset of the IOTLB register pair.
    pub const fn iotlb_offset(&self) -> u64 {
        field(self.ecap, 8, 10) * 16
    }

    /// ECAP.SMTS (bit 43): scalable mode; this driver uses legacy mode either way.
    pub const fn scalable_mode(&self) -> bool {
        field(self.ecap, 43, 1) != 0
    }

    /// The deepest second-level depth that the unit supports (SAGAW), that does not exceed
    /// the unit's guest address width (MGAW) and `max`. Deeper tables reach more IOVA space;
    /// the DMA masks of the devices, not the depth, bound what is allocated.
    ///
    /// Errors: [`Error::Unsupported`] when SAGAW offers neither 3 nor 4 levels.
    pub fn choose_levels(&self, max: Levels) -> Result<Levels> {
        [Levels::Four, Levels::Three]
            .into_iter()
            .filter(|l| *l <= max)
            .find(|l| self.sagaw() & (1 << l.aw()) != 0 && l.input_bits() <= self.mgaw_bits().max(39))
            .ok_or(Error::Unsupported { what: "VT-d unit offers neither 3- nor 4-level second-level tables" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU 7.2's intel-iommu, default (39-bit) and aw-bits=48, as the QEMU suite's boot log
    /// prints them.
    const QEMU_CAP_39: u64 = 0x00d2_008c_2226_0206;
    const QEMU_CAP_48: u64 = 0x00d2_008c_222f_0606;
    const QEMU_ECAP: u64 = 0x0000_0000_00f0_0f4a;

    #[test]
    fn cap_fields_decode_at_their_spec_positions() {
        // Build a CAP with distinct values in every field the driver reads.
        let cap = 2 // ND = 2
            | (1 << 4) // RWBF
            | (1 << 7) // CM
            | (0b00110 << 8) // SAGAW: 39 and 48
            | (47 << 16) // MGAW = 48 bits
            | (0x123 << 24) // FRO
            | (0b11 << 34) // SLLPS 2M + 1G
            | (1 << 39) // PSI
            | (7 << 40) // NFR = 8 records
            | (9 << 48) // MAMV
            | (1 << 54) // DWD
            | (1 << 55); // DRD
        let c = Capabilities::new(cap, 0b11 | (0x55 << 8));
        assert_eq!(c.domains(), 256);
        assert!(c.rwbf() && c.caching_mode() && c.psi() && c.drain_reads() && c.drain_writes());
        assert_eq!(c.sagaw(), 0b110);
        assert_eq!(c.mgaw_bits(), 48);
        assert_eq!(c.fault_record_offset(), 0x1230);
        assert!(c.large_2m() && c.large_1g());
        assert_eq!(c.fault_records(), 8);
        assert_eq!(c.mamv(), 9);
        assert!(c.coherent() && c.queued_invalidation());
        assert_eq!(c.iotlb_offset(), 0x550);
    }

    #[test]
    fn an_all_zero_unit_offers_nothing() {
        let c = Capabilities::new(0, 0);
        assert!(!c.rwbf() && !c.psi() && !c.coherent() && !c.queued_invalidation());
        assert_eq!(c.domains(), 16);
        assert_eq!(c.fault_records(), 1);
        assert!(matches!(c.choose_levels(Levels::Four), Err(Error::Unsupported { .. })));
    }

    #[test]
    fn levels_follow_sagaw_and_mgaw() {
        let both = Capabilities::new((0b110 << 8) | (47 << 16), 0);
        assert_eq!(both.choose_levels(Levels::Four), Ok(Levels::Four));
        assert_eq!(both.choose_levels(Levels::Three), Ok(Levels::Three));
        let only39 = Capabilities::new((0b010 << 8) | (38 << 16), 0);
        assert_eq!(only39.choose_levels(Levels::Four), Ok(Levels::Three));
        // SAGAW says 48 but MGAW caps the unit at 39 bits: stay at 3 levels.
        let narrow = Capabilities::new((0b110 << 8) | (38 << 16), 0);
        assert_eq!(narrow.choose_levels(Levels::Four), Ok(Levels::Three));
        let only48 = Capabilities::new((0b100 << 8) | (47 << 16), 0);
        assert!(only48.choose_levels(Levels::Three).is_err());
    }

    #[test]
    fn qemu_registers_decode_as_qemu_documents_them() {
        let c = Capabilities::new(QEMU_CAP_48, QEMU_ECAP);
        assert!(c.psi() && c.queued_invalidation() && !c.coherent() && !c.rwbf() && !c.caching_mode());
        assert_eq!(c.sagaw(), 0b110);
        assert_eq!(c.mgaw_bits(), 48);
        assert_eq!(c.fault_records(), 1);
        assert_eq!(c.fault_record_offset(), 0x220);
        assert_eq!(c.iotlb_offset(), 0xf0);
        assert_eq!(c.mamv(), 18);
        assert_eq!(c.domains(), 65536);
        assert_eq!(c.choose_levels(Levels::Four), Ok(Levels::Four));
        let c39 = Capabilities::new(QEMU_CAP_39, QEMU_ECAP);
        assert_eq!((c39.sagaw(), c39.mgaw_bits()), (0b010, 39));
        assert_eq!(c39.choose_levels(Levels::Four), Ok(Levels::Three));
    }

    #[test]
    fn levels_encode_aw_and_width() {
        assert_eq!((Levels::Three.aw(), Levels::Three.input_bits(), Levels::Three.count()), (1, 39, 3));
        assert_eq!((Levels::Four.aw(), Levels::Four.input_bits(), Levels::Four.count()), (2, 48, 4));
        assert_eq!(Levels::from_input_bits(39), Some(Levels::Three));
        assert_eq!(Levels::from_input_bits(40), None);
    }
}
