//! The console window driven through its fake backend: widgets are found by
//! their accessible labels and clicked like an operator would, and the fake
//! backend plays the node (the recorded 3-node snapshot of `demo`).

use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;
use freezeframe_gui::demo;
use freezeframe_gui::model::{JobKind, Link, Update};
use freezeframe_gui::wire::Progress;
use freezeframe_gui::{BackendHandle, ConsoleApp, FakeBackend, Request};

const T0: u64 = 1_795_313_600_000;

/// A console connected to the demo cluster with `history` earlier snapshots,
/// in a 1280×800 window at `scale` pixels per point.
fn console(history: u64, scale: f32) -> (Harness<'static, ConsoleApp>, FakeBackend) {
    let (handle, fake) = BackendHandle::fake();
    let app = ConsoleApp::new(handle, "n1").with_clock(T0 + 60_000);
    fake.push(Update::Link(Link::Connected));
    fake.push(Update::Status(demo::status(&[])));
    fake.push(Update::Snapshots(demo::history(history, T0, 1)));
    let mut harness = Harness::builder()
        .with_size([1280.0, 800.0])
        .with_pixels_per_point(scale)
        .build_ui_state(|ui, app: &mut ConsoleApp| app.show(ui), app);
    settle(&mut harness);
    (harness, fake)
}

/// Lets a few frames pass (spinners and progress bars animate forever, so
/// `Harness::run` would never settle while a snapshot or job runs).
/// Each time, egui_kittest also checks that every input widget has an accessible name.
fn settle(h: &mut Harness<'_, ConsoleApp>) {
    h.run_steps(4);
    h.check_accessibility();
}

/// Whether the widget labelled `label` is greyed out.
fn disabled(h: &Harness<'_, ConsoleApp>, label: &str) -> bool {
    h.get_by_label(label).accesskit_node().is_disabled()
}

#[test]
fn take_snapshot_asks_the_node_and_every_node_reaches_done_on_the_timeline() {
    let (mut h, mut fake) = console(5, 1.0);
    h.get_by_label("Take snapshot").click();
    settle(&mut h);
    assert_eq!(fake.take_requests(), vec![Request::TakeSnapshot]);
    assert!(h.state().model.creating);
    assert!(
        disabled(&h, "Take snapshot"),
        "one snapshot at a time from this console"
    );

    for ev in demo::complete_events(6, T0, 1) {
        fake.push(Update::Event(ev));
    }
    fake.push(Update::Report(demo::complete_report(6, T0, 1)));
    let mut rows = demo::history(5, T0, 1);
    rows.push(demo::row(6, T0, demo::FREEZE_WINDOW_MS));
    fake.push(Update::Snapshots(rows));
    fake.push(Update::Status(demo::status(&[])));
    settle(&mut h);

    for node in ["n1", "n2", "n3"] {
        h.get_by_label(&format!("{node}: done"));
    }
    h.get_by_label("Snapshot 6 timeline");
    h.get_by_label("freeze window: 640 ms");
    h.get_by_label("n1 committing 77 ms");
    h.get_by_label("Verify snapshot 6");
    h.get_by_label("Snapshot 6 complete, freeze window 640 ms");
    assert!(!disabled(&h, "Take snapshot"));
}

#[test]
fn wait_for_returns_once_updates_from_another_thread_arrive() {
    let (mut h, fake) = console(1, 1.0);
    let pusher = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(100));
        for ev in demo::complete_events(2, T0, 1) {
            fake.push(Update::Event(ev));
        }
        fake
    });
    let all_done = |m: &freezeframe_gui::model::Model| {
        m.timeline(T0)
            .is_some_and(|t| t.tracks.len() == 3 && !t.running)
    };
    assert!(h
        .state_mut()
        .wait_for(std::time::Duration::from_secs(5), all_done));
    let _fake = pusher.join().unwrap();
    settle(&mut h);
    h.get_by_label("n2: done");
}

#[test]
fn a_killed_node_shows_as_the_failure_with_its_name() {
    let (mut h, mut fake) = console(3, 1.0);
    h.get_by_label("Take snapshot").click();
    settle(&mut h);
    assert_eq!(fake.take_requests(), vec![Request::TakeSnapshot]);
    for ev in demo::n3_killed_events(4, T0) {
        fake.push(Update::Event(ev));
    }
    fake.push(Update::Status(demo::status(&["n3"])));
    fake.push(Update::Report(demo::n3_killed_report(4, T0)));
    settle(&mut h);

    h.get_by_label_contains(
        "Snapshot 4 failed on node n3, in phase freezing: peer n3 disconnected",
    );
    h.get_by_label("n1: aborted");
    h.get_by_label("n2: aborted");
    h.get_by_label("n3: freezing");
    h.get_by_label("unreachable");
}

