//! Issue 12: state you can trust — with real node processes, real FUSE mounts and a
//! real unprivileged user. Nobody else reads or blocks the state; `snapshot verify`
//! compares with the hash recorded at seal time; a restore cannot silently rewrite
//! the snapshots; hooks run only when trusted; a node cannot be started twice,
//! stops when told to, and clients never wait forever.

mod common;

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BS: u64 = 65536;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn one_node() -> Option<Cluster> {
    if !fuse_available() {
        eprintln!("SKIPPED: no FUSE (/dev/fuse and fusermount3 are needed)");
        return None;
    }
    Some(Cluster::start(ClusterOptions {
        nodes: 1,
        size: "16MiB",
        lease: "4s",
    }))
}

fn state_dir(c: &Cluster) -> PathBuf {
    c.cluster_dir().join("shared/volume.img.ffstate")
}

/// Writes `data` into the live volume through the node's mount.
fn write_live(c: &Cluster, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.nodes[0].live())
        .expect("open live volume");
    f.write_all_at(data, offset).expect("write live");
    f.sync_all().expect("fsync live");
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn snapshot(c: &Cluster) -> u64 {
    let (ok, report) = c.create(0, &[]);
    assert!(ok, "snapshot failed: {report}");
    report["id"].as_u64().expect("id")
}

/// Waits until the daemon recorded snapshot `id`'s seal-time hash; returns it.
fn seal_hash(c: &Cluster, id: u64) -> String {
    let mut hash = String::new();
    wait_for(Duration::from_secs(30), || {
        let v = ff_json(&[
            "snapshot",
            "show",
            &id.to_string(),
            "--json",
            "--config",
            c.nodes[0].cfg(),
        ]);
        match v["blake3"].as_str() {
            Some(h) => {
                hash = h.to_string();
                true
            }
            None => false,
        }
    });
    hash
}

fn verify(c: &Cluster, id: u64) -> std::process::Output {
    ff(&[
        "snapshot",
        "verify",
        &id.to_string(),
        "--config",
        c.nodes[0].cfg(),
    ])
}

// ---------------------------------------------------------------- unprivileged user

/// A system user made for one test and removed when it ends.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create() -> Option<TestUser> {
        if !is_root() {
            eprintln!("SKIPPED: not root (a test user must be created)");
            return None;
        }
        let name = format!("ff-test-{:x}", std::process::id());
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .status();
        match made {
            Err(e) => {
                eprintln!("SKIPPED: useradd is missing ({e})");
                return None;
            }
            Ok(st) => assert!(st.success(), "useradd {name} failed"),
        }
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        let (uid, gid) = (id("-u"), id("-g"));
        Some(TestUser { name, uid, gid })
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// What the probe tries as the unprivileged user.
#[derive(Debug, Clone, Copy)]
enum Try {
    /// open(O_RDONLY) and read one byte.
    Read,
    /// open, then an OFD read lock on byte 0 (what stalls every snapshot).
    Lock,
    /// connect(2) to a Unix socket.
    Connect,
}

/// Runs `what` on `path` in a child process that has become `user`; returns 0 if it
/// succeeded, else the errno. The child only makes system calls (no allocation) after
/// fork, so forking from the multi-threaded test is safe.
fn try_as(user: &TestUser, what: Try, path: &Path) -> i32 {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in addr.sun_path.iter_mut().zip(c_path.as_bytes()) {
        *d = *b as libc::c_char;
    }
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: the child below only makes async-signal-safe system calls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: plain system calls on valid arguments prepared before fork.
        unsafe {
            let errno = || *libc::__errno_location();
            let mut result: i32 = 0;
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(user.gid, user.gid, user.gid) != 0
                || libc::setresuid(user.uid, user.uid, user.uid) != 0
            {
                result = -1;
            } else {
                match what {
                    Try::Read => {
                        let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY);
                        if fd < 0 {
                            result = errno();
                        } else {
                            let mut b = 0u8;
                            if libc::read(fd, (&mut b as *mut u8).cast(), 1) < 0 {
                                result = errno();
                            }
                        }
                    }
                    Try::Lock => {
                        let fd = libc::open(c_path.as_ptr(), libc::O_RDONLY);
                        if fd < 0 {
                            result = errno();
                        } else {
                            let mut fl: libc::flock = std::mem::zeroed();
                            fl.l_type = libc::F_RDLCK as libc::c_short;
                            fl.l_whence = libc::SEEK_SET as libc::c_short;
                            fl.l_start = 0;
                            fl.l_len = 1;
                            if libc::fcntl(fd, libc::F_OFD_SETLK, &fl) != 0 {
                                result = errno();
                            }
                        }
                    }
                    Try::Connect => {
                        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                        if fd < 0
                            || libc::connect(
                                fd,
                                (&addr as *const libc::sockaddr_un).cast(),
                                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                            ) != 0
                        {
                            result = errno();
                        }
                    }
                }
            }
            libc::write(fds[1], (&result as *const i32).cast(), 4);
            libc::_exit(0);
        }
    }
    let mut result: i32 = i32::MIN;
    // SAFETY: reading 4 bytes into an i32 from our pipe; reaping our child.
    unsafe {
        libc::close(fds[1]);
        libc::read(fds[0], (&mut result as *mut i32).cast(), 4);
        libc::close(fds[0]);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    assert_ne!(result, -1, "the probe could not become user {}", user.name);
    assert_ne!(result, i32::MIN, "the probe died");
    result
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod");
}

