//! virtio-iommu: the paravirtual IOMMU that VMMs (QEMU, cloud-hypervisor, Firecracker,
//! openvmm) give their guests, driven over a modern virtio-pci transport.
//!
//! # Theory
//!
//! 1. **An IOMMU you ask, not one you program.** VT-d and SMMU walk page tables the driver
//!    writes in RAM; the driver then only has to invalidate caches. A virtio-iommu has no
//!    tables the guest can see: every change is a *request* on a virtqueue (ATTACH, DETACH,
//!    MAP, UNMAP, PROBE), executed by the hypervisor, which answers with a status in the
//!    request's tail. A request is complete when the device has returned its buffer: a
//!    completed UNMAP means the device can no longer reach the range (it is both the entry
//!    clear and the IOTLB invalidation of a table-walking IOMMU). Every request costs a trip
//!    to the hypervisor (a VM exit per notification), which is why the number of requests and
//!    notifications per I/O is the figure of merit ([`ViommuStats`]).
//! 2. **Negotiation** ([`VirtioIommu::new`]): VERSION_1 and MAP_UNMAP are required;
//!    INPUT_RANGE (the IOVA range the device translates), DOMAIN_RANGE (valid domain
//!    numbers), PROBE (per-endpoint properties: reserved regions) and BYPASS_CONFIG (a writable
//!    `bypass` byte, which the driver sets to 0 and reads back) are taken when offered; the
//!    legacy BYPASS feature never is. So an endpoint attached to no domain reaches nothing,
//!    and an attached one reaches only what its domain maps.
//! 3. **The domain is not a page table** ([`ViommuDomain`]). The seam with the rest of busdma
//!    is the IOVA allocator and the invalidation policy, not the page-table walker: a domain
//!    allocates IOVA (from the device's input range ∩ the caller's aperture, in whole
//!    granules), sends one MAP per mapping and one UNMAP per unmapping. The front end's IOMMU
//!    strategies (`IommuPerMap`, `IommuPerSegment`, `IommuReserved`) reach it through the same
//!    domain interface as a table-walking domain, `front::strategy::IommuOps`
//!    (`front/strategy/viommu.rs`), so tags and maps work unchanged behind a virtio-iommu.
//!    The page-size mask is honoured by taking its smallest page (at least 4 KiB) as the
//!    granule: buffers, lengths and IOVA are multiples of it, and a misaligned request is
//!    refused with the offending value before anything is sent.
//! 4. **Strict and deferred.** *Strict*: `unmap` sends the UNMAP and frees the IOVA only once
//!    it has completed. *Deferred* ([`crate::iommu::InvalidationPolicy::Deferred`]): unmaps
//!    queue; when the queue holds `max_entries` or its oldest entry is `max_age_ns` old, all
//!    queued UNMAPs go out as one batch (one notification per queue-full of requests) and
//!    their IOVA is freed after the batch completes. As with deferred IOTLB invalidation, the
//!    device can reach a queued range until its batch completes: only for trusted devices,
//!    and the memory must outlive the flush ([`ViommuDomain::map`]'s contract).
//! 5. **Reserved regions.** PROBE lists the endpoint's reserved regions (on x86, the MSI
//!    window 0xfee00000–0xfeefffff, which the hypervisor passes to the interrupt controller
//!    untranslated). They are reserved in the domain's IOVA allocator, so no allocated IOVA
//!    lands there, and a fixed mapping ([`ViommuDomain::map_at`]) overlapping one is refused
//!    with [`crate::Error::BadWindow`] naming the region.
//! 6. **Errors carry data.** A non-zero status becomes [`crate::Error::RequestFailed`] naming
//!    the request, the status, the domain and the address; a device that stops answering (a
//!    bounded poll) gets status 0xff and the driver refuses every later request. A failed
//!    UNMAP holds its IOVA back forever (it may still be mapped); a failed MAP frees it (a
//!    refused MAP maps nothing).
//! 7. **Faults.** The event queue is kept full of device-writable buffers; the device writes a
//!    fault record (reason, flags, endpoint, address) into one for each access it blocked.
//!    [`VirtioIommu::take_fault`] decodes the oldest and gives the buffer back.
//! 8. **Memory.** The queues live in pages from the platform and are accessed by copy
//!    (`write_phys`/`read_phys`) with the platform's DMA barriers, never through references;
//!    the driver assumes a cache-coherent virtio device (as every virtio-pci device on x86
//!    and on Arm virt is). The pages are freed only after a reset the device acknowledged.
//! 9. **Untrusted endpoints.** [`ViommuDomain::new_untrusted`] is strict whatever was asked
//!    (a deferred queue would leave an unloaded range, and the bounce page behind it,
//!    reachable until its batch) and gives every allocated range a never-mapped guard page
//!    after its end (`crate::iova` theory 6), so a device that runs off the end of one load
//!    faults instead of reaching the next. Sub-page bouncing needs pages shared by every
//!    endpoint, as a table IOMMU's untrusted devices share its zones: the unit owns them
//!    ([`VirtioIommu::bounce_zones`], created empty, grown as untrusted maps are created, up
//!    to the zone bound) together with the machine's quick maps ([`VirtioIommu::quick_maps`],
//!    given to [`VirtioIommu::new`]), so no endpoint pins bounce memory of its own. A bounce
//!    page goes back to its zone only once the UNMAP of its load has completed; a failed
//!    UNMAP keeps it (and its zone) out forever. Dropping the unit frees what its zones hold
//!    free: no such page is mapped.
//!
//! # The device handle
//!
//! A driver does not build a [`ViommuDomain`] itself: [`crate::device::ViommuDevice::attach`]
//! (strict, deferred or untrusted) builds the domain, and the handle implements
//! [`crate::device::DmaDevice`], the same trait as the page-table IOMMUs' `Device`, so a driver
//! generic over it runs unchanged here (`crate::device` theory 8). `device::Iommu` itself stays
//! over `IommuHw`: its `attach_tables` takes a table root, which this IOMMU has not.
//!
//! # Locking and execution context
//!
//! One spin lock per queue: requests are serialised, and each call returns only once the
//! device has answered (it spins, never sleeps). Every call may run with preemption disabled.
//!
//! # Mutants
//!
//! `qemu/run --mutants` builds the driver broken on purpose (`--cfg busdma_mutant=`
//! `"viommu-skip-unmap"`, `"viommu-wrong-range"`, `"viommu-ignore-reserved"`,
//! `"viommu-no-guard"`: no guard page in untrusted domains) and requires the QEMU suite to
//! fail on each.

mod domain;
mod mutant;
mod queue;
mod transport;
mod unit;
pub mod wire;

pub use domain::{ViommuDomain, ViommuDomainStats, ViommuMapping, ViommuTicket};
pub use transport::ConfigSpace;
pub use unit::{ViommuInfo, ViommuStats, VirtioIommu};
pub use wire::{FaultReason, FaultRecord, ReservedKind, ReservedRegion};
