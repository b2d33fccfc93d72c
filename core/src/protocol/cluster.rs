//! The two pieces that make one node's coordinator cluster-wide without it
//! knowing (seed 001, figures 3 and 4, claims 1, 8 and 14):
//!
//! - [`ClusterWriter`]: registered on the coordinator as just another writer.
//!   On the initiator it carries freeze, post-snapshot and the outcome to the
//!   cluster service and blocks until every other node reported; on another
//!   node (a snapshot its own cluster service started) it returns at once.
//! - [`ClusterService`]: the node's peer on the mesh. On the initiator it
//!   sends freeze-notice / post-snapshot / abort / complete to every other
//!   node and collects their answers; on another node it asks the local
//!   coordinator for a snapshot with the helper provider, as if it were a
//!   backup application, enforces the lease by aborting it when the
//!   initiator is lost, and after its run waits for the initiator's outcome
//!   (claim 14) — or, when the initiator is gone, has the catalog decide it.

use super::coordinator::Answer;
use super::message::PeerMessage;
use super::types::*;
use std::collections::{BTreeMap, VecDeque};

/// A short fingerprint of a member list (sorted, deduplicated names), shown
/// in `status` and in mismatch errors so that operators can compare the
/// lists of all nodes at a glance: the first 12 hex digits of blake3 over
/// the names joined by newlines.
pub fn members_digest(members: &[String]) -> String {
    let mut list: Vec<&str> = members.iter().map(String::as_str).collect();
    list.sort_unstable();
    list.dedup();
    let hash = blake3::hash(list.join("\n").as_bytes());
    hash.to_hex()[..12].to_string()
}

/// How long past its lease a node waits for the initiator's outcome before it
/// has the catalog decide (delete the snapshot unless the initiator sealed it).
pub const OUTCOME_GRACE_MS: u64 = 1_000;

/// What the cluster writer produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CwOut {
    /// Return from a writer event to the coordinator.
    Answer {
        snapshot: SnapshotId,
        event: EventKind,
        answer: Answer,
    },
    /// A failure heard while the coordinator waited on nothing from us: the
    /// snapshot cannot be kept (another node failed or was lost).
    Failure {
        snapshot: SnapshotId,
        failure: Failure,
    },
    /// Tell the cluster service that the coordinator sent this event.
    Freeze {
        snapshot: SnapshotId,
    },
    PostSnapshot {
        snapshot: SnapshotId,
    },
    Abort {
        snapshot: SnapshotId,
        reason: String,
    },
    Complete {
        snapshot: SnapshotId,
    },
}

/// See the module doc. Call [`ClusterWriter::set_remote`] before the
/// coordinator starts a snapshot on behalf of another node.
#[derive(Debug, Default)]
pub struct ClusterWriter {
    /// The snapshot this node's cluster service started for an initiator:
    /// for it, every event returns at once.
    remote: Option<SnapshotId>,
    /// The initiator's snapshot this writer was sent freeze for and no
    /// outcome yet.
    active: Option<SnapshotId>,
    /// The event the coordinator waits on.
    pending: Option<(SnapshotId, EventKind)>,
    out: VecDeque<CwOut>,
}

impl ClusterWriter {
    /// The coordinator's next snapshot is run for an initiator elsewhere.
    pub fn set_remote(&mut self, snapshot: SnapshotId) {
        self.remote = Some(snapshot);
    }

    /// An event from the coordinator.
    pub fn event(&mut self, snapshot: SnapshotId, event: &WriterEvent) {
        let kind = event.kind();
        if self.remote == Some(snapshot) {
            if !event.is_outcome() {
                self.out.push_back(CwOut::Answer {
                    snapshot,
                    event: kind,
                    answer: Answer::Ack,
                });
            }
            return;
        }
        match event {
            WriterEvent::Freeze { .. } | WriterEvent::PostSnapshot => {
                if kind == EventKind::Freeze {
                    self.active = Some(snapshot);
                }
                self.pending = Some((snapshot, kind));
                self.out.push_back(if kind == EventKind::Freeze {
                    CwOut::Freeze { snapshot }
                } else {
                    CwOut::PostSnapshot { snapshot }
                });
            }
            // The other nodes thawed themselves before reporting done.
            WriterEvent::Thaw => self.out.push_back(CwOut::Answer {
                snapshot,
                event: kind,
                answer: Answer::Ack,
            }),
            WriterEvent::Abort { reason } => {
                self.pending = None;
                self.active = None;
                self.out.push_back(CwOut::Abort {
                    snapshot,
                    reason: reason.clone(),
                });
            }
            WriterEvent::Complete => {
                self.active = None;
                self.out.push_back(CwOut::Complete { snapshot });
            }
        }
    }

    /// Cluster service: every other node is frozen and flushed, and holds
    /// until `until_ms` at the earliest.
    pub fn all_frozen(&mut self, snapshot: SnapshotId, until_ms: u64) {
        if self.pending == Some((snapshot, EventKind::Freeze)) {
            self.pending = None;
            self.out.push_back(CwOut::Answer {
                snapshot,
                event: EventKind::Freeze,
                answer: Answer::AckUntil(until_ms),
            });
        }
    }

    /// Cluster service: every other node finished post-snapshot and thawed.
    pub fn all_done(&mut self, snapshot: SnapshotId) {
        if self.pending == Some((snapshot, EventKind::PostSnapshot)) {
            self.pending = None;
            self.out.push_back(CwOut::Answer {
                snapshot,
                event: EventKind::PostSnapshot,
                answer: Answer::Ack,
            });
        }
    }

    /// Cluster service: the snapshot failed on another node (or it was lost).
    /// It is the answer to the event the coordinator waits on, or else a
    /// failure reported at once.
    pub fn failed(&mut self, snapshot: SnapshotId, failure: Failure) {
        match self.pending {
            Some((s, event)) if s == snapshot => {
                self.pending = None;
                self.out.push_back(CwOut::Answer {
                    snapshot,
                    event,
                    answer: Answer::Failed(failure),
                });
            }
            _ if self.active == Some(snapshot) => {
                self.out.push_back(CwOut::Failure { snapshot, failure })
            }
            _ => {}
        }
    }

