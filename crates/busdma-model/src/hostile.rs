//! A hostile device: it tries, by named classes of attack, to reach memory it was not given,
//! and the machine judges every attempt against its own ground truth.
//!
//! # Theory
//!
//! 1. **The attacks** are those that broke real IOMMU-protected kernels (Thunderclap, NDSS
//!    2019) plus the failure modes of busdma's own mechanisms ([`AttackClass`]): sub-page
//!    neighbours of a mapped buffer; an IOVA just after its unmap returned (strict); an IOVA
//!    inside the deferred-invalidation window; another domain's IOVAs; a random scan of the
//!    IOVA space; a page whose registration was dropped; bounce-page slack; a write through a
//!    to-device (read-only) mapping; a buffer's old IOVA after an invalidation failed and the
//!    buffer was torn down. Each attempt is one DMA read or write through the
//!    device's port, exactly as hardware would issue it.
//! 2. **Ground truth, not busdma's word.** Whether an access escaped is decided from two things
//!    the model keeps itself: the [`GroundTruth`] ledger, which the *scenario* (the driver
//!    side of a test) fills with the physical bytes it handed this device and the direction
//!    it allowed, from the moment a load returns to the moment its unload returns; and the
//!    bytes the access really reached on the bus ([`HostPlatform::watch_bus`]), whatever any
//!    IOMMU table, IOTLB or busdma structure says.
//! 3. **The verdict of one attempt.** Each byte the access reached is *given* if a grant covers
//!    it in that direction. A byte that is not given is an escape, with one exception: a page
//!    the platform handed out as a DMA page ([`PageKind::Dma`]: bounce pages, coherent
//!    buffers) carries copies, not owners; there a read escapes only for bytes labelled
//!    secret ([`is_secret`]), and a write only over bytes a read in the same attempt showed to
//!    be secret. So reading the zeroed padding of a dedicated bounce page is no escape, and
//!    finding another buffer's stale copy in it is.
//! 4. **Labels.** Scenarios fill every byte this device must not learn with a secret label
//!    (high bit set, [`secret_fill`]) and the device's own buffers with public bytes (high bit
//!    clear, [`public_fill`]); zero is padding. Labels only matter inside DMA pages, where
//!    ownership cannot be told by address.
//! 5. **Figures.** Per class, [`Tally`] counts attempts, faults (accesses the port refused),
//!    escapes (attempts that reached ungiven bytes) and bytes leaked (ungiven bytes read or
//!    written by escaping attempts).
#![forbid(unsafe_code)]

use busdma::{Iova, PAGE_SIZE, PhysAddr};

use crate::HostPlatform;
use crate::audit::{BusAccess, PageKind};
use crate::dma::DmaPort;

/// A named class of attack (the numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttackClass {
    /// 1: bytes next to a sub-page buffer, in the same page.
    SubPageNeighbour,
    /// 2: an IOVA right after its unmap returned, under strict invalidation.
    AfterUnmap,
    /// 3: an IOVA inside the deferred-invalidation window.
    DeferredWindow,
    /// 4: IOVAs live in another device's domain.
    OtherDomain,
    /// 5: random IOVAs over the whole input space.
    RandomScan,
    /// 6: a page whose user-memory registration was dropped.
    DroppedRegistration,
    /// 7: the slack of bounce pages around a bounced buffer.
    BounceSlack,
    /// 8: a write through a to-device (read-only) mapping.
    WriteReadOnly,
    /// 9: the old IOVA of a buffer (coherent, typed, streaming) torn down while the IOTLB
    /// invalidation failed, its pages then wanted by a next owner.
    FailedInvalidation,
}

impl AttackClass {
    /// Every class, in the order.
    pub const ALL: [AttackClass; 9] = [
        AttackClass::SubPageNeighbour,
        AttackClass::AfterUnmap,
        AttackClass::DeferredWindow,
        AttackClass::OtherDomain,
        AttackClass::RandomScan,
        AttackClass::DroppedRegistration,
        AttackClass::BounceSlack,
        AttackClass::WriteReadOnly,
        AttackClass::FailedInvalidation,
    ];

