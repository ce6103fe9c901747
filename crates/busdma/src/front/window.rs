//! Two-step mapping: reserve an IOVA window once, link owned buffers into it at chosen
//! offsets, invalidate once per batch (Linux's `dma_iova_try_alloc` / `dma_iova_link` /
//! `dma_iova_unlink` / `dma_iova_sync` / `dma_iova_destroy`, 2025).
//!
//! # Theory
//!
//! 1. **Why.** A per-I/O map pays an IOVA allocation, the page-table update and, on unmap,
//!    an IOTLB invalidation whose wait dominates on real hardware (about a microsecond on
//!    VT-d's queued interface). A driver that recycles a fixed set of buffer slots (a ring)
//!    needs none of the allocations, and can share one invalidation among many unmaps. A
//!    [`DmaWindow`] is that: an IOVA range allocated once from the tag's domain, with every
//!    table level over it installed at creation, so a link writes leaf entries only and
//!    never allocates.
//! 2. **Objects.** [`Tag::create_window`] reserves `size` bytes (a page multiple) in the
//!    domain of a tag whose strategy has one ([`WindowSource`]), aligned to the tag's
//!    alignment, below its DMA mask (and its exclusion window's `lowaddr`), and, when the
//!    window fits one boundary window, inside one. The window owns the range: it is freed
//!    when the window goes, after the proof of theory 5. [`DmaWindow::link`] maps an
//!    **owned** buffer ([`DmaBuffer`], the types [`super::OwnedMap`] takes) at a page-aligned
//!    offset with the direction's rights and keeps the buffer in the link's slot;
//!    [`DmaWindow::unlink`] marks a link for removal; [`DmaWindow::commit`] removes every
//!    marked link with one unmap (one ranged invalidation of the batch's hull under strict
//!    invalidation; one queued entry and one forced flush under deferred) and only then hands
//!    the buffers back. Borrowed memory is never linked: a borrowed buffer could be freed by
//!    safe code (or its borrow ended by `mem::forget`) while the device still reaches it.
//! 3. **What the device sees.** A link's buffer occupies `[offset, offset + pages)` of the
//!    window; its first byte is at `base + offset + (pa mod PAGE_SIZE)`, and its bytes are
//!    contiguous there: every run of the buffer either continues the previous one in
//!    physical memory or starts a page where the previous one ended a page (a run that would
//!    leave a hole is refused). A link is one bus segment and must satisfy the tag: start
//!    on its alignment, no longer than its maximum segment size, not crossing its boundary.
//!    Untrusted tags link whole pages only (the device must not see the rest of a page).
//!    Device memory (MMIO, peer BARs) is refused: map it with a map, whose strategy counts
//!    loads that reach registered peers.
//! 4. **Batching.** A link needs no invalidation: the entries it writes were not present,
//!    and an IOTLB caches only present entries (VT-d without caching mode, Arm LPAE). On an
//!    IOMMU that caches not-present entries (VT-d caching mode) the domain's `map`
//!    invalidates after each link; the batch sharing of theory 2 then covers unlinks only. An
//!    unlink changes nothing at once: the link stays mapped, its pages stay taken, and the
//!    buffer stays in the window until the batch's commit has invalidated; a link over a
//!    marked link is refused like any overlap. So a batch of `n` unlinks costs one
//!    invalidation (`n` ranges cleared, one command for their hull).
//! 5. **Nothing is given back before the hardware has forgotten it** (the quarantine rule of
//!    [`super::quarantine`]). `commit` hands a buffer out only after the invalidation that
//!    covers its unmap completed (strict: the unmap's own; deferred: the flush it forces). If
//!    the IOMMU fails it ([`Error::InvalidationFailed`], returned by `commit`), the batch's
//!    links are cleared but not proven unreachable: they become *held* (pages still taken,
//!    buffers still in the window) and the next `commit` (or [`DmaWindow::reclaim`]) first
//!    asks the domain for the proof ([`IommuOps::wait_unmapped`], the recovery of a degraded
//!    domain); held buffers come back with it. A link that fails part-way undoes what it
//!    mapped the same way; if that undo cannot be proven, its buffer is held too. Under
//!    deferred invalidation `commit` forces the flush that proves its batch (one
//!    whole-domain invalidation per batch); [`DmaWindow::commit_lazy`] does not: the batch's
//!    unmap is queued with a ticket, its links *retire* (pages still taken, buffers still in
//!    the window), and a later lazy commit hands back those whose ticket a finished flush
//!    covers ([`IommuOps::is_flushed`], no waiting): the domain's own bounds (a full queue,
//!    the age limit) retire them at no extra invalidation. The IOVA is
//!    freed only when the window goes, after one last proof; without it the range is leaked
//!    (never reused) and the buffers go to the tag's quarantine (never freed before a proof).
//! 6. **Forgetting.** `mem::forget` of a window leaks it with its buffers, its mappings and its
//!    tag handle (which keeps the domain attached): the device keeps reaching memory that no
//!    one will ever free or reuse, as with [`super::OwnedMap`].
//! 7. **Bookkeeping.** One `u32` per window page names the link occupying it (0: free), and
//!    links live in a slab sized at creation (`max_links`) with a free list, so a link costs
//!    O(its pages) checks and no search, and nothing on the link/unlink/commit path
//!    allocates. The CPU reaches a linked buffer by copy ([`DmaWindow::buffer`]), never by
//!    reference to device-visible bytes; cache maintenance is [`DmaWindow::sync`].
//!
//! ## Example
//!
//! A transmit ring of 256 one-page slots, one invalidation per batch of 32 completions:
//!
//! ```
//! use busdma::front::{Direction, DmaMemory, IommuOps, IommuPerMap, SyncOp, Tag};
//! use busdma::{MemAttr, PAGE_SIZE, Platform};
//! # fn demo<'p, P: Platform, D: IommuOps<P> + Clone>(p: &'p P, tag: &Tag<'p, P, IommuPerMap<D>>) -> busdma::Result<()> {
//! let mut ring = tag.create_window::<DmaMemory<'p, P>>(256 * PAGE_SIZE, 256)?;
//! let mut free: Vec<DmaMemory<'p, P>> = Vec::new();
//! for _ in 0..32 {
//!     free.push(DmaMemory::alloc(p, tag.spec(), PAGE_SIZE, MemAttr::WriteBack)?);
//! }
//! for slot in 0..32u64 {
//!     let buf = free.pop().unwrap();
//!     buf.write(0, b"packet")?;
//!     let at = ring.link(slot * PAGE_SIZE, buf, Direction::ToDevice).map_err(|e| e.error)?;
//!     ring.sync(slot * PAGE_SIZE, SyncOp::PREWRITE)?;
//!     // ... post `at.iova`, `at.len` to the device ...
//! #   let _ = at;
//! }
//! // Completions: mark each sent slot, then one invalidation hands the buffers back.
//! for slot in 0..32u64 {
//!     ring.unlink(slot * PAGE_SIZE)?;
//! }
//! ring.commit(|_offset, buf| free.push(buf))?;
//! assert_eq!(free.len(), 32);
//! # Ok(()) }
//! ```
//!
//! # Execution context
//!
//! `create_window` allocates (the slab, the page index, table levels) and never sleeps.
//! `link`, `unlink`, `commit` and `sync` never allocate or sleep and may run with preemption
//! disabled (they pin a CPU themselves); `commit` and dropping the window spin while an
//! invalidation completes.
#![deny(unsafe_code)] // allowed on four functions (`create_window`, `try_link`, `commit_inner`,
// `teardown`), whose blocks call `IommuOps`' unsafe IOVA and mapping methods

