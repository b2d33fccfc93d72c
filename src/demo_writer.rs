//! The demo application: a writer whose consistency can be checked.
//!
//! It takes numbered records in memory and writes them, in batches, into its
//! own region of the live volume through its node's mount. On `freeze` it
//! writes every record it has taken, fsyncs, stops taking records, writes down
//! how many it had (its *freeze count* for that snapshot) and only then acks.
//! On `thaw`/`abort` it goes on. A snapshot is application-consistent for
//! this writer exactly when the writer's region in the snapshot holds records
//! `0..count` intact and nothing after them — [`check_region`] says so.
//!
//! Record layout (64 bytes): `FFREC <writer:16> <seq:010> <crc:08>\n`, where the
//! crc (blake3, first 4 bytes, hex) covers writer and seq; padding with spaces.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub const RECORD: usize = 64;

pub fn record(writer: &str, seq: u64) -> [u8; RECORD] {
    let crc = crc_of(writer, seq);
    let s = format!("FFREC {writer:<16.16} {seq:010} {crc}");
    let mut r = [b' '; RECORD];
    r[..s.len()].copy_from_slice(s.as_bytes());
    r[RECORD - 1] = b'\n';
    r
}

fn crc_of(writer: &str, seq: u64) -> String {
    let h = blake3::hash(format!("{writer}/{seq}").as_bytes());
    h.to_hex()[..8].to_string()
}

/// What a region of an image holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionCheck {
    /// Records `0..records` present and intact, in order.
    pub records: u64,
    /// Why the region is not a clean prefix, if it is not.
    pub problem: Option<String>,
    /// The snapshot whose post-snapshot processing marked the region's last record.
    pub post_mark: Option<u64>,
}

/// Reads a writer's region and checks it holds a clean prefix of its records
/// (and, in its last record, nothing or a valid post-snapshot mark).
pub fn check_region(image: &Path, offset: u64, len: u64, writer: &str) -> Result<RegionCheck> {
    let f = std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset)
        .with_context(|| format!("reading {} at {offset}", image.display()))?;
    let (body, last) = buf.split_at(buf.len().saturating_sub(RECORD));
    let post_mark = if last.iter().all(|&b| b == 0) {
        None
    } else {
        let text = String::from_utf8_lossy(last);
        let parsed = text
            .strip_prefix("POSTSNAP ")
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|&id| last == post_mark(writer, id));
        match parsed {
            Some(id) => Some(id),
            None => {
                return Ok(RegionCheck {
                    records: 0,
                    problem: Some(format!("the last record of {writer}'s region is neither empty nor a post-snapshot mark")),
                    post_mark: None,
                })
            }
        }
    };
    let mut n = 0u64;
    for chunk in body.chunks(RECORD) {
        if chunk.iter().all(|&b| b == 0) {
            break;
        }
        if chunk != record(writer, n) {
            return Ok(RegionCheck {
                records: n,
                problem: Some(format!("record {n} of {writer} is torn or out of order")),
                post_mark,
            });
        }
        n += 1;
    }
    // Everything after the prefix must be untouched (zero).
    let rest = &body[(n as usize * RECORD).min(body.len())..];
    if let Some(p) = rest.iter().position(|&b| b != 0) {
        return Ok(RegionCheck {
            records: n,
            problem: Some(format!(
                "bytes after record {n} are not empty (offset {})",
                n as usize * RECORD + p
            )),
            post_mark,
        });
    }
    Ok(RegionCheck {
        records: n,
        problem: None,
        post_mark,
    })
}

/// The freeze counts a writer recorded, by snapshot id (`<log>` is JSON lines).
pub fn read_freeze_log(path: &Path) -> Result<BTreeMap<u64, u64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut m = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let e: FreezeLogEntry =
            serde_json::from_str(line).with_context(|| format!("{}: {line}", path.display()))?;
        m.insert(e.snapshot, e.records);
    }
    Ok(m)
}

#[derive(Debug, Serialize, Deserialize)]
struct FreezeLogEntry {
    snapshot: u64,
    records: u64,
}

