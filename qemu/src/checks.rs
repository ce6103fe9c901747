//! The checks.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use busdma::vtd::{Access, InvalidationChoice, InvalidationMethod, SourceId, Vtd, VtdConfig, fault};
use busdma::{PAGE_SIZE, PhysAddr, Platform};

use crate::edu::{self, Dir, Edu};
use crate::frames;
use crate::pci::{self, Bdf};
use crate::platform::{self, KernelPlatform, PLATFORM};
use crate::println;
use crate::start_info::BootInfo;

type CheckResult = Result<(), String>;

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
    // SAFETY: q35's only remapping unit sits at VTD_BASE and nothing else drives it.
    let vtd = match unsafe {
        Vtd::new(
            &PLATFORM,
            PhysAddr::new(VTD_BASE),
            VtdConfig { invalidation: choice, ..VtdConfig::default() },
        )
    } {
        Ok(v) => Box::new(v),
        Err(e) => {
            println!("FAIL - vtd: bring-up: {e}");
            return r.failed + 1;
        }
    };
    let caps = vtd.caps();
    println!(
        "vtd: version {:#x} cap {:#018x} ecap {:#018x}: {}-level tables, {:?} invalidation, psi {} mamv {} coherent {} rwbf {} fault records {}",
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
    r.check("vtd: translation enables", || vtd.enable_translation().map_err(|e| format!("{e}")));
    r.check("vtd: DMA from an unattached device is blocked and recorded", || {
        unattached_is_blocked(&vtd, &devs[0])
    });
    r.check("vtd: teardown turns translation off and frees every page it took", || {
        drop(vtd);
        let gsts = busdma::vtd::regs::GSTS;
        // SAFETY: the driver is gone; reading the unit's status register has no side effect.
        let status = unsafe { PLATFORM.mmio_read32(PhysAddr::new(VTD_BASE + gsts)) };
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

/// Where q35 puts its VT-d remapping unit (QEMU's DMAR table says so too).
const VTD_BASE: u64 = 0xfed9_0000;

fn sid(dev: &Edu) -> SourceId {
    SourceId(dev.bdf.source_id())
}

/// Takes the one fault the last DMA should have caused and checks it names `dev`, the page
/// of `bus` and the direction.
fn expect_fault(vtd: &Vtd<'_, KernelPlatform>, dev: &Edu, bus: u64, access: Access) -> CheckResult {
    let Some(f) = vtd.take_fault() else {
        return Err(format!("no fault recorded for the DMA to {bus:#x}"));
    };
    let want_reason = match access {
        Access::Read => fault::REASON_READ,
        Access::Write => fault::REASON_WRITE,
    };
    let page = bus & !(PAGE_SIZE - 1);
    if f.source != sid(dev) || f.addr.raw() != page || f.access != access {
        return Err(format!(
            "fault {f:?} does not name source {:#x}, page {page:#x}, {access:?}",
            sid(dev).0
        ));
    }
    if let Some(extra) = vtd.take_fault() {
        return Err(format!("unexpected second fault {extra:?}"));
    }
    let _ = want_reason;
    Ok(())
}

fn unattached_is_blocked(vtd: &Vtd<'_, KernelPlatform>, dev: &Edu) -> CheckResult {
    // A scratch page an untranslated DMA would reach: it must stay as it is.
    let target = 0x0120_0000u64;
    PLATFORM.fill_phys(PhysAddr::new(target), PAGE_SIZE, 0x5a).map_err(|e| format!("{e}"))?;
    dev.dma(Dir::ToRam, target, 0, 2048)?;
    expect_fault(vtd, dev, target, Access::Write)?;
    let mut got = alloc::vec![0u8; PAGE_SIZE as usize];
    PLATFORM.read_phys(PhysAddr::new(target), &mut got).map_err(|e| format!("{e}"))?;
    if got.iter().any(|&b| b != 0x5a) {
        return Err("the blocked DMA changed memory".into());
    }
    Ok(())
}

fn untranslated_round_trip(dev: &Edu) -> CheckResult {
    // Two scratch pages below 2^28, where an untranslated edu can reach.
    let src = 0x0100_0000u64;
    let dst = src + PAGE_SIZE;
    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
    PLATFORM.write_phys(PhysAddr::new(src), &pattern).map_err(|e| format!("{e}"))?;
    PLATFORM.fill_phys(PhysAddr::new(dst), PAGE_SIZE, 0).map_err(|e| format!("{e}"))?;
    dev.dma(Dir::FromRam, src, 0, 2048)?;
    dev.dma(Dir::ToRam, dst, 0, 2048)?;
    let mut got = alloc::vec![0u8; 2048];
    PLATFORM.read_phys(PhysAddr::new(dst), &mut got).map_err(|e| format!("{e}"))?;
    if got != pattern {
        return Err("data did not arrive".into());
    }
    Ok(())
}
