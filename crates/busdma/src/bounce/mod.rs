//! Bounce buffering: copies through pages a device can reach.
//!
//! # Theory
//!
//! 1. **Why bounce.** A device without an IOMMU emits physical addresses limited by its DMA
//!    mask (a 28-bit device reaches only the first 256 MiB); a buffer above that, or one that
//!    breaks the device's alignment, is *bounced*: the device is given pages it can reach and
//!    the CPU copies between them and the client's buffer at sync time. An untrusted device
//!    behind an IOMMU is bounced for another reason: the IOMMU maps whole pages, so a 100-byte
//!    buffer would expose the rest of its page (Thunderclap, NDSS 2019).
//! 2. **Zones** ([`BounceZone`]). One pool of pages per distinct constraint ([`ZoneKey`]:
//!    address limit and alignment), shared by every tag with that constraint, as in FreeBSD's
//!    `busdma_bounce.c`. Pages come from [`Platform::alloc_pages`](crate::Platform::alloc_pages)
//!    below the limit, one page at a time, at map creation ([`BounceZone::grow_for_map`]: a
//!    map's worth of pages, up to the zone's bound); loads never allocate from the platform.
//! 3. **Reservations.** A load first counts the pages it needs ([`pages_needed`], the same
//!    layout code that builds it, so the count is exact), then reserves them all at once
//!    ([`Reservation`]), so it never holds half a load's pages. Unloading drops the
//!    reservation, which returns the pages.
//! 4. **Short zones.** A no-wait load fails with [`Error::Exhausted`](crate::Error::Exhausted)
//!    and keeps nothing. A may-wait load is queued and returns
//!    [`Error::InProgress`](crate::Error::InProgress) (FreeBSD's `EINPROGRESS`); when pages
//!    return, waiters are served strictly in arrival order (a large request at the head is not
//!    overtaken by small ones behind it, and no-wait loads do not jump the queue), and each
//!    completion callback runs with no zone lock held. The zone is a [`SpinLock`](crate::sync::SpinLock) around a free
//!    list and a queue: short critical sections, no lock-free code.
//! 5. **Layout.** Client pieces ([`ClientSeg`]) that the device reaches pass through untouched.
//!    Consecutive pieces that must bounce because of the limit or alignment are packed into
//!    bounce pages back to back, so one bounce page may hold the end of one client page and the
//!    start of the next (a bounce page that spans two client pages). An untrusted sub-page
//!    piece starts a page of its own and nothing else shares it.
//! 6. **Sync copies.** PREWRITE copies client → bounce; POSTREAD bounce → client; the copies
//!    go through the client's kernel mapping if the caller gave one, else through the direct
//!    map or a quick map ([`crate::quickmap`]), on either side, one mapped page per side at a
//!    time, pinning the CPU for one copy item (a run contiguous on both sides, at most 64 KiB):
//!    sync never sleeps and never holds a mapping across a page.
//! 7. **Untrusted devices.** At load the padding of every own page is zeroed and the client's
//!    bytes are copied in whatever the direction; PREREAD repeats the copy. So the device sees
//!    only the buffer's bytes and zeros, and a device that writes less than the buffer leaves
//!    the client's own bytes, never stale bounce data.
//! 8. **Bad input.** A page-less piece (MMIO, a peer's BAR) that would need bouncing cannot be
//!    copied by the CPU: [`Error::InvalidArgument`](crate::Error::InvalidArgument) with its
//!    address. A sync range past the loaded length: [`Error::OutOfRange`](crate::Error::OutOfRange).
//!
//! # Counters
//!
//! [`ZoneStats`]: pages total and free, waiters, total bounced (pages handed to loads), total
//! deferred (loads queued).

mod load;
mod strategy;
mod zone;

pub use load::{BounceLoad, ClientSeg, Constraint, DeviceSeg, pages_needed};
pub use strategy::{Bounced, BouncedState};
pub use zone::{
    BounceZone, BounceZones, DEFAULT_BOUND_PAGES, OnReady, Reservation, ZoneConfig, ZoneKey, ZoneStats,
};
