//! `freezeframe node run`: the daemon of one node.
//!
//! ```text
//!   control.sock ─┐                         ┌─ QUIC peers (mTLS, cluster CA)
//!   writer.sock ──┼─► driver (NodeMachine) ◄┤
//!   hooks.d ──────┘         │               └─ FUSE mount (live/, snapshots/)
//!                           ▼
//!                  volume engine (shared volume + state dir)
//! ```
//!
//! Everything that talks to the world is a task that turns what it hears into
//! a [`DriverEvent`] on one channel. The driver task owns the protocol
//! machine, feeds it those events with the time, and executes what it asks
//! for in order (send to a peer, send to a writer, hold/release I/O, create,
//! seal or delete the snapshot). It decides nothing itself.
//!
//! Startup ([`startup`]): the whole config is checked and a running daemon of the
//! same node is refused before anything is written or mounted.
//!
//! Shutdown: SIGTERM or SIGINT aborts a snapshot in flight (writers get
//! abort/thaw), closes the peers, unmounts (detaching lazily after a grace period
//! if the session does not end), removes the sockets.

mod control;
mod driver;
mod engine;
pub mod failpoints;
pub use driver::verify_snapshot;
pub mod hook_trust;
pub mod hooks;
mod peers;
pub mod startup;
mod writers;

use std::path::Path;

use anyhow::{Context, Result};
use freezeframe_core::volume::Volume;
use freezeframe_netproto::writer::{OnError, WriterEvent, WriterRequest};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::config::NodeConfig;

/// Everything the driver hears, from every task.
#[derive(Debug)]
pub enum DriverEvent {
    Status {
        reply: oneshot::Sender<Value>,
    },
    Create {
        timeout_ms: Option<u64>,
        reply: oneshot::Sender<Value>,
    },
    Delete {
        id: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    WriterRegistered {
        id: u64,
        name: String,
        on_error: OnError,
        freeze_timeout_ms: Option<u64>,
        tx: mpsc::UnboundedSender<WriterEvent>,
    },
    WriterReply {
        id: u64,
        req: WriterRequest,
    },
    WriterGone {
        id: u64,
    },
    /// A peer connection `conn` is up; `tx` sends to it.
    PeerUp {
        node: String,
        conn: usize,
        tx: mpsc::UnboundedSender<peers::PeerWire>,
    },
    PeerMsg {
        node: String,
        msg: freezeframe_core::protocol::PeerMessage,
    },
    /// A peer forwarded one of its own phase events.
    PeerEvent {
        node: String,
        event: freezeframe_core::protocol::PhaseEvent,
    },
    /// A peer announced its member list.
    PeerMembers {
        node: String,
        members: Vec<String>,
    },
    /// A peer's status summary changed.
    PeerStatus {
        node: String,
        status: Value,
    },
    /// Connection `conn` to the peer closed (ignored if a newer one is up).
    PeerDown {
        node: String,
        conn: usize,
    },
    /// The result of an engine action the driver ran off the async threads.
    Engine(driver::EngineDone),
    /// `node reload` or SIGHUP: re-read the member list.
    Reload {
        reply: Option<oneshot::Sender<Result<Value>>>,
    },
    /// This node found itself fenced (or self-fenced); tell the writers.
    Fenced {
        reason: String,
    },
    Shutdown,
}

pub type DriverTx = mpsc::UnboundedSender<DriverEvent>;

/// State every task may read.
pub struct Shared {
    pub cfg: NodeConfig,
    pub volume: Volume,
    pub events: broadcast::Sender<Value>,
}

/// Binds a Unix socket readable only by the daemon's user (mode 0600),
/// replacing a stale socket file left by a killed daemon.
pub fn bind_private_socket(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use: another daemon runs for this node",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(cfg: NodeConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("ff-node")
        .build()?;
    let result = rt.block_on(driver::run_node(cfg));
    // Blocking work still running (a seal-time hash of a big volume) must not keep a
    // stopped daemon alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}
