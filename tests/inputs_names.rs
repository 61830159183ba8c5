//! Bad inputs and odd names, through the real handler: every malformed file of the corpus in
//! `tests/inputs/` uploaded and announced as Event Grid would, and blob names with spaces,
//! unicode, `%`, `..`, `#`, `?` and 1,000+ characters. Each is handled (its job runs and the
//! results land in `batch-output/{path}/`) or rejected clearly (a log line, a 2xx answer);
//! never a crash, never a wrong folder.

mod support;

use std::{collections::BTreeMap, time::Duration};

use futures::TryStreamExt;
use support::*;

fn corpus() -> std::path::PathBuf {
    root().join("tests/inputs")
}

/// `expected.tsv`: file → (line of the first problem, code); `None` for a valid file.
fn manifest() -> BTreeMap<String, Option<(Option<u64>, String)>> {
    std::fs::read_to_string(corpus().join("expected.tsv"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|row| {
            let cols: Vec<&str> = row.split('\t').collect();
            let expected = match (cols[1], cols[2]) {
                ("-", "OK") => None,
                ("file", code) => Some((None, code.to_string())),
                (line, code) => Some((Some(line.parse().unwrap()), code.to_string())),
            };
            (cols[0].to_string(), expected)
        })
        .collect()
}

#[tokio::test]
async fn every_corpus_file_through_the_handler() {
    let azurite = Azurite::start();
    // Slow lifecycle: the valid files' batches just need to exist.
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let store = azurite.store();
    let (mut rejected, mut accepted) = (0, 0);
    for (file, expected) in manifest() {
        let body = std::fs::read(corpus().join(&file)).unwrap();
        let name = format!("corpus/{file}");
        let (url, etag) = upload_input(&store, &name, &body).await;
        let (status, answer) = handler
            .invoke(
                "function-trigger",
                &trigger_payload(blob_created_event(&url, &etag, body.len() as u64)),
            )
            .await;
        assert_eq!(
            status, 200,
            "{file}: handled, not retried: {:?}",
            answer.logs
        );
        let path = name.strip_suffix(".jsonl").unwrap();
        let summary = read_json(&store, "batch-output", &format!("{path}/summary.json")).await;
        let batch = emulator
            .batches()
            .await
            .into_iter()
            .find(|b| b.input_blob.as_deref() == Some(url.as_str()));
        match expected {
            Some((line, code)) => {
                let summary =
                    summary.unwrap_or_else(|| panic!("{file}: no summary: {:?}", answer.logs));
                assert_eq!(summary["status"], "rejected", "{file}: {summary}");
                assert!(summary["batch_id"].is_null(), "{file}");
                let first = &summary["problems"][0];
                assert_eq!(first["code"], code.as_str(), "{file}: {summary}");
                assert_eq!(first["line"].as_u64(), line, "{file}: {summary}");
                assert!(batch.is_none(), "{file}: no batch for a rejected file");
                // The invocation's own log says so, with the line.
                let logs = answer.logs.join("\n");
                assert!(logs.contains("rejected") && logs.contains(&code), "{logs}");
                rejected += 1;
            }
            None => {
                assert!(summary.is_none(), "{file}: {summary:?}");
                assert!(batch.is_some(), "{file}: valid, so submitted");
                accepted += 1;
            }
        }
    }
    // Still serving, and nothing written outside the corpus folders.
    let resp = reqwest::get(handler.url("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let outputs: Vec<_> = store.list("batch-output", "").try_collect().await.unwrap();
    let count = |file: &str| outputs.iter().filter(|b| b.name.ends_with(file)).count();
    assert_eq!(
        count("/summary.json"),
        rejected,
        "one summary.json per rejected file"
    );
    // A valid file's batch runs on: its status.json says so until its summary comes.
    assert_eq!(
        count("/status.json"),
        accepted,
        "one status.json per running file"
    );
    assert!(outputs.iter().all(|b| b.name.starts_with("corpus/")
        && (b.name.ends_with("/summary.json") || b.name.ends_with("/status.json"))));
    assert!(rejected >= 60, "{rejected}");
    println!(
        "FIGURE bad-inputs: {} corpus files via events -> {rejected} rejected with the expected \
         code and line and no batch, {accepted} valid ones submitted, 0 crashes, handler still \
         answering",
        rejected + accepted
    );
}

/// Names a user might give a file, each as the blob's full name.
fn odd_names() -> Vec<String> {
    let long_dir = "d".repeat(200);
    vec![
        "names/with space.jsonl".into(),
        "names/unicode-ünïcødé-日本語-😀.jsonl".into(),
        "names/100%.jsonl".into(),
        "names/a%20b%2Fc.jsonl".into(),
        "names/%2e%2e/dots.jsonl".into(),
        "names/a..b...jsonl".into(),
        "names/hash#1.jsonl".into(),
        "names/query?x=1&sig=abc.jsonl".into(),
        "names/plus+and=equals;semi,comma.jsonl".into(),
        "names/'quotes' \"double\".jsonl".into(),
        // 1,000 characters: the output names (path + "/merged.jsonl") stay under Azure's 1,024.
        format!(
            "names/{long_dir}/{long_dir}/{long_dir}/{long_dir}/{}.jsonl",
            "n".repeat(1000 - 6 - 4 * 201 - 6)
        ),
        "UPPER/Case.JSONL.jsonl".into(),
    ]
}

#[tokio::test]
async fn odd_blob_names_are_handled_in_the_right_folder() {
    let s_azurite = Azurite::start();
    let emulator = Emulator::start(&s_azurite, &["--step-ms", "50"]);
    let handler = Handler::start(handler_env(&s_azurite, &emulator));
    let store = s_azurite.store();
    let body = format!(
        "{}\n{}\n",
        chat_line("n-0", "first"),
        chat_line("n-1", "second")
    );
    let mut handled = 0;
    for name in odd_names() {
        assert!(name.len() <= 1024);
        let (url, etag) = upload_input(&store, &name, body.as_bytes()).await;
        // The blob is stored under exactly this name.
        let info = store.properties("batch-input", &name).await.unwrap();
        assert!(info.is_some(), "{name:?}: not stored under its name");
        let (status, answer) = handler
            .invoke(
                "function-trigger",
                &trigger_payload(blob_created_event(&url, &etag, body.len() as u64)),
            )
            .await;
        assert_eq!(status, 200, "{name:?}: {:?}", answer.logs);
        let path = name.strip_suffix(".jsonl").unwrap();
        let summary_name = format!("{path}/summary.json");
        let summary = eventually(Duration::from_secs(30), &summary_name, || async {
            let (status, _) = handler.tick().await;
            assert_eq!(status, 200);
            read_json(&store, "batch-output", &summary_name).await
        })
        .await;
        assert_eq!(summary["status"], "completed", "{name:?}: {summary}");
        assert_eq!(summary["input_blob"], url.as_str(), "{name:?}");
        let merged = read_text(&store, "batch-output", &format!("{path}/merged.jsonl"))
            .await
            .unwrap_or_else(|| panic!("{name:?}: no merged.jsonl"));
        assert_eq!(merged.lines().count(), 2, "{name:?}");
        assert!(
            store
                .properties("batch-output", &format!("{path}/results.jsonl"))
                .await
                .unwrap()
                .is_some(),
            "{name:?}"
        );
        handled += 1;
    }
    // Every output is in the folder of one of the inputs: nothing went to a wrong folder.
    let folders: Vec<String> = odd_names()
        .iter()
        .map(|n| format!("{}/", n.strip_suffix(".jsonl").unwrap()))
        .collect();
    let outputs: Vec<_> = store.list("batch-output", "").try_collect().await.unwrap();
    for o in &outputs {
        assert!(
            folders.iter().any(|f| o.name.starts_with(f.as_str())),
            "{:?} is in no input's folder",
            o.name
        );
    }
    assert_eq!(outputs.len(), 3 * folders.len(), "{outputs:?}");
    assert_eq!(emulator.batches().await.len(), folders.len());
    let resp = reqwest::get(handler.url("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    println!(
        "FIGURE odd-names: {handled} names (space, unicode, %, %2e%2e, a..b, #, ?, quotes, \
         1,000 chars) -> {handled} completed in batch-output/{{name}}/, 0 in a wrong folder, 0 \
         crashes"
    );
}

/// A name whose results could not be named (Azure caps blob names at 1,024 characters; Azurite
/// does not) is refused with a line that says so, and nothing is submitted.
#[tokio::test]
async fn a_name_too_long_for_its_results_is_refused_clearly() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "50"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let store = azurite.store();
    let longest = aoai_blob_batch::submit::MAX_INPUT_NAME_CHARS;
    let body = chat_line("x", "q") + "\n";
    let ok = format!("long/{}.jsonl", "k".repeat(longest - 11));
    let too_long = format!("long/{}.jsonl", "t".repeat(longest - 10));
    assert_eq!((ok.len(), too_long.len()), (longest, longest + 1));
    let (url, etag) = upload_input(&store, &too_long, body.as_bytes()).await;
    let (status, answer) = handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, &etag, body.len() as u64)),
        )
        .await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    assert!(
        answer
            .logs
            .iter()
            .any(|l| l.contains("1017 characters")
                && l.contains("rename it to at most 1016 characters")),
        "{:?}",
        answer.logs
    );
    upload_input(&store, &ok, body.as_bytes()).await;
    let path = ok.strip_suffix(".jsonl").unwrap();
    let summary = eventually(
        Duration::from_secs(30),
        "the 1,016-character input",
        || async {
            handler.tick().await;
            read_json(&store, "batch-output", &format!("{path}/summary.json")).await
        },
    )
    .await;
    assert_eq!(summary["status"], "completed");
    assert_eq!(emulator.batches().await.len(), 1, "only the name that fits");
    let outputs: Vec<_> = store.list("batch-output", "").try_collect().await.unwrap();
    assert!(
        outputs.iter().all(|o| o.name.starts_with(path)),
        "{outputs:?}"
    );
}

