//! The JSON form of a job record: one flat object, as every earlier version wrote it.
//!
//! The typed job (`record`) gives each state only its own data; here it is spread over the
//! flat fields (a `null` where a state has nothing) and gathered back, so records written
//! before the typed model are read, and records written now are readable by the version
//! before. A record that no version could have written (a `running` job without a batch id,
//! a split job without parts, a finished one without an outcome) is refused by name rather
//! than acted on.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::openai::{BatchStatus, RequestCounts};

use super::{
    CancelRequest, HarvestProgress, HeldRoom, HistoryEntry, InputFacts, InputRef, JobState,
    Outcome, PartOf, PartRef, RoundRecord,
    record::{
        AnyJob, BatchSeen, Combining, Common, CreateCall, Finished, Harvesting, Holder, Job,
        Missing, Queued, Running, Split, State, Submitting,
    },
};

/// The record's fields, in the order they have always been written. Opaque outside this
/// module: only the states' `WireState` fill and read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Wire {
    key: String,
    input: InputRef,
    state: JobState,
    #[serde(default)]
    outcome: Option<Outcome>,
    #[serde(default)]
    facts: Option<InputFacts>,
    #[serde(default)]
    batch_id: Option<String>,
    #[serde(default)]
    batch_status: Option<String>,
    #[serde(default)]
    request_counts: Option<RequestCounts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    batch_missing_since: Option<i64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    batch_missing_looks: u32,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    lease_until: Option<i64>,
    #[serde(default)]
    create_started_at: Option<i64>,
    #[serde(default)]
    create_in_flight_until: Option<i64>,
    #[serde(default)]
    quota_attempts: u32,
    #[serde(default)]
    next_attempt_at: Option<i64>,
    /// A queued job waiting for room, not a backoff timer; absent in earlier records.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    waiting_for_room: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    queue_place: u32,
    /// The endpoint the job was admitted to; absent before the pool (the first endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    openai_endpoint: Option<String>,
    /// The room the job holds in the capacity ledger; absent before reservations had ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    room: Option<HeldRoom>,
    #[serde(default)]
    last_error: Option<String>,
    #[serde(default)]
    round: u32,
    #[serde(default)]
    rounds: Vec<RoundRecord>,
    #[serde(default)]
    followup_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    followup_lines: Option<u64>,
    #[serde(default)]
    harvest: Option<HarvestProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    results_folder: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    parts: Vec<PartRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    part_of: Option<PartOf>,
    /// Absent unless a cancel was asked for, so records without one read as every earlier
    /// version wrote them (and an earlier version reads ours, ignoring it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cancel: Option<CancelRequest>,
    created_at: i64,
    updated_at: i64,
    #[serde(default)]
    history: Vec<HistoryEntry>,
}

/// A record whose fields contradict its state.
#[derive(Debug, thiserror::Error)]
#[error("job record {key} cannot be read: {problem}")]
pub struct InvalidRecord {
    pub key: String,
    pub problem: &'static str,
}

/// How a state spreads its data over the flat fields, and gathers it back.
pub trait WireState: Sized {
    fn put(&self, w: &mut Wire);
    fn take(w: &mut Wire) -> Result<Self, &'static str>;
}

impl<S: State> Job<S> {
    fn to_wire(&self) -> Wire {
        let mut w = Wire {
            key: self.common.key.clone(),
            input: self.common.input.clone(),
            state: S::NAME,
            outcome: None,
            facts: self.common.facts.clone(),
            batch_id: None,
            batch_status: None,
            request_counts: None,
            batch_missing_since: None,
            batch_missing_looks: 0,
            owner: None,
            lease_until: None,
            create_started_at: None,
            create_in_flight_until: None,
            quota_attempts: self.common.quota_attempts,
            next_attempt_at: None,
            waiting_for_room: false,
            queue_place: 0,
            openai_endpoint: self.common.openai_endpoint.clone(),
            room: self.common.room.clone(),
            last_error: self.common.last_error.clone(),
            round: self.common.round,
            rounds: self.common.rounds.clone(),
            followup_url: self.common.followup_url.clone(),
            followup_lines: self.common.followup_lines,
            harvest: None,
            results_folder: self.common.results_folder.clone(),
            parts: Vec::new(),
            part_of: self.common.part_of.clone(),
            cancel: self.common.cancel,
            created_at: self.common.created_at,
            updated_at: self.common.updated_at,
            history: self.common.history.clone(),
        };
        self.state.put(&mut w);
        w
    }

