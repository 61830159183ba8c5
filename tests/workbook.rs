//! The dashboard (issue 16): the workbook in infra/workbook/ reads the handler's log lines,
//! so every field one of its queries reads must be one the handler prints. A real run
//! (Azurite, the batch emulator in manual step mode, the real handler; the test plays the
//! Functions host) ends one file of each kind: completed, split and completed, rejected,
//! failed (a deployment the service does not have), cancelled (input deleted) and one that
//! waited in line for quota, then completed. Its log lines, as the host
//! gets them twice (the handler's stdout, and each invocation's `Logs`), are then checked
//! against every query of the workbook.
//!
//! The convention that makes a query's fields findable: a query reads a field only with
//! `extract(@"\bKEY=(PATTERN)…", 1, message)` and filters lines only with
//! `message contains "event="`; this test refuses a query that reads `message` any other
//! way. Each KEY's pattern, compiled as a Rust regex (the same syntax as Kusto's RE2 for
//! what the queries use), must capture a value from a line of the events the query keeps.
//!
//! Run alone: `cargo test --test workbook`.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use regex::Regex;
use serde_json::Value;
use support::*;

const WORKBOOK: &str = "infra/workbook/batch-jobs.workbook.json";

/// `summary.json`'s statuses (DESIGN.md Contract): the only outcomes a finished line has.
const OUTCOMES: [&str; 5] = ["completed", "failed", "expired", "cancelled", "rejected"];

/// One panel's query and what it reads, found by the convention above.
struct Query {
    panel: String,
    /// KEY → the pattern the query extracts it with.
    fields: BTreeMap<String, String>,
    /// The `event=` values it compares against.
    events: BTreeSet<String>,
    /// The `outcome=` values it compares against.
    outcomes: BTreeSet<String>,
}

