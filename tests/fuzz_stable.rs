//! The fuzz targets of `fuzz/` on the stable toolchain: a bounded, reproducible run over the
//! corpus and pseudo-random mutations of it (fixed seed), asserting what the targets assert
//! (no panic; the validator's report is the same whatever the chunk boundaries; an event
//! decodes alike in every host encoding). `cargo +nightly fuzz run <target>` runs the same
//! functions under libFuzzer, without a bound (fuzz/README.md).
//!
//! `FUZZ_ITERATIONS` sets the mutations per target (default 5,000); `FUZZ_SEED` the seed.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::Path;

use aoai_blob_batch::{
    protocol::{InvocationRequest, decode_events},
    validate::{Limits, Validator},
};

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Fragments worth inserting: the validator's and decoder's delimiters and edge cases.
const TOKENS: &[&[u8]] = &[
    b"\n",
    b"\r\n",
    b"\r",
    b"\xEF\xBB\xBF",
    b"\xFF",
    b"\xC3",
    b"\xE2\x82",
    b"\xF0\x9F\x98",
    b"\x00",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b",",
    b":",
    b" ",
    b"\"custom_id\"",
    b"\"method\"",
    b"\"POST\"",
    b"\"url\"",
    b"\"/chat/completions\"",
    b"\"/v1/responses\"",
    b"\"body\"",
    b"\"model\"",
    b"null",
    b"true",
    b"1e999",
    b"-0",
    b"\"eventType\"",
    b"\"type\"",
    b"\"Microsoft.Storage.BlobCreated\"",
    b"\"data\"",
    b"\"url\":\"http://x/y\"",
    b"\"Data\"",
    b"\"event\"",
    b"\"eyJ\"",
    b"\"{}\"",
    b"\"[]\"",
];

/// A mutation of the JSON tree: a node re-encoded as the host may (a JSON string of it, base64
/// of that), or replaced, or a key dropped.
fn mutate_json(rng: &mut Rng, v: &mut serde_json::Value) {
    use base64::Engine;
    use serde_json::Value;
    let children = match v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if children > 0 && rng.below(3) > 0 {
        let i = rng.below(children);
        match v {
            Value::Object(m) => {
                if rng.below(6) == 0 {
                    let key = m.keys().nth(i).unwrap().clone();
                    m.remove(&key);
                } else {
                    mutate_json(rng, m.values_mut().nth(i).unwrap());
                }
            }
            Value::Array(a) => mutate_json(rng, &mut a[i]),
            _ => unreachable!(),
        }
        return;
    }
    let text = v.to_string();
    *v = match rng.below(9) {
        0 => Value::String(text),
        1 => Value::String(base64::engine::general_purpose::STANDARD.encode(text)),
        2 => Value::Null,
        3 => Value::from(rng.next() as i64),
        4 => Value::String(String::new()),
        5 => Value::Array(vec![v.take()]),
        6 => serde_json::json!({"eventType": "Microsoft.Storage.BlobCreated", "data": v.take()}),
        7 => Value::String("Microsoft.Storage.BlobCreated".into()),
        _ => Value::Object(Default::default()),
    };
}

/// Mutates `input`: a JSON-tree mutation `json_percent` % of the time when it is JSON, else
/// one to four byte-level ones.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>, json_percent: usize) {
    if rng.below(100) < json_percent
        && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(input)
    {
        mutate_json(rng, &mut v);
        *input = serde_json::to_vec(&v).unwrap();
        return;
    }
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(input.len() + 1);
        match rng.below(8) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let end = (at + 1 + rng.below(16)).min(input.len());
                input.drain(at.min(end)..end);
            }
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                input.splice(at..at, t.iter().copied());
            }
            3 if !input.is_empty() => {
                // Repeat a slice (duplicate lines, nesting).
                let from = rng.below(input.len());
                let len = 1 + rng.below((input.len() - from).min(200));
                let piece = input[from..from + len].to_vec();
                input.splice(at..at, piece);
            }
            4 => {
                // Splice in part of another seed.
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let from = rng.below(other.len());
                    let len = 1 + rng.below((other.len() - from).min(300));
                    input.splice(at..at, other[from..from + len].iter().copied());
                }
            }
            5 => input.truncate(at),
            6 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            _ => input.insert(at, b"\n{}\":,"[rng.below(6)]),
        }
    }
    input.truncate(64 * 1024);
}

fn iterations() -> usize {
    std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5EED_F00D)
}