    pub fn poll(&mut self) -> Option<CwOut> {
        self.out.pop_front()
    }
}

/// What the cluster service produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CsOut {
    Send {
        to: String,
        msg: PeerMessage,
    },
    /// To the cluster writer: every other node is frozen, and holds until
    /// `until_ms` (this node's clock) at the earliest.
    AllFrozen {
        snapshot: SnapshotId,
        until_ms: u64,
    },
    AllDone {
        snapshot: SnapshotId,
    },
    Failed {
        snapshot: SnapshotId,
        failure: Failure,
    },
    /// Ask the local coordinator for a snapshot with the helper provider that
    /// must end by `deadline_ms` (the lease).
    StartLocal {
        snapshot: SnapshotId,
        deadline_ms: u64,
        limit: String,
    },
    /// Cancel the local snapshot started by `StartLocal`; `node` is whose
    /// fault it is.
    AbortLocal {
        snapshot: SnapshotId,
        node: String,
        reason: String,
    },
    /// Tell the helper provider to return from commit.
    ReleaseHelper {
        snapshot: SnapshotId,
    },
    /// The snapshot's outcome for the local writers: `Ok` kept, `Err` not.
    Outcome {
        snapshot: SnapshotId,
        outcome: Result<(), String>,
    },
    /// The initiator is gone: have the catalog decide the snapshot (delete it
    /// unless it is sealed) and answer [`ClusterService::resolved`].
    Resolve {
        snapshot: SnapshotId,
    },
}

/// Where another node stands, as the initiator's cluster service sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerState {
    Notified,
    Frozen,
    PostSent,
    Done,
    Failed,
}

impl PeerState {
    /// The phase the node is in, for failure reports.
    fn phase(self) -> Phase {
        match self {
            PeerState::Notified => Phase::Freezing,
            PeerState::Frozen => Phase::Frozen,
            PeerState::PostSent | PeerState::Done => Phase::PostSnapshot,
            PeerState::Failed => Phase::Aborted,
        }
    }
    fn active(self) -> bool {
        matches!(
            self,
            PeerState::Notified | PeerState::Frozen | PeerState::PostSent
        )
    }
}

#[derive(Debug)]
struct InitRun {
    snapshot: SnapshotId,
    deadline_ms: u64,
    /// What the deadline is, for failure reasons.
    limit: String,
    /// When the freeze notices went out.
    notified_ms: u64,
    peers: BTreeMap<String, PeerState>,
    /// Until when each frozen node holds, in this node's clock (lower bound).
    holds: BTreeMap<String, u64>,
    /// Reports of nodes that finished (done or failed), for the final report.
    reports: Vec<NodeReport>,
    /// Members left out by the driver's safety rule (fenced, not attached).
    excluded: Vec<Excluded>,
    /// A failure was passed on; nothing more is waited for.
    failed: bool,
    /// The cluster writer event waiting for every node.
    waiting: Option<EventKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RemoteStep {
    /// The local coordinator runs the snapshot.
    Running,
    /// The run finished here; waiting for the initiator's outcome.
    AwaitingOutcome,
    /// The catalog is deciding the outcome (`Resolve` is out).
    Resolving,
}

#[derive(Debug)]
struct RemoteRun {
    snapshot: SnapshotId,
    initiator: String,
    /// The lease this node granted (min of its own and the notice's).
    granted_ms: u64,
    deadline_ms: u64,
    step: RemoteStep,
    /// We reported frozen: from now on only the initiator's word moves us on,
    /// so a lease that runs out is the initiator's silence.
    frozen_sent: bool,
    /// The initiator told us to abort: it needs no failure report back and
    /// deletes what it made itself.
    aborted_by_initiator: bool,
}

#[derive(Debug)]
enum Role {
    Idle,
    Initiator(InitRun),
    Remote(RemoteRun),
}

/// The node's role in the snapshot in flight, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum NodeRole {
    Initiator,
    Remote { initiator: String },
}

/// See the module doc.
#[derive(Debug)]
pub struct ClusterService {
    node: String,
    /// This node's own lease: a remote node never holds longer.
    lease_ms: u64,
    /// Every member, this node included, sorted: sent in freeze notices so
    /// that nodes with different member lists refuse to snapshot together.
    members: Vec<String>,
    /// Every other member and whether the mesh connects us now.
    peers: BTreeMap<String, bool>,
    /// The member list each connected peer announced when it connected (or
    /// after its last `node reload`), sorted. A difference is named at
    /// connection time and refuses every snapshot that would ask that peer.
    announced: BTreeMap<String, Vec<String>>,
    role: Role,
    /// The highest snapshot this node took part in as a remote (ids grow
    /// cluster-wide): a notice for it or an older one is a duplicate or a
    /// replay, and running it again would freeze writers for a snapshot
    /// that is over.
    last_taken: SnapshotId,
    out: VecDeque<CsOut>,
}

impl ClusterService {
    pub fn new(node: &str, members: &[String], lease_ms: u64) -> ClusterService {
        let peers = members
            .iter()
            .filter(|p| *p != node)
            .map(|p| (p.clone(), false))
            .collect();
        let mut all: Vec<String> = members.to_vec();
        if !all.iter().any(|m| m == node) {
            all.push(node.to_string());
        }
        all.sort();
        all.dedup();
        ClusterService {
            node: node.to_string(),
            lease_ms,
            members: all,
            peers,
            announced: BTreeMap::new(),
            role: Role::Idle,
            last_taken: 0,
            out: VecDeque::new(),
        }
    }

