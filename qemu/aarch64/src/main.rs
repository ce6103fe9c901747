//! busdma's aarch64 bare-metal test kernel: boots under QEMU `virt` with an SMMUv3
//! (`-M virt,iommu=smmuv3 -kernel`), turns the MMU on with an identity map, enumerates PCIe
//! through the high ECAM, assigns BARs, finds two `edu` devices and proves busdma's SMMUv3
//! driver by making them DMA through it. Each check prints `ok - NAME` or `FAIL - NAME: why`
//! on the PL011; the kernel leaves through semihosting SYS_EXIT with [`exit::PASS`] only if
//! every check passed.
//!
//! Shared with the x86 kernel (`qemu/src`, included by path): the frame allocator, the heap,
//! the PCI functions and bus scan, the edu driver and the `busdma::device` checks. Apart: boot, MMU,
//! console, exit, PCI configuration access, timer, the
//! platform and the checks (SMMUv3 here, VT-d there). Why a sibling crate rather than one
//! crate with arch modules: the two kernels build for different targets with different
//! linker scripts, boot protocols and `.cargo` settings, and the x86 crate's configuration
//! (host target, static relocation model) would not carry over; sharing by path keeps both
//! builds plain.
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod boot;
mod checks;
mod console;
#[path = "../../src/device_check.rs"]
mod device_check;
mod domain;
#[path = "../../src/edu.rs"]
mod edu;
mod exit;
#[path = "../../src/frames.rs"]
mod frames;
#[path = "../../src/heap.rs"]
mod heap;
#[path = "../../src/pci.rs"]
mod pci;
mod pci_access;
#[path = "../../src/platform.rs"]
mod platform;

use core::panic::PanicInfo;

#[global_allocator]
static ALLOC: heap::KernelHeap = heap::KernelHeap;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("FAIL - kernel panic: {info}");
    exit::exit(exit::FAIL)
}

/// Called by `_start` (boot.rs) with the stack set, FP/SIMD on, .bss zeroed and the MMU on.
#[unsafe(no_mangle)]
pub extern "C" fn kmain() -> ! {
    println!("busdma-qemu-aarch64: booted");
    let failed = checks::run();
    if failed == 0 {
        println!("busdma-qemu: all checks passed");
        exit::exit(exit::PASS)
    } else {
        println!("busdma-qemu: {failed} check(s) failed");
        exit::exit(exit::FAIL)
    }
}
