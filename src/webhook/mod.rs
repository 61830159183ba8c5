//! Azure OpenAI's webhook events (`batch.completed`, `batch.failed`, `batch.cancelled`,
//! `batch.expired`): a verified event moves its job on at once, instead of at the next tick.
//!
//! - [`signature`]: the Standard Webhooks check over the exact bytes (pure logic);
//! - [`handle`]: the workflow: the event's `webhook-id` is recorded once
//!   (`{state container}/webhooks/{id}`, `If-None-Match: *`), the active job whose batch the
//!   event names is found, and the timer's own per-job step ([`poll::step_job`]) runs for it:
//!   retrieve the batch, harvest it if it ended, or record its failure.
//!
//! Polling stays the fallback: an event lost, refused or never configured only costs latency,
//! and an event racing a tick yields one harvest (the job record's ETag conditions decide who
//! moves the job on; the other finds nothing left to do).
//!
//! A workflow above `poll` (it calls `poll::step_job`); nothing below calls it.

pub mod register;
pub mod signature;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;

use crate::{
    app::{App, Journal, StepError, guarded},
    jobs::{AnyJob, JobState},
    poll,
    storage::{StorageError, WriteCondition},
};

/// The service waits 10 s for an answer; the step runs this long at most before the answer
/// goes out and the step carries on in the background (the next tick finishes it if this
/// instance stops first).
pub const ANSWER_WITHIN: Duration = Duration::from_secs(8);

/// Active records read at once while looking for the job of a batch.
const FIND_CONCURRENCY: usize = 32;

/// Where handled `webhook-id`s are recorded, in the state container.
pub const SEEN_PREFIX: &str = "webhooks/";

/// The part of an event the handler acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event's own id (`evt_…`).
    pub id: String,
    /// `batch.completed`, …
    pub kind: String,
    /// `data.id`: for a `batch.*` event, the batch id.
    pub object_id: Option<String>,
}

impl Event {
    /// Reads a verified body. `None` when it is not a JSON object with a `type`.
    pub fn parse(body: &[u8]) -> Option<Event> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
        Some(Event {
            id: v.get("id").and_then(text).unwrap_or_default(),
            kind: v.get("type").and_then(text)?,
            object_id: v.get("data").and_then(|d| d.get("id")).and_then(text),
        })
    }

    /// The batch id of a `batch.*` event.
    pub fn batch_id(&self) -> Option<&str> {
        self.kind
            .starts_with("batch.")
            .then_some(self.object_id.as_deref())
            .flatten()
    }
}

/// What became of a verified delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// This `webhook-id` was handled before (a redelivery or a replay): nothing done.
    Duplicate,
    /// Not a `batch.*` event, or no batch id in it: acknowledged, nothing done.
    Ignored,
    /// No active job has this batch (another app's batch, or the job already finished).
    UnknownBatch,
    /// The job was stepped; `finished` when it (or, for a part, its file) ended now.
    Stepped { job: String, finished: bool },
    /// The step outlived [`ANSWER_WITHIN`]; it goes on after the answer.
    Continuing { job: String },
}

/// Handles a verified delivery. `Err` only for faults a redelivery can get past (the
/// `webhook-id` record is then removed again, so the redelivery is not taken for a replay).
pub async fn handle(
    app: &Arc<App>,
    webhook_id: &str,
    event: &Event,
    j: &Journal,
) -> Result<Handled, StepError> {
    let seen = seen_blob(webhook_id);
    let record = serde_json::json!({
        "webhook_id": webhook_id,
        "event_id": event.id,
        "type": event.kind,
        "object_id": event.object_id,
        "received_at": app.now(),
    });
    match app
        .store
        .write(
            app.jobs.container(),
            &seen,
            Bytes::from(record.to_string()),
            WriteCondition::IfNotExists,
            "application/json",
        )
        .await
    {
        Ok(_) => {}
        Err(StorageError::AlreadyExists { .. }) => {
            j.info(format!(
                "webhook {webhook_id} ({}) was handled before: nothing to do",
                event.kind
            ));
            return Ok(Handled::Duplicate);
        }
        Err(e) => return Err(e.into()),
    }
    let result = act(app, event, j).await;
    if let Err(e) = &result
        && e.is_transient()
    {
        // Let the service's redelivery in; if even this fails, the tick still polls the job.
        let _ = app.store.delete(app.jobs.container(), &seen, None).await;
    }
    result
}

