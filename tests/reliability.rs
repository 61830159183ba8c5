//! Reliability, measured: the claims "one batch per file" and "nothing lost" under duplicate
//! deliveries, crashes at every step, a flaky control plane, a storage outage, a full quota
//! and an input overwritten mid-job. Real Azurite, the batch emulator and the real `handler`
//! binary; the test plays the Functions host (Event Grid redelivers on a non-2xx answer; the
//! timer ticks).
//!
//! Each scenario prints one `FIGURE` line with what it measured; `scripts/reliability` runs
//! them and RELIABILITY.md quotes the figures.

mod support;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use aoai_blob_batch::{
    app::FAULT_POINTS,
    openai::{Batch, BatchStatus},
    storage::BlobStore,
};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;
use support::*;

fn stack(emulator_args: &[&str], extra_env: &[(&str, &str)]) -> Stack {
    Stack::start(emulator_args, extra_env)
}

/// One input file: its blob, its version, and the ids of its lines in order.
#[derive(Clone, Debug)]
struct Input {
    name: String,
    url: String,
    etag: String,
    ids: Vec<String>,
    size: u64,
}

impl Input {
    /// `{path}` of the Contract: where its results land.
    fn path(&self) -> &str {
        self.name.strip_suffix(".jsonl").unwrap()
    }

    fn payload(&self) -> Value {
        trigger_payload(blob_created_event(&self.url, &self.etag, self.size))
    }
}

fn body_for(ids: &[String]) -> Vec<u8> {
    let mut out = String::new();
    for id in ids {
        out.push_str(&chat_line(id, &format!("what is {id}?")));
        out.push('\n');
    }
    out.into_bytes()
}

