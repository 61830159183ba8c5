//! A job's results folder, shared by the two workflows that fill one (`harvest` for a batch,
//! `split` for a split input's parts): the file names, reading blobs line by line, the line
//! format of `merged.jsonl`, and the recorded steps of moving files in.

use std::collections::VecDeque;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    app::{App, Journal, StepError},
    jobs::{Job, MovesResults},
    storage::StorageError,
};

pub const RESULTS: &str = "results.jsonl";
pub const ERRORS: &str = "errors.jsonl";
pub const MERGED: &str = "merged.jsonl";

/// The folder a job's results go to: `{path}`, unless the input has been replaced by a
/// newer version since. That version is its own job and owns `{path}/`; were both
/// harvested at once, their files would mix. The older one's go to
/// `{path}/superseded/{etag}/`, so nothing is lost and nothing overwrites the newer.
/// Chosen once, at the job's first harvest step, and kept in the record (saved with the
/// progress that follows).
pub async fn results_folder<S: MovesResults>(
    app: &App,
    job: &mut Job<S>,
    j: &Journal,
) -> Result<String, StepError> {
    if let Some(folder) = job.results_folder() {
        return Ok(folder.to_string());
    }
    let input = job.input().clone();
    let path = input.output_path();
    let folder = if job.part_of().is_some() {
        path.to_string()
    } else {
        match app.store.properties(&input.container, &input.name).await? {
            Some(now) if now.etag != input.etag => {
                let folder = format!("{path}/superseded/{}", input.etag.trim_matches('"'));
                j.warn(format!(
                    "job={}: blob={}/{} was replaced by a newer version while this job ran; \
                     its results go to {}/{folder}/",
                    job.key(),
                    input.container,
                    input.name,
                    app.config.output_container
                ));
                folder
            }
            _ => path.to_string(),
        }
    };
    job.choose_results_folder(folder.clone());
    Ok(folder)
}

/// Removes the files an earlier version of the same input left in `folder`, so they do not
/// mix with this job's.
pub async fn clear_folder(app: &App, container: &str, folder: &str) -> Result<(), StepError> {
    for f in [RESULTS, ERRORS, MERGED] {
        app.store
            .delete(container, &format!("{folder}/{f}"), None)
            .await?;
    }
    Ok(())
}

/// Takes `job`, read from its record, to move its results into place: `Some(etag)` when
/// this invocation now holds it; `None` when another holds it (it goes on) or changed the
/// record since it was read (whoever changed it goes on). Nothing in the folder may be
/// touched before this wins. (Whoever records a batch's end holds the job in that same
/// write, and needs no second one.)
pub async fn take_hold<S: MovesResults>(
    app: &App,
    job: &mut Job<S>,
    etag: &str,
    j: &Journal,
) -> Result<Option<String>, StepError> {
    let now = app.now();
    if let Some(holder) = job.held_by(now) {
        j.info(format!(
            "job={}: its results are being moved by {holder}; left to it",
            job.key()
        ));
        return Ok(None);
    }
    job.hold(&app.instance, app.config.submit_lease.as_secs(), now);
    let taken = app.jobs.update(job, etag).await?;
    if taken.is_none() {
        j.info(format!(
            "job={}: another invocation moved it on first; left to it",
            job.key()
        ));
    }
    Ok(taken)
}

/// In a debug build under test, waits as long as `BATCH_TEST_HARVEST_DELAY_MS` says, between
/// taking the job and touching its folder: the moment a second harvester must keep out.
pub async fn test_delay(app: &App, key: &str) {
    if let Some(delay) = app.config.test_harvest_delay {
        tracing::warn!(
            "job={key}: test-only delay of {} ms before moving results ({})",
            delay.as_millis(),
            crate::config::names::TEST_HARVEST_DELAY_MS
        );
        tokio::time::sleep(delay).await;
    }
}

/// Writes the record with the steps done so far, renewing the holder's lease; a lost race
/// stops the step (whoever changed the record goes on from it).
pub async fn save_progress<S: MovesResults>(
    app: &App,
    job: &mut Job<S>,
    etag: &str,
) -> Result<String, StepError> {
    job.renew(app.config.submit_lease.as_secs(), app.now());
    match app.jobs.update(job, etag).await? {
        Some(e) => Ok(e),
        None => Err(StorageError::ConditionNotMet {
            container: app.jobs.container().to_string(),
            name: job.key().to_string(),
        }
        .into()),
    }
}

/// The lines of a blob, streamed; `None` when it does not exist.
pub async fn open_lines(
    app: &App,
    container: &str,
    name: &str,
    if_match: Option<&str>,
) -> Result<
    Option<Lines<impl Stream<Item = Result<Bytes, StorageError>> + Unpin + use<>>>,
    StorageError,
> {
    match app.store.download(container, name, if_match).await {
        Ok((_, body)) => Ok(Some(Lines::new(body))),
        Err(StorageError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    custom_id: Option<String>,
}

pub fn custom_id_of(line: &[u8]) -> Option<String> {
    serde_json::from_slice::<IdOnly>(line).ok()?.custom_id
}

/// One line of `merged.jsonl`: the input line number and id, then the answer or the error.
pub fn merged_line(line: u64, custom_id: &str, result: Option<Value>) -> Value {
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
pub struct Lines<S> {
    body: S,
    splitter: LineSplitter,
    ready: VecDeque<Vec<u8>>,
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

    /// The next lines, about `bytes` of them (at least one, fewer at the end); none at the
    /// end.
    pub async fn next_batch(&mut self, bytes: usize) -> Result<Vec<Vec<u8>>, StorageError> {
        let (mut batch, mut size) = (Vec::new(), 0);
        while size < bytes
            && let Some(line) = self.next().await?
        {
            size += line.len() + 1;
            batch.push(line);
        }
        Ok(batch)
    }

    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, StorageError> {
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
}
