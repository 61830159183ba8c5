//! The Azure OpenAI Batch REST client.
//!
//! Hand-written over reqwest because no Rust crate models the blob fields (`input_blob`,
//! `output_folder`, `output_blob`, `error_blob`) or Azure's variations (see
//! shared/reference/batch-api-research.md §1.4, §1.12): statuses in any case, `canceled` and
//! `cancelled`, lists under `data` or `value`, timestamps as integers or RFC 3339 strings,
//! `line` as a string or an integer. Every type is lenient and ignores unknown fields.

use std::{sync::Arc, time::Duration};

use azure_core::credentials::TokenCredential;
use rand::Rng;
use reqwest::{Method, StatusCode, header::HeaderMap};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use url::Url;

use crate::config::{ApiStyle, Secret};

const COGNITIVE_SERVICES_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// Batches per page of a list walk: the most the list gives (spec: `limit` 1–100, default 20).
const LIST_PAGE_SIZE: u32 = 100;

/// Pages looked through for a batch to adopt before giving up (5,000 batches): bounds the
/// cost of the walk on `v1`, whose list has no time window.
pub const ADOPTION_MAX_PAGES: u32 = 50;

/// A batch's status. Parsed case-insensitively; anything unknown is kept, not an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Expired,
    Cancelling,
    Cancelled,
    #[serde(untagged)]
    Unknown(String),
}

impl BatchStatus {
    pub fn parse(text: &str) -> Self {
        match text.to_ascii_lowercase().replace([' ', '-'], "_").as_str() {
            "validating" => Self::Validating,
            "in_progress" | "inprogress" | "running" => Self::InProgress,
            "finalizing" => Self::Finalizing,
            "completed" | "succeeded" => Self::Completed,
            "failed" => Self::Failed,
            "expired" => Self::Expired,
            "cancelling" | "canceling" => Self::Cancelling,
            "cancelled" | "canceled" => Self::Cancelled,
            _ => Self::Unknown(text.to_string()),
        }
    }

    /// The four ends of a batch; all four are harvested.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Expired | Self::Cancelled
        )
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Validating => "validating",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Unknown(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for BatchStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::parse(&String::deserialize(d)?))
    }
}

impl std::fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct RequestCounts {
    #[serde(default, deserialize_with = "null_as_zero")]
    pub total: u64,
    #[serde(default, deserialize_with = "null_as_zero")]
    pub completed: u64,
    #[serde(default, deserialize_with = "null_as_zero")]
    pub failed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct BatchError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default, deserialize_with = "lenient_line")]
    pub line: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct BatchErrors {
    #[serde(default, alias = "value", deserialize_with = "null_as_default")]
    pub data: Vec<BatchError>,
}

/// The batch object. Only the fields we act on; the rest are ignored.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Batch {
    pub id: String,
    pub status: BatchStatus,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub input_blob: Option<String>,
    #[serde(default)]
    pub output_blob: Option<String>,
    #[serde(default)]
    pub error_blob: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub request_counts: RequestCounts,
    #[serde(default)]
    pub errors: Option<BatchErrors>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub created_at: Option<i64>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub in_progress_at: Option<i64>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub expires_at: Option<i64>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub finalizing_at: Option<i64>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub completed_at: Option<i64>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub failed_at: Option<i64>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub expired_at: Option<i64>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub cancelling_at: Option<i64>,
    #[serde(default, deserialize_with = "lenient_time")]
    pub cancelled_at: Option<i64>,
}

impl Batch {
    pub fn error_codes(&self) -> impl Iterator<Item = &str> {
        self.errors
            .iter()
            .flat_map(|e| e.data.iter())
            .filter_map(|e| e.code.as_deref())
    }
}

/// The wanted batches a list walk found ([`BatchClient::list_wanted`]).
#[derive(Debug, Default)]
pub struct Listed {
    pub batches: std::collections::HashMap<String, Batch>,
    /// List calls made.
    pub pages: u32,
}

/// How far a list walk went.
#[derive(Debug, Default)]
struct Walk {
    pages: u32,
    scanned: usize,
    /// The list's last page was read.
    ended: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BatchPage {
    #[serde(default, alias = "value", deserialize_with = "null_as_default")]
    pub data: Vec<Batch>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub last_id: Option<String>,
}

/// What a batch is created from.
#[derive(Debug, Clone, Serialize)]
pub struct CreateBatch {
    /// `/chat/completions`, `/responses`, or their `/v1/` forms, as the input lines have it.
    pub endpoint: String,
    pub input_blob: String,
    pub output_folder_url: String,
}

/// A create's answer: the batch, and what the service said about the deployment's quota.
#[derive(Debug, Clone)]
pub struct Created {
    pub batch: Batch,
    pub quota: Quota,
}

/// The quota headers of a create answer (`post_batch_blob.json` in the REST spec): tokens the
/// deployment holds in unfinished batches (this one's included, and other users'), and its
/// limit. Absent where the service does not send them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub enqueued: Option<u64>,
    pub maximum: Option<u64>,
}

