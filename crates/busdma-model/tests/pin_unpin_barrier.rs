//! The unpin barrier (`busdma::pin`, theory 7): a registered buffer loaded through a domain
//! with DEFERRED IOTLB invalidation. Its unload only queues the unmap, so the IOTLB may still
//! translate to its pages; the registry must not unpin them (give them back to the system)
//! before that translation is gone, yet the unload itself must not pay a flush.
//!
//! The probe: a pin backend that, at the moment the registry unpins a page, has the device
//! read the buffer's old bus address through the model IOMMU (whose IOTLB keeps what the
//! device used). With the domain as barrier the read faults; with a barrier that waits for
//! nothing it reaches the page being given back: the hole the barrier closes.

use std::cell::Cell;

use busdma::front::{Direction, DmaMap, IommuPerMap, IommuReserved, Strategy, Tag, TagSpec, load_registered};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::pin::{PinBackend, Registry, UnpinBarrier};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform, Result, UserVa};
use busdma_model::uspace::UserSpace;
use busdma_model::{
    Context, DmaPort, HostPlatform, IommuConfig, IommuPort, MachineConfig, ModelIommu, TableFormat,
};

type Dom<'m> = Domain<'m, HostPlatform, VtdSl, IovaAllocator, ModelIommu<'m>>;

const DEV: u32 = 0x42;
const UA: UserVa = UserVa::new(0x7e00_0000_0000);
const PAGES: u64 = 4;

fn domain<'m>(
    m: &'m HostPlatform,
    pool: &'m TablePool<'m, HostPlatform>,
    iommu: &'m ModelIommu<'m>,
    policy: InvalidationPolicy,
    dev: u32,
) -> Dom<'m> {
    let table = PageTable::new(pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    let space = AddrRange::new(Iova::new(PAGE_SIZE), Iova::new(1 << 48)).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: true, guard_page: false })
        .unwrap();
    let d = Domain::new(m, table, iova, iommu, DomainConfig { id: dev as u16, policy, untrusted: false })
        .unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(dev, Context::new(dev as u16, d.table().root(), TableFormat::VtdSecondLevel, 48)) }
        .unwrap();
    d
}

/// Pins through the model's user space; at each unpin, has the device read the old bus
/// addresses of the pages being given back and counts the reads that got through.
struct Probing<'a, 'm> {
    us: &'a UserSpace<'m>,
    port: IommuPort<'a, 'm>,
    bus: Cell<Option<(u64, u64)>>,
    reached_at_unpin: Cell<u64>,
    unpins: Cell<u64>,
}

impl PinBackend for Probing<'_, '_> {
    fn pin(&self, ua: UserVa, out: &mut [PhysAddr]) -> Result<()> {
        self.us.pin(ua, out)
    }

    fn unpin(&self, ua: UserVa, hpas: &[PhysAddr]) {
        if let Some((bus, len)) = self.bus.get() {
            for off in (0..len).step_by(PAGE_SIZE as usize) {
                let mut b = [0u8; 8];
                if self.port.dma_read(Iova::new(bus + off), &mut b).is_ok() {
                    self.reached_at_unpin.set(self.reached_at_unpin.get() + 1);
                }
            }
        }
        self.unpins.set(self.unpins.get() + 1);
        self.us.unpin(ua, hpas)
    }
}

/// Declares, in the caller's scope: `$m` a 2-CPU machine with a frozen clock (no age-bound
/// flush: only the count bound, 256, could flush), `$iommu` its model IOMMU, `$dom` a deferred
/// domain for `DEV` and `$tag` a tag over it, `$us` a user space with the buffer mapped, and
/// `$probe` the probing pin backend over it.
macro_rules! deferred_rig {
    ($m:ident, $iommu:ident, $dom:ident, $tag:ident, $us:ident, $probe:ident) => {
        let $m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap();
        $m.freeze_clock();
        let $iommu = ModelIommu::new(&$m, IommuConfig::default()).unwrap();
        let pool = TablePool::new(&$m);
        let $dom = domain(&$m, &pool, &$iommu, InvalidationPolicy::deferred(), DEV);
        let $tag = Tag::new_root(&$m, IommuPerMap(&$dom), TagSpec::new(64 << 10, 16)).unwrap();
        let $us = UserSpace::new(&$m);
        $us.map(UA, PAGES * PAGE_SIZE).unwrap();
        let $probe = Probing {
            us: &$us,
            port: $iommu.port(DEV),
            bus: Cell::new(None),
            reached_at_unpin: Cell::new(0),
            unpins: Cell::new(0),
        };
    };
}

