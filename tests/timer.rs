//! `function-timer` end to end: inputs submitted, batches polled, results moved into
//! `batch-output/{path}/` with `merged.jsonl` and `summary.json`, for every terminal status.
//! Real Azurite, the batch emulator and the real handler; the test plays the host.

mod support;

use std::time::Duration;

use aoai_blob_batch::openai::BatchStatus;
use futures::TryStreamExt;
use serde_json::Value;
use support::*;

fn stack(emulator_args: &[&str]) -> Stack {
    Stack::start(emulator_args, &[])
}

fn stack_env(emulator_args: &[&str], handler_env: &[(&str, &str)]) -> Stack {
    Stack::start(emulator_args, handler_env)
}

fn lines(n: usize, prefix: &str) -> Vec<u8> {
    chat_lines(n, prefix, "question number")
}

/// The first line of the handler's output that `pred` accepts. The handler writes it before
/// the invocation answers, but this process reads the child's pipes on threads of its own,
/// which a busy machine can run after the answer has been read: the line is waited for.
async fn logged(handler: &Handler, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let logs = handler.proc.logs();
        if let Some(line) = logs.lines().find(|l| pred(l)) {
            return line.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} in the handler's output:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Stack {
    async fn merged(&self, path: &str) -> Vec<Value> {
        read_text(
            &self.azurite.store(),
            "batch-output",
            &format!("{path}/merged.jsonl"),
        )
        .await
        .expect("merged.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
    }

    async fn output_names(&self) -> Vec<String> {
        let items: Vec<_> = self
            .azurite
            .store()
            .list("batch-output", "")
            .try_collect()
            .await
            .unwrap();
        items.into_iter().map(|b| b.name).collect()
    }
}

#[tokio::test]
async fn a_completed_batch_lands_in_place_with_merged_and_summary() {
    let s = stack(&["--step-ms", "50"]);
    let seed = std::fs::read(root().join("samples/test.jsonl")).unwrap();
    let etag = s.submit("test.jsonl", &seed).await.etag;
    let summary = s.harvest("test", Duration::from_secs(30)).await;

    assert_eq!(summary["status"], "completed", "{summary}");
    let batch_id = summary["batch_id"].as_str().unwrap();
    assert!(batch_id.starts_with("batch_"));
    assert_eq!(summary["request_counts"]["total"], 3);
    assert_eq!(summary["request_counts"]["completed"], 3);
    assert_eq!(summary["request_counts"]["failed"], 0);
    assert!(
        summary["input_blob"]
            .as_str()
            .unwrap()
            .ends_with("/batch-input/test.jsonl")
    );
    assert!(
        summary["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert!(summary["problems"].as_array().unwrap().is_empty());

    // Exactly the Contract's files, and the service's GUID folder is gone.
    let mut names = s.output_names().await;
    names.sort();
    assert_eq!(
        names,
        vec![
            "test/merged.jsonl",
            "test/results.jsonl",
            "test/summary.json"
        ]
    );

    let merged = s.merged("test").await;
    let ids: Vec<_> = merged
        .iter()
        .map(|m| m["custom_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["task-0", "task-1", "task-2"], "input order");
    for (i, m) in merged.iter().enumerate() {
        assert_eq!(m["line"], i as u64 + 1);
        assert_eq!(m["status_code"], 200);
        assert_eq!(m["response"]["object"], "chat.completion");
        assert!(m["error"].is_null());
    }
    // results.jsonl is the service's file, moved as is.
    let results = read_text(&s.azurite.store(), "batch-output", "test/results.jsonl")
        .await
        .unwrap();
    assert_eq!(results.lines().count(), 3);

    // The job is finished and filed under done/.
    let key = format!("test.jsonl@{}", etag.trim_matches('"'));
    let store = s.azurite.store();
    assert!(
        read_json(&store, "batch-jobs", &format!("active/{key}.json"))
            .await
            .is_none()
    );
    let done = read_json(&store, "batch-jobs", &format!("done/{key}.json"))
        .await
        .unwrap();
    assert_eq!(done["outcome"], "completed");

    // A later tick or a redelivered event changes nothing.
    s.handler.tick().await;
    assert_eq!(s.emulator.batches().await.len(), 1);
}

#[tokio::test]
async fn failed_lines_go_to_errors_and_merged_keeps_order() {
    let s = stack(&[
        "--step-ms",
        "50",
        "--line-failure-rate",
        "0.3",
        "--seed",
        "7",
    ]);
    s.submit("mixed.jsonl", &lines(40, "m")).await;
    let summary = s.harvest("mixed", Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "completed");
    let failed = summary["request_counts"]["failed"].as_u64().unwrap();
    assert!(failed > 0 && failed < 40, "{summary}");
    let errors = read_text(&s.azurite.store(), "batch-output", "mixed/errors.jsonl")
        .await
        .unwrap();
    assert_eq!(errors.lines().count() as u64, failed);
    let merged = s.merged("mixed").await;
    assert_eq!(merged.len(), 40);
    let mut errs = 0;
    for (i, m) in merged.iter().enumerate() {
        assert_eq!(m["custom_id"], format!("m-{i}"));
        if m["error"].is_null() {
            assert_eq!(m["status_code"], 200);
        } else {
            errs += 1;
            assert!(m["response"].is_null());
        }
    }
    assert_eq!(errs, failed);
}

#[tokio::test]
async fn a_failed_batch_reports_the_service_errors() {
    // The deployment is not in the emulator's list: the service fails the job.
    let s = stack(&["--step-ms", "50"]);
    let body = lines(3, "f");
    let body = String::from_utf8(body)
        .unwrap()
        .replace(DEPLOYMENT, "not-deployed");
    s.submit("failing.jsonl", body.as_bytes()).await;
    let summary = s.harvest("failing", Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "failed", "{summary}");
    let codes: Vec<_> = summary["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].clone())
        .collect();
    assert!(codes.contains(&Value::from("model_not_found")), "{summary}");
    assert!(summary["batch_id"].is_string());
    // The summary and the log say what to do, not only what went wrong.
    let notes = summary["notes"].to_string();
    assert!(
        notes.contains("model_not_found: body.model must be the name of a batch deployment"),
        "{summary}"
    );
    let warned = logged(&s.handler, "service-error line", |l| {
        l.contains("WARN") && l.contains("service errors: model_not_found")
    })
    .await;
    assert!(warned.contains("job=failing.jsonl@"), "{warned}");
    assert!(warned.contains("body.model must be"), "{warned}");
}

#[tokio::test]
async fn a_cancelled_batch_keeps_its_partial_results() {
    // Manual steps: the batch is exactly where the test put it when the cancel comes.
    let s = stack(&["--step-ms", "0", "--lines-per-step", "2"]);
    s.submit("cancel.jsonl", &lines(30, "c")).await;
    let client = s.emulator.client();
    let id = s.emulator.batches().await[0].id.clone();
    // Two steps (in_progress, then two answers), then cancel.
    let stepped = s.emulator.step(Some(&id), 2).await;
    assert_eq!(stepped[0].request_counts.completed, 2, "{stepped:?}");
    client.cancel(&id).await.unwrap();
    let summary = s.harvest("cancel", Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "cancelled", "{summary}");
    let merged = s.merged("cancel").await;
    assert_eq!(merged.len(), 30);
    let answered = merged.iter().filter(|m| m["status_code"] == 200).count();
    assert!(
        answered > 0 && answered < 30,
        "partial results kept: {answered}"
    );
    assert_eq!(answered, 2, "the answers given before the cancel");
    assert_eq!(
        summary["lines_without_result"].as_u64().unwrap() as usize,
        30 - answered
    );
}

#[tokio::test]
async fn an_expired_batch_keeps_its_partial_results() {
    let s = stack_env(
        &["--step-ms", "0", "--lines-per-step", "2"],
        &[("BATCH_RESUBMIT_EXPIRED", "false")],
    );
    s.submit("slow.jsonl", &lines(30, "e")).await;
    // In progress with six answers when the completion window ends.
    let id = s.emulator.batches().await[0].id.clone();
    s.emulator.step(Some(&id), 4).await;
    let expired = s.emulator.expire(&id).await;
    assert_eq!(expired.status, BatchStatus::Expired, "{expired:?}");
    let summary = s.harvest("slow", Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "expired", "{summary}");
    let merged = s.merged("slow").await;
    assert_eq!(merged.len(), 30);
    let answered = merged.iter().filter(|m| m["status_code"] == 200).count();
    assert!(
        answered > 0 && answered < 30,
        "partial results kept: {answered}"
    );
    assert_eq!(answered, 6, "the answers given before the expiry");
    assert_eq!(
        summary["request_counts"]["completed"].as_u64().unwrap() as usize,
        answered
    );
    assert_eq!(
        summary["lines_without_result"].as_u64().unwrap() as usize,
        30 - answered
    );
    assert_eq!(
        s.emulator.batches().await.len(),
        1,
        "no follow-up when switched off"
    );
}

#[tokio::test]
async fn requests_an_expired_batch_left_are_resubmitted_and_folded_in() {
    // The first batch expires after four steps of five lines: its last 10 lines need a
    // follow-up, which then runs to its end.
    let s = stack(&["--step-ms", "0", "--lines-per-step", "5"]);
    s.submit("followup.jsonl", &lines(30, "u")).await;
    let first = s.emulator.batches().await[0].id.clone();
    s.emulator.step(Some(&first), 5).await;
    let expired = s.emulator.expire(&first).await;
    assert_eq!(expired.request_counts.completed, 20, "{expired:?}");
    // The tick that harvests the expired batch submits the follow-up, which holds the quota
    // for the 10 requests it resends, not for the whole file.
    let (status, answer) = s.handler.tick().await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    assert_eq!(s.emulator.batches().await.len(), 2, "{:?}", answer.logs);
    let ledger = aoai_blob_batch::capacity::ledger_name(&s.emulator.endpoint(), DEPLOYMENT);
    let ledger = read_json(&s.azurite.store(), "batch-jobs", &ledger)
        .await
        .expect("the capacity ledger");
    let reservations = ledger["reservations"].as_object().unwrap();
    assert_eq!(reservations.len(), 1, "{ledger:#}");
    let held = reservations.values().next().unwrap()["tokens"]
        .as_u64()
        .unwrap();
    let summary = s.harvest("followup", Duration::from_secs(60)).await;
    let whole = summary["tokens"]["estimated"].as_u64().unwrap();
    assert_eq!(
        held,
        (whole * 10).div_ceil(30),
        "a third of {whole}: {ledger:#}"
    );
    let batches = s.emulator.batches().await;
    assert!(
        batches.len() >= 2,
        "a follow-up batch was created: {batches:?}"
    );
    assert_eq!(
        batches.len(),
        2,
        "one follow-up answers the rest: {batches:?}"
    );
    assert_eq!(
        summary["rounds"].as_array().unwrap().len(),
        batches.len() - 1,
        "{summary}"
    );
    let merged = s.merged("followup").await;
    assert_eq!(merged.len(), 30);
    for (i, m) in merged.iter().enumerate() {
        assert_eq!(m["custom_id"], format!("u-{i}"), "input order");
    }
    let answered = merged.iter().filter(|m| m["status_code"] == 200).count();
    let without = summary["lines_without_result"].as_u64().unwrap() as usize;
    assert_eq!(answered + without, 30, "{summary}");
    assert!(
        answered > 20,
        "the follow-up answered what the first batch left: {answered}"
    );
    assert_eq!(summary["status"], "completed", "{summary}");
    assert_eq!(answered, 30);
    // results.jsonl holds each answered request once, across rounds.
    let results = read_text(&s.azurite.store(), "batch-output", "followup/results.jsonl")
        .await
        .unwrap();
    let mut ids: Vec<String> = results
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), results.lines().count(), "no duplicates");
    assert_eq!(ids.len(), answered);
    // The staged follow-up inputs are gone, and nothing else is left in the output container.
    let staged: Vec<_> = s
        .azurite
        .store()
        .list("batch-jobs", "staging/")
        .try_collect()
        .await
        .unwrap();
    assert!(staged.is_empty(), "{staged:?}");
    let names = s.output_names().await;
    assert!(
        names.iter().all(|n| n.starts_with("followup/")),
        "{names:?}"
    );
}

#[tokio::test]
async fn a_file_nobody_announced_is_found_by_the_sweep() {
    let s = stack(&["--step-ms", "50"]);
    let store = s.azurite.store();
    upload_input(&store, "quiet/file.jsonl", &lines(2, "q")).await;
    upload_input(&store, "quiet/notes.txt", b"not a batch").await;
    let summary = s.harvest("quiet/file", Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "completed");
    assert_eq!(s.emulator.batches().await.len(), 1);
    // The file that is not an input is not taken in, and the log says so.
    logged(&s.handler, "line about quiet/notes.txt", |l| {
        l.contains("WARN")
            && l.contains("1 blob(s) in batch-input are not submitted")
            && l.contains("quiet/notes.txt")
    })
    .await;
}

#[tokio::test]
async fn over_quota_inputs_wait_and_then_complete() {
    // Room for one of these files at a time in the emulator's enqueued-token quota. Manual
    // steps: the first batch still holds the quota when the second file comes.
    let s = stack(&["--step-ms", "0", "--enqueued-token-limit", "3000"]);
    let a = lines(20, "a");
    let b = lines(20, "b");
    s.submit("quota-a.jsonl", &a).await;
    s.submit("quota-b.jsonl", &b).await;
    let store = s.azurite.store();
    let queued = read_json(
        &store,
        "batch-jobs",
        &format!(
            "active/quota-b.jsonl@{}.json",
            store
                .properties("batch-input", "quota-b.jsonl")
                .await
                .unwrap()
                .unwrap()
                .etag
                .trim_matches('"')
        ),
    )
    .await
    .expect("second job waits in the queue");
    assert_eq!(queued["state"], "queued", "{queued}");
    let sa = s.harvest("quota-a", Duration::from_secs(30)).await;
    assert_eq!(sa["status"], "completed");
    let sb = s.harvest("quota-b", Duration::from_secs(60)).await;
    assert_eq!(sb["status"], "completed", "{sb}");
    assert_eq!(s.emulator.batches().await.len(), 2);
}

#[tokio::test]
async fn merged_has_one_line_per_input_line_for_100k_lines() {
    let s = stack(&["--step-ms", "20"]);
    let mut body = String::with_capacity(100_000 * 120);
    for i in 0..100_000 {
        body.push_str(&format!(
            "{{\"custom_id\":\"r{i}\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{{\"model\":\"{DEPLOYMENT}\",\"messages\":[{{\"role\":\"user\",\"content\":\"q{i}\"}}]}}}}\n"
        ));
    }
    s.submit("big.jsonl", body.as_bytes()).await;
    let summary = s.harvest("big", Duration::from_secs(300)).await;
    assert_eq!(summary["status"], "completed", "{summary}");
    assert_eq!(summary["request_counts"]["total"], 100_000);
    let text = read_text(&s.azurite.store(), "batch-output", "big/merged.jsonl")
        .await
        .unwrap();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["custom_id"], format!("r{i}"));
        assert_eq!(v["status_code"], 200);
        n += 1;
    }
    assert_eq!(n, 100_000);
}
