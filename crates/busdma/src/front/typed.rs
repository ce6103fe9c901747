//! The safe, typed API: direction in the type, ownership in the state, teardown by drop.
//!
//! # Theory
//!
//! 1. **Direction is a type.** [`ToDevice`], [`FromDevice`] and [`Bidirectional`] are sealed
//!    markers; a buffer's direction is fixed when it is allocated, and the syncs it performs
//!    are the ones its direction implies, so a wrong-direction sync cannot be written.
//! 2. **Two states, two types.** A [`CpuOwned`] buffer is the CPU's: it can be read and written
//!    (by copy) and it has no bus address. [`CpuOwned::to_device`] loads it and performs the PRE
//!    sync, returning a [`DeviceOwned`] buffer, whose only view is its bus segments: there is no
//!    method that reaches its bytes, and the [`CpuOwned`] it came from has been moved.
//!    [`DeviceOwned::to_cpu`] performs the POST sync and unloads, giving the CPU its buffer
//!    back. The type system thus enforces "no CPU access between PRE and POST sync" and "bus
//!    addresses only while the device owns the buffer".
//! 3. **Drop tears down in order.** Dropping either state unloads the map (the device loses
//!    access), then hands the pages to the tag, which frees them once no translation can
//!    reach them ([`super::quarantine`]); the map is destroyed last.
//! 4. **No references to device-visible memory.** Even the CPU-owned state copies: the pages
//!    stay reachable by a hostile device through stale IOTLB entries (deferred invalidation),
//!    so `&[u8]` over them would be unsound.
//! 5. **A failed invalidation keeps the buffer from everyone.** If taking the buffer back
//!    cannot prove the device lost it ([`DeviceOwned::to_cpu`] returns the unload's
//!    [`Error::InvalidationFailed`]), the buffer goes to the tag's quarantine instead of back
//!    to the CPU: no later owner (of the buffer or of its pages) can be read or written
//!    through the stale translation.
//!
//! The CPU cannot touch a device-owned buffer:
//!
//! ```compile_fail
//! use busdma::front::typed::{DeviceOwned, FromDevice};
//! use busdma::front::strategy::Strategy;
//! use busdma::Platform;
//! fn peek<P: Platform, S: Strategy<P>>(dev: &DeviceOwned<'_, P, S, FromDevice>) -> u8 {
//!     let mut b = [0u8; 1];
//!     dev.read(0, &mut b).unwrap(); // no such method: device-owned memory is unreachable
//!     b[0]
//! }
//! ```
//!
//! nor keep using the CPU-owned handle after handing the buffer to the device:
//!
//! ```compile_fail
//! use busdma::front::typed::{CpuOwned, ToDevice};
//! use busdma::front::strategy::Strategy;
//! use busdma::Platform;
//! fn send<P: Platform, S: Strategy<P>>(buf: CpuOwned<'_, P, S, ToDevice>) {
//!     let dev = buf.to_device().ok().unwrap();
//!     buf.write(0, &[1]).unwrap(); // `buf` was moved into the device-owned state
//!     drop(dev);
//! }
//! ```
#![forbid(unsafe_code)]

use core::marker::PhantomData;

use crate::error::{Error, Result};
use crate::platform::{MemAttr, Platform};

use super::cache_sync::SyncOp;
use super::coherent::{DmaMemory, MappedMem};
use super::map::Direction;
use super::segments::Segment;
use super::strategy::Strategy;
use super::tag::Tag;

mod sealed {
    pub trait Sealed {}
}

/// A transfer direction known at compile time.
pub trait DmaDir: sealed::Sealed {
    /// The runtime direction.
    const DIR: Direction;
    /// The sync performed when the device takes the buffer.
    const PRE: SyncOp;
    /// The sync performed when the CPU takes it back.
    const POST: SyncOp;
}

/// The device reads the buffer.
#[derive(Debug)]
pub struct ToDevice;
/// The device writes the buffer.
#[derive(Debug)]
pub struct FromDevice;
/// The device reads and writes the buffer.
#[derive(Debug)]
pub struct Bidirectional;

impl sealed::Sealed for ToDevice {}
impl sealed::Sealed for FromDevice {}
impl sealed::Sealed for Bidirectional {}

impl DmaDir for ToDevice {
    const DIR: Direction = Direction::ToDevice;
    const PRE: SyncOp = SyncOp::PREWRITE;
    const POST: SyncOp = SyncOp::POSTWRITE;
}
impl DmaDir for FromDevice {
    const DIR: Direction = Direction::FromDevice;
    const PRE: SyncOp = SyncOp::PREREAD;
    const POST: SyncOp = SyncOp::POSTREAD;
}
impl DmaDir for Bidirectional {
    const DIR: Direction = Direction::Bidirectional;
    const PRE: SyncOp = SyncOp::PREREAD.union(SyncOp::PREWRITE);
    const POST: SyncOp = SyncOp::POSTREAD.union(SyncOp::POSTWRITE);
}

/// A streaming buffer owned by the CPU: readable and writable by copy, no bus address.
///
/// # Invariants
///
/// `inner`'s map is created by the buffer's tag and not loaded.
pub struct CpuOwned<'p, P: Platform, S: Strategy<P>, D: DmaDir> {
    inner: MappedMem<'p, P, S>,
    _dir: PhantomData<D>,
}

