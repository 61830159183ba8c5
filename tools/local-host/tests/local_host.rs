//! local-host against real Azurite and a recording fake handler (tests/fake_handler.py): what
//! goes over the wire, redelivery, the timer singleton, exit conditions, and that the handler
//! never outlives local-host.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use aoai_blob_batch::storage::{BlobStore, RetryPolicy, WriteCondition};
use aoai_stack::{Azurite, Options, Proc};
use serde_json::Value;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_root() -> PathBuf {
    crate_dir().join("../..").canonicalize().unwrap()
}

/// Waits for local-host to exit; panics with its output if it is still running.
fn exited(proc: &mut Proc, timeout: Duration) -> ExitStatus {
    proc.wait_exit(timeout)
        .unwrap_or_else(|| panic!("still running; output:\n{}", proc.logs()))
}

/// An app root like the repository's, with the fake handler as the executable.
fn app_root() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let handler = crate_dir().join("tests/fake_handler.py");
    std::fs::write(
        dir.path().join("host.json"),
        serde_json::json!({
            "version": "2.0",
            "customHandler": { "description": { "defaultExecutablePath": handler, "workingDirectory": "", "arguments": [] } },
            "functionTimeout": "00:01:00"
        })
        .to_string(),
    )
    .unwrap();
    for f in ["function-trigger", "function-timer"] {
        std::fs::create_dir(dir.path().join(f)).unwrap();
        std::fs::copy(
            repo_root().join(f).join("function.json"),
            dir.path().join(f).join("function.json"),
        )
        .unwrap();
    }
    dir
}

struct Run {
    proc: Proc,
    record: PathBuf,
    pidfile: PathBuf,
    _app: tempfile::TempDir,
}

fn local_host(args: &[&str], env: &[(&str, &str)]) -> Run {
    let app = app_root();
    let record = app.path().join("record.jsonl");
    let pidfile = app.path().join("handler.pid");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_local-host"));
    cmd.arg("--app-root")
        .arg(app.path())
        .args(args)
        .env_remove("BATCH_STORAGE_CONNECTION_STRING")
        .env("BATCH_TIMER_SCHEDULE", "0 0 0 1 1 *")
        .env("FAKE_RECORD", &record)
        .env("FAKE_PIDFILE", &pidfile)
        .envs(env.iter().copied());
    Run {
        proc: Proc::spawn("local-host", cmd, &Options::default()).unwrap(),
        record,
        pidfile,
        _app: app,
    }
}

impl Run {
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn wait_records(&self, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let records = self.records();
            if pred(&records) {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; output:\n{}",
                self.proc.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn assert_handler_gone(&self) {
        let pid = std::fs::read_to_string(&self.pidfile).expect("the handler wrote its pid");
        let proc_dir = Path::new("/proc").join(pid.trim());
        assert!(
            !proc_dir.exists(),
            "the handler (pid {pid}) outlived local-host"
        );
    }
}

fn for_function<'a>(records: &'a [Value], function: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["path"] == format!("/{function}"))
        .collect()
}

/// The event of a recorded trigger invocation: `Data.event`, an object as the host sends it,
/// or with `--event-shape string` a JSON string holding a JSON string holding it.
fn event_of(r: &Value) -> Value {
    match &r["body"]["Data"]["event"] {
        Value::String(sent) => {
            let once: String = serde_json::from_str(sent).expect("a JSON string inside");
            serde_json::from_str(&once).expect("the event's JSON inside that")
        }
        event => event.clone(),
    }
}

fn subject_of(r: &Value) -> String {
    event_of(r)["subject"].as_str().unwrap().to_string()
}

fn is_uuid(v: &Value) -> bool {
    v.as_str().is_some_and(|s| uuid::Uuid::parse_str(s).is_ok())
}

