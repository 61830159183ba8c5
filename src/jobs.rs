//! Job records and their state machine: the one place that says which step may follow which.
//!
//! A job is one input blob version: the key is (blob name, ETag), so the same event delivered
//! twice, two instances racing, or a crash and retry all meet the same record, while a
//! re-upload (new ETag) is a new job. Records are JSON blobs in the state container, written
//! with ETag conditions: `If-None-Match: *` to claim, `If-Match` to update. Active jobs live
//! under `active/`, finished ones under `done/`, so a timer tick lists only what is active.
//!
//! ```text
//!   claim ──▶ submitting ──create──▶ running ──terminal status──▶ harvesting ──▶ finished
//!                 │  ▲                                                          (done/)
//!    token limit  ▼  │ retry after backoff
//!               queued
//!   submitting ──invalid input / hopeless create──▶ finished (rejected / failed)
//!
//!   submitting ──input beyond the limits──▶ split ──every part finished──▶ harvesting ──▶ finished
//! ```
//!
//! A split job's parts are jobs of their own (`part_of` names the parent; key
//! `{parent key}/part-NNNN`), each reading a staged slice of the input and going through the
//! same states; their results land in the staging folder, and the parent combines them.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    openai::{Batch, RequestCounts},
    storage::{BlobStore, StorageError, WriteCondition},
};

pub fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Claimed by an invocation (see `lease_until`): validating, then creating the batch.
    Submitting,
    /// Waiting for quota (`token_limit_exceeded`) until `next_attempt_at`.
    Queued,
    /// A batch exists (`batch_id`) and has not ended.
    Running,
    /// The input was split (`parts`); each part is its own job, and this one waits for them.
    Split,
    /// The batch ended (or, for a split job, every part did); results are being moved into
    /// place.
    Harvesting,
    /// Nothing more will happen; `outcome` says how it ended.
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

impl JobRecord {
    /// Where the job's files go: the output container for an input, the staging folder (in
    /// the state container) for a part, whose parent then combines them.
    pub fn output_container<'a>(&self, config: &'a crate::config::Config) -> &'a str {
        if self.part_of.is_some() {
            &config.state_container
        } else {
            &config.output_container
        }
    }
}

/// What validation learnt about the input, kept so a retry need not read it again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFacts {
    pub lines: u64,
    pub endpoint: String,
    pub model: String,
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
}

