//! Intake: an input blob becomes exactly one batch job, or a `rejected` summary.
//!
//! The same steps serve the Event Grid trigger, the timer's sweep for missed inputs, and the
//! timer's retry of queued jobs. What keeps it to one batch per (blob name, ETag):
//! 1. a job record is claimed with `If-None-Match: *` before anything else; whoever loses
//!    the race stops;
//! 2. just before calling create, the record notes that a create is under way; an invocation
//!    that later finds that note (the first crashed or timed out) looks for the batch by its
//!    `input_blob` and adopts it before it would create another;
//! 3. create is retried only where the service cannot have taken it (429, connect errors).

use futures::StreamExt;

use crate::{
    app::{App, Journal},
    jobs::{Claim, InputFacts, InputRef, JobRecord, JobState, JobStoreError, Outcome, now},
    openai::{BatchError, CreateBatch, OpenAiError},
    storage::StorageError,
    summary::{self, Summary},
    validate::{Report, Validator},
};

/// How an intake ended, for the caller's log and answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Not ours to act on (wrong container, not `.jsonl`).
    Ignored(String),
    /// The blob is gone, or was replaced by a newer version (which is its own job).
    Gone,
    /// This version already has a job that is running or finished.
    AlreadyKnown {
        state: JobState,
        batch_id: Option<String>,
    },
    /// Another invocation holds the claim right now; if it dies, the lease lapses and the
    /// timer or a redelivery takes over.
    InProgressElsewhere,
    /// The input can never succeed; `summary.json` says why.
    Rejected {
        problems: usize,
    },
    Submitted {
        batch_id: String,
        adopted: bool,
    },
    /// The quota is full; the timer resubmits it later.
    Queued,
    /// The service refused the batch for good; `summary.json` says why.
    Refused,
    /// The input is beyond one batch's limits: split into `parts` jobs, `started` of them
    /// submitted at once, the rest as quota allows.
    Split {
        parts: usize,
        started: usize,
    },
}

/// A job step (intake, poll, harvest) stopped on a fault worth retrying: storage or the
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
}

/// The longest input name whose output names (`{path}/results.jsonl`, …) fit Azure's limit.
pub const MAX_INPUT_NAME_CHARS: usize = 1024 - "/results.jsonl".len() + ".jsonl".len();

/// Downloaded chunks (1 MiB each) waiting to be validated at most.
const READ_AHEAD_CHUNKS: usize = 4;

/// How long to tolerate clock skew between us and the service when matching `created_at`.
const CLOCK_SKEW_SECS: i64 = 300;

