//! Where job records live: JSON blobs in the state container, `active/{key}.json` while a
//! job runs and `done/{key}.json` once it has finished, written with ETag conditions.

use std::sync::Arc;

use bytes::Bytes;

use crate::storage::{BlobStore, StorageError, WriteCondition};

use super::{AnyJob, Finished, Job, JobIndex, JobState, State, Submitting};

#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Not JSON, or fields that contradict its state (`InvalidRecord` says which).
    #[error("job record {name} cannot be read: {source}")]
    Corrupt {
        name: String,
        source: serde_json::Error,
    },
    #[error("job record {name} is filed as finished but is {state:?}")]
    NotFinished { name: String, state: JobState },
}

impl JobStoreError {
    pub fn is_transient(&self) -> bool {
        matches!(self, JobStoreError::Storage(e) if e.is_transient())
    }
}

/// One record of an input's versions (`JobStore::versions_of`).
pub struct Version {
    pub job: AnyJob,
    /// The record's own ETag, for an `If-Match` update.
    pub etag: String,
    /// Under `active/` (else `done/`).
    pub active: bool,
}

/// The prefixes under which the keys of `name`'s jobs start: `{name}@`, and for a name so
/// long that its keys are hashed (`job_key`), the hashed keys' readable start too.
fn key_prefixes(name: &str) -> Vec<String> {
    let mut prefixes = vec![format!("{name}@")];
    if name.len() > 800 {
        prefixes.push(format!("{}…@", &name[..name.floor_char_boundary(200)]));
    }
    prefixes
}

/// Where a claim attempt stands.
pub enum Claim {
    Claimed { etag: String },
    Exists,
}

/// An active job as the listing of `active/` describes it, without reading its record.
#[derive(Debug, Clone)]
pub struct ActiveEntry {
    pub key: String,
    pub etag: String,
    /// `None` for a record written without one (an earlier version): read the record.
    pub index: Option<JobIndex>,
}

/// The job records in the state container.
#[derive(Clone)]
pub struct JobStore {
    store: Arc<BlobStore>,
    container: String,
}

const ACTIVE: &str = "active/";
const DONE: &str = "done/";
/// Where the timer's sweep keeps its mark (`sweep_mark`).
const SWEEP_MARK: &str = "sweep.json";

