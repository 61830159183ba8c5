//! Visibility and control (issue 16): `batch-output/{path}/status.json` while a file runs,
//! `handler status`, and stopping a file with `handler cancel` or by deleting it.
//! Real Azurite, the batch emulator in manual step mode (`--step-ms 0`: a batch moves only
//! when the test steps it) and the real handler; the test plays the Functions host.
//!
//! Run alone: `cargo test --test visibility`.

mod support;

use std::{
    process::{Command, Output},
    time::Duration,
};

use aoai_blob_batch::openai::BatchStatus;
use serde_json::{Value, json};
use support::*;

fn lines(n: usize, prefix: &str) -> Vec<u8> {
    chat_lines(n, prefix, "question")
}

/// The documented BlobDeleted event (Event Grid schema): it names the blob, with no ETag.
fn blob_deleted_event(url: &str) -> Value {
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    let mut parts = path.splitn(4, '/').skip(2);
    let container = parts.next().unwrap_or_default();
    let name = parts.next().unwrap_or_default();
    json!({
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/devstoreaccount1",
        "subject": format!("/blobServices/default/containers/{container}/blobs/{name}"),
        "eventType": "Microsoft.Storage.BlobDeleted",
        "eventTime": "2026-11-28T08:10:00.0000000Z",
        "id": uuid::Uuid::new_v4().to_string(),
        "data": {
            "api": "DeleteBlob",
            "requestId": uuid::Uuid::new_v4().to_string(),
            "contentType": "application/jsonl",
            "blobType": "BlockBlob",
            "url": url,
            "sequencer": "0000000000000000000000000000A2D4000000000009a9de",
            "storageDiagnostics": { "batchId": uuid::Uuid::new_v4().to_string() }
        },
        "dataVersion": "",
        "metadataVersion": "1"
    })
}

impl Stack {
    async fn status_json(&self, path: &str) -> Option<Value> {
        read_json(
            &self.azurite.store(),
            "batch-output",
            &format!("{path}/status.json"),
        )
        .await
    }

    /// The ETag of `status.json`: it changes only when the file is written again.
    async fn status_etag(&self, path: &str) -> Option<String> {
        self.azurite
            .store()
            .properties("batch-output", &format!("{path}/status.json"))
            .await
            .unwrap()
            .map(|b| b.etag)
    }

    async fn tick_ok(&self) -> Vec<String> {
        let (status, answer) = self.handler.tick().await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        answer.logs
    }

    /// Deletes `batch-input/{name}` and, when `event`, delivers its BlobDeleted event.
    async fn delete_input(&self, name: &str, event: bool) -> Vec<String> {
        let store = self.azurite.store();
        assert!(store.delete("batch-input", name, None).await.unwrap());
        if !event {
            return Vec::new();
        }
        let url = store.blob_url("batch-input", name);
        let (status, answer) = self
            .handler
            .invoke(
                "function-trigger",
                &trigger_payload(blob_deleted_event(&url)),
            )
            .await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        answer.logs
    }

    /// Runs `handler ARGS` with the function app's settings, as an operator would.
    fn command(&self, args: &[&str]) -> Output {
        Command::new(&Bins::local().handler)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.handler.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("the handler runs")
    }

