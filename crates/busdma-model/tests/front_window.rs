//! Two-step mapping (`busdma::front::window`) through a device attached to the model IOMMU:
//! the device sees exactly the linked bytes at base + offset; a batch of unlinks costs one
//! invalidation; buffers come back only after the invalidation that covers them; misuse is
//! refused with the values involved and leaves nothing behind; a property test against a
//! reference map of the window.

use std::collections::BTreeMap;

use busdma::device::{Iommu, Policy};
use busdma::front::{Direction, DmaMemory, SyncOp, TagSpec};
use busdma::quickmap::QuickMaps;
use busdma::{Error, Iova, MemAttr, PAGE_SIZE, PhysAddr};
use busdma_model::dma::FaultReason;
use busdma_model::{DmaPort, HostPlatform, IommuConfig, MachineConfig, ModelIommu, PageKind};
use proptest::prelude::*;

const DEV: u32 = 0x40;

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

fn model(m: &HostPlatform) -> ModelIommu<'_> {
    ModelIommu::new(m, IommuConfig { audit: true, ..IommuConfig::default() }).unwrap()
}

fn spec() -> TagSpec {
    TagSpec::new(64 * PAGE_SIZE, 16)
}

fn read(model: &ModelIommu<'_>, at: Iova, len: u64) -> Result<Vec<u8>, FaultReason> {
    let mut b = vec![0u8; len as usize];
    model.port(DEV).dma_read(at, &mut b).map_err(|f| f.reason)?;
    Ok(b)
}

/// `pages` pages of DMA memory filled with a pattern seeded by `seed`; returns the pattern.
fn mem(m: &HostPlatform, pages: u64, seed: u8) -> (DmaMemory<'_, HostPlatform>, Vec<u8>) {
    let d = DmaMemory::alloc(m, &spec(), pages * PAGE_SIZE, MemAttr::WriteBack).unwrap();
    let data: Vec<u8> =
        (0..pages * PAGE_SIZE).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) | 1).collect();
    d.write(0, &data).unwrap();
    (d, data)
}

#[test]
fn the_device_reads_exactly_the_linked_bytes_at_base_plus_offset_and_its_writes_reach_the_buffer() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(spec()).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(64 * PAGE_SIZE, 8).unwrap();
    let base = w.iova().start().raw();
    let (one, one_data) = mem(&m, 1, 3);
    let (sixteen, sixteen_data) = mem(&m, 16, 9);
    let l1 = w.link(0, one, Direction::ToDevice).unwrap();
    let l16 = w.link(20 * PAGE_SIZE, sixteen, Direction::Bidirectional).unwrap();
    assert_eq!((l1.iova.raw(), l1.len), (base, PAGE_SIZE));
    assert_eq!((l16.iova.raw(), l16.len), (base + 20 * PAGE_SIZE, 16 * PAGE_SIZE));
    w.sync(0, SyncOp::PREWRITE).unwrap();
    w.sync(20 * PAGE_SIZE, SyncOp::PREWRITE.union(SyncOp::PREREAD)).unwrap();
    assert_eq!(read(iommu.hw(), l1.iova, l1.len).unwrap(), one_data);
    assert_eq!(read(iommu.hw(), l16.iova, l16.len).unwrap(), sixteen_data);
    // Between the links, and past the last one: nothing.
    assert!(read(iommu.hw(), Iova::new(base + PAGE_SIZE), 1).is_err());
    assert!(read(iommu.hw(), Iova::new(base + 36 * PAGE_SIZE), 1).is_err());
    // A to-device link is read-only for the device; the bidirectional one takes its writes.
    assert!(iommu.hw().port(DEV).dma_write(l1.iova, &[0xaa]).is_err());
    iommu.hw().port(DEV).dma_write(Iova::new(l16.iova.raw() + 5), &[0xee; 3]).unwrap();
    w.sync(20 * PAGE_SIZE, SyncOp::POSTREAD).unwrap();
    let mut b = [0u8; 3];
    w.buffer(20 * PAGE_SIZE).unwrap().read(5, &mut b).unwrap();
    assert_eq!(b, [0xee; 3]);
    assert!(matches!(
        w.sync(0, SyncOp::PREREAD),
        Err(Error::InvalidArgument { what: "sync operation for the link's direction", .. })
    ));
    drop(w);
    let rep = iommu.hw().audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
}

