//! Attack scenarios: busdma's IOMMU path against the hostile device, class by class.
//!
//! # Theory
//!
//! 1. **The rig.** Two devices behind one model IOMMU, each attached to its own domain: the
//!    *attacker* (a [`HostileDevice`]) and a *victim* whose buffers hold secrets. Both load
//!    their buffers through busdma's front end (`iommu-per-map` strategy) exactly as a driver
//!    would; the attacker's tag is marked untrusted in mode `strict-untrusted`. Everything the
//!    attacker must not learn (the rest of every page it is given part of, the victim's
//!    buffers, freed buffers) is labelled secret; its own buffers are public.
//! 2. **Ground truth.** The scenario grants the attacker a buffer's bytes when its load
//!    returns and revokes them when its unload returns; the verdicts of [`crate::hostile`]
//!    compare what the attacker really reached on the bus with that ledger.
//! 3. **Classes.** Each class of [`AttackClass`] is one procedure below (`class_*`), repeated
//!    until it has made its share of attempts. Classes that need a mechanism this mode does not
//!    use (bounce pages outside `strict-untrusted`; deferred windows outside `deferred`) still
//!    run their procedure, which then finds nothing to exploit.
//! 4. **The deferred window** is measured by class 3: after an unload returns, the attacker
//!    probes the stale bus address after each further unload of its own (the work that drives
//!    the flush queue) until the access faults; the number of those unloads and the time since
//!    the unload returned are the window, bounded by the queue's `max_entries` and `max_age`.
//! 5. **Reuse after a failed invalidation** (class 9): the model IOMMU's fault injection
//!    ([`ModelIommu::fail_next_invalidations`]) fails every invalidation while the driver tears
//!    down buffers the attacker has just used (coherent memory, a typed buffer, an owned
//!    map), so the IOTLB keeps their translations; a next owner then takes DMA pages from the
//!    same first-fit allocator and fills them with secrets, and the attacker probes the old bus
//!    addresses. busdma must have kept the pages in the tag's quarantine. The class's control
//!    ([`GiveBack::FreeAnyway`]) is a driver that frees the pages anyway, and must escape:
//!    otherwise the class could not see the bug it looks for.
#![deny(unsafe_code)] // but `kbuf` (the scenario's own pages as a load source), `run` (raw tables
// attached) and `broken_raw_page` (class 9's control)

use busdma::front::typed::{Bidirectional, DeviceOwned};
use busdma::front::{
    Coherent, Direction, DmaMap, DmaMemory, KernelBuf, OwnedMap, QuarantineStats, RawSegment, Strategy,
    SyncOp, Tag, TagSpec, load_registered,
};
use busdma::iommu::DomainId;
use busdma::pgtable::{PteFormat, VtdSl};
use busdma::pin::Registry;
use busdma::{Error, KernVa, MemAttr, PAGE_SIZE, PhysAddr, Platform, Result, UserVa};

use crate::audit::PageKind;

/// A scenario's own direct-mapped bytes as a load source.
#[allow(unsafe_code)]
fn kbuf(kva: KernVa, len: u64) -> KernelBuf {
    // SAFETY: every caller passes pages the scenario allocated from the model and keeps until
    // the map is unloaded (the ground truth records what it gives the device).
    unsafe { KernelBuf::new(kva, len) }
}

/// Class 9's control driver's load source ([`GiveBack::FreeAnyway`]): a page it frees while
/// a stale translation may still reach it.
#[allow(unsafe_code)]
fn broken_raw_page(pa: PhysAddr, len: u64) -> RawSegment {
    // SAFETY: the promise of `RawSegment::new` (the page is the caller's until the unload has
    // returned and its invalidation completed) is kept only until the unload returns: the
    // control driver then frees the page whatever the invalidation did, breaking the promise
    // on purpose (the bug class 9 must be able to see). No Rust value is at stake: the page is
    // the model's RAM, which busdma does not touch after the unload and the device reaches
    // only through the model IOMMU's port, so the breach is the modelled bug (a device
    // reaching the next owner's bytes, judged by the ground truth), not undefined behaviour
    // of this program.
    unsafe { RawSegment::new(pa, len) }
}
use crate::hostile::{
    Access, AttackClass, HostileDevice, Outcome, Tally, page_base, public_fill, secret_fill,
};
use crate::uspace::UserSpace;
use crate::{FrameBlock, FrameRequest, HostPlatform, ModelIommu, Placement};

/// The attacker's device id.
pub const ATTACKER: u32 = 0x100;
/// The victim's device id.
pub const VICTIM: u32 = 0x200;

/// How the attacker's domain is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Strict invalidation, trusted device: page granularity is the only exposure.
    Strict,
    /// Strict invalidation, untrusted device: sub-page buffers are bounced.
    StrictUntrusted,
    /// Deferred invalidation (per-CPU flush queues).
    Deferred,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 3] = [Mode::Strict, Mode::StrictUntrusted, Mode::Deferred];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::StrictUntrusted => "strict-untrusted",
            Mode::Deferred => "deferred",
        }
    }
}

/// A domain as the model IOMMU's context needs it.
#[derive(Clone, Copy, Debug)]
pub struct DomainUnderTest {
    /// Its id (the IOTLB tag).
    pub id: DomainId,
    /// Root table.
    pub root: PhysAddr,
    /// Input width.
    pub input_bits: u32,
}

