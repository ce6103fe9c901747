//! Invalidation requests, encoded for both methods: register-based (CCMD, IOTLB/IVA registers)
//! and queued (128-bit descriptors), plus the page-selective address-mask computation.
//!
//! # Page-selective invalidation and the address mask
//!
//! A page-selective IOTLB invalidation names an address and a mask AM: it invalidates the
//! 2^AM pages of the naturally aligned block that contains the address, and hardware ignores
//! the address's low AM page bits. The unit accepts AM ≤ CAP.MAMV. So an IOVA range is
//! covered by one request with the smallest AM whose aligned block contains both the first
//! and the last page: AM = the bit length of `first_page XOR last_page`. That block may be up
//! to twice the range (or more, when the range straddles a large alignment boundary):
//! over-invalidation costs only refills. When AM would exceed MAMV, or the unit has no PSI,
//! the driver falls back to a domain-selective invalidation.
#![forbid(unsafe_code)]

use crate::addr::{AddrRange, Iova, PAGE_SHIFT};

use super::entry::{DomainId, SourceId};
use super::regs::{ccmd, iotlb};

/// Which entries an IOTLB invalidation drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbScope {
    /// Everything, every domain.
    Global,
    /// Everything tagged with one domain id.
    Domain(DomainId),
    /// The naturally aligned block of 2^`am` pages at `addr` in one domain.
    Pages {
        /// The domain.
        did: DomainId,
        /// Block address, aligned to 2^(am + 12).
        addr: u64,
        /// Address mask: log2 of the block's page count.
        am: u32,
    },
}

/// Which context-cache entries an invalidation drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextScope {
    /// Every context entry cached.
    Global,
    /// One device's cached entry (tagged with its domain).
    Device(DomainId, SourceId),
}

/// The smallest naturally aligned block covering `range` as `(block address, AM)`, or `None`
/// when its mask would exceed `mamv` (the caller then invalidates the whole domain) or the
/// range is empty.
pub fn psi_block(range: AddrRange<Iova>, mamv: u32) -> Option<(u64, u32)> {
    if range.is_empty() {
        return None;
    }
    let first = range.start().raw() >> PAGE_SHIFT;
    let last = (range.end().raw() - 1) >> PAGE_SHIFT;
    let am = u64::BITS - (first ^ last).leading_zeros();
    if am > mamv {
        return None;
    }
    Some(((first >> am) << am << PAGE_SHIFT, am))
}

/// The IOTLB request for `range` in `did`: page-selective where the unit allows it.
pub fn iotlb_scope(did: DomainId, range: AddrRange<Iova>, psi: bool, mamv: u32) -> IotlbScope {
    match psi_block(range, mamv) {
        Some((addr, am)) if psi => IotlbScope::Pages { did, addr, am },
        _ => IotlbScope::Domain(did),
    }
}

/// Drain flags: set when the unit supports draining, so the invalidation also waits for
/// in-flight DMA that used the dropped translations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drain {
    /// CAP.DRD.
    pub reads: bool,
    /// CAP.DWD.
    pub writes: bool,
}

// ---- register-based ------------------------------------------------------------------------

/// The CCMD value requesting `scope` (function mask 0: the source id is matched whole).
pub const fn ccmd_value(scope: ContextScope) -> u64 {
    match scope {
        ContextScope::Global => ccmd::ICC | ccmd::CIRG_GLOBAL,
        ContextScope::Device(did, sid) => {
            ccmd::ICC | ccmd::CIRG_DEVICE | ((sid.0 as u64) << ccmd::SID_SHIFT) | did.0 as u64
        }
    }
}

/// The `(IVA, IOTLB)` register values requesting `scope`; IVA is written first and only
/// matters for page-selective requests. The invalidation hint (IVA bit 6) stays clear: the
/// caller may have freed table pages, so paging-structure caches must go too.
pub const fn iotlb_registers(scope: IotlbScope, drain: Drain) -> (u64, u64) {
    let mut cmd = iotlb::IVT;
    if drain.reads {
        cmd |= iotlb::DR;
    }
    if drain.writes {
        cmd |= iotlb::DW;
    }
    match scope {
        IotlbScope::Global => (0, cmd | iotlb::IIRG_GLOBAL),
        IotlbScope::Domain(did) => (0, cmd | iotlb::IIRG_DOMAIN | ((did.0 as u64) << iotlb::DID_SHIFT)),
        IotlbScope::Pages { did, addr, am } => {
            (addr | am as u64, cmd | iotlb::IIRG_PAGE | ((did.0 as u64) << iotlb::DID_SHIFT))
        }
    }
}

