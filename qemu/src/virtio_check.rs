//! Drivers written elsewhere on busdma: rcore-os `virtio-drivers` (blk, net, console) through
//! busdma's `virtio` feature, with every device behind VT-d (`iommu_platform=on,
//! disable-legacy=on`, so the device's DMA is translated and the driver must accept
//! `VIRTIO_F_ACCESS_PLATFORM`).
//!
//! Each device is attached by `busdma::device` under a strict and under a deferred policy in
//! turn; its driver runs inside its `HalSlot`'s scope. The serving path, [`serve`], is generic
//! over `busdma::device::DmaDevice` and shared with the virtio-iommu checks
//! (`viommu_virtio.rs`): the caller attaches, `serve` serves, checks that the driver gave
//! everything back and detaches. Requests are submitted with the
//! drivers' non-blocking calls and polled with a bound, reading VT-d's fault records while
//! polling, so a device that faults is reported (with the fault) instead of spinning. Each
//! round prints maps, unmaps, IOTLB invalidations and bounced bytes per I/O request.
//!
//! What the runner (`qemu/run`) gives the kernel: a raw disk image (virtio-blk), two
//! virtio-net NICs on one QEMU hub (no network outside QEMU) and a virtio console whose output
//! goes to a file; it checks the image and the file on the host after QEMU exits.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::ptr::NonNull;

use busdma::device::{Device, DmaDevice, Iommu, Policy};
use busdma::front::strategy::Strategy;
use busdma::quickmap::QuickMaps;
use busdma::virtio::{AccessPlatform, BusdmaHal, HalSlot, VirtioDma, VirtioKernel, VirtioStats};
use busdma::vtd::SourceId;
use busdma::{PhysAddr, Platform};
use virtio_drivers::device::blk::{BlkReq, BlkResp, SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{Cam, DeviceFunction, MmioCam, PciRoot};

use crate::domain::Unit;
use crate::pci::Bdf;
use crate::platform::PLATFORM;
use crate::println;

type CheckResult = Result<(), String>;

/// q35's PCIe ECAM (MMCONFIG) window.
const ECAM: u64 = 0xb000_0000;
/// The identity map (boot.rs) covers the low 4 GiB, where SeaBIOS puts the BARs.
const IDENTITY_END: u64 = 1 << 32;
/// Red Hat's virtio vendor id; modern (non-transitional) device ids are 0x1040 + type.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// virtio-net, virtio-blk and virtio-console (modern ids).
pub const NET: u16 = 0x1041;
/// virtio-blk.
pub const BLK: u16 = 0x1042;
/// virtio-console.
pub const CONSOLE: u16 = 0x1043;
/// Blocks each policy's round writes and reads back (the runner checks 2 × this many).
pub const BLOCKS: usize = 8;
/// Largest single mapping a virtio device asks for (queues and buffers are far smaller).
pub const MAX_MAP: u64 = 64 << 10;
/// virtio-pci devices on x86 snoop CPU caches (PCIe), whatever the VT-d unit's ECAP.C says
/// about its own table walks: queue memory is write-back.
/// Polls of a virtqueue before a request counts as lost (VT-d fault records are read every
/// `FAULT_EVERY` polls and end the wait at once).
const POLL_LIMIT: u64 = 1 << 26;
const FAULT_EVERY: u64 = 1 << 10;
/// Virtqueue size of the net driver.
pub(crate) const NET_QUEUE: usize = 16;
/// An EtherType for local experiments (IEEE 802 local experimental 1).
pub(crate) const ETHERTYPE: u16 = 0x88b5;

fn mmio(pa: PhysAddr, size: usize) -> NonNull<u8> {
    let end = pa.raw().checked_add(size as u64);
    assert!(end.is_some_and(|e| e <= IDENTITY_END), "virtio BAR {pa}+{size:#x} outside the identity map");
    NonNull::new(pa.raw() as *mut u8).expect("BAR at address 0")
}

macro_rules! virtio_kernel {
    ($kernel:ident, $slot:ident) => {
        static $slot: HalSlot = HalSlot::new();
        /// The slot and MMIO of one virtio device.
        pub struct $kernel;
        // SAFETY: `mmio` hands back the identity-mapped address of a BAR range below 4 GiB,
        // which no Rust allocation or reference covers (RAM ends far below SeaBIOS's window).
        unsafe impl VirtioKernel for $kernel {
            fn slot() -> &'static HalSlot {
                &$slot
            }
            unsafe fn mmio_phys_to_virt(pa: PhysAddr, size: usize) -> NonNull<u8> {
                mmio(pa, size)
            }
        }
    };
}
virtio_kernel!(BlkK, BLK_SLOT);
virtio_kernel!(NetAK, NET_A_SLOT);
// The virtio-net peer of the e1000 check (e1000_check.rs).
virtio_kernel!(E1000PeerK, E1000_PEER_SLOT);
virtio_kernel!(NetBK, NET_B_SLOT);
virtio_kernel!(ConsoleK, CONSOLE_SLOT);

