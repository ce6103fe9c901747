//! The Arm VMSAv8-64 stage-1 walk with the 4 KiB granule, as an SMMU performs it.
//!
//! Written from the Arm Architecture Reference Manual (D8 "The AArch64 Virtual Memory System
//! Architecture": translation table descriptor formats, access permissions) and the SMMUv3
//! specification, independently of busdma's table builder: they share no code.
//!
//! # The format
//!
//! 1. Tables are 4 KiB of 512 descriptors; each level resolves 9 bits. The input width
//!    (64 - T0SZ, 25 to 48 bits here) fixes the start level: 48 bits start at level 0, 39 bits
//!    at level 1; the start table holds `2^(bits - 12 - 9 * (levels - 1))` descriptors.
//! 2. Descriptor bits 1:0: `x0` invalid (translation fault); `11` a table at levels 0–2 or a
//!    page at level 3; `01` a block at levels 1 (1 GiB) and 2 (2 MiB). `01` at level 3 and a
//!    block at level 0 (4 KiB granule) are reserved encodings and fault like invalid ones.
//! 3. Output address: bits 47:12 (47:30 for a level-1 block, 47:21 for level 2). With a 48-bit
//!    (or narrower, [`super::IommuConfig::output_bits`]) output size, a descriptor whose
//!    address has bits at or above the output size (bits 51:48 included) is an address-size
//!    fault.
//! 4. Leaf attributes: AttrIndx bits 4:2 (memory type, no effect on rights), AP[2:1] bits 7:6,
//!    SH bits 9:8, **AF** bit 10 (clear: access-flag fault, since the model does no hardware
//!    flag update), nG bit 11, PXN/UXN bits 53/54 (instruction fetch only: DMA reads and
//!    writes are data accesses, so they play no part).
//!    AttrIndx selects a byte of the context descriptor's MAIR; the model's contexts hold
//!    [`MAIR`] (attribute 0 Normal write-back `0xff`, attribute 1 Device-nGnRE `0x04`), and an
//!    attribute byte whose high nibble is 0 is device memory. Decoded into the walk's
//!    attributes with AP[1] (privileged only when clear); transfers are not affected.
//! 5. Rights: AP[2] = 1 is read-only; AP[1] = 1 grants unprivileged access. PCIe requests
//!    reach an SMMU as unprivileged data accesses unless the stream is configured otherwise
//!    ([`super::Context::privileged`]), so an unprivileged transaction needs AP[1] = 1.
//!    Table descriptors restrict what lies below them: APTable bit 62 forbids writes, bit 61
//!    unprivileged access (hierarchical permissions, not disabled here).
#![forbid(unsafe_code)]

use busdma::PhysAddr;

use super::walk::{EntryReader, LeafAttrs, MAX_LEVELS, MemoryType, Walk, bits, read_entry};
use crate::dma::FaultReason;

/// The MAIR every model context descriptor holds: attribute 0 = `0xff` (Normal, inner and
/// outer write-back, read/write-allocate), attribute 1 = `0x04` (Device-nGnRE), the rest 0.
pub const MAIR: u64 = 0x04_ff;

const VALID: u64 = 1 << 0;
const TABLE_OR_PAGE: u64 = 1 << 1;
const AP_UNPRIV: u64 = 1 << 6;
const AP_RDONLY: u64 = 1 << 7;
pub(super) const AF: u64 = 1 << 10;
const APTABLE_NO_UNPRIV: u64 = 1 << 61;
const APTABLE_NO_WRITE: u64 = 1 << 62;

/// Levels walked for `input_bits` of input address with the 4 KiB granule, if supported.
pub(crate) fn levels(input_bits: u32) -> Option<u32> {
    // 25 bits (T0SZ = 39) is the narrowest 4 KiB-granule stage-1 space, 48 the widest
    // without FEAT_LPA2; each level resolves 9 bits above the 12-bit page offset.
    (25..=48).contains(&input_bits).then(|| (input_bits - 12).div_ceil(9))
}

/// Walks from the start table at `root` for `iova`, with `input_bits` of input and
/// `output_bits` of output address; `privileged` says how the transaction is issued. The
/// caller has checked `iova` against the input width.
pub(crate) fn walk(
    mem: &impl EntryReader,
    root: u64,
    input_bits: u32,
    iova: u64,
    output_bits: u32,
    privileged: bool,
) -> Result<Walk, FaultReason> {
    let levels = match levels(input_bits) {
        Some(l) => l,
        None => return Err(FaultReason::BeyondInputWidth { input_bits }),
    };
    walk_descriptors(mem, root, levels, iova, output_bits, |e, tables| {
        let no_write = tables & APTABLE_NO_WRITE != 0;
        let no_unpriv = tables & APTABLE_NO_UNPRIV != 0;
        let accessible = privileged || (e & AP_UNPRIV != 0 && !no_unpriv);
        let attr = (MAIR >> (8 * ((e >> 2) & 0b111))) & 0xff;
        let memory = if attr >> 4 == 0 { MemoryType::Device } else { MemoryType::Normal };
        let attrs = LeafAttrs { memory, snoop: false, privileged_only: e & AP_UNPRIV == 0 };
        (accessible, accessible && e & AP_RDONLY == 0 && !no_write, attrs)
    })
}

