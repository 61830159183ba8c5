//! One timer tick: converge every job a step further.
//!
//! - sweep: `.jsonl` inputs with no job record (a missed event, or no Event Grid at all) go
//!   through intake exactly as the trigger would take them;
//! - lapsed claims: `submitting` jobs whose holder died are taken over;
//! - queued jobs whose wait is over are submitted again;
//! - running jobs are polled; those that ended are harvested.
//!
//! What a tick reads grows with what changed, not with how many jobs run: one listing of
//! `active/` gives every job's index (`jobs::JobIndex`, kept in the record's metadata), one
//! list walk of the service's batches (100 a page) gives the state of the running ones, and a
//! job's record is read only when its index says something is due: its batch changed, its
//! claim lapsed, its quota wait ended. Only the batches the walk did not show are retrieved
//! one by one. Jobs are handled concurrently, a bounded number at a time.
//!
//! Near the top of the workflows: a tick calls `submit`, `harvest`, `split` and `cancel`, none
//! of which calls back; only `webhook` (an event for one batch) calls in, to [`step_job`].

use std::collections::{HashMap, HashSet};

use futures::{StreamExt, TryStreamExt};

use crate::{
    app::{App, Journal, StepError, guarded},
    cancel, capacity,
    config::ApiStyle,
    harvest,
    jobs::{
        ActiveEntry, AnyJob, InputRef, Job, JobState, Observed, Outcome, Queued, Running, job_key,
    },
    openai::{Batch, BatchStatus, OpenAiError},
    outputs, split,
    storage::BlobInfo,
    submit::{self, fail_job, queue_for_quota},
    sweep::InputWindow,
};

/// Jobs handled at once in a tick: with a 50 ms service round trip and three calls per job,
/// 32 keep a 1,000-job tick at a few seconds (BENCHMARKS.md, tick scale).
const TICK_CONCURRENCY: usize = 32;

/// A job still not ended this long after `expires_at` is reported on every tick.
const STUCK_AFTER_SECS: i64 = 3600;

/// A running job's batch is taken for gone, and the job failed, only when the service itself
/// (a 404 naming a missing resource, not its gateway's `Resource not found`) has said so on
/// this many looks in a row, spanning at least `MISSING_FOR_SECS`. One answer is no proof: a
/// batch just created may not be readable everywhere yet (other batch services show such
/// passing 404s: anthropics/anthropic-sdk-python#1432), and failing a live batch loses its
/// results while it keeps running and billing; a batch that is really gone costs nothing
/// while it is looked for again. At the 5-minute schedule that is 10 minutes: three ticks.
const MISSING_LOOKS: u32 = 3;
const MISSING_FOR_SECS: i64 = 600;

/// A running job's batch is taken from a list walk only as far back as its job's creation
/// less this much: the service's clock and ours may differ a little.
const LIST_CLOCK_SLACK_SECS: i64 = 600;

/// The list walk reads at most one page (100 batches) per this many running jobs (and at least
/// one): so it never costs more than retrieving them, even when the window also holds many
/// batches that are not ours.
const RUNNING_JOBS_PER_LIST_PAGE: usize = 50;

#[derive(Debug, Default, Clone, Copy)]
pub struct TickStats {
    pub swept: usize,
    pub active: usize,
    pub harvested: usize,
    pub faults: usize,
    /// Running jobs, and how their batches were learnt: from list pages, or retrieved.
    pub running: usize,
    pub list_pages: u32,
    pub retrieved: usize,
    /// Job records read: only those whose index said something was due.
    pub records_read: usize,
    /// Inputs the sweep looked at: those modified since its mark, with no active job.
    pub sweep_looked_at: usize,
    /// Names of the input container this tick's window listed, and whether the window ended
    /// a cycle (the whole container has been listed since the cycle began).
    pub sweep_listed: usize,
    pub sweep_cycle_ended: bool,
    /// Queued jobs admitted (submitted) this tick, and those still waiting for room.
    pub admitted: usize,
    pub waiting: usize,
}

/// How a job's step went, for the tick's totals.
#[derive(Debug, Default, Clone, Copy)]
struct StepDone {
    finished: bool,
    retrieved: bool,
    read: bool,
}