#[test]
fn a_batch_of_unlinks_costs_one_invalidation_and_links_cost_none() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    for (policy, ranged, whole) in [(Policy::Strict, 1, 0), (Policy::Deferred, 0, 1)] {
        let d = iommu.attach(DEV, policy).unwrap();
        let tag = d.tag(spec()).unwrap();
        let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(64 * PAGE_SIZE, 16).unwrap();
        let base = w.iova().start().raw();
        let before = iommu.hw().stats();
        let mut pas = Vec::new();
        for i in 0..16 {
            let (b, _) = mem(&m, 1, i as u8);
            pas.push(b.pa());
            w.link(i * 4 * PAGE_SIZE, b, Direction::ToDevice).unwrap();
        }
        for i in 0..16 {
            assert!(read(iommu.hw(), Iova::new(base + i * 4 * PAGE_SIZE), 8).is_ok(), "cached in the IOTLB");
        }
        let linked = iommu.hw().stats();
        assert_eq!(
            (linked.inv_range, linked.inv_domain),
            (before.inv_range, before.inv_domain),
            "{policy:?}: links invalidate nothing"
        );
        for i in 0..16 {
            w.unlink(i * 4 * PAGE_SIZE).unwrap();
        }
        // Marked, not removed: the device still reaches them, and the buffers are the window's.
        assert!(read(iommu.hw(), Iova::new(base), 8).is_ok());
        let mut back = Vec::new();
        assert_eq!(w.commit(|off, b| back.push((off, b.pa()))).unwrap(), 16);
        let after = iommu.hw().stats();
        assert_eq!(
            (after.inv_range - before.inv_range, after.inv_domain - before.inv_domain),
            (ranged, whole),
            "{policy:?}: one invalidation for the batch"
        );
        assert_eq!(back, (0..16).map(|i| (i * 4 * PAGE_SIZE, pas[i as usize])).collect::<Vec<_>>());
        for i in 0..16 {
            assert!(
                read(iommu.hw(), Iova::new(base + i * 4 * PAGE_SIZE), 1).is_err(),
                "{policy:?}: faults after the commit"
            );
        }
        assert_eq!(w.stats().batches, 1);
        drop(w);
        drop(tag);
        d.detach().unwrap();
    }
    let rep = iommu.hw().audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
}

#[test]
fn a_failed_invalidation_holds_the_buffers_until_a_later_proof() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    for policy in [Policy::Strict, Policy::Deferred] {
        let d = iommu.attach(DEV, policy).unwrap();
        let tag = d.tag(spec()).unwrap();
        let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(16 * PAGE_SIZE, 4).unwrap();
        let (a, _) = mem(&m, 2, 1);
        let pa = a.pa();
        w.link(0, a, Direction::ToDevice).unwrap();
        let iova = Iova::new(w.iova().start().raw());
        read(iommu.hw(), iova, 8).unwrap(); // cached in the IOTLB
        w.unlink(0).unwrap();
        iommu.hw().fail_next_invalidations(1);
        let mut back = 0;
        let e = w.commit(|_, _| back += 1).unwrap_err();
        assert!(matches!(e, Error::InvalidationFailed { .. }), "{policy:?}: {e:?}");
        assert_eq!((back, w.stats().held), (0, 1), "{policy:?}: nothing given back, the link held");
        assert_eq!(m.page_kind(pa), PageKind::Dma, "still allocated");
        // Its pages stay taken: no relink over a link whose unmap is not proven.
        let (b, _) = mem(&m, 1, 2);
        let le = w.link(PAGE_SIZE, b, Direction::ToDevice).unwrap_err();
        assert_eq!(le.error, Error::AlreadyMapped { addr: PAGE_SIZE });
        assert!(le.buffer.is_some(), "a refused link gives its buffer back");
        // The unit works again: the next commit obtains the proof and gives the buffer back.
        let mut got = Vec::new();
        assert_eq!(w.commit(|off, b| got.push((off, b.pa()))).unwrap(), 1);
        assert_eq!(got, [(0, pa)]);
        assert!(read(iommu.hw(), iova, 1).is_err());
        assert_eq!(w.stats().held, 0);
        drop(w);
        drop(tag);
        d.detach().unwrap();
    }
}

