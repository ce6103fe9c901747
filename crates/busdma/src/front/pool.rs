//! Pools of small coherent blocks (Linux `dma_pool`): descriptors, completion records,
//! mailboxes, carved from coherent pages.
//!
//! # Theory
//!
//! 1. **What a pool is.** A [`DmaPool`] hands out blocks of one size (16 B to one page) of
//!    coherent memory of its tag ([`Tag::create_pool`]), each with its bus address and a typed
//!    view ([`DmaBlock::view`], [`super::view`]: copies and atomic status words, never
//!    references). Blocks come from whole pages allocated and mapped with
//!    [`Tag::alloc_coherent`], so they have its cacheability (coherent theory 2) and its
//!    teardown (coherent theory 3).
//! 2. **Layout.** Blocks of a page sit at multiples of the *stride*: the size rounded up to at
//!    least 16 bytes and to the alignment, which is the larger of the one asked, the tag's and
//!    16 (why 16: every 8-aligned offset of a block is then an aligned 64-bit word, so status
//!    words are atomic wherever the driver's `#[repr(C)]` layout puts them). A block that would
//!    cross a multiple of the boundary (the smaller of the one asked and the tag's; 0 is none)
//!    moves to that multiple, as in Linux. Every page maps as one page-aligned segment (checked
//!    when it is added: [`Error::TooManySegments`] or [`Error::Misaligned`] otherwise, the page
//!    torn down), so a block's offset in its page is its offset in bus space: aligned in the
//!    page is aligned on the bus, and a boundary no larger than a page is crossed on the bus
//!    exactly where it is crossed in the page (a larger one cannot be crossed inside a page).
//! 3. **Ownership.** A pool is a handle to shared state (as a [`Tag`] is); every block holds
//!    a clone of it and of its page, so a driver's state struct can own the pool and its
//!    blocks together in any order, and the pool cannot go away while a block is out.
//!    Dropping a block gives it back to the pool's free list; [`DmaPool::alloc`] hands it out
//!    again zeroed.
//! 4. **Growth.** An allocation that finds the free list empty allocates and maps one page
//!    outside any lock, then, under the pool's lock, keeps one block and puts the rest on the
//!    free list. The free list is sized then for every block of every page, so giving a block
//!    back never allocates.
//! 5. **Teardown: the pages go only when everything is gone.** A page is freed when the last
//!    handle of the pool and the last of its blocks are dropped, through the coherent memory's
//!    own teardown (unload, the tag's proof, free, or the quarantine: never memory a
//!    translation may still reach). A block given back stays mapped for this device, as in
//!    Linux: a late write by the device reaches only this pool's memory, never another
//!    owner's.
//!
//! # Execution context
//!
//! [`DmaPool::alloc`] may allocate and map a page (never sleeps); dropping a block takes the
//! pool's spin lock for a push (no allocation). Both may run concurrently on every CPU.
#![forbid(unsafe_code)]

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::addr::{Iova, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::platform::Platform;
use crate::sync::SpinLock;

use super::coherent::Coherent;
use super::strategy::Strategy;
use super::tag::Tag;
use super::view::DmaView;

/// The smallest block and the least alignment (theory 2: "why 16").
pub const MIN_BLOCK: u64 = 16;

/// Where blocks go in a page (theory 2).
///
/// # Invariants
///
/// `align` is a power of two in `[MIN_BLOCK, PAGE_SIZE]`; `size <= stride <= PAGE_SIZE`,
/// `stride` a multiple of `align`; `boundary` is 0 or a power of two `>= size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    size: u64,
    stride: u64,
    align: u64,
    boundary: u64,
}

