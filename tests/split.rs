//! Inputs beyond one batch's limits: split into parts, one batch each, combined into the one
//! results folder a small input gets. Real Azurite, the batch emulator and the handler.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

fn input(n: usize, special: &[(usize, &str)]) -> Vec<u8> {
    let mut out = String::new();
    for i in 1..=n {
        let question = special
            .iter()
            .find(|(line, _)| *line == i)
            .map_or(format!("question {i}"), |(_, q)| q.to_string());
        out.push_str(&chat_line(&format!("req-{i}"), &question));
        out.push('\n');
    }
    out.into_bytes()
}

impl Stack {
    async fn lines_of(&self, container: &str, name: &str) -> Vec<Value> {
        read_text(&self.azurite.store(), container, name)
            .await
            .unwrap_or_else(|| panic!("{container}/{name} exists"))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn names(&self, container: &str, prefix: &str) -> Vec<String> {
        blob_names(&self.azurite.store(), container, prefix).await
    }

    /// Nothing staged and no job left active: a finished split leaves nothing behind.
    async fn assert_clean(&self) {
        assert_eq!(
            self.names("batch-jobs", "staging/").await,
            Vec::<String>::new()
        );
        assert_eq!(
            self.names("batch-jobs", "active/").await,
            Vec::<String>::new()
        );
    }
}

#[tokio::test]
async fn a_95_line_input_in_10_line_parts_tells_each_parts_fate() {
    let s = Stack::start(
        &[
            "--step-ms",
            "100",
            "--lines-per-step",
            "3",
            "--fail-input-containing",
            "PLEASE-FAIL",
            "--expire-input-containing",
            "PLEASE-EXPIRE",
        ],
        &[
            ("BATCH_SPLIT_MAX_REQUESTS", "10"),
            ("BATCH_RESUBMIT_EXPIRED", "false"),
        ],
    );
    // Part 4 (lines 31–40) fails; part 8 (lines 71–80) expires part-way.
    let body = input(95, &[(35, "PLEASE-FAIL"), (72, "PLEASE-EXPIRE")]);
    let logs = s.submit("big/set.jsonl", &body).await.logs;
    assert!(
        logs.iter().any(|l| l.contains("split into 10 parts")),
        "{logs:#?}"
    );

    let summary = s.harvest("big/set", Duration::from_secs(120)).await;
    assert_eq!(
        summary["status"], "failed",
        "the gravest part's end: {summary:#}"
    );
    let parts = summary["parts"].as_array().expect("a part table");
    assert_eq!(parts.len(), 10);
    for (i, p) in parts.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(p["part"], n);
        assert_eq!(p["first_line"], (n - 1) * 10 + 1);
        assert_eq!(p["last_line"], (n * 10).min(95));
        assert!(
            p["batch_id"]
                .as_str()
                .is_some_and(|b| b.starts_with("batch_")),
            "{p}"
        );
        let expected = match n {
            4 => "failed",
            8 => "expired",
            _ => "completed",
        };
        assert_eq!(p["status"], expected, "part {n}: {p}");
    }
    assert_eq!(parts[3]["errors"][0]["code"], "emulated_failure");
    assert_eq!(parts[3]["lines_without_result"], 10);
    let expired_left = parts[7]["lines_without_result"].as_u64().unwrap();
    assert!(
        (1..10).contains(&expired_left),
        "partial results: {}",
        parts[7]
    );
    let notes = summary["notes"].to_string();
    assert!(
        notes.contains("partly finished: 8 of 10 parts completed"),
        "{notes}"
    );
    assert!(
        notes.contains("part 4 (lines 31–40) failed (emulated_failure)"),
        "{notes}"
    );
    assert!(notes.contains("part 8 (lines 71–80) expired"), "{notes}");

