//! Property tests of the front end over `direct`, against a byte-granular reference model:
//! random tags and random scatter-gather loads.

mod common;

use busdma::front::segments::{Constraints, check_segments};
use busdma::front::{Direct, Direction, MemKind, SgEntry, SgList, Tag, TagSpec};
use busdma::{Error, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{DirectPort, DmaPort, FrameRequest};
use proptest::prelude::*;

/// The reference: cut the byte sequence of bus addresses greedily, one byte at a time.
fn reference(spec: &TagSpec, runs: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, &'static str> {
    let total: u64 = runs.iter().map(|r| r.1).sum();
    if total > spec.max_size {
        return Err("size");
    }
    let max_seg = spec.max_segment_size & !(spec.alignment - 1);
    let mut segs: Vec<(u64, u64)> = Vec::new();
    for &(pa, len) in runs {
        if pa + len - 1 > spec.dma_mask {
            return Err("bounce");
        }
        for b in pa..pa + len {
            let extend = match segs.last() {
                Some(&(s, l)) => {
                    s + l == b
                        && l < max_seg
                        && (spec.boundary == 0 || s / spec.boundary == b / spec.boundary)
                }
                None => false,
            };
            if extend {
                segs.last_mut().unwrap().1 += 1;
            } else {
                if b % spec.alignment != 0 {
                    return Err("bounce");
                }
                segs.push((b, 1));
            }
        }
    }
    if segs.len() > spec.max_segments as usize {
        return Err("segments");
    }
    Ok(segs)
}

/// A tag spec and, optionally, the page of the 32-page region where its DMA mask ends.
fn arb_spec() -> impl Strategy<Value = (TagSpec, Option<u64>)> {
    (
        prop_oneof![3 => Just(0u32), 1 => 0u32..=13],
        prop::option::of(9u32..=16),
        1u64..=8,
        1u32..=12,
        any::<bool>(),
        1u64..32,
    )
        .prop_map(move |(al, bd, seg_pages, nsegs, cut, cut_page)| {
            let mut s = TagSpec::new(16 * PAGE_SIZE, nsegs);
            s.alignment = 1 << al;
            s.boundary = bd.map_or(0, |b| (1u64 << b).max(s.alignment));
            s.max_segment_size = (seg_pages * PAGE_SIZE / 3).max(s.alignment);
            (s, cut.then_some(cut_page))
        })
}

/// Runs as (page, offset, len, adjacent-to-previous) within a 32-page region.
fn arb_runs() -> impl Strategy<Value = Vec<(u64, u64, u64, bool)>> {
    prop::collection::vec((0u64..31, 0u64..PAGE_SIZE, 1u64..6000, prop::bool::weighted(0.3)), 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn direct_loads_match_the_reference_and_reach_exactly_the_loaded_bytes(
        (mut spec, cut) in arb_spec(),
        runs in arb_runs(),
    ) {
        let m = common::machine();
        let base = m.frames().alloc(FrameRequest::pages(32)).unwrap().raw();
        if let Some(page) = cut {
            spec.dma_mask = base + page * PAGE_SIZE - 1;
        }
        // Build concrete runs inside the region.
        let mut pr: Vec<(u64, u64)> = Vec::new();
        for &(page, off, len, adj) in &runs {
            let start = match (adj, pr.last()) { (true, Some(&(p, l))) => p + l, _ => base + page * PAGE_SIZE + off };
            let end = (start + len).min(base + 32 * PAGE_SIZE);
            if end > start { pr.push((start, end - start)); }
        }
        prop_assume!(!pr.is_empty());
        // Fill the region with a pattern so each byte is recognisable.
        let pattern: Vec<u8> = (0..32 * PAGE_SIZE).map(|i| (i * 131 % 251) as u8).collect();
        m.write_phys(PhysAddr::new(base), &pattern).unwrap();
        let tag = Tag::new_root(&m, Direct, spec).unwrap();
        let mut map = tag.create_map().unwrap();
        let sg: Vec<SgEntry> = pr.iter().map(|&(pa, len)| SgEntry { pa: PhysAddr::new(pa), len, kind: MemKind::Page }).collect();
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        let got = map.load(&unsafe { SgList::new(&sg) }, Direction::ToDevice).map(|s| s.to_vec());
        match (reference(&spec, &pr), got) {
            (Ok(want), Ok(segs)) => {
                let segs2: Vec<(u64, u64)> = segs.iter().map(|s| (s.addr.raw(), s.len)).collect();
                prop_assert_eq!(&segs2, &want);
                check_segments(&segs, &Constraints::of(&spec)).unwrap();
                // The device, reading every segment by DMA (no IOMMU: bus address = physical
                // address, 64 address lines), sees exactly the loaded bytes in order.
                let port = DirectPort::new(&m, 1, 64);
                let mut seen = Vec::new();
                for s in &segs {
                    let mut b = vec![0u8; s.len as usize];
                    port.dma_read(s.addr, &mut b).unwrap();
                    seen.extend(b);
                }
                let mut want_bytes = Vec::new();
                for &(pa, len) in &pr {
                    want_bytes.extend_from_slice(&pattern[(pa - base) as usize..(pa - base + len) as usize]);
                }
                prop_assert_eq!(seen, want_bytes);
                map.unload().unwrap();
            }
            (Err("size"), Err(e)) => prop_assert!(matches!(e, Error::BadSize { .. }), "{e:?}"),
            (Err("bounce"), Err(e)) => prop_assert!(matches!(e, Error::Unsupported { .. }), "{e:?}"),
            (Err("segments"), Err(e)) => prop_assert!(matches!(e, Error::TooManySegments { .. }), "{e:?}"),
            (want, got) => prop_assert!(false, "reference {want:?}, front end {got:?}, spec {spec:?}, runs {pr:x?}"),
        }
        prop_assert!(!map.is_loaded() && map.segments().is_empty());
    }
}
