//! Webhooks as Azure OpenAI has them (MicrosoftDocs/azure-ai-docs,
//! `articles/foundry/openai/includes/how-to-webhooks-content.md`):
//!
//! - endpoints are registered with `POST /openai/v1/dashboard/webhook_endpoints`
//!   (`{name, url, event_types}`), answered with the endpoint and its `signing_secret`
//!   (`whsec_…`, shown only then); `GET` lists them (`GET …/{id}` one), `POST …/{id}` updates
//!   name, url or event types, `DELETE …/{id}` removes one;
//! - when a batch ends, each endpoint subscribed to `batch.completed` / `batch.failed` /
//!   `batch.cancelled` / `batch.expired` gets a POST with
//!   `{"object":"event","id":"evt_…","type":"batch.…","created_at":…,"data":{"id":"batch_…"}}`,
//!   signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`), the
//!   scheme the `openai` SDK's `webhooks.unwrap` checks (tests/python/test_webhooks.py proves
//!   it does);
//! - a delivery answered with anything but 2xx (or not answered within 10 s, the service's
//!   limit) is tried again with backoff; the same `webhook-id` every time, a fresh timestamp
//!   and signature per attempt.
//!
//! Endpoints live in memory, like batches.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine;
use serde_json::{Value, json};

use crate::{
    api::AppState,
    batches::{Batch, now},
};

/// The event types the documentation lists; a registration naming another is refused.
pub const EVENT_TYPES: &[&str] = &[
    "response.completed",
    "response.failed",
    "response.cancelled",
    "response.incomplete",
    "batch.completed",
    "batch.failed",
    "batch.cancelled",
    "batch.expired",
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "realtime.call.incoming",
];

/// The service gives up on an answer after 10 s (the documentation's "Timeouts" row).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits before each retry of a delivery: doubling from 0.5 s, six retries in about 30 s
/// (the service retries for much longer; a local run needs to see the pattern, not the span).
const RETRY_DELAYS_MS: &[u64] = &[500, 1000, 2000, 4000, 8000, 16000];

#[derive(Debug, Clone)]
struct Endpoint {
    id: String,
    name: String,
    url: String,
    event_types: Vec<String>,
    created_at: i64,
    secret: String,
}

impl Endpoint {
    /// The object as listed: the secret itself only in the create answer.
    fn public(&self) -> Value {
        let tail: String = self
            .secret
            .chars()
            .rev()
            .take(4)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        json!({
            "id": self.id,
            "object": "webhook.endpoint",
            "created_at": self.created_at,
            "event_types": self.event_types,
            "name": self.name,
            "signing_secret_hint": format!("whsec_...{tail}"),
            "url": self.url,
        })
    }
}

/// The registered endpoints and the client that delivers to them.
pub struct Hub {
    endpoints: Mutex<Vec<Endpoint>>,
    client: reqwest::Client,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            endpoints: Mutex::default(),
            client: reqwest::Client::builder()
                .timeout(DELIVERY_TIMEOUT)
                .user_agent("OpenAI/1.0 (+https://platform.openai.com/docs/webhooks)")
                .build()
                .expect("an HTTP client"),
        }
    }
}

impl Hub {
    fn endpoints(&self) -> std::sync::MutexGuard<'_, Vec<Endpoint>> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A batch reached a terminal state: its event goes to every endpoint subscribed to it,
    /// each delivery in its own task.
    pub fn batch_ended(self: &Arc<Self>, batch: &Batch) {
        if !batch.status.is_terminal() {
            return;
        }
        let kind = format!("batch.{}", batch.status.as_str());
        let targets: Vec<Endpoint> = self
            .endpoints()
            .iter()
            .filter(|e| e.event_types.contains(&kind))
            .cloned()
            .collect();
        if targets.is_empty() {
            return;
        }
        let event_id = format!("evt_{}", uuid::Uuid::new_v4().simple());
        let body = Bytes::from(
            json!({
                "object": "event",
                "id": event_id,
                "type": kind,
                "created_at": now(),
                "data": { "id": batch.id },
            })
            .to_string(),
        );
        for endpoint in targets {
            let hub = self.clone();
            let (id, body) = (event_id.clone(), body.clone());
            tokio::spawn(async move { hub.deliver(endpoint, id, body).await });
        }
    }

    async fn deliver(&self, endpoint: Endpoint, webhook_id: String, body: Bytes) {
        let key = secret_key(&endpoint.secret);
        for attempt in 0..=RETRY_DELAYS_MS.len() {
            let timestamp = now().to_string();
            let signature =
                aoai_blob_batch::webhook::signature::sign(&key, &webhook_id, &timestamp, &body);
            let sent = self
                .client
                .post(&endpoint.url)
                .header("content-type", "application/json")
                .header("webhook-id", &webhook_id)
                .header("webhook-timestamp", &timestamp)
                .header("webhook-signature", signature)
                .body(body.clone())
                .send()
                .await;
            let outcome = match sent {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(endpoint = %endpoint.id, webhook_id, attempt, "webhook delivered");
                    return;
                }
                Ok(r) => format!("answered {}", r.status()),
                // Not the URL's query (it may carry a function key): the error's kind only.
                Err(e) if e.is_timeout() => "no answer within 10 s".to_string(),
                Err(e) if e.is_connect() => "connection failed".to_string(),
                Err(_) => "request failed".to_string(),
            };
            let Some(&delay) = RETRY_DELAYS_MS.get(attempt) else {
                tracing::warn!(endpoint = %endpoint.id, webhook_id, "webhook not delivered: {outcome}; giving up");
                return;
            };
            tracing::info!(endpoint = %endpoint.id, webhook_id, attempt, "webhook {outcome}; retrying in {delay} ms");
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
    }
}