/// The measured deferred window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Most unloads after which a stale bus address still reached memory.
    pub max_entries: u64,
    /// Longest time (ns) from an unload's return to the last stale access that got through.
    pub max_ns: u64,
    /// Probe sequences run.
    pub probes: u64,
}

/// The page-ownership check: every page reachable through either domain's tables (walked
/// from RAM) is checked not to be busdma metadata in RAM (a page-table page).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    /// Walks of both domains' tables.
    pub checks: u64,
    /// Leaves seen over all walks.
    pub leaves: u64,
    /// Leaves that reached a page-table page.
    pub exposed: u64,
}

/// Who gives class 9's buffers back after their invalidation failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GiveBack {
    /// busdma's owned buffers do (coherent memory, a typed buffer, an owned map): memory a
    /// translation may still reach waits in the tag's quarantine.
    #[default]
    Busdma,
    /// The class's control, a deliberately broken driver: the same three pages, loaded through
    /// the raw `unsafe` path ([`RawSegment`]) and freed as soon as the unload returns, its
    /// error and the tag's failed proof swallowed (the hole 7). It must show escapes.
    FreeAnyway,
}

/// What class 9 saw of the teardowns (besides the attacker's figures).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reuse {
    /// Rounds run.
    pub rounds: u64,
    /// Buffers lent to the attacker and torn down while invalidations failed.
    pub torn_down: u64,
    /// Teardowns that reported the failure to the driver (a typed buffer's `to_cpu` error).
    pub reported: u64,
    /// Buffers the attacker's tag's quarantine held while the attacker probed, summed over
    /// rounds.
    pub held_while_probed: u64,
    /// Buffers the quarantine released once the unit worked again ([`Tag::reclaim`]).
    pub released: u64,
    /// Pages the next owners allocated and filled with secrets.
    pub next_owner_pages: u64,
    /// Of those, pages that were a torn-down buffer's: memory freed while a stale translation
    /// reached it (0 unless the driver is broken).
    pub reused: u64,
    /// The attacker's tag's quarantine counters at the end of the run.
    pub quarantine: QuarantineStats,
}

/// What one mode's run found.
#[derive(Clone, Debug)]
pub struct Report {
    /// The mode.
    pub mode: Mode,
    /// Figures per class, in class order.
    pub tallies: Vec<(AttackClass, Tally)>,
    /// The deferred window (class 3).
    pub window: Window,
    /// Loads busdma refused (with the first error), per class: an attack that could not even
    /// be set up is reported, not hidden.
    pub refused: Vec<(AttackClass, u64, Option<Error>)>,
    /// The page-ownership check.
    pub ownership: Ownership,
    /// Class 9's teardowns and the quarantine.
    pub reuse: Reuse,
}

impl Report {
    /// The figures of one class.
    pub fn tally(&self, class: AttackClass) -> Tally {
        self.tallies.iter().find(|(c, _)| *c == class).map(|(_, t)| *t).unwrap_or_default()
    }

    /// The figures of every class together.
    pub fn total(&self) -> Tally {
        let mut t = Tally::default();
        for (_, x) in &self.tallies {
            t.add(x);
        }
        t
    }
}

/// Bytes per probe read: 16, small enough that a probe of a page's neighbourhood tests many
/// distinct offsets, large enough to carry a secret.
const PROBE: usize = 16;
/// Probes per loaded buffer in the neighbour and slack classes.
const PROBES_PER_LOAD: u64 = 64;
/// Unloads the window probe waits through before giving up: beyond any sane queue bound (the
/// default is 256), so a missing flush shows as a window of this size.
const WINDOW_GIVE_UP: u64 = 4096;
/// Class 9: probes per torn-down buffer per round, half reads, half writes.
const REUSE_PROBES: u64 = 16;
/// Class 9: the most pages one next owner takes while looking for the torn-down buffers'
/// pages (it stops at the first page above them all, see `next_owner`).
const NEXT_OWNER_MAX: usize = 64;

/// The two devices' tags (maps borrow them while the rig's state changes).
struct Tags<'m, SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>> {
    attacker: Tag<'m, HostPlatform, SA>,
    victim: Tag<'m, HostPlatform, SV>,
}

struct Rig<'m> {
    m: &'m HostPlatform,
    /// Root tables of the attacker's and the victim's domains (for the ownership check).
    roots: [(PhysAddr, u32); 2],
    /// Ownership checks run, and leaves found reaching page-table pages.
    ownership: Ownership,
    dev: HostileDevice<'m>,
    iommu: &'m ModelIommu<'m>,
    refused: Vec<(AttackClass, u64, Option<Error>)>,
    window: Window,
    give_back: GiveBack,
    reuse: Reuse,
}

/// Class 9's buffers of one round, lent to the attacker.
struct Lent<'m, S: Strategy<HostPlatform>> {
    /// `(bus address, page)` of each buffer.
    pages: Vec<(u64, PhysAddr)>,
    held: Held<'m, S>,
}

/// Class 9's buffers as busdma owns them, one of each kind.
struct Owned<'m, S: Strategy<HostPlatform>> {
    coherent: Coherent<'m, HostPlatform, S>,
    typed: DeviceOwned<'m, HostPlatform, S, Bidirectional>,
    owned: OwnedMap<'m, HostPlatform, S, DmaMemory<'m, HostPlatform>>,
}

