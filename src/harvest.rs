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

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    app::{App, Journal},
    jobs::{JobRecord, Outcome},
    openai::{Batch, BatchStatus, RequestCounts},
    storage::StorageError,
    submit::StepError,
    summary::{self, Summary},
};

/// Which harvest steps are done, kept in the job record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HarvestProgress {
    /// Files of an earlier version of the same input were removed from the output folder.
    pub cleared: bool,
    pub results_moved: bool,
    pub errors_moved: bool,
    /// A split job's combine: the parts' `merged.jsonl` are in place, and the summary.
    #[serde(default)]
    pub merged_moved: bool,
    #[serde(default)]
    pub summary_written: bool,
}

/// Token usage summed over the result lines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    fn add(&mut self, usage: &Value) {
        let get = |a: &str, b: &str| {
            usage
                .get(a)
                .or_else(|| usage.get(b))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        // Chat completions say prompt/completion; the Responses API says input/output.
        let input = get("prompt_tokens", "input_tokens");
        let output = get("completion_tokens", "output_tokens");
        self.input_tokens += input;
        self.output_tokens += output;
        self.total_tokens += usage
            .get("total_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(input + output);
    }
}

pub const RESULTS: &str = "results.jsonl";
pub const ERRORS: &str = "errors.jsonl";
pub const MERGED: &str = "merged.jsonl";

fn outcome_of(status: &BatchStatus) -> Outcome {
    match status {
        BatchStatus::Completed => Outcome::Completed,
        BatchStatus::Expired => Outcome::Expired,
        BatchStatus::Cancelled => Outcome::Cancelled,
        _ => Outcome::Failed,
    }
}

impl App {
    /// Harvests a job found in `harvesting` (an earlier harvest was interrupted).
    pub(crate) async fn harvest(
        &self,
        rec: JobRecord,
        etag: String,
        j: &Journal,
    ) -> Result<(), StepError> {
        if rec.parts.is_empty() {
            self.harvest_batch(rec, etag, None, j).await
        } else {
            self.combine_parts(rec, etag, j).await
        }
    }

