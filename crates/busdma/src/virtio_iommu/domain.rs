//! A domain of a virtio-iommu: an IOVA space (the device's input range, minus the endpoint's
//! reserved regions) whose mappings are MAP requests and whose removals are UNMAP requests,
//! sent at once (strict) or in batches (deferred).
#![allow(unsafe_code)] // map is an unsafe fn: the caller lends the memory to the device

use alloc::vec::Vec;

use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::error::{Error, Result};
use crate::iommu::InvalidationPolicy;
use crate::iova::{IovaAllocator, IovaConfig, IovaRequest, IovaSource};
use crate::pgtable::Prot;
use crate::platform::{CpuGuard, Platform};
use crate::sync::{AtomicU64, Ordering, SpinLock};

use super::mutant;
use super::unit::VirtioIommu;
use super::wire::{Request, ReservedRegion, map_flags};

/// A live mapping of a [`ViommuDomain`]: give it back with [`ViommuDomain::unmap`]. Dropping
/// it instead leaves the range mapped (and its IOVA taken) until the domain is dropped, which
/// detaches the endpoint: a leak, never a reuse.
#[must_use = "a mapping stays live until given back to ViommuDomain::unmap"]
#[derive(Debug, PartialEq, Eq)]
pub struct ViommuMapping {
    range: AddrRange<Iova>,
    allocated: bool,
    /// The domain that made it: (its unit's address, its number). The unit is borrowed by
    /// every domain, so its address is stable while a mapping of it can exist.
    owner: (usize, u32),
}

impl ViommuMapping {
    /// The bus address of the mapping's first byte.
    pub fn iova(&self) -> Iova {
        self.range.start()
    }

    /// The mapped IOVA range (whole granules).
    pub fn range(&self) -> AddrRange<Iova> {
        self.range
    }
}

/// Counters of a domain (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViommuDomainStats {
    /// Mappings made.
    pub maps: u64,
    /// Mappings given back.
    pub unmaps: u64,
    /// Batches of UNMAP requests sent by deferred flushes.
    pub flushes: u64,
    /// IOVA ranges held back forever because their UNMAP failed.
    pub held_back: u64,
}

/// The deferred queue: ranges to UNMAP and ranges to free after, for the batch `batch`.
struct Pending {
    unmap: Vec<AddrRange<Iova>>,
    free: Vec<AddrRange<Iova>>,
    oldest_ns: u64,
    /// The number of the batch now collecting; every earlier one has been taken by a flush.
    batch: u64,
}

/// Proof of an unmap: the deferred batch it joined (`None`: strict, done on return). Pass it
/// to `ensure_flushed` (the front end's `IommuOps`) before reusing the IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViommuTicket(Option<u64>);

/// One endpoint's domain on a virtio-iommu (module theory 3–6).
pub struct ViommuDomain<'v, 'p, P: Platform> {
    unit: &'v VirtioIommu<'p, P>,
    id: u32,
    endpoint: u32,
    granule: u64,
    reserved: Vec<ReservedRegion>,
    iova: IovaAllocator,
    policy: InvalidationPolicy,
    pending: SpinLock<Pending>,
    /// Serialises flushes, so batches complete in order and `done` only grows.
    flushing: SpinLock<()>,
    /// Batches `< done` have completed: the device can no longer reach their ranges.
    done: AtomicU64,
    maps: AtomicU64,
    unmaps: AtomicU64,
    flushes: AtomicU64,
    held_back: AtomicU64,
    /// Whether the endpoint is still attached (DETACH not sent yet).
    attached: bool,
    /// Untrusted (module theory 9): strict, a guard page after every allocation.
    untrusted: bool,
}

impl<'v, 'p, P: Platform> ViommuDomain<'v, 'p, P> {
    /// Creates a domain for `endpoint` whose allocated IOVA lies in `aperture` (clipped to the
    /// device's input range), learns the endpoint's reserved regions (PROBE) and keeps them
    /// out of the IOVA space, then attaches the endpoint: from then on it reaches only what
    /// this domain maps.
    ///
    /// Errors: [`Error::InvalidArgument`] (nothing of the aperture is translatable, a zero
    /// queue bound), the driver's request errors, [`Error::NoMemory`].
    pub fn new(
        unit: &'v VirtioIommu<'p, P>,
        endpoint: u32,
        aperture: AddrRange<Iova>,
        policy: InvalidationPolicy,
    ) -> Result<Self> {
        Self::build(unit, endpoint, aperture, policy, false)
    }