fn secret_key(secret: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .expect("secrets are made here, as base64")
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard/webhook_endpoints", post(create).get(list))
        .route(
            "/dashboard/webhook_endpoints/{id}",
            get(retrieve).post(update).delete(remove),
        )
}

/// A 400 as the service words it; small, so `Result`s carrying it stay small.
struct Invalid {
    message: String,
    param: Option<&'static str>,
}

impl IntoResponse for Invalid {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": "invalid_value",
            }})),
        )
            .into_response()
    }
}

fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Invalid {
    Invalid {
        message: message.into(),
        param,
    }
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {
            "message": format!("No webhook endpoint found with id '{id}'."),
            "type": "invalid_request_error",
            "param": null,
            "code": "not_found",
        }})),
    )
        .into_response()
}

/// The fields of a create or update body that are present, checked.
struct Fields {
    name: Option<String>,
    url: Option<String>,
    event_types: Option<Vec<String>>,
}

fn fields(body: &[u8]) -> Result<Fields, Invalid> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| invalid("The body is not a JSON object.", None))?;
    let obj = v
        .as_object()
        .ok_or_else(|| invalid("The body is not a JSON object.", None))?;
    let text = |key: &'static str| -> Result<Option<String>, Invalid> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(format!("'{key}' must be a string."), Some(key))),
        }
    };
    let url = text("url")?;
    if let Some(u) = &url
        && !matches!(url::Url::parse(u), Ok(p) if ["http", "https"].contains(&p.scheme()))
    {
        return Err(invalid("'url' must be an http or https URL.", Some("url")));
    }
    let event_types = match obj.get("event_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut types = Vec::new();
            for item in items {
                match item.as_str() {
                    Some(t) if EVENT_TYPES.contains(&t) => types.push(t.to_string()),
                    _ => {
                        return Err(invalid(
                            format!(
                                "Unknown event type {item}; known: {}.",
                                EVENT_TYPES.join(", ")
                            ),
                            Some("event_types"),
                        ));
                    }
                }
            }
            Some(types)
        }
        Some(_) => {
            return Err(invalid(
                "'event_types' must be an array.",
                Some("event_types"),
            ));
        }
    };
    Ok(Fields {
        name: text("name")?,
        url,
        event_types,
    })
}

async fn create(State(state): State<AppState>, body: Bytes) -> Response {
    let f = match fields(&body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let Some(url) = f.url else {
        return invalid("Missing required parameter: 'url'.", Some("url")).into_response();
    };
    let event_types = match f.event_types {
        Some(t) if !t.is_empty() => t,
        _ => {
            return invalid(
                "Missing required parameter: 'event_types'.",
                Some("event_types"),
            )
            .into_response();
        }
    };
    let key: [u8; 32] = rand::random();
    let endpoint = Endpoint {
        id: format!("wh_{}", uuid::Uuid::new_v4().simple()),
        name: f.name.unwrap_or_default(),
        url,
        event_types,
        created_at: now(),
        secret: format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(key)
        ),
    };
    let mut answer = endpoint.public();
    answer["signing_secret"] = json!(endpoint.secret);
    tracing::info!(endpoint = %endpoint.id, events = ?endpoint.event_types, "webhook endpoint registered");
    state.registry.webhooks.endpoints().push(endpoint);
    (StatusCode::OK, Json(answer)).into_response()
}

async fn list(State(state): State<AppState>) -> Response {
    let data: Vec<Value> = state
        .registry
        .webhooks
        .endpoints()
        .iter()
        .map(Endpoint::public)
        .collect();
    Json(json!({
        "object": "list",
        "first_id": data.first().map(|e| e["id"].clone()),
        "last_id": data.last().map(|e| e["id"].clone()),
        "has_more": false,
        "data": data,
    }))
    .into_response()
}

async fn retrieve(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state
        .registry
        .webhooks
        .endpoints()
        .iter()
        .find(|e| e.id == id)
    {
        Some(e) => Json(e.public()).into_response(),
        None => not_found(&id),
    }
}

async fn update(State(state): State<AppState>, Path(id): Path<String>, body: Bytes) -> Response {
    let f = match fields(&body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let mut endpoints = state.registry.webhooks.endpoints();
    let Some(e) = endpoints.iter_mut().find(|e| e.id == id) else {
        return not_found(&id);
    };
    if let Some(name) = f.name {
        e.name = name;
    }
    if let Some(url) = f.url {
        e.url = url;
    }
    if let Some(types) = f.event_types {
        e.event_types = types;
    }
    Json(e.public()).into_response()
}

async fn remove(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let mut endpoints = state.registry.webhooks.endpoints();
    let before = endpoints.len();
    endpoints.retain(|e| e.id != id);
    if endpoints.len() == before {
        return not_found(&id);
    }
    Json(json!({"id": id, "object": "webhook.endpoint.deleted", "deleted": true})).into_response()
}
