//! The vocabulary of a transfer, shared by every layer: which way data moves ([`Direction`])
//! and which side of a transfer a sync is ([`SyncOp`]). It sits below the front end and the
//! mechanisms (bounce buffering, the strategies), so both speak it and neither imports the
//! other for it.
#![forbid(unsafe_code)]

use core::ops::BitOr;

/// Which way data moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The device reads (a transmit buffer).
    ToDevice,
    /// The device writes (a receive buffer).
    FromDevice,
    /// Both.
    Bidirectional,
}

impl Direction {
    /// Whether the device may read the buffer.
    #[inline]
    pub fn device_reads(self) -> bool {
        !matches!(self, Direction::FromDevice)
    }

    /// Whether the device may write the buffer.
    #[inline]
    pub fn device_writes(self) -> bool {
        !matches!(self, Direction::ToDevice)
    }

    /// Whether `op` makes sense for a buffer loaded in this direction.
    #[inline]
    pub fn allows(self, op: SyncOp) -> bool {
        (!op.about_device_writes() || self.device_writes())
            && (!op.about_device_reads() || self.device_reads())
    }
}

/// A set of sync operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyncOp(u8);

impl SyncOp {
    /// The device will read what the CPU wrote.
    pub const PREWRITE: SyncOp = SyncOp(1);
    /// The device will write.
    pub const PREREAD: SyncOp = SyncOp(2);
    /// The device has read.
    pub const POSTWRITE: SyncOp = SyncOp(4);
    /// The device has written; the CPU will read.
    pub const POSTREAD: SyncOp = SyncOp(8);

    /// The union of two sets.
    #[inline]
    pub const fn union(self, other: SyncOp) -> SyncOp {
        SyncOp(self.0 | other.0)
    }

    /// Whether every operation of `other` is in `self`.
    #[inline]
    pub fn contains(self, other: SyncOp) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    #[inline]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The raw bits (PREWRITE 1, PREREAD 2, POSTWRITE 4, POSTREAD 8).
    #[inline]
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether the set names an operation about device writes (PREREAD or POSTREAD).
    #[inline]
    pub fn about_device_writes(self) -> bool {
        self.0 & (Self::PREREAD.0 | Self::POSTREAD.0) != 0
    }

    /// Whether the set names an operation about device reads (PREWRITE or POSTWRITE).
    #[inline]
    pub fn about_device_reads(self) -> bool {
        self.0 & (Self::PREWRITE.0 | Self::POSTWRITE.0) != 0
    }
}

impl BitOr for SyncOp {
    type Output = SyncOp;
    fn bitor(self, rhs: SyncOp) -> SyncOp {
        SyncOp(self.0 | rhs.0)
    }
}