/// What holds class 9's buffers while they are lent.
enum Held<'m, S: Strategy<HostPlatform>> {
    /// busdma's owned buffers (boxed: the handles are large, the control's vector is not).
    Busdma(Box<Owned<'m, S>>),
    /// The control driver's raw loads ([`GiveBack::FreeAnyway`]).
    Raw(Vec<(DmaMap<'m, HostPlatform, S>, DmaMemory<'m, HostPlatform>)>),
}

/// A direct-mapped page of the model's RAM, every byte secret.
fn secret_page<'m>(m: &'m HostPlatform, seed: u64) -> Result<(FrameBlock<'m>, KernVa)> {
    let f = m.alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) })?;
    m.write_phys(f.pa(), &secret_fill(seed, PAGE_SIZE as usize))?;
    let kva = m.phys_to_kva(f.pa()).ok_or(Error::NotDirectMapped { pa: f.pa().raw() })?;
    Ok((f, kva))
}

impl<'m> Rig<'m> {
    /// Walks both domains' tables from RAM and counts leaves that reach a table page.
    fn check_ownership(&mut self) {
        for (root, levels) in self.roots {
            let leaves = crate::audit::reachable::<VtdSl>(self.m, root, levels);
            self.ownership.checks += 1;
            self.ownership.leaves += leaves.len() as u64;
            self.ownership.exposed += crate::audit::metadata_exposed(self.m, &leaves).len() as u64;
        }
    }

    fn refuse(&mut self, class: AttackClass, e: Error) {
        match self.refused.iter_mut().find(|r| r.0 == class) {
            Some(r) => r.1 += 1,
            None => self.refused.push((class, 1, Some(e))),
        }
    }

