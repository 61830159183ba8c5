//! Security, checked against the real handler binary: it listens on loopback only; an event
//! naming a blob outside the configured account and input container makes it contact nothing;
//! and a full run (submit, harvest, a rejected file, a storage outage) leaves neither the API
//! key, the account key nor a SAS signature in any log, answer, summary, merged file or job
//! record.

mod support;

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use aoai_blob_batch::storage::BlobStore;
use futures::TryStreamExt;
use serde_json::json;
use support::*;

/// The local addresses listening on `port`, from the kernel's own tables.
fn listening_on(port: u16) -> Vec<String> {
    let mut found = Vec::new();
    for (table, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for row in text.lines().skip(1) {
            let cols: Vec<&str> = row.split_whitespace().collect();
            let (addr, p) = cols[1].split_once(':').unwrap();
            // State 0A is LISTEN.
            if cols[3] != "0A" || u16::from_str_radix(p, 16).unwrap() != port {
                continue;
            }
            found.push(if v6 {
                format!("[{addr}]")
            } else {
                let word = u32::from_str_radix(addr, 16).unwrap();
                Ipv4Addr::from(word.to_le_bytes()).to_string()
            });
        }
    }
    found
}

#[tokio::test]
async fn the_handler_listens_on_loopback_only() {
    // The reader of the kernel's table sees what it must: a socket bound to all addresses.
    let any = TcpListener::bind("0.0.0.0:0").unwrap();
    assert_eq!(listening_on(any.local_addr().unwrap().port()), ["0.0.0.0"]);
    drop(any);

    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &[]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    assert_eq!(
        listening_on(handler.port),
        ["127.0.0.1"],
        "bound to 127.0.0.1 alone: not 0.0.0.0, not [::]"
    );
    let connect = |ip: &str| {
        TcpStream::connect_timeout(
            &SocketAddr::new(ip.parse().unwrap(), handler.port),
            Duration::from_secs(2),
        )
    };
    assert!(connect("127.0.0.1").is_ok());
    // Other loopback addresses of this machine do not reach it. (Non-loopback interface
    // addresses are not tried: the bind address above already rules them out.)
    assert!(connect("127.0.0.2").is_err());
    assert!(connect("::1").is_err());
    println!(
        "FIGURE loopback: handler port {} bound on {:?}; 127.0.0.2 and [::1] refused",
        handler.port,
        listening_on(handler.port)
    );
}

/// A listener that must never be contacted; `contacted` tells whether anything connected.
struct Trap(TcpListener);

impl Trap {
    fn bind(addr: &str) -> Option<Trap> {
        let l = TcpListener::bind(addr).ok()?;
        l.set_nonblocking(true).unwrap();
        Some(Trap(l))
    }

    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }

    fn contacted(&self) -> bool {
        self.0.accept().is_ok()
    }
}

