//! NVMe through crates.io `nvme-driver` on busdma's `BusdmaDmaOp` (feature `dma-api`), with the
//! controller behind VT-d, driven by polling.
//!
//! nvme-driver is written for an interrupt-driven runtime (`rdif-block`): its controller is a
//! state machine the runtime advances with `ControllerEvent`s, and its queues complete
//! requests in `HardwareQueue::drain_completions`, which the runtime calls after an IRQ. But
//! nothing in it waits for an interrupt: the admin "IRQ" event and `drain_completions` both
//! read the completion queue's phase bits and do nothing if no entry is new. So this kernel,
//! which takes no interrupts, runs it in legacy INTx mode (`Config::intx`, one I/O queue) and
//! feeds it those events by polling: `RegisterRetry` while a register transition is pending,
//! the admin IRQ event while it waits for an admin completion, `drain_completions` while a
//! request is outstanding. The INTx source test (needed only by its hard-IRQ handlers, which
//! never run here) is a stub that reports the line deasserted.
//!
//! What the runner gives the kernel: an `nvme` controller with a raw image file; it checks
//! the image after QEMU exits (2 x `BLOCKS` blocks, block i holding `nvm NNNN busdma\n`).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::num::NonZeroUsize;

use busdma::device::{Device, Policy};
use busdma::quickmap::QuickMaps;
use dma_api::{CpuDmaBuffer, DeviceDma, DmaDirection};
use nvme_driver::{Config, Nvme, NvmeBlockDriver, NvmeIntxSource};
use rdif_block::{
    BlockController, CompletedRequest, CompletionSink, ControlEvent, ControllerEvent, ControllerState,
    ControllerUpdate, HardwareQueue, OwnedRequest, OwnedRequestBatch, RequestFlags, RequestId, RequestOp,
    SubmissionSink,
};

use crate::domain::Unit;
use crate::e1000_check::{KERNEL_MMIO, Op, with_dma_api};
use crate::pci::Bdf;
use crate::println;
use crate::virtio_check::{policy_name, vtd_faults, wait};

type CheckResult = Result<(), String>;

/// QEMU's NVMe controller (Red Hat's QEMU vendor id, device 0x0010).
pub const VENDOR: u16 = 0x1b36;
/// QEMU's NVMe controller.
pub const DEVICE: u16 = 0x0010;
/// Blocks each policy's round writes and reads back (the runner checks 2 x this many).
pub const BLOCKS: usize = 8;
/// The logical block size the runner's image is read with (QEMU's default).
const LBA: usize = 512;
/// Register transitions (RegisterRetry events) before bring-up counts as stuck.
const RETRY_LIMIT: usize = 1 << 20;
/// The admin IRQ event's bit (nvme-driver's CONTROL_EVENT_ADMIN).
const ADMIN_EVENT: u64 = 1;

/// nvme-driver's INTx source test: its hard-IRQ handlers call it, and this kernel never runs
/// them (it polls), so the line is reported deasserted.
struct NoIntx;

impl NvmeIntxSource for NoIntx {
    fn is_asserted(&self) -> bool {
        false
    }
}

/// What block `i` holds: the 16-byte line `nvm NNNN busdma\n`, 32 times (the runner rebuilds
/// it with printf to check the image).
fn pattern(i: usize) -> Vec<u8> {
    let line = format!("nvm {i:04} busdma\n");
    line.as_bytes().iter().copied().cycle().take(LBA).collect()
}

/// BAR0 of `bdf` (a 64-bit memory BAR: BAR1 holds the high half).
fn bar0_64(bdf: Bdf) -> u64 {
    bdf.bar0() | (u64::from(bdf.read32(0x14)) << 32)
}

#[derive(Default)]
struct Sink {
    accepted: Vec<RequestId>,
    done: Vec<CompletedRequest>,
}

impl SubmissionSink for Sink {
    fn accepted(&mut self, id: RequestId) {
        self.accepted.push(id);
    }
}

impl CompletionSink for Sink {
    fn complete(&mut self, request: CompletedRequest) {
        self.done.push(request);
    }
}

fn blk(e: rdif_block::BlkError) -> String {
    format!("nvme-driver: {e:?}")
}

/// Advances the controller from `update`'s state to `Ready` by polling (module doc); returns
/// the update that reached it (it carries the I/O queues).
fn bring_up(
    vtd: &Unit,
    driver: &mut NvmeBlockDriver,
    mut update: ControllerUpdate,
    admin: usize,
) -> Result<ControllerUpdate, String> {
    for _ in 0..RETRY_LIMIT {
        update = match update.controller_state() {
            ControllerState::Ready => return Ok(update),
            ControllerState::Shutdown => return Err("controller shut down during bring-up".into()),
            ControllerState::RegisterPending { .. } => {
                driver.advance(ControllerEvent::RegisterRetry).map_err(blk)?
            }
            ControllerState::WaitingForIrq => {
                if let Some(f) = vtd.take_fault() {
                    return Err(format!("nvme bring-up: VT-d fault {f:?}"));
                }
                driver.advance(ControllerEvent::Irq(ControlEvent::new(admin, ADMIN_EVENT))).map_err(blk)?
            }
        };
    }
    Err(format!("nvme bring-up: not ready after {RETRY_LIMIT} events"))
}

