//! Admission over the enqueued-token quota (issue 15, items 2 and 3), with real Azurite, the
//! real emulator (its capacity model: `--enqueued-token-limit`, the quota headers, a 400
//! `token_limit_exceeded` past the limit) and the real handler. A file is submitted only
//! where its tokens fit; the others wait in line for room, not for a timer, and go in the
//! tick whose harvest frees it. The emulator runs in manual mode (`--step-ms 0`): batches
//! move only when a test steps them, so "the same tick" is exact.

mod support;

use std::time::{Duration, Instant};

use aoai_blob_batch::openai::Batch;
use aoai_stack::Capacity;
use serde_json::Value;
use support::*;

/// Requests per file: each file is 1,000 emulator tokens.
const REQUESTS: usize = 5;
/// Room for two files, not three.
const LIMIT: u64 = 2 * REQUESTS as u64 * REQUEST_TOKENS + 500;

fn small_quota() -> Capacity {
    Capacity {
        enqueued_token_limit: Some(LIMIT),
        ..Capacity::default()
    }
}

/// Azurite, an emulator in manual mode with [`small_quota`], a handler, and a store client
/// with the output container made: what most of these tests start from.
async fn small_quota_stack() -> (
    Azurite,
    Emulator,
    Handler,
    aoai_blob_batch::storage::BlobStore,
) {
    let azurite = Azurite::start();
    let emulator = Emulator::start_with_capacity(&azurite, small_quota(), &["--step-ms", "0"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let store = azurite.store();
    store.ensure_container("batch-output").await.unwrap();
    (azurite, emulator, handler, store)
}

/// Creates the emulator answered with 400 `token_limit_exceeded`: its create calls less the
/// batches it holds.
async fn refusals(emulator: &Emulator) -> u64 {
    let creates = emulator.calls().await["create"].as_u64().unwrap();
    creates - emulator.batches().await.len() as u64
}

/// The emulator's unfinished batches.
async fn unfinished(emulator: &Emulator) -> Vec<Batch> {
    emulator
        .batches()
        .await
        .into_iter()
        .filter(|b| !b.status.is_terminal())
        .collect()
}

async fn deliver(handler: &Handler, store: &aoai_blob_batch::storage::BlobStore, name: &str) {
    let body = store
        .read("batch-input", name)
        .await
        .unwrap()
        .expect("uploaded");
    let url = store.blob_url("batch-input", name);
    let (status, answer) = handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, &body.1, body.0.len() as u64)),
        )
        .await;
    assert_eq!(status, 200, "{:?}", answer.logs);
}

async fn status_json(store: &aoai_blob_batch::storage::BlobStore, tag: &str) -> Value {
    read_json(store, "batch-output", &format!("{tag}/status.json"))
        .await
        .unwrap_or_else(|| panic!("{tag}/status.json exists"))
}

