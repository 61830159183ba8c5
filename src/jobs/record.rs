//! `Job<S>`: a job record in state `S`, where each state carries exactly its own data.
//!
//! The one place that says which step may follow which: a transition takes the job by value
//! in the state it leaves and returns it in the state it enters (`Job<Submitting>` →
//! `submitted` → `Job<Running>`), so a step from the wrong state is a compile error, not a
//! runtime check. What every state shares (the input, its facts, rounds, history) is on the
//! job; what only one has is on the state: the claim of `Submitting`, the batch of `Running`
//! and `Harvesting`, the parts of `Split` and `Combining`, the outcome of `Finished`.
//!
//! Time comes in as an argument (`at`, unix seconds from the app's clock), never from the
//! system clock here, so the machine can be stepped in tests.

use crate::{
    config::Config,
    openai::{Batch, BatchStatus, RequestCounts},
};

use super::{
    CancelRequest, CancelledBy, HarvestProgress, HeldRoom, HistoryEntry, InputFacts, InputRef,
    JobState, Outcome, PartOf, PartRef, RoundRecord, WireState, job_key,
};

/// A job in state `S`. Fields are read through methods and changed only by transitions.
#[derive(Debug, Clone, PartialEq)]
pub struct Job<S> {
    pub(super) common: Common,
    pub(super) state: S,
}

/// What a job has in every state.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Common {
    pub(super) key: String,
    pub(super) input: InputRef,
    pub(super) facts: Option<InputFacts>,
    pub(super) part_of: Option<PartOf>,
    /// Create attempts refused for quota.
    pub(super) quota_attempts: u32,
    pub(super) last_error: Option<String>,
    /// 0 for the first batch; n for the n-th follow-up batch of requests left unanswered.
    pub(super) round: u32,
    /// The batches of earlier rounds, for the summary.
    pub(super) rounds: Vec<RoundRecord>,
    /// The staged input of the current follow-up round (a blob in the state container).
    pub(super) followup_url: Option<String>,
    /// The requests in that staged input; `None` in records written before it was kept.
    pub(super) followup_lines: Option<u64>,
    /// Where the results go, relative to the output container, once the first harvest has
    /// chosen it; later rounds fold their results into the same folder.
    pub(super) results_folder: Option<String>,
    /// Someone asked for the job to stop (`handler cancel`, the input deleted).
    pub(super) cancel: Option<CancelRequest>,
    /// The Azure OpenAI endpoint (one of `AZURE_OPENAI_ENDPOINT`'s) the job was admitted to:
    /// every later call for its batch goes there. `None` in records written before the pool
    /// existed, and before admission: the first endpoint.
    pub(super) openai_endpoint: Option<String>,
    /// The room it holds there from its admission until it is released (its batch ended) or
    /// given back (a refusal: it waits again).
    pub(super) room: Option<HeldRoom>,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) history: Vec<HistoryEntry>,
}

/// What each state is called in records and history (and how it is written: `wire`).
pub trait State: WireState + Indexed {
    const NAME: JobState;
}

/// What each state adds to the job index (`index`): the defaults say "nothing beyond the
/// state".
pub trait Indexed {
    fn quiet_until(&self) -> Option<i64> {
        None
    }
    fn running_batch(&self) -> Option<(&BatchSeen, bool)> {
        None
    }
    /// A queued job waiting for room: its place in line as last counted.
    fn place_in_line(&self) -> Option<u32> {
        None
    }
}

/// Claimed by an invocation: validating, then creating the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitting {
    pub(super) owner: String,
    pub(super) lease_until: i64,
    /// Set just before calling create and kept until its answer is recorded: a later holder
    /// that finds it looks for the batch before creating another.
    pub(super) create: Option<CreateCall>,
}

/// A create call that was sent, and until when it may still be on its way.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateCall {
    pub started_at: i64,
    pub in_flight_until: Option<i64>,
}

/// Waiting for room in the enqueued-token quota: admitted once a target has room for it
/// (`room`), or, after a refusal the capacity model did not predict, not before
/// `next_attempt_at` (a backoff).
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub(super) next_attempt_at: i64,
    /// Waits for room, not for a timer.
    pub(super) room: bool,
    /// Its place in the line of jobs waiting for room (1 = next), as last counted.
    pub(super) place: u32,
}

/// A batch exists and has not ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    pub(super) batch: BatchSeen,
    /// The service's answers, on the last looks in a row, that the batch does not exist.
    pub(super) missing: Option<Missing>,
}

/// Looks in a row on which the service said a running job's batch does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing {
    /// The first of them.
    pub since: i64,
    pub looks: u32,
}

/// A batch as the service last described it.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSeen {
    pub id: String,
    pub status: BatchStatus,
    pub request_counts: RequestCounts,
}

impl BatchSeen {
    fn of(batch: &Batch) -> Self {
        BatchSeen {
            id: batch.id.clone(),
            status: batch.status.clone(),
            request_counts: batch.request_counts.clone(),
        }
    }
}

/// The input was split into parts, each a job of its own; this one waits for them.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub(super) parts: Vec<PartRef>,
}

