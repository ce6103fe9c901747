//! IO page tables in real hardware formats: a generic walker over formats that know only bits.
//!
//! # Theory
//!
//! 1. **Format apart from walker.** A [`PteFormat`] knows how one 64-bit entry encodes "not
//!    present", "next table at PA", "leaf for PA with these rights" at a given *height* (0 =
//!    the last level, whose entries map 4 KiB; 1 maps 2 MiB; 2 maps 1 GiB; 3 maps 512 GiB).
//!    The walker ([`PageTable`]) knows the shape every supported format shares (4 KiB tables
//!    of 512 entries, 9 bits of input address per level, 3 levels for 39-bit and 4 for 48-bit
//!    input) and nothing of the bits. Three formats exist: [`VtdSl`] (Intel VT-d second
//!    level), [`ArmLpaeS1`] (Arm VMSAv8-64 stage 1, 4 KiB granule, as SMMUv2/v3 walk it) and
//!    [`ArmLpaeS2`] (its stage 2: memory type and rights in the leaf, no MAIR). Each is
//!    documented from its specification at the top of its file.
//! 2. **Batches and blocks.** [`PageTable::map`] maps a run of pages in one call, descending
//!    once per table it touches, not once per page. Where the run covers a whole 2 MiB or
//!    1 GiB span, IOVA and PA both aligned to it, the walker writes one block entry instead of
//!    a table of pages (up to the table's `max_leaf`, see [`PageTable::with_max_leaf`]).
//!    [`PageTable::unmap`] of part of a block first replaces the block by a table of the next
//!    smaller leaves mapping the same memory (a *split*), then clears the part unmapped.
//! 3. **Lock-free table installation; callers own disjoint ranges.** Many threads map and
//!    unmap one table at once, without a lock, on the rule that at any moment each IOVA
//!    belongs to at most one caller (the IOVA allocator makes it so). Two callers whose ranges
//!    share a missing intermediate table both allocate one and race to install it by
//!    compare-and-swap on the parent entry ([`install::table_or_install`]); the loser gives its
//!    page back (it was never reachable, so no flush is needed) and descends into the
//!    winner's. Leaf entries are written with plain atomic stores: only their owner writes them.
//!    The walker cannot check who owns what, so [`PageTable::map`] and [`PageTable::unmap`]
//!    are `unsafe fn`s whose `# Safety` is this rule (and, for map, that the caller may give
//!    the device the physical range); so are `Domain::map`/`unmap` and `reserve_levels` above.
//! 4. **Who may free a table.** A table page is detached only by a call whose range covers
//!    the table's whole span: no other caller can own an address below it, so nobody else can
//!    be walking through it. A table left empty by a *partial* unmap stays installed (Linux
//!    io-pgtable does the same); it holds no translation and is reused by the next map below
//!    it, and freed by a later covering unmap or when the table is dropped.
//! 5. **Nothing is reused before the hardware has forgotten it.** Unmap clears entries and
//!    fills a [`Gather`]: the IOVA range the IOTLB must forget and the detached table pages
//!    (walk caches may still point at them). Those pages go back to the pool only through
//!    [`Gather::release_after_flush`], which takes a [`FlushDone`]: the proof, made by the
//!    invalidation code, that an invalidation covering the range has completed.
//! 6. **Errors, not panics, and no partial effects.** Every argument is checked before any
//!    entry changes (alignment, input and output width, rights). Map fails on the first entry
//!    already in use ([`Error::AlreadyMapped`]) or allocation failure ([`Error::NoMemory`]) and
//!    then clears every leaf it wrote, so nothing it did translates any more (intermediate
//!    tables it installed stay, empty and reachable, by rule 4; a device may have cached the
//!    partial translation, so the caller invalidates the range before reusing the IOVA).
//!    Unmap checks the whole range is mapped ([`Error::NotMapped`]) and takes every page a
//!    split needs from the pool *before* it changes anything, so it fails with no effect.
//! 7. **Non-coherent walkers.** When the IOMMU does not snoop the CPU caches (VT-d with
//!    `ECAP.C = 0`), every entry written is cleaned to memory with [`Platform::cache_clean`]
//!    before it can matter: a new table page is cleaned whole before the entry pointing to it
//!    is written, and written entries are cleaned in runs (one call per run per table).
//!    [`PageTableConfig::coherent_walker`] turns this off for snooping walkers.
//! 8. **Descriptor pools.** Table pages come from a [`TablePool`]: per-CPU caches in front of
//!    a shared depot in front of [`Platform::alloc_table_page`] (seed 002's per-CPU PTED
//!    pools). Pages come back zeroed; every allocation point can be made to fail on purpose.
//! 9. **Attributes.** A leaf carries more than rights: [`Prot`] is the attribute set the
//!    caller asks for (read/write, [`MemType`] normal or device, privileged, forced snoop)
//!    and each format encodes what its entries can hold, rounding the rest in
//!    [`PteFormat::effective_prot`] (never widening what the device may do to memory: Arm
//!    stage 1 adds read to write-only; both drop forced snoop on device memory, which is
//!    never snooped, and Arm stage 1 drops it everywhere, its cacheable type being snooped
//!    already; VT-d refuses a privileged-only entry, which it cannot express, rather than
//!    open it to unprivileged requests). [`PteFormat::prot`]
//!    decodes an entry back, so "what was written is what a walk sees" is testable. *Format
//!    apart from policy*: a format never chooses an attribute; the front end's strategies
//!    choose device memory for MMIO and peer-BAR runs and normal memory for RAM.
//!
//! # Execution context
//!
//! Map, unmap and lookups never sleep and may run with preemption disabled; map and unmap
//! take the caller's [`CpuGuard`](crate::CpuGuard) because the pool's per-CPU caches are
//! indexed by it.
//!
//! [`Platform::cache_clean`]: crate::Platform::cache_clean
//! [`Platform::alloc_table_page`]: crate::Platform::alloc_table_page
//! [`Error::AlreadyMapped`]: crate::Error::AlreadyMapped
//! [`Error::NoMemory`]: crate::Error::NoMemory
//! [`Error::NotMapped`]: crate::Error::NotMapped

