//! The vocabulary the protocol machines share with their driver and with each
//! other: ids, phases, writer events and answers, failures, phase events, the
//! per-node report and the final snapshot report (`snapshot create --json`).
//!
//! Everything that crosses a process boundary (peer messages, reports) is serde;
//! field names are part of the wire and CLI contract, so rename with care.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Snapshot id reserved by the initiator's driver in the shared catalog before
/// the protocol starts (same number as `volume::SnapshotId`).
pub type SnapshotId = u64;
/// A local client's request number, chosen by the driver; echoed in the report.
pub type RequestId = u64;
/// A local writer connection, chosen by the driver; unique on one node.
pub type WriterId = u64;

/// Where a node (or one writer) stands in a snapshot. The names are the ones the
/// report, the event stream and the console show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No snapshot has run on this node yet.
    Idle,
    /// Freeze sent to the writers; waiting for every writer to flush and hold.
    Freezing,
    /// A non-initiator node: its writers are frozen and its I/O held; it waits
    /// (in the helper provider's commit) for the initiator's post-snapshot.
    Frozen,
    /// The initiator: flush-and-hold of the volume and the block snapshot.
    Committing,
    /// Writers may modify the virtual snapshot.
    PostSnapshot,
    /// Thaw sent to the writers (and, on the initiator, the snapshot sealed).
    Thawing,
    /// The snapshot finished on this node.
    Done,
    /// The snapshot was aborted on this node.
    Aborted,
}

impl Phase {
    /// The name used in reports and events (`post_snapshot`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Freezing => "freezing",
            Phase::Frozen => "frozen",
            Phase::Committing => "committing",
            Phase::PostSnapshot => "post_snapshot",
            Phase::Thawing => "thawing",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a writer's failure does to the snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// A veto or timeout aborts the snapshot on every node (the default).
    #[default]
    Fail,
    /// A veto or timeout is recorded in the report; the snapshot goes on without
    /// this writer.
    Continue,
}

/// The event kinds a writer answers; used to match an answer to its event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Freeze,
    PostSnapshot,
    Thaw,
    Abort,
    Complete,
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventKind::Freeze => "freeze",
            EventKind::PostSnapshot => "post_snapshot",
            EventKind::Thaw => "thaw",
            EventKind::Abort => "abort",
            EventKind::Complete => "complete",
        })
    }
}

/// An event sent to a writer. `Freeze`, `PostSnapshot` and `Thaw` need an
/// answer; the two outcomes (`Abort`, `Complete`) do not.
///
/// Every writer that is sent `Freeze` for a snapshot later gets exactly one
/// outcome for it: `Abort` (before or after `Thaw`) or `Complete`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WriterEvent {
    /// Flush your data into the live volume and hold further writes; then ack.
    /// `lease_ms` is what is left of this node's lease: a writer that hears
    /// nothing more within it resumes by itself.
    Freeze { lease_ms: u64 },
    /// The snapshot exists; you may modify your data in the virtual snapshot.
    PostSnapshot,
    /// Resume writing. Not an outcome: `Complete` or `Abort` follows.
    Thaw,
    /// Outcome: the snapshot failed or was deleted; resume writing if still
    /// holding. No answer expected.
    Abort { reason: String },
    /// Outcome: the snapshot is sealed and kept. No answer expected.
    Complete,
}

impl WriterEvent {
    pub fn kind(&self) -> EventKind {
        match self {
            WriterEvent::Freeze { .. } => EventKind::Freeze,
            WriterEvent::PostSnapshot => EventKind::PostSnapshot,
            WriterEvent::Thaw => EventKind::Thaw,
            WriterEvent::Abort { .. } => EventKind::Abort,
            WriterEvent::Complete => EventKind::Complete,
        }
    }

    /// True for the two outcome events, which need no answer.
    pub fn is_outcome(&self) -> bool {
        matches!(self, WriterEvent::Abort { .. } | WriterEvent::Complete)
    }
}

/// A local writer's answer to an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WriterReply {
    Ack,
    Veto { reason: String },
}

/// Why a snapshot failed: which node, which writer (if a writer was at fault),
/// in which phase, and what happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    pub phase: Phase,
    pub reason: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.writer {
            Some(w) => write!(
                f,
                "node {} writer {} in {}: {}",
                self.node, w, self.phase, self.reason
            ),
            None => write!(f, "node {} in {}: {}", self.node, self.phase, self.reason),
        }
    }
}

/// Which edge of a phase a [`PhaseEvent`] marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhaseEdge {
    Enter,
    Exit,
}

/// One phase transition of a node (writer `None`) or of one writer on it.
/// The console and the benchmarks read these.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseEvent {
    pub snapshot: SnapshotId,
    pub node: String,
    pub phase: Phase,
    pub edge: PhaseEdge,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// On entering `aborted`: why, naming the node, writer (or hook) and
    /// phase where it failed — the same words the report has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A finished phase of one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseSpan {
    pub name: Phase,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// How one writer came out of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriterOutcome {
    /// Froze, did post-snapshot, was thawed.
    Thawed,
    /// Was sent abort.
    Aborted,
    /// Vetoed an event (see `phase` and `reason`).
    Vetoed,
    /// Did not answer an event within its freeze timeout.
    TimedOut,
    /// Disconnected during the snapshot.
    Gone,
}

/// One writer in a node's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterReport {
    pub name: String,
    pub outcome: WriterOutcome,
    pub on_error: OnError,
    /// Phase of the veto / timeout / disconnection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the writer acknowledged freeze (it is flushed and holding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<u64>,
    /// When the writer acknowledged thaw (or was sent abort).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thawed_ms: Option<u64>,
}

/// One node's part of a snapshot: its phases and its writers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub phases: Vec<PhaseSpan>,
    pub writers: Vec<WriterReport>,
}

/// A member left out of a snapshot, and why (fenced, not attached). The
/// report and the manifest name every one: a snapshot is never taken around
/// a node silently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    pub node: String,
    pub reason: String,
}

/// `complete` or `failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportStatus {
    Complete,
    Failed,
}

/// The answer to a snapshot request: what `snapshot create --json` prints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub id: SnapshotId,
    pub status: ReportStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Failure>,
    pub initiator: String,
    pub requested_ms: u64,
    pub finished_ms: u64,
    /// Every node that reported, the initiator first.
    pub nodes: Vec<NodeReport>,
    /// Members left out (fenced, not attached), with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<Excluded>,
    /// First writer frozen to last writer thawed, cluster-wide (ms); `None` when
    /// no writer froze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<u64>,
    /// How long the initiator held the volume's live I/O (flush-and-hold to
    /// release), in ms; `None` when it never held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_hold_ms: Option<u64>,
}

impl Report {
    /// True when the failure is the one-snapshot-in-flight refusal.
    pub fn is_busy(&self) -> bool {
        self.error
            .as_ref()
            .is_some_and(|e| e.reason.starts_with(BUSY_PREFIX))
    }
}

/// Every busy refusal's reason starts with this, so clients can tell it apart.
pub const BUSY_PREFIX: &str = "busy:";

/// First writer frozen to last writer thawed across the given node reports.
pub fn freeze_window(nodes: &[NodeReport]) -> Option<u64> {
    let writers = nodes.iter().flat_map(|n| n.writers.iter());
    let first = writers.clone().filter_map(|w| w.frozen_ms).min()?;
    let last = writers.filter_map(|w| w.thawed_ms).max()?;
    Some(last.saturating_sub(first))
}
