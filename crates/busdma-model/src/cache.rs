//! A write-back CPU cache over the RAM arena, so that the CPU's and the device's views of memory
//! can disagree the way they do on real machines.
//!
//! # Theory
//!
//! 1. **What is modelled.** One write-back, write-allocate data cache between the CPU and RAM,
//!    made of `sets × ways` lines of [`LINE_SIZE`] bytes, each line holding a physical tag, a
//!    valid bit, a dirty bit, an age for LRU replacement, and its own copy of the bytes. CPU
//!    loads and stores made through [`crate::CachedCpu`] look lines up, fill them from RAM on a
//!    miss (evicting, and writing back if dirty, the least recently used way of the set) and
//!    dirty them on a store. RAM itself is the arena: what a non-coherent device sees.
//! 2. **Indexing.** *PIPT*: the set is chosen by physical address bits, so every virtual alias of
//!    a physical line meets the same line. *VIPT*: the set is chosen by the **virtual** address
//!    used for the access, including bits above the page offset when a way is larger than a
//!    page (as on parisc), while the tag stays physical. Two aliases whose virtual addresses
//!    differ in those bits (different *colours*) therefore hold two separate copies of one
//!    physical line, which can carry different data: seed 003's aliasing problem.
//! 3. **Maintenance** acts on one alias: `clean` writes back the dirty lines of a virtual range
//!    (the copy found through that range's index), `invalidate` drops them without writing
//!    back, `clean_invalidate` does both. On a VIPT cache, maintenance through one alias does
//!    nothing to another colour's copy, which is why a kernel must know which alias it cleans.
//! 4. **Device accesses** ([`Cache::device_read`], [`Cache::device_write`]) say how the device's
//!    transaction interacts with the cache ([`Snoop`]): `None`, a non-coherent device reading
//!    and writing RAM only; `Physical`, a snooping interconnect that finds every copy of the
//!    line (all colours) and writes dirty data back before a read, writes back and discards
//!    before a write; `Index(va)`, an IOMMU with a coherence index (parisc's LCI) that snoops
//!    exactly one alias, the set selected by `va`.
//! 5. **Counters** ([`CacheCounters`]) count hits, misses, write-backs, maintenance calls and
//!    the lines they touched, and the lines a snoop found: tests prove properties with them
//!    (for example that a page-less scatter-gather entry never causes a CPU flush).
//! 6. **Locking.** All lines sit behind one mutex: the model is about the order of effects, not
//!    about the speed of a cache. Nothing calls back into the cache while the lock is held.
//!
//! # Glossary
//!
//! - **colour**: the bits of a virtual address above the page offset that select the set;
//!   `(way size / page size)` colours exist. A PIPT cache has one colour.
//! - **alias**: one virtual address of a physical byte; kernel (direct map or quick map) and
//!   user aliases of one page may have different colours.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use busdma::{Error, KernVa, PAGE_SIZE, PhysAddr, Result};

use crate::HostPlatform;
use crate::host::RawRam;

/// Bytes per cache line: 64, the line of every current x86 and Arm server core (and of the
/// model's IOMMU structures), so "sub-line" and "sub-page" effects are at real granularities.
pub const LINE_SIZE: u64 = 64;

/// How the set of a line is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Indexing {
    /// Physically indexed, physically tagged: aliases share one line.
    Pipt,
    /// Virtually indexed, physically tagged: aliases of different colours are separate lines.
    Vipt,
}

/// How device DMA interacts with the CPU cache on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Coherence {
    /// Devices read and write RAM only; software must clean and invalidate.
    NonCoherent,
    /// Every device access snoops the cache by physical address (x86-like, or an Arm
    /// interconnect with coherent masters): no maintenance is needed.
    Snooping,
    /// Device accesses through an IOMMU snoop the one alias named by the mapping's coherence
    /// index (parisc's LCI); accesses without an index (no IOMMU) are non-coherent.
    CoherenceIndex,
}

/// The cache's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheConfig {
    /// Set selection.
    pub indexing: Indexing,
    /// Number of sets: a power of two.
    pub sets: u32,
    /// Lines per set (associativity), at least one.
    pub ways: u32,
    /// Device coherence.
    pub coherence: Coherence,
}

impl CacheConfig {
    /// A PIPT cache of 512 sets × 8 ways × 64 B = 256 KiB (an L2 slice's size and shape), with
    /// non-coherent DMA.
    pub const fn pipt() -> Self {
        Self { indexing: Indexing::Pipt, sets: 512, ways: 8, coherence: Coherence::NonCoherent }
    }

