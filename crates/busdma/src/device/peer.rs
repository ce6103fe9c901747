//! Peer devices' BARs on an IOMMU: their bus-address ranges, kept out of every domain's IOVA
//! space (module theory 7).
#![forbid(unsafe_code)]

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::addr::{AddrRange, Iova, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::front::load::{MemKind, Run};
use crate::sync::SpinLock;

/// A registered peer BAR ([`super::Iommu::register_peer`]). Not `Clone`: the one handle is
/// what [`super::Iommu::unregister_peer`] takes back.
#[derive(Debug, PartialEq, Eq)]
pub struct PeerHandle {
    id: u64,
    range: AddrRange<Iova>,
}

impl PeerHandle {
    /// The BAR's bus-address range.
    pub fn range(&self) -> AddrRange<Iova> {
        self.range
    }
}

#[derive(Clone, Copy, Debug)]
struct Peer {
    id: u64,
    range: AddrRange<Iova>,
    /// Loaded runs that reach the BAR.
    loads: u64,
}

/// The peers registered on one IOMMU.
pub(super) struct PeerRegistry {
    peers: SpinLock<Vec<Peer>>,
    /// Bumped (under the lock) by every registration; a domain whose reservations are older
    /// reserves the new ranges before it hands out IOVA.
    generation: AtomicU64,
    /// Registered peers: loads skip the run scan when it is 0.
    count: AtomicUsize,
    next_id: AtomicU64,
}

impl PeerRegistry {
    pub(super) fn new() -> Self {
        Self {
            peers: SpinLock::new(Vec::new()),
            generation: AtomicU64::new(0),
            count: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
        }
    }

    pub(super) fn register(&self, range: AddrRange<Iova>) -> Result<PeerHandle> {
        for v in [range.start().raw(), range.end().raw()] {
            if v % PAGE_SIZE != 0 {
                return Err(Error::Misaligned { value: v, align: PAGE_SIZE });
            }
        }
        if range.is_empty() {
            return Err(Error::ZeroSize);
        }
        let mut peers = self.peers.lock();
        if let Some(p) = peers.iter().find(|p| p.range.overlaps(&range)) {
            return Err(Error::InvalidArgument {
                what: "peer BAR overlapping a registered peer (its start given)",
                value: p.range.start().raw(),
            });
        }
        peers.try_reserve(1).map_err(|_| Error::NoMemory { requested: 1 })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        peers.push(Peer { id, range, loads: 0 });
        self.count.fetch_add(1, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(PeerHandle { id, range })
    }

    pub(super) fn unregister(&self, h: PeerHandle) -> core::result::Result<(), (Error, PeerHandle)> {
        let mut peers = self.peers.lock();
        let Some(i) = peers.iter().position(|p| p.id == h.id) else {
            return Err((Error::BadState { what: "peer handle of another IOMMU" }, h));
        };
        if peers[i].loads > 0 {
            let count = peers[i].loads;
            return Err((Error::Busy { what: "peer BAR reached by live loads", count }, h));
        }
        peers.swap_remove(i);
        self.count.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// The registration generation (see the field).
    #[inline]
    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The registered ranges, and the generation they make up.
    pub(super) fn snapshot(&self, out: &mut Vec<AddrRange<Iova>>) -> Result<u64> {
        let peers = self.peers.lock();
        out.clear();
        out.try_reserve(peers.len()).map_err(|_| Error::NoMemory { requested: peers.len() as u64 })?;
        out.extend(peers.iter().map(|p| p.range));
        Ok(self.generation.load(Ordering::Relaxed))
    }

    /// The registered ranges.
    pub(super) fn ranges(&self) -> Vec<AddrRange<Iova>> {
        self.peers.lock().iter().map(|p| p.range).collect()
    }

    /// Counts (`up`) or uncounts the runs of a load that reach a registered BAR.
    #[inline]
    pub(super) fn count_loads(&self, runs: &[Run], up: bool) {
        if self.count.load(Ordering::Relaxed) == 0 {
            return;
        }
        let device = |r: &&Run| matches!(r.kind, MemKind::PeerBar { .. } | MemKind::Mmio);
        if !runs.iter().any(|r| device(&r)) {
            return;
        }
        let mut peers = self.peers.lock();
        for r in runs.iter().filter(device) {
            let at = Iova::new(r.pa.raw());
            if let Some(p) = peers.iter_mut().find(|p| p.range.contains(at)) {
                p.loads = if up { p.loads + 1 } else { p.loads.saturating_sub(1) };
            }
        }
    }
}
