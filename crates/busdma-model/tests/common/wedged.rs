//! The rig of the unit-failure tests (`vtd_unit_failures.rs`, `smmuv3_unit_failures.rs`): a
//! register-level stub of a translation unit on the model machine, with a switch that makes
//! it stop answering as a wedged unit would, and the strict-domain scenario both units share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy, IotlbInvalidator};
use busdma::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use busdma::pgtable::{PageTable, Prot, PteFormat};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform};
use busdma_model::{FrameRequest, HostPlatform, MachineConfig, MmioHandler};

pub struct Rig {
    pub m: Arc<HostPlatform>,
    pub wedged: Arc<AtomicBool>,
}

/// A 2-CPU, 64 MiB machine with the stub `make` builds (from the machine's RAM and the wedge
/// switch) answering `len` bytes of MMIO at `base`.
pub fn rig(
    base: u64,
    len: u64,
    make: impl FnOnce(Weak<HostPlatform>, Arc<AtomicBool>) -> Box<dyn MmioHandler>,
) -> Rig {
    let m =
        Arc::new(HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap());
    let wedged = Arc::new(AtomicBool::new(false));
    let window = AddrRange::from_start_len(PhysAddr::new(base), len).unwrap();
    m.add_mmio(window, make(Arc::downgrade(&m), wedged.clone())).unwrap();
    Rig { m, wedged }
}

/// The one-page range the flush tests invalidate.
pub fn range() -> AddrRange<Iova> {
    AddrRange::from_start_len(Iova::new(0x10_0000), PAGE_SIZE).unwrap()
}

/// A strict domain over `hw` (attached to `pt` by the caller, as domain `id`): an unmap
/// while the unit is wedged fails with a time-out (`is_time_out`) and holds its IOVA back;
/// a map while still wedged must recover first, fails and maps nothing; once the unit
/// answers, the next map recovers, releases the held range and maps. `detach` runs before
/// the domain (and its table) is dropped.
pub fn strict_domain_holds_the_unmap_back_while_wedged<F: PteFormat, H: IotlbInvalidator>(
    rig: &Rig,
    pt: PageTable<'_, HostPlatform, F>,
    hw: &H,
    id: u16,
    is_time_out: impl Fn(&Error) -> bool,
    detach: impl FnOnce(),
) {
    let m = &*rig.m;
    let space = AddrRange::from_start_len(Iova::new(1 << 20), 1 << 28).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: 2, caches: false, guard_page: false }).unwrap();
    let d = Domain::new(m, pt, iova, hw, DomainConfig::new(id, InvalidationPolicy::Strict)).unwrap();
    let g = m.pin_cpu();
    let frame = m.alloc_frames(FrameRequest::pages(1)).unwrap();
    let r = d.alloc_iova(&g, &IovaRequest::pages(1)).unwrap();
    // SAFETY: the test owns this table's IOVA (each range mapped once) and the memory it maps.
    unsafe { d.map(&g, r.start(), frame.pa(), PAGE_SIZE, Prot::READ) }.unwrap();
    rig.wedged.store(true, Ordering::Relaxed);
    // SAFETY: as above.
    let e = unsafe { d.unmap(&g, &[r], &[r]) }.unwrap_err();
    assert!(is_time_out(&e), "{e:?}");
    assert!(d.degraded());
    assert_eq!((d.stats().held_back, d.stats().iova_released), (1, 0));
    // Still wedged: a map must recover first, fails, and maps nothing.
    let r2 = d.iova().alloc(&g, &IovaRequest::pages(1)).unwrap();
    // SAFETY: as above.
    assert!(unsafe { d.map(&g, r2.start(), frame.pa(), PAGE_SIZE, Prot::READ) }.is_err());
    assert!(d.table().leaf_of(r2.start()).is_none());
    // The unit answers: the map recovers (a whole-domain invalidation), releases, maps.
    rig.wedged.store(false, Ordering::Relaxed);
    // SAFETY: as above.
    unsafe { d.map(&g, r2.start(), frame.pa(), PAGE_SIZE, Prot::READ) }.unwrap();
    assert!(!d.degraded());
    assert_eq!((d.stats().held_back, d.stats().iova_released), (0, 1));
    // SAFETY: as above.
    unsafe { d.unmap(&g, &[r2], &[r2]) }.unwrap();
    drop(g);
    detach();
    drop(d);
}