/// A barrier that waits for nothing, yet claims to be one (so the front end lets deferred
/// loads through): the registry as it was before the unpin barrier existed.
struct WaitsForNothing;

impl UnpinBarrier for WaitsForNothing {
    fn wait_unmapped(&self) -> Result<()> {
        Ok(())
    }
}

/// What one registered load's life showed.
#[derive(Debug)]
struct Seen {
    /// Device reads of the old bus address that reached a page while it was being unpinned.
    reached_at_unpin: u64,
    /// Whole-domain flushes issued by the loads and unloads (before unregistering).
    flushes_by_io: u64,
    /// Unmaps still queued when the registration was dropped.
    queued_at_unregister: usize,
    /// Unpin barriers the registry called.
    barriers: u64,
}

/// Registers, loads `loads` times through a deferred domain (the device reading every load,
/// so the IOTLB holds its translation), unloads, unregisters. The registry's barrier is the
/// tag if `barrier`, else [`WaitsForNothing`].
fn registered_life(loads: u64, barrier: bool) -> Seen {
    deferred_rig!(m, iommu, dom, tag, us, probe);
    let lax = WaitsForNothing;
    let barrier: &dyn UnpinBarrier = if barrier { &tag } else { &lax };
    let reg = Registry::with_barrier(&probe, u64::MAX, barrier).unwrap();
    reg.register(UA, PAGES * PAGE_SIZE).unwrap();
    let mut map = tag.create_map().unwrap();
    let flushes = dom.stats().flushes;
    for _ in 0..loads {
        let load = load_registered(&mut map, &reg, UA, PAGES * PAGE_SIZE, Direction::Bidirectional).unwrap();
        let seg = load.segments()[0];
        assert_eq!(seg.len, PAGES * PAGE_SIZE, "one IOVA window for the buffer");
        // The device uses the buffer: the IOTLB now holds its translations.
        let mut b = [0u8; 8];
        for off in (0..seg.len).step_by(PAGE_SIZE as usize) {
            probe.port.dma_read(Iova::new(seg.addr.raw() + off), &mut b).unwrap();
        }
        probe.bus.set(Some((seg.addr.raw(), seg.len)));
        load.unload().unwrap();
    }
    let seen_flushes = dom.stats().flushes - flushes;
    let queued = dom.pending();
    reg.unregister(UA, PAGES * PAGE_SIZE).unwrap();
    reg.synchronize().unwrap();
    assert_eq!(probe.unpins.get(), 1);
    assert_eq!(us.pinned_pages(), 0);
    let barriers = reg.stats().unpin_barriers;
    Seen {
        reached_at_unpin: probe.reached_at_unpin.get(),
        flushes_by_io: seen_flushes,
        queued_at_unregister: queued,
        barriers,
    }
}

#[test]
fn a_registered_page_is_unpinned_only_after_its_deferred_unmap_left_the_iotlb() {
    let with = registered_life(3, true);
    assert_eq!(with.reached_at_unpin, 0, "{with:?}");
    assert_eq!(with.barriers, 1, "{with:?}");
}

#[test]
fn without_the_barrier_a_device_reaches_pages_as_they_are_unpinned() {
    // The control: the model sees the hole the barrier closes (the escape attack class 6
    // reported in deferred mode before the barrier existed).
    let without = registered_life(3, false);
    assert_eq!(without.reached_at_unpin, PAGES, "{without:?}");
}

#[test]
fn a_registered_unload_under_deferred_invalidation_issues_no_flush() {
    // The hot path stays deferred: 20 loads and unloads, not one flush; they wait queued
    // until the registration is dropped.
    let s = registered_life(20, true);
    assert_eq!(s.flushes_by_io, 0, "{s:?}");
    assert_eq!(s.queued_at_unregister, 20, "{s:?}");
    assert_eq!(s.reached_at_unpin, 0, "{s:?}");
}

