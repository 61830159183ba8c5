//! The Functions host's custom-handler payloads, and the storage events inside them.
//!
//! Nothing here knows about batches: these types turn the host's JSON into plain values
//! (`BlobCreated`, a timer tick) so the core could run under another trigger source.
//! The host's encodings vary by version and binding (an object, a JSON string holding JSON,
//! base64 of JSON; see shared/reference/functions-research.md §1.4, §2c), so decoding is lenient.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What the host POSTs to `/{FunctionName}`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct InvocationRequest {
    #[serde(rename = "Data", default)]
    pub data: Map<String, Value>,
    #[serde(rename = "Metadata", default)]
    pub metadata: Map<String, Value>,
}

/// What the handler answers. The host treats any non-2xx as a failed invocation and discards
/// the body, and hangs on an empty 200, so every answer is this object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InvocationResponse {
    #[serde(rename = "Outputs")]
    pub outputs: Map<String, Value>,
    #[serde(rename = "Logs")]
    pub logs: Vec<String>,
    #[serde(rename = "ReturnValue")]
    pub return_value: Value,
}

impl InvocationResponse {
    pub fn with_logs(logs: Vec<String>) -> Self {
        Self {
            logs,
            ..Default::default()
        }
    }
}

/// The header that carries the host's invocation id, for log correlation.
pub const INVOCATION_ID_HEADER: &str = "x-azure-functions-invocationid";

/// A storage event, reduced to what the handler acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageEvent {
    BlobCreated(BlobCreated),
    /// A blob was deleted: its job, if it has one still running, is cancelled.
    BlobDeleted(BlobDeleted),
    /// Any other event type: acknowledged and ignored.
    Other {
        event_type: String,
        id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobCreated {
    pub id: String,
    /// The blob URL as the event gives it. Untrusted: checked against the configured account
    /// before anything is fetched.
    pub url: String,
    pub etag: Option<String>,
    pub content_length: Option<u64>,
    pub subject: Option<String>,
    /// The storage operation that raised the event (`data.api`): `PutBlob`, `PutBlockList`,
    /// `CopyBlob`, `FlushWithClose`, `CreateFile`, …
    pub api: Option<String>,
}

/// `Microsoft.Storage.BlobDeleted`. The event names the blob but, unlike BlobCreated, carries
/// no ETag (event-schema-blob-storage), so which version went is worked out from the jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobDeleted {
    pub id: String,
    /// Untrusted, as for BlobCreated.
    pub url: String,
}

/// The `data.api` values that announce a file before anything is written to it, per the Event
/// Grid blob storage event schema
/// (https://learn.microsoft.com/azure/event-grid/event-schema-blob-storage): on an account with
/// a hierarchical namespace, `CreateFile` (Path - Create makes the file empty, with
/// `contentLength` 0; Append and Flush write it, and the flush that closes it raises
/// `FlushWithClose`, "only after data is fully committed"), and over SFTP, `SftpCreate` (an
/// empty blob made when the file is opened; `SftpCommit` follows when it is written).
const OPENING_APIS: [&str; 2] = ["CreateFile", "SftpCreate"];

impl BlobCreated {
    /// The operation, when this event announces a file that is still empty and being written:
    /// acting on it would judge an empty file. The event of the finished file comes later
    /// (and if the writer never closes the file, the timer's sweep finds it).
    pub fn opens_file(&self) -> Option<&str> {
        self.api.as_deref().filter(|api| OPENING_APIS.contains(api))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("the invocation has no `{0}` binding in Data")]
    MissingBinding(String),
    #[error("the event is not JSON, a JSON string, or base64 of JSON")]
    Undecodable,
    #[error("the event has no event type (`eventType` or `type`)")]
    NoEventType,
    #[error("the blob event has no `data.url`")]
    NoUrl,
    #[error("the delivery holds no event")]
    Empty,
}

const BLOB_CREATED: &str = "Microsoft.Storage.BlobCreated";
const BLOB_DELETED: &str = "Microsoft.Storage.BlobDeleted";

