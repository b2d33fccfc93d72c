//! The coordinator: a per-node, VSS-like sequencer. For one snapshot at a time
//! it runs freeze writers → flush-and-hold → commit provider → release →
//! post-snapshot → thaw (DESIGN.md §3), with a per-writer timeout per event and
//! one deadline (the lease) for the whole run, then tells every writer that
//! was sent freeze the snapshot's one outcome (`complete` or `abort`).
//!
//! It knows nothing of the cluster (seed 001, \[0064\]): it talks to a list of
//! writers, each named by an opaque [`WriterKey`], and to ONE provider named by
//! a [`ProviderKind`]. That the cluster writer is a writer and the helper
//! provider a provider is the business of whoever wires it ([`super::NodeMachine`]).
//!
//! Use: feed it `start` / `abort` / `outcome` (from its requester),
//! `writer_reply`, `writer_failure`, `provider_returned`, `add_writer` /
//! `remove_writer` and `handle_timeout`; drain [`Coordinator::poll`] after
//! each call.
//!
//! # Outcomes
//! A run that commits through the storage provider knows its outcome when it
//! ends: `complete` once the provider sealed the snapshot, `abort` otherwise.
//! A run through the helper provider only knows `abort`: after a successful
//! run it waits for its requester's [`Coordinator::outcome`] (the initiator's
//! word, or the catalog's when the initiator is gone). Writers that were sent
//! freeze get exactly one outcome each.
//!
//! # Deadlines
//! The run's deadline is the lease (or a shorter request timeout). A writer
//! may answer freeze with a shorter hold ([`Answer::AckUntil`]: the cluster
//! writer does, for the other nodes' leases). The commit must not start
//! closer than `commit_margin_ms` to the earliest hold, and the block snapshot
//! is only kept if it was complete [`drift_guard`] before it: node clocks may
//! run at slightly different rates, so another node's lease may end that much
//! early in our time.

use super::provider::{ProviderCall, ProviderKind};
use super::types::*;
use std::collections::{BTreeMap, VecDeque};

/// Clocks of two nodes may differ in rate by at most this many parts per
/// thousand (1 %); Linux monotonic clocks under NTP differ by < 0.05 %.
pub const MAX_DRIFT_PER_MILLE: u64 = 10;

/// How much earlier than `until_ms` a lease that started at `start_ms` may
/// end on another node's clock (see [`MAX_DRIFT_PER_MILLE`]), plus 1 ms of
/// rounding.
pub fn drift_guard(start_ms: u64, until_ms: u64) -> u64 {
    until_ms.saturating_sub(start_ms) * MAX_DRIFT_PER_MILLE / 1000 + 1
}

/// How the coordinator names a writer. It hands the key back in its events and
/// never looks inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WriterKey {
    /// An application (or hook) writer registered with the node.
    App(WriterId),
    /// The cluster writer.
    Cluster,
}

/// Who asked for the snapshot and gets the result: a local client, or the
/// cluster service acting as a backup application on a non-initiator node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requester {
    Client(RequestId),
    ClusterService,
}

/// A writer's answer as the coordinator sees it. `Failed` is a veto that
/// already names where it happened (the cluster writer uses it to pass on a
/// remote node's failure). `AckUntil` acknowledges and says the writer holds
/// only until that instant (the cluster writer: the other nodes' leases).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Ack,
    AckUntil(u64),
    Veto(String),
    Failed(Failure),
}

/// What the coordinator asks of the world, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordOut {
    /// Send an event to a writer.
    Writer {
        key: WriterKey,
        snapshot: SnapshotId,
        event: WriterEvent,
    },
    /// A writer registered while a run was in flight is part of the runs
    /// from now on: tell it so (only now, so it cannot take writes that the
    /// running snapshot would silently leave out).
    Registered {
        key: WriterKey,
    },
    /// Call the run's provider; `FlushAndHold`, `Commit` and `Complete` return
    /// through [`Coordinator::provider_returned`].
    Provider {
        kind: ProviderKind,
        snapshot: SnapshotId,
        call: ProviderCall,
    },
    Phase(PhaseEvent),
    /// The run is over; this is its one result.
    Finished {
        requester: Requester,
        result: RunResult,
    },
}

/// The result of one run on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunResult {
    pub snapshot: SnapshotId,
    pub error: Option<Failure>,
    pub phases: Vec<PhaseSpan>,
    pub writers: Vec<(WriterKey, WriterReport)>,
    /// Flush-and-hold to release on this node, in ms.
    pub io_hold_ms: Option<u64>,
}

/// A registered writer, kept between runs.
#[derive(Clone, Debug)]
struct Registered {
    name: String,
    on_error: OnError,
    /// `None`: no per-event timeout (the cluster writer; the lease bounds it).
    timeout_ms: Option<u64>,
}

/// A writer's state in the current run (also shown by `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriterState {
    Idle,
    Freezing,
    Frozen,
    PostSnapshot,
    Thawing,
    Thawed,
    Aborted,
    Vetoed,
    TimedOut,
    Gone,
}

#[derive(Clone, Debug)]
struct RunWriter {
    reg: Registered,
    state: WriterState,
    /// The event awaiting an answer and its deadline.
    pending: Option<(EventKind, Option<u64>)>,
    /// Failed with on_error=continue: no longer waited for; still thawed and
    /// told the outcome.
    excluded: bool,
    gone: bool,
    /// Was sent freeze and not yet thaw / abort.
    frozen_or_freezing: bool,
    /// Was sent an outcome (`abort` or `complete`).
    outcome_sent: bool,
    outcome: Option<WriterOutcome>,
    fail_phase: Option<Phase>,
    reason: Option<String>,
    frozen_ms: Option<u64>,
    thawed_ms: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Freezing,
    FlushAndHold,
    Commit,
    PostSnapshot,
    Thawing,
}

impl Step {
    /// Before the provider's commit returned: the snapshot may not exist yet,
    /// and every writer must still be frozen.
    fn before_commit(self) -> bool {
        matches!(self, Step::Freezing | Step::FlushAndHold | Step::Commit)
    }
}

