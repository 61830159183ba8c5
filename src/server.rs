//! The custom handler's HTTP face: the routes the Functions host calls.
//!
//! Handlers stay small: decode the host payload (`protocol`), call the core (`submit`,
//! `poll`), answer the host's JSON. Non-2xx only where a retry can help.
//!
//! A debug build started with `BATCH_TEST_HOOKS=1` also serves `POST /_test/clock?advance=N`,
//! which moves the handler's clock N seconds ahead (a lease lapses without a test waiting for
//! it). Release builds, the one published, have no such route.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    routing::{get, post},
};
use tower_http::catch_panic::CatchPanicLayer;

use crate::{
    app::{App, Journal, guarded, panic_message},
    cancel,
    config::{TEST_SWITCHES_COMPILED, names},
    poll,
    protocol::{
        self, BlobDeleted, INVOCATION_ID_HEADER, InvocationRequest, InvocationResponse,
        StorageEvent,
    },
    submit::{self, Intake},
    webhook::{self, Handled, signature},
};

/// Binding names from the function folders (the Contract).
pub const EVENT_BINDING: &str = "event";
pub const TIMER_BINDING: &str = "timer";
/// function-webhook's bindings: the HTTP trigger and its http output.
pub const HTTP_BINDING: &str = "req";
pub const HTTP_OUTPUT: &str = "res";

pub fn router(app: Arc<App>) -> Router {
    let router = Router::new()
        .route("/", get(ready))
        .route("/function-trigger", post(function_trigger))
        .route("/function-timer", post(function_timer))
        // With `enableForwardingHttpRequest` (host.json) the host forwards an HTTP-in/out
        // function's request as it came, to the request's own path (`/api/{function}`);
        // without it, the request comes as `Data.req` to `/{function}` like the other
        // triggers. Both are served; the first keeps the exact bytes the signature covers.
        .route("/api/function-webhook", post(function_webhook_forwarded))
        .route("/function-webhook", post(function_webhook_envelope));
    let router = if TEST_SWITCHES_COMPILED && test_hooks_enabled() {
        tracing::warn!("test hooks are on (BATCH_TEST_HOOKS=1): the clock can be moved");
        router.route("/_test/clock", post(advance_clock))
    } else {
        router
    };
    with_panic_boundary(router.with_state(app))
}

/// The last boundary: a panic anywhere in a route (the workflows catch their own, naming
/// the job, see `app::guarded`) is answered with the host's JSON and a logged error line,
/// instead of a dropped connection the host can only redeliver into the same panic.
fn with_panic_boundary(router: Router) -> Router {
    router.layer(CatchPanicLayer::custom(
        |payload: Box<dyn std::any::Any + Send>| {
            let line = format!(
                "the handler panicked (a bug; please report it): {}",
                panic_message(payload.as_ref())
            );
            tracing::error!("{line}");
            let body = InvocationResponse::with_logs(vec![format!("error: {line}")]);
            axum::response::IntoResponse::into_response((
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(body),
            ))
        },
    ))
}

fn test_hooks_enabled() -> bool {
    std::env::var(names::TEST_HOOKS).is_ok_and(|v| v == "1")
}

#[derive(serde::Deserialize)]
struct Advance {
    advance: i64,
}

/// Test hook: moves the handler's clock ahead; answers the new time.
async fn advance_clock(
    State(app): State<Arc<App>>,
    Query(by): Query<Advance>,
) -> Json<serde_json::Value> {
    app.clock.advance(by.advance);
    Json(serde_json::json!({ "now": app.now() }))
}

/// The host's readiness probe.
async fn ready() -> &'static str {
    "ready"
}

type Answer = (StatusCode, Json<InvocationResponse>);

fn answer(status: StatusCode, journal: &Journal) -> Answer {
    (status, Json(InvocationResponse::with_logs(journal.lines())))
}

