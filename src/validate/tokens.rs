//! The enqueued-token estimate of one request: what it will count against the deployment's
//! batch quota. Azure says "when you submit a file for batch processing, the number of tokens
//! in the file is counted" (global-batch-limits.md): the input's tokens, so `max_tokens` and
//! `max_completion_tokens` are not counted here. The service estimates those tokens its own
//! way (by characters, per its quota how-to), so this figure and the service's differ; this
//! one is the model family's real tokenizer, the better guess of the two.
//!
//! The rule, per request (README, "Token estimate"):
//! - the tokenizer is the deployment's model family's, from the deployment name
//!   (`body.model`) as tiktoken maps model names: `cl100k_base` for names of the gpt-4 and
//!   gpt-35-turbo families (`gpt-4-…`, `gpt-35-turbo-…`, `gpt-3.5-turbo-…`), `o200k_base` for
//!   everything else: gpt-4o, gpt-4.1, gpt-5, the o-series and names that say no family
//!   (the families Azure Batch serves today);
//! - chat `messages` (and Responses `input` items): 3 tokens per message, its role's and
//!   content's tokens, a `name`'s tokens plus 1, every other string of the message (tool
//!   calls, their arguments) as text, and 3 per request for the reply's priming, as
//!   OpenAI's cookbook counts ("How to count tokens with tiktoken");
//! - content parts: `text` / `input_text` by the tokenizer; an image 85 tokens at
//!   `"detail": "low"`, else 765 (OpenAI's figure for a 1024×1024 image at high detail; the
//!   size is unknown here, the image is not fetched); any other part (audio, files) a
//!   quarter of its strings' characters, the service's own kind of estimate;
//! - Responses `instructions`, completions `prompt`, `tools` and `functions` definitions:
//!   their strings as text; embeddings `input`: strings by the tokenizer, token arrays by
//!   their length.
//!
//! Collecting is done while the line is parsed (the strings stay borrowed from the line
//! unless they hold escapes); counting after, once `body.model` (which may come last) is
//! known. Each tokenizer is loaded once per process, and counting goes through `pieces`,
//! which gives tiktoken's figure without its slow pre-tokenizer for ASCII text.

use std::{
    borrow::Cow,
    fmt,
    sync::{
        Arc, Mutex,
        mpsc::{SyncSender, sync_channel},
    },
    thread::JoinHandle,
};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tiktoken_rs::tokenizer::{Tokenizer as Family, get_tokenizer};

use super::{
    bpe::Tokenizer,
    pieces::{Counter, Pattern},
};

/// Framing tokens of one chat message (`<|start|>{role}<|message|>…<|end|>`), per OpenAI's
/// cookbook for the current models.
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Extra token of a message's `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// The reply's priming (`<|start|>assistant<|message|>`), once per request with messages.
pub const REPLY_PRIMING: u64 = 3;
/// An image at `"detail": "low"`: OpenAI's fixed figure.
pub const IMAGE_LOW_DETAIL: u64 = 85;
/// An image at high or automatic detail: OpenAI's figure for a 1024×1024 image
/// (85 + 4 tiles × 170); the true figure needs the image's size.
pub const IMAGE_HIGH_DETAIL: u64 = 765;

/// The keys of `body` that hold input tokens.
pub(super) const PROMPT_KEYS: [&str; 6] = [
    "messages",
    "input",
    "instructions",
    "prompt",
    "tools",
    "functions",
];

/// The tokenizer encodings the estimate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    O200kBase,
    Cl100kBase,
}

impl Encoding {
    /// The encoding of the model family a deployment name (`body.model`) names. Azure
    /// deployment names are free text; tiktoken's model-name prefixes (`gpt-4o-`, `gpt-4-`,
    /// `gpt-35-turbo-`…) are how they are usually made, so they decide. A name that says no
    /// family gets `o200k_base`, the encoding of every family Azure Batch serves today.
    pub fn for_deployment(name: &str) -> Encoding {
        match get_tokenizer(&name.to_ascii_lowercase()) {
            Some(Family::Cl100kBase) => Encoding::Cl100kBase,
            _ => Encoding::O200kBase,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }

    /// The tokenizer, loaded on first use and kept for the process: only the encodings a
    /// file's deployments need are loaded (`bpe`: compiled into the binary, nothing is
    /// fetched; a few hundredths of a second and ~4.5 MB for `o200k_base`).
    fn bpe(self) -> &'static Tokenizer {
        match self {
            Encoding::O200kBase => Tokenizer::o200k(),
            Encoding::Cl100kBase => Tokenizer::cl100k(),
        }
    }

