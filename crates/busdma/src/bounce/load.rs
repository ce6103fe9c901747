//! Bounced loads: which bytes bounce, where they go, and the sync copies.
//!
//! See the theory statement in [`crate::bounce`] (sections 5 to 8).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::addr::{KernVa, PAGE_SIZE, PhysAddr};
use crate::dir::SyncOp;
use crate::error::{Error, Result};
use crate::platform::Platform;
use crate::quickmap::QuickMaps;

use super::zone::{BounceZone, Reservation, ZoneKey};

/// One physically contiguous piece of a client buffer, in buffer order.
///
/// # Invariants
///
/// If `kva` is set it maps `[pa, pa + len)` and stays valid while a load of the piece lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientSeg {
    pa: PhysAddr,
    len: u64,
    kva: Option<KernVa>,
    has_page: bool,
}

impl ClientSeg {
    /// A run of RAM pages `[pa, pa + len)` with no kernel mapping the caller vouches for:
    /// copies reach it through the direct map or quick maps.
    pub const fn phys(pa: PhysAddr, len: u64) -> Self {
        Self { pa, len, kva: None, has_page: true }
    }

    /// A run of RAM mapped at `kva`: copies use that mapping.
    ///
    /// # Safety
    ///
    /// `[kva, kva + len)` maps `[pa, pa + len)` and stays mapped (and not referenced by
    /// `&`/`&mut` during syncs) while any load of this piece lives.
    pub const unsafe fn kernel(pa: PhysAddr, kva: KernVa, len: u64) -> Self {
        // INVARIANT: the caller vouches for the mapping.
        Self { pa, len, kva: Some(kva), has_page: true }
    }

    /// A page-less run (MMIO, a peer's BAR, persistent memory without pages): the device can
    /// be given its address, but the CPU cannot copy it, so it can never be bounced.
    pub const fn pageless(pa: PhysAddr, len: u64) -> Self {
        Self { pa, len, kva: None, has_page: false }
    }

    /// First physical address.
    pub const fn pa(&self) -> PhysAddr {
        self.pa
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// True if the piece is empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a device can reach and how much it is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Constraint {
    /// The device reaches only bus addresses below this (its DMA mask + 1), if set.
    pub below: Option<PhysAddr>,
    /// Bus addresses `(low, high]` below the mask that the device cannot reach either
    /// (FreeBSD's exclusion window: a bridge decodes them for itself), if any. Memory in it is
    /// bounced; memory above `high` is not. Bounce pages come from below `low + 1`.
    pub excluded: Option<(u64, u64)>,
    /// Every segment must start at a multiple of this (a power of two).
    pub align: u64,
    /// Untrusted device behind an IOMMU of this page size: a piece that does not fill whole
    /// IOMMU pages is bounced into pages of its own, its padding zeroed.
    pub untrusted_granule: Option<u64>,
}

impl Constraint {
    /// A trusted device without IOMMU whose DMA mask has `bits` bits.
    pub fn dma_bits(bits: u32) -> Self {
        let below = if bits >= 64 { None } else { Some(PhysAddr::new(1u64 << bits)) };
        Self { below, excluded: None, align: 1, untrusted_granule: None }
    }

    /// An untrusted device behind an IOMMU with 4 KiB pages (it reaches everything through it).
    pub const fn untrusted() -> Self {
        Self { below: None, excluded: None, align: 1, untrusted_granule: Some(PAGE_SIZE) }
    }

    /// The bounce zone this constraint draws from.
    pub fn zone_key(&self) -> ZoneKey {
        let below = match (self.below, self.excluded) {
            (b, Some((low, _))) => {
                let w = PhysAddr::new(low.saturating_add(1));
                Some(b.map_or(w, |b| if b.raw() < w.raw() { b } else { w }))
            }
            (b, None) => b,
        };
        ZoneKey { below, align: self.align.max(PAGE_SIZE) }
    }

