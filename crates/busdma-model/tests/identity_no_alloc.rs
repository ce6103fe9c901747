//! The identity strategy's load and unload never allocate: a counting global allocator (this
//! test binary's own) counts the heap allocations the calling thread makes inside `load` and
//! `unload`, for loads of pages the reference table has never seen (which made the former
//! `BTreeMap` allocate nodes), pages shared with another map, and loads racing on two threads.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use busdma::front::{Direction, Identity, MemKind, SgEntry, SgList, Tag, TagSpec};
use busdma::iommu::{Domain, DomainConfig, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::{AddrRange, Iova, PAGE_SIZE, PhysAddr};
use busdma_model::{
    Context, FrameRequest, HostPlatform, IommuConfig, MachineConfig, ModelIommu, TableFormat,
};

/// Counts allocations made by threads that asked to be counted.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator; the counters are
// thread-local cells (const-initialised, so touching them never allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as above; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn count() {
    // `try_with`: the thread-local may be gone while a thread exits.
    let _ = COUNTING.try_with(|c| {
        if c.get() {
            let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
        }
    });
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Heap allocations the calling thread makes inside `f`.
fn allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCS.with(Cell::get);
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, ALLOCS.with(Cell::get) - before)
}

const DEV: u32 = 0x60;

#[test]
fn the_counting_allocator_sees_an_allocation() {
    let (_, n) = allocations(|| std::hint::black_box(vec![1u8; 64]));
    assert_eq!(n, 1, "the harness itself must be able to fail");
}

#[test]
fn identity_load_and_unload_never_allocate() {
    let m = HostPlatform::new(MachineConfig { cpus: 2, ..MachineConfig::with_ram(64 << 20) }).unwrap();
    let iommu = ModelIommu::new(&m, IommuConfig::default()).unwrap();
    let pool = TablePool::new(&m);
    let pt =
        PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true }).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { iommu.attach(DEV, Context::new(1, pt.root(), TableFormat::VtdSecondLevel, 48)) }.unwrap();
    let space = AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 40)).unwrap();
    let iova = IovaAllocator::new(space, IovaConfig { cpus: 2, caches: true, guard_page: false }).unwrap();
    let d = Domain::new(&m, pt, iova, &iommu, DomainConfig::new(1, InvalidationPolicy::Strict)).unwrap();
    let id = Identity::new(&d);
    let tag = Tag::new_root(&m, id.clone(), TagSpec::new(256 * PAGE_SIZE, 64)).unwrap();

    // 4 MiB of pages: table levels for them are built by a warm-up load, after which loads of
    // pages the reference table has never counted need no new table level either.
    let base = m.frames().alloc(FrameRequest { align: 2 << 20, ..FrameRequest::pages(1024) }).unwrap();
    let sg = |first: u64, pages: u64| -> Vec<SgEntry> {
        // One entry per page, every other page: many runs, many table slots.
        (0..pages)
            .map(|i| SgEntry {
                pa: PhysAddr::new(base.raw() + (first + 2 * i) * PAGE_SIZE + 0x10),
                len: PAGE_SIZE - 0x20,
                kind: MemKind::Page,
            })
            .collect()
    };
    let mut a = tag.create_map().unwrap();
    let mut b = tag.create_map().unwrap();
    let warm = sg(0, 512);
    let warm: Vec<SgEntry> = warm.into_iter().step_by(8).collect();
    // SAFETY: memory the test allocated and keeps until the map is dropped.
    a.load(&unsafe { SgList::new(&warm) }, Direction::ToDevice).unwrap();
    a.unload().unwrap();

    for round in 0..8u64 {
        // Fresh pages each round (never counted before), 64 of them (the BTreeMap needed
        // several nodes for that many keys).
        let list = sg(round * 128, 64);
        let shared = sg(round * 128, 16);
        let (r, n) =
            // SAFETY: memory the test allocated and keeps until the map is dropped.
            allocations(|| a.load(&unsafe { SgList::new(&list) }, Direction::ToDevice).map(|s| s.len()));
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(n, 0, "round {round}: identity load of fresh pages allocated {n} times");
        // A second map loading some of the same pages: counts go to 2.
        let (r, n) =
            // SAFETY: memory the test allocated and keeps until the map is dropped.
            allocations(|| b.load(&unsafe { SgList::new(&shared) }, Direction::FromDevice).map(|s| s.len()));
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(n, 0, "round {round}: identity load of shared pages allocated");
        assert_eq!(id.refcount(PhysAddr::new(base.raw() + round * 128 * PAGE_SIZE)), 2);
        let (r, n) = allocations(|| b.unload());
        r.unwrap();
        assert_eq!(n, 0, "round {round}: identity unload allocated");
        let (r, n) = allocations(|| a.unload());
        r.unwrap();
        assert_eq!(n, 0, "round {round}: identity unload allocated");
        assert_eq!(id.mapped_pages(), 0);
    }

    // Two threads loading and unloading at once, each counted on its own thread.
    std::thread::scope(|s| {
        for (t, map) in [a, b].into_iter().enumerate() {
            let (sg, m) = (&sg, &m);
            s.spawn(move || {
                let mut map = map;
                let _bind = m.bind_cpu(t).unwrap();
                for round in 0..50u64 {
                    let list = sg((round % 8) * 128 + t as u64, 32);
                    let (r, n) =
                        // SAFETY: memory the test allocated and keeps until the map is dropped.
                        allocations(|| map.load(&unsafe { SgList::new(&list) }, Direction::ToDevice).map(|s| s.len()));
                    assert!(r.is_ok() && n == 0, "thread {t} round {round}: {r:?}, {n} allocations");
                    let (r, n) = allocations(|| map.unload());
                    assert!(r.is_ok() && n == 0, "thread {t} round {round}: unload allocated {n}");
                }
            });
        }
    });
    assert_eq!(id.mapped_pages(), 0);
    let (cap, reserved) = id.table_capacity();
    assert_eq!(reserved, 0, "destroyed maps gave their reservations back");
    assert!(cap >= 2 * 2 * 64, "the table grew at create for two maps: {cap}");
    iommu.detach(DEV).unwrap();
}
