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
//!    parent's: a wider one is an error ([`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the field), never a
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

use crate::error::Result;
use crate::platform::Platform;

use super::coherent::DmaMemory;
use super::defer::{DeferQueue, DeferStats};
use super::quarantine::{Quarantine, QuarantineStats};
pub use super::spec::{Exclusion, TagFlags, TagSpec};
use super::strategy::Strategy;

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
    /// Errors: those of [`TagSpec::validate`] and [`TagSpec::check_platform`] (a mask wider
    /// than the platform's bus), and the strategy's own check of the spec
    /// ([`Strategy::check_tag`]).
    pub fn new_root(platform: &'p P, strategy: S, spec: TagSpec) -> Result<Self> {
        spec.validate()?;
        spec.check_platform(platform.dma_limit())?;
        // What the map path's segment builder takes for granted (`SegmentBuilder::for_tag`).
        super::segments::Constraints::of(&spec).validate()?;
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
        super::segments::Constraints::of(&spec).validate()?;
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

    /// The largest buffer one load of this tag maps (Linux `dma_max_mapping_size`): the
    /// tag's `max_size`; a larger buffer must be split by the driver.
    #[inline]
    pub fn max_mapping_size(&self) -> u64 {
        self.spec.max_size
    }

    /// The largest load the fast path serves (Linux `dma_opt_mapping_size`): on a tag whose
    /// strategy maps through an IOMMU, the largest IOVA range the per-CPU caches hold
    /// (64 pages, `iova` theory 3: a page-aligned load up to this size never takes the
    /// allocator's tree); without an IOMMU every size is served alike, so `max_size`.
    #[inline]
    pub fn opt_mapping_size(&self) -> u64 {
        use crate::front::strategy::Invalidation;
        // Size classes 2^0 .. 2^(CLASSES-1) pages.
        const CACHED: u64 = crate::addr::PAGE_SIZE << (crate::iova::magazine::CLASSES - 1);
        match self.strategy.invalidation() {
            Invalidation::None => self.spec.max_size,
            Invalidation::Strict | Invalidation::Deferred => self.spec.max_size.min(CACHED),
        }
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
    /// Errors: [`Error::InvalidationFailed`](crate::Error::InvalidationFailed): nothing is
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