    fn validate(&self) -> Result<()> {
        if !crate::addr::is_pow2(self.align) {
            return Err(Error::BadAlignment { align: self.align });
        }
        match self.untrusted_granule {
            // Bounce pages are 4 KiB; a larger IOMMU page would need runs of them.
            Some(g) if g != PAGE_SIZE => {
                Err(Error::Unsupported { what: "untrusted IOMMU page size other than 4 KiB" })
            }
            _ => Ok(()),
        }
    }

    /// Whether `seg` must be bounced under this constraint.
    ///
    /// Errors: [`Error::InvalidArgument`] (a page-less piece that would need it),
    /// [`Error::Overflow`].
    pub fn needs_bounce(&self, seg: &ClientSeg) -> Result<bool> {
        self.must_bounce(seg).map(|w| w.is_some())
    }

    /// Why `seg` must be bounced, if it must.
    fn must_bounce(&self, seg: &ClientSeg) -> Result<Option<Why>> {
        let end =
            seg.pa.raw().checked_add(seg.len).ok_or(Error::Overflow { base: seg.pa.raw(), len: seg.len })?;
        let sub_page = self.untrusted_granule.is_some_and(|g| (seg.pa.raw() | seg.len) & (g - 1) != 0);
        let why = if sub_page {
            Some(Why::SubPage)
        } else if self.below.is_some_and(|b| end > b.raw())
            || self.excluded.is_some_and(|(low, high)| seg.pa.raw() <= high && end > low.saturating_add(1))
            || !seg.pa.is_aligned(self.align)
        {
            Some(Why::Unreachable)
        } else {
            None
        };
        if why.is_some() && !seg.has_page {
            return Err(Error::InvalidArgument {
                what: "page-less (MMIO) entry would need bouncing; its address",
                value: seg.pa.raw(),
            });
        }
        Ok(why)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// Beyond the device's limit or misaligned: packed with its bounced neighbours.
    Unreachable,
    /// Untrusted sub-page piece: pages of its own.
    SubPage,
}

/// One segment the device is given: a bus address (= physical address: no IOMMU, or the
/// address an IOMMU is then asked to map) and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSeg {
    /// Bus (physical) address.
    pub addr: PhysAddr,
    /// Length in bytes.
    pub len: u64,
    /// True if the segment is in bounce pages.
    pub bounced: bool,
}

/// Largest single copy item: 64 KiB. A sync pins the CPU for one item; 64 KiB copies in a few
/// microseconds at memory bandwidth, a preemption-off section kernels accept, and is already
/// large enough that the per-item bookkeeping is under a tenth of the copy (BENCHMARKS.md).
const MAX_ITEM: u64 = 64 * 1024;

/// One copy between the client and a bounce page: `len` bytes at buffer offset `buf_off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Item {
    buf_off: u64,
    client: ClientSeg,
    bounce: PhysAddr,
}

/// The layout of a load: device segments and copy items, drawing bounce pages from `next`.
/// Counting and building run the same code, so the count is exactly what the build takes.
struct Layout {
    device: Vec<DeviceSeg>,
    items: Vec<Item>,
    /// Bounce pages that belong to untrusted pieces: (page, bytes of data at its start).
    own_pages: Vec<(PhysAddr, u64)>,
    pages_used: u64,
    len: u64,
}

