//! A recorded 3-node snapshot and a demo backend that replays it.
//!
//! The recording is what a cluster of three nodes (n1 initiating; writers
//! postgres, kafka and redis) reports for one snapshot: the node and writer
//! phase events with their relative times, the report, the status before and
//! after, and a history of earlier snapshots. The kittest tests feed it
//! through a fake backend; `FREEZEFRAME_CONSOLE_DEMO=1 freezeframe console`
//! runs the real window on it (for screenshots and for trying the console
//! without a cluster): a snapshot every few seconds and whenever Take snapshot
//! is clicked, verify and backup with simulated progress.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backend::{FakeBackend, Request};
use crate::model::{JobKind, Link, Update};
use crate::wire::{
    Edge, Failure, NodeReport, NodeStatus, PhaseEvent, PhaseSpan, Progress, Report, SnapshotRow,
    Status, WriterStatus,
};

/// The demo cluster's nodes and the one writer on each.
pub const NODES: [(&str, &str); 3] = [("n1", "postgres"), ("n2", "kafka"), ("n3", "redis")];

/// (node, writer, phase, edge, ms after the first event) of a complete snapshot.
/// The writers take their time to flush (a database checkpoint is not instant);
/// the initiator commits once every node is frozen.
const RECORDING: &[(&str, Option<&str>, &str, Edge, u64)] = {
    use Edge::{Enter as In, Exit as Out};
    &[
        ("n1", None, "freezing", In, 0),
        ("n1", Some("postgres"), "freezing", In, 0),
        ("n2", None, "freezing", In, 3),
        ("n2", Some("kafka"), "freezing", In, 3),
        ("n3", None, "freezing", In, 4),
        ("n3", Some("redis"), "freezing", In, 4),
        ("n2", Some("kafka"), "freezing", Out, 310),
        ("n2", None, "freezing", Out, 310),
        ("n2", None, "frozen", In, 310),
        ("n1", Some("postgres"), "freezing", Out, 420),
        ("n3", Some("redis"), "freezing", Out, 560),
        ("n3", None, "freezing", Out, 560),
        ("n3", None, "frozen", In, 560),
        ("n1", None, "freezing", Out, 563),
        ("n1", None, "committing", In, 563),
        ("n1", None, "committing", Out, 640),
        ("n1", None, "post_snapshot", In, 640),
        ("n1", Some("postgres"), "post_snapshot", In, 640),
        ("n2", None, "frozen", Out, 643),
        ("n2", None, "post_snapshot", In, 643),
        ("n2", Some("kafka"), "post_snapshot", In, 643),
        ("n3", None, "frozen", Out, 644),
        ("n3", None, "post_snapshot", In, 644),
        ("n3", Some("redis"), "post_snapshot", In, 644),
        ("n2", Some("kafka"), "post_snapshot", Out, 700),
        ("n1", Some("postgres"), "post_snapshot", Out, 760),
        ("n3", Some("redis"), "post_snapshot", Out, 820),
        ("n1", None, "post_snapshot", Out, 822),
        ("n1", None, "thawing", In, 822),
        ("n1", Some("postgres"), "thawing", In, 822),
        ("n2", None, "post_snapshot", Out, 825),
        ("n2", None, "thawing", In, 825),
        ("n2", Some("kafka"), "thawing", In, 825),
        ("n3", None, "post_snapshot", Out, 826),
        ("n3", None, "thawing", In, 826),
        ("n3", Some("redis"), "thawing", In, 826),
        ("n2", Some("kafka"), "thawing", Out, 870),
        ("n2", None, "thawing", Out, 871),
        ("n2", None, "done", In, 871),
        ("n1", Some("postgres"), "thawing", Out, 900),
        ("n1", None, "thawing", Out, 901),
        ("n1", None, "done", In, 901),
        ("n3", Some("redis"), "thawing", Out, 950),
        ("n3", None, "thawing", Out, 951),
        ("n3", None, "done", In, 951),
    ]
};

/// First writer frozen (kafka, 310) to last writer thawed (redis, 950).
pub const FREEZE_WINDOW_MS: u64 = 640;

