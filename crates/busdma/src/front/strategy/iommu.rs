//! What the IOMMU strategies need from a domain, and how they lay a load out in IOVA space.
//!
//! # Theory
//!
//! 1. **The domain interface.** [`IommuOps`] is the part of an IOMMU domain the front end
//!    uses: allocate and free IOVA, map a run of pages with the direction's rights, unmap a
//!    list of ranges with *one* invalidation (strict) or one queued entry (deferred), wait for
//!    an unmap's invalidation, and reserve the table levels of a range. `busdma::iommu`'s
//!    domain implements it; a strategy is generic over it, so the hot path stays monomorphic.
//! 2. **Layout.** A load's runs are laid out in one IOVA window by [`layout`]: a run that
//!    continues the previous one in physical space continues it in IOVA space (sharing its
//!    partly used page); any other run starts on a fresh IOVA page at its own page offset
//!    (an IOMMU maps pages, so the offset within the page cannot change), on a multiple of the
//!    tag's alignment when that exceeds a page and the run starts a page. A peer BAR with a
//!    bypass bus address takes no IOVA. The layout is a pure function of the runs, so
//!    strategies run it once to size the window, once to build segments and once to map,
//!    without storing anything per run. [`Layout::place`] is the rule for one run; [`layout`]
//!    calls a closure back with each run's place, a caller with more per-run work calls
//!    `place` in its own loop (inlined there: no call per run).
//! 3. **Waste bound.** A run starts a fresh page only when the previous run ended mid-page
//!    (or at a gap the alignment demands), and then it also starts a new segment; so a load of
//!    `s` segments needs at most `max_size + s × max(PAGE_SIZE, alignment)` bytes of IOVA. This
//!    is the size of `iommu-reserved`'s window.
//! 4. **Untrusted devices** must not see the rest of a page they were given part of: a
//!    sub-page run for an untrusted tag goes to the bounce hook.
//! 6. **Memory type** (format apart from policy: the strategy chooses, the format encodes).
//!    [`mem_type`] is the one rule: MMIO and peer-BAR runs are mapped as
//!    [`MemType::Device`], everything else (RAM with or without a page or a kernel mapping)
//!    as [`MemType::Normal`]. Two runs of different types never share an IOVA page in the
//!    layout (theory 2 continues a run only in the same type), so every page has one type.
//!    [`prot_of`] adds the direction's rights and the tag's privilege
//!    ([`TagFlags::privileged`]): privileged-only entries where the format has the bit (Arm
//!    `AP[1]`), a refused load where it has not (VT-d second level: never an unprivileged
//!    mapping of memory the driver asked to protect). Identity pages are shared by every
//!    load, so identity strategies refuse privileged tags; without an IOMMU there is nothing
//!    to enforce it, so `Direct` refuses them too. No format here has a weak-ordering bit
//!    (relaxed ordering is a PCIe request attribute the device sets, not an entry's).
//!    There is no "skip CPU sync" load attribute (Linux's `DMA_ATTR_SKIP_CPU_SYNC`): a load
//!    here never syncs by itself, syncs are the driver's explicit `sync` calls, so a driver
//!    that wants no CPU maintenance makes no call and such a flag would change nothing.
//! 5. **Coherence index** (seed 003). After mapping each range, the per-map and per-segment
//!    strategies tell the domain which CPU alias an IOMMU with a coherence index must keep
//!    coherent ([`IommuOps::set_coherence_index`], [`coherence_index`]): the run's kernel
//!    alias; for a page outside the direct map, whose kernel aliases are quick-map windows all
//!    of the page's physical colour ([`Platform::quick_map`]), its physical address read as a
//!    virtual index, which has those windows' colour; the untouched line for a run with
//!    neither a page nor a kernel mapping. Identity mappings are shared
//!    between loads, so they carry no per-load index.
#![deny(unsafe_code)] // the `IommuOps` trait only: its answers are trusted, its mapping calls unsafe

