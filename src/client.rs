//! Client commands: `status`, `snapshot …`, `events`. Each is one request on
//! the selected node's control socket, printed for people or, with `--json`,
//! as one JSON value for scripts.

use std::time::Duration;

use anyhow::{Context, Result};
use freezeframe_netproto::control::{ControlClient, ControlRequest};
use serde_json::Value;

use crate::config::NodeConfig;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// How long `status`, `snapshot list` and `snapshot show` wait for the node.
pub const QUICK_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `snapshot delete` waits (it may punch many holes in the diff area).
pub const DELETE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `snapshot verify` request on the control socket may take.
pub const VERIFY_CALL_TIMEOUT: Duration = Duration::from_secs(3600);
/// What `snapshot create` waits beyond the snapshot's own time bound (the lease,
/// or `--timeout` when shorter) for the report to arrive.
pub const CREATE_MARGIN: Duration = Duration::from_secs(5);

/// How long a client waits for the answer to `req` before giving up.
pub fn call_timeout(cfg: &NodeConfig, req: &ControlRequest) -> Duration {
    match req {
        ControlRequest::SnapshotCreate { timeout_ms } => {
            let bound = timeout_ms.map_or(cfg.lease_ms, |t| t.min(cfg.lease_ms));
            Duration::from_millis(bound) + CREATE_MARGIN
        }
        // A catalog change on shared storage, like a delete.
        ControlRequest::SnapshotDelete { .. }
        | ControlRequest::NodeFence { .. }
        | ControlRequest::NodeUnfence { .. } => DELETE_CALL_TIMEOUT,
        // Hashes the whole image: bounded, but by the volume's size, not a few seconds.
        ControlRequest::SnapshotVerify { .. } => VERIFY_CALL_TIMEOUT,
        _ => QUICK_CALL_TIMEOUT,
    }
}

/// The request's name as the CLI spells it, for errors.
fn request_name(req: &ControlRequest) -> &'static str {
    match req {
        ControlRequest::Status => "status",
        ControlRequest::SnapshotCreate { .. } => "snapshot create",
        ControlRequest::SnapshotList => "snapshot list",
        ControlRequest::SnapshotShow { .. } => "snapshot show",
        ControlRequest::SnapshotDelete { .. } => "snapshot delete",
        ControlRequest::SnapshotVerify { .. } => "snapshot verify",
        ControlRequest::Events => "events",
        ControlRequest::NodeFence { .. } => "node fence",
        ControlRequest::NodeUnfence { .. } => "node unfence",
        ControlRequest::NodeReload => "node reload",
    }
}

/// One request, one answer, on a throwaway runtime, within [`call_timeout`].
pub fn call_blocking(cfg: &NodeConfig, req: &ControlRequest) -> Result<Value> {
    call_within(cfg, req, call_timeout(cfg, req))
}

/// One request, one answer, waiting at most `limit` (connecting included).
pub fn call_within(cfg: &NodeConfig, req: &ControlRequest, limit: Duration) -> Result<Value> {
    let path = cfg.control_socket();
    runtime()?.block_on(async {
        let call = async {
            let mut c = ControlClient::connect(&path)
                .await
                .with_context(|| format!("node {} is not running", cfg.name()))?;
            c.call(req)
                .await
                .with_context(|| format!("node {}", cfg.name()))
        };
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r,
            Err(_) => anyhow::bail!(
                "node {} did not answer `{}` within {} ms (control socket {}); it may be \
                 hung — see its log",
                cfg.name(),
                request_name(req),
                limit.as_millis(),
                path.display()
            ),
        }
    })
}

fn print(json: bool, v: &Value, human: impl FnOnce(&Value) -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", human(v));
    }
}

pub fn status(cfg: &NodeConfig, json: bool) -> Result<()> {
    let v = call_blocking(cfg, &ControlRequest::Status)?;
    print(json, &v, human_status);
    Ok(())
}

fn human_status(v: &Value) -> String {
    let mut s = format!(
        "node {}  phase {}  volume {}\n",
        v["node"].as_str().unwrap_or("?"),
        v["phase"].as_str().unwrap_or("?"),
        v["volume"].as_str().unwrap_or("?")
    );
    if let Some(snap) = v["in_flight"].as_u64() {
        s += &format!("snapshot in flight: {snap}\n");
    }
    s += &format!(
        "member list digest: {}\n",
        v["members_digest"].as_str().unwrap_or("?")
    );
    s += "peers:\n";
    for p in v["peers"].as_array().into_iter().flatten() {
        s += &format!(
            "  {:<10} {}\n",
            p["node"].as_str().unwrap_or("?"),
            if p["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "disconnected"
            }
        );
        if let Some(why) = p["members_differ"].as_str() {
            s += &format!("             MEMBER LIST DIFFERS: {why}\n");
        }
    }
    s += "attached:\n";
    for a in v["attached"]["nodes"].as_array().into_iter().flatten() {
        let fenced = &a["fenced"];
        let state = if !fenced.is_null() {
            format!(
                "FENCED by {}: {}",
                fenced["by"].as_str().unwrap_or("?"),
                fenced["reason"].as_str().unwrap_or("?")
            )
        } else if a["expired"].as_bool() == Some(true) {
            "lease EXPIRED".to_string()
        } else {
            "lease held".to_string()
        };
        s += &format!(
            "  {:<10} host {:<16} lease age {:>6} ms  {state}\n",
            a["node"].as_str().unwrap_or("?"),
            a["host"].as_str().unwrap_or("?"),
            a["lease_age_ms"].as_u64().unwrap_or(0),
        );
    }
    s += "writers:\n";
    for w in v["writers"].as_array().into_iter().flatten() {
        s += &format!(
            "  {:<20} {}\n",
            w["name"].as_str().unwrap_or("?"),
            w["state"].as_str().unwrap_or("?")
        );
    }
    s
}

