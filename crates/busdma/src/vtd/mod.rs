//! Intel VT-d DMA remapping, legacy (non-scalable) mode.
//!
//! # Theory
//!
//! 1. **What the unit does.** A remapping unit sits between PCI devices and memory. For each
//!    DMA it takes the requester id (bus, device, function), looks the bus up in the *root
//!    table* (256 entries, RTADDR points at it) and the device/function in that bus's *context
//!    table* (256 entries); the context entry names the device's *domain id* and the root of a
//!    *second-level page table*, which translates the IOVA to a physical address with read and
//!    write permissions at every level. No entry, no permission: the DMA is blocked and logged
//!    in a *fault record*.
//! 2. **Caches.** The unit caches context entries (context cache) and translations (IOTLB,
//!    tagged by domain id; plus paging-structure caches). Software that removes or weakens an
//!    entry must invalidate the caches that may hold it and wait for completion before
//!    reusing what the entry pointed at. Two mechanisms exist: *register-based* (write CCMD or
//!    the IOTLB register at ECAP.IRO, poll until hardware clears the request bit) and *queued*
//!    (ECAP.QI: write 128-bit descriptors into a ring in memory, bump the tail register, and
//!    follow them with a wait descriptor whose status write says they all completed). This
//!    driver uses one or the other for its whole life ([`InvalidationChoice`]). In *caching
//!    mode* (CAP.CM, usually a hypervisor's virtual unit) the unit may cache not-present and
//!    erroneous entries too: a context entry made present is followed by a context-cache
//!    invalidation naming domain id 0 (the tag CM gives not-present entries) and a
//!    domain-selective IOTLB invalidation, and every map by a page-selective invalidation
//!    ([`Vtd::flush_mapped`]; nothing at all when CM is clear).
//! 3. **Granularity.** IOTLB invalidations are global, per domain, or page-selective (CAP.PSI)
//!    over a naturally aligned block of 2^AM pages, AM ≤ CAP.MAMV; [`inval::psi_block`]
//!    computes the smallest block covering a range and the driver falls back to the domain
//!    when no block fits.
//! 4. **Ordering and coherence.** Entries are 128 bits written as two 64-bit words, the word
//!    with the present bit last (when making present) or first (when clearing). When ECAP.C is
//!    clear the unit does not snoop CPU caches while walking: every update of a root, context
//!    or page-table entry, and every queued descriptor, is written back with
//!    `Platform::cache_clean` before the unit may read it. When CAP.RWBF is set, the unit's
//!    write buffer is flushed (GCMD.WBF) after table updates and before invalidations.
//! 5. **Depth.** CAP.SAGAW lists the supported second-level depths; the driver takes the
//!    deepest one up to [`VtdConfig::max_levels`] and MGAW (4 levels/48 bits on a unit that
//!    offers it, else 3 levels/39 bits). Every domain's page table must have that depth; the
//!    context entry's AW field says it.
//! 6. **Domains.** One domain per device by default: each attached device gets a domain id
//!    ([`Vtd::alloc_domain_id`], never 0) and its own second-level table, so devices cannot
//!    reach each other's mappings. The page tables themselves come from `busdma::pgtable` in
//!    the VT-d second-level format; this module never builds a PTE.
//! 7. **Faults.** Fault interrupts stay masked: callers poll [`Vtd::take_fault`], which reads
//!    the record at FSTS.FRI, decodes source id, page address, direction and reason, and
//!    clears its F bit (the unit records nothing more from that source until then).
//! 8. **Policy lives above.** The driver implements `busdma::iommu::IotlbInvalidator`
//!    (`invalidator.rs`): a `busdma::iommu::Domain` decides *when* to invalidate (strict: per
//!    unmap; deferred: batched) and the driver only executes ranged, whole-domain and after-map
//!    requests, each complete when the call returns `Ok`.
//! 9. **Failures.** An invalidation the unit rejects (FSTS.IQE, a register command answered
//!    with IAIG/CAIG = 0), reports ICE/ITE for, or never completes (a bounded poll) returns
//!    [`crate::Error::InvalidationFailed`] naming the domain and the status; never a panic.
//!    After IQE the queue is repaired (the rejected slot overwritten by a harmless wait
//!    descriptor, IQE cleared, the doorbell rung again), so later invalidations work. What the
//!    failed command was to free is held back by the domain (`busdma::iommu::Domain`, theory
//!    8). [`Vtd::inject_invalidation_failures`] makes the unit reject the next ones (tests).
//!
//! # Locking and execution context
//!
//! One spin lock guards the context tables, the domain-id bitmap and the invalidation
//! machinery, so invalidations are serialised and every one has completed when its call
//! returns `Ok`. Nothing sleeps; every call may run with preemption disabled. The hardware
//! waits are bounded polls that end in [`crate::Error::InvalidationFailed`] (invalidations) or
//! [`crate::Error::BadState`] (global commands).
//!
//! # Mutants
//!
//! `qemu/run --mutants` builds the driver broken on purpose, one way each, and requires the QEMU
//! suite to fail on every one. A mutant is the compiler flag `--cfg busdma_mutant="NAME"` that
//! only that runner passes, never a Cargo feature, and nothing of it is API (the module is
//! private):
//!
//! ```compile_fail,E0603
//! use busdma::vtd::mutant; // private: mutants are not part of the crate's interface
//! ```

pub mod caps;
mod device_hw;
pub mod entry;
pub mod fault;
pub mod inval;
mod invalidator;
mod mutant;
pub mod regs;
mod unit;

pub use caps::{Capabilities, Levels};

/// The second-level page-table format domains behind this driver use: `busdma::pgtable`'s
/// [`VtdSl`](crate::pgtable::VtdSl). (In the QEMU suite's `nonleaf-no-rw` mutant build only, a
/// broken copy of it.)
#[cfg(not(busdma_mutant = "nonleaf-no-rw"))]
pub type SecondLevel = crate::pgtable::VtdSl;
/// The second-level page-table format: the QEMU suite's mutant build's broken one.
#[cfg(busdma_mutant = "nonleaf-no-rw")]
pub type SecondLevel = mutant::NonLeafNoRw;
pub use entry::{DomainId, SourceId};
pub use fault::{Access, Fault};
pub use unit::{DEFAULT_POLL_LIMIT, InvalidationChoice, InvalidationMethod, Vtd, VtdConfig, VtdStats};
