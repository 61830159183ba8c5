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
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aoai_blob_batch::storage::{BlobInfo, BlobStore};
use chrono::Utc;
use futures::TryStreamExt;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::invoke::{self, CreatedBlob, EventSource, Invoker};

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
    /// Waits before each redelivery; after the last one the event is dropped.
    pub retry_delays: Vec<Duration>,
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
    /// invocation each time, as Event Grid redelivery through the host would give.
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
        let mut attempt = 0;
        loop {
            attempt += 1;
            let delivered = {
                let _permit = self.concurrency.acquire().await;
                deliver_once(&self.invoker, target, &event, &what, attempt).await
            };
            if delivered {
                return;
            }
            let Some(delay) = self.retry_delays.get(attempt - 1) else {
                tracing::error!(
                    "{what}: gave up after {attempt} attempts (Event Grid would dead-letter or drop it; the timer's sweep still finds the blob)"
                );
                return;
            };
            tracing::warn!("{what}: redelivering in {} ms", delay.as_millis());
            tokio::time::sleep(*delay).await;
        }
    }
}

async fn deliver_once(
    invoker: &Invoker,
    target: &Target,
    event: &Value,
    what: &str,
    attempt: usize,
) -> bool {
    let payload = invoke::event_grid_payload(&target.function, &target.binding, event, Utc::now());
    tracing::info!(
        "{what} → {} (attempt {attempt}, event id {})",
        target.function,
        event["id"].as_str().unwrap_or_default()
    );
    match invoker.invoke(&target.function, &payload).await {
        Ok(outcome) => {
            invoke::print_logs(&target.function, &outcome.logs);
            if outcome.succeeded() {
                tracing::info!(
                    "{} succeeded (HTTP {}, invocation {})",
                    target.function,
                    outcome.status,
                    outcome.invocation_id
                );
                true
            } else {
                tracing::warn!(
                    "{} failed (HTTP {}, invocation {}){}: {}",
                    target.function,
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
            tracing::warn!("{} failed: {e}", target.function);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_jsonl_any_case() {
        assert!(super::wanted("a/b.jsonl"));
        assert!(super::wanted("B.JSONL"));
        assert!(!super::wanted("b.json"));
        assert!(!super::wanted("b.jsonl.tmp"));
    }
}
