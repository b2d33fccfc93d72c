//! All of the console's I/O, on a thread of its own with a tokio runtime: the
//! control-socket connection (reconnecting about every second), the event
//! subscription, the periodic status and snapshot-list refresh, the requests
//! the operator makes, and the long operations run as child processes.
//!
//! The UI thread only ever does two non-blocking things with it: send a
//! [`Request`] and drain [`Update`]s ([`BackendHandle::try_recv`]). Every
//! update wakes the UI with `ctx.request_repaint()`.
//!
//! [`BackendHandle::fake`] gives the same handle with the other end in the
//! caller's hands ([`FakeBackend`]): the kittest tests and the demo mode drive
//! the console through it without a network.

use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::jobs;
use crate::model::{JobKind, Link, Update};
use crate::wire::{self, PhaseEvent, Report, SnapshotRow, Status};
use crate::{Error, Result};
use freezeframe_netproto::control::{ControlClient, ControlRequest};

/// How often the backend retries an unreachable node and refreshes status.
pub const TICK: Duration = Duration::from_secs(1);

/// What the UI asks of the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    TakeSnapshot,
    Delete(u64),
    Verify(u64),
    Backup {
        id: u64,
        repo: PathBuf,
    },
    /// Kill the running long operation.
    CancelJob,
    /// Open a mounted snapshot in the system file manager.
    OpenPath(String),
}

/// Where the backend finds its node and the `freezeframe` program.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub control_socket: PathBuf,
    /// The node's name, for messages ("node n1 unreachable: …").
    pub node: String,
    /// Run for verify and backup (`freezeframe snapshot verify ID --json --progress`).
    pub freezeframe_exe: PathBuf,
    /// How long the node may take for one snapshot before it aborts it.
    pub snapshot_timeout_ms: u64,
}

/// The sending half of the update channel; wakes the UI on every update.
#[derive(Clone)]
pub struct UpdateSink {
    tx: std_mpsc::Sender<Update>,
    repaint: Arc<Mutex<Option<egui::Context>>>,
}

impl UpdateSink {
    /// Sends one update; `false` once the UI has gone (the backend then stops).
    pub fn send(&self, u: Update) -> bool {
        let ok = self.tx.send(u).is_ok();
        if let Ok(ctx) = self.repaint.lock() {
            if let Some(ctx) = ctx.as_ref() {
                ctx.request_repaint();
            }
        }
        ok
    }
}

impl std::fmt::Debug for UpdateSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UpdateSink")
    }
}

/// The UI's end of the backend.
#[derive(Debug)]
pub struct BackendHandle {
    requests: mpsc::UnboundedSender<Request>,
    updates: std_mpsc::Receiver<Update>,
    repaint: Arc<Mutex<Option<egui::Context>>>,
    /// Keeps the runtime thread's lifetime tied to the handle (dropping the
    /// request sender ends it).
    _thread: Option<Arc<std::thread::JoinHandle<()>>>,
}

/// The other end of a fake backend: push updates, read the requests the UI made.
#[derive(Debug)]
pub struct FakeBackend {
    pub sink: UpdateSink,
    pub requests: mpsc::UnboundedReceiver<Request>,
}

impl FakeBackend {
    pub fn push(&self, u: Update) {
        self.sink.send(u);
    }

    /// Every request the UI made since the last call.
    pub fn take_requests(&mut self) -> Vec<Request> {
        std::iter::from_fn(|| self.requests.try_recv().ok()).collect()
    }
}

impl BackendHandle {
    /// Starts the real backend on its own thread.
    pub fn spawn(cfg: BackendConfig) -> Result<BackendHandle> {
        let (handle, fake) = BackendHandle::fake();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("console-backend")
            .build()
            .map_err(Error::Runtime)?;
        let thread = std::thread::Builder::new()
            .name("console-backend".into())
            .spawn(move || rt.block_on(run(cfg, fake)))
            .map_err(Error::Runtime)?;
        Ok(BackendHandle {
            _thread: Some(Arc::new(thread)),
            ..handle
        })
    }

    /// A handle whose other end the caller drives (tests, demo mode).
    pub fn fake() -> (BackendHandle, FakeBackend) {
        let (req_tx, req_rx) = mpsc::unbounded_channel();
        let (up_tx, up_rx) = std_mpsc::channel();
        let repaint = Arc::new(Mutex::new(None));
        let sink = UpdateSink {
            tx: up_tx,
            repaint: repaint.clone(),
        };
        (
            BackendHandle {
                requests: req_tx,
                updates: up_rx,
                repaint,
                _thread: None,
            },
            FakeBackend {
                sink,
                requests: req_rx,
            },
        )
    }

