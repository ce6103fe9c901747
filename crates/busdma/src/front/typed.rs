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
//! 3. **Drop tears down in order.** Each state holds its map before its memory: dropping a
//!    device-owned buffer unloads it (the device loses access), destroys the map, then frees
//!    the pages.
//! 4. **No references to device-visible memory.** Even the CPU-owned state copies: the pages
//!    stay reachable by a hostile device through stale IOTLB entries (deferred invalidation),
//!    so `&[u8]` over them would be unsound.
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
#![deny(unsafe_code)] // one block: describing the buffer's own pages to its map

use core::marker::PhantomData;

use crate::error::{Error, Result};
use crate::platform::{MemAttr, Platform};

use super::cache_sync::SyncOp;
use super::coherent::DmaMemory;
use super::load::RawSegments;
use super::map::{Direction, DmaMap};
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
/// `map` is created by the buffer's tag and not loaded; it is declared before `mem`.
pub struct CpuOwned<'p, P: Platform, S: Strategy<P>, D: DmaDir> {
    map: DmaMap<'p, P, S>,
    mem: DmaMemory<'p, P>,
    _dir: PhantomData<D>,
}

/// A streaming buffer owned by the device: only its bus segments are visible.
///
/// # Invariants
///
/// `map` holds `mem` loaded in direction `D::DIR`, PRE-synced; it is declared before `mem`.
pub struct DeviceOwned<'p, P: Platform, S: Strategy<P>, D: DmaDir> {
    map: DmaMap<'p, P, S>,
    mem: DmaMemory<'p, P>,
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
        Ok(CpuOwned { map, mem, _dir: PhantomData })
    }
}

impl<'p, P: Platform, S: Strategy<P>, D: DmaDir> CpuOwned<'p, P, S, D> {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.mem.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// Copies bytes at `offset` into `buf`.
    ///
    /// Errors: [`Error::OutOfRange`].
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.mem.read(offset, buf)
    }

    /// Copies `data` into the buffer at `offset`.
    ///
    /// Errors: [`Error::OutOfRange`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.mem.write(offset, data)
    }

    /// Hands the buffer to the device: load, then the PRE sync of `D`.
    ///
    /// Errors: those of [`DmaMap::load`]; the buffer comes back with the error, still the CPU's.
    #[allow(clippy::result_large_err)]
    pub fn to_device(mut self) -> core::result::Result<DeviceOwned<'p, P, S, D>, (Error, Self)> {
        let run = [(self.mem.pa(), self.mem.len())];
        // SAFETY: `mem` is pages this buffer allocated and owns; the device-owned state keeps
        // them with the map (declared first, so it unloads first) while they are loaded, and
        // no state hands out a reference to them.
        #[allow(unsafe_code)]
        let src = unsafe { RawSegments::new(&run) };
        if let Err(e) = self.map.load(&src, D::DIR) {
            return Err((e, self));
        }
        if let Err(e) = self.map.sync(D::PRE) {
            let _ = self.map.unload();
            return Err((e, self));
        }
        // INVARIANT: loaded in D::DIR and PRE-synced.
        Ok(DeviceOwned { map: self.map, mem: self.mem, _dir: PhantomData })
    }
}

impl<'p, P: Platform, S: Strategy<P>, D: DmaDir> DeviceOwned<'p, P, S, D> {
    /// The bus segments to program into the device.
    pub fn segments(&self) -> &[Segment] {
        self.map.segments()
    }

    /// Takes the buffer back: the POST sync of `D`, then unload.
    pub fn to_cpu(mut self) -> CpuOwned<'p, P, S, D> {
        // Cannot fail: the map is loaded in D::DIR (type invariant), which allows D::POST.
        let _ = self.map.sync(D::POST);
        let _ = self.map.unload();
        CpuOwned { map: self.map, mem: self.mem, _dir: PhantomData }
    }
}
