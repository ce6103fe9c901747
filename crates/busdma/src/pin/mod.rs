//! Pre-registered user memory: pin once, translate user → physical in O(1) (seed 001).
//!
//! # Theory
//!
//! 1. **The problem.** A hypervisor passes a device through to a guest (VFIO). Pinning and
//!    unpinning guest pages on every DMA map and unmap is slow, and in real mode (MMU off) the
//!    kernel cannot walk the process page tables at all. So user space *pre-registers* whole
//!    regions of its memory: every page is pinned once and its host physical address recorded
//!    in an array; later DMA mappings translate user address → host physical address from that
//!    array ([`ReadGuard::ua_to_pa`]) and pin nothing.
//! 2. **Objects.** A [`Registry`] belongs to one address space (Linux keeps it in the
//!    `mm_context`); it owns the [`Region`]s registered in that space and the pins behind
//!    them. A [`Container`] is one user of the registry (a VFIO container): it may register a
//!    given range once; several containers registering the same range share one region whose
//!    `used` counter counts them. Pinning itself is a [`PinBackend`]: the machine model's user
//!    address spaces, or real Linux memory (`mlock` + `/proc/self/pagemap`), in
//!    `busdma-model`.
//! 3. **Counters** (`region.rs`, section 3 and 4): `mapped` starts at 1, +1 per DMA mapping,
//!    -1 per unmapping, and once 0 accepts no mapping; `used` counts registrations. The last
//!    unregistration while DMA-mapped fails with EBUSY ([`Error::Busy`](crate::Error::Busy)) and leaves `used` at 1.
//! 4. **Lookup without locks** (`tree.rs`, `epoch.rs`): regions are indexed by a two-level
//!    copy-on-write sorted array published through one atomic pointer; readers enter an epoch
//!    read section (no lock, no allocation, never blocked by a writer), binary-search it
//!    (O(log n)) and index the region's array (O(1)). Writers serialise on a spin lock, build
//!    the next version beside the current one, publish it, and retire what it replaced; a
//!    retired object is freed, and a retired region's pages unpinned, only after every reader
//!    that might see it has left (two epoch advances).
//!    Translation does not even search: beside the interval index the registry keeps a direct
//!    page index (`pageidx.rs`), a four-level radix table from user page number to the page's
//!    physical address and pinned page shift, updated in place by writers (one store per
//!    page, cleared before the region is retired), so [`ReadGuard::ua_to_pa`] is one walk of
//!    four dependent loads whose leaf slots take 8 bytes per registered page (O(1), and
//!    cache-resident where the interval index and the regions' page arrays are not). Addresses
//!    it does not answer for fall back to the interval index.
//! 5. **Refusals.** Zero size, misaligned start or size, a range that wraps, memory the
//!    backend cannot pin (not mapped), a range overlapping a different registration, the
//!    memlock limit: each is a clear [`Error`](crate::Error) and leaves nothing pinned or charged.
//! 6. **Teardown.** Dropping the registry (the address space going away) releases every pin
//!    of every region, whatever the counters say, and reports regions still DMA-mapped to the
//!    backend ([`PinBackend::report_still_mapped`]) and in [`CleanupReport`]: never a silent
//!    leak.
//! 7. **The unpin barrier.** `mapped` drops when an unmap *returns*; under deferred IOTLB
//!    invalidation that is before the IOTLB forgets the translation (the unmap is only
//!    queued until the covering flush). If the pages were then unpinned and reused, a device
//!    could still reach them through the stale entry (Thunderclap's deferred window, attack
//!    class 6). Flushing at every registered unload would make the per-I/O hot path pay a
//!    whole invalidation; instead the wait sits where the pages are given back, the rare slow
//!    path: before it unpins any region, the registry calls its [`UnpinBarrier`] once (for
//!    every region released together), and the barrier returns only once every unmap that
//!    returned before the call is complete in every IOTLB. A region's last unmap returned
//!    before its `mapped` dropped, hence before its last unregistration, hence before the
//!    call: its pages leave the device's reach before they leave the pin. The IOMMU domains
//!    ([`crate::iommu::Domain`]) and the front end's tags implement it (flushing only when
//!    an unmap is still queued); [`NoBarrier`] serves registries whose DMA goes through
//!    strict invalidation or no IOMMU, and the front end refuses a deferred-invalidation load
//!    of a registry that has it (`front::registered`, theory 4).
//! 8. **A barrier that fails.** If the invalidation cannot be proven complete (the IOMMU
//!    reported an error or timed out: [`crate::Error::InvalidationFailed`]), the barrier says
//!    so instead of spinning or panicking, and the registry *holds the pages back*: the
//!    regions stay unlinked (no new load finds them) but pinned, and go back on the garbage
//!    list, so a later writer or [`Registry::synchronize`] retries the barrier and unpins
//!    them once it succeeds. At teardown a failing barrier leaks the pins for good
//!    ([`CleanupReport::pins_held`]): memory a device may still reach is never handed back.
//!
//! # Execution context
//!
//! Read sections and everything in them ([`Registry::read`], lookups, translations,
//! [`Region::mapped_inc`], [`Region::mapped_dec`], [`Registry::load`]) never sleep, never
//! allocate and take no lock: they may run with preemption or interrupts disabled.
//! [`Registry::register`] and [`Registry::unregister`] allocate, call the backend (which may
//! sleep: `mlock`) and spin on the writer lock: process context only.

