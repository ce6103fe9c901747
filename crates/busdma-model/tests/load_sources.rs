//! The load sources drivers have, as owned buffers (`busdma::front::chain`, `Registry::load_iov`):
//! a packet chain (mbuf), a block request (bio: a chain with a sector granule) and an iovec of
//! registered user memory (uio). Through the model IOMMU the device reads exactly the bytes of
//! the source, in order; misshapen sources are refused where they are built; nothing leaks.

use busdma::device::{Iommu, Policy};
use busdma::front::{Direction, DmaMemory, FragChain, OwnedMap, Part, SyncOp, TagSpec};
use busdma::pin::{IOV_MAX, Registry};
use busdma::quickmap::QuickMaps;
use busdma::{Error, MemAttr, PAGE_SIZE, UserVa};
use busdma_model::uspace::UserSpace;
use busdma_model::{DmaPort, HostPlatform, IommuConfig, MachineConfig, ModelIommu, PageKind};

const DEV: u32 = 0x21;
const UA: UserVa = UserVa::new(0x7000_0000);

fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1).collect()
}

/// `len` bytes of DMA memory holding `pattern(seed)`.
fn mem<'p>(m: &'p HostPlatform, len: u64, seed: u8) -> DmaMemory<'p, HostPlatform> {
    let spec = TagSpec::new(16 * PAGE_SIZE, 16);
    let d = DmaMemory::alloc(m, &spec, len, MemAttr::WriteBack).unwrap();
    d.write(0, &pattern(seed, len as usize)).unwrap();
    d
}

fn part<'p>(m: &'p HostPlatform, len: u64, seed: u8, off: u64, n: u64) -> Part<'p, HostPlatform> {
    Part::new(mem(m, len, seed), off, n).ok().unwrap()
}

/// What the device reads through `segs`, concatenated.
fn device_reads(port: &impl DmaPort, segs: &[busdma::front::Segment]) -> Vec<u8> {
    let mut seen = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        port.dma_read(s.addr, &mut b).unwrap();
        seen.extend(b);
    }
    seen
}

#[test]
fn a_packet_chain_with_a_prepended_header_and_trimmed_ends_is_read_by_the_device_exactly() {
    let m = machine();
    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, ModelIommu::new(&m, IommuConfig::default()).unwrap()).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(TagSpec::new(16 * PAGE_SIZE, 16)).unwrap();
    let mut chain = FragChain::new();
    chain.push_back(part(&m, PAGE_SIZE, 1, 100, 1400)).ok().unwrap();
    chain.push_back(part(&m, 2 * PAGE_SIZE, 2, 0, 5000)).ok().unwrap();
    chain.push_front(part(&m, PAGE_SIZE, 3, 0x40, 54)).ok().unwrap(); // the header
    chain.trim_front(14).unwrap(); // a layer strips its 14-byte header
    chain.trim_back(4).unwrap(); // and a 4-byte trailer
    let mut want = pattern(3, PAGE_SIZE as usize)[0x40 + 14..0x40 + 54].to_vec();
    want.extend(&pattern(1, PAGE_SIZE as usize)[100..1500]);
    want.extend(&pattern(2, 2 * PAGE_SIZE as usize)[..4996]);
    assert_eq!(chain.len(), want.len() as u64);
    // The CPU copies across fragment edges at chain offsets (m_copydata / m_copyback).
    let mut mid = vec![0u8; 100];
    chain.read(30, &mut mid).unwrap();
    assert_eq!(mid, want[30..130]);
    chain.write(38, &[0xEE; 4]).unwrap();
    want[38..42].copy_from_slice(&[0xEE; 4]);
    assert!(matches!(chain.read(chain.len() - 1, &mut [0u8; 2]), Err(Error::OutOfRange { .. })));

    let mut map: OwnedMap<'_, _, _, FragChain<'_, _>> = tag.create_owned_map().unwrap();
    let segs = map.load(chain, Direction::ToDevice).ok().unwrap().to_vec();
    map.sync(SyncOp::PREWRITE).unwrap();
    assert_eq!(device_reads(&iommu.hw().port(DEV), &segs), want);
    map.sync(SyncOp::POSTWRITE).unwrap();
    let back = map.take().unwrap();
    assert_eq!(back.fragments().len(), 3);
}