/// Azure OpenAI's gateway answering 404 `Resource not found` during a tick: a configuration
/// fault (every call gets it), not news about any job. Each such step leaves its job as it
/// was; the tick says so once, loudly, instead of once per job.
#[derive(Default)]
struct NoSuchRoute {
    steps: usize,
    example: Option<String>,
}

impl NoSuchRoute {
    /// Takes the error when it is the gateway's 404; `false` for any other.
    fn absorb(&mut self, e: &StepError) -> bool {
        if !matches!(e, StepError::OpenAi(OpenAiError::NoSuchRoute { .. })) {
            return false;
        }
        self.steps += 1;
        self.example.get_or_insert_with(|| e.to_string());
        true
    }

    fn report(&self, app: &App, j: &Journal) {
        let Some(example) = &self.example else {
            return;
        };
        let version = match &app.config.api_style {
            ApiStyle::Classic { api_version } => api_version.as_str(),
            ApiStyle::V1 => "v1",
        };
        j.error(format!(
            "CONFIGURATION: Azure OpenAI at {} (api-version {version}) answers 404 Resource not \
             found: {} step(s) this tick could not reach it and no job was changed. Fix \
             AZURE_OPENAI_ENDPOINT or AZURE_OPENAI_API_VERSION; jobs go on once it answers. \
             First: {example}",
            app.config.openai_endpoint, self.steps
        ));
    }
}

