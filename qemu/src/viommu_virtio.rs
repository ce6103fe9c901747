//! virtio-drivers' blk, net and console behind virtio-iommu (`iommu=virtio virtio=on`): the
//! same devices as the VT-d virtio checks (`virtio_check.rs`), each endpoint attached to a
//! `busdma::virtio_iommu` domain and served by `busdma::virtio` over a tag of one strategy:
//!
//! - `strict` / `deferred`: `IommuPerMap` over a strict / deferred domain, shares through the
//!   adapter's bounce ring (a two-step window: a MAP per share, an UNMAP per unshare, batched
//!   under deferred);
//! - `premapped`: queue memory through `IommuPerMap`, shares copied into a pre-mapped pool
//!   (`busdma::premapped::Premapped`, slots mapped once per device): no request per I/O;
//! - `hybrid`: the pool below the calibrated threshold, `IommuPerMap` at or above it;
//! - `untrusted`: an untrusted endpoint, shares through the bounce ring of its strict,
//!   guard-paged domain (one UNMAP per MAP, checked for virtio-net, although the attach asks
//!   for deferred batches). virtio-blk rewrites the strict round's blocks (complement, then
//!   pattern), so the runner's 16-block image check holds; virtio-net runs both NICs
//!   untrusted; the console writes its own line (the runner looks for it in the console file).
//!
//! Every round goes through the virtio checks' one serving path, `virtio_check::serve`
//! (generic over `busdma::device::DmaDevice`, shared with VT-d): this module attaches and
//! builds the strategy's `VirtioDma`, `serve` runs the round, checks that the driver gave
//! everything back and detaches.
//!
//! Each round prints the virtio-iommu requests (MAP, UNMAP) and notifications per I/O request
//! it caused (driver set-up and teardown excluded); the pool's must be zero. The last check
//! shows the device's DMA to a buffer busdma took back (a posted receive buffer reclaimed
//! before the frame arrives) fault and be reported by the event queue.

use alloc::format;
use alloc::string::String;

use busdma::device::{DeviceConfig, Policy, ViommuDevice};
use busdma::front::{IommuPerMap, Tag, TagSpec};
use busdma::iommu::InvalidationPolicy;
use busdma::premapped::{Hybrid, PoolConfig, Premapped, PremappedPool};
use busdma::quickmap::QuickMaps;
use busdma::virtio::{BusdmaHal, VirtioDma, VirtioKernel, tag_spec};
use busdma::virtio_iommu::{FaultReason, ViommuStats, VirtioIommu};
use busdma::{AddrRange, Iova, PAGE_SIZE};
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::net::VirtIONetRaw;

use crate::checks::{CheckResult, Runner, e2s};
use crate::pci::Bdf;
use crate::platform::{KernelPlatform, PLATFORM};
use crate::println;
use crate::virtio_check::{
    BlkK, ConsoleK, Found, MAX_MAP, NetAK, NetBK, Served, Transport, blk_io, blk_io_with, block_pattern,
    exchange, serve, transport, v2s,
};

type Unit = VirtioIommu<'static, KernelPlatform>;

/// Blocks each strategy writes and reads back (4 strategies: the runner checks 16).
const BLOCKS: usize = 4;
/// Slots of a device's pre-mapped pool (one page each: every share of these drivers fits).
const POOL_SLOTS: usize = 32;
/// Deferred domains: a batch of UNMAPs every 8 unmaps (never by age: the check controls time).
const DEFERRED: InvalidationPolicy =
    InvalidationPolicy::Deferred { max_entries: 8, max_age_ns: 3_600_000_000_000 };

/// How a device's shares reach it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Strict,
    Deferred,
    Premapped,
    Hybrid,
    /// An untrusted endpoint (`Policy::Untrusted`: a strict, guard-paged domain; shares
    /// through the bounce ring, whole pages of busdma's own).
    Untrusted,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Strict, Kind::Deferred, Kind::Premapped, Kind::Hybrid];

    fn name(self) -> &'static str {
        match self {
            Kind::Strict => "strict",
            Kind::Deferred => "deferred",
            Kind::Premapped => "premapped",
            Kind::Hybrid => "hybrid",
            Kind::Untrusted => "untrusted",
        }
    }
}

