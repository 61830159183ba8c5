//! local-host serves function-webhook as the Functions host does, with the real handler, Azurite
//! and the batch emulator sending its signed events: forwarded as it came (the repository's
//! host.json), and in the invocation envelope (forwarding off). Either way a batch's end
//! reaches `summary.json` through the webhook while the timer is a year away.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use aoai_stack::{API_KEY, Azurite, Emulator, Options, Proc, free_port};
use serde_json::{Value, json};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The handler binary of this profile, built once (`cargo test -p local-host` builds only
/// local-host's own).
fn handler_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
            .args([
                "build",
                "--quiet",
                "-p",
                "aoai-blob-batch",
                "--bin",
                "handler",
            ])
            .current_dir(repo_root())
            .status()
            .unwrap();
        assert!(status.success(), "building the handler failed");
        PathBuf::from(env!("CARGO_BIN_EXE_local-host"))
            .parent()
            .unwrap()
            .join("handler")
    })
}

/// A copy of the repository's app root with host.json's forwarding set to `forward`.
fn app_root(forward: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut host: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("host.json")).unwrap())
            .unwrap();
    host["customHandler"]["enableForwardingHttpRequest"] = json!(forward);
    std::fs::write(dir.path().join("host.json"), host.to_string()).unwrap();
    for f in ["function-trigger", "function-timer", "function-webhook"] {
        std::fs::create_dir(dir.path().join(f)).unwrap();
        std::fs::copy(
            repo_root().join(f).join("function.json"),
            dir.path().join(f).join("function.json"),
        )
        .unwrap();
    }
    dir
}

async fn batch_end_reaches_summary_through_the_webhook(forward: bool) -> Duration {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "0"]);
    let http = reqwest::Client::new();
    let http_port = free_port();
    let url = format!("http://127.0.0.1:{http_port}/api/function-webhook?code=local");
    let created: Value = http
        .post(format!(
            "{}/openai/v1/dashboard/webhook_endpoints",
            emulator.endpoint()
        ))
        .header("api-key", API_KEY)
        .json(&json!({"name": "local", "url": url, "event_types": ["batch.completed"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["signing_secret"].as_str().unwrap();

    let app = app_root(forward);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_local-host"));
    cmd.arg("--app-root")
        .arg(app.path())
        .arg("--handler")
        .arg(handler_bin())
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .env("AZURE_OPENAI_ENDPOINT", emulator.endpoint())
        .env("AZURE_OPENAI_API_KEY", API_KEY)
        .env(
            "BATCH_STORAGE_CONNECTION_STRING",
            azurite.connection_string(),
        )
        .env("AZURE_OPENAI_WEBHOOK_SECRET", secret)
        // A year away: only the webhook can harvest.
        .env("BATCH_TIMER_SCHEDULE", "0 0 0 1 1 *");
    let mut host = Proc::spawn("local-host", cmd, &Options::default()).unwrap();
    host.wait_for_line("httpTrigger at", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));

    let store = azurite.store();
    let seed = std::fs::read(repo_root().join("samples/test.jsonl")).unwrap();
    store.ensure_container("batch-input").await.unwrap();
    store
        .write(
            "batch-input",
            "test.jsonl",
            seed.into(),
            aoai_blob_batch::storage::WriteCondition::Always,
            "application/jsonl",
        )
        .await
        .unwrap();
    // local-host delivers the BlobCreated event; the batch appears.
    let deadline = Instant::now() + Duration::from_secs(30);
    let batch = loop {
        if let Some(b) = emulator.batches().await.into_iter().next() {
            break b;
        }
        assert!(
            Instant::now() < deadline,
            "no batch; output:\n{}",
            host.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut ended = None;
    for _ in 0..20 {
        if emulator.step(Some(&batch.id), 1).await[0]
            .status
            .is_terminal()
        {
            ended = Some(Instant::now());
            break;
        }
    }
    let ended = ended.expect("the batch ended");
    loop {
        if let Some((body, _)) = store
            .read("batch-output", "test/summary.json")
            .await
            .unwrap()
        {
            let summary: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(summary["status"], "completed");
            assert_eq!(summary["batch_id"], batch.id.as_str());
            break;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(10),
            "no summary.json; output:\n{}",
            host.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let latency = ended.elapsed();
    let logs = host.logs();
    assert!(
        logs.contains(if forward {
            "forwarded as it came"
        } else {
            "in the invocation envelope"
        }),
        "{logs}"
    );
    assert!(!logs.contains(secret), "the secret was logged");
    latency
}

#[tokio::test]
async fn a_forwarded_webhook_harvests_the_batch() {
    let latency = batch_end_reaches_summary_through_the_webhook(true).await;
    eprintln!("forwarded: batch end -> summary.json in {latency:?}");
}

#[tokio::test]
async fn a_webhook_in_the_envelope_harvests_the_batch_too() {
    let latency = batch_end_reaches_summary_through_the_webhook(false).await;
    eprintln!("envelope: batch end -> summary.json in {latency:?}");
}
