//! [`Hybrid`]: copy into the pre-mapped pool below a size threshold, map above it.
//!
//! # Theory
//!
//! 1. **The choice per load.** A load of `len` bytes is copied into a pool slot
//!    ([`super::Premapped`]) when `len < threshold`, it fits a slot and every run can be
//!    copied; otherwise the wrapped strategy `S` maps it. A copy that finds the pool
//!    exhausted falls back to mapping (the load still succeeds; `S`'s own exhaustion is the
//!    error). Each map remembers which path its load took; unload and sync follow it.
//! 2. **The threshold** is where copying becomes dearer than mapping on this device.
//!    [`Calibration`] measures, with the platform's clock: copies of a small and of a
//!    slot-sized buffer from slot to slot round a ring of up to 256 free slots, after one
//!    untimed pass (cold copies, as a ring of I/Os cycling through the pool makes them: in
//!    tcpbench a hot copy of one 64 KiB buffer measured ten times cheaper than the workload's);
//!    and [`Calibration::ROUNDS`] IOVA allocations + maps + unmaps (with the domain's
//!    invalidation, strict or queued) of one page and of a slot's pages on the pool's domain
//!    (the device's: the one `S` should map in). Each figure is a trimmed mean (the slowest
//!    quarter dropped: a preempted round says nothing about the device). Both costs are taken
//!    as linear between their two points (copies in bytes, maps in pages), and the threshold
//!    is the smallest multiple of 64 bytes where the copy costs at least the map; if the copy
//!    is cheaper up to a whole slot, every load that fits is copied. Under a virtual IOMMU (a
//!    map request and an invalidation are each a VM exit) that is every load the pool can
//!    hold; with strict invalidation on hardware a few KiB to tens of KiB; with deferred
//!    invalidation less.
//! 3. **Set by the driver.** [`Hybrid::with_threshold`] skips the measurement, and
//!    [`Hybrid::set_threshold`] overrides it; the figures stay readable
//!    ([`Hybrid::calibration`], printable with `Display`).
//! 4. **Calibration's own soundness.** It maps scratch pages of its own, never a client's, and
//!    frees them only after the domain's invalidation of their last unmap has completed
//!    ([`IommuOps::wait_unmapped`]); if that fails they are leaked.

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use crate::addr::{AddrRange, Iova, PAGE_SIZE, PhysAddr};
use crate::dir::{Direction, SyncOp};
use crate::error::{Error, Result};
use crate::front::load::{MemKind, Run};
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::{TagFlags, TagSpec};
use crate::front::strategy::iommu::prot_of;
use crate::front::strategy::{Invalidation, IommuOps, Strategy};
use crate::platform::{PageRequest, Platform};

use super::pool::{Premapped, PremappedPool, PremappedState};

/// What the calibration measured (theory 2), in ns per operation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    /// Bytes of the small copy.
    pub small_bytes: u64,
    /// Bytes of the large copy (a slot).
    pub large_bytes: u64,
    /// Copy of `small_bytes` from slot to slot.
    pub copy_small_ns: f64,
    /// Copy of `large_bytes` from slot to slot.
    pub copy_large_ns: f64,
    /// Allocate + map + unmap (with its invalidation) of one page.
    pub map_page_ns: f64,
    /// The same for a slot's pages.
    pub map_large_ns: f64,
    /// The threshold these figures give: loads below it are copied.
    pub threshold: u64,
}

impl Calibration {
    /// Rounds per figure.
    pub const ROUNDS: usize = 24;

    fn copy_ns(&self, n: u64) -> f64 {
        let (s, l) = (self.small_bytes as f64, self.large_bytes as f64);
        if l <= s {
            return self.copy_large_ns;
        }
        self.copy_small_ns + (self.copy_large_ns - self.copy_small_ns) * (n as f64 - s) / (l - s)
    }

    fn map_ns(&self, n: u64) -> f64 {
        let pages = n.div_ceil(PAGE_SIZE).max(1) as f64;
        let lp = self.large_bytes.div_ceil(PAGE_SIZE).max(1) as f64;
        if lp <= 1.0 {
            return self.map_page_ns;
        }
        self.map_page_ns + (self.map_large_ns - self.map_page_ns) * (pages - 1.0) / (lp - 1.0)
    }