/// The batch ended: its results are being moved into place.
#[derive(Debug, Clone, PartialEq)]
pub struct Harvesting {
    pub(super) batch: BatchSeen,
    pub(super) progress: HarvestProgress,
    pub(super) holder: Option<Holder>,
}

/// Every part of a split job finished: their results are being combined into place.
#[derive(Debug, Clone, PartialEq)]
pub struct Combining {
    pub(super) parts: Vec<PartRef>,
    pub(super) progress: HarvestProgress,
    pub(super) holder: Option<Holder>,
}

/// Who moves a job's results into place, and until when. The moves (clearing the folder,
/// copying, writing `merged.jsonl`) happen between the record's writes, where its ETag
/// guards nothing: two harvests at once (a webhook and a tick, a redelivered event) could
/// each clear what the other had moved. So one invocation at a time holds the job, under a
/// lease like an intake's claim; a holder that dies lets it lapse, and the next one goes on
/// from the steps recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    pub(super) owner: String,
    pub(super) until: i64,
}

/// Nothing more will happen.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub(super) outcome: Outcome,
    pub(super) batch: Option<BatchSeen>,
    pub(super) parts: Vec<PartRef>,
    /// Kept from the harvest, for whoever reads the record later.
    pub(super) progress: Option<HarvestProgress>,
}

impl State for Submitting {
    const NAME: JobState = JobState::Submitting;
}
impl State for Queued {
    const NAME: JobState = JobState::Queued;
}
impl State for Running {
    const NAME: JobState = JobState::Running;
}
impl State for Split {
    const NAME: JobState = JobState::Split;
}
impl State for Harvesting {
    const NAME: JobState = JobState::Harvesting;
}
impl State for Combining {
    const NAME: JobState = JobState::Harvesting;
}
impl State for Finished {
    const NAME: JobState = JobState::Finished;
}

impl Indexed for Submitting {
    fn quiet_until(&self) -> Option<i64> {
        let in_flight = self.create.as_ref().and_then(|c| c.in_flight_until);
        Some(in_flight.map_or(self.lease_until, |t| t.max(self.lease_until)))
    }
}
impl Indexed for Queued {
    fn quiet_until(&self) -> Option<i64> {
        Some(self.next_attempt_at)
    }
    fn place_in_line(&self) -> Option<u32> {
        self.room.then_some(self.place)
    }
}
impl Indexed for Running {
    fn running_batch(&self) -> Option<(&BatchSeen, bool)> {
        Some((&self.batch, self.missing.is_some()))
    }
}
impl Indexed for Split {}
// While held, a tick need not even read it: its holder is at work.
impl Indexed for Harvesting {
    fn quiet_until(&self) -> Option<i64> {
        self.holder.as_ref().map(|h| h.until)
    }
}
impl Indexed for Combining {
    fn quiet_until(&self) -> Option<i64> {
        self.holder.as_ref().map(|h| h.until)
    }
}
impl Indexed for Finished {}

const TAKEN_OVER: &str = "taken over";

impl<S: State> Job<S> {
    pub fn key(&self) -> &str {
        &self.common.key
    }
    pub fn input(&self) -> &InputRef {
        &self.common.input
    }
    pub fn facts(&self) -> Option<&InputFacts> {
        self.common.facts.as_ref()
    }
    pub fn part_of(&self) -> Option<&PartOf> {
        self.common.part_of.as_ref()
    }
    pub fn quota_attempts(&self) -> u32 {
        self.common.quota_attempts
    }
    pub fn last_error(&self) -> Option<&str> {
        self.common.last_error.as_deref()
    }
    pub fn round(&self) -> u32 {
        self.common.round
    }
    pub fn rounds(&self) -> &[RoundRecord] {
        &self.common.rounds
    }
    pub fn created_at(&self) -> i64 {
        self.common.created_at
    }
    pub fn updated_at(&self) -> i64 {
        self.common.updated_at
    }
    pub fn history(&self) -> &[HistoryEntry] {
        &self.common.history
    }
    /// Where the results go, relative to the output container, once chosen.
    pub fn results_folder(&self) -> Option<&str> {
        self.common.results_folder.as_deref()
    }
    pub fn state(&self) -> &S {
        &self.state
    }
    /// Whether, and by whom, the job was asked to stop.
    pub fn cancel_request(&self) -> Option<CancelRequest> {
        self.common.cancel
    }
    /// The endpoint the job was admitted to; `None`: the first of the pool.
    pub fn openai_endpoint(&self) -> Option<&str> {
        self.common.openai_endpoint.as_deref()
    }
    /// The room its admission reserved, until it waits again.
    pub fn room(&self) -> Option<&HeldRoom> {
        self.common.room.as_ref()
    }

    /// The estimated input tokens of the current round's batch: the input's, or for a
    /// follow-up, the input's share for the requests it resubmits (by count: what its
    /// batch will hold of the quota, which the whole input's figure would overstate).
    pub fn round_tokens(&self) -> Option<u64> {
        let facts = self.common.facts.as_ref()?;
        Some(match self.common.followup_lines {
            Some(lines) if self.common.round > 0 && facts.lines > 0 => {
                let share = u128::from(facts.tokens) * u128::from(lines.min(facts.lines));
                share.div_ceil(u128::from(facts.lines)) as u64
            }
            _ => facts.tokens,
        })
    }