// ---- queued descriptors --------------------------------------------------------------------

/// Descriptor types (bits 3:0 of word 0).
const TYPE_CONTEXT: u64 = 0x1;
const TYPE_IOTLB: u64 = 0x2;
const TYPE_WAIT: u64 = 0x5;
/// Granularity field (bits 5:4): 1 global, 2 domain, 3 device/page.
const G_GLOBAL: u64 = 1 << 4;
const G_DOMAIN: u64 = 2 << 4;
const G_DEVICE_OR_PAGE: u64 = 3 << 4;
/// Domain id (bits 31:16) in context and IOTLB descriptors.
const DESC_DID_SHIFT: u32 = 16;
/// Source id (bits 47:32) in context descriptors.
const DESC_SID_SHIFT: u32 = 32;
/// IOTLB descriptor drain bits.
const DESC_DR: u64 = 1 << 7;
const DESC_DW: u64 = 1 << 6;
/// Wait descriptor: status write (bit 5), status data in bits 63:32.
const WAIT_SW: u64 = 1 << 5;
const WAIT_DATA_SHIFT: u32 = 32;

/// A context-cache invalidation descriptor.
pub const fn context_desc(scope: ContextScope) -> [u64; 2] {
    match scope {
        ContextScope::Global => [TYPE_CONTEXT | G_GLOBAL, 0],
        ContextScope::Device(did, sid) => [
            TYPE_CONTEXT
                | G_DEVICE_OR_PAGE
                | ((did.0 as u64) << DESC_DID_SHIFT)
                | ((sid.0 as u64) << DESC_SID_SHIFT),
            0,
        ],
    }
}

/// An IOTLB invalidation descriptor (invalidation hint clear, as for the register form).
pub const fn iotlb_desc(scope: IotlbScope, drain: Drain) -> [u64; 2] {
    let mut lo = TYPE_IOTLB;
    if drain.reads {
        lo |= DESC_DR;
    }
    if drain.writes {
        lo |= DESC_DW;
    }
    match scope {
        IotlbScope::Global => [lo | G_GLOBAL, 0],
        IotlbScope::Domain(did) => [lo | G_DOMAIN | ((did.0 as u64) << DESC_DID_SHIFT), 0],
        IotlbScope::Pages { did, addr, am } => {
            [lo | G_DEVICE_OR_PAGE | ((did.0 as u64) << DESC_DID_SHIFT), addr | am as u64]
        }
    }
}

