//! Inputs beyond one batch's limits (100,000 requests or 200 MB by default): split into
//! staged parts, one batch each, and combined into the one results folder a small input gets.
//!
//! - The validator draws the part boundaries while it checks the file (whole lines, each part
//!   within `BATCH_SPLIT_MAX_REQUESTS` / `BATCH_SPLIT_MAX_BYTES`); a second streaming pass
//!   copies each byte range to `batch-jobs/staging/{key}/part-NNNN.jsonl`. The same input
//!   always splits the same way, so a pass repeated after a crash writes the same parts.
//! - Each part is a job of its own (`JobRecord::part_of`), so claiming, creating, adopting,
//!   quota waits, polling, follow-ups and harvest are the ones every job has; a part's files
//!   land in its staging folder instead of the output container.
//! - Parts are started in input order, and a part waiting for quota holds back those after
//!   it: they would only be refused for the same quota.
//! - When every part has finished, the parent concatenates their `results.jsonl`,
//!   `errors.jsonl` and `merged.jsonl` (already in input order, with the input's line
//!   numbers) into `batch-output/{path}/`, writes one `summary.json` with a per-part table,
//!   and deletes the staging folder. These files stream through the handler: Put Block From
//!   URL would keep it server-side, but Azurite does not serve it with SAS auth.

use futures::{StreamExt, TryStreamExt};

use crate::{
    app::{App, Journal},
    harvest::{ERRORS, HarvestProgress, MERGED, RESULTS, Usage, custom_id_of, merged_line},
    jobs::{Claim, InputRef, JobRecord, JobState, Outcome, PartRef, staging_prefix},
    openai::{BatchError, RequestCounts},
    storage::StorageError,
    submit::{Intake, StepError},
    summary::{self, PartSummary, Summary},
    validate::PartSpan,
};

impl App {
    /// Stages the parts of a validated input that is beyond one batch's limits, records the
    /// split, and starts the first parts.
    pub(crate) async fn split_input(
        &self,
        mut rec: JobRecord,
        etag: String,
        spans: &[PartSpan],
        j: &Journal,
    ) -> Result<Intake, StepError> {
        let key = rec.key.clone();
        let parts = match self.stage_parts(&rec, spans).await {
            Ok(parts) => parts,
            Err(StorageError::NotFound { .. }) | Err(StorageError::ConditionNotMet { .. }) => {
                j.info(format!(
                    "job={key}: blob={}/{} was deleted or replaced while being split; the new version is its own job",
                    rec.input.container, rec.input.name
                ));
                self.delete_staging(&key).await?;
                self.jobs.abandon(&key, &etag).await?;
                return Ok(Intake::Gone);
            }
            Err(e) => return Err(e.into()),
        };
        self.fault_point("split:after-stage");
        let count = parts.len();
        rec.split(parts).expect("submitting");
        let Some(etag) = self.jobs.update(&rec, &etag).await? else {
            return Ok(Intake::InProgressElsewhere);
        };
        self.fault_point("split:after-record");
        let facts = rec.facts.clone().unwrap_or_default();
        j.info(format!(
            "job={key}: blob={}/{} has {} requests ({} bytes), beyond one batch's limits \
             ({} requests, {} bytes): split into {count} parts",
            rec.input.container,
            rec.input.name,
            facts.lines,
            rec.input.size,
            self.config.split_limits.max_lines,
            self.config.split_limits.max_bytes,
        ));
        let started = self.advance_parts(rec, etag, j).await?;
        Ok(Intake::Split {
            parts: count,
            started,
        })
    }