/// The domains' aperture: 1 MiB to 4 GiB (PROBE's reserved MSI window is kept out by the
/// domain).
fn aperture() -> AddrRange<Iova> {
    AddrRange::new(Iova::new(1 << 20), Iova::new(1 << 32)).unwrap_or(AddrRange::empty_at(Iova::new(0)))
}

fn spec(max: u64) -> TagSpec {
    TagSpec { dma_mask: TagSpec::mask_of_bits(32), ..tag_spec(max, true) }
}

/// Attaches `bdf` to a fresh domain of `kind` (`busdma::device::ViommuDevice`: domain,
/// PROBE's reserved regions kept out, ATTACH) and runs `body` with the `VirtioDma` serving it,
/// through the virtio checks' one serving path (`virtio_check::serve`: the driver must give
/// everything back, then the detach).
fn served(
    unit: &Unit,
    qm: &'static QuickMaps,
    bdf: Bdf,
    kind: Kind,
    body: &mut dyn FnMut(&dyn Served) -> CheckResult,
) -> CheckResult {
    let policy = match kind {
        Kind::Deferred => Policy::Deferred,
        Kind::Untrusted => Policy::Untrusted,
        _ => Policy::Strict,
    };
    let cfg = DeviceConfig { aperture: Some(aperture()), deferred: DEFERRED, ..DeviceConfig::default() };
    let dev = ViommuDevice::attach(unit, u32::from(bdf.source_id()), policy, cfg).map_err(e2s)?;
    serve(dev, |dev, k| virtio_dma(dev, qm, bdf, kind, k), |_, dma| body(dma))
}

/// Builds the `VirtioDma` of `kind` over `dev` and hands it to `k`: queue memory from a tag of
/// the device; shares through its bounce ring (strict, deferred), a pre-mapped pool of its
/// domain, or the hybrid of that pool and a map per share.
fn virtio_dma(
    dev: &ViommuDevice<'_, 'static, KernelPlatform>,
    qm: &'static QuickMaps,
    bdf: Bdf,
    kind: Kind,
    k: &mut dyn FnMut(&dyn Served) -> CheckResult,
) -> CheckResult {
    let queues = dev.tag(spec(MAX_MAP)).map_err(e2s)?;
    if let Kind::Strict | Kind::Deferred | Kind::Untrusted = kind {
        let dma = VirtioDma::windowed(queues).map_err(e2s)?;
        if !dma.has_ring() {
            return Err("no bounce ring over the virtio-iommu domain".into());
        }
        return k(&dma);
    }
    let pool =
        PremappedPool::new(&PLATFORM, dev.attachment().clone(), qm, PoolConfig::new(PAGE_SIZE, POOL_SLOTS))
            .map_err(e2s)?;
    if kind == Kind::Premapped {
        let shares = Tag::new_root(&PLATFORM, Premapped(&pool), spec(PAGE_SIZE)).map_err(e2s)?;
        return k(&VirtioDma::pooled(queues, shares));
    }
    let h = Hybrid::calibrated(&pool, IommuPerMap(dev.attachment().clone()), &spec(MAX_MAP)).map_err(e2s)?;
    if let Some(c) = h.calibration() {
        println!("virtio-iommu hybrid calibration {bdf}: {c}");
    }
    let shares = Tag::new_root(&PLATFORM, h, spec(MAX_MAP)).map_err(e2s)?;
    k(&VirtioDma::pooled(queues, shares))
}

/// virtio-iommu's fault records as `virtio_check::Faults`.
fn faults(unit: &Unit) -> impl Fn() -> Option<String> + '_ {
    move || {
        let f = unit.take_fault().ok().flatten()?;
        while unit.take_fault().ok().flatten().is_some() {}
        Some(format!("virtio-iommu fault {f:?}"))
    }
}

