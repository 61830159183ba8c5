//! The batch objects and the registry that holds them.
//!
//! State lives in memory only: restarting the emulator forgets every batch (the files already
//! written stay in storage). That is enough for tests and local runs, and keeps the emulator
//! free of any store of its own.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aoai_blob_batch::storage::{BlobStore, StorageError};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::{
    blob_url::Account,
    input::{self, Api, BatchError, InputSummary},
    lifecycle,
    list_query::Order,
    output::OutputFolder,
};

/// The service's completion window: `expires_at` is this long after `created_at`.
const COMPLETION_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The enqueued-token quota when none is given: the Default tier's Global Batch quota for
/// gpt-4o, gpt-4.1 and gpt-5 (global-batch-limits.md). A real deployment always has one, and
/// every create answer says it, so the emulator has one too.
pub const DEFAULT_ENQUEUED_TOKEN_LIMIT: u64 = 200_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::Expired | Status::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub completed: u64,
    pub failed: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorList {
    pub object: &'static str,
    pub data: Vec<BatchError>,
}

/// The batch object, field for field as the blob-storage documentation shows it
/// (batch-api-research.md §1.2), in the same order.
#[derive(Debug, Clone, Serialize)]
pub struct Batch {
    pub id: String,
    pub completion_window: String,
    pub created_at: i64,
    pub endpoint: String,
    pub input_file_id: Option<String>,
    pub object: &'static str,
    pub status: Status,
    pub cancelled_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub error_file_id: Option<String>,
    pub errors: Option<ErrorList>,
    pub expired_at: Option<i64>,
    pub expires_at: i64,
    pub failed_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub in_progress_at: Option<i64>,
    pub metadata: Option<serde_json::Value>,
    pub output_file_id: Option<String>,
    pub request_counts: RequestCounts,
    pub error_blob: String,
    pub input_blob: String,
    pub output_blob: String,
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The emulator's knobs, from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Deployment names that exist; empty means any model name does.
    pub deployments: Vec<String>,
    /// Time between two lifecycle steps; `None`: only when stepped (`--step-ms 0`).
    pub step: Option<Duration>,
    pub expire_after: Option<Duration>,
    pub enqueued_token_limit: u64,
    pub line_failure_rate: f64,
    pub lines_per_step: Option<u64>,
    /// Estimated tokens per second a deployment processes, shared among its `in_progress`
    /// batches; `None`: `lines_per_step` paces them instead.
    pub tokens_per_second: Option<u64>,
    /// The order of a list that asks for none (`$orderby` on the classic route can).
    pub list_order: Order,
    pub quota_refusal: QuotaRefusal,
    pub seed: u64,
    pub markers: input::Markers,
}

/// A create request that passed the synchronous checks.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub endpoint: String,
    pub api: Api,
    pub completion_window: String,
    pub input_blob: String,
    pub output: OutputFolder,
}

#[derive(Debug)]
pub enum CreateError {
    /// Fail-fast quota check: the input's tokens do not fit next to the active jobs'.
    TokenLimit { model: String, limit: u64 },
    /// Storage could not be read right now; the client may retry.
    Unavailable(StorageError),
}

pub struct Created {
    pub batch: Batch,
    /// The deployment's enqueued tokens with this batch's (`deployment-enqueued-tokens`).
    pub enqueued_tokens: u64,
    /// The deployment's quota (`deployment-maximum-enqueued-tokens`).
    pub token_limit: u64,
}

#[derive(Debug)]
pub enum CancelError {
    NotFound,
    Finished(Status),
}

struct Entry {
    batch: Batch,
    /// The deployment and estimated tokens the job holds against the quota while active.
    model: Option<String>,
    tokens: u64,
    /// Whether its tokens passed the quota check and count against the quota: at create
    /// (fail-fast), or at its validation step (`--quota-refusal failed-batch`).
    admitted: bool,
    /// Where step requests for the batch's lifecycle go, in manual mode.
    stepper: Option<mpsc::UnboundedSender<lifecycle::StepRequest>>,
}

#[derive(Default)]
struct Inner {
    batches: HashMap<String, Entry>,
    /// Ids in creation order: `created_at` has one-second resolution, too coarse to sort by.
    order: Vec<String>,
}

impl Inner {
    /// The tokens the active, admitted batches of deployment `model` hold.
    fn enqueued(&self, model: &str) -> u64 {
        self.batches
            .values()
            .filter(|e| {
                e.admitted && !e.batch.status.is_terminal() && e.model.as_deref() == Some(model)
            })
            .map(|e| e.tokens)
            .sum()
    }

    /// How many batches of deployment `model` are `in_progress`: they share its rate.
    fn running(&self, model: &str) -> usize {
        self.batches
            .values()
            .filter(|e| e.batch.status == Status::InProgress && e.model.as_deref() == Some(model))
            .count()
    }
}

