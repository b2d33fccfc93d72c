//! Regression scenarios for issue 11 ("the freeze promise under faults"),
//! one per case it lists, each in the seeded simulation (`protocol::sim`),
//! which models per-node clocks, a slow engine worker, restarts, pauses,
//! duplicated and replayed messages and the daemon's driver.
//!
//! # Deliberately broken variants and what catches them
//! Each was checked by breaking the guard locally, running, and reverting.
//! "Random seeds" is `protocol_sim::thousands_of_random_seeds_keep_every_promise`
//! (5,000 seeds of `Sim::random`), "near seeds" is
//! `protocol_sim::seeds_near_the_deadline_never_accept_an_unclean_create`
//! (2,000 seeds of `Sim::near_the_deadline`); either stops at its first
//! failing seed, within a second in a debug build.
//! 1. **Committing with no lease margin at all** (`commit_margin_ms = 0` in
//!    `Coordinator::new` and no completion check in
//!    `Coordinator::provider_returned`): caught at once by
//!    [`a_create_that_outlasts_a_remote_lease_is_not_kept`] (an accepted
//!    create during which n2 had let go), and by
//!    [`a_remote_lease_shorter_than_the_notice_bounds_the_commit`] and
//!    [`a_hook_freezing_close_to_the_lease_fails_the_snapshot_and_is_aborted_once`];
//!    random seeds from seed 2051 (3 of 5,000); near seeds from seed 342
//!    (4 of 2,000).
//! 2. **Accepting `Frozen` / `Done` / `PostSnapshot` for any snapshot id**
//!    (id checks removed in `ClusterService::peer_advanced`,
//!    `is_remote_from` and the `Frozen` arm of `peer_message`): caught at
//!    once by [`duplicated_and_replayed_messages_change_nothing`]; near
//!    seeds from seed 17 (23 of 2,000: a replayed `Frozen` of an earlier
//!    snapshot counted, creates accepted with a node not frozen, writers
//!    left without an outcome); random seed 4451 (1 of 5,000).
//! 3. **A remote whose lease runs 10 % short of what it grants**
//!    (`ClusterService::freeze_notice` starts the local run with
//!    `deadline = now + granted * 9 / 10` and still reports `granted_ms`):
//!    caught at once by
//!    [`a_create_late_in_the_lease_runs_while_every_remote_still_holds`]
//!    (the whole-create check), and on their outcomes by five more
//!    scenarios here; random seeds from seed 84 (7 of 5,000); near seeds
//!    from seed 18 (10 of 2,000).
//!    **150 ms short** (`granted - 150`): five scenarios here on their
//!    outcomes (among them
//!    [`a_create_that_outlasts_a_remote_lease_is_not_kept`]); random seeds
//!    from seed 426 (6 of 5,000); near seeds from seed 18 (13 of 2,000).
//!
//! # Limitations
//! - A node remembers the last snapshot it took part in only while it runs:
//!   after a restart, a replayed notice of an earlier snapshot runs again
//!   there until its lease (nothing else is harmed: the initiator is not in
//!   it any more). QUIC never replays.
//! - A node whose member list names no other real member snapshots alone;
//!   no message can tell it otherwise (configuration validation must).

use freezeframe_core::protocol::sim::{Behaviour, Clock, Sim, SimConfig};
use freezeframe_core::protocol::{EventKind, OnError, Phase, ReportStatus};

fn assert_clean(sim: &Sim) {
    assert!(
        sim.violations().is_empty(),
        "violations: {:#?}",
        sim.violations()
    );
}

/// The kinds of event writer `name` got for `snapshot`, in order.
fn kinds(sim: &Sim, name: &str, snapshot: u64) -> Vec<EventKind> {
    sim.writer_events(name)
        .into_iter()
        .filter(|e| e.0 == snapshot)
        .map(|e| e.1)
        .collect()
}