    /// As [`ViommuDomain::new`], for an endpoint assumed hostile (module theory 9): strict
    /// (every UNMAP complete before its unmap returns, nothing queued) and a never-mapped
    /// guard page after every allocated range, so a device running off the end of one load
    /// faults instead of reaching the next.
    ///
    /// Errors: as [`ViommuDomain::new`].
    pub fn new_untrusted(
        unit: &'v VirtioIommu<'p, P>,
        endpoint: u32,
        aperture: AddrRange<Iova>,
    ) -> Result<Self> {
        Self::build(unit, endpoint, aperture, InvalidationPolicy::Strict, true)
    }

    fn build(
        unit: &'v VirtioIommu<'p, P>,
        endpoint: u32,
        aperture: AddrRange<Iova>,
        policy: InvalidationPolicy,
        untrusted: bool,
    ) -> Result<Self> {
        // An untrusted endpoint is strict whatever was asked (as `crate::iommu` theory 7).
        let policy = if untrusted { InvalidationPolicy::Strict } else { policy };
        if matches!(
            policy,
            InvalidationPolicy::Deferred { max_entries: 0, .. }
                | InvalidationPolicy::Deferred { max_age_ns: 0, .. }
        ) {
            return Err(Error::InvalidArgument { what: "deferred policy bound of 0", value: 0 });
        }
        let granule = unit.info().granule().max(crate::PAGE_SIZE);
        let space = unit.input_range()?.intersection(&aperture).and_then(|r| r.align_out(1).ok()).ok_or(
            Error::InvalidArgument {
                what: "aperture outside the input range",
                value: aperture.start().raw(),
            },
        )?;
        // Shrink to whole granules.
        let start = space
            .start()
            .align_up(granule)
            .ok_or(Error::Overflow { base: space.start().raw(), len: granule })?;
        let end = space.end().align_down(granule);
        let space = AddrRange::new(start, end)?;
        let reserved = unit.probe(endpoint)?;
        let iova = IovaAllocator::new(
            space,
            IovaConfig {
                cpus: unit.platform().num_cpus(),
                caches: false,
                // A hostile device must not run off the end of one load into the next.
                guard_page: untrusted && !mutant::NO_GUARD,
            },
        )?;
        if !mutant::IGNORE_RESERVED {
            for r in &reserved {
                if let Some(hole) = r.range.intersection(&space) {
                    iova.reserve(hole.align_out(granule)?)?;
                }
            }
        }
        let id = unit.alloc_domain_id()?;
        // SAFETY: a fresh domain number (never handed out before) maps nothing yet.
        unsafe { unit.submit(&[Request::Attach { domain: id, endpoint }])? };
        Ok(Self {
            unit,
            id,
            endpoint,
            granule,
            reserved,
            iova,
            policy,
            pending: SpinLock::new(Pending { unmap: Vec::new(), free: Vec::new(), oldest_ns: 0, batch: 0 }),
            flushing: SpinLock::new(()),
            done: AtomicU64::new(0),
            maps: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
            attached: true,
            untrusted,
        })
    }

    /// The domain number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The endpoint.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }

    /// The mapping granule: the device's smallest page, at least [`crate::PAGE_SIZE`].
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// The policy (strict for an untrusted domain, whatever was asked).
    pub fn policy(&self) -> InvalidationPolicy {
        self.policy
    }

    /// Whether the domain is untrusted ([`ViommuDomain::new_untrusted`]).
    pub fn untrusted(&self) -> bool {
        self.untrusted
    }

    /// The IOVA space the domain allocates from (whole granules, reserved regions excluded
    /// from allocation).
    pub fn space(&self) -> AddrRange<Iova> {
        self.iova.space()
    }

    /// The endpoint's reserved regions, as PROBE reported them.
    pub fn reserved(&self) -> &[ReservedRegion] {
        &self.reserved
    }

    /// UNMAPs queued by the deferred policy, not yet sent.
    pub fn pending(&self) -> usize {
        self.pending.lock().unmap.len()
    }

    /// Counters.
    pub fn stats(&self) -> ViommuDomainStats {
        ViommuDomainStats {
            maps: self.maps.load(Ordering::Relaxed),
            unmaps: self.unmaps.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            held_back: self.held_back.load(Ordering::Relaxed),
        }
    }