/// The service's words for a full enqueued-token quota, at create (400) and in a failed
/// batch's `errors.data` alike (the latter as a Microsoft Q&A answer quotes it:
/// https://learn.microsoft.com/answers/questions/2285577/azure-openai-batch-api-token-limit-exceeded-error).
pub fn token_limit_message(limit: u64, model: &str) -> String {
    format!(
        "The number of enqueued tokens has surpassed the configured limit of {limit} for the \
         deployment '{model}'. Please either increase the limit or try again once the current \
         jobs have finished."
    )
}

/// How the service refuses a batch over the enqueued-token quota (the batch how-to's
/// "Queueing batch jobs"): in the fail-fast regions the create gets a 400; elsewhere the
/// create is accepted and the batch fails during validation with `token_limit_exceeded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuotaRefusal {
    FailFast,
    FailedBatch,
}

pub struct Registry {
    pub store: Arc<BlobStore>,
    /// How URLs into that storage account are read and written (the emulator's own code).
    pub account: Account,
    pub settings: Settings,
    /// Registered webhook endpoints; told when a batch ends (`webhooks.rs`).
    pub webhooks: Arc<crate::webhooks::Hub>,
    inner: Mutex<Inner>,
}

impl Registry {
    pub fn new(store: Arc<BlobStore>, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            account: Account::new(store.account_url()),
            store,
            settings,
            webhooks: Arc::default(),
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads and validates the input now (the quota check needs its token count), registers
    /// the batch in `validating`, and starts its lifecycle.
    pub async fn create(self: &Arc<Self>, new: NewBatch) -> Result<Created, CreateError> {
        let location = self.account.locate_blob(&new.input_blob).ok();
        let scan: Result<InputSummary, BatchError> = match &location {
            // Another account, or not a blob URL: the service's identity cannot read it.
            None => Err(BatchError::no_permissions()),
            Some((container, name)) => input::scan(
                &self.store,
                container,
                name,
                &new.endpoint,
                &self.settings.deployments,
                &self.settings.markers,
            )
            .await
            .map_err(CreateError::Unavailable)?,
        };
        let scan = match scan {
            Ok(s) if s.injected.fail => Err(BatchError::new(
                "emulated_failure",
                "This batch was failed on purpose: its input contains the text of \
                 --fail-input-containing.",
                None,
            )),
            other => other,
        };
        let (model, tokens) = match &scan {
            Ok(s) => (Some(s.model.clone()), s.tokens),
            Err(_) => (None, 0),
        };
        let created_at = now();
        let expires_in = self.settings.expire_after.unwrap_or(COMPLETION_WINDOW);
        let batch = Batch {
            id: format!("batch_{}", uuid::Uuid::new_v4()),
            completion_window: new.completion_window.clone(),
            created_at,
            endpoint: new.endpoint.clone(),
            input_file_id: None,
            object: "batch",
            status: Status::Validating,
            cancelled_at: None,
            cancelling_at: None,
            completed_at: None,
            error_file_id: None,
            errors: None,
            expired_at: None,
            expires_at: created_at + expires_in.as_secs_f64().ceil() as i64,
            failed_at: None,
            finalizing_at: None,
            in_progress_at: None,
            metadata: None,
            output_file_id: None,
            request_counts: RequestCounts::default(),
            error_blob: String::new(),
            input_blob: new.input_blob.clone(),
            output_blob: String::new(),
        };
        let (pace, stepper) = match self.settings.step {
            Some(period) => (lifecycle::Pace::Every(period), None),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                (lifecycle::Pace::Manual(rx), Some(tx))
            }
        };
        let fail_fast = self.settings.quota_refusal == QuotaRefusal::FailFast;
        let enqueued_tokens = {
            let mut inner = self.lock();
            let enqueued = model.as_ref().map_or(0, |m| inner.enqueued(m));
            let limit = self.settings.enqueued_token_limit;
            if fail_fast
                && let Some(m) = &model
                && enqueued + tokens > limit
            {
                return Err(CreateError::TokenLimit {
                    model: m.clone(),
                    limit,
                });
            }
            inner.order.push(batch.id.clone());
            inner.batches.insert(
                batch.id.clone(),
                Entry {
                    batch: batch.clone(),
                    model,
                    tokens,
                    admitted: fail_fast,
                    stepper,
                },
            );
            enqueued + tokens
        };
        tracing::info!(batch = %batch.id, input_blob = %batch.input_blob, tokens, "batch created");
        let job = lifecycle::Job {
            id: batch.id.clone(),
            input: location,
            scan,
            api: new.api,
            output: new.output,
            started: Instant::now(),
        };
        tokio::spawn(lifecycle::run(self.clone(), job, pace));
        Ok(Created {
            batch,
            enqueued_tokens,
            token_limit: self.settings.enqueued_token_limit,
        })
    }