/// "X requests (a MAP, b UNMAP), Y notifications per I/O request" between two snapshots.
fn per_io(before: &ViommuStats, after: &ViommuStats, ios: u64) -> String {
    let f = |a: u64, b: u64| crate::checks::per_n(a - b, ios);
    format!(
        "{} requests ({} MAP, {} UNMAP), {} notifications per I/O request",
        f(after.requests, before.requests),
        f(after.maps, before.maps),
        f(after.unmaps, before.unmaps),
        f(after.kicks, before.kicks)
    )
}

/// The pool sends nothing per I/O: that is its point (issue 19).
fn pool_quiet(kind: Kind, before: &ViommuStats, after: &ViommuStats) -> CheckResult {
    if kind == Kind::Premapped && (after.requests != before.requests || after.kicks != before.kicks) {
        return Err(format!(
            "the pre-mapped pool sent {} requests and {} notifications during its I/O",
            after.requests - before.requests,
            after.kicks - before.kicks
        ));
    }
    Ok(())
}

/// An untrusted endpoint's domain is strict whatever `DeviceConfig::deferred` asks (the
/// attach is given deferred batches of 8): every share's UNMAP went out before its unshare
/// returned, one per MAP, none left queued.
fn untrusted_strict(kind: Kind, before: &ViommuStats, after: &ViommuStats) -> CheckResult {
    let (maps, unmaps) = (after.maps - before.maps, after.unmaps - before.unmaps);
    if kind == Kind::Untrusted && (maps == 0 || unmaps != maps) {
        return Err(format!("the untrusted endpoint's I/O sent {maps} MAPs and {unmaps} UNMAPs"));
    }
    Ok(())
}

fn blk(unit: &Unit, qm: &'static QuickMaps, bdf: Bdf, kind: Kind, first: usize) -> CheckResult {
    served(unit, qm, bdf, kind, &mut |dma| {
        dma.serve(<BlkK as VirtioKernel>::slot(), &mut || {
            let mut blk =
                VirtIOBlk::<BusdmaHal<BlkK>, Transport>::new(transport::<BlkK>(bdf)?).map_err(v2s)?;
            let before = unit.stats();
            // Rewriting blocks another round wrote: first their complement (so a write that
            // does not arrive is seen), then their pattern again (the image the runner checks
            // is unchanged).
            let passes = if kind == Kind::Untrusted { 2 } else { 1 };
            if passes == 2 {
                blk_io_with(&mut blk, &faults(unit), first, BLOCKS, &|i| {
                    block_pattern(i).into_iter().map(|b| !b).collect()
                })?;
            }
            blk_io(&mut blk, &faults(unit), first, BLOCKS)?;
            let after = unit.stats();
            println!(
                "virtio-blk {} (virtio-iommu): {} writes + {} reads of {SECTOR_SIZE} bytes, {}",
                kind.name(),
                passes * BLOCKS,
                passes * BLOCKS,
                per_io(&before, &after, (2 * passes * BLOCKS) as u64)
            );
            drop(blk);
            pool_quiet(kind, &before, &after)
        })
    })
}

fn net(unit: &Unit, qm: &'static QuickMaps, a: Bdf, b: Bdf, kind: Kind) -> CheckResult {
    served(unit, qm, a, kind, &mut |da| {
        served(unit, qm, b, kind, &mut |db| {
            da.serve(<NetAK as VirtioKernel>::slot(), &mut || {
                db.serve(<NetBK as VirtioKernel>::slot(), &mut || {
                    let mut na = VirtIONetRaw::<BusdmaHal<NetAK>, Transport, 16>::new(transport::<NetAK>(a)?)
                        .map_err(v2s)?;
                    let mut nb = VirtIONetRaw::<BusdmaHal<NetBK>, Transport, 16>::new(transport::<NetBK>(b)?)
                        .map_err(v2s)?;
                    let before = unit.stats();
                    exchange(&faults(unit), &mut na, &mut nb, 0x21)?;
                    exchange(&faults(unit), &mut nb, &mut na, 0x43)?;
                    let after = unit.stats();
                    println!(
                        "virtio-net {} (virtio-iommu): 2 frames (A->B, B->A), 4 requests, {}",
                        kind.name(),
                        per_io(&before, &after, 4)
                    );
                    drop(na);
                    drop(nb);
                    untrusted_strict(kind, &before, &after)?;
                    pool_quiet(kind, &before, &after)
                })
            })
        })
    })
}