impl App {
    /// Takes the blob `name` in the input container through intake.
    pub async fn intake(&self, name: &str, j: &Journal) -> Result<Intake, StepError> {
        if !name.ends_with(".jsonl") {
            return Ok(Intake::Ignored(format!("{name} is not a .jsonl file")));
        }
        let container = self.config.input_container.clone();
        // `a/../b.jsonl` is a legal blob name, but every URL parser (the service's included)
        // resolves the segment, so its URL would name another blob: it cannot be submitted.
        if name.split('/').any(|seg| seg == "." || seg == "..") {
            j.error(format!(
                "blob={container}/{name}: a name with a `.` or `..` path segment cannot be \
                 given to the batch service (its URL would point at another blob); rename it"
            ));
            return Ok(Intake::Ignored(format!(
                "{name} has a `.` or `..` path segment"
            )));
        }
        // Azure caps blob names at 1,024 characters: `{path}/results.jsonl` and its siblings
        // (8 more than `{path}.jsonl`) could not be written for a longer input name, not even
        // the summary that would say why.
        let chars = name.chars().count();
        if chars > MAX_INPUT_NAME_CHARS {
            j.error(format!(
                "blob={container}/{name}: the name is {chars} characters; its results would be \
                 named past Azure's 1,024-character limit; rename it to at most \
                 {MAX_INPUT_NAME_CHARS} characters"
            ));
            return Ok(Intake::Ignored(format!(
                "{chars}-character name is too long"
            )));
        }
        let Some(info) = self.store.properties(&container, name).await? else {
            j.info(format!(
                "blob={container}/{name}: gone before it could be read; nothing to do"
            ));
            return Ok(Intake::Gone);
        };
        let input = InputRef {
            url: self.store.blob_url(&container, name),
            container,
            name: name.to_string(),
            etag: info.etag,
            size: info.size,
        };
        let fresh = JobRecord::claim(input, &self.instance, self.config.submit_lease.as_secs());
        let key = fresh.key.clone();

        if let Some(done) = self.jobs.load_done(&key).await? {
            return Ok(Intake::AlreadyKnown {
                state: done.state,
                batch_id: done.batch_id,
            });
        }
        match self.jobs.claim(&fresh).await? {
            Claim::Claimed { etag } => {
                // A job finishing between our look into done/ and the claim leaves done/
                // written before active/ was freed; look again so it is not started twice.
                if let Some(done) = self.jobs.load_done(&key).await? {
                    self.jobs.abandon(&key, &etag).await?;
                    return Ok(Intake::AlreadyKnown {
                        state: done.state,
                        batch_id: done.batch_id,
                    });
                }
                self.fault_point("submit:after-claim");
                j.info(format!(
                    "job={key}: claimed; validating blob={}/{name} ({} bytes)",
                    fresh.input.container, fresh.input.size
                ));
                self.run_claimed(fresh, etag, j).await
            }
            Claim::Exists => {
                let Some((mut rec, etag)) = self.jobs.load_active(&key).await? else {
                    // Finished in the meantime.
                    return Ok(match self.jobs.load_done(&key).await? {
                        Some(done) => Intake::AlreadyKnown {
                            state: done.state,
                            batch_id: done.batch_id,
                        },
                        None => Intake::InProgressElsewhere,
                    });
                };
                match rec.state {
                    JobState::Submitting if rec.is_leased(now()) => {
                        j.info(format!("job={key}: another invocation is submitting it"));
                        Ok(Intake::InProgressElsewhere)
                    }
                    JobState::Submitting => {
                        rec.take_over(&self.instance, self.config.submit_lease.as_secs())
                            .expect("submitting jobs can be taken over");
                        match self.jobs.update(&rec, &etag).await? {
                            None => Ok(Intake::InProgressElsewhere),
                            Some(etag) => {
                                j.warn(format!("job={key}: took over a lapsed claim"));
                                self.run_claimed(rec, etag, j).await
                            }
                        }
                    }
                    state => Ok(Intake::AlreadyKnown {
                        state,
                        batch_id: rec.batch_id,
                    }),
                }
            }
        }
    }