    /// The quota check of a batch that is not admitted yet (`--quota-refusal failed-batch`),
    /// taken at its validation step as the service outside the fail-fast regions does: it
    /// then holds its tokens against the quota, or it fails with `token_limit_exceeded`.
    pub fn admit(&self, id: &str) -> Result<(), BatchError> {
        let mut inner = self.lock();
        let Some(entry) = inner.batches.get(id) else {
            return Ok(());
        };
        let (Some(model), tokens) = (entry.model.clone(), entry.tokens) else {
            return Ok(());
        };
        if entry.admitted {
            return Ok(());
        }
        let limit = self.settings.enqueued_token_limit;
        if inner.enqueued(&model) + tokens > limit {
            return Err(BatchError::new(
                "token_limit_exceeded",
                token_limit_message(limit, &model),
                None,
            ));
        }
        if let Some(e) = inner.batches.get_mut(id) {
            e.admitted = true;
        }
        Ok(())
    }

    /// The tokens per second batch `id` is processed at now: its deployment's rate shared
    /// equally among the deployment's `in_progress` batches (itself included). `None` without
    /// `--tokens-per-second`.
    pub fn share(&self, id: &str) -> Option<f64> {
        let rate = self.settings.tokens_per_second? as f64;
        let inner = self.lock();
        let model = inner.batches.get(id)?.model.as_deref()?;
        Some(rate / inner.running(model).max(1) as f64)
    }

    /// Whether batches move only when stepped (`--step-ms 0`).
    pub fn manual(&self) -> bool {
        self.settings.step.is_none()
    }

    /// The batches not yet in a terminal state, oldest first.
    pub fn active_ids(&self) -> Vec<String> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .filter(|id| {
                inner
                    .batches
                    .get(*id)
                    .is_some_and(|e| !e.batch.status.is_terminal())
            })
            .cloned()
            .collect()
    }

    /// Manual mode: moves the batch one lifecycle step (with `expire`, as if its completion
    /// window ended now) and answers once the step is done. A batch in a terminal state stays
    /// as it is. `None`: no such batch.
    pub async fn step(&self, id: &str, expire: bool) -> Option<Batch> {
        let (stepper, terminal) = {
            let inner = self.lock();
            let entry = inner.batches.get(id)?;
            (entry.stepper.clone(), entry.batch.status.is_terminal())
        };
        if let (Some(stepper), false) = (stepper, terminal) {
            let (done, stepped) = oneshot::channel();
            // The lifecycle ends once the batch is terminal; then nothing waits for requests.
            if stepper
                .send(lifecycle::StepRequest { expire, done })
                .is_ok()
            {
                let _ = stepped.await;
            }
        }
        self.get(id)
    }

    pub fn get(&self, id: &str) -> Option<Batch> {
        self.lock().batches.get(id).map(|e| e.batch.clone())
    }

    pub fn status(&self, id: &str) -> Option<Status> {
        self.lock().batches.get(id).map(|e| e.batch.status)
    }

    /// Applies `f` to the batch; returns the result.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Batch)) -> Option<Batch> {
        let mut inner = self.lock();
        let entry = inner.batches.get_mut(id)?;
        f(&mut entry.batch);
        Some(entry.batch.clone())
    }

    /// One page in `order`, of the batches `keep` accepts, starting after the batch `after`
    /// (its place in that order, whether `keep` accepts it or not); and whether more follow.
    pub fn list(
        &self,
        after: Option<&str>,
        limit: usize,
        order: Order,
        keep: impl Fn(&Batch) -> bool,
    ) -> (Vec<Batch>, bool) {
        let inner = self.lock();
        let ids: Box<dyn Iterator<Item = &String>> = match order {
            Order::OldestFirst => Box::new(inner.order.iter()),
            Order::NewestFirst => Box::new(inner.order.iter().rev()),
        };
        let mut ids = ids.peekable();
        if let Some(after) = after {
            // An unknown cursor yields an empty page rather than restarting from the top,
            // which would make a pager loop forever.
            for id in ids.by_ref() {
                if id == after {
                    break;
                }
            }
        }
        let mut kept = ids
            .filter_map(|id| inner.batches.get(id).map(|e| &e.batch))
            .filter(|b| keep(b))
            .peekable();
        let page: Vec<Batch> = kept.by_ref().take(limit).cloned().collect();
        let has_more = kept.peek().is_some();
        (page, has_more)
    }

    /// Moves an active batch to `cancelling`; its lifecycle finishes the cancel on its next
    /// step. Cancelling twice is harmless.
    pub fn cancel(&self, id: &str) -> Result<Batch, CancelError> {
        let mut inner = self.lock();
        let entry = inner.batches.get_mut(id).ok_or(CancelError::NotFound)?;
        let b = &mut entry.batch;
        if b.status.is_terminal() {
            return Err(CancelError::Finished(b.status));
        }
        if b.status != Status::Cancelling {
            b.status = Status::Cancelling;
            b.cancelling_at = Some(now());
            tracing::info!(batch = %b.id, "cancel requested");
        }
        Ok(b.clone())
    }
}
