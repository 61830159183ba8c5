//! `bench`: the benchmarks of the handler, run by `scripts/bench`.
//!
//! `bench run` generates its inputs in a work directory, starts Azurite and two batch
//! emulators (one fast, one whose batches never leave `validating`), runs every measurement
//! several times against release builds, and prints a table of medians, ratios and verdicts
//! (also written as Markdown and JSON). See BENCHMARKS.md for what each row means.
//!
//! `bench inproc MODE FILE` is one in-process measurement; `bench run` starts it as a child.

mod fleet;
mod generate;
mod inproc;
mod pipeline;
mod procs;
mod proxy;
mod report;
mod stack;
mod startup;
mod tick;
mod validation;
mod webhook;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Result, bail};
use aoai_blob_batch::storage::BlobStore;
use clap::{Parser, Subcommand};

use crate::{
    report::Report,
    stack::{Azurite, Bins, Emulator},
};

#[derive(Parser)]
#[command(
    name = "bench",
    about = "Benchmarks of the handler (see scripts/bench)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the benchmarks.
    Run(Box<RunArgs>),
    /// One in-process measurement over FILE; prints one JSON line.
    Inproc {
        #[arg(value_enum)]
        mode: inproc::Mode,
        file: PathBuf,
    },
    /// Writes the generated 200 MB input (or `--lines`) to FILE, e.g. for profiling.
    Gen {
        file: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        lines: u64,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// Work directory for the generated inputs and logs (created; emptied of inputs at the end).
    #[arg(long)]
    work: PathBuf,
    /// The release `handler` (glibc).
    #[arg(long)]
    handler: PathBuf,
    /// The deployed, static musl `handler` (scripts/package); start-up and size use it.
    #[arg(long)]
    musl_handler: Option<PathBuf>,
    /// The release `aoai-batch-emulator`.
    #[arg(long)]
    emulator: PathBuf,
    /// The release `local-host` (the webhook section plays the Functions host with it).
    #[arg(long)]
    local_host: Option<PathBuf>,
    /// `node_modules/.bin/azurite-blob`.
    #[arg(long)]
    azurite: PathBuf,
    /// A Python with bench/requirements.txt installed.
    #[arg(long)]
    python: PathBuf,
    /// bench/python/validate_ref.py.
    #[arg(long)]
    py_ref: PathBuf,
    /// The directory of tiktoken-rs's `o200k_base.tiktoken` and `cl100k_base.tiktoken`: the
    /// Python reference then estimates tokens as the handler does (with Python `tiktoken`
    /// from bench/requirements.txt). Without it, only the no-tokens reference runs.
    #[arg(long)]
    tiktoken_assets: Option<PathBuf>,
    /// Runs of each fast measurement.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Runs of each slow measurement (1 GB, harvest, sequential loops).
    #[arg(long, default_value_t = 3)]
    slow_runs: usize,
    /// Starts of the handler for the start-up median.
    #[arg(long, default_value_t = 20)]
    startup_runs: usize,
    /// Active jobs in the tick-scale measurement.
    #[arg(long, default_value_t = 1000)]
    tick_jobs: u64,
    /// The tick-scale jobs are taken in by the handler's sweep this many at a time, one tick
    /// per slice (0: all in one tick).
    #[arg(long, default_value_t = 1000)]
    tick_sweep: u64,
    /// Added latency per Azure OpenAI call in the tick measurement with latency.
    #[arg(long, default_value_t = 50)]
    openai_latency_ms: u64,
    /// Added latency per storage call in the tick measurement with latency.
    #[arg(long, default_value_t = 10)]
    storage_latency_ms: u64,
    /// Scales the generated inputs' line counts (1.0: 100,000 lines / 200 MB and 500,000 / 1 GB).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// The handler built from the commit before admission (d2137b0), for the fleet section's
    /// blind-backoff comparison.
    #[arg(long)]
    blind_backoff_handler: Option<PathBuf>,
    /// Fleet: seconds (bench time, 1 s = a minute of the service) for one deployment to
    /// process one quota's worth of tokens; the backlog is five of them.
    #[arg(long, default_value_t = 60)]
    fleet_wave_secs: u64,
    /// Sections to run (comma-separated): validation, memory, pipeline, tick, startup, webhook,
    /// fleet;
    /// and harvest, the harvest runs of pipeline alone (without the submit runs before them).
    #[arg(
        long,
        default_value = "validation,memory,pipeline,tick,startup,webhook,fleet"
    )]
    only: String,
    /// Markdown report.
    #[arg(long)]
    out_md: Option<PathBuf>,
    /// JSON report.
    #[arg(long)]
    out_json: Option<PathBuf>,
}

