//! The Intel VT-d second-level walk, as the remapping hardware performs it.
//!
//! Written from the Intel VT-d specification (chapter 3.7 "Second-Level Translation" and
//! chapter 9.8 "Second-Level Paging Entries"), independently of busdma's table builder: a bug
//! the builder and this walker shared would pass every test, so they share no code.
//!
//! # The format
//!
//! 1. Tables are 4 KiB of 512 eight-byte entries; each level resolves 9 bits of the input
//!    address. A 39-bit address width (AGAW) walks 3 levels (the root is the SL-PDPT), 48 bits
//!    4 levels (SL-PML4), 57 bits 5 levels (SL-PML5).
//! 2. Every entry: bit 0 **R** (read), bit 1 **W** (write). An entry with R = W = 0 is not
//!    present (execute requests are not modelled, so bit 2 X plays no part). Access rights are
//!    the AND of R (resp. W) over every entry of the walk.
//! 3. Bits `HAW-1:12` hold the next table's (or the page's) address; bits `51:HAW` are
//!    reserved and must be 0 (HAW: the host address width, [`super::IommuConfig::output_bits`]).
//!    Bits 63:52 (ignored / TM) and 11:8 (ignored / SNP) do not affect translation. A leaf's
//!    **SNP** (bit 11) and **EMT** (bits 5:3: 0 UC, 1 WC, 4 WT, 5 WP, 6 WB) are decoded into
//!    the walk's attributes (EMT 0 and 1 as device/uncacheable memory, the others normal),
//!    as a unit honouring EMT would read them; the model's transfers are not affected.
//! 4. Bit 7 **PS** in an SL-PDE (height 1) or SL-PDPE (height 2) makes the entry a 2 MiB or
//!    1 GiB superpage: its address field starts at bit 21 or 30 and bits 20:12 or 29:12 are
//!    reserved (must be 0). In an SL-PML4E or SL-PML5E bit 7 is reserved; in an SL-PTE it is
//!    ignored.
//! 5. A non-zero reserved field is a fault, not silently masked: the hardware reports it.
#![forbid(unsafe_code)]

use busdma::PhysAddr;

use super::walk::{EntryReader, LeafAttrs, MAX_LEVELS, MemoryType, Walk, bits, read_entry};
use crate::dma::FaultReason;

const R: u64 = 1 << 0;
const W: u64 = 1 << 1;
const PS: u64 = 1 << 7;
const SNP: u64 = 1 << 11;

/// Levels of a table with `input_bits` of input address (the AGAW), if VT-d has such a width.
pub(crate) fn levels(input_bits: u32) -> Option<u32> {
    match input_bits {
        // (39 - 12) / 9 = 3, (48 - 12) / 9 = 4, (57 - 12) / 9 = 5: the SAGAW widths.
        39 | 48 | 57 => Some((input_bits - 12) / 9),
        _ => None,
    }
}

