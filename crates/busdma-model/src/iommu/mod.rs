//! The model IOMMU: the remapping hardware, in software.
//!
//! # Theory
//!
//! 1. **It walks guest RAM.** A device's request is translated by walking the domain's page
//!    tables in the model's RAM, word by word with atomic loads
//!    ([`HostPlatform::read_phys_u64`]), exactly as hardware does; it never looks at the data
//!    structures of the code that built the tables. The two walkers, `vtd.rs` (Intel VT-d
//!    second level) and `lpae.rs` (Arm VMSAv8-64 stage 1, 4 KiB granule), are written from the
//!    specifications and share no code with busdma's page-table formats, so a misread bit
//!    in either shows as a disagreement.
//! 2. **Contexts.** A device id is attached to one domain: the domain id (the cache tag), the
//!    root table, the format and the input width ([`Context`]). An unattached device faults.
//! 3. **The IOTLB really caches** (`iotlb.rs`): a hit does not walk, so an entry cleared without
//!    an invalidation still translates. Invalidation commands ([`IotlbInvalidator`]) drop
//!    cached pages of a range (probing sets for small ranges, scanning for large ones) or of
//!    a whole domain, and are counted by kind ([`IommuStats`]).
//!    Fault injection ([`ModelIommu::fail_next_invalidations`]) makes the next commands fail
//!    without executing, as a unit whose invalidation queue reported an error: the cached
//!    pages stay.
//!    In *caching mode* ([`IommuConfig::caching_mode`], VT-d CAP.CM = 1) a walk that finds an
//!    entry not present is cached too, and faults until an invalidation drops it: software
//!    must invalidate after mapping ([`IotlbInvalidator::invalidate_mapped`]).
//! 4. **Faults** are returned to the device and recorded in a bounded log (the first
//!    [`IommuConfig::fault_log_entries`] until read; later ones are counted as dropped, like
//!    VT-d's primary fault overflow).
//! 5. **The audit** ([`audit`], optional) checks the invalidation protocol of the software
//!    above against the worst cache the specifications allow.
//! 6. **Cost** (`cost.rs`): each invalidation command, and each map request of an emulated
//!    IOMMU, keeps the calling CPU busy for an assumed hardware latency
//!    ([`IommuConfig::invalidation_latency_ns`], [`IommuConfig::map_latency_ns`]; named
//!    profiles in [`CostProfile`]), counted in [`IommuStats::inv_wait_ns`] and
//!    [`IommuStats::map_wait_ns`].
//! 7. **Coherence index** (module `lci`): on a machine whose cache model is kept coherent by
//!    coherence indexes (parisc, seed 003), each mapping's index, programmed through
//!    [`IotlbInvalidator::set_coherence_index`], names the one CPU alias a transfer snoops; on
//!    every other machine transfers are plain bus accesses (`read_phys` / `write_phys`).
//!
//! # Concurrency
//!
//! Devices translate from any number of threads. The context table is read-mostly (a
//! read-write lock, with a seqlock copy that translations read without locking, `ctxcache.rs`); each IOTLB set has its own spin lock; counters are per CPU slot, bumped
//! without locked instructions by the thread that holds the slot (`cpu::SlotCounters`). An
//! invalidation is complete when the call returns: any walk that read the tables before it
//! started cannot fill the cache afterwards (the generation rule of `iotlb.rs`).

pub mod audit;
mod cost;
mod ctxcache;
mod device_hw;
mod inject;
mod iotlb;
mod lci;
mod lpae;
mod lpae_s2;
mod vtd;
mod walk;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, RwLock};

use busdma::iommu::{CoherenceIndex, DomainId, IotlbInvalidator};
use busdma::{AddrRange, Error, Iova, PAGE_SIZE, PhysAddr, Platform, Result};

use crate::HostPlatform;
use crate::dma::{DeviceId, DmaFault, DmaPort, FaultReason};
pub use audit::{AuditReport, Violation};
pub use cost::{CostProfile, DEFAULT_PROFILE, PROFILES};
pub use inject::INJECTED_STATUS;
use iotlb::Iotlb;
use walk::Walk;
pub use walk::{LeafAttrs, MemoryType};