    /// The tokens of `text` as ordinary text by tiktoken-rs itself: a special token's
    /// spelling in a prompt is text to the service, not a control token. The tests'
    /// reference; the validator counts through a [`Counters`], which gives the same figure
    /// with less memory and time.
    #[cfg(test)]
    pub fn count(self, text: &str) -> u64 {
        let bpe = match self {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        };
        bpe.encode_ordinary(text).len() as u64
    }
}

/// Token counting with memory of the pieces seen, one per encoding (`pieces`): the
/// validator's, kept for the whole file.
#[derive(Default)]
pub(super) struct Counters {
    o200k: Counter,
    cl100k: Counter,
}

impl Counters {
    fn count(&mut self, encoding: Encoding, text: &str) -> u64 {
        let (counter, pattern) = match encoding {
            Encoding::O200kBase => (&mut self.o200k, Pattern::O200k),
            Encoding::Cl100kBase => (&mut self.cl100k, Pattern::Cl100k),
        };
        counter.count(encoding.bpe(), pattern, text)
    }
}

/// Counting on other threads while the validator parses the next lines: the tokenizer costs
/// several times the parsing (BENCHMARKS.md, validation), so `handler validate` gives it the
/// machine's other cores. The texts are copied into batches of about [`BATCH_BYTES`]; each
/// thread keeps its own [`Counters`], so the sum is the same as counting in line.
pub(super) struct Background {
    batch: Batch,
    tx: Option<SyncSender<Batch>>,
    workers: Vec<JoinHandle<u64>>,
}

/// Texts handed to a counting thread at once: big enough that the channel costs nothing per
/// text, small enough that a few in flight keep memory bounded (2 per thread queued).
const BATCH_BYTES: usize = 256 << 10;

#[derive(Default)]
struct Batch {
    text: String,
    /// Where each text ends in `text`, and its tokenizer.
    ends: Vec<(usize, Encoding)>,
}

impl Batch {
    fn count(&self, counters: &mut Counters) -> u64 {
        let mut start = 0;
        let mut total = 0;
        for &(end, encoding) in &self.ends {
            total += counters.count(encoding, &self.text[start..end]);
            start = end;
        }
        total
    }
}

impl Background {
    /// Up to `threads` counting threads; `None` when none could be started (the caller then
    /// counts in line).
    pub(super) fn start(threads: usize) -> Option<Background> {
        let (tx, rx) = sync_channel::<Batch>(2 * threads.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        for i in 0..threads {
            let rx = Arc::clone(&rx);
            let spawned = std::thread::Builder::new()
                .name(format!("tokens-{i}"))
                .spawn(move || {
                    let mut counters = Counters::default();
                    let mut total = 0;
                    // The lock is held while waiting, so one idle thread waits in `recv` and
                    // the others on the lock: each batch goes to exactly one.
                    while let Ok(batch) =
                        rx.lock().map_err(drop).and_then(|r| r.recv().map_err(drop))
                    {
                        total += batch.count(&mut counters);
                    }
                    total
                });
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(_) => break,
            }
        }
        (!workers.is_empty()).then(|| Background {
            batch: Batch::default(),
            tx: Some(tx),
            workers,
        })
    }

    /// Queues `prompt`'s texts to be counted with `encoding`; returns the tokens known
    /// without counting (framing, images, token arrays).
    pub(super) fn add(&mut self, encoding: Encoding, prompt: &Prompt<'_>) -> u64 {
        for text in &prompt.texts {
            self.batch.text.push_str(text);
            self.batch.ends.push((self.batch.text.len(), encoding));
        }
        if self.batch.text.len() >= BATCH_BYTES {
            self.send();
        }
        prompt.known()
    }