#[test]
fn trimming_a_whole_fragment_away_drops_it_and_a_failed_trim_changes_nothing() {
    let m = machine();
    let mut chain = FragChain::new();
    let first = part(&m, PAGE_SIZE, 1, 0, 10);
    let pa = first.memory().pa();
    chain.push_back(first).ok().unwrap();
    chain.push_back(part(&m, PAGE_SIZE, 2, 0, 20)).ok().unwrap();
    assert!(matches!(chain.trim_front(31), Err(Error::OutOfRange { addr: 31, limit: 30 })));
    assert_eq!((chain.len(), chain.fragments().len()), (30, 2));
    chain.trim_front(12).unwrap();
    assert_eq!((chain.len(), chain.fragments().len()), (18, 1));
    assert_eq!(m.page_kind(pa), PageKind::Other, "the emptied fragment's memory is freed");
    let mut b = [0u8; 18];
    chain.read(0, &mut b).unwrap();
    assert_eq!(b[..], pattern(2, 20)[2..]);
    let last = chain.pop_back().unwrap();
    assert_eq!((last.offset(), last.len(), chain.len()), (2, 18, 0));
}

#[test]
fn a_block_request_refuses_fragments_and_trims_off_its_sector_granule() {
    let m = machine();
    assert!(matches!(FragChain::<HostPlatform>::blocks(500), Err(Error::BadAlignment { align: 500 })));
    let mut bio = FragChain::blocks(512).unwrap();
    let (e, _) = bio.push_back(part(&m, PAGE_SIZE, 1, 0, 1000)).err().unwrap();
    assert_eq!(e, Error::Misaligned { value: 1000, align: 512 });
    let (e, _) = bio.push_back(part(&m, PAGE_SIZE, 1, 256, 512)).err().unwrap();
    assert!(matches!(e, Error::Misaligned { align: 512, .. }), "{e:?}");
    bio.push_back(part(&m, PAGE_SIZE, 1, 512, 3 * 512)).ok().unwrap();
    bio.push_back(part(&m, 2 * PAGE_SIZE, 2, 0, 2 * PAGE_SIZE)).ok().unwrap();
    assert_eq!(bio.trim_back(100), Err(Error::Misaligned { value: 100, align: 512 }));
    bio.trim_back(512).unwrap();
    assert_eq!(bio.len(), 3 * 512 + 2 * PAGE_SIZE - 512);

    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, ModelIommu::new(&m, IommuConfig::default()).unwrap()).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(TagSpec::new(16 * PAGE_SIZE, 16)).unwrap();
    let mut map = tag.create_owned_map::<FragChain<'_, _>>().unwrap();
    let segs = map.load(bio, Direction::FromDevice).ok().unwrap().to_vec();
    map.sync(SyncOp::PREREAD).unwrap();
    // The device writes the request; the CPU sees it at chain offsets after the sync.
    let data = pattern(9, (3 * 512 + 2 * PAGE_SIZE - 512) as usize);
    let mut at = 0usize;
    for s in &segs {
        iommu.hw().port(DEV).dma_write(s.addr, &data[at..at + s.len as usize]).unwrap();
        at += s.len as usize;
    }
    assert_eq!(at, data.len());
    map.sync(SyncOp::POSTREAD).unwrap();
    let bio = map.take().unwrap();
    let mut got = vec![0u8; data.len()];
    bio.read(0, &mut got).unwrap();
    assert_eq!(got, data);
}