/// B posts a receive buffer, busdma takes it back (`reclaim_shares`: unlinked, UNMAP
/// completed, memory freed) before A sends: the NIC's write to the old IOVA must fault, the
/// event queue must report it naming B (a mapping fault), and no byte of the frame may reach
/// the driver's buffer.
fn reclaimed_receive_faults(unit: &Unit, qm: &'static QuickMaps, a: Bdf, b: Bdf) -> CheckResult {
    served(unit, qm, a, Kind::Strict, &mut |da| {
        served(unit, qm, b, Kind::Strict, &mut |db| {
            da.serve(<NetAK as VirtioKernel>::slot(), &mut || {
                db.serve(<NetBK as VirtioKernel>::slot(), &mut || {
                    let mut na = VirtIONetRaw::<BusdmaHal<NetAK>, Transport, 16>::new(transport::<NetAK>(a)?)
                        .map_err(v2s)?;
                    let mut nb = VirtIONetRaw::<BusdmaHal<NetBK>, Transport, 16>::new(transport::<NetBK>(b)?)
                        .map_err(v2s)?;
                    while unit.take_fault().map_err(e2s)?.is_some() {}
                    let mut rxbuf = alloc::vec![0u8; 2048];
                    // SAFETY: `rxbuf` outlives the driver (dropped below, which resets the
                    // device); busdma bounces it, so the device never reaches it anyway.
                    let rtoken = unsafe { nb.receive_begin(&mut rxbuf) }.map_err(v2s)?;
                    if db.reclaim().map_err(e2s)? != 1 {
                        return Err("the posted receive buffer was not reclaimed".into());
                    }
                    let mut frame = alloc::vec::Vec::new();
                    frame.extend_from_slice(&nb.mac_address());
                    frame.extend_from_slice(&na.mac_address());
                    frame.extend_from_slice(&0x88b5u16.to_be_bytes());
                    frame.extend_from_slice(&[0x5a; 100]);
                    let mut txbuf = alloc::vec![0u8; 2048];
                    let hdr = na.fill_buffer_header(&mut txbuf).map_err(v2s)?;
                    txbuf[hdr..hdr + frame.len()].copy_from_slice(&frame);
                    txbuf.truncate(hdr + frame.len());
                    // SAFETY: `txbuf` stays alive until `transmit_complete` (or the drop).
                    let ttoken = unsafe { na.transmit_begin(&txbuf) }.map_err(v2s)?;
                    let mut fault = None;
                    for _ in 0..1u64 << 24 {
                        if fault.is_none() {
                            fault = unit.take_fault().map_err(e2s)?;
                        }
                        if fault.is_some() && na.poll_transmit() == Some(ttoken) {
                            break;
                        }
                        core::hint::spin_loop();
                    }
                    if na.poll_transmit() == Some(ttoken) {
                        // SAFETY: the buffer of the submission.
                        unsafe { na.transmit_complete(ttoken, &txbuf) }.map_err(v2s)?;
                    }
                    // QEMU hands the descriptor back (its used-ring entry lives in queue memory,
                    // still mapped); what matters is that nothing the device wrote reached
                    // memory: the completion's unshare finds no share to copy back from.
                    if nb.poll_receive() == Some(rtoken) {
                        // SAFETY: the buffer of the submission.
                        let _ = unsafe { nb.receive_complete(rtoken, &mut rxbuf) };
                    }
                    let landed = rxbuf.iter().any(|&x| x != 0);
                    drop(na);
                    drop(nb);
                    while unit.take_fault().map_err(e2s)?.is_some() {}
                    let Some(f) = fault else {
                        return Err("no fault record for the NIC's write to the reclaimed buffer".into());
                    };
                    if f.endpoint != u32::from(b.source_id()) || f.reason != FaultReason::Mapping {
                        return Err(format!(
                            "fault {f:?} does not name endpoint {:#x}, mapping",
                            b.source_id()
                        ));
                    }
                    if landed {
                        return Err("bytes of the frame reached the receive buffer after its reclaim".into());
                    }
                    println!(
                        "virtio-net (virtio-iommu): write to a reclaimed receive buffer reported: {f:?}"
                    );
                    Ok(())
                })
            })
        })
    })
}