#[tokio::test]
async fn events_for_blobs_elsewhere_contact_nothing() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let store = azurite.store();
    let body = format!("{}\n", chat_line("a", "q"));
    let (own_url, etag) = upload_input(&store, "test.jsonl", body.as_bytes()).await;
    store.ensure_container("private").await.unwrap();
    upload_input(&store, "other.jsonl", body.as_bytes()).await;

    let p = azurite.port;
    // Stand-ins for "someone else's storage": any connection to them is a failure.
    let foreign = Trap::bind("127.0.0.1:0").unwrap();
    let f = foreign.port();
    // Same port as Azurite on other loopback addresses (Azurite is bound to 127.0.0.1 only).
    let alias_v4 = Trap::bind(&format!("127.0.0.2:{p}"));
    let alias_v6 = Trap::bind(&format!("[::1]:{p}"));

    let acct = "devstoreaccount1";
    let cases: Vec<(&str, String)> = vec![
        (
            "foreign host",
            format!("http://127.0.0.1:{f}/{acct}/batch-input/test.jsonl"),
        ),
        (
            "other account",
            format!("http://127.0.0.1:{p}/otheraccount/batch-input/test.jsonl"),
        ),
        ("other container", store.blob_url("private", "test.jsonl")),
        (
            "state container",
            store.blob_url("batch-jobs", "active/x.jsonl"),
        ),
        (
            "output container",
            store.blob_url("batch-output", "x.jsonl"),
        ),
        (
            "IPv6 loopback",
            format!("http://[::1]:{p}/{acct}/batch-input/test.jsonl"),
        ),
        (
            "127.0.0.2 alias",
            format!("http://127.0.0.2:{p}/{acct}/batch-input/test.jsonl"),
        ),
        (
            "localhost alias",
            format!("http://localhost:{p}/{acct}/batch-input/test.jsonl"),
        ),
        (
            "https",
            format!("https://127.0.0.1:{p}/{acct}/batch-input/test.jsonl"),
        ),
        (
            "userinfo",
            format!("http://evil@127.0.0.1:{p}/{acct}/batch-input/test.jsonl"),
        ),
        (
            "credentials in URL",
            format!("http://user:pa55@127.0.0.1:{p}/{acct}/batch-input/test.jsonl"),
        ),
        (
            "our host as userinfo of a foreign one",
            format!("http://127.0.0.1:{p}@127.0.0.1:{f}/{acct}/batch-input/test.jsonl"),
        ),
        (
            "dot-dot to another container",
            format!("http://127.0.0.1:{p}/{acct}/batch-input/../private/test.jsonl"),
        ),
        (
            "encoded dot-dot to another container",
            format!("http://127.0.0.1:{p}/{acct}/batch-input/%2e%2E/private/test.jsonl"),
        ),
        (
            "dot-dot to another account",
            format!("http://127.0.0.1:{p}/{acct}/../otheraccount/batch-input/test.jsonl"),
        ),
        (
            "encoded slash in the container",
            format!("http://127.0.0.1:{p}/{acct}/batch-input%2F..%2Fprivate/test.jsonl"),
        ),
        (
            "encoded container name of another",
            format!("http://127.0.0.1:{p}/{acct}/%70rivate/test.jsonl"),
        ),
        (
            "container only",
            format!("http://127.0.0.1:{p}/{acct}/batch-input"),
        ),
        ("file URL", "file:///etc/passwd".to_string()),
        ("not .jsonl", store.blob_url("batch-input", "notes.txt")),
        (
            "case of the account",
            format!("http://127.0.0.1:{p}/DEVSTOREACCOUNT1/batch-input/test.jsonl"),
        ),
    ];
    for (what, url) in &cases {
        let (status, answer) = handler
            .invoke(
                "function-trigger",
                &trigger_payload(blob_created_event(url, &etag, 10)),
            )
            .await;
        assert_eq!(status, 200, "{what}: {url}");
        let logs = answer.logs.join("\n");
        assert!(logs.contains("ignored"), "{what}: {url}: {logs}");
    }
    assert!(!foreign.contacted(), "the handler contacted a foreign host");
    for trap in [&alias_v4, &alias_v6].into_iter().flatten() {
        assert!(!trap.contacted(), "the handler contacted an alias address");
    }
    assert!(
        emulator.batches().await.is_empty(),
        "no batch for anything outside batch-input"
    );

    // The same blob spelt differently still is our own input, read from our account only.
    let spellings = [
        format!("http://127.0.0.1:{p}/{acct}/batch-input/%74est.jsonl"),
        format!("http://127.0.0.1:{p}/{acct}/batch-input/test.jsonl?sig=forged&se=2099"),
        format!("http://127.0.0.1:{p}/{acct}/batch-input/./test.jsonl#frag"),
    ];
    for url in &spellings {
        let (status, answer) = handler
            .invoke(
                "function-trigger",
                &trigger_payload(blob_created_event(url, &etag, 10)),
            )
            .await;
        assert_eq!(status, 200, "{url}: {:?}", answer.logs);
        assert!(
            !answer.logs.join("\n").contains("forged"),
            "a query from an event is not echoed"
        );
    }
    let batches = emulator.batches().await;
    assert_eq!(batches.len(), 1, "one batch for test.jsonl: {batches:?}");
    assert_eq!(batches[0].input_blob.as_deref(), Some(own_url.as_str()));
    assert!(!foreign.contacted());
    println!(
        "FIGURE foreign-events: {} events naming blobs outside batch-input of the configured \
         account -> 0 requests to other hosts, 0 batches; {} spellings of our own blob -> 1 batch \
         reading our canonical URL",
        cases.len(),
        spellings.len()
    );
}