    /// Maps `len` bytes at `pa` (both multiples of the granule) at IOVA the domain allocates
    /// below `limit` (the device's DMA mask + 1): one MAP request.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::Misaligned`], [`Error::Exhausted`] (after
    /// sending queued UNMAPs), the device's [`Error::RequestFailed`] (the IOVA is freed).
    ///
    /// # Safety
    ///
    /// `[pa, pa + len)` is memory the caller owns and keeps (neither freed nor reused) until
    /// the mapping is unmapped and, for a deferred domain, [`ViommuDomain::flush`] (or a flush
    /// the queue bounds force) has sent its UNMAP.
    pub unsafe fn map(
        &self,
        g: &CpuGuard<'_, P>,
        pa: PhysAddr,
        len: u64,
        limit: Iova,
        prot: Prot,
    ) -> Result<ViommuMapping> {
        self.check_granules(pa, len)?;
        let range = self.alloc(g, len, self.granule, limit)?;
        // SAFETY: the caller lends `[pa, pa + len)` per this function's contract.
        match unsafe { self.send_map(range, pa, prot) } {
            Ok(()) => Ok(ViommuMapping { range, allocated: true, owner: self.owner() }),
            Err(e) => {
                // A refused MAP mapped nothing: the IOVA is reusable at once.
                self.iova.free(g, range)?;
                Err(e)
            }
        }
    }

