//! The Functions host's side: the payloads it POSTs to the handler's function routes.

use serde_json::{Value, json};

/// The documented BlobCreated event (Event Grid schema) for the blob at `url`
/// (`http://host/account/container/name`, as the storage client names it).
pub fn blob_created_event(url: &str, etag: &str, size: u64) -> Value {
    // Plain string splitting, no URL parser: a parser would resolve `..` and `%2e%2e`
    // segments, and the subject must name the blob exactly as the URL does.
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    let mut parts = path.splitn(4, '/').skip(2);
    let container = parts.next().unwrap_or_default();
    let name = parts.next().unwrap_or_default();
    json!({
        "topic": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/devstoreaccount1",
        "subject": format!("/blobServices/default/containers/{container}/blobs/{name}"),
        "eventType": "Microsoft.Storage.BlobCreated",
        "eventTime": "2026-11-28T08:00:00.0000000Z",
        "id": uuid::Uuid::new_v4().to_string(),
        "data": {
            "api": "PutBlockList",
            "clientRequestId": uuid::Uuid::new_v4().to_string(),
            "requestId": uuid::Uuid::new_v4().to_string(),
            "eTag": etag,
            "contentType": "application/jsonl",
            "contentLength": size,
            "blobType": "BlockBlob",
            "url": url,
            "sequencer": "00000000000004420000000000028963",
            "storageDiagnostics": { "batchId": uuid::Uuid::new_v4().to_string() }
        },
        "dataVersion": "",
        "metadataVersion": "1"
    })
}

/// The host's invocation payload for the `function-trigger` function, binding `event`.
pub fn trigger_payload(event: Value) -> Value {
    json!({
        "Data": { "event": event.clone() },
        "Metadata": {
            "data": event["data"].clone(),
            "sys": { "MethodName": "function-trigger", "UtcNow": "2026-11-28T08:00:01.1234567Z", "RandGuid": uuid::Uuid::new_v4().to_string() }
        }
    })
}

/// The host's invocation payload for the `function-timer` function, binding `timer`.
pub fn timer_payload() -> Value {
    json!({
        "Data": { "timer": { "Schedule": { "AdjustForDST": true }, "ScheduleStatus": null, "IsPastDue": false } },
        "Metadata": { "sys": { "MethodName": "function-timer", "UtcNow": "2026-11-28T08:05:00.0000000Z", "RandGuid": uuid::Uuid::new_v4().to_string() } }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_names_the_blob_as_the_url_does() {
        let e = blob_created_event(
            "http://127.0.0.1:1/devstoreaccount1/batch-input/a/%2e%2e/b.jsonl",
            "\"0x1\"",
            3,
        );
        assert_eq!(
            e["subject"],
            "/blobServices/default/containers/batch-input/blobs/a/%2e%2e/b.jsonl"
        );
        assert_eq!(e["data"]["contentLength"], 3);
        let e = blob_created_event("http://u:p@h/acct/c/x.jsonl", "e", 0);
        assert_eq!(
            e["subject"],
            "/blobServices/default/containers/c/blobs/x.jsonl"
        );
    }
}