/// The walk both stages share (format items 1-3 and the access flag): `levels` levels from
/// `root` for `addr`. `leaf` decodes the leaf descriptor's rights and attributes (read,
/// write, attributes) once its type, output size and access flag have passed; it also gets
/// the OR of the table descriptors passed through (stage 1's hierarchical permissions).
pub(crate) fn walk_descriptors(
    mem: &impl EntryReader,
    root: u64,
    levels: u32,
    addr: u64,
    output_bits: u32,
    leaf: impl FnOnce(u64, u64) -> (bool, bool, LeafAttrs),
) -> Result<Walk, FaultReason> {
    let mut w = Walk {
        page: PhysAddr::new(0),
        read: false,
        write: false,
        tables: [0; MAX_LEVELS],
        depth: 0,
        attrs: LeafAttrs::NORMAL,
    };
    let mut next = root;
    let mut tables = 0;
    for level in 0..levels {
        let height = levels - 1 - level;
        let shift = 12 + 9 * height;
        // The start table may be shorter than 512 entries; the input check bounds the index.
        let e = read_entry(mem, next, (addr >> shift) & 511)?;
        w.tables[level as usize] = next;
        w.depth = level as u8 + 1;
        if e & VALID == 0 {
            return Err(FaultReason::NotPresent { level });
        }
        let is_block = e & TABLE_OR_PAGE == 0;
        if is_block && !(1..=2).contains(&height) {
            // A block at level 3 (encoding 01) or at level 0 (4 KiB granule) is reserved.
            return Err(FaultReason::Reserved { level, entry: e });
        }
        // Bits 51:48 are RES0 without FEAT_LPA; an address beyond the output size faults.
        if e & bits(51, output_bits.min(48)) != 0 {
            return Err(FaultReason::AddressSize { level, entry: e });
        }
        if height > 0 && !is_block {
            tables |= e;
            next = e & bits(47, 12);
            continue;
        }
        if e & AF == 0 {
            return Err(FaultReason::AccessFlag { level });
        }
        (w.read, w.write, w.attrs) = leaf(e, tables);
        w.page = PhysAddr::new((e & bits(47, shift)) | (addr & bits(shift - 1, 12)));
        return Ok(w);
    }
    Err(FaultReason::NotPresent { level: levels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Mem(HashMap<u64, u64>);
    impl EntryReader for Mem {
        fn read_entry(&self, pa: u64) -> Option<u64> {
            (pa < 1 << 40).then(|| self.0.get(&pa).copied().unwrap_or(0))
        }
    }

    const L0: u64 = 0x10_0000;
    const L1: u64 = 0x11_0000;
    const L2: u64 = 0x12_0000;
    const L3: u64 = 0x13_0000;
    const TABLE: u64 = 0b11;
    const PAGE: u64 = 0b11 | AF | AP_UNPRIV;
    const BLOCK: u64 = 0b01 | AF | AP_UNPRIV;

    fn idx(iova: u64, h: u32) -> u64 {
        ((iova >> (12 + 9 * h)) & 511) * 8
    }

    /// 48-bit: 0x4020_3000 -> 0x7777_7000 page; 0x4040_0000 2 MiB block (read-only) at
    /// 0x8000_0000; 0x8000_0000 1 GiB block at 0x1_4000_0000.
    fn mem() -> Mem {
        let mut m = HashMap::new();
        m.insert(L0 + idx(0x4020_3000, 3), L1 | TABLE);
        m.insert(L1 + idx(0x4020_3000, 2), L2 | TABLE);
        m.insert(L2 + idx(0x4020_3000, 1), L3 | TABLE);
        m.insert(L3 + idx(0x4020_3000, 0), 0x7777_7000 | PAGE);
        m.insert(L2 + idx(0x4040_0000, 1), 0x8000_0000 | BLOCK | AP_RDONLY);
        m.insert(L1 + idx(0x8000_0000, 2), 0x1_4000_0000 | BLOCK);
        Mem(m)
    }

    #[test]
    fn pages_and_blocks_translate_with_their_rights() {
        let m = mem();
        let w = walk(&m, L0, 48, 0x4020_3abc, 48, false).unwrap();
        assert_eq!((w.page.raw(), w.read, w.write), (0x7777_7000, true, true));
        assert_eq!(&w.tables[..w.depth as usize], &[L0, L1, L2, L3]);
        let w = walk(&m, L0, 48, 0x405f_f123, 48, false).unwrap();
        assert_eq!((w.page.raw(), w.read, w.write), (0x801f_f000, true, false));
        let w = walk(&m, L0, 48, 0xbfff_f000, 48, false).unwrap();
        assert_eq!((w.page.raw(), w.depth), (0x1_7fff_f000, 2));
    }

    #[test]
    fn a_39_bit_space_starts_at_level_1() {
        let m = mem();
        assert_eq!(levels(39), Some(3));
        assert_eq!(levels(48), Some(4));
        assert_eq!(levels(40), Some(4));
        assert_eq!(levels(49), None);
        let w = walk(&m, L1, 39, 0x4020_3000, 48, false).unwrap();
        assert_eq!((w.page.raw(), w.depth), (0x7777_7000, 3));
    }

    #[test]
    fn reserved_encodings_fault() {
        // 01 at level 3.
        let mut m = mem();
        *m.0.get_mut(&(L3 + idx(0x4020_3000, 0))).unwrap() &= !TABLE_OR_PAGE;
        assert!(matches!(
            walk(&m, L0, 48, 0x4020_3000, 48, false),
            Err(FaultReason::Reserved { level: 3, .. })
        ));
        // A block at level 0.
        let mut m = mem();
        *m.0.get_mut(&L0).unwrap() = BLOCK;
        assert!(matches!(
            walk(&m, L0, 48, 0x4020_3000, 48, false),
            Err(FaultReason::Reserved { level: 0, .. })
        ));
    }

    #[test]
    fn invalid_descriptors_fault_at_their_level() {
        let m = mem();
        assert_eq!(walk(&m, L0, 48, 0x4020_4000, 48, false), Err(FaultReason::NotPresent { level: 3 }));
        // Bit 1 alone (valid clear) is invalid.
        let mut m = mem();
        *m.0.get_mut(&(L1 + idx(0x4020_3000, 2))).unwrap() &= !VALID;
        assert_eq!(walk(&m, L0, 48, 0x4020_3000, 48, false), Err(FaultReason::NotPresent { level: 1 }));
    }

    #[test]
    fn access_flag_clear_faults() {
        let mut m = mem();
        *m.0.get_mut(&(L3 + idx(0x4020_3000, 0))).unwrap() &= !AF;
        assert_eq!(walk(&m, L0, 48, 0x4020_3000, 48, false), Err(FaultReason::AccessFlag { level: 3 }));
    }

    #[test]
    fn unprivileged_requests_need_ap1_and_obey_aptable() {
        let mut m = mem();
        *m.0.get_mut(&(L3 + idx(0x4020_3000, 0))).unwrap() &= !AP_UNPRIV;
        let w = walk(&m, L0, 48, 0x4020_3000, 48, false).unwrap();
        assert_eq!((w.read, w.write), (false, false));
        let w = walk(&m, L0, 48, 0x4020_3000, 48, true).unwrap();
        assert_eq!((w.read, w.write), (true, true));
        let mut m = mem();
        *m.0.get_mut(&(L1 + idx(0x4020_3000, 2))).unwrap() |= APTABLE_NO_WRITE;
        let w = walk(&m, L0, 48, 0x4020_3000, 48, false).unwrap();
        assert_eq!((w.read, w.write), (true, false));
        *m.0.get_mut(&(L1 + idx(0x4020_3000, 2))).unwrap() |= APTABLE_NO_UNPRIV;
        let w = walk(&m, L0, 48, 0x4020_3000, 48, false).unwrap();
        assert_eq!((w.read, w.write), (false, false));
    }

    #[test]
    fn output_addresses_beyond_the_output_size_fault() {
        let mut m = mem();
        *m.0.get_mut(&(L3 + idx(0x4020_3000, 0))).unwrap() |= 1 << 49;
        assert!(matches!(
            walk(&m, L0, 48, 0x4020_3000, 48, false),
            Err(FaultReason::AddressSize { level: 3, .. })
        ));
        let mut m = mem();
        *m.0.get_mut(&(L3 + idx(0x4020_3000, 0))).unwrap() |= 1 << 40;
        assert!(matches!(
            walk(&m, L0, 48, 0x4020_3000, 40, false),
            Err(FaultReason::AddressSize { level: 3, .. })
        ));
        assert_eq!(walk(&m, L0, 48, 0x4020_3000, 48, false).unwrap().page.raw(), 0x100_7777_7000);
    }
}
