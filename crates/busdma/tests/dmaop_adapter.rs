//! busdma's `dma_api::DmaOp` adapter (feature `dma-api`) on the machine model: what a driver
//! written against `dma-api` (eth-intel, nvme-driver) maps is reachable by its device through
//! the IOMMU, only while mapped, and under its constraints.
//!
//! Run: `cargo test -p busdma --features dma-api --test dmaop_adapter` (rustc >= 1.88).
#![cfg(feature = "dma-api")]

use core::alloc::Layout;
use core::num::NonZeroUsize;
use core::ptr::NonNull;

use busdma::dma::{Iommu, Policy};
use busdma::dmaop::BusdmaDmaOp;
use busdma::quickmap::QuickMaps;
use busdma::{Iova, PAGE_SIZE, PageRequest, Platform};
use busdma_model::{DmaPort, HostPlatform, IommuConfig, MachineConfig, ModelIommu};
use dma_api::{DmaConstraints, DmaDirection, DmaOp};

const DEV: u32 = 0x18;

/// A 'static machine, IOMMU and adapter (`DmaOp` is `'static`: a kernel's IOMMUs live forever).
fn setup(
    policy: Policy,
) -> (&'static HostPlatform, &'static Iommu<'static, ModelIommu<'static>>, BusdmaDmaOp<ModelIommu<'static>>) {
    let m: &'static HostPlatform =
        Box::leak(Box::new(HostPlatform::new(MachineConfig::with_ram(64 << 20)).unwrap()));
    let qm: &'static QuickMaps = Box::leak(Box::new(QuickMaps::for_platform(m)));
    let hw = ModelIommu::new(m, IommuConfig::default()).unwrap();
    let iommu: &'static Iommu<'static, ModelIommu<'static>> =
        Box::leak(Box::new(Iommu::new(m, qm, hw).unwrap()));
    let dev = iommu.attach(DEV, policy).unwrap();
    (m, iommu, BusdmaDmaOp::new(dev, true))
}

fn any() -> DmaConstraints {
    DmaConstraints { addr_mask: u64::MAX, align: 1, boundary: None, max_segment_size: None }
}

/// `len` bytes of the model's direct-mapped RAM filled with a pattern (a driver's buffer).
fn kernel_buffer(m: &HostPlatform, pages: u64) -> (busdma::PhysAddr, NonNull<u8>) {
    let pa = m.alloc_pages(&PageRequest::pages(pages)).unwrap();
    let kva = m.phys_to_kva(pa).unwrap();
    (pa, NonNull::new(kva.raw() as *mut u8).unwrap())
}

#[test]
fn a_streaming_map_reaches_the_buffer_through_the_iommu_and_its_unmap_cuts_the_device_off() {
    let (m, iommu, op) = setup(Policy::Strict);
    let (pa, ptr) = kernel_buffer(m, 2);
    let pattern: Vec<u8> = (0..6000u32).map(|i| (i * 7 + 1) as u8).collect();
    m.write_phys(pa, &pattern).unwrap();
    // SAFETY: the buffer lives (never freed) until after the unmap below.
    let h = unsafe { op.map_streaming(any(), ptr, NonZeroUsize::new(6000).unwrap(), DmaDirection::ToDevice) }
        .unwrap_or_else(|e| panic!("{e:?}: {:?}", op.last_error()));
    let bus = h.dma_addr().as_u64();
    assert_ne!(bus, pa.raw(), "the device was handed the physical address");
    let mut seen = vec![0u8; 6000];
    iommu.hw().port(DEV).dma_read(Iova::new(bus), &mut seen).unwrap();
    assert_eq!(seen, pattern);
    // SAFETY: the handle of the map above, unmapped once.
    unsafe { op.unmap_streaming(h) };
    assert!(iommu.hw().port(DEV).dma_read(Iova::new(bus), &mut seen).is_err(), "reachable after unmap");
    assert_eq!(op.outstanding(), (0, 0));
}

#[test]
fn an_untrusted_devices_sub_page_map_is_bounced_and_its_writes_reach_the_buffer_at_the_sync() {
    let (m, iommu, op) = setup(Policy::Untrusted);
    let (pa, ptr) = kernel_buffer(m, 1);
    m.fill_phys(pa, PAGE_SIZE, 0).unwrap();
    // A sub-page buffer 100 bytes into the page: the untrusted policy bounces it.
    // SAFETY: as above; `ptr + 100` stays inside the page.
    let sub = unsafe { NonNull::new_unchecked(ptr.as_ptr().add(100)) };
    // SAFETY: the buffer lives until after the unmap.
    let h =
        unsafe { op.map_streaming(any(), sub, NonZeroUsize::new(200).unwrap(), DmaDirection::Bidirectional) }
            .unwrap();
    let bus = h.dma_addr().as_u64();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    // The device reaches no byte of the page outside the buffer: its page is a bounce page.
    m.fill_phys(pa, 100, 0xee).unwrap();
    iommu.hw().port(DEV).dma_read(Iova::new(bus & !(PAGE_SIZE - 1)), &mut page).unwrap();
    assert!(!page.contains(&0xee), "the untrusted device saw the buffer's neighbours");
    iommu.hw().port(DEV).dma_write(Iova::new(bus), &[0x5a; 200]).unwrap();
    op.sync_map_for_cpu(&h, 0, 200, DmaDirection::Bidirectional, dma_api::DmaCoherency::Coherent);
    let mut got = vec![0u8; 200];
    m.read_phys(busdma::PhysAddr::new(pa.raw() + 100), &mut got).unwrap();
    assert_eq!(got, vec![0x5a; 200], "the device's bytes did not reach the buffer at the sync");
    // SAFETY: the handle of the map above.
    unsafe { op.unmap_streaming(h) };
}

#[test]
fn coherent_memory_is_zeroed_aligned_under_the_mask_and_shared_with_the_device() {
    let (_m, iommu, op) = setup(Policy::Strict);
    let c = DmaConstraints {
        addr_mask: u32::MAX as u64,
        align: 16,
        boundary: Some(1 << 16),
        max_segment_size: None,
    };
    let layout = Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: the allocation is freed once, below.
    let h = unsafe { op.alloc_coherent(c, layout) }.unwrap();
    let bus = h.dma_addr().as_u64();
    assert!(bus + 4096 <= 1 << 32 && bus % 4096 == 0, "bus address {bus:#x} breaks the constraints");
    // SAFETY: `h.as_ptr()` points to 4096 bytes the adapter owns until the dealloc.
    let before = unsafe { core::slice::from_raw_parts(h.as_ptr().as_ptr(), 4096) }.to_vec();
    assert!(before.iter().all(|&b| b == 0), "not zeroed");
    iommu.hw().port(DEV).dma_write(Iova::new(bus + 8), b"written by the device").unwrap();
    // SAFETY: as above; read by volatile copy (the device may write at any time).
    let got: Vec<u8> = (0..21).map(|i| unsafe { h.as_ptr().as_ptr().add(8 + i).read_volatile() }).collect();
    assert_eq!(&got, b"written by the device");
    // SAFETY: the handle of the allocation above.
    unsafe { op.dealloc_coherent(h) }.unwrap();
    assert!(iommu.hw().port(DEV).dma_write(Iova::new(bus), b"x").is_err(), "reachable after the free");
    assert_eq!(op.outstanding(), (0, 0));
}
