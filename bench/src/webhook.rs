//! Webhook latency (issue 17, "Must show"): from the moment a batch ends to its
//! `summary.json`, through the service's `batch.completed` webhook, in the local stack:
//! local-host playing the Functions host (function-webhook forwarded as host.json says, the
//! timer at its 5-minute default), the release handler, Azurite, and a batch emulator whose
//! batches move only when stepped, so the end is a known instant. Without the webhook the
//! wait would be up to a whole timer period (5 minutes).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aoai_stack::{API_KEY, Options, Output, Proc, connection_string, free_port};
use serde_json::{Value, json};

use crate::{
    Config, Stack,
    report::{Report, list, median, secs, verdict},
    stack,
};

const GROUP: &str = "7 webhook";
const GOAL_SECS: f64 = 5.0;

pub async fn run(cfg: &Config, stack: &Stack, rep: &mut Report) -> Result<()> {
    let Some(local_host) = &cfg.local_host else {
        rep.note("webhook latency: not measured (no --local-host given)");
        return Ok(());
    };
    eprintln!("\n== webhook: batch end -> summary.json through function-webhook (local-host)");
    let emulator = stack::start_emulator(
        &cfg.bins.emulator,
        stack.azurite.port,
        0,
        cfg.work.join("emulator-webhook.log"),
    )?;
    let http_port = free_port();
    let url = format!("http://127.0.0.1:{http_port}/api/function-webhook");
    let created: Value = reqwest::Client::new()
        .post(format!(
            "{}/openai/v1/dashboard/webhook_endpoints",
            emulator.endpoint()
        ))
        .header("api-key", API_KEY)
        .json(&json!({"name": "bench", "url": url, "event_types": ["batch.completed"]}))
        .send()
        .await?
        .json()
        .await?;
    let secret = created["signing_secret"]
        .as_str()
        .context("no signing_secret in the registration's answer")?;

    let (input, output, state) = ("wh-input", "wh-output", "wh-jobs");
    let log = cfg.work.join("local-host-webhook.log");
    let mut cmd = Command::new(local_host);
    cmd.arg("--app-root")
        .arg(crate::repo_root())
        .arg("--handler")
        .arg(&cfg.bins.handler)
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .args([
            "--input-container",
            input,
            "--poll-ms",
            "200",
            "--skip-existing",
        ])
        .env("AZURE_OPENAI_ENDPOINT", emulator.endpoint())
        .env("AZURE_OPENAI_API_KEY", API_KEY)
        .env(
            "BATCH_STORAGE_CONNECTION_STRING",
            connection_string(stack.azurite.port),
        )
        .env("BATCH_INPUT_CONTAINER", input)
        .env("BATCH_OUTPUT_CONTAINER", output)
        .env("BATCH_STATE_CONTAINER", state)
        .env("AZURE_OPENAI_WEBHOOK_SECRET", secret)
        .env("BATCH_TIMER_SCHEDULE", "0 */5 * * * *");
    let mut host = Proc::spawn(
        "local-host",
        cmd,
        &Options {
            output: Output::File(log.clone()),
            die_with_parent: true,
        },
    )?;
    host.wait_for_line("httpTrigger at", Duration::from_secs(60))?;

    let runs = cfg.runs.max(5);
    let mut latencies = Vec::new();
    let started = Instant::now();
    for i in 0..runs {
        let name = format!("latency-{i}.jsonl");
        stack
            .store
            .write(
                input,
                &name,
                crate::generate::small_input(&format!("l{i}"), 3).into(),
                aoai_blob_batch::storage::WriteCondition::Always,
                "application/jsonl",
            )
            .await?;
        // local-host's BlobCreated event submits it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let batch = loop {
            let found = emulator
                .batches()
                .await
                .into_iter()
                .find(|b| b.input_blob.as_deref().is_some_and(|u| u.ends_with(&name)));
            if let Some(b) = found {
                break b;
            }
            if Instant::now() > deadline {
                bail!("no batch for {name} within 30 s; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
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
        let ended = ended.context("the batch did not end in 20 steps")?;
        let summary = format!("{}/summary.json", name.trim_end_matches(".jsonl"));
        loop {
            if stack.store.properties(output, &summary).await?.is_some() {
                break;
            }
            if ended.elapsed() > Duration::from_secs(60) {
                bail!(
                    "no {summary} a minute after its batch ended; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        latencies.push(ended.elapsed().as_secs_f64());
    }
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let ticks = logs.matches("timer → function-timer").count();
    let m = median(&latencies);
    rep.row(
        GROUP,
        "batch end -> summary.json via webhook (timer at 5 min)",
        "<= 5 s",
        secs(m),
        format!("{:.0}x under the goal", GOAL_SECS / m),
        verdict(m <= GOAL_SECS),
        format!(
            "median of {runs} runs (3-line batches, local-host forwarding function-webhook to the handler): {}; timer ticks during the {:.0} s of runs: {ticks}",
            list(&latencies, secs),
            started.elapsed().as_secs_f64()
        ),
    );
    Ok(())
}
