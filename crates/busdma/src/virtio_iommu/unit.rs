//! The virtio-iommu device: initialisation, feature negotiation, the request queue and the
//! event queue.
#![allow(unsafe_code)] // the transport's constructor and queue setup are unsafe fns

use alloc::vec::Vec;

use crate::addr::{AddrRange, Iova, PhysAddr};
use crate::bounce::{BounceZones, ZoneConfig};
use crate::error::{Error, Result};
use crate::platform::{PageRequest, Platform};
use crate::quickmap::QuickMaps;
use crate::sync::{AtomicBool, AtomicU64, Ordering, SpinLock};

use super::queue::{F_NEXT, F_WRITE, MAX_ENTRIES, SplitQueue};
use super::transport::{ConfigSpace, VirtioPci, status};
use super::wire::{
    self, FAULT_EVENT, FaultRecord, MAX_OUT, Request, ReservedRegion, Status, TAIL, config, feature,
};

const REQUEST_QUEUE: u16 = 0;
const EVENT_QUEUE: u16 = 1;
/// Bytes of one request slot in the request buffer page: the device-readable part at 0
/// (at most [`PROBE_OUT`] = 72 bytes), the tail at [`TAIL_AT`]. 32 slots fill one page.
const SLOT_BYTES: u64 = 128;
const TAIL_AT: u64 = 96;
/// Bytes of one event buffer (a fault event is 24; 32 keeps them aligned).
const EVENT_BYTES: u64 = 32;
/// Tail value written before a request is sent: a tail still holding it after the device
/// returned the buffer was never written.
const NO_ANSWER: u8 = 0xff;
/// Why 10 million polls: QEMU completes requests synchronously inside the notification write
/// under TCG, so the first poll sees them; ten million reads of the used index (well over a
/// second) means the device is not answering.
const POLLS: u32 = 10_000_000;

/// What the device said about itself (read once at initialisation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViommuInfo {
    /// Features both sides accepted.
    pub features: u64,
    /// Page sizes the device maps (bit `n` set: 2^n bytes); the smallest is the granule.
    pub page_size_mask: u64,
    /// IOVAs the device translates, inclusive bounds.
    pub input_first: u64,
    /// Last translatable IOVA (inclusive).
    pub input_last: u64,
    /// Domain numbers the device accepts, inclusive bounds.
    pub domain_first: u32,
    /// Last domain number (inclusive).
    pub domain_last: u32,
    /// Bytes of a PROBE answer's properties (0: no PROBE).
    pub probe_size: u32,
}

impl ViommuInfo {
    /// The smallest page the device maps.
    pub fn granule(&self) -> u64 {
        1u64 << self.page_size_mask.trailing_zeros().min(63)
    }
}

/// Counters (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViommuStats {
    /// Requests completed (any status).
    pub requests: u64,
    /// MAP requests sent.
    pub maps: u64,
    /// UNMAP requests sent.
    pub unmaps: u64,
    /// Notifications of the request queue (each one a VM exit on a real hypervisor).
    pub kicks: u64,
    /// Requests the device answered with an error status.
    pub errors: u64,
    /// Fault records taken from the event queue.
    pub faults: u64,
}

struct Requests {
    q: SplitQueue,
    bufs: PhysAddr,
    probe_in: PhysAddr,
    slots: u16,
}

struct Events {
    q: SplitQueue,
    bufs: PhysAddr,
}

/// A virtio-iommu device, initialised: bypass off, both queues running.
///
/// Dropping it leaves the device as it is: bypass off and, once every domain is gone, no
/// endpoint attached, so every endpoint's DMA is refused. It does not reset the device: a
/// device may return to its default bypass state at reset (the spec leaves it to the device;
/// QEMU restores its `boot-bypass`, on by default, at system reset only), which would let
/// every endpoint reach all of memory after a safe drop. Its five queue
/// pages stay with the device (leaked). [`VirtioIommu::reset`] (`unsafe`) resets and frees.
/// The bounce zones' free pages are freed either way: a page goes back to its zone only once
/// the UNMAP of its last load has completed (a load whose UNMAP failed keeps its pages and
/// its zone forever), and a zone a live load holds outlives the unit (module theory 9).
///
/// # Invariants
///
/// The queue pages stay allocated until the device has been reset ([`VirtioIommu::reset`]).
pub struct VirtioIommu<'p, P: Platform> {
    platform: &'p P,
    quick_maps: &'p QuickMaps,
    /// The bounce zones of the untrusted endpoints (module theory 9): one set for the unit,
    /// as `device::Iommu` has, so the pages a zone grew to stay shared by every endpoint.
    zones: BounceZones<'p, P>,
    t: VirtioPci<'p, P>,
    info: ViommuInfo,
    req: SpinLock<Requests>,
    evt: SpinLock<Events>,
    /// Pages to free after the reset: the two rings, the request buffers, the probe answer
    /// and the event buffers.
    pages: [PhysAddr; 5],
    broken: AtomicBool,
    next_domain: AtomicU64,
    requests: AtomicU64,
    maps: AtomicU64,
    unmaps: AtomicU64,
    kicks: AtomicU64,
    errors: AtomicU64,
    faults: AtomicU64,
}

