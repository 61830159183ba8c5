//! tiktoken's count of a text's tokens, from a compact table: what `tiktoken-rs`'s
//! `CoreBPE::encode_ordinary(text).len()` gives, without its memory. A `CoreBPE` keeps every
//! token's bytes three times on the heap (encoder and decoder maps, a sorted list) and 128
//! copies of its regexes: about 45 MB for `o200k_base`, which put `handler validate` over its
//! 64 MB goal (BENCHMARKS.md, run M). Counting needs only the ranks of byte strings, so a
//! [`Tokenizer`] holds the tokens' bytes once, in one buffer, with an open-addressed table of
//! their ranks: about 4.5 MB for `o200k_base`.
//!
//! The encodings are OpenAI's files (`encodings/`, as tiktoken-rs 0.12 ships them; a test
//! checks their SHA-256 against the hashes Python tiktoken checks), the pre-tokenizer is the
//! same `fancy-regex` pattern tiktoken-rs compiles, and the merging is tiktoken's
//! `byte_pair_merge` (its two versions, switched at the same length): so the counts are
//! tiktoken's by construction, and the tests below compare them on every token of the
//! vocabularies and on generated text.

use std::{collections::BinaryHeap, hash::Hasher, sync::OnceLock};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use fancy_regex::Regex;
use rustc_hash::FxHasher;

type Rank = u32;

/// `o200k_base`'s pre-tokenizer, as tiktoken-rs 0.12 spells it (`O200K_BASE_PAT_STR`).
const O200K_PATTERN: &str = tiktoken_rs::O200K_BASE_PAT_STR;
/// `cl100k_base`'s pre-tokenizer, as tiktoken-rs 0.12 spells it (in `cl100k_base()`).
const CL100K_PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";

const O200K_FILE: &str = include_str!("encodings/o200k_base.tiktoken");
const CL100K_FILE: &str = include_str!("encodings/cl100k_base.tiktoken");

/// One encoding's ranks and pre-tokenizer.
pub(super) struct Tokenizer {
    /// Every token's bytes, in rank order.
    bytes: Vec<u8>,
    /// Where token `r`'s bytes start in `bytes` (and, at `r + 1`, end).
    starts: Vec<u32>,
    /// Open addressing by the bytes' hash: a token's rank + 1, or 0 for an empty slot.
    slots: Vec<u32>,
    regex: Regex,
}

