//! Cancel: a file's job stops, by `handler cancel NAME` or because its input was deleted.
//!
//! The request is written into the job record first (`CancelRequest`), then acted on at
//! once where that is safe, and by whoever handles the job next otherwise:
//! - a job with no batch yet (validating, queued) ends `cancelled` at once, with a summary
//!   that says nothing was submitted; one whose claim another invocation holds right now is
//!   ended by the next holder (its own next write fails on the changed record);
//! - a running batch is cancelled at the service; the timer harvests it as any cancelled
//!   batch (what the service finished is kept) and, since a cancel was asked for, does not
//!   resubmit the rest;
//! - a split input's request goes to every part: running parts' batches are cancelled, and
//!   parts not started are never started.
//!
//! Which job a deletion stops: the job key is (name, ETag) and a BlobDeleted event carries
//! no ETag, so the deleted version is taken to be the newest version the handler has seen
//! that is not the blob there now. A version replaced by an upload (not deleted) goes on
//! as before (its results go to `{path}/superseded/{etag}/`), and a re-upload after the
//! delete is a job of its own that is never touched.
//!
//! A leaf of the workflows (see `lib.rs`): `poll`, `harvest` and `submit` call it, and the
//! host face (`server`, the `handler cancel` command); it calls none of them.

use crate::{
    app::{App, Journal, StepError},
    jobs::{AnyJob, CancelledBy, Claim, Job, Outcome, PartRef, Split, Unfinished, Version},
    openai::{BatchStatus, OpenAiError},
    status,
    summary::{self, Summary},
};

/// What a cancel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    /// The service was asked to stop these batches; the timer keeps what they finished and
    /// writes the summary once they have stopped.
    Requested { batches: Vec<String> },
    /// The request is recorded; another invocation holds the job this moment, and the next
    /// one to handle it ends it.
    Recorded,
    /// No batch existed yet: the job ended `cancelled` now, nothing submitted.
    Dropped,
    /// A cancel had already been asked for.
    AlreadyRequested,
    /// Its batch has already ended; its results are being put in place.
    Ending,
    /// The file's last job has finished, as `outcome`; nothing to cancel.
    Finished(Outcome),
    /// No job for that file.
    Unknown,
}

/// Races with another writer of the record: tries at most this many times.
const ATTEMPTS: usize = 5;

/// `handler cancel NAME`: cancels the current job of the input blob `name` (the one of the
/// blob there now, or, when it is gone, the newest).
pub async fn cancel_input(app: &App, name: &str, j: &Journal) -> Result<Cancelled, StepError> {
    let versions = app.jobs.versions_of(name).await?;
    let current = app
        .store
        .properties(&app.config.input_container, name)
        .await?
        .map(|b| b.etag);
    let active = versions.iter().filter(|v| v.active).max_by_key(|v| {
        (
            Some(&v.job.input().etag) == current.as_ref(),
            v.job.created_at(),
        )
    });
    match active {
        Some(v) => {
            let key = v.job.key().to_string();
            let done = cancel_job(app, &key, CancelledBy::Command, j).await?;
            // `{path}/status.json` is the current version's: an older one's job (replaced
            // while it ran) must not write over it.
            if current.is_none() || current.as_ref() == Some(&v.job.input().etag) {
                publish(app, &key).await;
            }
            Ok(done)
        }
        None => Ok(versions
            .iter()
            .filter_map(|v| match &v.job {
                AnyJob::Finished(f) => Some(f),
                _ => None,
            })
            .max_by_key(|f| f.updated_at())
            .map_or(Cancelled::Unknown, |f| Cancelled::Finished(f.outcome()))),
    }
}

/// The input blob `name` was deleted (a BlobDeleted event, or the sweep found it gone);
/// `current` is the ETag of the blob of that name there now, if one was uploaded since.
/// Cancels the job of the deleted version, if it has not finished.
pub async fn input_deleted(
    app: &App,
    name: &str,
    current: Option<&str>,
    j: &Journal,
) -> Result<Option<Cancelled>, StepError> {
    let versions = app.jobs.versions_of(name).await?;
    let Some(deleted) = deleted_version(&versions, current) else {
        return Ok(None);
    };
    if !deleted.active {
        return Ok(None);
    }
    let key = deleted.job.key().to_string();
    let done = cancel_job(app, &key, CancelledBy::InputDeleted, j).await?;
    // Uploaded again since: `{path}/status.json` is the new version's.
    if current.is_none() {
        publish(app, &key).await;
    }
    if !matches!(done, Cancelled::AlreadyRequested) {
        j.info(format!(
            "job={key} blob={}/{name} event=input_deleted outcome={}: the input was deleted; \
             its job is cancelled",
            app.config.input_container,
            describe(&done)
        ));
    }
    Ok(Some(done))
}

