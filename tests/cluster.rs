//! Issue 3: cluster-wide application-consistent snapshots with real node
//! processes, real QUIC with mutual TLS on loopback and real writers.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const STRIDE: u64 = 8 << 20;

/// Every writer's region in the snapshot holds exactly the records it had
/// when it acknowledged freeze, as seen on `node`'s mount.
fn assert_consistent(
    c: &Cluster,
    id: u64,
    logs: &[(String, u64, std::path::PathBuf)],
    node: usize,
) {
    for (name, offset, log) in logs {
        let image = c.nodes[node].snapshot_image(id);
        let v = ff_json(&[
            "demo-check",
            "--image",
            image.to_str().expect("utf-8"),
            "--offset",
            &offset.to_string(),
            "--len",
            &REGION.to_string(),
            "--name",
            name,
            "--log",
            log.to_str().expect("utf-8"),
            "--snapshot",
            &id.to_string(),
        ]);
        assert_eq!(
            v["consistent"], true,
            "writer {name} in snapshot {id} on {}: {v}",
            c.nodes[node].name
        );
        assert!(
            v["records"].as_u64().is_some_and(|r| r > 0),
            "writer {name} had written nothing: {v}"
        );
    }
}

#[test]
fn snapshots_from_every_node_hold_exactly_what_each_writer_had_at_freeze() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    let mut logs = Vec::new();
    for i in 0..3 {
        let name = format!("app-n{}", i + 1);
        let off = i as u64 * STRIDE;
        let log = c.start_writer(i, &name, off, &[]);
        logs.push((name, off, log));
    }
    std::thread::sleep(Duration::from_millis(300));
    for initiator in 0..3 {
        let (ok, report) = c.create(initiator, &[]);
        assert!(
            ok,
            "snapshot from {} failed: {report}",
            c.nodes[initiator].name
        );
        assert_eq!(report["status"], "complete");
        assert_eq!(report["initiator"], c.nodes[initiator].name.as_str());
        let nodes = report["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 3, "every node reports: {report}");
        for n in nodes {
            let phases: Vec<&str> = n["phases"]
                .as_array()
                .expect("phases")
                .iter()
                .filter_map(|p| p["name"].as_str())
                .collect();
            assert!(
                phases.contains(&"post_snapshot") && phases.contains(&"thawing"),
                "{n}"
            );
            assert!(
                n["writers"]
                    .as_array()
                    .expect("writers")
                    .iter()
                    .all(|w| w["outcome"] == "thawed"),
                "{n}"
            );
        }
        let id = report["id"].as_u64().expect("id");
        for node in 0..3 {
            assert_consistent(&c, id, &logs, node);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let listed = c.list(0);
    assert_eq!(
        listed.iter().filter(|s| s["status"] == "complete").count(),
        3,
        "{listed:?}"
    );
}

/// A failed request: within lease + 2 s, every surviving writer got abort or
/// thaw (so it writes again), no new snapshot is in the catalog.
fn assert_failed_cleanly(
    c: &Cluster,
    survivors: &[usize],
    before: usize,
    report: &Value,
    started: Instant,
    lease: Duration,
) {
    assert_eq!(report["status"], "failed", "{report}");
    assert!(
        started.elapsed() <= lease + Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    let err = &report["error"];
    assert!(
        err["node"].is_string() && err["phase"].is_string() && err["reason"].is_string(),
        "{report}"
    );
    for &i in survivors {
        let v = ff_json(&["status", "--json", "--config", c.nodes[i].cfg()]);
        assert!(
            v["writers"]
                .as_array()
                .expect("writers")
                .iter()
                .all(|w| w["state"] != "frozen"),
            "a writer stayed frozen on {}: {v}",
            c.nodes[i].name
        );
    }
    let after = c.list(survivors[0]).len();
    assert_eq!(
        after, before,
        "a failed snapshot left something in the catalog"
    );
}

#[test]
fn a_vetoing_writer_aborts_the_snapshot_everywhere_and_names_itself() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    c.start_writer(0, "good-n1", 0, &[]);
    c.start_writer(1, "grumpy-n2", STRIDE, &["--veto"]);
    let before = c.list(0).len();
    let t = Instant::now();
    let (ok, report) = c.create(0, &[]);
    assert!(!ok);
    assert_eq!(report["error"]["node"], "n2", "{report}");
    assert_eq!(report["error"]["writer"], "grumpy-n2", "{report}");
    assert_eq!(report["error"]["phase"], "freezing", "{report}");
    assert_failed_cleanly(&c, &[0, 1, 2], before, &report, t, Duration::from_secs(4));
}

#[test]
fn a_writer_that_never_answers_times_out_and_aborts() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    c.start_writer(
        2,
        "silent-n3",
        0,
        &["--silent", "--freeze-timeout", "1500ms"],
    );
    c.start_writer(0, "good-n1", STRIDE, &[]);
    let before = c.list(0).len();
    let t = Instant::now();
    let (ok, report) = c.create(0, &[]);
    assert!(!ok);
    assert_eq!(report["error"]["node"], "n3", "{report}");
    assert_eq!(report["error"]["writer"], "silent-n3", "{report}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the writer's own 1.5 s timeout fires, not the lease"
    );
    assert_failed_cleanly(&c, &[0, 1, 2], before, &report, t, Duration::from_secs(4));
}

#[test]
fn a_failing_hook_vetoes_with_its_script_name() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let c = Cluster::start(ClusterOptions::default());
    let hook = c.nodes[1].dir().join("hooks.d/50-flush-db");
    std::fs::write(&hook, "#!/bin/sh\necho \"db is read-only\" >&2\nexit 1\n").expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let before = c.list(0).len();
    let t = Instant::now();
    let (ok, report) = c.create(0, &[]);
    assert!(!ok);
    assert_eq!(report["error"]["node"], "n2", "{report}");
    let reason = report["error"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("50-flush-db") && reason.contains("read-only"),
        "{report}"
    );
    assert_failed_cleanly(&c, &[0, 1, 2], before, &report, t, Duration::from_secs(4));
}