fn layout(segs: &[ClientSeg], c: &Constraint, mut next: impl FnMut() -> Option<PhysAddr>) -> Result<Layout> {
    c.validate()?;
    let mut l =
        Layout { device: Vec::new(), items: Vec::new(), own_pages: Vec::new(), pages_used: 0, len: 0 };
    // The bounce page being filled and its fill level.
    let mut cur: Option<(PhysAddr, u64)> = None;
    for seg in segs {
        if seg.len == 0 {
            continue;
        }
        let buf_start = l.len;
        l.len = l.len.checked_add(seg.len).ok_or(Error::Overflow { base: l.len, len: seg.len })?;
        let why = c.must_bounce(seg)?;
        let Some(why) = why else {
            cur = None;
            l.device.push(DeviceSeg { addr: seg.pa, len: seg.len, bounced: false });
            continue;
        };
        if why == Why::SubPage {
            cur = None;
        }
        let mut done = 0;
        while done < seg.len {
            let (page, fill) = match cur {
                Some((p, f)) if f < PAGE_SIZE => (p, f),
                _ => {
                    let p =
                        next().ok_or(Error::BadState { what: "bounce reservation smaller than counted" })?;
                    l.pages_used += 1;
                    if why == Why::SubPage {
                        l.own_pages.push((p, 0));
                    }
                    (p, 0)
                }
            };
            let n = (seg.len - done).min(PAGE_SIZE - fill);
            let bounce = PhysAddr::new(page.raw() + fill);
            let client = ClientSeg {
                pa: PhysAddr::new(seg.pa.raw() + done),
                len: n,
                kva: seg.kva.map(|k| KernVa::new(k.raw() + done)),
                has_page: true,
            };
            // A chunk that continues the previous one on both sides (consecutive bounce pages
            // that happen to be physically adjacent) extends it: one copy instead of two.
            match l.items.last_mut() {
                Some(last)
                    if last.client.len + n <= MAX_ITEM
                        && last.buf_off + last.client.len == buf_start + done
                        && last.client.pa.raw() + last.client.len == client.pa.raw()
                        && last.client.kva.map(|k| k.raw() + last.client.len)
                            == client.kva.map(KernVa::raw)
                        && last.bounce.raw() + last.client.len == bounce.raw() =>
                {
                    last.client.len += n;
                }
                _ => l.items.push(Item { buf_off: buf_start + done, client, bounce }),
            }
            match l.device.last_mut() {
                Some(d) if d.bounced && d.addr.raw() + d.len == bounce.raw() => d.len += n,
                _ => l.device.push(DeviceSeg { addr: bounce, len: n, bounced: true }),
            }
            if why == Why::SubPage {
                if let Some(o) = l.own_pages.last_mut() {
                    o.1 = fill + n;
                }
            }
            cur = Some((page, fill + n));
            done += n;
        }
        if why == Why::SubPage {
            cur = None;
        }
    }
    Ok(l)
}

/// Bounce pages a load of `segs` under `c` needs (zero: nothing bounces).
///
/// Errors: as [`BounceLoad::load`], except exhaustion.
pub fn pages_needed(segs: &[ClientSeg], c: &Constraint) -> Result<u64> {
    let mut fake = 0u64;
    let l = layout(segs, c, || {
        fake += PAGE_SIZE;
        Some(PhysAddr::new(fake))
    })?;
    Ok(l.pages_used)
}

/// A loaded buffer's bounce state: the segments the device uses and the pages behind them.
///
/// Dropping it (the unload) returns its pages to the zone, which may complete deferred loads.
pub struct BounceLoad<'p, P: Platform> {
    device: Vec<DeviceSeg>,
    items: Vec<Item>,
    len: u64,
    untrusted: bool,
    qm: &'p QuickMaps,
    /// Last: the pages go back only after everything else is gone.
    reservation: Option<Reservation<'p, P>>,
}

impl<'p, P: Platform> BounceLoad<'p, P> {
    /// Loads `segs` for a device under `c` without waiting: reserves the bounce pages it
    /// needs from `zone` (whose key must be `c.zone_key()`), or fails.
    ///
    /// An untrusted load copies the client's bytes into its bounce pages now, whatever the
    /// direction, and zeroes the rest of each page: the device sees the buffer and zeros, and
    /// a short device write leaves the client's bytes, never stale ones.
    ///
    /// Errors: [`Error::Exhausted`] (zone short; nothing is kept), [`Error::LimitExceeded`],
    /// [`Error::InvalidArgument`] (a page-less piece would need bouncing, or the zone does not
    /// match), [`Error::BadAlignment`], [`Error::Overflow`], [`Error::Unsupported`].
    pub fn load(
        zone: &Arc<BounceZone<'p, P>>,
        qm: &'p QuickMaps,
        segs: &[ClientSeg],
        c: &Constraint,
    ) -> Result<Self> {
        let pages = Self::check(zone, segs, c)?;
        let res = if pages == 0 { None } else { Some(zone.reserve(pages)?) };
        Self::build(qm, segs, c, res)
    }