#[derive(Debug)]
struct Run {
    requester: Requester,
    snapshot: SnapshotId,
    provider: ProviderKind,
    start_ms: u64,
    deadline_ms: u64,
    /// What the deadline is, for failure reasons ("lease of 10000 ms").
    limit: String,
    /// The earliest instant until which every writer holds (≤ deadline).
    hold_until: u64,
    step: Step,
    phase: Phase,
    phase_start: u64,
    spans: Vec<PhaseSpan>,
    writers: BTreeMap<WriterKey, RunWriter>,
    /// The provider call awaiting its return.
    provider_wait: Option<ProviderCall>,
    hold_ms: Option<u64>,
    release_ms: Option<u64>,
}

/// A finished run, remembered for its outcome and for late answers.
#[derive(Debug)]
struct Ended {
    snapshot: SnapshotId,
    /// `None` while the outcome is not known yet (a helper-provider run that
    /// succeeded); `Some(Err(reason))` when aborted.
    outcome: Option<Result<(), String>>,
    /// Writers that were sent freeze, and whether each was sent its outcome.
    writers: BTreeMap<WriterKey, bool>,
}

/// How many finished runs are remembered for late answers.
const ENDED_KEPT: usize = 8;

/// The per-node sequencer. See the module doc.
#[derive(Debug)]
pub struct Coordinator {
    node: String,
    /// Do not start a commit closer than this to the deadline: the remote
    /// nodes' leases end at about the deadline, and their writers must still
    /// be frozen when the block snapshot is taken.
    commit_margin_ms: u64,
    writers: BTreeMap<WriterKey, Registered>,
    /// Registered during the run in flight; told `Registered` when it ends.
    deferred: Vec<WriterKey>,
    run: Option<Run>,
    /// The last finished run and how it ended, for `status`.
    last: Option<(SnapshotId, Phase)>,
    ended: VecDeque<Ended>,
    out: VecDeque<CoordOut>,
}

impl Coordinator {
    pub fn new(node: &str, commit_margin_ms: u64) -> Coordinator {
        Coordinator {
            node: node.to_string(),
            commit_margin_ms,
            writers: BTreeMap::new(),
            deferred: Vec::new(),
            run: None,
            last: None,
            ended: VecDeque::new(),
            out: VecDeque::new(),
        }
    }

    // ---- writers ------------------------------------------------------

    /// Register a writer. It takes part from the next run on. While a run is
    /// in flight its `Registered` is held back until the run ends.
    pub fn add_writer(
        &mut self,
        key: WriterKey,
        name: &str,
        on_error: OnError,
        timeout_ms: Option<u64>,
    ) {
        self.writers.insert(
            key,
            Registered {
                name: name.to_string(),
                on_error,
                timeout_ms,
            },
        );
        if self.run.is_some() {
            self.deferred.push(key);
        } else {
            self.out.push_back(CoordOut::Registered { key });
        }
    }

    /// A writer disconnected. If it owed an answer, or was frozen before the
    /// commit, that counts as a failure of the snapshot (abort unless
    /// on_error=continue): a writer that is gone can no longer promise to hold.
    pub fn remove_writer(&mut self, key: WriterKey, now: u64) {
        self.writers.remove(&key);
        self.deferred.retain(|k| *k != key);
        for e in self.ended.iter_mut() {
            e.writers.remove(&key);
        }
        let Some(run) = self.run.as_mut() else { return };
        let step = run.step;
        let Some(w) = run.writers.get_mut(&key) else {
            return;
        };
        let was_frozen = w.frozen_or_freezing;
        w.gone = true;
        w.frozen_or_freezing = false;
        let owes = w.pending.is_some() && step != Step::Thawing;
        if owes || (was_frozen && step.before_commit() && !w.excluded) {
            let reason = if owes {
                "writer disconnected".to_string()
            } else {
                "writer disconnected while frozen".to_string()
            };
            self.writer_failed(key, WriterOutcome::Gone, reason, None, now);
        } else {
            // After the commit (or excluded already): recorded, not a failure.
            w.pending = None;
            if w.outcome.is_none() || w.outcome == Some(WriterOutcome::Thawed) {
                w.outcome = Some(WriterOutcome::Gone);
                w.fail_phase = Some(run.phase);
            }
            w.state = WriterState::Gone;
            self.progress(now);
        }
    }

    /// Registered writers and their state in the current run.
    pub fn writers(&self) -> Vec<(WriterKey, String, OnError, WriterState)> {
        self.writers
            .iter()
            .map(|(k, r)| {
                let state = self
                    .run
                    .as_ref()
                    .and_then(|run| run.writers.get(k))
                    .map_or(WriterState::Idle, |w| w.state);
                (*k, r.name.clone(), r.on_error, state)
            })
            .collect()
    }

    // ---- the run --------------------------------------------------------

    /// The snapshot in flight, if any. A requester checks this first: a busy
    /// coordinator refuses `start`.
    pub fn busy(&self) -> Option<SnapshotId> {
        self.run.as_ref().map(|r| r.snapshot)
    }

    /// A finished run whose outcome is not known yet.
    pub fn awaiting_outcome(&self) -> Option<SnapshotId> {
        self.ended
            .iter()
            .find(|e| e.outcome.is_none())
            .map(|e| e.snapshot)
    }

    /// The snapshot in flight and its phase, else the last one and how it
    /// ended, else `None`.
    pub fn phase(&self) -> Option<(SnapshotId, Phase)> {
        self.run
            .as_ref()
            .map(|r| (r.snapshot, r.phase))
            .or(self.last)
    }

    /// Start a snapshot: freeze every registered writer. The whole run must end
    /// by `deadline_ms` (`limit` says what that deadline is, for failure
    /// reasons) or it aborts. When busy, finishes at once with a busy failure.
    pub fn start(
        &mut self,
        requester: Requester,
        snapshot: SnapshotId,
        provider: ProviderKind,
        deadline_ms: u64,
        limit: &str,
        now: u64,
    ) {
        if let Some(current) = self.busy() {
            let error = Failure {
                node: self.node.clone(),
                writer: None,
                phase: Phase::Freezing,
                reason: format!(
                    "{BUSY_PREFIX} snapshot {current} is in flight on node {}",
                    self.node
                ),
            };
            self.out.push_back(CoordOut::Finished {
                requester,
                result: RunResult {
                    snapshot,
                    error: Some(error),
                    phases: vec![],
                    writers: vec![],
                    io_hold_ms: None,
                },
            });
            return;
        }
        let writers = self
            .writers
            .iter()
            .map(|(k, reg)| {
                let w = RunWriter {
                    reg: reg.clone(),
                    state: WriterState::Idle,
                    pending: None,
                    excluded: false,
                    gone: false,
                    frozen_or_freezing: false,
                    outcome_sent: false,
                    outcome: None,
                    fail_phase: None,
                    reason: None,
                    frozen_ms: None,
                    thawed_ms: None,
                };
                (*k, w)
            })
            .collect::<BTreeMap<_, _>>();
        self.run = Some(Run {
            requester,
            snapshot,
            provider,
            start_ms: now,
            deadline_ms,
            limit: limit.to_string(),
            hold_until: deadline_ms,
            step: Step::Freezing,
            phase: Phase::Freezing,
            phase_start: now,
            spans: vec![],
            writers,
            provider_wait: None,
            hold_ms: None,
            release_ms: None,
        });
        self.phase_event(Phase::Freezing, PhaseEdge::Enter, None, now);
        let keys: Vec<WriterKey> = self
            .run
            .as_ref()
            .map(|r| r.writers.keys().copied().collect())
            .unwrap_or_default();
        let lease_ms = deadline_ms.saturating_sub(now);
        for key in keys {
            self.send(key, WriterEvent::Freeze { lease_ms }, now);
        }
        self.progress(now);
    }

