//! The virtio-iommu checks (`iommu=virtio`): QEMU's virtio-iommu-pci with `boot-bypass=off`
//! in front of the two edu devices, driven by `busdma::virtio_iommu`.
//!
//! Same memory plan as the VT-d checks: buffers at or above 2^28 (beyond edu's mask), so data
//! that reaches one was translated; the twin page of an IOVA (same number, below 2^28) holds a
//! sentinel that an untranslated DMA would overwrite.

use alloc::format;
use alloc::string::String;

use alloc::vec::Vec;
use busdma::device::{DeviceConfig, Policy, ViommuDevice};
use busdma::front::{Direction, IommuPerMap, IommuReserved, Segment, SyncOp, Tag, TagSpec};
use busdma::iommu::InvalidationPolicy;
use busdma::pgtable::Prot;
use busdma::quickmap::QuickMaps;
use busdma::virtio_iommu::{ConfigSpace, FaultReason, ReservedKind, ViommuDomain, VirtioIommu};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, Platform};

use crate::checks::{
    Buf, CheckResult, Runner, SENTINEL, Twin, XFER, dma_segments, e2s, kbuf, pattern, segment_twins,
};
use crate::domain::EDU_LIMIT;
use crate::edu::{self, Dir, Edu};
use crate::pci::{self, Bdf};
use crate::platform::{KernelPlatform, PLATFORM};
use crate::println;

/// virtio-iommu-pci: Red Hat's virtio vendor id, modern device id 0x1040 + 23.
const VENDOR: u16 = 0x1af4;
const DEVICE: u16 = 0x1057;
/// x86's MSI window, which QEMU's PROBE reports as a reserved region of type MSI.
const MSI_WINDOW: u64 = 0xfee0_0000;
/// I/Os per strategy in the request-count check.
const IOS: u64 = 8;
/// Deferred bound of the request-count check: a batch of UNMAPs every 4 unmaps, never by age
/// (an hour: the check controls time).
const DEFERRED: InvalidationPolicy =
    InvalidationPolicy::Deferred { max_entries: 4, max_age_ns: 3_600_000_000_000 };

struct Cfg(Bdf);

impl ConfigSpace for Cfg {
    fn read32(&self, offset: u8) -> u32 {
        self.0.read32(offset.into())
    }
}

type Unit = VirtioIommu<'static, KernelPlatform>;
type Dom<'v> = ViommuDomain<'v, 'static, KernelPlatform>;

fn aperture() -> AddrRange<Iova> {
    // 1 MiB up to edu's 28-bit mask.
    AddrRange::new(Iova::new(1 << 20), Iova::new(EDU_LIMIT)).unwrap_or(AddrRange::empty_at(Iova::new(0)))
}

/// The faults the last DMA should have caused: the first names `endpoint`, the IOVA `bus`,
/// `reason`. (Not
/// the direction: QEMU 7.2 reports faults with only the ADDRESS flag, no READ/WRITE.)
fn expect_fault(unit: &Unit, endpoint: u32, bus: u64, reason: FaultReason) -> CheckResult {
    let Some(f) = unit.take_fault().map_err(e2s)? else {
        return Err(format!("no fault record for the access at {bus:#x}"));
    };
    if f.endpoint != endpoint || f.address.map(|a| a.raw()) != Some(bus) || f.reason != reason {
        return Err(format!(
            "fault {f:?} does not name endpoint {endpoint:#x}, address {bus:#x}, {reason:?}"
        ));
    }
    // QEMU splits a transfer into accesses and reports each one that faults: every further
    // record must name the same endpoint and an address inside the transfer.
    while let Some(more) = unit.take_fault().map_err(e2s)? {
        let inside = more.address.is_some_and(|a| a.raw() >= bus && a.raw() < bus + XFER);
        if more.endpoint != endpoint || !inside || more.reason != reason {
            return Err(format!("unexpected further fault {more:?}"));
        }
    }
    Ok(())
}

fn drain_faults(unit: &Unit) -> CheckResult {
    while unit.take_fault().map_err(e2s)?.is_some() {}
    Ok(())
}

