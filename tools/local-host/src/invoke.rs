//! The host's side of the custom-handler protocol: the payloads it POSTs to `/{function}` and
//! what it does with the answer (functions-research.md §1.4, §1.5, §2c, §2d).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

/// What this stand-in reports as its version: a 4.x host, visibly not a real one.
pub const HOST_VERSION: &str = "4.0.0-local";

/// `sys` as the host fills it in for every invocation.
fn sys(function: &str, now: DateTime<Utc>) -> Value {
    json!({
        "MethodName": function,
        "UtcNow": host_time(now),
        "RandGuid": uuid::Uuid::new_v4().to_string(),
    })
}

/// .NET's round-trip format, seven fractional digits: `2017-06-26T18:41:00.9584103Z`.
pub fn host_time(t: DateTime<Utc>) -> String {
    // chrono has no 7-digit fraction; 100 ns ticks are .NET's resolution.
    format!(
        "{}.{:07}Z",
        t.format("%Y-%m-%dT%H:%M:%S"),
        t.timestamp_subsec_nanos() / 100
    )
}

/// Where a blob event comes from, as Event Grid names it.
#[derive(Debug, Clone)]
pub struct EventSource {
    /// The storage account's resource id, the event's `topic`.
    pub topic: String,
}

impl EventSource {
    /// Locally there is no subscription or resource group; the ids have Azure's shape so a
    /// handler that parses them sees what it would in Azure.
    pub fn for_account(account: &str) -> Self {
        Self {
            topic: format!(
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/local/providers/Microsoft.Storage/storageAccounts/{account}"
            ),
        }
    }
}

/// A blob as the watcher found it, plus what Event Grid would say about its creation.
#[derive(Debug, Clone)]
pub struct CreatedBlob<'a> {
    pub container: &'a str,
    pub name: &'a str,
    pub etag: &'a str,
    pub size: u64,
    /// Credential-free: Event Grid never puts a SAS in `data.url`.
    pub url: &'a str,
    pub sequencer: u128,
}

/// A `Microsoft.Storage.BlobCreated` event in the Event Grid schema, field for field as
/// documented (event-schema-blob-storage.md).
pub fn blob_created_event(source: &EventSource, blob: &CreatedBlob, now: DateTime<Utc>) -> Value {
    // Storage sends the ETag quoted, as in its HTTP headers; listings give it bare.
    let etag = if blob.etag.starts_with('"') {
        blob.etag.to_string()
    } else {
        format!("\"{}\"", blob.etag)
    };
    json!({
        "topic": source.topic,
        "subject": format!("/blobServices/default/containers/{}/blobs/{}", blob.container, blob.name),
        "eventType": "Microsoft.Storage.BlobCreated",
        "eventTime": host_time(now),
        "id": uuid::Uuid::new_v4().to_string(),
        "data": {
            // The listing does not say which call created the blob; block blobs written by the
            // SDKs and azcopy end with PutBlockList.
            "api": "PutBlockList",
            "clientRequestId": uuid::Uuid::new_v4().to_string(),
            "requestId": uuid::Uuid::new_v4().to_string(),
            "eTag": etag,
            // The listing the watcher uses does not carry the content type either.
            "contentType": "application/octet-stream",
            "contentLength": blob.size,
            "blobType": "BlockBlob",
            "url": blob.url,
            "sequencer": format!("{:032X}", blob.sequencer),
            "storageDiagnostics": { "batchId": uuid::Uuid::new_v4().to_string() },
        },
        "dataVersion": "",
        "metadataVersion": "1",
    })
}

/// How `Data.{binding}` carries the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventShape {
    /// A JSON object: what the real host sends (see [`event_grid_payload`]).
    Object,
    /// A JSON string holding a JSON string holding the indented event: what the host would
    /// send if the extension bound the trigger to `string`. Not the host's shape; for testing
    /// a handler's lenient decoding.
    String,
}

