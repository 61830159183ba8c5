//! `function-webhook` end to end: Azure OpenAI's signed `batch.*` events (here the batch
//! emulator's, registered as the docs show) move a job on at once, with no timer tick; a
//! forged, replayed or stale event changes nothing; a duplicate event racing a tick gives one
//! harvest. Real Azurite, the emulator and the handler; the test plays the Functions host,
//! which forwards the request raw to `/api/function-webhook` (host.json
//! `enableForwardingHttpRequest`).

mod support;

use std::time::{Duration, Instant};

use aoai_blob_batch::webhook::signature::sign;
use base64::Engine;
use serde_json::{Value, json};
use support::*;

/// The secret the handler is given in the tests that sign events themselves.
const SECRET: &str = "whsec_dGVzdC13ZWJob29rLXNlY3JldC0wMTIzNDU2Nzg5"; // "test-webhook-secret-0123456789"
const OTHER_SECRET: &str = "whsec_YW5vdGhlci1zZWNyZXQ=";

fn key(secret: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn event(batch_id: &str, kind: &str) -> Vec<u8> {
    json!({
        "object": "event",
        "id": format!("evt_{}", uuid::Uuid::new_v4().simple()),
        "type": kind,
        "created_at": now(),
        "data": {"id": batch_id},
    })
    .to_string()
    .into_bytes()
}

/// A delivery as the service sends it, signed with `secret` at `timestamp`.
async fn deliver(
    handler: &Handler,
    secret: &str,
    webhook_id: &str,
    timestamp: i64,
    body: &[u8],
) -> (u16, String) {
    let ts = timestamp.to_string();
    let resp = reqwest::Client::new()
        .post(handler.url("/api/function-webhook"))
        .header("content-type", "application/json")
        .header("webhook-id", webhook_id)
        .header("webhook-timestamp", &ts)
        .header(
            "webhook-signature",
            sign(&key(secret), webhook_id, &ts, body),
        )
        .body(body.to_vec())
        .send()
        .await
        .expect("the handler answers");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The stack with a manual emulator (batches move only when stepped) and the handler given
/// `secret`.
fn stack(secret: &str) -> Stack {
    Stack::start(
        &["--step-ms", "0"],
        &[("AZURE_OPENAI_WEBHOOK_SECRET", secret)],
    )
}

/// Submits the seed sample; returns its batch id.
async fn submit_sample(s: &Stack) -> String {
    let seed = std::fs::read(root().join("samples/test.jsonl")).unwrap();
    s.submit("test.jsonl", &seed).await;
    let batches = s.emulator.batches().await;
    assert_eq!(batches.len(), 1);
    batches[0].id.clone()
}

/// Steps the batch until it has ended.
async fn finish_batch(s: &Stack, batch_id: &str) {
    for _ in 0..20 {
        let b = s.emulator.step(Some(batch_id), 1).await;
        if b.iter().all(|b| b.status.is_terminal()) {
            return;
        }
    }
    panic!("batch {batch_id} did not end in 20 steps");
}

/// Everything a webhook could change: the state container's records (with their ETags) and
/// the output container's blobs.
async fn snapshot(s: &Stack) -> Vec<String> {
    use futures::TryStreamExt;
    let store = s.azurite.store();
    let mut all = Vec::new();
    for container in ["batch-jobs", "batch-output"] {
        let items: Vec<_> = store
            .list(container, "")
            .try_collect()
            .await
            .unwrap_or_default();
        all.extend(
            items
                .into_iter()
                // The handled-id records are the webhook's own bookkeeping.
                .filter(|b| !b.name.starts_with("webhooks/"))
                .map(|b| format!("{container}/{} {}", b.name, b.etag)),
        );
    }
    all.sort();
    all
}

async fn summary(s: &Stack) -> Option<Value> {
    read_json(&s.azurite.store(), "batch-output", "test/summary.json").await
}

#[tokio::test]
async fn a_signed_batch_completed_event_from_the_service_harvests_the_job_without_a_tick() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "0"]);
    // Registered as the docs show; the secret is answered once, and goes into the app setting.
    let http = reqwest::Client::new();
    let endpoints = format!(
        "{}/openai/v1/dashboard/webhook_endpoints",
        emulator.endpoint()
    );
    let created: Value = http
        .post(&endpoints)
        .header("api-key", API_KEY)
        .json(
            &json!({"name": "batch-handler", "url": "http://127.0.0.1:9/", "event_types":
            ["batch.completed", "batch.failed", "batch.cancelled", "batch.expired"]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["signing_secret"].as_str().unwrap().to_string();
    let mut env = handler_env(&azurite, &emulator);
    env.push(("AZURE_OPENAI_WEBHOOK_SECRET".into(), secret));
    let handler = Handler::start(env);
    // Now that the handler's address is known, the endpoint points at it.
    let updated = http
        .post(format!("{endpoints}/{}", created["id"].as_str().unwrap()))
        .header("api-key", API_KEY)
        .json(&json!({"url": handler.url("/api/function-webhook")}))
        .send()
        .await
        .unwrap();
    assert_eq!(updated.status(), 200);
    let s = Stack {
        azurite,
        emulator,
        handler,
    };

    let batch_id = submit_sample(&s).await;
    finish_batch(&s, &batch_id).await;
    let ended = Instant::now();

    // No tick is ever posted: only the event can have done it.
    let summary = eventually(Duration::from_secs(10), "summary.json", || summary(&s)).await;
    let latency = ended.elapsed();
    assert_eq!(summary["status"], "completed", "{summary}");
    assert_eq!(summary["batch_id"], batch_id.as_str());
    assert_eq!(summary["request_counts"]["completed"], 3);
    let results = read_text(&s.azurite.store(), "batch-output", "test/results.jsonl")
        .await
        .expect("results.jsonl");
    assert_eq!(results.lines().count(), 3);
    assert!(
        latency < Duration::from_secs(5),
        "batch end to summary.json took {latency:?}"
    );
    eprintln!("batch end -> summary.json through the webhook: {latency:?}");
}

#[tokio::test]
async fn forged_stale_or_unknown_events_are_refused_and_change_nothing() {
    let s = stack(SECRET);
    let batch_id = submit_sample(&s).await;
    finish_batch(&s, &batch_id).await;
    let before = snapshot(&s).await;
    let body = event(&batch_id, "batch.completed");

    // Signed with a secret the handler does not have.
    let (status, text) = deliver(&s.handler, OTHER_SECRET, "msg_forged", now(), &body).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("signature"), "{text}");
    // The right secret, but one byte of the body changed after signing.
    let ts = now().to_string();
    let signature = sign(&key(SECRET), "msg_changed", &ts, &body);
    let changed = String::from_utf8(body.clone())
        .unwrap()
        .replace("batch.completed", "batch.completeD");
    let resp = reqwest::Client::new()
        .post(s.handler.url("/api/function-webhook"))
        .header("webhook-id", "msg_changed")
        .header("webhook-timestamp", &ts)
        .header("webhook-signature", signature)
        .body(changed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // Signed right, but sent 10 minutes ago (a captured delivery played again later), or
    // dated 10 minutes ahead.
    for at in [now() - 600, now() + 600] {
        let (status, text) = deliver(&s.handler, SECRET, "msg_stale", at, &body).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("timestamp"), "{text}");
    }
    // No signature at all.
    let resp = reqwest::Client::new()
        .post(s.handler.url("/api/function-webhook"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    // The same forgery through the host's envelope (forwarding off) is refused in Outputs.res.
    let ts = now().to_string();
    let envelope = json!({
        "Data": {"req": {
            "Url": "https://app.azurewebsites.net/api/function-webhook",
            "Method": "POST",
            "Headers": {
                "webhook-id": ["msg_envelope"],
                "webhook-timestamp": [ts],
                "webhook-signature": [sign(&key(OTHER_SECRET), "msg_envelope", &ts, &body)],
            },
            "Body": String::from_utf8(body.clone()).unwrap(),
        }},
        "Metadata": {},
    });
    let (status, answer) = s.handler.invoke("function-webhook", &envelope).await;
    assert_eq!(status, 200);
    assert_eq!(
        answer.outputs["res"]["statusCode"], 400,
        "{:?}",
        answer.outputs
    );
    assert_eq!(
        snapshot(&s).await,
        before,
        "a refused event changed something"
    );

    // Signed right, for a batch that is not this app's: acknowledged, nothing done.
    let (status, text) = deliver(
        &s.handler,
        SECRET,
        "msg_unknown",
        now(),
        &event("batch_not_ours", "batch.completed"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("no active job"), "{text}");
    assert_eq!(
        snapshot(&s).await,
        before,
        "an unknown batch changed something"
    );
    assert!(summary(&s).await.is_none());

    // The timer still harvests the job: nothing was lost.
    let summary = s.harvest("test", Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "completed");
}

#[tokio::test]
async fn a_replayed_webhook_id_is_handled_once() {
    let s = stack(SECRET);
    let batch_id = submit_sample(&s).await;
    // Delivered (and handled) while the batch still runs: the job is polled, nothing ends.
    let first = event(&batch_id, "batch.completed");
    let (status, text) = deliver(&s.handler, SECRET, "msg_once", now(), &first).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("moved on"), "{text}");

    finish_batch(&s, &batch_id).await;
    let before = snapshot(&s).await;
    // The same webhook-id again, freshly signed and now about a finished batch: a replay (or
    // a redelivery) is not acted on a second time.
    let (status, text) = deliver(&s.handler, SECRET, "msg_once", now(), &first).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("duplicate"), "{text}");
    assert_eq!(snapshot(&s).await, before, "a replay changed something");
    assert!(summary(&s).await.is_none());

    // A new delivery id moves it on.
    let (status, text) = deliver(&s.handler, SECRET, "msg_next", now(), &first).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("finished"), "{text}");
    assert_eq!(summary(&s).await.unwrap()["status"], "completed");
}

#[tokio::test]
async fn a_duplicate_event_racing_a_tick_gives_one_harvest() {
    let s = stack(SECRET);
    let batch_id = submit_sample(&s).await;
    finish_batch(&s, &batch_id).await;
    let body = event(&batch_id, "batch.completed");

    // The service's delivery, its redelivery (same id), a second event (another id) and the
    // timer, all at once.
    let (a, b, c, (tick, answer)) = tokio::join!(
        deliver(&s.handler, SECRET, "msg_race", now(), &body),
        deliver(&s.handler, SECRET, "msg_race", now(), &body),
        deliver(&s.handler, SECRET, "msg_race_2", now(), &body),
        s.handler.tick(),
    );
    for (status, text) in [&a, &b, &c] {
        assert_eq!(*status, 200, "{text}");
    }
    assert_eq!(tick, 200, "{:?}", answer.logs);
    assert!(
        [&a, &b].iter().any(|(_, t)| t.contains("duplicate")),
        "one of the two deliveries of msg_race is the duplicate: {a:?} {b:?}"
    );

    let summary = summary(&s).await.expect("summary.json");
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["request_counts"]["total"], 3);
    let store = s.azurite.store();
    let results = read_text(&store, "batch-output", "test/results.jsonl")
        .await
        .unwrap();
    assert_eq!(results.lines().count(), 3, "results once: {results}");
    let merged = read_text(&store, "batch-output", "test/merged.jsonl")
        .await
        .unwrap();
    assert_eq!(merged.lines().count(), 3);
    let mut names = blob_names(&store, "batch-output", "").await;
    names.sort();
    assert_eq!(
        names,
        [
            "test/merged.jsonl",
            "test/results.jsonl",
            "test/summary.json"
        ],
        "the service's folder is gone and nothing is doubled"
    );
    assert!(blob_names(&store, "batch-jobs", "active/").await.is_empty());
    assert_eq!(blob_names(&store, "batch-jobs", "done/").await.len(), 1);
}

