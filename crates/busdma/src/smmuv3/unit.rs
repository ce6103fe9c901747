//! The SMMU: probe, stream table, context descriptors, ASIDs, the command queue with its
//! error repair, the event queue. See the module theory in `smmuv3/mod.rs`.

use core::sync::atomic::Ordering as HwOrdering;

use crate::addr::{AddrRange, Iova, PAGE_SHIFT, PAGE_SIZE, PhysAddr};
use crate::error::{Error, Result};
use crate::platform::{Platform, TablePage};
use crate::sync::{AtomicU32, AtomicU64, Ordering, SpinLock, spin_hint};

use super::caps::Capabilities;
use super::cmd::{self, Command};
use super::entry::{self, ContextDescriptor, STE_WORDS, Stage2Config, SteConfig, SteKind};
use super::event::Fault;
use super::mutant;
use super::regs::{self, cerror, cr0, gerror};

/// Default polls of CMDQ_CONS before a command is declared stuck (as VT-d's: 2^24 MMIO
/// reads, well over a second on hardware; QEMU completes every command before the first).
pub const DEFAULT_POLL_LIMIT: u32 = 1 << 24;
/// Commands in the one-page command queue: 4096 / 16.
const CMDQ_LOG2: u32 = 8;
/// Records in the one-page event queue: 4096 / 32.
const EVTQ_LOG2: u32 = 7;
/// Linear stream tables are one page: 64 STEs, StreamIDs below 2^6.
const LINEAR_SID_BITS: u32 = 6;
/// Level-1 tables are one page: 512 descriptors of 8 bytes, so 2^(9 + 6) StreamIDs.
const L1_ENTRIES: usize = 512;
/// ASIDs the driver can track: 2^16.
const MAX_ASIDS: usize = 1 << 16;
/// Above this many pages (without range invalidation) a ranged invalidation becomes one
/// TLBI_NH_ASID: 256 commands fill the queue.
const MAX_VA_COMMANDS: u64 = 64;

/// Which stream-table format to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StreamTableChoice {
    /// 2-level when IDR0.ST_LEVEL offers it, linear otherwise.
    #[default]
    Auto,
    /// Linear: one page of 64 STEs (StreamIDs below 64).
    Linear,
    /// 2-level: a one-page L1 table of 512 descriptors, one-page L2 tables of 64 STEs
    /// allocated on first attach (StreamIDs below 2^15, or IDR1.SIDSIZE if smaller).
    TwoLevel,
}

/// The stream-table format in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamTableFormat {
    /// One table of STEs.
    Linear,
    /// L1 descriptors pointing at L2 tables of STEs.
    TwoLevel,
}

/// Driver settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmmuConfig {
    /// Stream-table format.
    pub stream_table: StreamTableChoice,
    /// Polls of CMDQ_CONS (or CR0ACK) before a wait is declared stuck.
    pub poll_limit: u32,
    /// Input (IOVA) width of the stage-1 tables of domains made through `busdma::device`
    /// (its `IommuHw::input_bits`): 39 or 48. [`Smmu::attach`] takes the width per stream.
    pub input_bits: u32,
}

impl Default for SmmuConfig {
    fn default() -> Self {
        Self { stream_table: StreamTableChoice::Auto, poll_limit: DEFAULT_POLL_LIMIT, input_bits: 48 }
    }
}

/// Counts of what the driver asked the SMMU to do.
#[derive(Debug, Default)]
pub struct SmmuStats {
    /// Commands submitted (CMD_SYNC included).
    pub commands: AtomicU64,
    /// CMD_SYNCs waited for.
    pub syncs: AtomicU64,
    /// TLBI_NH_VA commands.
    pub tlbi_va: AtomicU64,
    /// TLBI_NH_ASID commands.
    pub tlbi_asid: AtomicU64,
    /// CFGI_STE and CFGI_CD commands.
    pub cfgi: AtomicU64,
    /// TLBI_S2_IPA and TLBI_S12_VMALL commands (stage 2).
    pub tlbi_s2: AtomicU64,
    /// Submissions that failed (command errors, time-outs).
    pub failed: AtomicU64,
    /// Command-queue errors the queue was repaired from.
    pub queue_errors_recovered: AtomicU64,
}

/// A queue in one page: the ring, the producer or consumer index the driver owns (with the
/// wrap bit at `log2`).
struct Queue {
    ring: TablePage,
    log2: u32,
    /// CMDQ: next PROD; EVTQ: current CONS.
    index: u32,
    /// CMDQ only: the last submission timed out, commands may still be queued.
    stuck: bool,
}

impl Queue {
    fn slot(&self, index: u32) -> usize {
        (index & ((1 << self.log2) - 1)) as usize
    }
    fn advance(&self, index: u32) -> u32 {
        (index + 1) & ((2 << self.log2) - 1)
    }
}

struct State {
    /// 2-level: the L2 table of each L1 descriptor written.
    l2: [Option<TablePage>; L1_ENTRIES],
    /// The CD page of each stage-1 stream (StreamID, page).
    cds: alloc::vec::Vec<(u32, TablePage)>,
    cmdq: Queue,
    evtq: Queue,
    /// ASIDs in use, one bit each (0 is never handed out).
    asids: alloc::boxed::Box<[u64; MAX_ASIDS / 64]>,
    /// VMIDs in use (stage 2), likewise.
    vmids: alloc::boxed::Box<[u64; MAX_ASIDS / 64]>,
}

/// One Arm SMMUv3, stage 1.
///
/// # Invariants
///
/// - `base` is the register block of an SMMUv3 this value owns exclusively.
/// - `strtab` is the table STRTAB_BASE points at: the linear STE page, or the L1 page whose
///   valid descriptors point at the pages in `state.l2`.
/// - Every submission has completed (CONS reached PROD) when `state`'s lock is released,
///   unless it timed out (`stuck`).
pub struct Smmu<'p, P: Platform> {
    platform: &'p P,
    base: PhysAddr,
    caps: Capabilities,
    format: StreamTableFormat,
    sid_bits: u32,
    poll_limit: u32,
    input_bits: u32,
    strtab: TablePage,
    state: SpinLock<State>,
    stats: SmmuStats,
    inject: AtomicU32,
}