/// Where the timer's sweep of the input container stands, as stored. A sweep lists the
/// container a window of pages per tick (`BATCH_SWEEP_INPUTS_PER_TICK`); a container larger
/// than one window is covered over several ticks, a cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SweepState {
    /// Every input last modified before this (storage's clock, unix seconds) was looked at
    /// by a cycle that finished with every input it found taken in. `None`: no cycle has.
    #[serde(rename = "inputs_seen_until", default)]
    pub mark: Option<i64>,
    /// Where the cycle under way goes on (storage's continuation marker); `None`: the next
    /// window starts a cycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// The last name the cycle's previous window listed: the next window covers the names
    /// after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// When the cycle under way began (this handler's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle_started_at: Option<i64>,
    /// The newest Last-Modified the cycle has seen so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cycle_newest: Option<i64>,
    /// An intake the cycle started failed: its mark does not move.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cycle_faulted: bool,
}

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

    fn encode<S: State>(job: &Job<S>) -> Bytes {
        // Plain structs with string keys: serializing cannot fail.
        Bytes::from(serde_json::to_vec_pretty(job).expect("records always serialize"))
    }

    async fn write_active<S: State>(
        &self,
        rec: &Job<S>,
        condition: WriteCondition,
    ) -> Result<String, StorageError> {
        // The index goes in the same request as the record: a listing never shows one
        // with the other's older version.
        self.store
            .write_with_metadata(
                &self.container,
                &Self::active(rec.key()),
                Self::encode(rec),
                condition,
                "application/json",
                rec.index().to_metadata(),
            )
            .await
    }

    /// Creates the active record; `Exists` when some invocation already did.
    pub async fn claim(&self, rec: &Job<Submitting>) -> Result<Claim, JobStoreError> {
        match self.write_active(rec, WriteCondition::IfNotExists).await {
            Ok(etag) => Ok(Claim::Claimed { etag }),
            Err(StorageError::AlreadyExists { .. }) | Err(StorageError::ConditionNotMet { .. }) => {
                Ok(Claim::Exists)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn load(&self, name: &str) -> Result<Option<(AnyJob, String)>, JobStoreError> {
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

    pub async fn load_active(&self, key: &str) -> Result<Option<(AnyJob, String)>, JobStoreError> {
        self.load(&Self::active(key)).await
    }

    /// A finished job's record; anything else under `done/` was not written by this handler.
    pub async fn load_done(&self, key: &str) -> Result<Option<Job<Finished>>, JobStoreError> {
        match self.load(&Self::done(key)).await? {
            None => Ok(None),
            Some((AnyJob::Finished(job), _)) => Ok(Some(job)),
            Some((other, _)) => Err(JobStoreError::NotFinished {
                name: Self::done(key),
                state: other.state(),
            }),
        }
    }

    /// Replaces the active record if it is still the version read (`etag`). Returns
    /// `Ok(None)` when someone else changed it first: the caller has lost the race and stops.
    pub async fn update<S: State>(
        &self,
        rec: &Job<S>,
        etag: &str,
    ) -> Result<Option<String>, JobStoreError> {
        match self
            .write_active(rec, WriteCondition::IfMatch(etag.to_string()))
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
    pub async fn finish(&self, rec: &Job<Finished>, etag: &str) -> Result<(), JobStoreError> {
        self.store
            .write(
                &self.container,
                &Self::done(rec.key()),
                Self::encode(rec),
                WriteCondition::Always,
                "application/json",
            )
            .await?;
        // Someone updated it after we read it: our finished copy stands in done/.
        self.abandon(rec.key(), etag).await
    }

    /// Drops the active record if it is still the version read (input gone or replaced, or
    /// filed under done/); someone else's newer version stays.
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

    /// Every record, active and finished, of the input blob `name` (each version it has had:
    /// one job per ETag), with whether it is active and its ETag; parts of split inputs
    /// are left out (they are their parent's). Lists only that name's records.
    pub async fn versions_of(&self, name: &str) -> Result<Vec<Version>, JobStoreError> {
        use futures::TryStreamExt;
        let mut out = Vec::new();
        for (dir, active) in [(ACTIVE, true), (DONE, false)] {
            let mut names = Vec::new();
            for prefix in key_prefixes(name) {
                let listed: Vec<_> = self
                    .store
                    .list(&self.container, &format!("{dir}{prefix}"))
                    .try_collect()
                    .await?;
                names.extend(listed.into_iter().map(|b| b.name));
            }
            for record in names {
                let Some((job, etag)) = self.load(&record).await? else {
                    continue; // finished and moved since the listing
                };
                if job.part_of().is_none() && job.input().name == name {
                    out.push(Version { job, etag, active });
                }
            }
        }
        Ok(out)
    }

    /// The keys of every active job.
    pub async fn active_keys(&self) -> Result<Vec<String>, JobStoreError> {
        self.keys_under(ACTIVE).await
    }

    /// Every active job with its index, from the listing alone (5,000 a request).
    pub async fn active_entries(&self) -> Result<Vec<ActiveEntry>, JobStoreError> {
        use futures::TryStreamExt;
        let items: Vec<_> = self
            .store
            .list_with_metadata(&self.container, ACTIVE)
            .try_collect()
            .await?;
        Ok(items
            .into_iter()
            .filter_map(|(b, metadata)| {
                let key = b.name.strip_prefix(ACTIVE)?.strip_suffix(".json")?;
                Some(ActiveEntry {
                    key: key.to_string(),
                    etag: b.etag,
                    index: JobIndex::from_metadata(&metadata),
                })
            })
            .collect())
    }

    /// Whether the job has finished (its record is under `done/`), in one request.
    pub async fn is_done(&self, key: &str) -> Result<bool, JobStoreError> {
        Ok(self
            .store
            .properties(&self.container, &Self::done(key))
            .await?
            .is_some())
    }

    /// The sweep's mark; `None` before the first sweep finished, or when the mark cannot be
    /// read: the sweep then looks at every input, as it always did.
    /// The sweep's state; the default (a first cycle) when none is stored or it cannot be
    /// read.
    pub async fn sweep_state(&self) -> Result<SweepState, JobStoreError> {
        Ok(self
            .store
            .read(&self.container, SWEEP_MARK)
            .await?
            .and_then(|(bytes, _)| serde_json::from_slice::<SweepState>(&bytes).ok())
            .unwrap_or_default())
    }

    pub async fn set_sweep_state(&self, state: &SweepState) -> Result<(), JobStoreError> {
        let body = serde_json::to_vec(state).expect("the sweep's state serializes");
        self.store
            .write(
                &self.container,
                SWEEP_MARK,
                Bytes::from(body),
                WriteCondition::Always,
                "application/json",
            )
            .await?;
        Ok(())
    }

    /// The keys of every finished job.
    pub async fn done_keys(&self) -> Result<std::collections::HashSet<String>, JobStoreError> {
        self.keys_under(DONE).await
    }

    /// The keys of every finished job, the most recently finished first, from the listing
    /// alone: a record is written to `done/` when its job finishes, so its Last-Modified
    /// says when. A caller wanting the latest few reads those few, not the whole history.
    pub async fn done_keys_newest_first(&self) -> Result<Vec<String>, JobStoreError> {
        use futures::TryStreamExt;
        let items: Vec<_> = self.store.list(&self.container, DONE).try_collect().await?;
        let mut dated: Vec<(Option<i64>, String)> = items
            .into_iter()
            .filter_map(|b| {
                let key = b.name.strip_prefix(DONE)?.strip_suffix(".json")?;
                Some((b.modified, key.to_string()))
            })
            .collect();
        dated.sort_by(|a, b| b.cmp(a));
        Ok(dated.into_iter().map(|(_, k)| k).collect())
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