    async fn output_names(&self, prefix: &str) -> Vec<String> {
        blob_names(&self.azurite.store(), "batch-output", prefix).await
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn status_json_follows_a_file_from_intake_to_its_summary() {
    let s = Stack::start(&["--step-ms", "0", "--lines-per-step", "2"], &[]);
    s.submit("watch/me.jsonl", &lines(10, "w")).await;
    let id = s.emulator.batches().await[0].id.clone();

    // Right after intake: the batch exists and the file says so.
    let st = s
        .status_json("watch/me")
        .await
        .expect("status.json at intake");
    assert_eq!(st["status"], "running", "{st:#}");
    assert_eq!(st["batch_id"], id.as_str());
    assert_eq!(st["batch_status"], "validating");
    assert!(
        st["waiting_for"]
            .as_str()
            .unwrap()
            .contains("validate the input")
    );
    assert!(
        st["input_blob"]
            .as_str()
            .unwrap()
            .ends_with("/batch-input/watch/me.jsonl")
    );
    assert!(st["uploaded_at"].as_i64().unwrap() > 0);
    assert!(st["submitted_at"].as_i64().unwrap() >= st["uploaded_at"].as_i64().unwrap());
    let estimated = st["estimated_tokens"].as_u64().expect("estimated_tokens");
    assert!(estimated > 10, "ten requests' tokens: {st:#}");
    assert!(s.read_summary("watch/me").await.is_none());

    // A tick that learns nothing new does not rewrite it.
    let etag = s.status_etag("watch/me").await.unwrap();
    s.tick_ok().await;
    assert_eq!(
        s.status_etag("watch/me").await.unwrap(),
        etag,
        "unchanged: not rewritten"
    );

    // The service starts (and reports the total), then answers two: each is news.
    s.emulator.step(Some(&id), 1).await;
    s.tick_ok().await;
    let st = s.status_json("watch/me").await.unwrap();
    assert_eq!(st["batch_status"], "in_progress", "{st:#}");
    assert_eq!(st["request_counts"]["total"], 10);
    assert_eq!(st["request_counts"]["completed"], 0);
    assert!(
        st.get("estimated_finish_at").is_none(),
        "no progress, no estimate: {st:#}"
    );
    s.emulator.step(Some(&id), 1).await;
    s.tick_ok().await;
    let st = s.status_json("watch/me").await.unwrap();
    assert_eq!(st["request_counts"]["completed"], 2, "{st:#}");
    assert!(
        st["waiting_for"].as_str().unwrap().contains("2 of 10 done"),
        "{st:#}"
    );
    assert!(
        st["estimated_finish_at"].as_i64().unwrap() >= st["updated_at"].as_i64().unwrap(),
        "an estimate once the service has made progress: {st:#}"
    );
    let etag = s.status_etag("watch/me").await.unwrap();
    s.tick_ok().await;
    assert_eq!(s.status_etag("watch/me").await.unwrap(), etag);

    // Once summary.json is there, status.json is gone: one or the other, never both.
    let summary = s.harvest("watch/me", Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "completed");
    assert_eq!(
        summary["tokens"]["estimated"], estimated,
        "the estimate status.json showed is the summary's"
    );
    assert!(
        s.status_json("watch/me").await.is_none(),
        "status.json deleted"
    );
    let mut names = s.output_names("watch/").await;
    names.sort();
    assert_eq!(
        names,
        [
            "watch/me/merged.jsonl",
            "watch/me/results.jsonl",
            "watch/me/summary.json"
        ]
    );
}

impl Stack {
    async fn read_summary(&self, path: &str) -> Option<Value> {
        read_json(
            &self.azurite.store(),
            "batch-output",
            &format!("{path}/summary.json"),
        )
        .await
    }
}

#[tokio::test]
async fn a_rejected_file_leaves_a_summary_and_no_status() {
    let s = Stack::start(&["--step-ms", "0"], &[]);
    s.submit("bad.jsonl", b"{not json\n").await;
    let summary = s
        .read_summary("bad")
        .await
        .expect("summary within the intake");
    assert_eq!(summary["status"], "rejected");
    assert!(s.status_json("bad").await.is_none(), "status.json deleted");
}

#[tokio::test]
async fn a_split_file_shows_every_part_with_its_batch_and_counts() {
    let s = Stack::start(
        &["--step-ms", "0", "--lines-per-step", "3"],
        &[("BATCH_SPLIT_MAX_REQUESTS", "10")],
    );
    s.submit("big.jsonl", &lines(25, "b")).await;
    let st = s
        .status_json("big")
        .await
        .expect("status.json of the split file");
    assert_eq!(st["status"], "split", "{st:#}");
    let parts = st["batches"].as_array().unwrap();
    assert_eq!(parts.len(), 3, "{st:#}");
    let batches = s.emulator.batches().await;
    assert_eq!(batches.len(), 3, "every part submitted");
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p["part"], i as u64 + 1);
        assert!(p["batch_id"].is_string(), "{st:#}");
        assert_eq!(p["state"], "running", "{st:#}");
    }
    assert_eq!(
        (
            parts[0]["first_line"].clone(),
            parts[2]["last_line"].clone()
        ),
        (json!(1), json!(25))
    );
    assert!(st["batch_id"].is_null());
    assert!(
        st["waiting_for"]
            .as_str()
            .unwrap()
            .contains("its 3 parts: 3 running"),
        "{st:#}"
    );