impl Layout {
    /// The layout of blocks of `size` bytes aligned to `align` crossing no multiple of
    /// `boundary` (0: none), under the tag's own alignment and boundary.
    fn new(size: u64, align: u64, boundary: u64, tag_align: u64, tag_boundary: u64) -> Result<Self> {
        if size == 0 {
            return Err(Error::ZeroSize);
        }
        if size > PAGE_SIZE {
            return Err(Error::BadSize { size, limit: PAGE_SIZE });
        }
        if !align.is_power_of_two() {
            return Err(Error::BadAlignment { align });
        }
        if align > PAGE_SIZE {
            return Err(Error::InvalidArgument {
                what: "DmaPool alignment (larger than a page)",
                value: align,
            });
        }
        if tag_align > PAGE_SIZE {
            return Err(Error::InvalidArgument {
                what: "DmaPool tag alignment (larger than a page)",
                value: tag_align,
            });
        }
        if boundary != 0 && !boundary.is_power_of_two() {
            return Err(Error::InvalidArgument {
                what: "DmaPool boundary (not a power of two)",
                value: boundary,
            });
        }
        // The tighter of the two boundaries (0 is none).
        let boundary = match (boundary, tag_boundary) {
            (0, t) => t,
            (b, 0) => b,
            (b, t) => b.min(t),
        };
        if boundary != 0 && boundary < size {
            return Err(Error::BadSize { size, limit: boundary });
        }
        let align = align.max(tag_align).max(MIN_BLOCK);
        // `size <= PAGE_SIZE` and `align <= PAGE_SIZE`, both powers of two or bounded by one: no
        // overflow, and the stride stays within a page.
        let stride = size.max(MIN_BLOCK).next_multiple_of(align);
        // INVARIANT: checked above.
        Ok(Layout { size, stride, align, boundary })
    }

    /// The offsets of the blocks of one page, in order.
    fn offsets(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = 0u64;
        core::iter::from_fn(move || {
            loop {
                let off = next;
                if off + self.stride > PAGE_SIZE {
                    return None;
                }
                if self.boundary != 0 && off / self.boundary != (off + self.size - 1) / self.boundary {
                    // Crosses: start again at the boundary (a multiple of the alignment, both
                    // powers of two, unless smaller than it, when `off` is already past it).
                    next = (off + 1).next_multiple_of(self.boundary).next_multiple_of(self.align);
                    continue;
                }
                next = off + self.stride;
                return Some(off);
            }
        })
    }
}

/// One block's place: its page and offset, and its bus address.
struct Slot<'p, P: Platform, S: Strategy<P>> {
    page: Arc<Coherent<'p, P, S>>,
    offset: u64,
    bus: Iova,
}

struct PoolState<'p, P: Platform, S: Strategy<P>> {
    free: Vec<Slot<'p, P, S>>,
    pages: u64,
    out: u64,
}

/// What the handles of a pool and its blocks share.
struct PoolShared<'p, P: Platform, S: Strategy<P>> {
    tag: Tag<'p, P, S>,
    layout: Layout,
    per_page: u64,
    state: SpinLock<PoolState<'p, P, S>>,
}

/// A pool of small coherent blocks of one size (theory 1–5); a handle (cloning it is one
/// reference-count increment).
pub struct DmaPool<'p, P: Platform, S: Strategy<P>>(Arc<PoolShared<'p, P, S>>);

impl<P: Platform, S: Strategy<P>> Clone for DmaPool<'_, P, S> {
    /// Another handle to the same pool.
    fn clone(&self) -> Self {
        DmaPool(self.0.clone())
    }
}

/// A pool's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Pages allocated (and mapped).
    pub pages: u64,
    /// Blocks each page holds.
    pub blocks_per_page: u64,
    /// Blocks on the free list.
    pub free: u64,
    /// Blocks handed out and not dropped.
    pub out: u64,
}

impl<'p, P: Platform, S: Strategy<P>> Tag<'p, P, S> {
    /// A pool of `size`-byte blocks of this tag's coherent memory, each aligned to `align` and
    /// crossing no multiple of `boundary` (0: none); the tag's own alignment and boundary
    /// apply too (theory 2). No page is allocated until the first [`DmaPool::alloc`].
    ///
    /// Errors: [`Error::ZeroSize`]; [`Error::BadSize`] `{ size, limit: PAGE_SIZE }` for a block
    /// larger than a page, `{ size, limit: boundary }` for a boundary smaller than the block
    /// (the tag's boundary counts); [`Error::BadAlignment`] (not a power of two);
    /// [`Error::InvalidArgument`] for an alignment (asked or the tag's) larger than a page, or
    /// a boundary that is not a power of two.
    pub fn create_pool(&self, size: u64, align: u64, boundary: u64) -> Result<DmaPool<'p, P, S>> {
        let layout = Layout::new(size, align, boundary, self.spec.alignment, self.spec.boundary)?;
        let per_page = layout.offsets().count() as u64;
        Ok(DmaPool(Arc::new(PoolShared {
            tag: self.clone(),
            layout,
            per_page,
            state: SpinLock::new(PoolState { free: Vec::new(), pages: 0, out: 0 }),
        })))
    }
}