pub async fn tick(app: &App, j: &Journal) -> Result<TickStats, StepError> {
    let started = std::time::Instant::now();
    let mut stats = TickStats::default();
    let mut no_route = NoSuchRoute::default();
    let mut listed_at = app.now();
    let mut entries = app.jobs.active_entries().await?;
    let active: HashSet<String> = entries.iter().map(|e| e.key.clone()).collect();
    // One listing of a window of the input container, after the active jobs', serves both
    // the sweep and the look for deleted inputs below (it was made twice a tick, the larger
    // part of a tick's storage time with thousands of inputs: BENCHMARKS.md, tick scale).
    let sweep_state = app.jobs.sweep_state().await?;
    let window_at = app.now();
    let window = InputWindow::list(app, &sweep_state, app.config.sweep_inputs_per_tick).await?;
    let swept = sweep(
        app,
        &window.inputs,
        sweep_state.mark,
        &active,
        &mut no_route,
        &mut stats,
        j,
    )
    .await?;
    stats.swept = swept.taken_in;
    stats.sweep_listed = window.inputs.len();
    stats.sweep_cycle_ended = window.ends_cycle();
    let next_state = window.advance(&sweep_state, swept.newest, swept.all_taken, window_at);
    if next_state != sweep_state {
        app.jobs.set_sweep_state(&next_state).await?;
    }
    // Jobs listed before the inputs were: only their inputs' absence from that listing says
    // they were deleted (a job the trigger creates after it would look deleted).
    let listed_before: Vec<String> = entries.iter().map(|e| e.key.clone()).collect();
    if stats.swept > 0 {
        // Listed again: the sweep added jobs, and those are polled at once.
        listed_at = app.now();
        entries = app.jobs.active_entries().await?;
    }
    stats.active = entries.len();
    let rooms = capacity::ActiveRooms::new(
        listed_at,
        app.openai.endpoint().as_str(),
        entries.iter().map(|e| (e.key.as_str(), e.index.as_ref())),
    );

    // Inputs deleted while their job ran, whose BlobDeleted event never came (or Event Grid
    // is not set up): their jobs are cancelled as the event would have, as far as this
    // tick's window of the inputs can tell.
    let present: HashSet<&str> = window.inputs.iter().map(|b| b.name.as_str()).collect();
    let covered = |name: &str| window.covers(name);
    if let Err(e) = cancel::sweep_deleted(app, &listed_before, &present, covered, j).await {
        j.error(format!(
            "sweep: deleted inputs will be looked for again next tick: {e}"
        ));
    }
    let listed = match list_running(app, &entries, &mut stats).await {
        Ok(listed) => listed,
        // The gateway's 404 reaches every call: the job steps meet it too, and the tick
        // reports it once for all of them.
        Err(OpenAiError::NoSuchRoute { .. }) => HashMap::new(),
        Err(e) => {
            // Each running job is then retrieved on its own, as without the walk.
            j.warn(format!(
                "listing the service's batches failed; retrieving them one by one: {e}"
            ));
            HashMap::new()
        }
    };
    let listed = &listed;
    let first = app.openai.endpoint().to_string();
    let first = &first;
    // Jobs waiting for room are admitted after every other job's step, in arrival order:
    // the batches that ended in this tick have freed their room by then.
    let (waiting, entries): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| {
        e.index
            .as_ref()
            .is_some_and(|ix| ix.state == JobState::Queued && !ix.cancel_requested)
    });
    let results: Vec<Result<StepDone, StepError>> = futures::stream::iter(entries)
        .map(|entry| async move {
            let batch = entry.index.as_ref().and_then(|ix| {
                let endpoint = ix.endpoint.clone().unwrap_or_else(|| first.clone());
                ix.batch
                    .as_ref()
                    .and_then(|b| listed.get(&(endpoint, b.id.clone())))
            });
            guarded(format!("job={}", entry.key), step(app, &entry, batch, j)).await
        })
        .buffer_unordered(TICK_CONCURRENCY)
        .collect()
        .await;
    for r in results {
        match r {
            Ok(done) => {
                stats.harvested += usize::from(done.finished);
                stats.retrieved += usize::from(done.retrieved);
                stats.records_read += usize::from(done.read);
            }
            Err(e) => {
                stats.faults += 1;
                if !no_route.absorb(&e) {
                    j.error(format!(
                        "a job step failed and will be retried next tick: {e}"
                    ));
                }
            }
        }
    }
    // The ledgers learn from this listing what the active jobs hold; a holder that died
    // between reserving room and using it leaves a reservation no job will release: dropped
    // once its job is no longer active.
    match capacity::settle(app, &rooms).await {
        Ok(s) if s.dropped > 0 => j.warn(format!(
            "capacity: dropped {} reservation(s) of jobs no longer active (a holder died?)",
            s.dropped
        )),
        Ok(_) => {}
        Err(e) => j.warn(format!(
            "capacity: the ledgers will be brought up to the active jobs next tick: {e}"
        )),
    }
    let admitted = admit_in_order(app, waiting, &mut no_route, j).await;
    stats.faults += admitted.faults;
    stats.admitted = admitted.admitted;
    stats.waiting = admitted.waiting;
    no_route.report(app, j);
    j.info(format!(
        "tick done in {} ms: {} new input(s), {} active job(s), {} finished, {} fault(s); \
         running={} list_pages={} retrieved={} records_read={} sweep_listed={} \
         sweep_cycle_ended={} sweep_looked_at={} admitted={} waiting={}",
        started.elapsed().as_millis(),
        stats.swept,
        stats.active,
        stats.harvested,
        stats.faults,
        stats.running,
        stats.list_pages,
        stats.retrieved,
        stats.records_read,
        stats.sweep_listed,
        u8::from(stats.sweep_cycle_ended),
        stats.sweep_looked_at,
        stats.admitted,
        stats.waiting,
    ));
    Ok(stats)
}

/// The running jobs' batches as the list walks show them (one walk per endpoint of the
/// pool that has running jobs), keyed by endpoint and batch id.
async fn list_running(
    app: &App,
    entries: &[ActiveEntry],
    stats: &mut TickStats,
) -> Result<HashMap<(String, String), Batch>, OpenAiError> {
    let first = app.openai.endpoint().to_string();
    let mut by_endpoint: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    for ix in entries.iter().filter_map(|e| e.index.as_ref()) {
        if ix.state != JobState::Running {
            continue;
        }
        if let Some(b) = &ix.batch {
            let endpoint = ix.endpoint.clone().unwrap_or_else(|| first.clone());
            by_endpoint
                .entry(endpoint)
                .or_default()
                .push((b.id.clone(), ix.created_at));
        }
    }
    stats.running = by_endpoint.values().map(Vec::len).sum();
    let mut all = HashMap::new();
    for (endpoint, running) in by_endpoint {
        // One running batch is as cheaply retrieved as listed.
        if running.len() < 2 {
            continue;
        }
        let since =
            running.iter().map(|(_, t)| *t).min().unwrap_or_default() - LIST_CLOCK_SLACK_SECS;
        let wanted: HashSet<String> = running.into_iter().map(|(id, _)| id).collect();
        let max_pages = (wanted.len() / RUNNING_JOBS_PER_LIST_PAGE).max(1) as u32;
        let listed = app
            .openai_at(Some(&endpoint))
            .list_wanted(&wanted, since, max_pages)
            .await?;
        stats.list_pages += listed.pages;
        all.extend(
            listed
                .batches
                .into_iter()
                .map(|(id, b)| ((endpoint.clone(), id), b)),
        );
    }
    Ok(all)
}