#[test]
fn an_iovec_of_registered_memory_loads_entry_by_entry_and_holds_every_region_until_taken_back() {
    let m = machine();
    let us = UserSpace::new(&m);
    us.map(UA, 8 * PAGE_SIZE).unwrap();
    let second = UserVa::new(UA.raw() + 16 * PAGE_SIZE);
    us.map(second, 4 * PAGE_SIZE).unwrap();
    let a = pattern(4, 3000);
    let b = pattern(5, 5000);
    us.write(UserVa::new(UA.raw() + 0x123), &a).unwrap();
    us.write(UserVa::new(second.raw() + 0x10), &b).unwrap();
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, 8 * PAGE_SIZE).unwrap();
    reg.register(second, 4 * PAGE_SIZE).unwrap();

    // Refused whole: an entry outside every region, too many entries, no byte at all.
    let bad = [(UserVa::new(UA.raw() + 0x123), 3000), (UserVa::new(0x1000), 8)];
    assert_eq!(reg.load_iov(&bad).err(), Some(Error::NotMapped { addr: 0x1000 }));
    assert_eq!(reg.read().lookup(UA, 1).unwrap().mapped(), 1, "the first entry's count was given back");
    let many = vec![(UA, 1u64); IOV_MAX + 1];
    assert!(matches!(reg.load_iov(&many), Err(Error::TooManySegments { max: 1024, .. })));
    assert_eq!(reg.load_iov(&[(UA, 0)]).err(), Some(Error::ZeroSize));

    let iov = [(UserVa::new(UA.raw() + 0x123), 3000), (UA, 0), (UserVa::new(second.raw() + 0x10), 5000)];
    let iov = reg.load_iov(&iov).unwrap();
    assert_eq!((iov.len(), iov.buffers().len()), (8000, 2));

    let qm = QuickMaps::for_platform(&m);
    let iommu = Iommu::new(&m, &qm, ModelIommu::new(&m, IommuConfig::default()).unwrap()).unwrap();
    let d = iommu.attach(DEV, Policy::Strict).unwrap();
    let tag = d.tag(TagSpec::new(16 * PAGE_SIZE, 16)).unwrap();
    let mut map = tag.create_owned_map().unwrap();
    let segs = map.load(iov, Direction::ToDevice).ok().unwrap().to_vec();
    map.sync(SyncOp::PREWRITE).unwrap();
    let mut want = a.clone();
    want.extend(&b);
    assert_eq!(device_reads(&iommu.hw().port(DEV), &segs), want);
    // Both regions are held while the map holds the iovec.
    assert!(matches!(reg.unregister(UA, 8 * PAGE_SIZE), Err(Error::Busy { count: 1, .. })));
    assert!(matches!(reg.unregister(second, 4 * PAGE_SIZE), Err(Error::Busy { count: 1, .. })));
    map.sync(SyncOp::POSTWRITE).unwrap();
    drop(map.take().unwrap());
    reg.unregister(UA, 8 * PAGE_SIZE).unwrap();
    reg.unregister(second, 4 * PAGE_SIZE).unwrap();
    reg.synchronize().unwrap();
    assert_eq!(us.pinned_pages(), 0);
}