impl<'p, P: Platform> VirtioIommu<'p, P> {
    /// Resets and initialises the virtio-iommu function whose configuration space `cfg` reads:
    /// negotiates the features (VERSION_1 and MAP_UNMAP required; INPUT_RANGE, DOMAIN_RANGE,
    /// PROBE, BYPASS_CONFIG when offered; never BYPASS), turns bypass off, sets up the request
    /// and event queues and fills the event queue.
    ///
    /// Errors: [`Error::Unsupported`] (a missing feature or structure, fewer than two queues,
    /// a PROBE size over a page), [`Error::BadState`] (the device refused FEATURES_OK or kept
    /// bypass on), [`Error::NoMemory`].
    ///
    /// # Safety
    ///
    /// `cfg` reads the configuration space of a virtio-iommu function the caller owns, whose
    /// BARs are assigned and stay where they are (mapped for the platform's MMIO) for the
    /// driver's life, with memory decoding and bus mastering on, and nothing else driving it.
    /// `quick_maps` is the machine's quick-map state: the bounce copies of untrusted
    /// endpoints use it (module theory 9).
    pub unsafe fn new(platform: &'p P, quick_maps: &'p QuickMaps, cfg: &impl ConfigSpace) -> Result<Self> {
        // SAFETY: the caller's contract is the transport's.
        let t = unsafe { VirtioPci::new(platform, cfg)? };
        t.reset()?;
        t.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = t.device_features();
        if offered & feature::REQUIRED != feature::REQUIRED {
            t.set_status(status::FAILED);
            return Err(Error::Unsupported { what: "virtio-iommu without VERSION_1 or MAP_UNMAP" });
        }
        let features = offered & feature::WANTED;
        t.set_driver_features(features);
        t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        if t.status() & status::FEATURES_OK == 0 {
            t.set_status(status::FAILED);
            return Err(Error::BadState { what: "virtio-iommu refused the negotiated features" });
        }
        let info = read_info(&t, features);
        if info.probe_size as u64 + TAIL as u64 > crate::PAGE_SIZE {
            t.set_status(status::FAILED);
            return Err(Error::Unsupported { what: "virtio-iommu PROBE answer larger than a page" });
        }
        if features & feature::BYPASS_CONFIG != 0 {
            t.device_write8(config::BYPASS, 0);
            if t.device_read8(config::BYPASS) != 0 {
                t.set_status(status::FAILED);
                return Err(Error::BadState { what: "virtio-iommu kept bypass on" });
            }
        }
        if t.num_queues() < 2 {
            t.set_status(status::FAILED);
            return Err(Error::Unsupported { what: "virtio-iommu with fewer than two queues" });
        }
        let mut pages = [PhysAddr::new(0); 5];
        for i in 0..pages.len() {
            match platform.alloc_pages(&PageRequest::pages(1)) {
                Ok(pa) => pages[i] = pa,
                Err(e) => {
                    t.set_status(status::FAILED);
                    for &pa in &pages[..i] {
                        // SAFETY: our fresh pages; the device was never told about them.
                        unsafe { platform.free_pages(pa, 1) };
                    }
                    return Err(e);
                }
            }
        }
        let size = |q| queue_size(t.max_queue_size(q));
        let mut rq = SplitQueue::new(pages[0], size(REQUEST_QUEUE));
        let mut eq = SplitQueue::new(pages[1], size(EVENT_QUEUE));
        let unit = Self {
            platform,
            quick_maps,
            zones: BounceZones::new(platform, ZoneConfig::default()),
            info,
            req: SpinLock::new(Requests {
                q: SplitQueue::new(pages[0], 0),
                bufs: pages[2],
                probe_in: pages[3],
                slots: 0,
            }),
            evt: SpinLock::new(Events { q: SplitQueue::new(pages[1], 0), bufs: pages[4] }),
            pages,
            broken: AtomicBool::new(false),
            next_domain: AtomicU64::new(u64::from(info.domain_first.max(1))),
            requests: AtomicU64::new(0),
            maps: AtomicU64::new(0),
            unmaps: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            t,
        };
        if rq.size() < 2 || eq.size() < 1 {
            unit.t.set_status(status::FAILED);
            return Err(Error::Unsupported { what: "virtio-iommu queue too small" });
        }
        // SAFETY: the ring pages are ours, zeroed, laid out as `layout` says, and freed only
        // after the device is reset (`VirtioIommu::reset`; a drop leaks them).
        rq.notify = unsafe { unit.t.setup_queue(REQUEST_QUEUE, &rq.layout()) };
        // SAFETY: as above.
        eq.notify = unsafe { unit.t.setup_queue(EVENT_QUEUE, &eq.layout()) };
        // Every event buffer is the device's from the start.
        for i in 0..eq.size() {
            let buf = PhysAddr::new(pages[4].raw() + u64::from(i) * EVENT_BYTES);
            let posted = eq
                .set_desc(platform, i, buf, FAULT_EVENT as u32, F_WRITE, 0)
                .and_then(|()| eq.publish(platform, i));
            if let Err(e) = posted {
                unit.t.set_status(status::FAILED);
                return Err(e);
            }
        }
        let slots = (rq.size() / 2).min((crate::PAGE_SIZE / SLOT_BYTES) as u16);
        {
            let mut r = unit.req.lock();
            r.q = rq;
            r.slots = slots;
        }
        unit.evt.lock().q = eq;
        unit.t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        let e = unit.evt.lock();
        unit.t.notify(e.q.notify, EVENT_QUEUE);
        drop(e);
        Ok(unit)
    }

