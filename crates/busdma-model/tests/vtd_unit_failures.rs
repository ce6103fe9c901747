//! The VT-d driver's failure paths against a register-level stub of a remapping unit on the
//! model machine: what QEMU cannot be made to do (never complete an invalidation, fill the
//! queue with descriptors it never runs). The stub decodes just enough of the unit: global
//! command/status, the fault status register, register-based invalidation, and the
//! invalidation queue (context, IOTLB and wait descriptors; any other type is rejected with
//! FSTS.IQE). A switch makes it stop completing anything, as a wedged unit would.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use busdma::pgtable::{PageTable, PageTableConfig, TablePool};
use busdma::vtd::{DomainId, InvalidationChoice, SecondLevel, SourceId, Vtd, VtdConfig, regs};
use busdma::{Error, PhysAddr, Platform};
use busdma_model::{HostPlatform, MmioHandler};
use common::wedged::{Rig, range, strict_domain_holds_the_unmap_back_while_wedged};

/// Where the stub's registers sit (q35's VT-d address; the model's RAM starts at 0).
const BASE: u64 = 0xfed9_0000;
/// QEMU 7.2's CAP with `aw-bits=48` (PSI, MAMV 18, SAGAW 39/48, one fault record at 0x220).
const CAP: u64 = 0x00d2_008c_222f_0606;
/// QEMU 7.2's ECAP (QI, IOTLB registers at 0xf0) with C set: the stub reads RAM directly.
const ECAP: u64 = 0x0000_0000_00f0_0f4a | 1;
/// The IOTLB invalidate register: ECAP.IRO × 16 + 8.
const IOTLB_REG: u64 = 0xf8;
/// Polls before the driver gives up: small, so a time-out costs the test microseconds.
const POLLS: u32 = 1000;

#[derive(Default)]
struct Regs {
    gsts: u32,
    fsts: u32,
    iqa: u64,
    /// Queue head, in descriptors.
    iqh: u64,
    iqt: u64,
    ccmd: u64,
    iotlb: u64,
    /// Descriptors run (context, IOTLB and wait).
    ran: u64,
}

/// The stub unit.
struct Stub {
    regs: Mutex<Regs>,
    ram: Weak<HostPlatform>,
    /// When set, the unit completes nothing: register commands stay pending, the queue stops.
    wedged: Arc<AtomicBool>,
}

impl Stub {
    /// Runs queued descriptors from the head up to the tail, unless wedged or stopped by IQE.
    fn run_queue(&self, r: &mut Regs) {
        let Some(ram) = self.ram.upgrade() else { return };
        let base = r.iqa & !0xfff;
        while !self.wedged.load(Ordering::Relaxed) && r.fsts & regs::fsts::IQE == 0 && r.iqh != r.iqt >> 4 {
            let at = PhysAddr::new(base + r.iqh * 16);
            let lo = ram.read_phys_u64(at).unwrap();
            let hi = ram.read_phys_u64(PhysAddr::new(at.raw() + 8)).unwrap();
            match lo & 0xf {
                1 | 2 => {}
                5 if lo & (1 << 5) != 0 => {
                    let data = ((lo >> 32) as u32).to_le_bytes();
                    ram.write_phys(PhysAddr::new(hi & !0b11), &data).unwrap();
                }
                _ => {
                    // Rejected: the head stays on it.
                    r.fsts |= regs::fsts::IQE;
                    return;
                }
            }
            r.ran += 1;
            r.iqh = (r.iqh + 1) % 256;
        }
    }
}

impl MmioHandler for Stub {
    fn read(&self, offset: u64, _size: u8) -> u64 {
        let mut r = self.regs.lock().unwrap();
        // A unit runs its queue on its own: reading the head shows its progress.
        self.run_queue(&mut r);
        match offset {
            regs::VER => 0x10,
            regs::CAP => CAP,
            regs::ECAP => ECAP,
            regs::GSTS => r.gsts.into(),
            regs::FSTS => r.fsts.into(),
            regs::IQH => r.iqh << 4,
            regs::IQT => r.iqt,
            regs::IQA => r.iqa,
            regs::CCMD => r.ccmd,
            IOTLB_REG => r.iotlb,
            _ => 0,
        }
    }

    fn write(&self, offset: u64, _size: u8, value: u64) {
        let mut r = self.regs.lock().unwrap();
        let wedged = self.wedged.load(Ordering::Relaxed);
        match offset {
            regs::GCMD => {
                let v = value as u32;
                r.gsts = (r.gsts & !regs::gcmd::PERSISTENT) | (v & regs::gcmd::PERSISTENT);
                if v & regs::gcmd::SRTP != 0 {
                    r.gsts |= regs::gcmd::SRTP;
                }
            }
            regs::FSTS => {
                let w1c = regs::fsts::PFO | regs::fsts::IQE | regs::fsts::ICE | regs::fsts::ITE;
                r.fsts &= !(value as u32 & w1c);
            }
            regs::IQA => r.iqa = value,
            regs::IQT => {
                r.iqt = value;
                self.run_queue(&mut r);
            }
            regs::CCMD => {
                // Done at once (ICC clear) with the granularity asked for, unless wedged.
                r.ccmd =
                    if wedged { value } else { (value & !regs::ccmd::ICC) | (1 << regs::ccmd::CAIG_SHIFT) };
            }
            IOTLB_REG => {
                let granularity = (value >> 60) & 0b11;
                r.iotlb = if wedged {
                    value
                } else {
                    (value & !regs::iotlb::IVT) | (granularity << regs::iotlb::IAIG_SHIFT)
                };
            }
            _ => {}
        }
    }
}

