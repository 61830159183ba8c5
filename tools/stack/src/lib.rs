//! The local stack, started one way for the integration tests and the benchmarks: real
//! Azurite, the batch emulator and the `handler` binary, each a child process on a free
//! loopback port, killed when its handle drops; plus the Functions host's payloads.
//!
//! - [`Azurite::launch`], [`Emulator::launch`], [`Handler::launch`] take the binary and
//!   [`Options`] (output captured in memory or written to a log file); the `start`
//!   functions are the tests' defaults ([`Bins::local`], captured output) and panic with the
//!   process's output when it does not come up.
//! - [`blob_created_event`], [`trigger_payload`] and [`timer_payload`] build the payloads the
//!   host POSTs; [`Handler::post`] sends one as it does.
//!
//! What a test asserts, or a benchmark measures, stays with it.

mod host;
mod proc;

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use aoai_blob_batch::{
    config::{ApiStyle, Secret},
    openai::{Auth, Batch, BatchClient, RetryConfig},
    storage::{BlobStore, RetryPolicy},
};
use serde_json::Value;

pub use host::{blob_created_event, timer_payload, trigger_payload};
pub use proc::{Options, Output, Proc, die_with_parent};

/// Azurite's documented development account key (public, not a secret).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The API key the handler sends to the emulator (which accepts any).
pub const API_KEY: &str = "test-api-key-0123456789";
/// The deployment [`Emulator::start`] declares: the model name of the seed's sample lines.
pub const DEPLOYMENT: &str = "REPLACE-WITH-MODEL-DEPLOYMENT-NAME";
/// The line the handler logs once it serves its port.
const HANDLER_READY: &str = "handler listening";

/// A process of the stack did not come up; carries what it printed.
#[derive(Debug)]
pub struct Error {
    message: String,
    output: String,
}

impl Error {
    fn new(message: String) -> Error {
        Error {
            message,
            output: String::new(),
        }
    }

    fn with_output(message: String, output: String) -> Error {
        Error { message, output }
    }

    /// What the process printed before it failed.
    pub fn output(&self) -> &str {
        &self.output
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.output.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}; output:\n{}", self.message, self.output)
        }
    }
}

impl std::error::Error for Error {}

/// The workspace's root directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A port free right now on 127.0.0.1 (another process may take it before it is used).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The connection string of Azurite's development account on `port`.
pub fn connection_string(port: u16) -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
    )
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub handler: PathBuf,
    pub emulator: PathBuf,
    pub azurite: PathBuf,
}

impl Bins {
    /// The workspace's binaries of the running executable's profile, found as Cargo lays
    /// them out: `target/<profile>/` holds the binaries and `deps/` the test executables.
    /// `cargo test -p aoai-blob-batch` builds only that package's binaries, so the emulator
    /// is built here, once per process. Azurite is the npm package's.
    pub fn local() -> &'static Bins {
        static BINS: OnceLock<Bins> = OnceLock::new();
        BINS.get_or_init(|| {
            let dir = profile_dir();
            build_package("aoai-batch-emulator", &dir);
            Bins {
                handler: dir.join("handler"),
                emulator: dir.join("aoai-batch-emulator"),
                azurite: azurite_bin(),
            }
        })
    }
}

/// The binaries of the running executable's profile (see [`Bins::local`]).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable");
    let mut dir = exe.parent().expect("its directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// `cargo build -p package` in the profile whose binaries are in `dir`.
fn build_package(package: &str, dir: &Path) {
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()));
    build.args(["build", "--quiet", "-p", package]);
    match dir.file_name().and_then(OsStr::to_str) {
        Some("debug") | None => {}
        Some(profile) => {
            build.args(["--profile", profile]);
        }
    }
    let status = build.current_dir(root()).status().expect("cargo runs");
    assert!(status.success(), "building {package} failed");
}

/// The workspace's `local-host` (tools/local-host), built on first use: only the tests that
/// run the handler under it pay for building it.
pub fn local_host_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        build_package("local-host", &dir);
        dir.join("local-host")
    })
}

/// The npm package's Azurite (`npm ci` installs it).
pub fn azurite_bin() -> PathBuf {
    root().join("node_modules/.bin/azurite-blob")
}

/// Starts a service that picks its own port and names it in its output: waits for the line
/// with `marker` ("… listening on http://127.0.0.1:PORT[/]") and reads the port off its end.
fn listening(
    name: &str,
    cmd: Command,
    options: &Options,
    marker: &str,
) -> Result<(Proc, u16), Error> {
    let mut proc = Proc::spawn(name, cmd, options)?;
    let line = proc.wait_for_line(marker, Duration::from_secs(60))?;
    let tail = line.trim_end().trim_end_matches('/').rsplit(':').next();
    let port = tail
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| Error::new(format!("no port in {line:?}")))?;
    Ok((proc, port))
}

