//! The line checker: [`Validator`] takes the file's bytes in chunks split anywhere, cuts
//! them into lines (copying only a line that straddles two chunks, and not keeping one longer
//! than the line cap), checks each request line (UTF-8, one JSON object, `custom_id`, `method`,
//! `url`, `body.model`), then the whole file at [`Validator::finish`]: its size, its count
//! of requests, that it has any. The rules, and why, are in the module overview (`mod.rs`).
//! At most `max_problems` problems are kept; a limit problem displaces an ordinary one.

use super::{
    Limits, Problem, Report, SUPPORTED_URLS, codes,
    ids::IdSet,
    messages::{
        human_bytes, json_error_message, not_object_message, quote, supported_list, truncate,
        unsupported_url_message, utf8_message,
    },
    parts::Splitter,
    request::{Body, Request, Value},
    tokens::{Background, Counters, Encoding},
};

pub(super) const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Incremental validator: [`Validator::feed`] chunks split anywhere (even inside a UTF-8
/// sequence or a `\r\n`), then [`Validator::finish`]. The report does not depend on how the
/// bytes were split.
pub struct Validator {
    limits: Limits,
    /// The start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    /// The partial line's length so far; exceeds `partial.len()` once the line is over
    /// the line cap and its bytes are no longer kept.
    partial_len: u64,
    /// The partial line is over the line cap: it will be reported, not parsed.
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
    /// The requests' estimated input tokens so far.
    tokens: u64,
    /// The tokenizer of the last `body.model` seen, and that name: a file names one
    /// deployment, so the lookup is made once, not per line.
    encoding: Option<(String, Encoding)>,
    counters: Counters,
    /// Counting threads (`counting_on_threads`): the texts are counted there, not in line.
    background: Option<Background>,
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
            tokens: 0,
            encoding: None,
            counters: Counters::default(),
            background: None,
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

    /// `splitting`, with parts also kept within `max_tokens` estimated input tokens: for a
    /// file that no single enqueued-token quota could hold (issue 15, item 5).
    pub fn splitting_by_tokens(limits: Limits, max_tokens: u64) -> Self {
        Validator {
            splitter: Some(Splitter::by_tokens(max_tokens)),
            ..Validator::new(limits)
        }
    }

    /// Counts the prompts' tokens on up to `threads` threads of their own while this one
    /// parses (when they can be started; in line otherwise). Only for a validator that does
    /// not split: a splitting one needs each request's tokens before the next line, to place
    /// it in a part. The report is the same either way.
    pub fn counting_on_threads(mut self, threads: usize) -> Self {
        if self.splitter.is_none() && threads > 0 {
            self.background = Background::start(threads);
        }
        self
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
        if let Some(background) = self.background.take() {
            self.tokens += background.finish();
        }
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
            tokens: self.tokens,
            encoding: self.encoding.map(|(_, e)| e),
        }
    }

    fn extend_partial(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let new_len = self.partial_len + data.len() as u64;
        if !self.partial_oversized && new_len > self.limits.line_cap() {
            // A line over the cap is reported whatever it holds, so stop keeping it: memory
            // stays bounded by the cap even for a newline-free file.
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
            Line::Bytes(b) if b.len() as u64 > self.limits.line_cap() => Line::Oversized {
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
                let limits = self.limits;
                self.push(Some(n), codes::LINE_TOO_LARGE, || {
                    if len > limits.max_bytes {
                        format!("this one line is {len} bytes, more than a whole file may be ({} bytes); it was not checked further", limits.max_bytes)
                    } else {
                        format!("this one line is {len} bytes, more than one request may be here ({} bytes: room for the 10 images of 20 MB a request may carry); it was not checked further", limits.max_line_bytes)
                    }
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

        // Counted before the id is checked: a part cut by tokens begins at this request, and
        // its ids are checked within the new part.
        if let Body::Object { model, prompt } = &req.body
            && self.count_tokens(model, prompt)
        {
            self.ids = IdSet::new();
        }

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
            Body::Object { model, .. } => self.check_model(n, model),
        }
    }

    /// Adds the request's estimated tokens, with the tokenizer of its `body.model` (or, when
    /// it has none, of the last one seen).
    /// True when the request begins a new part, cut by tokens.
    fn count_tokens(&mut self, model: &Value<'_>, prompt: &super::tokens::Prompt<'_>) -> bool {
        let encoding = match (model, &self.encoding) {
            (Value::Str(m), Some((name, e))) if name == m => *e,
            (Value::Str(m), _) => {
                let e = Encoding::for_deployment(m);
                self.encoding = Some((m.to_string(), e));
                e
            }
            (_, Some((_, e))) => *e,
            (_, None) => Encoding::for_deployment(""),
        };
        if let Some(background) = &mut self.background {
            // No splitter (see `counting_on_threads`): the total is all that is needed, at
            // `finish`.
            self.tokens += background.add(encoding, prompt);
            return false;
        }
        let tokens = prompt.tokens(encoding, &mut self.counters);
        self.tokens += tokens;
        match &mut self.splitter {
            Some(splitter) => splitter.add_tokens(tokens),
            None => false,
        }
    }

    fn check_model(&mut self, n: u64, model: &Value<'_>) {
        match model {
            Value::Missing => self.push(Some(n), codes::MISSING_MODEL, || {
                "body has no model; set it to the Global-Batch deployment name".to_string()
            }),
            Value::Other(kind) => self.push(Some(n), codes::MISSING_MODEL, || {
                format!("body.model must be a string (the deployment name), found {kind}")
            }),
            Value::Str(m) if m.trim().is_empty() => {
                self.push(Some(n), codes::MISSING_MODEL, || {
                    "body.model is empty; set it to the Global-Batch deployment name".to_string()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::*;

    const OK1: &str = r#"{"custom_id": "task-0", "method": "POST", "url": "/chat/completions", "body": {"model": "dep", "messages": [{"role": "user", "content": "When was Microsoft founded?"}]}}"#;

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
    fn a_line_over_the_line_cap_is_not_kept_though_the_file_fits() {
        // A 1 GB file may hold one huge line; memory is bounded by the line cap, not the file.
        let limits = Limits {
            max_line_bytes: 200,
            ..Limits::default()
        };
        let big = req(&"x".repeat(300));
        let f = format!("{}\n{big}\n{}\n", req("a"), req("c"));
        let r = check_with(&f, limits);
        assert_eq!(codes(&r), vec![(Some(2), "line_too_large")]);
        assert!(
            r.problems[0]
                .message
                .contains("more than one request may be"),
            "{}",
            r.problems[0].message
        );
        assert_eq!(r.lines, 3);
        let mut v = Validator::new(limits);
        for c in f.as_bytes().chunks(7) {
            v.feed(c);
            assert!(v.partial.len() <= 200);
        }
        assert_eq!(v.finish(), r);
    }

    #[test]
    fn the_default_file_limit_is_the_documented_one_for_your_own_storage() {
        // 1 GB for `input_blob` inputs (Global Batch limits, "Bring your own storage").
        let l = Limits::default();
        assert_eq!((l.max_lines, l.max_bytes), (100_000, 1_000_000_000));
        assert!(l.max_line_bytes >= 10 * 20_000_000 * 4 / 3);
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
            ..Limits::default()
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
                max_line_bytes: 120,
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
}