#[derive(Clone, Debug)]
enum Op {
    PushBack { len: u64, off: u64 },
    PushFront { len: u64, off: u64 },
    TrimFront(u64),
    TrimBack(u64),
    Write { at: u64, n: usize, seed: u8 },
    Read { at: u64, n: usize },
    PopFront,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (1..3000u64, 0..1000u64).prop_map(|(len, off)| Op::PushBack { len, off }),
        (1..200u64, 0..1000u64).prop_map(|(len, off)| Op::PushFront { len, off }),
        (0..400u64).prop_map(Op::TrimFront),
        (0..400u64).prop_map(Op::TrimBack),
        (0..6000u64, 0..600usize, any::<u8>()).prop_map(|(at, n, seed)| Op::Write { at, n, seed }),
        (0..6000u64, 0..600usize).prop_map(|(at, n)| Op::Read { at, n }),
        Just(Op::PopFront),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 64, ..Default::default() })]

    /// Against a byte-vector reference: every push, trim, copy and pop leaves the chain holding
    /// exactly the reference's bytes, refusals change nothing, and every fragment's memory is
    /// freed when the chain goes.
    #[test]
    fn a_chain_holds_exactly_the_bytes_of_a_reference_vector(ops in proptest::collection::vec(op(), 1..40)) {
        let m = machine();
        let free = m.frames().free_frames();
        let mut chain = FragChain::new();
        let mut model: std::collections::VecDeque<u8> = Default::default();
        let mut frag_lens: std::collections::VecDeque<u64> = Default::default();
        let mut seed = 0u8;
        for op in ops {
            match op {
                Op::PushBack { len, off } | Op::PushFront { len, off } => {
                    seed = seed.wrapping_add(1);
                    let front = matches!(op, Op::PushFront { .. });
                    let bytes = &pattern(seed, (off + len) as usize)[off as usize..];
                    let p = part(&m, off + len, seed, off, len);
                    if front {
                        chain.push_front(p).ok().unwrap();
                        bytes.iter().rev().for_each(|&b| model.push_front(b));
                        frag_lens.push_front(len);
                    } else {
                        chain.push_back(p).ok().unwrap();
                        model.extend(bytes);
                        frag_lens.push_back(len);
                    }
                }
                Op::TrimFront(n) | Op::TrimBack(n) => {
                    let front = matches!(op, Op::TrimFront(_));
                    let r = if front { chain.trim_front(n) } else { chain.trim_back(n) };
                    if n > model.len() as u64 {
                        proptest::prop_assert!(matches!(r, Err(Error::OutOfRange { .. })), "{:?}", r);
                    } else {
                        r.unwrap();
                        let mut left = n;
                        while left > 0 {
                            let f = if front { frag_lens.front_mut() } else { frag_lens.back_mut() }.unwrap();
                            let take = left.min(*f);
                            *f -= take;
                            left -= take;
                            if *f == 0 {
                                if front { frag_lens.pop_front(); } else { frag_lens.pop_back(); }
                            }
                        }
                        for _ in 0..n {
                            if front { model.pop_front(); } else { model.pop_back(); }
                        }
                    }
                }
                Op::Write { at, n, seed } => {
                    let data = pattern(seed, n);
                    let r = chain.write(at, &data);
                    if at + n as u64 > model.len() as u64 {
                        proptest::prop_assert!(matches!(r, Err(Error::OutOfRange { .. })), "{:?}", r);
                    } else {
                        r.unwrap();
                        for (i, b) in data.into_iter().enumerate() {
                            model[at as usize + i] = b;
                        }
                    }
                }
                Op::Read { at, n } => {
                    let mut buf = vec![0u8; n];
                    let r = chain.read(at, &mut buf);
                    if at + n as u64 > model.len() as u64 {
                        proptest::prop_assert!(matches!(r, Err(Error::OutOfRange { .. })), "{:?}", r);
                    } else {
                        r.unwrap();
                        let want: Vec<u8> = model.range(at as usize..at as usize + n).copied().collect();
                        proptest::prop_assert_eq!(buf, want);
                    }
                }
                Op::PopFront => {
                    let got = chain.pop_front().map(|p| p.len());
                    let want = frag_lens.pop_front();
                    proptest::prop_assert_eq!(got, want);
                    for _ in 0..want.unwrap_or(0) {
                        model.pop_front();
                    }
                }
            }
            proptest::prop_assert_eq!(chain.len(), model.len() as u64);
            proptest::prop_assert_eq!(chain.fragments().len(), frag_lens.len());
        }
        let mut all = vec![0u8; model.len()];
        chain.read(0, &mut all).unwrap();
        proptest::prop_assert_eq!(all, model.iter().copied().collect::<Vec<u8>>());
        drop(chain);
        proptest::prop_assert_eq!(m.frames().free_frames(), free);
    }
}
