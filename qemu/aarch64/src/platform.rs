//! The aarch64 kernel's `busdma::Platform`: identity-mapped RAM (KVA == PA) from
//! [`crate::frames`], MMIO by volatile access (device memory, boot.rs), cache maintenance by
//! `dc` to the point of coherency, the generic timer as the clock, one CPU never preempted.

use core::arch::asm;

use busdma::platform::{MemAttr, PageRequest, Placement};
use busdma::{Error, KernVa, PhysAddr, Platform, Result, TablePage};

use crate::frames;

/// RAM of `virt` with the runner's `-m 512M`: [1 GiB, 1.5 GiB).
const RAM: (u64, u64) = (0x4000_0000, 0x6000_0000);

/// Whether `[start, start + len)` is RAM.
pub fn is_ram(start: u64, len: u64) -> bool {
    start.checked_add(len).is_some_and(|end| RAM.0 <= start && end <= RAM.1)
}

fn check_ram(pa: PhysAddr, len: u64) -> Result<()> {
    if is_ram(pa.raw(), len) {
        Ok(())
    } else {
        Err(Error::OutOfRange { addr: pa.raw(), limit: pa.raw().saturating_add(len) })
    }
}

/// The smallest data cache line (CTR_EL0.DminLine, words as log2).
fn line() -> u64 {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effect.
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    4 << ((ctr >> 16) & 0xf)
}

macro_rules! dc_range {
    ($op:literal, $kva:expr, $len:expr) => {{
        let l = line();
        let mut a = $kva.raw() & !(l - 1);
        let end = $kva.raw().saturating_add($len);
        while a < end {
            // SAFETY: cache maintenance by VA on identity-mapped RAM the caller owns; it
            // changes no data the caller did not ask to write back or discard.
            unsafe { asm!(concat!("dc ", $op, ", {}"), in(reg) a, options(nostack, preserves_flags)) };
            a += l;
        }
        // SAFETY: a barrier; completes the maintenance before what follows.
        unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
    }};
}

/// The platform of the test kernel.
pub struct KernelPlatform;

