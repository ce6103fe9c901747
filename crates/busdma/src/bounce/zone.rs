//! Bounce zones: pools of bounce pages, one per distinct constraint.
//!
//! See the theory statement in [`crate::bounce`] (sections 2 to 4).

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::platform::{MemAttr, PageRequest, Placement, Platform};
use crate::sync::SpinLock;

/// The constraint a zone serves: every page lies below `below` and is aligned to `align`.
/// Two tags with the same key share a zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ZoneKey {
    /// Every byte of every page lies below this address (the device's DMA limit), if set.
    pub below: Option<PhysAddr>,
    /// Alignment of each page in bytes (a power of two; values below a page mean a page).
    pub align: u64,
}

impl ZoneKey {
    /// The key for pages below `below` (if any), page-aligned.
    pub const fn below(below: Option<PhysAddr>) -> Self {
        Self { below, align: PAGE_SIZE }
    }

    fn normalized(self) -> Result<Self> {
        if !crate::addr::is_pow2(self.align) {
            return Err(Error::BadAlignment { align: self.align });
        }
        Ok(Self { below: self.below, align: self.align.max(PAGE_SIZE) })
    }

    fn limit(&self) -> u64 {
        self.below.map_or(u64::MAX, PhysAddr::raw)
    }
}

/// How zones grow and where their pages come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneConfig {
    /// Most pages a zone may ever hold.
    pub bound_pages: u64,
    /// Direct-map placement of bounce pages. `Any` by default; `NotDirectMapped` makes every
    /// sync copy go through quick maps (for tests and the bench).
    pub placement: Placement,
}

/// Default bound of a zone: 8192 pages = 32 MiB, FreeBSD's `MAX_BPAGES` on 64-bit machines
/// (enough for 512 maps of a 64 KiB maximum load; small next to the RAM a machine with a DMA
/// limit usually has below it).
pub const DEFAULT_BOUND_PAGES: u64 = 8192;

impl Default for ZoneConfig {
    fn default() -> Self {
        Self { bound_pages: DEFAULT_BOUND_PAGES, placement: Placement::Any }
    }
}

/// Counters of one zone, as read by [`BounceZone::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZoneStats {
    /// Pages the zone holds (free or reserved).
    pub total_pages: u64,
    /// Pages free for reservation.
    pub free_pages: u64,
    /// Reservations waiting for pages.
    pub waiting: u64,
    /// Bounce pages handed to loads so far.
    pub total_bounced: u64,
    /// Loads deferred for lack of pages so far.
    pub total_deferred: u64,
    /// The zone's bound in pages.
    pub bound_pages: u64,
}

/// What a deferred reservation runs when its pages are ready.
pub type OnReady<'p, P> = Box<dyn FnOnce(Reservation<'p, P>) + Send + 'p>;

struct Waiter<'p, P: Platform> {
    pages: u64,
    on_ready: OnReady<'p, P>,
}

struct State<'p, P: Platform> {
    free: Vec<PhysAddr>,
    /// Pages held plus pages being allocated by a concurrent `grow`.
    total: u64,
    waiters: VecDeque<Waiter<'p, P>>,
}

/// A pool of bounce pages meeting one [`ZoneKey`].
///
/// # Invariants
///
/// Every page the zone allocated is either in `free` or in exactly one live [`Reservation`];
/// `total` counts them (plus pages a `grow` is allocating). Waiters are served strictly in
/// arrival order.
pub struct BounceZone<'p, P: Platform> {
    platform: &'p P,
    key: ZoneKey,
    config: ZoneConfig,
    state: SpinLock<State<'p, P>>,
    total_bounced: AtomicU64,
    total_deferred: AtomicU64,
}

impl<'p, P: Platform> BounceZone<'p, P> {
    /// An empty zone for `key`.
    ///
    /// Errors: [`Error::BadAlignment`] (alignment not a power of two).
    pub fn new(platform: &'p P, key: ZoneKey, config: ZoneConfig) -> Result<Self> {
        Ok(Self {
            platform,
            key: key.normalized()?,
            config,
            state: SpinLock::new(State { free: Vec::new(), total: 0, waiters: VecDeque::new() }),
            total_bounced: AtomicU64::new(0),
            total_deferred: AtomicU64::new(0),
        })
    }

    /// The zone's constraint.
    pub fn key(&self) -> ZoneKey {
        self.key
    }

