//! What every workflow works with: the services and settings built once at start-up
//! (`App`), the clock, the per-invocation journal, and the error a workflow step stops on.
//!
//! `App` is a plain context: the workflows (`submit`, `poll`, `harvest`, `split`) are modules
//! of functions that take `&App`, so which workflow calls which is written in their imports
//! and runs one way (see `lib.rs`).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicI64, Ordering},
};

use azure_core::credentials::TokenCredential;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};

use crate::{
    config::{Config, StorageAuth},
    jobs::{JobStore, JobStoreError},
    openai::{Auth, BatchClient, OpenAiError, RetryConfig},
    storage::{BlobStore, RetryPolicy, StorageError},
};

/// Every step after which `BATCH_TEST_FAULT` can kill the process, in the order they run.
pub const FAULT_POINTS: &[&str] = &[
    "submit:after-claim",
    "submit:after-validate",
    "submit:before-create",
    "submit:after-create",
    "submit:after-record",
    "harvest:after-clear",
    "harvest:after-copy",
    "harvest:after-results",
    "harvest:after-errors",
    "harvest:after-merged",
    "harvest:after-summary",
    "split:after-stage",
    "split:after-record",
    "split:after-results",
    "split:after-summary",
];

/// Everything an invocation needs, shared by all of them.
pub struct App {
    pub config: Config,
    pub store: Arc<BlobStore>,
    pub jobs: JobStore,
    /// The client of the first endpoint: `pool[0]`.
    pub openai: BatchClient,
    /// One client per endpoint of `AZURE_OPENAI_ENDPOINT`, in its order.
    pub pool: Vec<BatchClient>,
    /// This process, as the owner of the claims it takes.
    pub instance: String,
    pub clock: Clock,
    /// One writer at a time, in this process, per deployment's capacity ledgers.
    pub ledger_locks: KeyedLocks,
}

/// Async locks by name, made on first use. The capacity ledgers are shared truth guarded by
/// ETags across instances; within one process, the 32 intakes of a sweep would otherwise race
/// each other for the same blob and lose most writes (412), each loss a read, a pause and a
/// retry. Taking turns here leaves the ETag to settle only what other instances write.
#[derive(Debug, Default)]
pub struct KeyedLocks {
    locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(key.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// The handler's time in unix seconds: the system clock, plus an offset that only the test
/// hooks of a debug build move (`server`), so a test lets a lease lapse without waiting.
#[derive(Debug, Default)]
pub struct Clock {
    offset_secs: AtomicI64,
}

impl Clock {
    pub fn now(&self) -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp() + self.offset_secs.load(Ordering::Relaxed)
    }

    pub fn advance(&self, secs: i64) {
        self.offset_secs.fetch_add(secs, Ordering::Relaxed);
    }
}

/// A workflow step (intake, poll, harvest) stopped on a fault worth retrying: storage or the
/// service unavailable. The trigger answers 5xx so Event Grid redelivers; the timer leaves the
/// job for its next tick. The job record always stays claimable.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Jobs(#[from] JobStoreError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    OpenAi(#[from] OpenAiError),
    /// A bug: the step panicked. Caught where the step was started (`guarded`), so the
    /// panic is reported with what it was working on and the other steps go on.
    #[error("{what}: the handler panicked (a bug; please report it): {message}")]
    Panicked { what: String, message: String },
}

/// Runs one step so that a panic in it ends that step with `StepError::Panicked` naming
/// `what` (a blob, a job), instead of unwinding through the tick or the route that ran it.
pub async fn guarded<T>(
    what: impl Into<String>,
    step: impl std::future::Future<Output = Result<T, StepError>>,
) -> Result<T, StepError> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(step).catch_unwind().await {
        Ok(result) => result,
        Err(payload) => Err(StepError::Panicked {
            what: what.into(),
            message: panic_message(payload.as_ref()),
        }),
    }
}

/// The text a panic was raised with, where it has one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

