//! The remapping unit: bring-up, root and context tables, domain ids, invalidation by either
//! method, write-buffer flushes, fault records. See the module theory in `vtd/mod.rs`.

use core::sync::atomic::Ordering as HwOrdering;

use crate::addr::{AddrRange, Iova, KernVa, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::platform::{Platform, TablePage};
use crate::sync::{AtomicU32, AtomicU64, Ordering, SpinLock, spin_hint};

use super::caps::{Capabilities, Levels};
use super::entry::{self, DomainId, SourceId};
use super::fault::{self, Fault};
use super::inval::{self, ContextScope, Drain, IotlbScope};
use super::mutant;
use super::regs::{self, fsts, gcmd};

/// Root-table entries: one per PCI bus.
const BUSES: usize = 256;
/// Domain ids the driver can track: 2^16, every id a context entry can name.
const MAX_DOMAIN_IDS: usize = 1 << 16;
/// Queue size field for IQA: 0 = one 4 KiB page = 256 descriptors of 128 bits.
const IQA_QS_ONE_PAGE: u64 = 0;
/// Descriptors in the one-page queue.
const QUEUE_SLOTS: u32 = (PAGE_SIZE / 16) as u32;
/// Default register polls before a command is declared stuck ([`VtdConfig::poll_limit`]). Why
/// 2^24: an MMIO read costs at least 100 ns on real hardware, so this waits well over a
/// second, longer than Linux's one-second DMAR operation timeout; QEMU completes every
/// command before the first poll.
pub const DEFAULT_POLL_LIMIT: u32 = 1 << 24;

/// How the driver invalidates the unit's caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidationMethod {
    /// CCMD and IOTLB registers, one request at a time.
    Register,
    /// Descriptors in an in-memory queue, completion signalled by a wait descriptor.
    Queued,
}

/// Which invalidation method the driver should use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InvalidationChoice {
    /// Queued when ECAP.QI offers it, register-based otherwise.
    #[default]
    Auto,
    /// Register-based even when queued invalidation is offered (a test of that path).
    Register,
    /// Queued; [`Error::Unsupported`] if ECAP.QI is clear.
    Queued,
}

/// Driver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VtdConfig {
    /// Invalidation method.
    pub invalidation: InvalidationChoice,
    /// Deepest second-level tables to use; the driver picks the deepest SAGAW allows up to this.
    pub max_levels: Levels,
    /// Polls of a status (a register, or the wait descriptor's status word) before a command
    /// is declared stuck: the time-out, in units of one MMIO read ([`DEFAULT_POLL_LIMIT`]).
    pub poll_limit: u32,
}

impl Default for VtdConfig {
    fn default() -> Self {
        Self {
            invalidation: InvalidationChoice::Auto,
            max_levels: Levels::Four,
            poll_limit: DEFAULT_POLL_LIMIT,
        }
    }
}

/// Counts of what the driver asked the unit to do (for tests and the curious).
#[derive(Debug, Default)]
pub struct VtdStats {
    /// Page-selective IOTLB invalidations.
    pub iotlb_page: AtomicU64,
    /// Domain-selective IOTLB invalidations.
    pub iotlb_domain: AtomicU64,
    /// Global IOTLB invalidations.
    pub iotlb_global: AtomicU64,
    /// Context-cache invalidations.
    pub context: AtomicU64,
    /// Write-buffer flushes.
    pub write_buffer: AtomicU64,
    /// Page-selective invalidations after a map (caching mode only; also counted above).
    pub after_map: AtomicU64,
    /// Invalidations the unit failed (queue errors, refusals, time-outs).
    pub failed: AtomicU64,
    /// Invalidation-queue errors (FSTS.IQE) the driver recovered the queue from.
    pub queue_errors_recovered: AtomicU64,
}

impl VtdStats {
    /// IOTLB invalidations of any granularity.
    pub fn iotlb_total(&self) -> u64 {
        self.iotlb_page.load(Ordering::Relaxed)
            + self.iotlb_domain.load(Ordering::Relaxed)
            + self.iotlb_global.load(Ordering::Relaxed)
    }
}

struct Queue {
    /// The ring: 256 descriptors of two words.
    ring: TablePage,
    /// Word 0 receives the wait descriptors' status data.
    status: TablePage,
    /// Next free slot.
    tail: u32,
    /// Status data of the last wait descriptor submitted.
    seq: u32,
    /// The last submission timed out: descriptors may still be queued.
    stuck: bool,
}

struct State {
    /// Context table of each bus, once one of its devices is attached.
    context: [Option<TablePage>; BUSES],
    /// Present iff the method is queued.
    queue: Option<Queue>,
    /// Domain ids in use, one bit each.
    domain_ids: [u64; MAX_DOMAIN_IDS / 64],
}

