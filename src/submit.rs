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
//!
//! A split input's parts are started here too (starting a part is submitting a job); the
//! staging and the final combine are `split`'s.

use futures::StreamExt;

use crate::{
    app::{App, Journal, StepError},
    cancel,
    capacity::{self, Admission},
    jobs::{
        AnyJob, CanQueue, Claim, Finished, InputFacts, InputRef, Job, JobState, PartOf, Split,
        Submitting, Unfinished,
    },
    lease,
    openai::{BatchError, CreateBatch, OpenAiError},
    split,
    storage::StorageError,
    summary::{self, Summary},
    validate::{PartSpan, Report, Validator},
};

/// How an intake ended, for the caller's log and answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intake {
    /// Not ours to act on (wrong container, not `.jsonl`).
    Ignored(String),
    /// The blob is gone, or was replaced by a newer version (which is its own job).
    Gone,
    /// A copy into the blob is still running: nothing is recorded, so the timer's sweep
    /// takes it in once the copy has finished.
    CopyPending,
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
    /// A cancel was asked for before the batch was created: dropped, nothing submitted.
    Cancelled,
}

impl Intake {
    fn known(job: &AnyJob) -> Self {
        Intake::AlreadyKnown {
            state: job.state(),
            batch_id: job.batch_id().map(str::to_string),
        }
    }

    fn finished(job: &Job<Finished>) -> Self {
        Intake::AlreadyKnown {
            state: JobState::Finished,
            batch_id: job.batch().map(|b| b.id.clone()),
        }
    }
}

/// The longest input name whose output names (`{path}/results.jsonl`, …) fit Azure's limit.
pub const MAX_INPUT_NAME_CHARS: usize = 1024 - "/results.jsonl".len() + ".jsonl".len();

/// Downloaded chunks (1 MiB each) waiting to be validated at most.
const READ_AHEAD_CHUNKS: usize = 4;

/// How long to tolerate clock skew between us and the service when matching `created_at`:
/// a batch to adopt is looked for among those created since this long before the create.
pub const CLOCK_SKEW_SECS: i64 = 300;

/// Takes the blob `name` in the input container through intake.
pub async fn intake(app: &App, name: &str, j: &Journal) -> Result<Intake, StepError> {
    if !name.ends_with(".jsonl") {
        return Ok(Intake::Ignored(format!("{name} is not a .jsonl file")));
    }
    let container = app.config.input_container.clone();
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
    let Some(props) = app.store.properties_with_copy(&container, name).await? else {
        j.info(format!(
            "blob={container}/{name}: gone before it could be read; nothing to do"
        ));
        return Ok(Intake::Gone);
    };
    // A CopyBlob event can come when the copy starts, not when it ends (always on an account
    // with a hierarchical namespace, event-schema-blob-storage; a copy from another account
    // runs asynchronously, copy-blob): what is there now is not the file yet.
    if props.copy_pending {
        j.info(format!(
            "blob={container}/{name}: a copy into it is still pending (x-ms-copy-status); not \
             read until it has finished; the timer's sweep takes it in then"
        ));
        return Ok(Intake::CopyPending);
    }
    let info = props.info;
    let input = InputRef {
        url: app.store.blob_url(&container, name),
        container,
        name: name.to_string(),
        etag: info.etag,
        size: info.size,
    };
    let lease = app.config.submit_lease.as_secs();
    let fresh = Job::claim(input, &app.instance, lease, app.now());
    let key = fresh.key().to_string();

    if let Some(done) = app.jobs.load_done(&key).await? {
        return Ok(Intake::finished(&done));
    }
    match app.jobs.claim(&fresh).await? {
        Claim::Claimed { etag } => {
            // A job finishing between our look into done/ and the claim leaves done/
            // written before active/ was freed; look again so it is not started twice.
            if let Some(done) = app.jobs.load_done(&key).await? {
                app.jobs.abandon(&key, &etag).await?;
                return Ok(Intake::finished(&done));
            }
            app.fault_point("submit:after-claim");
            j.info(format!(
                "job={key}: claimed; validating blob={}/{name} ({} bytes)",
                fresh.input().container,
                fresh.input().size
            ));
            publish_status(app, fresh.clone().into(), None).await;
            run_claimed(app, fresh, etag, j).await
        }
        Claim::Exists => {
            let Some((job, etag)) = app.jobs.load_active(&key).await? else {
                // Finished in the meantime.
                return Ok(match app.jobs.load_done(&key).await? {
                    Some(done) => Intake::finished(&done),
                    None => Intake::InProgressElsewhere,
                });
            };
            match job {
                AnyJob::Submitting(job) if job.is_leased(app.now()) => {
                    j.info(format!("job={key}: another invocation is submitting it"));
                    Ok(Intake::InProgressElsewhere)
                }
                AnyJob::Submitting(mut job) => {
                    job.take_over(&app.instance, lease, app.now());
                    match app.jobs.update(&job, &etag).await? {
                        None => Ok(Intake::InProgressElsewhere),
                        Some(etag) => {
                            j.warn(format!("job={key}: took over a lapsed claim"));
                            run_claimed(app, job, etag, j).await
                        }
                    }
                }
                other => Ok(Intake::known(&other)),
            }
        }
    }
}