impl StepError {
    /// Whether trying the same step again later can help (storage or the service
    /// unavailable, an answer lost), as opposed to a fault that a redelivery meets again
    /// (access refused, an answer that cannot be read, a record that cannot be read).
    pub fn is_transient(&self) -> bool {
        match self {
            StepError::Jobs(e) => e.is_transient(),
            StepError::Storage(e) => e.is_transient(),
            StepError::OpenAi(e) => e.is_transient(),
            StepError::Panicked { .. } => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up the Azure credential: {0}")]
    Identity(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl App {
    pub fn new(config: Config) -> Result<Self, StartError> {
        Self::with_retries(config, RetryPolicy::default(), RetryConfig::default())
    }

    pub fn with_retries(
        config: Config,
        storage_retry: RetryPolicy,
        openai_retry: RetryConfig,
    ) -> Result<Self, StartError> {
        let client_id = config.managed_identity_client_id.clone();
        let identity = move || -> Result<Arc<dyn TokenCredential>, StartError> {
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                ..Default::default()
            };
            let c: Arc<dyn TokenCredential> = ManagedIdentityCredential::new(Some(options))
                .map_err(|e| StartError::Identity(format!("managed identity: {e}")))?;
            Ok(c)
        };
        Self::assemble(config, storage_retry, openai_retry, identity, "handler")
    }

    /// The clients a configuration names, signed in with `credential` wherever Entra ID is
    /// used (made at most once, and only if needed): the function app's managed identity, or
    /// a developer's sign-in for the commands (`cli`). `instance` prefixes this process's name
    /// in claims.
    pub fn assemble(
        config: Config,
        storage_retry: RetryPolicy,
        openai_retry: RetryConfig,
        mut credential: impl FnMut() -> Result<Arc<dyn TokenCredential>, StartError>,
        instance: &str,
    ) -> Result<Self, StartError> {
        let mut made: Option<Arc<dyn TokenCredential>> = None;
        let mut identity = || -> Result<Arc<dyn TokenCredential>, StartError> {
            if let Some(c) = &made {
                return Ok(c.clone());
            }
            let c = credential()?;
            made = Some(c.clone());
            Ok(c)
        };

        let store = Arc::new(match &config.storage {
            StorageAuth::ManagedIdentity { account_url } => {
                BlobStore::with_credential(account_url.clone(), identity()?, storage_retry)?
            }
            StorageAuth::ConnectionString(cs) => {
                BlobStore::from_connection_string(cs.expose(), storage_retry)?
            }
        });
        let auth = match &config.openai_api_key {
            Some(key) => Auth::ApiKey(key.clone()),
            None => Auth::Entra(identity()?),
        };
        let pool: Vec<BatchClient> = config
            .openai_endpoints
            .iter()
            .map(|endpoint| {
                BatchClient::new(
                    endpoint.clone(),
                    config.api_style.clone(),
                    auth.clone(),
                    openai_retry,
                )
            })
            .collect();
        let openai = pool[0].clone();
        let jobs = JobStore::new(store.clone(), config.state_container.clone());
        Ok(App {
            store,
            jobs,
            openai,
            pool,
            instance: format!("{instance}-{}", uuid::Uuid::new_v4()),
            clock: Clock::default(),
            ledger_locks: KeyedLocks::default(),
            config,
        })
    }

    /// Creates the containers the handler writes to, so a fresh account works at once.
    pub async fn ensure_containers(&self) -> Result<(), StorageError> {
        for c in [
            &self.config.input_container,
            &self.config.output_container,
            &self.config.state_container,
        ] {
            self.store.ensure_container(c).await?;
        }
        Ok(())
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// The client of the endpoint a job was admitted to (`Job::openai_endpoint`): every call
    /// for its batch goes there. `None` (a record from before the pool), or an endpoint no
    /// longer configured: the first, where such a job's batch was created.
    pub fn openai_at(&self, endpoint: Option<&str>) -> &BatchClient {
        endpoint
            .and_then(|e| self.pool.iter().find(|c| c.endpoint().as_str() == e))
            .unwrap_or(&self.openai)
    }

    /// Aborts the process at a named step when the test-only `BATCH_TEST_FAULT` names it:
    /// the crash-recovery tests kill the handler exactly between two writes.
    pub fn fault_point(&self, step: &str) {
        debug_assert!(FAULT_POINTS.contains(&step), "unlisted fault point {step}");
        if self.config.test_fault.as_deref() == Some(step) {
            tracing::error!(step, "test fault point reached: aborting");
            std::process::abort();
        }
    }
}

/// The key lines of one invocation: each is logged at once (stdout/stderr, with the
/// invocation id) and also returned in the response's `Logs`, which the host ties to the
/// invocation in Application Insights.
#[derive(Clone)]
pub struct Journal {
    invocation_id: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Journal {
    pub fn new(invocation_id: impl Into<String>) -> Self {
        Self {
            invocation_id: invocation_id.into(),
            lines: Arc::default(),
        }
    }

    pub fn invocation_id(&self) -> &str {
        &self.invocation_id
    }

    pub fn info(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::info!(invocation_id = %self.invocation_id, "{line}");
        self.push(line);
    }

    pub fn warn(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::warn!(invocation_id = %self.invocation_id, "{line}");
        self.push(format!("warning: {line}"));
    }

    pub fn error(&self, line: impl Into<String>) {
        let line = line.into();
        tracing::error!(invocation_id = %self.invocation_id, "{line}");
        self.push(format!("error: {line}"));
    }

    fn push(&self, line: String) {
        self.lines.lock().expect("journal lock").push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("journal lock").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_step_ends_as_an_error_naming_what_it_worked_on() {
        let got: Result<(), StepError> = guarded("job=a.jsonl@0x1", async {
            if true {
                panic!("index out of bounds");
            }
            Ok(())
        })
        .await;
        let err = got.unwrap_err();
        assert!(!err.is_transient(), "the same input panics again");
        let text = err.to_string();
        assert!(text.contains("job=a.jsonl@0x1"), "{text}");
        assert!(text.contains("index out of bounds"), "{text}");
        assert_eq!(guarded("x", async { Ok(7) }).await.unwrap(), 7);
    }
}
