//! Partial syncs (`DmaMap::sync_range`, `DeviceOwned::copy_from_device`), proved on the cache
//! model and through bounce pages: a partial sync does for its range exactly what a whole
//! sync does, and touches nothing outside it.

use busdma::bounce::{BounceZones, Bounced, ZoneConfig};
use busdma::front::typed::FromDevice;
use busdma::front::*;
use busdma::quickmap::QuickMaps;
use busdma::{Error, KernVa, PhysAddr, Platform};
use busdma_model::{CacheConfig, FrameRequest, HostPlatform, MachineConfig, Placement};

fn machine(cache: Option<CacheConfig>) -> HostPlatform {
    let c = MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }.upper_half_not_direct_mapped();
    HostPlatform::new(match cache {
        Some(cache) => c.with_cache(cache),
        None => c,
    })
    .unwrap()
}

fn buffer(m: &HostPlatform, pages: u64) -> (PhysAddr, KernVa) {
    let r = FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(pages) };
    let pa = m.frames().alloc(r).unwrap();
    (pa, m.phys_to_kva(pa).unwrap())
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

fn ram(m: &HostPlatform, pa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    m.read_phys(PhysAddr::new(pa), &mut b).unwrap();
    b
}

fn cpu(m: &HostPlatform, kva: KernVa, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    m.cpu().read(kva, &mut b).unwrap();
    b
}

const LEN: usize = 4096;

#[test]
fn a_partial_postread_gives_the_cpu_the_devices_bytes_of_its_range_and_leaves_the_rest_alone() {
    let m = machine(Some(CacheConfig::pipt()));
    let (pa, kva) = buffer(&m, 1);
    m.cpu().write(kva, &pattern(7, LEN)).unwrap();
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { KernelBuf::new(kva, LEN as u64) }, Direction::FromDevice).unwrap();
    map.sync(SyncOp::PREREAD).unwrap();
    m.cpu().prefetch(kva, LEN as u64).unwrap(); // stale lines while the device writes
    let frame = pattern(9, LEN);
    m.write_phys(pa, &frame).unwrap(); // the device's write
    map.sync_range(SyncOp::POSTREAD, 0, 256).unwrap();
    let mut got = vec![0u8; 256];
    map.read(0, &mut got).unwrap();
    assert_eq!(got, frame[..256], "the range is the device's bytes");
    // Outside the range the CPU still holds its stale lines: no maintenance reached them.
    assert_eq!(cpu(&m, KernVa::new(kva.raw() + 1024), 256), pattern(7, LEN)[1024..1280]);
    // ... and the map still refuses to read them: the device may still be writing there.
    let mut b = [0u8; 16];
    assert!(matches!(map.read(1024, &mut b), Err(Error::BadState { .. })));
    assert!(matches!(map.read(250, &mut b), Err(Error::BadState { .. })), "straddles the range");
    // Giving the range back to the device takes every byte back from the CPU.
    map.sync_range(SyncOp::PREREAD, 0, 256).unwrap();
    assert!(matches!(map.read(0, &mut b), Err(Error::BadState { .. })));
    map.sync(SyncOp::POSTREAD).unwrap();
    map.read(1024, &mut b).unwrap();
    assert_eq!(b[..], frame[1024..1040]);
    map.unload().unwrap();
}

#[test]
fn a_partial_prewrite_cleans_its_range_only() {
    let m = machine(Some(CacheConfig::pipt()));
    let (pa, kva) = buffer(&m, 1);
    let data = pattern(3, LEN);
    m.cpu().write(kva, &data).unwrap(); // dirty lines, RAM still zero
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { KernelBuf::new(kva, LEN as u64) }, Direction::ToDevice).unwrap();
    let st = map.sync_range(SyncOp::PREWRITE, 512, 1024).unwrap();
    assert_eq!(st.maintained, 1);
    assert_eq!(ram(&m, pa.raw() + 512, 1024), data[512..1536], "the device reads the range");
    assert_eq!(ram(&m, pa.raw(), 512), vec![0; 512], "before the range: still only in the cache");
    assert_eq!(ram(&m, pa.raw() + 1536, 1024), vec![0; 1024], "after the range: likewise");
    map.unload().unwrap();
}