    /// Copies each span of the input to its staged blob, streaming: memory holds one chunk
    /// and one block.
    async fn stage_parts(
        &self,
        rec: &JobRecord,
        spans: &[PartSpan],
    ) -> Result<Vec<PartRef>, StorageError> {
        let state = &self.config.state_container;
        let input = &rec.input;
        let (_, mut body) = self
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
                let blob = format!("{}part-{index:04}.jsonl", staging_prefix(&rec.key));
                let w = writer
                    .get_or_insert_with(|| self.store.writer(state, &blob, "application/jsonl"));
                w.write(&data[..take]).await?;
                data = &data[take..];
                at += take as u64;
                if at == end {
                    let etag = writer.take().expect("written above").finish().await?;
                    parts.push(PartRef {
                        index,
                        key: format!("{}/part-{index:04}", rec.key),
                        blob,
                        etag,
                        first_line: span.first_line,
                        requests: span.requests,
                        bytes: span.bytes,
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

    /// Starts the parts not started yet, in input order, until one has to wait for quota;
    /// combines the results once every part has finished. Returns how many parts it started.
    pub(crate) async fn advance_parts(
        &self,
        mut rec: JobRecord,
        etag: String,
        j: &Journal,
    ) -> Result<usize, StepError> {
        let mut unfinished = 0;
        let mut started = 0;
        for part in rec.parts.clone() {
            if let Some((child, _)) = self.jobs.load_active(&part.key).await? {
                unfinished += 1;
                if child.state == JobState::Queued {
                    // Later parts would only be refused for the same quota.
                    return Ok(started);
                }
                continue;
            }
            if self.jobs.load_done(&part.key).await?.is_some() {
                continue;
            }
            unfinished += 1;
            match self.start_part(&rec, &part, j).await? {
                Intake::Queued => return Ok(started),
                Intake::Submitted { .. } => started += 1,
                _ => {}
            }
        }
        if unfinished == 0 {
            rec.parts_finished().expect("split");
            if let Some(etag) = self.jobs.update(&rec, &etag).await? {
                self.combine_parts(rec, etag, j).await?;
            }
        }
        Ok(started)
    }

    async fn start_part(
        &self,
        parent: &JobRecord,
        part: &PartRef,
        j: &Journal,
    ) -> Result<Intake, StepError> {
        let state = &self.config.state_container;
        let input = InputRef {
            container: state.clone(),
            name: part.blob.clone(),
            etag: part.etag.clone(),
            size: part.bytes,
            url: self.store.blob_url(state, &part.blob),
        };
        let rec = JobRecord::claim_part(
            parent,
            part,
            input,
            &self.instance,
            self.config.submit_lease.as_secs(),
        );
        let Claim::Claimed { etag } = self.jobs.claim(&rec).await? else {
            return Ok(Intake::InProgressElsewhere);
        };
        // Finished between our look and the claim: do not run it twice.
        if let Some(done) = self.jobs.load_done(&rec.key).await? {
            self.jobs.abandon(&rec.key, &etag).await?;
            return Ok(Intake::AlreadyKnown {
                state: done.state,
                batch_id: done.batch_id,
            });
        }
        j.info(format!(
            "job={}: part {}/{} (input lines {}–{}, {} requests): submitting",
            parent.key,
            part.index,
            parent.parts.len(),
            part.first_line,
            part.last_line(),
            part.requests
        ));
        // Boxed: intake reaches here through `run_claimed` itself (claim, validate, split).
        Box::pin(self.run_claimed(rec, etag, j)).await
    }

    /// Puts the parts' files together in the input's output folder, then the summary, then
    /// removes the staging folder. Each step is recorded, so a crash resumes after the last.
    pub(crate) async fn combine_parts(
        &self,
        mut rec: JobRecord,
        mut etag: String,
        j: &Journal,
    ) -> Result<(), StepError> {
        let key = rec.key.clone();
        let out = self.config.output_container.clone();
        let path = self.results_folder(&mut rec, j).await?;
        let mut progress = rec.harvest.clone().unwrap_or_default();
        if !progress.cleared {
            self.clear_folder(&out, &path).await?;
            progress.cleared = true;
            etag = self.save_progress(&mut rec, &etag, &progress).await?;
        }
        for file in [RESULTS, ERRORS, MERGED] {
            if !*concat_done(&mut progress, file) {
                self.concat_parts(&rec, file, &out, &format!("{path}/{file}"))
                    .await?;
                *concat_done(&mut progress, file) = true;
                etag = self.save_progress(&mut rec, &etag, &progress).await?;
                if file == RESULTS {
                    self.fault_point("split:after-results");
                }
            }
        }

        let outcome = if progress.summary_written {
            self.parts_outcome(&rec).await?
        } else {
            let summary = self.parts_summary(&rec, &out, &path).await?;
            summary::write(&self.store, &out, &path, &summary).await?;
            progress.summary_written = true;
            etag = self.save_progress(&mut rec, &etag, &progress).await?;
            self.fault_point("split:after-summary");
            j.info(format!(
                "job={key}: {} — {} parts, {} of {} requests answered, {} failed, {} without result; results in {out}/{path}/",
                summary.status,
                rec.parts.len(),
                summary.request_counts.completed,
                summary.request_counts.total,
                summary.request_counts.failed,
                summary.lines_without_result
            ));
            parse_outcome(&summary.status)
        };
        self.delete_staging(&key).await?;
        rec.finish(outcome, &format!("{} parts combined", rec.parts.len()))
            .expect("harvesting");
        self.jobs.finish(&rec, &etag).await?;
        Ok(())
    }

    /// Streams one file of every part, in part order, into `target`; no file is written when
    /// no part has one. A part without `merged.jsonl` never ran: its lines are made here.
    async fn concat_parts(
        &self,
        rec: &JobRecord,
        file: &str,
        out: &str,
        target: &str,
    ) -> Result<(), StepError> {
        let state = &self.config.state_container;
        let mut writer = self.store.writer(out, target, "application/jsonl");
        for part in &rec.parts {
            let name = format!("{}/{file}", part_folder(part));
            let mut body = match self.store.download(state, &name, None).await {
                Ok((_, body)) => body,
                Err(StorageError::NotFound { .. }) if file == MERGED => {
                    self.merged_without_results(part, &mut writer).await?;
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
        &self,
        part: &PartRef,
        writer: &mut crate::storage::BlobWriter,
    ) -> Result<(), StepError> {
        let state = &self.config.state_container;
        let Some(mut lines) = self.open_lines(state, &part.blob, None).await? else {
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
        &self,
        rec: &JobRecord,
        out: &str,
        path: &str,
    ) -> Result<Summary, StepError> {
        let state = &self.config.state_container;
        let mut table = Vec::with_capacity(rec.parts.len());
        let mut counts = RequestCounts::default();
        let mut usage = Usage::default();
        let mut errors = Vec::new();
        let mut without_result = 0;
        let mut never_ran = Vec::new();
        for part in &rec.parts {
            let child = self.jobs.load_done(&part.key).await?;
            let part_summary = match self
                .store
                .read(state, &summary::summary_name(&part_folder(part)))
                .await?
            {
                Some((bytes, _)) => serde_json::from_slice::<Summary>(&bytes).ok(),
                None => None,
            };
            let status = part_summary
                .as_ref()
                .map(|s| s.status.clone())
                .or_else(|| {
                    child
                        .as_ref()
                        .and_then(|c| c.outcome)
                        .map(|o| o.as_str().into())
                })
                .unwrap_or_else(|| "unknown".into());
            if let Some(u) = part_summary.as_ref().and_then(|s| s.usage.as_ref()) {
                usage.input_tokens += u.input_tokens;
                usage.output_tokens += u.output_tokens;
                usage.total_tokens += u.total_tokens;
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
            let mut batch_ids: Vec<String> = child
                .as_ref()
                .map(|c| c.rounds.iter().map(|r| r.batch_id.clone()).collect())
                .unwrap_or_default();
            batch_ids.extend(child.as_ref().and_then(|c| c.batch_id.clone()));
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

        let outcome = combined_outcome(table.iter().map(|p| parse_outcome(&p.status)));
        let mut summary = Summary::for_job(rec, outcome);
        summary.batch_id = table.iter().find_map(|p| p.batch_id.clone());
        summary.request_counts = counts;
        summary.usage = Some(usage);
        summary.errors = errors;
        summary.lines_without_result = without_result;
        let exists = |f: &'static str| {
            let name = format!("{path}/{f}");
            async move {
                self.store
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
            .filter(|p| p.status != Outcome::Completed.as_str())
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
        if path != rec.input.output_path() {
            summary.notes.push(format!(
                "the input was replaced by a newer version while these batches ran; the newer \
                 version's results are in {}/",
                rec.input.output_path()
            ));
        }
        summary.parts = table;
        Ok(summary)
    }

    /// The outcome of a split job whose summary is already written (a resumed combine).
    async fn parts_outcome(&self, rec: &JobRecord) -> Result<Outcome, StepError> {
        let mut outcomes = Vec::with_capacity(rec.parts.len());
        for part in &rec.parts {
            let child = self.jobs.load_done(&part.key).await?;
            outcomes.push(child.and_then(|c| c.outcome).unwrap_or(Outcome::Failed));
        }
        Ok(combined_outcome(outcomes.into_iter()))
    }

    /// Removes everything staged for a job: its parts, their results, their follow-ups.
    pub(crate) async fn delete_staging(&self, key: &str) -> Result<(), StepError> {
        let state = &self.config.state_container;
        let names: Vec<_> = self
            .store
            .list(state, &staging_prefix(key))
            .map_ok(|b| b.name)
            .try_collect()
            .await?;
        for name in names {
            self.store.delete(state, &name, None).await?;
        }
        Ok(())
    }
}

/// The progress flag of concatenating `file`.
fn concat_done<'a>(p: &'a mut HarvestProgress, file: &str) -> &'a mut bool {
    match file {
        RESULTS => &mut p.results_moved,
        ERRORS => &mut p.errors_moved,
        _ => &mut p.merged_moved,
    }
}

/// A part's folder in the state container: its staged input's name without `.jsonl`, as
/// for any job's output path.
fn part_folder(part: &PartRef) -> String {
    part.blob
        .strip_suffix(".jsonl")
        .unwrap_or(&part.blob)
        .to_string()
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

fn parse_outcome(status: &str) -> Outcome {
    match status {
        "completed" => Outcome::Completed,
        "expired" => Outcome::Expired,
        "cancelled" => Outcome::Cancelled,
        _ => Outcome::Failed,
    }
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