#[test]
fn killing_a_frozen_non_initiator_fails_the_snapshot_and_thaws_the_rest() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    c.start_writer(0, "app-n1", 0, &[]);
    // n3's writer never answers freeze, so n3 sits in freeze when we kill it.
    c.start_writer(2, "stuck-n3", STRIDE, &["--silent"]);
    let before = c.list(0).len();
    let cfg = c.nodes[0].config.clone();
    let t = Instant::now();
    let req = std::thread::spawn(move || {
        let out = ff(&[
            "snapshot",
            "create",
            "--json",
            "--config",
            cfg.to_str().expect("utf-8"),
        ]);
        serde_json::from_slice::<Value>(&out.stdout).expect("json report")
    });
    std::thread::sleep(Duration::from_millis(500));
    c.kill(2);
    let report = req.join().expect("request thread");
    assert_eq!(report["error"]["node"], "n3", "{report}");
    assert_failed_cleanly(&c, &[0, 1], before, &report, t, Duration::from_secs(4));
}

#[test]
fn killing_the_initiator_after_the_others_froze_makes_them_abort_by_themselves() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    let log2 = c.start_writer(1, "app-n2", 0, &[]);
    c.start_writer(2, "app-n3", STRIDE, &[]);
    // n1's own writer never answers, so n1 waits in freeze while n2 and n3 are frozen.
    c.start_writer(0, "stuck-n1", 2 * STRIDE, &["--silent"]);
    let before = c.list(1).len();
    let cfg = c.nodes[0].config.clone();
    let req = std::thread::spawn(move || {
        ff(&[
            "snapshot",
            "create",
            "--json",
            "--config",
            cfg.to_str().expect("utf-8"),
        ])
    });
    // Wait until n2's writer acknowledged freeze.
    wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&log2)
            .map(|s| !s.is_empty())
            .unwrap_or(false)
    });
    let t = Instant::now();
    c.kill(0);
    let _ = req.join();
    for i in [1, 2] {
        let cfg = c.nodes[i].cfg().to_string();
        wait_for(Duration::from_secs(4 + 2), || {
            let v = ff_json(&["status", "--json", "--config", &cfg]);
            v["writers"]
                .as_array()
                .is_some_and(|ws| ws.iter().all(|w| w["state"] != "frozen"))
        });
    }
    assert!(
        t.elapsed() <= Duration::from_secs(6),
        "survivors stayed frozen {:?}",
        t.elapsed()
    );
    assert_eq!(c.list(1).len(), before, "no half snapshot stays registered");
}