    fn from_wire(mut w: Wire) -> Result<Self, InvalidRecord> {
        let state = S::take(&mut w).map_err(|problem| InvalidRecord {
            key: w.key.clone(),
            problem,
        })?;
        Ok(Job {
            common: Common {
                key: w.key,
                input: w.input,
                facts: w.facts,
                part_of: w.part_of,
                quota_attempts: w.quota_attempts,
                last_error: w.last_error,
                round: w.round,
                rounds: w.rounds,
                followup_url: w.followup_url,
                followup_lines: w.followup_lines,
                results_folder: w.results_folder,
                cancel: w.cancel,
                openai_endpoint: w.openai_endpoint,
                room: w.room,
                created_at: w.created_at,
                updated_at: w.updated_at,
                history: w.history,
            },
            state,
        })
    }
}

impl<S: State> Serialize for Job<S> {
    fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        self.to_wire().serialize(s)
    }
}

impl TryFrom<Wire> for AnyJob {
    type Error = InvalidRecord;

    fn try_from(w: Wire) -> Result<Self, InvalidRecord> {
        Ok(match w.state {
            JobState::Submitting => AnyJob::Submitting(Job::from_wire(w)?),
            JobState::Queued => AnyJob::Queued(Job::from_wire(w)?),
            JobState::Running => AnyJob::Running(Job::from_wire(w)?),
            JobState::Split => AnyJob::Split(Job::from_wire(w)?),
            // A split job's combine is the `harvesting` of a record with parts.
            JobState::Harvesting if !w.parts.is_empty() => AnyJob::Combining(Job::from_wire(w)?),
            JobState::Harvesting => AnyJob::Harvesting(Job::from_wire(w)?),
            JobState::Finished => AnyJob::Finished(Job::from_wire(w)?),
        })
    }
}

impl<'de> Deserialize<'de> for AnyJob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        AnyJob::try_from(Wire::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl Serialize for AnyJob {
    fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        match self {
            AnyJob::Submitting(j) => j.serialize(s),
            AnyJob::Queued(j) => j.serialize(s),
            AnyJob::Running(j) => j.serialize(s),
            AnyJob::Split(j) => j.serialize(s),
            AnyJob::Harvesting(j) => j.serialize(s),
            AnyJob::Combining(j) => j.serialize(s),
            AnyJob::Finished(j) => j.serialize(s),
        }
    }
}

fn put_batch(b: &BatchSeen, w: &mut Wire) {
    w.batch_id = Some(b.id.clone());
    w.batch_status = Some(b.status.to_string());
    w.request_counts = Some(b.request_counts.clone());
}

fn take_batch(w: &mut Wire) -> Option<BatchSeen> {
    Some(BatchSeen {
        id: w.batch_id.take()?,
        status: BatchStatus::parse(w.batch_status.as_deref().unwrap_or_default()),
        request_counts: w.request_counts.take().unwrap_or_default(),
    })
}

impl WireState for Submitting {
    fn put(&self, w: &mut Wire) {
        w.owner = Some(self.owner.clone());
        w.lease_until = Some(self.lease_until);
        w.create_started_at = self.create.as_ref().map(|c| c.started_at);
        w.create_in_flight_until = self.create.as_ref().and_then(|c| c.in_flight_until);
    }
    fn take(w: &mut Wire) -> Result<Self, &'static str> {
        Ok(Submitting {
            // A claim without an owner or lease is one nobody holds: it may be taken over.
            owner: w.owner.take().unwrap_or_default(),
            lease_until: w.lease_until.unwrap_or(0),
            create: w.create_started_at.map(|started_at| CreateCall {
                started_at,
                in_flight_until: w.create_in_flight_until,
            }),
        })
    }
}

impl WireState for Queued {
    fn put(&self, w: &mut Wire) {
        w.next_attempt_at = Some(self.next_attempt_at);
        w.waiting_for_room = self.room;
        w.queue_place = self.place;
    }
    fn take(w: &mut Wire) -> Result<Self, &'static str> {
        Ok(Queued {
            // No time noted: the wait is over.
            next_attempt_at: w.next_attempt_at.unwrap_or(0),
            room: w.waiting_for_room,
            place: w.queue_place,
        })
    }
}

impl WireState for Running {
    fn put(&self, w: &mut Wire) {
        put_batch(&self.batch, w);
        if let Some(m) = self.missing {
            w.batch_missing_since = Some(m.since);
            w.batch_missing_looks = m.looks;
        }
    }
    fn take(w: &mut Wire) -> Result<Self, &'static str> {
        Ok(Running {
            batch: take_batch(w).ok_or("it is running but names no batch_id")?,
            missing: w.batch_missing_since.map(|since| Missing {
                since,
                looks: w.batch_missing_looks,
            }),
        })
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl WireState for Split {
    fn put(&self, w: &mut Wire) {
        w.parts = self.parts.clone();
    }
    fn take(w: &mut Wire) -> Result<Self, &'static str> {
        if w.parts.is_empty() {
            return Err("it is split but lists no parts");
        }
        Ok(Split {
            parts: std::mem::take(&mut w.parts),
        })
    }
}

