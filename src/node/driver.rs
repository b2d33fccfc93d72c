//! The driver: the one task that owns this node's [`NodeMachine`].
//!
//! It turns [`DriverEvent`]s into machine inputs (with the time), executes
//! the machine's outputs in order, and wakes the machine when its timer is
//! due. Engine work that blocks (hold, flush, create, seal, delete) runs on
//! the blocking pool and comes back as a [`DriverEvent::Engine`], so the
//! driver never stalls behind the disk.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use freezeframe_core::manifest::{self, ManifestStatus, SnapshotManifest};
use freezeframe_core::membership::{self, Attachment};
use freezeframe_core::protocol::{
    self, Failure, Input, NodeMachine, Output, Phase, Report, ReportStatus, WriterEvent as MEvent,
    WriterReply,
};
use freezeframe_core::volume::{HoldGuard, InFlightGuard, Resolution, SnapshotOptions, Volume};
use freezeframe_netproto::writer::{WriterEvent, WriterRequest};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::engine::{EngineWorker, HoldSlot};
use super::failpoints::Failpoints;
use super::hooks;
use super::peers::{self, PeerTable, PeerWire};
use super::{control, writers, DriverEvent, Shared};
use crate::config::NodeConfig;

/// Milliseconds since the epoch that never go backwards: the wall clock read
/// once at start, advanced by the monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch_ms: u64,
    start: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Clock {
            epoch_ms,
            start: Instant::now(),
        }
    }
    pub fn now_ms(&self) -> u64 {
        self.epoch_ms + self.start.elapsed().as_millis() as u64
    }
    fn instant_of(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms.saturating_sub(self.epoch_ms))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Results of engine work done off the driver task.
#[derive(Debug)]
pub enum EngineDone {
    Held {
        snapshot: u64,
        guard: HoldGuard,
    },
    Flushed {
        snapshot: u64,
        result: Result<(), String>,
    },
    Created {
        snapshot: u64,
        result: Result<(), String>,
    },
    Sealed {
        snapshot: u64,
        result: Result<(), String>,
    },
    Resolved {
        snapshot: u64,
        kept: Result<bool, String>,
    },
}

/// The writer id of the `hooks.d` folder (application writers count from 1).
const HOOKS_WRITER: u64 = 0;

struct Writer {
    name: String,
    tx: mpsc::UnboundedSender<WriterEvent>,
    /// `registered` was sent (it is held back while a snapshot runs).
    told_registered: bool,
}

struct Driver {
    shared: Arc<Shared>,
    clock: Clock,
    machine: NodeMachine,
    tx: super::DriverTx,
    engine: EngineWorker,
    failpoints: Failpoints,
    writers: HashMap<u64, Writer>,
    peers: PeerTable,
    peer_conn: HashMap<String, usize>,
    /// Local snapshot requests waiting for their report.
    waiting: HashMap<u64, oneshot::Sender<Value>>,
    next_req: u64,
    /// The cluster-wide one-in-flight lock while this node initiates.
    in_flight: Option<InFlightGuard>,
    /// The I/O hold, tagged with the snapshot that asked for it.
    hold: HoldSlot,
    /// The hooks task, awaited on shutdown so its undo scripts finish.
    hooks_task: Option<tokio::task::JoinHandle<()>>,
    /// Notices when the daemon did not run at all (SIGSTOP, starvation).
    stall: StallWatch,
    /// The member list in force (from the config, then from `node reload`).
    members: Vec<crate::config::Member>,
    mesh: Option<peers::Mesh>,
    mounted: bool,
}