/// The record of the stack's only active job, once it is in `state`.
async fn wait_for_state(s: &Stack, state: &str) {
    let store = s.azurite.store();
    eventually(Duration::from_secs(20), state, || async {
        for name in blob_names(&store, "batch-jobs", "active/").await {
            let record = read_json(&store, "batch-jobs", &name).await?;
            if record["state"] == state {
                return Some(());
            }
        }
        None
    })
    .await
}

#[tokio::test]
async fn a_harvester_arriving_mid_harvest_leaves_the_job_to_its_holder() {
    // The first handler takes a while between recording the batch's end and moving its
    // results (as a large result file would make it); a second handler, another instance
    // of the app, gets the webhook and its own tick meanwhile. The holder does not renew its
    // hold during that pause, and storage dates a lease to the second, so the tests' 2 s lease
    // can lapse after 1 s, before the pause ends: a 10 s lease keeps the holder live while
    // the second one arrives, however slowly it does.
    let s = Stack::start(
        &["--step-ms", "0"],
        &[
            ("AZURE_OPENAI_WEBHOOK_SECRET", SECRET),
            ("BATCH_TEST_HARVEST_DELAY_MS", "1500"),
            ("BATCH_SUBMIT_LEASE_SECONDS", "10"),
        ],
    );
    let mut env = handler_env(&s.azurite, &s.emulator);
    env.push(("AZURE_OPENAI_WEBHOOK_SECRET".into(), SECRET.into()));
    env.push(("BATCH_SUBMIT_LEASE_SECONDS".into(), "10".into()));
    let other = Handler::start(env);
    let batch_id = submit_sample(&s).await;
    finish_batch(&s, &batch_id).await;

    let body = event(&batch_id, "batch.completed");
    let (first, (hook, second)) = tokio::join!(s.handler.tick(), async {
        wait_for_state(&s, "harvesting").await;
        let hook = deliver(&other, SECRET, "msg_mid", now(), &body).await;
        (hook, other.tick().await)
    });
    assert_eq!(first.0, 200, "{:?}", first.1.logs);
    assert_eq!(second.0, 200, "{:?}", second.1.logs);
    assert_eq!(hook.0, 200, "{}", hook.1);

    assert_harvested_once(&s, &first.1.logs).await;
    // The holder harvested it; the other instance left it alone, by webhook and by tick.
    assert!(harvested(&first.1.logs), "{:?}", first.1.logs);
    assert!(!harvested(&second.1.logs), "{:?}", second.1.logs);
    assert!(!hook.1.contains("finished"), "{}", hook.1);
}

