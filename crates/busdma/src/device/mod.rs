//! Devices behind an IOMMU: one call attaches a device with a policy and returns a handle that
//! owns its domain; tags come from the handle.
//!
//! # Theory
//!
//! 1. **Why a handle.** Attaching a device by hand takes seven mechanism objects (a table pool,
//!    a page table, an IOVA allocator, a domain, a domain id, a context entry, the attach) and
//!    one ordering rule that nothing enforced: the device's context must be removed, and the
//!    IOMMU's caches of the domain invalidated, *before* the domain's table pages go back to
//!    the pool. Get it wrong and a stale device walks tables that now belong to another domain
//!    (issue 14, hole 8). [`Iommu::attach`] builds all of it from a [`Policy`]; the returned
//!    [`Device`] owns the domain, and the raw attach calls below it are `unsafe fn`s whose
//!    contract the handle keeps.
//! 2. **Objects.** An [`Iommu`] is created once per IOMMU by the kernel: it owns the hardware
//!    handle (anything implementing [`IommuHw`]: the model IOMMU, the VT-d driver), the table
//!    pool every domain of that IOMMU draws from, and the bounce zones untrusted devices use.
//!    Devices borrow it (`'i`; `'static` in a kernel, a local scope in tests). A [`Device`] is
//!    a reference-counted handle (`Arc`) to the attachment; every tag made by
//!    [`Device::tag`] holds one through its strategy ([`DeviceStrategy`]), and every map holds
//!    its tag. So the attachment, its domain and its tables live as long as the last map,
//!    whatever order values are dropped or forgotten in: a forgotten map keeps its domain
//!    attached forever, never freed (a leak, not a reuse).
//! 3. **Policies.** [`Policy::Strict`] and [`Policy::Deferred`] map each load in the domain
//!    (`IommuPerMap`) with strict or batched invalidation. [`Policy::Untrusted`] is strict,
//!    marks the domain untrusted, forces [`crate::front::TagFlags::untrusted`] on every tag
//!    of the device and bounces sub-page buffers (`Bounced::over_iommu`), so the device sees
//!    the buffer and zeros, never a neighbour. [`Policy::Identity`] maps each page at its own
//!    physical address (the identity strategy, reference counted). [`Policy::Bypass`] asks
//!    the hardware to pass the device through untranslated: no domain, the direct strategy;
//!    only for a device the kernel trusts with all of memory.
//! 4. **Detach order.** When the last handle goes (or [`Device::detach`] is called on the
//!    only one), the teardown is: (a) the hardware removes the context entry and invalidates
//!    its context cache and the domain's IOTLB ([`IommuHw::detach`], complete on `Ok`); from
//!    then on nothing can fill a cache with a translation of the domain; (b) the domain's
//!    deferred queues are drained and one more whole-domain invalidation completes; (c) only
//!    then is the domain dropped, which frees its tables, and the domain id given back.
//! 5. **Failure.** If (a) or (b) fails, the hardware may still reach the tables through a
//!    stale cache: the domain (with its tables, its queued IOVA and its held-back unmaps) and
//!    the domain id are leaked on purpose, never reused, and counted
//!    ([`IommuStats::leaked_domains`]); [`Device::detach`] returns the error.
//! 6. **The hardware trait is trusted.** [`IommuHw`] is an `unsafe trait`: busdma frees
//!    table pages because `detach` said the hardware forgot them, and builds tables in the
//!    format and width it names; a wrong answer lets a device reach freed memory.
//! 7. **Peer BARs** (`peer.rs`). A peer device's BAR is reached at its bus address; on a
//!    fabric that routes peer-to-peer requests before they reach the IOMMU, an IOVA inside a
//!    BAR's range would go to the peer instead of being translated. [`Iommu::register_peer`]
//!    records the range once for the whole IOMMU; every domain of the IOMMU, existing or
//!    created later, reserves it in its IOVA allocator before it next hands out IOVA (one
//!    atomic load of the registry's generation per allocation, the reservation itself only
//!    when it changed), so no IOVA a device is given overlaps a registered BAR and the driver
//!    reserves nothing by hand. A domain that already holds IOVA inside a new range when it
//!    catches up refuses its loads with the allocator's `AlreadyMapped` until that IOVA is
//!    unloaded. Loads that reach a registered BAR (MMIO or peer-BAR runs inside it) are
//!    counted; [`Iommu::unregister_peer`] refuses with `Busy` while any is loaded. Limit:
//!    the IOVA allocator's reservations are permanent, so unregistering stops new domains
//!    from reserving the range but existing domains keep the hole until they are dropped.
//!
//! 8. **One handle, three IOMMUs** (`common.rs`, `viommu.rs`). A driver is written against
//!    [`DmaDevice`], the way a FreeBSD driver holds a `device_t` and asks `bus_dma` for tags,
//!    or a Linux driver holds a `struct device` whose `dma_map_ops` it never names: tags for
//!    its constraints ([`DmaDevice::tag`], whose strategy is an associated type, so each
//!    backend's hot path stays one monomorphic call chain), its policy, its id, and a detach
//!    that reports. Two implementations: [`Device`] (any [`IommuHw`]: VT-d, SMMUv3, the
//!    model; page tables, `attach_tables`) and [`ViommuDevice`] (virtio-iommu: no tables;
//!    each map and unmap a request; [`ViommuDevice::attach`] is its one call, strict,
//!    deferred or untrusted, identity and bypass refused before any request with the reason
//!    in `viommu.rs`). A trait over handles, not one `Device` generic over a backend, because
//!    the two share no mechanism below the handle: the table path's attach order (theory 4),
//!    peer BARs and bounce zones are `Iommu`'s, the request path's (its bounce zones
//!    included) are the unit's; what they share is the driver's view, which is what the
//!    trait names. Both keep the rules above:
//!    every tag and map holds the attachment, the last drop flushes and detaches, a
//!    forgotten map leaks its domain, never frees it. The trait is safe: busdma trusts
//!    nothing it answers (tags are built by `Tag::new_root` over strategies whose
//!    `IommuOps` is the trusted seam).
//!
//! # Execution context
//!
//! `attach`, `detach` and dropping the last handle allocate (attach) and spin on the
//! hardware's invalidations; they never sleep and may run with preemption enabled (they pin
//! a CPU themselves). Loads through a device's tags are the strategies' hot paths: one
//! `match` on the policy per call, no allocation.
#![deny(unsafe_code)]