    /// A new member list (`node reload`), applied between snapshots: new
    /// peers start disconnected, removed ones are forgotten.
    pub fn set_members(&mut self, members: &[String]) {
        let old = std::mem::take(&mut self.peers);
        self.peers = members
            .iter()
            .filter(|p| **p != self.node)
            .map(|p| (p.clone(), old.get(p).copied().unwrap_or(false)))
            .collect();
        let mut all: Vec<String> = members.to_vec();
        if !all.iter().any(|m| *m == self.node) {
            all.push(self.node.clone());
        }
        all.sort();
        all.dedup();
        self.members = all;
        let peers = &self.peers;
        self.announced.retain(|p, _| peers.contains_key(p));
    }

    pub fn is_member(&self, node: &str) -> bool {
        self.peers.contains_key(node)
    }

    /// Every member, this node included, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// `node` announced its member list (on connecting, and after each of
    /// its reloads). Forgotten when it disconnects.
    pub fn peer_members(&mut self, node: &str, members: &[String]) {
        if !self.peers.contains_key(node) {
            return;
        }
        let mut list = members.to_vec();
        list.sort();
        list.dedup();
        self.announced.insert(node.to_string(), list);
    }

    /// How `node`'s announced member list differs from this node's, in
    /// words an operator can act on; `None` when they agree or `node` has
    /// not announced one.
    pub fn member_mismatch(&self, node: &str) -> Option<String> {
        let theirs = self.announced.get(node)?;
        if *theirs == self.members {
            return None;
        }
        let only_here: Vec<&str> = self
            .members
            .iter()
            .filter(|m| !theirs.contains(m))
            .map(String::as_str)
            .collect();
        let only_there: Vec<&str> = theirs
            .iter()
            .filter(|m| !self.members.contains(m))
            .map(String::as_str)
            .collect();
        let mut diff = Vec::new();
        if !only_here.is_empty() {
            diff.push(format!("{node} does not list {}", only_here.join(", ")));
        }
        if !only_there.is_empty() {
            diff.push(format!(
                "{node} lists {} which {} does not",
                only_there.join(", "),
                self.node
            ));
        }
        Some(format!(
            "the member list of node {node} (digest {}) differs from node {}'s (digest {}): {}; \
             make [cluster] members the same on every node, then run `freezeframe node reload` on each",
            members_digest(theirs),
            self.node,
            members_digest(&self.members),
            diff.join("; ")
        ))
    }

    pub fn peers(&self) -> impl Iterator<Item = (&String, &bool)> {
        self.peers.iter()
    }

    /// The snapshot this service is engaged in, if any (a remote node stays
    /// engaged until it knows the outcome).
    pub fn engaged(&self) -> Option<SnapshotId> {
        match &self.role {
            Role::Idle => None,
            Role::Initiator(r) => Some(r.snapshot),
            Role::Remote(r) => Some(r.snapshot),
        }
    }

    pub fn role(&self) -> Option<NodeRole> {
        match &self.role {
            Role::Idle => None,
            Role::Initiator(_) => Some(NodeRole::Initiator),
            Role::Remote(r) => Some(NodeRole::Remote {
                initiator: r.initiator.clone(),
            }),
        }
    }

    // ---- initiator side ---------------------------------------------------

    /// This node initiates `snapshot`, which must end by `deadline_ms`;
    /// `limit` says what that deadline is ("lease of 10000 ms", "request's
    /// timeout of 1000 ms"), for failure reasons; `excluded` members are not
    /// asked (the driver's safety rule decided).
    pub fn prepare_initiator(
        &mut self,
        snapshot: SnapshotId,
        deadline_ms: u64,
        limit: &str,
        excluded: Vec<Excluded>,
    ) {
        self.role = Role::Initiator(InitRun {
            snapshot,
            deadline_ms,
            limit: limit.to_string(),
            notified_ms: 0,
            peers: BTreeMap::new(),
            holds: BTreeMap::new(),
            reports: vec![],
            excluded,
            failed: false,
            waiting: None,
        });
    }

    /// Cluster writer: the coordinator sent freeze. Every member must be
    /// connected; each gets a freeze-notice with the lease left.
    pub fn writer_freeze(&mut self, snapshot: SnapshotId, now: u64) {
        // A peer whose member list differs (announced when it connected)
        // would refuse the notice anyway; refuse here, naming it, before
        // any other node is asked to freeze.
        let differing = match &self.role {
            Role::Initiator(run) => self
                .peers
                .keys()
                .filter(|p| !run.excluded.iter().any(|e| &e.node == *p))
                .find_map(|p| self.member_mismatch(p).map(|why| (p.clone(), why))),
            _ => None,
        };
        let Role::Initiator(run) = &mut self.role else {
            return;
        };
        if run.snapshot != snapshot {
            return;
        }
        let left_out = |p: &String| run.excluded.iter().any(|e| &e.node == p);
        if let Some((down, _)) = self.peers.iter().find(|(p, up)| !**up && !left_out(p)) {
            let failure = Failure {
                node: down.clone(),
                writer: None,
                phase: Phase::Freezing,
                reason: format!("node {down} is not connected"),
            };
            run.failed = true;
            self.out.push_back(CsOut::Failed { snapshot, failure });
            return;
        }
        if let Some((node, reason)) = differing {
            let failure = Failure {
                node,
                writer: None,
                phase: Phase::Freezing,
                reason,
            };
            run.failed = true;
            self.out.push_back(CsOut::Failed { snapshot, failure });
            return;
        }
        let lease_ms = run.deadline_ms.saturating_sub(now);
        run.waiting = Some(EventKind::Freeze);
        run.notified_ms = now;
        let excluded: Vec<String> = run.excluded.iter().map(|e| e.node.clone()).collect();
        for peer in self.peers.keys().filter(|p| !excluded.contains(p)) {
            run.peers.insert(peer.clone(), PeerState::Notified);
            let msg = PeerMessage::FreezeNotice {
                snapshot,
                initiator: self.node.clone(),
                lease_ms,
                members: self.members.clone(),
            };
            self.out.push_back(CsOut::Send {
                to: peer.clone(),
                msg,
            });
        }
        self.check_all(snapshot);
    }

