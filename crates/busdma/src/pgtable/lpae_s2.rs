//! Arm VMSAv8-64 stage 2 translation table descriptors, 4 KiB granule (Arm ARM, D8: stage 2
//! descriptor formats), as an SMMUv3 walks them for a stage-2 STE (S2TTB, S2TG = 4 KiB, no
//! concatenated starting tables).
//!
//! # The format
//!
//! Tables, levels and address fields are stage 1's ([`super::ArmLpaeS1`]); the leaf
//! attributes differ:
//!
//! | bits | field | here |
//! |---|---|---|
//! | 1:0 | type: `11` table (levels 0-2) or page (level 3); `01` block (levels 1, 2) | |
//! | 5:2 | MemAttr: the memory type itself (no MAIR at stage 2, FWB = 0) | `1111` Normal outer and inner write-back; `0001` Device-nGnRE |
//! | 7:6 | S2AP: bit 6 read, bit 7 write | the rights asked for |
//! | 9:8 | SH | `11` inner shareable (normal), `10` outer (device) |
//! | 10 | AF | 1 (the SMMU faults on AF = 0 when HTTU does not set it) |
//! | 47:12 | output address (IPA → PA) | |
//! | 54:53 | XN | `01`... 1 in bit 54: devices do not execute |
//!
//! - **Rights.** Unlike stage 1, stage 2 expresses every combination: read-only (S2AP `01`),
//!   write-only (`10`), read-write (`11`); no rights is refused.
//! - **Privilege** does not exist at stage 2 (`Prot::privileged` is dropped), nor a snoop
//!   override (`force_snoop` dropped: Normal write-back inner-shareable is snooped).
#![forbid(unsafe_code)]

use super::lpae_desc::{AF, LpaeStage, SH_INNER, SH_OUTER};
use super::{MemType, Prot};

/// The Arm LPAE stage-2 format, 4 KiB granule.
#[derive(Clone, Copy, Debug, Default)]
pub struct ArmLpaeS2;

/// MemAttr `1111`: Normal, outer and inner write-back cacheable.
const MEMATTR_NORMAL_WB: u64 = 0b1111 << 2;
/// MemAttr `0001`: Device-nGnRE.
const MEMATTR_DEVICE_NGNRE: u64 = 0b0001 << 2;
const MEMATTR_MASK: u64 = 0b1111 << 2;
/// S2AP[0]: read.
const S2AP_READ: u64 = 1 << 6;
/// S2AP[1]: write.
const S2AP_WRITE: u64 = 1 << 7;
/// XN[1] (bit 54): execute never at every level of privilege.
const XN: u64 = 1 << 54;

impl LpaeStage for ArmLpaeS2 {
    const NAME: &'static str = "arm-lpae-s2";

    fn stage_prot(prot: Prot) -> Prot {
        Prot { privileged: false, force_snoop: false, ..prot }
    }

    #[inline]
    fn leaf_attrs(prot: Prot) -> u64 {
        let ap = if prot.read { S2AP_READ } else { 0 } | if prot.write { S2AP_WRITE } else { 0 };
        let (attr, sh) = match prot.mem {
            MemType::Normal => (MEMATTR_NORMAL_WB, SH_INNER),
            MemType::Device => (MEMATTR_DEVICE_NGNRE, SH_OUTER),
        };
        attr | ap | sh | AF | XN
    }

    #[inline]
    fn leaf_prot(pte: u64) -> Prot {
        let mem = if pte & MEMATTR_MASK == MEMATTR_DEVICE_NGNRE { MemType::Device } else { MemType::Normal };
        Prot {
            read: pte & S2AP_READ != 0,
            write: pte & S2AP_WRITE != 0,
            mem,
            privileged: false,
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
    fn stage2_entries_have_the_spec_bit_layout() {
        let pa = PhysAddr::new(0x8_1234_5000);
        // page RW: type 11, MemAttr 1111, S2AP 11, SH 11, AF, XN.
        assert_eq!(ArmLpaeS2::make_leaf(pa, Prot::READ_WRITE, 0), 0x0040_0008_1234_57ff);
        assert_eq!(ArmLpaeS2::make_leaf(pa, Prot::READ, 0), 0x0040_0008_1234_577f);
        assert_eq!(ArmLpaeS2::make_leaf(pa, Prot::WRITE, 0), 0x0040_0008_1234_57bf);
        let blk = ArmLpaeS2::make_leaf(PhysAddr::new(0x4020_0000), Prot::READ_WRITE, 1);
        assert_eq!(blk, 0x0040_0000_4020_07fd);
        assert_eq!(ArmLpaeS2::split_block(blk, 1), 0x0040_0000_4020_07ff);
        assert_eq!(ArmLpaeS2::make_table(pa), 0x8_1234_5003);
        let dev = Prot::READ_WRITE.with_mem(MemType::Device);
        let d = ArmLpaeS2::make_leaf(PhysAddr::new(0xfe00_0000), dev, 0);
        assert_eq!(d, 0x0040_0000_fe00_06c7, "MemAttr 0001, SH outer");
        assert_eq!(ArmLpaeS2::prot(d), dev);
    }

    #[test]
    fn stage2_expresses_write_only_and_drops_privilege() {
        assert_eq!(ArmLpaeS2::effective_prot(Prot::WRITE), Ok(Prot::WRITE));
        assert_eq!(ArmLpaeS2::prot(ArmLpaeS2::make_leaf(PhysAddr::new(0), Prot::WRITE, 0)), Prot::WRITE);
        let p = Prot { privileged: true, force_snoop: true, ..Prot::READ };
        assert_eq!(ArmLpaeS2::effective_prot(p), Ok(Prot::READ));
        assert!(ArmLpaeS2::effective_prot(Prot::rw(false, false)).is_err());
    }
}
