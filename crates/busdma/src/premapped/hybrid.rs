//! [`Hybrid`]: copy into the pre-mapped pool below a size threshold, map above it.
//!
//! # Theory
//!
//! 1. **The choice per load.** A load of `len` bytes in `r` runs is copied into a pool slot
//!    ([`super::Premapped`]) when `len` is below the threshold for `r` runs, it fits a slot
//!    and every run can be copied; otherwise the wrapped strategy `S` maps it. A copy that finds the pool
//!    exhausted falls back to mapping (the load still succeeds; `S`'s own exhaustion is the
//!    error). Each map remembers which path its load took; unload and sync follow it.
//! 2. **The threshold** is where copying becomes dearer than mapping on this device.
//!    [`Calibration`] measures, with the platform's clock and for the driver's tag spec, a
//!    whole load + PREWRITE sync + unload of a small (512-byte) and of a large (the tag's
//!    largest load, at most a slot) buffer through each path, as the strategies run them: the
//!    copy path into the pool, and `S` (allocation, map, unmap with the domain's
//!    invalidation, strict or queued). The client buffers are taken round a ring of up to 256
//!    free pool slots, after one untimed pass, alternating the two paths, so both read cold
//!    buffers as a ring of I/Os does (a hot copy of one 64 KiB buffer measured ten times
//!    cheaper than tcpbench's). Each figure is a trimmed mean (the slowest quarter dropped: a
//!    preempted round says nothing about the device). Both costs are taken as linear between
//!    their two points (copies in bytes, maps in pages). A third measurement, the small load
//!    split in two runs (two slots), gives what each further run adds to either path: on the
//!    map path a map request each, which under a virtual IOMMU is a VM exit. So a threshold
//!    is kept per run count (1 to [`MAX_RUNS`]): the smallest multiple of 64 bytes where the
//!    copy of a load of that many runs costs at least its map; if the copy is cheaper up to
//!    the large size, every load that fits a slot is copied. Under a virtual IOMMU (a map
//!    request and an invalidation are each a VM exit) that is every load the pool can hold.
//! 3. **Set by the driver.** [`Hybrid::with_threshold`] skips the measurement, and
//!    [`Hybrid::set_threshold`] overrides it; the figures stay readable
//!    ([`Hybrid::calibration`], printable with `Display`).
//! 4. **Calibration's own soundness.** Its client buffers are pool slots it holds, which
//!    the pool never frees while mapped; `S` maps them a second time, at IOVA of its own, and
//!    unmaps them; the calibration then waits for those invalidations
//!    ([`Strategy::wait_unmapped`]), and if that fails the pool leaks its pages at drop instead
//!    of freeing pages a stale translation may still reach. Nothing it does is counted in the
//!    pool's counters.

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use crate::addr::PAGE_SIZE;
use crate::dir::{Direction, SyncOp};
use crate::error::{Error, Result};
use crate::front::load::{MemKind, Run};
use crate::front::segments::{Segment, SegmentBuilder};
use crate::front::spec::TagSpec;
use crate::front::strategy::{Invalidation, IommuOps, Strategy};
use crate::platform::Platform;

use super::pool::{Premapped, PremappedPool, PremappedState};

/// Run counts the thresholds are kept for; loads of more runs use the last.
pub const MAX_RUNS: usize = 8;

/// What the calibration measured (theory 2), in ns per operation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    /// Bytes of the small load.
    pub small_bytes: u64,
    /// Bytes of the large load (the tag's largest, at most a slot).
    pub large_bytes: u64,
    /// Copy path, `small_bytes` in one run.
    pub copy_small_ns: f64,
    /// Copy path, `large_bytes` in one run.
    pub copy_large_ns: f64,
    /// Map path (allocate, map, unmap with its invalidation), one page in one run.
    pub map_page_ns: f64,
    /// Map path, `large_bytes` in one run.
    pub map_large_ns: f64,
    /// What each run after the first adds to the copy path (`small_bytes` in two runs).
    pub copy_run_ns: f64,
    /// What each run after the first adds to the map path: a map request each.
    pub map_run_ns: f64,
    /// The thresholds these figures give for loads of 1, 2, ... [`MAX_RUNS`] runs: loads
    /// below them are copied.
    pub thresholds: [u64; MAX_RUNS],
    /// `thresholds[0]`: one run.
    pub threshold: u64,
}

