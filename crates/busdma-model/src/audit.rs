//! Ground truth the machine keeps about itself, for judging busdma from outside.
//!
//! # Theory
//!
//! 1. **Page kinds.** The platform knows what it handed each frame out for: a page-table page
//!    ([`busdma::Platform::alloc_table_page`]), a DMA page ([`busdma::Platform::alloc_pages`]:
//!    coherent buffers and bounce pages), or neither (free, or frames the model's users took
//!    with [`crate::HostPlatform::alloc_frames`]). Two bits per frame in atomic words, so the
//!    allocation paths stay lock-free here. An ownership check asks it whether a page a device
//!    can reach is metadata.
//! 2. **Bus accesses.** [`crate::HostPlatform::watch_bus`] records, for the calling thread, every
//!    bus-side access (physical address, length, direction): the bytes a device really
//!    reached, as the memory controller saw them, independent of what any IOMMU or busdma
//!    believes it mapped. Recording is per thread (a thread-local list), so other threads'
//!    traffic never pollutes a verdict.
//! 3. **Reachable pages.** [`reachable`] walks an IO page table *from RAM*, as the hardware
//!    would (atomic word reads from the root's physical address, decoded by the format), and
//!    lists every leaf: what a device attached to that table can reach, whatever the software
//!    that built it believes. [`metadata_exposed`] keeps the leaves that cover a page-table
//!    page: busdma metadata a device could read or overwrite.
#![deny(unsafe_code)]

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use busdma::pgtable::PteFormat;
use busdma::pgtable::install::{Next, classify};
use busdma::{Iova, PAGE_SIZE, PhysAddr};

use crate::HostPlatform;

/// What the platform handed a frame out for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageKind {
    /// Not handed out by the platform seam (free, or a frame the model's user allocated).
    Other,
    /// A page-table page (busdma metadata the IOMMU walks).
    Table,
    /// A DMA page: a coherent buffer or a bounce page.
    Dma,
}

/// Frames per 64-bit word at two bits each.
const PER_WORD: u64 = 32;

/// Two bits of [`PageKind`] per frame.
#[derive(Debug)]
pub(crate) struct PageKinds {
    base: PhysAddr,
    frames: u64,
    words: Box<[AtomicU64]>,
}

impl PageKinds {
    pub(crate) fn new(base: PhysAddr, frames: u64) -> Self {
        Self { base, frames, words: (0..frames.div_ceil(PER_WORD)).map(|_| AtomicU64::new(0)).collect() }
    }

    fn frame(&self, pa: PhysAddr) -> Option<u64> {
        let f = pa.offset_from(self.base)? / PAGE_SIZE;
        (f < self.frames).then_some(f)
    }

    pub(crate) fn set(&self, pa: PhysAddr, pages: u64, kind: PageKind) {
        let code = match kind {
            PageKind::Other => 0,
            PageKind::Table => 1,
            PageKind::Dma => 2,
        };
        let Some(first) = self.frame(pa) else { return };
        for f in first..(first + pages).min(self.frames) {
            let (w, shift) = ((f / PER_WORD) as usize, (f % PER_WORD) * 2);
            // Frames are owned by one allocation at a time, so no two callers race on the same
            // two bits; the RMW keeps the neighbours' bits intact.
            let _ = self.words[w].fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some((v & !(3 << shift)) | (code << shift))
            });
        }
    }

    pub(crate) fn get(&self, pa: PhysAddr) -> PageKind {
        let Some(f) = self.frame(pa) else { return PageKind::Other };
        match (self.words[(f / PER_WORD) as usize].load(Ordering::Acquire) >> ((f % PER_WORD) * 2)) & 3 {
            1 => PageKind::Table,
            2 => PageKind::Dma,
            _ => PageKind::Other,
        }
    }
}

/// One bus-side access to RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BusAccess {
    /// First physical byte.
    pub pa: PhysAddr,
    /// Bytes.
    pub len: u64,
    /// True for a write to memory.
    pub write: bool,
}