impl<'p, P: Platform> Smmu<'p, P> {
    /// Probes the SMMU at `base` (IDR0-5, refusing what the driver cannot drive), turns it
    /// off if it was on, installs an empty stream table (linear: every STE abort; 2-level: no
    /// L1 descriptor valid), the command and event queues, enables both queues and
    /// invalidates every cached configuration and translation. Translation stays off: attach
    /// streams, then [`Smmu::enable_translation`].
    ///
    /// Errors: [`Error::Unsupported`] (see [`Capabilities::check`]; a linear table asked for
    /// on an SMMU without enough StreamID bits is fine, a 2-level one without ST_LEVEL is
    /// not), [`Error::NoMemory`], [`Error::BadState`] (CR0 never acknowledged),
    /// [`Error::InvalidationFailed`] (the initial invalidation failed).
    ///
    /// # Safety
    ///
    /// `base` must be the register block of an SMMUv3 that nothing else drives while the
    /// returned value lives.
    pub unsafe fn new(platform: &'p P, base: PhysAddr, config: SmmuConfig) -> Result<Self> {
        let r = |off: u64| {
            // SAFETY: the caller hands us the SMMU's register block; ID registers are 32-bit.
            unsafe { platform.mmio_read32(PhysAddr::new(base.raw() + off)) }
        };
        let caps = Capabilities::new(r(regs::IDR0), r(regs::IDR1), r(regs::IDR3), r(regs::IDR5));
        caps.check()?;
        if !matches!(config.input_bits, 39 | 48) {
            return Err(Error::InvalidArgument {
                what: "SMMUv3 stage-1 input width (39 or 48)",
                value: config.input_bits.into(),
            });
        }
        let format = match (config.stream_table, caps.two_level_stream_table()) {
            (StreamTableChoice::Linear, _) | (StreamTableChoice::Auto, false) => StreamTableFormat::Linear,
            (StreamTableChoice::TwoLevel | StreamTableChoice::Auto, true) => StreamTableFormat::TwoLevel,
            (StreamTableChoice::TwoLevel, false) => {
                return Err(Error::Unsupported { what: "2-level stream table (IDR0.ST_LEVEL = 0)" });
            }
        };
        let sid_bits = match format {
            StreamTableFormat::Linear => caps.sid_bits().min(LINEAR_SID_BITS),
            StreamTableFormat::TwoLevel => caps.sid_bits().min(9 + entry::SPLIT),
        };
        let mut pages: [Option<TablePage>; 3] = [None, None, None];
        for p in &mut pages {
            match platform.alloc_table_page() {
                Ok(page) => *p = Some(page),
                Err(e) => {
                    for page in pages.into_iter().flatten() {
                        // SAFETY: the SMMU has not been told about any of these pages.
                        unsafe { platform.free_table_page(page) };
                    }
                    return Err(e);
                }
            }
        }
        let [Some(strtab), Some(cmdq), Some(evtq)] = pages else {
            return Err(Error::BadState { what: "SMMUv3 probe: page allocation" });
        };
        let smmu = Self {
            platform,
            base,
            caps,
            format,
            sid_bits,
            poll_limit: config.poll_limit,
            input_bits: config.input_bits,
            strtab,
            state: SpinLock::new(State {
                l2: [const { None }; L1_ENTRIES],
                cds: alloc::vec::Vec::new(),
                cmdq: Queue { ring: cmdq, log2: CMDQ_LOG2.min(caps.cmdq_max_log2()), index: 0, stuck: false },
                evtq: Queue {
                    ring: evtq,
                    log2: EVTQ_LOG2.min(caps.eventq_max_log2()),
                    index: 0,
                    stuck: false,
                },
                asids: alloc::boxed::Box::new([0; MAX_ASIDS / 64]),
                vmids: alloc::boxed::Box::new([0; MAX_ASIDS / 64]),
            }),
            stats: SmmuStats::default(),
            inject: AtomicU32::new(0),
        };
        // From here on, dropping `smmu` on an error path turns it off and frees the pages.
        smmu.bring_up()?;
        Ok(smmu)
    }

    fn bring_up(&self) -> Result<()> {
        // An SMMU left on (by firmware or an earlier kernel) walks tables that are not ours.
        self.set_cr0(0)?;
        if self.format == StreamTableFormat::Linear {
            for sid in 0..(1u32 << self.sid_bits) {
                write_ste(&self.strtab, sid as usize, entry::ste(SteConfig::Abort));
            }
        }
        self.w32(regs::CR1, regs::CR1_COHERENT_WB);
        // RECINVSID: record an event for StreamIDs beyond the table.
        self.w32(regs::CR2, 1 << 1);
        self.w64(regs::STRTAB_BASE, regs::BASE_RA | self.strtab.pa().raw());
        let cfg = match self.format {
            StreamTableFormat::Linear => self.sid_bits,
            StreamTableFormat::TwoLevel => {
                self.sid_bits | (entry::SPLIT << regs::STRTAB_SPLIT_SHIFT) | regs::STRTAB_FMT_2LVL
            }
        };
        self.w32(regs::STRTAB_BASE_CFG, cfg);
        let mut state = self.state.lock();
        let (c, e) = (&state.cmdq, &state.evtq);
        self.w64(
            regs::CMDQ_BASE,
            regs::BASE_RA | (c.ring.pa().raw() & regs::Q_BASE_ADDR_MASK) | u64::from(c.log2),
        );
        self.w32(regs::CMDQ_PROD, 0);
        self.w32(regs::CMDQ_CONS, 0);
        self.w64(
            regs::EVENTQ_BASE,
            regs::BASE_RA | (e.ring.pa().raw() & regs::Q_BASE_ADDR_MASK) | u64::from(e.log2),
        );
        self.w32(regs::EVENTQ_PROD, 0);
        self.w32(regs::EVENTQ_CONS, 0);
        // Acknowledge every global error left from before.
        let pending = self.gerror();
        self.w32(regs::GERRORN, self.r32(regs::GERRORN) ^ pending);
        self.w32(regs::IRQ_CTRL, 0);
        self.set_cr0(cr0::CMDQEN | cr0::EVENTQEN)?;
        // CFGI_ALL is CFGI_STE_RANGE (0x04) with Range = 31.
        let cfgi_all: Command = [0x04, 31];
        self.submit(&mut state, &[cfgi_all, cmd::tlbi_nsnh_all()], 0)
    }

