//! The checks: each prints `ok - NAME` or `FAIL - NAME: why`.
//!
//! Memory plan (see `frames`): every buffer and table page lies at or above 2^28, beyond what
//! edu can emit, so data that reaches a buffer was translated; the page at the same numeric
//! address as an IOVA (its *twin*, below 2^28) is free scratch RAM that the checks fill with a
//! sentinel and verify afterwards.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use busdma::front::{Direction, IommuPerMap, IommuReserved, KernelBuf, Segment, SyncOp, Tag, TagSpec};
use busdma::iommu::InvalidationPolicy;
use busdma::pgtable::{Prot, TablePool};
use busdma::vtd::{Access, InvalidationChoice, InvalidationMethod, SourceId, Vtd, VtdConfig, fault};
use busdma::{AddrRange, Iova, KernVa, PAGE_SIZE, PageRequest, PhysAddr, Platform};

use crate::domain::{DevDomain, EDU_LIMIT, Unit};
use crate::edu::{self, Dir, Edu};
use crate::frames;
use crate::pci::{self, Bdf};
use crate::platform::{self, KernelPlatform, PLATFORM};
use crate::println;
use crate::start_info::BootInfo;

pub(crate) type CheckResult = Result<(), String>;

/// `count / n` with two decimals ("0.93"), for the per-request figures the checks print.
pub(crate) fn per_n(count: u64, n: u64) -> String {
    let hundredths = count * 100 / n.max(1);
    format!("{}.{:02}", hundredths / 100, hundredths % 100)
}

/// Where q35 puts its VT-d remapping unit (QEMU's DMAR table says so too).
const VTD_BASE: u64 = 0xfed9_0000;
/// Bytes per edu transfer: half a page, well inside QEMU 7.2's safe range (see `edu`).
pub(crate) const XFER: u64 = 2048;
/// Sentinel written to twin pages and to buffers that must not change.
pub(crate) const SENTINEL: u8 = 0x5a;

pub(crate) struct Runner {
    pub(crate) failed: usize,
}

impl Runner {
    /// Runs one check and prints its line; true if it passed.
    pub(crate) fn check(&mut self, name: &str, f: impl FnOnce() -> CheckResult) -> bool {
        match f() {
            Ok(()) => {
                println!("ok - {name}");
                true
            }
            Err(why) => {
                self.failed += 1;
                println!("FAIL - {name}: {why}");
                false
            }
        }
    }
}

pub(crate) fn e2s(e: busdma::Error) -> String {
    format!("{e}")
}

/// The pattern the edu buffer is loaded with before transfers to RAM.
pub(crate) fn pattern() -> Vec<u8> {
    (0..XFER as u32).map(|i| (i.wrapping_mul(7) + 3) as u8).collect()
}

/// A run of zeroed frames at or above 2^28.
pub(crate) struct Buf {
    pub(crate) pa: PhysAddr,
    pages: u64,
}

impl Buf {
    pub(crate) fn new(pages: u64, align: u64) -> Result<Self, String> {
        let req = PageRequest { align, ..PageRequest::pages(pages) };
        let pa = PLATFORM.alloc_pages(&req).map_err(e2s)?;
        Ok(Self { pa, pages })
    }

    pub(crate) fn at(&self, off: u64) -> PhysAddr {
        PhysAddr::new(self.pa.raw() + off)
    }

    pub(crate) fn fill(&self, byte: u8) -> CheckResult {
        PLATFORM.fill_phys(self.pa, self.pages * PAGE_SIZE, byte).map_err(e2s)
    }

    fn read(&self, off: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut v = vec![0u8; len as usize];
        PLATFORM.read_phys(self.at(off), &mut v).map_err(e2s)?;
        Ok(v)
    }

    /// Whether `[off, off + XFER)` holds the edu pattern.
    pub(crate) fn holds_pattern(&self, off: u64) -> Result<bool, String> {
        Ok(self.read(off, XFER)? == pattern())
    }

    /// Whether every byte is `byte`.
    pub(crate) fn all(&self, byte: u8) -> Result<bool, String> {
        Ok(self.read(0, self.pages * PAGE_SIZE)?.iter().all(|&b| b == byte))
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: an allocation of ours, freed once; every mapping of it is gone or belongs to
        // a domain whose device no longer DMAs (checks unmap before dropping).
        unsafe { PLATFORM.free_pages(self.pa, self.pages) };
    }
}

/// The twin page of an IOVA: the scratch page at the same numeric address.
pub(crate) struct Twin(u64);

impl Twin {
    pub(crate) fn of(iova: Iova) -> Result<Self, String> {
        let page = iova.raw() & !(PAGE_SIZE - 1);
        if page < frames::SCRATCH_BASE
            || page + PAGE_SIZE > frames::ARENA_BASE
            || !platform::is_ram(page, PAGE_SIZE)
        {
            return Err(format!("twin page {page:#x} of IOVA {iova} is not scratch RAM"));
        }
        PLATFORM.fill_phys(PhysAddr::new(page), PAGE_SIZE, SENTINEL).map_err(e2s)?;
        Ok(Twin(page))
    }

    pub(crate) fn untouched(&self) -> CheckResult {
        let mut v = vec![0u8; PAGE_SIZE as usize];
        PLATFORM.read_phys(PhysAddr::new(self.0), &mut v).map_err(e2s)?;
        if v.iter().any(|&b| b != SENTINEL) {
            return Err(format!("the page at PA {:#x} (the IOVA's own number) was written", self.0));
        }
        Ok(())
    }
}

/// Takes the one fault the last DMA should have caused and checks that it names `sid`, the
/// page of `bus`, the direction and (when given) the reason; and that no other is pending.
fn expect_fault(
    vtd: &Vtd<'_, KernelPlatform>,
    sid: SourceId,
    bus: u64,
    access: Access,
    reason: Option<u8>,
) -> CheckResult {
    let Some(f) = vtd.take_fault() else {
        return Err(format!("no fault recorded for the {access:?} at {bus:#x}"));
    };
    let page = bus & !(PAGE_SIZE - 1);
    if f.source != sid || f.addr.raw() != page || f.access != access || reason.is_some_and(|r| r != f.reason)
    {
        return Err(format!(
            "fault {f:?} does not name source {:#06x}, page {page:#x}, {access:?}, reason {reason:?}",
            sid.0
        ));
    }
    if let Some(extra) = vtd.take_fault() {
        return Err(format!("unexpected second fault {extra:?}"));
    }
    Ok(())
}

