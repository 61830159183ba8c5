//! `summary.json`: what the user reads first in `batch-output/{path}/`.
//!
//! The Contract's fields (`status`, `batch_id`, `input_blob`, `request_counts`, `problems`)
//! are always present; the rest tells the story of the job for whoever debugs it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{
    harvest::Usage,
    jobs::{HistoryEntry, JobRecord, Outcome, RoundRecord},
    openai::{Batch, BatchError, RequestCounts},
    storage::{BlobStore, StorageError, WriteCondition},
    validate::Problem,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub status: String,
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
    pub status: String,
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
    pub fn for_job(rec: &JobRecord, outcome: Outcome) -> Self {
        Summary {
            status: outcome.as_str().to_string(),
            batch_id: rec.batch_id.clone(),
            input_blob: rec.input.url.clone(),
            input_etag: rec.input.etag.clone(),
            request_counts: rec.request_counts.clone().unwrap_or_default(),
            problems: Vec::new(),
            more_problems: 0,
            errors: Vec::new(),
            usage: None,
            service_times: None,
            files: Files::default(),
            lines_without_result: 0,
            notes: Vec::new(),
            rounds: rec.rounds.clone(),
            parts: Vec::new(),
            history: rec.history.clone(),
            written_at: crate::jobs::now(),
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
    let body = serde_json::to_vec_pretty(summary).expect("summaries always serialize");
    store
        .write(
            container,
            &summary_name(output_path),
            Bytes::from(body),
            WriteCondition::Always,
            "application/json",
        )
        .await
        .map(|_| ())
}
