//! `busdma::device` on the real (emulated) IOMMU: edu attached with one call, one DMA round
//! trip through a tag of the device, and the detach that blocks it again. Shared by the x86
//! kernel (VT-d) and the aarch64 one (SMMUv3, `qemu/aarch64`, by path): `crate::domain`
//! names the driver (`Unit`) and how it names a device (`device_id`).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use busdma::device::{DetachError, DmaDevice, Iommu, Policy};
use busdma::front::{Direction, DmaMemory, HeapBuffer, OwnedMap, Part, RawSegment, TagSpec};
use busdma::quickmap::QuickMaps;
use busdma::{MemAttr, PAGE_SIZE, PageRequest, Platform};

use crate::domain::{Unit, device_id};
use crate::edu::{self, Dir, Edu};
use crate::platform::PLATFORM;

/// Bytes moved each way (edu aborts QEMU 7.2 on a full 4096-byte transfer).
const LEN: u64 = 2048;

fn e2s(e: busdma::Error) -> String {
    format!("{e}")
}

/// edu copies a RAM buffer into its own through one map, then back into another RAM buffer
/// through a second map, both through the device's domain; after the detach its DMA faults.
pub fn device_round_trip(unit: &Unit, dev: &Edu) -> Result<(), String> {
    let qm = QuickMaps::for_platform(&PLATFORM);
    let iommu = Iommu::new(&PLATFORM, &qm, unit).map_err(e2s)?;
    let d = iommu.attach(device_id(dev), Policy::Strict).map_err(e2s)?;
    edu_round_trip(d, dev, &|| while unit.take_fault().is_some() {})?;
    if iommu.stats().leaked_domains != 0 {
        return Err("a domain was leaked".into());
    }
    Ok(())
}

/// The driver, written once against `busdma::device::DmaDevice` and run unchanged on VT-d
/// (x86), SMMUv3 (`qemu/aarch64`) and virtio-iommu (`crate::viommu`): edu copies a RAM buffer
/// into its own memory through one map of a tag of `d`, then back into another RAM buffer
/// through a second map; the detach is refused (`Busy`, the device handed back) while the tag
/// lives and completes after; then edu's DMA to the old bus address is blocked
/// (`drain_faults` clears the IOMMU's fault records it leaves).
pub fn edu_round_trip<'a, D: DmaDevice<'a>>(d: D, dev: &Edu, drain_faults: &dyn Fn()) -> Result<(), String> {
    let p = d.platform();
    let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(PAGE_SIZE, 1) };
    let tag = d.tag(spec).map_err(e2s)?;
    let src = p.alloc_pages(&PageRequest::pages(1)).map_err(e2s)?;
    let dst = p.alloc_pages(&PageRequest::pages(1)).map_err(e2s)?;
    let pattern: Vec<u8> = (0..LEN as u32).map(|i| (i.wrapping_mul(13) + 5) as u8).collect();
    let r = (|| {
        p.write_phys(src, &pattern).map_err(e2s)?;
        p.fill_phys(dst, PAGE_SIZE, 0).map_err(e2s)?;
        let (mut out, mut back) = (tag.create_map().map_err(e2s)?, tag.create_map().map_err(e2s)?);
        // SAFETY: `src` and `dst` are frames the check allocated and frees only after both maps
        // are unloaded and the device detached.
        let (s, d) = unsafe { (RawSegment::new(src, LEN), RawSegment::new(dst, LEN)) };
        let bus_out = out.load(&s, Direction::ToDevice).map_err(e2s)?[0].addr.raw();
        let bus_back = back.load(&d, Direction::FromDevice).map_err(e2s)?[0].addr.raw();
        if bus_out == src.raw() || bus_back == dst.raw() {
            return Err(format!("bus addresses {bus_out:#x}/{bus_back:#x} are physical: not translated"));
        }
        dev.dma(Dir::FromRam, bus_out, 0, LEN)?;
        dev.dma(Dir::ToRam, bus_back, 0, LEN)?;
        let mut got = vec![0u8; LEN as usize];
        p.read_phys(dst, &mut got).map_err(e2s)?;
        if got != pattern {
            return Err("the round trip through the device's domain did not arrive".into());
        }
        out.unload().map_err(e2s)?;
        back.unload().map_err(e2s)?;
        Ok(bus_back)
    })();
    // The tag holds the attachment: the detach hands the device back.
    let d = match d.detach() {
        Err(DetachError::Busy { device, handles: 1 }) => device,
        Err(e) => return Err(format!("detach with a live tag: {e:?}, not Busy with 1 handle")),
        Ok(()) => return Err("detached while a tag of the device was alive".into()),
    };
    drop(tag);
    d.detach().map_err(|e| format!("detach: {e:?}"))?;
    let bus_back = r?;
    // Detached: the device's DMA is blocked (and recorded as a fault, which we clear).
    p.fill_phys(dst, PAGE_SIZE, 0).map_err(e2s)?;
    dev.dma(Dir::ToRam, bus_back, 0, LEN)?;
    let mut got = vec![0u8; LEN as usize];
    p.read_phys(dst, &mut got).map_err(e2s)?;
    drain_faults();
    // SAFETY: both runs came from `alloc_pages` above and no mapping reaches them any more
    // (unloaded, and the device detached).
    unsafe {
        p.free_pages(src, 1);
        p.free_pages(dst, 1);
    }
    if got.iter().any(|&b| b != 0) {
        return Err("DMA after the detach reached memory".into());
    }
    Ok(())
}