/// IOTLB invalidations issued so far, not counting those that follow a map in caching mode:
/// the ones that can make an unmapped IOVA unreachable.
fn unmap_invalidations(vtd: &Vtd<'_, KernelPlatform>) -> u64 {
    vtd.stats().iotlb_total() - vtd.stats().after_map.load(core::sync::atomic::Ordering::Relaxed)
}

fn expect_no_fault(vtd: &Vtd<'_, KernelPlatform>) -> CheckResult {
    match vtd.take_fault() {
        None => Ok(()),
        Some(f) => Err(format!("unexpected fault {f:?}")),
    }
}

/// Checks that `got` is an error `ok` accepts.
fn refused(what: &str, got: busdma::Result<()>, ok: impl Fn(&busdma::Error) -> bool) -> CheckResult {
    match got {
        Err(e) if ok(&e) => Ok(()),
        other => Err(format!("{what}: got {other:?}")),
    }
}

fn reason_of(access: Access) -> Option<u8> {
    Some(match access {
        Access::Read => fault::REASON_READ,
        Access::Write => fault::REASON_WRITE,
    })
}

/// Runs every check; returns how many failed.
pub fn run(info: &BootInfo) -> usize {
    let mut r = Runner { failed: 0 };
    println!("busdma-qemu: cmdline '{}'", info.cmdline);
    let mut edus: Vec<Bdf> = Vec::new();
    let mut virtio = crate::virtio_check::Found::default();
    let mut e1000 = None;
    let mut nvme = None;
    pci::scan_bus0(|bdf, v, d| {
        println!("pci {bdf} {v:04x}:{d:04x}");
        virtio.add(bdf, v, d);
        if crate::e1000_check::is_e1000(v, d) {
            e1000 = Some(bdf);
        }
        if (v, d) == (crate::nvme_check::VENDOR, crate::nvme_check::DEVICE) {
            nvme = Some(bdf);
        }
        if (v, d) == (edu::VENDOR, edu::DEVICE) {
            edus.push(bdf);
        }
    });
    r.check("boot memory layout leaves the arena and scratch zone to the checks", || {
        // SAFETY: a linker-script symbol; only its address is taken, never its value.
        unsafe extern "C" {
            static __kernel_end: u8;
        }
        let end = core::ptr::addr_of!(__kernel_end) as u64;
        if end > frames::SCRATCH_BASE {
            return Err(format!("kernel ends at {end:#x}, inside the scratch zone"));
        }
        if !platform::is_ram(frames::ARENA_BASE, frames::ARENA_END - frames::ARENA_BASE) {
            return Err("the frame arena is not RAM (run with -m 512M)".into());
        }
        Ok(())
    });
    let devs: Vec<Edu> = edus.iter().filter_map(|&b| Edu::new(b).ok()).collect();
    r.check("two edu devices are present and respond", || {
        if devs.len() == 2 { Ok(()) } else { Err(format!("found {} usable edu devices", devs.len())) }
    });
    if devs.len() < 2 {
        return r.failed;
    }
    if info.param("iommu") == Some("virtio") {
        let granule = match info.param("granule") {
            None | Some("4k") => PAGE_SIZE,
            Some("64k") => 64 << 10,
            Some(other) => {
                println!("FAIL - kernel command line: unknown granule={other}");
                return r.failed + 1;
            }
        };
        let virtio = (info.param("virtio") == Some("on")).then_some(&virtio);
        crate::viommu::run(&mut r, &devs, granule, virtio);
        return r.failed;
    }
    r.check("edu DMA round trip untranslated (IOMMU off)", || untranslated_round_trip(&devs[0]));

    let choice = match info.param("inval") {
        None | Some("auto") => InvalidationChoice::Auto,
        Some("register") => InvalidationChoice::Register,
        Some("queued") => InvalidationChoice::Queued,
        Some(other) => {
            println!("FAIL - kernel command line: unknown inval={other}");
            return r.failed + 1;
        }
    };
    let frames_before = frames::in_use();
    let config = VtdConfig { invalidation: choice, ..VtdConfig::default() };
    // SAFETY: q35's only remapping unit sits at VTD_BASE and nothing else drives it.
    let vtd = match unsafe { Vtd::new(&PLATFORM, PhysAddr::new(VTD_BASE), config) } {
        Ok(v) => Box::new(v),
        Err(e) => {
            println!("FAIL - vtd: bring-up: {e}");
            return r.failed + 1;
        }
    };
    let caps = vtd.caps();
    println!(
        "vtd: version {:#x} cap {:#018x} ecap {:#018x}: {}-level tables, {:?} invalidation, psi {} mamv {} \
         coherent {} rwbf {} fault records {}",
        vtd.version(),
        caps.cap,
        caps.ecap,
        vtd.levels().count(),
        vtd.method(),
        caps.psi(),
        caps.mamv(),
        caps.coherent(),
        caps.rwbf(),
        caps.fault_records()
    );
    r.check("vtd: the invalidation method asked for is the one in use", || {
        let want = match choice {
            InvalidationChoice::Register => InvalidationMethod::Register,
            _ => InvalidationMethod::Queued,
        };
        let qies = vtd.gsts() & busdma::vtd::regs::gcmd::QIE != 0;
        if vtd.method() != want || qies != (want == InvalidationMethod::Queued) {
            return Err(format!("method {:?}, GSTS.QIES {qies}, wanted {want:?}", vtd.method()));
        }
        Ok(())
    });
    r.check("vtd: the table depth follows the address width", || {
        let want = info.param("levels").unwrap_or("?");
        let got = vtd.levels().count();
        if want.parse::<u32>() != Ok(got) {
            return Err(format!("driver chose {got} levels, the runner expected {want}"));
        }
        Ok(())
    });
    r.check("vtd: caching mode (CAP.CM) is as the runner configured the unit", || {
        let want = info.param("cm") == Some("on");
        if vtd.caps().caching_mode() != want {
            return Err(format!("CAP.CM = {}, the runner asked for {want}", vtd.caps().caching_mode()));
        }
        Ok(())
    });
    r.check("vtd: translation enables", || vtd.enable_translation().map_err(e2s));
    r.check("vtd: DMA from an unattached device is blocked and recorded", || {
        unattached_is_blocked(&vtd, &devs[0])
    });

    translated_checks(&mut r, &vtd, &devs);
    r.check(
        "device: edu attached by busdma::device (one call) round-trips a DMA and is blocked after detach",
        || crate::device_check::device_round_trip(&vtd, &devs[0]),
    );
    r.check(
        "device: a kernel-heap buffer (whole heap pages) is an owned DMA buffer: edu round-trips it with no unsafe",
        || crate::device_check::heap_buffer_round_trip(&vtd, &devs[0]),
    );

    r.check(
        "device: an untrusted device's sub-page buffer is bounced: edu reads the rest of its page and finds none of its secret",
        || crate::device_check::untrusted_sub_page(&vtd, &devs[0]),
    );

    // Drivers written elsewhere (virtio-drivers), when the runner gave this configuration
    // virtio devices (kernel command line virtio=on).
    if info.param("virtio") == Some("on") {
        crate::virtio_check::run(&vtd, &virtio, |name, f| r.check(name, f));
        // eth-intel's e1000 (dma-api), with the first virtio-net NIC as its peer.
        crate::e1000_check::run(&vtd, e1000, virtio.net.first().copied(), |name, f| r.check(name, f));
        // nvme-driver's NVMe controller (dma-api), polled.
        crate::nvme_check::run(&vtd, nvme, |name, f| r.check(name, f));
    } else if virtio.any() {
        r.check("virtio devices only where the runner asked for them", || Err("virtio=on missing".into()));
    }

    r.check(
        "vtd: a dropped unit keeps blocking (translation stays on, edu's DMA finds no context) and frees every page but its root table",
        || {
            drop(vtd);
            // SAFETY: the driver is gone; reading the unit's status register has no side effect.
            let status = unsafe { PLATFORM.mmio_read32(PhysAddr::new(VTD_BASE + busdma::vtd::regs::GSTS)) };
            if status & busdma::vtd::regs::gcmd::TE == 0 {
                return Err("translation turned off: every device reaches all of memory".into());
            }
            // Counted before the DMA below, whose scratch-page writes use frames of their own.
            if frames::in_use() != frames_before + 1 {
                return Err(format!(
                    "{} frames in use, {frames_before} before bring-up (+1 expected: the root table the unit still reads)",
                    frames::in_use()
                ));
            }
            // A scratch page an untranslated DMA would reach: it must stay as it is.
            let target = 0x0120_0000u64;
            PLATFORM.fill_phys(PhysAddr::new(target), PAGE_SIZE, SENTINEL).map_err(e2s)?;
            devs[0].dma(Dir::ToRam, target, 0, XFER)?;
            let mut got = vec![0u8; PAGE_SIZE as usize];
            PLATFORM.read_phys(PhysAddr::new(target), &mut got).map_err(e2s)?;
            if got.iter().any(|&b| b != SENTINEL) {
                return Err("a DMA after the drop reached memory".into());
            }
            Ok(())
        },
    );
    r.check(
        "vtd: translation turned off (unsafe) before the drop: every page freed, the root table too",
        || {
            let frames_now = frames::in_use();
            // SAFETY: q35's only remapping unit, and the previous driver value is gone.
            let unit = unsafe { Vtd::new(&PLATFORM, PhysAddr::new(VTD_BASE), config) }.map_err(e2s)?;
            // SAFETY: no device is given work until the end of this kernel: nothing DMAs while the
            // unit is off.
            unsafe { unit.disable_translation() }.map_err(e2s)?;
            drop(unit);
            if frames::in_use() != frames_now {
                return Err(format!("{} frames in use, {frames_now} before", frames::in_use()));
            }
            Ok(())
        },
    );
    r.failed
}

