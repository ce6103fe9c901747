//! `identity`: bus address = physical address, mapped 1:1 in the IOMMU, with a per-page
//! reference count (the design seed 002 replaced).
//!
//! # Theory
//!
//! 1. **No IOVA allocation**: a page is mapped at its own physical address. The price is the
//!    one seed 002 names: a page loaded by two maps at once (two packets in one page) must
//!    stay mapped until the *last* of them is unloaded.
//! 2. **Reference counts** per page live in one table shared by every tag of the strategy
//!    ([`PageRefs`]: a fixed-capacity hash table from page frame to count), behind a spin lock
//!    held across the count update *and* the map/unmap it decides, so another CPU cannot unmap
//!    a page between a count reaching zero and its entry being cleared. Each map reserves room
//!    at create for the most pages one of its loads can count ([`pages_bound`]); the table
//!    grows then, never during a load, so load and unload never allocate (a counting global
//!    allocator proves it: `crates/busdma-model/tests/identity_no_alloc.rs`).
//! 3. **Load** counts each page; pages whose count becomes 1 are mapped (contiguous ones in
//!    one call). **Unload** uncounts; pages whose count becomes 0 are unmapped with one
//!    `unmap` call. A failed load uncounts what it counted and unmaps what it mapped.
//! 4. Bus addresses are physical, so the tag's mask and alignment apply to physical
//!    addresses: a run beyond the mask or misaligned goes to the bounce hook.
#![deny(unsafe_code)] // allowed only where the strategy calls `IommuOps`' unsafe mapping methods

