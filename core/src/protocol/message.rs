//! What cluster services say to each other over the peer mesh (seed 001,
//! figures 3 and 4: freeze notice, "frozen and flushed", post-snapshot,
//! completion). This enum goes on the wire through `freezeframe-netproto`.

use super::types::{Failure, NodeReport, SnapshotId};
use serde::{Deserialize, Serialize};

/// A message between two nodes' cluster services. Every variant names its
/// snapshot, so a late message from an earlier attempt is recognised and
/// ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerMessage {
    /// Initiator → node: take part in `snapshot`. The receiving node holds its
    /// freeze at most `lease_ms` from receipt (or its own lease, if shorter),
    /// then aborts on its own. `members` is the initiator's member list,
    /// sorted: a node whose list differs refuses.
    FreezeNotice {
        snapshot: SnapshotId,
        initiator: String,
        lease_ms: u64,
        #[serde(default)]
        members: Vec<String>,
    },
    /// Node → initiator: my writers are frozen and flushed, my I/O is held,
    /// and I hold for `granted_ms` from the notice's receipt.
    Frozen {
        snapshot: SnapshotId,
        node: String,
        #[serde(default)]
        granted_ms: u64,
    },
    /// Initiator → node: the block snapshot exists; do post-snapshot and thaw.
    PostSnapshot { snapshot: SnapshotId },
    /// Node → initiator: post-snapshot and thaw finished here.
    Done {
        snapshot: SnapshotId,
        report: NodeReport,
    },
    /// Initiator → node: the snapshot is aborted (and deleted if it was
    /// made); thaw now if still frozen. Also the outcome for a node that
    /// already reported done.
    Abort {
        snapshot: SnapshotId,
        reason: String,
    },
    /// Initiator → node: the outcome (seed 001, claim 14): the snapshot is
    /// sealed and kept. Sent to every node that reported done.
    Complete { snapshot: SnapshotId },
    /// Node → initiator: I am already in snapshot `current`; cannot join.
    Busy {
        snapshot: SnapshotId,
        node: String,
        current: SnapshotId,
    },
    /// Node → initiator: the snapshot failed here (veto, timeout, lease).
    Failed {
        snapshot: SnapshotId,
        error: Failure,
        report: NodeReport,
    },
}

impl PeerMessage {
    /// The snapshot the message is about.
    pub fn snapshot(&self) -> SnapshotId {
        match self {
            PeerMessage::FreezeNotice { snapshot, .. }
            | PeerMessage::Frozen { snapshot, .. }
            | PeerMessage::PostSnapshot { snapshot }
            | PeerMessage::Done { snapshot, .. }
            | PeerMessage::Abort { snapshot, .. }
            | PeerMessage::Complete { snapshot }
            | PeerMessage::Busy { snapshot, .. }
            | PeerMessage::Failed { snapshot, .. } => *snapshot,
        }
    }
}
