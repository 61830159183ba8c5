//! The operator's commands, `handler status [NAME] [--json]` and `handler cancel NAME`: run
//! on a laptop with the function app's settings, no function app needed. They read the job
//! records in the state container, as the timer does.
//!
//! A host face, beside `server`: `main.rs` parses the arguments and calls in here.
//!
//! On a laptop there is no managed identity: with `BATCH_STORAGE_ACCOUNT_URL` (and without
//! `AZURE_OPENAI_API_KEY`) the commands use the developer's own sign-in (`az login`, `azd
//! auth login`) through `azure_identity::DeveloperToolsCredential`, which needs the same
//! roles the function app's identity has.

use std::{collections::HashMap, io::Write, process::ExitCode, sync::Arc};

use azure_core::credentials::TokenCredential;
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};

use crate::{
    app::{App, Journal, StartError},
    cancel::{self, Cancelled},
    config::{Config, names},
    jobs::{AnyJob, Finished, Job},
    openai::RetryConfig,
    status::{self, Status},
    storage::RetryPolicy,
};

/// Exit codes of the commands (README, "Watching and stopping a file").
pub mod exit {
    /// Done: the status shown, the cancel sent (or the job dropped).
    pub const OK: u8 = 0;
    /// Storage or the service could not be reached, or refused.
    pub const FAILED: u8 = 1;
    /// A setting is missing or malformed.
    pub const SETTINGS: u8 = 2;
    /// No job for that file.
    pub const UNKNOWN: u8 = 3;
    /// The file's job has already finished (or its batch has ended): nothing was changed.
    pub const FINISHED: u8 = 4;
}

/// Finished jobs `handler status` lists by default.
pub const FINISHED_SHOWN: usize = 10;

/// The settings the function app has. `status` does not call Azure OpenAI, so it needs no
/// `AZURE_OPENAI_ENDPOINT`: a stand-in that is never called fills it.
fn config(needs_openai: bool) -> Result<Config, String> {
    let mut env: HashMap<String, String> = std::env::vars().collect();
    if !needs_openai {
        env.entry(names::OPENAI_ENDPOINT.to_string())
            .or_insert_with(|| "https://not-called-by-handler-status.invalid".to_string());
    }
    Config::from_map(&env).map_err(|e| e.to_string())
}

/// The app the commands work with: the function app's, but signed in as the developer.
fn app(config: Config) -> Result<App, String> {
    let developer = || -> Result<Arc<dyn TokenCredential>, StartError> {
        let c: Arc<dyn TokenCredential> = azure_identity::DeveloperToolsCredential::new(None)
            .map_err(|e| {
                StartError::Identity(format!("cannot set up your Azure sign-in (az login): {e}"))
            })?;
        Ok(c)
    };
    App::assemble(
        config,
        RetryPolicy::default(),
        RetryConfig::default(),
        developer,
        "handler-cli",
    )
    .map_err(|e| e.to_string())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// One line of `handler status`.
struct Row {
    file: String,
    status: String,
    progress: String,
    age_secs: i64,
    batch: String,
    waiting_for: String,
    json: Value,
}

/// `handler status [NAME] [--json]`.
pub fn status(name: Option<&str>, as_json: bool, finished: usize) -> ExitCode {
    let app = match config(false).and_then(app) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::SETTINGS);
        }
    };
    let rows = runtime().block_on(collect(&app, name, finished));
    let (active, done) = match rows {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let mut out = std::io::stdout().lock();
    if as_json {
        let doc = json!({
            "active": active.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
            "finished": done.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
        });
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&doc).expect("JSON values serialize")
        );
    } else {
        print_table(&mut out, &active, &done);
    }
    let _ = out.flush();
    if let Some(name) = name
        && active.is_empty()
        && done.is_empty()
    {
        eprintln!(
            "no job for {name} in {} (active/ and done/); NAME is the blob's name in {}, e.g. \
             reports/q3.jsonl",
            app.config.state_container, app.config.input_container
        );
        return ExitCode::from(exit::UNKNOWN);
    }
    ExitCode::from(exit::OK)
}