    fn send(&mut self) {
        let batch = std::mem::take(&mut self.batch);
        if let Some(tx) = &self.tx {
            // A failed send means every thread is gone, i.e. one panicked: `finish` says so.
            let _ = tx.send(batch);
        }
    }

    /// The tokens of every text queued.
    pub(super) fn finish(mut self) -> u64 {
        self.send();
        drop(self.tx.take());
        self.workers
            .drain(..)
            .map(|w| {
                w.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .sum()
    }
}

/// What one request's prompt is made of, collected while its line is parsed: the texts to
/// tokenize and the tokens already known (framing, images, token arrays, character-rule
/// parts).
#[derive(Default)]
pub(super) struct Prompt<'a> {
    texts: Vec<Cow<'a, str>>,
    fixed: u64,
    messages: u64,
}

impl<'a> Prompt<'a> {
    /// The request's estimated input tokens with `encoding`.
    pub(super) fn tokens(&self, encoding: Encoding, counters: &mut Counters) -> u64 {
        let texts: u64 = self.texts.iter().map(|t| counters.count(encoding, t)).sum();
        self.known() + texts
    }

    /// The tokens known without the tokenizer: framing, the reply's priming, fixed figures.
    fn known(&self) -> u64 {
        let priming = if self.messages > 0 { REPLY_PRIMING } else { 0 };
        self.fixed + priming
    }

    /// The seed that reads `body.{key}` (one of [`PROMPT_KEYS`]) into this prompt.
    pub(super) fn field<'p>(&'p mut self, key: &str) -> Walk<'p, 'a> {
        let kind = match key {
            "messages" => Kind::Messages,
            "input" => Kind::Input,
            _ => Kind::Text,
        };
        Walk { prompt: self, kind }
    }
}

/// How a value is read into the prompt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Every string is text; numbers and keys are not.
    Text,
    /// A list of chat messages.
    Messages,
    /// One chat message (or Responses input item).
    Message,
    /// A message's `content`: a string, or a list of parts.
    Content,
    /// One content part.
    Part,
    /// Responses / embeddings `input`: a string, or a list of strings, token arrays or items.
    Input,
    /// An element of `input`'s list.
    InputItem,
    /// Token ids: each number is one token.
    TokenIds,
    /// A part of no known kind: a quarter of its strings' characters.
    Chars,
}

/// A seed that reads any JSON value into the prompt as `kind` says. It accepts every JSON
/// kind wherever it stands: the shape of a prompt is the service's to judge, and validation
/// must not fail a line because a message looks unusual.
pub(super) struct Walk<'p, 'a> {
    prompt: &'p mut Prompt<'a>,
    kind: Kind,
}