// SAFETY: all RAM is identity-mapped (boot.rs), so `phys_to_kva`/`kva_to_phys` (answered only
// for RAM) and quick maps (the identity) map exactly the page asked; `is_ram` answers the
// RAM the frame allocator serves from; table pages are fresh zeroed frames owned until freed;
// one CPU with interrupts masked, so `num_cpus` is 1 and nothing preempts.
unsafe impl Platform for KernelPlatform {
    fn read_phys(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<()> {
        check_ram(pa, buf.len() as u64)?;
        // SAFETY: the range is RAM, identity-mapped; copying out does not alias `buf`.
        unsafe { core::ptr::copy_nonoverlapping(pa.raw() as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write_phys(&self, pa: PhysAddr, data: &[u8]) -> Result<()> {
        check_ram(pa, data.len() as u64)?;
        // SAFETY: as in read_phys.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), pa.raw() as *mut u8, data.len()) };
        Ok(())
    }

    fn fill_phys(&self, pa: PhysAddr, len: u64, byte: u8) -> Result<()> {
        check_ram(pa, len)?;
        // SAFETY: as in read_phys.
        unsafe { core::ptr::write_bytes(pa.raw() as *mut u8, byte, len as usize) };
        Ok(())
    }

    fn alloc_table_page(&self) -> Result<TablePage> {
        let pa = frames::alloc(1, busdma::PAGE_SIZE, None)?;
        // SAFETY: a fresh, zeroed, page-aligned frame, identity-mapped, ours until freed.
        Ok(unsafe { TablePage::new(pa, KernVa::new(pa.raw())) })
    }

    unsafe fn free_table_page(&self, page: TablePage) {
        if let Err(e) = frames::free(page.pa(), 1) {
            panic!("free_table_page({:#x}): {e}", page.pa().raw());
        }
    }

    fn alloc_pages(&self, req: &PageRequest) -> Result<PhysAddr> {
        match (req.placement, req.attr) {
            (Placement::NotDirectMapped, _) => {
                Err(Error::Unsupported { what: "memory outside the direct map (the kernel maps all RAM)" })
            }
            (_, MemAttr::Uncached) => Err(Error::Unsupported { what: "uncached memory" }),
            _ => frames::alloc(req.pages, req.align, req.below.map(|b| b.raw())),
        }
    }

    unsafe fn free_pages(&self, pa: PhysAddr, pages: u64) {
        if let Err(e) = frames::free(pa, pages) {
            panic!("free_pages({:#x}, {pages}): {e}", pa.raw());
        }
    }

    fn is_ram(&self, pa: PhysAddr, len: u64) -> bool {
        is_ram(pa.raw(), len.max(1))
    }

    fn phys_to_kva(&self, pa: PhysAddr) -> Option<KernVa> {
        is_ram(pa.raw(), 1).then(|| KernVa::new(pa.raw()))
    }

    fn kva_to_phys(&self, kva: KernVa) -> Option<PhysAddr> {
        is_ram(kva.raw(), 1).then(|| PhysAddr::new(kva.raw()))
    }

    fn num_cpus(&self) -> usize {
        1
    }

    fn preempt_disable(&self) -> usize {
        0
    }

    fn preempt_enable(&self, _cpu: usize) {}

    fn monotonic_ns(&self) -> u64 {
        let (cnt, frq): (u64, u64);
        // SAFETY: reading the generic timer's counter and frequency has no side effect.
        unsafe {
            asm!("isb", "mrs {c}, cntvct_el0", "mrs {f}, cntfrq_el0", c = out(reg) cnt, f = out(reg) frq,
                 options(nomem, nostack, preserves_flags))
        };
        ((u128::from(cnt) * 1_000_000_000) / u128::from(frq.max(1))) as u64
    }

    fn cache_clean(&self, kva: KernVa, len: u64) {
        dc_range!("cvac", kva, len);
    }

    fn cache_invalidate(&self, kva: KernVa, len: u64) {
        // `dc ivac` would drop dirty lines the caller may share a line with: clean+invalidate
        // is what the contract allows too.
        dc_range!("civac", kva, len);
    }

    fn cache_clean_invalidate(&self, kva: KernVa, len: u64) {
        dc_range!("civac", kva, len);
    }

    fn dma_wmb(&self) {
        // SAFETY: a barrier: earlier stores are observable by devices before later ones.
        unsafe { asm!("dsb st", options(nostack, preserves_flags)) };
    }

    fn dma_rmb(&self) {
        // SAFETY: a barrier for earlier loads.
        unsafe { asm!("dsb ld", options(nostack, preserves_flags)) };
    }

    unsafe fn mmio_read32(&self, pa: PhysAddr) -> u32 {
        // SAFETY: the caller owns the register; MMIO below 1 GiB is identity-mapped device
        // memory (boot.rs).
        unsafe { core::ptr::read_volatile(pa.raw() as *const u32) }
    }

    unsafe fn mmio_write32(&self, pa: PhysAddr, value: u32) {
        // SAFETY: as in mmio_read32.
        unsafe { core::ptr::write_volatile(pa.raw() as *mut u32, value) }
    }

    unsafe fn mmio_read64(&self, pa: PhysAddr) -> u64 {
        // SAFETY: as in mmio_read32, 8-aligned per the contract.
        unsafe { core::ptr::read_volatile(pa.raw() as *const u64) }
    }

    unsafe fn mmio_write64(&self, pa: PhysAddr, value: u64) {
        // SAFETY: as in mmio_read32.
        unsafe { core::ptr::write_volatile(pa.raw() as *mut u64, value) }
    }

    unsafe fn quick_map(&self, _cpu: usize, _slot: usize, pa: PhysAddr) -> KernVa {
        KernVa::new(pa.raw())
    }

    unsafe fn quick_unmap(&self, _cpu: usize, _slot: usize) {}
}

/// The one platform instance.
pub static PLATFORM: KernelPlatform = KernelPlatform;
