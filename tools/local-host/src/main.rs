//! `local-host`: a stand-in for the Azure Functions host, for local runs only.
//!
//! The Functions host and Core Tools cannot be installed here, so this program plays their part
//! for the custom handler: it reads the app root (`host.json`, `*/function.json`), starts the
//! handler with `FUNCTIONS_CUSTOMHANDLER_PORT`, delivers Event Grid BlobCreated events for new
//! blobs in the input container and fires timer functions on their NCRONTAB schedule, all with
//! the host's payloads and headers (shared/reference/functions-research.md §1, §2c, §2d).
//! In Azure none of this code runs.

mod app_root;
mod blobs;
mod child;
mod http;
mod invoke;
mod schedule;
mod timer;
mod watch;

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use aoai_blob_batch::storage::{BlobStore, ConnectionString};
use clap::{Args, Parser, Subcommand};
use tokio::task::JoinHandle;

use crate::{
    app_root::{AppRoot, Settings, Trigger},
    child::HandlerProcess,
    invoke::{EventShape, EventSource, Invoker},
    schedule::Schedule,
    timer::TimerFunction,
    watch::{DeliveryPolicy, Target, Watcher},
};

const BANNER: &str = "local-host: a stand-in for the Azure Functions host, for local runs only; in Azure the Functions host does this";

/// The host's documented limit for a custom handler to start listening.
const READY_LIMIT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(5);
const EVENT_CONCURRENCY: usize = 8;

/// Exit codes: 0 done (--exit-when-exists satisfied), 1 failure or timeout, 130 interrupted.
const EXIT_FAILED: u8 = 1;
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "local-host",
    version,
    about = "A stand-in for the Azure Functions host, for local runs only: starts the custom handler, delivers BlobCreated events for new input blobs and fires the timer",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Upload a local file as a block blob (creates the container if needed).
    Upload {
        #[command(flatten)]
        storage: StorageArgs,
        #[arg(long, default_value = "batch-input")]
        container: String,
        /// Blob name; default: the file's name.
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        file: PathBuf,
    },
    /// Print a blob's content.
    Cat {
        #[command(flatten)]
        storage: StorageArgs,
        /// CONTAINER/BLOB
        path: String,
    },
    /// List blobs: size, ETag, name.
    Ls {
        #[command(flatten)]
        storage: StorageArgs,
        /// CONTAINER or CONTAINER/PREFIX
        path: String,
    },
}

#[derive(Args)]
struct StorageArgs {
    /// Storage connection string (Azurite or dev account) used to watch and read blobs.
    #[arg(
        long,
        env = "BATCH_STORAGE_CONNECTION_STRING",
        hide_env_values = true,
        value_name = "CS"
    )]
    storage_connection_string: Option<String>,
}

