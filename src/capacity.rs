//! Admission: which target (an endpoint of the pool and the deployment the input names) has
//! room for a job's enqueued tokens, and the reservation that holds that room.
//!
//! Each target has a ledger blob in the state container, `capacity/{target}.json`: its limit
//! and where the limit came from, the service's scale of our estimate, and what we hold. A
//! reservation is taken, with an `If-Match` write, before the create call, and released when
//! the batch ends (harvest) or the create is refused. Two instances that both see the last
//! room both try to write the ledger they read; storage lets only one of the two writes
//! through (412 for the other), and the loser reads again and finds no room. So the ledger,
//! not a timer, says when a job may go.
//!
//! What we hold is not one entry per job: every intake rewrites the ledger, and with
//! thousands of batches running a list of them all made each write a megabyte (BENCHMARKS.md,
//! run L). A reservation is listed (`reservations`, by job key, with an id) only from its
//! admission until a tick has seen its job hold it: the job's record keeps the room it holds
//! (`jobs::HeldRoom`) and the job index shows it, so the tick that lists `active/` counts
//! every target's held tokens from that listing into one sum (`settled`, by [`settle`]) and
//! drops those entries. A release or refusal of a room is noted by id (`released`) until a
//! listing no longer shows a job holding it, so a room is never subtracted twice nor counted
//! again by a listing taken just before it was released:
//! held = settled − released rooms that `settled` counts + listed reservations.
//!
//! What is known of a target's room, best first: the service's own figure
//! (`deployment-maximum-enqueued-tokens` on a create answer), the operator's
//! `BATCH_ENQUEUED_TOKEN_LIMIT`, a limit learnt from a refusal. While none is known, one
//! create at a time goes to the target, so a burst of arrivals is not a burst of refusals;
//! the first answer tells the limit.
//!
//! Our estimate of one file and the service's differ by more than the scale says: the scale
//! is the service's count over ours summed over the batches it answered, and one file's own
//! ratio is off from it by a percent or two (its words, the tokenizer's luck). A job that
//! misses the room by less than [`EDGE_MARGIN`] of its own tokens may well fit, and only the
//! service can tell: it is tried (an edge try, one at a time per target, once every create
//! there is answered), and a refusal of it says only that this job did not fit now, not that
//! the limit is lower; it goes back to its place in line, with no backoff, and no edge try goes
//! to that target again until some of what we hold there is released. Without it, a backlog
//! of files that fill the quota exactly by the service's count left a file's worth of the
//! quota idle whenever the estimate ran a little high.
//!
//! A holder that dies leaves its reservation behind: the tick drops listed reservations whose
//! job is no longer active, and recounts `settled` from the jobs that are ([`settle`]), so
//! none leaks for longer than a tick.
//!
//! Below the workflows (`submit`, `poll`, `harvest` call it); it calls none of them.

use std::collections::{BTreeMap, HashMap, HashSet};

use bytes::Bytes;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::{
    app::App,
    jobs::{HeldRoom, RoomHeld},
    openai::Quota,
    storage::{StorageError, WriteCondition},
};

/// Where the ledgers live in the state container.
pub const LEDGER_PREFIX: &str = "capacity/";

/// Ledger writes lost to another writer before an admission gives up for now (the job then
/// waits as if there were no room, and the next tick tries again).
const MAX_RACES: u32 = 40;

/// A reservation younger than this is never taken for stale: the job that holds it may have
/// been claimed after the tick listed the active jobs.
const STALE_AFTER_SECS: i64 = 120;

/// How far, as a share of a job's own tokens, the room may seem short of it and the job still
/// be tried at the edge (see the module's notes).
const EDGE_MARGIN: f64 = 0.05;

/// Where a target's limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitSource {
    /// `deployment-maximum-enqueued-tokens` on a create answer.
    Header,
    /// `BATCH_ENQUEUED_TOKEN_LIMIT`.
    Setting,
    /// A refusal the model did not predict: what was held then.
    Refusal,
}

/// One target's ledger, as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub endpoint: String,
    pub deployment: String,
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub limit_source: Option<LimitSource>,
    /// The service's count over ours, at its last answer (`deployment-enqueued-tokens` over
    /// the tokens of our answered reservations): the service estimates by characters, we by
    /// the tokenizer, and other users of the deployment count too. Our figures are scaled by
    /// it before they are held against the limit, so what we admit is what the service will
    /// count. 1 until an answer tells it.
    #[serde(default)]
    pub scale: Option<f64>,
    /// The service's `deployment-enqueued-tokens` at its last answer.
    #[serde(default)]
    pub service_enqueued: Option<u64>,
    /// Reservations not yet counted into `settled`, by job key.
    #[serde(default)]
    pub reservations: BTreeMap<String, Reservation>,
    /// The tokens of the rooms the active jobs' index showed them holding at the last
    /// [`settle`] (every one answered).
    #[serde(default)]
    pub settled: u64,
    /// Rooms given back (released or refused) since, by `{job key}#{room id}`, until no
    /// listing shows a job holding them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub released: BTreeMap<String, Released>,
    /// What we held (scaled) when an edge try was refused: no other goes until we hold less.
    #[serde(default)]
    pub edge_refused_at: Option<u64>,
    #[serde(default)]
    pub updated_at: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reservation {
    pub tokens: u64,
    pub at: i64,
    /// The create call got its answer (while not, the limit may still be unknown).
    #[serde(default)]
    pub answered: bool,
    /// Taken at the edge: the room seemed a little short of it (see the module's notes).
    #[serde(default)]
    pub edge: bool,
    /// The room's id, which the job's record and index carry; empty in ledgers written
    /// before ids existed (such a reservation stays listed until released).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
}