mod epoch;
mod pageidx;
mod region;
mod registry;
mod tree;

pub use region::Region;
pub use registry::{
    BATCH_GROUP, CleanupReport, Container, IOV_MAX, PinStats, ReadGuard, RegionInfo, RegisteredBuffer,
    RegisteredIov, Registry, Segments,
};

use crate::addr::{PAGE_SHIFT, PhysAddr, UserVa};
use crate::error::Result;

/// Pins user pages and tells their physical addresses.
///
/// Implementations: `busdma_model::uspace::UserSpace` (the machine model's user address
/// spaces) and `busdma_model::linux_pin::LinuxPin` (real pages of this process).
pub trait PinBackend {
    /// Pins the `out.len()` pages starting at the page-aligned `ua` and writes the physical
    /// address of each page into `out`. All or nothing: on error no page stays pinned.
    ///
    /// Errors: [`crate::Error::NotMapped`] (a page is not mapped in the address space),
    /// [`crate::Error::PermissionDenied`] (physical addresses cannot be read), others as the
    /// backend documents.
    fn pin(&self, ua: UserVa, out: &mut [PhysAddr]) -> Result<()>;

    /// Releases pins taken by one successful [`PinBackend::pin`] of the same pages.
    fn unpin(&self, ua: UserVa, hpas: &[PhysAddr]);

    /// log2 of the page size the backend pins: 4 KiB ([`PAGE_SHIFT`]), the size the array
    /// indexes by.
    fn page_shift(&self) -> u32 {
        PAGE_SHIFT
    }

    /// Told, at teardown, of each region still DMA-mapped (`mappings` live mappings) whose
    /// pins are released anyway. The default does nothing; backends count them.
    fn report_still_mapped(&self, ua: UserVa, size: u64, mappings: u64) {
        let _ = (ua, size, mappings);
    }
}

impl<T: PinBackend + ?Sized> PinBackend for &T {
    fn pin(&self, ua: UserVa, out: &mut [PhysAddr]) -> Result<()> {
        (**self).pin(ua, out)
    }
    fn unpin(&self, ua: UserVa, hpas: &[PhysAddr]) {
        (**self).unpin(ua, hpas)
    }
    fn page_shift(&self) -> u32 {
        (**self).page_shift()
    }
    fn report_still_mapped(&self, ua: UserVa, size: u64, mappings: u64) {
        (**self).report_still_mapped(ua, size, mappings)
    }
}

/// What a [`Registry`] waits for before it unpins released regions (theory 7): the IOTLB
/// invalidation of every DMA unmap already returned.
///
/// # Execution context
///
/// Called from [`Registry::unregister`], [`Registry::register`], [`Registry::synchronize`]
/// and teardown, outside the writer lock and outside any read section: process context.
/// It may spin while an invalidation completes; it must not call back into the registry.
pub trait UnpinBarrier {
    /// Returns `Ok` once no device can reach, through a translation cached before the call,
    /// memory whose DMA unmap returned before the call.
    ///
    /// Errors: the invalidation could not be proven complete
    /// ([`crate::Error::InvalidationFailed`]); the registry then keeps the pages pinned
    /// (theory 8).
    fn wait_unmapped(&self) -> Result<()>;

    /// True only for [`NoBarrier`], which waits for nothing (the front end then refuses
    /// registered loads under deferred invalidation).
    fn is_none(&self) -> bool {
        false
    }
}

/// The barrier of a registry whose DMA goes only through strict invalidation or no IOMMU:
/// an unmap there is complete when it returns, so there is nothing to wait for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoBarrier;

impl UnpinBarrier for NoBarrier {
    #[inline]
    fn wait_unmapped(&self) -> Result<()> {
        Ok(())
    }

    fn is_none(&self) -> bool {
        true
    }
}

impl<T: UnpinBarrier + ?Sized> UnpinBarrier for &T {
    fn wait_unmapped(&self) -> Result<()> {
        (**self).wait_unmapped()
    }
    fn is_none(&self) -> bool {
        (**self).is_none()
    }
}

/// Every barrier of the slice (several domains using one registry).
impl<T: UnpinBarrier> UnpinBarrier for [T] {
    fn wait_unmapped(&self) -> Result<()> {
        self.iter().try_for_each(UnpinBarrier::wait_unmapped)
    }
    fn is_none(&self) -> bool {
        self.iter().all(UnpinBarrier::is_none)
    }
}

/// Both barriers (two domains using one registry).
impl<A: UnpinBarrier, B: UnpinBarrier> UnpinBarrier for (A, B) {
    fn wait_unmapped(&self) -> Result<()> {
        self.0.wait_unmapped()?;
        self.1.wait_unmapped()
    }
    fn is_none(&self) -> bool {
        self.0.is_none() && self.1.is_none()
    }
}