    /// Remembers the UI's context so updates can wake it.
    pub fn set_context(&self, ctx: &egui::Context) {
        if let Ok(mut slot) = self.repaint.lock() {
            if slot.is_none() {
                *slot = Some(ctx.clone());
            }
        }
    }

    /// Never blocks; a backend that has stopped is reported as unreachable by its last update.
    pub fn send(&self, r: Request) {
        if self.requests.send(r).is_err() {
            tracing::warn!("console backend has stopped; request dropped");
        }
    }

    pub fn try_recv(&self) -> Option<Update> {
        self.updates.try_recv().ok()
    }
}

/// The backend's main task: the connection loop plus one task per request.
async fn run(cfg: BackendConfig, mut fake: FakeBackend) {
    let refresh = Arc::new(Notify::new());
    let sink = fake.sink.clone();
    tokio::spawn(connection_loop(cfg.clone(), sink.clone(), refresh.clone()));
    let mut job: Option<jobs::Running> = None;
    while let Some(req) = fake.requests.recv().await {
        match req {
            Request::TakeSnapshot => {
                let (cfg, sink, refresh) = (cfg.clone(), sink.clone(), refresh.clone());
                tokio::spawn(async move {
                    let timeout_ms = cfg.snapshot_timeout_ms;
                    let r = one_call(
                        &cfg,
                        ControlRequest::SnapshotCreate {
                            timeout_ms: Some(timeout_ms),
                        },
                    )
                    .await;
                    sink.send(
                        match r.and_then(|v| wire::decode::<Report>("snapshot_create", v)) {
                            Ok(report) => Update::Report(report),
                            Err(e) => Update::SnapshotFailed(e.to_string()),
                        },
                    );
                    refresh.notify_one();
                });
            }
            Request::Delete(id) => {
                let (cfg, sink, refresh) = (cfg.clone(), sink.clone(), refresh.clone());
                tokio::spawn(async move {
                    sink.send(
                        match one_call(&cfg, ControlRequest::SnapshotDelete { id }).await {
                            Ok(_) => Update::Deleted(id),
                            Err(e) => {
                                Update::ActionFailed(format!("Could not delete snapshot {id}: {e}"))
                            }
                        },
                    );
                    refresh.notify_one();
                });
            }
            Request::Verify(id) => job = start_job(&cfg, &sink, job, JobKind::Verify, id, None),
            Request::Backup { id, repo } => {
                job = start_job(&cfg, &sink, job, JobKind::Backup, id, Some(repo))
            }
            Request::CancelJob => {
                if let Some(j) = job.take() {
                    j.cancel();
                }
            }
            Request::OpenPath(path) => {
                let sink = sink.clone();
                tokio::spawn(async move {
                    if !open_with_file_manager(&path).await {
                        sink.send(Update::ShowPath(path));
                    }
                });
            }
        }
    }
    // The UI is gone: stop the child, if any; the runtime drops the rest.
    if let Some(j) = job.take() {
        j.cancel();
    }
}

fn start_job(
    cfg: &BackendConfig,
    sink: &UpdateSink,
    running: Option<jobs::Running>,
    kind: JobKind,
    id: u64,
    repo: Option<PathBuf>,
) -> Option<jobs::Running> {
    if let Some(r) = running.filter(|r| !r.finished()) {
        sink.send(Update::ActionFailed(format!(
            "Cannot {} snapshot {id}: another operation is still running",
            kind.verb()
        )));
        return Some(r);
    }
    Some(jobs::spawn(
        &cfg.freezeframe_exe,
        kind,
        id,
        repo,
        sink.clone(),
    ))
}

/// How long status, list and delete may take before the console says the node hangs.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// What a snapshot request may take beyond its own timeout.
const CREATE_MARGIN: Duration = Duration::from_secs(5);

/// `fut` (one control call), failing with [`Error::Timeout`] after `limit`.
async fn within<T>(
    what: &'static str,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(Error::Timeout {
            what,
            ms: limit.as_millis() as u64,
        }))
}

/// One request on a fresh connection (snapshot and delete run beside the refresh loop),
/// bounded: a snapshot by its own timeout + a margin, anything else by [`CALL_TIMEOUT`].
async fn one_call(cfg: &BackendConfig, req: ControlRequest) -> Result<serde_json::Value> {
    let (what, limit) = match &req {
        ControlRequest::SnapshotCreate { timeout_ms } => (
            "snapshot_create",
            Duration::from_millis(timeout_ms.unwrap_or(cfg.snapshot_timeout_ms)) + CREATE_MARGIN,
        ),
        ControlRequest::SnapshotDelete { .. } => ("snapshot_delete", CALL_TIMEOUT * 6),
        _ => ("a request", CALL_TIMEOUT),
    };
    within(what, limit, async {
        Ok(ControlClient::connect(&cfg.control_socket)
            .await?
            .call(&req)
            .await?)
    })
    .await
}

