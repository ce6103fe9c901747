//! Coherence, proved on the cache model: with a write-back cache between the CPU and RAM and a
//! non-coherent device, every required sync of the front end is needed (drop it and the CPU or
//! the device sees stale data) and the protocol is sufficient (with it, both always agree).
//!
//! The CPU (the driver) reaches its buffers only through `HostPlatform::cpu()`; the device reads
//! and writes RAM by bus address (the direct strategy: bus address = physical address).

use std::sync::atomic::Ordering;

use busdma::front::*;
use busdma::{KernVa, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::cache::LINE_SIZE;
use busdma_model::{CacheConfig, FrameRequest, HostPlatform, MachineConfig, Placement};
use proptest::prelude::*;

fn machine(cache: CacheConfig) -> HostPlatform {
    let c = MachineConfig { cpus: 2, ..MachineConfig::with_ram(32 << 20) }.upper_half_not_direct_mapped();
    HostPlatform::new(c.with_cache(cache)).unwrap()
}

fn buffer(m: &HostPlatform, pages: u64) -> (PhysAddr, KernVa) {
    let r = FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(pages) };
    let pa = m.frames().alloc(r).unwrap();
    (pa, m.phys_to_kva(pa).unwrap())
}

fn device_read(m: &HostPlatform, segs: &[Segment]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in segs {
        let mut b = vec![0u8; s.len as usize];
        m.read_phys(PhysAddr::new(s.addr.raw()), &mut b).unwrap();
        out.extend_from_slice(&b);
    }
    out
}

fn device_write(m: &HostPlatform, segs: &[Segment], data: &[u8]) {
    let mut at = 0;
    for s in segs {
        m.write_phys(PhysAddr::new(s.addr.raw()), &data[at..at + s.len as usize]).unwrap();
        at += s.len as usize;
    }
}