fn outcomes(sim: &Sim, name: &str, snapshot: u64) -> Vec<EventKind> {
    kinds(sim, name, snapshot)
        .into_iter()
        .filter(|k| matches!(k, EventKind::Abort | EventKind::Complete))
        .collect()
}

// ---- writers -------------------------------------------------------------------

#[test]
fn a_late_freeze_ack_after_the_timeout_gets_exactly_one_abort() {
    let config =
        SimConfig::cluster(2, 1).writer(1, 0, Behaviour::Slow(EventKind::Freeze), OnError::Fail);
    let mut sim = Sim::new(config, 1);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert_eq!(error.writer.as_deref(), Some("app2-1"));
    assert_eq!(outcomes(&sim, "app2-1", 1), vec![EventKind::Abort]);
    assert_eq!(outcomes(&sim, "app1-1", 1), vec![EventKind::Abort]);
}

#[test]
fn a_writer_registering_mid_run_is_left_out_told_registered_after_and_frozen_next_time() {
    let mut config = SimConfig::cluster(2, 1);
    config.writer_delay_ms = (50, 50);
    let mut sim = Sim::new(config, 2);
    let first = sim.request_at(0, 0);
    let late = freezeframe_core::protocol::sim::WriterSpec {
        name: "late".into(),
        on_error: OnError::Fail,
        behaviour: Behaviour::Good,
        freeze_timeout_ms: None,
    };
    sim.writer_join_at(1, 20, late);
    let second = sim.request_at(0, 4_000);
    sim.run();
    assert_clean(&sim);
    for req in [first, second] {
        assert_eq!(
            sim.report(req).map(|r| r.status),
            Some(ReportStatus::Complete)
        );
    }
    assert!(sim.writer_registered("late"));
    assert_eq!(
        kinds(&sim, "late", 1),
        vec![],
        "not frozen for the running one"
    );
    assert_eq!(
        kinds(&sim, "late", 2),
        vec![
            EventKind::Freeze,
            EventKind::PostSnapshot,
            EventKind::Thaw,
            EventKind::Complete
        ],
        "takes part in the next one"
    );
}

#[test]
fn a_frozen_writer_disconnecting_vetoes_the_snapshot() {
    let mut config = SimConfig::cluster(2, 2);
    config.writer_delay_ms = (10, 10);
    let mut sim = Sim::new(config, 3);
    let req = sim.request_at(0, 0);
    sim.writer_gone_at(1, 1, 18);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert_eq!(error.reason, "writer disconnected while frozen");
    assert!(sim.catalog().is_empty());
}

#[test]
fn a_hook_freezing_close_to_the_lease_fails_the_snapshot_and_is_aborted_once() {
    let config = SimConfig::cluster(2, 1).writer(1, 0, Behaviour::Hook(1_950), OnError::Fail);
    let mut sim = Sim::new(config, 4);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert!(error.reason.contains("too close to commit"), "{error:?}");
    assert_eq!(outcomes(&sim, "app2-1", 1), vec![EventKind::Abort]);
    assert!(sim.commits().is_empty(), "never committed");
}

// ---- the engine ---------------------------------------------------------------

#[test]
fn a_hold_that_completes_after_the_abort_is_released_at_once() {
    let mut config = SimConfig::cluster(2, 1);
    // Every engine action takes longer than the lease.
    config.slow_engine_per_mille = 1_000;
    config.slow_engine_ms = (2_500, 2_500);
    let mut sim = Sim::new(config, 5);
    let req = sim.request_at(0, 0);
    sim.run();
    // run() checks no node holds I/O at the end and none held it past its lease.
    assert_clean(&sim);
    assert_eq!(
        sim.report(req).map(|r| r.status),
        Some(ReportStatus::Failed)
    );
    for n in 0..2 {
        assert!(!sim.status(n).expect("node").io_held);
    }
}

// ---- thaw is not the outcome -----------------------------------------------------

