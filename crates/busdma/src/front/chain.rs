//! Fragment chains: the packet (mbuf) and block-request (bio) shapes of an owned buffer.
//!
//! # Theory
//!
//! 1. **A packet is a chain of parts.** A network stack builds a packet as fragments of
//!    buffers it owns: a header prepended in front of a payload, a payload split across
//!    clusters, bytes trimmed from either end as layers strip their headers (FreeBSD's mbuf
//!    chain, `m_prepend`, `m_adj`; Linux's `skb` frags). [`FragChain`] is that chain over
//!    busdma's owned memory ([`Part`]s of [`DmaMemory`]), so an [`super::OwnedMap`] loads it
//!    whole, without `unsafe`, and the map's coalescing merges fragments that happen to be
//!    contiguous. The CPU reaches the bytes by copy at chain offsets ([`FragChain::read`],
//!    [`FragChain::write`]: `m_copydata`, `m_copyback`).
//! 2. **A block request is a chain with a granule.** A block device transfers whole sectors:
//!    every piece of a bio starts and ends on a sector of the device's logical block size.
//!    [`FragChain::blocks`] makes a chain that refuses, at the push or the trim, a fragment
//!    whose physical start or length is not a multiple of that granule, so a misaligned request
//!    is an error where it is built, not a device fault after it is mapped.
//! 3. **Shape changes only while the chain is the caller's.** A chain loaded in a map is owned
//!    by the map (nobody holds `&mut` to it); it changes shape only between loads, so the runs
//!    the map mapped are always the chain's runs. A fragment trimmed to nothing is dropped, and
//!    its memory is freed like any unloaded [`DmaMemory`]; [`FragChain::pop_front`] and
//!    [`FragChain::pop_back`] give whole fragments back for reuse instead.
//! 4. **Bounded work, no hidden copies.** A push or pop is O(1) amortised; a trim, read or
//!    write walks the fragments it touches; nothing is copied to make the chain contiguous
//!    (that is the device's scatter-gather list's job).
#![deny(unsafe_code)]

use alloc::collections::VecDeque;

use crate::error::{Error, Result};
use crate::platform::Platform;

use super::coherent::DmaMemory;
use super::load::Run;
use super::owned::{DmaBuffer, Part, sealed};

/// A chain of owned fragments: a packet (theory 1) or, with a granule, a block request
/// (theory 2).
///
/// # Invariants
///
/// `len` is the sum of the fragments' lengths; every fragment is non-empty and, if `granule
/// > 1`, starts at a physical address and has a length that are multiples of `granule`.
pub struct FragChain<'p, P: Platform> {
    frags: VecDeque<Part<'p, P>>,
    len: u64,
    granule: u64,
}