impl Calibration {
    /// Rounds per figure.
    pub const ROUNDS: usize = 24;

    fn copy_ns(&self, n: u64, runs: usize) -> f64 {
        let (s, l) = (self.small_bytes as f64, self.large_bytes as f64);
        let extra = self.copy_run_ns.max(0.0) * runs.saturating_sub(1) as f64;
        if l <= s {
            return self.copy_large_ns + extra;
        }
        self.copy_small_ns + (self.copy_large_ns - self.copy_small_ns) * (n as f64 - s) / (l - s) + extra
    }

    fn map_ns(&self, n: u64, runs: usize) -> f64 {
        let pages = n.div_ceil(PAGE_SIZE).max(1) as f64;
        let lp = self.large_bytes.div_ceil(PAGE_SIZE).max(1) as f64;
        let extra = self.map_run_ns.max(0.0) * runs.saturating_sub(1) as f64;
        if lp <= 1.0 {
            return self.map_page_ns + extra;
        }
        self.map_page_ns + (self.map_large_ns - self.map_page_ns) * (pages - 1.0) / (lp - 1.0) + extra
    }

    /// The threshold of theory 2 for loads of `runs` runs.
    fn compute_threshold(&self, runs: usize) -> u64 {
        let mut n = 64;
        while n <= self.large_bytes {
            if self.copy_ns(n, runs) >= self.map_ns(n, runs) {
                return n;
            }
            n += 64;
        }
        self.large_bytes + 1
    }

    fn compute_thresholds(&mut self) {
        for r in 0..MAX_RUNS {
            self.thresholds[r] = self.compute_threshold(r + 1);
        }
        self.threshold = self.thresholds[0];
    }
}

impl fmt::Display for Calibration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "copy {} B {:.0} ns, {} B {:.0} ns, +{:.0} ns a run; map+unmap 1 page {:.0} ns, {} pages {:.0} ns, \
             +{:.0} ns a run; threshold {} B (1 run), {} B (2), {} B (3)",
            self.small_bytes,
            self.copy_small_ns,
            self.large_bytes,
            self.copy_large_ns,
            self.copy_run_ns,
            self.map_page_ns,
            self.large_bytes.div_ceil(PAGE_SIZE),
            self.map_large_ns,
            self.map_run_ns,
            self.thresholds[0],
            self.thresholds[1],
            self.thresholds[2]
        )
    }
}

/// Trimmed mean: the slowest quarter dropped.
fn trimmed_mean(v: &mut [u64]) -> f64 {
    v.sort_unstable();
    let keep = (v.len() - v.len() / 4).max(1);
    v[..keep].iter().sum::<u64>() as f64 / keep as f64
}

/// Most pool slots the calibration uses as cold client buffers.
const CAL_SLOTS: usize = 256;

