//! `summary.json`: what the user reads first in `batch-output/{path}/`.
//!
//! The Contract's fields (`status`, `batch_id`, `input_blob`, `request_counts`, `problems`)
//! are always present; the rest tells the story of the job for whoever debugs it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    jobs::{CancelledBy, Finished, HistoryEntry, Job, Outcome, RoundRecord},
    openai::{Batch, BatchError, RequestCounts},
    status,
    storage::{BlobStore, StorageError, WriteCondition},
    validate::Problem,
};

/// Token usage summed over the result lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    /// Adds one result's `usage` object.
    pub fn add(&mut self, usage: &Value) {
        let get = |a: &str, b: &str| {
            usage
                .get(a)
                .or_else(|| usage.get(b))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        // Chat completions say prompt/completion; the Responses API says input/output.
        let input = get("prompt_tokens", "input_tokens");
        let output = get("completion_tokens", "output_tokens");
        self.input_tokens += input;
        self.output_tokens += output;
        self.total_tokens += usage
            .get("total_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(input + output);
    }

    pub fn add_totals(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.total_tokens += other.total_tokens;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub status: Outcome,
    /// Who or what stopped a `cancelled` job that was asked to stop: `command` (`handler
    /// cancel`) or `input deleted`. Absent when the batch was cancelled some other way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_by: Option<CancelledBy>,
    pub batch_id: Option<String>,
    pub input_blob: String,
    pub input_etag: String,
    pub request_counts: RequestCounts,
    /// Line-numbered problems that kept the input from being submitted (first 100).
    pub problems: Vec<Problem>,
    /// How many more problems there were beyond those listed.
    pub more_problems: u64,
    /// The service's own errors (`errors.data` of a failed batch, or a refused create).
    pub errors: Vec<BatchError>,
    /// Token usage summed over the result lines.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// What the input was estimated to count against the enqueued-token quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenFigures>,
    /// The service's timestamps (unix seconds).
    #[serde(default)]
    pub service_times: Option<ServiceTimes>,
    /// Where the files are, relative to the output container; absent when not written.
    #[serde(default)]
    pub files: Files,
    /// Input lines with neither a result nor an error (an expired or cancelled batch).
    #[serde(default)]
    pub lines_without_result: u64,
    #[serde(default)]
    pub notes: Vec<String>,
    /// Earlier batches of this job, when requests were resubmitted in follow-up batches.
    #[serde(default)]
    pub rounds: Vec<RoundRecord>,
    /// An input split into parts (one batch each): how each part ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartSummary>,
    pub history: Vec<HistoryEntry>,
    pub written_at: i64,
}

/// The input's tokens as the handler estimated them before submitting (`validate`'s rule,
/// in the README): `estimated` is the requests' input tokens by the model family's
/// tokenizer. The service's own estimate differs; `usage` has what was really used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFigures {
    pub estimated: u64,
}

/// One row of a split input's part table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartSummary {
    pub part: u32,
    /// The input's lines this part holds.
    pub first_line: u64,
    pub last_line: u64,
    pub requests: u64,
    /// The part's (last) batch; `batch_ids` lists its follow-ups' too, oldest first.
    pub batch_id: Option<String>,
    pub batch_ids: Vec<String>,
    pub status: Outcome,
    pub request_counts: RequestCounts,
    pub lines_without_result: u64,
    /// The service's errors for this part, with the input's line numbers.
    pub errors: Vec<BatchError>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Files {
    pub results: Option<String>,
    pub errors: Option<String>,
    pub merged: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceTimes {
    pub created_at: Option<i64>,
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub expires_at: Option<i64>,
}

impl ServiceTimes {
    pub fn from_batch(b: &Batch) -> Self {
        ServiceTimes {
            created_at: b.created_at,
            in_progress_at: b.in_progress_at,
            finalizing_at: b.finalizing_at,
            completed_at: b.completed_at,
            failed_at: b.failed_at,
            expired_at: b.expired_at,
            cancelled_at: b.cancelled_at,
            expires_at: b.expires_at,
        }
    }
}

impl Summary {
    /// The summary of a finished job, with what its record knows; the workflow that
    /// finished it adds the rest (files, usage, errors, notes).
    pub fn for_job(job: &Job<Finished>, at: i64) -> Self {
        Summary {
            status: job.outcome(),
            cancelled_by: job
                .cancel_request()
                .filter(|_| job.outcome() == Outcome::Cancelled)
                .map(|c| c.by),
            batch_id: job.batch().map(|b| b.id.clone()),
            input_blob: job.input().url.clone(),
            input_etag: job.input().etag.clone(),
            request_counts: job
                .batch()
                .map(|b| b.request_counts.clone())
                .unwrap_or_default(),
            problems: Vec::new(),
            more_problems: 0,
            errors: Vec::new(),
            usage: None,
            // A record from before the estimate existed says 0: no figure rather than a false one.
            tokens: job.facts().filter(|f| f.tokens > 0).map(|f| TokenFigures {
                estimated: f.tokens,
            }),
            service_times: None,
            files: Files::default(),
            lines_without_result: 0,
            notes: Vec::new(),
            rounds: job.rounds().to_vec(),
            parts: Vec::new(),
            history: job.history().to_vec(),
            written_at: at,
        }
    }
}

/// What a user can do about a service error code, for the codes whose cause lies on the
/// user's side of the service. The README's troubleshooting table says the same at length.
fn advice(code: &str) -> Option<&'static str> {
    Some(match code {
        "input_no_permissions" => {
            "input_no_permissions: the Azure OpenAI resource could not read the input blob. \
             Give its system-assigned identity Storage Blob Data Contributor on the storage \
             account (infra/ does; a new role assignment takes a few minutes) and let any \
             storage firewall admit it, then upload the file again."
        }
        "model_not_found" => {
            "model_not_found: body.model must be the name of a batch deployment (GlobalBatch or \
             DataZoneBatch) of this Azure OpenAI resource, not a model name. Fix it and upload \
             the file again."
        }
        "invalid_request" => {
            "invalid_request: the service refused the batch or a line; check that the \
             deployment's SKU is GlobalBatch or DataZoneBatch, and the line the error names."
        }
        "input_modified" => {
            "input_modified: the input blob changed while its batch ran. Leave an input \
             untouched until its summary.json appears; a new version is a job of its own."
        }
        "token_limit_exceeded" => {
            "token_limit_exceeded: the deployment's enqueued-token quota stayed full. Raise its \
             capacity, or upload the file again when running jobs have finished."
        }
        _ => return None,
    })
}

/// The advice for each distinct code among `errors`, in code order.
fn advice_for(errors: &[BatchError]) -> Vec<&'static str> {
    let mut codes: Vec<&str> = errors.iter().filter_map(|e| e.code.as_deref()).collect();
    codes.sort_unstable();
    codes.dedup();
    codes.into_iter().filter_map(advice).collect()
}

