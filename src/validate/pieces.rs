//! Counting tokens fast: tiktoken's pre-tokenizer is a backtracking regex (its `\s+(?!\S)`
//! needs look-ahead) and it, not the byte-pair merging, is what made validation 30 times
//! slower (see the README's token estimate). Text is first cut into [`words`] at places
//! where tiktoken always cuts; an ASCII word is cut into tiktoken's pieces by hand
//! ([`split_ascii`], the same patterns without the regex engine), a word with other
//! characters goes to tiktoken alone; and [`Counter`] remembers each piece's or word's count:
//! prompts reuse the same words, so after the first few lines almost every one is a hash
//! lookup. Exactness is tested against tiktoken on generated text (the tests below).

use rustc_hash::FxHashMap;

use super::bpe::Tokenizer;

/// Pieces remembered per tokenizer at most (a few MB); beyond, the memory is cleared and refilled
/// (a file of ever-new words must not grow it without bound).
const MAX_REMEMBERED: usize = 50_000;

/// A tokenizer's counts of the pieces seen so far. Most pieces are a word or less, so those of
/// up to [`SHORT`] bytes are kept as one integer: a lookup is then an integer hash and compare,
/// with no key on the heap to follow and no `memcmp` call (the two were half the validator's
/// time with a map of boxed keys, BENCHMARKS.md). Longer ones keep their bytes.
#[derive(Default)]
pub(super) struct Counter {
    short: FxHashMap<u128, u32>,
    long: FxHashMap<Box<[u8]>, u32>,
    /// Short words (`words`), each a whole number of pieces, with their counts.
    words: FxHashMap<u128, u32>,
}

/// The longest piece kept as an integer: 15 bytes and the length in the 16th, so that pieces
/// that differ only by trailing NUL bytes (`\u0000` in JSON) stay apart.
const SHORT: usize = 15;

fn short_key(piece: &[u8]) -> Option<u128> {
    if piece.len() > SHORT {
        return None;
    }
    let mut bytes = [0u8; 16];
    bytes[..piece.len()].copy_from_slice(piece);
    bytes[15] = piece.len() as u8;
    Some(u128::from_le_bytes(bytes))
}

/// [`short_key`] of `word`, a slice of `text`, read as one 16-byte load from `text` and masked
/// when 16 bytes are there: the same key without copying the bytes one piece at a time (the
/// copy was 8% of the validator's time, BENCHMARKS.md).
fn short_key_in(text: &[u8], word: &[u8]) -> Option<u128> {
    let len = word.len();
    if len > SHORT {
        return None;
    }
    let start = word.as_ptr() as usize - text.as_ptr() as usize;
    match text.get(start..start + 16) {
        Some(chunk) => {
            let bytes = u128::from_le_bytes(chunk.try_into().expect("16 bytes"));
            let mask = (1u128 << (8 * len)) - 1;
            Some((bytes & mask) | ((len as u128) << 120))
        }
        None => short_key(word),
    }
}

impl Counter {
    /// The tokens of `text` by `bpe`, tiktoken's encoding whose pre-tokenizer is `pattern`'s.
    pub(super) fn count(&mut self, bpe: &Tokenizer, pattern: Pattern, text: &str) -> u64 {
        let mut total = 0u64;
        let bytes = text.as_bytes();
        for word in words(bytes) {
            // A short word seen before is one lookup, without cutting it into pieces.
            let Some(key) = short_key_in(bytes, word) else {
                total += self.word(bpe, pattern, word);
                continue;
            };
            if let Some(n) = self.words.get(&key) {
                total += u64::from(*n);
                continue;
            }
            let n = self.word(bpe, pattern, word);
            if self.words.len() >= MAX_REMEMBERED {
                self.words.clear();
            }
            self.words.insert(key, n as u32);
            total += n;
        }
        total
    }

    /// The tokens of one of `words`' words.
    fn word(&mut self, bpe: &Tokenizer, pattern: Pattern, word: &[u8]) -> u64 {
        if word.is_ascii() {
            split_ascii(pattern, word)
                .map(|piece| self.remembered(bpe, piece))
                .sum()
        } else {
            // A word with a non-ASCII character: tiktoken's regex cuts it, but only it, and a
            // word seen before is remembered whole.
            self.remembered(bpe, word)
        }
    }

