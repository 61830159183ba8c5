//! Inputs beyond one batch's limits (100,000 requests or 1 GB by default): split into
//! staged parts, one batch each, and combined into the one results folder a small input gets.
//!
//! - The validator draws the part boundaries while it checks the file (whole lines, each part
//!   within `BATCH_SPLIT_MAX_REQUESTS` / `BATCH_SPLIT_MAX_BYTES`); a second streaming pass
//!   copies each byte range to `batch-jobs/staging/{key}/part-NNNN.jsonl`. The same input
//!   always splits the same way, so a pass repeated after a crash writes the same parts.
//! - Each part is a job of its own (`Job::part_of`), so claiming, creating, adopting,
//!   quota waits, polling, follow-ups and harvest are the ones every job has; a part's files
//!   land in its staging folder instead of the output container.
//! - Parts are started in input order by `submit` (starting a part is submitting a job), and
//!   a part waiting for quota holds back those after it: they would only be refused for the
//!   same quota. This module stages the parts and, at the end, combines them.
//! - When every part has finished, the parent concatenates their `results.jsonl`,
//!   `errors.jsonl` and `merged.jsonl` (already in input order, with the input's line
//!   numbers) into `batch-output/{path}/`, writes one `summary.json` with a per-part table,
//!   and deletes the staging folder. These files stream through the handler: Put Block From
//!   URL would keep it server-side, but Azurite does not serve it with SAS auth.

use futures::{StreamExt, TryStreamExt};

use crate::{
    app::{App, Journal, StepError},
    jobs::{Combining, HarvestProgress, Job, Outcome, PartRef, Submitting, staging_prefix},
    lease,
    openai::{BatchError, RequestCounts},
    outputs::{
        ERRORS, MERGED, RESULTS, clear_folder, custom_id_of, merged_line, open_lines,
        results_folder, save_progress,
    },
    storage::{BlobWriter, StorageError},
    summary::{self, PartSummary, Summary, Usage},
    validate::PartSpan,
};

/// Copies each span of the input to its staged blob, streaming: memory holds one chunk
/// and one block.
pub async fn stage_parts(
    app: &App,
    job: &Job<Submitting>,
    spans: &[PartSpan],
) -> Result<Vec<PartRef>, StorageError> {
    let state = &app.config.state_container;
    let input = job.input();
    let (_, mut body) = app
        .store
        .download(&input.container, &input.name, Some(&input.etag))
        .await?;
    let mut parts = Vec::with_capacity(spans.len());
    let mut writer = None;
    // The file offset of the next byte the body yields.
    let mut at = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        let mut data: &[u8] = &chunk;
        while !data.is_empty() {
            let Some(span) = spans.get(parts.len()) else {
                break; // trailing blank lines
            };
            if at < span.offset {
                let skip = (span.offset - at).min(data.len() as u64) as usize;
                data = &data[skip..];
                at += skip as u64;
                continue;
            }
            let end = span.offset + span.bytes;
            let take = (end - at).min(data.len() as u64) as usize;
            let index = parts.len() as u32 + 1;
            let blob = format!("{}part-{index:04}.jsonl", staging_prefix(job.key()));
            let w =
                writer.get_or_insert_with(|| app.store.writer(state, &blob, "application/jsonl"));
            w.write(&data[..take]).await?;
            data = &data[take..];
            at += take as u64;
            if at == end {
                let etag = writer.take().expect("written above").finish().await?;
                parts.push(PartRef {
                    index,
                    key: format!("{}/part-{index:04}", job.key()),
                    blob,
                    etag,
                    first_line: span.first_line,
                    requests: span.requests,
                    bytes: span.bytes,
                    tokens: span.tokens,
                });
            }
        }
        at += data.len() as u64;
    }
    if parts.len() < spans.len() {
        return Err(StorageError::Failed {
            op: "split",
            target: format!("{}/{}", input.container, input.name),
            message: format!(
                "the blob ended at byte {at}, before its part {} (validated moments ago)",
                parts.len() + 1
            ),
        });
    }
    Ok(parts)
}

