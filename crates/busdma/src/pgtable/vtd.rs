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
//! | 5:3 | EMT: extended memory type (leaves) | 6 (WB) for normal memory, 0 (UC) for device memory |
//! | 6 | IPAT: ignore PAT (leaves) | 0 |
//! | 7 | PS: page size; 1 = this SL-PDE / SL-PDPE maps a 2 MiB / 1 GiB page | leaves at height 1, 2 |
//! | 11 | SNP: snoop (leaves; with ECAP.SC) | `Prot::force_snoop` on normal memory; never on device memory |
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
//! - **Memory type.** EMT is honoured only where the hardware is told to use it (EMTE in a
//!   scalable-mode PASID entry); in legacy mode the unit ignores bits 5:3 and the type of a
//!   host physical address comes from the platform (MTRRs: UC for MMIO). The entry records
//!   the type anyway, WB (6) for [`MemType::Normal`] and UC (0) for [`MemType::Device`], so
//!   the entry states what the mapping is and a unit that honours EMT gets it right. QEMU 7.2
//!   (the suite's unit) treats bits 6:3 as ignored.
//! - **Snoop.** SNP = 1 makes the unit snoop every access through the leaf whatever the
//!   request's No Snoop attribute says; it exists only with ECAP.SC (without it bit 11 is
//!   reserved: QEMU faults such an entry unless in scalable mode), so it is set only when the
//!   caller asks for [`Prot::force_snoop`], which a driver does only on a unit with ECAP.SC.
//!   It is never set for device memory (snooping applies to memory, and MMIO must not be
//!   reached as cacheable): [`PteFormat::effective_prot`] drops it there.
//! - **Privilege.** Second-level entries have no privilege bit: a privileged-only request is
//!   refused (`InvalidArgument`) rather than opened to every request.
//! - **TM** (bit 62, transient mapping, for device-TLBs with ECAP.DT) is not used: 0.
//! - **Output width.** ADDR reaches bit HAW-1, and HAW is at most 52 in the VT-d 3.x
//!   specification; a PA at or above 2^52 cannot be stored.
#![forbid(unsafe_code)]

use super::{MemType, Prot, PteFormat};
use crate::addr::PhysAddr;
use crate::error::{Error, Result};

/// The VT-d second-level format.
#[derive(Clone, Copy, Debug, Default)]
pub struct VtdSl;

/// Bit 0: read.
const R: u64 = 1 << 0;
/// Bit 1: write.
const W: u64 = 1 << 1;
/// Bits 5:3: EMT (extended memory type).
const EMT_MASK: u64 = 0b111 << 3;
/// EMT = 6: write-back.
const EMT_WB: u64 = 6 << 3;
/// Bit 11: SNP, snoop every access (with ECAP.SC).
const SNP: u64 = 1 << 11;
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
        if prot.privileged {
            return Err(Error::InvalidArgument {
                what: "privileged-only entry: VT-d second-level entries have no privilege bit",
                value: 1,
            });
        }
        let force_snoop = prot.force_snoop && prot.mem == MemType::Normal;
        Ok(Prot { force_snoop, ..prot })
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
        let emt = match prot.mem {
            MemType::Normal => EMT_WB,
            MemType::Device => 0,
        };
        let snp = if prot.force_snoop && prot.mem == MemType::Normal { SNP } else { 0 };
        (pa.raw() & ADDR_MASK) | rights | ps | emt | snp
    }

    #[inline]
    fn output(pte: u64, _height: u32) -> PhysAddr {
        PhysAddr::new(pte & ADDR_MASK)
    }

    #[inline]
    fn prot(pte: u64) -> Prot {
        let mem = if pte & EMT_MASK == EMT_WB { MemType::Normal } else { MemType::Device };
        Prot { read: pte & R != 0, write: pte & W != 0, mem, privileged: false, force_snoop: pte & SNP != 0 }
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
        assert_eq!(VtdSl::make_leaf(pa, Prot::READ, 0), 0x1234_5031);
        assert_eq!(VtdSl::make_leaf(pa, Prot::WRITE, 0), 0x1234_5032);
        assert_eq!(VtdSl::make_leaf(PhysAddr::new(0x4020_0000), Prot::READ_WRITE, 1), 0x4020_00b3);
        assert_eq!(VtdSl::make_table(pa), 0x1234_5003);
        assert!(VtdSl::is_leaf(0x4020_00b3, 1) && !VtdSl::is_leaf(0x1234_5003, 1));
        assert!(!VtdSl::is_leaf(0x83, 3), "bit 7 is reserved in an SL-PML4E: always a table");
        assert!(!VtdSl::is_present(0x1234_5000 | PS));
        assert_eq!(VtdSl::split_block(0x4020_00b3, 1), 0x4020_0033);
        assert_eq!(VtdSl::output(0xfff8_0000_0000_1003, 1), PhysAddr::new(0x0008_0000_0000_1000));
    }

    #[test]
    fn device_memory_is_uncached_and_never_snooped() {
        let pa = PhysAddr::new(0xfe00_0000);
        let dev = Prot::READ_WRITE.with_mem(MemType::Device);
        let snooped_dev = Prot { force_snoop: true, ..dev };
        let eff = VtdSl::effective_prot(snooped_dev).unwrap();
        assert!(!eff.force_snoop, "forced snoop is dropped on device memory");
        let pte = VtdSl::make_leaf(pa, eff, 0);
        assert_eq!(pte, 0xfe00_0003, "EMT = 0 (UC), SNP clear");
        assert_eq!(pte & SNP, 0);
        assert_eq!(VtdSl::prot(pte), dev);
        // Even a caller that skips effective_prot gets no SNP on device memory.
        assert_eq!(VtdSl::make_leaf(pa, snooped_dev, 0) & SNP, 0);
        // Normal memory with forced snoop: EMT = WB and SNP.
        let ram = Prot { force_snoop: true, ..Prot::READ };
        let pte = VtdSl::make_leaf(pa, VtdSl::effective_prot(ram).unwrap(), 0);
        assert_eq!(pte, 0xfe00_0831);
        assert_eq!(VtdSl::prot(pte), ram);
        assert_eq!(VtdSl::prot(VtdSl::make_leaf(pa, Prot::WRITE, 0)), Prot::WRITE);
    }

    #[test]
    fn a_privileged_only_entry_is_refused() {
        let p = Prot { privileged: true, ..Prot::READ };
        assert!(matches!(VtdSl::effective_prot(p), Err(Error::InvalidArgument { .. })));
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
