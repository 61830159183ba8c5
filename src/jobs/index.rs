//! The job index: the few facts a timer tick needs to tell whether a job has anything to do,
//! kept in the metadata of the job's record blob.
//!
//! The record is written with its index in the same request (`JobStore`), so the listing of
//! `active/` (`include=metadata`, 5,000 names a page) hands a tick every job's index at no
//! cost per job, and a tick reads a record only when the index says something is due: a
//! running job whose batch the service now describes differently, a claim that lapsed, a
//! quota wait that is over. A long batch then costs no storage call per tick. A record with
//! no index (written by an earlier version) or one that cannot be read is simply read, as
//! every record was before.

use std::collections::HashMap;

use serde::Deserialize;

use crate::openai::{Batch, BatchStatus, RequestCounts};

use super::{BatchSeen, Job, JobState, State};

/// Metadata names: lower case, as Azure Storage may return them in any case it likes
/// (names are case-insensitive) and Azurite and Azure both keep them as written.
mod keys {
    pub const VERSION: &str = "ixv";
    pub const STATE: &str = "ixstate";
    pub const CREATED: &str = "ixcreated";
    pub const QUIET_UNTIL: &str = "ixquiet";
    pub const BATCH: &str = "ixbatch";
    pub const STATUS: &str = "ixstatus";
    pub const TOTAL: &str = "ixtotal";
    pub const COMPLETED: &str = "ixcompleted";
    pub const FAILED: &str = "ixfailed";
    pub const MISSING: &str = "ixmissing";
    pub const CANCEL: &str = "ixcancel";
    pub const ENDPOINT: &str = "ixendpoint";
    pub const WAIT_MODEL: &str = "ixwaitmodel";
    pub const WAIT_TOKENS: &str = "ixwaittokens";
    pub const WAIT_PLACE: &str = "ixwaitplace";
    pub const ROOM: &str = "ixroom";
    pub const ROOM_TOKENS: &str = "ixroomtokens";
    pub const ROOM_MODEL: &str = "ixroommodel";
}
const VERSION: &str = "1";

/// What a tick needs of one job to decide whether to read its record.
#[derive(Debug, Clone, PartialEq)]
pub struct JobIndex {
    pub state: JobState,
    /// When the job was created; its batch cannot be older, which bounds a listing.
    pub created_at: i64,
    /// Nothing is due before this time: a claim's lease (or a create call that may still be
    /// on its way), a quota wait.
    pub quiet_until: Option<i64>,
    /// A running job's batch as last recorded.
    pub batch: Option<BatchSeen>,
    /// A running job's last look found its batch missing (the next look decides).
    pub missing: bool,
    /// Someone asked for the job to stop: its record is read whatever else the index says.
    pub cancel_requested: bool,
    /// The endpoint the job was admitted to (`None`: the first of the pool), so a tick's list
    /// walk of each endpoint looks only for that endpoint's batches.
    pub endpoint: Option<String>,
    /// A queued job waiting for room: what it needs and its place as last written.
    pub waiting: Option<WaitingForRoom>,
    /// The room an admitted job holds at `endpoint`: what lets a tick count every target's
    /// held tokens from its listing (`capacity::settle`).
    pub room: Option<RoomHeld>,
}

/// The room an admitted job holds, as its index tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomHeld {
    /// The reservation's id in the capacity ledger.
    pub id: String,
    /// The deployment (`body.model`) whose quota holds it.
    pub model: String,
    pub tokens: u64,
}

/// What an admission pass needs to pass over a queued job that still does not fit, without
/// reading its record: a line of thousands then costs no storage call per job and tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitingForRoom {
    /// The deployment (`body.model`) whose quota it waits for.
    pub model: String,
    /// Its estimated input tokens.
    pub tokens: u64,
    /// Its place in line as its record says (0: not counted yet).
    pub place: u32,
}

impl<S: State> Job<S> {
    pub fn index(&self) -> JobIndex {
        let running = self.state.running_batch();
        JobIndex {
            state: S::NAME,
            created_at: self.common.created_at,
            quiet_until: self.state.quiet_until(),
            batch: running.map(|(b, _)| b.clone()),
            missing: running.is_some_and(|(_, m)| m),
            cancel_requested: self.common.cancel.is_some(),
            endpoint: self.common.openai_endpoint.clone(),
            waiting: self.state.place_in_line().and_then(|place| {
                let facts = self.common.facts.as_ref()?;
                Some(WaitingForRoom {
                    model: facts.model.clone(),
                    tokens: self.round_tokens().unwrap_or(facts.tokens),
                    place,
                })
            }),
            room: self.common.room.as_ref().and_then(|room| {
                let facts = self.common.facts.as_ref()?;
                // A reservation from before ids existed stays in the ledger's own list.
                (!room.id.is_empty()).then(|| RoomHeld {
                    id: room.id.clone(),
                    model: facts.model.clone(),
                    tokens: room.tokens,
                })
            }),
        }
    }
}

