//! Pre-submit validation of Azure OpenAI Batch input files (`.jsonl`).
//!
//! A file the service would fail anyway (bad JSON, duplicate `custom_id`, mixed models…) is
//! rejected here, within seconds and with line numbers, instead of hours later as a failed
//! batch with one opaque error. The rules follow the service's documented ones
//! (`reference/batch-api-research.md` §1.6–1.7), and problem codes reuse the service's where
//! it has one (`invalid_json_line`, `duplicate_custom_id`, `url_mismatch`, `model_mismatch`,
//! `too_many_tasks`, `empty_file`).
//!
//! Streaming, bounded memory: bytes arrive in chunks of any size and split points
//! ([`Validator::feed`]); only the current line is ever held (and only when it straddles two
//! chunks is it copied), plus one fixed-size entry per `custom_id` for the uniqueness check.
//! Input files may be 200 MB and more, so the file itself is never held.
//!
//! Decisions where the service's behaviour is not documented (the safer side, with a message
//! that says what to do):
//! - CRLF line endings are accepted: JSON parsers, the service's (.NET) included, read a
//!   trailing `\r` as whitespace.
//! - Blank lines are tolerated only at the end of the file; one before or between requests is
//!   `empty_line` (a strict line reader would fail it as `invalid_json_line`).
//! - A key given twice in a line (`custom_id`, `body.model`…) is `invalid_json_line`: which
//!   one the service would use is unknowable.
//! - The file's `url` and `model` are the first valid ones, so one bad first line is reported
//!   once, not as a mismatch on every later line. `/chat/completions` and
//!   `/v1/chat/completions` in one file are a `url_mismatch`: the service compares strings.
//! - A line longer than `max_bytes` is `line_too_large` and not parsed (its file is
//!   `file_too_large` anyway), so memory stays bounded even for a file without newlines.

use std::{
    borrow::Cow,
    collections::HashMap,
    fmt,
    hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState},
    io::Read,
};

use futures::{Stream, StreamExt};
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor},
};

/// The service's limits for one input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per file: Azure's `too_many_tasks` triggers above 100,000.
    pub max_lines: u64,
    /// Bytes per file: 200 MB (Azure's Global Batch limit).
    pub max_bytes: u64,
    /// Problems kept in the report; the rest are only counted.
    pub max_problems: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_lines: 100_000,
            max_bytes: 200 * 1024 * 1024,
            max_problems: 100,
        }
    }
}

/// The problem codes. Where the service has a code for the same fault, it is that code.
pub mod codes {
    pub const BOM: &str = "bom";
    pub const INVALID_UTF8: &str = "invalid_utf8";
    pub const INVALID_JSON_LINE: &str = "invalid_json_line";
    pub const MISSING_CUSTOM_ID: &str = "missing_custom_id";
    pub const INVALID_CUSTOM_ID: &str = "invalid_custom_id";
    pub const DUPLICATE_CUSTOM_ID: &str = "duplicate_custom_id";
    pub const INVALID_METHOD: &str = "invalid_method";
    pub const MISSING_URL: &str = "missing_url";
    pub const UNSUPPORTED_URL: &str = "unsupported_url";
    pub const URL_MISMATCH: &str = "url_mismatch";
    pub const INVALID_BODY: &str = "invalid_body";
    pub const MISSING_MODEL: &str = "missing_model";
    pub const MODEL_MISMATCH: &str = "model_mismatch";
    pub const TOO_MANY_TASKS: &str = "too_many_tasks";
    pub const FILE_TOO_LARGE: &str = "file_too_large";
    pub const LINE_TOO_LARGE: &str = "line_too_large";
    pub const EMPTY_FILE: &str = "empty_file";
    pub const EMPTY_LINE: &str = "empty_line";
}

/// The `url`s Azure OpenAI Batch accepts: chat completions and responses, in both the classic
/// and the `/v1` spelling. Embeddings, completions and the rest are not supported by Azure
/// (even though OpenAI's own batch API takes them).
pub const SUPPORTED_URLS: [&str; 4] = [
    "/chat/completions",
    "/responses",
    "/v1/chat/completions",
    "/v1/responses",
];

/// One reason the service would reject the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// 1-based line number; `None` for problems of the whole file.
    pub line: Option<u64>,
    pub code: String,
    pub message: String,
}

/// What validation found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Request lines (every non-blank line, valid or not).
    pub lines: u64,
    /// Bytes in the file.
    pub bytes: u64,
    /// The file's `url`: the first supported one, which every line must repeat.
    pub url: Option<String>,
    /// The file's `body.model` (the deployment): the first one, which every line must repeat.
    pub model: Option<String>,
    /// The first `max_problems` problems, in file order, except that the limit problems
    /// (`file_too_large`, `too_many_tasks`, `empty_file`) are always kept: they change what
    /// the user must do, so when the list is full they displace its last ordinary problem.
    pub problems: Vec<Problem>,
    /// How many problems there were beyond those listed.
    pub more_problems: u64,
    /// With [`Validator::splitting`]: where the file splits into parts within the limits
    /// (one part when it fits whole). Empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartSpan>,
}

/// One part of a file split to fit the service's limits: a run of whole request lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartSpan {
    /// The file's line number of the part's first request.
    pub first_line: u64,
    pub requests: u64,
    /// Where the part starts in the file, and its length (its last line's newline included,
    /// trailing blank lines not).
    pub offset: u64,
    pub bytes: u64,
}

/// Draws part boundaries while the file streams by: a part ends before the request that would
/// take it past `max_lines` requests or `max_bytes` bytes.
#[derive(Debug, Default)]
struct Splitter {
    parts: Vec<PartSpan>,
    current: Option<PartSpan>,
}

impl Splitter {
    /// Takes the request at `line` spanning `[start, end)`; true when it begins a new part.
    fn request(&mut self, line: u64, start: u64, end: u64, limits: &Limits) -> bool {
        if let Some(p) = &mut self.current
            && p.requests < limits.max_lines
            && end - p.offset <= limits.max_bytes
        {
            p.requests += 1;
            p.bytes = end - p.offset;
            return false;
        }
        let begun = self.current.is_some();
        self.parts.extend(self.current.take());
        self.current = Some(PartSpan {
            first_line: line,
            requests: 1,
            offset: start,
            bytes: end - start,
        });
        begun
    }

    fn finish(mut self) -> Vec<PartSpan> {
        self.parts.extend(self.current.take());
        self.parts
    }
}

impl Report {
    /// Whether the service would accept the file.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty() && self.more_problems == 0
    }

    /// The batch `endpoint` to create the job with. The service fails a batch whose lines'
    /// `url` differs from its `endpoint` (`url_mismatch`), and whether it treats
    /// `/v1/chat/completions` and `/chat/completions` as equal is not documented, so this is
    /// the lines' `url` exactly as written. Meaningful only when [`Report::is_ok`].
    pub fn endpoint(&self) -> Option<&str> {
        self.url.as_deref()
    }
}

/// Prints one line per problem (`line N: code: message`, or `file: code: message`), then a
/// count of those not listed, then a one-line verdict. Write errors (a closed pipe) are
/// ignored: the exit code carries the verdict anyway.
pub fn print_report(report: &Report, out: &mut impl std::io::Write) {
    let _ = write_report(report, out);
}

