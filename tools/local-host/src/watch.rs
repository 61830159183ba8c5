//! Plays Storage + Event Grid: polls the input container and delivers a BlobCreated event for
//! every `.jsonl` blob not yet seen with its current ETag, retrying failed deliveries the way
//! an Event Grid subscription does (on a shorter schedule).
//!
//! In Azure, the subscription filters on the subject (container prefix, `.jsonl` suffix,
//! case-insensitive) and Event Grid delivers each event on its own, possibly concurrently; each
//! delivery here is its own task for the same reason.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aoai_blob_batch::storage::{BlobInfo, BlobStore};
use chrono::Utc;
use futures::TryStreamExt;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::invoke::{self, CreatedBlob, EventShape, EventSource, Invoker};

/// A function with an `eventGridTrigger`: where the events go.
#[derive(Debug, Clone)]
pub struct Target {
    pub function: String,
    pub binding: String,
}

pub struct Watcher {
    pub store: Arc<BlobStore>,
    pub container: String,
    pub targets: Vec<Target>,
    pub source: EventSource,
    pub invoker: Invoker,
    pub poll: Duration,
    pub skip_existing: bool,
    pub delivery: DeliveryPolicy,
    pub event_shape: EventShape,
    /// Invocations in flight at once. Event Grid's own limit is far higher, but an initial sync
    /// of a full container must not flood a handler on a laptop.
    pub concurrency: Arc<Semaphore>,
}

/// Event Grid's subscription filter on the subject suffix is case-insensitive by default.
fn wanted(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".jsonl")
}

impl Watcher {
    pub async fn run(self) {
        let this = Arc::new(self);
        // name → ETag last delivered (or deliberately skipped).
        let mut seen: HashMap<String, String> = HashMap::new();
        let sequencer = Arc::new(AtomicU64::new(0));
        let mut first = true;
        let mut last_error: Option<String> = None;
        loop {
            match this.list().await {
                Ok(blobs) => {
                    if last_error.take().is_some() {
                        tracing::info!("listing {} works again", this.container);
                    }
                    let present: HashSet<String> = blobs.iter().map(|b| b.name.clone()).collect();
                    for blob in blobs {
                        if seen.get(&blob.name) == Some(&blob.etag) {
                            continue;
                        }
                        seen.insert(blob.name.clone(), blob.etag.clone());
                        if first && this.skip_existing {
                            tracing::info!(
                                "{}/{} was there before start: no event (--skip-existing)",
                                this.container,
                                blob.name
                            );
                            continue;
                        }
                        let seq = sequencer.fetch_add(1, Ordering::Relaxed);
                        for target in &this.targets {
                            let this = this.clone();
                            let (blob, target) = (blob.clone(), target.clone());
                            tokio::spawn(async move { this.deliver(&target, &blob, seq).await });
                        }
                    }
                    // A deleted blob that comes back is a new BlobCreated, even with the same name.
                    seen.retain(|name, _| present.contains(name));
                    first = false;
                }
                Err(e) => {
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!("cannot list container {}: {e}; retrying", this.container);
                        last_error = Some(e);
                    }
                }
            }
            tokio::time::sleep(this.poll).await;
        }
    }

    async fn list(&self) -> Result<Vec<BlobInfo>, String> {
        let blobs: Vec<BlobInfo> = self
            .store
            .list(&self.container, "")
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(blobs.into_iter().filter(|b| wanted(&b.name)).collect())
    }

    /// One event to one function: the same event (same id) on every attempt, a fresh
    /// invocation each time, as Event Grid redelivery through the host would give. An attempt
    /// fails on a non-2xx answer, on none, or on no answer within the delivery timeout; then
    /// the event is redelivered on the retry schedule until an attempt succeeds, the attempts
    /// run out or the event's time to live ends.
    async fn deliver(&self, target: &Target, blob: &BlobInfo, seq: u64) {
        let url = self.store.blob_url(&self.container, &blob.name);
        // Event Grid sequencers order the events of one blob; a clock-based high half keeps
        // them increasing across restarts of this program too.
        let sequencer =
            (u128::from(Utc::now().timestamp_millis().unsigned_abs()) << 64) | u128::from(seq);
        let event = invoke::blob_created_event(
            &self.source,
            &CreatedBlob {
                container: &self.container,
                name: &blob.name,
                etag: &blob.etag,
                size: blob.size,
                url: &url,
                sequencer,
            },
            Utc::now(),
        );
        let what = format!("BlobCreated {}/{}", self.container, blob.name);
        let published = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            if self.attempt(target, &event, &what, attempt).await {
                return;
            }
            let policy = &self.delivery;
            let Some(delay) = policy.delay_before(attempt + 1) else {
                tracing::error!(
                    "{what}: gave up after {attempt} attempts (--max-delivery-attempts; Event Grid would dead-letter or drop it; the timer's sweep still finds the blob)"
                );
                return;
            };
            if published.elapsed() + delay > policy.time_to_live {
                tracing::error!(
                    "{what}: gave up after {attempt} attempts: the next would come after the event's time to live ({} min, --event-ttl-minutes; Event Grid would dead-letter or drop it; the timer's sweep still finds the blob)",
                    policy.time_to_live.as_secs() / 60
                );
                return;
            }
            tracing::warn!(
                "{what}: redelivering in {} ms (attempt {} of at most {})",
                delay.as_millis(),
                attempt + 1,
                policy.max_attempts
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One delivery attempt. The invocation runs in its own task: when Event Grid stops
    /// waiting (the delivery timeout), the host does not cancel the function, which runs on
    /// to its end or to `functionTimeout`, and its outcome is only logged.
    async fn attempt(&self, target: &Target, event: &Value, what: &str, attempt: u32) -> bool {
        let invocation_id = invoke::new_invocation_id();
        tracing::info!(
            "{what} → {} (attempt {attempt}, event id {}, invocation {invocation_id})",
            target.function,
            event["id"].as_str().unwrap_or_default()
        );
        let abandoned = Arc::new(AtomicBool::new(false));
        let mut invocation = tokio::spawn({
            let concurrency = self.concurrency.clone();
            let invoker = self.invoker.clone();
            let payload = invoke::event_grid_payload(
                &target.function,
                &target.binding,
                event,
                self.event_shape,
                Utc::now(),
            );
            let function = target.function.clone();
            let invocation_id = invocation_id.clone();
            let abandoned = abandoned.clone();
            async move {
                // The slot is held for as long as the function runs, abandoned or not.
                let _permit = concurrency.acquire_owned().await;
                let outcome = invoker.invoke_as(invocation_id, &function, &payload).await;
                report(&function, outcome, abandoned.load(Ordering::Relaxed))
            }
        });
        let timeout = self.delivery.timeout;
        match tokio::time::timeout(timeout, &mut invocation).await {
            Ok(Ok(succeeded)) => succeeded,
            Ok(Err(e)) => {
                tracing::warn!(
                    "{}: invocation {invocation_id} was lost: {e}",
                    target.function
                );
                false
            }
            Err(_) => {
                abandoned.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "{what}: no answer from {} within {} s (--event-delivery-timeout-secs): Event Grid counts attempt {attempt} as failed; invocation {invocation_id} keeps running in the host",
                    target.function,
                    timeout.as_secs_f64()
                );
                false
            }
        }
    }
}