/// Walks `levels` levels from the root table at `root` for `iova`, reading entries through
/// `mem`, with a host address width of `haw` bits. The caller has checked `iova` against the
/// input width.
pub(crate) fn walk(
    mem: &impl EntryReader,
    root: u64,
    levels: u32,
    iova: u64,
    haw: u32,
) -> Result<Walk, FaultReason> {
    let addr = bits(haw - 1, 12);
    let reserved_high = if haw >= 52 { 0 } else { bits(51, haw) };
    let mut w = Walk {
        page: PhysAddr::new(0),
        read: true,
        write: true,
        tables: [0; MAX_LEVELS],
        depth: 0,
        attrs: LeafAttrs::NORMAL,
    };
    let mut table = root;
    for level in 0..levels {
        let height = levels - 1 - level;
        let shift = 12 + 9 * height;
        let e = read_entry(mem, table, (iova >> shift) & 511)?;
        w.tables[level as usize] = table;
        w.depth = level as u8 + 1;
        if e & (R | W) == 0 {
            return Err(FaultReason::NotPresent { level });
        }
        if e & reserved_high != 0 {
            return Err(FaultReason::Reserved { level, entry: e });
        }
        w.read &= e & R != 0;
        w.write &= e & W != 0;
        let leaf = match height {
            0 => true,
            1 | 2 => e & PS != 0,
            _ if e & PS != 0 => return Err(FaultReason::Reserved { level, entry: e }),
            _ => false,
        };
        if !leaf {
            table = e & addr;
            continue;
        }
        if height > 0 && e & bits(shift - 1, 12) != 0 {
            return Err(FaultReason::Reserved { level, entry: e });
        }
        let base = e & addr & !bits(shift - 1, 0);
        w.page = PhysAddr::new(base | (iova & bits(shift - 1, 12)));
        let memory = match (e >> 3) & 0b111 {
            0 | 1 => MemoryType::Device,
            _ => MemoryType::Normal,
        };
        w.attrs = LeafAttrs { memory, snoop: e & SNP != 0, privileged_only: false };
        return Ok(w);
    }
    // `levels` ≥ 1 and the last level is always a leaf, so the loop returned.
    Err(FaultReason::NotPresent { level: levels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Guest RAM as a map of words; absent words read as zero inside `[0, 1 << 40)`.
    struct Mem(HashMap<u64, u64>);
    impl EntryReader for Mem {
        fn read_entry(&self, pa: u64) -> Option<u64> {
            (pa < 1 << 40).then(|| self.0.get(&pa).copied().unwrap_or(0))
        }
    }

    const ROOT: u64 = 0x10_0000;
    const L1: u64 = 0x11_0000;
    const L2: u64 = 0x12_0000;
    const L3: u64 = 0x13_0000;

    /// A 4-level table: iova 0x4020_3000 -> 0x7777_7000 (4 KiB, RW); 0x4040_0000.. as a 2 MiB
    /// superpage at 0x8000_0000 (read only); iova 0x8000_0000.. as a 1 GiB superpage.
    fn mem() -> Mem {
        let mut m = HashMap::new();
        // Entry index for a height: (iova >> (12 + 9h)) & 511.
        let i = |iova: u64, h: u32| ((iova >> (12 + 9 * h)) & 511) * 8;
        m.insert(ROOT + i(0x4020_3000, 3), L1 | R | W);
        m.insert(L1 + i(0x4020_3000, 2), L2 | R | W);
        m.insert(L2 + i(0x4020_3000, 1), L3 | R | W);
        m.insert(L3 + i(0x4020_3000, 0), 0x7777_7000 | R | W);
        m.insert(L2 + i(0x4040_0000, 1), 0x8000_0000 | PS | R);
        m.insert(L1 + i(0x8000_0000, 2), 0x1_4000_0000 | PS | R | W);
        Mem(m)
    }

    #[test]
    fn four_level_walk_translates_pages_and_superpages() {
        let m = mem();
        let w = walk(&m, ROOT, 4, 0x4020_3abc, 48).unwrap();
        assert_eq!((w.page.raw(), w.read, w.write), (0x7777_7000, true, true));
        assert_eq!(&w.tables[..w.depth as usize], &[ROOT, L1, L2, L3]);
        let w = walk(&m, ROOT, 4, 0x405f_f123, 48).unwrap();
        assert_eq!((w.page.raw(), w.read, w.write), (0x801f_f000, true, false));
        assert_eq!(w.depth, 3);
        let w = walk(&m, ROOT, 4, 0xbfff_ffff, 48).unwrap();
        assert_eq!(w.page.raw(), 0x1_7fff_f000);
    }

    #[test]
    fn rights_are_the_and_of_every_level() {
        let mut m = mem();
        // Take W away at the SL-PDPE: the 4 KiB leaf below is read-only now.
        let e = m.0.get_mut(&(L1 + 8)).unwrap(); // bits 38:30 of 0x4020_3000 = 1
        *e &= !W;
        let w = walk(&m, ROOT, 4, 0x4020_3000, 48).unwrap();
        assert_eq!((w.read, w.write), (true, false));
    }

    #[test]
    fn absent_entries_fault_at_their_level() {
        let m = mem();
        assert_eq!(walk(&m, ROOT, 4, 0x4020_4000, 48), Err(FaultReason::NotPresent { level: 3 }));
        assert_eq!(walk(&m, ROOT, 4, 0x1_0000_0000_0000 >> 1, 48), Err(FaultReason::NotPresent { level: 0 }));
        // Only W set still counts as present.
        let mut m = mem();
        *m.0.get_mut(&(L3 + 3 * 8)).unwrap() = 0x7777_7000 | W;
        let w = walk(&m, ROOT, 4, 0x4020_3000, 48).unwrap();
        assert_eq!((w.read, w.write), (false, true));
    }

    #[test]
    fn reserved_fields_fault() {
        let mut m = mem();
        // PS in an SL-PML4E is reserved.
        *m.0.get_mut(&ROOT).unwrap() |= PS;
        assert!(matches!(walk(&m, ROOT, 4, 0x4020_3000, 48), Err(FaultReason::Reserved { level: 0, .. })));
        // Address bits above HAW are reserved.
        let mut m = mem();
        *m.0.get_mut(&ROOT).unwrap() |= 1 << 40;
        assert!(matches!(walk(&m, ROOT, 4, 0x4020_3000, 40), Err(FaultReason::Reserved { level: 0, .. })));
        assert!(walk(&m, ROOT, 4, 0x4020_3000, 48).is_err(), "bit 40 now points the walk elsewhere");
        // Bits 20:12 of a 2 MiB superpage are reserved.
        let mut m = mem();
        *m.0.get_mut(&(L2 + 2 * 8)).unwrap() |= 0x1000;
        assert!(matches!(walk(&m, ROOT, 4, 0x4040_0000, 48), Err(FaultReason::Reserved { level: 2, .. })));
        // PS in an SL-PTE is ignored.
        let mut m = mem();
        *m.0.get_mut(&(L3 + 3 * 8)).unwrap() |= PS;
        assert_eq!(walk(&m, ROOT, 4, 0x4020_3000, 48).unwrap().page.raw(), 0x7777_7000);
    }

    #[test]
    fn three_level_tables_start_at_the_pdpt() {
        let m = mem();
        // With 3 levels the root is indexed by bits 38:30: L1 plays the root.
        let w = walk(&m, L1, 3, 0x4020_3000, 48).unwrap();
        assert_eq!(w.page.raw(), 0x7777_7000);
        assert_eq!(&w.tables[..w.depth as usize], &[L1, L2, L3]);
        assert_eq!(levels(39), Some(3));
        assert_eq!(levels(48), Some(4));
        assert_eq!(levels(40), None);
    }

    #[test]
    fn a_table_outside_ram_faults() {
        let mut m = mem();
        *m.0.get_mut(&(L2 + 8)).unwrap() = (1 << 41) | R | W;
        assert_eq!(
            walk(&m, ROOT, 4, 0x4020_3000, 48),
            Err(FaultReason::TableOutsideRam { pa: (1 << 41) + 3 * 8 })
        );
    }
}
