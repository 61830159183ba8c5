//! `batch-output/{path}/status.json`: what a user finds beside where the results will be,
//! while a job has not finished; and the same view of a job for `handler status`.
//!
//! One document type ([`Status`]), built from the job record (and, for a split input, its
//! parts' records) by [`Status::of`]. The workflows call [`publish`] at the transitions a
//! user cares about (taken in, queued, batch created, the service's status or counts
//! changed, results being moved), never on a tick that changed nothing. `summary::write`
//! deletes the file right after it writes `summary.json`, so a folder shows one or the other
//! (both only for the moment between those two calls; a crash there is healed because the
//! record is finished only after both, and the retried step writes the summary again).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{
    jobs::{AnyJob, CancelledBy, JobState, JobStore, JobStoreError, PartRef},
    openai::{Batch, BatchStatus, RequestCounts},
    storage::{BlobStore, StorageError, WriteCondition},
};

/// The file's name in a job's output folder.
pub const STATUS_FILE: &str = "status.json";

/// `{output_path}/status.json`.
pub fn status_name(output_path: &str) -> String {
    format!("{output_path}/{STATUS_FILE}")
}

/// Where a job stands, in the words of `status.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Taken in; the handler is checking the file.
    Validating,
    /// Waiting for room in the enqueued-token quota.
    Queued,
    /// Checked; the batch is being created.
    Submitting,
    /// The batch exists and has not ended.
    Running,
    /// The batch ended (or every part did); the results are being moved into place.
    Harvesting,
    /// Beyond one batch's limits: its parts run as batches of their own.
    Split,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Validating => "validating",
            Phase::Queued => "queued",
            Phase::Submitting => "submitting",
            Phase::Running => "running",
            Phase::Harvesting => "harvesting",
            Phase::Split => "split",
        }
    }
}

/// `status.json`. Times are unix seconds, as in `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub status: Phase,
    /// What the job waits for, in plain words.
    pub waiting_for: String,
    pub input_blob: String,
    pub input_etag: String,
    /// The batch, when there is one (a split input's are in `batches`).
    pub batch_id: Option<String>,
    /// The batch's status as the service last reported it.
    pub batch_status: Option<String>,
    /// The requests' input tokens as the handler estimated them while validating (what the
    /// job holds of the enqueued-token quota); absent until the file has been checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_tokens: Option<u64>,
    /// A split input: each part's batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub batches: Vec<PartStatus>,
    /// As the service last reported them (summed over the parts of a split input); null
    /// before a batch has reported any.
    pub request_counts: Option<RequestCounts>,
    /// When the handler took the file in (seconds after its upload, when the event came).
    pub uploaded_at: i64,
    /// When the (first) batch was created.
    pub submitted_at: Option<i64>,
    /// The last change a user would care about (this file is rewritten only then).
    pub updated_at: i64,
    /// From the rate the service has answered requests so far; absent until it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_finish_at: Option<i64>,
    /// A queued job's next try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<i64>,
    /// Someone asked for the job to stop: `command` or `input deleted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_by: Option<CancelledBy>,
    /// A follow-up round (requests an expired batch left, resubmitted): its number.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub round: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One part of a split input, in `batches`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartStatus {
    pub part: u32,
    pub first_line: u64,
    pub last_line: u64,
    pub batch_id: Option<String>,
    /// `waiting`, a phase (`queued`, `submitting`, `running`, `harvesting`), or how it ended
    /// (`completed`, `cancelled`, …).
    pub state: String,
    pub batch_status: Option<String>,
    pub request_counts: Option<RequestCounts>,
}

/// A part of a split input with its record, if it has one yet.
pub type PartView = (PartRef, Option<AnyJob>);

