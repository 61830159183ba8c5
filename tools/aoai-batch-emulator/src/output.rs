//! The result files: one answer per request in the documented line shapes
//! (batch-api-research.md §1.8), streamed to `{output_folder}/{GUID}/results.jsonl` and, only
//! when some request failed, `errors.jsonl`.
//!
//! Answers are deterministic functions of the request (an echo of the last user message, token
//! counts from lengths) so tests can check them; only ids and `request_id`s are random.

use std::sync::Arc;

use aoai_blob_batch::storage::{BlobStore, BlobWriter, StorageError};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    blob_url::Account,
    input::{Api, prompt_tokens},
};

/// Where a batch writes: `output_folder.url` resolved to this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFolder {
    pub container: String,
    /// The folder inside the container, without a trailing delimiter; may be empty.
    pub prefix: String,
    pub delimiter: String,
}

impl OutputFolder {
    /// The blob name of `file` in the service-chosen `{GUID}` folder.
    pub fn blob_name(&self, guid: &str, file: &str) -> String {
        let mut parts: Vec<&str> = Vec::with_capacity(3);
        if !self.prefix.is_empty() {
            parts.push(&self.prefix);
        }
        parts.push(guid);
        parts.push(file);
        parts.join(&self.delimiter)
    }
}

/// The answer to one request, serialized: a line for `results.jsonl` or one for `errors.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Success(Vec<u8>),
    Failure(Vec<u8>),
}

/// One output line. Typed rather than `json!` so the fields keep the documented order
/// (`serde_json` sorts map keys). Azure's lines carry no `id`, unlike OpenAI's
/// (batch-api-research.md §1.8).
#[derive(Serialize)]
struct Line<'a, B: Serialize> {
    custom_id: &'a str,
    response: Option<LineResponse<B>>,
    error: Option<LineError>,
}

#[derive(Serialize)]
struct LineResponse<B: Serialize> {
    status_code: u16,
    request_id: String,
    body: B,
}

#[derive(Serialize)]
struct LineError {
    code: &'static str,
    message: &'static str,
}

#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: String,
    param: Option<String>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: String,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: [ChatChoice; 1],
    usage: ChatUsage,
    system_fingerprint: Option<String>,
}

#[derive(Serialize)]
struct ChatChoice {
    index: u32,
    message: ChatMessage,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct ChatMessage {
    role: &'static str,
    content: String,
    refusal: Option<String>,
}

#[derive(Serialize)]
struct ChatUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct ResponseObject<'a> {
    id: String,
    object: &'static str,
    created_at: i64,
    status: &'static str,
    model: &'a str,
    output: [ResponseMessage; 1],
    usage: ResponseUsage,
}

#[derive(Serialize)]
struct ResponseMessage {
    #[serde(rename = "type")]
    kind: &'static str,
    id: String,
    status: &'static str,
    role: &'static str,
    content: [OutputText; 1],
}

#[derive(Serialize)]
struct OutputText {
    #[serde(rename = "type")]
    kind: &'static str,
    text: String,
    annotations: [(); 0],
}

#[derive(Serialize)]
struct ResponseUsage {
    input_tokens: u64,
    output_tokens: u64,
    total_tokens: u64,
}

/// Answers one request line. `fail` injects the server error `--line-failure-rate` asks for.
pub fn answer(
    custom_id: &str,
    body: &Map<String, Value>,
    api: Api,
    fail: bool,
    now: i64,
) -> Answer {
    if fail {
        return Answer::Failure(response_line(
            custom_id,
            500,
            ErrorBody {
                error: ErrorDetail {
                    code: "server_error",
                    message:
                        "The server had an error while processing your request. Sorry about that!"
                            .to_string(),
                    param: None,
                    kind: "server_error",
                },
            },
        ));
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match api {
        Api::ChatCompletions => {
            let Some(messages) = body
                .get("messages")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
            else {
                return Answer::Failure(bad_request(custom_id, "messages"));
            };
            let content = format!("echo: {}", last_user_text(messages));
            let (prompt, completion) = (prompt_tokens(body), text_tokens(&content));
            Answer::Success(response_line(
                custom_id,
                200,
                ChatCompletion {
                    id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
                    object: "chat.completion",
                    created: now,
                    model,
                    choices: [ChatChoice {
                        index: 0,
                        message: ChatMessage {
                            role: "assistant",
                            content,
                            refusal: None,
                        },
                        logprobs: None,
                        finish_reason: "stop",
                    }],
                    usage: ChatUsage {
                        prompt_tokens: prompt,
                        completion_tokens: completion,
                        total_tokens: prompt + completion,
                    },
                    system_fingerprint: None,
                },
            ))
        }
        Api::Responses => {
            let text = match body.get("input") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(items)) if !items.is_empty() => last_user_text(items),
                _ => return Answer::Failure(bad_request(custom_id, "input")),
            };
            let content = format!("echo: {text}");
            let (prompt, completion) = (prompt_tokens(body), text_tokens(&content));
            Answer::Success(response_line(
                custom_id,
                200,
                ResponseObject {
                    id: format!("resp_{}", uuid::Uuid::new_v4().simple()),
                    object: "response",
                    created_at: now,
                    status: "completed",
                    model,
                    output: [ResponseMessage {
                        kind: "message",
                        id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
                        status: "completed",
                        role: "assistant",
                        content: [OutputText {
                            kind: "output_text",
                            text: content,
                            annotations: [],
                        }],
                    }],
                    usage: ResponseUsage {
                        input_tokens: prompt,
                        output_tokens: completion,
                        total_tokens: prompt + completion,
                    },
                },
            ))
        }
    }
}

