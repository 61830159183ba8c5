//! The HTTP surface: the documented batch operations in both URL styles
//! (batch-api-research.md §1.1), with Azure's authentication, error bodies and throttling.
//!
//! - classic: `{endpoint}/openai/batches[/{id}[/cancel]]?api-version=…`
//! - v1:      `{endpoint}/openai/v1/batches[/{id}[/cancel]]`

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Extension, Path, RawQuery, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use azure_core::http::Url;
use serde_json::{Map, Value, json};

use crate::{
    batches::{Batch, CancelError, CreateError, NewBatch, Registry, token_limit_message},
    blob_url::Account,
    faults::{Fault, FaultInjector},
    input::endpoint_api,
    list_query::{Filter, parse_orderby},
    output::OutputFolder,
};

#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub faults: Arc<FaultInjector>,
    /// Every API call answered with the gateway's 404 (`--gateway-404`, or at run time
    /// `POST /_emulator/gateway-404?on=`), as Azure answers a wrong or retired api-version.
    pub gateway_404: Arc<AtomicBool>,
    /// API calls received, by operation (`GET /_emulator/calls`): what a test asserts when it
    /// checks how many service calls the handler made.
    pub calls: Arc<CallCounts>,
}

#[derive(Debug, Default)]
pub struct CallCounts {
    create: AtomicU64,
    list: AtomicU64,
    retrieve: AtomicU64,
    cancel: AtomicU64,
}