    /// The count of `piece` (a whole number of tiktoken's pieces), remembered.
    fn remembered(&mut self, bpe: &Tokenizer, piece: &[u8]) -> u64 {
        let key = short_key(piece);
        let known = match key {
            Some(k) => self.short.get(&k),
            None => self.long.get(piece),
        };
        if let Some(n) = known {
            return u64::from(*n);
        }
        // `words` cuts only between ASCII bytes, so a word is always whole UTF-8.
        let text = std::str::from_utf8(piece).expect("cut on ASCII boundaries");
        let n = bpe.count(text) as u32;
        if self.short.len() + self.long.len() >= MAX_REMEMBERED {
            self.short.clear();
            self.long.clear();
        }
        match key {
            Some(k) => self.short.insert(k, n),
            None => self.long.insert(piece.into(), n),
        };
        u64::from(n)
    }
}

/// `text` cut before every space that follows a non-space and precedes one, and after every
/// CR or LF that precedes a non-space other than '/': tiktoken's pieces never span such a
/// place in either encoding (only whitespace-only pieces hold a space after their first
/// character; a CR or LF ends its piece unless more of them or o200k's '/' follow), so each
/// word is a whole number of pieces and can be counted alone.
fn words(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= text.len() {
            return None;
        }
        let start = at;
        let mut i = start + 1;
        while i < text.len() {
            if text[i] == b' '
                && !is_space(text[i - 1])
                && text.get(i + 1).is_some_and(|b| !is_space(*b))
            {
                break;
            }
            // After CR or LF, before anything but whitespace or '/': only o200k's
            // punctuation piece takes characters after a newline (`[\r\n/]*`), and only
            // more newlines and slashes. So "word.\nNext" is two words, and prompts with
            // many lines do not make a word of every pair of words around a newline.
            if is_newline(text[i - 1]) && !is_space(text[i]) && text[i] != b'/' {
                break;
            }
            i += 1;
        }
        at = i;
        Some(&text[start..i])
    })
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\x0B' | b'\x0C' | b'\r')
}

fn is_newline(b: u8) -> bool {
    matches!(b, b'\r' | b'\n')
}

/// Neither space, letter nor digit: punctuation and symbols.
fn is_other(b: u8) -> bool {
    !is_space(b) && !b.is_ascii_alphanumeric()
}

/// The length of a contraction (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`, any case) at the
/// start of `s`, or 0.
fn contraction(s: &[u8]) -> usize {
    if s.first() != Some(&b'\'') {
        return 0;
    }
    let lower = |i: usize| s.get(i).map(u8::to_ascii_lowercase);
    match (lower(1), lower(2)) {
        (Some(b'r'), Some(b'e')) | (Some(b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => 3,
        (Some(b's' | b't' | b'm' | b'd'), _) => 2,
        _ => 0,
    }
}

/// Which tiktoken pre-tokenizer pattern to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pattern {
    /// `o200k_base`'s: case changes split words, contractions end them, `/` may follow
    /// punctuation.
    O200k,
    /// `cl100k_base`'s: contractions stand alone, any letters make one word.
    Cl100k,
}

/// The pieces tiktoken's pre-tokenizer cuts ASCII `text` into.
///
/// o200k_base's pattern, alternatives in order, the first that matches at the current
/// position winning:
/// 1. `[^\r\n\p{L}\p{N}]?[\p{Lu}…]*[\p{Ll}…]+('s|'t|'re|'ve|'m|'ll|'d)?`
/// 2. `[^\r\n\p{L}\p{N}]?[\p{Lu}…]+[\p{Ll}…]*('s|…)?`
/// 3. `\p{N}{1,3}`
/// 4. ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
/// 5. `\s*[\r\n]+`
/// 6. `\s+(?!\S)`
/// 7. `\s+`
///
/// cl100k_base's differs in 1–2 (`('s|'t|…)` alone first, then
/// `[^\r\n\p{L}\p{N}]?\p{L}+`) and 4 (`[\r\n]*` after the punctuation, no `/`).
pub(super) fn split_ascii(pattern: Pattern, text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= text.len() {
            return None;
        }
        let len = piece_len(pattern, &text[at..]);
        let piece = &text[at..at + len];
        at += len;
        Some(piece)
    })
}