/// A batch's service errors in one log line (the first few, with their input lines), and
/// the advice for their codes: what an operator searching the logs needs.
pub fn describe_errors(errors: &[BatchError]) -> Option<String> {
    const SHOWN: usize = 5;
    if errors.is_empty() {
        return None;
    }
    let mut listed: Vec<String> = errors
        .iter()
        .take(SHOWN)
        .map(|e| {
            let code = e.code.as_deref().unwrap_or("(no code)");
            let at = e.line.map(|l| format!(" at line {l}")).unwrap_or_default();
            format!("{code}{at}: {}", e.message.as_deref().unwrap_or(""))
        })
        .collect();
    if errors.len() > SHOWN {
        listed.push(format!("and {} more", errors.len() - SHOWN));
    }
    let advice = advice_for(errors);
    let mut line = format!("service errors: {}", listed.join("; "));
    if !advice.is_empty() {
        line.push_str(&format!(" — {}", advice.join(" ")));
    }
    Some(line)
}

impl Summary {
    /// One note per distinct error code with advice, so the summary says what to do.
    fn add_advice(&mut self) {
        for advice in advice_for(&self.errors) {
            if !self.notes.iter().any(|n| n == advice) {
                self.notes.push(advice.to_string());
            }
        }
    }
}

/// The blob name of a job's summary in the output container.
pub fn summary_name(output_path: &str) -> String {
    format!("{output_path}/summary.json")
}

pub async fn write(
    store: &BlobStore,
    container: &str,
    output_path: &str,
    summary: &Summary,
) -> Result<(), StorageError> {
    // Every summary (rejected, failed at create, harvested, combined from parts) is written
    // here, so the advice is added in one place.
    let mut summary = summary.clone();
    summary.add_advice();
    let body = serde_json::to_vec_pretty(&summary).expect("summaries always serialize");
    store
        .write(
            container,
            &summary_name(output_path),
            Bytes::from(body),
            WriteCondition::Always,
            "application/json",
        )
        .await?;
    // The summary is the final word: the status file goes once it is written (never
    // before, so a folder always shows one of them). A crash between the two leaves the
    // job's record unfinished, and the step that runs again writes both again.
    status::delete(store, container, output_path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(code: &str) -> BatchError {
        BatchError {
            code: Some(code.into()),
            message: Some("m".into()),
            param: None,
            line: None,
        }
    }

    #[test]
    fn usage_sums_both_api_styles() {
        let mut u = Usage::default();
        u.add(&serde_json::json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}));
        u.add(&serde_json::json!({"input_tokens": 1, "output_tokens": 2}));
        assert_eq!(
            u,
            Usage {
                input_tokens: 4,
                output_tokens: 6,
                total_tokens: 10
            }
        );
    }

    #[test]
    fn each_fixable_code_gets_one_note_naming_it() {
        let input = crate::jobs::InputRef {
            container: "batch-input".into(),
            name: "test.jsonl".into(),
            etag: "\"0x1\"".into(),
            size: 10,
            url: "https://a.blob.core.windows.net/batch-input/test.jsonl".into(),
        };
        let record = Job::claim(input, "me", 60, 0).finish(Outcome::Failed, "test", 1);
        let mut s = Summary {
            errors: vec![
                error("model_not_found"),
                error("input_no_permissions"),
                error("model_not_found"),
                error("something_else"),
            ],
            ..Summary::for_job(&record, 2)
        };
        s.add_advice();
        s.add_advice(); // written again after a retried step: no second copy
        assert_eq!(s.notes.len(), 2, "{:?}", s.notes);
        assert!(s.notes[0].starts_with("input_no_permissions: "));
        assert!(s.notes[1].starts_with("model_not_found: "));
        assert!(s.notes[1].contains("deployment"));
    }

    #[test]
    fn the_log_line_lists_the_first_errors_with_lines_and_the_advice() {
        let mut errors: Vec<BatchError> = (1..=7)
            .map(|l| BatchError {
                line: Some(l),
                ..error("model_not_found")
            })
            .collect();
        errors.push(error("input_modified"));
        let line = describe_errors(&errors).unwrap();
        assert!(
            line.starts_with("service errors: model_not_found at line 1: m; "),
            "{line}"
        );
        assert!(line.contains("at line 5: m; and 3 more — "), "{line}");
        assert!(!line.contains("at line 6"), "{line}");
        assert!(
            line.contains("input_modified: the input blob changed"),
            "{line}"
        );
        assert!(
            line.contains("model_not_found: body.model must be"),
            "{line}"
        );
        assert_eq!(describe_errors(&[]), None);
    }
}
