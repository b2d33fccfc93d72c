//! Hook writers: executables in the node's `hooks.d/`.
//!
//! To the coordinator the whole folder is ONE ordinary writer named `hooks.d`,
//! served by one task ([`spawn`]) that takes writer events in order, exactly
//! as an application on the writer socket would:
//!
//! - `freeze`: the scripts run one after another in lexical order with the
//!   argument `freeze`. An `abort` (or `thaw`) that arrives meanwhile waits
//!   for the running script — killed at the lease deadline — and then undoes,
//!   in reverse order, exactly the scripts whose freeze started (the running
//!   one included); the scripts after it never start. A script that exits
//!   non-zero, cannot start, or runs past the hook timeout is a veto naming
//!   the script; the scripts that started are undone when the abort comes
//!   (or at the lease deadline, whichever is first).
//! - `thaw` / `abort`: the frozen scripts in reverse order with `thaw` or
//!   `abort`, each run even if one fails, so nothing stays frozen.
//! - `post_snapshot`: every script in lexical order with `post-snapshot` and
//!   the image path.
//! - Frozen and told nothing until the lease deadline (the node is gone or
//!   hung), the task undoes the freeze by itself with `abort`, as the writer
//!   protocol asks of every writer.
//!
//! A script that is not trusted (owned by someone other than root or the daemon's
//! user, or writable by group/others, or in such a directory; see
//! [`super::hook_trust`]) is not run: that is a veto naming it.
//!
//! No shell is involved. Each script gets `FREEZEFRAME_SNAPSHOT`,
//! `FREEZEFRAME_NODE` and `FREEZEFRAME_EVENT` in its environment.

use std::collections::VecDeque;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use freezeframe_core::protocol::EventKind as EventName;
use freezeframe_netproto::writer::{WriterEvent, WriterRequest};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The executables of a hooks folder in lexical order (non-executables and
/// hidden files are skipped, so a README may sit beside them).
pub fn scripts(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
            v.push(entry.path());
        }
    }
    v.sort();
    Ok(v)
}

/// What the hook task needs to know about its node.
#[derive(Debug, Clone)]
pub struct HookConfig {
    pub dir: PathBuf,
    pub node: String,
    /// The longest one script may run.
    pub hook_timeout: Duration,
}

/// The context one script runs with.
#[derive(Debug, Clone)]
struct HookRun {
    node: String,
    snapshot: u64,
    timeout: Duration,
    image_path: Option<String>,
    /// On freeze: what is left of the lease, passed as `FREEZEFRAME_LEASE_MS`
    /// so a hook can undo its own freeze if nobody comes back (the sample
    /// fsfreeze hook's watchdog does).
    lease_left: Option<Duration>,
}

/// The freeze the task holds: which scripts started freezing, and until when.
#[derive(Debug)]
struct Held {
    snapshot: u64,
    started: Vec<PathBuf>,
    deadline: Instant,
}

/// Starts the hooks task. Events go in through the returned sender; every
/// answer (`ack` / `veto`, as a writer sends them) goes to `reply`. The task
/// ends when the sender is dropped, undoing a freeze it still holds first.
pub fn spawn(
    cfg: HookConfig,
    reply: impl Fn(WriterRequest) + Send + 'static,
) -> (
    mpsc::UnboundedSender<WriterEvent>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(serve(cfg, rx, reply));
    (tx, task)
}

