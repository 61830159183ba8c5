//! The services a measurement runs against: Azurite (in memory), the batch emulator, and
//! fresh `handler` processes, each on a free loopback port; plus the host's payloads.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aoai_blob_batch::{
    config::{ApiStyle, Secret},
    openai::{Auth, BatchClient, RetryConfig},
    storage::{BlobStore, RetryPolicy, WriteCondition},
};
use serde_json::{Value, json};

use crate::procs::{Service, free_port, wait_ready};

/// Azurite's documented development account key (public, not a secret).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
pub const API_KEY: &str = "bench-api-key";
/// The handler's default API style (`AZURE_OPENAI_API_VERSION` unset).
pub const API_VERSION: &str = "2025-04-01-preview";

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub handler: PathBuf,
    pub emulator: PathBuf,
    pub azurite: PathBuf,
}

pub fn connection_string(blob_port: u16) -> String {
    format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:{blob_port}/devstoreaccount1;"
    )
}

pub fn store(blob_port: u16) -> Result<BlobStore> {
    Ok(BlobStore::from_connection_string(
        &connection_string(blob_port),
        RetryPolicy { max_retries: 2 },
    )?)
}

fn port_after_last_colon(line: &str) -> Result<u16> {
    let tail = line.rsplit(':').next().unwrap_or_default();
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .with_context(|| format!("no port in {line:?}"))
}

pub struct Azurite {
    pub svc: Service,
    pub port: u16,
}

impl Azurite {
    pub fn start(bin: &Path, dir: &Path) -> Result<Azurite> {
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
        ])
        .current_dir(dir);
        let mut svc = Service::spawn("Azurite", cmd, dir.join("azurite.log"))?;
        let line = svc.wait_for_line("successfully listens on", Duration::from_secs(60))?;
        let port = port_after_last_colon(line.trim_end_matches('/'))?;
        Ok(Azurite { svc, port })
    }
}

pub struct Emulator {
    pub svc: Service,
    pub port: u16,
}

impl Emulator {
    pub fn start(bin: &Path, blob_port: u16, step_ms: u64, log: PathBuf) -> Result<Emulator> {
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0", "--storage-connection-string"])
            .arg(connection_string(blob_port))
            .args(["--deployment", crate::generate::MODEL])
            .args(["--step-ms", &step_ms.to_string()])
            .env("RUST_LOG", "warn");
        let mut svc = Service::spawn("the batch emulator", cmd, log)?;
        let line = svc.wait_for_line("listening on http://", Duration::from_secs(60))?;
        let port = port_after_last_colon(&line)?;
        Ok(Emulator { svc, port })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A batch client like the handler's (classic API style, API key).
pub fn batch_client(endpoint: &str) -> Result<BatchClient> {
    Ok(BatchClient::new(
        url::Url::parse(endpoint)?,
        ApiStyle::Classic {
            api_version: API_VERSION.into(),
        },
        Auth::ApiKey(Secret::new(API_KEY)),
        RetryConfig::default(),
    ))
}

/// One set of containers, so that each measurement's handler sees only its own jobs.
#[derive(Debug, Clone)]
pub struct Containers {
    pub input: String,
    pub output: String,
    pub state: String,
}

impl Containers {
    pub fn named(prefix: &str) -> Containers {
        Containers {
            input: format!("{prefix}-in"),
            output: format!("{prefix}-out"),
            state: format!("{prefix}-jobs"),
        }
    }

    pub async fn create(&self, store: &BlobStore) -> Result<()> {
        for c in [&self.input, &self.output, &self.state] {
            store.ensure_container(c).await?;
        }
        Ok(())
    }
}

/// A fresh handler process.
pub struct Handler {
    pub svc: Service,
    pub port: u16,
    pub started_in: Duration,
    http: reqwest::Client,
}

impl Handler {
    /// Starts `bin` serving on a free port with the Contract's settings pointing at
    /// `openai_endpoint` and the storage at `blob_port`, using `containers`.
    pub fn start(
        bin: &Path,
        openai_endpoint: &str,
        blob_port: u16,
        containers: &Containers,
        log: PathBuf,
    ) -> Result<Handler> {
        Handler::start_with(bin, openai_endpoint, blob_port, containers, log, &[])
    }

    /// [`Handler::start`] with more settings (`extra`, e.g. the split limits).
    pub fn start_with(
        bin: &Path,
        openai_endpoint: &str,
        blob_port: u16,
        containers: &Containers,
        log: PathBuf,
        extra: &[(&str, String)],
    ) -> Result<Handler> {
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("AZURE_OPENAI_ENDPOINT", openai_endpoint)
            .env("AZURE_OPENAI_API_KEY", API_KEY)
            .env(
                "BATCH_STORAGE_CONNECTION_STRING",
                connection_string(blob_port),
            )
            .env("BATCH_INPUT_CONTAINER", &containers.input)
            .env("BATCH_OUTPUT_CONTAINER", &containers.output)
            .env("BATCH_STATE_CONTAINER", &containers.state)
            .envs(extra.iter().map(|(k, v)| (k, v)));
        let t0 = Instant::now();
        let mut svc = Service::spawn("the handler", cmd, log)?;
        let started_in = wait_ready(port, t0, &mut svc, Duration::from_secs(30))?;
        Ok(Handler {
            svc,
            port,
            started_in,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(1800))
                .build()?,
        })
    }

    /// POSTs a host payload; returns the status, the `Logs` lines and the seconds it took.
    pub async fn invoke(&self, function: &str, payload: &Value) -> Result<(u16, Vec<String>, f64)> {
        let t0 = Instant::now();
        let resp = self
            .http
            .post(format!("http://127.0.0.1:{}/{function}", self.port))
            .header(
                "X-Azure-Functions-InvocationId",
                uuid::Uuid::new_v4().to_string(),
            )
            .header("User-Agent", "Azure-Functions-Host/4.1040.0")
            .json(payload)
            .send()
            .await?;
        let status = resp.status().as_u16();
        let body: Value = resp.json().await?;
        let secs = t0.elapsed().as_secs_f64();
        let logs = body["Logs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok((status, logs, secs))
    }

    pub async fn event(&self, url: &str, etag: &str, size: u64) -> Result<(u16, Vec<String>, f64)> {
        self.invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(url, etag, size)),
        )
        .await
    }

