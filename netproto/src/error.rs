//! The crate's one error type.
//!
//! Every variant names what it is about — the file, the peer node and its
//! address, the frame — so that a log line or a CLI error is enough to act on
//! without a debugger.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong in the cluster CA, the TLS setup, the frame
/// codec and the QUIC endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a certificate or key file failed.
    #[error("{action} {}: {source}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A PEM file holds no usable certificate or key, or one that does not parse.
    #[error("{}: {what}", path.display())]
    BadPem { path: PathBuf, what: String },

    /// A certificate or key given in memory (not from a file) is unusable.
    #[error("{what}: {reason}")]
    BadCredential { what: String, reason: String },

    /// A key file does not belong to the certificate next to it.
    #[error("key {} does not belong to certificate {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },

    /// Generating a key or signing a certificate failed.
    #[error("cannot {action}: {reason}")]
    Certificate { action: String, reason: String },

    /// A node name cannot be used as a certificate name (it must be a DNS-style name).
    #[error("node name {name:?} is not usable: {reason}")]
    InvalidNodeName { name: String, reason: String },

    /// This node's own certificate was not issued by the cluster CA it was given.
    #[error("certificate of node {node} is not valid under the cluster CA {ca}: {reason}")]
    NotIssuedByCa {
        node: String,
        ca: String,
        reason: String,
    },

    /// Building the rustls or quinn TLS configuration failed.
    #[error("TLS configuration for node {node}: {reason}")]
    Tls { node: String, reason: String },

    /// We were asked to talk to a node that is not in the cluster's member list.
    #[error("node {peer} is not in the cluster member list")]
    NotAMember { peer: String },

    /// Binding the UDP socket for the QUIC endpoint failed.
    #[error("cannot bind QUIC endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// The endpoint has been closed and accepts or dials nothing more.
    #[error("QUIC endpoint of node {node} is closed")]
    EndpointClosed { node: String },

    /// The QUIC/TLS handshake with a peer failed (refused certificate, wrong CA,
    /// unreachable address, wrong ALPN).
    #[error("handshake with node {peer} at {addr} failed: {reason}")]
    Handshake {
        peer: String,
        addr: SocketAddr,
        reason: String,
    },

    /// An established connection ended: closed by either side, timed out, or reset.
    #[error("connection to node {peer} at {addr} lost: {reason}")]
    ConnectionLost {
        peer: String,
        addr: SocketAddr,
        reason: String,
    },

    /// A frame header announced a payload larger than this stream accepts.
    /// Nothing was allocated for it; the stream cannot be resynchronised.
    #[error(
        "frame of {len} bytes exceeds the limit of {max} bytes{}",
        ctx(context)
    )]
    FrameTooLarge {
        len: u64,
        max: u32,
        context: Option<String>,
    },

    /// The bytes on a stream are not a freezeframe frame.
    #[error("malformed frame{}: {reason}", ctx(context))]
    MalformedFrame {
        reason: String,
        context: Option<String>,
    },

    /// A frame came with a protocol version this build does not speak.
    #[error(
        "frame version {got} is not supported (this build speaks {supported}){}",
        ctx(context)
    )]
    UnsupportedVersion {
        got: u8,
        supported: u8,
        context: Option<String>,
    },

    /// A frame of one kind arrived where another was expected.
    #[error("expected a {expected} frame, got a {got} frame{}", ctx(context))]
    UnexpectedKind {
        expected: &'static str,
        got: &'static str,
        context: Option<String>,
    },

    /// A JSON frame did not hold the message type expected here.
    #[error(
        "cannot decode {type_name} from a JSON frame{}: {source}",
        ctx(context)
    )]
    Decode {
        type_name: &'static str,
        context: Option<String>,
        #[source]
        source: serde_json::Error,
    },

    /// A message could not be encoded to JSON.
    #[error("cannot encode {type_name} to JSON: {source}")]
    Encode {
        type_name: &'static str,
        #[source]
        source: serde_json::Error,
    },

    /// The peer finished the stream before the frame was complete.
    #[error(
        "stream ended inside a frame{}: got {got} of {wanted} bytes",
        ctx(context)
    )]
    Truncated {
        got: usize,
        wanted: usize,
        context: Option<String>,
    },

    /// The peer finished the stream cleanly where a frame was expected.
    #[error("stream finished by the peer{}", ctx(context))]
    StreamFinished { context: Option<String> },

    /// An earlier frame error left this stream unsynchronised; it must be dropped.
    #[error("stream unusable after an earlier frame error{}", ctx(context))]
    StreamBroken { context: Option<String> },

    /// Reading from or writing to a stream failed below the frame layer.
    #[error("stream I/O{}: {source}", ctx(context))]
    Io {
        context: Option<String>,
        #[source]
        source: std::io::Error,
    },

    /// A control or writer line longer than the limit (the line is skipped).
    #[error("line longer than {max} bytes")]
    LineTooLong { max: usize },

    /// A control or writer line that is not the JSON expected.
    #[error("malformed message: {0}")]
    Malformed(String),

    /// Nothing answers on a node's control socket. (The cause is part of the
    /// message, not a `source`, so a printed error chain says it once.)
    #[error("node unreachable on {}: {cause}", path.display())]
    NodeUnreachable {
        path: PathBuf,
        cause: std::io::Error,
    },

    /// The node closed the control connection before answering.
    #[error("node closed the control connection {} before answering", path.display())]
    NodeClosed { path: PathBuf },

    /// The node answered with an error.
    #[error("{0}")]
    Remote(String),
}

/// Formats an optional "where" suffix (" from node n2 at 127.0.0.1:7000").
fn ctx(context: &Option<String>) -> String {
    match context {
        Some(c) => format!(" {c}"),
        None => String::new(),
    }
}

impl Error {
    /// Wraps an I/O error of a local socket with what was being done.
    pub fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io {
            context: Some(what.to_string()),
            source,
        }
    }

    /// Attaches "where it happened" (peer and address) to a frame or stream
    /// error that was raised without knowing the connection.
    pub fn with_context(mut self, where_: &str) -> Error {
        match &mut self {
            Error::FrameTooLarge { context, .. }
            | Error::MalformedFrame { context, .. }
            | Error::UnsupportedVersion { context, .. }
            | Error::UnexpectedKind { context, .. }
            | Error::Decode { context, .. }
            | Error::Truncated { context, .. }
            | Error::StreamFinished { context }
            | Error::StreamBroken { context }
            | Error::Io { context, .. }
                if context.is_none() =>
            {
                *context = Some(where_.to_string());
            }
            _ => {}
        }
        self
    }

    /// True when the bytes on the stream were not a valid frame (hostile or
    /// buggy peer), as opposed to the connection going away.
    pub fn is_protocol_violation(&self) -> bool {
        matches!(
            self,
            Error::FrameTooLarge { .. }
                | Error::MalformedFrame { .. }
                | Error::UnsupportedVersion { .. }
                | Error::UnexpectedKind { .. }
                | Error::Decode { .. }
        )
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