pub async fn run_node(cfg: NodeConfig) -> Result<()> {
    let checks = super::startup::preflight(&cfg)?;
    let clock = Clock::new();
    let failpoints = Failpoints::from_env()?;
    if failpoints.any() {
        tracing::warn!(
            ?failpoints,
            "fault injection is on ({})",
            super::failpoints::ENV
        );
    }
    let volume = cfg
        .open_volume()
        .with_context(|| format!("node {}: opening the shared volume", cfg.name()))?;
    volume.set_node(cfg.name());
    std::fs::write(cfg.pid_file(), std::process::id().to_string())?;
    let attachment = attach(&cfg, &volume, clock.now_ms())?;

    // The mount first: a stale one from a killed daemon is cleared.
    let _ = freezeframe_fusefs::clear_stale_mount(&cfg.raw.node.mount);
    let view = Arc::new(freezeframe_core::vfs::Vfs::new(Arc::new(volume.clone())));
    let mount = freezeframe_fusefs::mount(
        view,
        &cfg.raw.node.mount,
        freezeframe_fusefs::MountConfig {
            allow_other: cfg.raw.node.allow_other,
            ..Default::default()
        },
    )
    .with_context(|| {
        format!(
            "node {}: mounting {}",
            cfg.name(),
            cfg.raw.node.mount.display()
        )
    })?;

    let (events, _) = broadcast::channel(4096);
    let engine = EngineWorker::start(volume.clone()).context("starting the engine worker")?;
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        volume,
        events,
    });
    {
        // A snapshot this node made Invalid (diff limit, full state
        // filesystem, damage) is an event for the console and `events`.
        let (events, node) = (shared.events.clone(), cfg.name().to_string());
        shared.volume.on_invalidate(move |inv| {
            let _ = events.send(json!({
                "kind": "snapshot_invalid",
                "snapshot": inv.id,
                "node": node,
                "cause": inv.cause,
                "reason": inv.reason,
                "at_ms": clock.now_ms(),
            }));
        });
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    control::serve(&cfg.control_socket(), tx.clone(), shared.clone()).await?;
    writers::serve(&cfg.writer_socket(), tx.clone()).await?;
    super::startup::secure_writer_socket(&cfg.writer_socket(), checks.writer_gid)?;
    let mesh = peers::start(&cfg, tx.clone())?;
    let renewals = tokio::spawn(renew_attachment(
        shared.clone(),
        attachment,
        clock,
        tx.clone(),
    ));
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!("cannot watch SIGTERM: {e}");
                        return;
                    }
                };
            let mut hup =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!("cannot watch SIGHUP: {e}");
                        return;
                    }
                };
            loop {
                tokio::select! {
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                    _ = hup.recv() => {
                        let _ = tx.send(DriverEvent::Reload { reply: None });
                    }
                }
            }
            let _ = tx.send(DriverEvent::Shutdown);
        });
    }

    let pcfg = protocol::Config {
        node: cfg.name().to_string(),
        members: cfg
            .raw
            .cluster
            .members
            .iter()
            .map(|m| m.name.clone())
            .collect(),
        lease_ms: cfg.lease_ms,
        writer_timeout_ms: cfg.writer_timeout_ms,
        commit_margin_ms: protocol::DEFAULT_COMMIT_MARGIN_MS.min(cfg.lease_ms / 4),
    };
    let mut d = Driver {
        machine: NodeMachine::new(pcfg, clock.now_ms()),
        shared: shared.clone(),
        clock,
        tx: tx.clone(),
        engine,
        failpoints,
        writers: HashMap::new(),
        peers: PeerTable::default(),
        peer_conn: HashMap::new(),
        waiting: HashMap::new(),
        next_req: 1,
        in_flight: None,
        hold: HoldSlot::default(),
        hooks_task: None,
        stall: StallWatch::start(clock),
        members: cfg.raw.cluster.members.clone(),
        mesh: Some(mesh),
        mounted: true,
    };
    if let Some(dir) = cfg.raw.node.hooks_dir.clone() {
        // The hooks folder is one ordinary writer, served by its own task.
        let hcfg = hooks::HookConfig {
            dir,
            node: cfg.name().to_string(),
            hook_timeout: Duration::from_millis(cfg.hook_timeout_ms),
        };
        let reply_tx = tx.clone();
        let (htx, task) = hooks::spawn(hcfg, move |req| {
            let _ = reply_tx.send(DriverEvent::WriterReply {
                id: HOOKS_WRITER,
                req,
            });
        });
        d.hooks_task = Some(task);
        d.register(
            HOOKS_WRITER,
            "hooks.d".into(),
            protocol::OnError::Fail,
            // The hook timeout bounds each script; the whole folder gets the lease.
            Some(cfg.lease_ms),
            htx,
        );
    }
    if let Ok(Some(_guard)) = shared.volume.try_begin_snapshot() {
        delete_orphans(&shared.volume);
    }
    tracing::info!(node = %cfg.name(), mount = %cfg.raw.node.mount.display(), "node running");

    loop {
        let wake = d.machine.poll_timeout().map(|t| d.clock.instant_of(t));
        let ev = match wake {
            // Events first: after a stall (SIGSTOP, overload) the answers that
            // arrived meanwhile must be seen before the timers they beat.
            Some(at) => tokio::select! {
                biased;
                ev = rx.recv() => ev,
                _ = tokio::time::sleep_until(at.into()) => {
                    d.check_stall();
                    let now = d.clock.now_ms();
                    d.machine.handle_timeout(now);
                    d.drain();
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match ev {
            None | Some(DriverEvent::Shutdown) => break,
            Some(ev) => d.event(ev),
        }
    }

    tracing::info!(node = %cfg.name(), "shutting down");
    d.shutdown().await;
    renewals.abort();
    drop(d.mesh.take());
    super::startup::unmount_bounded(mount, &cfg.raw.node.mount, super::startup::UNMOUNT_GRACE);
    // A clean stop: this node no longer writes, so snapshots need not wait for it.
    if let Err(e) = membership::remove(shared.volume.state_dir(), cfg.name()) {
        tracing::warn!("removing this node's attachment record: {e}");
    }
    for p in [cfg.control_socket(), cfg.writer_socket(), cfg.pid_file()] {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

impl Driver {
    fn name(&self) -> &str {
        self.shared.cfg.name()
    }

    fn feed(&mut self, input: Input) {
        let now = self.clock.now_ms();
        self.machine.handle(input, now);
        self.drain();
    }

    fn register(
        &mut self,
        id: u64,
        name: String,
        on_error: protocol::OnError,
        freeze_timeout_ms: Option<u64>,
        tx: mpsc::UnboundedSender<WriterEvent>,
    ) {
        self.writers.insert(
            id,
            Writer {
                name: name.clone(),
                tx,
                told_registered: false,
            },
        );
        tracing::info!(writer = %name, "writer registered");
        self.feed(Input::WriterRegistered {
            writer: id,
            name,
            on_error,
            freeze_timeout_ms,
        });
        self.gossip_status();
    }

    /// Tells the machine when the daemon was not running, before it hears
    /// of the losses that caused (peers give up on a silent node).
    fn check_stall(&mut self) {
        if let Some(ms) = self.stall.take() {
            tracing::warn!("this daemon did not run for {ms} ms (stopped or starved)");
            self.feed(Input::Stalled { ms });
        }
    }

    fn event(&mut self, ev: DriverEvent) {
        self.check_stall();
        match ev {
            DriverEvent::Status { reply } => {
                let _ = reply.send(self.status());
            }
            DriverEvent::Create { timeout_ms, reply } => self.create(timeout_ms, reply),
            DriverEvent::Delete { id, reply } => self.delete(id, reply),
            DriverEvent::WriterRegistered {
                id,
                name,
                on_error,
                freeze_timeout_ms,
                tx,
            } => self.register(id, name, on_error, freeze_timeout_ms, tx),
            DriverEvent::WriterReply { id, req } => {
                let (event, snapshot, reply) = match req {
                    WriterRequest::Ack { event, snapshot } => (event, snapshot, WriterReply::Ack),
                    WriterRequest::Veto {
                        event,
                        snapshot,
                        reason,
                    } => (event, snapshot, WriterReply::Veto { reason }),
                    WriterRequest::Register { .. } => return,
                };
                self.feed(Input::WriterReply {
                    writer: id,
                    snapshot,
                    event,
                    reply,
                });
            }
            DriverEvent::WriterGone { id } => {
                if let Some(w) = self.writers.remove(&id) {
                    tracing::info!(writer = %w.name, "writer gone");
                }
                self.feed(Input::WriterGone { writer: id });
                self.gossip_status();
            }
            DriverEvent::PeerUp { node, conn, tx } => {
                if self.peer_conn.contains_key(&node) {
                    // A new connection of a peer we think is up: the old one
                    // is dead (the peer restarted). Its loss must count now,
                    // not when the old connection times out.
                    tracing::info!(peer = %node, "peer reconnected; its old connection is gone");
                    self.feed(Input::PeerDown { node: node.clone() });
                }
                self.peer_conn.insert(node.clone(), conn);
                self.peers.senders.insert(node.clone(), tx);
                self.feed(Input::PeerUp { node: node.clone() });
                let st = self.own_summary();
                self.peers.send(&node, PeerWire::Status { status: st });
                self.peers.send(&node, self.members_wire());
            }
            DriverEvent::PeerDown { node, conn } => {
                if self.peer_conn.get(&node) == Some(&conn) {
                    self.peer_conn.remove(&node);
                    self.peers.senders.remove(&node);
                    self.peers.status.remove(&node);
                    self.feed(Input::PeerDown { node });
                }
            }
            DriverEvent::PeerMsg { node, msg } => self.feed(Input::Peer { from: node, msg }),
            DriverEvent::PeerEvent { node, event } => {
                if event.node == node {
                    if let Ok(v) = serde_json::to_value(&event) {
                        let _ = self.shared.events.send(v);
                    }
                }
            }
            DriverEvent::PeerMembers { node, members } => {
                self.feed(Input::PeerMembers {
                    node: node.clone(),
                    members,
                });
                let differs = self
                    .machine
                    .status()
                    .peers
                    .into_iter()
                    .find(|p| p.node == node)
                    .and_then(|p| p.members_differ);
                match differs {
                    Some(why) => tracing::warn!(peer = %node, "{why}"),
                    None => tracing::debug!(peer = %node, "member lists agree"),
                }
            }
            DriverEvent::PeerStatus { node, status } => {
                self.peers.status.insert(node, status);
            }
            DriverEvent::Engine(done) => self.engine_done(done),
            DriverEvent::Fenced { reason } => self.fenced(reason),
            DriverEvent::Reload { reply } => {
                let r = self.reload();
                match (&r, reply) {
                    (_, Some(tx)) => {
                        let _ = tx.send(r);
                    }
                    (Ok(v), None) => tracing::info!("reloaded on SIGHUP: {v}"),
                    (Err(e), None) => tracing::error!("reload on SIGHUP refused: {e:#}"),
                }
            }
            DriverEvent::Shutdown => {}
        }
    }

    fn create(&mut self, timeout_ms: Option<u64>, reply: oneshot::Sender<Value>) {
        let now = self.clock.now_ms();
        let name = self.name().to_string();
        let refuse = |reason: String| -> Value {
            serde_json::to_value(Report {
                id: 0,
                status: ReportStatus::Failed,
                error: Some(Failure {
                    node: name.clone(),
                    writer: None,
                    phase: Phase::Idle,
                    reason,
                }),
                initiator: name.clone(),
                requested_ms: now,
                finished_ms: now,
                nodes: Vec::new(),
                excluded: Vec::new(),
                freeze_window_ms: None,
                io_hold_ms: None,
            })
            .unwrap_or(Value::Null)
        };
        let st = self.machine.status();
        if st.in_flight {
            let what = st
                .snapshot
                .map_or(String::new(), |s| format!(" (snapshot {s})"));
            let _ = reply.send(refuse(format!(
                "{} another snapshot{what} is in flight on node {name}",
                protocol::BUSY_PREFIX
            )));
            return;
        }
        let volume = self.shared.volume.clone();
        let guard = tokio::task::block_in_place(|| volume.try_begin_snapshot());
        let guard = match guard {
            Ok(Some(g)) => g,
            Ok(None) => {
                let _ = reply.send(refuse(format!(
                    "{} another snapshot of this volume is in flight in the cluster",
                    protocol::BUSY_PREFIX
                )));
                return;
            }
            Err(e) => {
                let _ = reply.send(refuse(format!(
                    "cannot lock the volume's state directory: {e}"
                )));
                return;
            }
        };
        let id = match tokio::task::block_in_place(|| volume.reserve_snapshot_id()) {
            Ok(id) => id,
            Err(e) => {
                let _ = reply.send(refuse(format!(
                    "cannot reserve a snapshot id in the catalog: {e}"
                )));
                return;
            }
        };
        // Holding the in-flight lock, no snapshot is being taken anywhere: an
        // Open snapshot now is the leftover of an initiator that died after commit.
        tokio::task::block_in_place(|| delete_orphans(&volume));
        // Who must freeze: every attached node (DESIGN.md §9).
        let excluded = match tokio::task::block_in_place(|| self.participation()) {
            Ok(x) => x,
            Err((node, reason)) => {
                let mut v = refuse(reason);
                v["error"]["node"] = json!(node);
                let _ = reply.send(v);
                return;
            }
        };
        self.in_flight = Some(guard);
        let req = self.next_req;
        self.next_req += 1;
        self.waiting.insert(req, reply);
        self.feed(Input::Request {
            req,
            snapshot: id,
            timeout_ms,
            excluded,
        });
    }

    fn delete(&mut self, id: u64, reply: oneshot::Sender<Result<()>>) {
        let st = self.machine.status();
        if st.in_flight && st.snapshot == Some(id) {
            let _ = reply.send(Err(anyhow::anyhow!(
                "snapshot {id} is being taken right now; delete it when it is done"
            )));
            return;
        }
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let r = shared
                .volume
                .delete_snapshot(id)
                .map_err(anyhow::Error::from)
                .and_then(|_| {
                    manifest::remove(shared.volume.state_dir(), id).map_err(anyhow::Error::from)
                });
            let _ = reply.send(r);
        });
    }

    /// `node reload` / SIGHUP: re-reads the config file and applies its member
    /// list (new members are admitted and dialed, removed ones dropped).
    /// Anything else that changed needs a restart and is refused, naming it.
    fn reload(&mut self) -> Result<Value> {
        let cfg = &self.shared.cfg;
        let new = NodeConfig::load(&cfg.file)?;
        let same = |what: &str, a: String, b: String| -> Result<()> {
            if a != b {
                anyhow::bail!("{what} changed ({a} → {b}); that needs a restart, not a reload");
            }
            Ok(())
        };
        same("[node] name", cfg.name().into(), new.name().into())?;
        same(
            "[node] listen",
            cfg.raw.node.listen.to_string(),
            new.raw.node.listen.to_string(),
        )?;
        same(
            "[volume] path",
            cfg.raw.volume.path.display().to_string(),
            new.raw.volume.path.display().to_string(),
        )?;
        same(
            "[cluster] ca_cert",
            cfg.raw.cluster.ca_cert.display().to_string(),
            new.raw.cluster.ca_cert.display().to_string(),
        )?;
        let names: Vec<String> = new
            .raw
            .cluster
            .members
            .iter()
            .map(|m| m.name.clone())
            .collect();
        self.machine
            .set_members(&names)
            .map_err(|e| anyhow::anyhow!(e))?;
        let old: Vec<String> = self.members.iter().map(|m| m.name.clone()).collect();
        let added: Vec<&String> = names.iter().filter(|n| !old.contains(n)).collect();
        let removed: Vec<String> = old.iter().filter(|n| !names.contains(n)).cloned().collect();
        if let Some(mesh) = self.mesh.as_mut() {
            mesh.set_members(&new.raw.cluster.members, cfg.name());
        }
        for node in &removed {
            // Forget its connection: no more traffic to or from a non-member.
            self.peer_conn.remove(node);
            self.peers.senders.remove(node);
            self.peers.status.remove(node);
        }
        self.members = new.raw.cluster.members.clone();
        tracing::info!(?added, ?removed, "member list reloaded");
        self.peers.broadcast(&self.members_wire());
        self.gossip_status();
        Ok(json!({"members": names, "added": added, "removed": removed}))
    }

    /// The safety rule for a snapshot this node initiates: who is left out
    /// (fenced, not attached), or which attached node makes it impossible.
    /// Auto-fences expired attachments first when `[cluster] auto_fence`.
    fn participation(&self) -> std::result::Result<Vec<protocol::Excluded>, (String, String)> {
        let cfg = &self.shared.cfg;
        let volume = &self.shared.volume;
        let io = |what: &str, e: &dyn std::fmt::Display| {
            (
                cfg.name().to_string(),
                format!("cannot read {what} of the volume: {e}"),
            )
        };
        let attached =
            membership::list(volume.state_dir()).map_err(|e| io("the attachment records", &e))?;
        let fenced = volume.fences().map_err(|e| io("the fences", &e))?;
        let members: Vec<String> = self.members.iter().map(|m| m.name.clone()).collect();
        let connected = self.peers.senders.keys().cloned().collect();
        let plan = membership::plan(
            cfg.name(),
            &members,
            &connected,
            &attached,
            &fenced,
            cfg.raw.cluster.auto_fence,
            self.clock.now_ms(),
        )
        .map_err(|r| (r.node, r.reason))?;
        for node in &plan.auto_fence {
            let reason = "its attachment was not renewed for two leases (auto_fence)";
            tracing::warn!(fenced = %node, "{reason}");
            volume
                .fence(node, "auto", reason)
                .map_err(|e| io("the catalog (to fence)", &e))?;
        }
        Ok(plan.excluded)
    }

    /// This node learned it is fenced (or self-fenced): its live writes fail;
    /// every writer is told once, so applications stop instead of hitting EIO.
    fn fenced(&mut self, reason: String) {
        tracing::error!("this node is fenced off the volume: {reason}");
        for w in self.writers.values() {
            let _ = w.tx.send(WriterEvent::Fenced {
                reason: reason.clone(),
            });
        }
    }

    /// Executes every output the machine has, in order.
    fn drain(&mut self) {
        while let Some(out) = self.machine.poll_output() {
            self.execute(out);
        }
    }

    fn execute(&mut self, out: Output) {
        match out {
            Output::SendPeer { to, msg } => {
                if !self.peers.send(&to, PeerWire::Protocol { msg }) {
                    tracing::debug!(peer = %to, "message to a disconnected peer dropped");
                }
            }
            Output::WriterEvent {
                writer,
                snapshot,
                event,
            } => self.to_writer(writer, snapshot, event),
            Output::WriterRegistered { writer } => {
                if let Some(w) = self.writers.get_mut(&writer) {
                    w.told_registered = true;
                    let _ = w.tx.send(WriterEvent::Registered {
                        writer: w.name.clone(),
                    });
                }
            }
            Output::HoldIo { snapshot } => {
                self.hold.want(snapshot);
                let (tx, delay) = (self.tx.clone(), self.failpoints.hold_delay);
                self.engine.run(move |v| {
                    std::thread::sleep(delay);
                    let guard = v.hold();
                    let _ = tx.send(DriverEvent::Engine(EngineDone::Held { snapshot, guard }));
                });
            }
            Output::ReleaseIo { .. } => self.hold.release(),
            Output::FlushVolume { snapshot } => self.blocking(move |v| EngineDone::Flushed {
                snapshot,
                result: v.flush().map_err(|e| e.to_string()),
            }),
            Output::CreateSnapshot { snapshot } => {
                let opts = SnapshotOptions {
                    diff_limit: self.shared.cfg.diff_limit,
                };
                let delay = self.failpoints.create_delay;
                self.blocking(move |v| {
                    std::thread::sleep(delay);
                    EngineDone::Created {
                        snapshot,
                        result: v
                            .create_snapshot(snapshot, &opts)
                            .map(|_| ())
                            .map_err(|e| e.to_string()),
                    }
                })
            }
            Output::SealSnapshot { snapshot } => {
                let delay = self.failpoints.seal_delay;
                self.blocking(move |v| {
                    std::thread::sleep(delay);
                    EngineDone::Sealed {
                        snapshot,
                        result: v.seal_snapshot(snapshot).map_err(|e| e.to_string()),
                    }
                })
            }
            Output::DeleteSnapshot { snapshot } => self.engine.run(move |v| {
                if let Err(e) = v.delete_snapshot(snapshot) {
                    tracing::warn!(snapshot, "deleting the aborted snapshot: {e}");
                }
                let _ = manifest::remove(v.state_dir(), snapshot);
            }),
            Output::ResolveSnapshot { snapshot } => self.blocking(move |v| {
                let kept = match v.delete_unless_sealed(snapshot) {
                    Ok(Resolution::Sealed) => Ok(true),
                    Ok(r) => {
                        if r == Resolution::Deleted {
                            tracing::warn!(
                                snapshot,
                                "deleted a snapshot its initiator left unsealed"
                            );
                        }
                        let _ = manifest::remove(v.state_dir(), snapshot);
                        Ok(false)
                    }
                    Err(e) => Err(e.to_string()),
                };
                EngineDone::Resolved { snapshot, kept }
            }),
            Output::Phase(ev) => {
                if let Ok(v) = serde_json::to_value(&ev) {
                    let _ = self.shared.events.send(v);
                }
                self.peers.broadcast(&PeerWire::Event { event: ev });
                self.gossip_status();
            }
            Output::Report { req, report } => self.report(req, report),
        }
    }

    /// Queues an engine action whose result goes back to the machine.
    fn blocking(&self, f: impl FnOnce(&Volume) -> EngineDone + Send + 'static) {
        let tx = self.tx.clone();
        self.engine.run(move |v| {
            let done = f(v);
            let _ = tx.send(DriverEvent::Engine(done));
        });
    }

    fn engine_done(&mut self, done: EngineDone) {
        let input = match done {
            EngineDone::Held { snapshot, guard } => {
                if !self.hold.arrived(snapshot, guard) {
                    // The run that asked for it ended while the hold was
                    // being taken: let go at once, or live writes hang.
                    tracing::info!(snapshot, "a late I/O hold released at once");
                    return;
                }
                Input::HoldDone { snapshot }
            }
            EngineDone::Flushed { snapshot, result } => Input::FlushDone { snapshot, result },
            EngineDone::Created { snapshot, result } => Input::SnapshotCreated { snapshot, result },
            EngineDone::Sealed { snapshot, result } => Input::SnapshotSealed { snapshot, result },
            EngineDone::Resolved { snapshot, kept } => Input::SnapshotResolved { snapshot, kept },
        };
        self.feed(input);
    }

    fn to_writer(&self, writer: u64, snapshot: u64, event: MEvent) {
        let Some(w) = self.writers.get(&writer) else {
            return;
        };
        let line = match event {
            MEvent::Freeze { lease_ms } => WriterEvent::Freeze { snapshot, lease_ms },
            MEvent::Thaw => WriterEvent::Thaw { snapshot },
            MEvent::PostSnapshot => WriterEvent::PostSnapshot {
                snapshot,
                path: self
                    .shared
                    .cfg
                    .snapshot_image_path(snapshot)
                    .display()
                    .to_string(),
            },
            MEvent::Abort { reason } => WriterEvent::Abort { snapshot, reason },
            MEvent::Complete => WriterEvent::Complete { snapshot },
        };
        let _ = w.tx.send(line);
    }

    fn report(&mut self, req: u64, report: Report) {
        self.in_flight = None;
        if report.status == ReportStatus::Complete {
            let m = SnapshotManifest {
                id: report.id,
                created_ms: report.finished_ms,
                initiator: Some(report.initiator.clone()),
                status: ManifestStatus::Sealed,
                block_size: self.shared.volume.block_size(),
                size: self.shared.volume.size(),
                nodes: serde_json::to_value(&report.nodes).unwrap_or(Value::Null),
                freeze_window_ms: report.freeze_window_ms,
                io_hold_ms: report.io_hold_ms,
                blake3: None,
                excluded: report.excluded.clone(),
                checksum: None,
            };
            if let Some(created) = self
                .shared
                .volume
                .snapshots()
                .ok()
                .and_then(|all| all.into_iter().find(|s| s.id == report.id))
            {
                let mut m = m;
                m.created_ms = created.created_ms;
                if let Err(e) = manifest::store(self.shared.volume.state_dir(), &m) {
                    tracing::error!(snapshot = report.id, "writing the manifest failed: {e}");
                }
                let (volume, id) = (self.shared.volume.clone(), report.id);
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = freezeframe_core::seal_hash::record_seal_hash(&volume, id) {
                        tracing::error!(snapshot = id, "recording the seal-time hash failed: {e}");
                    }
                });
            }
        }
        let v = serde_json::to_value(&report).unwrap_or(Value::Null);
        match self.waiting.remove(&req) {
            Some(tx) => {
                let _ = tx.send(v);
            }
            None => tracing::warn!(req, "report for a request nobody waits for"),
        }
    }

    /// This node's summary as peers and the console see it.
    fn own_summary(&self) -> Value {
        let st = self.machine.status();
        json!({
            "node": st.node,
            "phase": st.phase,
            "snapshot": st.snapshot,
            "in_flight": st.in_flight,
            "writers": st.writers.iter().map(|w| json!({"name": w.name, "state": w.state, "on_error": w.on_error})).collect::<Vec<_>>(),
        })
    }

    /// This node's member list as announced to peers.
    fn members_wire(&self) -> PeerWire {
        let mut members: Vec<String> = self.members.iter().map(|m| m.name.clone()).collect();
        if !members.iter().any(|m| m == self.shared.cfg.name()) {
            members.push(self.shared.cfg.name().to_string());
        }
        members.sort();
        members.dedup();
        PeerWire::Members { members }
    }

    fn gossip_status(&self) {
        let st = self.own_summary();
        self.peers.broadcast(&PeerWire::Status { status: st });
    }

    fn status(&self) -> Value {
        let cfg = &self.shared.cfg;
        let st = self.machine.status();
        let own = self.own_summary();
        let mut nodes = vec![{
            let mut o = own.clone();
            o["connected"] = json!(true);
            o
        }];
        let mut peers = Vec::new();
        for m in self.members.iter().filter(|m| m.name != cfg.name()) {
            let connected = self.peers.senders.contains_key(&m.name);
            let differs = st
                .peers
                .iter()
                .find(|p| p.node == m.name)
                .and_then(|p| p.members_differ.clone());
            peers.push(json!({"node": m.name, "addr": m.addr.to_string(), "connected": connected, "members_differ": differs}));
            let mut s = self
                .peers
                .status
                .get(&m.name)
                .cloned()
                .unwrap_or_else(|| json!({"node": m.name, "phase": "idle", "writers": []}));
            s["connected"] = json!(connected);
            if !connected {
                s["phase"] = json!("unreachable");
            }
            nodes.push(s);
        }
        json!({
            "node": cfg.name(),
            "cluster": cfg.raw.cluster.name,
            "volume": cfg.raw.volume.path.display().to_string(),
            "mount": cfg.raw.node.mount.display().to_string(),
            "mounted": self.mounted,
            "phase": st.phase,
            "in_flight": if st.in_flight { json!(st.snapshot) } else { Value::Null },
            "io_held": st.io_held,
            "members_digest": st.members_digest,
            "peers": peers,
            "writers": own["writers"],
            "nodes": nodes,
            "attached": self.attached_view(),
        })
    }

    /// The attachment records and fences, for `status`.
    fn attached_view(&self) -> Value {
        let volume = &self.shared.volume;
        let now = self.clock.now_ms();
        let fences = volume.fences().unwrap_or_default();
        let rows: Vec<Value> = membership::list(volume.state_dir())
            .unwrap_or_default()
            .into_iter()
            .map(|a| {
                json!({
                    "node": a.node,
                    "host": a.host,
                    "since_ms": a.since_ms,
                    "lease_age_ms": a.age_ms(now),
                    "expired": a.expired(now),
                    "fenced": fences.get(&a.node),
                })
            })
            .collect();
        json!({ "nodes": rows, "fenced": fences })
    }

    /// Ends a snapshot in flight cleanly: the machine is told every peer and
    /// writer is gone, which aborts the run and tells local writers; the hooks
    /// task then finishes its undo scripts before the daemon exits.
    async fn shutdown(&mut self) {
        let peers: Vec<String> = self.peer_conn.keys().cloned().collect();
        for node in peers {
            self.feed(Input::PeerDown { node });
        }
        let ids: Vec<u64> = self
            .writers
            .keys()
            .copied()
            .filter(|&w| w != HOOKS_WRITER)
            .collect();
        for id in ids {
            self.feed(Input::WriterGone { writer: id });
        }
        self.hold.release();
        // Closing the hooks task's channel makes it undo what it holds and end.
        self.writers.clear();
        if let Some(task) = self.hooks_task.take() {
            let grace = Duration::from_millis(self.shared.cfg.hook_timeout_ms) * 2;
            if tokio::time::timeout(grace, task).await.is_err() {
                tracing::warn!("hooks.d did not finish undoing within {grace:?}");
            }
        }
        // Give the abort lines to application writers a moment to leave.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (_, tx) in self.waiting.drain() {
            let _ = tx.send(json!({"status":"failed","error":{"reason":"node is shutting down"}}));
        }
    }
}