#[test]
fn an_unprivileged_user_can_neither_read_the_state_nor_lock_it_nor_connect_to_the_node() {
    let Some(user) = TestUser::create() else {
        return;
    };
    let Some(mut c) = one_node() else { return };
    // Only our own modes may stand in the way: open up every directory above.
    for dir in [
        c.dir.path().to_path_buf(),
        c.cluster_dir(),
        c.cluster_dir().join("shared"),
    ] {
        chmod(&dir, 0o755);
    }
    // A careless operator (umask 000, `cp -r`, a restore from tape) left it all open.
    c.stop(0);
    let state = state_dir(&c);
    let volume = c.volume();
    chmod(&state, 0o777);
    let mut state_files = Vec::new();
    for e in std::fs::read_dir(&state).expect("state dir").flatten() {
        if e.file_type().expect("type").is_file() {
            chmod(&e.path(), 0o666);
            state_files.push(e.path());
        }
    }
    chmod(&volume, 0o666);
    assert_eq!(
        try_as(&user, Try::Read, &state.join("diff.dat")),
        0,
        "sanity: with open modes the user can read the diff area"
    );
    c.start_node(0);
    c.wait_connected(Duration::from_secs(30));

    // Repaired on open, one warning per path.
    assert_eq!(mode(&state), 0o700, "state directory");
    for f in &state_files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    assert_eq!(mode(&volume), 0o600, "live volume image");
    let log = c.nodes[0].log();
    for f in state_files.iter().chain([&volume, &state]) {
        // The daemon names paths as its config spells them (`nodes/n1/../../shared/…`).
        let tail = f.strip_prefix(c.cluster_dir()).expect("inside the cluster");
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains("repaired") && l.ends_with(s(tail))),
            "no repair warning for {}:\n{log}",
            f.display()
        );
    }
    // Snapshots made now add maps and manifests: private too.
    let id = snapshot(&c);
    seal_hash(&c, id);
    let mut all = Vec::new();
    let mut stack = vec![state.clone()];
    while let Some(d) = stack.pop() {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
        for e in std::fs::read_dir(&d).expect("list").flatten() {
            if e.file_type().expect("type").is_dir() {
                stack.push(e.path());
            } else {
                assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
                all.push(e.path());
            }
        }
    }
    assert!(
        all.iter().any(|p| p.ends_with(format!("snap-{id}.map"))),
        "{all:?}"
    );

    let denied = |what: Try, p: &Path| {
        let e = try_as(&user, what, p);
        assert!(
            e == libc::EACCES || e == libc::EPERM,
            "user {} could {what:?} {} (errno {e})",
            user.name,
            p.display()
        );
    };
    for p in &all {
        denied(Try::Read, p);
    }
    denied(Try::Read, &volume);
    denied(Try::Lock, &state.join("lock"));
    denied(Try::Lock, &state.join("claims"));
    denied(Try::Lock, &state.join("gen"));
    let run = c.nodes[0].run_dir();
    assert_eq!(
        try_as(&user, Try::Read, &run.join("node.pid")),
        libc::EACCES,
        "pid file is private"
    );
    denied(Try::Connect, &run.join("control.sock"));
    denied(Try::Connect, &run.join("writer.sock"));
    // The node still works for its own user.
    assert!(c.create(0, &[]).0, "snapshots still work");
}