/// Decodes the events of an `eventGridTrigger` invocation whose binding is named `binding`.
/// The host sends one event per invocation, but an array is accepted too.
pub fn decode_events(
    request: &InvocationRequest,
    binding: &str,
) -> Result<Vec<StorageEvent>, DecodeError> {
    let raw = request
        .data
        .get(binding)
        .ok_or_else(|| DecodeError::MissingBinding(binding.to_string()))?;
    let value = unwrap_encodings(raw.clone()).ok_or(DecodeError::Undecodable)?;
    let events = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    if events.is_empty() {
        return Err(DecodeError::Empty);
    }
    events
        .into_iter()
        .map(|e| decode_one(unwrap_encodings(e).ok_or(DecodeError::Undecodable)?))
        .collect()
}

/// Peels JSON-in-a-string and base64-of-JSON layers until an object or array appears.
/// Bounded: a few layers are all the host ever adds.
fn unwrap_encodings(mut value: Value) -> Option<Value> {
    for _ in 0..4 {
        match value {
            Value::Object(_) | Value::Array(_) => return Some(value),
            Value::String(text) => {
                let trimmed = text.trim();
                value = match serde_json::from_str::<Value>(trimmed) {
                    Ok(v) => v,
                    Err(_) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(trimmed)
                            .ok()?;
                        serde_json::from_slice::<Value>(&bytes).ok()?
                    }
                };
            }
            _ => return None,
        }
    }
    None
}

fn decode_one(event: Value) -> Result<StorageEvent, DecodeError> {
    let obj = event.as_object().ok_or(DecodeError::Undecodable)?;
    // Event Grid schema says `eventType`; CloudEvents 1.0 says `type`.
    let event_type = str_field(obj, "eventType")
        .or_else(|| str_field(obj, "type"))
        .ok_or(DecodeError::NoEventType)?;
    let id = str_field(obj, "id").unwrap_or_default();
    if event_type != BLOB_CREATED && event_type != BLOB_DELETED {
        return Ok(StorageEvent::Other { event_type, id });
    }
    let data = obj
        .get("data")
        .cloned()
        .and_then(unwrap_encodings)
        .unwrap_or(Value::Null);
    let data = data.as_object().cloned().unwrap_or_default();
    let url = str_field(&data, "url").ok_or(DecodeError::NoUrl)?;
    if event_type == BLOB_DELETED {
        return Ok(StorageEvent::BlobDeleted(BlobDeleted { id, url }));
    }
    Ok(StorageEvent::BlobCreated(BlobCreated {
        id,
        url,
        etag: str_field(&data, "eTag").or_else(|| str_field(&data, "etag")),
        content_length: data.get("contentLength").and_then(Value::as_u64),
        subject: str_field(obj, "subject"),
        api: str_field(&data, "api"),
    }))
}

fn str_field(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .filter(|s| !s.is_empty())
}

/// The timer binding's value, for logging (`IsPastDue` tells a missed schedule).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TimerInfo {
    #[serde(rename = "IsPastDue", default)]
    pub is_past_due: bool,
}

pub fn decode_timer(request: &InvocationRequest, binding: &str) -> TimerInfo {
    request
        .data
        .get(binding)
        .cloned()
        .and_then(unwrap_encodings)
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// An HTTP trigger's request as the host passes it in `Data.{binding}` when it does not
/// forward the request itself (`enableForwardingHttpRequest` off): azure-functions-host
/// `HttpRequestExtensions.GetRequestAsJObject` gives `Url`, `Method`, `Query`, `Headers`
/// (name → list of values) and `Body` (the body read as a string; base64 for
/// `application/octet-stream`). The body is then text the host decoded, not the bytes
/// that were sent, which is why `host.json` has the host forward the request instead.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpRequestData {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequestData {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Decodes the HTTP trigger binding `binding` of an invocation.
pub fn decode_http_request(
    request: &InvocationRequest,
    binding: &str,
) -> Result<HttpRequestData, DecodeError> {
    let raw = request
        .data
        .get(binding)
        .ok_or_else(|| DecodeError::MissingBinding(binding.to_string()))?;
    let value = unwrap_encodings(raw.clone()).ok_or(DecodeError::Undecodable)?;
    let obj = value.as_object().ok_or(DecodeError::Undecodable)?;
    let field = |name: &str| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    };
    let mut headers = Vec::new();
    if let Some(Value::Object(map)) = field("Headers") {
        for (name, values) in map {
            match values {
                Value::String(v) => headers.push((name.clone(), v.clone())),
                Value::Array(vs) => headers.extend(
                    vs.iter()
                        .filter_map(Value::as_str)
                        .map(|v| (name.clone(), v.to_string())),
                ),
                _ => {}
            }
        }
    }
    let body = match field("Body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) => text.clone().into_bytes(),
        // An older host parsed a JSON body: only its re-serialisation is left (a signature
        // over the original bytes will then not match, and says so).
        Some(other) => other.to_string().into_bytes(),
    };
    Ok(HttpRequestData { headers, body })
}