impl<'p, P: Platform, S: Strategy<P>> DmaPool<'p, P, S> {
    /// A zeroed block, with its bus address and typed view; a page is added when none is free
    /// (theory 4).
    ///
    /// Errors: those of [`Tag::alloc_coherent`] when a page is added ([`Error::NoMemory`], the
    /// strategy's exhaustion); [`Error::TooManySegments`] or [`Error::Misaligned`] if the tag
    /// maps a page as more than one segment or not page-aligned (theory 2); the zero fill's.
    /// Nothing is kept on error.
    pub fn alloc(&self) -> Result<DmaBlock<'p, P, S>> {
        let popped = {
            let mut st = self.0.state.lock();
            let s = st.free.pop();
            if s.is_some() {
                st.out += 1;
            }
            s
        };
        let slot = match popped {
            Some(s) => s,
            None => self.grow()?,
        };
        let block = DmaBlock { pool: self.0.clone(), slot: Some(slot) };
        // On error the block drops: back on the free list.
        block.view().fill(0, self.0.layout.size, 0)?;
        Ok(block)
    }

    /// Adds a page: allocated and mapped outside the lock; one block of it for the caller
    /// (counted out), the rest on the free list.
    fn grow(&self) -> Result<Slot<'p, P, S>> {
        let sh = &*self.0;
        let page = sh.tag.alloc_coherent(PAGE_SIZE, false)?;
        let seg = match page.segments() {
            [seg] if seg.len == PAGE_SIZE && seg.addr.is_aligned(PAGE_SIZE) => *seg,
            [seg, ..] if !seg.addr.is_aligned(PAGE_SIZE) => {
                return Err(Error::Misaligned { value: seg.addr.raw(), align: PAGE_SIZE });
            }
            segs => return Err(Error::TooManySegments { needed: segs.len() as u64, max: 1 }),
        };
        let page = Arc::new(page);
        let mut slots = sh.layout.offsets().map(|offset| Slot {
            page: page.clone(),
            offset,
            bus: Iova::new(seg.addr.raw() + offset),
        });
        let mine = slots.next().ok_or(Error::BadState { what: "DmaPool page without a block" })?;
        let mut st = sh.state.lock();
        st.pages += 1;
        st.out += 1;
        // Room for every block of every page: giving a block back never allocates (theory 4).
        let total = st.pages * sh.per_page;
        let room = total.saturating_sub(st.free.len() as u64) as usize;
        st.free.reserve(room);
        st.free.extend(slots);
        Ok(mine)
    }

    /// Size of the blocks as asked.
    pub fn block_size(&self) -> u64 {
        self.0.layout.size
    }

    /// Distance between blocks in a page (theory 2).
    pub fn stride(&self) -> u64 {
        self.0.layout.stride
    }

    /// Alignment of every block's bus address (theory 2).
    pub fn align(&self) -> u64 {
        self.0.layout.align
    }

    /// The boundary no block crosses (0: none; theory 2).
    pub fn boundary(&self) -> u64 {
        self.0.layout.boundary
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        let st = self.0.state.lock();
        PoolStats {
            pages: st.pages,
            blocks_per_page: self.0.per_page,
            free: st.free.len() as u64,
            out: st.out,
        }
    }

    /// The tag the pool's pages are mapped for.
    pub fn tag(&self) -> &Tag<'p, P, S> {
        &self.0.tag
    }
}

impl<P: Platform, S: Strategy<P>> core::fmt::Debug for DmaPool<'_, P, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DmaPool").field("layout", &self.0.layout).field("stats", &self.stats()).finish()
    }
}

/// A block of a [`DmaPool`]: owned, given back to the pool on drop (theory 3).
///
/// # Invariants
///
/// `slot` is `Some` until drop, and is a block of a page of `pool`.
pub struct DmaBlock<'p, P: Platform, S: Strategy<P>> {
    pool: Arc<PoolShared<'p, P, S>>,
    slot: Option<Slot<'p, P, S>>,
}

