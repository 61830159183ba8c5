//! The input file as the service sees it: lines read from a blob stream with bounded memory,
//! the service's validation rules (batch-api-research.md §1.6, §1.7) and a token estimate for
//! the enqueued-token quota.

use std::{collections::HashSet, pin::Pin};

use aoai_blob_batch::storage::{BlobStore, StorageError};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::{Map, Value};

/// Azure's `too_many_tasks` limit (the OpenAI text says 50,000; Azure documents 100,000).
pub const MAX_REQUESTS: u64 = 100_000;
/// Azure's documented maximum input file size for an input in the customer's storage
/// (`input_blob`): 1 GB ("Bring your own storage" in the Global Batch limits; uploaded files
/// have 200 MB). The smaller reading of "GB" keeps the emulator at least as strict.
pub const MAX_FILE_BYTES: u64 = 1_000_000_000;
/// No line limit is documented; this one only keeps a newline-free blob from filling memory.
pub const MAX_LINE_BYTES: usize = 32 * 1024 * 1024;
/// Completion budget assumed for a request without `max_tokens` (or its newer names), so that
/// the quota counts something for the answer as well as for the prompt.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 64;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One entry of a failed batch's `errors.data`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BatchError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<u64>,
}

impl BatchError {
    pub fn new(code: &str, message: impl Into<String>, line: Option<u64>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            param: None,
            line,
        }
    }

    fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn no_permissions() -> Self {
        Self::new(
            "input_no_permissions",
            "The input blob could not be read. Make sure it exists and that the Azure OpenAI \
             resource's system-assigned managed identity has read access to it and can reach the \
             storage account through its network rules.",
            None,
        )
    }

    pub fn modified() -> Self {
        Self::new(
            "input_modified",
            "The input blob was modified after the batch job was submitted. Input blobs must not \
             change while a batch job is processing them.",
            None,
        )
    }
}

/// Which API the lines call; decides the shape of the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    ChatCompletions,
    Responses,
}

/// The batch `endpoint` values Azure accepts, with and without the `/v1` prefix.
pub fn endpoint_api(endpoint: &str) -> Option<Api> {
    match endpoint.strip_prefix("/v1").unwrap_or(endpoint) {
        "/chat/completions" => Some(Api::ChatCompletions),
        "/responses" => Some(Api::Responses),
        _ => None,
    }
}

/// What a valid input holds, and the version of the blob it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSummary {
    pub etag: String,
    pub requests: u64,
    pub model: String,
    pub tokens: u64,
    /// A test asked for this batch to fail or expire (see [`Injected`]).
    pub injected: Injected,
}

/// Test-only faults aimed at one batch: a batch whose input contains the marker text fails
/// (`--fail-input-containing`) or expires part-way (`--expire-input-containing`). The service
/// has no such switch; they let a test make one batch out of many end badly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    pub fail: bool,
    pub expire: bool,
}

/// The marker texts of [`Injected`].
#[derive(Debug, Clone, Default)]
pub struct Markers {
    pub fail: Option<String>,
    pub expire: Option<String>,
}

impl Markers {
    fn mark(&self, line: &[u8], injected: &mut Injected) {
        let has = |m: &Option<String>| {
            m.as_deref()
                .is_some_and(|m| !m.is_empty() && line.windows(m.len()).any(|w| w == m.as_bytes()))
        };
        injected.fail |= has(&self.fail);
        injected.expire |= has(&self.expire);
    }
}

/// Splits a byte stream into lines without holding more than one line plus one chunk.
pub struct LineReader {
    stream: Pin<Box<dyn Stream<Item = Result<Bytes, StorageError>> + Send>>,
    buf: Vec<u8>,
    start: usize,
    eof: bool,
    line_no: u64,
}

#[derive(Debug)]
pub enum ReadError {
    Storage(StorageError),
    /// A line longer than [`MAX_LINE_BYTES`]; carries its number.
    TooLong(u64),
}

impl LineReader {
    pub fn new(stream: impl Stream<Item = Result<Bytes, StorageError>> + Send + 'static) -> Self {
        Self {
            stream: Box::pin(stream),
            buf: Vec::new(),
            start: 0,
            eof: false,
            line_no: 0,
        }
    }

