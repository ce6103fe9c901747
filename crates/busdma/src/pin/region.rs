//! One registered region: its pinned pages' physical addresses and seed 001's two counters.
//!
//! # Theory
//!
//! 1. **The array.** `hpas[i]` is the host physical address of the `i`-th 4 KiB page of
//!    `[ua, ua + size)`, recorded once at registration while the page is pinned. Translating
//!    `ua + off` is `hpas[off >> 12] + (off & 0xfff)`: O(1), no page-table walk.
//! 2. **Pinned page size.** [`Region::page_shift`] is the largest page (4 KiB, 2 MiB or 1 GiB)
//!    such that the region is made of whole, naturally aligned, physically contiguous pages
//!    of that size. An IOMMU page no larger than it maps pinned memory only; a larger one
//!    would let the device reach the neighbours of the pinned pages, so translation for a
//!    larger IOMMU page is refused (the hole Linux closed in 2018, commit 76fa4975f3ed).
//! 3. **`mapped`** starts at 1 (the registration's own reference), goes up by one for every DMA
//!    mapping of the region ([`Region::mapped_inc`]) and down at unmapping
//!    ([`Region::mapped_dec`]). Only the last unregistration moves it from 1 to 0, by
//!    compare-and-swap; once 0 it never changes again and every `mapped_inc` fails. So the
//!    last unregistration and a new mapping cannot both succeed: one of them sees the other.
//! 4. **`used`** counts registrations of this exact range; it changes only under the
//!    registry's writer lock. Unregistering with `used > 1` just decrements it, mapped or not;
//!    with `used == 1` it needs `mapped == 1` (no DMA mapping), otherwise it answers EBUSY
//!    and `used` stays 1.

use alloc::boxed::Box;

use crate::addr::{PAGE_SHIFT, PAGE_SIZE, PageSize, PhysAddr, UserVa};
use crate::error::{Error, Result};
use crate::sync::{AtomicU64, Ordering};

/// A registered, pinned region of user memory.
///
/// # Invariants
///
/// `hpas.len() == size / PAGE_SIZE > 0`; `ua` and `size` are page-aligned and `ua + size`
/// does not wrap; every page stays pinned until the region is freed.
#[derive(Debug)]
pub struct Region {
    ua: UserVa,
    size: u64,
    page_shift: u32,
    hpas: Box<[PhysAddr]>,
    used: AtomicU64,
    mapped: AtomicU64,
}

impl Region {
    pub(crate) fn new(ua: UserVa, hpas: Box<[PhysAddr]>) -> Self {
        let size = hpas.len() as u64 * PAGE_SIZE;
        let page_shift = pinned_page_shift(ua.raw(), &hpas);
        // INVARIANT: the registry validated `ua` and `size` and pinned every page into `hpas`.
        Self { ua, size, page_shift, hpas, used: AtomicU64::new(1), mapped: AtomicU64::new(1) }
    }

    /// First user address.
    pub fn ua(&self) -> UserVa {
        self.ua
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size >> PAGE_SHIFT
    }

    /// log2 of the largest IOMMU page that may map this region (section 2).
    pub fn page_shift(&self) -> u32 {
        self.page_shift
    }

    /// Registrations of this range (`used`).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// The `mapped` counter: 1 + live DMA mappings while registered, 0 once released.
    pub fn mapped(&self) -> u64 {
        self.mapped.load(Ordering::Acquire)
    }

    /// The physical addresses of the pinned pages, in order.
    pub fn hpas(&self) -> &[PhysAddr] {
        &self.hpas
    }

    /// True if `[ua, ua + len)` lies inside the region.
    pub fn contains(&self, ua: UserVa, len: u64) -> bool {
        ua.offset_from(self.ua).and_then(|off| off.checked_add(len)).is_some_and(|end| end <= self.size)
    }

