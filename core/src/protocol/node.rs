//! [`NodeMachine`]: one node's coordinator, cluster writer, cluster service,
//! storage provider and helper provider, wired together. This is the only
//! place that knows the wiring; each component only talks to its neighbours
//! through its outbox, and [`NodeMachine`] moves those messages along in a
//! fixed order until all outboxes are empty (the internal queue), so the same
//! inputs always give the same outputs.

use super::cluster::{ClusterService, ClusterWriter, CsOut, CwOut, NodeRole};
use super::coordinator::{
    Answer, CoordOut, Coordinator, Requester, RunResult, WriterKey, WriterState,
};
use super::message::PeerMessage;
use super::provider::{
    EngineOp, HelperProvider, ProvOut, ProviderCall, ProviderKind, StorageProvider,
};
use super::types::*;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Default lease: how long any node holds a freeze (10 s).
pub const DEFAULT_LEASE_MS: u64 = 10_000;
/// Default per-writer, per-event answer timeout (5 s; under the lease so a
/// silent writer is named before the lease runs out).
pub const DEFAULT_WRITER_TIMEOUT_MS: u64 = 5_000;
/// Default margin before the deadline within which a commit is not started.
pub const DEFAULT_COMMIT_MARGIN_MS: u64 = 500;

/// A node's protocol settings (from `node.toml`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// This node's name (as in the cluster's member list and its certificate).
    pub node: String,
    /// Every member of the cluster; this node's own name may be included.
    pub members: Vec<String>,
    pub lease_ms: u64,
    pub writer_timeout_ms: u64,
    pub commit_margin_ms: u64,
}

impl Config {
    /// Defaults for everything but the names.
    pub fn new(node: &str, members: &[&str]) -> Config {
        Config {
            node: node.to_string(),
            members: members.iter().map(|m| m.to_string()).collect(),
            lease_ms: DEFAULT_LEASE_MS,
            writer_timeout_ms: DEFAULT_WRITER_TIMEOUT_MS,
            commit_margin_ms: DEFAULT_COMMIT_MARGIN_MS,
        }
    }
}

/// An event from the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A local client asks for a snapshot. `snapshot` was reserved in the
    /// catalog by the driver. `timeout_ms` can only shorten the lease.
    Request {
        req: RequestId,
        snapshot: SnapshotId,
        timeout_ms: Option<u64>,
        /// Members the driver's safety rule left out (fenced, not attached):
        /// they are not asked to freeze and the report names them.
        excluded: Vec<Excluded>,
    },
    /// An application or hook registered as a writer. `freeze_timeout_ms`
    /// `None` takes the config's default.
    WriterRegistered {
        writer: WriterId,
        name: String,
        on_error: OnError,
        freeze_timeout_ms: Option<u64>,
    },
    /// The writer's connection closed.
    WriterGone {
        writer: WriterId,
    },
    /// A writer answered an event.
    WriterReply {
        writer: WriterId,
        snapshot: SnapshotId,
        event: EventKind,
        reply: WriterReply,
    },
    /// A message from an authenticated peer.
    Peer {
        from: String,
        msg: PeerMessage,
    },
    PeerUp {
        node: String,
    },
    PeerDown {
        node: String,
    },
    /// A connected peer announced its member list (on connecting and after
    /// each of its reloads). A list that differs from this node's is named
    /// in [`PeerStatus::members_differ`] and refuses snapshots asking it.
    PeerMembers {
        node: String,
        members: Vec<String>,
    },
    /// The engine holds this node's live I/O now (after `Output::HoldIo`).
    HoldDone {
        snapshot: SnapshotId,
    },
    /// Result of `Output::FlushVolume`.
    FlushDone {
        snapshot: SnapshotId,
        result: Result<(), String>,
    },
    /// Result of `Output::CreateSnapshot`.
    SnapshotCreated {
        snapshot: SnapshotId,
        result: Result<(), String>,
    },
    /// Result of `Output::SealSnapshot`.
    SnapshotSealed {
        snapshot: SnapshotId,
        result: Result<(), String>,
    },
    /// The driver found that this node's daemon did not run for `ms` (it was
    /// stopped with SIGSTOP, or starved): a snapshot in flight is aborted
    /// naming this node, before the losses its peers reported in the meantime
    /// blame them for it.
    Stalled {
        ms: u64,
    },
    /// Result of `Output::ResolveSnapshot`: `Ok(true)` it is sealed (kept),
    /// `Ok(false)` it was deleted or never made.
    SnapshotResolved {
        snapshot: SnapshotId,
        kept: Result<bool, String>,
    },
}