fn or_panic<T>(what: &str, r: Result<T, Error>) -> T {
    r.unwrap_or_else(|e| panic!("{what} did not start: {e}"))
}

/// How Azurite keeps its data.
#[derive(Debug, Clone, Copy)]
pub enum Storage<'a> {
    Memory,
    /// `--location`: stopped with [`Proc::terminate`] and started again on the same port and
    /// directory, it comes back with every blob.
    Disk(&'a Path),
}

pub struct Azurite {
    pub proc: Proc,
    pub port: u16,
}

impl Azurite {
    /// Starts `bin` (`azurite-blob`) on 127.0.0.1:`port` (0: a free one); `adjust` may add
    /// arguments, environment or a working directory. Waits for its "listens on" line.
    pub fn launch(
        bin: &Path,
        port: u16,
        storage: Storage,
        options: &Options,
        adjust: impl FnOnce(&mut Command),
    ) -> Result<Azurite, Error> {
        if !bin.exists() {
            return Err(Error::new(format!(
                "Azurite is not installed ({}): run `npm ci` in {}",
                bin.display(),
                root().display()
            )));
        }
        let mut cmd = Command::new(bin);
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()]);
        match storage {
            Storage::Memory => cmd.arg("--inMemoryPersistence"),
            Storage::Disk(dir) => cmd.arg("--location").arg(dir),
        };
        cmd.args(["--disableTelemetry", "--skipApiVersionCheck", "--loose"]);
        adjust(&mut cmd);
        let (proc, port) = listening("Azurite", cmd, options, "successfully listens on")?;
        Ok(Azurite { proc, port })
    }

    /// Azurite in memory on a free port.
    pub fn start() -> Azurite {
        Azurite::start_on(0, Storage::Memory)
    }

    /// Azurite on `port` (0: a free one) keeping its data in `dir`.
    pub fn start_persistent(dir: &Path, port: u16) -> Azurite {
        Azurite::start_on(port, Storage::Disk(dir))
    }

    fn start_on(port: u16, storage: Storage) -> Azurite {
        or_panic(
            "Azurite",
            Azurite::launch(&azurite_bin(), port, storage, &Options::default(), |_| {}),
        )
    }

    pub fn connection_string(&self) -> String {
        connection_string(self.port)
    }

    /// A storage client with no retries: a test sees every fault.
    pub fn store(&self) -> BlobStore {
        self.store_with(RetryPolicy { max_retries: 0 })
    }

    pub fn store_with(&self, retry: RetryPolicy) -> BlobStore {
        BlobStore::from_connection_string(&self.connection_string(), retry)
            .expect("Azurite's connection string")
    }
}

/// The emulator's capacity model (issue 15): its enqueued-token quota per deployment, its
/// processing rate per deployment and how it refuses a batch over the quota. `None` leaves
/// the emulator's default (a 200M quota; no rate, so `--lines-per-step` paces batches).
#[derive(Debug, Clone, Copy, Default)]
pub struct Capacity {
    /// `--enqueued-token-limit N`.
    pub enqueued_token_limit: Option<u64>,
    /// `--tokens-per-second N`.
    pub tokens_per_second: Option<u64>,
    /// `--quota-refusal failed-batch` (the batch fails at validation) instead of a 400.
    pub failed_batch_refusal: bool,
}

impl Capacity {
    /// The emulator arguments that say it.
    pub fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(n) = self.enqueued_token_limit {
            args.extend(["--enqueued-token-limit".to_string(), n.to_string()]);
        }
        if let Some(n) = self.tokens_per_second {
            args.extend(["--tokens-per-second".to_string(), n.to_string()]);
        }
        if self.failed_batch_refusal {
            args.extend(["--quota-refusal".to_string(), "failed-batch".to_string()]);
        }
        args
    }
}

/// A create's answer as it came, headers included (the handler's client keeps only the
/// batch): what a test of the emulator's quota headers looks at.
#[derive(Debug, Clone)]
pub struct CreateAnswer {
    pub status: u16,
    /// `deployment-enqueued-tokens`.
    pub enqueued_tokens: Option<u64>,
    /// `deployment-maximum-enqueued-tokens`.
    pub maximum_enqueued_tokens: Option<u64>,
    pub body: Value,
}

pub struct Emulator {
    pub proc: Proc,
    pub port: u16,
    /// Started with `--step-ms 0`: batches move only when stepped.
    pub manual: bool,
    http: reqwest::Client,
}

