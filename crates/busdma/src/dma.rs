//! # The driver's API: everything a device driver needs, in one place
//!
//! A driver author reads this module; the rest of the crate is mechanism for kernel
//! integrators (the platform seam, page tables, IOMMU domains, the IOVA allocator, bounce
//! buffering, registration), public under its own modules and documented as such.
//!
//! ## From "I have a device" to "the device read my buffer"
//!
//! ```
//! use busdma::dma::{Direction, DmaMemory, Iommu, MemAttr, Policy, SyncOp, TagSpec};
//! # use busdma::quickmap::QuickMaps;
//! # use busdma_model::{DmaPort, HostPlatform, IommuConfig, MachineConfig, ModelIommu};
//! # let machine = HostPlatform::new(MachineConfig::with_ram(64 << 20))?;
//! # let quick_maps = QuickMaps::for_platform(&machine);
//! // The kernel, once per IOMMU (here the machine model's):
//! let iommu = Iommu::new(&machine, &quick_maps, ModelIommu::new(&machine, IommuConfig::default())?)?;
//! // The driver:
//! let dev = iommu.attach(0x18, Policy::Strict)?; // the device, in a domain of its own
//! let tag = dev.tag(TagSpec::new(64 << 10, 8))?; // what the device can address
//! let buf = DmaMemory::alloc(&machine, tag.spec(), 1500, MemAttr::WriteBack)?;
//! buf.write(0, b"hello, device")?;
//! let mut map = tag.create_owned_map()?;
//! let segs = map.load(buf, Direction::ToDevice).map_err(|(e, _)| e)?.to_vec(); // owns `buf` now
//! map.sync(SyncOp::PREWRITE)?;
//! // ... program segs[0].addr into the device; it reads the buffer through the IOMMU:
//! # let mut seen = [0u8; 13];
//! # iommu.hw().port(0x18).dma_read(segs[0].addr, &mut seen).unwrap();
//! # assert_eq!(&seen, b"hello, device");
//! map.sync(SyncOp::POSTWRITE)?;
//! let buf = map.take()?; // back once no translation can reach it
//! # drop(buf);
//! # Ok::<(), busdma::Error>(())
//! ```
//!
//! ## The pieces
//!
//! | you have | you use |
//! |---|---|
//! | a device behind an IOMMU | [`Iommu::attach`] with a [`Policy`] (strict, deferred, untrusted, identity, bypass) → an owned [`Device`] |
//! | a driver that must not care which IOMMU (VT-d, SMMUv3, virtio-iommu) | be generic over [`DmaDevice`]: tags, policy and detach of either handle ([`Device`], `device::ViommuDevice`) |
//! | its constraints (DMA mask, alignment, boundary, segments) | [`Device::tag`] with a [`TagSpec`] → a [`DeviceTag`] (a cheap handle; maps hold it) |
//! | descriptor rings, mailboxes | [`Tag::alloc_coherent`] → [`Coherent`] (mapped for its whole life) |
//! | many small descriptors or completion records | [`Tag::create_pool`] → [`DmaPool`] → [`DmaBlock`]s (owned, back to the pool on drop) |
//! | descriptor fields and status bits in coherent memory | `view()` → [`DmaView`]: `#[repr(C)]` [`Pod`] values by copy, [`DmaAtomicU32`]/[`DmaAtomicU64`] status words; no `unsafe` |
//! | a buffer that goes back and forth | [`Tag::alloc_buffer`] → [`CpuOwned`] ⇄ [`DeviceOwned`], direction in the type |
//! | per-I/O buffers and scatter-gather lists | [`Tag::create_owned_map`] → [`OwnedMap`], loaded with [`DmaMemory`], [`Part`]s of it, [`RegionSlice`]s of device memory, registered user buffers, or arrays and tuples of them |
//! | a buffer from the kernel heap | [`HeapBuffer`] (whole heap pages, so the device reaches nothing else), loaded into an [`OwnedMap`] |
//! | a packet built of fragments (mbuf), a block request on sectors (bio) | [`FragChain`] ([`FragChain::blocks`] for a bio), loaded into an [`OwnedMap`] |
//! | a `readv`/`writev` over registered user memory (uio) | [`crate::pin::Registry::load_iov`] → [`crate::pin::RegisteredIov`], loaded into an [`OwnedMap`] |
//! | a peer's BAR, MMIO, memory without pages | [`DeviceRegion`] (described once by bus code, `unsafe`), then [`DeviceRegion::slice`] |
//! | per-I/O buffers recycled through fixed slots (a ring), one IOTLB invalidation per batch | [`Tag::create_window`] → [`DmaWindow`] (two-step mapping: `link`, `unlink`, `commit`) |
//! | memory the kernel describes by address | [`DmaMap`] with the `unsafe` sources of [`crate::front`] ([`crate::front::KernelBuf`], [`crate::front::SgList`], ...) |
//!
//! Every map owns what it maps while a translation may reach it; what comes back after a
//! failed invalidation is quarantined, never reused ([`QuarantineStats`]). The rule and its
//! proof: [`crate::soundness`].