    /// The threshold of theory 2 from these figures.
    fn compute_threshold(&self) -> u64 {
        let mut n = 64;
        while n <= self.large_bytes {
            if self.copy_ns(n) >= self.map_ns(n) {
                return n;
            }
            n += 64;
        }
        self.large_bytes + 1
    }
}

impl fmt::Display for Calibration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "copy {} B {:.0} ns, {} B {:.0} ns; map+unmap 1 page {:.0} ns, {} pages {:.0} ns; threshold {} B",
            self.small_bytes,
            self.copy_small_ns,
            self.large_bytes,
            self.copy_large_ns,
            self.map_page_ns,
            self.large_bytes.div_ceil(PAGE_SIZE),
            self.map_large_ns,
            self.threshold
        )
    }
}

/// Trimmed mean: the slowest quarter dropped.
fn trimmed_mean(v: &mut [u64]) -> f64 {
    v.sort_unstable();
    let keep = (v.len() - v.len() / 4).max(1);
    v[..keep].iter().sum::<u64>() as f64 / keep as f64
}

/// Scratch pages for the calibration, freed on drop unless leaked.
struct Scratch<'p, P: Platform> {
    p: &'p P,
    pa: PhysAddr,
    pages: u64,
    leak: bool,
}

impl<P: Platform> Drop for Scratch<'_, P> {
    fn drop(&mut self) {
        if !self.leak {
            // SAFETY: allocated by `calibrate`; any mapping of them has been invalidated
            // (otherwise `leak` is set).
            unsafe { self.p.free_pages(self.pa, self.pages) };
        }
    }
}

/// Most slots the copy calibration cycles through.
const CAL_SLOTS: usize = 256;

fn calibrate<P: Platform, D: IommuOps<P>>(pool: &PremappedPool<'_, P, D>) -> Result<Calibration> {
    let p = pool.platform();
    let large = pool.slot_bytes();
    let pages = large / PAGE_SIZE;
    let small = 512u64.min(large);
    let mut scratch = Scratch { p, pa: p.alloc_pages(&PageRequest::pages(pages))?, pages, leak: false };
    // Copies: slot to slot around a ring of free slots, as a ring of I/Os cycles through the
    // pool (cold copies: a copy of a hot buffer would flatter the copy; theory 2).
    let mut slots = Vec::new();
    slots.try_reserve_exact(CAL_SLOTS).map_err(|_| Error::NoMemory { requested: (CAL_SLOTS * 4) as u64 })?;
    let g = p.pin_cpu();
    while slots.len() < CAL_SLOTS {
        match pool.take(&g) {
            Some(i) => slots.push(i),
            None => break,
        }
    }
    drop(g);
    let copy = |n: u64| -> Result<f64> {
        let k = slots.len();
        let mut t = Vec::new();
        t.try_reserve_exact(k).map_err(|_| Error::NoMemory { requested: (k * 8) as u64 })?;
        // Two passes round the ring; the first (page faults, first touches) is not timed.
        for pass in 0..2 {
            for j in 0..k {
                let src =
                    pool.slot_pa(slots[j] as usize).ok_or(Error::BadState { what: "calibration slot" })?;
                let run = [Run { pa: src, len: n, kind: MemKind::Page, kva: p.phys_to_kva(src) }];
                let t0 = p.monotonic_ns();
                pool.copy_uncounted(slots[(j + 1) % k], &run, 0..n, true)?;
                if pass == 1 {
                    t.push(p.monotonic_ns() - t0);
                }
            }
        }
        Ok(trimmed_mean(&mut t))
    };
    let copies = if slots.len() < 2 {
        Err(Error::Exhausted { size: large, limit: pool.window().end().raw() })
    } else {
        copy(small).and_then(|s| copy(large).map(|l| (s, l)))
    };
    let g = p.pin_cpu();
    for &i in &slots {
        pool.give(&g, i);
    }
    drop(g);
    let (copy_small_ns, copy_large_ns) = copies?;
    // Maps: allocate, map, unmap (invalidation as the domain does it), in the pool's domain.
    let d = pool.domain();
    let prot = prot_of(MemKind::Page, Direction::ToDevice, TagFlags::default());
    let map = |n: u64| -> Result<f64> {
        let mut t = [0u64; Calibration::ROUNDS + 1];
        for x in &mut t {
            let g = p.pin_cpu();
            let t0 = p.monotonic_ns();
            let w = d.alloc_iova(&g, n * PAGE_SIZE, PAGE_SIZE, d.max_iova())?;
            // SAFETY: `w` was just allocated and is held here; the scratch pages are ours and
            // freed only after the invalidation of this unmap (theory 4).
            if let Err(e) = unsafe { d.map(&g, w.start(), scratch.pa, n * PAGE_SIZE, prot) } {
                // SAFETY: nothing mapped (the failed map undid itself); the window is ours.
                unsafe { d.free_iova(&g, w) };
                return Err(e);
            }
            let mapped = AddrRange::new(w.start(), Iova::new(w.start().raw() + n * PAGE_SIZE))?;
            // SAFETY: the range mapped just above, in the window held here; both given up.
            unsafe { d.unmap(&g, &[mapped], &[w])? };
            *x = p.monotonic_ns() - t0;
        }
        Ok(trimmed_mean(&mut t[1..]))
    };
    let maps = map(1).and_then(|one| map(pages).map(|l| (one, l)));
    if d.wait_unmapped(&p.pin_cpu()).is_err() {
        scratch.leak = true;
    }
    let (map_page_ns, map_large_ns) = maps?;
    let mut c = Calibration {
        small_bytes: small,
        large_bytes: large,
        copy_small_ns,
        copy_large_ns,
        map_page_ns,
        map_large_ns,
        threshold: 0,
    };
    c.threshold = c.compute_threshold();
    Ok(c)
}