#[test]
fn a_writer_group_lets_its_members_register_and_nobody_else() {
    let Some(member) = TestUser::create() else {
        return;
    };
    let Some(mut c) = one_node() else { return };
    for dir in [
        c.dir.path().to_path_buf(),
        c.cluster_dir(),
        c.cluster_dir().join("nodes"),
        c.nodes[0].dir(),
    ] {
        chmod(&dir, 0o755);
    }
    c.stop(0);
    // The member's own group is the writer group.
    let group = {
        let out = Command::new("id")
            .args(["-gn", &member.name])
            .output()
            .expect("id");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let cfg = c.nodes[0].config.clone();
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(
        &cfg,
        text.replace(
            "allow_other = false",
            &format!("allow_other = false\nwriter_group = \"{group}\""),
        ),
    )
    .expect("config");
    c.start_node(0);
    c.wait_connected(Duration::from_secs(30));
    let run = c.nodes[0].run_dir();
    let writer = run.join("writer.sock");
    assert_eq!(mode(&writer), 0o660);
    assert_eq!(
        try_as(&member, Try::Connect, &writer),
        0,
        "a member of {group} connects"
    );
    let e = try_as(&member, Try::Connect, &run.join("control.sock"));
    assert_eq!(e, libc::EACCES, "the control socket stays owner-only");
}

// ---------------------------------------------------------------- verify

#[test]
fn verify_compares_with_the_seal_time_hash_and_names_the_first_differing_block() {
    let Some(c) = one_node() else { return };
    write_live(&c, 0, &pattern(64 * BS as usize, 7));
    let id = snapshot(&c);
    let recorded = seal_hash(&c, id);

    let clean = verify(&c, id);
    assert!(
        clean.status.success(),
        "clean verify failed: {}",
        stderr_of(&clean)
    );
    let text = String::from_utf8_lossy(&clean.stdout);
    assert!(
        text.contains(&recorded) && text.contains("matches"),
        "{text}"
    );

    // Block 37 is shared by the snapshot and the live volume (never overwritten since):
    // change it on the raw file, behind the engine, as a stray `dd` would.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.volume())
            .expect("raw volume");
        f.write_all_at(b"\x00\xff\x00", 37 * BS + 1234)
            .expect("flip");
        f.sync_all().expect("fsync");
    }
    let bad = verify(&c, id);
    assert!(!bad.status.success(), "verify must fail on a changed image");
    let err = stderr_of(&bad);
    assert!(
        err.contains("does not match the hash recorded at seal time")
            && err.contains("first differing block: 37")
            && err.contains(&recorded),
        "{err}"
    );
    let again = ff_json(&[
        "snapshot",
        "show",
        &id.to_string(),
        "--json",
        "--config",
        c.nodes[0].cfg(),
    ]);
    assert_eq!(
        again["blake3"],
        recorded.as_str(),
        "a mismatch never overwrites the recorded hash"
    );

    // A snapshot taken without the daemon has no hash: the first verify records it, and says so.
    let out = ff(&["volume", "snapshot", s(&c.volume())]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let local: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("id");
    let first = verify(&c, local);
    assert!(first.status.success(), "{}", stderr_of(&first));
    let text = String::from_utf8_lossy(&first.stdout);
    assert!(
        text.contains("no hash was recorded at seal time; recorded blake3"),
        "{text}"
    );
    let second = verify(&c, local);
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("matches"),
        "second verify compares"
    );
}

// ---------------------------------------------------------------- restore