    /// Class 1: a sub-page buffer in a page of secrets; the attacker reads around it.
    fn class_subpage<SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
        &mut self,
        tags: &Tags<'m, SA, SV>,
        rounds: u64,
    ) -> Result<()> {
        let class = AttackClass::SubPageNeighbour;
        let mut map = tags.attacker.create_map()?;
        for round in 0..rounds {
            // `_page` holds the secrets around the buffer until the round ends.
            let Some((_page, buf, len)) = self.load_subpage(class, &mut map, round)? else {
                continue;
            };
            if round % 64 == 0 {
                self.check_ownership();
            }
            let bus = map.segments()[0].addr.raw();
            self.probe_page(class, bus);
            map.sync(SyncOp::POSTREAD | SyncOp::POSTWRITE)?;
            map.unload()?;
            self.dev.truth().revoke(buf, len, Access::ReadWrite);
        }
        Ok(())
    }

    /// Loads a random sub-page public buffer (64 to 1 024 bytes) that sits in a fresh page of
    /// secrets, for a bidirectional transfer, and grants it to the device. Returns the page
    /// (keep it until the buffer is unloaded), the buffer's address and length; `None` if
    /// busdma refused the load (counted for `class`).
    fn load_subpage<S>(
        &mut self,
        class: AttackClass,
        map: &mut busdma::front::DmaMap<'m, HostPlatform, S>,
        round: u64,
    ) -> Result<Option<(FrameBlock<'m>, PhysAddr, u64)>>
    where
        S: Strategy<HostPlatform>,
    {
        let (page, kva) = secret_page(self.m, round)?;
        let off = 64 * (1 + self.dev.random() % 32);
        let len = 64 * (1 + self.dev.random() % 16);
        let buf = page.pa().checked_add(off).ok_or(Error::Overflow { base: off, len })?;
        self.m.write_phys(buf, &public_fill(round, len as usize))?;
        let src = kbuf(kva.checked_add(off).ok_or(Error::Overflow { base: off, len })?, len);
        if let Err(e) = map.load(&src, Direction::Bidirectional) {
            self.refuse(class, e);
            return Ok(None);
        }
        map.sync(SyncOp::PREWRITE | SyncOp::PREREAD)?;
        self.dev.truth().grant(buf, len, Access::ReadWrite);
        Ok(Some((page, buf, len)))
    }

    /// The attacker reads [`PROBE`] bytes at [`PROBES_PER_LOAD`] random places of the IOMMU
    /// page holding bus address `bus`.
    fn probe_page(&mut self, class: AttackClass, bus: u64) {
        let port = self.iommu.port(ATTACKER);
        for _ in 0..PROBES_PER_LOAD {
            let at = page_base(bus) + self.dev.random() % (PAGE_SIZE - PROBE as u64);
            self.dev.try_read(class, &port, at, PROBE);
        }
    }

    /// Loads one public page-sized buffer for the attacker; returns its bus address.
    fn load_page<S>(
        &mut self,
        class: AttackClass,
        map: &mut busdma::front::DmaMap<'m, HostPlatform, S>,
        seed: u64,
        dir: Direction,
    ) -> Result<Option<(u64, FrameBlock<'m>)>>
    where
        S: Strategy<HostPlatform>,
    {
        let f = self
            .m
            .alloc_frames(FrameRequest { placement: Placement::DirectMapped, ..FrameRequest::pages(1) })?;
        self.m.write_phys(f.pa(), &public_fill(seed, PAGE_SIZE as usize))?;
        let kva = self.m.phys_to_kva(f.pa()).ok_or(Error::NotDirectMapped { pa: f.pa().raw() })?;
        if let Err(e) = map.load(&kbuf(kva, PAGE_SIZE), dir) {
            self.refuse(class, e);
            return Ok(None);
        }
        let access = match dir {
            Direction::ToDevice => Access::Read,
            Direction::FromDevice => Access::Write,
            Direction::Bidirectional => Access::ReadWrite,
        };
        self.dev.truth().grant(f.pa(), PAGE_SIZE, access);
        Ok(Some((map.segments()[0].addr.raw(), f)))
    }

    /// Class 2: the attacker uses a buffer (filling the IOTLB), the driver unloads it, the
    /// buffer becomes someone else's secret, and the attacker tries the old address at once.
    fn class_after_unmap<SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
        &mut self,
        tags: &Tags<'m, SA, SV>,
        rounds: u64,
        probes: u64,
    ) -> Result<()> {
        let class = AttackClass::AfterUnmap;
        let mut map = tags.attacker.create_map()?;
        for round in 0..rounds {
            let Some((bus, f)) = self.load_page(class, &mut map, round, Direction::Bidirectional)? else {
                continue;
            };
            let port = self.iommu.port(ATTACKER);
            self.dev.try_read(class, &port, bus, PROBE);
            map.unload()?;
            self.dev.truth().revoke(f.pa(), PAGE_SIZE, Access::ReadWrite);
            self.m.write_phys(f.pa(), &secret_fill(round, PAGE_SIZE as usize))?;
            for i in 0..probes {
                if i % 2 == 0 {
                    self.dev.try_read(class, &port, bus + (i * 64) % PAGE_SIZE, PROBE);
                } else {
                    self.dev.try_write(class, &port, bus + (i * 64) % PAGE_SIZE, &[0x11; PROBE]);
                }
            }
        }
        Ok(())
    }

    /// Class 3: as class 2, then the attacker keeps probing the stale address after each of
    /// its further unloads until it faults: the window.
    fn class_deferred_window<SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
        &mut self,
        tags: &Tags<'m, SA, SV>,
        rounds: u64,
    ) -> Result<()> {
        let class = AttackClass::DeferredWindow;
        let mut map = tags.attacker.create_map()?;
        let mut churn = tags.attacker.create_map()?;
        for round in 0..rounds {
            let Some((bus, f)) = self.load_page(class, &mut map, round, Direction::Bidirectional)? else {
                continue;
            };
            let port = self.iommu.port(ATTACKER);
            self.dev.try_read(class, &port, bus, PROBE);
            map.unload()?;
            let t0 = self.m.monotonic_ns();
            self.dev.truth().revoke(f.pa(), PAGE_SIZE, Access::ReadWrite);
            self.m.write_phys(f.pa(), &secret_fill(round, PAGE_SIZE as usize))?;
            let mut entries = 0u64;
            let mut last_hit = None;
            let stale = f.range();
            loop {
                let (outcome, seen) = self.m.watch_bus(|| self.dev.try_read(class, &port, bus, PROBE));
                if outcome == Outcome::Faulted {
                    break;
                }
                // A hit only if it reached the unloaded buffer (the IOVA may since have been
                // reused, after its flush, for a buffer the attacker was given).
                if seen.iter().any(|a| stale.contains(a.pa)) {
                    last_hit = Some((entries, self.m.monotonic_ns() - t0));
                }
                if entries == WINDOW_GIVE_UP {
                    break;
                }
                // One more unload of the attacker's own: what drives the flush queue.
                if let Some((_, g)) = self.load_page(class, &mut churn, round, Direction::ToDevice)? {
                    churn.unload()?;
                    self.dev.truth().revoke(g.pa(), PAGE_SIZE, Access::Read);
                }
                entries += 1;
            }
            self.window.probes += 1;
            if let Some((e, ns)) = last_hit {
                self.window.max_entries = self.window.max_entries.max(e + 1);
                self.window.max_ns = self.window.max_ns.max(ns);
            }
        }
        Ok(())
    }

    /// Class 4: the victim's buffers are live in its own domain; the attacker emits their bus
    /// addresses.
    fn class_other_domain<SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
        &mut self,
        tags: &Tags<'m, SA, SV>,
        rounds: u64,
    ) -> Result<()> {
        let class = AttackClass::OtherDomain;
        let mut vmap = tags.victim.create_map()?;
        let mut own = tags.attacker.create_map()?;
        for round in 0..rounds {
            let (page, kva) = secret_page(self.m, round)?;
            if let Err(e) = vmap.load(&kbuf(kva, PAGE_SIZE), Direction::Bidirectional) {
                self.refuse(class, e);
                continue;
            }
            // The attacker has a live buffer of its own too, likely at the same bus address.
            let mine = self.load_page(class, &mut own, round, Direction::Bidirectional)?;
            let target = vmap.segments()[0].addr.raw();
            if round % 64 == 0 {
                self.check_ownership();
            }
            let port = self.iommu.port(ATTACKER);
            for i in 0..PROBES_PER_LOAD {
                let at = target + (i * 61) % (PAGE_SIZE - PROBE as u64);
                self.dev.try_read(class, &port, at, PROBE);
            }
            vmap.unload()?;
            if let Some((_, f)) = mine {
                own.unload()?;
                self.dev.truth().revoke(f.pa(), PAGE_SIZE, Access::ReadWrite);
            }
            drop(page);
        }
        Ok(())
    }

    /// Class 5: random bus addresses, half over the whole input space, half near the live
    /// mappings of both devices.
    fn class_random_scan<SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
        &mut self,
        tags: &Tags<'m, SA, SV>,
        attempts: u64,
        input_bits: u32,
    ) -> Result<()> {
        let class = AttackClass::RandomScan;
        let mut own = tags.attacker.create_map()?;
        let mut vmap = tags.victim.create_map()?;
        let (_vpage, vkva) = secret_page(self.m, 99)?;
        vmap.load(&kbuf(vkva, PAGE_SIZE), Direction::Bidirectional)?;
        let mine = self.load_page(class, &mut own, 5, Direction::Bidirectional)?;
        let anchors = [vmap.segments()[0].addr.raw(), mine.as_ref().map_or(0, |(b, _)| *b)];
        self.check_ownership();
        let port = self.iommu.port(ATTACKER);
        let space = if input_bits >= 64 { u64::MAX } else { (1u64 << input_bits) - 1 };
        for i in 0..attempts {
            let r = self.dev.random();
            let at = if i % 2 == 0 {
                r & space
            } else {
                // Within 64 pages of an anchor.
                let a = anchors[(i / 2) as usize % anchors.len()];
                (a & !(PAGE_SIZE - 1)).wrapping_add((r % (128 * PAGE_SIZE)).wrapping_sub(64 * PAGE_SIZE))
                    & space
            };
            if i % 8 == 7 {
                self.dev.try_write(class, &port, at, &[0x22; PROBE]);
            } else {
                self.dev.try_read(class, &port, at, PROBE);
            }
        }
        vmap.unload()?;
        if let Some((_, f)) = mine {
            own.unload()?;
            self.dev.truth().revoke(f.pa(), PAGE_SIZE, Access::ReadWrite);
        }
        Ok(())
    }

    /// Class 6: a registered user buffer (seed 001) is loaded, used, unloaded; its
    /// registration is dropped and the pages go back to the system and become someone else's
    /// secrets; the attacker tries the old bus addresses. The registry waits on the
    /// attacker's tag before unpinning (busdma's unpin barrier): under deferred invalidation
    /// that is what keeps the stale IOTLB entry from outliving the pin.
    fn class_dropped_registration<SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
        &mut self,
        tags: &Tags<'m, SA, SV>,
        rounds: u64,
        probes: u64,
    ) -> Result<()> {
        let class = AttackClass::DroppedRegistration;
        // Two pages per registration; a user address space of the model.
        const PAGES: u64 = 2;
        let us = UserSpace::new(self.m);
        let reg = Registry::with_barrier(&us, PAGES * PAGE_SIZE * 4, &tags.attacker)?;
        let mut map = tags.attacker.create_map()?;
        let ua = UserVa::new(0x7f00_0000_0000);
        for round in 0..rounds {
            let len = PAGES * PAGE_SIZE;
            us.map(ua, len)?;
            us.write(ua, &public_fill(round, len as usize))?;
            reg.register(ua, len)?;
            let pas: Vec<PhysAddr> =
                (0..PAGES).filter_map(|i| us.translate(UserVa::new(ua.raw() + i * PAGE_SIZE))).collect();
            let bus = match load_registered(&mut map, &reg, ua, len, Direction::Bidirectional) {
                Ok(l) => {
                    for &pa in &pas {
                        self.dev.truth().grant(pa, PAGE_SIZE, Access::ReadWrite);
                    }
                    let bus = l.segments()[0].addr.raw();
                    let port = self.iommu.port(ATTACKER);
                    self.dev.try_read(class, &port, bus, PROBE);
                    l.unload()?;
                    for &pa in &pas {
                        self.dev.truth().revoke(pa, PAGE_SIZE, Access::ReadWrite);
                    }
                    Some(bus)
                }
                Err(e) => {
                    self.refuse(class, e);
                    None
                }
            };
            reg.unregister(ua, len)?;
            us.unmap(ua, len)?;
            // The pages are the system's again: someone else's data now.
            for &pa in &pas {
                self.m.write_phys(pa, &secret_fill(round, PAGE_SIZE as usize))?;
            }
            if let Some(bus) = bus {
                let port = self.iommu.port(ATTACKER);
                for i in 0..probes {
                    let at = bus + (i * 97) % (len - PROBE as u64);
                    if i % 2 == 0 {
                        self.dev.try_read(class, &port, at, PROBE);
                    } else {
                        self.dev.try_write(class, &port, at, &[0x44; PROBE]);
                    }
                }
            }
        }
        Ok(())
    }

    /// Class 7: sub-page buffers (bounced by an untrusted tag); the bounce page a load used is
    /// filled with another user's secret once it is free again, so the next load's page holds
    /// stale data unless busdma scrubs it; the attacker reads all over the IOMMU page of its
    /// segment. Only pages the platform handed out as DMA pages (bounce pages) are probed: a
    /// mode that bounces nothing makes no attempt here (its exposure is class 1's).
    fn class_bounce_slack<SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
        &mut self,
        tags: &Tags<'m, SA, SV>,
        rounds: u64,
    ) -> Result<()> {
        let class = AttackClass::BounceSlack;
        let mut map = tags.attacker.create_map()?;
        for round in 0..rounds {
            // `_page` holds the secrets around the buffer until the round ends.
            let Some((_page, buf, len)) = self.load_subpage(class, &mut map, round)? else {
                continue;
            };
            let bus = map.segments()[0].addr.raw();
            let bounce = self
                .iommu
                .translate(ATTACKER, busdma::Iova::new(bus), false)
                .ok()
                .filter(|pa| self.m.page_kind(*pa) == PageKind::Dma);
            if let Some(bounce) = bounce {
                self.probe_page(class, bus);
                map.sync(SyncOp::POSTREAD | SyncOp::POSTWRITE)?;
                map.unload()?;
                // Free again: another user's secret passes through it.
                self.m.write_phys(bounce.page_base(), &secret_fill(round ^ 0x5a5a, PAGE_SIZE as usize))?;
            } else {
                map.unload()?;
            }
            self.dev.truth().revoke(buf, len, Access::ReadWrite);
        }
        Ok(())
    }

    /// Class 8: writes through a to-device (read-only) mapping of the attacker's own buffer.
    fn class_write_read_only<SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
        &mut self,
        tags: &Tags<'m, SA, SV>,
        rounds: u64,
    ) -> Result<()> {
        let class = AttackClass::WriteReadOnly;
        let mut map = tags.attacker.create_map()?;
        for round in 0..rounds {
            let Some((bus, f)) = self.load_page(class, &mut map, round, Direction::ToDevice)? else {
                continue;
            };
            map.sync(SyncOp::PREWRITE)?;
            let port = self.iommu.port(ATTACKER);
            for i in 0..PROBES_PER_LOAD / 4 {
                self.dev.try_write(class, &port, bus + (i * 256) % PAGE_SIZE, &[0x33; PROBE]);
            }
            map.unload()?;
            self.dev.truth().revoke(f.pa(), PAGE_SIZE, Access::Read);
        }
        Ok(())
    }
}

