//! HTTP-triggered functions (function-webhook), served the way the Functions host serves them:
//! `POST http://{--http-listen}/api/{function}` reaches the handler either
//!
//! - forwarded as it came, to the handler's `/api/{function}` (host.json
//!   `customHandler.enableForwardingHttpRequest: true`, for a function whose only bindings are
//!   an `httpTrigger` in and an `http` out: azure-functions-host
//!   `DefaultHttpWorkerService.InvokeAsync` / `ProcessHttpInAndOutInvocationRequest`,
//!   `FunctionMetadataExtensions.IsHttpInAndOutFunction`, `GetPathValue`), or
//! - in the invocation envelope, `Data.{trigger binding}` = `{Url, Method, Query, Headers,
//!   Body}` to `/{function}`, the answer's `Outputs.{http output}` = `{statusCode, body,
//!   headers}` (`ProcessDefaultInvocationRequest`, `HttpRequestExtensions.GetRequestAsJObject`).
//!
//! Like `func start`, it does not check function keys (`authLevel`); in Azure the host does.
//! Everything an Event Grid or timer function gets stays as it was: those are never
//! forwarded, whatever the setting.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::{Context, Result};
use axum::{
    Router,
    body::Bytes,
    extract::{Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};

use crate::invoke::{HOST_VERSION, print_logs};

/// One HTTP-triggered function, as its function.json declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpFunction {
    pub name: String,
    /// The `httpTrigger` binding's name (`req`).
    pub binding: String,
    /// The `http` output binding's name (`res`), when there is one.
    pub output: Option<String>,
    /// Upper-case methods; empty: any.
    pub methods: Vec<String>,
    /// Only an httpTrigger in and an http out: what the host forwards when asked to.
    pub in_and_out_only: bool,
}

impl HttpFunction {
    /// Reads `{root}/{name}/function.json`.
    pub fn load(root: &Path, name: &str) -> Result<Self> {
        let path = root.join(name).join("function.json");
        let json: Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", path.display()))?;
        let bindings = json["bindings"].as_array().cloned().unwrap_or_default();
        let of_type = |t: &str| {
            bindings.iter().find(|b| {
                b["type"]
                    .as_str()
                    .is_some_and(|x| x.eq_ignore_ascii_case(t))
            })
        };
        let trigger = of_type("httpTrigger")
            .with_context(|| format!("{}: no httpTrigger binding", path.display()))?;
        let output = of_type("http").and_then(|b| b["name"].as_str().map(str::to_string));
        let inputs = bindings
            .iter()
            .filter(|b| {
                !b["direction"]
                    .as_str()
                    .is_some_and(|d| d.eq_ignore_ascii_case("out"))
            })
            .count();
        let outputs = bindings.len() - inputs;
        Ok(Self {
            name: name.to_string(),
            binding: trigger["name"].as_str().unwrap_or("req").to_string(),
            in_and_out_only: inputs == 1 && outputs == 1 && output.is_some(),
            output,
            methods: trigger["methods"]
                .as_array()
                .map(|m| {
                    m.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_ascii_uppercase)
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// host.json's `customHandler.enableForwardingHttpRequest` (default false).
pub fn forwarding_enabled(root: &Path) -> Result<bool> {
    let path = root.join("host.json");
    let host: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let custom = find_ci(&host, "customHandler");
    Ok(custom
        .and_then(|c| find_ci(c, "enableForwardingHttpRequest"))
        .and_then(Value::as_bool)
        .unwrap_or(false))
}

fn find_ci<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

struct Front {
    functions: Vec<HttpFunction>,
    forward: bool,
    handler: String,
    client: reqwest::Client,
}

/// Serves the functions on `listener` until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    functions: Vec<HttpFunction>,
    forward: bool,
    handler_port: u16,
    timeout: std::time::Duration,
) {
    let front = Arc::new(Front {
        functions,
        forward,
        handler: format!("http://127.0.0.1:{handler_port}"),
        client: reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()
            .expect("a plain HTTP client builds"),
    });
    let app = Router::new().fallback(route).with_state(front);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("the HTTP trigger listener stopped: {e}");
    }
}

/// Binds the listener; says where each function is served.
pub async fn bind(
    addr: SocketAddr,
    functions: &[HttpFunction],
    forward: bool,
) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--http-listen)"))?;
    let local = listener.local_addr()?;
    for f in functions {
        tracing::info!(
            "{}: httpTrigger at http://{local}/api/{} ({})",
            f.name,
            f.name,
            if forward && f.in_and_out_only {
                "forwarded as it came (enableForwardingHttpRequest)"
            } else {
                "in the invocation envelope"
            }
        );
    }
    Ok(listener)
}

async fn route(State(front): State<Arc<Front>>, request: Request) -> Response {
    let path = request.uri().path().to_string();
    let Some(f) = path
        .strip_prefix("/api/")
        .and_then(|name| {
            front
                .functions
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
        })
        .cloned()
    else {
        return (StatusCode::NOT_FOUND, "no such function\n").into_response();
    };
    if !f.methods.is_empty() && !f.methods.iter().any(|m| m == request.method().as_str()) {
        return (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n").into_response();
    }
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 100 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}\n"),
            )
                .into_response();
        }
    };
    let invocation_id = uuid::Uuid::new_v4().to_string();
    let result = if front.forward && f.in_and_out_only {
        forward(
            &front,
            &parts.method,
            &parts.uri,
            &parts.headers,
            body,
            &invocation_id,
        )
        .await
    } else {
        envelope(
            &front,
            &f,
            &parts.method,
            &parts.uri,
            &parts.headers,
            body,
            &invocation_id,
        )
        .await
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            // What the host answers when the invocation fails.
            tracing::error!("{}: invocation {invocation_id} failed: {e}", f.name);
            (StatusCode::INTERNAL_SERVER_ERROR, "").into_response()
        }
    }
}