    // Two steps (in progress, three answered each): the parts' counts show, and their sum.
    // The parts are polled in the same tick as their parent's file is written, so the file
    // follows them within one more tick.
    s.emulator.step(None, 2).await;
    s.tick_ok().await;
    s.tick_ok().await;
    let st = s.status_json("big").await.unwrap();
    // A tick that learns nothing new does not rewrite it, though it reads every part.
    let etag = s.status_etag("big").await.unwrap();
    s.tick_ok().await;
    assert_eq!(
        s.status_etag("big").await.unwrap(),
        etag,
        "unchanged: not rewritten"
    );
    for p in st["batches"].as_array().unwrap() {
        assert_eq!(p["batch_status"], "in_progress", "{st:#}");
        assert_eq!(p["request_counts"]["completed"], 3, "{st:#}");
    }
    assert_eq!(st["request_counts"]["total"], 25, "{st:#}");
    assert_eq!(st["request_counts"]["completed"], 9, "{st:#}");

    let summary = s.harvest("big", Duration::from_secs(60)).await;
    assert_eq!(summary["status"], "completed", "{summary:#}");
    assert!(s.status_json("big").await.is_none(), "status.json deleted");
}

#[tokio::test]
async fn handler_status_lists_the_most_recently_finished_files_first() {
    let s = Stack::start(&["--step-ms", "0"], &[]);
    for name in ["first", "second", "third"] {
        s.submit(&format!("{name}.jsonl"), &lines(2, name)).await;
        s.harvest(name, Duration::from_secs(30)).await;
        // Storage dates a record to the second: one apart, the order is unambiguous.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let out = s.command(&["status", "--finished", "2", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let files: Vec<&str> = doc["finished"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["third.jsonl", "second.jsonl"], "{doc:#}");
}

#[tokio::test]
async fn handler_status_shows_queued_running_and_finished_files() {
    // Room for one 20-line file at a time in the quota (as in tests/timer.rs).
    let s = Stack::start(&["--step-ms", "0", "--enqueued-token-limit", "3000"], &[]);
    s.submit("done.jsonl", &lines(2, "d")).await;
    assert_eq!(
        s.harvest("done", Duration::from_secs(30)).await["status"],
        "completed"
    );
    s.submit("runs.jsonl", &lines(20, "r")).await;
    s.submit("waits.jsonl", &lines(20, "q")).await;
    let st = s
        .status_json("waits")
        .await
        .expect("a queued file has a status");
    assert_eq!(st["status"], "queued", "{st:#}");
    assert!(
        st["waiting_for"]
            .as_str()
            .unwrap()
            .contains("room in the enqueued-token quota: 1st in line"),
        "{st:#}"
    );
    let running = s.emulator.batches().await[0].id.clone();
    s.emulator.step(Some(&running), 1).await;
    s.tick_ok().await;

    let out = s.command(&["status"]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "{table}\n{}", text(&out.stderr));
    println!("{table}");
    let row = |file: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{file} ")))
            .unwrap_or_else(|| panic!("no row for {file}:\n{table}"))
            .to_string()
    };
    let header = table.lines().next().unwrap();
    for col in ["FILE", "STATUS", "PROGRESS", "AGE", "BATCH", "WAITING FOR"] {
        assert!(header.contains(col), "{header}");
    }
    let r = row("runs.jsonl");
    assert!(
        r.contains(" running ") && r.contains(&running) && r.contains("0/20"),
        "{r}"
    );
    let w = row("waits.jsonl");
    assert!(
        w.contains(" queued ") && w.contains("enqueued-token quota"),
        "{w}"
    );
    let d = row("done.jsonl");
    assert!(d.contains(" completed ") && d.contains("2/2"), "{d}");
    assert!(
        table.find("runs.jsonl").unwrap() < table.find("-- recently finished --").unwrap()
            && table.find("-- recently finished --").unwrap() < table.find("done.jsonl").unwrap(),
        "running files first, then the finished: {table}"
    );

    let out = s.command(&["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let active = doc["active"].as_array().unwrap();
    let by_file = |f: &str| active.iter().find(|a| a["file"] == f).cloned().unwrap();
    assert_eq!(active.len(), 2, "{doc:#}");
    assert_eq!(by_file("runs.jsonl")["status"], "running");
    assert_eq!(by_file("runs.jsonl")["batch_id"], running.as_str());
    assert_eq!(by_file("runs.jsonl")["request_counts"]["total"], 20);
    assert_eq!(by_file("waits.jsonl")["status"], "queued");
    // It waits for room, not for a timer: no next attempt time.
    assert!(by_file("waits.jsonl")["next_attempt_at"].is_null());
    assert!(by_file("waits.jsonl")["age_seconds"].is_i64());
    let finished = doc["finished"].as_array().unwrap();
    assert_eq!(finished.len(), 1, "{doc:#}");
    assert_eq!(finished[0]["file"], "done.jsonl");
    assert_eq!(finished[0]["status"], "completed");

    // One file, by name.
    let out = s.command(&["status", "waits.jsonl", "--json"]);
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["active"].as_array().unwrap().len(), 1, "{doc:#}");
    assert_eq!(doc["finished"].as_array().unwrap().len(), 0, "{doc:#}");
    // A file with no job says so.
    let out = s.command(&["status", "nothing-here.jsonl"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no job for nothing-here.jsonl"));
}

/// 30 lines, two answered, then stopped by `stop`; returns the summary once harvested.
async fn cancelled_after_two_answers(
    s: &Stack,
    name: &str,
    stop: impl AsyncFnOnce(&Stack),
) -> Value {
    let path = name.strip_suffix(".jsonl").unwrap();
    s.submit(name, &lines(30, "c")).await;
    let id = s.emulator.batches().await[0].id.clone();
    let stepped = s.emulator.step(Some(&id), 2).await;
    assert_eq!(stepped[0].request_counts.completed, 2, "{stepped:?}");
    stop(s).await;
    let summary = s.harvest(path, Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "cancelled", "{summary:#}");
    let batch = s
        .emulator
        .batches()
        .await
        .into_iter()
        .find(|b| b.id == id)
        .unwrap();
    assert_eq!(
        batch.status,
        BatchStatus::Cancelled,
        "the service stopped it"
    );
    assert_eq!(s.emulator.batches().await.len(), 1, "nothing resubmitted");
    // What the service finished is kept, and there is one summary and no status.
    let results = read_text(
        &s.azurite.store(),
        "batch-output",
        &format!("{path}/results.jsonl"),
    )
    .await
    .expect("the partial results");
    assert_eq!(results.lines().count(), 2);
    assert!(s.status_json(path).await.is_none());
    let summaries: Vec<_> = s
        .output_names("")
        .await
        .into_iter()
        .filter(|n| n.ends_with("summary.json"))
        .collect();
    assert_eq!(summaries, [format!("{path}/summary.json")]);
    summary
}

#[tokio::test]
async fn handler_cancel_stops_the_batch_and_keeps_what_it_finished() {
    let s = Stack::start(&["--step-ms", "0", "--lines-per-step", "2"], &[]);
    let summary = cancelled_after_two_answers(&s, "stop/me.jsonl", async |s: &Stack| {
        let out = s.command(&["cancel", "stop/me.jsonl"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let said = text(&out.stdout);
        assert!(
            said.contains("stop/me.jsonl: cancel sent for batch(es) batch_"),
            "{said}"
        );
        // The status file says so at once.
        let st = s.status_json("stop/me").await.unwrap();
        assert_eq!(st["cancel_requested_by"], "command", "{st:#}");
        // A second request changes nothing and says so.
        let again = s.command(&["cancel", "stop/me.jsonl"]);
        assert!(again.status.success());
        assert!(text(&again.stdout).contains("cancel already requested"));
    })
    .await;
    assert_eq!(summary["cancelled_by"], "command", "{summary:#}");
    let merged = read_text(&s.azurite.store(), "batch-output", "stop/me/merged.jsonl")
        .await
        .unwrap();
    let answered = merged
        .lines()
        .filter(|l| l.contains("\"status_code\":200"))
        .count();
    assert_eq!((merged.lines().count(), answered), (30, 2));
    assert_eq!(summary["lines_without_result"], 28);
}

#[tokio::test]
async fn deleting_the_input_cancels_its_job_through_the_event() {
    let s = Stack::start(&["--step-ms", "0", "--lines-per-step", "2"], &[]);
    let summary = cancelled_after_two_answers(&s, "gone.jsonl", async |s: &Stack| {
        let logs = s.delete_input("gone.jsonl", true).await;
        assert!(
            logs.iter()
                .any(|l| l.contains("event=input_deleted") && l.contains("cancel sent")),
            "{logs:#?}"
        );
    })
    .await;
    assert_eq!(summary["cancelled_by"], "input deleted", "{summary:#}");
}

#[tokio::test]
async fn deleting_the_input_cancels_its_job_through_the_sweep() {
    let s = Stack::start(&["--step-ms", "0", "--lines-per-step", "2"], &[]);
    let summary = cancelled_after_two_answers(&s, "quiet.jsonl", async |s: &Stack| {
        s.delete_input("quiet.jsonl", false).await;
        // No event: the next tick notices the input is gone (before the batch steps on).
        let logs = s.tick_ok().await;
        assert!(
            logs.iter().any(|l| l.contains("event=input_deleted")),
            "{logs:#?}"
        );
    })
    .await;
    assert_eq!(summary["cancelled_by"], "input deleted", "{summary:#}");
}

#[tokio::test]
async fn a_file_deleted_before_its_batch_was_created_is_dropped() {
    let s = Stack::start(&["--step-ms", "0", "--enqueued-token-limit", "3000"], &[]);
    s.submit("first.jsonl", &lines(20, "a")).await;
    s.submit("second.jsonl", &lines(20, "b")).await;
    assert_eq!(s.status_json("second").await.unwrap()["status"], "queued");
    s.delete_input("second.jsonl", true).await;
    let summary = s.read_summary("second").await.expect("summary at once");
    assert_eq!(summary["status"], "cancelled", "{summary:#}");
    assert_eq!(summary["cancelled_by"], "input deleted");
    assert!(summary["batch_id"].is_null());
    assert!(
        summary["notes"]
            .to_string()
            .contains("deleted before its batch was created"),
        "{summary:#}"
    );
    assert!(s.status_json("second").await.is_none());
    // The running one goes on untouched, and the dropped one is never submitted.
    assert_eq!(
        s.harvest("first", Duration::from_secs(30)).await["status"],
        "completed"
    );
    for _ in 0..3 {
        s.emulator.advance().await;
        s.tick_ok().await;
    }
    assert_eq!(s.emulator.batches().await.len(), 1);
}

#[tokio::test]
async fn deleting_then_uploading_again_cancels_only_the_deleted_version() {
    let s = Stack::start(&["--step-ms", "0", "--lines-per-step", "2"], &[]);
    s.submit("again.jsonl", &lines(6, "v1")).await;
    let old = s.emulator.batches().await[0].id.clone();
    s.emulator.step(Some(&old), 2).await;
    // Deleted and uploaded again before the deletion's event arrives.
    s.delete_input("again.jsonl", false).await;
    s.submit("again.jsonl", &lines(6, "v2")).await;
    let new = s
        .emulator
        .batches()
        .await
        .into_iter()
        .find(|b| b.id != old)
        .expect("the new version's batch")
        .id;
    let url = s.azurite.store().blob_url("batch-input", "again.jsonl");
    let (status, answer) = s
        .handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_deleted_event(&url)),
        )
        .await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let batches = s.emulator.batches().await;
    let state = |id: &str| batches.iter().find(|b| b.id == id).unwrap().status.clone();
    assert_eq!(
        state(&old),
        BatchStatus::Cancelling,
        "the deleted version's batch"
    );
    assert_eq!(
        state(&new),
        BatchStatus::Validating,
        "the new upload is untouched"
    );
    // The new version runs to completion in {path}/; the old one's partial results go aside.
    let summary = s.harvest("again", Duration::from_secs(30)).await;
    assert_eq!(summary["status"], "completed", "{summary:#}");
    assert_eq!(summary["batch_id"], new.as_str());
    let names = s.output_names("again/superseded/").await;
    let old_summary = names
        .iter()
        .find(|n| n.ends_with("summary.json"))
        .unwrap_or_else(|| panic!("the old version's summary: {names:?}"));
    let old_summary = read_json(&s.azurite.store(), "batch-output", old_summary)
        .await
        .unwrap();
    assert_eq!(old_summary["status"], "cancelled", "{old_summary:#}");
    assert_eq!(old_summary["cancelled_by"], "input deleted");
}

#[tokio::test]
async fn cancelling_an_unknown_or_finished_file_says_so_and_changes_nothing() {
    let s = Stack::start(&["--step-ms", "0"], &[]);
    let out = s.command(&["cancel", "never-uploaded.jsonl"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("never-uploaded.jsonl: no job for this file"));

    s.submit("finished.jsonl", &lines(2, "f")).await;
    s.harvest("finished", Duration::from_secs(30)).await;
    let store = s.azurite.store();
    let before = store
        .properties("batch-output", "finished/summary.json")
        .await
        .unwrap()
        .unwrap()
        .etag;
    let out = s.command(&["cancel", "finished.jsonl"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("already finished (completed); nothing was changed"),
        "{}",
        text(&out.stderr)
    );
    let after = store
        .properties("batch-output", "finished/summary.json")
        .await
        .unwrap()
        .unwrap()
        .etag;
    assert_eq!(before, after, "the summary is untouched");
    assert!(s.status_json("finished").await.is_none());
    let batches = s.emulator.batches().await;
    assert_eq!(
        (batches.len(), batches[0].status.clone()),
        (1, BatchStatus::Completed)
    );
}

#[tokio::test]
async fn cancelling_a_split_file_cancels_every_parts_batch() {
    let s = Stack::start(
        &["--step-ms", "0", "--lines-per-step", "2"],
        &[("BATCH_SPLIT_MAX_REQUESTS", "10")],
    );
    s.submit("parts.jsonl", &lines(25, "p")).await;
    s.emulator.step(None, 2).await;
    let out = s.command(&["cancel", "parts.jsonl"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let batches = s.emulator.batches().await;
    assert_eq!(batches.len(), 3);
    assert!(
        batches.iter().all(|b| b.status == BatchStatus::Cancelling),
        "{batches:?}"
    );
    let summary = s.harvest("parts", Duration::from_secs(60)).await;
    assert_eq!(summary["status"], "cancelled", "{summary:#}");
    assert_eq!(summary["cancelled_by"], "command");
    assert_eq!(
        summary["request_counts"]["completed"], 6,
        "two answers per part kept"
    );
    assert!(s.status_json("parts").await.is_none());
}

#[tokio::test]
async fn cancelling_a_split_file_never_starts_its_waiting_parts() {
    // About one 10-line part fits in the quota at a time (as in tests/split.rs): part 1 runs,
    // part 2 waits for quota, part 3 is not started yet.
    let s = Stack::start(
        &[
            "--step-ms",
            "0",
            "--lines-per-step",
            "2",
            "--enqueued-token-limit",
            "1500",
        ],
        &[("BATCH_SPLIT_MAX_REQUESTS", "10")],
    );
    s.submit("slow.jsonl", &lines(30, "s")).await;
    let st = s.status_json("slow").await.unwrap();
    let states: Vec<_> = st["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, ["running", "queued", "waiting"], "{st:#}");
    let first = s.emulator.batches().await[0].id.clone();
    s.emulator.step(Some(&first), 2).await;

    let out = s.command(&["cancel", "slow.jsonl"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&first), "{}", text(&out.stdout));
    let summary = s.harvest("slow", Duration::from_secs(60)).await;
    assert_eq!(summary["status"], "cancelled", "{summary:#}");
    assert_eq!(summary["cancelled_by"], "command");
    assert_eq!(summary["request_counts"]["completed"], 2, "{summary:#}");
    assert_eq!(summary["lines_without_result"], 28, "{summary:#}");
    let parts: Vec<_> = summary["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"].clone())
        .collect();
    assert_eq!(
        parts,
        ["cancelled", "cancelled", "cancelled"],
        "{summary:#}"
    );
    assert_eq!(
        s.emulator.batches().await.len(),
        1,
        "the waiting parts never ran"
    );
    let merged = read_text(&s.azurite.store(), "batch-output", "slow/merged.jsonl")
        .await
        .unwrap();
    assert_eq!(merged.lines().count(), 30, "one line per input line");
    assert!(s.status_json("slow").await.is_none());
}

#[tokio::test]
async fn a_crash_between_summary_and_status_is_healed_by_the_retried_harvest() {
    let s = Stack::start(&["--step-ms", "0", "--lines-per-step", "10"], &[]);
    s.submit("crash.jsonl", &lines(4, "x")).await;
    let id = s.emulator.batches().await[0].id.clone();
    let done = s.emulator.step(Some(&id), 5).await;
    assert_eq!(done[0].status, BatchStatus::Completed, "{done:?}");

    // The tick that harvests dies after merged.jsonl, before the summary: the record stays
    // `harvesting`, and so does status.json.
    let mut env = s.handler.env.clone();
    env.push(("BATCH_TEST_FAULT".into(), "harvest:after-merged".into()));
    let faulty = Handler::start(env);
    post_to_dying(&faulty, "/function-timer", &timer_payload()).await;
    let st = s
        .status_json("crash")
        .await
        .expect("status.json survives the crash");
    assert_eq!(st["status"], "harvesting", "{st:#}");
    // The state a crash between the summary's write and the status's delete leaves: both
    // files, and the job's record not finished.
    let store = s.azurite.store();
    store
        .write(
            "batch-output",
            "crash/summary.json",
            bytes::Bytes::from_static(b"{\"status\":\"completed\"}"),
            aoai_blob_batch::storage::WriteCondition::Always,
            "application/json",
        )
        .await
        .unwrap();

    // The next tick once the dead harvester's hold has lapsed (2 s here) retries the
    // harvest: one summary, no status.
    advance_clock(&s.handler, 3).await;
    s.tick_ok().await;
    let summary = s.read_summary("crash").await.unwrap();
    assert_eq!(summary["status"], "completed");
    assert_eq!(
        summary["request_counts"]["completed"], 4,
        "rewritten: {summary:#}"
    );
    assert!(
        s.status_json("crash").await.is_none(),
        "status.json deleted"
    );
}