#[test]
fn a_registry_without_a_barrier_refuses_deferred_registered_loads() {
    let m = HostPlatform::new(MachineConfig::with_ram(64 << 20)).unwrap();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let dom = domain(&m, &pool, &iommu, InvalidationPolicy::deferred(), DEV);
    let tag = Tag::new_root(&m, IommuPerMap(&dom), TagSpec::new(64 << 10, 16)).unwrap();
    let us = UserSpace::new(&m);
    us.map(UA, PAGES * PAGE_SIZE).unwrap();
    let reg = Registry::new(&us, u64::MAX).unwrap();
    reg.register(UA, PAGES * PAGE_SIZE).unwrap();
    let mut map = tag.create_map().unwrap();
    let err = load_registered(&mut map, &reg, UA, PAGE_SIZE, Direction::ToDevice).err();
    assert!(matches!(err, Some(Error::Unsupported { .. })), "{err:?}");
    assert_eq!(reg.read().lookup(UA, 1).unwrap().mapped(), 1, "nothing counted");
    assert!(!map.is_loaded());
    // A strict domain needs no barrier: the same registry loads through it.
    let strict = domain(&m, &pool, &iommu, InvalidationPolicy::Strict, DEV + 1);
    let stag = Tag::new_root(&m, IommuPerMap(&strict), TagSpec::new(64 << 10, 16)).unwrap();
    let mut smap = stag.create_map().unwrap();
    load_registered(&mut smap, &reg, UA, PAGE_SIZE, Direction::ToDevice).unwrap().unload().unwrap();
}

#[test]
fn the_barrier_flushes_only_when_an_unmap_is_still_queued() {
    let m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap();
    m.freeze_clock();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let dom = domain(&m, &pool, &iommu, InvalidationPolicy::deferred(), DEV);
    let tag = Tag::new_root(&m, IommuPerMap(&dom), TagSpec::new(64 << 10, 16)).unwrap();
    let us = UserSpace::new(&m);
    us.map(UA, 2 * PAGES * PAGE_SIZE).unwrap();
    let reg = Registry::with_barrier(&us, u64::MAX, &tag).unwrap();
    let second = UserVa::new(UA.raw() + PAGES * PAGE_SIZE);
    reg.register(UA, PAGES * PAGE_SIZE).unwrap();
    reg.register(second, PAGES * PAGE_SIZE).unwrap();
    let mut map = tag.create_map().unwrap();
    load_registered(&mut map, &reg, UA, PAGE_SIZE, Direction::ToDevice).unwrap().unload().unwrap();
    assert_eq!(dom.pending(), 1);
    let before = dom.stats().flushes;
    // A region released while an unmap is queued: one flush, and the queue is drained.
    reg.unregister(UA, PAGES * PAGE_SIZE).unwrap();
    assert_eq!((dom.stats().flushes - before, dom.pending()), (1, 0));
    // Nothing queued any more: the next release costs no flush, only the (empty) check.
    reg.unregister(second, PAGES * PAGE_SIZE).unwrap();
    assert_eq!(dom.stats().flushes - before, 1);
    assert_eq!(reg.stats().unpin_barriers, 2);
    assert_eq!(us.pinned_pages(), 0);
}

#[test]
fn teardown_waits_for_the_barrier_before_releasing_registered_pages() {
    deferred_rig!(m, iommu, dom, tag, us, probe);
    let reg = Registry::with_barrier(&probe, u64::MAX, &tag).unwrap();
    reg.register(UA, PAGES * PAGE_SIZE).unwrap();
    {
        let mut map = tag.create_map().unwrap();
        let load = load_registered(&mut map, &reg, UA, PAGES * PAGE_SIZE, Direction::Bidirectional).unwrap();
        let seg = load.segments()[0];
        let mut b = [0u8; 8];
        probe.port.dma_read(Iova::new(seg.addr.raw()), &mut b).unwrap();
        probe.bus.set(Some((seg.addr.raw(), seg.len)));
        load.unload().unwrap();
    }
    assert_eq!(dom.pending(), 1);
    // The address space goes away with the region still registered.
    let report = reg.cleanup();
    assert_eq!((report.regions, report.pages_unpinned), (1, PAGES));
    assert_eq!((probe.unpins.get(), probe.reached_at_unpin.get()), (1, 0));
    assert_eq!(dom.pending(), 0);
}

/// A barrier whose first `fails` calls report a failed invalidation (an IOMMU that timed out),
/// then the real one: the tag's.
struct FailsFirst<'t, B: UnpinBarrier> {
    inner: &'t B,
    fails: Cell<u32>,
}

impl<B: UnpinBarrier> UnpinBarrier for FailsFirst<'_, B> {
    fn wait_unmapped(&self) -> Result<()> {
        if self.fails.get() > 0 {
            self.fails.set(self.fails.get() - 1);
            return Err(Error::InvalidationFailed {
                what: "test: invalidation timed out",
                domain: 7,
                status: 0,
            });
        }
        self.inner.wait_unmapped()
    }
}

