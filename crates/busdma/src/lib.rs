//! # busdma: DMA mapping for Rust kernels and hypervisors
//!
//! A driver says "this buffer, this device, this direction"; busdma returns bus addresses the
//! device may use, keeps the device away from everything else, and makes the CPU's and the
//! device's views of memory agree.
//!
//! **Writing a driver?** Read [`dma`]: the driver's API in one module (device, tag, maps,
//! coherent memory, sync), with a ten-line start. **Integrating busdma into a kernel?** The
//! seam is [`Platform`]; the mechanisms are under their own modules. **The soundness rule**
//! and its proof: [`soundness`].
//!
//! ## Theory, in brief (the whole statement is in the repository's `DESIGN.md`)
//!
//! 1. **Address spaces are types.** [`PhysAddr`] (host physical), [`Iova`] (what a device
//!    emits), [`KernVa`] (kernel virtual) and [`UserVa`] (user virtual) never mix without an
//!    explicit conversion; ranges over them are half-open ([`AddrRange`]) and built only through
//!    checked arithmetic.
//! 2. **One seam to the hardware.** Every hardware effect (memory, table pages, CPUs and
//!    preemption, caches, barriers, MMIO, temporary mappings) goes through [`Platform`]. The
//!    machine model (`busdma-model`) and a bare-metal kernel are two implementations of it;
//!    nothing above the seam knows which.
//! 3. **Errors carry data and nothing panics in a map path.** [`Error`] is small and `Copy`,
//!    and converts to an errno for kernels that want one.
//!
//! ## Execution context
//!
//! Each function documents whether it may sleep and whether it may run with preemption
//! disabled. Nothing in this crate sleeps unless its documentation says so.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks, missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod addr;
#[cfg(feature = "alloc")]
pub mod bounce;
#[cfg(feature = "alloc")]
pub mod device;
pub mod dir;
#[cfg(feature = "alloc")]
pub mod dma;
#[cfg(feature = "dma-api")]
pub mod dmaop;
pub mod error;
#[cfg(feature = "alloc")]
pub mod front;
pub mod iommu;
#[cfg(feature = "alloc")]
pub mod iova;
#[cfg(feature = "alloc")]
pub mod pgtable;
#[cfg(feature = "alloc")]
pub mod pin;
pub mod platform;
#[cfg(feature = "alloc")]
pub mod premapped;
#[cfg(feature = "alloc")]
pub mod quickmap;
#[cfg(feature = "smmuv3")]
pub mod smmuv3;
pub mod soundness;
pub mod sync;
#[cfg(feature = "virtio")]
pub mod virtio;
#[cfg(feature = "virtio-iommu")]
pub mod virtio_iommu;
#[cfg(feature = "vtd")]
pub mod vtd;

pub use addr::{AddrRange, Address, Iova, KernVa, PAGE_SHIFT, PAGE_SIZE, PageSize, PhysAddr, UserVa};
pub use dir::{Direction, SyncOp};
pub use error::{Error, Result};
pub use platform::{CpuGuard, MemAttr, PageRequest, Placement, Platform, TablePage};