    /// The class's number, 1 to 9.
    pub fn number(self) -> usize {
        self as usize + 1
    }

    /// A short stable name (used in `dmalab attack` rows).
    pub fn name(self) -> &'static str {
        match self {
            AttackClass::SubPageNeighbour => "subpage-neighbour",
            AttackClass::AfterUnmap => "after-unmap",
            AttackClass::DeferredWindow => "deferred-window",
            AttackClass::OtherDomain => "other-domain",
            AttackClass::RandomScan => "random-scan",
            AttackClass::DroppedRegistration => "dropped-registration",
            AttackClass::BounceSlack => "bounce-slack",
            AttackClass::WriteReadOnly => "write-read-only",
            AttackClass::FailedInvalidation => "failed-invalidation",
        }
    }
}

/// What a grant lets the device do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The device may read (a to-device / `PREWRITE` buffer).
    Read,
    /// The device may write (a from-device / `PREREAD` buffer). Reading it back is allowed too:
    /// the bytes are the device's own.
    Write,
    /// Both.
    ReadWrite,
}

impl Access {
    fn allows(self, write: bool) -> bool {
        !write || self != Access::Read
    }
}

/// The physical bytes a device was legitimately given, right now.
#[derive(Clone, Debug, Default)]
pub struct GroundTruth {
    /// `(start, end, access)`: half-open physical ranges; several may overlap (a buffer loaded
    /// twice), each revoked on its own.
    grants: Vec<(u64, u64, Access)>,
}

impl GroundTruth {
    /// An empty ledger: the device was given nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the device may now use `[pa, pa + len)` as `access` (call when a load has
    /// returned the bus addresses).
    pub fn grant(&mut self, pa: PhysAddr, len: u64, access: Access) {
        self.grants.push((pa.raw(), pa.raw().saturating_add(len), access));
    }

    /// Withdraws one grant made with the same arguments (call when the unload has returned).
    /// Returns whether such a grant existed.
    pub fn revoke(&mut self, pa: PhysAddr, len: u64, access: Access) -> bool {
        let key = (pa.raw(), pa.raw().saturating_add(len), access);
        match self.grants.iter().position(|g| *g == key) {
            Some(i) => {
                self.grants.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Live grants.
    pub fn len(&self) -> usize {
        self.grants.len()
    }

    /// Whether nothing is granted.
    pub fn is_empty(&self) -> bool {
        self.grants.is_empty()
    }

    /// Whether one grant covers all of `[start, end)` for this direction.
    pub fn covers(&self, start: u64, end: u64, write: bool) -> bool {
        self.grants.iter().any(|&(s, e, a)| s <= start && end <= e && a.allows(write))
    }

    /// Whether byte `pa` is given for this direction.
    pub fn allows(&self, pa: u64, write: bool) -> bool {
        self.grants.iter().any(|&(s, e, a)| s <= pa && pa < e && a.allows(write))
    }
}

/// Per-class figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// DMA accesses tried.
    pub attempts: u64,
    /// Accesses the port refused (an IOMMU fault, a bus error).
    pub faults: u64,
    /// Attempts that reached bytes not given.
    pub escapes: u64,
    /// Bytes not given that escaping attempts read or wrote.
    pub bytes_leaked: u64,
}

impl Tally {
    /// Adds another tally.
    pub fn add(&mut self, o: &Tally) {
        self.attempts += o.attempts;
        self.faults += o.faults;
        self.escapes += o.escapes;
        self.bytes_leaked += o.bytes_leaked;
    }
}

/// The result of one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The port refused the access.
    Faulted,
    /// The access reached only bytes it was given.
    Contained,
    /// The access reached `bytes` bytes it was not given.
    Escaped {
        /// Bytes not given that it read or wrote.
        bytes: u64,
    },
}

/// Whether a byte carries the secret label (high bit set).
#[inline]
pub fn is_secret(b: u8) -> bool {
    b & 0x80 != 0
}

/// `len` secret-labelled bytes derived from `seed`: never zero, high bit always set.
pub fn secret_fill(seed: u64, len: usize) -> Vec<u8> {
    label_fill(seed, len, 0x80)
}

/// `len` public bytes derived from `seed`: never zero, high bit always clear.
pub fn public_fill(seed: u64, len: usize) -> Vec<u8> {
    label_fill(seed, len, 0)
}

fn label_fill(seed: u64, len: usize, high: u8) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x = xorshift(x);
            // 1..=127 in the low seven bits: never zero, so padding is always distinguishable.
            high | ((x % 127) as u8 + 1)
        })
        .collect()
}

