//! The DMA-API debug checker (feature `dma-debug`), after Linux's dma-debug.
//!
//! # Theory
//!
//! 1. **What it catches.** A CPU read of a buffer the device may be writing (a PREREAD sync
//!    without the POSTREAD that ends it); a sync whose operation does not match the direction
//!    the map was loaded for; an unload of a map that is not loaded (a double unload); a load,
//!    sync or unload through a tag other than the map's; maps still loaded when their domain
//!    (the tree of tags sharing a root) is torn down.
//! 2. **Every argument.** Each report ([`Violation`]) carries the tag and map ids, and the
//!    directions, operations, offsets, lengths and bus addresses involved, so the report alone
//!    says what the driver did.
//! 3. **Where reports go.** Into the [`DebugLog`] shared by a tree of tags
//!    ([`crate::front::tag::Tag::debug_log`]); a kernel drains it to its console. The misuse
//!    itself is also refused with an error wherever refusing is possible, feature or not: the
//!    checker adds the report and the teardown audit.
//! 4. **Teardown.** Each tree of tags shares one [`DomainWatch`] that records loaded maps; when
//!    the last tag of the tree goes, the watch reports every map still loaded (only a leaked
//!    map can be: a live map borrows its tag).
#![forbid(unsafe_code)]

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

use crate::sync::SpinLock;

use crate::dir::{Direction, SyncOp};

/// One misuse, with every argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The CPU read a buffer after PREREAD and before POSTREAD.
    CpuReadWithoutPostRead {
        /// Tag of the map.
        tag: u64,
        /// The map.
        map: u64,
        /// Direction of the load.
        dir: Direction,
        /// Offset of the read in the buffer.
        offset: u64,
        /// Length of the read.
        len: u64,
        /// First bus address of the load.
        bus: u64,
    },
    /// A sync operation that does not match the load's direction.
    SyncWrongDirection {
        /// Tag of the map.
        tag: u64,
        /// The map.
        map: u64,
        /// Direction of the load.
        dir: Direction,
        /// The operation asked for.
        op: SyncOp,
        /// First bus address of the load.
        bus: u64,
    },
    /// An unload of a map that is not loaded.
    DoubleUnload {
        /// Tag of the map.
        tag: u64,
        /// The map.
        map: u64,
    },
    /// A call through a tag that does not own the map.
    WrongTag {
        /// The call (`load`, `sync`, `unload`, `destroy`).
        call: &'static str,
        /// The tag the call went through.
        used: u64,
        /// The tag that owns the map.
        owner: u64,
        /// The map.
        map: u64,
    },
    /// A map still loaded when the driver declared its teardown (`Tag::debug_teardown`).
    LoadedAtTeardown {
        /// Tag of the map.
        tag: u64,
        /// The map.
        map: u64,
        /// First bus address of the load.
        bus: u64,
        /// Bytes loaded.
        len: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Violation::CpuReadWithoutPostRead { tag, map, dir, offset, len, bus } => write!(
                f,
                "dma-debug: CPU read of [{offset:#x}, +{len:#x}) of map {map} (tag {tag}, {dir:?}, bus {bus:#x}) \
                 after PREREAD without POSTREAD"
            ),
            Violation::SyncWrongDirection { tag, map, dir, op, bus } => write!(
                f,
                "dma-debug: sync {:#x} of map {map} (tag {tag}, bus {bus:#x}) loaded {dir:?}",
                op.bits()
            ),
            Violation::DoubleUnload { tag, map } => {
                write!(f, "dma-debug: unload of map {map} (tag {tag}) which is not loaded")
            }
            Violation::WrongTag { call, used, owner, map } => {
                write!(f, "dma-debug: {call} of map {map} through tag {used}; it belongs to tag {owner}")
            }
            Violation::LoadedAtTeardown { tag, map, bus, len } => write!(
                f,
                "dma-debug: map {map} (tag {tag}) still loaded at domain teardown: bus {bus:#x}, {len:#x} bytes"
            ),
        }
    }
}

/// The reports of one tree of tags.
#[derive(Debug, Default)]
pub struct DebugLog {
    reports: SpinLock<Vec<Violation>>,
}

impl DebugLog {
    /// Records a report.
    pub fn report(&self, v: Violation) {
        self.reports.lock().push(v);
    }

    /// Takes every report so far.
    pub fn take(&self) -> Vec<Violation> {
        core::mem::take(&mut *self.reports.lock())
    }
}

/// A loaded map as the watch records it.
#[derive(Clone, Copy, Debug)]
struct LoadedRec {
    tag: u64,
    map: u64,
    bus: u64,
    len: u64,
}

/// The shared state of one tree of tags (theory 4).
#[derive(Debug)]
pub struct DomainWatch {
    pub(crate) log: Arc<DebugLog>,
    loaded: SpinLock<Vec<LoadedRec>>,
}

impl DomainWatch {
    pub(crate) fn new() -> Self {
        Self { log: Arc::new(DebugLog::default()), loaded: SpinLock::new(Vec::new()) }
    }

    pub(crate) fn report(&self, v: Violation) {
        self.log.report(v);
    }

    pub(crate) fn loaded(&self, tag: u64, map: u64, bus: u64, len: u64) {
        self.loaded.lock().push(LoadedRec { tag, map, bus, len });
    }

    pub(crate) fn unloaded(&self, map: u64) {
        let mut l = self.loaded.lock();
        if let Some(i) = l.iter().position(|r| r.map == map) {
            l.swap_remove(i);
        }
    }
}

impl DomainWatch {
    /// Reports every load of the tree still live ([`Violation::LoadedAtTeardown`]): the
    /// driver says it is tearing the device down ([`super::tag::Tag::debug_teardown`]).
    pub(crate) fn teardown(&self) {
        for r in self.loaded.lock().iter() {
            self.log.report(Violation::LoadedAtTeardown { tag: r.tag, map: r.map, bus: r.bus, len: r.len });
        }
    }
}
