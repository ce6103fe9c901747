//! A driver written elsewhere on busdma through `dma-api`: crates.io `eth-intel` (its e1000
//! driver) over busdma's `BusdmaDmaOp` (feature `dma-api`), with the NIC behind VT-d. QEMU's
//! `e1000` sits on the same hub as a virtio-net NIC (driven by virtio-drivers over busdma's
//! `virtio` adapter, `virtio_check.rs`); frames go both ways and are verified byte for byte.
//!
//! eth-intel allocates its two descriptor rings as dma-api coherent arrays and takes packet
//! buffers as `rdif_eth::DmaBuffer`s, which come from dma-api's buffer pool (contiguous
//! allocations): every DMA address it hands the NIC is a busdma coherent allocation, mapped
//! once. Polling only: the driver's interrupt handlers are never called (the kernel has no
//! interrupts), the queues' `reclaim` reads the descriptors' done bits.
//!
//! ## The `'static` lease
//!
//! `dma_api::DeviceDma` takes a `&'static dyn DmaOp`, and `BusdmaDmaOp` a device of a
//! `'static` IOMMU (a kernel keeps its IOMMUs). The suite's VT-d unit is dropped at the end of
//! the run (a check of its own), so [`round`] lends it, its `Iommu` and the `BusdmaDmaOp` out
//! as `'static` for one round: every holder of those references (the driver, its queues, the
//! pools, the `DeviceDma` clones) is created and dropped inside the round, which checks that
//! the backend has no allocation outstanding before it drops it (detaching the NIC).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::num::NonZeroU64;
use core::panic::Location;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use busdma::device::{Device, Iommu, Policy};
use busdma::dmaop::BusdmaDmaOp;
use busdma::quickmap::QuickMaps;
use busdma::virtio::BusdmaHal;
use busdma::vtd::SourceId;
use dma_api::{DeviceDma, DmaCoherency, DmaConstraints, DmaDeviceInfo, DmaDirection, DmaDomainId};
use eth_intel::E1000;
use mmio_api::{MapError, MmioAddr, MmioOp, MmioRaw};
use rdif_eth::{DmaBuffer, IRxQueue, NetDevice};
use virtio_drivers::device::net::VirtIONetRaw;

use crate::domain::Unit;
use crate::pci::Bdf;
use crate::platform::PLATFORM;
use crate::println;
use crate::virtio_check::{
    E1000PeerK, ETHERTYPE, NET_QUEUE, Transport, e2s, policy_name, transport, v2s, vtd_faults, wait,
    with_device,
};

type CheckResult = Result<(), String>;

/// The identity map (boot.rs) covers the low 4 GiB, where SeaBIOS puts the BARs.
const IDENTITY_END: u64 = 1 << 32;
/// e1000's BAR0: 128 KiB of registers.
const BAR0_SIZE: usize = 128 << 10;
/// Packet buffers: eth-intel's 2048-byte receive buffer mode.
const BUF: usize = 2048;
/// Buffers per pool (the pools grow on demand).
const POOL: usize = 4;
/// Frames each way per round.
pub const FRAMES: usize = 4;
/// Stale frames a receiver may skip (frames other checks left queued in QEMU's hub) before
/// the one it waits for counts as lost.
const MAX_STALE: usize = 16;

/// Whether `(vendor, device)` is an e1000 that eth-intel drives (QEMU's `e1000` is an
/// 82540EM, 8086:100e).
pub fn is_e1000(vendor: u16, device: u16) -> bool {
    E1000::check_vid_did(vendor, device)
}

/// mmio-api's `ioremap` in this kernel: the identity map (KVA == PA below 4 GiB).
pub(crate) struct KernelMmio;

impl MmioOp for KernelMmio {
    fn ioremap(&self, addr: MmioAddr, size: usize) -> Result<MmioRaw, MapError> {
        let pa = addr.as_usize() as u64;
        if pa.checked_add(size as u64).is_none_or(|end| end > IDENTITY_END) {
            return Err(MapError::Invalid);
        }
        let virt = NonNull::new(pa as *mut u8).ok_or(MapError::Invalid)?;
        // SAFETY: the boot code identity-maps the low 4 GiB, so `virt` maps `[pa, pa + size)`;
        // the range is a BAR in SeaBIOS's window above RAM, which no Rust allocation covers.
        Ok(unsafe { MmioRaw::new(addr, virt, size) })
    }

    fn iounmap(&self, _mmio: &MmioRaw) {}
}

