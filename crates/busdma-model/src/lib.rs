//! # busdma-model: a machine to run busdma on, in userspace
//!
//! [`HostPlatform`] implements [`busdma::Platform`] over real memory:
//!
//! - **RAM** is a `memfd` of configurable size (default 1 GiB, sparse: untouched pages cost
//!   nothing), whose physical addresses start at a configurable non-zero base so that
//!   "physical address == offset" bugs show. A [`ram::FrameAllocator`] hands out its frames.
//! - **The direct map** is a second, shared mapping of the same memfd that covers a
//!   configurable prefix of RAM (default: all of it). RAM outside it has no kernel virtual
//!   address; the CPU reaches it only through quick maps, which really remap a per-CPU window
//!   with `mmap(MAP_FIXED)`; with a VIPT cache model each slot has one window per colour and
//!   a page is always mapped at the window of its own (physical) colour.
//! - **CPUs** are slots a thread binds to ([`HostPlatform::bind_cpu`]); preemption guards
//!   really exclude other threads from the slot for their lifetime.
//!
//! - **Devices** reach memory through a [`DmaPort`]: a [`DirectPort`] (no IOMMU, bus address =
//!   physical address, limited by the device's DMA mask) or the port of the [`ModelIommu`],
//!   which walks VT-d or Arm page tables in the model's RAM, caches translations in a real
//!   IOTLB, logs faults and counts invalidation commands.
//!
//! Devices reach RAM through [`HostPlatform::read_phys`](busdma::Platform::read_phys) and
//! friends, never through Rust references.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks, missing_docs)]

pub mod attack;
pub mod audit;
pub mod cache;
pub mod cpu;
pub mod dma;
pub mod host;
pub mod hostile;
pub mod iommu;
pub mod linux_pin;
pub mod ram;
mod tsc;
pub mod uspace;
pub mod viommu;

pub use audit::{BusAccess, PageKind};
pub use cache::{Cache, CacheConfig, CachedCpu, Coherence, Indexing, Snoop};
pub use cpu::CpuBinding;
pub use dma::{DeviceId, DirectPort, DmaFault, DmaPort, FaultReason};
pub use host::{HostPlatform, MachineConfig, MmioHandler};
pub use iommu::{
    AuditReport, Context, CostProfile, IommuConfig, IommuPort, IommuStats, LPAE_MAIR, LeafAttrs, LeafInfo,
    MemoryType, ModelIommu, TableFormat, Violation,
};
pub use ram::{FrameBlock, FrameRequest, Placement};
