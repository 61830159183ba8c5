//! Helpers for the validator's tests, shared by the test modules of this folder: request
//! lines and files of them, a tricky file for chunk boundaries, and checks that return the
//! report or its `(line, code)` pairs.

use super::{Limits, Report, Validator, validator::BOM};

pub(super) fn req(id: &str) -> String {
    format!(
        r#"{{"custom_id": "{id}", "method": "POST", "url": "/chat/completions", "body": {{"model": "dep", "messages": [{{"role": "user", "content": "Hi {id}"}}]}}}}"#
    )
}

pub(super) fn file(ids: &[&str]) -> String {
    ids.iter().map(|id| req(id) + "\n").collect()
}

pub(super) fn check(input: impl AsRef<[u8]>) -> Report {
    check_with(input, Limits::default())
}

pub(super) fn check_with(input: impl AsRef<[u8]>, limits: Limits) -> Report {
    let mut v = Validator::new(limits);
    v.feed(input.as_ref());
    v.finish()
}

pub(super) fn codes(r: &Report) -> Vec<(Option<u64>, &str)> {
    r.problems
        .iter()
        .map(|p| (p.line, p.code.as_str()))
        .collect()
}

#[track_caller]
pub(super) fn only(input: impl AsRef<[u8]>, line: Option<u64>, code: &str) -> Report {
    let r = check(input);
    assert_eq!(codes(&r), vec![(line, code)], "{:#?}", r.problems);
    r
}

/// A small file that exercises every path where a chunk boundary could matter: BOM, CRLF,
/// multi-byte UTF-8, invalid UTF-8, blank runs, escapes, an oversized line, no final newline.
pub(super) fn tricky_file() -> Vec<u8> {
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

/// `len` pieces of `alphabet` in a deterministic order from `seed`: the tokenizer tests'
/// generated text (a linear congruential generator, so no dependency and the same text on
/// every machine).
pub(super) fn generated(seed: u64, len: usize, alphabet: &[&str]) -> String {
    let step = |s: u64| {
        s.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
    };
    let mut state = step(seed);
    let mut out = String::new();
    for _ in 0..len {
        state = step(state);
        out.push_str(alphabet[(state >> 33) as usize % alphabet.len()]);
    }
    out
}
