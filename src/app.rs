//! The handler's shared state, built once at start-up, and the per-invocation journal.

use std::sync::{Arc, Mutex};

use azure_core::credentials::TokenCredential;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};

use crate::{
    config::{Config, StorageAuth},
    jobs::JobStore,
    openai::{Auth, BatchClient, RetryConfig},
    storage::{BlobStore, RetryPolicy},
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
    pub openai: BatchClient,
    /// This process, as the owner of the claims it takes.
    pub instance: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up the managed identity credential: {0}")]
    Identity(String),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
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
        // Built lazily: only a deployment that uses Entra ID for something needs it.
        let mut credential: Option<Arc<dyn TokenCredential>> = None;
        let mut identity = || -> Result<Arc<dyn TokenCredential>, StartError> {
            if let Some(c) = &credential {
                return Ok(c.clone());
            }
            let options = ManagedIdentityCredentialOptions {
                user_assigned_id: config
                    .managed_identity_client_id
                    .clone()
                    .map(UserAssignedId::ClientId),
                ..Default::default()
            };
            let c: Arc<dyn TokenCredential> = ManagedIdentityCredential::new(Some(options))
                .map_err(|e| StartError::Identity(e.to_string()))?;
            credential = Some(c.clone());
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
        let openai = BatchClient::new(
            config.openai_endpoint.clone(),
            config.api_style.clone(),
            auth,
            openai_retry,
        );
        let jobs = JobStore::new(store.clone(), config.state_container.clone());
        Ok(App {
            store,
            jobs,
            openai,
            instance: format!("handler-{}", uuid::Uuid::new_v4()),
            config,
        })
    }

    /// Creates the containers the handler writes to, so a fresh account works at once.
    pub async fn ensure_containers(&self) -> Result<(), crate::storage::StorageError> {
        for c in [
            &self.config.input_container,
            &self.config.output_container,
            &self.config.state_container,
        ] {
            self.store.ensure_container(c).await?;
        }
        Ok(())
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