/// When and how often Event Grid delivers an event (event-grid/delivery-and-retry.md):
/// it waits 30 s for an answer, then retries after 10 s, 30 s, 1 min, 5 min, 10 min,
/// 30 min, 1 h and hourly after that, up to 30 attempts or 24 h (the subscription's
/// `maxDeliveryAttempts` and `eventTimeToLiveInMinutes` defaults).
#[derive(Debug, Clone)]
pub struct DeliveryPolicy {
    pub timeout: Duration,
    /// Waits before the 2nd, 3rd, … attempt; the last one repeats.
    pub retry_delays: Vec<Duration>,
    pub max_attempts: u32,
    pub time_to_live: Duration,
}

impl DeliveryPolicy {
    /// The wait before attempt number `attempt` (the first is 1), or `None` when there is none.
    pub fn delay_before(&self, attempt: u32) -> Option<Duration> {
        if attempt < 2 || attempt > self.max_attempts {
            return None;
        }
        let index = (attempt - 2) as usize;
        self.retry_delays
            .get(index)
            .or(self.retry_delays.last())
            .copied()
    }
}

/// Logs how an invocation ended; true when the host counts it as a success. An abandoned
/// invocation's answer reaches nobody: Event Grid has already counted its attempt as failed.
fn report(function: &str, outcome: Result<invoke::Outcome, String>, abandoned: bool) -> bool {
    let late = if abandoned {
        " after Event Grid stopped waiting; its redelivery comes all the same"
    } else {
        ""
    };
    match outcome {
        Ok(outcome) => {
            invoke::print_logs(function, &outcome.logs);
            if outcome.succeeded() {
                tracing::info!(
                    "{function} succeeded (HTTP {}, invocation {}){late}",
                    outcome.status,
                    outcome.invocation_id
                );
                true
            } else {
                tracing::warn!(
                    "{function} failed (HTTP {}, invocation {}){}{late}: {}",
                    outcome.status,
                    outcome.invocation_id,
                    outcome
                        .protocol_error
                        .as_deref()
                        .map(|e| format!(", {e}"))
                        .unwrap_or_default(),
                    outcome.body_excerpt
                );
                false
            }
        }
        Err(e) => {
            tracing::warn!("{function} failed: {e}{late}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_is_event_grids() {
        let secs = |s| Duration::from_secs(s);
        let policy = DeliveryPolicy {
            timeout: secs(30),
            retry_delays: [10, 30, 60, 300, 600, 1800, 3600].map(secs).to_vec(),
            max_attempts: 30,
            time_to_live: secs(24 * 3600),
        };
        assert_eq!(policy.delay_before(1), None, "the first attempt is at once");
        assert_eq!(policy.delay_before(2), Some(secs(10)));
        assert_eq!(policy.delay_before(8), Some(secs(3600)));
        assert_eq!(
            policy.delay_before(30),
            Some(secs(3600)),
            "hourly after that"
        );
        assert_eq!(policy.delay_before(31), None, "30 attempts at most");
    }

    #[test]
    fn only_jsonl_any_case() {
        assert!(super::wanted("a/b.jsonl"));
        assert!(super::wanted("B.JSONL"));
        assert!(!super::wanted("b.json"));
        assert!(!super::wanted("b.jsonl.tmp"));
    }
}
