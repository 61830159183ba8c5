//! One task per batch moves it through the documented states, one step per `--step-ms` (or,
//! with `--step-ms 0`, one step per [`StepRequest`]):
//! `validating → in_progress → (a few steps of requests) → finalizing → completed`, with the
//! branches `failed`, `cancelling → cancelled` and `expired`.
//!
//! `in_progress` answers a bounded number of requests per step so that a cancel or an expiry
//! can catch a job half-way; what was answered by then is kept, as the service does. With
//! `--tokens-per-second` the bound is the batch's share of its deployment's rate: a step
//! answers the requests (in input order, each costing its estimated tokens) that the time
//! since the last step paid for, so a batch takes its tokens / its share, and two batches
//! running together on one deployment each take twice as long as one alone.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aoai_blob_batch::storage::StorageError;
use serde_json::Value;
use tokio::{
    sync::{mpsc, oneshot},
    time::MissedTickBehavior,
};

use crate::{
    batches::{ErrorList, Registry, Status, now},
    faults::line_fails,
    input::{Api, BatchError, InputSummary, LineReader, ReadError, estimate_tokens, is_blank},
    output::{Answer, OutputFolder, Outputs, answer, expired_line},
};

/// What the lifecycle needs to know of a batch besides its public object.
pub struct Job {
    pub id: String,
    /// (container, blob) of the input; `None` when it is not in this storage account.
    pub input: Option<(String, String)>,
    /// The outcome of the validation done at create time, applied at the first step.
    pub scan: Result<InputSummary, BatchError>,
    pub api: Api,
    pub output: OutputFolder,
    pub started: Instant,
}

/// Per-batch bookkeeping: requests are answered in input order, so "which are done" is a count.
#[derive(Default)]
struct Progress {
    processed: u64,
    completed: u64,
    failed: u64,
    outputs: Option<Outputs>,
    /// With `--tokens-per-second`: tokens earned and not yet spent on a request (the next one
    /// may cost more than one step earns), and when they were last earned.
    credit: f64,
    earned_at: Option<Instant>,
}

/// What one manual step (`--step-ms 0`) stands for in processing time: tests count steps,
/// so "two batches take twice as long" is a count, not a wall-clock measure that flakes.
pub const MANUAL_STEP: Duration = Duration::from_secs(1);

enum Flow {
    Continue,
    Done,
}

enum StepError {
    /// The input is not the version that was validated any more.
    Modified,
    /// Storage did not answer this time; the next step tries again.
    Transient(StorageError),
    /// The results could not be written; the job cannot finish.
    Output(StorageError),
}

/// What moves a batch on.
pub enum Pace {
    /// A step every period.
    Every(Duration),
    /// A step per request (`--step-ms 0`).
    Manual(mpsc::UnboundedReceiver<StepRequest>),
}

/// A test's request for one step of a batch.
pub struct StepRequest {
    /// Take this step as if the completion window had ended.
    pub expire: bool,
    /// Told once the step is done.
    pub done: oneshot::Sender<()>,
}

pub async fn run(reg: Arc<Registry>, job: Job, pace: Pace) {
    let id = job.id.clone();
    drive(&reg, job, pace).await;
    // The batch ended: the registered webhook endpoints hear of it.
    if let Some(batch) = reg.get(&id) {
        reg.webhooks.batch_ended(&batch);
    }
}

async fn drive(reg: &Arc<Registry>, job: Job, pace: Pace) {
    let reg = reg.clone();
    let mut progress = Progress::default();
    match pace {
        Pace::Every(period) => {
            let start = tokio::time::Instant::now() + period;
            let mut ticker = tokio::time::interval_at(start, period);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if let Flow::Done = step(&reg, &job, &mut progress, false).await {
                    return;
                }
            }
        }
        Pace::Manual(mut requests) => {
            while let Some(request) = requests.recv().await {
                let flow = step(&reg, &job, &mut progress, request.expire).await;
                let _ = request.done.send(());
                if let Flow::Done = flow {
                    return;
                }
            }
        }
    }
}