impl Quota {
    fn from_headers(headers: &HeaderMap) -> Self {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
        };
        Quota {
            enqueued: number("deployment-enqueued-tokens"),
            maximum: number("deployment-maximum-enqueued-tokens"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenAiError {
    /// The deployment's enqueued-token quota is full: the job waits and is resubmitted later.
    #[error("token_limit_exceeded: {message}")]
    TokenLimitExceeded { message: String },
    /// Throttled, 5xx, connection failures, after our retries: try again later. The service
    /// answered (or never got the request), so it is not acting on it now.
    #[error("Azure OpenAI is unavailable ({what}): {message}")]
    Transient { what: String, message: String },
    /// Sent, but no answer came (a timeout, a connection dropped mid-request): the service
    /// may have got the request and may still act on it. For a create, a batch may appear.
    #[error("no answer from Azure OpenAI ({what}): {message}")]
    Unanswered { what: String, message: String },
    /// The service refused the request; trying again will not help.
    #[error("Azure OpenAI refused the request (HTTP {status}, {code}): {message}")]
    Rejected {
        status: u16,
        code: String,
        message: String,
    },
    /// The service itself said this batch does not exist: a 404 whose code names a missing
    /// resource. One such answer is no proof that the batch is gone (`poll` wants it on
    /// several looks in a row).
    #[error("batch {0} not found")]
    NotFound(String),
    /// Azure's gateway answered 404 `Resource not found` (code `"404"`): no such route at
    /// all, as for a wrong or retired api-version, endpoint or path. It says nothing about any
    /// batch, and every call gets it until the configuration is fixed.
    #[error(
        "Azure OpenAI answered {message} to {what}: no such route, so the endpoint, path or \
         api-version is wrong or retired (check AZURE_OPENAI_ENDPOINT and \
         AZURE_OPENAI_API_VERSION); it says nothing about any batch"
    )]
    NoSuchRoute { what: String, message: String },
    #[error("cannot authenticate to Azure OpenAI: {0}")]
    Auth(String),
    #[error("unexpected answer from Azure OpenAI: {0}")]
    Decode(String),
    /// The batch list was too long to look through for a batch this job may already have:
    /// creating one now could make a second, so nothing is created.
    #[error(
        "looked through {scanned} batches ({ADOPTION_MAX_PAGES} pages of the list) without \
         reaching its end, for a batch an earlier attempt may have created; not creating \
         another while one may exist. A dated AZURE_OPENAI_API_VERSION (the default \
         2025-04-01-preview) lets the list be narrowed to the time of the create; or, once \
         sure no batch was made for this input, delete the job's record (active/JOB.json in \
         the state container) and the timer's sweep takes the input in again"
    )]
    SearchIncomplete { scanned: usize },
}

impl OpenAiError {
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Transient { .. }
                | Self::Unanswered { .. }
                | Self::Auth(_)
                | Self::NoSuchRoute { .. }
        )
    }

    /// Whether a create that ended with this error might still have made a batch later:
    /// only when no answer came. Every other error is the service's own answer (or a
    /// request that never left), and the call is over.
    pub fn may_still_create(&self) -> bool {
        matches!(self, Self::Unanswered { .. })
    }
}

#[derive(Clone)]
pub enum Auth {
    /// Development only.
    ApiKey(Secret),
    /// Microsoft Entra ID (managed identity in Azure).
    Entra(Arc<dyn TokenCredential>),
}

/// Retry tuning for 429/5xx/timeouts.
#[derive(Debug, Clone, Copy)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
pub struct BatchClient {
    http: reqwest::Client,
    endpoint: Url,
    style: ApiStyle,
    auth: Auth,
    retry: RetryConfig,
}

impl std::fmt::Debug for BatchClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("style", &self.style)
            .finish_non_exhaustive()
    }
}

