//! Harvest: a batch that ended has its results moved into `batch-output/{path}/`, a merged,
//! input-ordered `merged.jsonl` written beside them, and `summary.json` last.
//!
//! Every step can be interrupted and run again on a later tick without losing or doubling a
//! file: progress is kept in the job record (written with `If-Match`), moves are server-side
//! copy then delete, and the record is finished only after the summary is written.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    io::{self, BufWriter, Write},
    os::unix::fs::FileExt,
    panic::AssertUnwindSafe,
};

use serde::{Deserialize, Deserializer};
use serde_json::{Value, value::RawValue};
use tokio::sync::oneshot;

use crate::{
    app::{App, Journal, StepError},
    cancel,
    jobs::{Harvesting, Job, Outcome, followup_blob},
    lease,
    openai::{Batch, BatchStatus, RequestCounts},
    outputs::{
        self, ERRORS, MERGED, RESULTS, clear_folder, custom_id_of, merged_line, open_lines,
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
/// requests unanswered and follow-ups are enabled, submits them as the next round. The
/// caller holds the job (`outputs::take_hold`, or the write that recorded the batch's end).
/// `batch` is the service's answer when the caller has it (a poll); otherwise it is fetched.
pub async fn harvest_batch(
    app: &App,
    mut job: Job<Harvesting>,
    mut etag: String,
    batch: Option<Batch>,
    j: &Journal,
) -> Result<(), StepError> {
    let key = job.key().to_string();
    outputs::test_delay(app, &key).await;
    let batch = match batch {
        Some(b) => b,
        None => {
            app.openai_at(job.openai_endpoint())
                .retrieve(&job.batch().id)
                .await?
        }
    };
    // The batch has ended: the service no longer counts its tokens, so neither do we. Freed
    // first, before the moves, so that the tick's admission pass (same invocation) can use it.
    submit::free_room(app, &job, j).await;
    let cancel_requested = job.cancel_request().is_some();
    let outcome = cancel::outcome_after_cancel(cancel_requested, outcome_of(&batch.status));
    let out = job.output_container(&app.config).to_string();
    let path = results_folder(app, &mut job, j).await?;
    let first_round = job.round() == 0;

    // Results of an earlier version of this input must not mix with this one's.
    if !job.progress().cleared {
        // This invocation may have paused past its hold (a slow call, a stalled instance)
        // while another took the job over and filed its results: the record's If-Match
        // write, which also renews the hold, tells before anything in the folder is deleted.
        etag = save_progress(app, &mut job, &etag).await?;
        if first_round {
            clear_folder(app, &out, &path).await?;
        }
        job.progress_mut().cleared = true;
        etag = save_progress(app, &mut job, &etag).await?;
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
            etag = save_progress(app, &mut job, &etag).await?;
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
            etag = save_progress(app, &mut job, &etag).await?;
            app.fault_point("harvest:after-errors");
        }
    } else {
        // A follow-up's lines are folded into the files already in place.
        let results = locate_output(app, batch.output_blob.as_deref(), j, &key);
        let errors = locate_output(app, batch.error_blob.as_deref(), j, &key);
        if !job.progress().results_moved {
            fold(app, results.as_ref(), &out, &path, RESULTS, None).await?;
            job.progress_mut().results_moved = true;
            etag = save_progress(app, &mut job, &etag).await?;
        }
        if !job.progress().errors_moved {
            fold(app, errors.as_ref(), &out, &path, ERRORS, results.as_ref()).await?;
            for (c, n) in results.iter().chain(errors.iter()) {
                app.store.delete(c, n, None).await?;
            }
            job.progress_mut().errors_moved = true;
            etag = save_progress(app, &mut job, &etag).await?;
        }
    }

    let follow_up = match outcome {
        Outcome::Expired => app.config.resubmit_expired,
        Outcome::Cancelled => app.config.resubmit_cancelled,
        _ => false,
    } && job.round() < app.config.max_followups
        // What was cancelled on request is not sent again.
        && !cancel_requested;
    let staged = follow_up.then(|| followup_blob(&key, job.round() + 1));
    // The longest step (every result line read once): the lease is renewed while it runs.
    let reading = job.clone();
    let merging = Box::pin(write_merged(app, &reading, &out, &path, staged.as_deref()));
    let Some(merged) = lease::holding(app, &mut job, &mut etag, merging, j).await? else {
        return Ok(());
    };
    let merged = merged?;
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
        // Boxed: with admission in it, the submit step made this future deep enough
        // to overflow a worker thread's stack in debug builds.
        Box::pin(submit::run_claimed(app, job, etag, j)).await?;
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
    match (job.cancel_request(), outcome) {
        (Some(c), Outcome::Completed) => summary.notes.push(format!(
            "a cancel was asked for ({}) but the batch had already completed: its results \
             are whole",
            c.by.as_str()
        )),
        (Some(c), _) => summary.notes.push(format!(
            "cancelled ({}): what the service answered before it stopped is kept; the other \
             requests are in merged.jsonl with error no_result",
            c.by.as_str()
        )),
        (None, _) => {}
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
    let input = job.input();
    let fields = summary.log_fields(
        &format!("{}/{}", input.container, input.name),
        job.part_of(),
        job.created_at(),
    );
    j.info(format!(
        "job={key} batch={} {fields}: {} — {} answered, {} failed, {} without result; results in {out}/{path}/",
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
/// The service writes results in its own order, so each result line is first read once into
/// what its merged line needs (the answer or the error, as the service's JSON text) and that
/// record spooled to a local temporary file, with an index `custom_id → (offset, length)`;
/// then the input is streamed in order and each line's record read back from the spool.
/// Memory holds the index and a batch of lines at a time, whatever the sizes. The parsing and
/// the spool's file I/O run on one blocking thread, a batch at a time, while the next batch is
/// downloaded (or the last one's merged lines uploaded).
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
    let lane = Lane::new();
    let mut spool = Offload::new(
        Spool {
            file: BufWriter::with_capacity(SPOOL_BUFFER, tempfile::tempfile().map_err(io_error)?),
            len: 0,
            index: Index::new(),
            usage: Usage::default(),
        },
        &lane,
    );
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
        loop {
            let batch = lines.next_batch(BATCH_BYTES).await?;
            if batch.is_empty() {
                break;
            }
            count += batch.len() as u64;
            let is_result = file == RESULTS;
            spool.ready().await?;
            spool.start(move |s| s.add(&batch, is_result));
        }
        *counter = Some(count);
    }
    spool.ready().await?;
    spool.start(|s| s.file.flush());
    let Spool {
        file, index, usage, ..
    } = spool.into_inner().await?;
    stats.usage = usage;
    // Flushed above: taking the file out writes nothing.
    let file = file.into_inner().map_err(|e| io_error(e.into_error()))?;

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
    let no_result =
        serde_json::to_vec(&merged_line(0, "", None)["error"]).expect("values serialize");
    let mut merge = Offload::new(
        Merge {
            spool: file,
            index,
            no_result,
            // A part's lines are numbered as in the input it was cut from.
            line_no: job.part_of().map_or(0, |p| p.line_offset),
            staged: followup.is_some(),
            merged: Vec::new(),
            followup: Vec::new(),
            record: Vec::new(),
            counts: MergeCounts::default(),
        },
        &lane,
    );
    // The batch before the one in work: its lines are uploaded meanwhile.
    let (mut merged, mut unanswered) = (Vec::new(), Vec::new());
    loop {
        let batch = input.next_batch(BATCH_BYTES).await?;
        let m = merge.ready().await?;
        std::mem::swap(&mut m.merged, &mut merged);
        std::mem::swap(&mut m.followup, &mut unanswered);
        let last = batch.is_empty();
        if !last {
            merge.start(move |m| m.add(&batch));
        }
        writer.write(&merged).await?;
        merged.clear();
        if let Some(f) = followup.as_mut() {
            f.write(&unanswered).await?;
        }
        unanswered.clear();
        if last {
            break;
        }
    }
    let counts = merge.into_inner().await?.counts;
    writer.finish().await?;
    if let Some(f) = followup.filter(|f| f.bytes_written() > 0) {
        f.finish().await?;
    }
    stats.answered = counts.answered;
    stats.without_result = counts.without_result;
    stats.followup_lines = counts.followup_lines;
    stats.merged_lines = Some(counts.merged);
    Ok(stats)
}

/// About how many bytes of lines are handed to a blocking thread at a time.
const BATCH_BYTES: usize = 64 * 1024;
const SPOOL_BUFFER: usize = 64 * 1024;

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

fn io_error(e: io::Error) -> StepError {
    StorageError::Failed {
        op: "spool",
        target: "local temporary file".into(),
        message: e.to_string(),
    }
    .into()
}

/// One blocking thread that runs the work sent to it, in order, until the lane is dropped.
/// One thread, not one of the blocking pool's per step: each thread that allocates gets its
/// own malloc arena, and a dozen of them (the pool starts a new thread whenever the last is
/// not yet idle) peaked ~5 MB higher in the bench's harvest (44 MB against 39 MB).
struct Lane(std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>);

impl Lane {
    fn new() -> Self {
        let (lane, work) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        tokio::task::spawn_blocking(move || work.into_iter().for_each(|w| w()));
        Lane(lane)
    }
}

/// A step's state back, with its outcome, or the panic it ended in.
type Done<T> = std::thread::Result<(T, io::Result<()>)>;

/// State that is worked on in a lane, one step at a time: `ready` waits for the step in work
/// and lends the state, `start` hands it to a new step. Between the two, the caller's task is
/// free to download or upload.
struct Offload<T> {
    lane: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
    idle: Option<T>,
    busy: Option<oneshot::Receiver<Done<T>>>,
}

impl<T: Send + 'static> Offload<T> {
    fn new(state: T, lane: &Lane) -> Self {
        Offload {
            lane: lane.0.clone(),
            idle: Some(state),
            busy: None,
        }
    }

    async fn ready(&mut self) -> Result<&mut T, StepError> {
        if let Some(busy) = self.busy.take() {
            let (state, done) = match busy.await {
                Ok(Ok(done)) => done,
                Ok(Err(panic)) => std::panic::resume_unwind(panic),
                Err(_) => return Err(io_error(io::Error::other("the spool's thread is gone"))),
            };
            self.idle = Some(state);
            done.map_err(io_error)?;
        }
        Ok(self.idle.as_mut().expect("a state is idle once ready"))
    }

    /// Hands the state to `step` in the lane; only after `ready`.
    fn start(&mut self, step: impl FnOnce(&mut T) -> io::Result<()> + Send + 'static) {
        let mut state = self.idle.take().expect("start follows ready");
        let (back, busy) = oneshot::channel();
        let work = move || {
            let done = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let outcome = step(&mut state);
                (state, outcome)
            }));
            // The caller may have gone (its tick was cut short); then the state just drops.
            let _ = back.send(done);
        };
        // A lane whose thread is gone drops the work, and `ready` says so.
        let _ = self.lane.send(Box::new(work));
        self.busy = Some(busy);
    }

    async fn into_inner(mut self) -> Result<T, StepError> {
        self.ready().await?;
        Ok(self.idle.take().expect("ready"))
    }
}

