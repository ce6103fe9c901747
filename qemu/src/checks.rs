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

use busdma::pgtable::{Prot, TablePool};
use busdma::vtd::{Access, InvalidationChoice, InvalidationMethod, SourceId, Vtd, VtdConfig, fault};
use busdma::{Iova, PAGE_SIZE, PageRequest, PhysAddr, Platform};

use crate::domain::{DevDomain, EDU_LIMIT};
use crate::edu::{self, Dir, Edu};
use crate::frames;
use crate::pci::{self, Bdf};
use crate::platform::{self, KernelPlatform, PLATFORM};
use crate::println;
use crate::start_info::BootInfo;

type CheckResult = Result<(), String>;

/// Where q35 puts its VT-d remapping unit (QEMU's DMAR table says so too).
const VTD_BASE: u64 = 0xfed9_0000;
/// Bytes per edu transfer: half a page, well inside QEMU 7.2's safe range (see `edu`).
const XFER: u64 = 2048;
/// Sentinel written to twin pages and to buffers that must not change.
const SENTINEL: u8 = 0x5a;

struct Runner {
    failed: usize,
}

impl Runner {
    fn check(&mut self, name: &str, f: impl FnOnce() -> CheckResult) {
        match f() {
            Ok(()) => println!("ok - {name}"),
            Err(why) => {
                self.failed += 1;
                println!("FAIL - {name}: {why}");
            }
        }
    }
}

fn e2s(e: busdma::Error) -> String {
    format!("{e}")
}

/// The pattern the edu buffer is loaded with before transfers to RAM.
fn pattern() -> Vec<u8> {
    (0..XFER as u32).map(|i| (i.wrapping_mul(7) + 3) as u8).collect()
}

/// A run of zeroed frames at or above 2^28.
struct Buf {
    pa: PhysAddr,
    pages: u64,
}

impl Buf {
    fn new(pages: u64, align: u64) -> Result<Self, String> {
        let req = PageRequest { align, ..PageRequest::pages(pages) };
        let pa = PLATFORM.alloc_pages(&req).map_err(e2s)?;
        Ok(Self { pa, pages })
    }

    fn at(&self, off: u64) -> PhysAddr {
        PhysAddr::new(self.pa.raw() + off)
    }

    fn fill(&self, byte: u8) -> CheckResult {
        PLATFORM.fill_phys(self.pa, self.pages * PAGE_SIZE, byte).map_err(e2s)
    }

    fn read(&self, off: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut v = vec![0u8; len as usize];
        PLATFORM.read_phys(self.at(off), &mut v).map_err(e2s)?;
        Ok(v)
    }

    /// Whether `[off, off + XFER)` holds the edu pattern.
    fn holds_pattern(&self, off: u64) -> Result<bool, String> {
        Ok(self.read(off, XFER)? == pattern())
    }

