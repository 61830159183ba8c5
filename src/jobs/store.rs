//! Where job records live: JSON blobs in the state container, `active/{key}.json` while a
//! job runs and `done/{key}.json` once it has finished, written with ETag conditions.

use std::sync::Arc;

use bytes::Bytes;

use crate::storage::{BlobStore, StorageError, WriteCondition};

use super::{AnyJob, Finished, Job, JobState, State, Submitting};

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

    fn encode<S: State>(job: &Job<S>) -> Bytes {
        // Plain structs with string keys: serializing cannot fail.
        Bytes::from(serde_json::to_vec_pretty(job).expect("records always serialize"))
    }

    async fn write_active<S: State>(
        &self,
        rec: &Job<S>,
        condition: WriteCondition,
    ) -> Result<String, StorageError> {
        self.store
            .write(
                &self.container,
                &Self::active(rec.key()),
                Self::encode(rec),
                condition,
                "application/json",
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
