//! `freezeframe bench fault-writer`: the writer the fault matrix runs on every node.
//!
//! A real application on the writer socket that does what the writer protocol
//! asks of a client (docs/writer-protocol.md) and records everything it sees:
//!
//! - it writes continuously (open, append, fsync) into a file — in the matrix,
//!   on its node's ext4 — except while it holds writes for a snapshot;
//! - on `freeze` it holds writes, then acks (or vetoes) after the configured
//!   delay for that event (`--delay freeze=1500`, `--veto freeze`), only for
//!   `--only-snapshot N` if given, so the next snapshot runs without faults;
//! - it resumes writes on `thaw`, `abort` or `complete` of the snapshot it
//!   holds for, BY ITSELF when the freeze's `lease_ms` passes, and when its
//!   connection to the node drops; it then reconnects and registers again;
//! - SIGUSR1 makes it drop its connection at once (the matrix's "writer veto"
//!   while frozen: closing the connection while frozen counts as a veto).
//!
//! Every line of its log (`--log`, JSON lines) is a [`LogLine`] stamped with
//! CLOCK_MONOTONIC milliseconds (comparable across processes on one host) and
//! the number of the connection it happened on. The matrix reads the log back
//! with [`read_log`], so the format is defined once, here.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The node's writer socket.
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long)]
    pub name: String,
    /// Where every event and state change goes (JSON lines).
    #[arg(long)]
    pub log: PathBuf,
    /// The file it appends to and fsyncs while not holding writes.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Answer EVENT (freeze, post_snapshot, thaw) MS milliseconds late. Repeatable.
    #[arg(long = "delay", value_name = "EVENT=MS")]
    pub delays: Vec<String>,
    /// Veto EVENT instead of acking it (after its delay). Repeatable.
    #[arg(long = "veto", value_name = "EVENT")]
    pub vetoes: Vec<String>,
    /// Apply --delay and --veto only to this snapshot.
    #[arg(long)]
    pub only_snapshot: Option<u64>,
    /// The freeze timeout it registers with.
    #[arg(long)]
    pub freeze_timeout_ms: Option<u64>,
    /// Pause between two writes of the data file.
    #[arg(long, default_value_t = 20)]
    pub write_interval_ms: u64,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// CLOCK_MONOTONIC, milliseconds.
    pub t_ms: f64,
    /// Which connection to the node (1, 2, …); 0 before the first.
    pub conn: u64,
    #[serde(flatten)]
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum What {
    Started {
        name: String,
    },
    Connected,
    /// The connection ended: `eof`, `asked` (SIGUSR1) or the I/O error.
    Disconnected {
        reason: String,
    },
    /// A line the node sent, as received.
    Event {
        event: Value,
    },
    /// What it answered: `ack` or `veto`.
    Reply {
        op: String,
        event: String,
        snapshot: u64,
    },
    /// It holds writes for `snapshot`.
    Hold {
        snapshot: u64,
        lease_ms: Option<u64>,
    },
    /// It resumed writes: `thaw`, `abort`, `complete`, `lease` or `disconnect`.
    Resume {
        snapshot: u64,
        why: String,
    },
    /// A write or fsync of the data file failed (logged when the error changes).
    WriteError {
        error: String,
    },
}

/// CLOCK_MONOTONIC in milliseconds.
pub fn mono_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// Reads a log back (a torn last line, from a writer killed mid-write, is skipped).
pub fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// What to do about faults: per-event delays and vetoes, maybe for one snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    delays: HashMap<String, u64>,
    vetoes: Vec<String>,
    only: Option<u64>,
}

impl Faults {
    pub fn parse(delays: &[String], vetoes: &[String], only: Option<u64>) -> Result<Faults> {
        const EVENTS: [&str; 3] = ["freeze", "post_snapshot", "thaw"];
        let mut f = Faults {
            only,
            ..Faults::default()
        };
        for d in delays {
            let Some((ev, ms)) = d.split_once('=') else {
                bail!("--delay {d:?}: expected EVENT=MS, e.g. freeze=1500");
            };
            if !EVENTS.contains(&ev) {
                bail!("--delay {d:?}: EVENT must be one of {EVENTS:?}");
            }
            let ms = ms
                .parse()
                .with_context(|| format!("--delay {d:?}: MS must be a whole number"))?;
            f.delays.insert(ev.to_string(), ms);
        }
        for v in vetoes {
            if !EVENTS.contains(&v.as_str()) {
                bail!("--veto {v:?}: EVENT must be one of {EVENTS:?}");
            }
            f.vetoes.push(v.clone());
        }
        Ok(f)
    }

