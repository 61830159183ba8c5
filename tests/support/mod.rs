//! The test stack: real Azurite, the real batch emulator and the real `handler` binary, each
//! a child process on a free loopback port, stopped when the test's handle drops. The
//! `aoai-stack` crate (tools/stack) starts them, as it does for the benchmarks; what the
//! tests check about them is here.
//!
//! The Functions host cannot run here, so tests play its part: they POST the host's
//! documented payloads to the handler, exactly as the host would.
#![allow(dead_code)]

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aoai_blob_batch::storage::BlobStore;
use aoai_blob_batch::{protocol::InvocationResponse, storage::WriteCondition};
// Not every test binary uses every name.
#[allow(unused_imports)]
pub use aoai_stack::{
    ACCOUNT_KEY, API_KEY, Azurite, Bins, DEPLOYMENT, Emulator, Handler, Options, Storage,
    blob_created_event, timer_payload, trigger_payload,
};
use serde_json::{Value, json};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Contract's settings pointing at this stack, and the tests' short timings: a 2 s
/// claim lease and a 1 s first quota backoff. The debug build's test hooks are on, so a
/// test can move the handler's clock ([`advance_clock`]).
pub fn handler_env(azurite: &Azurite, emulator: &Emulator) -> Vec<(String, String)> {
    let mut env = Handler::settings(azurite, emulator);
    env.push(("BATCH_SUBMIT_LEASE_SECONDS".into(), "2".into()));
    env.push(("BATCH_QUEUE_INITIAL_DELAY_SECONDS".into(), "1".into()));
    env.push(("BATCH_TEST_HOOKS".into(), "1".into()));
    env
}

/// Moves the handler's clock `secs` ahead, so that a lease or a create window lapses without
/// the test sleeping until it does. Returns the handler's new time (unix seconds).
pub async fn advance_clock(handler: &Handler, secs: i64) -> i64 {
    let resp = reqwest::Client::new()
        .post(handler.url(&format!("/_test/clock?advance={secs}")))
        .send()
        .await
        .expect("the handler answers");
    assert_eq!(resp.status(), 200, "the handler's test hooks are on");
    let body: Value = resp.json().await.expect("JSON");
    body["now"].as_i64().expect("the new time")
}

/// Azurite over HTTPS with OAuth (`--oauth basic`): the production code path, bearer
/// tokens, works against it. The self-signed certificate goes into `dir`; the caller
/// trusts it (SSL_CERT_FILE) before any TLS client is built.
pub fn azurite_https_oauth(dir: &std::path::Path) -> (Azurite, PathBuf) {
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
    let azurite = Azurite::launch(
        &aoai_stack::azurite_bin(),
        0,
        Storage::Memory,
        &Options::default(),
        |cmd| {
            cmd.args(["--oauth", "basic", "--cert"])
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                // Azurite checks a copy source's SAS by calling itself over HTTPS.
                .env("NODE_EXTRA_CA_CERTS", &cert);
        },
    )
    .unwrap_or_else(|e| panic!("Azurite (HTTPS, OAuth) did not start: {e}"));
    (azurite, cert)
}

/// The host's calls, with what the Contract promises about every answer checked.
#[allow(async_fn_in_trait)]
pub trait Host {
    /// POSTs a host payload to a function route; returns the status and the parsed answer.
    async fn invoke(&self, function: &str, payload: &Value) -> (u16, InvocationResponse);

    async fn tick(&self) -> (u16, InvocationResponse) {
        self.invoke("function-timer", &timer_payload()).await
    }
}

impl Host for Handler {
    async fn invoke(&self, function: &str, payload: &Value) -> (u16, InvocationResponse) {
        let resp = self.post(function, payload).await.expect("handler answers");
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
}

/// Azurite, the emulator (with `emulator_args`) and a handler pointed at both (with
/// `extra_env` added to [`handler_env`]).
pub struct Stack {
    pub azurite: Azurite,
    pub emulator: Emulator,
    pub handler: Handler,
}

impl Stack {
    pub fn start(emulator_args: &[&str], extra_env: &[(&str, &str)]) -> Stack {
        let azurite = Azurite::start();
        let emulator = Emulator::start(&azurite, emulator_args);
        let mut env = handler_env(&azurite, &emulator);
        env.extend(
            extra_env
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

    /// Ticks until `batch-output/{path}/summary.json` appears; returns it. An emulator in
    /// manual mode (`--step-ms 0`) gets one step of every active batch before each tick.
    pub async fn harvest(&self, path: &str, timeout: Duration) -> Value {
        let store = self.azurite.store();
        let name = format!("{path}/summary.json");
        let deadline = Instant::now() + timeout;
        loop {
            let stepped = self.emulator.advance().await;
            let (status, answer) = self.handler.tick().await;
            assert_eq!(status, 200, "{:?}", answer.logs);
            if let Some(summary) = read_json(&store, "batch-output", &name).await {
                return summary;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {name}");
            // Stepped batches make the next round worth taking at once.
            if stepped == 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What the trigger did with an uploaded input: the blob's ETag and the invocation's logs.
pub struct Submitted {
    pub etag: String,
    pub logs: Vec<String>,
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

/// Emulator tokens of one request of [`quota_file`]: the documented rule, a quarter of the
/// prompt's characters ("user" and 396 characters of content: 100) plus `max_tokens` (100).
pub const REQUEST_TOKENS: u64 = 200;

/// `n` requests of [`REQUEST_TOKENS`] each, for the capacity tests; `tag` makes the content
/// (and so the file) unique.
pub fn quota_file(tag: &str, n: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..n {
        let content = format!("{tag}-{i:03} ").repeat(400);
        let content = &content[..396];
        out.push_str(
            &serde_json::json!({
                "custom_id": format!("{tag}-{i}"), "method": "POST", "url": "/chat/completions",
                "body": {"model": DEPLOYMENT, "max_tokens": 100,
                         "messages": [{"role": "user", "content": content}]}
            })
            .to_string(),
        );
        out.push('\n');
    }
    out.into_bytes()
}

/// `n` chat lines of the seed's format, ids `{prefix}-{i}`, questions `{question} {i}`.
pub fn chat_lines(n: usize, prefix: &str, question: &str) -> Vec<u8> {
    (0..n)
        .map(|i| chat_line(&format!("{prefix}-{i}"), &format!("{question} {i}")) + "\n")
        .collect::<String>()
        .into_bytes()
}

/// The input blob names (the last path segment) of the emulator's batches, sorted.
pub async fn inputs_of(emulator: &Emulator) -> Vec<String> {
    let mut names: Vec<String> = emulator
        .batches()
        .await
        .into_iter()
        .filter_map(|b| b.input_blob)
        .map(|u| u.rsplit('/').next().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// The emulator's batch for input blob `name` (the blob's name, `.jsonl` included).
pub async fn batch_for(emulator: &Emulator, name: &str) -> aoai_blob_batch::openai::Batch {
    let suffix = format!("/{name}");
    emulator
        .batches()
        .await
        .into_iter()
        .find(|b| {
            b.input_blob
                .as_deref()
                .is_some_and(|u| u.ends_with(&suffix))
        })
        .unwrap_or_else(|| panic!("a batch for {name}"))
}
