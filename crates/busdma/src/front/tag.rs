//! DMA tags: the constraints of a device, and the tree of tags that narrows them.
//!
//! # Theory
//!
//! 1. **A tag is a device's contract.** [`TagSpec`] says what bus addresses the device can use:
//!    the DMA mask (highest address it can emit), the alignment of each segment's start, the
//!    boundary no segment may cross, the longest segment, the most segments per load, the
//!    largest load, and flags (coherent, untrusted, may-wait).
//! 2. **Children only narrow.** A bridge or a driver derives a child from its parent's tag
//!    ([`Tag::child`]). Every constraint of the child must be at least as strict as its
//!    parent's: a wider one is an error ([`Error::InvalidArgument`] naming the field), never a
//!    silent clamp, because a driver that asks for more than its bus allows has a bug.
//!    Coherence cannot be claimed where the parent lacks it; untrusted cannot be cleared.
//! 3. **A tag carries its strategy.** The strategy (direct, an IOMMU strategy, identity) is a
//!    type parameter, so every load through a tag is one monomorphic call chain; children
//!    share the parent's strategy handle (a clone: a reference to a domain, typically).
//! 4. **Identity.** Each tag has a unique id. A map remembers the tag that created it; a load,
//!    sync or unload through another tag is an error (and a debug-checker report).
//!
//! # Execution context
//!
//! Creating tags allocates (the debug checker's shared log, and the wait queue of a root that
//! may wait); it never sleeps.
#![forbid(unsafe_code)]

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{PAGE_SIZE, is_pow2};
use crate::error::{Error, Result};
use crate::platform::Platform;

use super::coherent::DmaMemory;
use super::defer::{DeferQueue, DeferStats};
use super::quarantine::{Quarantine, QuarantineStats};
use super::strategy::Strategy;

/// Flags of a tag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TagFlags {
    /// The device snoops CPU caches: no cache maintenance at sync.
    pub coherent: bool,
    /// The device is assumed hostile: strict invalidation, sub-page buffers bounced.
    pub untrusted: bool,
    /// Loads may wait for resources (bounce pages, IOVA space, table pages):
    /// [`DmaMap::load_or_defer`](super::map::DmaMap::load_or_defer) queues a load that cannot
    /// get them and completes it by callback when an unload or destroy frees them
    /// ([`super::defer`]). Without it every load fails at once. A child may drop the flag but
    /// not claim it where its parent lacks it (the tree's wait queue exists only if the root
    /// may wait).
    pub may_wait: bool,
}

/// The constraints of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagSpec {
    /// Every segment starts at a bus address that is a multiple of this (a power of two ≥ 1).
    pub alignment: u64,
    /// No segment crosses a multiple of this (a power of two ≥ `alignment`), or 0 for none.
    pub boundary: u64,
    /// Highest bus address the device can emit, inclusive (`2^bits - 1` for a `bits`-bit
    /// device).
    pub dma_mask: u64,
    /// Largest load, in bytes (> 0).
    pub max_size: u64,
    /// Most segments per load (≥ 1).
    pub max_segments: u32,
    /// Longest segment, in bytes (≥ `alignment`).
    pub max_segment_size: u64,
    /// Flags.
    pub flags: TagFlags,
}

impl TagSpec {
    /// A 64-bit device with no alignment or boundary constraint, loads of at most `max_size`
    /// bytes in at most `max_segments` segments of any length.
    pub const fn new(max_size: u64, max_segments: u32) -> Self {
        Self {
            alignment: 1,
            boundary: 0,
            // u64::MAX - 1 rather than u64::MAX: a range end of 2^64 is not representable
            // (addr.rs, theory 2), so the last byte of the space is never mapped anyway.
            dma_mask: u64::MAX - 1,
            max_size,
            max_segments,
            max_segment_size: max_size,
            flags: TagFlags { coherent: false, untrusted: false, may_wait: false },
        }
    }

