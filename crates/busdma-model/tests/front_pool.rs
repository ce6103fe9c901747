//! Pools of small coherent blocks (`busdma::front::pool`): blocks never overlap, never cross
//! the boundary, respect the alignment, come back zeroed, and are all returned; the device
//! reaches each block at its bus address through the model IOMMU; the pages are freed (after
//! the unmap) only when the pool and every block are gone.

mod common;

use busdma::dma::{Iommu, Policy};
use busdma::front::{Direct, DmaBlock, Tag, TagSpec};
use busdma::quickmap::QuickMaps;
use busdma::{Error, Iova, PAGE_SIZE};
use busdma_model::{DirectPort, DmaPort, HostPlatform, IommuConfig, ModelIommu};
use proptest::prelude::*;

const DEV: u32 = 0x18;

fn device_bytes(port: &dyn DmaPort, bus: Iova, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    port.dma_read(bus, &mut b).unwrap();
    b
}

#[test]
fn the_device_reaches_each_pool_block_at_its_bus_address_through_the_iommu() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, ModelIommu::new(&m, IommuConfig::default()).unwrap()).unwrap();
    // The IOMMU's first attach and the table-page cache behind the first mapping keep a few
    // frames for good: count from after one attach that maps a page.
    {
        let dev = iommu.attach(DEV, Policy::Strict).unwrap();
        drop(dev.tag(TagSpec::new(PAGE_SIZE, 1)).unwrap().alloc_coherent(PAGE_SIZE, false).unwrap());
    }
    let free_before = m.frames().free_frames();
    {
        let dev = iommu.attach(DEV, Policy::Strict).unwrap();
        let mut spec = TagSpec::new(16 * PAGE_SIZE, 4);
        spec.flags.coherent = true;
        let tag = dev.tag(spec).unwrap();
        let port = iommu.hw().port(DEV);
        let pool = tag.create_pool(48, 64, 0).unwrap();
        // More blocks than one page holds (4096 / 64 = 64), so two pages.
        let blocks: Vec<_> = (0..80).map(|_| pool.alloc().unwrap()).collect();
        assert_eq!(pool.stats().pages, 2);
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(b.len(), 48);
            assert_eq!(b.bus_addr().raw() % 64, 0, "block {i} at {:#x}", b.bus_addr().raw());
            b.view().write_slice(0, &[i as u32 + 1; 12]).unwrap();
        }
        for (i, b) in blocks.iter().enumerate() {
            let seen = device_bytes(&port, b.bus_addr(), 48);
            assert_eq!(seen, bytemuck::cast_slice::<u32, u8>(&[i as u32 + 1; 12]), "block {i}");
            // The device answers in the last word; the CPU reads it atomically.
            port.dma_write(Iova::new(b.bus_addr().raw() + 44), &(0x8000_0000u32 | i as u32).to_le_bytes())
                .unwrap();
            assert_eq!(b.view().atomic_u32(44).unwrap().load(), 0x8000_0000 | i as u32);
        }
        let bus: Vec<Iova> = blocks.iter().map(DmaBlock::bus_addr).collect();
        drop(blocks);
        // Given back, the blocks stay mapped for the device until the pool goes.
        assert_eq!(pool.stats().out, 0);
        assert!(port.dma_read(bus[0], &mut [0u8; 4]).is_ok());
        drop(pool);
        // Pool and blocks gone: the pages are unmapped (strict: the IOTLB forgot them) ...
        for b in &bus {
            assert!(port.dma_read(*b, &mut [0u8; 4]).is_err(), "{:#x} still translates", b.raw());
        }
        drop(tag);
        drop(dev);
    }
    // ... and freed, with the domain's table pages: every frame is back.
    assert_eq!(m.frames().free_frames(), free_before);
}

#[test]
fn a_block_given_back_comes_out_again_zeroed() {
    let m = common::machine();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let pool = tag.create_pool(PAGE_SIZE, PAGE_SIZE, 0).unwrap();
    let b = pool.alloc().unwrap();
    let bus = b.bus_addr();
    b.view().fill(0, PAGE_SIZE, 0xa5).unwrap();
    drop(b);
    let b = pool.alloc().unwrap();
    assert_eq!(b.bus_addr(), bus, "one page, one block: the same block again");
    assert_eq!(
        device_bytes(&DirectPort::new(&m, 1, 64), bus, PAGE_SIZE as usize),
        vec![0; PAGE_SIZE as usize]
    );
    assert_eq!(pool.stats().pages, 1);
}

