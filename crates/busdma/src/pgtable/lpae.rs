//! Arm VMSAv8-64 stage 1 translation table descriptors, 4 KiB granule (Arm ARM, D8
//! "The AArch64 Virtual Memory System Architecture": translation table descriptor formats),
//! as an SMMUv2/v3 walks them for a stage-1 context (context descriptor TTB0, TG0 = 4 KiB).
//!
//! # The format
//!
//! A table is a 4 KiB page of 512 64-bit descriptors; each level resolves 9 bits. With a
//! 4 KiB granule, a 39-bit input (T0SZ = 25) starts the walk at level 1 (3 levels) and a
//! 48-bit input (T0SZ = 16) at level 0 (4 levels). Arm numbers levels from the root (0..3);
//! this crate's *height* is `3 - level`.
//!
//! | bits | field | here |
//! |---|---|---|
//! | 1:0 | type: `x0` invalid; `11` table (levels 0-2) or page (level 3); `01` block (levels 1, 2) | |
//! | 4:2 | AttrIndx: index into MAIR | [`ArmLpaeS1::ATTR_INDEX`] (0, Normal write-back) or [`ArmLpaeS1::ATTR_INDEX_DEVICE`] (1, Device-nGnRE); see [`ArmLpaeS1::MAIR`] |
//! | 5 | NS | 0 (the context's security state) |
//! | 7:6 | AP[2:1]: AP[2] = 1 read-only; AP[1] = 1 unprivileged (EL0) access | AP[1] = !privileged; AP[2] = !write |
//! | 9:8 | SH: shareability | `11` inner shareable (normal); `10` outer shareable (device) |
//! | 10 | AF: access flag; 0 faults on first access | 1 |
//! | 11 | nG: not global | 0 |
//! | 47:12 | output address (47:21 for 2 MiB blocks, 47:30 for 1 GiB blocks), or next table | |
//! | 52 | contiguous hint | 0 |
//! | 53 | PXN | 1 |
//! | 54 | UXN / XN | 1: devices do not execute |
//! | 63:59 | table descriptors: NSTable, APTable, UXNTable, PXNTable | 0 (no restriction) |
//!
//! - **AP[1] = 1.** An SMMU stage-1 transaction with unprivileged attributes is checked like
//!   an EL0 access; Linux io-pgtable-arm sets AP[1] for the same reason: devices are usually
//!   unprivileged, and the rights are then exactly AP[2].
//! - **Rights.** Stage 1 has no "no read" encoding: every valid descriptor allows reads. A
//!   write-only request is therefore mapped read-write ([`PteFormat::effective_prot`] says so,
//!   and [`PteFormat::prot`] reads the entry back as read-write).
//! - **Memory type.** AttrIndx selects a byte of the MAIR the context descriptor holds
//!   (SMMUv3 CD.MAIR0). This format assumes [`ArmLpaeS1::MAIR`]: attribute 0 = `0xff`
//!   (Normal, inner and outer write-back, read/write-allocate) for RAM, attribute 1 = `0x04`
//!   (Device-nGnRE: no gathering, no reordering, early write acknowledgement, as PCIe posted
//!   writes are) for MMIO and peer BARs; the driver that programs the context descriptor
//!   must write that value. Device memory is always outer shareable whatever SH says; the
//!   entry writes `10` so it says so.
//! - **Privilege.** `Prot::privileged` clears AP[1]: only privileged requests (SMMU
//!   STE.PRIVCFG or the transaction's own attribute) may use the entry.
//! - **Snoop.** Stage 1 has no snoop override: a Normal inner-shareable write-back type is
//!   what makes an access coherent, so `Prot::force_snoop` is dropped.
//! - **Stage 2** is [`super::ArmLpaeS2`]: the same tables with other leaf attributes; the
//!   descriptor core both stages share is `lpae_desc.rs`.
//! - **Output width.** Without FEAT_LPA2, 4 KiB-granule descriptors hold output addresses of
//!   48 bits (bits 47:12).
//! - **Blocks** at level 1 (1 GiB) and level 2 (2 MiB); a level-0 block does not exist with a
//!   4 KiB granule, so height 3 is always a table.
#![forbid(unsafe_code)]

use super::lpae_desc::{AF, LpaeStage, SH_INNER, SH_OUTER};
use super::{MemType, Prot};

/// The Arm LPAE stage-1 format, 4 KiB granule.
#[derive(Clone, Copy, Debug, Default)]
pub struct ArmLpaeS1;

/// Bits 4:2: AttrIndx.
const ATTR_INDX_SHIFT: u32 = 2;
/// Bits 4:2 mask.
const ATTR_INDX_MASK: u64 = 0b111 << ATTR_INDX_SHIFT;
/// Bit 6: AP[1], unprivileged access.
const AP_UNPRIV: u64 = 1 << 6;
/// Bit 7: AP[2], read-only.
const AP_RDONLY: u64 = 1 << 7;
/// Bit 53: privileged execute never.
const PXN: u64 = 1 << 53;
/// Bit 54: (unprivileged) execute never.
const UXN: u64 = 1 << 54;

