//! Stream table entries, level-1 stream table descriptors and context descriptors (Arm IHI
//! 0070, 5.2-5.4): pure encoders, every bit this driver sets named here.
//!
//! | structure | word | bits | field | value here |
//! |---|---|---|---|---|
//! | L1STD | 0 | 4:0 | Span: the L2 table holds 2^(Span-1) STEs | [`L2_SPAN`] |
//! | L1STD | 0 | 51:6 | L2Ptr | the L2 table page |
//! | STE | 0 | 0 | V | 1 |
//! | STE | 0 | 3:1 | Config: `000` abort, `100` bypass, `101` stage 1 | |
//! | STE | 0 | 5:4 | S1Fmt | 0 (one CD) |
//! | STE | 0 | 51:6 | S1ContextPtr | the CD |
//! | STE | 0 | 63:59 | S1CDMax | 0 (no substreams) |
//! | STE | 1 | 3:2, 5:4, 7:6 | S1CIR, S1COR, S1CSH: how the SMMU reads the CD | WB, WB, inner shareable |
//! | STE | 1 | 31:30 | STRW | 0 (NS-EL1) |
//! | STE | 1 | 45:44 | SHCFG | 1 (use incoming shareability), bypass only |
//! | CD | 0 | 5:0 | T0SZ | 64 − input bits |
//! | CD | 0 | 7:6 | TG0 | 0 (4 KiB) |
//! | CD | 0 | 9:8, 11:10, 13:12 | IR0, OR0, SH0: table walks | WB, WB, inner shareable |
//! | CD | 0 | 14 | EPD0 | 0 |
//! | CD | 0 | 30 | EPD1 | 1 (no TTB1 half) |
//! | CD | 0 | 31 | V | 1 |
//! | CD | 0 | 34:32 | IPS | IDR5.OAS |
//! | CD | 0 | 41 | AA64 | 1 |
//! | CD | 0 | 45, 46 | R (record faults), A (abort, not stall) | 1, 1 |
//! | CD | 0 | 47 | ASET | 1 (the ASID is not shared with CPU TLBs) |
//! | CD | 0 | 63:48 | ASID | the domain's |
//! | CD | 1 | 51:4 | TTB0 | the page table root |
//! | CD | 3 | 63:0 | MAIR | [`ArmLpaeS1::MAIR`](crate::pgtable::ArmLpaeS1::MAIR) |
#![forbid(unsafe_code)]

use crate::addr::PhysAddr;

/// Bytes of one STE (and of one CD): 8 words.
pub const STE_BYTES: u64 = 64;
/// STE words.
pub const STE_WORDS: usize = 8;
/// StreamID bits resolved by one level-2 table: 6, so one L2 table is 64 STEs of 64 bytes,
/// exactly one 4 KiB page (STRTAB_BASE_CFG.SPLIT).
pub const SPLIT: u32 = 6;
/// Span of every level-1 descriptor this driver writes: 2^(7-1) = 64 STEs.
pub const L2_SPAN: u64 = SPLIT as u64 + 1;
/// Address field of descriptors and pointers, bits 51:6.
const ADDR_51_6: u64 = ((1 << 52) - 1) & !0x3f;
/// Address field of TTB0, bits 51:4.
const ADDR_51_4: u64 = ((1 << 52) - 1) & !0xf;

/// The translation a stream gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteConfig {
    /// Every transaction is terminated (no event is recorded).
    Abort,
    /// Transactions pass untranslated.
    Bypass,
    /// Stage-1 translation through the context descriptor at this address.
    Stage1 {
        /// The 64-byte CD (64-byte aligned).
        cd: PhysAddr,
    },
    /// Stage-2 translation (the STE holds the table and its controls itself).
    Stage2(Stage2Config),
}

/// What a stage-2 STE says (words 2 and 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage2Config {
    /// The VMID tagging the stream's TLB entries.
    pub vmid: u16,
    /// The stage-2 table root (S2TTB, 4 KiB aligned).
    pub ttb: PhysAddr,
    /// Input (IPA) bits: 39 (walk starts at level 1) or 48 (level 0).
    pub input_bits: u32,
    /// S2PS: the output size, IDR5.OAS's encoding.
    pub ps: u32,
}

