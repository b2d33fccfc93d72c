//! # freezeframe-netproto
//!
//! How freezeframe nodes talk to each other: a private cluster CA, QUIC with
//! mutual TLS restricted to the cluster's members, and length-prefixed frames
//! carrying serde messages or raw data. The snapshot protocol (issue 3) and
//! the replica sync (issue 8) both run on it; nothing here decides anything
//! about snapshots — it only moves authenticated bytes.
//!
//! # Layout
//! - [`error`]: the crate's one error type.
//! - [`pki`]: the cluster CA; issuing, saving and loading node identities.
//! - [`tls`]: rustls configurations: cluster CA as the only root, member list, ALPN.
//! - [`frame`]: the frame format and framed halves over any tokio stream.
//! - [`endpoint`]: the QUIC endpoint and authenticated peer connections.
//! - [`control`]: the control socket (CLI and console ↔ node), JSON lines.
//! - [`writer`]: the writer protocol (applications ↔ node), JSON lines.
//!
//! The wire format is drawn in `docs/protocol.md` (wire section).

pub mod control;
pub mod endpoint;
pub mod error;
pub mod frame;
pub mod pki;
pub mod tls;
pub mod writer;

pub use endpoint::{EndpointOptions, PeerConnection, PeerEndpoint, Refusal};
pub use error::{Error, Result};
pub use frame::{Frame, FrameCodec, FrameKind, FramedRecv, FramedSend};
pub use pki::{CaCertificate, ClusterCa, NodeIdentity};
/// The QUIC implementation, for the stream types in [`FramedSend`] / [`FramedRecv`].
pub use quinn;
pub use tls::{MemberList, ALPN};