/// Carries a claimed (`submitting`) job to a batch, a queue slot or a final answer.
pub async fn run_claimed(
    app: &App,
    mut job: Job<Submitting>,
    mut etag: String,
    j: &Journal,
) -> Result<Intake, StepError> {
    let key = job.key().to_string();

    // A create may have gone through before the last holder died: adopt, never duplicate.
    let earlier = match job.create_started_at() {
        None => None,
        Some(started) => match app
            .openai_at(job.openai_endpoint())
            .find_by_input_blob(job.batch_input_url(), started - CLOCK_SKEW_SECS)
            .await
        {
            Ok(found) => found,
            // Not knowing whether a batch exists, create none; the record says why.
            Err(e) => return Err(release(app, job, &etag, e.into(), j).await),
        },
    };
    if let Some(batch) = earlier {
        let job = job.submitted(&batch, true, app.now());
        return match app.jobs.update(&job, &etag).await? {
            Some(_) => {
                let line = format!(
                    "job={key} batch={} blob={}/{} {} adopted=true: adopted the batch an \
                     earlier attempt created",
                    batch.id,
                    job.input().container,
                    job.input().name,
                    event_field(job.part_of(), "submitted"),
                );
                publish_status(app, job.into(), Some(&batch)).await;
                j.info(line);
                Ok(Intake::Submitted {
                    batch_id: batch.id,
                    adopted: true,
                })
            }
            None => Ok(Intake::InProgressElsewhere),
        };
    }

    // Asked to stop, and no batch was created: nothing is submitted now.
    if job.cancel_request().is_some() {
        cancel::drop_unsubmitted(app, job, &etag, j).await?;
        return Ok(Intake::Cancelled);
    }

    let facts = match job.facts() {
        Some(facts) => facts.clone(),
        None => {
            let input = job.input().clone();
            let validated =
                lease::holding(app, &mut job, &mut etag, validate_input(app, &input), j).await?;
            let Some(validated) = validated else {
                return Ok(Intake::InProgressElsewhere);
            };
            let report = match validated {
                Ok(r) => r,
                Err(StorageError::NotFound { .. }) | Err(StorageError::ConditionNotMet { .. }) => {
                    j.info(format!(
                        "job={key}: blob={}/{} was deleted or replaced while being read; the new version is its own job",
                        job.input().container,
                        job.input().name
                    ));
                    // An earlier holder may have died while splitting it.
                    split::delete_staging(app, &key).await?;
                    return gone_while_read(app, job, &etag, j).await;
                }
                Err(e) => return Err(release(app, job, &etag, e.into(), j).await),
            };
            if !report.is_ok() {
                return reject(app, job, &etag, report, j).await;
            }
            // More tokens than any one quota holds: it could never be admitted whole, so it
            // is read again and cut into parts that fit (only such files pay a second read).
            let too_big = match job.part_of() {
                Some(_) => Ok(None),
                None => too_big_for_any_quota(app, &report).await,
            };
            let report = match too_big {
                Ok(None) => report,
                Ok(Some(max_tokens)) => {
                    j.info(format!(
                        "job={key}: an estimated {} input tokens, more than the largest \
                         enqueued-token quota holds ({max_tokens}); split into parts that fit",
                        report.tokens
                    ));
                    let input = job.input().clone();
                    let again = lease::holding(
                        app,
                        &mut job,
                        &mut etag,
                        validate_with(app, &input, Some(max_tokens)),
                        j,
                    )
                    .await?;
                    match again {
                        None => return Ok(Intake::InProgressElsewhere),
                        Some(Ok(r)) if r.is_ok() => r,
                        // Changed or gone since the first read: the next attempt sees it.
                        Some(Ok(_)) => report,
                        Some(Err(e)) => return Err(release(app, job, &etag, e.into(), j).await),
                    }
                }
                Err(e) => return Err(release(app, job, &etag, e.into(), j).await),
            };
            let facts = job
                .validated(
                    InputFacts {
                        lines: report.lines,
                        endpoint: report.url.clone().unwrap_or_default(),
                        model: report.model.clone().unwrap_or_default(),
                        tokens: report.tokens,
                    },
                    app.now(),
                )
                .clone();
            if report.parts.len() > 1 {
                return split_input(app, job, etag, &report.parts, j).await;
            }
            if job.was_taken_over() {
                // A holder that died while splitting, under larger limits than ours now,
                // left parts nobody will submit.
                split::delete_staging(app, &key).await?;
            }
            facts
        }
    };

    app.fault_point("submit:after-validate");
    // Admission: the job goes only where its tokens fit; else it waits in line, for room,
    // not for a timer. The reservation is taken before the create, so two invocations cannot
    // both spend the last room.
    let tokens = job.round_tokens().unwrap_or(facts.tokens);
    let (endpoint, room) = match capacity::reserve(app, &key, &facts.model, tokens).await {
        Ok(Admission::Admitted { endpoint, room }) => (endpoint, room),
        Ok(Admission::NoRoom { reason }) => {
            return wait_for_room(app, job, &etag, &reason, j).await;
        }
        Err(e) => return Err(release(app, job, &etag, e.into(), j).await),
    };
    job.admit_to(&endpoint, room);
    // While the create may be in flight (bounded by `create_timeout`, retries for
    // throttling included), nobody takes the job over: they could not find the batch yet
    // and would make a second one.
    let window = app.config.create_timeout;
    job.begin_create(
        app.config.submit_lease.as_secs(),
        window.as_secs(),
        app.now(),
    );
    etag = match app.jobs.update(&job, &etag).await? {
        Some(e) => e,
        None => return Ok(Intake::InProgressElsewhere),
    };
    app.fault_point("submit:before-create");
    let request = CreateBatch {
        endpoint: facts.endpoint.clone(),
        input_blob: job.batch_input_url().to_string(),
        output_folder_url: app.store.container_url(&app.config.output_container),
    };
    // Bounded, so that the in-flight window noted in the record really ends; each attempt
    // is given the whole window, so the client never gives up on a request the record still
    // counts as on its way.
    let client = app.openai_at(Some(&endpoint));
    let created = tokio::time::timeout(window, client.create(&request, window))
        .await
        .unwrap_or_else(|_| {
            Err(OpenAiError::Unanswered {
                what: "create".into(),
                message: format!("no answer within {} s", window.as_secs()),
            })
        });
    match created {
        Ok(crate::openai::Created { batch, quota }) => {
            app.fault_point("submit:after-create");
            // Best effort: the reservation stands either way; what is lost is the news.
            if let Err(e) = capacity::answered(app, &endpoint, &facts.model, &key, quota).await {
                j.warn(format!(
                    "job={key}: could not note the service's quota answer in the capacity \
                     ledger: {e}"
                ));
            }
            let job = job.submitted(&batch, false, app.now());
            let recorded = app.jobs.update(&job, &etag).await?;
            app.fault_point("submit:after-record");
            if recorded.is_none() {
                // Someone took the claim over meanwhile; it will adopt this batch.
                j.warn(format!(
                    "job={key} batch={}: claim lost after create; the new holder adopts it",
                    batch.id
                ));
            } else {
                publish_status(app, job.clone().into(), Some(&batch)).await;
            }
            let round = match job.round() {
                0 => String::new(),
                n => format!(", follow-up round {n}"),
            };
            j.info(format!(
                // The fields go before `batch=`, so the line still reads "batch=…: created
                // for blob=…" as it always has.
                "job={key} {} requests={} round={} batch={}: created for blob={}/{} ({} \
                 requests, model {}{round})",
                event_field(job.part_of(), "submitted"),
                facts.lines,
                job.round(),
                batch.id,
                job.input().container,
                job.input().name,
                facts.lines,
                facts.model
            ));
            Ok(Intake::Submitted {
                batch_id: batch.id,
                adopted: false,
            })
        }
        // Boxed: inline, this rare branch's state would grow every create's future, and
        // debug builds overflow the stack on a follow-up round.
        Err(OpenAiError::TokenLimitExceeded { message }) => {
            Box::pin(refused_for_quota(app, job, &etag, &message, j)).await
        }
        Err(OpenAiError::Rejected {
            status,
            code,
            message,
        }) => {
            j.error(format!(
                "job={key}: the service refused the batch (HTTP {status}, {code}): {message}"
            ));
            free_room(app, &job, j).await;
            fail_job(app, job, &etag, &code, message, j).await?;
            Ok(Intake::Refused)
        }
        Err(e) => {
            if e.may_still_create() {
                j.warn(format!(
                    "job={key}: the create call got no answer; a batch may still appear, so \
                     nobody creates another for {} s; then its batch is looked for first",
                    window.as_secs()
                ));
            } else {
                job.create_answered();
            }
            Err(release(app, job, &etag, e.into(), j).await)
        }
    }
}