    /// The blob the current round's batch reads: the input, or a follow-up's staged lines.
    pub fn batch_input_url(&self) -> &str {
        self.common
            .followup_url
            .as_deref()
            .unwrap_or(&self.common.input.url)
    }

    /// Where the job's files go: the output container for an input, the staging folder (in
    /// the state container) for a part, whose parent then combines them.
    pub fn output_container<'a>(&self, config: &'a Config) -> &'a str {
        if self.common.part_of.is_some() {
            &config.state_container
        } else {
            &config.output_container
        }
    }

    /// Whether an earlier holder of the claim may have done part of the work.
    pub fn was_taken_over(&self) -> bool {
        self.common
            .history
            .iter()
            .any(|h| h.note.starts_with(TAKEN_OVER))
    }

    fn note(&mut self, at: i64, note: impl Into<String>) {
        self.common.updated_at = at;
        self.common.history.push(HistoryEntry {
            at,
            state: S::NAME,
            note: note.into(),
        });
    }

    /// The same job in another state, made from the one it leaves; the caller notes why.
    fn map_state<T: State>(self, f: impl FnOnce(S) -> T) -> Job<T> {
        Job {
            common: self.common,
            state: f(self.state),
        }
    }
}

/// The states a job can be finished from: every one but `Finished`.
pub trait Unfinished: State + Sized {
    /// What the finished record keeps of this state.
    fn into_finished(self, outcome: Outcome) -> Finished;
}

impl<S: Unfinished> Job<S> {
    /// Notes that the job is to stop; `false` when it already was asked to (the first
    /// request stands, so the summary names who asked first).
    pub fn request_cancel(&mut self, by: CancelledBy, at: i64) -> bool {
        if self.common.cancel.is_some() {
            return false;
        }
        self.common.cancel = Some(CancelRequest { by, at });
        self.note(at, format!("cancel requested ({})", by.as_str()));
        true
    }

    pub fn finish(self, outcome: Outcome, note: &str, at: i64) -> Job<Finished> {
        let mut job = self.map_state(|s| s.into_finished(outcome));
        job.note(at, format!("finished {}: {note}", outcome.as_str()));
        job
    }
}

impl Unfinished for Submitting {
    fn into_finished(self, outcome: Outcome) -> Finished {
        Finished::plain(outcome)
    }
}
impl Unfinished for Queued {
    fn into_finished(self, outcome: Outcome) -> Finished {
        Finished::plain(outcome)
    }
}
impl Unfinished for Running {
    fn into_finished(self, outcome: Outcome) -> Finished {
        Finished {
            batch: Some(self.batch),
            ..Finished::plain(outcome)
        }
    }
}
impl Unfinished for Split {
    fn into_finished(self, outcome: Outcome) -> Finished {
        Finished {
            parts: self.parts,
            ..Finished::plain(outcome)
        }
    }
}
impl Unfinished for Harvesting {
    fn into_finished(self, outcome: Outcome) -> Finished {
        Finished {
            batch: Some(self.batch),
            progress: Some(self.progress),
            ..Finished::plain(outcome)
        }
    }
}
impl Unfinished for Combining {
    fn into_finished(self, outcome: Outcome) -> Finished {
        Finished {
            parts: self.parts,
            progress: Some(self.progress),
            ..Finished::plain(outcome)
        }
    }
}

impl Finished {
    fn plain(outcome: Outcome) -> Self {
        Finished {
            outcome,
            batch: None,
            parts: Vec::new(),
            progress: None,
        }
    }
}

impl Job<Submitting> {
    /// A new job for `input`, claimed by `owner` until `lease_secs` from `at`.
    pub fn claim(input: InputRef, owner: &str, lease_secs: u64, at: i64) -> Self {
        let mut job = Job {
            common: Common {
                key: job_key(&input.name, &input.etag),
                input,
                facts: None,
                part_of: None,
                quota_attempts: 0,
                last_error: None,
                round: 0,
                rounds: Vec::new(),
                followup_url: None,
                followup_lines: None,
                results_folder: None,
                cancel: None,
                openai_endpoint: None,
                room: None,
                created_at: at,
                updated_at: at,
                history: Vec::new(),
            },
            state: Submitting {
                owner: owner.to_string(),
                lease_until: at + lease_secs as i64,
                create: None,
            },
        };
        job.note(at, "claimed");
        job
    }

    /// The job of one part of the split job `parent`, already validated (the whole input
    /// was), reading the staged slice `input`.
    pub fn claim_part(
        parent: &Job<Split>,
        part: &PartRef,
        input: InputRef,
        owner: &str,
        lease_secs: u64,
        at: i64,
    ) -> Self {
        let mut job = Job::claim(input, owner, lease_secs, at);
        job.common.key = part.key.clone();
        job.common.part_of = Some(PartOf {
            parent: parent.common.key.clone(),
            index: part.index,
            line_offset: part.first_line - 1,
        });
        job.common.facts = parent.common.facts.clone().map(|f| InputFacts {
            lines: part.requests,
            tokens: part.tokens,
            ..f
        });
        job.note(
            at,
            format!(
                "part {} of {}: input lines {}–{}",
                part.index,
                parent.common.key,
                part.first_line,
                part.last_line()
            ),
        );
        job
    }