/// The invocation for an `eventGridTrigger` function, as the real host builds it for a custom
/// handler. Read in the sources, not observed on a live host:
/// - Azure/azure-functions-host `ScriptInvocationContextExtensions
///   .ToHttpScriptInvocationContext` puts each input in `Data` through
///   `GetHttpScriptInvocationContextValue`: `byte[]` → base64, anything `JObject.FromObject`
///   takes → a JSON object, anything else (a string) → `JsonConvert.SerializeObject`, a JSON
///   string quoted once more (its test `GetHttpScriptInvocationContextValueTest_String`).
///   Which one depends on the CLR type the trigger is bound to.
/// - That type, for a function.json binding without `dataType`, is the first of `byte[]`,
///   `JObject`, `JArray`, `string` the extension can convert its trigger value to
///   (Azure/azure-webjobs-sdk `TriggerAdapterBindingProvider.GetDefaultType`, reached through
///   the host's `GeneralScriptBindingProvider`).
/// - The EventGrid extension (Azure/azure-sdk-for-net, `EventGridExtensionConfigProvider`)
///   registers `BindToTrigger<JToken>` with `JToken → string` and an open
///   `JToken → OpenType.Poco` converter. `OpenType.Poco` accepts `JObject` (its test for
///   `IEnumerable<T>` looks the interface up in namespace `System` and never matches; the
///   SDK's own `ConverterManagerTests` say "Poco is a base class of JObject"), and nothing
///   converts to `byte[]`: the trigger is bound to `JObject`, so `Data.event` is a JSON
///   object. The gRPC path agrees: a `JObject` becomes `TypedData.Json`, a string
///   `TypedData.String`, and the Python library's Event Grid converter accepts only `json`.
/// - `Metadata`: the binding data, each value through the same conversion: the extension's
///   contract (`data`, from `EventGridTriggerBinding.BindAsync`) and `sys`.
///   (`WorkerFunctionInvoker.TransformInput` adds a string input's top-level JSON fields too,
///   but the input is a `JObject`, so nothing is added.)
///
/// Issue 14 supposed the host sends a JSON string; the sources above say otherwise, so the
/// object is the default and the string is `--event-shape string`.
pub fn event_grid_payload(
    function: &str,
    binding: &str,
    event: &Value,
    shape: EventShape,
    now: DateTime<Utc>,
) -> Value {
    let sent = match shape {
        EventShape::Object => event.clone(),
        // Newtonsoft's `Formatting.Indented` (two spaces, `": "`) is what serde_json's pretty
        // printer writes too; Flex Consumption runs on Linux, so lines end in `\n`.
        EventShape::String => Value::String(
            Value::String(serde_json::to_string_pretty(event).expect("JSON serialises"))
                .to_string(),
        ),
    };
    json!({
        "Data": { binding: sent },
        "Metadata": {
            "data": event["data"],
            "sys": sys(function, now),
        },
    })
}

/// `TimerInfo.ScheduleStatus`, present when the schedule monitor is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleStatus {
    /// `None` before the first run: the host then sends .NET's `DateTime.MinValue`.
    pub last: Option<DateTime<Utc>>,
    pub next: DateTime<Utc>,
    pub last_updated: DateTime<Utc>,
}

fn status_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, false)
}

/// The invocation for a `timerTrigger` function.
pub fn timer_payload(
    function: &str,
    binding: &str,
    status: Option<ScheduleStatus>,
    is_past_due: bool,
    now: DateTime<Utc>,
) -> Value {
    let status = status.map(|s| {
        json!({
            "Last": s.last.map_or_else(|| "0001-01-01T00:00:00".to_string(), status_time),
            "Next": status_time(s.next),
            "LastUpdated": status_time(s.last_updated),
        })
    });
    json!({
        "Data": {
            binding: {
                "Schedule": { "AdjustForDST": true },
                "ScheduleStatus": status,
                "IsPastDue": is_past_due,
            }
        },
        "Metadata": { "sys": sys(function, now) },
    })
}

/// One invocation's result as the host sees it.
#[derive(Debug)]
pub struct Outcome {
    pub invocation_id: String,
    pub status: u16,
    /// The answer's `Logs`. The host discards them when the status is not 2xx; they are kept
    /// here anyway so a local run shows why it failed.
    pub logs: Vec<String>,
    /// Set when the answer is not the JSON object the host requires.
    pub protocol_error: Option<String>,
    /// The start of the body, for failures.
    pub body_excerpt: String,
}

impl Outcome {
    /// What the host counts as success: 2xx and a parseable JSON object.
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status) && self.protocol_error.is_none()
    }
}

#[derive(Debug, Clone)]
pub struct Invoker {
    client: reqwest::Client,
    base: String,
}

impl Invoker {
    /// `timeout` is the app's `functionTimeout`: the host gives up on an invocation after it.
    pub fn new(port: u16, timeout: Duration) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .no_proxy()
                .build()
                .expect("a plain HTTP client builds"),
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// POSTs one invocation. `Err` means no HTTP answer at all (refused, reset, timed out).
    pub async fn invoke(&self, function: &str, payload: &Value) -> Result<Outcome, String> {
        self.invoke_as(new_invocation_id(), function, payload).await
    }