impl WireState for Harvesting {
    fn put(&self, w: &mut Wire) {
        put_batch(&self.batch, w);
        w.harvest = Some(self.progress.clone());
        put_holder(self.holder.as_ref(), w);
    }
    fn take(w: &mut Wire) -> Result<Self, &'static str> {
        Ok(Harvesting {
            batch: take_batch(w).ok_or("it is harvesting but names no batch_id and no parts")?,
            progress: w.harvest.take().unwrap_or_default(),
            holder: take_holder(w),
        })
    }
}

impl WireState for Combining {
    fn put(&self, w: &mut Wire) {
        w.parts = self.parts.clone();
        w.harvest = Some(self.progress.clone());
        put_holder(self.holder.as_ref(), w);
    }
    fn take(w: &mut Wire) -> Result<Self, &'static str> {
        Ok(Combining {
            parts: std::mem::take(&mut w.parts),
            progress: w.harvest.take().unwrap_or_default(),
            holder: take_holder(w),
        })
    }
}

/// A harvest's holder rides in the claim's fields (`owner`, `lease_until`), which earlier
/// versions wrote only for submitting jobs and ignore in other states; records from before
/// the holder read as held by nobody.
fn put_holder(holder: Option<&Holder>, w: &mut Wire) {
    if let Some(h) = holder {
        w.owner = Some(h.owner.clone());
        w.lease_until = Some(h.until);
    }
}

fn take_holder(w: &mut Wire) -> Option<Holder> {
    Some(Holder {
        owner: w.owner.take()?,
        until: w.lease_until.take()?,
    })
}

