//! An untrusted device on the real (emulated) VT-d unit: busdma bounces its sub-page buffers,
//! so the rest of their pages stays out of its reach (x86 kernel only).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use busdma::device::{Iommu, Policy};
use busdma::front::{Direction, DmaMemory, OwnedMap, Part, TagSpec};
use busdma::quickmap::QuickMaps;
use busdma::vtd::SourceId;
use busdma::{MemAttr, PAGE_SIZE};

use crate::domain::Unit;
use crate::edu::{self, Dir, Edu};
use crate::platform::PLATFORM;

fn e2s(e: busdma::Error) -> String {
    format!("{e}")
}

/// An untrusted device reaches only the bytes it was given: 512 bytes in the middle of a page
/// whose other bytes hold a secret are loaded for edu attached `Untrusted`; edu copies the
/// first 2048 bytes of the bus address's page (everything it could reach below the buffer and
/// the buffer itself) into its own memory and out to a second, whole-page buffer. The secret
/// must not be among them, and the buffer's bytes must be (busdma bounced the sub-page
/// buffer into a page of its own).
pub fn untrusted_sub_page(vtd: &Unit, dev: &Edu) -> Result<(), String> {
    const SECRET: u8 = 0xa5;
    const OFF: u64 = 1024;
    const PART: u64 = 512;
    const SPAN: u64 = 2048;
    let qm = QuickMaps::for_platform(&PLATFORM);
    let iommu = Iommu::new(&PLATFORM, &qm, vtd).map_err(e2s)?;
    let d = iommu.attach(SourceId(dev.bdf.source_id()), Policy::Untrusted).map_err(e2s)?;
    let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(PAGE_SIZE, 1) };
    let r = (|| {
        let tag = d.tag(spec).map_err(e2s)?;
        let mem = DmaMemory::alloc(&PLATFORM, &TagSpec::new(PAGE_SIZE, 1), PAGE_SIZE, MemAttr::WriteBack)
            .map_err(e2s)?;
        mem.write(0, &[SECRET; PAGE_SIZE as usize]).map_err(e2s)?;
        let data: Vec<u8> = (0..PART as u32).map(|i| (i as u8) ^ 0x3c).collect();
        mem.write(OFF, &data).map_err(e2s)?;
        let part = Part::new(mem, OFF, PART).map_err(|(e, _)| e2s(e))?;
        let out = DmaMemory::alloc(&PLATFORM, &TagSpec::new(PAGE_SIZE, 1), PAGE_SIZE, MemAttr::WriteBack)
            .map_err(e2s)?;
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
        if seen[at as usize..(at + PART) as usize] != data[..] {
            return Err("the device did not read the buffer's bytes".into());
        }
        drop(src.take().map_err(e2s)?);
        drop(dst.take().map_err(e2s)?);
        Ok(())
    })();
    d.detach().map_err(|e| format!("detach: {e:?}"))?;
    while vtd.take_fault().is_some() {}
    r
}
