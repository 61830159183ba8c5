//! Fidelity to the real services where our local stack is more forgiving than Azure (issue 14).
//!
//! - Hierarchical-namespace (ADLS Gen2) accounts: their events name the blob on the account's
//!   `dfs` endpoint, and announce a file twice, `CreateFile` (empty) then `FlushWithClose`; a
//!   `CopyBlob` event may come while the copy still runs.
//! - API versions: a dated version whose Batch create takes no `input_blob` works against the
//!   emulator and never on Azure, so start-up refuses it.
//! - Ids in paths: sent as the service wrote them, not with unreserved characters encoded (a
//!   server or proxy that does not normalise would not find the batch).
//!
//! Azurite serves one endpoint on an IP address, so a host-style account
//! (`devstoreaccount1.blob.core.windows.net`) is reached through [`Proxy`], a recording HTTP
//! proxy the handler and the emulator are given as `HTTP_PROXY`: it forwards the account's
//! requests to Azurite and answers anything else 502, after writing down every request, so a
//! test sees which hosts and blobs the handler touched. In front of the emulator, as the Azure
//! OpenAI endpoint, it shows the paths exactly as the handler sent them.

mod support;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use aoai_blob_batch::storage::BlobStore;
use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use support::*;

/// The account as Azure names it; the proxy forwards its blob endpoint to Azurite.
const ACCOUNT: &str = "devstoreaccount1";
const BLOB_HOST: &str = "devstoreaccount1.blob.core.windows.net";
const DFS_HOST: &str = "devstoreaccount1.dfs.core.windows.net";

/// One request the proxy saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    /// The host the request was for (the absolute-form target's, or `Host`).
    host: String,
    /// The path and query exactly as sent, percent-encoding included.
    target: String,
}

struct ProxyState {
    /// Host (as requested) → the base URL its requests go to.
    hosts: HashMap<String, String>,
    /// Where origin-form requests (`GET /path`, the proxy used as an endpoint) go.
    upstream: Option<String>,
    /// Blob paths (`/container/name`) whose properties say a copy into them is pending.
    copy_pending: Mutex<HashSet<String>>,
    seen: Mutex<Vec<Seen>>,
    http: reqwest::Client,
}

/// A recording HTTP/1.1 proxy, forward (absolute-form requests, as `HTTP_PROXY` clients send
/// them) and reverse (origin-form requests go to `upstream`). Stops when dropped.
struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    async fn start(hosts: &[(&str, String)], upstream: Option<String>) -> Proxy {
        let state = Arc::new(ProxyState {
            hosts: hosts
                .iter()
                .map(|(h, base)| (h.to_string(), base.clone()))
                .collect(),
            upstream,
            copy_pending: Mutex::default(),
            seen: Mutex::default(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .fallback(relay)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Proxy { port, state, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// From now on, the properties of `/container/name` say a copy into it is pending.
    fn set_copy_pending(&self, path: &str, pending: bool) {
        let mut set = self.state.copy_pending.lock().unwrap();
        if pending {
            set.insert(path.to_string());
        } else {
            set.remove(path);
        }
    }
}

async fn relay(State(p): State<Arc<ProxyState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let host = parts
        .uri
        .host()
        .map(str::to_string)
        .or_else(|| {
            parts
                .headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(|h| h.split(':').next().unwrap_or_default().to_string())
        })
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |pq| pq.as_str().to_string());
    p.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        host: host.clone(),
        target: target.clone(),
    });
    let base = if parts.uri.scheme().is_some() {
        p.hosts.get(&host)
    } else {
        p.upstream.as_ref()
    };
    let Some(base) = base else {
        return (StatusCode::BAD_GATEWAY, "not a host of this test").into_response();
    };
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let mut out = p
        .http
        .request(parts.method.clone(), format!("{base}{target}"));
    for (name, value) in &parts.headers {
        if !matches!(
            name.as_str(),
            "host" | "connection" | "proxy-connection" | "content-length" | "transfer-encoding"
        ) {
            out = out.header(name, value);
        }
    }
    let answer = match out.body(body).send().await {
        Ok(a) => a,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !matches!(name.as_str(), "connection" | "transfer-encoding") {
            response = response.header(name, value);
        }
    }
    let path = target.split('?').next().unwrap_or_default();
    if parts.method == Method::HEAD && p.copy_pending.lock().unwrap().contains(path) {
        // What Get Blob Properties says of a blob whose Copy Blob has not finished
        // (https://learn.microsoft.com/rest/api/storageservices/get-blob-properties).
        response = response
            .header("x-ms-copy-status", HeaderValue::from_static("pending"))
            .header(
                "x-ms-copy-id",
                HeaderValue::from_static("c0b1e3a4-0000-0000-0000-000000000001"),
            );
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    response.body(Body::from(bytes)).unwrap()
}

/// The account's connection string with its Azure blob endpoint (reached through the proxy).
fn host_style_connection_string() -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint=http://{BLOB_HOST}"
    )
}

