//! A seeded, deterministic simulation of a whole cluster driving real
//! [`NodeMachine`]s: simulated clock, per-message delay and drop (FIFO per
//! link, as on a QUIC stream), node crashes, writers that ack after a delay,
//! veto, answer too late or never, engine actions that may fail, and a shared
//! catalog. It checks the protocol's promises as it runs and at the end
//! ([`Sim::violations`]).
//!
//! Use it like quinn-proto's `Pair` or raft-rs's `Network`:
//! ```
//! use freezeframe_core::protocol::sim::{Sim, SimConfig};
//! let mut sim = Sim::new(SimConfig::cluster(3, 1), 7);
//! let req = sim.request_at(0, 10);
//! sim.run();
//! assert!(sim.violations().is_empty(), "{:?}", sim.violations());
//! assert!(sim.report(req).is_some_and(|r| r.status == freezeframe_core::protocol::ReportStatus::Complete));
//! ```
//! Every peer message is serialized to JSON and back on its way, so the wire
//! form is exercised too.

use super::node::{Config, Input, NodeMachine, Output};
use super::types::*;
use super::PeerMessage;
use std::collections::BTreeMap;

/// A small deterministic PRNG (splitmix64): the simulation needs repeatable
/// numbers, not good ones, and the crate has no `rand` at run time.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u32) -> bool {
        self.next_u64() % 1000 < u64::from(per_mille)
    }
}

/// How a simulated writer answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Acks every event after a short delay.
    Good,
    /// Vetoes this event, acks the others.
    Veto(EventKind),
    /// Never answers this event.
    Silent(EventKind),
    /// Answers this event only after its freeze timeout.
    Slow(EventKind),
}

/// One writer of the simulation.
#[derive(Clone, Debug)]
pub struct WriterSpec {
    pub name: String,
    pub on_error: OnError,
    pub behaviour: Behaviour,
}

/// A cluster to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Writers of each node; node `i` is named `n{i+1}`.
    pub nodes: Vec<Vec<WriterSpec>>,
    pub lease_ms: u64,
    pub writer_timeout_ms: u64,
    pub commit_margin_ms: u64,
    /// One-way message delay range.
    pub delay_ms: (u64, u64),
    /// Writers answer after a delay in this range.
    pub writer_delay_ms: (u64, u64),
    pub drop_per_mille: u32,
    /// Chance that a flush, create or seal fails.
    pub engine_fail_per_mille: u32,
    /// Every CreateSnapshot fails (a storage provider error).
    pub create_fails: bool,
    /// How long until the others notice a crashed node (connection timeout).
    pub detect_ms: (u64, u64),
}

impl SimConfig {
    /// `nodes` nodes with `writers` good writers each, a quiet network.
    pub fn cluster(nodes: usize, writers: usize) -> SimConfig {
        let nodes = (0..nodes)
            .map(|n| {
                (0..writers)
                    .map(|w| WriterSpec {
                        name: format!("app{}-{}", n + 1, w + 1),
                        on_error: OnError::Fail,
                        behaviour: Behaviour::Good,
                    })
                    .collect()
            })
            .collect();
        SimConfig {
            nodes,
            lease_ms: 2_000,
            writer_timeout_ms: 500,
            commit_margin_ms: 100,
            delay_ms: (1, 5),
            writer_delay_ms: (0, 20),
            drop_per_mille: 0,
            engine_fail_per_mille: 0,
            create_fails: false,
            detect_ms: (100, 400),
        }
    }

    /// Set one writer's behaviour (node and writer index).
    pub fn writer(
        mut self,
        node: usize,
        writer: usize,
        behaviour: Behaviour,
        on_error: OnError,
    ) -> SimConfig {
        if let Some(w) = self.nodes.get_mut(node).and_then(|n| n.get_mut(writer)) {
            w.behaviour = behaviour;
            w.on_error = on_error;
        }
        self
    }
}

/// The name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