impl ArmLpaeS1 {
    /// The MAIR index of normal-memory leaves: attribute 0.
    pub const ATTR_INDEX: u64 = 0;
    /// The MAIR index of device-memory leaves (MMIO, peer BARs): attribute 1.
    pub const ATTR_INDEX_DEVICE: u64 = 1;
    /// The MAIR value (for the SMMU context descriptor's MAIR0) this format's leaves assume:
    /// attribute 0 = `0xff`, Normal memory, inner and outer write-back, read- and
    /// write-allocate, non-transient: the attribute of ordinary DMA buffers for a coherent
    /// device; attribute 1 = `0x04`, Device-nGnRE, for MMIO and peer BARs. Other attributes
    /// are 0 (Device-nGnRnE), unused.
    pub const MAIR: u64 = 0x04_ff;
}

impl LpaeStage for ArmLpaeS1 {
    const NAME: &'static str = "arm-lpae-s1";

    fn stage_prot(prot: Prot) -> Prot {
        // Stage 1 cannot deny reads of a valid entry and has no snoop override (module docs).
        Prot { read: true, force_snoop: false, ..prot }
    }

    #[inline]
    fn leaf_attrs(prot: Prot) -> u64 {
        let ro = if prot.write { 0 } else { AP_RDONLY };
        let unpriv = if prot.privileged { 0 } else { AP_UNPRIV };
        let (attr, sh) = match prot.mem {
            MemType::Normal => (Self::ATTR_INDEX, SH_INNER),
            MemType::Device => (Self::ATTR_INDEX_DEVICE, SH_OUTER),
        };
        (attr << ATTR_INDX_SHIFT) | unpriv | ro | sh | AF | PXN | UXN
    }

    #[inline]
    fn leaf_prot(pte: u64) -> Prot {
        let mem = if (pte & ATTR_INDX_MASK) >> ATTR_INDX_SHIFT == Self::ATTR_INDEX_DEVICE {
            MemType::Device
        } else {
            MemType::Normal
        };
        Prot {
            read: true,
            write: pte & AP_RDONLY == 0,
            mem,
            privileged: pte & AP_UNPRIV == 0,
            force_snoop: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::PteFormat;
    use super::*;
    use crate::addr::PhysAddr;

    #[test]
    fn lpae_entries_have_the_spec_bit_layout() {
        let pa = PhysAddr::new(0x8_1234_5000);
        // page, RW: type 11, AP[1], SH 11, AF, PXN, UXN.
        assert_eq!(ArmLpaeS1::make_leaf(pa, Prot::READ_WRITE, 0), 0x0060_0008_1234_5743);
        // read-only adds AP[2].
        assert_eq!(ArmLpaeS1::make_leaf(pa, Prot::READ, 0), 0x0060_0008_1234_57c3);
        // 2 MiB block: type 01.
        let blk = ArmLpaeS1::make_leaf(PhysAddr::new(0x4020_0000), Prot::READ_WRITE, 1);
        assert_eq!(blk, 0x0060_0000_4020_0741);
        assert!(ArmLpaeS1::is_leaf(blk, 1) && !ArmLpaeS1::is_leaf(ArmLpaeS1::make_table(pa), 1));
        assert_eq!(ArmLpaeS1::make_table(pa), 0x8_1234_5003);
        assert!(!ArmLpaeS1::is_leaf(0x741, 3), "no level-0 blocks with a 4 KiB granule");
        assert_eq!(ArmLpaeS1::split_block(blk, 1), 0x0060_0000_4020_0743);
        assert_eq!(ArmLpaeS1::effective_prot(Prot::WRITE), Ok(Prot::READ_WRITE));
        assert!(ArmLpaeS1::effective_prot(Prot::rw(false, false)).is_err());
    }

    #[test]
    fn device_memory_uses_the_device_attribute_index() {
        let pa = PhysAddr::new(0xfe00_0000);
        let dev = Prot::READ_WRITE.with_mem(MemType::Device);
        let pte = ArmLpaeS1::make_leaf(pa, ArmLpaeS1::effective_prot(dev).unwrap(), 0);
        // AttrIndx 1, AP[1], SH 10, AF, PXN, UXN, page.
        assert_eq!(pte, 0x0060_0000_fe00_0647);
        assert_eq!(ArmLpaeS1::prot(pte), dev);
        // MAIR byte 1 holds Device-nGnRE, byte 0 Normal write-back.
        assert_eq!((ArmLpaeS1::MAIR >> (8 * ArmLpaeS1::ATTR_INDEX_DEVICE)) & 0xff, 0x04);
        assert_eq!((ArmLpaeS1::MAIR >> (8 * ArmLpaeS1::ATTR_INDEX)) & 0xff, 0xff);
        let privileged = Prot { privileged: true, ..Prot::READ };
        let pte = ArmLpaeS1::make_leaf(pa, privileged, 0);
        assert_eq!(pte & AP_UNPRIV, 0, "privileged-only: AP[1] clear");
        assert_eq!(ArmLpaeS1::prot(pte), privileged);
        let snoop = Prot { force_snoop: true, ..Prot::READ_WRITE };
        assert_eq!(ArmLpaeS1::effective_prot(snoop), Ok(Prot::READ_WRITE), "no snoop override");
    }
}