impl PartRef {
    pub fn last_line(&self) -> u64 {
        self.first_line + self.requests - 1
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

/// One batch of a job that has had follow-ups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub batch_id: String,
    pub status: String,
    pub request_counts: RequestCounts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub at: i64,
    pub state: JobState,
    pub note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub key: String,
    pub input: InputRef,
    pub state: JobState,
    #[serde(default)]
    pub outcome: Option<Outcome>,
    #[serde(default)]
    pub facts: Option<InputFacts>,
    #[serde(default)]
    pub batch_id: Option<String>,
    #[serde(default)]
    pub batch_status: Option<String>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    /// Who holds the `submitting` claim, and until when.
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub lease_until: Option<i64>,
    /// Set just before calling create and cleared once the answer is recorded: when found set
    /// by a later invocation, the batch may exist, so it is looked up before creating again.
    #[serde(default)]
    pub create_started_at: Option<i64>,
    /// While a create call may still be in flight (see `begin_create`).
    #[serde(default)]
    pub create_in_flight_until: Option<i64>,
    /// Create attempts refused for quota.
    #[serde(default)]
    pub quota_attempts: u32,
    #[serde(default)]
    pub next_attempt_at: Option<i64>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// 0 for the first batch; n for the n-th follow-up batch of requests left unanswered.
    #[serde(default)]
    pub round: u32,
    /// The batches of earlier rounds, for the summary.
    #[serde(default)]
    pub rounds: Vec<RoundRecord>,
    /// The staged input of the current follow-up round (a blob in the state container).
    #[serde(default)]
    pub followup_url: Option<String>,
    /// Which harvest steps are done, so an interrupted harvest resumes where it stopped.
    #[serde(default)]
    pub harvest: Option<crate::harvest::HarvestProgress>,
    /// Where the results go, relative to the output container, once harvest has chosen it
    /// (see `App::results_folder`); kept for follow-up rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_folder: Option<String>,
    /// A split job's parts, in input order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<PartRef>,
    /// Set when this job is one part of a split input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_of: Option<PartOf>,
    pub created_at: i64,
    pub updated_at: i64,
    #[serde(default)]
    pub history: Vec<HistoryEntry>,
}

const TAKEN_OVER: &str = "taken over";

/// A transition that the state machine does not allow from the record's state.
#[derive(Debug, thiserror::Error)]
#[error("job {key}: cannot {action} while {state:?}")]
pub struct InvalidTransition {
    pub key: String,
    pub action: &'static str,
    pub state: JobState,
}

impl JobRecord {
    pub fn claim(input: InputRef, owner: &str, lease_secs: u64) -> Self {
        let t = now();
        let mut rec = JobRecord {
            key: job_key(&input.name, &input.etag),
            input,
            state: JobState::Submitting,
            outcome: None,
            facts: None,
            batch_id: None,
            batch_status: None,
            request_counts: None,
            owner: Some(owner.to_string()),
            lease_until: Some(t + lease_secs as i64),
            create_started_at: None,
            create_in_flight_until: None,
            quota_attempts: 0,
            next_attempt_at: None,
            last_error: None,
            round: 0,
            rounds: Vec::new(),
            followup_url: None,
            harvest: None,
            results_folder: None,
            parts: Vec::new(),
            part_of: None,
            created_at: t,
            updated_at: t,
            history: Vec::new(),
        };
        rec.note("claimed");
        rec
    }

    /// The job of one part of the split job `parent`, already validated (the whole input
    /// was), reading the staged slice `input`.
    pub fn claim_part(
        parent: &JobRecord,
        part: &PartRef,
        input: InputRef,
        owner: &str,
        lease_secs: u64,
    ) -> Self {
        let mut rec = JobRecord::claim(input, owner, lease_secs);
        rec.key = part.key.clone();
        rec.part_of = Some(PartOf {
            parent: parent.key.clone(),
            index: part.index,
            line_offset: part.first_line - 1,
        });
        rec.facts = parent.facts.clone().map(|f| InputFacts {
            lines: part.requests,
            ..f
        });
        rec.note(format!(
            "part {} of {}: input lines {}–{}",
            part.index,
            parent.key,
            part.first_line,
            part.last_line()
        ));
        rec
    }

    fn note(&mut self, note: impl Into<String>) {
        self.updated_at = now();
        self.history.push(HistoryEntry {
            at: self.updated_at,
            state: self.state,
            note: note.into(),
        });
    }

    fn expect(&self, action: &'static str, allowed: &[JobState]) -> Result<(), InvalidTransition> {
        if allowed.contains(&self.state) {
            Ok(())
        } else {
            Err(InvalidTransition {
                key: self.key.clone(),
                action,
                state: self.state,
            })
        }
    }

    /// True while another invocation's claim on a `submitting` job is still live.
    pub fn is_leased(&self, at: i64) -> bool {
        self.state == JobState::Submitting
            && (self.lease_until.is_some_and(|l| l > at)
                || self.create_in_flight_until.is_some_and(|l| l > at))
    }

    /// Whether an earlier holder of the claim may have done part of the work.
    pub fn was_taken_over(&self) -> bool {
        self.history.iter().any(|h| h.note.starts_with(TAKEN_OVER))
    }

    /// Takes over a `submitting` job whose claim lapsed, or a `queued` job whose wait is over.
    pub fn take_over(&mut self, owner: &str, lease_secs: u64) -> Result<(), InvalidTransition> {
        self.expect("take over", &[JobState::Submitting, JobState::Queued])?;
        let previous = self.owner.clone().unwrap_or_default();
        self.state = JobState::Submitting;
        self.owner = Some(owner.to_string());
        self.lease_until = Some(now() + lease_secs as i64);
        self.note(format!("{TAKEN_OVER} (previous owner {previous})"));
        Ok(())
    }