/// The virtio checks behind virtio-iommu, in the order the runner expects; stops after the
/// first failure (a faulting device may hang the next driver).
pub fn run(r: &mut Runner, unit: &Unit, found: &Found) {
    let ok = r.check("virtio behind virtio-iommu: a disk, two NICs and a console are present", || {
        if found.blk.is_some() && found.net.len() == 2 && found.console.is_some() {
            Ok(())
        } else {
            Err(format!("blk {:?}, {} NICs, console {:?}", found.blk, found.net.len(), found.console))
        }
    });
    let (Some(blk_bdf), Some(con), true) = (found.blk, found.console, ok) else { return };
    let (a, b) = (found.net[0], found.net[1]);
    r.check("busdma::device::ViommuDevice refuses identity and bypass before any request", || {
        let before = unit.stats().requests;
        for policy in [Policy::Identity, Policy::Bypass] {
            match ViommuDevice::attach(unit, u32::from(blk_bdf.source_id()), policy, DeviceConfig::default())
            {
                Err(busdma::Error::Unsupported { .. }) => {}
                Err(e) => return Err(format!("{policy:?}: refused with {e}, not as unsupported")),
                Ok(_) => return Err(format!("{policy:?}: attached")),
            }
        }
        match unit.stats().requests - before {
            0 => Ok(()),
            n => Err(format!("{n} requests sent")),
        }
    });
    let qm: &'static QuickMaps = unit.quick_maps();
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        let name = format!(
            "virtio-blk ({}) behind virtio-iommu: {BLOCKS} blocks written, read back and verified",
            kind.name()
        );
        if !r.check(&name, || blk(unit, qm, blk_bdf, kind, i * BLOCKS)) {
            return;
        }
    }
    // Rewrites the strict round's blocks (the runner's image check, shared with VT-d's
    // configurations, counts 16 blocks).
    let name = format!(
        "virtio-blk (untrusted) behind virtio-iommu: {BLOCKS} blocks rewritten (complement, then pattern), read back and verified"
    );
    if !r.check(&name, || blk(unit, qm, blk_bdf, Kind::Untrusted, 0)) {
        return;
    }
    for kind in Kind::ALL {
        let name = format!(
            "virtio-net ({}) behind virtio-iommu: raw frames both ways on one hub, verified",
            kind.name()
        );
        if !r.check(&name, || net(unit, qm, a, b, kind)) {
            return;
        }
    }
    // Both NICs untrusted: every frame and receive buffer (sub-page heap buffers) goes through
    // the bounce ring of a strict, guard-paged domain.
    let name = "virtio-net (untrusted) behind virtio-iommu: raw frames both ways on one hub, verified";
    if !r.check(name, || net(unit, qm, a, b, Kind::Untrusted)) {
        return;
    }
    for (name, policy, kind) in [
        ("strict", Policy::Strict, Kind::Strict),
        ("deferred", Policy::Deferred, Kind::Deferred),
        ("untrusted", Policy::Untrusted, Kind::Untrusted),
    ] {
        let check = format!("virtio-console ({name}) behind virtio-iommu: a line written");
        let ok = r.check(&check, || {
            served(unit, qm, con, kind, &mut |dma| {
                dma.serve(<ConsoleK as VirtioKernel>::slot(), &mut || {
                    let mut c =
                        VirtIOConsole::<BusdmaHal<ConsoleK>, Transport>::new(transport::<ConsoleK>(con)?)
                            .map_err(v2s)?;
                    c.send_bytes(crate::virtio_check::console_line(policy).as_bytes()).map_err(v2s)?;
                    drop(c);
                    match faults(unit)() {
                        Some(f) => Err(f),
                        None => Ok(()),
                    }
                })
            })
        });
        if !ok {
            return;
        }
    }
    r.check(
        "virtio-net behind virtio-iommu: a receive buffer reclaimed while posted faults, reported by the event queue, nothing received",
        || reclaimed_receive_faults(unit, qm, a, b),
    );
}
