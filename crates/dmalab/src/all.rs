//! `dmalab all`: runs every command of the lab, prints every result, writes every plot.
//!
//! Each command runs as a child process of this same binary with `--json`, so every
//! benchmark gets a fresh machine model, exactly the defaults a user gets by running it alone,
//! and its rows as it prints them; a failing command fails `all` with its error.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Map, Value};

use crate::plot;

/// Options of `dmalab all`.
#[derive(clap::Args, Debug, Clone)]
pub struct AllArgs {
    /// Write one SVG plot per command into this directory (created if missing).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Shorter runs where a command offers them (`tcpbench --quick`).
    #[arg(long)]
    pub quick: bool,
}

/// A command of the lab and how to plot its rows: the numeric fields drawn as bars (the other
/// fields label the bars), the axis unit.
struct Job {
    name: &'static str,
    args: &'static [&'static str],
    values: (&'static str, Option<&'static str>),
    unit: &'static str,
}

/// Every command `all` runs, in order. The list is checked against the CLI by a test.
const JOBS: &[Job] = &[
    Job {
        name: "tcpbench",
        args: &["tcpbench"],
        values: ("ns_per_packet", Some("driver_ns_per_packet")),
        unit: "ns per packet",
    },
    Job {
        name: "bench-iova",
        args: &["bench", "iova"],
        values: ("ns_per_op", None),
        unit: "ns per alloc+free",
    },
    Job {
        name: "bench-pgtable",
        args: &["bench", "pgtable"],
        values: ("ns_per_page", None),
        unit: "ns per page",
    },
    Job {
        name: "bench-map",
        args: &["bench", "map"],
        values: ("map_ns", Some("unmap_ns")),
        unit: "ns per operation",
    },
    Job {
        name: "bench-inval",
        args: &["bench", "inval"],
        values: ("ns_per_op", None),
        unit: "ns per map/unmap cycle",
    },
    Job {
        name: "bench-bounce",
        args: &["bench", "bounce"],
        values: ("gbps", Some("ns_per_op")),
        unit: "gbps / ns",
    },
    Job {
        name: "bench-pin",
        args: &["bench", "pin"],
        values: ("ns_per_lookup", None),
        unit: "ns per lookup",
    },
    Job { name: "attack", args: &["attack"], values: ("attempts", Some("escapes")), unit: "count" },
];

/// Runs one job; returns its rows.
fn run_job(job: &Job, quick: bool) -> Result<Rows, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the dmalab binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(job.args).arg("--json");
    if quick && job.name == "tcpbench" {
        cmd.arg("--quick");
    }
    eprintln!("dmalab all: running {}", job.args.join(" "));
    let out = cmd.output().map_err(|e| format!("{}: {e}", job.name))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            job.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text =
        String::from_utf8(out.stdout).map_err(|e| format!("{}: output is not UTF-8: {e}", job.name))?;
    text.lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(format!("{}: not a JSON object row: {l}", job.name)),
        })
        .collect()
}

/// The label of a row: its non-plotted fields, in order.
fn label(row: &Map<String, Value>, job: &Job) -> String {
    row.iter()
        .filter(|(k, _)| *k != job.values.0 && Some(k.as_str()) != job.values.1)
        .filter(|(_, v)| v.is_string() || v.is_u64() || v.is_i64())
        .map(|(_, v)| v.as_str().map_or_else(|| v.to_string(), str::to_string))
        .collect::<Vec<_>>()
        .join(" ")
}

fn plot_job(dir: &Path, job: &Job, rows: &[Map<String, Value>]) -> Result<(), String> {
    let num = |r: &Map<String, Value>, k: Option<&str>| k.and_then(|k| r.get(k)).and_then(Value::as_f64);
    let bars: Vec<plot::Bar> = rows
        .iter()
        .filter_map(|r| {
            let a = num(r, Some(job.values.0));
            let b = num(r, job.values.1);
            (a.is_some() || b.is_some()).then(|| plot::Bar {
                label: label(r, job),
                a: a.unwrap_or(0.0),
                b: b.unwrap_or(0.0),
            })
        })
        .collect();
    if bars.is_empty() {
        return Ok(());
    }
    let path = dir.join(format!("{}.svg", job.name));
    let names = (job.values.0, job.values.1.unwrap_or(""));
    plot::bars(&path, &format!("dmalab {} (log scale)", job.args.join(" ")), job.unit, names, &bars)?;
    eprintln!("dmalab all: wrote {}", path.display());
    Ok(())
}

/// The rows one command printed.
pub type Rows = Vec<Map<String, Value>>;

/// Runs every job; returns `(job name, rows)` in order.
pub fn run(args: &AllArgs) -> Result<Vec<(&'static str, Rows)>, String> {
    if let Some(dir) = &args.plot {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut out = Vec::new();
    for job in JOBS {
        let rows = run_job(job, args.quick)?;
        if let Some(dir) = &args.plot {
            plot_job(dir, job, &rows)?;
        }
        out.push((job.name, rows));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_job_is_a_command_of_the_cli() {
        let cli = crate::Cli::command();
        for job in JOBS {
            let mut c = &cli;
            for a in job.args {
                c = c.find_subcommand(a).unwrap_or_else(|| panic!("{}: no subcommand {a}", job.name));
            }
            assert!(c.get_arguments().any(|a| a.get_id() == "json"), "{} has no --json", job.name);
        }
    }

    #[test]
    fn every_job_plots_a_field_its_command_prints() {
        // The plotted fields are named in the command's own source (its row struct or json!).
        let sources = [
            ("tcpbench", include_str!("tcpbench.rs")),
            ("bench-iova", include_str!("bench_iova.rs")),
            ("bench-pgtable", include_str!("bench_pgtable.rs")),
            ("bench-map", include_str!("bench_map.rs")),
            ("bench-inval", include_str!("bench_inval.rs")),
            ("bench-bounce", include_str!("bench_bounce.rs")),
            ("bench-pin", include_str!("bench_pin.rs")),
            ("attack", include_str!("attack.rs")),
        ];
        for job in JOBS {
            let (_, src) = sources.iter().find(|(n, _)| *n == job.name).expect("a source for every job");
            for v in [Some(job.values.0), job.values.1].into_iter().flatten() {
                assert!(src.contains(v), "{}: its command never prints {v}", job.name);
            }
        }
    }

    #[test]
    fn labels_are_the_unplotted_fields() {
        let job = &JOBS[0];
        let row: Map<String, Value> = serde_json::from_str(
            r#"{"strategy":"iommu-per-map","invalidation":"strict","packets":10,"ns_per_packet":1.5,"driver_ns_per_packet":0.5,"mbit_s":3.0}"#,
        )
        .unwrap();
        assert_eq!(label(&row, job), "iommu-per-map strict 10");
    }
}