mod common;
mod handle;
mod hw;
mod iommu;
mod peer;
mod strategy;
#[cfg(feature = "virtio-iommu")]
mod viommu;
#[cfg(feature = "virtio-iommu")]
mod viommu_strategy;

pub use common::{DetachError, DmaDevice};
pub use handle::{Device, DeviceBypass, DeviceDomain};
pub use hw::IommuHw;
pub use iommu::{DEFAULT_APERTURE_START, DeviceConfig, Iommu, IommuStats};
pub use peer::PeerHandle;
pub use strategy::{DeviceMapState, DeviceStrategy};
#[cfg(feature = "virtio-iommu")]
pub use viommu::{ViommuAttachment, ViommuDevice, ViommuTag};
#[cfg(feature = "virtio-iommu")]
pub use viommu_strategy::{ViommuMapState, ViommuStrategy};

use crate::front::Tag;

/// How a device is attached (theory 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Each load mapped in the device's domain; one ranged invalidation before each unload
    /// returns.
    Strict,
    /// Each load mapped in the device's domain; unloads invalidated in batches (per-CPU
    /// flush queues, bounded by [`DeviceConfig::deferred`]).
    Deferred,
    /// A device assumed hostile: strict invalidation, an untrusted domain, every tag
    /// untrusted, sub-page buffers bounced.
    Untrusted,
    /// Each page mapped at its own physical address (bus address = physical address).
    Identity,
    /// No translation: the hardware passes the device's requests through to memory.
    Bypass,
}

/// A tag served by a device (`Device::tag`).
pub type DeviceTag<'i, 'p, H> = Tag<'i, <H as IommuHw>::Platform, DeviceStrategy<'i, 'p, H>>;
