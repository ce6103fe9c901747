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
//! 5. **Refusals.** Zero size, misaligned start or size, a range that wraps, memory the
//!    backend cannot pin (not mapped), a range overlapping a different registration, the
//!    memlock limit: each is a clear [`Error`](crate::Error) and leaves nothing pinned or charged.
//! 6. **Teardown.** Dropping the registry (the address space going away) releases every pin
//!    of every region, whatever the counters say, and reports regions still DMA-mapped to the
//!    backend ([`PinBackend::report_still_mapped`]) and in [`CleanupReport`]: never a silent
//!    leak.
//!
//! # Execution context
//!
//! Read sections and everything in them ([`Registry::read`], lookups, translations,
//! [`Region::mapped_inc`], [`Region::mapped_dec`], [`Registry::load`]) never sleep, never
//! allocate and take no lock: they may run with preemption or interrupts disabled.
//! [`Registry::register`] and [`Registry::unregister`] allocate, call the backend (which may
//! sleep: `mlock`) and spin on the writer lock: process context only.

mod epoch;
mod region;
mod registry;
mod tree;

pub use region::Region;
pub use registry::{
    BATCH_GROUP, CleanupReport, Container, PinStats, ReadGuard, RegionInfo, RegisteredBuffer, Registry,
    Segments,
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