/// Notices that the whole daemon did not run for a while: a task ticks every
/// 100 ms; a gap well over that means the process was stopped (SIGSTOP) or
/// starved. Either the ticker sees the gap first and records it, or the
/// driver sees a stale tick first; both end in one [`StallWatch::take`].
struct StallWatch {
    clock: Clock,
    last_tick_ms: Arc<std::sync::atomic::AtomicU64>,
    /// A gap the ticker saw: (when it saw it, how long).
    seen: Arc<std::sync::Mutex<Option<(u64, u64)>>>,
}

/// A gap this long between ticks is a stall, not scheduling noise.
const STALL_MS: u64 = 1_500;
const TICK: Duration = Duration::from_millis(100);

impl StallWatch {
    fn start(clock: Clock) -> StallWatch {
        use std::sync::atomic::Ordering;
        let w = StallWatch {
            clock,
            last_tick_ms: Arc::new(std::sync::atomic::AtomicU64::new(clock.now_ms())),
            seen: Arc::default(),
        };
        let (last, seen) = (w.last_tick_ms.clone(), w.seen.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TICK).await;
                let now = clock.now_ms();
                let gap = now.saturating_sub(last.swap(now, Ordering::SeqCst));
                if gap > STALL_MS {
                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, gap));
                }
            }
        });
        w
    }

    /// A stall that was not reported yet, in ms.
    fn take(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = self.clock.now_ms();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, ms)) = seen.take() {
            // Stale news (long reported by events since) is not a new stall.
            if now.saturating_sub(at) < 5_000 {
                return Some(ms);
            }
        }
        let gap = now.saturating_sub(self.last_tick_ms.load(Ordering::SeqCst));
        if gap > STALL_MS {
            // Seen by us first: mark it so the ticker does not report it again.
            self.last_tick_ms.store(now, Ordering::SeqCst);
            return Some(gap);
        }
        None
    }
}