/// A room given back since the last [`settle`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    pub tokens: u64,
    /// `settled` counts it (the room was settled when given back, or a listing taken before
    /// it was given back showed it held): it is subtracted from what is held.
    pub counted: bool,
    /// When it was given back.
    #[serde(default)]
    pub at: i64,
}

fn released_key(key: &str, id: &str) -> String {
    format!("{key}#{id}")
}

impl Ledger {
    /// Our tokens held at this target: settled, less what was given back of it, and what is
    /// reserved since.
    pub fn held(&self) -> u64 {
        self.settled_held() + self.reservations.values().map(|r| r.tokens).sum::<u64>()
    }

    /// The settled rooms still held: all answered creates.
    fn settled_held(&self) -> u64 {
        let given_back: u64 = self
            .released
            .values()
            .filter(|r| r.counted)
            .map(|r| r.tokens)
            .sum();
        self.settled.saturating_sub(given_back)
    }

    /// Nothing of ours is held here.
    fn holds_nothing(&self) -> bool {
        self.reservations.is_empty() && self.settled_held() == 0
    }

    /// Gives back job `key`'s room: its listed reservation, or (`settled_id`) the settled
    /// room of that id. Noted by id either way, so that a listing taken before this does not
    /// count it again, and a second release of it changes nothing. Returns whether anything
    /// was given back.
    fn give_back(&mut self, key: &str, settled_id: Option<&HeldRoom>, at: i64) -> bool {
        if let Some(r) = self.reservations.remove(key) {
            if !r.id.is_empty() {
                self.released.insert(
                    released_key(key, &r.id),
                    Released {
                        tokens: r.tokens,
                        counted: false,
                        at,
                    },
                );
            }
            return true;
        }
        let Some(room) = settled_id.filter(|r| !r.id.is_empty()) else {
            return false;
        };
        let k = released_key(key, &room.id);
        if self.released.contains_key(&k) {
            return false;
        }
        self.released.insert(
            k,
            Released {
                tokens: room.tokens,
                counted: true,
                at,
            },
        );
        true
    }

    fn scale(&self) -> f64 {
        self.scale
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(1.0)
    }

    /// What the service would count for `tokens` of ours.
    fn scaled(&self, tokens: u64) -> u64 {
        (tokens as f64 * self.scale()).ceil() as u64
    }

    fn limit_or(&self, setting: Option<u64>) -> Option<(u64, LimitSource)> {
        match (self.limit, self.limit_source) {
            (Some(l), Some(s)) => Some((l, s)),
            (Some(l), None) => Some((l, LimitSource::Header)),
            _ => setting.map(|l| (l, LimitSource::Setting)),
        }
    }

    /// Whether `tokens` more fit now. A target holding nothing of ours always lets one job
    /// try, whatever the model says: only the service can say that a job alone is too big,
    /// and a job must never wait for room that cannot come.
    ///
    /// `lost_before`: a create not answered by then never will be (its holder died; whoever
    /// takes its job over adopts or creates its batch): it no longer holds up the others.
    fn fits(&self, tokens: u64, setting: Option<u64>, lost_before: i64) -> bool {
        if self.holds_nothing() {
            return true;
        }
        match self.limit_or(setting) {
            // Unknown limit: one create in flight at a time, until an answer tells it.
            None => self
                .reservations
                .values()
                .all(|r| r.answered || r.at < lost_before),
            Some((limit, _)) => self.scaled(self.held() + tokens) <= limit,
        }
    }

    /// Whether `tokens` more miss the room by so little that only the service can tell:
    /// worth an edge try, if none is under way and every create here is answered (so what
    /// is held is what the service counts) and the last edge try was not refused at this
    /// level or a lower one.
    fn at_edge(&self, tokens: u64, setting: Option<u64>) -> bool {
        let Some((limit, _)) = self.limit_or(setting) else {
            return false;
        };
        if self.scale.is_none() || self.reservations.values().any(|r| !r.answered) {
            return false;
        }
        let held = self.scaled(self.held());
        if self.edge_refused_at.is_some_and(|at| held >= at) {
            return false;
        }
        let want = self.scaled(tokens);
        held + want > limit && held + (want as f64 * (1.0 - EDGE_MARGIN)) as u64 <= limit
    }