/// The MAIR the model's Arm stage-1 contexts hold (see `lpae.rs`).
pub const LPAE_MAIR: u64 = lpae::MAIR;

/// What a walk of a device's tables finds for one page ([`ModelIommu::inspect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafInfo {
    /// Physical address of the page.
    pub page: PhysAddr,
    /// The device may read through the walk (the AND over every level).
    pub read: bool,
    /// The device may write through the walk.
    pub write: bool,
    /// The leaf's decoded attributes.
    pub attrs: LeafAttrs,
}

/// IOTLB value of a cached not-present result (caching mode): no page address has bit 63,
/// the rest is the level of the absent entry.
const NOT_PRESENT: u64 = 1 << 63;

/// A page-table format the model IOMMU walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TableFormat {
    /// Intel VT-d second-level tables (39-, 48- or 57-bit input).
    VtdSecondLevel,
    /// Arm VMSAv8-64 stage 1, 4 KiB granule, as an SMMU walks it (25- to 48-bit input).
    ArmLpaeStage1,
    /// Arm VMSAv8-64 stage 2, 4 KiB granule, as an SMMU walks it for a stage-2 STE (31- to
    /// 48-bit input, start level 1 or 0, no concatenation).
    ArmLpaeStage2,
}

/// What a device is attached to: the IOMMU's context (VT-d context entry, SMMU stream table
/// entry plus context descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    /// The domain: the tag of the device's cached translations.
    pub domain: DomainId,
    /// Physical address of the root (start-level) table.
    pub root: PhysAddr,
    /// The table format.
    pub format: TableFormat,
    /// Input-address width in bits (VT-d AGAW; Arm 64 - T0SZ).
    pub input_bits: u32,
    /// Arm only: the device's requests are privileged (SMMU STE.PRIVCFG forcing privileged);
    /// by default they are unprivileged, as PCIe requests arrive.
    pub privileged: bool,
}

impl Context {
    /// A context for `domain` with root `root`, unprivileged requests.
    pub const fn new(domain: DomainId, root: PhysAddr, format: TableFormat, input_bits: u32) -> Self {
        Self { domain, root, format, input_bits, privileged: false }
    }

    /// Levels of the walk, or an error for an input width the format does not have.
    pub fn levels(&self) -> Result<u32> {
        let l = match self.format {
            TableFormat::VtdSecondLevel => vtd::levels(self.input_bits),
            TableFormat::ArmLpaeStage1 => lpae::levels(self.input_bits),
            TableFormat::ArmLpaeStage2 => lpae_s2::levels(self.input_bits),
        };
        l.ok_or(Error::InvalidArgument {
            what: "input width for this table format",
            value: self.input_bits.into(),
        })
    }
}

/// The model IOMMU's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuConfig {
    /// IOTLB entries (rounded up to whole 4-way sets, a power of two of them; 0 disables the
    /// IOTLB).
    pub iotlb_entries: usize,
    /// Fault records kept until read.
    pub fault_log_entries: usize,
    /// Output (host physical) address width: VT-d HAW, SMMU OAS. 32 to 48 bits.
    pub output_bits: u32,
    /// Keep the audit of the software's invalidation protocol (costs a hash-map update per
    /// walk; for tests).
    pub audit: bool,
    /// Time each invalidation command takes to complete, spent spinning on the calling CPU
    /// before it returns ([`HostPlatform::spend_ns`]): the hardware's command-queue round trip
    /// (submission, wait descriptor, completion poll), which the software model otherwise
    /// does not have. 0 by default; benchmarks set it from a [`CostProfile`] to compare
    /// invalidation policies under an assumed hardware cost.
    pub invalidation_latency_ns: u64,
    /// Time each map request takes, spent the same way, in
    /// [`IotlbInvalidator::invalidate_mapped`] (called after every map): the VM exit a
    /// virtual IOMMU's map request costs (virtio-iommu MAP, VT-d caching mode under a
    /// hypervisor). 0 by default, and for every bare-metal profile.
    pub map_latency_ns: u64,
    /// VT-d caching mode (CAP.CM = 1): not-present results are cached as well (theory 3), and
    /// [`IotlbInvalidator::invalidate_mapped`] invalidates the range it is given.
    pub caching_mode: bool,
}