    /// The requester cancels the run (the cluster service does when the
    /// initiator is lost or tells it to abort).
    pub fn abort(&mut self, snapshot: SnapshotId, failure: Failure, now: u64) {
        if self.busy() == Some(snapshot) {
            self.abort_run(failure, now);
        }
    }

    /// The requester tells the outcome of a finished run that did not know it
    /// (a helper-provider run): every writer that was sent freeze and has no
    /// outcome yet gets `complete` (`Ok`) or `abort` (`Err(reason)`).
    /// Anything else (unknown snapshot, outcome already known) is ignored.
    pub fn outcome(&mut self, snapshot: SnapshotId, outcome: Result<(), String>) {
        let Some(e) = self
            .ended
            .iter_mut()
            .find(|e| e.snapshot == snapshot && e.outcome.is_none())
        else {
            return;
        };
        let event = match &outcome {
            Ok(()) => WriterEvent::Complete,
            Err(reason) => WriterEvent::Abort {
                reason: reason.clone(),
            },
        };
        e.outcome = Some(outcome);
        for (key, sent) in e.writers.iter_mut() {
            if !*sent {
                *sent = true;
                self.out.push_back(CoordOut::Writer {
                    key: *key,
                    snapshot,
                    event: event.clone(),
                });
            }
        }
    }

    /// A writer answered `event` for `snapshot`. Answers that match no pending
    /// event (late, duplicate, other snapshot) are ignored, except a late
    /// freeze ack for a run that aborted: if that writer was not sent its
    /// abort yet, it is sent now.
    pub fn writer_reply(
        &mut self,
        key: WriterKey,
        snapshot: SnapshotId,
        event: EventKind,
        answer: Answer,
        now: u64,
    ) {
        if self.run.as_ref().map(|r| r.snapshot) != Some(snapshot) {
            return self.late_reply(key, snapshot, event);
        }
        let Some(run) = self.run.as_mut() else { return };
        let phase = run.phase;
        let Some(w) = run.writers.get_mut(&key) else {
            return;
        };
        if w.pending.map(|p| p.0) != Some(event) {
            return;
        }
        let name = w.reg.name.clone();
        match answer {
            Answer::Ack | Answer::AckUntil(_) => {
                w.pending = None;
                match event {
                    EventKind::Freeze => {
                        w.state = WriterState::Frozen;
                        w.frozen_ms = Some(now);
                        if let Answer::AckUntil(until) = answer {
                            run.hold_until = run.hold_until.min(until);
                        }
                    }
                    EventKind::PostSnapshot => w.state = WriterState::Frozen,
                    EventKind::Thaw => {
                        w.state = WriterState::Thawed;
                        w.thawed_ms = Some(now);
                        if w.outcome.is_none() {
                            w.outcome = Some(WriterOutcome::Thawed);
                        }
                    }
                    EventKind::Abort | EventKind::Complete => {}
                }
                self.phase_event(phase, PhaseEdge::Exit, Some(name), now);
                self.progress(now);
            }
            Answer::Veto(reason) => {
                self.writer_failed(key, WriterOutcome::Vetoed, reason, None, now)
            }
            Answer::Failed(f) => {
                let reason = f.reason.clone();
                self.writer_failed(key, WriterOutcome::Vetoed, reason, Some(f), now)
            }
        }
    }

    /// A writer reports, outside any pending event, that the snapshot cannot
    /// be kept (the cluster writer: another node failed or was lost while we
    /// flush or commit). Before the commit returned the run aborts at once;
    /// once thawing it is only recorded.
    pub fn writer_failure(
        &mut self,
        key: WriterKey,
        snapshot: SnapshotId,
        failure: Failure,
        now: u64,
    ) {
        let Some(run) = self.run.as_mut() else { return };
        if run.snapshot != snapshot {
            return;
        }
        let step = run.step;
        let Some(w) = run.writers.get_mut(&key) else {
            return;
        };
        if step == Step::Thawing {
            w.reason = Some(failure.reason);
            return;
        }
        if w.outcome.is_none() {
            w.outcome = Some(WriterOutcome::Vetoed);
            w.fail_phase = Some(run.phase);
            w.reason = Some(failure.reason.clone());
        }
        self.abort_run(failure, now);
    }

    fn late_reply(&mut self, key: WriterKey, snapshot: SnapshotId, event: EventKind) {
        if event != EventKind::Freeze {
            return;
        }
        let Some(e) = self.ended.iter_mut().find(|e| e.snapshot == snapshot) else {
            return;
        };
        let Some(Err(reason)) = &e.outcome else {
            return;
        };
        if let Some(sent) = e.writers.get_mut(&key) {
            if !*sent {
                *sent = true;
                self.out.push_back(CoordOut::Writer {
                    key,
                    snapshot,
                    event: WriterEvent::Abort {
                        reason: reason.clone(),
                    },
                });
            }
        }
    }