    /// A VIPT cache with aliasing: 256 sets × 64 B = 16 KiB per way, four pages, so four
    /// colours (bits 12–13 of the virtual address pick among them, as on many Armv6 and
    /// parisc parts); 4 ways, 64 KiB in all. Non-coherent DMA.
    pub const fn vipt_aliasing() -> Self {
        Self { indexing: Indexing::Vipt, sets: 256, ways: 4, coherence: Coherence::NonCoherent }
    }

    /// The same cache with another coherence mode.
    pub const fn with_coherence(mut self, coherence: Coherence) -> Self {
        self.coherence = coherence;
        self
    }

    /// Number of colours: virtual pages that map to distinct sets (1 for PIPT, and for a VIPT
    /// cache whose ways are no larger than a page).
    pub fn colours(&self) -> u64 {
        match self.indexing {
            Indexing::Pipt => 1,
            Indexing::Vipt => (u64::from(self.sets) * LINE_SIZE / PAGE_SIZE).max(1),
        }
    }

    /// The colour of a virtual (or, for PIPT, physical) address.
    pub fn colour_of(&self, addr: u64) -> u64 {
        (addr / PAGE_SIZE) % self.colours()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        // 2^20 sets × 64 B is a 64 MiB way: far beyond any real cache, and keeps the model's
        // line array within reason.
        const MAX_SETS: u32 = 1 << 20;
        // 64 ways: beyond the associativity of any data cache we know of.
        const MAX_WAYS: u32 = 64;
        if !self.sets.is_power_of_two() || self.sets > MAX_SETS {
            return Err(Error::InvalidArgument {
                what: "cache sets (power of two ≤ 2^20)",
                value: self.sets.into(),
            });
        }
        if self.ways == 0 || self.ways > MAX_WAYS {
            return Err(Error::InvalidArgument { what: "cache ways (1..=64)", value: self.ways.into() });
        }
        Ok(())
    }
}

/// How a device transaction treats the cache (see the module's theory, point 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Snoop {
    /// RAM only.
    None,
    /// Every copy of the line, whatever its colour.
    Physical,
    /// The one copy found through this virtual address's index (a coherence index).
    Index(u64),
}

/// What the CPU cache model backs onto: RAM, read and written by physical address.
pub trait Memory {
    /// Copies RAM at `pa` into `buf`.
    fn load(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<()>;
    /// Copies `data` into RAM at `pa`.
    fn store(&self, pa: PhysAddr, data: &[u8]) -> Result<()>;
}

/// Counters a test can read; all monotonic.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// CPU accesses (per line) found in the cache.
    pub hits: AtomicU64,
    /// CPU accesses (per line) that filled a line from RAM.
    pub misses: AtomicU64,
    /// Dirty lines written back to RAM, for any reason.
    pub writebacks: AtomicU64,
    /// Maintenance calls (clean, invalidate, clean+invalidate) through the platform seam.
    pub maintenance_calls: AtomicU64,
    /// Lines those calls found in the cache and acted on.
    pub maintenance_lines: AtomicU64,
    /// Maintenance calls on a kernel virtual address that maps nothing (a caller bug).
    pub maintenance_unmapped: AtomicU64,
    /// Lines a device snoop found in the cache.
    pub snoop_hits: AtomicU64,
    /// Dirty lines dropped without write-back by an invalidate (data the CPU had written and
    /// that nobody will ever see).
    pub dirty_discards: AtomicU64,
}

impl CacheCounters {
    fn bump(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug)]
struct Line {
    /// Physical line number (`pa / LINE_SIZE`).
    tag: u64,
    valid: bool,
    dirty: bool,
    /// Last use, for LRU.
    age: u64,
    data: [u8; LINE_SIZE as usize],
}

impl Line {
    const EMPTY: Line = Line { tag: 0, valid: false, dirty: false, age: 0, data: [0; LINE_SIZE as usize] };
}

#[derive(Debug)]
struct Lines {
    lines: Vec<Line>,
    clock: u64,
}

/// What a maintenance call does to each line it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Maint {
    Clean,
    Invalidate,
    CleanInvalidate,
}

/// The cache model. See the module documentation.
#[derive(Debug)]
pub struct Cache {
    config: CacheConfig,
    state: Mutex<Lines>,
    counters: CacheCounters,
}

impl Cache {
    /// An empty cache of this shape.
    ///
    /// Errors: [`Error::InvalidArgument`] for sets that are not a power of two (or absurd), or
    /// ways outside `1..=64`.
    pub fn new(config: CacheConfig) -> Result<Self> {
        config.validate()?;
        let n = config.sets as usize * config.ways as usize;
        Ok(Self {
            config,
            state: Mutex::new(Lines { lines: vec![Line::EMPTY; n], clock: 0 }),
            counters: CacheCounters::default(),
        })
    }