/// One request of one block, submitted and polled to completion; returns its buffer.
fn one(
    vtd: &Unit,
    q: &mut dyn HardwareQueue,
    dma: &DeviceDma,
    op: RequestOp,
    lba: usize,
    data: Option<&[u8]>,
) -> Result<CpuDmaBuffer, String> {
    let dir = if op == RequestOp::Write { DmaDirection::ToDevice } else { DmaDirection::FromDevice };
    let len = NonZeroUsize::new(LBA).ok_or("zero block size")?;
    let mut buf = CpuDmaBuffer::new_zero(dma, len, LBA, dir).map_err(|e| format!("dma-api buffer: {e:?}"))?;
    if let Some(d) = data {
        buf.copy_from_slice_cpu(d);
    }
    let mut batch = OwnedRequestBatch::with_capacity(1);
    batch.push_back(OwnedRequest {
        op,
        lba: lba as u64,
        block_count: 1,
        data: Some(buf.prepare_for_device()),
        flags: RequestFlags::NONE,
    });
    let mut sink = Sink::default();
    let r = q.submit_batch_owned(&mut batch, &mut sink);
    if r.accepted() != 1 {
        return Err(format!("nvme submit: {:?}", r.disposition()));
    }
    q.commit_submissions().map_err(blk)?;
    let id = sink.accepted[0];
    let mut err = None;
    wait(&vtd_faults(vtd), "nvme request", || {
        if let Err(e) = q.drain_completions(&mut sink) {
            err = Some(e);
            return true;
        }
        sink.done.iter().any(|c| c.id == id)
    })?;
    if let Some(e) = err {
        return Err(blk(e));
    }
    let done = sink.done.pop().ok_or("no completion")?;
    done.result.map_err(blk)?;
    Ok(done.data.ok_or("completion without its buffer")?.into_cpu_buffer())
}

fn io(vtd: &Unit, dma: &DeviceDma, op: &'static Op, bdf: Bdf, policy: Policy, first: usize) -> CheckResult {
    let nvme = Nvme::new(bar0_64(bdf), 16 << 10, dma.clone(), &KERNEL_MMIO, Config::intx(4096))
        .map_err(|e| format!("nvme-driver: {e:?}"))?;
    let mut driver = NvmeBlockDriver::from_nvme(nvme).with_intx_source(NoIntx);
    let mut update = driver.advance(ControllerEvent::Start { target_queues: 1 }).map_err(blk)?;
    let admin = update.take_irq_endpoints().first().map(|e| e.source_id()).ok_or("no admin IRQ endpoint")?;
    let dev: &Device<'_, '_, &Unit> = op.device();
    let r = (|| {
        // The I/O queue comes with the transition to Ready.
        let mut queues = bring_up(vtd, &mut driver, update, admin)?.take_queues();
        let mut q: Box<dyn HardwareQueue> = queues.pop().ok_or("no I/O queue")?;
        let before = crate::e1000_check::counters(vtd, dev, op);
        let mut r = Ok(());
        for i in first..first + BLOCKS {
            if let Err(e) = one(vtd, &mut *q, dma, RequestOp::Write, i, Some(&pattern(i))) {
                r = Err(e);
                break;
            }
        }
        if r.is_ok() {
            for i in first..first + BLOCKS {
                match one(vtd, &mut *q, dma, RequestOp::Read, i, None) {
                    Ok(b) if b.as_slice_cpu() == &pattern(i)[..] => {}
                    Ok(_) => {
                        r = Err(format!("block {i} read back differs from what was written"));
                        break;
                    }
                    Err(e) => {
                        r = Err(e);
                        break;
                    }
                }
            }
        }
        if r.is_ok() {
            let after = crate::e1000_check::counters(vtd, dev, op);
            println!(
                "nvme {}: {BLOCKS} writes + {BLOCKS} reads of {LBA} bytes, {}",
                policy_name(policy),
                after.per_request_nvme(&before, 2 * BLOCKS as u64)
            );
        }
        let mut sink = Sink::default();
        let shut = q.shutdown(&mut sink).map_err(blk);
        drop(q);
        r.and(shut)
    })();
    // The controller stops (CC.SHN, then a disable) before its queues go back to busdma.
    let mut state = driver.advance(ControllerEvent::Shutdown).map_err(blk)?.controller_state();
    for _ in 0..RETRY_LIMIT {
        if state == ControllerState::Shutdown {
            break;
        }
        state = driver.advance(ControllerEvent::Shutdown).map_err(blk)?.controller_state();
    }
    drop(driver);
    r
}

/// The NVMe checks of a `virtio=on` configuration (the runner adds the controller there):
/// `BLOCKS` blocks written, read back and verified under strict, then deferred.
pub fn run(
    vtd: &Unit,
    nvme: Option<Bdf>,
    mut check: impl FnMut(&str, &mut dyn FnMut() -> CheckResult) -> bool,
) {
    let Some(bdf) = nvme else {
        check("nvme: a controller is present", &mut || Err("no NVMe controller".into()));
        return;
    };
    let qm = QuickMaps::for_platform(&crate::platform::PLATFORM);
    let steps: [(&str, &mut dyn FnMut() -> CheckResult); 2] = [
        (
            "nvme (nvme-driver via dma-api, polled, strict): 8 blocks written, read back and verified through VT-d",
            &mut || {
                with_dma_api(vtd, bdf, Policy::Strict, &qm, |dma, _, op| {
                    io(vtd, dma, op, bdf, Policy::Strict, 0)
                })
            },
        ),
        (
            "nvme (nvme-driver via dma-api, polled, deferred): 8 more blocks written, read back and verified through VT-d",
            &mut || {
                with_dma_api(vtd, bdf, Policy::Deferred, &qm, |dma, _, op| {
                    io(vtd, dma, op, bdf, Policy::Deferred, BLOCKS)
                })
            },
        ),
    ];
    for (name, f) in steps {
        if !check(name, f) {
            return;
        }
    }
}