#[test]
fn a_window_dropped_while_invalidations_fail_quarantines_its_buffers_and_never_frees_them() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(spec()).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(16 * PAGE_SIZE, 4).unwrap();
    let (a, _) = mem(&m, 1, 1);
    let pa = a.pa();
    w.link(3 * PAGE_SIZE, a, Direction::FromDevice).unwrap();
    iommu.hw().fail_next_invalidations(u64::MAX);
    drop(w);
    assert_eq!(tag.quarantine_stats().held, 1, "in the tag's quarantine");
    assert_eq!(m.page_kind(pa), PageKind::Dma, "never freed without a proof");
    assert!(tag.reclaim().is_err());
    iommu.hw().fail_next_invalidations(0);
    tag.reclaim().unwrap();
    assert_eq!(tag.quarantine_stats().released, 1);
    assert_ne!(m.page_kind(pa), PageKind::Dma, "freed after the proof");
}

#[test]
fn destroy_unlinks_everything_with_one_invalidation_and_gives_every_buffer_back() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(spec()).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(32 * PAGE_SIZE, 8).unwrap();
    let iova = w.iova();
    for i in 0..8 {
        w.link(i * 4 * PAGE_SIZE, mem(&m, 3, 0).0, Direction::ToDevice).unwrap();
    }
    w.unlink(0).unwrap(); // one marked, the rest linked
    let before = iommu.hw().stats().inv_range;
    let mut back = Vec::new();
    w.destroy(|off, _| back.push(off)).unwrap();
    assert_eq!(iommu.hw().stats().inv_range - before, 1);
    back.sort();
    assert_eq!(back, (0..8).map(|i| i * 4 * PAGE_SIZE).collect::<Vec<_>>());
    assert!(read(iommu.hw(), iova.start(), 1).is_err());
    // The IOVA went back to the domain: a window of the same size can be made again and again.
    for _ in 0..4 {
        let w2 = tag.create_window::<DmaMemory<'_, HostPlatform>>(32 * PAGE_SIZE, 8).unwrap();
        drop(w2);
    }
    let rep = iommu.hw().audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
}

#[test]
fn forgetting_a_window_leaks_its_buffers_with_their_mapping_never_frees_them() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(spec()).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(8 * PAGE_SIZE, 2).unwrap();
    let (a, data) = mem(&m, 1, 5);
    let pa = a.pa();
    let l = w.link(0, a, Direction::ToDevice).unwrap();
    std::mem::forget(w);
    drop(tag);
    drop(d);
    assert_eq!(m.page_kind(pa), PageKind::Dma, "the linked page is never given back");
    assert_eq!(read(iommu.hw(), l.iova, PAGE_SIZE).unwrap(), data, "and the device still reaches only it");
}