/// Runs the virtio-iommu checks on `devs` (two edu devices), and the virtio-drivers checks
/// behind the unit when the runner gave `virtio` devices. `granule`: the smallest page
/// the device was configured with (kernel command line `granule=64k`; default 4 KiB). With a
/// granule larger than a page only the granule checks run ([`large_granule`]).
pub fn run(r: &mut Runner, devs: &[Edu], granule: u64, virtio: Option<&crate::virtio_check::Found>) {
    let mut found = None;
    pci::scan_bus0(|bdf, v, d| {
        if (v, d) == (VENDOR, DEVICE) {
            found = Some(bdf);
        }
    });
    let Some(bdf) = found else {
        r.check("virtio-iommu-pci is present", || Err("no 1af4:1057 on bus 0".into()));
        return;
    };
    bdf.enable();
    // The machine's quick maps, for the bounce copies of untrusted endpoints; the unit keeps
    // them (`'static`: the unit's platform is).
    let qm: &'static QuickMaps =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(QuickMaps::for_platform(&PLATFORM)));
    // SAFETY: the virtio-iommu function is ours alone, SeaBIOS assigned its BARs below 4 GiB
    // (identity-mapped uncached), memory decoding and bus mastering are on.
    let unit = match unsafe { VirtioIommu::new(&PLATFORM, qm, &Cfg(bdf)) } {
        Ok(u) => u,
        Err(e) => {
            r.check("virtio-iommu initialises (bypass off)", || Err(e2s(e)));
            return;
        }
    };
    let info = *unit.info();
    println!(
        "virtio-iommu {bdf}: features {:#x}, page sizes {:#x}, input [{:#x}, {:#x}], domains [{}, {}], probe {} bytes",
        info.features,
        info.page_size_mask,
        info.input_first,
        info.input_last,
        info.domain_first,
        info.domain_last,
        info.probe_size
    );
    r.check("virtio-iommu initialises with bypass off and MAP_UNMAP, PROBE negotiated", || {
        use busdma::virtio_iommu::wire::feature;
        let need = feature::MAP_UNMAP | feature::PROBE | feature::INPUT_RANGE | feature::DOMAIN_RANGE;
        if info.features & need != need || info.features & feature::BYPASS != 0 {
            return Err(format!("negotiated features {:#x}", info.features));
        }
        if info.granule() != granule {
            return Err(format!(
                "granule {:#x} (page sizes {:#x}), expected {granule:#x}",
                info.granule(),
                info.page_size_mask
            ));
        }
        Ok(())
    });
    r.check("virtio-iommu: an unattached endpoint's DMA is blocked and reported", || {
        unattached_blocked(&unit, &devs[1])
    });
    let ep0 = u32::from(devs[0].bdf.source_id());
    if granule != PAGE_SIZE {
        large_granule(r, &unit, &devs[0], ep0, granule);
        return;
    }
    let strict = match ViommuDomain::new(&unit, ep0, aperture(), InvalidationPolicy::Strict) {
        Ok(d) => d,
        Err(e) => {
            r.check("virtio-iommu: attach edu 0 to a strict domain", || Err(e2s(e)));
            return;
        }
    };
    r.check("virtio-iommu: PROBE reports the MSI window as a reserved region", || {
        let msi = strict
            .reserved()
            .iter()
            .any(|x| x.kind == ReservedKind::Msi && x.range.contains(Iova::new(MSI_WINDOW)));
        if msi { Ok(()) } else { Err(format!("reserved regions {:?}", strict.reserved())) }
    });
    r.check("virtio-iommu: a mapping in a reserved region is refused", || reserved_refused(&strict));
    r.check("virtio-iommu: DMA lands exactly where mapped, both directions", || {
        lands(&unit, &strict, &devs[0])
    });
    r.check("virtio-iommu: after a strict unmap the device faults and nothing lands", || {
        unmapped_faults(&unit, &strict, &devs[0])
    });
    r.check(
        "virtio-iommu: a busdma tag (IommuPerMap) over the domain loads, edu DMAs, unload blocks",
        || through_tag(&unit, &strict, &devs[0]),
    );
    r.check("virtio-iommu: misaligned buffers are refused before any request", || {
        let before = unit.stats().requests;
        let buf = Buf::new(1, PAGE_SIZE)?;
        // SAFETY: never sent (refused); `buf` outlives the call anyway.
        let got = unsafe {
            strict.map(
                &PLATFORM.pin_cpu(),
                busdma::PhysAddr::new(buf.pa.raw() + 512),
                PAGE_SIZE,
                Iova::new(EDU_LIMIT),
                Prot::READ,
            )
        };
        match got {
            Err(Error::Misaligned { .. }) if unit.stats().requests == before => Ok(()),
            other => Err(format!("got {other:?}, {} requests sent", unit.stats().requests - before)),
        }
    });
    let ep1 = u32::from(devs[1].bdf.source_id());
    let lent = Buf::new(1, PAGE_SIZE);
    r.check("virtio-iommu: a domain refuses to unmap another domain's mapping", || {
        let lent = lent.as_ref().map_err(Clone::clone)?;
        let other = ViommuDomain::new(&unit, ep1, aperture(), InvalidationPolicy::Strict).map_err(e2s)?;
        let g = PLATFORM.pin_cpu();
        // SAFETY: `lent` is freed only after `strict` is dropped (its DETACH removes the
        // domain and this mapping with it).
        let m =
            unsafe { strict.map(&g, lent.pa, PAGE_SIZE, Iova::new(EDU_LIMIT), Prot::READ) }.map_err(e2s)?;
        let before = unit.stats().unmaps;
        match other.unmap(&g, m) {
            Err(Error::InvalidArgument { .. }) if unit.stats().unmaps == before => Ok(()),
            got => Err(format!("got {got:?}, {} UNMAPs sent", unit.stats().unmaps - before)),
        }
    });
    drop(strict);
    drop(lent);
    r.check("virtio-iommu: a reserved window (IommuReserved) on a deferred domain is remapped only after its UNMAP", || {
        reserved_window_deferred(&unit, &devs[1], ep1)
    });
    r.check("virtio-iommu: requests per I/O, strict and deferred", || per_io(&unit, &devs[1], ep1));
    for policy in [Policy::Strict, Policy::Deferred] {
        let name = format!(
            "virtio-iommu: edu attached {policy:?} by busdma::device::ViommuDevice runs the driver VT-d and SMMUv3 run (device_check::edu_round_trip): lands, Busy while a tag lives, blocked after detach"
        );
        r.check(&name, || {
            let d = ViommuDevice::attach(&unit, ep1, policy, DeviceConfig::default()).map_err(e2s)?;
            crate::device_check::edu_round_trip(d, &devs[1], &|| {
                let _ = drain_faults(&unit);
            })
        });
    }
    r.check(
        "virtio-iommu: edu attached Untrusted by busdma::device::ViommuDevice reads a bounced sub-page buffer and zeros, never the rest of its page (device_check::untrusted_sub_page_on)",
        || {
            let d = ViommuDevice::attach(&unit, ep1, Policy::Untrusted, DeviceConfig::default()).map_err(e2s)?;
            crate::device_check::untrusted_sub_page_on(d, &devs[1], &|| {
                let _ = drain_faults(&unit);
            })
        },
    );
    r.check("virtio-iommu: an untrusted endpoint's DMA one page past its load faults (guard page)", || {
        untrusted_guard_page(&unit, &devs[1], ep1)
    });
    // virtio-drivers' blk, net and console behind the same unit (`virtio=on`).
    if let Some(found) = virtio {
        crate::viommu_virtio::run(r, &unit, found);
    }
    let st = unit.stats();
    println!(
        "measure - virtio-iommu totals: {} requests ({} MAP, {} UNMAP, {} refused), {} notifications, {} fault records",
        st.requests, st.maps, st.unmaps, st.errors, st.kicks, st.faults
    );
    // The runner's 4 KiB configuration boots with boot-bypass=on, so unattached endpoints are
    // refused only because the driver turned bypass off. (Whether a reset would turn it back
    // on cannot be shown here: QEMU restores boot-bypass at system reset only, not at a
    // virtio reset (verified: a driver that resets on drop passes this check). The driver
    // never resets on drop all the same; see `VirtioIommu`.)
    #[allow(clippy::drop_non_drop, reason = "the check is about what dropping the driver does")]
    drop(unit);
    r.check("virtio-iommu: a dropped driver leaves the device refusing unattached DMA (booted with boot-bypass=on)", || {
        let bus = 0x60_0000u64;
        let twin = Twin::of(Iova::new(bus))?;
        devs[1].dma(Dir::ToRam, bus, 0, XFER)?;
        twin.untouched()
    });
}

