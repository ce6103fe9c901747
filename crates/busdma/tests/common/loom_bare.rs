//! The platform of the loom models: `CPUS` CPUs with nothing behind them (the models exercise
//! lock-free state, not memory). Each loom thread runs on the CPU it sets in [`CPU`] (0 until
//! it does).
#![allow(dead_code)]

use std::cell::Cell;

use busdma::{Error, KernVa, PAGE_SIZE, PageRequest, PhysAddr, Platform, TablePage};

loom::thread_local! {
    /// The CPU the current loom thread runs on.
    pub static CPU: Cell<usize> = Cell::new(0);
}

/// `CPUS` CPUs and no memory.
pub struct Bare<const CPUS: usize>;

// SAFETY: nothing is RAM (`is_ram` is always false) and no table page or page is ever handed
// out, so busdma never quick-maps, copies or walks through this platform. Per-CPU rule: a
// thread is on the CPU it set in `CPU`; a model whose threads share a CPU says why the code it
// models keeps no per-CPU state there (loom_defer), the others give each thread its own
// (loom_iova_owner). A test double, not a platform to copy.
unsafe impl<const CPUS: usize> Platform for Bare<CPUS> {
    fn read_phys(&self, _: PhysAddr, _: &mut [u8]) -> busdma::Result<()> {
        Ok(())
    }
    fn write_phys(&self, _: PhysAddr, _: &[u8]) -> busdma::Result<()> {
        Ok(())
    }
    fn fill_phys(&self, _: PhysAddr, _: u64, _: u8) -> busdma::Result<()> {
        Ok(())
    }
    fn alloc_table_page(&self) -> busdma::Result<TablePage> {
        Err(Error::NoMemory { requested: PAGE_SIZE })
    }
    unsafe fn free_table_page(&self, _: TablePage) {}
    fn alloc_pages(&self, req: &PageRequest) -> busdma::Result<PhysAddr> {
        Err(Error::NoMemory { requested: req.pages * PAGE_SIZE })
    }
    unsafe fn free_pages(&self, _: PhysAddr, _: u64) {}
    fn is_ram(&self, _: PhysAddr, _: u64) -> bool {
        false
    }
    fn phys_to_kva(&self, _: PhysAddr) -> Option<KernVa> {
        None
    }
    fn kva_to_phys(&self, _: KernVa) -> Option<PhysAddr> {
        None
    }
    fn num_cpus(&self) -> usize {
        CPUS
    }
    fn preempt_disable(&self) -> usize {
        CPU.with(|c| c.get())
    }
    fn preempt_enable(&self, _: usize) {}
    fn monotonic_ns(&self) -> u64 {
        0
    }
    fn cache_clean(&self, _: KernVa, _: u64) {}
    fn cache_invalidate(&self, _: KernVa, _: u64) {}
    fn cache_clean_invalidate(&self, _: KernVa, _: u64) {}
    unsafe fn mmio_read32(&self, _: PhysAddr) -> u32 {
        0
    }
    unsafe fn mmio_write32(&self, _: PhysAddr, _: u32) {}
    unsafe fn mmio_read64(&self, _: PhysAddr) -> u64 {
        0
    }
    unsafe fn mmio_write64(&self, _: PhysAddr, _: u64) {}
    unsafe fn quick_map(&self, _: usize, _: usize, _: PhysAddr) -> KernVa {
        KernVa::new(0)
    }
    unsafe fn quick_unmap(&self, _: usize, _: usize) {}
}
