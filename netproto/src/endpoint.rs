//! The QUIC endpoint a node uses to reach its peers and be reached by them.
//!
//! One [`PeerEndpoint`] per node is both server and client on one UDP
//! socket. Every connection is mutually authenticated by [`crate::tls`];
//! what comes out of [`PeerEndpoint::accept`] and [`PeerEndpoint::connect`]
//! is a [`PeerConnection`] whose [`PeerConnection::peer_name`] is the node
//! name taken from the peer's *verified* certificate.
//!
//! Messages travel on bidirectional streams as frames ([`crate::frame`]):
//! `open_bi` / `accept_bi` give a [`FramedSend`] and a [`FramedRecv`] with
//! typed `send` / `recv`.
//!
//! Liveness: every connection sends a keep-alive every 500 ms and is declared
//! lost after 2 s of silence ([`EndpointOptions`]), so
//! [`PeerConnection::closed`] resolves within about 2 s of a peer dying or
//! the link going away — the bound the lease logic of the snapshot protocol
//! builds on.
//!
//! Handshakes run in a background task, each on its own, so a slow or
//! hostile client cannot stall the others; refused peers are logged with
//! `tracing::warn!` (address, presented node name, reason) and published on
//! [`PeerEndpoint::refusals`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{broadcast, mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::frame::{FrameCodec, FramedRecv, FramedSend};
use crate::pki::{node_name_of, CaCertificate, NodeIdentity};
use crate::tls::{MemberList, PresentedName, TlsSetup, ALPN};

/// Application close code: a normal, intended close.
pub const CLOSE_NORMAL: u32 = 0;
/// Application close code: the peer broke the protocol (bad frames, bad messages).
pub const CLOSE_PROTOCOL_VIOLATION: u32 = 1;
/// Application close code: the peer is not welcome (identity or ALPN check after the handshake).
pub const CLOSE_REFUSED: u32 = 2;
/// Stream stop code used by [`FramedRecv::stop`] after a framing error.
pub const STOP_BAD_FRAME: u32 = 1;

/// How many verified connections wait for [`PeerEndpoint::accept`].
const ACCEPT_QUEUE: usize = 64;

/// Timers and limits of an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct EndpointOptions {
    /// How often an idle connection sends a keep-alive.
    pub keep_alive: Duration,
    /// Silence after which a connection is declared lost (also bounds the handshake).
    pub idle_timeout: Duration,
    /// The frame limit on new streams (raise it per stream with `set_codec`).
    pub codec: FrameCodec,
}

impl Default for EndpointOptions {
    fn default() -> Self {
        EndpointOptions {
            keep_alive: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(2),
            codec: FrameCodec::CONTROL,
        }
    }
}

/// A peer that was refused during or right after the handshake.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// Where it came from.
    pub addr: SocketAddr,
    /// The node name its certificate carried, if it presented one.
    pub presented_name: Option<String>,
    /// Why it was refused.
    pub reason: String,
}

/// Shared by the endpoint handle and its accept task.
struct Shared {
    tls: TlsSetup,
    transport: Arc<quinn::TransportConfig>,
    options: EndpointOptions,
    refusals: broadcast::Sender<Refusal>,
}

impl Shared {
    fn refused(&self, addr: SocketAddr, presented_name: Option<String>, reason: String) {
        tracing::warn!(
            node = %self.tls.node_name(),
            peer_addr = %addr,
            presented_name = presented_name.as_deref().unwrap_or("<none>"),
            %reason,
            "refused peer"
        );
        // Nobody listening is fine: the log line is the record.
        let _ = self.refusals.send(Refusal {
            addr,
            presented_name,
            reason,
        });
    }

    fn server_config(&self, presented: PresentedName) -> Result<quinn::ServerConfig> {
        let tls = self.tls.server_config(presented)?;
        let quic = QuicServerConfig::try_from(Arc::new(tls)).map_err(|e| Error::Tls {
            node: self.tls.node_name().to_string(),
            reason: format!("server config unusable for QUIC: {e}"),
        })?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(self.transport.clone());
        Ok(config)
    }