/// The page-size mask honoured, against a device whose smallest page is `granule` (QEMU
/// 10.0.2's `granule=64k`): a buffer aligned to 4 KiB but not to the granule, or a length that
/// is not a multiple of it, is refused before any request; a granule-sized mapping gets a
/// granule-aligned IOVA and the device's write lands at its offset inside it (and faults after
/// the unmap); the front end's 4 KiB strategies refuse the domain.
fn large_granule(r: &mut Runner, unit: &Unit, dev: &Edu, ep: u32, granule: u64) {
    let d = match ViommuDomain::new(unit, ep, aperture(), InvalidationPolicy::Strict) {
        Ok(d) => d,
        Err(e) => {
            r.check("virtio-iommu: attach edu 0 to a strict domain", || Err(e2s(e)));
            return;
        }
    };
    let pages = granule / PAGE_SIZE;
    r.check(
        "virtio-iommu: buffers not aligned to the device's granule are refused before any request",
        || {
            let buf = Buf::new(2 * pages, granule)?;
            let g = PLATFORM.pin_cpu();
            let before = unit.stats().requests;
            let limit = Iova::new(EDU_LIMIT);
            // SAFETY: refused before any request; `buf` outlives the calls anyway.
            let off = unsafe { d.map(&g, buf.at(PAGE_SIZE), granule, limit, Prot::WRITE) };
            // SAFETY: as above.
            let short = unsafe { d.map(&g, buf.pa, PAGE_SIZE, limit, Prot::WRITE) };
            match (off, short) {
                (Err(Error::Misaligned { align: a, .. }), Err(Error::Misaligned { align: b, .. }))
                    if a == granule && b == granule && unit.stats().requests == before =>
                {
                    Ok(())
                }
                (x, y) => {
                    Err(format!("got {x:?} and {y:?}, {} requests sent", unit.stats().requests - before))
                }
            }
        },
    );
    r.check("virtio-iommu: a granule mapping gets a granule-aligned IOVA; DMA lands inside it, faults after unmap", || {
        drain_faults(unit)?;
        load_pattern_granule(&d, dev, granule)?;
        let buf = Buf::new(pages, granule)?;
        buf.fill(SENTINEL)?;
        let g = PLATFORM.pin_cpu();
        // SAFETY: `buf` outlives the mapping (unmapped below, strict).
        let m = unsafe { d.map(&g, buf.pa, granule, Iova::new(EDU_LIMIT), Prot::WRITE) }.map_err(e2s)?;
        if !m.iova().is_aligned(granule) {
            return Err(format!("IOVA {} not aligned to the granule {granule:#x}", m.iova()));
        }
        let off = granule / 2;
        let bus = m.iova().raw() + off;
        dev.dma(Dir::ToRam, bus, 0, XFER)?;
        if !buf.holds_pattern(off)? {
            return Err(format!("the write to {bus:#x} did not land at offset {off:#x} of the buffer"));
        }
        d.unmap(&g, m).map_err(e2s)?;
        buf.fill(SENTINEL)?;
        dev.dma(Dir::ToRam, bus, 0, XFER)?;
        if !buf.all(SENTINEL)? {
            return Err(format!("after the unmap a DMA to {bus:#x} reached the buffer"));
        }
        expect_fault(unit, ep, bus, FaultReason::Mapping)
    });
    r.check("virtio-iommu: the front end's 4 KiB strategies refuse a larger granule", || {
        let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(PAGE_SIZE, 1) };
        let tag = Tag::new_root(&PLATFORM, IommuPerMap(&d), spec).map_err(e2s)?;
        let buf = Buf::new(1, PAGE_SIZE)?;
        let mut map = tag.create_map().map_err(e2s)?;
        match map.load(&kbuf(&buf, 0, XFER), Direction::FromDevice) {
            Err(Error::Unsupported { .. }) => Ok(()),
            Err(e) => Err(format!("refused with {e}, not as unsupported")),
            Ok(segs) => Err(format!("loaded at {:?}", segs.first())),
        }
    });
}

