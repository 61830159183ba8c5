//! The services a measurement runs against: Azurite (in memory), the batch emulator, and
//! fresh `handler` processes, each on a free loopback port, started by `aoai-stack` as the
//! integration tests start them; their output goes to log files in the work directory, and
//! they die with the driver.

use std::{
    ops::Deref,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use aoai_blob_batch::{
    config::{ApiStyle, Secret},
    openai::{Auth, BatchClient, RetryConfig},
    storage::{BlobStore, RetryPolicy, WriteCondition},
};
pub use aoai_stack::{API_KEY, Azurite, Bins, Emulator, connection_string};
use aoai_stack::{Options, Output, Storage, blob_created_event, timer_payload, trigger_payload};
use serde_json::Value;

/// The handler's default API style (`AZURE_OPENAI_API_VERSION` unset).
pub const API_VERSION: &str = "2025-04-01-preview";

pub fn store(blob_port: u16) -> Result<BlobStore> {
    Ok(BlobStore::from_connection_string(
        &connection_string(blob_port),
        RetryPolicy { max_retries: 2 },
    )?)
}

/// How the driver starts a service: output to `log`, killed if the driver dies.
fn logged(log: PathBuf) -> Options {
    Options {
        output: Output::File(log),
        die_with_parent: true,
    }
}

/// Azurite in memory, its log in `dir`.
pub fn start_azurite(bin: &Path, dir: &Path) -> Result<Azurite> {
    let options = logged(dir.join("azurite.log"));
    Ok(Azurite::launch(bin, 0, Storage::Memory, &options, |cmd| {
        cmd.current_dir(dir);
    })?)
}

/// The emulator against the storage at `blob_port`, one lifecycle step per `step_ms`.
pub fn start_emulator(bin: &Path, blob_port: u16, step_ms: u64, log: PathBuf) -> Result<Emulator> {
    let conn = connection_string(blob_port);
    Ok(Emulator::launch(bin, &conn, &logged(log), |cmd| {
        cmd.args(["--deployment", crate::generate::MODEL])
            .args(["--step-ms", &step_ms.to_string()])
            .env("RUST_LOG", "warn");
    })?)
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

/// A fresh handler process, with the calls a measurement makes.
pub struct Handler(aoai_stack::Handler);

impl Deref for Handler {
    type Target = aoai_stack::Handler;
    fn deref(&self) -> &aoai_stack::Handler {
        &self.0
    }
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
        let mut env: Vec<(String, String)> = vec![
            ("AZURE_OPENAI_ENDPOINT".into(), openai_endpoint.into()),
            ("AZURE_OPENAI_API_KEY".into(), API_KEY.into()),
            (
                "BATCH_STORAGE_CONNECTION_STRING".into(),
                connection_string(blob_port),
            ),
            ("BATCH_INPUT_CONTAINER".into(), containers.input.clone()),
            ("BATCH_OUTPUT_CONTAINER".into(), containers.output.clone()),
            ("BATCH_STATE_CONTAINER".into(), containers.state.clone()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        Ok(Handler(aoai_stack::Handler::launch(
            bin,
            &env,
            &logged(log),
        )?))
    }

    /// POSTs a host payload; returns the status, the `Logs` lines and the seconds it took.
    pub async fn invoke(&self, function: &str, payload: &Value) -> Result<(u16, Vec<String>, f64)> {
        let t0 = Instant::now();
        let resp = self.post(function, payload).await?;
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
