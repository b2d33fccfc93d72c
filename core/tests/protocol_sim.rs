//! The snapshot protocol in a seeded simulation of whole clusters: scenario
//! tests named after what they prove (grouped by seed 001's figures and
//! issue 3's failure semantics), then thousands of random seeds checked
//! against every promise (see `protocol::sim`), and a seed family driven to
//! the deadlines. Which deliberately broken variants these catch, and how
//! fast, is listed at the top of `protocol_regressions.rs`. A failing seed
//! prints its plan; rerun it alone with `FREEZEFRAME_SIM_SEED=<seed>`.

use freezeframe_core::protocol::sim::{node_name, Behaviour, Sim, SimConfig};
use freezeframe_core::protocol::{EventKind, OnError, Phase, Report, ReportStatus, WriterOutcome};

fn assert_clean(sim: &Sim) {
    assert!(
        sim.violations().is_empty(),
        "violations: {:#?}",
        sim.violations()
    );
}

fn phase_names(report: &Report, node: &str) -> Vec<Phase> {
    let n = report
        .nodes
        .iter()
        .find(|n| n.node == node)
        .expect("node in report");
    n.phases.iter().map(|p| p.name).collect()
}

// ---- figures 3 and 4: the whole protocol ------------------------------------

#[test]
fn happy_path_three_nodes_from_each_initiator_freezes_everyone_at_commit() {
    for initiator in 0..3 {
        let mut sim = Sim::new(SimConfig::cluster(3, 2), 11 + initiator as u64);
        let req = sim.request_at(initiator, 5);
        sim.run();
        assert_clean(&sim);
        let report = sim.report(req).expect("one report").clone();
        assert_eq!(report.status, ReportStatus::Complete, "{report:#?}");
        assert_eq!(report.initiator, node_name(initiator));
        assert_eq!(report.nodes.len(), 3);
        assert_eq!(
            report.nodes[0].node,
            node_name(initiator),
            "initiator first"
        );
        for n in &report.nodes {
            assert_eq!(n.writers.len(), 2, "every writer of {} reported", n.node);
            assert!(n
                .writers
                .iter()
                .all(|w| w.outcome == WriterOutcome::Thawed && w.frozen_ms.is_some()));
        }
        assert_eq!(
            phase_names(&report, &node_name(initiator)),
            vec![
                Phase::Freezing,
                Phase::Committing,
                Phase::PostSnapshot,
                Phase::Thawing,
                Phase::Done
            ]
        );
        for other in (0..3).filter(|o| *o != initiator) {
            assert_eq!(
                phase_names(&report, &node_name(other)),
                vec![
                    Phase::Freezing,
                    Phase::Frozen,
                    Phase::PostSnapshot,
                    Phase::Thawing,
                    Phase::Done
                ]
            );
        }
        let commit = &sim.commits()[0];
        assert!(
            commit.unfrozen.is_empty() && commit.unheld.is_empty(),
            "{commit:?}"
        );
        assert!(report.freeze_window_ms.is_some() && report.io_hold_ms.is_some());
        assert!(
            report.io_hold_ms <= report.freeze_window_ms,
            "I/O is held only inside the freeze window"
        );
        // The report is what `snapshot create --json` prints.
        let json = serde_json::to_value(&report).expect("report serializes");
        assert_eq!(json["status"], "complete");
        assert_eq!(json["nodes"][0]["phases"][0]["name"], "freezing");
        assert!(json.get("error").is_none());
    }
}

#[test]
fn single_node_cluster_snapshots_without_peers() {
    let mut sim = Sim::new(SimConfig::cluster(1, 3), 1);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    assert_eq!(
        sim.report(req).map(|r| r.status),
        Some(ReportStatus::Complete)
    );
    assert_eq!(sim.catalog().len(), 1);
}

#[test]
fn phase_events_mark_every_transition_with_node_and_time() {
    let mut sim = Sim::new(SimConfig::cluster(2, 1), 3);
    sim.request_at(1, 100);
    sim.run();
    assert_clean(&sim);
    let enters: Vec<(String, Phase)> = sim
        .phase_events()
        .iter()
        .filter(|e| e.writer.is_none() && e.edge == freezeframe_core::protocol::PhaseEdge::Enter)
        .map(|e| (e.node.clone(), e.phase))
        .collect();
    assert!(enters.contains(&("n2".into(), Phase::Committing)));
    assert!(enters.contains(&("n1".into(), Phase::Frozen)));
    assert!(sim.phase_events().iter().all(|e| e.at_ms >= 100));
    assert!(sim
        .phase_events()
        .iter()
        .any(|e| e.writer.as_deref() == Some("app1-1")));
}

