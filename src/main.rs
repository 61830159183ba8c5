//! `handler`: the Azure Functions custom handler, and the validator as a command.
//!
//! - `handler` (no arguments, as the Functions host starts it): serves the host on
//!   `127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT`.
//! - `handler validate FILE`: checks a batch input file before upload; prints every problem
//!   (line, code, message) and exits 1 when there is one, 0 when it would be accepted.
//! - `handler status [NAME] [--json]` and `handler cancel NAME`: the operator's view of the
//!   jobs and their stop button, with the function app's settings (`cli`).
//! - `handler webhook register --url URL --secret-file FILE`: registers function-webhook with
//!   Azure OpenAI for the `batch.*` events; the signing secret goes to FILE, never to the output.

use std::{io::Write, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use aoai_blob_batch::{
    app::App,
    config::{Config, names},
    server,
    validate::{self, Limits},
};
use clap::{Parser, Subcommand};
use tracing_subscriber::fmt::writer::MakeWriterExt;

/// Each worker thread's stack (see where the runtime is built).
const WORKER_STACK_BYTES: usize = 8 * 1024 * 1024;

#[derive(Parser)]
#[command(
    name = "handler",
    version,
    about = "Azure OpenAI Batch from Blob Storage: the Functions custom handler"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Functions host (the default when no command is given).
    Serve,
    /// Check a .jsonl batch input file the way the handler will before submitting it.
    Validate {
        /// The .jsonl file to check.
        file: PathBuf,
    },
    /// Show every file's job: running ones, then the most recently finished. Reads the job
    /// records with the function app's settings (BATCH_STORAGE_CONNECTION_STRING, or
    /// BATCH_STORAGE_ACCOUNT_URL with your `az login`); no function app needed.
    /// Exit codes: 0 shown; 1 storage unreachable; 2 a setting missing; 3 no job for NAME.
    Status {
        /// Only this input file's jobs: its blob name in the input container, e.g.
        /// reports/q3.jsonl.
        name: Option<String>,
        /// Print JSON (`{"active": [...], "finished": [...]}`) instead of a table.
        #[arg(long)]
        json: bool,
        /// How many finished jobs to list, newest first.
        #[arg(long, default_value_t = aoai_blob_batch::cli::FINISHED_SHOWN)]
        finished: usize,
    },
    /// Stop a file's current job: cancels its batch (every part's, for a split file) and
    /// keeps what the service finished; a job with no batch yet is dropped. Needs the
    /// function app's settings, Azure OpenAI's included. Exit codes: 0 cancel sent (or job
    /// dropped); 1 storage or the service unreachable; 2 a setting missing; 3 no job for
    /// NAME; 4 the job has already finished (nothing changed).
    Cancel {
        /// The input file's blob name in the input container, e.g. reports/q3.jsonl.
        name: String,
    },
    /// Azure OpenAI webhooks for function-webhook.
    #[command(subcommand)]
    Webhook(WebhookCommand),
}

#[derive(Subcommand)]
enum WebhookCommand {
    /// Register function-webhook's URL for the batch.* events with the Azure OpenAI
    /// resource(s) of AZURE_OPENAI_ENDPOINT (api key from AZURE_OPENAI_API_KEY, else your
    /// `az login`). The signing secret is written to --secret-file, never printed.
    Register {
        /// function-webhook's URL with its function key:
        /// https://<app>.azurewebsites.net/api/function-webhook?code=<key>
        #[arg(long)]
        url: String,
        /// The endpoint's name in the resource.
        #[arg(long, default_value = "aoai-blob-batch")]
        name: String,
        /// Where the signing secret goes (added, comma-separated, when the file exists);
        /// its content is the value of the app setting AZURE_OPENAI_WEBHOOK_SECRET.
        #[arg(long, value_name = "FILE")]
        secret_file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Validate { file } => validate_file(&file),
        Command::Status {
            name,
            json,
            finished,
        } => aoai_blob_batch::cli::status(name.as_deref(), json, finished),
        Command::Cancel { name } => aoai_blob_batch::cli::cancel(&name),
        Command::Serve => serve(),
        Command::Webhook(WebhookCommand::Register {
            url,
            name,
            secret_file,
        }) => webhook_register(&url, &name, &secret_file),
    }
}

