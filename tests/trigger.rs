//! `function-trigger` through its HTTP contract: the host's payloads, posted to the real
//! handler, against Azurite and the batch emulator.

mod support;

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use support::*;

fn stack_with(emulator_args: &[&str], extra_env: &[(&str, &str)]) -> Stack {
    Stack::start(emulator_args, extra_env)
}

fn stack() -> Stack {
    // Slow lifecycle: these tests look at submission, not completion.
    stack_with(&["--step-ms", "60000"], &[])
}

fn seed() -> Vec<u8> {
    std::fs::read(root().join("samples/test.jsonl")).unwrap()
}

#[tokio::test]
async fn seed_sample_becomes_exactly_one_batch() {
    let s = stack();
    let store = s.azurite.store();
    let (url, etag) = upload_input(&store, "test.jsonl", &seed()).await;

    let (status, answer) = s
        .handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, &etag, 10)),
        )
        .await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    assert!(answer.return_value.is_null());
    assert!(answer.outputs.is_empty());

    let batches = s.emulator.batches().await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    let batch = &batches[0];
    assert_eq!(batch.input_blob.as_deref(), Some(url.as_str()));
    assert_eq!(batch.endpoint.as_deref(), Some("/chat/completions"));
    // The invocation's key lines name the blob and the batch, for Application Insights.
    let logs = answer.logs.join("\n");
    assert!(logs.contains(&batch.id), "{logs}");
    assert!(logs.contains("batch-input/test.jsonl"), "{logs}");

    // The job record tells an operator what happened.
    let key = format!("test.jsonl@{}", etag.trim_matches('"'));
    let rec = read_json(&store, "batch-jobs", &format!("active/{key}.json"))
        .await
        .expect("job record");
    assert_eq!(rec["state"], "running");
    assert_eq!(rec["batch_id"], batch.id.as_str());
    assert_eq!(rec["input"]["etag"], etag.as_str());
}

#[tokio::test]
async fn the_output_folder_is_the_output_container() {
    // Fast lifecycle: let the emulator finish so output_blob shows where it wrote.
    let s = stack_with(&["--step-ms", "50"], &[]);
    let store = s.azurite.store();
    let (url, etag) = upload_input(&store, "test.jsonl", &seed()).await;
    s.handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, &etag, 10)),
        )
        .await;
    let client = s.emulator.client();
    let id = s.emulator.batches().await[0].id.clone();
    let batch = eventually(Duration::from_secs(20), "completion", || {
        let client = client.clone();
        let id = id.clone();
        async move {
            let b = client.retrieve(&id).await.ok()?;
            b.status.is_terminal().then_some(b)
        }
    })
    .await;
    let output = batch.output_blob.unwrap();
    let prefix = store.container_url("batch-output") + "/";
    assert!(output.starts_with(&prefix), "{output} not under {prefix}");
    assert!(output.ends_with("/results.jsonl"), "{output}");
}

#[tokio::test]
async fn every_host_encoding_of_the_event_is_understood() {
    let s = stack();
    let store = s.azurite.store();
    for (i, encoding) in ["object", "json string", "base64", "cloudevents"]
        .iter()
        .enumerate()
    {
        let name = format!("enc-{i}.jsonl");
        let (url, etag) = upload_input(&store, &name, &seed()).await;
        let mut event = blob_created_event(&url, &etag, 10);
        let data = match *encoding {
            "object" => event,
            "json string" => Value::String(event.to_string()),
            "base64" => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(event.to_string()))
            }
            _ => {
                let obj = event.as_object_mut().unwrap();
                let ty = obj.remove("eventType").unwrap();
                obj.insert("type".into(), ty);
                obj.insert("specversion".into(), json!("1.0"));
                obj.insert("source".into(), obj["topic"].clone());
                event
            }
        };
        let payload = json!({ "Data": { "event": data }, "Metadata": {} });
        let (status, answer) = s.handler.invoke("function-trigger", &payload).await;
        assert_eq!(status, 200, "{encoding}: {:?}", answer.logs);
        assert_eq!(
            s.emulator.batches().await.len(),
            i + 1,
            "{encoding}: {:?}",
            answer.logs
        );
    }
}