/// Loads `dev`'s buffer with the pattern through a read-only granule mapping of `d`.
fn load_pattern_granule(d: &Dom<'_>, dev: &Edu, granule: u64) -> CheckResult {
    let g = PLATFORM.pin_cpu();
    let src = Buf::new(granule / PAGE_SIZE, granule)?;
    PLATFORM.write_phys(src.pa, &pattern()).map_err(e2s)?;
    // SAFETY: `src` outlives the mapping (unmapped below, strict).
    let m = unsafe { d.map(&g, src.pa, granule, Iova::new(EDU_LIMIT), Prot::READ) }.map_err(e2s)?;
    dev.dma(Dir::FromRam, m.iova().raw(), 0, XFER)?;
    d.unmap(&g, m).map_err(e2s)
}

fn unattached_blocked(unit: &Unit, dev: &Edu) -> CheckResult {
    drain_faults(unit)?;
    let bus = 0x60_0000u64;
    let twin = Twin::of(Iova::new(bus))?;
    dev.dma(Dir::ToRam, bus, 0, XFER)?;
    twin.untouched()?;
    let Some(f) = unit.take_fault().map_err(e2s)? else {
        return Err("no fault record for an unattached endpoint's DMA".into());
    };
    if f.endpoint != u32::from(dev.bdf.source_id()) {
        return Err(format!("fault {f:?} does not name endpoint {:#x}", dev.bdf.source_id()));
    }
    drain_faults(unit)
}