impl Default for IommuConfig {
    fn default() -> Self {
        Self {
            // 1024 entries: the order of IOTLBs in VT-d and SMMU implementations (hundreds to
            // a few thousand entries), large enough that a test's working set stays cached,
            // which is what makes a missing invalidation visible.
            iotlb_entries: 1024,
            // 256: the most fault recording registers VT-d's CAP.NFR can report.
            fault_log_entries: 256,
            // 48 bits: the widest output both formats share without Arm's 52-bit extension.
            output_bits: 48,
            audit: false,
            invalidation_latency_ns: 0,
            map_latency_ns: 0,
            caching_mode: false,
        }
    }
}

/// Counters of the model IOMMU (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuStats {
    /// Page translations requested by devices.
    pub translations: u64,
    /// Translations served by the IOTLB.
    pub iotlb_hits: u64,
    /// Table walks (IOTLB misses).
    pub walks: u64,
    /// Faults raised.
    pub faults: u64,
    /// Faults not recorded because the log was full.
    pub faults_dropped: u64,
    /// Ranged invalidation commands.
    pub inv_range: u64,
    /// ...of which served by probing the sets of each page.
    pub inv_range_probed: u64,
    /// ...of which served by scanning the whole IOTLB (large ranges).
    pub inv_range_scanned: u64,
    /// Whole-domain invalidation commands.
    pub inv_domain: u64,
    /// Invalidations after a map (caching mode only; not counted in `inv_range`).
    pub inv_after_map: u64,
    /// Translations refused by a cached not-present entry (caching mode only).
    pub not_present_hits: u64,
    /// IOTLB entries dropped by invalidations.
    pub iotlb_entries_dropped: u64,
    /// Nanoseconds spent in [`IommuConfig::invalidation_latency_ns`] waits (measured: on a
    /// loaded host a wait may overshoot what was asked).
    pub inv_wait_ns: u64,
    /// Nanoseconds spent in [`IommuConfig::map_latency_ns`] waits (measured likewise).
    pub map_wait_ns: u64,
    /// Invalidation commands failed by fault injection, not executed
    /// ([`ModelIommu::fail_next_invalidations`]; not counted in `inv_range` or `inv_domain`).
    pub inv_failed: u64,
}

/// One counter of [`IommuStats`]: its index in [`Counters`].
#[derive(Clone, Copy)]
enum Stat {
    Translations,
    IotlbHits,
    Walks,
    Faults,
    FaultsDropped,
    InvRangeProbed,
    InvRangeScanned,
    InvDomain,
    InvAfterMap,
    NotPresentHits,
    IotlbEntriesDropped,
    InvWaitNs,
    MapWaitNs,
    InvFailed,
}

/// Number of [`Stat`]s.
const STATS: usize = Stat::InvFailed as usize + 1;

/// The counters: one block per CPU slot, bumped without a locked instruction by the thread
/// holding the slot (`cpu::SlotCounters`). Every translation and every invalidation counts,
/// and a locked add per count would cost the model more than its IOTLB lookup.
type Counters = crate::cpu::SlotCounters<STATS>;