    // ---- what the SMMU is ------------------------------------------------------------------

    /// The platform.
    pub fn platform(&self) -> &'p P {
        self.platform
    }
    /// The decoded ID registers.
    pub fn caps(&self) -> Capabilities {
        self.caps
    }
    /// The stream-table format in use.
    pub fn stream_table(&self) -> StreamTableFormat {
        self.format
    }
    /// StreamIDs the stream table covers: `0..1 << sid_bits`.
    pub fn sid_bits(&self) -> u32 {
        self.sid_bits
    }
    /// The stage-1 input width of domains made through `busdma::device` ([`SmmuConfig`]).
    pub fn input_bits(&self) -> u32 {
        self.input_bits
    }
    /// Counters.
    pub fn stats(&self) -> &SmmuStats {
        &self.stats
    }
    /// Whether table walks snoop the CPU caches (always true: the probe refuses the rest).
    pub fn coherent(&self) -> bool {
        self.caps.coherent()
    }
    /// Active global errors: GERROR ^ GERRORN (bits of [`regs::gerror`]).
    pub fn gerror(&self) -> u32 {
        (self.r32(regs::GERROR) ^ self.r32(regs::GERRORN)) & gerror::ALL
    }

    // ---- translation on/off ----------------------------------------------------------------

    /// Turns translation on (CR0.SMMUEN): every stream is translated, aborted or bypassed as
    /// its STE says.
    ///
    /// Errors: [`Error::BadState`] if CR0ACK never agrees.
    pub fn enable_translation(&self) -> Result<()> {
        self.set_cr0(cr0::CMDQEN | cr0::EVENTQEN | cr0::SMMUEN)
    }

    /// Turns translation off (streams get GBPA's attribute: bypass by default).
    ///
    /// Errors: [`Error::BadState`] if CR0ACK never agrees.
    ///
    /// # Safety
    ///
    /// With the SMMU off every device behind it bypasses it (GBPA's default; QEMU 7.2 has no
    /// other) and reaches all of physical memory. The caller guarantees that none of them
    /// issues DMA until translation is on again, or that each is trusted with all of memory.
    ///
    /// ```compile_fail,E0133
    /// use busdma::Platform;
    /// use busdma::smmuv3::Smmu;
    /// // Turning the SMMU off without `unsafe` is rejected (E0133): it opens all of memory.
    /// fn open_everything<P: Platform>(smmu: &Smmu<'_, P>) {
    ///     let _ = smmu.disable_translation();
    /// }
    /// ```
    pub unsafe fn disable_translation(&self) -> Result<()> {
        self.set_cr0(cr0::CMDQEN | cr0::EVENTQEN)
    }

    // ---- ASIDs -----------------------------------------------------------------------------

    /// A free ASID (never 0; below 2^16, or 2^8 without IDR0.ASID16).
    ///
    /// Errors: [`Error::Exhausted`].
    pub fn alloc_asid(&self) -> Result<u16> {
        let limit = if self.caps.asid16() { MAX_ASIDS } else { 256 };
        let mut state = self.state.lock();
        take_id(&mut state.asids, limit)
    }

    /// A free VMID for a stage-2 domain (never 0; below 2^16 with IDR0.VMID16, else 2^8).
    ///
    /// Errors: [`Error::Unsupported`] without stage 2 (IDR0.S2P), [`Error::Exhausted`].
    pub fn alloc_vmid(&self) -> Result<u16> {
        if !self.caps.stage2() {
            return Err(Error::Unsupported { what: "SMMUv3 stage 2 (IDR0.S2P = 0)" });
        }
        let limit = if self.caps.vmid16() { MAX_ASIDS } else { 256 };
        let mut state = self.state.lock();
        take_id(&mut state.vmids, limit)
    }

    /// Gives a VMID back. Detach its streams first.
    ///
    /// Errors: [`Error::DoubleFree`] if it is not allocated.
    pub fn free_vmid(&self, vmid: u16) -> Result<()> {
        let mut state = self.state.lock();
        give_id(&mut state.vmids, vmid)
    }

    /// Gives an ASID back. Detach its streams first.
    ///
    /// Errors: [`Error::DoubleFree`] if it is not allocated.
    pub fn free_asid(&self, asid: u16) -> Result<()> {
        let mut state = self.state.lock();
        give_id(&mut state.asids, asid)
    }

    // ---- streams ---------------------------------------------------------------------------

    /// Points stream `sid` at a stage-1 context: a new CD naming `asid`, the table rooted at
    /// `ttb0` with `input_bits` (39 or 48) of input, MAIR = [`ArmLpaeS1::MAIR`]. Order: CD
    /// written, CFGI_CD; STE words 1-7 written while word 0 still says abort, then word 0;
    /// CFGI_STE; TLBI_NH_ASID (nothing cached under the ASID survives); CMD_SYNC.
    ///
    /// Errors: [`Error::InvalidArgument`] (StreamID beyond the table, ASID 0, input width),
    /// [`Error::Misaligned`] (`ttb0`), [`Error::AlreadyMapped`] (the stream is attached),
    /// [`Error::NoMemory`], [`Error::InvalidationFailed`].
    ///
    /// # Safety
    ///
    /// The tables reachable from `ttb0` must stay allocated, and be written only by the
    /// owner of the domain's page table, until `sid` is detached ([`Smmu::detach`], which
    /// aborts the stream and invalidates the ASID) and that detach returned `Ok`. If `attach`
    /// itself fails with [`Error::InvalidationFailed`] and [`Smmu::stream_config`] still says
    /// stage 1 (the undo could not be invalidated either), the same holds: detach first.
    ///
    /// [`ArmLpaeS1::MAIR`]: crate::pgtable::ArmLpaeS1::MAIR
    pub unsafe fn attach(&self, sid: u32, asid: u16, ttb0: PhysAddr, input_bits: u32) -> Result<()> {
        if asid == 0 {
            return Err(Error::InvalidArgument { what: "SMMUv3 ASID 0 (never allocated)", value: 0 });
        }
        if !matches!(input_bits, 39 | 48) {
            return Err(Error::InvalidArgument {
                what: "SMMUv3 stage-1 input width",
                value: input_bits.into(),
            });
        }
        if !ttb0.is_aligned(PAGE_SIZE) {
            return Err(Error::Misaligned { value: ttb0.raw(), align: PAGE_SIZE });
        }
        let sid = mutant::stream_id(sid);
        let mut state = self.state.lock();
        let (table, index) = self.ste_slot(&mut state, sid)?;
        if entry::ste_config(ste_word(table, index, 0)) != Some(SteKind::Abort) {
            return Err(Error::AlreadyMapped { addr: sid.into() });
        }
        let cd_page = self.platform.alloc_table_page()?;
        let cd = ContextDescriptor {
            asid: mutant::cd_asid(asid),
            ttb0,
            input_bits,
            ips: self.caps.oas_field(),
            mair: crate::pgtable::ArmLpaeS1::MAIR,
        };
        write_ste(&cd_page, 0, cd.words());
        let ste = entry::ste(SteConfig::Stage1 { cd: cd_page.pa() });
        self.stats.cfgi.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.submit(&mut state, &[cmd::cfgi_cd(sid)], asid.into()) {
            // SAFETY: no STE points at the CD yet: the SMMU never reads it; freed once.
            unsafe { self.platform.free_table_page(cd_page) };
            return Err(e);
        }
        state.cds.push((sid, cd_page));
        let (table, index) = self.ste_slot(&mut state, sid)?;
        for (i, &w) in ste.iter().enumerate().skip(1) {
            store(table, index * STE_WORDS + i, w);
        }
        store(table, index * STE_WORDS, ste[0]);
        self.stats.cfgi.fetch_add(1, Ordering::Relaxed);
        self.stats.tlbi_asid.fetch_add(1, Ordering::Relaxed);
        let Err(e) = self.submit(&mut state, &[cmd::cfgi_ste(sid), cmd::tlbi_nh_asid(asid)], asid.into())
        else {
            return Ok(());
        };
        // Undo: abort again, and make the SMMU forget the stage-1 STE (the queue was repaired).
        // Only if that invalidation completes is nothing of the attach left to reach the
        // tables; otherwise the stream stays attached (see `# Safety`).
        let (table, index) = self.ste_slot(&mut state, sid)?;
        store(table, index * STE_WORDS, entry::ste(SteConfig::Abort)[0]);
        if self.submit(&mut state, &[cmd::cfgi_ste(sid), cmd::tlbi_nh_asid(asid)], asid.into()).is_ok() {
            if let Some(i) = state.cds.iter().position(|&(s, _)| s == sid) {
                let page = state.cds.swap_remove(i).1;
                // SAFETY: the STE is abort and CFGI_STE + CMD_SYNC completed: the SMMU reads
                // the CD no more; allocated above, freed once.
                unsafe { self.platform.free_table_page(page) };
            }
        } else {
            let (table, index) = self.ste_slot(&mut state, sid)?;
            store(table, index * STE_WORDS, ste[0]);
        }
        Err(e)
    }

    /// Points stream `sid` at a stage-2 table: an STE with Config = stage 2, `vmid`, the table
    /// rooted at `ttb` of `input_bits` (39 or 48) IPA bits, S2PS = IDR5.OAS. Order as for
    /// [`Smmu::attach`]: words 1-7 under an abort word 0, then word 0, CFGI_STE,
    /// TLBI_S12_VMALL of the VMID, CMD_SYNC.
    ///
    /// Errors: [`Error::Unsupported`] (no IDR0.S2P), [`Error::InvalidArgument`] (StreamID,
    /// VMID 0, input width not 39 or 48 or beyond IDR5.OAS: QEMU's 44-bit SMMU takes 39),
    /// [`Error::Misaligned`], [`Error::AlreadyMapped`],
    /// [`Error::NoMemory`], [`Error::InvalidationFailed`].
    ///
    /// # Safety
    ///
    /// As for [`Smmu::attach`], with `ttb` for `ttb0`.
    pub unsafe fn attach_s2(&self, sid: u32, vmid: u16, ttb: PhysAddr, input_bits: u32) -> Result<()> {
        if !self.caps.stage2() {
            return Err(Error::Unsupported { what: "SMMUv3 stage 2 (IDR0.S2P = 0)" });
        }
        if vmid == 0 {
            return Err(Error::InvalidArgument { what: "SMMUv3 VMID 0 (never allocated)", value: 0 });
        }
        if !matches!(input_bits, 39 | 48) {
            return Err(Error::InvalidArgument {
                what: "SMMUv3 stage-2 input width",
                value: input_bits.into(),
            });
        }
        if input_bits > self.caps.oas_bits() {
            // S2T0SZ may not describe more IPA bits than the output size (S2PS <= OAS).
            return Err(Error::InvalidArgument {
                what: "SMMUv3 stage-2 input wider than the output size (IDR5.OAS)",
                value: input_bits.into(),
            });
        }
        if !ttb.is_aligned(PAGE_SIZE) {
            return Err(Error::Misaligned { value: ttb.raw(), align: PAGE_SIZE });
        }
        let sid = mutant::stream_id(sid);
        let mut state = self.state.lock();
        let (table, index) = self.ste_slot(&mut state, sid)?;
        if entry::ste_config(ste_word(table, index, 0)) != Some(SteKind::Abort) {
            return Err(Error::AlreadyMapped { addr: sid.into() });
        }
        let ste =
            entry::ste(SteConfig::Stage2(Stage2Config { vmid, ttb, input_bits, ps: self.caps.oas_field() }));
        write_ste(table, index, ste);
        self.stats.cfgi.fetch_add(1, Ordering::Relaxed);
        let cmds = [cmd::cfgi_ste(sid), cmd::tlbi_s12_vmall(vmid)];
        let Err(e) = self.submit(&mut state, &cmds, vmid.into()) else {
            return Ok(());
        };
        let (table, index) = self.ste_slot(&mut state, sid)?;
        store(table, index * STE_WORDS, entry::ste(SteConfig::Abort)[0]);
        if self.submit(&mut state, &cmds, vmid.into()).is_err() {
            let (table, index) = self.ste_slot(&mut state, sid)?;
            store(table, index * STE_WORDS, ste[0]);
        }
        Err(e)
    }

    /// Makes stream `sid` bypass translation (its DMA reaches physical memory directly).
    ///
    /// Errors: as [`Smmu::attach`].
    ///
    /// # Safety
    ///
    /// The device behind `sid` may then read and write any physical address: the caller
    /// vouches that it is trusted with all of memory until [`Smmu::detach`] returned `Ok`.
    pub unsafe fn bypass(&self, sid: u32) -> Result<()> {
        let mut state = self.state.lock();
        let (table, index) = self.ste_slot(&mut state, sid)?;
        if entry::ste_config(ste_word(table, index, 0)) != Some(SteKind::Abort) {
            return Err(Error::AlreadyMapped { addr: sid.into() });
        }
        let ste = entry::ste(SteConfig::Bypass);
        for (i, &w) in ste.iter().enumerate().skip(1) {
            store(table, index * STE_WORDS + i, w);
        }
        store(table, index * STE_WORDS, ste[0]);
        self.stats.cfgi.fetch_add(1, Ordering::Relaxed);
        self.submit(&mut state, &[cmd::cfgi_ste(sid)], 0)
    }

    /// Aborts stream `sid` (its DMA is terminated from here on): STE word 0 becomes abort,
    /// CFGI_STE, TLBI_NH_ASID of the ASID its CD named, CMD_SYNC; then the CD page is freed.
    ///
    /// Errors: [`Error::NotMapped`] (not attached or bypassed), [`Error::InvalidArgument`],
    /// [`Error::InvalidationFailed`] (the STE is abort but the SMMU may still use the old
    /// one: the CD page is kept, leaked, rather than reused).
    pub fn detach(&self, sid: u32) -> Result<()> {
        let sid = mutant::stream_id(sid);
        let mut state = self.state.lock();
        if self.format == StreamTableFormat::TwoLevel
            && sid < 1 << self.sid_bits
            && state.l2[(sid >> entry::SPLIT) as usize].is_none()
        {
            // No L2 table, so no STE: nothing to detach (and nothing to allocate for it).
            return Err(Error::NotMapped { addr: sid.into() });
        }
        let (table, index) = self.ste_slot(&mut state, sid)?;
        let old = entry::ste_config(ste_word(table, index, 0));
        if matches!(old, None | Some(SteKind::Abort)) {
            return Err(Error::NotMapped { addr: sid.into() });
        }
        let vmid = entry::ste_vmid(ste_word(table, index, 2));
        store(table, index * STE_WORDS, entry::ste(SteConfig::Abort)[0]);
        let cd = state.cds.iter().position(|&(s, _)| s == sid).map(|i| state.cds.swap_remove(i).1);
        let asid = cd.as_ref().map_or(0, |p| ContextDescriptor::asid_of(ste_word(p, 0, 0)));
        let (cmds, n): ([Command; 2], usize) = match old {
            Some(SteKind::Stage2) => ([cmd::cfgi_ste(sid), cmd::tlbi_s12_vmall(vmid)], 2),
            _ if cd.is_some() => ([cmd::cfgi_ste(sid), cmd::tlbi_nh_asid(asid)], 2),
            _ => ([cmd::cfgi_ste(sid), cmd::sync()], 1),
        };
        self.stats.cfgi.fetch_add(1, Ordering::Relaxed);
        if n == 2 {
            self.stats.tlbi_asid.fetch_add(1, Ordering::Relaxed);
        }
        let r = self.submit(&mut state, &cmds[..n], asid.into());
        match (r, cd) {
            (Ok(()), Some(page)) => {
                // SAFETY: the STE no longer points at the CD and CFGI_STE + CMD_SYNC
                // completed, so the SMMU reads it no more; allocated in `attach`, freed once.
                unsafe { self.platform.free_table_page(page) };
                Ok(())
            }
            (r, _) => r,
        }
    }

    /// The configuration of stream `sid`'s STE as the table holds it (for teardown checks).
    pub fn stream_config(&self, sid: u32) -> Option<SteKind> {
        let mut state = self.state.lock();
        let format = self.format;
        if format == StreamTableFormat::TwoLevel
            && state.l2[(sid >> entry::SPLIT) as usize % L1_ENTRIES].is_none()
        {
            return None;
        }
        let (table, index) = self.ste_slot(&mut state, sid).ok()?;
        entry::ste_config(ste_word(table, index, 0))
    }

    /// Word 0 of stream `sid`'s CD, if it has one.
    pub(super) fn cd_word0(&self, sid: u32) -> Option<u64> {
        let sid = mutant::stream_id(sid);
        let state = self.state.lock();
        state.cds.iter().find(|&&(s, _)| s == sid).map(|(_, p)| word(p, 0))
    }

    /// The VMID of stream `sid`'s STE, if it is attached at stage 2.
    pub fn s2_vmid(&self, sid: u32) -> Option<u16> {
        let sid = mutant::stream_id(sid);
        let mut state = self.state.lock();
        if self.format == StreamTableFormat::TwoLevel
            && state.l2[(sid >> entry::SPLIT) as usize % L1_ENTRIES].is_none()
        {
            return None;
        }
        let (table, index) = self.ste_slot(&mut state, sid).ok()?;
        (entry::ste_config(ste_word(table, index, 0)) == Some(SteKind::Stage2))
            .then(|| entry::ste_vmid(ste_word(table, index, 2)))
    }

    /// Pages of the stream table: the linear page, or the L1 page and every L2 table. A drop
    /// with translation on keeps (leaks) exactly these: the SMMU still reads them.
    pub fn stream_table_pages(&self) -> usize {
        1 + self.state.lock().l2.iter().filter(|p| p.is_some()).count()
    }

    /// Table pages the stream table holds beyond its root (2-level: L2 tables) plus CD pages.
    pub fn table_pages(&self) -> usize {
        let state = self.state.lock();
        state.l2.iter().filter(|p| p.is_some()).count() + state.cds.len()
    }

    /// The STE table page and index for `sid`, creating the L2 table (every STE abort) and
    /// its L1 descriptor in the 2-level format.
    fn ste_slot<'s>(&'s self, state: &'s mut State, sid: u32) -> Result<(&'s TablePage, usize)> {
        if sid >= 1 << self.sid_bits {
            return Err(Error::InvalidArgument {
                what: "SMMUv3 StreamID beyond the stream table",
                value: sid.into(),
            });
        }
        match self.format {
            StreamTableFormat::Linear => Ok((&self.strtab, sid as usize)),
            StreamTableFormat::TwoLevel => {
                let l1 = (sid >> entry::SPLIT) as usize;
                if state.l2[l1].is_none() {
                    let page = self.platform.alloc_table_page()?;
                    for i in 0..1 << entry::SPLIT {
                        write_ste(&page, i, entry::ste(SteConfig::Abort));
                    }
                    // The L2 table is complete before the descriptor that publishes it.
                    store(&self.strtab, l1, entry::l1_descriptor(page.pa()));
                    state.l2[l1] = Some(page);
                }
                let table = state.l2[l1].as_ref().ok_or(Error::BadState { what: "SMMUv3 L2 table" })?;
                Ok((table, (sid & ((1 << entry::SPLIT) - 1)) as usize))
            }
        }
    }

    // ---- invalidation ----------------------------------------------------------------------

    /// Invalidates `asid`'s stage-1 TLB entries for `range` (TLBI_NH_VA, in range form when
    /// IDR3.RIL offers it; one TLBI_NH_ASID for large ranges without it), then CMD_SYNC.
    ///
    /// Errors: [`Error::InvalidationFailed`].
    pub fn flush_range(&self, asid: u16, range: AddrRange<Iova>) -> Result<()> {
        let first = range.start().raw() >> PAGE_SHIFT;
        let pages = range.end().raw().div_ceil(PAGE_SIZE) - first;
        let mut cmds: alloc::vec::Vec<Command> = alloc::vec::Vec::new();
        if mutant::SKIP_TLBI {
            // The mutant: no TLBI at all (`cmds` stays empty: only the CMD_SYNC goes out).
        } else if self.caps.range_invalidation() {
            cmd::range_commands(asid, first << PAGE_SHIFT, pages, |c| cmds.push(c));
        } else if pages <= MAX_VA_COMMANDS {
            cmds.extend((0..pages).map(|i| cmd::tlbi_nh_va(asid, (first + i) << PAGE_SHIFT)));
        } else {
            return self.flush_asid(asid);
        }
        self.stats.tlbi_va.fetch_add(cmds.len() as u64, Ordering::Relaxed);
        self.corrupt_if_injected(&mut cmds);
        let mut state = self.state.lock();
        self.submit(&mut state, &cmds, asid.into())
    }

    /// Invalidates `vmid`'s stage-2 TLB entries for IPA `range` (TLBI_S2_IPA, range form when
    /// IDR3.RIL offers it; TLBI_S12_VMALL for large ranges without it), then CMD_SYNC.
    ///
    /// Errors: [`Error::InvalidationFailed`].
    pub fn flush_s2_range(&self, vmid: u16, range: AddrRange<Iova>) -> Result<()> {
        let first = range.start().raw() >> PAGE_SHIFT;
        let pages = range.end().raw().div_ceil(PAGE_SIZE) - first;
        let mut cmds: alloc::vec::Vec<Command> = alloc::vec::Vec::new();
        if mutant::SKIP_TLBI {
            // The mutant: no TLBI at all.
        } else if self.caps.range_invalidation() {
            cmd::s2_range_commands(vmid, first << PAGE_SHIFT, pages, |c| cmds.push(c));
        } else if pages <= MAX_VA_COMMANDS {
            cmds.extend((0..pages).map(|i| cmd::tlbi_s2_ipa(vmid, (first + i) << PAGE_SHIFT)));
        } else {
            return self.flush_vmid(vmid);
        }
        self.stats.tlbi_s2.fetch_add(cmds.len() as u64, Ordering::Relaxed);
        self.corrupt_if_injected(&mut cmds);
        let mut state = self.state.lock();
        self.submit(&mut state, &cmds, vmid.into())
    }

    /// Invalidates every TLB entry of `vmid` (TLBI_S12_VMALL), then CMD_SYNC.
    ///
    /// Errors: [`Error::InvalidationFailed`].
    pub fn flush_vmid(&self, vmid: u16) -> Result<()> {
        let mut cmds: alloc::vec::Vec<Command> = alloc::vec::Vec::new();
        if !mutant::SKIP_TLBI {
            cmds.push(cmd::tlbi_s12_vmall(vmid));
            self.stats.tlbi_s2.fetch_add(1, Ordering::Relaxed);
        }
        self.corrupt_if_injected(&mut cmds);
        let mut state = self.state.lock();
        self.submit(&mut state, &cmds, vmid.into())
    }

    /// Invalidates every stage-1 TLB entry of `asid` (TLBI_NH_ASID), then CMD_SYNC.
    ///
    /// Errors: [`Error::InvalidationFailed`].
    pub fn flush_asid(&self, asid: u16) -> Result<()> {
        let mut cmds: alloc::vec::Vec<Command> = alloc::vec::Vec::new();
        if !mutant::SKIP_TLBI {
            cmds.push(cmd::tlbi_nh_asid(asid));
            self.stats.tlbi_asid.fetch_add(1, Ordering::Relaxed);
        }
        self.corrupt_if_injected(&mut cmds);
        let mut state = self.state.lock();
        self.submit(&mut state, &cmds, asid.into())
    }

    /// Invalidates every non-secure translation (TLBI_NSNH_ALL), then CMD_SYNC.
    ///
    /// Errors: [`Error::InvalidationFailed`].
    pub fn flush_all(&self) -> Result<()> {
        let mut state = self.state.lock();
        self.submit(&mut state, &[cmd::tlbi_nsnh_all()], 0)
    }

    /// Fault injection for tests: the next `n` TLBI submissions carry an illegal command (a
    /// reserved opcode) that the SMMU must reject with CERROR_ILL.
    pub fn inject_invalidation_failures(&self, n: u32) {
        self.inject.store(n, Ordering::Relaxed);
    }

    fn corrupt_if_injected(&self, cmds: &mut alloc::vec::Vec<Command>) {
        let take = self.inject.load(Ordering::Relaxed) != 0
            && self.inject.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok();
        if take {
            // Opcode 0 is reserved: CERROR_ILL.
            cmds.insert(0, [0, 0]);
        }
    }

    /// Queues `cmds` and a CMD_SYNC, writes PROD, and waits until CONS has passed the sync:
    /// then every command has completed. `domain` names the domain for errors.
    ///
    /// Errors ([`Error::InvalidationFailed`]):
    /// - GERROR.CMDQ_ERR: the SMMU stopped at a command it could not run (CMDQ_CONS.ERR says
    ///   why: CERROR_ILL, _ABT, _ATC_INV_SYNC). The driver repairs the queue: the offending
    ///   slot becomes a CMD_SYNC, GERRORN acknowledges the error, and the SMMU resumes with
    ///   the commands behind it; the wait for those is bounded too. Status: CMDQ_CONS.
    /// - no progress within the poll bound: the commands stay queued (`stuck`), later
    ///   submissions queue behind them and fail at once when the ring has no room.
    fn submit(&self, state: &mut State, cmds: &[Command], domain: u64) -> Result<()> {
        let q = &mut state.cmdq;
        let size = 1u32 << q.log2;
        let n = cmds.len() as u32 + u32::from(!mutant::SKIP_SYNC);
        let cons = if q.stuck { self.r32(regs::CMDQ_CONS) & ((2 << q.log2) - 1) } else { q.index };
        let used = q.index.wrapping_sub(cons) & ((2 << q.log2) - 1);
        if used + n > size {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            return Err(Error::InvalidationFailed {
                what: "SMMUv3 command queue full: earlier commands never completed",
                domain,
                status: u64::from(self.r32(regs::CMDQ_CONS)),
            });
        }
        let sync = [cmd::sync()];
        let all = cmds.iter().chain(if mutant::SKIP_SYNC { &sync[..0] } else { &sync[..] });
        for c in all {
            let slot = q.slot(q.index);
            store(&q.ring, 2 * slot, c[0]);
            store(&q.ring, 2 * slot + 1, c[1]);
            q.index = q.advance(q.index);
        }
        self.stats.commands.fetch_add(u64::from(n), Ordering::Relaxed);
        // Commands must be in memory before PROD tells the SMMU to fetch them.
        self.platform.dma_wmb();
        self.w32(regs::CMDQ_PROD, q.index);
        if mutant::SKIP_SYNC {
            // The mutant: no CMD_SYNC, no wait for completion.
            return Ok(());
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        let target = q.index;
        q.stuck = true;
        let mut repaired = None;
        for _ in 0..self.poll_limit.max(1) {
            let now = self.r32(regs::CMDQ_CONS);
            if now & ((2 << q.log2) - 1) == target {
                q.stuck = false;
                break;
            }
            if self.gerror() & gerror::CMDQ_ERR != 0 && repaired.is_none() {
                repaired = Some(now);
                self.repair(q, now);
                continue;
            }
            spin_hint();
        }
        let failed = |what, status: u32| {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            Err(Error::InvalidationFailed { what, domain, status: status.into() })
        };
        if let Some(cons) = repaired {
            let what = match (cons >> cerror::SHIFT) & cerror::MASK {
                cerror::ILL => "SMMUv3 command queue error: an illegal command (CERROR_ILL)",
                cerror::ABT => "SMMUv3 command queue error: a command fetch aborted (CERROR_ABT)",
                cerror::ATC_INV_SYNC => {
                    "SMMUv3 command queue error: an ATC invalidation failed (CERROR_ATC_INV_SYNC)"
                }
                _ => "SMMUv3 command queue error (GERROR.CMDQ_ERR)",
            };
            return failed(what, cons);
        }
        if q.stuck {
            return failed("SMMUv3 CMD_SYNC never completed", self.r32(regs::CMDQ_CONS));
        }
        // Reads of what the invalidation protects must not move before the CONS read.
        self.platform.dma_rmb();
        Ok(())
    }

    /// After GERROR.CMDQ_ERR with CMDQ_CONS = `cons`: overwrites the command at CONS with a
    /// CMD_SYNC and acknowledges the error (toggles GERRORN.CMDQ_ERR); the SMMU resumes there.
    #[cold]
    fn repair(&self, q: &Queue, cons: u32) {
        self.stats.queue_errors_recovered.fetch_add(1, Ordering::Relaxed);
        // CMDQ_CONS.ERR ((cons >> 24) & 0x7f: CERROR_ILL, _ABT, _ATC_INV_SYNC) stays in the
        // status the caller's error carries; whatever it is, the repair is the same.
        let slot = q.slot(cons);
        let s = cmd::sync();
        store(&q.ring, 2 * slot, s[0]);
        store(&q.ring, 2 * slot + 1, s[1]);
        self.platform.dma_wmb();
        self.w32(regs::GERRORN, self.r32(regs::GERRORN) ^ gerror::CMDQ_ERR);
    }

    // ---- events ----------------------------------------------------------------------------

    /// The oldest unread event record, decoded, or `None` when the queue is empty. An
    /// overflow (records lost) is acknowledged.
    pub fn take_fault(&self) -> Option<Fault> {
        let mut state = self.state.lock();
        let q = &mut state.evtq;
        let prod = self.r32(regs::EVENTQ_PROD);
        let mask = (2 << q.log2) - 1;
        if prod & mask == q.index {
            return None;
        }
        // Record contents must not be read before PROD.
        self.platform.dma_rmb();
        let slot = q.slot(q.index);
        let raw = [0, 1, 2, 3].map(|i| word(&q.ring, 4 * slot + i));
        q.index = q.advance(q.index);
        // CONS.OVACKFLG (bit 31) follows PROD.OVFLG: acknowledges an overflow.
        self.w32(regs::EVENTQ_CONS, q.index | (prod & regs::EVENTQ_PROD_OVFLG));
        Some(Fault::decode(raw))
    }

    // ---- registers -------------------------------------------------------------------------

    fn set_cr0(&self, value: u32) -> Result<()> {
        self.w32(regs::CR0, value);
        for _ in 0..self.poll_limit.max(1) {
            if self.r32(regs::CR0ACK) == value {
                return Ok(());
            }
            spin_hint();
        }
        Err(Error::BadState { what: "SMMUv3 CR0ACK never matched CR0" })
    }

    fn r32(&self, off: u64) -> u32 {
        // SAFETY: by the type invariant `base` is our SMMU's register block; `off` is one of
        // its 4-aligned 32-bit registers.
        unsafe { self.platform.mmio_read32(PhysAddr::new(self.base.raw() + off)) }
    }

    fn w32(&self, off: u64, v: u32) {
        // SAFETY: as in `r32`.
        unsafe { self.platform.mmio_write32(PhysAddr::new(self.base.raw() + off), v) }
    }

    fn w64(&self, off: u64, v: u64) {
        // SAFETY: as in `r32`, an 8-aligned 64-bit register.
        unsafe { self.platform.mmio_write64(PhysAddr::new(self.base.raw() + off), v) }
    }
}

