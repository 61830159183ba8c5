//! One timer tick: converge every job a step further.
//!
//! - sweep: `.jsonl` inputs with no job record (a missed event, or no Event Grid at all) go
//!   through intake exactly as the trigger would take them;
//! - lapsed claims: `submitting` jobs whose holder died are taken over;
//! - queued jobs whose wait is over are submitted again;
//! - running jobs are polled; those that ended are harvested.
//!
//! Jobs are handled concurrently, a bounded number at a time, so a tick with a thousand
//! active jobs still ends well inside the schedule period.

use std::collections::HashSet;

use futures::{StreamExt, TryStreamExt};

use crate::{
    app::{App, Journal},
    jobs::{JobRecord, JobState, job_key, now},
    openai::OpenAiError,
    submit::StepError,
};

/// Jobs handled at once in a tick: with a 50 ms service round trip and three calls per job,
/// 32 keep a 1,000-job tick at a few seconds (BENCHMARKS.md, tick scale).
const TICK_CONCURRENCY: usize = 32;

/// A job still not ended this long after `expires_at` is reported on every tick.
const STUCK_AFTER_SECS: i64 = 3600;

#[derive(Debug, Default, Clone, Copy)]
pub struct TickStats {
    pub swept: usize,
    pub active: usize,
    pub harvested: usize,
    pub faults: usize,
}

impl App {
    pub async fn tick(&self, j: &Journal) -> Result<TickStats, StepError> {
        let started = std::time::Instant::now();
        let mut stats = TickStats::default();
        let active: HashSet<String> = self.jobs.active_keys().await?.into_iter().collect();
        stats.swept = self.sweep(&active, j).await?;

        // Listed again: the sweep may have added jobs, and those are polled at once.
        let keys = self.jobs.active_keys().await?;
        stats.active = keys.len();
        let results: Vec<Result<bool, StepError>> = futures::stream::iter(keys)
            .map(|key| async move { self.step(&key, j).await })
            .buffer_unordered(TICK_CONCURRENCY)
            .collect()
            .await;
        for r in results {
            match r {
                Ok(true) => stats.harvested += 1,
                Ok(false) => {}
                Err(e) => {
                    stats.faults += 1;
                    j.error(format!(
                        "a job step failed and will be retried next tick: {e}"
                    ));
                }
            }
        }
        j.info(format!(
            "tick done in {} ms: {} new input(s), {} active job(s), {} finished, {} fault(s)",
            started.elapsed().as_millis(),
            stats.swept,
            stats.active,
            stats.harvested,
            stats.faults
        ));
        Ok(stats)
    }

    /// Submits inputs that have no job record for their current version.
    async fn sweep(&self, active: &HashSet<String>, j: &Journal) -> Result<usize, StepError> {
        let (inputs, others): (Vec<_>, Vec<_>) = self
            .store
            .list(&self.config.input_container, "")
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .partition(|b| b.name.ends_with(".jsonl"));
        // Nothing dropped in is ignored silently: a `data.JSONL` or `data.json` is not an
        // input (the Event Grid filter and the Contract say `.jsonl`), so say so every tick
        // while it is there.
        if !others.is_empty() {
            const SHOWN: usize = 5;
            let names: Vec<&str> = others.iter().take(SHOWN).map(|b| b.name.as_str()).collect();
            let more = others.len().saturating_sub(SHOWN);
            j.warn(format!(
                "sweep: {} blob(s) in {} are not submitted: only names ending in \".jsonl\" \
                 (lower case) are batch inputs: {}{}",
                others.len(),
                self.config.input_container,
                names.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            ));
        }
        if inputs.is_empty() {
            return Ok(0);
        }
        // The done/ listing grows with history; one listing per tick (5,000 names a page)
        // is far cheaper than a HEAD request per input.
        let done = self.jobs.done_keys().await?;
        let missing: Vec<_> = inputs
            .into_iter()
            .filter(|b| {
                let key = job_key(&b.name, &b.etag);
                !active.contains(&key) && !done.contains(&key)
            })
            .collect();
        let count = missing.len();
        for blob in &missing {
            j.info(format!(
                "sweep: blob={}/{} has no job yet (missed event?); taking it in",
                self.config.input_container, blob.name
            ));
        }
        let results: Vec<_> = futures::stream::iter(missing)
            .map(|b| async move { self.intake(&b.name, j).await })
            .buffer_unordered(TICK_CONCURRENCY)
            .collect()
            .await;
        // One input's fault must not keep the others (or the polling after) from their turn.
        for r in results {
            if let Err(e) = r {
                j.error(format!("sweep: an input will be retried next tick: {e}"));
            }
        }
        Ok(count)
    }

