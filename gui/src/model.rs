//! The console's view of the cluster, built only from what the backend reports
//! (status snapshots, the phase event stream, snapshot lists, reports, job
//! progress). Pure: no I/O, no clock — the time is passed in — so every rule
//! here is tested without a window.
//!
//! Method groups, in the order the app uses them:
//! - [`Model::apply`] one [`Update`] from the backend;
//! - local intents the app records before asking the backend
//!   ([`Model::snapshot_requested`], [`Model::job_requested`]);
//! - views for the panels: [`Model::timeline`], [`Model::freeze_history`],
//!   [`Model::banner`], [`Model::row`].

use crate::palette::PhaseKind;
use crate::wire::{Edge, Failure, PhaseEvent, Progress, Report, SnapshotRow, Status};

/// How the console's own connection to its node stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// The first attempt has not finished yet.
    Connecting,
    Connected,
    /// The last attempt failed; the backend retries about every second.
    Unreachable {
        reason: String,
    },
}

/// The long operations the console runs as child processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Verify,
    Backup,
}

impl JobKind {
    pub fn verb(self) -> &'static str {
        match self {
            JobKind::Verify => "verify",
            JobKind::Backup => "back up",
        }
    }
}

/// Everything the backend reports. The fake backend of the tests and the demo
/// mode send the same values.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Link(Link),
    Status(Status),
    Snapshots(Vec<SnapshotRow>),
    Event(PhaseEvent),
    /// The answer to the snapshot the console asked for.
    Report(Report),
    /// The snapshot the console asked for could not even be reported (the node
    /// refused the request or the connection broke while waiting).
    SnapshotFailed(String),
    Deleted(u64),
    /// A request other than a snapshot failed; the text says which and why.
    ActionFailed(String),
    JobStarted {
        kind: JobKind,
        id: u64,
    },
    JobProgress(Progress),
    /// The child ended: `Ok(summary)` or `Err(why)`; a cancelled job ends `Err("cancelled")`.
    JobFinished {
        kind: JobKind,
        id: u64,
        outcome: Result<String, String>,
    },
    /// `xdg-open` is not available: show this path with a Copy button.
    ShowPath(String),
}

/// A writer (application) on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterView {
    pub name: String,
    pub state: String,
}

/// A node as the console shows it in the cluster view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub connected: bool,
    pub phase: String,
    pub snapshot: Option<u64>,
    pub writers: Vec<WriterView>,
}

/// One phase of one node on the timeline; `end_ms: None` while it lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bar {
    pub phase: PhaseKind,
    pub start_ms: u64,
    pub end_ms: Option<u64>,
}

/// One node's row on the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Track {
    pub node: String,
    pub bars: Vec<Bar>,
    /// The phase the node is in now for this snapshot (its last entered phase).
    pub current: Option<PhaseKind>,
}

/// The running or last snapshot laid out on one shared time axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeline {
    pub snapshot: u64,
    /// Axis origin (first event) and end (last event, or now while running), in ms.
    pub start_ms: u64,
    pub end_ms: u64,
    pub running: bool,
    pub tracks: Vec<Track>,
    /// First writer frozen to last writer thawed, when known.
    pub freeze_window: Option<(u64, u64)>,
    /// The failure with node, writer and phase, when the snapshot failed.
    pub failure: Option<FailureView>,
}

/// A failed snapshot: the whole failure from a report, or what the events
/// alone tell (which node aborted, in which phase) when another node initiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureView {
    pub node: String,
    pub writer: Option<String>,
    pub phase: String,
    pub reason: Option<String>,
}

impl FailureView {
    /// One sentence for the timeline: node, writer, phase, reason.
    pub fn sentence(&self, snapshot: u64) -> String {
        if self.reason.is_none() {
            let mut s = format!("Snapshot {snapshot} aborted, first on node {}", self.node);
            if let Some(w) = &self.writer {
                s.push_str(&format!(" (writer {w} had not answered)"));
            }
            s.push_str(&format!(
                ", in phase {}; the initiator's report has the reason",
                crate::palette::phase_label(&self.phase)
            ));
            return s;
        }
        let mut s = format!("Snapshot {snapshot} failed on node {}", self.node);
        if let Some(w) = &self.writer {
            s.push_str(&format!(", writer {w}"));
        }
        s.push_str(&format!(
            ", in phase {}",
            crate::palette::phase_label(&self.phase)
        ));
        if let Some(r) = &self.reason {
            s.push_str(&format!(": {r}"));
        }
        s
    }
}