    /// True while the claim is still live: its lease, or a create call that may still be
    /// on its way (nobody may look for its batch, not find it yet, and create another).
    pub fn is_leased(&self, at: i64) -> bool {
        self.state.lease_until > at
            || self
                .state
                .create
                .as_ref()
                .and_then(|c| c.in_flight_until)
                .is_some_and(|l| l > at)
    }

    /// When a create call was sent for this round, if one was: its batch may exist.
    pub fn create_started_at(&self) -> Option<i64> {
        self.state.create.as_ref().map(|c| c.started_at)
    }

    /// Takes over a claim that lapsed (its holder died or gave up).
    pub fn take_over(&mut self, owner: &str, lease_secs: u64, at: i64) {
        let previous = std::mem::replace(&mut self.state.owner, owner.to_string());
        self.state.lease_until = at + lease_secs as i64;
        self.note(at, format!("{TAKEN_OVER} (previous owner {previous})"));
    }

    /// Records what validation learnt; returns it for the create that follows.
    pub fn validated(&mut self, facts: InputFacts, at: i64) -> &InputFacts {
        self.note(
            at,
            format!(
                "validated: {} requests, endpoint {}, model {}",
                facts.lines, facts.endpoint, facts.model
            ),
        );
        self.common.facts.insert(facts)
    }

    /// Notes that a create call is about to be sent. Until `window_secs` have passed the call
    /// may still be on its way, and nobody else may look for its batch (not finding it yet)
    /// and create another: the claim holds at least that long.
    pub fn begin_create(&mut self, lease_secs: u64, window_secs: u64, at: i64) {
        self.state.create = Some(CreateCall {
            started_at: at,
            in_flight_until: Some(at + window_secs as i64),
        });
        self.state.lease_until = at + lease_secs as i64;
        self.note(at, "creating batch");
    }

    /// The service answered the create call (with an error): nothing is on its way any
    /// more, and the next holder may look for its batch at once.
    pub fn create_answered(&mut self) {
        if let Some(create) = &mut self.state.create {
            create.in_flight_until = None;
        }
    }

    /// A transient fault: keep the job as it is but let the next invocation take it at once,
    /// unless a create call may still be on its way (sent, never answered): then the claim
    /// holds until its window ends, for a batch may still appear.
    pub fn release(&mut self, error: &str, at: i64) {
        self.state.lease_until = at;
        self.common.last_error = Some(error.to_string());
        self.note(at, format!("released after a transient fault: {error}"));
    }

    /// The batch exists (created now, or `adopted` from an earlier attempt).
    pub fn submitted(self, batch: &Batch, adopted: bool, at: i64) -> Job<Running> {
        let mut job = self.map_state(|_| Running {
            batch: BatchSeen::of(batch),
            missing: None,
        });
        job.common.last_error = None;
        job.note(
            at,
            if adopted {
                format!("adopted existing batch {}", batch.id)
            } else {
                format!("batch {} created", batch.id)
            },
        );
        job
    }

    /// The input is beyond the limits of one batch: its parts (staged) become jobs of their
    /// own, and this one waits for them.
    pub fn split(self, parts: Vec<PartRef>, at: i64) -> Job<Split> {
        let count = parts.len();
        let mut job = self.map_state(|_| Split { parts });
        job.note(at, format!("split into {count} parts"));
        job
    }
}

/// The states a quota refusal can send to `Queued`: a refused create (`Submitting`), or a
/// batch that failed for quota before it ran (`Running`).
pub trait CanQueue: Unfinished {}
impl CanQueue for Submitting {}
impl CanQueue for Running {}

impl<S: CanQueue> Job<S> {
    /// The quota was full: wait `delay_secs`, then the timer tries again.
    pub fn queue(self, reason: &str, delay_secs: u64, at: i64) -> Job<Queued> {
        let mut job = self.map_state(|_| Queued {
            next_attempt_at: at + delay_secs as i64,
            room: false,
            place: 0,
        });
        job.common.quota_attempts += 1;
        job.common.room = None;
        job.common.last_error = Some(reason.to_string());
        job.note(
            at,
            format!(
                "queued for quota (attempt {}), next try in {delay_secs} s",
                job.common.quota_attempts
            ),
        );
        job
    }
}

impl Job<Submitting> {
    /// No target has room for it now: it waits, `place`-th in line, and is admitted the
    /// moment one has (not a retry: nothing was refused).
    pub fn wait_for_room(self, reason: &str, place: u32, at: i64) -> Job<Queued> {
        let mut job = self.map_state(|_| Queued {
            next_attempt_at: at,
            room: true,
            place,
        });
        job.common.room = None;
        job.common.last_error = Some(reason.to_string());
        job.note(at, format!("waiting for room: {reason}"));
        job
    }

    /// Admitted to `endpoint`, holding `room` there: its batch is created there, and looked
    /// for there.
    pub fn admit_to(&mut self, endpoint: &str, room: HeldRoom) {
        self.common.openai_endpoint = Some(endpoint.to_string());
        self.common.room = Some(room);
    }
}

impl Job<Queued> {
    pub fn next_attempt_at(&self) -> i64 {
        self.state.next_attempt_at
    }

