//! busdma's bare-metal test kernel: boots under QEMU q35 (PVH), finds the VT-d unit and two
//! `edu` devices, and proves busdma's VT-d driver against QEMU's intel-iommu by making the
//! devices DMA through it. Each check prints `ok - NAME` or `FAIL - NAME: why`; the kernel
//! exits through `isa-debug-exit` with [`exit::PASS`] only if every check passed.
//!
//! Kernel command line (`-append`): `inval=queued|register|auto` chooses the VT-d
//! invalidation method (auto = queued when ECAP.QI offers it); `iommu=virtio` runs the
//! virtio-iommu checks (`viommu.rs`) instead of the VT-d ones; `virtio=on` adds the virtio-drivers
//! checks (`virtio_check.rs` behind VT-d, `viommu_virtio.rs` behind virtio-iommu).
#![no_std]
#![no_main]

extern crate alloc;

mod arch;
mod boot;
mod checks;
mod console;
mod device_check;
mod domain;
mod e1000_check;
mod edu;
mod exit;
mod frames;
mod heap;
mod hpet;
mod mem;
mod nvme_check;
mod pci;
mod pci_access;
mod platform;
mod port;
mod start_info;
mod viommu;
mod viommu_virtio;
mod virtio_check;

use core::panic::PanicInfo;

#[global_allocator]
static ALLOC: heap::KernelHeap = heap::KernelHeap;

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    println!("FAIL - kernel panic: {info}");
    exit::exit(exit::FAIL)
}

/// Called by the boot trampoline in long mode with the PVH `hvm_start_info` address.
#[unsafe(no_mangle)]
pub extern "C" fn kmain(start_info: u32) -> ! {
    console::init();
    println!("busdma-qemu: booted");
    let info = match start_info::parse(u64::from(start_info)) {
        Ok(info) => info,
        Err(why) => {
            println!("FAIL - boot: {why}");
            exit::exit(exit::FAIL)
        }
    };
    if let Err(why) = hpet::init() {
        println!("FAIL - boot: {why}");
        exit::exit(exit::FAIL)
    }
    let failed = checks::run(&info);
    if failed == 0 {
        println!("busdma-qemu: all checks passed");
        exit::exit(exit::PASS)
    } else {
        println!("busdma-qemu: {failed} check(s) failed");
        exit::exit(exit::FAIL)
    }
}
