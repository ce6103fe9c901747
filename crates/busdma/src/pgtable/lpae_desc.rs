//! What Arm VMSAv8-64 stage-1 and stage-2 descriptors share with the 4 KiB granule (Arm ARM,
//! D8: translation table descriptor formats): validity, the type field, table descriptors,
//! output addresses, block splitting and the shareability and access-flag bits: one
//! [`PteFormat`] for both, over an [`LpaeStage`] that encodes only a stage's leaf attributes
//! (memory type, rights, privilege).
#![forbid(unsafe_code)]

use super::{Prot, PteFormat};
use crate::addr::PhysAddr;
use crate::error::{Error, Result};

/// Bit 0: valid.
const VALID: u64 = 1 << 0;
/// Bits 1:0 = `11`: table (heights 1-3) or page (height 0).
const TYPE_TABLE_OR_PAGE: u64 = 0b11;
/// Bits 1:0 = `01`: block (heights 1, 2).
const TYPE_BLOCK: u64 = 0b01;
/// Bits 1:0 mask.
const TYPE_MASK: u64 = 0b11;
/// Output address, bits 47:12 (without FEAT_LPA2).
const ADDR_MASK: u64 = ((1 << 48) - 1) & !0xfff;

/// Bits 9:8 = `11`: inner shareable (normal memory).
pub(super) const SH_INNER: u64 = 0b11 << 8;
/// Bits 9:8 = `10`: outer shareable (device memory).
pub(super) const SH_OUTER: u64 = 0b10 << 8;
/// Bit 10: access flag (set in every leaf: SMMUs fault on AF = 0 without HTTU).
pub(super) const AF: u64 = 1 << 10;
/// The highest height a leaf (block) may have: 2 MiB at height 1, 1 GiB at height 2; a
/// level-0 block does not exist with a 4 KiB granule.
const MAX_LEAF_HEIGHT: u32 = 2;
/// Output address width of 4 KiB-granule descriptors without FEAT_LPA2.
const OUTPUT_BITS: u32 = 48;

/// One stage's leaf attributes: all that differs between the stages. Sealed (this module is
/// private), so the blanket [`PteFormat`] below serves exactly [`super::ArmLpaeS1`] and
/// [`super::ArmLpaeS2`].
pub trait LpaeStage: Send + Sync + 'static {
    /// The format's short name, for reports.
    const NAME: &'static str;
    /// The rights and attributes a leaf built for `prot` grants; `prot` grants something.
    fn stage_prot(prot: Prot) -> Prot;
    /// A leaf's attribute bits (everything but the address and the type field).
    fn leaf_attrs(prot: Prot) -> u64;
    /// The rights and attributes a leaf grants.
    fn leaf_prot(pte: u64) -> Prot;
}

impl<S: LpaeStage> PteFormat for S {
    const NAME: &'static str = S::NAME;
    const OUTPUT_BITS: u32 = OUTPUT_BITS;
    const MAX_LEAF_HEIGHT: u32 = MAX_LEAF_HEIGHT;

    fn effective_prot(prot: Prot) -> Result<Prot> {
        // Neither stage can express an entry with no rights.
        if !prot.read && !prot.write {
            return Err(Error::InvalidArgument { what: "rights: neither read nor write", value: 0 });
        }
        Ok(S::stage_prot(prot))
    }

    #[inline]
    fn is_present(pte: u64) -> bool {
        pte & VALID != 0
    }

    #[inline]
    fn is_leaf(pte: u64, height: u32) -> bool {
        height == 0 || (height <= MAX_LEAF_HEIGHT && pte & TYPE_MASK == TYPE_BLOCK)
    }

    #[inline]
    fn make_table(table: PhysAddr) -> u64 {
        (table.raw() & ADDR_MASK) | TYPE_TABLE_OR_PAGE
    }

    #[inline]
    fn make_leaf(pa: PhysAddr, prot: Prot, height: u32) -> u64 {
        let ty = if height == 0 { TYPE_TABLE_OR_PAGE } else { TYPE_BLOCK };
        (pa.raw() & ADDR_MASK) | ty | S::leaf_attrs(prot)
    }

    #[inline]
    fn output(pte: u64, _height: u32) -> PhysAddr {
        PhysAddr::new(pte & ADDR_MASK)
    }

    #[inline]
    fn prot(pte: u64) -> Prot {
        S::leaf_prot(pte)
    }

    #[inline]
    fn split_block(pte: u64, height: u32) -> u64 {
        // A child keeps every attribute; at height 0 its type becomes "page".
        if height == 1 { (pte & !TYPE_MASK) | TYPE_TABLE_OR_PAGE } else { pte }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ArmLpaeS1, ArmLpaeS2};
    use super::*;

    fn linear<F: PteFormat>() {
        for h in 0..=MAX_LEAF_HEIGHT {
            let span = 1u64 << (12 + 9 * h);
            let pa = PhysAddr::new(7 * span);
            for d in [span, 5 * span] {
                let moved = PhysAddr::new(pa.raw() + d);
                assert_eq!(F::make_leaf(moved, Prot::READ, h), F::make_leaf(pa, Prot::READ, h) + d);
            }
        }
    }

    #[test]
    fn address_field_is_linear_for_every_height_in_both_stages() {
        linear::<ArmLpaeS1>();
        linear::<ArmLpaeS2>();
    }
}
