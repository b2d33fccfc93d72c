//! A seeded, deterministic simulation of a whole cluster driving real
//! [`NodeMachine`]s and a model of the daemon's driver around each of them.
//! It checks the protocol's promises as it runs and at the end
//! ([`Sim::violations`]).
//!
//! What it models (issue 11, "Simulation that would catch it"):
//! - **Time**: events run in true time; every node reads its own clock,
//!   `local = offset + t·(1 + drift)`, with any offset and a drift within
//!   ±0.5 % ([`Clock`]). Leases are checked in the node's own clock.
//! - **Network**: per-message delay, drop, duplicates and replays of older
//!   messages (earlier snapshots' ids), FIFO per link otherwise; partitions;
//!   every message goes through JSON and back.
//! - **Nodes**: crashes, restarts (a new machine; writers re-register; the
//!   old connection's `PeerDown` may come before or after the new `PeerUp`),
//!   SIGSTOP-like pauses (nothing is processed, timers do not fire), and
//!   member lists that differ.
//! - **The driver**: one engine worker per node running hold, flush, create,
//!   seal, delete and resolve in order, each taking 0 ms up to seconds; a
//!   hold that completes after its run ended is released at once; the
//!   volume's in-flight lock in the shared catalog (taken for a request,
//!   dropped at its report or when the process dies); startup cleanup of
//!   Open snapshots under that lock.
//! - **Writers**: ack after a delay, veto, stay silent, answer late, freeze
//!   slowly like a hook script, disconnect, register mid-run; each resumes
//!   by itself `lease_ms` after a freeze (writer protocol) or when its node
//!   dies.
//!
//! The promises checked:
//! - every create whose result the initiator accepted (it went on to
//!   post-snapshot) ran while every writer that was frozen for it stayed
//!   frozen and every node's I/O was held, from the create's start to its
//!   completion (unless a crash, partition or disconnection that no node
//!   can see in time happened during the snapshot);
//! - a complete snapshot is sealed, reported by every node, clean;
//! - a failed one leaves nothing in the catalog; nothing stays Open while
//!   a participant survives;
//! - every writer sent freeze gets exactly one outcome; no writer is
//!   frozen, and no I/O held, past its node's lease in that node's clock;
//! - a writer registering mid-run is not frozen for that run, is told
//!   `registered` after it, and takes part from the next run;
//! - with diverging member lists nothing ever completes.
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

use super::node::{Config, Input, NodeMachine, Output};
use super::types::*;
use super::PeerMessage;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

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

/// One node's clock: `local(t) = offset + t + t·drift_ppm/10⁶`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    pub offset_ms: u64,
    /// Rate error in parts per million (±5000 = ±0.5 %).
    pub drift_ppm: i64,
}

impl Clock {
    /// The node's reading at true time `t`.
    pub fn local(&self, t: u64) -> u64 {
        let d = (i128::from(t) * i128::from(self.drift_ppm)).div_euclid(1_000_000);
        (i128::from(self.offset_ms) + i128::from(t) + d).max(0) as u64
    }

    /// The earliest true time at which the node reads at least `l`.
    pub fn true_at(&self, l: u64) -> u64 {
        if l <= self.offset_ms {
            return 0;
        }
        let x = i128::from(l - self.offset_ms);
        let mut t = (x * 1_000_000 / (1_000_000 + i128::from(self.drift_ppm))).max(0) as u64;
        while self.local(t) < l {
            t += 1;
        }
        while t > 0 && self.local(t - 1) >= l {
            t -= 1;
        }
        t
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
    /// A hook script: its freeze takes this many ms (register it with a
    /// freeze timeout of the lease, as the daemon does for `hooks.d`).
    Hook(u64),
}

/// One writer of the simulation.
#[derive(Clone, Debug)]
pub struct WriterSpec {
    pub name: String,
    pub on_error: OnError,
    pub behaviour: Behaviour,
    /// `None`: the node's default writer timeout.
    pub freeze_timeout_ms: Option<u64>,
}

/// A cluster to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Writers of each node; node `i` is named `n{i+1}`.
    pub nodes: Vec<Vec<WriterSpec>>,
    pub lease_ms: u64,
    /// Nodes whose own lease differs from `lease_ms`.
    pub node_lease_ms: BTreeMap<usize, u64>,
    /// Nodes whose member list differs from the real one.
    pub node_members: BTreeMap<usize, Vec<String>>,
    /// Each node's clock (missing: offset 0, no drift).
    pub clocks: Vec<Clock>,
    pub writer_timeout_ms: u64,
    pub commit_margin_ms: u64,
    /// One-way message delay range.
    pub delay_ms: (u64, u64),
    /// Writers answer after a delay in this range.
    pub writer_delay_ms: (u64, u64),
    pub drop_per_mille: u32,
    /// Chance that a message is delivered a second time, later.
    pub dup_per_mille: u32,
    /// Chance, per message sent, that an older message of the same link
    /// (often of an earlier snapshot) is delivered again.
    pub replay_per_mille: u32,
    /// Engine actions take a time in this range …
    pub engine_ms: (u64, u64),
    /// … or, with this chance, in this one (a slow disk, a long fsync).
    pub slow_engine_per_mille: u32,
    pub slow_engine_ms: (u64, u64),
    /// Creates take a time in this range instead (a slow storage snapshot).
    pub create_ms: Option<(u64, u64)>,
    /// Chance that a flush, create or seal fails.
    pub engine_fail_per_mille: u32,
    /// Every CreateSnapshot fails (a storage provider error).
    pub create_fails: bool,
    /// Every SealSnapshot fails.
    pub seal_fails: bool,
    /// How long until the others notice a crashed node (connection timeout).
    pub detect_ms: (u64, u64),
    /// The driver takes the volume's in-flight lock for a request (as the
    /// daemon does); off only to reach the machines' own busy refusals.
    pub in_flight_lock: bool,
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
                        freeze_timeout_ms: None,
                    })
                    .collect()
            })
            .collect();
        SimConfig {
            nodes,
            lease_ms: 2_000,
            node_lease_ms: BTreeMap::new(),
            node_members: BTreeMap::new(),
            clocks: vec![],
            writer_timeout_ms: 500,
            commit_margin_ms: 100,
            delay_ms: (1, 5),
            writer_delay_ms: (0, 20),
            drop_per_mille: 0,
            dup_per_mille: 0,
            replay_per_mille: 0,
            engine_ms: (0, 3),
            slow_engine_per_mille: 0,
            slow_engine_ms: (0, 0),
            create_ms: None,
            engine_fail_per_mille: 0,
            create_fails: false,
            seal_fails: false,
            detect_ms: (100, 400),
            in_flight_lock: true,
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
        let lease = self.lease_ms;
        if let Some(w) = self.nodes.get_mut(node).and_then(|n| n.get_mut(writer)) {
            w.behaviour = behaviour;
            w.on_error = on_error;
            if matches!(behaviour, Behaviour::Hook(_)) {
                w.freeze_timeout_ms = Some(lease);
            }
        }
        self
    }

    /// Node `node`'s own lease.
    pub fn lease_of(&self, node: usize) -> u64 {
        self.node_lease_ms
            .get(&node)
            .copied()
            .unwrap_or(self.lease_ms)
    }

    fn clock(&self, node: usize) -> Clock {
        self.clocks.get(node).copied().unwrap_or_default()
    }
}

/// The name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

/// Leases are checked with this much slack for rounding between clocks.
const LEASE_TOLERANCE_MS: u64 = 2;