#[test]
fn an_unreachable_node_gets_a_plain_banner_and_snapshots_wait() {
    let (mut h, fake) = console(2, 1.0);
    fake.push(Update::Link(Link::Unreachable {
        reason: "cannot connect to /run/ff/n1/control.sock: Connection refused (os error 111)"
            .into(),
    }));
    settle(&mut h);
    h.get_by_label_contains(
        "node n1 unreachable: cannot connect to /run/ff/n1/control.sock: Connection refused (os error 111), retrying",
    );
    assert!(disabled(&h, "Take snapshot"));
    fake.push(Update::Link(Link::Connected));
    settle(&mut h);
    assert!(h
        .query_by_label_contains("unreachable: cannot connect")
        .is_none());
    assert!(!disabled(&h, "Take snapshot"));
}

#[test]
fn delete_asks_for_confirmation_first() {
    let (mut h, mut fake) = console(3, 1.0);
    h.get_by_label("Delete snapshot 2").click();
    settle(&mut h);
    assert_eq!(
        fake.take_requests(),
        vec![],
        "nothing is deleted before confirming"
    );
    h.get_by_label("Delete snapshot 2?");
    h.get_by_label("Keep it").click();
    settle(&mut h);
    assert!(h.query_by_label("Delete snapshot 2?").is_none());
    assert_eq!(fake.take_requests(), vec![]);

    h.get_by_label("Delete snapshot 2").click();
    settle(&mut h);
    h.get_by_label("Yes, delete").click();
    settle(&mut h);
    assert_eq!(fake.take_requests(), vec![Request::Delete(2)]);
    fake.push(Update::Deleted(2));
    settle(&mut h);
    h.get_by_label("Snapshot 2 deleted");
    assert!(h.query_by_label("Verify snapshot 2").is_none());
}

#[test]
fn back_up_waits_for_a_repository_then_runs_with_progress_and_cancel() {
    let (mut h, mut fake) = console(3, 1.0);
    assert!(disabled(&h, "Back up snapshot 3"), "no repository set yet");
    h.get_by_label("Backup repository").click();
    settle(&mut h);
    h.get_by_label("Backup repository").type_text("/backups/ff");
    settle(&mut h);
    assert_eq!(h.state().settings.repository, "/backups/ff");
    h.get_by_label("Back up snapshot 3").click();
    settle(&mut h);
    assert_eq!(
        fake.take_requests(),
        vec![Request::Backup {
            id: 3,
            repo: "/backups/ff".into()
        }]
    );
    assert!(
        disabled(&h, "Verify snapshot 1"),
        "one long operation at a time"
    );

    fake.push(Update::JobStarted {
        kind: JobKind::Backup,
        id: 3,
    });
    fake.push(Update::JobProgress(Progress {
        done: 3 << 20,
        total: 4 << 20,
    }));
    settle(&mut h);
    h.get_by_label_contains("Backing up snapshot 3: 75%");
    h.get_by_label("Cancel").click();
    settle(&mut h);
    assert_eq!(fake.take_requests(), vec![Request::CancelJob]);
    fake.push(Update::JobFinished {
        kind: JobKind::Backup,
        id: 3,
        outcome: Err("cancelled".into()),
    });
    settle(&mut h);
    h.get_by_label("Could not back up snapshot 3: cancelled");
    assert!(h.query_by_label("Cancel").is_none());
}

#[test]
fn open_mount_falls_back_to_the_path_with_a_copy_button() {
    let (mut h, mut fake) = console(2, 1.0);
    h.get_by_label("Open mount of snapshot 1").click();
    settle(&mut h);
    let path = "/var/lib/freezeframe/n1/mnt/snapshots/1".to_string();
    assert_eq!(fake.take_requests(), vec![Request::OpenPath(path.clone())]);
    fake.push(Update::ShowPath(path.clone()));
    settle(&mut h);
    h.get_by_label("Mounted snapshot");
    assert_eq!(
        h.query_all_by_label(&path).count(),
        2,
        "the path is in the table and in the dialog"
    );
    h.get_by_label("Copy path").click();
    h.step(); // the frame that handles the click carries the clipboard command
    assert!(
        h.output()
            .platform_output
            .commands
            .iter()
            .any(|c| matches!(c, egui::OutputCommand::CopyText(t) if *t == path)),
        "the path went to the clipboard"
    );
    h.get_by_label("Close").click();
    settle(&mut h);
    assert!(h.query_by_label("Copy path").is_none());
}

#[test]
fn at_200_percent_the_main_actions_stay_inside_the_window() {
    let (mut h, fake) = console(12, 2.0);
    for ev in demo::complete_events(13, T0, 1) {
        fake.push(Update::Event(ev));
    }
    settle(&mut h);
    let window = egui::Rect::from_min_size(egui::Pos2::ZERO, egui::vec2(1280.0, 800.0));
    for label in ["Take snapshot", "n1: done", "n3: done", "Backup repository"] {
        let r = h.get_by_label(label).rect();
        assert!(
            window.contains_rect(r),
            "{label} at {r:?} is outside the window"
        );
    }
}