/// A name with a `.` or `..` segment: `t/../up.jsonl` is a legal blob name (the SDK stores it
/// as is), but a URL parser resolves the segment, so its URL names another blob.
#[tokio::test]
async fn dot_segments_never_send_another_blob_to_the_service() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "50"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let store = azurite.store();
    let file = |ids: &[&str]| {
        ids.iter()
            .map(|id| chat_line(id, "q") + "\n")
            .collect::<String>()
    };
    // Found by the timer's sweep, as without Event Grid.
    let dotted = "dots/a/../b.jsonl";
    upload_input(&store, dotted, file(&["dotted-0", "dotted-1"]).as_bytes()).await;
    let (plain_url, _) = upload_input(
        &store,
        "dots/a/b.jsonl",
        file(&["plain-0", "plain-1", "plain-2"]).as_bytes(),
    )
    .await;
    for _ in 0..40 {
        handler.tick().await;
        let active: Vec<_> = store
            .list("batch-jobs", "active/")
            .try_collect()
            .await
            .unwrap();
        if active.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let batches = emulator.batches().await;
    let reading_plain = batches
        .iter()
        .filter(|b| b.input_blob.as_deref() == Some(plain_url.as_str()))
        .count();
    let dotted_summary = read_json(&store, "batch-output", "dots/a/../b/summary.json").await;
    assert_eq!(
        reading_plain,
        1,
        "dots/a/b.jsonl is read by one batch, its own; all batches: {:?}; the dotted file's \
         summary: {dotted_summary:?}",
        batches
            .iter()
            .map(|b| b.input_blob.clone().unwrap_or_default())
            .collect::<Vec<_>>()
    );
}