#[derive(Args)]
struct RunArgs {
    /// The Functions app root: the folder with host.json and the function folders.
    #[arg(long, default_value = ".", value_name = "DIR")]
    app_root: PathBuf,
    /// Run this executable instead of host.json's customHandler defaultExecutablePath.
    #[arg(long, value_name = "PATH")]
    handler: Option<PathBuf>,
    /// A local.settings.json whose Values become app settings (the environment wins).
    #[arg(long, value_name = "FILE")]
    settings: Option<PathBuf>,
    #[command(flatten)]
    storage: StorageArgs,
    /// The container whose new .jsonl blobs raise BlobCreated events.
    #[arg(long, default_value = "batch-input")]
    input_container: String,
    /// How often to list the input container (and check --exit-when-exists).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    poll_ms: u64,
    /// Deliver events only for blobs created after start (default: also for those already there,
    /// like an initial sync).
    #[arg(long)]
    skip_existing: bool,
    /// Fire timer functions every N ms instead of on their NCRONTAB schedule.
    #[arg(long, value_name = "N")]
    timer_every_ms: Option<u64>,
    /// How long Event Grid waits for the answer to a delivery before it counts the attempt
    /// as failed and redelivers (Event Grid: 30 s). The invocation itself keeps running
    /// until it ends or reaches host.json's functionTimeout, as in the host.
    #[arg(long, default_value_t = 30.0, value_name = "SECS", value_parser = positive_secs)]
    event_delivery_timeout_secs: f64,
    /// Waits before the 2nd, 3rd, … delivery of an event whose attempt failed (non-2xx, no
    /// answer, or none within --event-delivery-timeout-secs); the last one repeats. Default:
    /// Event Grid's schedule (10 s, 30 s, 1 min, 5 min, 10 min, 30 min, then hourly). Give a
    /// scaled-down one for tests, e.g. 100,300.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,30000,60000,300000,600000,1800000,3600000",
        value_name = "MS,MS,…"
    )]
    retry_delays_ms: Vec<u64>,
    /// Deliveries of one event at most, the first included (an Event Grid subscription's
    /// maxDeliveryAttempts, default 30); then the event is dropped.
    #[arg(long, default_value_t = 30, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=30))]
    max_delivery_attempts: u32,
    /// No delivery of an event starts later than this after it was raised (an Event Grid
    /// subscription's eventTimeToLiveInMinutes, default 1440 = 24 h); then it is dropped.
    #[arg(long, default_value_t = 1440, value_name = "MINUTES", value_parser = clap::value_parser!(u64).range(1..=1440))]
    event_ttl_minutes: u64,
    /// How Data.{binding} carries the event: `object`, as the real host sends it (read in
    /// its source; see tools/local-host/README.md), or `string`, a JSON string holding a
    /// JSON string, to check that a handler decodes that too.
    #[arg(long, value_enum, default_value_t = EventShape::Object)]
    event_shape: EventShape,
    /// Stop (exit 0) once this blob exists; repeatable, then all of them.
    #[arg(long, value_name = "CONTAINER/BLOB")]
    exit_when_exists: Vec<String>,
    /// Give up (exit 1) after this long.
    #[arg(long, value_name = "N")]
    timeout_secs: Option<u64>,
    /// Where HTTP-triggered functions (function-webhook) are served, at /api/{function};
    /// port 0 picks a free one (the address is logged). `func start` uses 127.0.0.1:7071.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    http_listen: std::net::SocketAddr,
}

/// A duration in seconds, fractions allowed (tests scale Event Grid's 30 s down).
fn positive_secs(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!("`{text}` is not a number of seconds in (0, 86400]")),
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_target(false)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCAL_HOST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(command) => blob_command(command).await.map(|()| 0),
        None => {
            init_logging();
            // Awaited right here, not spawned: the handler must be started from the main thread
            // (see `HandlerProcess::start`).
            run(cli.run).await
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("local-host: error: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn connection_string(storage: StorageArgs) -> Result<String> {
    storage.storage_connection_string.ok_or_else(|| {
        anyhow!("no storage connection string: pass --storage-connection-string or set BATCH_STORAGE_CONNECTION_STRING")
    })
}

async fn blob_command(command: Command) -> Result<()> {
    match command {
        Command::Upload {
            storage,
            container,
            name,
            file,
        } => {
            let name = match name {
                Some(n) => n,
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| anyhow!("give --name for {}", file.display()))?
                    .to_string(),
            };
            let store = blobs::store(&connection_string(storage)?)?;
            blobs::upload(&store, &container, &name, &file).await
        }
        Command::Cat { storage, path } => {
            let (container, name) = blobs::split_path(&path)?;
            let store = blobs::store(&connection_string(storage)?)?;
            blobs::cat(&store, &container, &name).await
        }
        Command::Ls { storage, path } => {
            let (container, prefix) = path.split_once('/').unwrap_or((&path, ""));
            let store = blobs::store(&connection_string(storage)?)?;
            blobs::ls(&store, container, prefix).await
        }
    }
}

/// What one run does, worked out before the handler starts so a configuration mistake stops
/// everything with one message and nothing to clean up.
struct Plan {
    app: AppRoot,
    settings: Settings,
    store: Option<Arc<BlobStore>>,
    account: String,
    targets: Vec<Target>,
    timers: Vec<TimerFunction>,
    http_functions: Vec<http::HttpFunction>,
    exit_when: Vec<(String, String)>,
}

