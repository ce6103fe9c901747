//! The model IOMMU's coherence index (parisc's LCI, seed 003).
//!
//! # Theory
//!
//! 1. On a machine whose cache model says [`Coherence::CoherenceIndex`], each IOMMU mapping
//!    carries the virtual index the hardware uses to keep one CPU alias coherent while a device
//!    transfers the page: on a device read the line found through that index is written back
//!    first; on a device write it is written back and dropped. Other aliases are not touched:
//!    one index per mapping, which is the whole difficulty seed 003 describes.
//! 2. The index is recorded per (domain, IOVA page) when the driver programs it
//!    ([`busdma::iommu::IotlbInvalidator::set_coherence_index`]); real hardware keeps it in the
//!    IO page-directory entry, the model beside the table so that the table formats stay the
//!    standard ones. So that an index never outlives its entry, the record also holds the
//!    physical page the entry mapped when the index was set; a transfer whose translation
//!    reaches another page (the IOVA was unmapped and mapped again without a new index) gets
//!    no index at all. (The model cannot see an unmap followed by a remap of the *same* page
//!    at the same IOVA without a new index: that mapping keeps its old index. busdma's
//!    strategies program an index after every map, so they never rely on this.)
//! 3. [`CoherenceIndex::Untouched`] resolves to a page the model IOMMU reserves at creation and
//!    that nothing ever maps for the CPU's use: a "known untouched line".
//! 4. On any other machine nothing is recorded and transfers use the machine's default snoop.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::RwLock;

use busdma::iommu::{CoherenceIndex, DomainId};
use busdma::{AddrRange, Iova, KernVa, PAGE_SIZE, PhysAddr, Platform};

use crate::cache::{Coherence, Snoop};
use crate::{FrameBlock, FrameRequest, HostPlatform, Placement};

/// Coherence indexes of one model IOMMU.
pub(crate) struct CoherenceIndexes<'m> {
    /// The reserved untouched page (only on a coherence-index machine).
    untouched: Option<(FrameBlock<'m>, KernVa)>,
    /// (domain, IOVA page number) -> (virtual address of the indexed alias of that page,
    /// physical page the entry mapped then).
    pages: RwLock<HashMap<(DomainId, u64), (u64, u64)>>,
}

impl<'m> CoherenceIndexes<'m> {
    pub(crate) fn new(m: &'m HostPlatform) -> Self {
        let lci = m.cache().is_some_and(|c| c.config().coherence == Coherence::CoherenceIndex);
        let untouched = lci
            .then(|| {
                let r = FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) };
                let block = m.alloc_frames(r).ok()?;
                let kva = m.phys_to_kva(block.pa())?;
                Some((block, kva))
            })
            .flatten();
        Self { untouched, pages: RwLock::new(HashMap::new()) }
    }

    /// The untouched line's kernel address, on a coherence-index machine.
    pub(crate) fn untouched(&self) -> Option<KernVa> {
        self.untouched.as_ref().map(|(_, kva)| *kva)
    }

    /// Records `index` for `range`; `translate(iova)` is the physical page each IOVA page maps
    /// now (pages that map nothing get no index).
    pub(crate) fn set(
        &self,
        domain: DomainId,
        range: AddrRange<Iova>,
        index: CoherenceIndex,
        translate: impl Fn(Iova) -> Option<PhysAddr>,
    ) {
        let Some(untouched) = self.untouched() else { return };
        let first = range.start().raw() / PAGE_SIZE;
        let last = (range.end().raw() - 1) / PAGE_SIZE;
        let mut p = self.pages.write().unwrap_or_else(|e| e.into_inner());
        for (i, page) in (first..=last).enumerate() {
            let va = match index {
                CoherenceIndex::Alias(kva) => (kva.raw() & !(PAGE_SIZE - 1)) + i as u64 * PAGE_SIZE,
                CoherenceIndex::Untouched => untouched.raw(),
            };
            match translate(Iova::new(page * PAGE_SIZE)) {
                Some(pa) => p.insert((domain, page), (va, pa.raw() / PAGE_SIZE)),
                None => p.remove(&(domain, page)),
            };
        }
    }

    /// The snoop a transfer of `iova` in `domain`, translated to `pa`, makes, or `None` for the
    /// machine's default.
    pub(crate) fn snoop(&self, domain: DomainId, iova: Iova, pa: PhysAddr) -> Option<Snoop> {
        self.untouched.as_ref()?;
        let p = self.pages.read().unwrap_or_else(|e| e.into_inner());
        Some(match p.get(&(domain, iova.raw() / PAGE_SIZE)) {
            Some(&(va, page)) if page == pa.raw() / PAGE_SIZE => Snoop::Index(va),
            _ => Snoop::None,
        })
    }
}