    /// Counts one more DMA mapping of the region.
    ///
    /// Lock-free; callable in a read section. Errors: [`Error::BadState`] once `mapped` has
    /// reached zero (the region was released; no mapping is accepted any more).
    pub fn mapped_inc(&self) -> Result<()> {
        let mut cur = self.mapped.load(Ordering::Relaxed);
        loop {
            if cur == 0 {
                return Err(Error::BadState { what: "registered region released: mapped is 0" });
            }
            // Acquire on success pairs with nothing in particular; the CAS itself is what
            // orders us against the last unregister's 1 -> 0 CAS (one total order per word).
            match self.mapped.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Counts one DMA mapping of the region gone.
    ///
    /// Lock-free. Errors: [`Error::BadState`] if no mapping is counted (`mapped <= 1`): an
    /// unbalanced decrement would otherwise release the registration's own reference.
    pub fn mapped_dec(&self) -> Result<()> {
        let mut cur = self.mapped.load(Ordering::Relaxed);
        loop {
            if cur <= 1 {
                return Err(Error::BadState { what: "mapped_dec without a matching mapped_inc" });
            }
            match self.mapped.compare_exchange_weak(cur, cur - 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// The last unregistration's release: `mapped` 1 -> 0. Fails with the live mapping count
    /// if DMA mappings remain.
    pub(crate) fn try_release(&self) -> core::result::Result<(), u64> {
        self.mapped.compare_exchange(1, 0, Ordering::AcqRel, Ordering::Acquire).map(|_| ()).map_err(|m| m - 1)
    }

    /// `used += 1` (writer lock held).
    pub(crate) fn get(&self) {
        self.used.fetch_add(1, Ordering::AcqRel);
    }

    /// `used -= 1`, returning what remains (writer lock held, `used >= 1`).
    pub(crate) fn put(&self) -> u64 {
        self.used.fetch_sub(1, Ordering::AcqRel) - 1
    }

    /// Translates `ua` for an IOMMU page of `1 << iommu_shift` bytes.
    ///
    /// Lock-free, allocation-free. Errors: [`Error::BadSize`] if the IOMMU page is larger
    /// than the pinned page size; [`Error::InvalidArgument`] for an IOMMU page below 4 KiB;
    /// [`Error::NotMapped`] if `ua` is outside the region.
    #[inline]
    pub fn ua_to_pa(&self, ua: UserVa, iommu_shift: u32) -> Result<PhysAddr> {
        if iommu_shift > self.page_shift {
            return Err(Error::BadSize { size: 1u64 << iommu_shift.min(63), limit: 1 << self.page_shift });
        }
        if iommu_shift < PAGE_SHIFT {
            return Err(Error::InvalidArgument { what: "IOMMU page shift", value: iommu_shift as u64 });
        }
        let off =
            ua.offset_from(self.ua).filter(|&o| o < self.size).ok_or(Error::NotMapped { addr: ua.raw() })?;
        // In bounds: `off < size` and `hpas.len() == size / PAGE_SIZE`.
        match self.hpas.get((off >> PAGE_SHIFT) as usize) {
            Some(pa) => Ok(PhysAddr::new(pa.raw() | (off & (PAGE_SIZE - 1)))),
            None => Err(Error::NotMapped { addr: ua.raw() }),
        }
    }
}

/// The largest page shift (30, 21 or 12) at which `[ua, ua + 4 KiB * hpas.len())` is made of
/// naturally aligned, physically contiguous pages.
pub(crate) fn pinned_page_shift(ua: u64, hpas: &[PhysAddr]) -> u32 {
    let size = hpas.len() as u64 * PAGE_SIZE;
    for big in [PageSize::Size1G, PageSize::Size2M] {
        let bytes = big.bytes();
        if (ua | size) & (bytes - 1) != 0 {
            continue;
        }
        let per = (bytes / PAGE_SIZE) as usize;
        let whole = hpas.chunks(per).all(|c| {
            c[0].is_aligned(bytes)
                && c.iter().enumerate().all(|(i, pa)| pa.raw() == c[0].raw() + i as u64 * PAGE_SIZE)
        });
        if whole {
            return big.shift();
        }
    }
    PAGE_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn run(base: u64, pages: u64) -> Vec<PhysAddr> {
        (0..pages).map(|i| PhysAddr::new(base + i * PAGE_SIZE)).collect()
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "safe arithmetic only (this file has no unsafe); its 1 GiB case scans a 2^18-entry frame list, minutes under Miri"
    )]
    fn pinned_page_shift_needs_alignment_and_contiguity() {
        assert_eq!(pinned_page_shift(0x20_0000, &run(0x4000_0000, 512)), 21);
        // UA not 2 MiB aligned.
        assert_eq!(pinned_page_shift(0x1000, &run(0x4000_0000, 512)), 12);
        // PA not 2 MiB aligned.
        assert_eq!(pinned_page_shift(0x20_0000, &run(0x4000_1000, 512)), 12);
        // One page out of line.
        let mut v = run(0x4000_0000, 512);
        v[300] = PhysAddr::new(0x9000_0000);
        assert_eq!(pinned_page_shift(0x20_0000, &v), 12);
        // Two 2 MiB pages, not contiguous with each other: still 2 MiB.
        let mut two = run(0x4000_0000, 512);
        two.extend(run(0x8000_0000, 512));
        assert_eq!(pinned_page_shift(0x20_0000, &two), 21);
        assert_eq!(pinned_page_shift(0x4000_0000, &run(0x4000_0000, 1 << 18)), 30);
    }

    #[test]
    fn translation_refuses_an_iommu_page_larger_than_the_pinned_page() {
        let r = Region::new(UserVa::new(0x10_0000), run(0x5000_0000, 4).into_boxed_slice());
        assert_eq!(r.page_shift(), 12);
        assert_eq!(r.ua_to_pa(UserVa::new(0x10_2345), 12), Ok(PhysAddr::new(0x5000_2345)));
        assert_eq!(
            r.ua_to_pa(UserVa::new(0x10_0000), 21),
            Err(Error::BadSize { size: 1 << 21, limit: 1 << 12 })
        );
        assert!(matches!(r.ua_to_pa(UserVa::new(0x10_0000), 11), Err(Error::InvalidArgument { .. })));
        assert_eq!(r.ua_to_pa(UserVa::new(0x10_4000), 12), Err(Error::NotMapped { addr: 0x10_4000 }));
    }
}