#[tokio::test]
async fn twenty_concurrent_deliveries_make_one_batch() {
    let s = stack();
    let store = s.azurite.store();
    let (url, etag) = upload_input(&store, "test.jsonl", &seed()).await;
    let payload = trigger_payload(blob_created_event(&url, &etag, 10));
    let answers =
        futures::future::join_all((0..20).map(|_| s.handler.invoke("function-trigger", &payload)))
            .await;
    for (status, answer) in &answers {
        assert_eq!(*status, 200, "{:?}", answer.logs);
    }
    assert_eq!(s.emulator.batches().await.len(), 1);

    // And a later redelivery still finds it done.
    s.handler.invoke("function-trigger", &payload).await;
    assert_eq!(s.emulator.batches().await.len(), 1);
}

#[tokio::test]
async fn a_crash_between_create_and_record_still_makes_one_batch() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    let store = azurite.store();
    let (url, etag) = upload_input(&store, "test.jsonl", &seed()).await;
    let payload = trigger_payload(blob_created_event(&url, &etag, 10));

    // A create may be in flight for BATCH_CREATE_TIMEOUT_SECONDS: 30 s here, so that the
    // first redelivery below meets the dead claim still live however long the second handler
    // takes to start (with 2 s, a slow start let the window lapse and that redelivery adopt).
    let mut env = handler_env(&azurite, &emulator);
    env.push(("BATCH_CREATE_TIMEOUT_SECONDS".into(), "30".into()));
    let mut faulty = env.clone();
    faulty.push(("BATCH_TEST_FAULT".into(), "submit:after-create".into()));
    let mut crashing = Handler::start(faulty);
    // The process dies mid-invocation: the host sees no answer and Event Grid redelivers.
    let _ = reqwest::Client::new()
        .post(crashing.url("/function-trigger"))
        .json(&payload)
        .send()
        .await;
    assert!(
        crashing.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "fault point not reached"
    );
    assert_eq!(
        emulator.batches().await.len(),
        1,
        "the create went through before the crash"
    );

    let handler = Handler::start(env);
    // Redelivered while the dead claim's create window still runs: deferred, no batch.
    let (status, answer) = handler.invoke("function-trigger", &payload).await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    assert!(
        !answer.logs.join("\n").contains("adopted"),
        "{:?}",
        answer.logs
    );
    assert_eq!(emulator.batches().await.len(), 1);
    // The dead claim's lease (2 s) and create window (30 s) lapse: no waiting, the handler's
    // clock is moved past them.
    advance_clock(&handler, 31).await;
    let (status, answer) = handler.invoke("function-trigger", &payload).await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let logs = answer.logs.join("\n");
    assert!(logs.contains("adopted"), "{logs}");
    let batches = emulator.batches().await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    let key = format!("test.jsonl@{}", etag.trim_matches('"'));
    let rec = read_json(&store, "batch-jobs", &format!("active/{key}.json"))
        .await
        .unwrap();
    assert_eq!(rec["batch_id"], batches[0].id.as_str());
}

#[tokio::test]
async fn a_reupload_is_a_new_job() {
    let s = stack();
    let store = s.azurite.store();
    let (url, etag1) = upload_input(&store, "test.jsonl", &seed()).await;
    s.handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, &etag1, 10)),
        )
        .await;
    let mut changed = seed();
    changed.extend_from_slice(chat_line("task-3", "And one more?").as_bytes());
    changed.push(b'\n');
    let (_, etag2) = upload_input(&store, "test.jsonl", &changed).await;
    assert_ne!(etag1, etag2);
    s.handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, &etag2, 10)),
        )
        .await;
    assert_eq!(s.emulator.batches().await.len(), 2);
}

