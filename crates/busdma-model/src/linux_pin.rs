//! Real Linux memory as a pin backend: `mlock` and `/proc/self/pagemap`.
//!
//! # Theory
//!
//! 1. **What it does.** Userspace drivers (SPDK, DPDK) translate their own virtual addresses
//!    to physical ones the same way: lock the pages in memory, then read each page's frame
//!    number from `/proc/self/pagemap` (one little-endian 64-bit entry per virtual page: bit 63
//!    "present", bits 0..=54 the frame number). [`LinuxPin`] implements
//!    [`busdma::pin::PinBackend`] that way, so busdma's registry runs over real frames.
//! 2. **Privilege.** Since Linux 4.2 the frame field reads 0 without `CAP_SYS_ADMIN`. A present
//!    page with frame 0 is therefore "not allowed to know", never an answer: `pin` returns
//!    [`Error::PermissionDenied`] (frame 0 is never user memory on any architecture Linux
//!    runs user space on; x86 reserves it).
//! 3. **Nesting.** `mlock` does not nest (one `munlock` unlocks a page however often it was
//!    locked), so the backend keeps a lock count per page and unlocks a page only when its
//!    count returns to zero.
//! 4. **Limits of the guarantee.** `mlock` keeps pages resident (never swapped) and faults them
//!    in, writable; it does not forbid the kernel from *migrating* them when
//!    `vm.compact_unevictable_allowed` is 1 (the default). In-kernel pinning
//!    (`pin_user_pages(FOLL_LONGTERM)`) or hugetlbfs is what truly fixes frames; this
//!    backend is the userspace-driver approximation, and its tests check that frames read
//!    again later are unchanged.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use busdma::pin::PinBackend;
use busdma::{Error, PAGE_SHIFT, PAGE_SIZE, PhysAddr, Result, UserVa};

/// Bit 63 of a pagemap entry: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// Bits 0..=54 of a pagemap entry: the frame number (when present).
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Decodes one pagemap entry for the page at `ua` (section 2).
///
/// Errors: [`Error::NotMapped`] (not present), [`Error::PermissionDenied`] (frame hidden).
pub fn decode_pagemap_entry(entry: u64, ua: UserVa) -> Result<PhysAddr> {
    if entry & PM_PRESENT == 0 {
        return Err(Error::NotMapped { addr: ua.raw() });
    }
    match entry & PM_PFN_MASK {
        0 => Err(Error::PermissionDenied { what: "/proc/self/pagemap frame numbers (needs CAP_SYS_ADMIN)" }),
        pfn => Ok(PhysAddr::new(pfn << PAGE_SHIFT)),
    }
}

/// Counters of a [`LinuxPin`].
#[derive(Debug, Default)]
pub struct LinuxPinCounters {
    /// Page pins taken.
    pub pins: AtomicU64,
    /// Page pins released.
    pub unpins: AtomicU64,
    /// Regions a registry reported still DMA-mapped at its teardown.
    pub still_mapped_reports: AtomicU64,
}

/// Pins real pages of this process.
pub struct LinuxPin {
    pagemap: File,
    /// Lock count per virtual page number (section 3).
    locks: Mutex<BTreeMap<u64, u32>>,
    counters: LinuxPinCounters,
}

fn os_err(ua: UserVa, what: &'static str) -> Error {
    match std::io::Error::last_os_error().raw_os_error() {
        // mlock: "some of the specified address range does not correspond to mapped pages".
        Some(libc::ENOMEM) => Error::NotMapped { addr: ua.raw() },
        Some(libc::EPERM) => Error::PermissionDenied { what },
        Some(libc::EAGAIN) => Error::NoMemory { requested: 0 },
        _ => Error::Unsupported { what },
    }
}