/// xorshift64: a tiny, fast, deterministic generator (reproducible attack sequences); not
/// for anything cryptographic.
#[inline]
pub fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// How the hostile device reaches memory: a DMA port by any other name. Every
/// [`DmaPort`] is one (a [`crate::DirectPort`], a model IOMMU's port).
pub trait AttackPort {
    /// Reads at bus address `bus`; `false` if the access was refused.
    fn attack_read(&self, bus: u64, buf: &mut [u8]) -> bool;
    /// Writes at bus address `bus`; `false` if the access was refused.
    fn attack_write(&self, bus: u64, data: &[u8]) -> bool;
}

impl<T: DmaPort + ?Sized> AttackPort for T {
    fn attack_read(&self, bus: u64, buf: &mut [u8]) -> bool {
        self.dma_read(Iova::new(bus), buf).is_ok()
    }
    fn attack_write(&self, bus: u64, data: &[u8]) -> bool {
        self.dma_write(Iova::new(bus), data).is_ok()
    }
}

/// A device that attacks. See the module documentation.
pub struct HostileDevice<'m> {
    m: &'m HostPlatform,
    truth: GroundTruth,
    tallies: [Tally; AttackClass::ALL.len()],
    rng: u64,
}

impl<'m> HostileDevice<'m> {
    /// A device on machine `m`, given nothing yet; `seed` makes its random choices
    /// reproducible.
    pub fn new(m: &'m HostPlatform, seed: u64) -> Self {
        Self {
            m,
            truth: GroundTruth::new(),
            tallies: [Tally::default(); AttackClass::ALL.len()],
            rng: seed | 1,
        }
    }

    /// The ground-truth ledger the scenario keeps for this device.
    pub fn truth(&mut self) -> &mut GroundTruth {
        &mut self.truth
    }

    /// A pseudo-random number (the device's own choices: scan addresses, lengths).
    pub fn random(&mut self) -> u64 {
        self.rng = xorshift(self.rng);
        self.rng
    }

    /// The figures of one class.
    pub fn tally(&self, class: AttackClass) -> Tally {
        self.tallies[class.number() - 1]
    }

    /// The figures of every class together.
    pub fn total(&self) -> Tally {
        let mut t = Tally::default();
        for x in &self.tallies {
            t.add(x);
        }
        t
    }

    /// One read attempt of `len` bytes at bus address `bus`.
    pub fn try_read(&mut self, class: AttackClass, port: &dyn AttackPort, bus: u64, len: usize) -> Outcome {
        let mut buf = vec![0u8; len];
        let (ok, seen) = self.m.watch_bus(|| port.attack_read(bus, &mut buf));
        let outcome = if ok { self.judge(&seen, &buf, None) } else { Outcome::Faulted };
        self.count(class, outcome)
    }

    /// One write attempt: the device first reads what is there (so that the verdict knows what
    /// it overwrote), then writes `data` at bus address `bus`. The read is part of the attempt;
    /// if it is refused the write is still tried. A refused write is a fault unless the read
    /// escaped.
    pub fn try_write(&mut self, class: AttackClass, port: &dyn AttackPort, bus: u64, data: &[u8]) -> Outcome {
        let mut before = vec![0u8; data.len()];
        let ((read_ok, write_ok), seen) = self.m.watch_bus(|| {
            let r = port.attack_read(bus, &mut before);
            (r, port.attack_write(bus, data))
        });
        let outcome = if !write_ok {
            // The write was refused; the read alone may still have escaped.
            match read_ok.then(|| self.judge(&seen, &before, None)) {
                Some(escaped @ Outcome::Escaped { .. }) => escaped,
                _ => Outcome::Faulted,
            }
        } else {
            self.judge(&seen, &before, read_ok.then_some(before.as_slice()))
        };
        self.count(class, outcome)
    }

