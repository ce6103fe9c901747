//! The audit: what the hardware may still cache, checked against what software releases.
//!
//! # Theory
//!
//! 1. **May-cache set.** The real IOTLB is small and forgets; a correct invalidation protocol
//!    must be correct for *any* cache the specification allows, including one that never
//!    evicts. So the audit keeps, for every `(domain, page)` the walker translated, the
//!    translation and the table pages the walk went through, until an invalidation covering
//!    the page removes it. It fills under the same generation rule as the IOTLB (a walk that
//!    raced an invalidation is not recorded), so it is a superset of the IOTLB's contents.
//! 2. **Release checks.** When software says an IOVA range goes back to its allocator, or
//!    that it is about to map a range, no page of it may be in the may-cache set; when it says a table page goes back to its
//!    pool, no recorded walk may have gone through it. Either would let a device reach
//!    memory the IOVA or the table page is reused for: a [`Violation`].
//! 3. **Exposure.** When software says one unmap cleared the entries of some ranges, the audit
//!    stamps each range with the time, the domain's unmap count and the invalidation
//!    generation. The first invalidation covering the whole range that *started* after the
//!    stamp (its generation is newer) ends the exposure window; the audit keeps the largest window, in nanoseconds
//!    of the platform clock and in unmaps of the domain.
//! 4. The audit costs a hash-map update per walk and per page released; it is off unless
//!    [`super::IommuConfig::audit`] is set.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use busdma::iommu::DomainId;
use busdma::{Iova, PhysAddr};

use super::walk::Walk;

/// Violations kept in full; further ones are only counted.
const VIOLATIONS_KEPT: usize = 64;

/// Ranges of at most this many pages are checked page by page; longer ones by one pass over
/// the recorded pages (whichever is fewer lookups; 64 keeps small unmaps on the fast path).
const PROBE_PAGES: u64 = 64;

/// A release the hardware could still see through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// An IOVA page went back to the allocator while a translation of it may be cached.
    IovaReleasedWhileCached {
        /// The domain.
        domain: DomainId,
        /// The page's IOVA.
        iova: Iova,
        /// Where the cached translation leads.
        pa: PhysAddr,
    },
    /// An IOVA page was mapped again while a translation of its previous mapping may be
    /// cached (a kept window reused before the flush covering its unmap).
    IovaMappedWhileCached {
        /// The domain.
        domain: DomainId,
        /// The page's IOVA.
        iova: Iova,
        /// Where the cached translation leads.
        pa: PhysAddr,
    },
    /// A table page went back to the pool while a walk through it may be cached.
    TablePageReleasedWhileCached {
        /// The domain.
        domain: DomainId,
        /// The table page.
        page: PhysAddr,
        /// An IOVA whose cached walk went through it.
        iova: Iova,
    },
}

/// What the audit found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// The first violations found.
    pub violations: Vec<Violation>,
    /// Every violation found.
    pub violation_count: u64,
    /// Exposure windows measured (unmapped ranges followed by a covering invalidation).
    pub exposures: u64,
    /// The longest window, in platform-clock nanoseconds.
    pub max_exposure_ns: u64,
    /// The longest window, in unmaps of the same domain after the page's own.
    pub max_exposure_unmaps: u64,
    /// Unmapped ranges not yet covered by an invalidation.
    pub pending: u64,
    /// Pages in the may-cache set.
    pub cached: u64,
}

#[derive(Clone, Copy)]
struct CachedWalk {
    pa: PhysAddr,
    tables: [u64; super::walk::MAX_LEVELS],
    depth: u8,
}

impl CachedWalk {
    fn tables(&self) -> &[u64] {
        &self.tables[..self.depth as usize]
    }
}

/// An unmapped range waiting for its covering invalidation.
#[derive(Clone, Copy)]
struct Stamp {
    domain: DomainId,
    first: u64,
    last: u64,
    ns: u64,
    seq: u64,
    generation: u64,
}

/// The audit's state (behind the IOMMU's lock).
#[derive(Default)]
pub(crate) struct Audit {
    cached: HashMap<(DomainId, u64), CachedWalk>,
    table_refs: HashMap<(DomainId, u64), u32>,
    stamps: Vec<Stamp>,
    unmaps: HashMap<DomainId, u64>,
    report: AuditReport,
}

impl Audit {
    /// Records the walk of `page` (IOVA >> 12) in `domain`.
    pub(crate) fn fill(&mut self, domain: DomainId, page: u64, walk: &Walk) {
        let new = CachedWalk { pa: walk.page, tables: walk.tables, depth: walk.depth };
        for &t in new.tables() {
            *self.table_refs.entry((domain, t)).or_insert(0) += 1;
        }
        if let Some(old) = self.cached.insert((domain, page), new) {
            self.unref(domain, &old);
        }
    }