impl From<&Failure> for FailureView {
    fn from(f: &Failure) -> Self {
        FailureView {
            node: f.node.clone(),
            writer: f.writer.clone(),
            phase: f.phase.clone(),
            reason: Some(f.reason.clone()),
        }
    }
}

/// The events and (when it came) the report of one snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotRun {
    pub id: u64,
    pub events: Vec<PhaseEvent>,
    pub report: Option<Report>,
}

/// A running long operation.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub kind: JobKind,
    pub snapshot: u64,
    pub progress: Option<Progress>,
}

impl JobView {
    /// 0.0–1.0, `None` before the first progress line.
    pub fn fraction(&self) -> Option<f32> {
        let p = self.progress?;
        Some(if p.total == 0 {
            1.0
        } else {
            (p.done as f64 / p.total as f64).clamp(0.0, 1.0) as f32
        })
    }
}

/// A one-line message under the toolbar (an action's result or failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub text: String,
    pub error: bool,
}

/// The cluster as the console sees it.
#[derive(Debug, Clone)]
pub struct Model {
    /// The node whose control socket the console uses (for the banner).
    pub node: String,
    pub link: Link,
    pub cluster: String,
    /// Sorted by name.
    pub nodes: Vec<NodeView>,
    pub run: Option<SnapshotRun>,
    /// Oldest first, as the node lists them.
    pub snapshots: Vec<SnapshotRow>,
    /// The console asked for a snapshot and waits for its report.
    pub creating: bool,
    pub job: Option<JobView>,
    pub notice: Option<Notice>,
    /// A mount path to show because it could not be opened.
    pub show_path: Option<String>,
}

