//! `busdma::virtio` over tags of other strategies than a `device::Device`'s: shares copied into
//! a pre-mapped pool (queue memory mapped in place), and the reclaim of posted shares only
//! where an unload takes memory away from the device; and an untrusted virtio-iommu endpoint's
//! shares through the bounce ring (what the device sees of a reused bounce buffer).

mod common;

use std::ptr::NonNull;
use std::sync::Arc;

use busdma::device::{DeviceConfig, Policy, ViommuDevice};
use busdma::front::{Direct, IommuPerMap, Tag};
use busdma::pgtable::TablePool;
use busdma::premapped::{PoolConfig, Premapped, PremappedPool};
use busdma::quickmap::QuickMaps;
use busdma::virtio::{BusdmaHal, HalSlot, VirtioDma, VirtioKernel, tag_spec};
use busdma::{Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{HostPlatform, MachineConfig};
use common::ptdomain::PtDomain;
use std::sync::atomic::Ordering;
use virtio_drivers::{BufferDirection, Hal};

macro_rules! kernel {
    ($k:ident, $slot:ident) => {
        static $slot: HalSlot = HalSlot::new();
        struct $k;
        // SAFETY: no test maps MMIO (the function is never called).
        unsafe impl VirtioKernel for $k {
            fn slot() -> &'static HalSlot {
                &$slot
            }
            unsafe fn mmio_phys_to_virt(_pa: PhysAddr, _size: usize) -> NonNull<u8> {
                unreachable!("no MMIO in these tests")
            }
        }
    };
}
kernel!(PoolK, POOL_SLOT);
kernel!(DirectK, DIRECT_SLOT);
kernel!(MapK, MAP_SLOT);
kernel!(UntrustedK, UNTRUSTED_SLOT);

fn dev_write(m: &HostPlatform, d: &PtDomain<'_>, iova: u64, data: &[u8]) {
    assert!(iova % PAGE_SIZE + data.len() as u64 <= PAGE_SIZE);
    let pa = d.translate(iova).unwrap_or_else(|| panic!("device write of unmapped IOVA {iova:#x}"));
    m.write_phys(pa, data).unwrap();
}

fn share(buf: &mut [u8], dir: BufferDirection) -> u64 {
    // SAFETY: `buf` is valid and ours for the call.
    unsafe { <BusdmaHal<PoolK> as Hal>::share(NonNull::from(&mut *buf), dir) }
}

fn unshare(bus: u64, buf: &mut [u8], dir: BufferDirection) {
    // SAFETY: as for `share`.
    unsafe { <BusdmaHal<PoolK> as Hal>::unshare(bus, NonNull::from(&mut *buf), dir) }
}

#[test]
fn a_pooled_receive_share_gives_back_the_callers_bytes_the_device_did_not_write_never_a_previous_ios() {
    let m = common::machine();
    let qm = QuickMaps::for_platform(&m);
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    let pool = PremappedPool::new(&m, &d, &qm, PoolConfig::new(PAGE_SIZE, 1)).unwrap();
    let queues = Tag::new_root(&m, IommuPerMap(&d), tag_spec(16 * PAGE_SIZE, true)).unwrap();
    let shares = Tag::new_root(&m, Premapped(&pool), tag_spec(PAGE_SIZE, true)).unwrap();
    let dma = VirtioDma::pooled(queues, shares);
    POOL_SLOT
        .scope(&dma, || {
            // Queue memory is mapped in place: the device's write reaches the driver's pointer.
            let (qbus, qptr) = <BusdmaHal<PoolK> as Hal>::dma_alloc(1, BufferDirection::Both);
            assert_ne!(qbus, 0);
            dev_write(&m, &d, qbus, b"used ring");
            // SAFETY: one page the allocation handed out, alive until the dealloc below.
            let q = unsafe { std::slice::from_raw_parts(qptr.as_ptr(), 9) };
            assert_eq!(q, b"used ring");
            let maps = d.maps.load(Ordering::Relaxed);
            let caller: Vec<u8> = (0..100u8).map(|i| i | 0x80).collect();
            // Round 1: the device fills the whole buffer (its bytes stay in the pool's slot).
            let mut buf = caller.clone();
            let bus = share(&mut buf, BufferDirection::DeviceToDriver);
            dev_write(&m, &d, bus, &[0xaa; 100]);
            unshare(bus, &mut buf, BufferDirection::DeviceToDriver);
            assert_eq!(buf, [0xaa; 100]);
            // Round 2, the same slot: the device writes 10 bytes; the other 90 are the caller's.
            let mut buf = caller.clone();
            let bus2 = share(&mut buf, BufferDirection::DeviceToDriver);
            assert_eq!(bus2, bus, "one slot: the same bus address");
            dev_write(&m, &d, bus2, b"0123456789");
            unshare(bus2, &mut buf, BufferDirection::DeviceToDriver);
            assert_eq!(&buf[..10], b"0123456789");
            assert_eq!(&buf[10..], &caller[10..], "a previous I/O's bytes came back");
            // A transmit share: the device reads the caller's bytes at the slot.
            let mut tx = caller.clone();
            let bus3 = share(&mut tx, BufferDirection::DriverToDevice);
            let mut seen = vec![0u8; 100];
            m.read_phys(d.translate(bus3).unwrap(), &mut seen).unwrap();
            assert_eq!(seen, caller);
            unshare(bus3, &mut tx, BufferDirection::DriverToDevice);
            assert_eq!(d.maps.load(Ordering::Relaxed), maps, "a share mapped something");
            // SAFETY: what `dma_alloc` returned, freed once.
            assert_eq!(unsafe { <BusdmaHal<PoolK> as Hal>::dma_dealloc(qbus, qptr, 1) }, 0);
        })
        .unwrap();
    assert_eq!(dma.outstanding(), (0, 0));
    assert_eq!(dma.stats().shares.load(Ordering::Relaxed), 3);
}

