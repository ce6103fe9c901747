//! Both test kernels' implementation of `busdma::Platform` (the aarch64 one includes this
//! file by path): identity-mapped RAM, frames from [`crate::frames`], MMIO by volatile access,
//! one CPU that is never preempted (interrupts stay off). What differs by architecture (which
//! RAM, cache maintenance, barriers, the clock) is each kernel's `arch` module.

use busdma::platform::{MemAttr, PageRequest, Placement};
use busdma::{Error, KernVa, PAGE_SIZE, PhysAddr, Platform, Result, TablePage};

pub use crate::arch::is_ram;
use crate::{arch, frames};

fn check_ram(pa: PhysAddr, len: u64) -> Result<()> {
    if is_ram(pa.raw(), len) {
        Ok(())
    } else {
        Err(Error::OutOfRange { addr: pa.raw(), limit: pa.raw().saturating_add(len) })
    }
}

/// The platform of the test kernel.
pub struct KernelPlatform;

// SAFETY: each kernel identity-maps all RAM `arch::is_ram` reports (its boot.rs), so every
// `phys_to_kva`/`kva_to_phys` answer (given only for RAM) and every quick map (the identity)
// maps exactly the page asked; `is_ram` answers the RAM the frame allocator serves from; table
// pages are fresh zeroed frames owned until freed; there is one CPU with interrupts always off,
// so nothing else ever runs on it and `num_cpus` is 1 for good.
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
        let pa = frames::alloc(1, PAGE_SIZE, None)?;
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
            (_, MemAttr::Uncached) => {
                Err(Error::Unsupported { what: "uncached memory (the kernel maps RAM write-back only)" })
            }
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
        // One CPU, interrupts always off: nothing can preempt.
        0
    }

    fn preempt_enable(&self, _cpu: usize) {}

    fn monotonic_ns(&self) -> u64 {
        arch::now_ns()
    }

    fn cache_clean(&self, kva: KernVa, len: u64) {
        arch::cache_clean(kva, len);
    }

    fn cache_invalidate(&self, kva: KernVa, len: u64) {
        arch::cache_invalidate(kva, len);
    }

    fn cache_clean_invalidate(&self, kva: KernVa, len: u64) {
        arch::cache_clean_invalidate(kva, len);
    }

    fn dma_wmb(&self) {
        arch::dma_wmb();
    }

    fn dma_rmb(&self) {
        arch::dma_rmb();
    }

    unsafe fn mmio_read32(&self, pa: PhysAddr) -> u32 {
        // SAFETY: the caller owns the register; each kernel identity-maps its machine's MMIO
        // as uncached device memory (boot.rs: above 3 GiB on q35, below 1 GiB on virt).
        unsafe { core::ptr::read_volatile(pa.raw() as *const u32) }
    }

    unsafe fn mmio_write32(&self, pa: PhysAddr, value: u32) {
        // SAFETY: as in mmio_read32.
        unsafe { core::ptr::write_volatile(pa.raw() as *mut u32, value) }
    }

    unsafe fn mmio_read64(&self, pa: PhysAddr) -> u64 {
        // SAFETY: as in mmio_read32 (8-byte aligned per the contract).
        unsafe { core::ptr::read_volatile(pa.raw() as *const u64) }
    }

    unsafe fn mmio_write64(&self, pa: PhysAddr, value: u64) {
        // SAFETY: as in mmio_read32.
        unsafe { core::ptr::write_volatile(pa.raw() as *mut u64, value) }
    }

    unsafe fn mmio_read8(&self, pa: PhysAddr) -> u8 {
        // SAFETY: as in mmio_read32 (a byte register: virtio's device status).
        unsafe { core::ptr::read_volatile(pa.raw() as *const u8) }
    }

    unsafe fn mmio_write8(&self, pa: PhysAddr, value: u8) {
        // SAFETY: as in mmio_read32.
        unsafe { core::ptr::write_volatile(pa.raw() as *mut u8, value) }
    }

    unsafe fn mmio_read16(&self, pa: PhysAddr) -> u16 {
        // SAFETY: as in mmio_read32 (2-aligned per the contract).
        unsafe { core::ptr::read_volatile(pa.raw() as *const u16) }
    }

    unsafe fn mmio_write16(&self, pa: PhysAddr, value: u16) {
        // SAFETY: as in mmio_read32.
        unsafe { core::ptr::write_volatile(pa.raw() as *mut u16, value) }
    }

    unsafe fn quick_map(&self, _cpu: usize, _slot: usize, pa: PhysAddr) -> KernVa {
        // Every page of RAM is permanently mapped at KVA == PA: a quick map is the identity.
        KernVa::new(pa.raw())
    }

    unsafe fn quick_unmap(&self, _cpu: usize, _slot: usize) {}
}

/// The one platform instance.
pub static PLATFORM: KernelPlatform = KernelPlatform;