#[test]
fn remote_writers_get_abort_after_thaw_when_the_initiators_post_snapshot_vetoes() {
    let mut config = SimConfig::cluster(3, 1).writer(
        0,
        0,
        Behaviour::Veto(EventKind::PostSnapshot),
        OnError::Fail,
    );
    config.writer_delay_ms = (0, 0);
    // The initiator's veto comes after the others thawed.
    config.delay_ms = (1, 1);
    let mut sim = Sim::new(config, 6);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    assert_eq!(
        sim.report(req).map(|r| r.status),
        Some(ReportStatus::Failed)
    );
    for w in ["app2-1", "app3-1"] {
        let k = kinds(&sim, w, 1);
        assert_eq!(outcomes(&sim, w, 1), vec![EventKind::Abort], "{w}: {k:?}");
        assert_eq!(k.last(), Some(&EventKind::Abort), "{w}: {k:?}");
    }
    assert!(sim.catalog().is_empty());
}

#[test]
fn every_writer_gets_abort_after_thaw_when_the_seal_fails() {
    let mut config = SimConfig::cluster(3, 1);
    config.seal_fails = true;
    let mut sim = Sim::new(config, 7);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert!(error.reason.contains("sealing"), "{error:?}");
    for w in ["app1-1", "app2-1", "app3-1"] {
        let k = kinds(&sim, w, 1);
        assert!(k.contains(&EventKind::Thaw), "{w}: {k:?}");
        assert_eq!(outcomes(&sim, w, 1), vec![EventKind::Abort], "{w}: {k:?}");
    }
    assert!(sim.catalog().is_empty(), "the unsealed snapshot is deleted");
}

// ---- a lost or stopped initiator ---------------------------------------------------

#[test]
fn initiator_killed_in_post_snapshot_survivors_delete_the_open_snapshot_within_lease_and_grace() {
    let mut config = SimConfig::cluster(3, 1);
    config.writer_delay_ms = (50, 50);
    // Nobody notices the crash: the lease and the grace alone decide.
    config.detect_ms = (1_000_000, 1_000_000);
    let mut sim = Sim::new(config, 8);
    sim.request_at(0, 0);
    // Committed by ~60 ms; the initiator's writer answers post-snapshot at ~110.
    sim.crash_at(0, 90);
    sim.run();
    assert_clean(&sim);
    assert!(sim.commits().iter().any(|c| c.accepted));
    assert!(sim.catalog().is_empty(), "the Open snapshot is deleted");
    let grace = freezeframe_core::protocol::cluster::OUTCOME_GRACE_MS;
    for w in ["app2-1", "app3-1"] {
        let e = sim.writer_events(w);
        let last = e.last().expect("events");
        assert_eq!(last.1, EventKind::Abort, "{w}: {e:?}");
        assert!(
            last.2 <= 2_000 + grace + 50,
            "{w} told at {} ms, not within lease + grace",
            last.2
        );
    }
}

#[test]
fn a_stopped_initiator_that_resumes_after_the_survivors_decided_fails_and_everyone_hears_abort() {
    let mut config = SimConfig::cluster(3, 1);
    config.writer_delay_ms = (50, 50);
    // Stopped shorter than the connection timeout: the others only have the lease.
    config.detect_ms = (10_000, 10_000);
    let mut sim = Sim::new(config, 9);
    let req = sim.request_at(0, 0);
    sim.pause_at(0, 90, 5_000);
    sim.run();
    assert_clean(&sim);
    let report = sim.report(req).expect("one report");
    assert_eq!(report.status, ReportStatus::Failed, "{report:#?}");
    assert!(
        sim.catalog().is_empty(),
        "nobody sealed what the survivors deleted"
    );
    for w in ["app1-1", "app2-1", "app3-1"] {
        assert_eq!(outcomes(&sim, w, 1), vec![EventKind::Abort], "{w}");
    }
}

