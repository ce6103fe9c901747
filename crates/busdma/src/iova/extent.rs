//! The baseline: an extent(9)-like allocator, as OpenBSD's IOMMU drivers used in seed 002.
//!
//! # Theory
//!
//! 1. One sorted list of allocated ranges (a `Vec`, where OpenBSD keeps a linked list of
//!    `struct extent_region`), under one global lock.
//! 2. Allocation walks every gap and takes the *best fit*: the smallest gap that can hold the
//!    request with its alignment, boundary and limit, placed at the gap's lowest fitting
//!    address (extent(9)'s `EX_BESTFIT`). Freeing finds the range by binary search and
//!    removes it. Both are O(n) in the number of live ranges (the walk, the shift), which is
//!    what this baseline is here to show.
//! 3. It is a baseline, kept small and honest: no caches, no remembered failures, but the same
//!    validation and the same errors as [`super::IovaAllocator`] (double free, wrong size).
#![forbid(unsafe_code)]

use alloc::vec::Vec;

use super::{IovaRequest, IovaSource, Validated};
use crate::addr::{AddrRange, Iova};
use crate::error::{Error, Result};
use crate::platform::{CpuGuard, Platform};
use crate::sync::SpinLock;

/// A sorted-list best-fit allocator under one global lock (see the module documentation).
#[derive(Debug)]
pub struct ExtentAllocator {
    space: AddrRange<Iova>,
    /// Allocated `[start, end)` ranges, sorted, disjoint.
    ranges: SpinLock<Vec<(u64, u64)>>,
}

impl ExtentAllocator {
    /// An allocator over `space` (page-aligned).
    pub fn new(space: AddrRange<Iova>) -> Result<Self> {
        super::check_space(space)?;
        Ok(Self { space, ranges: SpinLock::new(Vec::new()) })
    }

    /// Occupies exactly `range` (page-aligned, inside the space, free), like extent(9)'s
    /// `extent_alloc_region`. O(n) worst case, O(1) when regions are added in ascending order.
    ///
    /// Errors: [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::AlreadyMapped`].
    pub fn reserve(&self, range: AddrRange<Iova>) -> Result<()> {
        let (s, e) = (range.start().raw(), range.end().raw());
        if (s | e) % crate::addr::PAGE_SIZE != 0 {
            return Err(Error::Misaligned { value: s | e, align: crate::addr::PAGE_SIZE });
        }
        if !self.space.contains_range(&range) {
            return Err(Error::OutOfRange { addr: s, limit: self.space.end().raw() });
        }
        let mut ranges = self.ranges.lock();
        let i = ranges.partition_point(|r| r.0 < s);
        let clash = ranges
            .get(i)
            .filter(|r| r.0 < e)
            .or_else(|| i.checked_sub(1).and_then(|j| ranges.get(j)).filter(|r| r.1 > s));
        if let Some(r) = clash {
            return Err(Error::AlreadyMapped { addr: r.0.max(s) });
        }
        ranges.try_reserve(1).map_err(|_| Error::NoMemory { requested: 16 })?;
        ranges.insert(i, (s, e));
        Ok(())
    }

    /// Number of live ranges.
    pub fn live(&self) -> usize {
        self.ranges.lock().len()
    }
}

impl IovaSource for ExtentAllocator {
    fn alloc<P: Platform>(&self, _g: &CpuGuard<'_, P>, req: &IovaRequest) -> Result<AddrRange<Iova>> {
        let v = Validated::new(req, self.space)?;
        let mut ranges = self.ranges.lock();
        let mut best: Option<(u64, u64, usize)> = None; // (gap length, start, insert index)
        let mut lo = self.space.start().raw();
        for i in 0..=ranges.len() {
            let hi = ranges.get(i).map_or(self.space.end().raw(), |r| r.0);
            if let Some(s) = v.lowest_fit(lo, hi) {
                if best.is_none_or(|b| hi - lo < b.0) {
                    best = Some((hi - lo, s, i));
                }
            }
            match ranges.get(i) {
                Some(r) => lo = r.1,
                None => break,
            }
        }
        let (_, s, i) = best.ok_or(Error::Exhausted { size: v.size, limit: v.limit })?;
        ranges.try_reserve(1).map_err(|_| Error::NoMemory { requested: 16 })?;
        ranges.insert(i, (s, s + v.size));
        AddrRange::from_start_len(Iova::new(s), v.size)
    }

    fn free<P: Platform>(&self, _g: &CpuGuard<'_, P>, range: AddrRange<Iova>) -> Result<()> {
        let (s, len) = (range.start().raw(), range.len());
        let mut ranges = self.ranges.lock();
        let i =
            ranges.binary_search_by_key(&s, |r| r.0).map_err(|_| Error::DoubleFree { addr: s, size: len })?;
        let actual = ranges[i].1 - ranges[i].0;
        if actual != len {
            return Err(Error::WrongSize { addr: s, given: len, actual });
        }
        ranges.remove(i);
        Ok(())
    }
}