    /// Maps `[pa, pa + len)` at the fixed IOVA `iova`, which must lie outside the allocator's
    /// space (a window the caller manages) and outside every reserved region.
    ///
    /// Errors: [`Error::Misaligned`], [`Error::BadWindow`] (overlaps a reserved region: its
    /// bounds), [`Error::InvalidArgument`] (inside the allocated space or outside the input
    /// range), the device's errors.
    ///
    /// # Safety
    ///
    /// As for [`ViommuDomain::map`].
    pub unsafe fn map_at(&self, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<ViommuMapping> {
        self.check_granules(pa, len)?;
        if !iova.is_aligned(self.granule) {
            return Err(Error::Misaligned { value: iova.raw(), align: self.granule });
        }
        let range = AddrRange::from_start_len(iova, len)?;
        let hit = if mutant::IGNORE_RESERVED {
            None
        } else {
            self.reserved.iter().find(|r| r.range.overlaps(&range))
        };
        if let Some(r) = hit {
            return Err(Error::BadWindow {
                what: "IOVA range overlaps a reserved region of the endpoint",
                low: r.range.start().raw(),
                high: r.range.end().raw(),
            });
        }
        if range.overlaps(&self.iova.space()) {
            return Err(Error::InvalidArgument {
                what: "fixed IOVA inside the allocated space",
                value: iova.raw(),
            });
        }
        if !self.unit.input_range()?.contains_range(&range) {
            return Err(Error::InvalidArgument {
                what: "fixed IOVA outside the input range",
                value: iova.raw(),
            });
        }
        // SAFETY: the caller's contract.
        unsafe { self.send_map(range, pa, prot)? };
        Ok(ViommuMapping { range, allocated: false, owner: self.owner() })
    }

    /// Gives a mapping back. Strict: one UNMAP request, complete when this returns `Ok`, then
    /// the IOVA is free. Deferred: queued; a batch of UNMAPs (one notification) goes out when
    /// the queue holds its bound or its oldest entry is old enough.
    ///
    /// Errors: the device's [`Error::RequestFailed`] for a failed UNMAP: the range may still be
    /// mapped, so its IOVA is held back, never reused. [`Error::InvalidArgument`] for a
    /// mapping of another domain: nothing is sent and the mapping stays live (a leak: its
    /// memory stays lent to the device).
    pub fn unmap(&self, g: &CpuGuard<'_, P>, m: ViommuMapping) -> Result<()> {
        if m.owner != self.owner() {
            return Err(Error::InvalidArgument {
                what: "mapping of another virtio-iommu domain",
                value: m.range.start().raw(),
            });
        }
        if m.allocated {
            self.unmap_ranges(g, &[m.range], &[m.range]).map(|_| ())
        } else {
            // Fixed mappings are the caller's windows: strict, so the window can be mapped
            // again as soon as this returns.
            self.unmaps.fetch_add(1, Ordering::Relaxed);
            self.send_unmaps(&[m.range])
        }
    }

    /// Sends every queued UNMAP in one batch (one notification per queue-full) and frees
    /// their IOVA once the device has completed them.
    ///
    /// Errors: the device's; the batch is queued again (nothing freed) for a later flush.
    pub fn flush(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        let _serial = self.flushing.lock();
        let (unmap, free, batch) = {
            let mut p = self.pending.lock();
            let b = p.batch;
            p.batch += 1;
            (core::mem::take(&mut p.unmap), core::mem::take(&mut p.free), b)
        };
        if !unmap.is_empty() {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.send_unmaps(&unmap) {
                let mut p = self.pending.lock();
                if p.unmap.is_empty() {
                    p.oldest_ns = self.unit.platform().monotonic_ns();
                }
                // Held back: queued again (in the batch now collecting), never freed before a
                // flush that succeeds. Extending cannot fail for want of memory: the vectors
                // were taken whole, so the queue's own are at most as long.
                p.unmap.extend_from_slice(&unmap);
                p.free.extend_from_slice(&free);
                return Err(e);
            }
        }
        let mut first_err = Ok(());
        for &r in &free {
            if let Err(e) = self.iova.free(g, r) {
                first_err = first_err.and(Err(e));
            }
        }
        self.done.fetch_max(batch + 1, Ordering::Release);
        first_err
    }

    /// Allocates `size` bytes of IOVA aligned to `align` (at least the granule) ending at or
    /// below `limit` (exclusive); a deferred domain that finds the space exhausted with UNMAPs
    /// queued flushes them and retries once.
    pub(crate) fn alloc(
        &self,
        g: &CpuGuard<'_, P>,
        size: u64,
        align: u64,
        limit: Iova,
    ) -> Result<AddrRange<Iova>> {
        self.flush_if_due(g)?;
        let req = IovaRequest { size, align: align.max(self.granule), boundary: 0, limit };
        match self.iova.alloc(g, &req) {
            Err(Error::Exhausted { .. }) if self.pending() > 0 => {
                self.flush(g)?;
                self.iova.alloc(g, &req)
            }
            other => other,
        }
    }

    /// Gives back IOVA that is not mapped (never was, or its UNMAP completed).
    pub(crate) fn free_range(&self, g: &CpuGuard<'_, P>, r: AddrRange<Iova>) -> Result<()> {
        self.iova.free(g, r)
    }

    /// MAPs `[iova, iova + len)` (whole granules, IOVA the caller holds) to `pa`.
    ///
    /// # Safety
    ///
    /// As for [`ViommuDomain::map`]; the caller holds the IOVA range.
    pub(crate) unsafe fn map_range(&self, iova: Iova, pa: PhysAddr, len: u64, prot: Prot) -> Result<()> {
        self.check_granules(pa, len)?;
        if !iova.is_aligned(self.granule) {
            return Err(Error::Misaligned { value: iova.raw(), align: self.granule });
        }
        // SAFETY: the caller's contract.
        unsafe { self.send_map(AddrRange::from_start_len(iova, len)?, pa, prot) }
    }

    /// UNMAPs `mapped` and gives `free` back: strict, one batch now (then the IOVA is free);
    /// deferred, queued (a flush when the bounds say).
    ///
    /// Errors: the device's (strict: nothing freed, held back).
    pub(crate) fn unmap_ranges(
        &self,
        g: &CpuGuard<'_, P>,
        mapped: &[AddrRange<Iova>],
        free: &[AddrRange<Iova>],
    ) -> Result<ViommuTicket> {
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        match self.policy {
            InvalidationPolicy::Strict => {
                self.send_unmaps(mapped)?;
                for &r in free {
                    self.iova.free(g, r)?;
                }
                Ok(ViommuTicket(None))
            }
            InvalidationPolicy::Deferred { max_entries, .. } => {
                let (full, batch) = {
                    let mut p = self.pending.lock();
                    p.unmap.try_reserve(mapped.len()).map_err(|_| Error::NoMemory { requested: 16 })?;
                    p.free.try_reserve(free.len()).map_err(|_| Error::NoMemory { requested: 16 })?;
                    if p.unmap.is_empty() {
                        p.oldest_ns = self.unit.platform().monotonic_ns();
                    }
                    p.unmap.extend_from_slice(mapped);
                    p.free.extend_from_slice(free);
                    (p.unmap.len() >= max_entries, p.batch)
                };
                if full {
                    self.flush(g)?;
                } else {
                    self.flush_if_due(g)?;
                }
                Ok(ViommuTicket(Some(batch)))
            }
        }
    }

    /// Whether the unmap of `t` has completed, without waiting.
    pub fn is_flushed(&self, t: ViommuTicket) -> bool {
        t.0.is_none_or(|b| self.done.load(Ordering::Acquire) > b)
    }

    /// Returns once the unmap of `t` has completed (flushing if it is still queued).
    ///
    /// Errors: the device's.
    pub fn ensure_flushed(&self, g: &CpuGuard<'_, P>, t: ViommuTicket) -> Result<()> {
        if self.is_flushed(t) { Ok(()) } else { self.flush(g) }
    }

    fn owner(&self) -> (usize, u32) {
        (core::ptr::from_ref(self.unit) as usize, self.id)
    }

    fn flush_if_due(&self, g: &CpuGuard<'_, P>) -> Result<()> {
        let InvalidationPolicy::Deferred { max_age_ns, .. } = self.policy else { return Ok(()) };
        let due = {
            let p = self.pending.lock();
            !p.unmap.is_empty()
                && self.unit.platform().monotonic_ns().saturating_sub(p.oldest_ns) >= max_age_ns
        };
        if due { self.flush(g) } else { Ok(()) }
    }

    fn check_granules(&self, pa: PhysAddr, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if !pa.is_aligned(self.granule) {
            return Err(Error::Misaligned { value: pa.raw(), align: self.granule });
        }
        if len % self.granule != 0 {
            return Err(Error::Misaligned { value: len, align: self.granule });
        }
        Ok(())
    }

    /// # Safety
    ///
    /// As for [`ViommuDomain::map`].
    unsafe fn send_map(&self, range: AddrRange<Iova>, pa: PhysAddr, prot: Prot) -> Result<()> {
        let mut flags = 0;
        if prot.read {
            flags |= map_flags::READ;
        }
        if prot.write {
            flags |= map_flags::WRITE;
        }
        let pa = if mutant::WRONG_RANGE { PhysAddr::new(pa.raw() + self.granule) } else { pa };
        // SAFETY: the caller lends the memory (this function's contract).
        unsafe { self.unit.submit(&[Request::Map { domain: self.id, range, pa, flags }])? };
        self.maps.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// UNMAPs `ranges` (one batch: one notification per queue-full), complete on `Ok`.
    fn send_unmaps(&self, ranges: &[AddrRange<Iova>]) -> Result<()> {
        if mutant::SKIP_UNMAP || ranges.is_empty() {
            return Ok(());
        }
        let mut reqs = Vec::new();
        reqs.try_reserve_exact(ranges.len())
            .map_err(|_| Error::NoMemory { requested: ranges.len() as u64 })?;
        reqs.extend(ranges.iter().map(|&range| Request::Unmap { domain: self.id, range }));
        // SAFETY: UNMAP takes reach away; it lends nothing.
        if let Err(e) = unsafe { self.unit.submit(&reqs) } {
            self.held_back.fetch_add(ranges.len() as u64, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }
}

impl<P: Platform> ViommuDomain<'_, '_, P> {
    /// Sends the queued UNMAPs, then DETACH: from then on the endpoint reaches nothing. What
    /// the drop does, with its error reported.
    ///
    /// Errors: the device's, for the flush (the queued ranges stay held back, never freed)
    /// or the DETACH (the endpoint may still reach the domain's mappings, whose memory the
    /// callers had to keep until their unmaps completed: nothing is freed here but IOVA
    /// bookkeeping). The drop that follows sends nothing more.
    pub fn detach(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        let g = self.unit.platform().pin_cpu();
        let flushed = self.flush(&g);
        drop(g);
        // SAFETY: DETACH takes reach away; it lends nothing.
        let detached =
            unsafe { self.unit.submit(&[Request::Detach { domain: self.id, endpoint: self.endpoint }]) };
        flushed.and(detached)
    }
}

impl<P: Platform> Drop for ViommuDomain<'_, '_, P> {
    fn drop(&mut self) {
        // A drop cannot report: [`ViommuDomain::detach`] does.
        let _ = self.teardown();
    }
}
