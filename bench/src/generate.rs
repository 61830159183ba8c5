//! Generated batch inputs: chat requests (a system and a user message) of realistic size,
//! deterministic for a given seed, written straight to a file.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

/// The deployment named in every generated line (and given to the emulator).
pub const MODEL: &str = "gpt-4o-batch";

/// A small, fast, deterministic generator (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "customer",
    "invoice",
    "shipment",
    "delivery",
    "contract",
    "summary",
    "analysis",
    "report",
    "quarter",
    "revenue",
    "forecast",
    "product",
    "feature",
    "release",
    "version",
    "account",
    "payment",
    "support",
    "ticket",
    "question",
    "answer",
    "document",
    "section",
    "paragraph",
    "policy",
    "warranty",
    "refund",
    "order",
    "address",
    "schedule",
    "meeting",
    "project",
    "deadline",
    "budget",
    "estimate",
    "translation",
    "language",
    "sentence",
    "classification",
    "sentiment",
    "positive",
    "negative",
    "neutral",
    "category",
    "priority",
    "urgent",
    "review",
    "rating",
    "explain",
    "describe",
    "compare",
    "list",
    "extract",
    "rewrite",
    "translate",
    "classify",
    "please",
    "briefly",
    "detailed",
    "following",
    "text",
    "below",
    "above",
    "information",
    "database",
    "server",
    "network",
    "latency",
    "throughput",
    "memory",
    "storage",
    "container",
    "Microsoft",
    "Azure",
    "OpenAI",
    "Contoso",
    "Fabrikam",
    "Northwind",
    "Seattle",
    "Berlin",
    "café",
    "naïve",
    "Zürich",
    "São",
    "Paulo",
    "München",
    "déjà",
    "vu",
    "Straße",
    "résumé",
    "日本語",
    "東京",
    "データ",
    "中文",
    "数据",
    "Ελληνικά",
    "русский",
    "текст",
    "2024",
    "2025",
    "42",
    "3.14",
    "100%",
    "$250",
    "e-mail",
    "co-operate",
    "state-of-the-art",
    "i.e.",
    "e.g.",
];

const SYSTEM_PROMPTS: &[&str] = &[
    "You are an AI assistant that helps people find information.",
    "You are a helpful assistant for a customer support team. Answer politely and concisely, cite the policy section you rely on, and never invent order numbers or prices.",
    "You classify customer messages. Reply with one JSON object with the keys \\\"category\\\", \\\"priority\\\" and \\\"sentiment\\\", and nothing else.",
    "You are a careful translator. Translate the user's text into English, keep the formatting, keep product names untranslated, and do not add explanations.",
    "You summarise business documents for executives. Write at most five bullet points.\\nEach bullet starts with a verb.\\nMention every number that changes a decision.",
    "You extract structured data from invoices: supplier, invoice number, date, currency, net amount, tax and total. Answer in JSON. If a field is missing, use null.",
];

/// Writes `lines` requests of about `mean_len` bytes each (uniform ±20%), ids `task-{n}`
/// from `first_id`. Returns the bytes written.
pub fn write_chat_file(
    path: &Path,
    lines: u64,
    mean_len: usize,
    first_id: u64,
    seed: u64,
) -> std::io::Result<u64> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut rng = Rng::new(seed);
    let mut line = String::with_capacity(4 * mean_len);
    let mut total = 0u64;
    for i in 0..lines {
        let target = rng.range(mean_len * 4 / 5, mean_len * 6 / 5);
        line.clear();
        line.push_str("{\"custom_id\": \"task-");
        line.push_str(&(first_id + i).to_string());
        line.push_str(
            "\", \"method\": \"POST\", \"url\": \"/chat/completions\", \"body\": {\"model\": \"",
        );
        line.push_str(MODEL);
        line.push_str("\", \"messages\": [{\"role\": \"system\", \"content\": \"");
        line.push_str(SYSTEM_PROMPTS[rng.range(0, SYSTEM_PROMPTS.len() - 1)]);
        line.push_str("\"}, {\"role\": \"user\", \"content\": \"");
        const TAIL: &str = "\"}], \"max_tokens\": 800, \"temperature\": 0.2}}";
        let stop = target.saturating_sub(TAIL.len());
        let mut sentence_start = true;
        while line.len() < stop {
            let w = WORDS[rng.range(0, WORDS.len() - 1)];
            if sentence_start {
                let mut cs = w.chars();
                if let Some(c) = cs.next() {
                    line.extend(c.to_uppercase());
                    line.push_str(cs.as_str());
                }
                sentence_start = false;
            } else {
                line.push_str(w);
            }
            match rng.next() % 40 {
                0..=2 => {
                    line.push_str(". ");
                    sentence_start = true;
                }
                3 => line.push_str(", "),
                4 => {
                    line.push_str(".\\n");
                    sentence_start = true;
                }
                5 => line.push_str(" \\\"quoted\\\" "),
                _ => line.push(' '),
            }
        }
        line.push_str(TAIL);
        line.push('\n');
        out.write_all(line.as_bytes())?;
        total += line.len() as u64;
    }
    out.flush()?;
    Ok(total)
}

/// A small valid input of `lines` short requests (the tick-scale jobs).
pub fn small_input(prefix: &str, lines: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..lines {
        out.push_str(&format!(
            "{{\"custom_id\": \"{prefix}-{i}\", \"method\": \"POST\", \"url\": \"/chat/completions\", \"body\": {{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": \"system\", \"content\": \"{}\"}}, {{\"role\": \"user\", \"content\": \"Question number {i}?\"}}]}}}}\n",
            SYSTEM_PROMPTS[0]
        ));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_lines_are_valid_requests_of_the_requested_size() {
        let dir = std::env::temp_dir().join(format!("bench-gen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.jsonl");
        let bytes = write_chat_file(&path, 500, 2000, 0, 7).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text.len() as u64, bytes);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 500);
        let mean = bytes as f64 / 500.0;
        assert!((1900.0..2100.0).contains(&mean), "mean line length {mean}");
        for l in lines {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["body"]["model"], MODEL);
            assert_eq!(v["body"]["messages"].as_array().unwrap().len(), 2);
        }
        let report = aoai_blob_batch::validate::validate_reader(
            &small_input("t", 3)[..],
            aoai_blob_batch::validate::Limits::default(),
        )
        .unwrap();
        assert!(report.is_ok(), "{report:?}");
    }
}