#[test]
fn posted_shares_are_reclaimed_only_where_an_unload_takes_the_memory_from_the_device() {
    let m = common::machine();
    // No IOMMU: the device would keep reaching the memory, so it is never freed under it.
    let direct = VirtioDma::streaming(Tag::new_root(&m, Direct, tag_spec(PAGE_SIZE, true)).unwrap());
    let mut buf = [7u8; 64];
    let bus = DIRECT_SLOT
        .scope(&direct, || {
            // SAFETY: `buf` is valid for the call.
            unsafe {
                <BusdmaHal<DirectK> as Hal>::share(
                    NonNull::from(&mut buf[..]),
                    BufferDirection::DeviceToDriver,
                )
            }
        })
        .unwrap();
    assert_ne!(bus, 0);
    assert!(matches!(direct.reclaim_shares(), Err(Error::BadState { .. })));
    assert_eq!(direct.outstanding(), (0, 1));
    // Through an IOMMU domain (the bounce ring): the unload cuts the device off first.
    let tp = TablePool::new(&m);
    let d = PtDomain::new(&m, &tp);
    let mapped =
        VirtioDma::windowed(Tag::new_root(&m, IommuPerMap(&d), tag_spec(PAGE_SIZE, true)).unwrap()).unwrap();
    assert!(mapped.has_ring());
    let bus = MAP_SLOT
        .scope(&mapped, || {
            // SAFETY: as above.
            unsafe {
                <BusdmaHal<MapK> as Hal>::share(NonNull::from(&mut buf[..]), BufferDirection::DeviceToDriver)
            }
        })
        .unwrap();
    assert!(d.translate(bus).is_some());
    assert_eq!(mapped.reclaim_shares(), Ok(1));
    assert!(d.translate(bus).is_none(), "a reclaimed share is still mapped");
    assert_eq!(mapped.outstanding(), (0, 0));
}

/// An untrusted endpoint's shares go through the bounce ring in whole pages of busdma's, and a
/// page that a commit handed back is reused for the next share of its size: a short share in
/// a reused page must show the device its own bytes and zeros (`Policy::Untrusted`'s promise),
/// not the rest of an earlier, longer share.
#[test]
fn an_untrusted_endpoints_short_share_in_a_reused_bounce_page_shows_the_device_its_bytes_and_zeros() {
    const DEV: u32 = 0x30;
    let m =
        Arc::new(HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap());
    let qm = QuickMaps::for_platform(&*m);
    let (dev, unit) = common::viommu::on_machine(&m, &qm);
    let d = ViommuDevice::attach(&unit, DEV, Policy::Untrusted, DeviceConfig::default()).unwrap();
    let dma = VirtioDma::new(&d, 16 * PAGE_SIZE, true).unwrap();
    assert!(dma.has_ring());
    let share = |buf: &mut [u8]| {
        // SAFETY: `buf` is valid and ours for the call.
        unsafe { <BusdmaHal<UntrustedK> as Hal>::share(NonNull::from(buf), BufferDirection::DriverToDevice) }
    };
    let unshare = |bus: u64, buf: &mut [u8]| {
        // SAFETY: as for `share`.
        unsafe {
            <BusdmaHal<UntrustedK> as Hal>::unshare(bus, NonNull::from(buf), BufferDirection::DriverToDevice)
        }
    };
    UNTRUSTED_SLOT
        .scope(&dma, || {
            // A frame of 2048 bytes, sent and given back: its page returns to the ring's spares.
            let mut long = vec![0xaa; 2048];
            let first = share(&mut long);
            assert!(dev.dma_read(DEV, Iova::new(first), 2048).is_some_and(|b| b == long));
            unshare(first, &mut long);
            assert_eq!(dev.dma_read(DEV, Iova::new(first), 1), None, "reachable after its unshare");
            let mut short = vec![0x11; 16];
            let bus = share(&mut short);
            let page = Iova::new(bus & !(PAGE_SIZE - 1));
            let whole = dev.dma_read(DEV, page, PAGE_SIZE).expect("the share's page is mapped");
            let off = (bus % PAGE_SIZE) as usize;
            assert_eq!(&whole[off..off + 16], &short[..]);
            let stale = whole[..off].iter().chain(&whole[off + 16..]).filter(|&&b| b != 0).count();
            assert_eq!(
                stale, 0,
                "the device reads {stale} bytes around its 16-byte share that are not zeros"
            );
            unshare(bus, &mut short);
        })
        .unwrap();
    assert_eq!(dma.outstanding(), (0, 0));
    assert_eq!(dma.stats().shares.load(Ordering::Relaxed), 2);
    drop(dma);
    d.detach().unwrap();
}
