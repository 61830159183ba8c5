//! The emulator's capacity model (issue 15, item 6), through its API with real Azurite: the
//! enqueued-token quota held by unfinished batches and released when they end, the quota
//! headers on every create answer, both refusal styles, and the processing rate a
//! deployment's running batches share. Time is counted in manual steps (one step is one
//! second of processing), so "twice as long" is a count, not a wall-clock measure.

mod support;

use std::time::{Duration, Instant};

use aoai_blob_batch::openai::{Batch, BatchStatus};
use aoai_stack::{Capacity, CreateAnswer};
use support::*;

struct Stack {
    _azurite: Azurite,
    emulator: Emulator,
    store: aoai_blob_batch::storage::BlobStore,
}

async fn stack(capacity: Capacity, extra: &[&str]) -> Stack {
    let azurite = Azurite::start();
    let emulator = Emulator::start_with_capacity(&azurite, capacity, extra);
    let store = azurite.store();
    store.ensure_container("batch-output").await.unwrap();
    Stack {
        _azurite: azurite,
        emulator,
        store,
    }
}

impl Stack {
    /// Uploads `quota_file(tag, n)` and asks the emulator to create its batch.
    async fn create(&self, tag: &str, n: usize) -> CreateAnswer {
        let (url, _) =
            upload_input(&self.store, &format!("{tag}.jsonl"), &quota_file(tag, n)).await;
        self.emulator
            .create_raw(&url, &self.store.container_url("batch-output"))
            .await
    }

    /// Steps every active batch until `id` is terminal; at most `max` rounds.
    async fn run_to_end(&self, id: &str, max: usize) -> Batch {
        for _ in 0..max {
            let b = self.emulator.step(Some(id), 1).await.remove(0);
            if b.status.is_terminal() {
                return b;
            }
        }
        panic!("{id} not finished after {max} steps");
    }
}

fn id(answer: &CreateAnswer) -> String {
    assert_eq!(answer.status, 201, "{}", answer.body);
    answer.body["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn create_answers_carry_the_quota_headers_and_tokens_are_released_when_a_batch_ends() {
    // Room for 2 files of 5 requests (1,000 tokens each), not 3.
    let limit = 2_500;
    let s = stack(
        Capacity {
            enqueued_token_limit: Some(limit),
            ..Capacity::default()
        },
        &["--step-ms", "0"],
    )
    .await;
    let per_file = 5 * REQUEST_TOKENS;

    let a = s.create("a", 5).await;
    assert_eq!(
        (a.enqueued_tokens, a.maximum_enqueued_tokens),
        (Some(per_file), Some(limit))
    );
    let b = s.create("b", 5).await;
    assert_eq!(b.enqueued_tokens, Some(2 * per_file), "a's tokens and b's");
    let refused = s.create("c", 5).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "token_limit_exceeded");
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("limit of {limit}")), "{message}");

    // A completed batch gives its tokens back.
    let done = s.run_to_end(&id(&a), 20).await;
    assert_eq!(done.status, BatchStatus::Completed);
    let c = s.create("c", 5).await;
    assert_eq!(
        c.enqueued_tokens,
        Some(2 * per_file),
        "b's and c's, not a's"
    );

    // So does a cancelled one.
    s.emulator
        .client()
        .cancel(&id(&b))
        .await
        .expect("the cancel is accepted");
    assert_eq!(
        s.run_to_end(&id(&b), 5).await.status,
        BatchStatus::Cancelled
    );
    let d = s.create("d", 5).await;
    assert_eq!(d.enqueued_tokens, Some(2 * per_file), "c's and d's");
}

#[tokio::test]
async fn without_a_limit_the_headers_give_the_documented_default_quota() {
    let s = stack(Capacity::default(), &["--step-ms", "0"]).await;
    let a = s.create("a", 3).await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.enqueued_tokens, Some(3 * REQUEST_TOKENS));
    assert_eq!(a.maximum_enqueued_tokens, Some(200_000_000));
}

#[tokio::test]
async fn a_failed_batch_refusal_keeps_the_same_accounting() {
    let limit = 3_000;
    let s = stack(
        Capacity {
            enqueued_token_limit: Some(limit),
            failed_batch_refusal: true,
            ..Capacity::default()
        },
        &["--step-ms", "0"],
    )
    .await;
    // Both creates are accepted; only the validation step checks the quota.
    let a = id(&s.create("a", 10).await);
    let b = s.create("b", 10).await;
    assert_eq!(b.maximum_enqueued_tokens, Some(limit));
    let b = id(&b);
    let a_now = s.emulator.step(Some(&a), 1).await.remove(0);
    assert_eq!(a_now.status, BatchStatus::InProgress);
    let b_now = s.run_to_end(&b, 3).await;
    assert_eq!(b_now.status, BatchStatus::Failed);
    let codes: Vec<_> = b_now.error_codes().collect();
    assert_eq!(codes, ["token_limit_exceeded"]);

    // Once a ends, a third file is admitted at its validation step.
    assert_eq!(s.run_to_end(&a, 20).await.status, BatchStatus::Completed);
    let c = id(&s.create("c", 10).await);
    let c_now = s.emulator.step(Some(&c), 1).await.remove(0);
    assert_eq!(c_now.status, BatchStatus::InProgress, "{:?}", c_now.errors);
}

