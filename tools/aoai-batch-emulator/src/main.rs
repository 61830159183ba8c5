//! `aoai-batch-emulator`: a local stand-in for the Azure OpenAI Batch API with Blob Storage
//! input and output, for tests and development without Azure.
//!
//! It serves the documented batch endpoints (classic `?api-version=` and `/openai/v1/`),
//! reads the input blob from the storage account it is given (Azurite in tests), validates it
//! as the service does, and writes `results.jsonl` / `errors.jsonl` into the output folder,
//! moving each batch through the documented states one step at a time (every `--step-ms`, or,
//! with `--step-ms 0`, when a test asks for the step).
//!
//! Batches live in memory: a restart forgets them.

mod api;
mod batches;
mod blob_url;
mod faults;
mod input;
mod lifecycle;
mod list_query;
mod output;
mod webhooks;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use aoai_blob_batch::storage::{BlobStore, RetryPolicy};
use clap::Parser;

use crate::{
    api::AppState,
    batches::{Registry, Settings},
    faults::FaultInjector,
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "A local emulator of the Azure OpenAI Batch API with Blob Storage input and output"
)]
struct Cli {
    /// Address to serve on; port 0 picks a free port (the chosen one is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Connection string of the storage account inputs are read from and outputs written to.
    #[arg(
        long,
        env = "AOAI_EMULATOR_STORAGE_CONNECTION_STRING",
        hide_env_values = true
    )]
    storage_connection_string: String,

    /// A Global-Batch deployment name that exists (repeatable). Without any, every model name
    /// is accepted; with some, other names fail the job with `model_not_found`.
    #[arg(long = "deployment", value_name = "NAME")]
    deployments: Vec<String>,

    /// Time between two lifecycle steps of a batch, in milliseconds. 0: batches move only
    /// when a test steps them with `POST /_emulator/step` (a test control, see the README).
    #[arg(long, default_value_t = 1000)]
    step_ms: u64,

    /// Requests answered per `in_progress` step; default: a third of the batch (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "tokens_per_second")]
    lines_per_step: Option<u64>,

    /// Processing rate per deployment, in estimated tokens per second, shared equally among
    /// the deployment's `in_progress` batches: each `in_progress` step answers the requests
    /// its share of the time since the last step pays for (a manual step, `--step-ms 0`,
    /// counts as one second). Default: no rate; `--lines-per-step` paces the batches.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    tokens_per_second: Option<u64>,

    /// A batch not finished this long after creation becomes `expired` (default: the 24 h
    /// completion window).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    expire_after_ms: Option<u64>,

    /// Enqueued-token quota per deployment; a create that would pass it fails with 400
    /// `token_limit_exceeded` (or, with `--quota-refusal failed-batch`, its batch fails).
    /// Every create answer carries it in `deployment-maximum-enqueued-tokens`. The default is
    /// the documented Global Batch default for gpt-4o, gpt-4.1 and gpt-5 (200M).
    #[arg(long, value_name = "N", default_value_t = batches::DEFAULT_ENQUEUED_TOKEN_LIMIT)]
    enqueued_token_limit: u64,

    /// How a batch over the enqueued-token quota is refused: `fail-fast`, a 400
    /// `token_limit_exceeded` at create (the fail-fast regions); `failed-batch`, the create
    /// is accepted and the batch fails at its validation step with `token_limit_exceeded` in
    /// `errors.data` (the other regions).
    #[arg(long, value_enum, default_value_t = batches::QuotaRefusal::FailFast)]
    quota_refusal: batches::QuotaRefusal,

    /// The order of a list that asks for none. The service leaves it undocumented (OpenAI's
    /// v1 lists newest first; the classic spec's example asks `$orderby=created_at asc`), so a
    /// client must not depend on it: `oldest-first` tests that it does not.
    #[arg(long, value_enum, default_value_t = list_query::Order::NewestFirst)]
    list_order: list_query::Order,

    /// Fraction of requests answered with a 500 `server_error` line in `errors.jsonl`, chosen
    /// by hashing `custom_id` with the seed.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    line_failure_rate: f64,

    /// Fraction of API calls answered 429 (with `Retry-After: 1` and `retry-after-ms`).
    #[arg(long = "http-429-rate", default_value_t = 0.0, value_parser = rate)]
    http_429_rate: f64,

    /// Fraction of API calls answered 500.
    #[arg(long = "http-500-rate", default_value_t = 0.0, value_parser = rate)]
    http_500_rate: f64,

    /// Answer every API call with the gateway's 404 `{"error":{"code":"404","message":
    /// "Resource not found"}}`, as Azure does for a wrong or retired api-version or path,
    /// while batches go on. A test turns it on and off at run time with
    /// `POST /_emulator/gateway-404?on=true|false` (a test control, see the README).
    #[arg(long)]
    gateway_404: bool,

    /// Test-only: a batch whose input contains this text fails (`emulated_failure`).
    #[arg(long, value_name = "TEXT")]
    fail_input_containing: Option<String>,

    /// Test-only: a batch whose input contains this text expires after its first answers,
    /// keeping them (partial results, as an expired batch does).
    #[arg(long, value_name = "TEXT")]
    expire_input_containing: Option<String>,

    /// Seed for every injected fault: the same seed and requests give the same faults.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn rate(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if cli.http_429_rate + cli.http_500_rate > 1.0 {
        anyhow::bail!("--http-429-rate and --http-500-rate add up to more than 1");
    }

    // Errors from here name the faulty part of the connection string, never its key.
    let store = BlobStore::from_connection_string(
        &cli.storage_connection_string,
        // A few quick retries: the emulator's own steps retry later anyway.
        RetryPolicy { max_retries: 2 },
    )
    .context("--storage-connection-string")?;
    tracing::info!(storage = ?store, deployments = ?cli.deployments, "starting");

    let settings = Settings {
        deployments: cli.deployments,
        step: (cli.step_ms > 0).then(|| Duration::from_millis(cli.step_ms)),
        expire_after: cli.expire_after_ms.map(Duration::from_millis),
        enqueued_token_limit: cli.enqueued_token_limit,
        line_failure_rate: cli.line_failure_rate,
        lines_per_step: cli.lines_per_step,
        tokens_per_second: cli.tokens_per_second,
        list_order: cli.list_order,
        quota_refusal: cli.quota_refusal,
        seed: cli.seed,
        markers: input::Markers {
            fail: cli.fail_input_containing,
            expire: cli.expire_input_containing,
        },
    };
    let state = AppState {
        registry: Registry::new(Arc::new(store), settings),
        faults: Arc::new(FaultInjector::new(
            cli.seed,
            cli.http_429_rate,
            cli.http_500_rate,
        )),
        gateway_404: Arc::new(cli.gateway_404.into()),
        calls: Default::default(),
    };

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let addr = listener.local_addr()?;
    // Tests wait for this exact line on stdout to learn the port.
    println!("aoai-batch-emulator listening on http://{addr}");
    use std::io::Write as _;
    std::io::stdout().flush()?;

    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down; batches in memory are forgotten");
}