fn untranslated_round_trip(dev: &Edu) -> CheckResult {
    // Two scratch pages below 2^28, where an untranslated edu can reach.
    let src = 0x0100_0000u64;
    let dst = src + PAGE_SIZE;
    PLATFORM.write_phys(PhysAddr::new(src), &pattern()).map_err(e2s)?;
    PLATFORM.fill_phys(PhysAddr::new(dst), PAGE_SIZE, 0).map_err(e2s)?;
    dev.dma(Dir::FromRam, src, 0, XFER)?;
    dev.dma(Dir::ToRam, dst, 0, XFER)?;
    let mut got = vec![0u8; XFER as usize];
    PLATFORM.read_phys(PhysAddr::new(dst), &mut got).map_err(e2s)?;
    if got != pattern() {
        return Err("data did not arrive".into());
    }
    Ok(())
}

fn unattached_is_blocked(vtd: &Vtd<'_, KernelPlatform>, dev: &Edu) -> CheckResult {
    // A scratch page an untranslated DMA would reach: it must stay as it is.
    let target = 0x0120_0000u64;
    PLATFORM.fill_phys(PhysAddr::new(target), PAGE_SIZE, SENTINEL).map_err(e2s)?;
    dev.dma(Dir::ToRam, target, 0, XFER)?;
    // Reason: no context entry (not 5/6), so only source, page and direction are checked.
    expect_fault(vtd, SourceId(dev.bdf.source_id()), target, Access::Write, None)?;
    let mut got = vec![0u8; PAGE_SIZE as usize];
    PLATFORM.read_phys(PhysAddr::new(target), &mut got).map_err(e2s)?;
    if got.iter().any(|&b| b != SENTINEL) {
        return Err("the blocked DMA changed memory".into());
    }
    Ok(())
}

/// Loads the edu buffer of `d`'s device with the pattern, through a fresh read-only mapping
/// of a pattern page.
fn load_pattern(d: &DevDomain<'_>, src: &Buf) -> CheckResult {
    PLATFORM.write_phys(src.pa, &pattern()).map_err(e2s)?;
    let r = d.map(src.pa, 1, Prot::READ).map_err(e2s)?;
    d.dev.dma(Dir::FromRam, r.start().raw(), 0, XFER)?;
    d.unmap_one(r).map_err(e2s)?;
    d.flush().map_err(e2s)?;
    Ok(())
}

