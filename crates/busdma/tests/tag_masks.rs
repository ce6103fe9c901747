//! Separate streaming and coherent masks, FreeBSD's exclusion window and the mapping-size
//! queries: coherent memory lands below the coherent mask; a streaming buffer beyond the
//! streaming mask or inside the exclusion window is bounced and the device reads exactly its
//! bytes; nonsensical windows are refused with their values; the queries say what the caches
//! serve.

use busdma::bounce::{BounceZones, Bounced, ZoneConfig};
use busdma::front::*;
use busdma::quickmap::QuickMaps;
use busdma::{Error, MemAttr, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{DirectPort, DmaPort, FrameRequest, HostPlatform, MachineConfig};

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(128 << 20) }).unwrap()
}

/// `n` fresh pages at or above `at_least`, filled with a pattern.
fn pages_above(m: &HostPlatform, at_least: u64, n: u64) -> (PhysAddr, Vec<u8>) {
    let mut held = Vec::new();
    let pa = loop {
        let pa = m.frames().alloc(FrameRequest::pages(n)).unwrap();
        if pa.raw() >= at_least {
            break pa;
        }
        held.push(pa);
    };
    for p in held {
        m.frames().free(p, n).unwrap();
    }
    let data: Vec<u8> = (0..n * PAGE_SIZE).map(|i| (i as u8).wrapping_mul(31) | 1).collect();
    m.write_phys(pa, &data).unwrap();
    (pa, data)
}

#[test]
fn coherent_memory_lands_below_the_coherent_mask_not_only_the_streaming_one() {
    let m = machine();
    let base = m.ram().start().raw();
    // Use up the low RAM first, so a placement ignoring the coherent mask would land above it.
    let _low = m.frames().alloc(FrameRequest::pages(4)).unwrap();
    let coherent_mask = base + (8 << 20) - 1;
    let spec = TagSpec { coherent_mask, ..TagSpec::new(64 << 10, 8) };
    for _ in 0..64 {
        let mem = DmaMemory::alloc(&m, &spec, 4 * PAGE_SIZE, MemAttr::WriteBack).unwrap();
        assert!(mem.pa().raw() + 4 * PAGE_SIZE - 1 <= coherent_mask, "at {:#x}", mem.pa().raw());
        std::mem::forget(mem);
    }
}

fn bounced_read(spec: TagSpec, at_least: u64) -> (Vec<u64>, bool) {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    let tag = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), spec).unwrap();
    let (pa, data) = pages_above(&m, at_least, 2);
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let segs = map
        .load(&unsafe { RawSegment::new(PhysAddr::new(pa.raw() + 8), 6000) }, Direction::ToDevice)
        .unwrap()
        .to_vec();
    map.sync(SyncOp::PREWRITE).unwrap();
    let port = DirectPort::new(&m, 1, 64);
    let mut got = Vec::new();
    for s in &segs {
        let mut b = vec![0u8; s.len as usize];
        port.dma_read(s.addr, &mut b).unwrap();
        got.extend(b);
    }
    let same = got == data[8..6008];
    let addrs = segs.iter().map(|s| s.addr.raw() + s.len - 1).collect();
    map.unload().unwrap();
    (addrs, same)
}

#[test]
fn a_streaming_buffer_beyond_the_streaming_mask_is_bounced_below_it() {
    let m = machine();
    let mask = m.ram().start().raw() + (32 << 20) - 1;
    drop(m);
    let spec = TagSpec { dma_mask: mask, ..TagSpec::new(64 << 10, 8) };
    let (ends, same) = bounced_read(spec, mask + 1);
    assert!(ends.iter().all(|&e| e <= mask), "segments {ends:x?} below the mask {mask:#x}");
    assert!(same, "the device reads exactly the buffer's bytes");
}

#[test]
fn a_buffer_inside_the_exclusion_window_is_bounced_out_of_it() {
    let m = machine();
    let low = m.ram().start().raw() + (32 << 20) - 1;
    let high = m.ram().start().raw() + (96 << 20) - 1;
    drop(m);
    let spec = TagSpec { exclusion: Some(Exclusion { low, high }), ..TagSpec::new(64 << 10, 8) };
    let (ends, same) = bounced_read(spec, low + 1);
    assert!(ends.iter().all(|&e| e <= low), "segments {ends:x?} outside ({low:#x}, {high:#x}]");
    assert!(same, "the device reads exactly the buffer's bytes");
}