impl BatchClient {
    pub fn new(endpoint: Url, style: ApiStyle, auth: Auth, retry: RetryConfig) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("a TLS backend is compiled in");
        Self {
            http,
            endpoint,
            style,
            auth,
            retry,
        }
    }

    fn url(&self, path: &str, query: &[(&str, String)]) -> Url {
        let mut url = self.endpoint.clone();
        let base = url.path().trim_end_matches('/').to_string();
        match &self.style {
            ApiStyle::Classic { api_version } => {
                url.set_path(&format!("{base}/openai/{path}"));
                url.query_pairs_mut()
                    .append_pair("api-version", api_version);
            }
            ApiStyle::V1 => url.set_path(&format!("{base}/openai/v1/{path}")),
        }
        for (k, v) in query {
            url.query_pairs_mut().append_pair(k, v);
        }
        url
    }

    /// Creates a batch. Retried only on 429 (the service did not take it). A 5xx or a lost
    /// answer may have created the batch after all, so those are not retried here, and the
    /// caller looks the batch up by `input_blob` before creating again: that is what keeps it
    /// to one. `timeout` bounds each attempt: the caller's in-flight window, so the client
    /// never gives up on a request the caller still counts as on its way.
    pub async fn create(
        &self,
        req: &CreateBatch,
        timeout: Duration,
    ) -> Result<Created, OpenAiError> {
        let body = serde_json::json!({
            "input_file_id": null,
            "endpoint": req.endpoint,
            "completion_window": "24h",
            "input_blob": req.input_blob,
            "output_folder": { "url": req.output_folder_url },
        });
        let (batch, headers) = self
            .send_full(
                Method::POST,
                self.url("batches", &[]),
                Some(body),
                false,
                Some(timeout),
            )
            .await?;
        Ok(Created {
            batch,
            quota: Quota::from_headers(&headers),
        })
    }

    /// The endpoint this client calls (no key or token in it).
    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    pub async fn retrieve(&self, id: &str) -> Result<Batch, OpenAiError> {
        let path = format!("batches/{}", encode_segment(id));
        match self
            .send(Method::GET, self.url(&path, &[]), None, true)
            .await
        {
            Err(OpenAiError::Rejected {
                status: 404, code, ..
            }) if names_missing_resource(&code) => Err(OpenAiError::NotFound(id.into())),
            other => other,
        }
    }

    pub async fn cancel(&self, id: &str) -> Result<Batch, OpenAiError> {
        let path = format!("batches/{}/cancel", encode_segment(id));
        self.send(Method::POST, self.url(&path, &[]), None, true)
            .await
    }

    pub async fn list_page(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<BatchPage, OpenAiError> {
        self.list_page_where(after, limit, None).await
    }

    /// A page of the list; on the classic route with `since`, only batches created after
    /// that time (unix seconds), oldest first.
    async fn list_page_where(
        &self,
        after: Option<&str>,
        limit: u32,
        since: Option<i64>,
    ) -> Result<BatchPage, OpenAiError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(a) = after {
            query.push(("after", a.to_string()));
        }
        if let Some(t) = since {
            // The spec's own list example (2025-04-01-preview, examples/get_batches.json):
            // `$filter=created_at gt N and …`, `$orderby=created_at asc`.
            query.push(("$filter", format!("created_at gt {t}")));
            query.push(("$orderby", "created_at asc".to_string()));
        }
        self.send(Method::GET, self.url("batches", &query), None, true)
            .await
    }

    /// Finds a batch created for this input blob at or after `not_before` (unix seconds): the
    /// guard against a second batch after a crash or a lost create answer, so it must not miss
    /// one, whatever order the service lists in. The spec leaves the default order open (its
    /// list example asks `created_at asc`; OpenAI's v1 lists newest first), so nothing here
    /// stops on an order assumption.
    ///
    /// On a dated api-version the list is asked for the time window and the order outright
    /// (`$filter=created_at gt …`, `$orderby=created_at asc`: Batch_List in the
    /// 2025-04-01-preview spec and the batch how-to's "List batch (Preview)"), so it holds
    /// only the batches since the create, the sought one first. A service that refuses those
    /// options (400) is walked without them. On `v1`, which has neither, every page is walked
    /// until `has_more` is false. Either walk stops after [`ADOPTION_MAX_PAGES`] pages with
    /// [`OpenAiError::SearchIncomplete`]: the caller must not create blindly then.
    pub async fn find_by_input_blob(
        &self,
        input_blob: &str,
        not_before: i64,
    ) -> Result<Option<Batch>, OpenAiError> {
        let mut found = None;
        let walk = self
            .walk_list(Some(not_before - 1), ADOPTION_MAX_PAGES, |b| {
                let matches = b.created_at.is_none_or(|t| t >= not_before)
                    && b.input_blob
                        .as_deref()
                        .is_some_and(|u| same_blob_url(u, input_blob));
                if matches {
                    found = Some(b.clone());
                }
                !matches
            })
            .await?;
        match found {
            Some(b) => Ok(Some(b)),
            None if walk.ended => Ok(None),
            None => Err(OpenAiError::SearchIncomplete {
                scanned: walk.scanned,
            }),
        }
    }

    /// The batches among `wanted` that the list shows, read 100 a page: how a tick learns
    /// the state of many running batches in a few calls instead of one retrieve each. On a
    /// dated api-version the list is asked for the batches created after `since`, oldest
    /// first (as [`Self::find_by_input_blob`] asks); on `v1` it is read in the service's own
    /// order. Stops once every wanted batch was seen, at the end of the list, or after
    /// `max_pages`; whatever was not seen is for the caller to retrieve one by one.
    pub async fn list_wanted(
        &self,
        wanted: &std::collections::HashSet<String>,
        since: i64,
        max_pages: u32,
    ) -> Result<Listed, OpenAiError> {
        let mut batches = std::collections::HashMap::new();
        let walk = self
            .walk_list(Some(since), max_pages, |b| {
                if wanted.contains(&b.id) {
                    batches.insert(b.id.clone(), b.clone());
                }
                batches.len() < wanted.len()
            })
            .await?;
        Ok(Listed {
            batches,
            pages: walk.pages,
        })
    }

    /// Reads the list page by page, handing each batch to `visit` until it returns `false`,
    /// the list ends, or `max_pages` were read. `since` (unix seconds) asks a dated
    /// api-version for the batches created after it, oldest first; `v1` has no such options,
    /// and a service that refuses them (400) is read without them. Nothing here assumes an
    /// order: the spec leaves the default open (its list example asks `created_at asc`;
    /// OpenAI's v1 lists newest first).
    async fn walk_list(
        &self,
        since: Option<i64>,
        max_pages: u32,
        mut visit: impl FnMut(&Batch) -> bool,
    ) -> Result<Walk, OpenAiError> {
        let mut since = since.filter(|_| matches!(self.style, ApiStyle::Classic { .. }));
        let mut after: Option<String> = None;
        let mut walk = Walk::default();
        while walk.pages < max_pages {
            let page = match self
                .list_page_where(after.as_deref(), LIST_PAGE_SIZE, since)
                .await
            {
                Err(OpenAiError::Rejected {
                    status: 400,
                    message,
                    ..
                }) if since.is_some() && after.is_none() => {
                    tracing::warn!(
                        error = %message,
                        "the batch list refused $filter/$orderby; reading every batch instead"
                    );
                    since = None;
                    continue;
                }
                other => other?,
            };
            walk.pages += 1;
            walk.scanned += page.data.len();
            for b in &page.data {
                if !visit(b) {
                    return Ok(walk);
                }
            }
            let next = page
                .last_id
                .or_else(|| page.data.last().map(|b| b.id.clone()));
            if !page.has_more || next.is_none() || page.data.is_empty() {
                walk.ended = true;
                return Ok(walk);
            }
            after = next;
        }
        Ok(walk)
    }

    async fn send<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
        retry_server_errors: bool,
    ) -> Result<T, OpenAiError> {
        self.send_with(method, url, body, retry_server_errors, None)
            .await
    }

    /// `send`, with a timeout per attempt other than the client's 60 s.
    async fn send_with<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
        retry_server_errors: bool,
        timeout: Option<Duration>,
    ) -> Result<T, OpenAiError> {
        self.send_full(method, url, body, retry_server_errors, timeout)
            .await
            .map(|(value, _)| value)
    }

    /// `send_with`, also returning the successful answer's headers (a create's quota).
    async fn send_full<T: for<'de> Deserialize<'de>>(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
        retry_server_errors: bool,
        timeout: Option<Duration>,
    ) -> Result<(T, HeaderMap), OpenAiError> {
        let what = format!("{} {}", method, url.path());
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            req = match &self.auth {
                Auth::ApiKey(key) => req.header("api-key", key.expose()),
                Auth::Entra(cred) => {
                    let token = cred
                        .get_token(&[COGNITIVE_SERVICES_SCOPE], None)
                        .await
                        .map_err(|e| OpenAiError::Auth(e.to_string()))?;
                    req.bearer_auth(token.token.secret())
                }
            };
            if let Some(b) = &body {
                req = req.json(b);
            }
            let outcome = req.send().await;
            let (retryable, hint, error) = match outcome {
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    let text = resp.text().await.unwrap_or_default();
                    if status.is_success() {
                        return serde_json::from_str(&text)
                            .map(|value| (value, headers))
                            .map_err(|e| OpenAiError::Decode(format!("{what}: {e}")));
                    }
                    let (code, message) = error_fields(&text);
                    if code == "token_limit_exceeded" || message.contains("token_limit_exceeded") {
                        return Err(OpenAiError::TokenLimitExceeded { message });
                    }
                    if status == StatusCode::NOT_FOUND && is_gateway_code(&code) {
                        return Err(OpenAiError::NoSuchRoute {
                            what: what.clone(),
                            message: format!("HTTP 404 \"{code}\" {message}"),
                        });
                    }
                    let throttled = status == StatusCode::TOO_MANY_REQUESTS;
                    let server = status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT;
                    let message = format!("HTTP {} {code}: {message}", status.as_u16());
                    // A gateway that timed out waiting on the backend answers for it, but not
                    // with the backend's answer: the request may still be acted on.
                    let gateway_timeout = status == StatusCode::GATEWAY_TIMEOUT
                        || status == StatusCode::REQUEST_TIMEOUT;
                    let err = if gateway_timeout {
                        OpenAiError::Unanswered {
                            what: what.clone(),
                            message,
                        }
                    } else if throttled || server {
                        OpenAiError::Transient {
                            what: what.clone(),
                            message,
                        }
                    } else {
                        return Err(OpenAiError::Rejected {
                            status: status.as_u16(),
                            code,
                            message,
                        });
                    };
                    (
                        throttled || (server && retry_server_errors),
                        retry_after(&headers),
                        err,
                    )
                }
                Err(e) => {
                    // A request that never reached the service is safe to send again even for
                    // create; one that may have (a timeout, a dropped connection) is not.
                    let connect = e.is_connect();
                    let message = e.without_url().to_string();
                    let err = if connect {
                        OpenAiError::Transient {
                            what: what.clone(),
                            message,
                        }
                    } else {
                        OpenAiError::Unanswered {
                            what: what.clone(),
                            message,
                        }
                    };
                    (connect || retry_server_errors, None, err)
                }
            };
            if !retryable || attempt >= self.retry.max_attempts {
                return Err(error);
            }
            let delay = hint
                .unwrap_or_else(|| self.backoff(attempt))
                .min(self.retry.max_delay * 2);
            tracing::warn!(attempt, delay_ms = delay.as_millis() as u64, error = %error, "retrying Azure OpenAI request");
            tokio::time::sleep(delay).await;
        }
    }

    /// Exponential backoff with full jitter, so racing instances spread out.
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .retry
            .base_delay
            .saturating_mul(1 << attempt.min(16))
            .min(self.retry.max_delay);
        let ms = rand::rng().random_range(0..=cap.as_millis().max(1) as u64);
        Duration::from_millis(ms.max(self.retry.base_delay.as_millis() as u64 / 2))
    }
}