pub(crate) static KERNEL_MMIO: KernelMmio = KernelMmio;

/// ax-sync's lock provider (dma-api's pool locks through ax-sync): a test-and-set spin lock;
/// execution contexts are no-ops, as the kernel never takes an interrupt and has one CPU.
struct KernelSync;

#[ax_crate_interface::impl_interface]
impl ax_sync::interface::ContextOps for KernelSync {
    fn enter(_context: u8) -> ax_sync::interface::ContextState {
        ax_sync::interface::ContextState::new(0, 0)
    }
    fn exit(_context: u8, _state: ax_sync::interface::ContextState) {}
    fn irq_return_preempt_enter() -> usize {
        0
    }
    fn irq_return_preempt_exit(_state: usize) {}
    fn hardirq_enter() {}
    fn hardirq_exit() {}
}

#[ax_crate_interface::impl_interface]
impl ax_sync::interface::SpinOps for KernelSync {
    fn acquire(
        locked: &AtomicBool,
        _metadata: &ax_sync::interface::LockMetadata,
        _lock_addr: usize,
        _context: u8,
        _subclass: u32,
        _caller: &'static Location<'static>,
    ) -> ax_sync::interface::ContextState {
        while locked.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        ax_sync::interface::ContextState::new(0, 0)
    }

    fn try_acquire(
        locked: &AtomicBool,
        _metadata: &ax_sync::interface::LockMetadata,
        _lock_addr: usize,
        _context: u8,
        _subclass: u32,
        _caller: &'static Location<'static>,
    ) -> ax_sync::interface::AcquireResult {
        let got = locked.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok();
        ax_sync::interface::AcquireResult::new(got, ax_sync::interface::ContextState::new(0, 0))
    }

    fn release(
        locked: &AtomicBool,
        _lock_addr: usize,
        _context: u8,
        _context_state: ax_sync::interface::ContextState,
    ) {
        locked.store(false, Ordering::Release);
    }

    fn force_release(locked: &AtomicBool, _lock_addr: usize, _context: u8) {
        locked.store(false, Ordering::Release);
    }

    fn is_locked(locked: &AtomicBool) -> bool {
        locked.load(Ordering::Relaxed)
    }
}

pub(crate) type Op = BusdmaDmaOp<&'static Unit>;

/// The counters of `dev` (served by `op`) and the unit now.
pub(crate) fn counters(vtd: &Unit, dev: &Device<'_, '_, &Unit>, op: &Op) -> Counters {
    Counters::read(vtd, dev, op)
}

/// Maps, unmaps and IOTLB invalidations so far (the e1000's domain and the unit).
pub(crate) struct Counters {
    maps: u64,
    unmaps: u64,
    iotlb: u64,
    streaming: u64,
}

impl Counters {
    fn read(vtd: &Unit, dev: &Device<'_, '_, &Unit>, op: &Op) -> Self {
        let (mut maps, mut unmaps) = (0, 0);
        if let Some(d) = dev.domain() {
            let s = d.domain().stats();
            maps = s.maps;
            unmaps = s.unmaps;
        }
        Self { maps, unmaps, iotlb: vtd.stats().iotlb_total(), streaming: op.outstanding().1 as u64 }
    }

    /// "per request: ..." for a device driven alone (nvme_check.rs): its domain's maps and
    /// unmaps, the unit's IOTLB invalidations, and its backend's streaming maps (none).
    pub(crate) fn per_request_nvme(&self, before: &Counters, n: u64) -> String {
        let f = |a: u64, b: u64| crate::checks::per_n(a - b, n);
        format!(
            "per request: {} maps, {} unmaps, {} IOTLB invalidations, 0 bounced bytes (no streaming map: \
             nvme-driver's data buffers are dma-api contiguous allocations, one per request)",
            f(self.maps, before.maps),
            f(self.unmaps, before.unmaps),
            f(self.iotlb, before.iotlb),
        )
    }

    fn per_request(&self, before: &Counters, n: u64) -> String {
        let f = |a: u64, b: u64| crate::checks::per_n(a - b, n);
        format!(
            "per request: {} maps, {} unmaps (the e1000's domain), {} IOTLB invalidations (the unit's: \
             the virtio-net peer's), 0 bounced bytes (no streaming map: eth-intel's buffers are dma-api \
             contiguous allocations, mapped once, recycled by dma-api's pool)",
            f(self.maps, before.maps),
            f(self.unmaps, before.unmaps),
            f(self.iotlb, before.iotlb),
        )
    }
}