/// Azurite, the proxy standing in for the account's Azure endpoints, and the emulator and the
/// handler reaching storage through it.
struct AzureLike {
    /// A client of Azurite's own endpoint, for the test's uploads.
    store: BlobStore,
    _azurite: Azurite,
    proxy: Proxy,
    emulator: Emulator,
    handler: Handler,
}

impl AzureLike {
    async fn start() -> AzureLike {
        let azurite = Azurite::start();
        let proxy = Proxy::start(
            &[(
                BLOB_HOST,
                format!("http://127.0.0.1:{}/{ACCOUNT}", azurite.port),
            )],
            None,
        )
        .await;
        let cs = host_style_connection_string();
        let via_proxy = |cmd: &mut std::process::Command| {
            for name in [
                "http_proxy",
                "https_proxy",
                "all_proxy",
                "ALL_PROXY",
                "no_proxy",
            ] {
                cmd.env_remove(name);
            }
            cmd.env("HTTP_PROXY", proxy.url())
                .env("NO_PROXY", "127.0.0.1");
        };
        let emulator = Emulator::launch(&Bins::local().emulator, &cs, &Options::default(), |cmd| {
            cmd.args(["--deployment", DEPLOYMENT, "--step-ms", "60000"]);
            via_proxy(cmd);
        })
        .unwrap_or_else(|e| panic!("the emulator did not start: {e}"));
        let mut env = handler_env(&azurite, &emulator);
        for (k, v) in env.iter_mut() {
            if k == "BATCH_STORAGE_CONNECTION_STRING" {
                *v = cs.clone();
            }
        }
        // The emulator's endpoint is on 127.0.0.1: reached directly.
        env.push(("HTTP_PROXY".into(), proxy.url()));
        env.push(("NO_PROXY".into(), "127.0.0.1".into()));
        let handler = Handler::start(env);
        AzureLike {
            store: azurite.store(),
            _azurite: azurite,
            proxy,
            emulator,
            handler,
        }
    }

    /// Delivers `event` as the host would; the invocation must be answered 200. Returns its
    /// log lines, joined.
    async fn deliver(&self, event: Value) -> String {
        let (status, answer) = self
            .handler
            .invoke("function-trigger", &trigger_payload(event))
            .await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        answer.logs.join("\n")
    }

    /// Requests anyone made for `batch-input/{name}`.
    fn requests_for(&self, name: &str) -> Vec<Seen> {
        let path = format!("/batch-input/{name}");
        self.proxy
            .seen()
            .into_iter()
            .filter(|s| s.target.split('?').next() == Some(path.as_str()))
            .collect()
    }
}

/// A `Microsoft.Storage.BlobCreated` event of a hierarchical-namespace account in the Event
/// Grid schema, field for field as the docs show it ("Data Lake Storage Gen 2 events",
/// https://learn.microsoft.com/azure/event-grid/event-schema-blob-storage): `api` is
/// `CreateFile` or `FlushWithClose`, `contentOffset` is there, `dataVersion` is `2`, and `url`
/// is on the account's `dfs` endpoint.
fn adls_event(api: &str, url: &str, etag: &str, length: u64) -> Value {
    let mut event = blob_created_event(url, etag, length);
    event["data"]["api"] = json!(api);
    event["data"]["contentOffset"] = json!(0);
    event["dataVersion"] = json!("2");
    event
}