impl Status {
    /// The status of an unfinished job; `None` for a finished one (its summary says it all).
    /// `parts` are a split input's parts with their records; `batch` is the service's latest
    /// answer, when the caller has it (it carries the time the batch started answering, for
    /// the estimated finish).
    pub fn of(job: &AnyJob, parts: &[PartView], batch: Option<&Batch>, now: i64) -> Option<Self> {
        let (status, waiting_for) = match job {
            AnyJob::Finished(_) => return None,
            AnyJob::Submitting(j) if j.facts().is_none() => (
                Phase::Validating,
                format!(
                    "the handler to check the file ({} bytes) before it is submitted",
                    j.input().size
                ),
            ),
            AnyJob::Submitting(j) => (
                Phase::Submitting,
                if j.create_started_at().is_some() {
                    "the service to accept the batch (create sent)".to_string()
                } else {
                    "the handler to create the batch".to_string()
                },
            ),
            AnyJob::Queued(j) if j.waits_for_room() => (
                Phase::Queued,
                match j.place() {
                    0 => "room in the enqueued-token quota".to_string(),
                    n => format!("room in the enqueued-token quota: {} in line", ordinal(n)),
                },
            ),
            AnyJob::Queued(j) => (
                Phase::Queued,
                format!(
                    "room in the deployment's enqueued-token quota (other batches must finish \
                     first); next try at {} (try {})",
                    rfc3339(j.next_attempt_at()),
                    j.quota_attempts() + 1
                ),
            ),
            AnyJob::Running(j) => (
                Phase::Running,
                running_wait(&j.batch().status, &j.batch().request_counts),
            ),
            AnyJob::Harvesting(_) => (
                Phase::Harvesting,
                "the handler to move the results into place".to_string(),
            ),
            AnyJob::Combining(_) => (
                Phase::Harvesting,
                "the handler to combine the parts' results".to_string(),
            ),
            AnyJob::Split(_) => (Phase::Split, parts_wait(parts)),
        };
        let waiting_for = match (job.cancel_request(), status) {
            (Some(c), Phase::Running) => format!(
                "{waiting_for} (cancel requested by {}: the service stops the batch, \
                 then what it finished is kept)",
                c.by.as_str()
            ),
            (Some(c), _) => format!("{waiting_for} (cancel requested by {})", c.by.as_str()),
            (None, _) => waiting_for,
        };
        let seen = job.batch();
        let batches: Vec<PartStatus> = parts.iter().map(part_status).collect();
        let request_counts = if batches.is_empty() {
            seen.map(|b| b.request_counts.clone())
                .filter(|c| c.total > 0 || c.completed > 0 || c.failed > 0)
        } else {
            let mut sum = RequestCounts {
                total: job.facts().map_or(0, |f| f.lines),
                ..Default::default()
            };
            for c in batches.iter().filter_map(|p| p.request_counts.as_ref()) {
                sum.completed += c.completed;
                sum.failed += c.failed;
            }
            Some(sum)
        };
        let estimated_finish_at = batch
            .filter(|b| b.status == BatchStatus::InProgress)
            .and_then(|b| estimate_finish(b.in_progress_at?, &b.request_counts, now));
        Some(Status {
            status,
            waiting_for,
            input_blob: job.input().url.clone(),
            input_etag: job.input().etag.clone(),
            batch_id: seen.map(|b| b.id.clone()),
            batch_status: seen.map(|b| b.status.to_string()),
            estimated_tokens: job.facts().map(|f| f.tokens).filter(|&t| t > 0),
            batches,
            request_counts,
            uploaded_at: job.created_at(),
            submitted_at: job
                .history()
                .iter()
                .find(|h| h.state == JobState::Running)
                .map(|h| h.at),
            updated_at: now,
            estimated_finish_at,
            next_attempt_at: match job {
                AnyJob::Queued(j) if !j.waits_for_room() => Some(j.next_attempt_at()),
                _ => None,
            },
            cancel_requested_by: job.cancel_request().map(|c| c.by),
            round: job.round(),
        })
    }

    /// Requests answered (well or not) of those known, as a person reads it: `12/30`.
    pub fn progress(&self) -> String {
        match &self.request_counts {
            Some(c) if c.total > 0 => format!("{}/{}", c.completed + c.failed, c.total),
            _ => "-".to_string(),
        }
    }
}

/// What a running batch waits for, by the service's status.
fn running_wait(status: &BatchStatus, counts: &RequestCounts) -> String {
    match status {
        BatchStatus::Validating => "the service to validate the input file".to_string(),
        BatchStatus::InProgress => format!(
            "the service to answer the requests: {} of {} done{}",
            counts.completed + counts.failed,
            counts.total,
            if counts.failed > 0 {
                format!(" ({} failed)", counts.failed)
            } else {
                String::new()
            }
        ),
        BatchStatus::Finalizing => "the service to write the results files".to_string(),
        BatchStatus::Cancelling => "the service to stop the batch (cancelling)".to_string(),
        other => format!("the service (batch status {other})"),
    }
}

/// What a split input waits for: its parts, counted by where they stand.
fn parts_wait(parts: &[PartView]) -> String {
    let (mut waiting, mut queued, mut running, mut finished) = (0, 0, 0, 0);
    for (_, job) in parts {
        match job {
            None => waiting += 1,
            Some(AnyJob::Queued(_)) => queued += 1,
            Some(AnyJob::Finished(_)) => finished += 1,
            Some(_) => running += 1,
        }
    }
    let mut said = vec![format!("{running} running")];
    if queued > 0 {
        said.push(format!("{queued} waiting for quota"));
    }
    if waiting > 0 {
        said.push(format!("{waiting} not started yet"));
    }
    said.push(format!("{finished} finished"));
    format!("its {} parts: {}", parts.len(), said.join(", "))
}

fn part_status((part, job): &PartView) -> PartStatus {
    let state = match job {
        None => "waiting".to_string(),
        Some(AnyJob::Finished(f)) => f.outcome().as_str().to_string(),
        Some(j) => Status::of(j, &[], None, 0)
            .map_or("finished", |s| s.status.as_str())
            .to_string(),
    };
    let seen = job.as_ref().and_then(|j| j.batch());
    PartStatus {
        part: part.index,
        first_line: part.first_line,
        last_line: part.last_line(),
        batch_id: seen.map(|b| b.id.clone()),
        state,
        batch_status: seen.map(|b| b.status.to_string()),
        request_counts: seen.map(|b| b.request_counts.clone()),
    }
}