    /// The platform the zone allocates from.
    pub fn platform(&self) -> &'p P {
        self.platform
    }

    /// The zone's counters.
    pub fn stats(&self) -> ZoneStats {
        let s = self.state.lock();
        ZoneStats {
            total_pages: s.total,
            free_pages: s.free.len() as u64,
            waiting: s.waiters.len() as u64,
            total_bounced: self.total_bounced.load(Ordering::Relaxed),
            total_deferred: self.total_deferred.load(Ordering::Relaxed),
            bound_pages: self.config.bound_pages,
        }
    }

    /// Grows the zone for a new map whose loads need up to `pages` bounce pages: adds
    /// `pages` pages, fewer if the bound is reached (FreeBSD's growth at map creation).
    ///
    /// Errors: [`Error::LimitExceeded`] if one load of `pages` could never fit under the bound;
    /// [`Error::NoMemory`] if the platform ran out of pages below the limit (the pages that
    /// were added stay in the zone).
    pub fn grow_for_map(self: &Arc<Self>, pages: u64) -> Result<()> {
        if pages > self.config.bound_pages {
            return Err(Error::LimitExceeded {
                what: "bounce pages of one load over the zone bound",
                requested: pages,
                limit: self.config.bound_pages,
            });
        }
        let want = {
            let mut s = self.state.lock();
            let want = pages.min(self.config.bound_pages - s.total);
            s.total += want;
            want
        };
        // Allocate outside the lock: the platform allocator has its own.
        let mut got = Vec::new();
        let mut err = None;
        for _ in 0..want {
            let req = PageRequest {
                pages: 1,
                align: self.key.align,
                below: self.key.below,
                placement: self.config.placement,
                attr: MemAttr::WriteBack,
            };
            match self.platform.alloc_pages(&req) {
                Ok(pa) => got.push(pa),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        {
            let mut s = self.state.lock();
            s.total -= want - got.len() as u64;
            s.free.extend(got);
        }
        self.serve_waiters();
        match err {
            Some(Error::NoMemory { .. }) => Err(Error::NoMemory { requested: (want * PAGE_SIZE) }),
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn check_fits(&self, pages: u64) -> Result<()> {
        if pages > self.config.bound_pages {
            return Err(Error::LimitExceeded {
                what: "bounce pages of one load over the zone bound",
                requested: pages,
                limit: self.config.bound_pages,
            });
        }
        Ok(())
    }

    /// Reserves `pages` pages now or fails (a no-wait load).
    ///
    /// Errors: [`Error::Exhausted`] (fewer free pages than asked, or earlier requests are
    /// waiting: they are served first) carrying the bytes asked and the zone's limit;
    /// [`Error::LimitExceeded`] (more than the bound); [`Error::ZeroSize`].
    pub fn reserve(self: &Arc<Self>, pages: u64) -> Result<Reservation<'p, P>> {
        if pages == 0 {
            return Err(Error::ZeroSize);
        }
        self.check_fits(pages)?;
        let mut s = self.state.lock();
        if !s.waiters.is_empty() || (s.free.len() as u64) < pages {
            return Err(Error::Exhausted { size: pages.saturating_mul(PAGE_SIZE), limit: self.key.limit() });
        }
        let at = s.free.len() - pages as usize;
        let taken = s.free.split_off(at);
        drop(s);
        Ok(Reservation { zone: self.clone(), pages: taken })
    }

    /// Reserves `pages` pages now, or queues the request (a may-wait load): then it returns
    /// [`Error::InProgress`] and `on_ready` runs with the reservation once pages return,
    /// after every earlier waiter (strict arrival order).
    ///
    /// `on_ready` runs in the context of whoever returns the pages (an unload, a grow), with
    /// no zone lock held; it must not sleep.
    ///
    /// Errors: [`Error::InProgress`] (queued), [`Error::LimitExceeded`], [`Error::ZeroSize`].
    pub fn reserve_or_defer(
        self: &Arc<Self>,
        pages: u64,
        on_ready: OnReady<'p, P>,
    ) -> Result<Reservation<'p, P>> {
        if pages == 0 {
            return Err(Error::ZeroSize);
        }
        self.check_fits(pages)?;
        let mut s = self.state.lock();
        if s.waiters.is_empty() && s.free.len() as u64 >= pages {
            let at = s.free.len() - pages as usize;
            let taken = s.free.split_off(at);
            drop(s);
            return Ok(Reservation { zone: self.clone(), pages: taken });
        }
        s.waiters.push_back(Waiter { pages, on_ready });
        drop(s);
        self.total_deferred.fetch_add(1, Ordering::Relaxed);
        Err(Error::InProgress)
    }

    /// Hands free pages to waiters, head first, while the head fits; runs each callback with
    /// the lock released.
    fn serve_waiters(self: &Arc<Self>) {
        loop {
            let (w, taken) = {
                let mut s = self.state.lock();
                match s.waiters.front() {
                    Some(w) if w.pages <= s.free.len() as u64 => {}
                    _ => return,
                }
                let Some(w) = s.waiters.pop_front() else { return };
                let at = s.free.len() - w.pages as usize;
                let taken = s.free.split_off(at);
                (w, taken)
            };
            (w.on_ready)(Reservation { zone: self.clone(), pages: taken });
        }
    }

    fn give_back(self: &Arc<Self>, pages: &mut Vec<PhysAddr>) {
        if pages.is_empty() {
            return;
        }
        self.state.lock().free.append(pages);
        self.serve_waiters();
    }

    pub(crate) fn count_bounced(&self, pages: u64) {
        self.total_bounced.fetch_add(pages, Ordering::Relaxed);
    }
}

impl<P: Platform> Drop for BounceZone<'_, P> {
    fn drop(&mut self) {
        let s = self.state.get_mut();
        // Reservations hold the zone alive, so every page is free now.
        debug_assert_eq!(s.free.len() as u64, s.total, "bounce zone dropped with pages reserved");
        for pa in s.free.drain(..) {
            // SAFETY: each page came from one `alloc_pages` of one page, is freed once, and no
            // reservation (hence no load, hence no device) holds it.
            unsafe { self.platform.free_pages(pa, 1) };
        }
    }
}

