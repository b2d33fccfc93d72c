//! The QUIC peer mesh: one mutually authenticated connection per pair of
//! nodes, carrying protocol messages, phase events and status summaries.
//!
//! Of each pair the node with the smaller name dials (and redials every
//! 300 ms while the peer is away); the other accepts. Once a connection and
//! its one bidirectional stream are up the driver hears `PeerUp` with a
//! sender for that peer; when the connection closes or the idle timeout
//! (2 s) declares it lost, `PeerDown`. A peer that breaks the framing is
//! disconnected; the node keeps serving the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use freezeframe_core::protocol::{PeerMessage, PhaseEvent};
use freezeframe_netproto::{CaCertificate, MemberList, NodeIdentity, PeerConnection, PeerEndpoint};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{DriverEvent, DriverTx};
use crate::config::NodeConfig;

/// What travels on a peer stream (see docs/protocol.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PeerWire {
    Protocol {
        msg: PeerMessage,
    },
    Event {
        event: PhaseEvent,
    },
    Status {
        status: Value,
    },
    /// The sender's member list, sorted: sent on connecting and after each
    /// `node reload`, so a configuration difference is named at once.
    Members {
        members: Vec<String>,
    },
}

/// Keeps the endpoint alive; dropping it closes every peer connection.
pub struct Mesh {
    endpoint: Arc<PeerEndpoint>,
    driver: DriverTx,
    /// The members this node dials, with their addresses.
    dialing: HashMap<String, std::net::SocketAddr>,
}

impl Mesh {
    /// A new member list (`node reload`): the TLS verifiers admit exactly the
    /// new names from the next handshake on; new peers this node dials get a
    /// dial loop; a removed peer's loop ends at its next attempt.
    pub fn set_members(&mut self, members: &[crate::config::Member], me: &str) {
        self.endpoint
            .members()
            .set(members.iter().map(|m| m.name.clone()));
        self.dialing
            .retain(|name, _| members.iter().any(|m| &m.name == name));
        for m in members.iter().filter(|m| m.name != me) {
            if self.endpoint.dials(&m.name) && !self.dialing.contains_key(&m.name) {
                self.dialing.insert(m.name.clone(), m.addr);
                tokio::spawn(dial_loop(
                    self.endpoint.clone(),
                    m.name.clone(),
                    m.addr,
                    self.driver.clone(),
                ));
            }
        }
    }
}

pub fn start(cfg: &NodeConfig, driver: DriverTx) -> Result<Mesh> {
    let ca = CaCertificate::load(&cfg.raw.cluster.ca_cert)?;
    let id = NodeIdentity::load(&cfg.raw.tls.cert, &cfg.raw.tls.key)?;
    let members = MemberList::new(cfg.raw.cluster.members.iter().map(|m| m.name.clone()));
    let endpoint = Arc::new(
        PeerEndpoint::bind(cfg.raw.node.listen, &id, &ca, members).with_context(|| {
            format!("binding the QUIC peer endpoint on {}", cfg.raw.node.listen)
        })?,
    );
    let mut dialing = HashMap::new();
    for m in cfg.peers() {
        if endpoint.dials(&m.name) {
            dialing.insert(m.name.clone(), m.addr);
            tokio::spawn(dial_loop(
                endpoint.clone(),
                m.name.clone(),
                m.addr,
                driver.clone(),
            ));
        }
    }
    tokio::spawn(accept_loop(endpoint.clone(), driver.clone()));
    Ok(Mesh {
        endpoint,
        driver,
        dialing,
    })
}

