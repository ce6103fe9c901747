//! A split virtqueue (virtio 1.2, section 2.7) in one page of DMA memory, accessed by copy
//! through the platform (`write_phys` / `read_phys`), never through references: the device
//! writes the used ring while the driver runs.
//!
//! Layout of the ring page for [`MAX_ENTRIES`] = 64 entries: descriptor table at 0 (16 bytes
//! each: 1024), driver ring at 1024 (4 + 2·64 + 2 = 134 bytes), device ring at 2048
//! (4 + 8·64 + 2 = 518 bytes; 4-aligned as required). Descriptors are owned by fixed slots, so
//! the driver never keeps a free list: slot `s` of the request queue uses descriptors `2s` and
//! `2s + 1`.
#![forbid(unsafe_code)]

use crate::addr::PhysAddr;
use crate::error::Result;
use crate::platform::Platform;

use super::transport::QueueLayout;

/// Entries of every queue this driver sets up (fewer if the device offers fewer).
pub const MAX_ENTRIES: u16 = 64;
const DRIVER_RING: u64 = 1024;
const DEVICE_RING: u64 = 2048;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// The device writes this buffer.
pub const F_WRITE: u16 = 2;

/// One split queue's driver-side state.
pub struct SplitQueue {
    ring: PhysAddr,
    size: u16,
    next_avail: u16,
    last_used: u16,
    /// The queue's notification address.
    pub notify: PhysAddr,
}

impl SplitQueue {
    /// A queue of `size` entries (a power of two ≤ [`MAX_ENTRIES`]) in the zeroed page at
    /// `ring`.
    pub fn new(ring: PhysAddr, size: u16) -> Self {
        Self { ring, size, next_avail: 0, last_used: 0, notify: PhysAddr::new(0) }
    }

    /// Where the device must look.
    pub fn layout(&self) -> QueueLayout {
        QueueLayout {
            desc: self.ring,
            driver: PhysAddr::new(self.ring.raw() + DRIVER_RING),
            device: PhysAddr::new(self.ring.raw() + DEVICE_RING),
            size: self.size,
        }
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Writes descriptor `i`: `len` bytes at `addr`, with `flags`, chained to `next`.
    pub fn set_desc<P: Platform>(
        &self,
        p: &P,
        i: u16,
        addr: PhysAddr,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<()> {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.raw().to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        p.write_phys(PhysAddr::new(self.ring.raw() + 16 * u64::from(i)), &d)
    }

    /// Makes the chain headed by descriptor `head` available (the device sees it after the
    /// next notification, or at once if it polls).
    pub fn publish<P: Platform>(&mut self, p: &P, head: u16) -> Result<()> {
        let slot = u64::from(self.next_avail % self.size);
        p.write_phys(PhysAddr::new(self.ring.raw() + DRIVER_RING + 4 + 2 * slot), &head.to_le_bytes())?;
        // The ring entry (and the descriptors and buffers before it) must be visible before
        // the index that hands it over.
        p.dma_wmb();
        self.next_avail = self.next_avail.wrapping_add(1);
        p.write_phys(PhysAddr::new(self.ring.raw() + DRIVER_RING + 2), &self.next_avail.to_le_bytes())
    }

    /// The next used element (head id, bytes written), if the device returned one.
    pub fn pop_used<P: Platform>(&mut self, p: &P) -> Result<Option<(u32, u32)>> {
        let mut idx = [0u8; 2];
        p.read_phys(PhysAddr::new(self.ring.raw() + DEVICE_RING + 2), &mut idx)?;
        if u16::from_le_bytes(idx) == self.last_used {
            return Ok(None);
        }
        // The element (and what the device wrote into the buffers) is read after the index.
        p.dma_rmb();
        let slot = u64::from(self.last_used % self.size);
        let mut e = [0u8; 8];
        p.read_phys(PhysAddr::new(self.ring.raw() + DEVICE_RING + 4 + 8 * slot), &mut e)?;
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some((u32::from_le_bytes([e[0], e[1], e[2], e[3]]), u32::from_le_bytes([e[4], e[5], e[6], e[7]]))))
    }
}
