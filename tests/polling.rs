//! A timer tick at scale: running batches learnt from the service's list (100 a page), not
//! retrieved one by one; job records read only when something changed (their index rides in
//! the record blob's metadata). Real Azurite, the batch emulator (manual mode: nothing moves
//! until the test steps it) and the real handler; the emulator counts the calls it gets.

mod support;

use std::{collections::HashMap, time::Duration};

use aoai_blob_batch::{openai::CreateBatch, storage::WriteCondition};
use futures::TryStreamExt;
use serde_json::Value;
use support::*;

/// The numbers the tick's summary line reports (`key=value` after the `;`).
fn tick_figures(logs: &[String]) -> HashMap<String, u64> {
    let line = logs
        .iter()
        .find(|l| l.contains("tick done in"))
        .unwrap_or_else(|| panic!("no tick line in {logs:?}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim_end_matches(',').parse().ok()?)))
        .collect()
}

fn calls(c: &Value, op: &str) -> u64 {
    c[op]
        .as_u64()
        .unwrap_or_else(|| panic!("no {op} count in {c}"))
}

async fn tick(s: &Stack) -> HashMap<String, u64> {
    let (status, answer) = s.handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    tick_figures(&answer.logs)
}

/// The active records' ETags: a record rewritten gets a new one.
async fn record_etags(s: &Stack) -> HashMap<String, String> {
    let items: Vec<_> = s
        .azurite
        .store()
        .list("batch-jobs", "active/")
        .try_collect()
        .await
        .unwrap();
    items.into_iter().map(|b| (b.name, b.etag)).collect()
}

async fn submit_many(s: &Stack, n: usize) {
    for i in 0..n {
        let body = format!("{}\n", chat_line(&format!("q{i}"), "hello"));
        s.submit(&format!("many/f{i:02}.jsonl"), body.as_bytes())
            .await;
    }
}

async fn run_to_completion(s: &Stack, n: usize) {
    for _ in 0..10 {
        s.emulator.step(None, 1).await;
        tick(s).await;
    }
    for i in 0..n {
        let summary = read_json(
            &s.azurite.store(),
            "batch-output",
            &format!("many/f{i:02}/summary.json"),
        )
        .await
        .unwrap_or_else(|| panic!("no summary for f{i:02}"));
        assert_eq!(summary["status"], "completed", "{summary}");
    }
    assert!(record_etags(s).await.is_empty(), "every job finished");
}

async fn polled_from_the_list(api_version: &str) {
    let s = Stack::start(
        &["--step-ms", "0"],
        &[("AZURE_OPENAI_API_VERSION", api_version)],
    );
    let n = 30;
    submit_many(&s, n).await;
    let before = s.emulator.calls().await;
    let etags = record_etags(&s).await;
    assert_eq!(etags.len(), n);

    // Nothing moved: one list call tells all 30 batches, and no record is read or written.
    let f = tick(&s).await;
    let after = s.emulator.calls().await;
    assert_eq!(f["running"], n as u64, "{f:?}");
    assert_eq!(f["list_pages"], 1, "{f:?}");
    assert_eq!(f["retrieved"], 0, "{f:?}");
    assert_eq!(f["records_read"], 0, "{f:?}");
    assert_eq!(calls(&after, "list") - calls(&before, "list"), 1, "{after}");
    assert_eq!(
        calls(&after, "retrieve"),
        calls(&before, "retrieve"),
        "{after}"
    );
    assert_eq!(record_etags(&s).await, etags, "no record was rewritten");

    // Every batch moved on: each record is read and written once, still from one list call.
    s.emulator.step(None, 1).await;
    let f = tick(&s).await;
    let after2 = s.emulator.calls().await;
    assert_eq!(f["records_read"], n as u64, "{f:?}");
    assert_eq!(f["retrieved"], 0, "{f:?}");
    assert_eq!(
        calls(&after2, "list") - calls(&after, "list"),
        1,
        "{after2}"
    );
    assert_eq!(calls(&after2, "retrieve"), calls(&before, "retrieve"));
    let rewritten = record_etags(&s).await;
    assert!(
        rewritten.iter().all(|(name, etag)| etags[name] != *etag),
        "every record took the new status"
    );

    run_to_completion(&s, n).await;
}

#[tokio::test]
async fn a_tick_learns_running_batches_from_the_list_on_a_dated_version() {
    polled_from_the_list("2025-04-01-preview").await;
}

#[tokio::test]
async fn a_tick_learns_running_batches_from_the_list_on_v1() {
    polled_from_the_list("v1").await;
}

#[tokio::test]
async fn batches_the_list_walk_does_not_reach_are_retrieved_one_by_one() {
    let s = Stack::start(&["--step-ms", "0"], &[]);
    // 150 batches that are not ours, created just before ours: the walk (oldest first from
    // shortly before our jobs, one page for five jobs) sees only those.
    let store = s.azurite.store();
    let (url, _) = upload_input(
        &store,
        "elsewhere/other.jsonl",
        format!("{}\n", chat_line("x", "hi")).as_bytes(),
    )
    .await;
    let client = s.emulator.client();
    for _ in 0..150 {
        client
            .create(
                &CreateBatch {
                    endpoint: "/chat/completions".into(),
                    input_blob: url.clone(),
                    output_folder_url: store.container_url("batch-output"),
                },
                Duration::from_secs(30),
            )
            .await
            .expect("a foreign batch");
    }
    // Ours stay apart from the foreign ones' input: only the five are jobs.
    store
        .delete("batch-input", "elsewhere/other.jsonl", None)
        .await
        .unwrap();
    let n = 5;
    submit_many(&s, n).await;

    let before = s.emulator.calls().await;
    let f = tick(&s).await;
    let after = s.emulator.calls().await;
    assert_eq!(f["list_pages"], 1, "{f:?}");
    assert_eq!(f["retrieved"], n as u64, "{f:?}");
    assert_eq!(calls(&after, "list") - calls(&before, "list"), 1);
    assert_eq!(
        calls(&after, "retrieve") - calls(&before, "retrieve"),
        n as u64
    );
    assert_eq!(f["records_read"], 0, "{f:?}");

    run_to_completion(&s, n).await;
}

#[tokio::test]
async fn a_record_without_an_index_is_read_and_polled_as_before() {
    let s = Stack::start(&["--step-ms", "0"], &[]);
    submit_many(&s, 2).await;
    // Rewrite one record as an earlier version wrote it: the same JSON, no metadata.
    let store = s.azurite.store();
    let name = record_etags(&s).await.into_keys().next().unwrap();
    let (bytes, etag) = store.read("batch-jobs", &name).await.unwrap().unwrap();
    store
        .write(
            "batch-jobs",
            &name,
            bytes,
            WriteCondition::IfMatch(etag),
            "application/json",
        )
        .await
        .unwrap();

    let f = tick(&s).await;
    assert_eq!(f["records_read"], 1, "only the one without an index: {f:?}");
    // Once written again (here: when its batch moves), it carries an index.
    s.emulator.step(None, 1).await;
    let f = tick(&s).await;
    assert_eq!(f["records_read"], 2, "{f:?}");
    let f = tick(&s).await;
    assert_eq!(f["records_read"], 0, "{f:?}");
    run_to_completion(&s, 2).await;
}

/// The timer's sweep looks only at inputs modified since its last pass (with the overlap set
/// to 0 here; 15 minutes in a deployment), so its cost does not grow with the inputs and jobs
/// of the past; a new file and a re-upload of an old one are still taken in.
#[tokio::test]
async fn the_sweep_looks_only_at_inputs_modified_since_its_last_pass() {
    let s = Stack::start(
        &["--step-ms", "0"],
        &[("BATCH_TEST_SWEEP_OVERLAP_SECONDS", "0")],
    );
    let store = s.azurite.store();
    let body = |i: usize| format!("{}\n", chat_line(&format!("q{i}"), "hello")).into_bytes();
    // No events: only the sweep takes these in. Last-Modified has whole seconds, so the last
    // one comes a second later and is alone the newest.
    for i in 0..5 {
        upload_input(&store, &format!("old/f{i}.jsonl"), &body(i)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    upload_input(&store, "old/f5.jsonl", &body(5)).await;

    let f = tick(&s).await;
    assert_eq!(
        f["sweep_looked_at"], 6,
        "the first sweep looks at all: {f:?}"
    );
    for _ in 0..6 {
        s.emulator.step(None, 1).await;
        tick(&s).await;
    }
    assert!(record_etags(&s).await.is_empty(), "all six finished");

    // Only the newest input (Last-Modified at the mark) is looked at again, not the history.
    let f = tick(&s).await;
    assert_eq!(f["sweep_looked_at"], 1, "{f:?}");

    // A new file without its event, and a re-upload of an old one: both taken in.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    upload_input(&store, "new/g.jsonl", &body(7)).await;
    upload_input(&store, "old/f0.jsonl", &body(8)).await;
    let (status, answer) = s.handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let f = tick_figures(&answer.logs);
    assert_eq!(
        f["sweep_looked_at"], 3,
        "f5 at the old mark, g and f0 after it: {f:?}"
    );
    for name in ["new/g.jsonl", "old/f0.jsonl"] {
        assert!(
            answer
                .logs
                .iter()
                .any(|l| l.contains(&format!("blob=batch-input/{name} has no job yet"))),
            "{name} taken in: {:?}",
            answer.logs
        );
    }
    assert_eq!(record_etags(&s).await.len(), 2);
}

/// A proxy in front of Azurite that counts, per container, the blob listings it passes on.
async fn listing_counter(
    upstream: u16,
) -> (
    u16,
    std::sync::Arc<std::sync::Mutex<HashMap<String, usize>>>,
) {
    use axum::{body::Bytes, extract::Request, http::HeaderMap, response::Response};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let counts = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
    let client = reqwest::Client::new();
    let seen = counts.clone();
    let forward = move |req: Request| {
        let client = client.clone();
        let seen = seen.clone();
        async move {
            let (parts, body) = req.into_parts();
            let query = parts.uri.query().unwrap_or_default();
            if query.contains("comp=list") && query.contains("restype=container") {
                // `/devstoreaccount1/{container}`
                let container = parts.uri.path().rsplit('/').next().unwrap_or_default();
                *seen
                    .lock()
                    .unwrap()
                    .entry(container.to_string())
                    .or_default() += 1;
            }
            let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let url = format!("http://127.0.0.1:{upstream}{}", parts.uri);
            let mut headers = HeaderMap::new();
            for (k, v) in &parts.headers {
                if k != "content-length" {
                    headers.append(k, v.clone());
                }
            }
            let resp = client
                .request(parts.method, url)
                .headers(headers)
                .body(body)
                .send()
                .await
                .unwrap();
            let mut out = Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                if k != "content-length" && k != "transfer-encoding" {
                    out = out.header(k, v);
                }
            }
            out.body(axum::body::Body::from(resp.bytes().await.unwrap()))
                .unwrap()
        }
    };
    let app = axum::Router::new().fallback(forward);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, counts)
}

/// A tick lists the input container once, whatever it finds: the sweep and the look for
/// inputs deleted without their event share the listing (with thousands of inputs it is the
/// larger part of a tick's storage time). The deleted input is still found from it.
#[tokio::test]
async fn a_tick_lists_the_input_container_once() {
    let azurite = Azurite::start();
    let store = azurite.store();
    for i in 0..3 {
        let body = format!("{}\n", chat_line(&format!("q{i}"), "hello"));
        upload_input(&store, &format!("once/f{i}.jsonl"), body.as_bytes()).await;
    }
    // Made here, not left to the handler's start (which runs it in the background).
    store.ensure_container("batch-jobs").await.unwrap();
    let (proxy, counts) = listing_counter(azurite.port).await;
    let through_proxy = azurite
        .connection_string()
        .replace(&format!(":{}/", azurite.port), &format!(":{proxy}/"));
    // The emulator too: it takes only output folders in the storage account it writes to,
    // and the handler names them by the proxy's address.
    let emulator = Emulator::launch(
        &Bins::local().emulator,
        &through_proxy,
        &Options::default(),
        |cmd| {
            cmd.args(["--deployment", DEPLOYMENT, "--step-ms", "0"]);
        },
    )
    .unwrap();
    let mut env = handler_env(&azurite, &emulator);
    for (k, v) in env.iter_mut() {
        if k == "BATCH_STORAGE_CONNECTION_STRING" {
            v.clone_from(&through_proxy);
        }
    }
    let handler = Handler::start(env);
    let listings_in_a_tick = async || {
        counts.lock().unwrap().clear();
        let (status, answer) = handler.tick().await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        let n = counts
            .lock()
            .unwrap()
            .get("batch-input")
            .copied()
            .unwrap_or(0);
        (n, answer.logs)
    };

    // The sweep takes the three in; then a tick that only polls them.
    let (n, logs) = listings_in_a_tick().await;
    assert!(
        logs.iter().any(|l| l.contains("3 new input(s), 3 active")),
        "{logs:#?}"
    );
    assert_eq!(n, 1, "the sweep's tick: {logs:#?}");
    let (n, logs) = listings_in_a_tick().await;
    assert_eq!(n, 1, "a polling tick: {logs:#?}");

    // An input deleted without its event: found from that same listing.
    assert!(
        store
            .delete("batch-input", "once/f0.jsonl", None)
            .await
            .unwrap()
    );
    let (n, logs) = listings_in_a_tick().await;
    assert_eq!(n, 1, "{logs:#?}");
    assert!(
        logs.iter()
            .any(|l| l.contains("event=input_deleted") && l.contains("once/f0.jsonl")),
        "{logs:#?}"
    );
}

#[tokio::test]
async fn a_large_input_container_is_swept_a_window_a_tick() {
    // Inputs stay in batch-input after their results are in, so the sweep must not list the
    // whole container every tick: here 3 names a tick (the default is 20,000). Seven inputs
    // that came without events are taken in over a cycle of three ticks; one uploaded into
    // a range already listed is found by the next cycle; a deleted input's job is cancelled
    // by the window that covers its name, and no other job is.
    let s = Stack::start(&["--step-ms", "0"], &[("BATCH_SWEEP_INPUTS_PER_TICK", "3")]);
    let store = s.azurite.store();
    store.ensure_container("batch-input").await.unwrap();
    let body = |tag: &str| format!("{}\n", chat_line(tag, "hello")).into_bytes();
    for i in 1..=7 {
        upload_input(&store, &format!("i{i}.jsonl"), &body(&format!("i{i}"))).await;
    }
    let names = |r: std::ops::RangeInclusive<u32>| -> Vec<String> {
        r.map(|i| format!("i{i}.jsonl")).collect()
    };
    let figures = tick(&s).await;
    assert_eq!(
        inputs_of(&s.emulator).await,
        names(1..=3),
        "the first window"
    );
    assert_eq!(
        (figures["sweep_listed"], figures["sweep_cycle_ended"]),
        (3, 0),
        "what the tick's line tells an operator"
    );
    // Uploaded into the range the cycle has passed: the next cycle finds it.
    upload_input(&store, "i0.jsonl", &body("i0")).await;
    tick(&s).await;
    assert_eq!(
        inputs_of(&s.emulator).await,
        names(1..=6),
        "the second window"
    );
    // i2 is deleted without its event: the first window of the next cycle covers its name.
    assert!(store.delete("batch-input", "i2.jsonl", None).await.unwrap());
    let figures = tick(&s).await;
    assert_eq!(
        inputs_of(&s.emulator).await,
        names(1..=7),
        "the cycle's last window"
    );
    assert_eq!(
        figures["running"], 7,
        "no job cancelled by a window not covering it"
    );
    assert_eq!(
        (figures["sweep_listed"], figures["sweep_cycle_ended"]),
        (1, 1)
    );
    let (status, answer) = s.handler.tick().await;
    assert_eq!(status, 200);
    assert_eq!(
        inputs_of(&s.emulator).await,
        names(0..=7),
        "the next cycle's first window: {:?}",
        answer.logs
    );
    let cancelled: Vec<&String> = answer
        .logs
        .iter()
        .filter(|l| l.contains("event=input_deleted"))
        .collect();
    assert_eq!(cancelled.len(), 1, "{:#?}", answer.logs);
    assert!(cancelled[0].contains("i2.jsonl"), "{cancelled:?}");
    let batches = s.emulator.batches().await;
    use aoai_blob_batch::openai::BatchStatus::{Cancelled, Cancelling};
    let live = batches
        .iter()
        .filter(|b| !b.status.is_terminal() && !matches!(b.status, Cancelling))
        .count();
    assert!(
        batches.iter().any(|b| b
            .input_blob
            .as_deref()
            .is_some_and(|u| u.ends_with("/i2.jsonl"))
            && matches!(b.status, Cancelling | Cancelled)),
        "i2's batch cancelled: {batches:#?}"
    );
    assert_eq!(live, 7, "the seven others run on: {batches:#?}");
}