/// Calibration (theory 2): end-to-end load + PREWRITE sync + unload of an `n`-byte buffer
/// through the copy path and through `map`, alternating, the client buffers taken round a
/// ring of free pool slots.
fn calibrate<P: Platform, D: IommuOps<P>, S: Strategy<P>>(
    pool: &PremappedPool<'_, P, D>,
    map: &S,
    spec: &TagSpec,
) -> Result<Calibration> {
    let p = pool.platform();
    let large = spec.max_size.min(pool.slot_bytes());
    let small = 512u64.min(large);
    let mut spec = *spec;
    spec.max_size = large;
    spec.max_segments = spec.max_segments.max(1);
    // Client buffers: free slots held for the calibration, one left for the copy path.
    let mut held = Vec::new();
    held.try_reserve_exact(CAL_SLOTS).map_err(|_| Error::NoMemory { requested: (CAL_SLOTS * 4) as u64 })?;
    let g = p.pin_cpu();
    while held.len() < CAL_SLOTS {
        match pool.take(&g, false) {
            Some(i) => held.push(i),
            None => break,
        }
    }
    drop(g);
    if let Some(i) = held.pop() {
        pool.give(i);
    }
    let r = if held.is_empty() {
        Err(Error::Exhausted { size: pool.slot_bytes(), limit: pool.window().end().raw() })
    } else {
        let run_both =
            |n: u64, runs: usize| -> Result<(f64, f64)> { measure(pool, map, &spec, &held, n, runs) };
        run_both(small, 1).and_then(|s| {
            let l = run_both(large, 1)?;
            // Two runs need two client buffers and room for two segments.
            let two = if held.len() >= 2 && spec.max_segments >= 2 { run_both(small, 2)? } else { s };
            Ok((s, l, two))
        })
    };
    for &i in &held {
        pool.give(i);
    }
    // The map path mapped pool pages: wait for those unmaps before anyone relies on the pool
    // being the only mapping of its pages (theory 4).
    if map.wait_unmapped(p).is_err() {
        pool.leak_on_drop();
    }
    let ((copy_small_ns, map_page_ns), (copy_large_ns, map_large_ns), (copy_two, map_two)) = r?;
    let mut c = Calibration {
        small_bytes: small,
        large_bytes: large,
        copy_small_ns,
        copy_large_ns,
        map_page_ns,
        map_large_ns,
        copy_run_ns: copy_two - copy_small_ns,
        map_run_ns: map_two - map_page_ns,
        thresholds: [0; MAX_RUNS],
        threshold: 0,
    };
    c.compute_thresholds();
    Ok(c)
}

/// Trimmed-mean ns of (copy path, map path) for `n`-byte loads in `nruns` runs (1 or 2, each
/// in its own slot of `held`).
fn measure<P: Platform, D: IommuOps<P>, S: Strategy<P>>(
    pool: &PremappedPool<'_, P, D>,
    map: &S,
    spec: &TagSpec,
    held: &[u32],
    n: u64,
    nruns: usize,
) -> Result<(f64, f64)> {
    let p = pool.platform();
    let k = held.len();
    let mut pst = PremappedState::new(spec)?;
    let mut mst = map.create(p, spec)?;
    let mut segs = Vec::new();
    let (mut tc, mut tm) = (Vec::new(), Vec::new());
    let cap = spec.max_segments as usize;
    let r = (|| -> Result<()> {
        segs.try_reserve_exact(cap).map_err(|_| Error::NoMemory { requested: (cap * 16) as u64 })?;
        tc.try_reserve_exact(k).map_err(|_| Error::NoMemory { requested: (k * 8) as u64 })?;
        tm.try_reserve_exact(k).map_err(|_| Error::NoMemory { requested: (k * 8) as u64 })?;
        // Two passes round the ring; the first (first touches, cold tables) is not timed.
        for pass in 0..2 {
            for j in 0..k {
                let run = runs_at(pool, held, j, n, nruns)?;
                let run = &run[..nruns.min(2)];
                // The copy path, as `Premapped` runs it.
                let t0 = p.monotonic_ns();
                let mut b = SegmentBuilder::for_tag(&mut segs, spec);
                pool.load_into(spec, &mut pst, run, Direction::ToDevice, &mut b, false)?;
                pool.sync_of(spec, &pst, SyncOp::PREWRITE, 0..n, false)?;
                pool.unload_from(&mut pst)?;
                let t1 = p.monotonic_ns();
                // The map path, on buffers half the ring away (the ones just copied are hot).
                let run = runs_at(pool, held, (j + k / 2) % k, n, nruns)?;
                let run = &run[..nruns.min(2)];
                let t2 = p.monotonic_ns();
                let mut b = SegmentBuilder::for_tag(&mut segs, spec);
                map.load(p, spec, &mut mst, run, Direction::ToDevice, &mut b)?;
                map.sync(p, spec, &mst, SyncOp::PREWRITE, 0..n)?;
                map.unload(p, &mut mst, run, &segs)?;
                let t3 = p.monotonic_ns();
                if pass == 1 {
                    tc.push(t1 - t0);
                    tm.push(t3 - t2);
                }
            }
        }
        Ok(())
    })();
    let _ = pool.unload_from(&mut pst);
    map.destroy(p, mst);
    r?;
    Ok((trimmed_mean(&mut tc), trimmed_mean(&mut tm)))
}

