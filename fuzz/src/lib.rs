//! The fuzz targets' bodies, shared by `cargo fuzz` (libFuzzer, nightly) and the stable
//! bounded run in `tests/fuzz_stable.rs`, which includes this file as a module.
//!
//! Each takes arbitrary bytes and panics when an invariant breaks:
//! - [`validator`]: the line validator never panics, and its report is the same whatever the
//!   chunk boundaries, whichever entry point, and is self-consistent;
//! - [`event_decoder`]: the host-payload and event decoder never panics, and an event decodes
//!   to the same thing whether the host sends it as an object, a JSON string or base64.

use aoai_blob_batch::{
    protocol::{DecodeError, InvocationRequest, StorageEvent, decode_events, decode_timer},
    validate::{Limits, Report, Validator, validate_reader},
};
use base64::Engine;
use serde_json::Value;

/// Limits small enough that arbitrary inputs reach them (problem list full, too many lines,
/// file and line too large), next to the service's real ones.
pub fn fuzz_limits() -> [Limits; 2] {
    [
        Limits::default(),
        Limits {
            max_lines: 7,
            max_bytes: 700,
            max_line_bytes: 300,
            max_problems: 3,
        },
    ]
}

fn whole(data: &[u8], limits: Limits) -> Report {
    let mut v = Validator::new(limits);
    v.feed(data);
    v.finish()
}

/// Chunk lengths drawn from the data itself, so one input always splits the same way.
fn chunked(data: &[u8], limits: Limits, mut state: u64) -> Report {
    let mut v = Validator::new(limits);
    let mut rest = data;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        // Mostly tiny pieces (splitting UTF-8 sequences, `\r\n`, a BOM), sometimes empty.
        let n = match state % 8 {
            0 => 0,
            1..=5 => (state >> 8) as usize % 4,
            _ => (state >> 8) as usize % 64,
        };
        let n = n.min(rest.len());
        v.feed(&rest[..n]);
        rest = &rest[n..];
    }
    v.finish()
}

fn seed_of(data: &[u8]) -> u64 {
    data.iter().fold(0x9E37_79B9_7F4A_7C15, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    }) | 1
}

/// A reader that hands out uneven pieces (1 to 97 bytes) per call.
struct Trickle<'a>(&'a [u8], usize);

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.1 = (self.1 * 7 + 3) % 97 + 1;
        let n = self.1.min(buf.len()).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// Fuzz target: the line validator.
pub fn validator(data: &[u8]) {
    for limits in fuzz_limits() {
        let report = whole(data, limits);
        assert_eq!(
            report,
            chunked(data, limits, seed_of(data)),
            "chunk boundaries changed the report"
        );
        if data.len() <= 512 {
            let mut v = Validator::new(limits);
            for b in data {
                v.feed(std::slice::from_ref(b));
            }
            assert_eq!(
                report,
                v.finish(),
                "byte-by-byte feeding changed the report"
            );
        }
        // The reader entry point (a thread and 1 MiB buffers per call): one input in sixteen.
        if data.len().is_multiple_of(16) {
            let from_reader = validate_reader(Trickle(data, 0), limits).unwrap();
            assert_eq!(report, from_reader, "validate_reader disagrees with feed");
        }
        if let Err(e) = check_report(data, limits, &report) {
            panic!("{e}");
        }
    }
}

/// The invariants of one report of `data`: `Err` names the first that fails.
pub fn check_report(data: &[u8], limits: Limits, r: &Report) -> Result<(), String> {
    let fail = |what: String| Err(format!("{what}; report {r:?}"));
    if r.bytes != data.len() as u64 {
        return fail(format!("{} bytes reported for {}", r.bytes, data.len()));
    }
    if r.problems.len() > limits.max_problems {
        return fail("more problems listed than the limit".into());
    }
    let physical = data.split(|&b| b == b'\n').count() as u64;
    if r.lines > physical {
        return fail(format!("{} requests in {physical} lines", r.lines));
    }
    for p in &r.problems {
        if p.line.is_some_and(|line| !(1..=physical).contains(&line)) {
            return fail(format!(
                "a problem outside the file's {physical} lines: {p:?}"
            ));
        }
        if p.code.is_empty() || p.message.is_empty() {
            return fail(format!("a problem without code or message: {p:?}"));
        }
    }
    if !r.is_ok() {
        return Ok(());
    }
    if r.lines == 0 || r.url.is_none() || r.model.is_none() {
        return fail("accepted without a request, url or model".into());
    }
    if r.lines > limits.max_lines || r.bytes > limits.max_bytes {
        return fail("accepted past the limits".into());
    }
    if std::str::from_utf8(data).is_err() || data.starts_with(b"\xEF\xBB\xBF") {
        return fail("accepted a file that is not UTF-8 without BOM".into());
    }
    // Every non-blank line of an accepted file is a request of the file's url and model, with
    // its own custom_id.
    let mut ids = std::collections::HashSet::new();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            return fail("accepted a line that is not JSON".into());
        };
        let Some(id) = v["custom_id"].as_str() else {
            return fail("accepted a line without a custom_id".into());
        };
        if !ids.insert(id.to_string()) {
            return fail(format!("accepted a duplicate custom_id {id:?}"));
        }
        if v["method"] != "POST"
            || v["url"].as_str() != r.url.as_deref()
            || v["body"]["model"].as_str() != r.model.as_deref()
        {
            return fail(format!(
                "accepted a line of another method, url or model: {v}"
            ));
        }
    }
    if ids.len() as u64 != r.lines {
        return fail(format!("{} requests counted, {} found", r.lines, ids.len()));
    }
    Ok(())
}