    /// Cluster writer: the coordinator sent post-snapshot.
    pub fn writer_post_snapshot(&mut self, snapshot: SnapshotId) {
        let Role::Initiator(run) = &mut self.role else {
            return;
        };
        if run.snapshot != snapshot || run.failed {
            return;
        }
        run.waiting = Some(EventKind::PostSnapshot);
        for (peer, state) in run.peers.iter_mut() {
            *state = PeerState::PostSent;
            self.out.push_back(CsOut::Send {
                to: peer.clone(),
                msg: PeerMessage::PostSnapshot { snapshot },
            });
        }
        self.check_all(snapshot);
    }

    /// Cluster writer: the coordinator aborted. Every node still in the
    /// snapshot, or done and waiting for the outcome, is told.
    pub fn writer_abort(&mut self, snapshot: SnapshotId, reason: &str) {
        let Role::Initiator(run) = &mut self.role else {
            return;
        };
        if run.snapshot != snapshot {
            return;
        }
        run.failed = true;
        for (peer, state) in run.peers.iter_mut() {
            if state.active() || *state == PeerState::Done {
                *state = PeerState::Failed;
                let msg = PeerMessage::Abort {
                    snapshot,
                    reason: reason.to_string(),
                };
                self.out.push_back(CsOut::Send {
                    to: peer.clone(),
                    msg,
                });
            }
        }
    }

    /// Cluster writer: the snapshot is sealed. Every node is told the
    /// outcome (seed 001, claim 14).
    pub fn writer_complete(&mut self, snapshot: SnapshotId) {
        let Role::Initiator(run) = &mut self.role else {
            return;
        };
        if run.snapshot != snapshot {
            return;
        }
        for (peer, state) in run.peers.iter() {
            if *state == PeerState::Done {
                self.out.push_back(CsOut::Send {
                    to: peer.clone(),
                    msg: PeerMessage::Complete { snapshot },
                });
            }
        }
    }

    /// The coordinator finished the initiator's run: hand over the other
    /// nodes' reports and the members left out, and become idle.
    pub fn finish_initiator(&mut self, snapshot: SnapshotId) -> (Vec<NodeReport>, Vec<Excluded>) {
        match std::mem::replace(&mut self.role, Role::Idle) {
            Role::Initiator(run) if run.snapshot == snapshot => (run.reports, run.excluded),
            other => {
                self.role = other;
                (vec![], vec![])
            }
        }
    }

    /// Answer the cluster writer once every other node has reached the
    /// state the waited-for event needs (at once when there is no other node).
    fn check_all(&mut self, snapshot: SnapshotId) {
        let Role::Initiator(run) = &mut self.role else {
            return;
        };
        if run.failed {
            return;
        }
        let all = |want: PeerState| run.peers.values().all(|s| *s == want);
        match run.waiting {
            Some(EventKind::Freeze) if all(PeerState::Frozen) => {
                run.waiting = None;
                let until_ms = run
                    .holds
                    .values()
                    .copied()
                    .min()
                    .unwrap_or(run.deadline_ms)
                    .min(run.deadline_ms);
                self.out.push_back(CsOut::AllFrozen { snapshot, until_ms });
            }
            Some(EventKind::PostSnapshot) if all(PeerState::Done) => {
                run.waiting = None;
                self.out.push_back(CsOut::AllDone { snapshot });
            }
            _ => {}
        }
    }

    fn peer_failed(&mut self, node: &str, failure: Failure, report: Option<NodeReport>) {
        let Role::Initiator(run) = &mut self.role else {
            return;
        };
        let Some(state) = run.peers.get_mut(node) else {
            return;
        };
        *state = PeerState::Failed;
        run.reports.extend(report);
        if !run.failed {
            run.failed = true;
            self.out.push_back(CsOut::Failed {
                snapshot: run.snapshot,
                failure,
            });
        }
    }

    // ---- both sides ---------------------------------------------------------

    /// A message from `from` (an authenticated member). `local_busy` is the
    /// snapshot the local coordinator runs or awaits the outcome of, if any.
    pub fn peer_message(
        &mut self,
        from: &str,
        msg: PeerMessage,
        now: u64,
        local_busy: Option<SnapshotId>,
    ) {
        let snapshot = msg.snapshot();
        match msg {
            PeerMessage::FreezeNotice {
                lease_ms, members, ..
            } => self.freeze_notice(from, snapshot, lease_ms, members, now, local_busy),
            PeerMessage::PostSnapshot { .. } => {
                if self.is_remote_from(snapshot, from, RemoteStep::Running) {
                    self.out.push_back(CsOut::ReleaseHelper { snapshot });
                }
            }
            PeerMessage::Abort { reason, .. } => {
                let Role::Remote(r) = &mut self.role else {
                    return;
                };
                if r.snapshot != snapshot || r.initiator != from {
                    return;
                }
                let reason = format!("aborted by initiator {from}: {reason}");
                match r.step {
                    RemoteStep::Running => {
                        r.aborted_by_initiator = true;
                        self.out.push_back(CsOut::AbortLocal {
                            snapshot,
                            node: from.to_string(),
                            reason,
                        });
                    }
                    RemoteStep::AwaitingOutcome => {
                        self.role = Role::Idle;
                        self.out.push_back(CsOut::Outcome {
                            snapshot,
                            outcome: Err(reason),
                        });
                    }
                    // The catalog decides; the initiator's word changes nothing.
                    RemoteStep::Resolving => {}
                }
            }
            PeerMessage::Complete { .. } => {
                if self.is_remote_from(snapshot, from, RemoteStep::AwaitingOutcome) {
                    self.role = Role::Idle;
                    self.out.push_back(CsOut::Outcome {
                        snapshot,
                        outcome: Ok(()),
                    });
                }
            }
            PeerMessage::Frozen { granted_ms, .. } => {
                if let Role::Initiator(run) = &mut self.role {
                    if run.snapshot == snapshot && run.peers.get(from) == Some(&PeerState::Notified)
                    {
                        // The node's lease started when it received our
                        // notice, which was after we sent it: a lower bound.
                        let until = if granted_ms == 0 {
                            run.deadline_ms
                        } else {
                            run.notified_ms.saturating_add(granted_ms)
                        };
                        run.holds.insert(from.to_string(), until);
                    }
                }
                self.peer_advanced(from, snapshot, PeerState::Notified, PeerState::Frozen, None)
            }
            PeerMessage::Done { report, .. } => self.peer_advanced(
                from,
                snapshot,
                PeerState::PostSent,
                PeerState::Done,
                Some(report),
            ),
            PeerMessage::Busy { current, .. } => {
                if self.is_initiator_of(snapshot) {
                    let failure = Failure {
                        node: from.to_string(),
                        writer: None,
                        phase: Phase::Freezing,
                        reason: format!("{BUSY_PREFIX} node {from} is in snapshot {current}"),
                    };
                    self.peer_failed(from, failure, None);
                }
            }
            PeerMessage::Failed { error, report, .. } => {
                if self.is_initiator_of(snapshot) {
                    self.peer_failed(from, error, Some(report));
                }
            }
        }
    }