/// An instruction to the driver; execute them in the order polled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    SendPeer {
        to: String,
        msg: PeerMessage,
    },
    /// Send an event to a local writer (`abort` needs no answer).
    WriterEvent {
        writer: WriterId,
        snapshot: SnapshotId,
        event: WriterEvent,
    },
    /// Hold this node's live I/O through the engine; answer `HoldDone`.
    HoldIo {
        snapshot: SnapshotId,
    },
    ReleaseIo {
        snapshot: SnapshotId,
    },
    /// Flush the volume; answer `FlushDone`.
    FlushVolume {
        snapshot: SnapshotId,
    },
    /// Create the block snapshot (the commit instant); answer `SnapshotCreated`.
    CreateSnapshot {
        snapshot: SnapshotId,
    },
    /// Make the snapshot read-only; answer `SnapshotSealed`.
    SealSnapshot {
        snapshot: SnapshotId,
    },
    /// Remove a snapshot this attempt created (abort after commit).
    DeleteSnapshot {
        snapshot: SnapshotId,
    },
    /// The initiator is gone before telling the outcome: in one catalog
    /// transaction, delete the snapshot unless it is sealed (the initiator's
    /// seal and this delete cannot both succeed); answer `SnapshotResolved`.
    ResolveSnapshot {
        snapshot: SnapshotId,
    },
    /// Tell a writer its registration is accepted (held back while a run
    /// was in flight).
    WriterRegistered {
        writer: WriterId,
    },
    Phase(PhaseEvent),
    /// The one answer to a `Request`.
    Report {
        req: RequestId,
        report: Report,
    },
}

/// One local writer in [`NodeStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterStatus {
    pub writer: WriterId,
    pub name: String,
    pub on_error: OnError,
    pub state: WriterState,
}

/// One peer in [`NodeStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub connected: bool,
    /// Why this peer's member list is not this node's, when it differs
    /// (named at connection time; snapshots asking it are refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_differ: Option<String>,
}

/// What the console shows about a node right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    /// The phase of the snapshot in flight, else how the last one ended
    /// (`done` / `aborted`), else `idle`.
    pub phase: Phase,
    /// The snapshot in flight, else the last one.
    pub snapshot: Option<SnapshotId>,
    pub in_flight: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<NodeRole>,
    /// The engine's live I/O is held on this node.
    pub io_held: bool,
    pub writers: Vec<WriterStatus>,
    pub peers: Vec<PeerStatus>,
    /// Fingerprint of this node's member list (see
    /// [`cluster::members_digest`](super::cluster::members_digest)).
    #[serde(default)]
    pub members_digest: String,
}

/// The snapshot protocol of one node, as a deterministic state machine.
///
/// # Driving it
/// - Create with [`NodeMachine::new`], then feed [`Input::PeerUp`] as the mesh
///   connects and [`Input::WriterRegistered`] as writers register.
/// - For every event from the world call [`NodeMachine::handle`] with the
///   current time.
/// - After every `handle` / `handle_timeout`, drain
///   [`NodeMachine::poll_output`] and execute each [`Output`] in order; the
///   engine results the machine asks for come back as inputs.
/// - Then ask [`NodeMachine::poll_timeout`] and call
///   [`NodeMachine::handle_timeout`] once that instant has passed (earlier
///   calls are harmless).
/// - [`NodeMachine::status`] at any time, for the console.
///
/// Time is milliseconds, passed in; the machine never reads a clock, does no
/// I/O and draws no random numbers.
///
/// # What the driver adds
/// - Before [`Input::Request`]: take the volume's in-flight lock
///   (`Volume::try_begin_snapshot`; busy → answer the client busy itself) and
///   reserve the id (`reserve_snapshot_id`); drop the lock after the report.
/// - Engine outputs run in order, each to completion before the next
///   (`DeleteSnapshot` after a `CreateSnapshot` still running must wait
///   for it); results come back as inputs.
/// - `PeerUp` / `PeerDown` follow the QUIC connections; a message only ever
///   comes from an authenticated member.
/// - `post_snapshot` to a writer carries the mount path `snapshots/<id>/`.
/// - On start, delete snapshots left `Open` by a crashed initiator (while
///   holding the in-flight lock): the protocol cannot, its node is gone.
#[derive(Debug)]
pub struct NodeMachine {
    config: Config,
    coordinator: Coordinator,
    cluster_writer: ClusterWriter,
    cluster_service: ClusterService,
    storage: StorageProvider,
    helper: HelperProvider,
    /// The provider of the run in flight, for routing engine results.
    active_provider: Option<ProviderKind>,
    /// The local request in flight and when it came.
    request: Option<(RequestId, SnapshotId, u64)>,
    /// The latest time passed in; the machine's clock never runs backwards.
    now: u64,
    out: VecDeque<Output>,
}

/// The cluster writer's name in events.
pub const CLUSTER_WRITER_NAME: &str = "cluster-writer";

