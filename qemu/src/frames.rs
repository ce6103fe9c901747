//! The kernel's physical memory: a bitmap frame allocator over one arena of RAM.
//!
//! # Theory
//!
//! 1. **Where the arena is, and why.** Every frame the kernel hands out (heap, page-table
//!    pages, DMA buffers) lies at or above 2^28 = 256 MiB. edu emits only 28-bit bus addresses,
//!    so data that arrives in such a frame can only have got there through IOMMU
//!    translation; and the RAM below 256 MiB (apart from the kernel image and firmware, below
//!    [`SCRATCH_BASE`]) is never allocated, so the page at the same numeric address as any IOVA
//!    is free for the checks to fill with a sentinel and inspect afterwards.
//! 2. **Layout.** [`HEAP_BYTES`] at the arena's start feed the heap's size classes; the rest
//!    is [`FRAMES`] 4 KiB frames tracked one bit each.
//! 3. **Locking.** One spin lock; the kernel is single-CPU with interrupts off, so it is never
//!    contended, but it keeps `Platform: Sync` honest.

use busdma::sync::SpinLock;
use busdma::{Error, PAGE_SIZE, PhysAddr, Result};

/// Start of the arena: 2^28, the first address edu cannot emit (its DMA mask is 28 bits).
#[cfg(target_arch = "x86_64")]
pub const ARENA_BASE: u64 = 1 << 28;
/// Start of the arena on aarch64 (`qemu/aarch64` shares this file): 128 MiB into the RAM of
/// QEMU's `virt` (which starts at 1 GiB, so every byte of it is already beyond edu's mask),
/// above the kernel image loaded at 0x4008_0000.
#[cfg(target_arch = "aarch64")]
pub const ARENA_BASE: u64 = 0x4800_0000;
/// Bytes of the arena given to the heap: 8 MiB, far more than the checks allocate (tens of
/// KiB of bookkeeping) but small beside the frames.
pub const HEAP_BYTES: u64 = 8 << 20;
/// Frames after the heap: 32768 × 4 KiB = 128 MiB (the runner gives the VM 512 MiB, so the
/// arena [256 MiB, 392 MiB) stays clear of the ACPI tables SeaBIOS puts at the top of RAM).
pub const FRAMES: usize = 32768;
/// First byte of the low scratch zone whose pages the checks may overwrite: 4 MiB, above the
/// BIOS areas and the kernel image (checked at boot). (x86 only: on aarch64 nothing below
/// 2^28 is RAM.)
#[cfg(target_arch = "x86_64")]
pub const SCRATCH_BASE: u64 = 4 << 20;

const WORDS: usize = FRAMES / 64;

/// First frame's physical address.
pub const FRAMES_BASE: u64 = ARENA_BASE + HEAP_BYTES;
/// One past the arena.
pub const ARENA_END: u64 = FRAMES_BASE + FRAMES as u64 * PAGE_SIZE;

struct Bitmap {
    used: [u64; WORDS],
    in_use: usize,
}

static BITMAP: SpinLock<Bitmap> = SpinLock::new(Bitmap { used: [0; WORDS], in_use: 0 });

impl Bitmap {
    fn is_used(&self, i: usize) -> bool {
        self.used[i / 64] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: usize, v: bool) {
        if v {
            self.used[i / 64] |= 1 << (i % 64);
        } else {
            self.used[i / 64] &= !(1 << (i % 64));
        }
    }
}

/// Allocates `pages` contiguous frames whose first byte is `align`-aligned and whose last byte
/// lies below `below`; zeroes them. First fit from the bottom.
pub fn alloc(pages: u64, align: u64, below: Option<u64>) -> Result<PhysAddr> {
    if pages == 0 {
        return Err(Error::ZeroSize);
    }
    if !align.is_power_of_two() || align < PAGE_SIZE {
        return Err(Error::BadAlignment { align });
    }
    let requested = pages.saturating_mul(PAGE_SIZE);
    let n = usize::try_from(pages).map_err(|_| Error::NoMemory { requested })?;
    let limit = below.unwrap_or(ARENA_END).min(ARENA_END);
    let step = usize::try_from(align / PAGE_SIZE).map_err(|_| Error::BadAlignment { align })?;
    let mut bm = BITMAP.lock();
    // First frame index whose address is `align`-aligned.
    let mut first = (FRAMES_BASE.next_multiple_of(align) - FRAMES_BASE) / PAGE_SIZE;
    'search: while (first as usize) + n <= FRAMES {
        let start = first as usize;
        let end_addr = FRAMES_BASE + (start + n) as u64 * PAGE_SIZE;
        if end_addr > limit {
            break;
        }
        for i in start..start + n {
            if bm.is_used(i) {
                first += step as u64;
                continue 'search;
            }
        }
        for i in start..start + n {
            bm.set(i, true);
        }
        bm.in_use += n;
        drop(bm);
        let pa = FRAMES_BASE + start as u64 * PAGE_SIZE;
        // SAFETY: the frames were free and are now ours; the arena is identity-mapped RAM.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, n * PAGE_SIZE as usize) };
        return Ok(PhysAddr::new(pa));
    }
    Err(Error::NoMemory { requested })
}

/// Frees `pages` frames at `pa`.
///
/// Errors: [`Error::DoubleFree`] if any frame is not allocated, [`Error::OutOfRange`] outside
/// the arena.
pub fn free(pa: PhysAddr, pages: u64) -> Result<()> {
    let raw = pa.raw();
    let bytes = pages.checked_mul(PAGE_SIZE).ok_or(Error::Overflow { base: raw, len: pages })?;
    if raw < FRAMES_BASE || raw.checked_add(bytes).is_none_or(|e| e > ARENA_END) {
        return Err(Error::OutOfRange { addr: raw, limit: ARENA_END });
    }
    // Shared with the aarch64 kernel (rust-version 1.85: no `is_multiple_of`).
    #[allow(clippy::manual_is_multiple_of)]
    if raw % PAGE_SIZE != 0 {
        return Err(Error::Misaligned { value: raw, align: PAGE_SIZE });
    }
    let start = ((raw - FRAMES_BASE) / PAGE_SIZE) as usize;
    let n = pages as usize;
    let mut bm = BITMAP.lock();
    if (start..start + n).any(|i| !bm.is_used(i)) {
        return Err(Error::DoubleFree { addr: raw, size: bytes });
    }
    for i in start..start + n {
        bm.set(i, false);
    }
    bm.in_use -= n;
    Ok(())
}

/// Frames currently allocated (for leak checks).
pub fn in_use() -> usize {
    BITMAP.lock().in_use
}
