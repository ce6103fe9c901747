//! Arm SMMUv3, stage 1 and stage 2 (Arm IHI 0070).
//!
//! # Theory
//!
//! 1. **What the SMMU does.** Every DMA carries a *StreamID* (for PCI, the requester id). The
//!    SMMU looks it up in the *stream table* (STRTAB_BASE): linearly, or through a level-1
//!    descriptor naming a level-2 table. The *stream table entry* (STE, 64 bytes) says abort,
//!    bypass, or translate; for stage 1 it points at a *context descriptor* (CD, 64 bytes)
//!    holding the ASID, the table root TTB0, the translation controls (T0SZ, TG0, IPS, walk
//!    cacheability) and MAIR. The tables are busdma's Arm LPAE stage-1 tables
//!    ([`Stage1`] = `pgtable::ArmLpaeS1`): this module never builds a page-table entry. A
//!    stream with no valid STE, or a translation that finds no entry or no permission, is
//!    terminated and (CD.R = 1) recorded in the *event queue*.
//! 2. **Commands.** Software talks to the SMMU through the *command queue*, a ring in memory
//!    (CMDQ_BASE) with a producer index the driver writes (CMDQ_PROD) and a consumer index the
//!    SMMU advances (CMDQ_CONS). Configuration changes are made visible with CFGI_STE and
//!    CFGI_CD; cached translations are forgotten with TLBI_NH_VA (by address, in range form
//!    when IDR3.RIL offers it), TLBI_NH_ASID and TLBI_NSNH_ALL. Every submission ends with a
//!    CMD_SYNC, completed when CONS has passed it (polled: no interrupt, no MSI): then every
//!    command before it has completed. Nothing is reused before that.
//! 3. **Command errors.** An illegal or aborted command stops the queue: GERROR.CMDQ_ERR
//!    toggles and CMDQ_CONS.ERR says why (CERROR_ILL, _ABT, _ATC_INV_SYNC) with CONS on the
//!    bad command. The driver overwrites that slot with a CMD_SYNC, acknowledges the error in
//!    GERRORN (the SMMU then resumes with the rest), and reports
//!    [`crate::Error::InvalidationFailed`]; never a panic. A wait is a bounded poll; a
//!    time-out is the same error. [`Smmu::inject_invalidation_failures`] makes the next TLBIs
//!    carry an illegal command (tests).
//! 4. **Updating live entries.** An STE or CD is 8 words the SMMU may read at any time. A
//!    stream goes from abort to stage 1 by writing the CD, CFGI_CD, then STE words 1-7 while
//!    word 0 still says abort (ignored then), then word 0 in one 64-bit store, CFGI_STE and a
//!    TLBI_NH_ASID of the ASID (nothing cached under it from an earlier domain survives).
//!    Detach is the reverse: word 0 to abort, CFGI_STE, TLBI_NH_ASID, CMD_SYNC, and only
//!    then the CD page is freed. A 2-level table's L2 page (64 STEs, all abort) is complete
//!    before the L1 descriptor that publishes it is written. Dropping the driver never opens
//!    bypass: a translating SMMU is left translating with every stream aborted and its queues
//!    off (the stream table, which it still reads, leaked); only the `unsafe`
//!    [`Smmu::disable_translation`] turns SMMUEN off.
//! 5. **Coherence.** The driver requires IDR0.COHACC (the SMMU snoops CPU caches when it
//!    reads tables and queues), and tells it so in CR1 (inner-shareable write-back). It
//!    refuses the rest at probe, with everything else it cannot drive
//!    ([`Capabilities::check`]). Hardware AF updates are never asked for (CD.HA = 0): every
//!    leaf has AF set.
//! 6. **Domains.** One ASID per domain ([`Smmu::alloc_asid`], never 0); `busdma::iommu`'s
//!    domain id *is* the ASID, so a `Domain` over [`Stage1`] tables with this driver as its
//!    `IotlbInvalidator` (`invalidator.rs`) invalidates exactly its own TLB entries. Devices
//!    in different domains have different CDs, tables and ASIDs and cannot reach each other.
//! 7. **Faults.** Interrupts stay off: callers poll [`Smmu::take_fault`], which decodes an
//!    event record into a [`Fault`] (F_TRANSLATION, F_PERMISSION, F_ACCESS, C_BAD_STE, ...,
//!    StreamID, input address, direction). [`Smmu::gerror`] reports global errors.
//! 8. **Policy lives above**, as for VT-d: a `busdma::iommu::Domain` decides when to
//!    invalidate (strict or deferred); this driver only executes.
//! 9. **Stage 2** (when IDR0.S2P): a stage-2 STE holds the table root (S2TTB), its controls
//!    (S2T0SZ, S2SL0, S2PS ≤ IDR5.OAS, 4 KiB granule, S2R) and the VMID that tags its TLB
//!    entries; there is no CD. Its tables are `pgtable::ArmLpaeS2`; its invalidations are
//!    TLBI_S2_IPA (by IPA) and TLBI_S12_VMALL (the VMID). VMIDs come from their own bitmap
//!    ([`Smmu::alloc_vmid`]); [`Stage2Domains`] is the SMMU seen through its stage-2 side,
//!    so a `Domain` (domain id = VMID) runs on either stage unchanged. Nesting is not built.
//!
//! # Locking and execution context
//!
//! One spin lock guards the stream table, the CDs, the ASID bitmap and both queues: every
//! submission has completed when its call returns `Ok`. Nothing sleeps.
//!
//! # Mutants
//!
//! `qemu/run --mutants` builds the driver broken with `--cfg busdma_mutant="smmu-..."` (see
//! the private `mutant.rs`); nothing of it is API:
//!
//! ```compile_fail,E0603
//! use busdma::smmuv3::mutant;
//! ```

pub mod caps;
pub mod cmd;
mod device_hw;
pub mod entry;
pub mod event;
mod invalidator;
mod mutant;
pub mod regs;
mod stage2;
mod unit;

pub use caps::Capabilities;
pub use entry::{Stage2Config, SteConfig, SteKind};
pub use event::{Access, EventKind, Fault};
pub use stage2::Stage2Domains;
pub use unit::{DEFAULT_POLL_LIMIT, Smmu, SmmuConfig, SmmuStats, StreamTableChoice, StreamTableFormat};

/// The stage-1 page-table format domains behind this driver use: `busdma::pgtable`'s
/// [`ArmLpaeS1`](crate::pgtable::ArmLpaeS1) (in the QEMU suite's `smmu-af-clear` mutant build
/// only, a broken copy of it).
#[cfg(not(busdma_mutant = "smmu-af-clear"))]
pub type Stage1 = crate::pgtable::ArmLpaeS1;
/// The stage-1 format: the mutant build's broken one.
#[cfg(busdma_mutant = "smmu-af-clear")]
pub type Stage1 = mutant::AfClear;