    // One merged line per input line, in input order, with the input's line numbers.
    let merged = s.lines_of("batch-output", "big/set/merged.jsonl").await;
    assert_eq!(merged.len(), 95);
    let mut answered = 0;
    for (i, m) in merged.iter().enumerate() {
        let line = i as u64 + 1;
        assert_eq!(m["line"], line, "{m}");
        assert_eq!(m["custom_id"], format!("req-{line}"));
        match line {
            31..=40 => assert_eq!(m["error"]["code"], "no_result", "{m}"),
            71..=80 => {}
            _ => assert_eq!(m["status_code"], 200, "{m}"),
        }
        if m["status_code"] == 200 {
            answered += 1;
        }
    }
    assert_eq!(answered, 95 - 10 - expired_left);
    assert_eq!(summary["request_counts"]["total"], 95);
    assert_eq!(summary["request_counts"]["completed"], answered);
    assert_eq!(summary["lines_without_result"], 10 + expired_left);
    let results = s.lines_of("batch-output", "big/set/results.jsonl").await;
    assert_eq!(results.len() as u64, answered);

    assert_eq!(s.emulator.batches().await.len(), 10, "one batch per part");
    s.assert_clean().await;
}

#[tokio::test]
async fn parts_are_submitted_as_quota_allows() {
    // About one 10-line part fits in the quota at a time. Manual steps: the first part still
    // holds the quota when the others are submitted.
    let s = Stack::start(
        &["--step-ms", "0", "--enqueued-token-limit", "1500"],
        &[("BATCH_SPLIT_MAX_REQUESTS", "10")],
    );
    let logs = s.submit("quota.jsonl", &input(30, &[])).await.logs;
    assert!(
        logs.iter().any(|l| l.contains("split into 3 parts")),
        "{logs:#?}"
    );
    let summary = s.harvest("quota", Duration::from_secs(120)).await;
    assert_eq!(summary["status"], "completed", "{summary:#}");
    assert_eq!(summary["request_counts"]["completed"], 30);
    let merged = s.lines_of("batch-output", "quota/merged.jsonl").await;
    let ids: Vec<_> = merged.iter().map(|m| m["custom_id"].clone()).collect();
    let expected: Vec<Value> = (1..=30).map(|i| format!("req-{i}").into()).collect();
    assert_eq!(ids, expected);
    // Each part ran once: waiting for quota never made a second batch.
    assert_eq!(s.emulator.batches().await.len(), 3);
    let history = s.names("batch-jobs", "done/").await;
    let mut waited = false;
    for name in &history {
        let rec = read_json(&s.azurite.store(), "batch-jobs", name)
            .await
            .unwrap();
        // Admitted only where it fits: a part waits for room, it is not refused.
        assert_eq!(rec["quota_attempts"].as_u64().unwrap_or(0), 0, "{rec}");
        waited |= rec["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["note"].as_str().unwrap().starts_with("waiting for room"));
    }
    assert!(waited, "some part waited for room: {history:?}");
    s.assert_clean().await;
}

#[tokio::test]
async fn a_250k_line_input_becomes_3_batches_and_one_merged_file() {
    let s = Stack::start(&["--step-ms", "50"], &[]);
    let n = 250_000;
    let mut body = String::with_capacity(n * 140);
    for i in 1..=n {
        body.push_str(&format!(
            "{{\"custom_id\":\"r{i}\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{{\"model\":\"{DEPLOYMENT}\",\"messages\":[{{\"role\":\"user\",\"content\":\"q{i}\"}}]}}}}\n"
        ));
    }
    let logs = s.submit("huge.jsonl", body.as_bytes()).await.logs;
    drop(body);
    assert!(
        logs.iter().any(|l| l.contains("split into 3 parts")),
        "{logs:#?}"
    );
    let summary = s.harvest("huge", Duration::from_secs(600)).await;
    assert_eq!(summary["status"], "completed", "{}", summary["notes"]);
    assert_eq!(summary["request_counts"]["total"], n);
    assert_eq!(summary["request_counts"]["completed"], n);
    let requests: Vec<_> = summary["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_u64().unwrap())
        .collect();
    assert_eq!(requests, vec![100_000, 100_000, 50_000]);

    let text = read_text(&s.azurite.store(), "batch-output", "huge/merged.jsonl")
        .await
        .unwrap();
    let mut count = 0;
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["custom_id"], format!("r{}", i + 1));
        assert_eq!(v["line"], i + 1);
        assert_eq!(v["status_code"], 200);
        count += 1;
    }
    assert_eq!(count, n);
    assert_eq!(s.emulator.batches().await.len(), 3);
    s.assert_clean().await;
}