use alloc::vec::Vec;

use crate::addr::{AddrRange, Iova, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::platform::Platform;

use super::cache_sync::{SyncOp, SyncStats, sync_runs};
use super::load::{MemKind, Run};
use super::map::Direction;
use super::owned::DmaBuffer;
use super::strategy::iommu::{IommuOps, WindowSource, check_untrusted, iova_limit, max_runs, window_align};
use super::strategy::per_map::map_runs;
use super::tag::Tag;

/// Where a link's buffer is: its first byte's bus address and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linked {
    /// Bus address of the buffer's first byte.
    pub iova: Iova,
    /// Length of the buffer in bytes (the device reaches `[iova, iova + len)`).
    pub len: u64,
}

/// A failed [`DmaWindow::link`]: the error, and the buffer unless the window had to hold it
/// (theory 5: the undo of a part-way link could not be proven; it comes back from a later
/// [`DmaWindow::commit`] or [`DmaWindow::reclaim`]).
pub struct LinkError<B> {
    /// What went wrong.
    pub error: Error,
    /// The buffer, given back; `None` when it is held.
    pub buffer: Option<B>,
}

impl<B> core::fmt::Debug for LinkError<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LinkError")
            .field("error", &self.error)
            .field("buffer", &self.buffer.is_some())
            .finish()
    }
}

/// Counters of a window (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowStats {
    /// Links made.
    pub links: u64,
    /// Links refused (nothing mapped, buffer given back or held).
    pub refused: u64,
    /// Unlinks marked.
    pub unlinks: u64,
    /// Commits that unmapped a batch (one invalidation each).
    pub batches: u64,
    /// Links live now (linked or marked).
    pub live: u64,
    /// Links held now for lack of a proof (theory 5).
    pub held: u64,
    /// Links cleared by a lazy commit whose queued invalidation has not been seen complete.
    pub retiring: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Linked,
    /// Marked by `unlink`, still mapped: removed by the next commit.
    Unlinking,
    /// Cleared, invalidation not proven: waits for a proof.
    Held,
    /// Cleared by a lazy commit, its invalidation queued (deferred): waits for the flush its
    /// ticket names.
    Retiring,
}