/// A holder that pauses between taking the job and its first step in the folder (a slow
/// retrieve, a wait on the capacity ledger, a stalled instance) longer than its lease is
/// taken over, rightly; the new holder moves the results and files the job. When the old one
/// wakes, it must find it lost the job before it touches the folder. Its first step clears
/// `results.jsonl`, `errors.jsonl` and `merged.jsonl` (the folder of an earlier input version,
/// it assumes); when only its record write after that failed (412), the summary named results
/// that were gone, and the service's copy was already deleted by the new holder.
#[tokio::test]
async fn a_holder_whose_hold_lapsed_does_not_clear_what_its_successor_moved() {
    // A pauses 3 s after taking the job; its hold is 2 s.
    let s = Stack::start(
        &["--step-ms", "0"],
        &[("BATCH_TEST_HARVEST_DELAY_MS", "3000")],
    );
    let other = Handler::start(handler_env(&s.azurite, &s.emulator));
    let batch_id = submit_sample(&s).await;
    finish_batch(&s, &batch_id).await;

    let (first, second) = tokio::join!(s.handler.tick(), async {
        wait_for_state(&s, "harvesting").await;
        // B's clock is past A's hold, as the real one is 2 s later while A still pauses.
        advance_clock(&other, 3).await;
        other.tick().await
    });
    assert_eq!(first.0, 200, "{:?}", first.1.logs);
    assert_eq!(second.0, 200, "{:?}", second.1.logs);
    assert!(
        harvested(&second.1.logs),
        "B harvested: {:?}",
        second.1.logs
    );
    assert_harvested_once(&s, &first.1.logs).await;
}