    /// The provider returned from `call` (only `FlushAndHold`, `Commit` and
    /// `Complete` return). Stale returns are ignored.
    pub fn provider_returned(
        &mut self,
        snapshot: SnapshotId,
        call: ProviderCall,
        result: Result<(), String>,
        now: u64,
    ) {
        let Some(run) = self.run.as_mut() else { return };
        if run.snapshot != snapshot || run.provider_wait != Some(call) {
            return;
        }
        run.provider_wait = None;
        let phase = run.phase;
        if let Err(reason) = result {
            let f = Failure {
                node: self.node.clone(),
                writer: None,
                phase,
                reason: format!("{call}: {reason}"),
            };
            self.abort_run(f, now);
            return;
        }
        match call {
            ProviderCall::FlushAndHold => {
                // A slow flush may have eaten the margin: the other nodes'
                // leases end at about the deadline, so do not commit now.
                if now.saturating_add(self.commit_margin_ms) >= run.hold_until {
                    let f = Failure {
                        node: self.node.clone(),
                        writer: None,
                        phase,
                        reason: format!(
                            "flush-and-hold ended {} ms before the freeze ends ({}), too close to commit safely (margin {} ms)",
                            run.hold_until.saturating_sub(now),
                            run.limit,
                            self.commit_margin_ms
                        ),
                    };
                    return self.abort_run(f, now);
                }
                run.step = Step::Commit;
                run.provider_wait = Some(ProviderCall::Commit);
                let (kind, snap) = (run.provider, run.snapshot);
                self.out.push_back(CoordOut::Provider {
                    kind,
                    snapshot: snap,
                    call: ProviderCall::Commit,
                });
            }
            ProviderCall::Commit => {
                // The block snapshot is only consistent if every writer was
                // still frozen when it completed: past the earliest hold (less
                // what clock drift may take off another node's lease) some
                // writer may already have resumed.
                let guard = drift_guard(run.start_ms, run.hold_until);
                if now.saturating_add(guard) > run.hold_until {
                    let f = Failure {
                        node: self.node.clone(),
                        writer: None,
                        phase,
                        reason: format!(
                            "the commit completed {} ms after the freeze could be relied on ({}); the snapshot is not kept",
                            (now + guard).saturating_sub(run.hold_until),
                            run.limit
                        ),
                    };
                    return self.abort_run(f, now);
                }
                run.release_ms = Some(now);
                let (kind, snap) = (run.provider, run.snapshot);
                self.out.push_back(CoordOut::Provider {
                    kind,
                    snapshot: snap,
                    call: ProviderCall::Release,
                });
                self.enter_phase(Phase::PostSnapshot, now);
                if let Some(run) = self.run.as_mut() {
                    run.step = Step::PostSnapshot;
                }
                for key in self.live_keys(false) {
                    self.send(key, WriterEvent::PostSnapshot, now);
                }
            }
            ProviderCall::Complete => {}
            ProviderCall::Release | ProviderCall::Abort => {}
        }
        self.progress(now);
    }

    // ---- time ---------------------------------------------------------------

    /// The earliest writer deadline or the run's deadline.
    pub fn poll_timeout(&self) -> Option<u64> {
        let run = self.run.as_ref()?;
        let writers = run
            .writers
            .values()
            .filter_map(|w| w.pending.and_then(|p| p.1));
        let mut t = writers.min();
        if run.step != Step::Thawing {
            t = Some(t.map_or(run.deadline_ms, |t| t.min(run.deadline_ms)));
        }
        t
    }

    /// Writers past their deadline fail their event; a run past its deadline
    /// aborts (or, once thawing, stops waiting for thaw answers).
    pub fn handle_timeout(&mut self, now: u64) {
        loop {
            let Some(run) = self.run.as_ref() else { return };
            let late = run
                .writers
                .iter()
                .find(|(_, w)| w.pending.and_then(|p| p.1).is_some_and(|d| d <= now))
                .map(|(k, w)| (*k, w.pending.map(|p| p.0), w.reg.timeout_ms.unwrap_or(0)));
            let Some((key, Some(event), timeout)) = late else {
                break;
            };
            let reason = format!("no answer to {event} within {timeout} ms");
            self.writer_failed(key, WriterOutcome::TimedOut, reason, None, now);
        }
        let Some(run) = self.run.as_mut() else { return };
        if now < run.deadline_ms {
            return;
        }
        if run.step == Step::Thawing {
            // The snapshot is made and everyone was sent thaw; stop waiting for
            // late thaw answers but still wait for the provider to complete.
            for w in run.writers.values_mut() {
                if w.pending.is_some() {
                    w.pending = None;
                    w.reason = Some("no answer to thaw before the deadline".into());
                }
            }
            self.progress(now);
            return;
        }
        let phase = run.phase;
        let waiting = run
            .writers
            .iter()
            .find(|(_, w)| w.pending.is_some() && !w.excluded)
            .map(|(k, w)| (*k, w.reg.name.clone()));
        let limit = run.limit.clone();
        let f = match waiting {
            // The cluster writer waits for other nodes; the cluster service
            // names the node that did not answer before this fires.
            Some((WriterKey::App(_), w)) => Failure {
                node: self.node.clone(),
                writer: Some(w.clone()),
                phase,
                reason: format!("the {limit} expired in {phase} waiting for writer {w}"),
            },
            _ => Failure {
                node: self.node.clone(),
                writer: None,
                phase,
                reason: format!("the {limit} expired in {phase}"),
            },
        };
        self.abort_run(f, now);
    }

    /// Next instruction, in order.
    pub fn poll(&mut self) -> Option<CoordOut> {
        self.out.pop_front()
    }

    // ---- internals ----------------------------------------------------------

    /// Writers still taking part (not gone, not excluded); with `all`, also the
    /// excluded ones that still need a thaw.
    fn live_keys(&self, all: bool) -> Vec<WriterKey> {
        let Some(run) = self.run.as_ref() else {
            return vec![];
        };
        run.writers
            .iter()
            .filter(|(_, w)| !w.gone && (!w.excluded || (all && w.frozen_or_freezing)))
            .map(|(k, _)| *k)
            .collect()
    }

