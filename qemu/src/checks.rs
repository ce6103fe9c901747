//! The checks.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use busdma::{PAGE_SIZE, PhysAddr, Platform};

use crate::edu::{self, Dir, Edu};
use crate::frames;
use crate::pci::{self, Bdf};
use crate::platform::{self, PLATFORM};
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
    r.failed
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
