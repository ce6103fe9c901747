//! Event-queue records (Arm IHI 0070, 7.3): 32 bytes, decoded into [`Fault`].
//!
//! | word | bits | field |
//! |---|---|---|
//! | 0 | 7:0 | event type |
//! | 0 | 63:32 | StreamID |
//! | 1 | 33 | PnU (privileged) |
//! | 1 | 34 | InD (instruction) |
//! | 1 | 35 | RnW: 1 = read |
//! | 1 | 39 | S2: the fault is from stage 2 |
//! | 2 | 63:0 | input address (translation faults) |
#![forbid(unsafe_code)]

/// An event type this driver names (others keep their number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// 0x01: unsupported upstream transaction.
    UnsupportedUpstream,
    /// 0x02: StreamID out of range (or an L1 descriptor with Span 0).
    BadStreamId,
    /// 0x03: STE fetch aborted.
    SteFetch,
    /// 0x04: invalid STE.
    BadSte,
    /// 0x06: non-substream transaction to a stream that requires one.
    StreamDisabled,
    /// 0x09: CD fetch aborted.
    CdFetch,
    /// 0x0a: invalid CD.
    BadCd,
    /// 0x0b: a table walk's memory access aborted.
    WalkAbort,
    /// 0x10: translation fault (no valid entry).
    Translation,
    /// 0x11: address size fault.
    AddressSize,
    /// 0x12: access flag fault (AF = 0).
    Access,
    /// 0x13: permission fault.
    Permission,
    /// Any other type.
    Other(u8),
}

impl EventKind {
    /// The kind of event type `t`.
    pub fn from_type(t: u8) -> Self {
        match t {
            0x01 => Self::UnsupportedUpstream,
            0x02 => Self::BadStreamId,
            0x03 => Self::SteFetch,
            0x04 => Self::BadSte,
            0x06 => Self::StreamDisabled,
            0x09 => Self::CdFetch,
            0x0a => Self::BadCd,
            0x0b => Self::WalkAbort,
            0x10 => Self::Translation,
            0x11 => Self::AddressSize,
            0x12 => Self::Access,
            0x13 => Self::Permission,
            t => Self::Other(t),
        }
    }

    /// The spec's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnsupportedUpstream => "F_UUT",
            Self::BadStreamId => "C_BAD_STREAMID",
            Self::SteFetch => "F_STE_FETCH",
            Self::BadSte => "C_BAD_STE",
            Self::StreamDisabled => "F_STREAM_DISABLED",
            Self::CdFetch => "F_CD_FETCH",
            Self::BadCd => "C_BAD_CD",
            Self::WalkAbort => "F_WALK_EABT",
            Self::Translation => "F_TRANSLATION",
            Self::AddressSize => "F_ADDR_SIZE",
            Self::Access => "F_ACCESS",
            Self::Permission => "F_PERMISSION",
            Self::Other(_) => "other",
        }
    }

    /// Whether records of this kind carry the faulting input address and direction.
    pub fn has_address(self) -> bool {
        matches!(
            self,
            Self::UnsupportedUpstream
                | Self::WalkAbort
                | Self::Translation
                | Self::AddressSize
                | Self::Access
                | Self::Permission
        )
    }
}

/// Direction of the faulting transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device read memory.
    Read,
    /// The device wrote memory.
    Write,
}

/// One decoded event record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// What happened.
    pub kind: EventKind,
    /// The stream (PCI requester id).
    pub sid: u32,
    /// The input address (IOVA), for kinds that carry one ([`EventKind::has_address`]).
    pub addr: Option<u64>,
    /// The direction, for kinds that carry one.
    pub access: Option<Access>,
    /// The raw record.
    pub raw: [u64; 4],
}

impl Fault {
    /// Decodes a record.
    pub fn decode(raw: [u64; 4]) -> Self {
        let kind = EventKind::from_type(raw[0] as u8);
        let sid = (raw[0] >> 32) as u32;
        let (addr, access) = if kind.has_address() {
            let rnw = raw[1] & (1 << 35) != 0;
            (Some(raw[2]), Some(if rnw { Access::Read } else { Access::Write }))
        } else {
            (None, None)
        };
        Self { kind, sid, addr, access, raw }
    }
}

impl core::fmt::Display for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} sid {:#06x}", self.kind.name(), self.sid)?;
        if let (Some(a), Some(d)) = (self.addr, self.access) {
            write!(f, " {d:?} at {a:#x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translation_fault_records_name_stream_address_and_direction() {
        // As QEMU writes them (32-bit words 0..7): type 0x10, SID 0x10, RnW (word 3 bit 3),
        // address in words 4-5.
        let raw = [0x0000_0010_0000_0010, 1 << 35, 0x0123_4000, 0];
        let f = Fault::decode(raw);
        assert_eq!(f.kind, EventKind::Translation);
        assert_eq!((f.sid, f.addr, f.access), (0x10, Some(0x0123_4000), Some(Access::Read)));
        let w = Fault::decode([0x0000_0018_0000_0013, 0, 0x5000, 0]);
        assert_eq!((w.kind, w.sid, w.access), (EventKind::Permission, 0x18, Some(Access::Write)));
        assert_eq!(Fault::decode([0x12, 0, 0, 0]).kind, EventKind::Access);
    }

    #[test]
    fn configuration_errors_carry_no_address() {
        let f = Fault::decode([0x0000_0008_0000_0004, 1 << 35, 0xdead, 0]);
        assert_eq!((f.kind, f.sid, f.addr, f.access), (EventKind::BadSte, 8, None, None));
        assert_eq!(Fault::decode([0x0a, 0, 0, 0]).kind.name(), "C_BAD_CD");
        assert_eq!(Fault::decode([0x77, 0, 0, 0]).kind, EventKind::Other(0x77));
    }
}