/// The kernel's heap as owned DMA buffers: a `HeapBuffer` (whole heap pages, in this kernel's
/// identity direct map) is loaded into an owned map with no `unsafe`, edu copies it into its
/// own memory and back into a second heap buffer through the device's domain, and the bytes
/// come back with the buffer once the strict unload proves no translation reaches it.
pub fn heap_buffer_round_trip(unit: &Unit, dev: &Edu) -> Result<(), String> {
    let qm = QuickMaps::for_platform(&PLATFORM);
    let iommu = Iommu::new(&PLATFORM, &qm, unit).map_err(e2s)?;
    let d = iommu.attach(device_id(dev), Policy::Strict).map_err(e2s)?;
    let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(PAGE_SIZE, 1) };
    let r = (|| {
        let tag = d.tag(spec).map_err(e2s)?;
        let pattern: Vec<u8> = (0..LEN as u32).map(|i| (i.wrapping_mul(7) + 3) as u8).collect();
        let mut src = HeapBuffer::new_zeroed(LEN).map_err(e2s)?;
        src.bytes_mut().copy_from_slice(&pattern);
        let dst = HeapBuffer::new_zeroed(LEN).map_err(e2s)?;
        let mut out: OwnedMap<'_, _, _, HeapBuffer> = tag.create_owned_map().map_err(e2s)?;
        let mut back: OwnedMap<'_, _, _, HeapBuffer> = tag.create_owned_map().map_err(e2s)?;
        let bus_out = out.load(src, Direction::ToDevice).map_err(|(e, _)| e2s(e))?[0].addr.raw();
        let bus_back = back.load(dst, Direction::FromDevice).map_err(|(e, _)| e2s(e))?[0].addr.raw();
        dev.dma(Dir::FromRam, bus_out, 0, LEN)?;
        dev.dma(Dir::ToRam, bus_back, 0, LEN)?;
        // While the map holds it, the CPU reads the buffer by copy only.
        let mut peek = [0u8; 16];
        back.buffer().ok_or("the map lost its buffer")?.read(0, &mut peek).map_err(e2s)?;
        let mut got = back.take().map_err(e2s)?;
        if got.bytes_mut() != &pattern[..] || peek[..] != pattern[..16] {
            return Err("the heap buffer's round trip through the device's domain did not arrive".into());
        }
        drop(out.take().map_err(e2s)?);
        Ok(())
    })();
    d.detach().map_err(|e| format!("detach: {e:?}"))?;
    r
}

/// An untrusted device reaches only the bytes it was given, on the table IOMMU this kernel
/// drives (`crate::domain::Unit`): [`untrusted_sub_page_on`] over edu attached `Untrusted` by
/// `busdma::device::Iommu`.
pub fn untrusted_sub_page(unit: &Unit, dev: &Edu) -> Result<(), String> {
    let qm = QuickMaps::for_platform(&PLATFORM);
    let iommu = Iommu::new(&PLATFORM, &qm, unit).map_err(e2s)?;
    let d = iommu.attach(device_id(dev), Policy::Untrusted).map_err(e2s)?;
    untrusted_sub_page_on(d, dev, &|| while unit.take_fault().is_some() {})
}