impl Emulator {
    /// Starts the emulator `bin` on a free port against the storage account of
    /// `connection_string`; `adjust` adds its arguments (`--deployment`, `--step-ms`, …) and
    /// environment.
    pub fn launch(
        bin: &Path,
        connection_string: &str,
        options: &Options,
        adjust: impl FnOnce(&mut Command),
    ) -> Result<Emulator, Error> {
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0", "--storage-connection-string"])
            .arg(connection_string);
        adjust(&mut cmd);
        let args: Vec<&OsStr> = cmd.get_args().collect();
        let manual = args.contains(&OsStr::new("--step-ms=0"))
            || args.windows(2).any(|w| w[0] == "--step-ms" && w[1] == "0");
        let (proc, port) = listening("the batch emulator", cmd, options, "listening on http://")?;
        Ok(Emulator {
            proc,
            port,
            manual,
            http: reqwest::Client::new(),
        })
    }

    /// The emulator against `azurite`, deployment [`DEPLOYMENT`], with `extra` arguments.
    pub fn start(azurite: &Azurite, extra: &[&str]) -> Emulator {
        or_panic(
            "the batch emulator",
            Emulator::launch(
                &Bins::local().emulator,
                &azurite.connection_string(),
                &Options::default(),
                |cmd| {
                    cmd.args(["--deployment", DEPLOYMENT]).args(extra);
                },
            ),
        )
    }

    /// The emulator against `azurite` with the capacity model `capacity`, deployment
    /// [`DEPLOYMENT`], and `extra` arguments.
    pub fn start_with_capacity(azurite: &Azurite, capacity: Capacity, extra: &[&str]) -> Emulator {
        let mut args = capacity.args();
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Emulator::start(azurite, &args)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a `/chat/completions` batch of `input_blob` into `output_folder_url` through
    /// the `/openai/v1/` API and returns the answer as it came, with its quota headers.
    pub async fn create_raw(&self, input_blob: &str, output_folder_url: &str) -> CreateAnswer {
        let resp = self
            .http
            .post(format!("{}/openai/v1/batches", self.endpoint()))
            .header("api-key", API_KEY)
            .json(&serde_json::json!({
                "input_file_id": null,
                "endpoint": "/chat/completions",
                "completion_window": "24h",
                "input_blob": input_blob,
                "output_folder": {"url": output_folder_url},
            }))
            .send()
            .await
            .unwrap_or_else(|e| panic!("the emulator's create: {e}"));
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
        };
        let (enqueued_tokens, maximum_enqueued_tokens) = (
            header("deployment-enqueued-tokens"),
            header("deployment-maximum-enqueued-tokens"),
        );
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or_default();
        CreateAnswer {
            status,
            enqueued_tokens,
            maximum_enqueued_tokens,
            body,
        }
    }

    /// A client of the emulator's `/openai/v1/` API.
    pub fn client(&self) -> BatchClient {
        BatchClient::new(
            url::Url::parse(&self.endpoint()).expect("a URL"),
            ApiStyle::V1,
            Auth::ApiKey(Secret::new(API_KEY)),
            RetryConfig::default(),
        )
    }

    /// Manual mode: `steps` lifecycle steps of batch `id`, or of every batch active now (one
    /// step each per round), through the emulator's test control `POST /_emulator/step`.
    /// Returns once they are done, with those batches as they are then.
    ///
    /// # Panics
    /// When the emulator refuses (not in manual mode, no such batch).
    pub async fn step(&self, id: Option<&str>, steps: u32) -> Vec<Batch> {
        let mut query = vec![("steps", steps.to_string())];
        query.extend(id.map(|id| ("id", id.to_string())));
        let mut page = self.control("step", &query).await;
        serde_json::from_value(page["data"].take()).expect("a list of batches")
    }

    /// Manual mode: one step of batch `id` taken as if its completion window ended now
    /// (`POST /_emulator/expire`): it becomes `expired` with the answers it has (a batch
    /// already `finalizing` completes). Returns the batch after the step.
    pub async fn expire(&self, id: &str) -> Batch {
        let batch = self.control("expire", &[("id", id.to_string())]).await;
        serde_json::from_value(batch).expect("a batch")
    }

    /// One step of every active batch in manual mode; nothing otherwise. For loops that wait
    /// on the handler while the batches run their course. Returns how many batches it
    /// stepped: while there are some, such a loop need not sleep between rounds.
    pub async fn advance(&self) -> usize {
        if self.manual {
            self.step(None, 1).await.len()
        } else {
            0
        }
    }

    /// From now on every API call gets (`on`) or no longer gets the gateway's 404 `Resource
    /// not found`, as Azure answers a retired api-version (`POST /_emulator/gateway-404`).
    pub async fn set_gateway_404(&self, on: bool) {
        self.control("gateway-404", &[("on", on.to_string())]).await;
    }

