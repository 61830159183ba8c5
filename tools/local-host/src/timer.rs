//! Plays the timer trigger: fires a function on its schedule, one invocation at a time.
//!
//! The host runs each timer function as a singleton (a blob lease across instances), so an
//! invocation never overlaps the previous one: the next occurrence is computed only after the
//! previous invocation has answered, and occurrences missed meanwhile are skipped, as the host
//! does. The timer trigger has no retries by default; a failure waits for the next occurrence.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{
    invoke::{self, Invoker, ScheduleStatus},
    schedule::Schedule,
};

#[derive(Debug, Clone)]
pub struct TimerFunction {
    pub function: String,
    pub binding: String,
    pub schedule: Schedule,
    pub run_on_startup: bool,
    /// With the monitor, invocations carry `ScheduleStatus`; without, it is null.
    pub use_monitor: bool,
}

pub async fn run(timer: TimerFunction, invoker: Invoker) {
    let mut last: Option<DateTime<Utc>> = None;
    let mut last_updated = Utc::now();
    if timer.run_on_startup {
        let now = Utc::now();
        fire(&timer, &invoker, now, None, last_updated).await;
        last = Some(now);
        last_updated = Utc::now();
    }
    loop {
        let Some(next) = timer.schedule.next_after(Utc::now()) else {
            tracing::warn!("{}: the schedule has no further occurrence", timer.function);
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        fire(&timer, &invoker, next, last, last_updated).await;
        last = Some(next);
        last_updated = Utc::now();
    }
}

/// `ScheduleStatus` is what the monitor recorded after the previous run: `Last` the previous
/// occurrence, `Next` the one firing now.
async fn fire(
    timer: &TimerFunction,
    invoker: &Invoker,
    occurrence: DateTime<Utc>,
    last: Option<DateTime<Utc>>,
    last_updated: DateTime<Utc>,
) {
    let status = timer.use_monitor.then_some(ScheduleStatus {
        last,
        next: occurrence,
        last_updated,
    });
    let payload = invoke::timer_payload(&timer.function, &timer.binding, status, false, Utc::now());
    tracing::info!(
        "timer → {} (occurrence {})",
        timer.function,
        invoke::host_time(occurrence)
    );
    match invoker.invoke(&timer.function, &payload).await {
        Ok(outcome) => {
            invoke::print_logs(&timer.function, &outcome.logs);
            if outcome.succeeded() {
                tracing::info!(
                    "{} succeeded (HTTP {}, invocation {})",
                    timer.function,
                    outcome.status,
                    outcome.invocation_id
                );
            } else {
                tracing::warn!(
                    "{} failed (HTTP {}, invocation {}){}: {}; no retry, the next occurrence runs as scheduled",
                    timer.function,
                    outcome.status,
                    outcome.invocation_id,
                    outcome
                        .protocol_error
                        .as_deref()
                        .map(|e| format!(", {e}"))
                        .unwrap_or_default(),
                    outcome.body_excerpt
                );
            }
        }
        Err(e) => tracing::warn!(
            "{} failed: {e}; no retry, the next occurrence runs as scheduled",
            timer.function
        ),
    }
}