    pub fn validated(&mut self, facts: InputFacts) -> Result<(), InvalidTransition> {
        self.expect("record validation", &[JobState::Submitting])?;
        self.note(format!(
            "validated: {} requests, endpoint {}, model {}",
            facts.lines, facts.endpoint, facts.model
        ));
        self.facts = Some(facts);
        Ok(())
    }

    /// Notes that a create call is about to be sent. Until `window_secs` have passed the call
    /// may still be on its way, and nobody else may look for its batch (not finding it yet)
    /// and create another: the claim holds at least that long.
    pub fn begin_create(
        &mut self,
        lease_secs: u64,
        window_secs: u64,
    ) -> Result<(), InvalidTransition> {
        self.expect("create a batch", &[JobState::Submitting])?;
        let t = now();
        self.create_started_at = Some(t);
        self.create_in_flight_until = Some(t + window_secs as i64);
        self.lease_until = Some(t + lease_secs as i64);
        self.note("creating batch");
        Ok(())
    }

    pub fn submitted(&mut self, batch: &Batch, adopted: bool) -> Result<(), InvalidTransition> {
        self.expect("record the batch", &[JobState::Submitting])?;
        self.state = JobState::Running;
        self.batch_id = Some(batch.id.clone());
        self.batch_status = Some(batch.status.to_string());
        self.request_counts = Some(batch.request_counts.clone());
        self.owner = None;
        self.lease_until = None;
        self.create_started_at = None;
        self.create_in_flight_until = None;
        self.next_attempt_at = None;
        self.last_error = None;
        self.note(if adopted {
            format!("adopted existing batch {}", batch.id)
        } else {
            format!("batch {} created", batch.id)
        });
        Ok(())
    }

    /// The input is beyond the limits of one batch: its parts (staged) become jobs of their
    /// own, and this one waits for them.
    pub fn split(&mut self, parts: Vec<PartRef>) -> Result<(), InvalidTransition> {
        self.expect("split", &[JobState::Submitting])?;
        self.state = JobState::Split;
        self.owner = None;
        self.lease_until = None;
        self.note(format!("split into {} parts", parts.len()));
        self.parts = parts;
        Ok(())
    }

    /// Every part of a split job has finished: their results are combined next.
    pub fn parts_finished(&mut self) -> Result<(), InvalidTransition> {
        self.expect("combine parts", &[JobState::Split])?;
        self.state = JobState::Harvesting;
        self.note("every part finished; combining their results");
        Ok(())
    }

    /// The quota was full: wait `delay_secs`, then the timer tries again.
    pub fn queue(&mut self, reason: &str, delay_secs: u64) -> Result<(), InvalidTransition> {
        self.expect("queue", &[JobState::Submitting, JobState::Running])?;
        self.state = JobState::Queued;
        self.quota_attempts += 1;
        self.next_attempt_at = Some(now() + delay_secs as i64);
        self.owner = None;
        self.lease_until = None;
        self.create_started_at = None;
        self.create_in_flight_until = None;
        self.batch_id = None;
        self.last_error = Some(reason.to_string());
        self.note(format!(
            "queued for quota (attempt {}), next try in {delay_secs} s",
            self.quota_attempts
        ));
        Ok(())
    }

    /// A transient fault: keep the job as it is but let the next invocation take it at once.
    pub fn release(&mut self, error: &str) -> Result<(), InvalidTransition> {
        self.expect("release", &[JobState::Submitting])?;
        self.lease_until = Some(now());
        // The create call (if any) has returned: the next holder may look for its batch.
        self.create_in_flight_until = None;
        self.last_error = Some(error.to_string());
        self.note(format!("released after a transient fault: {error}"));
        Ok(())
    }

