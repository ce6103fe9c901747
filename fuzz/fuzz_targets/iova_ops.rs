//! Fuzz target 1: IOVA allocator op sequences against a reference model.
//!
//! The reference is a `BTreeMap` of live allocations and reserved holes (each live range with
//! the length the tree occupies for it: a class size is rounded up to its class). After every op:
//! no allocation overlaps another or a hole; every constraint of its request holds; a free of
//! a live range succeeds and a free of anything else fails without effect; an allocation
//! fails with `Exhausted` only if no fit exists in the reference's free space; the
//! allocator's own invariant check passes.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, Platform};
use busdma_model::{HostPlatform, MachineConfig};
use libfuzzer_sys::fuzz_target;

/// The space: 256 pages at an odd base, small enough that exhaustion happens often.
const BASE: u64 = 0x10_0000;
const PAGES: u64 = 256;

#[derive(Arbitrary, Debug)]
enum Op {
    Alloc { pages: u8, align_log: u8, boundary_log: u8, limit_pages: u16 },
    Free { pick: u16 },
    FreeBogus { page: u16, pages: u8 },
    FreeWrongSize { pick: u16 },
    Reserve { page: u16, pages: u8 },
    SwitchCpu,
    Flush,
}

fn machine() -> &'static HostPlatform {
    static M: OnceLock<HostPlatform> = OnceLock::new();
    M.get_or_init(|| {
        HostPlatform::new(MachineConfig {
            ram_size: 1 << 20,
            direct_map_size: 1 << 20,
            cpus: 2,
            ..MachineConfig::default()
        })
        .expect("machine")
    })
}

/// True if some range of `size` aligned to `align`, not crossing `boundary`, ending at or
/// below `limit`, avoids every range of `used`.
fn fits(used: &BTreeMap<u64, u64>, size: u64, align: u64, boundary: u64, limit: u64) -> bool {
    let end_space = (BASE + PAGES * PAGE_SIZE).min(limit);
    let mut cursor = BASE;
    let mut gaps = Vec::new();
    for (&s, &l) in used {
        if s > cursor {
            gaps.push((cursor, s));
        }
        cursor = cursor.max(s + l);
    }
    gaps.push((cursor, end_space.max(cursor)));
    gaps.into_iter().any(|(lo, hi)| {
        let hi = hi.min(end_space);
        let mut start = lo.next_multiple_of(align);
        while start + size <= hi {
            if boundary == 0 || start / boundary == (start + size - 1) / boundary {
                return true;
            }
            start = (start / boundary + 1) * boundary;
            start = start.next_multiple_of(align);
        }
        false
    })
}

