//! The snapshot protocol (seed 001, figures 3–6; DESIGN.md §3) as
//! deterministic state machines: no I/O, no clock, no randomness, no threads.
//!
//! # Layout
//! - [`node`]: [`NodeMachine`], what a driver talks to: inputs in, outputs
//!   out, time passed in. It wires the components below.
//! - [`coordinator`]: the VSS-like sequencer; knows writers and one provider,
//!   nothing of the cluster.
//! - [`cluster`]: the cluster writer (a writer to the coordinator) and the
//!   cluster service (the node's peer on the mesh).
//! - [`provider`]: the storage provider (initiator) and the helper provider
//!   (every other node).
//! - [`message`]: [`PeerMessage`], what cluster services send each other.
//! - [`types`]: phases, writer events, failures, phase events, reports.
//! - [`sim`]: a seeded simulation of a whole cluster (network delay, drops,
//!   crashes, misbehaving writers) that checks the protocol's promises.
//!
//! # One snapshot, as the machines see it
//! ```text
//!  initiator I                                   every other node R
//!  Request ─► coordinator: freeze writers + cluster writer
//!             cluster writer ─► cluster service ── FreezeNotice{lease} ──► cluster service
//!                                                        coordinator (helper provider): freeze writers,
//!                                                        HoldIo+FlushVolume, commit ─► helper blocks
//!             cluster writer returns ◄──────────── Frozen ◄────────────── cluster service
//!  HoldIo, FlushVolume, CreateSnapshot (commit instant), ReleaseIo
//!  post_snapshot writers + cluster writer ──────── PostSnapshot ─────────► helper returns;
//!                                                        ReleaseIo, post_snapshot, thaw writers
//!             cluster writer returns ◄──────────── Done{node report} ◄──
//!  thaw writers, SealSnapshot, Report to the requester
//! ```
//! Any failure: the coordinator that sees it aborts its writers and
//! provider; the initiator sends `Abort` to every node still in, deletes a
//! created snapshot and reports; another node sends `Failed` to the
//! initiator. A node that loses its initiator, or whose lease runs out,
//! aborts by itself.
//!
//! # The promises
//! - At the commit instant every writer in the cluster that was not allowed
//!   to continue (on_error=continue after a failure) is frozen.
//! - Every freeze is a lease enforced by the node holding it; every freeze is
//!   followed by thaw or abort on every surviving node.
//! - A failed snapshot leaves nothing created behind; the failure names the
//!   node, the writer and the phase.
//! - One snapshot in flight; a second one gets a busy failure at once.

pub mod cluster;
pub mod coordinator;
pub mod message;
pub mod node;
pub mod provider;
pub mod sim;
pub mod types;

pub use coordinator::WriterState;
pub use message::PeerMessage;
pub use node::{
    Config, Input, NodeMachine, NodeStatus, Output, PeerStatus, WriterStatus,
    DEFAULT_COMMIT_MARGIN_MS, DEFAULT_LEASE_MS, DEFAULT_WRITER_TIMEOUT_MS,
};
pub use types::*;