// ---- failure semantics ------------------------------------------------------------

#[test]
fn veto_on_a_remote_node_aborts_everywhere_and_names_node_writer_phase() {
    let config =
        SimConfig::cluster(3, 1).writer(2, 0, Behaviour::Veto(EventKind::Freeze), OnError::Fail);
    let mut sim = Sim::new(config, 5);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    let report = sim.report(req).expect("one report");
    assert_eq!(report.status, ReportStatus::Failed);
    let error = report.error.as_ref().expect("error");
    assert_eq!(error.node, "n3");
    assert_eq!(error.writer.as_deref(), Some("app3-1"));
    assert_eq!(error.phase, Phase::Freezing);
    assert!(error.reason.contains("refuses freeze"), "{error:?}");
    assert!(sim.catalog().is_empty(), "nothing created");
    assert!(sim.commits().is_empty(), "never committed");
}

#[test]
fn veto_in_post_snapshot_deletes_the_created_snapshot() {
    let config = SimConfig::cluster(3, 1).writer(
        1,
        0,
        Behaviour::Veto(EventKind::PostSnapshot),
        OnError::Fail,
    );
    let mut sim = Sim::new(config, 6);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    let report = sim.report(req).expect("one report");
    let error = report.error.as_ref().expect("failed");
    assert_eq!(
        (error.node.as_str(), error.writer.as_deref(), error.phase),
        ("n2", Some("app2-1"), Phase::PostSnapshot)
    );
    assert_eq!(sim.commits().len(), 1, "the block snapshot was made");
    assert!(sim.catalog().is_empty(), "and deleted again");
}

#[test]
fn writer_that_never_answers_times_out_and_is_named() {
    let config =
        SimConfig::cluster(3, 2).writer(1, 1, Behaviour::Silent(EventKind::Freeze), OnError::Fail);
    let mut sim = Sim::new(config, 7);
    let req = sim.request_at(2, 0);
    sim.run();
    assert_clean(&sim);
    let report = sim.report(req).expect("one report");
    let error = report.error.as_ref().expect("failed");
    assert_eq!(
        (error.node.as_str(), error.writer.as_deref(), error.phase),
        ("n2", Some("app2-2"), Phase::Freezing)
    );
    assert!(
        error.reason.contains("no answer to freeze within 500 ms"),
        "{error:?}"
    );
    assert!(
        report.finished_ms < 500 + 100,
        "fails at the writer timeout, not the lease"
    );
}

#[test]
fn writer_disconnecting_while_it_owes_an_answer_fails_the_snapshot_at_once() {
    let config =
        SimConfig::cluster(2, 1).writer(1, 0, Behaviour::Silent(EventKind::Freeze), OnError::Fail);
    let mut sim = Sim::new(config, 19);
    let req = sim.request_at(0, 0);
    sim.writer_gone_at(1, 0, 50);
    sim.run();
    assert_clean(&sim);
    let report = sim.report(req).expect("one report");
    let error = report.error.as_ref().expect("failed");
    assert_eq!(
        (error.node.as_str(), error.writer.as_deref()),
        ("n2", Some("app2-1"))
    );
    assert_eq!(error.reason, "writer disconnected");
    assert!(report.finished_ms < 60, "not left to the timeout");
}

#[test]
fn writer_disconnecting_while_frozen_before_commit_fails_the_snapshot_naming_it() {
    // A writer that loses its node resumes by itself (writer protocol), so
    // the snapshot can no longer promise its data.
    let mut config = SimConfig::cluster(2, 2);
    config.writer_delay_ms = (10, 10);
    let mut sim = Sim::new(config, 20);
    let req = sim.request_at(0, 0);
    // Frozen by ~12 ms; post-snapshot not before ~24 ms.
    sim.writer_gone_at(1, 1, 18);
    sim.run();
    assert_clean(&sim);
    let report = sim.report(req).expect("one report");
    assert_eq!(report.status, ReportStatus::Failed, "{report:#?}");
    let error = report.error.clone().expect("error");
    assert_eq!(
        (error.node.as_str(), error.writer.as_deref(), error.phase),
        ("n2", Some("app2-2"), Phase::Frozen)
    );
    assert_eq!(error.reason, "writer disconnected while frozen");
    assert!(sim.catalog().is_empty(), "nothing kept");
}