impl CallCounts {
    fn count(&self, method: &axum::http::Method, path: &str) {
        let counter = match (method.as_str(), path.trim_end_matches('/')) {
            ("POST", p) if p.ends_with("/cancel") => &self.cancel,
            ("POST", _) => &self.create,
            ("GET", p) if p.ends_with("/batches") => &self.list,
            ("GET", _) => &self.retrieve,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub fn router(state: AppState) -> Router {
    let batches = || {
        Router::new()
            .route("/batches", post(create).get(list))
            .route("/batches/{id}", get(retrieve))
            .route("/batches/{id}/cancel", post(cancel))
    };
    Router::new()
        .nest(
            "/openai/v1",
            batches()
                .merge(crate::webhooks::routes())
                .route_layer(middleware::from_fn_with_state(state.clone(), gate_v1)),
        )
        .nest(
            "/openai",
            batches().route_layer(middleware::from_fn_with_state(state.clone(), gate_classic)),
        )
        // Test control, outside the Azure API's paths and its gate (no key, no faults).
        .route("/_emulator/step", post(control_step))
        .route("/_emulator/expire", post(control_expire))
        .route("/_emulator/gateway-404", post(control_gateway_404))
        .route("/_emulator/calls", get(control_calls))
        .fallback(resource_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// An error answer. API errors carry OpenAI's four fields so the `openai` clients raise the
/// matching exception with `code` and `param`; gateway errors (auth, unknown route, throttling)
/// carry only `code` and `message`, as Azure's front door sends them.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        param: Option<&str>,
    ) -> Self {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        Self {
            status,
            body: json!({"error": {
                "code": code,
                "message": message.into(),
                "param": param,
                "type": kind
            }}),
            headers: Vec::new(),
        }
    }

    fn bad_request(code: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message, param)
    }

    fn gateway(status: StatusCode, message: &str) -> Self {
        Self {
            status,
            body: json!({"error": {"code": status.as_u16().to_string(), "message": message}}),
            headers: Vec::new(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

async fn log_request(req: Request, next: Next) -> Response {
    // Path only: the query holds nothing secret but is noise; headers hold the key.
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let response = next.run(req).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
    response
}

async fn gate_classic(State(state): State<AppState>, req: Request, next: Next) -> Response {
    gate(&state, true, req, next).await
}

async fn gate_v1(State(state): State<AppState>, req: Request, next: Next) -> Response {
    gate(&state, false, req, next).await
}

/// Which URL style a request came by: the classic list takes OData options, the v1 list not.
#[derive(Debug, Clone, Copy)]
struct Classic(bool);

/// What Azure checks before the operation itself: the caller's key or token, the api-version
/// of the classic style, and the rate limit (here: the injected faults).
async fn gate(state: &AppState, classic: bool, mut req: Request, next: Next) -> Response {
    // The route itself is unknown to the gateway: nothing behind it is reached.
    if state.gateway_404.load(Ordering::Relaxed) {
        return resource_not_found().await.into_response();
    }
    req.extensions_mut().insert(Classic(classic));
    state.calls.count(req.method(), req.uri().path());
    if !authorized(req.headers()) {
        return ApiError::gateway(
            StatusCode::UNAUTHORIZED,
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to \
             provide a valid key for an active subscription and use a correct regional API \
             endpoint for your resource.",
        )
        .into_response();
    }
    if classic && query_value(req.uri().query(), "api-version").is_none_or(|v| v.is_empty()) {
        // Azure answers a missing api-version with this 404, not a 400
        // (MicrosoftDocs/azure-docs#114602); clients that forget it see what they would see there.
        return resource_not_found().await.into_response();
    }
    match state.faults.draw() {
        Some(Fault::Throttled) => {
            let mut e = ApiError::gateway(
                StatusCode::TOO_MANY_REQUESTS,
                "Requests to the Batch API have exceeded the call rate limit of your current \
                 tier. Please retry after 1 second.",
            );
            e.headers = vec![
                (
                    HeaderName::from_static("retry-after"),
                    HeaderValue::from_static("1"),
                ),
                (
                    HeaderName::from_static("retry-after-ms"),
                    HeaderValue::from_static("1000"),
                ),
            ];
            tracing::info!(path = req.uri().path(), "injected 429");
            return e.into_response();
        }
        Some(Fault::ServerError) => {
            tracing::info!(path = req.uri().path(), "injected 500");
            return ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "The server had an error while processing your request. Sorry about that!",
                None,
            )
            .into_response();
        }
        None => {}
    }
    next.run(req).await
}

/// Any non-empty key or bearer token: the emulator cannot check either, only insist on one.
fn authorized(headers: &HeaderMap) -> bool {
    let key = headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().is_empty());
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.get(..7)
                .filter(|p| p.eq_ignore_ascii_case("bearer "))
                .map(|_| &v[7..])
        })
        .is_some_and(|t| !t.trim().is_empty());
    key || bearer
}

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    let url = Url::parse(&format!("http://q/?{}", query?)).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The integer query parameter `name`, `default` when absent; `Err` with its text when it is
/// not a number in `range`.
fn int_param(
    query: Option<&str>,
    name: &str,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, String> {
    match query_value(query, name) {
        None => Ok(default),
        Some(text) => match text.parse() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(text),
        },
    }
}

async fn resource_not_found() -> ApiError {
    ApiError::gateway(StatusCode::NOT_FOUND, "Resource not found")
}

async fn method_not_allowed() -> ApiError {
    ApiError::gateway(
        StatusCode::METHOD_NOT_ALLOWED,
        "The requested method is not allowed for this resource.",
    )
}

async fn create(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let new = parse_create(&state.registry.account, &body)?;
    let created = state.registry.create(new).await.map_err(|e| match e {
        CreateError::TokenLimit { model, limit } => ApiError::bad_request(
            "token_limit_exceeded",
            token_limit_message(limit, &model),
            None,
        ),
        CreateError::Unavailable(e) => {
            tracing::warn!(error = %e, "input blob unreadable for now");
            let mut err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "The input blob could not be read right now. Please retry.",
                None,
            );
            err.headers = vec![(
                HeaderName::from_static("retry-after"),
                HeaderValue::from_static("1"),
            )];
            err
        }
    })?;
    let mut response = (StatusCode::CREATED, Json(&created.batch)).into_response();
    // The spec's create example carries the deployment's quota use in these two headers.
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&created.enqueued_tokens.to_string()) {
        headers.insert("deployment-enqueued-tokens", v);
    }
    if let Ok(v) = HeaderValue::from_str(&created.token_limit.to_string()) {
        headers.insert("deployment-maximum-enqueued-tokens", v);
    }
    Ok(response)
}