/// What an STE's word 0 says (decoding: the stage-2 fields live in other words).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SteKind {
    /// Abort.
    Abort,
    /// Bypass.
    Bypass,
    /// Stage 1 through the CD at this address.
    Stage1 {
        /// The CD.
        cd: PhysAddr,
    },
    /// Stage 2.
    Stage2,
}

const STE_V: u64 = 1;
const CFG_ABORT: u64 = 0b000 << 1;
const CFG_BYPASS: u64 = 0b100 << 1;
const CFG_S1: u64 = 0b101 << 1;
const CFG_S2: u64 = 0b110 << 1;
/// STE word 2: S2IR0 = S2OR0 = 1 (write-back), S2SH0 = 3 (inner shareable), S2TG = 0
/// (4 KiB), S2AA64, S2R (record faults); S2AFFD, S2HA/HD, S2S, S2ENDI clear.
const STE2_S2_CONTROLS: u64 = (1 << 40) | (1 << 42) | (3 << 44) | (1 << 51) | (1 << 58);
/// STE word 1: S1CIR = S1COR = 1 (write-back read-allocate), S1CSH = 3 (inner shareable).
const STE1_CD_ATTRS: u64 = (1 << 2) | (1 << 4) | (3 << 6);
/// STE word 1: SHCFG = 1, use the incoming shareability (bypass streams).
const STE1_SHCFG_INCOMING: u64 = 1 << 44;

/// The eight words of a valid STE for `cfg`.
pub fn ste(cfg: SteConfig) -> [u64; STE_WORDS] {
    let mut w = [0; STE_WORDS];
    match cfg {
        SteConfig::Abort => w[0] = STE_V | CFG_ABORT,
        SteConfig::Bypass => {
            w[0] = STE_V | CFG_BYPASS;
            w[1] = STE1_SHCFG_INCOMING;
        }
        SteConfig::Stage1 { cd } => {
            w[0] = STE_V | CFG_S1 | (cd.raw() & ADDR_51_6);
            w[1] = STE1_CD_ATTRS;
        }
        SteConfig::Stage2(c) => {
            w[0] = STE_V | CFG_S2;
            w[1] = STE1_SHCFG_INCOMING;
            // 4 KiB granule: SL0 = 1 starts at level 1 (39 bits), 2 at level 0 (48 bits).
            let sl0: u64 = if c.input_bits > 39 { 2 } else { 1 };
            let t0sz = u64::from(64 - c.input_bits) & 0x3f;
            w[2] = u64::from(c.vmid)
                | (t0sz << 32)
                | (sl0 << 38)
                | STE2_S2_CONTROLS
                | (u64::from(c.ps & 0b111) << 48);
            w[3] = c.ttb.raw() & ADDR_51_4;
        }
    }
    w
}

/// The VMID of a stage-2 STE's word 2.
pub fn ste_vmid(word2: u64) -> u16 {
    word2 as u16
}

/// Decodes the Config of an STE's word 0 (for tests and the teardown check): `None` if
/// invalid or a config this driver never writes.
pub fn ste_config(word0: u64) -> Option<SteKind> {
    if word0 & STE_V == 0 {
        return None;
    }
    match word0 & 0b1110 {
        CFG_ABORT => Some(SteKind::Abort),
        CFG_BYPASS => Some(SteKind::Bypass),
        CFG_S1 => Some(SteKind::Stage1 { cd: PhysAddr::new(word0 & ADDR_51_6) }),
        CFG_S2 => Some(SteKind::Stage2),
        _ => None,
    }
}

/// A level-1 stream table descriptor pointing at a one-page L2 table of 64 STEs.
pub fn l1_descriptor(l2: PhysAddr) -> u64 {
    (l2.raw() & ADDR_51_6) | L2_SPAN
}

/// What a stage-1 context descriptor says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextDescriptor {
    /// The address-space id tagging the stream's TLB entries.
    pub asid: u16,
    /// The root of the stage-1 table (4 KiB aligned).
    pub ttb0: PhysAddr,
    /// Input address bits (T0SZ = 64 − this): 39 or 48.
    pub input_bits: u32,
    /// IDR5.OAS, written as IPS.
    pub ips: u32,
    /// MAIR0 (the attribute bytes the table's AttrIndx select).
    pub mair: u64,
}

const CD_WALK_ATTRS: u64 = (1 << 8) | (1 << 10) | (3 << 12);
const CD_EPD1: u64 = 1 << 30;
const CD_V: u64 = 1 << 31;
const CD_AA64: u64 = 1 << 41;
const CD_R: u64 = 1 << 45;
const CD_A: u64 = 1 << 46;
const CD_ASET: u64 = 1 << 47;