#[tokio::test]
async fn concurrent_intakes_over_a_small_quota_never_over_admit() {
    let (_azurite, emulator, handler, store) = small_quota_stack().await;

    let tags: Vec<String> = (0..8).map(|i| format!("f{i}")).collect();
    for tag in &tags {
        upload_input(&store, &format!("{tag}.jsonl"), &quota_file(tag, REQUESTS)).await;
    }
    // Every event at once: eight intakes race for room for two.
    let names: Vec<String> = tags.iter().map(|t| format!("{t}.jsonl")).collect();
    futures::future::join_all(names.iter().map(|n| deliver(&handler, &store, n))).await;
    assert_eq!(
        refusals(&emulator).await,
        0,
        "while the limit was unknown, one create at a time went"
    );
    let waiting: Vec<Value> = {
        let mut v = Vec::new();
        for tag in &tags {
            v.push(status_json(&store, tag).await);
        }
        v.into_iter().filter(|s| s["status"] == "queued").collect()
    };
    assert!(waiting.len() >= 6, "at most two admitted: {waiting:?}");
    assert!(
        waiting
            .iter()
            .any(|s| s["waiting_for"].as_str().unwrap().contains("in line")),
        "{waiting:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut max_unfinished = 0;
    loop {
        let running = unfinished(&emulator).await.len();
        max_unfinished = max_unfinished.max(running);
        assert!(
            running as u64 * REQUESTS as u64 * REQUEST_TOKENS <= LIMIT,
            "{running} unfinished batches are past the quota"
        );
        let mut done = 0;
        for tag in &tags {
            if let Some(s) = read_json(&store, "batch-output", &format!("{tag}/summary.json")).await
            {
                assert_eq!(s["status"], "completed", "{s}");
                done += 1;
            }
        }
        if done == tags.len() {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} of 8 finished");
        emulator.advance().await;
        let (status, answer) = handler.tick().await;
        assert_eq!(status, 200, "{:?}", answer.logs);
    }
    assert_eq!(max_unfinished, 2, "the quota was used, not left idle");
    assert_eq!(
        refusals(&emulator).await,
        0,
        "once the limit was known, nothing was refused"
    );
    assert_eq!(emulator.batches().await.len(), 8, "one batch per file");
}

#[tokio::test]
async fn a_queued_job_is_admitted_in_the_tick_whose_harvest_frees_room() {
    let (_azurite, emulator, handler, store) = small_quota_stack().await;

    for tag in ["a", "b", "c"] {
        upload_input(&store, &format!("{tag}.jsonl"), &quota_file(tag, REQUESTS)).await;
        deliver(&handler, &store, &format!("{tag}.jsonl")).await;
    }
    assert_eq!(inputs_of(&emulator).await, ["a.jsonl", "b.jsonl"]);
    let c = status_json(&store, "c").await;
    assert_eq!(c["status"], "queued", "{c}");
    assert_eq!(
        c["waiting_for"].as_str().unwrap(),
        "room in the enqueued-token quota: 1st in line",
        "{c}"
    );
    assert!(c["next_attempt_at"].is_null(), "no timer: {c}");

    // Ticks while a and b run change nothing for c.
    for _ in 0..2 {
        handler.tick().await;
        assert_eq!(emulator.batches().await.len(), 2);
    }
    // a's batch ends at the service; the next tick harvests it and, in the same tick,
    // creates c's batch.
    end_batch_of(&emulator, "a.jsonl").await;
    let (status, answer) = handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    assert!(
        read_json(&store, "batch-output", "a/summary.json")
            .await
            .is_some(),
        "a harvested: {:?}",
        answer.logs
    );
    assert_eq!(
        inputs_of(&emulator).await,
        ["a.jsonl", "b.jsonl", "c.jsonl"],
        "c's batch created in the tick that harvested a: {:?}",
        answer.logs
    );
    assert!(
        answer.logs.iter().any(|l| l.contains("admitted=1")),
        "{:?}",
        answer.logs
    );
    assert_eq!(refusals(&emulator).await, 0);
}

#[tokio::test]
async fn two_targets_are_both_used_when_one_is_full() {
    let azurite = Azurite::start();
    let east = Emulator::start_with_capacity(&azurite, small_quota(), &["--step-ms", "0"]);
    let west = Emulator::start_with_capacity(&azurite, small_quota(), &["--step-ms", "0"]);
    let mut env = handler_env(&azurite, &east);
    for (k, v) in env.iter_mut() {
        if k == "AZURE_OPENAI_ENDPOINT" {
            *v = format!("{}, {}", east.endpoint(), west.endpoint());
        }
    }
    let handler = Handler::start(env);
    let store = azurite.store();
    store.ensure_container("batch-output").await.unwrap();

    let tags = ["p", "q", "r", "s", "t"];
    for tag in tags {
        upload_input(&store, &format!("{tag}.jsonl"), &quota_file(tag, REQUESTS)).await;
        deliver(&handler, &store, &format!("{tag}.jsonl")).await;
    }
    // Room for two files in each region: four go at once, the fifth waits.
    assert_eq!(
        east.batches().await.len(),
        2,
        "{:?}",
        inputs_of(&east).await
    );
    assert_eq!(
        west.batches().await.len(),
        2,
        "{:?}",
        inputs_of(&west).await
    );
    assert_eq!(status_json(&store, "t").await["status"], "queued");

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut done = 0;
        for tag in tags {
            if let Some(s) = read_json(&store, "batch-output", &format!("{tag}/summary.json")).await
            {
                assert_eq!(s["status"], "completed", "{s}");
                let results =
                    read_text(&store, "batch-output", &format!("{tag}/results.jsonl")).await;
                assert_eq!(results.unwrap().lines().count(), REQUESTS, "{tag}");
                done += 1;
            }
        }
        if done == tags.len() {
            break;
        }
        assert!(Instant::now() < deadline, "only {done} finished");
        east.advance().await;
        west.advance().await;
        let (status, answer) = handler.tick().await;
        assert_eq!(status, 200, "{:?}", answer.logs);
    }
    let total = east.batches().await.len() + west.batches().await.len();
    assert_eq!(total, 5, "one batch per file, across the two regions");
    assert_eq!(refusals(&east).await + refusals(&west).await, 0);
}

