//! Typed coherent memory: plain-data values and atomic status words in memory a device may
//! write at any time.
//!
//! # Theory
//!
//! 1. **A view is a borrowed window.** A [`DmaView`] names bytes `[0, len)` of DMA memory
//!    ([`DmaMemory::view`], [`Coherent::view`](super::Coherent::view), a pool block's
//!    [`DmaBlock::view`](super::DmaBlock::view)) for as long as the borrow of its owner lasts;
//!    the owner keeps the pages allocated (and, for coherent memory, mapped) meanwhile. Every
//!    access is checked against the window: beyond it is [`Error::OutOfRange`] `{ addr: end,
//!    limit: len }`, a wrapping offset [`Error::Overflow`]. [`DmaView::sub`] narrows a view (one
//!    descriptor of a ring).
//! 2. **Values by copy, never by reference.** [`DmaView::read`] and [`DmaView::write`] copy a
//!    `T: `[`Pod`] (and [`DmaView::read_slice`]/[`DmaView::write_slice`] an array of them) to
//!    and from the memory through the platform's physical copies
//!    ([`Platform::read_phys`]/[`Platform::write_phys`]). `Pod` (bytemuck's contract, derived,
//!    never hand-written) is what makes a copy of bytes a device wrote a valid value: every bit
//!    pattern is a `T`, a `T` has no padding (all its bytes are initialised), no pointers, no
//!    drop. A copy is not atomic: a device writing the same bytes meanwhile gives a torn value,
//!    never undefined behaviour; that is what status words are for (3).
//! 3. **Status words are atomic.** [`DmaView::atomic_u32`] and [`DmaView::atomic_u64`] name an
//!    aligned word (its address a multiple of its size, else [`Error::Misaligned`] `{ value:
//!    offset, align }`) reached through the CPU's direct mapping of the page (memory outside the
//!    direct map: [`Error::NotDirectMapped`]). Their orderings are the descriptor protocol's,
//!    fixed so a driver cannot pick a wrong one (and so no ordering argument can panic): a
//!    store is a release preceded by [`Platform::dma_wmb`] (the descriptor written before it,
//!    by copy, reaches the device before the word that hands it over: Linux's `dma_wmb()`
//!    before setting OWN); a load is an acquire followed by [`Platform::dma_rmb`] (what the
//!    word describes is read after it); a read-modify-write is both.
//! 4. **Read-modify-write only on write-back memory.** [`DmaAtomicU32::compare_exchange`],
//!    `fetch_or` and `fetch_and` on memory mapped [`MemAttr::Uncached`] are
//!    [`Error::Unsupported`]; plain loads and stores are allowed on every attribute (an aligned
//!    word load or store is single-copy atomic on any memory type). Why: an atomic RMW is made
//!    atomic by the cache coherence protocol holding the line exclusive, and uncached memory has
//!    no line. On Arm, exclusives (LDXR/STXR) to Normal Non-cacheable or Device memory are
//!    IMPLEMENTATION DEFINED (the exclusive monitor may not cover them: the loop may never
//!    succeed, or fault), and LSE atomics there need far atomics in the interconnect; RISC-V
//!    AMOs need a region whose PMA supports them; x86 locked operations on UC memory fall back
//!    to a bus lock. Write-back coherent memory is what busdma allocates for a coherent tag,
//!    whose device snoops, so an RMW there is atomic against the device too. A non-coherent
//!    tag's coherent memory is uncached (coherent theory 2): its status words take loads and
//!    stores only, the protocol Linux drivers use (the device sets DONE, the CPU stores a
//!    fresh OWN).
//! 5. **Why no `unsafe` is needed in a driver, and why none of this is undefined behaviour.**
//!    The bytes a device can write are no Rust object's: busdma reaches them only through raw
//!    copies (the platform's) and atomic instructions, and never forms `&T`/`&mut T` to a
//!    non-atomic type over them, so the compiler is never promised that they hold still. An
//!    atomic handle holds a `&AtomicU32`/`&AtomicU64` (interior-mutable, like a page-table
//!    entry, [`crate::TablePage::entry`]) that lives no longer than the view's borrow of the
//!    memory's owner, so it cannot outlive the pages. Two CPU threads racing a copy against an
//!    atomic word of the same bytes tear as the device does: the memory is treated, like
//!    memory shared with another process or a guest, as outside the abstract machine (the
//!    stance of rust-vmm's vm-memory); the driver's protocol, not the compiler, orders them.
//!
//! A view cannot outlive the memory it looks at:
//!
//! ```compile_fail,E0515
//! use busdma::front::{DmaMemory, DmaView};
//! fn keep<'p, P: busdma::Platform>(mem: DmaMemory<'p, P>) -> DmaView<'p, P> {
//!     mem.view() // error[E0515]: returns a value referencing the local `mem`
//! }
//! ```
//!
//! and there is no way to borrow the bytes; they come out by copy:
//!
//! ```compile_fail,E0599
//! fn peek<P: busdma::Platform>(mem: &busdma::front::DmaMemory<'_, P>) -> u32 {
//!     let words: &[u32] = mem.view().as_slice(); // error[E0599]: no such method
//!     words[0]
//! }
//! ```
#![deny(unsafe_code)] // two blocks: the atomic words over the direct map, `DmaView::atomic_u32`/`atomic_u64`

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytemuck::Pod;

