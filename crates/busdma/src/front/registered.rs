//! Loads of pre-registered user buffers (seed 001): translate from the registration's array,
//! pin nothing, count the mapping in the region's `mapped` for as long as the map is loaded.
//!
//! # Theory
//!
//! 1. **Source.** A [`RegisteredBuffer`] (from [`Registry::load`]) already holds one count of
//!    its region's `mapped`; [`load_registered`] loads it (it is not a [`LoadSource`] on its
//!    own: dropping it would give the count back while the map still held its pages) and
//!    yields the physically contiguous runs its
//!    region's page array gives, without touching any page table and without pinning.
//! 2. **Lifetime.** [`load_registered`] ties the count to the map's load: it takes the count
//!    (`mapped += 1`, refused once the region is released), loads the map, and returns a
//!    [`RegisteredLoad`] that unloads the map *before* giving the count back (`mapped -= 1`),
//!    so the region cannot be released while a device may still reach it. A failed map load
//!    gives the count back at once: nothing leaks.
//! 3. **Why it matters.** While any such load lives, the last unregistration of the region
//!    answers EBUSY and the pages stay pinned: the physical addresses the device was given
//!    stay the user's memory.
//! 4. **Deferred invalidation.** Under a deferred policy the unload returns with the unmap
//!    only queued: the IOTLB may still translate to the pages until the covering flush, while
//!    `mapped` has already dropped. The unload does not wait (a flush per registered I/O is
//!    what the deferred policy exists to avoid); the registry waits instead, before it unpins
//!    a released region, on its unpin barrier (`pin/mod.rs`, theory 7). A [`Tag`] is such a
//!    barrier ([`Strategy::wait_unmapped`]: the IOMMU strategies flush their domain if an
//!    unmap is still queued). So [`load_registered`] refuses a map whose strategy
//!    invalidates lazily when the registry has no barrier ([`NoBarrier`]): the one wiring
//!    that would let freed pages stay reachable is a clear error, not a silent hole.
#![deny(unsafe_code)] // one impl: the private load source of a registered buffer

use super::cache_sync::{SyncOp, SyncStats};
use super::load::{LoadSource, Run};
use super::map::{Direction, DmaMap};
use super::segments::Segment;
use super::strategy::Invalidation;
use super::strategy::Strategy;
use super::tag::Tag;
use crate::addr::UserVa;
use crate::error::Error;
use crate::error::Result;
use crate::pin::{NoBarrier, PinBackend, RegisteredBuffer, Registry, UnpinBarrier};
use crate::platform::Platform;

/// The load source of a registered buffer, private to [`load_registered`]: a
/// [`RegisteredBuffer`] on its own is not a [`LoadSource`], because dropping it gives its
/// `mapped` count back and lets the region be unpinned while a map could still hold its pages.
struct Pinned<'x, 'r, B: PinBackend, U: UnpinBarrier>(&'x RegisteredBuffer<'r, B, U>);