/// Runs `target` over the seeds, then over `iterations()` mutations; a panic names the input
/// (written to target/fuzz-stable-failure-<name>) so it can be replayed. `observe` sees every
/// input and says whether it got somewhere new; those join the pool mutations start from (a
/// poor man's coverage feedback).
fn run(
    name: &str,
    seeds: Vec<Vec<u8>>,
    target: fn(&[u8]),
    json_percent: usize,
    mut observe: impl FnMut(&[u8]) -> bool,
) -> usize {
    let mut rng = Rng(seed());
    let check = |input: &[u8]| {
        if std::panic::catch_unwind(|| target(input)).is_err() {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target")
                .join(format!("fuzz-stable-failure-{name}"));
            let _ = std::fs::write(&path, input);
            panic!(
                "{name}: invariant broken; input saved to {}",
                path.display()
            );
        }
    };
    for s in &seeds {
        check(s);
        let _ = observe(s);
    }
    let mut pool = seeds.clone();
    let mut input = Vec::new();
    for i in 0..iterations() {
        // Mostly keep mutating the last input (reaching deeper), sometimes restart from the pool.
        if i % 4 == 0 || input.is_empty() {
            input = pool[rng.below(pool.len())].clone();
        }
        mutate(&mut rng, &seeds, &mut input, json_percent);
        check(&input);
        if observe(&input) {
            if pool.len() < 1000 {
                pool.push(input.clone());
            } else {
                let i = rng.below(pool.len());
                pool[i] = input.clone();
            }
        }
    }
    seeds.len() + iterations()
}

fn corpus() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join("tests/inputs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files.push(root.join("samples/test.jsonl"));
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn validator_target() {
    let seeds = corpus();
    assert!(seeds.len() >= 50);
    // How far the inputs got: the distinct first problems they met, and how many passed.
    let mut codes = std::collections::BTreeSet::new();
    let mut accepted = 0;
    let n = run("validator", seeds, targets::validator, 25, |input| {
        let mut v = Validator::new(Limits::default());
        v.feed(input);
        let r = v.finish();
        match r.problems.first() {
            Some(p) => codes.insert(p.code.clone()),
            None => {
                accepted += 1;
                true
            }
        }
    });
    assert!(
        codes.len() >= 12,
        "the mutations reach few rules: {codes:?}"
    );
    println!(
        "FIGURE fuzz-validator: {n} inputs (corpus + mutations, seed {:#x}), 0 panics, 0 \
         reports changed by chunking; {} distinct first problems reached, {accepted} inputs \
         accepted",
        seed(),
        codes.len()
    );
}

#[test]
fn event_decoder_target() {
    let mut seeds = targets::event_seeds();
    // Events are JSON: the validator corpus's lines make odd payloads too.
    seeds.extend(corpus().into_iter().take(4));
    let (mut payloads, mut decoded) = (0, 0);
    let mut outcomes = std::collections::BTreeSet::new();
    let n = run(
        "event_decoder",
        seeds,
        targets::event_decoder,
        80,
        |input| {
            let Ok(r) = serde_json::from_slice::<InvocationRequest>(input) else {
                return false;
            };
            payloads += 1;
            let events = decode_events(&r, "event");
            let ok = events.is_ok();
            decoded += usize::from(ok);
            outcomes.insert(match events {
                Ok(e) => format!("{} event(s)", e.len()),
                Err(e) => format!("{e:?}").chars().take(24).collect(),
            });
            // What decodes is worth mutating further.
            ok
        },
    );
    assert!(
        payloads > n / 4 && decoded > n / 20,
        "{payloads} payloads, {decoded} decoded"
    );
    println!(
        "FIGURE fuzz-decoder: {n} inputs (host payload seeds + byte and JSON-tree mutations, \
         seed {:#x}), 0 panics, every encoding decoded alike; {payloads} were host payloads, \
         {decoded} decoded to events, {} distinct outcomes",
        seed(),
        outcomes.len()
    );
}

/// The invariants can fail: a report that does not belong to its file is caught.
#[test]
fn the_checks_are_not_vacuous() {
    let limits = Limits::default();
    let good =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/test.jsonl")).unwrap();
    let mut v = Validator::new(limits);
    v.feed(&good);
    let report = v.finish();
    assert!(report.is_ok());
    assert_eq!(targets::check_report(&good, limits, &report), Ok(()));
    // The same "accepted" report for a file with a duplicate id, or a byte more, is wrong.
    let mut doubled = good.clone();
    doubled.extend_from_slice(good.split(|&b| b == b'\n').next().unwrap());
    for wrong in [doubled, [good.as_slice(), b" "].concat()] {
        assert!(
            targets::check_report(&wrong, limits, &report).is_err(),
            "an inconsistent report passed the checks"
        );
    }
}