pub struct Options {
    pub socket: PathBuf,
    pub volume: PathBuf,
    pub name: String,
    pub offset: u64,
    pub len: u64,
    pub log: PathBuf,
    pub interval: Duration,
    /// Test knobs: veto every freeze, or never answer one.
    pub veto: bool,
    pub silent: bool,
    pub freeze_timeout_ms: u64,
    /// On post_snapshot, write [`post_mark`] into the last record of its region
    /// of the virtual snapshot (at the path the node sends), then ack.
    pub post_mark: bool,
}

/// What `--post-mark` writes into a snapshot during post-snapshot processing.
pub fn post_mark(writer: &str, snapshot: u64) -> [u8; RECORD] {
    let s = format!("POSTSNAP {writer:<16.16} {snapshot:010}");
    let mut r = [b' '; RECORD];
    r[..s.len()].copy_from_slice(s.as_bytes());
    r[RECORD - 1] = b'\n';
    r
}

struct State {
    taken: u64,
    written: u64,
    frozen: bool,
    /// The freeze's lease: past it the writer resumes by itself (the node is
    /// gone or hung; the writer protocol says so).
    frozen_until: Option<std::time::Instant>,
}

/// Runs until the node closes the writer socket.
pub fn run(opts: Options) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&opts.volume)
        .with_context(|| format!("opening the live volume {}", opts.volume.display()))?;
    // The last record of the region is kept for the post-snapshot mark.
    let capacity = opts.len / RECORD as u64 - 1;
    let state = Arc::new((
        Mutex::new(State {
            taken: 0,
            written: 0,
            frozen: false,
            frozen_until: None,
        }),
        Condvar::new(),
    ));
    let file = Arc::new(file);

    // Flushes records taken but not yet written; returns how many are durable.
    let flush = {
        let (file, name, offset) = (file.clone(), opts.name.clone(), opts.offset);
        move |st: &mut State| -> Result<u64> {
            if st.written < st.taken {
                let mut buf = Vec::with_capacity(((st.taken - st.written) as usize) * RECORD);
                for seq in st.written..st.taken {
                    buf.extend_from_slice(&record(&name, seq));
                }
                file.write_all_at(&buf, offset + st.written * RECORD as u64)?;
                st.written = st.taken;
            }
            file.sync_data()?;
            Ok(st.written)
        }
    };

    {
        let state = state.clone();
        let flush = flush.clone();
        let interval = opts.interval;
        std::thread::spawn(move || {
            let (m, cv) = &*state;
            let mut since_flush = 0;
            loop {
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                while st.frozen {
                    match st.frozen_until {
                        Some(t) if std::time::Instant::now() >= t => {
                            eprintln!(
                                "demo writer: the freeze lease passed without thaw; resuming"
                            );
                            st.frozen = false;
                        }
                        Some(t) => {
                            let left = t.saturating_duration_since(std::time::Instant::now());
                            st = cv
                                .wait_timeout(st, left)
                                .map(|(g, _)| g)
                                .unwrap_or_else(|e| e.into_inner().0);
                        }
                        None => st = cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                    }
                }
                if st.taken < capacity {
                    st.taken += 1;
                    since_flush += 1;
                }
                if since_flush >= 8 {
                    since_flush = 0;
                    if let Err(e) = flush(&mut st) {
                        eprintln!("demo writer: write failed: {e:#}");
                    }
                }
                drop(st);
                std::thread::sleep(interval);
            }
        });
    }

    let stream = std::os::unix::net::UnixStream::connect(&opts.socket)
        .with_context(|| format!("connecting to the writer socket {}", opts.socket.display()))?;
    let mut out = stream.try_clone()?;
    let send = |out: &mut std::os::unix::net::UnixStream, v: serde_json::Value| -> Result<()> {
        let mut l = serde_json::to_vec(&v)?;
        l.push(b'\n');
        out.write_all(&l)?;
        Ok(())
    };
    send(
        &mut out,
        serde_json::json!({"op":"register","name":opts.name,"freeze_timeout_ms":opts.freeze_timeout_ms}),
    )?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&opts.log)?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let ev: serde_json::Value = serde_json::from_str(&line)?;
        let kind = ev["event"].as_str().unwrap_or("").to_string();
        let snap = ev["snapshot"].as_u64();
        let (m, cv) = &*state;
        match (kind.as_str(), snap) {
            ("registered", _) => continue,
            ("error", _) => bail!("node rejected a line: {}", ev["message"]),
            ("freeze", Some(s)) => {
                if opts.silent {
                    continue;
                }
                if opts.veto {
                    send(
                        &mut out,
                        serde_json::json!({"op":"veto","event":"freeze","snapshot":s,"reason":"demo writer told to veto"}),
                    )?;
                    continue;
                }
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                st.frozen = true;
                st.frozen_until = ev["lease_ms"]
                    .as_u64()
                    .map(|ms| std::time::Instant::now() + std::time::Duration::from_millis(ms));
                let n = flush(&mut st)?;
                writeln!(log, "{}", serde_json::json!({"snapshot": s, "records": n}))?;
                log.sync_data()?;
            }
            ("thaw" | "abort", Some(_)) => {
                let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
                st.frozen = false;
                st.frozen_until = None;
                cv.notify_all();
                if kind == "abort" {
                    continue; // an outcome: no answer
                }
            }
            // The outcome of a snapshot that was kept: no answer.
            ("complete", Some(_)) => continue,
            ("post_snapshot", Some(s)) => {
                if opts.post_mark {
                    let path = ev["path"].as_str().unwrap_or_default();
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .with_context(|| format!("opening the virtual snapshot {path}"))?;
                    f.write_all_at(
                        &post_mark(&opts.name, s),
                        opts.offset + opts.len - RECORD as u64,
                    )?;
                    f.sync_data()?;
                }
            }
            _ => bail!("unexpected event from node: {line}"),
        }
        if let Some(s) = snap {
            send(
                &mut out,
                serde_json::json!({"op":"ack","event":kind,"snapshot":s}),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_prefix_is_consistent_and_a_torn_record_is_not() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("img");
        let mut data = vec![0u8; 64 * 100];
        for i in 0..10u64 {
            data[(i as usize) * 64..(i as usize + 1) * 64].copy_from_slice(&record("w1", i));
        }
        std::fs::write(&img, &data).unwrap();
        let c = check_region(&img, 0, data.len() as u64, "w1").unwrap();
        assert_eq!(
            c,
            RegionCheck {
                records: 10,
                problem: None,
                post_mark: None
            }
        );

        data[5 * 64 + 20] ^= 1;
        std::fs::write(&img, &data).unwrap();
        let c = check_region(&img, 0, data.len() as u64, "w1").unwrap();
        assert_eq!(c.records, 5);
        assert!(c.problem.unwrap().contains("record 5"));
    }

    #[test]
    fn a_post_snapshot_mark_in_the_last_record_is_recognised() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("img");
        let mut data = vec![0u8; 64 * 10];
        data[..64].copy_from_slice(&record("w", 0));
        data[9 * 64..].copy_from_slice(&post_mark("w", 12));
        std::fs::write(&img, &data).unwrap();
        let c = check_region(&img, 0, data.len() as u64, "w").unwrap();
        assert_eq!(
            c,
            RegionCheck {
                records: 1,
                problem: None,
                post_mark: Some(12)
            }
        );
        data[9 * 64..].copy_from_slice(&post_mark("other", 12));
        std::fs::write(&img, &data).unwrap();
        assert!(check_region(&img, 0, data.len() as u64, "w")
            .unwrap()
            .problem
            .is_some());
    }

    #[test]
    fn a_record_after_a_gap_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("img");
        let mut data = vec![0u8; 64 * 10];
        data[..64].copy_from_slice(&record("w", 0));
        data[3 * 64..4 * 64].copy_from_slice(&record("w", 3));
        std::fs::write(&img, &data).unwrap();
        let c = check_region(&img, 0, data.len() as u64, "w").unwrap();
        assert_eq!(c.records, 1);
        assert!(c.problem.is_some());
    }
}