#[tokio::test]
async fn two_instances_racing_for_the_last_room_one_wins() {
    let azurite = Azurite::start();
    let emulator = Emulator::start_with_capacity(&azurite, small_quota(), &["--step-ms", "0"]);
    let env = handler_env(&azurite, &emulator);
    let one = Handler::start(env.clone());
    let two = Handler::start(env);
    let store = azurite.store();
    store.ensure_container("batch-output").await.unwrap();

    // The first file tells the limit; room for one more is left.
    upload_input(&store, "a.jsonl", &quota_file("a", REQUESTS)).await;
    deliver(&one, &store, "a.jsonl").await;
    assert_eq!(emulator.batches().await.len(), 1);

    upload_input(&store, "b.jsonl", &quota_file("b", REQUESTS)).await;
    upload_input(&store, "c.jsonl", &quota_file("c", REQUESTS)).await;
    tokio::join!(
        deliver(&one, &store, "b.jsonl"),
        deliver(&two, &store, "c.jsonl")
    );
    let inputs = inputs_of(&emulator).await;
    assert_eq!(inputs.len(), 2, "one of b and c won the room: {inputs:?}");
    assert_eq!(refusals(&emulator).await, 0, "and the other was not sent");
    let loser = if inputs.contains(&"b.jsonl".to_string()) {
        "c"
    } else {
        "b"
    };
    let st = status_json(&store, loser).await;
    assert_eq!(st["status"], "queued", "{st}");
    assert!(
        st["waiting_for"].as_str().unwrap().contains("1st in line"),
        "{st}"
    );
}

#[tokio::test]
async fn a_file_bigger_than_any_quota_is_split_by_tokens_and_completes() {
    let (_azurite, emulator, handler, store) = small_quota_stack().await;

    // A small file first: its create answer tells the limit, and how the service counts.
    upload_input(&store, "small.jsonl", &quota_file("small", REQUESTS)).await;
    deliver(&handler, &store, "small.jsonl").await;
    // 20 requests: 4,000 of the service's tokens, past the 2,500 of the whole quota.
    let big = 20;
    upload_input(&store, "big.jsonl", &quota_file("big", big)).await;
    deliver(&handler, &store, "big.jsonl").await;
    let st = status_json(&store, "big").await;
    assert_eq!(st["status"], "split", "{st}");

    let deadline = Instant::now() + Duration::from_secs(120);
    let summary = loop {
        if let Some(s) = read_json(&store, "batch-output", "big/summary.json").await {
            break s;
        }
        assert!(Instant::now() < deadline, "big.jsonl did not finish");
        emulator.advance().await;
        let (status, answer) = handler.tick().await;
        assert_eq!(status, 200, "{:?}", answer.logs);
    };
    assert_eq!(summary["status"], "completed", "{summary:#}");
    assert_eq!(summary["request_counts"]["completed"], big);
    let parts = summary["parts"].as_array().unwrap();
    assert!(parts.len() >= 2, "{summary:#}");
    let merged = read_text(&store, "batch-output", "big/merged.jsonl")
        .await
        .unwrap();
    let ids: Vec<String> = merged
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let expected: Vec<String> = (0..big).map(|i| format!("big-{i}")).collect();
    assert_eq!(ids, expected, "input order");
    assert_eq!(refusals(&emulator).await, 0, "every part fitted");
}