/// Quota is full: wait with exponential backoff, or give up after the configured tries.
pub async fn queue_for_quota<S: CanQueue>(
    app: &App,
    job: Job<S>,
    etag: &str,
    message: &str,
    j: &Journal,
) -> Result<Intake, StepError> {
    note_refusal(app, &job, j).await;
    back_off_for_quota(app, job, etag, message, j).await
}

/// The create was refused for quota. An edge try the room was short of, as the model
/// allowed, goes back in line with no backoff and no try counted; any other refusal backs off.
async fn refused_for_quota(
    app: &App,
    job: Job<Submitting>,
    etag: &str,
    message: &str,
    j: &Journal,
) -> Result<Intake, StepError> {
    if note_refusal(app, &job, j).await {
        let reason =
            format!("room in the enqueued-token quota (a try at its edge was refused: {message})");
        return wait_for_room(app, job, etag, &reason, j).await;
    }
    back_off_for_quota(app, job, etag, message, j).await
}

/// A refusal for quota: the ledger learns from it, and the room this job held is free
/// again. Whether the job was an edge try (see `capacity`).
async fn note_refusal<S: CanQueue>(app: &App, job: &Job<S>, j: &Journal) -> bool {
    let Some(facts) = job.facts() else {
        return false;
    };
    let endpoint = job
        .openai_endpoint()
        .unwrap_or(app.config.openai_endpoint.as_str());
    match capacity::refused(app, endpoint, &facts.model, job.key()).await {
        Ok(edge) => edge,
        Err(e) => {
            j.warn(format!(
                "job={}: could not note the refusal in the capacity ledger: {e}",
                job.key()
            ));
            false
        }
    }
}