    /// The cache's shape.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Counters.
    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The set an access through virtual address `va` to physical `pa` uses.
    fn set_of(&self, va: u64, pa: u64) -> usize {
        let x = match self.config.indexing {
            Indexing::Pipt => pa,
            Indexing::Vipt => va,
        };
        ((x / LINE_SIZE) % u64::from(self.config.sets)) as usize
    }

    /// Every set that can hold physical line `pa` (one per colour).
    fn sets_of_line(&self, pa: u64) -> impl Iterator<Item = usize> + '_ {
        let off = pa % PAGE_SIZE;
        (0..self.config.colours()).map(move |c| self.set_of(c * PAGE_SIZE + off, pa))
    }

    /// The way of `set` holding physical line `tag`, if any.
    fn find(&self, l: &Lines, set: usize, tag: u64) -> Option<usize> {
        let w = self.config.ways as usize;
        (set * w..(set + 1) * w).find(|&i| l.lines[i].valid && l.lines[i].tag == tag)
    }

    fn write_back(&self, mem: &dyn Memory, line: &mut Line) -> Result<()> {
        if line.valid && line.dirty {
            mem.store(PhysAddr::new(line.tag * LINE_SIZE), &line.data)?;
            line.dirty = false;
            CacheCounters::bump(&self.counters.writebacks, 1);
        }
        Ok(())
    }

    /// The way holding line `pa_line` through alias `va`, filled from RAM on a miss.
    fn lookup_fill(&self, mem: &dyn Memory, l: &mut Lines, va: u64, pa_line: u64) -> Result<usize> {
        let set = self.set_of(va, pa_line);
        let tag = pa_line / LINE_SIZE;
        l.clock += 1;
        let now = l.clock;
        if let Some(i) = self.find(l, set, tag) {
            l.lines[i].age = now;
            CacheCounters::bump(&self.counters.hits, 1);
            return Ok(i);
        }
        CacheCounters::bump(&self.counters.misses, 1);
        let w = self.config.ways as usize;
        let victim = (set * w..(set + 1) * w)
            .min_by_key(|&i| if l.lines[i].valid { l.lines[i].age } else { 0 })
            .unwrap_or(set * w);
        let mut line = std::mem::replace(&mut l.lines[victim], Line::EMPTY);
        self.write_back(mem, &mut line)?;
        mem.load(PhysAddr::new(pa_line), &mut line.data)?;
        line.tag = tag;
        line.valid = true;
        line.dirty = false;
        line.age = now;
        l.lines[victim] = line;
        Ok(victim)
    }

    /// Splits `[va, va + len)` into per-line pieces `(va, pa, offset into the access, length)`.
    /// Checks that the virtual and physical page offsets agree (an alias maps whole pages).
    fn pieces(va: u64, pa: PhysAddr, len: u64) -> Result<impl Iterator<Item = (u64, u64, usize, usize)>> {
        if (va ^ pa.raw()) % PAGE_SIZE != 0 {
            return Err(Error::InvalidArgument {
                what: "alias whose page offset differs from its PA's",
                value: va,
            });
        }
        let pa = pa.raw();
        pa.checked_add(len).ok_or(Error::Overflow { base: pa, len })?;
        va.checked_add(len).ok_or(Error::Overflow { base: va, len })?;
        let mut done = 0u64;
        Ok(std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let p = pa + done;
            let n = (LINE_SIZE - p % LINE_SIZE).min(len - done);
            let item = (va + done, p, done as usize, n as usize);
            done += n;
            Some(item)
        }))
    }

    /// A CPU load of `buf.len()` bytes of physical `pa` through virtual alias `va`.
    ///
    /// Errors: [`Error::InvalidArgument`] if `va` and `pa` have different page offsets;
    /// [`Error::Overflow`]; RAM errors from `mem`.
    pub fn cpu_read(&self, mem: &dyn Memory, va: u64, pa: PhysAddr, buf: &mut [u8]) -> Result<()> {
        let mut l = self.lock();
        for (v, p, at, n) in Self::pieces(va, pa, buf.len() as u64)? {
            let i = self.lookup_fill(mem, &mut l, v, p & !(LINE_SIZE - 1))?;
            let o = (p % LINE_SIZE) as usize;
            buf[at..at + n].copy_from_slice(&l.lines[i].data[o..o + n]);
        }
        Ok(())
    }

    /// A CPU store of `data` to physical `pa` through virtual alias `va` (write-allocate).
    ///
    /// Errors: as for [`Cache::cpu_read`].
    pub fn cpu_write(&self, mem: &dyn Memory, va: u64, pa: PhysAddr, data: &[u8]) -> Result<()> {
        let mut l = self.lock();
        for (v, p, at, n) in Self::pieces(va, pa, data.len() as u64)? {
            let i = self.lookup_fill(mem, &mut l, v, p & !(LINE_SIZE - 1))?;
            let o = (p % LINE_SIZE) as usize;
            l.lines[i].data[o..o + n].copy_from_slice(&data[at..at + n]);
            l.lines[i].dirty = true;
        }
        Ok(())
    }

    /// A speculative fill: the CPU brings the lines of `[va, va + len)` into the cache without
    /// using them (a prefetcher, or a load the program never looks at). Real CPUs do this at
    /// any time to any cacheable memory; it is why `POSTREAD` must invalidate.
    ///
    /// Errors: as for [`Cache::cpu_read`].
    pub fn prefetch(&self, mem: &dyn Memory, va: u64, pa: PhysAddr, len: u64) -> Result<()> {
        let mut l = self.lock();
        for (v, p, _, _) in Self::pieces(va, pa, len)? {
            self.lookup_fill(mem, &mut l, v, p & !(LINE_SIZE - 1))?;
        }
        Ok(())
    }

    fn maintain(&self, mem: &dyn Memory, va: u64, pa: PhysAddr, len: u64, op: Maint) -> Result<()> {
        CacheCounters::bump(&self.counters.maintenance_calls, 1);
        let mut l = self.lock();
        let mut touched = 0;
        for (v, p, _, _) in Self::pieces(va, pa, len)? {
            let line = p & !(LINE_SIZE - 1);
            let Some(i) = self.find(&l, self.set_of(v, line), line / LINE_SIZE) else { continue };
            touched += 1;
            let entry = &mut l.lines[i];
            match op {
                Maint::Clean => self.write_back(mem, entry)?,
                Maint::Invalidate => {
                    if entry.dirty {
                        CacheCounters::bump(&self.counters.dirty_discards, 1);
                    }
                    entry.valid = false;
                }
                Maint::CleanInvalidate => {
                    self.write_back(mem, entry)?;
                    entry.valid = false;
                }
            }
        }
        CacheCounters::bump(&self.counters.maintenance_lines, touched);
        Ok(())
    }

    /// Writes back the dirty lines of alias `[va, va + len)` (mapping physical `pa`).
    ///
    /// Errors: as for [`Cache::cpu_read`].
    pub fn clean(&self, mem: &dyn Memory, va: u64, pa: PhysAddr, len: u64) -> Result<()> {
        self.maintain(mem, va, pa, len, Maint::Clean)
    }

    /// Discards the lines of alias `[va, va + len)` without writing them back. A partial line
    /// at either end is discarded whole, as hardware does: callers own whole lines.
    ///
    /// Errors: as for [`Cache::cpu_read`].
    pub fn invalidate(&self, mem: &dyn Memory, va: u64, pa: PhysAddr, len: u64) -> Result<()> {
        self.maintain(mem, va, pa, len, Maint::Invalidate)
    }

    /// Writes back, then discards, the lines of alias `[va, va + len)`.
    ///
    /// Errors: as for [`Cache::cpu_read`].
    pub fn clean_invalidate(&self, mem: &dyn Memory, va: u64, pa: PhysAddr, len: u64) -> Result<()> {
        self.maintain(mem, va, pa, len, Maint::CleanInvalidate)
    }

    /// The ways a snoop of physical line `line` examines.
    fn snooped(&self, l: &Lines, line: u64, snoop: Snoop) -> Vec<usize> {
        let tag = line / LINE_SIZE;
        match snoop {
            Snoop::None => Vec::new(),
            Snoop::Physical => self.sets_of_line(line).filter_map(|s| self.find(l, s, tag)).collect(),
            // The index names a virtual page (its colour); each line of the transfer uses that
            // page at the line's own offset. It selects one set; the tag still matches by PA.
            Snoop::Index(va) => {
                let v = (va & !(PAGE_SIZE - 1)) + line % PAGE_SIZE;
                self.find(l, self.set_of(v, line), tag).into_iter().collect()
            }
        }
    }

    /// A device reads `buf.len()` bytes of RAM at `pa`; with a snoop, dirty copies found are
    /// written back first (and stay valid, clean).
    ///
    /// Errors: [`Error::Overflow`]; RAM errors from `mem`.
    pub fn device_read(&self, mem: &dyn Memory, pa: PhysAddr, buf: &mut [u8], snoop: Snoop) -> Result<()> {
        if snoop != Snoop::None {
            let mut l = self.lock();
            for (_, p, _, _) in Self::pieces(pa.raw(), pa, buf.len() as u64)? {
                for i in self.snooped(&l, p & !(LINE_SIZE - 1), snoop) {
                    CacheCounters::bump(&self.counters.snoop_hits, 1);
                    self.write_back(mem, &mut l.lines[i])?;
                }
            }
        }
        mem.load(pa, buf)
    }

    /// A device writes `data` to RAM at `pa`; with a snoop, copies found are written back (so
    /// the rest of a partly written line survives) and discarded before the write lands.
    ///
    /// Errors: as for [`Cache::device_read`].
    pub fn device_write(&self, mem: &dyn Memory, pa: PhysAddr, data: &[u8], snoop: Snoop) -> Result<()> {
        if snoop != Snoop::None {
            let mut l = self.lock();
            for (_, p, _, _) in Self::pieces(pa.raw(), pa, data.len() as u64)? {
                for i in self.snooped(&l, p & !(LINE_SIZE - 1), snoop) {
                    CacheCounters::bump(&self.counters.snoop_hits, 1);
                    self.write_back(mem, &mut l.lines[i])?;
                    l.lines[i].valid = false;
                }
            }
        }
        mem.store(pa, data)
    }

    /// Cache pressure: every dirty line is written back and every line dropped, as if the CPU
    /// had run through a large working set. Tests use it to make evictions happen at a chosen
    /// moment (an eviction in the middle of a DMA is what `PREREAD` protects against).
    ///
    /// Errors: RAM errors from `mem`.
    pub fn evict_all(&self, mem: &dyn Memory) -> Result<()> {
        let mut l = self.lock();
        for i in 0..l.lines.len() {
            self.write_back(mem, &mut l.lines[i])?;
            l.lines[i].valid = false;
        }
        Ok(())
    }

    /// Whether the copy of physical line `pa` seen through alias `va` is in the cache, and if
    /// so whether it is dirty: `None`, `Some(false)` clean, `Some(true)` dirty.
    pub fn probe(&self, va: u64, pa: PhysAddr) -> Option<bool> {
        let l = self.lock();
        let line = pa.raw() & !(LINE_SIZE - 1);
        self.find(&l, self.set_of(va, line), line / LINE_SIZE).map(|i| l.lines[i].dirty)
    }

    /// Number of valid lines holding physical page `pa`'s bytes, over every colour.
    pub fn lines_of_page(&self, pa: PhysAddr) -> u64 {
        let l = self.lock();
        let page = pa.raw() / PAGE_SIZE;
        l.lines.iter().filter(|x| x.valid && x.tag * LINE_SIZE / PAGE_SIZE == page).count() as u64
    }
}

