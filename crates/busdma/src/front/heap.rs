//! Kernel-heap buffers a map can own: whole pages of the global allocator, loaded safely.
//!
//! # Theory
//!
//! 1. **A heap buffer is loadable when it owns every page it touches.** An IOMMU maps whole
//!    pages and CPU caches are maintained by whole lines, so a device given part of a page can
//!    reach the rest of it, and an invalidate of a shared line can drop a neighbour's store.
//!    A byte vector from the allocator shares its first and last pages with other objects, so
//!    safe code cannot be allowed to load one. [`HeapBuffer`] is built of [`HeapPage`]s, a type
//!    whose alignment and size are the page: its allocation starts on a page and covers whole
//!    pages, all of them its own. Loaded into an [`super::OwnedMap`], every byte the device can
//!    reach (and every line a sync maintains) belongs to the map.
//! 2. **The platform says where it is.** The runs are the direct map's translation of each page
//!    ([`crate::Platform::kva_to_phys`]); a heap outside the direct map (a hosted model's host
//!    heap, a kernel's vmalloc area) is refused with [`Error::NotDirectMapped`] at the load,
//!    and the buffer comes back.
//! 3. **No references while the device may access it.** The buffer holds its pages by raw
//!    pointer, not as a `Box`, so no Rust reference to its bytes exists while a map holds it:
//!    through the map the CPU gets `&HeapBuffer`, which only copies out
//!    ([`HeapBuffer::read`]); slices are lent only through `&mut`, which a loaded map never
//!    gives.
//! 4. **Quarantine leaks, never frees.** A buffer whose unload cannot be proven complete is
//!    leaked ([`super::DmaBuffer::quarantine`]): the global allocator never gets back pages a
//!    translation may still reach.
#![deny(unsafe_code)] // the blocks: owning the pages by raw pointer (new, drop, slices, read)

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ptr::NonNull;

use crate::addr::{KernVa, PAGE_SIZE};
use crate::error::{Error, Result};
use crate::platform::Platform;

use super::coherent::DmaMemory;
use super::load::{MemKind, Run};
use super::owned::{DmaBuffer, sealed};

/// One page of memory, page-aligned by its type (theory 1).
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
pub struct HeapPage(pub [u8; PAGE_SIZE as usize]);

impl HeapPage {
    /// A page of zeroes.
    pub const ZERO: HeapPage = HeapPage([0; PAGE_SIZE as usize]);
}

/// Pages of the kernel heap that a map can own (theory 1–4): `len` bytes in use out of whole
/// pages.
///
/// # Invariants
///
/// `ptr` is the start of a `Box<[HeapPage]>` of `pages` elements (`pages > 0`) that this value
/// owns; `0 < len <= pages * PAGE_SIZE`.
pub struct HeapBuffer {
    ptr: NonNull<HeapPage>,
    pages: usize,
    len: u64,
}

// SAFETY: the buffer owns its pages outright (theory 3); moving it to another thread moves the
// ownership, and `&self` only copies bytes out.
#[allow(unsafe_code)]
unsafe impl Send for HeapBuffer {}
// SAFETY: as above: shared access is read-only copies.
#[allow(unsafe_code)]
unsafe impl Sync for HeapBuffer {}