fn reserved_refused(d: &Dom<'_>) -> CheckResult {
    let buf = Buf::new(1, PAGE_SIZE)?;
    // SAFETY: `buf` outlives the mapping if one is (wrongly) made: it is unmapped below.
    let got = unsafe { d.map_at(Iova::new(MSI_WINDOW), buf.pa, PAGE_SIZE, Prot::READ_WRITE) };
    match got {
        Err(Error::BadWindow { low, .. }) if low <= MSI_WINDOW => Ok(()),
        Ok(m) => {
            let g = PLATFORM.pin_cpu();
            d.unmap(&g, m).map_err(e2s)?;
            Err("a mapping at the MSI window was accepted".into())
        }
        Err(e) => Err(format!("refused with {e}, not as a reserved region")),
    }
}

/// Loads edu's buffer with the pattern from a read-only mapping, writes it back into a
/// write-only mapping of another buffer, and checks the data and the twins.
fn lands(unit: &Unit, d: &Dom<'_>, dev: &Edu) -> CheckResult {
    drain_faults(unit)?;
    let g = PLATFORM.pin_cpu();
    let src = Buf::new(1, PAGE_SIZE)?;
    let dst = Buf::new(1, PAGE_SIZE)?;
    PLATFORM.write_phys(src.pa, &pattern()).map_err(e2s)?;
    dst.fill(0)?;
    // SAFETY: both buffers outlive their mappings (unmapped below, strict).
    let ms = unsafe { d.map(&g, src.pa, PAGE_SIZE, Iova::new(EDU_LIMIT), Prot::READ) }.map_err(e2s)?;
    // SAFETY: as above.
    let md = unsafe { d.map(&g, dst.pa, PAGE_SIZE, Iova::new(EDU_LIMIT), Prot::WRITE) }.map_err(e2s)?;
    let (ts, td) = (Twin::of(ms.iova())?, Twin::of(md.iova())?);
    dev.dma(Dir::FromRam, ms.iova().raw(), 0, XFER)?;
    dev.dma(Dir::ToRam, md.iova().raw(), 0, XFER)?;
    let ok = dst.holds_pattern(0)?;
    d.unmap(&g, ms).map_err(e2s)?;
    d.unmap(&g, md).map_err(e2s)?;
    ts.untouched()?;
    td.untouched()?;
    if !ok {
        return Err("the data read from the source mapping did not reach the destination mapping".into());
    }
    if let Some(f) = unit.take_fault().map_err(e2s)? {
        return Err(format!("unexpected fault {f:?}"));
    }
    Ok(())
}