/// Puts the parts' files together in the input's output folder, then the summary, then
/// removes the staging folder. Each step is recorded, so a crash resumes after the last.
pub async fn combine_parts(
    app: &App,
    mut job: Job<Combining>,
    mut etag: String,
    j: &Journal,
) -> Result<(), StepError> {
    let key = job.key().to_string();
    let out = app.config.output_container.clone();
    let path = results_folder(app, &mut job, j).await?;
    if !job.progress().cleared {
        // Held still? (see `harvest::harvest_batch`): asked before the folder is cleared.
        etag = save_progress(app, &mut job, &etag).await?;
        clear_folder(app, &out, &path).await?;
        job.progress_mut().cleared = true;
        etag = save_progress(app, &mut job, &etag).await?;
    }
    for file in [RESULTS, ERRORS, MERGED] {
        if !*concat_done(job.progress_mut(), file) {
            // Every part's file is streamed through: the lease is renewed while it runs.
            let parts = job.parts().to_vec();
            let target = format!("{path}/{file}");
            let concat = Box::pin(concat_parts(app, &parts, file, &out, &target));
            let Some(done) = lease::holding(app, &mut job, &mut etag, concat, j).await? else {
                return Ok(());
            };
            done?;
            *concat_done(job.progress_mut(), file) = true;
            etag = save_progress(app, &mut job, &etag).await?;
            if file == RESULTS {
                app.fault_point("split:after-results");
            }
        }
    }

    let note = format!("{} parts combined", job.parts().len());
    let outcome = if job.progress().summary_written {
        parts_outcome(app, job.parts()).await?
    } else {
        let summary = parts_summary(app, &job, &note, &out, &path).await?;
        summary::write(&app.store, &out, &path, &summary).await?;
        job.progress_mut().summary_written = true;
        etag = save_progress(app, &mut job, &etag).await?;
        app.fault_point("split:after-summary");
        let input = job.input();
        let fields = summary.log_fields(
            &format!("{}/{}", input.container, input.name),
            None,
            job.created_at(),
        );
        j.info(format!(
            "job={key} batch=- {fields} parts={}: {} — {} parts, {} of {} requests answered, {} failed, {} without result; results in {out}/{path}/",
            job.parts().len(),
            summary.status,
            job.parts().len(),
            summary.request_counts.completed,
            summary.request_counts.total,
            summary.request_counts.failed,
            summary.lines_without_result
        ));
        summary.status
    };
    delete_staging(app, &key).await?;
    let job = job.finish(outcome, &note, app.now());
    app.jobs.finish(&job, &etag).await?;
    Ok(())
}