    fn send(&mut self, key: WriterKey, event: WriterEvent, now: u64) {
        let Some(run) = self.run.as_mut() else { return };
        let snapshot = run.snapshot;
        let phase = run.phase;
        let Some(w) = run.writers.get_mut(&key) else {
            return;
        };
        let kind = event.kind();
        let wait = !w.excluded && !event.is_outcome();
        w.pending = if wait {
            Some((kind, w.reg.timeout_ms.map(|t| now.saturating_add(t))))
        } else {
            None
        };
        match kind {
            EventKind::Freeze => {
                w.state = WriterState::Freezing;
                w.frozen_or_freezing = true;
            }
            EventKind::PostSnapshot => w.state = WriterState::PostSnapshot,
            EventKind::Thaw | EventKind::Abort | EventKind::Complete => {
                w.frozen_or_freezing = false;
                if kind == EventKind::Thaw && wait {
                    w.state = WriterState::Thawing;
                } else {
                    if w.thawed_ms.is_none() && w.frozen_ms.is_some() {
                        w.thawed_ms = Some(now);
                    }
                    if kind == EventKind::Abort {
                        w.state = WriterState::Aborted;
                        if w.outcome.is_none() {
                            w.outcome = Some(WriterOutcome::Aborted);
                        }
                    }
                }
                if event.is_outcome() {
                    w.outcome_sent = true;
                }
            }
        }
        let name = w.reg.name.clone();
        self.out.push_back(CoordOut::Writer {
            key,
            snapshot,
            event,
        });
        if wait {
            self.phase_event(phase, PhaseEdge::Enter, Some(name), now);
        }
    }

    fn writer_failed(
        &mut self,
        key: WriterKey,
        outcome: WriterOutcome,
        reason: String,
        failure: Option<Failure>,
        now: u64,
    ) {
        let node = self.node.clone();
        let Some(run) = self.run.as_mut() else { return };
        let phase = run.phase;
        let step = run.step;
        let Some(w) = run.writers.get_mut(&key) else {
            return;
        };
        let event = w.pending.map(|p| p.0);
        w.pending = None;
        if step == Step::Thawing || event == Some(EventKind::Thaw) {
            // Too late to matter: the snapshot is made and thaw was sent.
            w.reason = Some(reason);
            return self.progress(now);
        }
        w.outcome = Some(outcome);
        w.fail_phase = Some(phase);
        w.reason = Some(reason.clone());
        w.state = match outcome {
            WriterOutcome::Vetoed => WriterState::Vetoed,
            WriterOutcome::TimedOut => WriterState::TimedOut,
            _ => WriterState::Gone,
        };
        if w.reg.on_error == OnError::Continue && failure.is_none() {
            w.excluded = true;
            return self.progress(now);
        }
        let f = failure.unwrap_or(Failure {
            node,
            writer: Some(w.reg.name.clone()),
            phase,
            reason,
        });
        self.abort_run(f, now);
    }

    /// Move the run on when nothing it waits for is outstanding.
    fn progress(&mut self, now: u64) {
        let Some(run) = self.run.as_mut() else { return };
        let waiting = run.writers.values().any(|w| w.pending.is_some());
        match run.step {
            Step::Freezing if !waiting => {
                let commit_phase = run.provider.commit_phase();
                if now.saturating_add(self.commit_margin_ms) >= run.hold_until {
                    let f = Failure {
                        node: self.node.clone(),
                        writer: None,
                        phase: Phase::Freezing,
                        reason: format!(
                            "writers froze {} ms before the freeze ends ({}), too close to commit safely (margin {} ms)",
                            run.hold_until.saturating_sub(now),
                            run.limit,
                            self.commit_margin_ms
                        ),
                    };
                    return self.abort_run(f, now);
                }
                run.step = Step::FlushAndHold;
                run.provider_wait = Some(ProviderCall::FlushAndHold);
                run.hold_ms = Some(now);
                let (kind, snapshot) = (run.provider, run.snapshot);
                self.enter_phase(commit_phase, now);
                self.out.push_back(CoordOut::Provider {
                    kind,
                    snapshot,
                    call: ProviderCall::FlushAndHold,
                });
            }
            Step::PostSnapshot if !waiting => {
                run.step = Step::Thawing;
                run.provider_wait = Some(ProviderCall::Complete);
                let (kind, snapshot) = (run.provider, run.snapshot);
                self.enter_phase(Phase::Thawing, now);
                for key in self.live_keys(true) {
                    self.send(key, WriterEvent::Thaw, now);
                }
                self.out.push_back(CoordOut::Provider {
                    kind,
                    snapshot,
                    call: ProviderCall::Complete,
                });
            }
            Step::Thawing if !waiting && run.provider_wait.is_none() => self.finish(None, now),
            _ => {}
        }
    }

    fn enter_phase(&mut self, phase: Phase, now: u64) {
        let Some(run) = self.run.as_mut() else { return };
        let old = run.phase;
        run.spans.push(PhaseSpan {
            name: old,
            start_ms: run.phase_start,
            end_ms: now,
        });
        run.phase = phase;
        run.phase_start = now;
        self.phase_event(old, PhaseEdge::Exit, None, now);
        self.phase_event(phase, PhaseEdge::Enter, None, now);
    }

    fn abort_run(&mut self, failure: Failure, now: u64) {
        let reason = failure.to_string();
        let Some(run) = self.run.as_ref() else { return };
        let (kind, snapshot) = (run.provider, run.snapshot);
        // Every writer that was sent freeze and has no outcome yet gets abort
        // (which also tells one still frozen to resume).
        for key in self.unresolved_keys() {
            self.send(
                key,
                WriterEvent::Abort {
                    reason: reason.clone(),
                },
                now,
            );
        }
        self.out.push_back(CoordOut::Provider {
            kind,
            snapshot,
            call: ProviderCall::Abort,
        });
        self.finish(Some(failure), now);
    }

