//! Fleet (issue 15, "Must show"): a backlog of files whose tokens are five times one
//! deployment's enqueued-token quota, run by the handler as deployed (local-host playing the
//! Functions host: BlobCreated events from the input container, the timer, function-webhook
//! forwarded from the emulator's `batch.completed`/`batch.failed` webhooks) against batch
//! emulators with a quota (`--enqueued-token-limit`) and a processing rate
//! (`--tokens-per-second`). The makespan, from the first upload to the last `summary.json`,
//! is set against the ideal: total tokens / processing rate.
//!
//! Time is scaled down by [`SCALE`]: one second here is a minute of the real service. The
//! timer's 5 minutes become 5 s, a lifecycle step (`validating`, `finalizing`) a minute, and
//! the old handler's first quota wait of 5 minutes (then 10, 20, …) 5 s (then 10, 20, …).
//!
//! (a) one target, (b) two targets (two emulators, a comma-separated `AZURE_OPENAI_ENDPOINT`),
//! (c) one target under the old blind backoff: the handler built from the commit before
//! admission (d2137b0, passed as `--blind-backoff-handler`), which learnt of the quota only by
//! being refused and waited, so the gain is a measured ratio of the same backlog.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aoai_stack::{API_KEY, Emulator, Options, Output, Proc, connection_string, free_port};
use serde_json::{Value, json};

use crate::{
    Config, Stack,
    generate::{MODEL, Rng},
    report::{Report, verdict},
};

const GROUP: &str = "8 fleet";
/// Real seconds per bench second.
pub const SCALE: u64 = 60;
/// The timer's default period (5 minutes), scaled.
const TIMER_MS: u64 = 300_000 / SCALE;
/// One lifecycle step of the emulator: a minute of the service, scaled.
const STEP_MS: u64 = 60_000 / SCALE;
/// The first wait after a refusal for quota (`BATCH_QUEUE_INITIAL_DELAY_SECONDS`, 5 minutes),
/// scaled: the old handler's only way to wait for room, the new one's for a refusal its model
/// did not predict.
const OLD_FIRST_WAIT_SECS: u64 = 300 / SCALE;
const FILES: usize = 20;
/// Requests per file, each [`REQUEST_TOKENS`] by the emulator's estimate.
const REQUESTS: usize = 25;
/// Characters of a request's user message; with the role ("user") 400, a quarter of which is
/// the emulator's prompt estimate.
const CONTENT_CHARS: usize = 396;
const MAX_TOKENS: u64 = 100;
const REQUEST_TOKENS: u64 = (4 + CONTENT_CHARS as u64).div_ceil(4) + MAX_TOKENS;
const FILE_TOKENS: u64 = REQUESTS as u64 * REQUEST_TOKENS;
const TOTAL_TOKENS: u64 = FILES as u64 * FILE_TOKENS;
/// One deployment's quota: the backlog is five of it.
const QUOTA: u64 = TOTAL_TOKENS / 5;

const GOAL_ONE: f64 = 1.15;
const GOAL_TWO: f64 = 0.6;
const GOAL_RSS: u64 = 64 << 20;

/// What one backlog run measured.
struct Outcome {
    makespan: f64,
    /// Creates the emulators answered with 400 `token_limit_exceeded`, and batches they
    /// failed (any reason).
    refusals: u64,
    failed_batches: u64,
    peak_rss: u64,
    ticks: usize,
}