fn upload(rt: &tokio::runtime::Runtime, store: &BlobStore, container: &str, name: &str) -> String {
    rt.block_on(async {
        store.ensure_container(container).await.unwrap();
        store
            .write(
                container,
                name,
                bytes::Bytes::from_static(b"{}\n"),
                WriteCondition::Always,
                "application/jsonl",
            )
            .await
            .unwrap()
    })
}

#[test]
fn delivers_events_and_timer_ticks_then_exits_when_the_blob_exists() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let azurite = Azurite::start();
    let store = azurite.store_with(RetryPolicy::default());
    let before_etag = upload(&rt, &store, "batch-input", "before.jsonl");
    upload(&rt, &store, "batch-input", "ignored.txt");

    let cs = azurite.connection_string();
    let mut run = local_host(
        &[
            "--storage-connection-string",
            &cs,
            "--poll-ms",
            "200",
            "--timer-every-ms",
            "300",
            "--retry-delays-ms",
            "300,300",
            "--exit-when-exists",
            "batch-output/done/summary.json",
            "--timeout-secs",
            "90",
        ],
        &[("FAKE_FAIL_FIRST", "1"), ("FAKE_TIMER_SLEEP", "0.4")],
    );
    run.proc
        .wait_for_line("handler ready", Duration::from_secs(60))
        .unwrap();
    let before_subject = "/blobServices/default/containers/batch-input/blobs/before.jsonl";
    run.wait_records("the redelivered event for before.jsonl", |r| {
        for_function(r, "function-trigger")
            .iter()
            .any(|r| subject_of(r) == before_subject && r["status"] == 200)
    });
    let after_etag = upload(&rt, &store, "batch-input", "sub dir/after.jsonl");
    run.wait_records("the event for after.jsonl and three ticks", |r| {
        for_function(r, "function-trigger")
            .iter()
            .any(|r| subject_of(r).ends_with("after.jsonl"))
            && for_function(r, "function-timer").len() >= 3
    });
    upload(&rt, &store, "batch-output", "done/summary.json");
    let status = exited(&mut run.proc, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", run.proc.logs());
    run.assert_handler_gone();

    let records = run.records();
    let logs = run.proc.logs();
    assert!(logs.contains("local-host: a stand-in for the Azure Functions host, for local runs only; in Azure the Functions host does this"));
    assert!(logs.contains("[handler] fake handler listening on"));
    assert!(logs.contains("[function-trigger] fake saw function-trigger"));
    assert!(logs.contains("[function-timer] fake saw function-timer"));

    // Every invocation carries the host's headers.
    for r in &records {
        let h = &r["headers"];
        assert!(is_uuid(&h["x-azure-functions-invocationid"]), "{h}");
        assert!(
            h["user-agent"]
                .as_str()
                .unwrap()
                .starts_with("Azure-Functions-Host/4.")
        );
        assert!(
            h["x-azure-functions-hostversion"]
                .as_str()
                .unwrap()
                .starts_with("4.")
        );
        assert_eq!(h["content-type"], "application/json");
    }

    // Events: only .jsonl; the failed delivery is retried with the same event, as a new invocation.
    let triggers = for_function(&records, "function-trigger");
    assert!(triggers.iter().all(|r| !subject_of(r).contains("ignored")));
    let before: Vec<_> = triggers
        .iter()
        .filter(|r| subject_of(r) == before_subject)
        .collect();
    assert_eq!(before.len(), 2, "one failure, one redelivery");
    assert_eq!(
        (&before[0]["status"], &before[1]["status"]),
        (&500.into(), &200.into())
    );
    assert_eq!(
        before[0]["body"]["Data"]["event"],
        before[1]["body"]["Data"]["event"]
    );
    assert_ne!(
        before[0]["headers"]["x-azure-functions-invocationid"],
        before[1]["headers"]["x-azure-functions-invocationid"]
    );

    let after = triggers
        .iter()
        .find(|r| subject_of(r).ends_with("after.jsonl"))
        .unwrap();
    for (r, name, etag) in [
        (before[1], "before.jsonl", &before_etag),
        (after, "sub dir/after.jsonl", &after_etag),
    ] {
        let body = &r["body"];
        assert_eq!(body["Data"].as_object().unwrap().len(), 1);
        assert!(
            body["Data"]["event"].is_object(),
            "the host's shape: {body}"
        );
        let event = &event_of(r);
        assert_eq!(
            event["subject"],
            format!("/blobServices/default/containers/batch-input/blobs/{name}")
        );
        assert_eq!(event["eventType"], "Microsoft.Storage.BlobCreated");
        assert!(
            event["topic"]
                .as_str()
                .unwrap()
                .ends_with("/providers/Microsoft.Storage/storageAccounts/devstoreaccount1")
        );
        assert!(is_uuid(&event["id"]));
        assert_eq!(event["dataVersion"], "");
        assert_eq!(event["metadataVersion"], "1");
        let data = &event["data"];
        assert_eq!(data["url"], store.blob_url("batch-input", name));
        assert_eq!(data["api"], "PutBlockList");
        assert_eq!(data["blobType"], "BlockBlob");
        assert_eq!(data["contentLength"], 3);
        let sent = data["eTag"].as_str().unwrap();
        assert!(sent.starts_with('"') && sent.ends_with('"'), "{sent}");
        assert_eq!(sent.trim_matches('"'), etag.trim_matches('"'));
        assert_eq!(body["Metadata"]["data"], *data);
        assert_eq!(body["Metadata"]["sys"]["MethodName"], "function-trigger");
        assert!(is_uuid(&body["Metadata"]["sys"]["RandGuid"]));
    }
    assert_eq!(
        event_of(after)["data"]["url"]
            .as_str()
            .unwrap()
            .rsplit("/batch-input/")
            .next(),
        Some("sub%20dir/after.jsonl")
    );

    // Timer: the host's TimerInfo, monitor on (function.json says so), never two at once.
    let mut ticks = for_function(&records, "function-timer");
    ticks.sort_by(|a, b| {
        a["start"]
            .as_f64()
            .partial_cmp(&b["start"].as_f64())
            .unwrap()
    });
    let first = &ticks[0]["body"]["Data"]["timer"];
    assert_eq!(first["Schedule"]["AdjustForDST"], true);
    assert_eq!(first["IsPastDue"], false);
    assert_eq!(first["ScheduleStatus"]["Last"], "0001-01-01T00:00:00");
    assert_eq!(
        ticks[1]["body"]["Data"]["timer"]["ScheduleStatus"]["Last"],
        first["ScheduleStatus"]["Next"]
    );
    assert_eq!(
        ticks[0]["body"]["Metadata"]["sys"]["MethodName"],
        "function-timer"
    );
    for pair in ticks.windows(2) {
        assert!(
            pair[1]["start"].as_f64().unwrap() >= pair[0]["end"].as_f64().unwrap(),
            "two timer invocations overlapped"
        );
    }
}