impl NodeMachine {
    pub fn new(config: Config, now_ms: u64) -> NodeMachine {
        let mut coordinator = Coordinator::new(&config.node, config.commit_margin_ms);
        // The cluster writer has no timeout of its own: the lease bounds it.
        coordinator.add_writer(WriterKey::Cluster, CLUSTER_WRITER_NAME, OnError::Fail, None);
        let cluster_service = ClusterService::new(&config.node, &config.members, config.lease_ms);
        NodeMachine {
            coordinator,
            cluster_writer: ClusterWriter::default(),
            cluster_service,
            storage: StorageProvider::default(),
            helper: HelperProvider::default(),
            active_provider: None,
            request: None,
            now: now_ms,
            out: VecDeque::new(),
            config,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A new member list (`node reload`). Refused while a snapshot is in
    /// flight or its outcome awaited: the set of nodes that froze for it
    /// must not change under it.
    pub fn set_members(&mut self, members: &[String]) -> Result<(), String> {
        if let Some(s) = self.engaged() {
            return Err(format!(
                "snapshot {s} is in flight on node {}; reload after it",
                self.config.node
            ));
        }
        self.config.members = members.to_vec();
        self.cluster_service.set_members(members);
        Ok(())
    }

    /// Feed one event from the world.
    pub fn handle(&mut self, input: Input, now_ms: u64) {
        let now = self.tick(now_ms);
        match input {
            Input::Request {
                req,
                snapshot,
                timeout_ms,
                excluded,
            } => self.request(req, snapshot, timeout_ms, excluded, now),
            Input::WriterRegistered {
                writer,
                name,
                on_error,
                freeze_timeout_ms,
            } => {
                let t = freeze_timeout_ms.unwrap_or(self.config.writer_timeout_ms);
                self.coordinator
                    .add_writer(WriterKey::App(writer), &name, on_error, Some(t));
            }
            Input::WriterGone { writer } => {
                self.coordinator.remove_writer(WriterKey::App(writer), now)
            }
            Input::WriterReply {
                writer,
                snapshot,
                event,
                reply,
            } => {
                let answer = match reply {
                    WriterReply::Ack => Answer::Ack,
                    WriterReply::Veto { reason } => Answer::Veto(reason),
                };
                self.coordinator
                    .writer_reply(WriterKey::App(writer), snapshot, event, answer, now);
            }
            Input::Peer { from, msg } => {
                // The transport admits members only; anything else is dropped here too.
                if self.cluster_service.is_member(&from) {
                    let busy = self
                        .coordinator
                        .busy()
                        .or(self.coordinator.awaiting_outcome());
                    self.cluster_service.peer_message(&from, msg, now, busy);
                } else {
                    tracing::warn!(node = %self.config.node, from = %from, "dropped a peer message from a non-member");
                }
            }
            Input::PeerUp { node } => self.cluster_service.peer_up(&node),
            Input::PeerDown { node } => self.cluster_service.peer_down(&node),
            Input::PeerMembers { node, members } => {
                self.cluster_service.peer_members(&node, &members)
            }
            Input::HoldDone { snapshot } => match self.active_provider {
                Some(ProviderKind::Storage) => self.storage.hold_done(snapshot),
                Some(ProviderKind::Helper) => self.helper.hold_done(snapshot),
                None => {}
            },
            Input::FlushDone { snapshot, result } => match self.active_provider {
                Some(ProviderKind::Storage) => self.storage.flush_done(snapshot, result),
                Some(ProviderKind::Helper) => self.helper.flush_done(snapshot, result),
                None => {}
            },
            Input::SnapshotCreated { snapshot, result } => self.storage.created(snapshot, result),
            Input::SnapshotSealed { snapshot, result } => self.storage.sealed(snapshot, result),
            Input::SnapshotResolved { snapshot, kept } => {
                self.cluster_service.resolved(snapshot, kept)
            }
            Input::Stalled { ms } => {
                if let Some((snapshot, phase)) = self
                    .coordinator
                    .busy()
                    .zip(self.coordinator.phase().map(|p| p.1))
                {
                    let failure = Failure {
                        node: self.config.node.clone(),
                        writer: None,
                        phase,
                        reason: format!(
                            "the daemon of node {} did not run for {ms} ms (stopped or starved); the other nodes could not wait for it",
                            self.config.node
                        ),
                    };
                    self.coordinator.abort(snapshot, failure, now);
                }
            }
        }
        self.pump();
    }

    /// Call when the instant from [`NodeMachine::poll_timeout`] has passed.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let now = self.tick(now_ms);
        // The cluster service first: at the lease it names the node that did
        // not answer, which the coordinator then reports.
        self.cluster_service.handle_timeout(now);
        self.pump();
        self.coordinator.handle_timeout(now);
        self.pump();
    }

    /// When to call [`NodeMachine::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<u64> {
        match (
            self.cluster_service.poll_timeout(),
            self.coordinator.poll_timeout(),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next instruction for the driver.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    pub fn status(&self) -> NodeStatus {
        let (snapshot, phase) = match self.coordinator.phase() {
            Some((s, p)) => (Some(s), p),
            None => (None, Phase::Idle),
        };
        let writers = self
            .coordinator
            .writers()
            .into_iter()
            .filter_map(|(key, name, on_error, state)| match key {
                WriterKey::App(writer) => Some(WriterStatus {
                    writer,
                    name,
                    on_error,
                    state,
                }),
                WriterKey::Cluster => None,
            })
            .collect();
        let peers = self
            .cluster_service
            .peers()
            .map(|(node, up)| PeerStatus {
                node: node.clone(),
                connected: *up,
                members_differ: self.cluster_service.member_mismatch(node),
            })
            .collect();
        NodeStatus {
            node: self.config.node.clone(),
            phase,
            snapshot,
            in_flight: self.engaged().is_some(),
            role: self.cluster_service.role(),
            io_held: self.storage.io.held() || self.helper.io.held(),
            writers,
            peers,
            members_digest: super::cluster::members_digest(self.cluster_service.members()),
        }
    }

    // ---- internals -------------------------------------------------------------

    /// Time never goes backwards inside the machine, whatever the driver passes.
    fn tick(&mut self, now_ms: u64) -> u64 {
        self.now = self.now.max(now_ms);
        self.now
    }

    /// The snapshot this node is busy with: a run in flight, or a finished
    /// run whose outcome it still waits for.
    fn engaged(&self) -> Option<SnapshotId> {
        self.coordinator
            .busy()
            .or(self.cluster_service.engaged())
            .or(self.coordinator.awaiting_outcome())
    }

    fn request(
        &mut self,
        req: RequestId,
        snapshot: SnapshotId,
        timeout_ms: Option<u64>,
        excluded: Vec<Excluded>,
        now: u64,
    ) {
        if let Some(current) = self.engaged() {
            let error = Failure {
                node: self.config.node.clone(),
                writer: None,
                phase: Phase::Freezing,
                reason: format!(
                    "{BUSY_PREFIX} snapshot {current} is in flight on node {}",
                    self.config.node
                ),
            };
            let report = Report {
                id: snapshot,
                status: ReportStatus::Failed,
                error: Some(error),
                initiator: self.config.node.clone(),
                requested_ms: now,
                finished_ms: now,
                nodes: vec![],
                excluded: vec![],
                freeze_window_ms: None,
                io_hold_ms: None,
            };
            self.out.push_back(Output::Report { req, report });
            return;
        }
        let (lease, limit) = match timeout_ms {
            Some(t) if t < self.config.lease_ms => (t, format!("request's timeout of {t} ms")),
            _ => (
                self.config.lease_ms,
                format!("lease of {} ms", self.config.lease_ms),
            ),
        };
        let deadline = now.saturating_add(lease);
        self.request = Some((req, snapshot, now));
        self.cluster_service
            .prepare_initiator(snapshot, deadline, &limit, excluded);
        self.coordinator.start(
            Requester::Client(req),
            snapshot,
            ProviderKind::Storage,
            deadline,
            &limit,
            now,
        );
    }

    /// Move messages between the components until every outbox is empty.
    ///
    /// One message at a time, and always from the component furthest from
    /// the coordinator first: a coordinator instruction is a call, so what it
    /// sets off (the cluster writer telling the cluster service to send
    /// abort, say) must finish before the coordinator's next instruction
    /// (reporting the run finished) is routed.
    fn pump(&mut self) {
        loop {
            if let Some(o) = self.cluster_service.poll() {
                self.route_cluster_service(o);
            } else if let Some(o) = self.cluster_writer.poll() {
                self.route_cluster_writer(o);
            } else if let Some(o) = self.storage.poll() {
                self.route_provider(o);
            } else if let Some(o) = self.helper.poll() {
                self.route_provider(o);
            } else if let Some(o) = self.coordinator.poll() {
                self.route_coordinator(o);
            } else {
                return;
            }
        }
    }

    fn route_coordinator(&mut self, o: CoordOut) {
        let now = self.now;
        match o {
            CoordOut::Writer {
                key: WriterKey::App(writer),
                snapshot,
                event,
            } => self.out.push_back(Output::WriterEvent {
                writer,
                snapshot,
                event,
            }),
            CoordOut::Writer {
                key: WriterKey::Cluster,
                snapshot,
                event,
            } => self.cluster_writer.event(snapshot, &event),
            CoordOut::Provider {
                kind,
                snapshot,
                call,
            } => {
                if call == ProviderCall::FlushAndHold {
                    self.active_provider = Some(kind);
                }
                match kind {
                    ProviderKind::Storage => self.storage.call(snapshot, call),
                    ProviderKind::Helper => self.helper.call(snapshot, call),
                }
            }
            CoordOut::Phase(e) => self.out.push_back(Output::Phase(e)),
            CoordOut::Registered {
                key: WriterKey::App(writer),
            } => self.out.push_back(Output::WriterRegistered { writer }),
            CoordOut::Registered {
                key: WriterKey::Cluster,
            } => {}
            CoordOut::Finished {
                requester: Requester::Client(req),
                result,
            } => self.finish_request(req, result, now),
            CoordOut::Finished {
                requester: Requester::ClusterService,
                result,
            } => {
                let report = self.node_report(&result);
                self.cluster_service
                    .local_finished(result.snapshot, report, result.error);
            }
        }
    }

    fn route_cluster_writer(&mut self, o: CwOut) {
        let now = self.now;
        match o {
            CwOut::Answer {
                snapshot,
                event,
                answer,
            } => self
                .coordinator
                .writer_reply(WriterKey::Cluster, snapshot, event, answer, now),
            CwOut::Freeze { snapshot } => self.cluster_service.writer_freeze(snapshot, now),
            CwOut::PostSnapshot { snapshot } => self.cluster_service.writer_post_snapshot(snapshot),
            CwOut::Abort { snapshot, reason } => {
                self.cluster_service.writer_abort(snapshot, &reason)
            }
            CwOut::Complete { snapshot } => self.cluster_service.writer_complete(snapshot),
            CwOut::Failure { snapshot, failure } => {
                self.coordinator
                    .writer_failure(WriterKey::Cluster, snapshot, failure, now)
            }
        }
    }

    fn route_cluster_service(&mut self, o: CsOut) {
        let now = self.now;
        match o {
            CsOut::Send { to, msg } => self.out.push_back(Output::SendPeer { to, msg }),
            CsOut::AllFrozen { snapshot, until_ms } => {
                self.cluster_writer.all_frozen(snapshot, until_ms)
            }
            CsOut::AllDone { snapshot } => self.cluster_writer.all_done(snapshot),
            CsOut::Failed { snapshot, failure } => self.cluster_writer.failed(snapshot, failure),
            CsOut::StartLocal {
                snapshot,
                deadline_ms,
                limit,
            } => {
                // As a backup application would: our own coordinator, the
                // helper provider, and the cluster writer told to step aside.
                self.cluster_writer.set_remote(snapshot);
                self.coordinator.start(
                    Requester::ClusterService,
                    snapshot,
                    ProviderKind::Helper,
                    deadline_ms,
                    &limit,
                    now,
                );
            }
            CsOut::AbortLocal {
                snapshot,
                node,
                reason,
            } => {
                let phase = self.coordinator.phase().map_or(Phase::Freezing, |(_, p)| p);
                let failure = Failure {
                    node,
                    writer: None,
                    phase,
                    reason,
                };
                self.coordinator.abort(snapshot, failure, now);
            }
            CsOut::ReleaseHelper { snapshot } => self.helper.post_snapshot(snapshot),
            CsOut::Outcome { snapshot, outcome } => self.coordinator.outcome(snapshot, outcome),
            CsOut::Resolve { snapshot } => self.out.push_back(Output::ResolveSnapshot { snapshot }),
        }
    }

    fn route_provider(&mut self, o: ProvOut) {
        let now = self.now;
        match o {
            ProvOut::Engine { snapshot, op } => self.out.push_back(match op {
                EngineOp::HoldIo => Output::HoldIo { snapshot },
                EngineOp::ReleaseIo => Output::ReleaseIo { snapshot },
                EngineOp::FlushVolume => Output::FlushVolume { snapshot },
                EngineOp::CreateSnapshot => Output::CreateSnapshot { snapshot },
                EngineOp::SealSnapshot => Output::SealSnapshot { snapshot },
                EngineOp::DeleteSnapshot => Output::DeleteSnapshot { snapshot },
            }),
            ProvOut::Return {
                snapshot,
                call,
                result,
            } => self
                .coordinator
                .provider_returned(snapshot, call, result, now),
            ProvOut::Committed { snapshot } => self.cluster_service.committed(snapshot),
        }
    }

    /// This node's part of a report: its phases and its application writers.
    fn node_report(&self, result: &RunResult) -> NodeReport {
        NodeReport {
            node: self.config.node.clone(),
            phases: result.phases.clone(),
            writers: result
                .writers
                .iter()
                .filter(|(k, _)| matches!(k, WriterKey::App(_)))
                .map(|(_, w)| w.clone())
                .collect(),
        }
    }

    fn finish_request(&mut self, req: RequestId, result: RunResult, now: u64) {
        let mut nodes = vec![self.node_report(&result)];
        let (others, excluded) = self.cluster_service.finish_initiator(result.snapshot);
        nodes.extend(others);
        let requested_ms = match self.request.take() {
            Some((r, _, at)) if r == req => at,
            _ => now,
        };
        let report = Report {
            id: result.snapshot,
            status: if result.error.is_none() {
                ReportStatus::Complete
            } else {
                ReportStatus::Failed
            },
            freeze_window_ms: freeze_window(&nodes),
            io_hold_ms: result.io_hold_ms,
            error: result.error,
            initiator: self.config.node.clone(),
            requested_ms,
            finished_ms: now,
            nodes,
            excluded,
        };
        self.active_provider = None;
        self.out.push_back(Output::Report { req, report });
    }
}

#[cfg(test)]
mod tests {
    //! The machine as a driver sees it: inputs, outputs in order, timers,
    //! status.
    use super::*;

    fn drain(m: &mut NodeMachine) -> Vec<Output> {
        std::iter::from_fn(|| m.poll_output())
            .filter(|o| !matches!(o, Output::Phase(_)))
            .collect()
    }

    fn lone_node() -> NodeMachine {
        let mut m = NodeMachine::new(Config::new("n1", &["n1"]), 1_000);
        let reg = Input::WriterRegistered {
            writer: 5,
            name: "db".into(),
            on_error: OnError::Fail,
            freeze_timeout_ms: None,
        };
        m.handle(reg, 1_000);
        assert_eq!(drain(&mut m), vec![Output::WriterRegistered { writer: 5 }]);
        m
    }

    #[test]
    fn a_lone_node_asks_the_driver_for_each_step_and_reports_once() {
        let mut m = lone_node();
        m.handle(
            Input::Request {
                req: 1,
                snapshot: 3,
                timeout_ms: None,
                excluded: vec![],
            },
            1_000,
        );
        assert_eq!(
            drain(&mut m),
            vec![Output::WriterEvent {
                writer: 5,
                snapshot: 3,
                event: WriterEvent::Freeze {
                    lease_ms: DEFAULT_LEASE_MS
                }
            }]
        );
        assert_eq!(m.status().phase, Phase::Freezing);
        assert_eq!(m.status().writers[0].state, WriterState::Freezing);
        assert_eq!(m.poll_timeout(), Some(1_000 + DEFAULT_WRITER_TIMEOUT_MS));
        let ack = |event| Input::WriterReply {
            writer: 5,
            snapshot: 3,
            event,
            reply: WriterReply::Ack,
        };
        m.handle(ack(EventKind::Freeze), 1_010);
        assert_eq!(drain(&mut m), vec![Output::HoldIo { snapshot: 3 }]);
        m.handle(Input::HoldDone { snapshot: 3 }, 1_011);
        assert_eq!(drain(&mut m), vec![Output::FlushVolume { snapshot: 3 }]);
        assert!(m.status().io_held);
        m.handle(
            Input::FlushDone {
                snapshot: 3,
                result: Ok(()),
            },
            1_012,
        );
        assert_eq!(drain(&mut m), vec![Output::CreateSnapshot { snapshot: 3 }]);
        m.handle(
            Input::SnapshotCreated {
                snapshot: 3,
                result: Ok(()),
            },
            1_013,
        );
        assert_eq!(
            drain(&mut m),
            vec![
                Output::ReleaseIo { snapshot: 3 },
                Output::WriterEvent {
                    writer: 5,
                    snapshot: 3,
                    event: WriterEvent::PostSnapshot
                }
            ]
        );
        m.handle(ack(EventKind::PostSnapshot), 1_020);
        assert_eq!(
            drain(&mut m),
            vec![
                Output::WriterEvent {
                    writer: 5,
                    snapshot: 3,
                    event: WriterEvent::Thaw
                },
                Output::SealSnapshot { snapshot: 3 }
            ]
        );
        m.handle(
            Input::SnapshotSealed {
                snapshot: 3,
                result: Ok(()),
            },
            1_021,
        );
        assert_eq!(drain(&mut m), vec![], "still waiting for the thaw answer");
        m.handle(ack(EventKind::Thaw), 1_022);
        let out = drain(&mut m);
        let [Output::WriterEvent {
            writer: 5,
            snapshot: 3,
            event: WriterEvent::Complete,
        }, Output::Report { req: 1, report }] = out.as_slice()
        else {
            panic!("{out:?}")
        };
        assert_eq!(report.status, ReportStatus::Complete);
        assert_eq!((report.requested_ms, report.finished_ms), (1_000, 1_022));
        assert_eq!(report.io_hold_ms, Some(1_013 - 1_010));
        assert_eq!(report.freeze_window_ms, Some(1_022 - 1_010));
        assert_eq!(m.poll_timeout(), None);
        assert_eq!(m.status().phase, Phase::Done);
        assert!(!m.status().in_flight && !m.status().io_held);
    }

    #[test]
    fn create_failure_after_hold_releases_and_reports_the_provider_error() {
        let mut m = lone_node();
        m.handle(
            Input::Request {
                req: 1,
                snapshot: 3,
                timeout_ms: None,
                excluded: vec![],
            },
            0,
        );
        m.handle(
            Input::WriterReply {
                writer: 5,
                snapshot: 3,
                event: EventKind::Freeze,
                reply: WriterReply::Ack,
            },
            1,
        );
        m.handle(Input::HoldDone { snapshot: 3 }, 2);
        m.handle(
            Input::FlushDone {
                snapshot: 3,
                result: Ok(()),
            },
            3,
        );
        drain(&mut m);
        m.handle(
            Input::SnapshotCreated {
                snapshot: 3,
                result: Err("catalog locked".into()),
            },
            4,
        );
        let out = drain(&mut m);
        assert!(out.contains(&Output::ReleaseIo { snapshot: 3 }));
        assert!(
            !out.contains(&Output::DeleteSnapshot { snapshot: 3 }),
            "nothing was created"
        );
        assert!(out.iter().any(|o| matches!(
            o,
            Output::WriterEvent {
                event: WriterEvent::Abort { .. },
                ..
            }
        )));
        let Some(Output::Report { report, .. }) = out.last() else {
            panic!("{out:?}")
        };
        let e = report.error.clone().expect("failed");
        assert_eq!(e.phase, Phase::Committing);
        assert!(
            e.reason
                .contains("creating snapshot 3 failed: catalog locked"),
            "{e:?}"
        );
    }

    #[test]
    fn a_request_while_busy_gets_a_busy_report_at_once() {
        let mut m = lone_node();
        m.handle(
            Input::Request {
                req: 1,
                snapshot: 3,
                timeout_ms: None,
                excluded: vec![],
            },
            0,
        );
        drain(&mut m);
        m.handle(
            Input::Request {
                req: 2,
                snapshot: 4,
                timeout_ms: None,
                excluded: vec![],
            },
            5,
        );
        let out = drain(&mut m);
        let [Output::Report { req: 2, report }] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert!(report.is_busy());
        assert_eq!(
            report.error.as_ref().map(|e| e.reason.as_str()),
            Some("busy: snapshot 3 is in flight on node n1")
        );
        assert_eq!(m.status().snapshot, Some(3));
    }

    #[test]
    fn a_disconnected_member_fails_the_request_naming_it() {
        let mut m = NodeMachine::new(Config::new("n1", &["n1", "n2", "n3"]), 0);
        m.handle(Input::PeerUp { node: "n2".into() }, 0);
        m.handle(
            Input::Request {
                req: 1,
                snapshot: 3,
                timeout_ms: Some(2_000),
                excluded: vec![],
            },
            0,
        );
        let out = drain(&mut m);
        let Some(Output::Report { report, .. }) = out.last() else {
            panic!("{out:?}")
        };
        let e = report.error.clone().expect("failed");
        assert_eq!((e.node.as_str(), e.phase), ("n3", Phase::Freezing));
        assert_eq!(e.reason, "node n3 is not connected");
        let peers = m.status().peers;
        assert_eq!(
            peers,
            vec![
                PeerStatus {
                    node: "n2".into(),
                    connected: true,
                    members_differ: None,
                },
                PeerStatus {
                    node: "n3".into(),
                    connected: false,
                    members_differ: None,
                }
            ]
        );
    }

    #[test]
    fn a_peer_with_a_different_member_list_is_named_at_connection_time_and_refuses_the_snapshot() {
        let mut m = NodeMachine::new(Config::new("n1", &["n1", "n2", "n3"]), 0);
        for p in ["n2", "n3"] {
            m.handle(Input::PeerUp { node: p.into() }, 0);
        }
        let all: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
        m.handle(
            Input::PeerMembers {
                node: "n2".into(),
                members: all.clone(),
            },
            0,
        );
        // n3 was left with n1 and n3 only (n2 removed from its list).
        m.handle(
            Input::PeerMembers {
                node: "n3".into(),
                members: vec!["n3".into(), "n1".into()],
            },
            0,
        );
        let st = m.status();
        assert_eq!(st.peers[0].members_differ, None, "n2 agrees");
        let why = st.peers[1].members_differ.clone().expect("n3 differs");
        assert!(why.contains("n3 does not list n2"), "{why}");
        assert!(why.contains(&st.members_digest), "{why}");
        assert!(why.contains(&super::super::cluster::members_digest(&[
            "n1".into(),
            "n3".into()
        ])));

        m.handle(
            Input::Request {
                req: 1,
                snapshot: 3,
                timeout_ms: Some(2_000),
                excluded: vec![],
            },
            0,
        );
        let out = drain(&mut m);
        assert!(
            !out.iter().any(|o| matches!(o, Output::SendPeer { .. })),
            "no node is asked to freeze: {out:?}"
        );
        let Some(Output::Report { report, .. }) = out.last() else {
            panic!("{out:?}")
        };
        let e = report.error.clone().expect("refused");
        assert_eq!((e.node.as_str(), e.phase), ("n3", Phase::Freezing));
        assert!(e.reason.contains("member list of node n3"), "{}", e.reason);

        // n3 reloads with the full list: the next snapshot goes on.
        m.handle(
            Input::PeerMembers {
                node: "n3".into(),
                members: all,
            },
            0,
        );
        assert!(m.status().peers.iter().all(|p| p.members_differ.is_none()));
        // Disconnecting forgets the announcement: a reconnect announces again.
        m.handle(Input::PeerDown { node: "n3".into() }, 0);
        assert!(m.status().peers[1].members_differ.is_none());
    }

    #[test]
    fn a_stalled_initiator_names_itself_not_the_peers_that_gave_up_on_it() {
        let mut m = NodeMachine::new(Config::new("n1", &["n1", "n2"]), 0);
        m.handle(Input::PeerUp { node: "n2".into() }, 0);
        m.handle(
            Input::Request {
                req: 1,
                snapshot: 3,
                timeout_ms: None,
                excluded: vec![],
            },
            0,
        );
        drain(&mut m);
        // SIGSTOP for 12 s, then: the driver notices the stall first...
        m.handle(Input::Stalled { ms: 12_000 }, 12_000);
        // ...and only then the peer's loss that the stall caused.
        m.handle(Input::PeerDown { node: "n2".into() }, 12_001);
        let out = drain(&mut m);
        let Some(Output::Report { report, .. }) =
            out.iter().find(|o| matches!(o, Output::Report { .. }))
        else {
            panic!("{out:?}")
        };
        let e = report.error.clone().expect("failed");
        assert_eq!(e.node, "n1", "{e:?}");
        assert!(e.reason.contains("did not run for 12000 ms"), "{e:?}");
    }

    #[test]
    fn a_member_left_out_by_the_safety_rule_is_not_asked_and_the_report_names_it() {
        let mut m = NodeMachine::new(Config::new("n1", &["n1", "n2", "n3"]), 0);
        m.handle(Input::PeerUp { node: "n2".into() }, 0);
        let excluded = vec![Excluded {
            node: "n3".into(),
            reason: "fenced by n1: host down".into(),
        }];
        m.handle(
            Input::Request {
                req: 1,
                snapshot: 3,
                timeout_ms: None,
                excluded: excluded.clone(),
            },
            0,
        );
        let out = drain(&mut m);
        let asked: Vec<&str> = out
            .iter()
            .filter_map(|o| match o {
                Output::SendPeer {
                    to,
                    msg: PeerMessage::FreezeNotice { .. },
                } => Some(to.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            asked,
            vec!["n2"],
            "n3 is down and fenced: not asked, not waited for"
        );
        let frozen = PeerMessage::Frozen {
            snapshot: 3,
            node: "n2".into(),
            granted_ms: DEFAULT_LEASE_MS,
        };
        m.handle(
            Input::Peer {
                from: "n2".into(),
                msg: frozen,
            },
            5,
        );
        m.handle(Input::HoldDone { snapshot: 3 }, 6);
        m.handle(
            Input::FlushDone {
                snapshot: 3,
                result: Ok(()),
            },
            7,
        );
        m.handle(
            Input::SnapshotCreated {
                snapshot: 3,
                result: Ok(()),
            },
            8,
        );
        let done = PeerMessage::Done {
            snapshot: 3,
            report: NodeReport {
                node: "n2".into(),
                phases: vec![],
                writers: vec![],
            },
        };
        m.handle(
            Input::Peer {
                from: "n2".into(),
                msg: done,
            },
            9,
        );
        m.handle(
            Input::SnapshotSealed {
                snapshot: 3,
                result: Ok(()),
            },
            10,
        );
        let out = drain(&mut m);
        let Some(Output::Report { report, .. }) = out.last() else {
            panic!("{out:?}")
        };
        assert_eq!(report.status, ReportStatus::Complete, "{report:?}");
        assert_eq!(report.excluded, excluded);
    }

    #[test]
    fn a_remote_node_joins_on_freeze_notice_and_answers_busy_to_a_second_one() {
        let mut m = NodeMachine::new(Config::new("n2", &["n1", "n2", "n3"]), 0);
        for p in ["n1", "n3"] {
            m.handle(Input::PeerUp { node: p.into() }, 0);
        }
        let notice = |snapshot, initiator: &str| Input::Peer {
            from: initiator.into(),
            msg: PeerMessage::FreezeNotice {
                snapshot,
                initiator: initiator.into(),
                lease_ms: 3_000,
                members: vec![],
            },
        };
        m.handle(notice(9, "n1"), 10);
        // No local writers: straight to hold.
        assert_eq!(drain(&mut m), vec![Output::HoldIo { snapshot: 9 }]);
        assert_eq!(
            m.status().role,
            Some(NodeRole::Remote {
                initiator: "n1".into()
            })
        );
        assert_eq!(m.poll_timeout(), Some(3_010), "the lease, from receipt");
        m.handle(notice(10, "n3"), 11);
        let busy = PeerMessage::Busy {
            snapshot: 10,
            node: "n2".into(),
            current: 9,
        };
        assert_eq!(
            drain(&mut m),
            vec![Output::SendPeer {
                to: "n3".into(),
                msg: busy
            }]
        );
        m.handle(Input::HoldDone { snapshot: 9 }, 12);
        m.handle(
            Input::FlushDone {
                snapshot: 9,
                result: Ok(()),
            },
            13,
        );
        let frozen = PeerMessage::Frozen {
            snapshot: 9,
            node: "n2".into(),
            granted_ms: 3_000,
        };
        assert_eq!(
            drain(&mut m),
            vec![
                Output::FlushVolume { snapshot: 9 },
                Output::SendPeer {
                    to: "n1".into(),
                    msg: frozen
                }
            ]
        );
        assert_eq!(m.status().phase, Phase::Frozen);
        // A stranger cannot release it.
        m.handle(
            Input::Peer {
                from: "n9".into(),
                msg: PeerMessage::PostSnapshot { snapshot: 9 },
            },
            14,
        );
        m.handle(
            Input::Peer {
                from: "n3".into(),
                msg: PeerMessage::PostSnapshot { snapshot: 9 },
            },
            14,
        );
        assert_eq!(drain(&mut m), vec![]);
        // The lease runs out: it lets go by itself and tells the initiator.
        m.handle_timeout(3_010);
        let out = drain(&mut m);
        assert_eq!(out[0], Output::ReleaseIo { snapshot: 9 });
        let Output::SendPeer {
            to,
            msg: PeerMessage::Failed { error, .. },
        } = &out[1]
        else {
            panic!("{out:?}")
        };
        assert_eq!(to, "n1");
        assert_eq!(
            (error.node.as_str(), error.phase),
            ("n1", Phase::Frozen),
            "the initiator's silence is the cause, not this node"
        );
        assert_eq!(
            error.reason,
            "initiator n1 sent no post-snapshot within the lease (3000 ms)"
        );
        assert_eq!(
            out.get(2),
            Some(&Output::ResolveSnapshot { snapshot: 9 }),
            "and whatever the initiator made is decided by the catalog"
        );
        assert!(!m.status().in_flight && !m.status().io_held);
    }

    #[test]
    fn time_passed_in_never_goes_backwards() {
        let mut m = lone_node();
        m.handle(
            Input::Request {
                req: 1,
                snapshot: 3,
                timeout_ms: Some(100),
                excluded: vec![],
            },
            5_000,
        );
        m.handle(
            Input::WriterReply {
                writer: 5,
                snapshot: 3,
                event: EventKind::Freeze,
                reply: WriterReply::Ack,
            },
            4_000,
        );
        let events: Vec<u64> = std::iter::from_fn(|| m.poll_output())
            .filter_map(|o| {
                if let Output::Phase(e) = o {
                    Some(e.at_ms)
                } else {
                    None
                }
            })
            .collect();
        assert!(events.iter().all(|t| *t == 5_000), "{events:?}");
    }

    #[test]
    fn report_json_has_the_fields_snapshot_create_prints() {
        let report = Report {
            id: 4,
            status: ReportStatus::Failed,
            error: Some(Failure {
                node: "n2".into(),
                writer: Some("db".into()),
                phase: Phase::Freezing,
                reason: "no".into(),
            }),
            initiator: "n1".into(),
            requested_ms: 1,
            finished_ms: 2,
            nodes: vec![NodeReport {
                node: "n1".into(),
                phases: vec![PhaseSpan {
                    name: Phase::PostSnapshot,
                    start_ms: 1,
                    end_ms: 2,
                }],
                writers: vec![],
            }],
            excluded: vec![],
            freeze_window_ms: None,
            io_hold_ms: None,
        };
        let v = serde_json::to_value(&report).expect("serialize");
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error"]["writer"], "db");
        assert_eq!(v["error"]["phase"], "freezing");
        assert_eq!(v["nodes"][0]["phases"][0]["name"], "post_snapshot");
        let back: Report = serde_json::from_value(v).expect("parse");
        assert_eq!(back, report);
    }
}