/// The version a delete removed: the newest one seen that is not the blob there now.
fn deleted_version<'a>(versions: &'a [Version], current: Option<&str>) -> Option<&'a Version> {
    versions
        .iter()
        .filter(|v| Some(v.job.input().etag.as_str()) != current)
        .max_by_key(|v| v.job.created_at())
}

/// The timer's convergence path for deletions: every active job whose input blob is no
/// longer in the input container is handled as if its BlobDeleted event had come. Jobs are
/// found by their keys (`{name}@{etag}`); parts (`…/part-NNNN`) and hashed keys of very long
/// names are not inputs' keys and are skipped. `present`: the names in the input container,
/// from the listing the tick's sweep made (one listing serves both), which must have been
/// taken after `active` was: a job created after the listing would otherwise look deleted.
/// That listing may be a window of the container: only names it `covers` are judged.
pub async fn sweep_deleted(
    app: &App,
    active: &[String],
    present: &std::collections::HashSet<&str>,
    covers: impl Fn(&str) -> bool,
    j: &Journal,
) -> Result<(), StepError> {
    let mut names: Vec<&str> = active
        .iter()
        .filter_map(|k| k.rsplit_once('@'))
        .filter(|(name, etag)| !etag.contains('/') && !name.ends_with('…'))
        .map(|(name, _)| name)
        .filter(|name| covers(name) && !present.contains(name))
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        input_deleted(app, name, None, j).await?;
    }
    Ok(())
}

/// Asks the active job `key` to stop (see the module's comment for what each state does).
pub async fn cancel_job(
    app: &App,
    key: &str,
    by: CancelledBy,
    j: &Journal,
) -> Result<Cancelled, StepError> {
    for _ in 0..ATTEMPTS {
        let Some((job, etag)) = app.jobs.load_active(key).await? else {
            return Ok(match app.jobs.load_done(key).await? {
                Some(done) => Cancelled::Finished(done.outcome()),
                None => Cancelled::Unknown,
            });
        };
        let now = app.now();
        match job {
            AnyJob::Finished(f) => return Ok(Cancelled::Finished(f.outcome())),
            AnyJob::Harvesting(_) | AnyJob::Combining(_) => return Ok(Cancelled::Ending),
            AnyJob::Queued(mut job) => {
                job.request_cancel(by, now);
                // Recorded first (If-Match): an invocation that took the job over this
                // instant wins the race, and then finds the request on its next step.
                let Some(etag) = app.jobs.update(&job, &etag).await? else {
                    continue;
                };
                drop_unsubmitted(app, job, &etag, j).await?;
                return Ok(Cancelled::Dropped);
            }
            AnyJob::Submitting(mut job) => {
                let first = job.request_cancel(by, now);
                if !first && job.is_leased(now) {
                    return Ok(Cancelled::AlreadyRequested);
                }
                let Some(etag) = app.jobs.update(&job, &etag).await? else {
                    continue;
                };
                if !job.is_leased(now) && job.create_started_at().is_none() {
                    drop_unsubmitted(app, job, &etag, j).await?;
                    return Ok(Cancelled::Dropped);
                }
                // Held by another invocation (or its create may have gone through): the
                // changed record makes its next write fail; whoever takes the job next
                // drops it, or adopts its batch and cancels that.
                j.info(format!(
                    "job={key} event=cancel_requested by={:?}: recorded; the job is being \
                     submitted right now, and ends at its next step",
                    by.as_str()
                ));
                return Ok(Cancelled::Recorded);
            }
            AnyJob::Running(mut job) => {
                let first = job.request_cancel(by, now);
                let id = job.batch().id.clone();
                if first && app.jobs.update(&job, &etag).await?.is_none() {
                    continue;
                }
                send_cancel(app, key, job.openai_endpoint(), &id, j).await?;
                return Ok(if first {
                    Cancelled::Requested { batches: vec![id] }
                } else {
                    Cancelled::AlreadyRequested
                });
            }
            AnyJob::Split(mut job) => {
                let first = job.request_cancel(by, now);
                if first && app.jobs.update(&job, &etag).await?.is_none() {
                    continue;
                }
                let mut batches = Vec::new();
                for part in job.parts() {
                    // Boxed: a part is a job, cancelled by this same function.
                    if let Cancelled::Requested { batches: b } =
                        Box::pin(cancel_job(app, &part.key, by, j)).await?
                    {
                        batches.extend(b);
                    }
                }
                return Ok(if first {
                    Cancelled::Requested { batches }
                } else {
                    Cancelled::AlreadyRequested
                });
            }
        }
    }
    // Another writer changed the record on every try: it is busy; the request is not lost
    // by saying so, the caller tries again.
    Err(StepError::Storage(crate::storage::StorageError::Failed {
        op: "cancel",
        target: format!("{}/active/{key}.json", app.jobs.container()),
        message: format!("the job record changed under {ATTEMPTS} tries; try again"),
    }))
}