impl<'m> Rig<'m> {
    /// Class 9: reuse after a failed invalidation (theory 5). Per round: three one-page
    /// buffers lent (`lend_busdma`, or `lend_raw` for the control), each read once by the
    /// attacker (the IOTLB now caches it); every invalidation fails from then on; the buffers
    /// are torn down and their grants revoked; a next owner takes pages and fills them with
    /// secrets; the attacker reads and writes all over the old bus addresses; then the unit
    /// works again and the tag's quarantine is reclaimed.
    fn class_failed_invalidation<SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
        &mut self,
        tags: &Tags<'m, SA, SV>,
        rounds: u64,
    ) -> Result<()> {
        let class = AttackClass::FailedInvalidation;
        let tag = &tags.attacker;
        for round in 0..rounds {
            let lent = match self.give_back {
                GiveBack::Busdma => self.lend_busdma(tag, round)?,
                GiveBack::FreeAnyway => self.lend_raw(tag, round)?,
            };
            let Some(Lent { pages, held }) = lent else { continue };
            self.reuse.rounds += 1;
            let port = self.iommu.port(ATTACKER);
            for &(bus, pa) in &pages {
                self.dev.truth().grant(pa, PAGE_SIZE, Access::ReadWrite);
                self.dev.try_read(class, &port, bus, PROBE);
            }
            // The unit's invalidation queue fails from here on: the unloads' invalidations,
            // the deferred flushes and the tag's proofs all fail, executing nothing.
            self.iommu.fail_next_invalidations(u64::MAX);
            self.tear_down(tag, held);
            for &(_, pa) in &pages {
                self.dev.truth().revoke(pa, PAGE_SIZE, Access::ReadWrite);
            }
            self.reuse.torn_down += pages.len() as u64;
            self.reuse.held_while_probed += tag.quarantine_stats().held;
            let old: Vec<PhysAddr> = pages.iter().map(|&(_, pa)| pa).collect();
            let next = self.next_owner(tag.spec(), &old, round)?;
            for (k, &(bus, _)) in pages.iter().enumerate() {
                for i in 0..REUSE_PROBES {
                    let at = bus + (i * 251 + k as u64 * 67) % (PAGE_SIZE - PROBE as u64);
                    if i % 2 == 0 {
                        self.dev.try_read(class, &port, at, PROBE);
                    } else {
                        self.dev.try_write(class, &port, at, &[0x55; PROBE]);
                    }
                }
            }
            // The unit works again: the next proof releases what the quarantine holds.
            self.iommu.fail_next_invalidations(0);
            let released = tag.quarantine_stats().released;
            tag.reclaim()?;
            tag.wait_unmapped()?;
            self.reuse.released += tag.quarantine_stats().released - released;
            drop(next);
        }
        self.reuse.quarantine = tag.quarantine_stats();
        Ok(())
    }

    /// Class 9, busdma's way: coherent memory, a typed bidirectional buffer handed to the
    /// device, and a DMA page moved into an owned map, each one page of public bytes. `None`
    /// if busdma refused one (counted; the others are given back at once, nothing failing).
    fn lend_busdma<S: Strategy<HostPlatform>>(
        &mut self,
        tag: &Tag<'m, HostPlatform, S>,
        round: u64,
    ) -> Result<Option<Lent<'m, S>>> {
        let class = AttackClass::FailedInvalidation;
        let fill = |k: u64| public_fill(round.wrapping_mul(3).wrapping_add(k), PAGE_SIZE as usize);
        let coherent = match tag.alloc_coherent(PAGE_SIZE, false) {
            Ok(c) => c,
            Err(e) => return self.refused_none(class, e),
        };
        coherent.memory().write(0, &fill(0))?;
        let buf = match tag.alloc_buffer::<Bidirectional>(PAGE_SIZE) {
            Ok(b) => b,
            Err(e) => return self.refused_none(class, e),
        };
        buf.write(0, &fill(1))?;
        let typed = match buf.to_device() {
            Ok(t) => t,
            Err((e, _)) => return self.refused_none(class, e),
        };
        let mut owned = tag.create_owned_map::<DmaMemory<'m, HostPlatform>>()?;
        let mem = DmaMemory::alloc(self.m, tag.spec(), PAGE_SIZE, MemAttr::WriteBack)?;
        mem.write(0, &fill(2))?;
        let owned_pa = mem.pa();
        let owned_bus = match owned.load(mem, Direction::Bidirectional) {
            Ok(segs) => segs[0].addr.raw(),
            Err((e, _)) => return self.refused_none(class, e),
        };
        owned.sync(SyncOp::PREWRITE | SyncOp::PREREAD)?;
        // A typed buffer shows no physical address (by design): the page the device reaches
        // is the model IOMMU's answer.
        let typed_bus = typed.segments()[0].addr;
        let typed_pa = self
            .iommu
            .translate(ATTACKER, typed_bus, false)
            .map_err(|_| Error::NotMapped { addr: typed_bus.raw() })?;
        let pages = vec![
            (coherent.segments()[0].addr.raw(), coherent.memory().pa()),
            (typed_bus.raw(), typed_pa),
            (owned_bus, owned_pa),
        ];
        Ok(Some(Lent { pages, held: Held::Busdma(Box::new(Owned { coherent, typed, owned })) }))
    }

    /// Class 9's control ([`GiveBack::FreeAnyway`]): three DMA pages of public bytes, loaded
    /// through the raw path.
    fn lend_raw<S: Strategy<HostPlatform>>(
        &mut self,
        tag: &Tag<'m, HostPlatform, S>,
        round: u64,
    ) -> Result<Option<Lent<'m, S>>> {
        let mut pages = Vec::new();
        let mut raw = Vec::new();
        for k in 0..3 {
            let mem = DmaMemory::alloc(self.m, tag.spec(), PAGE_SIZE, MemAttr::WriteBack)?;
            mem.write(0, &public_fill(round.wrapping_mul(3).wrapping_add(k), PAGE_SIZE as usize))?;
            let mut map = tag.create_map()?;
            let bus = match map.load(&broken_raw_page(mem.pa(), PAGE_SIZE), Direction::Bidirectional) {
                Ok(segs) => segs[0].addr.raw(),
                Err(e) => return self.refused_none(AttackClass::FailedInvalidation, e),
            };
            map.sync(SyncOp::PREWRITE | SyncOp::PREREAD)?;
            pages.push((bus, mem.pa()));
            raw.push((map, mem));
        }
        Ok(Some(Lent { pages, held: Held::Raw(raw) }))
    }

    fn refused_none<T>(&mut self, class: AttackClass, e: Error) -> Result<Option<T>> {
        self.refuse(class, e);
        Ok(None)
    }

    /// Class 9's teardown while invalidations fail: what a driver does with each kind of
    /// buffer (drop the coherent memory, take the typed buffer back, drop the owned map), or
    /// the control's unload-and-free.
    fn tear_down<S: Strategy<HostPlatform>>(&mut self, tag: &Tag<'m, HostPlatform, S>, held: Held<'m, S>) {
        match held {
            Held::Busdma(b) => {
                let Owned { coherent, typed, owned } = *b;
                drop(coherent);
                match typed.to_cpu() {
                    // A deferred unload returns before any invalidation: the CPU has the
                    // buffer, and its drop asks the tag for the proof.
                    Ok(cpu) => drop(cpu),
                    Err(_) => self.reuse.reported += 1,
                }
                drop(owned);
            }
            Held::Raw(raw) => {
                for (mut map, mem) in raw {
                    // The bug: both errors swallowed, the page freed.
                    let _ = map.unload();
                    let _ = tag.wait_unmapped();
                    drop(mem);
                }
            }
        }
    }

    /// Class 9's next owner: takes one-page DMA buffers as a victim driver would
    /// (`DmaMemory::alloc`, served by the same first-fit frame allocator that gave the
    /// attacker's buffers their pages) until it holds a page above every page of `old` (or
    /// [`NEXT_OWNER_MAX`] pages), and fills each with secrets. A first-fit allocator hands
    /// single free pages out in ascending order, so had any page of `old` been freed, the
    /// next owner holds it now.
    fn next_owner(
        &mut self,
        spec: &TagSpec,
        old: &[PhysAddr],
        round: u64,
    ) -> Result<Vec<DmaMemory<'m, HostPlatform>>> {
        let top = old.iter().copied().max().unwrap_or(PhysAddr::new(0));
        let mut got = Vec::new();
        while got.len() < NEXT_OWNER_MAX {
            let mem = DmaMemory::alloc(self.m, spec, PAGE_SIZE, MemAttr::WriteBack)?;
            mem.write(0, &secret_fill(round ^ ((got.len() as u64) << 32), PAGE_SIZE as usize))?;
            let above = mem.pa() > top;
            self.reuse.reused += u64::from(old.contains(&mem.pa()));
            got.push(mem);
            if above {
                break;
            }
        }
        self.reuse.next_owner_pages += got.len() as u64;
        Ok(got)
    }
}