use crate::addr::PhysAddr;
use crate::error::{Error, Result};
use crate::platform::{MemAttr, Platform};

use super::coherent::{Coherent, DmaMemory};
use super::strategy::Strategy;

/// A window on DMA memory: typed copies and atomic words, never references (theory 1–5).
///
/// # Invariants
///
/// `[pa, pa + len)` lies inside one [`DmaMemory`] (pages of `p`'s `alloc_pages`, placed in the
/// direct map) that is borrowed for `'a`, so it stays allocated for `'a`: a view is made only
/// by [`DmaMemory::view`] and narrowed only inside itself.
#[derive(Clone, Copy)]
pub struct DmaView<'a, P: Platform> {
    p: &'a P,
    pa: PhysAddr,
    len: u64,
    attr: MemAttr,
}

impl<P: Platform> core::fmt::Debug for DmaView<'_, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DmaView")
            .field("pa", &self.pa)
            .field("len", &self.len)
            .field("attr", &self.attr)
            .finish()
    }
}

impl<'p, P: Platform> DmaMemory<'p, P> {
    /// The whole memory as a typed view ([`super::view`]).
    pub fn view(&self) -> DmaView<'_, P> {
        // INVARIANT: the whole of this memory, borrowed for the view's life.
        DmaView { p: self.platform(), pa: self.pa(), len: self.len(), attr: self.attr() }
    }
}

impl<'p, P: Platform, S: Strategy<P>> Coherent<'p, P, S> {
    /// The memory as a typed view ([`super::view`]): descriptors by copy, status words by
    /// atomic access.
    pub fn view(&self) -> DmaView<'_, P> {
        self.memory().view()
    }
}

impl<'a, P: Platform> DmaView<'a, P> {
    /// Length of the window in bytes.
    #[inline]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the window is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How the CPU maps the memory (theory 4: whether read-modify-write atomics are allowed).
    #[inline]
    pub fn attr(&self) -> MemAttr {
        self.attr
    }