    fn freeze_notice(
        &mut self,
        from: &str,
        snapshot: SnapshotId,
        lease_ms: u64,
        members: Vec<String>,
        now: u64,
        local_busy: Option<SnapshotId>,
    ) {
        if let Role::Remote(r) = &self.role {
            if r.snapshot == snapshot && r.initiator == from {
                return; // a duplicate
            }
        }
        if let Some(current) = local_busy.or(self.engaged()) {
            let msg = PeerMessage::Busy {
                snapshot,
                node: self.node.clone(),
                current,
            };
            self.out.push_back(CsOut::Send {
                to: from.to_string(),
                msg,
            });
            return;
        }
        if snapshot <= self.last_taken {
            // A duplicate, or a replay of an earlier snapshot's notice:
            // that snapshot is over here.
            return;
        }
        if !members.is_empty() && members != self.members {
            // Nodes that disagree on who is in the cluster cannot promise
            // that everyone attached froze: refuse, naming both lists.
            let error = Failure {
                node: self.node.clone(),
                writer: None,
                phase: Phase::Freezing,
                reason: format!(
                    "member lists differ: {from} has [{}], {} has [{}]",
                    members.join(", "),
                    self.node,
                    self.members.join(", ")
                ),
            };
            let report = NodeReport {
                node: self.node.clone(),
                phases: vec![],
                writers: vec![],
            };
            self.out.push_back(CsOut::Send {
                to: from.to_string(),
                msg: PeerMessage::Failed {
                    snapshot,
                    error,
                    report,
                },
            });
            return;
        }
        let granted_ms = lease_ms.min(self.lease_ms);
        let limit = if granted_ms < lease_ms {
            format!("lease of {granted_ms} ms (this node's own, shorter than {from}'s)")
        } else {
            format!("lease of {granted_ms} ms from {from}'s notice")
        };
        let deadline_ms = now.saturating_add(granted_ms);
        self.last_taken = snapshot;
        self.role = Role::Remote(RemoteRun {
            snapshot,
            initiator: from.to_string(),
            granted_ms,
            deadline_ms,
            step: RemoteStep::Running,
            frozen_sent: false,
            aborted_by_initiator: false,
        });
        self.out.push_back(CsOut::StartLocal {
            snapshot,
            deadline_ms,
            limit,
        });
    }

    fn is_initiator_of(&self, snapshot: SnapshotId) -> bool {
        matches!(&self.role, Role::Initiator(r) if r.snapshot == snapshot)
    }

    fn is_remote_from(&self, snapshot: SnapshotId, from: &str, step: RemoteStep) -> bool {
        matches!(&self.role, Role::Remote(r) if r.snapshot == snapshot && r.initiator == from && r.step == step)
    }

    fn peer_advanced(
        &mut self,
        from: &str,
        snapshot: SnapshotId,
        was: PeerState,
        now: PeerState,
        report: Option<NodeReport>,
    ) {
        let Role::Initiator(run) = &mut self.role else {
            return;
        };
        if run.snapshot != snapshot {
            return;
        }
        let Some(state) = run.peers.get_mut(from) else {
            return;
        };
        if *state != was {
            return;
        }
        *state = now;
        run.reports.extend(report);
        self.check_all(snapshot);
    }

    pub fn peer_up(&mut self, node: &str) {
        if let Some(up) = self.peers.get_mut(node) {
            *up = true;
        }
    }

    /// The mesh lost `node`. On the initiator a node still in the snapshot
    /// fails it; on another node, losing the initiator aborts the local
    /// snapshot at once (no application stays frozen for a dead initiator),
    /// and a node waiting for the outcome has the catalog decide it.
    pub fn peer_down(&mut self, node: &str) {
        let Some(up) = self.peers.get_mut(node) else {
            return;
        };
        *up = false;
        self.announced.remove(node);
        match &mut self.role {
            Role::Initiator(run) => {
                if let Some(state) = run.peers.get(node).copied().filter(|s| s.active()) {
                    let failure = Failure {
                        node: node.to_string(),
                        writer: None,
                        phase: state.phase(),
                        reason: format!("lost connection to node {node}"),
                    };
                    self.peer_failed(node, failure, None);
                }
            }
            Role::Remote(r) if r.initiator == node => match r.step {
                RemoteStep::Running => {
                    let reason = format!("lost connection to initiator {node}");
                    self.out.push_back(CsOut::AbortLocal {
                        snapshot: r.snapshot,
                        node: node.to_string(),
                        reason,
                    });
                }
                RemoteStep::AwaitingOutcome => {
                    r.step = RemoteStep::Resolving;
                    self.out.push_back(CsOut::Resolve {
                        snapshot: r.snapshot,
                    });
                }
                RemoteStep::Resolving => {}
            },
            _ => {}
        }
    }

    // ---- remote side ----------------------------------------------------------