/// `retry-after-ms` (Azure) takes precedence over `Retry-After` (seconds).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_millis(ms.max(0.0) as u64));
    }
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| Duration::from_millis((s.max(0.0) * 1000.0) as u64))
}

/// `{"error": {"code", "message"}}`, or whatever text the body has.
fn error_fields(text: &str) -> (String, String) {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let err = v.get("error").unwrap_or(&v);
    let code = match err.get("code") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    };
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| text.chars().take(500).collect());
    (code, message)
}

/// Whether a 404's error code is the gateway's, not the service's: Azure's front door
/// answers a route it does not know (a wrong or retired api-version, a wrong path) with
/// `{"error":{"code":"404","message":"Resource not found"}}`, the status as its code (seen
/// for every call in openai-python and graphrag reports: vibrantlabsai/ragas#478,
/// microsoft/graphrag#1863; a missing api-version: MicrosoftDocs/azure-docs#114602); a body
/// without a code is no service's answer either.
fn is_gateway_code(code: &str) -> bool {
    code.is_empty() || code.bytes().all(|b| b.is_ascii_digit())
}

/// Whether a 404's error code says the resource asked for does not exist: the spec's
/// `notFound` (ErrorCode in the 2025-04-01-preview spec: "The resource is not found."), or
/// the `not_found` / `batch_not_found` spellings of OpenAI-style services. Any other code on
/// a 404 proves nothing about the batch.
fn names_missing_resource(code: &str) -> bool {
    let code: String = code
        .chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect();
    matches!(code.as_str(), "notfound" | "batchnotfound")
}