// SAFETY: the runs are pages of a pinned region, translated from its page array. Only
// `load_registered` builds this source, and the `RegisteredLoad` it returns keeps the buffer's
// `mapped` count (so the pages stay pinned, theory 2) until the map is unloaded; the unpin
// barrier covers the unload's invalidation (theory 4). Forgetting the `RegisteredLoad` keeps
// the count for good: the pages stay pinned, never reused.
#[allow(unsafe_code)]
unsafe impl<B: PinBackend, U: UnpinBarrier> LoadSource for Pinned<'_, '_, B, U> {
    fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, p: &P, mut f: F) -> Result<()> {
        for (pa, len) in self.0.segments() {
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
pub struct RegisteredLoad<'a, 'p, 'r, P: Platform, S: Strategy<P>, B: PinBackend, U: UnpinBarrier = NoBarrier>
{
    // Field order is teardown order: the map is unloaded (in `Drop`) before `buf` drops.
    map: &'a mut DmaMap<'p, P, S>,
    buf: RegisteredBuffer<'r, B, U>,
}

/// Loads the registered user buffer `[ua, ua + len)` of `reg` into `map` for a transfer in
/// direction `dir`: no page is pinned, the region's `mapped` goes up by one until the returned
/// load is unloaded or dropped.
///
/// Never sleeps, allocates nothing (the map's arrays were sized at create). Errors: those of
/// [`Registry::load`] ([`crate::Error::NotMapped`] if no region holds the whole buffer,
/// [`crate::Error::BadState`] once the region's `mapped` reached 0) and of [`DmaMap::load`];
/// [`crate::Error::Unsupported`] if the map's strategy invalidates lazily and the registry has
/// no unpin barrier (theory 4). On error `mapped` is as before.
pub fn load_registered<'a, 'p, 'r, P: Platform, S: Strategy<P>, B: PinBackend, U: UnpinBarrier>(
    map: &'a mut DmaMap<'p, P, S>,
    reg: &'r Registry<B, U>,
    ua: UserVa,
    len: u64,
    dir: Direction,
) -> Result<RegisteredLoad<'a, 'p, 'r, P, S, B, U>> {
    if map.tag().strategy().invalidation() == Invalidation::Deferred && reg.barrier().is_none() {
        return Err(Error::Unsupported {
            what: "registered buffer under deferred invalidation without an unpin barrier \
                   (Registry::with_barrier)",
        });
    }
    let buf = reg.load(ua, len)?;
    // On error `buf` drops here, giving its count back.
    map.load(&Pinned(&buf), dir)?;
    // INVARIANT: the map is loaded with `buf`.
    Ok(RegisteredLoad { map, buf })
}

impl<'p, P: Platform, S: Strategy<P>, B: PinBackend, U: UnpinBarrier> RegisteredLoad<'_, 'p, '_, P, S, B, U> {
    /// The bus-address segments of the load.
    pub fn segments(&self) -> &[Segment] {
        self.map.segments()
    }

    /// The loaded map (for `read`, `write` and inspection). Not `&mut`: unloading or
    /// reloading it behind this load's back would break the invariant.
    pub fn map(&self) -> &DmaMap<'p, P, S> {
        self.map
    }

    /// [`DmaMap::sync`] of the loaded map.
    pub fn sync(&mut self, op: SyncOp) -> Result<SyncStats> {
        self.map.sync(op)
    }

    /// [`DmaMap::sync_range`] of the loaded map.
    pub fn sync_range(&mut self, op: SyncOp, offset: u64, len: u64) -> Result<SyncStats> {
        self.map.sync_range(op, offset, len)
    }

    /// The registered buffer.
    pub fn buffer(&self) -> &RegisteredBuffer<'_, B, U> {
        &self.buf
    }

    /// Unloads the map, then releases the `mapped` count. Under deferred invalidation the
    /// unmap is only queued and nothing here waits for it (theory 4).
    ///
    /// Errors: those of [`DmaMap::unload`] (the count is released either way).
    pub fn unload(self) -> Result<()> {
        let r = self.map.unload();
        // `Drop` finds the map unloaded and leaves it; then `buf` drops: `mapped -= 1`.
        drop(self);
        r
    }
}

impl<P: Platform, S: Strategy<P>, B: PinBackend, U: UnpinBarrier> Drop
    for RegisteredLoad<'_, '_, '_, P, S, B, U>
{
    fn drop(&mut self) {
        if self.map.is_loaded() {
            // Unload cannot fail on a loaded map; if it did, the count is still released
            // below (the map's own checks report the misuse).
            let _ = self.map.unload();
        }
    }
}

/// A tag is the unpin barrier of the registries whose buffers are loaded through its maps
/// (theory 4): [`Strategy::wait_unmapped`].
impl<P: Platform, S: Strategy<P>> UnpinBarrier for Tag<'_, P, S> {
    fn wait_unmapped(&self) -> Result<()> {
        self.strategy().wait_unmapped(self.platform())
    }
}