/// One writer connection of the simulation (a restart makes new ones).
#[derive(Clone, Debug)]
struct SimWriter {
    id: WriterId,
    spec: WriterSpec,
    /// The node generation (restart count) this connection belongs to.
    gen: u32,
    /// The snapshot it holds writes for: acked freeze, not yet thawed,
    /// aborted or resumed by itself.
    frozen_for: Option<SnapshotId>,
    /// Open freezes: snapshot → (freeze received, local ms; lease_ms).
    freezes: BTreeMap<SnapshotId, (u64, u64)>,
    /// Index into `Sim::spans` of the open frozen span, per snapshot.
    span: BTreeMap<SnapshotId, usize>,
    /// Every snapshot it was sent freeze for → outcomes received.
    outcomes: BTreeMap<SnapshotId, u32>,
    /// Every event received, in order, with the true time.
    events: Vec<(SnapshotId, EventKind, u64)>,
    /// Disconnected (by the application, or its node died).
    gone: bool,
    /// Disconnected by the application itself (not recreated on restart).
    left: bool,
    /// Simulation step at which it was told `registered`.
    registered_seq: Option<u64>,
    /// Step at which it disconnected.
    gone_seq: Option<u64>,
}

/// A span during which a writer held its writes for a snapshot, true time.
#[derive(Clone, Debug)]
struct FrozenSpan {
    node: usize,
    writer: String,
    snapshot: SnapshotId,
    from: u64,
    to: Option<u64>,
}

#[derive(Debug)]
struct SimNode {
    machine: NodeMachine,
    alive: bool,
    gen: u32,
    clock: Clock,
    writers: Vec<SimWriter>,
    next_writer_id: WriterId,
    /// The driver's wanted hold (after HoldIo, until ReleaseIo).
    hold_wanted: Option<SnapshotId>,
    /// HoldIo was asked at this local time; for the lease check.
    hold_asked_local: Option<u64>,
    /// The hold taken by the engine: index into `Sim::holds`.
    held: Option<usize>,
    /// When the engine worker is free next (true time).
    engine_free_at: u64,
    /// Paused (SIGSTOP) until this true time; events wait in `stalled`.
    paused: bool,
    stalled: Vec<Ev>,
    /// True-time intervals during which the node was paused.
    pauses: Vec<(u64, u64)>,
    pause_start: u64,
}

/// An engine action on the worker.
#[derive(Clone, Debug)]
enum Job {
    Hold(SnapshotId),
    Flush(SnapshotId),
    /// Create; index into `Sim::creates`.
    Create(SnapshotId, usize),
    Seal(SnapshotId),
    Delete(SnapshotId),
    Resolve(SnapshotId),
}

#[derive(Clone, Debug)]
enum Ev {
    Input(usize, Input),
    /// A peer message on the connection to generation `to_gen` of `to`.
    Peer {
        to: usize,
        to_gen: u32,
        from: usize,
        msg: PeerMessage,
    },
    WriterAnswer {
        node: usize,
        writer: usize,
        snapshot: SnapshotId,
        event: EventKind,
        reply: WriterReply,
    },
    /// A writer's own lease on a freeze runs out.
    WriterLease {
        node: usize,
        writer: usize,
        snapshot: SnapshotId,
    },
    Request {
        node: usize,
        handle: usize,
        timeout_ms: Option<u64>,
    },
    Crash(usize),
    Restart(usize),
    Pause(usize, u64),
    Resume(usize),
    /// A writer's application disconnects.
    WriterGone {
        node: usize,
        writer: usize,
    },
    /// A new writer registers.
    WriterJoin {
        node: usize,
        spec: WriterSpec,
    },
    /// The engine worker of a node finished a job.
    EngineDone {
        node: usize,
        gen: u32,
        job: Job,
    },
    /// The connection of `node` to `peer` from epoch `epoch` closed
    /// (detected after a crash); `stale_too`: deliver it even when a newer
    /// connection exists (the order the daemon should prevent).
    ConnDown {
        node: usize,
        peer: usize,
        epoch: u64,
        stale_too: bool,
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
    /// Reports and the true time each came.
    reports: Vec<(Report, u64)>,
    /// The node generation that took it.
    gen: u32,
    /// The node's clock when the request reached its machine.
    asked_local: u64,
}

/// Catalog state of a snapshot on the shared volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatalogState {
    Open,
    Sealed,
}

/// What the simulation saw of one block snapshot's create.
#[derive(Clone, Debug)]
pub struct CommitRecord {
    pub snapshot: SnapshotId,
    /// The create started (true time).
    pub at: u64,
    /// The create completed (true time), if it did.
    pub end: Option<u64>,
    /// The initiator accepted the result and went on to post-snapshot.
    pub accepted: bool,
    /// Writers frozen for this snapshot (not on_error=continue) that were
    /// not frozen through the whole create.
    pub unfrozen: Vec<String>,
    /// Nodes whose I/O was not held through the whole create.
    pub unheld: Vec<String>,
}

/// The simulated cluster. See the module doc.
#[derive(Debug)]
pub struct Sim {
    pub config: SimConfig,
    now: u64,
    /// Counts executed steps; orders registrations against run starts.
    seq: u64,
    rng: Rng,
    nodes: Vec<SimNode>,
    queue: BTreeMap<(u64, u64), Ev>,
    /// Links broken by a partition, as (lower index, higher index).
    cut: BTreeSet<(usize, usize)>,
    /// A partition happened, or two nodes saw their link differently for a
    /// while (a stale connection-down, a long pause): aborts may then be
    /// lost and left to the lease.
    partitioned: bool,
    /// Snapshots in flight when a fault struck that no node can see in time
    /// (a crash, a partition, a writer that left while frozen): their
    /// creates may be unclean; they must still never complete unclean.
    disturbed: BTreeSet<SnapshotId>,
    /// Last scheduled delivery per link, to keep links FIFO.
    link_last: BTreeMap<(usize, usize), u64>,
    /// Messages sent per link, for replays.
    link_history: BTreeMap<(usize, usize), Vec<PeerMessage>>,
    /// Connection epoch per ordered pair (node, peer).
    epoch: BTreeMap<(usize, usize), u64>,
    next_snapshot: SnapshotId,
    catalog: BTreeMap<SnapshotId, CatalogState>,
    /// The volume's in-flight lock: (node, generation, request).
    lock: Option<(usize, u32, RequestId)>,
    requests: Vec<RequestRecord>,
    creates: Vec<CommitRecord>,
    /// Creates by node and snapshot, waiting for the initiator's verdict.
    create_of: BTreeMap<(usize, SnapshotId), usize>,
    spans: Vec<FrozenSpan>,
    /// Hold spans: (node, from, to).
    holds: Vec<(usize, u64, Option<u64>)>,
    /// Runs started: (node, generation, snapshot, step).
    run_starts: Vec<(usize, u32, SnapshotId, u64)>,
    violations: Vec<String>,
    /// Ended freeze episodes: (node, writer, snapshot, freeze at, thaw/abort at).
    episodes: Vec<(usize, String, SnapshotId, u64, u64)>,
    /// Phase events seen, for tests that look at them.
    phase_events: Vec<PhaseEvent>,
    /// Steps bound: a run that does not settle is a violation, not a hang.
    max_steps: u64,
    /// What was planned, for a failing seed's description.
    plan: Vec<String>,
}

impl Sim {
    /// A cluster with every link up and every writer registered at time 0.
    pub fn new(config: SimConfig, seed: u64) -> Sim {
        let n = config.nodes.len();
        let mut sim = Sim {
            config,
            now: 0,
            seq: 0,
            rng: Rng::new(seed),
            nodes: Vec::new(),
            queue: BTreeMap::new(),
            cut: Default::default(),
            partitioned: false,
            disturbed: Default::default(),
            link_last: BTreeMap::new(),
            link_history: BTreeMap::new(),
            epoch: BTreeMap::new(),
            next_snapshot: 1,
            catalog: BTreeMap::new(),
            lock: None,
            requests: vec![],
            creates: vec![],
            create_of: BTreeMap::new(),
            spans: vec![],
            holds: vec![],
            run_starts: vec![],
            violations: vec![],
            episodes: vec![],
            phase_events: vec![],
            max_steps: 400_000,
            plan: vec![],
        };
        for i in 0..n {
            let clock = sim.config.clock(i);
            let machine = NodeMachine::new(sim.node_config(i), clock.local(0));
            sim.nodes.push(SimNode {
                machine,
                alive: true,
                gen: 0,
                clock,
                writers: vec![],
                next_writer_id: 1,
                hold_wanted: None,
                hold_asked_local: None,
                held: None,
                engine_free_at: 0,
                paused: false,
                stalled: vec![],
                pauses: vec![],
                pause_start: 0,
            });
        }
        for i in 0..n {
            for j in (0..n).filter(|j| *j != i) {
                sim.feed(i, Input::PeerUp { node: node_name(j) });
            }
            for spec in sim.config.nodes[i].clone() {
                sim.connect_writer(i, spec);
            }
        }
        sim
    }