    /// Waits for room (not for a backoff timer).
    pub fn waits_for_room(&self) -> bool {
        self.state.room
    }

    /// Its place in the line, as last counted (0: not counted).
    pub fn place(&self) -> u32 {
        self.state.place
    }

    /// The line moved: `place` is its new place. No history note: a line moves often.
    pub fn set_place(&mut self, place: u32) {
        self.state.place = place;
    }

    /// The wait is over: claim it to try again.
    pub fn take_over(self, owner: &str, lease_secs: u64, at: i64) -> Job<Submitting> {
        let mut job = self.map_state(|_| Submitting {
            owner: owner.to_string(),
            lease_until: at + lease_secs as i64,
            create: None,
        });
        job.note(at, format!("{TAKEN_OVER} after the quota wait"));
        job
    }
}

/// What a look at a running job's batch changed.
pub enum Observed {
    /// Same status and counts as last time: nothing worth a write.
    Unchanged(Job<Running>),
    /// Still running, with news (status or counts).
    Changed(Job<Running>),
    /// The batch ended: its results are harvested next.
    Ended(Job<Harvesting>),
}

impl Job<Running> {
    pub fn batch(&self) -> &BatchSeen {
        &self.state.batch
    }

    /// The looks in a row so far on which the service said the batch does not exist.
    pub fn missing(&self) -> Option<Missing> {
        self.state.missing
    }

    /// The service said the batch does not exist (its own 404, not its gateway's): one more
    /// look in a row. Returns them all; whether they are proof enough is the caller's call.
    pub fn batch_missing(&mut self, at: i64) -> Missing {
        let missing = self.state.missing.get_or_insert(Missing {
            since: at,
            looks: 0,
        });
        missing.looks += 1;
        let missing = *missing;
        self.note(
            at,
            format!(
                "the service says batch {} does not exist (look {} in a row)",
                self.state.batch.id, missing.looks
            ),
        );
        missing
    }

    pub fn observe(mut self, batch: &Batch, at: i64) -> Observed {
        let seen = BatchSeen::of(batch);
        // Seen again: the answers that it did not exist were passing ones.
        if let Some(missing) = self.state.missing.take() {
            self.note(
                at,
                format!(
                    "batch {} answered again after {} look(s) that said it does not exist",
                    batch.id, missing.looks
                ),
            );
            if !batch.status.is_terminal() {
                self.state.batch = seen;
                return Observed::Changed(self);
            }
        }
        if batch.status.is_terminal() {
            let mut job = self.map_state(|_| Harvesting {
                batch: seen,
                progress: HarvestProgress::default(),
                holder: None,
            });
            job.note(at, format!("batch ended: {}", batch.status));
            return Observed::Ended(job);
        }
        if seen == self.state.batch {
            return Observed::Unchanged(self);
        }
        let status_changed = seen.status != self.state.batch.status;
        self.state.batch = seen;
        if status_changed {
            self.note(at, format!("batch status {}", batch.status));
        }
        Observed::Changed(self)
    }
}

impl Job<Split> {
    pub fn parts(&self) -> &[PartRef] {
        &self.state.parts
    }

    /// Every part has finished: their results are combined next.
    pub fn parts_finished(self, at: i64) -> Job<Combining> {
        let mut job = self.map_state(|s| Combining {
            parts: s.parts,
            progress: HarvestProgress::default(),
            holder: None,
        });
        job.note(at, "every part finished; combining their results");
        job
    }
}

impl Job<Combining> {
    pub fn parts(&self) -> &[PartRef] {
        &self.state.parts
    }
}

/// The two states that move results into an output folder, step by recorded step, held by
/// one invocation at a time.
pub trait MovesResults: State + Leased {
    fn progress(&self) -> &HarvestProgress;
    fn progress_mut(&mut self) -> &mut HarvestProgress;
    fn holder(&self) -> Option<&Holder>;
    fn holder_mut(&mut self) -> &mut Option<Holder>;
}

impl MovesResults for Harvesting {
    fn progress(&self) -> &HarvestProgress {
        &self.progress
    }
    fn progress_mut(&mut self) -> &mut HarvestProgress {
        &mut self.progress
    }
    fn holder(&self) -> Option<&Holder> {
        self.holder.as_ref()
    }
    fn holder_mut(&mut self) -> &mut Option<Holder> {
        &mut self.holder
    }
}

impl MovesResults for Combining {
    fn progress(&self) -> &HarvestProgress {
        &self.progress
    }
    fn progress_mut(&mut self) -> &mut HarvestProgress {
        &mut self.progress
    }
    fn holder(&self) -> Option<&Holder> {
        self.holder.as_ref()
    }
    fn holder_mut(&mut self) -> &mut Option<Holder> {
        &mut self.holder
    }
}

/// The states one invocation holds under a lease while it works: an intake's claim, a
/// harvest's holder. The holder renews the lease while it works (`lease::holding`), so that
/// nobody takes over from a live holder.
pub trait Leased: State {
    fn lease_until_mut(&mut self) -> Option<&mut i64>;
}