/// The CPU's loads and stores on a [`HostPlatform`], through its cache model when it has one.
///
/// Addresses are kernel virtual addresses the CPU can use (the direct map, or a quick-map slot
/// while it maps a page); [`CachedCpu::read_alias`] and friends take any other virtual alias
/// (a user mapping) with the physical address it maps. Pages allocated uncached
/// ([`busdma::MemAttr::Uncached`]) bypass the cache, as the CPU's memory attributes make them.
/// Without a cache model every access goes straight to RAM.
#[derive(Clone, Copy)]
pub struct CachedCpu<'m> {
    m: &'m HostPlatform,
}

impl<'m> CachedCpu<'m> {
    /// The CPU of machine `m`.
    pub fn new(m: &'m HostPlatform) -> Self {
        Self { m }
    }

    /// Splits `[kva, kva + len)` into per-page pieces `(va, pa, offset, length)`.
    fn pages(&self, kva: KernVa, len: u64) -> Result<Vec<(u64, PhysAddr, usize, usize)>> {
        let end = kva.raw().checked_add(len).ok_or(Error::Overflow { base: kva.raw(), len })?;
        let mut out = Vec::new();
        let mut va = kva.raw();
        while va < end {
            let n = (PAGE_SIZE - va % PAGE_SIZE).min(end - va);
            let pa = self.m.cpu_translate(KernVa::new(va)).ok_or(Error::NotMapped { addr: va })?;
            out.push((va, pa, (va - kva.raw()) as usize, n as usize));
            va += n;
        }
        Ok(out)
    }