    /// Moves one active job a step; `Ok(true)` when it finished.
    async fn step(&self, key: &str, j: &Journal) -> Result<bool, StepError> {
        let Some((mut rec, etag)) = self.jobs.load_active(key).await? else {
            return Ok(false);
        };
        let t = now();
        match rec.state {
            JobState::Submitting if rec.is_leased(t) => Ok(false),
            JobState::Submitting => {
                rec.take_over(&self.instance, self.config.submit_lease.as_secs())
                    .expect("submitting");
                if let Some(etag) = self.jobs.update(&rec, &etag).await? {
                    j.warn(format!(
                        "job={key}: claim lapsed (holder died?); resuming submission"
                    ));
                    self.run_claimed(rec, etag, j).await?;
                }
                Ok(false)
            }
            JobState::Queued if rec.next_attempt_at.is_some_and(|n| n > t) => Ok(false),
            JobState::Queued => {
                if !self.input_unchanged(&rec, j).await? {
                    return self.supersede(rec, &etag, j).await;
                }
                rec.take_over(&self.instance, self.config.submit_lease.as_secs())
                    .expect("queued");
                if let Some(etag) = self.jobs.update(&rec, &etag).await? {
                    j.info(format!(
                        "job={key}: resubmitting after quota wait (attempt {})",
                        rec.quota_attempts + 1
                    ));
                    self.run_claimed(rec, etag, j).await?;
                }
                Ok(false)
            }
            JobState::Running => self.poll_running(rec, etag, j).await,
            JobState::Split => {
                self.advance_parts(rec, etag, j).await?;
                // Finished when the combine filed it under done/.
                Ok(self.jobs.load_active(key).await?.is_none())
            }
            JobState::Harvesting => self.harvest(rec, etag, j).await.map(|_| true),
            JobState::Finished => {
                // Finished but not yet moved (a crash between the two writes): move it now.
                self.jobs.finish(&rec, &etag).await?;
                Ok(false)
            }
        }
    }

    async fn poll_running(
        &self,
        mut rec: JobRecord,
        etag: String,
        j: &Journal,
    ) -> Result<bool, StepError> {
        let key = rec.key.clone();
        let batch_id = rec.batch_id.clone().unwrap_or_default();
        let batch = match self.openai.retrieve(&batch_id).await {
            Ok(b) => b,
            Err(OpenAiError::NotFound(_)) => {
                j.error(format!(
                    "job={key} batch={batch_id}: the service no longer knows this batch; \
                     finishing the job as failed"
                ));
                let message = format!("batch {batch_id} is unknown to the service");
                self.fail_job(rec, &etag, "batch_not_found", message)
                    .await?;
                return Ok(true);
            }
            Err(e) => return Err(e.into()),
        };
        // A batch that failed for quota never ran: queue it like a refused create.
        if batch.status == crate::openai::BatchStatus::Failed
            && batch.error_codes().any(|c| c == "token_limit_exceeded")
        {
            let message = format!("batch {} failed with token_limit_exceeded", batch.id);
            self.queue_for_quota(rec, &etag, &message, j).await?;
            return Ok(false);
        }
        if !batch.status.is_terminal()
            && batch
                .expires_at
                .is_some_and(|e| now() > e + STUCK_AFTER_SECS)
        {
            j.warn(format!(
                "job={key} batch={}: still {} more than an hour past its expiry time",
                batch.id, batch.status
            ));
        }
        let before = rec.batch_status.clone();
        let counts_before = rec.request_counts.clone();
        rec.observe(&batch).expect("running");
        // Most ticks of a long batch change nothing: then the record is not rewritten (one
        // storage call of three per job saved; BENCHMARKS.md, tick scale).
        if rec.state == JobState::Running
            && before.as_deref() == Some(batch.status.as_str())
            && counts_before.as_ref() == Some(&batch.request_counts)
        {
            return Ok(false);
        }
        let Some(etag) = self.jobs.update(&rec, &etag).await? else {
            return Ok(false);
        };
        if before.as_deref() != Some(batch.status.as_str()) {
            j.info(format!(
                "job={key} batch={}: {} ({}/{} done, {} failed)",
                batch.id,
                batch.status,
                batch.request_counts.completed,
                batch.request_counts.total,
                batch.request_counts.failed
            ));
        }
        if rec.state == JobState::Harvesting {
            self.harvest_batch(rec, etag, Some(batch), j).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn input_unchanged(&self, rec: &JobRecord, _j: &Journal) -> Result<bool, StepError> {
        Ok(self
            .store
            .properties(&rec.input.container, &rec.input.name)
            .await?
            .is_some_and(|b| b.etag == rec.input.etag))
    }

    /// A queued job whose input was replaced or deleted: the new version is its own job.
    async fn supersede(
        &self,
        mut rec: JobRecord,
        etag: &str,
        j: &Journal,
    ) -> Result<bool, StepError> {
        j.info(format!(
            "job={}: input blob={}/{} changed or was deleted while queued; dropping this version",
            rec.key, rec.input.container, rec.input.name
        ));
        rec.finish(
            crate::jobs::Outcome::Cancelled,
            "input replaced while queued",
        )
        .expect("queued");
        self.jobs.finish(&rec, etag).await?;
        Ok(true)
    }
}
