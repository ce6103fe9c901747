//! The segment builder: bus-address runs in, tag-conforming segments out.
//!
//! # Theory
//!
//! 1. **Input.** A strategy feeds the builder the bus-address runs of a load in order (one run
//!    per piece of memory it placed: a physical run for `direct`, an IOVA run for the IOMMU
//!    strategies). The builder knows nothing of where the addresses came from.
//! 2. **Coalescing.** A run that starts exactly where the last segment ends extends that
//!    segment, as far as the maximum segment size and the boundary allow.
//! 3. **Splitting.** A segment never crosses a multiple of the boundary and is never longer
//!    than the effective maximum segment size, which is the tag's maximum rounded down to the
//!    alignment (the tag guarantees it is at least the alignment). Splits therefore happen at
//!    aligned bus addresses: a boundary is a multiple of the alignment (the tag checks it), and
//!    a maximal piece is a multiple of it.
//! 4. **Alignment.** Every segment starts at a bus address aligned to the tag's alignment. By
//!    (3) only a run that opens a new segment can break this; the builder rejects it with
//!    [`Error::Misaligned`] and the strategy decides (bounce, or fail).
//! 5. **Reach.** Every byte lies at or below the tag's DMA mask; a run beyond it is rejected
//!    with [`Error::OutOfRange`] (again the strategy decides: the IOMMU strategies never
//!    produce one, `direct` turns it into a bounce request).
//! 6. **Counting without storing.** Segments are written into the map's preallocated array
//!    (no allocation on the load path). When the tag's segment limit is reached the builder
//!    keeps *counting* (without storing) so the final [`Error::TooManySegments`] reports how
//!    many the load really needs.
//! 7. **Optimality.** Greedy coalescing is minimal: with the bus-address sequence fixed, each
//!    segment is as long as the constraints allow, so no other cut uses fewer segments. The
//!    property tests compare against a byte-granular reference that cuts greedily too.
#![forbid(unsafe_code)]

use alloc::vec::Vec;

use crate::addr::{Iova, is_pow2};
use crate::error::{Error, Result};

use super::spec::TagSpec;

/// One contiguous run of bus addresses the device may use: `[addr, addr + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First bus address.
    pub addr: Iova,
    /// Length in bytes (> 0).
    pub len: u64,
}

impl Segment {
    /// The bus address one past the last byte.
    #[inline]
    pub fn end(&self) -> u64 {
        // The builder only stores segments whose end it computed with checked arithmetic.
        self.addr.raw().wrapping_add(self.len)
    }
}

/// The constraints the builder enforces, copied from a tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Constraints {
    /// Every segment starts at a multiple of this (a power of two).
    pub align: u64,
    /// No segment crosses a multiple of this (a power of two), or 0 for none.
    pub boundary: u64,
    /// Longest segment, rounded down to `align` (≥ `align`).
    pub max_seg: u64,
    /// Most segments per load.
    pub max_segments: u32,
    /// Highest reachable bus address (inclusive).
    pub dma_mask: u64,
    /// Bus addresses `(excluded.0, excluded.1]` under the mask the device cannot reach either
    /// (the tag's exclusion window); `(u64::MAX, 0)`, which no address meets, for none.
    pub excluded: (u64, u64),
}

/// No exclusion window ([`Constraints::excluded`]).
pub const NO_WINDOW: (u64, u64) = (u64::MAX, 0);

impl Constraints {
    /// The constraints of a (validated) tag.
    #[inline]
    pub fn of(spec: &TagSpec) -> Self {
        Self {
            align: spec.alignment,
            boundary: spec.boundary,
            max_seg: spec.max_segment_size & !(spec.alignment - 1),
            max_segments: spec.max_segments,
            dma_mask: spec.dma_mask,
            excluded: spec.exclusion.filter(|w| w.low < spec.dma_mask).map_or(NO_WINDOW, |w| (w.low, w.high)),
        }
    }

    /// Checks the constraints the builder relies on: `align` a power of two (not 0),
    /// `boundary` 0 or a power of two, `max_seg` at least `align` (so never 0: a builder that
    /// could take no byte per segment would never finish).
    ///
    /// Errors: [`Error::BadAlignment`] with the alignment or boundary at fault;
    /// [`Error::BadSize`] with the maximum segment size and the alignment it must reach.
    pub fn validate(&self) -> Result<()> {
        if !is_pow2(self.align) {
            return Err(Error::BadAlignment { align: self.align });
        }
        if self.boundary != 0 && !is_pow2(self.boundary) {
            return Err(Error::BadAlignment { align: self.boundary });
        }
        if self.max_seg < self.align {
            return Err(Error::BadSize { size: self.max_seg, limit: self.align });
        }
        Ok(())
    }

