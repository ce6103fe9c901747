//! `dmalab`: the busdma lab. Every command prints a human table by default and JSON Lines
//! with `--json`.

mod all;
mod attack;
mod bench_bounce;
mod bench_inval;
mod bench_iova;
mod bench_map;
mod bench_pgtable;
mod bench_pin;
mod cost;
mod fixture;
mod plot;
mod report;
mod rng;
mod soak;
mod tcpbench;

use std::process::ExitCode;

use busdma_model::{HostPlatform, MachineConfig};
use clap::{Args, Parser, Subcommand};
use report::Report;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(name = "dmalab", version, about = "The busdma lab: DMA-mapping designs, measured side by side")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every command shares.
#[derive(Args, Debug, Clone)]
struct Common {
    /// Print JSON Lines (one object per result row) instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

/// The machine-model shape, shared by the commands that build a machine.
#[derive(Args, Debug, Clone)]
struct MachineArgs {
    /// RAM size in MiB.
    #[arg(long, default_value_t = 1024)]
    ram_mib: u64,
    /// First physical address of RAM, in MiB.
    #[arg(long, default_value_t = 16)]
    ram_base_mib: u64,
    /// MiB of RAM (from its start) covered by the direct map; default all.
    #[arg(long)]
    direct_map_mib: Option<u64>,
    /// Number of model CPUs; default the host's.
    #[arg(long)]
    cpus: Option<usize>,
}

impl MachineArgs {
    fn config(&self) -> Result<MachineConfig, String> {
        let mib = |v: u64| v.checked_mul(1 << 20).ok_or_else(|| format!("{v} MiB does not fit in 64 bits"));
        let ram_size = mib(self.ram_mib)?;
        Ok(MachineConfig {
            ram_base: busdma::PhysAddr::new(mib(self.ram_base_mib)?),
            ram_size,
            direct_map_size: self.direct_map_mib.map(mib).transpose()?.unwrap_or(ram_size),
            cpus: self.cpus.unwrap_or(MachineConfig::default().cpus),
            cache: None,
        })
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmarks, each comparing designs side by side in one run.
    #[command(subcommand)]
    Bench(Bench),
    /// Random mixed workload on every strategy with invariant checks; fails on any violation.
    Soak {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: soak::SoakArgs,
    },
    /// The hostile device against busdma's IOMMU path: attempts, escapes, bytes leaked per
    /// attack class and mode, and the deferred window.
    Attack {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        machine: MachineArgs,
        #[command(flatten)]
        args: attack::AttackArgs,
    },
    /// Seed 002's tcpbench: a NIC transmitting through every DMA-mapping design, side by side.
    Tcpbench {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        machine: MachineArgs,
        #[command(flatten)]
        args: tcpbench::TcpArgs,
    },
    /// Run every command of the lab, print every result, write the plots.
    All {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: all::AllArgs,
    },
    /// Print the machine model's configuration.
    Info {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        machine: MachineArgs,
    },
}

/// `dmalab bench <name>`.
#[derive(Subcommand, Debug)]
enum Bench {
    /// Map/unmap latency per strategy (Linux's dma_map_benchmark equivalent).
    Map {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        machine: MachineArgs,
        #[command(flatten)]
        args: bench_map::MapArgs,
    },
    /// IOVA allocators (busdma with and without caches, vm-allocator, extent) under a
    /// fragmented space: ns per alloc+free pair.
    Iova {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: bench_iova::IovaArgs,
    },
    /// Map/unmap cycle cost under strict and deferred IOTLB invalidation (model IOMMU).
    Inval {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        machine: MachineArgs,
        #[command(flatten)]
        args: bench_inval::InvalArgs,
    },
    /// Bounce sync copies (memcpy, direct map, quick map) and the quick-map enter/remove cost.
    Bounce {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: bench_bounce::BounceArgs,
    },
    /// IO page-table map/unmap cost per page, busdma beside Google's aarch64-paging.
    Pgtable {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        machine: MachineArgs,
        #[command(flatten)]
        args: bench_pgtable::PgtableArgs,
    },
    /// Pre-registered memory: ua_to_pa, busdma's registry vs a linear list (Linux's walk).
    Pin(bench_pin::PinArgs),
}

fn bench_map_cmd(common: &Common, machine: &MachineArgs, args: &bench_map::MapArgs) -> Result<(), String> {
    let m =
        HostPlatform::new(machine.config()?).map_err(|e| format!("cannot build the machine model: {e}"))?;
    let mut r = Report::new();
    for row in bench_map::run(args, &m)? {
        r.push(row);
    }
    r.print(common.json);
    Ok(())
}

fn tcpbench_cmd(common: &Common, machine: &MachineArgs, args: &tcpbench::TcpArgs) -> Result<(), String> {
    let m =
        HostPlatform::new(machine.config()?).map_err(|e| format!("cannot build the machine model: {e}"))?;
    args.fragments()?;
    let runs = tcpbench::runs(args);
    let total = args.effective_packets() * runs as u64;
    let progress = std::sync::atomic::AtomicU64::new(0);
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("tcpbench {bar:40} {pos}/{len} packets ({eta})")
            .map_err(|e| e.to_string())?,
    );
    let done = std::sync::atomic::AtomicBool::new(false);
    let results = std::thread::scope(|s| {
        let ticker = s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                bar.set_position(progress.load(std::sync::atomic::Ordering::Relaxed));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let r = tcpbench::run(args, &m, &progress);
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = ticker.join();
        r
    });
    bar.finish_and_clear();
    let results = results?;
    let mut r = Report::new();
    for row in &results.rows {
        r.push(row);
    }
    r.push(&results.memcpy);
    if common.json {
        results.attribution.iter().for_each(|a| r.push(a));
        results.pools.iter().for_each(|p| r.push(p));
        r.print(true);
    } else {
        r.print(false);
        if !results.pools.is_empty() {
            println!();
            let mut t = Report::new();
            for p in &results.pools {
                let mut v = serde_json::to_value(p).map_err(|e| e.to_string())?;
                if let Some(o) = v.as_object_mut() {
                    o.remove("calibration");
                    o.remove("requires");
                }
                t.push(v);
            }
            t.print(false);
            for p in &results.pools {
                if let Some(c) = &p.calibration {
                    println!("{} ({}) calibration: {c}", p.pool, p.invalidation);
                }
                if let Some(r) = p.requires {
                    println!("{} needs {r}", p.pool);
                }
            }
        }
        if !results.attribution.is_empty() {
            println!();
            let mut t = Report::new();
            for a in &results.attribution {
                let mut v = serde_json::to_value(a).map_err(|e| e.to_string())?;
                if let Some(o) = v.as_object_mut() {
                    o.remove("summary");
                }
                t.push(v);
            }
            t.print(false);
            for a in &results.attribution {
                println!("{}", a.summary);
            }
        }
    }
    if let Some(path) = &args.plot {
        let bars: Vec<plot::Bar> = results
            .rows
            .iter()
            .map(|row| plot::Bar {
                label: format!("{} ({}, {})", row.strategy, row.invalidation, row.allocator),
                a: row.ns_per_packet,
                b: row.driver_ns_per_packet,
            })
            .chain([plot::Bar { label: "memcpy".into(), a: results.memcpy.ns_per_packet, b: 0.0 }])
            .collect();
        plot::bars(
            path,
            "tcpbench: cost per 1500-byte packet (log scale)",
            "ns per packet",
            ("ns per packet", "driver ns per packet (load, sync, unload, invalidation waits)"),
            &bars,
        )?;
        eprintln!("tcpbench: plot written to {}", path.display());
    }
    Ok(())
}

fn bench_pgtable_cmd(
    common: &Common,
    machine: &MachineArgs,
    args: &bench_pgtable::PgtableArgs,
) -> Result<(), String> {
    let m =
        HostPlatform::new(machine.config()?).map_err(|e| format!("cannot build the machine model: {e}"))?;
    let mut r = Report::new();
    for row in bench_pgtable::run(args, &m)? {
        r.push(row);
    }
    r.print(common.json);
    Ok(())
}

fn bench_inval_cmd(
    common: &Common,
    machine: &MachineArgs,
    args: &bench_inval::InvalArgs,
) -> Result<(), String> {
    let m =
        HostPlatform::new(machine.config()?).map_err(|e| format!("cannot build the machine model: {e}"))?;
    let mut r = Report::new();
    for row in bench_inval::run(args, &m)? {
        r.push(row);
    }
    r.print(common.json);
    Ok(())
}

fn info(common: &Common, machine: &MachineArgs) -> Result<(), String> {
    let config = machine.config()?;
    let m = HostPlatform::new(config).map_err(|e| format!("cannot build the machine model: {e}"))?;
    let ram = m.ram();
    let mut r = Report::new();
    let mut row = |item: &str, value: String| r.push(json!({"item": item, "value": value}));
    row("ram", format!("[{:#x}, {:#x})", ram.start().raw(), ram.end().raw()));
    row("ram_bytes", config.ram_size.to_string());
    row("direct_map_bytes", config.direct_map_size.to_string());
    row("not_direct_mapped_bytes", (config.ram_size - config.direct_map_size).to_string());
    row("page_size", busdma::PAGE_SIZE.to_string());
    row("cpus", config.cpus.to_string());
    row("quick_map_slots_per_cpu", busdma::platform::QUICK_SLOTS.to_string());
    row("free_frames", m.frames().free_frames().to_string());
    r.print(common.json);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info { common, machine } => info(common, machine),
        Command::All { common, args } => all::run(args).map(|results| {
            if common.json {
                // Each row gains a leading "command" field naming the command that produced it.
                for (name, rows) in &results {
                    for row in rows {
                        let mut tagged = serde_json::Map::new();
                        tagged.insert("command".into(), (*name).into());
                        tagged.extend(row.clone());
                        println!("{}", serde_json::Value::Object(tagged));
                    }
                }
            } else {
                for (name, rows) in &results {
                    println!("== {name}");
                    let mut r = Report::new();
                    for row in rows {
                        r.push(row);
                    }
                    r.print(false);
                    println!();
                }
            }
        }),
        Command::Attack { common, machine, args } => {
            machine.config().and_then(|c| attack::run_cmd(common.json, c, args))
        }
        Command::Tcpbench { common, machine, args } => tcpbench_cmd(common, machine, args),
        Command::Bench(Bench::Map { common, machine, args }) => bench_map_cmd(common, machine, args),
        Command::Bench(Bench::Iova { common, args }) => bench_iova::run(args).map(|rows| {
            let mut r = Report::new();
            rows.into_iter().for_each(|row| r.push(row));
            r.print(common.json);
        }),
        Command::Bench(Bench::Bounce { common, args }) => bench_bounce::run(args).map(|rows| {
            let mut r = Report::new();
            rows.into_iter().for_each(|row| r.push(row));
            r.print(common.json);
        }),
        Command::Bench(Bench::Pgtable { common, machine, args }) => bench_pgtable_cmd(common, machine, args),
        Command::Soak { common, args } => soak::run(args).and_then(|row| {
            let violations = row.violations;
            let mut r = Report::new();
            r.push(row);
            r.print(common.json);
            if violations == 0 { Ok(()) } else { Err(format!("soak: {violations} violations")) }
        }),
        Command::Bench(Bench::Pin(args)) => bench_pin::run(args),
        Command::Bench(Bench::Inval { common, machine, args }) => bench_inval_cmd(common, machine, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmalab: {e}");
            ExitCode::FAILURE
        }
    }
}