#[derive(Clone, Debug)]
struct SimWriter {
    id: WriterId,
    spec: WriterSpec,
    /// The snapshot it is frozen for: acked freeze, not yet thawed or aborted.
    frozen_for: Option<SnapshotId>,
    /// The last event it received, to tell a late ack from a current one.
    last_event: Option<(SnapshotId, EventKind)>,
    /// Open freeze episodes: snapshot → when freeze arrived.
    freeze_since: BTreeMap<SnapshotId, u64>,
    /// Every snapshot it was sent freeze for → how many outcomes (`abort`,
    /// `complete`) it got for it: exactly one is the promise.
    outcomes: BTreeMap<SnapshotId, u32>,
    /// The application disconnected (it no longer counts, and must get no
    /// further events).
    gone: bool,
}

#[derive(Debug)]
struct SimNode {
    machine: NodeMachine,
    alive: bool,
    writers: Vec<SimWriter>,
    /// Since when the node's live I/O is held.
    held_since: Option<u64>,
}

#[derive(Clone, Debug)]
enum Ev {
    Input(usize, Input),
    WriterAnswer {
        node: usize,
        writer: usize,
        snapshot: SnapshotId,
        event: EventKind,
        reply: WriterReply,
    },
    Request {
        node: usize,
        handle: usize,
    },
    Crash(usize),
    /// A writer's application disconnects.
    WriterGone {
        node: usize,
        writer: usize,
    },
    /// The link between two nodes breaks (both sides see the peer down
    /// after the detection delay; messages on it are lost) …
    Partition(usize, usize),
    /// … and comes back.
    Heal(usize, usize),
}

/// A request made through [`Sim::request_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReqHandle(pub usize);

#[derive(Clone, Debug)]
struct RequestRecord {
    node: usize,
    at: u64,
    /// Set when the request reached a live node.
    snapshot: Option<SnapshotId>,
    reports: Vec<Report>,
}

/// Catalog state of a snapshot on the shared volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatalogState {
    Open,
    Sealed,
}

/// What the simulation saw at a commit instant.
#[derive(Clone, Debug)]
pub struct CommitRecord {
    pub snapshot: SnapshotId,
    pub at: u64,
    /// Writers on live nodes, not on_error=continue, that were not frozen.
    pub unfrozen: Vec<String>,
    /// Live nodes whose I/O was not held.
    pub unheld: Vec<String>,
}

/// The simulated cluster. See the module doc.
#[derive(Debug)]
pub struct Sim {
    pub config: SimConfig,
    now: u64,
    rng: Rng,
    nodes: Vec<SimNode>,
    queue: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    /// Links broken by a partition, as (lower index, higher index).
    cut: std::collections::BTreeSet<(usize, usize)>,
    /// A partition happened (aborts may then be lost and left to the lease).
    partitioned: bool,
    /// Snapshots during which a frozen writer disconnected: a writer that
    /// loses its node resumes by itself, its node aborts and tells the
    /// initiator, which may commit before it hears. Such a commit must never
    /// complete (checked), but its instant may be unclean.
    writer_lost_in: std::collections::BTreeSet<SnapshotId>,
    /// Last scheduled delivery per link, to keep links FIFO.
    link_last: BTreeMap<(usize, usize), u64>,
    next_snapshot: SnapshotId,
    catalog: BTreeMap<SnapshotId, CatalogState>,
    requests: Vec<RequestRecord>,
    commits: Vec<CommitRecord>,
    violations: Vec<String>,
    /// Ended freeze episodes: (node, writer, snapshot, freeze at, thaw/abort at).
    episodes: Vec<(usize, String, SnapshotId, u64, u64)>,
    /// Phase events seen, for tests that look at them.
    phase_events: Vec<PhaseEvent>,
    /// Steps bound: a run that does not settle is a violation, not a hang.
    max_steps: u64,
}