impl Leased for Submitting {
    fn lease_until_mut(&mut self) -> Option<&mut i64> {
        Some(&mut self.lease_until)
    }
}
impl Leased for Harvesting {
    fn lease_until_mut(&mut self) -> Option<&mut i64> {
        self.holder.as_mut().map(|h| &mut h.until)
    }
}
impl Leased for Combining {
    fn lease_until_mut(&mut self) -> Option<&mut i64> {
        self.holder.as_mut().map(|h| &mut h.until)
    }
}

impl<S: Leased> Job<S> {
    /// Extends the lease of a holder that is still at work (a long validation, staging or
    /// merge), so that nobody takes over from a live holder; a dead holder renews nothing
    /// and its lease lapses. Never shortens it (a create window may run longer).
    pub fn renew(&mut self, lease_secs: u64, at: i64) {
        if let Some(until) = self.state.lease_until_mut() {
            *until = (*until).max(at + lease_secs as i64);
        }
    }
}

impl<S: MovesResults> Job<S> {
    pub fn progress(&self) -> &HarvestProgress {
        self.state.progress()
    }
    /// Marks harvest steps done; the caller writes the record before going on.
    pub fn progress_mut(&mut self) -> &mut HarvestProgress {
        self.state.progress_mut()
    }
    /// Chosen once, at the first harvest step; kept for follow-up rounds.
    pub fn choose_results_folder(&mut self, folder: String) {
        self.common.results_folder = Some(folder);
    }
    /// The invocation moving this job's results right now, if its lease is live.
    pub fn held_by(&self, at: i64) -> Option<&str> {
        self.state
            .holder()
            .filter(|h| h.until > at)
            .map(|h| h.owner.as_str())
    }
    /// Takes the job to move its results, for `lease_secs`; the caller writes the record
    /// (with `If-Match`) before touching the folder, and goes on only if that write wins.
    pub fn hold(&mut self, owner: &str, lease_secs: u64, at: i64) {
        let previous = self.state.holder_mut().replace(Holder {
            owner: owner.to_string(),
            until: at + lease_secs as i64,
        });
        // A lapsed holder that never finished: it died, or lost the record. Worth a line
        // in the history; a first hold is not.
        if let Some(p) = previous {
            self.note(at, format!("{TAKEN_OVER} (previous holder {})", p.owner));
        }
    }
}

impl Job<Harvesting> {
    pub fn batch(&self) -> &BatchSeen {
        &self.state.batch
    }

    /// The batch ended with requests unanswered: a follow-up batch takes them, under a fresh
    /// claim, reading `staged_url`.
    pub fn follow_up(
        mut self,
        staged_url: String,
        lines: u64,
        owner: &str,
        lease_secs: u64,
        at: i64,
    ) -> Job<Submitting> {
        let batch = &self.state.batch;
        self.common.rounds.push(RoundRecord {
            batch_id: batch.id.clone(),
            status: batch.status.to_string(),
            request_counts: batch.request_counts.clone(),
        });
        let mut job = self.map_state(|_| Submitting {
            owner: owner.to_string(),
            lease_until: at + lease_secs as i64,
            create: None,
        });
        job.common.round += 1;
        job.common.followup_url = Some(staged_url);
        job.common.followup_lines = Some(lines);
        job.note(
            at,
            format!(
                "follow-up round {}: resubmitting {lines} unanswered request(s)",
                job.common.round
            ),
        );
        job
    }
}

/// A record as loaded, in whichever state it is; the caller matches to get the typed job.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyJob {
    Submitting(Job<Submitting>),
    Queued(Job<Queued>),
    Running(Job<Running>),
    Split(Job<Split>),
    Harvesting(Job<Harvesting>),
    Combining(Job<Combining>),
    Finished(Job<Finished>),
}

impl AnyJob {
    pub fn key(&self) -> &str {
        match self {
            AnyJob::Submitting(j) => j.key(),
            AnyJob::Queued(j) => j.key(),
            AnyJob::Running(j) => j.key(),
            AnyJob::Split(j) => j.key(),
            AnyJob::Harvesting(j) => j.key(),
            AnyJob::Combining(j) => j.key(),
            AnyJob::Finished(j) => j.key(),
        }
    }

    /// The state's name, as the record stores it.
    pub fn state(&self) -> JobState {
        match self {
            AnyJob::Submitting(_) => JobState::Submitting,
            AnyJob::Queued(_) => JobState::Queued,
            AnyJob::Running(_) => JobState::Running,
            AnyJob::Split(_) => JobState::Split,
            AnyJob::Harvesting(_) | AnyJob::Combining(_) => JobState::Harvesting,
            AnyJob::Finished(_) => JobState::Finished,
        }
    }

    fn common(&self) -> &Common {
        match self {
            AnyJob::Submitting(j) => &j.common,
            AnyJob::Queued(j) => &j.common,
            AnyJob::Running(j) => &j.common,
            AnyJob::Split(j) => &j.common,
            AnyJob::Harvesting(j) => &j.common,
            AnyJob::Combining(j) => &j.common,
            AnyJob::Finished(j) => &j.common,
        }
    }