#[test]
fn a_second_request_while_one_is_in_flight_is_busy_at_once() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    c.start_writer(1, "slow-n2", 0, &["--silent"]);
    let cfg = c.nodes[0].config.clone();
    let first = std::thread::spawn(move || {
        ff(&[
            "snapshot",
            "create",
            "--json",
            "--config",
            cfg.to_str().expect("utf-8"),
        ])
    });
    std::thread::sleep(Duration::from_millis(400));
    let t = Instant::now();
    let (ok, report) = c.create(2, &[]);
    assert!(!ok);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "busy must be immediate, took {:?}",
        t.elapsed()
    );
    assert!(
        report["error"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("busy")),
        "{report}"
    );
    let _ = first.join();
}

#[test]
fn a_node_with_a_certificate_from_another_ca_cannot_join() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    // An impostor: a second cluster's n2 identity, using the real n2's address.
    let other = c.dir.path().join("other");
    let out = ff(&[
        "cluster",
        "init",
        other.to_str().expect("utf-8"),
        "--nodes",
        "3",
        "--size",
        "16MiB",
    ]);
    assert!(out.status.success());
    c.stop(1);
    let real = c.nodes[1].dir();
    for f in ["node.pem", "node.key"] {
        std::fs::copy(other.join("nodes/n2").join(f), real.join(f))
            .expect("copy impostor identity");
    }
    // The impostor trusts its own CA, as a real one would.
    let toml = std::fs::read_to_string(real.join("node.toml")).expect("toml");
    let toml = toml.replace(
        "ca_cert = \"../../ca.pem\"",
        &format!("ca_cert = {:?}", other.join("ca.pem")),
    );
    std::fs::write(real.join("node.toml"), toml).expect("write toml");
    c.start_node(1);
    std::thread::sleep(Duration::from_secs(3));
    let v = ff_json(&["status", "--json", "--config", c.nodes[0].cfg()]);
    let n2 = v["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .find(|p| p["node"] == "n2")
        .cloned()
        .expect("n2 listed");
    assert_eq!(n2["connected"], false, "impostor connected: {v}");
    let refused = |i: usize| {
        c.nodes[i]
            .log()
            .lines()
            .any(|l| l.contains("refused") && (l.contains("n2") || l.contains("certificate")))
    };
    assert!(
        refused(0) && refused(2),
        "n1 and n3 log the refusal of the impostor"
    );
    // The rest of the cluster still works.
    c.kill(1);
    let (_ok, report) = c.create(0, &["--timeout", "3s"]);
    assert_eq!(
        report["status"], "failed",
        "n2 is a member that is down: {report}"
    );
}

#[test]
fn garbage_and_oversized_frames_do_not_crash_a_node() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let c = Cluster::start(ClusterOptions::default());
    let toml = std::fs::read_to_string(&c.nodes[0].config).expect("toml");
    let listen = toml
        .lines()
        .find_map(|l| {
            l.strip_prefix("listen = ")
                .map(|s| s.trim_matches('"').to_string())
        })
        .expect("listen");
    // Raw UDP garbage at the QUIC port, and garbage / oversized lines on both local sockets.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..1200).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
        let _ = sock.send_to(&junk, &listen);
    }
    use std::io::Write;
    for s in ["control.sock", "writer.sock"] {
        let mut u =
            std::os::unix::net::UnixStream::connect(c.nodes[0].run_dir().join(s)).expect("connect");
        let _ = u.write_all(b"{not json\n\x00\xff\xfe\n");
        let big = vec![b'a'; 5 << 20];
        let _ = u.write_all(&big);
        let _ = u.write_all(b"\n");
    }
    std::thread::sleep(Duration::from_millis(300));
    let (ok, report) = c.create(0, &[]);
    assert!(ok, "node still serves after garbage: {report}");
}

#[test]
fn the_example_python_writer_takes_part_in_snapshots() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 needed)");
        return;
    }
    let c = Cluster::start(ClusterOptions::default());
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/example-writer.py");
    let n2 = &c.nodes[1];
    let mut child = std::process::Command::new("python3")
        .arg(&example)
        .arg("--socket")
        .arg(n2.run_dir().join("writer.sock"))
        .arg("--volume")
        .arg(n2.live())
        .args(["--offset", "0", "--name", "py-n2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    wait_for(Duration::from_secs(10), || {
        let v = ff_json(&["status", "--json", "--config", n2.cfg()]);
        v["writers"]
            .as_array()
            .is_some_and(|ws| ws.iter().any(|w| w["name"] == "py-n2"))
    });
    let (ok, report) = c.create(0, &[]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "{report}");
    let n2r = report["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == "n2")
        .cloned()
        .expect("n2");
    let w = n2r["writers"]
        .as_array()
        .expect("writers")
        .iter()
        .find(|w| w["name"] == "py-n2")
        .cloned()
        .expect("py-n2");
    assert_eq!(w["outcome"], "thawed", "{report}");
}