    pub fn observe(&mut self, batch: &Batch) -> Result<(), InvalidTransition> {
        self.expect("record batch status", &[JobState::Running])?;
        let changed = self.batch_status.as_deref() != Some(batch.status.as_str());
        self.batch_status = Some(batch.status.to_string());
        self.request_counts = Some(batch.request_counts.clone());
        if batch.status.is_terminal() {
            self.state = JobState::Harvesting;
            self.note(format!("batch ended: {}", batch.status));
        } else if changed {
            self.note(format!("batch status {}", batch.status));
        }
        Ok(())
    }

    /// The blob the current round's batch reads: the input, or a follow-up's staged lines.
    pub fn batch_input_url(&self) -> &str {
        self.followup_url.as_deref().unwrap_or(&self.input.url)
    }

    /// The batch ended with requests unanswered: a follow-up batch takes them, under a fresh
    /// claim, reading `staged_url`.
    pub fn follow_up(
        &mut self,
        staged_url: String,
        lines: u64,
        owner: &str,
        lease_secs: u64,
    ) -> Result<(), InvalidTransition> {
        self.expect("start a follow-up", &[JobState::Harvesting])?;
        self.rounds.push(RoundRecord {
            batch_id: self.batch_id.clone().unwrap_or_default(),
            status: self.batch_status.clone().unwrap_or_default(),
            request_counts: self.request_counts.clone().unwrap_or_default(),
        });
        self.round += 1;
        self.state = JobState::Submitting;
        self.batch_id = None;
        self.batch_status = None;
        self.request_counts = None;
        self.followup_url = Some(staged_url);
        self.harvest = None;
        self.owner = Some(owner.to_string());
        self.lease_until = Some(now() + lease_secs as i64);
        self.note(format!(
            "follow-up round {}: resubmitting {lines} unanswered request(s)",
            self.round
        ));
        Ok(())
    }

    pub fn finish(&mut self, outcome: Outcome, note: &str) -> Result<(), InvalidTransition> {
        self.expect(
            "finish",
            &[
                JobState::Submitting,
                JobState::Queued,
                JobState::Running,
                JobState::Split,
                JobState::Harvesting,
            ],
        )?;
        self.state = JobState::Finished;
        self.outcome = Some(outcome);
        self.owner = None;
        self.lease_until = None;
        self.next_attempt_at = None;
        self.note(format!("finished {}: {note}", outcome.as_str()));
        Ok(())
    }
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

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("job record {name} is not valid JSON: {source}")]
    Corrupt {
        name: String,
        source: serde_json::Error,
    },
}

impl JobStoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, JobStoreError::Storage(e) if e.is_transient())
    }
}

/// Where a claim attempt stands.
pub enum Claim {
    Claimed { etag: String },
    Exists,
}

/// The job records in the state container.
#[derive(Clone)]
pub struct JobStore {
    store: Arc<BlobStore>,
    container: String,
}

const ACTIVE: &str = "active/";
const DONE: &str = "done/";

impl JobStore {
    pub fn new(store: Arc<BlobStore>, container: String) -> Self {
        Self { store, container }
    }

    pub fn container(&self) -> &str {
        &self.container
    }

    fn active(key: &str) -> String {
        format!("{ACTIVE}{key}.json")
    }

    fn done(key: &str) -> String {
        format!("{DONE}{key}.json")
    }

    fn encode(rec: &JobRecord) -> Bytes {
        Bytes::from(serde_json::to_vec_pretty(rec).expect("records always serialize"))
    }

