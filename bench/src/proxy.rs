//! A loopback HTTP proxy in front of Azurite or the emulator that records every request
//! (method, path, status, bytes each way, duration) and can add a fixed latency to each one,
//! standing in for the network and service time of Azure.
//!
//! The `Host` header is passed through unchanged: Azurite checks that a copy source URL names
//! the host it was called on, and the handler builds copy sources from its own endpoint (the
//! proxy's).

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::Result;
use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderName, StatusCode},
    response::Response,
};
use bytes::Bytes;
use futures::Stream;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    pub method: String,
    /// Percent-decoded (the SDK encodes the `/` in blob names).
    pub path: String,
    /// The query string as sent (a listing's `comp=list` and `prefix`, a page's `after`).
    pub query: String,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Seconds from the request's arrival to the end of its response body.
    pub secs: f64,
}

struct Inner {
    upstream: String,
    delay: Duration,
    client: reqwest::Client,
    log: Arc<Mutex<Vec<Record>>>,
}

pub struct Proxy {
    pub port: u16,
    log: Arc<Mutex<Vec<Record>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`) adding `delay` to every request.
    pub async fn start(upstream: &str, delay: Duration) -> Result<Proxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let inner = Arc::new(Inner {
            upstream: upstream.trim_end_matches('/').to_string(),
            delay,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?,
            log: log.clone(),
        });
        let app = axum::Router::new().fallback(forward).with_state(inner);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Proxy { port, log, task })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Takes the records so far (and clears them).
    pub fn take(&self) -> Vec<Record> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

fn is_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

async fn forward(State(s): State<Arc<Inner>>, req: Request) -> Response {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let mut record = Record {
        method: parts.method.to_string(),
        path: percent_encoding_decode(parts.uri.path()),
        query: parts.uri.query().unwrap_or_default().to_string(),
        status: 0,
        request_bytes: 0,
        response_bytes: 0,
        secs: 0.0,
    };
    if !s.delay.is_zero() {
        tokio::time::sleep(s.delay).await;
    }
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(_) => return error(StatusCode::BAD_REQUEST),
    };
    record.request_bytes = body.len() as u64;
    let target = format!(
        "{}{}",
        s.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut builder = s.client.request(parts.method.clone(), target);
    for (name, value) in &parts.headers {
        if !is_hop(name) {
            builder = builder.header(name, value);
        }
    }
    let upstream = match builder.body(body).send().await {
        Ok(r) => r,
        Err(_) => return error(StatusCode::BAD_GATEWAY),
    };
    record.status = upstream.status().as_u16();
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if !is_hop(name) {
            response = response.header(name, value);
        }
    }
    let counted = Counted {
        inner: Box::pin(upstream.bytes_stream()),
        record: Some(record),
        arrived,
        log: s.log.clone(),
    };
    response
        .body(Body::from_stream(counted))
        .unwrap_or_else(|_| error(StatusCode::BAD_GATEWAY))
}

fn error(status: StatusCode) -> Response {
    Response::builder()
        .status(status)
        .body(Body::empty())
        .expect("static response")
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The response body on its way back, counted; the record is logged when it ends (or is
/// dropped by a client that hung up).
struct Counted {
    inner: ByteStream,
    record: Option<Record>,
    arrived: Instant,
    log: Arc<Mutex<Vec<Record>>>,
}

impl Stream for Counted {
    type Item = reqwest::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &polled
            && let Some(r) = self.record.as_mut()
        {
            r.response_bytes += chunk.len() as u64;
        }
        if let Poll::Ready(None) = &polled {
            self.finish();
        }
        polled
    }
}

impl Counted {
    fn finish(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.secs = self.arrived.elapsed().as_secs_f64();
            self.log.lock().unwrap().push(r);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.finish();
    }
}

fn percent_encoding_decode(path: &str) -> String {
    percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned()
}