impl HeapBuffer {
    /// `len` zeroed bytes from the global allocator, in whole pages.
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::NoMemory`] (the allocator refused; never an
    /// abort).
    pub fn new_zeroed(len: u64) -> Result<Self> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        let pages = usize::try_from(len.div_ceil(PAGE_SIZE))
            .map_err(|_| Error::BadSize { size: len, limit: usize::MAX as u64 })?;
        let mut v: Vec<HeapPage> = Vec::new();
        v.try_reserve_exact(pages).map_err(|_| Error::NoMemory { requested: pages as u64 * PAGE_SIZE })?;
        v.resize(pages, HeapPage::ZERO);
        Self::from_pages(v.into_boxed_slice(), len)
    }

    /// Takes `pages` and uses their first `len` bytes.
    ///
    /// Errors: [`Error::ZeroSize`] (no page, or `len` 0), [`Error::BadSize`] (`len` beyond the
    /// pages).
    pub fn from_pages(pages: Box<[HeapPage]>, len: u64) -> Result<Self> {
        let n = pages.len();
        if n == 0 || len == 0 {
            return Err(Error::ZeroSize);
        }
        let cap = n as u64 * PAGE_SIZE;
        if len > cap {
            return Err(Error::BadSize { size: len, limit: cap });
        }
        let ptr = NonNull::from(Box::leak(pages)).cast::<HeapPage>();
        // INVARIANT: the box's start and length, owned from here; len checked above.
        Ok(Self { ptr, pages: n, len })
    }

    /// The pages, given back.
    pub fn into_pages(self) -> Box<[HeapPage]> {
        let me = core::mem::ManuallyDrop::new(self);
        let slice = core::ptr::slice_from_raw_parts_mut(me.ptr.as_ptr(), me.pages);
        // SAFETY: type invariant: the box leaked by `from_pages`, not freed (drop is
        // suppressed), given back once.
        #[allow(unsafe_code)]
        unsafe {
            Box::from_raw(slice)
        }
    }

    /// Bytes in use (what a map loads).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a buffer holds at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bytes of its pages.
    pub fn capacity(&self) -> u64 {
        self.pages as u64 * PAGE_SIZE
    }

    /// Sets the bytes in use (a received frame's length).
    ///
    /// Errors: [`Error::ZeroSize`], [`Error::BadSize`] beyond the capacity.
    pub fn set_len(&mut self, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::ZeroSize);
        }
        if len > self.capacity() {
            return Err(Error::BadSize { size: len, limit: self.capacity() });
        }
        self.len = len;
        Ok(())
    }

    /// The bytes in use, to fill or read while no map holds the buffer (theory 3).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: type invariant: `len` bytes of pages this value owns; `&mut self` excludes
        // every other access (a map holding the buffer lends only `&self`).
        #[allow(unsafe_code)]
        unsafe {
            core::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<u8>(), self.len as usize)
        }
    }

    /// Copies bytes at `offset` into `buf`, even while a device may write them (theory 3).
    ///
    /// Errors: [`Error::OutOfRange`] beyond the bytes in use, [`Error::Overflow`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = buf.len() as u64;
        crate::addr::checked_end(offset, n, self.len)?;
        // SAFETY: `[offset, end)` lies in the owned pages (checked); `buf` is a distinct Rust
        // buffer; the copy goes through raw pointers, no reference to the pages is made.
        #[allow(unsafe_code)]
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().cast::<u8>().add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }
}

impl Drop for HeapBuffer {
    fn drop(&mut self) {
        let slice = core::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.pages);
        // SAFETY: type invariant: the box leaked by `from_pages`, freed once, here. A buffer a
        // translation may still reach never gets here: it is leaked instead (theory 4).
        #[allow(unsafe_code)]
        drop(unsafe { Box::from_raw(slice) });
    }
}

impl sealed::Sealed for HeapBuffer {}
/// A heap buffer as an owned buffer (theory 1, 2, 4).
impl<'p, P: Platform> DmaBuffer<'p, P> for HeapBuffer {
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        let start = self.ptr.as_ptr() as u64;
        let mut off = 0;
        while off < self.len {
            let chunk = PAGE_SIZE.min(self.len - off);
            let kva = KernVa::new(start + off);
            let pa = p.kva_to_phys(kva).ok_or(Error::NotDirectMapped { pa: kva.raw() })?;
            f(Run { pa, len: chunk, kind: MemKind::Page, kva: Some(kva) })?;
            off += chunk;
        }
        Ok(())
    }

    fn quarantine(self, _keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        core::mem::forget(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heap_buffer_starts_on_a_page_and_owns_whole_pages() {
        let b = HeapBuffer::new_zeroed(5000).unwrap();
        assert_eq!(b.ptr.as_ptr() as u64 % PAGE_SIZE, 0);
        assert_eq!((b.len(), b.capacity()), (5000, 2 * PAGE_SIZE));
        let mut x = [1u8; 4];
        b.read(4996, &mut x).unwrap();
        assert_eq!(x, [0; 4]);
        assert_eq!(b.read(4997, &mut x), Err(Error::OutOfRange { addr: 5001, limit: 5000 }));
    }

    #[test]
    fn bad_lengths_are_refused_and_the_pages_round_trip() {
        assert_eq!(HeapBuffer::new_zeroed(0).err(), Some(Error::ZeroSize));
        let pages = alloc::vec![HeapPage::ZERO; 2].into_boxed_slice();
        assert_eq!(
            HeapBuffer::from_pages(pages.clone(), 2 * PAGE_SIZE + 1).err(),
            Some(Error::BadSize { size: 2 * PAGE_SIZE + 1, limit: 2 * PAGE_SIZE })
        );
        let mut b = HeapBuffer::from_pages(pages, 10).unwrap();
        b.bytes_mut().copy_from_slice(b"0123456789");
        assert_eq!(
            b.set_len(3 * PAGE_SIZE),
            Err(Error::BadSize { size: 3 * PAGE_SIZE, limit: 2 * PAGE_SIZE })
        );
        b.set_len(PAGE_SIZE + 1).unwrap();
        let back = b.into_pages();
        assert_eq!(&back[0].0[..10], b"0123456789");
    }
}
