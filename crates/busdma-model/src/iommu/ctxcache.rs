//! A lock-free view of the context table for the translation path.
//!
//! # Theory
//!
//! 1. **Why.** Every page a device translates needs its device's context. The context table
//!    is a `HashMap` behind a read-write lock: a read costs two locked read-modify-writes and
//!    a SipHash, more than the IOTLB lookup it precedes. Devices attach rarely and translate
//!    constantly, so each device also gets a slot here, indexed by its id modulo [`SLOTS`]
//!    (a device whose slot is taken by another is simply not cached: its translations read
//!    the table, as before).
//! 2. **Writers** (attach, detach) hold the table's write lock, so a slot has one writer at a
//!    time. A write is a seqlock update: the sequence becomes odd, the fields change, the
//!    sequence becomes even again. Attach fills the slot after inserting into the table;
//!    detach empties it before removing from the table, so the slot never names a context
//!    the table does not hold.
//! 3. **Readers** read the sequence (Acquire), the fields, an Acquire fence, and the sequence
//!    again; equal and even means the fields are one writer's complete update. Every field is
//!    an atomic, so a torn read is discarded, never undefined.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering, fence};

use super::{Context, TableFormat};
use crate::dma::DeviceId;
use busdma::PhysAddr;

/// Slots: 8. The lab attaches one to three devices per IOMMU; 8 keeps a collision unlikely
/// for a handful of devices while the array stays within two cache lines per four slots.
pub(crate) const SLOTS: usize = 8;

/// No device: ids are 32-bit, so no real device matches.
const EMPTY: u64 = u64::MAX;

#[derive(Debug)]
struct Slot {
    seq: AtomicU64,
    device: AtomicU64,
    root: AtomicU64,
    /// domain (bits 0-15), input bits (16-23), format (24), privileged (25).
    meta: AtomicU64,
}

impl Slot {
    fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            device: AtomicU64::new(EMPTY),
            root: AtomicU64::new(0),
            meta: AtomicU64::new(0),
        }
    }
}

/// The slots (see the module documentation).
#[derive(Debug)]
pub(crate) struct ContextCache {
    slots: [Slot; SLOTS],
}

fn pack(c: &Context) -> u64 {
    let format = match c.format {
        TableFormat::VtdSecondLevel => 0u64,
        TableFormat::ArmLpaeStage1 => 1,
        TableFormat::ArmLpaeStage2 => 2,
    };
    u64::from(c.domain)
        | (u64::from(c.input_bits & 0xff) << 16)
        | (format << 24)
        | (u64::from(c.privileged) << 26)
}

fn unpack(root: u64, meta: u64) -> Context {
    let format = match meta >> 24 & 0b11 {
        0 => TableFormat::VtdSecondLevel,
        1 => TableFormat::ArmLpaeStage1,
        _ => TableFormat::ArmLpaeStage2,
    };
    Context {
        domain: meta as u16,
        root: PhysAddr::new(root),
        format,
        input_bits: (meta >> 16 & 0xff) as u32,
        privileged: meta >> 26 & 1 != 0,
    }
}

impl ContextCache {
    pub(crate) fn new() -> Self {
        Self { slots: std::array::from_fn(|_| Slot::new()) }
    }

    fn slot(&self, device: DeviceId) -> &Slot {
        &self.slots[device as usize % SLOTS]
    }

    /// Writer side (rule 2): the caller holds the table's write lock.
    fn write(&self, s: &Slot, device: u64, root: u64, meta: u64) {
        let seq = s.seq.load(Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        s.device.store(device, Ordering::Relaxed);
        s.root.store(root, Ordering::Relaxed);
        s.meta.store(meta, Ordering::Relaxed);
        s.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// `device` was attached to `ctx` (the caller holds the table's write lock): cache it if
    /// its slot is free.
    pub(crate) fn attached(&self, device: DeviceId, ctx: &Context) {
        let s = self.slot(device);
        if s.device.load(Ordering::Relaxed) == EMPTY {
            self.write(s, u64::from(device), ctx.root.raw(), pack(ctx));
        }
    }

    /// `device` is being detached (the caller holds the table's write lock).
    pub(crate) fn detached(&self, device: DeviceId) {
        let s = self.slot(device);
        if s.device.load(Ordering::Relaxed) == u64::from(device) {
            self.write(s, EMPTY, 0, 0);
        }
    }

    /// The cached context of `device`, or `None` if it is not cached (read the table).
    #[inline]
    pub(crate) fn get(&self, device: DeviceId) -> Option<Context> {
        let s = self.slot(device);
        loop {
            let seq = s.seq.load(Ordering::Acquire);
            if seq & 1 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let (d, root, meta) = (
                s.device.load(Ordering::Relaxed),
                s.root.load(Ordering::Relaxed),
                s.meta.load(Ordering::Relaxed),
            );
            fence(Ordering::Acquire);
            if s.seq.load(Ordering::Relaxed) != seq {
                continue;
            }
            return (d == u64::from(device)).then(|| unpack(root, meta));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_context_reads_back_whole_and_detach_forgets_it() {
        let c = ContextCache::new();
        let ctx = Context {
            privileged: true,
            ..Context::new(0xbeef, PhysAddr::new(0x12_3000), TableFormat::ArmLpaeStage1, 39)
        };
        c.attached(3, &ctx);
        assert_eq!(c.get(3), Some(ctx));
        assert_eq!(c.get(3 + SLOTS as u32), None, "same slot, another device");
        let other = Context::new(1, PhysAddr::new(0x5000), TableFormat::VtdSecondLevel, 48);
        c.attached(3 + SLOTS as u32, &other);
        assert_eq!(c.get(3 + SLOTS as u32), None, "a taken slot is not overwritten");
        c.detached(3 + SLOTS as u32);
        assert_eq!(c.get(3), Some(ctx), "detaching an uncached device leaves the slot");
        c.detached(3);
        assert_eq!(c.get(3), None);
    }
}