fn below_mask(r: AddrRange<Iova>) -> CheckResult {
    if r.end().raw() > EDU_LIMIT {
        return Err(format!("IOVA range {r:?} beyond edu's 28-bit mask"));
    }
    Ok(())
}

/// The deferred policy of the deferred-mode check: flush after 8 queued unmaps (small, so the
/// check sees several flushes and reuses), and never by age (an hour: the check controls
/// time).
const DEFERRED: InvalidationPolicy =
    InvalidationPolicy::Deferred { max_entries: 8, max_age_ns: 3_600_000_000_000 };

fn translated_checks(r: &mut Runner, vtd: &Unit, devs: &[Edu]) {
    let pool = TablePool::new(&PLATFORM);
    let mut doms: Vec<DevDomain<'_>> = Vec::new();
    r.check(
        "vtd: each edu device gets its own domain, table and IOVA space (device 0 strict, device 1 deferred)",
        || {
            for (dev, policy) in devs.iter().zip([InvalidationPolicy::Strict, DEFERRED]) {
                doms.push(DevDomain::attach(vtd, &pool, dev, policy).map_err(e2s)?);
            }
            if doms[0].did == doms[1].did {
                return Err("both devices got the same domain id".into());
            }
            for d in &doms {
                let ctx = vtd.context_of(d.sid()).ok_or("no context entry")?;
                if ctx.0 != d.dom.table().root() || ctx.2 != d.did || ctx.1 != vtd.levels().aw() {
                    return Err(format!("context entry {ctx:?} for domain {:?}", d.did));
                }
            }
            Ok(())
        },
    );
    if doms.len() != 2 {
        return;
    }
    bad_inputs(r, vtd, &doms[0]);
    let Ok(scratch) = Buf::new(1, PAGE_SIZE) else {
        println!("FAIL - allocating a scratch buffer");
        r.failed += 1;
        return;
    };
    let (d0, d1) = (&doms[0], &doms[1]);

    r.check(
        "loaded maps: data DMA'd through a 28-bit tag's maps arrives, bus addresses stay below 2^28, the pages at their own numbers are untouched",
        || through_maps(vtd, d0),
    );

    r.check(
        "a page mapped right after a blocked DMA to its IOVA is reachable (caching mode: the map invalidates the not-present entry the unit may have cached)",
        || fresh_map_after_fault(vtd, d0, &scratch),
    );

    r.check(
        "strict: an invalidation the unit rejects is an error; the IOVA and tables are held back until a whole-domain invalidation succeeds; the queue keeps working",
        || strict_invalidation_failure(vtd, d0, &scratch),
    );

    r.check(
        "deferred: a flush the unit rejects is an error and releases nothing; the next flush releases it all",
        || deferred_flush_failure(vtd, d1, &scratch),
    );

    for access in [Access::Write, Access::Read] {
        r.check(
            &format!(
                "a {access:?} DMA to an unmapped IOVA is blocked; the fault names source, page and direction"
            ),
            || {
                let ir = d0.alloc(1, PAGE_SIZE).map_err(e2s)?;
                below_mask(ir)?;
                let twin = Twin::of(ir.start())?;
                let dir = if access == Access::Write { Dir::ToRam } else { Dir::FromRam };
                d0.dev.dma(dir, ir.start().raw() + 0x100, 0, XFER)?;
                expect_fault(vtd, d0.sid(), ir.start().raw(), access, reason_of(access))?;
                twin.untouched()?;
                d0.free_unmapped(ir).map_err(e2s)
            },
        );
    }

    r.check("a read-only mapping refuses device writes (fault: write)", || {
        load_pattern(d0, &scratch)?;
        let buf = Buf::new(1, PAGE_SIZE)?;
        buf.fill(SENTINEL)?;
        let m = d0.map(buf.pa, 1, Prot::READ).map_err(e2s)?;
        d0.dev.dma(Dir::ToRam, m.start().raw(), 0, XFER)?;
        expect_fault(vtd, d0.sid(), m.start().raw(), Access::Write, reason_of(Access::Write))?;
        if !buf.all(SENTINEL)? {
            return Err("the write reached the read-only buffer".into());
        }
        d0.unmap_one(m).map_err(e2s).map(|_| ())
    });

    r.check("a write-only mapping refuses device reads (fault: read)", || {
        let buf = Buf::new(1, PAGE_SIZE)?;
        PLATFORM.write_phys(buf.pa, &pattern()).map_err(e2s)?;
        let m = d0.map(buf.pa, 1, Prot::WRITE).map_err(e2s)?;
        d0.dev.dma(Dir::FromRam, m.start().raw(), 0, XFER)?;
        expect_fault(vtd, d0.sid(), m.start().raw(), Access::Read, reason_of(Access::Read))?;
        d0.unmap_one(m).map_err(e2s).map(|_| ())
    });

    r.check(
        "strict unload: one ranged invalidation, after which a DMA to the old bus address faults",
        || {
            load_pattern(d0, &scratch)?;
            let tag = edu_tag(d0)?;
            let buf = Buf::new(1, PAGE_SIZE)?;
            let mut map = tag.create_map().map_err(e2s)?;
            let bus = map.load(&kbuf(&buf, 0, XFER), Direction::FromDevice).map_err(e2s)?[0].addr.raw();
            let twin = Twin::of(Iova::new(bus))?;
            // The DMA caches the translation in the IOTLB.
            map.sync(SyncOp::PREREAD).map_err(e2s)?;
            d0.dev.dma(Dir::ToRam, bus, 0, XFER)?;
            map.sync(SyncOp::POSTREAD).map_err(e2s)?;
            expect_no_fault(vtd)?;
            if !buf.holds_pattern(0)? {
                return Err("the first DMA did not arrive".into());
            }
            buf.fill(SENTINEL)?;
            let before = unmap_invalidations(vtd);
            map.unload().map_err(e2s)?;
            let n = unmap_invalidations(vtd) - before;
            if n != 1 {
                return Err(format!("expected one IOTLB invalidation, saw {n}"));
            }
            d0.dev.dma(Dir::ToRam, bus, 0, XFER)?;
            expect_fault(vtd, d0.sid(), bus, Access::Write, reason_of(Access::Write))?;
            if !buf.all(SENTINEL)? {
                return Err("a DMA after the strict unload reached the buffer".into());
            }
            twin.untouched()
        },
    );

    r.check(
        "page-selective invalidation covers a range straddling an alignment boundary (address mask)",
        || {
            load_pattern(d0, &scratch)?;
            // Three pages whose page numbers end in ...0111, ...1000, ...1001: the smallest
            // aligned block covering them is 16 pages (AM = 4).
            let win = d0.alloc(16, 16 * PAGE_SIZE).map_err(e2s)?;
            let iova = Iova::new(win.start().raw() + 7 * PAGE_SIZE);
            let mapped = AddrRange::from_start_len(iova, 3 * PAGE_SIZE).map_err(e2s)?;
            let buf = Buf::new(3, PAGE_SIZE)?;
            d0.map_at(iova, buf.pa, 3, Prot::WRITE).map_err(e2s)?;
            for i in 0..3 {
                d0.dev.dma(Dir::ToRam, iova.raw() + i * PAGE_SIZE, 0, XFER)?;
            }
            expect_no_fault(vtd)?;
            buf.fill(SENTINEL)?;
            let psi_before = vtd.stats().iotlb_page.load(core::sync::atomic::Ordering::Relaxed);
            d0.unmap(&[mapped], &[win]).map_err(e2s)?;
            let psi = vtd.stats().iotlb_page.load(core::sync::atomic::Ordering::Relaxed) - psi_before;
            if vtd.caps().psi() && psi != 1 {
                return Err(format!("{psi} page-selective invalidations, expected 1"));
            }
            for i in 0..3 {
                let a = iova.raw() + i * PAGE_SIZE;
                d0.dev.dma(Dir::ToRam, a, 0, XFER)?;
                expect_fault(vtd, d0.sid(), a, Access::Write, reason_of(Access::Write))?;
            }
            if !buf.all(SENTINEL)? {
                return Err("a page of the range stayed reachable after its invalidation".into());
            }
            Ok(())
        },
    );

    r.check("deferred unload: the old IOVA stays usable until the flush, faults after it, and is never reused before it", || {
        deferred(vtd, d1, &scratch)
    });

    r.check(
        "reserved window under deferred invalidation: a reload into the kept window first completes the old unload's flush",
        || {
            load_pattern(d1, &scratch)?;
            let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(PAGE_SIZE, 1) };
            let tag = Tag::new_root(&PLATFORM, IommuReserved::new(d1), spec).map_err(e2s)?;
            let (a, b) = (Buf::new(1, PAGE_SIZE)?, Buf::new(1, PAGE_SIZE)?);
            let mut map = tag.create_map().map_err(e2s)?;
            let bus_a = map.load(&kbuf(&a, 0, XFER), Direction::FromDevice).map_err(e2s)?[0].addr.raw();
            d1.dev.dma(Dir::ToRam, bus_a, 0, XFER)?;
            expect_no_fault(vtd)?;
            map.unload().map_err(e2s)?;
            a.fill(SENTINEL)?;
            b.fill(SENTINEL)?;
            let before = unmap_invalidations(vtd);
            let bus_b = map.load(&kbuf(&b, 0, XFER), Direction::FromDevice).map_err(e2s)?[0].addr.raw();
            if bus_b != bus_a {
                return Err(format!("the reserved window moved: {bus_a:#x} then {bus_b:#x}"));
            }
            if unmap_invalidations(vtd) == before {
                return Err("the reload reused the window without an invalidation".into());
            }
            // A stale IOTLB entry would still send this to buffer A.
            d1.dev.dma(Dir::ToRam, bus_b, 0, XFER)?;
            expect_no_fault(vtd)?;
            if !b.holds_pattern(0)? || !a.all(SENTINEL)? {
                return Err("the DMA after the reload did not land in the new buffer only".into());
            }
            map.unload().map_err(e2s)?;
            drop(map);
            d1.flush().map_err(e2s)?;
            Ok(())
        },
    );

    r.check("two devices in two domains cannot reach each other's mappings", || {
        load_pattern(d0, &scratch)?;
        load_pattern(d1, &scratch)?;
        let x = Buf::new(1, PAGE_SIZE)?;
        let y = Buf::new(1, PAGE_SIZE)?;
        x.fill(SENTINEL)?;
        y.fill(SENTINEL)?;
        // The same IOVA number in both domains (reserved in domain 1's allocator, so it never
        // hands it out), mapping different buffers.
        let m = d0.map(x.pa, 1, Prot::WRITE).map_err(e2s)?;
        let iova = m.start();
        // Device 1 at an IOVA mapped only in domain 0: blocked, its own source id recorded.
        d1.dev.dma(Dir::ToRam, iova.raw(), 0, XFER)?;
        expect_fault(vtd, d1.sid(), iova.raw(), Access::Write, reason_of(Access::Write))?;
        if !x.all(SENTINEL)? {
            return Err("device 1 reached domain 0's buffer".into());
        }
        d1.dom.iova().reserve(m).map_err(e2s)?;
        d1.map_at(iova, y.pa, 1, Prot::WRITE).map_err(e2s)?;
        d1.dev.dma(Dir::ToRam, iova.raw(), 0, XFER)?;
        expect_no_fault(vtd)?;
        if !y.holds_pattern(0)? || !x.all(SENTINEL)? {
            return Err("device 1's DMA did not land in its own buffer only".into());
        }
        y.fill(SENTINEL)?;
        d0.dev.dma(Dir::ToRam, iova.raw(), 0, XFER)?;
        expect_no_fault(vtd)?;
        if !x.holds_pattern(0)? || !y.all(SENTINEL)? {
            return Err("device 0's DMA did not land in its own buffer only".into());
        }
        d0.unmap_one(m).map_err(e2s)?;
        d1.unmap(&[m], &[]).map_err(e2s)?;
        d1.flush().map_err(e2s)?;
        Ok(())
    });

    r.check("a 2 MiB block mapping translates (second-level large page)", || {
        if !vtd.caps().large_2m() {
            return Err("the unit offers no 2 MiB pages (CAP.SLLPS)".into());
        }
        load_pattern(d0, &scratch)?;
        const BLOCK: u64 = 2 << 20;
        let buf = Buf::new(BLOCK / PAGE_SIZE, BLOCK)?;
        let m = d0.alloc(BLOCK / PAGE_SIZE, BLOCK).map_err(e2s)?;
        d0.map_at(m.start(), buf.pa, BLOCK / PAGE_SIZE, Prot::WRITE).map_err(e2s)?;
        if d0.dom.table().leaf_of(m.start()).map(|(_, h)| h) != Some(1) {
            return Err("the table did not use a 2 MiB leaf".into());
        }
        let off = BLOCK / 2 + 0x800;
        let twin = Twin::of(Iova::new(m.start().raw() + off))?;
        d0.dev.dma(Dir::ToRam, m.start().raw() + off, 0, XFER)?;
        expect_no_fault(vtd)?;
        if !buf.holds_pattern(off)? {
            return Err("the data did not arrive through the block".into());
        }
        twin.untouched()?;
        d0.unmap_one(m).map_err(e2s).map(|_| ())
    });

    r.check("detach: the device's DMA is blocked again and domain ids come back", || {
        let mut dids = Vec::new();
        for d in doms.drain(..) {
            let (dev, did, sid) = (d.dev, d.did, d.sid());
            d.detach().map_err(e2s)?;
            dids.push(did);
            let iova = EDU_LIMIT - PAGE_SIZE;
            dev.dma(Dir::ToRam, iova, 0, XFER)?;
            expect_fault(vtd, sid, iova, Access::Write, None)?;
        }
        for _ in &dids {
            let did = vtd.alloc_domain_id().map_err(e2s)?;
            if !dids.contains(&did) {
                return Err(format!("fresh domain id {did:?}, expected one of {dids:?} back"));
            }
        }
        for did in dids {
            vtd.free_domain_id(did).map_err(e2s)?;
        }
        Ok(())
    });
    drop(scratch);
    drop(doms);
}