/// What a tick's sweep of its window of inputs did.
struct Swept {
    taken_in: usize,
    /// The newest Last-Modified among the window's inputs.
    newest: Option<i64>,
    /// Every input it took in went through (else the sweep's mark stays, see `sweep`).
    all_taken: bool,
}

/// Submits the inputs of this tick's window (`sweep::InputWindow`) that have no job record
/// for their current version.
///
/// Its cost does not grow with the history: besides the window's size, a cycle of windows
/// that finishes records a mark (see `sweep`), and the next looks only at inputs modified
/// since then, less an overlap for a commit that lands while the listing runs. An input
/// older than that was looked at by an earlier cycle, and a re-upload is modified anew.
/// Whether such a recent input's job has finished is asked of it alone, so `done/` is never
/// listed; only the very first cycle (no mark yet) lists it.
async fn sweep(
    app: &App,
    inputs: &[BlobInfo],
    mark: Option<i64>,
    active: &HashSet<String>,
    no_route: &mut NoSuchRoute,
    stats: &mut TickStats,
    j: &Journal,
) -> Result<Swept, StepError> {
    let (inputs, others): (Vec<&BlobInfo>, Vec<&BlobInfo>) =
        inputs.iter().partition(|b| b.name.ends_with(".jsonl"));
    // Nothing dropped in is ignored silently: a `data.JSONL` or `data.json` is not an
    // input (the Event Grid filter and the Contract say `.jsonl`), so say so every tick
    // while it is there.
    if !others.is_empty() {
        const SHOWN: usize = 5;
        let names: Vec<&str> = others.iter().take(SHOWN).map(|b| b.name.as_str()).collect();
        let more = others.len().saturating_sub(SHOWN);
        j.warn(format!(
            "sweep: {} blob(s) in {} are not submitted: only names ending in \".jsonl\" \
             (lower case) are batch inputs: {}{}",
            others.len(),
            app.config.input_container,
            names.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    let newest = inputs.iter().filter_map(|b| b.modified).max();
    let since = mark.map(|m| m - app.config.sweep_overlap_secs);
    let candidates: Vec<_> = inputs
        .into_iter()
        .filter(|b| match (since, b.modified) {
            (Some(since), Some(t)) => t >= since,
            _ => true,
        })
        .filter(|b| !active.contains(&job_key(&b.name, &b.etag)))
        .cloned()
        .collect();
    stats.sweep_looked_at = candidates.len();
    let missing = match mark {
        None => {
            // The first sweep: one listing of done/ (5,000 names a page) is far cheaper
            // than a request per input.
            let done = app.jobs.done_keys().await?;
            candidates
                .into_iter()
                .filter(|b| !done.contains(&job_key(&b.name, &b.etag)))
                .collect()
        }
        Some(_) => {
            let checked: Vec<_> = futures::stream::iter(candidates)
                .map(|b| async move {
                    let done = app.jobs.is_done(&job_key(&b.name, &b.etag)).await?;
                    Ok::<_, StepError>((!done).then_some(b))
                })
                .buffer_unordered(TICK_CONCURRENCY)
                .try_collect()
                .await?;
            checked.into_iter().flatten().collect::<Vec<_>>()
        }
    };
    let count = missing.len();
    for blob in &missing {
        j.info(format!(
            "sweep: blob={}/{} has no job yet (missed event?); taking it in",
            app.config.input_container, blob.name
        ));
    }
    let results: Vec<_> = futures::stream::iter(missing)
        .map(|b| async move {
            let what = format!("blob={}/{}", app.config.input_container, b.name);
            guarded(what, submit::intake(app, &b.name, j)).await
        })
        .buffer_unordered(TICK_CONCURRENCY)
        .collect()
        .await;
    // One input's fault must not keep the others (or the polling after) from their turn.
    let mut all_taken = true;
    for r in results {
        if let Err(e) = r {
            all_taken = false;
            if !no_route.absorb(&e) {
                j.error(format!("sweep: an input will be retried next tick: {e}"));
            }
        }
    }
    // The mark moves only past a cycle that took in everything it found: an input whose
    // intake failed is looked at again.
    Ok(Swept {
        taken_in: count,
        newest,
        all_taken,
    })
}

/// Moves one active job a step. `listed`: its batch as this tick's list walk showed it.
async fn step(
    app: &App,
    entry: &ActiveEntry,
    listed: Option<&Batch>,
    j: &Journal,
) -> Result<StepDone, StepError> {
    let mut done = StepDone::default();
    let t = app.now();
    // First what the index alone can settle, without reading the record.
    let mut batch = listed.cloned();
    if let Some(ix) = &entry.index {
        if ix.quiet_at(t) {
            return Ok(done);
        }
        if ix.state == JobState::Running
            && let Some(seen) = &ix.batch
        {
            if batch.is_none() {
                done.retrieved = true;
                // A batch the service says it does not know is the record's business: the
                // step below retrieves it again with the record in hand.
                batch = match app
                    .openai_at(ix.endpoint.as_deref())
                    .retrieve(&seen.id)
                    .await
                {
                    Ok(b) => Some(b),
                    Err(OpenAiError::NotFound(_)) => None,
                    Err(e) => return Err(e.into()),
                };
            }
            if let Some(b) = &batch
                && ix.unchanged_by(b)
            {
                warn_if_stuck(app, &entry.key, b, j);
                return Ok(done);
            }
        }
    }
    let Some((job, etag)) = app.jobs.load_active(&entry.key).await? else {
        return Ok(done);
    };
    done.read = true;
    done.finished = step_record(app, job, etag, batch, j).await?;
    Ok(done)
}

/// Moves one active job a step from its record; `Ok(true)` when it finished. Also what a
/// webhook event runs for the job of its batch (`webhook`), so both paths take the same,
/// ETag-guarded step.
pub async fn step_job(app: &App, key: &str, j: &Journal) -> Result<bool, StepError> {
    let Some((job, etag)) = app.jobs.load_active(key).await? else {
        return Ok(false);
    };
    let finished = step_record(app, job, etag, None, j).await?;
    if finished {
        // Its room is free now: the jobs waiting for it go in this invocation, not the next
        // tick.
        let waiting: Vec<ActiveEntry> = app
            .jobs
            .active_entries()
            .await?
            .into_iter()
            .filter(|e| {
                e.index
                    .as_ref()
                    .is_some_and(|ix| ix.state == JobState::Queued && !ix.cancel_requested)
            })
            .collect();
        let mut no_route = NoSuchRoute::default();
        admit_in_order(app, waiting, &mut no_route, j).await;
        no_route.report(app, j);
    }
    Ok(finished)
}

/// What an admission pass did.
#[derive(Debug, Default)]
struct AdmissionPass {
    admitted: usize,
    waiting: usize,
    faults: usize,
}

/// Admits the queued jobs `waiting` in order of arrival, each where it fits (the next that
/// fits goes, a larger one before it does not hold it up); those that still do not fit get
/// their place in line written, when it changed, so status.json tells it.
async fn admit_in_order(
    app: &App,
    mut waiting: Vec<ActiveEntry>,
    no_route: &mut NoSuchRoute,
    j: &Journal,
) -> AdmissionPass {
    let created = |e: &ActiveEntry| e.index.as_ref().map_or(0, |ix| ix.created_at);
    waiting.sort_by(|a, b| (created(a), &a.key).cmp(&(created(b), &b.key)));
    let mut pass = AdmissionPass::default();
    let mut rooms = capacity::Rooms::default();
    let t = app.now();
    for entry in waiting {
        let place = pass.waiting as u32 + 1;
        // What the index settles without reading the record: a backoff still running, or
        // a job that still fits nowhere and already has this place written. A long line
        // then costs a ledger read per deployment, not a read per job.
        if let Some(ix) = &entry.index {
            if ix.quiet_at(t) && ix.waiting.is_none() {
                continue;
            }
            if let Some(w) = ix.waiting.as_ref().filter(|w| w.place == place) {
                match rooms.fits(app, &w.model, w.tokens).await {
                    Ok(false) => {
                        pass.waiting += 1;
                        continue;
                    }
                    Ok(true) => {}
                    // The record's own path reads the ledger again, and reports.
                    Err(_) => rooms.forget(),
                }
            }
        }
        let what = format!("job={}", entry.key);
        match guarded(what, admit_one(app, &entry.key, place, j)).await {
            Ok(Admit::Waiting) => pass.waiting += 1,
            Ok(Admit::Admitted) => {
                pass.admitted += 1;
                // Its reservation took room: what was read no longer holds.
                rooms.forget();
            }
            Ok(Admit::Other | Admit::Finished) => {}
            Err(e) => {
                pass.faults += 1;
                pass.waiting += 1;
                if !no_route.absorb(&e) {
                    j.error(format!(
                        "a queued job's admission failed and will be retried next tick: {e}"
                    ));
                }
            }
        }
    }
    pass
}

/// What became of a queued job in an admission pass.
enum Admit {
    /// Submitted (or on its way: claimed to be submitted).
    Admitted,
    /// Still waiting for room.
    Waiting,
    /// Its input changed while it waited: this version is finished.
    Finished,
    /// Not waiting for room (any more): finished, cancelled, changed by someone else, or
    /// waiting for a backoff timer.
    Other,
}

async fn admit_one(app: &App, key: &str, place: u32, j: &Journal) -> Result<Admit, StepError> {
    let Some((job, etag)) = app.jobs.load_active(key).await? else {
        return Ok(Admit::Other);
    };
    match job {
        AnyJob::Queued(job) if job.cancel_request().is_none() => {
            admit_queued(app, job, etag, Some(place), j).await
        }
        other => {
            step_record(app, other, etag, None, j).await?;
            Ok(Admit::Other)
        }
    }
}

/// A queued job: admitted if some target has room for it (and its backoff, if any, is
/// over); otherwise it stays, at `place` in line when the pass counts it.
async fn admit_queued(
    app: &App,
    mut job: Job<Queued>,
    etag: String,
    place: Option<u32>,
    j: &Journal,
) -> Result<Admit, StepError> {
    let key = job.key().to_string();
    let t = app.now();
    if !job.waits_for_room() && job.next_attempt_at() > t {
        return Ok(Admit::Other);
    }
    if !input_unchanged(app, job.input()).await? {
        supersede(app, job, &etag, j).await?;
        return Ok(Admit::Finished);
    }
    // Looked at without reserving: a job that still does not fit costs no write.
    if let Some(facts) = job.facts()
        && !capacity::room_for(
            app,
            &facts.model,
            job.round_tokens().unwrap_or(facts.tokens),
        )
        .await?
    {
        if job.waits_for_room()
            && let Some(place) = place
            && job.place() != place
        {
            job.set_place(place);
            if app.jobs.update(&job, &etag).await?.is_some() {
                crate::status::publish(
                    &app.store,
                    &app.jobs,
                    &app.config.output_container,
                    &job.into(),
                    None,
                    app.now(),
                )
                .await;
            }
        }
        return Ok(Admit::Waiting);
    }
    let attempt = job.quota_attempts() + 1;
    let room = job.waits_for_room();
    let job = job.take_over(&app.instance, app.config.submit_lease.as_secs(), t);
    let Some(etag) = app.jobs.update(&job, &etag).await? else {
        return Ok(Admit::Other);
    };
    if room {
        j.info(format!("job={key}: room in the quota; submitting"));
    } else {
        j.info(format!(
            "job={key}: resubmitting after quota wait (attempt {attempt})"
        ));
    }
    // Boxed: with admission in it, the submit step made this future deep enough
    // to overflow a worker thread's stack in debug builds.
    Ok(
        match Box::pin(submit::run_claimed(app, job, etag, j)).await? {
            submit::Intake::Queued => Admit::Waiting,
            _ => Admit::Admitted,
        },
    )
}

/// Moves one active job a step from its record; `Ok(true)` when it finished. `batch`: its
/// running batch, when this tick already knows it.
async fn step_record(
    app: &App,
    job: AnyJob,
    etag: String,
    batch: Option<Batch>,
    j: &Journal,
) -> Result<bool, StepError> {
    let key = job.key().to_string();
    let key = key.as_str();
    // A job asked to stop: dropped here if it has no batch yet.
    let Some((job, etag)) = cancel::advance(app, job, etag, j).await? else {
        return Ok(true);
    };
    let t = app.now();
    let lease = app.config.submit_lease.as_secs();
    match job {
        AnyJob::Submitting(job) if job.is_leased(t) => Ok(false),
        AnyJob::Submitting(mut job) => {
            job.take_over(&app.instance, lease, t);
            if let Some(etag) = app.jobs.update(&job, &etag).await? {
                j.warn(format!(
                    "job={key}: claim lapsed (holder died?); resuming submission"
                ));
                // Boxed: with admission in it, the submit step made this future deep enough
                // to overflow a worker thread's stack in debug builds.
                Box::pin(submit::run_claimed(app, job, etag, j)).await?;
            }
            Ok(false)
        }
        AnyJob::Queued(job) => Ok(matches!(
            admit_queued(app, job, etag, None, j).await?,
            Admit::Finished
        )),
        AnyJob::Running(job) => {
            // The batch in hand is this job's only if it is the one the record names (a
            // follow-up round may have started since the index was listed).
            let batch = batch.filter(|b| b.id == job.batch().id);
            poll_running(app, job, etag, batch, j).await
        }
        AnyJob::Split(job) => {
            let combined = submit::advance_parts(app, job, etag, j).await?.combined;
            if !combined {
                submit::refresh_split_status(app, key).await;
            }
            Ok(combined)
        }
        AnyJob::Harvesting(mut job) => {
            let Some(etag) = outputs::take_hold(app, &mut job, &etag, j).await? else {
                return Ok(false);
            };
            // Boxed, as the submit step is: a harvest's future is deep enough to overflow a
            // worker thread's stack in debug builds.
            Box::pin(harvest::harvest_batch(app, job, etag, None, j)).await?;
            Ok(true)
        }
        AnyJob::Combining(mut job) => {
            let Some(etag) = outputs::take_hold(app, &mut job, &etag, j).await? else {
                return Ok(false);
            };
            Box::pin(split::combine_parts(app, job, etag, j)).await?;
            Ok(true)
        }
        AnyJob::Finished(job) => {
            // Finished but not yet moved (a crash between the two writes): move it now.
            app.jobs.finish(&job, &etag).await?;
            Ok(false)
        }
    }
}

fn warn_if_stuck(app: &App, key: &str, batch: &Batch, j: &Journal) {
    if !batch.status.is_terminal()
        && batch
            .expires_at
            .is_some_and(|e| app.now() > e + STUCK_AFTER_SECS)
    {
        j.warn(format!(
            "job={key} batch={}: still {} more than an hour past its expiry time",
            batch.id, batch.status
        ));
    }
}

async fn poll_running(
    app: &App,
    job: Job<Running>,
    etag: String,
    known: Option<Batch>,
    j: &Journal,
) -> Result<bool, StepError> {
    let key = job.key().to_string();
    let batch_id = job.batch().id.clone();
    let retrieved = match known {
        Some(b) => Ok(b),
        None => {
            app.openai_at(job.openai_endpoint())
                .retrieve(&batch_id)
                .await
        }
    };
    let batch = match retrieved {
        Ok(b) => b,
        Err(OpenAiError::NotFound(_)) => {
            let mut job = job;
            let missing = job.batch_missing(app.now());
            let over = app.now() - missing.since;
            if missing.looks >= MISSING_LOOKS && over >= MISSING_FOR_SECS {
                j.error(format!(
                    "job={key} batch={batch_id}: the service has said on {} looks in a row, \
                     over {over} s, that it does not know this batch; finishing the job as failed",
                    missing.looks
                ));
                let message = format!(
                    "batch {batch_id} is unknown to the service ({} looks over {over} s)",
                    missing.looks
                );
                fail_job(app, job, &etag, "batch_not_found", message, j).await?;
                return Ok(true);
            }
            j.warn(format!(
                "job={key} batch={batch_id}: the service says it does not know this batch \
                 (look {} in a row); the job fails only if it still says so on \
                 {MISSING_LOOKS} looks over {MISSING_FOR_SECS} s",
                missing.looks
            ));
            app.jobs.update(&job, &etag).await?;
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    // A batch that failed for quota never ran: queue it like a refused create.
    if batch.status == BatchStatus::Failed
        && batch.error_codes().any(|c| c == "token_limit_exceeded")
    {
        let message = format!("batch {} failed with token_limit_exceeded", batch.id);
        queue_for_quota(app, job, &etag, &message, j).await?;
        return Ok(false);
    }
    warn_if_stuck(app, &key, &batch, j);
    let status_changed = job.batch().status != batch.status;
    let log_status = || {
        if status_changed {
            j.info(format!(
                "job={key} batch={}: {} ({}/{} done, {} failed)",
                batch.id,
                batch.status,
                batch.request_counts.completed,
                batch.request_counts.total,
                batch.request_counts.failed
            ));
        }
    };
    match job.observe(&batch, app.now()) {
        // Most ticks of a long batch change nothing: then the record is not rewritten (one
        // storage call of three per job saved; BENCHMARKS.md, tick scale).
        Observed::Unchanged(_) => Ok(false),
        Observed::Changed(job) => {
            if app.jobs.update(&job, &etag).await?.is_some() {
                log_status();
                publish_status(app, job.into(), &batch).await;
            }
            Ok(false)
        }
        Observed::Ended(mut job) => {
            // Whoever records the end holds the harvest, in the same write: a webhook or a
            // redelivered event arriving meanwhile leaves it alone.
            job.hold(&app.instance, app.config.submit_lease.as_secs(), app.now());
            let Some(etag) = app.jobs.update(&job, &etag).await? else {
                return Ok(false);
            };
            log_status();
            publish_status(app, job.clone().into(), &batch).await;
            Box::pin(harvest::harvest_batch(
                app,
                job,
                etag,
                Some(batch.clone()),
                j,
            ))
            .await?;
            Ok(true)
        }
    }
}

/// The service's news about a batch reaches `status.json` (only on a change: a tick that
/// changed nothing writes nothing).
async fn publish_status(app: &App, job: AnyJob, batch: &crate::openai::Batch) {
    crate::status::publish(
        &app.store,
        &app.jobs,
        &app.config.output_container,
        &job,
        Some(batch),
        app.now(),
    )
    .await;
}

async fn input_unchanged(app: &App, input: &InputRef) -> Result<bool, StepError> {
    Ok(app
        .store
        .properties(&input.container, &input.name)
        .await?
        .is_some_and(|b| b.etag == input.etag))
}

/// A queued job whose input was replaced or deleted: the new version is its own job.
async fn supersede(
    app: &App,
    job: Job<Queued>,
    etag: &str,
    j: &Journal,
) -> Result<bool, StepError> {
    let job = job.finish(Outcome::Cancelled, "input replaced while queued", app.now());
    app.jobs.finish(&job, etag).await?;
    // No summary is written (the new version owns the folder), but the dashboard still
    // counts this version as ended: the line carries the fields of a finished job.
    let mut ended = crate::summary::Summary::for_job(&job, app.now());
    ended.errors.push(crate::openai::BatchError {
        code: Some("input_replaced".into()),
        ..Default::default()
    });
    j.info(format!(
        "job={} batch=- {}: input blob={}/{} changed or was deleted while queued; dropping \
         this version",
        job.key(),
        ended.log_fields(
            &format!("{}/{}", job.input().container, job.input().name),
            job.part_of(),
            job.created_at()
        ),
        job.input().container,
        job.input().name
    ));
    Ok(true)
}