/// The synchronous checks of a create request; the input file itself is checked later, by
/// the job, as the service does.
fn parse_create(account: &Account, body: &[u8]) -> Result<NewBatch, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|_| {
        ApiError::bad_request(
            "invalid_json",
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            None,
        )
    })?;
    let Value::Object(req) = value else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "The body of a create batch request must be a JSON object.",
            None,
        ));
    };
    let input_file_id = optional_string(&req, "input_file_id")?;
    let input_blob = optional_string(&req, "input_blob")?;
    let input_blob = match (input_file_id, input_blob) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "Only one of 'input_file_id' and 'input_blob' can be given.",
                Some("input_file_id"),
            ));
        }
        (Some(_), None) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "This emulator serves batches from Blob Storage only: set 'input_file_id' to \
                 null and give 'input_blob' and 'output_folder'.",
                Some("input_file_id"),
            ));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "missing_required_parameter",
                "Missing required parameter: 'input_blob' (or 'input_file_id').",
                Some("input_blob"),
            ));
        }
        (None, Some(blob)) => blob,
    };
    let endpoint = optional_string(&req, "endpoint")?.ok_or_else(|| missing("endpoint"))?;
    let api = endpoint_api(&endpoint).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_value",
            format!(
                "Invalid value for 'endpoint': '{endpoint}'. Supported values are \
                 '/chat/completions', '/responses', '/v1/chat/completions' and '/v1/responses'."
            ),
            Some("endpoint"),
        )
    })?;
    let window =
        optional_string(&req, "completion_window")?.ok_or_else(|| missing("completion_window"))?;
    if window != "24h" {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!(
                "Invalid value for 'completion_window': '{window}'. Supported values are: '24h'."
            ),
            Some("completion_window"),
        ));
    }
    if req.get("metadata").is_some_and(|m| !m.is_null()) {
        return Err(ApiError::bad_request(
            "unsupported_parameter",
            "'metadata' is not supported for batches with 'input_blob'.",
            Some("metadata"),
        ));
    }
    if !Url::parse(&input_blob).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!("Invalid value for 'input_blob': '{input_blob}' is not a blob URL."),
            Some("input_blob"),
        ));
    }
    let folder = match req.get("output_folder") {
        Some(Value::Object(f)) => f,
        None | Some(Value::Null) => return Err(missing("output_folder")),
        Some(_) => return Err(wrong_type("output_folder", "an object")),
    };
    let url = optional_string(folder, "url")
        .map_err(|_| wrong_type("output_folder.url", "a string"))?
        .ok_or_else(|| missing("output_folder.url"))?;
    let delimiter = optional_string(folder, "delimiter")
        .map_err(|_| wrong_type("output_folder.delimiter", "a string"))?
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".to_string());
    let output = resolve_folder(account, &url, &delimiter).ok_or_else(|| {
        // The service writes with its own identity; a folder outside the one storage account
        // it knows here cannot be written. We say so at once rather than fail the job late.
        ApiError::bad_request(
            "invalid_value",
            format!(
                "Invalid value for 'output_folder.url': '{url}' is not a container or folder URL \
                 in the storage account this service writes to."
            ),
            Some("output_folder.url"),
        )
    })?;
    Ok(NewBatch {
        endpoint,
        api,
        completion_window: window,
        input_blob,
        output,
    })
}

fn optional_string(map: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(wrong_type(key, "a string")),
    }
}

fn missing(param: &str) -> ApiError {
    ApiError::bad_request(
        "missing_required_parameter",
        format!("Missing required parameter: '{param}'."),
        Some(param),
    )
}

fn wrong_type(param: &str, expected: &str) -> ApiError {
    ApiError::bad_request(
        "invalid_type",
        format!("Invalid type for '{param}': expected {expected}."),
        Some(param),
    )
}

/// `output_folder.url` as (container, folder) in this account. The URL may name a container or
/// a folder inside one; a query (a SAS) or fragment is refused, the service uses its identity.
pub fn resolve_folder(account: &Account, url: &str, delimiter: &str) -> Option<OutputFolder> {
    let (container, prefix) = account.locate_folder(url).ok()?;
    Some(OutputFolder {
        container,
        prefix,
        delimiter: delimiter.to_string(),
    })
}

async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state
        .registry
        .get(&id)
        .map(|b| Json(b).into_response())
        .ok_or_else(|| not_found(&id))
}