/// What a path segment of ours encodes: every byte but the unreserved characters (RFC 3986
/// §2.3: ALPHA, DIGIT, `-`, `.`, `_`, `~`), which "should not be created by URI producers"
/// encoded. Encoding them would be equivalent only to a server that normalises: one that
/// does not (or a proxy, a gateway routing on the raw path) answers `batch%5Fabc` with 404
/// for a `batch_abc` that exists. The reserved characters stay encoded, so `/`, `?`, `#`,
/// `;` and the like in an id cannot change the path's meaning.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// Compares blob URLs the way the service echoes them: scheme and host case-insensitively,
/// the path after percent-decoding.
pub fn same_blob_url(a: &str, b: &str) -> bool {
    match (Url::parse(a), Url::parse(b)) {
        (Ok(a), Ok(b)) => {
            a.scheme() == b.scheme()
                && a.host_str().map(str::to_ascii_lowercase)
                    == b.host_str().map(str::to_ascii_lowercase)
                && a.port_or_known_default() == b.port_or_known_default()
                && decoded_path(&a) == decoded_path(&b)
        }
        _ => a == b,
    }
}

fn decoded_path(u: &Url) -> Vec<u8> {
    percent_encoding::percent_decode_str(u.path()).collect()
}

fn null_as_zero<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or(0))
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn lenient_line<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