    fn finish(&mut self, error: Option<Failure>, now: u64) {
        let end = if error.is_some() {
            Phase::Aborted
        } else {
            Phase::Done
        };
        // A storage-provider run that succeeded has sealed its snapshot: that
        // is the outcome. Tell it before the result goes out, so whoever acts
        // on the result (the cluster writer's peers) hears it first.
        let decided = error.is_none()
            && self
                .run
                .as_ref()
                .is_some_and(|r| r.provider.decides_outcome());
        if decided {
            for key in self.unresolved_keys() {
                self.send(key, WriterEvent::Complete, now);
            }
        }
        self.enter_phase(end, now);
        if let (Some(f), Some(CoordOut::Phase(e))) = (&error, self.out.back_mut()) {
            e.reason = Some(f.to_string());
        }
        let Some(mut run) = self.run.take() else {
            return;
        };
        run.spans.push(PhaseSpan {
            name: end,
            start_ms: now,
            end_ms: now,
        });
        let io_hold_ms = run
            .hold_ms
            .map(|h| run.release_ms.unwrap_or(now).saturating_sub(h));
        let writers = run
            .writers
            .iter()
            .map(|(k, w)| {
                let r = WriterReport {
                    name: w.reg.name.clone(),
                    outcome: w.outcome.unwrap_or(if error.is_some() {
                        WriterOutcome::Aborted
                    } else {
                        WriterOutcome::Thawed
                    }),
                    on_error: w.reg.on_error,
                    phase: w.fail_phase,
                    reason: w.reason.clone(),
                    frozen_ms: w.frozen_ms,
                    thawed_ms: w.thawed_ms,
                };
                (*k, r)
            })
            .collect();
        let outcome = match &error {
            Some(f) => Some(Err(f.to_string())),
            None if decided => Some(Ok(())),
            None => None,
        };
        self.ended.push_back(Ended {
            snapshot: run.snapshot,
            outcome,
            writers: run
                .writers
                .iter()
                .filter(|(_, w)| w.state != WriterState::Idle && !w.gone)
                .map(|(k, w)| (*k, w.outcome_sent))
                .collect(),
        });
        while self.ended.len() > ENDED_KEPT {
            self.ended.pop_front();
        }
        self.out.push_back(CoordOut::Finished {
            requester: run.requester,
            result: RunResult {
                snapshot: run.snapshot,
                error,
                phases: run.spans,
                writers,
                io_hold_ms,
            },
        });
        self.last = Some((run.snapshot, end));
        for key in std::mem::take(&mut self.deferred) {
            self.out.push_back(CoordOut::Registered { key });
        }
    }

    /// Writers of the run that were sent freeze, are still connected and
    /// were not told an outcome yet.
    fn unresolved_keys(&self) -> Vec<WriterKey> {
        let Some(run) = self.run.as_ref() else {
            return vec![];
        };
        run.writers
            .iter()
            .filter(|(_, w)| w.state != WriterState::Idle && !w.gone && !w.outcome_sent)
            .map(|(k, _)| *k)
            .collect()
    }

    fn phase_event(&mut self, phase: Phase, edge: PhaseEdge, writer: Option<String>, now: u64) {
        let Some(run) = self.run.as_ref() else { return };
        self.out.push_back(CoordOut::Phase(PhaseEvent {
            snapshot: run.snapshot,
            node: self.node.clone(),
            phase,
            edge,
            at_ms: now,
            writer,
            reason: None,
        }));
    }
}

#[cfg(test)]
mod tests {
    //! The coordinator alone, with plain writers and no cluster at all: the
    //! VSS sequence and its failure rules.
    use super::*;

    const W1: WriterKey = WriterKey::App(1);
    const W2: WriterKey = WriterKey::App(2);

    fn drain(c: &mut Coordinator) -> Vec<CoordOut> {
        std::iter::from_fn(|| c.poll())
            .filter(|o| !matches!(o, CoordOut::Phase(_)))
            .collect()
    }

    fn two_writers() -> Coordinator {
        let mut c = Coordinator::new("n1", 100);
        c.add_writer(W1, "db", OnError::Fail, Some(500));
        c.add_writer(W2, "cache", OnError::Continue, Some(500));
        assert_eq!(
            drain(&mut c),
            vec![
                CoordOut::Registered { key: W1 },
                CoordOut::Registered { key: W2 }
            ],
            "registered at once while idle"
        );
        c
    }

    fn provider(call: ProviderCall) -> CoordOut {
        CoordOut::Provider {
            kind: ProviderKind::Storage,
            snapshot: 7,
            call,
        }
    }

    fn writer(key: WriterKey, event: WriterEvent) -> CoordOut {
        CoordOut::Writer {
            key,
            snapshot: 7,
            event,
        }
    }

