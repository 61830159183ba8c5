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
    parts: Vec<PartSpan>,
    current: Option<PartSpan>,
}

impl Splitter {
    /// Takes the request at `line` spanning `[start, end)`; true when it begins a new part.
    pub(super) fn request(&mut self, line: u64, start: u64, end: u64, limits: &Limits) -> bool {
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

    /// Adds the estimated tokens of the request last taken to its part.
    pub(super) fn add_tokens(&mut self, tokens: u64) {
        if let Some(p) = &mut self.current {
            p.tokens += tokens;
        }
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
                bytes: text.len() as u64,
                tokens: r.tokens,
            }]
        );
    }
}