fn journal_for(headers: &HeaderMap) -> Journal {
    let id = headers
        .get(INVOCATION_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    Journal::new(id)
}

fn parse_request(body: &[u8], journal: &Journal) -> Option<InvocationRequest> {
    match serde_json::from_slice(body) {
        Ok(r) => Some(r),
        Err(e) => {
            // Redelivering the same bytes cannot help: report and answer 2xx.
            journal.error(format!(
                "the host payload is not the expected JSON object: {e}"
            ));
            None
        }
    }
}

async fn function_trigger(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Answer {
    let journal = journal_for(&headers);
    let Some(request) = parse_request(&body, &journal) else {
        return answer(StatusCode::OK, &journal);
    };
    let events = match protocol::decode_events(&request, EVENT_BINDING) {
        Ok(e) => e,
        Err(e) => {
            journal.error(format!("cannot decode the event: {e}"));
            return answer(StatusCode::OK, &journal);
        }
    };
    let mut status = StatusCode::OK;
    for event in events {
        let created = match event {
            StorageEvent::BlobCreated(c) => c,
            StorageEvent::BlobDeleted(d) => {
                if !blob_deleted(&app, &d, &journal).await {
                    status = StatusCode::INTERNAL_SERVER_ERROR;
                }
                continue;
            }
            StorageEvent::Other { event_type, id } => {
                journal.info(format!(
                    "ignored event {id}: type {event_type} is not BlobCreated"
                ));
                continue;
            }
        };
        // Only blobs in the configured account and input container: the handler's identity
        // must not be usable to read whatever an event names. (An ADLS Gen2 account's events
        // name its dfs endpoint: see `locate_event`.)
        let Some((container, name)) = app.store.locate_event(&created.url) else {
            journal.warn(format!(
                "ignored event {}: {} is not in the configured storage account",
                created.id,
                display_url(&created.url)
            ));
            continue;
        };
        if container != app.config.input_container {
            journal.info(format!(
                "ignored event {}: container {container} is not the input container {}",
                created.id, app.config.input_container
            ));
            continue;
        }
        if let Some(api) = created.opens_file() {
            journal.info(format!(
                "ignored event {}: blob={container}/{name}: {api} (contentLength {}) announces \
                 the file before it is written; the event of its last write (FlushWithClose, \
                 SftpCommit) takes it in, or else the timer's sweep",
                created.id,
                created
                    .content_length
                    .map_or_else(|| "-".to_string(), |l| l.to_string())
            ));
            continue;
        }
        let what = format!("blob={container}/{name}");
        match guarded(what, submit::intake(&app, &name, &journal)).await {
            Ok(outcome) => log_outcome(&journal, &container, &name, &outcome),
            // Event Grid redelivers a 5xx for up to a day: worth it only when the fault
            // can pass.
            Err(e) if e.is_transient() => {
                journal.error(format!("blob={container}/{name}: will be retried: {e}"));
                status = StatusCode::INTERNAL_SERVER_ERROR;
            }
            Err(e) => journal.error(format!(
                "blob={container}/{name}: not retried, a redelivery would meet the same \
                 fault; fix it and the timer's sweep takes the file in: {e}"
            )),
        }
    }
    answer(status, &journal)
}

fn log_outcome(journal: &Journal, container: &str, name: &str, outcome: &Intake) {
    let blob = format!("blob={container}/{name}");
    match outcome {
        Intake::Ignored(why) => journal.info(format!("{blob}: ignored: {why}")),
        // Intake said why, in one line.
        Intake::Gone | Intake::CopyPending => {}
        Intake::AlreadyKnown { state, batch_id } => journal.info(format!(
            "{blob}: already has a job ({state:?}, batch={}); nothing to do",
            batch_id.as_deref().unwrap_or("-")
        )),
        Intake::InProgressElsewhere => {}
        Intake::Rejected { problems } => {
            journal.info(format!("{blob}: rejected with {problems} problem(s)"))
        }
        Intake::Submitted { batch_id, adopted } => journal.info(format!(
            "{blob}: batch={batch_id} {}",
            if *adopted { "adopted" } else { "submitted" }
        )),
        Intake::Queued => journal.info(format!("{blob}: queued until quota frees up")),
        Intake::Split { parts, started } => journal.info(format!(
            "{blob}: split into {parts} parts, {started} submitted now (the rest as quota allows)"
        )),
        Intake::Refused => {
            journal.info(format!("{blob}: refused by the service; see summary.json"))
        }
        Intake::Cancelled => journal.info(format!(
            "{blob}: cancelled before its batch was created; see summary.json"
        )),
    }
}

/// An input was deleted: its job (of the deleted version) is cancelled. `false` when a
/// transient fault should have Event Grid deliver the event again (the timer's sweep would
/// also find the job in the end).
async fn blob_deleted(app: &App, event: &BlobDeleted, journal: &Journal) -> bool {
    let Some((container, name)) = app.store.locate_event(&event.url) else {
        journal.warn(format!(
            "ignored event {}: {} is not in the configured storage account",
            event.id,
            display_url(&event.url)
        ));
        return true;
    };
    if container != app.config.input_container || !name.ends_with(".jsonl") {
        journal.info(format!(
            "ignored event {}: blob={container}/{name} deleted; not an input",
            event.id
        ));
        return true;
    }
    let step = async {
        // A blob of that name there now is a newer upload: its job is never cancelled.
        let current = app
            .store
            .properties(&container, &name)
            .await?
            .map(|b| b.etag);
        cancel::input_deleted(app, &name, current.as_deref(), journal).await
    };
    match guarded(format!("blob={container}/{name}"), step).await {
        Ok(Some(_)) => true,
        Ok(None) => {
            journal.info(format!(
                "blob={container}/{name} event=input_deleted: no unfinished job of the deleted \
                 version; nothing to cancel"
            ));
            true
        }
        Err(e) if e.is_transient() => {
            journal.error(format!(
                "blob={container}/{name}: deletion will be retried: {e}"
            ));
            false
        }
        Err(e) => {
            journal.error(format!(
                "blob={container}/{name}: deletion not handled; the timer's sweep cancels its \
                 job: {e}"
            ));
            true
        }
    }
}

/// A URL from outside, for a log line: no userinfo, query or fragment (any could hold a
/// secret), and shortened.
fn display_url(url: &str) -> String {
    let cleaned = match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        // Not a URL at all: keep only what precedes anything that could be a credential.
        Err(_) => url
            .split(['?', '#', '@'])
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    cleaned.chars().take(200).collect()
}

async fn function_timer(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Answer {
    let journal = journal_for(&headers);
    let Some(request) = parse_request(&body, &journal) else {
        return answer(StatusCode::OK, &journal);
    };
    let timer = protocol::decode_timer(&request, TIMER_BINDING);
    if timer.is_past_due {
        journal.warn("timer is past due (a scheduled tick was missed)");
    }
    match poll::tick(&app, &journal).await {
        Ok(_) => answer(StatusCode::OK, &journal),
        // The timer does not redeliver; the next tick simply tries again.
        Err(e) => {
            journal.error(format!("tick stopped early: {e}"));
            answer(StatusCode::OK, &journal)
        }
    }
}

/// function-webhook, forwarded by the host: the service's request itself, answered as the
/// service will see it.
async fn function_webhook_forwarded(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let journal = journal_for(&headers);
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let h = signature::Headers {
        id: get(signature::ID_HEADER),
        timestamp: get(signature::TIMESTAMP_HEADER),
        signature: get(signature::SIGNATURE_HEADER),
    };
    let (status, text) = on_webhook(&app, &journal, h, &body).await;
    (status, text)
}

/// function-webhook in the host's envelope (forwarding off): the request is `Data.req`, the
/// answer `Outputs.res`; the invocation itself always succeeds unless a retry can help.
async fn function_webhook_envelope(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let journal = journal_for(&headers);
    let refused = |journal: &Journal| {
        let mut response = InvocationResponse::with_logs(journal.lines());
        response.outputs.insert(
            HTTP_OUTPUT.to_string(),
            protocol::http_output(400, "refused: not an HTTP request\n"),
        );
        (StatusCode::OK, Json(response))
    };
    let Some(request) = parse_request(&body, &journal) else {
        return refused(&journal);
    };
    let http = match protocol::decode_http_request(&request, HTTP_BINDING) {
        Ok(h) => h,
        Err(e) => {
            journal.error(format!("cannot decode the HTTP request: {e}"));
            return refused(&journal);
        }
    };
    let h = signature::Headers {
        id: http.header(signature::ID_HEADER),
        timestamp: http.header(signature::TIMESTAMP_HEADER),
        signature: http.header(signature::SIGNATURE_HEADER),
    };
    let (status, text) = on_webhook(&app, &journal, h, &http.body).await;
    let mut response = InvocationResponse::with_logs(journal.lines());
    response.outputs.insert(
        HTTP_OUTPUT.to_string(),
        protocol::http_output(status.as_u16(), &text),
    );
    (StatusCode::OK, Json(response))
}

/// Verifies a delivery and acts on it. 400 for anything that is not a delivery signed with a
/// configured secret (nothing is read or written then), 401 when no secret is configured,
/// 500 only for a fault a redelivery can get past, 200 otherwise (a duplicate, an event for
/// another app's batch, a job moved on).
async fn on_webhook(
    app: &Arc<App>,
    journal: &Journal,
    headers: signature::Headers<'_>,
    body: &[u8],
) -> (StatusCode, String) {
    let webhook_id = match signature::verify(&app.config.webhook_keys, headers, body, app.now()) {
        Ok(id) => id.to_string(),
        Err(refusal) => {
            let status = match refusal {
                signature::Refusal::NoSecret => StatusCode::UNAUTHORIZED,
                _ => StatusCode::BAD_REQUEST,
            };
            // The sender's id, when there is one, to find the delivery in the service's
            // logs; never the body or the signature.
            journal.warn(format!(
                "webhook {} refused: {refusal}",
                headers.id.unwrap_or("(no webhook-id)")
            ));
            return (status, format!("refused: {refusal}\n"));
        }
    };
    let Some(event) = webhook::Event::parse(body) else {
        journal.warn(format!(
            "webhook {webhook_id}: signed, but the body is not an event (a JSON object with \
             `type`); ignored"
        ));
        return (StatusCode::OK, "ignored: not an event\n".to_string());
    };
    match webhook::handle(app, &webhook_id, &event, journal).await {
        Ok(handled) => {
            let text = match &handled {
                Handled::Duplicate => "duplicate: handled before".to_string(),
                Handled::Ignored => format!("ignored: {}", event.kind),
                Handled::UnknownBatch => "no active job has this batch".to_string(),
                Handled::Stepped { job, finished } => format!(
                    "job {job} {}",
                    if *finished { "finished" } else { "moved on" }
                ),
                Handled::Continuing { job } => format!("job {job} is being moved on"),
            };
            (StatusCode::OK, format!("{text}\n"))
        }
        Err(e) if e.is_transient() => {
            journal.error(format!(
                "webhook {webhook_id} ({}): will be redelivered: {e}",
                event.kind
            ));
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "transient fault; please redeliver\n".to_string(),
            )
        }
        Err(e) => {
            journal.error(format!(
                "webhook {webhook_id} ({}): not retried; the timer's poll moves the job on: {e}",
                event.kind
            ));
            (StatusCode::OK, "not handled; polling will\n".to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_panic_in_a_route_is_answered_with_the_hosts_json() {
        async fn buggy() -> &'static str {
            panic!("boom")
        }
        let router = with_panic_boundary(Router::new().route("/function-trigger", post(buggy)));
        let request = axum::http::Request::post("/function-trigger")
            .body(Body::empty())
            .unwrap();
        let answer = router.oneshot(request).await.unwrap();
        assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(answer.into_body(), 1 << 20)
            .await
            .unwrap();
        let body: InvocationResponse = serde_json::from_slice(&body).unwrap();
        assert!(body.logs[0].contains("panicked"), "{:?}", body.logs);
        assert!(body.logs[0].contains("boom"), "{:?}", body.logs);
    }
}
