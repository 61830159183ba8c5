//! Harvest: a batch that ended has its results moved into `batch-output/{path}/`, a merged,
//! input-ordered `merged.jsonl` written beside them, and `summary.json` last.
//!
//! Every step can be interrupted and run again on a later tick without losing or doubling a
//! file: progress is kept in the job record (written with `If-Match`), moves are server-side
//! copy then delete, and the record is finished only after the summary is written.

use std::{
    collections::{HashMap, HashSet},
    io::{Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
};

use serde_json::Value;

use crate::{
    app::{App, Journal, StepError},
    jobs::{Harvesting, Job, Outcome, followup_blob},
    openai::{Batch, BatchStatus, RequestCounts},
    outputs::{
        ERRORS, MERGED, RESULTS, clear_folder, custom_id_of, merged_line, open_lines,
        results_folder, save_progress,
    },
    storage::StorageError,
    submit,
    summary::{self, Summary, Usage},
};

fn outcome_of(status: &BatchStatus) -> Outcome {
    match status {
        BatchStatus::Completed => Outcome::Completed,
        BatchStatus::Expired => Outcome::Expired,
        BatchStatus::Cancelled => Outcome::Cancelled,
        _ => Outcome::Failed,
    }
}

/// Moves a harvesting job's results into place and finishes it, or, when its batch left
/// requests unanswered and follow-ups are enabled, submits them as the next round. `batch`
/// is the service's answer when the caller has it (a poll); otherwise it is fetched.
pub async fn harvest_batch(
    app: &App,
    mut job: Job<Harvesting>,
    mut etag: String,
    batch: Option<Batch>,
    j: &Journal,
) -> Result<(), StepError> {
    let key = job.key().to_string();
    let batch = match batch {
        Some(b) => b,
        None => app.openai.retrieve(&job.batch().id).await?,
    };
    let outcome = outcome_of(&batch.status);
    let out = job.output_container(&app.config).to_string();
    let path = results_folder(app, &mut job, j).await?;
    let first_round = job.round() == 0;

    // Results of an earlier version of this input must not mix with this one's.
    if !job.progress().cleared {
        if first_round {
            clear_folder(app, &out, &path).await?;
        }
        job.progress_mut().cleared = true;
        etag = save_progress(app, &job, &etag).await?;
        app.fault_point("harvest:after-clear");
    }
    if first_round {
        // The first batch's files are moved as they are, server-side.
        if !job.progress().results_moved {
            move_output(
                app,
                batch.output_blob.as_deref(),
                &out,
                &path,
                RESULTS,
                j,
                &key,
            )
            .await?;
            job.progress_mut().results_moved = true;
            etag = save_progress(app, &job, &etag).await?;
            app.fault_point("harvest:after-results");
        }
        if !job.progress().errors_moved {
            move_output(
                app,
                batch.error_blob.as_deref(),
                &out,
                &path,
                ERRORS,
                j,
                &key,
            )
            .await?;
            job.progress_mut().errors_moved = true;
            etag = save_progress(app, &job, &etag).await?;
            app.fault_point("harvest:after-errors");
        }
    } else {
        // A follow-up's lines are folded into the files already in place.
        let results = locate_output(app, batch.output_blob.as_deref(), j, &key);
        let errors = locate_output(app, batch.error_blob.as_deref(), j, &key);
        if !job.progress().results_moved {
            fold(app, results.as_ref(), &out, &path, RESULTS, None).await?;
            job.progress_mut().results_moved = true;
            etag = save_progress(app, &job, &etag).await?;
        }
        if !job.progress().errors_moved {
            fold(app, errors.as_ref(), &out, &path, ERRORS, results.as_ref()).await?;
            for (c, n) in results.iter().chain(errors.iter()) {
                app.store.delete(c, n, None).await?;
            }
            job.progress_mut().errors_moved = true;
            etag = save_progress(app, &job, &etag).await?;
        }
    }

    let follow_up = match outcome {
        Outcome::Expired => app.config.resubmit_expired,
        Outcome::Cancelled => app.config.resubmit_cancelled,
        _ => false,
    } && job.round() < app.config.max_followups;
    let staged = follow_up.then(|| followup_blob(&key, job.round() + 1));
    let merged = write_merged(app, &job, &out, &path, staged.as_deref()).await?;
    app.fault_point("harvest:after-merged");

    if let Some(staged) = staged.filter(|_| merged.followup_lines > 0) {
        let url = app.store.blob_url(app.jobs.container(), &staged);
        let lines = merged.followup_lines;
        let job = job.follow_up(
            url,
            lines,
            &app.instance,
            app.config.submit_lease.as_secs(),
            app.now(),
        );
        let Some(etag) = app.jobs.update(&job, &etag).await? else {
            return Ok(());
        };
        j.info(format!(
            "job={key} batch={}: {} with {lines} request(s) unanswered; resubmitting them (round {})",
            batch.id,
            batch.status,
            job.round()
        ));
        submit::run_claimed(app, job, etag, j).await?;
        return Ok(());
    }

    let rounds = job.round();
    let job = job.finish(
        outcome,
        &format!("batch {} {}", batch.id, batch.status),
        app.now(),
    );
    let mut summary = Summary::for_job(&job, app.now());
    summary.request_counts = match merged.merged_lines {
        Some(total) => RequestCounts {
            total,
            completed: merged.answered,
            failed: total - merged.answered - merged.without_result,
        },
        None => batch.request_counts.clone(),
    };
    if let Some(errors) = &batch.errors {
        summary.errors = errors.data.clone();
    }
    summary.usage = Some(merged.usage.clone());
    summary.service_times = Some(summary::ServiceTimes::from_batch(&batch));
    summary.files = summary::Files {
        results: merged.results_lines.map(|_| format!("{path}/{RESULTS}")),
        errors: (merged.error_lines.unwrap_or(0) > 0).then(|| format!("{path}/{ERRORS}")),
        merged: merged.merged_lines.map(|_| format!("{path}/{MERGED}")),
    };
    summary.lines_without_result = merged.without_result;
    if merged.merged_lines.is_none() {
        summary.notes.push(
            "merged.jsonl was not written: the input blob was deleted or replaced before the \
             batch ended"
                .into(),
        );
    }
    if path != job.input().output_path() {
        summary.notes.push(format!(
            "the input was replaced by a newer version while this batch ran; the newer \
             version's results are in {}/",
            job.input().output_path()
        ));
    }
    summary::write(&app.store, &out, &path, &summary).await?;
    app.fault_point("harvest:after-summary");
    // Staged follow-up inputs served their purpose; the job's record says what they were.
    for round in 1..=rounds {
        app.store
            .delete(app.jobs.container(), &followup_blob(&key, round), None)
            .await?;
    }
    app.jobs.finish(&job, &etag).await?;
    j.info(format!(
        "job={key} batch={}: {} — {} answered, {} failed, {} without result; results in {out}/{path}/",
        batch.id,
        outcome.as_str(),
        summary.request_counts.completed,
        summary.request_counts.failed,
        merged.without_result
    ));
    if let Some(errors) = summary::describe_errors(&summary.errors) {
        j.warn(format!("job={key} batch={}: {errors}", batch.id));
    }
    Ok(())
}

/// Moves one service output file into the job's folder: server-side copy, then delete.
/// A missing source (the service names both files even when it wrote one) is no error.
async fn move_output(
    app: &App,
    source_url: Option<&str>,
    out: &str,
    path: &str,
    file: &str,
    j: &Journal,
    key: &str,
) -> Result<(), StepError> {
    let Some(url) = source_url.filter(|u| !u.is_empty()) else {
        return Ok(());
    };
    let Some((container, name)) = app.store.locate(url) else {
        j.error(format!(
            "job={key}: the service wrote {file} outside the configured storage account; left where it is"
        ));
        return Ok(());
    };
    let Some(info) = app.store.properties(&container, &name).await? else {
        return Ok(());
    };
    if info.size > 0 {
        app.store
            .copy(&container, &name, out, &format!("{path}/{file}"))
            .await?;
        app.fault_point("harvest:after-copy");
    }
    app.store.delete(&container, &name, None).await?;
    Ok(())
}

/// Where the service put an output file, when it is in this account.
fn locate_output(app: &App, url: Option<&str>, j: &Journal, key: &str) -> Option<(String, String)> {
    let url = url.filter(|u| !u.is_empty())?;
    let located = app.store.locate(url);
    if located.is_none() {
        j.error(format!(
            "job={key}: the service wrote output outside the configured storage account; left where it is"
        ));
    }
    located
}

/// Folds a follow-up round's output file into the job's file of the same name: the lines
/// already there, then the new ones. Ids already present are skipped, so running it twice
/// (a crash after the write) changes nothing. For `errors.jsonl`, lines of requests the
/// follow-up answered (`answered_in`, its results file) are dropped. Unlike the first
/// round's server-side move, this streams both files once through the handler (memory
/// holds the ids only): block blobs cannot be appended to server-side from Azurite.
async fn fold(
    app: &App,
    source: Option<&(String, String)>,
    out: &str,
    path: &str,
    file: &str,
    answered_in: Option<&(String, String)>,
) -> Result<(), StepError> {
    let target = format!("{path}/{file}");
    let mut drop: HashSet<String> = HashSet::new();
    for (c, n) in answered_in.into_iter().chain(source) {
        if let Some(mut lines) = open_lines(app, c, n, None).await? {
            while let Some(line) = lines.next().await? {
                drop.extend(custom_id_of(&line));
            }
        }
    }
    if source.is_none() && drop.is_empty() {
        return Ok(());
    }
    let mut writer = app.store.writer(out, &target, "application/jsonl");
    let mut kept: HashSet<String> = HashSet::new();
    // The old file: kept unless a newer line replaces it (errors) or repeats it (results).
    if let Some(mut lines) = open_lines(app, out, &target, None).await? {
        while let Some(mut line) = lines.next().await? {
            let id = custom_id_of(&line);
            let replaced = id.as_ref().is_some_and(|i| drop.contains(i));
            if file == RESULTS || !replaced {
                kept.extend(id);
                line.push(b'\n');
                writer.write(&line).await?;
            }
        }
    }
    // The service names errors.jsonl even when it wrote none: a missing source is empty.
    let source = match source {
        Some((c, n)) => open_lines(app, c, n, None).await?,
        None => None,
    };
    if let Some(mut lines) = source {
        while let Some(mut line) = lines.next().await? {
            let id = custom_id_of(&line);
            if line.iter().all(u8::is_ascii_whitespace)
                || id.as_ref().is_some_and(|i| kept.contains(i))
            {
                continue;
            }
            line.push(b'\n');
            writer.write(&line).await?;
        }
    }
    if writer.bytes_written() > 0 {
        writer.finish().await?;
    } else {
        app.store.delete(out, &target, None).await?;
    }
    Ok(())
}

/// Builds `merged.jsonl`: one line per input line, in input order.
///
/// The service writes results in its own order, so the result lines are first spooled to a
/// local temporary file with an index `custom_id → (offset, length)`; then the input is
/// streamed in order and each line's result read back from the spool. Memory holds the
/// index and one line at a time, whatever the sizes.
///
/// With `staged`, the input lines left without an answer are also written there, as the
/// input of a follow-up batch.
async fn write_merged(
    app: &App,
    job: &Job<Harvesting>,
    out: &str,
    path: &str,
    staged: Option<&str>,
) -> Result<MergeStats, StepError> {
    let mut spool = tempfile::tempfile().map_err(io_error)?;
    let mut index: HashMap<String, (u64, u32)> = HashMap::new();
    let mut stats = MergeStats::default();

    // Errors first, then results: where the service wrote both for one id, success wins.
    for (file, counter) in [
        (ERRORS, &mut stats.error_lines),
        (RESULTS, &mut stats.results_lines),
    ] {
        let Some(mut lines) = open_lines(app, out, &format!("{path}/{file}"), None).await? else {
            continue;
        };
        let mut count = 0u64;
        while let Some(line) = lines.next().await? {
            spool_line(
                &line,
                &mut spool,
                &mut index,
                &mut stats.usage,
                file == RESULTS,
            )?;
            count += 1;
        }
        *counter = Some(count);
    }
    spool.flush().map_err(io_error)?;

    // The input as it was submitted; gone or replaced since, no merged file can be built.
    let mut input = match open_lines(
        app,
        &job.input().container,
        &job.input().name,
        Some(&job.input().etag),
    )
    .await
    {
        Ok(Some(lines)) => lines,
        Ok(None) | Err(StorageError::ConditionNotMet { .. }) => return Ok(stats),
        Err(e) => return Err(e.into()),
    };
    let mut writer = app
        .store
        .writer(out, &format!("{path}/{MERGED}"), "application/jsonl");
    let mut followup = staged.map(|name| {
        app.store
            .writer(app.jobs.container(), name, "application/jsonl")
    });
    // A part's lines are numbered as in the input it was cut from.
    let mut line_no = job.part_of().map_or(0, |p| p.line_offset);
    let mut merged = 0u64;
    let mut buf = Vec::new();
    while let Some(line) = input.next().await? {
        line_no += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let custom_id = custom_id_of(&line).unwrap_or_default();
        let result = match index.get(&custom_id) {
            Some(&(offset, len)) => {
                buf.resize(len as usize, 0);
                spool.read_exact_at(&mut buf, offset).map_err(io_error)?;
                serde_json::from_slice::<Value>(&buf).ok()
            }
            None => None,
        };
        let unanswered = result.as_ref().is_none_or(never_ran);
        if unanswered {
            stats.without_result += 1;
            if let Some(f) = followup.as_mut() {
                f.write(&line).await?;
                f.write(b"\n").await?;
                stats.followup_lines += 1;
            }
        } else if result
            .as_ref()
            .and_then(|r| r.pointer("/response/status_code"))
            .and_then(Value::as_u64)
            .is_some_and(|s| (200..300).contains(&s))
        {
            stats.answered += 1;
        }
        let mut text = serde_json::to_vec(&merged_line(line_no, &custom_id, result))
            .expect("values serialize");
        text.push(b'\n');
        writer.write(&text).await?;
        merged += 1;
    }
    writer.finish().await?;
    if let Some(f) = followup.filter(|f| f.bytes_written() > 0) {
        f.finish().await?;
    }
    stats.merged_lines = Some(merged);
    Ok(stats)
}

#[derive(Debug, Default)]
struct MergeStats {
    results_lines: Option<u64>,
    error_lines: Option<u64>,
    merged_lines: Option<u64>,
    /// Input lines answered with a 2xx.
    answered: u64,
    /// Input lines with no answer at all (or only the service's note that they never ran).
    without_result: u64,
    followup_lines: u64,
    usage: Usage,
}

/// A result line that only says the request never ran (the batch expired or was cancelled
/// first): for the user, and for a follow-up, that request is still unanswered.
fn never_ran(result: &Value) -> bool {
    matches!(
        result.pointer("/error/code").and_then(Value::as_str),
        Some("batch_expired" | "batch_cancelled")
    )
}

fn io_error(e: std::io::Error) -> StepError {
    StorageError::Failed {
        op: "spool",
        target: "local temporary file".into(),
        message: e.to_string(),
    }
    .into()
}

fn spool_line(
    line: &[u8],
    spool: &mut std::fs::File,
    index: &mut HashMap<String, (u64, u32)>,
    usage: &mut Usage,
    is_result: bool,
) -> Result<(), StepError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let Ok(value) = serde_json::from_slice::<Value>(line) else {
        return Ok(());
    };
    let Some(id) = value.get("custom_id").and_then(Value::as_str) else {
        return Ok(());
    };
    if is_result && let Some(u) = value.pointer("/response/body/usage") {
        usage.add(u);
    }
    let offset = spool.seek(SeekFrom::End(0)).map_err(io_error)?;
    spool.write_all(line).map_err(io_error)?;
    index.insert(id.to_string(), (offset, line.len() as u32));
    Ok(())
}