pub use crate::device::{DetachError, Device, DeviceConfig, DeviceTag, DmaDevice, Iommu, IommuHw, Policy};
pub use crate::dir::{Direction, SyncOp};
pub use crate::error::{Error, Result};
pub use crate::front::typed::{Bidirectional, CpuOwned, DeviceOwned, DmaDir, FromDevice, ToDevice};
pub use crate::front::{
    Coherent, DeferStats, Deferrable, DeferredMap, DeviceRegion, DmaBuffer, DmaMap, DmaMemory, FragChain,
    HeapBuffer, HeapPage, OwnedMap, Part, PendingLoad, QuarantineStats, RegionKind, RegionSlice, Segment,
    SyncStats, Tag, TagFlags, TagSpec,
};
pub use crate::front::{DmaAtomicU32, DmaAtomicU64, DmaBlock, DmaPool, DmaView, PoolStats};
pub use crate::front::{DmaWindow, LinkError, Linked};
pub use crate::platform::MemAttr;
/// The plain-data contract of [`DmaView`] (derive it with bytemuck's `derive` feature).
pub use bytemuck::{Pod, Zeroable};

use crate::device::DeviceStrategy;

/// A map of a device's tag ([`Device::tag`]), loaded with raw sources.
pub type DeviceMap<'i, 'p, H> = DmaMap<'i, <H as IommuHw>::Platform, DeviceStrategy<'i, 'p, H>>;

/// A map of a device's tag that owns the buffer `B` it loads ([`OwnedMap`]).
pub type DeviceOwnedMap<'i, 'p, H, B> = OwnedMap<'i, <H as IommuHw>::Platform, DeviceStrategy<'i, 'p, H>, B>;

/// Coherent memory of a device's tag ([`Tag::alloc_coherent`]).
pub type DeviceCoherent<'i, 'p, H> = Coherent<'i, <H as IommuHw>::Platform, DeviceStrategy<'i, 'p, H>>;

/// A two-step window of a device's tag whose links own the buffers `B` ([`DmaWindow`]).
pub type DeviceWindow<'i, 'p, H, B> = DmaWindow<'i, <H as IommuHw>::Platform, DeviceStrategy<'i, 'p, H>, B>;

/// A pool of small coherent blocks of a device's tag ([`Tag::create_pool`]).
pub type DevicePool<'i, 'p, H> = DmaPool<'i, <H as IommuHw>::Platform, DeviceStrategy<'i, 'p, H>>;

/// A block of a device's pool ([`DmaPool::alloc`]).
pub type DeviceBlock<'i, 'p, H> = DmaBlock<'i, <H as IommuHw>::Platform, DeviceStrategy<'i, 'p, H>>;