impl Sim {
    /// A cluster with every link up and every writer registered at time 0.
    pub fn new(config: SimConfig, seed: u64) -> Sim {
        let names: Vec<String> = (0..config.nodes.len()).map(node_name).collect();
        let members: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut nodes = Vec::new();
        for (i, writers) in config.nodes.iter().enumerate() {
            let mut c = Config::new(&names[i], &members);
            c.lease_ms = config.lease_ms;
            c.writer_timeout_ms = config.writer_timeout_ms;
            c.commit_margin_ms = config.commit_margin_ms;
            let mut machine = NodeMachine::new(c, 0);
            for peer in names.iter().filter(|p| **p != names[i]) {
                machine.handle(Input::PeerUp { node: peer.clone() }, 0);
            }
            let writers: Vec<SimWriter> = writers
                .iter()
                .enumerate()
                .map(|(w, spec)| SimWriter {
                    id: w as WriterId + 1,
                    spec: spec.clone(),
                    frozen_for: None,
                    last_event: None,
                    freeze_since: BTreeMap::new(),
                    outcomes: BTreeMap::new(),
                    gone: false,
                })
                .collect();
            for w in &writers {
                let input = Input::WriterRegistered {
                    writer: w.id,
                    name: w.spec.name.clone(),
                    on_error: w.spec.on_error,
                    freeze_timeout_ms: None,
                };
                machine.handle(input, 0);
            }
            nodes.push(SimNode {
                machine,
                alive: true,
                writers,
                held_since: None,
            });
        }
        Sim {
            config,
            now: 0,
            rng: Rng::new(seed),
            nodes,
            queue: BTreeMap::new(),
            seq: 0,
            cut: Default::default(),
            partitioned: false,
            writer_lost_in: Default::default(),
            link_last: BTreeMap::new(),
            next_snapshot: 1,
            catalog: BTreeMap::new(),
            requests: vec![],
            commits: vec![],
            violations: vec![],
            episodes: vec![],
            phase_events: vec![],
            max_steps: 200_000,
        }
    }

    /// A random cluster, workload and fault plan drawn from `seed`.
    pub fn random(seed: u64) -> Sim {
        let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
        let n = rng.range(1, 5) as usize;
        let faulty_writers = rng.chance(500);
        let mut config = SimConfig::cluster(n, 0);
        for (i, node) in config.nodes.iter_mut().enumerate() {
            for w in 0..rng.range(0, 3) {
                let behaviour = if faulty_writers && rng.chance(300) {
                    let kind = [EventKind::Freeze, EventKind::PostSnapshot, EventKind::Thaw]
                        [rng.range(0, 2) as usize];
                    match rng.range(0, 2) {
                        0 => Behaviour::Veto(kind),
                        1 => Behaviour::Silent(kind),
                        _ => Behaviour::Slow(kind),
                    }
                } else {
                    Behaviour::Good
                };
                let on_error = if rng.chance(250) {
                    OnError::Continue
                } else {
                    OnError::Fail
                };
                node.push(WriterSpec {
                    name: format!("app{}-{}", i + 1, w + 1),
                    on_error,
                    behaviour,
                });
            }
        }
        let max_delay = rng.range(1, 60);
        config.delay_ms = (rng.range(0, max_delay), max_delay);
        config.writer_delay_ms = (0, rng.range(1, 80));
        if rng.chance(400) {
            config.drop_per_mille = rng.range(1, 40) as u32;
        }
        if rng.chance(200) {
            config.engine_fail_per_mille = rng.range(5, 80) as u32;
        }
        let lease = config.lease_ms;
        let mut sim = Sim::new(config, seed);
        for _ in 0..rng.range(1, 4) {
            let node = rng.range(0, n as u64 - 1) as usize;
            let at = rng.range(0, 3 * lease);
            sim.request_at(node, at);
        }
        if n > 1 && rng.chance(300) {
            let node = rng.range(0, n as u64 - 1) as usize;
            let at = rng.range(0, 2 * lease);
            sim.crash_at(node, at);
        }
        if rng.chance(150) {
            let node = rng.range(0, n as u64 - 1) as usize;
            let count = sim.nodes[node].writers.len() as u64;
            if count > 0 {
                let writer = rng.range(0, count - 1) as usize;
                let at = rng.range(0, 2 * lease);
                sim.writer_gone_at(node, writer, at);
            }
        }
        if n > 1 && rng.chance(250) {
            let a = rng.range(0, n as u64 - 1) as usize;
            let b = (a + rng.range(1, n as u64 - 1) as usize) % n;
            let at = rng.range(0, 2 * lease);
            sim.partition_at(a, b, at, rng.range(1, lease));
        }
        sim
    }

    /// A client asks node `node` for a snapshot at time `at`.
    pub fn request_at(&mut self, node: usize, at: u64) -> ReqHandle {
        let handle = self.requests.len();
        self.requests.push(RequestRecord {
            node,
            at,
            snapshot: None,
            reports: vec![],
        });
        self.schedule(at, Ev::Request { node, handle });
        ReqHandle(handle)
    }

