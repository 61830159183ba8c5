//! Splitting a file beyond the service's limits into parts, one batch each: [`Splitter`]
//! draws the boundaries while a `Validator::splitting` streams the file by, and the report
//! lists each part as a [`PartSpan`] (`Report::parts`), to be staged as its own batch.

use serde::{Deserialize, Serialize};

use super::Limits;

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
    /// The part's estimated input tokens (see `tokens`); 0 in records written before.
    #[serde(default)]
    pub tokens: u64,
}

/// Draws part boundaries while the file streams by: a part ends before the request that would
/// take it past `max_lines` requests or `max_bytes` bytes.
#[derive(Debug, Default)]
pub(super) struct Splitter {
    /// Estimated input tokens per part at most (`Validator::splitting_by_tokens`).
    max_tokens: Option<u64>,
    parts: Vec<PartSpan>,
    current: Option<PartSpan>,
    /// The line number and start of the request last taken: where a token cut begins the
    /// next part.
    last: (u64, u64),
}

impl Splitter {
    /// A splitter whose parts also keep within `max_tokens` estimated tokens.
    pub(super) fn by_tokens(max_tokens: u64) -> Self {
        Splitter {
            max_tokens: Some(max_tokens),
            ..Splitter::default()
        }
    }

    /// Takes the request at `line` spanning `[start, end)`; true when it begins a new part.
    pub(super) fn request(&mut self, line: u64, start: u64, end: u64, limits: &Limits) -> bool {
        self.last = (line, start);
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
            tokens: 0,
        });
        begun
    }

    /// Adds the estimated tokens of the request last taken to its part. A request that would
    /// take a part of several requests past `max_tokens` begins the next part instead; true
    /// then (its tokens are known only once the line is parsed, after `request` placed it).
    pub(super) fn add_tokens(&mut self, tokens: u64) -> bool {
        let Some(p) = &mut self.current else {
            return false;
        };
        if p.requests > 1
            && self
                .max_tokens
                .is_some_and(|max| p.tokens.saturating_add(tokens) > max)
        {
            let (line, start) = self.last;
            let end = p.offset + p.bytes;
            p.requests -= 1;
            p.bytes = start - p.offset;
            self.parts.extend(self.current.take());
            self.current = Some(PartSpan {
                first_line: line,
                requests: 1,
                offset: start,
                bytes: end - start,
                tokens,
            });
            return true;
        }
        p.tokens += tokens;
        false
    }

    pub(super) fn finish(mut self) -> Vec<PartSpan> {
        self.parts.extend(self.current.take());
        self.parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::*;
    use crate::validate::{Report, Validator, codes};

    fn split(input: &[u8], limits: Limits, chunk: usize) -> Report {
        split_by(input, limits, None, chunk)
    }

    fn split_by(input: &[u8], limits: Limits, max_tokens: Option<u64>, chunk: usize) -> Report {
        let mut v = match max_tokens {
            Some(t) => Validator::splitting_by_tokens(limits, t),
            None => Validator::splitting(limits),
        };
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
    fn splitting_by_tokens_keeps_each_part_within_the_token_limit() {
        let ids: Vec<String> = (1..=10).map(|i| format!("t{i:02}")).collect();
        let text = file(&ids.iter().map(String::as_str).collect::<Vec<_>>());
        let whole = split(text.as_bytes(), Limits::default(), 1 << 20);
        let per_request = whole.tokens / 10;
        assert_eq!(whole.tokens, per_request * 10, "equal requests");
        // Room for three requests' tokens a part, not four.
        let room = Some(3 * per_request + 1);
        let limits = Limits::default();
        for chunk in [5, 1 << 20] {
            let r = split_by(text.as_bytes(), limits, room, chunk);
            assert!(r.is_ok(), "{:?}", r.problems);
            let shape: Vec<_> = r
                .parts
                .iter()
                .map(|p| (p.first_line, p.requests, p.tokens))
                .collect();
            let t = per_request;
            assert_eq!(
                shape,
                vec![(1, 3, 3 * t), (4, 3, 3 * t), (7, 3, 3 * t), (10, 1, t)]
            );
            // Whole lines, contiguous.
            let mut at = 0;
            for p in &r.parts {
                assert_eq!(p.offset, at);
                at += p.bytes;
            }
            assert_eq!(at as usize, text.len());
        }
        // The same id in two parts is no duplicate: each part is its own batch.
        let r = split_by(
            file(&["t01", "t02", "t03", "t01"]).as_bytes(),
            limits,
            room,
            1 << 20,
        );
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.parts.len(), 2);
        // Without the token cut, the same file repeats an id within one batch.
        let r = split(
            file(&["t01", "t02", "t03", "t01"]).as_bytes(),
            limits,
            1 << 20,
        );
        assert!(!r.is_ok());
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
                bytes: text.len() as u64,
                tokens: r.tokens,
            }]
        );
    }
}
