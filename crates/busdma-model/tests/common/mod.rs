//! Shared helpers of the front-end tests.
#![allow(dead_code)]

use std::sync::Mutex;

use busdma::{CpuGuard, KernVa, PageRequest, PhysAddr, Platform, Result, TablePage};
use busdma_model::{HostPlatform, MachineConfig};

/// A machine with 64 MiB of RAM whose upper half is outside the direct map.
pub fn machine() -> HostPlatform {
    HostPlatform::new(MachineConfig::with_ram(64 << 20).upper_half_not_direct_mapped()).unwrap()
}

/// Cache maintenance calls as the front end made them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOp {
    Clean(u64, u64),
    Invalidate(u64, u64),
    CleanInvalidate(u64, u64),
}

/// The host platform, recording the cache maintenance it is asked for (everything else is the
/// host's own behaviour).
pub struct Recording<'a> {
    pub host: &'a HostPlatform,
    pub ops: Mutex<Vec<CacheOp>>,
}

impl<'a> Recording<'a> {
    pub fn new(host: &'a HostPlatform) -> Self {
        Self { host, ops: Mutex::new(Vec::new()) }
    }
    pub fn take(&self) -> Vec<CacheOp> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

// SAFETY: every answer busdma trusts is forwarded unchanged from the `HostPlatform` behind it
// (whose impl states why they hold); only cache maintenance is observed, which busdma's soundness
// does not rest on.
unsafe impl Platform for Recording<'_> {
    fn read_phys(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<()> {
        self.host.read_phys(pa, buf)
    }
    fn write_phys(&self, pa: PhysAddr, data: &[u8]) -> Result<()> {
        self.host.write_phys(pa, data)
    }
    fn fill_phys(&self, pa: PhysAddr, len: u64, byte: u8) -> Result<()> {
        self.host.fill_phys(pa, len, byte)
    }
    fn alloc_table_page(&self) -> Result<TablePage> {
        self.host.alloc_table_page()
    }
    unsafe fn free_table_page(&self, page: TablePage) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.host.free_table_page(page) }
    }
    fn alloc_pages(&self, req: &PageRequest) -> Result<PhysAddr> {
        self.host.alloc_pages(req)
    }
    unsafe fn free_pages(&self, pa: PhysAddr, pages: u64) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.host.free_pages(pa, pages) }
    }
    fn is_ram(&self, pa: PhysAddr, len: u64) -> bool {
        self.host.is_ram(pa, len)
    }
    fn phys_to_kva(&self, pa: PhysAddr) -> Option<KernVa> {
        self.host.phys_to_kva(pa)
    }
    fn kva_to_phys(&self, kva: KernVa) -> Option<PhysAddr> {
        self.host.kva_to_phys(kva)
    }
    fn num_cpus(&self) -> usize {
        self.host.num_cpus()
    }
    fn monotonic_ns(&self) -> u64 {
        self.host.monotonic_ns()
    }
    fn preempt_disable(&self) -> usize {
        self.host.preempt_disable()
    }
    fn preempt_enable(&self, cpu: usize) {
        self.host.preempt_enable(cpu)
    }
    fn cache_clean(&self, kva: KernVa, len: u64) {
        self.ops.lock().unwrap().push(CacheOp::Clean(kva.raw(), len));
    }
    fn cache_invalidate(&self, kva: KernVa, len: u64) {
        self.ops.lock().unwrap().push(CacheOp::Invalidate(kva.raw(), len));
    }
    fn cache_clean_invalidate(&self, kva: KernVa, len: u64) {
        self.ops.lock().unwrap().push(CacheOp::CleanInvalidate(kva.raw(), len));
    }
    unsafe fn mmio_read32(&self, pa: PhysAddr) -> u32 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.host.mmio_read32(pa) }
    }
    unsafe fn mmio_write32(&self, pa: PhysAddr, value: u32) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.host.mmio_write32(pa, value) }
    }
    unsafe fn mmio_read64(&self, pa: PhysAddr) -> u64 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.host.mmio_read64(pa) }
    }
    unsafe fn mmio_write64(&self, pa: PhysAddr, value: u64) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.host.mmio_write64(pa, value) }
    }
    unsafe fn quick_map(&self, cpu: usize, slot: usize, pa: PhysAddr) -> KernVa {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.host.quick_map(cpu, slot, pa) }
    }
    unsafe fn quick_unmap(&self, cpu: usize, slot: usize) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { self.host.quick_unmap(cpu, slot) }
    }
}

/// Keeps `CpuGuard` in scope for helpers that need it.
pub type Guard<'a> = CpuGuard<'a, HostPlatform>;

pub mod ptdomain;
/// The request-level virtio-iommu model (the library's, shared with the examples).
#[allow(unused_imports)]
pub use busdma_model::viommu;
pub mod wedged;