    fn node_config(&self, i: usize) -> Config {
        let names: Vec<String> = (0..self.config.nodes.len()).map(node_name).collect();
        let members: Vec<&str> = match self.config.node_members.get(&i) {
            Some(m) => m.iter().map(String::as_str).collect(),
            None => names.iter().map(String::as_str).collect(),
        };
        let mut c = Config::new(&names[i], &members);
        c.lease_ms = self.config.lease_of(i);
        c.writer_timeout_ms = self.config.writer_timeout_ms;
        c.commit_margin_ms = self.config.commit_margin_ms;
        c
    }

    /// A random cluster, workload and fault plan drawn from `seed`.
    pub fn random(seed: u64) -> Sim {
        let mut rng = Rng::new(seed.wrapping_mul(31).wrapping_add(7));
        let n = rng.range(1, 5) as usize;
        let faulty_writers = rng.chance(500);
        let mut config = SimConfig::cluster(n, 0);
        let lease = config.lease_ms;
        let hooks = rng.chance(250);
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
                } else if hooks && rng.chance(400) {
                    Behaviour::Hook(rng.range(lease / 3, lease * 99 / 100))
                } else {
                    Behaviour::Good
                };
                let on_error = if rng.chance(250) {
                    OnError::Continue
                } else {
                    OnError::Fail
                };
                let freeze_timeout_ms = match behaviour {
                    Behaviour::Hook(_) => Some(lease),
                    _ => None,
                };
                node.push(WriterSpec {
                    name: format!("app{}-{}", i + 1, w + 1),
                    on_error,
                    behaviour,
                    freeze_timeout_ms,
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
        if rng.chance(600) {
            config.clocks = (0..n)
                .map(|_| Clock {
                    offset_ms: rng.range(0, 1 << 40),
                    drift_ppm: rng.range(0, 10_000) as i64 - 5_000,
                })
                .collect();
        }
        if rng.chance(350) {
            config.slow_engine_per_mille = rng.range(20, 300) as u32;
            config.slow_engine_ms = (lease / 10, rng.range(lease / 2, 2 * lease));
        }
        if rng.chance(300) {
            config.dup_per_mille = rng.range(1, 150) as u32;
        }
        if rng.chance(300) {
            config.replay_per_mille = rng.range(1, 150) as u32;
        }
        if rng.chance(150) {
            let node = rng.range(0, n as u64 - 1) as usize;
            config
                .node_lease_ms
                .insert(node, rng.range(lease / 2, lease));
        }
        if n > 1 && rng.chance(40) {
            let node = rng.range(0, n as u64 - 1) as usize;
            let mut members: Vec<String> = (0..n).map(node_name).collect();
            // A node that lists no other real member snapshots alone: no
            // message can tell it otherwise (config validation must), so
            // a dropped member always leaves one to refuse.
            if n < 3 || rng.chance(500) {
                members.push("n9".into());
            } else {
                let drop = (node + 1) % n;
                members.retain(|m| *m != node_name(drop));
            }
            config.node_members.insert(node, members);
        }
        let mut sim = Sim::new(config, seed);
        for _ in 0..rng.range(1, 4) {
            let node = rng.range(0, n as u64 - 1) as usize;
            let at = rng.range(0, 3 * lease);
            if rng.chance(100) {
                let t = rng.range(300, lease);
                sim.request_with_timeout_at(node, at, t);
            } else {
                sim.request_at(node, at);
            }
        }
        if n > 1 && rng.chance(300) {
            let node = rng.range(0, n as u64 - 1) as usize;
            let at = rng.range(0, 2 * lease);
            sim.crash_at(node, at);
            if rng.chance(500) {
                sim.restart_at(node, at + rng.range(0, lease));
            }
        }
        if rng.chance(150) {
            let node = rng.range(0, n as u64 - 1) as usize;
            let at = rng.range(0, 2 * lease);
            sim.pause_at(node, at, rng.range(50, 2 * lease));
        }
        if rng.chance(150) {
            let node = rng.range(0, n as u64 - 1) as usize;
            let count = sim.config.nodes[node].len() as u64;
            if count > 0 {
                let writer = rng.range(0, count - 1) as usize;
                let at = rng.range(0, 2 * lease);
                sim.writer_gone_at(node, writer, at);
            }
        }
        if rng.chance(250) {
            for k in 0..rng.range(1, 2) {
                let node = rng.range(0, n as u64 - 1) as usize;
                let at = rng.range(0, 3 * lease);
                let spec = WriterSpec {
                    name: format!("late{}-{}", node + 1, k + 1),
                    on_error: OnError::Fail,
                    behaviour: Behaviour::Good,
                    freeze_timeout_ms: None,
                };
                sim.writer_join_at(node, at, spec);
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

    /// A cluster driven to the edges the guards protect, with none of the
    /// faults that excuse an unclean create (no crash, partition, pause or
    /// disconnection): hook-like writers that freeze close to the lease,
    /// creates that take a good part of it, skewed and drifting clocks, and
    /// many duplicated and replayed messages over back-to-back snapshots.
    /// Every accepted create must be clean here.
    pub fn near_the_deadline(seed: u64) -> Sim {
        let mut rng = Rng::new(seed.wrapping_mul(131).wrapping_add(17));
        let n = rng.range(2, 4) as usize;
        let mut config = SimConfig::cluster(n, 0);
        let lease = config.lease_ms;
        for (i, node) in config.nodes.iter_mut().enumerate() {
            for w in 0..rng.range(1, 2) {
                let hook = rng.chance(400);
                node.push(WriterSpec {
                    name: format!("app{}-{}", i + 1, w + 1),
                    on_error: OnError::Fail,
                    behaviour: if hook {
                        Behaviour::Hook(rng.range(lease / 2, lease * 19 / 20))
                    } else {
                        Behaviour::Good
                    },
                    freeze_timeout_ms: hook.then_some(lease),
                });
            }
        }
        config.delay_ms = (0, rng.range(1, 30));
        config.writer_delay_ms = (0, rng.range(1, 40));
        config.clocks = (0..n)
            .map(|_| Clock {
                offset_ms: rng.range(0, 1 << 40),
                drift_ppm: rng.range(0, 10_000) as i64 - 5_000,
            })
            .collect();
        config.slow_engine_per_mille = rng.range(100, 500) as u32;
        config.slow_engine_ms = (lease / 20, lease * 3 / 4);
        config.dup_per_mille = rng.range(0, 200) as u32;
        config.replay_per_mille = rng.range(100, 400) as u32;
        if rng.chance(500) {
            config.create_ms = Some((lease / 20, rng.range(lease / 10, lease / 2)));
        }
        if rng.chance(600) {
            let node = rng.range(0, n as u64 - 1) as usize;
            config
                .node_lease_ms
                .insert(node, rng.range(lease / 2, lease));
        }
        let mut sim = Sim::new(config, seed);
        let mut at = rng.range(0, 100);
        for _ in 0..rng.range(3, 6) {
            let node = rng.range(0, n as u64 - 1) as usize;
            sim.request_at(node, at);
            at += rng.range(lease / 2, 3 * lease / 2);
        }
        sim
    }

    /// A short description of the cluster and the fault plan, enough to
    /// see what a failing seed did.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let _ = write!(
            s,
            "{} nodes, lease {} ms, delay {:?}, drop {}‰, dup {}‰, replay {}‰, engine {:?} slow {}‰ {:?}, engine fail {}‰",
            c.nodes.len(),
            c.lease_ms,
            c.delay_ms,
            c.drop_per_mille,
            c.dup_per_mille,
            c.replay_per_mille,
            c.engine_ms,
            c.slow_engine_per_mille,
            c.slow_engine_ms,
            c.engine_fail_per_mille
        );
        for (i, ws) in c.nodes.iter().enumerate() {
            let clock = c.clock(i);
            let _ = write!(
                s,
                "\n  {}: clock +{} ms {:+} ppm, lease {}",
                node_name(i),
                clock.offset_ms,
                clock.drift_ppm,
                c.lease_of(i)
            );
            if let Some(m) = c.node_members.get(&i) {
                let _ = write!(s, ", members {m:?}");
            }
            for w in ws {
                let _ = write!(s, "; {} {:?} {:?}", w.name, w.behaviour, w.on_error);
            }
        }
        for p in &self.plan {
            let _ = write!(s, "\n  {p}");
        }
        s
    }

    /// A client asks node `node` for a snapshot at time `at`.
    pub fn request_at(&mut self, node: usize, at: u64) -> ReqHandle {
        self.request(node, at, None)
    }

    /// As [`Sim::request_at`], with `snapshot create --timeout`.
    pub fn request_with_timeout_at(&mut self, node: usize, at: u64, timeout_ms: u64) -> ReqHandle {
        self.request(node, at, Some(timeout_ms))
    }

    fn request(&mut self, node: usize, at: u64, timeout_ms: Option<u64>) -> ReqHandle {
        let handle = self.requests.len();
        self.requests.push(RequestRecord {
            node,
            at,
            snapshot: None,
            reports: vec![],
            gen: 0,
            asked_local: 0,
        });
        self.plan.push(format!(
            "t={at} request {handle} on {} (timeout {timeout_ms:?})",
            node_name(node)
        ));
        self.schedule(
            at,
            Ev::Request {
                node,
                handle,
                timeout_ms,
            },
        );
        ReqHandle(handle)
    }

    /// Node `node` dies at `at`: its daemon stops, its writers lose their
    /// connection (and resume); the others notice after the detection delay.
    pub fn crash_at(&mut self, node: usize, at: u64) {
        self.plan.push(format!("t={at} crash {}", node_name(node)));
        self.schedule(at, Ev::Crash(node));
    }

    /// A crashed node `node` starts again at `at`: a new machine, startup
    /// cleanup, reconnection, its writers register again.
    pub fn restart_at(&mut self, node: usize, at: u64) {
        self.plan
            .push(format!("t={at} restart {}", node_name(node)));
        self.schedule(at, Ev::Restart(node));
    }

    /// Node `node`'s daemon is stopped (SIGSTOP) at `at` for `duration` ms.
    pub fn pause_at(&mut self, node: usize, at: u64, duration: u64) {
        self.plan.push(format!(
            "t={at} pause {} for {duration} ms",
            node_name(node)
        ));
        self.schedule(at, Ev::Pause(node, duration));
    }

    /// Writer `writer` of node `node` disconnects at `at`.
    pub fn writer_gone_at(&mut self, node: usize, writer: usize, at: u64) {
        self.plan.push(format!(
            "t={at} writer {writer} of {} disconnects",
            node_name(node)
        ));
        self.schedule(at, Ev::WriterGone { node, writer });
    }

    /// A new writer registers with node `node` at `at`.
    pub fn writer_join_at(&mut self, node: usize, at: u64, spec: WriterSpec) {
        self.plan.push(format!(
            "t={at} writer {} registers with {}",
            spec.name,
            node_name(node)
        ));
        self.schedule(at, Ev::WriterJoin { node, spec });
    }

    /// The link between `a` and `b` breaks at `at` for `duration` ms: both
    /// nodes stay alive and lose each other.
    pub fn partition_at(&mut self, a: usize, b: usize, at: u64, duration: u64) {
        self.plan.push(format!(
            "t={at} partition {}-{} for {duration} ms",
            node_name(a),
            node_name(b)
        ));
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
                .filter(|(_, n)| n.alive && !n.paused)
                .filter_map(|(i, n)| {
                    n.machine
                        .poll_timeout()
                        .map(|t| (n.clock.true_at(t).max(self.now), i))
                })
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
            r.reports.first().map(|r| &r.0)
        } else {
            None
        }
    }

    /// Creates seen (complete after [`Sim::run`]).
    pub fn commits(&self) -> &[CommitRecord] {
        &self.creates
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

    /// The events writer `name` received (every connection of it), in
    /// order, each with the true time it came.
    pub fn writer_events(&self, name: &str) -> Vec<(SnapshotId, EventKind, u64)> {
        self.nodes
            .iter()
            .flat_map(|n| n.writers.iter())
            .filter(|w| w.spec.name == name)
            .flat_map(|w| w.events.iter().copied())
            .collect()
    }

    /// Whether writer `name` (its latest connection) was told `registered`.
    pub fn writer_registered(&self, name: &str) -> bool {
        self.nodes
            .iter()
            .flat_map(|n| n.writers.iter())
            .rfind(|w| w.spec.name == name)
            .is_some_and(|w| w.registered_seq.is_some())
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    /// Node `node`'s clock reading at true time `t`.
    pub fn local_time(&self, node: usize, t: u64) -> u64 {
        self.config.clock(node).local(t)
    }

    // ---- internals ---------------------------------------------------------------

    fn violate(&mut self, what: String) {
        self.violations.push(format!("t={} {what}", self.now));
    }

    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at, self.seq), ev);
    }