impl LinuxPin {
    /// Opens this process's pagemap.
    ///
    /// Errors: [`Error::Unsupported`] if `/proc/self/pagemap` cannot be opened.
    pub fn new() -> Result<Self> {
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|_| Error::Unsupported { what: "/proc/self/pagemap" })?;
        Ok(Self { pagemap, locks: Mutex::new(BTreeMap::new()), counters: LinuxPinCounters::default() })
    }

    /// Counters.
    pub fn counters(&self) -> &LinuxPinCounters {
        &self.counters
    }

    /// Reads the frames of the `out.len()` pages at `ua` from pagemap (no locking).
    ///
    /// Errors: as [`decode_pagemap_entry`]; [`Error::Unsupported`] if the read fails.
    pub fn frames(&self, ua: UserVa, out: &mut [PhysAddr]) -> Result<()> {
        let mut raw = vec![0u8; out.len() * 8];
        let off = (ua.raw() >> PAGE_SHIFT) * 8;
        self.pagemap
            .read_exact_at(&mut raw, off)
            .map_err(|_| Error::Unsupported { what: "read of /proc/self/pagemap" })?;
        for (i, (slot, bytes)) in out.iter_mut().zip(raw.chunks_exact(8)).enumerate() {
            let entry = u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]));
            *slot = decode_pagemap_entry(entry, UserVa::new(ua.raw() + i as u64 * PAGE_SIZE))?;
        }
        Ok(())
    }

    /// Pages locked by this backend now.
    pub fn locked_pages(&self) -> u64 {
        self.lock().len() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u32>> {
        // Each update is a whole insert or remove, so a poisoned map is still consistent.
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops one lock count on pages `[first, first + pages)`, munlocking those that reach 0.
    fn release(&self, locks: &mut BTreeMap<u64, u32>, first: u64, pages: u64) {
        for vpn in first..first + pages {
            let last = match locks.get_mut(&vpn) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => true,
                None => false,
            };
            if last {
                locks.remove(&vpn);
                // SAFETY: munlock only changes residency attributes of our own pages.
                unsafe { libc::munlock((vpn << PAGE_SHIFT) as *const libc::c_void, PAGE_SIZE as usize) };
            }
        }
    }
}

impl PinBackend for LinuxPin {
    fn pin(&self, ua: UserVa, out: &mut [PhysAddr]) -> Result<()> {
        let first = ua.raw() >> PAGE_SHIFT;
        let pages = out.len() as u64;
        let mut locks = self.lock();
        // SAFETY: mlock only faults in and locks pages of our own address space; it reads or
        // writes no memory on our behalf and fails cleanly on unmapped ranges.
        if unsafe { libc::mlock(ua.raw() as *const libc::c_void, (pages * PAGE_SIZE) as usize) } != 0 {
            let err = os_err(ua, "mlock (RLIMIT_MEMLOCK or CAP_IPC_LOCK)");
            // mlock may have locked the part of the range before a hole: unlock what we did
            // not hold locked already.
            for vpn in (first..first + pages).filter(|v| !locks.contains_key(v)) {
                // SAFETY: as below; a page that is not mapped just fails with ENOMEM.
                unsafe { libc::munlock((vpn << PAGE_SHIFT) as *const libc::c_void, PAGE_SIZE as usize) };
            }
            return Err(err);
        }
        for vpn in first..first + pages {
            *locks.entry(vpn).or_insert(0) += 1;
        }
        if let Err(e) = self.frames(ua, out) {
            self.release(&mut locks, first, pages);
            return Err(e);
        }
        self.counters.pins.fetch_add(pages, Ordering::Relaxed);
        Ok(())
    }

    fn unpin(&self, ua: UserVa, hpas: &[PhysAddr]) {
        let mut locks = self.lock();
        self.release(&mut locks, ua.raw() >> PAGE_SHIFT, hpas.len() as u64);
        self.counters.unpins.fetch_add(hpas.len() as u64, Ordering::Relaxed);
    }

    fn report_still_mapped(&self, _ua: UserVa, _size: u64, _mappings: u64) {
        self.counters.still_mapped_reports.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hidden_frame_number_is_permission_denied_not_zero() {
        let ua = UserVa::new(0x7000_0000);
        assert!(matches!(decode_pagemap_entry(PM_PRESENT, ua), Err(Error::PermissionDenied { .. })));
        assert_eq!(decode_pagemap_entry(0, ua), Err(Error::NotMapped { addr: 0x7000_0000 }));
        assert_eq!(decode_pagemap_entry(PM_PRESENT | 0x1234, ua), Ok(PhysAddr::new(0x123_4000)));
        // Flags above the frame field (soft-dirty, exclusive, file) are not part of the frame.
        assert_eq!(
            decode_pagemap_entry(PM_PRESENT | (1 << 55) | (1 << 56) | 0x10, ua),
            Ok(PhysAddr::new(0x1_0000))
        );
    }
}