impl<'p, 'a> Walk<'p, 'a> {
    fn with(&mut self, kind: Kind) -> Walk<'_, 'a> {
        Walk {
            prompt: self.prompt,
            kind,
        }
    }
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for Walk<'_, 'a> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for Walk<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<(), E> {
        self.text(Cow::Borrowed(s));
        Ok(())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        self.text(Cow::Owned(s.to_owned()));
        Ok(())
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<(), E> {
        self.text(Cow::Owned(s));
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.number();
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.number();
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let element = match self.kind {
            Kind::Messages => Kind::Message,
            Kind::Content => Kind::Part,
            Kind::Input => Kind::InputItem,
            Kind::InputItem | Kind::TokenIds => Kind::TokenIds,
            // A list where a message or part should be: read its strings as text.
            Kind::Message | Kind::Part | Kind::Text => Kind::Text,
            Kind::Chars => Kind::Chars,
        };
        while seq.next_element_seed(self.with(element))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        match self.kind {
            Kind::Message | Kind::InputItem => {
                self.prompt.messages += 1;
                self.prompt.fixed += TOKENS_PER_MESSAGE;
                while let Some(key) = map.next_key::<Key>()? {
                    let kind = match key {
                        Key::Content => Kind::Content,
                        Key::Name => {
                            self.prompt.fixed += TOKENS_PER_NAME;
                            Kind::Text
                        }
                        // `type` ("message", "function_call_output"…) and ids are framing.
                        Key::Type | Key::Id => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                        _ => Kind::Text,
                    };
                    map.next_value_seed(self.with(kind))?;
                }
                Ok(())
            }
            Kind::Part => self.part(map),
            Kind::Chars => {
                while map.next_key::<IgnoredAny>()?.is_some() {
                    map.next_value_seed(self.with(Kind::Chars))?;
                }
                Ok(())
            }
            // An object where a string or list should be, and `tools`' definitions: their
            // strings are text (parameter names and descriptions reach the model as text).
            _ => {
                while let Some(key) = map.next_key::<Key>()? {
                    if key == Key::Type {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        map.next_value_seed(self.with(Kind::Text))?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl<'a> Walk<'_, 'a> {
    fn text(self, s: Cow<'a, str>) {
        if self.kind == Kind::Chars {
            self.prompt.fixed += (s.chars().count() as u64).div_ceil(4);
        } else {
            self.prompt.texts.push(s);
        }
    }

    fn number(self) {
        if self.kind == Kind::TokenIds {
            self.prompt.fixed += 1;
        }
    }

    /// One content part: `text` / `input_text` by the tokenizer, an image by its figure,
    /// anything else by the character rule. Which it is may only be known at its end (`type`
    /// need not come first), so the texts and characters are gathered aside until then.
    fn part<'de: 'a, A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut aside = Prompt::default();
        let mut kind = AnyStr(None);
        let mut image = false;
        let mut low_detail = false;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Type => kind = map.next_value()?,
                Key::Text => map.next_value_seed(Walk {
                    prompt: &mut aside,
                    kind: Kind::Text,
                })?,
                Key::ImageUrl => {
                    image = true;
                    low_detail |= map.next_value::<ImageUrl>()?.low;
                }
                Key::Detail => low_detail |= map.next_value::<AnyStr>()?.is("low"),
                _ => map.next_value_seed(Walk {
                    prompt: &mut aside,
                    kind: Kind::Chars,
                })?,
            }
        }
        let kind = kind.0.as_deref().unwrap_or("");
        if image || kind == "image_url" || kind == "input_image" {
            self.prompt.fixed += if low_detail {
                IMAGE_LOW_DETAIL
            } else {
                IMAGE_HIGH_DETAIL
            };
            self.prompt.fixed += aside.fixed;
        } else if matches!(kind, "text" | "input_text" | "output_text" | "refusal" | "") {
            self.prompt.texts.append(&mut aside.texts);
            self.prompt.fixed += aside.fixed;
        } else {
            // Audio, files: no tokenizer applies to their data; the characters say something.
            let chars: u64 = aside.texts.iter().map(|t| t.chars().count() as u64).sum();
            self.prompt.fixed += aside.fixed + chars.div_ceil(4);
        }
        Ok(())
    }
}

/// The keys the walk tells apart, read without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Content,
    Name,
    Type,
    /// `id`, `call_id`, `tool_call_id`: framing, not text.
    Id,
    Text,
    ImageUrl,
    Detail,
    Other,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Key, E> {
                Ok(match s {
                    "content" => Key::Content,
                    "name" => Key::Name,
                    "type" => Key::Type,
                    "id" | "call_id" | "tool_call_id" => Key::Id,
                    "text" => Key::Text,
                    "image_url" => Key::ImageUrl,
                    "detail" => Key::Detail,
                    _ => Key::Other,
                })
            }
        }
        d.deserialize_str(V)
    }
}

/// Any JSON value, kept only when it is a string (borrowed when it can be): a part's `type`
/// or an image's `detail`, which may be anything in a malformed line.
struct AnyStr<'de>(Option<Cow<'de, str>>);

