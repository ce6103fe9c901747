//! The lab's standard IOMMU domain, shared by `tcpbench`, `bench map` and `soak`: a VT-d
//! second-level table (4 levels, 48-bit IOVA, coherent walker) on a model IOMMU, a device
//! attached to it, IOVA from 1 MiB to 1 TiB.

use busdma::iommu::{Domain, DomainConfig, DomainId, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig, IovaSource};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::{AddrRange, Iova, Platform};
use busdma_model::{Context, HostPlatform, ModelIommu, TableFormat};

/// The domain every lab command measures.
pub type VtdDomain<'a, I> = Domain<'a, HostPlatform, VtdSl, I, ModelIommu<'a>>;

/// IOVA space of every domain: 1 MiB to 1 TiB (the low megabyte stays unmapped, as a guard
/// against devices emitting small garbage addresses).
pub fn iova_space() -> Result<AddrRange<Iova>, String> {
    AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 40)).map_err(|e| e.to_string())
}

/// busdma's IOVA allocator over [`iova_space`] for every CPU of `m`, guard pages off.
pub fn iova_allocator(m: &HostPlatform, caches: bool) -> Result<IovaAllocator, String> {
    IovaAllocator::new(iova_space()?, IovaConfig { cpus: m.num_cpus(), caches, guard_page: false })
        .map_err(|e| format!("IOVA allocator: {e}"))
}

/// A VT-d 48-bit domain `id` with tables from `pool` and IOVA from `iova`, `device` attached to
/// it on `iommu`.
///
/// # Safety
///
/// `device` must be detached from `iommu` before the returned domain is dropped, or issue no
/// DMA once it is dropped and never be attached again on `iommu` (the lab's benches: each
/// drives its device itself and drops the IOMMU with the domain): the contract of
/// `ModelIommu::attach` (issue 14, hole 8).
#[allow(clippy::too_many_arguments)]
pub unsafe fn vtd_domain<'a, I: IovaSource>(
    m: &'a HostPlatform,
    iommu: &'a ModelIommu<'a>,
    pool: &'a TablePool<'a, HostPlatform>,
    device: u32,
    id: DomainId,
    policy: InvalidationPolicy,
    iova: I,
) -> Result<VtdDomain<'a, I>, String> {
    let e = |e: busdma::Error| format!("cannot build the domain: {e}");
    let pt = PageTable::<_, VtdSl>::new(pool, PageTableConfig { input_bits: 48, coherent_walker: true })
        .map_err(e)?;
    let root = pt.root();
    let d = Domain::new(m, pt, iova, iommu, DomainConfig { id, policy, untrusted: false }).map_err(e)?;
    // SAFETY: the tables at `root` are `d`'s, returned to the caller, who keeps them alive
    // until `device` is detached or issues no more DMA (this function's contract).
    unsafe { iommu.attach(device, Context::new(id, root, TableFormat::VtdSecondLevel, 48)) }.map_err(e)?;
    Ok(d)
}