/// The value of an `http` output binding in `Outputs`: the response the host sends.
pub fn http_output(status: u16, body: &str) -> Value {
    serde_json::json!({
        "statusCode": status,
        "body": body,
        "headers": { "Content-Type": "text/plain; charset=utf-8" },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn blob_event() -> Value {
        // The documented BlobCreated event (Event Grid schema), event-schema-blob-storage.md.
        json!({
            "topic": "/subscriptions/s/resourceGroups/Storage/providers/Microsoft.Storage/storageAccounts/my-storage-account",
            "subject": "/blobServices/default/containers/batch-input/blobs/new-file.jsonl",
            "eventType": "Microsoft.Storage.BlobCreated",
            "eventTime": "2017-06-26T18:41:00.9584103Z",
            "id": "831e1650-001e-001b-66ab-eeb76e069631",
            "data": {
                "api": "PutBlockList",
                "eTag": "\"0x8D4BCC2E4835CD0\"",
                "contentType": "text/plain",
                "contentLength": 524288,
                "blobType": "BlockBlob",
                "url": "https://my-storage-account.blob.core.windows.net/batch-input/new-file.jsonl",
                "sequencer": "00000000000004420000000000028963"
            },
            "dataVersion": "",
            "metadataVersion": "1"
        })
    }

    fn request_with(event: Value) -> InvocationRequest {
        InvocationRequest {
            data: [("event".to_string(), event)].into_iter().collect(),
            metadata: Map::new(),
        }
    }

    fn expected() -> StorageEvent {
        StorageEvent::BlobCreated(BlobCreated {
            id: "831e1650-001e-001b-66ab-eeb76e069631".into(),
            url: "https://my-storage-account.blob.core.windows.net/batch-input/new-file.jsonl"
                .into(),
            etag: Some("\"0x8D4BCC2E4835CD0\"".into()),
            content_length: Some(524288),
            subject: Some(
                "/blobServices/default/containers/batch-input/blobs/new-file.jsonl".into(),
            ),
            api: Some("PutBlockList".into()),
        })
    }

    #[test]
    fn decodes_every_encoding_the_host_uses() {
        let object = blob_event();
        let json_string = Value::String(object.to_string());
        let double_encoded = Value::String(json_string.to_string());
        let base64 =
            Value::String(base64::engine::general_purpose::STANDARD.encode(object.to_string()));
        let array = json!([object.clone()]);
        for (name, v) in [
            ("object", object.clone()),
            ("json string", json_string),
            ("double encoded", double_encoded),
            ("base64", base64),
            ("array", array),
        ] {
            assert_eq!(
                decode_events(&request_with(v), "event").unwrap(),
                vec![expected()],
                "{name}"
            );
        }
    }

    #[test]
    fn decodes_cloud_events() {
        let mut e = blob_event();
        let obj = e.as_object_mut().unwrap();
        let ty = obj.remove("eventType").unwrap();
        obj.insert("type".into(), ty);
        obj.insert("specversion".into(), json!("1.0"));
        assert_eq!(
            decode_events(&request_with(e), "event").unwrap(),
            vec![expected()]
        );
    }

    #[test]
    fn only_the_events_of_a_written_file_announce_it() {
        // "Data Lake Storage Gen 2 events" of event-schema-blob-storage.md: the same event with
        // `api` CreateFile or FlushWithClose, `contentOffset`, `dataVersion` 2, a dfs URL.
        let adls = |api: &str, length: u64| {
            let mut e = blob_event();
            e["data"]["api"] = json!(api);
            e["data"]["contentLength"] = json!(length);
            e["data"]["contentOffset"] = json!(0);
            e["data"]["url"] = json!(
                "https://my-storage-account.dfs.core.windows.net/my-file-system/new-file.txt"
            );
            e["dataVersion"] = json!("2");
            e
        };
        let decoded = |e: Value| match decode_events(&request_with(e), "event").unwrap().remove(0) {
            StorageEvent::BlobCreated(c) => c,
            other => panic!("{other:?}"),
        };
        let create = decoded(adls("CreateFile", 0));
        assert_eq!(create.opens_file(), Some("CreateFile"));
        assert_eq!(create.content_length, Some(0));
        let flushed = decoded(adls("FlushWithClose", 524288));
        assert_eq!(flushed.opens_file(), None);
        assert_eq!(
            flushed.url,
            "https://my-storage-account.dfs.core.windows.net/my-file-system/new-file.txt"
        );
        for api in ["PutBlob", "PutBlockList", "CopyBlob", "SftpCommit"] {
            assert_eq!(decoded(adls(api, 1)).opens_file(), None, "{api}");
        }
        assert_eq!(
            decoded(adls("SftpCreate", 0)).opens_file(),
            Some("SftpCreate")
        );
        // An event without `api` (older payloads, hand-made ones) is taken as it always was.
        let mut bare = blob_event();
        bare["data"].as_object_mut().unwrap().remove("api");
        assert_eq!(decoded(bare).opens_file(), None);
    }

    #[test]
    fn a_deleted_blob_is_decoded_with_its_url() {
        // The documented BlobDeleted event: no eTag, no contentLength.
        let e = json!({
            "topic": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/acct",
            "subject": "/blobServices/default/containers/batch-input/blobs/x.jsonl",
            "eventType": "Microsoft.Storage.BlobDeleted",
            "id": "d1",
            "data": {
                "api": "DeleteBlob",
                "blobType": "BlockBlob",
                "url": "https://acct.blob.core.windows.net/batch-input/x.jsonl",
                "sequencer": "0000000000000281000000000002F5CA"
            },
            "dataVersion": "",
            "metadataVersion": "1",
            "eventTime": "2026-11-28T08:00:00Z"
        });
        let got = decode_events(&request_with(e), "event").unwrap();
        assert_eq!(
            got,
            vec![StorageEvent::BlobDeleted(BlobDeleted {
                id: "d1".into(),
                url: "https://acct.blob.core.windows.net/batch-input/x.jsonl".into()
            })]
        );
    }

    #[test]
    fn other_event_types_are_reported_as_such() {
        let mut e = blob_event();
        e["eventType"] = json!("Microsoft.Storage.BlobTierChanged");
        assert!(matches!(
            decode_events(&request_with(e), "event").unwrap()[0],
            StorageEvent::Other { .. }
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for v in [
            json!(42),
            json!("not json or base64 !!"),
            json!({"no": "type"}),
            json!([]),
        ] {
            assert!(decode_events(&request_with(v), "event").is_err());
        }
        assert_eq!(
            decode_events(&InvocationRequest::default(), "event"),
            Err(DecodeError::MissingBinding("event".into()))
        );
    }

    #[test]
    fn timer_payload_from_the_host() {
        let req: InvocationRequest = serde_json::from_value(json!({
            "Data": { "timer": { "Schedule": { "AdjustForDST": true }, "ScheduleStatus": null, "IsPastDue": true } },
            "Metadata": { "sys": { "MethodName": "function-timer", "UtcNow": "2022-07-05T11:40:07.4850616Z", "RandGuid": "9cd4c06c-fc8f-4b63-af94-56bc75c3f0cb" } }
        }))
        .unwrap();
        assert!(decode_timer(&req, "timer").is_past_due);
    }

    #[test]
    fn an_http_trigger_request_gives_its_headers_and_body_text() {
        // As GetRequestAsJObject builds it: header values are lists, the body a string.
        let req = json!({
            "Url": "https://app.azurewebsites.net/api/function-webhook",
            "Method": "POST",
            "Query": {},
            "Headers": {"Webhook-Id": ["msg_1"], "Content-Type": ["application/json"]},
            "Body": "{\"type\":\"batch.completed\"}"
        });
        let request = InvocationRequest {
            data: [("req".to_string(), req)].into_iter().collect(),
            metadata: Map::new(),
        };
        let http = decode_http_request(&request, "req").unwrap();
        assert_eq!(http.header("webhook-id"), Some("msg_1"));
        assert_eq!(http.body, br#"{"type":"batch.completed"}"#);
        assert_eq!(
            decode_http_request(&request, "other"),
            Err(DecodeError::MissingBinding("other".into()))
        );
    }
}
