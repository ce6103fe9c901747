//! `dmalab attack`: the hostile device against busdma's IOMMU path, per mode and attack class.
//!
//! For each mode (`strict`, `strict-untrusted`, `deferred`) a fresh machine gets a model IOMMU
//! and two real domains (VT-d tables, busdma's IOVA allocator): the attacker's, run in that
//! mode, and a strict one for a victim device whose buffers hold secrets. Every attack class
//! of `busdma_model::hostile` runs its share of attempts; rows give attempts, escapes
//! (attempts that reached bytes the device was not given, judged against the model's own
//! ledger) and bytes leaked, plus a total row per mode and the measured deferred window.
//! Class 9's row (`failed-invalidation`) also gives `quarantined`: the buffers the attacker's
//! tag held in its quarantine while the attacker probed (three a round when busdma keeps
//! every one); a next owner that got a torn-down buffer's page fails the command.

use busdma::bounce::{BounceZones, Bounced, ZoneConfig};
use busdma::front::IommuPerMap;
use busdma::iommu::{Domain, DomainConfig, DomainId, InvalidationPolicy};
use busdma::iova::{IovaAllocator, IovaConfig};
use busdma::pgtable::{PageTable, PageTableConfig, TablePool, VtdSl};
use busdma::quickmap::QuickMaps;
use busdma::{AddrRange, Iova, PAGE_SIZE, Platform};
use busdma_model::attack::{DomainUnderTest, GiveBack, Mode, Plan, Report, run};
use busdma_model::hostile::AttackClass;
use busdma_model::{HostPlatform, MachineConfig, ModelIommu};

use crate::cost::Cost;
use clap::Args;
use serde_json::json;

/// Options of `dmalab attack`.
#[derive(Args, Debug, Clone)]
pub struct AttackArgs {
    /// Attempts per attack class and mode (whole rounds are run, so slightly more).
    /// 200 000: with five classes that always apply, at least 1 000 000 attempts per mode.
    #[arg(long, default_value_t = 200_000)]
    pub per_class: u64,
    /// Seed of the attacker's random choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run only this mode (strict, strict-untrusted, deferred).
    #[arg(long)]
    pub mode: Option<String>,
    /// The model IOMMU's assumed hardware cost.
    #[command(flatten)]
    pub cost: crate::cost::CostArgs,
}

/// Input width of the domains: 48 bits, four levels (the common VT-d and SMMU configuration).
const INPUT_BITS: u32 = 48;

type Dom<'m> = Domain<'m, HostPlatform, VtdSl, IovaAllocator, ModelIommu<'m>>;

fn domain<'m>(
    m: &'m HostPlatform,
    pool: &'m TablePool<'m, HostPlatform>,
    iommu: &'m ModelIommu<'m>,
    id: DomainId,
    policy: InvalidationPolicy,
    untrusted: bool,
) -> Result<Dom<'m>, String> {
    let e = |what: &str, err: busdma::Error| format!("{what}: {err}");
    let table = PageTable::new(pool, PageTableConfig { input_bits: INPUT_BITS, coherent_walker: true })
        .map_err(|x| e("page table", x))?;
    // IOVA from one page up: bus address 0 is never handed out.
    let space =
        AddrRange::new(Iova::new(PAGE_SIZE), Iova::new(1 << INPUT_BITS)).map_err(|x| e("IOVA space", x))?;
    let iova = IovaAllocator::new(space, IovaConfig { cpus: m.num_cpus(), caches: true, guard_page: false })
        .map_err(|x| e("IOVA allocator", x))?;
    Domain::new(m, table, iova, iommu, DomainConfig { id, policy, untrusted }).map_err(|x| e("domain", x))
}

fn dut(d: &Dom<'_>, id: DomainId) -> DomainUnderTest {
    DomainUnderTest { id, root: d.table().root(), input_bits: INPUT_BITS }
}

