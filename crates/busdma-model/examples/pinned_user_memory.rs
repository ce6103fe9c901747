//! Pre-registered user memory (seed 001) on busdma: a process registers a buffer once (pinned
//! once, translated user → physical in O(1) from then on), and the driver maps parts of it
//! again and again, each part owned by its map while the device may reach it. No page is
//! pinned per I/O, the last unregistration answers EBUSY while a part is mapped, and there is
//! no `unsafe` in the driver.
//!
//! Run it with `cargo run --release -p busdma-model --example pinned_user_memory`. The user
//! address space is the model's (`busdma_model::uspace`); the device reads and writes by DMA
//! through the model IOMMU with deferred invalidation (a registered buffer leaves its map only
//! after the flush that proves the device lost it).
#![allow(missing_docs)]

use std::sync::atomic::Ordering;

use busdma::device::{DeviceStrategy, Iommu, Policy};
use busdma::front::{Direction, OwnedMap, SyncOp, TagSpec};
use busdma::pin::{RegisteredBuffer, Registry};
use busdma::quickmap::QuickMaps;
use busdma::{Error, PAGE_SIZE, Result, UserVa};
use busdma_model::uspace::UserSpace;
use busdma_model::{DmaPort, HostPlatform, IommuConfig, MachineConfig, ModelIommu};

type Hw<'m> = ModelIommu<'m>;
type Part<'r, 'm> = RegisteredBuffer<'r, &'r UserSpace<'m>>;
type PartMap<'i, 'm, 'r> = OwnedMap<'i, HostPlatform, DeviceStrategy<'i, 'm, Hw<'m>>, Part<'r, 'm>>;

const DEV: u32 = 0x40;
const UA: UserVa = UserVa::new(0x7f00_0000_0000);
const PAGES: u64 = 64;
/// Each I/O maps one 16 KiB part of the registered buffer.
const PART: u64 = 4 * PAGE_SIZE;

fn main() -> Result<()> {
    // The kernel: a machine, its IOMMU, a process's address space with a mapped buffer.
    let machine = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) })?;
    let quick_maps = QuickMaps::for_platform(&machine);
    let iommu = Iommu::new(&machine, &quick_maps, ModelIommu::new(&machine, IommuConfig::default())?)?;
    let process = UserSpace::new(&machine);
    process.map(UA, PAGES * PAGE_SIZE)?;

    // The process registers its buffer once (pinned here, and only here).
    let registry = Registry::new(&process, u64::MAX)?;
    registry.register(UA, PAGES * PAGE_SIZE)?;
    let pins = process.counters().pins.load(Ordering::Relaxed);

    // The driver: a device, a tag, a few maps that own registered parts while mapped.
    let dev = iommu.attach(DEV, Policy::Deferred)?;
    let tag = dev.tag(TagSpec::new(PART, 8))?;
    let mut maps: Vec<PartMap<'_, '_, '_>> = (0..4).map(|_| tag.create_owned_map()).collect::<Result<_>>()?;
    let port = iommu.hw().port(DEV);

    let mut ios = 0u64;
    for round in 0..8u64 {
        for (slot, map) in maps.iter_mut().enumerate() {
            let part = (round * 4 + slot as u64) % (PAGES * PAGE_SIZE / PART);
            let ua = UserVa::new(UA.raw() + part * PART);
            // Write I/O: the process filled the part; the device reads it.
            let data: Vec<u8> =
                (0..PART).map(|i| (i as u8) ^ (round as u8).wrapping_mul(17) ^ part as u8).collect();
            process.write(ua, &data)?;
            let buf = registry.load(ua, PART)?;
            let segs = map.load(buf, Direction::Bidirectional).map_err(|(e, _)| e)?.to_vec();
            map.sync(SyncOp::PREWRITE.union(SyncOp::PREREAD))?;
            let mut seen = Vec::new();
            for s in &segs {
                let mut b = vec![0u8; s.len as usize];
                port.dma_read(s.addr, &mut b).map_err(|_| Error::BadState { what: "device read faulted" })?;
                seen.extend(b);
            }
            assert_eq!(seen, data, "the device read the process's bytes");
            // Read I/O into the same part: the device writes, the process sees it after POSTREAD.
            port.dma_write(segs[0].addr, b"from the device")
                .map_err(|_| Error::BadState { what: "device write faulted" })?;
            map.sync(SyncOp::POSTREAD.union(SyncOp::POSTWRITE))?;
            // While the part is mapped, the region cannot go away.
            match registry.unregister(UA, PAGES * PAGE_SIZE) {
                Err(Error::Busy { .. }) => {}
                other => panic!("unregister while mapped must be EBUSY, got {other:?}"),
            }
            // The part leaves the map only once the deferred unmap is flushed.
            drop(map.take()?);
            let mut back = [0u8; 15];
            process.read(ua, &mut back)?;
            assert_eq!(&back, b"from the device");
            ios += 1;
        }
    }
    assert_eq!(process.counters().pins.load(Ordering::Relaxed), pins, "no page pinned per I/O");
    drop(maps);
    drop(tag);
    drop(dev);
    registry.unregister(UA, PAGES * PAGE_SIZE)?;
    registry.synchronize()?;
    assert_eq!(process.pinned_pages(), 0);
    println!(
        "pinned_user_memory: {PAGES} pages registered once, {ios} I/Os of {} KiB mapped from it \
         (read and write through the IOMMU, deferred invalidation), 0 pins per I/O, EBUSY while mapped, \
         all unpinned at the end",
        PART / 1024
    );
    Ok(())
}