    /// Creates the active record; `Exists` when some invocation already did.
    pub async fn claim(&self, rec: &JobRecord) -> Result<Claim, JobStoreError> {
        match self
            .store
            .write(
                &self.container,
                &Self::active(&rec.key),
                Self::encode(rec),
                WriteCondition::IfNotExists,
                "application/json",
            )
            .await
        {
            Ok(etag) => Ok(Claim::Claimed { etag }),
            Err(StorageError::AlreadyExists { .. }) | Err(StorageError::ConditionNotMet { .. }) => {
                Ok(Claim::Exists)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn load(&self, name: &str) -> Result<Option<(JobRecord, String)>, JobStoreError> {
        match self.store.read(&self.container, name).await? {
            None => Ok(None),
            Some((bytes, etag)) => {
                let rec =
                    serde_json::from_slice(&bytes).map_err(|source| JobStoreError::Corrupt {
                        name: name.to_string(),
                        source,
                    })?;
                Ok(Some((rec, etag)))
            }
        }
    }

    pub async fn load_active(
        &self,
        key: &str,
    ) -> Result<Option<(JobRecord, String)>, JobStoreError> {
        self.load(&Self::active(key)).await
    }

    pub async fn load_done(&self, key: &str) -> Result<Option<JobRecord>, JobStoreError> {
        Ok(self.load(&Self::done(key)).await?.map(|(r, _)| r))
    }

    /// Replaces the active record if it is still the version read (`etag`). Returns
    /// `Ok(None)` when someone else changed it first: the caller has lost the race and stops.
    pub async fn update(
        &self,
        rec: &JobRecord,
        etag: &str,
    ) -> Result<Option<String>, JobStoreError> {
        match self
            .store
            .write(
                &self.container,
                &Self::active(&rec.key),
                Self::encode(rec),
                WriteCondition::IfMatch(etag.to_string()),
                "application/json",
            )
            .await
        {
            Ok(etag) => Ok(Some(etag)),
            Err(StorageError::ConditionNotMet { .. }) | Err(StorageError::NotFound { .. }) => {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves a finished record to `done/`: written there first, then removed from `active/`,
    /// so at every instant one of the two exists and a late event cannot start the job again.
    pub async fn finish(&self, rec: &JobRecord, etag: &str) -> Result<(), JobStoreError> {
        debug_assert_eq!(rec.state, JobState::Finished);
        self.store
            .write(
                &self.container,
                &Self::done(&rec.key),
                Self::encode(rec),
                WriteCondition::Always,
                "application/json",
            )
            .await?;
        self.store
            .delete(&self.container, &Self::active(&rec.key), Some(etag))
            .await
            .or_else(|e| match e {
                // Someone updated it after we read it; our finished copy stands in done/.
                StorageError::ConditionNotMet { .. } => Ok(false),
                e => Err(e),
            })?;
        Ok(())
    }

    /// Drops a claim that turned out to be for nothing (input gone or replaced).
    pub async fn abandon(&self, key: &str, etag: &str) -> Result<(), JobStoreError> {
        self.store
            .delete(&self.container, &Self::active(key), Some(etag))
            .await
            .or_else(|e| match e {
                StorageError::ConditionNotMet { .. } => Ok(false),
                e => Err(e),
            })?;
        Ok(())
    }

    /// The keys of every active job.
    pub async fn active_keys(&self) -> Result<Vec<String>, JobStoreError> {
        self.keys_under(ACTIVE).await
    }

    /// The keys of every finished job.
    pub async fn done_keys(&self) -> Result<std::collections::HashSet<String>, JobStoreError> {
        self.keys_under(DONE).await
    }

    async fn keys_under<C: FromIterator<String>>(&self, prefix: &str) -> Result<C, JobStoreError> {
        use futures::TryStreamExt;
        let items: Vec<_> = self
            .store
            .list(&self.container, prefix)
            .try_collect()
            .await?;
        Ok(items
            .into_iter()
            .filter_map(|b| {
                b.name
                    .strip_prefix(prefix)
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::BatchStatus;

    fn input() -> InputRef {
        InputRef {
            container: "batch-input".into(),
            name: "dir/test.jsonl".into(),
            etag: "\"0x8D4\"".into(),
            size: 10,
            url: "https://a.blob.core.windows.net/batch-input/dir/test.jsonl".into(),
        }
    }

    fn batch(status: &str) -> Batch {
        serde_json::from_value(serde_json::json!({"id": "batch_1", "status": status})).unwrap()
    }

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
        assert_eq!(input().output_path(), "dir/test");
    }

    #[test]
    fn the_happy_path_is_allowed_in_order() {
        let mut r = JobRecord::claim(input(), "me", 60);
        assert!(r.is_leased(now()));
        r.validated(InputFacts {
            lines: 3,
            endpoint: "/chat/completions".into(),
            model: "m".into(),
        })
        .unwrap();
        r.begin_create(60, 120).unwrap();
        r.submitted(&batch("validating"), false).unwrap();
        assert_eq!(r.state, JobState::Running);
        assert!(r.create_started_at.is_none());
        r.observe(&batch("in_progress")).unwrap();
        assert_eq!(r.state, JobState::Running);
        r.observe(&batch("completed")).unwrap();
        assert_eq!(r.state, JobState::Harvesting);
        r.finish(Outcome::Completed, "results in place").unwrap();
        assert_eq!(r.state, JobState::Finished);
        assert_eq!(
            r.batch_status.as_deref(),
            Some(BatchStatus::Completed.as_str())
        );
    }

    #[test]
    fn out_of_order_steps_are_refused() {
        let mut r = JobRecord::claim(input(), "me", 60);
        assert!(r.observe(&batch("completed")).is_err());
        r.finish(Outcome::Rejected, "bad input").unwrap();
        assert!(r.begin_create(60, 120).is_err());
        assert!(r.take_over("other", 60).is_err());
        assert!(r.finish(Outcome::Completed, "again").is_err());
    }

    #[test]
    fn a_create_in_flight_holds_the_claim_past_its_lease() {
        let mut r = JobRecord::claim(input(), "me", 2);
        r.begin_create(2, 120).unwrap();
        assert!(
            r.is_leased(now() + 60),
            "the create may still be on its way"
        );
        assert!(!r.is_leased(now() + 121));
        r.release("HTTP 500").unwrap();
        assert!(
            !r.is_leased(now() + 1),
            "a returned create frees the claim at once"
        );
    }

    #[test]
    fn a_split_job_waits_for_its_parts_then_harvests() {
        let mut r = JobRecord::claim(input(), "me", 60);
        r.validated(InputFacts {
            lines: 25,
            endpoint: "/chat/completions".into(),
            model: "m".into(),
        })
        .unwrap();
        let part = PartRef {
            index: 2,
            key: format!("{}/part-0002", r.key),
            blob: "staging/x/part-0002.jsonl".into(),
            etag: "\"0x9\"".into(),
            first_line: 11,
            requests: 10,
            bytes: 100,
        };
        assert!(r.parts_finished().is_err(), "not split yet");
        r.split(vec![part.clone()]).unwrap();
        assert_eq!(r.state, JobState::Split);
        assert!(!r.is_leased(now()), "a split job holds no claim");
        assert!(r.take_over("other", 60).is_err());

        let mut staged = input();
        staged.name = part.blob.clone();
        let child = JobRecord::claim_part(&r, &part, staged, "me", 60);
        assert_eq!(child.key, part.key);
        assert_eq!(child.part_of.as_ref().unwrap().line_offset, 10);
        assert_eq!(child.facts.as_ref().unwrap().lines, 10);
        assert_eq!(child.facts.as_ref().unwrap().model, "m");

        r.parts_finished().unwrap();
        assert_eq!(r.state, JobState::Harvesting);
        r.finish(Outcome::Completed, "combined").unwrap();
    }

    #[test]
    fn queue_then_take_over_counts_attempts() {
        let mut r = JobRecord::claim(input(), "me", 60);
        r.begin_create(60, 120).unwrap();
        r.queue("token_limit_exceeded", 30).unwrap();
        assert_eq!(r.state, JobState::Queued);
        assert_eq!(r.quota_attempts, 1);
        assert!(
            r.create_started_at.is_none(),
            "a refused create made no batch"
        );
        r.take_over("timer", 60).unwrap();
        assert_eq!(r.state, JobState::Submitting);
        assert!(r.is_leased(now()));
        r.release("HTTP 503").unwrap();
        assert!(!r.is_leased(now() + 1));
    }
}