fn plan(args: &RunArgs) -> Result<Plan> {
    let root = std::fs::canonicalize(&args.app_root)
        .with_context(|| format!("app root {} does not exist", args.app_root.display()))?;
    let mut settings = Settings::from_env();
    if let Some(file) = &args.settings {
        settings.load_file(file)?;
    }
    let mut app = AppRoot::load(&root, &settings)?;
    if let Some(handler) = &args.handler {
        // A path relative to where local-host was started, as a user typing it expects; a bare
        // name that is not a file is left to PATH, like the host does.
        app.handler.executable = std::fs::canonicalize(handler).unwrap_or_else(|_| handler.clone());
    }

    let mut targets = Vec::new();
    let mut timers = Vec::new();
    let mut http_functions = Vec::new();
    for f in &app.functions {
        match &f.trigger {
            Trigger::EventGrid { binding } => targets.push(Target {
                function: f.name.clone(),
                binding: binding.clone(),
            }),
            Trigger::Timer {
                binding,
                schedule,
                run_on_startup,
                use_monitor,
            } => {
                let parsed =
                    Schedule::ncrontab(schedule).with_context(|| format!("function {}", f.name))?;
                let use_monitor = use_monitor
                    .unwrap_or_else(|| parsed.interval_hint() >= Duration::from_secs(60));
                let schedule = match args.timer_every_ms {
                    Some(ms) => Schedule::Every(Duration::from_millis(ms.max(1))),
                    None => parsed,
                };
                timers.push(TimerFunction {
                    function: f.name.clone(),
                    binding: binding.clone(),
                    schedule,
                    run_on_startup: *run_on_startup,
                    use_monitor,
                });
            }
            Trigger::Other { kind, .. } if kind.eq_ignore_ascii_case("httpTrigger") => {
                http_functions.push(http::HttpFunction::load(&app.root, &f.name)?)
            }
            Trigger::Other { kind, .. } => tracing::warn!(
                "{}: {kind} is not played by local-host; the function is never invoked",
                f.name
            ),
        }
    }

    let cs = args.storage.storage_connection_string.clone().or_else(|| {
        settings
            .get("BATCH_STORAGE_CONNECTION_STRING")
            .map(str::to_string)
    });
    let (store, account) = match &cs {
        Some(cs) => (
            Some(Arc::new(blobs::store(cs)?)),
            ConnectionString::parse(cs)
                .map_err(|e| anyhow!("{e}"))?
                .account_name,
        ),
        None => (None, String::new()),
    };
    let exit_when = args
        .exit_when_exists
        .iter()
        .map(|p| blobs::split_path(p))
        .collect::<Result<Vec<_>>>()?;
    if store.is_none() && !exit_when.is_empty() {
        bail!(
            "--exit-when-exists needs storage: pass --storage-connection-string or set BATCH_STORAGE_CONNECTION_STRING"
        );
    }
    Ok(Plan {
        app,
        settings,
        store,
        account,
        targets,
        timers,
        http_functions,
        exit_when,
    })
}

async fn run(args: RunArgs) -> Result<u8> {
    println!("{BANNER}");
    let plan = plan(&args)?;
    let poll = Duration::from_millis(args.poll_ms.max(50));

    tracing::info!("app root {}", plan.app.root.display());
    for t in &plan.targets {
        match &plan.store {
            Some(_) => tracing::info!(
                "{}: eventGridTrigger (binding `{}`) ← BlobCreated for {}/*.jsonl, listed every {} ms; each delivery waits {} s for an answer, up to {} attempts",
                t.function,
                t.binding,
                args.input_container,
                poll.as_millis(),
                args.event_delivery_timeout_secs,
                args.max_delivery_attempts
            ),
            None => tracing::warn!(
                "{}: eventGridTrigger, but no storage connection string: no events will be delivered",
                t.function
            ),
        }
    }
    for t in &plan.timers {
        tracing::info!(
            "{}: timerTrigger (binding `{}`) {}{}",
            t.function,
            t.binding,
            t.schedule.describe(),
            if t.run_on_startup {
                ", runOnStartup"
            } else {
                ""
            }
        );
    }
    if let Some(store) = &plan.store
        && !plan.targets.is_empty()
    {
        // The infrastructure creates it in Azure; a fresh Azurite has none.
        store
            .ensure_container(&args.input_container)
            .await
            .map_err(|e| anyhow!("cannot create container {}: {e}", args.input_container))?;
    }

    let port = child::free_port()?;
    let mut handler =
        HandlerProcess::start(&plan.app.handler, &plan.app.root, &plan.settings, port)?;
    tracing::info!(
        "started handler {} (pid {}) with FUNCTIONS_CUSTOMHANDLER_PORT={port}",
        plan.app.handler.executable.display(),
        handler.pid().unwrap_or_default()
    );

    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let deadline = async {
        match args.timeout_secs {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    let code = tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!("{signal}: stopping");
            EXIT_INTERRUPTED
        }
        () = deadline => {
            tracing::error!(
                "timed out after {} s{}",
                args.timeout_secs.unwrap_or_default(),
                if plan.exit_when.is_empty() {
                    String::new()
                } else {
                    format!(" waiting for {}", args.exit_when_exists.join(", "))
                }
            );
            EXIT_FAILED
        }
        code = serve(&mut handler, &mut tasks, &plan, &args, poll) => code,
    };
    // No new invocations while the handler shuts down.
    for t in &tasks {
        t.abort();
    }
    handler.stop(STOP_GRACE).await;
    tracing::info!("handler stopped");
    Ok(code)
}