/// Copy below a threshold into `pool`, map with `S` at or above it (theory 1).
pub struct Hybrid<'a, 'p, P: Platform, D: IommuOps<P>, S> {
    pool: Premapped<'a, 'p, P, D>,
    map: S,
    threshold: u64,
    calibration: Option<Calibration>,
}

impl<P: Platform, D: IommuOps<P>, S: Clone> Clone for Hybrid<'_, '_, P, D, S> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool,
            map: self.map.clone(),
            threshold: self.threshold,
            calibration: self.calibration,
        }
    }
}

impl<'a, 'p, P: Platform, D: IommuOps<P>, S> Hybrid<'a, 'p, P, D, S> {
    /// The hybrid of `pool` and `map` with the threshold measured now (theory 2). Takes one
    /// slot of the pool for the measurement and gives it back.
    ///
    /// Errors: the pool is exhausted, no memory for the scratch pages, the domain's errors.
    pub fn calibrated(pool: &'a PremappedPool<'p, P, D>, map: S) -> Result<Self> {
        let c = calibrate(pool)?;
        Ok(Self { pool: Premapped(pool), map, threshold: c.threshold, calibration: Some(c) })
    }

    /// The hybrid with a threshold the driver sets (no measurement): loads of fewer than
    /// `threshold` bytes are copied.
    pub fn with_threshold(pool: &'a PremappedPool<'p, P, D>, map: S, threshold: u64) -> Self {
        Self { pool: Premapped(pool), map, threshold, calibration: None }
    }

    /// The same hybrid with the threshold set by the driver (the calibration stays readable).
    pub fn set_threshold(self, threshold: u64) -> Self {
        Self { threshold, ..self }
    }

    /// Loads below this many bytes are copied.
    pub fn threshold(&self) -> u64 {
        self.threshold
    }

    /// What the calibration measured, if it ran.
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// The mapping strategy.
    pub fn mapper(&self) -> &S {
        &self.map
    }
}

/// Which path a hybrid map's load took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Idle,
    Copied,
    Mapped,
}

/// Per-map state of [`Hybrid`]: both paths' states and which one the load took.
pub struct HybridState<M> {
    pool: PremappedState,
    map: M,
    path: Path,
}

impl<M> HybridState<M> {
    /// True if the current load was copied into the pool.
    pub fn copied(&self) -> bool {
        self.path == Path::Copied
    }

    /// True if the current load was mapped.
    pub fn mapped(&self) -> bool {
        self.path == Path::Mapped
    }
}