/// The backoff of a refusal the model did not predict, or the end after too many.
async fn back_off_for_quota<S: CanQueue>(
    app: &App,
    job: Job<S>,
    etag: &str,
    message: &str,
    j: &Journal,
) -> Result<Intake, StepError> {
    let key = job.key().to_string();
    let attempt = job.quota_attempts() + 1;
    if attempt >= app.config.queue_max_attempts {
        j.error(format!(
            "job={key}: still over the enqueued-token quota after {attempt} tries; giving up"
        ));
        let message = format!(
            "{message} (gave up after {attempt} tries; raise the deployment's quota or {} and upload again)",
            crate::config::names::QUEUE_MAX_ATTEMPTS
        );
        fail_job(app, job, etag, "token_limit_exceeded", message, j).await?;
        return Ok(Intake::Refused);
    }
    let base = app.config.queue_initial_delay.as_secs().max(1);
    let delay = base
        .saturating_mul(1 << job.quota_attempts().min(16))
        .min(6 * 3600);
    let job = job.queue(
        &format!("token_limit_exceeded: {message}"),
        delay,
        app.now(),
    );
    if app.jobs.update(&job, etag).await?.is_some() {
        j.warn(format!(
            "job={key} blob={}/{} {} attempt={}: enqueued-token quota is full; queued, next \
             try in {delay} s (attempt {})",
            job.input().container,
            job.input().name,
            event_field(job.part_of(), "queued"),
            job.quota_attempts(),
            job.quota_attempts()
        ));
        publish_status(app, job.into(), None).await;
    }
    Ok(Intake::Queued)
}

