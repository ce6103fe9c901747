//! A device's DMA constraints: what a tag states ([`TagSpec`], [`TagFlags`]), checked on its
//! own and against a parent's. The vocabulary the strategies and the segment builder read;
//! it imports nothing of the driver-facing layer (tags, maps), which sits above the
//! strategies (see the theory of [`super::tag`]).
#![forbid(unsafe_code)]

use crate::addr::{PAGE_SIZE, is_pow2};
use crate::error::{Error, Result};

/// Flags of a tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TagFlags {
    /// The device snoops CPU caches: no cache maintenance at sync.
    pub coherent: bool,
    /// The device is assumed hostile: strict invalidation, sub-page buffers bounced.
    pub untrusted: bool,
    /// Loads may wait for resources (bounce pages, IOVA space, table pages):
    /// [`DmaMap::load_or_defer`](super::map::DmaMap::load_or_defer) queues a load that cannot
    /// get them and completes it by callback when an unload or destroy frees them
    /// ([`super::defer`]). Without it every load fails at once. A child may drop the flag but
    /// not claim it where its parent lacks it (the tree's wait queue exists only if the root
    /// may wait).
    pub may_wait: bool,
    /// Only privileged requests of the device may use the tag's mappings (Linux's
    /// `DMA_ATTR_PRIVILEGED`; Arm `AP[1]` = 0: a GPU's or a DSP's firmware regions, which its
    /// user-mode command streams must not reach). A format without a privilege bit (VT-d
    /// second level) cannot express it: loads fail with [`Error::InvalidArgument`](crate::Error)
    /// rather than map the memory unprivileged; identity strategies refuse the tag.
    pub privileged: bool,
}

/// An exclusion window `(low, high]` of bus addresses ([`TagSpec::exclusion`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exclusion {
    /// FreeBSD's `lowaddr`: the highest address below the window (exclusive start).
    pub low: u64,
    /// FreeBSD's `highaddr`: the last address of the window (inclusive end).
    pub high: u64,
}

/// The constraints of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagSpec {
    /// Every segment starts at a bus address that is a multiple of this (a power of two ≥ 1).
    pub alignment: u64,
    /// No segment crosses a multiple of this (a power of two ≥ `alignment`), or 0 for none.
    pub boundary: u64,
    /// Highest bus address the device can emit for streaming loads, inclusive (`2^bits - 1`
    /// for a `bits`-bit device).
    pub dma_mask: u64,
    /// Highest bus address of coherent memory ([`super::DmaMemory::alloc`]), inclusive: some
    /// devices reach their descriptor rings with fewer address bits than their buffers
    /// (Linux's separate coherent DMA mask).
    pub coherent_mask: u64,
    /// FreeBSD's exclusion window `(lowaddr, highaddr]`: bus addresses the device cannot
    /// reach although they lie below its mask (a bridge that decodes them for itself).
    /// `None`: none. busdma keeps loads below `lowaddr + 1` (theory: [`TagSpec::reach_limit`]).
    pub exclusion: Option<Exclusion>,
    /// Largest load, in bytes (> 0).
    pub max_size: u64,
    /// Most segments per load (≥ 1).
    pub max_segments: u32,
    /// Longest segment, in bytes (≥ `alignment`).
    pub max_segment_size: u64,
    /// Flags.
    pub flags: TagFlags,
}

impl TagSpec {
    /// A 64-bit device with no alignment or boundary constraint, loads of at most `max_size`
    /// bytes in at most `max_segments` segments of any length.
    pub const fn new(max_size: u64, max_segments: u32) -> Self {
        Self {
            alignment: 1,
            boundary: 0,
            // u64::MAX - 1 rather than u64::MAX: a range end of 2^64 is not representable
            // (addr.rs, theory 2), so the last byte of the space is never mapped anyway.
            dma_mask: u64::MAX - 1,
            coherent_mask: u64::MAX - 1,
            exclusion: None,
            max_size,
            max_segments,
            max_segment_size: max_size,
            flags: TagFlags { coherent: false, untrusted: false, may_wait: false, privileged: false },
        }
    }

    /// The mask of a device that emits `bits`-bit addresses (12 ≤ bits ≤ 64).
    pub const fn mask_of_bits(bits: u32) -> u64 {
        if bits >= 64 { u64::MAX - 1 } else { (1u64 << bits) - 1 }
    }