/// An invalidation-wait descriptor: when every earlier descriptor has completed, the unit
/// writes `data` to the 4-byte-aligned physical address `status_pa`.
pub const fn wait_desc(status_pa: u64, data: u32) -> [u64; 2] {
    [TYPE_WAIT | WAIT_SW | ((data as u64) << WAIT_DATA_SHIFT), status_pa & !0b11]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn range(start: u64, end: u64) -> AddrRange<Iova> {
        AddrRange::new(Iova::new(start), Iova::new(end)).unwrap()
    }

    #[test]
    fn one_page_needs_mask_zero() {
        assert_eq!(psi_block(range(0x5000, 0x6000), 0), Some((0x5000, 0)));
        assert_eq!(psi_block(range(0x5010, 0x5020), 0), Some((0x5000, 0)));
    }

    #[test]
    fn an_aligned_power_of_two_range_is_covered_exactly() {
        assert_eq!(psi_block(range(0x10000, 0x20000), 9), Some((0x10000, 4)));
    }

    #[test]
    fn two_pages_straddling_a_boundary_need_a_large_block() {
        // Pages 0x7 and 0x8 differ in bit 3: the block is 16 pages at 0.
        assert_eq!(psi_block(range(0x7000, 0x9000), 9), Some((0, 4)));
        assert_eq!(psi_block(range(0x7000, 0x9000), 3), None);
    }

    #[test]
    fn empty_ranges_have_no_block() {
        assert_eq!(psi_block(AddrRange::empty_at(Iova::new(0x1000)), 9), None);
    }

    #[test]
    fn without_psi_the_domain_is_invalidated() {
        let r = range(0x5000, 0x6000);
        assert_eq!(iotlb_scope(DomainId(3), r, false, 9), IotlbScope::Domain(DomainId(3)));
        assert_eq!(
            iotlb_scope(DomainId(3), r, true, 9),
            IotlbScope::Pages { did: DomainId(3), addr: 0x5000, am: 0 }
        );
    }

    proptest! {
        /// The block covers the range, is naturally aligned, and is minimal: half of it (the
        /// next smaller aligned block containing the first page) would miss the last page.
        #[test]
        fn psi_block_is_the_smallest_aligned_cover(start in 0u64..1 << 40, len in 1u64..1 << 24, mamv in 0u32..64) {
            let r = range(start, start + len);
            let first = start >> 12;
            let last = (start + len - 1) >> 12;
            match psi_block(r, mamv) {
                Some((addr, am)) => {
                    let pages = 1u64 << am;
                    prop_assert!(am <= mamv);
                    prop_assert_eq!((addr >> 12) % pages, 0);
                    prop_assert!(addr >> 12 <= first && last < (addr >> 12) + pages);
                    if am > 0 {
                        let half = pages / 2;
                        prop_assert!(first / half != last / half);
                    }
                }
                None => {
                    // Only when the needed mask is beyond MAMV.
                    let needed = 64 - (first ^ last).leading_zeros();
                    prop_assert!(needed > mamv);
                }
            }
        }
    }

    #[test]
    fn context_command_values_match_the_spec_layout() {
        assert_eq!(ccmd_value(ContextScope::Global), (1 << 63) | (1 << 61));
        let dev = ccmd_value(ContextScope::Device(DomainId(0x42), SourceId(0x0018)));
        assert_eq!(dev, (1 << 63) | (3 << 61) | (0x18 << 16) | 0x42);
    }

    #[test]
    fn iotlb_register_values_match_the_spec_layout() {
        let d = Drain { reads: true, writes: true };
        assert_eq!(iotlb_registers(IotlbScope::Global, Drain::default()), (0, (1 << 63) | (1 << 60)));
        assert_eq!(
            iotlb_registers(IotlbScope::Domain(DomainId(7)), d),
            (0, (1 << 63) | (2 << 60) | (1 << 49) | (1 << 48) | (7 << 32))
        );
        assert_eq!(
            iotlb_registers(IotlbScope::Pages { did: DomainId(7), addr: 0xabc000, am: 2 }, Drain::default()),
            (0xabc002, (1 << 63) | (3 << 60) | (7 << 32))
        );
    }

    #[test]
    fn descriptors_match_the_spec_layout() {
        assert_eq!(context_desc(ContextScope::Global), [0x11, 0]);
        assert_eq!(
            context_desc(ContextScope::Device(DomainId(2), SourceId(0x18))),
            [0x31 | (2 << 16) | (0x18 << 32), 0]
        );
        assert_eq!(iotlb_desc(IotlbScope::Global, Drain::default()), [0x12, 0]);
        assert_eq!(
            iotlb_desc(IotlbScope::Domain(DomainId(5)), Drain { reads: true, writes: false }),
            [0xa2 | (5 << 16), 0]
        );
        assert_eq!(
            iotlb_desc(
                IotlbScope::Pages { did: DomainId(5), addr: 0x40_0000, am: 3 },
                Drain { reads: false, writes: true }
            ),
            [0x72 | (5 << 16), 0x40_0003]
        );
        assert_eq!(wait_desc(0x1234_5678, 9), [0x25 | (9 << 32), 0x1234_5678]);
    }

    /// Reserved bits as QEMU's intel-iommu checks them (it rejects a descriptor with any set):
    /// our encodings never set one.
    #[test]
    fn descriptors_leave_reserved_bits_clear() {
        const CC_RESERVED: u64 = 0xfffc_0000_0000_f1c0;
        const IOTLB_RESERVED: [u64; 2] = [0xffff_ffff_0000_f100, 0xf80];
        const WAIT_RESERVED: [u64; 2] = [0xffff_f180, 0b11];
        let d = Drain { reads: true, writes: true };
        for did in [DomainId(1), DomainId(0xffff)] {
            let c = context_desc(ContextScope::Device(did, SourceId(0xffff)));
            assert_eq!(c[0] & CC_RESERVED, 0);
            for s in
                [IotlbScope::Global, IotlbScope::Domain(did), IotlbScope::Pages { did, addr: !0xfff, am: 63 }]
            {
                let i = iotlb_desc(s, d);
                assert_eq!((i[0] & IOTLB_RESERVED[0], i[1] & IOTLB_RESERVED[1]), (0, 0));
            }
        }
        let w = wait_desc(0xffff_ffff_ffff_fffc, u32::MAX);
        assert_eq!((w[0] & WAIT_RESERVED[0], w[1] & WAIT_RESERVED[1]), (0, 0));
    }
}
