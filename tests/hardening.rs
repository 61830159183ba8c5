//! Faults the stand-ins never produce on their own, made on purpose: a create whose answer
//! is lost on the way back, a storage account that refuses the handler, a storage answer
//! without an ETag. Each test failed before the fix it guards (issue 13).

mod support;

use std::{sync::Arc, time::Duration};

use serde_json::Value;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Mutex,
};

/// Reads one HTTP/1.1 request (head and `Content-Length` body) off `conn`.
async fn read_request(conn: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + length {
            return Some(buf);
        }
    }
}

/// A proxy in front of the emulator that loses the answer to every create: it takes the
/// request, closes the connection without answering, and delivers the request `delay`
/// later, as a request stuck on the way would arrive after its client gave up. Everything
/// else passes through. Returns its port and the creates it delivered.
async fn answer_losing_proxy(upstream: u16, delay: Duration) -> (u16, Arc<Mutex<Vec<u16>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let log = delivered.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let Some(request) = read_request(&mut client).await else {
                    return;
                };
                let mut server = TcpStream::connect(("127.0.0.1", upstream)).await.unwrap();
                if request.starts_with(b"POST ") && !request.starts_with(b"POST /_") {
                    drop(client); // the answer is lost
                    tokio::time::sleep(delay).await;
                    server.write_all(&request).await.unwrap();
                    let mut head = [0u8; 12];
                    let _ = server.read_exact(&mut head).await;
                    let status = String::from_utf8_lossy(&head[9..12]).parse().unwrap_or(0);
                    log.lock().await.push(status);
                } else {
                    server.write_all(&request).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (port, delivered)
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_keeps_its_window_and_makes_one_batch() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    let store = azurite.store();
    // A reaches the service through a path that loses create answers; B directly. A's
    // create window is 30 s.
    let (proxy, delivered) = answer_losing_proxy(emulator.port, Duration::from_secs(2)).await;
    let mut env_a = handler_env(&azurite, &emulator);
    env_a.push(("BATCH_CREATE_TIMEOUT_SECONDS".into(), "30".into()));
    for (k, v) in env_a.iter_mut() {
        if k == "AZURE_OPENAI_ENDPOINT" {
            *v = format!("http://127.0.0.1:{proxy}");
        }
    }
    let a = Handler::start(env_a);
    let b = Handler::start(handler_env(&azurite, &emulator));
    let body = format!("{}\n", chat_line("lost-1", "where did the answer go?"));
    let (url, etag) = upload_input(&store, "lost/answer.jsonl", body.as_bytes()).await;
    let event = trigger_payload(blob_created_event(&url, &etag, body.len() as u64));

    // A's create is sent and its answer lost: a fault worth a redelivery.
    let (status, answer) = a.invoke("function-trigger", &event).await;
    assert_eq!(status, 500, "{:?}", answer.logs);

    // Event Grid redelivers at once, to B. The create may still be on its way: B must not
    // create another.
    let (status, answer) = b.invoke("function-trigger", &event).await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    eventually(Duration::from_secs(10), "A's create delivered", || async {
        (!delivered.lock().await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        delivered.lock().await.as_slice(),
        [201],
        "A's create arrived (201 Created)"
    );
    assert_eq!(
        emulator.batches().await.len(),
        1,
        "B created a second batch while A's create was on its way: {:?}",
        answer.logs
    );

    // Once the window is over, the next delivery looks for the batch and adopts it.
    advance_clock(&b, 31).await;
    let (status, answer) = b.invoke("function-trigger", &event).await;
    assert_eq!(status, 200, "{:?}", answer.logs);
    let logs = answer.logs.join("\n");
    assert!(logs.contains("adopted"), "{logs}");
    let batches = emulator.batches().await;
    assert_eq!(batches.len(), 1, "{batches:?}");
    let key = format!("lost/answer.jsonl@{}", etag.trim_matches('"'));
    let record: Value = read_json(&store, "batch-jobs", &format!("active/{key}.json"))
        .await
        .unwrap();
    assert_eq!(record["state"], "running");
    assert_eq!(record["batch_id"], batches[0].id.as_str());
}

/// An event for `name` in the input container of the storage at `port` (the blob need not
/// exist).
fn event_for(port: u16, name: &str) -> Value {
    let url = format!("http://127.0.0.1:{port}/devstoreaccount1/batch-input/{name}");
    trigger_payload(blob_created_event(&url, "\"0x8D0000000000001\"", 100))
}

#[tokio::test]
async fn a_fault_a_redelivery_would_meet_again_is_answered_2xx_and_said_once() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    // The account refuses this handler: its key is not the account's (403 on every call).
    let wrong_key = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ==";
    let mut env = handler_env(&azurite, &emulator);
    for (k, v) in env.iter_mut() {
        if k == "BATCH_STORAGE_CONNECTION_STRING" {
            *v = v.replace(ACCOUNT_KEY, wrong_key);
        }
    }
    let handler = Handler::start(env);
    let (status, answer) = handler
        .invoke(
            "function-trigger",
            &event_for(azurite.port, "refused.jsonl"),
        )
        .await;
    let logs = answer.logs.join("\n");
    assert_eq!(
        status, 200,
        "Event Grid would redeliver a 5xx for a day, meeting the same 403: {logs}"
    );
    assert!(logs.contains("not retried"), "{logs}");
    assert!(logs.contains("403"), "the log line names the fault: {logs}");
    assert!(
        !logs.contains(wrong_key) && !logs.contains("sig="),
        "{logs}"
    );
}

#[tokio::test]
async fn a_fault_that_can_pass_is_answered_5xx_for_a_redelivery() {
    let mut azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    let handler = Handler::start(handler_env(&azurite, &emulator));
    let event = event_for(azurite.port, "outage.jsonl");
    azurite.proc.kill(); // storage unreachable: connection refused
    let (status, answer) = handler.invoke("function-trigger", &event).await;
    let logs = answer.logs.join("\n");
    assert_eq!(status, 500, "{logs}");
    assert!(logs.contains("will be retried"), "{logs}");
}

/// A reverse proxy in front of Azurite that drops every `ETag` header from its answers.
async fn etag_stripping_proxy(upstream: u16) -> u16 {
    use axum::{body::Bytes, extract::Request, http::HeaderMap, response::Response};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = reqwest::Client::new();
    let forward = move |req: Request| {
        let client = client.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let url = format!("http://127.0.0.1:{upstream}{}", parts.uri);
            let mut headers = HeaderMap::new();
            for (k, v) in &parts.headers {
                if k != "host" && k != "content-length" {
                    headers.append(k, v.clone());
                }
            }
            let resp = client
                .request(parts.method, url)
                .headers(headers)
                .body(body)
                .send()
                .await
                .unwrap();
            let mut out = Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                if k != "etag" && k != "content-length" && k != "transfer-encoding" {
                    out = out.header(k, v);
                }
            }
            out.body(axum::body::Body::from(resp.bytes().await.unwrap()))
                .unwrap()
        }
    };
    let app = axum::Router::new().fallback(forward);
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

#[tokio::test]
async fn a_blob_answered_without_an_etag_gets_no_job() {
    let azurite = Azurite::start();
    let emulator = Emulator::start(&azurite, &["--step-ms", "60000"]);
    let store = azurite.store();
    let body = format!("{}\n", chat_line("e-1", "which version am I?"));
    upload_input(&store, "no-etag.jsonl", body.as_bytes()).await;
    // Made here, not left to the handler's start (which runs it in the background).
    store.ensure_container("batch-jobs").await.unwrap();
    let proxy = etag_stripping_proxy(azurite.port).await;
    let mut env = handler_env(&azurite, &emulator);
    for (k, v) in env.iter_mut() {
        if k == "BATCH_STORAGE_CONNECTION_STRING" {
            *v = v.replace(&format!(":{}/", azurite.port), &format!(":{proxy}/"));
        }
    }
    let handler = Handler::start(env);
    let (status, answer) = handler
        .invoke("function-trigger", &event_for(proxy, "no-etag.jsonl"))
        .await;
    let logs = answer.logs.join("\n");
    assert_eq!(status, 200, "{logs}");
    assert!(logs.contains("without an ETag"), "{logs}");
    // Keyed on `name@` (no ETag), every version of the blob would have been one job.
    let records = blob_names(&store, "batch-jobs", "").await;
    assert!(records.is_empty(), "{records:?}");
    assert!(emulator.batches().await.is_empty());
}