impl ContextDescriptor {
    /// The eight words of the CD.
    pub fn words(&self) -> [u64; STE_WORDS] {
        let t0sz = u64::from(64 - self.input_bits) & 0x3f;
        let mut w = [0; STE_WORDS];
        w[0] = t0sz
            | CD_WALK_ATTRS
            | CD_EPD1
            | CD_V
            | (u64::from(self.ips & 0b111) << 32)
            | CD_AA64
            | CD_R
            | CD_A
            | CD_ASET
            | (u64::from(self.asid) << 48);
        w[1] = self.ttb0.raw() & ADDR_51_4;
        w[3] = self.mair;
        w
    }

    /// The ASID a CD's word 0 names.
    pub fn asid_of(word0: u64) -> u16 {
        (word0 >> 48) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stes_have_the_spec_bit_layout() {
        assert_eq!(ste(SteConfig::Abort), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ste(SteConfig::Bypass)[..2], [0b1001, 1 << 44]);
        let s1 = ste(SteConfig::Stage1 { cd: PhysAddr::new(0x4123_4540) });
        assert_eq!(s1[0], 0x4123_4540 | 0b1011);
        assert_eq!(s1[1], 0xd4, "S1CIR = S1COR = WB-RA, S1CSH = ISH");
        assert!(s1[2..].iter().all(|&w| w == 0), "no stage 2, no VMID, STRW = NS-EL1");
        assert_eq!(ste_config(ste(SteConfig::Abort)[0]), Some(SteKind::Abort));
        assert_eq!(ste_config(ste(SteConfig::Bypass)[0]), Some(SteKind::Bypass));
        let cd = PhysAddr::new(0x8_0000_0040);
        assert_eq!(ste_config(ste(SteConfig::Stage1 { cd })[0]), Some(SteKind::Stage1 { cd }));
        assert_eq!(ste_config(0), None);
    }

    #[test]
    fn stage2_stes_have_the_spec_bit_layout() {
        let c = Stage2Config { vmid: 0x1234, ttb: PhysAddr::new(0x4_5678_9000), input_bits: 48, ps: 4 };
        let w = ste(SteConfig::Stage2(c));
        assert_eq!(w[0], 0b1101, "V, Config = 110");
        // VMID, S2T0SZ 16, SL0 2, IR0/OR0 WB, SH0 ISH, TG 4K, PS 44 bits, AA64, R.
        assert_eq!(w[2], 0x040c_3590_0000_1234);
        assert_eq!(w[3], 0x4_5678_9000);
        assert_eq!(ste_config(w[0]), Some(SteKind::Stage2));
        assert_eq!(ste_vmid(w[2]), 0x1234);
        let w39 = ste(SteConfig::Stage2(Stage2Config { input_bits: 39, ..c }));
        assert_eq!((w39[2] >> 32) & 0x3f, 25);
        assert_eq!((w39[2] >> 38) & 0b11, 1, "39 bits start at level 1");
    }

    #[test]
    fn level1_descriptors_point_at_one_page_of_64_stes() {
        assert_eq!(l1_descriptor(PhysAddr::new(0x4567_8000)), 0x4567_8007);
        // 64 STEs of 64 bytes: the L2 table is exactly one page.
        assert_eq!((1u64 << SPLIT) * STE_BYTES, crate::PAGE_SIZE);
    }

    #[test]
    fn context_descriptors_have_the_spec_bit_layout() {
        let cd = ContextDescriptor {
            asid: 0x1234,
            ttb0: PhysAddr::new(0x4_5678_9000),
            input_bits: 39,
            ips: 4,
            mair: 0x04ff,
        };
        let w = cd.words();
        // T0SZ 25, IR0/OR0 WB, SH0 ISH, EPD1, V, IPS 44 bits, AA64, R, A, ASET, ASID.
        assert_eq!(w[0], 0x1234_e204_c000_3519);
        assert_eq!(w[1], 0x4_5678_9000);
        assert_eq!((w[2], w[3]), (0, 0x04ff));
        assert_eq!(ContextDescriptor::asid_of(w[0]), 0x1234);
        let w48 = ContextDescriptor { input_bits: 48, ..cd }.words();
        assert_eq!(w48[0] & 0x3f, 16);
    }
}