async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.registry.cancel(&id) {
        Ok(b) => Ok(Json(b).into_response()),
        Err(CancelError::NotFound) => Err(not_found(&id)),
        // A 400, not a 409: the `openai` clients retry 409s, and no retry can help here.
        Err(CancelError::Finished(status)) => Err(ApiError::bad_request(
            "invalid_state",
            format!("Cannot cancel a batch with status '{}'.", status.as_str()),
            None,
        )),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("No batch found with id '{id}'."),
        Some("batch_id"),
    )
}

/// The test controls answer only in manual mode: otherwise the batches move by themselves.
fn manual_only(state: &AppState) -> Result<(), ApiError> {
    if state.registry.manual() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_manual",
            "This emulator steps its batches by itself (--step-ms N); start it with \
             --step-ms 0 to step them with this call.",
            None,
        ))
    }
}

/// `POST /_emulator/step[?id=ID][&steps=N]`: N (default 1) lifecycle steps of batch ID, or of
/// every batch active when the call came (oldest first, one step each per round); answers
/// once they are done, with those batches as they are then.
async fn control_step(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    manual_only(&state)?;
    let q = query.as_deref();
    let steps = int_param(q, "steps", 1, 1..=1000).map_err(|_| {
        ApiError::bad_request("invalid_steps", "steps must be 1 to 1000.", Some("steps"))
    })?;
    let ids = match query_value(q, "id") {
        Some(id) if state.registry.get(&id).is_none() => return Err(not_found(&id)),
        Some(id) => vec![id],
        None => state.registry.active_ids(),
    };
    for _ in 0..steps {
        for id in &ids {
            state.registry.step(id, false).await;
        }
    }
    let data: Vec<Batch> = ids.iter().filter_map(|id| state.registry.get(id)).collect();
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// `POST /_emulator/expire?id=ID`: one step of batch ID taken as if its completion window
/// ended now; answers with the batch once the step is done.
async fn control_expire(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    manual_only(&state)?;
    let id = query_value(query.as_deref(), "id")
        .ok_or_else(|| ApiError::bad_request("missing_id", "id is required.", Some("id")))?;
    let batch = state
        .registry
        .step(&id, true)
        .await
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(batch).into_response())
}

/// `GET /_emulator/calls`: the API calls received so far, by operation.
async fn control_calls(State(state): State<AppState>) -> Json<Value> {
    let c = &state.calls;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Json(json!({
        "create": n(&c.create),
        "list": n(&c.list),
        "retrieve": n(&c.retrieve),
        "cancel": n(&c.cancel),
    }))
}

/// `POST /_emulator/gateway-404?on=true|false`: from now on every API call gets (or no longer
/// gets) the gateway's 404 `Resource not found`, as when an api-version is retired. Batches
/// go on meanwhile, as they do in Azure. Answers with the setting. Works in any mode.
async fn control_gateway_404(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let on = match query_value(query.as_deref(), "on").as_deref() {
        Some("true") => true,
        Some("false") => false,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_on",
                "on must be true or false.",
                Some("on"),
            ));
        }
    };
    state.gateway_404.store(on, Ordering::Relaxed);
    tracing::info!(on, "gateway 404 for every API call");
    Ok(Json(json!({"gateway_404": on})).into_response())
}

async fn list(
    State(state): State<AppState>,
    Extension(Classic(classic)): Extension<Classic>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let q = query.as_deref();
    let limit = int_param(q, "limit", 20, 1..=100).map_err(|text| {
        ApiError::bad_request(
            "invalid_value",
            format!("Invalid value for 'limit': '{text}'. It must be an integer from 1 to 100."),
            Some("limit"),
        )
    })?;
    let after = query_value(q, "after").filter(|a| !a.is_empty());
    // OData `$orderby` and `$filter` are the classic spec's (list_query); v1 has neither.
    let odata = |name| classic.then(|| query_value(q, name)).flatten();
    let order = match odata("$orderby") {
        None => state.registry.settings.list_order,
        Some(text) => parse_orderby(&text)
            .map_err(|m| ApiError::bad_request("invalid_value", m, Some("$orderby")))?,
    };
    let filter = match odata("$filter") {
        None => Filter::default(),
        Some(text) => Filter::parse(&text)
            .map_err(|m| ApiError::bad_request("invalid_value", m, Some("$filter")))?,
    };
    let (data, has_more) = state
        .registry
        .list(after.as_deref(), limit, order, |b| filter.matches(b));
    let first_id = data.first().map(|b| b.id.clone());
    let last_id = data.last().map(|b| b.id.clone());
    Ok(Json(ListPage {
        object: "list",
        data,
        first_id,
        last_id,
        has_more,
    })
    .into_response())
}

