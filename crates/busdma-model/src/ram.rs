//! RAM: a memfd-backed arena and the frame allocator over it.
//!
//! # Theory
//!
//! 1. The arena is one `memfd` of `size` bytes standing for physical addresses
//!    `[base, base + size)`. It is mapped twice: the *physical view* (all of RAM, used for
//!    device DMA and `read_phys`/`write_phys`) and the *direct map* (a prefix of RAM, the
//!    kernel virtual addresses busdma sees). Both map the same pages, so they agree byte for
//!    byte; a quick map is a third, temporary view of one page.
//! 2. The memfd is sparse: `ftruncate` reserves no memory and a page costs RAM only once
//!    touched, so a 1 GiB default costs nothing up front.
//! 3. Frames are handed out by a bitmap allocator (one bit per 4 KiB frame: 32 KiB of bitmap
//!    for 1 GiB) under one mutex. It serves contiguous, aligned runs below an address limit
//!    and inside or outside the direct map. It is the model's page allocator, not a busdma
//!    mechanism: busdma's hot paths allocate from their own per-CPU pools above it.
//! 4. Invariant: a frame is handed out at most once until freed; a free of a frame that is not
//!    allocated is reported ([`Error::DoubleFree`]) and changes nothing.

use std::sync::Mutex;

use busdma::{Error, PAGE_SIZE, PhysAddr, Result};

pub use busdma::Placement;

/// A request for a contiguous run of frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRequest {
    /// Number of 4 KiB frames.
    pub pages: u64,
    /// Alignment of the first frame, in bytes (a power of two, at least 4 KiB).
    pub align: u64,
    /// Every byte of the run lies below this physical address (a device's DMA limit).
    pub below: Option<PhysAddr>,
    /// Direct-map placement.
    pub placement: Placement,
}

impl FrameRequest {
    /// `pages` frames anywhere, page-aligned.
    pub const fn pages(pages: u64) -> Self {
        Self { pages, align: PAGE_SIZE, below: None, placement: Placement::Any }
    }
}

/// The bitmap allocator of the arena's frames.
#[derive(Debug)]
pub struct FrameAllocator {
    base: PhysAddr,
    frames: u64,
    direct_frames: u64,
    inner: Mutex<Bitmap>,
}

#[derive(Debug)]
struct Bitmap {
    words: Vec<u64>,
    free: u64,
}

impl Bitmap {
    fn is_set(&self, frame: u64) -> bool {
        self.words[(frame / 64) as usize] & (1 << (frame % 64)) != 0
    }
    fn set(&mut self, frame: u64, on: bool) {
        let w = &mut self.words[(frame / 64) as usize];
        if on {
            *w |= 1 << (frame % 64);
        } else {
            *w &= !(1 << (frame % 64));
        }
    }
}

impl FrameAllocator {
    /// An allocator over `frames` frames starting at `base`, of which the first
    /// `direct_frames` are direct-mapped.
    pub fn new(base: PhysAddr, frames: u64, direct_frames: u64) -> Self {
        let words = frames.div_ceil(64) as usize;
        Self {
            base,
            frames,
            direct_frames,
            inner: Mutex::new(Bitmap { words: vec![0; words], free: frames }),
        }
    }

    /// Frames not allocated.
    pub fn free_frames(&self) -> u64 {
        self.lock().free
    }