    /// The mask of a device that emits `bits`-bit addresses (12 ≤ bits ≤ 64).
    pub const fn mask_of_bits(bits: u32) -> u64 {
        if bits >= 64 { u64::MAX - 1 } else { (1u64 << bits) - 1 }
    }

    /// Checks the spec on its own.
    ///
    /// Errors: [`Error::BadAlignment`] (alignment or boundary not a power of two),
    /// [`Error::ZeroSize`] (zero max size), [`Error::InvalidArgument`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if !is_pow2(self.alignment) {
            return Err(Error::BadAlignment { align: self.alignment });
        }
        if self.boundary != 0 && !is_pow2(self.boundary) {
            return Err(Error::BadAlignment { align: self.boundary });
        }
        if self.boundary != 0 && self.boundary < self.alignment {
            return Err(Error::InvalidArgument {
                what: "tag boundary smaller than its alignment",
                value: self.boundary,
            });
        }
        if self.max_size == 0 {
            return Err(Error::ZeroSize);
        }
        if self.max_segments == 0 {
            return Err(Error::InvalidArgument { what: "tag max_segments (zero)", value: 0 });
        }
        if self.max_segment_size < self.alignment {
            return Err(Error::InvalidArgument {
                what: "tag max_segment_size smaller than its alignment",
                value: self.max_segment_size,
            });
        }
        // A device that cannot reach one whole page cannot be given any buffer.
        if self.dma_mask < PAGE_SIZE - 1 {
            return Err(Error::InvalidArgument { what: "tag dma_mask below one page", value: self.dma_mask });
        }
        Ok(())
    }

    /// Checks that `self` (a child) only narrows `parent`.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the first constraint the child widens, with
    /// the child's value.
    pub fn check_narrows(&self, parent: &TagSpec) -> Result<()> {
        let widen = |what, value| Err(Error::InvalidArgument { what, value });
        if self.alignment < parent.alignment {
            return widen("child tag alignment looser than its parent's", self.alignment);
        }
        if parent.boundary != 0 && (self.boundary == 0 || self.boundary > parent.boundary) {
            return widen("child tag boundary looser than its parent's", self.boundary);
        }
        if self.dma_mask > parent.dma_mask {
            return widen("child tag dma_mask above its parent's", self.dma_mask);
        }
        if self.max_size > parent.max_size {
            return widen("child tag max_size above its parent's", self.max_size);
        }
        if self.max_segments > parent.max_segments {
            return widen("child tag max_segments above its parent's", u64::from(self.max_segments));
        }
        if self.max_segment_size > parent.max_segment_size {
            return widen("child tag max_segment_size above its parent's", self.max_segment_size);
        }
        if self.flags.coherent && !parent.flags.coherent {
            return widen("child tag claims coherence its parent lacks", 1);
        }
        if parent.flags.untrusted && !self.flags.untrusted {
            return widen("child tag clears its parent's untrusted flag", 0);
        }
        if self.flags.may_wait && !parent.flags.may_wait {
            return widen("child tag may wait where its parent may not", 1);
        }
        Ok(())
    }
}

/// Source of tag and map ids. A plain `core` atomic (not the loom-swappable one): ids only
/// need uniqueness, and a `static` cannot hold a loom atomic.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// A DMA tag: constraints, the strategy that serves them, and the platform.
///
/// A tag is a handle: cloning it is one reference-count increment, and every map it creates
/// holds a clone, so a driver's state struct can own its tags and maps together (no map
/// borrows its tag). The shared data ([`TagData`]) lives until the last handle drops.
pub struct Tag<'p, P: Platform, S: Strategy<P>>(Arc<TagData<'p, P, S>>);

impl<P: Platform, S: Strategy<P>> Clone for Tag<'_, P, S> {
    /// Another handle to the same tag (same id, same constraints): not a child.
    #[inline]
    fn clone(&self) -> Self {
        Tag(self.0.clone())
    }
}

impl<'p, P: Platform, S: Strategy<P>> core::ops::Deref for Tag<'p, P, S> {
    type Target = TagData<'p, P, S>;
    #[inline]
    fn deref(&self) -> &TagData<'p, P, S> {
        &self.0
    }
}