/// `nruns` (1 or 2) client runs of `n` bytes in all, from slot `held[j]` and the next.
fn runs_at<P: Platform, D: IommuOps<P>>(
    pool: &PremappedPool<'_, P, D>,
    held: &[u32],
    j: usize,
    n: u64,
    nruns: usize,
) -> Result<[Run; 2]> {
    let p = pool.platform();
    let each = (n / nruns.max(1) as u64).max(1);
    let mut out = [Run { pa: crate::addr::PhysAddr::new(0), len: 0, kind: MemKind::Page, kva: None }; 2];
    for (r, o) in out.iter_mut().enumerate().take(nruns.min(2)) {
        let pa = pool
            .slot_pa(held[(j + r) % held.len()] as usize)
            .ok_or(Error::BadState { what: "calibration slot" })?;
        *o = Run { pa, len: each, kind: MemKind::Page, kva: p.phys_to_kva(pa) };
    }
    Ok(out)
}

/// Copy below a threshold into `pool`, map with `S` at or above it (theory 1).
pub struct Hybrid<'a, 'p, P: Platform, D: IommuOps<P>, S> {
    pool: Premapped<'a, 'p, P, D>,
    map: S,
    thresholds: [u64; MAX_RUNS],
    calibration: Option<Calibration>,
}

impl<P: Platform, D: IommuOps<P>, S: Clone> Clone for Hybrid<'_, '_, P, D, S> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool,
            map: self.map.clone(),
            thresholds: self.thresholds,
            calibration: self.calibration,
        }
    }
}

impl<'a, 'p, P: Platform, D: IommuOps<P>, S> Hybrid<'a, 'p, P, D, S> {
    /// The hybrid of `pool` and `map` with the threshold measured now (theory 2). Takes one
    /// slot of the pool for the measurement and gives it back.
    ///
    /// Errors: the pool is exhausted, no memory for the scratch pages, the domain's errors.
    pub fn calibrated(pool: &'a PremappedPool<'p, P, D>, map: S, spec: &TagSpec) -> Result<Self>
    where
        S: Strategy<P>,
    {
        let c = calibrate(pool, &map, spec)?;
        Ok(Self { pool: Premapped(pool), map, thresholds: c.thresholds, calibration: Some(c) })
    }

    /// The hybrid with a threshold the driver sets (no measurement): loads of fewer than
    /// `threshold` bytes are copied.
    pub fn with_threshold(pool: &'a PremappedPool<'p, P, D>, map: S, threshold: u64) -> Self {
        Self { pool: Premapped(pool), map, thresholds: [threshold; MAX_RUNS], calibration: None }
    }

    /// The same hybrid with the threshold set by the driver (the calibration stays readable).
    pub fn set_threshold(self, threshold: u64) -> Self {
        Self { thresholds: [threshold; MAX_RUNS], ..self }
    }

    /// Loads of one run below this many bytes are copied.
    pub fn threshold(&self) -> u64 {
        self.thresholds[0]
    }