/// The line for a request the completion window ran out on (OpenAI's documented shape).
pub fn expired_line(custom_id: &str) -> Vec<u8> {
    to_bytes(&Line::<()> {
        custom_id,
        response: None,
        error: Some(LineError {
            code: "batch_expired",
            message: "This request could not be executed before the completion window expired.",
        }),
    })
}

fn response_line(custom_id: &str, status_code: u16, body: impl Serialize) -> Vec<u8> {
    to_bytes(&Line {
        custom_id,
        response: Some(LineResponse {
            status_code,
            request_id: uuid::Uuid::new_v4().to_string(),
            body,
        }),
        error: None,
    })
}

fn to_bytes(line: &impl Serialize) -> Vec<u8> {
    // Serializing these plain structs cannot fail: no maps with non-string keys, no I/O.
    serde_json::to_vec(line).unwrap_or_default()
}

fn bad_request(custom_id: &str, param: &str) -> Vec<u8> {
    response_line(
        custom_id,
        400,
        ErrorBody {
            error: ErrorDetail {
                code: "missing_required_parameter",
                message: format!("Missing required parameter: '{param}'."),
                param: Some(param.to_string()),
                kind: "invalid_request_error",
            },
        },
    )
}

/// The text of the last user message, for chat `messages` and Responses `input` alike.
fn last_user_text(items: &[Value]) -> String {
    let item = items
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .or_else(|| items.last());
    match item.and_then(|m| m.get("content")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn text_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

/// Lines are released in reversed groups of this many: the output order differs from the
/// input order, as the service warns it will, while memory stays bounded.
const REORDER_WINDOW: usize = 16;
const CONTENT_TYPE: &str = "application/jsonl";

/// The two result files of one batch, written as lines come. Nothing is visible in storage
/// until [`Outputs::finish`]; a batch that fails drops them and leaves no file behind.
pub struct Outputs {
    store: Arc<BlobStore>,
    account: Account,
    container: String,
    results_name: String,
    errors_name: String,
    results: BlobWriter,
    errors: Option<BlobWriter>,
    window: Vec<Vec<u8>>,
}

impl Outputs {
    pub fn open(store: Arc<BlobStore>, account: &Account, folder: &OutputFolder) -> Self {
        let guid = uuid::Uuid::new_v4().to_string();
        let results_name = folder.blob_name(&guid, "results.jsonl");
        let errors_name = folder.blob_name(&guid, "errors.jsonl");
        let results = store.writer(&folder.container, &results_name, CONTENT_TYPE);
        Self {
            store,
            account: account.clone(),
            container: folder.container.clone(),
            results_name,
            errors_name,
            results,
            errors: None,
            window: Vec::with_capacity(REORDER_WINDOW),
        }
    }

    pub async fn write(&mut self, answer: &Answer) -> Result<(), StorageError> {
        match answer {
            Answer::Success(line) => self.success(line).await,
            Answer::Failure(line) => self.failure(line).await,
        }
    }

    pub async fn success(&mut self, line: &[u8]) -> Result<(), StorageError> {
        self.window.push(jsonl(line));
        if self.window.len() >= REORDER_WINDOW {
            self.flush_window().await?;
        }
        Ok(())
    }

    /// `errors.jsonl` exists only once a request has failed.
    pub async fn failure(&mut self, line: &[u8]) -> Result<(), StorageError> {
        let writer = self.errors.get_or_insert_with(|| {
            self.store
                .writer(&self.container, &self.errors_name, CONTENT_TYPE)
        });
        writer.write(&jsonl(line)).await
    }

    async fn flush_window(&mut self) -> Result<(), StorageError> {
        let window = std::mem::take(&mut self.window);
        for line in window.iter().rev() {
            self.results.write(line).await?;
        }
        Ok(())
    }

    /// Commits the files; returns the URLs of `results.jsonl` and `errors.jsonl`, both always,
    /// as the service returns both even when no request failed.
    pub async fn finish(mut self) -> Result<(String, String), StorageError> {
        self.flush_window().await?;
        self.results.finish().await?;
        if let Some(errors) = self.errors {
            errors.finish().await?;
        }
        Ok((
            self.account.blob_url(&self.container, &self.results_name),
            self.account.blob_url(&self.container, &self.errors_name),
        ))
    }
}

fn jsonl(line: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(line.len() + 1);
    bytes.extend_from_slice(line);
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parsed(bytes: Vec<u8>) -> Value {
        serde_json::from_slice(&bytes).unwrap()
    }

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_chat_answer_echoes_the_last_user_message() {
        let b = body(json!({"model": "dep", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "When was Microsoft founded?"}
        ]}));
        let Answer::Success(line) = answer("task-0", &b, Api::ChatCompletions, false, 7) else {
            panic!("expected a success");
        };
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"custom_id":"task-0","response":{"status_code":200,"#),
            "{text}"
        );
        let line = parsed(line);
        assert_eq!(line["custom_id"], "task-0");
        assert!(line["error"].is_null());
        assert_eq!(line["response"]["status_code"], 200);
        assert!(line.get("id").is_none());
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(body["model"], "dep");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "echo: When was Microsoft founded?"
        );
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        let usage = &body["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().unwrap()
                    + usage["completion_tokens"].as_u64().unwrap()
            )
        );
        // "echo: When was Microsoft founded?" is 33 bytes.
        assert_eq!(usage["completion_tokens"], 9);
    }

    #[test]
    fn a_responses_answer_has_the_response_shape() {
        let b = body(json!({"model": "dep", "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "What's in this image?"},
                                         {"type": "input_image", "image_url": "https://x/img.png"}]}
        ]}));
        let Answer::Success(line) = answer("t", &b, Api::Responses, false, 7) else {
            panic!("expected a success");
        };
        let line = parsed(line);
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "response");
        assert_eq!(body["status"], "completed");
        assert_eq!(body["output"][0]["type"], "message");
        assert_eq!(body["output"][0]["content"][0]["type"], "output_text");
        assert_eq!(
            body["output"][0]["content"][0]["text"],
            "echo: What's in this image?"
        );
        assert!(body["usage"]["input_tokens"].as_u64().unwrap() > 0);
    }

    #[test]
    fn failures_and_bad_bodies_are_error_lines() {
        let b = body(json!({"model": "dep", "messages": [{"role": "user", "content": "x"}]}));
        let Answer::Failure(line) = answer("t", &b, Api::ChatCompletions, true, 7) else {
            panic!("expected a failure");
        };
        let line = parsed(line);
        assert_eq!(line["response"]["status_code"], 500);
        assert_eq!(line["response"]["body"]["error"]["code"], "server_error");
        let Answer::Failure(line) =
            answer("t", &body(json!({"model": "d"})), Api::Responses, false, 7)
        else {
            panic!("expected a failure");
        };
        let line = parsed(line);
        assert_eq!(line["response"]["status_code"], 400);
        assert_eq!(line["response"]["body"]["error"]["param"], "input");
        let line = parsed(expired_line("t"));
        assert!(line["response"].is_null());
        assert_eq!(line["error"]["code"], "batch_expired");
    }

    #[test]
    fn output_names_use_the_folder_and_delimiter() {
        let f = OutputFolder {
            container: "out".into(),
            prefix: String::new(),
            delimiter: "/".into(),
        };
        assert_eq!(f.blob_name("G", "results.jsonl"), "G/results.jsonl");
        let f = OutputFolder {
            prefix: "runs/a".into(),
            ..f
        };
        assert_eq!(f.blob_name("G", "errors.jsonl"), "runs/a/G/errors.jsonl");
    }
}