impl<'p, P: Platform, S: Strategy<P>> DmaBlock<'p, P, S> {
    #[inline]
    fn slot(&self) -> &Slot<'p, P, S> {
        // INVARIANT: `slot` is Some until drop.
        self.slot.as_ref().unwrap_or_else(|| unreachable!("pool block taken before drop"))
    }

    /// The bus address of the block's first byte, for the device.
    #[inline]
    pub fn bus_addr(&self) -> Iova {
        self.slot().bus
    }

    /// Length in bytes (the pool's block size).
    #[inline]
    pub fn len(&self) -> u64 {
        self.pool.layout.size
    }

    /// Always false.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pool.layout.size == 0
    }

    /// The block as a typed view ([`super::view`]).
    #[inline]
    pub fn view(&self) -> DmaView<'_, P> {
        let s = self.slot();
        s.page.view().window(s.offset, self.pool.layout.size)
    }
}

impl<P: Platform, S: Strategy<P>> Drop for DmaBlock<'_, P, S> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            let mut st = self.pool.state.lock();
            st.out = st.out.saturating_sub(1);
            // Never allocates: the list has room for every block (theory 4).
            st.free.push(slot);
        }
    }
}

impl<P: Platform, S: Strategy<P>> core::fmt::Debug for DmaBlock<'_, P, S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DmaBlock").field("bus", &self.bus_addr()).field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(l: &Layout) -> Vec<u64> {
        l.offsets().collect()
    }

    #[test]
    fn blocks_are_at_least_16_bytes_and_16_aligned() {
        let l = Layout::new(1, 1, 0, 1, 0).unwrap();
        assert_eq!((l.stride, l.align), (16, 16));
        assert_eq!(offsets(&l).len() as u64, PAGE_SIZE / 16);
        let l = Layout::new(20, 8, 0, 1, 0).unwrap();
        assert_eq!(l.stride, 32);
    }

    #[test]
    fn a_block_that_would_cross_the_boundary_moves_to_it() {
        // 48-byte blocks, 64-byte boundary: 0..48 fits, 48..96 crosses 64 and moves to 64.
        let l = Layout::new(48, 16, 64, 1, 0).unwrap();
        assert_eq!(&offsets(&l)[..3], &[0, 64, 128]);
        for o in offsets(&l) {
            assert_eq!(o / 64, (o + 47) / 64, "block at {o} crosses");
        }
    }

    #[test]
    fn the_tags_alignment_and_boundary_narrow_the_pools() {
        let l = Layout::new(24, 16, 0, 64, 128).unwrap();
        assert_eq!((l.align, l.stride, l.boundary), (64, 64, 128));
        assert_eq!(Layout::new(24, 16, 32, 1, 16), Err(Error::BadSize { size: 24, limit: 16 }));
    }

    #[test]
    fn bad_layouts_are_refused_with_their_values() {
        assert_eq!(Layout::new(0, 16, 0, 1, 0), Err(Error::ZeroSize));
        assert_eq!(
            Layout::new(PAGE_SIZE + 1, 16, 0, 1, 0),
            Err(Error::BadSize { size: PAGE_SIZE + 1, limit: PAGE_SIZE })
        );
        assert_eq!(Layout::new(16, 24, 0, 1, 0), Err(Error::BadAlignment { align: 24 }));
        assert_eq!(Layout::new(16, 0, 0, 1, 0), Err(Error::BadAlignment { align: 0 }));
        assert!(
            matches!(Layout::new(16, 2 * PAGE_SIZE, 0, 1, 0), Err(Error::InvalidArgument { value, .. }) if value == 2 * PAGE_SIZE)
        );
        assert!(matches!(Layout::new(16, 16, 48, 1, 0), Err(Error::InvalidArgument { value: 48, .. })));
        assert_eq!(Layout::new(64, 16, 32, 1, 0), Err(Error::BadSize { size: 64, limit: 32 }));
    }

    #[test]
    fn a_whole_page_block_is_one_block_per_page() {
        let l = Layout::new(PAGE_SIZE, PAGE_SIZE, PAGE_SIZE, 1, 0).unwrap();
        assert_eq!(offsets(&l), [0]);
    }
}