/// The frame `tag` from `src` to `dst`: both MACs, our EtherType, 300 bytes of pattern.
fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..300u32).map(|i| (i as u8).wrapping_mul(tag | 1) ^ tag));
    f
}

/// Whether `got` is one of our frames (our EtherType) at all: anything else is hub noise.
fn ours(got: &[u8]) -> bool {
    got.len() >= 14 && got[12..14] == ETHERTYPE.to_be_bytes()
}

/// Attaches `bdf` under `policy` and runs `f` with a `DeviceDma` over busdma's `BusdmaDmaOp`
/// for it, under the `'static` lease (module doc); then checks that the backend has nothing
/// outstanding, detaches the device and reads the fault records. `bdf` must be quiet (no DMA)
/// when `f` returns.
pub(crate) fn with_dma_api(
    vtd: &Unit,
    bdf: Bdf,
    policy: Policy,
    qm: &QuickMaps,
    f: impl FnOnce(&DeviceDma, &'static Iommu<'static, &'static Unit>, &'static Op) -> CheckResult,
) -> CheckResult {
    // SAFETY: the `'static` lease (module doc): `vtd` and `qm` outlive this call, and every
    // holder of the references made here is a local of this function or of `f`, dropped
    // before it returns (the driver and its queues, the pools, the `DeviceDma` clones, the
    // backend); mmio-api keeps only `KERNEL_MMIO`, a true static.
    let (vtd_s, qm_s): (&'static Unit, &'static QuickMaps) =
        unsafe { (&*(vtd as *const Unit), &*(qm as *const QuickMaps)) };
    let iommu = Iommu::new(&PLATFORM, qm_s, vtd_s).map_err(e2s)?;
    // SAFETY: as above: `iommu` is dropped at the end of this function, after every holder.
    let iommu_s: &'static Iommu<'static, &'static Unit> = unsafe { &*(&iommu as *const _) };
    bdf.enable();
    let dev = iommu_s.attach(SourceId(bdf.source_id()), policy).map_err(e2s)?;
    let op = BusdmaDmaOp::new(dev, true);
    let r = {
        // SAFETY: as above: `op` is dropped below, after `f` (which holds this reference and
        // every `DeviceDma` made from it) has returned.
        let op_s: &'static Op = unsafe { &*(&op as *const Op) };
        let domain = DmaDomainId::Translated(
            NonZeroU64::new(u64::from(bdf.source_id()) + 1).unwrap_or(NonZeroU64::MIN),
        );
        let info = DmaDeviceInfo::new(domain, DmaCoherency::Coherent, DmaConstraints::new(u64::MAX));
        let dma = DeviceDma::new(info, op_s);
        f(&dma, iommu_s, op_s).map_err(|e| match op.last_error() {
            Some(b) => format!("{e} (busdma: {b})"),
            None => e,
        })
    };
    let outstanding = op.outstanding();
    let r = r.and_then(|()| {
        if outstanding != (0, 0) {
            return Err(format!(
                "{} allocations and {} streaming maps outstanding after the driver's drop",
                outstanding.0, outstanding.1
            ));
        }
        Ok(())
    });
    // Drops the device handle: the device is detached and its domain torn down.
    drop(op);
    drop(iommu);
    if let Some(f) = vtd.take_fault() {
        return r.and(Err(format!("VT-d fault after the round {f:?}")));
    }
    r
}

/// One round under `policy` (the e1000) and `peer_policy` (the virtio-net): `FRAMES` frames
/// e1000 -> virtio-net and `FRAMES` back, each verified.
pub fn round(
    vtd: &Unit,
    e1000: Bdf,
    peer: Bdf,
    policy: Policy,
    peer_policy: Policy,
    qm: &QuickMaps,
) -> CheckResult {
    with_dma_api(vtd, e1000, policy, qm, |dma, iommu, op| {
        traffic(vtd, iommu, dma, op, e1000, peer, policy, peer_policy)
    })
}

