//! Holding a job while a long step runs: the lease of an intake's claim or a harvest's
//! holder is renewed in the job record while the work goes on, so nobody takes over from a
//! live holder, and a holder that dies stops renewing and lets the lease lapse.

use std::time::Duration;

use crate::{
    app::{App, Journal, StepError},
    jobs::{Job, Leased},
};

/// Runs `work` (validating a large input, staging a split's parts, writing `merged.jsonl`)
/// while renewing `job`'s lease every third of it. A redelivery that comes meanwhile (Event
/// Grid stops waiting after 30 s; a webhook and a tick may arrive together) or the timer
/// then finds the job held by a live invocation and leaves it, instead of taking over a
/// lapsed lease and doing the work a second time beside this one.
///
/// `Ok(None)`: the job was lost (only possible after renewals failed for a whole lease); its
/// new holder goes on, and this invocation stops without acting on `work`'s result.
pub async fn holding<S: Leased, T>(
    app: &App,
    job: &mut Job<S>,
    etag: &mut String,
    work: impl std::future::Future<Output = T>,
    j: &Journal,
) -> Result<Option<T>, StepError> {
    let lease = app.config.submit_lease;
    let every = (lease / 3).max(Duration::from_millis(100));
    let mut renewals = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Ok(Some(done)),
            _ = renewals.tick() => {
                job.renew(lease.as_secs(), app.now());
                match app.jobs.update(job, etag).await {
                    Ok(Some(renewed)) => *etag = renewed,
                    Ok(None) => {
                        j.warn(format!(
                            "job={}: lost its hold on the job while working on it; its new \
                             holder goes on",
                            job.key()
                        ));
                        return Ok(None);
                    }
                    // The next renewal may get through; the lease has two more thirds to go.
                    Err(e) => tracing::warn!(
                        invocation_id = %j.invocation_id(),
                        "job={}: could not renew the lease: {e}",
                        job.key()
                    ),
                }
            }
        }
    }
}
