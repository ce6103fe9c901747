//! Typed addresses and half-open ranges.
//!
//! # Theory
//!
//! 1. **One type per address space.** A [`PhysAddr`] is a host physical address, an [`Iova`]
//!    the address a device emits (a bus address), a [`KernVa`] a kernel virtual address and a
//!    [`UserVa`] a user virtual address. They share a representation (`u64`) and nothing else:
//!    converting one into another takes an explicit call that names what it means
//!    (`Iova::identity_of(pa)` for a 1:1 mapping, a direct-map lookup for PA → KVA, ...).
//!
//!    ```compile_fail
//!    use busdma::{Iova, PhysAddr};
//!    let pa = PhysAddr::new(0x1000);
//!    let iova: Iova = pa; // a PA is not an IOVA
//!    ```
//!
//! 2. **Half-open ranges, checked.** An [`AddrRange`] is `[start, end)` with `start <= end`.
//!    Every constructor and every arithmetic step is checked; a range that would wrap past
//!    `u64::MAX` is an [`Error::InvalidRange`], never a silent wrap. Consequently the very
//!    last byte of the 64-bit space cannot be covered: `end` would be 2^64. No IOMMU format
//!    or RAM map reaches it, so nothing is lost.
//! 3. **Empty ranges** exist ([`AddrRange::empty_at`]) but the ordinary constructors
//!    ([`AddrRange::new`], [`AddrRange::from_start_len`]) reject them: a zero-length buffer,
//!    window or mapping means nothing, and accepting it silently hides caller bugs.
//! 4. **Pages.** The base page is 4 KiB ([`PAGE_SIZE`]); [`PageSize`] also names the 2 MiB and
//!    1 GiB block sizes that x86-64 and Arm (4 KiB granule) page tables share.
#![forbid(unsafe_code)]

use core::fmt;

use crate::error::{Error, Result};

/// log2 of the base page size.
pub const PAGE_SHIFT: u32 = 12;
/// The base page size: 4 KiB, the smallest page of every format busdma supports.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Page sizes a page-table entry can map: the 4 KiB base page and the 2 MiB / 1 GiB blocks of
/// a 4 KiB-granule, 512-entries-per-table format (VT-d second level, Arm LPAE, x86-64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB.
    Size4K,
    /// 2 MiB (a level-2 block).
    Size2M,
    /// 1 GiB (a level-3 block).
    Size1G,
}