pub type Transport = AccessPlatform<PciTransport>;

pub(crate) fn e2s(e: busdma::Error) -> String {
    format!("{e}")
}

pub fn v2s(e: virtio_drivers::Error) -> String {
    format!("virtio: {e:?}")
}

/// The virtio devices the runner gave this configuration.
#[derive(Default)]
pub struct Found {
    /// The disk.
    pub blk: Option<Bdf>,
    /// The two NICs on one hub.
    pub net: Vec<Bdf>,
    /// The console.
    pub console: Option<Bdf>,
}

impl Found {
    /// Records `bdf` if it is a virtio device of ours.
    pub fn add(&mut self, bdf: Bdf, vendor: u16, device: u16) {
        match (vendor, device) {
            (VIRTIO_VENDOR, BLK) => self.blk = Some(bdf),
            (VIRTIO_VENDOR, NET) => self.net.push(bdf),
            (VIRTIO_VENDOR, CONSOLE) => self.console = Some(bdf),
            _ => {}
        }
    }

    /// Whether the runner gave any.
    pub fn any(&self) -> bool {
        self.blk.is_some() || !self.net.is_empty() || self.console.is_some()
    }
}

/// After a driver's drop: no queue allocation or share outstanding (`outstanding`, as
/// `VirtioDma::outstanding` counts them) and no unshare whose unload failed.
pub(crate) fn drained((queues, shares): (usize, usize), stats: &VirtioStats) -> CheckResult {
    if queues != 0 || shares != 0 {
        return Err(format!(
            "{queues} queue allocations and {shares} shares outstanding after the driver's drop"
        ));
    }
    if counter(&stats.unload_errors) != 0 {
        return Err("an unshare's unload failed".into());
    }
    Ok(())
}

/// The PCI transport of `bdf` for `K`'s Hal, wrapped to accept ACCESS_PLATFORM.
pub fn transport<K: VirtioKernel>(bdf: Bdf) -> Result<Transport, String> {
    bdf.enable();
    // SAFETY: q35's ECAM window is identity-mapped MMIO; this root lives only while the
    // transport is built, and nothing else touches configuration space meanwhile.
    let mut root = PciRoot::new(unsafe { MmioCam::new(ECAM as *mut u8, Cam::Ecam) });
    let df = DeviceFunction { bus: bdf.bus, device: bdf.dev, function: bdf.func };
    let t = PciTransport::new::<BusdmaHal<K>, _>(&mut root, df)
        .map_err(|e| format!("pci transport {bdf}: {e:?}"))?;
    Ok(AccessPlatform::new(t))
}

/// Counters read before and after a batch of requests.
struct Counters {
    shares: u64,
    maps: u64,
    unmaps: u64,
    iotlb: u64,
    bounced: u64,
}

impl Counters {
    fn read(vtd: &Unit, dev: &Device<'_, '_, &Unit>, dma: &dyn Served) -> Self {
        let (mut maps, mut unmaps) = (0, 0);
        if let Some(d) = dev.domain() {
            let s = d.domain().stats();
            maps = s.maps;
            unmaps = s.unmaps;
        }
        let s = dma.stats();
        let bounced = counter(&s.bounced_in) + counter(&s.bounced_out);
        Self { shares: counter(&s.shares), maps, unmaps, iotlb: vtd.stats().iotlb_total(), bounced }
    }

    /// Two devices' counters summed (the unit's IOTLB count is shared: taken once).
    fn plus(self, other: Counters) -> Self {
        Self {
            shares: self.shares + other.shares,
            maps: self.maps + other.maps,
            unmaps: self.unmaps + other.unmaps,
            iotlb: self.iotlb,
            bounced: self.bounced + other.bounced,
        }
    }