#[test]
fn the_example_python_writer_outlives_its_node_and_registers_again_when_it_returns() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE");
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/example-writer.py");
    let out = c.dir.path().join("py-n2.out");
    let n2 = &c.nodes[1];
    let mut child = std::process::Command::new("python3")
        .arg(&example)
        .arg("--socket")
        .arg(n2.run_dir().join("writer.sock"))
        .arg("--volume")
        .arg(n2.live())
        .args(["--offset", "0", "--name", "py-n2", "--retry", "0.2"])
        .stdout(std::fs::File::create(&out).expect("out"))
        .spawn()
        .expect("python3");
    let registered = |c: &Cluster| {
        let v = ff_json(&["status", "--json", "--config", c.nodes[1].cfg()]);
        v["writers"]
            .as_array()
            .is_some_and(|ws| ws.iter().any(|w| w["name"] == "py-n2"))
    };
    wait_for(Duration::from_secs(10), || registered(&c));
    c.kill(1);
    // It notices, stays alive and keeps trying.
    wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&out).is_ok_and(|s| s.contains(r#""state": "disconnected""#))
    });
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the example writer exited with its node"
    );
    c.start_node(1);
    c.wait_connected(Duration::from_secs(30));
    wait_for(Duration::from_secs(10), || registered(&c));
    let (ok, report) = c.create(0, &[]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "{report}");
    let log = std::fs::read_to_string(&out).expect("out");
    let id = report["id"].as_u64().expect("id");
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for kind in ["freeze", "thaw"] {
        assert!(
            events
                .iter()
                .any(|e| e["event"] == kind && e["snapshot"] == id),
            "no {kind} for snapshot {id} after re-registering:\n{log}"
        );
    }
}

#[test]
fn the_example_python_writer_resumes_by_itself_when_its_stopped_node_lets_the_lease_pass() {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE");
        return;
    }
    let c = Cluster::start(ClusterOptions::default());
    // n2's freeze takes a second (a hook), so the writer is holding while n2 is stopped.
    let hook = c.nodes[1].dir().join("hooks.d/20-slow-freeze");
    std::fs::write(&hook, "#!/bin/sh\n[ \"$1\" = freeze ] && sleep 1\nexit 0\n").expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/example-writer.py");
    let out = c.dir.path().join("py-n2.out");
    let n2 = &c.nodes[1];
    let mut child = std::process::Command::new("python3")
        .arg(&example)
        .arg("--socket")
        .arg(n2.run_dir().join("writer.sock"))
        .arg("--volume")
        .arg(n2.live())
        .args(["--offset", "0", "--name", "py-n2"])
        .stdout(std::fs::File::create(&out).expect("out"))
        .spawn()
        .expect("python3");
    wait_for(Duration::from_secs(10), || {
        let v = ff_json(&["status", "--json", "--config", n2.cfg()]);
        v["writers"]
            .as_array()
            .is_some_and(|ws| ws.iter().any(|w| w["name"] == "py-n2"))
    });
    let n1 = c.nodes[0].cfg().to_string();
    let request =
        std::thread::spawn(move || ff(&["snapshot", "create", "--json", "--config", &n1]));
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    wait_for(Duration::from_secs(5), || {
        lines().iter().any(|l| l["state"] == "holding")
    });
    let pid = n2.child.as_ref().expect("n2 runs").id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let lease_ms = lines()
        .iter()
        .find(|l| l["event"] == "freeze")
        .and_then(|l| l["lease_ms"].as_u64())
        .expect("freeze carries lease_ms");
    let resumed = std::panic::catch_unwind(|| {
        wait_for(Duration::from_millis(lease_ms + 1500), || {
            lines()
                .iter()
                .any(|l| l["state"] == "resumed" && l["why"] == "lease")
        })
    });
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let report = request.join().expect("request");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        resumed.is_ok(),
        "the writer still held writes {lease_ms} ms after freeze with its node stopped:\n{}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    assert!(
        !report.status.success(),
        "a snapshot around a stopped node cannot complete"
    );
}