/// No target has room for the job now: it waits in line (its place counted among the jobs
/// that wait for room, in arrival order) and the timer admits it once a batch ends.
async fn wait_for_room(
    app: &App,
    job: Job<Submitting>,
    etag: &str,
    reason: &str,
    j: &Journal,
) -> Result<Intake, StepError> {
    let key = job.key().to_string();
    let entries = app.jobs.active_entries().await?;
    let ahead = entries
        .iter()
        .filter_map(|e| e.index.as_ref().map(|ix| (e, ix)))
        .filter(|(e, ix)| {
            ix.state == JobState::Queued
                && e.key != key
                && (ix.created_at, e.key.as_str()) < (job.created_at(), key.as_str())
        })
        .count();
    let place = ahead as u32 + 1;
    let job = job.wait_for_room(reason, place, app.now());
    if app.jobs.update(&job, etag).await?.is_some() {
        j.info(format!(
            "job={key} blob={}/{} {} place={place}: queued, {} in line, waiting for {reason}",
            job.input().container,
            job.input().name,
            event_field(job.part_of(), "queued"),
            crate::status::ordinal(place)
        ));
        publish_status(app, job.into(), None).await;
    }
    Ok(Intake::Queued)
}

/// The job's batch will not run (refused for good, failed by us): its reservation goes.
/// Best effort: should this fail, the tick drops it once the job is no longer active.
pub async fn free_room<S: crate::jobs::State>(app: &App, job: &Job<S>, j: &Journal) {
    let first = app.openai.endpoint().to_string();
    let held = job
        .room()
        .map(|room| (job.openai_endpoint().unwrap_or(&first), room));
    if let Some(facts) = job.facts()
        && let Err(e) = capacity::release(app, &facts.model, job.key(), held).await
    {
        j.warn(format!(
            "job={}: could not release its room in the capacity ledger (the tick will): {e}",
            job.key()
        ));
    }
}

/// Ends a job as `failed` for a reason of ours (not a batch's own failure): its summary
/// carries that one error, then the record is filed under done/.
pub async fn fail_job<S: Unfinished>(
    app: &App,
    job: Job<S>,
    etag: &str,
    code: &str,
    message: String,
    j: &Journal,
) -> Result<(), StepError> {
    let job = job.finish(crate::jobs::Outcome::Failed, &message, app.now());
    let mut summary = Summary::for_job(&job, app.now());
    summary.errors.push(BatchError {
        code: Some(code.to_string()),
        message: Some(message),
        ..Default::default()
    });
    summary::write(
        &app.store,
        job.output_container(&app.config),
        job.input().output_path(),
        &summary,
    )
    .await?;
    app.jobs.finish(&job, etag).await?;
    let input = job.input();
    j.info(format!(
        "job={} batch={} {}: failed; summary at {}/{}",
        job.key(),
        job.batch().map_or("-", |b| b.id.as_str()),
        summary.log_fields(
            &format!("{}/{}", input.container, input.name),
            job.part_of(),
            job.created_at()
        ),
        job.output_container(&app.config),
        summary::summary_name(job.input().output_path())
    ));
    Ok(())
}

/// The `event=` field of a submit step's line (`submitted`, `queued`): a part of a split
/// file says `part_<what>`, with its file's job in `file=`, so the dashboard counts files,
/// not parts (see `Summary::log_fields`).
fn event_field(part_of: Option<&PartOf>, what: &str) -> String {
    match part_of {
        Some(p) => format!("event=part_{what} file={} part={}", p.parent, p.index),
        None => format!("event={what}"),
    }
}