    /// How full it is: what is held (ours and others') over the limit. Unknown: empty if
    /// nothing of ours is held, else full (it is tried after those that say they have room).
    fn load(&self, setting: Option<u64>) -> f64 {
        match self.limit_or(setting) {
            Some((limit, _)) if limit > 0 => self.scaled(self.held()) as f64 / limit as f64,
            _ if self.holds_nothing() => 0.0,
            _ => 1.0,
        }
    }
}

/// What admission decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Room was reserved (or already held) at this endpoint: the job's record keeps `room`.
    Admitted { endpoint: String, room: HeldRoom },
    /// No target has room now; the sentence says what it waits for.
    NoRoom { reason: String },
}

/// A ledger's blob name: the endpoint's host, port and path and the deployment, made safe.
pub fn ledger_name(endpoint: &str, deployment: &str) -> String {
    let trimmed = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest)
        .trim_end_matches('/');
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!(
        "{LEDGER_PREFIX}{}--{}.json",
        safe(trimmed),
        safe(deployment)
    )
}

/// The ledger of a target, and its ETag (`None`: not written yet).
async fn read(
    app: &App,
    endpoint: &str,
    deployment: &str,
) -> Result<(Ledger, Option<String>), StorageError> {
    let name = ledger_name(endpoint, deployment);
    match app.store.read(&app.config.state_container, &name).await? {
        None => Ok((
            Ledger {
                endpoint: endpoint.to_string(),
                deployment: deployment.to_string(),
                ..Ledger::default()
            },
            None,
        )),
        Some((bytes, etag)) => {
            let ledger = serde_json::from_slice(&bytes).map_err(|e| StorageError::Failed {
                op: "read",
                target: format!("{}/{name}", app.config.state_container),
                message: format!(
                    "the capacity ledger is not valid JSON ({e}); delete it and it is rebuilt"
                ),
            })?;
            Ok((ledger, Some(etag)))
        }
    }
}