/// Each bad file: the rule it breaks, the line and code `summary.json` must report.
fn bad_inputs() -> Vec<(&'static str, Vec<u8>, Option<u64>, &'static str)> {
    let good = |id: &str| chat_line(id, "hello");
    let lines = |ls: &[String]| (ls.join("\n") + "\n").into_bytes();
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend(lines(&[good("a")]));
    let other_model = json!({"custom_id": "b", "method": "POST", "url": "/chat/completions",
        "body": {"model": "other-deployment", "messages": []}})
    .to_string();
    let other_url = json!({"custom_id": "b", "method": "POST", "url": "/responses",
        "body": {"model": DEPLOYMENT, "input": "x"}})
    .to_string();
    let get = json!({"custom_id": "b", "method": "GET", "url": "/chat/completions",
        "body": {"model": DEPLOYMENT}})
    .to_string();
    let embeddings = json!({"custom_id": "a", "method": "POST", "url": "/embeddings",
        "body": {"model": DEPLOYMENT, "input": "x"}})
    .to_string();
    let no_id =
        json!({"method": "POST", "url": "/chat/completions", "body": {"model": DEPLOYMENT}})
            .to_string();
    vec![
        (
            "bad-json",
            lines(&[good("a"), "{not json".into()]),
            Some(2),
            "invalid_json_line",
        ),
        (
            "duplicate-id",
            lines(&[good("a"), good("b"), good("a")]),
            Some(3),
            "duplicate_custom_id",
        ),
        (
            "mixed-models",
            lines(&[good("a"), other_model]),
            Some(2),
            "model_mismatch",
        ),
        (
            "mixed-urls",
            lines(&[good("a"), other_url]),
            Some(2),
            "url_mismatch",
        ),
        (
            "get-method",
            lines(&[good("a"), get]),
            Some(2),
            "invalid_method",
        ),
        (
            "embeddings",
            lines(&[embeddings]),
            Some(1),
            "unsupported_url",
        ),
        ("missing-id", lines(&[no_id]), Some(1), "missing_custom_id"),
        ("bom", bom, Some(1), "bom"),
        ("empty", Vec::new(), None, "empty_file"),
        (
            "bad-utf8",
            b"{\"custom_id\": \"\xff\"}\n".to_vec(),
            Some(1),
            "invalid_utf8",
        ),
    ]
}