    /// Frames in RAM.
    pub fn total_frames(&self) -> u64 {
        self.frames
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bitmap> {
        // A panic while holding the lock cannot leave the bitmap half-updated (every update
        // is a single bit), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates a contiguous run meeting `req`; returns its first physical address.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::BadAlignment`], [`Error::NoMemory`] (no run fits).
    pub fn alloc(&self, req: FrameRequest) -> Result<PhysAddr> {
        if req.pages == 0 {
            return Err(Error::ZeroSize);
        }
        if !busdma::addr::is_pow2(req.align) || req.align < PAGE_SIZE {
            return Err(Error::BadAlignment { align: req.align });
        }
        let nomem = Error::NoMemory { requested: req.pages.saturating_mul(PAGE_SIZE) };
        // The frame window [lo, hi) the run must lie in.
        let (mut lo, mut hi) = match req.placement {
            Placement::Any => (0, self.frames),
            Placement::DirectMapped => (0, self.direct_frames),
            Placement::NotDirectMapped => (self.direct_frames, self.frames),
        };
        if let Some(below) = req.below {
            let limit = below.raw().saturating_sub(self.base.raw()) / PAGE_SIZE;
            hi = hi.min(limit);
        }
        let align_frames = req.align / PAGE_SIZE;
        // Align in physical-address terms: base may not be aligned to `align`.
        let base_frame = self.base.raw() / PAGE_SIZE;
        let first_aligned = |f: u64| -> u64 {
            let abs = base_frame + f;
            abs.div_ceil(align_frames) * align_frames - base_frame
        };
        lo = first_aligned(lo);
        let mut bm = self.lock();
        if bm.free < req.pages {
            return Err(nomem);
        }
        let mut start = lo;
        while start.checked_add(req.pages).is_some_and(|end| end <= hi) {
            // Skip whole words of used frames: no run can start in one (its first frame is
            // used). Bit by bit, a scan past a pre-mapped pool's 8 192 frames cost ~50 000
            // instructions per page-table page (`examples/icount.rs hybrid-64k-deferred`).
            if start % 64 == 0 && start + 64 <= hi && bm.words[(start / 64) as usize] == u64::MAX {
                start = first_aligned(start + 64);
                continue;
            }
            // Find the last used frame in [start, start + pages), scanning backwards so a
            // hit skips the whole prefix.
            let mut clash = None;
            let mut f = start + req.pages;
            while f > start {
                f -= 1;
                if bm.is_set(f) {
                    clash = Some(f);
                    break;
                }
            }
            match clash {
                None => {
                    for f in start..start + req.pages {
                        bm.set(f, true);
                    }
                    bm.free -= req.pages;
                    return Ok(PhysAddr::new(self.base.raw() + start * PAGE_SIZE));
                }
                Some(used) => start = first_aligned(used + 1),
            }
        }
        Err(nomem)
    }

    /// Frees a run allocated by [`FrameAllocator::alloc`].
    ///
    /// Errors: [`Error::Misaligned`], [`Error::OutOfRange`], [`Error::DoubleFree`] if any frame
    /// of the run is not allocated (nothing is changed then).
    pub fn free(&self, pa: PhysAddr, pages: u64) -> Result<()> {
        if !pa.is_aligned(PAGE_SIZE) {
            return Err(Error::Misaligned { value: pa.raw(), align: PAGE_SIZE });
        }
        let first = pa
            .offset_from(self.base)
            .map(|o| o / PAGE_SIZE)
            .filter(|&f| f.checked_add(pages).is_some_and(|e| e <= self.frames))
            .ok_or(Error::OutOfRange { addr: pa.raw(), limit: self.base.raw() + self.frames * PAGE_SIZE })?;
        let mut bm = self.lock();
        if (first..first + pages).any(|f| !bm.is_set(f)) {
            return Err(Error::DoubleFree { addr: pa.raw(), size: pages * PAGE_SIZE });
        }
        for f in first..first + pages {
            bm.set(f, false);
        }
        bm.free += pages;
        Ok(())
    }
}

/// A run of frames that goes back to the allocator when dropped.
#[derive(Debug)]
pub struct FrameBlock<'a> {
    pub(crate) alloc: &'a FrameAllocator,
    pub(crate) pa: PhysAddr,
    pub(crate) pages: u64,
}

impl FrameBlock<'_> {
    /// First physical address of the run.
    pub fn pa(&self) -> PhysAddr {
        self.pa
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// Always false: a block holds at least one frame.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The run as a physical range.
    pub fn range(&self) -> busdma::AddrRange<PhysAddr> {
        // A block is non-empty and inside RAM, so the range is valid.
        busdma::AddrRange::from_start_len(self.pa, self.len()).unwrap_or_else(|_| unreachable!())
    }
}

impl Drop for FrameBlock<'_> {
    fn drop(&mut self) {
        // The block owns exactly this run, allocated once, so the free cannot fail.
        let r = self.alloc.free(self.pa, self.pages);
        debug_assert!(r.is_ok(), "frame block free failed: {r:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const BASE: u64 = 0x100_0000;

    #[test]
    fn zero_and_bad_alignment_are_errors() {
        let a = FrameAllocator::new(PhysAddr::new(BASE), 64, 64);
        assert_eq!(a.alloc(FrameRequest::pages(0)), Err(Error::ZeroSize));
        let mut r = FrameRequest::pages(1);
        r.align = 3 * PAGE_SIZE;
        assert!(matches!(a.alloc(r), Err(Error::BadAlignment { .. })));
    }

    #[test]
    fn double_free_is_detected_and_changes_nothing() {
        let a = FrameAllocator::new(PhysAddr::new(BASE), 64, 64);
        let p = a.alloc(FrameRequest::pages(2)).unwrap();
        a.free(p, 2).unwrap();
        assert!(matches!(a.free(p, 2), Err(Error::DoubleFree { .. })));
        assert_eq!(a.free_frames(), 64);
        assert!(matches!(a.free(PhysAddr::new(0x1000), 1), Err(Error::OutOfRange { .. })));
    }

    #[test]
    fn placement_and_limit_are_honoured() {
        let a = FrameAllocator::new(PhysAddr::new(BASE), 64, 32);
        let mut r = FrameRequest::pages(4);
        r.placement = Placement::NotDirectMapped;
        let p = a.alloc(r).unwrap();
        assert!(p.raw() >= BASE + 32 * PAGE_SIZE);
        r.placement = Placement::DirectMapped;
        r.below = Some(PhysAddr::new(BASE + 8 * PAGE_SIZE));
        let q = a.alloc(r).unwrap();
        assert!(q.raw() + 4 * PAGE_SIZE <= BASE + 8 * PAGE_SIZE);
        r.pages = 5;
        assert!(matches!(a.alloc(r), Err(Error::NoMemory { .. })));
    }

    proptest! {
        #[test]
        fn frames_are_never_handed_out_twice_and_all_come_back(
            ops in proptest::collection::vec((1u64..9, 0u32..4, any::<bool>()), 1..200)
        ) {
            let frames = 256;
            let a = FrameAllocator::new(PhysAddr::new(BASE + 0x3000), frames, frames);
            let mut live: Vec<(PhysAddr, u64)> = Vec::new();
            let mut owned = BTreeSet::new();
            for (pages, align_log, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (pa, n) = live.swap_remove(0);
                    a.free(pa, n).unwrap();
                    for i in 0..n { owned.remove(&(pa.raw() + i * PAGE_SIZE)); }
                    continue;
                }
                let req = FrameRequest { pages, align: PAGE_SIZE << align_log, below: None, placement: Placement::Any };
                match a.alloc(req) {
                    Ok(pa) => {
                        prop_assert!(pa.is_aligned(req.align));
                        for i in 0..pages {
                            prop_assert!(owned.insert(pa.raw() + i * PAGE_SIZE), "frame handed out twice");
                        }
                        live.push((pa, pages));
                    }
                    Err(e) => prop_assert!(matches!(e, Error::NoMemory { .. }), "unexpected error {:?}", e),
                }
                prop_assert_eq!(a.free_frames(), frames - owned.len() as u64);
            }
            for (pa, n) in live { a.free(pa, n).unwrap(); }
            prop_assert_eq!(a.free_frames(), frames);
        }
    }
}