fn rig() -> Rig {
    common::wedged::rig(BASE, 0x1000, |ram, wedged| {
        Box::new(Stub { regs: Mutex::new(Regs::default()), ram, wedged })
    })
}

fn unit(m: &HostPlatform, invalidation: InvalidationChoice) -> Vtd<'_, HostPlatform> {
    let config = VtdConfig { invalidation, poll_limit: POLLS, ..VtdConfig::default() };
    // SAFETY: the stub at BASE is a remapping unit's register block nothing else drives.
    unsafe { Vtd::new(m, PhysAddr::new(BASE), config) }.unwrap()
}

fn is_time_out(e: &Error, did: DomainId) -> bool {
    matches!(e, Error::InvalidationFailed { what, domain, .. } if what.contains("timed out") && *domain == u64::from(did.0))
}

#[test]
fn a_queued_invalidation_the_unit_never_completes_is_a_time_out_error_and_later_ones_queue_behind_it() {
    let rig = rig();
    let vtd = unit(&rig.m, InvalidationChoice::Queued);
    let did = DomainId(3);
    vtd.flush_range(did, range()).unwrap();
    rig.wedged.store(true, Ordering::Relaxed);
    let e = vtd.flush_range(did, range()).unwrap_err();
    assert!(is_time_out(&e, did), "{e:?}");
    assert_eq!(e.errno(), 5, "EIO");
    assert_eq!(vtd.stats().failed.load(Ordering::Relaxed), 1);
    // The unit answers again: the next invalidation completes, after the one that timed out.
    rig.wedged.store(false, Ordering::Relaxed);
    vtd.flush_domain(did).unwrap();
}

#[test]
fn behind_a_wedged_unit_the_ring_fills_and_invalidations_then_fail_at_once() {
    let rig = rig();
    let vtd = unit(&rig.m, InvalidationChoice::Queued);
    let did = DomainId(5);
    rig.wedged.store(true, Ordering::Relaxed);
    // 256 slots, one always empty, two per submission: 127 submissions fit.
    for i in 0..127 {
        let e = vtd.flush_range(did, range()).unwrap_err();
        assert!(is_time_out(&e, did), "submission {i}: {e:?}");
    }
    let e = vtd.flush_range(did, range()).unwrap_err();
    assert!(matches!(e, Error::InvalidationFailed { what, .. } if what.contains("queue full")), "{e:?}");
    rig.wedged.store(false, Ordering::Relaxed);
    vtd.flush_range(did, range()).unwrap();
}

#[test]
fn a_register_invalidation_the_unit_never_completes_is_a_time_out_error() {
    let rig = rig();
    let vtd = unit(&rig.m, InvalidationChoice::Register);
    let did = DomainId(2);
    vtd.flush_domain(did).unwrap();
    rig.wedged.store(true, Ordering::Relaxed);
    let e = vtd.flush_domain(did).unwrap_err();
    assert!(is_time_out(&e, did), "{e:?}");
    rig.wedged.store(false, Ordering::Relaxed);
    vtd.flush_domain(did).unwrap();
}

#[test]
fn a_descriptor_the_unit_rejects_is_an_iqe_error_and_the_queue_is_repaired() {
    let rig = rig();
    for choice in [InvalidationChoice::Queued, InvalidationChoice::Register] {
        let vtd = unit(&rig.m, choice);
        let did = DomainId(7);
        vtd.inject_invalidation_failures(1);
        let e = vtd.flush_range(did, range()).unwrap_err();
        let Error::InvalidationFailed { domain, status, .. } = e else { panic!("{e:?}") };
        assert_eq!(domain, 7);
        if choice == InvalidationChoice::Queued {
            assert_ne!(status & u64::from(regs::fsts::IQE), 0, "{e:?}");
            assert_eq!(vtd.stats().queue_errors_recovered.load(Ordering::Relaxed), 1);
        } else {
            assert_eq!((status >> regs::iotlb::IAIG_SHIFT) & 0b11, 0, "{e:?}");
        }
        // IQE is clear again and the queue (or the register) works.
        // SAFETY: reading the stub's status register has no side effect but progress.
        let fsts = unsafe { rig.m.mmio_read32(PhysAddr::new(BASE + regs::FSTS)) };
        assert_eq!(fsts & regs::fsts::IQE, 0);
        vtd.flush_range(did, range()).unwrap();
        drop(vtd);
    }
}

#[test]
fn a_strict_domain_over_a_wedged_unit_holds_the_unmap_back_and_recovers_when_the_unit_answers() {
    let rig = rig();
    let m = &*rig.m;
    let vtd = unit(m, InvalidationChoice::Queued);
    let did = vtd.alloc_domain_id().unwrap();
    let pool = TablePool::new(m);
    let cfg = PageTableConfig { input_bits: vtd.levels().input_bits(), coherent_walker: true };
    let pt = PageTable::<_, SecondLevel>::new(&pool, cfg).unwrap();
    // SAFETY: test rig: the tables outlive every DMA the test issues through the device.
    unsafe { vtd.attach(SourceId(0x0008), did, pt.root(), vtd.levels()) }.unwrap();
    let detach = || vtd.detach(SourceId(0x0008)).unwrap();
    strict_domain_holds_the_unmap_back_while_wedged(&rig, pt, &vtd, did.0, |e| is_time_out(e, did), detach);
    vtd.free_domain_id(did).unwrap();
}