#[tokio::test]
async fn bad_files_are_rejected_with_line_numbers_and_no_batch() {
    let s = stack();
    let store = s.azurite.store();
    for (name, body, line, code) in bad_inputs() {
        let blob = format!("bad/{name}.jsonl");
        let (url, etag) = upload_input(&store, &blob, &body).await;
        let (status, answer) = s
            .handler
            .invoke(
                "function-trigger",
                &trigger_payload(blob_created_event(&url, &etag, 1)),
            )
            .await;
        assert_eq!(
            status, 200,
            "{name}: a hopeless input is handled, not retried"
        );
        let summary = read_json(&store, "batch-output", &format!("bad/{name}/summary.json"))
            .await
            .unwrap_or_else(|| panic!("{name}: no summary.json; logs {:?}", answer.logs));
        assert_eq!(summary["status"], "rejected", "{name}");
        assert!(summary["batch_id"].is_null(), "{name}");
        assert_eq!(summary["input_blob"], url.as_str(), "{name}");
        let problems = summary["problems"].as_array().unwrap();
        let first = problems
            .first()
            .unwrap_or_else(|| panic!("{name}: no problems"));
        assert_eq!(first["code"], code, "{name}: {problems:?}");
        assert_eq!(first["line"].as_u64(), line, "{name}: {problems:?}");
        assert!(!first["message"].as_str().unwrap().is_empty());
        // Nothing else was written for it.
        assert!(
            store
                .properties("batch-output", &format!("bad/{name}/results.jsonl"))
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(
        s.emulator.batches().await.len(),
        0,
        "no batch for any bad file"
    );
}

#[tokio::test]
async fn events_for_other_accounts_or_containers_are_ignored_without_a_request() {
    // A listener standing for "someone else's storage": it must never be contacted.
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    foreign.set_nonblocking(true).unwrap();
    let foreign_port = foreign.local_addr().unwrap().port();

    let s = stack();
    let store = s.azurite.store();
    let (_, etag) = upload_input(&store, "test.jsonl", &seed()).await;
    store.ensure_container("elsewhere").await.unwrap();
    let cases = [
        format!("http://127.0.0.1:{foreign_port}/devstoreaccount1/batch-input/test.jsonl"),
        format!(
            "http://127.0.0.1:{}/otheraccount/batch-input/test.jsonl",
            s.azurite.port
        ),
        store.blob_url("elsewhere", "test.jsonl"),
        store.blob_url("batch-input", "notes.txt"),
    ];
    for url in &cases {
        let (status, answer) = s
            .handler
            .invoke(
                "function-trigger",
                &trigger_payload(blob_created_event(url, &etag, 10)),
            )
            .await;
        assert_eq!(status, 200, "{url}");
        assert!(
            answer.logs.join("\n").contains("ignored"),
            "{url}: {:?}",
            answer.logs
        );
    }
    assert!(
        foreign.accept().is_err(),
        "the handler contacted a foreign URL"
    );
    assert_eq!(s.emulator.batches().await.len(), 0);
}

#[tokio::test]
async fn other_event_types_and_garbage_are_answered_2xx_once() {
    let s = stack();
    let mut deleted = blob_created_event(
        "http://127.0.0.1:1/devstoreaccount1/batch-input/x.jsonl",
        "\"0x1\"",
        1,
    );
    deleted["eventType"] = json!("Microsoft.Storage.BlobDeleted");
    for payload in [
        trigger_payload(deleted),
        json!({"Data": {"event": "%%% not an event %%%"}, "Metadata": {}}),
        json!({"Data": {}, "Metadata": {}}),
    ] {
        let (status, answer) = s.handler.invoke("function-trigger", &payload).await;
        assert_eq!(status, 200, "{payload}");
        assert!(!answer.logs.is_empty(), "{payload}: one line says why");
    }
    // Not even JSON: still the host's JSON answer.
    let resp = reqwest::Client::new()
        .post(s.handler.url("/function-trigger"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["Logs"].is_array());
}

#[tokio::test]
async fn a_service_outage_answers_5xx_so_the_event_is_redelivered() {
    let s = stack_with(&["--step-ms", "60000", "--http-500-rate", "1.0"], &[]);
    let store = s.azurite.store();
    let (url, etag) = upload_input(&store, "test.jsonl", &seed()).await;
    let (status, answer) = s
        .handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, &etag, 10)),
        )
        .await;
    assert_eq!(status, 500, "{:?}", answer.logs);
    // The claim was released, so the redelivery may go on at once.
    let key = format!("test.jsonl@{}", etag.trim_matches('"'));
    let rec = read_json(&store, "batch-jobs", &format!("active/{key}.json"))
        .await
        .unwrap();
    assert_eq!(rec["state"], "submitting");
    assert!(rec["last_error"].as_str().unwrap().contains("500"), "{rec}");
}

#[tokio::test]
async fn readiness_probe_answers() {
    let s = stack();
    let resp = reqwest::get(s.handler.url("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn secrets_never_reach_logs_or_outputs() {
    let s = stack();
    let store = s.azurite.store();
    let (url, etag) = upload_input(&store, "test.jsonl", &seed()).await;
    let (_, a1) = s
        .handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, &etag, 10)),
        )
        .await;
    let (url2, etag2) = upload_input(&store, "bad.jsonl", b"{oops\n").await;
    let (_, a2) = s
        .handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url2, &etag2, 10)),
        )
        .await;
    let summary = read_text(&store, "batch-output", "bad/summary.json")
        .await
        .unwrap_or_default();
    let everything = format!(
        "{}\n{}\n{}\n{}",
        s.handler.proc.logs(),
        a1.logs.join("\n"),
        a2.logs.join("\n"),
        summary
    );
    for secret in [API_KEY, ACCOUNT_KEY, "sig="] {
        assert!(!everything.contains(secret), "{secret} leaked");
    }
}
