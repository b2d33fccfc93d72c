//! Issue 5: the desktop console against a real 3-node cluster, driven through
//! egui_kittest by the accessible labels a person (or a screen reader) sees.

mod common;

use std::time::Duration;

use common::*;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use freezeframe_gui::{BackendConfig, BackendHandle, ConsoleApp};

fn console(c: &Cluster, node: usize) -> Harness<'static, ConsoleApp> {
    let handle = BackendHandle::spawn(BackendConfig {
        control_socket: c.nodes[node].run_dir().join("control.sock"),
        node: c.nodes[node].name.clone(),
        freezeframe_exe: exe(),
        snapshot_timeout_ms: 30_000,
    })
    .expect("backend");
    let app = ConsoleApp::new(handle, &c.nodes[node].name);
    Harness::builder()
        .with_size([1280.0, 800.0])
        .build_ui_state(|ui, app: &mut ConsoleApp| app.show(ui), app)
}

#[test]
fn take_snapshot_shows_every_node_done_and_the_new_row() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    for i in 0..3 {
        c.start_writer(i, &format!("app-n{}", i + 1), i as u64 * (8 << 20), &[]);
    }
    let mut h = console(&c, 0);
    assert!(
        h.state_mut()
            .wait_for(Duration::from_secs(15), |m| m.nodes.len() == 3),
        "the console sees 3 nodes"
    );
    h.run_steps(4);
    h.get_by_label("Take snapshot").click();
    h.run_steps(4);
    assert!(
        h.state_mut()
            .wait_for(Duration::from_secs(30), |m| !m.creating),
        "the snapshot finished"
    );
    h.run_steps(6);
    for n in ["n1", "n2", "n3"] {
        h.get_by_label(&format!("{n}: done"));
    }
    let list = c.list(0);
    let id = list.last().expect("a snapshot")["id"].as_u64().expect("id");
    assert!(h.state_mut().wait_for(Duration::from_secs(5), |m| m
        .snapshots
        .iter()
        .any(|s| s.id == id)));
    h.run_steps(4);
    h.get_by_label(&format!("Delete snapshot {id}"));
}

#[test]
fn a_killed_node_is_named_in_the_failure() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    // n3's writer never answers, so n3 is frozen-in-progress when it dies.
    c.start_writer(2, "stuck-n3", 0, &["--silent"]);
    let mut h = console(&c, 0);
    assert!(h
        .state_mut()
        .wait_for(Duration::from_secs(15), |m| m.nodes.len() == 3));
    h.run_steps(4);
    h.get_by_label("Take snapshot").click();
    h.run_steps(4);
    std::thread::sleep(Duration::from_millis(500));
    c.kill(2);
    assert!(h
        .state_mut()
        .wait_for(Duration::from_secs(30), |m| !m.creating));
    h.run_steps(6);
    h.get_by_label_contains("failed on node n3");
}