use crate::addr::{AddrRange, Iova, KernVa, PAGE_SIZE, PhysAddr};
use crate::error::Result;
use crate::iommu::{CoherenceIndex, PinnedRun};
use crate::pgtable::{LeafWindow, MemType, Prot};
use crate::platform::{CpuGuard, Platform};

use super::{BounceReason, Invalidation, bounce_hook};
use crate::dir::Direction;
use crate::front::load::{MemKind, Run};
use crate::front::spec::{TagFlags, TagSpec};

/// The domain operations the IOMMU strategies use (theory 1).
///
/// # Execution context
///
/// Every method runs with preemption disabled (the caller's [`CpuGuard`], which per-CPU IOVA
/// caches and table pools are indexed by; a strategy pins once per load or unload) and
/// concurrently from every CPU, for disjoint IOVA ranges; none sleeps.
///
/// # Safety
///
/// The strategies' unsafe calls trust the answers: an implementation's
/// [`IommuOps::alloc_iova`] returns a range of the requested size and alignment, at or below
/// the limit, that no other caller holds until it is freed; `map`, `unmap`, `ensure_flushed`
/// and `wait_unmapped` do what they say (a `wait_unmapped` or `ensure_flushed` that returns
/// `Ok` means the IOMMU can no longer use the translations concerned, and so does an
/// `is_flushed` that returns `true`); the IOVA it hands out is
/// the one space its `map` translates for the attached device.
#[allow(unsafe_code)]
pub unsafe trait IommuOps<P: Platform>: Send + Sync {
    /// Proof-of-unmap handle: pass it to [`IommuOps::ensure_flushed`] before reusing the IOVA.
    type Ticket: Copy + Send;

    /// The domain's invalidation mode.
    fn invalidation(&self) -> Invalidation;

    /// Highest IOVA the domain can map, inclusive (its page table's input width).
    fn max_iova(&self) -> u64;