/// The input went away while it was read. Deleted: the job is dropped with a summary that
/// says so (its `status.json` was already written). Replaced: the record goes, and the new
/// version, a job of its own, owns the folder.
async fn gone_while_read(
    app: &App,
    mut job: Job<Submitting>,
    etag: &str,
    j: &Journal,
) -> Result<Intake, StepError> {
    let input = job.input();
    if job.part_of().is_none()
        && app
            .store
            .properties(&input.container, &input.name)
            .await?
            .is_none()
    {
        job.request_cancel(crate::jobs::CancelledBy::InputDeleted, app.now());
        cancel::drop_unsubmitted(app, job, etag, j).await?;
        return Ok(Intake::Cancelled);
    }
    app.jobs.abandon(job.key(), etag).await?;
    Ok(Intake::Gone)
}

/// Rewrites a split input's `status.json` after its parts were advanced (see `status`).
pub async fn refresh_split_status(app: &App, key: &str) {
    crate::status::refresh_split(
        &app.store,
        &app.jobs,
        &app.config.output_container,
        key,
        app.now(),
    )
    .await;
}

/// Writes the job's `status.json` after a transition (see `status`).
async fn publish_status(app: &App, job: AnyJob, batch: Option<&crate::openai::Batch>) {
    crate::status::publish(
        &app.store,
        &app.jobs,
        &app.config.output_container,
        &job,
        batch,
        app.now(),
    )
    .await;
}

/// A transient fault: free the claim so the redelivery can go on at once, and report it.
async fn release(
    app: &App,
    mut job: Job<Submitting>,
    etag: &str,
    err: StepError,
    j: &Journal,
) -> StepError {
    let what = if err.is_transient() {
        "transient fault"
    } else {
        "cannot go on now"
    };
    // The gateway's 404 meets every call: whoever ran the step reports it, once.
    if !matches!(err, StepError::OpenAi(OpenAiError::NoSuchRoute { .. })) {
        j.error(format!("job={}: {what}, will be retried: {err}", job.key()));
    }
    job.release(&err.to_string(), app.now());
    // Best effort: if this write fails too, the lease simply lapses later.
    let _ = app.jobs.update(&job, etag).await;
    err
}

/// The token limit a file's parts must keep to when its estimate is above the largest room
/// any target of its deployment has (a part of a split file is never split again).
async fn too_big_for_any_quota(app: &App, report: &Report) -> Result<Option<u64>, StorageError> {
    let Some(model) = report.model.as_deref() else {
        return Ok(None);
    };
    Ok(capacity::largest_room(app, model)
        .await?
        .filter(|room| report.tokens > *room && *room > 0))
}

async fn validate_input(app: &App, input: &InputRef) -> Result<Report, StorageError> {
    validate_with(app, input, None).await
}

/// Validates the input, splitting it beyond one batch's limits and, with `max_tokens`, into
/// parts of at most that many estimated tokens.
async fn validate_with(
    app: &App,
    input: &InputRef,
    max_tokens: Option<u64>,
) -> Result<Report, StorageError> {
    if let Some(delay) = app.config.test_validate_delay {
        tracing::warn!(
            "blob={}/{}: test-only delay of {} ms before validating ({})",
            input.container,
            input.name,
            delay.as_millis(),
            crate::config::names::TEST_VALIDATE_DELAY_MS
        );
        tokio::time::sleep(delay).await;
    }
    let (_, body) = app
        .store
        .download(&input.container, &input.name, Some(&input.etag))
        .await?;
    // The limits bound each batch, not the input: beyond them, it is split.
    validate_read_ahead(body, app.config.split_limits, max_tokens, &input.name).await
}