    fn client_config(&self, presented: PresentedName) -> Result<quinn::ClientConfig> {
        let tls = self.tls.client_config(presented)?;
        let quic = QuicClientConfig::try_from(Arc::new(tls)).map_err(|e| Error::Tls {
            node: self.tls.node_name().to_string(),
            reason: format!("client config unusable for QUIC: {e}"),
        })?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(self.transport.clone());
        Ok(config)
    }

    /// After a successful handshake: the verified peer name, and the ALPN
    /// check (rustls enforces it for QUIC; checked again because a
    /// connection without it must never carry freezeframe frames).
    fn verified_peer(&self, conn: &quinn::Connection) -> std::result::Result<String, String> {
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<HandshakeData>().ok())
            .and_then(|d| d.protocol);
        if alpn.as_deref() != Some(ALPN) {
            return Err(format!(
                "application protocol {:?}, expected {:?}",
                alpn.map(|p| String::from_utf8_lossy(&p).into_owned()),
                String::from_utf8_lossy(ALPN)
            ));
        }
        let certs = conn
            .peer_identity()
            .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or("no peer certificate after the handshake")?;
        let first = certs.first().ok_or("empty peer certificate chain")?;
        let name = node_name_of(first)?;
        if !self.tls.members().contains(&name) {
            return Err(format!("node {name} is not in the member list"));
        }
        Ok(name)
    }

    fn connection(&self, conn: quinn::Connection, peer_name: String) -> PeerConnection {
        PeerConnection {
            addr: conn.remote_address(),
            conn,
            peer_name,
            codec: self.options.codec,
            idle_timeout: self.options.idle_timeout,
        }
    }
}

/// A node's QUIC endpoint: accepts verified peers and dials them.
pub struct PeerEndpoint {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    incoming: Mutex<mpsc::Receiver<PeerConnection>>,
    /// Runs the handshakes of incoming connections; stopped on drop.
    accept_task: JoinHandle<()>,
}