struct Slot<B, T> {
    off: u64,
    pages: u64,
    dir: Direction,
    state: State,
    buf: Option<B>,
    /// A `Retiring` slot's ticket.
    ticket: Option<T>,
}

/// An IOVA window that owns the buffers linked into it (module theory).
///
/// # Invariants
///
/// `range` was allocated from `ops` for this window and has every table level installed;
/// `owner[i]` is `k + 1` exactly when window page `i` belongs to slot `k`, whose state is not
/// `Free` and whose `buf` is `Some`, and `LEAKED` for a page taken for good (a refused undo); a `Linked` or `Unlinking` slot's pages are mapped to its
/// buffer, a `Held` slot's pages are cleared but their invalidation is not proven; `pending`
/// holds the ranges of the `Unlinking` slots listed in `pending_slots`.
pub struct DmaWindow<'p, P: Platform, S: WindowSource<P>, B: DmaBuffer<'p, P>> {
    tag: Tag<'p, P, S>,
    ops: S::Ops,
    range: AddrRange<Iova>,
    owner: Vec<u32>,
    slots: Vec<Slot<B, <S::Ops as IommuOps<P>>::Ticket>>,
    free_slots: Vec<u32>,
    pending: Vec<AddrRange<Iova>>,
    pending_slots: Vec<u32>,
    held_slots: Vec<u32>,
    retiring_slots: Vec<u32>,
    runs: Vec<Run>,
    mapped: Vec<AddrRange<Iova>>,
    stats: WindowStats,
    /// Torn down (`destroy`): the drop does nothing more.
    done: bool,
}

/// What a refused link left of its pages.
enum Fate {
    /// Nothing mapped, or the undo proven: the buffer comes back.
    Untouched,
    /// This many pages cleared, their invalidation not proven: the buffer is held.
    Held(u64),
    /// This many pages possibly still mapped (the undo was refused): taken for good, the
    /// buffer leaked.
    Leaked(u64),
}

/// An owner-index entry for pages that stay taken for good (a refused undo: they may still be
/// mapped); no slot has this number.
const LEAKED: u32 = u32::MAX;

fn reserve<T>(v: &mut Vec<T>, n: usize) -> Result<()> {
    v.try_reserve_exact(n).map_err(|_| Error::NoMemory {
        requested: (n as u64).saturating_mul(core::mem::size_of::<T>() as u64),
    })
}

impl<'p, P: Platform, S: WindowSource<P>> Tag<'p, P, S> {
    /// Reserves a two-step window of `size` bytes (a page multiple) in the tag's domain, for
    /// at most `max_links` buffers linked at once (theory 2).
    ///
    /// Errors: [`Error::ZeroSize`]; [`Error::Misaligned`] (`size` not a page multiple);
    /// [`Error::InvalidArgument`] (`max_links` zero or above the window's pages);
    /// [`Error::Unsupported`] (the tag's strategy has no IOMMU domain); those of the domain's
    /// IOVA allocation ([`Error::Exhausted`]) and table reservation ([`Error::NoMemory`]);
    /// nothing is left allocated.
    #[allow(unsafe_code)] // the domain's IOVA, table and mapping calls
    pub fn create_window<B: DmaBuffer<'p, P>>(
        &self,
        size: u64,
        max_links: usize,
    ) -> Result<DmaWindow<'p, P, S, B>> {
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        if size % PAGE_SIZE != 0 {
            return Err(Error::Misaligned { value: size, align: PAGE_SIZE });
        }
        let pages = size / PAGE_SIZE;
        if max_links == 0 || max_links as u64 > pages || max_links > u32::MAX as usize - 1 {
            return Err(Error::InvalidArgument {
                what: "window max_links (1 ..= the window's pages)",
                value: max_links as u64,
            });
        }
        let npages = usize::try_from(pages).map_err(|_| Error::BadSize { size, limit: usize::MAX as u64 })?;
        let ops = self.strategy.window_ops()?;
        let spec = &self.spec;
        let mut owner = Vec::new();
        reserve(&mut owner, npages)?;
        owner.resize(npages, 0u32);
        let mut slots = Vec::new();
        reserve(&mut slots, max_links)?;
        let mut free_slots = Vec::new();
        reserve(&mut free_slots, max_links)?;
        free_slots.extend((0..max_links as u32).rev());
        let mut pending = Vec::new();
        reserve(&mut pending, max_links)?;
        let mut pending_slots = Vec::new();
        reserve(&mut pending_slots, max_links)?;
        let mut held_slots = Vec::new();
        reserve(&mut held_slots, max_links)?;
        let mut retiring_slots = Vec::new();
        reserve(&mut retiring_slots, max_links)?;
        let nruns = max_runs(spec);
        let mut runs = Vec::new();
        reserve(&mut runs, nruns)?;
        let mut mapped = Vec::new();
        reserve(&mut mapped, nruns)?;
        // A window that fits one boundary window is placed inside one: aligned to its size
        // rounded up to a power of two, which is at most the boundary.
        let mut align = window_align(spec);
        if spec.boundary != 0 && size <= spec.boundary {
            align = align.max(size.next_power_of_two());
        }
        let g = self.platform.pin_cpu();
        let range = ops.alloc_iova(&g, size, align, iova_limit(&ops, spec))?;
        // SAFETY: `range` came from `alloc_iova` just now and is this window's.
        if let Err(e) = unsafe { ops.reserve_tables(&g, range) } {
            // SAFETY: this window's range, nothing mapped in it.
            unsafe { ops.free_iova(&g, range) };
            return Err(e);
        }
        drop(g);
        // INVARIANT: the range is the window's, its levels installed; no page taken.
        Ok(DmaWindow {
            tag: self.clone(),
            ops,
            range,
            owner,
            slots,
            free_slots,
            pending,
            pending_slots,
            held_slots,
            retiring_slots,
            runs,
            mapped,
            stats: WindowStats::default(),
            done: false,
        })
    }
}