/// The front end over a virtio-iommu domain: a tag with edu's 28-bit mask whose strategy is
/// `IommuPerMap` over the domain. A transmit load inside one page, a receive load straddling two
/// (so one transfer crosses an IOVA page), the pattern through edu, then after the unloads the
/// old bus addresses fault.
fn through_tag(unit: &Unit, d: &Dom<'_>, dev: &Edu) -> CheckResult {
    drain_faults(unit)?;
    let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(2 * PAGE_SIZE, 2) };
    let tag = Tag::new_root(&PLATFORM, IommuPerMap(d), spec).map_err(e2s)?;
    let src = Buf::new(1, PAGE_SIZE)?;
    let dst = Buf::new(2, PAGE_SIZE)?;
    PLATFORM.write_phys(src.at(0x800), &pattern()).map_err(e2s)?;
    dst.fill(0)?;
    let maps_before = unit.stats().maps;
    let mut tx = tag.create_map().map_err(e2s)?;
    let mut rx = tag.create_map().map_err(e2s)?;
    let tx_segs: Vec<Segment> = tx.load(&kbuf(&src, 0x800, XFER), Direction::ToDevice).map_err(e2s)?.to_vec();
    let rx_segs: Vec<Segment> =
        rx.load(&kbuf(&dst, 0xc00, XFER), Direction::FromDevice).map_err(e2s)?.to_vec();
    let twins = segment_twins(tx_segs.iter().chain(&rx_segs))?;
    tx.sync(SyncOp::PREWRITE).map_err(e2s)?;
    dma_segments(dev, Dir::FromRam, &tx_segs)?;
    tx.sync(SyncOp::POSTWRITE).map_err(e2s)?;
    rx.sync(SyncOp::PREREAD).map_err(e2s)?;
    dma_segments(dev, Dir::ToRam, &rx_segs)?;
    rx.sync(SyncOp::POSTREAD).map_err(e2s)?;
    if let Some(f) = unit.take_fault().map_err(e2s)? {
        return Err(format!("unexpected fault {f:?}"));
    }
    if !dst.holds_pattern(0xc00)? {
        return Err("the data did not arrive in the receive buffer".into());
    }
    for t in &twins {
        t.untouched()?;
    }
    let maps = unit.stats().maps - maps_before;
    tx.unload().map_err(e2s)?;
    rx.unload().map_err(e2s)?;
    if maps != 2 {
        return Err(format!("{maps} MAP requests for two one-allocation loads, expected 2"));
    }
    dst.fill(SENTINEL)?;
    let old = rx_segs[0].addr.raw();
    dev.dma(Dir::ToRam, old, 0, XFER)?;
    if !dst.all(SENTINEL)? {
        return Err(format!("after the unload a DMA to {old:#x} reached the buffer"));
    }
    expect_fault(unit, u32::from(dev.bdf.source_id()), old, FaultReason::Mapping)
}

/// A map with a reserved IOVA window (`IommuReserved`) on a deferred domain: the unload queues
/// its UNMAP and keeps the window; the reload into the same window must first complete that
/// UNMAP (the strategy waits on the unload's ticket), so exactly one UNMAP goes out before the
/// new MAP, and the device's next write lands in the new buffer only.
fn reserved_window_deferred(unit: &Unit, dev: &Edu, ep: u32) -> CheckResult {
    let d = ViommuDomain::new(unit, ep, aperture(), DEFERRED).map_err(e2s)?;
    load_pattern(&d, dev)?;
    drain_faults(unit)?;
    let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(PAGE_SIZE, 1) };
    let tag = Tag::new_root(&PLATFORM, IommuReserved::new(&d), spec).map_err(e2s)?;
    let (a, b) = (Buf::new(1, PAGE_SIZE)?, Buf::new(1, PAGE_SIZE)?);
    let mut map = tag.create_map().map_err(e2s)?;
    let bus_a = map.load(&kbuf(&a, 0, XFER), Direction::FromDevice).map_err(e2s)?[0].addr.raw();
    dev.dma(Dir::ToRam, bus_a, 0, XFER)?;
    map.unload().map_err(e2s)?;
    a.fill(SENTINEL)?;
    b.fill(SENTINEL)?;
    let before = unit.stats();
    if d.pending() != 1 {
        return Err(format!("{} UNMAPs queued after a deferred unload, expected 1", d.pending()));
    }
    let bus_b = map.load(&kbuf(&b, 0, XFER), Direction::FromDevice).map_err(e2s)?[0].addr.raw();
    if bus_b != bus_a {
        return Err(format!("the reserved window moved: {bus_a:#x} then {bus_b:#x}"));
    }
    let after = unit.stats();
    if (after.unmaps - before.unmaps, after.maps - before.maps) != (1, 1) {
        return Err(format!(
            "the reload sent {} UNMAP and {} MAP, expected 1 and 1",
            after.unmaps - before.unmaps,
            after.maps - before.maps
        ));
    }
    dev.dma(Dir::ToRam, bus_b, 0, XFER)?;
    if let Some(f) = unit.take_fault().map_err(e2s)? {
        return Err(format!("unexpected fault {f:?}"));
    }
    if !b.holds_pattern(0)? || !a.all(SENTINEL)? {
        return Err("the DMA after the reload did not land in the new buffer only".into());
    }
    map.unload().map_err(e2s)?;
    drop(map);
    d.flush(&PLATFORM.pin_cpu()).map_err(e2s)
}