/// One registered load through the deferred domain, the device using it, unloaded: its unmap
/// stays queued. The probe is told the bus range.
fn load_use_unload<'m, S: Strategy<HostPlatform>, B: PinBackend, U: UnpinBarrier>(
    map: &mut DmaMap<'m, HostPlatform, S>,
    reg: &Registry<B, U>,
    probe: &Probing<'_, 'm>,
) {
    let load = load_registered(map, reg, UA, PAGES * PAGE_SIZE, Direction::Bidirectional).unwrap();
    let seg = load.segments()[0];
    let mut b = [0u8; 8];
    for off in (0..seg.len).step_by(PAGE_SIZE as usize) {
        probe.port.dma_read(Iova::new(seg.addr.raw() + off), &mut b).unwrap();
    }
    probe.bus.set(Some((seg.addr.raw(), seg.len)));
    load.unload().unwrap();
}

#[test]
fn a_failing_barrier_holds_released_pages_pinned_until_it_succeeds() {
    deferred_rig!(m, iommu, dom, tag, us, probe);
    let barrier = FailsFirst { inner: &tag, fails: Cell::new(2) };
    let reg = Registry::with_barrier(&probe, u64::MAX, &barrier).unwrap();
    reg.register(UA, PAGES * PAGE_SIZE).unwrap();
    load_use_unload(&mut tag.create_map().unwrap(), &reg, &probe);
    // The unregistration takes effect (no new load finds the region) ...
    reg.unregister(UA, PAGES * PAGE_SIZE).unwrap();
    assert!(matches!(reg.load(UA, PAGE_SIZE), Err(Error::NotMapped { .. })));
    // ... but while the barrier fails the pages stay pinned, whoever asks.
    let e = reg.synchronize().unwrap_err();
    assert!(matches!(e, Error::InvalidationFailed { domain: 7, .. }), "{e:?}");
    assert_eq!((probe.unpins.get(), us.pinned_pages()), (0, PAGES));
    let st = reg.stats();
    assert_eq!(st.unpin_barrier_failures, 2, "{st:?}");
    assert_eq!(dom.pending(), 1, "the unmap is still queued: the device may still reach the pages");
    // The invalidation goes through: the pages leave the IOTLB, then the pin.
    reg.synchronize().unwrap();
    assert_eq!((probe.unpins.get(), probe.reached_at_unpin.get(), us.pinned_pages()), (1, 0, 0));
    assert_eq!(dom.pending(), 0);
}

#[test]
fn a_barrier_failing_at_teardown_leaves_the_pages_pinned_for_good() {
    deferred_rig!(m, iommu, dom, tag, us, probe);
    let barrier = FailsFirst { inner: &tag, fails: Cell::new(u32::MAX) };
    let reg = Registry::with_barrier(&probe, u64::MAX, &barrier).unwrap();
    reg.register(UA, PAGES * PAGE_SIZE).unwrap();
    load_use_unload(&mut tag.create_map().unwrap(), &reg, &probe);
    let report = reg.cleanup();
    assert_eq!((report.regions, report.pages_unpinned, report.pins_held), (1, 0, PAGES));
    assert!(matches!(report.barrier_error, Some(Error::InvalidationFailed { .. })), "{report:?}");
    assert_eq!((probe.unpins.get(), us.pinned_pages()), (0, PAGES), "nothing handed back");
}

/// A reserved map's deferred unload queues nothing (flush queue rule 8: it frees nothing, so
/// it is only recorded on its CPU's record); the barrier must still see it. The device uses
/// the buffer through the map's pinned window, the map is unloaded, the region unregistered:
/// at the unpin the old bus address must fault. A barrier that looked only at the queues
/// would find them empty and let the pages go while the IOTLB still translates to them.
#[test]
fn a_reserved_windows_recorded_unmap_keeps_its_pages_pinned_until_a_flush_covers_it() {
    deferred_rig!(m, iommu, dom, per_map_tag, us, probe);
    drop(per_map_tag);
    let tag = Tag::new_root(&m, IommuReserved::new(&dom), TagSpec::new(64 << 10, 16)).unwrap();
    let reg = Registry::with_barrier(&probe, u64::MAX, &tag).unwrap();
    reg.register(UA, PAGES * PAGE_SIZE).unwrap();
    let mut map = tag.create_map().unwrap();
    let flushes = dom.stats().flushes;
    load_use_unload(&mut map, &reg, &probe);
    assert_eq!(dom.stats().flushes, flushes, "the unload stayed deferred");
    assert_eq!(dom.pending(), 1, "the recorded unmap counts as pending");
    reg.unregister(UA, PAGES * PAGE_SIZE).unwrap();
    reg.synchronize().unwrap();
    assert_eq!((probe.unpins.get(), probe.reached_at_unpin.get()), (1, 0));
    assert_eq!((dom.stats().flushes - flushes, dom.pending()), (1, 0));
}