impl<'p, P: Platform, S: WindowSource<P>, B: DmaBuffer<'p, P>> DmaWindow<'p, P, S, B> {
    /// The window's IOVA range.
    pub fn iova(&self) -> AddrRange<Iova> {
        self.range
    }

    /// The window's size in bytes.
    pub fn size(&self) -> u64 {
        self.range.len()
    }

    /// The tag the window came from.
    pub fn tag(&self) -> &Tag<'p, P, S> {
        &self.tag
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> WindowStats {
        self.stats
    }

    /// The buffer linked at `offset` (linked, marked or held), reached by copy
    /// ([`super::DmaMemory::read`]), never by reference to device-visible bytes.
    pub fn buffer(&self, offset: u64) -> Option<&B> {
        let k = self.slot_at(offset).ok()?;
        self.slots[k].buf.as_ref()
    }

    /// The slot whose link starts at `offset`.
    fn slot_at(&self, offset: u64) -> Result<usize> {
        if offset % PAGE_SIZE != 0 {
            return Err(Error::Misaligned { value: offset, align: PAGE_SIZE });
        }
        let page = offset / PAGE_SIZE;
        let id =
            *self.owner.get(page as usize).ok_or(Error::OutOfRange { addr: offset, limit: self.size() })?;
        match id.checked_sub(1).map(|k| k as usize) {
            Some(k) if self.slots.get(k).is_some_and(|s| s.off == offset && s.state != State::Free) => Ok(k),
            _ => Err(Error::NotMapped { addr: offset }),
        }
    }

    /// Collects `buf`'s runs into `self.runs` and checks them (theory 3); returns the page
    /// offset of the first byte and the buffer's length.
    fn collect(&mut self, buf: &B) -> Result<(u64, u64)> {
        self.runs.clear();
        let p = self.tag.platform;
        let runs = &mut self.runs;
        buf.for_each_run(p, &mut |r: Run| {
            if matches!(r.kind, MemKind::Mmio | MemKind::PeerBar { .. }) {
                return Err(Error::Unsupported { what: "device memory (MMIO, peer BAR) in a two-step window: load it into a map" });
            }
            if let Some(prev) = runs.last() {
                let continues = prev.pa_end() == r.pa.raw() && prev.kind == r.kind;
                if !continues && (prev.pa_end() % PAGE_SIZE != 0 || r.pa.page_offset() != 0) {
                    return Err(Error::InvalidArgument {
                        what: "window link: a run that neither continues the previous one nor starts a page where it ended one (a hole in the bus range)",
                        value: runs.len() as u64,
                    });
                }
            }
            if runs.len() == runs.capacity() {
                return Err(Error::LimitExceeded { what: "runs per window link", requested: runs.len() as u64 + 1, limit: runs.capacity() as u64 });
            }
            runs.push(r);
            Ok(())
        })?;
        let first = self.runs.first().ok_or(Error::ZeroSize)?;
        let page_off = first.pa.page_offset();
        let mut len = 0u64;
        for r in &self.runs {
            len = len.checked_add(r.len).ok_or(Error::Overflow { base: len, len: r.len })?;
        }
        check_untrusted(&self.tag.spec, &self.runs)?;
        Ok((page_off, len))
    }

    /// Maps the owned `buf` at `offset` (a page multiple) of the window for a transfer in
    /// direction `dir`, keeping it in the window until it is unlinked and committed (theory
    /// 2, 3). No invalidation (theory 4), no allocation.
    ///
    /// Errors (nothing mapped, the buffer given back): [`Error::Misaligned`] (`offset` not a
    /// page multiple, or the first byte's bus address not on the tag's alignment: `value` is
    /// the address); [`Error::OutOfRange`] (`addr`: the end offset the buffer needs, `limit`:
    /// the window's size); [`Error::AlreadyMapped`] (`addr`: the offset of the first page
    /// already taken by a link, marked or held); [`Error::LimitExceeded`] (`max_links` links
    /// live); [`Error::BadSize`] (longer than the tag's maximum segment size);
    /// [`Error::InvalidArgument`] (a hole between runs, or the link would cross the tag's
    /// boundary); [`Error::Unsupported`] (device memory; a sub-page run on an untrusted tag);
    /// those of the domain's map. If undoing a part-way map cannot be proven, the buffer is
    /// held (`buffer: None`, theory 5).
    pub fn link(
        &mut self,
        offset: u64,
        buf: B,
        dir: Direction,
    ) -> core::result::Result<Linked, LinkError<B>> {
        match self.try_link(offset, &buf, dir) {
            Ok((linked, pages)) => {
                let Some(k) = self.free_slots.pop() else {
                    // Checked in `try_link`; unreachable, but never a panic in a map path.
                    return Err(LinkError {
                        error: Error::BadState { what: "window slab" },
                        buffer: Some(buf),
                    });
                };
                self.take_pages(offset, pages, k);
                let slot =
                    Slot { off: offset, pages, dir, state: State::Linked, buf: Some(buf), ticket: None };
                if (k as usize) < self.slots.len() {
                    self.slots[k as usize] = slot;
                } else {
                    self.slots.push(slot); // within the capacity reserved at creation
                }
                self.stats.links += 1;
                self.stats.live += 1;
                Ok(linked)
            }
            Err((error, Fate::Untouched)) => {
                self.stats.refused += 1;
                Err(LinkError { error, buffer: Some(buf) })
            }
            Err((error, Fate::Leaked(pages))) => {
                self.stats.refused += 1;
                let first = (offset / PAGE_SIZE) as usize;
                for o in self.owner.iter_mut().skip(first).take(pages as usize) {
                    *o = LEAKED;
                }
                core::mem::forget(buf);
                Err(LinkError { error, buffer: None })
            }
            Err((error, Fate::Held(pages))) => {
                // A part-way map whose undo is not proven: hold the buffer (theory 5).
                self.stats.refused += 1;
                match self.free_slots.pop() {
                    Some(k) => {
                        self.take_pages(offset, pages, k);
                        let slot = Slot {
                            off: offset,
                            pages,
                            dir,
                            state: State::Held,
                            buf: Some(buf),
                            ticket: None,
                        };
                        if (k as usize) < self.slots.len() {
                            self.slots[k as usize] = slot;
                        } else {
                            self.slots.push(slot);
                        }
                        self.held_slots.push(k);
                        self.stats.held += 1;
                        self.stats.live += 1;
                    }
                    // Unreachable (checked before mapping); the tag's quarantine keeps it.
                    None => buf.quarantine(&mut |mem| self.tag.quarantine.hold(mem)),
                }
                Err(LinkError { error, buffer: None })
            }
        }
    }

    fn take_pages(&mut self, offset: u64, pages: u64, k: u32) {
        let first = (offset / PAGE_SIZE) as usize;
        for o in &mut self.owner[first..first + pages as usize] {
            *o = k + 1;
        }
    }

    fn free_pages(&mut self, k: usize) {
        let first = (self.slots[k].off / PAGE_SIZE) as usize;
        let pages = self.slots[k].pages as usize;
        for o in &mut self.owner[first..first + pages] {
            *o = 0;
        }
    }

    /// The checks and the mapping of `link`. Errors: the error and what became of the
    /// link's pages.
    #[allow(unsafe_code)] // the domain's IOVA, table and mapping calls
    fn try_link(
        &mut self,
        offset: u64,
        buf: &B,
        dir: Direction,
    ) -> core::result::Result<(Linked, u64), (Error, Fate)> {
        if offset % PAGE_SIZE != 0 {
            return Err((Error::Misaligned { value: offset, align: PAGE_SIZE }, Fate::Untouched));
        }
        if self.free_slots.is_empty() {
            let n = self.slots.capacity() as u64;
            return Err((
                Error::LimitExceeded { what: "links per window", requested: n + 1, limit: n },
                Fate::Untouched,
            ));
        }
        let (page_off, len) = self.collect(buf).map_err(|e| (e, Fate::Untouched))?;
        let span = page_off.checked_add(len).and_then(|s| s.checked_next_multiple_of(PAGE_SIZE));
        let end = span.and_then(|s| offset.checked_add(s));
        let size = self.size();
        let (span, end) = match (span, end) {
            (Some(s), Some(e)) if e <= size => (s, e),
            _ => {
                return Err((
                    Error::OutOfRange {
                        addr: offset.saturating_add(page_off).saturating_add(len),
                        limit: size,
                    },
                    Fate::Untouched,
                ));
            }
        };
        let spec = &self.tag.spec;
        let iova = self.range.start().raw() + offset + page_off;
        if spec.alignment > 1 && iova % spec.alignment != 0 {
            return Err((Error::Misaligned { value: iova, align: spec.alignment }, Fate::Untouched));
        }
        if len > spec.max_segment_size {
            return Err((Error::BadSize { size: len, limit: spec.max_segment_size }, Fate::Untouched));
        }
        if spec.boundary != 0 && (iova / spec.boundary) != ((iova + len - 1) / spec.boundary) {
            return Err((
                Error::InvalidArgument {
                    what: "window link crossing the tag's boundary (bus address)",
                    value: iova,
                },
                Fate::Untouched,
            ));
        }
        let first = (offset / PAGE_SIZE) as usize;
        let pages = span / PAGE_SIZE;
        if let Some(i) = self.owner[first..(end / PAGE_SIZE) as usize].iter().position(|&o| o != 0) {
            return Err((Error::AlreadyMapped { addr: offset + i as u64 * PAGE_SIZE }, Fate::Untouched));
        }
        let base = self.range.start().raw() + offset;
        let g = self.tag.platform.pin_cpu();
        // SAFETY: `[base, base + span)` is inside this window (checked above), which the
        // window holds exclusively (allocated at creation, never freed while it lives), and
        // no page of it is taken (the owner index above), so nothing is mapped there and no
        // unmap of it awaits an invalidation (a marked or held link keeps its pages taken
        // until its invalidation is proven); the runs are those of `buf`, an owned buffer the
        // window keeps until the invalidation of its unmap is proven (theory 5), or device
        // memory refused by `collect`. The layout at page alignment places them contiguously
        // from `page_off` (runs checked contiguous), within `span`.
        let r = unsafe {
            map_runs(&self.ops, &g, &self.runs, PAGE_SIZE, base, dir, self.tag.spec.flags, &mut self.mapped)
        };
        match r {
            Ok(()) => Ok((Linked { iova: Iova::new(iova), len }, pages)),
            Err(e) => {
                if self.mapped.is_empty() {
                    return Err((e, Fate::Untouched));
                }
                // SAFETY: the ranges just mapped by this call, in this window.
                let undo = unsafe { self.ops.unmap(&g, &self.mapped, &[]) }
                    .and_then(|t| self.ops.ensure_flushed(&g, t));
                self.mapped.clear();
                match undo {
                    Ok(()) => Err((e, Fate::Untouched)),
                    // Cleared, not proven: held until a proof (theory 5).
                    Err(Error::InvalidationFailed { .. }) => Err((e, Fate::Held(pages))),
                    // The undo itself was refused (a bookkeeping bug): the pages may still be
                    // mapped, so they stay taken for good and the buffer is leaked, never
                    // given back.
                    Err(_) => Err((e, Fate::Leaked(pages))),
                }
            }
        }
    }

    /// Marks the link at `offset` for removal by the next [`DmaWindow::commit`] (theory 4):
    /// nothing changes for the device yet, and the buffer stays in the window.
    ///
    /// Errors (nothing changes): [`Error::Misaligned`] (`offset` not a page multiple);
    /// [`Error::OutOfRange`] (beyond the window); [`Error::NotMapped`] (no link starts at
    /// `offset`); [`Error::BadState`] (already marked, or held).
    pub fn unlink(&mut self, offset: u64) -> Result<()> {
        let k = self.slot_at(offset)?;
        if self.slots[k].state != State::Linked {
            return Err(Error::BadState {
                what: "unlink of a window link already unlinked (marked or held)",
            });
        }
        let start = self.range.start().raw() + offset;
        let r = AddrRange::new(Iova::new(start), Iova::new(start + self.slots[k].pages * PAGE_SIZE))?;
        // Capacity: one range per slot, at most `max_links` slots (reserved at creation).
        if self.pending.len() == self.pending.capacity() {
            return Err(Error::BadState { what: "window batch full" });
        }
        self.pending.push(r);
        self.pending_slots.push(k as u32);
        self.slots[k].state = State::Unlinking;
        self.stats.unlinks += 1;
        Ok(())
    }

    /// Ends the batch: unmaps every link marked since the last commit with one unmap (one
    /// invalidation; under deferred invalidation one queued entry and the flush this call
    /// forces), then gives each buffer to `back` with its offset, in unlink order (theory 4,
    /// 5). Held links whose proof now succeeds, and links a lazy commit left retiring, come
    /// back first. Returns how many buffers came back.
    ///
    /// Errors: [`Error::InvalidationFailed`]: the buffers are not given back; the batch's
    /// links are held until a later commit or [`DmaWindow::reclaim`] obtains the proof (the
    /// batch is unmapped whatever the earlier links' proof did). Other errors of the domain's
    /// unmap (a bookkeeping bug): nothing more is given back, the batch stays marked.
    pub fn commit(&mut self, mut back: impl FnMut(u64, B)) -> Result<usize> {
        self.commit_inner(&mut back, true)
    }

    /// [`DmaWindow::commit`] without waiting (theory 5, deferred invalidation): the batch is
    /// unmapped with one queued entry, and its buffers come back from a later `commit_lazy`
    /// (or `commit`, `reclaim`) once a flush that covers them has finished: the domain's own
    /// bounds (queue full, age) or a forced flush. Under strict invalidation it is `commit`.
    /// Returns how many buffers came back.
    ///
    /// Errors: as [`DmaWindow::commit`].
    pub fn commit_lazy(&mut self, mut back: impl FnMut(u64, B)) -> Result<usize> {
        self.commit_inner(&mut back, false)
    }

    #[allow(unsafe_code)] // the domain's unmap
    fn commit_inner(&mut self, back: &mut impl FnMut(u64, B), forced: bool) -> Result<usize> {
        // Links held or retiring before this batch first (theory 5); whatever the outcome,
        // the batch is unmapped below, so a teardown never leaves a marked link mapped.
        let (mut n, mut first) = match self.release_held(back) {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e)),
        };
        match self.release_retiring(back, forced) {
            Ok(m) => n += m,
            Err(e) => first = first.or(Some(e)),
        }
        if !self.pending.is_empty() {
            let g = self.tag.platform.pin_cpu();
            // SAFETY: every pending range is a marked link's, mapped by this window in its
            // own range; the window keeps the IOVA (frees nothing).
            let r = unsafe { self.ops.unmap(&g, &self.pending, &[]) };
            let r = match r {
                Ok(t) if forced => self.ops.ensure_flushed(&g, t).map(|()| None),
                Ok(t) if self.ops.is_flushed(t) => Ok(None),
                Ok(t) => Ok(Some(t)),
                Err(e) => Err(e),
            };
            drop(g);
            self.stats.batches += 1;
            match r {
                Ok(None) => {
                    self.pending.clear();
                    for i in 0..self.pending_slots.len() {
                        let k = self.pending_slots[i] as usize;
                        n += self.give_back(k, back);
                    }
                    self.pending_slots.clear();
                }
                Ok(Some(t)) => {
                    // Queued: retiring until a flush covers the ticket.
                    self.pending.clear();
                    for &k in &self.pending_slots {
                        let slot = &mut self.slots[k as usize];
                        slot.state = State::Retiring;
                        slot.ticket = Some(t);
                        self.retiring_slots.push(k);
                        self.stats.retiring += 1;
                    }
                    self.pending_slots.clear();
                }
                Err(e @ Error::InvalidationFailed { .. }) => {
                    // Cleared, not proven: held (theory 5).
                    self.pending.clear();
                    for &k in &self.pending_slots {
                        self.slots[k as usize].state = State::Held;
                        self.held_slots.push(k);
                        self.stats.held += 1;
                    }
                    self.pending_slots.clear();
                    first = first.or(Some(e));
                }
                Err(e) => return Err(first.unwrap_or(e)),
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Gives back the retiring links whose invalidation has completed: all of them after one
    /// wait if `forced`, else those whose ticket a finished flush covers (no waiting).
    fn release_retiring(&mut self, back: &mut impl FnMut(u64, B), forced: bool) -> Result<usize> {
        if self.retiring_slots.is_empty() {
            return Ok(0);
        }
        if forced {
            // Every retiring link's unmap returned before this call.
            self.ops.wait_unmapped(&self.tag.platform.pin_cpu())?;
        }
        let (mut n, mut i) = (0, 0);
        while i < self.retiring_slots.len() {
            let k = self.retiring_slots[i] as usize;
            let done = forced || self.slots[k].ticket.is_some_and(|t| self.ops.is_flushed(t));
            if done {
                self.retiring_slots.swap_remove(i);
                self.slots[k].ticket = None;
                self.stats.retiring -= 1;
                n += self.give_back(k, back);
            } else {
                i += 1;
            }
        }
        Ok(n)
    }

    /// Asks for the proof for held links and gives their buffers to `back` (theory 5): for a
    /// kernel's retry timer after a failed commit; also gives back retiring links whose flush
    /// has finished (without forcing one). Returns how many came back; nothing to do (and no
    /// invalidation) when nothing is held.
    ///
    /// Errors: [`Error::InvalidationFailed`]: they stay held.
    pub fn reclaim(&mut self, mut back: impl FnMut(u64, B)) -> Result<usize> {
        let n = self.release_held(&mut back)?;
        Ok(n + self.release_retiring(&mut back, false)?)
    }

    fn release_held(&mut self, back: &mut impl FnMut(u64, B)) -> Result<usize> {
        if self.held_slots.is_empty() {
            return Ok(0);
        }
        self.ops.wait_unmapped(&self.tag.platform.pin_cpu())?;
        let mut n = 0;
        while let Some(k) = self.held_slots.pop() {
            self.stats.held -= 1;
            n += self.give_back(k as usize, back);
        }
        Ok(n)
    }

    /// Frees slot `k`'s pages and slot, gives its buffer to `back`: its unmap's invalidation
    /// is proven.
    fn give_back(&mut self, k: usize, back: &mut impl FnMut(u64, B)) -> usize {
        self.free_pages(k);
        let slot = &mut self.slots[k];
        slot.state = State::Free;
        let off = slot.off;
        self.free_slots.push(k as u32);
        self.stats.live -= 1;
        match slot.buf.take() {
            Some(b) => {
                back(off, b);
                1
            }
            None => 0,
        }
    }

    /// Makes the CPU's and the device's views of the buffer linked at `offset` agree
    /// (cache maintenance of its runs: [`super::cache_sync`]); on a coherent tag only the
    /// barriers.
    ///
    /// Errors: those of `unlink`'s lookup ([`Error::NotMapped`], ...); [`Error::BadState`]
    /// (the link is held); [`Error::InvalidArgument`] (an operation the link's direction
    /// does not allow).
    pub fn sync(&mut self, offset: u64, op: SyncOp) -> Result<SyncStats> {
        let k = self.slot_at(offset)?;
        let slot = &self.slots[k];
        if matches!(slot.state, State::Held | State::Retiring) {
            return Err(Error::BadState {
                what: "sync of a window link already unmapped (held or retiring)",
            });
        }
        if !slot.dir.allows(op) {
            return Err(Error::InvalidArgument {
                what: "sync operation for the link's direction",
                value: u64::from(op.bits()),
            });
        }
        let Some(buf) = slot.buf.as_ref() else {
            return Err(Error::BadState { what: "window link without its buffer" });
        };
        // The runs were checked at link time; collected again (no allocation: the window's
        // run array).
        self.runs.clear();
        let p = self.tag.platform;
        let runs = &mut self.runs;
        buf.for_each_run(p, &mut |r: Run| {
            if runs.len() == runs.capacity() {
                return Err(Error::BadState { what: "window link's runs changed" });
            }
            runs.push(r);
            Ok(())
        })?;
        sync_runs(p, &self.runs, op, self.tag.spec.flags.coherent)
    }

    /// Unlinks everything, invalidates, frees the IOVA, and gives every buffer to `back`
    /// (theory 5).
    ///
    /// Errors: [`Error::InvalidationFailed`]: no proof; the buffers not yet given back go to
    /// the tag's quarantine and the IOVA is leaked, never reused.
    pub fn destroy(mut self, mut back: impl FnMut(u64, B)) -> Result<()> {
        self.teardown(&mut back)
    }

    #[allow(unsafe_code)] // the domain's IOVA, table and mapping calls
    fn teardown(&mut self, back: &mut impl FnMut(u64, B)) -> Result<()> {
        for k in 0..self.slots.len() {
            if self.slots[k].state == State::Linked {
                let off = self.slots[k].off;
                let _ = self.unlink(off);
            }
        }
        let r = self.commit(&mut *back).map(|_| ());
        if r.is_ok() {
            let g = self.tag.platform.pin_cpu();
            // SAFETY: the window's own range; every link is unmapped and its invalidation
            // proven (the commit above unmapped every link and obtained the proof for the
            // held ones), so nothing in it is mapped or awaits an invalidation; given up as
            // the window goes.
            unsafe { self.ops.free_iova(&g, self.range) };
        } else {
            // No proof: the range is leaked. Held buffers (cleared, not proven) go to the
            // tag's quarantine, released at the tag's next proof, never freed without one; a
            // buffer still mapped (an unmap refused: a bookkeeping bug) is leaked outright.
            let tag = &self.tag;
            for slot in &mut self.slots {
                if let Some(b) = slot.buf.take() {
                    match slot.state {
                        State::Held | State::Retiring => b.quarantine(&mut |mem| tag.quarantine.hold(mem)),
                        _ => core::mem::forget(b),
                    }
                }
                slot.state = State::Free;
            }
        }
        self.done = true;
        self.pending.clear();
        self.pending_slots.clear();
        self.held_slots.clear();
        self.retiring_slots.clear();
        self.slots.clear();
        r
    }
}

impl<'p, P: Platform, S: WindowSource<P>, B: DmaBuffer<'p, P>> Drop for DmaWindow<'p, P, S, B> {
    fn drop(&mut self) {
        if self.done {
            return; // torn down by `destroy`
        }
        let _ = self.teardown(&mut |_, b| drop(b));
    }
}

impl<'p, P: Platform, S: WindowSource<P>, B: DmaBuffer<'p, P>> core::fmt::Debug for DmaWindow<'p, P, S, B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DmaWindow").field("iova", &self.range).field("stats", &self.stats).finish()
    }
}