#[test]
fn restore_onto_the_live_volume_is_refused_and_through_the_engine_keeps_every_snapshot() {
    let Some(c) = one_node() else { return };
    let cfg = c.nodes[0].cfg();
    write_live(&c, 0, &pattern(128 * BS as usize, 1));
    let s1 = snapshot(&c);
    let repo = c.dir.path().join("repo");
    ff_json(&["backup", "init", s(&repo), "--json"]);
    let backup = ff_json(&[
        "backup",
        "run",
        "--repo",
        s(&repo),
        "--config",
        cfg,
        "--snapshot",
        &s1.to_string(),
        "--json",
    ]);
    let backup_id = backup["id"].as_str().expect("backup id").to_string();
    // Life goes on: blocks change, more snapshots share and copy them.
    write_live(&c, 10 * BS, &pattern(20 * BS as usize, 2));
    let s2 = snapshot(&c);
    write_live(&c, 25 * BS, &pattern(40 * BS as usize, 3));
    let s3 = snapshot(&c);
    write_live(&c, 100 * BS, &pattern(3 * BS as usize, 4));
    let hashes: Vec<(u64, String)> = [s1, s2, s3]
        .iter()
        .map(|&id| (id, seal_hash(&c, id)))
        .collect();

    let refused = ff(&[
        "backup",
        "restore",
        "--repo",
        s(&repo),
        &backup_id,
        "--to",
        s(&c.volume()),
    ]);
    assert!(
        !refused.status.success(),
        "restore onto the live volume must be refused"
    );
    let err = stderr_of(&refused);
    assert!(
        err.contains("is a freezeframe volume") && err.contains("--through-engine"),
        "{err}"
    );
    for (id, h) in &hashes {
        assert!(
            verify(&c, *id).status.success(),
            "snapshot {id} untouched by the refusal ({h})"
        );
    }

    let done = ff_json(&[
        "backup",
        "restore",
        "--repo",
        s(&repo),
        &backup_id,
        "--to",
        s(&c.volume()),
        "--through-engine",
        "--json",
    ]);
    let written = done["blocks_written"].as_u64().expect("blocks_written");
    assert!(
        written > 0 && written < 256,
        "only the differing blocks are written: {done}"
    );
    for (id, h) in &hashes {
        let out = verify(&c, *id);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(h.as_str()),
            "snapshot {id} changed by the restore: {}",
            stderr_of(&out)
        );
    }
    // The live image is now exactly the backup.
    let plain = c.dir.path().join("plain.img");
    ff_json(&[
        "backup",
        "restore",
        "--repo",
        s(&repo),
        &backup_id,
        "--to",
        s(&plain),
        "--json",
    ]);
    assert_eq!(
        hash_file(&c.volume()),
        hash_file(&plain),
        "live image equals the backup"
    );
    assert_eq!(
        hash_file(&c.nodes[0].live()),
        hash_file(&plain),
        "also as the mount shows it"
    );
}

// ---------------------------------------------------------------- hooks

#[test]
fn an_untrusted_hook_is_refused_by_name_and_runs_once_it_is_root_owned() {
    let Some(user) = TestUser::create() else {
        return;
    };
    let Some(c) = one_node() else { return };
    let hooks = c.nodes[0].dir().join("hooks.d");
    let marker = c.dir.path().join("hook-ran");
    let hook = hooks.join("10-flush");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", marker.display()),
    )
    .expect("hook");
    let own = |p: &Path, uid: u32, gid: u32| {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown");
    };
    own(&hook, user.uid, user.gid);
    chmod(&hook, 0o777);
    chmod(&hooks, 0o777);
    let (ok, report) = c.create(0, &[]);
    assert!(!ok, "an untrusted hook must veto: {report}");
    let reason = report["error"]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("10-flush") && reason.contains("refused"),
        "{report}"
    );
    assert!(!marker.exists(), "the untrusted hook must not have run");

    own(&hook, 0, 0);
    chmod(&hook, 0o755);
    chmod(&hooks, 0o755);
    let (ok, report) = c.create(0, &[]);
    assert!(ok, "a root-owned 0755 hook runs: {report}");
    let ran = std::fs::read_to_string(&marker).expect("hook ran");
    assert!(ran.contains("freeze") && ran.contains("thaw"), "{ran}");
}

// ---------------------------------------------------------------- startup and clients