/// Writes a ledger only if it is still the version read; `Ok(false)` when someone wrote first.
async fn write(app: &App, ledger: &mut Ledger, etag: Option<&str>) -> Result<bool, StorageError> {
    ledger.updated_at = app.now();
    let name = ledger_name(&ledger.endpoint, &ledger.deployment);
    let body = serde_json::to_vec_pretty(ledger).expect("a ledger serializes");
    let condition = match etag {
        Some(e) => WriteCondition::IfMatch(e.to_string()),
        None => WriteCondition::IfNotExists,
    };
    match app
        .store
        .write(
            &app.config.state_container,
            &name,
            Bytes::from(body),
            condition,
            "application/json",
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(StorageError::ConditionNotMet { .. }) | Err(StorageError::AlreadyExists { .. }) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Changes a ledger with `change` until the write goes through (re-reading after each lost
/// race). `change` returns `false` to leave it as it is.
async fn update<T>(
    app: &App,
    endpoint: &str,
    deployment: &str,
    mut change: impl FnMut(&mut Ledger) -> (bool, T),
) -> Result<T, StorageError> {
    let _turn = app.ledger_locks.lock(deployment).await;
    for _ in 0..MAX_RACES {
        let (mut ledger, etag) = read(app, endpoint, deployment).await?;
        let (changed, out) = change(&mut ledger);
        if !changed || write(app, &mut ledger, etag.as_deref()).await? {
            return Ok(out);
        }
        race_pause().await;
    }
    Err(busy(endpoint, deployment))
}

fn busy(endpoint: &str, deployment: &str) -> StorageError {
    StorageError::Transient {
        op: "reserve",
        target: ledger_name(endpoint, deployment),
        message: format!(
            "{MAX_RACES} writes of the capacity ledger of deployment {deployment} at {endpoint} \
             lost to other writers in a row; tried again later"
        ),
    }
}

/// Before this time, a create that got no answer never will: its in-flight window
/// (`BATCH_CREATE_TIMEOUT_SECONDS`) is over.
fn lost_before(app: &App) -> i64 {
    app.now() - app.config.create_timeout.as_secs() as i64
}

/// A new room's id: random, so that a job's rooms of different rounds or admissions never
/// share one (64 bits: unique among a job's few rooms by a wide margin).
fn room_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}

/// A short random pause after a lost race, so racing writers spread out.
async fn race_pause() {
    use rand::Rng;
    let ms = rand::rng().random_range(5..40);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

/// Reserves `tokens` for job `key` at the target with room that would finish it first (the
/// least loaded, relative to its limit), deployment `deployment`. A job that already holds a
/// reservation (a retry after a crash) keeps it.
pub async fn reserve(
    app: &App,
    key: &str,
    deployment: &str,
    tokens: u64,
) -> Result<Admission, StorageError> {
    let setting = app.config.enqueued_token_limit;
    let endpoints: Vec<String> = app.pool.iter().map(|c| c.endpoint().to_string()).collect();
    // Every target of the deployment is read and one written: one reservation at a time.
    let _turn = app.ledger_locks.lock(deployment).await;
    for _ in 0..MAX_RACES {
        let mut ledgers = Vec::with_capacity(endpoints.len());
        for endpoint in &endpoints {
            let (ledger, etag) = read(app, endpoint, deployment).await?;
            if let Some(r) = ledger.reservations.get(key) {
                return Ok(Admission::Admitted {
                    endpoint: endpoint.clone(),
                    room: HeldRoom {
                        id: r.id.clone(),
                        tokens: r.tokens,
                    },
                });
            }
            ledgers.push((ledger, etag));
        }
        let lost_before = lost_before(app);
        let mut open: Vec<usize> = (0..ledgers.len())
            .filter(|&i| ledgers[i].0.fits(tokens, setting, lost_before))
            .collect();
        let edge = open.is_empty();
        if edge {
            open = (0..ledgers.len())
                .filter(|&i| ledgers[i].0.at_edge(tokens, setting))
                .collect();
        }
        if open.is_empty() {
            return Ok(Admission::NoRoom {
                reason: no_room(&ledgers, tokens, setting),
            });
        }
        // Stable: on equal load, the pool's order.
        open.sort_by(|&a, &b| {
            ledgers[a]
                .0
                .load(setting)
                .total_cmp(&ledgers[b].0.load(setting))
        });
        let best = open[0];
        let (ledger, etag) = &mut ledgers[best];
        let room = HeldRoom {
            id: room_id(),
            tokens,
        };
        ledger.reservations.insert(
            key.to_string(),
            Reservation {
                tokens,
                at: app.now(),
                answered: false,
                edge,
                id: room.id.clone(),
            },
        );
        if write(app, ledger, etag.as_deref()).await? {
            return Ok(Admission::Admitted {
                endpoint: endpoints[best].clone(),
                room,
            });
        }
        // Another writer came first: everything read may be stale now.
        race_pause().await;
    }
    Err(busy(&endpoints.join(","), deployment))
}

/// Whether some target has room for `tokens` now, without reserving it: the tick's look
/// before it takes a waiting job out of the line.
pub async fn room_for(app: &App, deployment: &str, tokens: u64) -> Result<bool, StorageError> {
    for client in &app.pool {
        let (ledger, _) = read(app, client.endpoint().as_str(), deployment).await?;
        let setting = app.config.enqueued_token_limit;
        if ledger.fits(tokens, setting, lost_before(app)) || ledger.at_edge(tokens, setting) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The targets' room, read once per deployment for a whole admission pass: whether a queued
/// job fits somewhere is then answered without a storage call per job. A snapshot: the
/// moment anyone reserves it may be stale, so a "fits" is only a reason to try (`reserve`
/// decides, under the ledger's ETag) and a "does not fit" waits for the next pass; after
/// this pass admits a job, [`Rooms::forget`] drops what it read.
#[derive(Default)]
pub struct Rooms {
    ledgers: std::collections::HashMap<String, Vec<Ledger>>,
}

impl Rooms {
    pub async fn fits(
        &mut self,
        app: &App,
        deployment: &str,
        tokens: u64,
    ) -> Result<bool, StorageError> {
        if !self.ledgers.contains_key(deployment) {
            let mut read_now = Vec::with_capacity(app.pool.len());
            for client in &app.pool {
                read_now.push(read(app, client.endpoint().as_str(), deployment).await?.0);
            }
            self.ledgers.insert(deployment.to_string(), read_now);
        }
        let (lost, setting) = (lost_before(app), app.config.enqueued_token_limit);
        // As `room_for` answers: room, or close enough for an edge try.
        Ok(self.ledgers[deployment]
            .iter()
            .any(|l| l.fits(tokens, setting, lost) || l.at_edge(tokens, setting)))
    }

    pub fn forget(&mut self) {
        self.ledgers.clear();
    }
}

/// The most of our estimated tokens any one target of deployment `deployment` could hold
/// (its limit over the service's scale), where some target's limit is known: a file above it
/// could never be admitted whole, and is split into parts that fit (issue 15, item 5).
pub async fn largest_room(app: &App, deployment: &str) -> Result<Option<u64>, StorageError> {
    let mut largest = None;
    for client in &app.pool {
        let (ledger, _) = read(app, client.endpoint().as_str(), deployment).await?;
        if let Some((limit, _)) = ledger.limit_or(app.config.enqueued_token_limit) {
            let room = (limit as f64 / ledger.scale()).floor() as u64;
            largest = Some(largest.map_or(room, |l: u64| l.max(room)));
        }
    }
    Ok(largest)
}

/// The sentence for a job that fits nowhere: what every target holds.
fn no_room(ledgers: &[(Ledger, Option<String>)], tokens: u64, setting: Option<u64>) -> String {
    let each: Vec<String> = ledgers
        .iter()
        .map(|(l, _)| match l.limit_or(setting) {
            Some((limit, source)) => format!(
                "{} holds {} of {limit} (limit from the {}{})",
                l.endpoint,
                l.scaled(l.held()),
                match source {
                    LimitSource::Header => "service",
                    LimitSource::Setting => "setting",
                    LimitSource::Refusal => "last refusal",
                },
                if (l.scale() - 1.0).abs() > 0.005 {
                    format!("; the service counts {:.2}× our estimate", l.scale())
                } else {
                    String::new()
                }
            ),
            None => format!(
                "{} has a create under way and its limit is not known yet",
                l.endpoint
            ),
        })
        .collect();
    format!(
        "room for {tokens} tokens in the enqueued-token quota of deployment {}: {}",
        ledgers.first().map_or("", |(l, _)| l.deployment.as_str()),
        each.join("; ")
    )
}

/// The create at `endpoint` was answered: the reservation stands, and the quota headers
/// tell the target's limit and the service's own count.
pub async fn answered(
    app: &App,
    endpoint: &str,
    deployment: &str,
    key: &str,
    quota: Quota,
) -> Result<(), StorageError> {
    update(app, endpoint, deployment, |l| {
        if let Some(r) = l.reservations.get_mut(key) {
            r.answered = true;
        }
        // A create went through: what the last refused edge try met is old news.
        l.edge_refused_at = None;
        if let Some(max) = quota.maximum {
            l.limit = Some(max);
            l.limit_source = Some(LimitSource::Header);
        }
        if let Some(enqueued) = quota.enqueued {
            l.service_enqueued = Some(enqueued);
            // Only answered creates: the service may not count one still under way. Settled
            // rooms all were.
            let ours: u64 = l.settled_held()
                + l.reservations
                    .values()
                    .filter(|r| r.answered)
                    .map(|r| r.tokens)
                    .sum::<u64>();
            if ours > 0 {
                l.scale = Some(enqueued as f64 / ours as f64);
            }
        }
        (true, ())
    })
    .await
}

/// The create at `endpoint` was refused for quota, which the model did not predict: the
/// reservation goes, and what was held then (ours and others') becomes the limit, unless a
/// lower one is known. A refusal with nothing else held says only that this job alone is
/// too big (or others fill the deployment): then the limit stays. So does it when the job
/// was an edge try: then the room was short of it, as the model thought it might be, and
/// no other edge try goes there until we hold less. Returns whether it was an edge try.
pub async fn refused(
    app: &App,
    endpoint: &str,
    deployment: &str,
    key: &str,
) -> Result<bool, StorageError> {
    update(app, endpoint, deployment, |l| {
        let edge = l.reservations.get(key).is_some_and(|r| r.edge);
        l.give_back(key, None, app.now());
        let held = l.scaled(l.held());
        if edge {
            l.edge_refused_at = Some(held);
        } else if held > 0 && l.limit.is_none_or(|limit| held < limit) {
            l.limit = Some(held);
            l.limit_source = Some(LimitSource::Refusal);
        }
        (true, edge)
    })
    .await
}

/// Job `key`'s batch ended (or it will not be created): its room is free again. Its
/// reservation is looked for at every target of the pool it may be held at (a job holds at
/// most one); `held` (the room its record keeps, at the endpoint it was admitted to) is given
/// back there once settled.
pub async fn release(
    app: &App,
    deployment: &str,
    key: &str,
    held: Option<(&str, &HeldRoom)>,
) -> Result<bool, StorageError> {
    let mut released = false;
    for client in &app.pool {
        let endpoint = client.endpoint().to_string();
        let settled = held.and_then(|(at, room)| (at == endpoint).then_some(room));
        let now = app.now();
        released |= update(app, &endpoint, deployment, |l| {
            let had = l.give_back(key, settled, now);
            (had, had)
        })
        .await?;
    }
    Ok(released)
}

/// What a tick's listing of `active/` showed: the active jobs, and the rooms their index
/// says they hold, by target.
pub struct ActiveRooms {
    /// When the listing began: a reservation taken after it may not be in it.
    pub listed_at: i64,
    pub active: HashSet<String>,
    /// Per target (endpoint, deployment): job key → its room. `None` when some active job's
    /// index could not be read (its room is unknown, so no target is recounted).
    pub held: Option<HashMap<(String, String), HashMap<String, RoomHeld>>>,
}

impl ActiveRooms {
    /// `jobs`: each active job's key, the endpoint it was admitted to (`None`: the first of
    /// the pool) and its index (`None`: unreadable).
    pub fn new<'a>(
        listed_at: i64,
        first_endpoint: &str,
        jobs: impl IntoIterator<Item = (&'a str, Option<&'a crate::jobs::JobIndex>)>,
    ) -> Self {
        let mut active = HashSet::new();
        let mut held: Option<HashMap<_, HashMap<_, _>>> = Some(HashMap::new());
        for (key, index) in jobs {
            active.insert(key.to_string());
            match index {
                None => held = None,
                Some(ix) => {
                    if let (Some(map), Some(room)) = (held.as_mut(), &ix.room) {
                        let endpoint = ix.endpoint.as_deref().unwrap_or(first_endpoint);
                        map.entry((endpoint.to_string(), room.model.clone()))
                            .or_default()
                            .insert(key.to_string(), room.clone());
                    }
                }
            }
        }
        ActiveRooms {
            listed_at,
            active,
            held,
        }
    }
}

/// What [`settle`] changed, for the tick's log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Reservations of jobs no longer active (a holder died between reserving and using it).
    pub dropped: usize,
    /// Reservations now counted in `settled`.
    pub counted: usize,
}

/// Brings every ledger up to a tick's listing of the active jobs: reservations whose job is no
/// longer active are dropped (a holder that died leaves one behind), and, when every active
/// job's index could be read, `settled` is recounted as the rooms the listing shows held, and
/// the listed reservations it now counts leave the list. So a ledger's size follows the
/// admissions since the last tick, not the batches running.
///
/// Why a listing taken before the ledger is read counts right: a reservation taken after it
/// is not in it and stays listed (only answered reservations whose room the listing shows
/// are moved); a room given back after it is in `released`, and counted there as given back
/// from the `settled` this recount makes; a job that finished before it is not in it.
pub async fn settle(app: &App, listing: &ActiveRooms) -> Result<Settled, StorageError> {
    let mut targets: BTreeMap<String, (String, String)> = BTreeMap::new();
    let names: Vec<String> = app
        .store
        .list(&app.config.state_container, LEDGER_PREFIX)
        .map_ok(|b| b.name)
        .try_collect()
        .await?;
    for name in names {
        if let Some((bytes, _)) = app.store.read(&app.config.state_container, &name).await?
            && let Ok(l) = serde_json::from_slice::<Ledger>(&bytes)
        {
            targets.insert(name, (l.endpoint, l.deployment));
        }
    }
    // A ledger deleted by hand is made again from the jobs that hold room there.
    for target in listing.held.iter().flat_map(|h| h.keys()) {
        targets
            .entry(ledger_name(&target.0, &target.1))
            .or_insert_with(|| target.clone());
    }
    let mut done = Settled::default();
    let none = HashMap::new();
    for (endpoint, deployment) in targets.into_values() {
        let held = listing.held.as_ref().map(|h| {
            h.get(&(endpoint.clone(), deployment.clone()))
                .unwrap_or(&none)
        });
        let change = update(app, &endpoint, &deployment, |l| {
            let before = (l.reservations.len(), l.settled, l.released.clone());
            let dropped = drop_inactive(l, listing);
            let counted = held.map_or(0, |held| recount(l, held, listing));
            let changed =
                (l.reservations.len(), l.settled, &l.released) != (before.0, before.1, &before.2);
            (changed, Settled { dropped, counted })
        })
        .await?;
        done.dropped += change.dropped;
        done.counted += change.counted;
    }
    Ok(done)
}

/// Drops the listed reservations of jobs the listing does not show active, unless taken too
/// recently to be in it. Returns how many.
fn drop_inactive(l: &mut Ledger, listing: &ActiveRooms) -> usize {
    let before = l.reservations.len();
    l.reservations.retain(|key, r| {
        listing.active.contains(key) || r.at > listing.listed_at - STALE_AFTER_SECS
    });
    before - l.reservations.len()
}

/// `settled` becomes the rooms `held` shows (job key → room); the answered reservations among
/// them leave the list. A given-back room is counted as given back exactly when `held` shows
/// it (so `settled` counts it), and stays noted while its job is active, or may have become
/// active after the listing began: a listing taken later may still show it, as long as the
/// record does. Returns how many reservations left the list.
fn recount(l: &mut Ledger, held: &HashMap<String, RoomHeld>, listing: &ActiveRooms) -> usize {
    let mut settled = 0;
    let mut moved = 0;
    for (key, room) in held {
        // The listing shows the room this reservation is: counted from now on, once its
        // create was answered (until then it must stay listed: see `fits`). A reservation
        // under another id is a newer room than the index showed: it stays listed, and the
        // room shown is counted until the index shows the new one.
        if let Some(r) = l.reservations.get(key)
            && r.id == room.id
        {
            if !r.answered {
                continue;
            }
            l.reservations.remove(key);
            moved += 1;
        }
        settled += room.tokens;
    }
    l.released.retain(|k, r| {
        let Some((key, id)) = k.rsplit_once('#') else {
            return false;
        };
        r.counted = held.get(key).is_some_and(|room| room.id == id);
        // Not only while shown: a listing may show an older room of the job before it shows
        // this one (its record lags), and then this one must still be known as given back.
        r.counted || listing.active.contains(key) || r.at > listing.listed_at - STALE_AFTER_SECS
    });
    l.settled = settled;
    moved
}

/// Every ledger, for status and tests.
pub async fn ledgers(app: &App) -> Result<Vec<Ledger>, StorageError> {
    let names: Vec<String> = app
        .store
        .list(&app.config.state_container, LEDGER_PREFIX)
        .map_ok(|b| b.name)
        .try_collect()
        .await?;
    let mut out = Vec::new();
    for name in names {
        if let Some((bytes, _)) = app.store.read(&app.config.state_container, &name).await?
            && let Ok(l) = serde_json::from_slice(&bytes)
        {
            out.push(l);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(limit: Option<u64>, held: &[(u64, bool)]) -> Ledger {
        Ledger {
            limit,
            limit_source: limit.map(|_| LimitSource::Header),
            reservations: held
                .iter()
                .enumerate()
                .map(|(i, &(tokens, answered))| {
                    (
                        format!("k{i}"),
                        Reservation {
                            tokens,
                            at: 0,
                            answered,
                            edge: false,
                            id: String::new(),
                        },
                    )
                })
                .collect(),
            ..Ledger::default()
        }
    }

    #[test]
    fn a_known_limit_admits_what_fits_and_no_more() {
        let l = ledger(Some(2500), &[(1000, true)]);
        assert!(l.fits(1000, None, 0));
        assert!(!l.fits(1600, None, 0));
        let l = ledger(Some(2500), &[(1000, true), (1000, true)]);
        assert!(!l.fits(1000, None, 0), "3 × 1000 > 2500");
    }

    #[test]
    fn an_unknown_limit_admits_one_create_at_a_time() {
        assert!(ledger(None, &[]).fits(10_000, None, 0));
        let under_way = ledger(None, &[(10, false)]);
        assert!(!under_way.fits(10, None, 0), "a create under way");
        // Reserved at 0: by 1 its create's window is over, its answer lost with its holder.
        assert!(under_way.fits(10, None, 1), "a lost create");
        let answered = ledger(None, &[(10, true)]);
        assert!(answered.fits(10, None, 0), "answered, no header");
        assert!(!answered.fits(10, Some(15), 0), "the setting");
    }

    #[test]
    fn the_services_count_scales_ours() {
        // The service counts twice what we estimate: 2 × (1000 + 300) > 2500.
        let mut l = ledger(Some(2500), &[(1000, true)]);
        l.scale = Some(2.0);
        assert!(!l.fits(300, None, 0));
        assert!(l.fits(200, None, 0));
    }

    #[test]
    fn a_job_a_little_over_the_room_is_tried_at_the_edge_once() {
        // 3 × 1000 held of 4000; the service counts 1.0 × ours.
        let mut l = ledger(Some(4000), &[(1000, true), (1000, true), (1000, true)]);
        l.scale = Some(1.0);
        assert!(!l.fits(1030, None, 0));
        assert!(l.at_edge(1030, None), "3% short: worth a try");
        assert!(!l.at_edge(1100, None), "10% short: not");
        assert!(!l.at_edge(1000, None), "it fits: no edge about it");
        l.edge_refused_at = Some(3000);
        assert!(!l.at_edge(1030, None), "refused at this level");
        l.reservations.remove("k0");
        assert!(l.at_edge(2030, None), "tried again once we hold less");
        l.reservations.get_mut("k1").unwrap().answered = false;
        assert!(!l.at_edge(2030, None), "not while a create is under way");
        let mut unscaled = ledger(Some(4000), &[(3000, true)]);
        assert!(
            !unscaled.at_edge(1030, None),
            "no answer has told the scale yet"
        );
        unscaled.scale = Some(1.0);
        assert!(unscaled.at_edge(1030, None));
    }

    #[test]
    fn an_empty_target_lets_a_job_try_whatever_its_size() {
        assert!(ledger(Some(100), &[]).fits(1000, None, 0));
    }

    /// A job as the simulation below sees it: the room it truly holds, and the room its
    /// record (so its index) shows.
    #[derive(Clone, Default)]
    struct SimJob {
        active: bool,
        /// Filed under done/: its key never comes back.
        done: bool,
        holds: Option<HeldRoom>,
        answered: bool,
        recorded: Option<HeldRoom>,
    }

    /// A listing of the jobs at time `at`, and the rooms their index shows.
    fn snapshot(jobs: &[SimJob], at: i64) -> (ActiveRooms, HashMap<String, RoomHeld>) {
        let mut active = HashSet::new();
        let mut held = HashMap::new();
        for (i, job) in jobs.iter().enumerate().filter(|(_, j)| j.active) {
            active.insert(format!("k{i}"));
            if let Some(room) = &job.recorded {
                held.insert(
                    format!("k{i}"),
                    RoomHeld {
                        id: room.id.clone(),
                        model: "m".into(),
                        tokens: room.tokens,
                    },
                );
            }
        }
        let listing = ActiveRooms {
            listed_at: at,
            active,
            held: None,
        };
        (listing, held)
    }

    /// Reservations, record writes, answers, releases, refusals, finishes and ticks in random
    /// orders, each tick recounting from a listing taken at some moment after the last tick's
    /// (as the timer does: the listing, then job steps by anyone, then `settle`). What the
    /// ledger holds is at every step what the jobs truly hold (less: over-admission; more:
    /// idle quota), and once a tick has seen every record, only the reservations whose create
    /// is not answered yet stay listed.
    #[test]
    fn the_ledger_counts_what_jobs_hold_whatever_the_order() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        for seed in 0..300 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut jobs = vec![SimJob::default(); 12];
            let mut l = Ledger::default();
            let mut listing = snapshot(&jobs, 0);
            for step in 0..400 {
                let i = rng.random_range(0..jobs.len());
                let key = format!("k{i}");
                let job = &mut jobs[i];
                let op = rng.random_range(0..9);
                match op {
                    // Admission (a new job, a follow-up round, a retry after a refusal).
                    0 if job.holds.is_none() && !job.done => {
                        let tokens = rng.random_range(1..100);
                        let id = format!("{seed}-{step}");
                        l.reservations.insert(
                            key,
                            Reservation {
                                tokens,
                                at: step,
                                answered: false,
                                edge: false,
                                id: id.clone(),
                            },
                        );
                        job.active = true;
                        job.holds = Some(HeldRoom { id, tokens });
                        job.answered = false;
                    }
                    1 if job.holds.is_some() => job.recorded = job.holds.clone(),
                    2 if job.holds.is_some() && !job.answered => {
                        job.answered = true;
                        if let Some(r) = l.reservations.get_mut(&key) {
                            r.answered = true;
                        }
                    }
                    // The batch ended: released with the room the record shows.
                    3 if job.holds.is_some() && job.answered => {
                        l.give_back(&key, job.recorded.as_ref(), step);
                        job.holds = None;
                    }
                    // A refusal: given back, then the record forgets the room.
                    4 if job.holds.is_some() && !job.answered => {
                        l.give_back(&key, None, step);
                        job.holds = None;
                    }
                    5 if job.holds.is_none() && job.recorded.is_some() => job.recorded = None,
                    // Finished: filed under done/.
                    6 if job.holds.is_none() && job.active => {
                        job.active = false;
                        job.done = true;
                        job.recorded = None;
                    }
                    // A tick's listing: taken now, used at its `settle`.
                    7 => listing = snapshot(&jobs, step),
                    8 => {
                        drop_inactive(&mut l, &listing.0);
                        recount(&mut l, &listing.1, &listing.0);
                        listing = snapshot(&jobs, step);
                    }
                    _ => continue,
                }
                let truth: u64 = jobs
                    .iter()
                    .filter_map(|j| j.holds.as_ref())
                    .map(|r| r.tokens)
                    .sum();
                assert_eq!(
                    l.held(),
                    truth,
                    "seed {seed} step {step}: what the ledger holds against what the jobs hold"
                );
            }
            // Every record written, then a tick: exact.
            for job in &mut jobs {
                job.recorded = job.holds.clone();
                if job.holds.is_none() {
                    job.active = false;
                }
            }
            // Long after: what was given back before it is forgotten with its job.
            let listing = snapshot(&jobs, 400 + STALE_AFTER_SECS);
            drop_inactive(&mut l, &listing.0);
            recount(&mut l, &listing.1, &listing.0);
            let truth: u64 = jobs
                .iter()
                .filter_map(|j| j.holds.as_ref())
                .map(|r| r.tokens)
                .sum();
            assert_eq!(l.held(), truth, "seed {seed}");
            assert!(
                l.released
                    .keys()
                    .all(|k| listing.0.active.contains(k.split('#').next().unwrap())),
                "seed {seed}: given-back rooms are forgotten with their jobs: {:?}",
                l.released
            );
            let unanswered = jobs.iter().filter(|j| j.holds.is_some() && !j.answered);
            assert_eq!(
                l.reservations.len(),
                unanswered.count(),
                "seed {seed}: only creates not yet answered stay listed"
            );
        }
    }

    #[test]
    fn a_settled_room_is_given_back_once() {
        let mut l = Ledger::default();
        let room = HeldRoom {
            id: "a".into(),
            tokens: 40,
        };
        l.settled = 100;
        assert!(l.give_back("k", Some(&room), 0));
        assert_eq!(l.held(), 60);
        assert!(!l.give_back("k", Some(&room), 0), "a second release");
        assert_eq!(l.held(), 60);
        assert!(!l.give_back("other", None, 0), "nothing held");
    }

    #[test]
    fn ledger_names_are_safe_blob_names() {
        assert_eq!(
            ledger_name("http://127.0.0.1:8080/", "gpt-4o"),
            "capacity/127.0.0.1_8080--gpt-4o.json"
        );
        assert_eq!(
            ledger_name("https://a.openai.azure.com/x/", "m/1"),
            "capacity/a.openai.azure.com_x--m_1.json"
        );
    }
}