    pub(crate) async fn harvest_batch(
        &self,
        mut rec: JobRecord,
        mut etag: String,
        batch: Option<Batch>,
        j: &Journal,
    ) -> Result<(), StepError> {
        let key = rec.key.clone();
        let batch_id = rec.batch_id.clone().unwrap_or_default();
        let batch = match batch {
            Some(b) => b,
            None => self.openai.retrieve(&batch_id).await?,
        };
        let outcome = outcome_of(&batch.status);
        let out = rec.output_container(&self.config).to_string();
        let path = self.results_folder(&mut rec, j).await?;
        let mut progress = rec.harvest.clone().unwrap_or_default();

        // Results of an earlier version of this input must not mix with this one's.
        if !progress.cleared {
            if rec.round == 0 {
                self.clear_folder(&out, &path).await?;
            }
            progress.cleared = true;
            etag = self.save_progress(&mut rec, &etag, &progress).await?;
            self.fault_point("harvest:after-clear");
        }
        if rec.round == 0 {
            // The first batch's files are moved as they are, server-side.
            if !progress.results_moved {
                self.move_output(batch.output_blob.as_deref(), &out, &path, RESULTS, j, &key)
                    .await?;
                progress.results_moved = true;
                etag = self.save_progress(&mut rec, &etag, &progress).await?;
                self.fault_point("harvest:after-results");
            }
            if !progress.errors_moved {
                self.move_output(batch.error_blob.as_deref(), &out, &path, ERRORS, j, &key)
                    .await?;
                progress.errors_moved = true;
                etag = self.save_progress(&mut rec, &etag, &progress).await?;
                self.fault_point("harvest:after-errors");
            }
        } else {
            // A follow-up's lines are folded into the files already in place.
            let results = self.locate_output(batch.output_blob.as_deref(), j, &key);
            let errors = self.locate_output(batch.error_blob.as_deref(), j, &key);
            if !progress.results_moved {
                self.fold(results.as_ref(), &out, &path, RESULTS, None)
                    .await?;
                progress.results_moved = true;
                etag = self.save_progress(&mut rec, &etag, &progress).await?;
            }
            if !progress.errors_moved {
                self.fold(errors.as_ref(), &out, &path, ERRORS, results.as_ref())
                    .await?;
                for (c, n) in results.iter().chain(errors.iter()) {
                    self.store.delete(c, n, None).await?;
                }
                progress.errors_moved = true;
                etag = self.save_progress(&mut rec, &etag, &progress).await?;
            }
        }

        let follow_up = match outcome {
            Outcome::Expired => self.config.resubmit_expired,
            Outcome::Cancelled => self.config.resubmit_cancelled,
            _ => false,
        } && rec.round < self.config.max_followups;
        let staged =
            follow_up.then(|| format!("staging/{}/followup-{}.jsonl", rec.key, rec.round + 1));
        let merged = self
            .write_merged(&rec, &out, &path, staged.as_deref())
            .await?;
        self.fault_point("harvest:after-merged");

        if let Some(staged) = staged.filter(|_| merged.followup_lines > 0) {
            let url = self.store.blob_url(self.jobs.container(), &staged);
            let lines = merged.followup_lines;
            rec.follow_up(
                url,
                lines,
                &self.instance,
                self.config.submit_lease.as_secs(),
            )
            .map_err(|e| transition_error(&key, e))?;
            let Some(etag) = self.jobs.update(&rec, &etag).await? else {
                return Ok(());
            };
            j.info(format!(
                "job={key} batch={}: {} with {lines} request(s) unanswered; resubmitting them (round {})",
                batch.id,
                batch.status,
                rec.round
            ));
            self.run_claimed(rec, etag, j).await?;
            return Ok(());
        }

        let mut summary = Summary::for_job(&rec, outcome);
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
        summary.rounds = rec.rounds.clone();
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
        if path != rec.input.output_path() {
            summary.notes.push(format!(
                "the input was replaced by a newer version while this batch ran; the newer \
                 version's results are in {}/",
                rec.input.output_path()
            ));
        }
        rec.finish(outcome, &format!("batch {} {}", batch.id, batch.status))
            .map_err(|e| transition_error(&key, e))?;
        summary.history = rec.history.clone();
        summary::write(&self.store, &out, &path, &summary).await?;
        self.fault_point("harvest:after-summary");
        // Staged follow-up inputs served their purpose; the job's record says what they were.
        for round in 1..=rec.round {
            let staged = format!("staging/{}/followup-{round}.jsonl", rec.key);
            self.store
                .delete(self.jobs.container(), &staged, None)
                .await?;
        }
        self.jobs.finish(&rec, &etag).await?;
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

    /// The folder a job's results go to: `{path}`, unless the input has been replaced by a
    /// newer version since. That version is its own job and owns `{path}/`; were both
    /// harvested at once, their files would mix. The older one's go to
    /// `{path}/superseded/{etag}/`, so nothing is lost and nothing overwrites the newer.
    /// Chosen once, at the job's first harvest step, and kept in the record (saved with the
    /// progress that follows).
    pub(crate) async fn results_folder(
        &self,
        rec: &mut JobRecord,
        j: &Journal,
    ) -> Result<String, StepError> {
        if let Some(folder) = &rec.results_folder {
            return Ok(folder.clone());
        }
        let path = rec.input.output_path();
        if rec.part_of.is_some() {
            return Ok(path.to_string());
        }
        let current = self
            .store
            .properties(&rec.input.container, &rec.input.name)
            .await?;
        match current {
            Some(now) if now.etag != rec.input.etag => {
                let folder = format!("{path}/superseded/{}", rec.input.etag.trim_matches('"'));
                j.warn(format!(
                    "job={}: blob={}/{} was replaced by a newer version while this job ran; \
                     its results go to {}/{folder}/",
                    rec.key, rec.input.container, rec.input.name, self.config.output_container
                ));
                rec.results_folder = Some(folder.clone());
                Ok(folder)
            }
            _ => {
                rec.results_folder = Some(path.to_string());
                Ok(path.to_string())
            }
        }
    }

    /// Removes the files an earlier version of the same input left in `folder`, so they do
    /// not mix with this job's.
    pub(crate) async fn clear_folder(
        &self,
        container: &str,
        folder: &str,
    ) -> Result<(), StepError> {
        for f in [RESULTS, ERRORS, MERGED] {
            self.store
                .delete(container, &format!("{folder}/{f}"), None)
                .await?;
        }
        Ok(())
    }

    pub(crate) async fn save_progress(
        &self,
        rec: &mut JobRecord,
        etag: &str,
        progress: &HarvestProgress,
    ) -> Result<String, StepError> {
        rec.harvest = Some(progress.clone());
        match self.jobs.update(rec, etag).await? {
            Some(e) => Ok(e),
            None => Err(StorageError::ConditionNotMet {
                container: self.jobs.container().to_string(),
                name: rec.key.clone(),
            }
            .into()),
        }
    }

    /// Moves one service output file into the job's folder: server-side copy, then delete.
    /// A missing source (the service names both files even when it wrote one) is no error.
    async fn move_output(
        &self,
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
        let Some((container, name)) = self.store.locate(url) else {
            j.error(format!(
                "job={key}: the service wrote {file} outside the configured storage account; left where it is"
            ));
            return Ok(());
        };
        let Some(info) = self.store.properties(&container, &name).await? else {
            return Ok(());
        };
        if info.size > 0 {
            self.store
                .copy(&container, &name, out, &format!("{path}/{file}"))
                .await?;
            self.fault_point("harvest:after-copy");
        }
        self.store.delete(&container, &name, None).await?;
        Ok(())
    }

    /// Where the service put an output file, when it is in this account.
    fn locate_output(&self, url: Option<&str>, j: &Journal, key: &str) -> Option<(String, String)> {
        let url = url.filter(|u| !u.is_empty())?;
        let located = self.store.locate(url);
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
        &self,
        source: Option<&(String, String)>,
        out: &str,
        path: &str,
        file: &str,
        answered_in: Option<&(String, String)>,
    ) -> Result<(), StepError> {
        let target = format!("{path}/{file}");
        let mut drop: HashSet<String> = HashSet::new();
        for (c, n) in answered_in.into_iter().chain(source) {
            if let Some(mut lines) = self.open_lines(c, n, None).await? {
                while let Some(line) = lines.next().await? {
                    drop.extend(custom_id_of(&line));
                }
            }
        }
        if source.is_none() && drop.is_empty() {
            return Ok(());
        }
        let mut writer = self.store.writer(out, &target, "application/jsonl");
        let mut kept: HashSet<String> = HashSet::new();
        // The old file: kept unless a newer line replaces it (errors) or repeats it (results).
        if let Some(mut lines) = self.open_lines(out, &target, None).await? {
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
            Some((c, n)) => self.open_lines(c, n, None).await?,
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
            self.store.delete(out, &target, None).await?;
        }
        Ok(())
    }

    /// The lines of a blob, streamed; `None` when it does not exist.
    pub(crate) async fn open_lines(
        &self,
        container: &str,
        name: &str,
        if_match: Option<&str>,
    ) -> Result<
        Option<Lines<impl Stream<Item = Result<Bytes, StorageError>> + Unpin + use<>>>,
        StorageError,
    > {
        match self.store.download(container, name, if_match).await {
            Ok((_, body)) => Ok(Some(Lines::new(body))),
            Err(StorageError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
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
        &self,
        rec: &JobRecord,
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
            let Some(mut lines) = self
                .open_lines(out, &format!("{path}/{file}"), None)
                .await?
            else {
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
        let mut input = match self
            .open_lines(&rec.input.container, &rec.input.name, Some(&rec.input.etag))
            .await
        {
            Ok(Some(lines)) => lines,
            Ok(None) | Err(StorageError::ConditionNotMet { .. }) => return Ok(stats),
            Err(e) => return Err(e.into()),
        };
        let mut writer = self
            .store
            .writer(out, &format!("{path}/{MERGED}"), "application/jsonl");
        let mut followup = staged.map(|name| {
            self.store
                .writer(self.jobs.container(), name, "application/jsonl")
        });
        // A part's lines are numbered as in the input it was cut from.
        let mut line_no = rec.part_of.as_ref().map_or(0, |p| p.line_offset);
        let mut merged = 0u64;
        let mut buf = Vec::new();
        while let Some(line) = input.next().await? {
            line_no += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let custom_id = serde_json::from_slice::<IdOnly>(&line)
                .ok()
                .and_then(|l| l.custom_id)
                .unwrap_or_default();
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

pub(crate) fn custom_id_of(line: &[u8]) -> Option<String> {
    serde_json::from_slice::<IdOnly>(line).ok()?.custom_id
}

fn transition_error(key: &str, e: crate::jobs::InvalidTransition) -> StepError {
    StorageError::Failed {
        op: "job transition",
        target: key.to_string(),
        message: e.to_string(),
    }
    .into()
}

#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    custom_id: Option<String>,
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

/// One line of `merged.jsonl`: the input line number and id, then the answer or the error.
pub(crate) fn merged_line(line: u64, custom_id: &str, result: Option<Value>) -> Value {
    let Some(result) = result else {
        return json!({
            "line": line,
            "custom_id": custom_id,
            "status_code": null,
            "response": null,
            "error": {
                "code": "no_result",
                "message": "the batch ended without a result for this request"
            }
        });
    };
    let status = result
        .pointer("/response/status_code")
        .cloned()
        .unwrap_or(Value::Null);
    let body = result
        .pointer("/response/body")
        .cloned()
        .unwrap_or(Value::Null);
    let ok = status.as_u64().is_some_and(|s| (200..300).contains(&s));
    let error = match result.get("error") {
        Some(e) if !e.is_null() => e.clone(),
        _ if !ok => body.get("error").cloned().unwrap_or_else(
            || json!({"code": "request_failed", "message": format!("status {status}")}),
        ),
        _ => Value::Null,
    };
    json!({
        "line": line,
        "custom_id": custom_id,
        "status_code": status,
        "response": if ok { body } else { Value::Null },
        "error": error,
    })
}

/// Splits a byte stream into lines across chunk boundaries.
#[derive(Default)]
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, chunk: &Bytes) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        let mut rest: &[u8] = chunk;
        while let Some(pos) = memchr::memchr(b'\n', rest) {
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[..pos]);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(line);
            rest = &rest[pos + 1..];
        }
        self.partial.extend_from_slice(rest);
        lines
    }

    fn finish(&mut self) -> Option<Vec<u8>> {
        let line = std::mem::take(&mut self.partial);
        (!line.is_empty()).then_some(line)
    }
}

/// The lines of a streamed blob, one at a time; memory holds one chunk's worth.
pub(crate) struct Lines<S> {
    body: S,
    splitter: LineSplitter,
    ready: std::collections::VecDeque<Vec<u8>>,
    done: bool,
}

impl<S: Stream<Item = Result<Bytes, StorageError>> + Unpin> Lines<S> {
    fn new(body: S) -> Self {
        Lines {
            body,
            splitter: LineSplitter::default(),
            ready: Default::default(),
            done: false,
        }
    }

    pub(crate) async fn next(&mut self) -> Result<Option<Vec<u8>>, StorageError> {
        loop {
            if let Some(line) = self.ready.pop_front() {
                return Ok(Some(line));
            }
            if self.done {
                return Ok(None);
            }
            match self.body.next().await {
                Some(chunk) => self.ready.extend(self.splitter.push(&chunk?)),
                None => {
                    self.done = true;
                    self.ready.extend(self.splitter.finish());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks() {
        let mut s = LineSplitter::default();
        let mut all = s.push(&Bytes::from_static(b"ab\ncd"));
        all.extend(s.push(&Bytes::from_static(b"e\r\n\nf")));
        all.extend(s.finish());
        assert_eq!(
            all,
            vec![b"ab".to_vec(), b"cde".to_vec(), b"".to_vec(), b"f".to_vec()]
        );
    }

    #[test]
    fn merged_lines_carry_answer_or_error() {
        let ok = json!({"custom_id": "a", "response": {"status_code": 200, "body": {"x": 1}}, "error": null});
        let m = merged_line(1, "a", Some(ok));
        assert_eq!(m["status_code"], 200);
        assert_eq!(m["response"]["x"], 1);
        assert!(m["error"].is_null());

        let bad = json!({"custom_id": "b", "response": {"status_code": 400, "body": {"error": {"code": "content_filter"}}}, "error": null});
        let m = merged_line(2, "b", Some(bad));
        assert_eq!(m["error"]["code"], "content_filter");
        assert!(m["response"].is_null());

        let m = merged_line(3, "c", None);
        assert_eq!(m["error"]["code"], "no_result");
    }

    #[test]
    fn usage_sums_both_api_styles() {
        let mut u = Usage::default();
        u.add(&json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}));
        u.add(&json!({"input_tokens": 1, "output_tokens": 2}));
        assert_eq!(
            u,
            Usage {
                input_tokens: 4,
                output_tokens: 6,
                total_tokens: 10
            }
        );
    }
}