/// An untrusted device reaches only the bytes it was given, written once against
/// `DmaDevice` (`d` attached `Untrusted`; VT-d, SMMUv3 and virtio-iommu run it): 512 bytes in
/// the middle of a page whose other bytes hold a secret are loaded for edu; edu copies the
/// first 2048 bytes of the bus address's page (everything it could reach below the buffer and
/// the buffer itself) into its own memory and out to a second, whole-page buffer. The secret
/// must not be among them, the buffer's bytes must be, and everything else must read as zero
/// (busdma bounced the sub-page buffer into a zeroed page of its own). `drain_faults` clears
/// the IOMMU's fault records after the detach.
pub fn untrusted_sub_page_on<'a, D: DmaDevice<'a>>(
    d: D,
    dev: &Edu,
    drain_faults: &dyn Fn(),
) -> Result<(), String> {
    const SECRET: u8 = 0xa5;
    const OFF: u64 = 1024;
    const PART: u64 = 512;
    const SPAN: u64 = 2048;
    let p = d.platform();
    let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(PAGE_SIZE, 1) };
    let r = (|| {
        let tag = d.tag(spec).map_err(e2s)?;
        let mem =
            DmaMemory::alloc(p, &TagSpec::new(PAGE_SIZE, 1), PAGE_SIZE, MemAttr::WriteBack).map_err(e2s)?;
        mem.write(0, &[SECRET; PAGE_SIZE as usize]).map_err(e2s)?;
        let data: Vec<u8> = (0..PART as u32).map(|i| (i as u8) ^ 0x3c).collect();
        mem.write(OFF, &data).map_err(e2s)?;
        let part = Part::new(mem, OFF, PART).map_err(|(e, _)| e2s(e))?;
        let out =
            DmaMemory::alloc(p, &TagSpec::new(PAGE_SIZE, 1), PAGE_SIZE, MemAttr::WriteBack).map_err(e2s)?;
        let mut src: OwnedMap<'_, _, _, Part<'_, _>> = tag.create_owned_map().map_err(e2s)?;
        let mut dst: OwnedMap<'_, _, _, DmaMemory<'_, _>> = tag.create_owned_map().map_err(e2s)?;
        let bus = src.load(part, Direction::ToDevice).map_err(|(e, _)| e2s(e))?[0].addr.raw();
        let bus_out = dst.load(out, Direction::FromDevice).map_err(|(e, _)| e2s(e))?[0].addr.raw();
        src.sync(busdma::SyncOp::PREWRITE).map_err(e2s)?;
        let page = bus & !(PAGE_SIZE - 1);
        let at = bus - page;
        if at + PART > SPAN {
            return Err(format!("the buffer's bus address {bus:#x} lies beyond edu's span of its page"));
        }
        dev.dma(Dir::FromRam, page, 0, SPAN)?;
        dev.dma(Dir::ToRam, bus_out, 0, SPAN)?;
        let mut seen = vec![0u8; SPAN as usize];
        dst.buffer().ok_or("lost the out buffer")?.read(0, &mut seen).map_err(e2s)?;
        let outside = |i: usize| (i as u64) < at || (i as u64) >= at + PART;
        if let Some(i) = (0..seen.len()).find(|&i| outside(i) && seen[i] == SECRET) {
            return Err(format!(
                "the device read the page's secret at offset {i} (bus page {page:#x}): not bounced"
            ));
        }
        if let Some(i) = (0..seen.len()).find(|&i| outside(i) && seen[i] != 0) {
            return Err(format!("the device read {:#x} at offset {i} beside the buffer, not zero", seen[i]));
        }
        if seen[at as usize..(at + PART) as usize] != data[..] {
            return Err("the device did not read the buffer's bytes".into());
        }
        drop(src.take().map_err(e2s)?);
        drop(dst.take().map_err(e2s)?);
        Ok(())
    })();
    d.detach().map_err(|e| format!("detach: {e:?}"))?;
    drain_faults();
    r
}