fuzz_target!(|ops: Vec<Op>| {
    let m = machine();
    let space = AddrRange::from_start_len(Iova::new(BASE), PAGES * PAGE_SIZE).unwrap();
    let a = IovaAllocator::new(space, IovaConfig { cpus: 2, caches: true, guard_page: false }).unwrap();
    let mut live: BTreeMap<u64, u64> = BTreeMap::new();
    let mut used: BTreeMap<u64, u64> = BTreeMap::new(); // live + reserved
    let mut cpu = 0;
    let mut bind = Some(m.bind_cpu(cpu).unwrap());
    for op in ops.into_iter().take(256) {
        let g = m.pin_cpu();
        match op {
            Op::Alloc { pages, align_log, boundary_log, limit_pages } => {
                let size = u64::from(pages % 32 + 1) * PAGE_SIZE;
                let align = PAGE_SIZE << (align_log % 6);
                let boundary = match boundary_log % 8 {
                    0..=3 => 0,
                    b => (size.next_power_of_two() << (b - 4)).max(align),
                };
                let limit = BASE + u64::from(limit_pages % (PAGES as u16 + 16)) * PAGE_SIZE;
                let req = IovaRequest { size, align, boundary, limit: Iova::new(limit) };
                match a.alloc(&g, &req) {
                    Ok(r) => {
                        let (s, l) = (r.start().raw(), r.len());
                        assert_eq!(l, size, "size");
                        assert!(s % align == 0, "alignment {req:?} -> {r:?}");
                        assert!(s + l <= limit && s >= BASE, "limit {req:?} -> {r:?}");
                        assert!(
                            boundary == 0 || s / boundary == (s + l - 1) / boundary,
                            "boundary {req:?} -> {r:?}"
                        );
                        let clash = used.range(..s + l).next_back().is_some_and(|(&us, &ul)| us + ul > s);
                        assert!(!clash, "overlap {r:?} with {used:?}");
                        // The tree holds a class-size range rounded up to its class (a power
                        // of two of at most 64 pages): the reference's free space must know.
                        let occ = a.occupied_len(r.start()).expect("an allocated range is occupied");
                        let class = if l <= 64 * PAGE_SIZE {
                            (l / PAGE_SIZE).next_power_of_two() * PAGE_SIZE
                        } else {
                            l
                        };
                        assert!(occ == l || occ == class, "occupies {occ:#x} for {l:#x}");
                        let clash = used.range(..s + occ).next_back().is_some_and(|(&us, &ul)| us + ul > s);
                        assert!(!clash, "rounded range overlaps {r:?} ({occ:#x}) with {used:?}");
                        live.insert(s, l);
                        used.insert(s, occ);
                    }
                    Err(Error::Exhausted { .. }) => {
                        assert!(!fits(&used, size, align, boundary, limit), "exhausted but {req:?} fits");
                    }
                    Err(e) => panic!("unexpected error {e:?} for {req:?}"),
                }
            }
            Op::Free { pick } => {
                if let Some((&s, &l)) = live.iter().nth(usize::from(pick) % live.len().max(1)) {
                    a.free(&g, AddrRange::from_start_len(Iova::new(s), l).unwrap()).unwrap();
                    live.remove(&s);
                    used.remove(&s);
                    // A second free of the same range is a double free, caught, no effect.
                    let again = a.free(&g, AddrRange::from_start_len(Iova::new(s), l).unwrap());
                    assert!(again.is_err(), "double free accepted");
                }
            }
            Op::FreeBogus { page, pages } => {
                let s = BASE + u64::from(page % PAGES as u16) * PAGE_SIZE;
                let l = u64::from(pages % 8 + 1) * PAGE_SIZE;
                if live.get(&s) != Some(&l) {
                    let r = a.free(&g, AddrRange::from_start_len(Iova::new(s), l).unwrap());
                    assert!(r.is_err(), "free of a range never allocated accepted: {s:#x}+{l:#x}");
                }
            }
            Op::FreeWrongSize { pick } => {
                if let Some((&s, &l)) = live.iter().nth(usize::from(pick) % live.len().max(1)) {
                    let r = a.free(&g, AddrRange::from_start_len(Iova::new(s), l + PAGE_SIZE).unwrap());
                    assert!(r.is_err(), "free with a wrong size accepted");
                }
            }
            Op::Reserve { page, pages } => {
                let s = BASE + u64::from(page % PAGES as u16) * PAGE_SIZE;
                let l = (u64::from(pages % 8 + 1) * PAGE_SIZE).min(BASE + PAGES * PAGE_SIZE - s);
                let r = AddrRange::from_start_len(Iova::new(s), l).unwrap();
                let clash = used.iter().any(|(&us, &ul)| us < s + l && s < us + ul);
                match a.reserve(r) {
                    Ok(()) => {
                        assert!(!clash, "reserve over a live range");
                        used.insert(s, l);
                    }
                    Err(_) => {}
                }
            }
            Op::SwitchCpu => {
                drop(g);
                bind = None;
                cpu = 1 - cpu;
                bind = Some(m.bind_cpu(cpu).unwrap()).or(bind);
                continue;
            }
            Op::Flush => a.flush_caches(),
        }
        a.check_invariants().unwrap();
    }
    drop(bind);
});