    /// Carries a claimed (`submitting`) job to a batch, a queue slot or a final answer.
    pub(crate) async fn run_claimed(
        &self,
        mut rec: JobRecord,
        mut etag: String,
        j: &Journal,
    ) -> Result<Intake, StepError> {
        let key = rec.key.clone();

        // A create may have gone through before the last holder died: adopt, never duplicate.
        if let Some(started) = rec.create_started_at
            && let Some(batch) = self
                .openai
                .find_by_input_blob(rec.batch_input_url(), started - CLOCK_SKEW_SECS)
                .await?
        {
            rec.submitted(&batch, true).expect("submitting");
            return match self.jobs.update(&rec, &etag).await? {
                Some(_) => {
                    j.info(format!(
                        "job={key} batch={}: adopted the batch an earlier attempt created",
                        batch.id
                    ));
                    Ok(Intake::Submitted {
                        batch_id: batch.id,
                        adopted: true,
                    })
                }
                None => Ok(Intake::InProgressElsewhere),
            };
        }

        if rec.facts.is_none() {
            let report = match self.validate_input(&rec.input).await {
                Ok(r) => r,
                Err(StorageError::NotFound { .. }) | Err(StorageError::ConditionNotMet { .. }) => {
                    j.info(format!(
                        "job={key}: blob={}/{} was deleted or replaced while being read; the new version is its own job",
                        rec.input.container, rec.input.name
                    ));
                    // An earlier holder may have died while splitting it.
                    self.delete_staging(&key).await?;
                    self.jobs.abandon(&key, &etag).await?;
                    return Ok(Intake::Gone);
                }
                Err(e) => return Err(self.release(rec, &etag, e.into(), j).await),
            };
            if !report.is_ok() {
                return self.reject(rec, &etag, report, j).await;
            }
            rec.validated(InputFacts {
                lines: report.lines,
                endpoint: report.url.clone().unwrap_or_default(),
                model: report.model.clone().unwrap_or_default(),
            })
            .expect("submitting");
            if report.parts.len() > 1 {
                return self.split_input(rec, etag, &report.parts, j).await;
            }
            if rec.was_taken_over() {
                // A holder that died while splitting, under larger limits than ours now,
                // left parts nobody will submit.
                self.delete_staging(&key).await?;
            }
        }

        self.fault_point("submit:after-validate");
        // While the create may be in flight (bounded by `create_timeout`, retries for
        // throttling included), nobody takes the job over: they could not find the batch yet
        // and would make a second one.
        let window = self.config.create_timeout;
        rec.begin_create(self.config.submit_lease.as_secs(), window.as_secs())
            .expect("submitting");
        etag = match self.jobs.update(&rec, &etag).await? {
            Some(e) => e,
            None => return Ok(Intake::InProgressElsewhere),
        };
        self.fault_point("submit:before-create");
        let facts = rec.facts.clone().expect("validated above");
        let request = CreateBatch {
            endpoint: facts.endpoint.clone(),
            input_blob: rec.batch_input_url().to_string(),
            output_folder_url: self.store.container_url(&self.config.output_container),
        };
        // Bounded, so that the in-flight window noted in the record really ends.
        let created = tokio::time::timeout(window, self.openai.create(&request))
            .await
            .unwrap_or_else(|_| {
                Err(OpenAiError::Transient {
                    what: "create".into(),
                    message: format!("no answer within {} s", window.as_secs()),
                })
            });
        match created {
            Ok(batch) => {
                self.fault_point("submit:after-create");
                rec.submitted(&batch, false).expect("submitting");
                let recorded = self.jobs.update(&rec, &etag).await?;
                self.fault_point("submit:after-record");
                if recorded.is_none() {
                    // Someone took the claim over meanwhile; it will adopt this batch.
                    j.warn(format!(
                        "job={key} batch={}: claim lost after create; the new holder adopts it",
                        batch.id
                    ));
                }
                let round = match rec.round {
                    0 => String::new(),
                    n => format!(", follow-up round {n}"),
                };
                j.info(format!(
                    "job={key} batch={}: created for blob={}/{} ({} requests, model {}{round})",
                    batch.id, rec.input.container, rec.input.name, facts.lines, facts.model
                ));
                Ok(Intake::Submitted {
                    batch_id: batch.id,
                    adopted: false,
                })
            }
            Err(OpenAiError::TokenLimitExceeded { message }) => {
                self.queue_for_quota(rec, &etag, &message, j).await
            }
            Err(OpenAiError::Rejected {
                status,
                code,
                message,
            }) => {
                j.error(format!(
                    "job={key}: the service refused the batch (HTTP {status}, {code}): {message}"
                ));
                self.fail_job(rec, &etag, &code, message).await?;
                Ok(Intake::Refused)
            }
            Err(e) => Err(self.release(rec, &etag, e.into(), j).await),
        }
    }

    /// Quota is full: wait with exponential backoff, or give up after the configured tries.
    pub(crate) async fn queue_for_quota(
        &self,
        mut rec: JobRecord,
        etag: &str,
        message: &str,
        j: &Journal,
    ) -> Result<Intake, StepError> {
        let key = rec.key.clone();
        if rec.quota_attempts + 1 >= self.config.queue_max_attempts {
            j.error(format!(
                "job={key}: still over the enqueued-token quota after {} tries; giving up",
                rec.quota_attempts + 1
            ));
            let message = format!(
                "{message} (gave up after {} tries; raise the deployment's quota or {} and upload again)",
                rec.quota_attempts + 1,
                crate::config::names::QUEUE_MAX_ATTEMPTS
            );
            self.fail_job(rec, etag, "token_limit_exceeded", message)
                .await?;
            return Ok(Intake::Refused);
        }
        let base = self.config.queue_initial_delay.as_secs().max(1);
        let delay = base
            .saturating_mul(1 << rec.quota_attempts.min(16))
            .min(6 * 3600);
        rec.queue(&format!("token_limit_exceeded: {message}"), delay)
            .expect("submitting or running");
        if self.jobs.update(&rec, etag).await?.is_some() {
            j.warn(format!(
                "job={key}: enqueued-token quota is full; queued, next try in {delay} s (attempt {})",
                rec.quota_attempts
            ));
        }
        Ok(Intake::Queued)
    }