#[test]
fn writer_disconnecting_after_the_commit_is_recorded_and_the_snapshot_completes() {
    let mut config = SimConfig::cluster(2, 2);
    config.writer_delay_ms = (10, 10);
    let mut sim = Sim::new(config, 20);
    let req = sim.request_at(0, 0);
    sim.run();
    let post = sim
        .phase_events()
        .iter()
        .find(|e| e.node == "n2" && e.phase == Phase::PostSnapshot && e.writer.is_none())
        .map(|e| e.at_ms)
        .expect("n2 reached post-snapshot");
    let mut sim = Sim::new(sim.config.clone(), 20);
    let req2 = sim.request_at(0, 0);
    assert_eq!(req, req2);
    // Its post-snapshot ack at +10, thaw sent then, its thaw ack due at +20.
    sim.writer_gone_at(1, 1, post + 15);
    sim.run();
    assert_clean(&sim);
    let report = sim.report(req2).expect("one report");
    assert_eq!(report.status, ReportStatus::Complete, "{report:#?}");
    let n2 = report.nodes.iter().find(|n| n.node == "n2").expect("n2");
    assert_eq!(
        n2.writers
            .iter()
            .find(|w| w.name == "app2-2")
            .map(|w| w.outcome),
        Some(WriterOutcome::Gone)
    );
}

#[test]
fn writer_allowed_to_continue_is_recorded_but_does_not_abort() {
    let config = SimConfig::cluster(2, 2)
        .writer(
            1,
            0,
            Behaviour::Silent(EventKind::Freeze),
            OnError::Continue,
        )
        .writer(0, 1, Behaviour::Veto(EventKind::Freeze), OnError::Continue);
    let mut sim = Sim::new(config, 8);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    let report = sim.report(req).expect("one report");
    assert_eq!(report.status, ReportStatus::Complete, "{report:#?}");
    let outcome = |node: &str, name: &str| {
        let n = report.nodes.iter().find(|n| n.node == node).expect("node");
        n.writers
            .iter()
            .find(|w| w.name == name)
            .expect("writer")
            .outcome
    };
    assert_eq!(outcome("n2", "app2-1"), WriterOutcome::TimedOut);
    assert_eq!(outcome("n1", "app1-2"), WriterOutcome::Vetoed);
    assert_eq!(outcome("n1", "app1-1"), WriterOutcome::Thawed);
}

#[test]
fn remote_crashed_while_frozen_fails_the_request_and_survivors_thaw() {
    let mut config = SimConfig::cluster(3, 1);
    // Slow post-snapshot on the initiator keeps everyone frozen for a while.
    config.writer_delay_ms = (50, 50);
    let mut sim = Sim::new(config, 9);
    let req = sim.request_at(0, 0);
    // n2 froze by ~55 ms; it dies before the initiator's post-snapshot.
    sim.crash_at(1, 120);
    sim.run();
    assert_clean(&sim);
    let report = sim.report(req).expect("one report");
    let error = report.error.as_ref().expect("failed");
    assert_eq!(error.node, "n2");
    assert!(
        error.reason.contains("lost connection to node n2"),
        "{error:?}"
    );
    assert!(sim.catalog().is_empty(), "no half snapshot stays");
    assert!(
        report.finished_ms <= 2_000 + 400,
        "within lease + detection"
    );
}

#[test]
fn initiator_crashed_after_others_froze_lets_them_abort_on_their_own() {
    let mut config = SimConfig::cluster(3, 1);
    config.writer_delay_ms = (40, 40);
    // Nobody notices the crash: the lease alone must release the others.
    config.detect_ms = (1_000_000, 1_000_000);
    let mut sim = Sim::new(config, 10);
    sim.request_at(0, 0);
    // The others got the freeze notice (≤ 5 ms) but their writers answer at 40 ms.
    sim.crash_at(0, 30);
    sim.run();
    // run() checks every freeze on a live node was followed by abort within
    // the lease, and that no live node still holds I/O.
    assert_clean(&sim);
    for n in 1..3 {
        let st = sim.status(n).expect("node");
        assert_eq!(st.phase, Phase::Aborted, "{st:?}");
        assert!(!st.io_held && !st.in_flight);
    }
}

