//! Sync: making the CPU's and the device's views of a loaded buffer agree.
//!
//! # Theory
//!
//! 1. **Four operations** (bus_dma's): PREWRITE (the CPU wrote, the device will read: write
//!    dirty lines back), PREREAD (the device will write: write back and discard, so no dirty
//!    line is evicted over the device's data later, and partial lines at the ends keep the
//!    CPU's bytes), POSTREAD (the device wrote: discard lines the CPU may have fetched
//!    speculatively meanwhile), POSTWRITE (the device read: nothing to do for caches).
//!    Operations combine ([`SyncOp`] is a set).
//! 2. **Per run, through a kernel alias.** Maintenance goes through
//!    [`Platform::cache_clean`] and friends, which act on a kernel virtual range:
//!    - a run with a kernel mapping (the direct map, or the mapping of [`MemKind::Mapped`]
//!      memory) is maintained at that address;
//!    - a page-backed run with none ([`MemKind::Page`] above the direct map, "highmem") is
//!      maintained page by page through the CPU's quick-map maintenance slot
//!      ([`crate::quickmap::maintain_phys`]; never sleeps, never fails). Skipping it would be
//!      wrong on a non-coherent machine: the CPU may hold its lines through another kernel
//!      alias, a quick map of a bounce copy or of the driver's own access, and a dirty line
//!      would hide the CPU's bytes from the device, a stale one the device's from the CPU.
//!      On a virtually indexed cache every quick-map window of a page has the page's colour
//!      ([`crate::quickmap`], theory 6), so the maintenance window meets the very lines any
//!      earlier window left, whatever CPU and slot made them. A `Page` run is RAM by its
//!      load source's contract; the seam has no "is this RAM?" query to check it with, so a
//!      source that lies makes the platform's quick map fail loudly (the model panics);
//!    - a run with no page and no kernel mapping ([`MemKind::Unmapped`], MMIO, a peer's BAR)
//!      is skipped (seed 003): the CPU cannot have cached it through any kernel alias, and
//!      there is no page to map. MMIO and peer BARs are never cached anyway.
//!
//!    The user alias of a pinned user page is not the kernel's to maintain: pinning cleans
//!    and drops it (seed 003's `get_user_pages`), after which the kernel alias is the one
//!    that counts.
//! 3. **Coherent tags skip maintenance** and keep only the ordering: a DMA write barrier before
//!    handing memory to the device, a read barrier after taking it back.
//! 4. **Bounce copies** (PREWRITE: copy into the bounce page; POSTREAD: copy out) belong to
//!    bounce buffering: the map calls [`Strategy::sync`](super::strategy::Strategy::sync) after
//!    this maintenance, and `busdma::bounce::Bounced` copies there.
//! 5. **Partial syncs** ([`DmaMap::sync_range`](super::map::DmaMap::sync_range), Linux's
//!    `dma_sync_single_range_for_cpu`): the same operations on a byte range of the load only,
//!    each run cut to the range; cache maintenance of the range's partial lines at
//!    either end is the platform's, exactly as for a whole buffer's unaligned ends.
#![forbid(unsafe_code)]

use crate::addr::{KernVa, PhysAddr};
use crate::error::Result;
use crate::platform::Platform;
use crate::quickmap::{CacheMaint, maintain_phys};

pub use crate::dir::SyncOp;

use super::load::{MemKind, Run};

/// Counts of what one sync did (for tests and the lab).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Runs that got cache maintenance.
    pub maintained: u32,
    /// Runs skipped because they have neither a page nor a kernel mapping, or are never
    /// cached.
    pub skipped: u32,
    /// Pages of maintained runs that had no kernel mapping and went through the CPU's
    /// quick-map maintenance slot (counted once per operation applied).
    pub quick_mapped: u32,
}

/// Performs `op` on `runs` (theory 1–3).
///
/// Errors: [`crate::Error::NotRam`] for a page run outside RAM (a raw load of an address that
/// is not RAM): its maintenance is refused, runs before it were maintained.
#[inline]
pub(crate) fn sync_runs<P: Platform>(p: &P, runs: &[Run], op: SyncOp, coherent: bool) -> Result<SyncStats> {
    if coherent {
        // Theory 1: barriers only; inline, the per-packet case of a coherent device.
        coherent_barriers(p, op);
        return Ok(SyncStats::default());
    }
    sync_runs_in(p, runs, op, coherent, 0..u64::MAX)
}

/// The barriers a sync of a coherent device needs: `dma_wmb` before the device may read,
/// `dma_rmb` after it wrote.
#[inline]
fn coherent_barriers<P: Platform>(p: &P, op: SyncOp) {
    if op.contains(SyncOp::PREWRITE) || op.contains(SyncOp::PREREAD) {
        p.dma_wmb();
    }
    if op.contains(SyncOp::POSTREAD) {
        p.dma_rmb();
    }
}

/// Performs `op` on bytes `range` of the buffer that `runs` make up, in buffer order (theory
/// 5): each run is cut to the part inside the range, runs outside it are not touched. Errors
/// as [`sync_runs`].
pub(crate) fn sync_runs_in<P: Platform>(
    p: &P,
    runs: &[Run],
    op: SyncOp,
    coherent: bool,
    range: core::ops::Range<u64>,
) -> Result<SyncStats> {
    let mut st = SyncStats::default();
    if coherent {
        coherent_barriers(p, op);
        return Ok(st);
    }
    let mut ops = [None, None];
    if op.contains(SyncOp::PREREAD) {
        ops[0] = Some(CacheMaint::CleanInvalidate);
    } else if op.contains(SyncOp::PREWRITE) {
        ops[0] = Some(CacheMaint::Clean);
    }
    if op.contains(SyncOp::POSTREAD) {
        ops[1] = Some(CacheMaint::Invalidate);
    }
    for r in clip(runs, range) {
        match (r.kind, r.kva) {
            (MemKind::Mmio | MemKind::PeerBar { .. }, _) | (MemKind::Unmapped, None) => {
                st.skipped += 1;
                continue;
            }
            (_, Some(kva)) | (MemKind::Mapped { kva }, None) => {
                for m in ops.iter().flatten() {
                    m.apply(p, kva, r.len);
                }
            }
            (MemKind::Page, None) => {
                for &m in ops.iter().flatten() {
                    let g = p.pin_cpu();
                    // A run of a load never wraps (its source checked); a raw run outside
                    // RAM is refused before anything is touched.
                    let n = maintain_phys(&g, r.pa, r.len, m)?;
                    st.quick_mapped = st.quick_mapped.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
                }
            }
        }
        st.maintained += 1;
    }
    coherent_barriers(p, op);
    Ok(st)
}

/// The parts of `runs` (a buffer, in order) inside buffer bytes `range`: a run cut at either
/// end keeps its kind, its physical and kernel addresses moved by the bytes cut.
fn clip(runs: &[Run], range: core::ops::Range<u64>) -> impl Iterator<Item = Run> + '_ {
    let mut pos = 0u64;
    runs.iter().filter_map(move |r| {
        let (rs, re) = (pos, pos.saturating_add(r.len));
        pos = re;
        let (s, e) = (rs.max(range.start), re.min(range.end));
        if s >= e {
            return None;
        }
        let cut = s - rs;
        let kind = match r.kind {
            MemKind::Mapped { kva } => MemKind::Mapped { kva: KernVa::new(kva.raw() + cut) },
            k => k,
        };
        Some(Run {
            pa: PhysAddr::new(r.pa.raw() + cut),
            len: e - s,
            kind,
            kva: r.kva.map(|k| KernVa::new(k.raw() + cut)),
        })
    })
}