    /// Bytes a segment starting at `addr` may hold before hitting the next boundary.
    #[inline]
    fn room_to_boundary(&self, addr: u64) -> u64 {
        if self.boundary == 0 { u64::MAX } else { self.boundary - (addr & (self.boundary - 1)) }
    }
}

/// Builds the segments of one load into a preallocated array.
///
/// # Invariants
///
/// `out.len() <= max_segments <= out.capacity()`, so pushes never allocate; every stored
/// segment satisfies every constraint of [`Constraints`].
pub struct SegmentBuilder<'a> {
    out: &'a mut Vec<Segment>,
    c: Constraints,
    /// Segments the load needs so far (may exceed what is stored).
    needed: u64,
    /// End of the last counted segment, and its length (for coalescing past the stored ones).
    last_end: Option<u64>,
    last_start: u64,
    last_len: u64,
}

impl<'a> SegmentBuilder<'a> {
    /// A builder writing into `out` (cleared). `out` must have capacity for
    /// `c.max_segments` entries (the map allocates it at create time).
    ///
    /// Errors: those of [`Constraints::validate`] (an alignment of 0, a maximum segment size
    /// of 0 or below the alignment, ...); nothing is cleared then.
    pub fn new(out: &'a mut Vec<Segment>, c: Constraints) -> Result<Self> {
        c.validate()?;
        out.clear();
        debug_assert!(out.capacity() >= c.max_segments as usize);
        Ok(Self { out, c, needed: 0, last_end: None, last_start: 0, last_len: 0 })
    }

    /// A builder for the constraints of a tag's spec: no check, because a tag's spec was
    /// validated when the tag was made ([`TagSpec::validate`]: alignment a power of two, the
    /// longest segment at least the alignment), which makes [`Constraints::of`] valid. The
    /// map path's builder (a check per load cost about 30 instructions a packet).
    #[inline]
    pub(crate) fn for_tag(out: &'a mut Vec<Segment>, spec: &TagSpec) -> Self {
        let c = Constraints::of(spec);
        debug_assert!(c.validate().is_ok(), "a tag's spec was validated at creation: {c:?}");
        out.clear();
        debug_assert!(out.capacity() >= c.max_segments as usize);
        Self { out, c, needed: 0, last_end: None, last_start: 0, last_len: 0 }
    }

    /// The constraints in force.
    pub fn constraints(&self) -> &Constraints {
        &self.c
    }

    /// Whether a run starting at `addr` would extend the last segment.
    #[inline]
    pub fn continues(&self, addr: u64) -> bool {
        self.last_end == Some(addr)
    }

    /// Appends the bus run `[addr, addr + len)`, coalescing and splitting as the theory says.
    ///
    /// Errors (nothing stored for the run beyond what was stored before the failing byte; the
    /// caller abandons the whole load): [`Error::Overflow`] (the run wraps),
    /// [`Error::OutOfRange`] (beyond the DMA mask), [`Error::Misaligned`] (a new segment would
    /// start unaligned). Too many segments is reported by [`SegmentBuilder::finish`].
    #[inline(always)]
    pub fn push(&mut self, addr: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = addr.checked_add(len).ok_or(Error::Overflow { base: addr, len })?;
        if end - 1 > self.c.dma_mask {
            return Err(Error::OutOfRange { addr: end - 1, limit: self.c.dma_mask });
        }
        if addr <= self.c.excluded.1 && end - 1 > self.c.excluded.0 {
            return Err(Error::OutOfRange {
                addr: addr.max(self.c.excluded.0 + 1),
                limit: self.c.excluded.0,
            });
        }
        let (mut a, mut left) = (addr, len);
        // Extend the last segment while it is contiguous, inside its boundary window and short
        // of the maximum length.
        if self.last_end == Some(a) {
            let room = (self.c.max_seg - self.last_len)
                .min(self.c.room_to_boundary(self.last_start) - self.last_len);
            let take = room.min(left);
            if take > 0 {
                self.last_len += take;
                if self.needed <= u64::from(self.c.max_segments) {
                    if let Some(s) = self.out.last_mut() {
                        s.len += take;
                    }
                }
                a += take;
                left -= take;
            }
        }
        while left > 0 {
            if a & (self.c.align - 1) != 0 {
                return Err(Error::Misaligned { value: a, align: self.c.align });
            }
            let take = left.min(self.c.max_seg).min(self.c.room_to_boundary(a));
            self.needed += 1;
            if self.needed <= u64::from(self.c.max_segments) {
                // INVARIANT: needed <= max_segments <= capacity, so this push never allocates.
                self.out.push(Segment { addr: Iova::new(a), len: take });
            }
            self.last_start = a;
            self.last_len = take;
            a += take;
            left -= take;
        }
        self.last_end = Some(end);
        Ok(())
    }