/// What the handles of one tag share: its constraints, strategy, platform and id. Reached
/// through a [`Tag`]; it has no public fields, and its accessors are [`Tag`]'s.
///
/// # Invariants
///
/// `spec` is valid ([`TagSpec::validate`]) and narrows the spec of every ancestor.
pub struct TagData<'p, P: Platform, S: Strategy<P>> {
    pub(crate) platform: &'p P,
    pub(crate) strategy: S,
    pub(crate) spec: TagSpec,
    pub(crate) id: u64,
    #[cfg(feature = "dma-debug")]
    pub(crate) debug: Arc<super::debug::DomainWatch>,
    /// The tree's queue of deferred loads: `Some` exactly when the root may wait; shared by
    /// every tag of the tree.
    pub(crate) defer: Option<Arc<DeferQueue<'p, P, S>>>,
    /// Memory of this tag's buffers that a device may still reach ([`super::quarantine`]).
    pub(crate) quarantine: Quarantine<'p, P>,
}

impl<P: Platform, S: Strategy<P>> TagData<'_, P, S> {
    /// Whether the quarantine holds memory (one relaxed load).
    #[inline]
    pub(crate) fn quarantine_holds(&self) -> bool {
        !self.quarantine.is_empty()
    }

    /// After a successful unload: releases the quarantine if it holds anything and a proof
    /// is now given (quarantine theory 3). One relaxed load when it is empty.
    #[inline]
    pub(crate) fn after_unload(&self) {
        if !self.quarantine.is_empty() && self.strategy.wait_unmapped(self.platform).is_ok() {
            self.quarantine.release_all();
        }
    }
}

impl<P: Platform, S: Strategy<P>> Drop for TagData<'_, P, S> {
    /// The last handle is gone: one last proof for what the quarantine holds, or it is leaked
    /// (quarantine theory 4).
    fn drop(&mut self) {
        if !self.quarantine.is_empty() {
            match self.strategy.wait_unmapped(self.platform) {
                Ok(()) => self.quarantine.release_all(),
                Err(_) => self.quarantine.leak_all(),
            }
        }
    }
}

impl<'p, P: Platform, S: Strategy<P>> Tag<'p, P, S> {
    /// A root tag (a device's DMA domain in front-end terms) served by `strategy`.
    ///
    /// Errors: those of [`TagSpec::validate`], and the strategy's own check of the spec
    /// ([`Strategy::check_tag`]).
    pub fn new_root(platform: &'p P, strategy: S, spec: TagSpec) -> Result<Self> {
        spec.validate()?;
        strategy.check_tag(platform, &spec)?;
        Ok(Tag(Arc::new(TagData {
            platform,
            strategy,
            spec,
            id: next_id(),
            #[cfg(feature = "dma-debug")]
            debug: Arc::new(super::debug::DomainWatch::new()),
            defer: spec.flags.may_wait.then(|| Arc::new(DeferQueue::new())),
            quarantine: Quarantine::new(),
        })))
    }

    /// A child tag: `spec` must only narrow this tag's constraints (theory 2).
    ///
    /// Errors: those of [`TagSpec::validate`] and [`TagSpec::check_narrows`].
    pub fn child(&self, spec: TagSpec) -> Result<Self> {
        spec.validate()?;
        spec.check_narrows(&self.spec)?;
        Ok(Tag(Arc::new(TagData {
            platform: self.platform,
            strategy: self.strategy.clone(),
            spec,
            id: next_id(),
            #[cfg(feature = "dma-debug")]
            debug: self.debug.clone(),
            defer: self.defer.clone(),
            quarantine: Quarantine::new(),
        })))
    }

    /// The constraints.
    #[inline]
    pub fn spec(&self) -> &TagSpec {
        &self.spec
    }