pub struct Config {
    pub work: PathBuf,
    pub bins: Bins,
    pub musl_handler: Option<PathBuf>,
    pub local_host: Option<PathBuf>,
    pub blind_backoff_handler: Option<PathBuf>,
    pub python: PathBuf,
    pub py_ref: PathBuf,
    pub tiktoken_assets: Option<PathBuf>,
    pub runs: usize,
    pub slow_runs: usize,
    pub startup_runs: usize,
    pub tick_jobs: u64,
    pub tick_sweep: u64,
    pub openai_latency_ms: u64,
    pub storage_latency_ms: u64,
}

pub struct Inputs {
    pub valid: PathBuf,
    pub valid_bytes: u64,
    pub valid_lines: u64,
    pub big: PathBuf,
    pub big_bytes: u64,
    pub big_lines: u64,
}

pub struct Stack {
    pub azurite: Azurite,
    pub store: BlobStore,
    /// `--step-ms` of a day: its batches stay `validating` (submit, tick scale).
    pub slow: Emulator,
    /// Batches complete within seconds (harvest).
    pub fast: Emulator,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Inproc { mode, file } => {
            let outcome = inproc::run(mode, &file)?;
            println!("{}", serde_json::to_string(&outcome)?);
            Ok(())
        }
        Cmd::Gen { file, lines } => {
            let bytes = generate::write_chat_file(&file, lines, 2000, 0, 1)?;
            eprintln!("{}: {lines} lines, {bytes} bytes", file.display());
            Ok(())
        }
        Cmd::Run(args) => {
            // One thread: children are started from the main thread only (PR_SET_PDEATHSIG is
            // tied to the forking thread), and the measurements run one at a time anyway.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(run(*args))
        }
    }
}

/// The repository: its host.json and function folders are the app local-host runs.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn abs(p: &Path) -> Result<PathBuf> {
    if !p.exists() {
        bail!("{} not found", p.display());
    }
    Ok(std::path::absolute(p)?)
}