    /// Helper provider: the local coordinator committed; tell the initiator
    /// this node is frozen and flushed, and how long it holds.
    pub fn committed(&mut self, snapshot: SnapshotId) {
        if let Role::Remote(r) = &mut self.role {
            if r.snapshot == snapshot && r.step == RemoteStep::Running {
                r.frozen_sent = true;
                let msg = PeerMessage::Frozen {
                    snapshot,
                    node: self.node.clone(),
                    granted_ms: r.granted_ms,
                };
                self.out.push_back(CsOut::Send {
                    to: r.initiator.clone(),
                    msg,
                });
            }
        }
    }

    /// The local coordinator finished the snapshot this service requested:
    /// report done (then wait for the outcome) or failed to the initiator.
    /// A run that failed here for any reason but the initiator's abort has
    /// the catalog delete whatever the initiator may have made: without our
    /// `done` it can never be kept, and the initiator may be gone.
    pub fn local_finished(
        &mut self,
        snapshot: SnapshotId,
        report: NodeReport,
        error: Option<Failure>,
    ) {
        let Role::Remote(r) = &mut self.role else {
            return;
        };
        if r.snapshot != snapshot || r.step != RemoteStep::Running {
            return;
        }
        let to = r.initiator.clone();
        match error {
            None => {
                r.step = RemoteStep::AwaitingOutcome;
                self.out.push_back(CsOut::Send {
                    to,
                    msg: PeerMessage::Done { snapshot, report },
                });
            }
            Some(error) => {
                let by_initiator = r.aborted_by_initiator;
                self.role = Role::Idle;
                if !by_initiator {
                    self.out.push_back(CsOut::Send {
                        to,
                        msg: PeerMessage::Failed {
                            snapshot,
                            error,
                            report,
                        },
                    });
                    self.out.push_back(CsOut::Resolve { snapshot });
                }
            }
        }
    }