    /// The tag's unique id.
    #[inline]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The platform.
    #[inline]
    pub fn platform(&self) -> &'p P {
        self.platform
    }

    /// The strategy.
    #[inline]
    pub fn strategy(&self) -> &S {
        &self.strategy
    }

    /// The debug checker's log shared by this tag's tree (feature `dma-debug`).
    #[cfg(feature = "dma-debug")]
    pub fn debug_log(&self) -> Arc<super::debug::DebugLog> {
        self.debug.log.clone()
    }

    /// Returns once no device can reach anything this tag's maps unloaded before the call:
    /// the strategy's proof ([`Strategy::wait_unmapped`]: nothing to do for a healthy strict
    /// domain, a flush if an unmap is still queued, the recovery of a degraded domain). What a
    /// caller that loaded borrowed memory (an `unsafe` load source) waits for before reusing
    /// it after an unload whose outcome it did not see (a map dropped while loaded) or under
    /// deferred invalidation. Process context; may spin while an invalidation completes.
    ///
    /// Errors: [`Error::InvalidationFailed`]: nothing is
    /// proven; the memory must stay away from reuse.
    pub fn wait_unmapped(&self) -> Result<()> {
        self.strategy.wait_unmapped(self.platform)
    }

    /// Asks for the proof ([`Tag::wait_unmapped`]) and, given it, releases everything the
    /// tag's quarantine holds ([`super::quarantine`], theory 3): for a kernel's retry timer
    /// after a failed invalidation. Nothing to do (and no invalidation) when nothing is held.
    ///
    /// Errors: those of [`Tag::wait_unmapped`]; the quarantine keeps what it holds.
    pub fn reclaim(&self) -> Result<()> {
        if self.quarantine.is_empty() {
            return Ok(());
        }
        self.wait_unmapped()?;
        self.quarantine.release_all();
        Ok(())
    }

    /// The quarantine's counters.
    pub fn quarantine_stats(&self) -> QuarantineStats {
        self.quarantine.stats()
    }

    /// Gives back memory this tag's maps held loaded: freed once proven unreachable
    /// ([`Tag::wait_unmapped`]), quarantined otherwise (quarantine theory 2).
    pub(crate) fn release_mem(&self, mem: DmaMemory<'p, P>) {
        match self.wait_unmapped() {
            Ok(()) => drop(mem),
            Err(_) => self.quarantine.hold(mem),
        }
    }

    /// Reports, in the debug log, every map of the tree that is still loaded
    /// ([`super::debug::Violation::LoadedAtTeardown`]): call it where the driver believes its
    /// device's DMA is over (detach, unbind), as Linux's dma-debug checks at driver unbind.
    /// (Maps hold their tag, so the tag's own drop can never see a loaded map: a map that is
    /// leaked with `mem::forget` keeps its tag, strategy and mapping alive for good.)
    #[cfg(feature = "dma-debug")]
    pub fn debug_teardown(&self) {
        self.debug.teardown();
    }

    /// Retries the tree's deferred loads now, in order (theory of [`super::defer`]): for
    /// resources freed outside the tree's own unloads and destroys (another tree's unload
    /// on a shared domain or bounce zone, a zone that grew). Completed loads' callbacks run
    /// on the calling thread before this returns. Does nothing for a tree that may not wait.
    ///
    /// Never sleeps; callable with preemption disabled if every queued callback is.
    pub fn retry_deferred(&self) {
        if let Some(q) = &self.defer {
            q.service(self);
        }
    }

    /// The tree's deferred-load counters (all zero for a tree that may not wait).
    pub fn deferred_stats(&self) -> DeferStats {
        self.defer.as_ref().map(|q| q.stats()).unwrap_or_default()
    }

    /// After an unload or destroy: retries deferred loads if any wait (theory 4 of
    /// [`super::defer`]).
    #[inline]
    pub(crate) fn wake_deferred(&self) {
        if let Some(q) = &self.defer {
            q.wake(self);
        }
    }

    /// The no-wait fairness rule: refused while deferred loads of the tree wait.
    #[inline]
    pub(crate) fn refuse_if_waiters(&self) -> Result<()> {
        match &self.defer {
            Some(q) => q.refuse_if_waiters(),
            None => Ok(()),
        }
    }
}