impl<'p, P: Platform, D: IommuOps<P>, S: Strategy<P>> Strategy<P> for Hybrid<'_, 'p, P, D, S> {
    const NAME: &'static str = "hybrid";
    type MapState = HybridState<S::MapState>;

    fn invalidation(&self) -> Invalidation {
        self.map.invalidation()
    }

    fn check_tag(&self, p: &P, spec: &TagSpec) -> Result<()> {
        self.pool.0.check_reach(spec)?;
        self.map.check_tag(p, spec)
    }

    fn create(&self, p: &P, spec: &TagSpec) -> Result<Self::MapState> {
        Ok(HybridState { pool: PremappedState::new(spec)?, map: self.map.create(p, spec)?, path: Path::Idle })
    }

    fn load(
        &self,
        p: &P,
        spec: &TagSpec,
        st: &mut Self::MapState,
        runs: &[Run],
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        let mut len = 0u64;
        let mut copyable = true;
        for r in runs {
            len = len.saturating_add(r.len);
            copyable &= r.kind.bounceable();
        }
        if copyable && len < self.threshold && len <= self.pool.0.slot_bytes() {
            match self.pool.0.load_into(spec, &mut st.pool, runs, dir, segs) {
                Ok(()) => {
                    st.path = Path::Copied;
                    return Ok(());
                }
                // Nothing was pushed: map instead (theory 1).
                Err(Error::Exhausted { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        self.map.load(p, spec, &mut st.map, runs, dir, segs)?;
        st.path = Path::Mapped;
        Ok(())
    }

    fn unload(&self, p: &P, st: &mut Self::MapState, runs: &[Run], segs: &[Segment]) -> Result<()> {
        let path = core::mem::replace(&mut st.path, Path::Idle);
        match path {
            Path::Copied => self.pool.0.unload_from(&mut st.pool),
            Path::Mapped => self.map.unload(p, &mut st.map, runs, segs),
            Path::Idle => Ok(()),
        }
    }

    fn destroy(&self, p: &P, mut st: Self::MapState) {
        if st.pool.is_loaded() {
            let _ = self.pool.0.unload_from(&mut st.pool);
        }
        self.map.destroy(p, st.map);
    }

    fn wait_unmapped(&self, p: &P) -> Result<()> {
        self.map.wait_unmapped(p)
    }

    fn sync(&self, p: &P, spec: &TagSpec, st: &Self::MapState, op: SyncOp, range: Range<u64>) -> Result<()> {
        match st.path {
            Path::Copied => self.pool.0.sync_of(spec, &st.pool, op, range),
            Path::Mapped => self.map.sync(p, spec, &st.map, op, range),
            Path::Idle => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cal(copy_small: f64, copy_large: f64, map_page: f64, map_large: f64) -> Calibration {
        let mut c = Calibration {
            small_bytes: 512,
            large_bytes: 65536,
            copy_small_ns: copy_small,
            copy_large_ns: copy_large,
            map_page_ns: map_page,
            map_large_ns: map_large,
            threshold: 0,
        };
        c.threshold = c.compute_threshold();
        c
    }

    #[test]
    fn the_threshold_is_where_the_copy_overtakes_the_map() {
        // Copy 20 ns + ~0.05 ns/B; map 1000 ns + 50 ns/page: crossing near 20 KiB.
        let c = cal(45.0, 3300.0, 1000.0, 1750.0);
        assert!(c.threshold > 16 * 1024 && c.threshold < 24 * 1024, "{c}");
        assert!(c.copy_ns(c.threshold) >= c.map_ns(c.threshold));
        assert!(c.copy_ns(c.threshold - 64) < c.map_ns(c.threshold - 64));
    }

    #[test]
    fn a_virtual_iommu_copies_everything_that_fits_and_a_cheap_map_copies_only_the_smallest() {
        // 10 us per map+unmap: every slot-sized load is copied.
        assert_eq!(cal(45.0, 3300.0, 10_000.0, 10_500.0).threshold, 65537);
        // Mapping cheaper than any copy: only loads under the 64-byte step are copied.
        assert_eq!(cal(200.0, 3300.0, 10.0, 20.0).threshold, 64);
    }
}