    #[test]
    fn runs_freeze_flush_and_hold_commit_release_post_snapshot_thaw_in_order() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        assert_eq!(
            drain(&mut c),
            vec![
                writer(W1, WriterEvent::Freeze { lease_ms: 10_000 }),
                writer(W2, WriterEvent::Freeze { lease_ms: 10_000 })
            ]
        );
        c.writer_reply(W1, 7, EventKind::Freeze, Answer::Ack, 1);
        assert_eq!(drain(&mut c), vec![], "waits for every writer");
        c.writer_reply(W2, 7, EventKind::Freeze, Answer::Ack, 2);
        assert_eq!(drain(&mut c), vec![provider(ProviderCall::FlushAndHold)]);
        c.provider_returned(7, ProviderCall::FlushAndHold, Ok(()), 3);
        assert_eq!(drain(&mut c), vec![provider(ProviderCall::Commit)]);
        c.provider_returned(7, ProviderCall::Commit, Ok(()), 4);
        assert_eq!(
            drain(&mut c),
            vec![
                provider(ProviderCall::Release),
                writer(W1, WriterEvent::PostSnapshot),
                writer(W2, WriterEvent::PostSnapshot)
            ]
        );
        c.writer_reply(W1, 7, EventKind::PostSnapshot, Answer::Ack, 5);
        c.writer_reply(W2, 7, EventKind::PostSnapshot, Answer::Ack, 5);
        assert_eq!(
            drain(&mut c),
            vec![
                writer(W1, WriterEvent::Thaw),
                writer(W2, WriterEvent::Thaw),
                provider(ProviderCall::Complete)
            ]
        );
        c.writer_reply(W1, 7, EventKind::Thaw, Answer::Ack, 6);
        c.writer_reply(W2, 7, EventKind::Thaw, Answer::Ack, 6);
        c.provider_returned(7, ProviderCall::Complete, Ok(()), 6);
        let out = drain(&mut c);
        let [complete1, complete2, CoordOut::Finished {
            requester: Requester::Client(1),
            result,
        }] = out.as_slice()
        else {
            panic!("expected two outcomes and one result, got {out:?}")
        };
        assert_eq!(
            (complete1, complete2),
            (
                &writer(W1, WriterEvent::Complete),
                &writer(W2, WriterEvent::Complete)
            ),
            "the sealed snapshot is every writer's outcome"
        );
        assert_eq!(result.error, None);
        assert_eq!(result.io_hold_ms, Some(4 - 2), "flush-and-hold to release");
        let names: Vec<Phase> = result.phases.iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            vec![
                Phase::Freezing,
                Phase::Committing,
                Phase::PostSnapshot,
                Phase::Thawing,
                Phase::Done
            ]
        );
        assert_eq!(c.busy(), None);
        assert_eq!(c.phase(), Some((7, Phase::Done)));
    }

    #[test]
    fn veto_from_a_fail_writer_aborts_everyone_and_names_it() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        drain(&mut c);
        c.writer_reply(W2, 7, EventKind::Freeze, Answer::Ack, 1);
        c.writer_reply(
            W1,
            7,
            EventKind::Freeze,
            Answer::Veto("disk full".into()),
            2,
        );
        let out = drain(&mut c);
        assert!(out.contains(&writer(
            W2,
            WriterEvent::Abort {
                reason: "node n1 writer db in freezing: disk full".into()
            }
        )));
        assert!(out.contains(&provider(ProviderCall::Abort)));
        let Some(CoordOut::Finished { result, .. }) = out.last() else {
            panic!("{out:?}")
        };
        let f = result.error.clone().expect("failed");
        assert_eq!(
            (f.node.as_str(), f.writer.as_deref(), f.phase),
            ("n1", Some("db"), Phase::Freezing)
        );
    }

    #[test]
    fn continue_writer_timing_out_is_recorded_and_skipped() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        drain(&mut c);
        c.writer_reply(W1, 7, EventKind::Freeze, Answer::Ack, 1);
        assert_eq!(c.poll_timeout(), Some(500));
        c.handle_timeout(500);
        assert_eq!(drain(&mut c), vec![provider(ProviderCall::FlushAndHold)]);
        let w = c.writers();
        assert_eq!(
            w.iter().find(|w| w.0 == W2).map(|w| w.3),
            Some(WriterState::TimedOut)
        );
    }

    #[test]
    fn lease_expiry_aborts_and_releases_the_hold() {
        let mut c = two_writers();
        c.start(
            Requester::ClusterService,
            7,
            ProviderKind::Helper,
            1_000,
            "lease",
            0,
        );
        drain(&mut c);
        c.writer_reply(W1, 7, EventKind::Freeze, Answer::Ack, 1);
        c.writer_reply(W2, 7, EventKind::Freeze, Answer::Ack, 1);
        c.provider_returned(7, ProviderCall::FlushAndHold, Ok(()), 2);
        drain(&mut c);
        assert_eq!(
            c.phase(),
            Some((7, Phase::Frozen)),
            "the helper provider's commit phase"
        );
        assert_eq!(c.poll_timeout(), Some(1_000));
        c.handle_timeout(999);
        assert_eq!(drain(&mut c), vec![], "not before the deadline");
        c.handle_timeout(1_000);
        let out = drain(&mut c);
        assert!(out.contains(&CoordOut::Provider {
            kind: ProviderKind::Helper,
            snapshot: 7,
            call: ProviderCall::Abort
        }));
        assert_eq!(
            out.iter()
                .filter(|o| matches!(
                    o,
                    CoordOut::Writer {
                        event: WriterEvent::Abort { .. },
                        ..
                    }
                ))
                .count(),
            2
        );
        assert_eq!(c.busy(), None);
    }

    #[test]
    fn second_start_while_busy_is_refused_without_disturbing_the_first() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        drain(&mut c);
        c.start(
            Requester::Client(2),
            8,
            ProviderKind::Storage,
            10_000,
            "lease",
            1,
        );
        let out = drain(&mut c);
        let [CoordOut::Finished {
            requester: Requester::Client(2),
            result,
        }] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert!(result
            .error
            .as_ref()
            .is_some_and(|e| e.reason.starts_with(BUSY_PREFIX)));
        assert_eq!(c.busy(), Some(7));
    }

    #[test]
    fn late_and_foreign_answers_are_ignored() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        drain(&mut c);
        c.writer_reply(W1, 6, EventKind::Freeze, Answer::Veto("old".into()), 1);
        c.writer_reply(
            W1,
            7,
            EventKind::Thaw,
            Answer::Veto("wrong event".into()),
            1,
        );
        c.writer_reply(
            WriterKey::App(99),
            7,
            EventKind::Freeze,
            Answer::Veto("stranger".into()),
            1,
        );
        c.provider_returned(7, ProviderCall::Commit, Ok(()), 1);
        assert_eq!(drain(&mut c), vec![]);
        assert_eq!(c.busy(), Some(7));
    }

    fn outcomes(out: &[CoordOut]) -> Vec<(WriterKey, EventKind)> {
        out.iter()
            .filter_map(|o| match o {
                CoordOut::Writer { key, event, .. } if event.is_outcome() => {
                    Some((*key, event.kind()))
                }
                _ => None,
            })
            .collect()
    }

    /// Runs `c` (two writers, acking everything) to the end of thaw.
    fn run_to_thawed(c: &mut Coordinator, requester: Requester, provider: ProviderKind) {
        c.start(requester, 7, provider, 10_000, "lease", 0);
        for w in [W1, W2] {
            c.writer_reply(w, 7, EventKind::Freeze, Answer::Ack, 1);
        }
        c.provider_returned(7, ProviderCall::FlushAndHold, Ok(()), 2);
        c.provider_returned(7, ProviderCall::Commit, Ok(()), 3);
        for w in [W1, W2] {
            c.writer_reply(w, 7, EventKind::PostSnapshot, Answer::Ack, 4);
        }
        for w in [W1, W2] {
            c.writer_reply(w, 7, EventKind::Thaw, Answer::Ack, 5);
        }
    }

    #[test]
    fn a_helper_run_waits_for_its_outcome_and_tells_each_writer_once() {
        let mut c = two_writers();
        run_to_thawed(&mut c, Requester::ClusterService, ProviderKind::Helper);
        c.provider_returned(7, ProviderCall::Complete, Ok(()), 6);
        let out = drain(&mut c);
        assert_eq!(outcomes(&out), vec![], "thaw is not the outcome");
        assert!(matches!(out.last(), Some(CoordOut::Finished { .. })));
        assert_eq!(c.awaiting_outcome(), Some(7));
        c.outcome(7, Ok(()));
        assert_eq!(
            outcomes(&drain(&mut c)),
            vec![(W1, EventKind::Complete), (W2, EventKind::Complete)]
        );
        c.outcome(7, Err("late word".into()));
        assert_eq!(drain(&mut c), vec![], "one outcome per writer, ever");
        assert_eq!(c.awaiting_outcome(), None);
    }

    #[test]
    fn a_seal_that_fails_after_thaw_makes_abort_the_outcome() {
        let mut c = two_writers();
        run_to_thawed(&mut c, Requester::Client(1), ProviderKind::Storage);
        c.provider_returned(7, ProviderCall::Complete, Err("catalog gone".into()), 6);
        let out = drain(&mut c);
        assert_eq!(
            outcomes(&out),
            vec![(W1, EventKind::Abort), (W2, EventKind::Abort)],
            "thawed writers still hear that the snapshot is not kept"
        );
        assert!(out.contains(&provider(ProviderCall::Abort)));
    }

    #[test]
    fn a_writer_registering_mid_run_is_told_registered_only_after_the_run() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        drain(&mut c);
        c.add_writer(WriterKey::App(3), "late", OnError::Fail, Some(500));
        assert_eq!(drain(&mut c), vec![], "not while the snapshot runs");
        c.writer_reply(W1, 7, EventKind::Freeze, Answer::Veto("no".into()), 1);
        let out = drain(&mut c);
        let finished = out
            .iter()
            .position(|o| matches!(o, CoordOut::Finished { .. }))
            .expect("finished");
        assert_eq!(
            out.get(finished + 1),
            Some(&CoordOut::Registered {
                key: WriterKey::App(3)
            })
        );
        c.start(
            Requester::Client(2),
            8,
            ProviderKind::Storage,
            10_002,
            "lease",
            2,
        );
        assert!(
            drain(&mut c).contains(&CoordOut::Writer {
                key: WriterKey::App(3),
                snapshot: 8,
                event: WriterEvent::Freeze { lease_ms: 10_000 }
            }),
            "and it freezes for the next one"
        );
    }

    #[test]
    fn a_frozen_writer_disconnecting_before_commit_aborts_the_snapshot() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        c.writer_reply(W1, 7, EventKind::Freeze, Answer::Ack, 1);
        drain(&mut c);
        c.remove_writer(W1, 2);
        let out = drain(&mut c);
        let Some(CoordOut::Finished { result, .. }) = out.last() else {
            panic!("{out:?}")
        };
        let f = result.error.clone().expect("failed");
        assert_eq!(f.writer.as_deref(), Some("db"));
        assert_eq!(f.reason, "writer disconnected while frozen");
    }

    #[test]
    fn a_failure_heard_while_committing_aborts_at_once_and_deletes_what_the_create_makes() {
        let mut c = two_writers();
        c.add_writer(WriterKey::Cluster, "cluster-writer", OnError::Fail, None);
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        for w in [W1, W2, WriterKey::Cluster] {
            c.writer_reply(w, 7, EventKind::Freeze, Answer::Ack, 1);
        }
        c.provider_returned(7, ProviderCall::FlushAndHold, Ok(()), 2);
        drain(&mut c);
        let f = Failure {
            node: "n2".into(),
            writer: None,
            phase: Phase::Frozen,
            reason: "lease expired".into(),
        };
        c.writer_failure(WriterKey::Cluster, 7, f.clone(), 3);
        let out = drain(&mut c);
        assert!(out.contains(&provider(ProviderCall::Abort)), "{out:?}");
        let Some(CoordOut::Finished { result, .. }) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(result.error, Some(f));
    }

    #[test]
    fn a_commit_that_completes_after_the_earliest_hold_is_not_kept() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        c.writer_reply(W1, 7, EventKind::Freeze, Answer::AckUntil(3_000), 1);
        c.writer_reply(W2, 7, EventKind::Freeze, Answer::Ack, 1);
        c.provider_returned(7, ProviderCall::FlushAndHold, Ok(()), 2);
        drain(&mut c);
        // 1 % of the 3 s hold is what another node's clock may take off it.
        c.provider_returned(7, ProviderCall::Commit, Ok(()), 2_980);
        let out = drain(&mut c);
        assert!(out.contains(&provider(ProviderCall::Abort)), "{out:?}");
        let Some(CoordOut::Finished { result, .. }) = out.last() else {
            panic!("{out:?}")
        };
        let reason = result.error.clone().expect("failed").reason;
        assert!(reason.contains("not kept"), "{reason}");
    }

    #[test]
    fn a_commit_well_inside_the_hold_is_kept() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        c.writer_reply(W1, 7, EventKind::Freeze, Answer::AckUntil(3_000), 1);
        c.writer_reply(W2, 7, EventKind::Freeze, Answer::Ack, 1);
        c.provider_returned(7, ProviderCall::FlushAndHold, Ok(()), 2);
        drain(&mut c);
        c.provider_returned(7, ProviderCall::Commit, Ok(()), 2_900);
        assert!(drain(&mut c).contains(&provider(ProviderCall::Release)));
    }

    #[test]
    fn a_writer_that_answers_freeze_after_its_timeout_gets_exactly_one_abort() {
        let mut c = Coordinator::new("n1", 100);
        c.add_writer(W1, "db", OnError::Fail, Some(500));
        drain(&mut c);
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        drain(&mut c);
        c.handle_timeout(500);
        assert_eq!(outcomes(&drain(&mut c)), vec![(W1, EventKind::Abort)]);
        c.writer_reply(W1, 7, EventKind::Freeze, Answer::Ack, 700);
        assert_eq!(
            drain(&mut c),
            vec![],
            "its abort is already on the way: no second outcome"
        );
    }

    #[test]
    fn the_request_timeout_is_named_when_it_expires() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            400,
            "request's timeout of 400 ms",
            0,
        );
        drain(&mut c);
        c.handle_timeout(400);
        let out = drain(&mut c);
        let Some(CoordOut::Finished { result, .. }) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(
            result.error.clone().expect("failed").reason,
            "the request's timeout of 400 ms expired in freezing waiting for writer db"
        );
    }

    #[test]
    fn the_aborted_event_says_who_failed_where_and_why() {
        let mut c = two_writers();
        c.start(
            Requester::Client(1),
            7,
            ProviderKind::Storage,
            10_000,
            "lease",
            0,
        );
        c.writer_reply(
            W1,
            7,
            EventKind::Freeze,
            Answer::Veto("replication lag".into()),
            3,
        );
        let aborted: Vec<PhaseEvent> = std::iter::from_fn(|| c.poll())
            .filter_map(|o| match o {
                CoordOut::Phase(e) if e.phase == Phase::Aborted && e.edge == PhaseEdge::Enter => {
                    Some(e)
                }
                _ => None,
            })
            .collect();
        assert_eq!(aborted.len(), 1);
        assert_eq!(
            aborted[0].reason.as_deref(),
            Some("node n1 writer db in freezing: replication lag")
        );
    }
}