    /// The driver's answer to [`CsOut::Resolve`]: `Ok(true)` the snapshot is
    /// sealed (kept), `Ok(false)` it was deleted or never made, `Err` the
    /// catalog could not be read.
    pub fn resolved(&mut self, snapshot: SnapshotId, kept: Result<bool, String>) {
        let Role::Remote(r) = &self.role else {
            return;
        };
        if r.snapshot != snapshot || r.step != RemoteStep::Resolving {
            return;
        }
        let initiator = r.initiator.clone();
        self.role = Role::Idle;
        let outcome = match kept {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "initiator {initiator} did not tell the outcome; the snapshot was not sealed and is deleted"
            )),
            Err(e) => Err(format!(
                "initiator {initiator} did not tell the outcome and the catalog could not decide it: {e}"
            )),
        };
        self.out.push_back(CsOut::Outcome { snapshot, outcome });
    }

    // ---- time -------------------------------------------------------------------

    /// The initiator's deadline while it waits for other nodes; a remote
    /// node's outcome deadline while it waits for the initiator's word.
    pub fn poll_timeout(&self) -> Option<u64> {
        match &self.role {
            Role::Initiator(run) if !run.failed && run.peers.values().any(|s| s.active()) => {
                Some(run.deadline_ms)
            }
            Role::Remote(r) if r.step == RemoteStep::AwaitingOutcome => {
                Some(r.deadline_ms.saturating_add(OUTCOME_GRACE_MS))
            }
            Role::Remote(r) if r.step == RemoteStep::Running && r.frozen_sent => {
                Some(r.deadline_ms)
            }
            _ => None,
        }
    }

    /// At the deadline, name the first node that has not answered; the
    /// coordinator's own deadline (the same instant) then aborts with it.
    /// A remote node past its outcome deadline has the catalog decide.
    pub fn handle_timeout(&mut self, now: u64) {
        if let Role::Remote(r) = &mut self.role {
            if r.step == RemoteStep::AwaitingOutcome
                && now >= r.deadline_ms.saturating_add(OUTCOME_GRACE_MS)
            {
                r.step = RemoteStep::Resolving;
                let snapshot = r.snapshot;
                self.out.push_back(CsOut::Resolve { snapshot });
            } else if r.step == RemoteStep::Running && r.frozen_sent && now >= r.deadline_ms {
                // Frozen and waiting for the initiator when the lease ran out:
                // the initiator went silent (stopped, hung, cut off), not us.
                // Runs before the coordinator's own deadline, so the abort
                // names the right node.
                r.frozen_sent = false;
                let initiator = r.initiator.clone();
                let reason = format!(
                    "initiator {initiator} sent no post-snapshot within the lease ({} ms)",
                    r.granted_ms
                );
                let snapshot = r.snapshot;
                self.out.push_back(CsOut::AbortLocal {
                    snapshot,
                    node: initiator,
                    reason,
                });
            }
            return;
        }
        let Role::Initiator(run) = &self.role else {
            return;
        };
        if run.failed || now < run.deadline_ms {
            return;
        }
        // Blame a node that never froze before one that has not reported
        // done after post-snapshot. A node that froze and waits for our
        // post-snapshot is not late: we are (the coordinator's own deadline
        // names our phase then).
        let late = run
            .peers
            .iter()
            .find(|(_, s)| **s == PeerState::Notified)
            .or_else(|| run.peers.iter().find(|(_, s)| **s == PeerState::PostSent))
            .map(|(n, s)| (n.clone(), *s));
        if let Some((node, state)) = late {
            let waited = if state == PeerState::Notified {
                "frozen"
            } else {
                "done"
            };
            let failure = Failure {
                node: node.clone(),
                writer: None,
                phase: state.phase(),
                reason: format!(
                    "node {node} did not report {waited} before the {} expired",
                    run.limit
                ),
            };
            // The late node is still in the snapshot as far as we know: it
            // stays active so that the abort reaches it (its own lease may
            // end later than ours in true time).
            let snapshot = run.snapshot;
            if let Role::Initiator(run) = &mut self.role {
                run.failed = true;
            }
            self.out.push_back(CsOut::Failed { snapshot, failure });
        }
    }

    pub fn poll(&mut self) -> Option<CsOut> {
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_cw(w: &mut ClusterWriter) -> Vec<CwOut> {
        std::iter::from_fn(|| w.poll()).collect()
    }

    #[test]
    fn cluster_writer_on_a_remote_node_returns_at_once() {
        let mut w = ClusterWriter::default();
        w.set_remote(4);
        for event in [
            WriterEvent::Freeze { lease_ms: 5_000 },
            WriterEvent::PostSnapshot,
            WriterEvent::Thaw,
        ] {
            let kind = event.kind();
            w.event(4, &event);
            assert_eq!(
                drain_cw(&mut w),
                vec![CwOut::Answer {
                    snapshot: 4,
                    event: kind,
                    answer: Answer::Ack
                }]
            );
        }
    }

    #[test]
    fn cluster_writer_on_the_initiator_blocks_until_every_node_reported() {
        let mut w = ClusterWriter::default();
        w.event(4, &WriterEvent::Freeze { lease_ms: 5_000 });
        assert_eq!(drain_cw(&mut w), vec![CwOut::Freeze { snapshot: 4 }]);
        w.all_done(4);
        assert_eq!(
            drain_cw(&mut w),
            vec![],
            "the wrong event does not release it"
        );
        w.all_frozen(4, 4_321);
        assert_eq!(
            drain_cw(&mut w),
            vec![CwOut::Answer {
                snapshot: 4,
                event: EventKind::Freeze,
                answer: Answer::AckUntil(4_321)
            }]
        );
    }

    #[test]
    fn a_failure_heard_between_events_is_reported_at_once() {
        let mut w = ClusterWriter::default();
        let f = Failure {
            node: "n3".into(),
            writer: None,
            phase: Phase::Frozen,
            reason: "lost".into(),
        };
        w.failed(4, f.clone());
        assert_eq!(
            drain_cw(&mut w),
            vec![],
            "nothing in flight: nothing to fail"
        );
        w.event(4, &WriterEvent::Freeze { lease_ms: 5_000 });
        w.all_frozen(4, 5_000);
        drain_cw(&mut w);
        w.failed(4, f.clone());
        assert_eq!(
            drain_cw(&mut w),
            vec![CwOut::Failure {
                snapshot: 4,
                failure: f
            }],
            "while the coordinator commits it must hear at once"
        );
    }

    #[test]
    fn cluster_service_tells_a_late_node_it_missed_the_lease() {
        let mut cs = ClusterService::new("n1", &["n1".into(), "n2".into()], 1_000);
        cs.peer_up("n2");
        cs.prepare_initiator(4, 1_000, "lease of 1000 ms", vec![]);
        cs.writer_freeze(4, 100);
        let notice = PeerMessage::FreezeNotice {
            snapshot: 4,
            initiator: "n1".into(),
            lease_ms: 900,
            members: vec!["n1".into(), "n2".into()],
        };
        assert_eq!(
            cs.poll(),
            Some(CsOut::Send {
                to: "n2".into(),
                msg: notice
            })
        );
        assert_eq!(cs.poll_timeout(), Some(1_000));
        cs.handle_timeout(1_000);
        let Some(CsOut::Failed { failure, .. }) = cs.poll() else {
            panic!("expected a failure")
        };
        assert_eq!(
            (failure.node.as_str(), failure.phase),
            ("n2", Phase::Freezing)
        );
        assert_eq!(
            failure.reason,
            "node n2 did not report frozen before the lease of 1000 ms expired"
        );
    }

    #[test]
    fn at_the_lease_a_frozen_node_waiting_for_post_snapshot_is_not_blamed_and_hears_the_abort() {
        let members: Vec<String> = ["n1", "n2"].iter().map(|m| m.to_string()).collect();
        let mut cs = ClusterService::new("n1", &members, 1_000);
        cs.peer_up("n2");
        cs.prepare_initiator(4, 1_000, "lease of 1000 ms", vec![]);
        cs.writer_freeze(4, 0);
        cs.poll();
        let frozen = PeerMessage::Frozen {
            snapshot: 4,
            node: "n2".into(),
            granted_ms: 1_000,
        };
        cs.peer_message("n2", frozen, 10, None);
        cs.poll();
        // Our own create is slow: the lease runs out while n2 waits for us.
        cs.handle_timeout(1_000);
        assert_eq!(cs.poll(), None, "n2 is not late; our coordinator is");
        cs.writer_abort(4, "the lease of 1000 ms expired in committing");
        assert_eq!(
            cs.poll(),
            Some(CsOut::Send {
                to: "n2".into(),
                msg: PeerMessage::Abort {
                    snapshot: 4,
                    reason: "the lease of 1000 ms expired in committing".into()
                }
            })
        );
    }

    #[test]
    fn a_notice_heard_again_after_its_run_ended_is_ignored() {
        let mut cs = remote(5_000);
        cs.peer_message("n1", notice(5_000, &["n1", "n2"]), 0, None);
        assert!(matches!(cs.poll(), Some(CsOut::StartLocal { .. })));
        cs.peer_message(
            "n1",
            PeerMessage::Abort {
                snapshot: 4,
                reason: "veto".into(),
            },
            10,
            Some(4),
        );
        cs.poll();
        let report = NodeReport {
            node: "n2".into(),
            phases: vec![],
            writers: vec![],
        };
        cs.local_finished(
            4,
            report,
            Some(Failure {
                node: "n1".into(),
                writer: None,
                phase: Phase::Freezing,
                reason: "veto".into(),
            }),
        );
        assert_eq!(cs.engaged(), None);
        cs.peer_message("n1", notice(5_000, &["n1", "n2"]), 20, None);
        assert_eq!(cs.poll(), None, "snapshot 4 is over: not run again");
    }

    #[test]
    fn a_node_blamed_at_the_lease_is_still_sent_the_abort() {
        let mut cs = ClusterService::new("n1", &["n1".into(), "n2".into()], 1_000);
        cs.peer_up("n2");
        cs.prepare_initiator(4, 1_000, "lease of 1000 ms", vec![]);
        cs.writer_freeze(4, 0);
        cs.poll();
        cs.handle_timeout(1_000);
        assert!(matches!(cs.poll(), Some(CsOut::Failed { .. })));
        cs.writer_abort(4, "n2 did not report frozen");
        assert!(
            matches!(
                cs.poll(),
                Some(CsOut::Send {
                    msg: PeerMessage::Abort { .. },
                    ..
                })
            ),
            "a late node may be frozen still: it must hear the abort"
        );
    }

    fn notice(lease_ms: u64, members: &[&str]) -> PeerMessage {
        PeerMessage::FreezeNotice {
            snapshot: 4,
            initiator: "n1".into(),
            lease_ms,
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn remote(lease_ms: u64) -> ClusterService {
        let members: Vec<String> = ["n1", "n2"].iter().map(|m| m.to_string()).collect();
        let mut cs = ClusterService::new("n2", &members, lease_ms);
        cs.peer_up("n1");
        cs
    }

    #[test]
    fn a_remote_node_holds_no_longer_than_its_own_lease_and_says_so() {
        let mut cs = remote(2_000);
        cs.peer_message("n1", notice(9_000, &["n1", "n2"]), 100, None);
        let Some(CsOut::StartLocal {
            deadline_ms, limit, ..
        }) = cs.poll()
        else {
            panic!("expected a local start")
        };
        assert_eq!(deadline_ms, 2_100, "min(own 2 s, notice 9 s) from receipt");
        assert!(limit.contains("this node's own"), "{limit}");
        cs.committed(4);
        assert_eq!(
            cs.poll(),
            Some(CsOut::Send {
                to: "n1".into(),
                msg: PeerMessage::Frozen {
                    snapshot: 4,
                    node: "n2".into(),
                    granted_ms: 2_000
                }
            })
        );
    }

    #[test]
    fn the_initiator_commits_only_within_the_shortest_lease_a_node_granted() {
        let members: Vec<String> = ["n1", "n2"].iter().map(|m| m.to_string()).collect();
        let mut cs = ClusterService::new("n1", &members, 10_000);
        cs.peer_up("n2");
        cs.prepare_initiator(4, 10_000, "lease of 10000 ms", vec![]);
        cs.writer_freeze(4, 0);
        cs.poll();
        let frozen = PeerMessage::Frozen {
            snapshot: 4,
            node: "n2".into(),
            granted_ms: 2_000,
        };
        cs.peer_message("n2", frozen, 50, None);
        assert_eq!(
            cs.poll(),
            Some(CsOut::AllFrozen {
                snapshot: 4,
                until_ms: 2_000
            })
        );
    }

    #[test]
    fn a_node_with_another_member_list_refuses_naming_both() {
        let mut cs = remote(5_000);
        cs.peer_message("n1", notice(5_000, &["n1", "n2", "n3"]), 0, None);
        let Some(CsOut::Send {
            msg: PeerMessage::Failed { error, .. },
            ..
        }) = cs.poll()
        else {
            panic!("expected a refusal")
        };
        assert_eq!(
            error.reason,
            "member lists differ: n1 has [n1, n2, n3], n2 has [n1, n2]"
        );
        assert_eq!(cs.engaged(), None);
    }

    #[test]
    fn after_done_a_remote_waits_for_the_outcome_and_passes_it_on() {
        let mut cs = remote(5_000);
        cs.peer_message("n1", notice(5_000, &["n1", "n2"]), 0, None);
        cs.poll();
        let report = NodeReport {
            node: "n2".into(),
            phases: vec![],
            writers: vec![],
        };
        cs.local_finished(4, report, None);
        assert!(matches!(
            cs.poll(),
            Some(CsOut::Send {
                msg: PeerMessage::Done { .. },
                ..
            })
        ));
        assert_eq!(cs.engaged(), Some(4), "busy until the outcome is known");
        cs.peer_message("n1", PeerMessage::Complete { snapshot: 4 }, 10, None);
        assert_eq!(
            cs.poll(),
            Some(CsOut::Outcome {
                snapshot: 4,
                outcome: Ok(())
            })
        );
        assert_eq!(cs.engaged(), None);
    }

    #[test]
    fn a_remote_that_loses_the_initiator_after_done_has_the_catalog_decide() {
        let mut cs = remote(5_000);
        cs.peer_message("n1", notice(5_000, &["n1", "n2"]), 0, None);
        cs.poll();
        let report = NodeReport {
            node: "n2".into(),
            phases: vec![],
            writers: vec![],
        };
        cs.local_finished(4, report, None);
        cs.poll();
        cs.peer_down("n1");
        assert_eq!(cs.poll(), Some(CsOut::Resolve { snapshot: 4 }));
        cs.peer_message("n1", PeerMessage::Complete { snapshot: 4 }, 10, None);
        assert_eq!(cs.poll(), None, "the catalog decides now, not a late word");
        cs.resolved(4, Ok(false));
        let Some(CsOut::Outcome {
            outcome: Err(reason),
            ..
        }) = cs.poll()
        else {
            panic!("expected an abort outcome")
        };
        assert!(reason.contains("not sealed and is deleted"), "{reason}");
    }

    #[test]
    fn a_remote_that_hears_nothing_after_done_decides_at_its_lease_plus_grace() {
        let mut cs = remote(5_000);
        cs.peer_message("n1", notice(5_000, &["n1", "n2"]), 0, None);
        cs.poll();
        let report = NodeReport {
            node: "n2".into(),
            phases: vec![],
            writers: vec![],
        };
        cs.local_finished(4, report, None);
        cs.poll();
        assert_eq!(cs.poll_timeout(), Some(5_000 + OUTCOME_GRACE_MS));
        cs.handle_timeout(5_000 + OUTCOME_GRACE_MS);
        assert_eq!(cs.poll(), Some(CsOut::Resolve { snapshot: 4 }));
        cs.resolved(4, Ok(true));
        assert_eq!(
            cs.poll(),
            Some(CsOut::Outcome {
                snapshot: 4,
                outcome: Ok(())
            }),
            "the initiator sealed it before it went quiet"
        );
    }
}