impl PageSize {
    /// All sizes, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// The size whose byte count is `bytes`, if any.
    pub const fn from_bytes(bytes: u64) -> Option<PageSize> {
        match bytes {
            0x1000 => Some(PageSize::Size4K),
            0x20_0000 => Some(PageSize::Size2M),
            0x4000_0000 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

/// What every address type offers to generic code (ranges, allocators).
pub trait Address: Copy + Ord + fmt::Debug {
    /// A short name of the address space, used in error and debug output.
    const SPACE: &'static str;
    /// Wraps a raw value.
    fn from_raw(raw: u64) -> Self;
    /// The raw value.
    fn raw(self) -> u64;
}

/// True if `align` is a power of two (the only alignments busdma accepts).
pub const fn is_pow2(align: u64) -> bool {
    align != 0 && align & (align - 1) == 0
}

/// The end of bytes `[offset, offset + n)` of an object of `len` bytes, checked: the one
/// bounds check of the by-copy accessors (DMA memory, typed views, heap buffers, chains).
///
/// Errors: [`Error::Overflow`] (the end does not fit in 64 bits), [`Error::OutOfRange`] with
/// the end and `len` (the bytes run past the object).
#[cfg(feature = "alloc")]
#[inline]
pub(crate) fn checked_end(offset: u64, n: u64, len: u64) -> Result<u64> {
    let end = offset.checked_add(n).ok_or(Error::Overflow { base: offset, len: n })?;
    if end > len {
        return Err(Error::OutOfRange { addr: end, limit: len });
    }
    Ok(end)
}

macro_rules! address_type {
    ($(#[$meta:meta])* $name:ident, $space:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw address.
            #[inline]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The raw address.
            #[inline]
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + n`, or `None` on overflow.
            #[inline]
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// `self - n`, or `None` on underflow.
            #[inline]
            pub const fn checked_sub(self, n: u64) -> Option<Self> {
                match self.0.checked_sub(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// `self - base` in bytes, or `None` if `self < base`.
            #[inline]
            pub const fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }

            /// True if the address is a multiple of `align` (a power of two).
            #[inline]
            pub const fn is_aligned(self, align: u64) -> bool {
                debug_assert!(is_pow2(align));
                self.0 & (align - 1) == 0
            }

            /// Rounds down to a multiple of `align` (a power of two).
            #[inline]
            pub const fn align_down(self, align: u64) -> Self {
                debug_assert!(is_pow2(align));
                Self(self.0 & !(align - 1))
            }

            /// Rounds up to a multiple of `align` (a power of two), or `None` on overflow.
            #[inline]
            pub const fn align_up(self, align: u64) -> Option<Self> {
                debug_assert!(is_pow2(align));
                match self.0.checked_add(align - 1) {
                    Some(v) => Some(Self(v & !(align - 1))),
                    None => None,
                }
            }

            /// The offset of the address inside its 4 KiB page.
            #[inline]
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }

            /// The start of the 4 KiB page holding the address.
            #[inline]
            pub const fn page_base(self) -> Self {
                Self(self.0 & !(PAGE_SIZE - 1))
            }
        }

        impl Address for $name {
            const SPACE: &'static str = $space;
            #[inline]
            fn from_raw(raw: u64) -> Self {
                Self(raw)
            }
            #[inline]
            fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($space, " {:#x}"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address_type!(
    /// A host physical address: what RAM and MMIO answer to, and what page tables store.
    PhysAddr,
    "PA"
);
address_type!(
    /// An I/O virtual address (bus address): the address a device emits. Behind an IOMMU it is
    /// translated; without one it equals a physical address by an explicit identity conversion.
    Iova,
    "IOVA"
);
address_type!(
    /// A kernel virtual address: where the CPU reaches memory through the direct map or a
    /// temporary (quick) mapping.
    KernVa,
    "KVA"
);
address_type!(
    /// A user virtual address, in some process (or guest) address space.
    UserVa,
    "UA"
);

impl Iova {
    /// The bus address equal to a physical address: used by identity and passthrough
    /// strategies, where the device emits physical addresses.
    #[inline]
    pub const fn identity_of(pa: PhysAddr) -> Iova {
        Iova(pa.0)
    }
}

/// A half-open range `[start, end)` of addresses of one space.
///
/// # Invariants
///
/// `start <= end`. Constructed only through checked arithmetic; never wraps.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrRange<A: Address> {
    start: A,
    end: A,
}

impl<A: Address> AddrRange<A> {
    /// `[start, end)`; rejects `start >= end` (empty or reversed).
    pub fn new(start: A, end: A) -> Result<Self> {
        if start.raw() >= end.raw() {
            return Err(Error::InvalidRange { start: start.raw(), end: end.raw() });
        }
        // INVARIANT: start < end.
        Ok(Self { start, end })
    }

    /// `[start, start + len)`; rejects `len == 0` and a range that would wrap.
    pub fn from_start_len(start: A, len: u64) -> Result<Self> {
        match start.raw().checked_add(len) {
            Some(end) if len > 0 => Ok(Self { start, end: A::from_raw(end) }),
            Some(_) => Err(Error::InvalidRange { start: start.raw(), end: start.raw() }),
            None => Err(Error::Overflow { base: start.raw(), len }),
        }
    }

    /// The empty range `[at, at)`.
    pub fn empty_at(at: A) -> Self {
        Self { start: at, end: at }
    }

    /// First address in the range.
    #[inline]
    pub fn start(&self) -> A {
        self.start
    }

    /// First address past the range.
    #[inline]
    pub fn end(&self) -> A {
        self.end
    }

    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> u64 {
        self.end.raw() - self.start.raw()
    }

    /// True if the range holds no byte.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// True if `a` lies inside the range.
    #[inline]
    pub fn contains(&self, a: A) -> bool {
        self.start <= a && a < self.end
    }

    /// True if `other` lies entirely inside this range (an empty `other` is inside if its
    /// position is).
    #[inline]
    pub fn contains_range(&self, other: &Self) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// True if the two ranges share at least one byte.
    #[inline]
    pub fn overlaps(&self, other: &Self) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The bytes both ranges hold, if any.
    pub fn intersection(&self, other: &Self) -> Option<Self> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(Self { start, end })
    }

    /// The address `offset` bytes into the range; `offset` must be `< len()`.
    pub fn at(&self, offset: u64) -> Result<A> {
        if offset >= self.len() {
            return Err(Error::OutOfRange { addr: offset, limit: self.len() });
        }
        Ok(A::from_raw(self.start.raw() + offset))
    }

    /// True if both ends are multiples of `align` (a power of two).
    pub fn is_aligned(&self, align: u64) -> bool {
        debug_assert!(is_pow2(align));
        (self.start.raw() | self.end.raw()) & (align - 1) == 0
    }

    /// The smallest range of whole `align`-sized blocks covering this one.
    pub fn align_out(&self, align: u64) -> Result<Self> {
        if !is_pow2(align) {
            return Err(Error::BadAlignment { align });
        }
        let start = self.start.raw() & !(align - 1);
        let end = self
            .end
            .raw()
            .checked_add(align - 1)
            .ok_or(Error::Overflow { base: self.end.raw(), len: align - 1 })?
            & !(align - 1);
        Ok(Self { start: A::from_raw(start), end: A::from_raw(end) })
    }

    /// Splits at `mid` into `[start, mid)` and `[mid, end)`; `mid` must lie inside or at the
    /// ends.
    pub fn split_at(&self, mid: A) -> Result<(Self, Self)> {
        if mid < self.start || mid > self.end {
            return Err(Error::OutOfRange { addr: mid.raw(), limit: self.end.raw() });
        }
        Ok((Self { start: self.start, end: mid }, Self { start: mid, end: self.end }))
    }
}

impl<A: Address> fmt::Debug for AddrRange<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{:#x}, {:#x})", A::SPACE, self.start.raw(), self.end.raw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn page_sizes_round_trip() {
        for s in PageSize::ALL {
            assert_eq!(PageSize::from_bytes(s.bytes()), Some(s));
        }
        assert_eq!(PageSize::from_bytes(8192), None);
    }

    #[test]
    fn empty_and_reversed_ranges_are_rejected() {
        let a = PhysAddr::new(0x1000);
        assert!(matches!(AddrRange::new(a, a), Err(Error::InvalidRange { .. })));
        assert!(matches!(
            AddrRange::new(PhysAddr::new(2), PhysAddr::new(1)),
            Err(Error::InvalidRange { start: 2, end: 1 })
        ));
        assert!(AddrRange::from_start_len(a, 0).is_err());
        assert!(AddrRange::empty_at(a).is_empty());
    }

    #[test]
    fn align_out_covers_whole_pages() {
        let r = AddrRange::from_start_len(Iova::new(0x1ff0), 0x20).unwrap();
        let p = r.align_out(PAGE_SIZE).unwrap();
        assert_eq!((p.start().raw(), p.end().raw()), (0x1000, 0x3000));
        assert!(r.align_out(3).is_err());
        let top = AddrRange::from_start_len(Iova::new(u64::MAX - 10), 5).unwrap();
        assert!(matches!(top.align_out(PAGE_SIZE), Err(Error::Overflow { .. })));
    }

    proptest! {
        #[test]
        fn from_start_len_rejects_exactly_the_wrapping_ranges(start: u64, len: u64) {
            let r = AddrRange::from_start_len(Iova::new(start), len);
            match start.checked_add(len) {
                None => prop_assert!(matches!(r, Err(Error::Overflow { .. })), "expected overflow"),
                Some(_) if len == 0 => prop_assert!(r.is_err()),
                Some(end) => {
                    let r = r.unwrap();
                    prop_assert_eq!(r.end().raw(), end);
                    prop_assert_eq!(r.len(), len);
                }
            }
        }

        #[test]
        fn new_accepts_only_ordered_nonempty_ranges(a: u64, b: u64) {
            let r = AddrRange::new(KernVa::new(a), KernVa::new(b));
            prop_assert_eq!(r.is_ok(), a < b);
        }

        #[test]
        fn address_arithmetic_never_wraps(a: u64, n: u64) {
            let pa = PhysAddr::new(a);
            prop_assert_eq!(pa.checked_add(n).map(PhysAddr::raw), a.checked_add(n));
            prop_assert_eq!(pa.checked_sub(n).map(PhysAddr::raw), a.checked_sub(n));
            prop_assert_eq!(pa.align_up(PAGE_SIZE).map(PhysAddr::raw),
                a.checked_add(PAGE_SIZE - 1).map(|v| v & !(PAGE_SIZE - 1)));
        }

        #[test]
        fn intersection_is_what_both_contain(a in 0u64..1000, al in 1u64..100, b in 0u64..1000, bl in 1u64..100, x in 0u64..1200) {
            let ra = AddrRange::from_start_len(UserVa::new(a), al).unwrap();
            let rb = AddrRange::from_start_len(UserVa::new(b), bl).unwrap();
            let both = ra.contains(UserVa::new(x)) && rb.contains(UserVa::new(x));
            let i = ra.intersection(&rb);
            prop_assert_eq!(i.is_some(), ra.overlaps(&rb));
            prop_assert_eq!(i.is_some_and(|i| i.contains(UserVa::new(x))), both);
        }
    }
}