impl<P: Platform> Drop for Smmu<'_, P> {
    /// Leaves every device blocked, never bypassing: turning the SMMU off would send every
    /// stream through GBPA (bypass by default, and QEMU 7.2 honours nothing else), so every
    /// device would reach all of memory from a safe drop. Only [`Smmu::disable_translation`],
    /// which is `unsafe`, does that.
    ///
    /// - Translation on (the usual case): every STE becomes abort, then CFGI_ALL,
    ///   TLBI_NSNH_ALL and CMD_SYNC; the queues are turned off with SMMUEN kept on. From then
    ///   on every stream is terminated; the CD and queue pages are freed. The stream table
    ///   (the linear page, or the L1 page and every L2 page) stays allocated (leaked: the
    ///   enabled SMMU still reads it).
    /// - Translation already off (the caller turned it off, `unsafe`ly): the queues are
    ///   turned off and every page is freed.
    /// - Anything the SMMU does not acknowledge: every page it may still read is leaked.
    fn drop(&mut self) {
        let translating = self.r32(regs::CR0ACK) & cr0::SMMUEN != 0;
        if translating {
            let abort = entry::ste(SteConfig::Abort);
            let state = self.state.get_mut();
            let tables: alloc::vec::Vec<(&TablePage, usize)> = match self.format {
                StreamTableFormat::Linear => alloc::vec![(&self.strtab, 1usize << self.sid_bits)],
                StreamTableFormat::TwoLevel => {
                    state.l2.iter().flatten().map(|t| (t, 1usize << entry::SPLIT)).collect()
                }
            };
            for (table, n) in tables {
                for index in 0..n {
                    // Word 0 alone: Config = abort makes the SMMU ignore words 1-7.
                    store(table, index * STE_WORDS, abort[0]);
                }
            }
            let mut state = self.state.lock();
            // CFGI_ALL is CFGI_STE_RANGE (0x04) with Range = 31.
            let cfgi_all: Command = [0x04, 31];
            if self.submit(&mut state, &[cfgi_all, cmd::tlbi_nsnh_all()], 0).is_err() {
                // A cached STE may still lead to a CD and its tables: leak everything.
                return;
            }
            drop(state);
        }
        if self.set_cr0(if translating { cr0::SMMUEN } else { 0 }).is_err() {
            // Not acknowledged: the SMMU may still read every page; leak them.
            return;
        }
        let state = self.state.get_mut();
        for (_, page) in state.cds.drain(..) {
            // SAFETY: no STE points at a CD any more (every one aborts and CFGI_ALL has
            // completed, or the SMMU is off); each came from `alloc_table_page`, freed once.
            unsafe { self.platform.free_table_page(page) };
        }
        // SAFETY: these two handles are not used after this drop; each alias is the one handle
        // of its page that is freed.
        let queues = unsafe { [state.cmdq.ring.alias(), state.evtq.ring.alias()] };
        for page in queues {
            // SAFETY: both queues are off (CR0ACK agreed), so the SMMU reads neither page.
            unsafe { self.platform.free_table_page(page) };
        }
        if translating {
            return;
        }
        // SAFETY: the one remaining handle of the stream table page, not used after this drop.
        let root = unsafe { self.strtab.alias() };
        for page in state.l2.iter_mut().filter_map(Option::take).chain([root]) {
            // SAFETY: the SMMU is off (CR0ACK = 0), so it reads no stream table page; each
            // came from `alloc_table_page` and is freed once.
            unsafe { self.platform.free_table_page(page) };
        }
    }
}