/// Where each id's record is in the spool: offset and length. The one thing that grows with
/// the batch (a boxed key: 8 bytes a line less than a `String`).
type Index = HashMap<Box<str>, (u64, u32)>;

/// The spool being written: records appended through a buffer, their offsets counted here.
struct Spool {
    file: BufWriter<File>,
    len: u64,
    index: Index,
    usage: Usage,
}

impl Spool {
    fn add(&mut self, lines: &[Vec<u8>], is_result: bool) -> io::Result<()> {
        let mut record = Vec::new();
        for line in lines {
            record.clear();
            let usage = is_result.then_some(&mut self.usage);
            let Some(id) = result_record(line, usage, &mut record) else {
                continue;
            };
            self.file.write_all(&record)?;
            // A later line for the same id wins: a result over an error.
            self.index
                .insert(id.into_boxed_str(), (self.len, record.len() as u32));
            self.len += record.len() as u64;
        }
        Ok(())
    }
}

/// The merge of the input's lines with the spooled records, a batch at a time; `merged` and
/// `followup` take the batch's output lines until the caller uploads them.
struct Merge {
    spool: File,
    index: Index,
    /// The `error` of a line without a result.
    no_result: Vec<u8>,
    line_no: u64,
    staged: bool,
    merged: Vec<u8>,
    followup: Vec<u8>,
    record: Vec<u8>,
    counts: MergeCounts,
}