    /// Checks the spec on its own.
    ///
    /// Errors: [`Error::BadAlignment`] (alignment or boundary not a power of two),
    /// [`Error::ZeroSize`] (zero max size), [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if !is_pow2(self.alignment) {
            return Err(Error::BadAlignment { align: self.alignment });
        }
        if self.boundary != 0 && !is_pow2(self.boundary) {
            return Err(Error::BadAlignment { align: self.boundary });
        }
        if self.boundary != 0 && self.boundary < self.alignment {
            return Err(Error::InvalidArgument {
                what: "tag boundary smaller than its alignment",
                value: self.boundary,
            });
        }
        if self.max_size == 0 {
            return Err(Error::ZeroSize);
        }
        if self.max_segments == 0 {
            return Err(Error::InvalidArgument { what: "tag max_segments (zero)", value: 0 });
        }
        if self.max_segment_size < self.alignment {
            return Err(Error::InvalidArgument {
                what: "tag max_segment_size smaller than its alignment",
                value: self.max_segment_size,
            });
        }
        // A device that cannot reach one whole page cannot be given any buffer.
        if self.dma_mask < PAGE_SIZE - 1 {
            return Err(Error::InvalidArgument { what: "tag dma_mask below one page", value: self.dma_mask });
        }
        if self.coherent_mask < PAGE_SIZE - 1 {
            return Err(Error::InvalidArgument {
                what: "tag coherent_mask below one page",
                value: self.coherent_mask,
            });
        }
        if let Some(Exclusion { low, high }) = self.exclusion {
            if low >= high {
                return Err(Error::BadWindow {
                    what: "tag exclusion window (lowaddr not below highaddr)",
                    low,
                    high,
                });
            }
            if low < PAGE_SIZE - 1 {
                return Err(Error::BadWindow {
                    what: "tag exclusion window leaves no page below it",
                    low,
                    high,
                });
            }
        }
        Ok(())
    }

    /// The highest bus address below which every address is reachable, inclusive: the mask,
    /// lowered to the exclusion window's `lowaddr` when the window starts below it. IOVA
    /// allocation and coherent memory stay below it (one limit, and there is room there).
    /// The bounce layer is exact instead: it bounces memory inside the window and leaves
    /// memory above `highaddr` (and below the mask) in place, as FreeBSD does.
    pub fn reach_limit(&self) -> u64 {
        match self.exclusion {
            Some(Exclusion { low, .. }) if low < self.dma_mask => low,
            _ => self.dma_mask,
        }
    }

    /// The constraints of a child that asks for `self` under `parent`, as FreeBSD derives
    /// them: the intersection (the narrower mask of each kind, the union of the exclusion
    /// windows when they overlap or touch, else the parent's); other fields are `self`'s.
    /// [`super::Tag::child`] still refuses a child wider than its parent; this is how a
    /// driver computes one that is not.
    pub fn inherit(&self, parent: &TagSpec) -> TagSpec {
        let exclusion = match (self.exclusion, parent.exclusion) {
            (None, p) => p,
            (c, None) => c,
            (Some(c), Some(p)) if c.low <= p.high && p.low <= c.high => {
                Some(Exclusion { low: c.low.min(p.low), high: c.high.max(p.high) })
            }
            (_, p) => p,
        };
        TagSpec {
            dma_mask: self.dma_mask.min(parent.dma_mask),
            coherent_mask: self.coherent_mask.min(parent.coherent_mask),
            exclusion,
            ..*self
        }
    }

    /// The constraints the platform itself puts on every device: both masks at
    /// [`Platform::dma_limit`](crate::Platform::dma_limit), nothing else. A driver whose
    /// device emits more bits than the bus carries narrows its spec with
    /// `spec.inherit(&TagSpec::of_platform(p))`.
    pub fn of_platform<P: crate::Platform>(p: &P) -> TagSpec {
        let limit = p.dma_limit();
        TagSpec { dma_mask: limit, coherent_mask: limit, ..TagSpec::new(u64::MAX, u32::MAX) }
    }

    /// Checks that neither mask is wider than the platform's bus (`limit`, inclusive): a
    /// device told it may use addresses the bus cuts off would DMA to the wrong place. Never
    /// a silent clamp, as for a child tag ([`TagSpec::check_narrows`]).
    ///
    /// Errors: [`Error::LimitExceeded`] naming the mask, with its value and the limit.
    pub fn check_platform(&self, limit: u64) -> Result<()> {
        for (what, mask) in [
            ("dma_mask wider than the platform's DMA limit", self.dma_mask),
            ("coherent_mask wider than the platform's DMA limit", self.coherent_mask),
        ] {
            if mask > limit {
                return Err(Error::LimitExceeded { what, requested: mask, limit });
            }
        }
        Ok(())
    }

    /// Checks that `self` (a child) only narrows `parent`.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the first constraint the child widens, with
    /// the child's value.
    pub fn check_narrows(&self, parent: &TagSpec) -> Result<()> {
        let widen = |what, value| Err(Error::InvalidArgument { what, value });
        if self.alignment < parent.alignment {
            return widen("child tag alignment looser than its parent's", self.alignment);
        }
        if parent.boundary != 0 && (self.boundary == 0 || self.boundary > parent.boundary) {
            return widen("child tag boundary looser than its parent's", self.boundary);
        }
        if self.dma_mask > parent.dma_mask {
            return widen("child tag dma_mask above its parent's", self.dma_mask);
        }
        if self.coherent_mask > parent.coherent_mask {
            return widen("child tag coherent_mask above its parent's", self.coherent_mask);
        }
        if let Some(p) = parent.exclusion {
            match self.exclusion {
                Some(c) if c.low <= p.low && c.high >= p.high => {}
                _ => return widen("child tag exclusion window does not cover its parent's", p.low),
            }
        }
        if self.max_size > parent.max_size {
            return widen("child tag max_size above its parent's", self.max_size);
        }
        if self.max_segments > parent.max_segments {
            return widen("child tag max_segments above its parent's", u64::from(self.max_segments));
        }
        if self.max_segment_size > parent.max_segment_size {
            return widen("child tag max_segment_size above its parent's", self.max_segment_size);
        }
        if self.flags.coherent && !parent.flags.coherent {
            return widen("child tag claims coherence its parent lacks", 1);
        }
        if parent.flags.untrusted && !self.flags.untrusted {
            return widen("child tag clears its parent's untrusted flag", 0);
        }
        if self.flags.may_wait && !parent.flags.may_wait {
            return widen("child tag may wait where its parent may not", 1);
        }
        Ok(())
    }
}