#[test]
fn the_pages_are_freed_only_when_the_pool_and_every_block_are_gone() {
    let m = common::machine();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let before = m.frames().free_frames();
    let pool = tag.create_pool(100, 16, 0).unwrap();
    assert_eq!(m.frames().free_frames(), before, "no page before the first alloc");
    let a = pool.alloc().unwrap();
    let b = pool.alloc().unwrap();
    assert_eq!(m.frames().free_frames(), before - 1);
    drop(pool);
    // The blocks keep the pool's page: still allocated, still theirs.
    assert_eq!(m.frames().free_frames(), before - 1);
    a.view().write(0, &[7u8; 100]).unwrap();
    assert_eq!(a.view().read::<[u8; 100]>(0).unwrap(), [7u8; 100]);
    assert_eq!(b.view().read::<[u8; 100]>(0).unwrap(), [0u8; 100]);
    drop(a);
    assert_eq!(m.frames().free_frames(), before - 1);
    drop(b);
    assert_eq!(m.frames().free_frames(), before);
}

#[test]
fn bad_pool_parameters_are_refused_with_their_values() {
    let m = common::machine();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let err = |size, align, boundary| tag.create_pool(size, align, boundary).unwrap_err();
    assert_eq!(err(0, 16, 0), Error::ZeroSize);
    // Block larger than the pool's page.
    assert_eq!(err(PAGE_SIZE + 1, 16, 0), Error::BadSize { size: PAGE_SIZE + 1, limit: PAGE_SIZE });
    assert_eq!(err(64, 48, 0), Error::BadAlignment { align: 48 });
    assert_eq!(
        err(64, 2 * PAGE_SIZE, 0),
        Error::InvalidArgument { what: "DmaPool alignment (larger than a page)", value: 2 * PAGE_SIZE }
    );
    assert_eq!(
        err(64, 16, 96),
        Error::InvalidArgument { what: "DmaPool boundary (not a power of two)", value: 96 }
    );
    assert_eq!(err(64, 16, 32), Error::BadSize { size: 64, limit: 32 });
    // The tag's boundary counts as the pool's.
    let mut spec = TagSpec::new(PAGE_SIZE, 1);
    spec.boundary = 256;
    let narrow = Tag::new_root(&m, Direct, spec).unwrap();
    assert_eq!(narrow.create_pool(512, 16, 0).unwrap_err(), Error::BadSize { size: 512, limit: 256 });
}

#[test]
fn a_tag_that_splits_a_page_into_segments_is_refused_and_keeps_nothing() {
    let m = common::machine();
    let mut spec = TagSpec::new(PAGE_SIZE, 4);
    spec.max_segment_size = PAGE_SIZE / 2;
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let pool = tag.create_pool(64, 16, 0).unwrap();
    let before = m.frames().free_frames();
    assert_eq!(pool.alloc().unwrap_err(), Error::TooManySegments { needed: 2, max: 1 });
    assert_eq!(m.frames().free_frames(), before, "the page was torn down");
    assert_eq!(pool.stats().pages, 0);
}

#[test]
fn blocks_allocated_on_two_threads_at_once_are_all_distinct() {
    let m = common::machine();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(PAGE_SIZE, 1)).unwrap();
    let pool = tag.create_pool(64, 64, 0).unwrap();
    let mut all: Vec<u64> = std::thread::scope(|s| {
        let run = || {
            let mut mine = Vec::new();
            for i in 0..300 {
                mine.push(pool.alloc().unwrap());
                if i % 3 == 0 {
                    mine.swap_remove(i % mine.len()); // given back while the other thread allocates
                }
            }
            mine
        };
        let (a, b) = (s.spawn(run), s.spawn(run));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        let addrs = a.iter().chain(&b).map(|blk| blk.bus_addr().raw()).collect();
        drop((a, b));
        addrs
    });
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "two live blocks share a bus address");
    let st = pool.stats();
    assert_eq!((st.out, st.free), (0, st.pages * st.blocks_per_page));
}