/// Rewrites the status of the (still active) job `key`, so the request shows at once.
async fn publish(app: &App, key: &str) {
    if let Ok(Some((job, _))) = app.jobs.load_active(key).await {
        status::publish(
            &app.store,
            &app.jobs,
            &app.config.output_container,
            &job,
            None,
            app.now(),
        )
        .await;
    }
}

/// Asks the service to stop batch `id`. A batch that has already ended (the service
/// answers 400) or is unknown is no fault: the timer harvests what there is.
async fn send_cancel(
    app: &App,
    key: &str,
    endpoint: Option<&str>,
    id: &str,
    j: &Journal,
) -> Result<(), StepError> {
    match app.openai_at(endpoint).cancel(id).await {
        Ok(b) => {
            j.info(format!(
                "job={key} batch={id} event=cancel_sent batch_status={}: the service was asked \
                 to stop the batch; what it finished is kept",
                b.status
            ));
            Ok(())
        }
        // Whatever the service refuses for good (400 or 409 for a batch that has ended, as
        // the emulator and OpenAI's API answer), trying again cannot help: the batch's own
        // status, polled as usual, decides what happens.
        Err(OpenAiError::Rejected {
            status, message, ..
        }) => {
            j.info(format!(
                "job={key} batch={id} event=cancel_refused http_status={status}: the service \
                 did not cancel it (it has ended?): {message}"
            ));
            Ok(())
        }
        Err(OpenAiError::NotFound(_)) => {
            j.warn(format!(
                "job={key} batch={id} event=cancel_refused: the service does not know this \
                 batch; the timer's polling decides what became of it"
            ));
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// The timer's part: a job asked to stop whose claim nobody holds is dropped (no batch
/// yet), or its batch is cancelled (again, until the service says `cancelling`). Returns
/// the job for its usual step, or `None` when it has ended here.
pub async fn advance(
    app: &App,
    job: AnyJob,
    etag: String,
    j: &Journal,
) -> Result<Option<(AnyJob, String)>, StepError> {
    if job.cancel_request().is_none() {
        return Ok(Some((job, etag)));
    }
    let now = app.now();
    match job {
        AnyJob::Submitting(job) if !job.is_leased(now) && job.create_started_at().is_none() => {
            drop_unsubmitted(app, job, &etag, j).await?;
            Ok(None)
        }
        AnyJob::Queued(job) => {
            drop_unsubmitted(app, job, &etag, j).await?;
            Ok(None)
        }
        AnyJob::Running(job)
            if !matches!(
                job.batch().status,
                BatchStatus::Cancelling | BatchStatus::Cancelled
            ) =>
        {
            let id = job.batch().id.clone();
            // A fault here must not keep the batch from being polled (and harvested once it
            // ends): the next tick asks again.
            if let Err(e) = send_cancel(app, job.key(), job.openai_endpoint(), &id, j).await {
                j.warn(format!(
                    "job={} batch={id} event=cancel_failed: will ask again next tick: {e}",
                    job.key()
                ));
            }
            Ok(Some((AnyJob::Running(job), etag)))
        }
        other => Ok(Some((other, etag))),
    }
}

/// Ends a job asked to stop before its batch was created: `cancelled`, with a summary that
/// says nothing was submitted (for a follow-up round: that the earlier rounds' results
/// stay), then the record filed under done/.
pub async fn drop_unsubmitted<S: Unfinished>(
    app: &App,
    job: Job<S>,
    etag: &str,
    j: &Journal,
) -> Result<(), StepError> {
    let key = job.key().to_string();
    let by = job.cancel_request().map_or(CancelledBy::Command, |c| c.by);
    let lines = job.facts().map_or(0, |f| f.lines);
    let round = job.round();
    let job = job.finish(
        Outcome::Cancelled,
        "dropped before its batch was created",
        app.now(),
    );
    let mut summary = Summary::for_job(&job, app.now());
    summary.request_counts.total = lines;
    summary.lines_without_result = lines;
    summary.notes.push(match (by, round) {
        (_, 1..) => format!(
            "cancelled ({}) before the batch of follow-up round {round} was created; the \
             results of the earlier batches stay in this folder",
            by.as_str()
        ),
        (CancelledBy::InputDeleted, 0) => "dropped: the input was deleted before its batch \
                                           was created; nothing was submitted"
            .to_string(),
        (CancelledBy::Command, 0) => "dropped: cancelled by `handler cancel` before its \
                                      batch was created; nothing was submitted"
            .to_string(),
    });
    let path = job
        .results_folder()
        .unwrap_or_else(|| job.input().output_path())
        .to_string();
    summary::write(
        &app.store,
        job.output_container(&app.config),
        &path,
        &summary,
    )
    .await?;
    app.jobs.finish(&job, etag).await?;
    if job.part_of().is_none() {
        let input = job.input();
        j.info(format!(
            "job={key} batch=- {} cancelled_by={:?}: dropped before its batch was created; \
             summary at {}/{}",
            summary.log_fields(
                &format!("{}/{}", input.container, input.name),
                None,
                job.created_at()
            ),
            by.as_str(),
            app.config.output_container,
            summary::summary_name(&path)
        ));
    }
    Ok(())
}

/// A part of a split input asked to stop before it was started: it gets a finished record
/// and a summary like any dropped job, so the combine counts its lines as without result.
pub async fn drop_part(app: &App, parent: &Job<Split>, part: &PartRef) -> Result<(), StepError> {
    let state = &app.config.state_container;
    let input = crate::jobs::InputRef {
        container: state.clone(),
        name: part.blob.clone(),
        etag: part.etag.clone(),
        size: part.bytes,
        url: app.store.blob_url(state, &part.blob),
    };
    let now = app.now();
    let mut job = Job::claim_part(parent, part, input, &app.instance, 0, now);
    let by = parent
        .cancel_request()
        .map_or(CancelledBy::Command, |c| c.by);
    job.request_cancel(by, now);
    let Claim::Claimed { etag } = app.jobs.claim(&job).await? else {
        return Ok(()); // someone started it meanwhile: its own record carries on
    };
    drop_unsubmitted(app, job, &etag, &Journal::new("-")).await
}

/// The outcome of a batch that ended after a cancel was asked for: `cancelled`, unless it
/// completed before the cancel took hold (then its results are whole). A batch that failed
/// because its input was deleted under it (`input_modified`) was still stopped on request.
pub fn outcome_after_cancel(requested: bool, outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Completed | Outcome::Rejected => outcome,
        _ if requested => Outcome::Cancelled,
        _ => outcome,
    }
}

/// A cancel's result in a few words, for logs and the command.
pub fn describe(c: &Cancelled) -> String {
    match c {
        Cancelled::Requested { batches } => format!(
            "cancel sent for batch(es) {}",
            if batches.is_empty() {
                "-".to_string()
            } else {
                batches.join(", ")
            }
        ),
        Cancelled::Recorded => "cancel recorded (being submitted right now)".into(),
        Cancelled::Dropped => "dropped before its batch was created".into(),
        Cancelled::AlreadyRequested => "cancel already requested".into(),
        Cancelled::Ending => "its batch has already ended; results are being put in place".into(),
        Cancelled::Finished(o) => format!("already finished ({o})"),
        Cancelled::Unknown => "no job for this file".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_batch_is_cancelled_unless_it_completed_first() {
        assert_eq!(
            outcome_after_cancel(true, Outcome::Failed),
            Outcome::Cancelled
        );
        assert_eq!(
            outcome_after_cancel(true, Outcome::Completed),
            Outcome::Completed
        );
        assert_eq!(
            outcome_after_cancel(false, Outcome::Failed),
            Outcome::Failed
        );
    }
}