/// Every blob in a container, as text (lossy), with its name.
async fn contents(store: &BlobStore, container: &str) -> Vec<(String, String)> {
    let items: Vec<_> = match store.list(container, "").try_collect().await {
        Ok(items) => items,
        Err(_) => return Vec::new(),
    };
    let mut out = Vec::new();
    for item in items {
        if let Some((bytes, _)) = store.read(container, &item.name).await.unwrap() {
            out.push((
                format!("{container}/{}", item.name),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn a_full_run_leaks_no_secret() {
    const SECRET_API_KEY: &str = "sk-SECRET-apikey-5f0c1e9d27b84a6b";
    let dir = tempfile::tempdir().unwrap();
    let mut azurite = Azurite::start_persistent(dir.path(), 0);
    let port = azurite.port;
    let emulator = Emulator::start(
        &azurite,
        &[
            "--step-ms",
            "200",
            "--line-failure-rate",
            "0.3",
            "--http-500-rate",
            "0.05",
            "--seed",
            "3",
        ],
    );
    let mut env = handler_env(&azurite, &emulator);
    for (k, v) in env.iter_mut() {
        if k == "AZURE_OPENAI_API_KEY" {
            *v = SECRET_API_KEY.to_string();
        }
    }
    let handler = Handler::start(env);
    let store = azurite.store();
    let mut answers: Vec<String> = Vec::new();
    let deliver = async |url: &str, etag: &str, answers: &mut Vec<String>| {
        let (status, answer) = handler
            .invoke(
                "function-trigger",
                &trigger_payload(blob_created_event(url, etag, 10)),
            )
            .await;
        answers.extend(answer.logs);
        status
    };
    let good: String = (0..12)
        .map(|i| chat_line(&format!("g-{i}"), "q") + "\n")
        .collect();
    let (good_url, good_etag) = upload_input(&store, "run/good.jsonl", good.as_bytes()).await;
    let (bad_url, bad_etag) = upload_input(&store, "run/bad.jsonl", b"{oops\n").await;
    let (late_url, late_etag) = upload_input(&store, "run/late.jsonl", good.as_bytes()).await;
    for _ in 0..10 {
        if deliver(&good_url, &good_etag, &mut answers).await == 200 {
            break;
        }
    }
    assert_eq!(deliver(&bad_url, &bad_etag, &mut answers).await, 200);

    // A storage outage mid-job: an event and ticks meet connection failures.
    assert!(azurite.proc.terminate(Duration::from_secs(20)).is_some());
    assert!(deliver(&late_url, &late_etag, &mut answers).await >= 500);
    for _ in 0..2 {
        let (_, answer) = handler.tick().await;
        answers.extend(answer.logs);
    }
    drop(azurite);
    let _azurite = Azurite::start_persistent(dir.path(), port);
    for _ in 0..20 {
        if deliver(&late_url, &late_etag, &mut answers).await == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, answer) = handler.tick().await;
        answers.extend(answer.logs);
        let status = |s: Option<serde_json::Value>| s.map(|s| s["status"].clone());
        let good = status(read_json(&store, "batch-output", "run/good/summary.json").await);
        let late = status(read_json(&store, "batch-output", "run/late/summary.json").await);
        if let (Some(good), Some(late)) = (good, late) {
            assert_eq!((good, late), ("completed".into(), "completed".into()));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no summaries");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rejected = read_json(&store, "batch-output", "run/bad/summary.json")
        .await
        .unwrap();
    assert_eq!(rejected["status"], "rejected");

    let handler_logs = handler.proc.logs();
    // The scan covers the paths that print URLs and errors.
    let all_answers = answers.join("\n");
    assert!(all_answers.contains("batch="), "submissions logged");
    assert!(all_answers.contains("rejected"), "the rejection logged");
    assert!(
        handler_logs.contains("will be retried") || handler_logs.contains("transient"),
        "the storage fault was met and logged:\n{handler_logs}"
    );
    let mut texts = vec![
        ("handler stdout+stderr".to_string(), handler_logs),
        ("invocation Logs".to_string(), all_answers),
    ];
    for container in ["batch-output", "batch-jobs"] {
        texts.extend(contents(&store, container).await);
    }
    let files = texts.len() - 2;
    assert!(
        files >= 8,
        "summaries, merged, results, errors, records: {files}"
    );
    let secrets = [
        SECRET_API_KEY,
        API_KEY,
        ACCOUNT_KEY,
        &ACCOUNT_KEY[..20],
        "AccountKey",
    ];
    // A SAS is harmless without its signature: `sig=` may appear only as `sig=REDACTED` (the
    // storage SDK's own log of a failed request writes it so).
    let mut redacted = 0;
    for (what, text) in &texts {
        let around = |at: usize| {
            let from = text[..at].char_indices().rev().nth(200).map_or(0, |c| c.0);
            text[from..(at + 80).min(text.len())].to_string()
        };
        for secret in secrets {
            if let Some(at) = text.find(secret) {
                panic!("{what} contains {secret:?}: …{}…", around(at));
            }
        }
        for sig in ["sig=", "sig%3D", "sig%3d"] {
            for (at, _) in text.match_indices(sig) {
                let value = &text[at + sig.len()..];
                assert!(
                    value.starts_with("REDACTED"),
                    "{what} holds a SAS signature: …{}…",
                    around(at)
                );
                redacted += 1;
            }
        }
    }
    let bytes: usize = texts.iter().map(|(_, t)| t.len()).sum();
    println!(
        "FIGURE secrets: full run (2 jobs submitted and harvested, 1 rejected, Azurite stopped \
         mid-job, 5% service 500s) -> scanned handler logs, {} invocation log lines and {files} \
         blobs ({bytes} bytes): 0 API keys, 0 account keys, 0 SAS signatures ({redacted} \
         `sig=REDACTED`)",
        answers.len()
    );
}

#[tokio::test]
async fn a_payload_that_is_not_an_event_reads_nothing() {
    // Host payloads that try to smuggle a URL in another field: only `data.url` counts.
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let trap = Trap::bind("127.0.0.1:0").unwrap();
    let t = trap.port();
    let foreign = format!("http://127.0.0.1:{t}/devstoreaccount1/batch-input/x.jsonl");
    for payload in [
        json!({"Data": {"event": {"eventType": "Microsoft.Storage.BlobCreated", "subject": foreign, "data": {}}}}),
        json!({"Data": {"event": {"eventType": "Microsoft.Storage.BlobDeleted", "data": {"url": foreign}}}}),
        json!({"Data": {"event": {"eventType": "Microsoft.Storage.BlobCreated", "data": {"url": foreign, "eTag": "\"0x1\""}}}}),
        json!({"Data": {"event": [{"eventType": "Microsoft.Storage.BlobCreated", "data": {"url": foreign}}]}}),
    ] {
        let (status, answer) = handler.invoke("function-trigger", &payload).await;
        assert_eq!(status, 200, "{payload}: {:?}", answer.logs);
    }
    assert!(!trap.contacted());
    assert!(emulator.batches().await.is_empty());
}

#[tokio::test]
async fn an_event_url_password_is_not_logged() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let url = format!(
        "http://user:pa55w0rd@127.0.0.1:{}/devstoreaccount1/batch-input/test.jsonl",
        azurite.port
    );
    let (status, answer) = handler
        .invoke(
            "function-trigger",
            &trigger_payload(blob_created_event(&url, "\"0x1\"", 10)),
        )
        .await;
    assert_eq!(status, 200);
    let logs = format!("{}\n{}", answer.logs.join("\n"), handler.proc.logs());
    assert!(logs.contains("ignored"), "{logs}");
    assert!(!logs.contains("pa55w0rd"), "{logs}");
}
