//! The two pieces that make one node's coordinator cluster-wide without it
//! knowing (seed 001, figures 3 and 4, claims 1 and 8):
//!
//! - [`ClusterWriter`]: registered on the coordinator as just another writer.
//!   On the initiator it carries freeze and post-snapshot to the cluster
//!   service and blocks until every other node reported; on another node
//!   (a snapshot its own cluster service started) it returns at once.
//! - [`ClusterService`]: the node's peer on the mesh. On the initiator it
//!   sends freeze-notice / post-snapshot / abort to every other node and
//!   collects their answers; on another node it asks the local coordinator
//!   for a snapshot with the helper provider, as if it were a backup
//!   application, and enforces the lease by aborting it when the initiator
//!   is lost.

use super::coordinator::Answer;
use super::message::PeerMessage;
use super::types::*;
use std::collections::{BTreeMap, VecDeque};

/// What the cluster writer produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CwOut {
    /// Return from a writer event to the coordinator.
    Answer {
        snapshot: SnapshotId,
        event: EventKind,
        answer: Answer,
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
}

/// See the module doc. Call [`ClusterWriter::set_remote`] before the
/// coordinator starts a snapshot on behalf of another node.
#[derive(Debug, Default)]
pub struct ClusterWriter {
    /// The snapshot this node's cluster service started for an initiator:
    /// for it, every event returns at once.
    remote: Option<SnapshotId>,
    /// The event the coordinator waits on.
    pending: Option<(SnapshotId, EventKind)>,
    /// A failure heard while nothing was pending; given as the answer to the
    /// next event of that snapshot.
    failure: Option<(SnapshotId, Failure)>,
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
            if kind != EventKind::Abort {
                self.out.push_back(CwOut::Answer {
                    snapshot,
                    event: kind,
                    answer: Answer::Ack,
                });
            }
            return;
        }
        match event {
            WriterEvent::Freeze | WriterEvent::PostSnapshot => {
                if let Some((s, f)) = self.failure.take() {
                    if s == snapshot {
                        self.out.push_back(CwOut::Answer {
                            snapshot,
                            event: kind,
                            answer: Answer::Failed(f),
                        });
                        return;
                    }
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
                self.failure = None;
                self.out.push_back(CwOut::Abort {
                    snapshot,
                    reason: reason.clone(),
                });
            }
        }
    }

    /// Cluster service: every other node is frozen and flushed.
    pub fn all_frozen(&mut self, snapshot: SnapshotId) {
        self.answer_if_pending(snapshot, EventKind::Freeze);
    }

    /// Cluster service: every other node finished post-snapshot and thawed.
    pub fn all_done(&mut self, snapshot: SnapshotId) {
        self.answer_if_pending(snapshot, EventKind::PostSnapshot);
    }

    /// Cluster service: the snapshot failed on another node (or it was lost).
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
            _ => self.failure = Some((snapshot, failure)),
        }
    }

    fn answer_if_pending(&mut self, snapshot: SnapshotId, event: EventKind) {
        if self.pending == Some((snapshot, event)) {
            self.pending = None;
            self.out.push_back(CwOut::Answer {
                snapshot,
                event,
                answer: Answer::Ack,
            });
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
    /// To the cluster writer.
    AllFrozen {
        snapshot: SnapshotId,
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
    peers: BTreeMap<String, PeerState>,
    /// Reports of nodes that finished (done or failed), for the final report.
    reports: Vec<NodeReport>,
    /// A failure was passed on; nothing more is waited for.
    failed: bool,
    /// The cluster writer event waiting for every node.
    waiting: Option<EventKind>,
}

#[derive(Debug)]
struct RemoteRun {
    snapshot: SnapshotId,
    initiator: String,
    /// The initiator told us to abort: it needs no failure report back.
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
    /// Every other member and whether the mesh connects us now.
    peers: BTreeMap<String, bool>,
    role: Role,
    out: VecDeque<CsOut>,
}

impl ClusterService {
    pub fn new(node: &str, peers: &[String]) -> ClusterService {
        let peers = peers
            .iter()
            .filter(|p| *p != node)
            .map(|p| (p.clone(), false))
            .collect();
        ClusterService {
            node: node.to_string(),
            peers,
            role: Role::Idle,
            out: VecDeque::new(),
        }
    }

    pub fn is_member(&self, node: &str) -> bool {
        self.peers.contains_key(node)
    }

    pub fn peers(&self) -> impl Iterator<Item = (&String, &bool)> {
        self.peers.iter()
    }

    /// The snapshot this service is engaged in, if any.
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

    /// This node initiates `snapshot`, which must end by `deadline_ms`.
    pub fn prepare_initiator(&mut self, snapshot: SnapshotId, deadline_ms: u64) {
        self.role = Role::Initiator(InitRun {
            snapshot,
            deadline_ms,
            peers: BTreeMap::new(),
            reports: vec![],
            failed: false,
            waiting: None,
        });
    }

    /// Cluster writer: the coordinator sent freeze. Every member must be
    /// connected; each gets a freeze-notice with the lease left.
    pub fn writer_freeze(&mut self, snapshot: SnapshotId, now: u64) {
        let Role::Initiator(run) = &mut self.role else {
            return;
        };
        if run.snapshot != snapshot {
            return;
        }
        if let Some((down, _)) = self.peers.iter().find(|(_, up)| !**up) {
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
        let lease_ms = run.deadline_ms.saturating_sub(now);
        run.waiting = Some(EventKind::Freeze);
        for peer in self.peers.keys() {
            run.peers.insert(peer.clone(), PeerState::Notified);
            let msg = PeerMessage::FreezeNotice {
                snapshot,
                initiator: self.node.clone(),
                lease_ms,
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
    /// snapshot is told.
    pub fn writer_abort(&mut self, snapshot: SnapshotId, reason: &str) {
        let Role::Initiator(run) = &mut self.role else {
            return;
        };
        if run.snapshot != snapshot {
            return;
        }
        run.failed = true;
        for (peer, state) in run.peers.iter_mut() {
            if state.active() {
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

    /// The coordinator finished the initiator's run: hand over the other
    /// nodes' reports and become idle.
    pub fn finish_initiator(&mut self, snapshot: SnapshotId) -> Vec<NodeReport> {
        match std::mem::replace(&mut self.role, Role::Idle) {
            Role::Initiator(run) if run.snapshot == snapshot => run.reports,
            other => {
                self.role = other;
                vec![]
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
                self.out.push_back(CsOut::AllFrozen { snapshot });
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
    /// snapshot the local coordinator runs, if any.
    pub fn peer_message(
        &mut self,
        from: &str,
        msg: PeerMessage,
        now: u64,
        local_busy: Option<SnapshotId>,
    ) {
        let snapshot = msg.snapshot();
        match msg {
            PeerMessage::FreezeNotice { lease_ms, .. } => {
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
                self.role = Role::Remote(RemoteRun {
                    snapshot,
                    initiator: from.to_string(),
                    aborted_by_initiator: false,
                });
                self.out.push_back(CsOut::StartLocal {
                    snapshot,
                    deadline_ms: now.saturating_add(lease_ms),
                });
            }
            PeerMessage::PostSnapshot { .. } => {
                if self.is_remote_from(snapshot, from) {
                    self.out.push_back(CsOut::ReleaseHelper { snapshot });
                }
            }
            PeerMessage::Abort { reason, .. } => {
                if let Role::Remote(r) = &mut self.role {
                    if r.snapshot == snapshot && r.initiator == from {
                        r.aborted_by_initiator = true;
                        let reason = format!("aborted by initiator {from}: {reason}");
                        self.out.push_back(CsOut::AbortLocal {
                            snapshot,
                            node: from.to_string(),
                            reason,
                        });
                    }
                }
            }
            PeerMessage::Frozen { .. } => {
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

    fn is_initiator_of(&self, snapshot: SnapshotId) -> bool {
        matches!(&self.role, Role::Initiator(r) if r.snapshot == snapshot)
    }

    fn is_remote_from(&self, snapshot: SnapshotId, from: &str) -> bool {
        matches!(&self.role, Role::Remote(r) if r.snapshot == snapshot && r.initiator == from)
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
    /// snapshot at once (no application stays frozen for a dead initiator).
    pub fn peer_down(&mut self, node: &str) {
        let Some(up) = self.peers.get_mut(node) else {
            return;
        };
        *up = false;
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
            Role::Remote(r) if r.initiator == node => {
                let reason = format!("lost connection to initiator {node}");
                self.out.push_back(CsOut::AbortLocal {
                    snapshot: r.snapshot,
                    node: node.to_string(),
                    reason,
                });
            }
            _ => {}
        }
    }

    // ---- remote side ----------------------------------------------------------

    /// Helper provider: the local coordinator committed; tell the initiator
    /// this node is frozen and flushed.
    pub fn committed(&mut self, snapshot: SnapshotId) {
        if let Role::Remote(r) = &self.role {
            if r.snapshot == snapshot {
                let msg = PeerMessage::Frozen {
                    snapshot,
                    node: self.node.clone(),
                };
                self.out.push_back(CsOut::Send {
                    to: r.initiator.clone(),
                    msg,
                });
            }
        }
    }

    /// The local coordinator finished the snapshot this service requested:
    /// report done or failed to the initiator and become idle.
    pub fn local_finished(
        &mut self,
        snapshot: SnapshotId,
        report: NodeReport,
        error: Option<Failure>,
    ) {
        let Role::Remote(r) = &self.role else { return };
        if r.snapshot != snapshot {
            return;
        }
        let to = r.initiator.clone();
        match error {
            None => self.out.push_back(CsOut::Send {
                to,
                msg: PeerMessage::Done { snapshot, report },
            }),
            Some(error) if !r.aborted_by_initiator => self.out.push_back(CsOut::Send {
                to,
                msg: PeerMessage::Failed {
                    snapshot,
                    error,
                    report,
                },
            }),
            Some(_) => {}
        }
        self.role = Role::Idle;
    }

    // ---- time -------------------------------------------------------------------

    /// The initiator's deadline while it waits for other nodes.
    pub fn poll_timeout(&self) -> Option<u64> {
        match &self.role {
            Role::Initiator(run) if !run.failed && run.peers.values().any(|s| s.active()) => {
                Some(run.deadline_ms)
            }
            _ => None,
        }
    }

    /// At the deadline, name the first node that has not answered; the
    /// coordinator's own deadline (the same instant) then aborts with it.
    pub fn handle_timeout(&mut self, now: u64) {
        let Role::Initiator(run) = &self.role else {
            return;
        };
        if run.failed || now < run.deadline_ms {
            return;
        }
        let late = run
            .peers
            .iter()
            .find(|(_, s)| s.active())
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
                reason: format!("node {node} did not report {waited} before the lease expired"),
            };
            self.peer_failed(&node, failure, None);
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
            WriterEvent::Freeze,
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
        w.event(4, &WriterEvent::Freeze);
        assert_eq!(drain_cw(&mut w), vec![CwOut::Freeze { snapshot: 4 }]);
        w.all_done(4);
        assert_eq!(
            drain_cw(&mut w),
            vec![],
            "the wrong event does not release it"
        );
        w.all_frozen(4);
        assert_eq!(
            drain_cw(&mut w),
            vec![CwOut::Answer {
                snapshot: 4,
                event: EventKind::Freeze,
                answer: Answer::Ack
            }]
        );
    }

    #[test]
    fn a_failure_heard_between_events_is_the_answer_to_the_next_one() {
        let mut w = ClusterWriter::default();
        let f = Failure {
            node: "n3".into(),
            writer: None,
            phase: Phase::Frozen,
            reason: "lost".into(),
        };
        w.failed(4, f.clone());
        w.event(4, &WriterEvent::PostSnapshot);
        let answer = Answer::Failed(f);
        assert_eq!(
            drain_cw(&mut w),
            vec![CwOut::Answer {
                snapshot: 4,
                event: EventKind::PostSnapshot,
                answer
            }]
        );
    }

    #[test]
    fn cluster_service_tells_a_late_node_it_missed_the_lease() {
        let mut cs = ClusterService::new("n1", &["n1".into(), "n2".into()]);
        cs.peer_up("n2");
        cs.prepare_initiator(4, 1_000);
        cs.writer_freeze(4, 100);
        let notice = PeerMessage::FreezeNotice {
            snapshot: 4,
            initiator: "n1".into(),
            lease_ms: 900,
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
            "node n2 did not report frozen before the lease expired"
        );
    }
}
