//! Issue 8: snapshots synced to a secondary host, only the copied-on-write
//! blocks after the first, over QUIC with mutual TLS. Real processes on
//! loopback: `cluster init` gives the CA and a node identity whose node.toml
//! points at the volume; `volume …` commands make the snapshots (no node runs);
//! `replica serve` is the secondary.

mod common;

use std::io::Write;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{exe, ff, ff_json, fuse_available};
use rand::{Rng, RngCore};
use serde_json::Value;

const BS: u64 = 64 * 1024;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A one-node cluster folder (CA, identity, volume) and a secondary's folder.
struct Setup {
    dir: tempfile::TempDir,
    secondary: Option<Child>,
    listen: String,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Setup {
    fn new(size: &str) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("ff-replica-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let c = dir.path().join("c");
        ok(
            &ff(&[
                "cluster",
                "init",
                s(&c),
                "--nodes",
                "1",
                "--size",
                size,
                "--json",
            ]),
            "cluster init",
        );
        let port = UdpSocket::bind("127.0.0.1:0")
            .expect("udp")
            .local_addr()
            .expect("addr")
            .port();
        let listen = format!("127.0.0.1:{port}");
        ok(
            &ff(&[
                "replica",
                "init-identity",
                "--ca-dir",
                s(&c),
                "--name",
                "replica",
                "--out",
                s(&dir.path().join("r")),
                "--listen",
                &listen,
            ]),
            "init-identity",
        );
        Setup {
            dir,
            secondary: None,
            listen,
        }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn volume(&self) -> PathBuf {
        self.path("c/shared/volume.img")
    }
    fn node(&self) -> PathBuf {
        self.path("c/nodes/n1/node.toml")
    }
    fn store(&self) -> PathBuf {
        self.path("r/store")
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.path("r/serve.log")).unwrap_or_default()
    }

    /// Starts the secondary (optionally slowed down) and waits until it listens.
    fn serve_with(&mut self, config: &Path, throttle_ms: Option<u64>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("r/serve.log"))
            .expect("log");
        let mut cmd = Command::new(exe());
        cmd.args([
            "--config",
            s(config),
            "replica",
            "serve",
            "--dir",
            s(&self.store()),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
        if let Some(ms) = throttle_ms {
            cmd.env("FREEZEFRAME_REPLICA_THROTTLE", ms.to_string());
        }
        let before = self.log().matches("listening on").count();
        self.secondary = Some(cmd.spawn().expect("start secondary"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches("listening on").count() == before {
            assert!(
                Instant::now() < deadline,
                "secondary did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn serve(&mut self, throttle_ms: Option<u64>) {
        let cfg = self.path("r/replica.toml");
        self.serve_with(&cfg, throttle_ms);
    }
    fn stop(&mut self) {
        if let Some(mut c) = self.secondary.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut child = Command::new(exe())
            .args([
                "volume",
                "write",
                s(&self.volume()),
                "--offset",
                &offset.to_string(),
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("volume write");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(data)
            .expect("feed");
        assert!(child.wait().expect("wait").success(), "volume write failed");
    }
    fn snapshot(&self) -> u64 {
        ok(
            &ff(&["volume", "snapshot", s(&self.volume())]),
            "volume snapshot",
        )
        .trim()
        .parse()
        .expect("snapshot id")
    }
    fn push_cmd(&self) -> Command {
        let mut cmd = Command::new(exe());
        cmd.args([
            "--config",
            s(&self.node()),
            "replica",
            "push",
            "--to",
            &self.listen,
            "--json",
        ])
        .env("RUST_LOG", "warn");
        cmd
    }
    fn push(&self) -> Value {
        let out = self.push_cmd().output().expect("push");
        serde_json::from_str(&ok(&out, "replica push")).expect("push JSON")
    }
    fn primary_image(&self, id: u64) -> Vec<u8> {
        let out = ff(&[
            "volume",
            "read",
            s(&self.volume()),
            "--snapshot",
            &id.to_string(),
        ]);
        ok(&out, "volume read");
        out.stdout
    }
    fn replica_image(&self, id: u64) -> Output {
        ff(&[
            "replica",
            "read",
            "--dir",
            s(&self.store()),
            "--snapshot",
            &id.to_string(),
        ])
    }
    fn listed(&self) -> Vec<u64> {
        let v = ff_json(&["replica", "list", "--dir", s(&self.store()), "--json"]);
        v.as_array()
            .expect("array")
            .iter()
            .flat_map(|vol| vol["snapshots"].as_array().cloned().unwrap_or_default())
            .map(|s| s["id"].as_u64().expect("id"))
            .collect()
    }
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

#[test]
fn full_then_incremental_push_gives_bit_exact_replicas_and_sends_only_the_changed_blocks() {
    let mut t = Setup::new("32MiB");
    t.write(0, &random(8 << 20));
    t.write(20 << 20, &random(1 << 20));
    let s1 = t.snapshot();
    t.serve(None);

    let full = t.push();
    assert_eq!(full["mode"], "full");
    assert_eq!(full["blocks_planned"], 512);
    assert_eq!(full["blocks_sent"], 512);
    assert!(
        full["zero_blocks_sent"].as_u64().expect("zero") >= 512 - 144,
        "untouched blocks travel as a flag: {full}"
    );
    assert!(
        full["data_bytes_sent"].as_u64().expect("data") <= 144 * BS,
        "{full}"
    );
    assert_eq!(
        t.replica_image(s1).stdout,
        t.primary_image(s1),
        "the full replica equals the snapshot"
    );

    let mut rng = rand::thread_rng();
    for _ in 0..24 {
        let b = rng.gen_range(0..512u64);
        t.write(b * BS + rng.gen_range(0..BS - 100), &random(100));
    }
    let s2 = t.snapshot();
    let changed = ff_json(&[
        "volume",
        "changed",
        s(&t.volume()),
        "--from",
        &s1.to_string(),
        "--to",
        &s2.to_string(),
        "--json",
    ]);
    let changed = changed["blocks"].as_array().expect("blocks").len() as u64;
    let inc = t.push();
    assert_eq!(inc["mode"], "incremental");
    assert_eq!(inc["base"], s1);
    assert_eq!(inc["blocks_sent"], changed);
    assert_eq!(
        inc["hash_from_saved_cvs"], true,
        "the sender hashed only the changed blocks"
    );
    let wire = inc["wire_bytes_sent"].as_u64().expect("wire") as f64;
    let size = (changed * BS) as f64;
    assert!(
        (wire - size).abs() <= 0.10 * size,
        "incremental sent {wire} bytes for {size} bytes of changed blocks"
    );
    assert_eq!(
        t.replica_image(s2).stdout,
        t.primary_image(s2),
        "the incremental replica equals the snapshot"
    );
    assert_eq!(t.listed(), vec![s1, s2]);

    let again = t.push();
    assert_eq!(again["already_complete"], true);

    t.write(3 * BS, &random(10));
    let s3 = t.snapshot();
    let out = t
        .push_cmd()
        .arg("--full-hash")
        .output()
        .expect("push --full-hash");
    let full_hash: Value = serde_json::from_str(&ok(&out, "push --full-hash")).expect("JSON");
    assert_eq!(
        (
            full_hash["base"].as_u64(),
            full_hash["blocks_sent"].as_u64(),
            full_hash["hash_from_saved_cvs"].as_bool()
        ),
        (Some(s2), Some(1), Some(false))
    );
    assert_eq!(
        t.replica_image(s3).stdout,
        t.primary_image(s3),
        "a replica built on an incremental equals the snapshot"
    );

    let list = ff_json(&[
        "--config",
        s(&t.node()),
        "replica",
        "list",
        "--to",
        &t.listen,
        "--json",
    ]);
    let remote: Vec<&str> = list[0]["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| s["blake3"].as_str().expect("hash"))
        .collect();
    assert_eq!(
        remote[..2],
        [
            full["blake3"].as_str().expect("h1"),
            inc["blake3"].as_str().expect("h2")
        ]
    );
    assert_eq!(
        remote[1],
        blake3::hash(&t.primary_image(s2)).to_hex().as_str(),
        "the recorded hash is the image's blake3"
    );

    if fuse_available() {
        let mnt = t.path("mnt");
        let mut m = Command::new(exe())
            .args([
                "replica",
                "mount",
                "--dir",
                s(&t.store()),
                "--mount",
                s(&mnt),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mount");
        let img = mnt.join(format!("snapshots/{s3}/volume.img"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !img.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let got = std::fs::read(&img).expect("read the mounted replica");
        assert_eq!(
            got,
            t.primary_image(s3),
            "the mounted replica equals the snapshot"
        );
        assert!(
            std::fs::OpenOptions::new().write(true).open(&img).is_err(),
            "a replica mount is read-only"
        );
        // SAFETY: SIGTERM to the mount process this test started.
        unsafe { libc::kill(m.id() as i32, libc::SIGTERM) };
        let _ = m.wait();
    }
}

fn journaled(store: &Path, snapshot: u64) -> u64 {
    let Ok(rd) = std::fs::read_dir(store) else {
        return 0;
    };
    for vol in rd.flatten() {
        if let Ok(m) = std::fs::metadata(vol.path().join(format!("{snapshot}.journal"))) {
            return m.len().saturating_sub(64) / 64;
        }
    }
    0
}

#[test]
fn a_push_cut_by_killing_the_secondary_resumes_and_resends_at_most_what_was_in_flight() {
    let mut t = Setup::new("64MiB");
    t.write(0, &random(64 << 20));
    let s1 = t.snapshot();
    t.serve(Some(250));
    let pusher = t
        .push_cmd()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("push");
    let deadline = Instant::now() + Duration::from_secs(30);
    let at_kill = loop {
        let n = journaled(&t.store(), s1);
        if n >= 256 {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the journal never reached half: {n}\n{}",
            t.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    t.stop();
    let first = pusher.wait_with_output().expect("pusher");
    assert!(!first.status.success(), "a push cut mid-way must fail");
    assert!(at_kill < 1024, "the kill came before the end");
    assert!(
        t.listed().is_empty(),
        "a half-received snapshot is never listed as complete"
    );

    let durable = journaled(&t.store(), s1);
    assert!(durable >= at_kill, "journaled blocks survive the kill");
    t.serve(None);
    let second = t.push();
    let skipped = second["blocks_skipped"].as_u64().expect("skipped");
    let sent = second["blocks_sent"].as_u64().expect("sent");
    assert_eq!(skipped, durable, "every durable block is skipped");
    assert_eq!(sent + skipped, 1024);
    assert!(
        sent <= 1024 - at_kill,
        "resent {sent}, but {at_kill} of 1024 were durable at the kill"
    );
    assert_eq!(
        t.replica_image(s1).stdout,
        t.primary_image(s1),
        "the resumed replica equals the snapshot"
    );
}

#[test]
fn a_secondary_certified_by_another_ca_is_refused_on_both_sides() {
    let mut t = Setup::new("8MiB");
    t.write(0, &random(1 << 20));
    t.snapshot();
    let other = t.path("other");
    ok(
        &ff(&[
            "cluster",
            "init",
            s(&other),
            "--nodes",
            "1",
            "--size",
            "8MiB",
            "--json",
        ]),
        "second cluster",
    );
    let impostor = t.path("impostor");
    ok(
        &ff(&[
            "replica",
            "init-identity",
            "--ca-dir",
            s(&other),
            "--name",
            "replica",
            "--out",
            s(&impostor),
            "--listen",
            &t.listen,
            "--allow",
            "n1",
        ]),
        "impostor identity",
    );
    t.serve_with(&impostor.join("replica.toml"), None);

    let out = t.push_cmd().output().expect("push");
    assert!(!out.status.success(), "a push to an impostor must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("secondary replica")
            && (err.contains("refused") || err.contains("certificate")),
        "pusher error: {err}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !t.log().contains("refused peer") {
        assert!(
            Instant::now() < deadline,
            "the secondary did not log the refusal: {}",
            t.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !t.store().exists() || t.listed().is_empty(),
        "nothing was stored"
    );
}

#[test]
fn bad_input_gets_clear_errors_and_the_secondary_keeps_serving() {
    let mut t = Setup::new("8MiB");
    t.write(0, &random(2 << 20));
    let s1 = t.snapshot();
    t.serve(None);

    let out = ff(&[
        "--config",
        s(&t.node()),
        "replica",
        "push",
        "--to",
        &t.listen,
        "--snapshot",
        "99",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("snapshot 99"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let first = t.push();
    hostile_client(&t, first["volume"].as_str().expect("uuid"));
    t.write(0, &random(BS as usize));
    let s2 = t.snapshot();
    assert_eq!(
        t.push()["snapshot"],
        s2,
        "the secondary still serves after the hostile client"
    );
    let out = t.replica_image(7);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("snapshot 7"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A truncated data file: reads fail naming the file, listing still works.
    let vol = std::fs::read_dir(t.store())
        .expect("store")
        .flatten()
        .find(|e| e.path().is_dir())
        .expect("volume dir")
        .path();
    let data = vol.join(format!("{s1}.data"));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .expect("data");
    f.set_len(BS).expect("truncate");
    let out = t.replica_image(s1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(&format!("{s1}.data")) && err.contains("truncated"),
        "{err}"
    );
    assert_eq!(t.listed(), vec![s1, s2]);
}

/// Talks to the secondary with a real identity but breaks the protocol:
/// garbage frames, a bad plan, a block whose hash is wrong. Each gets an error
/// reply (or a stopped stream); a normal push afterwards still works.
fn hostile_client(t: &Setup, uuid: &str) {
    use freezeframe_core::replica::wire::{
        BlockHeader, Blocks, Plan, Reply, Request, PROTOCOL_VERSION,
    };
    use freezeframe_netproto::{CaCertificate, FrameCodec, MemberList, NodeIdentity, PeerEndpoint};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let nd = t.path("c/nodes/n1");
        let id = NodeIdentity::load(&nd.join("node.pem"), &nd.join("node.key")).expect("identity");
        let ca = CaCertificate::load(&t.path("c/ca.pem")).expect("ca");
        let ep = PeerEndpoint::bind("127.0.0.1:0".parse().expect("addr"), &id, &ca, MemberList::new(["replica"])).expect("bind");
        let conn = ep.connect(t.listen.parse().expect("addr"), "replica").await.expect("connect");

        let (mut snd, mut rcv) = conn.open_bi().await.expect("stream");
        tokio::io::AsyncWriteExt::write_all(snd.get_mut(), b"this is not a frame at all").await.expect("write");
        let _ = snd.finish().await;
        let reply = rcv.recv::<Reply>().await;
        assert!(matches!(&reply, Ok(Reply::Error { message }) if message.contains("bad request")), "garbage frame: {reply:?}");

        let plan = Plan { version: PROTOCOL_VERSION, volume: uuid.into(), source_node: "n1".into(), size: 8 << 20, block_size: 65536, snapshot: 50, created_ms: 0, base: None, blocks: 3 };
        let (mut snd, mut rcv) = conn.open_bi().await.expect("stream");
        snd.send(&Request::Begin(plan.clone())).await.expect("send");
        let reply = rcv.recv::<Reply>().await.expect("reply");
        assert!(matches!(&reply, Reply::Error { message } if message.contains("full copy")), "bad plan: {reply:?}");

        let plan = Plan { blocks: 128, ..plan };
        let (mut snd, mut rcv) = conn.open_bi().await.expect("stream");
        snd.set_codec(FrameCodec::DATA);
        rcv.set_codec(FrameCodec::DATA);
        snd.send(&Request::Begin(plan)).await.expect("send");
        assert!(matches!(rcv.recv::<Reply>().await.expect("ready"), Reply::Ready { .. }));
        let lie = Blocks { blocks: vec![BlockHeader { b: 0, cv: "00".repeat(32), z: false }] };
        snd.send_with_data(&lie, &vec![1u8; 65536]).await.expect("send block");
        let reply = rcv.recv::<Reply>().await.expect("reply");
        assert!(matches!(&reply, Reply::Error { message } if message.contains("block 0 fails its blake3 check")), "wrong hash: {reply:?}");
        ep.close("done").await;
    });
}
