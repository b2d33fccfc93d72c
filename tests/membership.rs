//! Membership and fencing with real node processes (DESIGN.md §9, promise 3):
//! a snapshot is never taken around a node that is attached to the volume.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

fn skip_without_fuse() -> bool {
    if !fuse_available() {
        eprintln!("SKIPPED: needs /dev/fuse and fusermount3");
        return true;
    }
    false
}

/// Writes a block through node `i`'s live mount and syncs it.
fn live_write(c: &Cluster, i: usize) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.nodes[i].live())?;
    f.write_all_at(&[0x5a; 4096], 1 << 20)?;
    f.sync_all()
}

#[test]
fn a_killed_node_blocks_snapshots_until_fenced_and_rejoins_after_unfence() {
    if skip_without_fuse() {
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    c.kill(2);
    wait_for(Duration::from_secs(15), || {
        let v = ff_json(&["status", "--json", "--config", c.nodes[0].cfg()]);
        v["peers"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["node"] == "n3" && p["connected"] == false)
        })
    });

    // n3 was killed, not stopped: it is still attached and might be writing.
    let (ok, r) = c.create(0, &[]);
    assert!(!ok, "a snapshot around an attached node: {r}");
    assert_eq!(r["error"]["node"], "n3", "{r}");
    let reason = r["error"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("attached") && reason.contains("freezeframe node fence n3"),
        "{reason}"
    );

    let f = ff_json(&[
        "node",
        "fence",
        "n3",
        "--reason",
        "host down for maintenance",
        "--json",
        "--config",
        c.nodes[1].cfg(),
    ]);
    assert_eq!(f["fenced"], "n3");
    let (ok, r) = c.create(0, &[]);
    assert!(ok, "fenced, n3 no longer blocks: {r}");
    assert_eq!(r["excluded"][0]["node"], "n3", "{r}");
    assert!(r["excluded"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("host down for maintenance"));
    let id = r["id"].as_u64().expect("id").to_string();
    let show = ff_json(&[
        "snapshot",
        "show",
        &id,
        "--json",
        "--config",
        c.nodes[1].cfg(),
    ]);
    assert_eq!(
        show["excluded"][0]["node"], "n3",
        "the manifest says so: {show}"
    );

    // Restarted, the fenced node cannot write until it is unfenced.
    c.start_node(2);
    c.wait_connected(Duration::from_secs(30));
    let e = live_write(&c, 2).expect_err("a fenced node's live write must fail");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let st = ff_json(&["status", "--json", "--config", c.nodes[0].cfg()]);
    assert!(st["attached"]["fenced"]["n3"].is_object(), "{st}");

    ff_json(&[
        "node",
        "unfence",
        "n3",
        "--json",
        "--config",
        c.nodes[0].cfg(),
    ]);
    live_write(&c, 2).expect("unfenced, n3 writes again");
    let (ok, r) = c.create(0, &[]);
    assert!(ok, "{r}");
    let nodes: Vec<&str> = r["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert!(nodes.contains(&"n3"), "n3 takes part again: {r}");
    assert!(r.get("excluded").is_none(), "{r}");
}

#[test]
fn an_attached_node_outside_the_member_list_fails_the_snapshot_naming_it() {
    if skip_without_fuse() {
        return;
    }
    let c = Cluster::start(ClusterOptions::default());
    // A host whose node was removed from the member list but still runs
    // with the volume attached: its record is in the shared state.
    let dir = c.cluster_dir().join("shared/volume.img.ffstate/attach");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let rec = serde_json::json!({
        "node": "n9", "host": "db9", "pid": 4242, "since_ms": now,
        "renewed_ms": now, "lease_ms": 4000
    });
    let mut f = std::fs::File::create(dir.join("n9.json")).expect("record");
    f.write_all(rec.to_string().as_bytes()).expect("write");
    drop(f);
    let (ok, r) = c.create(0, &[]);
    assert!(!ok, "{r}");
    assert_eq!(r["error"]["node"], "n9", "{r}");
    assert!(
        r["error"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not in this node's member list"),
        "{r}"
    );
    assert!(c.list(0).is_empty(), "nothing was taken");
}

#[test]
fn a_member_stopped_cleanly_is_left_out_and_named() {
    if skip_without_fuse() {
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    c.stop(2);
    let (ok, r) = c.create(0, &[]);
    assert!(
        ok,
        "routine maintenance of one host does not stop snapshots: {r}"
    );
    assert_eq!(r["excluded"][0]["node"], "n3", "{r}");
    assert!(r["excluded"][0]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("not attached"));
}