fn write_report(report: &Report, out: &mut impl std::io::Write) -> std::io::Result<()> {
    for p in &report.problems {
        match p.line {
            Some(n) => writeln!(out, "line {n}: {}: {}", p.code, p.message)?,
            None => writeln!(out, "file: {}: {}", p.code, p.message)?,
        }
    }
    if report.more_problems > 0 {
        writeln!(
            out,
            "... and {} more {}",
            report.more_problems,
            plural(report.more_problems, "problem")
        )?;
    }
    if report.is_ok() {
        writeln!(
            out,
            "OK: {} {}, url {}, model {}",
            report.lines,
            plural(report.lines, "request"),
            report.url.as_deref().unwrap_or("-"),
            report.model.as_deref().unwrap_or("-"),
        )
    } else {
        let total = report.problems.len() as u64 + report.more_problems;
        writeln!(
            out,
            "REJECTED: {total} {} ({} request {}, {} bytes)",
            plural(total, "problem"),
            report.lines,
            plural(report.lines, "line"),
            report.bytes,
        )
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

/// Validates a whole stream of chunks, e.g. a blob download.
///
/// The work is CPU-bound but done chunk by chunk between awaits, so it never holds the
/// executor for longer than one chunk takes (about a millisecond per MB).
pub async fn validate_stream<S, E>(mut stream: S, limits: Limits) -> Result<Report, E>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Unpin,
{
    let mut v = Validator::new(limits);
    while let Some(chunk) = stream.next().await {
        v.feed(&chunk?);
    }
    Ok(v.finish())
}

/// Validates everything `r` yields, e.g. a file.
///
/// Reading (for a file, the kernel's copy into our buffer: a fifth of the time of checking)
/// runs on this thread and checking on another, so the two overlap on two cores.
pub fn validate_reader<R: Read>(mut r: R, limits: Limits) -> std::io::Result<Report> {
    use std::sync::mpsc;
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(2);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let checker = std::thread::Builder::new().spawn_scoped(s, move || {
            let mut v = Validator::new(limits);
            for (buf, n) in full_rx {
                v.feed(&buf[..n]);
                let _ = empty_tx.send(buf);
            }
            v.finish()
        });
        let Ok(checker) = checker else {
            // No thread to be had: do both here.
            let mut v = Validator::new(limits);
            let mut buf = new_buffer();
            loop {
                match read_some(&mut r, &mut buf)? {
                    0 => return Ok(v.finish()),
                    n => v.feed(&buf[..n]),
                }
            }
        };
        let read = (|| loop {
            // Buffers go round: at most the channel's two, one being checked, one being read.
            let mut buf = empty_rx.try_recv().unwrap_or_else(|_| new_buffer());
            let n = read_some(&mut r, &mut buf)?;
            // A send fails only when the checker is gone, i.e. it panicked: `join` says so.
            if n == 0 || full_tx.send((buf, n)).is_err() {
                return Ok(());
            }
        })();
        drop(full_tx);
        let report = checker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        read.map(|()| report)
    })
}

/// 1 MiB: large enough that a `BufReader` of the same capacity reads straight into it, and
/// that per-chunk overhead vanishes.
fn new_buffer() -> Vec<u8> {
    vec![0; 1 << 20]
}