const HOP_BY_HOP: [&str; 5] = [
    "host",
    "connection",
    "content-length",
    "transfer-encoding",
    "keep-alive",
];

async fn forward(
    front: &Front,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Bytes,
    invocation_id: &str,
) -> Result<Response, String> {
    let url = format!(
        "{}{}",
        front.handler,
        uri.path_and_query().map_or(uri.path(), |p| p.as_str())
    );
    let mut req = front.client.request(method.clone(), url);
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(&name.as_str()) && name.as_str() != "user-agent" {
            req = req.header(name, value);
        }
    }
    let resp = req
        .header("X-Azure-Functions-InvocationId", invocation_id)
        .header("X-Azure-Functions-HostVersion", HOST_VERSION)
        .header("User-Agent", format!("Azure-Functions-Host/{HOST_VERSION}"))
        .body(body)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp.headers().get("content-type").cloned();
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    let mut out = (status, bytes).into_response();
    if let Some(ct) = content_type.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
        out.headers_mut().insert("content-type", ct);
    }
    Ok(out)
}

async fn envelope(
    front: &Front,
    f: &HttpFunction,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Bytes,
    invocation_id: &str,
) -> Result<Response, String> {
    let mut header_map = Map::new();
    for (name, value) in headers {
        let entry = header_map
            .entry(name.as_str().to_string())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let (Value::Array(list), Ok(v)) = (entry, value.to_str()) {
            list.push(Value::String(v.to_string()));
        }
    }
    let query: Map<String, Value> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                .collect()
        })
        .unwrap_or_default();
    // GetRequestAsJObject reads the body as a string (as text, decoded: not the bytes).
    let request = json!({
        "Url": format!("http://localhost{uri}"),
        "Method": method.as_str(),
        "Query": query,
        "Headers": header_map,
        "Body": String::from_utf8_lossy(&body),
    });
    let payload = json!({
        "Data": { f.binding.clone(): request },
        "Metadata": { "Query": query, "Headers": header_map },
    });
    let resp = front
        .client
        .post(format!("{}/{}", front.handler, f.name))
        .header("X-Azure-Functions-InvocationId", invocation_id)
        .header("X-Azure-Functions-HostVersion", HOST_VERSION)
        .header("User-Agent", format!("Azure-Functions-Host/{HOST_VERSION}"))
        .json(&payload)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if !resp.status().is_success() {
        return Err(format!("the handler answered {}", resp.status()));
    }
    let answer: Value = resp
        .json()
        .await
        .map_err(|e| format!("the answer is not JSON: {e}"))?;
    if let Some(logs) = answer["Logs"].as_array() {
        let lines: Vec<String> = logs
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect();
        print_logs(&f.name, &lines);
    }
    let res = f
        .output
        .as_deref()
        .map(|o| &answer["Outputs"][o])
        .unwrap_or(&Value::Null);
    let status = res["statusCode"]
        .as_u64()
        .or_else(|| res["statusCode"].as_str().and_then(|s| s.parse().ok()))
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::OK);
    let text = match &res["body"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut out = (status, text).into_response();
    if let Some(Value::Object(hs)) = res.get("headers") {
        for (k, v) in hs {
            if let (Ok(name), Some(Ok(value))) = (
                HeaderName::from_bytes(k.as_bytes()),
                v.as_str().map(HeaderValue::from_str),
            ) {
                out.headers_mut().insert(name, value);
            }
        }
    }
    Ok(out)
}