fn one_mode(config: MachineConfig, mode: Mode, plan: Plan, cost: &Cost) -> Result<Report, String> {
    let m = HostPlatform::new(config).map_err(|e| format!("cannot build the machine model: {e}"))?;
    let iommu = ModelIommu::new(&m, cost.config()).map_err(|e| format!("model IOMMU: {e}"))?;
    let pool = TablePool::new(&m);
    let policy =
        if mode == Mode::Deferred { InvalidationPolicy::deferred() } else { InvalidationPolicy::Strict };
    let a = domain(&m, &pool, &iommu, 1, policy, mode == Mode::StrictUntrusted)?;
    let v = domain(&m, &pool, &iommu, 2, InvalidationPolicy::Strict, false)?;
    let (qm, zones) = (QuickMaps::for_platform(&m), BounceZones::new(&m, ZoneConfig::default()));
    if mode == Mode::StrictUntrusted {
        // An untrusted device's sub-page buffers are bounced into pages of their own.
        let bounced = Bounced::over_iommu(IommuPerMap(&a), &zones, &qm);
        // SAFETY: `a` and `v` own the tables and outlive `run`; dropping them invalidates
        // their domains before their tables go back.
        unsafe { run(&m, &iommu, dut(&a, 1), bounced, dut(&v, 2), IommuPerMap(&v), mode, plan) }
    } else {
        // SAFETY: as above.
        unsafe { run(&m, &iommu, dut(&a, 1), IommuPerMap(&a), dut(&v, 2), IommuPerMap(&v), mode, plan) }
    }
    .map_err(|e| format!("attack rig ({}): {e}", mode.name()))
}

/// Runs the attacks and prints the rows.
pub fn run_cmd(json_out: bool, config: MachineConfig, args: &AttackArgs) -> Result<(), String> {
    let modes: Vec<Mode> = match &args.mode {
        None => Mode::ALL.to_vec(),
        Some(name) => vec![
            *Mode::ALL
                .iter()
                .find(|m| m.name() == name)
                .ok_or_else(|| format!("unknown mode {name:?} (strict, strict-untrusted, deferred)"))?,
        ],
    };
    let cost = args.cost.resolve()?;
    let mut r = crate::report::Report::new();
    for mode in modes {
        eprintln!("dmalab attack: mode {} ...", mode.name());
        let rep = one_mode(
            config,
            mode,
            Plan { per_class: args.per_class, seed: args.seed, only: None, give_back: GiveBack::Busdma },
            &cost,
        )?;
        let with_cost = |mut row: serde_json::Value| {
            row["iommu_cost"] = json!(cost.iommu_cost);
            row["inval_latency_ns"] = json!(cost.inval_latency_ns);
            row["map_latency_ns"] = json!(cost.map_latency_ns);
            row
        };
        for (class, t) in &rep.tallies {
            let mut row = json!({"attack": class.name(), "mode": mode.name(), "attempts": t.attempts,
                "escapes": t.escapes, "bytes_leaked": t.bytes_leaked});
            if *class == AttackClass::FailedInvalidation {
                row["quarantined"] = json!(rep.reuse.held_while_probed);
            }
            r.push(with_cost(row));
        }
        let t = rep.total();
        r.push(with_cost(json!({"attack": "all", "mode": mode.name(), "attempts": t.attempts,
            "escapes": t.escapes, "bytes_leaked": t.bytes_leaked})));
        if mode == Mode::Deferred {
            r.push(with_cost(json!({"mode": mode.name(), "max_window_entries": rep.window.max_entries,
                "max_window_ms": rep.window.max_ns as f64 / 1e6})));
        }
        for (class, n, e) in &rep.refused {
            eprintln!("dmalab attack: {}: {n} loads refused by busdma (first: {e:?})", class.name());
        }
        let o = rep.ownership;
        eprintln!(
            "dmalab attack: {}: ownership: {} table walks, {} leaves, {} reaching busdma metadata",
            mode.name(),
            o.checks,
            o.leaves,
            o.exposed
        );
        let u = rep.reuse;
        eprintln!(
            "dmalab attack: {}: failed invalidations: {} rounds, {} buffers torn down ({} errors \
             reported), {} held in quarantine while probed, {} released after, {} next-owner pages, \
             {} of them reused",
            mode.name(),
            u.rounds,
            u.torn_down,
            u.reported,
            u.held_while_probed,
            u.released,
            u.next_owner_pages,
            u.reused
        );
        if u.reused != 0 {
            return Err(format!(
                "{}: busdma gave back {} pages a stale translation reached",
                mode.name(),
                u.reused
            ));
        }
        if o.exposed != 0 {
            return Err(format!(
                "{}: a device can reach busdma metadata ({} leaves)",
                mode.name(),
                o.exposed
            ));
        }
    }
    r.print(json_out);
    Ok(())
}