use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::addr::{AddrRange, Iova, PAGE_SHIFT, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::platform::Platform;
use crate::sync::SpinLock;

use super::iommu::{IommuOps, builder_error, check_untrusted, max_runs, mem_type, push_range};
use super::page_refs::{PageRefs, pages_bound};
use super::{Invalidation, Strategy};
use crate::dir::Direction;
use crate::front::load::{MemKind, Run};
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::TagSpec;
use crate::pgtable::{MemType, Prot};

/// The identity strategy over domain handle `D`.
#[derive(Clone)]
pub struct Identity<D> {
    domain: D,
    refs: Arc<SpinLock<PageRefs>>,
}

impl<D> Identity<D> {
    /// An identity strategy with an empty reference table.
    pub fn new(domain: D) -> Self {
        Self { domain, refs: Arc::new(SpinLock::new(PageRefs::new())) }
    }

    /// The domain handle.
    pub fn domain(&self) -> &D {
        &self.domain
    }

    /// Pages currently referenced (mapped), for tests and the lab.
    pub fn mapped_pages(&self) -> usize {
        self.refs.lock().len()
    }

    /// The reference count of the page holding `pa`.
    pub fn refcount(&self, pa: PhysAddr) -> u32 {
        self.refs.lock().get(pa.raw() >> PAGE_SHIFT)
    }

    /// Slots of the reference table and pages reserved by live maps (for tests and the lab).
    pub fn table_capacity(&self) -> (usize, usize) {
        let t = self.refs.lock();
        (t.capacity(), t.reserved())
    }
}

/// Per-map state: scratch space for the ranges one unload unmaps, and the pages the map
/// reserved in the reference table.
#[derive(Debug)]
pub struct IdentityState {
    scratch: Vec<AddrRange<Iova>>,
    reserved: usize,
}

fn pages_of(r: &Run) -> core::ops::Range<u64> {
    (r.pa.raw() >> PAGE_SHIFT)..(r.pa_end() + PAGE_SIZE - 1) >> PAGE_SHIFT
}

fn counted(r: &Run) -> bool {
    !matches!(r.kind, MemKind::PeerBar { bus: Some(_) })
}

impl<D> Identity<D> {
    /// Uncounts the pages of `runs` (in `refs`), collecting pages that reach zero into
    /// `out` if `collect`; `limit` pages at most (for rollback of a partial load).
    fn uncount(
        refs: &mut PageRefs,
        runs: &[Run],
        mut limit: u64,
        out: &mut Vec<AddrRange<Iova>>,
        collect: bool,
    ) {
        for r in runs.iter().filter(|r| counted(r)) {
            for pfn in pages_of(r) {
                if limit == 0 {
                    return;
                }
                limit -= 1;
                if refs.decr(pfn) == Some(0) && collect {
                    // Capacity: see `create`; a failure here would leave a page mapped
                    // with no count, so the scratch array is sized for every page.
                    let _ = push_range(out, pfn << PAGE_SHIFT, (pfn + 1) << PAGE_SHIFT);
                }
            }
        }
    }
}

#[allow(unsafe_code)]
impl<P: Platform, D: IommuOps<P> + Clone> Strategy<P> for Identity<D> {
    const NAME: &'static str = "identity";
    type MapState = IdentityState;

    fn invalidation(&self) -> Invalidation {
        self.domain.invalidation()
    }

    fn wait_unmapped(&self, p: &P) -> Result<()> {
        self.domain.wait_unmapped(&p.pin_cpu())
    }

    /// Identity pages are shared by every load of the domain (counted, mapped once): one
    /// load cannot make them privileged-only, so a privileged tag is refused.
    fn check_tag(&self, _p: &P, spec: &TagSpec) -> Result<()> {
        if spec.flags.privileged {
            return Err(Error::Unsupported {
                what: "privileged-only DMA on an identity domain (pages shared by every load)",
            });
        }
        Ok(())
    }

    fn create(&self, _p: &P, spec: &TagSpec) -> Result<IdentityState> {
        // Every page of a load may be freed on its own range in the worst case (interleaved
        // with pages other maps still hold): pages of max_size plus one per run.
        let n = max_runs(spec).saturating_add(spec.max_size.div_ceil(PAGE_SIZE) as usize);
        let mut scratch = Vec::new();
        scratch.try_reserve_exact(n).map_err(|_| Error::NoMemory { requested: (n * 16) as u64 })?;
        // Room in the reference table for one load's pages (theory 2): grow the table if
        // needed, allocating outside its lock.
        let reserved = pages_bound(spec);
        loop {
            let Err(cap) = self.refs.lock().try_reserve(reserved) else { break };
            let fresh = PageRefs::alloc_slots(cap)?;
            let unused = self.refs.lock().grow_to(fresh, cap);
            drop(unused);
        }
        Ok(IdentityState { scratch, reserved })
    }

    fn load(
        &self,
        p: &P,
        spec: &TagSpec,
        st: &mut IdentityState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        check_untrusted(spec, runs)?;
        for r in runs {
            let bus = match r.kind {
                MemKind::PeerBar { bus: Some(b) } => b.raw(),
                _ => Iova::identity_of(r.pa).raw(),
            };
            segs.push(bus, r.len).map_err(|e| builder_error(r, e))?;
        }
        segs.check()?;
        let d = &self.domain;
        let g = p.pin_cpu();
        let mut refs = self.refs.lock();
        let mut done: u64 = 0;
        // Ranges this load mapped (fresh pages), for rollback; `pending` is the fresh run
        // being gathered, mapped when it ends.
        st.scratch.clear();
        let mut pending: Option<(u64, u64, MemType)> = None;
        let flush =
            |pending: &mut Option<(u64, u64, MemType)>, mapped: &mut Vec<AddrRange<Iova>>| -> Result<()> {
                if let Some((s, e, mem)) = pending.take() {
                    let pa = PhysAddr::new(s << PAGE_SHIFT);
                    // SAFETY: identity IOVA of pages whose count just went 0 → 1 under the table's
                    // lock: no other load maps them, and they are this load's memory.
                    unsafe {
                        d.map(
                            &g,
                            Iova::identity_of(pa),
                            pa,
                            (e - s) << PAGE_SHIFT,
                            Prot::rw(dir.device_reads(), dir.device_writes()).with_mem(mem),
                        )?
                    };
                    push_range(mapped, s << PAGE_SHIFT, e << PAGE_SHIFT)?;
                }
                Ok(())
            };
        let mut result = Ok(());
        'runs: for r in runs.iter().filter(|r| counted(r)) {
            let mem = mem_type(r.kind);
            for pfn in pages_of(r) {
                let c = match refs.incr(pfn) {
                    Ok(c) => c,
                    Err(err) => {
                        result = Err(err);
                        break 'runs;
                    }
                };
                done += 1;
                if c == 1 {
                    match &mut pending {
                        Some((_, e, m)) if *e == pfn && *m == mem => *e += 1,
                        _ => {
                            if let Err(err) = flush(&mut pending, &mut st.scratch) {
                                result = Err(err);
                                break 'runs;
                            }
                            pending = Some((pfn, pfn + 1, mem));
                        }
                    }
                }
            }
        }
        if result.is_ok() {
            result = flush(&mut pending, &mut st.scratch);
        }
        if let Err(e) = result {
            // Uncount every page counted; unmap exactly the ranges this load mapped.
            let mut none = Vec::new();
            Self::uncount(&mut refs, runs, done, &mut none, false);
            if !st.scratch.is_empty() {
                // SAFETY: exactly the ranges this load mapped (counts back to 0, lock held).
                let _ = unsafe { d.unmap(&g, &st.scratch, &[]) };
            }
            st.scratch.clear();
            return Err(e);
        }
        st.scratch.clear();
        Ok(())
    }

    fn unload(&self, p: &P, st: &mut IdentityState, runs: &[Run], _segs: &[Segment]) -> Result<()> {
        let g = p.pin_cpu();
        let mut refs = self.refs.lock();
        st.scratch.clear();
        Self::uncount(&mut refs, runs, u64::MAX, &mut st.scratch, true);
        let mut r = Ok(());
        if !st.scratch.is_empty() {
            // SAFETY: the pages whose count went back to 0 under the lock: no other load holds
            // them; the identity range is given up (nothing to free).
            r = unsafe { self.domain.unmap(&g, &st.scratch, &[]) }.map(|_| ());
        }
        st.scratch.clear();
        r
    }

    fn destroy(&self, _p: &P, st: IdentityState) {
        self.refs.lock().unreserve(st.reserved);
    }
}