#[test]
fn a_second_node_run_is_refused_and_the_first_keeps_running_until_cluster_down() {
    let Some(mut c) = one_node() else { return };
    let first = c.nodes[0].child.as_ref().expect("running").id();
    let pid_file = c.nodes[0].run_dir().join("node.pid");
    let second = Command::new(exe())
        .args(["node", "run", "--config", c.nodes[0].cfg()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("second node run");
    assert!(!second.status.success());
    let err = stderr_of(&second);
    assert!(
        err.contains(&format!("node n1 is already running as pid {first}")),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("pid file").trim(),
        first.to_string(),
        "the pid file still names the first daemon"
    );
    // Without the pid file (deleted by someone), the answering control socket still says so.
    let saved = pid_file.with_extension("saved");
    std::fs::rename(&pid_file, &saved).expect("hide pid file");
    let third = Command::new(exe())
        .args(["node", "run", "--config", c.nodes[0].cfg()])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("third node run");
    assert!(!third.status.success());
    let err = stderr_of(&third);
    assert!(
        err.contains("node n1 is already running") && err.contains("control socket"),
        "{err}"
    );
    assert!(!pid_file.exists(), "a refused run writes no pid file");
    std::fs::rename(&saved, &pid_file).expect("restore pid file");
    let st = ff_json(&["status", "--json", "--config", c.nodes[0].cfg()]);
    assert_eq!(st["mounted"], true, "{st}");
    assert!(c.create(0, &[]).0, "the first daemon still takes snapshots");
    std::fs::metadata(c.nodes[0].live()).expect("the live mount is still there");

    let down = ff(&["cluster", "down", s(&c.cluster_dir())]);
    assert!(down.status.success(), "{}", stderr_of(&down));
    let mut child = c.nodes[0].child.take().expect("child");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster down did not stop the node"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pid_file.exists(), "a stopped node removes its pid file");
}

#[test]
fn node_run_with_a_certificate_for_another_node_is_refused_and_touches_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("c");
    ff_json(&[
        "cluster",
        "init",
        s(&dir),
        "--nodes",
        "2",
        "--size",
        "4MiB",
        "--lease",
        "4s",
        "--json",
    ]);
    let nd = dir.join("nodes/n1");
    let cfg = nd.join("node.toml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(
        &cfg,
        text.replace("\"node.pem\"", "\"../n2/node.pem\"")
            .replace("\"node.key\"", "\"../n2/node.key\""),
    )
    .expect("config");
    std::fs::remove_dir(nd.join("run")).expect("rmdir run");
    let out = ff(&["node", "run", "--config", s(&cfg)]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("is for node \"n2\"") && err.contains("named \"n1\""),
        "{err}"
    );
    assert!(
        !nd.join("run").exists(),
        "nothing created: no run dir, no pid file, no socket"
    );
}

#[test]
fn a_control_socket_that_never_answers_times_out_naming_the_call() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("c");
    ff_json(&[
        "cluster",
        "init",
        s(&dir),
        "--nodes",
        "1",
        "--size",
        "4MiB",
        "--lease",
        "2s",
        "--json",
    ]);
    let cfg = dir.join("nodes/n1/node.toml");
    // A hung daemon: the socket accepts connections and never says anything.
    let sock = dir.join("nodes/n1/run/control.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(2) {
            held.push(conn);
        }
        std::thread::sleep(Duration::from_secs(8));
    });
    let t = Instant::now();
    let out = ff(&["status", "--config", s(&cfg)]);
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("did not answer `status` within 5000 ms"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    // snapshot create waits the lease (2 s) + 5 s, not forever.
    let t = Instant::now();
    let out = ff(&["snapshot", "create", "--config", s(&cfg)]);
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("did not answer `snapshot create` within 7000 ms"),
        "{}",
        stderr_of(&out)
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    drop(hold);
}

#[test]
fn sigterm_ends_a_node_whose_mount_another_mount_namespace_holds() {
    let Some(mut c) = one_node() else { return };
    if Command::new("unshare").arg("--version").output().is_err() || !is_root() {
        eprintln!("SKIPPED: needs root and unshare(1) to copy the mount into another namespace");
        return;
    }
    // A container started now gets a copy of the node's FUSE mount.
    let holder = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let holder = Reaped(holder);
    // The copy exists once the holder's namespace differs from ours.
    let ours = std::fs::read_link("/proc/self/ns/mnt").expect("own ns");
    wait_for(Duration::from_secs(10), || {
        std::fs::read_link(format!("/proc/{}/ns/mnt", holder.0.id())).is_ok_and(|ns| ns != ours)
    });
    let mut child = Reaped(c.nodes[0].child.take().expect("child"));
    let t = Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let mut exited = false;
    while t.elapsed() < Duration::from_secs(20) {
        if child.0.try_wait().expect("wait").is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(holder);
    drop(child);
    assert!(exited, "the node did not exit within 20 s of SIGTERM");
    assert!(
        !freezeframe_fusefs_is_mounted(&c.nodes[0].mount()),
        "the mount is gone from our namespace"
    );
}

/// A child process killed and reaped when the test ends, whatever happens.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `p` is a mount point in this namespace (from /proc/self/mountinfo).
fn freezeframe_fusefs_is_mounted(p: &Path) -> bool {
    let want = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(m) == want))
}