    /// "per request: ..." with the deltas since `before` over `n` requests (two decimals).
    fn per_request(&self, before: &Counters, n: u64) -> String {
        let f = |a: u64, b: u64| crate::checks::per_n(a - b, n);
        format!(
            "per request: {} shares, {} maps, {} unmaps, {} IOTLB invalidations, {} bounced bytes",
            f(self.shares, before.shares),
            f(self.maps, before.maps),
            f(self.unmaps, before.unmaps),
            f(self.iotlb, before.iotlb),
            f(self.bounced, before.bounced)
        )
    }
}

pub fn counter(c: &busdma::sync::AtomicU64) -> u64 {
    c.load(core::sync::atomic::Ordering::Relaxed)
}

/// The IOMMU's fault reporting while a request is polled: the first pending fault record, as
/// text (VT-d's fault registers, virtio-iommu's event queue), the rest drained.
pub type Faults<'a> = &'a dyn Fn() -> Option<String>;

/// VT-d's fault records as [`Faults`].
pub(crate) fn vtd_faults(vtd: &Unit) -> impl Fn() -> Option<String> + '_ {
    move || {
        let f = vtd.take_fault()?;
        while vtd.take_fault().is_some() {}
        Some(format!("VT-d fault {f:?}"))
    }
}

/// Polls `done` until it holds, reading fault records every `FAULT_EVERY` polls: a fault or
/// `POLL_LIMIT` polls end the wait with an error naming it.
pub(crate) fn wait(faults: Faults<'_>, what: &str, mut done: impl FnMut() -> bool) -> CheckResult {
    for i in 0..POLL_LIMIT {
        if done() {
            return Ok(());
        }
        if i % FAULT_EVERY == 0
            && let Some(f) = faults()
        {
            return Err(format!("{what}: {f}"));
        }
        core::hint::spin_loop();
    }
    Err(format!("{what}: no completion after {POLL_LIMIT} polls"))
}

/// The device side of busdma's virtio adapter with its strategies erased: a `VirtioDma` over
/// any device (VT-d's, virtio-iommu's) and any share strategy (bounce ring, streaming maps,
/// pre-mapped pool, hybrid), as [`serve`] hands it to a round.
pub(crate) trait Served {
    /// Runs `f` with this `VirtioDma` installed in `slot` (the Hal of its driver); a failure
    /// is reported with busdma's last error, if any.
    fn serve(&self, slot: &HalSlot, f: &mut dyn FnMut() -> CheckResult) -> CheckResult;
    /// The adapter's counters.
    fn stats(&self) -> &VirtioStats;
    /// Takes back the shares a dropped driver left posted (`VirtioDma::reclaim_shares`).
    fn reclaim(&self) -> busdma::Result<usize>;
    /// Queue allocations and shares outstanding (`VirtioDma::outstanding`).
    fn outstanding(&self) -> (usize, usize);
}

impl<P: Platform, Q: Strategy<P>, S: Strategy<P>> Served for VirtioDma<'_, P, Q, S> {
    fn serve(&self, slot: &HalSlot, f: &mut dyn FnMut() -> CheckResult) -> CheckResult {
        slot.scope(self, f).map_err(e2s)?.map_err(|e| match self.last_error() {
            Some(b) => format!("{e} (busdma: {b})"),
            None => e,
        })
    }
    fn stats(&self) -> &VirtioStats {
        VirtioDma::stats(self)
    }
    fn reclaim(&self) -> busdma::Result<usize> {
        self.reclaim_shares()
    }
    fn outstanding(&self) -> (usize, usize) {
        VirtioDma::outstanding(self)
    }
}

/// The one attach-and-serve path of the virtio checks, written against
/// `busdma::device::DmaDevice` (VT-d's `Device`, virtio-iommu's `ViommuDevice`), as
/// `device_check::edu_round_trip` is for edu. The caller attached `dev`. `dma` builds the
/// device's `VirtioDma` from it (a tag of the device: the bounce ring, or a pool of its
/// domain) and hands it to the continuation it is given, which runs `round`, takes back the
/// shares the dropped driver left posted and checks that nothing is outstanding; everything
/// `dma` built is dropped when it returns. Then `dev` is detached (`DmaDevice::detach`: queued
/// invalidations sent, refused while anything of the driver still holds the domain).
pub(crate) fn serve<'a, D: DmaDevice<'a>, R>(
    dev: D,
    dma: impl FnOnce(&D, &mut dyn FnMut(&dyn Served) -> CheckResult) -> CheckResult,
    round: impl FnOnce(&D, &dyn Served) -> Result<R, String>,
) -> Result<R, String> {
    let (mut round, mut out) = (Some(round), None);
    let r = dma(&dev, &mut |served| {
        let round = round.take().ok_or("the device's VirtioDma was served twice")?;
        out = Some(round(&dev, served)?);
        // The driver is gone and its transport reset the device: buffers it left posted
        // (the console's receive buffer) are busdma's bounce memory, reclaimed here.
        let reclaimed = served.reclaim().map_err(e2s)?;
        if reclaimed > 0 {
            println!(
                "virtio {}: {reclaimed} share(s) left posted by the dropped driver reclaimed",
                policy_name(dev.policy())
            );
        }
        drained(served.outstanding(), served.stats())
    });
    // The round's own failure first: a failed round leaks what the driver left (module
    // `busdma::virtio`, theory 6), so the detach then finds the device busy.
    let detached = dev.detach().map_err(|e| format!("detach: {e:?}"));
    match (r, detached, out) {
        (Err(e), Err(d), _) => Err(format!("{e}; {d}")),
        (Err(e), Ok(()), _) | (Ok(()), Err(e), _) => Err(e),
        (Ok(()), Ok(()), Some(v)) => Ok(v),
        (Ok(()), Ok(()), None) => Err("the device's VirtioDma was never served".into()),
    }
}