#[tokio::test]
async fn a_crash_at_every_split_step_still_gives_one_batch_per_part() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "50"]);
    let store = azurite.store();
    let mut env = handler_env(&azurite, &emulator);
    env.push(("BATCH_SPLIT_MAX_REQUESTS".into(), "10".into()));
    // A crash before the create can have been sent: no need to wait out the default 120 s.
    env.push(("BATCH_CREATE_TIMEOUT_SECONDS".into(), "5".into()));
    let healthy = Handler::start(env.clone());
    let points: Vec<&str> = aoai_blob_batch::app::FAULT_POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("split:"))
        .collect();
    assert!(points.len() >= 4, "{points:?}");
    let mut inputs = Vec::new();
    let started = std::time::Instant::now();
    for point in &points {
        let name = format!("crash-{}.jsonl", point.replace(':', "-"));
        let body = input(25, &[]);
        let (url, etag) = upload_input(&store, &name, &body).await;
        let event = trigger_payload(blob_created_event(&url, &etag, body.len() as u64));
        let mut faulty_env = env.clone();
        faulty_env.push(("BATCH_TEST_FAULT".into(), point.to_string()));
        let mut faulty = Handler::start(faulty_env);
        if point.ends_with("stage") || point.ends_with("record") {
            post_to_dying(&faulty, "/function-trigger", &event).await;
        } else {
            // The combine points: the healthy handler submits, the faulty one ticks until the
            // parts have ended and it dies combining them.
            let (status, answer) = healthy.invoke("function-trigger", &event).await;
            assert_eq!(status, 200, "{:?}", answer.logs);
            for _ in 0..100 {
                post_to_dying(&faulty, "/function-timer", &timer_payload()).await;
                if faulty.proc.wait_exit(Duration::from_millis(200)).is_some() {
                    break;
                }
            }
        }
        let exit = faulty.proc.wait_exit(Duration::from_secs(20));
        assert!(
            exit.is_some_and(|s| !s.success())
                && faulty.proc.logs().contains(&format!("step=\"{point}\"")),
            "{point}: the handler did not abort there; logs:\n{}",
            faulty.proc.logs()
        );
        inputs.push((name, event));
    }
    // Event Grid redelivers; the timer ticks until every input has its summary.
    for (_, event) in &inputs {
        let (status, answer) = healthy.invoke("function-trigger", event).await;
        assert_eq!(status, 200, "{:?}", answer.logs);
    }
    for (name, _) in &inputs {
        let path = name.trim_end_matches(".jsonl");
        let summary = eventually(Duration::from_secs(120), path, || async {
            healthy.tick().await;
            read_json(&store, "batch-output", &format!("{path}/summary.json")).await
        })
        .await;
        assert_eq!(summary["status"], "completed", "{name}: {summary:#}");
        assert_eq!(summary["parts"].as_array().unwrap().len(), 3, "{name}");
        let merged = read_text(&store, "batch-output", &format!("{path}/merged.jsonl"))
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
        let expected: Vec<String> = (1..=25).map(|i| format!("req-{i}")).collect();
        assert_eq!(ids, expected, "{name}");
    }
    // A summary can be out before its job is filed: the handler that died after writing it
    // still holds the job until its 2 s lease lapses, then the next tick finishes it.
    advance_clock(&healthy, 3).await;
    healthy.tick().await;
    assert_eq!(
        emulator.batches().await.len(),
        3 * inputs.len(),
        "one batch per part, none twice"
    );
    let leftovers = blob_names(&store, "batch-jobs", "staging/").await;
    assert_eq!(leftovers, Vec::<String>::new());
    let active = blob_names(&store, "batch-jobs", "active/").await;
    assert_eq!(active, Vec::<String>::new());
    println!(
        "FIGURE split-crash: {} inputs of 25 lines in 10-line parts, the handler aborted at \
         each of {points:?} -> {} batches (expected {}), every merged.jsonl whole and in order, \
         0 staged blobs and 0 active records left; {} s",
        inputs.len(),
        emulator.batches().await.len(),
        3 * inputs.len(),
        started.elapsed().as_secs()
    );
}