impl Tokenizer {
    /// `o200k_base`, loaded on first use and kept for the process.
    pub(super) fn o200k() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| Tokenizer::load(O200K_FILE, O200K_PATTERN))
    }

    /// `cl100k_base`, loaded on first use and kept for the process.
    pub(super) fn cl100k() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| Tokenizer::load(CL100K_FILE, CL100K_PATTERN))
    }

    /// From a `.tiktoken` file (a base64 token and its rank a line, ranks 0, 1, 2… in order:
    /// the test below checks both files) and its pre-tokenizer pattern. The inputs are
    /// compiled in, so a failure here is a build's bug, and the tests load both.
    fn load(file: &str, pattern: &str) -> Tokenizer {
        let lines = file.lines().count();
        let mut bytes = Vec::with_capacity(file.len() / 2);
        let mut starts = Vec::with_capacity(lines + 1);
        for (i, line) in file.lines().enumerate() {
            let (token, rank) = line.split_once(' ').expect("a token and its rank");
            assert_eq!(rank.parse::<usize>().ok(), Some(i), "ranks in order");
            starts.push(bytes.len() as u32);
            STANDARD
                .decode_vec(token, &mut bytes)
                .expect("base64 token");
        }
        starts.push(bytes.len() as u32);
        bytes.shrink_to_fit();
        // At most half full, so that a missing piece (most of the lookups while merging)
        // ends its probe soon.
        let mut slots = vec![0u32; (2 * lines).next_power_of_two()];
        let mask = slots.len() - 1;
        for rank in 0..lines {
            let token = &bytes[starts[rank] as usize..starts[rank + 1] as usize];
            let mut i = hash(token) & mask;
            while slots[i] != 0 {
                i = (i + 1) & mask;
            }
            slots[i] = rank as u32 + 1;
        }
        Tokenizer {
            bytes,
            starts,
            slots,
            regex: Regex::new(pattern).expect("tiktoken's pattern"),
        }
    }

    fn token(&self, rank: Rank) -> &[u8] {
        let r = rank as usize;
        &self.bytes[self.starts[r] as usize..self.starts[r + 1] as usize]
    }

    /// The rank of the token whose bytes are `piece`, if there is one.
    fn rank(&self, piece: &[u8]) -> Option<Rank> {
        let mask = self.slots.len() - 1;
        let mut i = hash(piece) & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            if self.token(slot - 1) == piece {
                return Some(slot - 1);
            }
            i = (i + 1) & mask;
        }
    }

    /// The number of tokens of `text` as ordinary text: tiktoken's
    /// `encode_ordinary(text).len()`.
    pub(super) fn count(&self, text: &str) -> u64 {
        let mut total = 0;
        for piece in self.regex.find_iter(text) {
            // `find_iter` fails only when the backtracking limit is hit, as tiktoken-rs's
            // `unwrap` would panic there.
            let piece = piece
                .expect("tiktoken's pattern matches")
                .as_str()
                .as_bytes();
            total += self.piece(piece) as u64;
        }
        total
    }

    /// The tokens of one pre-tokenizer piece: tiktoken's `byte_pair_encode(piece).len()`
    /// (one token when the piece is one).
    fn piece(&self, piece: &[u8]) -> usize {
        if piece.len() <= 1 || self.rank(piece).is_some() {
            return usize::from(!piece.is_empty());
        }
        if piece.len() < 100 {
            self.merge_small(piece)
        } else {
            self.merge_large(piece)
        }
    }

    /// tiktoken's `_byte_pair_merge`, counting the parts it leaves.
    fn merge_small(&self, piece: &[u8]) -> usize {
        let rank = |a: usize, b: usize| self.rank(&piece[a..b]).unwrap_or(Rank::MAX);
        // (start, rank of the pair starting there), as in tiktoken; at most 101 entries.
        let mut parts = [(0usize, Rank::MAX); 101];
        let mut len = 0;
        let mut min = (Rank::MAX, usize::MAX);
        for i in 0..piece.len() - 1 {
            let r = rank(i, i + 2);
            if r < min.0 {
                min = (r, i);
            }
            parts[len] = (i, r);
            len += 1;
        }
        parts[len] = (piece.len() - 1, Rank::MAX);
        parts[len + 1] = (piece.len(), Rank::MAX);
        len += 2;
        let get_rank = |parts: &[(usize, Rank)], len: usize, i: usize| {
            if i + 3 < len {
                rank(parts[i].0, parts[i + 3].0)
            } else {
                Rank::MAX
            }
        };
        while min.0 != Rank::MAX {
            let i = min.1;
            if i > 0 {
                parts[i - 1].1 = get_rank(&parts, len, i - 1);
            }
            parts[i].1 = get_rank(&parts, len, i);
            parts.copy_within(i + 2..len, i + 1);
            len -= 1;
            min = (Rank::MAX, usize::MAX);
            for (i, &(_, r)) in parts[..len - 1].iter().enumerate() {
                if r < min.0 {
                    min = (r, i);
                }
            }
        }
        len - 1
    }

    /// tiktoken's `_byte_pair_merge_large` (a heap of merges, for pieces of 100 bytes or
    /// more), counting the tokens it leaves.
    fn merge_large(&self, piece: &[u8]) -> usize {
        #[derive(PartialEq, Eq)]
        struct Merge {
            start: usize,
            rank: Rank,
        }
        impl Ord for Merge {
            fn cmp(&self, other: &Self) -> std::cmp::Ordering {
                other
                    .rank
                    .cmp(&self.rank)
                    .then_with(|| other.start.cmp(&self.start))
            }
        }
        impl PartialOrd for Merge {
            fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(other))
            }
        }
        struct State {
            prev: usize,
            end: usize,
            next_end: usize,
            next_rank: Rank,
        }
        let mut state = Vec::with_capacity(piece.len());
        state.push(State {
            prev: usize::MAX,
            end: 1,
            next_end: 2,
            next_rank: Rank::MAX,
        });
        let mut heap = BinaryHeap::with_capacity(piece.len());
        for i in 0..piece.len() - 1 {
            if let Some(rank) = self.rank(&piece[i..i + 2]) {
                heap.push(Merge { start: i, rank });
                state[i].next_rank = rank;
            }
            state.push(State {
                prev: i,
                end: i + 2,
                next_end: i + 3,
                next_rank: Rank::MAX,
            });
        }
        let potential_merge = |state: &mut Vec<State>,
                               heap: &mut BinaryHeap<Merge>,
                               start: usize,
                               next_end: usize| {
            state[start].next_end = next_end;
            state[start].next_rank = Rank::MAX;
            if next_end <= piece.len()
                && let Some(rank) = self.rank(&piece[start..next_end])
            {
                heap.push(Merge { start, rank });
                state[start].next_rank = rank;
            }
        };
        while let Some(left) = heap.pop() {
            if left.rank == Rank::MAX {
                break;
            }
            if left.rank != state[left.start].next_rank {
                continue;
            }
            let left_start = left.start;
            let right_start = state[left_start].end;
            let right_end = state[left_start].next_end;
            let right_next_end = state[right_start].next_end;
            state[left_start].end = right_end;
            potential_merge(&mut state, &mut heap, left_start, right_next_end);
            if right_end < state.len() {
                state[right_end].prev = left_start;
            }
            if left_start > 0 {
                let prev_start = state[left_start].prev;
                potential_merge(&mut state, &mut heap, prev_start, right_end);
            }
            state[right_start].next_rank = Rank::MAX;
        }
        let mut tokens = 0;
        let mut i = 0;
        while i < state.len() {
            tokens += 1;
            i = state[i].end;
        }
        tokens
    }
}