    fn count(&mut self, class: AttackClass, outcome: Outcome) -> Outcome {
        let t = &mut self.tallies[class.number() - 1];
        t.attempts += 1;
        match outcome {
            Outcome::Faulted => t.faults += 1,
            Outcome::Contained => {}
            Outcome::Escaped { bytes } => {
                t.escapes += 1;
                t.bytes_leaked += bytes;
            }
        }
        outcome
    }

    /// The verdict over the bus accesses of one attempt. `read_data` holds what the reads
    /// returned, in order; `overwritten` what a write replaced (from the attempt's own read).
    fn judge(&self, seen: &[BusAccess], read_data: &[u8], overwritten: Option<&[u8]>) -> Outcome {
        let mut leaked = 0u64;
        let mut read_at = 0usize; // offset of the next read's bytes in `read_data`
        let mut write_at = 0usize;
        for a in seen {
            let (start, end) = (a.pa.raw(), a.pa.raw().saturating_add(a.len));
            if self.truth.covers(start, end, a.write) {
                // Fast path: one grant covers the whole access.
                if a.write {
                    write_at += a.len as usize;
                } else {
                    read_at += a.len as usize;
                }
                continue;
            }
            for i in 0..a.len {
                let pa = a.pa.raw() + i;
                let data_index = if a.write { write_at + i as usize } else { read_at + i as usize };
                if self.truth.allows(pa, a.write) {
                    continue;
                }
                let dma_page = self.m.page_kind(PhysAddr::new(pa)) == PageKind::Dma;
                let escaped = if !dma_page {
                    true
                } else if a.write {
                    // Over a DMA page, a write escapes if it replaced secret bytes (or bytes it
                    // could not see first).
                    overwritten.and_then(|o| o.get(data_index)).is_none_or(|&b| is_secret(b))
                } else {
                    read_data.get(data_index).is_some_and(|&b| is_secret(b))
                };
                leaked += u64::from(escaped);
            }
            if a.write {
                write_at += a.len as usize;
            } else {
                read_at += a.len as usize;
            }
        }
        if leaked == 0 { Outcome::Contained } else { Outcome::Escaped { bytes: leaked } }
    }
}