async fn serve(
    cfg: HookConfig,
    mut rx: mpsc::UnboundedReceiver<WriterEvent>,
    reply: impl Fn(WriterRequest) + Send + 'static,
) {
    let mut queue: VecDeque<WriterEvent> = VecDeque::new();
    let mut held: Option<Held> = None;
    let mut closed = false;
    loop {
        let ev = if let Some(ev) = queue.pop_front() {
            ev
        } else if closed {
            break;
        } else {
            let deadline = held.as_ref().map(|h| h.deadline);
            let next = match deadline {
                Some(at) => tokio::select! {
                    ev = rx.recv() => ev,
                    _ = tokio::time::sleep_until(at) => {
                        if let Some(h) = held.take() {
                            tracing::warn!(snapshot = h.snapshot, "hooks.d: no thaw or abort within the lease; undoing the freeze");
                            let _ = undo(&cfg, h, "abort").await;
                        }
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match next {
                Some(ev) => ev,
                None => {
                    closed = true;
                    continue;
                }
            }
        };
        match ev {
            WriterEvent::Freeze { snapshot, lease_ms } => {
                if let Some(h) = held.take() {
                    let _ = undo(&cfg, h, "abort").await;
                }
                let deadline = Instant::now() + Duration::from_millis(lease_ms);
                let (h, end) = freeze(&cfg, snapshot, deadline, &mut rx, &mut queue).await;
                match end {
                    FreezeEnd::Cancelled(arg) => {
                        let _ = undo(&cfg, h, arg).await;
                    }
                    FreezeEnd::Vetoed(reason) => {
                        held = Some(h);
                        reply(WriterRequest::Veto {
                            event: EventName::Freeze,
                            snapshot,
                            reason,
                        });
                    }
                    FreezeEnd::Frozen => {
                        held = Some(h);
                        reply(WriterRequest::Ack {
                            event: EventName::Freeze,
                            snapshot,
                        });
                    }
                }
            }
            WriterEvent::PostSnapshot { snapshot, path } => {
                let run = HookRun {
                    node: cfg.node.clone(),
                    snapshot,
                    timeout: cfg.hook_timeout,
                    image_path: Some(path),
                    lease_left: None,
                };
                let mut result = Ok(());
                match scripts(&cfg.dir) {
                    Ok(all) => {
                        for s in &all {
                            if let Err(e) = run_one(s, "post-snapshot", &run).await {
                                result = Err(e);
                                break;
                            }
                        }
                    }
                    Err(e) => result = Err(format!("cannot list {}: {e}", cfg.dir.display())),
                }
                reply(answer(EventName::PostSnapshot, snapshot, result));
            }
            WriterEvent::Thaw { snapshot } => {
                let result = match held.take() {
                    Some(h) if h.snapshot == snapshot => undo(&cfg, h, "thaw").await,
                    other => {
                        held = other;
                        Ok(())
                    }
                };
                reply(answer(EventName::Thaw, snapshot, result));
            }
            WriterEvent::Abort { snapshot, .. } => match held.take() {
                Some(h) if h.snapshot == snapshot => {
                    let _ = undo(&cfg, h, "abort").await;
                }
                other => held = other,
            },
            WriterEvent::Complete { .. }
            | WriterEvent::Fenced { .. }
            | WriterEvent::Registered { .. }
            | WriterEvent::Error { .. } => {}
        }
    }
    if let Some(h) = held.take() {
        tracing::warn!(
            snapshot = h.snapshot,
            "hooks.d: stopping while frozen; undoing the freeze"
        );
        let _ = undo(&cfg, h, "abort").await;
    }
}

fn answer(event: EventName, snapshot: u64, result: Result<(), String>) -> WriterRequest {
    match result {
        Ok(()) => WriterRequest::Ack { event, snapshot },
        Err(reason) => WriterRequest::Veto {
            event,
            snapshot,
            reason,
        },
    }
}

enum FreezeEnd {
    Frozen,
    Vetoed(String),
    /// An abort or thaw came while freezing: undo with this argument.
    Cancelled(&'static str),
}

/// Runs the freeze scripts in order while watching for an abort. Events for
/// other things that arrive meanwhile are queued for after.
async fn freeze(
    cfg: &HookConfig,
    snapshot: u64,
    deadline: Instant,
    rx: &mut mpsc::UnboundedReceiver<WriterEvent>,
    queue: &mut VecDeque<WriterEvent>,
) -> (Held, FreezeEnd) {
    let mut held = Held {
        snapshot,
        started: Vec::new(),
        deadline,
    };
    let all = match scripts(&cfg.dir) {
        Ok(all) => all,
        Err(e) => {
            let reason = format!("cannot list {}: {e}", cfg.dir.display());
            return (held, FreezeEnd::Vetoed(reason));
        }
    };
    let mut cancel: Option<&'static str> = None;
    let mut rx_open = true;
    for s in &all {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let reason = format!("the lease ran out before hook {} could freeze", s.display());
            return (held, FreezeEnd::Vetoed(reason));
        }
        held.started.push(s.clone());
        let run = HookRun {
            node: cfg.node.clone(),
            snapshot,
            timeout: cfg.hook_timeout.min(left),
            image_path: None,
            lease_left: Some(left),
        };
        let script = run_one(s, "freeze", &run);
        tokio::pin!(script);
        let result = loop {
            tokio::select! {
                r = &mut script => break r,
                ev = rx.recv(), if rx_open && cancel.is_none() => match ev {
                    Some(WriterEvent::Abort { snapshot: s2, .. }) if s2 == snapshot => cancel = Some("abort"),
                    Some(WriterEvent::Thaw { snapshot: s2 }) if s2 == snapshot => cancel = Some("thaw"),
                    Some(other) => queue.push_back(other),
                    None => {
                        rx_open = false;
                        cancel = Some("abort");
                    }
                },
            }
        };
        if let Some(arg) = cancel {
            return (held, FreezeEnd::Cancelled(arg));
        }
        if let Err(reason) = result {
            return (held, FreezeEnd::Vetoed(reason));
        }
    }
    (held, FreezeEnd::Frozen)
}

/// Undoes a freeze: the scripts that started freezing, newest first, each run
/// even if one before it failed. `Err` is the first failure.
async fn undo(cfg: &HookConfig, held: Held, arg: &str) -> Result<(), String> {
    let run = HookRun {
        node: cfg.node.clone(),
        snapshot: held.snapshot,
        timeout: cfg.hook_timeout,
        image_path: None,
        lease_left: None,
    };
    let mut first_err = None;
    for s in held.started.iter().rev() {
        if let Err(e) = run_one(s, arg, &run).await {
            tracing::warn!(script = %s.display(), "{e}");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

async fn run_one(script: &Path, arg: &str, run: &HookRun) -> Result<(), String> {
    super::hook_trust::check_trusted(script)?;
    let mut cmd = Command::new(script);
    cmd.arg(arg)
        .env("FREEZEFRAME_SNAPSHOT", run.snapshot.to_string())
        .env("FREEZEFRAME_NODE", &run.node)
        .env("FREEZEFRAME_EVENT", arg)
        .env(
            "FREEZEFRAME_LEASE_MS",
            run.lease_left
                .map_or(String::new(), |d| d.as_millis().to_string()),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own process group, so a timeout kills what the script started too.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(p) = &run.image_path {
        cmd.arg(p);
    }
    let name = script.display();
    let child = cmd
        .spawn()
        .map_err(|e| format!("hook {name} could not start: {e}"))?;
    let pid = child.id();
    match tokio::time::timeout(run.timeout, child.wait_with_output()).await {
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) on the process group this script leads.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
            Err(format!(
                "hook {name} {arg} did not finish within {} ms",
                run.timeout.as_millis()
            ))
        }
        Ok(Err(e)) => Err(format!("hook {name} {arg}: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: String = stderr
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect();
            Err(format!(
                "hook {name} {arg} exited with {}{}",
                out.status,
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {tail}")
                }
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    //! The hooks task as the driver drives it: events in, answers out, the
    //! scripts' own log as the witness of order.
    use super::*;
    use std::io::Write;

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        let mut f = std::fs::File::create(&p).unwrap();
        writeln!(f, "#!/bin/sh\n{body}").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    struct Hooks {
        _dir: tempfile::TempDir,
        hooks: PathBuf,
        log: PathBuf,
        tx: mpsc::UnboundedSender<WriterEvent>,
        answers: mpsc::UnboundedReceiver<WriterRequest>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Hooks {
        /// A hooks.d whose scripts append "NAME ARG SNAPSHOT" to a log.
        fn new(names: &[(&str, &str)], timeout: Duration) -> Hooks {
            let d = tempfile::tempdir().unwrap();
            let log = d.path().join("log");
            let hooks = d.path().join("hooks.d");
            std::fs::create_dir(&hooks).unwrap();
            for (n, extra) in names {
                let body = format!(
                    "echo {n} $1 $FREEZEFRAME_SNAPSHOT >> {}\n{extra}",
                    log.display()
                );
                script(&hooks, n, &body);
            }
            let (atx, answers) = mpsc::unbounded_channel();
            let cfg = HookConfig {
                dir: hooks.clone(),
                node: "n1".into(),
                hook_timeout: timeout,
            };
            let (tx, task) = spawn(cfg, move |r| {
                let _ = atx.send(r);
            });
            Hooks {
                _dir: d,
                hooks,
                log,
                tx,
                answers,
                task,
            }
        }
        fn send(&self, ev: WriterEvent) {
            self.tx.send(ev).unwrap();
        }
        async fn answer(&mut self) -> WriterRequest {
            tokio::time::timeout(Duration::from_secs(10), self.answers.recv())
                .await
                .expect("an answer in time")
                .expect("task alive")
        }
        fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }
        /// Waits until the log has `n` lines (the scripts run in a child).
        async fn wait_lines(&self, n: usize) {
            let start = Instant::now();
            while self.log().lines().count() < n {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "log: {}",
                    self.log()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        async fn stop(self) -> String {
            drop(self.tx);
            tokio::time::timeout(Duration::from_secs(10), self.task)
                .await
                .expect("task ends")
                .unwrap();
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }
    }

    fn freeze(snapshot: u64, lease_ms: u64) -> WriterEvent {
        WriterEvent::Freeze { snapshot, lease_ms }
    }

    #[tokio::test]
    async fn freeze_runs_in_lexical_order_and_thaw_in_reverse() {
        let mut h = Hooks::new(
            &[("20-b", ""), ("10-a", ""), ("30-c", "")],
            Duration::from_secs(5),
        );
        std::fs::write(h.hooks.join("README"), "not executable").unwrap();
        h.send(freeze(4, 10_000));
        assert_eq!(
            h.answer().await,
            WriterRequest::Ack {
                event: EventName::Freeze,
                snapshot: 4
            }
        );
        h.send(WriterEvent::Thaw { snapshot: 4 });
        assert!(matches!(
            h.answer().await,
            WriterRequest::Ack {
                event: EventName::Thaw,
                ..
            }
        ));
        assert_eq!(
            h.stop().await,
            "10-a freeze 4\n20-b freeze 4\n30-c freeze 4\n30-c thaw 4\n20-b thaw 4\n10-a thaw 4\n"
        );
    }

    #[tokio::test]
    async fn a_failing_freeze_hook_vetoes_and_the_abort_undoes_every_hook_that_started() {
        let mut h = Hooks::new(
            &[
                ("10-db", ""),
                ("20-bad", "echo cannot flush >&2; exit 1"),
                ("30-never", ""),
            ],
            Duration::from_secs(5),
        );
        h.send(freeze(4, 10_000));
        let WriterRequest::Veto { reason, .. } = h.answer().await else {
            panic!("expected a veto")
        };
        assert!(
            reason.contains("20-bad") && reason.contains("cannot flush"),
            "{reason}"
        );
        h.send(WriterEvent::Abort {
            snapshot: 4,
            reason: "vetoed".into(),
        });
        assert_eq!(
            h.stop().await,
            "10-db freeze 4\n20-bad freeze 4\n20-bad abort 4\n10-db abort 4\n"
        );
    }

    #[tokio::test]
    async fn an_abort_during_a_slow_freeze_hook_waits_for_it_then_undoes_it() {
        // The freeze hook is still running when the abort comes (another node
        // vetoed): the abort must not overtake it, or it would undo nothing and
        // the slow hook would freeze afterwards, for good.
        let h = Hooks::new(
            &[("10-fast", ""), ("20-slow", "sleep 1"), ("30-later", "")],
            Duration::from_secs(5),
        );
        h.send(freeze(4, 10_000));
        h.wait_lines(2).await;
        h.send(WriterEvent::Abort {
            snapshot: 4,
            reason: "n2 vetoed".into(),
        });
        let log = h.stop().await;
        assert_eq!(
            log, "10-fast freeze 4\n20-slow freeze 4\n20-slow abort 4\n10-fast abort 4\n",
            "the slow hook is undone after it finished, and 30-later never froze"
        );
    }

    #[tokio::test]
    async fn a_freeze_hook_running_past_the_lease_is_killed_and_undone() {
        let mut h = Hooks::new(
            &[("10-hang", "[ \"$1\" = freeze ] && sleep 30; true")],
            Duration::from_secs(20),
        );
        let start = Instant::now();
        h.send(freeze(4, 500));
        let WriterRequest::Veto { reason, .. } = h.answer().await else {
            panic!("expected a veto")
        };
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "killed at the lease, not the hook timeout"
        );
        assert!(reason.contains("did not finish within"), "{reason}");
        // Nobody says abort (the node is hung): the task undoes by itself.
        h.wait_lines(2).await;
        assert_eq!(h.stop().await, "10-hang freeze 4\n10-hang abort 4\n");
    }

    #[tokio::test]
    async fn a_hook_that_hangs_is_a_veto_after_the_hook_timeout() {
        let mut h = Hooks::new(&[("10-hang", "sleep 30")], Duration::from_millis(200));
        h.send(freeze(4, 10_000));
        let WriterRequest::Veto { reason, .. } = h.answer().await else {
            panic!("expected a veto")
        };
        assert!(reason.contains("did not finish within 200 ms"), "{reason}");
    }

    #[tokio::test]
    async fn frozen_hooks_left_without_word_are_undone_at_the_lease() {
        let mut h = Hooks::new(&[("10-a", "")], Duration::from_secs(5));
        h.send(freeze(4, 300));
        assert!(matches!(h.answer().await, WriterRequest::Ack { .. }));
        h.wait_lines(2).await;
        assert_eq!(h.log(), "10-a freeze 4\n10-a abort 4\n");
        h.stop().await;
    }
}