impl JobIndex {
    /// True when `batch`, as the service describes it now, would change nothing in this
    /// running job: the test `Job<Running>::observe` applies, made without the record.
    pub fn unchanged_by(&self, batch: &Batch) -> bool {
        self.state == JobState::Running
            && !self.missing
            && !self.cancel_requested
            && !batch.status.is_terminal()
            && self.batch.as_ref().is_some_and(|seen| {
                seen.id == batch.id
                    && seen.status == batch.status
                    && seen.request_counts == batch.request_counts
            })
    }

    /// True when nothing can be due before `at` (a lease or a wait still running, and no
    /// one asked for the job to stop).
    pub fn quiet_at(&self, at: i64) -> bool {
        !self.cancel_requested && self.quiet_until.is_some_and(|t| t > at)
    }

    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut m = HashMap::from([
            (keys::VERSION.to_string(), VERSION.to_string()),
            (keys::STATE.to_string(), state_name(self.state)),
            (keys::CREATED.to_string(), self.created_at.to_string()),
        ]);
        if let Some(t) = self.quiet_until {
            m.insert(keys::QUIET_UNTIL.into(), t.to_string());
        }
        // Metadata values travel as HTTP headers: an id or status the service might send
        // with other characters is left out, and the record is read instead.
        if let Some(b) = &self.batch
            && header_safe(&b.id)
            && header_safe(b.status.as_str())
        {
            m.insert(keys::BATCH.into(), b.id.clone());
            m.insert(keys::STATUS.into(), b.status.as_str().to_string());
            let c = &b.request_counts;
            m.insert(keys::TOTAL.into(), c.total.to_string());
            m.insert(keys::COMPLETED.into(), c.completed.to_string());
            m.insert(keys::FAILED.into(), c.failed.to_string());
        }
        if self.missing {
            m.insert(keys::MISSING.into(), "1".into());
        }
        if self.cancel_requested {
            m.insert(keys::CANCEL.into(), "1".into());
        }
        // A URL is visible ASCII, fine in a header; anything else is left out (the record
        // has it, and a running job without it in the index is simply retrieved).
        if let Some(e) = &self.endpoint
            && !e.is_empty()
            && e.bytes().all(|b| b.is_ascii_graphic())
        {
            m.insert(keys::ENDPOINT.into(), e.clone());
        }
        if let Some(w) = &self.waiting
            && header_safe(&w.model)
        {
            m.insert(keys::WAIT_MODEL.into(), w.model.clone());
            m.insert(keys::WAIT_TOKENS.into(), w.tokens.to_string());
            m.insert(keys::WAIT_PLACE.into(), w.place.to_string());
        }
        if let Some(r) = &self.room {
            if header_safe(&r.id) && header_safe(&r.model) {
                m.insert(keys::ROOM.into(), r.id.clone());
                m.insert(keys::ROOM_TOKENS.into(), r.tokens.to_string());
                m.insert(keys::ROOM_MODEL.into(), r.model.clone());
            } else {
                // Room a tick could not count from the listing: no index at all, so the
                // record is read, and no tick recounts the ledger while this job is active.
                m.remove(keys::VERSION);
            }
        }
        m
    }

    /// The index kept with a record; `None` when there is none or it cannot be read, and the
    /// record itself must be read.
    pub fn from_metadata(metadata: &HashMap<String, String>) -> Option<JobIndex> {
        let get = |k: &str| {
            metadata
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        let num = |k: &str| get(k).and_then(|v| v.parse::<i64>().ok());
        let count = |k: &str| get(k).and_then(|v| v.parse::<u64>().ok());
        if get(keys::VERSION)? != VERSION {
            return None;
        }
        let state =
            JobState::deserialize(serde_json::Value::String(get(keys::STATE)?.to_string())).ok()?;
        let batch = match get(keys::BATCH) {
            None => None,
            Some(id) => Some(BatchSeen {
                id: id.to_string(),
                status: BatchStatus::parse(get(keys::STATUS)?),
                request_counts: RequestCounts {
                    total: count(keys::TOTAL)?,
                    completed: count(keys::COMPLETED)?,
                    failed: count(keys::FAILED)?,
                },
            }),
        };
        if state == JobState::Running && batch.is_none() {
            return None;
        }
        Some(JobIndex {
            state,
            created_at: num(keys::CREATED)?,
            quiet_until: match get(keys::QUIET_UNTIL) {
                None => None,
                Some(v) => Some(v.parse().ok()?),
            },
            batch,
            missing: get(keys::MISSING) == Some("1"),
            cancel_requested: get(keys::CANCEL) == Some("1"),
            endpoint: get(keys::ENDPOINT).map(str::to_string),
            // All three or none: a part missing means "read the record".
            waiting: match get(keys::WAIT_MODEL) {
                None => None,
                Some(model) => Some(WaitingForRoom {
                    model: model.to_string(),
                    tokens: count(keys::WAIT_TOKENS)?,
                    place: count(keys::WAIT_PLACE)?.try_into().ok()?,
                }),
            },
            room: match get(keys::ROOM) {
                None => None,
                Some(id) => Some(RoomHeld {
                    id: id.to_string(),
                    model: get(keys::ROOM_MODEL)?.to_string(),
                    tokens: count(keys::ROOM_TOKENS)?,
                }),
            },
        })
    }
}

