//! User address spaces of the machine model: a process page table over the RAM arena.
//!
//! # Theory
//!
//! 1. **What it models.** A process (or a guest's memory, seen by its hypervisor) maps user
//!    virtual pages onto frames of the model's RAM. The table is a map from user page number
//!    to a page-table entry: the frame's physical address, whether it belongs to a 2 MiB huge
//!    mapping, and a **pin count**.
//! 2. **Pins keep pages put.** The kernel may move an unpinned page (migration, compaction:
//!    [`UserSpace::migrate`], [`UserSpace::compact`]), copying its bytes to a new frame and
//!    changing the entry. A pinned page is never moved and cannot be unmapped: that is what
//!    lets busdma's registry keep the physical addresses it recorded at registration.
//! 3. **Backend.** [`UserSpace`] implements [`busdma::pin::PinBackend`]: `pin` takes one pin
//!    on each page (all or nothing) and reports its frame; `unpin` gives them back. Counters
//!    tell how many pins were taken and released, and how many regions were reported still
//!    DMA-mapped at a registry's teardown.
//! 4. **Frames.** Each 4 KiB mapping owns a one-frame [`FrameBlock`]; each huge mapping owns a
//!    512-frame, 2 MiB-aligned block. Frames go back to the machine when unmapped or when the
//!    address space is dropped.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use busdma::pin::PinBackend;
use busdma::{AddrRange, Error, PAGE_SHIFT, PAGE_SIZE, PageSize, PhysAddr, Platform, Result, UserVa};

use crate::host::HostPlatform;
use crate::ram::{FrameBlock, FrameRequest};

/// One user page's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pte {
    pa: PhysAddr,
    /// First PA of the 2 MiB block for a page of a huge mapping.
    huge: Option<PhysAddr>,
    pins: u32,
}

struct Space<'m> {
    ptes: BTreeMap<u64, Pte>,
    /// Frame blocks by first PA.
    blocks: BTreeMap<u64, FrameBlock<'m>>,
}

/// Counters of a [`UserSpace`].
#[derive(Debug, Default)]
pub struct UspaceCounters {
    /// Page pins taken.
    pub pins: AtomicU64,
    /// Page pins released.
    pub unpins: AtomicU64,
    /// Pages moved by migration or compaction.
    pub migrations: AtomicU64,
    /// Regions a registry reported still DMA-mapped at its teardown.
    pub still_mapped_reports: AtomicU64,
}

/// A model process address space.
pub struct UserSpace<'m> {
    machine: &'m HostPlatform,
    space: Mutex<Space<'m>>,
    counters: UspaceCounters,
}

fn check(ua: UserVa, len: u64, align: u64) -> Result<AddrRange<UserVa>> {
    if len == 0 {
        return Err(Error::ZeroSize);
    }
    for v in [ua.raw(), len] {
        if v % align != 0 {
            return Err(Error::Misaligned { value: v, align });
        }
    }
    AddrRange::from_start_len(ua, len)
}