    /// The answer to `event` of `snapshot` and how long to wait before sending it.
    pub fn answer(&self, event: &str, snapshot: u64) -> (&'static str, u64) {
        if self.only.is_some_and(|n| n != snapshot) {
            return ("ack", 0);
        }
        let op = if self.vetoes.iter().any(|v| v == event) {
            "veto"
        } else {
            "ack"
        };
        (op, self.delays.get(event).copied().unwrap_or(0))
    }
}

/// The client side of the lease: which snapshot writes are held for, until when.
/// Pure: the caller passes the time and executes the returned resume.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Hold {
    held: Option<(u64, Option<f64>)>,
}

impl Hold {
    pub fn freeze(&mut self, snapshot: u64, lease_ms: Option<u64>, now: f64) {
        self.held = Some((snapshot, lease_ms.map(|l| now + l as f64)));
    }
    /// `thaw`, `abort` or `complete` of `snapshot`: resume if held for it.
    pub fn release(&mut self, snapshot: u64) -> Option<u64> {
        match self.held {
            Some((n, _)) if n == snapshot => self.held.take().map(|(n, _)| n),
            _ => None,
        }
    }
    /// The lease ran out: resume.
    pub fn expire(&mut self, now: f64) -> Option<u64> {
        match self.held {
            Some((n, Some(deadline))) if now >= deadline => {
                self.held = None;
                Some(n)
            }
            _ => None,
        }
    }
    /// The connection dropped: resume whatever was held.
    pub fn drop_all(&mut self) -> Option<u64> {
        self.held.take().map(|(n, _)| n)
    }
}

static DISCONNECT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    DISCONNECT.store(true, Ordering::SeqCst);
}

struct Log {
    file: Mutex<std::fs::File>,
}