fn counter(c: &core::sync::atomic::AtomicU64) -> u64 {
    c.load(core::sync::atomic::Ordering::Relaxed)
}

fn fresh_map_after_fault(vtd: &Unit, d: &DevDomain<'_>, scratch: &Buf) -> CheckResult {
    load_pattern(d, scratch)?;
    let buf = Buf::new(1, PAGE_SIZE)?;
    buf.fill(SENTINEL)?;
    let ir = d.alloc(1, PAGE_SIZE).map_err(e2s)?;
    below_mask(ir)?;
    let twin = Twin::of(ir.start())?;
    // The unit looks the IOVA up and finds nothing: a unit in caching mode may cache that.
    d.dev.dma(Dir::ToRam, ir.start().raw(), 0, XFER)?;
    expect_fault(vtd, d.sid(), ir.start().raw(), Access::Write, reason_of(Access::Write))?;
    let before = counter(&vtd.stats().after_map);
    d.map_at(ir.start(), buf.pa, 1, Prot::WRITE).map_err(e2s)?;
    let n = counter(&vtd.stats().after_map) - before;
    let cm = vtd.caps().caching_mode();
    if n != u64::from(cm) {
        return Err(format!("{n} invalidations after the map with caching mode {cm}"));
    }
    d.dev.dma(Dir::ToRam, ir.start().raw(), 0, XFER)?;
    expect_no_fault(vtd)?;
    if !buf.holds_pattern(0)? {
        return Err("the DMA after the map did not arrive".into());
    }
    twin.untouched()?;
    d.unmap_one(ir).map_err(e2s).map(|_| ())
}

