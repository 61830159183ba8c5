//! The handler against the service's behaviours that the happy path never shows: a list in
//! an order it does not expect, through the real handler, Azurite and the batch emulator.

mod support;

use std::time::Duration;

use aoai_blob_batch::{openai::CreateBatch, submit::CLOCK_SKEW_SECS};
use support::*;

fn seed() -> Vec<u8> {
    std::fs::read(root().join("samples/test.jsonl")).unwrap()
}

/// More than a page of the list (100 at most): the batch to adopt is never on the first.
const OLDER_BATCHES: usize = 101;

/// A crash between create and record, with `OLDER_BATCHES` batches of the same deployment
/// (other inputs) made before it and an emulator that lists oldest first: the retry must
/// find the batch the crash left, not create a second one. `api_version`: `None` for the
/// default (classic, dated), or `v1`.
async fn a_crash_after_create_adopts_among_older_batches(api_version: Option<&str>) {
    let azurite = Azurite::start();
    let emulator = Emulator::start(
        &azurite,
        &["--step-ms", "60000", "--list-order", "oldest-first"],
    );
    let store = azurite.store();
    let client = emulator.client();
    let mut others = Vec::new();
    for i in 0..4 {
        others.push(
            upload_input(&store, &format!("older/{i}.jsonl"), &seed())
                .await
                .0,
        );
    }
    for i in 0..OLDER_BATCHES {
        let request = CreateBatch {
            endpoint: "/chat/completions".into(),
            input_blob: others[i % others.len()].clone(),
            output_folder_url: store.container_url("batch-output"),
        };
        client
            .create(&request, Duration::from_secs(30))
            .await
            .expect("an older batch");
    }
    // The service stamps `created_at` in whole seconds: the next second starts the window.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let (url, etag) = upload_input(&store, "test.jsonl", &seed()).await;
    let payload = trigger_payload(blob_created_event(&url, &etag, 10));
    let mut env = handler_env(&azurite, &emulator);
    env.push(("BATCH_CREATE_TIMEOUT_SECONDS".into(), "2".into()));
    if let Some(v) = api_version {
        env.push(("AZURE_OPENAI_API_VERSION".into(), v.into()));
    }
    let mut faulty = env.clone();
    faulty.push(("BATCH_TEST_FAULT".into(), "submit:after-create".into()));
    let mut crashing = Handler::start(faulty);
    // The adoption window reaches CLOCK_SKEW_SECS before the create. With the crashing
    // handler's clock that far ahead, the window starts at the real time of its create: the
    // batches above (a second older) fall outside it, as yesterday's would, while the one the
    // crash leaves falls inside.
    advance_clock(&crashing, CLOCK_SKEW_SECS).await;
    post_to_dying(&crashing, "/function-trigger", &payload).await;
    assert!(
        crashing.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "fault point not reached"
    );
    let for_input = |batches: Vec<aoai_blob_batch::openai::Batch>| -> Vec<String> {
        batches
            .into_iter()
            .filter(|b| b.input_blob.as_deref() == Some(url.as_str()))
            .map(|b| b.id)
            .collect()
    };
    let made = for_input(emulator.batches().await);
    assert_eq!(made.len(), 1, "the create went through before the crash");

    let handler = Handler::start(env);
    // The dead claim's lease and create window (2 s each) lapse.
    advance_clock(&handler, CLOCK_SKEW_SECS + 3).await;
    let (status, answer) = handler.invoke("function-trigger", &payload).await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let all = emulator.batches().await;
    assert_eq!(all.len(), OLDER_BATCHES + 1, "no second batch");
    assert_eq!(for_input(all), made, "{:?}", answer.logs);
    let logs = answer.logs.join("\n");
    assert!(logs.contains("adopted"), "{logs}");
    let key = format!("test.jsonl@{}", etag.trim_matches('"'));
    let rec = read_json(&store, "batch-jobs", &format!("active/{key}.json"))
        .await
        .unwrap();
    assert_eq!(rec["state"], "running", "{rec}");
    assert_eq!(rec["batch_id"], made[0].as_str());
}