async fn act(app: &Arc<App>, event: &Event, j: &Journal) -> Result<Handled, StepError> {
    let Some(batch_id) = event.batch_id() else {
        j.info(format!(
            "webhook event {} of type {}: not a batch event; ignored",
            event.id, event.kind
        ));
        return Ok(Handled::Ignored);
    };
    let Some((key, parent)) = find_job(app, batch_id).await? else {
        j.info(format!(
            "webhook event {} ({}): batch={batch_id} belongs to no active job (finished \
             already, or not this app's); nothing to do",
            event.id, event.kind
        ));
        return Ok(Handled::UnknownBatch);
    };
    j.info(format!(
        "job={key} batch={batch_id}: webhook event {} ({}); moving the job on now",
        event.id, event.kind
    ));
    // Spawned, so that a step longer than the service's wait still completes: the answer
    // goes out after ANSWER_WITHIN whatever happens, the step runs on.
    let work = {
        let (app, key, j) = (app.clone(), key.clone(), j.clone());
        tokio::spawn(async move {
            let mut finished =
                guarded(format!("job={key}"), poll::step_job(&app, &key, &j)).await?;
            // A part that ended may be the last one its file waited for: the file's own
            // step combines the parts.
            if finished && let Some(parent) = parent {
                finished =
                    guarded(format!("job={parent}"), poll::step_job(&app, &parent, &j)).await?;
            }
            Ok::<bool, StepError>(finished)
        })
    };
    let mut work = work;
    match tokio::time::timeout(answer_within(), &mut work).await {
        Ok(joined) => {
            joined_outcome(&key, joined).map(|finished| Handled::Stepped { job: key, finished })
        }
        Err(_) => {
            j.info(format!(
                "job={key}: still working after {} ms; answering now, the work goes on (the \
                 next tick finishes it if this instance stops)",
                answer_within().as_millis()
            ));
            // Nobody waits for the answer any more: its outcome is logged here.
            let (j, job) = (j.clone(), key.clone());
            tokio::spawn(async move {
                match joined_outcome(&job, work.await) {
                    Ok(finished) => j.info(format!(
                        "job={job}: the webhook's work is done ({})",
                        if finished { "finished" } else { "moved on" }
                    )),
                    Err(e) => j.error(format!(
                        "job={job}: the webhook's work failed; the next tick retries: {e}"
                    )),
                }
            });
            Ok(Handled::Continuing { job: key })
        }
    }
}

/// [`ANSWER_WITHIN`], or in a debug build the test setting that shortens it (so a test sees
/// the answer go out before the work ends without a step that takes 8 s).
fn answer_within() -> Duration {
    if crate::config::TEST_SWITCHES_COMPILED
        && let Some(ms) = std::env::var(crate::config::names::TEST_WEBHOOK_ANSWER_MS)
            .ok()
            .and_then(|v| v.parse().ok())
    {
        return Duration::from_millis(ms);
    }
    ANSWER_WITHIN
}

fn joined_outcome(
    key: &str,
    joined: Result<Result<bool, StepError>, tokio::task::JoinError>,
) -> Result<bool, StepError> {
    joined.unwrap_or_else(|join| {
        Err(StepError::Panicked {
            what: format!("job={key}"),
            message: join.to_string(),
        })
    })
}

/// The active job whose current batch is `batch_id`, and for a part, its file's job.
/// Reads the active records, a bounded number at a time, until one matches: O(active jobs),
/// like a tick's own listing.
async fn find_job(
    app: &App,
    batch_id: &str,
) -> Result<Option<(String, Option<String>)>, StepError> {
    // The listing's index names each running job's batch: only a match, and the records
    // that carry no index or are harvesting (whose batch the index does not name), are read.
    let mut entries: Vec<_> = app
        .jobs
        .active_entries()
        .await?
        .into_iter()
        .filter(|e| match &e.index {
            None => true,
            Some(ix) => {
                ix.state == JobState::Harvesting
                    || ix.batch.as_ref().is_some_and(|b| b.id == batch_id)
            }
        })
        .collect();
    // The likely one first: the running job whose index names the batch.
    entries.sort_by_key(|e| {
        e.index
            .as_ref()
            .is_none_or(|ix| ix.state != JobState::Running)
    });
    let mut found = futures::stream::iter(entries)
        .map(|entry| async move {
            let key = entry.key;
            let loaded = app.jobs.load_active(&key).await?;
            Ok::<_, StepError>(loaded.and_then(|(job, _)| {
                (job.batch_id() == Some(batch_id)).then(|| {
                    let parent = match &job {
                        AnyJob::Running(j) => j.part_of().map(|p| p.parent.clone()),
                        AnyJob::Harvesting(j) => j.part_of().map(|p| p.parent.clone()),
                        _ => None,
                    };
                    (key, parent)
                })
            }))
        })
        .buffered(FIND_CONCURRENCY);
    while let Some(r) = found.next().await {
        if let Some(hit) = r? {
            return Ok(Some(hit));
        }
    }
    Ok(None)
}

/// The record of a handled `webhook-id`. The id is the sender's: kept as the name when it is
/// plainly safe there, else hashed.
pub fn seen_blob(webhook_id: &str) -> String {
    let plain = !webhook_id.is_empty()
        && webhook_id.len() <= 200
        && webhook_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        format!("{SEEN_PREFIX}{webhook_id}")
    } else {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(webhook_id.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        format!("{SEEN_PREFIX}sha256-{hex}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_event_names_its_batch() {
        let e = Event::parse(
            br#"{"object":"event","id":"evt_1","type":"batch.completed","created_at":1,"data":{"id":"batch_9"}}"#,
        )
        .unwrap();
        assert_eq!(e.batch_id(), Some("batch_9"));
        let other =
            Event::parse(br#"{"id":"evt_2","type":"response.completed","data":{"id":"resp_1"}}"#)
                .unwrap();
        assert_eq!(other.batch_id(), None);
        assert_eq!(Event::parse(b"[1]"), None);
        assert_eq!(Event::parse(b"not json"), None);
    }

    #[test]
    fn webhook_ids_become_safe_blob_names() {
        assert_eq!(seen_blob("msg_2Abc-9"), "webhooks/msg_2Abc-9");
        let odd = seen_blob("../active/x.json");
        assert!(
            odd.starts_with("webhooks/sha256-") && !odd.contains(".."),
            "{odd}"
        );
    }
}