#[test]
fn initiator_lost_by_peer_down_aborts_remote_nodes_at_once() {
    let mut config = SimConfig::cluster(3, 1);
    config.writer_delay_ms = (40, 40);
    config.detect_ms = (100, 100);
    let mut sim = Sim::new(config, 12);
    sim.request_at(0, 0);
    sim.crash_at(0, 30);
    sim.run();
    assert_clean(&sim);
    let last_abort = sim
        .phase_events()
        .iter()
        .filter(|e| e.phase == Phase::Aborted && e.node != "n1")
        .map(|e| e.at_ms)
        .max()
        .expect("remote nodes aborted");
    assert!(
        last_abort <= 30 + 100,
        "aborted when the loss was seen, not at the lease: {last_abort}"
    );
}

#[test]
fn partition_between_initiator_and_a_frozen_node_aborts_both_sides() {
    let mut config = SimConfig::cluster(3, 1);
    config.writer_delay_ms = (40, 40);
    config.detect_ms = (150, 150);
    let mut sim = Sim::new(config, 18);
    let req = sim.request_at(0, 0);
    // n3 has the notice (≤ 5 ms); the link breaks before anyone answers.
    sim.partition_at(0, 2, 20, 1_000);
    let later = sim.request_at(2, 3_000);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert_eq!(error.node, "n3");
    assert!(
        sim.catalog().keys().all(|id| *id != 1),
        "nothing of the failed attempt stays"
    );
    let n3_abort = sim
        .phase_events()
        .iter()
        .find(|e| e.node == "n3" && e.phase == Phase::Aborted)
        .map(|e| e.at_ms)
        .expect("n3 aborted by itself");
    assert!(
        n3_abort <= 20 + 150,
        "n3 let go when it lost the initiator: {n3_abort}"
    );
    // After the link heals the cluster snapshots again, from the other side.
    assert_eq!(
        sim.report(later).map(|r| r.status),
        Some(ReportStatus::Complete)
    );
}

#[test]
fn lost_messages_end_in_abort_by_lease_with_nothing_left_frozen() {
    let mut config = SimConfig::cluster(3, 1);
    config.drop_per_mille = 1000; // the freeze notices never arrive
    let mut sim = Sim::new(config, 13);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert!(
        error
            .reason
            .contains("did not report frozen before the lease of 2000 ms expired"),
        "{error:?}"
    );
    assert_eq!(error.phase, Phase::Freezing);
}

#[test]
fn provider_failure_aborts_and_names_the_initiator() {
    let mut config = SimConfig::cluster(2, 1);
    config.create_fails = true;
    let mut sim = Sim::new(config, 14);
    let req = sim.request_at(1, 0);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert_eq!(
        (error.node.as_str(), error.writer.as_deref(), error.phase),
        ("n2", None, Phase::Committing)
    );
    assert!(
        error.reason.contains("creating snapshot 1 failed"),
        "{error:?}"
    );
    assert!(sim.catalog().is_empty());
}

// ---- one snapshot in flight -----------------------------------------------------------

#[test]
fn second_request_on_the_same_node_is_busy_at_once() {
    let mut sim = Sim::new(SimConfig::cluster(3, 1), 15);
    let first = sim.request_at(0, 0);
    let second = sim.request_at(0, 3);
    sim.run();
    assert_clean(&sim);
    assert_eq!(
        sim.report(first).map(|r| r.status),
        Some(ReportStatus::Complete)
    );
    let busy = sim.report(second).expect("one report");
    assert!(busy.is_busy(), "{busy:?}");
    assert_eq!(busy.finished_ms, 3, "refused at once");
}

#[test]
fn request_on_a_node_frozen_for_another_initiator_is_busy() {
    let mut sim = Sim::new(SimConfig::cluster(3, 1), 16);
    let first = sim.request_at(0, 0);
    let second = sim.request_at(2, 20);
    sim.run();
    assert_clean(&sim);
    assert_eq!(
        sim.report(first).map(|r| r.status),
        Some(ReportStatus::Complete)
    );
    assert!(sim
        .report(second)
        .is_some_and(|r| r.is_busy() && r.finished_ms == 20));
}

#[test]
fn simultaneous_initiators_are_refused_busy_by_each_other() {
    let mut config = SimConfig::cluster(2, 1);
    config.delay_ms = (10, 10);
    // Without the driver's in-flight lock (which would refuse the second
    // request before its machine sees it), the machines refuse each other.
    config.in_flight_lock = false;
    let mut sim = Sim::new(config, 17);
    let a = sim.request_at(0, 0);
    let b = sim.request_at(1, 0);
    sim.run();
    assert_clean(&sim);
    for req in [a, b] {
        let r = sim.report(req).expect("one report");
        assert!(r.is_busy(), "{r:?}");
    }
    assert!(sim.catalog().is_empty());
}