    /// Like [`BounceLoad::load`], but when the zone is short the load is queued:
    /// [`Error::InProgress`] is returned and `done` runs with the completed load once pages
    /// return, after every load deferred before it. If the load completes at once, `done` is
    /// not called and the load is returned.
    pub fn load_or_defer(
        zone: &Arc<BounceZone<'p, P>>,
        qm: &'p QuickMaps,
        segs: Vec<ClientSeg>,
        c: Constraint,
        done: Box<dyn FnOnce(Result<Self>) + Send + 'p>,
    ) -> Result<Self> {
        let pages = Self::check(zone, &segs, &c)?;
        if pages == 0 {
            return Self::build(qm, &segs, &c, None);
        }
        // The segments and the completion travel with the zone's callback; if the reservation
        // succeeds at once, the callback never runs and we take them back.
        let state = Arc::new(crate::sync::SpinLock::new(Some((segs, done))));
        let cb_state = state.clone();
        let on_ready = Box::new(move |res| {
            let taken = cb_state.lock().take();
            if let Some((segs, done)) = taken {
                done(Self::build(qm, &segs, &c, Some(res)));
            }
        });
        let res = zone.reserve_or_defer(pages, on_ready)?;
        let taken = state.lock().take();
        let (segs, _done) = taken.ok_or(Error::BadState { what: "deferred load completed twice" })?;
        Self::build(qm, &segs, &c, Some(res))
    }

    fn check(zone: &Arc<BounceZone<'p, P>>, segs: &[ClientSeg], c: &Constraint) -> Result<u64> {
        let pages = pages_needed(segs, c)?;
        if pages > 0 && zone.key() != c.zone_key() {
            return Err(Error::InvalidArgument {
                what: "bounce zone does not match the constraint; zone limit",
                value: zone.key().below.map_or(u64::MAX, PhysAddr::raw),
            });
        }
        Ok(pages)
    }

    fn build(
        qm: &'p QuickMaps,
        segs: &[ClientSeg],
        c: &Constraint,
        res: Option<Reservation<'p, P>>,
    ) -> Result<Self> {
        let mut pages = res.as_ref().map_or(&[][..], |r| r.pages()).iter().copied();
        let l = layout(segs, c, || pages.next())?;
        let this = Self {
            device: l.device,
            items: l.items,
            len: l.len,
            untrusted: c.untrusted_granule.is_some(),
            qm,
            reservation: res,
        };
        if let Some(r) = &this.reservation {
            r.zone().count_bounced(l.pages_used);
            let platform = r.zone().platform();
            // Untrusted: zero each own page's padding, then prefill the data from the client.
            for &(page, used) in &l.own_pages {
                let g = platform.pin_cpu();
                qm.fill_phys(&g, PhysAddr::new(page.raw() + used), PAGE_SIZE - used, 0)?;
            }
            if this.untrusted {
                this.copy(platform, 0, this.len, true)?;
            }
        }
        Ok(this)
    }

    /// The segments to give the device, in buffer order.
    pub fn segments(&self) -> &[DeviceSeg] {
        &self.device
    }

    /// Bytes loaded.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if nothing was loaded.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bounce pages this load holds.
    pub fn bounce_pages(&self) -> usize {
        self.reservation.as_ref().map_or(0, |r| r.pages().len())
    }