/// How many attempts each class makes (roughly; whole rounds are run).
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Target attempts per class.
    pub per_class: u64,
    /// Seed of the attacker's random choices.
    pub seed: u64,
    /// Run only this class (all when `None`).
    pub only: Option<AttackClass>,
    /// Who gives class 9's buffers back: busdma, or the class's broken control.
    pub give_back: GiveBack,
}

/// Runs every class against busdma in `mode`: the attacker's domain is `attacker`, the
/// victim's `victim`; both are attached to `iommu` here, and detached before it returns.
///
/// Errors: a failure of the rig itself (out of memory, a refused attach); refusals of single
/// loads by busdma are reported in [`Report::refused`] instead.
///
/// # Safety
///
/// The tables rooted at `attacker.root` and `victim.root` must stay allocated, written only
/// by their domains, until this returns; afterwards they may be freed only after an
/// invalidation of their domain ids (dropping their `busdma::iommu::Domain` does that): the
/// contract of [`ModelIommu::attach`].
#[allow(clippy::too_many_arguments)] // two devices, each a domain and a strategy
#[allow(unsafe_code)]
pub unsafe fn run<'m, SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
    m: &'m HostPlatform,
    iommu: &'m ModelIommu<'m>,
    attacker: DomainUnderTest,
    attacker_strategy: SA,
    victim: DomainUnderTest,
    victim_strategy: SV,
    mode: Mode,
    plan: Plan,
) -> Result<Report> {
    use crate::{Context, TableFormat};
    let ctx = |d: DomainUnderTest| Context::new(d.id, d.root, TableFormat::VtdSecondLevel, d.input_bits);
    // SAFETY: the caller keeps the attacker's tables alive until we return; we detach first.
    unsafe { iommu.attach(ATTACKER, ctx(attacker))? };
    // SAFETY: as above, for the victim's tables.
    if let Err(e) = unsafe { iommu.attach(VICTIM, ctx(victim)) } {
        let _ = iommu.detach(ATTACKER);
        return Err(e);
    }
    let r = run_attached(m, iommu, attacker, attacker_strategy, victim, victim_strategy, mode, plan);
    let _ = iommu.detach(ATTACKER);
    let _ = iommu.detach(VICTIM);
    r
}