impl WireState for Finished {
    fn put(&self, w: &mut Wire) {
        w.outcome = Some(self.outcome);
        if let Some(b) = &self.batch {
            put_batch(b, w);
        }
        w.parts = self.parts.clone();
        w.harvest = self.progress.clone();
    }
    fn take(w: &mut Wire) -> Result<Self, &'static str> {
        Ok(Finished {
            outcome: w.outcome.ok_or("it is finished but has no outcome")?,
            batch: take_batch(w),
            parts: std::mem::take(&mut w.parts),
            progress: w.harvest.take(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the version before the typed model wrote (through its own `JobRecord`
    /// transitions), one per state and kind of job.
    const V1: &[(&str, &str)] = &[
        (
            "submitting-claimed",
            include_str!("testdata/v1/submitting-claimed.json"),
        ),
        (
            "submitting-creating",
            include_str!("testdata/v1/submitting-creating.json"),
        ),
        (
            "submitting-released-after-queue",
            include_str!("testdata/v1/submitting-released-after-queue.json"),
        ),
        ("queued", include_str!("testdata/v1/queued.json")),
        ("running", include_str!("testdata/v1/running.json")),
        (
            "running-followup",
            include_str!("testdata/v1/running-followup.json"),
        ),
        (
            "running-part",
            include_str!("testdata/v1/running-part.json"),
        ),
        (
            "harvesting-batch",
            include_str!("testdata/v1/harvesting-batch.json"),
        ),
        ("split", include_str!("testdata/v1/split.json")),
        (
            "harvesting-parts",
            include_str!("testdata/v1/harvesting-parts.json"),
        ),
        (
            "finished-expired",
            include_str!("testdata/v1/finished-expired.json"),
        ),
        (
            "finished-rejected",
            include_str!("testdata/v1/finished-rejected.json"),
        ),
        (
            "finished-split",
            include_str!("testdata/v1/finished-split.json"),
        ),
    ];

    fn v1(name: &str) -> AnyJob {
        let text = V1.iter().find(|(n, _)| *n == name).expect("fixture").1;
        serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn records_of_the_version_before_are_read_into_their_states() {
        let AnyJob::Submitting(j) = v1("submitting-claimed") else {
            panic!()
        };
        assert!(j.create_started_at().is_none());
        assert!(j.is_leased(j.created_at()));
        let AnyJob::Submitting(j) = v1("submitting-creating") else {
            panic!()
        };
        assert_eq!(j.create_started_at(), Some(j.created_at()));
        assert!(j.is_leased(j.created_at() + 119), "create window");
        let AnyJob::Submitting(j) = v1("submitting-released-after-queue") else {
            panic!()
        };
        assert_eq!(j.quota_attempts(), 1);
        assert_eq!(j.last_error(), Some("HTTP 503"));
        assert!(j.was_taken_over());
        let AnyJob::Queued(j) = v1("queued") else {
            panic!()
        };
        assert_eq!(j.next_attempt_at(), j.updated_at() + 300);
        let AnyJob::Running(j) = v1("running") else {
            panic!()
        };
        assert_eq!(j.batch().id, "batch_abc");
        assert_eq!(j.batch().status, BatchStatus::InProgress);
        assert_eq!(j.batch().request_counts.completed, 1);
        assert_eq!(j.facts().unwrap().model, "gpt-4o-batch");
        let AnyJob::Running(j) = v1("running-followup") else {
            panic!()
        };
        assert_eq!(j.round(), 1);
        assert_eq!(j.rounds()[0].batch_id, "batch_abc");
        assert!(j.batch_input_url().ends_with("followup-1.jsonl"));
        let AnyJob::Running(j) = v1("running-part") else {
            panic!()
        };
        assert_eq!(j.part_of().unwrap().index, 2);
        assert_eq!(j.part_of().unwrap().line_offset, 10);
        let AnyJob::Harvesting(j) = v1("harvesting-batch") else {
            panic!()
        };
        assert_eq!(j.batch().status, BatchStatus::Expired);
        assert!(j.progress().results_moved && !j.progress().errors_moved);
        assert_eq!(j.results_folder(), Some("reports/q3"));
        let AnyJob::Split(j) = v1("split") else {
            panic!()
        };
        assert_eq!(j.parts().len(), 3);
        let AnyJob::Combining(j) = v1("harvesting-parts") else {
            panic!()
        };
        assert!(j.progress().errors_moved && !j.progress().merged_moved);
        let AnyJob::Finished(j) = v1("finished-expired") else {
            panic!()
        };
        assert_eq!(j.outcome(), Outcome::Expired);
        assert_eq!(j.batch().unwrap().id, "batch_abc");
        let AnyJob::Finished(j) = v1("finished-rejected") else {
            panic!()
        };
        assert_eq!(j.outcome(), Outcome::Rejected);
        assert!(j.batch().is_none());
        let AnyJob::Finished(j) = v1("finished-split") else {
            panic!()
        };
        assert_eq!(j.state().parts.len(), 3);
    }

    #[test]
    fn records_are_written_as_the_version_before_wrote_them() {
        for (name, text) in V1 {
            let before: serde_json::Value = serde_json::from_str(text).unwrap();
            let mut after = serde_json::to_value(v1(name)).unwrap();
            // The one field the typed model drops: a wait's end, once the wait is over
            // and the job claimed again (it meant nothing there).
            if *name == "submitting-released-after-queue" {
                after["next_attempt_at"] = before["next_attempt_at"].clone();
            }
            assert_eq!(after, before, "{name}");
        }
    }

    #[test]
    fn a_harvest_holder_is_kept_in_the_record_and_lapses_with_its_lease() {
        let AnyJob::Harvesting(mut j) = v1("harvesting-batch") else {
            panic!()
        };
        let t = j.updated_at();
        assert_eq!(j.held_by(t), None, "records from before the holder: nobody");
        j.hold("instance-a", 300, t);
        let text = serde_json::to_string(&AnyJob::from(j)).unwrap();
        let AnyJob::Harvesting(mut j) = serde_json::from_str(&text).unwrap() else {
            panic!()
        };
        assert_eq!(j.held_by(t + 299), Some("instance-a"));
        j.renew(300, t + 200);
        assert_eq!(j.held_by(t + 499), Some("instance-a"), "renewed");
        assert_eq!(j.held_by(t + 500), None, "lapsed");
        j.hold("instance-b", 300, t + 500);
        assert_eq!(j.held_by(t + 501), Some("instance-b"));
        assert!(
            j.history()
                .last()
                .is_some_and(|h| h.note.contains("previous holder instance-a")),
            "taking over from a lapsed holder is noted"
        );
    }

    #[test]
    fn a_record_no_version_could_write_is_refused_by_name() {
        let mut w: serde_json::Value =
            serde_json::from_str(V1.iter().find(|(n, _)| *n == "running").unwrap().1).unwrap();
        w["batch_id"] = serde_json::Value::Null;
        let e = serde_json::from_value::<AnyJob>(w).unwrap_err().to_string();
        assert!(e.contains("reports/q3.jsonl@0x8DE0A1B2C3D4E5F"), "{e}");
        assert!(e.contains("running but names no batch_id"), "{e}");
    }
}