    /// [`Invoker::invoke`] with an id chosen by the caller, who may need to name the
    /// invocation before it ends.
    pub async fn invoke_as(
        &self,
        invocation_id: String,
        function: &str,
        payload: &Value,
    ) -> Result<Outcome, String> {
        let response = self
            .client
            .post(format!("{}/{function}", self.base))
            .header("X-Azure-Functions-InvocationId", &invocation_id)
            .header("X-Azure-Functions-HostVersion", HOST_VERSION)
            .header("User-Agent", format!("Azure-Functions-Host/{HOST_VERSION}"))
            .json(payload)
            .send()
            .await
            .map_err(|e| describe_error(&e))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| describe_error(&e))?;
        let (logs, protocol_error) = match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(answer)) => (
                answer
                    .get("Logs")
                    .and_then(Value::as_array)
                    .map(|l| {
                        l.iter()
                            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                None,
            ),
            Ok(_) => (Vec::new(), Some("the answer is not a JSON object".into())),
            Err(_) if body.is_empty() => (
                Vec::new(),
                Some("the answer is empty (the host would wait until functionTimeout)".into()),
            ),
            Err(e) => (Vec::new(), Some(format!("the answer is not JSON: {e}"))),
        };
        Ok(Outcome {
            invocation_id,
            status,
            logs,
            protocol_error,
            body_excerpt: String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        })
    }
}

/// A fresh invocation id, as the host gives every invocation (retries included).
pub fn new_invocation_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn describe_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "no answer within functionTimeout".into()
    } else if e.is_connect() {
        "connection refused".into()
    } else {
        e.to_string()
    }
}