/// Checks that `got` is the injected failure as the unit reports it, naming `d`'s domain.
fn injected_failure(vtd: &Unit, d: &DevDomain<'_>, got: busdma::Result<()>) -> CheckResult {
    let (domain, status) = match got {
        Err(busdma::Error::InvalidationFailed { domain, status, .. }) => (domain, status),
        other => return Err(format!("the rejected invalidation returned {other:?}")),
    };
    let seen = match vtd.method() {
        InvalidationMethod::Queued => status & u64::from(busdma::vtd::regs::fsts::IQE) != 0,
        InvalidationMethod::Register => (status >> busdma::vtd::regs::iotlb::IAIG_SHIFT) & 0b11 == 0,
    };
    if domain != u64::from(d.did.0) || !seen {
        return Err(format!("the error names domain {domain} and status {status:#x}"));
    }
    // SAFETY: reading the unit's fault status register has no side effect.
    let fsts = unsafe { PLATFORM.mmio_read32(PhysAddr::new(VTD_BASE + busdma::vtd::regs::FSTS)) };
    if fsts & busdma::vtd::regs::fsts::IQE != 0 {
        return Err("FSTS.IQE still set: the queue was not recovered".into());
    }
    Ok(())
}

fn strict_invalidation_failure(vtd: &Unit, d: &DevDomain<'_>, scratch: &Buf) -> CheckResult {
    load_pattern(d, scratch)?;
    let (buf, other) = (Buf::new(1, PAGE_SIZE)?, Buf::new(1, PAGE_SIZE)?);
    let m = d.map(buf.pa, 1, Prot::WRITE).map_err(e2s)?;
    let bus = m.start().raw();
    d.dev.dma(Dir::ToRam, bus, 0, XFER)?;
    expect_no_fault(vtd)?;
    buf.fill(SENTINEL)?;
    let (failed, recovered, before) =
        (counter(&vtd.stats().failed), counter(&vtd.stats().queue_errors_recovered), d.dom.stats());
    vtd.inject_invalidation_failures(1);
    injected_failure(vtd, d, d.unmap_one(m).map(|_| ()))?;
    let queued = u64::from(vtd.method() == InvalidationMethod::Queued);
    if counter(&vtd.stats().failed) != failed + 1
        || counter(&vtd.stats().queue_errors_recovered) != recovered + queued
    {
        return Err("the driver's failure counters did not move".into());
    }
    let st = d.dom.stats();
    if !d.dom.degraded() || st.held_back != 1 || st.iova_released != before.iova_released {
        return Err(format!("the domain did not hold the unmap back: {st:?}"));
    }
    // The unit really kept the translation: holding back is what makes this harmless.
    d.dev.dma(Dir::ToRam, bus, 0, XFER)?;
    if !buf.holds_pattern(0)? {
        return Err("the stale translation was not used: this check has no teeth".into());
    }
    buf.fill(SENTINEL)?;
    // The next map recovers first: one whole-domain invalidation, then the release.
    let m2 = d.map(other.pa, 1, Prot::WRITE).map_err(e2s)?;
    let st = d.dom.stats();
    if d.dom.degraded() || st.held_back != 0 || st.iova_released != before.iova_released + 1 {
        return Err(format!("the map did not recover the domain: {st:?}"));
    }
    d.dev.dma(Dir::ToRam, bus, 0, XFER)?;
    expect_fault(vtd, d.sid(), bus, Access::Write, reason_of(Access::Write))?;
    if !buf.all(SENTINEL)? {
        return Err("a DMA after the recovery reached the old buffer".into());
    }
    // The queue (or the registers) still work.
    d.dev.dma(Dir::ToRam, m2.start().raw(), 0, XFER)?;
    expect_no_fault(vtd)?;
    d.unmap_one(m2).map_err(e2s).map(|_| ())
}