    /// What the device said about itself.
    pub fn info(&self) -> &ViommuInfo {
        &self.info
    }

    /// The platform.
    pub fn platform(&self) -> &'p P {
        self.platform
    }

    /// The bounce zones of the unit's untrusted endpoints (module theory 9).
    pub fn bounce_zones(&self) -> &BounceZones<'p, P> {
        &self.zones
    }

    /// The machine's quick-map state, as given to [`VirtioIommu::new`].
    pub fn quick_maps(&self) -> &'p QuickMaps {
        self.quick_maps
    }

    /// A domain number no other domain of this driver got (numbers are never reused).
    ///
    /// Errors: [`Error::Exhausted`] past the end of the device's domain range.
    pub fn alloc_domain_id(&self) -> Result<u32> {
        let id = self.next_domain.fetch_add(1, Ordering::Relaxed);
        if id > u64::from(self.info.domain_last) {
            return Err(Error::Exhausted { size: 1, limit: u64::from(self.info.domain_last) + 1 });
        }
        Ok(id as u32)
    }

    /// Counters.
    pub fn stats(&self) -> ViommuStats {
        ViommuStats {
            requests: self.requests.load(Ordering::Relaxed),
            maps: self.maps.load(Ordering::Relaxed),
            unmaps: self.unmaps.load(Ordering::Relaxed),
            kicks: self.kicks.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
        }
    }

    /// Sends `reqs` in chunks of as many as the queue holds, one notification per chunk,
    /// and waits for all of them. Each is complete (the device applied it or refused it) when
    /// this returns; the first error status is returned, the others counted.
    ///
    /// Errors: [`Error::RequestFailed`] (the status; 0xff: no answer in time, after which the
    /// driver refuses every request with [`Error::BadState`]), [`Error::ZeroSize`].
    ///
    /// # Safety
    ///
    /// A MAP in `reqs` lets the device reach its physical range: it must be memory the caller
    /// owns for as long as the mapping exists. An ATTACH must name a domain that maps only such
    /// memory, for an endpoint the caller owns.
    pub unsafe fn submit(&self, reqs: &[Request]) -> Result<()> {
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::BadState { what: "virtio-iommu stopped answering" });
        }
        // Every request is encoded once before any is published, so a malformed one (an empty
        // range) is refused with nothing half-sent.
        let mut out = [0u8; MAX_OUT];
        for req in reqs {
            req.encode(&mut out)?;
        }
        let mut r = self.req.lock();
        let mut first_err = None;
        for chunk in reqs.chunks(usize::from(r.slots)) {
            for (i, req) in chunk.iter().enumerate() {
                let len = req.encode(&mut out)?;
                if let Err(e) = self.put_slot(&mut r, i as u16, &out[..len], None) {
                    // Part of the chunk may be published: the queue's state is unknown now.
                    self.broken.store(true, Ordering::Release);
                    return Err(e);
                }
            }
            self.kick(&r);
            self.wait(&mut r, chunk.len())?;
            for (i, req) in chunk.iter().enumerate() {
                let code = self.tail(&r, i as u16, None)?;
                self.count(req);
                if let Err(e) = Status::from_tail(code).check(req) {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The reserved regions of `endpoint` (PROBE); empty when PROBE was not negotiated.
    ///
    /// Errors: as [`VirtioIommu::submit`]; [`Error::InvalidArgument`] for a malformed answer.
    pub fn probe(&self, endpoint: u32) -> Result<Vec<ReservedRegion>> {
        if self.info.features & feature::PROBE == 0 {
            return Ok(Vec::new());
        }
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::BadState { what: "virtio-iommu stopped answering" });
        }
        let mut r = self.req.lock();
        let size = self.info.probe_size;
        self.platform.fill_phys(r.probe_in, u64::from(size), 0)?;
        self.put_slot(&mut r, 0, &wire::encode_probe(endpoint), Some(size))?;
        self.kick(&r);
        self.wait(&mut r, 1)?;
        let code = self.tail(&r, 0, Some(size))?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        if code != 0 {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return Err(Error::RequestFailed {
                request: "PROBE",
                status: code,
                domain: 0,
                addr: u64::from(endpoint),
            });
        }
        let mut props = alloc::vec![0u8; size as usize];
        self.platform.read_phys(r.probe_in, &mut props)?;
        drop(r);
        wire::parse_probe(&props)
    }

    /// The oldest fault record the device reported, if any; its buffer goes back to the
    /// device.
    ///
    /// Errors: a platform copy error.
    pub fn take_fault(&self) -> Result<Option<FaultRecord>> {
        let mut e = self.evt.lock();
        let Some((id, _len)) = e.q.pop_used(self.platform)? else { return Ok(None) };
        let id = (id as u16) % e.q.size();
        let mut b = [0u8; FAULT_EVENT];
        self.platform.read_phys(PhysAddr::new(e.bufs.raw() + u64::from(id) * EVENT_BYTES), &mut b)?;
        e.q.publish(self.platform, id)?;
        self.t.notify(e.q.notify, EVENT_QUEUE);
        self.faults.fetch_add(1, Ordering::Relaxed);
        Ok(Some(FaultRecord::decode(&b)))
    }

    fn count(&self, req: &Request) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match req {
            Request::Map { .. } => self.maps.fetch_add(1, Ordering::Relaxed),
            Request::Unmap { .. } => self.unmaps.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Fills slot `s` with `out` and a fresh tail (after `probe` bytes of properties, for a
    /// PROBE) and makes it available.
    fn put_slot(&self, r: &mut Requests, s: u16, out: &[u8], probe: Option<u32>) -> Result<()> {
        let p = self.platform;
        let base = PhysAddr::new(r.bufs.raw() + u64::from(s) * SLOT_BYTES);
        p.write_phys(base, out)?;
        let (in_at, in_len) = match probe {
            None => (PhysAddr::new(base.raw() + TAIL_AT), TAIL as u32),
            Some(size) => (r.probe_in, size + TAIL as u32),
        };
        let tail_at = PhysAddr::new(in_at.raw() + u64::from(in_len) - TAIL as u64);
        p.write_phys(tail_at, &[NO_ANSWER, 0, 0, 0])?;
        r.q.set_desc(p, 2 * s, base, out.len() as u32, F_NEXT, 2 * s + 1)?;
        r.q.set_desc(p, 2 * s + 1, in_at, in_len, F_WRITE, 0)?;
        r.q.publish(p, 2 * s)
    }

    fn tail(&self, r: &Requests, s: u16, probe: Option<u32>) -> Result<u8> {
        let at = match probe {
            None => r.bufs.raw() + u64::from(s) * SLOT_BYTES + TAIL_AT,
            Some(size) => r.probe_in.raw() + u64::from(size),
        };
        let mut b = [0u8; 1];
        self.platform.read_phys(PhysAddr::new(at), &mut b)?;
        Ok(b[0])
    }

    fn kick(&self, r: &Requests) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
        self.t.notify(r.q.notify, REQUEST_QUEUE);
    }

    /// Waits until the device returned `n` buffers.
    fn wait(&self, r: &mut Requests, n: usize) -> Result<()> {
        let mut got = 0;
        let mut polls = 0;
        while got < n {
            match r.q.pop_used(self.platform)? {
                Some(_) => got += 1,
                None => {
                    polls += 1;
                    if polls >= POLLS {
                        self.broken.store(true, Ordering::Release);
                        return Err(Error::RequestFailed {
                            request: "any",
                            status: NO_ANSWER,
                            domain: 0,
                            addr: 0,
                        });
                    }
                    core::hint::spin_loop();
                }
            }
        }
        Ok(())
    }

    /// The input range as a half-open range (the last byte of a full 64-bit space is left
    /// out: a half-open range cannot end past `u64::MAX`).
    pub fn input_range(&self) -> Result<AddrRange<Iova>> {
        AddrRange::new(Iova::new(self.info.input_first), Iova::new(self.info.input_last.saturating_add(1)))
    }
}

impl<P: Platform> VirtioIommu<'_, P> {
    /// Resets the device and frees its queue pages (dropping the driver does neither: see
    /// [`VirtioIommu`]). Errors: [`Error::BadState`] if the reset never completes; the pages
    /// are then leaked, since the device may still use them.
    ///
    /// # Safety
    ///
    /// A reset device lets endpoints through as its default says: QEMU's `boot-bypass` is on
    /// unless the VMM turned it off, and the spec leaves it to the device. The caller
    /// guarantees that no endpoint behind this virtio-iommu issues DMA from here on, or that
    /// each is trusted with all of guest memory.
    pub unsafe fn reset(self) -> Result<()> {
        self.t.reset()?;
        for &pa in &self.pages {
            // SAFETY: our pages; the device is reset, so it no longer uses them.
            unsafe { self.platform.free_pages(pa, 1) };
        }
        Ok(())
    }
}