    /// Loads of `runs` runs below this many bytes are copied (beyond [`MAX_RUNS`] runs, the
    /// last threshold).
    pub fn threshold_for(&self, runs: usize) -> u64 {
        self.thresholds[runs.clamp(1, MAX_RUNS) - 1]
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

impl<'a, 'p, P: Platform, D: IommuOps<P>, S: Strategy<P>> Hybrid<'a, 'p, P, D, S> {
    /// The pool.
    pub(super) fn pool_ref(&self) -> &'a PremappedPool<'p, P, D> {
        self.pool.0
    }

    /// A pool buffer's load in place (theory 9): the pool's path, whatever the threshold.
    pub(super) fn load_owned_slot(
        &self,
        st: &mut HybridState<S::MapState>,
        slot: u32,
        at: u64,
        len: u64,
        dir: Direction,
        segs: &mut SegmentBuilder<'_>,
    ) -> Result<()> {
        if st.path != Path::Idle {
            return Err(Error::BadState { what: "pool buffer load into a loaded hybrid map" });
        }
        self.pool.0.load_owned(&mut st.pool, slot, at, len, dir, segs)?;
        st.path = Path::Copied;
        Ok(())
    }
}

impl<'p, P: Platform, D: IommuOps<P>, S: Strategy<P>> Strategy<P> for Hybrid<'_, 'p, P, D, S> {
    const NAME: &'static str = "hybrid";
    type MapState = HybridState<S::MapState>;

    fn invalidation(&self) -> Invalidation {
        self.map.invalidation()
    }

    fn unload_revokes(&self) -> bool {
        // Copied loads reached pool slots only; mapped ones are the wrapped strategy's.
        self.map.unload_revokes()
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
        if copyable && len < self.threshold_for(runs.len()) && len <= self.pool.0.slot_bytes() {
            match self.pool.0.load_into(spec, &mut st.pool, runs, dir, segs, true) {
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
            Path::Copied => self.pool.0.sync_of(spec, &st.pool, op, range, true),
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
            copy_run_ns: 10.0,
            map_run_ns: 0.0,
            thresholds: [0; MAX_RUNS],
            threshold: 0,
        };
        c.compute_thresholds();
        c
    }

    #[test]
    fn the_threshold_is_where_the_copy_overtakes_the_map() {
        // Copy ~0.05 ns/B; map 1000 ns + 50 ns per page after the first: they cross at
        // 25 600 bytes (1 301 ns vs 1 300 ns).
        let c = cal(45.0, 3300.0, 1000.0, 1750.0);
        assert_eq!(c.threshold, 25600, "{c}");
        assert!(c.copy_ns(c.threshold, 1) >= c.map_ns(c.threshold, 1));
        assert!(c.copy_ns(c.threshold - 64, 1) < c.map_ns(c.threshold - 64, 1));
    }

    #[test]
    fn a_virtual_iommu_copies_everything_that_fits_and_a_cheap_map_copies_only_the_smallest() {
        // 10 us per map+unmap: every slot-sized load is copied.
        assert_eq!(cal(45.0, 3300.0, 10_000.0, 10_500.0).threshold, 65537);
        // Mapping cheaper than any copy: only loads under the 64-byte step are copied.
        assert_eq!(cal(200.0, 3300.0, 10.0, 20.0).threshold, 64);
    }

    #[test]
    fn a_load_of_more_runs_has_a_higher_threshold_when_each_run_is_a_map_request() {
        // 1 000 ns a map request: every further run raises the map's cost by that much.
        let mut c = cal(45.0, 3300.0, 1000.0, 1750.0);
        c.map_run_ns = 1000.0;
        c.compute_thresholds();
        assert!(c.thresholds.windows(2).all(|w| w[0] <= w[1]), "{:?}", c.thresholds);
        assert!(c.thresholds[1] > c.thresholds[0] + 16 * 1024, "{c}");
        assert_eq!(c.threshold, c.thresholds[0]);
    }
}