/// `snapshot create`: exits non-zero when the snapshot failed.
pub fn snapshot_create(cfg: &NodeConfig, timeout_ms: Option<u64>, json: bool) -> Result<bool> {
    let v = call_blocking(cfg, &ControlRequest::SnapshotCreate { timeout_ms })?;
    let ok = v["status"].as_str() == Some("complete");
    print(json, &v, |v| {
        if ok {
            let mut s = format!(
                "snapshot {} complete (initiator {}, freeze window {} ms)\n",
                v["id"],
                v["initiator"].as_str().unwrap_or("?"),
                v["freeze_window_ms"]
            );
            for n in v["nodes"].as_array().into_iter().flatten() {
                s += &format!("  {}:", n["node"].as_str().unwrap_or("?"));
                for p in n["phases"].as_array().into_iter().flatten() {
                    let d = p["end_ms"]
                        .as_u64()
                        .unwrap_or(0)
                        .saturating_sub(p["start_ms"].as_u64().unwrap_or(0));
                    s += &format!(" {} {d}ms", p["name"].as_str().unwrap_or("?"));
                }
                s += "\n";
            }
            s
        } else {
            failure_line(v)
        }
    });
    Ok(ok)
}

/// One line for a failed report: who failed, where, why. A refusal before
/// any snapshot started (busy, no lock) says so instead of naming snapshot 0.
fn failure_line(v: &Value) -> String {
    let Ok(report) = serde_json::from_value::<freezeframe_core::protocol::Report>(v.clone()) else {
        return format!("snapshot failed: {v}\n");
    };
    let Some(e) = report.error.as_ref() else {
        return format!("snapshot {} failed without a reason\n", report.id);
    };
    if report.is_busy() || report.id == 0 {
        return format!("snapshot refused by node {}: {}\n", e.node, e.reason);
    }
    let who = match e.writer.as_deref() {
        Some("hooks.d") => " (hooks.d)".to_string(),
        Some(w) => format!(" (writer {w})"),
        None => String::new(),
    };
    format!(
        "snapshot {} failed on node {}{who} in {}: {}\n",
        report.id, e.node, e.phase, e.reason
    )
}

pub fn snapshot_list(cfg: &NodeConfig, json: bool) -> Result<()> {
    let v = call_blocking(cfg, &ControlRequest::SnapshotList)?;
    print(json, &v, |v| {
        let mut s = format!(
            "{:<6} {:<24} {:<10} {:<10} {:>12}  {}\n",
            "ID", "CREATED", "INITIATOR", "STATUS", "DIFF", "PATH"
        );
        for x in v.as_array().into_iter().flatten() {
            s += &format!(
                "{:<6} {:<24} {:<10} {:<10} {:>12}  {}\n",
                x["id"].as_u64().map(|i| i.to_string()).unwrap_or_default(),
                fmt_time(x["created_ms"].as_u64().unwrap_or(0)),
                x["initiator"].as_str().unwrap_or("-"),
                x["status"].as_str().unwrap_or("?"),
                crate::human_bytes(x["diff_bytes"].as_u64().unwrap_or(0)),
                x["path"].as_str().unwrap_or("")
            );
        }
        s
    });
    Ok(())
}

pub fn snapshot_show(cfg: &NodeConfig, id: u64, json: bool) -> Result<()> {
    let v = call_blocking(cfg, &ControlRequest::SnapshotShow { id })?;
    print(json, &v, |v| {
        serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
    });
    Ok(())
}

pub fn snapshot_delete(cfg: &NodeConfig, id: u64, json: bool) -> Result<()> {
    let v = call_blocking(cfg, &ControlRequest::SnapshotDelete { id })?;
    print(json, &v, |_| format!("snapshot {id} deleted\n"));
    Ok(())
}

pub fn node_fence(cfg: &NodeConfig, node: &str, reason: Option<String>, json: bool) -> Result<()> {
    let req = ControlRequest::NodeFence {
        node: node.to_string(),
        reason,
    };
    let v = call_blocking(cfg, &req)?;
    print(json, &v, |v| {
        format!(
            "node {node} is fenced ({}); its live writes fail and snapshots go on without it\n",
            v["reason"].as_str().unwrap_or("")
        )
    });
    Ok(())
}