fn event(id: u64, t0: u64, scale: u64, e: &(&str, Option<&str>, &str, Edge, u64)) -> PhaseEvent {
    PhaseEvent {
        snapshot: id,
        node: e.0.into(),
        phase: e.2.into(),
        edge: e.3,
        at_ms: t0 + e.4 * scale,
        writer: e.1.map(String::from),
        reason: None,
    }
}

/// The events of a complete snapshot `id` starting at `t0`, times stretched by `scale`.
pub fn complete_events(id: u64, t0: u64, scale: u64) -> Vec<PhaseEvent> {
    RECORDING.iter().map(|e| event(id, t0, scale, e)).collect()
}

/// The snapshot where node n3 dies while its writer flushes: everything up to
/// n3's freeze, then n1 and n2 give up after n3's connection drops and abort.
pub fn n3_killed_events(id: u64, t0: u64) -> Vec<PhaseEvent> {
    let mut v: Vec<PhaseEvent> = RECORDING
        .iter()
        .filter(|e| e.4 <= 420)
        .map(|e| event(id, t0, 1, e))
        .collect();
    use Edge::{Enter, Exit};
    for (node, writer, phase, edge, at) in [
        ("n1", None, "freezing", Exit, 1500),
        ("n1", None, "aborted", Enter, 1500),
        ("n2", None, "frozen", Exit, 1502),
        ("n2", None, "aborted", Enter, 1502),
    ] {
        v.push(event(id, t0, 1, &(node, writer, phase, edge, at)));
    }
    v
}

/// The initiator's report for [`n3_killed_events`].
pub fn n3_killed_report(id: u64, t0: u64) -> Report {
    Report {
        id,
        status: "failed".into(),
        error: Some(Failure {
            node: "n3".into(),
            writer: None,
            phase: "freezing".into(),
            reason: "peer n3 disconnected (connection lost)".into(),
        }),
        initiator: "n1".into(),
        requested_ms: t0,
        finished_ms: t0 + 1502,
        freeze_window_ms: None,
        io_hold_ms: None,
        nodes: Vec::new(),
    }
}

/// The initiator's report for [`complete_events`].
pub fn complete_report(id: u64, t0: u64, scale: u64) -> Report {
    let events = complete_events(id, t0, scale);
    let nodes = NODES
        .iter()
        .map(|(n, _)| {
            let mine: Vec<&PhaseEvent> = events
                .iter()
                .filter(|e| e.node == *n && e.writer.is_none())
                .collect();
            let phases = mine
                .iter()
                .filter(|e| e.edge == Edge::Enter)
                .filter_map(|enter| {
                    let exit = mine
                        .iter()
                        .find(|x| x.edge == Edge::Exit && x.phase == enter.phase)?;
                    Some(PhaseSpan {
                        name: enter.phase.clone(),
                        start_ms: enter.at_ms,
                        end_ms: exit.at_ms,
                    })
                })
                .collect();
            NodeReport {
                node: (*n).into(),
                phases,
            }
        })
        .collect();
    Report {
        id,
        status: "complete".into(),
        error: None,
        initiator: "n1".into(),
        requested_ms: t0,
        finished_ms: t0 + 951 * scale,
        freeze_window_ms: Some(FREEZE_WINDOW_MS * scale),
        io_hold_ms: Some(77 * scale),
        nodes,
    }
}

/// The cluster at rest; `down` lists nodes that are unreachable.
pub fn status(down: &[&str]) -> Status {
    let nodes = NODES
        .iter()
        .map(|(n, w)| NodeStatus {
            node: (*n).into(),
            connected: !down.contains(n),
            phase: "idle".into(),
            snapshot: None,
            writers: vec![WriterStatus {
                name: (*w).into(),
                state: "idle".into(),
            }],
        })
        .collect();
    Status {
        node: "n1".into(),
        cluster: "demo".into(),
        mounted: true,
        phase: "idle".into(),
        nodes,
        ..Status::default()
    }
}

/// A snapshot row as the node would list it (initiated by n1, like the recording).
pub fn row(id: u64, created_ms: u64, freeze_window_ms: u64) -> SnapshotRow {
    SnapshotRow {
        initiator: "n1".into(),
        ..history_row(id, created_ms, freeze_window_ms)
    }
}