#[test]
fn peer_messages_round_trip_as_json() {
    use freezeframe_core::protocol::PeerMessage;
    let msg = PeerMessage::FreezeNotice {
        snapshot: 4,
        initiator: "n1".into(),
        lease_ms: 10_000,
        members: vec!["n1".into(), "n2".into()],
    };
    let text = serde_json::to_string(&msg).expect("serialize");
    assert_eq!(
        text,
        r#"{"type":"freeze_notice","snapshot":4,"initiator":"n1","lease_ms":10000,"members":["n1","n2"]}"#
    );
    assert_eq!(
        serde_json::from_str::<PeerMessage>(&text).expect("parse"),
        msg
    );
    assert!(serde_json::from_str::<PeerMessage>(r#"{"type":"freeze_notice"}"#).is_err());
}

// ---- random seeds -------------------------------------------------------------------

#[test]
fn thousands_of_random_seeds_keep_every_promise() {
    use freezeframe_core::protocol::sim::ReqHandle;
    let seeds: u64 = std::env::var("FREEZEFRAME_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000);
    let only: Option<u64> = std::env::var("FREEZEFRAME_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let range = match only {
        Some(s) => s..s + 1,
        None => 0..seeds,
    };
    let (mut complete, mut failed, mut busy, mut commits, mut undone) = (0, 0, 0, 0, 0);
    for seed in range {
        let mut sim = Sim::random(seed);
        sim.run();
        assert!(
            sim.violations().is_empty(),
            "seed {seed} (rerun: FREEZEFRAME_SIM_SEED={seed}): {:#?}\n{}",
            sim.violations(),
            sim.describe()
        );
        let reports: Vec<&Report> = (0..8).filter_map(|h| sim.report(ReqHandle(h))).collect();
        complete += reports
            .iter()
            .filter(|r| r.status == ReportStatus::Complete)
            .count();
        failed += reports
            .iter()
            .filter(|r| r.status == ReportStatus::Failed)
            .count();
        busy += reports.iter().filter(|r| r.is_busy()).count();
        commits += sim.commits().len();
        undone += sim
            .commits()
            .iter()
            .filter(|c| !sim.catalog().contains_key(&c.snapshot))
            .count();
    }
    eprintln!("{seeds} seeds: {complete} complete, {failed} failed ({busy} busy), {commits} commits, {undone} deleted after commit");
    // The fault mix must leave every outcome well represented, or the seeds
    // prove little.
    if only.is_some() {
        return;
    }
    let n = seeds as usize;
    assert!(
        complete > n / 3,
        "only {complete} complete snapshots in {seeds} seeds"
    );
    assert!(
        failed > n / 10,
        "only {failed} failed snapshots in {seeds} seeds"
    );
    assert!(busy > n / 100, "only {busy} busy refusals in {seeds} seeds");
    assert!(
        undone > n / 100,
        "only {undone} snapshots deleted after commit in {seeds} seeds"
    );
}

/// Back-to-back snapshots driven to the edges the guards protect (hooks
/// freezing close to the lease, slow creates, shorter remote leases, skewed
/// and drifting clocks, duplicated and replayed messages) with no fault that
/// excuses an unclean create: every create the initiator accepts is clean.
#[test]
fn seeds_near_the_deadline_never_accept_an_unclean_create() {
    let seeds: u64 = std::env::var("FREEZEFRAME_SIM_NEAR_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let (mut accepted, mut refused) = (0, 0);
    for seed in 0..seeds {
        let mut sim = Sim::near_the_deadline(seed);
        sim.run();
        assert!(
            sim.violations().is_empty(),
            "near-the-deadline seed {seed}: {:#?}\n{}",
            sim.violations(),
            sim.describe()
        );
        accepted += sim.commits().iter().filter(|c| c.accepted).count();
        refused += sim.commits().iter().filter(|c| !c.accepted).count();
    }
    eprintln!("{seeds} near-the-deadline seeds: {accepted} creates accepted, {refused} refused");
    assert!(
        accepted > seeds as usize / 2,
        "too few accepted creates to prove anything"
    );
    assert!(
        refused > seeds as usize / 20,
        "the guards never had to refuse a create"
    );
}

#[test]
fn same_seed_same_run() {
    let run = |seed| {
        let mut sim = Sim::random(seed);
        sim.run();
        (
            sim.now(),
            sim.phase_events().to_vec(),
            sim.catalog().clone(),
        )
    };
    for seed in [1, 42, 999] {
        assert_eq!(run(seed), run(seed));
    }
}