/// The model IOMMU.
pub struct ModelIommu<'m> {
    platform: &'m HostPlatform,
    config: IommuConfig,
    contexts: RwLock<HashMap<DeviceId, Context>>,
    /// A lock-free copy of `contexts` for the translation path (`ctxcache.rs`).
    ctx_cache: ctxcache::ContextCache,
    iotlb: Iotlb,
    faults: Mutex<Vec<DmaFault>>,
    counters: Counters,
    audit: Option<Mutex<audit::Audit>>,
    /// Coherence indexes, on a machine whose cache is kept coherent by them (module `lci`).
    lci: lci::CoherenceIndexes<'m>,
    /// Domain ids handed out to `busdma::device` (`device_hw.rs`).
    domain_ids: Mutex<device_hw::DomainIds>,
    /// Devices passed through untranslated (`device_hw.rs`); disjoint from `contexts`.
    passthrough: Mutex<std::collections::HashSet<DeviceId>>,
    /// Invalidation commands still to fail (fault injection, `inject.rs`).
    fail_invalidations: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its state consistent at each step, so a panic elsewhere
    // (a failing test thread) does not make it unusable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'m> ModelIommu<'m> {
    /// An IOMMU in front of `platform`'s RAM.
    ///
    /// Errors: [`Error::InvalidArgument`] for an output width outside 32..=48 bits.
    pub fn new(platform: &'m HostPlatform, config: IommuConfig) -> Result<Self> {
        if !(32..=48).contains(&config.output_bits) {
            return Err(Error::InvalidArgument {
                what: "IOMMU output width (32..=48 bits)",
                value: config.output_bits.into(),
            });
        }
        Ok(Self {
            platform,
            config,
            contexts: RwLock::new(HashMap::new()),
            ctx_cache: ctxcache::ContextCache::new(),
            iotlb: Iotlb::new(config.iotlb_entries),
            faults: Mutex::new(Vec::new()),
            counters: Counters::new(platform.num_cpus()),
            audit: config.audit.then(|| Mutex::new(audit::Audit::default())),
            lci: lci::CoherenceIndexes::new(platform),
            domain_ids: Mutex::new(device_hw::DomainIds::default()),
            passthrough: Mutex::new(std::collections::HashSet::new()),
            fail_invalidations: AtomicU64::new(0),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &IommuConfig {
        &self.config
    }

    /// The platform whose RAM the IOMMU walks.
    pub fn platform(&self) -> &'m HostPlatform {
        self.platform
    }

    /// IOTLB entries really available.
    pub fn iotlb_capacity(&self) -> usize {
        self.iotlb.capacity()
    }

    /// Attaches `device` to the domain `ctx` describes. The safe way is `busdma::device`
    /// (this IOMMU implements its `IommuHw`), whose handle keeps the contract below.
    ///
    /// Errors: [`Error::InvalidArgument`] (input width not of the format),
    /// [`Error::Misaligned`] (root not 4 KiB-aligned), [`Error::OutOfRange`] (root outside
    /// RAM or beyond the output width), [`Error::AlreadyMapped`] (device already attached,
    /// or passed through: detach first).
    ///
    /// # Safety
    ///
    /// The tables reachable from `ctx.root` must stay allocated, and be written only by the
    /// owner of the domain's page table, until `device` is detached and an invalidation of
    /// `ctx.domain` that started after the detach has completed (issue 14, hole 8: a table
    /// page freed earlier goes to the next domain, and the stale device reads its data).
    pub unsafe fn attach(&self, device: DeviceId, ctx: Context) -> Result<()> {
        ctx.levels()?;
        if !ctx.root.is_aligned(PAGE_SIZE) {
            return Err(Error::Misaligned { value: ctx.root.raw(), align: PAGE_SIZE });
        }
        let ram = self.platform.ram();
        if !ram.contains(ctx.root) || ctx.root.raw() >> self.config.output_bits != 0 {
            return Err(Error::OutOfRange { addr: ctx.root.raw(), limit: ram.end().raw() });
        }
        let mut c = self.contexts.write().unwrap_or_else(|e| e.into_inner());
        if c.contains_key(&device) || lock(&self.passthrough).contains(&device) {
            return Err(Error::AlreadyMapped { addr: device.into() });
        }
        c.insert(device, ctx);
        self.ctx_cache.attached(device, &ctx);
        Ok(())
    }

    /// Detaches `device`; returns its context.
    ///
    /// Errors: [`Error::NotMapped`] if it is not attached.
    pub fn detach(&self, device: DeviceId) -> Result<Context> {
        let mut c = self.contexts.write().unwrap_or_else(|e| e.into_inner());
        self.ctx_cache.detached(device);
        c.remove(&device).ok_or(Error::NotMapped { addr: device.into() })
    }

    /// The context `device` is attached to.
    pub fn context(&self, device: DeviceId) -> Option<Context> {
        if let Some(c) = self.ctx_cache.get(device) {
            return Some(c);
        }
        self.contexts.read().unwrap_or_else(|e| e.into_inner()).get(&device).copied()
    }

    /// The DMA port of `device`: its reads and writes go through this IOMMU.
    pub fn port(&self, device: DeviceId) -> IommuPort<'_, 'm> {
        IommuPort { iommu: self, device }
    }

    /// Translates the page of `iova` for a `write` (or read) by `device`: the physical
    /// address of the byte. A refusal is recorded in the fault log.
    pub fn translate(
        &self,
        device: DeviceId,
        iova: Iova,
        write: bool,
    ) -> core::result::Result<PhysAddr, DmaFault> {
        self.bump(Stat::Translations, 1);
        match self.translate_page(device, iova.raw(), write) {
            Ok(page) => Ok(PhysAddr::new(page | iova.page_offset())),
            Err(reason) => Err(self.fault(DmaFault { device, iova, write, reason })),
        }
    }

    /// Walks `device`'s tables for the page of `iova` as the hardware would, without the
    /// IOTLB, the fault log or the counters: what a test compares a built entry against.
    pub fn inspect(&self, device: DeviceId, iova: Iova) -> core::result::Result<LeafInfo, FaultReason> {
        let ctx = self.context(device).ok_or(FaultReason::NotAttached)?;
        if ctx.input_bits < 64 && iova.raw() >> ctx.input_bits != 0 {
            return Err(FaultReason::BeyondInputWidth { input_bits: ctx.input_bits });
        }
        let w = self.walk(&ctx, iova.raw())?;
        Ok(LeafInfo { page: w.page, read: w.read, write: w.write, attrs: w.attrs })
    }

    fn translate_page(
        &self,
        device: DeviceId,
        iova: u64,
        write: bool,
    ) -> core::result::Result<u64, FaultReason> {
        let Some(ctx) = self.context(device) else {
            // Pass-through is rare and its devices never fault: looked up off the fast path.
            if lock(&self.passthrough).contains(&device) {
                return Ok(iova & !(PAGE_SIZE - 1));
            }
            return Err(FaultReason::NotAttached);
        };
        if ctx.input_bits < 64 && iova >> ctx.input_bits != 0 {
            return Err(FaultReason::BeyondInputWidth { input_bits: ctx.input_bits });
        }
        let page_number = iova >> 12;
        let key = iotlb::key(ctx.domain, page_number);
        let cached = match self.iotlb.lookup(key) {
            Some(c) if c & NOT_PRESENT != 0 => {
                self.bump(Stat::NotPresentHits, 1);
                return Err(FaultReason::NotPresent { level: (c & !NOT_PRESENT) as u32 });
            }
            Some(c) => {
                self.bump(Stat::IotlbHits, 1);
                c
            }
            None => {
                self.bump(Stat::Walks, 1);
                let generation = self.iotlb.generation();
                let w = match self.walk(&ctx, iova) {
                    Ok(w) => w,
                    Err(FaultReason::NotPresent { level }) if self.config.caching_mode => {
                        self.iotlb.fill(key, NOT_PRESENT | u64::from(level), generation);
                        return Err(FaultReason::NotPresent { level });
                    }
                    Err(e) => return Err(e),
                };
                let c = w.page.raw() | u64::from(w.read) | (u64::from(w.write) << 1);
                if let Some(a) = &self.audit {
                    let mut a = lock(a);
                    if self.iotlb.generation() == generation {
                        a.fill(ctx.domain, page_number, &w);
                    }
                }
                self.iotlb.fill(key, c, generation);
                c
            }
        };
        let allowed = if write { cached & 2 != 0 } else { cached & 1 != 0 };
        if !allowed {
            return Err(FaultReason::Permission);
        }
        Ok(cached & !(PAGE_SIZE - 1))
    }

    fn walk(&self, ctx: &Context, iova: u64) -> core::result::Result<Walk, FaultReason> {
        let mem = |pa: u64| self.platform.read_phys_u64(PhysAddr::new(pa)).ok();
        let root = ctx.root.raw();
        let out = self.config.output_bits;
        match ctx.format {
            TableFormat::VtdSecondLevel => {
                let levels = vtd::levels(ctx.input_bits)
                    .ok_or(FaultReason::BeyondInputWidth { input_bits: ctx.input_bits })?;
                vtd::walk(&mem, root, levels, iova, out)
            }
            TableFormat::ArmLpaeStage1 => lpae::walk(&mem, root, ctx.input_bits, iova, out, ctx.privileged),
            TableFormat::ArmLpaeStage2 => lpae_s2::walk(&mem, root, ctx.input_bits, iova, out),
        }
    }

    fn fault(&self, f: DmaFault) -> DmaFault {
        self.bump(Stat::Faults, 1);
        let mut log = lock(&self.faults);
        if log.len() < self.config.fault_log_entries {
            log.push(f);
        } else {
            self.bump(Stat::FaultsDropped, 1);
        }
        f
    }

    /// The fault records, oldest first, without clearing them.
    pub fn faults(&self) -> Vec<DmaFault> {
        lock(&self.faults).clone()
    }

    /// Reads and clears the fault records (making room for new ones).
    pub fn take_faults(&self) -> Vec<DmaFault> {
        std::mem::take(&mut *lock(&self.faults))
    }

    /// The counters.
    pub fn stats(&self) -> IommuStats {
        let c = |s: Stat| self.counters.sum(s as usize);
        let (probed, scanned) = (c(Stat::InvRangeProbed), c(Stat::InvRangeScanned));
        IommuStats {
            translations: c(Stat::Translations),
            iotlb_hits: c(Stat::IotlbHits),
            walks: c(Stat::Walks),
            faults: c(Stat::Faults),
            faults_dropped: c(Stat::FaultsDropped),
            // Every ranged command is either probed or scanned: one count, not two.
            inv_range: probed + scanned,
            inv_range_probed: probed,
            inv_range_scanned: scanned,
            inv_domain: c(Stat::InvDomain),
            inv_after_map: c(Stat::InvAfterMap),
            not_present_hits: c(Stat::NotPresentHits),
            iotlb_entries_dropped: c(Stat::IotlbEntriesDropped),
            inv_wait_ns: c(Stat::InvWaitNs),
            map_wait_ns: c(Stat::MapWaitNs),
            inv_failed: c(Stat::InvFailed),
        }
    }

    #[inline]
    fn bump(&self, s: Stat, n: u64) {
        self.counters.add(self.platform.cpu_slots(), s as usize, n);
    }

    /// The line programmed for [`CoherenceIndex::Untouched`] mappings, on a machine whose cache
    /// is kept coherent by coherence indexes.
    pub fn untouched_line(&self) -> Option<busdma::KernVa> {
        self.lci.untouched()
    }

    /// The snoop of a transfer by `device` at `iova` (reaching `pa`): its mapping's coherence index on a
    /// coherence-index machine, the machine's default otherwise (`None`).
    fn snoop(&self, device: DeviceId, iova: Iova, pa: PhysAddr) -> Option<crate::cache::Snoop> {
        self.lci.untouched()?;
        self.lci.snoop(self.context(device)?.domain, iova, pa)
    }

    /// The audit's findings, if the audit is on.
    pub fn audit_report(&self) -> Option<AuditReport> {
        self.audit.as_ref().map(|a| lock(a).report())
    }

    /// Pages `first..=last` of a range.
    fn pages(range: AddrRange<Iova>) -> (u64, u64) {
        (range.start().raw() >> 12, (range.end().raw() - 1) >> 12)
    }

    /// Spends [`IommuConfig::invalidation_latency_ns`] on the calling CPU.
    #[inline]
    fn command_latency(&self) {
        let ns = self.config.invalidation_latency_ns;
        if ns > 0 {
            let waited = self.platform.spend_ns(ns);
            self.bump(Stat::InvWaitNs, waited);
        }
    }

    /// Spends [`IommuConfig::map_latency_ns`] on the calling CPU.
    #[inline]
    fn map_latency(&self) {
        let ns = self.config.map_latency_ns;
        if ns > 0 {
            let waited = self.platform.spend_ns(ns);
            self.bump(Stat::MapWaitNs, waited);
        }
    }

    /// A ranged invalidation's work: waits its latency, drops the cached pages of `range`.
    /// Returns whether it probed the pages' sets (else it scanned the whole IOTLB).
    fn drop_range(&self, domain: DomainId, range: AddrRange<Iova>) -> bool {
        self.command_latency();
        let generation = self.iotlb.bump_generation();
        let (first, last) = Self::pages(range);
        self.with_audit(|a| {
            a.invalidate(domain, Some((first, last)), generation, self.platform.monotonic_ns())
        });
        let probed = last - first < self.iotlb.sets() as u64;
        let dropped = if probed {
            self.iotlb.probe_out(domain, first, last)
        } else {
            self.iotlb.scan_out(domain, first, last)
        };
        if dropped > 0 {
            self.bump(Stat::IotlbEntriesDropped, dropped);
        }
        probed
    }

    /// [`IotlbInvalidator::invalidate_mapped`]'s work: the map latency, and in caching mode
    /// the drop of what the IOTLB may hold for `range`.
    #[inline(never)]
    fn after_map(&self, domain: DomainId, range: AddrRange<Iova>) {
        self.map_latency();
        if self.config.caching_mode {
            self.bump(Stat::InvAfterMap, 1);
            self.drop_range(domain, range);
        }
    }

    /// [`IotlbInvalidator::audit_unmapped`] with the audit on.
    #[inline(never)]
    fn audit_unmapped_slow(&self, domain: DomainId, ranges: &[AddrRange<Iova>]) {
        self.with_audit(|a| {
            let pages = ranges.iter().map(|&r| Self::pages(r));
            a.unmapped(domain, pages, self.platform.monotonic_ns(), self.iotlb.generation());
        });
    }

    #[inline]
    fn with_audit(&self, f: impl FnOnce(&mut audit::Audit)) {
        if let Some(a) = &self.audit {
            f(&mut lock(a));
        }
    }
}

impl IotlbInvalidator for ModelIommu<'_> {
    fn invalidate_range(&self, domain: DomainId, range: AddrRange<Iova>) -> Result<()> {
        self.injected_failure(domain)?;
        let probed = self.drop_range(domain, range);
        self.bump(if probed { Stat::InvRangeProbed } else { Stat::InvRangeScanned }, 1);
        Ok(())
    }

    // This hook, `set_coherence_index` and the `audit_*` hooks are inlined across crates:
    // without caching mode, coherence indexes or the audit each is a load and a branch on
    // every map and unmap.
    // The common case (no map latency, no caching mode) is tested first and the rest kept out
    // of line, so the hook stays small enough to inline into every map path.
    #[inline]
    fn invalidate_mapped(&self, domain: DomainId, range: AddrRange<Iova>) -> Result<()> {
        if self.config.map_latency_ns != 0 || self.config.caching_mode {
            self.after_map(domain, range);
        }
        Ok(())
    }

    fn invalidate_all(&self, domain: DomainId) -> Result<()> {
        self.injected_failure(domain)?;
        self.command_latency();
        self.bump(Stat::InvDomain, 1);
        let generation = self.iotlb.bump_generation();
        self.with_audit(|a| a.invalidate(domain, None, generation, self.platform.monotonic_ns()));
        let dropped = self.iotlb.scan_out(domain, 0, u64::MAX);
        if dropped > 0 {
            self.bump(Stat::IotlbEntriesDropped, dropped);
        }
        Ok(())
    }

    #[inline]
    fn set_coherence_index(&self, domain: DomainId, range: AddrRange<Iova>, index: CoherenceIndex) {
        if self.lci.untouched().is_none() {
            return;
        }
        // The table of the domain, as any device attached to it sees it.
        let ctx = self
            .contexts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|c| c.domain == domain)
            .copied();
        self.lci.set(domain, range, index, |iova| {
            let w = self.walk(ctx.as_ref()?, iova.raw()).ok()?;
            Some(w.page)
        });
    }

    #[inline]
    fn audit_unmapped(&self, domain: DomainId, ranges: &[AddrRange<Iova>]) {
        if self.audit.is_some() {
            self.audit_unmapped_slow(domain, ranges);
        }
    }

    #[inline]
    fn audit_iova_released(&self, domain: DomainId, range: AddrRange<Iova>) {
        let (first, last) = Self::pages(range);
        self.with_audit(|a| a.released_iova(domain, first, last));
    }

    #[inline]
    fn audit_table_page_released(&self, domain: DomainId, page: PhysAddr) {
        self.with_audit(|a| a.released_table_page(domain, page));
    }

    #[inline]
    fn audit_mapping(&self, domain: DomainId, range: AddrRange<Iova>) {
        let (first, last) = Self::pages(range);
        self.with_audit(|a| a.mapping(domain, first, last));
    }
}