#[derive(serde::Serialize)]
struct ListPage {
    object: &'static str,
    data: Vec<Batch>,
    first_id: Option<String>,
    last_id: Option<String>,
    has_more: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "http://127.0.0.1:10000/devstoreaccount1";

    fn store() -> Account {
        Account::new(&Url::parse(ACCOUNT).unwrap())
    }

    fn request(extra: Value) -> Vec<u8> {
        let mut base = json!({
            "input_file_id": null,
            "endpoint": "/chat/completions",
            "completion_window": "24h",
            "input_blob": format!("{ACCOUNT}/batch-input/test.jsonl"),
            "output_folder": {"url": format!("{ACCOUNT}/batch-output")}
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base.to_string().into_bytes()
    }

    fn error_of(body: Vec<u8>) -> (String, Option<String>) {
        let e = parse_create(&store(), &body).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        (
            e.body["error"]["code"].as_str().unwrap().to_string(),
            e.body["error"]["param"].as_str().map(str::to_string),
        )
    }

    #[test]
    fn the_seed_request_is_accepted() {
        let new = parse_create(&store(), &request(json!({}))).unwrap();
        assert_eq!(new.output.container, "batch-output");
        assert_eq!(new.output.prefix, "");
        assert_eq!(new.endpoint, "/chat/completions");
    }

    #[test]
    fn create_requests_are_checked_like_the_service() {
        let cases = [
            (
                json!({"completion_window": "48h"}),
                "invalid_value",
                "completion_window",
            ),
            (
                json!({"metadata": {"a": "b"}}),
                "unsupported_parameter",
                "metadata",
            ),
            (
                json!({"input_blob": null}),
                "missing_required_parameter",
                "input_blob",
            ),
            (
                json!({"input_file_id": "file-1"}),
                "invalid_request",
                "input_file_id",
            ),
            (
                json!({"endpoint": "/embeddings"}),
                "invalid_value",
                "endpoint",
            ),
            (
                json!({"output_folder": {"url": "https://other.blob.core.windows.net/out"}}),
                "invalid_value",
                "output_folder.url",
            ),
            (
                json!({"output_folder": null}),
                "missing_required_parameter",
                "output_folder",
            ),
            (
                json!({"input_blob": "not a url"}),
                "invalid_value",
                "input_blob",
            ),
        ];
        for (extra, code, param) in cases {
            assert_eq!(
                error_of(request(extra.clone())),
                (code.to_string(), Some(param.to_string())),
                "{extra}"
            );
        }
        assert_eq!(error_of(b"{nope".to_vec()).0, "invalid_json");
    }

    #[test]
    fn output_folders_may_be_containers_or_folders() {
        let s = store();
        let f = resolve_folder(&s, &format!("{ACCOUNT}/out/runs/2026/"), "/").unwrap();
        assert_eq!(
            (f.container.as_str(), f.prefix.as_str()),
            ("out", "runs/2026")
        );
        assert!(
            resolve_folder(&s, ACCOUNT, "/").is_none(),
            "a container is required"
        );
        assert!(resolve_folder(&s, &format!("{ACCOUNT}/out?sv=x"), "/").is_none());
    }

    #[test]
    fn a_key_or_a_bearer_token_is_required() {
        let mut h = HeaderMap::new();
        assert!(!authorized(&h));
        h.insert("authorization", HeaderValue::from_static("Bearer "));
        assert!(!authorized(&h));
        h.insert("authorization", HeaderValue::from_static("Bearer abc"));
        assert!(authorized(&h));
        let mut h = HeaderMap::new();
        h.insert("api-key", HeaderValue::from_static("k"));
        assert!(authorized(&h));
    }
}