    fn unref(&mut self, domain: DomainId, old: &CachedWalk) {
        for &t in old.tables() {
            if let Some(n) = self.table_refs.get_mut(&(domain, t)) {
                *n -= 1;
                if *n == 0 {
                    self.table_refs.remove(&(domain, t));
                }
            }
        }
    }

    /// An invalidation with generation `generation` of `domain`'s pages `first..=last`
    /// (`None`: all) completed at `now_ns`.
    pub(crate) fn invalidate(
        &mut self,
        domain: DomainId,
        pages: Option<(u64, u64)>,
        generation: u64,
        now_ns: u64,
    ) {
        let in_range = |d: DomainId, p: u64| d == domain && pages.is_none_or(|(a, b)| (a..=b).contains(&p));
        let gone: Vec<((DomainId, u64), CachedWalk)> = match pages {
            Some((a, b)) if b - a < PROBE_PAGES => {
                (a..=b).filter_map(|p| self.cached.remove(&(domain, p)).map(|w| ((domain, p), w))).collect()
            }
            _ => {
                let keys: Vec<_> = self.cached.keys().copied().filter(|&(d, p)| in_range(d, p)).collect();
                keys.into_iter().filter_map(|k| self.cached.remove(&k).map(|w| (k, w))).collect()
            }
        };
        for (_, w) in &gone {
            self.unref(domain, w);
        }
        let seq = self.unmaps.get(&domain).copied().unwrap_or(0);
        // A stamp ends when an invalidation that started after it covers its whole range.
        let covers = |st: &Stamp| {
            st.domain == domain
                && st.generation < generation
                && pages.is_none_or(|(a, b)| a <= st.first && st.last <= b)
        };
        let r = &mut self.report;
        self.stamps.retain(|st| {
            if !covers(st) {
                return true;
            }
            r.exposures += 1;
            r.max_exposure_ns = r.max_exposure_ns.max(now_ns.saturating_sub(st.ns));
            r.max_exposure_unmaps = r.max_exposure_unmaps.max(seq - st.seq);
            false
        });
    }

    /// One unmap cleared the entries of the page runs `pages` (first, last) of `domain` at
    /// `now_ns`, with the invalidation generation at `generation`.
    pub(crate) fn unmapped(
        &mut self,
        domain: DomainId,
        pages: impl Iterator<Item = (u64, u64)>,
        now_ns: u64,
        generation: u64,
    ) {
        let seq = {
            let n = self.unmaps.entry(domain).or_insert(0);
            *n += 1;
            *n
        };
        for (first, last) in pages {
            self.stamps.push(Stamp { domain, first, last, ns: now_ns, seq, generation });
        }
    }

    fn violation(&mut self, v: Violation) {
        self.report.violation_count += 1;
        if self.report.violations.len() < VIOLATIONS_KEPT {
            self.report.violations.push(v);
        }
    }

    /// Software releases pages `first..=last` of `domain` to its IOVA allocator.
    pub(crate) fn released_iova(&mut self, domain: DomainId, first: u64, last: u64) {
        for (p, pa) in self.cached_in(domain, first, last) {
            self.violation(Violation::IovaReleasedWhileCached { domain, iova: Iova::new(p << 12), pa });
        }
    }

    /// Software is about to write entries for pages `first..=last` of `domain`.
    pub(crate) fn mapping(&mut self, domain: DomainId, first: u64, last: u64) {
        for (p, pa) in self.cached_in(domain, first, last) {
            self.violation(Violation::IovaMappedWhileCached { domain, iova: Iova::new(p << 12), pa });
        }
    }

    /// The recorded translations of pages `first..=last` of `domain`.
    fn cached_in(&self, domain: DomainId, first: u64, last: u64) -> Vec<(u64, PhysAddr)> {
        if last - first < PROBE_PAGES {
            (first..=last).filter_map(|p| self.cached.get(&(domain, p)).map(|w| (p, w.pa))).collect()
        } else {
            self.cached
                .iter()
                .filter(|&(&(d, p), _)| d == domain && (first..=last).contains(&p))
                .map(|(&(_, p), w)| (p, w.pa))
                .collect()
        }
    }

    /// Software releases table page `page` of `domain` to its pool.
    pub(crate) fn released_table_page(&mut self, domain: DomainId, page: PhysAddr) {
        if self.table_refs.get(&(domain, page.raw())).is_some_and(|&n| n > 0) {
            let iova = self
                .cached
                .iter()
                .find(|&(&(d, _), w)| d == domain && w.tables().contains(&page.raw()))
                .map_or(0, |(&(_, p), _)| p << 12);
            self.violation(Violation::TablePageReleasedWhileCached { domain, page, iova: Iova::new(iova) });
        }
    }

    /// The report so far.
    pub(crate) fn report(&self) -> AuditReport {
        let mut r = self.report.clone();
        r.pending = self.stamps.len() as u64;
        r.cached = self.cached.len() as u64;
        r
    }
}
