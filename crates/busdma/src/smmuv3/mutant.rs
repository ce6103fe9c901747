//! Mutants: the SMMUv3 driver broken on purpose, one way each, so the QEMU suite can prove it
//! notices (`qemu/run --mutants`). Same pattern as `vtd/mutant.rs`: the compiler flag
//! `--cfg busdma_mutant="NAME"`, never a Cargo feature; this module is private.
#![forbid(unsafe_code)]

#[cfg(any(test, busdma_mutant = "smmu-af-clear"))]
use crate::{
    addr::PhysAddr,
    error::Result,
    pgtable::{ArmLpaeS1, Prot, PteFormat},
};

/// Issue no TLBI for unmaps (stale translations stay usable).
pub(crate) const SKIP_TLBI: bool = cfg!(busdma_mutant = "smmu-skip-tlbi");
/// Queue commands without a CMD_SYNC and return without waiting for them.
pub(crate) const SKIP_SYNC: bool = cfg!(busdma_mutant = "smmu-skip-sync");
/// Write each STE at the wrong StreamID (sid XOR 1: the next function).
const WRONG_STREAMID: bool = cfg!(busdma_mutant = "smmu-wrong-streamid");
/// Write the wrong ASID (XOR 1) into context descriptors; TLBIs keep the right one.
const WRONG_CD_ASID: bool = cfg!(busdma_mutant = "smmu-wrong-cd-asid");

/// The StreamID the driver writes an STE at.
pub(crate) fn stream_id(sid: u32) -> u32 {
    if WRONG_STREAMID { sid ^ 1 } else { sid }
}

/// The ASID the driver writes into a CD.
pub(crate) fn cd_asid(asid: u16) -> u16 {
    if WRONG_CD_ASID { asid ^ 1 } else { asid }
}

/// The stage-1 format with the access flag left clear in every leaf: an SMMU without
/// hardware AF updates (HTTU = 0) faults on first access (F_ACCESS).
///
/// `pub` only so that the `smmu-af-clear` build's `Stage1` alias may name it; it lives in
/// this private module and exists only in that build and in the crate's own tests.
#[cfg(any(test, busdma_mutant = "smmu-af-clear"))]
#[derive(Clone, Copy, Debug, Default)]
pub struct AfClear;

#[cfg(any(test, busdma_mutant = "smmu-af-clear"))]
impl PteFormat for AfClear {
    const NAME: &'static str = "arm-lpae-s1-mutant-af-clear";
    const OUTPUT_BITS: u32 = ArmLpaeS1::OUTPUT_BITS;
    const MAX_LEAF_HEIGHT: u32 = ArmLpaeS1::MAX_LEAF_HEIGHT;

    fn effective_prot(prot: Prot) -> Result<Prot> {
        ArmLpaeS1::effective_prot(prot)
    }
    fn is_present(pte: u64) -> bool {
        ArmLpaeS1::is_present(pte)
    }
    fn is_leaf(pte: u64, height: u32) -> bool {
        ArmLpaeS1::is_leaf(pte, height)
    }
    fn make_table(table: PhysAddr) -> u64 {
        ArmLpaeS1::make_table(table)
    }
    fn make_leaf(pa: PhysAddr, prot: Prot, height: u32) -> u64 {
        // AF is bit 10.
        ArmLpaeS1::make_leaf(pa, prot, height) & !(1 << 10)
    }
    fn output(pte: u64, height: u32) -> PhysAddr {
        ArmLpaeS1::output(pte, height)
    }
    fn prot(pte: u64) -> Prot {
        ArmLpaeS1::prot(pte)
    }
    fn split_block(pte: u64, height: u32) -> u64 {
        ArmLpaeS1::split_block(pte, height)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smmu_mutant_switches_are_off_in_ordinary_builds() {
        const { assert!(!SKIP_TLBI && !SKIP_SYNC && !WRONG_STREAMID && !WRONG_CD_ASID) };
        assert_eq!((stream_id(8), cd_asid(3)), (8, 3));
    }

    #[test]
    fn the_af_mutant_differs_from_lpae_s1_only_in_the_access_flag() {
        let pa = PhysAddr::new(0x4000_1000);
        let good = ArmLpaeS1::make_leaf(pa, Prot::READ_WRITE, 0);
        assert_eq!(AfClear::make_leaf(pa, Prot::READ_WRITE, 0), good & !(1 << 10));
        assert_ne!(good & (1 << 10), 0);
        assert_eq!(AfClear::make_table(pa), ArmLpaeS1::make_table(pa));
    }
}