/// Loads `dev`'s buffer with the pattern through a read-only mapping of `d` (flushed after).
fn load_pattern(d: &Dom<'_>, dev: &Edu) -> CheckResult {
    let g = PLATFORM.pin_cpu();
    let src = Buf::new(1, PAGE_SIZE)?;
    PLATFORM.write_phys(src.pa, &pattern()).map_err(e2s)?;
    // SAFETY: `src` outlives the mapping and the flush below.
    let m = unsafe { d.map(&g, src.pa, PAGE_SIZE, Iova::new(EDU_LIMIT), Prot::READ) }.map_err(e2s)?;
    dev.dma(Dir::FromRam, m.iova().raw(), 0, XFER)?;
    d.unmap(&g, m).map_err(e2s)?;
    d.flush(&g).map_err(e2s)
}

fn unmapped_faults(unit: &Unit, d: &Dom<'_>, dev: &Edu) -> CheckResult {
    drain_faults(unit)?;
    let g = PLATFORM.pin_cpu();
    let dst = Buf::new(1, PAGE_SIZE)?;
    dst.fill(SENTINEL)?;
    // SAFETY: `dst` outlives the mapping (unmapped below, strict).
    let m = unsafe { d.map(&g, dst.pa, PAGE_SIZE, Iova::new(EDU_LIMIT), Prot::WRITE) }.map_err(e2s)?;
    let bus = m.iova().raw();
    let twin = Twin::of(m.iova())?;
    d.unmap(&g, m).map_err(e2s)?;
    dev.dma(Dir::ToRam, bus, 0, XFER)?;
    if !dst.all(SENTINEL)? {
        return Err(format!("a DMA to the unmapped IOVA {bus:#x} reached the buffer"));
    }
    twin.untouched()?;
    expect_fault(unit, u32::from(dev.bdf.source_id()), bus, FaultReason::Mapping)
}

/// An untrusted endpoint's domain keeps a never-mapped guard page after every load: three
/// one-page receive buffers are loaded through a tag of edu attached `Untrusted`, and edu's
/// write to the page after each load's IOVA faults (a record naming the endpoint and that
/// address) and lands in none of the buffers, nor in the twin page of its IOVA; the loads'
/// own pages are still reachable (the write at each load's start arrives); and the I/Os cost
/// what strict ones do (one MAP and one UNMAP each, each its own notification).
fn untrusted_guard_page(unit: &Unit, dev: &Edu, ep: u32) -> CheckResult {
    drain_faults(unit)?;
    let d = ViommuDevice::attach(unit, ep, Policy::Untrusted, DeviceConfig::default()).map_err(e2s)?;
    let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(PAGE_SIZE, 1) };
    let tag = d.tag(spec).map_err(e2s)?;
    let bufs = [Buf::new(1, PAGE_SIZE)?, Buf::new(1, PAGE_SIZE)?, Buf::new(1, PAGE_SIZE)?];
    let src = Buf::new(1, PAGE_SIZE)?;
    let r = (|| {
        // edu's own buffer gets the pattern, through the same tag.
        PLATFORM.write_phys(src.pa, &pattern()).map_err(e2s)?;
        let mut m = tag.create_map().map_err(e2s)?;
        let bus = m.load(&kbuf(&src, 0, PAGE_SIZE), Direction::ToDevice).map_err(e2s)?[0].addr.raw();
        m.sync(SyncOp::PREWRITE).map_err(e2s)?;
        dev.dma(Dir::FromRam, bus, 0, XFER)?;
        m.unload().map_err(e2s)?;
        let before = unit.stats();
        let mut maps = Vec::new();
        for b in &bufs {
            b.fill(SENTINEL)?;
            let mut m = tag.create_map().map_err(e2s)?;
            let bus = m.load(&kbuf(b, 0, PAGE_SIZE), Direction::FromDevice).map_err(e2s)?[0].addr.raw();
            m.sync(SyncOp::PREREAD).map_err(e2s)?;
            maps.push((m, bus));
        }
        // The page past a load at the top of edu's reach is beyond it: those are skipped
        // (the loads are allocated top-down, so at most one is).
        let mut probed = 0;
        for (_, bus) in &maps {
            let past = bus + PAGE_SIZE;
            if past + XFER > EDU_LIMIT {
                continue;
            }
            // Its twin, when the IOVA's number is scratch RAM.
            let twin = Twin::of(Iova::new(past)).ok();
            dev.dma(Dir::ToRam, past, 0, XFER)?;
            if let Some(i) = bufs.iter().position(|b| !b.all(SENTINEL).unwrap_or(false)) {
                return Err(format!("edu's write one page past the load at {bus:#x} reached buffer {i}"));
            }
            if let Some(t) = twin {
                t.untouched()?;
            }
            expect_fault(unit, ep, past, FaultReason::Mapping)?;
            probed += 1;
        }
        if probed < 2 {
            return Err(format!("only {probed} of 3 loads have a page past them within edu's reach"));
        }
        for (i, (m, bus)) in maps.iter_mut().enumerate() {
            dev.dma(Dir::ToRam, *bus, 0, XFER)?;
            m.sync(SyncOp::POSTREAD).map_err(e2s)?;
            if !bufs[i].holds_pattern(0)? {
                return Err(format!("edu's write at the load's own bus address {bus:#x} did not arrive"));
            }
            m.unload().map_err(e2s)?;
        }
        // Strict whatever was asked: one MAP and one UNMAP per I/O, each its own notification.
        let after = unit.stats();
        let (reqs, kicks) = (after.requests - before.requests, after.kicks - before.kicks);
        println!(
            "measure - virtio-iommu untrusted: {reqs} requests ({} MAP, {} UNMAP), {kicks} notifications for 3 page-sized I/Os",
            after.maps - before.maps,
            after.unmaps - before.unmaps
        );
        if (reqs, kicks) != (6, 6) {
            return Err(format!("{reqs} requests and {kicks} notifications for 3 I/Os, expected 6 and 6"));
        }
        Ok(())
    })();
    drop(tag);
    d.detach().map_err(|e| format!("detach: {e:?}"))?;
    drain_faults(unit)?;
    r
}