/// Fuzz target: the host payload (`InvocationRequest`) and the event decoder.
pub fn event_decoder(data: &[u8]) {
    let Ok(request) = serde_json::from_slice::<InvocationRequest>(data) else {
        return;
    };
    let decoded = decode_events(&request, "event");
    let _ = decode_timer(&request, "timer");
    if let Ok(events) = &decoded {
        assert!(!events.is_empty(), "Ok with no event");
        for e in events {
            if let StorageEvent::BlobCreated(c) = e {
                assert!(!c.url.is_empty(), "a BlobCreated event without a URL");
            }
        }
    }
    // The host's encodings of the same event decode alike: an object or array, the same as a
    // JSON string of it, or base64 of that.
    let Some(raw @ (Value::Object(_) | Value::Array(_))) = request.data.get("event") else {
        return;
    };
    let text = raw.to_string();
    for encoded in [
        Value::String(text.clone()),
        Value::String(base64::engine::general_purpose::STANDARD.encode(&text)),
    ] {
        let mut again = request.clone();
        again.data.insert("event".into(), encoded);
        let other = decode_events(&again, "event");
        assert_eq!(
            normalise(&decoded),
            normalise(&other),
            "the encoding changed the result"
        );
    }
}

fn normalise(r: &Result<Vec<StorageEvent>, DecodeError>) -> Result<Vec<StorageEvent>, String> {
    match r {
        Ok(events) => Ok(events.clone()),
        Err(e) => Err(e.to_string()),
    }
}

/// Seed inputs for the decoder: what the host sends, in each of its encodings.
pub fn event_seeds() -> Vec<Vec<u8>> {
    let event = serde_json::json!({
        "topic": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/a",
        "subject": "/blobServices/default/containers/batch-input/blobs/x.jsonl",
        "eventType": "Microsoft.Storage.BlobCreated",
        "id": "831e1650-001e-001b-66ab-eeb76e069631",
        "data": {
            "api": "PutBlockList", "eTag": "\"0x8D4BCC2E4835CD0\"", "contentLength": 524288,
            "blobType": "BlockBlob",
            "url": "https://a.blob.core.windows.net/batch-input/x.jsonl"
        },
        "dataVersion": "", "metadataVersion": "1"
    });
    let mut cloud = event.clone();
    let obj = cloud.as_object_mut().unwrap();
    let ty = obj.remove("eventType").unwrap();
    obj.insert("type".into(), ty);
    obj.insert("specversion".into(), "1.0".into());
    let text = event.to_string();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&text);
    let wrap = |e: Value| {
        serde_json::to_vec(&serde_json::json!({
            "Data": {"event": e},
            "Metadata": {"sys": {"MethodName": "function-trigger"}}
        }))
        .unwrap()
    };
    vec![
        wrap(event.clone()),
        wrap(Value::String(text.clone())),
        wrap(Value::String(Value::String(text).to_string())),
        wrap(Value::String(b64)),
        wrap(serde_json::json!([event.clone(), cloud.clone()])),
        wrap(cloud),
        br#"{"Data":{"timer":{"Schedule":{"AdjustForDST":true},"IsPastDue":true}},"Metadata":{}}"#
            .to_vec(),
        br#"{"Data":{"event":"%%%"},"Metadata":{}}"#.to_vec(),
        br#"{"Data":{}}"#.to_vec(),
    ]
}
