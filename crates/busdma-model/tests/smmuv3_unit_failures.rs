//! The SMMUv3 driver's failure paths against a register-level stub of an SMMUv3 on the model
//! machine: what QEMU cannot be made to do (never complete a CMD_SYNC, fill the command queue
//! with commands it never runs). The stub decodes just enough: ID registers (QEMU 7.2's),
//! CR0/CR0ACK, GERROR/GERRORN, the command queue (the commands the driver issues run; any
//! other opcode stops the queue with CERROR_ILL and GERROR.CMDQ_ERR until GERRORN
//! acknowledges it), and empty event queue registers. A switch makes it stop consuming
//! commands, as a wedged SMMU would.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use busdma::pgtable::{PageTable, PageTableConfig, TablePool};
use busdma::smmuv3::{Smmu, SmmuConfig, Stage1, regs};
use busdma::{Error, PhysAddr};
use busdma_model::{HostPlatform, MmioHandler};
use common::wedged::{Rig, range, strict_domain_holds_the_unmap_back_while_wedged};

/// Where the stub's registers sit (`virt`'s SMMU address; the model's RAM starts at 0).
const BASE: u64 = 0x0905_0000;
/// QEMU 7.2's ID registers (IDR0, IDR1, IDR3, IDR5) as the aarch64 test kernel read them.
const IDR: [(u64, u32); 4] = [
    (regs::IDR0, 0x0d40_101a),
    (regs::IDR1, 0x0273_0010),
    (regs::IDR3, 0x0000_1404),
    (regs::IDR5, 0x0000_0074),
];
/// Polls before the driver gives up: small, so a time-out costs the test microseconds.
const POLLS: u32 = 1000;
/// Opcodes the stub runs: CFGI_STE, CFGI_STE_RANGE, CFGI_CD, TLBI_NH_ASID, TLBI_NH_VA,
/// TLBI_S12_VMALL, TLBI_S2_IPA, TLBI_NSNH_ALL, CMD_SYNC.
const KNOWN: [u64; 9] = [0x03, 0x04, 0x05, 0x11, 0x12, 0x28, 0x2a, 0x30, 0x46];

#[derive(Default)]
struct Regs {
    cr0: u32,
    gerror: u32,
    gerrorn: u32,
    cmdq_base: u64,
    prod: u32,
    /// CMDQ_CONS: index with wrap bit, ERR in bits 30:24.
    cons: u32,
    /// Commands run.
    ran: u64,
}

struct Stub {
    regs: Mutex<Regs>,
    ram: Weak<HostPlatform>,
    wedged: Arc<AtomicBool>,
}

impl Stub {
    /// Runs commands from CONS up to PROD, unless wedged or stopped by a pending CMDQ_ERR.
    fn consume(&self, r: &mut Regs) {
        let Some(ram) = self.ram.upgrade() else { return };
        let log2 = (r.cmdq_base & 0x1f) as u32;
        let mask = (2u32 << log2) - 1;
        let base = r.cmdq_base & regs::Q_BASE_ADDR_MASK;
        while !self.wedged.load(Ordering::Relaxed)
            && (r.gerror ^ r.gerrorn) & regs::gerror::CMDQ_ERR == 0
            && r.cons & mask != r.prod & mask
        {
            let slot = u64::from(r.cons & ((1 << log2) - 1));
            let op = ram.read_phys_u64(PhysAddr::new(base + slot * 16)).unwrap() & 0xff;
            if !KNOWN.contains(&op) {
                // CERROR_ILL; CONS stays on the command.
                r.cons = (r.cons & mask) | (regs::cerror::ILL << regs::cerror::SHIFT);
                r.gerror ^= regs::gerror::CMDQ_ERR;
                return;
            }
            r.ran += 1;
            r.cons = (r.cons + 1) & mask;
        }
    }
}

impl MmioHandler for Stub {
    fn read(&self, offset: u64, _size: u8) -> u64 {
        let mut r = self.regs.lock().unwrap();
        // An SMMU consumes commands on its own: reading CONS shows its progress.
        self.consume(&mut r);
        if let Some(&(_, v)) = IDR.iter().find(|&&(o, _)| o == offset) {
            return v.into();
        }
        match offset {
            regs::CR0 | regs::CR0ACK => r.cr0.into(),
            regs::GERROR => r.gerror.into(),
            regs::GERRORN => r.gerrorn.into(),
            regs::CMDQ_BASE => r.cmdq_base,
            regs::CMDQ_PROD => r.prod.into(),
            regs::CMDQ_CONS => r.cons.into(),
            _ => 0,
        }
    }