    /// The next line (1-based number, bytes without `\n` or `\r\n`), or `None` at the end.
    pub async fn next_line(&mut self) -> Result<Option<(u64, Vec<u8>)>, ReadError> {
        let mut searched = self.start;
        loop {
            if let Some(at) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + at;
                let line = trim_cr(&self.buf[self.start..end]).to_vec();
                self.start = end + 1;
                self.line_no += 1;
                return Ok(Some((self.line_no, line)));
            }
            searched = self.buf.len();
            if self.buf.len() - self.start > MAX_LINE_BYTES {
                return Err(ReadError::TooLong(self.line_no + 1));
            }
            if self.eof {
                if self.start == self.buf.len() {
                    return Ok(None);
                }
                let line = trim_cr(&self.buf[self.start..]).to_vec();
                self.start = self.buf.len();
                self.line_no += 1;
                return Ok(Some((self.line_no, line)));
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => {
                    // Drop consumed bytes before growing, so the buffer stays about one chunk.
                    if self.start > 0 {
                        self.buf.drain(..self.start);
                        searched -= self.start;
                        self.start = 0;
                    }
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => return Err(ReadError::Storage(e)),
                None => self.eof = true,
            }
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// The service's checks, fed one line at a time; stops at the first problem, as the service
/// reports one error per failed job.
pub struct Validator<'a> {
    endpoint: &'a str,
    deployments: &'a [String],
    custom_ids: HashSet<String>,
    first_url: Option<String>,
    model: Option<String>,
    requests: u64,
    first_blank: Option<u64>,
    tokens: u64,
}

impl<'a> Validator<'a> {
    /// `deployments` empty means every model name is a deployment.
    pub fn new(endpoint: &'a str, deployments: &'a [String]) -> Self {
        Self {
            endpoint,
            deployments,
            custom_ids: HashSet::new(),
            first_url: None,
            model: None,
            requests: 0,
            first_blank: None,
            tokens: 0,
        }
    }

    pub fn line(&mut self, line_no: u64, bytes: &[u8]) -> Result<(), BatchError> {
        if line_no == 1 && bytes.starts_with(BOM) {
            // Documented known issue ([BATCH] "Known issues"): a UTF-8 BOM fails the job with a
            // message about the deployment name. The service evidently cannot parse the first
            // line, so it cannot read `body.model`, and reports what it was looking for. We use
            // `model_not_found`, the code that goes with that message, because a client that
            // reacts to the code is misled exactly as one reading the message is; `line` stays
            // null as the message names no line.
            return Err(BatchError::new(
                "model_not_found",
                "A valid model deployment name couldn't be extracted from the input file. Please \
                 ensure that each row in the input file has a valid deployment name specified in \
                 the 'model' field, and that the deployment name is consistent across all rows.",
                None,
            ));
        }
        if is_blank(bytes) {
            // Blank lines are fine at the end of the file (an editor's final newline); one in
            // the middle is reported when a request follows it.
            self.first_blank.get_or_insert(line_no);
            return Ok(());
        }
        if let Some(blank) = self.first_blank {
            return Err(BatchError::new(
                "invalid_json_line",
                format!(
                    "Line {blank} of the input file is empty; every line must be a JSON object."
                ),
                Some(blank),
            ));
        }
        self.requests += 1;
        if self.requests > MAX_REQUESTS {
            return Err(BatchError::new(
                "too_many_tasks",
                format!(
                    "The input file contains more than the maximum of {MAX_REQUESTS} requests per batch."
                ),
                None,
            ));
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            BatchError::new(
                "invalid_json_line",
                format!("Line {line_no} of the input file is not valid JSON: {e}."),
                Some(line_no),
            )
        })?;
        let Some(request) = value.as_object() else {
            return Err(invalid_request(
                line_no,
                "the line is not a JSON object",
                None,
            ));
        };
        let custom_id = match request.get("custom_id") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => {
                return Err(invalid_request(
                    line_no,
                    "'custom_id' is required and must be a non-empty string",
                    Some("custom_id"),
                ));
            }
        };
        if request.get("method").and_then(Value::as_str) != Some("POST") {
            return Err(invalid_request(
                line_no,
                "'method' must be \"POST\"",
                Some("method"),
            ));
        }
        let Some(url) = request.get("url").and_then(Value::as_str) else {
            return Err(invalid_request(
                line_no,
                "'url' is required and must be a string",
                Some("url"),
            ));
        };
        let same_as_first = self.first_url.as_deref().is_none_or(|first| first == url);
        if !same_as_first || !same_endpoint(url, self.endpoint) {
            return Err(BatchError::new(
                "url_mismatch",
                format!(
                    "The url '{url}' on line {line_no} does not match the batch endpoint '{}' or the \
                     url of the other requests. All requests in a batch must use the same url.",
                    self.endpoint
                ),
                Some(line_no),
            ));
        }
        if self.first_url.is_none() {
            self.first_url = Some(url.to_string());
        }
        let Some(body) = request.get("body").and_then(Value::as_object) else {
            return Err(invalid_request(
                line_no,
                "'body' is required and must be an object",
                Some("body"),
            ));
        };
        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m,
            _ => {
                return Err(invalid_request(
                    line_no,
                    "'body.model' is required and must name the Global-Batch deployment",
                    Some("body.model"),
                ));
            }
        };
        match &self.model {
            None => {
                if !self.deployments.is_empty() && !self.deployments.iter().any(|d| d == model) {
                    // The service's wording, with `line` null as it gives it.
                    return Err(BatchError::new(
                        "model_not_found",
                        format!(
                            "The provided model deployment '{model}' does not exist in the AOAI \
                             resource. Valid deployments are '{}'. Learn more: \
                             https://aka.ms/aoai_batch/errors.",
                            self.deployments.join(", ")
                        ),
                        None,
                    ));
                }
                self.model = Some(model.clone());
            }
            Some(first) if first != model => {
                return Err(BatchError::new(
                    "model_mismatch",
                    format!(
                        "The model deployment '{model}' on line {line_no} differs from '{first}' \
                         used by the previous requests. All requests in a batch must use the same \
                         deployment."
                    ),
                    Some(line_no),
                ));
            }
            Some(_) => {}
        }
        if !self.custom_ids.insert(custom_id.clone()) {
            return Err(BatchError::new(
                "duplicate_custom_id",
                format!(
                    "The custom_id '{custom_id}' on line {line_no} is already used by an earlier \
                     request. Every custom_id in a batch must be unique."
                ),
                Some(line_no),
            )
            .with_param("custom_id"));
        }
        self.tokens += estimate_tokens(body);
        Ok(())
    }

    pub fn finish(self, etag: String) -> Result<InputSummary, BatchError> {
        match self.model {
            Some(model) if self.requests > 0 => Ok(InputSummary {
                etag,
                requests: self.requests,
                model,
                tokens: self.tokens,
                injected: Injected::default(),
            }),
            _ => Err(BatchError::new(
                "empty_file",
                "The input file is empty. Please ensure that the batch contains at least one request.",
                None,
            )),
        }
    }
}

