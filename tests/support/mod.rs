//! The test stack: real Azurite, the real batch emulator and the real `handler` binary, each
//! a child process on a free loopback port, stopped when the test's handle drops.
//!
//! The Functions host cannot run here, so tests play its part: they POST the host's
//! documented payloads to the handler, exactly as the host would.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aoai_blob_batch::{
    config::ApiStyle,
    openai::{Auth, Batch, BatchClient, RetryConfig},
    protocol::InvocationResponse,
    storage::{BlobStore, RetryPolicy, WriteCondition},
};
use serde_json::{Value, json};

pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
pub const API_KEY: &str = "test-api-key-0123456789";
pub const DEPLOYMENT: &str = "REPLACE-WITH-MODEL-DEPLOYMENT-NAME";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A child process killed on drop, with its output kept for assertions.
pub struct Proc {
    child: Child,
    pub output: Arc<Mutex<Vec<String>>>,
    /// How many of the two output streams their reader threads have read to the end.
    streams_closed: Arc<AtomicUsize>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Starts `cmd`, collects its stdout and stderr lines, and waits until a line contains
    /// `ready_marker`; returns that line. Panics with the process's output when it exits or
    /// stays silent for a minute.
    fn spawn(cmd: Command, ready_marker: &str, what: &str) -> (Proc, String) {
        Proc::try_spawn(cmd, ready_marker)
            .unwrap_or_else(|output| panic!("{what} did not become ready; output:\n{output}"))
    }

    /// As `spawn`, but hands back the output of a process that never became ready, so a
    /// caller can retry (a port taken between choosing it and binding it).
    fn try_spawn(mut cmd: Command, ready_marker: &str) -> Result<(Proc, String), String> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let streams_closed = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            let tx = tx.clone();
            let streams_closed = streams_closed.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("TEST_SHOW_LOGS").is_some() {
                        eprintln!("[child] {line}");
                    }
                    output.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
                streams_closed.fetch_add(1, Ordering::SeqCst);
            });
        }
        // Only the reader threads hold senders now: when both streams close (the process
        // exited), `recv` fails at once instead of waiting out the deadline.
        drop(tx);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(ready_marker) => {
                    let proc = Proc {
                        child,
                        output,
                        streams_closed,
                    };
                    return Ok((proc, line));
                }
                Ok(_) => continue,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(output.lock().unwrap().join("\n"));
                }
            }
        }
    }

    pub fn logs(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM) and waits up to `timeout` for it to exit, so a
    /// service that persists to disk (Azurite with `--location`) can save its state first.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit by itself (a test fault point aborts it), then for its
    /// last output lines: they may still sit in the pipes when it has exited, and a test
    /// reads `logs()` next.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Bounded: a grandchild that inherited a pipe could keep it open.
                let drained = Instant::now() + Duration::from_secs(5);
                while self.streams_closed.load(Ordering::SeqCst) < 2 && Instant::now() < drained {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

fn port_from(line: &str) -> u16 {
    let after = line.rsplit(':').next().unwrap();
    after
        .trim()
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|_| panic!("no port in {line:?}"))
}

pub struct Azurite {
    pub proc: Proc,
    pub port: u16,
}

impl Azurite {
    pub fn start() -> Azurite {
        let bin = root().join("node_modules/.bin/azurite-blob");
        assert!(
            bin.exists(),
            "Azurite is not installed: run `npm ci` in {} (scripts/test does)",
            root().display()
        );
        let mut cmd = Command::new(bin);
        cmd.args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--loose",
        ]);
        let (proc, line) = Proc::spawn(cmd, "successfully listens on", "Azurite");
        Azurite {
            port: port_from(&line),
            proc,
        }
    }

    /// Azurite keeping its data on disk in `dir` (`--location`), on `port` (0: a free one).
    /// Stopped with `proc.terminate` and started again on the same port and directory, it
    /// comes back with every blob: a storage outage that loses nothing.
    pub fn start_persistent(dir: &std::path::Path, port: u16) -> Azurite {
        let mut cmd = Command::new(root().join("node_modules/.bin/azurite-blob"));
        cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir)
            .args(["--disableTelemetry", "--skipApiVersionCheck", "--loose"]);
        let (proc, line) = Proc::spawn(cmd, "successfully listens on", "Azurite (on disk)");
        Azurite {
            port: port_from(&line),
            proc,
        }
    }

    /// Azurite over HTTPS with OAuth (`--oauth basic`): the production code path, bearer
    /// tokens, works against it. The self-signed certificate goes into `dir`; the caller
    /// trusts it (SSL_CERT_FILE) before any TLS client is built.
    pub fn start_https_oauth(dir: &std::path::Path) -> (Azurite, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl makes the test certificate");
        assert!(status.success(), "openssl failed");
        let mut cmd = Command::new(root().join("node_modules/.bin/azurite-blob"));
        cmd.args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--inMemoryPersistence",
        ])
        .args([
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--loose",
            "--oauth",
            "basic",
        ])
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        // Azurite checks a copy source's SAS by calling itself over HTTPS.
        .env("NODE_EXTRA_CA_CERTS", &cert);
        let (proc, line) = Proc::spawn(cmd, "successfully listens on", "Azurite (HTTPS, OAuth)");
        (
            Azurite {
                port: port_from(&line),
                proc,
            },
            cert,
        )
    }

    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:{}/devstoreaccount1;",
            self.port
        )
    }

    pub fn store(&self) -> BlobStore {
        BlobStore::from_connection_string(&self.connection_string(), RetryPolicy { max_retries: 0 })
            .unwrap()
    }
}