/// [`run`], once both devices are attached.
#[allow(clippy::too_many_arguments)]
fn run_attached<'m, SA: Strategy<HostPlatform>, SV: Strategy<HostPlatform>>(
    m: &'m HostPlatform,
    iommu: &'m ModelIommu<'m>,
    attacker: DomainUnderTest,
    attacker_strategy: SA,
    victim: DomainUnderTest,
    victim_strategy: SV,
    mode: Mode,
    plan: Plan,
) -> Result<Report> {
    let mut spec = TagSpec::new(64 << 10, 16);
    spec.flags.untrusted = mode == Mode::StrictUntrusted;
    let input_bits = attacker.input_bits;
    let victim_bits = victim.input_bits;
    let tags = Tags {
        attacker: Tag::new_root(m, attacker_strategy, spec)?,
        victim: Tag::new_root(m, victim_strategy, TagSpec::new(64 << 10, 16))?,
    };
    let levels = |bits: u32| VtdSl::levels(bits);
    let roots = [(attacker.root, levels(input_bits)?), (victim.root, levels(victim_bits)?)];
    let mut rig = Rig {
        m,
        roots,
        ownership: Ownership::default(),
        dev: HostileDevice::new(m, plan.seed),
        iommu,
        refused: Vec::new(),
        window: Window::default(),
        give_back: plan.give_back,
        reuse: Reuse::default(),
    };
    let n = plan.per_class;
    let on = |c: AttackClass| plan.only.is_none_or(|o| o == c);
    if on(AttackClass::SubPageNeighbour) {
        rig.class_subpage(&tags, n.div_ceil(PROBES_PER_LOAD))?;
    }
    if on(AttackClass::AfterUnmap) {
        rig.class_after_unmap(&tags, n.div_ceil(17), 16)?;
    }
    if on(AttackClass::DeferredWindow) {
        // Each round of the window probe costs up to a queue's worth of unloads: few rounds.
        rig.class_deferred_window(&tags, (n / 1000).clamp(1, 200))?;
    }
    if on(AttackClass::OtherDomain) {
        rig.class_other_domain(&tags, n.div_ceil(PROBES_PER_LOAD))?;
    }
    if on(AttackClass::RandomScan) {
        rig.class_random_scan(&tags, n, input_bits)?;
    }
    if on(AttackClass::DroppedRegistration) {
        rig.class_dropped_registration(&tags, n.div_ceil(17), 16)?;
    }
    if on(AttackClass::BounceSlack) {
        rig.class_bounce_slack(&tags, n.div_ceil(PROBES_PER_LOAD))?;
    }
    if on(AttackClass::WriteReadOnly) {
        rig.class_write_read_only(&tags, n.div_ceil(PROBES_PER_LOAD / 4))?;
    }
    if on(AttackClass::FailedInvalidation) {
        // Three buffers a round, each read once while lent and probed REUSE_PROBES times.
        rig.class_failed_invalidation(&tags, n.div_ceil(3 * (1 + REUSE_PROBES)))?;
    }
    rig.check_ownership();
    let tallies = AttackClass::ALL.iter().map(|&c| (c, rig.dev.tally(c))).collect();
    Ok(Report {
        mode,
        tallies,
        window: rig.window,
        refused: rig.refused,
        ownership: rig.ownership,
        reuse: rig.reuse,
    })
}