impl Log {
    fn put(&self, conn: u64, what: What) {
        let line = LogLine {
            t_ms: mono_ms(),
            conn,
            what,
        };
        if let (Ok(mut f), Ok(s)) = (self.file.lock(), serde_json::to_string(&line)) {
            let _ = writeln!(f, "{s}");
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let faults = Faults::parse(&args.delays, &args.vetoes, args.only_snapshot)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
        .with_context(|| format!("opening the log {}", args.log.display()))?;
    let log = Arc::new(Log {
        file: Mutex::new(file),
    });
    // SAFETY: the handler only stores into an atomic.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            on_usr1 as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
    log.put(
        0,
        What::Started {
            name: args.name.clone(),
        },
    );
    let held = Arc::new(AtomicBool::new(false));
    if let Some(data) = args.data.clone() {
        let (held, log) = (held.clone(), log.clone());
        let every = Duration::from_millis(args.write_interval_ms.max(1));
        std::thread::spawn(move || write_loop(&data, &held, &log, every));
    }
    let mut conn = 0u64;
    loop {
        let stream = match UnixStream::connect(&args.socket) {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        conn += 1;
        DISCONNECT.store(false, Ordering::SeqCst);
        log.put(conn, What::Connected);
        let reason = match session(stream, conn, &args, &faults, &held, &log) {
            Ok(r) => r,
            Err(e) => format!("{e:#}"),
        };
        log.put(conn, What::Disconnected { reason });
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Appends a line and fsyncs, again and again, while writes are not held.
fn write_loop(path: &Path, held: &AtomicBool, log: &Log, every: Duration) {
    let mut seq = 0u64;
    let mut last_err = String::new();
    loop {
        if !held.load(Ordering::SeqCst) {
            let r = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| {
                    writeln!(f, "{seq} {:.1}", mono_ms())?;
                    f.sync_all()
                });
            match r {
                Ok(()) => {
                    seq += 1;
                    last_err.clear();
                }
                Err(e) => {
                    let e = e.to_string();
                    if e != last_err {
                        log.put(0, What::WriteError { error: e.clone() });
                        last_err = e;
                    }
                }
            }
        }
        std::thread::sleep(every);
    }
}

/// One connection: register, answer events, keep the lease. Returns why it ended.
fn session(
    stream: UnixStream,
    conn: u64,
    args: &Args,
    faults: &Faults,
    held: &AtomicBool,
    log: &Log,
) -> Result<String> {
    stream.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut register = json!({"op": "register", "name": args.name, "on_error": "fail"});
    if let Some(t) = args.freeze_timeout_ms {
        register["freeze_timeout_ms"] = json!(t);
    }
    writeln!(out, "{register}")?;
    let mut hold = Hold::default();
    // Replies waiting for their delay: (due, op, event, snapshot).
    let mut pending: Vec<(f64, &'static str, String, u64)> = Vec::new();
    let mut buf = Vec::new();
    let resume = |hold_snapshot: Option<u64>, why: &str| {
        if let Some(snapshot) = hold_snapshot {
            held.store(false, Ordering::SeqCst);
            log.put(
                conn,
                What::Resume {
                    snapshot,
                    why: why.into(),
                },
            );
        }
    };
    let end = loop {
        let now = mono_ms();
        if DISCONNECT.swap(false, Ordering::SeqCst) {
            break "asked".to_string();
        }
        resume(hold.expire(now), "lease");
        let mut i = 0;
        while i < pending.len() {
            if pending[i].0 <= now {
                let (_, op, event, snapshot) = pending.remove(i);
                let mut line = json!({"op": op, "event": event, "snapshot": snapshot});
                if op == "veto" {
                    line["reason"] = json!(format!("{} vetoes {event} (fault matrix)", args.name));
                }
                if writeln!(out, "{line}").is_err() {
                    // The connection is gone: the next read says so.
                    pending.clear();
                    break;
                }
                log.put(
                    conn,
                    What::Reply {
                        op: op.into(),
                        event,
                        snapshot,
                    },
                );
            } else {
                i += 1;
            }
        }
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break "eof".to_string(),
            Ok(_) if buf.ends_with(b"\n") => {
                let line = std::mem::take(&mut buf);
                let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                log.put(conn, What::Event { event: ev.clone() });
                let kind = ev["event"].as_str().unwrap_or("").to_string();
                let Some(snapshot) = ev["snapshot"].as_u64() else {
                    continue;
                };
                let now = mono_ms();
                match kind.as_str() {
                    "freeze" => {
                        let lease_ms = ev["lease_ms"].as_u64();
                        // A new freeze replaces an older hold (that run is over).
                        hold.drop_all();
                        hold.freeze(snapshot, lease_ms, now);
                        held.store(true, Ordering::SeqCst);
                        log.put(conn, What::Hold { snapshot, lease_ms });
                    }
                    "thaw" | "abort" | "complete" => resume(hold.release(snapshot), &kind),
                    _ => {}
                }
                if matches!(kind.as_str(), "freeze" | "post_snapshot" | "thaw") {
                    let (op, delay) = faults.answer(&kind, snapshot);
                    pending.push((now + delay as f64, op, kind, snapshot));
                }
            }
            // A partial line (EOF mid-line): the next read says EOF.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => break e.to_string(),
        }
    };
    resume(hold.drop_all(), "disconnect");
    Ok(end)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_ends_on_its_own_outcome_its_lease_or_a_disconnect() {
        let mut h = Hold::default();
        h.freeze(3, Some(1000), 0.0);
        assert_eq!(
            h.release(2),
            None,
            "another snapshot's thaw does not resume"
        );
        assert_eq!(h.expire(999.0), None);
        assert_eq!(h.expire(1000.0), Some(3));
        assert_eq!(h, Hold::default());
        h.freeze(4, None, 0.0);
        assert_eq!(
            h.expire(1e9),
            None,
            "no lease_ms: only an outcome or a disconnect"
        );
        assert_eq!(h.drop_all(), Some(4));
        h.freeze(5, Some(10), 0.0);
        assert_eq!(h.release(5), Some(5));
        assert_eq!(h.release(5), None);
    }

    #[test]
    fn faults_apply_to_their_event_and_snapshot_only() {
        let f = Faults::parse(&["freeze=1500".into()], &["post_snapshot".into()], Some(1)).unwrap();
        assert_eq!(f.answer("freeze", 1), ("ack", 1500));
        assert_eq!(f.answer("post_snapshot", 1), ("veto", 0));
        assert_eq!(f.answer("freeze", 2), ("ack", 0));
        assert!(Faults::parse(&["freeze".into()], &[], None).is_err());
        assert!(Faults::parse(&[], &["commit".into()], None).is_err());
        assert!(Faults::parse(&["thaw=soon".into()], &[], None).is_err());
    }

    #[test]
    fn log_lines_round_trip() {
        let l = LogLine {
            t_ms: 12.5,
            conn: 2,
            what: What::Resume {
                snapshot: 7,
                why: "lease".into(),
            },
        };
        let s = serde_json::to_string(&l).unwrap();
        assert!(s.contains(r#""what":"resume""#), "{s}");
        assert_eq!(serde_json::from_str::<LogLine>(&s).unwrap(), l);
    }
}