/// Pool parameters: a block size (mostly small), an alignment exponent, and a boundary
/// exponent (0: none), made valid.
fn arb_pool() -> impl Strategy<Value = (u64, u64, u64)> {
    (prop_oneof![4 => 1u64..=256, 1 => 257u64..=PAGE_SIZE], 0u32..=12, prop::option::of(0u32..=12)).prop_map(
        |(size, a, b)| {
            let align = 1u64 << a;
            let boundary = match b {
                None => 0,
                Some(b) => (1u64 << b).max(size.next_power_of_two()),
            };
            (size, align, boundary)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A random mix of allocations and frees: every block is zeroed, aligned, inside no other
    /// live block, across no boundary, keeps its bytes until freed; the pool grows only when
    /// every block of every page is out (so every freed block was returned), and its pages are
    /// all freed once the pool and the blocks are gone.
    #[test]
    fn a_random_mix_of_pool_allocations_and_frees_never_overlaps_never_crosses_the_boundary_and_returns_every_block(
        (size, align, boundary) in arb_pool(),
        ops in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 1..160),
    ) {
        let m = common::machine();
        let tag = Tag::new_root(&m, Direct, TagSpec::new(PAGE_SIZE, 1)).unwrap();
        let port = DirectPort::new(&m, 1, 64);
        let before = m.frames().free_frames();
        let pool = tag.create_pool(size, align, boundary).unwrap();
        let per_page = pool.stats().blocks_per_page;
        prop_assert!(per_page >= 1);
        let mut live: Vec<(DmaBlock<'_, _, _>, u8)> = Vec::new();
        let (mut max_live, mut stamp) = (0u64, 0u8);
        for (alloc, at) in ops {
            if alloc || live.is_empty() {
                let b = pool.alloc().unwrap();
                let (s, e) = (b.bus_addr().raw(), b.bus_addr().raw() + size);
                prop_assert_eq!(b.len(), size);
                prop_assert_eq!(s % align, 0, "block at {:#x} not {}-aligned", s, align);
                // Equal windows (or no boundary: both `None`).
                prop_assert_eq!(
                    s.checked_div(boundary),
                    (e - 1).checked_div(boundary),
                    "[{:#x}, {:#x}) crosses {:#x}",
                    s,
                    e,
                    boundary
                );
                for (o, _) in &live {
                    let (os, oe) = (o.bus_addr().raw(), o.bus_addr().raw() + size);
                    prop_assert!(e <= os || oe <= s, "[{:#x}, {:#x}) overlaps [{:#x}, {:#x})", s, e, os, oe);
                }
                prop_assert!(device_bytes(&port, b.bus_addr(), size as usize).iter().all(|&x| x == 0), "not zeroed");
                stamp = stamp.wrapping_add(1).max(1);
                b.view().fill(0, size, stamp).unwrap();
                live.push((b, stamp));
                max_live = max_live.max(live.len() as u64);
            } else {
                let (b, st) = live.swap_remove(at.index(live.len()));
                // No other block wrote over it while it was out.
                let mut bytes = vec![0u8; size as usize];
                b.view().read_slice(0, &mut bytes).unwrap();
                prop_assert!(bytes.iter().all(|&x| x == st), "block at {:#x} was overwritten", b.bus_addr().raw());
            }
            let stats = pool.stats();
            prop_assert_eq!(stats.out, live.len() as u64);
            prop_assert_eq!(stats.free + stats.out, stats.pages * per_page);
            // One thread: a page is added only when none is free.
            prop_assert_eq!(stats.pages, max_live.div_ceil(per_page));
        }
        drop(live);
        let stats = pool.stats();
        prop_assert_eq!((stats.out, stats.free), (0, stats.pages * per_page));
        prop_assert_eq!(m.frames().free_frames(), before - stats.pages);
        drop(pool);
        prop_assert_eq!(m.frames().free_frames(), before, "a pool page was not freed");
    }
}

#[allow(dead_code)]
fn pool_and_blocks_live_in_one_driver_struct<'p>(
    tag: &busdma::front::Tag<'p, HostPlatform, Direct>,
) -> busdma::Result<impl Send + 'p> {
    // The state struct owns the pool and its blocks together (no borrow between them).
    struct Ring<'p> {
        descs: Vec<DmaBlock<'p, HostPlatform, Direct>>,
        pool: busdma::front::DmaPool<'p, HostPlatform, Direct>,
    }
    let pool = tag.create_pool(32, 32, 0)?;
    let descs = (0..4).map(|_| pool.alloc()).collect::<busdma::Result<Vec<_>>>()?;
    Ok(Ring { descs, pool })
}