fn deferred_flush_failure(vtd: &Unit, d: &DevDomain<'_>, scratch: &Buf) -> CheckResult {
    load_pattern(d, scratch)?;
    let buf = Buf::new(1, PAGE_SIZE)?;
    let m = d.map(buf.pa, 1, Prot::WRITE).map_err(e2s)?;
    let bus = m.start().raw();
    d.dev.dma(Dir::ToRam, bus, 0, XFER)?;
    expect_no_fault(vtd)?;
    d.unmap_one(m).map_err(e2s)?;
    buf.fill(SENTINEL)?;
    let released = d.dom.stats().iova_released;
    vtd.inject_invalidation_failures(1);
    injected_failure(vtd, d, d.flush())?;
    if d.dom.pending() != 1 || d.dom.stats().iova_released != released {
        return Err(format!("the failed flush released something ({} pending)", d.dom.pending()));
    }
    d.dev.dma(Dir::ToRam, bus, 0, XFER)?;
    if !buf.holds_pattern(0)? {
        return Err("the stale translation was not used: this check has no teeth".into());
    }
    buf.fill(SENTINEL)?;
    d.flush().map_err(e2s)?;
    if d.dom.pending() != 0 || d.dom.stats().iova_released != released + 1 {
        return Err("the next flush did not release the unmap".into());
    }
    d.dev.dma(Dir::ToRam, bus, 0, XFER)?;
    expect_fault(vtd, d.sid(), bus, Access::Write, reason_of(Access::Write))?;
    if !buf.all(SENTINEL)? {
        return Err("a DMA after the flush reached the buffer".into());
    }
    Ok(())
}

/// The deferred-mode check on domain `d` (deferred, flush after 8 queued unmaps), through
/// a tag's maps.
fn deferred(vtd: &Unit, d: &DevDomain<'_>, scratch: &Buf) -> CheckResult {
    load_pattern(d, scratch)?;
    let tag = edu_tag(d)?;
    let buf = Buf::new(1, PAGE_SIZE)?;
    let mut map = tag.create_map().map_err(e2s)?;
    // 1. The window deferral opens: after the unload, the IOTLB still translates the old
    //    bus address.
    let bus = map.load(&kbuf(&buf, 0, XFER), Direction::FromDevice).map_err(e2s)?[0].addr.raw();
    d.dev.dma(Dir::ToRam, bus, 0, XFER)?;
    expect_no_fault(vtd)?;
    buf.fill(SENTINEL)?;
    let before = unmap_invalidations(vtd);
    map.unload().map_err(e2s)?;
    if unmap_invalidations(vtd) != before || d.dom.pending() != 1 {
        return Err(format!("the unload was not deferred ({} pending)", d.dom.pending()));
    }
    d.dev.dma(Dir::ToRam, bus, 0, XFER)?;
    if !buf.holds_pattern(0)? {
        return Err(
            "the stale translation was not used: the unit did not cache it, so this check has no teeth"
                .into(),
        );
    }
    buf.fill(SENTINEL)?;
    // 2. The flush closes it.
    d.flush().map_err(e2s)?;
    if d.dom.pending() != 0 || unmap_invalidations(vtd) == before {
        return Err("the flush invalidated nothing".into());
    }
    d.dev.dma(Dir::ToRam, bus, 0, XFER)?;
    expect_fault(vtd, d.sid(), bus, Access::Write, reason_of(Access::Write))?;
    if !buf.all(SENTINEL)? {
        return Err("a DMA after the flush reached the buffer".into());
    }
    // 3. Load/unload cycles: a bus address handed out again must have been invalidated (some
    //    IOTLB invalidation completed) after its last unload began.
    // (bus address, IOTLB invalidations completed before its unload began).
    let mut unloaded_at: Vec<(u64, u64)> = Vec::new();
    let mut reused = 0;
    // Why 40 cycles: five flushes at 8 per queue, so addresses come back several times.
    for _ in 0..40 {
        let seg = map.load(&kbuf(&buf, 0, XFER), Direction::FromDevice).map_err(e2s)?[0];
        let a = seg.addr.raw();
        if seg.end() > EDU_LIMIT {
            return Err(format!("bus address {a:#x} beyond edu's 28-bit mask"));
        }
        if let Some(&(_, at)) = unloaded_at.iter().rev().find(|(i, _)| *i == a) {
            if unmap_invalidations(vtd) <= at {
                return Err(format!(
                    "bus address {a:#x} handed out again before any invalidation since its unload"
                ));
            }
            reused += 1;
        }
        d.dev.dma(Dir::ToRam, a, 0, XFER)?;
        // Counted before the unload: an invalidation issued inside it (a full queue flushes)
        // comes after the entry was cleared, so it does cover the address.
        let at = unmap_invalidations(vtd);
        map.unload().map_err(e2s)?;
        unloaded_at.push((a, at));
    }
    expect_no_fault(vtd)?;
    d.flush().map_err(e2s)?;
    if reused == 0 {
        return Err("no bus address was ever reused: the check proved nothing".into());
    }
    Ok(())
}

