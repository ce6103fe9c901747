//! The Arm VMSAv8-64 stage-2 walk with the 4 KiB granule, as an SMMU performs it for a
//! stage-2 stream table entry.
//!
//! Written from the Arm Architecture Reference Manual (D8: stage 2 descriptor formats,
//! stage 2 access permissions and memory attributes), independently of busdma's table builder.
//!
//! # The format
//!
//! 1. Tables, levels, descriptor types and output addresses are stage 1's (`lpae.rs`): 4 KiB
//!    tables of 512 descriptors, 48-bit inputs start at level 0 and 39-bit ones at level 1
//!    (no concatenated start tables here), `11` table/page, `01` block at levels 1 and 2.
//! 2. Leaf attributes: MemAttr bits 5:2 hold the memory type itself (no MAIR at stage 2,
//!    FEAT_S2FWB off): `00xx` is Device memory, anything else Normal. S2AP bits 7:6: bit 6
//!    grants reads, bit 7 writes; `00` grants nothing (a permission fault on any access). AF
//!    bit 10 clear: access-flag fault. XN bits 54:53 concern instruction fetches only.
//! 3. Stage 2 has no privilege and no hierarchical permissions: table descriptors' bits 63:59
//!    are ignored.
#![forbid(unsafe_code)]

use super::lpae::walk_descriptors;
use super::walk::{EntryReader, LeafAttrs, MemoryType, Walk};
use crate::dma::FaultReason;

const S2AP_READ: u64 = 1 << 6;
const S2AP_WRITE: u64 = 1 << 7;

/// Walks from the start table at `root` for `ipa`, with `input_bits` of input and
/// `output_bits` of output address.
pub(crate) fn walk(
    mem: &impl EntryReader,
    root: u64,
    input_bits: u32,
    ipa: u64,
    output_bits: u32,
) -> Result<Walk, FaultReason> {
    let Some(levels) = levels(input_bits) else {
        return Err(FaultReason::BeyondInputWidth { input_bits });
    };
    // Stage 2 has no hierarchical permissions: table descriptors' bits 63:59 are ignored.
    walk_descriptors(mem, root, levels, ipa, output_bits, |e, _tables| {
        let memory = if (e >> 2) & 0b1100 == 0 { MemoryType::Device } else { MemoryType::Normal };
        (e & S2AP_READ != 0, e & S2AP_WRITE != 0, LeafAttrs { memory, snoop: false, privileged_only: false })
    })
}

/// Levels walked for `input_bits` of IPA, if supported.
pub(crate) fn levels(input_bits: u32) -> Option<u32> {
    match input_bits {
        31..=39 => Some(3),
        40..=48 => Some(4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::lpae::AF;
    use super::*;
    use std::collections::HashMap;

    struct Mem(HashMap<u64, u64>);
    impl EntryReader for Mem {
        fn read_entry(&self, pa: u64) -> Option<u64> {
            (pa < 1 << 40).then(|| self.0.get(&pa).copied().unwrap_or(0))
        }
    }

    #[test]
    fn stage2_rights_come_from_s2ap_and_the_type_from_memattr() {
        // 39 bits: level 1 at 0x11_0000, level 2 at 0x12_0000, level 3 at 0x13_0000.
        let mut m = HashMap::new();
        m.insert(0x11_0000, 0x12_0000 | 0b11);
        m.insert(0x12_0000, 0x13_0000 | 0b11);
        // Page 0: write-only normal; page 1: read-only device; page 2: no rights; page 3: AF clear.
        m.insert(0x13_0000, 0x4000_0000 | 0b11 | (0b1111 << 2) | S2AP_WRITE | AF);
        m.insert(0x13_0008, 0x4000_1000 | 0b11 | (0b0001 << 2) | S2AP_READ | AF);
        m.insert(0x13_0010, 0x4000_2000 | 0b11 | (0b1111 << 2) | AF);
        m.insert(0x13_0018, 0x4000_3000 | 0b11 | (0b1111 << 2) | S2AP_READ);
        let mem = Mem(m);
        let w = walk(&mem, 0x11_0000, 39, 0x0, 48).unwrap();
        assert_eq!(
            (w.page.raw(), w.read, w.write, w.attrs.memory),
            (0x4000_0000, false, true, MemoryType::Normal)
        );
        let w = walk(&mem, 0x11_0000, 39, 0x1000, 48).unwrap();
        assert_eq!((w.read, w.write, w.attrs.memory), (true, false, MemoryType::Device));
        let w = walk(&mem, 0x11_0000, 39, 0x2000, 48).unwrap();
        assert!(!w.read && !w.write);
        assert_eq!(walk(&mem, 0x11_0000, 39, 0x3000, 48).unwrap_err(), FaultReason::AccessFlag { level: 2 });
        assert_eq!(walk(&mem, 0x11_0000, 39, 0x4000, 48).unwrap_err(), FaultReason::NotPresent { level: 2 });
    }
}
