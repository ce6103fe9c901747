//! Intel VT-d second-level paging entries (Intel VT-d specification, ch. 9 "Translation
//! Structure Formats", second-level paging entries: SL-PML4E, SL-PDPE, SL-PDE, SL-PTE).
//!
//! # The format
//!
//! A second-level table is a 4 KiB page of 512 little-endian 64-bit entries; each level
//! resolves 9 bits of the input (guest-physical / IOVA) address. The context entry's AW field
//! selects the depth: AGAW 39 bits = 3 levels (the SL-PDPT is the root), 48 bits = 4 levels
//! (SL-PML4 root). Bits of one entry, as this file builds them:
//!
//! | bits | field | here |
//! |---|---|---|
//! | 0 | R: reads allowed through this entry | rights; set in every non-leaf |
//! | 1 | W: writes allowed through this entry | rights; set in every non-leaf |
//! | 2 | X: execute (only with ECAP.SLEE) | 0: devices do not execute |
//! | 5:3 | EMT: memory type (leaves; used with snoop control) | 0 |
//! | 6 | IPAT: ignore PAT (leaves) | 0 |
//! | 7 | PS: page size; 1 = this SL-PDE / SL-PDPE maps a 2 MiB / 1 GiB page | leaves at height 1, 2 |
//! | 11 | SNP: snoop (leaves; with ECAP.SC) | 0 |
//! | HAW-1:12 | ADDR: next table, or page frame (21 / 30 low bits zero for 2 MiB / 1 GiB) | |
//! | 62 | TM: transient mapping (leaves; with ECAP.DT) | 0 |
//!
//! - **Present.** The format has no present bit: an entry with R, W and X all zero is
//!   not present and the walker ignores the rest. So a non-leaf entry must have R and W set:
//!   the rights of a translation are the AND of the rights of every entry on the walk, and an
//!   intermediate entry with R = W = 0 would make the whole subtree unreachable.
//! - **Leaves.** At height 0 (SL-PTE) every present entry is a leaf and bit 7 is ignored (we
//!   write 0). At heights 1 and 2 a present entry is a leaf exactly when PS = 1; 1 GiB leaves
//!   need CAP.SLLPS bit 1, 2 MiB leaves bit 0 (the driver limits the table's leaves with
//!   `PageTable::with_max_leaf`). At height 3 (SL-PML4E) bit 7 is reserved: always a table.
//! - **Rights.** Read-only, write-only and read-write are all expressible.
//! - **Output width.** ADDR reaches bit HAW-1, and HAW is at most 52 in the VT-d 3.x
//!   specification; a PA at or above 2^52 cannot be stored.
#![forbid(unsafe_code)]

use super::{Prot, PteFormat};
use crate::addr::PhysAddr;
use crate::error::{Error, Result};

/// The VT-d second-level format.
#[derive(Clone, Copy, Debug, Default)]
pub struct VtdSl;

/// Bit 0: read.
const R: u64 = 1 << 0;
/// Bit 1: write.
const W: u64 = 1 << 1;
/// Bit 7: page size (a 2 MiB / 1 GiB leaf at heights 1 / 2).
const PS: u64 = 1 << 7;
/// ADDR, bits 51:12 (HAW ≤ 52).
const ADDR_MASK: u64 = ((1 << 52) - 1) & !0xfff;

impl PteFormat for VtdSl {
    const NAME: &'static str = "vtd-sl";
    const OUTPUT_BITS: u32 = 52;
    const MAX_LEAF_HEIGHT: u32 = 2;

    fn effective_prot(prot: Prot) -> Result<Prot> {
        if !prot.read && !prot.write {
            return Err(Error::InvalidArgument { what: "rights: neither read nor write", value: 0 });
        }
        Ok(prot)
    }

    #[inline]
    fn is_present(pte: u64) -> bool {
        pte & (R | W) != 0
    }

    #[inline]
    fn is_leaf(pte: u64, height: u32) -> bool {
        height == 0 || (height <= Self::MAX_LEAF_HEIGHT && pte & PS != 0)
    }

    #[inline]
    fn make_table(table: PhysAddr) -> u64 {
        (table.raw() & ADDR_MASK) | R | W
    }

    #[inline]
    fn make_leaf(pa: PhysAddr, prot: Prot, height: u32) -> u64 {
        let rights = if prot.read { R } else { 0 } | if prot.write { W } else { 0 };
        let ps = if height > 0 { PS } else { 0 };
        (pa.raw() & ADDR_MASK) | rights | ps
    }

    #[inline]
    fn output(pte: u64, _height: u32) -> PhysAddr {
        PhysAddr::new(pte & ADDR_MASK)
    }

    #[inline]
    fn prot(pte: u64) -> Prot {
        Prot { read: pte & R != 0, write: pte & W != 0 }
    }

    #[inline]
    fn split_block(pte: u64, height: u32) -> u64 {
        // Children keep every attribute; below height 1 they are SL-PTEs, where PS is ignored.
        if height == 1 { pte & !PS } else { pte }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtd_entries_have_the_spec_bit_layout() {
        let pa = PhysAddr::new(0x1234_5000);
        assert_eq!(VtdSl::make_leaf(pa, Prot::READ, 0), 0x1234_5001);
        assert_eq!(VtdSl::make_leaf(pa, Prot::WRITE, 0), 0x1234_5002);
        assert_eq!(VtdSl::make_leaf(PhysAddr::new(0x4020_0000), Prot::READ_WRITE, 1), 0x4020_0083);
        assert_eq!(VtdSl::make_table(pa), 0x1234_5003);
        assert!(VtdSl::is_leaf(0x4020_0083, 1) && !VtdSl::is_leaf(0x1234_5003, 1));
        assert!(!VtdSl::is_leaf(0x83, 3), "bit 7 is reserved in an SL-PML4E: always a table");
        assert!(!VtdSl::is_present(0x1234_5000 | PS));
        assert_eq!(VtdSl::split_block(0x4020_0083, 1), 0x4020_0003);
        assert_eq!(VtdSl::output(0xfff8_0000_0000_1003, 1), PhysAddr::new(0x0008_0000_0000_1000));
    }

    #[test]
    fn address_field_is_linear_for_every_height() {
        for h in 0..=2 {
            let span = 1u64 << (12 + 9 * h);
            let pa = PhysAddr::new(7 * span);
            for d in [span, 5 * span] {
                let moved = PhysAddr::new(pa.raw() + d);
                assert_eq!(VtdSl::make_leaf(moved, Prot::READ, h), VtdSl::make_leaf(pa, Prot::READ, h) + d);
            }
        }
    }
}