impl<P: Platform> Default for FragChain<'_, P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'p, P: Platform> FragChain<'p, P> {
    /// An empty packet chain: fragments of any length at any byte.
    pub fn new() -> Self {
        Self { frags: VecDeque::new(), len: 0, granule: 1 }
    }

    /// An empty block-request chain whose fragments start and end on `sector` bytes.
    ///
    /// Errors: [`Error::BadAlignment`] (`sector` is not a power of two).
    pub fn blocks(sector: u64) -> Result<Self> {
        if !sector.is_power_of_two() {
            return Err(Error::BadAlignment { align: sector });
        }
        Ok(Self { frags: VecDeque::new(), len: 0, granule: sector })
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the chain holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The granule every fragment honours (1 for a packet chain).
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// The fragments, in order.
    pub fn fragments(&self) -> impl ExactSizeIterator<Item = &Part<'p, P>> {
        self.frags.iter()
    }

    /// Checks a fragment against the granule and the total length.
    fn admit(&self, part: &Part<'p, P>) -> Result<u64> {
        let start = part.memory().pa().raw() + part.offset();
        if start % self.granule != 0 {
            return Err(Error::Misaligned { value: start, align: self.granule });
        }
        if part.len() % self.granule != 0 {
            return Err(Error::Misaligned { value: part.len(), align: self.granule });
        }
        self.len.checked_add(part.len()).ok_or(Error::Overflow { base: self.len, len: part.len() })
    }

    /// Appends a fragment (a payload cluster).
    ///
    /// Errors (the fragment comes back): [`Error::Misaligned`] (a block chain's granule),
    /// [`Error::Overflow`].
    #[allow(clippy::result_large_err)]
    pub fn push_back(&mut self, part: Part<'p, P>) -> core::result::Result<(), (Error, Part<'p, P>)> {
        match self.admit(&part) {
            Ok(len) => {
                self.frags.push_back(part);
                self.len = len;
                Ok(())
            }
            Err(e) => Err((e, part)),
        }
    }

    /// Prepends a fragment (a header).
    ///
    /// Errors (the fragment comes back): as [`FragChain::push_back`].
    #[allow(clippy::result_large_err)]
    pub fn push_front(&mut self, part: Part<'p, P>) -> core::result::Result<(), (Error, Part<'p, P>)> {
        match self.admit(&part) {
            Ok(len) => {
                self.frags.push_front(part);
                self.len = len;
                Ok(())
            }
            Err(e) => Err((e, part)),
        }
    }

    /// Removes and returns the first fragment.
    pub fn pop_front(&mut self) -> Option<Part<'p, P>> {
        let f = self.frags.pop_front()?;
        self.len -= f.len();
        Some(f)
    }

    /// Removes and returns the last fragment.
    pub fn pop_back(&mut self) -> Option<Part<'p, P>> {
        let f = self.frags.pop_back()?;
        self.len -= f.len();
        Some(f)
    }

    fn check_trim(&self, n: u64) -> Result<()> {
        if n > self.len {
            return Err(Error::OutOfRange { addr: n, limit: self.len });
        }
        if n % self.granule != 0 {
            return Err(Error::Misaligned { value: n, align: self.granule });
        }
        Ok(())
    }

    /// Drops `n` bytes from the front (a layer strips its header); fragments left empty are
    /// dropped and their memory freed (theory 3).
    ///
    /// Errors (the chain is unchanged): [`Error::OutOfRange`] (`n` beyond the chain),
    /// [`Error::Misaligned`] (a block chain's granule).
    pub fn trim_front(&mut self, mut n: u64) -> Result<()> {
        self.check_trim(n)?;
        self.len -= n;
        while n > 0 {
            let Some(f) = self.frags.front_mut() else { break };
            if f.len() <= n {
                n -= f.len();
                self.frags.pop_front();
            } else {
                f.narrow(n, 0);
                n = 0;
            }
        }
        Ok(())
    }

    /// Drops `n` bytes from the back (a trailer, padding); as [`FragChain::trim_front`].
    ///
    /// Errors: as [`FragChain::trim_front`].
    pub fn trim_back(&mut self, mut n: u64) -> Result<()> {
        self.check_trim(n)?;
        self.len -= n;
        while n > 0 {
            let Some(f) = self.frags.back_mut() else { break };
            if f.len() <= n {
                n -= f.len();
                self.frags.pop_back();
            } else {
                f.narrow(0, n);
                n = 0;
            }
        }
        Ok(())
    }

    /// Calls `f(part, offset in part, range in the caller's buffer)` for each fragment piece
    /// of `[offset, offset + n)`.
    fn walk(
        &self,
        offset: u64,
        n: u64,
        mut f: impl FnMut(&Part<'p, P>, u64, core::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        crate::addr::checked_end(offset, n, self.len)?;
        let (mut at, mut done) = (0u64, 0u64);
        for part in &self.frags {
            if done == n {
                break;
            }
            let next = at + part.len();
            if next > offset + done {
                let within = offset + done - at;
                let take = (part.len() - within).min(n - done);
                f(part, within, done as usize..(done + take) as usize)?;
                done += take;
            }
            at = next;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at chain offset `offset` into `buf` (`m_copydata`).
    ///
    /// Errors: [`Error::OutOfRange`] beyond the chain, [`Error::Overflow`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.walk(offset, buf.len() as u64, |part, at, r| part.memory().read(part.offset() + at, &mut buf[r]))
    }

    /// Copies `data` into the chain at offset `offset` (`m_copyback`, without growing).
    ///
    /// Errors: [`Error::OutOfRange`] beyond the chain, [`Error::Overflow`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.walk(offset, data.len() as u64, |part, at, r| part.memory().write(part.offset() + at, &data[r]))
    }

    /// The fragments, given back in order.
    pub fn into_fragments(self) -> VecDeque<Part<'p, P>> {
        self.frags
    }
}

impl<P: Platform> sealed::Sealed for FragChain<'_, P> {}
impl<'p, P: Platform> DmaBuffer<'p, P> for FragChain<'p, P> {
    #[inline]
    fn for_each_run<F: FnMut(Run) -> Result<()>>(&self, p: &P, f: &mut F) -> Result<()> {
        self.frags.iter().try_for_each(|b| b.for_each_run(p, f))
    }

    fn quarantine(self, keep: &mut dyn FnMut(DmaMemory<'p, P>)) {
        for b in self.frags {
            b.quarantine(keep);
        }
    }
}