/// Validates a blob's body while it downloads: the download runs in its own task, a few
/// chunks ahead, so checking a chunk overlaps fetching the next instead of adding to it
/// (BENCHMARKS.md, submit latency). Memory stays bounded by the channel.
async fn validate_read_ahead<S>(
    mut body: S,
    limits: crate::validate::Limits,
    max_tokens: Option<u64>,
    name: &str,
) -> Result<Report, StorageError>
where
    S: futures::Stream<Item = Result<bytes::Bytes, StorageError>> + Send + Unpin + 'static,
{
    let (tx, mut chunks) = tokio::sync::mpsc::channel(READ_AHEAD_CHUNKS);
    let reader = tokio::spawn(async move {
        while let Some(chunk) = body.next().await {
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
    });
    let mut validator = match max_tokens {
        Some(t) => Validator::splitting_by_tokens(limits, t),
        None => Validator::splitting(limits),
    };
    while let Some(chunk) = chunks.recv().await {
        validator.feed(&chunk?);
    }
    // The channel closes when the reader ends: at the end of the blob, or because it died,
    // and then what was read is only a prefix of the input.
    if let Err(e) = reader.await {
        return Err(StorageError::Failed {
            op: "download",
            target: name.to_string(),
            message: format!("the download stopped before the end of the blob: {e}"),
        });
    }
    Ok(validator.finish())
}

async fn reject(
    app: &App,
    job: Job<Submitting>,
    etag: &str,
    report: Report,
    j: &Journal,
) -> Result<Intake, StepError> {
    let key = job.key().to_string();
    let count = report.problems.len() + report.more_problems as usize;
    if let Some(first) = report.problems.first() {
        let at = first
            .line
            .map_or("file".to_string(), |l| format!("line {l}"));
        j.warn(format!(
            "job={key}: rejected blob={}/{}: {count} problem(s), first at {at}: {}: {}",
            job.input().container,
            job.input().name,
            first.code,
            first.message
        ));
    }
    let job = job.finish(
        crate::jobs::Outcome::Rejected,
        &format!("{count} problem(s)"),
        app.now(),
    );
    let mut summary = Summary::for_job(&job, app.now());
    summary.request_counts.total = report.lines;
    summary.problems = report.problems;
    summary.more_problems = report.more_problems;
    summary::write(
        &app.store,
        &app.config.output_container,
        job.input().output_path(),
        &summary,
    )
    .await?;
    app.jobs.finish(&job, etag).await?;
    let input = job.input();
    j.info(format!(
        "job={key} batch=- {}: summary at {}/{}",
        summary.log_fields(
            &format!("{}/{}", input.container, input.name),
            job.part_of(),
            job.created_at()
        ),
        app.config.output_container,
        summary::summary_name(job.input().output_path())
    ));
    Ok(Intake::Rejected { problems: count })
}

/// Stages the parts of a validated input that is beyond one batch's limits, records the
/// split, and starts the first parts.
async fn split_input(
    app: &App,
    mut job: Job<Submitting>,
    mut etag: String,
    spans: &[PartSpan],
    j: &Journal,
) -> Result<Intake, StepError> {
    let key = job.key().to_string();
    // Staging reads the whole input again and writes every part: as long as validating.
    let staging = job.clone();
    let staged = lease::holding(
        app,
        &mut job,
        &mut etag,
        split::stage_parts(app, &staging, spans),
        j,
    )
    .await?;
    let Some(staged) = staged else {
        return Ok(Intake::InProgressElsewhere);
    };
    let parts = match staged {
        Ok(parts) => parts,
        Err(StorageError::NotFound { .. }) | Err(StorageError::ConditionNotMet { .. }) => {
            j.info(format!(
                "job={key}: blob={}/{} was deleted or replaced while being split; the new version is its own job",
                job.input().container,
                job.input().name
            ));
            split::delete_staging(app, &key).await?;
            return gone_while_read(app, job, &etag, j).await;
        }
        // Not released as other faults are: the release would record this job's facts
        // without its parts, and a next holder would take it for a file that fits one
        // batch. Its lease lapses instead, and the next holder validates it again.
        Err(e) => return Err(e.into()),
    };
    app.fault_point("split:after-stage");
    let count = parts.len();
    let job = job.split(parts, app.now());
    let Some(etag) = app.jobs.update(&job, &etag).await? else {
        return Ok(Intake::InProgressElsewhere);
    };
    app.fault_point("split:after-record");
    publish_status(app, job.clone().into(), None).await;
    j.info(format!(
        "job={key} batch=- blob={}/{} event=split parts={count} requests={}: has {} requests \
         ({} bytes), beyond one batch's limits ({} requests, {} bytes): split into {count} parts",
        job.input().container,
        job.input().name,
        job.facts().map_or(0, |f| f.lines),
        job.facts().map_or(0, |f| f.lines),
        job.input().size,
        app.config.split_limits.max_lines,
        app.config.split_limits.max_bytes,
    ));
    let progress = advance_parts(app, job, etag, j).await?;
    refresh_split_status(app, &key).await;
    Ok(Intake::Split {
        parts: count,
        started: progress.started,
    })
}

/// What `advance_parts` did.
pub struct PartsAdvanced {
    /// Parts submitted now.
    pub started: usize,
    /// Every part had finished, and their results were combined: the job is finished.
    pub combined: bool,
}

/// Starts the parts of a split job not started yet, in input order, until one has to wait
/// for quota; combines the results once every part has finished.
pub async fn advance_parts(
    app: &App,
    job: Job<Split>,
    etag: String,
    j: &Journal,
) -> Result<PartsAdvanced, StepError> {
    let mut unfinished = 0;
    let mut started = 0;
    let waiting = |started| {
        Ok(PartsAdvanced {
            started,
            combined: false,
        })
    };
    for part in job.parts() {
        if let Some((child, _)) = app.jobs.load_active(&part.key).await? {
            unfinished += 1;
            if matches!(child, AnyJob::Queued(_)) {
                // Later parts would only be refused for the same quota.
                return waiting(started);
            }
            continue;
        }
        if app.jobs.load_done(&part.key).await?.is_some() {
            continue;
        }
        unfinished += 1;
        if job.cancel_request().is_some() {
            // The input was cancelled: parts not started never are.
            cancel::drop_part(app, &job, part).await?;
            continue;
        }
        match start_part(app, &job, part, j).await? {
            Intake::Queued => return waiting(started),
            Intake::Submitted { .. } => started += 1,
            _ => {}
        }
    }
    if unfinished > 0 {
        return waiting(started);
    }
    let mut job = job.parts_finished(app.now());
    // Whoever records the last part's end holds the combine, in the same write.
    job.hold(&app.instance, app.config.submit_lease.as_secs(), app.now());
    let Some(etag) = app.jobs.update(&job, &etag).await? else {
        return waiting(started);
    };
    publish_status(app, job.clone().into(), None).await;
    Box::pin(split::combine_parts(app, job, etag, j)).await?;
    Ok(PartsAdvanced {
        started,
        combined: true,
    })
}

async fn start_part(
    app: &App,
    parent: &Job<Split>,
    part: &crate::jobs::PartRef,
    j: &Journal,
) -> Result<Intake, StepError> {
    let state = &app.config.state_container;
    let input = InputRef {
        container: state.clone(),
        name: part.blob.clone(),
        etag: part.etag.clone(),
        size: part.bytes,
        url: app.store.blob_url(state, &part.blob),
    };
    let job = Job::claim_part(
        parent,
        part,
        input,
        &app.instance,
        app.config.submit_lease.as_secs(),
        app.now(),
    );
    let Claim::Claimed { etag } = app.jobs.claim(&job).await? else {
        return Ok(Intake::InProgressElsewhere);
    };
    // Finished between our look and the claim: do not run it twice.
    if let Some(done) = app.jobs.load_done(job.key()).await? {
        app.jobs.abandon(job.key(), &etag).await?;
        return Ok(Intake::finished(&done));
    }
    j.info(format!(
        "job={}: part {}/{} (input lines {}–{}, {} requests): submitting",
        parent.key(),
        part.index,
        parent.parts().len(),
        part.first_line,
        part.last_line(),
        part.requests
    ));
    // Boxed: intake reaches here through `run_claimed` itself (claim, validate, split).
    Box::pin(run_claimed(app, job, etag, j)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures::stream;

    fn line(id: &str) -> String {
        format!(
            "{{\"custom_id\":\"{id}\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{{\"model\":\"m\",\"messages\":[]}}}}\n"
        )
    }

    #[tokio::test]
    async fn a_download_that_dies_is_not_taken_for_the_end_of_the_input() {
        let first = Bytes::from(line("a") + &line("b"));
        let body = stream::iter([Ok(first)]).chain(stream::once(async {
            panic!("the SDK's stream broke");
            #[allow(unreachable_code)]
            Ok(Bytes::new())
        }));
        let got = validate_read_ahead(Box::pin(body), Default::default(), None, "x.jsonl").await;
        let err = got.expect_err("two lines of a longer file are not the file");
        assert!(
            err.to_string().contains("before the end of the blob"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_whole_download_is_validated() {
        let body = stream::iter([Ok(Bytes::from(line("a"))), Ok(Bytes::from(line("b")))]);
        let report = validate_read_ahead(body, Default::default(), None, "x.jsonl")
            .await
            .unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
        assert_eq!(report.lines, 2);
    }
}
