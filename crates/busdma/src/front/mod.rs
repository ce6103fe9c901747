//! The bus_dma front end: what a driver author touches.
//!
//! # Theory
//!
//! 1. **Objects** (FreeBSD/OpenBSD bus_dma, seed 002): a [`tag::Tag`] states a device's
//!    constraints and carries the strategy that serves them; a [`map::DmaMap`] holds one load at
//!    a time; a load source ([`load::LoadSource`]) is anything that reduces to physical runs
//!    `(PA, len, kind)`; a load yields [`segments::Segment`]s of bus addresses that honour
//!    every constraint of the tag ([`segments`]); [`cache_sync`] makes the CPU's and the
//!    device's views agree; [`coherent`] allocates memory meeting a tag, [`pool`] carves small
//!    blocks from it, and [`view`] reads and writes it as typed plain data and atomic status
//!    words. Owned loads ([`owned`]) take busdma's memory, kernel-heap pages ([`heap`]),
//!    packets and block requests ([`chain`]); a two-step window ([`window`]) keeps an IOVA
//!    range and links owned buffers into it, one invalidation per batch; a pool map
//!    ([`pooled`]) loads a pre-mapped pool's buffers in place, no copy and no map request.
//! 2. **Layers.** Front end (this module) → strategy ([`strategy`]: direct, the IOMMU
//!    strategies, identity; bounce buffering at the [`strategy::bounce_hook`]) → mechanisms
//!    (IOVA allocator, page tables, invalidation) → the platform seam. The front end itself
//!    does no mapping: it collects runs, asks the strategy to place them, and checks the result.
//! 3. **The hot path** (`load`, `sync`, `unload`) is monomorphic over the strategy and never
//!    allocates: every array a load needs is sized at map create from the tag (the identity
//!    strategy's reference table included).
//! 4. **Failure leaves nothing behind.** Every load either succeeds or leaves the map exactly
//!    as before, with every IOVA, table entry and reference it took released.
//! 5. **Misuse is refused** (a load into a loaded map, a sync or unload of an unloaded map, a
//!    wrong-direction sync, a map used through another tag, a CPU read while the device may be
//!    writing) with an error; with the `dma-debug` feature it is also reported with every
//!    argument (`debug`, feature `dma-debug`). The typed API ([`typed`]) makes direction and ownership compile-time
//!    properties.
//! 6. **Waiting** ([`defer`]): on a tag that may wait, a load short of resources is queued in
//!    arrival order and completed by callback when an unload or destroy frees them; a no-wait
//!    load fails at once.
//! 7. **Two-step mapping** ([`window`]): an IOVA window reserved once per device ring, owned
//!    buffers linked and unlinked at fixed offsets, one IOTLB invalidation per batch commit.
//!
//! ## Example
//!
//! ```
//! use busdma::front::{Direct, Direction, KernelBuf, SyncOp, Tag, TagSpec};
//! # fn demo<P: busdma::Platform>(platform: &P, kva: busdma::KernVa) -> busdma::Result<()> {
//! let tag = Tag::new_root(platform, Direct, TagSpec::new(64 * 1024, 16))?;
//! let mut map = tag.create_map()?;
//! // SAFETY: `kva` is 1500 bytes of the direct map that this driver owns until the unload.
//! let buf = unsafe { KernelBuf::new(kva, 1500) };
//! let segs = map.load(&buf, Direction::ToDevice)?;
//! assert!(!segs.is_empty());
//! map.sync(SyncOp::PREWRITE)?;
//! // ... the device reads ...
//! map.sync(SyncOp::POSTWRITE)?;
//! map.unload()?; // or just drop the map
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]

pub mod cache_sync;
pub mod chain;
pub mod coherent;
#[cfg(feature = "dma-debug")]
pub mod debug;
pub mod defer;
pub mod heap;
pub mod load;
pub mod map;
pub mod owned;
pub mod pool;
pub mod pooled;
pub mod quarantine;
pub mod registered;
pub mod segments;
pub mod spec;
pub mod strategy;
pub mod tag;
pub mod typed;
pub mod view;
pub mod window;

pub use cache_sync::{SyncOp, SyncStats};
pub use chain::FragChain;
pub use coherent::{Coherent, DmaMemory};
pub use defer::{DeferStats, Deferrable, DeferredCallback, DeferredMap, PendingLoad};
pub use heap::{HeapBuffer, HeapPage};
pub use load::{KernelBuf, LoadSource, MemKind, PageList, RawSegment, RawSegments, Run, SgEntry, SgList};
pub use map::{Direction, DmaMap};
pub use owned::{DeviceRegion, DmaBuffer, OwnedMap, Part, RegionKind, RegionSlice};
pub use pool::{DmaBlock, DmaPool, PoolStats};
pub use pooled::PoolMap;
pub use quarantine::QuarantineStats;
pub use registered::{RegisteredLoad, load_registered};
pub use segments::{Constraints, Segment};
pub use strategy::{
    Direct, Identity, Invalidation, IommuOps, IommuPerMap, IommuPerSegment, IommuReserved, Strategy,
    WindowSource,
};
pub use tag::{Exclusion, Tag, TagFlags, TagSpec};
pub use view::{DmaAtomicU32, DmaAtomicU64, DmaView};
pub use window::{DmaWindow, LinkError, Linked, WindowStats};