#[tokio::test]
async fn a_part_that_never_runs_keeps_its_lines_in_merged() {
    // Part 2 holds one request too large for the quota: it is refused until the job gives
    // it up; parts 1 and 3 run.
    let s = Stack::start(
        &["--step-ms", "100", "--enqueued-token-limit", "1500"],
        &[
            ("BATCH_SPLIT_MAX_REQUESTS", "10"),
            ("BATCH_QUEUE_MAX_ATTEMPTS", "2"),
        ],
    );
    let huge = "many words ".repeat(1000);
    s.submit("never.jsonl", &input(30, &[(15, huge.as_str())]))
        .await;
    let summary = s.harvest("never", Duration::from_secs(120)).await;
    assert_eq!(summary["status"], "failed", "{summary:#}");
    let part2 = &summary["parts"][1];
    assert_eq!(part2["status"], "failed", "{part2}");
    assert_eq!(
        part2["errors"][0]["code"], "token_limit_exceeded",
        "{part2}"
    );
    assert_eq!(part2["lines_without_result"], 10);
    assert_eq!(summary["parts"][0]["status"], "completed");
    assert_eq!(summary["parts"][2]["status"], "completed");
    assert_eq!(summary["request_counts"]["total"], 30);
    assert_eq!(summary["request_counts"]["completed"], 20);
    assert_eq!(summary["lines_without_result"], 10);
    let merged = s.lines_of("batch-output", "never/merged.jsonl").await;
    assert_eq!(merged.len(), 30);
    for (i, m) in merged.iter().enumerate() {
        let line = i as u64 + 1;
        assert_eq!(m["line"], line);
        assert_eq!(m["custom_id"], format!("req-{line}"));
        if (11..=20).contains(&line) {
            assert_eq!(m["error"]["code"], "no_result", "{m}");
        } else {
            assert_eq!(m["status_code"], 200, "{m}");
        }
    }
    assert_eq!(
        s.emulator.batches().await.len(),
        2,
        "the refused part made no batch"
    );
    s.assert_clean().await;
}

#[tokio::test]
async fn parts_staged_before_a_crash_are_removed_when_the_limits_changed() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "50"]);
    let store = azurite.store();
    let env = handler_env(&azurite, &emulator);
    let body = input(25, &[]);
    let (url, etag) = upload_input(&store, "relimited.jsonl", &body).await;
    let event = trigger_payload(blob_created_event(&url, &etag, body.len() as u64));

    let mut faulty_env = env.clone();
    faulty_env.push(("BATCH_SPLIT_MAX_REQUESTS".into(), "10".into()));
    faulty_env.push(("BATCH_TEST_FAULT".into(), "split:after-stage".into()));
    let mut faulty = Handler::start(faulty_env);
    post_to_dying(&faulty, "/function-trigger", &event).await;
    assert!(faulty.proc.wait_exit(Duration::from_secs(20)).is_some());
    let staged = blob_names(&store, "batch-jobs", "staging/").await;
    assert_eq!(staged.len(), 3, "{staged:?}");

    // Redeployed with the default limits: the file is one batch, and the parts go.
    let healthy = Handler::start(env);
    advance_clock(&healthy, 3).await; // past the dead holder's 2 s lease
    let (status, answer) = healthy.invoke("function-trigger", &event).await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let summary = eventually(Duration::from_secs(60), "summary", || async {
        healthy.tick().await;
        read_json(&store, "batch-output", "relimited/summary.json").await
    })
    .await;
    assert_eq!(summary["status"], "completed", "{summary:#}");
    assert!(summary.get("parts").is_none(), "{summary:#}");
    assert_eq!(emulator.batches().await.len(), 1);
    let staged = blob_names(&store, "batch-jobs", "staging/").await;
    assert_eq!(staged, Vec::<String>::new());
}