    /// Whether every byte is `byte`.
    fn all(&self, byte: u8) -> Result<bool, String> {
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
struct Twin(u64);

impl Twin {
    fn of(iova: Iova) -> Result<Self, String> {
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

    fn untouched(&self) -> CheckResult {
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
    pci::scan_bus0(|bdf, v, d| {
        println!("pci {bdf} {v:04x}:{d:04x}");
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
    r.check("vtd: translation enables", || vtd.enable_translation().map_err(e2s));
    r.check("vtd: DMA from an unattached device is blocked and recorded", || {
        unattached_is_blocked(&vtd, &devs[0])
    });

    translated_checks(&mut r, &vtd, &devs);

    r.check("vtd: teardown turns translation off and frees every page it took", || {
        drop(vtd);
        // SAFETY: the driver is gone; reading the unit's status register has no side effect.
        let status = unsafe { PLATFORM.mmio_read32(PhysAddr::new(VTD_BASE + busdma::vtd::regs::GSTS)) };
        if status & busdma::vtd::regs::gcmd::TE != 0 {
            return Err("translation still on".into());
        }
        if frames::in_use() != frames_before {
            return Err(format!("{} frames in use, {frames_before} before bring-up", frames::in_use()));
        }
        Ok(())
    });
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
/// of a pattern page (checked: the data must arrive translated).
fn load_pattern(d: &mut DevDomain<'_, '_>, src: &Buf) -> CheckResult {
    PLATFORM.write_phys(src.pa, &pattern()).map_err(e2s)?;
    let iova = d.map(src.pa, 1, Prot::READ).map_err(e2s)?;
    d.dev.dma(Dir::FromRam, iova.raw(), 0, XFER)?;
    d.unmap(iova, 1).map_err(e2s)
}

fn translated_checks(r: &mut Runner, vtd: &Vtd<'static, KernelPlatform>, devs: &[Edu]) {
    let pool = TablePool::new(&PLATFORM);
    let mut doms: Vec<DevDomain<'_, '_>> = Vec::new();
    r.check("vtd: each edu device gets its own domain and table", || {
        for dev in devs {
            doms.push(DevDomain::attach(vtd, &pool, dev).map_err(e2s)?);
        }
        if doms[0].did == doms[1].did {
            return Err("both devices got the same domain id".into());
        }
        for d in &doms {
            let ctx = vtd.context_of(d.sid()).ok_or("no context entry")?;
            if ctx.2 != d.did || ctx.1 != vtd.levels().aw() {
                return Err(format!("context entry {ctx:?} for domain {:?}", d.did));
            }
        }
        Ok(())
    });
    if doms.len() != 2 {
        return;
    }
    r.check("vtd: bad driver inputs are refused with clear errors and change nothing", || {
        use busdma::Error;
        use busdma::vtd::DomainId;
        let (sid, did) = (doms[0].sid(), doms[0].did);
        let root = vtd.context_of(sid).ok_or("no context entry")?.0;
        let levels = vtd.levels();
        refused("attach with domain id 0", vtd.attach(sid, DomainId(0), root, levels), |e| {
            matches!(e, Error::InvalidArgument { value: 0, .. })
        })?;
        refused(
            "attach of an attached device",
            vtd.attach(sid, did, root, levels),
            |e| matches!(e, Error::AlreadyMapped { addr } if *addr == u64::from(sid.0)),
        )?;
        refused(
            "attach with a misaligned table root",
            vtd.attach(SourceId(0xff00), did, PhysAddr::new(root.raw() + 8), levels),
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
            Some((r, _, d)) if r == root && d == did => Ok(()),
            other => Err(format!("the refused calls changed the context entry: {other:?}")),
        }
    });
    let Ok(scratch) = Buf::new(1, PAGE_SIZE) else {
        println!("FAIL - allocating a scratch buffer");
        r.failed += 1;
        return;
    };

    r.check("translated DMA: data arrives through the mappings, IOVAs stay below 2^28, the pages at the IOVAs' own addresses are untouched", || {
        let d = &mut doms[0];
        let src = Buf::new(1, PAGE_SIZE)?;
        let dst = Buf::new(1, PAGE_SIZE)?;
        PLATFORM.write_phys(src.at(0x800), &pattern()).map_err(e2s)?;
        let iova_src = d.map(src.pa, 1, Prot::READ).map_err(e2s)?;
        let iova_dst = d.map(dst.pa, 1, Prot::WRITE).map_err(e2s)?;
        for iova in [iova_src, iova_dst] {
            if iova.raw() + PAGE_SIZE > EDU_LIMIT {
                return Err(format!("IOVA {iova} beyond edu's 28-bit mask"));
            }
        }
        let twins = [Twin::of(iova_src)?, Twin::of(iova_dst)?];
        d.dev.dma(Dir::FromRam, iova_src.raw() + 0x800, 0, XFER)?;
        d.dev.dma(Dir::ToRam, iova_dst.raw() + 0x400, 0, XFER)?;
        expect_no_fault(vtd)?;
        if !dst.holds_pattern(0x400)? {
            return Err("the data did not arrive in the destination buffer".into());
        }
        for t in &twins {
            t.untouched()?;
        }
        d.unmap(iova_src, 1).map_err(e2s)?;
        d.unmap(iova_dst, 1).map_err(e2s)
    });

    for access in [Access::Write, Access::Read] {
        r.check(
            &format!(
                "a {access:?} DMA to an unmapped IOVA is blocked; the fault names source, page and direction"
            ),
            || {
                let d = &mut doms[0];
                let iova = d.fresh_iova(1).map_err(e2s)?;
                let twin = Twin::of(iova)?;
                let dir = if access == Access::Write { Dir::ToRam } else { Dir::FromRam };
                d.dev.dma(dir, iova.raw() + 0x100, 0, XFER)?;
                expect_fault(vtd, d.sid(), iova.raw(), access, reason_of(access))?;
                twin.untouched()
            },
        );
    }

    r.check("a read-only mapping refuses device writes (fault: write)", || {
        let d = &mut doms[0];
        load_pattern(d, &scratch)?;
        let buf = Buf::new(1, PAGE_SIZE)?;
        buf.fill(SENTINEL)?;
        let iova = d.map(buf.pa, 1, Prot::READ).map_err(e2s)?;
        d.dev.dma(Dir::ToRam, iova.raw(), 0, XFER)?;
        expect_fault(vtd, d.sid(), iova.raw(), Access::Write, reason_of(Access::Write))?;
        if !buf.all(SENTINEL)? {
            return Err("the write reached the read-only buffer".into());
        }
        d.unmap(iova, 1).map_err(e2s)
    });

    r.check(
        "strict unmap: the stale IOTLB entry works until the ranged invalidation, and faults after it",
        || {
            let d = &mut doms[0];
            load_pattern(d, &scratch)?;
            let buf = Buf::new(1, PAGE_SIZE)?;
            let iova = d.map(buf.pa, 1, Prot::READ_WRITE).map_err(e2s)?;
            let twin = Twin::of(iova)?;
            // Cache the translation, then clear the entry without invalidating.
            d.dev.dma(Dir::ToRam, iova.raw(), 0, XFER)?;
            expect_no_fault(vtd)?;
            buf.fill(SENTINEL)?;
            let gather = d.unmap_no_flush(iova, 1).map_err(e2s)?;
            d.dev.dma(Dir::ToRam, iova.raw(), 0, XFER)?;
            if !buf.holds_pattern(0)? {
                return Err(
                    "the unit did not use its cached translation: this check would have no teeth".into()
                );
            }
            buf.fill(SENTINEL)?;
            let before = vtd.stats().iotlb_total();
            d.flush(gather).map_err(e2s)?;
            if vtd.stats().iotlb_total() != before + 1 {
                return Err(format!(
                    "expected one IOTLB invalidation, saw {}",
                    vtd.stats().iotlb_total() - before
                ));
            }
            d.dev.dma(Dir::ToRam, iova.raw(), 0, XFER)?;
            expect_fault(vtd, d.sid(), iova.raw(), Access::Write, reason_of(Access::Write))?;
            if !buf.all(SENTINEL)? {
                return Err("a DMA after the strict unmap reached the buffer".into());
            }
            twin.untouched()
        },
    );

    r.check(
        "page-selective invalidation covers a range straddling an alignment boundary (address mask)",
        || {
            let d = &mut doms[0];
            load_pattern(d, &scratch)?;
            // Three pages whose page numbers end in ...0111, ...1000, ...1001: the smallest
            // aligned block covering them is 16 pages (AM = 4).
            let base = d.fresh_iova(32).map_err(e2s)?.raw();
            let iova = Iova::new((base + 15 * PAGE_SIZE) & !(16 * PAGE_SIZE - 1) | (7 * PAGE_SIZE));
            let buf = Buf::new(3, PAGE_SIZE)?;
            d.map_at(iova, buf.pa, 3, Prot::WRITE).map_err(e2s)?;
            for i in 0..3 {
                d.dev.dma(Dir::ToRam, iova.raw() + i * PAGE_SIZE, 0, XFER)?;
            }
            expect_no_fault(vtd)?;
            buf.fill(SENTINEL)?;
            let psi_before = vtd.stats().iotlb_page.load(core::sync::atomic::Ordering::Relaxed);
            d.unmap(iova, 3).map_err(e2s)?;
            let psi = vtd.stats().iotlb_page.load(core::sync::atomic::Ordering::Relaxed) - psi_before;
            if vtd.caps().psi() && psi != 1 {
                return Err(format!("{psi} page-selective invalidations, expected 1"));
            }
            for i in 0..3 {
                let a = iova.raw() + i * PAGE_SIZE;
                d.dev.dma(Dir::ToRam, a, 0, XFER)?;
                expect_fault(vtd, d.sid(), a, Access::Write, reason_of(Access::Write))?;
            }
            if !buf.all(SENTINEL)? {
                return Err("a page of the range stayed reachable after its invalidation".into());
            }
            Ok(())
        },
    );

    r.check("two devices in two domains cannot reach each other's mappings", || {
        let (a, b) = doms.split_at_mut(1);
        let (d0, d1) = (&mut a[0], &mut b[0]);
        load_pattern(d0, &scratch)?;
        load_pattern(d1, &scratch)?;
        let x = Buf::new(1, PAGE_SIZE)?;
        let y = Buf::new(1, PAGE_SIZE)?;
        x.fill(SENTINEL)?;
        y.fill(SENTINEL)?;
        // The same IOVA number in both domains, mapping different buffers.
        let iova = d0.fresh_iova(1).map_err(e2s)?;
        d0.map_at(iova, x.pa, 1, Prot::WRITE).map_err(e2s)?;
        // Device 1 at an IOVA mapped only in domain 0: blocked, its own source id recorded.
        d1.dev.dma(Dir::ToRam, iova.raw(), 0, XFER)?;
        expect_fault(vtd, d1.sid(), iova.raw(), Access::Write, reason_of(Access::Write))?;
        if !x.all(SENTINEL)? {
            return Err("device 1 reached domain 0's buffer".into());
        }
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
        d0.unmap(iova, 1).map_err(e2s)?;
        d1.unmap(iova, 1).map_err(e2s)
    });

    r.check("a 2 MiB block mapping translates (second-level large page)", || {
        let d = &mut doms[0];
        if !vtd.caps().large_2m() {
            return Err("the unit offers no 2 MiB pages (CAP.SLLPS)".into());
        }
        load_pattern(d, &scratch)?;
        const BLOCK: u64 = 2 << 20;
        let buf = Buf::new(BLOCK / PAGE_SIZE, BLOCK)?;
        let base = d.fresh_iova(2 * BLOCK / PAGE_SIZE).map_err(e2s)?.raw();
        let iova = Iova::new(base.next_multiple_of(BLOCK));
        d.map_at(iova, buf.pa, BLOCK / PAGE_SIZE, Prot::WRITE).map_err(e2s)?;
        let off = BLOCK / 2 + 0x800;
        let twin = Twin::of(Iova::new(iova.raw() + off))?;
        d.dev.dma(Dir::ToRam, iova.raw() + off, 0, XFER)?;
        expect_no_fault(vtd)?;
        if !buf.holds_pattern(off)? {
            return Err("the data did not arrive through the block".into());
        }
        twin.untouched()?;
        d.unmap(iova, BLOCK / PAGE_SIZE).map_err(e2s)
    });

    r.check("detach: the device's DMA is blocked again and domain ids come back", || {
        let mut dids = Vec::new();
        for d in doms.drain(..) {
            let (dev, did, sid) = (d.dev, d.did, d.sid());
            let iova = EDU_LIMIT - PAGE_SIZE;
            d.detach().map_err(e2s)?;
            dids.push(did);
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