fn read_some(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Incremental validator: [`Validator::feed`] chunks split anywhere (even inside a UTF-8
/// sequence or a `\r\n`), then [`Validator::finish`]. The report does not depend on how the
/// bytes were split.
pub struct Validator {
    limits: Limits,
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    /// The partial line's length so far; exceeds `partial.len()` once the line is over
    /// `max_bytes` and its bytes are no longer kept.
    partial_len: u64,
    /// The partial line is over `max_bytes`: it will be reported, not parsed.
    partial_oversized: bool,
    /// Whether the oversized partial line started with a BOM (only asked for line 1).
    partial_bom: bool,
    /// Lines seen so far (physical lines, blank ones included).
    line_no: u64,
    /// Bytes up to the end of the last line seen.
    consumed: u64,
    bytes: u64,
    requests: u64,
    /// Blank lines since the last request (first, last); reported once another request
    /// follows, tolerated at the end of the file.
    blank_run: Option<(u64, u64)>,
    url: Option<(String, u64)>,
    model: Option<(String, u64)>,
    ids: IdSet,
    problems: Vec<Problem>,
    more_problems: u64,
    too_large_reported: bool,
    /// The file is UTF-16: said once at line 1; checking the rest would only repeat it.
    utf16: bool,
    /// Set by [`Validator::splitting`]: the limits bound each part, not the file.
    splitter: Option<Splitter>,
}

impl Validator {
    pub fn new(limits: Limits) -> Self {
        Validator {
            limits,
            partial: Vec::new(),
            partial_len: 0,
            partial_oversized: false,
            partial_bom: false,
            line_no: 0,
            consumed: 0,
            bytes: 0,
            requests: 0,
            blank_run: None,
            url: None,
            model: None,
            ids: IdSet::new(),
            problems: Vec::new(),
            more_problems: 0,
            too_large_reported: false,
            utf16: false,
            splitter: None,
        }
    }

    /// A validator for a file that may be split into parts: `limits` bound each part, so a
    /// file beyond them is not a problem, and the report says where its parts are
    /// ([`Report::parts`]). `custom_id`s must be unique within each part, as each part is
    /// its own batch; checking across parts would need memory that grows with the file.
    pub fn splitting(limits: Limits) -> Self {
        Validator {
            splitter: Some(Splitter::default()),
            ..Validator::new(limits)
        }
    }

    /// Takes the next bytes of the file.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len() as u64;
        let mut rest = chunk;
        if self.partial_len > 0 {
            match memchr::memchr(b'\n', rest) {
                Some(i) => {
                    self.extend_partial(&rest[..i]);
                    self.end_partial(true);
                    rest = &rest[i + 1..];
                }
                None => {
                    self.extend_partial(rest);
                    return;
                }
            }
        }
        // Lines wholly inside the chunk are checked in place, without a copy.
        let mut start = 0;
        for i in memchr::memchr_iter(b'\n', rest) {
            self.line(Line::Bytes(&rest[start..i]), true);
            start = i + 1;
        }
        self.extend_partial(&rest[start..]);
    }

    /// Ends the file: checks a last line without a newline, and the whole-file rules.
    pub fn finish(mut self) -> Report {
        if self.partial_len > 0 {
            self.end_partial(false);
        }
        // Trailing blank lines (and the trailing newline) are tolerated: `blank_run` is
        // dropped here unreported.
        if self.requests == 0 {
            let message = if self.bytes == 0 {
                "the file is empty; a batch needs at least one request".to_string()
            } else {
                "the file has no requests, only blank lines; a batch needs at least one request"
                    .to_string()
            };
            self.push(None, codes::EMPTY_FILE, || message);
        }
        if self.bytes > self.limits.max_bytes && !self.too_large_reported && self.splitter.is_none()
        {
            self.report_too_large();
        }
        // The limit problems were raised before the totals were known; now they are.
        let (bytes, requests, limits) = (self.bytes, self.requests, self.limits);
        for p in &mut self.problems {
            if p.code == codes::FILE_TOO_LARGE {
                p.message = format!(
                    "the file is {bytes} bytes; Azure OpenAI Batch accepts at most {} bytes ({}) per input file; uploaded to the input container as it is, it is split into parts (one batch each) automatically",
                    limits.max_bytes,
                    human_bytes(limits.max_bytes),
                );
            } else if p.code == codes::TOO_MANY_TASKS {
                p.message = format!(
                    "the file has {requests} requests; Azure OpenAI Batch accepts at most {} per file (this is the first line beyond); uploaded to the input container as it is, it is split into parts (one batch each) automatically",
                    limits.max_lines,
                );
            }
        }
        Report {
            lines: self.requests,
            bytes: self.bytes,
            url: self.url.map(|(u, _)| u),
            model: self.model.map(|(m, _)| m),
            problems: self.problems,
            more_problems: self.more_problems,
            parts: self.splitter.map(Splitter::finish).unwrap_or_default(),
        }
    }

    fn extend_partial(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let new_len = self.partial_len + data.len() as u64;
        if !self.partial_oversized && new_len > self.limits.max_bytes {
            // One line over the file limit cannot be submitted whatever it holds, so stop
            // keeping it: memory stays bounded by `max_bytes` even for a newline-free file.
            let mut head = [0u8; 3];
            let from_partial = self.partial.len().min(3);
            head[..from_partial].copy_from_slice(&self.partial[..from_partial]);
            let from_data = (3 - from_partial).min(data.len());
            head[from_partial..from_partial + from_data].copy_from_slice(&data[..from_data]);
            self.partial_bom = head == BOM;
            self.partial_oversized = true;
            self.partial = Vec::new();
        }
        if !self.partial_oversized {
            self.partial.extend_from_slice(data);
        }
        self.partial_len = new_len;
    }

    fn end_partial(&mut self, terminated: bool) {
        if self.partial_oversized {
            let (len, bom) = (self.partial_len, self.partial_bom);
            self.line(Line::Oversized { len, bom }, terminated);
        } else {
            let buf = std::mem::take(&mut self.partial);
            self.line(Line::Bytes(&buf), terminated);
            self.partial = buf;
            self.partial.clear();
            // A one-off huge line should not pin its buffer for the rest of the file.
            if self.partial.capacity() > 4 << 20 {
                self.partial = Vec::new();
            }
        }
        self.partial_len = 0;
        self.partial_oversized = false;
        self.partial_bom = false;
    }

    fn line(&mut self, line: Line<'_>, terminated: bool) {
        self.line_no += 1;
        let n = self.line_no;
        let len = match line {
            Line::Bytes(b) => b.len() as u64,
            Line::Oversized { len, .. } => len,
        };
        let start = self.consumed;
        self.consumed += len + u64::from(terminated);
        if self.consumed > self.limits.max_bytes
            && !self.too_large_reported
            && self.splitter.is_none()
        {
            self.report_too_large();
        }
        if self.utf16 {
            return;
        }
        let line = match line {
            Line::Bytes(b) if b.len() as u64 > self.limits.max_bytes => Line::Oversized {
                len: b.len() as u64,
                bom: b.starts_with(BOM),
            },
            other => other,
        };

        let mut bytes = match line {
            Line::Bytes(b) => b,
            Line::Oversized { len, bom } => {
                if n == 1 && bom {
                    self.bom_problem();
                }
                self.request_line(n, start);
                let max = self.limits.max_bytes;
                self.push(Some(n), codes::LINE_TOO_LARGE, || {
                    format!("this one line is {len} bytes, more than a whole file may be ({max} bytes); it was not checked further")
                });
                return;
            }
        };
        if n == 1 && bytes.starts_with(BOM) {
            self.bom_problem();
            bytes = &bytes[BOM.len()..];
        }
        if is_blank(bytes) {
            self.blank_run = Some(match self.blank_run {
                Some((first, _)) => (first, n),
                None => (n, n),
            });
            return;
        }
        self.request_line(n, start);
        self.check_request(n, bytes);
    }

    /// Counts a request line (starting at byte `start`), first reporting the blank lines
    /// before it.
    fn request_line(&mut self, n: u64, start: u64) {
        if let Some((first, last)) = self.blank_run.take() {
            // Whether the service skips interior blank lines is not documented; a strict
            // line-by-line JSON reader fails on them (`invalid_json_line`), so reject them
            // here where the message can say exactly what is wrong. Trailing ones are fine.
            let before_first = self.requests == 0;
            self.push(Some(first), codes::EMPTY_LINE, || {
                let which = if first == last {
                    "blank line".to_string()
                } else {
                    format!("blank lines ({first}–{last})")
                };
                let place = if before_first { "before the first request" } else { "between requests" };
                format!("{which} {place}; every line must be one JSON request (only trailing blank lines are tolerated); delete it")
            });
        }
        self.requests += 1;
        if let Some(splitter) = &mut self.splitter {
            if splitter.request(n, start, self.consumed, &self.limits) {
                // Each part is its own batch: ids need only be unique within one.
                self.ids = IdSet::new();
            }
        } else if self.requests == self.limits.max_lines + 1 {
            // The message is completed in `finish`, when the total is known.
            self.push(Some(n), codes::TOO_MANY_TASKS, String::new);
        }
    }

    fn check_request(&mut self, n: u64, bytes: &[u8]) {
        // SIMD UTF-8 validation: prompts in other scripts than Latin defeat the standard
        // library's ASCII fast path, and this check was a third of the validator's time
        // (BENCHMARKS.md). The standard library runs only on failure, for the error's place.
        let checked = simdutf8::basic::from_utf8(bytes).map_err(|_| {
            std::str::from_utf8(bytes).expect_err("simdutf8 and std agree on validity")
        });
        let text = match checked {
            Ok(t) => t,
            Err(e) => {
                self.utf16 =
                    n == 1 && (bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF"));
                self.push(Some(n), codes::INVALID_UTF8, || utf8_message(n, bytes, &e));
                return;
            }
        };
        let trimmed = text.trim_start_matches([' ', '\t', '\r']);
        if !trimmed.starts_with('{') {
            // Checked before parsing: serde would also read a JSON array into `Request`.
            self.push(Some(n), codes::INVALID_JSON_LINE, || {
                not_object_message(text)
            });
            return;
        }
        let req: Request<'_> = match serde_json::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                self.push(Some(n), codes::INVALID_JSON_LINE, || {
                    json_error_message(text, &e)
                });
                return;
            }
        };

        match &req.custom_id {
            Value::Missing => self.push(Some(n), codes::MISSING_CUSTOM_ID, || {
                "no custom_id; every request needs a unique string custom_id to match its result".to_string()
            }),
            Value::Other(kind) => self.push(Some(n), codes::INVALID_CUSTOM_ID, || {
                format!("custom_id must be a string, found {kind}")
            }),
            Value::Str(id) if id.is_empty() => {
                self.push(Some(n), codes::INVALID_CUSTOM_ID, || "custom_id is empty".to_string())
            }
            Value::Str(id) => {
                // Ids beyond `max_lines` requests are still checked but no longer remembered,
                // so the set stays bounded by the limit however long the (rejected) file is.
                let remember =
                    self.splitter.is_some() || self.requests <= self.limits.max_lines;
                if let Some(first) = self.ids.insert(id, n, remember) {
                    self.push(Some(n), codes::DUPLICATE_CUSTOM_ID, || {
                        format!("custom_id {} already used on line {first}; custom_ids must be unique", quote(id))
                    });
                }
            }
        }

        match &req.method {
            Value::Str(m) if m == "POST" => {}
            Value::Str(m) => self.push(Some(n), codes::INVALID_METHOD, || {
                let hint = if m.eq_ignore_ascii_case("POST") {
                    " (it is case-sensitive)"
                } else {
                    ""
                };
                format!(
                    "method is {}; Azure OpenAI Batch only accepts \"POST\"{hint}",
                    quote(m)
                )
            }),
            Value::Missing => self.push(Some(n), codes::INVALID_METHOD, || {
                "no method; it must be \"POST\"".to_string()
            }),
            Value::Other(kind) => self.push(Some(n), codes::INVALID_METHOD, || {
                format!("method must be the string \"POST\", found {kind}")
            }),
        }

        match &req.url {
            Value::Missing => self.push(Some(n), codes::MISSING_URL, || {
                format!("no url; it must be one of {}", supported_list())
            }),
            Value::Str(u) if u.is_empty() => self.push(Some(n), codes::MISSING_URL, || {
                format!("url is empty; it must be one of {}", supported_list())
            }),
            Value::Other(kind) => self.push(Some(n), codes::UNSUPPORTED_URL, || {
                format!(
                    "url must be a string, found {kind}; it must be one of {}",
                    supported_list()
                )
            }),
            Value::Str(u) if !SUPPORTED_URLS.contains(&&**u) => {
                self.push(Some(n), codes::UNSUPPORTED_URL, || {
                    unsupported_url_message(u)
                })
            }
            Value::Str(u) => match &self.url {
                None => self.url = Some((u.to_string(), n)),
                Some((first, at)) if first != u => {
                    let (first, at) = (first.clone(), *at);
                    self.push(Some(n), codes::URL_MISMATCH, || {
                        let same_api = first.trim_start_matches("/v1") == u.trim_start_matches("/v1");
                        let note = if same_api {
                            " (both name the same API, but the service compares the strings)"
                        } else {
                            ""
                        };
                        format!(
                            "url {} differs from {} on line {at}; every line must use the same url{note}",
                            quote(u),
                            quote(&first)
                        )
                    });
                }
                Some(_) => {}
            },
        }

        match &req.body {
            Body::Missing => self.push(Some(n), codes::INVALID_BODY, || {
                "no body; it must be the request object, with model".to_string()
            }),
            Body::Other(kind) => self.push(Some(n), codes::INVALID_BODY, || {
                let hint = if *kind == "string" {
                    " (not a JSON-encoded string)"
                } else {
                    ""
                };
                format!("body must be a JSON object{hint}, found {kind}")
            }),
            Body::Object { model } => match model {
                Value::Missing => self.push(Some(n), codes::MISSING_MODEL, || {
                    "body has no model; set it to the Global-Batch deployment name".to_string()
                }),
                Value::Other(kind) => self.push(Some(n), codes::MISSING_MODEL, || {
                    format!("body.model must be a string (the deployment name), found {kind}")
                }),
                Value::Str(m) if m.trim().is_empty() => {
                    self.push(Some(n), codes::MISSING_MODEL, || {
                        "body.model is empty; set it to the Global-Batch deployment name"
                            .to_string()
                    })
                }
                Value::Str(m) => match &self.model {
                    None => self.model = Some((m.to_string(), n)),
                    Some((first, at)) if first != m => {
                        let (first, at) = (first.clone(), *at);
                        self.push(Some(n), codes::MODEL_MISMATCH, || {
                            format!(
                                "body.model {} differs from {} on line {at}; a batch runs on one deployment, so every line must name the same one",
                                quote(m),
                                quote(&first)
                            )
                        });
                    }
                    Some(_) => {}
                },
            },
        }
    }

    fn bom_problem(&mut self) {
        self.push(Some(1), codes::BOM, || {
            "the file starts with a UTF-8 byte-order mark (BOM); Azure OpenAI Batch fails such files with the misleading message \"A valid model deployment name couldn't be extracted from the input file\"; save it as UTF-8 without BOM".to_string()
        });
    }

    fn report_too_large(&mut self) {
        self.too_large_reported = true;
        // The message is completed in `finish`, when the size is known.
        self.push(None, codes::FILE_TOO_LARGE, String::new);
    }

    /// Records a problem; the message is only built when it will be kept.
    fn push(&mut self, line: Option<u64>, code: &'static str, message: impl FnOnce() -> String) {
        if self.problems.len() < self.limits.max_problems {
            self.problems.push(Problem {
                line,
                code: code.to_string(),
                message: truncate(message()),
            });
            return;
        }
        if is_limit_problem(code)
            && let Some(i) = self
                .problems
                .iter()
                .rposition(|p| !is_limit_problem(&p.code))
        {
            self.problems.remove(i);
            self.problems.push(Problem {
                line,
                code: code.to_string(),
                message: truncate(message()),
            });
        }
        self.more_problems += 1;
    }
}