impl<'m> UserSpace<'m> {
    /// An empty address space over `machine`'s RAM.
    pub fn new(machine: &'m HostPlatform) -> Self {
        Self {
            machine,
            space: Mutex::new(Space { ptes: BTreeMap::new(), blocks: BTreeMap::new() }),
            counters: UspaceCounters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Space<'m>> {
        // Every update below leaves the table consistent at each step, so a poisoned lock
        // (a panicking test thread) still guards a valid table.
        self.space.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counters.
    pub fn counters(&self) -> &UspaceCounters {
        &self.counters
    }

    fn check_free(s: &Space<'m>, r: AddrRange<UserVa>) -> Result<()> {
        let (first, last) = (r.start().raw() >> PAGE_SHIFT, (r.end().raw() - 1) >> PAGE_SHIFT);
        match s.ptes.range(first..=last).next() {
            Some((&vpn, _)) => Err(Error::AlreadyMapped { addr: vpn << PAGE_SHIFT }),
            None => Ok(()),
        }
    }

    /// Maps `[ua, ua + len)` with 4 KiB pages on fresh, zeroed frames.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::Misaligned`], [`Error::Overflow`],
    /// [`Error::AlreadyMapped`], [`Error::NoMemory`] (nothing is mapped then).
    pub fn map(&self, ua: UserVa, len: u64) -> Result<()> {
        let r = check(ua, len, PAGE_SIZE)?;
        let mut s = self.lock();
        Self::check_free(&s, r)?;
        let mut blocks = Vec::new();
        for _ in 0..len / PAGE_SIZE {
            blocks.push(self.machine.alloc_frames(FrameRequest::pages(1))?);
        }
        for (i, b) in blocks.into_iter().enumerate() {
            self.machine.fill_phys(b.pa(), PAGE_SIZE, 0)?;
            let vpn = (ua.raw() >> PAGE_SHIFT) + i as u64;
            s.ptes.insert(vpn, Pte { pa: b.pa(), huge: None, pins: 0 });
            s.blocks.insert(b.pa().raw(), b);
        }
        Ok(())
    }

    /// Maps `[ua, ua + len)` with 2 MiB huge pages (both 2 MiB-aligned).
    ///
    /// Errors: as [`UserSpace::map`], with 2 MiB alignment.
    pub fn map_huge(&self, ua: UserVa, len: u64) -> Result<()> {
        let huge = PageSize::Size2M.bytes();
        let r = check(ua, len, huge)?;
        let mut s = self.lock();
        Self::check_free(&s, r)?;
        let mut blocks = Vec::new();
        for _ in 0..len / huge {
            let req = FrameRequest { align: huge, ..FrameRequest::pages(huge / PAGE_SIZE) };
            blocks.push(self.machine.alloc_frames(req)?);
        }
        for (i, b) in blocks.into_iter().enumerate() {
            self.machine.fill_phys(b.pa(), huge, 0)?;
            let first = (ua.raw() + i as u64 * huge) >> PAGE_SHIFT;
            for j in 0..huge / PAGE_SIZE {
                let pte =
                    Pte { pa: PhysAddr::new(b.pa().raw() + j * PAGE_SIZE), huge: Some(b.pa()), pins: 0 };
                s.ptes.insert(first + j, pte);
            }
            s.blocks.insert(b.pa().raw(), b);
        }
        Ok(())
    }

    /// Unmaps `[ua, ua + len)`; frames go back to the machine.
    ///
    /// Errors: [`Error::NotMapped`] (a page is not mapped), [`Error::Busy`] (a page is pinned),
    /// [`Error::InvalidArgument`] (part of a huge page); nothing changes on error.
    pub fn unmap(&self, ua: UserVa, len: u64) -> Result<()> {
        check(ua, len, PAGE_SIZE)?;
        let mut s = self.lock();
        let first = ua.raw() >> PAGE_SHIFT;
        let pages = len >> PAGE_SHIFT;
        for vpn in first..first + pages {
            let pte = s.ptes.get(&vpn).ok_or(Error::NotMapped { addr: vpn << PAGE_SHIFT })?;
            if pte.pins > 0 {
                return Err(Error::Busy { what: "pinned user page", count: pte.pins as u64 });
            }
            if let Some(head) = pte.huge {
                // The whole 2 MiB page must go: its first and last 4 KiB pages are in range.
                let head_vpn = vpn - ((pte.pa.raw() - head.raw()) >> PAGE_SHIFT);
                if head_vpn < first || head_vpn + 512 > first + pages {
                    return Err(Error::InvalidArgument {
                        what: "unmap of part of a huge page",
                        value: vpn << PAGE_SHIFT,
                    });
                }
            }
        }
        for vpn in first..first + pages {
            if let Some(pte) = s.ptes.remove(&vpn) {
                // Dropping the block returns its frames (a huge block once, at its head).
                s.blocks.remove(&pte.huge.unwrap_or(pte.pa).raw());
            }
        }
        Ok(())
    }

    /// The frame behind `ua` (a page-table walk), or `None` if unmapped.
    pub fn translate(&self, ua: UserVa) -> Option<PhysAddr> {
        let s = self.lock();
        s.ptes.get(&(ua.raw() >> PAGE_SHIFT)).map(|p| PhysAddr::new(p.pa.raw() + ua.page_offset()))
    }

    /// The pin count of the page holding `ua` (0 if unmapped).
    pub fn pin_count(&self, ua: UserVa) -> u32 {
        self.lock().ptes.get(&(ua.raw() >> PAGE_SHIFT)).map_or(0, |p| p.pins)
    }

    /// Pages with at least one pin.
    pub fn pinned_pages(&self) -> u64 {
        self.lock().ptes.values().filter(|p| p.pins > 0).count() as u64
    }

    /// Pages mapped.
    pub fn mapped_pages(&self) -> u64 {
        self.lock().ptes.len() as u64
    }

    /// Copies `data` to user memory at `ua` through the page table.
    ///
    /// Errors: [`Error::NotMapped`] at the first unmapped page.
    pub fn write(&self, ua: UserVa, data: &[u8]) -> Result<()> {
        // The user's stores go through the CPU, and its cache model if any, under the user
        // alias (which, on a VIPT cache, may be a colour of its own).
        let cpu = self.machine.cpu();
        self.walk(ua, data.len() as u64, |pa, off, n| {
            cpu.write_alias(ua.raw() + off as u64, pa, &data[off..off + n])
        })
    }

    /// Copies user memory at `ua` into `buf` through the page table.
    ///
    /// Errors: [`Error::NotMapped`] at the first unmapped page.
    pub fn read(&self, ua: UserVa, buf: &mut [u8]) -> Result<()> {
        let cpu = self.machine.cpu();
        self.walk(ua, buf.len() as u64, |pa, off, n| {
            cpu.read_alias(ua.raw() + off as u64, pa, &mut buf[off..off + n])
        })
    }

    fn walk(
        &self,
        ua: UserVa,
        len: u64,
        mut f: impl FnMut(PhysAddr, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let at = ua.checked_add(done).ok_or(Error::Overflow { base: ua.raw(), len })?;
            let pa = self.translate(at).ok_or(Error::NotMapped { addr: at.raw() })?;
            let n = (PAGE_SIZE - at.page_offset()).min(len - done);
            f(pa, done as usize, n as usize)?;
            done += n;
        }
        Ok(())
    }

    /// Moves the 4 KiB page holding `ua` to a new frame (copying its bytes), as page
    /// migration does; returns the new frame.
    ///
    /// Errors: [`Error::NotMapped`]; [`Error::Busy`] if the page is pinned (pinned pages stay
    /// put); [`Error::Unsupported`] for a page of a huge mapping; [`Error::NoMemory`].
    pub fn migrate(&self, ua: UserVa) -> Result<PhysAddr> {
        let vpn = ua.raw() >> PAGE_SHIFT;
        let mut s = self.lock();
        let pte = *s.ptes.get(&vpn).ok_or(Error::NotMapped { addr: ua.raw() })?;
        if pte.pins > 0 {
            return Err(Error::Busy { what: "pinned user page", count: pte.pins as u64 });
        }
        if pte.huge.is_some() {
            return Err(Error::Unsupported { what: "migration of a huge page" });
        }
        let new = self.machine.alloc_frames(FrameRequest::pages(1))?;
        let mut page = [0u8; PAGE_SIZE as usize];
        self.machine.read_phys(pte.pa, &mut page)?;
        self.machine.write_phys(new.pa(), &page)?;
        let pa = new.pa();
        s.ptes.insert(vpn, Pte { pa, ..pte });
        s.blocks.remove(&pte.pa.raw());
        s.blocks.insert(pa.raw(), new);
        self.counters.migrations.fetch_add(1, Ordering::Relaxed);
        Ok(pa)
    }

    /// Migrates every unpinned 4 KiB page (compaction); pinned pages are skipped. Returns
    /// `(moved, skipped because pinned)`.
    ///
    /// Errors: [`Error::NoMemory`] if a new frame cannot be had (pages moved so far stay moved).
    pub fn compact(&self) -> Result<(u64, u64)> {
        let candidates: Vec<(u64, Pte)> = self.lock().ptes.iter().map(|(&v, &p)| (v, p)).collect();
        let (mut moved, mut pinned) = (0, 0);
        for (vpn, pte) in candidates {
            match self.migrate(UserVa::new(vpn << PAGE_SHIFT)) {
                Ok(_) => moved += 1,
                Err(Error::Busy { .. }) => pinned += 1,
                Err(Error::Unsupported { .. }) if pte.huge.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        Ok((moved, pinned))
    }
}

impl PinBackend for UserSpace<'_> {
    fn pin(&self, ua: UserVa, out: &mut [PhysAddr]) -> Result<()> {
        let first = ua.raw() >> PAGE_SHIFT;
        let mut s = self.lock();
        for (i, slot) in out.iter_mut().enumerate() {
            let vpn = first + i as u64;
            match s.ptes.get_mut(&vpn) {
                Some(pte) if pte.pins < u32::MAX => {
                    pte.pins += 1;
                    *slot = pte.pa;
                }
                found => {
                    let err = match found {
                        Some(_) => Error::LimitExceeded {
                            what: "pins per page",
                            requested: u32::MAX as u64 + 1,
                            limit: u32::MAX as u64,
                        },
                        None => Error::NotMapped { addr: vpn << PAGE_SHIFT },
                    };
                    // All or nothing: release the pins taken so far.
                    for v in first..vpn {
                        if let Some(p) = s.ptes.get_mut(&v) {
                            p.pins -= 1;
                        }
                    }
                    return Err(err);
                }
            }
        }
        self.counters.pins.fetch_add(out.len() as u64, Ordering::Relaxed);
        drop(s);
        // What get_user_pages does on a virtually indexed cache (seed 003): flush the user
        // alias, so that the kernel alias, which busdma gives an IOMMU with a coherence index,
        // is the only one that may hold the pages' lines. A no-op without a cache model.
        let cpu = self.machine.cpu();
        for (i, pa) in out.iter().enumerate() {
            // A page-aligned alias of a pinned page of RAM: the flush cannot fail.
            let _ = cpu.clean_invalidate_alias(ua.raw() + i as u64 * PAGE_SIZE, *pa, PAGE_SIZE);
        }
        Ok(())
    }

    fn unpin(&self, ua: UserVa, hpas: &[PhysAddr]) {
        let first = ua.raw() >> PAGE_SHIFT;
        let mut s = self.lock();
        for (i, pa) in hpas.iter().enumerate() {
            let pte = s.ptes.get_mut(&(first + i as u64));
            // Pinned pages cannot be unmapped or moved, so the entry is there, unchanged.
            debug_assert!(
                pte.as_ref().is_some_and(|p| p.pa == *pa && p.pins > 0),
                "unpin of a page not pinned"
            );
            if let Some(p) = pte {
                p.pins = p.pins.saturating_sub(1);
            }
        }
        self.counters.unpins.fetch_add(hpas.len() as u64, Ordering::Relaxed);
    }

    fn report_still_mapped(&self, _ua: UserVa, _size: u64, _mappings: u64) {
        self.counters.still_mapped_reports.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MachineConfig;

    fn machine() -> HostPlatform {
        HostPlatform::new(MachineConfig::with_ram(64 << 20)).unwrap()
    }

    #[test]
    fn migration_moves_unpinned_pages_and_keeps_their_bytes() {
        let m = machine();
        let us = UserSpace::new(&m);
        let ua = UserVa::new(0x40_0000);
        us.map(ua, 2 * PAGE_SIZE).unwrap();
        us.write(UserVa::new(0x40_0ff0), b"across the page boundary").unwrap();
        let before = us.translate(ua).unwrap();
        let after = us.migrate(ua).unwrap();
        assert_ne!(before, after);
        let mut buf = [0u8; 24];
        us.read(UserVa::new(0x40_0ff0), &mut buf).unwrap();
        assert_eq!(&buf, b"across the page boundary");
    }

    #[test]
    fn pinned_pages_stay_put_under_migration_and_compaction() {
        let m = machine();
        let us = UserSpace::new(&m);
        let ua = UserVa::new(0x40_0000);
        us.map(ua, 4 * PAGE_SIZE).unwrap();
        let mut hpas = [PhysAddr::new(0); 2];
        us.pin(ua, &mut hpas).unwrap();
        assert!(matches!(us.migrate(ua), Err(Error::Busy { count: 1, .. })));
        assert!(matches!(us.unmap(ua, PAGE_SIZE), Err(Error::Busy { .. })));
        assert_eq!(us.compact().unwrap(), (2, 2));
        assert_eq!(us.translate(ua), Some(hpas[0]));
        assert_eq!(us.translate(UserVa::new(0x40_1000)), Some(hpas[1]));
        us.unpin(ua, &hpas);
        assert_eq!(us.pinned_pages(), 0);
        assert_ne!(us.migrate(ua).unwrap(), hpas[0]);
    }

    #[test]
    fn pin_is_all_or_nothing() {
        let m = machine();
        let us = UserSpace::new(&m);
        us.map(UserVa::new(0x1000), 2 * PAGE_SIZE).unwrap();
        let mut hpas = [PhysAddr::new(0); 3];
        assert_eq!(us.pin(UserVa::new(0x1000), &mut hpas), Err(Error::NotMapped { addr: 0x3000 }));
        assert_eq!(us.pinned_pages(), 0);
    }

    #[test]
    fn unmapping_returns_every_frame() {
        let m = machine();
        let free = m.frames().free_frames();
        let us = UserSpace::new(&m);
        us.map(UserVa::new(0x1000), 3 * PAGE_SIZE).unwrap();
        us.map_huge(UserVa::new(0x20_0000), 2 << 20).unwrap();
        assert!(matches!(us.unmap(UserVa::new(0x20_0000), PAGE_SIZE), Err(Error::InvalidArgument { .. })));
        us.unmap(UserVa::new(0x1000), 3 * PAGE_SIZE).unwrap();
        us.unmap(UserVa::new(0x20_0000), 2 << 20).unwrap();
        assert_eq!(m.frames().free_frames(), free);
        us.map(UserVa::new(0x1000), PAGE_SIZE).unwrap();
        drop(us);
        assert_eq!(m.frames().free_frames(), free);
    }
}