/// Streams one file of every part, in part order, into `target`; no file is written when
/// no part has one. A part without `merged.jsonl` never ran: its lines are made here.
async fn concat_parts(
    app: &App,
    parts: &[PartRef],
    file: &str,
    out: &str,
    target: &str,
) -> Result<(), StepError> {
    let state = &app.config.state_container;
    let mut writer = app.store.writer(out, target, "application/jsonl");
    for part in parts {
        let name = format!("{}/{file}", part.folder());
        let mut body = match app.store.download(state, &name, None).await {
            Ok((_, body)) => body,
            Err(StorageError::NotFound { .. }) if file == MERGED => {
                merged_without_results(app, part, &mut writer).await?;
                continue;
            }
            Err(StorageError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut last = b'\n';
        while let Some(chunk) = body.try_next().await? {
            if let Some(&b) = chunk.last() {
                last = b;
            }
            writer.write(&chunk).await?;
        }
        // Lines of the next part must not run on from this one's last.
        if last != b'\n' {
            writer.write(b"\n").await?;
        }
    }
    if writer.bytes_written() > 0 {
        writer.finish().await?;
    }
    Ok(())
}

/// The merged lines of a part that never ran (its create was refused, or its quota wait
/// given up): every request `no_result`, so the combined file still has one line per
/// input line.
async fn merged_without_results(
    app: &App,
    part: &PartRef,
    writer: &mut BlobWriter,
) -> Result<(), StepError> {
    let state = &app.config.state_container;
    let Some(mut lines) = open_lines(app, state, &part.blob, None).await? else {
        return Ok(()); // the summary says this part's lines are missing
    };
    let mut line_no = part.first_line - 1;
    while let Some(line) = lines.next().await? {
        line_no += 1;
        let id = custom_id_of(&line).unwrap_or_default();
        let mut text =
            serde_json::to_vec(&merged_line(line_no, &id, None)).expect("values serialize");
        text.push(b'\n');
        writer.write(&text).await?;
    }
    Ok(())
}

/// The one summary of a split input: totals over the parts, and each part's fate.
async fn parts_summary(
    app: &App,
    job: &Job<Combining>,
    note: &str,
    out: &str,
    path: &str,
) -> Result<Summary, StepError> {
    let state = &app.config.state_container;
    let mut table = Vec::with_capacity(job.parts().len());
    let mut counts = RequestCounts::default();
    let mut usage = Usage::default();
    let mut errors = Vec::new();
    let mut without_result = 0;
    let mut never_ran = Vec::new();
    for part in job.parts() {
        let child = app.jobs.load_done(&part.key).await?;
        let part_summary = match app
            .store
            .read(state, &summary::summary_name(part.folder()))
            .await?
        {
            Some((bytes, _)) => serde_json::from_slice::<Summary>(&bytes).ok(),
            None => None,
        };
        // Every part is in done/ by now (combining starts only then); a part with
        // neither a summary nor a record is reported failed, as the gravest case.
        let status = part_summary
            .as_ref()
            .map(|s| s.status)
            .or_else(|| child.as_ref().map(|c| c.outcome()))
            .unwrap_or(Outcome::Failed);
        if let Some(u) = part_summary.as_ref().and_then(|s| s.usage.as_ref()) {
            usage.add_totals(u);
        }
        let (part_counts, part_errors, part_without) = match &part_summary {
            Some(s) if s.files.merged.is_some() => (
                s.request_counts.clone(),
                s.errors.clone(),
                s.lines_without_result,
            ),
            // Never ran (a refused create, a quota wait given up): every request is
            // without result, as its lines in merged.jsonl say.
            other => {
                never_ran.push(part.index);
                (
                    RequestCounts {
                        total: part.requests,
                        ..Default::default()
                    },
                    other.as_ref().map(|s| s.errors.clone()).unwrap_or_default(),
                    part.requests,
                )
            }
        };
        counts.total += part_counts.total;
        counts.completed += part_counts.completed;
        counts.failed += part_counts.failed;
        without_result += part_without;
        // A service error's line is the part's; the user knows the input's.
        let offset = part.first_line - 1;
        let part_errors: Vec<BatchError> = part_errors
            .into_iter()
            .map(|e| BatchError {
                line: e.line.map(|l| l + offset),
                ..e
            })
            .collect();
        errors.extend(part_errors.iter().cloned());
        let batch_ids = child.as_ref().map(|c| c.batch_ids()).unwrap_or_default();
        table.push(PartSummary {
            part: part.index,
            first_line: part.first_line,
            last_line: part.last_line(),
            requests: part.requests,
            batch_id: batch_ids.last().cloned(),
            batch_ids,
            status,
            request_counts: part_counts,
            lines_without_result: part_without,
            errors: part_errors,
        });
    }

    let outcome = combined_outcome(table.iter().map(|p| p.status));
    let finished = job.clone().finish(outcome, note, app.now());
    let mut summary = Summary::for_job(&finished, app.now());
    summary.batch_id = table.iter().find_map(|p| p.batch_id.clone());
    summary.request_counts = counts;
    summary.usage = Some(usage);
    summary.errors = errors;
    summary.lines_without_result = without_result;
    let exists = |f: &'static str| {
        let name = format!("{path}/{f}");
        async move {
            app.store
                .properties(out, &name)
                .await
                .map(|p| p.map(|_| name))
        }
    };
    summary.files = summary::Files {
        results: exists(RESULTS).await?,
        errors: exists(ERRORS).await?,
        merged: exists(MERGED).await?,
    };
    let unfinished: Vec<String> = table
        .iter()
        .filter(|p| p.status != Outcome::Completed)
        .map(|p| {
            let why = p
                .errors
                .first()
                .and_then(|e| e.code.clone())
                .map(|c| format!(" ({c})"))
                .unwrap_or_default();
            format!(
                "part {} (lines {}–{}) {}{why}, {} without result",
                p.part, p.first_line, p.last_line, p.status, p.lines_without_result
            )
        })
        .collect();
    summary.notes.push(format!(
        "the input was split into {} parts, one batch each; results are combined in input order",
        table.len()
    ));
    if !unfinished.is_empty() {
        summary.notes.push(format!(
            "partly finished: {} of {} parts completed; {}",
            table.len() - unfinished.len(),
            table.len(),
            unfinished.join("; ")
        ));
    }
    if !never_ran.is_empty() {
        summary.notes.push(format!(
            "part(s) {never_ran:?} never ran; their lines are in merged.jsonl with error no_result"
        ));
    }
    if path != job.input().output_path() {
        summary.notes.push(format!(
            "the input was replaced by a newer version while these batches ran; the newer \
             version's results are in {}/",
            job.input().output_path()
        ));
    }
    summary.parts = table;
    Ok(summary)
}

/// The outcome of a split job whose summary is already written (a resumed combine).
async fn parts_outcome(app: &App, parts: &[PartRef]) -> Result<Outcome, StepError> {
    let mut outcomes = Vec::with_capacity(parts.len());
    for part in parts {
        let child = app.jobs.load_done(&part.key).await?;
        outcomes.push(child.map_or(Outcome::Failed, |c| c.outcome()));
    }
    Ok(combined_outcome(outcomes.into_iter()))
}

/// Removes everything staged for a job: its parts, their results, their follow-ups.
pub async fn delete_staging(app: &App, key: &str) -> Result<(), StepError> {
    let state = &app.config.state_container;
    let names: Vec<_> = app
        .store
        .list(state, &staging_prefix(key))
        .map_ok(|b| b.name)
        .try_collect()
        .await?;
    for name in names {
        app.store.delete(state, &name, None).await?;
    }
    Ok(())
}

/// The progress flag of concatenating `file`.
fn concat_done<'a>(p: &'a mut HarvestProgress, file: &str) -> &'a mut bool {
    match file {
        RESULTS => &mut p.results_moved,
        ERRORS => &mut p.errors_moved,
        _ => &mut p.merged_moved,
    }
}

/// The status a split input reports: `completed` only when every part completed; otherwise
/// the gravest of its parts' ends (failed, then expired, then cancelled).
fn combined_outcome(parts: impl Iterator<Item = Outcome>) -> Outcome {
    let rank = |o: Outcome| match o {
        Outcome::Completed => 0,
        Outcome::Cancelled => 1,
        Outcome::Expired => 2,
        Outcome::Failed | Outcome::Rejected => 3,
    };
    parts
        .map(|o| {
            if o == Outcome::Rejected {
                Outcome::Failed
            } else {
                o
            }
        })
        .max_by_key(|o| rank(*o))
        .unwrap_or(Outcome::Completed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_input_reports_its_gravest_part() {
        use Outcome::*;
        assert_eq!(
            combined_outcome([Completed, Completed].into_iter()),
            Completed
        );
        assert_eq!(
            combined_outcome([Completed, Cancelled].into_iter()),
            Cancelled
        );
        assert_eq!(combined_outcome([Expired, Cancelled].into_iter()), Expired);
        assert_eq!(
            combined_outcome([Expired, Failed, Completed].into_iter()),
            Failed
        );
        assert_eq!(combined_outcome([Rejected].into_iter()), Failed);
    }
}