pub async fn run(cfg: &Config, stack: &Stack, wave_secs: u64, rep: &mut Report) -> Result<()> {
    let Some(local_host) = &cfg.local_host else {
        rep.note("fleet: not measured (no --local-host given)");
        return Ok(());
    };
    // The rate at which one deployment works through one quota in `wave_secs`.
    let rate = QUOTA.div_ceil(wave_secs.max(1));
    let ideal = TOTAL_TOKENS as f64 / rate as f64;
    eprintln!(
        "\n== fleet: {FILES} files, {TOTAL_TOKENS} tokens = 5 x a {QUOTA}-token quota, {rate} tokens/s, ideal {ideal:.0} s (1 s = {SCALE} s of the service)"
    );
    let files: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| (format!("f{i:02}.jsonl"), file(i as u64)))
        .collect();
    for (_, body) in &files {
        debug_assert_eq!(emulator_tokens(body), FILE_TOKENS);
    }
    let setup = format!(
        "{FILES} files of {REQUESTS} requests, {TOTAL_TOKENS} emulator tokens = 5 x a {QUOTA}-token quota per deployment, \
         {rate} tokens/s per deployment; emulator step {STEP_MS} ms, timer every {TIMER_MS} ms (1 s here = {SCALE} s of the service)"
    );

    let mut runs = Vec::new();
    for (label, targets) in [("a", 1), ("b", 2)] {
        let handler = cfg.bins.handler.as_path();
        runs.push(
            backlog(
                cfg, stack, local_host, label, handler, targets, rate, &files,
            )
            .await?,
        );
    }
    let one = &runs[0];
    let two = &runs[1];
    rep.row(
        GROUP,
        "(a) backlog of 5 quotas, one target: makespan vs ideal (total tokens / rate)",
        "<= 1.15x ideal",
        format!("{:.1} s vs {ideal:.1} s", one.makespan),
        format!("{:.2}x", one.makespan / ideal),
        verdict(one.makespan / ideal <= GOAL_ONE),
        format!("{setup}; timer ticks: {}", one.ticks),
    );
    rep.row(
        GROUP,
        "(a) refusals (400 token_limit_exceeded) and failed batches",
        "0",
        format!("{} refused, {} failed", one.refusals, one.failed_batches),
        String::new(),
        verdict(one.refusals == 0 && one.failed_batches == 0),
        "the limit is learnt from the first create's deployment-maximum-enqueued-tokens header; BATCH_ENQUEUED_TOKEN_LIMIT unset".into(),
    );
    rep.row(
        GROUP,
        "(b) the same backlog over two targets: makespan vs (a)",
        "<= 0.6x (a)",
        format!("{:.1} s vs {:.1} s", two.makespan, one.makespan),
        format!("{:.2}x", two.makespan / one.makespan),
        verdict(two.makespan / one.makespan <= GOAL_TWO),
        format!(
            "two emulators, comma-separated AZURE_OPENAI_ENDPOINT; {:.2}x its own ideal ({:.1} s); {} refused, {} failed; timer ticks: {}",
            two.makespan / (ideal / 2.0),
            ideal / 2.0,
            two.refusals,
            two.failed_batches,
            two.ticks
        ),
    );
    let mut peak = one.peak_rss.max(two.peak_rss);
    match &cfg.blind_backoff_handler {
        None => rep.note(
            "fleet (c), the old blind backoff: not measured (no --blind-backoff-handler given)",
        ),
        Some(old) => {
            let c = backlog(cfg, stack, local_host, "c", old, 1, rate, &files).await?;
            rep.info(
                GROUP,
                "(c) the same backlog, one target, the old blind backoff (handler of d2137b0): makespan vs (a)",
                format!("{:.1} s ({:.2}x ideal)", c.makespan, c.makespan / ideal),
                format!(
                    "{:.2}x the makespan of (a); {} refused creates, {} failed batches; first wait {OLD_FIRST_WAIT_SECS} s doubling (the old 6 h cap is not scaled; it is not reached here); timer ticks: {}",
                    c.makespan / one.makespan,
                    c.refusals,
                    c.failed_batches,
                    c.ticks
                ),
            );
            peak = peak.max(c.peak_rss);
        }
    }
    rep.row(
        GROUP,
        "peak RSS of the handler over a backlog run (a, b)",
        "<= 64 MB",
        crate::report::mb(peak as f64),
        format!("{:.2} of goal", peak as f64 / GOAL_RSS as f64),
        verdict(peak <= GOAL_RSS),
        format!(
            "VmHWM of the handler local-host started: (a) {}, (b) {}",
            crate::report::mb(one.peak_rss as f64),
            crate::report::mb(two.peak_rss as f64)
        ),
    );
    Ok(())
}