#[test]
fn skip_existing_then_timeout_stops_the_handler() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let azurite = Azurite::start();
    let store = azurite.store_with(RetryPolicy::default());
    upload(&rt, &store, "batch-input", "old.jsonl");
    let cs = azurite.connection_string();
    let mut run = local_host(
        &[
            "--poll-ms",
            "200",
            "--skip-existing",
            "--exit-when-exists",
            "batch-output/never/summary.json",
            "--timeout-secs",
            "4",
        ],
        // The connection string through the environment this time.
        &[("BATCH_STORAGE_CONNECTION_STRING", cs.as_str())],
    );
    let status = exited(&mut run.proc, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "{}", run.proc.logs());
    assert!(run.proc.logs().contains("timed out after 4 s"));
    assert!(run.proc.logs().contains("old.jsonl was there before start"));
    assert!(
        for_function(&run.records(), "function-trigger").is_empty(),
        "no event for a blob present before start"
    );
    run.assert_handler_gone();
}

/// Event Grid waits 30 s (here 1 s) for an answer, then redelivers while the host keeps the
/// first invocation running; after --max-delivery-attempts the event is dropped.
#[test]
fn a_slow_answer_is_redelivered_while_the_first_invocation_runs_on() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let azurite = Azurite::start();
    let store = azurite.store_with(RetryPolicy::default());
    upload(&rt, &store, "batch-input", "slow.jsonl");
    let cs = azurite.connection_string();
    let run = local_host(
        &[
            "--storage-connection-string",
            &cs,
            "--poll-ms",
            "200",
            "--event-delivery-timeout-secs",
            "1",
            "--retry-delays-ms",
            "300",
            "--max-delivery-attempts",
            "2",
            "--event-shape",
            "string",
        ],
        &[("FAKE_TRIGGER_SLEEP", "3")],
    );
    let records = run.wait_records("both deliveries to finish", |r| {
        for_function(r, "function-trigger").len() >= 2
    });
    let mut triggers = for_function(&records, "function-trigger");
    triggers.sort_by(|a, b| {
        a["start"]
            .as_f64()
            .partial_cmp(&b["start"].as_f64())
            .unwrap()
    });
    let (first, second) = (triggers[0], triggers[1]);
    let at = |r: &Value, k: &str| r[k].as_f64().unwrap();
    assert!(
        at(second, "start") < at(first, "end"),
        "the redelivery came while the first invocation still ran"
    );
    let gap = at(second, "start") - at(first, "start");
    assert!(
        (1.2..2.9).contains(&gap),
        "1 s timeout + 0.3 s wait, not the whole 3 s: {gap}"
    );
    assert!(
        at(first, "end") - at(first, "start") >= 3.0,
        "not cancelled"
    );
    assert!(
        first["body"]["Data"]["event"].is_string(),
        "--event-shape string"
    );
    assert_eq!(event_of(first), event_of(second), "the same event");
    assert_ne!(
        first["headers"]["x-azure-functions-invocationid"],
        second["headers"]["x-azure-functions-invocationid"]
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !run.proc.logs().contains("gave up after 2 attempts") {
        assert!(Instant::now() < deadline, "{}", run.proc.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = run.proc.logs();
    assert!(
        logs.contains("no answer from function-trigger within 1 s (--event-delivery-timeout-secs): Event Grid counts attempt 1 as failed"),
        "{logs}"
    );
    assert!(
        logs.contains("succeeded (HTTP 200") && logs.contains("after Event Grid stopped waiting"),
        "the late answer is logged: {logs}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        for_function(&run.records(), "function-trigger").len(),
        2,
        "no third attempt"
    );
}

#[test]
fn sigterm_stops_the_handler() {
    let mut run = local_host(&[], &[]);
    run.proc
        .wait_for_line("handler ready", Duration::from_secs(60))
        .unwrap();
    let pid = i32::try_from(run.proc.pid()).unwrap();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = exited(&mut run.proc, Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{}", run.proc.logs());
    assert!(run.proc.logs().contains("handler stopped"));
    run.assert_handler_gone();
}

#[test]
fn a_handler_that_exits_at_start_fails_the_run() {
    let mut run = local_host(&["--timeout-secs", "30"], &[("FAKE_EXIT_AT_ONCE", "1")]);
    let status = exited(&mut run.proc, Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    let logs = run.proc.logs();
    assert!(
        logs.contains("[handler] fake handler: missing setting FAKE_SOMETHING"),
        "{logs}"
    );
    assert!(
        logs.contains("the handler exited during start-up"),
        "{logs}"
    );
}

#[test]
fn a_bad_schedule_stops_before_starting_anything() {
    let mut run = local_host(&[], &[("BATCH_TIMER_SCHEDULE", "*/5 * * * *")]);
    let status = exited(&mut run.proc, Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    let logs = run.proc.logs();
    assert!(logs.contains("function-timer"), "{logs}");
    assert!(logs.contains("NCRONTAB needs 6"), "{logs}");
    assert!(!run.pidfile.exists());
}