/// One VT-d remapping unit in legacy mode.
///
/// # Invariants
///
/// - `base` is the register block of a remapping unit this value owns exclusively.
/// - `root` is the root table RTADDR points at; every present root entry points at the
///   context table recorded for its bus in `state.context`.
/// - While the queue exists, queued invalidation is enabled and every submission has
///   completed when `state`'s lock is released (so the ring is empty between submissions).
pub struct Vtd<'p, P: Platform> {
    platform: &'p P,
    base: PhysAddr,
    caps: Capabilities,
    levels: Levels,
    method: InvalidationMethod,
    poll_limit: u32,
    root: TablePage,
    state: SpinLock<State>,
    stats: VtdStats,
    /// Fault injection: IOTLB invalidations still to corrupt ([`Vtd::inject_invalidation_failures`]).
    inject: AtomicU32,
}

impl<'p, P: Platform> Vtd<'p, P> {
    /// Brings the unit at `base` up with translation still off: reads CAP/ECAP, installs an
    /// empty root table, sets up the chosen invalidation method, invalidates every cache,
    /// masks fault interrupts and clears old fault records. Attach devices, then
    /// [`Vtd::enable_translation`].
    ///
    /// Errors: [`Error::Unsupported`] (no usable depth, queued invalidation asked for but
    /// absent), [`Error::NoMemory`], [`Error::BadState`] (a register command never completed).
    ///
    /// # Safety
    ///
    /// `base` must be the register block of a VT-d remapping unit that nothing else drives
    /// while the returned value lives.
    pub unsafe fn new(platform: &'p P, base: PhysAddr, config: VtdConfig) -> Result<Self> {
        // SAFETY: the caller hands us the unit's register block.
        let (cap, ecap) = unsafe {
            (platform.mmio_read64(reg(base, regs::CAP)), platform.mmio_read64(reg(base, regs::ECAP)))
        };
        let caps = Capabilities::new(cap, ecap);
        let levels = caps.choose_levels(config.max_levels)?;
        let method = match (config.invalidation, caps.queued_invalidation()) {
            (InvalidationChoice::Register, _) | (InvalidationChoice::Auto, false) => {
                InvalidationMethod::Register
            }
            (InvalidationChoice::Queued | InvalidationChoice::Auto, true) => InvalidationMethod::Queued,
            (InvalidationChoice::Queued, false) => {
                return Err(Error::Unsupported { what: "queued invalidation (ECAP.QI is clear)" });
            }
        };
        let root = platform.alloc_table_page()?;
        let vtd = Self {
            platform,
            base,
            caps,
            levels,
            method,
            poll_limit: config.poll_limit,
            root,
            state: SpinLock::new(State {
                context: [const { None }; BUSES],
                queue: None,
                domain_ids: [0; MAX_DOMAIN_IDS / 64],
            }),
            stats: VtdStats::default(),
            inject: AtomicU32::new(0),
        };
        // From here on, dropping `vtd` on an error path disables the unit and frees the pages.
        vtd.bring_up()?;
        Ok(vtd)
    }

    fn bring_up(&self) -> Result<()> {
        // A unit left translating (by firmware or an earlier kernel) is switched off first:
        // its tables are not ours.
        if self.gsts() & gcmd::TE != 0 {
            self.set_persistent(gcmd::TE, false)?;
        }
        if self.gsts() & gcmd::QIE != 0 {
            self.set_persistent(gcmd::QIE, false)?;
        }
        self.clean(self.root.kva(), PAGE_SIZE);
        self.w64(regs::RTADDR, self.root.pa().raw() | regs::RTADDR_TTM_LEGACY);
        if !mutant::SKIP_SRTP {
            self.one_shot(gcmd::SRTP, |gsts| gsts & gcmd::SRTP != 0, "root table pointer (GCMD.SRTP)")?;
        }
        let mut state = self.state.lock();
        if self.method == InvalidationMethod::Queued {
            let ring = self.platform.alloc_table_page()?;
            let status = match self.platform.alloc_table_page() {
                Ok(p) => p,
                Err(e) => {
                    // SAFETY: the unit has never seen this page.
                    unsafe { self.platform.free_table_page(ring) };
                    return Err(e);
                }
            };
            self.clean(ring.kva(), PAGE_SIZE);
            self.w64(regs::IQT, 0);
            self.w64(regs::IQA, ring.pa().raw() | IQA_QS_ONE_PAGE);
            state.queue = Some(Queue { ring, status, tail: 0, seq: 0, stuck: false });
            self.set_persistent(gcmd::QIE, true)?;
        }
        self.flush_write_buffer_locked()?;
        self.invalidate_context_locked(&mut state, ContextScope::Global)?;
        self.invalidate_iotlb_locked(&mut state, IotlbScope::Global)?;
        drop(state);
        self.w32(regs::FECTL, regs::FECTL_IM);
        while self.take_fault().is_some() {}
        Ok(())
    }

    // ---- what the unit is -------------------------------------------------------------------

