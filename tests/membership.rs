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

/// Waits until node `i` reports `peer` disconnected.
fn wait_disconnected(c: &Cluster, i: usize, peer: &str) {
    wait_for(Duration::from_secs(15), || {
        let v = ff_json(&["status", "--json", "--config", c.nodes[i].cfg()]);
        v["peers"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["node"] == peer && p["connected"] == false)
        })
    });
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
    wait_disconnected(&c, 0, "n3");

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
    // n1 takes a moment to see the closed connection; until then n3 counts
    // as a connected member and is asked to freeze.
    wait_disconnected(&c, 0, "n3");
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

#[test]
fn a_volume_whose_state_was_made_on_another_host_is_attached_from_the_shared_state() {
    let d = tempfile::tempdir().expect("tempdir");
    let (img, state) = (d.path().join("lun.img"), d.path().join("shared-state"));
    let out = ff(&[
        "volume",
        "create",
        img.to_str().expect("utf-8"),
        "--size",
        "4MiB",
        "--state",
        state.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap = ff(&["volume", "snapshot", img.to_str().expect("utf-8")]);
    assert!(snap.status.success());
    // Host B: the storage is shared, the local pointer to the state is not.
    std::fs::remove_file(d.path().join("lun.img.ffstate")).expect("pointer");
    let out = ff(&["volume", "snapshots", img.to_str().expect("utf-8")]);
    assert!(!out.status.success(), "no state known on this host yet");
    let out = ff(&[
        "volume",
        "attach",
        img.to_str().expect("utf-8"),
        "--state",
        state.to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = ff_json(&[
        "volume",
        "snapshots",
        img.to_str().expect("utf-8"),
        "--json",
    ]);
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    // A state that is not this volume's is refused, and nothing in that
    // folder is touched (its modes are someone else's business).
    let other = d.path().join("elsewhere");
    std::fs::create_dir(&other).expect("dir");
    let theirs = other.join("their-file");
    std::fs::write(&theirs, b"not freezeframe's").expect("file");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let out = ff(&[
        "volume",
        "attach",
        img.to_str().expect("utf-8"),
        "--state",
        other.to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(
            mode(&other),
            0o1777,
            "a folder that is not our state keeps its mode"
        );
        assert_eq!(mode(&theirs), 0o644, "and so do its files");
    }
}

#[test]
fn cluster_init_takes_names_and_a_new_node_gets_a_certificate_from_the_existing_ca() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().join("c");
    let out = ff(&[
        "cluster",
        "init",
        dir.to_str().expect("utf-8"),
        "--names",
        "db1,db2",
        "--size",
        "16MiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("nodes/db1/node.toml").is_file());
    assert!(dir.join("nodes/db2/node.toml").is_file());
    let v = ff_json(&[
        "cluster",
        "issue",
        "--ca-dir",
        dir.to_str().expect("utf-8"),
        "db3",
        "--addr",
        "127.0.0.1:7203",
        "--json",
    ]);
    let id = freezeframe_netproto::pki::NodeIdentity::load(
        std::path::Path::new(v["cert"].as_str().expect("cert")),
        std::path::Path::new(v["key"].as_str().expect("key")),
    )
    .expect("the issued identity loads");
    let name = freezeframe_netproto::pki::node_name_of(&id.cert_der().expect("der")).expect("name");
    assert_eq!(name, "db3");
    let again = ff(&[
        "cluster",
        "issue",
        "--ca-dir",
        dir.to_str().expect("utf-8"),
        "db3",
        "--addr",
        "127.0.0.1:7203",
    ]);
    assert!(!again.status.success(), "an identity is never overwritten");
    let bad = ff(&[
        "cluster",
        "init",
        d.path().join("c2").to_str().expect("utf-8"),
        "--names",
        "db1,db1",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("twice"));
}

/// Adds `member` to the `[cluster] members` of the node.toml at `path`.
fn add_member(path: &std::path::Path, name: &str, addr: &str) {
    let mut doc: toml::Value =
        toml::from_str(&std::fs::read_to_string(path).expect("read")).expect("node.toml parses");
    let members = doc["cluster"]["members"].as_array_mut().expect("members");
    let mut m = toml::map::Map::new();
    m.insert("name".into(), toml::Value::String(name.into()));
    m.insert("addr".into(), toml::Value::String(addr.into()));
    members.push(toml::Value::Table(m));
    std::fs::write(path, toml::to_string(&doc).expect("toml")).expect("write");
}

#[test]
fn a_member_list_reload_adds_a_fourth_node_without_restarting_the_others() {
    if skip_without_fuse() {
        return;
    }
    let mut c = Cluster::start(ClusterOptions::default());
    let cdir = c.cluster_dir();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    ff_json(&[
        "cluster",
        "issue",
        "--ca-dir",
        cdir.to_str().expect("utf-8"),
        "n4",
        "--addr",
        &addr,
        "--json",
    ]);
    let n4 = cdir.join("nodes/n4");
    for sub in ["run", "mnt", "hooks.d"] {
        std::fs::create_dir_all(n4.join(sub)).expect("dirs");
    }
    let mut doc: toml::Value =
        toml::from_str(&std::fs::read_to_string(cdir.join("nodes/n3/node.toml")).expect("read"))
            .expect("parses");
    doc["node"]["name"] = toml::Value::String("n4".into());
    doc["node"]["listen"] = toml::Value::String(addr.clone());
    std::fs::write(n4.join("node.toml"), toml::to_string(&doc).expect("toml")).expect("write");
    add_member(&n4.join("node.toml"), "n4", &addr);
    let pids: Vec<u32> = c
        .nodes
        .iter()
        .map(|n| n.child.as_ref().expect("running").id())
        .collect();
    for n in &c.nodes {
        add_member(&n.config, "n4", &addr);
        let v = ff_json(&["node", "reload", "--json", "--config", n.cfg()]);
        assert_eq!(v["added"][0], "n4", "{v}");
    }
    c.nodes.push(Node {
        name: "n4".into(),
        config: n4.join("node.toml"),
        child: None,
    });
    c.start_node(3);
    c.wait_connected(Duration::from_secs(30));
    let (ok, r) = c.create(0, &[]);
    assert!(ok, "{r}");
    let nodes: Vec<&str> = r["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node"].as_str())
        .collect();
    assert!(nodes.contains(&"n4"), "the new node froze too: {r}");
    let same: Vec<u32> = c.nodes[..3]
        .iter()
        .map(|n| n.child.as_ref().expect("running").id())
        .collect();
    assert_eq!(same, pids, "no node was restarted");
}

#[test]
fn a_member_list_difference_is_named_at_connection_time_and_refuses_snapshots_until_reloaded() {
    if skip_without_fuse() {
        return;
    }
    let c = Cluster::start(ClusterOptions::default());
    // n3 alone is told about a fourth host: its list now differs.
    let original = std::fs::read_to_string(&c.nodes[2].config).expect("read");
    add_member(&c.nodes[2].config, "n9", "127.0.0.1:9");
    ff_json(&["node", "reload", "--json", "--config", c.nodes[2].cfg()]);
    // n1 names it without any snapshot being asked for.
    let differs = |c: &Cluster| -> Option<String> {
        let v = ff_json(&["status", "--json", "--config", c.nodes[0].cfg()]);
        v["peers"].as_array()?.iter().find(|p| p["node"] == "n3")?["members_differ"]
            .as_str()
            .map(str::to_string)
    };
    wait_for(Duration::from_secs(15), || differs(&c).is_some());
    let why = differs(&c).expect("named");
    assert!(why.contains("n3 lists n9 which n1 does not"), "{why}");
    let text = ff(&["status", "--config", c.nodes[0].cfg()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("MEMBER LIST DIFFERS"), "{text}");
    let (ok, r) = c.create(0, &[]);
    assert!(!ok, "{r}");
    assert_eq!(r["error"]["node"], "n3", "{r}");
    assert!(
        r["error"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("member list of node n3"),
        "{r}"
    );
    assert!(c.list(0).is_empty(), "nothing was taken");
    // Put n3's list back and reload: the difference is gone, snapshots go on.
    std::fs::write(&c.nodes[2].config, original).expect("write");
    ff_json(&["node", "reload", "--json", "--config", c.nodes[2].cfg()]);
    wait_for(Duration::from_secs(15), || differs(&c).is_none());
    let (ok, r) = c.create(0, &[]);
    assert!(ok, "{r}");
}