/// VT-d: attaches `bdf` under `policy` and [`serve`]s it through the bounce ring of a tag of
/// the device (`VirtioDma::new`), `f` run in `K`'s slot.
pub(crate) fn with_device<K: VirtioKernel, R>(
    iommu: &Iommu<'_, &Unit>,
    bdf: Bdf,
    policy: Policy,
    f: impl FnOnce(&Device<'_, '_, &Unit>, &dyn Served) -> Result<R, String>,
) -> Result<R, String> {
    let dev = iommu.attach(SourceId(bdf.source_id()), policy).map_err(e2s)?;
    serve(
        dev,
        |dev, k| k(&VirtioDma::new(dev, MAX_MAP, true).map_err(e2s)?),
        |dev, dma| {
            let (mut f, mut out) = (Some(f), None);
            dma.serve(K::slot(), &mut || {
                let f = f.take().ok_or("the round ran twice")?;
                out = Some(f(dev, dma)?);
                Ok(())
            })?;
            out.ok_or_else(|| "the round did not run".into())
        },
    )
}

pub(crate) fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::Strict => "strict",
        Policy::Deferred => "deferred",
        Policy::Untrusted => "untrusted",
        _ => "other",
    }
}

/// What block `i` holds: the 16-byte line `blk NNNN busdma\n`, 32 times (the runner rebuilds
/// it with printf to check the image).
pub fn block_pattern(i: usize) -> Vec<u8> {
    let line = format!("blk {i:04} busdma\n");
    line.as_bytes().iter().copied().cycle().take(SECTOR_SIZE).collect()
}

/// virtio-blk under `policy`: writes `BLOCKS` blocks from `first`, reads them back and
/// compares.
pub fn blk(vtd: &Unit, iommu: &Iommu<'_, &Unit>, bdf: Bdf, policy: Policy, first: usize) -> CheckResult {
    with_device::<BlkK, _>(iommu, bdf, policy, |dev, dma| {
        let mut blk = VirtIOBlk::<BusdmaHal<BlkK>, Transport>::new(transport::<BlkK>(bdf)?).map_err(v2s)?;
        let before = Counters::read(vtd, dev, dma);
        blk_io(&mut blk, &vtd_faults(vtd), first, BLOCKS)?;
        let after = Counters::read(vtd, dev, dma);
        println!(
            "virtio-blk {}: {} writes + {} reads of {SECTOR_SIZE} bytes, {}",
            policy_name(policy),
            BLOCKS,
            BLOCKS,
            after.per_request(&before, 2 * BLOCKS as u64)
        );
        drop(blk);
        Ok(())
    })
}

/// Writes `count` blocks from `first` (block `i` holds [`block_pattern`]`(i)`), then reads
/// them back and compares, each request polled with `faults` read.
pub fn blk_io<H: virtio_drivers::Hal>(
    blk: &mut VirtIOBlk<H, Transport>,
    faults: Faults<'_>,
    first: usize,
    count: usize,
) -> CheckResult {
    blk_io_with(blk, faults, first, count, &block_pattern)
}

