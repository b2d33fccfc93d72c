//! The messages of the replica protocol (drawn in docs/protocol.md, "Replica").
//!
//! Each request runs on its own QUIC bidirectional stream with netproto's
//! `FrameCodec::DATA` frame limit (16 MiB) on both halves. The sender opens the stream and sends a [`Request`];
//! the secondary answers with a [`Reply`]. A push is:
//!
//! ```text
//! sender                                   secondary
//!   Request::Begin(Plan)          ──▶
//!                                 ◀──   Reply::Ready { have }   (blocks already durable)
//!   Blocks header + data          ──▶   (pipelined, no per-frame answer)
//!   Blocks header + data          ──▶
//!   Request::Commit { blake3 }    ──▶
//!                                 ◀──   Reply::Done(Summary) | Reply::Error
//! ```
//!
//! Any failure on the secondary is a `Reply::Error` with the reason, then the
//! end of the stream; the connection and the server carry on.

use serde::{Deserialize, Serialize};

use super::store::ReplicaSnapshotInfo;

/// Version of these messages; a secondary refuses other versions by name.
pub const PROTOCOL_VERSION: u32 = 1;

/// What a transfer will send: everything the secondary needs before the first block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub version: u32,
    /// The volume's uuid (its identity across hosts).
    pub volume: String,
    /// The node that pushes, for logs and the record.
    pub source_node: String,
    pub size: u64,
    pub block_size: u32,
    pub snapshot: u64,
    pub created_ms: u64,
    /// The replica snapshot the secondary builds on; `None` = full copy.
    pub base: Option<u64>,
    /// Blocks this transfer sends in all (before skipping what the secondary has).
    pub blocks: u64,
}

/// A request, the first frame of a stream (or `Commit`, the last of a push).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Which volumes and complete snapshots the secondary holds (one volume or all).
    List { volume: Option<String> },
    /// Start or resume a push.
    Begin(Plan),
    /// Every block is sent; check the image hash and mark the snapshot complete.
    Commit { blake3: String },
}

/// One block in a [`Blocks`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockHeader {
    /// Block number in the volume.
    pub b: u64,
    /// Hex blake3 chaining value of the block at its place in the image.
    pub cv: String,
    /// All zeros: no bytes follow for it.
    #[serde(default)]
    pub z: bool,
}

/// The JSON header of a json+binary frame carrying several blocks; the binary
/// part is the non-zero blocks' bytes, one whole block each, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocks {
    pub blocks: Vec<BlockHeader>,
}

/// What a volume's replica holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeListing {
    pub volume: String,
    pub size: u64,
    pub block_size: u32,
    pub snapshots: Vec<ReplicaSnapshotInfo>,
}

/// What a finished push reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub snapshot: ReplicaSnapshotInfo,
    /// Blocks written by this session (not counting those resumed from the journal).
    pub blocks_received: u64,
}

/// The secondary's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    List {
        volumes: Vec<VolumeListing>,
    },
    /// Ranges `[start, end)` of block numbers already durable from an earlier session.
    Ready {
        have: Vec<(u64, u64)>,
    },
    Done(Summary),
    Error {
        message: String,
    },
}

/// Collapses sorted block numbers into `[start, end)` ranges (the `have` list
/// stays small for a contiguous journal).
pub fn to_ranges(sorted: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in sorted {
        match out.last_mut() {
            Some((_, end)) if *end == b => *end += 1,
            Some((_, end)) if *end > b => {}
            _ => out.push((b, b + 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_collapse_runs() {
        assert_eq!(
            to_ranges([1, 2, 3, 7, 8, 10]),
            vec![(1, 4), (7, 9), (10, 11)]
        );
        assert_eq!(to_ranges([]), vec![]);
    }

    #[test]
    fn garbage_requests_fail_to_decode_without_panicking() {
        for text in [
            "{}",
            "{\"request\":\"begin\"}",
            "{\"request\":\"nope\"}",
            "[1,2]",
            "{\"request\":\"commit\",\"blake3\":7}",
        ] {
            assert!(serde_json::from_str::<Request>(text).is_err(), "{text}");
        }
    }
}
