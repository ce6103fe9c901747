//! The cache model inside a whole machine: the platform seam's maintenance acts on it, devices
//! (physical accesses) see RAM, the CPU sees its cache.

use std::sync::atomic::Ordering;

use busdma::{KernVa, MemAttr, PAGE_SIZE, PageRequest, Placement, Platform};
use busdma_model::{CacheConfig, Coherence, HostPlatform, MachineConfig};

fn machine(cache: Option<CacheConfig>) -> HostPlatform {
    let mut c = MachineConfig { ram_size: 16 << 20, cpus: 2, ..MachineConfig::default() }
        .upper_half_not_direct_mapped();
    c.cache = cache;
    HostPlatform::new(c).unwrap()
}

fn page(m: &HostPlatform, placement: Placement, attr: MemAttr) -> busdma::PhysAddr {
    m.alloc_pages(&PageRequest { placement, attr, ..PageRequest::pages(1) }).unwrap()
}

#[test]
fn without_a_cache_model_cpu_stores_reach_ram_at_once() {
    let m = machine(None);
    let pa = page(&m, Placement::DirectMapped, MemAttr::WriteBack);
    let kva = m.phys_to_kva(pa).unwrap();
    m.cpu().write(kva, b"now").unwrap();
    let mut got = [0u8; 3];
    m.read_phys(pa, &mut got).unwrap();
    assert_eq!(&got, b"now");
}

#[test]
fn platform_maintenance_acts_on_the_model_cache_through_the_direct_map() {
    let m = machine(Some(CacheConfig::pipt()));
    let pa = page(&m, Placement::DirectMapped, MemAttr::WriteBack);
    let kva = m.phys_to_kva(pa).unwrap();
    m.cpu().write(kva, b"cpu data").unwrap();
    let mut got = [0u8; 8];
    m.read_phys(pa, &mut got).unwrap();
    assert_eq!(&got, &[0; 8], "a non-coherent device sees RAM, not the dirty line");
    m.cache_clean(kva, 8);
    m.read_phys(pa, &mut got).unwrap();
    assert_eq!(&got, b"cpu data");

    m.write_phys(pa, b"dev data").unwrap();
    m.cpu().read(kva, &mut got).unwrap();
    assert_eq!(&got, b"cpu data", "the CPU still holds its (clean) line");
    m.cache_invalidate(kva, 8);
    m.cpu().read(kva, &mut got).unwrap();
    assert_eq!(&got, b"dev data");
    let c = m.cache().unwrap().counters();
    assert_eq!(c.maintenance_calls.load(Ordering::Relaxed), 2);
    assert_eq!(c.maintenance_lines.load(Ordering::Relaxed), 2);
}

#[test]
fn platform_maintenance_reaches_pages_outside_the_direct_map_through_quick_maps() {
    let m = machine(Some(CacheConfig::pipt()));
    let pa = page(&m, Placement::NotDirectMapped, MemAttr::WriteBack);
    let g = m.pin_cpu();
    // SAFETY: we hold the guard for g.cpu(), pa is a page of RAM, slot 0 is unused.
    let kva = unsafe { m.quick_map(g.cpu(), 0, pa) };
    m.cpu().write(kva.checked_add(100).unwrap(), b"far").unwrap();
    m.cache_clean_invalidate(kva, PAGE_SIZE);
    // SAFETY: same guard; the slot was mapped above and is not used afterwards.
    unsafe { m.quick_unmap(g.cpu(), 0) };
    let mut got = [0u8; 3];
    m.read_phys(pa.checked_add(100).unwrap(), &mut got).unwrap();
    assert_eq!(&got, b"far");
    assert_eq!(m.cache().unwrap().lines_of_page(pa), 0);
    // Once unmapped the slot reaches nothing: maintenance through it is a counted caller bug.
    m.cache_clean(kva, 64);
    assert_eq!(m.cache().unwrap().counters().maintenance_unmapped.load(Ordering::Relaxed), 1);
    assert!(m.cpu().read(kva, &mut got).is_err());
}

#[test]
fn uncached_pages_bypass_the_cache() {
    let m = machine(Some(CacheConfig::vipt_aliasing()));
    let pa = page(&m, Placement::DirectMapped, MemAttr::Uncached);
    let kva = m.phys_to_kva(pa).unwrap();
    m.cpu().write(kva, b"coherent").unwrap();
    let mut got = [0u8; 8];
    m.read_phys(pa, &mut got).unwrap();
    assert_eq!(&got, b"coherent");
    assert_eq!(m.cache().unwrap().lines_of_page(pa), 0);
}

#[test]
fn a_snooping_machine_needs_no_maintenance() {
    let m = machine(Some(CacheConfig::vipt_aliasing().with_coherence(Coherence::Snooping)));
    let pa = page(&m, Placement::DirectMapped, MemAttr::WriteBack);
    let kva = m.phys_to_kva(pa).unwrap();
    m.cpu().write(kva, b"snooped").unwrap();
    let mut got = [0u8; 7];
    m.read_phys(pa, &mut got).unwrap();
    assert_eq!(&got, b"snooped");
    m.write_phys(pa, b"devdata").unwrap();
    m.cpu().read(kva, &mut got).unwrap();
    assert_eq!(&got, b"devdata");
    assert_eq!(m.cache().unwrap().counters().maintenance_calls.load(Ordering::Relaxed), 0);
}

#[test]
fn fresh_pages_carry_no_stale_line_of_their_previous_owner() {
    let m = machine(Some(CacheConfig::pipt()));
    let pa = page(&m, Placement::DirectMapped, MemAttr::WriteBack);
    let kva = m.phys_to_kva(pa).unwrap();
    m.cpu().write(kva, b"old owner").unwrap();
    // SAFETY: allocated above, freed once, no device reaches it.
    unsafe { m.free_pages(pa, 1) };
    let again = page(&m, Placement::DirectMapped, MemAttr::WriteBack);
    assert_eq!(again, pa, "the allocator hands the same frame back");
    m.write_phys(pa, b"device!!!").unwrap();
    m.cpu().evict_all().unwrap();
    let mut got = [0u8; 9];
    m.read_phys(pa, &mut got).unwrap();
    assert_eq!(&got, b"device!!!", "no dirty line of the old owner was written back");
}

#[test]
fn kernel_addresses_the_cpu_cannot_reach_are_errors() {
    let m = machine(Some(CacheConfig::pipt()));
    let mut b = [0u8; 4];
    assert!(matches!(
        m.cpu().read(KernVa::new(0x1000), &mut b),
        Err(busdma::Error::NotMapped { addr: 0x1000 })
    ));
    let bad = MachineConfig {
        cache: Some(CacheConfig { sets: 6, ..CacheConfig::pipt() }),
        ..MachineConfig::with_ram(1 << 20)
    };
    assert!(matches!(HostPlatform::new(bad), Err(busdma::Error::InvalidArgument { value: 6, .. })));
}