impl Model {
    pub fn new(node: impl Into<String>) -> Model {
        Model {
            node: node.into(),
            link: Link::Connecting,
            cluster: String::new(),
            nodes: Vec::new(),
            run: None,
            snapshots: Vec::new(),
            creating: false,
            job: None,
            notice: None,
            show_path: None,
        }
    }

    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Link(link) => self.link = link,
            Update::Status(s) => self.apply_status(s),
            Update::Snapshots(rows) => self.snapshots = rows,
            Update::Event(ev) => self.apply_event(ev),
            Update::Report(r) => self.apply_report(r),
            Update::SnapshotFailed(why) => {
                self.creating = false;
                self.notice = Some(Notice {
                    text: format!("Snapshot failed: {why}"),
                    error: true,
                });
            }
            Update::Deleted(id) => {
                self.snapshots.retain(|r| r.id != id);
                self.notice = Some(Notice {
                    text: format!("Snapshot {id} deleted"),
                    error: false,
                });
            }
            Update::ActionFailed(text) => self.notice = Some(Notice { text, error: true }),
            Update::JobStarted { kind, id } => {
                self.job = Some(JobView {
                    kind,
                    snapshot: id,
                    progress: None,
                })
            }
            Update::JobProgress(p) => {
                if let Some(j) = &mut self.job {
                    j.progress = Some(p);
                }
            }
            Update::JobFinished { kind, id, outcome } => {
                self.job = None;
                self.notice = Some(match outcome {
                    Ok(summary) => Notice {
                        text: summary,
                        error: false,
                    },
                    Err(why) => Notice {
                        text: format!("Could not {} snapshot {id}: {why}", kind.verb()),
                        error: true,
                    },
                });
            }
            Update::ShowPath(p) => self.show_path = Some(p),
        }
    }

    /// The app asked the backend for a snapshot.
    pub fn snapshot_requested(&mut self) {
        self.creating = true;
        self.notice = None;
    }

    /// The app asked the backend for a long operation; shown at once, before the child starts.
    pub fn job_requested(&mut self, kind: JobKind, id: u64) {
        self.job = Some(JobView {
            kind,
            snapshot: id,
            progress: None,
        });
        self.notice = None;
    }

    /// The snapshot row with this id.
    pub fn row(&self, id: u64) -> Option<&SnapshotRow> {
        self.snapshots.iter().find(|r| r.id == id)
    }

    /// The plain sentence for the banner while the node cannot be reached.
    pub fn banner(&self) -> Option<String> {
        match &self.link {
            Link::Unreachable { reason } => Some(format!(
                "node {} unreachable: {reason}, retrying",
                self.node
            )),
            _ => None,
        }
    }

    fn apply_status(&mut self, s: Status) {
        self.cluster = s.cluster.clone();
        let mut nodes: Vec<NodeView> = s
            .nodes
            .iter()
            .map(|n| NodeView {
                name: n.node.clone(),
                connected: n.connected,
                phase: n.phase.clone(),
                snapshot: n.snapshot,
                writers: n
                    .writers
                    .iter()
                    .map(|w| WriterView {
                        name: w.name.clone(),
                        state: w.state.clone(),
                    })
                    .collect(),
            })
            .collect();
        // A node that lists no cluster still shows itself.
        if !nodes.iter().any(|n| n.name == s.node) {
            nodes.push(NodeView {
                name: s.node.clone(),
                connected: true,
                phase: s.phase.clone(),
                snapshot: s.in_flight,
                writers: s
                    .writers
                    .iter()
                    .map(|w| WriterView {
                        name: w.name.clone(),
                        state: w.state.clone(),
                    })
                    .collect(),
            });
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        self.nodes = nodes;
    }

    fn apply_event(&mut self, ev: PhaseEvent) {
        match &self.run {
            Some(run) if ev.snapshot < run.id => return, // a late event of an older snapshot
            Some(run) if ev.snapshot == run.id => {}
            _ => {
                self.run = Some(SnapshotRun {
                    id: ev.snapshot,
                    events: Vec::new(),
                    report: None,
                })
            }
        }
        // The status refresh that follows is authoritative; this keeps the view
        // live between refreshes.
        if let Some(node) = self.nodes.iter_mut().find(|n| n.name == ev.node) {
            match (&ev.writer, ev.edge) {
                (None, Edge::Enter) => {
                    node.phase = ev.phase.clone();
                    node.snapshot = Some(ev.snapshot);
                }
                (Some(w), edge) => {
                    let state = match (PhaseKind::parse(&ev.phase), edge) {
                        (_, Edge::Enter) => ev.phase.clone(),
                        (PhaseKind::Freezing | PhaseKind::PostSnapshot, Edge::Exit) => {
                            "frozen".into()
                        }
                        (PhaseKind::Thawing, Edge::Exit) => "thawed".into(),
                        (_, Edge::Exit) => ev.phase.clone(),
                    };
                    if let Some(wv) = node.writers.iter_mut().find(|x| &x.name == w) {
                        wv.state = state;
                    }
                }
                (None, Edge::Exit) => {}
            }
        }
        if let Some(run) = &mut self.run {
            run.events.push(ev);
        }
    }

    fn apply_report(&mut self, r: Report) {
        self.creating = false;
        self.notice = Some(match &r.error {
            None => Notice {
                text: match r.freeze_window_ms {
                    Some(ms) => format!("Snapshot {} complete, freeze window {ms} ms", r.id),
                    None => format!("Snapshot {} complete", r.id),
                },
                error: false,
            },
            Some(f) => Notice {
                text: format!("Snapshot {} failed: {f}", r.id),
                error: true,
            },
        });
        match &mut self.run {
            Some(run) if run.id == r.id => run.report = Some(r),
            Some(run) if run.id > r.id => {}
            _ => {
                self.run = Some(SnapshotRun {
                    id: r.id,
                    events: Vec::new(),
                    report: Some(r),
                })
            }
        }
    }

    /// The running or last snapshot on a shared time axis; `now_ms` (wall
    /// clock, same scale as the events) stretches the bars still open.
    pub fn timeline(&self, now_ms: u64) -> Option<Timeline> {
        let run = self.run.as_ref()?;
        let mut tracks: Vec<Track> = Vec::new();
        let track = |tracks: &mut Vec<Track>, node: &str| -> usize {
            match tracks.iter().position(|t| t.node == node) {
                Some(i) => i,
                None => {
                    tracks.push(Track {
                        node: node.to_string(),
                        bars: Vec::new(),
                        current: None,
                    });
                    tracks.len() - 1
                }
            }
        };
        let mut events: Vec<&PhaseEvent> = run.events.iter().collect();
        events.sort_by_key(|e| e.at_ms); // stable: same-millisecond exit/enter keep their order
        for ev in events.iter().filter(|e| e.writer.is_none()) {
            let t = track(&mut tracks, &ev.node);
            let kind = PhaseKind::parse(&ev.phase);
            let bars = &mut tracks[t].bars;
            match ev.edge {
                Edge::Enter => {
                    // Entering a phase ends whatever was still open (a lost exit event).
                    if let Some(open) = bars.iter_mut().rev().find(|b| b.end_ms.is_none()) {
                        open.end_ms = Some(ev.at_ms);
                    }
                    let end =
                        matches!(kind, PhaseKind::Done | PhaseKind::Aborted).then_some(ev.at_ms);
                    bars.push(Bar {
                        phase: kind,
                        start_ms: ev.at_ms,
                        end_ms: end,
                    });
                    tracks[t].current = Some(kind);
                }
                Edge::Exit => {
                    if let Some(open) = bars
                        .iter_mut()
                        .rev()
                        .find(|b| b.phase == kind && b.end_ms.is_none())
                    {
                        open.end_ms = Some(ev.at_ms);
                    }
                }
            }
        }
        // Nodes the console heard no events from (it started late) come from the report.
        if let Some(r) = &run.report {
            for nr in &r.nodes {
                if tracks.iter().any(|t| t.node == nr.node) {
                    continue;
                }
                let t = track(&mut tracks, &nr.node);
                tracks[t].bars = nr
                    .phases
                    .iter()
                    .map(|p| Bar {
                        phase: PhaseKind::parse(&p.name),
                        start_ms: p.start_ms,
                        end_ms: Some(p.end_ms),
                    })
                    .collect();
                let end = if r.error.is_some() {
                    PhaseKind::Aborted
                } else {
                    PhaseKind::Done
                };
                tracks[t].bars.push(Bar {
                    phase: end,
                    start_ms: r.finished_ms,
                    end_ms: Some(r.finished_ms),
                });
                tracks[t].current = Some(end);
            }
        }
        if tracks.is_empty() {
            return None;
        }
        tracks.sort_by(|a, b| a.node.cmp(&b.node));

        let finished = |t: &Track| matches!(t.current, Some(PhaseKind::Done | PhaseKind::Aborted));
        // A node that went away mid-snapshot will never finish it; the snapshot is
        // over once every node still reachable has finished.
        let running = run.report.is_none()
            && tracks
                .iter()
                .any(|t| !finished(t) && !self.unreachable(&t.node));
        let starts = tracks
            .iter()
            .flat_map(|t| t.bars.iter().map(|b| b.start_ms));
        let start_ms = starts.min().unwrap_or(now_ms);
        let last_seen = tracks
            .iter()
            .flat_map(|t| t.bars.iter().map(|b| b.end_ms.unwrap_or(b.start_ms)))
            .chain(run.report.as_ref().map(|r| r.finished_ms))
            .max()
            .unwrap_or(start_ms);
        let end_ms = if running {
            last_seen.max(now_ms)
        } else {
            last_seen
        };

        let writer_edge = |phase: PhaseKind| {
            run.events
                .iter()
                .filter(move |e| {
                    e.writer.is_some()
                        && e.edge == Edge::Exit
                        && PhaseKind::parse(&e.phase) == phase
                })
                .map(|e| e.at_ms)
        };
        let freeze_window = match (
            writer_edge(PhaseKind::Freezing).min(),
            writer_edge(PhaseKind::Thawing).max(),
        ) {
            (Some(a), Some(b)) if b >= a => Some((a, b)),
            (Some(a), None) if running => Some((a, now_ms.max(a))),
            _ => None,
        };

        let failure = match run.report.as_ref().and_then(|r| r.error.as_ref()) {
            Some(f) => Some(FailureView::from(f)),
            None => self.failure_from_events(run, &tracks),
        };
        Some(Timeline {
            snapshot: run.id,
            start_ms,
            end_ms,
            running,
            tracks,
            freeze_window,
            failure,
        })
    }

    /// True when the last status says the node is not connected.
    fn unreachable(&self, node: &str) -> bool {
        self.nodes.iter().any(|n| n.name == node && !n.connected)
    }

    /// Without a report: a node that went away mid-snapshot if there is one,
    /// else the first node that aborted, and the phase it was in.
    fn failure_from_events(&self, run: &SnapshotRun, tracks: &[Track]) -> Option<FailureView> {
        if !tracks.iter().any(|t| t.current == Some(PhaseKind::Aborted)) {
            return None;
        }
        let finished = |t: &&Track| matches!(t.current, Some(PhaseKind::Done | PhaseKind::Aborted));
        if let Some(gone) = tracks
            .iter()
            .find(|t| !finished(t) && self.unreachable(&t.node))
        {
            return Some(FailureView {
                node: gone.node.clone(),
                writer: None,
                phase: gone
                    .current
                    .map(|p| p.label().replace('-', "_"))
                    .unwrap_or_else(|| "idle".into()),
                reason: Some("the node became unreachable during the snapshot".into()),
            });
        }
        let first_abort = tracks
            .iter()
            .filter_map(|t| {
                let i = t.bars.iter().position(|b| b.phase == PhaseKind::Aborted)?;
                Some((t.bars[i].start_ms, t, i))
            })
            .min_by_key(|(at, _, _)| *at)?;
        let (_, t, i) = first_abort;
        let phase = if i > 0 {
            t.bars[i - 1].phase.label().replace('-', "_")
        } else {
            "idle".into()
        };
        // A writer that entered a phase and never left it is the likely culprit.
        let writer = run
            .events
            .iter()
            .filter(|e| e.node == t.node && e.writer.is_some() && e.edge == Edge::Enter)
            .filter(|enter| {
                !run.events.iter().any(|x| {
                    x.node == enter.node
                        && x.writer == enter.writer
                        && x.phase == enter.phase
                        && x.edge == Edge::Exit
                })
            })
            .find_map(|e| e.writer.clone());
        Some(FailureView {
            node: t.node.clone(),
            writer,
            phase,
            reason: None,
        })
    }

    /// `(snapshot id, freeze window ms)` of the last `n` snapshots that have one,
    /// oldest first; the running report counts before the list shows it.
    pub fn freeze_history(&self, n: usize) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .snapshots
            .iter()
            .filter_map(|r| r.freeze_window_ms.map(|ms| (r.id, ms)))
            .collect();
        if let Some(r) = self.run.as_ref().and_then(|run| run.report.as_ref()) {
            if let (Some(ms), None) = (r.freeze_window_ms, r.error.as_ref()) {
                if !v.iter().any(|(id, _)| *id == r.id) {
                    v.push((r.id, ms));
                }
            }
        }
        v.sort_by_key(|(id, _)| *id);
        let skip = v.len().saturating_sub(n);
        v.split_off(skip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo;

    const T0: u64 = 1_795_313_600_000;

    fn connected_cluster() -> Model {
        let mut m = Model::new("n1");
        m.apply(Update::Link(Link::Connected));
        m.apply(Update::Status(demo::status(&[])));
        m
    }

    fn feed(m: &mut Model, events: Vec<PhaseEvent>) {
        for e in events {
            m.apply(Update::Event(e));
        }
    }

    fn node<'a>(m: &'a Model, name: &str) -> &'a NodeView {
        m.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("node in the model")
    }

    #[test]
    fn events_move_node_phases_and_writer_states_between_status_refreshes() {
        let mut m = connected_cluster();
        let events = demo::complete_events(9, T0, 1);
        // Up to the moment n3's writer has flushed and n1 commits.
        feed(
            &mut m,
            events
                .iter()
                .filter(|e| e.at_ms <= T0 + 563)
                .cloned()
                .collect(),
        );
        assert_eq!(node(&m, "n1").phase, "committing");
        assert_eq!(node(&m, "n2").phase, "frozen");
        assert_eq!(node(&m, "n3").snapshot, Some(9));
        assert_eq!(
            node(&m, "n2").writers[0].state,
            "frozen",
            "kafka acked freeze"
        );
        feed(
            &mut m,
            events.into_iter().filter(|e| e.at_ms > T0 + 563).collect(),
        );
        for n in ["n1", "n2", "n3"] {
            assert_eq!(node(&m, n).phase, "done");
        }
        assert_eq!(node(&m, "n3").writers[0].state, "thawed");
    }

    #[test]
    fn timeline_bars_follow_the_events_on_one_time_axis() {
        let mut m = connected_cluster();
        feed(&mut m, demo::complete_events(9, T0, 1));
        let t = m.timeline(T0 + 60_000).expect("a timeline");
        assert_eq!(
            (t.snapshot, t.start_ms, t.end_ms, t.running),
            (9, T0, T0 + 951, false)
        );
        let n1 = &t.tracks[0];
        assert_eq!(n1.node, "n1");
        let spans: Vec<(PhaseKind, u64, Option<u64>)> = n1
            .bars
            .iter()
            .map(|b| (b.phase, b.start_ms - T0, b.end_ms.map(|e| e - T0)))
            .collect();
        assert_eq!(
            spans,
            vec![
                (PhaseKind::Freezing, 0, Some(563)),
                (PhaseKind::Committing, 563, Some(640)),
                (PhaseKind::PostSnapshot, 640, Some(822)),
                (PhaseKind::Thawing, 822, Some(901)),
                (PhaseKind::Done, 901, Some(901)),
            ]
        );
        assert_eq!(
            t.tracks[1].bars[1].phase,
            PhaseKind::Frozen,
            "n2 waits frozen while n1 commits"
        );
        assert_eq!(t.freeze_window, Some((T0 + 310, T0 + 950)));
        assert_eq!(
            t.freeze_window.map(|(a, b)| b - a),
            Some(demo::FREEZE_WINDOW_MS)
        );
        assert!(t
            .tracks
            .iter()
            .all(|tr| tr.current == Some(PhaseKind::Done)));
        assert_eq!(t.failure, None);
    }

    #[test]
    fn a_running_snapshot_stretches_its_open_bars_to_now() {
        let mut m = connected_cluster();
        feed(
            &mut m,
            demo::complete_events(9, T0, 1)
                .into_iter()
                .filter(|e| e.at_ms <= T0 + 600)
                .collect(),
        );
        let t = m.timeline(T0 + 700).expect("a timeline");
        assert!(t.running);
        assert_eq!(t.end_ms, T0 + 700);
        let n1_open = t.tracks[0].bars.last().expect("bars");
        assert_eq!(
            (n1_open.phase, n1_open.end_ms),
            (PhaseKind::Committing, None)
        );
        assert_eq!(
            t.freeze_window,
            Some((T0 + 310, T0 + 700)),
            "the freeze window grows until the last thaw"
        );
    }

    #[test]
    fn a_failed_report_names_node_writer_and_phase() {
        let mut m = connected_cluster();
        m.snapshot_requested();
        feed(
            &mut m,
            demo::complete_events(4, T0, 1)
                .into_iter()
                .take(6)
                .collect(),
        );
        m.apply(Update::Report(Report {
            id: 4,
            status: "failed".into(),
            error: Some(Failure {
                node: "n2".into(),
                writer: Some("kafka".into()),
                phase: "freezing".into(),
                reason: "vetoed: log segment rolling".into(),
            }),
            initiator: "n1".into(),
            requested_ms: T0,
            finished_ms: T0 + 40,
            freeze_window_ms: None,
            io_hold_ms: None,
            nodes: Vec::new(),
        }));
        assert!(!m.creating);
        let t = m.timeline(T0 + 100).expect("a timeline");
        let f = t.failure.expect("a failure");
        assert_eq!(
            f.sentence(4),
            "Snapshot 4 failed on node n2, writer kafka, in phase freezing: vetoed: log segment rolling"
        );
        assert!(!t.running, "a report ends the snapshot");
        assert!(m
            .notice
            .as_ref()
            .is_some_and(|n| n.error && n.text.contains("node n2 writer kafka in freezing")));
    }

    #[test]
    fn without_a_report_a_node_that_went_away_is_named_as_the_failure() {
        let mut m = connected_cluster();
        feed(&mut m, demo::n3_killed_events(8, T0));
        m.apply(Update::Status(demo::status(&["n3"])));
        let t = m.timeline(T0 + 5_000).expect("a timeline");
        assert!(!t.running, "every reachable node has aborted");
        let f = t.failure.expect("a failure");
        assert_eq!((f.node.as_str(), f.phase.as_str()), ("n3", "freezing"));
        assert_eq!(t.tracks[0].current, Some(PhaseKind::Aborted));
    }

    #[test]
    fn the_banner_says_which_node_is_unreachable_and_goes_away_on_reconnect() {
        let mut m = connected_cluster();
        assert_eq!(m.banner(), None);
        m.apply(Update::Link(Link::Unreachable {
            reason: "cannot connect to /run/n1/control.sock: refused".into(),
        }));
        assert_eq!(
            m.banner().as_deref(),
            Some("node n1 unreachable: cannot connect to /run/n1/control.sock: refused, retrying")
        );
        assert_eq!(m.nodes.len(), 3, "the last known cluster stays visible");
        m.apply(Update::Link(Link::Connected));
        assert_eq!(m.banner(), None);
    }

    #[test]
    fn a_new_snapshot_replaces_the_timeline_and_late_events_of_the_old_one_are_ignored() {
        let mut m = connected_cluster();
        feed(&mut m, demo::complete_events(3, T0, 1));
        feed(
            &mut m,
            demo::complete_events(4, T0 + 10_000, 1)
                .into_iter()
                .take(2)
                .collect(),
        );
        feed(
            &mut m,
            demo::complete_events(3, T0, 1)
                .into_iter()
                .take(1)
                .collect(),
        );
        let t = m.timeline(T0 + 10_100).expect("a timeline");
        assert_eq!(t.snapshot, 4);
        assert_eq!(t.tracks.len(), 1);
        assert_eq!(t.start_ms, T0 + 10_000);
    }

    #[test]
    fn a_report_without_events_still_draws_every_node() {
        let mut m = connected_cluster();
        m.apply(Update::Report(demo::complete_report(5, T0, 1)));
        let t = m.timeline(T0).expect("a timeline");
        assert_eq!(
            t.tracks.iter().map(|t| t.node.as_str()).collect::<Vec<_>>(),
            ["n1", "n2", "n3"]
        );
        assert!(t
            .tracks
            .iter()
            .all(|tr| tr.current == Some(PhaseKind::Done)));
        assert_eq!(t.tracks[0].bars[0].phase, PhaseKind::Freezing);
    }

    #[test]
    fn freeze_history_keeps_the_last_snapshots_and_counts_a_fresh_report() {
        let mut m = connected_cluster();
        m.apply(Update::Snapshots(demo::history(12, T0, 1)));
        m.apply(Update::Report(demo::complete_report(13, T0, 1)));
        let h = m.freeze_history(5);
        assert_eq!(
            h.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [9, 10, 11, 12, 13]
        );
        assert_eq!(h.last(), Some(&(13, demo::FREEZE_WINDOW_MS)));
    }

    #[test]
    fn job_progress_and_outcome() {
        let mut m = connected_cluster();
        m.job_requested(JobKind::Verify, 2);
        assert_eq!(m.job.as_ref().and_then(|j| j.fraction()), None);
        m.apply(Update::JobProgress(Progress {
            done: 25,
            total: 100,
        }));
        assert_eq!(m.job.as_ref().and_then(|j| j.fraction()), Some(0.25));
        m.apply(Update::JobFinished {
            kind: JobKind::Verify,
            id: 2,
            outcome: Err("cancelled".into()),
        });
        assert!(m.job.is_none());
        assert_eq!(
            m.notice.as_ref().map(|n| n.text.as_str()),
            Some("Could not verify snapshot 2: cancelled")
        );
    }
}
