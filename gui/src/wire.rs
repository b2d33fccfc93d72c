//! The JSON the console reads from a node's control socket and from its
//! long-operation child processes (`docs/protocol.md`), as small lenient serde
//! structs of its own.
//!
//! Why not the core types: the console must keep working with a node that is a
//! little newer or older than itself, so every field it does not need is
//! ignored and every field it can live without has a default. Phase names stay
//! strings here and are interpreted by [`crate::palette::PhaseKind`], so an
//! unknown phase is shown as its own word instead of failing the whole status.

use serde::Deserialize;

/// `{"op":"status"}`: the node the console is connected to, and every node it knows.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Status {
    pub node: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub cluster: String,
    #[serde(default)]
    pub mount: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub mounted: bool,
    #[serde(default = "idle", deserialize_with = "null_as_idle")]
    pub phase: String,
    #[serde(default)]
    pub in_flight: Option<u64>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub writers: Vec<WriterStatus>,
    /// The whole cluster as this node hears it (itself included).
    #[serde(default, deserialize_with = "null_as_default")]
    pub nodes: Vec<NodeStatus>,
}

fn idle() -> String {
    "idle".into()
}

/// `null` reads as the default: a node leaves a field `null` while it does
/// not know it yet (the initiator of a snapshot still being written, say).
fn null_as_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn null_as_idle<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(idle))
}

/// One node in `status.nodes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct NodeStatus {
    pub node: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub connected: bool,
    #[serde(default = "idle", deserialize_with = "null_as_idle")]
    pub phase: String,
    #[serde(default)]
    pub snapshot: Option<u64>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub writers: Vec<WriterStatus>,
}

/// One writer (application) registered on a node.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct WriterStatus {
    pub name: String,
    #[serde(default = "idle", deserialize_with = "null_as_idle")]
    pub state: String,
}

/// Which edge of a phase an event marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Edge {
    Enter,
    Exit,
}

/// One line of the event stream: a node (or one of its writers) entered or left a phase.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PhaseEvent {
    pub snapshot: u64,
    pub node: String,
    pub phase: String,
    pub edge: Edge,
    pub at_ms: u64,
    #[serde(default)]
    pub writer: Option<String>,
    /// On entering `aborted`: the failure in words.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Why a snapshot failed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Failure {
    pub node: String,
    #[serde(default)]
    pub writer: Option<String>,
    pub phase: String,
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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

/// A finished phase of one node in a report.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PhaseSpan {
    pub name: String,
    pub start_ms: u64,
    pub end_ms: u64,
}

/// One node's part of a report.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NodeReport {
    pub node: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub phases: Vec<PhaseSpan>,
}

/// The answer to `snapshot_create`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Report {
    pub id: u64,
    pub status: String,
    #[serde(default)]
    pub error: Option<Failure>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub initiator: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub requested_ms: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub finished_ms: u64,
    #[serde(default)]
    pub freeze_window_ms: Option<u64>,
    #[serde(default)]
    pub io_hold_ms: Option<u64>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub nodes: Vec<NodeReport>,
}

/// One row of `snapshot_list`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SnapshotRow {
    pub id: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub created_ms: u64,
    #[serde(default, deserialize_with = "null_as_default")]
    pub initiator: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub diff_bytes: u64,
    #[serde(default)]
    pub changed_blocks: Option<u64>,
    #[serde(default)]
    pub freeze_window_ms: Option<u64>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub blake3: Option<String>,
}

/// A `{"progress":{…}}` line a long operation prints on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

#[derive(Deserialize)]
struct ProgressLine {
    progress: Progress,
}

/// The progress in one stderr line, `None` for any other line (log output,
/// warnings), which the console passes through to its own log.
pub fn parse_progress(line: &str) -> Option<Progress> {
    serde_json::from_str::<ProgressLine>(line.trim())
        .ok()
        .map(|l| l.progress)
}

/// Decodes one answer `what` (a request name, for the message) into `T`.
pub fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    v: serde_json::Value,
) -> crate::Result<T> {
    serde_json::from_value(v).map_err(|e| crate::Error::Malformed {
        what,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_doc_examples_decode() {
        let ev: PhaseEvent = serde_json::from_str(
            r#"{"snapshot":7,"node":"n2","phase":"frozen","edge":"enter","at_ms":1795313600123,"writer":"db"}"#,
        )
        .unwrap();
        assert_eq!(
            (ev.node.as_str(), ev.writer.as_deref(), ev.edge),
            ("n2", Some("db"), Edge::Enter)
        );
        let row: SnapshotRow = serde_json::from_str(
            r#"{"id":7,"created_ms":1,"initiator":"n1","status":"complete","reason":null,
             "diff_bytes":1048576,"diff_blocks":16,"changed_blocks":16,"freeze_window_ms":12,
             "path":"/x/snapshots/7","blake3":null}"#,
        )
        .unwrap();
        assert_eq!(
            (row.diff_bytes, row.changed_blocks, row.freeze_window_ms),
            (1048576, Some(16), Some(12))
        );
        let st: Status = serde_json::from_str(
            r#"{"node":"n1","cluster":"demo","phase":"idle","in_flight":null,"future_field":3,
             "nodes":[{"node":"n2","connected":false,"phase":"frozen","snapshot":7,"writers":[{"name":"db","state":"frozen"}]}]}"#,
        )
        .unwrap();
        assert_eq!(st.nodes[0].writers[0].state, "frozen");
    }

    #[test]
    fn a_row_still_being_written_has_nulls_and_still_decodes() {
        let row: SnapshotRow = serde_json::from_str(
            r#"{"id":5,"created_ms":1,"initiator":null,"status":"open","diff_bytes":null,"changed_blocks":null,"path":null}"#,
        )
        .unwrap();
        assert_eq!(
            (row.initiator.as_str(), row.diff_bytes, row.path),
            ("", 0, None)
        );
    }

    #[test]
    fn progress_lines_are_told_apart_from_log_lines() {
        assert_eq!(
            parse_progress(r#"{"progress":{"done":5,"total":10,"unit":"bytes"}}"#),
            Some(Progress { done: 5, total: 10 })
        );
        assert_eq!(parse_progress("2026-11-22 INFO hashing"), None);
    }

    #[test]
    fn a_malformed_answer_names_the_request() {
        let err = decode::<Status>("status", serde_json::json!({"nodes": 3})).unwrap_err();
        assert!(err.to_string().contains("status"), "{err}");
    }
}
