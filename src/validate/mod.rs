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
//! Input files may be 1 GB and more, so the file itself is never held.
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
//! - A line longer than `max_line_bytes` (300 MiB) is `line_too_large` and not parsed, so
//!   memory stays bounded even for a file without newlines. No per-request size is
//!   documented; the largest request the documented limits allow is 10 images of 20 MB each
//!   (the vision input limits), 267 MB once base64-encoded, and it fits.
//!
//! Where things are:
//! - here, the public face: [`Limits`], [`codes`], [`SUPPORTED_URLS`], [`Problem`], [`Report`],
//!   and the entry points [`validate_stream`] (a blob download) and [`validate_reader`] (a file);
//! - `validator`: [`Validator`], the line checker that applies the rules above line by line;
//! - `request`: what one line is parsed into (`custom_id`, `method`, `url`, `body.model`);
//! - `ids`: the `custom_id` uniqueness check, in fixed memory per id;
//! - `tokens`: each request's estimated input tokens (the enqueued-token quota's measure),
//!   by the deployment's model family's tokenizer; the rule is there and in the README;
//! - `pieces`: tiktoken's counts, fast: its pre-tokenizer by hand for ASCII text, and the
//!   counts of words already seen remembered;
//! - `parts`: [`PartSpan`], where a file beyond the limits splits into parts
//!   ([`Validator::splitting`]);
//! - `messages`: the text of each problem, which says what to do;
//! - `print`: [`print_report`], the report as `handler validate` prints it.

use std::io::Read;

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

mod bpe;
mod ids;
mod messages;
mod parts;
mod pieces;
mod print;
mod request;
#[cfg(test)]
mod test_support;
mod tokens;
mod validator;

pub use parts::PartSpan;
pub use print::{model_warning, print_report};
pub use tokens::Encoding;
pub use validator::Validator;

/// The service's limits for one input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per file: Azure's `too_many_tasks` triggers above 100,000.
    pub max_lines: u64,
    /// Bytes per file: 1 GB for an input in your own storage (`input_blob`), as the Global
    /// Batch limits page gives it ("Maximum input file size - Bring your own storage (BYOS)":
    /// 1 GB; 200 MB is the limit for uploaded files, which this handler never uses;
    /// MicrosoftDocs/azure-ai-docs, articles/foundry/openai/includes/global-batch-limits.md).
    /// The page does not say whether a GB is 10^9 or 2^30 bytes; the smaller is used.
    pub max_bytes: u64,
    /// Bytes per line (request): beyond this a line is reported, not parsed, which bounds
    /// the memory one line can take. See the module notes for the figure.
    pub max_line_bytes: u64,
    /// Problems kept in the report; the rest are only counted.
    pub max_problems: usize,
}

impl Limits {
    /// The longest line that is kept and parsed: a line cannot be longer than its file.
    pub(crate) fn line_cap(&self) -> u64 {
        self.max_line_bytes.min(self.max_bytes)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_lines: 100_000,
            max_bytes: 1_000_000_000,
            max_line_bytes: 300 * 1024 * 1024,
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
    /// The requests' estimated input tokens, summed: what the file will count against the
    /// deployment's enqueued-token quota, as `tokens` estimates it (the service's own figure
    /// differs). Of the lines that could be read, when there are problems.
    pub tokens: u64,
    /// The tokenizer the estimate used, chosen by the file's `body.model`.
    pub encoding: Option<Encoding>,
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
/// runs on this thread and checking on another, so the two overlap on two cores; counting
/// the prompts' tokens, which costs more than checking, runs on one thread per core.
pub fn validate_reader<R: Read>(mut r: R, limits: Limits) -> std::io::Result<Report> {
    use std::sync::mpsc;
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(2);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let checker = std::thread::Builder::new().spawn_scoped(s, move || {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let mut v = Validator::new(limits).counting_on_threads(cores);
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

#[cfg(test)]
mod tests {
    use super::test_support::{check, tricky_file};
    use super::*;

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