/// The active jobs (inputs, not their parts) and the most recently finished ones.
async fn collect(
    app: &App,
    name: Option<&str>,
    finished: usize,
) -> Result<(Vec<Row>, Vec<Row>), String> {
    let now = app.now();
    let fault = |e: crate::jobs::JobStoreError| e.to_string();
    let (active, mut done): (Vec<AnyJob>, Vec<Job<Finished>>) = match name {
        Some(name) => {
            let mut active = Vec::new();
            let mut done = Vec::new();
            for v in app.jobs.versions_of(name).await.map_err(fault)? {
                match v.job {
                    AnyJob::Finished(f) => done.push(f),
                    other => active.push(other),
                }
            }
            (active, done)
        }
        None => {
            let keys = app.jobs.active_keys().await.map_err(fault)?;
            let active: Vec<AnyJob> = futures::stream::iter(keys)
                .map(|k| async move { app.jobs.load_active(&k).await })
                .buffer_unordered(16)
                .try_filter_map(|j| async move { Ok(j.map(|(job, _)| job)) })
                .try_collect()
                .await
                .map_err(fault)?;
            // Only the latest few finished records are read, however long the history:
            // the listing orders them. Parts are their parent's (their keys are
            // `{parent}/part-NNNN`).
            let keys: Vec<String> = app
                .jobs
                .done_keys_newest_first()
                .await
                .map_err(fault)?
                .into_iter()
                .filter(|k| !is_part_key(k))
                .take(finished)
                .collect();
            let done: Vec<Job<Finished>> = futures::stream::iter(keys)
                .map(|k| async move { app.jobs.load_done(&k).await })
                .buffer_unordered(16)
                .try_filter_map(|j| async move { Ok(j) })
                .try_collect()
                .await
                .map_err(fault)?;
            (active, done)
        }
    };
    let mut rows = Vec::new();
    for job in active.iter().filter(|j| j.part_of().is_none()) {
        let parts = status::parts_of(&app.jobs, job.parts())
            .await
            .map_err(fault)?;
        let Some(s) = Status::of(job, &parts, None, now) else {
            continue;
        };
        rows.push(active_row(job, &s, now));
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.age_secs));
    done.retain(|f| f.part_of().is_none());
    done.sort_by_key(|f| std::cmp::Reverse(f.updated_at()));
    done.truncate(finished);
    let done = done.iter().map(|f| finished_row(f, now)).collect();
    Ok((rows, done))
}

fn is_part_key(key: &str) -> bool {
    key.rsplit_once('@')
        .is_some_and(|(_, tail)| tail.contains('/'))
}

fn active_row(job: &AnyJob, s: &Status, now: i64) -> Row {
    let batch = match (&s.batch_id, s.batches.len()) {
        (Some(id), _) => id.clone(),
        (None, 0) => "-".to_string(),
        (None, n) => format!(
            "{} of {n} parts started",
            s.batches.iter().filter(|p| p.batch_id.is_some()).count()
        ),
    };
    let mut json = serde_json::to_value(s).expect("status serializes");
    json["file"] = json!(job.input().name);
    json["key"] = json!(job.key());
    json["age_seconds"] = json!(now - job.created_at());
    Row {
        file: job.input().name.clone(),
        status: s.status.as_str().to_string(),
        progress: s.progress(),
        age_secs: now - job.created_at(),
        batch,
        waiting_for: s.waiting_for.clone(),
        json,
    }
}