impl<'de> serde::Deserialize<'de> for AnyStr<'de> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnyStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(Some(Cow::Borrowed(s))))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(Some(Cow::Owned(s.to_owned()))))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyStr<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnyStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyStr<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(AnyStr(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<AnyStr<'de>, E> {
                Ok(AnyStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl AnyStr<'_> {
    fn is(&self, s: &str) -> bool {
        self.0.as_deref() == Some(s)
    }
}

/// An `image_url` value: a URL string, or `{url, detail}`; whether it asks for low detail.
/// The URL (perhaps a long data URL) is skipped: it is not text to the model.
struct ImageUrl {
    low: bool,
}

impl<'de> serde::Deserialize<'de> for ImageUrl {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ImageUrl;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an image URL")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ImageUrl, A::Error> {
                let mut low = false;
                while let Some(key) = map.next_key::<Key>()? {
                    if key == Key::Detail {
                        low |= map.next_value::<AnyStr>()?.is("low");
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ImageUrl { low })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ImageUrl, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ImageUrl { low: false })
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<ImageUrl, E> {
                Ok(ImageUrl { low: false })
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<ImageUrl, E> {
                Ok(ImageUrl { low: false })
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<ImageUrl, E> {
                Ok(ImageUrl { low: false })
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<ImageUrl, E> {
                Ok(ImageUrl { low: false })
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<ImageUrl, E> {
                Ok(ImageUrl { low: false })
            }
            fn visit_unit<E: de::Error>(self) -> Result<ImageUrl, E> {
                Ok(ImageUrl { low: false })
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{Limits, Validator, test_support::check};
    use serde_json::{Value as Json, json};

    /// The estimate of a file of one request with `body`.
    fn estimate(body: Json) -> u64 {
        let line =
            json!({"custom_id": "a", "method": "POST", "url": "/chat/completions", "body": body});
        let r = check(format!("{line}\n"));
        assert!(r.is_ok(), "{:?}", r.problems);
        r.tokens
    }

    fn chat(model: &str, messages: Json) -> Json {
        json!({"model": model, "messages": messages})
    }

    #[test]
    fn chat_messages_count_as_openais_cookbook_counts_them() {
        // The cookbook's example conversation, counted by tiktoken-rs's own implementation of
        // the cookbook rule for the model families the deployments are named after.
        let messages = [
            (
                "system",
                "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
                None,
            ),
            (
                "system",
                "New synergies will help drive top-line growth.",
                Some("example_user"),
            ),
            (
                "system",
                "Things working well together will increase revenue.",
                Some("example_assistant"),
            ),
            (
                "user",
                "This late pivot means we don't have time to boil the ocean for the client deliverable.",
                None,
            ),
        ];
        let ours: Vec<Json> = messages
            .iter()
            .map(|(role, content, name)| match name {
                Some(n) => json!({"role": role, "content": content, "name": n}),
                None => json!({"role": role, "content": content}),
            })
            .collect();
        let theirs: Vec<tiktoken_rs::ChatCompletionRequestMessage> = messages
            .iter()
            .map(
                |(role, content, name)| tiktoken_rs::ChatCompletionRequestMessage {
                    role: role.to_string(),
                    content: Some(content.to_string()),
                    name: name.map(str::to_string),
                    ..Default::default()
                },
            )
            .collect();
        for (deployment, model) in [("gpt-4o-batch", "gpt-4o"), ("gpt-4-batch", "gpt-4")] {
            let expected = tiktoken_rs::num_tokens_from_messages(model, &theirs).unwrap() as u64;
            assert_eq!(
                estimate(chat(deployment, json!(ours))),
                expected,
                "{deployment}"
            );
        }
    }

    #[test]
    fn the_deployment_name_picks_the_family_tokenizer() {
        for (name, encoding) in [
            ("gpt-4o-batch", Encoding::O200kBase),
            ("gpt-4o-mini-2024-07-18", Encoding::O200kBase),
            ("gpt-4.1-batch", Encoding::O200kBase),
            ("gpt-5-mini", Encoding::O200kBase),
            ("o3-mini-batch", Encoding::O200kBase),
            ("GPT-4O-Batch", Encoding::O200kBase),
            ("gpt-4-batch", Encoding::Cl100kBase),
            ("gpt-4-turbo-2024-04-09", Encoding::Cl100kBase),
            ("gpt-35-turbo-batch", Encoding::Cl100kBase),
            ("my-deployment", Encoding::O200kBase),
        ] {
            assert_eq!(Encoding::for_deployment(name), encoding, "{name}");
        }
        // The two really differ: cl100k_base splits this text into more tokens.
        let text = "これは日本語の文章です。トークンの数は符号化によって違います。";
        assert!(Encoding::Cl100kBase.count(text) > Encoding::O200kBase.count(text));
        let r = |model| estimate(chat(model, json!([{"role": "user", "content": text}])));
        assert_eq!(
            r("gpt-4o-batch"),
            3 + 1 + Encoding::O200kBase.count(text) + 3
        );
        assert_eq!(
            r("gpt-4-batch"),
            3 + 1 + Encoding::Cl100kBase.count(text) + 3
        );
    }

    #[test]
    fn only_the_input_counts_not_the_completion_budget() {
        let m = json!([{"role": "user", "content": "hello world"}]);
        let base = estimate(chat("gpt-4o-batch", m.clone()));
        // 3 framing + "user" 1 + "hello world" 2 + 3 priming.
        assert_eq!(base, 9);
        let mut with = chat("gpt-4o-batch", m);
        with["max_tokens"] = json!(4000);
        with["max_completion_tokens"] = json!(4000);
        with["temperature"] = json!(0.2);
        assert_eq!(estimate(with), base);
        // `model` after the messages: the same tokenizer decides.
        let line = r#"{"custom_id":"a","method":"POST","url":"/chat/completions","body":{"messages":[{"role":"user","content":"hello world"}],"model":"gpt-4o-batch"}}"#;
        assert_eq!(check(line).tokens, 9);
    }

    #[test]
    fn images_count_a_fixed_figure_and_their_urls_are_not_text() {
        let data_url = format!("data:image/png;base64,{}", "iVBORw0KGgo".repeat(10_000));
        let part = |detail: Option<&str>| {
            let mut url = json!({"url": data_url});
            if let Some(d) = detail {
                url["detail"] = json!(d);
            }
            chat(
                "gpt-4o-batch",
                json!([{"role": "user", "content": [
                    {"type": "text", "text": "hello world"},
                    {"type": "image_url", "image_url": url}
                ]}]),
            )
        };
        assert_eq!(estimate(part(Some("low"))), 9 + IMAGE_LOW_DETAIL);
        assert_eq!(estimate(part(Some("high"))), 9 + IMAGE_HIGH_DETAIL);
        assert_eq!(estimate(part(None)), 9 + IMAGE_HIGH_DETAIL);
        // Responses style: `input_image` with `detail` beside the URL.
        let body = json!({"model": "gpt-4o-batch", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "hello world"},
            {"type": "input_image", "image_url": data_url, "detail": "low"}
        ]}]});
        assert_eq!(estimate(body), 9 + IMAGE_LOW_DETAIL);
        // Another kind of part: a quarter of its strings' characters.
        let body = chat(
            "gpt-4o-batch",
            json!([{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "A".repeat(400), "format": "wav"}}
            ]}]),
        );
        assert_eq!(estimate(body), 3 + 1 + 101 + 3);
    }

    #[test]
    fn responses_and_embeddings_count_their_input_fields() {
        let o = |t: &str| Encoding::O200kBase.count(t);
        let body =
            json!({"model": "gpt-4o-batch", "instructions": "Be brief.", "input": "hello world"});
        assert_eq!(estimate(body), o("Be brief.") + 2);
        let body = json!({"model": "text-embedding-3-small", "input": ["hello world", "hello"]});
        let cl = |t: &str| Encoding::Cl100kBase.count(t);
        assert_eq!(estimate(body), cl("hello world") + cl("hello"));
        let body = json!({"model": "emb", "input": [[1, 2, 3], [4, 5]]});
        assert_eq!(estimate(body), 5, "token arrays count their length");
        // Tool definitions reach the model as text.
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city"}}]);
        let mut body = chat(
            "gpt-4o-batch",
            json!([{"role": "user", "content": "hello world"}]),
        );
        body["tools"] = tools;
        assert_eq!(
            estimate(body),
            9 + o("get_weather") + o("Weather in a city")
        );
    }

    #[test]
    fn odd_shapes_are_counted_leniently_and_never_fail_validation() {
        for body in [
            json!({"model": "d", "messages": "just a string"}),
            json!({"model": "d", "messages": [42, null, true, ["x"]]}),
            json!({"model": "d", "messages": [{"role": "user", "content": {"type": 7}}]}),
            json!({"model": "d", "messages": [{"content": [{"type": 1, "image_url": [1]}, "plain"]}]}),
            json!({"model": "d", "input": {"text": "x"}, "prompt": ["a", 1]}),
        ] {
            estimate(body);
        }
    }

    #[test]
    fn counting_on_threads_gives_the_same_report_as_counting_in_line() {
        // Enough text for many batches, in both encodings (the model changes mid-file: a
        // finding, but the lines are still counted), with escapes, non-ASCII text and parts.
        let words = [
            "hello",
            "World",
            "café",
            "日本語",
            "don't",
            "12345",
            "\\n",
            "\\\"q\\\"",
            "😀",
        ];
        let mut f = String::new();
        for i in 0..3000usize {
            let model = if i < 2000 {
                "gpt-4o-batch"
            } else {
                "gpt-4-batch"
            };
            let text: Vec<&str> = (0..(50 + i % 200))
                .map(|j| words[(i * 7 + j * 13) % words.len()])
                .collect();
            let text = text.join(if i % 3 == 0 { " " } else { "  " });
            let line = format!(
                r#"{{"custom_id": "r{i}", "method": "POST", "url": "/chat/completions", "body": {{"model": "{model}", "messages": [{{"role": "system", "content": "Be brief."}}, {{"role": "user", "name": "u{i}", "content": [{{"type": "text", "text": "{text}"}}, {{"type": "image_url", "image_url": {{"url": "x", "detail": "low"}}}}]}}]}}}}"#
            );
            f.push_str(&line);
            f.push('\n');
        }
        assert!(f.len() > 4 * BATCH_BYTES);
        let in_line = check(&f);
        assert!(in_line.tokens > 0);
        for threads in [1, 3] {
            let mut v = Validator::new(Limits::default()).counting_on_threads(threads);
            for chunk in f.as_bytes().chunks(70_000) {
                v.feed(chunk);
            }
            assert_eq!(v.finish(), in_line, "{threads} threads");
        }
        // And the total is tiktoken's own count of every text, plus the framing.
        let mut expected = 0;
        for (i, line) in f.lines().enumerate() {
            let v: Json = serde_json::from_str(line).unwrap();
            let e = if i < 2000 {
                Encoding::O200kBase
            } else {
                Encoding::Cl100kBase
            };
            let m = &v["body"]["messages"];
            expected += 2 * TOKENS_PER_MESSAGE + REPLY_PRIMING + TOKENS_PER_NAME + IMAGE_LOW_DETAIL;
            for t in [
                &m[0]["role"],
                &m[0]["content"],
                &m[1]["role"],
                &m[1]["name"],
                &m[1]["content"][0]["text"],
            ] {
                expected += e.count(t.as_str().unwrap());
            }
        }
        assert_eq!(in_line.tokens, expected);
    }

    #[test]
    fn parts_carry_their_share_of_the_tokens() {
        let line = |i: u32| {
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/chat/completions",
                   "body": {"model": "gpt-4o-batch", "messages": [{"role": "user", "content": "hello world"}]}})
            .to_string()
                + "\n"
        };
        let text: String = (0..25).map(line).collect();
        let mut v = Validator::splitting(Limits {
            max_lines: 10,
            ..Limits::default()
        });
        v.feed(text.as_bytes());
        let r = v.finish();
        assert_eq!(r.tokens, 25 * 9);
        let per_part: Vec<u64> = r.parts.iter().map(|p| p.tokens).collect();
        assert_eq!(per_part, [90, 90, 45]);
        assert_eq!(r.encoding, Some(Encoding::O200kBase));
    }
}