    /// The API calls the emulator has answered so far, by operation (`GET /_emulator/calls`):
    /// `{"create", "list", "retrieve", "cancel"}`.
    pub async fn calls(&self) -> Value {
        let url = format!("{}/_emulator/calls", self.endpoint());
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("the emulator's call counts: {e}"));
        assert!(resp.status().is_success(), "{}", resp.status());
        resp.json().await.expect("call counts as JSON")
    }

    async fn control(&self, what: &str, query: &[(&str, String)]) -> Value {
        let mut url =
            url::Url::parse(&format!("{}/_emulator/{what}", self.endpoint())).expect("a URL");
        url.query_pairs_mut().extend_pairs(query);
        let resp = self
            .http
            .post(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("the emulator's {what} control: {e}"));
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "the emulator refused {what} {query:?}: {status} {body}"
        );
        body
    }

    /// Every batch the emulator holds, newest first.
    pub async fn batches(&self) -> Vec<Batch> {
        let client = self.client();
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = client
                .list_page(after.as_deref(), 100)
                .await
                .expect("the emulator lists its batches");
            all.extend(page.data.iter().cloned());
            if !page.has_more || page.data.is_empty() {
                return all;
            }
            after = page.data.last().map(|b| b.id.clone());
        }
    }
}

pub struct Handler {
    pub proc: Proc,
    pub port: u16,
    /// The settings it was started with (besides its port).
    pub env: Vec<(String, String)>,
    /// From starting the process to its first `GET /` answered 200.
    pub ready_in: Duration,
    http: reqwest::Client,
}

impl Handler {
    /// Starts `bin` with only `env` (and `PATH`) as its environment, on a free port, as the
    /// host does, and waits until it logs that it listens and answers `GET /`. The port must
    /// be chosen before the handler binds it, and another process can take it in between:
    /// then the start is retried on a fresh port.
    pub fn launch(
        bin: &Path,
        env: &[(String, String)],
        options: &Options,
    ) -> Result<Handler, Error> {
        let mut last = None;
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(bin);
            cmd.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
                .envs(env.iter().map(|(k, v)| (k, v)));
            let started = Instant::now();
            let mut proc = Proc::spawn("the handler", cmd, options)?;
            match proc.wait_ready(
                HANDLER_READY,
                Some(port),
                Duration::from_micros(250),
                Duration::from_secs(60),
            ) {
                Ok(_) => {
                    return Ok(Handler {
                        proc,
                        port,
                        env: env.to_vec(),
                        ready_in: started.elapsed(),
                        http: reqwest::Client::new(),
                    });
                }
                Err(e) if e.output().contains("Address already in use") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(format!(
            "the handler found no free port in 5 tries; last: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// The workspace's handler ([`Bins::local`]) with `env`.
    pub fn start(env: Vec<(String, String)>) -> Handler {
        or_panic(
            "the handler",
            Handler::launch(&Bins::local().handler, &env, &Options::default()),
        )
    }

    /// The Contract's settings pointing at this stack: the emulator as the Azure OpenAI
    /// endpoint (with [`API_KEY`]) and Azurite as the storage.
    pub fn settings(azurite: &Azurite, emulator: &Emulator) -> Vec<(String, String)> {
        vec![
            ("AZURE_OPENAI_ENDPOINT".into(), emulator.endpoint()),
            ("AZURE_OPENAI_API_KEY".into(), API_KEY.into()),
            (
                "BATCH_STORAGE_CONNECTION_STRING".into(),
                azurite.connection_string(),
            ),
        ]
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// POSTs a host payload to a function route with the host's headers.
    pub async fn post(
        &self,
        function: &str,
        payload: &Value,
    ) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(self.url(&format!("/{function}")))
            .header(
                "X-Azure-Functions-InvocationId",
                uuid::Uuid::new_v4().to_string(),
            )
            .header("User-Agent", "Azure-Functions-Host/4.1040.0")
            .json(payload)
            .send()
            .await
    }
}

/// The handler under `local-host`, the stand-in for the Functions host (tools/local-host),
/// with the repository as its app root: events for new input blobs and timer ticks reach
/// the handler the way the host delivers them, not as a test's direct POSTs.
pub struct LocalHost {
    pub proc: Proc,
}

impl LocalHost {
    /// Starts local-host with only `env` (and `PATH`) as its environment, which it passes on
    /// to the handler as app settings, plus `args`; waits until the handler is ready.
    pub fn start(env: &[(String, String)], args: &[&str]) -> LocalHost {
        let mut cmd = Command::new(local_host_bin());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("--app-root")
            .arg(root())
            .arg("--handler")
            .arg(&Bins::local().handler)
            .args(args);
        let mut proc = or_panic(
            "local-host",
            Proc::spawn("local-host", cmd, &Options::default()),
        );
        if let Err(e) = proc.wait_for_line("handler ready", Duration::from_secs(60)) {
            panic!("local-host did not start the handler: {e}");
        }
        LocalHost { proc }
    }

    /// Everything local-host and the handler printed so far.
    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}