fn invalid_request(line_no: u64, what: &str, param: Option<&str>) -> BatchError {
    let e = BatchError::new(
        "invalid_request",
        format!("Line {line_no} of the input file is not a valid batch request: {what}."),
        Some(line_no),
    );
    match param {
        Some(p) => e.with_param(p),
        None => e,
    }
}

/// Azure's samples mix `/chat/completions` and `/v1/chat/completions` for the same thing.
fn same_endpoint(url: &str, endpoint: &str) -> bool {
    url.strip_prefix("/v1").unwrap_or(url) == endpoint.strip_prefix("/v1").unwrap_or(endpoint)
}

/// Reads the input blob once, streaming, and runs the service's checks over it.
/// `Err` only for a transient storage fault (worth a retry); an unreadable blob is the job's
/// `input_no_permissions`.
pub async fn scan(
    store: &BlobStore,
    container: &str,
    name: &str,
    endpoint: &str,
    deployments: &[String],
    markers: &Markers,
) -> Result<Result<InputSummary, BatchError>, StorageError> {
    let (info, body) = match store.download(container, name, None).await {
        Ok(x) => x,
        Err(e) if e.is_transient() => return Err(e),
        Err(_) => return Ok(Err(BatchError::no_permissions())),
    };
    if info.size > MAX_FILE_BYTES {
        return Ok(Err(BatchError::new(
            "invalid_request",
            format!(
                "The input file is {} bytes; the maximum size of a batch input file in your own storage is 1 GB.",
                info.size
            ),
            None,
        )));
    }
    let mut validator = Validator::new(endpoint, deployments);
    let mut reader = LineReader::new(body);
    let mut injected = Injected::default();
    loop {
        match reader.next_line().await {
            Ok(Some((no, line))) => {
                markers.mark(&line, &mut injected);
                if let Err(e) = validator.line(no, &line) {
                    return Ok(Err(e));
                }
            }
            Ok(None) => break,
            Err(ReadError::TooLong(no)) => {
                return Ok(Err(BatchError::new(
                    "invalid_json_line",
                    format!("Line {no} of the input file is longer than {MAX_LINE_BYTES} bytes."),
                    Some(no),
                )));
            }
            Err(ReadError::Storage(StorageError::ConditionNotMet { .. })) => {
                return Ok(Err(BatchError::modified()));
            }
            Err(ReadError::Storage(e)) if e.is_transient() => return Err(e),
            Err(ReadError::Storage(_)) => return Ok(Err(BatchError::no_permissions())),
        }
    }
    Ok(validator
        .finish(info.etag)
        .map(|s| InputSummary { injected, ..s }))
}