#[test]
fn misuse_is_refused_with_the_values_and_leaves_nothing_behind() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(spec()).unwrap();
    assert_eq!(tag.create_window::<DmaMemory<'_, _>>(0, 1).unwrap_err(), Error::ZeroSize);
    assert_eq!(
        tag.create_window::<DmaMemory<'_, _>>(PAGE_SIZE + 1, 1).unwrap_err(),
        Error::Misaligned { value: PAGE_SIZE + 1, align: PAGE_SIZE }
    );
    assert!(matches!(
        tag.create_window::<DmaMemory<'_, _>>(2 * PAGE_SIZE, 3),
        Err(Error::InvalidArgument { value: 3, .. })
    ));
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(8 * PAGE_SIZE, 2).unwrap();
    let base = w.iova().start().raw();
    let refused =
        |r: Result<busdma::front::Linked, busdma::front::LinkError<DmaMemory<'_, HostPlatform>>>| {
            let e = r.unwrap_err();
            assert!(e.buffer.is_some(), "the buffer comes back");
            e.error
        };
    // Unaligned offset.
    assert_eq!(
        refused(w.link(100, mem(&m, 1, 0).0, Direction::ToDevice)),
        Error::Misaligned { value: 100, align: PAGE_SIZE }
    );
    // Out of range: a 2-page buffer at page 7 of 8 ends at 9 pages.
    assert_eq!(
        refused(w.link(7 * PAGE_SIZE, mem(&m, 2, 0).0, Direction::ToDevice)),
        Error::OutOfRange { addr: 9 * PAGE_SIZE, limit: 8 * PAGE_SIZE }
    );
    assert_eq!(
        refused(w.link(!(PAGE_SIZE - 1), mem(&m, 1, 0).0, Direction::ToDevice)),
        Error::OutOfRange { addr: u64::MAX, limit: 8 * PAGE_SIZE }
    );
    // Overlap with a link, then with a marked one.
    w.link(2 * PAGE_SIZE, mem(&m, 2, 0).0, Direction::ToDevice).unwrap();
    assert_eq!(
        refused(w.link(PAGE_SIZE, mem(&m, 2, 0).0, Direction::ToDevice)),
        Error::AlreadyMapped { addr: 2 * PAGE_SIZE }
    );
    w.unlink(2 * PAGE_SIZE).unwrap();
    assert_eq!(
        refused(w.link(3 * PAGE_SIZE, mem(&m, 1, 0).0, Direction::ToDevice)),
        Error::AlreadyMapped { addr: 3 * PAGE_SIZE }
    );
    // Unlinks of what is not a link's start, twice, beyond, unaligned.
    assert_eq!(w.unlink(3 * PAGE_SIZE), Err(Error::NotMapped { addr: 3 * PAGE_SIZE }));
    assert_eq!(w.unlink(0), Err(Error::NotMapped { addr: 0 }));
    assert!(matches!(w.unlink(2 * PAGE_SIZE), Err(Error::BadState { .. })));
    assert_eq!(w.unlink(8 * PAGE_SIZE), Err(Error::OutOfRange { addr: 8 * PAGE_SIZE, limit: 8 * PAGE_SIZE }));
    assert_eq!(w.unlink(5), Err(Error::Misaligned { value: 5, align: PAGE_SIZE }));
    // Slab full (max_links = 2: one marked, one more).
    w.link(6 * PAGE_SIZE, mem(&m, 1, 0).0, Direction::ToDevice).unwrap();
    assert!(matches!(
        refused(w.link(0, mem(&m, 1, 0).0, Direction::ToDevice)),
        Error::LimitExceeded { limit: 2, .. }
    ));
    // Nothing a refusal touched is reachable.
    for p in [0, 1, 4, 5, 7] {
        assert!(read(iommu.hw(), Iova::new(base + p * PAGE_SIZE), 1).is_err(), "page {p}");
    }
    let s = w.stats();
    assert_eq!((s.links, s.refused, s.live), (2, 6, 2));
    assert_eq!(w.commit(|_, _| ()).unwrap(), 1);
    // An identity-mapped device has no IOVA space to reserve.
    drop(w);
    drop(tag);
    d.detach().unwrap();
    let id = iommu.attach(DEV, Policy::Identity).unwrap();
    assert!(matches!(
        id.tag(spec()).unwrap().create_window::<DmaMemory<'_, _>>(PAGE_SIZE, 1),
        Err(Error::Unsupported { .. })
    ));
}

#[test]
fn a_link_honours_the_tag_boundary_max_segment_and_untrusted_rules() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let mut s = spec();
    s.boundary = 4 * PAGE_SIZE;
    s.max_segment_size = 3 * PAGE_SIZE;
    let tag = d.tag(s).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(16 * PAGE_SIZE, 4).unwrap();
    let base = w.iova().start().raw();
    assert_eq!(base % (16 * PAGE_SIZE), 0, "a window fitting one boundary window is placed in one");
    let e = w.link(0, mem(&m, 4, 0).0, Direction::ToDevice).unwrap_err().error;
    assert_eq!(e, Error::BadSize { size: 4 * PAGE_SIZE, limit: 3 * PAGE_SIZE });
    let e = w.link(2 * PAGE_SIZE, mem(&m, 3, 0).0, Direction::ToDevice).unwrap_err().error;
    assert!(matches!(e, Error::InvalidArgument { value, .. } if value == base + 2 * PAGE_SIZE), "{e:?}");
    w.link(PAGE_SIZE, mem(&m, 3, 0).0, Direction::ToDevice).unwrap();
    drop(w);
    drop(tag);
    d.detach().unwrap();
    // Untrusted: a sub-page buffer would show the device the rest of its page.
    let u = iommu.attach(DEV, Policy::Untrusted).unwrap();
    let tag = u.tag(spec()).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(4 * PAGE_SIZE, 2).unwrap();
    let part = DmaMemory::alloc(&m, &spec(), 100, MemAttr::WriteBack).unwrap();
    assert!(matches!(w.link(0, part, Direction::ToDevice).unwrap_err().error, Error::Unsupported { .. }));
    w.link(0, mem(&m, 1, 0).0, Direction::ToDevice).unwrap();
}