    /// Ends a job as `failed` for a reason of ours (not a batch's own failure): its summary
    /// carries that one error, then the record is filed under done/.
    pub(crate) async fn fail_job(
        &self,
        mut rec: JobRecord,
        etag: &str,
        code: &str,
        message: String,
    ) -> Result<(), StepError> {
        let mut summary = Summary::for_job(&rec, Outcome::Failed);
        summary.errors.push(BatchError {
            code: Some(code.to_string()),
            message: Some(message.clone()),
            ..Default::default()
        });
        rec.create_started_at = None;
        rec.finish(Outcome::Failed, &message)
            .map_err(|e| StorageError::Failed {
                op: "finish",
                target: rec.key.clone(),
                message: e.to_string(),
            })?;
        summary.history = rec.history.clone();
        summary::write(
            &self.store,
            rec.output_container(&self.config),
            rec.input.output_path(),
            &summary,
        )
        .await?;
        self.jobs.finish(&rec, etag).await?;
        Ok(())
    }

    /// A transient fault: free the claim so the redelivery can go on at once, and report it.
    async fn release(
        &self,
        mut rec: JobRecord,
        etag: &str,
        err: StepError,
        j: &Journal,
    ) -> StepError {
        j.error(format!(
            "job={}: transient fault, will be retried: {err}",
            rec.key
        ));
        if rec.release(&err.to_string()).is_ok() {
            // Best effort: if this write fails too, the lease simply lapses later.
            let _ = self.jobs.update(&rec, etag).await;
        }
        err
    }

    async fn validate_input(&self, input: &InputRef) -> Result<Report, StorageError> {
        let (_, mut body) = self
            .store
            .download(&input.container, &input.name, Some(&input.etag))
            .await?;
        // The download runs in its own task, a few chunks ahead, so checking a chunk overlaps
        // fetching the next instead of adding to it (BENCHMARKS.md, submit latency). Memory
        // stays bounded by the channel.
        let (tx, mut chunks) = tokio::sync::mpsc::channel(READ_AHEAD_CHUNKS);
        tokio::spawn(async move {
            while let Some(chunk) = body.next().await {
                let failed = chunk.is_err();
                if tx.send(chunk).await.is_err() || failed {
                    break;
                }
            }
        });
        // The limits bound each batch, not the input: beyond them, it is split.
        let mut validator = Validator::splitting(self.config.split_limits);
        while let Some(chunk) = chunks.recv().await {
            validator.feed(&chunk?);
        }
        Ok(validator.finish())
    }

    async fn reject(
        &self,
        mut rec: JobRecord,
        etag: &str,
        report: Report,
        j: &Journal,
    ) -> Result<Intake, StepError> {
        let key = rec.key.clone();
        let count = report.problems.len() + report.more_problems as usize;
        if let Some(first) = report.problems.first() {
            let at = first
                .line
                .map_or("file".to_string(), |l| format!("line {l}"));
            j.warn(format!(
                "job={key}: rejected blob={}/{}: {count} problem(s), first at {at}: {}: {}",
                rec.input.container, rec.input.name, first.code, first.message
            ));
        }
        rec.finish(Outcome::Rejected, &format!("{count} problem(s)"))
            .expect("submitting");
        let mut summary = Summary::for_job(&rec, Outcome::Rejected);
        summary.request_counts.total = report.lines;
        summary.problems = report.problems;
        summary.more_problems = report.more_problems;
        summary::write(
            &self.store,
            &self.config.output_container,
            rec.input.output_path(),
            &summary,
        )
        .await?;
        self.jobs.finish(&rec, etag).await?;
        j.info(format!(
            "job={key}: summary at {}/{}",
            self.config.output_container,
            summary::summary_name(rec.input.output_path())
        ));
        Ok(Intake::Rejected { problems: count })
    }
}