/// The length of the piece at the start of non-empty `s`.
fn piece_len(pattern: Pattern, s: &[u8]) -> usize {
    if pattern == Pattern::Cl100k {
        let n = contraction(s);
        if n > 0 {
            return n;
        }
    }
    // 1 and 2: an optional lead (not CR/LF, letter or digit), then letters.
    let lead = usize::from(!is_newline(s[0]) && !s[0].is_ascii_alphanumeric());
    for start in [lead, 0] {
        if let Some(n) = letters(pattern, &s[start..]) {
            return start + n;
        }
        if start == 0 {
            break;
        }
    }
    // 3: up to three digits.
    if s[0].is_ascii_digit() {
        return s.iter().take(3).take_while(|b| b.is_ascii_digit()).count();
    }
    // 4: an optional space, punctuation, then CR, LF or '/'.
    let space = usize::from(s[0] == b' ');
    let punct = s[space..].iter().take_while(|b| is_other(**b)).count();
    if punct > 0 {
        let n = space + punct;
        let slash = pattern == Pattern::O200k;
        return n + s[n..]
            .iter()
            .take_while(|b| is_newline(**b) || (slash && **b == b'/'))
            .count();
    }
    // Only whitespace is left at s[0].
    let run = s.iter().take_while(|b| is_space(**b)).count();
    // 5: whitespace up to and including its last CR or LF.
    if let Some(last) = s[..run].iter().rposition(|b| is_newline(*b)) {
        return last + 1;
    }
    // 6: the run, less its last character when a non-space follows; 7: the run.
    if run == s.len() || run == 1 {
        run
    } else {
        run - 1
    }
}