    /// Node `node` dies at `at`: its daemon and its writers stop; the others
    /// notice after the detection delay.
    pub fn crash_at(&mut self, node: usize, at: u64) {
        self.schedule(at, Ev::Crash(node));
    }

    /// Writer `writer` of node `node` disconnects at `at`.
    pub fn writer_gone_at(&mut self, node: usize, writer: usize, at: u64) {
        self.schedule(at, Ev::WriterGone { node, writer });
    }

    /// The link between `a` and `b` breaks at `at` for `duration` ms: both
    /// nodes stay alive and lose each other.
    pub fn partition_at(&mut self, a: usize, b: usize, at: u64, duration: u64) {
        self.schedule(at, Ev::Partition(a, b));
        self.schedule(at + duration, Ev::Heal(a, b));
    }

    fn link(a: usize, b: usize) -> (usize, usize) {
        (a.min(b), a.max(b))
    }

    /// Run until nothing is scheduled and no machine waits for a timer, then
    /// check the end-state promises.
    pub fn run(&mut self) {
        let mut steps = 0u64;
        loop {
            steps += 1;
            if steps > self.max_steps {
                self.violate(format!("did not settle within {} steps", self.max_steps));
                return;
            }
            let next_ev = self.queue.keys().next().map(|k| k.0);
            let next_timer = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.alive)
                .filter_map(|(i, n)| n.machine.poll_timeout().map(|t| (t, i)))
                .min();
            match (next_ev, next_timer) {
                (None, None) => break,
                (Some(e), Some((t, i))) if t <= e => self.fire_timer(i, t),
                (None, Some((t, i))) => self.fire_timer(i, t),
                _ => {
                    if let Some(((at, _), ev)) = self.queue.pop_first() {
                        self.now = self.now.max(at);
                        self.process(ev);
                    }
                }
            }
        }
        self.check_end();
    }

    /// Everything the simulation found wrong.
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// The one report of a request (None if none came, or several did: see
    /// violations).
    pub fn report(&self, req: ReqHandle) -> Option<&Report> {
        let r = self.requests.get(req.0)?;
        if r.reports.len() == 1 {
            r.reports.first()
        } else {
            None
        }
    }

    /// Commit instants seen.
    pub fn commits(&self) -> &[CommitRecord] {
        &self.commits
    }

    /// Snapshots in the shared catalog now.
    pub fn catalog(&self) -> &BTreeMap<SnapshotId, CatalogState> {
        &self.catalog
    }

    pub fn phase_events(&self) -> &[PhaseEvent] {
        &self.phase_events
    }

    /// Node `node`'s status as the console would see it.
    pub fn status(&self, node: usize) -> Option<super::NodeStatus> {
        self.nodes.get(node).map(|n| n.machine.status())
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    // ---- internals ---------------------------------------------------------------

    fn violate(&mut self, what: String) {
        self.violations.push(format!("t={} {what}", self.now));
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn fire_timer(&mut self, i: usize, t: u64) {
        self.now = self.now.max(t);
        let now = self.now;
        self.nodes[i].machine.handle_timeout(now);
        self.drain(i);
        // A timer that fires and changes nothing would spin forever.
        if self.nodes[i]
            .machine
            .poll_timeout()
            .is_some_and(|t2| t2 <= now)
        {
            self.violate(format!(
                "{} asks for a timer at {now} again after handling it",
                node_name(i)
            ));
            self.nodes[i].alive = false;
        }
    }

    fn process(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Input(i, input) => {
                let lost = match &input {
                    Input::Peer { from, .. } => {
                        let f = (0..self.nodes.len())
                            .find(|f| node_name(*f) == *from)
                            .unwrap_or(i);
                        self.cut.contains(&Sim::link(f, i))
                    }
                    _ => false,
                };
                if self.nodes[i].alive && !lost {
                    self.nodes[i].machine.handle(input, now);
                    self.drain(i);
                }
            }
            Ev::WriterAnswer {
                node,
                writer,
                snapshot,
                event,
                reply,
            } => {
                if !self.nodes[node].alive {
                    return;
                }
                let w = &mut self.nodes[node].writers[writer];
                // The writer acts only on the event it is still processing.
                if w.last_event != Some((snapshot, event)) {
                    return;
                }
                if event == EventKind::Freeze && reply == WriterReply::Ack {
                    w.frozen_for = Some(snapshot);
                }
                let input = Input::WriterReply {
                    writer: w.id,
                    snapshot,
                    event,
                    reply,
                };
                self.nodes[node].machine.handle(input, now);
                self.drain(node);
            }
            Ev::Request { node, handle } => {
                if !self.nodes[node].alive {
                    return;
                }
                let snapshot = self.next_snapshot;
                self.next_snapshot += 1;
                self.requests[handle].snapshot = Some(snapshot);
                let busy_before = self.nodes[node].machine.status().in_flight;
                let input = Input::Request {
                    req: handle as RequestId,
                    snapshot,
                    timeout_ms: None,
                    excluded: vec![],
                };
                self.nodes[node].machine.handle(input, now);
                self.drain(node);
                if busy_before {
                    let answered = self.requests[handle].reports.iter().any(|r| r.is_busy());
                    if !answered {
                        self.violate(format!(
                            "request {handle} on busy {} was not refused busy at once",
                            node_name(node)
                        ));
                    }
                }
            }
            Ev::WriterGone { node, writer } => {
                if !self.nodes[node].alive {
                    return;
                }
                let Some(w) = self.nodes[node].writers.get_mut(writer).filter(|w| !w.gone) else {
                    return;
                };
                w.gone = true;
                if let Some(s) = w.frozen_for.take() {
                    self.writer_lost_in.insert(s);
                }
                w.freeze_since.clear();
                let input = Input::WriterGone { writer: w.id };
                self.nodes[node].machine.handle(input, now);
                self.drain(node);
            }
            Ev::Partition(a, b) => {
                if a == b || !self.cut.insert(Sim::link(a, b)) {
                    return;
                }
                self.partitioned = true;
                for (me, other) in [(a, b), (b, a)] {
                    let d = self
                        .rng
                        .range(self.config.detect_ms.0, self.config.detect_ms.1);
                    self.schedule(
                        now + d,
                        Ev::Input(
                            me,
                            Input::PeerDown {
                                node: node_name(other),
                            },
                        ),
                    );
                }
            }
            Ev::Heal(a, b) => {
                if !self.cut.remove(&Sim::link(a, b)) {
                    return;
                }
                // Reconnect only after both sides noticed the break.
                for (me, other) in [(a, b), (b, a)] {
                    let d = self.config.detect_ms.1 + 1;
                    self.schedule(
                        now + d,
                        Ev::Input(
                            me,
                            Input::PeerUp {
                                node: node_name(other),
                            },
                        ),
                    );
                }
            }
            Ev::Crash(i) => {
                if !self.nodes[i].alive {
                    return;
                }
                self.nodes[i].alive = false;
                let name = node_name(i);
                for j in 0..self.nodes.len() {
                    if j != i && self.nodes[j].alive {
                        let d = self
                            .rng
                            .range(self.config.detect_ms.0, self.config.detect_ms.1);
                        self.schedule(
                            now + d,
                            Ev::Input(j, Input::PeerDown { node: name.clone() }),
                        );
                    }
                }
            }
        }
    }

    /// Execute node `i`'s outputs in order, as a driver would.
    fn drain(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].machine.poll_output() {
            self.execute(i, out);
        }
    }

    fn engine_result(&mut self) -> Result<(), String> {
        if self.rng.chance(self.config.engine_fail_per_mille) {
            Err("simulated engine failure".to_string())
        } else {
            Ok(())
        }
    }

    fn execute(&mut self, i: usize, out: Output) {
        let now = self.now;
        match out {
            Output::SendPeer { to, msg } => self.send(i, &to, msg),
            Output::WriterEvent {
                writer,
                snapshot,
                event,
            } => self.writer_event(i, writer, snapshot, event),
            Output::HoldIo { snapshot } => {
                self.nodes[i].held_since.get_or_insert(now);
                let d = self.rng.range(0, 2);
                self.schedule(now + d, Ev::Input(i, Input::HoldDone { snapshot }));
            }
            Output::ReleaseIo { .. } => {
                if let Some(since) = self.nodes[i].held_since.take() {
                    if now - since > self.config.lease_ms {
                        self.violate(format!(
                            "{} held I/O {} ms, past the lease",
                            node_name(i),
                            now - since
                        ));
                    }
                }
            }
            Output::FlushVolume { snapshot } => {
                let d = self.rng.range(0, 5);
                let result = self.engine_result();
                self.schedule(now + d, Ev::Input(i, Input::FlushDone { snapshot, result }));
            }
            Output::CreateSnapshot { snapshot } => {
                self.commit_instant(snapshot);
                let result = if self.config.create_fails {
                    Err("simulated create failure".to_string())
                } else {
                    self.engine_result()
                };
                if result.is_ok() {
                    self.catalog.insert(snapshot, CatalogState::Open);
                }
                let d = self.rng.range(0, 3);
                self.schedule(
                    now + d,
                    Ev::Input(i, Input::SnapshotCreated { snapshot, result }),
                );
            }
            Output::SealSnapshot { snapshot } => {
                let result = self.engine_result();
                if result.is_ok() {
                    match self.catalog.get_mut(&snapshot) {
                        Some(s) => *s = CatalogState::Sealed,
                        None => self.violate(format!(
                            "{} seals snapshot {snapshot} that does not exist",
                            node_name(i)
                        )),
                    }
                }
                let d = self.rng.range(0, 3);
                self.schedule(
                    now + d,
                    Ev::Input(i, Input::SnapshotSealed { snapshot, result }),
                );
            }
            Output::DeleteSnapshot { snapshot } => {
                self.catalog.remove(&snapshot);
            }
            Output::ResolveSnapshot { snapshot } => {
                // One catalog transaction: keep it if sealed, else delete.
                let kept = self.catalog.get(&snapshot) == Some(&CatalogState::Sealed);
                if !kept {
                    self.catalog.remove(&snapshot);
                }
                let d = self.rng.range(0, 3);
                self.schedule(
                    now + d,
                    Ev::Input(
                        i,
                        Input::SnapshotResolved {
                            snapshot,
                            kept: Ok(kept),
                        },
                    ),
                );
            }
            Output::WriterRegistered { .. } => {}
            Output::Phase(e) => self.phase_events.push(e),
            Output::Report { req, report } => match self.requests.get_mut(req as usize) {
                Some(r) if r.node == i => r.reports.push(report),
                _ => self.violate(format!(
                    "{} reported to unknown request {req}",
                    node_name(i)
                )),
            },
        }
    }

    fn send(&mut self, from: usize, to: &str, msg: PeerMessage) {
        let Some(j) = (0..self.nodes.len()).find(|j| node_name(*j) == to) else {
            self.violate(format!("{} sent to unknown node {to}", node_name(from)));
            return;
        };
        // On the wire and back.
        let msg = match serde_json::to_string(&msg).map(|s| serde_json::from_str::<PeerMessage>(&s))
        {
            Ok(Ok(m)) => m,
            other => {
                self.violate(format!("peer message does not survive the wire: {other:?}"));
                return;
            }
        };
        if self.rng.chance(self.config.drop_per_mille) || self.cut.contains(&Sim::link(from, j)) {
            return;
        }
        let d = self
            .rng
            .range(self.config.delay_ms.0, self.config.delay_ms.1);
        let last = self.link_last.get(&(from, j)).copied().unwrap_or(0);
        let at = (self.now + d).max(last);
        self.link_last.insert((from, j), at);
        self.schedule(
            at,
            Ev::Input(
                j,
                Input::Peer {
                    from: node_name(from),
                    msg,
                },
            ),
        );
    }

    fn writer_event(
        &mut self,
        i: usize,
        writer: WriterId,
        snapshot: SnapshotId,
        event: WriterEvent,
    ) {
        let now = self.now;
        let Some(idx) = self.nodes[i].writers.iter().position(|w| w.id == writer) else {
            self.violate(format!(
                "{} sent an event to unknown writer {writer}",
                node_name(i)
            ));
            return;
        };
        let kind = event.kind();
        if self.nodes[i].writers[idx].gone {
            self.violate(format!(
                "{} sent {kind} to disconnected writer {writer}",
                node_name(i)
            ));
            return;
        }
        let lease = self.config.lease_ms;
        let mut problems = vec![];
        let mut ended = None;
        {
            let w = &mut self.nodes[i].writers[idx];
            w.last_event = Some((snapshot, kind));
            match kind {
                EventKind::Freeze => {
                    w.outcomes.entry(snapshot).or_insert(0);
                    if let Some(other) = w.frozen_for.filter(|s| *s != snapshot) {
                        problems.push(format!(
                            "{} frozen for {other} got freeze for {snapshot}",
                            w.spec.name
                        ));
                    }
                    w.freeze_since.insert(snapshot, now);
                }
                EventKind::Complete => match w.outcomes.get_mut(&snapshot) {
                    Some(n) => *n += 1,
                    None => problems.push(format!(
                        "{} got complete for {snapshot} without a freeze",
                        w.spec.name
                    )),
                },
                EventKind::Thaw | EventKind::Abort => {
                    if kind == EventKind::Abort {
                        match w.outcomes.get_mut(&snapshot) {
                            Some(n) => *n += 1,
                            None => problems.push(format!(
                                "{} got abort for {snapshot} without a freeze",
                                w.spec.name
                            )),
                        }
                    }
                    w.frozen_for = None;
                    if let Some(since) = w.freeze_since.remove(&snapshot) {
                        ended = Some((i, w.spec.name.clone(), snapshot, since, now));
                        if now - since > lease {
                            problems.push(format!(
                                "{} stayed frozen {} ms, past the lease",
                                w.spec.name,
                                now - since
                            ));
                        }
                    }
                }
                EventKind::PostSnapshot => {}
            }
        }
        for p in problems {
            self.violate(p);
        }
        self.episodes.extend(ended);
        if event.is_outcome() {
            return;
        }
        let spec = self.nodes[i].writers[idx].spec.clone();
        let delay = self
            .rng
            .range(self.config.writer_delay_ms.0, self.config.writer_delay_ms.1);
        let (reply, at) = match spec.behaviour {
            Behaviour::Veto(k) if k == kind => (
                WriterReply::Veto {
                    reason: format!("{} refuses {kind}", spec.name),
                },
                now + delay,
            ),
            Behaviour::Silent(k) if k == kind => return,
            Behaviour::Slow(k) if k == kind => (
                WriterReply::Ack,
                now + self.config.writer_timeout_ms + 50 + delay,
            ),
            _ => (WriterReply::Ack, now + delay),
        };
        self.schedule(
            at,
            Ev::WriterAnswer {
                node: i,
                writer: idx,
                snapshot,
                event: kind,
                reply,
            },
        );
    }

    /// The commit instant: every writer of every live node that was not
    /// allowed to continue must be frozen for this snapshot, and every live
    /// node's I/O held.
    fn commit_instant(&mut self, snapshot: SnapshotId) {
        let mut unfrozen = vec![];
        let mut unheld = vec![];
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.alive) {
            if n.held_since.is_none() {
                unheld.push(node_name(i));
            }
            for w in &n.writers {
                if !w.gone && w.spec.on_error == OnError::Fail && w.frozen_for != Some(snapshot) {
                    unfrozen.push(w.spec.name.clone());
                }
            }
        }
        self.commits.push(CommitRecord {
            snapshot,
            at: self.now,
            unfrozen,
            unheld,
        });
    }

    fn check_end(&mut self) {
        let mut v = vec![];
        // Every freeze followed by thaw or abort; nothing held.
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.alive) {
            if n.held_since.is_some() {
                v.push(format!("{} still holds I/O at the end", node_name(i)));
            }
            for w in &n.writers {
                for s in w.freeze_since.keys() {
                    v.push(format!(
                        "{} on {} got freeze for {s} and never thaw or abort",
                        w.spec.name,
                        node_name(i)
                    ));
                }
                if w.gone {
                    continue;
                }
                for (s, n) in &w.outcomes {
                    if *n != 1 {
                        v.push(format!(
                            "{} on {} got {n} outcomes for snapshot {s} (exactly one is promised)",
                            w.spec.name,
                            node_name(i)
                        ));
                    }
                }
            }
            let st = n.machine.status();
            if st.in_flight {
                v.push(format!(
                    "{} still has snapshot {:?} in flight at the end",
                    node_name(i),
                    st.snapshot
                ));
            }
        }
        let all_nodes = self.nodes.len();
        for (h, r) in self.requests.iter().enumerate() {
            let alive = self.nodes[r.node].alive;
            if r.snapshot.is_none() {
                continue; // reached a dead node
            }
            if r.reports.len() > 1 || (alive && r.reports.len() != 1) {
                v.push(format!(
                    "request {h} on {} got {} reports",
                    node_name(r.node),
                    r.reports.len()
                ));
            }
            for rep in &r.reports {
                let state = self.catalog.get(&rep.id);
                match rep.status {
                    ReportStatus::Complete => {
                        if state != Some(&CatalogState::Sealed) {
                            v.push(format!(
                                "snapshot {} complete but catalog has {state:?}",
                                rep.id
                            ));
                        }
                        if rep.nodes.len() != all_nodes {
                            v.push(format!(
                                "snapshot {} complete with {} of {all_nodes} nodes",
                                rep.id,
                                rep.nodes.len()
                            ));
                        }
                        for c in self.commits.iter().filter(|c| c.snapshot == rep.id) {
                            if !c.unfrozen.is_empty() || !c.unheld.is_empty() {
                                v.push(format!(
                                    "snapshot {} complete but at commit unfrozen {:?} unheld {:?}",
                                    rep.id, c.unfrozen, c.unheld
                                ));
                            }
                        }
                        if rep.error.is_some() {
                            v.push(format!("snapshot {} complete with an error", rep.id));
                        }
                    }
                    ReportStatus::Failed => {
                        if state.is_some() {
                            v.push(format!(
                                "snapshot {} failed but is still in the catalog ({state:?})",
                                rep.id
                            ));
                        }
                        if rep.error.is_none() {
                            v.push(format!("snapshot {} failed without an error", rep.id));
                        }
                    }
                }
                if rep.requested_ms != r.at && !rep.is_busy() {
                    v.push(format!(
                        "report {} requested_ms {} but asked at {}",
                        rep.id, rep.requested_ms, r.at
                    ));
                }
            }
        }
        // On a lossless network an abort reaches every node at once: nobody
        // waits for its lease after the initiator gave up.
        if self.config.drop_per_mille == 0 && !self.partitioned {
            let slack = self.config.delay_ms.1 + 1;
            for r in self.requests.iter().filter(|r| self.nodes[r.node].alive) {
                for rep in r
                    .reports
                    .iter()
                    .filter(|rep| rep.status == ReportStatus::Failed && !rep.is_busy())
                {
                    for (node, writer, _, _, end) in self.episodes.iter().filter(|e| e.2 == rep.id)
                    {
                        if *end > rep.finished_ms + slack {
                            v.push(format!(
                                "{writer} on {} thawed at {end}, long after the initiator aborted snapshot {} at {}",
                                node_name(*node),
                                rep.id,
                                rep.finished_ms
                            ));
                        }
                    }
                }
            }
        }
        // Without a partition nobody lets go early, so every commit instant
        // is clean, whether or not the snapshot later completed. (Across a
        // partition a node may thaw on losing the initiator just before the
        // initiator, not yet aware, commits; that snapshot is then deleted,
        // which the checks above cover.)
        if !self.partitioned {
            for c in self
                .commits
                .iter()
                .filter(|c| !self.writer_lost_in.contains(&c.snapshot))
            {
                if !c.unfrozen.is_empty() || !c.unheld.is_empty() {
                    v.push(format!(
                        "commit of snapshot {} at {} with unfrozen writers {:?} and unheld nodes {:?}",
                        c.snapshot, c.at, c.unfrozen, c.unheld
                    ));
                }
            }
        }
        // Nothing half-made: an unsealed snapshot may only be left by an
        // initiator that died (its restart cleans up, not the protocol).
        for (id, state) in &self.catalog {
            if *state == CatalogState::Open {
                let owner = self
                    .requests
                    .iter()
                    .find(|r| r.snapshot == Some(*id))
                    .map(|r| r.node);
                if owner.is_none_or(|o| self.nodes[o].alive) {
                    v.push(format!("snapshot {id} left open in the catalog"));
                }
            }
        }
        for x in v {
            self.violate(x);
        }
    }
}