/// Whether these logs hold the harvest of the sample input (`submit_sample`).
fn harvested(logs: &[String]) -> bool {
    logs.iter()
        .any(|l| l.contains("results in batch-output/test/"))
}

/// The sample input's batch was harvested once and whole: a `completed` summary, its three
/// answers in `results.jsonl` and `merged.jsonl`, and its job filed under done/. `logs`: the
/// logs to show should a file be missing.
async fn assert_harvested_once(s: &Stack, logs: &[String]) {
    let summary = summary(s).await.expect("summary.json");
    assert_eq!(summary["status"], "completed");
    let store = s.azurite.store();
    for file in ["results.jsonl", "merged.jsonl"] {
        let text = read_text(&store, "batch-output", &format!("test/{file}"))
            .await
            .unwrap_or_else(|| panic!("{file} is where the summary says; logs: {logs:?}"));
        assert_eq!(text.lines().count(), 3, "{file}: {text}");
    }
    assert!(blob_names(&store, "batch-jobs", "active/").await.is_empty());
    assert_eq!(blob_names(&store, "batch-jobs", "done/").await.len(), 1);
}

#[tokio::test]
async fn handler_webhook_register_registers_the_url_and_writes_the_secret_to_a_file_only() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &[]);
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("webhook-secret");
    let url = "https://app.example.net/api/function-webhook?code=function-key-123";
    let out = std::process::Command::new(&Bins::local().handler)
        .args(["webhook", "register", "--url", url, "--secret-file"])
        .arg(&secret_file)
        .env("AZURE_OPENAI_ENDPOINT", emulator.endpoint())
        .env("AZURE_OPENAI_API_KEY", API_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("AZURE_OPENAI_WEBHOOK_SECRET"), "{stdout}");

    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert!(
        secret.starts_with("whsec_"),
        "the file holds the setting's value"
    );
    for printed in [&stdout, &stderr] {
        assert!(
            !printed.contains(&secret[6..]),
            "the secret was printed: {printed}"
        );
        assert!(
            !printed.contains("function-key-123"),
            "the function key was printed"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "only its owner may read the secret file");

    let listed: Value = reqwest::Client::new()
        .get(format!(
            "{}/openai/v1/dashboard/webhook_endpoints",
            emulator.endpoint()
        ))
        .header("api-key", API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"][0]["url"], url);
    assert_eq!(
        listed["data"][0]["event_types"],
        json!([
            "batch.completed",
            "batch.failed",
            "batch.cancelled",
            "batch.expired"
        ])
    );
    // A second registration (another region, or a rotation) adds its secret to the list.
    let again = std::process::Command::new(&Bins::local().handler)
        .args(["webhook", "register", "--url", url, "--secret-file"])
        .arg(&secret_file)
        .env("AZURE_OPENAI_ENDPOINT", emulator.endpoint())
        .env("AZURE_OPENAI_API_KEY", API_KEY)
        .output()
        .unwrap();
    assert!(again.status.success());
    let both = std::fs::read_to_string(&secret_file).unwrap();
    assert_eq!(both.split(',').count(), 2, "{}", both.len());
    assert!(both.starts_with(&secret));
}

#[tokio::test]
async fn the_last_parts_event_combines_a_split_file_without_a_tick() {
    let s = Stack::start(
        &["--step-ms", "0"],
        &[
            ("AZURE_OPENAI_WEBHOOK_SECRET", SECRET),
            ("BATCH_SPLIT_MAX_REQUESTS", "2"),
        ],
    );
    let input: String = (0..4)
        .map(|i| chat_line(&format!("q-{i}"), &format!("question {i}")) + "\n")
        .collect();
    s.submit("big.jsonl", input.as_bytes()).await;
    let batches = s.emulator.batches().await;
    assert_eq!(batches.len(), 2, "4 lines, 2 a part: two batches");

    let read = || async { read_json(&s.azurite.store(), "batch-output", "big/summary.json").await };
    for (i, batch) in batches.iter().enumerate() {
        finish_batch(&s, &batch.id).await;
        let (status, text) = deliver(
            &s.handler,
            SECRET,
            &format!("msg_part_{i}"),
            now(),
            &event(&batch.id, "batch.completed"),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        if i == 0 {
            assert!(read().await.is_none(), "one part ended, the file has not");
        }
    }
    let summary = read()
        .await
        .expect("the last part's event combined the file");
    assert_eq!(summary["status"], "completed", "{summary}");
    assert_eq!(summary["request_counts"]["total"], 4);
    let merged = read_text(&s.azurite.store(), "batch-output", "big/merged.jsonl")
        .await
        .unwrap();
    assert_eq!(merged.lines().count(), 4);
}

#[tokio::test]
async fn a_step_longer_than_the_services_wait_is_answered_in_time_and_still_completes() {
    // The answer may wait 1 ms here (8 s in a real deployment): every step outlives it.
    let s = Stack::start(
        &["--step-ms", "0"],
        &[
            ("AZURE_OPENAI_WEBHOOK_SECRET", SECRET),
            ("BATCH_TEST_WEBHOOK_ANSWER_MS", "1"),
        ],
    );
    let batch_id = submit_sample(&s).await;
    finish_batch(&s, &batch_id).await;
    let (status, text) = deliver(
        &s.handler,
        SECRET,
        "msg_slow",
        now(),
        &event(&batch_id, "batch.completed"),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("being moved on"), "{text}");
    // The work went on after the answer.
    let summary = eventually(Duration::from_secs(10), "summary.json", || summary(&s)).await;
    assert_eq!(summary["status"], "completed");
}

#[tokio::test]
async fn a_crash_at_each_harvest_step_of_a_webhook_loses_nothing() {
    let s = stack(SECRET);
    let store = s.azurite.store();
    let points: Vec<&str> = aoai_blob_batch::app::FAULT_POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("harvest:"))
        .collect();
    let mut names = Vec::new();
    for (i, point) in points.iter().enumerate() {
        let name = format!("crash-{i}");
        let body: String = (0..3)
            .map(|k| chat_line(&format!("c{i}-{k}"), "why?") + "\n")
            .collect();
        s.submit(&format!("{name}.jsonl"), body.as_bytes()).await;
        let batch = batch_for(&s.emulator, &format!("{name}.jsonl")).await;
        finish_batch(&s, &batch.id).await;
        // A second handler, which aborts at this step, gets the event.
        let mut env = s.handler.env.clone();
        env.push(("BATCH_TEST_FAULT".into(), point.to_string()));
        let mut faulty = Handler::start(env);
        let body = event(&batch.id, "batch.completed");
        let ts = now().to_string();
        let _ = reqwest::Client::new()
            .post(faulty.url("/api/function-webhook"))
            .header("webhook-id", format!("msg_crash_{i}"))
            .header("webhook-timestamp", &ts)
            .header(
                "webhook-signature",
                sign(&key(SECRET), &format!("msg_crash_{i}"), &ts, &body),
            )
            .body(body.clone())
            .timeout(Duration::from_secs(30))
            .send()
            .await;
        let exit = faulty.proc.wait_exit(Duration::from_secs(20));
        assert!(
            exit.is_some_and(|e| !e.success()),
            "{point}: the handler did not abort; logs:\n{}",
            faulty.proc.logs()
        );
        // The service redelivers (the same id) to a live instance.
        let (status, text) =
            deliver(&s.handler, SECRET, &format!("msg_crash_{i}"), now(), &body).await;
        assert_eq!(status, 200, "{point}: {text}");
        names.push(name);
    }
    // A crashed holder's hold on its job lapses with its lease (2 s here); then the timer
    // finishes whatever the crashes left.
    advance_clock(&s.handler, 3).await;
    let (status, answer) = s.handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    for name in &names {
        let summary = read_json(&store, "batch-output", &format!("{name}/summary.json"))
            .await
            .unwrap_or_else(|| panic!("{name}: no summary"));
        assert_eq!(summary["status"], "completed", "{name}: {summary}");
        let results = read_text(&store, "batch-output", &format!("{name}/results.jsonl"))
            .await
            .unwrap();
        assert_eq!(results.lines().count(), 3, "{name}: results once");
        let merged = read_text(&store, "batch-output", &format!("{name}/merged.jsonl"))
            .await
            .unwrap();
        assert_eq!(merged.lines().count(), 3, "{name}");
    }
    assert!(blob_names(&store, "batch-jobs", "active/").await.is_empty());
}