/// Letters at the start of `s` as alternatives 1 and 2 take them (o200k: upper* lower+,
/// else upper+ lower*, with a contraction; cl100k: all letters); `None` when `s` starts
/// with no letter.
fn letters(pattern: Pattern, s: &[u8]) -> Option<usize> {
    if pattern == Pattern::Cl100k {
        let n = s.iter().take_while(|b| b.is_ascii_alphabetic()).count();
        return (n > 0).then_some(n);
    }
    let upper = s.iter().take_while(|b| b.is_ascii_uppercase()).count();
    let lower = s[upper..]
        .iter()
        .take_while(|b| b.is_ascii_lowercase())
        .count();
    if upper + lower == 0 {
        return None;
    }
    let n = upper + lower;
    Some(n + contraction(&s[n..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiktoken_rs::CoreBPE;

    fn tiktoken_pieces(bpe: &CoreBPE, text: &str) -> u64 {
        bpe.encode_ordinary(text).len() as u64
    }

    /// Text from an alphabet that exercises every alternative and their boundaries.
    fn generated(seed: u64, len: usize) -> String {
        const ALPHABET: &[&str] = &[
            "a", "b", "Z", "Q", "x", "hello", "World", "HELLO", "ABCdef", " ", " ", "  ", "\t",
            "\n", "\r\n", "\n\n", " \n", "0", "12", "12345", ".", ",", "!", "?", "'s", "'S", "'re",
            "'ll", "'d", "'m", "'ve", "'t", "'x", "'", "/", "//", "-", "(", ")", "\"", "{", "}",
            ":", ";", "#", "@", "_", "$", "%", "&", "*", "+", "=", "<", ">", "[", "]", "\\", "^",
            "`", "|", "~", "\x0B", "\x0C", " .", " /", ".\n", "\t\n", "don't", "I'M", "it'S",
            "\u{a0}", "\u{3000}", "é", "Déjà", "日本", "\n/", "\r", ".\r/",
        ];
        super::super::test_support::generated(seed, len, ALPHABET)
    }

    #[test]
    fn counts_equal_tiktokens_on_generated_text() {
        for (name, ours, bpe, pattern) in [
            (
                "o200k_base",
                Tokenizer::o200k(),
                tiktoken_rs::o200k_base_singleton(),
                Pattern::O200k,
            ),
            (
                "cl100k_base",
                Tokenizer::cl100k(),
                tiktoken_rs::cl100k_base_singleton(),
                Pattern::Cl100k,
            ),
        ] {
            let mut counter = Counter::default();
            for seed in 0..3000 {
                let text = generated(seed, 1 + (seed as usize % 40));
                assert_eq!(
                    counter.count(ours, pattern, &text),
                    tiktoken_pieces(bpe, &text),
                    "{name}: {text:?}"
                );
            }
        }
    }

    #[test]
    fn a_key_read_in_place_is_the_copied_key() {
        let text = b"a\0b hello\0\0 world, abcdefghijklmno abcdefghijklmnop x";
        for start in 0..text.len() {
            for end in start + 1..=text.len() {
                let word = &text[start..end];
                assert_eq!(short_key_in(text, word), short_key(word), "{word:?}");
            }
        }
    }

    #[test]
    fn short_and_long_pieces_are_remembered_apart() {
        // Pieces that differ only by trailing NUL bytes, and pieces either side of the
        // length kept as an integer, each counted first and then from memory.
        let samples = [
            "a",
            "a\0",
            "a\0\0",
            "\0",
            "\0\0",
            " é",
            " é\0",
            "abcdefghijklmn",
            "abcdefghijklmno",
            "abcdefghijklmnop",
            "abcdefghijklmnopq",
            "supercalifragilisticexpialidocious",
            "supercalifragilisticexpialidociousness",
            " 日本語の",
            " 日本語のテキスト",
            " 日本語のテキストです",
        ];
        for (ours, bpe, pattern) in encodings() {
            let mut counter = Counter::default();
            for _ in 0..2 {
                for s in samples {
                    assert_eq!(
                        counter.count(ours, pattern, s),
                        tiktoken_pieces(bpe, s),
                        "{s:?}"
                    );
                }
            }
        }
    }

    /// Each encoding: our tokenizer, tiktoken-rs's, and the pre-tokenizer pattern.
    fn encodings() -> [(&'static Tokenizer, &'static CoreBPE, Pattern); 2] {
        [
            (
                Tokenizer::o200k(),
                tiktoken_rs::o200k_base_singleton(),
                Pattern::O200k,
            ),
            (
                Tokenizer::cl100k(),
                tiktoken_rs::cl100k_base_singleton(),
                Pattern::Cl100k,
            ),
        ]
    }

    #[test]
    fn counts_equal_tiktokens_on_prose_json_and_code() {
        let samples = [
            "You are a helpful assistant that translates corporate jargon into plain English.",
            "Summarise ticket #4821: the customer says \"the app crashes\" when saving.\n\nSteps:\n 1. open\n 2. save  \n",
            "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
            "fn main() {\n    println!(\"{}\", x /* why */ + 1);\n}\n",
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n",
            "    leading and trailing spaces    ",
            "CamelCaseIdentifiersAndALLCAPSWords mixedCASEWords",
            "It's, we're, they've, I'm, you'll, he'd; IT'S WE'RE.",
            "path/to/file.txt and https://example.com/a/b?c=d#e",
            "Summarise ticket #7: \"the app crashes\" when saving — café, naïve, 日本語. Lorem ipsum.",
            "Ünïcödé wörds ánd ASCII mixed; 😀 emoji, Ñandú's nest.",
        ];
        for (ours, bpe, pattern) in encodings() {
            let mut counter = Counter::default();
            for s in samples {
                let expected = tiktoken_pieces(bpe, s);
                assert_eq!(counter.count(ours, pattern, s), expected, "{s:?}");
                // A second time from memory: the same.
                assert_eq!(counter.count(ours, pattern, s), expected, "{s:?}");
            }
        }
    }
}
