//! Pool buffers: a slot of a pre-mapped pool taken as a driver's or a stack's own buffer,
//! written in place and loaded without a copy.
//!
//! See the theory statement in [`crate::premapped`] (section 9). Loading one is the front
//! end's [`PoolMap`](crate::front::PoolMap).

use crate::addr::{KernVa, PhysAddr};
use crate::dir::Direction;
use crate::error::{Error, Result};
use crate::front::segments::SegmentBuilder;
use crate::front::strategy::{IommuOps, Strategy};
use crate::platform::Platform;

use super::hybrid::Hybrid;
use super::pool::{Premapped, PremappedPool};

mod sealed {
    pub trait Sealed {}
}

/// A strategy whose tags load a pool's buffers in place (theory 9): [`Premapped`] and
/// [`Hybrid`] over the pool. Sealed: the front end gives the device the slot's bus address on
/// the strength of [`PoolStrategy::pool`]'s answer (the pool whose domain the tag's device
/// translates through), which only busdma's strategies may give.
pub trait PoolStrategy<'a, 'p, P: Platform>: Strategy<P> + sealed::Sealed {
    /// The pool's domain.
    type Dom: IommuOps<P>;

    /// The pool whose slots this strategy's tags give their device.
    fn pool(&self) -> &'a PremappedPool<'p, P, Self::Dom>;

    /// Loads slot `slot`'s bytes `[at, at + len)`, a pool buffer's, in place into `st`: one
    /// segment, no copy; the unload keeps the slot (its owner gives it back). On error `st`
    /// is as before.
    #[doc(hidden)]
    fn load_owned(
        &self,
        st: &mut Self::MapState,
        slot: u32,
        at: u64,
        len: u64,
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()>;
}

impl<P: Platform, D: IommuOps<P>> sealed::Sealed for Premapped<'_, '_, P, D> {}
impl<'a, 'p, P: Platform, D: IommuOps<P>> PoolStrategy<'a, 'p, P> for Premapped<'a, 'p, P, D> {
    type Dom = D;

    fn pool(&self) -> &'a PremappedPool<'p, P, D> {
        self.0
    }

    #[inline]
    fn load_owned(
        &self,
        st: &mut Self::MapState,
        slot: u32,
        at: u64,
        len: u64,
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        self.0.load_owned(st, slot, at, len, dir, segs)
    }
}

impl<P: Platform, D: IommuOps<P>, S> sealed::Sealed for Hybrid<'_, '_, P, D, S> {}
impl<'a, 'p, P: Platform, D: IommuOps<P>, S: Strategy<P>> PoolStrategy<'a, 'p, P>
    for Hybrid<'a, 'p, P, D, S>
{
    type Dom = D;

    fn pool(&self) -> &'a PremappedPool<'p, P, D> {
        self.pool_ref()
    }

    #[inline]
    fn load_owned(
        &self,
        st: &mut Self::MapState,
        slot: u32,
        at: u64,
        len: u64,
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        self.load_owned_slot(st, slot, at, len, dir, segs)
    }
}

/// A slot of a [`PremappedPool`] owned as a buffer (theory 9): its bytes are written and read
/// by copy ([`PoolBuf::write`], [`PoolBuf::read`]), and a
/// [`PoolMap`](crate::front::PoolMap) of a tag over the same pool loads it in place: its one
/// segment is the slot's bus address, no byte is copied and no map request is made. Dropping
/// it gives the slot back to the pool; forgetting it leaks the slot (still mapped, still the
/// pool's: nobody else ever gets its pages).
///
/// # Invariants
///
/// Slot `slot` of `pool` is on no free list and held by no map but through this value;
/// `0 < len <= cap`, `at + cap <= slot bytes`.
pub struct PoolBuf<'a, 'p, P: Platform, D: IommuOps<P>> {
    pool: &'a PremappedPool<'p, P, D>,
    slot: u32,
    /// Slot byte of buffer byte 0.
    at: u64,
    cap: u64,
    len: u64,
}

impl<'p, P: Platform, D: IommuOps<P>> PremappedPool<'p, P, D> {
    /// Takes a free slot as a buffer of `len` bytes (theory 9), from the calling CPU's list
    /// first. Its bytes are whatever the slot held: zeros, or bytes the pool's device could
    /// already reach (a previous load's); the device can reach them for as long as the pool
    /// lives, so nothing may be written there that the device must not see.
    ///
    /// Errors: [`Error::ZeroSize`]; [`Error::LimitExceeded`] (more than a slot);
    /// [`Error::Exhausted`] (no free slot; counted as a refused load).
    pub fn alloc_buf(&self, len: u64) -> Result<PoolBuf<'_, 'p, P, D>> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if len > self.slot_bytes() {
            return Err(Error::LimitExceeded {
                what: "bytes per pre-mapped slot",
                requested: len,
                limit: self.slot_bytes(),
            });
        }
        let g = self.platform().pin_cpu();
        let Some(slot) = self.take(&g, true) else {
            return Err(Error::Exhausted { size: self.slot_bytes(), limit: self.window().end().raw() });
        };
        drop(g);
        let at = self.place_any(slot, len);
        // INVARIANT: the slot just left the free lists; `at + len <= slot bytes` (the place
        // is at most the slack).
        Ok(PoolBuf { pool: self, slot, at, cap: len, len })
    }
}