async fn upload(store: &BlobStore, name: &str, ids: Vec<String>) -> Input {
    let body = body_for(&ids);
    let (url, etag) = upload_input(store, name, &body).await;
    Input {
        name: name.to_string(),
        url,
        etag,
        ids,
        size: body.len() as u64,
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Delivers the input's BlobCreated event until the handler answers 2xx, as Event Grid does
/// (it redelivers on any other answer). Returns (deliveries, non-2xx answers).
async fn deliver_until_ok(handler: &Handler, input: &Input, max: usize) -> (usize, usize) {
    let payload = input.payload();
    for attempt in 1..=max {
        let (status, _) = handler.invoke("function-trigger", &payload).await;
        if (200..300).contains(&status) {
            return (attempt, attempt - 1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{}: no 2xx after {max} deliveries", input.name);
}

/// How many batches the service holds for each input blob URL.
async fn batches_per_input(emulator: &Emulator) -> HashMap<String, usize> {
    let mut per = HashMap::new();
    for b in emulator.batches().await {
        *per.entry(b.input_blob.unwrap_or_default()).or_insert(0) += 1;
    }
    per
}

/// The emulator's batches reading `url`, newest first.
async fn batches_for(emulator: &Emulator, url: &str) -> Vec<Batch> {
    let mut all = emulator.batches().await;
    all.retain(|b| b.input_blob.as_deref() == Some(url));
    all
}

async fn batch_for(emulator: &Emulator, url: &str) -> Option<Batch> {
    batches_for(emulator, url).await.into_iter().next()
}

/// Ticks until every input has `summary.json`; returns the number of ticks. An emulator in
/// manual mode gets one step of every active batch before each tick.
async fn tick_until_summaries(
    handler: &Handler,
    emulator: &Emulator,
    store: &BlobStore,
    inputs: &[Input],
    timeout: Duration,
) -> usize {
    let deadline = Instant::now() + timeout;
    let mut ticks = 0;
    loop {
        let stepped = emulator.advance().await;
        let (status, answer) = handler.tick().await;
        assert_eq!(
            status, 200,
            "the timer always answers 2xx: {:?}",
            answer.logs
        );
        ticks += 1;
        let mut missing = Vec::new();
        for i in inputs {
            let name = format!("{}/summary.json", i.path());
            if store
                .properties("batch-output", &name)
                .await
                .unwrap()
                .is_none()
            {
                missing.push(i.name.clone());
            }
        }
        if missing.is_empty() {
            return ticks;
        }
        assert!(
            Instant::now() < deadline,
            "after {ticks} ticks still no summary for {missing:?}; last tick: {:?}",
            answer.logs
        );
        // Stepped batches make the next round worth taking at once.
        if stepped == 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
}

impl Stack {
    async fn tick_until_summaries(&self, inputs: &[Input], timeout: Duration) -> usize {
        let store = self.azurite.store();
        tick_until_summaries(&self.handler, &self.emulator, &store, inputs, timeout).await
    }
}

/// What a user finds in `batch-output/{path}/` for one input.
#[derive(Debug, Default)]
struct Folder {
    status: String,
    batch_id: Option<String>,
    /// Input lines with no answer anywhere (neither in results.jsonl nor in errors.jsonl,
    /// or without a line in merged.jsonl carrying it).
    lost: usize,
    /// Input lines answered more than once across results.jsonl and errors.jsonl.
    doubled: usize,
    answered: usize,
    failed: usize,
}

fn ids_of(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            v["custom_id"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

/// Reads and checks an input's folder: summary, results, errors, merged (one line per input
/// line, in input order, each with its answer or error).
async fn folder(store: &BlobStore, input: &Input) -> Folder {
    let path = input.path();
    let summary = read_json(store, "batch-output", &format!("{path}/summary.json"))
        .await
        .unwrap_or_else(|| panic!("{path}: no summary.json"));
    let mut f = Folder {
        status: summary["status"].as_str().unwrap_or_default().to_string(),
        batch_id: summary["batch_id"].as_str().map(str::to_string),
        ..Default::default()
    };
    assert_eq!(
        summary["input_blob"].as_str(),
        Some(input.url.as_str()),
        "{path}: summary names its input"
    );
    let results = read_text(store, "batch-output", &format!("{path}/results.jsonl"))
        .await
        .unwrap_or_default();
    let errors = read_text(store, "batch-output", &format!("{path}/errors.jsonl"))
        .await
        .unwrap_or_default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in ids_of(&results).into_iter().chain(ids_of(&errors)) {
        *seen.entry(id).or_default() += 1;
    }
    let merged = read_text(store, "batch-output", &format!("{path}/merged.jsonl"))
        .await
        .unwrap_or_default();
    let merged: Vec<Value> = merged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (i, id) in input.ids.iter().enumerate() {
        let m = merged.get(i);
        let in_order = m.is_some_and(|m| m["custom_id"] == id.as_str() && m["line"] == i + 1);
        let carried = m.is_some_and(|m| !m["status_code"].is_null());
        match seen.get(id).copied().unwrap_or(0) {
            0 => f.lost += 1,
            1 if in_order && carried => {}
            1 => f.lost += 1,
            _ => f.doubled += 1,
        }
        if m.is_some_and(|m| m["status_code"] == 200) {
            f.answered += 1;
        } else {
            f.failed += 1;
        }
    }
    assert_eq!(
        merged.len(),
        input.ids.len(),
        "{path}: merged.jsonl has one line per input line"
    );
    assert_eq!(
        summary["request_counts"]["total"].as_u64(),
        Some(input.ids.len() as u64),
        "{path}: {summary}"
    );
    assert_eq!(
        summary["request_counts"]["completed"].as_u64(),
        Some(f.answered as u64),
        "{path}: the summary counts what merged.jsonl holds: {summary}"
    );
    f
}

/// Checks every input: completed, one batch each, the summary names that batch, nothing lost
/// or doubled. Returns (lines, lost).
async fn assert_all_complete(
    what: &str,
    store: &BlobStore,
    emulator: &Emulator,
    inputs: &[Input],
) -> (usize, usize) {
    let per = batches_per_input(emulator).await;
    let batches = emulator.batches().await;
    let (mut lines, mut lost) = (0, 0);
    for i in inputs {
        let f = folder(store, i).await;
        assert_eq!(f.status, "completed", "{what}: {}: {f:?}", i.name);
        assert_eq!(
            per.get(&i.url).copied(),
            Some(1),
            "{what}: {}: batches for this input",
            i.name
        );
        let batch = batches
            .iter()
            .find(|b| b.input_blob.as_deref() == Some(i.url.as_str()))
            .unwrap();
        assert_eq!(f.batch_id.as_deref(), Some(batch.id.as_str()), "{what}");
        assert_eq!(f.doubled, 0, "{what}: {}: {f:?}", i.name);
        lines += i.ids.len();
        lost += f.lost;
    }
    (lines, lost)
}

#[tokio::test]
async fn duplicates() {
    // With the tests' 2 s claim lease: under this load claims lapse while their holder still
    // validates or creates, so take-overs happen too (see also
    // `a_lapsed_lease_during_a_slow_create_still_makes_one_batch`).
    let s = stack(&["--step-ms", "50"], &[]);
    let store = s.azurite.store();
    let input = upload(&store, "dup/one.jsonl", ids("d", 5)).await;
    let payload = input.payload();
    let answers =
        futures::future::join_all((0..100).map(|_| s.handler.invoke("function-trigger", &payload)))
            .await;
    let ok = answers.iter().filter(|(st, _)| *st == 200).count();
    assert_eq!(
        ok, 100,
        "every delivery is answered 2xx (none needs a retry)"
    );
    let said = |what: &str| {
        answers
            .iter()
            .filter(|(_, a)| a.logs.iter().any(|l| l.contains(what)))
            .count()
    };
    let (submitted, took_over) = (said("submitted"), said("took over"));
    assert_eq!(submitted, 1, "one delivery created the batch");
    s.tick_until_summaries(std::slice::from_ref(&input), Duration::from_secs(30))
        .await;
    // Late redeliveries after the job finished change nothing either.
    for _ in 0..5 {
        let (status, _) = s.handler.invoke("function-trigger", &payload).await;
        assert_eq!(status, 200);
    }
    s.handler.tick().await;
    let (lines, lost) = assert_all_complete(
        "duplicates",
        &store,
        &s.emulator,
        std::slice::from_ref(&input),
    )
    .await;
    let batches = s.emulator.batches().await.len();
    assert_eq!(batches, 1);
    assert_eq!(lost, 0);
    println!(
        "FIGURE duplicates: 100 concurrent deliveries (+5 late) of one event, {took_over} \
         take-over(s) of a lapsed claim -> {batches} batch (expected 1), {lines} lines, {lost} lost"
    );
}

#[tokio::test]
async fn crash_at_every_fault_point() {
    let azurite = Azurite::start();
    // Some lines fail, so harvest also moves an errors.jsonl.
    let emulator = Emulator::start(
        &azurite,
        &[
            "--step-ms",
            "50",
            "--line-failure-rate",
            "0.25",
            "--seed",
            "11",
        ],
    );
    let store = azurite.store();
    let mut healthy_env = handler_env(&azurite, &emulator);
    // A claim whose create may have been in flight is held for the create timeout before
    // anyone looks for its batch: 5 s here instead of the default 120 s.
    healthy_env.push(("BATCH_CREATE_TIMEOUT_SECONDS".into(), "5".into()));
    // The quota is known and roomy: every crash point is reached at once, not after a crash
    // before a create (an answer that never comes) held up admission for the create timeout.
    healthy_env.push(("BATCH_ENQUEUED_TOKEN_LIMIT".into(), "200000000".into()));
    // The "fresh" handler: no fault; it submits for the harvest points, takes the redelivered
    // events and ticks after every crash.
    let healthy = Handler::start(healthy_env.clone());
    let started = Instant::now();
    let mut inputs = Vec::new();
    let mut crashes = 0;
    // 1. Crash at every point, twice. The healthy handler only submits (for the harvest
    //    points) and does not tick, so nothing is repaired before every crash has happened;
    //    later faulty handlers' ticks do meet the jobs earlier ones left behind.
    // The split points need an input beyond the batch limits: tests/split.rs crashes there.
    let points: Vec<&str> = FAULT_POINTS
        .iter()
        .copied()
        .filter(|p| !p.starts_with("split:"))
        .collect();
    for (p, point) in points.iter().enumerate() {
        for k in 0..2 {
            let name = format!("crash/{p:02}-{}-{k}.jsonl", point.replace(':', "-"));
            let input = upload(&store, &name, ids(&format!("c{p}k{k}"), 6)).await;
            let mut env = healthy_env.clone();
            env.push(("BATCH_TEST_FAULT".into(), point.to_string()));
            let mut faulty = if point.starts_with("submit:") {
                let faulty = Handler::start(env);
                post_to_dying(&faulty, "/function-trigger", &input.payload()).await;
                faulty
            } else {
                let (status, answer) = healthy.invoke("function-trigger", &input.payload()).await;
                assert_eq!(status, 200, "{:?}", answer.logs);
                eventually(Duration::from_secs(20), "batch end", || async {
                    batch_for(&emulator, &input.url)
                        .await
                        .filter(|b| b.status.is_terminal())
                })
                .await;
                let faulty = Handler::start(env);
                post_to_dying(&faulty, "/function-timer", &timer_payload()).await;
                faulty
            };
            let exit = faulty.proc.wait_exit(Duration::from_secs(20));
            assert!(
                exit.is_some_and(|s| !s.success()),
                "{point}: the handler did not abort there; logs:\n{}",
                faulty.proc.logs()
            );
            assert!(
                faulty.proc.logs().contains(&format!("step=\"{point}\"")),
                "{point}: {}",
                faulty.proc.logs()
            );
            crashes += 1;
            inputs.push(input);
        }
    }
    let crashed_in = started.elapsed();
    // 2. The host got no answers: Event Grid redelivers every event, and the timer ticks until
    //    every input has its summary.
    let recovery = Instant::now();
    for i in &inputs {
        let (status, answer) = healthy.invoke("function-trigger", &i.payload()).await;
        assert_eq!(status, 200, "{}: {:?}", i.name, answer.logs);
    }
    tick_until_summaries(
        &healthy,
        &emulator,
        &store,
        &inputs,
        Duration::from_secs(120),
    )
    .await;
    let recovered_in = recovery.elapsed();
    // One more round of redeliveries and a tick: nothing changes.
    for i in &inputs {
        let (status, _) = healthy.invoke("function-trigger", &i.payload()).await;
        assert_eq!(status, 200);
    }
    // A handler that died after writing a summary still holds its job until the 2 s lease
    // lapses; past it, this tick files the job under done/.
    advance_clock(&healthy, 3).await;
    healthy.tick().await;
    let (lines, lost) = assert_all_complete("crash", &store, &emulator, &inputs).await;
    let batches = emulator.batches().await.len();
    assert_eq!(batches, inputs.len());
    assert_eq!(lost, 0);
    let active: Vec<_> = store
        .list("batch-jobs", "active/")
        .try_collect()
        .await
        .unwrap();
    assert!(active.is_empty(), "every job filed under done/: {active:?}");
    println!(
        "FIGURE crash: {} fault points x 2 inputs = {} inputs, {crashes} aborts (in {} s) -> \
         {batches} batches (expected {}), {lines} lines, {lost} lost, every folder complete; \
         recovered by redelivery + ticks in {} s",
        points.len(),
        inputs.len(),
        crashed_in.as_secs(),
        inputs.len(),
        recovered_in.as_secs()
    );
}

#[tokio::test]
async fn storm() {
    let s = stack(
        &[
            "--step-ms",
            "50",
            "--http-429-rate",
            "0.3",
            "--http-500-rate",
            "0.1",
            "--seed",
            "5",
        ],
        &[],
    );
    let store = s.azurite.store();
    let started = Instant::now();
    let mut inputs = Vec::new();
    for i in 0..50 {
        inputs.push(
            upload(
                &store,
                &format!("storm/{i:02}.jsonl"),
                ids(&format!("s{i}"), 2 + i % 2),
            )
            .await,
        );
    }
    let delivered: Vec<(usize, usize)> = futures::stream::iter(inputs.iter())
        .map(|i| deliver_until_ok(&s.handler, i, 30))
        .buffer_unordered(8)
        .collect()
        .await;
    let deliveries: usize = delivered.iter().map(|d| d.0).sum();
    let answered_5xx: usize = delivered.iter().map(|d| d.1).sum();
    let ticks = s
        .tick_until_summaries(&inputs, Duration::from_secs(120))
        .await;
    let (lines, lost) = assert_all_complete("storm", &store, &s.emulator, &inputs).await;
    let batches = s.emulator.batches().await.len();
    assert_eq!(batches, 50);
    assert_eq!(lost, 0);
    let injected = s
        .emulator
        .proc
        .logs()
        .lines()
        .filter(|l| l.contains("injected 429") || l.contains("injected 500"))
        .count();
    assert!(injected > 20, "the storm happened: {injected} faults");
    println!(
        "FIGURE storm: 50 inputs, {injected} injected 429/500 answers (30%/10% of calls), \
         {deliveries} deliveries ({answered_5xx} answered 5xx and redelivered), {ticks} ticks -> \
         {batches} batches (expected 50), {lines} lines, {lost} lost ({} s)",
        started.elapsed().as_secs()
    );
}

#[tokio::test]
async fn storage_outage() {
    let dir = tempfile::tempdir().unwrap();
    let mut azurite = Azurite::start_persistent(dir.path(), 0);
    let port = azurite.port;
    // Manual steps: the batches are exactly half-way when storage goes.
    let emulator = Emulator::start(&azurite, &["--step-ms", "0", "--lines-per-step", "3"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let store = azurite.store();
    let mut inputs = Vec::new();
    for i in 0..5 {
        inputs.push(
            upload(
                &store,
                &format!("outage/{i}.jsonl"),
                ids(&format!("o{i}"), 15),
            )
            .await,
        );
    }
    for i in &inputs {
        let (_, failures) = deliver_until_ok(&handler, i, 3).await;
        assert_eq!(failures, 0);
    }
    // One file is uploaded now but its event arrives during the outage.
    let late = upload(&store, "outage/late.jsonl", ids("late", 4)).await;
    // Mid-job: the batches have answered some requests, not all (in_progress, then 3 answers).
    let stepped = emulator.step(None, 2).await;
    assert_eq!(stepped.len(), inputs.len());
    assert!(
        stepped
            .iter()
            .all(|b| b.status == BatchStatus::InProgress && b.request_counts.completed == 3),
        "{stepped:?}"
    );
    let before: Vec<String> = emulator
        .batches()
        .await
        .iter()
        .map(|b| format!("{}", b.status))
        .collect();

    let outage_started = Instant::now();
    assert!(
        azurite.proc.terminate(Duration::from_secs(20)).is_some(),
        "Azurite stops"
    );
    // While storage is down: the emulator's steps cannot read the inputs (they change
    // nothing), the event is answered 5xx (Event Grid redelivers later), and ticks answer
    // 2xx, reporting faults, without losing anything.
    emulator.advance().await;
    let (status, answer) = handler.invoke("function-trigger", &late.payload()).await;
    assert!(status >= 500, "{status}: {:?}", answer.logs);
    let mut outage_ticks = 0;
    while outage_started.elapsed() < Duration::from_secs(60) {
        let (status, _) = handler.tick().await;
        assert_eq!(status, 200);
        outage_ticks += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let outage = outage_started.elapsed();
    drop(azurite);
    let azurite = Azurite::start_persistent(dir.path(), port);
    assert_eq!(azurite.port, port, "back on the same port");

    let (deliveries, _) = deliver_until_ok(&handler, &late, 20).await;
    inputs.push(late);
    let ticks = tick_until_summaries(
        &handler,
        &emulator,
        &store,
        &inputs,
        Duration::from_secs(60),
    )
    .await;
    let (lines, lost) = assert_all_complete("outage", &store, &emulator, &inputs).await;
    let batches = emulator.batches().await.len();
    assert_eq!(batches, inputs.len());
    assert_eq!(lost, 0);
    println!(
        "FIGURE outage: {} inputs, Azurite stopped {:.0} s mid-job (batches were {before:?}), \
         {outage_ticks} ticks and 1 event during the outage (event answered 5xx, redelivered: \
         {deliveries} more) -> {ticks} ticks after restart, {batches} batches (expected {}), \
         {lines} lines, {lost} lost",
        inputs.len(),
        outage.as_secs_f64(),
        inputs.len()
    );
}

#[tokio::test]
async fn quota() {
    // Room for one of these files at a time in the enqueued-token quota. Manual steps: no
    // batch ends while the events are delivered.
    let s = stack(&["--step-ms", "0", "--enqueued-token-limit", "3000"], &[]);
    let store = s.azurite.store();
    let started = Instant::now();
    let mut inputs = Vec::new();
    for i in 0..5 {
        inputs.push(
            upload(
                &store,
                &format!("quota/{i}.jsonl"),
                ids(&format!("q{i}"), 20),
            )
            .await,
        );
    }
    let mut queued = 0;
    for i in &inputs {
        let (status, answer) = s.handler.invoke("function-trigger", &i.payload()).await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        if answer.logs.iter().any(|l| l.contains("queued")) {
            queued += 1;
        }
    }
    assert!(queued >= 2, "the quota was full: {queued} queued");
    let ticks = s
        .tick_until_summaries(&inputs, Duration::from_secs(90))
        .await;
    let (lines, lost) = assert_all_complete("quota", &store, &s.emulator, &inputs).await;
    let batches = s.emulator.batches().await.len();
    assert_eq!(batches, inputs.len());
    let done: Vec<_> = store
        .list("batch-jobs", "done/")
        .try_collect()
        .await
        .unwrap();
    let mut refusals = 0;
    for d in &done {
        let rec = read_json(&store, "batch-jobs", &d.name).await.unwrap();
        refusals += rec["quota_attempts"].as_u64().unwrap_or(0);
    }
    println!(
        "FIGURE quota: {n} inputs of 20 lines, quota for 1 at a time -> {queued} queued at \
         intake, {refusals} quota refusals retried with backoff, {ticks} ticks, all completed, \
         {batches} batches (expected {n}), {lines} lines, {lost} lost ({} s)",
        started.elapsed().as_secs(),
        n = inputs.len()
    );
}

/// What the overwrite scenarios check once both versions' jobs ended.
async fn check_overwritten(
    s: &Stack,
    old: &Input,
    new: &Input,
    seen: &HashSet<(String, Option<String>)>,
) -> (Batch, Batch) {
    let store = s.azurite.store();
    // Both versions share a URL: the emulator's list is newest first.
    let all = batches_for(&s.emulator, &old.url).await;
    assert_eq!(all.len(), 2, "one batch per version: {all:?}");
    let (new_batch, old_batch) = (all[0].clone(), all[1].clone());
    assert_eq!(old_batch.status, BatchStatus::Failed);
    assert!(
        old_batch.error_codes().any(|c| c == "input_modified"),
        "{old_batch:?}"
    );
    assert_eq!(new_batch.status, BatchStatus::Completed);
    // Never did summary.json claim that the old version's batch completed.
    assert!(
        !seen.contains(&("completed".to_string(), Some(old_batch.id.clone()))),
        "{seen:?}"
    );
    // The old job is filed as failed; the new one as completed.
    let key = |i: &Input| format!("done/{}@{}.json", i.name, i.etag.trim_matches('"'));
    let old_rec = read_json(&store, "batch-jobs", &key(old)).await.unwrap();
    assert_eq!(old_rec["outcome"], "failed", "{old_rec}");
    let new_rec = read_json(&store, "batch-jobs", &key(new)).await.unwrap();
    assert_eq!(new_rec["outcome"], "completed", "{new_rec}");
    // The folder is the new version's, whole.
    let f = folder(&store, new).await;
    assert_eq!(f.status, "completed", "{f:?}");
    assert_eq!(f.batch_id.as_deref(), Some(new_batch.id.as_str()), "{f:?}");
    assert_eq!((f.lost, f.doubled), (0, 0), "{f:?}");
    let results = read_text(
        &store,
        "batch-output",
        &format!("{}/results.jsonl", new.path()),
    )
    .await
    .unwrap_or_default();
    let old_ids: HashSet<&String> = old.ids.iter().collect();
    assert!(
        ids_of(&results).iter().all(|id| !old_ids.contains(id)),
        "no old-version answers in the new folder"
    );
    // The old version's own report sits apart, where it cannot mix with the new one's.
    let superseded = format!(
        "{}/superseded/{}/summary.json",
        old.path(),
        old.etag.trim_matches('"')
    );
    let old_summary = read_json(&store, "batch-output", &superseded)
        .await
        .unwrap_or_else(|| panic!("no {superseded}"));
    assert_eq!(old_summary["status"], "failed", "{old_summary}");
    assert_eq!(old_summary["batch_id"], old_batch.id.as_str());
    (old_batch, new_batch)
}

async fn overwrite_setup(s: &Stack, path: &str) -> (Input, Input) {
    let store = s.azurite.store();
    let old = upload(
        &store,
        &format!("{path}.jsonl"),
        ids(&format!("{path}-v1"), 20),
    )
    .await;
    deliver_until_ok(&s.handler, &old, 3).await;
    // The old job half-way: in_progress, two answers.
    let old_batch = batch_for(&s.emulator, &old.url).await.unwrap();
    let stepped = s.emulator.step(Some(&old_batch.id), 2).await;
    assert_eq!(stepped[0].request_counts.completed, 2, "{stepped:?}");
    let new = upload(
        &store,
        &format!("{path}.jsonl"),
        ids(&format!("{path}-v2"), 6),
    )
    .await;
    assert_ne!(old.etag, new.etag);
    deliver_until_ok(&s.handler, &new, 3).await;
    (old, new)
}

async fn summary_state(store: &BlobStore, path: &str) -> Option<(String, Option<String>)> {
    let s = read_json(store, "batch-output", &format!("{path}/summary.json")).await?;
    Some((
        s["status"].as_str().unwrap_or_default().to_string(),
        s["batch_id"].as_str().map(str::to_string),
    ))
}

#[tokio::test]
async fn overwrite() {
    let s = stack(&["--step-ms", "0", "--lines-per-step", "2"], &[]);
    let store = s.azurite.store();

    // 1. The timer ticks often (the batches take a step before each tick): the old
    //    version's failed job is harvested while the new one runs. Every summary.json seen
    //    on the way is recorded.
    let (old, new) = overwrite_setup(&s, "over/ticking").await;
    let mut seen = HashSet::new();
    let mut ticks = 0;
    let new_key = format!("done/{}@{}.json", new.name, new.etag.trim_matches('"'));
    while store
        .properties("batch-jobs", &new_key)
        .await
        .unwrap()
        .is_none()
    {
        assert!(ticks < 200, "the new version's job never finished");
        s.emulator.advance().await;
        s.handler.tick().await;
        ticks += 1;
        if let Some(state) = summary_state(&store, new.path()).await {
            seen.insert(state);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (old_batch, new_batch) = check_overwritten(&s, &old, &new, &seen).await;

    // 2. No tick until both versions' batches ended (the timer runs every 5 minutes): one
    //    tick harvests both jobs at once into the same folder.
    let mut pairs = Vec::new();
    for k in 0..2 {
        pairs.push(overwrite_setup(&s, &format!("over/quiet-{k}")).await);
    }
    // Enough steps for both versions' batches to end: the old ones fail at their next step,
    // the new ones (6 lines, 2 a step) take five.
    s.emulator.step(None, 5).await;
    for (old, _) in &pairs {
        let mine = batches_for(&s.emulator, &old.url).await;
        assert!(
            mine.len() == 2 && mine.iter().all(|b| b.status.is_terminal()),
            "both batches ended: {mine:?}"
        );
    }
    let news: Vec<Input> = pairs.iter().map(|(_, n)| n.clone()).collect();
    let quiet_ticks = s.tick_until_summaries(&news, Duration::from_secs(30)).await;
    s.handler.tick().await;
    for (old, new) in &pairs {
        check_overwritten(&s, old, new, &HashSet::new()).await;
    }
    let batches = s.emulator.batches().await.len();
    assert_eq!(batches, 6);
    println!(
        "FIGURE overwrite: 3 inputs re-uploaded mid-job (1 with ticks every 0.1 s: {ticks} ticks; \
         2 with both versions ended before one tick: {quiet_ticks} tick(s)) -> {batches} batches \
         (expected 6, one per version); each old version failed input_modified and is reported \
         failed, never completed; each final folder is the new version's completed batch \
         ({} lines, 0 lost, 0 old answers); summaries seen while ticking: {}",
        new.ids.len() * 3,
        seen.iter()
            .map(|(st, id)| format!(
                "{st} ({})",
                if id.as_deref() == Some(old_batch.id.as_str()) {
                    "old batch"
                } else if id.as_deref() == Some(new_batch.id.as_str()) {
                    "new batch"
                } else {
                    "?"
                }
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// A TCP proxy to `upstream` that holds each new connection for `delay` before passing it
/// on: a slow network path from one handler instance to the service.
async fn slow_proxy(upstream: u16, delay: Duration) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut outbound) =
                    tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn a_lapsed_lease_during_a_slow_create_still_makes_one_batch() {
    // Two instances: A reaches the service through a slow path (its create arrives 5 s after
    // it was sent), B directly. The tests' lease is 2 s.
    let s = stack(&["--step-ms", "60000"], &[]);
    let store = s.azurite.store();
    let proxy = slow_proxy(s.emulator.port, Duration::from_secs(5)).await;
    let mut env_a = handler_env(&s.azurite, &s.emulator);
    for (k, v) in env_a.iter_mut() {
        if k == "AZURE_OPENAI_ENDPOINT" {
            *v = format!("http://127.0.0.1:{proxy}");
        }
    }
    let a = Handler::start(env_a);
    let input = upload(&store, "lease/slow.jsonl", ids("l", 3)).await;
    let payload = input.payload();
    let first = {
        let url = a.url("/function-trigger");
        let payload = payload.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&payload)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    // A has noted that its create is under way; wait until its lease has lapsed.
    let key = format!(
        "active/{}@{}.json",
        input.name,
        input.etag.trim_matches('"')
    );
    let rec = eventually(Duration::from_secs(10), "create under way", || async {
        read_json(&store, "batch-jobs", &key)
            .await
            .filter(|r| !r["create_started_at"].is_null())
    })
    .await;
    // B's clock is moved past A's lease, not waited for.
    let lease_until = rec["lease_until"].as_i64().unwrap();
    let b_now = advance_clock(&s.handler, 0).await;
    advance_clock(&s.handler, lease_until - b_now + 1).await;
    // Event Grid redelivers (A's invocation has not answered yet) and B takes it.
    let (status, answer) = s.handler.invoke("function-trigger", &payload).await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let a_answer = first.await.unwrap();
    let batches = batches_per_input(&s.emulator)
        .await
        .get(&input.url)
        .copied()
        .unwrap_or(0);
    assert_eq!(
        batches, 1,
        "one input version, {batches} batches; B: {:?}; A: {a_answer}",
        answer.logs
    );
    assert!(
        a_answer.to_string().contains("submitted"),
        "A's create went through and A recorded it: {a_answer}"
    );
    println!(
        "FIGURE lapsed-lease: A's create delayed 5 s on its way, its 2 s claim lease lapsed, \
         the event redelivered to B -> {batches} batch (expected 1), B deferred to A's create"
    );
}