    /// Bytes `[offset, offset + len)` of this view, as a view.
    ///
    /// Errors: [`Error::Overflow`], [`Error::OutOfRange`] beyond the view.
    pub fn sub(&self, offset: u64, len: u64) -> Result<DmaView<'a, P>> {
        let pa = self.at(offset, len)?;
        // INVARIANT: inside this view's memory, same borrow.
        Ok(DmaView { pa, len, ..*self })
    }

    /// Bytes `[offset, offset + len)` clamped to the view (never fails; for callers that know
    /// the range is inside, such as the pool's blocks).
    pub(crate) fn window(&self, offset: u64, len: u64) -> DmaView<'a, P> {
        let start = offset.min(self.len);
        let len = len.min(self.len - start);
        // INVARIANT: clamped inside this view.
        DmaView { pa: PhysAddr::new(self.pa.raw() + start), len, ..*self }
    }

    /// Copies the `T` at `offset` out of the memory (theory 2).
    ///
    /// Errors: [`Error::Overflow`], [`Error::OutOfRange`] beyond the view.
    pub fn read<T: Pod>(&self, offset: u64) -> Result<T> {
        let mut v = T::zeroed();
        self.read_bytes(offset, bytemuck::bytes_of_mut(&mut v))?;
        Ok(v)
    }

    /// Copies `value` into the memory at `offset` (theory 2).
    ///
    /// Errors: [`Error::Overflow`], [`Error::OutOfRange`] beyond the view.
    pub fn write<T: Pod>(&self, offset: u64, value: &T) -> Result<()> {
        self.write_bytes(offset, bytemuck::bytes_of(value))
    }

    /// Copies `out.len()` consecutive `T`s at `offset` into `out`.
    ///
    /// Errors: [`Error::Overflow`], [`Error::OutOfRange`] beyond the view.
    pub fn read_slice<T: Pod>(&self, offset: u64, out: &mut [T]) -> Result<()> {
        self.read_bytes(offset, bytemuck::cast_slice_mut(out))
    }

    /// Copies `values` into the memory at `offset`, one after the other.
    ///
    /// Errors: [`Error::Overflow`], [`Error::OutOfRange`] beyond the view.
    pub fn write_slice<T: Pod>(&self, offset: u64, values: &[T]) -> Result<()> {
        self.write_bytes(offset, bytemuck::cast_slice(values))
    }

    /// Sets bytes `[offset, offset + len)` to `byte`.
    ///
    /// Errors: [`Error::Overflow`], [`Error::OutOfRange`] beyond the view.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<()> {
        let pa = self.at(offset, len)?;
        self.p.fill_phys(pa, len, byte)
    }

    /// The aligned 32-bit word at `offset`, for atomic access (theory 3, 4).
    ///
    /// Errors: [`Error::Overflow`], [`Error::OutOfRange`] beyond the view,
    /// [`Error::Misaligned`] `{ value: offset, align: 4 }`, [`Error::NotDirectMapped`].
    pub fn atomic_u32(&self, offset: u64) -> Result<DmaAtomicU32<'a, P>> {
        let ptr = self.word(offset, 4)?;
        // SAFETY: `word` proved the conditions of `AtomicU32::from_ptr` (its comment says why):
        // aligned, valid for `'a`, reached only by atomics and raw copies (theory 5).
        #[allow(unsafe_code)]
        let word = unsafe { AtomicU32::from_ptr(ptr as *mut u32) };
        Ok(DmaAtomicU32 { p: self.p, word, rmw: self.attr == MemAttr::WriteBack })
    }

    /// The aligned 64-bit word at `offset`, for atomic access (theory 3, 4).
    ///
    /// Errors: [`Error::Overflow`], [`Error::OutOfRange`] beyond the view,
    /// [`Error::Misaligned`] `{ value: offset, align: 8 }`, [`Error::NotDirectMapped`].
    pub fn atomic_u64(&self, offset: u64) -> Result<DmaAtomicU64<'a, P>> {
        let ptr = self.word(offset, 8)?;
        // SAFETY: `word` proved the conditions of `AtomicU64::from_ptr` (its comment says why):
        // aligned, valid for `'a`, reached only by atomics and raw copies (theory 5).
        #[allow(unsafe_code)]
        let word = unsafe { AtomicU64::from_ptr(ptr as *mut u64) };
        Ok(DmaAtomicU64 { p: self.p, word, rmw: self.attr == MemAttr::WriteBack })
    }

    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let pa = self.at(offset, buf.len() as u64)?;
        self.p.read_phys(pa, buf)
    }

    fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<()> {
        let pa = self.at(offset, data.len() as u64)?;
        self.p.write_phys(pa, data)
    }

    /// The physical address of `[offset, offset + n)`, checked against the view.
    fn at(&self, offset: u64, n: u64) -> Result<PhysAddr> {
        crate::addr::checked_end(offset, n, self.len)?;
        Ok(PhysAddr::new(self.pa.raw() + offset))
    }

    /// The kernel address of the `size`-byte word at `offset`, which may be viewed as an atomic
    /// of that size for `'a`: the word is inside the view, which lies in DMA memory borrowed for
    /// `'a` (type invariant), so it stays allocated as long; `kva` maps `pa` read-write for the
    /// platform's life (the `Platform` contract on `phys_to_kva`); the address is aligned to
    /// `size` (checked, physical and virtual); the bytes are only ever reached by raw copies
    /// and atomic instructions, never through a reference to a non-atomic type (theory 5).
    fn word(&self, offset: u64, size: u64) -> Result<usize> {
        let pa = self.at(offset, size)?;
        if !pa.is_aligned(size) {
            return Err(Error::Misaligned { value: offset, align: size });
        }
        // An aligned word never crosses a page, so the direct map's answer for its first byte
        // covers all of it.
        let kva = self.p.phys_to_kva(pa).ok_or(Error::NotDirectMapped { pa: pa.raw() })?;
        if !kva.is_aligned(size) {
            return Err(Error::Misaligned { value: kva.raw(), align: size });
        }
        Ok(kva.raw() as usize)
    }
}