/// The state's name as records write it (an empty name would only make the index unread).
fn state_name(state: JobState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn header_safe(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(status: &str, completed: u64) -> JobIndex {
        JobIndex {
            state: JobState::Running,
            created_at: 100,
            quiet_until: None,
            batch: Some(BatchSeen {
                id: "batch_1".into(),
                status: BatchStatus::parse(status),
                request_counts: RequestCounts {
                    total: 10,
                    completed,
                    failed: 0,
                },
            }),
            missing: false,
            cancel_requested: false,
            endpoint: None,
            waiting: None,
            room: None,
        }
    }

    fn batch(status: &str, completed: u64) -> Batch {
        serde_json::from_value(serde_json::json!({
            "id": "batch_1", "status": status,
            "request_counts": {"total": 10, "completed": completed, "failed": 0}
        }))
        .unwrap()
    }

    #[test]
    fn round_trips_through_metadata() {
        for ix in [
            running("in_progress", 3),
            JobIndex {
                missing: true,
                ..running("validating", 0)
            },
            JobIndex {
                state: JobState::Queued,
                created_at: 5,
                quiet_until: Some(900),
                batch: None,
                missing: false,
                cancel_requested: true,
                endpoint: None,
                waiting: None,
                room: None,
            },
            JobIndex {
                state: JobState::Queued,
                created_at: 7,
                quiet_until: None,
                batch: None,
                missing: false,
                cancel_requested: false,
                endpoint: None,
                waiting: Some(WaitingForRoom {
                    model: "gpt-4o-batch".into(),
                    tokens: 123_456,
                    place: 3,
                }),
                room: None,
            },
            JobIndex {
                endpoint: Some("https://west.openai.azure.com/".into()),
                room: Some(RoomHeld {
                    id: "3f9a0c1e".into(),
                    model: "gpt-4o-batch".into(),
                    tokens: 52_000,
                }),
                ..running("in_progress", 1)
            },
        ] {
            assert_eq!(JobIndex::from_metadata(&ix.to_metadata()), Some(ix));
        }
    }

    #[test]
    fn names_are_matched_in_any_case() {
        let m: HashMap<String, String> = running("in_progress", 3)
            .to_metadata()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), v))
            .collect();
        assert_eq!(JobIndex::from_metadata(&m), Some(running("in_progress", 3)));
    }

    #[test]
    fn no_index_or_a_damaged_one_means_read_the_record() {
        assert_eq!(JobIndex::from_metadata(&HashMap::new()), None);
        let mut m = running("in_progress", 3).to_metadata();
        m.insert(keys::COMPLETED.into(), "three".into());
        assert_eq!(JobIndex::from_metadata(&m), None);
        let mut m = running("in_progress", 3).to_metadata();
        m.remove(keys::BATCH);
        assert_eq!(JobIndex::from_metadata(&m), None, "running without a batch");
        let mut m = running("in_progress", 3).to_metadata();
        m.insert(keys::VERSION.into(), "2".into());
        assert_eq!(JobIndex::from_metadata(&m), None, "a later version's index");
    }

    #[test]
    fn unchanged_only_when_observe_would_change_nothing() {
        let ix = running("in_progress", 3);
        assert!(ix.unchanged_by(&batch("in_progress", 3)));
        assert!(!ix.unchanged_by(&batch("in_progress", 4)), "counts moved");
        assert!(!ix.unchanged_by(&batch("finalizing", 3)), "status moved");
        assert!(!ix.unchanged_by(&batch("completed", 3)), "ended");
        let missing = JobIndex {
            missing: true,
            ..ix.clone()
        };
        assert!(
            !missing.unchanged_by(&batch("in_progress", 3)),
            "seen again"
        );
        let cancel = JobIndex {
            cancel_requested: true,
            ..ix.clone()
        };
        assert!(
            !cancel.unchanged_by(&batch("in_progress", 3)),
            "asked to stop"
        );
    }

    #[test]
    fn a_job_asked_to_stop_is_never_quiet() {
        let mut ix = JobIndex {
            state: JobState::Queued,
            created_at: 0,
            quiet_until: Some(1000),
            batch: None,
            missing: false,
            cancel_requested: false,
            endpoint: None,
            waiting: None,
            room: None,
        };
        assert!(ix.quiet_at(10));
        ix.cancel_requested = true;
        assert!(!ix.quiet_at(10));
    }

    #[test]
    fn a_room_that_cannot_be_a_header_means_no_index() {
        let mut ix = running("in_progress", 3);
        ix.room = Some(RoomHeld {
            id: "3f9a0c1e".into(),
            model: "gpt 4o/batch".into(),
            tokens: 10,
        });
        assert_eq!(JobIndex::from_metadata(&ix.to_metadata()), None);
    }

    #[test]
    fn an_id_that_cannot_be_a_header_is_left_out() {
        let mut ix = running("in_progress", 3);
        ix.batch.as_mut().unwrap().id = "batch 1\n".into();
        assert_eq!(JobIndex::from_metadata(&ix.to_metadata()), None);
    }
}