    /// Whether accesses to `pa` go through the cache.
    fn cached(&self, pa: PhysAddr) -> Option<&'m Cache> {
        self.m.cache().filter(|_| self.m.mem_attr(pa) == busdma::MemAttr::WriteBack)
    }

    /// Loads `buf.len()` bytes at kernel address `kva`.
    ///
    /// Errors: [`Error::NotMapped`] for an address the CPU cannot reach, [`Error::Overflow`].
    pub fn read(&self, kva: KernVa, buf: &mut [u8]) -> Result<()> {
        for (va, pa, at, n) in self.pages(kva, buf.len() as u64)? {
            self.read_alias(va, pa, &mut buf[at..at + n])?;
        }
        Ok(())
    }

    /// Stores `data` at kernel address `kva`.
    ///
    /// Errors: as for [`CachedCpu::read`].
    pub fn write(&self, kva: KernVa, data: &[u8]) -> Result<()> {
        for (va, pa, at, n) in self.pages(kva, data.len() as u64)? {
            self.write_alias(va, pa, &data[at..at + n])?;
        }
        Ok(())
    }

    /// Brings `[kva, kva + len)` into the cache without using it (speculation).
    ///
    /// Errors: as for [`CachedCpu::read`].
    pub fn prefetch(&self, kva: KernVa, len: u64) -> Result<()> {
        for (va, pa, _, n) in self.pages(kva, len)? {
            if let Some(c) = self.cached(pa) {
                c.prefetch(&RawRam(self.m), va, pa, n as u64)?;
            }
        }
        Ok(())
    }

    /// Loads through virtual alias `va` of physical `pa` (for example a user mapping); the
    /// bytes are physically contiguous.
    ///
    /// Errors: [`Error::InvalidArgument`] (page offsets of `va` and `pa` differ),
    /// [`Error::OutOfRange`] (outside RAM).
    pub fn read_alias(&self, va: u64, pa: PhysAddr, buf: &mut [u8]) -> Result<()> {
        match self.cached(pa) {
            Some(c) => c.cpu_read(&RawRam(self.m), va, pa, buf),
            None => self.m.raw_read(pa, buf),
        }
    }

    /// Stores through virtual alias `va` of physical `pa`.
    ///
    /// Errors: as for [`CachedCpu::read_alias`].
    pub fn write_alias(&self, va: u64, pa: PhysAddr, data: &[u8]) -> Result<()> {
        match self.cached(pa) {
            Some(c) => c.cpu_write(&RawRam(self.m), va, pa, data),
            None => self.m.raw_write(pa, data),
        }
    }

    /// Cleans alias `va` of `[pa, pa + len)` (what `get_user_pages` does to the user alias on a
    /// VIPT machine before I/O, in seed 003).
    ///
    /// Errors: as for [`CachedCpu::read_alias`].
    pub fn clean_alias(&self, va: u64, pa: PhysAddr, len: u64) -> Result<()> {
        match self.cached(pa) {
            Some(c) => c.clean(&RawRam(self.m), va, pa, len),
            None => Ok(()),
        }
    }

    /// Cleans and drops alias `va` of `[pa, pa + len)`: what `get_user_pages` does to the user
    /// alias of a page on a VIPT machine before I/O (seed 003), so that no line of that alias
    /// is dirty (invisible to the device) or stale (hiding the device's writes) afterwards.
    ///
    /// Errors: as for [`CachedCpu::read_alias`].
    pub fn clean_invalidate_alias(&self, va: u64, pa: PhysAddr, len: u64) -> Result<()> {
        match self.cached(pa) {
            Some(c) => c.clean_invalidate(&RawRam(self.m), va, pa, len),
            None => Ok(()),
        }
    }

    /// Writes back and drops every line of the cache (see [`Cache::evict_all`]).
    ///
    /// Errors: RAM errors.
    pub fn evict_all(&self) -> Result<()> {
        match self.m.cache() {
            Some(c) => c.evict_all(&RawRam(self.m)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;

    /// A flat RAM of a few pages at physical address 0x10_0000.
    struct Flat(RefCell<Vec<u8>>);
    const BASE: u64 = 0x10_0000;

    impl Flat {
        fn new(pages: u64) -> Self {
            Flat(RefCell::new(vec![0; (pages * PAGE_SIZE) as usize]))
        }
        fn get(&self, pa: u64, len: usize) -> Vec<u8> {
            let o = (pa - BASE) as usize;
            self.0.borrow()[o..o + len].to_vec()
        }
    }

    impl Memory for Flat {
        fn load(&self, pa: PhysAddr, buf: &mut [u8]) -> Result<()> {
            let o = (pa.raw() - BASE) as usize;
            buf.copy_from_slice(&self.0.borrow()[o..o + buf.len()]);
            Ok(())
        }
        fn store(&self, pa: PhysAddr, data: &[u8]) -> Result<()> {
            let o = (pa.raw() - BASE) as usize;
            self.0.borrow_mut()[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    fn pa(off: u64) -> PhysAddr {
        PhysAddr::new(BASE + off)
    }

    #[test]
    fn a_dirty_line_is_invisible_to_a_non_coherent_device_until_cleaned() {
        let (m, c) = (Flat::new(4), Cache::new(CacheConfig::pipt()).unwrap());
        c.cpu_write(&m, 0, pa(0), b"fresh").unwrap();
        let mut got = [0u8; 5];
        c.device_read(&m, pa(0), &mut got, Snoop::None).unwrap();
        assert_eq!(&got, &[0; 5]);
        c.clean(&m, 0, pa(0), 5).unwrap();
        c.device_read(&m, pa(0), &mut got, Snoop::None).unwrap();
        assert_eq!(&got, b"fresh");
        assert_eq!(c.probe(0, pa(0)), Some(false), "clean keeps the line, clean");
    }

    #[test]
    fn a_stale_line_hides_device_writes_until_invalidated() {
        let (m, c) = (Flat::new(4), Cache::new(CacheConfig::pipt()).unwrap());
        c.prefetch(&m, 64, pa(64), 64).unwrap();
        c.device_write(&m, pa(64), b"device", Snoop::None).unwrap();
        let mut got = [0u8; 6];
        c.cpu_read(&m, 64, pa(64), &mut got).unwrap();
        assert_eq!(&got, &[0; 6]);
        c.invalidate(&m, 64, pa(64), 64).unwrap();
        c.cpu_read(&m, 64, pa(64), &mut got).unwrap();
        assert_eq!(&got, b"device");
    }

    #[test]
    fn a_dirty_line_evicted_during_dma_overwrites_what_the_device_wrote() {
        let (m, c) = (Flat::new(4), Cache::new(CacheConfig::pipt()).unwrap());
        c.cpu_write(&m, 0, pa(0), b"old").unwrap();
        c.device_write(&m, pa(0), b"new", Snoop::None).unwrap();
        c.evict_all(&m).unwrap();
        assert_eq!(m.get(BASE, 3), b"old", "the write-back clobbered the device's data");
        assert_eq!(c.counters().writebacks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn invalidate_discards_dirty_data_and_counts_it() {
        let (m, c) = (Flat::new(4), Cache::new(CacheConfig::pipt()).unwrap());
        c.cpu_write(&m, 0, pa(0), b"lost").unwrap();
        c.invalidate(&m, 0, pa(0), 4).unwrap();
        c.evict_all(&m).unwrap();
        assert_eq!(m.get(BASE, 4), [0; 4]);
        assert_eq!(c.counters().dirty_discards.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn pipt_aliases_of_one_line_share_it() {
        let (m, c) = (Flat::new(4), Cache::new(CacheConfig::pipt()).unwrap());
        c.cpu_write(&m, 0x7000_1000, pa(0), b"user").unwrap();
        let mut got = [0u8; 4];
        c.cpu_read(&m, 0x5000_3000, pa(0), &mut got).unwrap();
        assert_eq!(&got, b"user");
    }

    #[test]
    fn vipt_aliases_of_different_colours_hold_different_data() {
        let cfg = CacheConfig::vipt_aliasing();
        assert_eq!(cfg.colours(), 4);
        let (m, c) = (Flat::new(4), Cache::new(cfg).unwrap());
        let (user, kernel) = (0x7000_1000, 0x5000_2000); // colours 1 and 2
        c.cpu_write(&m, user, pa(0), b"user").unwrap();
        let mut got = [0u8; 4];
        c.cpu_read(&m, kernel, pa(0), &mut got).unwrap();
        assert_eq!(&got, &[0; 4], "the kernel alias filled its own copy from stale RAM");
        // Same colour: same set, same physical tag, one line.
        c.cpu_read(&m, 0x6000_5000, pa(0), &mut got).unwrap();
        assert_eq!(&got, b"user");
        // Cleaning the kernel alias does not write the user's data back.
        c.clean(&m, kernel, pa(0), 4).unwrap();
        assert_eq!(m.get(BASE, 4), [0; 4]);
        c.clean(&m, user, pa(0), 4).unwrap();
        assert_eq!(m.get(BASE, 4), b"user");
    }

    #[test]
    fn a_physical_snoop_finds_every_colour() {
        let (m, c) = (Flat::new(4), Cache::new(CacheConfig::vipt_aliasing()).unwrap());
        c.cpu_write(&m, 0x7000_3040, pa(0x40), b"dirty").unwrap();
        let mut got = [0u8; 5];
        c.device_read(&m, pa(0x40), &mut got, Snoop::Physical).unwrap();
        assert_eq!(&got, b"dirty");
        c.device_write(&m, pa(0x40), b"dev", Snoop::Physical).unwrap();
        assert_eq!(c.probe(0x7000_3040, pa(0x40)), None, "a snooped write drops the stale copy");
        c.cpu_read(&m, 0x7000_3040, pa(0x40), &mut got).unwrap();
        assert_eq!(&got, b"devty", "the write-back kept the bytes the device did not write");
    }

    #[test]
    fn a_coherence_index_snoops_exactly_one_alias() {
        let (m, c) = (Flat::new(4), Cache::new(CacheConfig::vipt_aliasing()).unwrap());
        let (user, kernel) = (0x7000_1000, 0x5000_2000);
        c.cpu_write(&m, kernel, pa(0), b"kern").unwrap();
        c.cpu_write(&m, user + 64, pa(64), b"user").unwrap();
        let mut got = [0u8; 4];
        c.device_read(&m, pa(0), &mut got, Snoop::Index(kernel)).unwrap();
        assert_eq!(&got, b"kern");
        c.device_read(&m, pa(64), &mut got, Snoop::Index(kernel)).unwrap();
        assert_eq!(&got, &[0; 4], "the user alias is not the indexed one");
        // An index in an untouched place finds nothing, whatever it is asked.
        let before = c.counters().snoop_hits.load(Ordering::Relaxed);
        c.device_read(&m, pa(0), &mut got, Snoop::Index(0x4000_3000)).unwrap();
        assert_eq!(c.counters().snoop_hits.load(Ordering::Relaxed), before);
    }

    #[test]
    fn lru_eviction_writes_back_the_oldest_dirty_way() {
        let cfg =
            CacheConfig { indexing: Indexing::Pipt, sets: 1, ways: 2, coherence: Coherence::NonCoherent };
        let (m, c) = (Flat::new(4), Cache::new(cfg).unwrap());
        c.cpu_write(&m, 0, pa(0), b"a").unwrap();
        c.cpu_write(&m, 64, pa(64), b"b").unwrap();
        let mut x = [0u8; 1];
        c.cpu_read(&m, 0, pa(0), &mut x).unwrap(); // line 0 is now the younger
        c.cpu_read(&m, 128, pa(128), &mut x).unwrap(); // evicts line 64
        assert_eq!(m.get(BASE + 64, 1), b"b");
        assert_eq!(m.get(BASE, 1), [0]);
        assert_eq!(c.probe(0, pa(0)), Some(true));
    }

    #[test]
    fn bad_shapes_and_aliases_are_errors() {
        let bad = CacheConfig { sets: 3, ..CacheConfig::pipt() };
        assert!(matches!(Cache::new(bad), Err(Error::InvalidArgument { value: 3, .. })));
        let bad = CacheConfig { ways: 0, ..CacheConfig::pipt() };
        assert!(matches!(Cache::new(bad), Err(Error::InvalidArgument { value: 0, .. })));
        let (m, c) = (Flat::new(1), Cache::new(CacheConfig::pipt()).unwrap());
        let mut b = [0u8; 2];
        assert!(matches!(c.cpu_read(&m, 0x1008, pa(0), &mut b), Err(Error::InvalidArgument { .. })));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u64, Vec<u8>),
        Read(u64, usize),
        Evict,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4 * PAGE_SIZE - 200, proptest::collection::vec(any::<u8>(), 1..200))
                .prop_map(|(a, d)| Op::Write(a, d)),
            (0..4 * PAGE_SIZE - 200, 1usize..200).prop_map(|(a, n)| Op::Read(a, n)),
            Just(Op::Evict),
        ]
    }

    proptest! {
        /// Through one alias, a write-back cache of any shape is invisible to the CPU: every read
        /// returns what a flat memory would, and after a final clean RAM equals that memory.
        #[test]
        fn one_alias_behaves_as_flat_memory(
            ops in proptest::collection::vec(op(), 1..60),
            vipt in any::<bool>(),
            sets in prop_oneof![Just(1u32), Just(4), Just(256)],
            ways in 1u32..4,
        ) {
            let indexing = if vipt { Indexing::Vipt } else { Indexing::Pipt };
            let cfg = CacheConfig { indexing, sets, ways, coherence: Coherence::NonCoherent };
            let (m, c) = (Flat::new(4), Cache::new(cfg).unwrap());
            let mut reference = vec![0u8; (4 * PAGE_SIZE) as usize];
            let va = 0x7000_3000; // a colour different from the PA's
            for o in ops {
                match o {
                    Op::Write(a, d) => {
                        c.cpu_write(&m, va + a, pa(a), &d).unwrap();
                        reference[a as usize..a as usize + d.len()].copy_from_slice(&d);
                    }
                    Op::Read(a, n) => {
                        let mut got = vec![0; n];
                        c.cpu_read(&m, va + a, pa(a), &mut got).unwrap();
                        prop_assert_eq!(&got[..], &reference[a as usize..a as usize + n]);
                    }
                    Op::Evict => c.evict_all(&m).unwrap(),
                }
            }
            c.clean(&m, va, pa(0), 4 * PAGE_SIZE).unwrap();
            prop_assert_eq!(m.get(BASE, reference.len()), reference);
        }
    }
}