fn lenient_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Some(Value::String(s)) => {
            time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|t| t.unix_timestamp())
                .or_else(|| s.trim().parse().ok())
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_seed_batch_object() {
        let b: Batch = serde_json::from_value(json!({
          "id": "batch_b632a805-797b-49ed-9c9c-86eb4057f2a2",
          "completion_window": "24h", "created_at": 1747516485, "endpoint": "/chat/completions",
          "input_file_id": null, "object": "batch", "status": "validating",
          "cancelled_at": null, "cancelling_at": null, "completed_at": null, "error_file_id": null,
          "errors": null, "expired_at": null, "expires_at": 1747602881, "failed_at": null,
          "finalizing_at": null, "in_progress_at": null, "metadata": null, "output_file_id": null,
          "request_counts": { "completed": 0, "failed": 0, "total": 0 },
          "error_blob": "",
          "input_blob": "https://docstest002.blob.core.windows.net/batch-input/test.jsonl",
          "output_blob": ""
        }))
        .unwrap();
        assert_eq!(b.status, BatchStatus::Validating);
        assert_eq!(b.expires_at, Some(1747602881));
    }

    #[test]
    fn lenient_with_older_and_odd_shapes() {
        let b: Batch = serde_json::from_value(json!({
            "id": "batch_1", "status": "Canceled",
            "created_at": "2024-07-19T17:13:57.2491382+00:00",
            "request_counts": { "total": 10, "completed": null, "failed": null },
            "errors": { "object": "list", "value": [ { "code": "empty_file", "message": "m", "line": "3" } ] },
            "something_new": { "x": 1 }
        }))
        .unwrap();
        assert_eq!(b.status, BatchStatus::Cancelled);
        assert!(b.status.is_terminal());
        assert_eq!(b.created_at, Some(1721409237));
        assert_eq!(b.request_counts.total, 10);
        assert_eq!(b.errors.unwrap().data[0].line, Some(3));
        assert_eq!(BatchStatus::parse("IN_PROGRESS"), BatchStatus::InProgress);
        assert_eq!(BatchStatus::parse("expired"), BatchStatus::Expired);
        assert!(!BatchStatus::parse("brand_new").is_terminal());
        let page: BatchPage =
            serde_json::from_value(json!({"value": [{"id": "b", "status": "completed"}]})).unwrap();
        assert_eq!(page.data.len(), 1);
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
    }

    #[test]
    fn blob_urls_compare_by_meaning() {
        assert!(same_blob_url(
            "https://ACCT.blob.core.windows.net/batch-input/a%20b.jsonl",
            "https://acct.blob.core.windows.net/batch-input/a b.jsonl"
        ));
        assert!(!same_blob_url(
            "https://acct.blob.core.windows.net/batch-input/a.jsonl",
            "https://acct.blob.core.windows.net/batch-input/b.jsonl"
        ));
    }

    #[test]
    fn ids_go_into_paths_as_the_service_writes_them() {
        let c = BatchClient::new(
            Url::parse("https://r.openai.azure.com").unwrap(),
            ApiStyle::V1,
            Auth::ApiKey(crate::config::Secret::new("k")),
            RetryConfig::default(),
        );
        // What `retrieve` requests (`cancel` adds `/cancel`).
        let url = |id: &str| {
            c.url(&format!("batches/{}", encode_segment(id)), &[])
                .to_string()
        };
        let base = "https://r.openai.azure.com/openai/v1/batches/";
        // The ids the service gives (the spec's example, the blob storage how-to's) and the
        // unreserved characters RFC 3986 §2.3 asks producers not to encode.
        for id in [
            "batch_72a2792ef7d24ba7b82c7fe4a37e379f",
            "batch_b632a805-797b-49ed-9c9c-86eb4057f2a2",
            "a_b-c.d~e",
        ] {
            assert_eq!(url(id), format!("{base}{id}"));
        }
        // What would end the segment, start a query or a fragment, or read as an escape is
        // encoded, and so is anything beyond ASCII.
        assert_eq!(url("a/b?c#d%e f"), format!("{base}a%2Fb%3Fc%23d%25e%20f"));
        assert_eq!(url("a;b=c+d"), format!("{base}a%3Bb%3Dc%2Bd"));
        assert_eq!(url("é"), format!("{base}%C3%A9"));
    }

    type Query = Vec<(String, String)>;

    /// A list route that answers each request with `answer(query, n)` (`n`: requests so far)
    /// and keeps the queries it got.
    async fn fake_list(
        answer: impl Fn(&[(String, String)], usize) -> (u16, Value) + Clone + Send + Sync + 'static,
    ) -> (Url, Arc<std::sync::Mutex<Vec<Query>>>) {
        let seen: Arc<std::sync::Mutex<Vec<Query>>> = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().fallback(move |q: axum::extract::RawQuery| {
            let (answer, log) = (answer.clone(), log.clone());
            async move {
                let query: Query = url::form_urlencoded::parse(q.0.unwrap_or_default().as_bytes())
                    .into_owned()
                    .collect();
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(query.clone());
                    log.len() - 1
                };
                let (status, body) = answer(&query, n);
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    axum::Json(body),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    fn client(endpoint: Url, style: ApiStyle) -> BatchClient {
        BatchClient::new(
            endpoint,
            style,
            Auth::ApiKey(crate::config::Secret::new("k")),
            RetryConfig::default(),
        )
    }

    fn classic() -> ApiStyle {
        ApiStyle::Classic {
            api_version: "2025-04-01-preview".into(),
        }
    }

    const WANTED: &str = "https://a.blob.core.windows.net/in/x.jsonl";
    const NOT_BEFORE: i64 = 1_000_000;

    /// `n` batches from `first`, created at `at`, for other inputs unless `wanted`.
    fn batches(first: usize, n: usize, at: i64, wanted: bool) -> Vec<Value> {
        (first..first + n)
            .map(|i| {
                let blob = if wanted { WANTED.to_string() } else { format!("https://a.blob.core.windows.net/in/other-{i}.jsonl") };
                json!({"id": format!("b{i}"), "status": "in_progress", "created_at": at, "input_blob": blob})
            })
            .collect()
    }

    fn page(data: Vec<Value>, has_more: bool) -> (u16, Value) {
        let last = data.last().map(|b| b["id"].clone());
        (
            200,
            json!({"object": "list", "data": data, "has_more": has_more, "last_id": last}),
        )
    }

    fn get<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn adoption_asks_a_dated_version_for_the_window_oldest_first() {
        let (url, seen) = fake_list(|_, _| page(batches(0, 1, NOT_BEFORE + 2, true), false)).await;
        let found = client(url, classic())
            .find_by_input_blob(WANTED, NOT_BEFORE)
            .await;
        assert_eq!(found.unwrap().unwrap().id, "b0");
        let seen = seen.lock().unwrap();
        assert_eq!(get(&seen[0], "$filter"), Some("created_at gt 999999"));
        assert_eq!(get(&seen[0], "$orderby"), Some("created_at asc"));
        assert_eq!(get(&seen[0], "api-version"), Some("2025-04-01-preview"));
    }

    #[tokio::test]
    async fn adoption_walks_on_past_older_batches_in_any_order() {
        // Oldest first, with no window (v1; or a dated version that refuses `$filter`): the
        // first page holds only older batches, the sought one is on the second.
        let answer = |q: &[(String, String)], _: usize| {
            if get(q, "$filter").is_some() {
                return (
                    400,
                    json!({"error": {"code": "invalid_value", "message": "no $filter here"}}),
                );
            }
            match get(q, "after") {
                None => page(batches(0, 100, NOT_BEFORE - 3600, false), true),
                Some("b99") => page(batches(100, 1, NOT_BEFORE + 1, true), false),
                Some(other) => panic!("unexpected cursor {other}"),
            }
        };
        for style in [ApiStyle::V1, classic()] {
            let (url, seen) = fake_list(answer).await;
            let found = client(url, style.clone())
                .find_by_input_blob(WANTED, NOT_BEFORE)
                .await;
            assert_eq!(found.unwrap().unwrap().id, "b100", "{style:?}");
            let seen = seen.lock().unwrap();
            let windowed = seen.iter().filter(|q| get(q, "$filter").is_some()).count();
            assert_eq!(
                windowed,
                usize::from(style != ApiStyle::V1),
                "{style:?}: {seen:?}"
            );
        }
    }

    #[tokio::test]
    async fn adoption_ignores_a_match_from_before_the_window_and_ends_with_the_list() {
        let (url, _) = fake_list(|_, _| page(batches(0, 1, NOT_BEFORE - 1, true), false)).await;
        let found = client(url, ApiStyle::V1)
            .find_by_input_blob(WANTED, NOT_BEFORE)
            .await;
        assert!(found.unwrap().is_none());
    }

    #[tokio::test]
    async fn adoption_gives_up_after_a_bounded_walk_rather_than_say_none() {
        let (url, seen) =
            fake_list(|_, n| page(batches(n * 100, 100, NOT_BEFORE + 1, false), true)).await;
        let err = client(url, ApiStyle::V1)
            .find_by_input_blob(WANTED, NOT_BEFORE)
            .await
            .unwrap_err();
        assert!(
            matches!(err, OpenAiError::SearchIncomplete { scanned: 5000 }),
            "{err}"
        );
        assert!(!err.may_still_create() && !err.is_transient());
        assert_eq!(seen.lock().unwrap().len(), ADOPTION_MAX_PAGES as usize);
    }

    #[tokio::test]
    async fn a_404_is_told_apart_by_its_code() {
        let answer = |body: Value| move |_: &[(String, String)], _: usize| (404, body.clone());
        // Azure's gateway, for a route it does not know (a retired api-version, a wrong
        // path), and a 404 that is no service's JSON at all: every call, no batch news.
        for body in [
            json!({"error": {"code": "404", "message": "Resource not found"}}),
            json!("Not Found"),
        ] {
            let (url, _) = fake_list(answer(body.clone())).await;
            let c = client(url, classic());
            let e = c.retrieve("batch_1").await.unwrap_err();
            assert!(matches!(e, OpenAiError::NoSuchRoute { .. }), "{body}: {e}");
            assert!(e.is_transient() && !e.may_still_create(), "{e}");
            assert!(e.to_string().contains("AZURE_OPENAI_API_VERSION"), "{e}");
            let e = c.list_page(None, 1).await.unwrap_err();
            assert!(matches!(e, OpenAiError::NoSuchRoute { .. }), "{body}: {e}");
        }
        // The service's own answer that the batch does not exist, in the spec's spelling
        // and OpenAI's; any other code on a 404 proves nothing about the batch.
        for (code, missing) in [
            ("notFound", true),
            ("not_found", true),
            ("batch_not_found", true),
            ("DeploymentNotFound", false),
        ] {
            let body = json!({"error": {"code": code, "message": "No batch 'batch_1'."}});
            let (url, _) = fake_list(answer(body)).await;
            let e = client(url, ApiStyle::V1)
                .retrieve("batch_1")
                .await
                .unwrap_err();
            let told = match e {
                OpenAiError::NotFound(ref id) => id == "batch_1",
                OpenAiError::Rejected { status: 404, .. } => false,
                _ => panic!("{code}: {e}"),
            };
            assert_eq!(told, missing, "{code}: {e}");
        }
    }

    #[test]
    fn urls_for_both_styles() {
        let auth = Auth::ApiKey(crate::config::Secret::new("k"));
        let c = BatchClient::new(
            Url::parse("https://r.openai.azure.com/").unwrap(),
            ApiStyle::Classic {
                api_version: "2025-04-01-preview".into(),
            },
            auth.clone(),
            RetryConfig::default(),
        );
        assert_eq!(
            c.url("batches", &[]).as_str(),
            "https://r.openai.azure.com/openai/batches?api-version=2025-04-01-preview"
        );
        let c = BatchClient::new(
            Url::parse("https://r.openai.azure.com").unwrap(),
            ApiStyle::V1,
            auth,
            RetryConfig::default(),
        );
        assert_eq!(
            c.url("batches/b1/cancel", &[]).as_str(),
            "https://r.openai.azure.com/openai/v1/batches/b1/cancel"
        );
    }
}