fn hash(bytes: &[u8]) -> usize {
    let mut h = FxHasher::default();
    h.write(bytes);
    h.finish() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use tiktoken_rs::CoreBPE;

    fn both() -> [(&'static str, &'static Tokenizer, &'static CoreBPE); 2] {
        [
            (
                "o200k_base",
                Tokenizer::o200k(),
                tiktoken_rs::o200k_base_singleton(),
            ),
            (
                "cl100k_base",
                Tokenizer::cl100k(),
                tiktoken_rs::cl100k_base_singleton(),
            ),
        ]
    }

    #[test]
    fn the_encodings_are_openais_files() {
        // The hashes Python tiktoken checks its downloads against (tiktoken_ext/openai_public.py).
        for (file, expected) in [
            (
                O200K_FILE,
                "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
            ),
            (
                CL100K_FILE,
                "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
            ),
        ] {
            let hash: String = Sha256::digest(file.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(hash, expected);
        }
    }

    #[test]
    fn every_token_has_tiktokens_rank() {
        for (name, ours, theirs) in both() {
            let n = ours.starts.len() - 1;
            assert!(n > 100_000, "{name}");
            for rank in 0..n as Rank {
                let token = ours.token(rank);
                assert_eq!(ours.rank(token), Some(rank), "{name}: {token:?}");
                assert_eq!(
                    theirs.decode_bytes(&[rank]).ok().as_deref(),
                    Some(token),
                    "{name}: {rank}"
                );
            }
            // No ordinary token beyond ours.
            assert!(theirs.decode_bytes(&[n as Rank]).is_err(), "{name}");
            assert_eq!(ours.rank(b"not one token, surely"), None);
        }
    }

    /// Text of words, spaces, punctuation and letters of many scripts, with the long runs
    /// that take tiktoken's other merge (100 bytes or more).
    fn generated(seed: u64, len: usize) -> String {
        const ALPHABET: &[&str] = &[
            "a",
            "Z",
            "hello",
            "World",
            "HELLO",
            " ",
            "  ",
            "\t",
            "\n",
            "\r\n",
            "0",
            "12345",
            ".",
            ",",
            "'s",
            "'LL",
            "/",
            "-",
            "\"",
            "{",
            "}",
            "é",
            "Déjà",
            "naïve",
            "日本語",
            "のテキスト",
            "中文",
            "한국어",
            "Привет",
            "мир",
            "العربية",
            "हिन्दी",
            "😀",
            "👍🏽",
            "\u{a0}",
            "\u{3000}",
            "ß",
            "Ω",
            "\u{301}",
            "x\u{301}",
            "ﬁ",
            "\u{0}",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "ÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöüÄÖÜäöü",
            "                                                                                                        ",
            "!@#$%^&*()!@#$%^&*()!@#$%^&*()!@#$%^&*()!@#$%^&*()!@#$%^&*()!@#$%^&*()!@#$%^&*()!@#$%^&*()!@#$%^&*()!@",
            "QmFzZTY0RW5jb2RlZERhdGFRbUZ6WlRZMFJXNWpiMlJsWkVSaGRHRlJiVVo2V2xSWk1GSlhOV3BpTWxKc1drVlNhR1JIUlQ",
        ];
        super::super::test_support::generated(seed, len, ALPHABET)
    }

    #[test]
    fn counts_equal_tiktokens_on_generated_text() {
        for (name, ours, theirs) in both() {
            for seed in 0..3000 {
                let text = generated(seed, 1 + (seed as usize % 60));
                assert_eq!(
                    ours.count(&text),
                    theirs.encode_ordinary(&text).len() as u64,
                    "{name}: {text:?}"
                );
            }
        }
    }

    #[test]
    fn counts_equal_tiktokens_on_long_pieces() {
        // Single pieces of every length around the switch between the two merges.
        for (name, ours, theirs) in both() {
            for len in [1, 2, 3, 50, 98, 99, 100, 101, 150, 400, 2000] {
                for unit in ["a", "ab", "xyz", "é", "日", "9", "!", " ", "aB"] {
                    let text: String = unit.repeat(len);
                    let text = &text[..text.floor_char_boundary(len)];
                    assert_eq!(
                        ours.count(text),
                        theirs.encode_ordinary(text).len() as u64,
                        "{name}: {unit:?} × {len}"
                    );
                }
            }
        }
    }
}