/// The page of a bus address (for scenarios that aim at neighbours and slack).
pub fn page_base(addr: u64) -> u64 {
    addr & !(PAGE_SIZE - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MachineConfig;
    use busdma::{PageRequest, Platform};

    /// A device wired straight to RAM: bus address = physical address, no protection at all.
    struct Wired<'m>(&'m HostPlatform);

    impl AttackPort for Wired<'_> {
        fn attack_read(&self, bus: u64, buf: &mut [u8]) -> bool {
            self.0.read_phys(PhysAddr::new(bus), buf).is_ok()
        }
        fn attack_write(&self, bus: u64, data: &[u8]) -> bool {
            self.0.write_phys(PhysAddr::new(bus), data).is_ok()
        }
    }

    /// A port that refuses everything, as an IOMMU with nothing mapped does.
    struct Closed;

    impl AttackPort for Closed {
        fn attack_read(&self, _: u64, _: &mut [u8]) -> bool {
            false
        }
        fn attack_write(&self, _: u64, _: &[u8]) -> bool {
            false
        }
    }

    fn machine() -> HostPlatform {
        HostPlatform::new(MachineConfig { cpus: 1, ..MachineConfig::with_ram(8 << 20) }).unwrap()
    }

    #[test]
    fn an_unprotected_device_escapes_to_the_neighbours_of_its_buffer() {
        let m = machine();
        let f = m.alloc_frames(crate::FrameRequest::pages(1)).unwrap();
        let buf = f.pa().checked_add(1024).unwrap();
        let mut d = HostileDevice::new(&m, 7);
        d.truth().grant(buf, 512, Access::Read);
        let bus = buf.raw();
        assert_eq!(d.try_read(AttackClass::SubPageNeighbour, &Wired(&m), bus, 512), Outcome::Contained);
        assert_eq!(
            d.try_read(AttackClass::SubPageNeighbour, &Wired(&m), bus - 16, 32),
            Outcome::Escaped { bytes: 16 }
        );
        // Writing its own read-only buffer: the read is fine, every written byte escapes.
        assert_eq!(
            d.try_write(AttackClass::WriteReadOnly, &Wired(&m), bus, &[1; 8]),
            Outcome::Escaped { bytes: 8 }
        );
        let t = d.tally(AttackClass::SubPageNeighbour);
        assert_eq!((t.attempts, t.escapes, t.bytes_leaked, t.faults), (2, 1, 16, 0));
        assert_eq!(d.total().escapes, 2);
    }

    #[test]
    fn a_revoked_grant_makes_the_same_access_an_escape() {
        let m = machine();
        let f = m.alloc_frames(crate::FrameRequest::pages(1)).unwrap();
        let mut d = HostileDevice::new(&m, 1);
        d.truth().grant(f.pa(), PAGE_SIZE, Access::Write);
        assert_eq!(
            d.try_write(AttackClass::AfterUnmap, &Wired(&m), f.pa().raw(), &[5; 64]),
            Outcome::Contained
        );
        assert!(d.truth().revoke(f.pa(), PAGE_SIZE, Access::Write));
        assert!(!d.truth().revoke(f.pa(), PAGE_SIZE, Access::Write));
        assert_eq!(
            d.try_read(AttackClass::AfterUnmap, &Wired(&m), f.pa().raw(), 64),
            Outcome::Escaped { bytes: 64 }
        );
    }

    #[test]
    fn in_dma_pages_only_secret_bytes_escape() {
        let m = machine();
        let bounce = m.alloc_pages(&PageRequest::pages(1)).unwrap();
        let mut d = HostileDevice::new(&m, 3);
        // The page holds the device's own (public) copy, zero padding, and a stale secret.
        m.write_phys(bounce, &public_fill(1, 100)).unwrap();
        m.write_phys(bounce.checked_add(2048).unwrap(), &secret_fill(2, 10)).unwrap();
        let port = Wired(&m);
        assert_eq!(d.try_read(AttackClass::BounceSlack, &port, bounce.raw(), 2048), Outcome::Contained);
        assert_eq!(
            d.try_read(AttackClass::BounceSlack, &port, bounce.raw() + 2040, 40),
            Outcome::Escaped { bytes: 10 }
        );
        // Overwriting padding harms no one; overwriting the secret does.
        assert_eq!(
            d.try_write(AttackClass::BounceSlack, &port, bounce.raw() + 1000, &[9; 16]),
            Outcome::Contained
        );
        assert_eq!(
            d.try_write(AttackClass::BounceSlack, &port, bounce.raw() + 2044, &[9; 8]),
            Outcome::Escaped { bytes: 8 },
            "4 secret bytes read, the same 4 overwritten"
        );
    }

    #[test]
    fn refused_accesses_are_faults_not_escapes() {
        let m = machine();
        let mut d = HostileDevice::new(&m, 9);
        for _ in 0..10 {
            let bus = d.random();
            assert_eq!(d.try_read(AttackClass::RandomScan, &Closed, bus, 8), Outcome::Faulted);
        }
        assert_eq!(d.try_write(AttackClass::RandomScan, &Closed, 0, &[1]), Outcome::Faulted);
        let t = d.tally(AttackClass::RandomScan);
        assert_eq!((t.attempts, t.faults, t.escapes), (11, 11, 0));
    }

    #[test]
    fn labels_are_never_zero_and_keep_their_side() {
        assert!(secret_fill(5, 4096).iter().all(|&b| b != 0 && is_secret(b)));
        assert!(public_fill(5, 4096).iter().all(|&b| b != 0 && !is_secret(b)));
        assert_eq!(AttackClass::ALL.map(AttackClass::number), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    }
}
