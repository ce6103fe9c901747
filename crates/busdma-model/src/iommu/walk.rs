//! What a table walk produces, shared by the two format walkers.
#![forbid(unsafe_code)]

use busdma::PhysAddr;

use crate::dma::FaultReason;

/// The deepest walk either format makes: VT-d 5-level tables (57-bit input).
pub(crate) const MAX_LEVELS: usize = 5;

/// The memory type a leaf gives the device's accesses, as the walker decodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryType {
    /// Normal, cacheable memory (VT-d EMT write-back, write-through or write-protect; an Arm
    /// MAIR attribute whose high nibble is not 0).
    Normal,
    /// Device or uncacheable memory (VT-d EMT 0, UC; an Arm MAIR attribute `0000_xxxx`,
    /// Device-nGnRnE / nGnRE / nGRE / GRE).
    Device,
}

/// The attributes of the leaf a walk ended on, decoded from its bits (not the rights, which
/// are the walk's AND over every level).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeafAttrs {
    /// The memory type.
    pub memory: MemoryType,
    /// VT-d SNP: every access through the leaf snoops (always false on Arm stage 1).
    pub snoop: bool,
    /// Arm `AP[1]` = 0: only privileged transactions may use the leaf (always false on VT-d).
    pub privileged_only: bool,
}

impl LeafAttrs {
    pub(crate) const NORMAL: LeafAttrs =
        LeafAttrs { memory: MemoryType::Normal, snoop: false, privileged_only: false };
}

/// A translation, as the hardware caches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Walk {
    /// Physical address of the 4 KiB page that holds the IOVA.
    pub page: PhysAddr,
    /// The transaction may read.
    pub read: bool,
    /// The transaction may write.
    pub write: bool,
    /// Physical addresses of the table pages the walk went through, root first.
    pub tables: [u64; MAX_LEVELS],
    /// How many of `tables` are used.
    pub depth: u8,
    /// The leaf's attributes.
    pub attrs: LeafAttrs,
}

/// Reads one 64-bit entry of guest RAM, as the walker's bus access does; `None` if no RAM
/// answers at that address.
pub(crate) trait EntryReader {
    fn read_entry(&self, pa: u64) -> Option<u64>;
}

impl<F: Fn(u64) -> Option<u64>> EntryReader for F {
    #[inline]
    fn read_entry(&self, pa: u64) -> Option<u64> {
        self(pa)
    }
}

/// Reads entry `index` of the table at `table`.
#[inline]
pub(crate) fn read_entry(mem: &impl EntryReader, table: u64, index: u64) -> Result<u64, FaultReason> {
    let pa = table + index * 8;
    mem.read_entry(pa).ok_or(FaultReason::TableOutsideRam { pa })
}

/// `mask` of bits `lo..=hi`.
#[inline]
pub(crate) const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_masks_cover_exactly_their_range() {
        assert_eq!(bits(0, 0), 1);
        assert_eq!(bits(47, 12), 0x0000_ffff_ffff_f000);
        assert_eq!(bits(63, 0), u64::MAX);
        assert_eq!(bits(51, 48), 0x000f_0000_0000_0000);
    }
}