impl std::fmt::Debug for PeerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerEndpoint")
            .field("node", &self.shared.tls.node_name())
            .field("addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Drop for PeerEndpoint {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl PeerEndpoint {
    /// Binds with the default timers (keep-alive 500 ms, idle timeout 2 s).
    /// Must be called inside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        ca: &CaCertificate,
        members: MemberList,
    ) -> Result<PeerEndpoint> {
        PeerEndpoint::bind_with(addr, identity, ca, members, EndpointOptions::default())
    }

    /// Binds with explicit timers and limits.
    pub fn bind_with(
        addr: SocketAddr,
        identity: &NodeIdentity,
        ca: &CaCertificate,
        members: MemberList,
        options: EndpointOptions,
    ) -> Result<PeerEndpoint> {
        let tls = TlsSetup::new(identity, ca, members)?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(options.keep_alive));
        let idle = quinn::IdleTimeout::try_from(options.idle_timeout).map_err(|e| Error::Tls {
            node: identity.node_name.clone(),
            reason: format!("idle timeout {:?}: {e}", options.idle_timeout),
        })?;
        transport.max_idle_timeout(Some(idle));
        let (refusals, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            tls,
            transport: Arc::new(transport),
            options,
            refusals,
        });
        // The endpoint-level config only matters for connections accepted
        // without `accept_with`, which this module never does.
        let base = shared.server_config(PresentedName::default())?;
        let endpoint =
            quinn::Endpoint::server(base, addr).map_err(|source| Error::Bind { addr, source })?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), shared.clone(), tx));
        tracing::info!(node = %shared.tls.node_name(), addr = ?endpoint.local_addr().ok(), "QUIC peer endpoint bound");
        Ok(PeerEndpoint {
            endpoint,
            shared,
            incoming: Mutex::new(rx),
            accept_task,
        })
    }

    /// The address the endpoint is bound to (with the real port when bound to port 0).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint.local_addr().map_err(|source| Error::Io {
            context: Some(format!("local address of node {}", self.node_name())),
            source,
        })
    }

    /// This node's name, from its certificate.
    pub fn node_name(&self) -> &str {
        self.shared.tls.node_name()
    }

    /// The live member list (updates apply to the next handshakes).
    pub fn members(&self) -> &MemberList {
        self.shared.tls.members()
    }

    /// Whether this node is the one that dials `peer`: the lexically smaller
    /// name dials, the other only accepts. Both nodes reach the same answer
    /// without talking, so each pair keeps exactly one connection.
    pub fn dials(&self, peer: &str) -> bool {
        self.node_name().to_ascii_lowercase() < peer.to_ascii_lowercase()
    }

    /// Refusals (wrong CA, not a member, wrong ALPN, no certificate) as they
    /// happen; each is also logged with `tracing::warn!`.
    pub fn refusals(&self) -> broadcast::Receiver<Refusal> {
        self.shared.refusals.subscribe()
    }

    /// Dials node `peer_name` at `addr`. The peer must be in the member list
    /// and must present a certificate for exactly that name from the cluster CA.
    pub async fn connect(&self, addr: SocketAddr, peer_name: &str) -> Result<PeerConnection> {
        crate::pki::validate_node_name(peer_name)?;
        if !self.members().contains(peer_name) {
            return Err(Error::NotAMember {
                peer: peer_name.to_string(),
            });
        }
        let presented = PresentedName::default();
        let config = self.shared.client_config(presented.clone())?;
        let handshake_err = |reason: String| Error::Handshake {
            peer: peer_name.to_string(),
            addr,
            reason,
        };
        let connecting = self
            .endpoint
            .connect_with(config, addr, peer_name)
            .map_err(|e| handshake_err(e.to_string()))?;
        let conn = match connecting.await {
            Ok(c) => c,
            Err(e) => {
                let reason = describe(&e, self.shared.options.idle_timeout);
                tracing::warn!(
                    node = %self.node_name(),
                    peer = %peer_name,
                    peer_addr = %addr,
                    presented_name = presented.get().as_deref().unwrap_or("<none>"),
                    %reason,
                    "connection to peer failed"
                );
                return Err(handshake_err(match presented.get() {
                    Some(p) if !p.eq_ignore_ascii_case(peer_name) => {
                        format!("{reason} (its certificate names node {p})")
                    }
                    _ => reason,
                }));
            }
        };
        match self.shared.verified_peer(&conn) {
            Ok(name) => {
                tracing::debug!(node = %self.node_name(), peer = %name, peer_addr = %addr, "connected to peer");
                Ok(self.shared.connection(conn, name))
            }
            Err(reason) => {
                conn.close(VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
                Err(handshake_err(reason))
            }
        }
    }

    /// The next verified incoming connection. Refused handshakes never come
    /// out here (see [`PeerEndpoint::refusals`]); the endpoint keeps accepting.
    pub async fn accept(&self) -> Result<PeerConnection> {
        let mut rx = self.incoming.lock().await;
        rx.recv().await.ok_or_else(|| Error::EndpointClosed {
            node: self.node_name().to_string(),
        })
    }

    /// Closes every connection with `reason` and stops accepting; waits a
    /// short while so the close frames reach the peers.
    pub async fn close(&self, reason: &str) {
        self.endpoint.close(VarInt::from_u32(CLOSE_NORMAL), reason.as_bytes());
        self.accept_task.abort();
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
    }
}

/// Takes incoming connections and runs each handshake in its own task.
async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, tx: mpsc::Sender<PeerConnection>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            let presented = PresentedName::default();
            let config = match shared.server_config(presented.clone()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(peer_addr = %addr, error = %e, "cannot build TLS config for incoming connection");
                    incoming.refuse();
                    return;
                }
            };
            let connecting = match incoming.accept_with(Arc::new(config)) {
                Ok(c) => c,
                Err(e) => {
                    shared.refused(addr, None, describe(&e, shared.options.idle_timeout));
                    return;
                }
            };
            let conn = match connecting.await {
                Ok(c) => c,
                Err(e) => {
                    shared.refused(addr, presented.get(), describe(&e, shared.options.idle_timeout));
                    return;
                }
            };
            match shared.verified_peer(&conn) {
                Ok(name) => {
                    tracing::debug!(node = %shared.tls.node_name(), peer = %name, peer_addr = %addr, "accepted peer");
                    if let Err(mpsc::error::SendError(c)) = tx.send(shared.connection(conn, name)).await {
                        c.close("endpoint is shutting down");
                    }
                }
                Err(reason) => {
                    conn.close(VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
                    shared.refused(addr, presented.get(), reason);
                }
            }
        });
    }
}