fn emulator_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root().join("target"));
            let bin = target.join("debug/aoai-batch-emulator");
            // `cargo test` builds only this package's binaries; build the emulator too.
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "aoai-batch-emulator"])
                .current_dir(root())
                .status()
                .expect("cargo");
            assert!(status.success(), "building the emulator failed");
            bin
        })
        .clone()
}

pub struct Emulator {
    pub proc: Proc,
    pub port: u16,
}

impl Emulator {
    pub fn start(azurite: &Azurite, extra: &[&str]) -> Emulator {
        let mut cmd = Command::new(emulator_bin());
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--storage-connection-string",
            &azurite.connection_string(),
            "--deployment",
            DEPLOYMENT,
        ]);
        cmd.args(extra);
        let (proc, line) = Proc::spawn(cmd, "listening on", "the batch emulator");
        Emulator {
            port: port_from(&line),
            proc,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> BatchClient {
        BatchClient::new(
            url::Url::parse(&self.endpoint()).unwrap(),
            ApiStyle::V1,
            Auth::ApiKey(aoai_blob_batch::config::Secret::new(API_KEY)),
            RetryConfig::default(),
        )
    }

    /// Every batch the emulator holds, newest first.
    pub async fn batches(&self) -> Vec<Batch> {
        let client = self.client();
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = client.list_page(after.as_deref(), 100).await.unwrap();
            all.extend(page.data.iter().cloned());
            if !page.has_more || page.data.is_empty() {
                return all;
            }
            after = page.data.last().map(|b| b.id.clone());
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Handler {
    pub proc: Proc,
    pub port: u16,
    pub env: Vec<(String, String)>,
}

impl Handler {
    /// The environment the handler gets: the Contract's settings pointing at this stack.
    pub fn env(azurite: &Azurite, emulator: &Emulator) -> Vec<(String, String)> {
        [
            ("AZURE_OPENAI_ENDPOINT", emulator.endpoint()),
            ("AZURE_OPENAI_API_KEY", API_KEY.to_string()),
            (
                "BATCH_STORAGE_CONNECTION_STRING",
                azurite.connection_string(),
            ),
            ("BATCH_SUBMIT_LEASE_SECONDS", "2".to_string()),
            ("BATCH_QUEUE_INITIAL_DELAY_SECONDS", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Starts the handler on a free port. The host hands the handler its port, so the test
    /// must choose one before the handler binds it; another test process can take it in
    /// between, and then the start is retried on a fresh port.
    pub fn start(env: Vec<(String, String)>) -> Handler {
        let mut last_output = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_handler"));
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
                .envs(env.iter().map(|(k, v)| (k, v)));
            match Proc::try_spawn(cmd, "handler listening") {
                Ok((proc, _)) => return Handler { proc, port, env },
                Err(output) if output.contains("Address already in use") => last_output = output,
                Err(output) => panic!("the handler did not become ready; output:\n{output}"),
            }
        }
        panic!("the handler found no free port in 5 tries; last output:\n{last_output}")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// POSTs a host payload to a function route; returns the status and the parsed answer.
    pub async fn invoke(&self, function: &str, payload: &Value) -> (u16, InvocationResponse) {
        let resp = reqwest::Client::new()
            .post(self.url(&format!("/{function}")))
            .header(
                "X-Azure-Functions-InvocationId",
                uuid::Uuid::new_v4().to_string(),
            )
            .header("User-Agent", "Azure-Functions-Host/4.1040.0")
            .json(payload)
            .send()
            .await
            .expect("handler answers");
        let status = resp.status().as_u16();
        assert_eq!(
            resp.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "the host needs a JSON answer"
        );
        let body: InvocationResponse = resp.json().await.expect("the answer is the host's JSON");
        (status, body)
    }

    pub async fn tick(&self) -> (u16, InvocationResponse) {
        self.invoke("function-timer", &timer_payload()).await
    }
}

/// Azurite, the emulator (with `emulator_args`) and a handler pointed at both (with
/// `handler_env` added to the Contract's settings).
pub struct Stack {
    pub azurite: Azurite,
    pub emulator: Emulator,
    pub handler: Handler,
}

impl Stack {
    pub fn start(emulator_args: &[&str], handler_env: &[(&str, &str)]) -> Stack {
        let azurite = Azurite::start();
        let emulator = Emulator::start(&azurite, emulator_args);
        let mut env = Handler::env(&azurite, &emulator);
        env.extend(
            handler_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let handler = Handler::start(env);
        Stack {
            azurite,
            emulator,
            handler,
        }
    }

    /// Uploads `batch-input/{name}` and delivers its BlobCreated event, as the host would.
    pub async fn submit(&self, name: &str, body: &[u8]) -> Submitted {
        let (url, etag) = upload_input(&self.azurite.store(), name, body).await;
        let (status, answer) = self
            .handler
            .invoke(
                "function-trigger",
                &trigger_payload(blob_created_event(&url, &etag, body.len() as u64)),
            )
            .await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        Submitted {
            etag,
            logs: answer.logs,
        }
    }

    /// Ticks until `batch-output/{path}/summary.json` appears; returns it.
    pub async fn harvest(&self, path: &str, timeout: Duration) -> Value {
        let store = self.azurite.store();
        let summary = format!("{path}/summary.json");
        eventually(timeout, &summary, || async {
            let (status, answer) = self.handler.tick().await;
            assert_eq!(status, 200, "{:?}", answer.logs);
            read_json(&store, "batch-output", &summary).await
        })
        .await
    }
}

/// What the trigger did with an uploaded input: the blob's ETag and the invocation's logs.
pub struct Submitted {
    pub etag: String,
    pub logs: Vec<String>,
}

/// The documented BlobCreated event (Event Grid schema) for a blob in Azurite.
pub fn blob_created_event(url: &str, etag: &str, size: u64) -> Value {
    let name = url.rsplit("/batch-input/").next().unwrap_or_default();
    json!({
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/devstoreaccount1",
        "subject": format!("/blobServices/default/containers/batch-input/blobs/{name}"),
        "eventType": "Microsoft.Storage.BlobCreated",
        "eventTime": "2026-11-28T08:00:00.0000000Z",
        "id": uuid::Uuid::new_v4().to_string(),
        "data": {
            "api": "PutBlockList",
            "clientRequestId": uuid::Uuid::new_v4().to_string(),
            "requestId": uuid::Uuid::new_v4().to_string(),
            "eTag": etag,
            "contentType": "application/jsonl",
            "contentLength": size,
            "blobType": "BlockBlob",
            "url": url,
            "sequencer": "00000000000004420000000000028963",
            "storageDiagnostics": { "batchId": uuid::Uuid::new_v4().to_string() }
        },
        "dataVersion": "",
        "metadataVersion": "1"
    })
}

/// The host's invocation payload for the `function-trigger` function, binding `event`.
pub fn trigger_payload(event: Value) -> Value {
    json!({
        "Data": { "event": event.clone() },
        "Metadata": {
            "data": event["data"].clone(),
            "sys": { "MethodName": "function-trigger", "UtcNow": "2026-11-28T08:00:01.1234567Z", "RandGuid": uuid::Uuid::new_v4().to_string() }
        }
    })
}

pub fn timer_payload() -> Value {
    json!({
        "Data": { "timer": { "Schedule": { "AdjustForDST": true }, "ScheduleStatus": null, "IsPastDue": false } },
        "Metadata": { "sys": { "MethodName": "function-timer", "UtcNow": "2026-11-28T08:05:00.0000000Z", "RandGuid": uuid::Uuid::new_v4().to_string() } }
    })
}

/// Uploads an input into `batch-input`; returns (url, etag).
pub async fn upload_input(store: &BlobStore, name: &str, body: &[u8]) -> (String, String) {
    store.ensure_container("batch-input").await.unwrap();
    let etag = store
        .write(
            "batch-input",
            name,
            bytes::Bytes::copy_from_slice(body),
            WriteCondition::Always,
            "application/jsonl",
        )
        .await
        .unwrap();
    (store.blob_url("batch-input", name), etag)
}

/// Posts without expecting an answer: the handler may abort mid-invocation (a fault point).
pub async fn post_to_dying(handler: &Handler, path: &str, payload: &Value) {
    let _ = reqwest::Client::new()
        .post(handler.url(path))
        .timeout(Duration::from_secs(30))
        .json(payload)
        .send()
        .await;
}

/// The names of the blobs under `prefix`.
pub async fn blob_names(store: &BlobStore, container: &str, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    store
        .list(container, prefix)
        .map_ok(|b| b.name)
        .try_collect()
        .await
        .unwrap()
}

pub async fn read_json(store: &BlobStore, container: &str, name: &str) -> Option<Value> {
    store
        .read(container, name)
        .await
        .unwrap()
        .map(|(b, _)| serde_json::from_slice(&b).unwrap())
}

pub async fn read_text(store: &BlobStore, container: &str, name: &str) -> Option<String> {
    store
        .read(container, name)
        .await
        .unwrap()
        .map(|(b, _)| String::from_utf8(b.to_vec()).unwrap())
}

/// Polls `f` until it yields `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A chat request line in the seed's format.
pub fn chat_line(id: &str, question: &str) -> String {
    json!({
        "custom_id": id,
        "method": "POST",
        "url": "/chat/completions",
        "body": {
            "model": DEPLOYMENT,
            "messages": [
                {"role": "system", "content": "You are an AI assistant that helps people find information."},
                {"role": "user", "content": question}
            ]
        }
    })
    .to_string()
}