/// `IOS` I/Os (map, DMA to RAM, unmap) per strategy; prints the requests and notifications
/// per I/O and checks them against what each strategy must send: strict 2 requests and 2
/// notifications per I/O (MAP, UNMAP); deferred 2 requests and 1 + 1/4 notifications (the
/// UNMAPs go out in batches of 4, one notification each), and after the last flush an old
/// IOVA faults.
fn per_io(unit: &Unit, dev: &Edu, ep: u32) -> CheckResult {
    let mut out = String::new();
    for (name, policy, want_kicks_x4) in
        [("strict", InvalidationPolicy::Strict, 8), ("deferred", DEFERRED, 5)]
    {
        let d = ViommuDomain::new(unit, ep, aperture(), policy).map_err(e2s)?;
        let g = PLATFORM.pin_cpu();
        let dst = Buf::new(1, PAGE_SIZE)?;
        load_pattern(&d, dev)?;
        drain_faults(unit)?;
        let before = unit.stats();
        let mut last = 0;
        for _ in 0..IOS {
            dst.fill(0)?;
            // SAFETY: `dst` outlives the mapping and the flush below.
            let m =
                unsafe { d.map(&g, dst.pa, PAGE_SIZE, Iova::new(EDU_LIMIT), Prot::WRITE) }.map_err(e2s)?;
            last = m.iova().raw();
            dev.dma(Dir::ToRam, last, 0, XFER)?;
            d.unmap(&g, m).map_err(e2s)?;
        }
        d.flush(&g).map_err(e2s)?;
        let s = unit.stats();
        let (reqs, kicks) = (s.requests - before.requests, s.kicks - before.kicks);
        out += &format!(
            "{name}: {:.2} requests, {:.2} notifications per I/O; ",
            reqs as f64 / IOS as f64,
            kicks as f64 / IOS as f64
        );
        println!(
            "virtio-iommu {name}: {reqs} requests ({} MAP, {} UNMAP), {kicks} notifications for {IOS} I/Os",
            s.maps - before.maps,
            s.unmaps - before.unmaps
        );
        if reqs != 2 * IOS || kicks != want_kicks_x4 * IOS / 4 {
            return Err(format!("{name}: {reqs} requests and {kicks} notifications for {IOS} I/Os"));
        }
        if !dst.holds_pattern(0)? {
            return Err(format!("{name}: the last I/O's data did not land"));
        }
        if let Some(f) = unit.take_fault().map_err(e2s)? {
            return Err(format!("{name}: unexpected fault {f:?}"));
        }
        dst.fill(SENTINEL)?;
        dev.dma(Dir::ToRam, last, 0, XFER)?;
        if !dst.all(SENTINEL)? {
            return Err(format!("{name}: after the flush a DMA to the old IOVA {last:#x} landed"));
        }
        expect_fault(unit, ep, last, FaultReason::Mapping)?;
    }
    println!("measure - virtio-iommu requests per I/O (map, edu DMA, unmap): {}", out.trim_end_matches("; "));
    Ok(())
}