/// A human reason for a QUIC connection error.
fn describe(e: &ConnectionError, idle: Duration) -> String {
    match e {
        ConnectionError::TimedOut => format!("no packets for {} ms (idle timeout)", idle.as_millis()),
        ConnectionError::ApplicationClosed(c) => format!(
            "closed by the peer (code {}): {}",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        ),
        ConnectionError::ConnectionClosed(c) => format!(
            "closed by the peer's QUIC/TLS layer: {} {}",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        ),
        ConnectionError::LocallyClosed => "closed by this node".to_string(),
        ConnectionError::Reset => "reset by the peer".to_string(),
        ConnectionError::TransportError(t) => format!("refused by this node: {t}"),
        other => other.to_string(),
    }
}

/// An authenticated connection to one peer node. Cheap to clone; all clones
/// are the same connection.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    conn: quinn::Connection,
    peer_name: String,
    addr: SocketAddr,
    codec: FrameCodec,
    idle_timeout: Duration,
}

impl PeerConnection {
    /// The peer's node name, from its verified certificate.
    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.addr
    }

    /// Identifies this connection among all of the endpoint's (to tell a
    /// replaced connection from the current one).
    pub fn stable_id(&self) -> usize {
        self.conn.stable_id()
    }

    /// Current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    fn lost(&self, e: &ConnectionError) -> Error {
        Error::ConnectionLost {
            peer: self.peer_name.clone(),
            addr: self.addr,
            reason: describe(e, self.idle_timeout),
        }
    }

    fn framed(&self, send: quinn::SendStream, recv: quinn::RecvStream) -> (FramedSend<quinn::SendStream>, FramedRecv<quinn::RecvStream>) {
        (
            FramedSend::new(send, self.codec).with_context(format!("to node {} at {}", self.peer_name, self.addr)),
            FramedRecv::new(recv, self.codec).with_context(format!("from node {} at {}", self.peer_name, self.addr)),
        )
    }

    /// Opens a new bidirectional stream. The peer sees it in
    /// [`PeerConnection::accept_bi`] when the first frame arrives.
    pub async fn open_bi(&self) -> Result<(FramedSend<quinn::SendStream>, FramedRecv<quinn::RecvStream>)> {
        let (send, recv) = self.conn.open_bi().await.map_err(|e| self.lost(&e))?;
        Ok(self.framed(send, recv))
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept_bi(&self) -> Result<(FramedSend<quinn::SendStream>, FramedRecv<quinn::RecvStream>)> {
        let (send, recv) = self.conn.accept_bi().await.map_err(|e| self.lost(&e))?;
        Ok(self.framed(send, recv))
    }

    /// Closes the connection; the peer's `closed()` reports `reason`.
    pub fn close(&self, reason: &str) {
        self.conn.close(VarInt::from_u32(CLOSE_NORMAL), reason.as_bytes());
    }

    /// Closes the connection because the peer broke the protocol.
    pub fn close_protocol_violation(&self, reason: &str) {
        tracing::warn!(peer = %self.peer_name, peer_addr = %self.addr, %reason, "closing connection: protocol violation");
        self.conn.close(VarInt::from_u32(CLOSE_PROTOCOL_VIOLATION), reason.as_bytes());
    }

    /// Resolves when the connection ends, for whatever reason (closed by
    /// either side, idle timeout, reset), with a [`Error::ConnectionLost`]
    /// that says which.
    pub async fn closed(&self) -> Error {
        let e = self.conn.closed().await;
        self.lost(&e)
    }

    /// Why the connection ended, or `None` while it is alive.
    pub fn close_reason(&self) -> Option<Error> {
        self.conn.close_reason().map(|e| self.lost(&e))
    }
}

impl FramedRecv<quinn::RecvStream> {
    /// Tells the peer to stop sending on this stream (after a framing error,
    /// when nothing more on it can be understood). Other streams of the
    /// connection are unaffected.
    pub fn stop(&mut self) {
        // Already stopped or finished: nothing more to tell the peer.
        let _ = self.get_mut().stop(VarInt::from_u32(STOP_BAD_FRAME));
    }
}