    fn write(&self, offset: u64, _size: u8, value: u64) {
        let mut r = self.regs.lock().unwrap();
        match offset {
            regs::CR0 => r.cr0 = value as u32,
            regs::GERRORN => r.gerrorn = value as u32,
            regs::CMDQ_BASE => r.cmdq_base = value,
            regs::CMDQ_PROD => r.prod = value as u32,
            regs::CMDQ_CONS => r.cons = value as u32,
            _ => {}
        }
        self.consume(&mut r);
    }
}

fn rig() -> Rig {
    common::wedged::rig(BASE, 0x2_0000, |ram, wedged| {
        Box::new(Stub { regs: Mutex::new(Regs::default()), ram, wedged })
    })
}

fn smmu(m: &HostPlatform) -> Smmu<'_, HostPlatform> {
    let config = SmmuConfig { poll_limit: POLLS, input_bits: 39, ..SmmuConfig::default() };
    // SAFETY: the stub at BASE is an SMMU's register block nothing else drives.
    unsafe { Smmu::new(m, PhysAddr::new(BASE), config) }.unwrap()
}

fn is_time_out(e: &Error, asid: u16) -> bool {
    matches!(e, Error::InvalidationFailed { what, domain, .. }
        if what.contains("CMD_SYNC never completed") && *domain == u64::from(asid))
}

#[test]
fn a_cmd_sync_the_smmu_never_completes_is_a_time_out_error_and_later_commands_queue_behind_it() {
    let rig = rig();
    let smmu = smmu(&rig.m);
    smmu.flush_range(3, range()).unwrap();
    rig.wedged.store(true, Ordering::Relaxed);
    let e = smmu.flush_range(3, range()).unwrap_err();
    assert!(is_time_out(&e, 3), "{e:?}");
    assert_eq!(e.errno(), 5, "EIO");
    assert_eq!(smmu.stats().failed.load(Ordering::Relaxed), 1);
    // The SMMU answers again: the next submission completes, after the one that timed out.
    rig.wedged.store(false, Ordering::Relaxed);
    smmu.flush_asid(3).unwrap();
}

#[test]
fn behind_a_wedged_smmu_the_queue_fills_and_submissions_then_fail_at_once() {
    let rig = rig();
    let smmu = smmu(&rig.m);
    rig.wedged.store(true, Ordering::Relaxed);
    // 256 slots, two commands per submission (one range TLBI, one CMD_SYNC): 128 fit.
    for i in 0..128 {
        let e = smmu.flush_range(5, range()).unwrap_err();
        assert!(is_time_out(&e, 5), "submission {i}: {e:?}");
    }
    let e = smmu.flush_range(5, range()).unwrap_err();
    assert!(matches!(e, Error::InvalidationFailed { what, .. } if what.contains("queue full")), "{e:?}");
    rig.wedged.store(false, Ordering::Relaxed);
    smmu.flush_range(5, range()).unwrap();
}

#[test]
fn an_illegal_command_is_cerror_ill_and_the_queue_is_repaired() {
    let rig = rig();
    let smmu = smmu(&rig.m);
    smmu.inject_invalidation_failures(1);
    let e = smmu.flush_range(7, range()).unwrap_err();
    let Error::InvalidationFailed { what, domain, status } = e else { panic!("{e:?}") };
    assert!(what.contains("CERROR_ILL"), "{what}");
    assert_eq!((domain, (status >> 24) & 0x7f), (7, 1));
    assert_eq!(smmu.stats().queue_errors_recovered.load(Ordering::Relaxed), 1);
    assert_eq!(smmu.gerror(), 0, "CMDQ_ERR acknowledged");
    // The queue works again, and so do the commands after the repaired slot.
    smmu.flush_range(7, range()).unwrap();
    smmu.flush_asid(7).unwrap();
}

#[test]
fn a_strict_domain_over_a_wedged_smmu_holds_the_unmap_back_and_recovers_when_it_answers() {
    let rig = rig();
    let m = &*rig.m;
    let smmu = smmu(m);
    let asid = smmu.alloc_asid().unwrap();
    let pool = TablePool::new(m);
    let pt = PageTable::<_, Stage1>::new(&pool, PageTableConfig { input_bits: 39, coherent_walker: true })
        .unwrap();
    // SAFETY: test rig: the stub walks no table; the tables outlive the stream's attachment.
    unsafe { smmu.attach(0x0008, asid, pt.root(), 39) }.unwrap();
    let detach = || smmu.detach(0x0008).unwrap();
    strict_domain_holds_the_unmap_back_while_wedged(&rig, pt, &smmu, asid, |e| is_time_out(e, asid), detach);
    smmu.free_asid(asid).unwrap();
}