    fn local(&self, i: usize) -> u64 {
        self.nodes[i].clock.local(self.now)
    }

    /// Hand an input to node `i`'s machine at the current time and execute
    /// what it asks.
    fn feed(&mut self, i: usize, input: Input) {
        let now = self.local(i);
        self.nodes[i].machine.handle(input, now);
        self.drain(i);
    }

    fn fire_timer(&mut self, i: usize, t: u64) {
        self.now = self.now.max(t);
        let now = self.local(i);
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

    /// The node an event is for, if it waits while that node is paused.
    fn target(ev: &Ev) -> Option<usize> {
        match ev {
            Ev::Input(i, _) | Ev::ConnDown { node: i, .. } | Ev::Peer { to: i, .. } => Some(*i),
            Ev::WriterAnswer { node, .. }
            | Ev::Request { node, .. }
            | Ev::WriterGone { node, .. }
            | Ev::WriterJoin { node, .. }
            | Ev::EngineDone { node, .. } => Some(*node),
            _ => None,
        }
    }

    /// Snapshots that may be running anywhere now.
    fn in_flight_snapshots(&self) -> Vec<SnapshotId> {
        let mut v: Vec<SnapshotId> = self
            .requests
            .iter()
            .filter(|r| r.reports.is_empty())
            .filter_map(|r| r.snapshot)
            .collect();
        for n in &self.nodes {
            let st = n.machine.status();
            if st.in_flight {
                v.extend(st.snapshot);
            }
        }
        v
    }

    fn disturb(&mut self) {
        let v = self.in_flight_snapshots();
        self.disturbed.extend(v);
    }

    fn process(&mut self, ev: Ev) {
        let now = self.now;
        if let Some(i) = Sim::target(&ev) {
            if self.nodes[i].paused {
                self.nodes[i].stalled.push(ev);
                return;
            }
        }
        match ev {
            Ev::Input(i, input) => {
                if self.nodes[i].alive {
                    if matches!(input, Input::PeerDown { .. }) {
                        // One side drops a link the other may still trust
                        // for a while: whatever runs now may be unclean.
                        self.disturb();
                    }
                    self.feed(i, input);
                }
            }
            Ev::Peer {
                to,
                to_gen,
                from,
                msg,
            } => {
                // A restarted node never sees what was sent to its old self.
                let lost = self.cut.contains(&Sim::link(from, to)) || self.nodes[to].gen != to_gen;
                if self.nodes[to].alive && !lost {
                    let input = Input::Peer {
                        from: node_name(from),
                        msg,
                    };
                    self.feed(to, input);
                }
            }
            Ev::ConnDown {
                node,
                peer,
                epoch,
                stale_too,
            } => {
                let current = self.epoch.get(&(node, peer)).copied().unwrap_or(0);
                if self.nodes[node].alive && (current == epoch || stale_too) {
                    if current != epoch {
                        // The two sides now see the link differently.
                        self.partitioned = true;
                    }
                    self.disturb();
                    self.feed(
                        node,
                        Input::PeerDown {
                            node: node_name(peer),
                        },
                    );
                    if current != epoch && self.nodes[peer].alive {
                        // The mesh sees the new connection is still up.
                        let d = self.config.delay_ms.1 + 1;
                        self.schedule(
                            now + d,
                            Ev::Input(
                                node,
                                Input::PeerUp {
                                    node: node_name(peer),
                                },
                            ),
                        );
                    }
                }
            }
            Ev::WriterAnswer {
                node,
                writer,
                snapshot,
                event,
                reply,
            } => {
                if !self.nodes[node].alive || self.nodes[node].writers[writer].gone {
                    return;
                }
                let local = self.local(node);
                let w = &mut self.nodes[node].writers[writer];
                // A writer processes its events in order: it holds from its
                // freeze ack unless it already heard the outcome or thaw,
                // or its own lease ran out meanwhile.
                if event == EventKind::Freeze && reply == WriterReply::Ack {
                    let still = w
                        .freezes
                        .get(&snapshot)
                        .is_some_and(|(at, lease)| local < at + lease);
                    if still {
                        w.frozen_for = Some(snapshot);
                        let span = FrozenSpan {
                            node,
                            writer: w.spec.name.clone(),
                            snapshot,
                            from: now,
                            to: None,
                        };
                        w.span.insert(snapshot, self.spans.len());
                        self.spans.push(span);
                    }
                }
                let input = Input::WriterReply {
                    writer: self.nodes[node].writers[writer].id,
                    snapshot,
                    event,
                    reply,
                };
                self.feed(node, input);
            }
            Ev::WriterLease {
                node,
                writer,
                snapshot,
            } => {
                let alive = self.nodes[node].alive;
                let paused = self.nodes[node].paused;
                let w = &mut self.nodes[node].writers[writer];
                if w.gone || !w.freezes.contains_key(&snapshot) {
                    return;
                }
                let name = w.spec.name.clone();
                w.freezes.remove(&snapshot);
                if w.frozen_for == Some(snapshot) {
                    w.frozen_for = None;
                }
                self.end_span(node, writer, snapshot);
                if alive && !paused && !self.paused_recently(node) {
                    self.violate(format!(
                        "{name} on {} had to resume by itself: no thaw or abort for snapshot {snapshot} within its lease",
                        node_name(node)
                    ));
                }
            }
            Ev::Request {
                node,
                handle,
                timeout_ms,
            } => self.client_request(node, handle, timeout_ms),
            Ev::WriterGone { node, writer } => {
                if !self.nodes[node].alive {
                    return;
                }
                // `writer` indexes the configured writers; find its live connection.
                let Some(name) = self.config.nodes[node].get(writer).map(|w| w.name.clone()) else {
                    return;
                };
                let Some(idx) = self.nodes[node]
                    .writers
                    .iter()
                    .rposition(|w| w.spec.name == name && !w.gone)
                else {
                    return;
                };
                let seq = self.seq;
                let w = &mut self.nodes[node].writers[idx];
                w.gone = true;
                w.left = true;
                w.gone_seq = Some(seq);
                let id = w.id;
                if w.frozen_for.is_some() {
                    self.disturb();
                }
                self.drop_connection(node, idx);
                self.feed(node, Input::WriterGone { writer: id });
            }
            Ev::WriterJoin { node, spec } => {
                if self.nodes[node].alive {
                    self.config.nodes[node].push(spec.clone());
                    self.connect_writer(node, spec);
                }
            }
            Ev::EngineDone { node, gen, job } => self.engine_done(node, gen, job),
            Ev::Partition(a, b) => {
                if a == b || !self.cut.insert(Sim::link(a, b)) {
                    return;
                }
                self.partitioned = true;
                self.disturb();
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
            Ev::Crash(i) => self.crash(i),
            Ev::Restart(i) => self.restart(i),
            Ev::Pause(i, duration) => {
                if !self.nodes[i].alive || self.nodes[i].paused {
                    return;
                }
                self.nodes[i].paused = true;
                self.nodes[i].pause_start = now;
                self.schedule(now + duration, Ev::Resume(i));
                // Past the connection timeout the others see it gone.
                if duration > self.config.detect_ms.1 {
                    let d = self.config.detect_ms.1;
                    for j in (0..self.nodes.len()).filter(|j| *j != i) {
                        self.schedule(
                            now + d,
                            Ev::Input(j, Input::PeerDown { node: node_name(i) }),
                        );
                    }
                }
            }
            Ev::Resume(i) => {
                if !self.nodes[i].paused {
                    return;
                }
                let start = self.nodes[i].pause_start;
                self.nodes[i].paused = false;
                self.nodes[i].pauses.push((start, now));
                let long = now - start > self.config.detect_ms.1;
                let mut stalled = std::mem::take(&mut self.nodes[i].stalled);
                if long && self.nodes[i].alive {
                    // Its connections died while it was stopped: what was in
                    // flight on them is lost, and it sees them down first.
                    self.partitioned = true;
                    stalled.retain(|ev| {
                        !matches!(
                            ev,
                            Ev::ConnDown { .. }
                                | Ev::Peer { .. }
                                | Ev::Input(_, Input::PeerUp { .. } | Input::PeerDown { .. })
                        )
                    });
                    for j in (0..self.nodes.len()).filter(|j| *j != i) {
                        self.feed(i, Input::PeerDown { node: node_name(j) });
                        let d = self.config.delay_ms.1 + 1;
                        if self.nodes[j].alive {
                            self.schedule(
                                now + d,
                                Ev::Input(i, Input::PeerUp { node: node_name(j) }),
                            );
                            self.schedule(
                                now + d,
                                Ev::Input(j, Input::PeerUp { node: node_name(i) }),
                            );
                        }
                    }
                }
                for ev in stalled {
                    if self.nodes[i].paused {
                        self.nodes[i].stalled.push(ev);
                    } else {
                        self.process(ev);
                    }
                }
            }
        }
    }

    /// Was node `i` paused (SIGSTOP) within the last lease?
    fn paused_recently(&self, i: usize) -> bool {
        let lease = self.config.lease_of(i).max(self.config.lease_ms);
        self.nodes[i].paused
            || self.nodes[i]
                .pauses
                .iter()
                .any(|(_, end)| end + lease + LEASE_TOLERANCE_MS >= self.now)
    }

    /// The driver's handling of `snapshot create` (see `src/node/driver.rs`).
    fn client_request(&mut self, node: usize, handle: usize, timeout_ms: Option<u64>) {
        if !self.nodes[node].alive {
            return;
        }
        let snapshot = self.next_snapshot;
        let gen = self.nodes[node].gen;
        let in_flight = self.nodes[node].machine.status().in_flight;
        let locked = self.config.in_flight_lock && self.lock.is_some();
        if in_flight || locked {
            // The driver refuses at once, before the machine sees it.
            let local = self.local(node);
            let what = if in_flight {
                format!("another snapshot is in flight on node {}", node_name(node))
            } else {
                "another snapshot of this volume is in flight in the cluster".to_string()
            };
            let report = Report {
                id: 0,
                status: ReportStatus::Failed,
                error: Some(Failure {
                    node: node_name(node),
                    writer: None,
                    phase: Phase::Idle,
                    reason: format!("{BUSY_PREFIX} {what}"),
                }),
                initiator: node_name(node),
                requested_ms: local,
                finished_ms: local,
                nodes: vec![],
                excluded: vec![],
                freeze_window_ms: None,
                io_hold_ms: None,
            };
            let r = &mut self.requests[handle];
            r.snapshot = Some(0);
            r.gen = gen;
            r.reports.push((report, self.now));
            return;
        }
        self.next_snapshot += 1;
        if self.config.in_flight_lock {
            self.lock = Some((node, gen, handle as RequestId));
            self.delete_orphans();
        }
        self.requests[handle].snapshot = Some(snapshot);
        self.requests[handle].gen = gen;
        self.requests[handle].asked_local = self.local(node);
        let input = Input::Request {
            req: handle as RequestId,
            snapshot,
            timeout_ms,
            excluded: vec![],
        };
        self.feed(node, input);
    }

    /// Delete Open snapshots; only while holding the in-flight lock.
    fn delete_orphans(&mut self) {
        self.catalog.retain(|_, s| *s != CatalogState::Open);
    }

    fn connect_writer(&mut self, i: usize, spec: WriterSpec) {
        let id = self.nodes[i].next_writer_id;
        self.nodes[i].next_writer_id += 1;
        let w = SimWriter {
            id,
            gen: self.nodes[i].gen,
            spec: spec.clone(),
            frozen_for: None,
            freezes: BTreeMap::new(),
            span: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            events: vec![],
            gone: false,
            left: false,
            registered_seq: None,
            gone_seq: None,
        };
        self.nodes[i].writers.push(w);
        let input = Input::WriterRegistered {
            writer: id,
            name: spec.name.clone(),
            on_error: spec.on_error,
            freeze_timeout_ms: spec.freeze_timeout_ms,
        };
        self.feed(i, input);
    }

    /// A writer's connection ends: it resumes writing by itself.
    fn drop_connection(&mut self, i: usize, idx: usize) {
        let w = &mut self.nodes[i].writers[idx];
        w.gone = true;
        w.frozen_for = None;
        w.freezes.clear();
        let snaps: Vec<SnapshotId> = w.span.keys().copied().collect();
        for s in snaps {
            self.end_span(i, idx, s);
        }
    }

    fn end_span(&mut self, i: usize, idx: usize, snapshot: SnapshotId) {
        if let Some(k) = self.nodes[i].writers[idx].span.remove(&snapshot) {
            if let Some(s) = self.spans.get_mut(k) {
                s.to.get_or_insert(self.now);
            }
        }
    }

    fn release_hold(&mut self, i: usize) {
        if let Some(k) = self.nodes[i].held.take() {
            if let Some(h) = self.holds.get_mut(k) {
                h.2.get_or_insert(self.now);
            }
        }
    }

    fn crash(&mut self, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        self.disturb();
        self.nodes[i].alive = false;
        self.nodes[i].paused = false;
        self.nodes[i].stalled.clear();
        for idx in 0..self.nodes[i].writers.len() {
            if !self.nodes[i].writers[idx].gone {
                self.drop_connection(i, idx);
            }
        }
        self.release_hold(i);
        self.nodes[i].hold_wanted = None;
        self.nodes[i].hold_asked_local = None;
        if self.lock.is_some_and(|(n, _, _)| n == i) {
            self.lock = None; // the process held it
        }
        let now = self.now;
        for j in (0..self.nodes.len()).filter(|j| *j != i) {
            let d = self
                .rng
                .range(self.config.detect_ms.0, self.config.detect_ms.1);
            let epoch = self.epoch.get(&(j, i)).copied().unwrap_or(0);
            let stale_too = self.rng.chance(500);
            self.schedule(
                now + d,
                Ev::ConnDown {
                    node: j,
                    peer: i,
                    epoch,
                    stale_too,
                },
            );
        }
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].alive {
            return;
        }
        let now = self.now;
        let config = self.node_config(i);
        let n = &mut self.nodes[i];
        n.gen += 1;
        n.alive = true;
        n.machine = NodeMachine::new(config, n.clock.local(now));
        n.engine_free_at = now;
        // Startup cleanup, under the in-flight lock if it is free.
        if self.lock.is_none() {
            self.delete_orphans();
        }
        let specs: Vec<WriterSpec> = self.nodes[i]
            .writers
            .iter()
            .filter(|w| !w.left && w.gen + 1 == self.nodes[i].gen)
            .map(|w| w.spec.clone())
            .collect();
        let others: Vec<usize> = (0..self.nodes.len())
            .filter(|j| *j != i && self.nodes[*j].alive)
            .collect();
        for j in others {
            *self.epoch.entry((j, i)).or_insert(0) += 1;
            let d = self.rng.range(1, self.config.delay_ms.1 + 2);
            // The daemon ends the old connection before it takes the new one.
            self.schedule(
                now + d,
                Ev::Input(j, Input::PeerDown { node: node_name(i) }),
            );
            self.schedule(now + d, Ev::Input(j, Input::PeerUp { node: node_name(i) }));
            self.schedule(now + d, Ev::Input(i, Input::PeerUp { node: node_name(j) }));
        }
        for spec in specs {
            self.connect_writer(i, spec);
        }
    }

    /// Execute node `i`'s outputs in order, as a driver would.
    fn drain(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].machine.poll_output() {
            self.seq += 1;
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

    /// Queue a job on node `i`'s engine worker; returns when it starts.
    fn engine(&mut self, i: usize, job: Job) -> u64 {
        let d = if let (Job::Create(..), Some((lo, hi))) = (&job, self.config.create_ms) {
            self.rng.range(lo, hi)
        } else if self.rng.chance(self.config.slow_engine_per_mille) {
            self.rng
                .range(self.config.slow_engine_ms.0, self.config.slow_engine_ms.1)
        } else {
            self.rng
                .range(self.config.engine_ms.0, self.config.engine_ms.1)
        };
        let start = self.now.max(self.nodes[i].engine_free_at);
        let end = start + d;
        self.nodes[i].engine_free_at = end;
        let gen = self.nodes[i].gen;
        self.schedule(end, Ev::EngineDone { node: i, gen, job });
        start
    }

    fn engine_done(&mut self, i: usize, gen: u32, job: Job) {
        if !self.nodes[i].alive || self.nodes[i].gen != gen {
            return; // the process that asked died
        }
        let now = self.now;
        let input = match job {
            Job::Hold(snapshot) => {
                if self.nodes[i].hold_wanted != Some(snapshot) {
                    return; // a late hold, released at once
                }
                self.nodes[i].held = Some(self.holds.len());
                self.holds.push((i, now, None));
                Input::HoldDone { snapshot }
            }
            Job::Flush(snapshot) => Input::FlushDone {
                snapshot,
                result: self.engine_result(),
            },
            Job::Create(snapshot, k) => {
                let result = if self.config.create_fails {
                    Err("simulated create failure".to_string())
                } else {
                    self.engine_result()
                };
                if result.is_ok() {
                    self.catalog.entry(snapshot).or_insert(CatalogState::Open);
                }
                if let Some(c) = self.creates.get_mut(k) {
                    c.end = Some(now);
                }
                Input::SnapshotCreated { snapshot, result }
            }
            Job::Seal(snapshot) => {
                let result = if self.config.seal_fails {
                    Err("simulated seal failure".to_string())
                } else {
                    self.engine_result()
                };
                // One catalog transition: Open → Sealed, or nothing.
                let result = result.and_then(|()| match self.catalog.get_mut(&snapshot) {
                    Some(s) => {
                        *s = CatalogState::Sealed;
                        Ok(())
                    }
                    None => Err(format!("snapshot {snapshot} does not exist")),
                });
                Input::SnapshotSealed { snapshot, result }
            }
            Job::Delete(snapshot) => {
                self.catalog.remove(&snapshot);
                return;
            }
            Job::Resolve(snapshot) => {
                // One catalog transaction: keep it if sealed, else delete.
                let kept = self.catalog.get(&snapshot) == Some(&CatalogState::Sealed);
                if !kept {
                    self.catalog.remove(&snapshot);
                }
                Input::SnapshotResolved {
                    snapshot,
                    kept: Ok(kept),
                }
            }
        };
        self.feed(i, input);
    }

    fn execute(&mut self, i: usize, out: Output) {
        match out {
            Output::SendPeer { to, msg } => self.send(i, &to, msg),
            Output::WriterEvent {
                writer,
                snapshot,
                event,
            } => self.writer_event(i, writer, snapshot, event),
            Output::HoldIo { snapshot } => {
                self.nodes[i].hold_wanted = Some(snapshot);
                let local = self.local(i);
                self.nodes[i].hold_asked_local.get_or_insert(local);
                self.engine(i, Job::Hold(snapshot));
            }
            Output::ReleaseIo { .. } => {
                self.nodes[i].hold_wanted = None;
                self.release_hold(i);
                if let Some(since) = self.nodes[i].hold_asked_local.take() {
                    let held = self.local(i) - since;
                    let lease = self.config.lease_of(i);
                    if held > lease + LEASE_TOLERANCE_MS && !self.paused_recently(i) {
                        self.violate(format!(
                            "{} held I/O {held} ms of its clock, past its lease of {lease} ms",
                            node_name(i)
                        ));
                    }
                }
            }
            Output::FlushVolume { snapshot } => {
                self.engine(i, Job::Flush(snapshot));
            }
            Output::CreateSnapshot { snapshot } => {
                let k = self.creates.len();
                self.creates.push(CommitRecord {
                    snapshot,
                    at: 0,
                    end: None,
                    accepted: false,
                    unfrozen: vec![],
                    unheld: vec![],
                });
                self.create_of.insert((i, snapshot), k);
                let start = self.engine(i, Job::Create(snapshot, k));
                self.creates[k].at = start;
            }
            Output::SealSnapshot { snapshot } => {
                self.engine(i, Job::Seal(snapshot));
            }
            Output::DeleteSnapshot { snapshot } => {
                self.engine(i, Job::Delete(snapshot));
            }
            Output::ResolveSnapshot { snapshot } => {
                self.engine(i, Job::Resolve(snapshot));
            }
            Output::WriterRegistered { writer } => {
                let seq = self.seq;
                match self.nodes[i]
                    .writers
                    .iter_mut()
                    .find(|w| w.id == writer && !w.gone)
                {
                    Some(w) => {
                        if w.registered_seq.is_some() {
                            let name = w.spec.name.clone();
                            self.violate(format!("{name} told registered twice"));
                        } else {
                            w.registered_seq = Some(seq);
                        }
                    }
                    None => self.violate(format!(
                        "{} told unknown writer {writer} it is registered",
                        node_name(i)
                    )),
                }
            }
            Output::Phase(e) => {
                if e.writer.is_none() && e.edge == PhaseEdge::Enter {
                    match e.phase {
                        Phase::Freezing => {
                            let gen = self.nodes[i].gen;
                            self.run_starts.push((i, gen, e.snapshot, self.seq));
                        }
                        Phase::PostSnapshot => {
                            if let Some(k) = self.create_of.get(&(i, e.snapshot)) {
                                self.creates[*k].accepted = true;
                            }
                        }
                        _ => {}
                    }
                }
                self.phase_events.push(e);
            }
            Output::Report { req, report } => {
                if self
                    .lock
                    .is_some_and(|(n, g, r)| n == i && g == self.nodes[i].gen && r == req)
                {
                    self.lock = None;
                }
                let now = self.now;
                match self.requests.get_mut(req as usize) {
                    Some(r) if r.node == i => r.reports.push((report, now)),
                    _ => self.violate(format!(
                        "{} reported to unknown request {req}",
                        node_name(i)
                    )),
                }
            }
        }
    }

    fn send(&mut self, from: usize, to: &str, msg: PeerMessage) {
        let Some(j) = (0..self.nodes.len()).find(|j| node_name(*j) == to) else {
            // A member only the sender believes in (diverging member lists).
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
        if self.cut.contains(&Sim::link(from, j)) {
            return;
        }
        // The driver drops a message for a peer it is not connected to.
        let connected = self.nodes[from]
            .machine
            .status()
            .peers
            .iter()
            .any(|p| p.node == to && p.connected);
        if !connected {
            return;
        }
        let h = self.link_history.entry((from, j)).or_default();
        h.push(msg.clone());
        if h.len() > 24 {
            h.remove(0);
        }
        if !self.rng.chance(self.config.drop_per_mille) {
            self.deliver(from, j, msg.clone());
        }
        if self.rng.chance(self.config.dup_per_mille) {
            self.deliver(from, j, msg);
        }
        if self.rng.chance(self.config.replay_per_mille) {
            // An old message of this link, or of the way back, arrives
            // again now: often one of an earlier snapshot, just when the
            // new one waits for its like.
            let (a, b) = if self.rng.chance(500) {
                (from, j)
            } else {
                (j, from)
            };
            let n = self.link_history.get(&(a, b)).map_or(0, Vec::len) as u64;
            let k = self.rng.range(0, n.saturating_sub(1)) as usize;
            let old = self
                .link_history
                .get(&(a, b))
                .and_then(|h| h.get(k).cloned());
            if let Some(old) = old {
                self.deliver(a, b, old);
            }
        }
    }

    fn deliver(&mut self, from: usize, j: usize, msg: PeerMessage) {
        let d = self
            .rng
            .range(self.config.delay_ms.0, self.config.delay_ms.1);
        let last = self.link_last.get(&(from, j)).copied().unwrap_or(0);
        let at = (self.now + d).max(last);
        self.link_last.insert((from, j), at);
        let to_gen = self.nodes[j].gen;
        self.schedule(
            at,
            Ev::Peer {
                to: j,
                to_gen,
                from,
                msg,
            },
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
        let local = self.local(i);
        let Some(idx) = self.nodes[i]
            .writers
            .iter()
            .position(|w| w.id == writer && w.gen == self.nodes[i].gen)
        else {
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
        let lease = self.config.lease_of(i);
        let mut problems = vec![];
        let mut ended = None;
        let mut end_span = false;
        let mut lease_end = None;
        {
            let w = &mut self.nodes[i].writers[idx];
            w.events.push((snapshot, kind, now));
            if w.registered_seq.is_none() {
                problems.push(format!(
                    "{} on {} got {kind} for {snapshot} before it was told registered",
                    w.spec.name,
                    node_name(i)
                ));
            }
            match &event {
                WriterEvent::Freeze { lease_ms } => {
                    w.outcomes.entry(snapshot).or_insert(0);
                    if let Some(other) = w.frozen_for.filter(|s| *s != snapshot) {
                        problems.push(format!(
                            "{} frozen for {other} got freeze for {snapshot}",
                            w.spec.name
                        ));
                    }
                    if *lease_ms > lease {
                        problems.push(format!(
                            "{} told lease_ms {lease_ms}, longer than {}'s lease {lease}",
                            w.spec.name,
                            node_name(i)
                        ));
                    }
                    w.freezes.insert(snapshot, (local, *lease_ms));
                    lease_end = Some(local + lease_ms + LEASE_TOLERANCE_MS);
                }
                WriterEvent::Complete | WriterEvent::Abort { .. } | WriterEvent::Thaw => {
                    if event.is_outcome() {
                        match w.outcomes.get_mut(&snapshot) {
                            Some(n) => *n += 1,
                            None => problems.push(format!(
                                "{} got {kind} for {snapshot} without a freeze",
                                w.spec.name
                            )),
                        }
                    }
                    if w.frozen_for == Some(snapshot) {
                        w.frozen_for = None;
                    }
                    if let Some((since, _)) = w.freezes.remove(&snapshot) {
                        ended = Some((i, w.spec.name.clone(), snapshot, since, local));
                    }
                    end_span = true;
                }
                WriterEvent::PostSnapshot => {}
            }
        }
        for p in problems {
            self.violate(p);
        }
        if let Some(l) = lease_end {
            let at = self.nodes[i].clock.true_at(l);
            self.schedule(
                at,
                Ev::WriterLease {
                    node: i,
                    writer: idx,
                    snapshot,
                },
            );
        }
        if end_span {
            self.end_span(i, idx, snapshot);
        }
        if let Some((_, _, _, since, _)) = ended {
            if local - since > lease + LEASE_TOLERANCE_MS && !self.paused_recently(i) {
                let name = self.nodes[i].writers[idx].spec.name.clone();
                self.violate(format!(
                    "{name} stayed frozen {} ms of {}'s clock, past its lease",
                    local - since,
                    node_name(i)
                ));
            }
        }
        self.episodes
            .extend(ended.map(|(n, w, s, _, _)| (n, w, s, 0, now)));
        if event.is_outcome() {
            return;
        }
        let spec = self.nodes[i].writers[idx].spec.clone();
        let delay = self
            .rng
            .range(self.config.writer_delay_ms.0, self.config.writer_delay_ms.1);
        let timeout = spec
            .freeze_timeout_ms
            .unwrap_or(self.config.writer_timeout_ms);
        let (reply, at) = match spec.behaviour {
            Behaviour::Veto(k) if k == kind => (
                WriterReply::Veto {
                    reason: format!("{} refuses {kind}", spec.name),
                },
                now + delay,
            ),
            Behaviour::Silent(k) if k == kind => return,
            Behaviour::Slow(k) if k == kind => (WriterReply::Ack, now + timeout + 50 + delay),
            Behaviour::Hook(ms) if kind == EventKind::Freeze => (WriterReply::Ack, now + ms),
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

    /// Fill in each create's record: who was not frozen, or not held,
    /// through the whole create.
    fn judge_creates(&mut self) {
        let n = self.nodes.len();
        for k in 0..self.creates.len() {
            let (snapshot, from, to) = {
                let c = &self.creates[k];
                (c.snapshot, c.at, c.end.unwrap_or(c.at))
            };
            let covers = |a: u64, b: Option<u64>| a <= from && b.is_none_or(|b| b >= to);
            let mut unfrozen = vec![];
            // Every writer that was sent freeze for it (and may not continue).
            for (i, node) in self.nodes.iter().enumerate() {
                for w in node
                    .writers
                    .iter()
                    .filter(|w| w.outcomes.contains_key(&snapshot))
                {
                    if w.spec.on_error != OnError::Fail {
                        continue;
                    }
                    let ok = self.spans.iter().any(|s| {
                        s.node == i
                            && s.snapshot == snapshot
                            && s.writer == w.spec.name
                            && covers(s.from, s.to)
                    });
                    if !ok {
                        unfrozen.push(w.spec.name.clone());
                    }
                }
            }
            unfrozen.sort();
            unfrozen.dedup();
            let unheld = (0..n)
                .filter(|i| !self.holds.iter().any(|h| h.0 == *i && covers(h.1, h.2)))
                .map(node_name)
                .collect();
            self.creates[k].unfrozen = unfrozen;
            self.creates[k].unheld = unheld;
        }
    }

    fn check_end(&mut self) {
        self.judge_creates();
        let mut v = vec![];
        let diverging = !self.config.node_members.is_empty();
        // Every freeze followed by thaw or abort; nothing held.
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.alive) {
            if n.held.is_some() || n.hold_wanted.is_some() {
                v.push(format!("{} still holds I/O at the end", node_name(i)));
            }
            for w in n.writers.iter().filter(|w| !w.gone) {
                for s in w.freezes.keys() {
                    v.push(format!(
                        "{} on {} got freeze for {s} and never thaw or abort",
                        w.spec.name,
                        node_name(i)
                    ));
                }
                for (s, k) in &w.outcomes {
                    if *k != 1 {
                        v.push(format!(
                            "{} on {} got {k} outcomes for snapshot {s} (exactly one is promised)",
                            w.spec.name,
                            node_name(i)
                        ));
                    }
                }
                match w.registered_seq {
                    None => v.push(format!(
                        "{} on {} was never told registered",
                        w.spec.name,
                        node_name(i)
                    )),
                    Some(r) => {
                        // It takes part in every run its node started after.
                        for (node, gen, s, seq) in &self.run_starts {
                            if *node == i
                                && *gen == w.gen
                                && *seq > r
                                && !w.outcomes.contains_key(s)
                            {
                                v.push(format!(
                                    "{} on {} was registered but not frozen for snapshot {s}",
                                    w.spec.name,
                                    node_name(i)
                                ));
                            }
                        }
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
            let alive = self.nodes[r.node].alive && self.nodes[r.node].gen == r.gen;
            if r.snapshot.is_none() {
                continue; // reached a dead node
            }
            if r.reports.len() > 1 || (alive && r.reports.len() != 1) {
                v.push(format!(
                    "request {h} on {} at {} got {} reports",
                    node_name(r.node),
                    r.at,
                    r.reports.len()
                ));
            }
            for (rep, _) in &r.reports {
                let state = self.catalog.get(&rep.id);
                match rep.status {
                    ReportStatus::Complete => {
                        if diverging {
                            v.push(format!(
                                "snapshot {} complete although member lists differ",
                                rep.id
                            ));
                        }
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
                        for c in self.creates.iter().filter(|c| c.snapshot == rep.id) {
                            if c.accepted && (!c.unfrozen.is_empty() || !c.unheld.is_empty()) {
                                v.push(format!(
                                    "snapshot {} complete but during its create unfrozen {:?} unheld {:?}",
                                    rep.id, c.unfrozen, c.unheld
                                ));
                            }
                        }
                        if rep.error.is_some() {
                            v.push(format!("snapshot {} complete with an error", rep.id));
                        }
                    }
                    ReportStatus::Failed => {
                        if state.is_some() && !rep.is_busy() {
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
                let asked = r.asked_local;
                if rep.requested_ms != asked && !rep.is_busy() {
                    v.push(format!(
                        "report {} requested_ms {} but asked at {asked}",
                        rep.id, rep.requested_ms
                    ));
                }
            }
        }
        // On a lossless network an abort reaches every node at once: nobody
        // waits for its lease after the initiator gave up.
        if self.config.drop_per_mille == 0 && !self.partitioned {
            // A duplicate ahead of the abort on its FIFO link delays it.
            let copies = if self.config.dup_per_mille + self.config.replay_per_mille > 0 {
                3
            } else {
                1
            };
            let slack = copies * self.config.delay_ms.1 + 1;
            for r in self.requests.iter() {
                for (rep, at) in r
                    .reports
                    .iter()
                    .filter(|(rep, _)| rep.status == ReportStatus::Failed && !rep.is_busy())
                {
                    for (node, writer, _, _, end) in self.episodes.iter().filter(|e| e.2 == rep.id)
                    {
                        let paused = self.nodes[*node]
                            .pauses
                            .iter()
                            .any(|(a, b)| *a <= *end && *b >= *at);
                        if *end > at + slack && !paused && !self.disturbed.contains(&rep.id) {
                            v.push(format!(
                                "{writer} on {} thawed at {end}, long after the initiator aborted snapshot {} at {at}",
                                node_name(*node),
                                rep.id,
                            ));
                        }
                    }
                }
            }
        }
        // Every create the initiator accepted ran with everyone frozen and
        // held throughout, unless a fault no node could see in time struck.
        for c in self
            .creates
            .iter()
            .filter(|c| c.accepted && !self.disturbed.contains(&c.snapshot))
        {
            if !c.unfrozen.is_empty() || !c.unheld.is_empty() {
                v.push(format!(
                    "create of snapshot {} from {} to {:?} accepted with unfrozen writers {:?} and unheld nodes {:?}",
                    c.snapshot, c.at, c.end, c.unfrozen, c.unheld
                ));
            }
        }
        // Nothing half-made: an unsealed snapshot may only be left by an
        // initiator that died and no node touched since.
        for (id, state) in &self.catalog {
            if *state == CatalogState::Open {
                let owner = self
                    .requests
                    .iter()
                    .find(|r| r.snapshot == Some(*id))
                    .map(|r| (r.node, r.gen));
                if owner.is_none_or(|(o, g)| self.nodes[o].alive && self.nodes[o].gen == g) {
                    v.push(format!("snapshot {id} left open in the catalog"));
                } else if self.nodes.len() > 1 && self.nodes.iter().any(|n| n.alive) {
                    // Survivors resolve it (seal-or-delete) within lease + grace.
                    let survivors_took_part = self
                        .nodes
                        .iter()
                        .filter(|n| n.alive)
                        .any(|n| n.writers.iter().any(|w| w.outcomes.contains_key(id)));
                    if survivors_took_part {
                        v.push(format!(
                            "snapshot {id} left open although a participant survived"
                        ));
                    }
                }
            }
        }
        for x in v {
            self.violate(x);
        }
    }
}