async fn step(reg: &Registry, job: &Job, p: &mut Progress, expire: bool) -> Flow {
    let Some(status) = reg.status(&job.id) else {
        return Flow::Done;
    };
    let expired = expire
        || reg
            .settings
            .expire_after
            .is_some_and(|limit| job.started.elapsed() >= limit);
    match status {
        Status::Cancelling => finish(reg, job, p, Status::Cancelled).await,
        Status::Validating => {
            let summary = match &job.scan {
                Ok(s) => s,
                Err(e) => return fail(reg, job, e.clone()),
            };
            if expired {
                return finish(reg, job, p, Status::Expired).await;
            }
            match unchanged(reg, job, summary).await {
                Some(true) => {}
                Some(false) => return fail(reg, job, BatchError::modified()),
                None => return Flow::Continue,
            }
            // Validated: its tokens are checked against the quota now, unless at create.
            if let Err(e) = reg.admit(&job.id) {
                return fail(reg, job, e);
            }
            p.outputs = Some(Outputs::open(reg.store.clone(), &reg.account, &job.output));
            p.earned_at = Some(Instant::now());
            reg.update(&job.id, |b| {
                if b.status == Status::Validating {
                    b.status = Status::InProgress;
                    b.in_progress_at = Some(now());
                    b.request_counts.total = summary.requests;
                    tracing::info!(batch = %b.id, requests = summary.requests, "in_progress");
                }
            });
            Flow::Continue
        }
        Status::InProgress => {
            let Ok(summary) = &job.scan else {
                return Flow::Done;
            };
            // An injected expiry waits for some answers, so the batch ends with partial results.
            if expired || (summary.injected.expire && p.processed > 0) {
                return finish(reg, job, p, Status::Expired).await;
            }
            // Earned before answering, while this batch still counts among the running ones.
            let budget = reg.share(&job.id).map(|share| {
                let now = Instant::now();
                let elapsed = match reg.settings.step {
                    None => MANUAL_STEP,
                    Some(_) => p.earned_at.map_or(Duration::ZERO, |t| now - t),
                };
                p.earned_at = Some(now);
                p.credit += share * elapsed.as_secs_f64();
            });
            match answer_some(reg, job, summary, p, budget.is_some()).await {
                Ok(()) => {}
                Err(StepError::Modified) => return fail(reg, job, BatchError::modified()),
                Err(StepError::Transient(e)) => {
                    tracing::warn!(batch = %job.id, error = %e, "input unreadable this step; retrying");
                }
                Err(StepError::Output(e)) => return fail(reg, job, output_error(&e)),
            }
            let (processed, completed, failed) = (p.processed, p.completed, p.failed);
            reg.update(&job.id, |b| {
                b.request_counts.completed = completed;
                b.request_counts.failed = failed;
                if processed >= summary.requests && b.status == Status::InProgress {
                    b.status = Status::Finalizing;
                    b.finalizing_at = Some(now());
                    tracing::info!(batch = %b.id, "finalizing");
                }
            });
            Flow::Continue
        }
        Status::Finalizing => {
            let Ok(summary) = &job.scan else {
                return Flow::Done;
            };
            // The service checks the input once more before it declares the job done.
            match unchanged(reg, job, summary).await {
                Some(true) => finish(reg, job, p, Status::Completed).await,
                Some(false) => fail(reg, job, BatchError::modified()),
                None => Flow::Continue,
            }
        }
        Status::Completed | Status::Failed | Status::Expired | Status::Cancelled => Flow::Done,
    }
}

/// Whether the input blob is still the version validated; `None` when storage cannot tell now.
async fn unchanged(reg: &Registry, job: &Job, summary: &InputSummary) -> Option<bool> {
    let (container, name) = job.input.as_ref()?;
    match reg.store.properties(container, name).await {
        Ok(Some(info)) => Some(info.etag == summary.etag),
        Ok(None) => Some(false),
        Err(e) if e.is_transient() => None,
        Err(_) => Some(false),
    }
}

/// Answers the next requests of this step, reading the input again from its start (pinned to
/// the validated ETag) and skipping those already answered. Reopening each step costs a
/// re-read but holds no connection open across steps of any length.
/// With `by_tokens`, the requests are those `p.credit` pays for, each its estimated tokens.
async fn answer_some(
    reg: &Registry,
    job: &Job,
    summary: &InputSummary,
    p: &mut Progress,
    by_tokens: bool,
) -> Result<(), StepError> {
    let Some((container, name)) = job.input.as_ref() else {
        return Err(StepError::Modified);
    };
    let per_step = if by_tokens {
        u64::MAX
    } else {
        reg.settings
            .lines_per_step
            .unwrap_or(summary.requests / 3)
            .max(1)
    };
    let mut reader = open(reg, container, name, &summary.etag).await?;
    let outputs = p
        .outputs
        .get_or_insert_with(|| Outputs::open(reg.store.clone(), &reg.account, &job.output));
    let mut seen = 0u64;
    let mut done = 0u64;
    while done < per_step {
        let Some((_, line)) = reader.next_line().await.map_err(read_error)? else {
            break;
        };
        if is_blank(&line) {
            continue;
        }
        seen += 1;
        if seen <= p.processed {
            continue;
        }
        let (custom_id, body) = parse(&line).ok_or(StepError::Modified)?;
        if by_tokens {
            let cost = estimate_tokens(&body) as f64;
            if cost > p.credit {
                break;
            }
            p.credit -= cost;
        }
        let fails = line_fails(
            reg.settings.seed,
            &custom_id,
            reg.settings.line_failure_rate,
        );
        let answer = answer(&custom_id, &body, job.api, fails, now());
        outputs.write(&answer).await.map_err(StepError::Output)?;
        p.processed += 1;
        done += 1;
        match answer {
            Answer::Success(_) => p.completed += 1,
            Answer::Failure(_) => p.failed += 1,
        }
    }
    Ok(())
}