fn validate_file(path: &PathBuf) -> ExitCode {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let report = match validate::validate_reader(
        std::io::BufReader::with_capacity(1 << 20, file),
        Limits::default(),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let mut out = std::io::stdout().lock();
    validate::print_report(&report, &mut out);
    let _ = out.flush();
    if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Information to stdout; warnings and errors to stderr. The Functions host logs a custom
/// handler's stderr as Error, or as Warning when the line contains "warn".
fn init_logging() {
    let stdout = std::io::stdout.with_max_level(tracing::Level::INFO);
    let stderr = std::io::stderr.with_max_level(tracing::Level::WARN);
    let writer = stderr.and(stdout.with_min_level(tracing::Level::INFO));
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HANDLER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

fn serve() -> ExitCode {
    init_logging();
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !aoai_blob_batch::config::TEST_SWITCHES_COMPILED {
        for name in [
            names::TEST_FAULT,
            names::TEST_HOOKS,
            names::TEST_VALIDATE_DELAY_MS,
            names::TEST_HARVEST_DELAY_MS,
            names::TEST_SWEEP_OVERLAP_SECONDS,
            names::TEST_WEBHOOK_ANSWER_MS,
        ] {
            if std::env::var_os(name).is_some() {
                tracing::warn!(
                    "setting {name} is for tests of a debug build; this release build ignores it"
                );
            }
        }
    }
    let port = match std::env::var(names::HANDLER_PORT)
        .ok()
        .map(|p| p.trim().parse::<u16>())
    {
        Some(Ok(p)) => p,
        Some(Err(_)) => {
            eprintln!(
                "error: setting {} is malformed: not a port number",
                names::HANDLER_PORT
            );
            return ExitCode::from(2);
        }
        None => {
            eprintln!(
                "error: setting {} is required: the Functions host sets it; set it yourself to run the handler alone",
                names::HANDLER_PORT
            );
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The workflows nest (a tick steps a split job, which submits a part, which is
        // admitted, …), and a debug build's futures are many times a release build's: the
        // default 2 MiB of a worker thread overflowed in debug builds. Address space only:
        // a thread's pages are committed as they are touched.
        .thread_stack_size(WORKER_STACK_BYTES)
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let app = match App::new(config) {
            Ok(a) => Arc::new(a),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        // Loopback only: the host is the one caller.
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {addr}: {e}");
                return ExitCode::from(2);
            }
        };
        tracing::info!(
            %addr,
            storage = %app.store.account_url(),
            // Every endpoint of the pool (URLs only: no key, no token).
            openai = %app
                .config
                .openai_endpoints
                .iter()
                .map(|u| u.as_str())
                .collect::<Vec<_>>()
                .join(","),
            input = %app.config.input_container,
            output = %app.config.output_container,
            state = %app.config.state_container,
            "handler listening"
        );
        // Off the start-up path: the host gives the handler 60 s to answer GET /.
        let for_containers = app.clone();
        tokio::spawn(async move {
            if let Err(e) = for_containers.ensure_containers().await {
                tracing::warn!("could not make sure the containers exist: {e}");
            }
        });
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! { _ = shutdown => {}, _ = term.recv() => {} }
        };
        match axum::serve(listener, server::router(app))
            .with_graceful_shutdown(shutdown)
            .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: server stopped: {e}");
                ExitCode::from(1)
            }
        }
    })
}

fn webhook_register(url: &str, name: &str, secret_file: &std::path::Path) -> ExitCode {
    use aoai_blob_batch::webhook::register::{self, Credential};
    let endpoints = std::env::var(names::OPENAI_ENDPOINT).unwrap_or_default();
    let endpoints: Vec<&str> = endpoints
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        eprintln!(
            "error: setting {} is required: the Azure OpenAI resource to register with",
            names::OPENAI_ENDPOINT
        );
        return ExitCode::from(2);
    }
    let credential = match std::env::var(names::OPENAI_API_KEY)
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        Some(key) => Credential::ApiKey(aoai_blob_batch::config::Secret::new(key)),
        None => match azure_identity::DeveloperToolsCredential::new(None) {
            Ok(c) => Credential::Entra(c),
            Err(e) => {
                eprintln!(
                    "error: no {} and no Azure CLI login: {e}",
                    names::OPENAI_API_KEY
                );
                return ExitCode::from(2);
            }
        },
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    for endpoint in endpoints {
        let Ok(parsed) = url::Url::parse(endpoint) else {
            eprintln!(
                "error: setting {} is malformed: `{endpoint}` is not a URL",
                names::OPENAI_ENDPOINT
            );
            return ExitCode::from(2);
        };
        match runtime.block_on(register::register(
            &parsed,
            &credential,
            name,
            url,
            secret_file,
        )) {
            Ok(r) => println!(
                "registered webhook endpoint {} at {endpoint} for {}; its secret ({}) was added to {}",
                r.id,
                register::BATCH_EVENTS.join(", "),
                r.secret_hint,
                secret_file.display()
            ),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    }
    println!(
        "next: set the app setting {} to the file's content, e.g.\n  az functionapp config appsettings set -g <resource group> -n <function app> --settings \"{}=$(cat {})\"\nthen delete the file",
        names::WEBHOOK_SECRET,
        names::WEBHOOK_SECRET,
        secret_file.display()
    );
    ExitCode::SUCCESS
}
