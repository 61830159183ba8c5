//! The text of the problems: each says what is wrong and what to do about it, quotes the
//! offending value (shortened, control characters escaped), and is cut at `MAX_MESSAGE`
//! bytes, so a report stays readable however broken the file.

use serde::de::IgnoredAny;

use super::SUPPORTED_URLS;

const MAX_MESSAGE: usize = 400;

pub(super) fn truncate(mut s: String) -> String {
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
pub(super) fn quote(s: &str) -> String {
    const MAX: usize = 60;
    let shown: String = s.chars().take(MAX).collect();
    let ellipsis = if shown.len() < s.len() { "…" } else { "" };
    format!("\"{}{ellipsis}\"", shown.escape_debug())
}

pub(super) fn supported_list() -> String {
    SUPPORTED_URLS.join(", ")
}

pub(super) fn unsupported_url_message(u: &str) -> String {
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

pub(super) fn utf8_message(n: u64, bytes: &[u8], e: &std::str::Utf8Error) -> String {
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

pub(super) fn not_object_message(text: &str) -> String {
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
pub(super) fn json_error_message(text: &str, e: &serde_json::Error) -> String {
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

pub(super) fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::test_support::only;

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
}
