//! # The soundness rule, and the proof of each hole closed
//!
//! **The rule.** No sequence of safe calls — including `mem::forget`, drops in any order,
//! panics and threads — lets a device reach memory that Rust may hand to anyone else, or makes
//! busdma read or write through an address the caller made up. `unsafe` appears only at trust
//! boundaries, each with a `# Safety` section:
//!
//! - implementing the platform seam ([`crate::Platform`] is an `unsafe trait`);
//! - describing raw physical memory: [`KernelBuf::new`](crate::front::KernelBuf::new),
//!   [`PageList::new`](crate::front::PageList::new), [`SgList::new`](crate::front::SgList::new),
//!   [`RawSegments::new`](crate::front::RawSegments::new),
//!   [`RawSegment::new`](crate::front::RawSegment::new), and device memory described once by
//!   bus code ([`DeviceRegion::new`](crate::front::DeviceRegion::new): MMIO, peer BARs);
//! - mechanism-level mapping of IOVA ranges the caller claims to own (page tables, domains)
//!   and attaching raw table roots to IOMMU hardware, or turning its translation off
//!   ([`Vtd::disable_translation`](crate::vtd::Vtd::disable_translation),
//!   [`Smmu::disable_translation`](crate::smmuv3::Smmu::disable_translation): every device
//!   then reaches all of memory). Dropping a unit is safe because it never turns translation
//!   off: it leaves every device blocked and leaks the one table the unit still reads.
//!   On a virtio-iommu: the requests that give reach
//!   ([`VirtioIommu::submit`](crate::virtio_iommu::VirtioIommu::submit): MAP, ATTACH),
//!   [`ViommuDomain::map`](crate::virtio_iommu::ViommuDomain::map) /
//!   [`map_at`](crate::virtio_iommu::ViommuDomain::map_at), and taking over the device
//!   ([`VirtioIommu::new`](crate::virtio_iommu::VirtioIommu::new)).
//!
//! Memory a mapping reaches is owned by the mapping while it is loaded (coherent memory, typed
//! buffers, [`OwnedMap`](crate::front::OwnedMap); a pre-mapped pool's buffer by its
//! [`PoolMap`](crate::front::PoolMap), its slot the pool's for the pool's life), and goes back only once its tag proves no
//! translation reaches it; otherwise it waits in the tag's quarantine
//! ([`crate::front::quarantine`]). Forgetting a map leaks the memory together with its mapping.
//!
//! This module holds no code: it is the compile-fail half of the proof, one case per hole the
//! type system closes (the issue's numbering), each beside the safe code it differs from.
//! The run-time half is named at the end.
//!
//! ## 1. A made-up kernel address in a scatter-gather entry
//!
//! A bounced sync copies through a [`MemKind::Mapped`](crate::front::MemKind::Mapped) entry's
//! `kva`. A list of entries is a load source only through `unsafe fn new`:
//!
//! ```compile_fail,E0133
//! use busdma::front::{MemKind, SgEntry, SgList};
//! use busdma::{KernVa, PhysAddr};
//! let e = [SgEntry { pa: PhysAddr::new(0x10_0000), len: 64, kind: MemKind::Mapped { kva: KernVa::new(8) } }];
//! let list = SgList::new(&e); // error[E0133]: call to unsafe function
//! ```
//!
//! and its fields are private, so it cannot be built around the constructor:
//!
//! ```compile_fail,E0423
//! use busdma::front::{MemKind, SgEntry, SgList};
//! use busdma::{KernVa, PhysAddr};
//! let e = [SgEntry { pa: PhysAddr::new(0x10_0000), len: 64, kind: MemKind::Page }];
//! let list = SgList(&e); // error: tuple struct constructor `SgList` is private
//! ```
//!
//! ## 2, 4, 5, 10: the mechanisms
//!
//! Their compile-fail cases sit on the items themselves: implementing
//! [`Platform`](crate::Platform) without `unsafe impl` (E0200, on the trait); using a
//! [`TablePage`](crate::TablePage) after the handle was given back (E0382, on the type);
//! [`PageTable::map`](crate::pgtable::PageTable::map) and `unmap`,
//! [`Domain::map`](crate::iommu::Domain::map) without `unsafe` (E0133, on each); reaching the
//! VT-d mutants (E0603, on `busdma::vtd`). The strategies' view of a domain is no back door:
//! [`IommuOps`](crate::front::IommuOps) is an `unsafe trait` whose mapping methods are
//! `unsafe fn`s too:
//!
//! ```compile_fail,E0133
//! use busdma::front::{Direction, IommuOps};
//! use busdma::iommu::{Domain, IotlbInvalidator};
//! use busdma::iova::IovaSource;
//! use busdma::pgtable::{Prot, PteFormat};
//! use busdma::{CpuGuard, Iova, PhysAddr, Platform};
//! fn poke<P: Platform, F: PteFormat, S: IovaSource, H: IotlbInvalidator>(
//!     d: &Domain<'_, P, F, S, H>,
//!     g: &CpuGuard<'_, P>,
//! ) {
//!     // error[E0133]: any IOVA, any physical address
//!     let _ = IommuOps::map(&d, g, Iova::new(0x1000), PhysAddr::new(0x1000), 4096, Prot::READ_WRITE);
//! }
//! ```
//!
//! A virtio-iommu domain's MAP is no back door either (E0133):
//!
//! ```compile_fail,E0133
//! use busdma::pgtable::Prot;
//! use busdma::virtio_iommu::ViommuDomain;
//! use busdma::{CpuGuard, Iova, PhysAddr, Platform};
//! fn poke<P: Platform>(d: &ViommuDomain<'_, '_, P>, g: &CpuGuard<'_, P>) {
//!     // error[E0133]: any physical address, lent to the device
//!     let _ = d.map(g, PhysAddr::new(0x1000), 4096, Iova::new(1 << 28), Prot::READ_WRITE);
//! }
//! ```
//!
//! ## 6. Loads that do not keep their memory alive
//!
//! A borrowed kernel buffer is described only through `unsafe fn new`, whose contract is to
//! keep the bytes until the unload and its invalidation:
//!
//! ```compile_fail,E0133
//! use busdma::front::KernelBuf;
//! use busdma::KernVa;
//! let buf = KernelBuf::new(KernVa::new(0x1000), 64); // error[E0133]
//! ```
//!
//! An implementation of [`LoadSource`](crate::front::LoadSource) is a promise too:
//!
//! ```compile_fail,E0200
//! use busdma::front::{LoadSource, Run};
//! use busdma::{Platform, Result};
//! struct Mine;
//! impl LoadSource for Mine { // error[E0200]: the trait requires an `unsafe impl`
//!     fn for_each_run<P: Platform, F: FnMut(Run) -> Result<()>>(&self, _: &P, _: F) -> Result<()> {
//!         Ok(())
//!     }
//! }
//! ```
//!
//! A registered user buffer is loaded only through
//! [`load_registered`](crate::front::load_registered), which keeps its `mapped` count while
//! the map holds its pages; on its own it is not a load source (dropping it would let the
//! region be unpinned under the mapping):
//!
//! ```compile_fail,E0277
//! use busdma::front::{Direct, DmaMap, Direction};
//! use busdma::pin::{PinBackend, RegisteredBuffer, UnpinBarrier};
//! use busdma::Platform;
//! fn load<P: Platform, B: PinBackend, U: UnpinBarrier>(
//!     map: &mut DmaMap<'_, P, Direct>,
//!     buf: &RegisteredBuffer<'_, B, U>,
//! ) {
//!     let _ = map.load(buf, Direction::ToDevice); // error[E0277]: not a `LoadSource`
//! }
//! ```
//!
//! Owned loads need no `unsafe`, because only busdma's own memory types can be owned buffers
//! ([`DmaBuffer`](crate::front::DmaBuffer) is sealed):
//!
//! ```compile_fail,E0277
//! use busdma::front::{Direct, Direction, OwnedMap, Tag, TagSpec};
//! use busdma::Platform;
//! fn load<'p, P: Platform>(tag: &Tag<'p, P, Direct>) {
//!     let mut map: OwnedMap<'p, P, Direct, Vec<u8>> = tag.create_owned_map().unwrap(); // error[E0277]
//!     let _ = map.load(vec![0u8; 64], Direction::ToDevice);
//! }
//! ```
//!
//! while the same load of busdma's memory compiles:
//!
//! ```
//! use busdma::front::{Direct, Direction, DmaMemory, OwnedMap, Tag, TagSpec};
//! use busdma::{MemAttr, Platform};
//! fn load<'p, P: Platform>(p: &'p P, tag: &Tag<'p, P, Direct>) -> busdma::Result<()> {
//!     let mut map: OwnedMap<'p, P, Direct, DmaMemory<'p, P>> = tag.create_owned_map()?;
//!     let mem = DmaMemory::alloc(p, tag.spec(), 64, MemAttr::WriteBack)?;
//!     map.load(mem, Direction::ToDevice).map_err(|(e, _)| e)?;
//!     Ok(())
//! }
//! ```
//!
//! A byte vector shares its first and last pages with other heap objects, which a device
//! mapped page by page could reach; heap memory is loadable as a
//! [`HeapBuffer`](crate::front::HeapBuffer), made of whole pages by its element type. While a
//! map holds one, the CPU reaches its bytes only by copy: a slice needs `&mut`, and the map
//! lends `&`:
//!
//! ```compile_fail,E0596
//! use busdma::front::{Direct, Direction, HeapBuffer, OwnedMap, Tag};
//! use busdma::Platform;
//! fn peek<'p, P: Platform>(map: &OwnedMap<'p, P, Direct, HeapBuffer>) {
//!     let bytes = map.buffer().unwrap().bytes_mut(); // error[E0596]: behind a `&` reference
//! }
//! ```
//!
//! A pre-mapped pool's buffer ([`PoolBuf`](crate::premapped::PoolBuf)) is loaded in place by a
//! [`PoolMap`](crate::front::PoolMap), which takes it by value until it gives it back:
//!
//! ```
//! use busdma::front::{Direction, IommuOps, Tag};
//! use busdma::premapped::{Premapped, PremappedPool};
//! use busdma::Platform;
//! fn send<'a, 'p, P: Platform, D: IommuOps<P>>(
//!     tag: &Tag<'p, P, Premapped<'a, 'p, P, D>>,
//!     pool: &'a PremappedPool<'p, P, D>,
//! ) -> busdma::Result<()> {
//!     let mut pm = tag.create_pool_map()?;
//!     let mut buf = pool.alloc_buf(64)?;
//!     buf.write(0, b"packet")?;
//!     pm.load(buf, Direction::ToDevice).map_err(|(e, _)| e)?;
//!     let buf = pm.take()?; // unloaded: the owner's again
//!     drop(buf); // the slot goes back to the pool
//!     Ok(())
//! }
//! ```
//!
//! so no handle is left through which safe code could give the slot back to the pool (where
//! another load would take it) while the device may use it:
//!
//! ```compile_fail,E0382
//! use busdma::front::{Direction, IommuOps, Tag};
//! use busdma::premapped::{Premapped, PremappedPool};
//! use busdma::Platform;
//! fn early<'a, 'p, P: Platform, D: IommuOps<P>>(
//!     tag: &Tag<'p, P, Premapped<'a, 'p, P, D>>,
//!     pool: &'a PremappedPool<'p, P, D>,
//! ) {
//!     let mut pm = tag.create_pool_map().unwrap();
//!     let buf = pool.alloc_buf(64).unwrap();
//!     let _ = pm.load(buf, Direction::ToDevice);
//!     drop(buf); // error[E0382]: use of moved value
//! }
//! ```
//!
//! nor a second handle to write it through ([`PoolBuf`](crate::premapped::PoolBuf) is not
//! `Clone`), and the map lends only `&`, while writing takes `&mut`:
//!
//! ```compile_fail,E0599
//! use busdma::front::IommuOps;
//! use busdma::premapped::PremappedPool;
//! use busdma::Platform;
//! fn alias<'p, P: Platform, D: IommuOps<P>>(pool: &PremappedPool<'p, P, D>) {
//!     let buf = pool.alloc_buf(64).unwrap();
//!     let second = buf.clone(); // error[E0599]: no method `clone`
//! }
//! ```
//!
//! ```compile_fail,E0596
//! use busdma::front::{IommuOps, PoolMap};
//! use busdma::premapped::Premapped;
//! use busdma::Platform;
//! fn scribble<'a, 'p, P: Platform, D: IommuOps<P>>(pm: &PoolMap<'a, 'p, P, Premapped<'a, 'p, P, D>>) {
//!     pm.buffer().unwrap().write(0, b"late"); // error[E0596]: behind a `&` reference
//! }
//! ```
//!
//! Only a tag of a pool's own strategy has pool maps: a slot's bus address means nothing
//! to a tag that maps its loads (a buffer of another pool is refused at run time):
//!
//! ```compile_fail,E0599
//! use busdma::front::{IommuOps, IommuPerMap, Tag};
//! use busdma::Platform;
//! fn wrong<'p, P: Platform, D: IommuOps<P> + Clone>(tag: &Tag<'p, P, IommuPerMap<D>>) {
//!     let pm = tag.create_pool_map(); // error[E0599]: no method `create_pool_map`
//! }
//! ```
//!
//! A two-step window ([`DmaWindow`](crate::front::DmaWindow)) links the same owned buffers
//! only; a borrowed buffer is not one (safe code could free it while it is linked):
//!
//! ```compile_fail,E0277
//! use busdma::front::{Direction, DmaMemory, DmaWindow, IommuPerMap, IommuOps, Tag};
//! use busdma::Platform;
//! fn link<'p, P: Platform, D: IommuOps<P> + Clone>(tag: &Tag<'p, P, IommuPerMap<D>>, mem: &DmaMemory<'p, P>) {
//!     let mut w: DmaWindow<'p, P, IommuPerMap<D>, &DmaMemory<'p, P>> = tag.create_window(4096, 1).unwrap(); // error[E0277]
//!     let _ = w.link(0, mem, Direction::ToDevice);
//! }
//! ```
//!
//! Cache maintenance goes only through a map's own runs: the run-level sync is not public,
//! so safe code cannot make busdma invalidate (and so drop the stores of) lines at a kernel
//! address it made up:
//!
//! ```compile_fail,E0603
//! use busdma::front::cache_sync::{sync_runs, SyncOp};
//! use busdma::front::{MemKind, Run};
//! use busdma::{KernVa, PhysAddr, Platform};
//! fn wipe<P: Platform>(p: &P) {
//!     let run = Run { pa: PhysAddr::new(0x10_0000), len: 4096, kind: MemKind::Page, kva: Some(KernVa::new(0x1000)) };
//!     let _ = sync_runs(p, &[run], SyncOp::POSTREAD, false); // error[E0603]: private
//! }
//! ```
//!
//! ## 7. Giving memory back after a failed invalidation
//!
//! The CPU cannot touch a device-owned typed buffer, and taking it back reports the
//! invalidation's outcome: [`DeviceOwned::to_cpu`](crate::front::typed::DeviceOwned::to_cpu)
//! returns a `Result`, so the buffer cannot be used as if nothing happened:
//!
//! ```compile_fail,E0599
//! use busdma::front::typed::{DeviceOwned, ToDevice};
//! use busdma::front::Strategy;
//! use busdma::Platform;
//! fn reuse<P: Platform, S: Strategy<P>>(dev: DeviceOwned<'_, P, S, ToDevice>) {
//!     let cpu = dev.to_cpu();
//!     cpu.write(0, b"secret").unwrap(); // error[E0599]: no method `write` on `Result`
//! }
//! ```
//!
//! ## The run-time half
//!
//! | hole | closed by | test |
//! |---|---|---|
//! | 7: failed invalidation, coherent / typed / owned buffers | quarantine until a later proof | `iommu_inval_failure::coherent_memory_whose_unload_invalidation_fails_is_quarantined_until_a_later_invalidation_succeeds`, `iommu_inval_failure::to_cpu_reports_a_failed_invalidation_and_keeps_the_buffer_from_everyone`, `iommu_inval_failure::an_owned_map_dropped_when_its_invalidation_fails_quarantines_its_memory` (busdma-model) |
//! | deferred invalidation: memory freed before the flush | the tag's proof before the free | `iommu_inval_failure::memory_unloaded_under_deferred_invalidation_is_freed_only_after_the_flush`, `iommu_inval_failure::an_owned_buffer_leaves_its_map_only_after_the_deferred_unmap_is_flushed` |
//! | 6: `mem::forget` of a loaded map | the memory is leaked with the mapping | `front_owned::forgetting_an_owned_map_leaks_its_memory_with_the_mapping_never_frees_it`, `front_debug::maps_still_loaded_at_domain_teardown_are_reported` |
//! | two-step windows: a failed batch invalidation; `mem::forget` of a window | buffers held until a later proof (the tag's quarantine if the window goes); leaked with the mapping | `front_window::a_failed_invalidation_holds_the_buffers_until_a_later_proof`, `front_window::a_window_dropped_while_invalidations_fail_quarantines_its_buffers_and_never_frees_them`, `front_window::forgetting_a_window_leaks_its_buffers_with_their_mapping_never_frees_them` (busdma-model) |
//! | pool buffers: a buffer of another pool; a loaded buffer's slot back in the pool; `mem::forget` of a loaded pool map | pool identity checked at load; the map state keeps an owned slot at unload; the slot is leaked, still the pool's | `premapped_zc::a_buffer_of_another_pool_is_refused_and_handed_back_whatever_its_domain`, `premapped_zc::a_loaded_pool_buffer_never_goes_back_to_the_pool_before_its_map_gives_it_up`, `premapped_zc::forgetting_a_loaded_pool_map_leaks_its_slot_and_no_later_buffer_gets_it` (busdma-model) |
//! | 9: `TagFlags::untrusted` on a deferred domain | strict unload whatever the domain | `iommu_inval_failure::an_untrusted_tag_unloads_strictly_on_a_deferred_domain` |
//! | 3: quick maps, copies, fills, maintenance of what is not RAM | `Platform::is_ram`, `Error::NotRam` | `quickmap::quick_maps_copies_fills_and_maintenance_refuse_what_is_not_ram` (busdma), `front_direct::a_sync_of_raw_segments_outside_ram_is_an_error_not_a_panic` (busdma-model) |
//! | 8: a domain dropped while its device is attached | `busdma::device` owns the domain; raw attaches are `unsafe` | `device_attach::a_dropped_device_never_reaches_the_next_domain_that_reuses_its_table_pages`, `device_attach::detach_removes_the_context_and_invalidates_the_domain_before_its_table_pages_go_back`, `device_attach::a_failed_detach_or_invalidation_leaks_the_domain_its_tables_and_its_id_and_counts_it` |
//! | 10: mutant drivers as features | a `cfg` only `qemu/run --mutants` sets | `vtd::mutant::tests::no_cargo_feature_of_the_crate_is_a_mutant` |
//! | segment layouts that overflow (alignment 2^63) | `SegmentBuilder::new` checks | `front::segments::tests::near_2_pow_63::layouts_near_2_pow_63_give_valid_segments_or_an_error`, `front::segments::tests::a_zero_alignment_is_refused_not_a_panic` |