/// A tag for edu behind `d`: 28-bit DMA mask, loads of up to two pages in up to two segments,
/// one IOVA allocation per load (`IommuPerMap`).
fn edu_tag<'a>(
    d: &'a DevDomain<'_>,
) -> Result<Tag<'static, KernelPlatform, IommuPerMap<&'a DevDomain<'a>>>, String> {
    let spec = TagSpec { dma_mask: TagSpec::mask_of_bits(edu::DMA_BITS), ..TagSpec::new(2 * PAGE_SIZE, 2) };
    Tag::new_root(&PLATFORM, IommuPerMap(d), spec).map_err(e2s)
}

/// `len` bytes of `buf` from `off`, as a kernel buffer (KVA == PA in this kernel).
pub(crate) fn kbuf(buf: &Buf, off: u64, len: u64) -> KernelBuf {
    // SAFETY: `buf` is frames the check allocated and keeps until its maps are unloaded.
    unsafe { KernelBuf::new(KernVa::new(buf.at(off).raw()), len) }
}

/// DMAs between the edu buffer and the segments of a loaded map, segment by segment (the
/// device buffer offset advancing).
pub(crate) fn dma_segments(dev: &Edu, dir: Dir, segs: &[Segment]) -> CheckResult {
    let mut off = 0;
    for s in segs {
        dev.dma(dir, s.addr.raw(), off, s.len)?;
        off += s.len;
    }
    Ok(())
}

/// The twin of every IOVA page `segs` cover (each must lie below edu's 28-bit mask), so a
/// check can show that an untranslated DMA to those numbers reached none of them.
pub(crate) fn segment_twins<'s>(segs: impl Iterator<Item = &'s Segment>) -> Result<Vec<Twin>, String> {
    let mut twins = Vec::new();
    for s in segs {
        if s.end() > EDU_LIMIT {
            return Err(format!("segment {s:?} beyond edu's 28-bit mask"));
        }
        let mut page = s.addr.raw() & !(PAGE_SIZE - 1);
        while page < s.end() {
            twins.push(Twin::of(Iova::new(page))?);
            page += PAGE_SIZE;
        }
    }
    Ok(twins)
}

fn through_maps(vtd: &Unit, d: &DevDomain<'_>) -> CheckResult {
    let tag = edu_tag(d)?;
    let src = Buf::new(1, PAGE_SIZE)?;
    let dst = Buf::new(2, PAGE_SIZE)?;
    PLATFORM.write_phys(src.at(0x800), &pattern()).map_err(e2s)?;
    let mut tx = tag.create_map().map_err(e2s)?;
    let mut rx = tag.create_map().map_err(e2s)?;
    // The transmit buffer sits inside one page; the receive buffer straddles two pages, so the
    // device crosses an IOVA page boundary in one transfer.
    let tx_segs: Vec<Segment> = tx.load(&kbuf(&src, 0x800, XFER), Direction::ToDevice).map_err(e2s)?.to_vec();
    let rx_segs: Vec<Segment> =
        rx.load(&kbuf(&dst, 0xc00, XFER), Direction::FromDevice).map_err(e2s)?.to_vec();
    let twins = segment_twins(tx_segs.iter().chain(&rx_segs))?;
    tx.sync(SyncOp::PREWRITE).map_err(e2s)?;
    dma_segments(d.dev, Dir::FromRam, &tx_segs)?;
    tx.sync(SyncOp::POSTWRITE).map_err(e2s)?;
    rx.sync(SyncOp::PREREAD).map_err(e2s)?;
    dma_segments(d.dev, Dir::ToRam, &rx_segs)?;
    rx.sync(SyncOp::POSTREAD).map_err(e2s)?;
    expect_no_fault(vtd)?;
    let mut got = vec![0u8; XFER as usize];
    rx.read(0, &mut got).map_err(e2s)?;
    if got != pattern() || !dst.holds_pattern(0xc00)? {
        return Err("the data did not arrive in the receive buffer".into());
    }
    for t in &twins {
        t.untouched()?;
    }
    tx.unload().map_err(e2s)?;
    rx.unload().map_err(e2s)?;
    Ok(())
}

fn bad_inputs(r: &mut Runner, vtd: &Unit, d: &DevDomain<'_>) {
    r.check("vtd: bad driver inputs are refused with clear errors and change nothing", || {
        use busdma::Error;
        use busdma::vtd::DomainId;
        let (sid, did) = (d.sid(), d.did);
        let root = vtd.context_of(sid).ok_or("no context entry")?.0;
        let levels = vtd.levels();
        // SAFETY: refused before it writes a context entry (the refusal is what is checked).
        refused("attach with domain id 0", unsafe { vtd.attach(sid, DomainId(0), root, levels) }, |e| {
            matches!(e, Error::InvalidArgument { value: 0, .. })
        })?;
        refused(
            "attach of an attached device",
            // SAFETY: refused (the device is attached): no entry is written.
            unsafe { vtd.attach(sid, did, root, levels) },
            |e| matches!(e, Error::AlreadyMapped { addr } if *addr == u64::from(sid.0)),
        )?;
        refused(
            "attach with a misaligned table root",
            // SAFETY: refused (misaligned root) before any entry is written.
            unsafe { vtd.attach(SourceId(0xff00), did, PhysAddr::new(root.raw() + 8), levels) },
            |e| matches!(e, Error::Misaligned { .. }),
        )?;
        refused("detach of a device never attached", vtd.detach(SourceId(0xff00)), |e| {
            matches!(e, Error::NotMapped { addr: 0xff00 })
        })?;
        let spare = vtd.alloc_domain_id().map_err(e2s)?;
        vtd.free_domain_id(spare).map_err(e2s)?;
        refused("free of a free domain id", vtd.free_domain_id(spare), |e| {
            matches!(e, Error::DoubleFree { .. })
        })?;
        match vtd.context_of(sid) {
            Some((r, _, x)) if r == root && x == did => Ok(()),
            other => Err(format!("the refused calls changed the context entry: {other:?}")),
        }
    });
}