    pub fn input(&self) -> &InputRef {
        &self.common().input
    }
    pub fn facts(&self) -> Option<&InputFacts> {
        self.common().facts.as_ref()
    }
    pub fn part_of(&self) -> Option<&PartOf> {
        self.common().part_of.as_ref()
    }
    pub fn created_at(&self) -> i64 {
        self.common().created_at
    }
    pub fn updated_at(&self) -> i64 {
        self.common().updated_at
    }
    pub fn history(&self) -> &[HistoryEntry] {
        &self.common().history
    }
    pub fn round(&self) -> u32 {
        self.common().round
    }
    pub fn results_folder(&self) -> Option<&str> {
        self.common().results_folder.as_deref()
    }
    pub fn last_error(&self) -> Option<&str> {
        self.common().last_error.as_deref()
    }
    pub fn cancel_request(&self) -> Option<CancelRequest> {
        self.common().cancel
    }

    /// The batch as last seen, for a job that has one now (running or harvesting) or had
    /// one (finished).
    pub fn batch(&self) -> Option<&BatchSeen> {
        match self {
            AnyJob::Running(j) => Some(&j.state.batch),
            AnyJob::Harvesting(j) => Some(&j.state.batch),
            AnyJob::Finished(j) => j.state.batch.as_ref(),
            _ => None,
        }
    }

    /// A split job's parts.
    pub fn parts(&self) -> &[PartRef] {
        match self {
            AnyJob::Split(j) => &j.state.parts,
            AnyJob::Combining(j) => &j.state.parts,
            AnyJob::Finished(j) => &j.state.parts,
            _ => &[],
        }
    }

    /// The job's current (or last) batch, where it has one.
    pub fn batch_id(&self) -> Option<&str> {
        match self {
            AnyJob::Running(j) => Some(&j.state.batch.id),
            AnyJob::Harvesting(j) => Some(&j.state.batch.id),
            AnyJob::Finished(j) => j.state.batch.as_ref().map(|b| b.id.as_str()),
            _ => None,
        }
    }
}

macro_rules! into_any {
    ($($state:ident),*) => {$(
        impl From<Job<$state>> for AnyJob {
            fn from(job: Job<$state>) -> Self {
                AnyJob::$state(job)
            }
        }
    )*};
}
into_any!(
    Submitting, Queued, Running, Split, Harvesting, Combining, Finished
);

impl Job<Finished> {
    pub fn outcome(&self) -> Outcome {
        self.state.outcome
    }
    /// A split input's parts.
    pub fn parts(&self) -> &[PartRef] {
        &self.state.parts
    }
    /// The last batch, for a job that had one.
    pub fn batch(&self) -> Option<&BatchSeen> {
        self.state.batch.as_ref()
    }
    /// Every batch the job had, oldest first: earlier rounds', then the last.
    pub fn batch_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .common
            .rounds
            .iter()
            .map(|r| r.batch_id.clone())
            .collect();
        ids.extend(self.state.batch.as_ref().map(|b| b.id.clone()));
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_800_000_000;

    pub(crate) fn input() -> InputRef {
        InputRef {
            container: "batch-input".into(),
            name: "dir/test.jsonl".into(),
            etag: "\"0x8D4\"".into(),
            size: 10,
            url: "https://a.blob.core.windows.net/batch-input/dir/test.jsonl".into(),
        }
    }

    fn batch(status: &str) -> Batch {
        serde_json::from_value(serde_json::json!({"id": "batch_1", "status": status})).unwrap()
    }

    fn facts(lines: u64) -> InputFacts {
        InputFacts {
            lines,
            endpoint: "/chat/completions".into(),
            model: "m".into(),
            tokens: 0,
        }
    }

    #[test]
    fn the_happy_path_in_order() {
        let mut r = Job::claim(input(), "me", 60, T);
        assert_eq!(input().output_path(), "dir/test");
        assert!(r.is_leased(T));
        r.validated(facts(3), T);
        r.begin_create(60, 120, T);
        let r = r.submitted(&batch("validating"), false, T + 1);
        assert_eq!(r.batch().status, BatchStatus::Validating);
        let Observed::Changed(r) = r.observe(&batch("in_progress"), T + 2) else {
            panic!("a new status is news")
        };
        let Observed::Unchanged(r) = r.observe(&batch("in_progress"), T + 3) else {
            panic!("the same status and counts are not")
        };
        let Observed::Ended(r) = r.observe(&batch("completed"), T + 4) else {
            panic!("completed is an end")
        };
        assert_eq!(r.batch().status, BatchStatus::Completed);
        let r = r.finish(Outcome::Completed, "results in place", T + 5);
        assert_eq!(r.outcome(), Outcome::Completed);
        assert_eq!(r.batch_ids(), ["batch_1"]);
        assert_eq!(r.updated_at(), T + 5);
        let states: Vec<JobState> = r.history().iter().map(|h| h.state).collect();
        assert_eq!(
            states.first().copied(),
            Some(JobState::Submitting),
            "history names the state each step happened in"
        );
        assert_eq!(states.last().copied(), Some(JobState::Finished));
    }