/// One run of the backlog: fresh emulators and a fresh local-host with `handler`; uploads
/// every file at once and waits for every `summary.json`.
#[allow(clippy::too_many_arguments)]
async fn backlog(
    cfg: &Config,
    stack: &Stack,
    local_host: &Path,
    label: &str,
    handler: &Path,
    targets: usize,
    rate: u64,
    files: &[(String, Vec<u8>)],
) -> Result<Outcome> {
    eprintln!(
        "  ({label}) {} target(s), handler {}",
        targets,
        handler.display()
    );
    let conn = connection_string(stack.azurite.port);
    let mut emulators = Vec::new();
    for t in 0..targets {
        let log = cfg.work.join(format!("emulator-fleet-{label}{t}.log"));
        emulators.push(Emulator::launch(
            &cfg.bins.emulator,
            &conn,
            &Options {
                output: Output::File(log),
                die_with_parent: true,
            },
            |cmd| {
                cmd.args(["--deployment", MODEL])
                    .args(["--step-ms", &STEP_MS.to_string()])
                    .args(["--enqueued-token-limit", &QUOTA.to_string()])
                    .args(["--tokens-per-second", &rate.to_string()])
                    .env("RUST_LOG", "warn");
            },
        )?);
    }
    let http_port = free_port();
    let webhook_url = format!("http://127.0.0.1:{http_port}/api/function-webhook");
    let mut secrets = Vec::new();
    for e in &emulators {
        let created: Value = reqwest::Client::new()
            .post(format!(
                "{}/openai/v1/dashboard/webhook_endpoints",
                e.endpoint()
            ))
            .header("api-key", API_KEY)
            .json(&json!({"name": "bench", "url": webhook_url,
                          "event_types": ["batch.completed", "batch.failed"]}))
            .send()
            .await?
            .json()
            .await?;
        secrets.push(
            created["signing_secret"]
                .as_str()
                .context("no signing_secret in the registration's answer")?
                .to_string(),
        );
    }
    let (input, output, state) = (
        format!("fleet-{label}-in"),
        format!("fleet-{label}-out"),
        format!("fleet-{label}-jobs"),
    );
    for c in [&input, &output, &state] {
        stack.store.ensure_container(c).await?;
    }
    let endpoints: Vec<String> = emulators.iter().map(Emulator::endpoint).collect();
    let log = cfg.work.join(format!("local-host-fleet-{label}.log"));
    let mut cmd = std::process::Command::new(local_host);
    cmd.arg("--app-root")
        .arg(crate::repo_root())
        .arg("--handler")
        .arg(handler)
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .args(["--input-container", &input, "--poll-ms", "200"])
        .args(["--timer-every-ms", &TIMER_MS.to_string()])
        // function.json names the setting; --timer-every-ms fires in its stead.
        .env("BATCH_TIMER_SCHEDULE", "0 */5 * * * *")
        .env("AZURE_OPENAI_ENDPOINT", endpoints.join(","))
        .env("AZURE_OPENAI_API_KEY", API_KEY)
        .env("BATCH_STORAGE_CONNECTION_STRING", &conn)
        .env("BATCH_INPUT_CONTAINER", &input)
        .env("BATCH_OUTPUT_CONTAINER", &output)
        .env("BATCH_STATE_CONTAINER", &state)
        .env("AZURE_OPENAI_WEBHOOK_SECRET", secrets.join(","))
        // A refusal the model did not predict still backs off, from 5 minutes: scaled too.
        .env(
            "BATCH_QUEUE_INITIAL_DELAY_SECONDS",
            OLD_FIRST_WAIT_SECS.to_string(),
        );
    let mut host = Proc::spawn(
        "local-host",
        cmd,
        &Options {
            output: Output::File(log.clone()),
            die_with_parent: true,
        },
    )?;
    host.wait_for_line("httpTrigger at", Duration::from_secs(60))?;
    let handler_pid = child_of(host.pid()).context("local-host started no handler")?;

    // The webhook registrations were POSTs too, which the emulator counts among creates.
    let mut creates_before = Vec::new();
    for e in &emulators {
        creates_before.push(e.calls().await["create"].as_u64().unwrap_or(0));
    }
    let started = Instant::now();
    for (name, body) in files {
        stack
            .store
            .write(
                &input,
                name,
                body.clone().into(),
                aoai_blob_batch::storage::WriteCondition::Always,
                "application/jsonl",
            )
            .await?;
    }
    // Old behaviour: up to 10 doublings of the first wait; a generous bound either way.
    let timeout = Duration::from_secs(3600);
    let mut pending: Vec<String> = files
        .iter()
        .map(|(n, _)| format!("{}/summary.json", n.trim_end_matches(".jsonl")))
        .collect();
    while !pending.is_empty() {
        let mut left = Vec::new();
        for s in pending {
            if stack.store.properties(&output, &s).await?.is_none() {
                left.push(s);
            }
        }
        pending = left;
        if started.elapsed() > timeout {
            bail!(
                "({label}) {} summaries missing after {timeout:?}; see {}",
                pending.len(),
                log.display()
            );
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let makespan = started.elapsed().as_secs_f64();
    let peak_rss = peak_rss_of(handler_pid)?;
    let mut refusals = 0;
    let mut failed_batches = 0;
    for (e, before) in emulators.iter().zip(creates_before) {
        let batches = e.batches().await;
        refusals += e.calls().await["create"].as_u64().unwrap_or(0) - before - batches.len() as u64;
        failed_batches += batches
            .iter()
            .filter(|b| b.status.to_string() == "failed")
            .count() as u64;
    }
    host.terminate(Duration::from_secs(10));
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let ticks = logs.matches("timer → function-timer").count();
    eprintln!(
        "  ({label}) makespan {makespan:.1} s, {refusals} refused, {failed_batches} failed, peak RSS {}",
        crate::report::mb(peak_rss as f64)
    );
    Ok(Outcome {
        makespan,
        refusals,
        failed_batches,
        peak_rss,
        ticks,
    })
}

/// The first child process of `pid` (local-host's handler).
fn child_of(pid: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return c.parse().ok();
        }
    }
    None
}

