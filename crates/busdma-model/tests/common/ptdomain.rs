//! A strict IOMMU domain for the front-end tests, built from the real page table (VT-d
//! second level) and the real IOVA allocator (per-CPU caches on), with counters: live IOVA
//! bytes, unmap calls (one invalidation each). It has no IOTLB (clearing an entry is the
//! invalidation), so it stands in for `busdma::iommu::Domain` only in tests of the front end's
//! own properties; the tests see it through `IommuOps` alone.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use busdma::front::strategy::reserve_levels::reserve_levels;
use busdma::front::{Invalidation, IommuOps};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::pgtable::{FlushDone, Gather, PageTable, PageTableConfig, Prot, TablePool, VtdSl};
use busdma::{AddrRange, CpuGuard, Iova, PhysAddr, Platform, Result};
use busdma_model::HostPlatform;

pub struct PtDomain<'p> {
    pub m: &'p HostPlatform,
    pub pt: PageTable<'p, HostPlatform, VtdSl>,
    pub iova: IovaAllocator,
    live: AtomicU64,
    pub invalidations: AtomicU64,
    /// Map calls.
    pub maps: AtomicU64,
}

impl<'p> PtDomain<'p> {
    pub fn new(m: &'p HostPlatform, pool: &'p TablePool<'p, HostPlatform>) -> Self {
        let pt = PageTable::new(pool, PageTableConfig { input_bits: 39, coherent_walker: true }).unwrap();
        // IOVA from 1 MiB (0 is never handed out) to the table's input limit.
        let space = AddrRange::new(Iova::new(1 << 20), Iova::new(pt.input_limit())).unwrap();
        let iova =
            IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: true, guard_page: false })
                .unwrap();
        Self {
            m,
            pt,
            iova,
            live: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            maps: AtomicU64::new(0),
        }
    }
    pub fn live_iova_bytes(&self) -> u64 {
        self.live.load(Ordering::Relaxed)
    }
    /// What the device reaches at `iova` (a software walk of the very tables the hardware
    /// would walk).
    pub fn translate(&self, iova: u64) -> Option<PhysAddr> {
        self.pt.iova_to_phys(Iova::new(iova))
    }
}

// SAFETY: the test domain's allocator hands out exclusive ranges; map, unmap and the waits
// act on its page table, which has no IOTLB (clearing an entry is its invalidation).
unsafe impl IommuOps<HostPlatform> for &PtDomain<'_> {
    type Ticket = ();

    fn invalidation(&self) -> Invalidation {
        Invalidation::Strict
    }

    fn max_iova(&self) -> u64 {
        self.pt.input_limit() - 1
    }

    fn alloc_iova(
        &self,
        g: &CpuGuard<'_, HostPlatform>,
        size: u64,
        align: u64,
        limit: u64,
    ) -> Result<AddrRange<Iova>> {
        let req = IovaRequest { size, align, boundary: 0, limit: Iova::new(limit.saturating_add(1)) };
        let r = self.iova.alloc(g, &req)?;
        self.live.fetch_add(size, Ordering::Relaxed);
        Ok(r)
    }

    unsafe fn free_iova(&self, g: &CpuGuard<'_, HostPlatform>, range: AddrRange<Iova>) {
        self.iova.free(g, range).expect("free of IOVA as allocated");
        self.live.fetch_sub(range.len(), Ordering::Relaxed);
    }

    unsafe fn map(
        &self,
        g: &CpuGuard<'_, HostPlatform>,
        iova: Iova,
        pa: PhysAddr,
        len: u64,
        prot: Prot,
    ) -> Result<()> {
        self.maps.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the front end passes IOVA it allocated here and memory its load holds.
        unsafe { self.pt.map(g, iova, pa, len, prot) }
    }

    unsafe fn unmap(
        &self,
        g: &CpuGuard<'_, HostPlatform>,
        mapped: &[AddrRange<Iova>],
        free: &[AddrRange<Iova>],
    ) -> Result<()> {
        let mut gather = Gather::default();
        for r in mapped {
            // SAFETY: the front end passes IOVA it allocated here and memory its load holds.
            unsafe { self.pt.unmap(g, *r, &mut gather) }?;
        }
        self.invalidations.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = gather.range() {
            // SAFETY: this domain has no IOTLB: clearing the entries is the invalidation.
            let proof = unsafe { FlushDone::for_range(r) };
            gather.release_after_flush(proof, self.pt.pool(), g).unwrap();
        }
        for r in free {
            // SAFETY: the caller gives these ranges up (this method's contract), now unmapped.
            unsafe { self.free_iova(g, *r) };
        }
        Ok(())
    }

    fn ensure_flushed(&self, _g: &CpuGuard<'_, HostPlatform>, _ticket: ()) -> Result<()> {
        Ok(())
    }

    fn wait_unmapped(&self, _g: &CpuGuard<'_, HostPlatform>) -> Result<()> {
        // No IOTLB: an unmap is complete when it returns.
        Ok(())
    }

    unsafe fn reserve_tables(&self, g: &CpuGuard<'_, HostPlatform>, range: AddrRange<Iova>) -> Result<()> {
        // SAFETY: the front end passes IOVA it allocated here and memory its load holds.
        unsafe { reserve_levels(&self.pt, g, range) }
    }
}

/// What the device reads at `iova`: a walk of the domain's tables, page by page.
pub fn dev_read(m: &HostPlatform, d: &PtDomain<'_>, iova: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    let mut done = 0;
    while done < len {
        let at = iova + done;
        let n = (busdma::PAGE_SIZE - at % busdma::PAGE_SIZE).min(len - done);
        let pa = d.translate(at).unwrap_or_else(|| panic!("device read of unmapped IOVA {at:#x}"));
        m.read_phys(pa, &mut out[done as usize..(done + n) as usize]).unwrap();
        done += n;
    }
    out
}

/// What the device writes at `iova` lands through the domain's tables, page by page.
pub fn dev_write(m: &HostPlatform, d: &PtDomain<'_>, iova: u64, data: &[u8]) {
    let mut done = 0u64;
    while done < data.len() as u64 {
        let at = iova + done;
        let n = (busdma::PAGE_SIZE - at % busdma::PAGE_SIZE).min(data.len() as u64 - done);
        let pa = d.translate(at).unwrap_or_else(|| panic!("device write of unmapped IOVA {at:#x}"));
        m.write_phys(pa, &data[done as usize..(done + n) as usize]).unwrap();
        done += n;
    }
}