#[test]
fn a_killed_initiator_that_reconnects_fast_is_seen_lost_at_once() {
    let mut config = SimConfig::cluster(3, 1);
    config.writer_delay_ms = (40, 40);
    // The old connection's timeout never fires: only the reconnect tells.
    config.detect_ms = (1_000_000, 1_000_000);
    let mut sim = Sim::new(config, 10);
    sim.request_at(0, 0);
    sim.crash_at(0, 30);
    sim.restart_at(0, 40);
    sim.run();
    assert_clean(&sim);
    for w in ["app2-1", "app3-1"] {
        let e = sim.writer_events(w);
        let abort = e
            .iter()
            .find(|e| e.0 == 1 && e.1 == EventKind::Abort)
            .expect("aborted");
        assert!(
            abort.2 <= 60,
            "{w} aborted at {} ms, not at the reconnect",
            abort.2
        );
    }
    assert!(
        sim.writer_registered("app1-1"),
        "its writer registered again"
    );
}

// ---- leases, clocks, timeouts ---------------------------------------------------------

#[test]
fn a_remote_lease_shorter_than_the_notice_bounds_the_commit() {
    let mut config = SimConfig::cluster(2, 1).writer(0, 0, Behaviour::Hook(950), OnError::Fail);
    config.node_lease_ms.insert(1, 1_000);
    let mut sim = Sim::new(config.clone(), 11);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert!(error.reason.contains("too close to commit"), "{error:?}");

    let config = config.writer(0, 0, Behaviour::Hook(300), OnError::Fail);
    let mut sim = Sim::new(config, 11);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    assert_eq!(
        sim.report(req).map(|r| r.status),
        Some(ReportStatus::Complete)
    );
}

#[test]
fn a_create_that_outlasts_a_remote_lease_is_not_kept() {
    let mut config = SimConfig::cluster(2, 1).writer(0, 0, Behaviour::Hook(800), OnError::Fail);
    config.node_lease_ms.insert(1, 1_000);
    // n2 holds from ~300 to ~1300; the create runs from ~800 to ~1500, and
    // n2's lease failure only reaches the initiator at ~1600.
    config.create_ms = Some((700, 700));
    config.delay_ms = (300, 300);
    let mut sim = Sim::new(config, 12);
    let req = sim.request_at(0, 0);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert!(error.reason.contains("not kept"), "{error:?}");
    assert!(sim.commits().iter().all(|c| !c.accepted));
    assert!(sim.catalog().is_empty());
}

#[test]
fn a_create_late_in_the_lease_runs_while_every_remote_still_holds() {
    let mut config = SimConfig::cluster(2, 1).writer(0, 0, Behaviour::Hook(1_700), OnError::Fail);
    // n2 holds from ~150 to ~2150 and the initiator counts on it until 2000;
    // the create runs from ~1700 to ~1963, just inside that (drift guard
    // included). A remote that let go 10 % early (at ~1950) would be
    // caught by the whole-create check: its failure arrives only at ~2100.
    config.create_ms = Some((260, 260));
    config.delay_ms = (150, 150);
    let mut sim = Sim::new(config, 13);
    sim.request_at(0, 0);
    sim.run();
    // run() checks every writer stayed frozen through the whole create.
    assert_clean(&sim);
    assert!(
        sim.commits().iter().any(|c| c.accepted),
        "the create was accepted (n2's done then comes after the lease, so the snapshot fails)"
    );
}

#[test]
fn skewed_and_drifting_clocks_keep_every_promise() {
    let mut config = SimConfig::cluster(3, 1).writer(1, 0, Behaviour::Hook(1_500), OnError::Fail);
    config.clocks = vec![
        Clock {
            offset_ms: 0,
            drift_ppm: 5_000,
        },
        Clock {
            offset_ms: 1 << 40,
            drift_ppm: -5_000,
        },
        Clock {
            offset_ms: 17,
            drift_ppm: 0,
        },
    ];
    config.create_ms = Some((150, 150));
    let mut sim = Sim::new(config, 14);
    let req = sim.request_at(2, 100);
    sim.run();
    assert_clean(&sim);
    assert_eq!(
        sim.report(req).map(|r| r.status),
        Some(ReportStatus::Complete)
    );
}