    pub async fn tick(&self) -> Result<(u16, Vec<String>, f64)> {
        self.invoke("function-timer", &timer_payload()).await
    }
}

/// The documented BlobCreated event (Event Grid schema).
pub fn blob_created_event(url: &str, etag: &str, size: u64) -> Value {
    let path = url::Url::parse(url)
        .map(|u| u.path().to_string())
        .unwrap_or_default();
    let mut parts = path.trim_start_matches('/').splitn(3, '/').skip(1);
    let container = parts.next().unwrap_or_default().to_string();
    let name = parts.next().unwrap_or_default().to_string();
    json!({
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/devstoreaccount1",
        "subject": format!("/blobServices/default/containers/{container}/blobs/{name}"),
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

/// Streams a local file into a blob in 4 MiB blocks; returns (ETag, bytes).
pub async fn upload_file(
    store: &BlobStore,
    container: &str,
    name: &str,
    path: &Path,
) -> Result<(String, u64)> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut writer = store.writer(container, name, "application/jsonl");
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        writer.write(&buf[..n]).await?;
    }
    let bytes = writer.bytes_written();
    Ok((writer.finish().await?, bytes))
}

pub async fn put_small(
    store: &BlobStore,
    container: &str,
    name: &str,
    body: Vec<u8>,
) -> Result<()> {
    store
        .write(
            container,
            name,
            bytes::Bytes::from(body),
            WriteCondition::Always,
            "application/jsonl",
        )
        .await?;
    Ok(())
}

/// The batch id a `function-trigger` answer names (`… batch=batch_…: created …`).
pub fn batch_id_in(logs: &[String]) -> Option<String> {
    logs.iter().find_map(|l| {
        let at = l.find("batch=batch_")? + "batch=".len();
        let id: String = l[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
            .collect();
        Some(id)
    })
}

/// Waits until the emulator says the batch ended; returns its status.
pub async fn wait_batch_end(client: &BatchClient, id: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let b = client.retrieve(id).await?;
        if b.status.is_terminal() {
            return Ok(b.status.to_string());
        }
        if Instant::now() > deadline {
            bail!("batch {id} still {} after {timeout:?}", b.status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