fn is_limit_problem(code: &str) -> bool {
    matches!(
        code,
        codes::FILE_TOO_LARGE | codes::TOO_MANY_TASKS | codes::EMPTY_FILE
    )
}

enum Line<'a> {
    Bytes(&'a [u8]),
    /// A line longer than `max_bytes`, whose bytes were not kept.
    Oversized {
        len: u64,
        bom: bool,
    },
}

fn is_blank(line: &[u8]) -> bool {
    // `\r` is whitespace so that CRLF files work: the service is .NET and JSON parsers treat a
    // trailing `\r` as whitespace (so does serde_json, below); a blank CRLF line is blank.
    line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r'))
}

/// The `custom_id`s seen so far, as 128-bit keyed hashes with the first line of each.
///
/// Hashes, not strings, so that memory is fixed per id (about 40 bytes with the table's
/// overhead: 4 MB for 100,000 ids) however long the ids are; with strings, a file of long ids
/// would cost about its own size. The price is a false `duplicate_custom_id` when two
/// different ids collide: with 128 bits and 100,000 ids that chance is about 10⁻²⁹, i.e.
/// never. The keys are random per validator (`RandomState`), so nobody can craft ids that
/// collide, or that all land in one bucket.
struct IdSet {
    keys: (RandomState, RandomState),
    first_line: HashMap<u128, u64, BuildHasherDefault<PassThrough>>,
}

impl IdSet {
    fn new() -> Self {
        IdSet {
            keys: (RandomState::new(), RandomState::new()),
            first_line: HashMap::default(),
        }
    }

    /// The line where `id` was first seen, if it was; otherwise remembers it at `line`.
    fn insert(&mut self, id: &str, line: u64, remember: bool) -> Option<u64> {
        let hash = |state: &RandomState| {
            let mut h = state.build_hasher();
            h.write(id.as_bytes());
            h.finish()
        };
        let key = (u128::from(hash(&self.keys.0)) << 64) | u128::from(hash(&self.keys.1));
        if remember {
            match self.first_line.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(line);
                    None
                }
            }
        } else {
            self.first_line.get(&key).copied()
        }
    }
}

/// The keys are already uniform hashes: hashing them again would only cost time.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, i: u128) {
        self.0 = (i as u64) ^ ((i >> 64) as u64);
    }
}

/// One request line, as far as validation cares; every other key is skipped (but still
/// parsed, so invalid JSON anywhere in the line is found). Strings are borrowed from the
/// line unless they contain escapes. A key given twice is an error (serde's "duplicate
/// field"), reported as `invalid_json_line`: which of the two the service would use is
/// unknowable.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(default, borrow)]
    custom_id: Value<'a>,
    #[serde(default, borrow)]
    method: Value<'a>,
    #[serde(default, borrow)]
    url: Value<'a>,
    #[serde(default, borrow)]
    body: Body<'a>,
}

/// A field that should be a string: absent, a string, or something else (named, for the
/// message). Deserializes from any JSON value, so a wrong type is a finding, not a parse error.
#[derive(Default)]
enum Value<'a> {
    #[default]
    Missing,
    Str(Cow<'a, str>),
    Other(&'static str),
}

/// `body`: absent, an object (of which only `model` is kept), or something else.
#[derive(Default)]
enum Body<'a> {
    #[default]
    Missing,
    Object {
        model: Value<'a>,
    },
    Other(&'static str),
}

/// `visit_*` for the JSON kinds that are "something else" to both `Value` and `Body`.
macro_rules! other_kinds {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other("boolean"))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other("number"))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other("number"))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other("number"))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($other("null"))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($other("array"))
        }
    };
}