    /// Allocates `size` bytes (page multiple) of IOVA aligned to `align`, ending at or below
    /// `limit` (inclusive).
    fn alloc_iova(&self, g: &CpuGuard<'_, P>, size: u64, align: u64, limit: u64) -> Result<AddrRange<Iova>>;

    /// Returns IOVA that was never mapped (or whose unmaps have been flushed).
    ///
    /// # Safety
    ///
    /// `range` came from this domain's [`IommuOps::alloc_iova`], is held by the caller, and
    /// nothing in it is mapped or awaits an invalidation.
    unsafe fn free_iova(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>);

    /// Maps `[iova, iova + len)` to `[pa, pa + len)` (page multiples) with the entry
    /// attributes `prot` ([`prot_of`]: the direction's rights, the run's memory type, the tag's
    /// privilege; theory 6). On error nothing it mapped translates any more.
    ///
    /// # Safety
    ///
    /// The caller holds `[iova, iova + len)` exclusively (from [`IommuOps::alloc_iova`], a
    /// window it reserved, or an identity range it counts), and may give the device
    /// `[pa, pa + len)` with the rights of `prot` until the range's unmap has been invalidated
    /// (the load source's promise).
    unsafe fn map(&self, g: &CpuGuard<'_, P>, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<()>;

    /// Unmaps every range of `mapped` with one invalidation (strict: complete on return;
    /// deferred: queued), then returns every range of `free` to the IOVA allocator once that
    /// invalidation has completed.
    ///
    /// Errors: the domain's (a range that is not mapped: a front-end bug); on error nothing
    /// was unmapped and nothing freed.
    ///
    /// # Safety
    ///
    /// The caller holds every range of `mapped` and of `free` exclusively (it mapped them, or
    /// allocated them), and gives up the ranges of `free`.
    unsafe fn unmap(
        &self,
        g: &CpuGuard<'_, P>,
        mapped: &[AddrRange<Iova>],
        free: &[AddrRange<Iova>],
    ) -> Result<Self::Ticket>;

    /// Waits until the invalidation of `ticket` has completed (flushing if needed).
    ///
    /// Errors: the IOMMU failed that invalidation ([`crate::Error::InvalidationFailed`]): the
    /// unmapped range must not be mapped again yet.
    fn ensure_flushed(&self, g: &CpuGuard<'_, P>, ticket: Self::Ticket) -> Result<()>;

    /// Waits until the invalidation of every unmap that returned before the call has
    /// completed (flushing if one is still queued): [`super::Strategy::wait_unmapped`].
    ///
    /// Errors: [`crate::Error::InvalidationFailed`], as for `ensure_flushed`.
    fn wait_unmapped(&self, g: &CpuGuard<'_, P>) -> Result<()>;

    /// Whether the invalidation of `ticket` has completed, without waiting or flushing: a
    /// two-step window's lazy commit polls it ([`crate::front::DmaWindow::commit_lazy`]).
    /// The default answers `false` (unknown), so a caller falls back to
    /// [`IommuOps::ensure_flushed`]; `true` is trusted (trait `# Safety`).
    fn is_flushed(&self, ticket: Self::Ticket) -> bool {
        let _ = ticket;
        false
    }

    /// Installs every intermediate table level over `range`, so later maps and unmaps inside
    /// it touch only leaf entries and never allocate.
    ///
    /// # Safety
    ///
    /// The caller holds `range` exclusively (a window it allocated).
    unsafe fn reserve_tables(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<()>;

    /// Pins the last-level tables of a reserved window (after or instead of
    /// [`IommuOps::reserve_tables`]), so loads into it go through
    /// [`IommuOps::map_pinned`] and [`IommuOps::unmap_pinned`]. `None`: the domain has no
    /// such path (the default, which reserves the table levels only); the caller maps with
    /// [`IommuOps::map`] and [`IommuOps::unmap`].
    ///
    /// # Safety
    ///
    /// The caller holds `range` exclusively (a window it allocated) and, if this returns a
    /// window, maps and unmaps inside `range` only through it until it frees the range.
    unsafe fn pin_window(&self, g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<Option<LeafWindow>> {
        // SAFETY: this function's contract covers `reserve_tables`'.
        unsafe { self.reserve_tables(g, range) }.map(|()| None)
    }

    /// Maps `runs` into the pinned window `lw`, as one `map` per run would; on error nothing
    /// of `runs` translates any more. The default (a domain whose `pin_window` never returns
    /// a window) refuses.
    ///
    /// # Safety
    ///
    /// `lw` came from this domain's [`IommuOps::pin_window`] and its window is the caller's;
    /// each run is a page range of the window with nothing mapped, and its physical range may
    /// be given to the device with its rights (as for [`IommuOps::map`]).
    unsafe fn map_pinned(&self, g: &CpuGuard<'_, P>, lw: &LeafWindow, runs: &[PinnedRun]) -> Result<()> {
        let _ = (g, lw, runs);
        Err(crate::Error::Unsupported { what: "pinned windows" })
    }

    /// Unmaps the runs mapped in `lw`, as [`IommuOps::unmap`] with no range to free. The
    /// default refuses (see [`IommuOps::map_pinned`]).
    ///
    /// # Safety
    ///
    /// As for [`IommuOps::map_pinned`]: `runs` are what the caller mapped in its window `lw`.
    unsafe fn unmap_pinned(
        &self,
        g: &CpuGuard<'_, P>,
        lw: &LeafWindow,
        runs: &[PinnedRun],
    ) -> Result<Self::Ticket> {
        let _ = (g, lw, runs);
        Err(crate::Error::Unsupported { what: "pinned windows" })
    }

    /// Programs the coherence index of the freshly mapped `range` (seed 003, see
    /// [`CoherenceIndex`]): strategies call it after each `map` with the kernel alias of the
    /// range's first page (for a page outside the direct map, its quick maps' colour), or
    /// [`CoherenceIndex::Untouched`] for memory with neither a page nor a kernel mapping.
    /// Domains whose IOMMU has no coherence index ignore it (the default).
    fn set_coherence_index(&self, range: AddrRange<Iova>, index: CoherenceIndex) {
        let _ = (range, index);
    }
}

/// A strategy whose loads go through an IOMMU domain, and that can lend that domain to a
/// two-step window ([`crate::front::window`]): `window_ops` returns the handle the strategy
/// maps with (a clone: a reference or a reference count), or [`crate::Error::Unsupported`]
/// when the tag has no IOMMU domain to reserve IOVA in (identity, pass-through).
///
/// Safe to implement: a window maps only memory it owns, so a handle to some other domain
/// would give that domain's device the window's owned buffers and nothing else.
pub trait WindowSource<P: Platform>: super::Strategy<P> {
    /// The domain handle a window keeps.
    type Ops: IommuOps<P> + Clone;

    /// The domain this strategy maps into.
    ///
    /// Errors: [`crate::Error::Unsupported`] (no domain).
    fn window_ops(&self) -> Result<Self::Ops>;
}

impl<P: Platform, D: IommuOps<P> + Clone> WindowSource<P> for super::IommuPerMap<D> {
    type Ops = D;
    fn window_ops(&self) -> Result<D> {
        Ok(self.0.clone())
    }
}

impl<P: Platform, D: IommuOps<P> + Clone> WindowSource<P> for super::IommuPerSegment<D> {
    type Ops = D;
    fn window_ops(&self) -> Result<D> {
        Ok(self.0.clone())
    }
}

/// The memory type a run is mapped with (theory 6): device memory for MMIO and peer BARs,
/// normal memory for everything else.
#[inline]
pub fn mem_type(kind: MemKind) -> MemType {
    match kind {
        MemKind::Mmio | MemKind::PeerBar { .. } => MemType::Device,
        MemKind::Page | MemKind::Mapped { .. } | MemKind::Unmapped => MemType::Normal,
    }
}

/// The entry attributes of a run loaded in direction `dir` through a tag with `flags`
/// (theory 6): the direction's rights, the run's memory type, privileged-only if the tag says
/// so.
#[inline]
pub fn prot_of(kind: MemKind, dir: Direction, flags: TagFlags) -> Prot {
    Prot::rw(dir.device_reads(), dir.device_writes())
        .with_mem(mem_type(kind))
        .with_privileged(flags.privileged)
}

/// Where [`layout`] puts one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// A peer BAR reached at this bus address, bypassing the IOMMU.
    Bypass(Iova),
    /// In the window.
    At {
        /// Offset of the run's first byte in the window.
        off: u64,
        /// Page-aligned offsets `[map_start, map_end)` this run newly needs mapped (empty
        /// when it lies within a page the previous run already mapped).
        map_start: u64,
        /// End of the pages to map.
        map_end: u64,
        /// Physical address that `map_start` maps to.
        pa: PhysAddr,
    },
}

#[inline]
fn page_up(x: u64) -> u64 {
    (x + (PAGE_SIZE - 1)) & !(PAGE_SIZE - 1)
}

/// Lays `runs` out in a window (theory 2); calls `f` for each run in order and returns the
/// window size needed (a page multiple).
#[inline]
pub fn layout(runs: &[Run], align: u64, mut f: impl FnMut(&Run, Place) -> Result<()>) -> Result<u64> {
    let mut l = Layout::new(align);
    for r in runs {
        f(r, l.place(r))?;
    }
    Ok(l.size())
}

/// [`layout`] one run at a time, for a caller whose per-run work is better inlined in its own
/// loop than called back (the reserved window's load: one call per run less). [`layout`] goes
/// through [`Layout::place`] too, so both lay runs out alike.
#[derive(Clone, Debug)]
pub struct Layout {
    align: u64,
    cursor: u64,
    mapped_to: u64,
    prev: Option<(u64, MemType)>,
}

impl Layout {
    /// An empty layout with window alignment `align`.
    #[inline]
    pub fn new(align: u64) -> Self {
        Self { align, cursor: 0, mapped_to: 0, prev: None }
    }

    /// The window size the runs placed so far need (a page multiple).
    #[inline]
    pub fn size(&self) -> u64 {
        page_up(self.cursor)
    }

    /// Places `r` after the runs placed so far (theory 2); call it for each run of the load in
    /// order.
    #[inline(always)]
    pub fn place(&mut self, r: &Run) -> Place {
        if let MemKind::PeerBar { bus: Some(b) } = r.kind {
            self.prev = None;
            return Place::Bypass(b);
        }
        let page_off = r.pa.page_offset();
        let mem = mem_type(r.kind);
        let off = if self.prev == Some((r.pa.raw(), mem)) {
            self.cursor
        } else {
            let mut s = page_up(self.cursor);
            if self.align > PAGE_SIZE && page_off == 0 {
                s = (s + (self.align - 1)) & !(self.align - 1);
            }
            s + page_off
        };
        let end = off + r.len;
        let map_start = (off & !(PAGE_SIZE - 1)).max(self.mapped_to);
        let map_end = page_up(end).max(map_start);
        // IOVA offset x maps PA `r.pa + x - off`; map_start ≥ off - page_off, so this does
        // not go below the run's first page.
        let pa = PhysAddr::new(r.pa.raw().wrapping_add(map_start).wrapping_sub(off));
        self.cursor = end;
        self.mapped_to = map_end;
        self.prev = Some((r.pa_end(), mem));
        Place::At { off, map_start, map_end, pa }
    }
}

/// The coherence index of the mapped bytes starting `delta` bytes after run `r`'s first byte
/// (negative: before it, in its first page): the kernel alias there; for a page outside the
/// direct map, its physical address as a virtual index (the colour of every quick-map window
/// of it, theory 5); the untouched line for a run without a page or a kernel mapping
/// (seed 003).
#[inline]
pub fn coherence_index(r: &Run, delta: i64) -> CoherenceIndex {
    match (r.kva, r.kind) {
        (Some(kva), _) => CoherenceIndex::Alias(KernVa::new(kva.raw().wrapping_add_signed(delta))),
        (None, MemKind::Page) => CoherenceIndex::Alias(KernVa::new(r.pa.raw().wrapping_add_signed(delta))),
        (None, _) => CoherenceIndex::Untouched,
    }
}

/// The untrusted-device check of theory 4.
#[inline]
pub fn check_untrusted(spec: &TagSpec, runs: &[Run]) -> Result<()> {
    // Mutant `untrusted-no-bounce` (qemu/run --mutants) skips this guard too, so that the
    // sub-page run it left unbounced (bounce/strategy.rs) reaches the device.
    if !spec.flags.untrusted || cfg!(busdma_mutant = "untrusted-no-bounce") {
        return Ok(());
    }
    for r in runs {
        let bypass = matches!(r.kind, MemKind::PeerBar { bus: Some(_) });
        if !bypass && (r.pa.page_offset() != 0 || r.pa_end() & (PAGE_SIZE - 1) != 0) {
            return Err(bounce_hook(r, BounceReason::UntrustedSubPage));
        }
    }
    Ok(())
}

/// Maps an IOVA-space builder error to the bounce hook (theory: only a misaligned run start
/// or a bypass address beyond the mask can fail there).
#[inline]
pub fn builder_error(r: &Run, e: crate::Error) -> crate::Error {
    match e {
        crate::Error::Misaligned { .. } => bounce_hook(r, BounceReason::Misaligned),
        crate::Error::OutOfRange { .. } => bounce_hook(r, BounceReason::BeyondMask),
        e => e,
    }
}

/// IOVA alignment of a window for `spec`: a page, or the tag's alignment if larger.
#[inline]
pub fn window_align(spec: &TagSpec) -> u64 {
    spec.alignment.max(PAGE_SIZE)
}

/// The inclusive IOVA limit for `spec` on a domain.
#[inline]
pub fn iova_limit<P: Platform, D: IommuOps<P>>(d: &D, spec: &TagSpec) -> u64 {
    spec.reach_limit().min(d.max_iova())
}

/// Pushes a mapped range onto `out`, merging it with the last one when adjacent. `out` has
/// room (its capacity bounds the runs of a load).
#[inline]
pub fn push_range(out: &mut alloc::vec::Vec<AddrRange<Iova>>, start: u64, end: u64) -> Result<()> {
    if start >= end {
        return Ok(());
    }
    if let Some(last) = out.last_mut() {
        if last.end().raw() == start {
            *last = AddrRange::new(last.start(), Iova::new(end))?;
            return Ok(());
        }
    }
    if out.len() == out.capacity() {
        return Err(crate::Error::LimitExceeded {
            what: "mapped ranges per load",
            requested: out.len() as u64 + 1,
            limit: out.capacity() as u64,
        });
    }
    out.push(AddrRange::new(Iova::new(start), Iova::new(end))?);
    Ok(())
}

/// Capacity of per-map range arrays: the map's run bound (map.rs theory 2).
#[inline]
pub fn max_runs(spec: &TagSpec) -> usize {
    (spec.max_segments as usize).saturating_add(spec.max_size.div_ceil(PAGE_SIZE) as usize).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn run(pa: u64, len: u64) -> Run {
        Run { pa: PhysAddr::new(pa), len, kind: MemKind::Page, kva: None }
    }

    fn places(runs: &[Run], align: u64) -> (Vec<Place>, u64) {
        let mut v = Vec::new();
        let total = layout(runs, align, |_, p| {
            v.push(p);
            Ok(())
        })
        .unwrap();
        (v, total)
    }

    #[test]
    fn a_run_keeps_its_page_offset_and_maps_its_pages() {
        let (v, total) = places(&[run(0x10_0800, 0x1000)], PAGE_SIZE);
        assert_eq!(
            v,
            [Place::At { off: 0x800, map_start: 0, map_end: 0x2000, pa: PhysAddr::new(0x10_0000) }]
        );
        assert_eq!(total, 0x2000);
    }

    #[test]
    fn a_physically_continuing_run_shares_the_partly_used_page() {
        let (v, total) = places(&[run(0x10_0800, 0x400), run(0x10_0c00, 0x800)], PAGE_SIZE);
        assert_eq!(
            v[1],
            Place::At { off: 0xc00, map_start: 0x1000, map_end: 0x2000, pa: PhysAddr::new(0x10_1000) }
        );
        assert_eq!(total, 0x2000);
    }

    #[test]
    fn other_runs_start_on_a_fresh_page_and_large_alignment_pads() {
        let (v, _) = places(&[run(0x10_0000, 0x100), run(0x30_0000, 0x100)], PAGE_SIZE);
        assert_eq!(
            v[1],
            Place::At { off: 0x1000, map_start: 0x1000, map_end: 0x2000, pa: PhysAddr::new(0x30_0000) }
        );
        let (v, total) = places(&[run(0x10_0000, 0x100), run(0x30_0000, 0x100)], 0x4000);
        assert_eq!(
            v[1],
            Place::At { off: 0x4000, map_start: 0x4000, map_end: 0x5000, pa: PhysAddr::new(0x30_0000) }
        );
        assert_eq!(total, 0x5000);
    }

    #[test]
    fn runs_of_different_memory_types_never_share_a_page() {
        let ram = run(0x10_0000, 0x800);
        let mmio = Run { pa: PhysAddr::new(0x10_0800), len: 0x800, kind: MemKind::Mmio, kva: None };
        let (v, total) = places(&[ram, mmio], PAGE_SIZE);
        assert_eq!(
            v[1],
            Place::At { off: 0x1800, map_start: 0x1000, map_end: 0x2000, pa: PhysAddr::new(0x10_0000) }
        );
        assert_eq!(total, 0x2000);
        assert_eq!(mem_type(MemKind::Mmio), MemType::Device);
        assert_eq!(mem_type(MemKind::PeerBar { bus: None }), MemType::Device);
        assert_eq!(mem_type(MemKind::Unmapped), MemType::Normal);
    }

    #[test]
    fn a_peer_bar_with_a_bus_address_takes_no_iova() {
        let bar = Run {
            pa: PhysAddr::new(0xf000_0000),
            len: 0x100,
            kind: MemKind::PeerBar { bus: Some(Iova::new(0x9000)) },
            kva: None,
        };
        let (v, total) = places(&[bar], PAGE_SIZE);
        assert_eq!(v, [Place::Bypass(Iova::new(0x9000))]);
        assert_eq!(total, 0);
    }
}