/// [`blk_io`] with block `i` holding `pattern(i)`.
pub fn blk_io_with<H: virtio_drivers::Hal>(
    blk: &mut VirtIOBlk<H, Transport>,
    faults: Faults<'_>,
    first: usize,
    count: usize,
    pattern: &dyn Fn(usize) -> Vec<u8>,
) -> CheckResult {
    if (blk.capacity() as usize) < first + count {
        return Err(format!("disk has {} blocks", blk.capacity()));
    }
    for i in first..first + count {
        let data = pattern(i);
        let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
        // SAFETY: `req`, `data` and `resp` stay alive and untouched until the completion
        // below (or leak with the driver if it never comes: we return with an error and the
        // driver's drop resets the device).
        let token = unsafe { blk.write_blocks_nb(i, &mut req, &data, &mut resp) }.map_err(v2s)?;
        wait(faults, "virtio-blk write", || blk.peek_used() == Some(token))?;
        // SAFETY: the same buffers as the submission.
        unsafe { blk.complete_write_blocks(token, &req, &data, &mut resp) }.map_err(v2s)?;
    }
    for i in first..first + count {
        let mut got = vec![0u8; SECTOR_SIZE];
        let (mut req, mut resp) = (BlkReq::default(), BlkResp::default());
        // SAFETY: as for the writes.
        let token = unsafe { blk.read_blocks_nb(i, &mut req, &mut got, &mut resp) }.map_err(v2s)?;
        wait(faults, "virtio-blk read", || blk.peek_used() == Some(token))?;
        // SAFETY: the same buffers as the submission.
        unsafe { blk.complete_read_blocks(token, &req, &mut got, &mut resp) }.map_err(v2s)?;
        if got != pattern(i) {
            return Err(format!("block {i} read back differs from what was written"));
        }
    }
    Ok(())
}

/// One frame from `tx` to `rx`: the receiver posts a buffer first, the sender transmits, both
/// complete; the frame must arrive byte for byte.
pub fn exchange<HA, HB>(
    faults: Faults<'_>,
    tx: &mut VirtIONetRaw<HA, Transport, NET_QUEUE>,
    rx: &mut VirtIONetRaw<HB, Transport, NET_QUEUE>,
    tag: u8,
) -> CheckResult
where
    HA: virtio_drivers::Hal,
    HB: virtio_drivers::Hal,
{
    let mut frame = Vec::new();
    frame.extend_from_slice(&rx.mac_address());
    frame.extend_from_slice(&tx.mac_address());
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend((0..200u32).map(|i| (i as u8).wrapping_mul(tag) ^ tag));
    let mut txbuf = vec![0u8; 2048];
    let hdr = tx.fill_buffer_header(&mut txbuf).map_err(v2s)?;
    txbuf[hdr..hdr + frame.len()].copy_from_slice(&frame);
    txbuf.truncate(hdr + frame.len());
    let mut rxbuf = vec![0u8; 2048];
    // SAFETY: `rxbuf` stays alive and untouched until `receive_complete` below (on an error
    // return the drivers' drops reset both devices before the buffers go).
    let rtoken = unsafe { rx.receive_begin(&mut rxbuf) }.map_err(v2s)?;
    // SAFETY: as above, for `txbuf` until `transmit_complete`.
    let ttoken = unsafe { tx.transmit_begin(&txbuf) }.map_err(v2s)?;
    wait(faults, "virtio-net transmit", || tx.poll_transmit() == Some(ttoken))?;
    // SAFETY: the buffer of the submission.
    unsafe { tx.transmit_complete(ttoken, &txbuf) }.map_err(v2s)?;
    wait(faults, "virtio-net receive", || rx.poll_receive() == Some(rtoken))?;
    // SAFETY: the buffer of the submission.
    let (h, len) = unsafe { rx.receive_complete(rtoken, &mut rxbuf) }.map_err(v2s)?;
    if rxbuf[h..h + len] != frame[..] {
        return Err(format!("frame {tag} arrived as {len} bytes that differ from the {} sent", frame.len()));
    }
    Ok(())
}

/// Two virtio-net NICs on one QEMU hub, one strict and one deferred (then the other way round):
/// a frame each way, verified byte for byte.
pub fn net(vtd: &Unit, iommu: &Iommu<'_, &Unit>, a: Bdf, b: Bdf, policies: (Policy, Policy)) -> CheckResult {
    with_device::<NetAK, _>(iommu, a, policies.0, |da, dmaa| {
        with_device::<NetBK, _>(iommu, b, policies.1, |db, dmab| {
            let mut na = VirtIONetRaw::<BusdmaHal<NetAK>, Transport, NET_QUEUE>::new(transport::<NetAK>(a)?)
                .map_err(v2s)?;
            let mut nb = VirtIONetRaw::<BusdmaHal<NetBK>, Transport, NET_QUEUE>::new(transport::<NetBK>(b)?)
                .map_err(v2s)?;
            let before = Counters::read(vtd, da, dmaa).plus(Counters::read(vtd, db, dmab));
            exchange(&vtd_faults(vtd), &mut na, &mut nb, 0x21)?;
            exchange(&vtd_faults(vtd), &mut nb, &mut na, 0x43)?;
            let after = Counters::read(vtd, da, dmaa).plus(Counters::read(vtd, db, dmab));
            println!(
                "virtio-net {}+{}: 2 frames (A->B, B->A), 4 requests, {}",
                policy_name(policies.0),
                policy_name(policies.1),
                after.per_request(&before, 4)
            );
            drop(na);
            drop(nb);
            Ok(())
        })
    })
}

