//! The job model: one record per input blob version, its states, and where records are kept.
//!
//! A job is one input blob version: the key is (blob name, ETag), so the same event delivered
//! twice, two instances racing, or a crash and retry all meet the same record, while a
//! re-upload (new ETag) is a new job. Records are JSON blobs in the state container, written
//! with ETag conditions: `If-None-Match: *` to claim, `If-Match` to update. Active jobs live
//! under `active/`, finished ones under `done/`, so a timer tick lists only what is active.
//!
//! ```text
//!   claim ──▶ Submitting ──create──▶ Running ──terminal status──▶ Harvesting ──▶ Finished
//!                 │  ▲                  │                             │           (done/)
//!    token limit  ▼  │ wait over        │ failed for quota            │ unanswered lines
//!               Queued ◀────────────────┘                             ▼ (follow-up round)
//!                                                                 Submitting
//!   Submitting ──invalid input / hopeless create──▶ Finished (rejected / failed)
//!   Submitting ──input beyond the limits──▶ Split ──every part finished──▶ Combining ──▶ Finished
//! ```
//!
//! - [`record`]: `Job<S>`, where `S` is the state and carries exactly that state's data (a
//!   `Running` job has a batch, a `Submitting` one a claim). Transitions consume a job in one
//!   state and return it in the next, so a step the machine does not allow does not compile.
//! - [`wire`]: the JSON form of a record, the flat object every earlier version wrote; read
//!   into the typed form with a clear error for a record no version could have written.
//! - [`store`]: the records in the state container.
//!
//! A split job's parts are jobs of their own (`part_of` names the parent; key
//! `{parent key}/part-NNNN`), each reading a staged slice of the input and going through the
//! same states; their results land in the staging folder, and the parent combines them.

mod index;
mod record;
mod store;
mod wire;

pub use index::{JobIndex, RoomHeld, WaitingForRoom};
pub use record::{
    AnyJob, BatchSeen, CanQueue, Combining, CreateCall, Finished, Harvesting, Holder, Indexed, Job,
    Leased, Missing, MovesResults, Observed, Queued, Running, Split, State, Submitting, Unfinished,
};
pub use store::{ActiveEntry, Claim, JobStore, JobStoreError, SweepState, Version};
pub use wire::{InvalidRecord, Wire, WireState};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::openai::RequestCounts;

/// A state's name, as records and their history store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Submitting,
    Queued,
    Running,
    Split,
    /// Both a batch's harvest and a split job's combine (the record tells them apart by its
    /// parts), as every earlier version wrote it.
    Harvesting,
    Finished,
}

/// How a job ended, as `summary.json` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Failed,
    Expired,
    Cancelled,
    Rejected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Expired => "expired",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who or what asked for a job to stop, as `summary.json` says it (`cancelled_by`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelledBy {
    /// `handler cancel NAME`.
    #[serde(rename = "command")]
    Command,
    /// The input blob was deleted (its BlobDeleted event, or the timer's sweep).
    #[serde(rename = "input deleted")]
    InputDeleted,
}

impl CancelledBy {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelledBy::Command => "command",
            CancelledBy::InputDeleted => "input deleted",
        }
    }
}

/// A request to stop a job, kept in its record: whoever handles the job next (the timer, an
/// intake that takes a lapsed claim over) honours it, so a cancel survives a crash and a
/// job claimed by someone else at the time of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub by: CancelledBy,
    pub at: i64,
}

/// The input blob version a job is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRef {
    pub container: String,
    pub name: String,
    pub etag: String,
    pub size: u64,
    /// The URL the batch service reads (no credentials).
    pub url: String,
}

impl InputRef {
    /// `{path}` of the Contract: the blob name without `.jsonl`.
    pub fn output_path(&self) -> &str {
        self.name.strip_suffix(".jsonl").unwrap_or(&self.name)
    }
}

/// What validation learnt about the input, kept so a retry need not read it again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFacts {
    pub lines: u64,
    pub endpoint: String,
    pub model: String,
    /// The requests' estimated input tokens (`validate::Report::tokens`); absent in records
    /// written before the estimate existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens: u64,
}

/// The room a job holds in a target's enqueued-token quota: the reservation `capacity` took
/// for it, by the id the capacity ledger knows it by, so that the ledger can count what the
/// active jobs hold from their index instead of keeping one entry per job (`capacity::settle`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldRoom {
    /// The reservation's id in the ledger; empty for one taken before ids existed.
    pub id: String,
    pub tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One part of a split input, as the parent job tracks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    /// 1-based.
    pub index: u32,
    /// The part's job key.
    pub key: String,
    /// The staged slice, in the state container.
    pub blob: String,
    pub etag: String,
    pub first_line: u64,
    pub requests: u64,
    pub bytes: u64,
    /// The part's estimated input tokens (`validate::PartSpan::tokens`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tokens: u64,
}

impl PartRef {
    pub fn last_line(&self) -> u64 {
        self.first_line + self.requests - 1
    }

    /// The part's folder in the state container: its staged input's name without `.jsonl`,
    /// as for any job's output path.
    pub fn folder(&self) -> &str {
        self.blob.strip_suffix(".jsonl").unwrap_or(&self.blob)
    }
}

/// Set on the job of one part of a split input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartOf {
    pub parent: String,
    pub index: u32,
    /// Lines of the input before this part: added to the part's line numbers.
    pub line_offset: u64,
}

/// Where a split job keeps its staged parts and their results, in the state container.
pub fn staging_prefix(key: &str) -> String {
    format!("staging/{key}/")
}

/// The staged input of a job's follow-up round `round`, in the state container.
pub fn followup_blob(key: &str, round: u32) -> String {
    format!("{}followup-{round}.jsonl", staging_prefix(key))
}

/// One batch of a job that has had follow-ups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub batch_id: String,
    pub status: String,
    pub request_counts: RequestCounts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: i64,
    pub state: JobState,
    pub note: String,
}

/// Which steps of moving results into place are done, so an interrupted harvest (or a split
/// job's combine) resumes where it stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HarvestProgress {
    /// Files of an earlier version of the same input were removed from the output folder.
    pub cleared: bool,
    pub results_moved: bool,
    pub errors_moved: bool,
    /// A split job's combine: the parts' `merged.jsonl` are in place, and the summary.
    #[serde(default)]
    pub merged_moved: bool,
    #[serde(default)]
    pub summary_written: bool,
}

/// A readable key, `{blob name}@{etag}`, so an operator can find a job by its input; hashed
/// only when a very long blob name would push the record's name past Azure's 1,024 characters.
pub fn job_key(name: &str, etag: &str) -> String {
    let etag = etag.trim_matches('"');
    let key = format!("{name}@{etag}");
    if key.len() <= 900 {
        return key;
    }
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}…@{hex}", &name[..name.floor_char_boundary(200)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_readable_and_bounded() {
        assert_eq!(
            job_key("dir/test.jsonl", "\"0x8D4\""),
            "dir/test.jsonl@0x8D4"
        );
        let long = "x".repeat(1000) + ".jsonl";
        let k = job_key(&long, "\"0x1\"");
        assert!(k.len() < 300, "{}", k.len());
        assert_ne!(k, job_key(&("y".repeat(1000) + ".jsonl"), "\"0x1\""));
    }
}