    #[test]
    fn looks_that_deny_the_batch_count_in_a_row_and_survive_the_record() {
        let mut r = Job::claim(input(), "me", 60, T);
        r.begin_create(60, 120, T);
        let mut r = r.submitted(&batch("in_progress"), false, T);
        assert_eq!(r.missing(), None);
        assert_eq!(r.batch_missing(T + 300).looks, 1);
        let m = r.batch_missing(T + 600);
        assert_eq!((m.since, m.looks), (T + 300, 2));
        // Written and read back as the record does.
        let text = serde_json::to_string(&r).unwrap();
        let AnyJob::Running(mut r) = serde_json::from_str(&text).unwrap() else {
            panic!("running")
        };
        assert_eq!(r.missing(), Some(m));
        // Seen again: the count starts over, and that is news to write.
        let Observed::Changed(r2) = r.clone().observe(&batch("in_progress"), T + 900) else {
            panic!("forgetting the looks must be written")
        };
        assert_eq!(r2.missing(), None);
        assert!(
            !serde_json::to_string(&r2)
                .unwrap()
                .contains("batch_missing")
        );
        assert_eq!(r.batch_missing(T + 900).looks, 3);
    }

    #[test]
    fn a_renewed_claim_stays_held_while_its_holder_works() {
        let mut r = Job::claim(input(), "me", 300, T);
        assert!(!r.is_leased(T + 400), "a 300 s lease lapses");
        r.renew(300, T + 200);
        assert!(r.is_leased(T + 400), "renewed at T+200 for 300 s");
        assert!(!r.is_leased(T + 500));
        r.renew(10, T + 201);
        assert!(r.is_leased(T + 400), "a renewal never shortens the claim");
    }

    #[test]
    fn a_create_in_flight_holds_the_claim_past_its_lease() {
        let mut r = Job::claim(input(), "me", 2, T);
        r.begin_create(2, 120, T);
        assert!(r.is_leased(T + 60), "the create may still be on its way");
        assert!(!r.is_leased(T + 121));
        r.release("no answer", T + 1);
        assert!(
            r.is_leased(T + 60),
            "an unanswered create may still make a batch: the claim holds"
        );
        r.create_answered();
        r.release("HTTP 500", T + 61);
        assert!(
            !r.is_leased(T + 62),
            "an answered create frees the claim at once"
        );
        assert_eq!(
            r.create_started_at(),
            Some(T),
            "but its batch is looked for"
        );
    }

    #[test]
    fn a_split_job_waits_for_its_parts_then_combines() {
        let mut r = Job::claim(input(), "me", 60, T);
        r.validated(facts(25), T);
        let part = PartRef {
            index: 2,
            key: format!("{}/part-0002", r.key()),
            blob: "staging/x/part-0002.jsonl".into(),
            etag: "\"0x9\"".into(),
            first_line: 11,
            requests: 10,
            bytes: 100,
            tokens: 0,
        };
        let r = r.split(vec![part.clone()], T);
        assert_eq!(r.parts(), std::slice::from_ref(&part));

        let mut staged = input();
        staged.name = part.blob.clone();
        let child = Job::claim_part(&r, &part, staged, "me", 60, T);
        assert_eq!(child.key(), part.key);
        assert_eq!(child.part_of().unwrap().line_offset, 10);
        assert_eq!(child.facts().unwrap().lines, 10);
        assert_eq!(child.facts().unwrap().model, "m");
        assert_eq!(part.folder(), "staging/x/part-0002");

        let r = r.parts_finished(T + 1);
        assert!(r.results_folder().is_none());
        let r = r.finish(Outcome::Completed, "combined", T + 2);
        assert_eq!(r.state().parts.len(), 1);
    }

    #[test]
    fn queue_then_take_over_counts_attempts_and_forgets_the_refused_create() {
        let mut r = Job::claim(input(), "me", 60, T);
        r.begin_create(60, 120, T);
        let r = r.queue("token_limit_exceeded", 30, T);
        assert_eq!(r.quota_attempts(), 1);
        assert_eq!(r.next_attempt_at(), T + 30);
        let mut r = r.take_over("timer", 60, T + 30);
        assert!(
            r.create_started_at().is_none(),
            "a refused create made no batch"
        );
        assert!(r.is_leased(T + 30));
        assert!(r.was_taken_over());
        r.release("HTTP 503", T + 31);
        assert!(!r.is_leased(T + 32));
        assert_eq!(r.last_error(), Some("HTTP 503"));
    }

    #[test]
    fn a_follow_up_round_keeps_the_first_batch_and_reads_the_staged_lines() {
        let mut r = Job::claim(input(), "me", 60, T);
        r.validated(facts(3), T);
        r.begin_create(60, 120, T);
        let r = r.submitted(&batch("in_progress"), false, T);
        let Observed::Ended(mut r) = r.observe(&batch("expired"), T + 1) else {
            panic!("expired is an end")
        };
        r.choose_results_folder("dir/test/superseded/0x8D4".into());
        let r = r.follow_up("https://x/staged.jsonl".into(), 2, "me", 60, T + 2);
        assert_eq!(
            r.results_folder(),
            Some("dir/test/superseded/0x8D4"),
            "the next round's results join the first round's folder"
        );
        assert_eq!(r.round(), 1);
        assert_eq!(r.batch_input_url(), "https://x/staged.jsonl");
        assert_eq!(r.rounds()[0].batch_id, "batch_1");
        assert_eq!(r.rounds()[0].status, "expired");
        assert!(r.create_started_at().is_none());
    }
}