fn cpu_read(m: &HostPlatform, kva: KernVa, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    m.cpu().read(kva, &mut b).unwrap();
    b
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

/// One to-device transfer: the CPU fills the buffer, maybe syncs PREWRITE, the device reads.
fn to_device(m: &HostPlatform, prewrite: bool) -> (Vec<u8>, Vec<u8>) {
    let (_, kva) = buffer(m, 2);
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let buf = unsafe { KernelBuf::new(kva.checked_add(100).unwrap(), 5000) };
    let data = pattern(1, 5000);
    m.cpu().write(buf.kva(), &data).unwrap();
    let tag = Tag::new_root(m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    map.load(&buf, Direction::ToDevice).unwrap();
    if prewrite {
        map.sync(SyncOp::PREWRITE).unwrap();
    }
    let seen = device_read(m, map.segments());
    map.sync(SyncOp::POSTWRITE).unwrap();
    map.unload().unwrap();
    (data, seen)
}

/// What the CPU's cache does while a from-device DMA runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hazard {
    /// Nothing.
    None,
    /// The CPU speculatively fetches the buffer before the device's data lands.
    PrefetchBeforeTheDeviceWrites,
    /// The cache is under pressure after the device wrote: dirty lines are written back.
    EvictAfterTheDeviceWrote,
}

/// One from-device transfer. Before it, the driver had written the buffer (dirty lines).
fn from_device(m: &HostPlatform, preread: bool, postread: bool, hazard: Hazard) -> (Vec<u8>, Vec<u8>) {
    let (_, kva) = buffer(m, 2);
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let buf = unsafe { KernelBuf::new(kva.checked_add(64).unwrap(), 4096) };
    m.cpu().write(buf.kva(), &pattern(7, 4096)).unwrap(); // the driver initialised it
    let tag = Tag::new_root(m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    map.load(&buf, Direction::FromDevice).unwrap();
    if preread {
        map.sync(SyncOp::PREREAD).unwrap();
    }
    if hazard == Hazard::PrefetchBeforeTheDeviceWrites {
        m.cpu().prefetch(buf.kva(), buf.len()).unwrap();
    }
    let data = pattern(9, 4096);
    device_write(m, map.segments(), &data);
    if hazard == Hazard::EvictAfterTheDeviceWrote {
        m.cpu().evict_all().unwrap();
    }
    if postread {
        map.sync(SyncOp::POSTREAD).unwrap();
    }
    let seen = cpu_read(m, buf.kva(), 4096);
    map.unload().unwrap();
    (data, seen)
}

#[test]
fn without_prewrite_the_device_reads_stale_memory() {
    for cache in [CacheConfig::pipt(), CacheConfig::vipt_aliasing()] {
        let m = machine(cache);
        let (data, seen) = to_device(&m, false);
        assert_ne!(seen, data, "{cache:?}");
        assert_eq!(seen, vec![0; data.len()], "the device saw RAM as it was before the CPU wrote");
    }
}

#[test]
fn with_prewrite_the_device_reads_what_the_cpu_wrote() {
    for cache in [CacheConfig::pipt(), CacheConfig::vipt_aliasing()] {
        let m = machine(cache);
        let (data, seen) = to_device(&m, true);
        assert_eq!(seen, data, "{cache:?}");
    }
}

#[test]
fn without_preread_an_evicted_dirty_line_overwrites_the_devices_data() {
    let m = machine(CacheConfig::pipt());
    let (data, seen) = from_device(&m, false, true, Hazard::EvictAfterTheDeviceWrote);
    assert_eq!(seen, pattern(7, 4096), "the CPU's old bytes were written back over the device's");
    assert_ne!(seen, data);
}

#[test]
fn without_postread_the_cpu_reads_lines_it_fetched_during_the_dma() {
    let m = machine(CacheConfig::pipt());
    let (data, seen) = from_device(&m, true, false, Hazard::PrefetchBeforeTheDeviceWrites);
    assert_eq!(seen, pattern(7, 4096), "the lines fetched before the device wrote are stale");
    assert_ne!(seen, data);
}

#[test]
fn with_preread_and_postread_the_cpu_reads_what_the_device_wrote() {
    for cache in [CacheConfig::pipt(), CacheConfig::vipt_aliasing()] {
        for hazard in [Hazard::None, Hazard::PrefetchBeforeTheDeviceWrites, Hazard::EvictAfterTheDeviceWrote]
        {
            let m = machine(cache);
            let (data, seen) = from_device(&m, true, true, hazard);
            assert_eq!(seen, data, "{cache:?} {hazard:?}");
        }
    }
}

#[test]
fn a_coherent_tag_needs_no_maintenance_on_a_snooping_machine() {
    let m = machine(CacheConfig::pipt().with_coherence(busdma_model::Coherence::Snooping));
    let (_, kva) = buffer(&m, 1);
    let mut spec = TagSpec::new(64 << 10, 8);
    spec.flags.coherent = true;
    let tag = Tag::new_root(&m, Direct, spec).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let buf = unsafe { KernelBuf::new(kva, 256) };
    m.cpu().write(kva, &pattern(3, 256)).unwrap();
    map.load(&buf, Direction::Bidirectional).unwrap();
    map.sync(SyncOp::PREWRITE | SyncOp::PREREAD).unwrap();
    assert_eq!(device_read(&m, map.segments()), pattern(3, 256));
    device_write(&m, map.segments(), &pattern(4, 256));
    map.sync(SyncOp::POSTREAD | SyncOp::POSTWRITE).unwrap();
    assert_eq!(cpu_read(&m, kva, 256), pattern(4, 256));
    assert_eq!(m.cache().unwrap().counters().maintenance_calls.load(Ordering::Relaxed), 0);
    map.unload().unwrap();
}

#[test]
fn page_less_entries_never_cause_a_cpu_flush() {
    let m = machine(CacheConfig::vipt_aliasing());
    let (page_pa, _) = buffer(&m, 1);
    let far = m
        .frames()
        .alloc(FrameRequest { placement: Placement::NotDirectMapped, ..FrameRequest::pages(1) })
        .unwrap();
    let entries = [
        SgEntry { pa: page_pa, len: 512, kind: MemKind::Page },
        SgEntry { pa: far, len: 512, kind: MemKind::Unmapped },
        SgEntry { pa: PhysAddr::new(0xfe00_0000), len: 256, kind: MemKind::Mmio },
        SgEntry { pa: PhysAddr::new(0xfd00_0000), len: 256, kind: MemKind::PeerBar { bus: None } },
    ];
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { SgList::new(&entries) }, Direction::Bidirectional).unwrap();
    let counters = m.cache().unwrap().counters();
    let calls = || counters.maintenance_calls.load(Ordering::Relaxed);
    let before = calls();
    for op in [SyncOp::PREWRITE, SyncOp::PREREAD, SyncOp::POSTREAD, SyncOp::POSTWRITE] {
        let st = map.sync(op).unwrap();
        assert_eq!(st.skipped, 3, "{op:?}: the three page-less entries are skipped");
    }
    // PREWRITE cleans, PREREAD cleans and invalidates, POSTREAD invalidates: one call each,
    // all for the page-backed entry.
    assert_eq!(calls() - before, 3);
    assert_eq!(counters.maintenance_unmapped.load(Ordering::Relaxed), 0);
    map.unload().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// With the full protocol (PREWRITE before a device read; PREREAD before and POSTREAD after a
    /// device write), whatever the buffer's alignment and length, the cache's shape, and what the
    /// CPU's cache does meanwhile (speculative fills before the device writes, evictions after),
    /// each side sees the other's data.
    #[test]
    fn the_full_protocol_is_sufficient(
        offset in 0u64..2 * LINE_SIZE,
        len in 1u64..3 * PAGE_SIZE,
        vipt in any::<bool>(),
        prefetch_before in any::<bool>(),
        evict_after in any::<bool>(),
        seed in any::<u8>(),
    ) {
        let m = machine(if vipt { CacheConfig::vipt_aliasing() } else { CacheConfig::pipt() });
        let (_, kva) = buffer(&m, 4);
        // SAFETY: memory the test allocated and keeps until the map is dropped.
        let buf = unsafe { KernelBuf::new(kva.checked_add(offset).unwrap(), len) };
        let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
        let mut map = tag.create_map().unwrap();
        let out = pattern(seed, len as usize);
        m.cpu().write(buf.kva(), &out).unwrap();
        map.load(&buf, Direction::Bidirectional).unwrap();
        map.sync(SyncOp::PREWRITE | SyncOp::PREREAD).unwrap();
        prop_assert_eq!(&device_read(&m, map.segments()), &out);
        if prefetch_before {
            m.cpu().prefetch(buf.kva(), len).unwrap();
        }
        let back = pattern(seed.wrapping_add(1), len as usize);
        device_write(&m, map.segments(), &back);
        if evict_after {
            m.cpu().evict_all().unwrap();
        }
        map.sync(SyncOp::POSTREAD | SyncOp::POSTWRITE).unwrap();
        prop_assert_eq!(cpu_read(&m, buf.kva(), len as usize), back);
        map.unload().unwrap();
    }
}
