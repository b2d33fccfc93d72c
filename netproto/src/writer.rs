//! The writer protocol: how an application takes part in snapshots.
//!
//! Newline-delimited JSON on the node's writer socket (`run/writer.sock`).
//! The application registers once, then answers every event the node sends
//! with an ack or a veto. The full description with an example session is in
//! `docs/writer-protocol.md`; a complete client is `assets/example-writer.py`.
//!
//! ```text
//! app  → node  {"op":"register","name":"db","on_error":"fail","freeze_timeout_ms":5000}
//! node → app   {"event":"registered","writer":"db"}
//! node → app   {"event":"freeze","snapshot":7,"lease_ms":9980}
//! app  → node  {"op":"ack","event":"freeze","snapshot":7}
//! node → app   {"event":"post_snapshot","snapshot":7,"path":"/mnt/ff/snapshots/7/volume.img"}
//! app  → node  {"op":"ack","event":"post_snapshot","snapshot":7}
//! node → app   {"event":"thaw","snapshot":7}
//! app  → node  {"op":"ack","event":"thaw","snapshot":7}
//! node → app   {"event":"complete","snapshot":7}
//! ```
//! Every `freeze` is followed by exactly one outcome: `complete` or `abort`.
//! A writer that hears nothing within `lease_ms`, or loses its connection,
//! resumes writes by itself.

use serde::{Deserialize, Serialize};

/// Longest line a writer may send.
pub const MAX_WRITER_LINE: usize = 64 * 1024;

pub use freezeframe_core::protocol::{EventKind, OnError};

/// A line from the application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum WriterRequest {
    Register {
        name: String,
        #[serde(default)]
        on_error: OnError,
        #[serde(default)]
        freeze_timeout_ms: Option<u64>,
    },
    Ack {
        event: EventKind,
        snapshot: u64,
    },
    Veto {
        event: EventKind,
        snapshot: u64,
        reason: String,
    },
}

/// A line from the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WriterEvent {
    Registered {
        writer: String,
    },
    /// Flush and hold writes; resume by yourself after `lease_ms` (from
    /// receipt) if neither `thaw` nor `abort` came.
    Freeze {
        snapshot: u64,
        lease_ms: u64,
    },
    /// Resume writes (not the outcome).
    Thaw {
        snapshot: u64,
    },
    PostSnapshot {
        snapshot: u64,
        path: String,
    },
    /// Outcome: the snapshot failed or was deleted; resume writes.
    Abort {
        snapshot: u64,
        reason: String,
    },
    /// Outcome: the snapshot is sealed and kept.
    Complete {
        snapshot: u64,
    },
    /// This node is fenced off the volume: live writes fail (EIO) until an
    /// operator lifts the fence. Stop writing; no answer.
    Fenced {
        reason: String,
    },
    /// The last line was not understood; the connection stays open.
    Error {
        message: String,
    },
}

/// Parses one line from an application, with an error that says what is wrong.
pub fn parse_writer_line(line: &str) -> std::result::Result<WriterRequest, String> {
    if line.len() > MAX_WRITER_LINE {
        return Err(format!(
            "line of {} bytes is longer than {MAX_WRITER_LINE}",
            line.len()
        ));
    }
    serde_json::from_str(line).map_err(|e| format!("malformed writer message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_with_defaults_parses() {
        let r = parse_writer_line(r#"{"op":"register","name":"db"}"#).unwrap();
        assert_eq!(
            r,
            WriterRequest::Register {
                name: "db".into(),
                on_error: OnError::Fail,
                freeze_timeout_ms: None
            }
        );
    }

    #[test]
    fn veto_carries_reason() {
        let r = parse_writer_line(r#"{"op":"veto","event":"freeze","snapshot":3,"reason":"busy"}"#)
            .unwrap();
        assert_eq!(
            r,
            WriterRequest::Veto {
                event: EventKind::Freeze,
                snapshot: 3,
                reason: "busy".into()
            }
        );
    }

    #[test]
    fn garbage_and_unknown_ops_are_errors_not_panics() {
        assert!(parse_writer_line("{").is_err());
        assert!(parse_writer_line(r#"{"op":"explode"}"#).is_err());
        assert!(parse_writer_line(r#"{"op":"ack","event":"freeze"}"#).is_err());
    }

    #[test]
    fn events_serialize_as_documented() {
        let e = WriterEvent::PostSnapshot {
            snapshot: 7,
            path: "/m/snapshots/7/volume.img".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"post_snapshot","snapshot":7,"path":"/m/snapshots/7/volume.img"}"#
        );
    }

    #[test]
    fn freeze_carries_the_lease_and_outcomes_need_no_ack() {
        let e = WriterEvent::Freeze {
            snapshot: 7,
            lease_ms: 9_980,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"event":"freeze","snapshot":7,"lease_ms":9980}"#
        );
        let c = WriterEvent::Complete { snapshot: 7 };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"event":"complete","snapshot":7}"#
        );
    }
}