/// `xdg-open PATH`; `false` when there is no `xdg-open` or it failed.
async fn open_with_file_manager(path: &str) -> bool {
    match tokio::process::Command::new("xdg-open")
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
    {
        Ok(s) => s.success(),
        Err(_) => false,
    }
}

/// Connect, subscribe, refresh every [`TICK`] and after each event; on any
/// failure say why and try again a [`TICK`] later.
async fn connection_loop(cfg: BackendConfig, sink: UpdateSink, refresh: Arc<Notify>) {
    loop {
        let reason = match connected_session(&cfg, &sink, &refresh).await {
            Ok(()) => return, // the UI has gone
            Err(e) => e.to_string(),
        };
        if !sink.send(Update::Link(Link::Unreachable { reason })) {
            return;
        }
        tokio::time::sleep(TICK).await;
    }
}

/// One connected session; returns the error that ended it, or `Ok` when the UI has gone.
async fn connected_session(
    cfg: &BackendConfig,
    sink: &UpdateSink,
    refresh: &Arc<Notify>,
) -> Result<()> {
    let (mut calls, mut events) = within("connect", CALL_TIMEOUT, async {
        let calls = ControlClient::connect(&cfg.control_socket).await?;
        let mut events = ControlClient::connect(&cfg.control_socket).await?;
        events.subscribe().await?;
        Ok((calls, events))
    })
    .await?;
    if !sink.send(Update::Link(Link::Connected)) {
        return Ok(());
    }
    let (ended_tx, mut ended_rx) = tokio::sync::oneshot::channel::<Error>();
    let event_task = {
        let (sink, refresh) = (sink.clone(), refresh.clone());
        let path = cfg.control_socket.clone();
        tokio::spawn(async move {
            let err = loop {
                match events.next_event().await {
                    Ok(Some(v)) => match wire::decode::<PhaseEvent>("events", v) {
                        Ok(ev) => {
                            sink.send(Update::Event(ev));
                            refresh.notify_one();
                        }
                        // One bad event should not cost the whole stream.
                        Err(e) => tracing::warn!("skipping an event: {e}"),
                    },
                    Ok(None) => {
                        break Error::Control(freezeframe_netproto::Error::NodeClosed { path })
                    }
                    Err(e) => break Error::Control(e),
                }
            };
            let _ = ended_tx.send(err);
        })
    };
    let result: Result<()> = async {
        loop {
            // An answer the console cannot read is not a lost node: say so and keep following.
            let status = within("status", CALL_TIMEOUT, async {
                Ok(calls.call(&ControlRequest::Status).await?)
            })
            .await?;
            let status = wire::decode::<Status>("status", status);
            let rows = within("snapshot_list", CALL_TIMEOUT, async {
                Ok(calls.call(&ControlRequest::SnapshotList).await?)
            })
            .await?;
            let rows = wire::decode::<Vec<SnapshotRow>>("snapshot_list", rows);
            for u in [status.map(Update::Status), rows.map(Update::Snapshots)] {
                let u = u.unwrap_or_else(|e| Update::ActionFailed(e.to_string()));
                if !sink.send(u) {
                    return Ok(());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = refresh.notified() => {
                    // Events come in bursts; one refresh per burst is enough.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                err = &mut ended_rx => {
                    let closed = freezeframe_netproto::Error::NodeClosed { path: cfg.control_socket.clone() };
                    return Err(err.unwrap_or(Error::Control(closed)));
                }
            }
        }
    }
    .await;
    event_task.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// A node's control socket in miniature: answers status, snapshot_list and
    /// snapshot_create, and streams two events to each subscriber.
    async fn fake_node(listener: tokio::net::UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let req: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    let answers: Vec<serde_json::Value> = match req["op"].as_str() {
                        Some("status") => vec![json!({"node":"n1","cluster":"t","phase":"idle",
                            "nodes":[{"node":"n1","connected":true,"phase":"idle","writers":[]},
                                     {"node":"n2","connected":false,"phase":"idle","writers":[]}]})],
                        Some("snapshot_list") => vec![
                            json!([{"id":1,"created_ms":5,"initiator":"n1","status":"complete",
                            "diff_bytes":0,"changed_blocks":0,"freeze_window_ms":9,"path":"/m/1"}]),
                        ],
                        Some("snapshot_create") => {
                            vec![json!({"id":2,"status":"complete","initiator":"n1",
                            "requested_ms":1,"finished_ms":3,"freeze_window_ms":2,"nodes":[]})]
                        }
                        Some("events") => vec![
                            json!({"snapshot":2,"node":"n1","phase":"freezing","edge":"enter","at_ms":1}),
                            json!({"snapshot":2,"node":"n1","phase":"freezing","edge":"exit","at_ms":2}),
                        ],
                        _ => vec![],
                    };
                    for a in answers {
                        let line = format!("{}\n", json!({"ok": true, "result": a}));
                        if w.write_all(line.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }

    /// Collects updates until `done` holds for everything seen so far.
    fn wait_for(
        handle: &BackendHandle,
        what: &str,
        done: impl Fn(&[Update]) -> bool,
    ) -> Vec<Update> {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            match handle.try_recv() {
                Some(u) => {
                    seen.push(u);
                    if done(&seen) {
                        return seen;
                    }
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        panic!("no {what} within 10 s; saw {seen:?}");
    }

    #[test]
    fn the_backend_follows_a_node_takes_a_snapshot_and_reconnects_after_the_node_restarts() {
        let dir = std::env::temp_dir().join(format!("ff-gui-backend-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("control.sock");
        // The node runs on its own runtime so that shutting it down closes every connection.
        let serve = || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let listener = rt
                .block_on(async { tokio::net::UnixListener::bind(&sock) })
                .unwrap();
            rt.spawn(fake_node(listener));
            rt
        };
        let node = serve();
        let cfg = BackendConfig {
            control_socket: sock.clone(),
            node: "n1".into(),
            freezeframe_exe: PathBuf::from("/bin/false"),
            snapshot_timeout_ms: 1000,
        };
        let handle = BackendHandle::spawn(cfg).unwrap();
        wait_for(&handle, "connection, status, list and events", |seen| {
            seen.contains(&Update::Link(Link::Connected))
                && seen
                    .iter()
                    .any(|u| matches!(u, Update::Status(s) if s.nodes.len() == 2))
                && seen.iter().any(
                    |u| matches!(u, Update::Snapshots(r) if r[0].path.as_deref() == Some("/m/1")),
                )
                && seen
                    .iter()
                    .any(|u| matches!(u, Update::Event(e) if e.edge == wire::Edge::Exit))
        });

        handle.send(Request::TakeSnapshot);
        wait_for(&handle, "report", |seen| {
            seen.iter().any(
                |u| matches!(u, Update::Report(r) if r.id == 2 && r.freeze_window_ms == Some(2)),
            )
        });

        // The node goes away: the console says so, keeps trying, and comes back by itself.
        node.shutdown_background();
        std::fs::remove_file(&sock).unwrap();
        let seen = wait_for(&handle, "unreachable", |seen| {
            seen.iter()
                .any(|u| matches!(u, Update::Link(Link::Unreachable { .. })))
        });
        assert!(seen.iter().any(
            |u| matches!(u, Update::Link(Link::Unreachable { reason }) if !reason.is_empty())
        ));
        let node = serve();
        wait_for(&handle, "reconnect", |seen| {
            seen.contains(&Update::Link(Link::Connected))
        });
        node.shutdown_background();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_node_that_accepts_but_never_answers_is_reported_unreachable_after_the_call_timeout() {
        let dir = std::env::temp_dir().join(format!("ff-gui-hung-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("control.sock");
        // A hung daemon: connections are accepted and held, nothing is ever said.
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let _holder = std::thread::spawn(move || {
            let held: Vec<_> = listener.incoming().take(8).collect();
            std::thread::sleep(Duration::from_secs(30));
            drop(held);
        });
        let cfg = BackendConfig {
            control_socket: sock,
            node: "n1".into(),
            freezeframe_exe: PathBuf::from("/bin/false"),
            snapshot_timeout_ms: 1000,
        };
        let handle = BackendHandle::spawn(cfg).unwrap();
        let seen = wait_for(&handle, "unreachable after the timeout", |seen| {
            seen.iter()
                .any(|u| matches!(u, Update::Link(Link::Unreachable { .. })))
        });
        assert!(
            seen.iter()
                .any(|u| matches!(u, Update::Link(Link::Unreachable { reason })
                if reason.contains("did not answer status within 5000 ms"))),
            "{seen:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_absent_node_is_reported_unreachable_with_the_reason_and_retried() {
        let cfg = BackendConfig {
            control_socket: PathBuf::from("/nonexistent/ff-gui/control.sock"),
            node: "n1".into(),
            freezeframe_exe: PathBuf::from("/bin/false"),
            snapshot_timeout_ms: 1000,
        };
        let handle = BackendHandle::spawn(cfg).unwrap();
        let mut unreachable = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while unreachable < 2 && std::time::Instant::now() < deadline {
            match handle.try_recv() {
                Some(Update::Link(Link::Unreachable { reason })) => {
                    assert!(
                        reason.contains("/nonexistent/ff-gui/control.sock"),
                        "{reason}"
                    );
                    unreachable += 1;
                }
                Some(other) => panic!("unexpected update {other:?}"),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        assert_eq!(
            unreachable, 2,
            "the backend should retry after the first failure"
        );
    }
}