#[test]
fn an_inverted_exclusion_window_is_refused_with_both_bounds() {
    let m = machine();
    let spec = TagSpec {
        exclusion: Some(Exclusion { low: 0x8000_0000, high: 0x4000_0000 }),
        ..TagSpec::new(4096, 1)
    };
    let e = Tag::new_root(&m, Direct, spec).err().unwrap();
    assert_eq!(
        e,
        Error::BadWindow {
            what: "tag exclusion window (lowaddr not below highaddr)",
            low: 0x8000_0000,
            high: 0x4000_0000
        }
    );
}

#[test]
fn a_child_inherits_the_intersection_and_may_not_widen_the_coherent_mask_or_window() {
    let parent = TagSpec {
        coherent_mask: 0xffff_ffff,
        exclusion: Some(Exclusion { low: 0x1_0000_0000, high: 0x2_0000_0000 }),
        ..TagSpec::new(1 << 20, 8)
    };
    let asked = TagSpec {
        dma_mask: 0xff_ffff_ffff,
        exclusion: Some(Exclusion { low: 0x1_8000_0000, high: 0x3_0000_0000 }),
        ..TagSpec::new(1 << 20, 8)
    };
    let child = asked.inherit(&parent);
    assert_eq!(child.coherent_mask, 0xffff_ffff);
    assert_eq!(child.exclusion, Some(Exclusion { low: 0x1_0000_0000, high: 0x3_0000_0000 }));
    child.check_narrows(&parent).unwrap();
    assert_eq!(
        asked.check_narrows(&parent),
        Err(Error::InvalidArgument {
            what: "child tag coherent_mask above its parent's",
            value: u64::MAX - 1
        })
    );
    let no_window = TagSpec { coherent_mask: 0xffff_ffff, ..asked };
    assert_eq!(
        TagSpec { exclusion: None, ..no_window }.check_narrows(&parent),
        Err(Error::InvalidArgument {
            what: "child tag exclusion window does not cover its parent's",
            value: 0x1_0000_0000
        })
    );
}

#[test]
fn the_queries_return_the_load_limit_and_what_the_iova_caches_serve() {
    let m = machine();
    let direct = Tag::new_root(&m, Direct, TagSpec::new(1 << 20, 8)).unwrap();
    assert_eq!(direct.max_mapping_size(), 1 << 20);
    assert_eq!(direct.opt_mapping_size(), 1 << 20, "no IOMMU: every size alike");
}

#[test]
fn a_root_tag_with_a_mask_wider_than_the_platforms_bus_is_refused_naming_the_mask_and_the_limit() {
    let m = machine();
    let limit = m.ram().start().raw() + (32 << 20) - 1;
    m.limit_dma(limit);
    // The default spec claims every address: more than this bus carries.
    let e = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).err().unwrap();
    assert!(
        matches!(e, Error::LimitExceeded { what, requested, limit: l }
            if what.starts_with("dma_mask") && requested == u64::MAX - 1 && l == limit),
        "{e:?}"
    );
    let only_coherent = TagSpec { dma_mask: limit, ..TagSpec::new(64 << 10, 8) };
    let e = Tag::new_root(&m, Direct, only_coherent).err().unwrap();
    assert!(matches!(e, Error::LimitExceeded { what, .. } if what.starts_with("coherent_mask")), "{e:?}");
    // Narrowed against the platform, the same device's tag is accepted and keeps to the bus.
    let spec = TagSpec::new(64 << 10, 8).inherit(&TagSpec::of_platform(&m));
    assert_eq!((spec.dma_mask, spec.coherent_mask), (limit, limit));
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let c = tag.alloc_coherent(PAGE_SIZE, false).unwrap();
    assert!(c.segments().iter().all(|s| s.addr.raw() + s.len - 1 <= limit));
    drop(c);
    // A child cannot widen what the root was narrowed to either.
    assert!(tag.child(TagSpec::new(64 << 10, 8)).is_err());
}

#[test]
fn a_buffer_above_the_exclusion_window_but_below_the_mask_is_not_bounced() {
    let m = machine();
    let low = m.ram().start().raw() + (32 << 20) - 1;
    let high = m.ram().start().raw() + (64 << 20) - 1;
    drop(m);
    let spec = TagSpec { exclusion: Some(Exclusion { low, high }), ..TagSpec::new(64 << 10, 8) };
    // `bounced_read` places the buffer at or above `high + 1`: reachable as it is.
    let (ends, same) = bounced_read(spec, high + 1);
    assert!(ends.iter().all(|&e| e > high), "segments {ends:x?} kept above the window (not bounced)");
    assert!(same, "the device reads exactly the buffer's bytes");
}