/// One leaf of an IO page table: `[iova, iova + len)` reaches `[pa, pa + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Leaf {
    /// First bus address.
    pub iova: Iova,
    /// First physical address.
    pub pa: PhysAddr,
    /// Span: 4 KiB, 2 MiB or 1 GiB.
    pub len: u64,
    /// The device may write through it.
    pub write: bool,
}

/// log2 of the entries per table page (512).
const BITS_PER_LEVEL: u32 = 9;

/// Every leaf of the `levels`-level table of format `F` rooted at `root`, read from RAM.
/// Entries that cannot be read (outside RAM) are skipped; a walk never loops, since it
/// descends `levels` times at most.
pub fn reachable<F: PteFormat>(m: &HostPlatform, root: PhysAddr, levels: u32) -> Vec<Leaf> {
    let mut out = Vec::new();
    if levels > 0 {
        walk_table::<F>(m, root, levels - 1, 0, &mut out);
    }
    out
}

fn walk_table<F: PteFormat>(m: &HostPlatform, table: PhysAddr, height: u32, base: u64, out: &mut Vec<Leaf>) {
    let span = PAGE_SIZE << (BITS_PER_LEVEL * height);
    for i in 0..(1u64 << BITS_PER_LEVEL) {
        let Some(at) = table.checked_add(i * 8) else { return };
        let Ok(pte) = m.read_phys_u64(at) else { return };
        if !F::is_present(pte) {
            continue;
        }
        let iova = base + i * span;
        match (height, classify::<F>(pte, height)) {
            (0, _) | (_, Next::Leaf(_)) => out.push(Leaf {
                iova: Iova::new(iova),
                pa: F::output(pte, height),
                len: span,
                write: F::prot(pte).write,
            }),
            (_, Next::Table(next)) => walk_table::<F>(m, next, height - 1, iova, out),
        }
    }
}

/// The leaves of `leaves` that reach a page-table page ([`PageKind::Table`]): metadata a
/// device could read or overwrite. Empty when busdma keeps its promise.
pub fn metadata_exposed(m: &HostPlatform, leaves: &[Leaf]) -> Vec<Leaf> {
    leaves
        .iter()
        .filter(|l| {
            (0..l.len / PAGE_SIZE)
                .any(|p| l.pa.checked_add(p * PAGE_SIZE).is_some_and(|pa| m.page_kind(pa) == PageKind::Table))
        })
        .copied()
        .collect()
}

thread_local! {
    static RECORDING: RefCell<Option<Vec<BusAccess>>> = const { RefCell::new(None) };
}

/// Starts recording on this thread; returns the outer recording (nesting keeps it aside).
pub(crate) fn start_recording() -> Option<Vec<BusAccess>> {
    RECORDING.with(|r| r.borrow_mut().replace(Vec::new()))
}

/// Stops recording and returns what was seen; restores an outer recording, appending to it.
pub(crate) fn stop_recording(outer: Option<Vec<BusAccess>>) -> Vec<BusAccess> {
    RECORDING.with(|r| {
        let mut slot = r.borrow_mut();
        let seen = slot.take().unwrap_or_default();
        if let Some(mut o) = outer {
            o.extend_from_slice(&seen);
            *slot = Some(o);
        }
        seen
    })
}

pub(crate) fn record(a: BusAccess) {
    RECORDING.with(|r| {
        if let Some(v) = r.borrow_mut().as_mut() {
            v.push(a);
        }
    });
}

#[cfg(test)]
#[allow(unsafe_code)] // freeing pages is unsafe; the module itself needs no unsafe code
mod tests {
    use super::*;
    use crate::{HostPlatform, MachineConfig};
    use busdma::{PageRequest, Platform};