#[test]
fn a_partial_sync_of_a_bounced_load_copies_its_range_only() {
    let m = machine(None);
    let qm = QuickMaps::for_platform(&m);
    let zones = BounceZones::new(&m, ZoneConfig::default());
    // A 32 MiB device; RAM starts at 16 MiB: hold its first 16 MiB so that the buffer lands
    // beyond the mask, then give them back for the bounce zone.
    let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(25), ..TagSpec::new(64 << 10, 8) };
    let tag = Tag::new_root(&m, Bounced::direct(Direct, &zones, &qm), spec).unwrap();
    let low = m.frames().alloc(FrameRequest::pages(4096)).unwrap();
    let (pa, kva) = buffer(&m, 2);
    assert!(pa.raw() >= 1 << 25);
    m.frames().free(low, 4096).unwrap();
    let old = pattern(1, 2 * LEN);
    m.write_phys(pa, &old).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    let buf = unsafe { KernelBuf::new(KernVa::new(kva.raw() + 100), 6000) };
    map.load(&buf, Direction::Bidirectional).unwrap();
    assert!(map.segments().iter().all(|s| s.end() <= 1 << 25), "bounced below the mask");
    // To the device: only the range is copied into the bounce pages.
    let new = pattern(2, 6000);
    m.write_phys(PhysAddr::new(pa.raw() + 100), &new).unwrap();
    map.sync_range(SyncOp::PREWRITE, 4000, 1000).unwrap();
    let dev: Vec<u8> = map.segments().iter().flat_map(|s| ram(&m, s.addr.raw(), s.len as usize)).collect();
    assert_eq!(dev[4000..5000], new[4000..5000]);
    // A trusted load copies nothing at load time: outside the range the bounce pages hold
    // none of the client's bytes.
    assert!(dev[..4000].iter().chain(&dev[5000..]).all(|&b| b == 0), "only the range was copied");
    // From the device: only the range is copied back.
    let reply = pattern(5, 6000);
    let mut at = 0usize;
    for s in map.segments().to_vec() {
        m.write_phys(PhysAddr::new(s.addr.raw()), &reply[at..at + s.len as usize]).unwrap();
        at += s.len as usize;
    }
    map.sync_range(SyncOp::POSTREAD, 10, 300).unwrap();
    let client = ram(&m, pa.raw() + 100, 6000);
    assert_eq!(client[10..310], reply[10..310]);
    assert_eq!(client[..10], new[..10], "outside the range the client keeps its bytes");
    assert_eq!(client[310..], new[310..]);
    map.unload().unwrap();
}

#[test]
fn a_partial_sync_out_of_the_load_is_refused_and_does_nothing() {
    let m = machine(Some(CacheConfig::pipt()));
    let (_, kva) = buffer(&m, 1);
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut map = tag.create_map().unwrap();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    map.load(&unsafe { KernelBuf::new(kva, 1000) }, Direction::Bidirectional).unwrap();
    let calls = || m.cache().unwrap().counters().maintenance_calls.load(std::sync::atomic::Ordering::Relaxed);
    let before = calls();
    assert_eq!(
        map.sync_range(SyncOp::PREWRITE, 900, 101),
        Err(Error::OutOfRange { addr: 1001, limit: 1000 })
    );
    assert_eq!(map.sync_range(SyncOp::PREWRITE, 1000, 1), Err(Error::OutOfRange { addr: 1001, limit: 1000 }));
    assert!(matches!(map.sync_range(SyncOp::PREWRITE, u64::MAX, 2), Err(Error::Overflow { .. })));
    assert_eq!(map.sync_range(SyncOp::PREWRITE, 10, 0), Err(Error::ZeroSize));
    assert_eq!(calls(), before, "nothing was maintained");
    map.unload().unwrap();
    assert!(matches!(map.sync_range(SyncOp::PREWRITE, 0, 1), Err(Error::BadState { .. })));
}

#[test]
fn copybreak_copies_a_short_frame_out_and_the_buffer_stays_the_devices() {
    let m = machine(Some(CacheConfig::pipt()));
    let tag = Tag::new_root(&m, Direct, TagSpec::new(64 << 10, 8)).unwrap();
    let mut rx = tag.alloc_buffer::<FromDevice>(2048).unwrap().to_device().ok().unwrap();
    let bus = rx.segments()[0].addr.raw();
    m.write_phys(PhysAddr::new(bus), b"short frame").unwrap();
    let mut got = [0u8; 11];
    rx.copy_from_device(0, &mut got).unwrap();
    assert_eq!(&got, b"short frame");
    // Still the device's: it writes the next frame into the same buffer.
    m.write_phys(PhysAddr::new(bus), b"second").unwrap();
    let mut got = [0u8; 6];
    rx.copy_from_device(0, &mut got).unwrap();
    assert_eq!(&got, b"second");
    assert_eq!(rx.copy_from_device(2040, &mut [0u8; 16]), Err(Error::OutOfRange { addr: 2056, limit: 2048 }));
    let cpu_side = rx.to_cpu().unwrap();
    assert_eq!(cpu_side.len(), 2048);
}