#[tokio::test]
async fn adoption_asks_a_dated_version_for_the_window_and_order() {
    a_crash_after_create_adopts_among_older_batches(None).await;
}

#[tokio::test]
async fn adoption_on_v1_walks_the_whole_list_in_any_order() {
    a_crash_after_create_adopts_among_older_batches(Some("v1")).await;
}

fn job_key_of(name: &str, etag: &str) -> String {
    format!("{name}@{}", etag.trim_matches('"'))
}

/// The job's active record; when it has none, the test fails showing the job's summary.
async fn record(store: &aoai_blob_batch::storage::BlobStore, key: &str) -> serde_json::Value {
    if let Some(rec) = read_json(store, "batch-jobs", &format!("active/{key}.json")).await {
        return rec;
    }
    let path = key.split(".jsonl@").next().unwrap();
    let summary = read_json(store, "batch-output", &format!("{path}/summary.json")).await;
    panic!(
        "job {key} is no longer active; summary: {}",
        summary.map_or("none".into(), |s| json_line(&s))
    )
}

/// The summary fields that tell what happened.
fn json_line(summary: &serde_json::Value) -> String {
    format!("status={} errors={}", summary["status"], summary["errors"])
}

/// Azure's gateway answers 404 `Resource not found` to every call for a retired or wrong
/// api-version: for two ticks mid-run here. Nothing about any batch follows from it: the
/// jobs stay as they were, the tick says so once, and they complete once it answers again.
#[tokio::test]
async fn a_gateway_404_for_two_ticks_mid_run_fails_no_job() {
    let s = Stack::start(&["--step-ms", "0"], &[]);
    let store = s.azurite.store();
    let mut keys = Vec::new();
    for name in ["gw-a.jsonl", "gw-b.jsonl"] {
        keys.push(job_key_of(name, &s.submit(name, &seed()).await.etag));
    }
    s.emulator.advance().await;
    let (status, answer) = s.handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);

    s.emulator.set_gateway_404(true).await;
    for round in 1..=2 {
        // The batches go on meanwhile, as Azure's do.
        s.emulator.advance().await;
        let (status, answer) = s.handler.tick().await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        for key in &keys {
            let rec = record(&store, key).await;
            assert_eq!(rec["state"], "running", "tick {round}: {rec}");
        }
        for path in ["gw-a", "gw-b"] {
            let summary = read_json(&store, "batch-output", &format!("{path}/summary.json")).await;
            assert!(summary.is_none(), "tick {round}: {summary:?}");
        }
        let loud: Vec<&String> = answer
            .logs
            .iter()
            .filter(|l| l.contains("Resource not found"))
            .collect();
        assert_eq!(loud.len(), 1, "once per tick: {:?}", answer.logs);
        assert!(
            loud[0].contains("CONFIGURATION") && loud[0].contains("2 step(s)"),
            "{loud:?}"
        );
    }

    s.emulator.set_gateway_404(false).await;
    for path in ["gw-a", "gw-b"] {
        let summary = s.harvest(path, Duration::from_secs(60)).await;
        assert_eq!(summary["status"], "completed", "{summary}");
    }
}

/// A batch the service itself says it does not know (its own 404, `not_found`): the job
/// fails only once it has said so on three looks in a row over ten minutes.
#[tokio::test]
async fn a_batch_the_service_denies_fails_the_job_only_when_it_keeps_saying_so() {
    let s = Stack::start(&["--step-ms", "0"], &[]);
    let store = s.azurite.store();
    let key = job_key_of("gone.jsonl", &s.submit("gone.jsonl", &seed()).await.etag);
    // The record names a batch the emulator never made.
    let mut rec = record(&store, &key).await;
    rec["batch_id"] = "batch_00000000-0000-0000-0000-000000000000".into();
    store
        .write(
            "batch-jobs",
            &format!("active/{key}.json"),
            bytes::Bytes::from(rec.to_string()),
            aoai_blob_batch::storage::WriteCondition::Always,
            "application/json",
        )
        .await
        .unwrap();

    for look in 1..=2u64 {
        let (status, answer) = s.handler.tick().await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        let rec = record(&store, &key).await;
        assert_eq!(rec["state"], "running", "look {look}: {rec}");
        assert_eq!(rec["batch_missing_looks"], look, "{rec}");
        let logs = answer.logs.join("\n");
        assert!(logs.contains("does not know this batch"), "{logs}");
        advance_clock(&s.handler, 300).await;
    }
    let (status, answer) = s.handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let summary = read_json(&store, "batch-output", "gone/summary.json")
        .await
        .unwrap_or_else(|| panic!("failed at the third look: {:?}", answer.logs));
    assert_eq!(summary["status"], "failed", "{summary}");
    assert_eq!(summary["errors"][0]["code"], "batch_not_found", "{summary}");
}