fn queries() -> Vec<Query> {
    let text = std::fs::read_to_string(root().join(WORKBOOK)).expect("the workbook JSON");
    let workbook: Value = serde_json::from_str(&text).expect("the workbook is JSON");
    let extract = Regex::new(r#"extract\(@"((?:[^"]|"")*)",\s*1,\s*message\)"#).unwrap();
    let key = Regex::new(r"^\\b(\w+)=").unwrap();
    let quoted = Regex::new(r#""(\w+)""#).unwrap();
    let compared = |name: &str, query: &str| -> BTreeSet<String> {
        let re = Regex::new(&format!(
            r#"\b{name}\s*(?:==|!=)\s*("\w+")|\b{name}\s+in\s*\(([^)]*)\)"#
        ))
        .unwrap();
        re.captures_iter(query)
            .flat_map(|c| {
                let found = c.get(1).or(c.get(2)).unwrap().as_str();
                quoted
                    .captures_iter(found)
                    .map(|q| q[1].to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let items = workbook["items"].as_array().expect("items");
    let mut out = Vec::new();
    for item in items.iter().filter(|i| i["type"] == 3) {
        let panel = item["name"].as_str().unwrap().to_string();
        let query = item["content"]["query"].as_str().unwrap().to_string();
        let mut fields = BTreeMap::new();
        for c in extract.captures_iter(&query) {
            let pattern = c[1].replace("\"\"", "\"");
            let k = key
                .captures(&pattern)
                .unwrap_or_else(|| panic!("{panel}: {pattern} does not start with \\bKEY="))[1]
                .to_string();
            fields.insert(k, pattern);
        }
        // Every use of `message` is one of the convention's: nothing read another way.
        let uses = query.matches("message").count();
        let known = extract.find_iter(&query).count()
            + query.matches("message contains \"event=\"").count();
        assert_eq!(
            uses, known,
            "{panel}: reads `message` outside the convention (extract(@\"\\bKEY=…\", 1, message)), \
             so this test cannot check its fields:\n{query}"
        );
        assert!(!fields.is_empty(), "{panel} reads no field");
        out.push(Query {
            events: compared("event", &query),
            outcomes: compared("outcome", &query),
            panel,
            fields,
        });
    }
    assert!(out.len() >= 5, "the workbook's panels: {}", out.len());
    out
}

/// The run's log lines as one copy of them reaches `traces`.
struct Copy {
    what: &'static str,
    lines: Vec<String>,
}

impl Copy {
    fn field<'a>(&self, line: &'a str, pattern: &Regex) -> Option<&'a str> {
        pattern
            .captures(line)
            .and_then(|c| c.get(1))
            .map(|m| m.as_str())
            .filter(|v| !v.is_empty())
    }

    /// Checks every field of `q` against this copy: for each, some line of an event the
    /// query keeps yields a value. Returns what is missing, one line each.
    fn missing(&self, q: &Query) -> Vec<String> {
        let event = Regex::new(&q.fields["event"]).expect("the event pattern compiles");
        let kept: Vec<&String> = self
            .lines
            .iter()
            .filter(|l| self.field(l, &event).is_some_and(|e| q.events.contains(e)))
            .collect();
        let mut missing = Vec::new();
        for e in &q.events {
            if !kept.iter().any(|l| self.field(l, &event) == Some(e)) {
                missing.push(format!(
                    "{}: event={e} is never printed ({})",
                    q.panel, self.what
                ));
            }
        }
        for (key, pattern) in &q.fields {
            let re = Regex::new(pattern)
                .unwrap_or_else(|e| panic!("{}: {pattern} is not a regex here: {e}", q.panel));
            if !kept.iter().any(|l| self.field(l, &re).is_some()) {
                missing.push(format!(
                    "{}: field {key}= (read with {pattern}) is on no line of events {:?} ({})",
                    q.panel, q.events, self.what
                ));
            }
        }
        missing
    }
}

fn lines(n: usize, prefix: &str) -> Vec<u8> {
    chat_lines(n, prefix, "question")
}

/// The run, with each invocation's `Logs` kept.
struct Run {
    s: Stack,
    logs: Vec<String>,
}

impl Run {
    async fn submit(&mut self, name: &str, body: &[u8]) {
        let submitted = self.s.submit(name, body).await;
        self.logs.extend(submitted.logs);
    }

    async fn tick(&mut self) {
        let (status, answer) = self.s.handler.tick().await;
        assert_eq!(status, 200, "{:?}", answer.logs);
        self.logs.extend(answer.logs);
    }

    /// Steps the emulator's batches and ticks until `{path}/summary.json` has `status`.
    async fn finish(&mut self, path: &str, status: &str) {
        let store = self.s.azurite.store();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.s.emulator.advance().await;
            self.tick().await;
            if let Some(summary) =
                read_json(&store, "batch-output", &format!("{path}/summary.json")).await
            {
                assert_eq!(summary["status"], status, "{summary:#}");
                return;
            }
            assert!(Instant::now() < deadline, "{path} did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn every_field_the_workbook_reads_is_printed_by_the_handler() {
    let queries = queries();
    // 1,100 enqueued tokens: one 10-line file at a time (about 84 tokens a line), so the
    // second waits in line for room (event=queued) until the first ends.
    let s = Stack::start(
        &["--step-ms", "0", "--enqueued-token-limit", "1100"],
        &[("BATCH_SPLIT_MAX_REQUESTS", "10")],
    );
    let mut run = Run {
        s,
        logs: Vec::new(),
    };
    // Split into parts of 10 and 2 lines; both fit in the quota.
    run.submit("split.jsonl", &lines(12, "s")).await;
    run.finish("split", "completed").await;
    run.submit("done.jsonl", &lines(2, "d")).await;
    run.finish("done", "completed").await;
    let dup = [chat_line("same", "a"), chat_line("same", "b")].join("\n");
    run.submit("bad.jsonl", dup.as_bytes()).await;
    // A batch the service fails: its lines name a deployment the resource does not have.
    let wrong = String::from_utf8(lines(2, "x"))
        .unwrap()
        .replace(DEPLOYMENT, "no-such-deployment");
    run.submit("wrong.jsonl", wrong.as_bytes()).await;
    run.finish("wrong", "failed").await;
    run.submit("runs.jsonl", &lines(10, "r")).await;
    run.submit("waits.jsonl", &lines(10, "w")).await;
    let store = run.s.azurite.store();
    let waits = read_json(&store, "batch-output", "waits/status.json")
        .await
        .expect("waits.jsonl has a status while it waits");
    assert_eq!(waits["status"], "queued", "{waits:#}");
    // Deleted while running: the sweep cancels it.
    assert!(
        store
            .delete("batch-input", "runs.jsonl", None)
            .await
            .unwrap()
    );
    run.finish("runs", "cancelled").await;
    // Its room freed, the file in line runs.
    run.finish("waits", "completed").await;

    let stdout = Copy {
        what: "the handler's stdout and stderr",
        lines: run
            .s
            .handler
            .proc
            .logs()
            .lines()
            .map(str::to_string)
            .collect(),
    };
    let logs = Copy {
        what: "the invocations' Logs",
        lines: run.logs.clone(),
    };
    let mut missing = Vec::new();
    for q in &queries {
        for o in &q.outcomes {
            if !OUTCOMES.contains(&o.as_str()) {
                missing.push(format!(
                    "{}: outcome {o:?} is not a summary status",
                    q.panel
                ));
            }
        }
        missing.extend(stdout.missing(q));
        missing.extend(logs.missing(q));
    }
    assert!(
        missing.is_empty(),
        "the workbook reads what the handler does not print:\n{}\n\nthe run's Logs:\n{}",
        missing.join("\n"),
        logs.lines.join("\n")
    );

    // What the panels make of this run, by their own patterns: each file at its latest
    // step (Files by status now), and the failures with their codes.
    let q = queries
        .iter()
        .find(|q| q.panel == "latest-failures")
        .expect("the failures panel");
    let re = |k: &str| Regex::new(&q.fields[k]).unwrap();
    let (job, event, outcome, code) = (re("job"), re("event"), re("outcome"), re("code"));
    let mut latest: BTreeMap<String, (String, String)> = BTreeMap::new();
    for line in &logs.lines {
        let get = |r: &Regex| logs.field(line, r).unwrap_or_default().to_string();
        if get(&event) == "finished" {
            let name = get(&job).split('@').next().unwrap().to_string();
            latest.insert(name, (get(&outcome), get(&code)));
        }
    }
    let pair = |o: &str, c: &str| (o.to_string(), c.to_string());
    assert_eq!(latest["done.jsonl"], pair("completed", "-"));
    assert_eq!(latest["split.jsonl"], pair("completed", "-"));
    assert_eq!(latest["waits.jsonl"], pair("completed", "-"));
    assert_eq!(latest["wrong.jsonl"], pair("failed", "model_not_found"));
    // (its code is the service's: the emulator, like Azure, reports the deleted input)
    assert_eq!(latest["runs.jsonl"].0, "cancelled");
    assert_eq!(latest["bad.jsonl"].0, "rejected");
    assert_ne!(
        latest["bad.jsonl"].1, "-",
        "a rejected file names its first problem"
    );
    assert_eq!(latest.len(), 6, "{latest:?}");
    let tokens = Regex::new(
        &queries
            .iter()
            .find(|q| q.panel == "tokens-total")
            .unwrap()
            .fields["tokens"],
    )
    .unwrap();
    assert!(
        logs.lines
            .iter()
            .filter(|l| l.contains("job=done.jsonl@") && l.contains("event=finished"))
            .any(|l| logs
                .field(l, &tokens)
                .is_some_and(|t| t.parse::<u64>().unwrap() > 0)),
        "the completed file's tokens"
    );
    // No secret reaches a line the dashboard reads.
    for line in stdout.lines.iter().chain(&logs.lines) {
        for secret in [API_KEY, ACCOUNT_KEY, "sig=", "AccountKey="] {
            assert!(!line.contains(secret), "a secret in a log line: {line}");
        }
    }
}