impl<'a, 'p, P: Platform, D: IommuOps<P>> PoolBuf<'a, 'p, P, D> {
    /// The pool the buffer belongs to.
    pub fn pool(&self) -> &'a PremappedPool<'p, P, D> {
        self.pool
    }

    /// The slot's index in the pool.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Bytes a load takes (at most [`PoolBuf::capacity`]).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false (a buffer is never empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes asked for at [`PremappedPool::alloc_buf`].
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Sets the bytes a load takes: a packet shorter than the buffer.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::OutOfRange`] (beyond the capacity).
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if len > self.cap {
            return Err(Error::OutOfRange { addr: len, limit: self.cap });
        }
        self.len = len;
        Ok(())
    }

    /// The physical address of buffer byte 0.
    pub fn pa(&self) -> PhysAddr {
        PhysAddr::new(self.pool.slot_phys(self.slot).raw() + self.at)
    }

    /// The bus address of buffer byte 0, in the pool's domain.
    pub(crate) fn bus(&self) -> u64 {
        self.pool.slot_iova(self.slot) + self.at
    }

    /// Slot byte of buffer byte 0.
    pub(crate) fn at(&self) -> u64 {
        self.at
    }

    /// The kernel address of buffer byte 0 if the slot is in the direct map.
    fn kva(&self) -> Option<KernVa> {
        self.pool.slot_kva(self.slot).map(|k| KernVa::new(k.raw() + self.at))
    }

    /// Copies `data` into the buffer at `offset` (capacity bytes are writable). `&mut`: only
    /// the owner writes, and a loaded buffer is the map's ([`PoolMap`](crate::front::PoolMap)
    /// lends `&` only).
    ///
    /// Errors: [`Error::OutOfRange`] beyond the capacity; the platform's copy errors.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        crate::addr::checked_end(offset, data.len() as u64, self.cap)?;
        if let Some(k) = self.kva() {
            // SAFETY: `k` maps the slot's bytes `[at, at + cap)` through the direct map
            // (checked page by page at the pool's creation), the pool's own RAM, mapped for
            // the pool's life; `offset + data.len() <= cap` (checked above); the slot is this
            // buffer's alone (type invariant) and no reference to it exists (reached by copy
            // only: the device may write it at any time, theory 5).
            unsafe {
                core::ptr::copy_nonoverlapping(data.as_ptr(), (k.raw() + offset) as *mut u8, data.len())
            };
            return Ok(());
        }
        self.pool.platform().write_phys(PhysAddr::new(self.pa().raw() + offset), data)
    }

    /// Copies `buf.len()` bytes at `offset` of the buffer into `buf`.
    ///
    /// Errors: [`Error::OutOfRange`] beyond the capacity; the platform's copy errors.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        crate::addr::checked_end(offset, buf.len() as u64, self.cap)?;
        if let Some(k) = self.kva() {
            // SAFETY: as in `write`: `k + offset` maps `buf.len()` bytes of the slot within
            // the capacity, the pool's RAM for the pool's life, reached by copy only; `buf`
            // is the caller's memory, not the slot.
            unsafe {
                core::ptr::copy_nonoverlapping((k.raw() + offset) as *const u8, buf.as_mut_ptr(), buf.len())
            };
            return Ok(());
        }
        self.pool.platform().read_phys(PhysAddr::new(self.pa().raw() + offset), buf)
    }
}

impl<P: Platform, D: IommuOps<P>> Drop for PoolBuf<'_, '_, P, D> {
    fn drop(&mut self) {
        // The slot goes back to its home list: a map that held it has unloaded it (a
        // `PoolMap` drops its map before its buffer), so no load of this buffer reaches it.
        self.pool.give(self.slot);
    }
}

impl<P: Platform, D: IommuOps<P>> core::fmt::Debug for PoolBuf<'_, '_, P, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PoolBuf")
            .field("slot", &self.slot)
            .field("at", &self.at)
            .field("len", &self.len)
            .field("cap", &self.cap)
            .finish()
    }
}