fn body(lines: &[&str]) -> Vec<u8> {
    lines
        .iter()
        .map(|id| chat_line(id, "q") + "\n")
        .collect::<String>()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adls_file_is_submitted_on_flush_with_close_not_on_create_file() {
    let s = AzureLike::start().await;
    let name = "adls/new-file.jsonl";
    let dfs_url = format!("http://{DFS_HOST}/batch-input/{name}");

    // Path - Create makes the file, empty: `CreateFile`, contentLength 0.
    let (_, empty_etag) = upload_input(&s.store, name, b"").await;
    let logs = s
        .deliver(adls_event("CreateFile", &dfs_url, &empty_etag, 0))
        .await;
    assert!(
        logs.contains("ignored") && logs.contains("CreateFile"),
        "CreateFile is not the finished file: {logs}"
    );
    assert!(
        s.requests_for(name).is_empty(),
        "{:?}",
        s.requests_for(name)
    );

    // Append and Flush(close=true) write the content: `FlushWithClose`.
    let content = body(&["a", "b", "c"]);
    let (_, etag) = upload_input(&s.store, name, &content).await;
    let length = content.len() as u64;
    let logs = s
        .deliver(adls_event("FlushWithClose", &dfs_url, &etag, length))
        .await;
    let batches = s.emulator.batches().await;
    assert_eq!(batches.len(), 1, "one batch: {batches:?}\nlogs: {logs}");
    // The service is given the blob endpoint's URL, the one its identity reads.
    assert_eq!(
        batches[0].input_blob.as_deref(),
        Some(format!("http://{BLOB_HOST}/batch-input/{name}").as_str())
    );
    assert!(
        read_json(&s.store, "batch-output", "adls/new-file/summary.json")
            .await
            .is_none(),
        "the empty file of CreateFile was never judged"
    );
    println!(
        "FIGURE adls: CreateFile (contentLength 0) on {DFS_HOST} -> ignored, 0 requests for \
         the file; FlushWithClose -> 1 batch reading http://{BLOB_HOST}/batch-input/{name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dfs_url_of_another_account_makes_no_request() {
    let s = AzureLike::start().await;
    let content = body(&["a"]);
    // The same name exists in our account: acting on any of these events would read it.
    let (_, etag) = upload_input(&s.store, "x.jsonl", &content).await;
    let length = content.len() as u64;
    let urls = [
        "http://otheraccount.dfs.core.windows.net/batch-input/x.jsonl",
        "http://otheraccount.blob.core.windows.net/batch-input/x.jsonl",
        // Our account's name under another suffix, or as a label of another host.
        "http://devstoreaccount1.dfs.core.windows.net.evil.example/batch-input/x.jsonl",
        "http://devstoreaccount1.dfs.evil.example/batch-input/x.jsonl",
        "http://evil.example/devstoreaccount1.dfs.core.windows.net/batch-input/x.jsonl",
        // Another service of our account.
        "http://devstoreaccount1.queue.core.windows.net/batch-input/x.jsonl",
        // https where the account is configured on http.
        "https://devstoreaccount1.dfs.core.windows.net/batch-input/x.jsonl",
    ];
    for url in urls {
        let logs = s
            .deliver(adls_event("FlushWithClose", url, &etag, length))
            .await;
        assert!(logs.contains("ignored"), "{url}: {logs}");
    }
    let elsewhere: Vec<Seen> = s
        .proxy
        .seen()
        .into_iter()
        .filter(|r| r.host != BLOB_HOST)
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests to other hosts: {elsewhere:?}"
    );
    let reads = s.requests_for("x.jsonl");
    assert!(reads.is_empty(), "{reads:?}");
    assert!(s.emulator.batches().await.is_empty());
    println!(
        "FIGURE adls-foreign: {} events naming x.jsonl on other accounts or hosts -> 0 requests \
         to them, 0 requests for the blob, 0 batches",
        urls.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_whose_copy_is_pending_waits_for_the_sweep() {
    let s = AzureLike::start().await;
    let name = "copied.jsonl";
    let path = format!("/batch-input/{name}");
    let content = body(&["a", "b"]);
    let (_, etag) = upload_input(&s.store, name, &content).await;
    s.proxy.set_copy_pending(&path, true);
    let url = format!("http://{BLOB_HOST}{path}");
    let mut event = blob_created_event(&url, &etag, content.len() as u64);
    event["data"]["api"] = json!("CopyBlob");
    let logs = s.deliver(event).await;
    assert!(
        logs.contains("copy") && logs.contains("pending"),
        "one line says why: {logs}"
    );
    let reads: Vec<Seen> = s
        .requests_for(name)
        .into_iter()
        .filter(|r| r.method != "HEAD")
        .collect();
    assert!(reads.is_empty(), "not read while the copy runs: {reads:?}");
    assert!(s.emulator.batches().await.is_empty(), "{logs}");

    // The copy finishes; the timer's sweep takes the file in.
    s.proxy.set_copy_pending(&path, false);
    let (status, answer) = s.handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let batches = s.emulator.batches().await;
    assert_eq!(batches.len(), 1, "{batches:?}\n{:?}", answer.logs);
    println!(
        "FIGURE copy-pending: CopyBlob event while x-ms-copy-status is pending -> 0 reads, 0 \
         batches; next tick after the copy -> 1 batch"
    );
}

/// Runs the handler with only `env`; returns its exit code and stderr, or `None` when it is
/// still running (serving) after `wait`, in which case it is stopped.
fn start_up(env: &[(&str, &str)], wait: std::time::Duration) -> Option<(i32, String)> {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_handler"))
        .env_clear()
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
            return Some((status.code().unwrap_or(-1), stderr));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn an_api_version_without_blob_batches_stops_start_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let cs = format!(
        "AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:1/{ACCOUNT}"
    );
    // The latest GA version: it has Batch, but its create takes `input_file_id` only.
    let env = [
        ("AZURE_OPENAI_ENDPOINT", "http://127.0.0.1:1"),
        ("BATCH_STORAGE_CONNECTION_STRING", cs.as_str()),
        ("FUNCTIONS_CUSTOMHANDLER_PORT", port.as_str()),
        ("AZURE_OPENAI_API_VERSION", "2024-10-21"),
    ];
    let (code, stderr) = start_up(&env, std::time::Duration::from_secs(10))
        .expect("start-up accepted AZURE_OPENAI_API_VERSION=2024-10-21 and served");
    assert_ne!(code, 0);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    for needle in [
        "AZURE_OPENAI_API_VERSION",
        "2024-10-21",
        "2025-04-01-preview",
        "v1",
    ] {
        assert!(lines[0].contains(needle), "{needle}: {stderr}");
    }
    println!(
        "FIGURE api-version: 2024-10-21 -> exit {code}: {}",
        lines[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieve_names_the_batch_as_the_service_wrote_its_id() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    // The proxy as the Azure OpenAI endpoint: it forwards to the emulator what it was sent,
    // byte for byte, and writes it down.
    let proxy = Proxy::start(&[], Some(emulator.endpoint())).await;
    let mut env = handler_env(&azurite, &emulator);
    for (k, v) in env.iter_mut() {
        if k == "AZURE_OPENAI_ENDPOINT" {
            *v = proxy.url();
        }
    }
    let handler = Handler::start(env);
    let store = azurite.store();
    let content = body(&["a"]);
    let (url, etag) = upload_input(&store, "ids.jsonl", &content).await;
    let event = blob_created_event(&url, &etag, content.len() as u64);
    let (status, answer) = handler
        .invoke("function-trigger", &trigger_payload(event))
        .await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let id = emulator.batches().await[0].id.clone();
    // `batch_<uuid>`: `_` and `-`, both unreserved (RFC 3986 §2.3).
    assert!(id.contains('_') && id.contains('-'), "{id}");

    let (status, answer) = handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let retrieves: Vec<String> = proxy
        .seen()
        .into_iter()
        .filter(|r| r.method == "GET" && r.target.starts_with("/openai/batches/"))
        .map(|r| r.target)
        .collect();
    let expected = format!("/openai/batches/{id}?api-version=2025-04-01-preview");
    assert!(
        retrieves.contains(&expected),
        "retrieve sent {retrieves:?}, not {expected}"
    );
    println!("FIGURE ids: retrieve of {id} sent as GET {expected}");
}