#[allow(clippy::too_many_arguments)]
fn traffic(
    vtd: &Unit,
    iommu: &'static Iommu<'static, &'static Unit>,
    dma: &DeviceDma,
    op: &'static Op,
    e1000: Bdf,
    peer: Bdf,
    policy: Policy,
    peer_policy: Policy,
) -> CheckResult {
    let nic = E1000::new(e1000.bar0(), BAR0_SIZE, dma.clone(), &KERNEL_MMIO)
        .map_err(|e| format!("eth-intel: {e:?}"))?;
    let parts = Box::new(nic).into_parts().map_err(|e| format!("eth-intel into_parts: {e:?}"))?;
    let mac = parts.info.mac_address;
    let Some(group) = parts.poll_groups.into_iter().next() else {
        return Err("eth-intel gave no poll group".into());
    };
    let (mut tx, mut rx, mut irq_control) = (group.queues.tx, group.queues.rx, group.irq_control);
    let layout = Layout::from_size_align(BUF, 16).map_err(|_| String::from("layout"))?;
    let tx_pool = dma.contiguous_buffer_pool(layout, DmaDirection::ToDevice, POOL);
    let rx_pool = dma.contiguous_buffer_pool(layout, DmaDirection::FromDevice, POOL);
    let dev = op.device();
    let r = with_device::<E1000PeerK, _>(iommu, peer, peer_policy, |_pdev, _pdma| {
        let mut net =
            VirtIONetRaw::<BusdmaHal<E1000PeerK>, Transport, NET_QUEUE>::new(transport::<E1000PeerK>(peer)?)
                .map_err(v2s)?;
        let peer_mac = net.mac_address();
        let before = Counters::read(vtd, dev, op);
        for i in 0..FRAMES {
            let tag = 0x60 + i as u8;
            // e1000 -> virtio-net.
            let f = frame(peer_mac, mac, tag);
            let mut buf = DmaBuffer::new(tx_pool.alloc().map_err(|e| format!("tx pool: {e:?}"))?, f.len())
                .map_err(|_| String::from("tx buffer too small"))?;
            buf.write_with_cpu(|b| b.copy_from_slice(&f));
            buf.prepare_for_device();
            tx.submit(buf).map_err(|e| format!("e1000 submit: {:?}", e.into_parts().1))?;
            let mut sent = None;
            wait(&vtd_faults(vtd), "e1000 transmit", || {
                sent = tx.reclaim();
                sent.is_some()
            })?;
            drop(sent);
            virtio_receive(vtd, &mut net, &f)?;
            // virtio-net -> e1000.
            let g = frame(mac, peer_mac, tag ^ 0x80);
            let rbuf = DmaBuffer::new(rx_pool.alloc().map_err(|e| format!("rx pool: {e:?}"))?, BUF)
                .map_err(|_| String::from("rx buffer too small"))?;
            rbuf.prepare_for_device();
            rx.submit(rbuf).map_err(|e| format!("e1000 rx submit: {:?}", e.into_parts().1))?;
            virtio_send(vtd, &mut net, &g)?;
            e1000_receive(vtd, &mut *rx, &rx_pool, &g)?;
        }
        let after = Counters::read(vtd, dev, op);
        println!(
            "e1000 {} (virtio-net peer {}): {FRAMES} frames each way, {} requests, {}",
            policy_name(policy),
            policy_name(peer_policy),
            2 * FRAMES,
            after.per_request(&before, 2 * FRAMES as u64)
        );
        if after.streaming != 0 {
            return Err(format!("{} streaming maps left", after.streaming));
        }
        drop(net);
        Ok(())
    });
    // The NIC stops (a device reset: no more descriptor or buffer DMA) before its rings and
    // buffers go back to busdma.
    let stopped = irq_control.shutdown().map_err(|e| format!("eth-intel shutdown: {e:?}"));
    drop((tx, rx, irq_control, group.irq_endpoints, parts.control, tx_pool, rx_pool));
    r.and(stopped)
}

/// Posts receive buffers on the virtio-net until `want` arrives (skipping frames that are not
/// ours, left queued by other checks); it must arrive byte for byte.
fn virtio_receive(
    vtd: &Unit,
    net: &mut VirtIONetRaw<BusdmaHal<E1000PeerK>, Transport, NET_QUEUE>,
    want: &[u8],
) -> CheckResult {
    for _ in 0..MAX_STALE {
        let mut rxbuf = alloc::vec![0u8; 2048];
        // SAFETY: `rxbuf` stays alive and untouched until `receive_complete` below (on an
        // error return the driver's drop resets the device before the buffer goes).
        let token = unsafe { net.receive_begin(&mut rxbuf) }.map_err(v2s)?;
        wait(&vtd_faults(vtd), "virtio-net receive (from e1000)", || net.poll_receive() == Some(token))?;
        // SAFETY: the buffer of the submission.
        let (h, len) = unsafe { net.receive_complete(token, &mut rxbuf) }.map_err(v2s)?;
        let got = &rxbuf[h..h + len];
        if !ours(got) {
            continue;
        }
        // QEMU's e1000 pads short frames to 60 bytes; ours are longer.
        if got != want {
            return Err(format!(
                "e1000 frame arrived as {len} bytes that differ from the {} sent",
                want.len()
            ));
        }
        return Ok(());
    }
    Err(format!("no frame from the e1000 among {MAX_STALE} received"))
}