/// The line the console check writes (the runner looks for it in the console's file).
pub fn console_line(policy: Policy) -> String {
    format!("busdma virtio-console {} ok\n", policy_name(policy))
}

/// virtio-console under `policy`: writes one line (the runner checks the host file).
pub fn console(vtd: &Unit, iommu: &Iommu<'_, &Unit>, bdf: Bdf, policy: Policy) -> CheckResult {
    with_device::<ConsoleK, _>(iommu, bdf, policy, |dev, dma| {
        let mut con =
            VirtIOConsole::<BusdmaHal<ConsoleK>, Transport>::new(transport::<ConsoleK>(bdf)?).map_err(v2s)?;
        let line = console_line(policy);
        let before = Counters::read(vtd, dev, dma);
        con.send_bytes(line.as_bytes()).map_err(v2s)?;
        let after = Counters::read(vtd, dev, dma);
        if let Some(f) = vtd.take_fault() {
            return Err(format!("VT-d fault {f:?}"));
        }
        println!(
            "virtio-console {}: 1 write of {} bytes, {}",
            policy_name(policy),
            line.len(),
            after.per_request(&before, 1)
        );
        drop(con);
        Ok(())
    })
}

/// Every virtio check, in the order the runner expects; stops after the first failure (a
/// faulting device may hang the next driver's blocking call).
pub fn run(vtd: &Unit, found: &Found, mut check: impl FnMut(&str, &mut dyn FnMut() -> CheckResult) -> bool) {
    let qm = QuickMaps::for_platform(&PLATFORM);
    let iommu = match Iommu::new(&PLATFORM, &qm, vtd) {
        Ok(i) => i,
        Err(e) => {
            check("virtio: busdma::device over the VT-d unit", &mut || Err(e2s(e)));
            return;
        }
    };
    let ok = check("virtio: a disk, two NICs and a console are present", &mut || {
        if found.blk.is_some() && found.net.len() == 2 && found.console.is_some() {
            Ok(())
        } else {
            Err(format!("blk {:?}, {} NICs, console {:?}", found.blk, found.net.len(), found.console))
        }
    });
    if !ok {
        return;
    }
    let (blk_bdf, a, b, con) = (found.blk.unwrap_or(found.net[0]), found.net[0], found.net[1], found.console);
    let steps: [(&str, &mut dyn FnMut() -> CheckResult); 6] = [
        ("virtio-blk (strict): 8 blocks written, read back and verified through VT-d", &mut || {
            blk(vtd, &iommu, blk_bdf, Policy::Strict, 0)
        }),
        ("virtio-blk (deferred): 8 more blocks written, read back and verified through VT-d", &mut || {
            blk(vtd, &iommu, blk_bdf, Policy::Deferred, BLOCKS)
        }),
        ("virtio-net (strict A, deferred B): raw frames both ways on one hub, verified", &mut || {
            net(vtd, &iommu, a, b, (Policy::Strict, Policy::Deferred))
        }),
        ("virtio-net (deferred A, strict B): raw frames both ways on one hub, verified", &mut || {
            net(vtd, &iommu, a, b, (Policy::Deferred, Policy::Strict))
        }),
        ("virtio-console (strict): a line written through VT-d", &mut || {
            console(vtd, &iommu, con.unwrap_or(a), Policy::Strict)
        }),
        ("virtio-console (deferred): a line written through VT-d", &mut || {
            console(vtd, &iommu, con.unwrap_or(a), Policy::Deferred)
        }),
    ];
    for (name, f) in steps {
        if !check(name, f) {
            return;
        }
    }
    let _ = check("virtio: no domain leaked", &mut || {
        if iommu.stats().leaked_domains == 0 { Ok(()) } else { Err("a domain was leaked".into()) }
    });
}