    #[test]
    fn the_platform_knows_what_it_handed_each_page_out_for() {
        let m = HostPlatform::new(MachineConfig { cpus: 1, ..MachineConfig::with_ram(8 << 20) }).unwrap();
        let t = m.alloc_table_page().unwrap();
        let t_pa = t.pa();
        let d = m.alloc_pages(&PageRequest::pages(3)).unwrap();
        let f = m.alloc_frames(crate::FrameRequest::pages(1)).unwrap();
        assert_eq!(m.page_kind(t.pa()), PageKind::Table);
        assert_eq!(m.page_kind(d.checked_add(2 * PAGE_SIZE + 5).unwrap()), PageKind::Dma);
        assert_eq!(m.page_kind(f.pa()), PageKind::Other);
        // SAFETY: both allocated above, freed once, unreachable by any device.
        unsafe {
            m.free_table_page(t);
            m.free_pages(d, 3);
        }
        assert_eq!(m.page_kind(t_pa), PageKind::Other);
        assert_eq!(m.page_kind(d), PageKind::Other);
    }

    #[test]
    fn reachable_lists_exactly_the_leaves_and_flags_table_pages() {
        use busdma::pgtable::{PageTable, PageTableConfig, Prot, TablePool, VtdSl};
        let m = HostPlatform::new(MachineConfig { cpus: 1, ..MachineConfig::with_ram(16 << 20) }).unwrap();
        let pool = TablePool::new(&m);
        let pt = PageTable::<_, VtdSl>::new(&pool, PageTableConfig { input_bits: 48, coherent_walker: true })
            .unwrap();
        let buf = m.alloc_pages(&PageRequest::pages(2)).unwrap();
        let g = m.pin_cpu();
        // SAFETY: the test owns this table's IOVA; no device walks it (the audit only reads it).
        unsafe { pt.map(&g, Iova::new(0x7_0000_0000), buf, 2 * PAGE_SIZE, Prot::READ) }.unwrap();
        let leaves = reachable::<VtdSl>(&m, pt.root(), pt.levels());
        assert_eq!(
            leaves,
            vec![
                Leaf { iova: Iova::new(0x7_0000_0000), pa: buf, len: PAGE_SIZE, write: false },
                Leaf {
                    iova: Iova::new(0x7_0000_1000),
                    pa: buf.checked_add(PAGE_SIZE).unwrap(),
                    len: PAGE_SIZE,
                    write: false
                },
            ]
        );
        assert!(metadata_exposed(&m, &leaves).is_empty());
        // A (buggy) mapping of the table's own root page is found.
        // SAFETY: the test owns this table's IOVA; no device walks it (the audit only reads it).
        unsafe { pt.map(&g, Iova::new(0x8000), pt.root(), PAGE_SIZE, Prot::READ_WRITE) }.unwrap();
        let leaves = reachable::<VtdSl>(&m, pt.root(), pt.levels());
        let bad = metadata_exposed(&m, &leaves);
        assert_eq!(bad.len(), 1);
        assert_eq!((bad[0].iova, bad[0].pa, bad[0].write), (Iova::new(0x8000), pt.root(), true));
    }

    #[test]
    fn watching_the_bus_records_this_threads_accesses_only() {
        let m = HostPlatform::new(MachineConfig { cpus: 1, ..MachineConfig::with_ram(8 << 20) }).unwrap();
        let pa = m.ram().start().checked_add(0x3000).unwrap();
        let ((), seen) = m.watch_bus(|| {
            let mut b = [0u8; 16];
            m.read_phys(pa, &mut b).unwrap();
            std::thread::scope(|s| {
                s.spawn(|| m.write_phys(pa, b"elsewhere").unwrap());
            });
            m.fill_phys(pa, 4, 1).unwrap();
        });
        assert_eq!(
            seen,
            vec![BusAccess { pa, len: 16, write: false }, BusAccess { pa, len: 4, write: true }]
        );
        let mut b = [0u8; 1];
        let ((), nothing) = m.watch_bus(|| ());
        m.read_phys(pa, &mut b).unwrap();
        assert!(nothing.is_empty());
    }
}