/// `n` chat lines of the seed's format.
fn lines(n: usize, prefix: &str) -> Vec<u8> {
    chat_lines(n, prefix, "question number")
}

/// Outside the fail-fast regions the service takes a create over the enqueued-token quota
/// and fails the batch in validation with `token_limit_exceeded` in `errors.data`. That
/// job waits in `queued` like a refused create, is resubmitted once there is room, and
/// completes, with one summary: the completed one. The quota is held by another user of the
/// deployment (a second handler with its own state), which the capacity model cannot see:
/// a refusal it did not predict.
#[tokio::test]
async fn a_quota_refusal_as_a_failed_batch_queues_the_job_until_there_is_room() {
    // Room for one of these files at a time. Manual steps: the first batch holds the quota
    // while the second is validated.
    let s = Stack::start(
        &[
            "--step-ms",
            "0",
            "--enqueued-token-limit",
            "3000",
            "--quota-refusal",
            "failed-batch",
        ],
        &[],
    );
    let store = s.azurite.store();
    let mut env = handler_env(&s.azurite, &s.emulator);
    env.push(("BATCH_STATE_CONTAINER".into(), "other-user-jobs".into()));
    let other = Handler::start(env);
    let (url, etag) = upload_input(&store, "room-a.jsonl", &lines(20, "a")).await;
    let (status, answer) = other
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, &etag, 10)),
        )
        .await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let b = s.submit("room-b.jsonl", &lines(20, "b")).await;
    let b_key = job_key_of("room-b.jsonl", &b.etag);
    assert_eq!(s.emulator.batches().await.len(), 2, "both creates taken");

    // One step validates both: the first fits, the second fails for quota.
    s.emulator.advance().await;
    let (status, answer) = s.handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let rec = record(&store, &b_key).await;
    assert_eq!(rec["state"], "queued", "{rec}");
    assert_eq!(rec["quota_attempts"], 1, "{rec}");
    let failed: Vec<_> = s
        .emulator
        .batches()
        .await
        .into_iter()
        .filter(|b| b.status == aoai_blob_batch::openai::BatchStatus::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(
        failed[0].error_codes().collect::<Vec<_>>(),
        ["token_limit_exceeded"]
    );

    // The other user's batch runs its course, and frees the room.
    let mut sa = None;
    for _ in 0..60 {
        s.emulator.advance().await;
        other.tick().await;
        sa = read_json(&store, "batch-output", "room-a/summary.json").await;
        if sa.is_some() {
            break;
        }
    }
    let sa = sa.expect("room-a finished");
    assert_eq!(sa["status"], "completed", "{sa}");
    let sb = s.harvest("room-b", Duration::from_secs(60)).await;
    assert_eq!(sb["status"], "completed", "{sb}");
    assert_eq!(sb["request_counts"]["completed"], 20, "{sb}");
    assert_ne!(sb["batch_id"], failed[0].id.as_str(), "{sb}");
    assert!(
        sb["errors"].as_array().is_none_or(|e| e.is_empty()),
        "the quota refusal is not the job's outcome: {sb}"
    );
    let outputs = blob_names(&store, "batch-output", "room-b/").await;
    assert_eq!(
        outputs
            .iter()
            .filter(|n| n.ends_with("summary.json"))
            .count(),
        1,
        "{outputs:?}"
    );
    let merged = read_text(&store, "batch-output", "room-b/merged.jsonl")
        .await
        .unwrap();
    assert_eq!(merged.lines().count(), 20);
}
