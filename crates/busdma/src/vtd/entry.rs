//! Root and context entries (legacy mode), encoded as pairs of 64-bit words.
//!
//! A root table is one 4 KiB page of 256 root entries, one per PCI bus; a present root entry
//! points at that bus's context table, one 4 KiB page of 256 context entries, one per
//! device/function (devfn). A present context entry names the device's domain id, the depth
//! (AW) and the root of its second-level page table (VT-d specification, section 9.1-9.3).
//! Each entry is 128 bits: word 0 holds the present bit, so it is written last when an entry
//! is made present and first when it is cleared.
#![forbid(unsafe_code)]

use crate::addr::PhysAddr;

use super::caps::Levels;

/// Present bit (bit 0 of word 0) of root and context entries.
pub const PRESENT: u64 = 1 << 0;
/// Bits 63:12 of word 0: a 4 KiB-aligned table address.
const ADDR_MASK: u64 = !0xfff;
/// Context entry translation type (word 0, bits 3:2): 00 = untranslated requests are
/// translated through the second-level tables; translated requests (ATS) are blocked.
const TT_UNTRANSLATED_ONLY: u64 = 0b00 << 2;
/// Context entry domain-id field shift (word 1, bits 23:8).
const DID_SHIFT: u32 = 8;

/// A 16-bit domain id, as hardware tags IOTLB entries. Id 0 is never handed out (it is the
/// id hardware uses in caching mode for not-present entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(pub u16);

/// A PCI requester id: `bus << 8 | device << 3 | function`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceId(pub u16);

impl SourceId {
    /// From bus, device (< 32) and function (< 8); `None` if out of range.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Option<Self> {
        if dev >= 32 || func >= 8 {
            return None;
        }
        Some(SourceId(((bus as u16) << 8) | ((dev as u16) << 3) | func as u16))
    }

    /// The bus: the root-table index.
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// Device and function: the context-table index.
    pub const fn devfn(self) -> u8 {
        self.0 as u8
    }
}

/// The two words of a present root entry pointing at `context_table`.
pub const fn root_entry(context_table: PhysAddr) -> [u64; 2] {
    [(context_table.raw() & ADDR_MASK) | PRESENT, 0]
}

/// The two words of a present context entry: second-level table at `sl_root` with depth
/// `levels`, domain `did`.
pub const fn context_entry(sl_root: PhysAddr, levels: Levels, did: DomainId) -> [u64; 2] {
    [
        (sl_root.raw() & ADDR_MASK) | TT_UNTRANSLATED_ONLY | PRESENT,
        levels.aw() | ((did.0 as u64) << DID_SHIFT),
    ]
}

/// Decodes a context entry: `(sl_root, AW field, domain id)` if present.
pub const fn decode_context(words: [u64; 2]) -> Option<(PhysAddr, u64, DomainId)> {
    if words[0] & PRESENT == 0 {
        return None;
    }
    Some((PhysAddr::new(words[0] & ADDR_MASK), words[1] & 0b111, DomainId((words[1] >> DID_SHIFT) as u16)))
}

/// The table address in word 0 of a present root entry.
pub const fn decode_root(words: [u64; 2]) -> Option<PhysAddr> {
    if words[0] & PRESENT == 0 { None } else { Some(PhysAddr::new(words[0] & ADDR_MASK)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_entry_is_present_with_the_table_address_and_nothing_else() {
        let e = root_entry(PhysAddr::new(0x1234_5000));
        assert_eq!(e, [0x1234_5001, 0]);
        assert_eq!(decode_root(e), Some(PhysAddr::new(0x1234_5000)));
        assert_eq!(decode_root([0x1234_5000, 0]), None);
    }

    #[test]
    fn context_entry_encodes_table_depth_and_domain_at_spec_positions() {
        let e = context_entry(PhysAddr::new(0xabc_d000), Levels::Four, DomainId(0x1234));
        // Word 0: address | TT=00 | P; word 1: DID in 23:8, AW=2 (4-level) in 2:0.
        assert_eq!(e, [0xabc_d001, 0x12_3402]);
        let e3 = context_entry(PhysAddr::new(0x7000), Levels::Three, DomainId(1));
        assert_eq!(e3, [0x7001, 0x101]);
        assert_eq!(decode_context(e), Some((PhysAddr::new(0xabc_d000), 2, DomainId(0x1234))));
        assert_eq!(decode_context([0, e[1]]), None);
    }

    #[test]
    fn context_entry_ignores_low_address_bits() {
        let e = context_entry(PhysAddr::new(0x7fff), Levels::Three, DomainId(3));
        assert_eq!(e[0], 0x7001);
    }

    #[test]
    fn source_id_splits_into_bus_and_devfn() {
        let s = SourceId::new(0x12, 3, 5).unwrap();
        assert_eq!(s.0, 0x121d);
        assert_eq!((s.bus(), s.devfn()), (0x12, 0x1d));
        assert_eq!(SourceId::new(0, 32, 0), None);
        assert_eq!(SourceId::new(0, 0, 8), None);
    }
}