macro_rules! atomic_word {
    ($name:ident, $int:ty, $atomic:ty, $bits:literal) => {
        #[doc = concat!("An aligned ", $bits, "-bit word of DMA memory, accessed atomically with the")]
        /// descriptor protocol's orderings ([`super::view`] theory 3, 4).
        ///
        /// # Invariants
        ///
        /// `word` lies in DMA memory that stays allocated for `'a`; `rmw` is true only if that
        /// memory is mapped write-back.
        #[derive(Clone, Copy)]
        pub struct $name<'a, P: Platform> {
            p: &'a P,
            word: &'a $atomic,
            rmw: bool,
        }

        impl<P: Platform> core::fmt::Debug for $name<'_, P> {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.debug_struct(stringify!($name)).field("rmw", &self.rmw).finish_non_exhaustive()
            }
        }

        impl<P: Platform> $name<'_, P> {
            /// Reads the word (an acquire, then [`Platform::dma_rmb`]: what the word describes
            /// is read after it).
            #[inline]
            pub fn load(&self) -> $int {
                let v = self.word.load(Ordering::Acquire);
                self.p.dma_rmb();
                v
            }

            /// Writes the word ([`Platform::dma_wmb`], then a release: what was written before
            /// reaches the device before the word).
            #[inline]
            pub fn store(&self, value: $int) {
                self.p.dma_wmb();
                self.word.store(value, Ordering::Release);
            }

            /// If the word is `current`, makes it `new`: `Ok(Ok(current))` on success,
            /// `Ok(Err(actual))` with the value found otherwise (the orderings of both
            /// [`Self::store`] and [`Self::load`]).
            ///
            /// Errors: [`Error::Unsupported`] on memory that is not write-back (theory 4).
            #[inline]
            pub fn compare_exchange(
                &self,
                current: $int,
                new: $int,
            ) -> Result<core::result::Result<$int, $int>> {
                self.check_rmw()?;
                self.p.dma_wmb();
                let r = self.word.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire);
                self.p.dma_rmb();
                Ok(r)
            }

            /// Sets the bits of `bits` in the word; returns the previous value.
            ///
            /// Errors: [`Error::Unsupported`] on memory that is not write-back (theory 4).
            #[inline]
            pub fn fetch_or(&self, bits: $int) -> Result<$int> {
                self.check_rmw()?;
                self.p.dma_wmb();
                let v = self.word.fetch_or(bits, Ordering::AcqRel);
                self.p.dma_rmb();
                Ok(v)
            }

            /// Clears the bits not in `mask`; returns the previous value.
            ///
            /// Errors: [`Error::Unsupported`] on memory that is not write-back (theory 4).
            #[inline]
            pub fn fetch_and(&self, mask: $int) -> Result<$int> {
                self.check_rmw()?;
                self.p.dma_wmb();
                let v = self.word.fetch_and(mask, Ordering::AcqRel);
                self.p.dma_rmb();
                Ok(v)
            }

            /// Whether read-modify-write operations are allowed (write-back memory).
            #[inline]
            pub fn rmw_allowed(&self) -> bool {
                self.rmw
            }

            fn check_rmw(&self) -> Result<()> {
                if self.rmw {
                    Ok(())
                } else {
                    Err(Error::Unsupported {
                        what: "atomic read-modify-write on memory that is not write-back (uncached)",
                    })
                }
            }
        }
    };
}

atomic_word!(DmaAtomicU32, u32, AtomicU32, "32");
atomic_word!(DmaAtomicU64, u64, AtomicU64, "64");