async fn dial_loop(
    ep: Arc<PeerEndpoint>,
    name: String,
    addr: std::net::SocketAddr,
    driver: DriverTx,
) {
    let mut logged = false;
    loop {
        match ep.connect(addr, &name).await {
            Ok(conn) => {
                logged = false;
                match conn.open_bi().await {
                    Ok((send, recv)) => serve(conn, send, recv, driver.clone()).await,
                    Err(e) => tracing::warn!(peer = %name, "opening the peer stream failed: {e}"),
                }
            }
            Err(e) => {
                if !logged {
                    // A refused handshake (foreign CA, wrong name) and a peer that is
                    // simply down look alike from here; the error says which.
                    tracing::warn!(peer = %name, %addr, "connection to peer refused or failed: {e}");
                    logged = true;
                }
            }
        }
        if driver.is_closed() || !ep.members().contains(&name) {
            return; // shutting down, or no longer a member (node reload)
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn accept_loop(ep: Arc<PeerEndpoint>, driver: DriverTx) {
    loop {
        match ep.accept().await {
            Ok(conn) => {
                let driver = driver.clone();
                tokio::spawn(async move {
                    match conn.accept_bi().await {
                        Ok((send, recv)) => serve(conn, send, recv, driver).await,
                        Err(e) => {
                            tracing::warn!(peer = %conn.peer_name(), "peer opened no stream: {e}")
                        }
                    }
                });
            }
            Err(e) => {
                tracing::debug!("peer endpoint stopped accepting: {e}");
                return;
            }
        }
    }
}

type Send = freezeframe_netproto::FramedSend<freezeframe_netproto::quinn::SendStream>;
type Recv = freezeframe_netproto::FramedRecv<freezeframe_netproto::quinn::RecvStream>;

/// Runs one established peer connection until it closes.
async fn serve(conn: PeerConnection, mut send: Send, mut recv: Recv, driver: DriverTx) {
    let node = conn.peer_name().to_string();
    let conn_id = conn.stable_id();
    let (tx, mut rx) = mpsc::unbounded_channel::<PeerWire>();
    // The dialer's stream only exists for the acceptor once something is sent on it.
    if send
        .send(&PeerWire::Status {
            status: Value::Null,
        })
        .await
        .is_err()
    {
        return;
    }
    let _ = driver.send(DriverEvent::PeerUp {
        node: node.clone(),
        conn: conn_id,
        tx,
    });
    tracing::info!(peer = %node, addr = %conn.remote_address(), "peer connected");
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if let Err(e) = send.send(&m).await {
                tracing::debug!("peer send failed: {e}");
                break;
            }
        }
    });
    loop {
        match recv.recv_opt::<PeerWire>().await {
            Ok(Some(PeerWire::Protocol { msg })) => {
                let _ = driver.send(DriverEvent::PeerMsg {
                    node: node.clone(),
                    msg,
                });
            }
            Ok(Some(PeerWire::Event { event })) => {
                let _ = driver.send(DriverEvent::PeerEvent {
                    node: node.clone(),
                    event,
                });
            }
            Ok(Some(PeerWire::Members { members })) => {
                let _ = driver.send(DriverEvent::PeerMembers {
                    node: node.clone(),
                    members,
                });
            }
            Ok(Some(PeerWire::Status { status })) => {
                if !status.is_null() {
                    let _ = driver.send(DriverEvent::PeerStatus {
                        node: node.clone(),
                        status,
                    });
                }
            }
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(peer = %node, "dropping peer connection: {e}");
                conn.close_protocol_violation(&e.to_string());
                break;
            }
        }
    }
    writer.abort();
    conn.close("stream ended");
    let _ = driver.send(DriverEvent::PeerDown {
        node: node.clone(),
        conn: conn_id,
    });
    tracing::info!(peer = %node, "peer disconnected");
}

/// Last known status summary of each peer, for `status` and the console.
#[derive(Debug, Default)]
pub struct PeerTable {
    pub senders: HashMap<String, mpsc::UnboundedSender<PeerWire>>,
    pub status: HashMap<String, Value>,
}

impl PeerTable {
    pub fn send(&self, to: &str, wire: PeerWire) -> bool {
        self.senders.get(to).is_some_and(|tx| tx.send(wire).is_ok())
    }
    pub fn broadcast(&self, wire: &PeerWire) {
        for tx in self.senders.values() {
            let _ = tx.send(wire.clone());
        }
    }
}