/// Takes the lowest free id in `1..limit` from `bits`.
fn take_id(bits: &mut [u64; MAX_ASIDS / 64], limit: usize) -> Result<u16> {
    for id in 1..limit.min(MAX_ASIDS) {
        let (w, b) = (id / 64, id % 64);
        if bits[w] & (1 << b) == 0 {
            bits[w] |= 1 << b;
            return Ok(id as u16);
        }
    }
    Err(Error::Exhausted { size: 1, limit: limit as u64 })
}

/// Gives `id` back to `bits`.
fn give_id(bits: &mut [u64; MAX_ASIDS / 64], id: u16) -> Result<()> {
    let id = usize::from(id);
    let (w, b) = (id / 64, id % 64);
    if id == 0 || bits[w] & (1 << b) == 0 {
        return Err(Error::DoubleFree { addr: id as u64, size: 1 });
    }
    bits[w] &= !(1 << b);
    Ok(())
}

fn word(page: &TablePage, i: usize) -> u64 {
    page.entry(i).map_or(0, |e| e.load(HwOrdering::Acquire))
}

fn ste_word(page: &TablePage, index: usize, w: usize) -> u64 {
    word(page, index * STE_WORDS + w)
}

fn store(page: &TablePage, i: usize, v: u64) {
    if let Some(e) = page.entry(i) {
        // Release: what the word points at is visible to a walker that sees it.
        e.store(v, HwOrdering::Release);
    }
}

/// Writes a whole STE (or CD) at `index`: words 1-7 first, word 0 (V) last.
fn write_ste(page: &TablePage, index: usize, words: [u64; STE_WORDS]) {
    for (i, &w) in words.iter().enumerate().skip(1) {
        store(page, index * STE_WORDS + i, w);
    }
    store(page, index * STE_WORDS, words[0]);
}