/// A device behind the model IOMMU.
#[derive(Clone, Copy)]
pub struct IommuPort<'a, 'm> {
    iommu: &'a ModelIommu<'m>,
    device: DeviceId,
}

impl IommuPort<'_, '_> {
    /// The device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// Runs `copy(iova, pa, offset, len)` over each page-sized piece of `[bus, bus + len)`,
    /// translating each; stops at the first fault.
    fn each_piece(
        &self,
        bus: Iova,
        len: usize,
        write: bool,
        mut copy: impl FnMut(Iova, PhysAddr, usize, usize) -> Result<()>,
    ) -> core::result::Result<(), DmaFault> {
        let mut done = 0usize;
        while done < len {
            let iova = match bus.checked_add(done as u64) {
                Some(a) => a,
                None => {
                    let reason = FaultReason::BeyondInputWidth { input_bits: 64 };
                    return Err(self.iommu.fault(DmaFault { device: self.device, iova: bus, write, reason }));
                }
            };
            let piece = (PAGE_SIZE - iova.page_offset()).min((len - done) as u64) as usize;
            let pa = self.iommu.translate(self.device, iova, write)?;
            if copy(iova, pa, done, piece).is_err() {
                let reason = FaultReason::NoMemory { pa: pa.raw() };
                return Err(self.iommu.fault(DmaFault { device: self.device, iova, write, reason }));
            }
            done += piece;
        }
        Ok(())
    }
}

impl DmaPort for IommuPort<'_, '_> {
    fn dma_read(&self, bus: Iova, buf: &mut [u8]) -> core::result::Result<(), DmaFault> {
        let p = self.iommu.platform;
        let len = buf.len();
        self.each_piece(bus, len, false, |iova, pa, off, n| match self.iommu.snoop(self.device, iova, pa) {
            Some(snoop) => p.bus_read(pa, &mut buf[off..off + n], snoop),
            None => p.read_phys(pa, &mut buf[off..off + n]),
        })
    }

    fn dma_write(&self, bus: Iova, data: &[u8]) -> core::result::Result<(), DmaFault> {
        let p = self.iommu.platform;
        self.each_piece(bus, data.len(), true, |iova, pa, off, n| {
            match self.iommu.snoop(self.device, iova, pa) {
                Some(snoop) => p.bus_write(pa, &data[off..off + n], snoop),
                None => p.write_phys(pa, &data[off..off + n]),
            }
        })
    }
}

#[cfg(test)]
mod tests;