    /// The platform the unit was brought up on.
    pub fn platform(&self) -> &'p P {
        self.platform
    }

    /// The decoded capabilities.
    pub fn caps(&self) -> Capabilities {
        self.caps
    }

    /// The second-level depth every domain's table must have.
    pub fn levels(&self) -> Levels {
        self.levels
    }

    /// The invalidation method in use.
    pub fn method(&self) -> InvalidationMethod {
        self.method
    }

    /// Whether the unit walks tables coherently (ECAP.C); when not, table updates must be
    /// cleaned from the CPU cache (page tables: `coherent_walker: false`).
    pub fn coherent(&self) -> bool {
        self.caps.coherent()
    }

    /// Counters of invalidations and flushes issued.
    pub fn stats(&self) -> &VtdStats {
        &self.stats
    }

    /// The VER register (major in bits 7:4, minor in 3:0).
    pub fn version(&self) -> u32 {
        self.r32(regs::VER)
    }

    /// The global status register.
    pub fn gsts(&self) -> u32 {
        self.r32(regs::GSTS)
    }

    // ---- translation on/off -----------------------------------------------------------------

    /// Turns DMA remapping on: from now on every DMA is translated or blocked.
    ///
    /// Errors: [`Error::BadState`] if the unit does not acknowledge.
    pub fn enable_translation(&self) -> Result<()> {
        self.set_persistent(gcmd::TE, true)
    }

    /// Turns DMA remapping off (DMA goes untranslated again).
    ///
    /// Errors: [`Error::BadState`] if the unit does not acknowledge.
    ///
    /// # Safety
    ///
    /// Untranslated, every device behind the unit reaches all of physical memory, whatever
    /// its domain allowed. The caller guarantees that none of them issues DMA until
    /// translation is on again (quiesced or reset), or accepts that each may reach any memory
    /// (every one is trusted with all of it, as in a boot-time passthrough).
    ///
    /// ```compile_fail,E0133
    /// use busdma::Platform;
    /// use busdma::vtd::Vtd;
    /// // Turning remapping off without `unsafe` is rejected (E0133): it opens all of memory.
    /// fn open_everything<P: Platform>(unit: &Vtd<'_, P>) {
    ///     let _ = unit.disable_translation();
    /// }
    /// ```
    pub unsafe fn disable_translation(&self) -> Result<()> {
        self.set_persistent(gcmd::TE, false)
    }

    // ---- domain ids -------------------------------------------------------------------------

    /// A free domain id (never 0), below the unit's CAP.ND limit.
    ///
    /// Errors: [`Error::Exhausted`] when every id is taken.
    pub fn alloc_domain_id(&self) -> Result<DomainId> {
        let limit = (self.caps.domains() as usize).min(MAX_DOMAIN_IDS);
        let mut state = self.state.lock();
        for id in 1..limit {
            let (w, b) = (id / 64, id % 64);
            if state.domain_ids[w] & (1 << b) == 0 {
                state.domain_ids[w] |= 1 << b;
                return Ok(DomainId(id as u16));
            }
        }
        Err(Error::Exhausted { size: 1, limit: limit as u64 })
    }

    /// Gives a domain id back. Detach its devices and invalidate first.
    ///
    /// Errors: [`Error::DoubleFree`] if it is not allocated.
    pub fn free_domain_id(&self, did: DomainId) -> Result<()> {
        let id = usize::from(did.0);
        let mut state = self.state.lock();
        let (w, b) = (id / 64, id % 64);
        if id == 0 || state.domain_ids[w] & (1 << b) == 0 {
            return Err(Error::DoubleFree { addr: id as u64, size: 1 });
        }
        state.domain_ids[w] &= !(1 << b);
        Ok(())
    }

    // ---- devices ----------------------------------------------------------------------------

    /// Points device `sid` at the second-level table rooted at `sl_root` (depth `levels`,
    /// which must be [`Vtd::levels`] or another depth SAGAW offers), tagged with domain `did`.
    /// Then invalidates the device's context-cache entry and the domain's IOTLB entries, so the
    /// unit uses the new entry whatever it cached before (required in caching mode, where the
    /// context invalidation names domain id 0, the tag of cached not-present entries;
    /// harmless otherwise, and attach is rare).
    ///
    /// Errors: [`Error::AlreadyMapped`] (the device is attached), [`Error::InvalidArgument`]
    /// (domain id 0 or beyond CAP.ND, depth not offered), [`Error::Misaligned`] (`sl_root`),
    /// [`Error::NoMemory`] (a context table), [`Error::BadState`] (invalidation failed).
    ///
    /// The safe way is `busdma::device` (this driver implements its `IommuHw`), whose handle
    /// keeps the contract below.
    ///
    /// # Safety
    ///
    /// The second-level tables reachable from `sl_root` must stay allocated, and be written
    /// only by the owner of the domain's page table, until `sid` is detached
    /// ([`Vtd::detach`], which invalidates the context cache and the domain's IOTLB) and that
    /// detach has returned `Ok` (issue 14, hole 8: a table page freed earlier goes to the next
    /// domain, and the stale device reads its data).
    pub unsafe fn attach(
        &self,
        sid: SourceId,
        did: DomainId,
        sl_root: PhysAddr,
        levels: Levels,
    ) -> Result<()> {
        if did.0 == 0 || u32::from(did.0) >= self.caps.domains() {
            return Err(Error::InvalidArgument {
                what: "VT-d domain id (0 or beyond CAP.ND)",
                value: did.0.into(),
            });
        }
        if self.caps.sagaw() & (1 << levels.aw()) == 0 {
            return Err(Error::InvalidArgument {
                what: "second-level depth not in CAP.SAGAW",
                value: levels.aw(),
            });
        }
        if !sl_root.is_aligned(PAGE_SIZE) {
            return Err(Error::Misaligned { value: sl_root.raw(), align: PAGE_SIZE });
        }
        let mut state = self.state.lock();
        let table = self.context_table(&mut state, sid.bus())?;
        let index = usize::from(context_index(sid));
        let words = entry::context_entry(sl_root, levels, did);
        self.write_entry(table, index, words, sid.0.into())?;
        self.flush_write_buffer_locked()?;
        // In caching mode the unit may have cached the entry as not present, and it tags
        // not-present entries with domain id 0 (the id CM reserves for them).
        let tag = if self.caps.caching_mode() { DomainId(0) } else { did };
        self.invalidate_context_locked(&mut state, ContextScope::Device(tag, sid))?;
        self.invalidate_iotlb_locked(&mut state, IotlbScope::Domain(did))
    }

    /// Removes device `sid`'s context entry (its DMA is blocked from now on) and invalidates
    /// what the unit cached for it.
    ///
    /// Errors: [`Error::NotMapped`] if the device is not attached; [`Error::BadState`].
    pub fn detach(&self, sid: SourceId) -> Result<()> {
        let mut state = self.state.lock();
        let table =
            state.context[usize::from(sid.bus())].as_ref().ok_or(Error::NotMapped { addr: sid.0.into() })?;
        let index = usize::from(context_index(sid));
        let old = [entry_word(table, 2 * index), entry_word(table, 2 * index + 1)];
        let Some((_, _, did)) = entry::decode_context(old) else {
            return Err(Error::NotMapped { addr: sid.0.into() });
        };
        // Present bit (word 0) goes first.
        store_word(table, 2 * index, 0);
        store_word(table, 2 * index + 1, 0);
        self.clean(entry_kva(table, 2 * index), 16);
        self.flush_write_buffer_locked()?;
        self.invalidate_context_locked(&mut state, ContextScope::Device(did, sid))?;
        self.invalidate_iotlb_locked(&mut state, IotlbScope::Domain(did))
    }

    /// The context entry of `sid` as the unit would read it: `(table root, AW, domain id)`.
    pub fn context_of(&self, sid: SourceId) -> Option<(PhysAddr, u64, DomainId)> {
        let state = self.state.lock();
        let table = state.context[usize::from(sid.bus())].as_ref()?;
        let index = usize::from(sid.devfn());
        entry::decode_context([entry_word(table, 2 * index), entry_word(table, 2 * index + 1)])
    }

    // ---- invalidation -----------------------------------------------------------------------

    /// Invalidates the IOTLB entries of `did` that may translate `range` (page-selective when
    /// CAP.PSI and CAP.MAMV allow, else domain-selective), and waits for completion. This is
    /// what unmapping calls: when it returns, no DMA can use a translation of `range` that
    /// existed before the call.
    ///
    /// Errors: [`Error::InvalidationFailed`] (the unit reported an invalidation error, refused
    /// the command, or timed out).
    pub fn flush_range(&self, did: DomainId, range: AddrRange<Iova>) -> Result<()> {
        if mutant::SKIP_IOTLB_FLUSH {
            return Ok(());
        }
        let scope = inval::iotlb_scope(did, range, self.caps.psi(), self.caps.mamv());
        let mut state = self.state.lock();
        self.flush_write_buffer_locked()?;
        self.invalidate_iotlb_locked(&mut state, scope)
    }

    /// Invalidates every IOTLB entry of `did` and waits for completion.
    ///
    /// Errors: as for [`Vtd::flush_range`].
    pub fn flush_domain(&self, did: DomainId) -> Result<()> {
        if mutant::SKIP_IOTLB_FLUSH {
            return Ok(());
        }
        let mut state = self.state.lock();
        self.flush_write_buffer_locked()?;
        self.invalidate_iotlb_locked(&mut state, IotlbScope::Domain(did))
    }

    /// In caching mode (CAP.CM), invalidates the IOTLB entries of `did` over `range`, which
    /// has just been mapped: the unit may have cached them as not present. A no-op when CM is
    /// clear, where no unit caches not-present entries.
    ///
    /// Errors: as for [`Vtd::flush_range`].
    pub fn flush_mapped(&self, did: DomainId, range: AddrRange<Iova>) -> Result<()> {
        if !self.caps.caching_mode() || mutant::SKIP_MAP_FLUSH {
            return Ok(());
        }
        self.stats.after_map.fetch_add(1, Ordering::Relaxed);
        let scope = inval::iotlb_scope(did, range, self.caps.psi(), self.caps.mamv());
        let mut state = self.state.lock();
        self.flush_write_buffer_locked()?;
        self.invalidate_iotlb_locked(&mut state, scope)
    }

    /// Fault injection: the next `n` IOTLB invalidations are issued corrupted, so that the
    /// unit rejects them the way it rejects a malformed request (queued: a descriptor of a
    /// reserved type, which sets FSTS.IQE; register-based: a reserved granularity, which the
    /// unit answers with IAIG = 0). Each then fails with [`Error::InvalidationFailed`] as a
    /// real failure would, and the driver recovers the queue. For tests of the error paths
    /// above the driver; costs an invalidation one relaxed load otherwise.
    pub fn inject_invalidation_failures(&self, n: u32) {
        self.inject.store(n, Ordering::Relaxed);
    }

    /// Flushes the unit's write buffer when CAP.RWBF asks for it (after table updates, before
    /// the unit may walk them); a no-op otherwise.
    ///
    /// Errors: [`Error::BadState`] on timeout.
    pub fn flush_write_buffer(&self) -> Result<()> {
        let _state = self.state.lock();
        self.flush_write_buffer_locked()
    }

    // ---- faults -----------------------------------------------------------------------------

    /// Takes the oldest pending primary fault record, clearing it so the unit can record the
    /// next fault from that source; `None` when no fault is pending. Also clears the overflow
    /// flag once the records are drained.
    pub fn take_fault(&self) -> Option<Fault> {
        let status = self.r32(regs::FSTS);
        if status & fsts::PPF == 0 {
            if status & fsts::PFO != 0 {
                self.w32(regs::FSTS, fsts::PFO);
            }
            return None;
        }
        let records = self.caps.fault_records();
        let first = (status >> fsts::FRI_SHIFT) & 0xff;
        for k in 0..records {
            let at = self.caps.fault_record_offset() + u64::from((first + k) % records) * 16;
            let words = [self.r64(at), self.r64(at + 8)];
            if let Some(f) = fault::decode(words) {
                // F is bit 127: bit 31 of the record's last dword; writing 1 clears it.
                self.w32(at + 12, 1 << 31);
                return Some(f);
            }
        }
        None
    }

    // ---- internals --------------------------------------------------------------------------

    fn context_table<'s>(&self, state: &'s mut State, bus: u8) -> Result<&'s TablePage> {
        let slot = &mut state.context[usize::from(bus)];
        if slot.is_none() {
            let table = self.platform.alloc_table_page()?;
            self.clean(table.kva(), PAGE_SIZE);
            // A bus without a context table has a not-present root entry, which no unit caches
            // (outside caching mode, and attach invalidates the context cache anyway).
            let written =
                self.write_entry(&self.root, usize::from(bus), entry::root_entry(table.pa()), bus.into());
            if let Err(e) = written {
                // SAFETY: the page was never published (its root entry was not written), so
                // the unit cannot reach it; it came from `alloc_table_page` and is freed once.
                unsafe { self.platform.free_table_page(table) };
                return Err(e);
            }
            *slot = Some(table);
        }
        slot.as_ref().ok_or(Error::BadState { what: "VT-d context table slot empty after install" })
    }

    /// Makes entry `index` (a 128-bit slot) of `table` present with `words`: word 1 first,
    /// then word 0 (which holds the present bit), then written back if walks are not coherent.
    fn write_entry(&self, table: &TablePage, index: usize, words: [u64; 2], what: u64) -> Result<()> {
        if entry_word(table, 2 * index) & entry::PRESENT != 0 {
            return Err(Error::AlreadyMapped { addr: what });
        }
        store_word(table, 2 * index + 1, words[1]);
        store_word(table, 2 * index, words[0]);
        self.clean(entry_kva(table, 2 * index), 16);
        Ok(())
    }

    fn clean(&self, kva: KernVa, len: u64) {
        if !self.caps.coherent() {
            self.platform.cache_clean(kva, len);
        }
    }

    fn flush_write_buffer_locked(&self) -> Result<()> {
        if !self.caps.rwbf() {
            return Ok(());
        }
        self.stats.write_buffer.fetch_add(1, Ordering::Relaxed);
        self.one_shot(gcmd::WBF, |gsts| gsts & gcmd::WBF == 0, "write-buffer flush (GCMD.WBF)")
    }

    fn invalidate_context_locked(&self, state: &mut State, scope: ContextScope) -> Result<()> {
        self.stats.context.fetch_add(1, Ordering::Relaxed);
        let domain = match scope {
            ContextScope::Global => 0,
            ContextScope::Device(did, _) => did.0.into(),
        };
        let r = match state.queue.as_mut() {
            Some(q) => self.submit(q, inval::context_desc(scope), domain),
            None => {
                self.w64(regs::CCMD, inval::ccmd_value(scope));
                self.poll_invalidation("VT-d context-cache invalidation timed out (CCMD.ICC)", domain, || {
                    self.r64(regs::CCMD) & regs::ccmd::ICC == 0
                })
                .and_then(|()| {
                    let ccmd = self.r64(regs::CCMD);
                    if (ccmd >> regs::ccmd::CAIG_SHIFT) & 0b11 == 0 {
                        return Err(Error::InvalidationFailed {
                            what: "VT-d refused a context-cache invalidation (CAIG = 0)",
                            domain,
                            status: ccmd,
                        });
                    }
                    Ok(())
                })
            }
        };
        if r.is_err() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn invalidate_iotlb_locked(&self, state: &mut State, scope: IotlbScope) -> Result<()> {
        let counter = match scope {
            IotlbScope::Global => &self.stats.iotlb_global,
            IotlbScope::Domain(_) => &self.stats.iotlb_domain,
            IotlbScope::Pages { .. } => &self.stats.iotlb_page,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let drain = Drain { reads: self.caps.drain_reads(), writes: self.caps.drain_writes() };
        let domain = match scope {
            IotlbScope::Global => 0,
            IotlbScope::Domain(did) | IotlbScope::Pages { did, .. } => did.0.into(),
        };
        let corrupt = self.take_injection();
        let r = match state.queue.as_mut() {
            Some(q) => {
                // A reserved descriptor type (0): the unit must reject it with IQE.
                let desc = if corrupt { [0, 0] } else { inval::iotlb_desc(scope, drain) };
                self.submit(q, desc, domain)
            }
            None => {
                let (iva, mut cmd) = inval::iotlb_registers(scope, drain);
                if corrupt {
                    // Granularity 0 is reserved: the unit answers IAIG = 0.
                    cmd &= !(0b11 << 60);
                }
                let pair = self.caps.iotlb_offset();
                if matches!(scope, IotlbScope::Pages { .. }) {
                    self.w64(pair + regs::IVA_IN_IOTLB_PAIR, iva);
                }
                self.w64(pair + regs::IOTLB_IN_IOTLB_PAIR, cmd);
                self.poll_invalidation("VT-d IOTLB invalidation timed out (IOTLB.IVT)", domain, || {
                    self.r64(pair + regs::IOTLB_IN_IOTLB_PAIR) & regs::iotlb::IVT == 0
                })
                .and_then(|()| {
                    let v = self.r64(pair + regs::IOTLB_IN_IOTLB_PAIR);
                    if (v >> regs::iotlb::IAIG_SHIFT) & 0b11 == 0 {
                        return Err(Error::InvalidationFailed {
                            what: "VT-d refused an IOTLB invalidation (IAIG = 0)",
                            domain,
                            status: v,
                        });
                    }
                    Ok(())
                })
            }
        };
        if r.is_err() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Whether to corrupt this invalidation (fault injection): takes one from the count.
    #[inline]
    fn take_injection(&self) -> bool {
        self.inject.load(Ordering::Relaxed) != 0
            && self.inject.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }

    /// Queues `desc` and a wait descriptor, rings the tail doorbell and waits until the unit
    /// has written the wait's status: then `desc` has completed. `domain` names the domain
    /// the request is about, for the error.
    ///
    /// Errors ([`Error::InvalidationFailed`]):
    /// - the unit reported an invalidation queue error (FSTS.IQE): it stopped at the
    ///   descriptor it rejected, IQH pointing at it. The driver overwrites that slot with a
    ///   wait descriptor whose status write goes to a scratch word, clears IQE and rings the
    ///   doorbell again, so the unit drains the rest and the queue is usable (and empty) again;
    /// - an invalidation completion or time-out error (FSTS.ICE/ITE, device-TLB requests this
    ///   driver never issues): cleared, reported;
    /// - no status write within the poll bound (a time-out): the descriptors stay queued and
    ///   may still complete; later submissions queue behind them (a wait descriptor completes
    ///   only after every earlier descriptor), and fail at once if the ring has no room left.
    fn submit(&self, q: &mut Queue, desc: [u64; 2], domain: u64) -> Result<()> {
        // Free slots: one always stays empty so that head == tail means "empty". Only after a
        // time-out can the ring hold anything between submissions.
        let head = if q.stuck { (self.r64(regs::IQH) >> 4) as u32 % QUEUE_SLOTS } else { q.tail };
        let room = (head + QUEUE_SLOTS - q.tail - 1) % QUEUE_SLOTS;
        if room < 2 {
            return Err(Error::InvalidationFailed {
                what: "VT-d invalidation queue full: earlier descriptors never completed",
                domain,
                status: u64::from(self.r32(regs::FSTS)),
            });
        }
        q.seq = q.seq.wrapping_add(1);
        let status_pa = q.status.pa().raw();
        for words in [desc, inval::wait_desc(status_pa, q.seq)] {
            self.put_descriptor(q, q.tail, words);
            q.tail = (q.tail + 1) % QUEUE_SLOTS;
        }
        // Descriptors must be in memory before the doorbell tells the unit to fetch them.
        self.platform.dma_wmb();
        self.w64(regs::IQT, u64::from(q.tail) << 4);
        let seq = q.seq;
        let status = &q.status;
        const ERRORS: u32 = fsts::IQE | fsts::ICE | fsts::ITE;
        q.stuck = true;
        self.poll_invalidation("VT-d invalidation wait descriptor timed out", domain, || {
            self.r32(regs::FSTS) & ERRORS != 0 || entry_word(status, 0) as u32 == seq
        })?;
        q.stuck = false;
        let fsts_now = self.r32(regs::FSTS);
        if fsts_now & fsts::IQE != 0 {
            self.recover_queue(q);
            return Err(Error::InvalidationFailed {
                what: "VT-d invalidation queue error (FSTS.IQE): the unit rejected a descriptor",
                domain,
                status: fsts_now.into(),
            });
        }
        if fsts_now & (fsts::ICE | fsts::ITE) != 0 {
            self.w32(regs::FSTS, fsts_now & (fsts::ICE | fsts::ITE));
            return Err(Error::InvalidationFailed {
                what: "VT-d invalidation completion or time-out error (FSTS.ICE/ITE)",
                domain,
                status: fsts_now.into(),
            });
        }
        // Reads of data the invalidation protects must not move before the status read.
        self.platform.dma_rmb();
        Ok(())
    }

    /// Writes one descriptor into `slot` of the ring (written back if walks are not coherent:
    /// the unit reads the queue like its tables).
    fn put_descriptor(&self, q: &Queue, slot: u32, words: [u64; 2]) {
        let slot = slot as usize;
        store_word(&q.ring, 2 * slot, words[0]);
        store_word(&q.ring, 2 * slot + 1, words[1]);
        self.clean(entry_kva(&q.ring, 2 * slot), 16);
    }

    /// After FSTS.IQE: replaces the rejected descriptor (at IQH) by a wait descriptor that
    /// writes a scratch word, clears IQE, rings the doorbell again and waits (bounded) until
    /// the unit has drained the ring. Nothing that was queued behind the rejected descriptor is
    /// lost: the unit runs it now.
    #[cold]
    fn recover_queue(&self, q: &mut Queue) {
        self.stats.queue_errors_recovered.fetch_add(1, Ordering::Relaxed);
        let head = (self.r64(regs::IQH) >> 4) as u32 % QUEUE_SLOTS;
        // Word 1 of the status page: scratch, never polled.
        let scratch = q.status.pa().raw() + 8;
        self.put_descriptor(q, head, inval::wait_desc(scratch, 0));
        self.platform.dma_wmb();
        self.w32(regs::FSTS, fsts::IQE);
        // The unit resumes at IQH once IQE is clear; QEMU's model only when the tail is
        // written again, which hardware ignores when unchanged.
        self.w64(regs::IQT, u64::from(q.tail) << 4);
        let tail = q.tail;
        let _ = self.poll_invalidation("", 0, || {
            (self.r64(regs::IQH) >> 4) as u32 % QUEUE_SLOTS == tail || self.r32(regs::FSTS) & fsts::IQE != 0
        });
    }

    /// Changes one persistent GCMD bit, keeping the others as GSTS reports them, and waits
    /// for GSTS to agree.
    fn set_persistent(&self, bit: u32, on: bool) -> Result<()> {
        let current = self.gsts() & gcmd::PERSISTENT;
        let value = if on { current | bit } else { current & !bit };
        self.w32(regs::GCMD, value);
        self.poll("global command (GCMD)", || (self.gsts() & bit != 0) == on)
    }

    /// Issues one one-shot GCMD command with the persistent bits kept, and waits until
    /// `done(GSTS)`.
    fn one_shot(&self, bit: u32, done: impl Fn(u32) -> bool, what: &'static str) -> Result<()> {
        let current = self.gsts() & gcmd::PERSISTENT;
        self.w32(regs::GCMD, current | bit);
        self.poll(what, || done(self.gsts()))
    }

    /// [`Vtd::poll`] for invalidations: a time-out is [`Error::InvalidationFailed`] naming
    /// `domain`, with FSTS as the status.
    fn poll_invalidation(&self, what: &'static str, domain: u64, done: impl FnMut() -> bool) -> Result<()> {
        self.poll(what, done).map_err(|_| Error::InvalidationFailed {
            what,
            domain,
            status: u64::from(self.r32(regs::FSTS)),
        })
    }

    fn poll(&self, what: &'static str, mut done: impl FnMut() -> bool) -> Result<()> {
        for _ in 0..self.poll_limit.max(1) {
            if done() {
                return Ok(());
            }
            spin_hint();
        }
        Err(Error::BadState { what })
    }

    fn r32(&self, off: u64) -> u32 {
        // SAFETY: by the type invariant `base` is our unit's register block; `off` is one of
        // its 4-aligned registers.
        unsafe { self.platform.mmio_read32(reg(self.base, off)) }
    }

    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as in `r32`.
        unsafe { self.platform.mmio_write32(reg(self.base, off), v) }
    }

    fn r64(&self, off: u64) -> u64 {
        // SAFETY: as in `r32`, 8-aligned.
        unsafe { self.platform.mmio_read64(reg(self.base, off)) }
    }

    fn w64(&self, off: u64, v: u64) {
        // SAFETY: as in `r32`, 8-aligned.
        unsafe { self.platform.mmio_write64(reg(self.base, off), v) }
    }
}

impl<P: Platform> Drop for Vtd<'_, P> {
    /// Leaves the unit blocking every device, never translating nothing: turning translation
    /// off (as the unit was found) would let every device reach all of physical memory, and a
    /// safe drop must not open that (only [`Vtd::disable_translation`], which is `unsafe`,
    /// does).
    ///
    /// - Translation on (the usual case): every root entry is cleared, the write buffer, the
    ///   context cache and the IOTLB are flushed globally, and queued invalidation is turned
    ///   off. From then on every DMA finds no context and is blocked; the context tables and
    ///   the queue are freed. The root table stays allocated (leaked: RTADDR still names it
    ///   and the unit reads it), one page per unit.
    /// - Translation already off (the caller turned it off, `unsafe`ly): queued invalidation
    ///   is turned off and every page is freed, the root table too.
    /// - Anything the unit does not acknowledge: every page it may still read is leaked.
    fn drop(&mut self) {
        let translating = self.gsts() & gcmd::TE != 0;
        if translating {
            let state = self.state.get_mut();
            let present: [bool; BUSES] = core::array::from_fn(|b| state.context[b].is_some());
            for bus in (0..BUSES).filter(|&b| present[b]) {
                // Word 0 first: it holds the present bit.
                store_word(&self.root, 2 * bus, 0);
                store_word(&self.root, 2 * bus + 1, 0);
                self.clean(entry_kva(&self.root, 2 * bus), 16);
            }
            let mut state = self.state.lock();
            let blocked = self
                .flush_write_buffer_locked()
                .and_then(|()| self.invalidate_context_locked(&mut state, ContextScope::Global))
                .and_then(|()| self.invalidate_iotlb_locked(&mut state, IotlbScope::Global));
            drop(state);
            if blocked.is_err() {
                // A cached context may still lead to the context tables: leak everything.
                return;
            }
        }
        let qi_off = self.set_persistent(gcmd::QIE, false);
        let state = self.state.get_mut();
        for page in state.context.iter_mut().filter_map(Option::take) {
            // SAFETY: no root entry points at a context table any more (cleared above and the
            // context cache invalidated, or translation is off), so the unit reads none of
            // them; each came from `alloc_table_page` and is freed once.
            unsafe { self.platform.free_table_page(page) };
        }
        if qi_off.is_err() {
            // The queue may still be read: leak its pages (and the root).
            return;
        }
        for page in state.queue.take().into_iter().flat_map(|q| [q.ring, q.status]) {
            // SAFETY: queued invalidation is off, so the unit reads neither page.
            unsafe { self.platform.free_table_page(page) };
        }
        if !translating {
            // SAFETY: translation is off, so the root table is no longer latched by an
            // enabled unit. The alias is the one handle freed: `self.root` is not used after
            // this drop.
            unsafe { self.platform.free_table_page(self.root.alias()) };
        }
    }
}

fn reg(base: PhysAddr, off: u64) -> PhysAddr {
    PhysAddr::new(base.raw() + off)
}

fn context_index(sid: SourceId) -> u8 {
    if mutant::WRONG_DEVFN { sid.devfn() ^ 1 } else { sid.devfn() }
}

fn entry_word(page: &TablePage, word: usize) -> u64 {
    page.entry(word).map_or(0, |e| e.load(HwOrdering::Acquire))
}

fn store_word(page: &TablePage, word: usize, value: u64) {
    if let Some(e) = page.entry(word) {
        // Release: everything written before (the table an entry points at) is visible to a
        // walker that sees this word.
        e.store(value, HwOrdering::Release);
    }
}

fn entry_kva(page: &TablePage, word: usize) -> KernVa {
    KernVa::new(page.kva().raw() + word as u64 * 8)
}