impl<'de: 'a, 'a> Deserialize<'de> for Value<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Value<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Value<'a>, E> {
                Ok(Value::Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Value<'a>, E> {
                Ok(Value::Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Value<'a>, E> {
                Ok(Value::Str(Cow::Owned(s)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'a>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Value::Other("object"))
            }
            other_kinds!(Value::Other);
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Body<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Body<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Body<'a>, E> {
                Ok(Body::Other("string"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body<'a>, A::Error> {
                let mut model = None;
                while let Some(IsModel(is_model)) = map.next_key()? {
                    if is_model {
                        if model.is_some() {
                            return Err(de::Error::duplicate_field("model"));
                        }
                        model = Some(map.next_value::<Value<'a>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Body::Object {
                    model: model.unwrap_or_default(),
                })
            }
            other_kinds!(Body::Other);
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// A key of `body`: whether it is `model`, without allocating for the others.
struct IsModel(bool);

impl<'de> Deserialize<'de> for IsModel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IsModel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<IsModel, E> {
                Ok(IsModel(s == "model"))
            }
        }
        d.deserialize_str(V)
    }
}

// ---- messages ----

const MAX_MESSAGE: usize = 400;

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE - 1;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// A value quoted for a message, shortened when long, control characters escaped.
fn quote(s: &str) -> String {
    const MAX: usize = 60;
    let shown: String = s.chars().take(MAX).collect();
    let ellipsis = if shown.len() < s.len() { "…" } else { "" };
    format!("\"{}{ellipsis}\"", shown.escape_debug())
}

fn supported_list() -> String {
    SUPPORTED_URLS.join(", ")
}

fn unsupported_url_message(u: &str) -> String {
    let hint = if u.contains("embeddings") {
        " (Azure OpenAI Batch does not support embeddings)"
    } else if u.starts_with("http://") || u.starts_with("https://") {
        " (give the path only, not a full URL)"
    } else if u.contains("completions") && !u.contains("chat") {
        " (the legacy completions API is not supported by Azure OpenAI Batch)"
    } else if u.trim() != u {
        " (it has surrounding whitespace)"
    } else {
        ""
    };
    format!(
        "url {} is not supported{hint}; it must be one of {}",
        quote(u),
        supported_list()
    )
}

fn utf8_message(n: u64, bytes: &[u8], e: &std::str::Utf8Error) -> String {
    let at = e.valid_up_to();
    let byte = bytes[at];
    if n == 1 && (bytes.starts_with(b"\xFF\xFE") || bytes.starts_with(b"\xFE\xFF")) {
        return "the file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8 without BOM".to_string();
    }
    format!(
        "not valid UTF-8: byte 0x{byte:02X} at column {} (was the file saved in another encoding, such as Latin-1 or Windows-1252?); save it as UTF-8",
        at + 1
    )
}

fn not_object_message(text: &str) -> String {
    let trimmed = text.trim_start_matches([' ', '\t', '\r']);
    if trimmed.starts_with('\u{FEFF}') {
        return "the line starts with a byte-order mark (U+FEFF), as when files saved with a BOM are concatenated; remove it".to_string();
    }
    match serde_json::from_str::<IgnoredAny>(text) {
        Ok(_) => {
            let kind = match trimmed.as_bytes().first() {
                Some(b'[') => "an array",
                Some(b'"') => "a string",
                Some(b't' | b'f') => "a boolean",
                Some(b'n') => "null",
                _ => "a number",
            };
            format!("each line must be one JSON object (a request), found {kind}")
        }
        Err(e) => json_error_message(text, &e),
    }
}

/// serde_json's reason and column, without its "line 1" (always 1 here, so misleading), and
/// the text around the column.
fn json_error_message(text: &str, e: &serde_json::Error) -> String {
    let full = e.to_string();
    let reason = match full.rfind(" at line ") {
        Some(i) => &full[..i],
        None => &full,
    };
    let col = e.column();
    // serde_json counts columns in bytes; show up to 24 bytes either side, on char boundaries.
    let at = col.saturating_sub(1).min(text.len());
    let mut from = at.saturating_sub(24);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let mut to = (at + 24).min(text.len());
    while !text.is_char_boundary(to) {
        to += 1;
    }
    let near = text[from..to].trim_end_matches(['\r']);
    let (pre, post) = (
        if from > 0 { "…" } else { "" },
        if to < text.len() { "…" } else { "" },
    );
    format!(
        "not valid JSON: {reason} at column {col}, near {pre}{}{post}",
        quote_raw(near)
    )
}

/// Text as it is in the file, but with control characters (a NUL…) made visible.
fn quote_raw(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('`');
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('`');
    out
}

fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK1: &str = r#"{"custom_id": "task-0", "method": "POST", "url": "/chat/completions", "body": {"model": "dep", "messages": [{"role": "user", "content": "When was Microsoft founded?"}]}}"#;

    fn req(id: &str) -> String {
        format!(
            r#"{{"custom_id": "{id}", "method": "POST", "url": "/chat/completions", "body": {{"model": "dep", "messages": [{{"role": "user", "content": "Hi {id}"}}]}}}}"#
        )
    }

    fn file(ids: &[&str]) -> String {
        ids.iter().map(|id| req(id) + "\n").collect()
    }

    fn check(input: impl AsRef<[u8]>) -> Report {
        check_with(input, Limits::default())
    }

    fn check_with(input: impl AsRef<[u8]>, limits: Limits) -> Report {
        let mut v = Validator::new(limits);
        v.feed(input.as_ref());
        v.finish()
    }

    fn codes(r: &Report) -> Vec<(Option<u64>, &str)> {
        r.problems
            .iter()
            .map(|p| (p.line, p.code.as_str()))
            .collect()
    }

    #[track_caller]
    fn only(input: impl AsRef<[u8]>, line: Option<u64>, code: &str) -> Report {
        let r = check(input);
        assert_eq!(codes(&r), vec![(line, code)], "{:#?}", r.problems);
        r
    }

    fn split(input: &[u8], limits: Limits, chunk: usize) -> Report {
        let mut v = Validator::splitting(limits);
        for c in input.chunks(chunk) {
            v.feed(c);
        }
        v.finish()
    }

    #[test]
    fn splitting_cuts_whole_lines_within_the_limits() {
        let ids: Vec<String> = (1..=25).map(|i| format!("r{i:02}")).collect();
        let text = file(&ids.iter().map(String::as_str).collect::<Vec<_>>()) + "\n\n";
        let limits = Limits {
            max_lines: 10,
            ..Limits::default()
        };
        let r = split(text.as_bytes(), limits, 7);
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.lines, 25);
        let shape: Vec<_> = r.parts.iter().map(|p| (p.first_line, p.requests)).collect();
        assert_eq!(shape, vec![(1, 10), (11, 10), (21, 5)]);
        // Contiguous, each part whole lines, the trailing blank lines left out.
        let mut at = 0;
        for p in &r.parts {
            assert_eq!(p.offset, at);
            let part = &text.as_bytes()[p.offset as usize..(p.offset + p.bytes) as usize];
            assert!(part.ends_with(b"\n"));
            assert_eq!(
                part.iter().filter(|b| **b == b'\n').count() as u64,
                p.requests
            );
            at += p.bytes;
        }
        assert_eq!(at as usize, text.len() - 2);
        assert_eq!(r.parts, split(text.as_bytes(), limits, 1 << 20).parts);
    }

    #[test]
    fn splitting_honours_the_byte_limit_and_ids_per_part() {
        let line_len = req("a1").len() as u64 + 1;
        let limits = Limits {
            max_bytes: 2 * line_len + 1,
            ..Limits::default()
        };
        // a1 twice in one part is a duplicate; in two parts it is not.
        let r = split(file(&["a1", "a2", "a1", "a3"]).as_bytes(), limits, 5);
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.parts.len(), 2);
        assert!(r.parts.iter().all(|p| p.bytes <= limits.max_bytes));
        let r = split(file(&["a1", "a1", "a2"]).as_bytes(), limits, 5);
        assert_eq!(codes(&r), vec![(Some(2), codes::DUPLICATE_CUSTOM_ID)]);
        // The same file without splitting is simply too large.
        assert_eq!(
            codes(&check_with(file(&["a1", "a2", "a3"]), limits)),
            vec![(None, codes::FILE_TOO_LARGE)]
        );
    }

    #[test]
    fn a_file_within_the_limits_is_one_part() {
        let text = file(&["a", "b"]);
        let r = split(text.as_bytes(), Limits::default(), 3);
        assert_eq!(
            r.parts,
            vec![PartSpan {
                first_line: 1,
                requests: 2,
                offset: 0,
                bytes: text.len() as u64
            }]
        );
    }

    #[test]
    fn valid_file() {
        let r = check(file(&["a", "b", "c"]));
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.lines, 3);
        assert_eq!(r.url.as_deref(), Some("/chat/completions"));
        assert_eq!(r.endpoint(), Some("/chat/completions"));
        assert_eq!(r.model.as_deref(), Some("dep"));
        assert_eq!(r.bytes, file(&["a", "b", "c"]).len() as u64);
    }

    #[test]
    fn every_supported_url_is_kept_as_written() {
        for url in SUPPORTED_URLS {
            let line = OK1.replace("/chat/completions", url);
            let r = check(format!("{line}\n"));
            assert!(r.is_ok(), "{url}: {:?}", r.problems);
            assert_eq!(r.endpoint(), Some(url));
        }
    }

    #[test]
    fn bom_is_reported_and_the_rest_still_checked() {
        let r = check(format!("\u{FEFF}{}", file(&["a", "a"])));
        assert_eq!(
            codes(&r),
            vec![(Some(1), "bom"), (Some(2), "duplicate_custom_id")]
        );
        assert!(r.problems[0].message.contains("without BOM"));
        assert!(r.problems[0].message.contains("model deployment name"));
    }

    #[test]
    fn bom_on_a_later_line_is_invalid_json() {
        let r = only(
            format!("{}\n\u{FEFF}{}\n", req("a"), req("b")),
            Some(2),
            "invalid_json_line",
        );
        assert!(r.problems[0].message.contains("byte-order mark"));
    }

    #[test]
    fn invalid_utf8() {
        let mut bytes = format!("{}\n", req("a")).into_bytes();
        bytes.extend_from_slice(b"{\"custom_id\": \"caf\xE9\"}\n");
        let r = only(bytes, Some(2), "invalid_utf8");
        assert!(
            r.problems[0].message.contains("0xE9"),
            "{}",
            r.problems[0].message
        );
        assert!(
            r.problems[0].message.contains("column 19"),
            "{}",
            r.problems[0].message
        );
    }

    #[test]
    fn utf16_gets_its_own_message() {
        let utf16: Vec<u8> = format!("{}\n{}\n", req("a"), req("b"))
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let r = only([&b"\xFF\xFE"[..], &utf16].concat(), Some(1), "invalid_utf8");
        assert!(r.problems[0].message.contains("UTF-16"));
    }

    #[test]
    fn invalid_json_lines() {
        for bad in [
            "not json",
            "{\"custom_id\": \"a\",}",
            "{'custom_id': 'a'}",
            "{\"custom_id\": \"a\"} {}",
            "{\"custom_id\": \"a\", \"body\": {\"model\": \"dep\", \"messages\": [tru]}}",
            "{\"custom_id\": \"a\", \"body\": {\"model\": \"dep\", \"x\": \"\\q\"}}",
            "{\"custom_id\": \"a\0\"}",
            "{\"custom_id\": \"a\"\0}",
            "{\"custom_id\": \"a\", \"custom_id\": \"b\"}",
            "{\"body\": {\"model\": \"a\", \"model\": \"b\"}}",
            "[1, 2]",
            "\"just a string\"",
            "42",
            "null",
            "{",
        ] {
            let r = check(format!("{}\n{bad}\n{}\n", req("x"), req("y")));
            assert_eq!(
                codes(&r),
                vec![(Some(2), "invalid_json_line")],
                "{bad:?}: {:?}",
                r.problems
            );
        }
    }

    #[test]
    fn json_error_message_has_reason_and_column_but_not_line_1() {
        let r = only("{\"custom_id\": \"a\",}\n", Some(1), "invalid_json_line");
        let m = &r.problems[0].message;
        assert!(m.contains("trailing comma"), "{m}");
        assert!(m.contains("column 19"), "{m}");
        assert!(!m.contains("line 1"), "{m}");
        let r = only("[1, 2]\n", Some(1), "invalid_json_line");
        assert!(
            r.problems[0].message.contains("found an array"),
            "{}",
            r.problems[0].message
        );
    }

    #[test]
    fn long_json_error_message_is_truncated() {
        let line = format!("{{\"custom_id\": \"{}\", oops}}\n", "x".repeat(5000));
        let r = only(line, Some(1), "invalid_json_line");
        assert!(r.problems[0].message.len() <= MAX_MESSAGE + 3);
    }

    #[test]
    fn truncated_last_line() {
        let f = format!("{}{}", file(&["a"]), &req("b")[..40]);
        only(f, Some(2), "invalid_json_line");
    }

    #[test]
    fn last_line_without_newline_is_fine() {
        let r = check(format!("{}\n{}", req("a"), req("b")));
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.lines, 2);
    }

    #[test]
    fn crlf_is_accepted() {
        let f = format!("{}\r\n{}\r\n\r\n", req("a"), req("b"));
        let r = check(f);
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.lines, 2);
    }

    #[test]
    fn custom_id_rules() {
        only(
            OK1.replace(r#""custom_id": "task-0", "#, ""),
            Some(1),
            "missing_custom_id",
        );
        for bad in ["7", "null", "true", "\"\"", "{\"a\": 1}", "[\"a\"]"] {
            let line = OK1.replace(r#""task-0""#, bad);
            only(line, Some(1), "invalid_custom_id");
        }
        only(file(&["a", "a"]), Some(2), "duplicate_custom_id");
        let r = check(file(&["a", "b", "a", "c", "b"]));
        assert_eq!(
            codes(&r),
            vec![
                (Some(3), "duplicate_custom_id"),
                (Some(5), "duplicate_custom_id")
            ]
        );
        assert!(
            r.problems[0].message.contains("line 1"),
            "{}",
            r.problems[0].message
        );
        assert!(
            r.problems[1].message.contains("line 2"),
            "{}",
            r.problems[1].message
        );
    }

    #[test]
    fn duplicate_custom_id_is_compared_after_unescaping() {
        let f = format!("{}\n{}\n", req("task-1"), req("task\\u002d1"));
        only(f, Some(2), "duplicate_custom_id");
    }

    #[test]
    fn method_rules() {
        only(
            OK1.replace("\"POST\"", "\"GET\""),
            Some(1),
            "invalid_method",
        );
        let r = only(
            OK1.replace("\"POST\"", "\"post\""),
            Some(1),
            "invalid_method",
        );
        assert!(r.problems[0].message.contains("case-sensitive"));
        only(
            OK1.replace(r#""method": "POST", "#, ""),
            Some(1),
            "invalid_method",
        );
        only(OK1.replace("\"POST\"", "1"), Some(1), "invalid_method");
    }

    #[test]
    fn url_rules() {
        only(
            OK1.replace(r#""url": "/chat/completions", "#, ""),
            Some(1),
            "missing_url",
        );
        only(
            OK1.replace("\"/chat/completions\"", "\"\""),
            Some(1),
            "missing_url",
        );
        for bad in [
            "/embeddings",
            "/v1/embeddings",
            "/completions",
            "https://x.openai.azure.com/openai/deployments/d/chat/completions",
            "chat/completions",
            "/chat/completions ",
            "/CHAT/COMPLETIONS",
        ] {
            only(
                OK1.replace("/chat/completions", bad),
                Some(1),
                "unsupported_url",
            );
        }
        only(
            OK1.replace("\"/chat/completions\"", "null"),
            Some(1),
            "unsupported_url",
        );
        let r = only(
            OK1.replace("/chat/completions", "/embeddings"),
            Some(1),
            "unsupported_url",
        );
        assert!(r.problems[0].message.contains("embeddings"));
    }

    #[test]
    fn url_mismatch_names_both_and_the_first_line() {
        let f = format!(
            "{}\n{}\n{}\n",
            req("a"),
            req("b"),
            req("c").replace("/chat/completions", "/v1/chat/completions")
        );
        let r = only(f, Some(3), "url_mismatch");
        let m = &r.problems[0].message;
        assert!(
            m.contains("\"/v1/chat/completions\"") && m.contains("\"/chat/completions\""),
            "{m}"
        );
        assert!(m.contains("line 1") && m.contains("same API"), "{m}");
        assert_eq!(r.url.as_deref(), Some("/chat/completions"));
    }

    #[test]
    fn the_file_url_is_the_first_supported_one() {
        // A bad first line is reported once, not blamed on every good line after it.
        let f = format!(
            "{}\n{}\n{}\n",
            req("a").replace("/chat/completions", "/embeddings"),
            req("b"),
            req("c")
        );
        let r = only(f, Some(1), "unsupported_url");
        assert_eq!(r.url.as_deref(), Some("/chat/completions"));
    }

    #[test]
    fn body_rules() {
        let no_body = r#"{"custom_id": "a", "method": "POST", "url": "/chat/completions"}"#;
        only(no_body, Some(1), "invalid_body");
        for bad in ["\"{\\\"model\\\": \\\"dep\\\"}\"", "[]", "null", "3"] {
            let line = format!(
                r#"{{"custom_id": "a", "method": "POST", "url": "/chat/completions", "body": {bad}}}"#
            );
            only(line, Some(1), "invalid_body");
        }
        let r = only(
            r#"{"custom_id": "a", "method": "POST", "url": "/chat/completions", "body": "x"}"#,
            Some(1),
            "invalid_body",
        );
        assert!(r.problems[0].message.contains("JSON-encoded string"));
    }

    #[test]
    fn model_rules() {
        only(
            OK1.replace(r#""model": "dep", "#, ""),
            Some(1),
            "missing_model",
        );
        for bad in ["\"\"", "\"  \"", "null", "1", "{}", "[\"dep\"]"] {
            only(OK1.replace("\"dep\"", bad), Some(1), "missing_model");
        }
        // A nested "model" is not body.model.
        only(
            r#"{"custom_id": "a", "method": "POST", "url": "/chat/completions", "body": {"x": {"model": "dep"}}}"#,
            Some(1),
            "missing_model",
        );
        let f = format!(
            "{}\n{}\n{}\n",
            req("a"),
            req("b").replace("\"dep\"", "\"other\""),
            req("c")
        );
        let r = only(f, Some(2), "model_mismatch");
        let m = &r.problems[0].message;
        assert!(
            m.contains("\"other\"") && m.contains("\"dep\"") && m.contains("line 1"),
            "{m}"
        );
        assert_eq!(r.model.as_deref(), Some("dep"));
    }

    #[test]
    fn one_line_can_have_several_problems() {
        let line = r#"{"method": "GET", "url": "/embeddings", "body": {}}"#;
        let r = check(line);
        assert_eq!(
            codes(&r),
            vec![
                (Some(1), "missing_custom_id"),
                (Some(1), "invalid_method"),
                (Some(1), "unsupported_url"),
                (Some(1), "missing_model"),
            ]
        );
    }

    #[test]
    fn unknown_keys_are_ignored_but_still_parsed() {
        let line = OK1.replace(
            r#""body""#,
            r#""extra": {"deep": [1, 2.5e3, null, {"model": 7}]}, "body""#,
        );
        assert!(check(&line).is_ok());
        let line = OK1.replace(r#""body""#, r#""extra": {"deep": [1, 2.5e3, nul]}, "body""#);
        only(line, Some(1), "invalid_json_line");
    }

    #[test]
    fn empty_file() {
        for input in ["", "\n", "   \n\t\n", "\r\n\r\n", "  "] {
            let r = only(input, None, "empty_file");
            assert_eq!(r.lines, 0);
        }
        let r = check("\u{FEFF}");
        assert_eq!(codes(&r), vec![(Some(1), "bom"), (None, "empty_file")]);
    }

    #[test]
    fn blank_lines() {
        // Trailing ones are tolerated.
        assert!(check(format!("{}\n\n  \n\r\n", file(&["a"]))).is_ok());
        // Interior ones are not; one problem per run.
        let r = only(
            format!("{}\n\n \n{}", req("a"), file(&["b"])),
            Some(2),
            "empty_line",
        );
        assert!(
            r.problems[0].message.contains("2–3"),
            "{}",
            r.problems[0].message
        );
        let r = check(format!("{}\n\n{}\n\n{}\n", req("a"), req("b"), req("c")));
        assert_eq!(
            codes(&r),
            vec![(Some(2), "empty_line"), (Some(4), "empty_line")]
        );
        // Leading ones are not either.
        let r = only(format!("\n{}", file(&["a"])), Some(1), "empty_line");
        assert!(r.problems[0].message.contains("before the first request"));
        // CRLF blank line in the middle.
        only(
            format!("{}\r\n\r\n{}\r\n", req("a"), req("b")),
            Some(2),
            "empty_line",
        );
    }

    #[test]
    fn too_many_tasks_is_reported_once_at_the_first_line_beyond() {
        let limits = Limits {
            max_lines: 3,
            ..Limits::default()
        };
        let r = check_with(file(&["a", "b", "c", "d", "e"]), limits);
        assert_eq!(codes(&r), vec![(Some(4), "too_many_tasks")]);
        assert_eq!(r.lines, 5);
        assert!(
            r.problems[0].message.contains("has 5 requests"),
            "{}",
            r.problems[0].message
        );
        // Blank lines do not count, but keep the line numbers.
        let r = check_with(
            format!("{}\n\n{}", req("a"), file(&["b", "c", "d"])),
            limits,
        );
        assert_eq!(
            codes(&r),
            vec![(Some(2), "empty_line"), (Some(5), "too_many_tasks")]
        );
    }

    #[test]
    fn ids_beyond_the_limit_are_checked_but_not_remembered() {
        let limits = Limits {
            max_lines: 2,
            ..Limits::default()
        };
        let r = check_with(file(&["a", "b", "c", "a", "c"]), limits);
        assert_eq!(
            codes(&r),
            vec![
                (Some(3), "too_many_tasks"),
                (Some(4), "duplicate_custom_id")
            ]
        );
    }

    #[test]
    fn file_too_large_is_reported_once_with_the_size() {
        let f = file(&["a", "b", "c"]);
        let one = req("a").len() as u64 + 1;
        let limits = Limits {
            max_bytes: one * 2,
            ..Limits::default()
        };
        let r = check_with(&f, limits);
        assert_eq!(codes(&r), vec![(None, "file_too_large")]);
        let m = &r.problems[0].message;
        assert!(
            m.contains(&format!("{} bytes", f.len())) && m.contains(&(one * 2).to_string()),
            "{m}"
        );
        // Exactly at the limit is fine.
        assert!(
            check_with(
                &f,
                Limits {
                    max_bytes: f.len() as u64,
                    ..Limits::default()
                }
            )
            .is_ok()
        );
        // One byte over, even if it is the trailing newline.
        let r = check_with(
            &f,
            Limits {
                max_bytes: f.len() as u64 - 1,
                ..Limits::default()
            },
        );
        assert_eq!(codes(&r), vec![(None, "file_too_large")]);
    }

    #[test]
    fn a_line_longer_than_the_file_limit_is_not_kept() {
        let limits = Limits {
            max_bytes: 200,
            ..Limits::default()
        };
        let big = req(&"x".repeat(300));
        let f = format!("{}\n{big}\n", req("a"));
        let r = check_with(&f, limits);
        assert_eq!(
            codes(&r),
            vec![(None, "file_too_large"), (Some(2), "line_too_large")]
        );
        assert_eq!(r.lines, 2);
        // Fed in small chunks, the line is never held whole.
        let mut v = Validator::new(limits);
        for c in f.as_bytes().chunks(7) {
            v.feed(c);
            assert!(v.partial.len() <= 200);
        }
        assert_eq!(v.finish(), r);
    }

    #[test]
    fn a_long_line_within_the_limit_is_checked() {
        let content = "y".repeat(3 << 20);
        let f = format!("{}\n{}\n", req("a"), req(&content));
        let mut v = Validator::new(Limits::default());
        for c in f.as_bytes().chunks(64 << 10) {
            v.feed(c);
        }
        let r = v.finish();
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.lines, 2);
    }

    #[test]
    fn problems_are_capped_and_counted() {
        let limits = Limits {
            max_problems: 3,
            ..Limits::default()
        };
        let r = check_with(file(&["a", "a", "a", "a", "a", "a"]), limits);
        assert_eq!(r.problems.len(), 3);
        assert_eq!(r.more_problems, 2);
        assert_eq!(r.problems[2].line, Some(4));
        assert!(!r.is_ok());
    }

    #[test]
    fn limit_problems_displace_ordinary_ones_when_the_list_is_full() {
        let limits = Limits {
            max_problems: 2,
            max_lines: 4,
            max_bytes: 1 << 20,
        };
        let r = check_with(file(&["a", "a", "a", "a", "a", "a"]), limits);
        assert_eq!(
            codes(&r),
            vec![
                (Some(2), "duplicate_custom_id"),
                (Some(5), "too_many_tasks")
            ]
        );
        assert_eq!(r.more_problems, 4);
        assert_eq!(r.problems.len() as u64 + r.more_problems, 6);
    }

    #[test]
    fn print_report_formats() {
        let mut out = Vec::new();
        print_report(&check(file(&["a", "b", "c"])), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "OK: 3 requests, url /chat/completions, model dep\n"
        );

        let limits = Limits {
            max_problems: 1,
            ..Limits::default()
        };
        let mut out = Vec::new();
        print_report(&check_with(file(&["a", "a", "a"]), limits), &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("line 2: duplicate_custom_id: "),
            "{text}"
        );
        assert_eq!(lines[1], "... and 1 more problem");
        assert!(lines[2].starts_with("REJECTED: 2 problems"), "{text}");

        let mut out = Vec::new();
        print_report(&check(""), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("file: empty_file: "), "{text}");
        assert!(text.contains("REJECTED: 1 problem "), "{text}");
    }

    #[test]
    fn report_serializes() {
        let r = check("{}\n");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["lines"], 1);
        assert_eq!(v["problems"][0]["line"], 1);
        assert_eq!(v["problems"][0]["code"], "missing_custom_id");
        let p: Problem = serde_json::from_value(v["problems"][0].clone()).unwrap();
        assert_eq!(p, r.problems[0]);
    }

    /// A small file that exercises every path where a chunk boundary could matter: BOM, CRLF,
    /// multi-byte UTF-8, invalid UTF-8, blank runs, escapes, an oversized line, no final newline.
    fn tricky_file() -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(BOM);
        f.extend_from_slice(req("a").as_bytes());
        f.extend_from_slice(b"\r\n");
        f.extend_from_slice(req("é€😀").as_bytes());
        f.extend_from_slice(b"\n\n \r\n");
        f.extend_from_slice(req("a").replace("dep", "other").as_bytes());
        f.extend_from_slice(b"\n{\"custom_id\": \"caf\xE9\"}\n");
        f.extend_from_slice(req(&"z".repeat(300)).as_bytes());
        f.extend_from_slice(b"\n");
        f.extend_from_slice(req("\\u00e9\\u20ac\\ud83d\\ude00").as_bytes());
        f.extend_from_slice(b"\n\n");
        f.extend_from_slice(&req("last").as_bytes()[..50]);
        f
    }

    #[test]
    fn tricky_file_report() {
        let limits = Limits {
            max_bytes: 300,
            ..Limits::default()
        };
        let r = check_with(tricky_file(), limits);
        assert_eq!(
            codes(&r),
            vec![
                (Some(1), "bom"),
                // Raised where the running size first passes the limit (line 2).
                (None, "file_too_large"),
                (Some(3), "empty_line"),
                (Some(5), "duplicate_custom_id"),
                (Some(5), "model_mismatch"),
                (Some(6), "invalid_utf8"),
                (Some(7), "line_too_large"),
                (Some(8), "duplicate_custom_id"),
                (Some(9), "empty_line"),
                (Some(10), "invalid_json_line"),
            ]
        );
    }

    #[test]
    fn chunk_boundaries_do_not_matter() {
        let f = tricky_file();
        for limits in [
            Limits::default(),
            Limits {
                max_bytes: 300,
                max_problems: 4,
                max_lines: 5,
            },
        ] {
            let whole = check_with(&f, limits);
            for split in 0..=f.len() {
                let mut v = Validator::new(limits);
                v.feed(&f[..split]);
                v.feed(&f[split..]);
                assert_eq!(v.finish(), whole, "split at {split}");
            }
            for size in [1, 2, 3, 5, 64] {
                let mut v = Validator::new(limits);
                for c in f.chunks(size) {
                    v.feed(c);
                }
                v.feed(&[]);
                assert_eq!(v.finish(), whole, "chunks of {size}");
            }
        }
    }

    #[test]
    fn reader_and_stream_agree_with_feed() {
        let f = tricky_file();
        let whole = check(&f);
        assert_eq!(validate_reader(&f[..], Limits::default()).unwrap(), whole);
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = f
            .chunks(13)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let r = futures::executor::block_on(validate_stream(
            futures::stream::iter(chunks),
            Limits::default(),
        ));
        assert_eq!(r.unwrap(), whole);
    }

    #[test]
    fn stream_errors_are_passed_through() {
        let chunks: Vec<Result<bytes::Bytes, &str>> =
            vec![Ok(bytes::Bytes::from_static(b"{}\n")), Err("boom")];
        let r = futures::executor::block_on(validate_stream(
            futures::stream::iter(chunks),
            Limits::default(),
        ));
        assert_eq!(r.unwrap_err(), "boom");
    }

    /// Throughput on 100,000 realistic requests, against a bare newline count over the same
    /// bytes: `cargo test --release --lib validate::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark; run in release"]
    fn throughput() {
        let mut f = Vec::new();
        for i in 0..100_000 {
            let content = format!(
                "Summarise ticket #{i}: the customer says \\\"the app crashes\\\" when saving — café, naïve, 日本語. {}",
                "Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(i % 20)
            );
            let line = format!(
                r#"{{"custom_id": "task-{i}", "method": "POST", "url": "/chat/completions", "body": {{"model": "gpt-4o-batch", "messages": [{{"role": "system", "content": "You are a helpful assistant."}}, {{"role": "user", "content": "{content}"}}], "max_tokens": 1000, "temperature": 0.2}}}}"#
            );
            f.extend_from_slice(line.as_bytes());
            f.push(b'\n');
        }
        let mb = f.len() as f64 / 1e6;
        let time = |label: &str, run: &mut dyn FnMut()| {
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                run();
                best = best.min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "{label}: {:.1} MB in {:.1} ms = {:.0} MB/s",
                mb,
                best * 1e3,
                mb / best
            );
            best
        };
        let mut count = 0;
        let newlines = time("memchr newline count", &mut || {
            count = f
                .chunks(1 << 20)
                .map(|c| memchr::memchr_iter(b'\n', c).count())
                .sum::<usize>();
        });
        assert_eq!(count, 100_000);
        let mut report = None;
        let validate = time("validate", &mut || {
            let mut v = Validator::new(Limits::default());
            for c in f.chunks(1 << 20) {
                v.feed(c);
            }
            report = Some(v.finish());
        });
        let report = report.unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
        eprintln!("validate / newline count = {:.2}", newlines / validate);
    }

    #[test]
    fn corpus_matches_the_manifest() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inputs");
        let manifest = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
        let mut seen = 0;
        for row in manifest
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let cols: Vec<&str> = row.split('\t').collect();
            assert_eq!(cols.len(), 3, "bad manifest row {row:?}");
            let r = validate_reader(
                std::fs::File::open(dir.join(cols[0])).unwrap(),
                Limits::default(),
            )
            .unwrap();
            if cols[2] == "OK" {
                assert!(r.is_ok(), "{}: {:#?}", cols[0], r.problems);
            } else {
                let first = r
                    .problems
                    .first()
                    .unwrap_or_else(|| panic!("{}: no problem", cols[0]));
                let line = if cols[1] == "file" {
                    None
                } else {
                    Some(cols[1].parse().unwrap())
                };
                assert_eq!(
                    (first.line, first.code.as_str()),
                    (line, cols[2]),
                    "{}: {:#?}",
                    cols[0],
                    r.problems
                );
            }
            seen += 1;
        }
        assert!(seen >= 45, "only {seen} corpus files");
    }
}