async fn run(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(&args.work)?;
    let cfg = Config {
        work: abs(&args.work)?,
        bins: Bins {
            handler: abs(&args.handler)?,
            emulator: abs(&args.emulator)?,
            azurite: abs(&args.azurite)?,
        },
        musl_handler: args.musl_handler.as_deref().map(abs).transpose()?,
        local_host: args.local_host.as_deref().map(abs).transpose()?,
        blind_backoff_handler: args.blind_backoff_handler.as_deref().map(abs).transpose()?,
        python: args.python.clone(),
        py_ref: abs(&args.py_ref)?,
        tiktoken_assets: args.tiktoken_assets.as_deref().map(abs).transpose()?,
        runs: args.runs.max(1),
        slow_runs: args.slow_runs.max(1),
        startup_runs: args.startup_runs.max(1),
        tick_jobs: args.tick_jobs,
        tick_sweep: args.tick_sweep,
        openai_latency_ms: args.openai_latency_ms,
        storage_latency_ms: args.storage_latency_ms,
    };
    let only: Vec<&str> = args.only.split(',').map(str::trim).collect();
    let want = |s: &str| only.contains(&s);
    for s in &only {
        if ![
            "validation",
            "memory",
            "pipeline",
            "tick",
            "startup",
            "harvest",
            "webhook",
            "fleet",
        ]
        .contains(s)
        {
            bail!("unknown section {s:?} in --only");
        }
    }

    let mut rep = Report {
        machine: machine(&cfg),
        ..Default::default()
    };
    for (k, v) in &rep.machine {
        eprintln!("{k}: {v}");
    }

    let valid_lines = ((100_000.0 * args.scale) as u64).max(10);
    let big_lines = ((500_000.0 * args.scale) as u64).max(10);
    eprintln!("\n== generating inputs in {}", cfg.work.display());
    let t0 = Instant::now();
    let valid = cfg.work.join("input-200mb.jsonl");
    let big = cfg.work.join("input-1gb.jsonl");
    let valid_bytes = generate::write_chat_file(&valid, valid_lines, 2000, 0, 1)?;
    let big_bytes = if want("memory") || want("pipeline") {
        generate::write_chat_file(&big, big_lines, 2000, 0, 2)?
    } else {
        0
    };
    eprintln!(
        "  {valid_lines} lines / {valid_bytes} bytes and {big_lines} lines / {big_bytes} bytes in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if valid_bytes > 200 * 1024 * 1024 {
        bail!("the generated valid input is over the 200 MiB limit");
    }
    let inputs = Inputs {
        valid,
        valid_bytes,
        valid_lines,
        big,
        big_bytes,
        big_lines,
    };
    rep.note(format!(
        "Inputs: {valid_lines} chat requests (system + user message, ~2 KB a line, ids task-N), {valid_bytes} bytes; \
         and {big_lines} such requests, {big_bytes} bytes, for the memory runs (beyond one batch's limits: intake splits it into parts). Generated per run, deterministic."
    ));

    if want("validation") {
        validation::throughput(&cfg, &inputs, &mut rep)?;
    }
    if want("memory") {
        validation::memory(&cfg, &inputs, &mut rep)?;
    }
    if want("pipeline")
        || want("harvest")
        || want("tick")
        || want("startup")
        || want("webhook")
        || want("fleet")
    {
        eprintln!("\n== starting Azurite (in memory) and two batch emulators");
        let azurite = stack::start_azurite(&cfg.bins.azurite, &cfg.work)?;
        let store = stack::store(azurite.port)?;
        let slow = stack::start_emulator(
            &cfg.bins.emulator,
            azurite.port,
            86_400_000,
            cfg.work.join("emulator-slow.log"),
        )?;
        let fast = stack::start_emulator(
            &cfg.bins.emulator,
            azurite.port,
            500,
            cfg.work.join("emulator-fast.log"),
        )?;
        let stack = Stack {
            azurite,
            store,
            slow,
            fast,
        };
        if want("pipeline") {
            pipeline::upload_inputs(&stack, &inputs, &mut rep).await?;
            let download = pipeline::download_baseline(&cfg, &stack, &mut rep).await?;
            pipeline::submit_valid(&cfg, &stack, download, &mut rep).await?;
            pipeline::submit_big(&cfg, &stack, &inputs, &mut rep).await?;
            pipeline::harvest(&cfg, &stack, &mut rep).await?;
        } else if want("harvest") {
            pipeline::upload_valid(&stack, &inputs).await?;
            pipeline::harvest(&cfg, &stack, &mut rep).await?;
        }
        if want("tick") {
            tick::run(&cfg, &stack, &mut rep).await?;
        }
        if want("startup") {
            startup::run(&cfg, &stack, &mut rep)?;
        }
        if want("webhook") {
            webhook::run(&cfg, &stack, &mut rep).await?;
        }
        if want("fleet") {
            fleet::run(&cfg, &stack, args.fleet_wave_secs, &mut rep).await?;
        }
    }
    for f in [&inputs.valid, &inputs.big] {
        let _ = std::fs::remove_file(f);
    }
    rep.machine
        .push(("load average at the end".into(), loadavg()));
    rep.machine.push((
        "bench wall time".into(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    ));

    println!("\n{}", rep.text());
    if let Some(p) = &args.out_md {
        std::fs::write(p, rep.markdown())?;
        eprintln!("Markdown: {}", p.display());
    }
    if let Some(p) = &args.out_json {
        std::fs::write(p, serde_json::to_string_pretty(&rep)?)?;
        eprintln!("JSON: {}", p.display());
    }
    let misses = rep.rows.iter().filter(|r| r.verdict == "MISS").count();
    eprintln!(
        "{} goals met, {misses} missed",
        rep.rows.iter().filter(|r| r.verdict == "pass").count()
    );
    Ok(())
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(if o.stdout.is_empty() {
                &o.stderr
            } else {
                &o.stdout
            })
            .trim()
            .to_string()
        })
        .unwrap_or_else(|| "?".into())
}

/// The machine the numbers came from.
fn machine(cfg: &Config) -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or("?".into(), |kb| format!("{:.1} GiB", kb / 1048576.0));
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "?".into());
    let azurite_version = cfg
        .bins
        .azurite
        .ancestors()
        .nth(2)
        .map(|nm| read(&nm.join("azurite/package.json").to_string_lossy()))
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let git = format!(
        "{}{}",
        command_line("git", &["rev-parse", "--short", "HEAD"]),
        if command_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty()
            && command_line("git", &["status", "--porcelain"]).is_empty()
        {
            ""
        } else {
            " (working tree has changes)"
        }
    );
    vec![
        ("CPU".into(), format!("{cpu}, {cores} cores available")),
        ("memory".into(), mem),
        (
            "OS".into(),
            format!("{os}, Linux {}", read("/proc/sys/kernel/osrelease").trim()),
        ),
        ("rustc".into(), command_line("rustc", &["-V"])),
        (
            "Python".into(),
            command_line(&cfg.python.to_string_lossy(), &["-V"]),
        ),
        ("Node".into(), command_line("node", &["-v"])),
        ("Azurite".into(), azurite_version),
        ("commit".into(), git),
        ("load average at the start".into(), loadavg()),
    ]
}

/// 1, 5 and 15 minute load averages: other work on the machine skews every number.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