    /// Performs `op` on the whole buffer. See [`BounceLoad::sync_range`].
    pub fn sync(&self, platform: &P, op: SyncOp) -> Result<()> {
        self.sync_range(platform, op, 0, self.len)
    }

    /// Performs `op` on bytes `[offset, offset + len)` of the buffer: PREWRITE copies client
    /// → bounce, POSTREAD bounce → client; PREREAD of an untrusted load refills the bounce
    /// pages from the client (so a short device write exposes nothing stale); the rest are
    /// no-ops here. Copies go through the direct map or quick maps (one page mapped at a time
    /// per side), with preemption disabled for one copy item at a time (at most 64 KiB).
    ///
    /// Never sleeps. Errors: [`Error::OutOfRange`] (the range runs past the loaded length).
    pub fn sync_range(&self, platform: &P, op: SyncOp, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or(Error::Overflow { base: offset, len })?;
        if end > self.len {
            return Err(Error::OutOfRange { addr: end, limit: self.len });
        }
        // One operation at a time, in transfer order: PRE before POST.
        if op.contains(SyncOp::PREWRITE) || (self.untrusted && op.contains(SyncOp::PREREAD)) {
            self.copy(platform, offset, end, true)?;
        }
        if op.contains(SyncOp::POSTREAD) {
            self.copy(platform, offset, end, false)?;
        }
        Ok(())
    }

    /// The bounce bytes that hold buffer bytes `[from, to)`: `(first bounce byte, length)`
    /// per copy item, in buffer order (what a partial sync maintains).
    pub fn bounce_spans(&self, from: u64, to: u64) -> impl Iterator<Item = (PhysAddr, u64)> + '_ {
        self.items_in(from, to).map(|(it, lo, hi)| (PhysAddr::new(it.bounce.raw() + lo), hi - lo))
    }

    /// The copy items that hold buffer bytes `[from, to)`, each with the part of it inside:
    /// `(item, lo, hi)`, offsets into the item, in buffer order.
    fn items_in(&self, from: u64, to: u64) -> impl Iterator<Item = (&Item, u64, u64)> + '_ {
        let first = self.items.partition_point(|i| i.buf_off + i.client.len <= from);
        self.items[first..].iter().take_while(move |it| it.buf_off < to).map(move |it| {
            let lo = from.max(it.buf_off) - it.buf_off;
            (it, lo, to.min(it.buf_off + it.client.len) - it.buf_off)
        })
    }

    /// Copies buffer bytes `[from, to)` between client and bounce pages.
    fn copy(&self, platform: &P, from: u64, to: u64, to_bounce: bool) -> Result<()> {
        for (it, lo, hi) in self.items_in(from, to) {
            let (client, bounce, n) = (it.client.pa.raw() + lo, it.bounce.raw() + lo, hi - lo);
            let g = platform.pin_cpu();
            match (it.client.kva, to_bounce) {
                // SAFETY: the ClientSeg invariant: the KVA maps the piece while the load lives.
                (Some(k), true) => unsafe {
                    self.qm.copy_kva_to_phys(&g, KernVa::new(k.raw() + lo), PhysAddr::new(bounce), n)
                }?,
                // SAFETY: as above.
                (Some(k), false) => unsafe {
                    self.qm.copy_phys_to_kva(&g, PhysAddr::new(bounce), KernVa::new(k.raw() + lo), n)
                }?,
                (None, true) => {
                    self.qm.copy_phys_to_phys(&g, PhysAddr::new(client), PhysAddr::new(bounce), n)?
                }
                (None, false) => {
                    self.qm.copy_phys_to_phys(&g, PhysAddr::new(bounce), PhysAddr::new(client), n)?
                }
            }
        }
        Ok(())
    }
}

impl<P: Platform> core::fmt::Debug for BounceLoad<'_, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BounceLoad")
            .field("len", &self.len)
            .field("segments", &self.device)
            .field("bounce_pages", &self.bounce_pages())
            .field("untrusted", &self.untrusted)
            .finish()
    }
}