pub fn node_reload(cfg: &NodeConfig, json: bool) -> Result<()> {
    let v = call_blocking(cfg, &ControlRequest::NodeReload)?;
    print(json, &v, |v| {
        format!(
            "node {} reloaded its member list: {} (added {}, removed {})\n",
            cfg.name(),
            v["members"],
            v["added"],
            v["removed"]
        )
    });
    Ok(())
}

pub fn node_unfence(cfg: &NodeConfig, node: &str, json: bool) -> Result<()> {
    let req = ControlRequest::NodeUnfence {
        node: node.to_string(),
    };
    let v = call_blocking(cfg, &req)?;
    print(json, &v, |v| {
        if v["was_fenced"].as_bool() == Some(true) {
            format!("node {node} is no longer fenced; it takes part in the next snapshot\n")
        } else {
            format!("node {node} was not fenced\n")
        }
    });
    Ok(())
}

/// Hashes the snapshot image straight from shared storage (the node's volume) and
/// compares it with the hash recorded at seal time (recording one only when none
/// exists); with `progress` prints `{"progress":{…}}` lines on stderr for the console.
pub fn snapshot_verify(cfg: &NodeConfig, id: u64, json: bool, progress: bool) -> Result<()> {
    let volume = cfg
        .open_volume()
        .with_context(|| format!("node {}: opening the shared volume", cfg.name()))?;
    let mut last = std::time::Instant::now();
    let v = crate::node::verify_snapshot(&volume, id, &mut |done, total| {
        if progress && (done == total || last.elapsed() >= std::time::Duration::from_millis(100)) {
            last = std::time::Instant::now();
            eprintln!(
                "{}",
                serde_json::json!({"progress": {"done": done, "total": total, "unit": "bytes"}})
            );
        }
    })?;
    print(json, &v, |v| {
        let hash = v["blake3"].as_str().unwrap_or("?");
        match v["outcome"].as_str() {
            Some("recorded") => format!(
                "snapshot {id}: no hash was recorded at seal time; recorded blake3 {hash} now\n"
            ),
            Some("not_recorded") => {
                format!("snapshot {id}: blake3 {hash} (the snapshot is still open: not recorded)\n")
            }
            _ => format!("snapshot {id}: blake3 {hash} matches the hash recorded at seal time\n"),
        }
    });
    Ok(())
}

/// Follows the event stream until the node goes away or the user interrupts.
pub fn events(cfg: &NodeConfig, json: bool) -> Result<()> {
    let path = cfg.control_socket();
    runtime()?.block_on(async {
        // Connecting and subscribing are bounded; the stream itself runs until the end.
        let mut c = tokio::time::timeout(QUICK_CALL_TIMEOUT, async {
            let mut c = ControlClient::connect(&path)
                .await
                .with_context(|| format!("node {} is not running", cfg.name()))?;
            c.subscribe().await?;
            Ok::<_, anyhow::Error>(c)
        })
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "node {} did not accept `events` within {} ms (control socket {})",
                cfg.name(),
                QUICK_CALL_TIMEOUT.as_millis(),
                path.display()
            )
        })??;
        while let Some(ev) = c.next_event().await? {
            if json {
                println!("{ev}");
            } else if ev["kind"] == "snapshot_invalid" {
                println!(
                    "{}  {:<6} snapshot {:<4} ! INVALID ({}): {}",
                    fmt_time(ev["at_ms"].as_u64().unwrap_or(0)),
                    ev["node"].as_str().unwrap_or("?"),
                    ev["snapshot"],
                    ev["cause"].as_str().unwrap_or("?"),
                    ev["reason"].as_str().unwrap_or("?")
                );
            } else {
                let marker = match ev["edge"].as_str() {
                    Some("enter") => "→",
                    Some("exit") => "←",
                    _ => " ",
                };
                println!(
                    "{}  {:<6} snapshot {:<4} {marker} {:<14}{}{}",
                    fmt_time(ev["at_ms"].as_u64().unwrap_or(0)),
                    ev["node"].as_str().unwrap_or("?"),
                    ev["snapshot"],
                    ev["phase"].as_str().unwrap_or("?"),
                    ev["writer"]
                        .as_str()
                        .map(|w| format!(" writer {w}"))
                        .unwrap_or_default(),
                    ev["reason"]
                        .as_str()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
            }
        }
        Ok(())
    })
}

/// UTC time as `2026-11-22 02:31:07.123`.
pub fn fmt_time(ms: u64) -> String {
    format!(
        "{}.{:03}",
        freezeframe_core::units::utc_seconds(ms),
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc_times() {
        assert_eq!(super::fmt_time(0), "1970-01-01 00:00:00.000");
        assert_eq!(
            super::fmt_time(1_795_313_600_123),
            "2026-11-22 02:13:20.123"
        );
    }
}