/// An earlier snapshot; the initiator rotates, as it does when operators use several nodes.
fn history_row(id: u64, created_ms: u64, freeze_window_ms: u64) -> SnapshotRow {
    // Varying but repeatable sizes: a busy database changes more between snapshots.
    let blocks = 40 + (id * 37) % 90;
    SnapshotRow {
        id,
        created_ms,
        initiator: NODES[(id as usize) % 3].0.into(),
        status: "complete".into(),
        reason: None,
        diff_bytes: blocks * 65_536,
        changed_blocks: Some(blocks),
        freeze_window_ms: Some(freeze_window_ms),
        path: Some(format!("/var/lib/freezeframe/n1/mnt/snapshots/{id}")),
        blake3: None,
    }
}

/// `n` earlier snapshots, a minute apart, ending before `now_ms`, with freeze
/// windows around the recording's, stretched by `scale` like the replay.
pub fn history(n: u64, now_ms: u64, scale: u64) -> Vec<SnapshotRow> {
    (1..=n)
        .map(|id| {
            let jitter = (id * 7919) % 260;
            history_row(
                id,
                now_ms.saturating_sub((n + 1 - id) * 60_000),
                (520 + jitter) * scale,
            )
        })
        .collect()
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the demo backend until the UI goes away: a snapshot every `period`
/// (and when asked), times stretched by `scale` so a person can watch them.
pub fn run(mut fake: FakeBackend, scale: u64, period: Duration) {
    let sink = fake.sink.clone();
    let start = wall_ms();
    let mut rows = history(12, start, scale);
    let mut next_id = rows.len() as u64 + 1;
    if !sink.send(Update::Link(Link::Connected)) {
        return;
    }
    sink.send(Update::Status(status(&[])));
    sink.send(Update::Snapshots(rows.clone()));
    // The first one once the window is surely up.
    let mut next_snapshot = Instant::now() + Duration::from_secs(4);
    loop {
        // Requests first; the UI's clicks must feel immediate.
        let mut take = false;
        for req in fake.take_requests() {
            match req {
                Request::TakeSnapshot => take = true,
                Request::Delete(id) => {
                    rows.retain(|r| r.id != id);
                    sink.send(Update::Deleted(id));
                    sink.send(Update::Snapshots(rows.clone()));
                }
                Request::Verify(id) => fake_job(&sink, JobKind::Verify, id),
                Request::Backup { id, .. } => fake_job(&sink, JobKind::Backup, id),
                Request::CancelJob => {}
                Request::OpenPath(p) => {
                    sink.send(Update::ShowPath(p));
                }
            }
        }
        if take || Instant::now() >= next_snapshot {
            let id = next_id;
            next_id += 1;
            let t0 = wall_ms();
            for ev in complete_events(id, t0, scale) {
                let wait = ev.at_ms.saturating_sub(wall_ms());
                std::thread::sleep(Duration::from_millis(wait));
                if !sink.send(Update::Event(ev)) {
                    return;
                }
            }
            rows.push(row(id, t0, FREEZE_WINDOW_MS * scale));
            if take {
                sink.send(Update::Report(complete_report(id, t0, scale)));
            }
            sink.send(Update::Status(status(&[])));
            if !sink.send(Update::Snapshots(rows.clone())) {
                return;
            }
            next_snapshot = Instant::now() + period;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Verify or backup with progress over about two seconds.
fn fake_job(sink: &crate::backend::UpdateSink, kind: JobKind, id: u64) {
    sink.send(Update::JobStarted { kind, id });
    let total = 1u64 << 30;
    for i in 1..=20u64 {
        std::thread::sleep(Duration::from_millis(100));
        sink.send(Update::JobProgress(Progress {
            done: total / 20 * i,
            total,
        }));
    }
    let outcome = match kind {
        JobKind::Verify => format!("Snapshot {id} verified: blake3 9f86d081884c7d65… over 1.0 GiB"),
        JobKind::Backup => format!("Snapshot {id} backed up"),
    };
    sink.send(Update::JobFinished {
        kind,
        id,
        outcome: Ok(outcome),
    });
}