/// File `n` of the backlog: [`REQUESTS`] chat requests of English-like text, each
/// [`REQUEST_TOKENS`] by the emulator's estimate (a quarter of the prompt's characters, role
/// included, plus `max_tokens`); the handler estimates them with its own tokenizer.
fn file(n: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "quarterly",
        "report",
        "shows",
        "growth",
        "in",
        "every",
        "region",
        "and",
        "customers",
        "asked",
        "for",
        "faster",
        "delivery",
        "of",
        "their",
        "orders",
        "while",
        "costs",
        "rose",
        "slightly",
        "because",
        "shipping",
        "became",
        "more",
        "expensive",
        "summarize",
        "this",
        "note",
        "briefly",
        "please",
    ];
    let mut rng = Rng::new(1000 + n);
    let mut out = String::new();
    for i in 0..REQUESTS {
        let mut content = format!("Request {n}-{i}:");
        while content.len() < CONTENT_CHARS {
            content.push(' ');
            content.push_str(WORDS[rng.range(0, WORDS.len() - 1)]);
        }
        content.truncate(CONTENT_CHARS);
        out.push_str(
            &json!({
                "custom_id": format!("f{n}-{i}"), "method": "POST", "url": "/chat/completions",
                "body": {"model": MODEL, "max_tokens": MAX_TOKENS,
                         "messages": [{"role": "user", "content": content}]}
            })
            .to_string(),
        );
        out.push('\n');
    }
    out.into_bytes()
}

/// The emulator's estimate of a file (its rule, restated to check [`file`]).
fn emulator_tokens(body: &[u8]) -> u64 {
    fn chars(v: &Value) -> u64 {
        match v {
            Value::String(s) => s.chars().count() as u64,
            Value::Array(a) => a.iter().map(chars).sum(),
            Value::Object(m) => m.values().map(chars).sum(),
            _ => 0,
        }
    }
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l).expect("a generated line");
            chars(&v["body"]["messages"]).div_ceil(4) + v["body"]["max_tokens"].as_u64().unwrap()
        })
        .sum()
}

/// `VmHWM` (peak RSS) of process `pid`, bytes.
fn peak_rss_of(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))
}