/// Steps every active batch, one step each per round, until all of `ids` are terminal;
/// returns, for each, how many rounds it spent `in_progress` (processing time in seconds).
async fn rounds_in_progress(s: &Stack, ids: &[String]) -> Vec<u32> {
    let mut rounds = vec![0; ids.len()];
    for _ in 0..100 {
        let mut before = Vec::new();
        for id in ids {
            before.push(s.emulator.client().retrieve(id).await.unwrap().status);
        }
        if before.iter().all(BatchStatus::is_terminal) {
            return rounds;
        }
        for (k, st) in before.iter().enumerate() {
            if *st == BatchStatus::InProgress {
                rounds[k] += 1;
            }
        }
        s.emulator.step(None, 1).await;
    }
    panic!("batches not finished after 100 rounds");
}

#[tokio::test]
async fn running_batches_share_the_deployment_rate() {
    // 10 requests of 200 tokens at 400 tokens/s: 5 s alone.
    let s = stack(
        Capacity {
            tokens_per_second: Some(400),
            ..Capacity::default()
        },
        &["--step-ms", "0"],
    )
    .await;
    let alone = id(&s.create("alone", 10).await);
    let alone_rounds = rounds_in_progress(&s, std::slice::from_ref(&alone)).await;
    assert_eq!(alone_rounds, [5], "2,000 tokens at 400 tokens/s");

    let together = vec![
        id(&s.create("one", 10).await),
        id(&s.create("two", 10).await),
    ];
    let together_rounds = rounds_in_progress(&s, &together).await;
    for r in &together_rounds {
        assert!(
            (9..=10).contains(r),
            "two batches sharing the rate each take about twice as long as one: {together_rounds:?} vs {alone_rounds:?}"
        );
    }
    // Every request was answered, none lost to the pacing.
    for id in together.iter().chain([&alone]) {
        let b = s.emulator.client().retrieve(id).await.unwrap();
        assert_eq!(b.status, BatchStatus::Completed);
        assert_eq!(
            (b.request_counts.total, b.request_counts.completed),
            (10, 10)
        );
    }
}

#[tokio::test]
async fn with_steps_by_time_a_batch_takes_at_least_its_tokens_over_the_rate() {
    // 2,000 tokens at 2,000 tokens/s, stepped every 50 ms: never sooner than a second in
    // progress (a lower bound, which a slow machine cannot break), and it does finish. Timed
    // from before its start (the last look that found it not started, or the create) to after
    // its end: polls that a busy machine runs late make that longer, never shorter. (From
    // the first look that found it running, a late look made it shorter than it was.)
    let s = stack(
        Capacity {
            tokens_per_second: Some(2_000),
            ..Capacity::default()
        },
        &["--step-ms", "50"],
    )
    .await;
    let mut not_started = Instant::now();
    let id = id(&s.create("timed", 10).await);
    let client = s.emulator.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let asked = Instant::now();
        let b = client.retrieve(&id).await.unwrap();
        if b.status == BatchStatus::Validating {
            not_started = asked;
        }
        if b.status.is_terminal() {
            assert_eq!(b.status, BatchStatus::Completed);
            assert_eq!(b.request_counts.completed, 10);
            break;
        }
        assert!(Instant::now() < deadline, "not finished in 60 s: {b:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = not_started.elapsed();
    assert!(took >= Duration::from_millis(900), "{took:?}");
}

/// The handler's own estimate of `quota_file(tag, n)`: each request is 3 framing tokens, "user",
/// the content and 3 for the reply's priming, by o200k_base (the deployment name
/// [`DEPLOYMENT`] names no family, so the current families' encoding).
fn handler_estimate(tag: &str, n: usize) -> u64 {
    let report = aoai_blob_batch::validate::validate_reader(
        &quota_file(tag, n)[..],
        aoai_blob_batch::validate::Limits::default(),
    )
    .unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
    report.tokens
}

#[tokio::test]
async fn summary_json_reports_the_estimated_tokens_of_the_input() {
    let s = support::Stack::start(&["--step-ms", "0"], &[]);
    s.submit("estimate.jsonl", &quota_file("e", 4)).await;
    let summary = s.harvest("estimate", Duration::from_secs(60)).await;
    assert_eq!(summary["status"], "completed", "{summary:#}");
    let estimated = summary["tokens"]["estimated"]
        .as_u64()
        .expect("tokens.estimated");
    assert_eq!(estimated, handler_estimate("e", 4), "{summary:#}");
    // The tokenizer's figure, not the service's character estimate (200 per request here).
    assert_ne!(estimated, 4 * REQUEST_TOKENS);
    assert!(estimated > 4 * 50, "{estimated}");
    // The Contract's fields are all still there.
    for key in [
        "status",
        "batch_id",
        "input_blob",
        "request_counts",
        "problems",
    ] {
        assert!(summary.get(key).is_some(), "{key} missing: {summary:#}");
    }
}

#[test]
fn handler_validate_prints_the_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.jsonl");
    std::fs::write(&path, quota_file("v", 3)).unwrap();
    let out = std::process::Command::new(&Bins::local().handler)
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let expected = format!(
        "OK: 3 requests, url /chat/completions, model {DEPLOYMENT}, {} estimated input tokens (o200k_base)",
        handler_estimate("v", 3)
    );
    assert_eq!(stdout.lines().last(), Some(expected.as_str()), "{stdout}");
}