#[test]
fn the_request_timeout_is_named_in_the_failure() {
    let config =
        SimConfig::cluster(2, 1).writer(0, 0, Behaviour::Silent(EventKind::Freeze), OnError::Fail);
    let mut sim = Sim::new(config, 15);
    let req = sim.request_with_timeout_at(0, 0, 400);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert_eq!(
        error.reason,
        "the request's timeout of 400 ms expired in freezing waiting for writer app1-1"
    );
}

#[test]
fn the_request_timeout_is_named_when_a_remote_node_is_late() {
    let config =
        SimConfig::cluster(2, 1).writer(1, 0, Behaviour::Silent(EventKind::Freeze), OnError::Fail);
    let mut sim = Sim::new(config, 15);
    let req = sim.request_with_timeout_at(0, 0, 400);
    sim.run();
    assert_clean(&sim);
    let error = sim
        .report(req)
        .and_then(|r| r.error.clone())
        .expect("failed");
    assert_eq!(error.node, "n2");
    assert_eq!(
        error.reason,
        "node n2 did not report frozen before the request's timeout of 400 ms expired"
    );
}

// ---- membership and the wire -------------------------------------------------------

#[test]
fn diverging_member_lists_fail_with_member_lists_differ_and_never_complete() {
    let mut config = SimConfig::cluster(3, 1);
    config
        .node_members
        .insert(2, vec!["n1".into(), "n3".into()]);
    let mut sim = Sim::new(config, 16);
    let from_n1 = sim.request_at(0, 0);
    let from_n3 = sim.request_at(2, 5_000);
    sim.run();
    assert_clean(&sim);
    for req in [from_n1, from_n3] {
        let error = sim
            .report(req)
            .and_then(|r| r.error.clone())
            .expect("failed");
        assert!(error.reason.contains("member lists differ"), "{error:?}");
    }
    assert!(sim.catalog().is_empty());
}

#[test]
fn duplicated_and_replayed_messages_change_nothing() {
    let mut config = SimConfig::cluster(3, 1);
    config.dup_per_mille = 500;
    config.replay_per_mille = 500;
    let mut sim = Sim::new(config, 17);
    let reqs: Vec<_> = (0..4)
        .map(|k| sim.request_at(k % 3, k as u64 * 4_000))
        .collect();
    sim.run();
    assert_clean(&sim);
    for req in reqs {
        assert_eq!(
            sim.report(req).map(|r| r.status),
            Some(ReportStatus::Complete)
        );
    }
    let aborted = sim.phase_events().iter().any(|e| e.phase == Phase::Aborted);
    assert!(!aborted, "no replay disturbed a run");
}

#[test]
fn a_hold_reported_after_its_run_ended_is_not_taken_by_the_machine() {
    use freezeframe_core::protocol::{Config, Input, NodeMachine, Output};
    fn drain(m: &mut NodeMachine) -> Vec<Output> {
        std::iter::from_fn(|| m.poll_output())
            .filter(|o| !matches!(o, Output::Phase(_)))
            .collect()
    }
    let mut m = NodeMachine::new(Config::new("n1", &["n1"]), 0);
    let request = Input::Request {
        req: 1,
        snapshot: 3,
        timeout_ms: Some(1_000),
        excluded: vec![],
    };
    m.handle(request, 0);
    assert!(drain(&mut m).contains(&Output::HoldIo { snapshot: 3 }));
    // The engine is slow to take the hold; the deadline passes first.
    m.handle_timeout(1_000);
    assert!(drain(&mut m).contains(&Output::ReleaseIo { snapshot: 3 }));
    m.handle(Input::HoldDone { snapshot: 3 }, 1_200);
    assert_eq!(drain(&mut m), vec![], "no flush, no second hold");
    assert!(!m.status().io_held);
}