/// A streaming buffer owned by the device: only its bus segments are visible.
///
/// # Invariants
///
/// `inner`'s map holds its memory loaded in direction `D::DIR`, PRE-synced.
pub struct DeviceOwned<'p, P: Platform, S: Strategy<P>, D: DmaDir> {
    inner: MappedMem<'p, P, S>,
    _dir: PhantomData<D>,
}

impl<'p, P: Platform, S: Strategy<P>> Tag<'p, P, S> {
    /// Allocates a `len`-byte streaming buffer for transfers in direction `D`, owned by the
    /// CPU. The map is created (reserving what the strategy reserves) but not loaded.
    ///
    /// Errors: those of [`DmaMemory::alloc`] and [`Tag::create_map`]; nothing leaks.
    pub fn alloc_buffer<D: DmaDir>(&self, len: u64) -> Result<CpuOwned<'p, P, S, D>> {
        let mem = DmaMemory::alloc(self.platform, &self.spec, len, MemAttr::WriteBack)?;
        let map = self.create_map()?;
        Ok(CpuOwned { inner: MappedMem::new(map, mem), _dir: PhantomData })
    }
}

impl<'p, P: Platform, S: Strategy<P>, D: DmaDir> CpuOwned<'p, P, S, D> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.inner.mem().len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.inner.mem().is_empty()
    }

    /// Copies bytes at `offset` into `buf`.
    ///
    /// Errors: [`Error::OutOfRange`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.mem().read(offset, buf)
    }

    /// Copies `data` into the buffer at `offset`.
    ///
    /// Errors: [`Error::OutOfRange`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.inner.mem().write(offset, data)
    }

    /// The buffer as a typed view ([`super::view`]): `#[repr(C)]` plain-data values by copy
    /// (a command block, a request header) while the CPU owns it.
    pub fn view(&self) -> super::view::DmaView<'_, P> {
        self.inner.mem().view()
    }

    /// Hands the buffer to the device: load, then the PRE sync of `D`.
    ///
    /// Errors: those of [`DmaMap::load`](super::map::DmaMap::load) and [`DmaMap::sync`](super::map::DmaMap::sync). The buffer comes back with the
    /// error, still the CPU's (`Some`), unless the sync failed and the unload that undid the
    /// load failed its invalidation too: then the device may still reach the buffer, which
    /// goes to the tag's quarantine (theory 5) and the error comes with `None`.
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    pub fn to_device(mut self) -> core::result::Result<DeviceOwned<'p, P, S, D>, (Error, Option<Self>)> {
        if let Err(e) = self.inner.load(D::DIR) {
            return Err((e, Some(self)));
        }
        if let Err(e) = self.inner.map.sync(D::PRE) {
            return match self.inner.map.unload() {
                Ok(()) => Err((e, Some(self))),
                Err(_) => Err((e, None)), // `self` drops: the tag proves or quarantines
            };
        }
        // INVARIANT: loaded in D::DIR and PRE-synced.
        Ok(DeviceOwned { inner: self.inner, _dir: PhantomData })
    }
}

/// A direction in which the device writes the buffer ([`FromDevice`], [`Bidirectional`]).
pub trait DeviceWrites: DmaDir {}
impl DeviceWrites for FromDevice {}
impl DeviceWrites for Bidirectional {}

impl<'p, P: Platform, S: Strategy<P>, D: DeviceWrites> DeviceOwned<'p, P, S, D> {
    /// Copies what the device wrote at `offset` into `buf` while the buffer stays the
    /// device's (receive copybreak): a POSTREAD sync of those bytes only, the copy, and a
    /// PREREAD sync of them again, so the device may write them anew. The caller knows, from
    /// the device (a completed descriptor), that it finished writing these bytes; if it did
    /// not, the copy holds whatever was there (never undefined behaviour: no reference to the
    /// memory is formed).
    ///
    /// Errors: [`Error::OutOfRange`] (beyond the buffer), [`Error::ZeroSize`] (empty `buf`),
    /// and a sync's error; the buffer stays device-owned whatever happens.
    pub fn copy_from_device(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.inner.map.sync_range(SyncOp::POSTREAD, offset, len)?;
        let read = self.inner.map.read(offset, buf);
        // Give the bytes back to the device even if the copy failed.
        self.inner.map.sync_range(SyncOp::PREREAD, offset, len)?;
        read
    }
}

impl<'p, P: Platform, S: Strategy<P>, D: DmaDir> DeviceOwned<'p, P, S, D> {
    /// The bus segments to program into the device.
    pub fn segments(&self) -> &[Segment] {
        self.inner.map.segments()
    }

    /// Takes the buffer back: the POST sync of `D`, then unload.
    ///
    /// Errors: [`Error::InvalidationFailed`] (or another error of [`DmaMap::unload`](super::map::DmaMap::unload)): the
    /// device may still reach the buffer through a stale translation, so it is not given back:
    /// it goes to the tag's quarantine, freed once a later invalidation proves it unreachable
    /// (theory 5). The POST sync cannot fail (the map is loaded in `D::DIR`, which allows
    /// `D::POST`); if it ever did, its error is returned after the unload, the buffer
    /// quarantined likewise.
    pub fn to_cpu(mut self) -> Result<CpuOwned<'p, P, S, D>> {
        let synced = self.inner.map.sync(D::POST);
        self.inner.map.unload()?; // on error `self` drops: the tag proves or quarantines
        synced?;
        Ok(CpuOwned { inner: self.inner, _dir: PhantomData })
    }
}