/// Sends `frame` from the virtio-net.
fn virtio_send(
    vtd: &Unit,
    net: &mut VirtIONetRaw<BusdmaHal<E1000PeerK>, Transport, NET_QUEUE>,
    frame: &[u8],
) -> CheckResult {
    let mut txbuf = alloc::vec![0u8; 2048];
    let hdr = net.fill_buffer_header(&mut txbuf).map_err(v2s)?;
    txbuf[hdr..hdr + frame.len()].copy_from_slice(frame);
    txbuf.truncate(hdr + frame.len());
    // SAFETY: `txbuf` stays alive and untouched until `transmit_complete`.
    let token = unsafe { net.transmit_begin(&txbuf) }.map_err(v2s)?;
    wait(&vtd_faults(vtd), "virtio-net transmit (to e1000)", || net.poll_transmit() == Some(token))?;
    // SAFETY: the buffer of the submission.
    unsafe { net.transmit_complete(token, &txbuf) }.map_err(v2s)?;
    Ok(())
}

/// Polls the e1000's receive queue until `want` arrives (reposting buffers that held other
/// frames); it must arrive byte for byte (the NIC strips the CRC: RCTL.SECRC).
fn e1000_receive(
    vtd: &Unit,
    rx: &mut dyn IRxQueue,
    pool: &dma_api::ContiguousBufferPool,
    want: &[u8],
) -> CheckResult {
    for _ in 0..MAX_STALE {
        let mut done = None;
        wait(&vtd_faults(vtd), "e1000 receive", || {
            done = rx.reclaim();
            done.is_some()
        })?;
        let Some(c) = done else { return Err("e1000 receive: lost completion".into()) };
        c.buffer.complete_for_cpu(c.packet_len);
        let got: Vec<u8> = c.buffer.read_with_cpu(c.packet_len, |b| b.to_vec());
        drop(c);
        if ours(&got) && got.get(6..12) == want.get(6..12) {
            if got != want {
                return Err(format!(
                    "virtio-net frame arrived at the e1000 as {} bytes that differ from the {} sent",
                    got.len(),
                    want.len()
                ));
            }
            return Ok(());
        }
        let rbuf = DmaBuffer::new(pool.alloc().map_err(|e| format!("rx pool: {e:?}"))?, BUF)
            .map_err(|_| String::from("rx buffer too small"))?;
        rbuf.prepare_for_device();
        rx.submit(rbuf).map_err(|e| format!("e1000 rx submit: {:?}", e.into_parts().1))?;
    }
    Err(format!("no frame from the virtio-net among {MAX_STALE} the e1000 received"))
}

/// The e1000 checks, after the virtio checks of a `virtio=on` configuration: strict and
/// deferred e1000 (the virtio-net peer the other way round).
pub fn run(
    vtd: &Unit,
    e1000: Option<Bdf>,
    peer: Option<Bdf>,
    mut check: impl FnMut(&str, &mut dyn FnMut() -> CheckResult) -> bool,
) {
    let (Some(e1000), Some(peer)) = (e1000, peer) else {
        check("e1000: an e1000 and a virtio-net are present", &mut || {
            Err(format!("e1000 {e1000:?}, virtio-net {peer:?}"))
        });
        return;
    };
    let qm = QuickMaps::for_platform(&PLATFORM);
    let steps: [(&str, &mut dyn FnMut() -> CheckResult); 2] = [
        (
            "e1000 (eth-intel via dma-api, strict): frames both ways with a virtio-net on one hub, verified",
            &mut || round(vtd, e1000, peer, Policy::Strict, Policy::Deferred, &qm),
        ),
        (
            "e1000 (eth-intel via dma-api, deferred): frames both ways with a virtio-net on one hub, verified",
            &mut || round(vtd, e1000, peer, Policy::Deferred, Policy::Strict, &qm),
        ),
    ];
    for (name, f) in steps {
        if !check(name, f) {
            return;
        }
    }
}
