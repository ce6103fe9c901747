//! Primary fault records: what the unit logs when it blocks a DMA.
//!
//! Each record is 128 bits at `CAP.FRO * 16 + index * 16`. Word 0 bits 63:12 hold the faulting
//! page address; word 1 holds the source id (bits 15:0), the fault reason (bits 39:32), the
//! request type T (bit 62: 1 = read, 0 = write) and F (bit 63: the record holds a fault;
//! software writes 1 to clear it, which lets the unit record the next fault from that source).
#![forbid(unsafe_code)]

use crate::addr::Iova;

use super::entry::SourceId;

/// F: the record holds a fault (write 1 to clear).
pub const F: u64 = 1 << 63;
/// T: 1 = the blocked request was a read, 0 = a write.
const T: u64 = 1 << 62;
const REASON_SHIFT: u32 = 32;

/// Fault reason 5: a write to a page not writable (or not present) at some level.
pub const REASON_WRITE: u8 = 5;
/// Fault reason 6: a read of a page not readable (or not present) at some level.
pub const REASON_READ: u8 = 6;

/// Which way the blocked request went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device read memory.
    Read,
    /// The device wrote memory.
    Write,
}

/// One decoded fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Who asked.
    pub source: SourceId,
    /// The page the request addressed (4 KiB-aligned).
    pub addr: Iova,
    /// Read or write.
    pub access: Access,
    /// The architectural fault reason code (see [`REASON_WRITE`], [`REASON_READ`]).
    pub reason: u8,
}

/// Decodes a record's two words; `None` if F is clear (no fault held).
pub const fn decode(words: [u64; 2]) -> Option<Fault> {
    if words[1] & F == 0 {
        return None;
    }
    Some(Fault {
        source: SourceId(words[1] as u16),
        addr: Iova::new(words[0] & !0xfff),
        access: if words[1] & T != 0 { Access::Read } else { Access::Write },
        reason: (words[1] >> REASON_SHIFT) as u8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_f_holds_no_fault() {
        assert_eq!(decode([0x1234_5000, 0x5_0000_0018]), None);
    }

    #[test]
    fn a_write_fault_decodes_source_page_and_reason() {
        let f = decode([0x0fff_e123, F | (5 << 32) | 0x0010]).unwrap();
        assert_eq!(
            f,
            Fault {
                source: SourceId(0x10),
                addr: Iova::new(0x0fff_e000),
                access: Access::Write,
                reason: REASON_WRITE
            }
        );
    }

    #[test]
    fn t_set_means_a_read() {
        let f = decode([0x7000, F | T | (6 << 32) | 0x0118]).unwrap();
        assert_eq!((f.access, f.reason, f.source), (Access::Read, REASON_READ, SourceId(0x118)));
    }
}