async fn open(
    reg: &Registry,
    container: &str,
    name: &str,
    etag: &str,
) -> Result<LineReader, StepError> {
    match reg.store.download(container, name, Some(etag)).await {
        Ok((_, body)) => Ok(LineReader::new(body)),
        Err(e) if e.is_transient() => Err(StepError::Transient(e)),
        Err(_) => Err(StepError::Modified),
    }
}

fn read_error(e: ReadError) -> StepError {
    match e {
        ReadError::Storage(e) if e.is_transient() => StepError::Transient(e),
        _ => StepError::Modified,
    }
}

/// A validated line's `custom_id` and `body`; `None` only if the content is not what was
/// validated.
fn parse(line: &[u8]) -> Option<(String, serde_json::Map<String, Value>)> {
    let Value::Object(mut request) = serde_json::from_slice(line).ok()? else {
        return None;
    };
    let custom_id = request.get("custom_id")?.as_str()?.to_string();
    let Value::Object(body) = request.remove("body")? else {
        return None;
    };
    Some((custom_id, body))
}

/// Writes `batch_expired` lines for the requests not yet answered, as OpenAI documents.
async fn expire_rest(reg: &Registry, job: &Job, p: &mut Progress, outputs: &mut Outputs) {
    let (Ok(summary), Some((container, name))) = (&job.scan, job.input.as_ref()) else {
        return;
    };
    let mut reader = match open(reg, container, name, &summary.etag).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(batch = %job.id, "input unreadable; expired requests get no error lines");
            return;
        }
    };
    let mut seen = 0u64;
    loop {
        let line = match reader.next_line().await {
            Ok(Some((_, line))) => line,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(batch = %job.id, error = ?e, "input unreadable while expiring");
                return;
            }
        };
        if is_blank(&line) {
            continue;
        }
        seen += 1;
        if seen <= p.processed {
            continue;
        }
        let Some((custom_id, _)) = parse(&line) else {
            return;
        };
        if let Err(e) = outputs.failure(&expired_line(&custom_id)).await {
            tracing::warn!(batch = %job.id, error = %e, "cannot write expired lines");
            return;
        }
        p.failed += 1;
    }
}

/// Ends a batch that produced output (`completed`, `cancelled`, `expired`): commits what was
/// written, then publishes both URLs.
async fn finish(reg: &Registry, job: &Job, p: &mut Progress, end: Status) -> Flow {
    let mut outputs = p
        .outputs
        .take()
        .unwrap_or_else(|| Outputs::open(reg.store.clone(), &reg.account, &job.output));
    if end == Status::Expired {
        expire_rest(reg, job, p, &mut outputs).await;
    }
    let (results, errors) = match outputs.finish().await {
        Ok(urls) => urls,
        Err(e) => return fail(reg, job, output_error(&e)),
    };
    let total = job.scan.as_ref().map_or(0, |s| s.requests);
    let (completed, failed) = (p.completed, p.failed);
    reg.update(&job.id, |b| {
        let t = now();
        b.status = end;
        match end {
            Status::Completed => b.completed_at = Some(t),
            Status::Cancelled => b.cancelled_at = Some(t),
            Status::Expired => b.expired_at = Some(t),
            _ => {}
        }
        b.request_counts.total = total;
        b.request_counts.completed = completed;
        b.request_counts.failed = failed;
        b.output_blob = results;
        b.error_blob = errors;
        tracing::info!(batch = %b.id, status = end.as_str(), completed, failed, "batch finished");
    });
    Flow::Done
}

/// Ends a batch as `failed`; anything written so far is dropped uncommitted.
fn fail(reg: &Registry, job: &Job, error: BatchError) -> Flow {
    reg.update(&job.id, |b| {
        b.status = Status::Failed;
        b.failed_at = Some(now());
        tracing::info!(batch = %b.id, code = %error.code, line = ?error.line, "batch failed");
        b.errors = Some(ErrorList {
            object: "list",
            data: vec![error],
        });
    });
    Flow::Done
}

fn output_error(e: &StorageError) -> BatchError {
    BatchError::new(
        "internal_error",
        format!("The batch output could not be written to the output folder: {e}"),
        None,
    )
}