async fn serve(
    handler: &mut HandlerProcess,
    tasks: &mut Vec<JoinHandle<()>>,
    plan: &Plan,
    args: &RunArgs,
    poll: Duration,
) -> u8 {
    if let Err(e) = handler.wait_ready(READY_LIMIT).await {
        tracing::error!("{e:#}");
        return EXIT_FAILED;
    }
    tracing::info!("handler ready on http://127.0.0.1:{}", handler.port);
    let invoker = Invoker::new(handler.port, plan.app.function_timeout);

    if let Some(store) = &plan.store
        && !plan.targets.is_empty()
    {
        let watcher = Watcher {
            store: store.clone(),
            container: args.input_container.clone(),
            targets: plan.targets.clone(),
            source: EventSource::for_account(&plan.account),
            invoker: invoker.clone(),
            poll,
            skip_existing: args.skip_existing,
            delivery: DeliveryPolicy {
                timeout: Duration::from_secs_f64(args.event_delivery_timeout_secs),
                retry_delays: args
                    .retry_delays_ms
                    .iter()
                    .map(|&ms| Duration::from_millis(ms))
                    .collect(),
                max_attempts: args.max_delivery_attempts,
                time_to_live: Duration::from_secs(args.event_ttl_minutes * 60),
            },
            event_shape: args.event_shape,
            concurrency: Arc::new(tokio::sync::Semaphore::new(EVENT_CONCURRENCY)),
        };
        tasks.push(tokio::spawn(watcher.run()));
    }
    for t in &plan.timers {
        tasks.push(tokio::spawn(timer::run(t.clone(), invoker.clone())));
    }
    if !plan.http_functions.is_empty() {
        let forward = http::forwarding_enabled(&plan.app.root).unwrap_or(false);
        match http::bind(args.http_listen, &plan.http_functions, forward).await {
            Ok(listener) => tasks.push(tokio::spawn(http::serve(
                listener,
                plan.http_functions.clone(),
                forward,
                handler.port,
                plan.app.function_timeout,
            ))),
            Err(e) => {
                tracing::error!("{e:#}");
                return EXIT_FAILED;
            }
        }
    }

    tokio::select! {
        status = handler.exited() => {
            match status {
                Ok(s) => tracing::error!("the handler exited ({s}); its output is above"),
                Err(e) => tracing::error!("lost track of the handler: {e}"),
            }
            EXIT_FAILED
        }
        () = all_exist(plan.store.clone(), &plan.exit_when, poll) => {
            tracing::info!("found {}: done", args.exit_when_exists.join(", "));
            0
        }
    }
}

/// Resolves once every blob exists; never, when there are none to wait for.
async fn all_exist(store: Option<Arc<BlobStore>>, blobs: &[(String, String)], poll: Duration) {
    let Some(store) = store.filter(|_| !blobs.is_empty()) else {
        return std::future::pending().await;
    };
    let mut missing: Vec<&(String, String)> = blobs.iter().collect();
    let mut last_error = None;
    loop {
        let mut still = Vec::new();
        for blob in missing {
            match store.properties(&blob.0, &blob.1).await {
                Ok(Some(_)) => tracing::info!("{}/{} exists", blob.0, blob.1),
                Ok(None) => still.push(blob),
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!("cannot check {}/{}: {e}", blob.0, blob.1);
                        last_error = Some(e);
                    }
                    still.push(blob);
                }
            }
        }
        if still.is_empty() {
            return;
        }
        missing = still;
        tokio::time::sleep(poll).await;
    }
}

async fn shutdown_signal() -> &'static str {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can listen for SIGTERM");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "SIGTERM",
    }
}