#[derive(Default)]
struct MergeCounts {
    merged: u64,
    answered: u64,
    without_result: u64,
    followup_lines: u64,
}

impl Merge {
    fn add(&mut self, lines: &[Vec<u8>]) -> io::Result<()> {
        for line in lines {
            self.line_no += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let custom_id = custom_id_of(line).unwrap_or_default();
            let (kind, error, tail) = match self.index.get(custom_id.as_str()) {
                Some(&(offset, len)) => {
                    self.record.resize(len as usize, 0);
                    self.spool.read_exact_at(&mut self.record, offset)?;
                    split_record(&self.record)
                }
                None => (Kind::NeverRan, &self.no_result[..], NO_ANSWER),
            };
            merged_text(&mut self.merged, self.line_no, &custom_id, error, tail);
            self.counts.merged += 1;
            match kind {
                Kind::Answered => self.counts.answered += 1,
                Kind::Failed => {}
                Kind::NeverRan => {
                    self.counts.without_result += 1;
                    if self.staged {
                        self.followup.extend_from_slice(line);
                        self.followup.push(b'\n');
                        self.counts.followup_lines += 1;
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a result says of its request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Answered with a 2xx.
    Answered,
    /// Answered with an error.
    Failed,
    /// Not answered: no result, or only the service's note that it never ran (the batch
    /// expired or was cancelled first). For the user, and for a follow-up, it is still open.
    NeverRan,
}

/// `response` and `status_code` of a line without an answer.
const NO_ANSWER: &[u8] = br#"null,"status_code":null"#;

/// A spooled record: the kind, the length of `error`, the merged line's `error` value, then
/// its `response` and `status_code` values as `{response},"status_code":{status}`.
fn put_record(record: &mut Vec<u8>, kind: Kind, error: &[u8], response: &[u8], status: &[u8]) {
    record.push(kind as u8);
    record.extend_from_slice(&(error.len() as u32).to_le_bytes());
    record.extend_from_slice(error);
    record.extend_from_slice(response);
    record.extend_from_slice(br#","status_code":"#);
    record.extend_from_slice(status);
}

fn split_record(record: &[u8]) -> (Kind, &[u8], &[u8]) {
    let kind = match record[0] {
        k if k == Kind::Answered as u8 => Kind::Answered,
        k if k == Kind::Failed as u8 => Kind::Failed,
        _ => Kind::NeverRan,
    };
    let len = u32::from_le_bytes(record[1..5].try_into().expect("4 bytes")) as usize;
    (kind, &record[5..5 + len], &record[5 + len..])
}

/// One line of `merged.jsonl` from its pieces: the same JSON value as
/// [`merged_line`] gives, with its keys in the same order; the service's values are copied
/// as the service wrote them.
fn merged_text(out: &mut Vec<u8>, line: u64, custom_id: &str, error: &[u8], tail: &[u8]) {
    out.extend_from_slice(br#"{"custom_id":"#);
    serde_json::to_writer(&mut *out, custom_id).expect("a string serializes");
    out.extend_from_slice(br#","error":"#);
    out.extend_from_slice(error);
    out.extend_from_slice(br#","line":"#);
    write!(out, "{line}").expect("a Vec takes it");
    out.extend_from_slice(br#","response":"#);
    out.extend_from_slice(tail);
    out.extend_from_slice(b"}\n");
}

/// Reads a line of `results.jsonl` or `errors.jsonl` once: writes its record to `record`,
/// adds its token usage to `usage` (results only), and returns its `custom_id`. `None` for
/// a line that is not JSON or has no string `custom_id`, which is left out.
///
/// Lines of the usual shape are read into borrowed parts (their values stay the service's
/// text); any other line (a member of an unexpected type, a repeated key, a failed request
/// whose body has no `error`) is read as a `serde_json::Value` and passed to [`merged_line`],
/// so every line merges to the same value either way. (One difference: JSON that a `Value`
/// refuses but a skipped member may hold unread, such as a number beyond `f64` or nesting
/// deeper than 127, no longer drops the line. The service writes no such line.)
fn result_record(line: &[u8], usage: Option<&mut Usage>, record: &mut Vec<u8>) -> Option<String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    // serde_json would refuse such a line as a `Value`, whose strings must be UTF-8; so do we.
    let text = simdutf8::basic::from_utf8(line).ok()?;
    if let Some((id, tokens)) = borrowed_record(text, record) {
        if let (Some(total), Some(tokens)) = (usage, tokens) {
            total.add_totals(&tokens);
        }
        return Some(id);
    }
    record.clear();
    let value = serde_json::from_str::<Value>(text).ok()?;
    let id = value.get("custom_id").and_then(Value::as_str)?.to_string();
    if let Some(total) = usage
        && let Some(u) = value.pointer("/response/body/usage")
    {
        total.add(u);
    }
    let kind = if never_ran(&value) {
        Kind::NeverRan
    } else if value
        .pointer("/response/status_code")
        .and_then(Value::as_u64)
        .is_some_and(|s| (200..300).contains(&s))
    {
        Kind::Answered
    } else {
        Kind::Failed
    };
    let merged = merged_line(0, &id, Some(value));
    let piece = |k: &str| serde_json::to_vec(&merged[k]).expect("values serialize");
    put_record(
        record,
        kind,
        &piece("error"),
        &piece("response"),
        &piece("status_code"),
    );
    Some(id)
}

/// The members of a result line that its merged line needs, borrowed from the line.
#[derive(Deserialize)]
struct ResultParts<'a> {
    custom_id: Option<String>,
    #[serde(borrow)]
    response: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResponseParts<'a> {
    #[serde(borrow)]
    status_code: Option<&'a RawValue>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct BodyParts<'a> {
    #[serde(borrow)]
    usage: Option<&'a RawValue>,
    /// Kept even when `null`: a failed request's merged `error` is then `null`.
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ErrorParts<'a> {
    #[serde(borrow)]
    code: Option<&'a RawValue>,
}

/// The numbers of a `usage` object. Kept even when `null`, as [`Usage::add`] looks no
/// further than a member that is there (`prompt_tokens: null` hides `input_tokens`).
#[derive(Deserialize)]
struct UsageParts<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    prompt_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    input_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    total_tokens: Option<&'a RawValue>,
}

/// A member that is there, `null` included (an `Option` alone reads `null` as absent).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The members of a JSON text that is an object; `None` for any other value, in which a
/// `Value` finds no member either. (A derived struct would also read an array, by position.)
fn members<'a, T: Deserialize<'a>>(text: &'a str) -> serde_json::Result<Option<T>> {
    if text.starts_with('{') {
        serde_json::from_str(text).map(Some)
    } else {
        Ok(None)
    }
}

fn object<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> serde_json::Result<Option<T>> {
    raw.map_or(Ok(None), |raw| members(raw.get()))
}

/// The fast way of [`result_record`]: the line read once into borrowed parts, its record
/// written from the service's JSON text. Returns the `custom_id` and the tokens of
/// `response.body.usage` when there is one; `None` for a line of another shape.
fn borrowed_record(text: &str, record: &mut Vec<u8>) -> Option<(String, Option<Usage>)> {
    let line = members::<ResultParts>(text.trim_ascii_start()).ok()??;
    let id = line.custom_id?;
    let (status, body) = object::<ResponseParts>(line.response)
        .ok()?
        .map_or((None, None), |r| (r.status_code, r.body));
    let body_parts = object::<BodyParts>(body).ok()?;
    let tokens = match body_parts.as_ref().and_then(|b| b.usage) {
        Some(usage) => Some(tokens_of(usage)?),
        None => None,
    };
    let ok = status
        .and_then(|s| s.get().parse::<u64>().ok())
        .is_some_and(|s| (200..300).contains(&s));
    let code = object::<ErrorParts>(line.error).ok()?.and_then(|e| e.code);
    let never_ran = code
        .and_then(|c| serde_json::from_str::<String>(c.get()).ok())
        .is_some_and(|c| c == "batch_expired" || c == "batch_cancelled");
    let error = match line.error {
        Some(error) => error.get(),
        None if ok => "null",
        // Without an `error` in its body either, `merged_line` words one: the slow way.
        None => body_parts.and_then(|b| b.error)?.get(),
    };
    let kind = if never_ran {
        Kind::NeverRan
    } else if ok {
        Kind::Answered
    } else {
        Kind::Failed
    };
    let response = match body {
        Some(body) if ok => body.get(),
        _ => "null",
    };
    let status = status.map_or("null", RawValue::get);
    put_record(
        record,
        kind,
        error.as_bytes(),
        response.as_bytes(),
        status.as_bytes(),
    );
    Some((id, tokens))
}

/// What [`Usage::add`] counts of a `usage` value; `None` for an object of another shape.
fn tokens_of(usage: &RawValue) -> Option<Usage> {
    let Some(u) = object::<UsageParts>(Some(usage)).ok()? else {
        // Not an object: no numbers in it.
        return Some(Usage::default());
    };
    // As `Value::as_u64`: a non-negative integer in range, and nothing else.
    let n = |v: Option<&RawValue>| v.and_then(|v| v.get().parse::<u64>().ok());
    let input = n(u.prompt_tokens.or(u.input_tokens)).unwrap_or(0);
    let output = n(u.completion_tokens.or(u.output_tokens)).unwrap_or(0);
    Some(Usage {
        input_tokens: input,
        output_tokens: output,
        total_tokens: n(u.total_tokens).unwrap_or(input + output),
    })
}

/// A result line that only says the request never ran (the batch expired or was cancelled
/// first).
fn never_ran(result: &Value) -> bool {
    matches!(
        result.pointer("/error/code").and_then(Value::as_str),
        Some("batch_expired" | "batch_cancelled")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Result lines of every shape: the usual ones (read borrowed) and odd ones (read as a
    /// `Value`), some with members out of order, escapes, or spaces, which the merged line
    /// keeps as the service wrote them.
    const LINES: &[&str] = &[
        // 2xx, chat completions usage; members unsorted, escapes, a float, spaces.
        r#"{"id":"r1","custom_id":"a","response":{"status_code":200,"request_id":"q","body":{"usage":{"total_tokens":30,"prompt_tokens":10,"completion_tokens":20},"choices":[{"message":{"content":"caf\u00e9 \"x\" \/ é","role":"assistant"}}],"temperature":0.5e1}},"error":null}"#,
        r#" { "custom_id" : "b" , "response" : { "status_code" : 201 , "body" : { "z" : [ 1 , 2 ] , "a" : { } } } } "#,
        // The Responses API's names; no total.
        r#"{"custom_id":"c","response":{"status_code":200,"body":{"usage":{"input_tokens":3,"output_tokens":4}}}}"#,
        // A present null hides the other name; numbers that are not u64 count 0.
        r#"{"custom_id":"d","response":{"status_code":200,"body":{"usage":{"prompt_tokens":null,"input_tokens":5,"completion_tokens":-1,"output_tokens":2,"total_tokens":1.5}}}}"#,
        r#"{"custom_id":"e","response":{"status_code":200,"body":{"usage":"lots"}}}"#,
        r#"{"custom_id":"f","response":{"status_code":200,"body":{"usage":null}}}"#,
        // 4xx with body.error; with body.error null; without body.error (merged_line words it).
        r#"{"custom_id":"g","response":{"status_code":400,"body":{"error":{"message":"no","code":"content_filter"}}},"error":null}"#,
        r#"{"custom_id":"h","response":{"status_code":429,"body":{"error":null}}}"#,
        r#"{"custom_id":"i","response":{"status_code":500,"body":{"detail":"boom"}}}"#,
        r#"{"custom_id":"j","response":{"status_code":"200","body":{"x":1}}}"#,
        r#"{"custom_id":"k","response":{"status_code":200.0,"body":{"x":1}}}"#,
        // `error` set: wins over the response, whatever its status.
        r#"{"custom_id":"l","response":null,"error":{"code":"server_error","message":"m"}}"#,
        r#"{"custom_id":"m","response":{"status_code":200,"body":{"x":1}},"error":"odd"}"#,
        // Missing response; a response that is no object.
        r#"{"custom_id":"n"}"#,
        r#"{"custom_id":"o","response":[200,{"x":1}]}"#,
        // Never ran.
        r#"{"custom_id":"p","response":null,"error":{"code":"batch_expired","message":"expired"}}"#,
        r#"{"custom_id":"q","error":{"message":"cancelled","code":"batch_cancelled"}}"#,
        r#"{"custom_id":"r","error":{"code":"batch\u005fexpired"}}"#,
        r#"{"custom_id":"s","error":{"code":7}}"#,
        // A repeated key: a `Value` keeps the last.
        r#"{"custom_id":"t","response":{"status_code":400,"status_code":200,"body":{"ok":true}}}"#,
        r#"{"custom_id":"u","custom_id":"u2","response":{"status_code":200,"body":{"usage":{"total_tokens":1,"total_tokens":2}}}}"#,
        // Ids that need escaping.
        r#"{"custom_id":"v\"\u0001\\","response":{"status_code":204,"body":null}}"#,
        // Left out: no id, an id of another type, not an object, not JSON, blank.
        r#"{"response":{"status_code":200,"body":{}}}"#,
        r#"{"custom_id":5,"response":{"status_code":200,"body":{}}}"#,
        r#"["w",{"status_code":200,"body":{}},null]"#,
        r#"{"custom_id":"x","response":"#,
        "   ",
    ];

    /// What the handler did before: each line read as a `Value` and passed to `merged_line`.
    fn old_way(line: &[u8]) -> Option<(String, Value)> {
        let value = serde_json::from_slice::<Value>(line).ok()?;
        let id = value.get("custom_id")?.as_str()?.to_string();
        Some((id, value))
    }

    fn old_kind(result: Option<&Value>) -> Kind {
        match result {
            None => Kind::NeverRan,
            Some(r) if never_ran(r) => Kind::NeverRan,
            Some(r)
                if r.pointer("/response/status_code")
                    .and_then(Value::as_u64)
                    .is_some_and(|s| (200..300).contains(&s)) =>
            {
                Kind::Answered
            }
            Some(_) => Kind::Failed,
        }
    }

    fn merged_of(record: &[u8], line: u64, id: &str) -> (Kind, Vec<u8>) {
        let (kind, error, tail) = split_record(record);
        let mut text = Vec::new();
        merged_text(&mut text, line, id, error, tail);
        (kind, text)
    }

    #[test]
    fn records_merge_to_the_same_lines_as_merged_line() {
        for (n, line) in LINES.iter().enumerate() {
            let mut record = Vec::new();
            let mut usage = Usage::default();
            let id = result_record(line.as_bytes(), Some(&mut usage), &mut record);
            let old = old_way(line.as_bytes());
            assert_eq!(id, old.as_ref().map(|(i, _)| i.clone()), "{line}");
            let Some((id, value)) = old else {
                assert_eq!(usage, Usage::default(), "{line}");
                continue;
            };
            let mut old_usage = Usage::default();
            if let Some(u) = value.pointer("/response/body/usage") {
                old_usage.add(u);
            }
            assert_eq!(usage, old_usage, "{line}");
            let (kind, text) = merged_of(&record, n as u64 + 1, &id);
            assert_eq!(kind, old_kind(Some(&value)), "{line}");
            assert_eq!(text.last(), Some(&b'\n'));
            let new: Value = serde_json::from_slice(&text).expect("the merged line is JSON");
            assert_eq!(new, merged_line(n as u64 + 1, &id, Some(value)), "{line}");
        }
    }

    #[test]
    fn usual_lines_are_read_borrowed() {
        let borrowed: String = LINES
            .iter()
            .filter(|l| borrowed_record(l, &mut Vec::new()).is_some())
            .filter_map(|l| custom_id_of(l.as_bytes()))
            .collect();
        // Not i, j, k, n, o (failed without an error to quote), t, u (repeated keys).
        let expected = "abcdefghlmpqrsv\"\u{1}\\";
        assert_eq!(borrowed, expected);
    }

    #[test]
    fn merged_text_is_merged_line_to_the_byte_when_the_service_writes_compactly() {
        let line = r#"{"custom_id":"a","response":{"status_code":200,"body":{"a":1,"b":[true,null]}},"error":null}"#;
        let mut record = Vec::new();
        let id = result_record(line.as_bytes(), None, &mut record).unwrap();
        let (_, text) = merged_of(&record, 12, &id);
        let value = serde_json::from_str(line).unwrap();
        let mut old = serde_json::to_vec(&merged_line(12, "a", Some(value))).unwrap();
        old.push(b'\n');
        assert_eq!(
            String::from_utf8(text).unwrap(),
            String::from_utf8(old).unwrap()
        );

        // And a line without a result.
        let no_result = serde_json::to_vec(&merged_line(0, "", None)["error"]).unwrap();
        let mut text = Vec::new();
        merged_text(&mut text, 3, "z\"", &no_result, NO_ANSWER);
        let mut old = serde_json::to_vec(&merged_line(3, "z\"", None)).unwrap();
        old.push(b'\n');
        assert_eq!(text, old);
    }

    #[test]
    fn invalid_utf8_is_left_out_as_before() {
        let line = b"{\"custom_id\":\"a\",\"id\":\"\xff\",\"response\":{\"status_code\":200}}";
        assert!(old_way(line).is_none());
        assert_eq!(result_record(line, None, &mut Vec::new()), None);
    }

    /// The spool and the merge over whole files, against the old way: errors, then results
    /// (the later line of an id wins), the input in order with blank and unknown lines.
    #[test]
    fn spool_and_merge_count_and_stage_as_before() -> io::Result<()> {
        let errors = [
            r#"{"custom_id":"a","response":{"status_code":500,"body":{"error":{"code":"e"}}}}"#,
            r#"{"custom_id":"b","error":{"code":"batch_expired"}}"#,
            r#"{"custom_id":"c","error":{"code":"batch_cancelled"}}"#,
            "",
        ];
        let mut results: Vec<&str> = LINES.to_vec();
        results.push(r#"{"custom_id":"a","response":{"status_code":200,"body":{"usage":{"total_tokens":9}}}}"#);
        results.push(r#"{"custom_id":"y","response":{"status_code":200,"body":{}}}"#);
        results.push(r#"{"custom_id":"y","response":{"status_code":503,"body":{"error":{}}}}"#);
        let lines = |l: &[&str]| l.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();

        let mut spool = Spool {
            file: BufWriter::new(tempfile::tempfile()?),
            len: 0,
            index: Index::new(),
            usage: Usage::default(),
        };
        spool.add(&lines(&errors), false)?;
        let (first, rest) = results.split_at(7);
        spool.add(&lines(first), true)?;
        spool.add(&lines(rest), true)?;
        spool.file.flush()?;

        let mut old: HashMap<String, Value> = HashMap::new();
        let mut old_usage = Usage::default();
        for (file, is_result) in [(&errors[..], false), (&results[..], true)] {
            for line in file {
                if let Some((id, value)) = old_way(line.as_bytes()) {
                    if is_result && let Some(u) = value.pointer("/response/body/usage") {
                        old_usage.add(u);
                    }
                    old.insert(id, value);
                }
            }
        }
        assert_eq!(spool.usage, old_usage);

        let ids = [
            "a",
            "b",
            "c",
            "d",
            "g",
            "p",
            "q",
            "y",
            "nope",
            "l",
            "a",
            "t",
            "u2",
            "v\"\u{1}\\",
        ];
        let mut input: Vec<String> = ids
            .iter()
            .map(|id| serde_json::json!({"custom_id": id, "body": {}}).to_string())
            .collect();
        input.insert(3, String::new());
        input.push(r#"{"body":{}}"#.into());
        let input: Vec<&str> = input.iter().map(String::as_str).collect();

        let mut merge = Merge {
            spool: spool.file.into_inner().map_err(|e| e.into_error())?,
            index: spool.index,
            no_result: serde_json::to_vec(&merged_line(0, "", None)["error"])?,
            line_no: 100,
            staged: true,
            merged: Vec::new(),
            followup: Vec::new(),
            record: Vec::new(),
            counts: MergeCounts::default(),
        };
        let (first, rest) = input.split_at(5);
        merge.add(&lines(first))?;
        merge.add(&lines(rest))?;

        let (mut answered, mut unanswered, mut followup) = (0, 0, Vec::new());
        let mut expected = Vec::new();
        let mut line_no = 100;
        for line in &input {
            line_no += 1;
            if line.is_empty() {
                continue;
            }
            let id = custom_id_of(line.as_bytes()).unwrap_or_default();
            let result = old.get(&id).cloned();
            match old_kind(result.as_ref()) {
                Kind::Answered => answered += 1,
                Kind::Failed => {}
                Kind::NeverRan => {
                    unanswered += 1;
                    followup.extend_from_slice(line.as_bytes());
                    followup.push(b'\n');
                }
            }
            expected.push(merged_line(line_no, &id, result));
        }
        let got: Vec<Value> = merge
            .merged
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(got, expected);
        assert_eq!(merge.counts.merged, expected.len() as u64);
        assert_eq!(merge.counts.answered, answered);
        assert_eq!(merge.counts.without_result, unanswered);
        assert_eq!(merge.counts.followup_lines, unanswered);
        assert_eq!(merge.followup, followup);
        // The checks above see every kind: a success over an error, an error kept, never
        // ran, no result.
        assert!(answered >= 3 && unanswered >= 4 && expected.len() as u64 > answered + unanswered);
        Ok(())
    }
}