/// The service's kind of estimate, not a tokenizer: Azure documents that its token estimate
/// for quotas is "based in part on the character count of the API request" and counts the
/// prompt and `max_tokens` (quota how-to), so a quarter of the characters of every string in
/// the prompt (`messages`, `input`, `instructions`: roles, names and image URLs included, as a
/// character count cannot tell them apart), rounded up. Deliberately not the handler's
/// tokenizer count: a client's estimate and the service's differ, and the tests must see it.
pub fn prompt_tokens(body: &Map<String, Value>) -> u64 {
    let mut chars = 0u64;
    for key in ["messages", "input", "instructions"] {
        if let Some(v) = body.get(key) {
            chars += string_chars(v);
        }
    }
    chars.div_ceil(4).max(1)
}

fn string_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(items) => items.iter().map(string_chars).sum(),
        Value::Object(map) => map.values().map(string_chars).sum(),
        _ => 0,
    }
}

/// What one request counts against the enqueued-token quota: its prompt plus the completion it
/// may ask for.
pub fn estimate_tokens(body: &Map<String, Value>) -> u64 {
    let completion = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64))
        .unwrap_or(DEFAULT_COMPLETION_TOKENS);
    prompt_tokens(body) + completion
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(id: &str, url: &str, model: &str) -> Vec<u8> {
        json!({"custom_id": id, "method": "POST", "url": url,
               "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}})
        .to_string()
        .into_bytes()
    }

    fn run(lines: &[Vec<u8>], deployments: &[String]) -> Result<InputSummary, BatchError> {
        let mut v = Validator::new("/chat/completions", deployments);
        for (i, l) in lines.iter().enumerate() {
            v.line(i as u64 + 1, l)?;
        }
        v.finish("\"etag\"".into())
    }

    #[test]
    fn a_valid_file_is_summarised() {
        let s = run(
            &[
                line("a", "/chat/completions", "d"),
                line("b", "/chat/completions", "d"),
                b"".to_vec(),
            ],
            &[],
        )
        .unwrap();
        assert_eq!((s.requests, s.model.as_str()), (2, "d"));
        assert!(s.tokens > 2 * DEFAULT_COMPLETION_TOKENS);
    }

    #[test]
    fn each_rule_gives_its_code_and_line() {
        type Case = (Vec<Vec<u8>>, &'static str, Option<u64>);
        let cases: Vec<Case> = vec![
            (
                vec![line("a", "/chat/completions", "d"), b"{oops".to_vec()],
                "invalid_json_line",
                Some(2),
            ),
            (vec![], "empty_file", None),
            (vec![b"".to_vec(), b"  ".to_vec()], "empty_file", None),
            (
                vec![
                    line("a", "/chat/completions", "d"),
                    line("b", "/responses", "d"),
                ],
                "url_mismatch",
                Some(2),
            ),
            (
                vec![
                    line("a", "/chat/completions", "d"),
                    line("b", "/chat/completions", "e"),
                ],
                "model_mismatch",
                Some(2),
            ),
            (
                vec![
                    line("a", "/chat/completions", "d"),
                    line("a", "/chat/completions", "d"),
                ],
                "duplicate_custom_id",
                Some(2),
            ),
            (
                vec![
                    line("a", "/chat/completions", "d"),
                    b"".to_vec(),
                    line("b", "/chat/completions", "d"),
                ],
                "invalid_json_line",
                Some(2),
            ),
            (vec![b"[1,2]".to_vec()], "invalid_request", Some(1)),
        ];
        for (lines, code, line_no) in cases {
            let e = run(&lines, &[]).unwrap_err();
            assert_eq!((e.code.as_str(), e.line), (code, line_no), "{e:?}");
        }
    }

    #[test]
    fn unknown_deployment_and_bom_are_model_errors() {
        let e = run(&[line("a", "/chat/completions", "x")], &["d".to_string()]).unwrap_err();
        assert_eq!(e.code, "model_not_found");
        assert!(e.message.contains("'x'") && e.message.contains("'d'"));
        let mut bom = BOM.to_vec();
        bom.extend(line("a", "/chat/completions", "d"));
        let e = run(&[bom], &[]).unwrap_err();
        assert_eq!(e.code, "model_not_found");
        assert!(
            e.message
                .starts_with("A valid model deployment name couldn't be extracted")
        );
    }

    #[test]
    fn v1_urls_match_the_unprefixed_endpoint() {
        assert!(run(&[line("a", "/v1/chat/completions", "d")], &[]).is_ok());
        assert_eq!(endpoint_api("/v1/responses"), Some(Api::Responses));
        assert_eq!(endpoint_api("/embeddings"), None);
    }

    #[test]
    fn too_many_tasks_stops_at_the_limit() {
        let mut v = Validator::new("/chat/completions", &[]);
        for i in 0..MAX_REQUESTS {
            v.line(i + 1, &line(&format!("r{i}"), "/chat/completions", "d"))
                .unwrap();
        }
        let e = v
            .line(MAX_REQUESTS + 1, &line("last", "/chat/completions", "d"))
            .unwrap_err();
        assert_eq!(e.code, "too_many_tasks");
    }

    #[test]
    fn token_estimate_is_a_quarter_of_the_prompt_plus_the_completion_budget() {
        let body = json!({"model": "d", "messages": [{"role": "user", "content": "12345678"}]});
        let body = body.as_object().unwrap();
        // "user" + "12345678" = 12 characters -> 3 tokens.
        assert_eq!(prompt_tokens(body), 3);
        // Characters, not bytes: 8 two-byte letters are 2 tokens, not 4.
        let body = json!({"model": "d", "input": "éééééééé"});
        assert_eq!(prompt_tokens(body.as_object().unwrap()), 2);
        let body = json!({"model": "d", "messages": [{"role": "user", "content": "12345678"}]});
        let body = body.as_object().unwrap();
        assert_eq!(estimate_tokens(body), 3 + DEFAULT_COMPLETION_TOKENS);
        let body = json!({"model": "d", "input": "abcd", "max_output_tokens": 10});
        assert_eq!(estimate_tokens(body.as_object().unwrap()), 11);
    }

    #[tokio::test]
    async fn lines_are_split_across_chunks() {
        let chunks: Vec<Result<Bytes, StorageError>> = vec![
            Ok(Bytes::from_static(b"ab")),
            Ok(Bytes::from_static(b"c\r\nd")),
            Ok(Bytes::from_static(b"\n\nlast")),
        ];
        let mut r = LineReader::new(futures::stream::iter(chunks));
        let mut got = Vec::new();
        while let Some((n, l)) = r.next_line().await.unwrap() {
            got.push((n, String::from_utf8(l).unwrap()));
        }
        assert_eq!(
            got,
            [
                (1, "abc".into()),
                (2, "d".into()),
                (3, "".into()),
                (4, "last".to_string())
            ]
        );
    }
}