/// One step of the property test.
#[derive(Clone, Debug)]
enum Op {
    Link {
        page: u64,
        pages: u64,
    },
    Unlink {
        page: u64,
    },
    Commit,
    CommitLazy,
    /// A flush of the domain (the tag's proof): every retiring link's queued invalidation
    /// completes.
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..20u64, 1..4u64).prop_map(|(page, pages)| Op::Link { page, pages }),
        4 => (0..16u64).prop_map(|page| Op::Unlink { page }),
        1 => Just(Op::Commit),
        2 => Just(Op::CommitLazy),
        1 => Just(Op::Flush),
    ]
}

/// A link in the reference: pages, physical address, state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RefState {
    Linked,
    Marked,
    /// Unmapped by a lazy commit; `true` once a flush has covered it.
    Retiring(bool),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random link / unlink / commit / lazy commit / flush sequences on a 16-page window,
    /// strict or deferred, against a reference map (offset → (pages, pa, state)): every call
    /// succeeds exactly when the reference says it should; after every step each window page
    /// translates (a walk of the tables) to what the reference says (linked or marked: the
    /// buffer; retiring or free: nothing); a commit gives back exactly the marked and
    /// retiring links; a lazy commit gives back exactly the retiring links a flush has covered
    /// (strict: its own batch), never one whose invalidation is still queued.
    #[test]
    fn the_window_translates_what_a_reference_map_says(
        deferred in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..48),
    ) {
        let m = machine();
        m.freeze_clock();
        let qm = QuickMaps::for_platform(&m);
        let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
        let d = iommu.attach(DEV, if deferred { Policy::Deferred } else { Policy::Strict }).unwrap();
        let tag = d.tag(spec()).unwrap();
        let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(16 * PAGE_SIZE, 6).unwrap();
        let base = w.iova().start().raw();
        let mut reference: BTreeMap<u64, (u64, PhysAddr, RefState)> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Link { page, pages } => {
                    let (b, _) = mem(&m, pages, page as u8);
                    let pa = b.pa();
                    let overlap = reference.iter().any(|(&p, &(n, _, _))| p < page + pages && page < p + n);
                    let fits = page + pages <= 16 && !overlap && reference.len() < 6;
                    let r = w.link(page * PAGE_SIZE, b, Direction::ToDevice);
                    prop_assert_eq!(r.is_ok(), fits, "link {} {}", page, pages);
                    if fits {
                        reference.insert(page, (pages, pa, RefState::Linked));
                    } else {
                        prop_assert!(r.unwrap_err().buffer.is_some());
                    }
                }
                Op::Unlink { page } => {
                    let ok = matches!(reference.get(&page), Some(&(_, _, RefState::Linked)));
                    prop_assert_eq!(w.unlink(page * PAGE_SIZE).is_ok(), ok, "unlink {}", page);
                    if ok {
                        reference.get_mut(&page).unwrap().2 = RefState::Marked;
                    }
                }
                Op::Commit => {
                    let mut back = Vec::new();
                    w.commit(|off, b| back.push((off / PAGE_SIZE, b.pa()))).unwrap();
                    back.sort();
                    let want: Vec<_> = reference
                        .iter()
                        .filter(|e| e.1.2 != RefState::Linked)
                        .map(|(&p, &(_, pa, _))| (p, pa))
                        .collect();
                    prop_assert_eq!(back, want);
                    reference.retain(|_, e| e.2 == RefState::Linked);
                }
                Op::CommitLazy => {
                    // Exactly what a flush has covered (the clock is frozen, so the domain's
                    // age bound never flushes on its own); under strict, the batch itself.
                    let mut back = Vec::new();
                    w.commit_lazy(|off, b| back.push((off / PAGE_SIZE, b.pa()))).unwrap();
                    back.sort();
                    let due = |st: RefState| st == RefState::Retiring(true) || (!deferred && st == RefState::Marked);
                    let want: Vec<_> =
                        reference.iter().filter(|e| due(e.1.2)).map(|(&p, &(_, pa, _))| (p, pa)).collect();
                    prop_assert_eq!(back, want);
                    reference.retain(|_, e| !due(e.2));
                    for e in reference.values_mut() {
                        if e.2 == RefState::Marked {
                            e.2 = RefState::Retiring(false);
                        }
                    }
                }
                Op::Flush => {
                    tag.wait_unmapped().unwrap();
                    for e in reference.values_mut() {
                        if e.2 == RefState::Retiring(false) {
                            e.2 = RefState::Retiring(true);
                        }
                    }
                }
            }
            for page in 0..16u64 {
                let want = reference
                    .range(..=page)
                    .next_back()
                    .filter(|(p, e)| page < **p + e.0 && matches!(e.2, RefState::Linked | RefState::Marked))
                    .map(|(p, e)| e.1.raw() + (page - *p) * PAGE_SIZE);
                let got = iommu.hw().inspect(DEV, Iova::new(base + page * PAGE_SIZE)).ok().map(|l| l.page.raw());
                prop_assert_eq!(got, want, "page {}", page);
            }
        }
        drop(w);
        let rep = iommu.hw().audit_report().unwrap();
        prop_assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
    }
}