impl<P: Platform> fmt::Debug for BounceZone<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BounceZone").field("key", &self.key).field("stats", &self.stats()).finish()
    }
}

/// Bounce pages reserved from a zone; they go back (and serve waiters) on drop.
///
/// # Invariants
///
/// The pages belong to `zone` and to no other reservation.
pub struct Reservation<'p, P: Platform> {
    zone: Arc<BounceZone<'p, P>>,
    pages: Vec<PhysAddr>,
}

impl<'p, P: Platform> Reservation<'p, P> {
    /// The reserved pages.
    pub fn pages(&self) -> &[PhysAddr] {
        &self.pages
    }

    /// The zone the pages belong to.
    pub fn zone(&self) -> &Arc<BounceZone<'p, P>> {
        &self.zone
    }
}

impl<P: Platform> Drop for Reservation<'_, P> {
    fn drop(&mut self) {
        let zone = self.zone.clone();
        zone.give_back(&mut self.pages);
    }
}

impl<P: Platform> fmt::Debug for Reservation<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation").field("key", &self.zone.key).field("pages", &self.pages).finish()
    }
}

/// The zones of a machine: one per distinct [`ZoneKey`], created on first use.
pub struct BounceZones<'p, P: Platform> {
    platform: &'p P,
    config: ZoneConfig,
    zones: SpinLock<Vec<Arc<BounceZone<'p, P>>>>,
}

impl<'p, P: Platform> BounceZones<'p, P> {
    /// No zones yet; new ones use `config`.
    pub fn new(platform: &'p P, config: ZoneConfig) -> Self {
        Self { platform, config, zones: SpinLock::new(Vec::new()) }
    }

    /// The zone for `key`, created empty if none exists.
    ///
    /// Errors: [`Error::BadAlignment`].
    pub fn zone(&self, key: ZoneKey) -> Result<Arc<BounceZone<'p, P>>> {
        let key = key.normalized()?;
        let mut zones = self.zones.lock();
        if let Some(z) = zones.iter().find(|z| z.key == key) {
            return Ok(z.clone());
        }
        let z = Arc::new(BounceZone::new(self.platform, key, self.config)?);
        zones.push(z.clone());
        Ok(z)
    }

    /// Every zone's key and counters.
    pub fn stats(&self) -> Vec<(ZoneKey, ZoneStats)> {
        let zones: Vec<_> = self.zones.lock().clone();
        zones.iter().map(|z| (z.key, z.stats())).collect()
    }
}

impl<P: Platform> fmt::Debug for BounceZones<'_, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BounceZones").field("zones", &self.stats()).finish()
    }
}