mod format;
mod gather;
pub mod install;
mod lpae;
mod lpae_desc;
mod lpae_s2;
mod pool;
mod vtd;
mod walker;

pub use format::{PteFormat, height_shift, height_span};
pub use gather::{FlushDone, Gather};
pub use lpae::ArmLpaeS1;
pub use lpae_s2::ArmLpaeS2;
pub use pool::{PoolStats, TablePool};
pub use vtd::VtdSl;
pub use walker::{LeafTemplate, LeafWindow, PageTable, PageTableConfig};

/// The memory type a leaf gives the device's accesses (theory 9).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MemType {
    /// Normal memory, cacheable (write-back): RAM. Accesses may be merged, reordered,
    /// prefetched and snooped.
    #[default]
    Normal,
    /// Device memory: MMIO registers and peer BARs. No merging, no speculation, no
    /// reordering of accesses to it, never cached (Arm Device-nGnRE, x86 UC).
    Device,
}

/// The attributes of a mapping carried to the format: a device's access rights, the memory
/// type, privilege and the snoop hint (theory 9). The format encodes what it can and says
/// what it rounded in [`PteFormat::effective_prot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prot {
    /// The device may read (DMA to the device).
    pub read: bool,
    /// The device may write (DMA from the device).
    pub write: bool,
    /// Memory type of the mapped range.
    pub mem: MemType,
    /// Only privileged requests may use the entry (Arm `AP[1]` = 0); unprivileged ones fault.
    /// Formats without a privilege bit (VT-d second level) drop it.
    pub privileged: bool,
    /// Every access snoops the CPU caches whatever the request's PCIe No Snoop attribute
    /// says (VT-d SNP, only on a unit with ECAP.SC: elsewhere the bit is reserved). Only for
    /// [`MemType::Normal`]: formats drop it on device memory. Formats without such a bit (Arm
    /// stage 1, where a cacheable inner-shareable type is already snooped) drop it.
    pub force_snoop: bool,
}

impl Prot {
    /// Read only, normal memory.
    pub const READ: Prot = Prot::rw(true, false);
    /// Write only, normal memory (a format that cannot express it grants read too; see the
    /// format).
    pub const WRITE: Prot = Prot::rw(false, true);
    /// Read and write, normal memory.
    pub const READ_WRITE: Prot = Prot::rw(true, true);

    /// The given rights on normal memory, unprivileged, no forced snoop.
    pub const fn rw(read: bool, write: bool) -> Prot {
        Prot { read, write, mem: MemType::Normal, privileged: false, force_snoop: false }
    }

    /// The same rights with memory type `mem`.
    pub const fn with_mem(self, mem: MemType) -> Prot {
        Prot { mem, ..self }
    }

    /// The same, usable by privileged requests only (`privileged`).
    pub const fn with_privileged(self, privileged: bool) -> Prot {
        Prot { privileged, ..self }
    }
}