/// Prints an invocation's `Logs` the way Core Tools shows them: under the function's name.
pub fn print_logs(function: &str, logs: &[String]) {
    for line in logs {
        println!("[{function}] {line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-28T08:00:01.1234567Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn sample_blob() -> CreatedBlob<'static> {
        CreatedBlob {
            container: "batch-input",
            name: "dir/new file.jsonl",
            etag: "0x8D4BCC2E4835CD0",
            size: 524_288,
            url: "http://127.0.0.1:10000/devstoreaccount1/batch-input/dir/new%20file.jsonl",
            sequencer: 0x4420000000000028963,
        }
    }

    fn is_uuid(v: &Value) -> bool {
        v.as_str().is_some_and(|s| uuid::Uuid::parse_str(s).is_ok())
    }

    /// Field by field against the documented example event (functions-research.md §2c).
    #[test]
    fn blob_created_event_has_the_documented_shape() {
        let documented: Value = serde_json::from_str(
            r#"{
              "topic": "/subscriptions/{subscription-id}/resourceGroups/Storage/providers/Microsoft.Storage/storageAccounts/my-storage-account",
              "subject": "/blobServices/default/containers/test-container/blobs/new-file.txt",
              "eventType": "Microsoft.Storage.BlobCreated",
              "eventTime": "2017-06-26T18:41:00.9584103Z",
              "id": "831e1650-001e-001b-66ab-eeb76e069631",
              "data": {
                "api": "PutBlockList",
                "clientRequestId": "6d79dbfb-0e37-4fc4-981f-442c9ca65760",
                "requestId": "831e1650-001e-001b-66ab-eeb76e000000",
                "eTag": "\"0x8D4BCC2E4835CD0\"",
                "contentType": "text/plain",
                "contentLength": 524288,
                "blobType": "BlockBlob",
                "url": "https://my-storage-account.blob.core.windows.net/testcontainer/new-file.txt",
                "sequencer": "00000000000004420000000000028963",
                "storageDiagnostics": { "batchId": "b68529f3-68cd-4744-baa4-3c0498ec19f0" }
              },
              "dataVersion": "",
              "metadataVersion": "1"
            }"#,
        )
        .unwrap();
        let event = blob_created_event(
            &EventSource::for_account("devstoreaccount1"),
            &sample_blob(),
            fixed_now(),
        );

        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&event), keys(&documented));
        assert_eq!(keys(&event["data"]), keys(&documented["data"]));
        assert_eq!(
            keys(&event["data"]["storageDiagnostics"]),
            keys(&documented["data"]["storageDiagnostics"])
        );
        // Same JSON type everywhere (a number stays a number, "" stays a string).
        for (k, v) in documented.as_object().unwrap() {
            assert_eq!(
                std::mem::discriminant(v),
                std::mem::discriminant(&event[k]),
                "{k}"
            );
        }
        for (k, v) in documented["data"].as_object().unwrap() {
            assert_eq!(
                std::mem::discriminant(v),
                std::mem::discriminant(&event["data"][k]),
                "data.{k}"
            );
        }

        assert_eq!(
            event["topic"],
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/local/providers/Microsoft.Storage/storageAccounts/devstoreaccount1"
        );
        assert_eq!(
            event["subject"],
            "/blobServices/default/containers/batch-input/blobs/dir/new file.jsonl"
        );
        assert_eq!(event["eventType"], documented["eventType"]);
        assert_eq!(event["eventTime"], "2026-11-28T08:00:01.1234567Z");
        assert_eq!(
            event["eventTime"].as_str().unwrap().len(),
            documented["eventTime"].as_str().unwrap().len()
        );
        assert!(is_uuid(&event["id"]));
        let data = &event["data"];
        assert_eq!(data["api"], "PutBlockList");
        assert!(is_uuid(&data["clientRequestId"]));
        assert!(is_uuid(&data["requestId"]));
        assert_eq!(data["eTag"], documented["data"]["eTag"]);
        assert_eq!(data["contentLength"], 524_288);
        assert_eq!(data["blobType"], "BlockBlob");
        assert_eq!(
            data["url"],
            "http://127.0.0.1:10000/devstoreaccount1/batch-input/dir/new%20file.jsonl"
        );
        assert_eq!(data["sequencer"], documented["data"]["sequencer"]);
        assert!(is_uuid(&data["storageDiagnostics"]["batchId"]));
        assert_eq!(event["dataVersion"], "");
        assert_eq!(event["metadataVersion"], "1");
    }

    #[test]
    fn an_already_quoted_etag_is_kept() {
        let mut blob = sample_blob();
        blob.etag = "\"0x1\"";
        let event = blob_created_event(&EventSource::for_account("a"), &blob, fixed_now());
        assert_eq!(event["data"]["eTag"], "\"0x1\"");
    }

    #[test]
    fn event_grid_payload_is_the_hosts_shape() {
        let event = blob_created_event(&EventSource::for_account("a"), &sample_blob(), fixed_now());
        let payload = event_grid_payload(
            "function-trigger",
            "event",
            &event,
            EventShape::Object,
            fixed_now(),
        );
        let top: Vec<_> = payload.as_object().unwrap().keys().cloned().collect();
        assert_eq!(top, ["Data", "Metadata"]);
        assert_eq!(payload["Data"].as_object().unwrap().len(), 1);
        assert_eq!(payload["Data"]["event"], event);
        assert_eq!(payload["Metadata"]["data"], event["data"]);
        assert_eq!(payload["Metadata"].as_object().unwrap().len(), 2);
        let sys = &payload["Metadata"]["sys"];
        assert_eq!(sys["MethodName"], "function-trigger");
        assert_eq!(sys["UtcNow"], "2026-11-28T08:00:01.1234567Z");
        assert!(is_uuid(&sys["RandGuid"]));
        assert_eq!(sys.as_object().unwrap().len(), 3);
    }

    #[test]
    fn the_string_shape_is_the_indented_event_quoted_twice() {
        let event = blob_created_event(&EventSource::for_account("a"), &sample_blob(), fixed_now());
        let payload = event_grid_payload(
            "function-trigger",
            "event",
            &event,
            EventShape::String,
            fixed_now(),
        );
        let once: String = serde_json::from_str(payload["Data"]["event"].as_str().unwrap())
            .expect("the binding's string is itself a JSON string");
        assert!(once.starts_with("{\n  \""), "indented: {once}");
        assert_eq!(serde_json::from_str::<Value>(&once).unwrap(), event);
        assert_eq!(payload["Metadata"]["data"], event["data"]);
    }

    #[test]
    fn timer_payload_is_the_hosts_shape() {
        let without = timer_payload("function-timer", "timer", None, false, fixed_now());
        assert_eq!(
            without["Data"]["timer"],
            json!({"Schedule": {"AdjustForDST": true}, "ScheduleStatus": null, "IsPastDue": false})
        );
        assert_eq!(without["Metadata"]["sys"]["MethodName"], "function-timer");
        assert!(without["Metadata"].get("data").is_none());

        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let first = ScheduleStatus {
            last: None,
            next: t("2026-11-28T08:05:00Z"),
            last_updated: t("2026-11-28T08:00:00Z"),
        };
        let with = timer_payload("function-timer", "timer", Some(first), false, fixed_now());
        assert_eq!(
            with["Data"]["timer"]["ScheduleStatus"],
            json!({"Last": "0001-01-01T00:00:00", "Next": "2026-11-28T08:05:00+00:00", "LastUpdated": "2026-11-28T08:00:00+00:00"})
        );
        let later = ScheduleStatus {
            last: Some(t("2026-11-28T08:05:00Z")),
            ..first
        };
        let with = timer_payload("function-timer", "timer", Some(later), true, fixed_now());
        assert_eq!(
            with["Data"]["timer"]["ScheduleStatus"]["Last"],
            "2026-11-28T08:05:00+00:00"
        );
        assert_eq!(with["Data"]["timer"]["IsPastDue"], true);
    }
}