/// Registers this node as attached to the volume (DESIGN.md §9).
fn attach(cfg: &NodeConfig, volume: &Volume, now_ms: u64) -> Result<Attachment> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let a = Attachment {
        node: cfg.name().to_string(),
        host,
        pid: std::process::id(),
        since_ms: now_ms,
        renewed_ms: now_ms,
        lease_ms: cfg.lease_ms,
    };
    membership::store(volume.state_dir(), &a).with_context(|| {
        format!(
            "node {}: recording its attachment to the volume",
            cfg.name()
        )
    })?;
    if let Some(f) = volume.fences()?.get(cfg.name()) {
        tracing::error!(
            "node {} is fenced off the volume (by {}: {}); its live writes fail until `freezeframe node unfence {}`",
            cfg.name(),
            f.by,
            f.reason,
            cfg.name()
        );
    }
    Ok(a)
}

/// Renews the attachment every third of the lease. A node that cannot renew
/// for a whole lease stops writing by itself (self-fencing), so that after
/// two leases the others may treat it as fenced; it writes again once it
/// renews. Also tells the driver when this node finds itself fenced.
async fn renew_attachment(
    shared: Arc<Shared>,
    mut a: Attachment,
    clock: Clock,
    tx: super::DriverTx,
) {
    let every = Duration::from_millis((a.lease_ms / 3).max(100));
    let mut last_ok = clock.now_ms();
    let mut told_fenced = false;
    loop {
        tokio::time::sleep(every).await;
        let now = clock.now_ms();
        a.renewed_ms = now;
        let s = shared.clone();
        let rec = a.clone();
        let result = tokio::task::spawn_blocking(move || {
            membership::store(s.volume.state_dir(), &rec)?;
            s.volume.fences()
        })
        .await;
        match result {
            Ok(Ok(fences)) => {
                last_ok = now;
                shared.volume.set_self_fenced(false);
                match fences.get(&a.node) {
                    Some(f) if !told_fenced => {
                        told_fenced = true;
                        let reason = format!("fenced by {}: {}", f.by, f.reason);
                        let _ = tx.send(DriverEvent::Fenced { reason });
                    }
                    Some(_) => {}
                    None => told_fenced = false,
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("renewing this node's attachment: {e}");
                if now.saturating_sub(last_ok) > a.lease_ms && !told_fenced {
                    told_fenced = true;
                    shared.volume.set_self_fenced(true);
                    let reason = format!(
                        "self-fenced: could not renew the attachment for {} ms ({e})",
                        now.saturating_sub(last_ok)
                    );
                    let _ = tx.send(DriverEvent::Fenced { reason });
                }
            }
            Err(e) => tracing::error!("attachment renewal task failed: {e}"),
        }
    }
}

/// `snapshot verify`: hashes a snapshot's image and compares it with the hash recorded
/// at seal time (records one only when none exists); a mismatch is an error naming
/// the first differing block.
pub fn verify_snapshot(
    volume: &Volume,
    id: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Value> {
    let r = freezeframe_core::seal_hash::verify_snapshot(volume, id, progress)?;
    Ok(serde_json::to_value(r)?)
}

/// Deletes Open snapshots; call only while holding the in-flight lock.
fn delete_orphans(volume: &Volume) {
    let Ok(all) = volume.snapshots() else { return };
    for s in all
        .into_iter()
        .filter(|s| s.state == freezeframe_core::volume::SnapshotState::Open)
    {
        tracing::warn!(
            snapshot = s.id,
            "deleting snapshot left open by an initiator that died after commit"
        );
        if let Err(e) = volume.delete_snapshot(s.id) {
            tracing::error!(
                snapshot = s.id,
                "could not delete the orphaned snapshot: {e}"
            );
        }
        let _ = manifest::remove(volume.state_dir(), s.id);
    }
}

impl Shared {
    /// `node fence`: record the fence in the shared catalog.
    pub fn fence(&self, node: &str, reason: Option<String>) -> Result<Value> {
        let me = self.cfg.name();
        if node == me {
            anyhow::bail!(
                "node {me} cannot fence itself; run `freezeframe node fence {node}` against another node"
            );
        }
        let member = self.cfg.raw.cluster.members.iter().any(|m| m.name == node);
        let attached = membership::list(self.volume.state_dir())?
            .iter()
            .any(|a| a.node == node);
        if !member && !attached {
            anyhow::bail!("no node {node} is a member of the cluster or attached to the volume");
        }
        let reason = reason.unwrap_or_else(|| format!("fenced by an operator on node {me}"));
        let f = self.volume.fence(node, me, &reason)?;
        tracing::warn!(fenced = %node, by = %f.by, "{}", f.reason);
        Ok(json!({"fenced": node, "at_ms": f.at_ms, "by": f.by, "reason": f.reason}))
    }

    /// `node unfence`: lift it; the node writes again and joins the next snapshot.
    pub fn unfence(&self, node: &str) -> Result<Value> {
        let was = self.volume.unfence(node)?;
        Ok(json!({"unfenced": node, "was_fenced": was}))
    }

    /// The snapshot rows of docs/protocol.md, oldest first.
    pub fn snapshot_list(&self) -> Result<Value> {
        let infos = self.volume.snapshots()?;
        let state_dir = self.volume.state_dir().to_path_buf();
        let mut rows = Vec::new();
        let mut prev: Option<u64> = None;
        for s in &infos {
            let m = manifest::load(&state_dir, s.id).ok().flatten();
            let (status, reason) = match &s.state {
                freezeframe_core::volume::SnapshotState::Sealed => ("complete", None),
                freezeframe_core::volume::SnapshotState::Open => ("open", None),
                freezeframe_core::volume::SnapshotState::Invalid { reason } => {
                    ("invalid", Some(reason.clone()))
                }
            };
            let changed = match prev {
                Some(p) => self
                    .volume
                    .changed_blocks(p, Some(s.id))
                    .ok()
                    .map(|v| v.len()),
                None => None,
            };
            rows.push(json!({
                "id": s.id,
                "created_ms": s.created_ms,
                "initiator": m.as_ref().and_then(|m| m.initiator.clone()),
                "status": status,
                "reason": reason,
                "diff_bytes": s.diff_bytes,
                "diff_blocks": s.diff_blocks,
                "changed_blocks": changed,
                "freeze_window_ms": m.as_ref().and_then(|m| m.freeze_window_ms),
                "path": self.cfg.raw.node.mount.join("snapshots").join(s.id.to_string()).display().to_string(),
                "blake3": m.as_ref().and_then(|m| m.blake3.clone()),
            }));
            prev = Some(s.id);
        }
        Ok(Value::Array(rows))
    }

    pub fn snapshot_show(&self, id: u64) -> Result<Value> {
        let info = self
            .volume
            .snapshots()?
            .into_iter()
            .find(|s| s.id == id)
            .with_context(|| {
                format!(
                    "no snapshot {id} in the catalog of {}",
                    self.volume.path().display()
                )
            })?;
        let m = manifest::load(self.volume.state_dir(), id)?;
        let mut v = match m {
            Some(m) => serde_json::to_value(m)?,
            None => json!({"id": id, "created_ms": info.created_ms}),
        };
        v["diff_bytes"] = json!(info.diff_bytes);
        v["diff_blocks"] = json!(info.diff_blocks);
        v["state"] = serde_json::to_value(&info.state)?;
        v["path"] = json!(self
            .cfg
            .raw
            .node
            .mount
            .join("snapshots")
            .join(id.to_string())
            .display()
            .to_string());
        Ok(v)
    }

    pub fn snapshot_verify(&self, id: u64) -> Result<Value> {
        verify_snapshot(&self.volume, id, &mut |_, _| {})
    }
}
