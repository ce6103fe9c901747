//! Reserved IOVA windows: one allocation at map-create time, sub-ranges at every load.
//!
//! # Theory
//!
//! 1. Seed 002: allocating IOVA per segment cost a NIC 97% of its throughput; allocating once
//!    per load recovered it; its author wished to reserve IOVA when the map is created, since
//!    creation happens once and loads happen per packet. An [`IovaWindow`] is that
//!    reservation: [`super::IovaAllocator::reserve_window`] takes the map's maximum size plus
//!    one page per segment (each segment may start and end inside a page, so it can need one
//!    page more than its bytes) from the tree once; every load then carves its sub-ranges with a
//!    bump pointer ([`IovaWindow::carve`]) and an unload rewinds it ([`IovaWindow::reset`]).
//!    Neither touches the allocator, its locks or its caches.
//! 2. The window is owned by one map (`&mut self` on every carving call), so it needs no
//!    synchronisation. Dropping a window without
//!    [`super::IovaAllocator::release_window`] leaks its range (like leaking any allocation);
//!    it never corrupts the allocator.
#![forbid(unsafe_code)]

use crate::addr::{AddrRange, Iova, PAGE_SIZE, is_pow2};
use crate::error::{Error, Result};

/// A reserved IOVA window that hands out sub-ranges without touching the allocator.
///
/// # Invariants
///
/// `range` is page-aligned and owned by this window in its allocator's tree;
/// `next <= range.len()` and is a multiple of the page size.
#[derive(Debug, PartialEq, Eq)]
pub struct IovaWindow {
    range: AddrRange<Iova>,
    next: u64,
}

impl IovaWindow {
    pub(crate) fn new(range: AddrRange<Iova>) -> Self {
        // INVARIANT: the allocator hands us a page-aligned range it recorded as a window.
        Self { range, next: 0 }
    }

    /// The whole window.
    pub fn range(&self) -> AddrRange<Iova> {
        self.range
    }

    /// Bytes carved since the last [`IovaWindow::reset`].
    pub fn used(&self) -> u64 {
        self.next
    }

    /// Carves the next sub-range of `len` bytes (rounded up to whole pages), starting at a
    /// multiple of `align` (a power of two; anything below a page means a page).
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::BadAlignment`], [`Error::Exhausted`] when the rest
    /// of the window is too small (nothing changes then).
    pub fn carve(&mut self, len: u64, align: u64) -> Result<AddrRange<Iova>> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if !is_pow2(align) {
            return Err(Error::BadAlignment { align });
        }
        let align = align.max(PAGE_SIZE);
        let exhausted = Error::Exhausted { size: len, limit: self.range.end().raw() };
        let pages = len.checked_add(PAGE_SIZE - 1).ok_or(exhausted)? & !(PAGE_SIZE - 1);
        let cursor = self.range.start().raw() + self.next;
        let start = cursor.checked_add(align - 1).ok_or(exhausted)? & !(align - 1);
        let end = start.checked_add(pages).ok_or(exhausted)?;
        if end > self.range.end().raw() {
            return Err(exhausted);
        }
        // INVARIANT: end is page-aligned and inside the window.
        self.next = end - self.range.start().raw();
        AddrRange::new(Iova::new(start), Iova::new(end))
    }

    /// Forgets every carved sub-range (the map was unloaded).
    pub fn reset(&mut self) {
        self.next = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(pages: u64) -> IovaWindow {
        IovaWindow::new(AddrRange::from_start_len(Iova::new(0x10_0000), pages * PAGE_SIZE).unwrap())
    }

    #[test]
    fn carving_is_a_bump_pointer_that_reset_rewinds() {
        let mut w = window(8);
        let a = w.carve(100, 1).unwrap();
        assert_eq!((a.start().raw(), a.len()), (0x10_0000, PAGE_SIZE));
        let b = w.carve(PAGE_SIZE + 1, 4 * PAGE_SIZE).unwrap();
        assert_eq!((b.start().raw(), b.len()), (0x10_4000, 2 * PAGE_SIZE));
        assert_eq!(w.used(), 6 * PAGE_SIZE);
        w.reset();
        assert_eq!(w.carve(PAGE_SIZE, PAGE_SIZE).unwrap().start().raw(), 0x10_0000);
    }

    #[test]
    fn carving_past_the_end_is_exhaustion_and_changes_nothing() {
        let mut w = window(2);
        w.carve(PAGE_SIZE, PAGE_SIZE).unwrap();
        assert!(matches!(w.carve(2 * PAGE_SIZE, PAGE_SIZE), Err(Error::Exhausted { .. })));
        assert_eq!(w.used(), PAGE_SIZE);
        assert_eq!(w.carve(0, PAGE_SIZE), Err(Error::ZeroSize));
        assert_eq!(w.carve(1, 3), Err(Error::BadAlignment { align: 3 }));
        assert!(w.carve(u64::MAX, PAGE_SIZE).is_err());
        assert!(w.carve(PAGE_SIZE, PAGE_SIZE).is_ok());
    }
}