#[tokio::test]
async fn a_webhook_that_harvests_a_batch_admits_the_next_in_line_without_a_tick() {
    use aoai_blob_batch::webhook::signature::sign;
    use base64::Engine;
    const SECRET: &str = "whsec_dGVzdC13ZWJob29rLXNlY3JldC0wMTIzNDU2Nzg5";

    let azurite = Azurite::start();
    let emulator = Emulator::start_with_capacity(&azurite, small_quota(), &["--step-ms", "0"]);
    let mut env = handler_env(&azurite, &emulator);
    env.push(("AZURE_OPENAI_WEBHOOK_SECRET".into(), SECRET.into()));
    let handler = Handler::start(env);
    let store = azurite.store();
    store.ensure_container("batch-output").await.unwrap();
    for tag in ["a", "b", "c"] {
        upload_input(&store, &format!("{tag}.jsonl"), &quota_file(tag, REQUESTS)).await;
        deliver(&handler, &store, &format!("{tag}.jsonl")).await;
    }
    assert_eq!(inputs_of(&emulator).await, ["a.jsonl", "b.jsonl"]);
    let a_id = end_batch_of(&emulator, "a.jsonl").await;

    // The service's signed batch.completed event, as the host forwards it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let body = serde_json::json!({
        "object": "event", "id": "evt_admission", "type": "batch.completed",
        "created_at": now.parse::<i64>().unwrap(), "data": {"id": a_id},
    })
    .to_string();
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let resp = reqwest::Client::new()
        .post(handler.url("/api/function-webhook"))
        .header("content-type", "application/json")
        .header("webhook-id", "wh_admission")
        .header("webhook-timestamp", &now)
        .header(
            "webhook-signature",
            sign(&key, "wh_admission", &now, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // No tick: the event's invocation harvested a and admitted c.
    eventually(Duration::from_secs(30), "c's batch", || async {
        inputs_of(&emulator)
            .await
            .contains(&"c.jsonl".to_string())
            .then_some(())
    })
    .await;
    assert!(
        read_json(&store, "batch-output", "a/summary.json")
            .await
            .is_some()
    );
    assert_eq!(refusals(&emulator).await, 0);
}

/// Rounds (one manual emulator step, i.e. one second of processing, then one tick) until all
/// of `tags` have a summary.
async fn rounds_to_finish(
    handler: &Handler,
    emulators: &[&Emulator],
    store: &aoai_blob_batch::storage::BlobStore,
    tags: &[String],
) -> u32 {
    for round in 1..=400 {
        for e in emulators {
            e.advance().await;
        }
        let (status, answer) = handler.tick().await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        let mut done = 0;
        for tag in tags {
            if read_json(store, "batch-output", &format!("{tag}/summary.json"))
                .await
                .is_some()
            {
                done += 1;
            }
        }
        if done == tags.len() {
            return round;
        }
    }
    panic!("the backlog did not finish in 400 rounds");
}

/// A backlog whose tokens are 5 × one deployment's quota, processed at a fixed rate: the
/// makespan against the ideal (total tokens / rate), on one target and on two. Emulator
/// time: one manual step is one second.
#[tokio::test]
async fn a_backlog_of_five_quotas_keeps_the_quota_busy() {
    const FILES: usize = 20;
    const RATE: u64 = 500;
    let quota = (FILES as u64 * REQUESTS as u64 * REQUEST_TOKENS) / 5;
    let capacity = Capacity {
        enqueued_token_limit: Some(quota),
        tokens_per_second: Some(RATE),
        ..Capacity::default()
    };
    let ideal = (FILES as u64 * REQUESTS as u64 * REQUEST_TOKENS) / RATE;
    let mut makespans = Vec::new();
    for targets in [1, 2] {
        let azurite = Azurite::start();
        let emulators: Vec<Emulator> = (0..targets)
            .map(|_| Emulator::start_with_capacity(&azurite, capacity, &["--step-ms", "0"]))
            .collect();
        let mut env = handler_env(&azurite, &emulators[0]);
        let pool: Vec<String> = emulators.iter().map(Emulator::endpoint).collect();
        for (k, v) in env.iter_mut() {
            if k == "AZURE_OPENAI_ENDPOINT" {
                *v = pool.join(",");
            }
        }
        let handler = Handler::start(env);
        let store = azurite.store();
        store.ensure_container("batch-output").await.unwrap();
        let tags: Vec<String> = (0..FILES).map(|i| format!("b{i:02}")).collect();
        for tag in &tags {
            upload_input(&store, &format!("{tag}.jsonl"), &quota_file(tag, REQUESTS)).await;
            deliver(&handler, &store, &format!("{tag}.jsonl")).await;
        }
        let refs: Vec<&Emulator> = emulators.iter().collect();
        let rounds = rounds_to_finish(&handler, &refs, &store, &tags).await;
        let mut refused = 0;
        for e in &emulators {
            refused += refusals(e).await;
        }
        println!(
            "FIGURE fleet: {FILES} files, {} tokens = 5 x a {quota}-token quota, {RATE} tokens/s \
             per deployment, {targets} target(s): makespan {rounds} s, ideal {} s ({:.2}x), \
             {refused} refusal(s)",
            FILES as u64 * REQUESTS as u64 * REQUEST_TOKENS,
            ideal / targets,
            rounds as f64 / (ideal / targets) as f64,
        );
        assert_eq!(refused, 0);
        makespans.push(rounds);
    }
    println!(
        "FIGURE fleet: two targets / one target = {:.2}",
        makespans[1] as f64 / makespans[0] as f64
    );
    assert!(makespans[1] < makespans[0], "{makespans:?}");
}

/// `quota_file(tag, REQUESTS)` whose first request starts with 120 characters that the tokenizer
/// cuts finer: the same characters (so the same emulator tokens), ~3% more of our tokens.
fn denser_file(tag: &str) -> Vec<u8> {
    let text = String::from_utf8(quota_file(tag, REQUESTS)).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut first: Value = serde_json::from_str(&lines[0]).unwrap();
    let content = first["body"]["messages"][0]["content"].as_str().unwrap();
    let dense = format!("{}{}", &"y-1 ".repeat(30), &content[..content.len() - 120]);
    first["body"]["messages"][0]["content"] = Value::String(dense);
    lines[0] = first.to_string();
    (lines.join("\n") + "\n").into_bytes()
}

/// Two files that fill a quota exactly by the service's count, the second a little over the
/// room by our estimate: it is tried at the edge, and the service takes it.
#[tokio::test]
async fn a_file_a_little_over_the_room_by_our_estimate_is_tried_and_fits() {
    let azurite = Azurite::start();
    let quota = Capacity {
        enqueued_token_limit: Some(2 * REQUESTS as u64 * REQUEST_TOKENS),
        ..Capacity::default()
    };
    let emulator = Emulator::start_with_capacity(&azurite, quota, &["--step-ms", "0"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let store = azurite.store();
    store.ensure_container("batch-output").await.unwrap();
    upload_input(&store, "a.jsonl", &quota_file("a", REQUESTS)).await;
    deliver(&handler, &store, "a.jsonl").await;
    upload_input(&store, "b.jsonl", &denser_file("b")).await;
    deliver(&handler, &store, "b.jsonl").await;
    assert_eq!(
        inputs_of(&emulator).await,
        ["a.jsonl", "b.jsonl"],
        "b: {}",
        status_json(&store, "b").await
    );
    assert_eq!(refusals(&emulator).await, 0);
}

/// The same, one token short: the service refuses b's edge try. That says only that b did not
/// fit now: b waits in line (no backoff), the known limit stays, and b goes in the tick that
/// harvests a.
#[tokio::test]
async fn a_refused_edge_try_waits_in_line_and_keeps_the_limit() {
    let azurite = Azurite::start();
    let limit = 2 * REQUESTS as u64 * REQUEST_TOKENS - 1;
    let quota = Capacity {
        enqueued_token_limit: Some(limit),
        ..Capacity::default()
    };
    let emulator = Emulator::start_with_capacity(&azurite, quota, &["--step-ms", "0"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let store = azurite.store();
    store.ensure_container("batch-output").await.unwrap();
    upload_input(&store, "a.jsonl", &quota_file("a", REQUESTS)).await;
    deliver(&handler, &store, "a.jsonl").await;
    upload_input(&store, "b.jsonl", &denser_file("b")).await;
    deliver(&handler, &store, "b.jsonl").await;
    assert_eq!(refusals(&emulator).await, 1, "b was tried");
    let b = status_json(&store, "b").await;
    assert_eq!(b["status"], "queued", "{b}");
    assert!(b["next_attempt_at"].is_null(), "no backoff: {b}");
    let ledgers = list_ledgers(&store).await;
    assert_eq!(ledgers.len(), 1);
    assert_eq!(ledgers[0]["limit"], limit, "{}", ledgers[0]);
    // Ticks while a runs try b no more.
    handler.tick().await;
    assert_eq!(refusals(&emulator).await, 1);

    let a_id = emulator.batches().await[0].id.clone();
    for _ in 0..20 {
        if emulator.step(Some(&a_id), 1).await[0].status.is_terminal() {
            break;
        }
    }
    let (status, answer) = handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    assert_eq!(inputs_of(&emulator).await, ["a.jsonl", "b.jsonl"]);
    assert_eq!(refusals(&emulator).await, 1);
}

/// Our tokens a ledger holds: the settled rooms, less those given back since, and the rooms
/// still listed one by one.
fn held_by(ledger: &Value) -> u64 {
    let given_back: u64 = ledger["released"]
        .as_object()
        .map(|m| {
            m.values()
                .filter(|r| r["counted"] == true)
                .map(|r| r["tokens"].as_u64().unwrap())
                .sum()
        })
        .unwrap_or(0);
    let listed: u64 = ledger["reservations"]
        .as_object()
        .unwrap()
        .values()
        .map(|r| r["tokens"].as_u64().unwrap())
        .sum();
    ledger["settled"].as_u64().unwrap() - given_back + listed
}

#[tokio::test]
async fn the_ledger_counts_running_jobs_without_listing_them() {
    // The ledger is rewritten by every admission: with thousands of batches running it must
    // not list each of them. A tick counts what the running jobs hold from its listing of
    // active/, and admission stays as exact as before.
    let (_azurite, emulator, handler, store) = small_quota_stack().await;
    for tag in ["a", "b", "c"] {
        upload_input(&store, &format!("{tag}.jsonl"), &quota_file(tag, REQUESTS)).await;
        deliver(&handler, &store, &format!("{tag}.jsonl")).await;
    }
    assert_eq!(inputs_of(&emulator).await, ["a.jsonl", "b.jsonl"]);
    let ledger = list_ledgers(&store).await.remove(0);
    // Just admitted: listed one by one (a and b, files of the same size).
    assert_eq!(
        ledger["reservations"].as_object().unwrap().len(),
        2,
        "{ledger:#}"
    );
    let file_tokens = held_by(&ledger) / 2;

    let (status, answer) = handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let ledger = list_ledgers(&store).await.remove(0);
    assert_eq!(
        ledger["reservations"].as_object().unwrap().len(),
        0,
        "the running jobs are counted, not listed: {ledger:#}"
    );
    assert_eq!(
        ledger["settled"].as_u64().unwrap(),
        2 * file_tokens,
        "{ledger:#}"
    );
    assert_eq!(inputs_of(&emulator).await.len(), 2, "c still waits");

    // a ends; the tick that harvests it gives its settled room back and admits c in it.
    end_batch_of(&emulator, "a.jsonl").await;
    let (status, answer) = handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    assert_eq!(
        inputs_of(&emulator).await,
        ["a.jsonl", "b.jsonl", "c.jsonl"],
        "{:?}",
        answer.logs
    );
    let ledger = list_ledgers(&store).await.remove(0);
    assert_eq!(held_by(&ledger), 2 * file_tokens, "b and c: {ledger:#}");
    // d finds no room: nothing was counted twice or lost on the way.
    upload_input(&store, "d.jsonl", &quota_file("d", REQUESTS)).await;
    deliver(&handler, &store, "d.jsonl").await;
    assert_eq!(status_json(&store, "d").await["status"], "queued");
    let (status, answer) = handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let ledger = list_ledgers(&store).await.remove(0);
    assert_eq!(held_by(&ledger), 2 * file_tokens, "{ledger:#}");
    assert_eq!(
        ledger["reservations"].as_object().unwrap().len(),
        0,
        "{ledger:#}"
    );
    assert_eq!(inputs_of(&emulator).await.len(), 3, "d waits");
    assert_eq!(refusals(&emulator).await, 0);
}

async fn list_ledgers(store: &aoai_blob_batch::storage::BlobStore) -> Vec<Value> {
    use futures::TryStreamExt;
    let names: Vec<String> = store
        .list("batch-jobs", "capacity/")
        .map_ok(|b| b.name)
        .try_collect()
        .await
        .unwrap();
    let mut out = Vec::new();
    for n in names {
        out.push(read_json(store, "batch-jobs", &n).await.unwrap());
    }
    out
}

/// Steps the batch of input `name` until it has ended at the service; returns its id.
async fn end_batch_of(emulator: &Emulator, name: &str) -> String {
    let id = batch_for(emulator, name).await.id;
    for _ in 0..20 {
        if emulator.step(Some(&id), 1).await[0].status.is_terminal() {
            break;
        }
    }
    id
}
