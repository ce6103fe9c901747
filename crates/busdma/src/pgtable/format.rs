//! The format trait: what one page-table entry's bits mean, and nothing else.
#![forbid(unsafe_code)]

use super::Prot;
use crate::addr::{PAGE_SHIFT, PhysAddr};
use crate::error::{Error, Result};

/// Input-address bits one table level resolves: 512 entries of 8 bytes fill a 4 KiB page.
pub const BITS_PER_LEVEL: u32 = 9;
/// Entries per table.
pub const ENTRIES: usize = 1 << BITS_PER_LEVEL;

/// log2 of the span one entry at `height` maps (height 0: 4 KiB; 1: 2 MiB; 2: 1 GiB; 3: 512 GiB).
#[inline]
pub const fn height_shift(height: u32) -> u32 {
    PAGE_SHIFT + BITS_PER_LEVEL * height
}

/// Bytes one entry at `height` maps.
#[inline]
pub const fn height_span(height: u32) -> u64 {
    1 << height_shift(height)
}

/// The bits of one page-table format.
///
/// Heights count from the leaves: an entry at height 0 maps 4 KiB, at height 1 2 MiB, at
/// height 2 1 GiB, at height 3 512 GiB. Every method is a pure function of its arguments; the
/// walker supplies the height because most formats encode "leaf or table" differently per
/// level.
///
/// # Invariants an implementation keeps
///
/// - Zero is "not present", and every entry the format builds is present (so an entry is in
///   use exactly when it is non-zero).
/// - [`PteFormat::output`] of [`PteFormat::make_table`]`(pa)` is `pa`, and of
///   [`PteFormat::make_leaf`]`(pa, prot, h)` is `pa`, for every aligned `pa` below
///   `2^OUTPUT_BITS`.
/// - The address field is linear: `make_leaf(pa + d, prot, h) == make_leaf(pa, prot, h) + d`
///   for `d` a multiple of the height's span with `pa + d` below `2^OUTPUT_BITS` (the walker
///   steps through a run of leaves by adding, and splits blocks the same way).
pub trait PteFormat: Send + Sync + 'static {
    /// Short name, for reports.
    const NAME: &'static str;
    /// Width of the output (physical) addresses an entry can hold.
    const OUTPUT_BITS: u32;
    /// The largest height whose entries may be leaves (blocks): 2 (1 GiB) for both formats.
    const MAX_LEAF_HEIGHT: u32;

    /// Levels of a table with `input_bits` of input address, or an error if the format does
    /// not support that width.
    fn levels(input_bits: u32) -> Result<u32> {
        match input_bits {
            // (39 - 12) / 9 = 3 levels; (48 - 12) / 9 = 4 levels.
            39 | 48 => Ok((input_bits - PAGE_SHIFT) / BITS_PER_LEVEL),
            _ => Err(Error::InvalidArgument {
                what: "page-table input width (39 or 48 bits)",
                value: input_bits as u64,
            }),
        }
    }

    /// The rights a leaf built for `prot` really grants (a format may have to round up), or an
    /// error if it can express none.
    fn effective_prot(prot: Prot) -> Result<Prot>;

    /// True if the entry is present (the walker descends or translates through it).
    fn is_present(pte: u64) -> bool;

    /// True if the present entry `pte` at `height` is a leaf (page or block), false if it
    /// points to a next-level table.
    fn is_leaf(pte: u64, height: u32) -> bool;

    /// An entry at height ≥ 1 pointing to the table page at `table`.
    fn make_table(table: PhysAddr) -> u64;

    /// A leaf at `height` (≤ [`PteFormat::MAX_LEAF_HEIGHT`]) mapping `pa` (aligned to the
    /// height's span) with `prot` (already passed through [`PteFormat::effective_prot`]).
    fn make_leaf(pa: PhysAddr, prot: Prot, height: u32) -> u64;

    /// The address an entry holds: the next table's, or the leaf's output address.
    fn output(pte: u64, height: u32) -> PhysAddr;

    /// The rights a leaf grants.
    fn prot(pte: u64) -> Prot;

    /// The leaf at `height - 1` that maps the first sub-span of the block `pte` at `height`,
    /// with every attribute of the block; the others are it plus `i * height_span(height - 1)`.
    fn split_block(pte: u64, height: u32) -> u64;
}