#[test]
fn a_link_whose_map_fails_gives_its_buffer_back_and_the_next_link_works() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(spec()).unwrap();
    let mut w = tag
        .create_window::<(DmaMemory<'_, HostPlatform>, DmaMemory<'_, HostPlatform>)>(8 * PAGE_SIZE, 2)
        .unwrap();
    let base = w.iova().start().raw();
    // A batch whose invalidation fails degrades the domain; while the unit keeps failing,
    // every map of the domain (which first recovers with a whole-domain invalidation) fails.
    let (x, y) = (mem(&m, 1, 7).0, mem(&m, 1, 8).0);
    w.link(4 * PAGE_SIZE, (x, y), Direction::ToDevice).unwrap();
    w.unlink(4 * PAGE_SIZE).unwrap();
    iommu.hw().fail_next_invalidations(u64::MAX);
    assert!(matches!(w.commit(|_, _| ()), Err(Error::InvalidationFailed { .. })));
    let ((a, da), (b, db)) = (mem(&m, 1, 1), mem(&m, 1, 2));
    let e = w.link(0, (a, b), Direction::ToDevice).unwrap_err();
    assert!(matches!(e.error, Error::InvalidationFailed { .. }), "{:?}", e.error);
    let (a, b) = e.buffer.expect("nothing mapped: the buffer comes back");
    assert!(
        read(iommu.hw(), Iova::new(base), 1).is_err()
            && read(iommu.hw(), Iova::new(base + PAGE_SIZE), 1).is_err()
    );
    assert_eq!((w.stats().live, w.stats().held, w.stats().refused), (1, 1, 1));
    // The unit works again: the same link succeeds, its two pages contiguous in bus space,
    // and the held batch comes back at the next commit.
    iommu.hw().fail_next_invalidations(0);
    let l = w.link(0, (a, b), Direction::ToDevice).unwrap();
    assert_eq!((l.iova.raw(), l.len), (base, 2 * PAGE_SIZE));
    assert_eq!(read(iommu.hw(), l.iova, 2 * PAGE_SIZE).unwrap(), [da, db].concat());
    assert_eq!(w.commit(|off, _| assert_eq!(off, 4 * PAGE_SIZE)).unwrap(), 1);
}

#[test]
fn a_lazy_commit_under_deferred_invalidation_gives_buffers_back_only_after_a_flush() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Deferred).unwrap();
    let tag = d.tag(spec()).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(16 * PAGE_SIZE, 5).unwrap();
    let base = w.iova().start().raw();
    let mut pas = Vec::new();
    for i in 0..4 {
        let (b, _) = mem(&m, 1, i as u8);
        pas.push(b.pa());
        w.link(i * PAGE_SIZE, b, Direction::ToDevice).unwrap();
        read(iommu.hw(), Iova::new(base + i * PAGE_SIZE), 8).unwrap(); // cached in the IOTLB
    }
    for i in 0..4 {
        w.unlink(i * PAGE_SIZE).unwrap();
    }
    let before = iommu.hw().stats();
    assert_eq!(w.commit_lazy(|_, _| panic!("given back before the flush")).unwrap(), 0);
    let after = iommu.hw().stats();
    assert_eq!(
        (after.inv_range, after.inv_domain),
        (before.inv_range, before.inv_domain),
        "queued, not issued"
    );
    assert_eq!(w.stats().retiring, 4);
    // Why: the entries are cleared, but the device still reaches the buffers through the IOTLB.
    assert!(read(iommu.hw(), Iova::new(base), 8).is_ok(), "stale IOTLB entry until the flush");
    assert!(pas.iter().all(|&pa| m.page_kind(pa) == PageKind::Dma));
    // Their pages stay taken, and a lazy commit with nothing flushed gives nothing back.
    let e = w.link(0, mem(&m, 1, 9).0, Direction::ToDevice).unwrap_err();
    assert_eq!(e.error, Error::AlreadyMapped { addr: 0 });
    assert!(matches!(w.sync(0, SyncOp::POSTWRITE), Err(Error::BadState { .. })));
    assert_eq!(w.commit_lazy(|_, _| ()).unwrap(), 0);
    // One flush (here the tag's proof; in a kernel the queue's own bounds) retires them all.
    tag.wait_unmapped().unwrap();
    assert!(read(iommu.hw(), Iova::new(base), 1).is_err());
    let mut back = Vec::new();
    assert_eq!(w.commit_lazy(|off, b| back.push((off, b.pa()))).unwrap(), 4);
    back.sort();
    assert_eq!(back, (0..4).map(|i| (i * PAGE_SIZE, pas[i as usize])).collect::<Vec<_>>());
    assert_eq!(w.stats().retiring, 0);
    drop(w);
    let rep = iommu.hw().audit_report().unwrap();
    assert_eq!(rep.violation_count, 0, "model audit: {:?}", rep.violations);
}

