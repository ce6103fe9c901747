//! Loads of pre-registered user buffers (seed 001): translate from the registration's array,
//! pin nothing, count the mapping in the region's `mapped` for as long as the map is loaded.
//!
//! # Theory
//!
//! 1. **Source.** A [`RegisteredBuffer`] (from [`Registry::load`]) already holds one count of
//!    its region's `mapped`; as a [`LoadSource`] it yields the physically contiguous runs its
//!    region's page array gives, without touching any page table and without pinning.
//! 2. **Lifetime.** [`load_registered`] ties the count to the map's load: it takes the count
//!    (`mapped += 1`, refused once the region is released), loads the map, and returns a
//!    [`RegisteredLoad`] that unloads the map *before* giving the count back (`mapped -= 1`),
//!    so the region cannot be released while a device may still reach it. A failed map load
//!    gives the count back at once: nothing leaks.
//! 3. **Why it matters.** While any such load lives, the last unregistration of the region
//!    answers EBUSY and the pages stay pinned: the physical addresses the device was given
//!    stay the user's memory.
#![forbid(unsafe_code)]

use super::cache_sync::{SyncOp, SyncStats};
use super::load::{LoadSource, Run};
use super::map::{Direction, DmaMap};
use super::segments::Segment;
use super::strategy::Strategy;
use crate::addr::UserVa;
use crate::error::Result;
use crate::pin::{PinBackend, RegisteredBuffer, Registry};
use crate::platform::Platform;

impl<B: PinBackend> LoadSource for RegisteredBuffer<'_, B> {
    fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, p: &P, mut f: F) -> Result<()> {
        for (pa, len) in self.segments() {
            f(Run::page(p, pa, len))?;
        }
        Ok(())
    }
}

/// A map loaded with a registered user buffer; unloads, then releases the buffer's `mapped`
/// count, when dropped or [`RegisteredLoad::unload`]ed.
///
/// # Invariants
///
/// `map` is loaded with `buf` for the value's whole life (until `unload`).
pub struct RegisteredLoad<'a, 't, 'p, 'r, P: Platform, S: Strategy<P>, B: PinBackend> {
    // Field order is teardown order: the map is unloaded (in `Drop`) before `buf` drops.
    map: &'a mut DmaMap<'t, 'p, P, S>,
    buf: RegisteredBuffer<'r, B>,
}

/// Loads the registered user buffer `[ua, ua + len)` of `reg` into `map` for a transfer in
/// direction `dir`: no page is pinned, the region's `mapped` goes up by one until the returned
/// load is unloaded or dropped.
///
/// Never sleeps, allocates nothing (the map's arrays were sized at create). Errors: those of
/// [`Registry::load`] ([`crate::Error::NotMapped`] if no region holds the whole buffer,
/// [`crate::Error::BadState`] once the region's `mapped` reached 0) and of [`DmaMap::load`];
/// on error `mapped` is as before.
pub fn load_registered<'a, 't, 'p, 'r, P: Platform, S: Strategy<P>, B: PinBackend>(
    map: &'a mut DmaMap<'t, 'p, P, S>,
    reg: &'r Registry<B>,
    ua: UserVa,
    len: u64,
    dir: Direction,
) -> Result<RegisteredLoad<'a, 't, 'p, 'r, P, S, B>> {
    let buf = reg.load(ua, len)?;
    // On error `buf` drops here, giving its count back.
    map.load(&buf, dir)?;
    // INVARIANT: the map is loaded with `buf`.
    Ok(RegisteredLoad { map, buf })
}

impl<'t, 'p, P: Platform, S: Strategy<P>, B: PinBackend> RegisteredLoad<'_, 't, 'p, '_, P, S, B> {
    /// The bus-address segments of the load.
    pub fn segments(&self) -> &[Segment] {
        self.map.segments()
    }

    /// The loaded map (for `read`, `write` and inspection). Not `&mut`: unloading or
    /// reloading it behind this load's back would break the invariant.
    pub fn map(&self) -> &DmaMap<'t, 'p, P, S> {
        self.map
    }

    /// [`DmaMap::sync`] of the loaded map.
    pub fn sync(&mut self, op: SyncOp) -> Result<SyncStats> {
        self.map.sync(op)
    }

    /// The registered buffer.
    pub fn buffer(&self) -> &RegisteredBuffer<'_, B> {
        &self.buf
    }

    /// Unloads the map, then releases the `mapped` count.
    ///
    /// Errors: those of [`DmaMap::unload`] (the count is released either way).
    pub fn unload(self) -> Result<()> {
        let r = self.map.unload();
        // `Drop` finds the map unloaded and leaves it; then `buf` drops: `mapped -= 1`.
        drop(self);
        r
    }
}

impl<P: Platform, S: Strategy<P>, B: PinBackend> Drop for RegisteredLoad<'_, '_, '_, '_, P, S, B> {
    fn drop(&mut self) {
        if self.map.is_loaded() {
            // Unload cannot fail on a loaded map; if it did, the count is still released
            // below (the map's own checks report the misuse).
            let _ = self.map.unload();
        }
    }
}