fn finished_row(job: &Job<Finished>, now: i64) -> Row {
    let counts = job.batch().map(|b| b.request_counts.clone());
    let progress = match &counts {
        Some(c) if c.total > 0 => format!("{}/{}", c.completed + c.failed, c.total),
        _ => "-".to_string(),
    };
    let batch_ids = job.batch_ids();
    let batch = match batch_ids.len() {
        0 if !job.parts().is_empty() => format!("{} parts", job.parts().len()),
        0 => "-".to_string(),
        _ => batch_ids.last().cloned().unwrap_or_default(),
    };
    let cancelled_by = job.cancel_request().map(|c| c.by.as_str());
    let json = json!({
        "file": job.input().name,
        "key": job.key(),
        "status": job.outcome(),
        "batch_id": batch_ids.last(),
        "batch_ids": batch_ids,
        "request_counts": counts,
        "uploaded_at": job.created_at(),
        "finished_at": job.updated_at(),
        "age_seconds": now - job.created_at(),
        "cancelled_by": cancelled_by,
    });
    Row {
        file: job.input().name.clone(),
        status: job.outcome().as_str().to_string(),
        progress,
        age_secs: now - job.created_at(),
        batch,
        waiting_for: match cancelled_by {
            Some(by) => format!("nothing (finished, cancelled by {by}); see summary.json"),
            None => "nothing (finished); see summary.json".to_string(),
        },
        json,
    }
}

/// `3m`, `2h05m`, `1d03h`: an age a person reads at a glance.
pub fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn print_table(out: &mut impl Write, active: &[Row], done: &[Row]) {
    let header = ["FILE", "STATUS", "PROGRESS", "AGE", "BATCH", "WAITING FOR"];
    let all: Vec<&Row> = active.iter().chain(done).collect();
    let cells = |r: &Row| {
        [
            r.file.clone(),
            r.status.clone(),
            r.progress.clone(),
            age(r.age_secs),
            r.batch.clone(),
            r.waiting_for.clone(),
        ]
    };
    let mut width = header.map(|h| h.chars().count());
    for r in &all {
        for (w, c) in width.iter_mut().zip(cells(r)) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cols: [String; 6]| {
        let mut text = String::new();
        for (i, (c, w)) in cols.iter().zip(width).enumerate() {
            if i == cols.len() - 1 {
                text.push_str(c);
            } else {
                text.push_str(&format!("{c:<w$}  "));
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(out, header.map(str::to_string));
    if active.is_empty() {
        let _ = writeln!(out, "(no file is running)");
    }
    for r in active {
        line(out, cells(r));
    }
    if !done.is_empty() {
        let _ = writeln!(out, "-- recently finished --");
        for r in done {
            line(out, cells(r));
        }
    }
}

/// `handler cancel NAME`.
pub fn cancel(name: &str) -> ExitCode {
    let app = match config(true).and_then(app) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::SETTINGS);
        }
    };
    let journal = Journal::new("handler-cancel");
    let result = runtime().block_on(cancel::cancel_input(&app, name, &journal));
    let done = match result {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: {name}: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let said = cancel::describe(&done);
    match done {
        Cancelled::Requested { .. } | Cancelled::Recorded | Cancelled::AlreadyRequested => {
            println!(
                "{name}: {said}. The function app's timer keeps what the service finished and \
                 writes {}/{}",
                app.config.output_container,
                crate::summary::summary_name(strip(name))
            );
            ExitCode::from(exit::OK)
        }
        Cancelled::Dropped => {
            println!(
                "{name}: {said}; summary at {}/{}",
                app.config.output_container,
                crate::summary::summary_name(strip(name))
            );
            ExitCode::from(exit::OK)
        }
        Cancelled::Ending | Cancelled::Finished(_) => {
            eprintln!("{name}: {said}; nothing was changed");
            ExitCode::from(exit::FINISHED)
        }
        Cancelled::Unknown => {
            eprintln!(
                "{name}: {said} (looked in {}/active and done; NAME is the blob's name in {}, \
                 e.g. reports/q3.jsonl); nothing was changed",
                app.config.state_container, app.config.input_container
            );
            ExitCode::from(exit::UNKNOWN)
        }
    }
}

fn strip(name: &str) -> &str {
    name.strip_suffix(".jsonl").unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(42), "42s");
        assert_eq!(age(5 * 60 + 3), "5m");
        assert_eq!(age(2 * 3600 + 5 * 60), "2h05m");
        assert_eq!(age(86400 + 3 * 3600), "1d03h");
    }

    #[test]
    fn parts_are_told_from_inputs_by_their_keys() {
        assert!(is_part_key("big.jsonl@0x8D1/part-0002"));
        assert!(!is_part_key("dir/big.jsonl@0x8D1"));
    }
}