fn queue_size(offered: u16) -> u16 {
    let n = offered.min(MAX_ENTRIES);
    if n == 0 { 0 } else { 1 << (15 - n.leading_zeros()) }
}

fn read_info<P: Platform>(t: &VirtioPci<'_, P>, features: u64) -> ViommuInfo {
    let (input_first, input_last) = if features & feature::INPUT_RANGE != 0 {
        (t.device_read64(config::INPUT_START), t.device_read64(config::INPUT_END))
    } else {
        (0, u64::MAX)
    };
    let (domain_first, domain_last) = if features & feature::DOMAIN_RANGE != 0 {
        (t.device_read32(config::DOMAIN_START), t.device_read32(config::DOMAIN_END))
    } else {
        (0, u32::MAX)
    };
    let probe_size = if features & feature::PROBE != 0 { t.device_read32(config::PROBE_SIZE) } else { 0 };
    ViommuInfo {
        features,
        page_size_mask: t.device_read64(config::PAGE_SIZE_MASK),
        input_first,
        input_last,
        domain_first,
        domain_last,
        probe_size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_sizes_are_powers_of_two_at_most_the_offer_and_the_page() {
        assert_eq!(queue_size(256), 64);
        assert_eq!(queue_size(48), 32);
        assert_eq!(queue_size(1), 1);
        assert_eq!(queue_size(0), 0);
    }

    #[test]
    fn the_granule_is_the_smallest_page_of_the_mask() {
        let info = ViommuInfo {
            features: 0,
            page_size_mask: !0xfff,
            input_first: 0,
            input_last: u64::MAX,
            domain_first: 0,
            domain_last: 7,
            probe_size: 0,
        };
        assert_eq!(info.granule(), 4096);
        assert_eq!(ViommuInfo { page_size_mask: !0xffff, ..info }.granule(), 65536);
    }
}