/// When the batch ends at the rate it has answered since it started; `None` until it has
/// answered something.
fn estimate_finish(started: i64, counts: &RequestCounts, now: i64) -> Option<i64> {
    let done = counts.completed + counts.failed;
    if done == 0 || counts.total < done {
        return None;
    }
    let elapsed = (now - started).max(1) as f64;
    let rate = done as f64 / elapsed;
    let left = (counts.total - done) as f64;
    Some(now + (left / rate).ceil() as i64)
}

/// 1st, 2nd, 3rd, 4th, …, 11th, 12th, 13th, 21st: a place in line.
pub fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// A unix time as RFC 3339, for the sentences in `waiting_for`.
pub fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

/// A split input's parts with their records (active, else finished, else none yet).
pub async fn parts_of(jobs: &JobStore, parts: &[PartRef]) -> Result<Vec<PartView>, JobStoreError> {
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        let job = match jobs.load_active(&part.key).await? {
            Some((job, _)) => Some(job),
            None => jobs.load_done(&part.key).await?.map(AnyJob::Finished),
        };
        out.push((part.clone(), job));
    }
    Ok(out)
}

/// Writes the `status.json` of `job`'s input; nothing for a finished job or a part (a split
/// input's file is written by [`refresh_split`], once per tick for all its parts: were each
/// part's change to rewrite it, reading every part each time, a tick would cost the square
/// of the parts). Best effort: the file is for people, so a fault here is logged and does
/// not hold up the job (the next change writes it again).
pub async fn publish(
    store: &BlobStore,
    jobs: &JobStore,
    output_container: &str,
    job: &AnyJob,
    batch: Option<&Batch>,
    now: i64,
) {
    let key = job.key().to_string();
    if let Err(e) = try_publish(store, jobs, output_container, job, batch, now).await {
        tracing::warn!(job = %key, "status.json not written (the next change writes it): {e}");
    }
}

async fn try_publish(
    store: &BlobStore,
    jobs: &JobStore,
    output_container: &str,
    job: &AnyJob,
    batch: Option<&Batch>,
    now: i64,
) -> Result<(), JobStoreError> {
    if job.part_of().is_some() {
        return Ok(());
    }
    let parts = parts_of(jobs, job.parts()).await?;
    let Some(status) = Status::of(job, &parts, batch, now) else {
        return Ok(());
    };
    let path = job
        .results_folder()
        .unwrap_or_else(|| job.input().output_path());
    write(store, output_container, path, &status).await?;
    Ok(())
}

/// The split input `key`'s `status.json`, from its parts' records as they are now, written
/// only when it says something new (anything but `updated_at`). Called after its parts were
/// advanced (at intake and on each tick), so it follows them within a tick. Best effort, as
/// [`publish`].
pub async fn refresh_split(
    store: &BlobStore,
    jobs: &JobStore,
    output_container: &str,
    key: &str,
    now: i64,
) {
    let refreshed = async {
        let Some((job, _)) = jobs.load_active(key).await? else {
            return Ok(());
        };
        if !matches!(job, AnyJob::Split(_)) {
            return Ok(());
        }
        let parts = parts_of(jobs, job.parts()).await?;
        let Some(status) = Status::of(&job, &parts, None, now) else {
            return Ok(());
        };
        let path = job.input().output_path();
        let before = match store.read(output_container, &status_name(path)).await? {
            Some((bytes, _)) => serde_json::from_slice::<Status>(&bytes).ok(),
            None => None,
        };
        if let Some(before) = before {
            let mut same = before.clone();
            same.updated_at = status.updated_at;
            if same == status {
                return Ok(());
            }
        }
        write(store, output_container, path, &status).await?;
        Ok::<(), JobStoreError>(())
    };
    if let Err(e) = refreshed.await {
        tracing::warn!(job = %key, "status.json not written (the next tick writes it): {e}");
    }
}

pub async fn write(
    store: &BlobStore,
    container: &str,
    output_path: &str,
    status: &Status,
) -> Result<(), StorageError> {
    let body = serde_json::to_vec_pretty(status).expect("status always serializes");
    store
        .write(
            container,
            &status_name(output_path),
            Bytes::from(body),
            WriteCondition::Always,
            "application/json",
        )
        .await
        .map(|_| ())
}

/// Removes `{output_path}/status.json` (no fault when it is not there).
pub async fn delete(
    store: &BlobStore,
    container: &str,
    output_path: &str,
) -> Result<(), StorageError> {
    store
        .delete(container, &status_name(output_path), None)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_finish_is_estimated_from_the_rate_so_far() {
        let counts = RequestCounts {
            total: 100,
            completed: 20,
            failed: 5,
        };
        // 25 in 50 s: the other 75 take 150 s more.
        assert_eq!(estimate_finish(1000, &counts, 1050), Some(1200));
        let none = RequestCounts {
            total: 100,
            ..Default::default()
        };
        assert_eq!(estimate_finish(1000, &none, 1050), None, "no progress yet");
    }

    #[test]
    fn times_in_sentences_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