#[test]
fn a_forced_commit_or_the_drop_settles_retiring_links_and_strict_lazy_commits_are_commits() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, model(&m)).unwrap();
    let d = iommu.attach(DEV, Policy::Deferred).unwrap();
    let tag = d.tag(spec()).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(8 * PAGE_SIZE, 4).unwrap();
    w.link(0, mem(&m, 1, 1).0, Direction::ToDevice).unwrap();
    w.link(PAGE_SIZE, mem(&m, 1, 2).0, Direction::ToDevice).unwrap();
    w.unlink(0).unwrap();
    assert_eq!(w.commit_lazy(|_, _| ()).unwrap(), 0);
    w.unlink(PAGE_SIZE).unwrap();
    // The forced commit proves both the retiring link and its own batch.
    let mut back = Vec::new();
    assert_eq!(w.commit(|off, _| back.push(off)).unwrap(), 2);
    back.sort();
    assert_eq!(back, [0, PAGE_SIZE]);
    // A window dropped with a retiring link: its buffer is freed after the drop's proof.
    let (b, _) = mem(&m, 1, 3);
    let pa = b.pa();
    w.link(0, b, Direction::ToDevice).unwrap();
    w.unlink(0).unwrap();
    w.commit_lazy(|_, _| ()).unwrap();
    drop(w);
    assert_ne!(m.page_kind(pa), PageKind::Dma, "freed once proven");
    assert_eq!(tag.quarantine_stats().held, 0);
    drop(tag);
    d.detach().unwrap();
    // Strict: a lazy commit proves its batch at once.
    let s = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = s.tag(spec()).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(8 * PAGE_SIZE, 4).unwrap();
    w.link(0, mem(&m, 1, 1).0, Direction::ToDevice).unwrap();
    w.unlink(0).unwrap();
    assert_eq!(w.commit_lazy(|_, _| ()).unwrap(), 1);
}

#[test]
fn in_caching_mode_each_link_invalidates_its_range_so_a_cached_fault_never_hides_it() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let hw = ModelIommu::new(&m, IommuConfig { audit: true, caching_mode: true, ..IommuConfig::default() })
        .unwrap();
    let iommu = Iommu::new(&m, &qm, hw).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(spec()).unwrap();
    let mut w = tag.create_window::<DmaMemory<'_, HostPlatform>>(16 * PAGE_SIZE, 4).unwrap();
    let base = w.iova().start().raw();
    // The device probes the empty slot first: the unit caches the not-present result.
    assert!(read(iommu.hw(), Iova::new(base), 1).is_err());
    let before = iommu.hw().stats();
    let (a, data) = mem(&m, 1, 4);
    let l = w.link(0, a, Direction::ToDevice).unwrap();
    let after = iommu.hw().stats();
    assert_eq!(after.inv_after_map - before.inv_after_map, 1, "one after-map invalidation per link");
    assert_eq!(read(iommu.hw(), l.iova, PAGE_SIZE).unwrap(), data, "the cached fault does not hide the link");
    w.unlink(0).unwrap();
    assert_eq!(w.commit(|_, _| ()).unwrap(), 1);
    assert!(read(iommu.hw(), l.iova, 1).is_err());
}