    /// Segments needed so far.
    pub fn needed(&self) -> u64 {
        self.needed
    }

    /// [`Error::TooManySegments`] if the runs pushed so far already need more segments than
    /// the tag allows. Strategies that map memory call it after placing (pushing) every run and
    /// before mapping anything, so an over-long load fails before it costs anything.
    pub fn check(&self) -> Result<()> {
        if self.needed > u64::from(self.c.max_segments) {
            return Err(Error::TooManySegments { needed: self.needed, max: u64::from(self.c.max_segments) });
        }
        Ok(())
    }

    /// Ends the load: [`Error::TooManySegments`] if it needed more segments than the tag
    /// allows (the stored prefix is then meaningless and the caller clears it).
    pub fn finish(self) -> Result<usize> {
        if self.needed > u64::from(self.c.max_segments) {
            return Err(Error::TooManySegments { needed: self.needed, max: u64::from(self.c.max_segments) });
        }
        Ok(self.out.len())
    }
}

/// Checks one segment list against constraints (used by tests and the debug checker).
pub fn check_segments(segs: &[Segment], c: &Constraints) -> Result<()> {
    if segs.len() > c.max_segments as usize {
        return Err(Error::TooManySegments { needed: segs.len() as u64, max: u64::from(c.max_segments) });
    }
    for s in segs {
        let a = s.addr.raw();
        if s.len == 0 || !is_pow2(c.align) {
            return Err(Error::ZeroSize);
        }
        if a & (c.align - 1) != 0 {
            return Err(Error::Misaligned { value: a, align: c.align });
        }
        if s.len > c.max_seg {
            return Err(Error::BadSize { size: s.len, limit: c.max_seg });
        }
        let end = a.checked_add(s.len).ok_or(Error::Overflow { base: a, len: s.len })?;
        if s.len > c.room_to_boundary(a) {
            return Err(Error::InvalidRange { start: a, end });
        }
        if end - 1 > c.dma_mask {
            return Err(Error::OutOfRange { addr: end - 1, limit: c.dma_mask });
        }
        if a <= c.excluded.1 && end - 1 > c.excluded.0 {
            return Err(Error::OutOfRange { addr: a.max(c.excluded.0 + 1), limit: c.excluded.0 });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(align: u64, boundary: u64, max_seg: u64, max_segments: u32) -> Constraints {
        Constraints { align, boundary, max_seg, max_segments, dma_mask: u64::MAX - 1, excluded: NO_WINDOW }
    }

    fn build(c: Constraints, runs: &[(u64, u64)]) -> Result<Vec<Segment>> {
        let mut v = Vec::with_capacity(c.max_segments as usize);
        let mut b = SegmentBuilder::new(&mut v, c)?;
        for &(a, l) in runs {
            b.push(a, l)?;
        }
        b.finish()?;
        Ok(v)
    }

    #[test]
    fn contiguous_runs_coalesce_into_one_segment() {
        let s = build(c(1, 0, 1 << 20, 4), &[(0x1000, 0x800), (0x1800, 0x800), (0x2000, 0x1000)]).unwrap();
        assert_eq!(s, [Segment { addr: Iova::new(0x1000), len: 0x2000 }]);
    }

    #[test]
    fn segments_split_at_the_boundary_and_the_maximum_size() {
        let s = build(c(1, 0x1000, 0x800, 8), &[(0x1c00, 0x1800)]).unwrap();
        let got: Vec<_> = s.iter().map(|s| (s.addr.raw(), s.len)).collect();
        assert_eq!(got, [(0x1c00, 0x400), (0x2000, 0x800), (0x2800, 0x800), (0x3000, 0x400)]);
    }

    #[test]
    fn too_many_segments_reports_how_many_are_needed() {
        let e = build(c(1, 0, 0x1000, 2), &[(0, 0x4000)]).unwrap_err();
        assert_eq!(e, Error::TooManySegments { needed: 4, max: 2 });
    }

    #[test]
    fn a_new_segment_must_start_aligned() {
        let e = build(c(0x100, 0, 0x1000, 4), &[(0x1000, 0x10), (0x2008, 0x10)]).unwrap_err();
        assert_eq!(e, Error::Misaligned { value: 0x2008, align: 0x100 });
    }

    #[test]
    fn a_zero_alignment_is_refused_not_a_panic() {
        assert_eq!(build(c(0, 0, 0x1000, 4), &[(0, 0x10)]), Err(Error::BadAlignment { align: 0 }));
        assert_eq!(build(c(3, 0, 0x1000, 4), &[(0, 0x10)]), Err(Error::BadAlignment { align: 3 }));
        assert_eq!(build(c(1, 0x300, 0x1000, 4), &[(0, 0x10)]), Err(Error::BadAlignment { align: 0x300 }));
    }

    #[test]
    fn a_zero_maximum_segment_size_is_refused_not_a_hang() {
        assert_eq!(build(c(1, 0, 0, 4), &[(0, 0x10)]), Err(Error::BadSize { size: 0, limit: 1 }));
        // What `Constraints::of` makes of a tag whose maximum is below its alignment.
        assert_eq!(
            build(c(1 << 63, 0, 0, 4), &[(0, 1), (1 << 63, 1), (u64::MAX - 1, 1)]),
            Err(Error::BadSize { size: 0, limit: 1 << 63 })
        );
        assert_eq!(
            build(c(0x100, 0, 0x80, 4), &[(0, 0x10)]),
            Err(Error::BadSize { size: 0x80, limit: 0x100 })
        );
    }

    #[test]
    fn a_segment_list_whose_end_wraps_is_an_error_not_a_panic() {
        let k = c(1, 1 << 62, u64::MAX, 4);
        let s = [Segment { addr: Iova::new(u64::MAX - 0xf), len: 1 << 62 }];
        assert_eq!(check_segments(&s, &k), Err(Error::Overflow { base: u64::MAX - 0xf, len: 1 << 62 }));
    }

    mod near_2_pow_63 {
        use super::*;
        use proptest::prelude::*;

        fn power(lo: u32) -> impl Strategy<Value = u64> {
            (lo..64u32).prop_map(|s| 1u64 << s)
        }

        proptest! {
            /// Alignments, boundaries and maximum sizes near 2^63, three runs anywhere in the
            /// 64-bit space: the builder returns segments that meet the constraints, or an
            /// error; never a panic, an overflow or a loop that does not end.
            #[test]
            fn layouts_near_2_pow_63_give_valid_segments_or_an_error(
                align in power(58),
                boundary in prop_oneof![Just(0u64), power(58)],
                max_seg in prop_oneof![Just(0u64), power(58), Just(u64::MAX)],
                runs in proptest::collection::vec(
                    (
                        prop_oneof![any::<u64>(), (0u64..4).prop_map(|k| k << 62)],
                        prop_oneof![any::<u64>(), (1u64..4).prop_map(|k| k << 62), 1u64..0x1000],
                    ),
                    3,
                ),
            ) {
                let k = Constraints {
                    align,
                    boundary,
                    max_seg: max_seg & !(align - 1),
                    max_segments: 4,
                    dma_mask: u64::MAX,
                    excluded: NO_WINDOW,
                };
                if let Ok(segs) = build(k, &runs) {
                    prop_assert_eq!(check_segments(&segs, &k), Ok(()));
                }
            }
        }
    }

    #[test]
    fn runs_in_the_exclusion_window_are_rejected_and_runs_above_it_accepted() {
        let mut k = c(1, 0, 0x10000, 4);
        k.excluded = (0x2fff, 0x5fff);
        assert!(build(k, &[(0x1000, 0x2000)]).is_ok());
        assert!(build(k, &[(0x6000, 0x1000)]).is_ok());
        assert_eq!(build(k, &[(0x5fff, 2)]).unwrap_err(), Error::OutOfRange { addr: 0x5fff, limit: 0x2fff });
        assert_eq!(
            build(k, &[(0x2f00, 0x200)]).unwrap_err(),
            Error::OutOfRange { addr: 0x3000, limit: 0x2fff }
        );
        let inside = [Segment { addr: Iova::new(0x4000), len: 0x10 }];
        assert_eq!(check_segments(&inside, &k), Err(Error::OutOfRange { addr: 0x4000, limit: 0x2fff }));
    }

    #[test]
    fn runs_beyond_the_mask_are_rejected() {
        let mut k = c(1, 0, 0x1000, 4);
        k.dma_mask = 0xffff;
        assert_eq!(
            build(k, &[(0xff00, 0x200)]).unwrap_err(),
            Error::OutOfRange { addr: 0x100ff, limit: 0xffff }
        );
    }
}
