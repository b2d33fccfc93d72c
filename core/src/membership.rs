//! Who is attached to a shared volume, and the rule that decides who must
//! freeze for a snapshot (DESIGN.md §9, promise 3: "a snapshot is never taken
//! around a node").
//!
//! Every node that opens the volume through the engine keeps an
//! **attachment record** in the volume's state directory, on the shared
//! storage, and renews it well within its lease:
//!
//! ```text
//!  <state dir>/attach/<node>.json   {"node","host","pid","since_ms","renewed_ms","lease_ms"}
//! ```
//!
//! A clean stop removes it; a killed or cut-off node leaves it behind, aging.
//! Fences are in the catalog (see `volume::Fence`), so that every live write
//! sees them under the shared gate.
//!
//! [`plan`] is the safety rule, pure and tested here: every attached node is a
//! connected member (it will freeze), or fenced (it cannot write), or the
//! snapshot is refused naming it. Members that are neither connected nor
//! attached (stopped cleanly) are left out and named in the report.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::protocol::Excluded;
use crate::volume::Fence;

/// One node's attachment to the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub node: String,
    pub host: String,
    pub pid: u32,
    pub since_ms: u64,
    pub renewed_ms: u64,
    /// The node's lease: it renews at least every third of it, and stops
    /// writing by itself when it could not renew for a whole lease.
    pub lease_ms: u64,
}

impl Attachment {
    /// How long ago it was last renewed.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.renewed_ms)
    }

    /// Not renewed for two leases: the node stopped writing by itself at
    /// least a lease ago (it self-fences after one lease without renewal).
    pub fn expired(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) > self.lease_ms.saturating_mul(2)
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("attach")
}

fn file(state_dir: &Path, node: &str) -> Result<PathBuf> {
    // Node names are DNS-style labels (checked by the config); refuse anything
    // that could leave the folder.
    if node.is_empty() || node.contains('/') || node.starts_with('.') {
        return Err(Error::BadName {
            what: "node name",
            name: node.to_string(),
        });
    }
    Ok(dir(state_dir).join(format!("{node}.json")))
}

/// Writes (creates or renews) `a` atomically: a temporary file, fsynced,
/// renamed over the record.
pub fn store(state_dir: &Path, a: &Attachment) -> Result<()> {
    let d = dir(state_dir);
    std::fs::create_dir_all(&d).map_err(|e| Error::io("create", &d, e))?;
    let path = file(state_dir, &a.node)?;
    let tmp = d.join(format!(".{}.tmp", a.node));
    let body = serde_json::to_vec(a).map_err(|e| Error::io("encode", &path, e.into()))?;
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(&body)
            .map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_data().map_err(|e| Error::io("fdatasync", &tmp, e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| Error::io("rename", &path, e))?;
    Ok(())
}

/// Removes `node`'s record (a clean stop). Missing is fine.
pub fn remove(state_dir: &Path, node: &str) -> Result<()> {
    let path = file(state_dir, node)?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", &path, e)),
    }
}

/// Every attachment record; an unreadable one is an error naming the file
/// (it might be a node that must freeze: never skip it silently).
pub fn list(state_dir: &Path) -> Result<Vec<Attachment>> {
    let d = dir(state_dir);
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io("list", &d, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list", &d, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".json") {
            continue;
        }
        let p = entry.path();
        let text = std::fs::read(&p).map_err(|e| Error::io("read", &p, e))?;
        let a: Attachment = serde_json::from_slice(&text).map_err(|e| Error::Corrupt {
            file: p.clone(),
            why: format!("attachment record: {e}"),
        })?;
        out.push(a);
    }
    out.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(out)
}

/// What the safety rule decided for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Left out, with why (fenced, not attached, auto-fenced).
    pub excluded: Vec<Excluded>,
    /// Attached nodes whose attachment expired and that `auto_fence` lets
    /// the initiator fence now, before the snapshot.
    pub auto_fence: Vec<String>,
}

/// The refusal: which node, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub node: String,
    pub reason: String,
}

/// The safety rule for a snapshot initiated by `me`. `members` is the member
/// list (with or without `me`), `connected` the members the mesh connects now.
pub fn plan(
    me: &str,
    members: &[String],
    connected: &BTreeSet<String>,
    attached: &[Attachment],
    fenced: &BTreeMap<String, Fence>,
    auto_fence: bool,
    now_ms: u64,
) -> std::result::Result<Plan, Refusal> {
    let is_member = |n: &str| members.iter().any(|m| m == n);
    let mut excluded = Vec::new();
    let mut auto = Vec::new();
    for a in attached.iter().filter(|a| a.node != me) {
        if let Some(f) = fenced.get(&a.node) {
            excluded.push(Excluded {
                node: a.node.clone(),
                reason: format!("fenced by {}: {}", f.by, f.reason),
            });
            continue;
        }
        if is_member(&a.node) && connected.contains(&a.node) {
            continue;
        }
        let age_s = a.age_ms(now_ms) / 1000;
        if a.expired(now_ms) && auto_fence {
            auto.push(a.node.clone());
            excluded.push(Excluded {
                node: a.node.clone(),
                reason: format!(
                    "attachment not renewed for {age_s} s (more than two leases): fenced automatically"
                ),
            });
            continue;
        }
        let why = if !is_member(&a.node) {
            "is not in this node's member list"
        } else {
            "is not connected"
        };
        return Err(Refusal {
            node: a.node.clone(),
            reason: format!(
                "node {} is attached to the volume (host {}, renewed {age_s} s ago) but {why}; \
                 a snapshot would be taken around it. Bring it back, or fence it: freezeframe node fence {}",
                a.node, a.host, a.node
            ),
        });
    }
    for m in members.iter().filter(|m| *m != me) {
        let listed = excluded.iter().any(|e| &e.node == m);
        if listed {
            continue;
        }
        if let Some(f) = fenced.get(m) {
            excluded.push(Excluded {
                node: m.clone(),
                reason: format!("fenced by {}: {}", f.by, f.reason),
            });
        } else if !connected.contains(m) && !attached.iter().any(|a| &a.node == m) {
            excluded.push(Excluded {
                node: m.clone(),
                reason: "not attached to the volume (not running)".into(),
            });
        }
    }
    excluded.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(Plan {
        excluded,
        auto_fence: auto,
    })
}

#[cfg(test)]
mod tests {
    //! The safety rule against a table of cluster situations.
    use super::*;

    fn att(node: &str, renewed_ms: u64) -> Attachment {
        Attachment {
            node: node.into(),
            host: format!("host-{node}"),
            pid: 1,
            since_ms: 0,
            renewed_ms,
            lease_ms: 1_000,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn fence() -> Fence {
        Fence {
            at_ms: 1,
            by: "n1".into(),
            reason: "host down".into(),
        }
    }

    #[test]
    fn every_attached_member_connected_freezes_and_nobody_is_left_out() {
        let p = plan(
            "n1",
            &names(&["n1", "n2", "n3"]),
            &set(&["n2", "n3"]),
            &[att("n1", 100), att("n2", 100), att("n3", 100)],
            &BTreeMap::new(),
            false,
            500,
        )
        .unwrap();
        assert_eq!(p.excluded, vec![]);
    }

    #[test]
    fn an_attached_node_outside_the_member_list_refuses_the_snapshot_naming_it() {
        let r = plan(
            "n1",
            &names(&["n1", "n2"]),
            &set(&["n2"]),
            &[att("n1", 100), att("n2", 100), att("n3", 100)],
            &BTreeMap::new(),
            false,
            500,
        )
        .unwrap_err();
        assert_eq!(r.node, "n3");
        assert!(
            r.reason.contains("not in this node's member list"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn a_killed_node_blocks_until_it_is_fenced_then_is_excluded() {
        let attached = [att("n1", 100), att("n2", 100), att("n3", 100)];
        let members = names(&["n1", "n2", "n3"]);
        let r = plan(
            "n1",
            &members,
            &set(&["n2"]),
            &attached,
            &BTreeMap::new(),
            false,
            60_000,
        )
        .unwrap_err();
        assert_eq!(r.node, "n3");
        assert!(
            r.reason.contains("freezeframe node fence n3"),
            "{}",
            r.reason
        );
        let fenced = BTreeMap::from([("n3".to_string(), fence())]);
        let p = plan(
            "n1",
            &members,
            &set(&["n2"]),
            &attached,
            &fenced,
            false,
            60_000,
        )
        .unwrap();
        assert_eq!(
            p.excluded,
            vec![Excluded {
                node: "n3".into(),
                reason: "fenced by n1: host down".into()
            }]
        );
    }

    #[test]
    fn a_member_stopped_cleanly_is_left_out_and_named() {
        let p = plan(
            "n1",
            &names(&["n1", "n2", "n3"]),
            &set(&["n2"]),
            &[att("n1", 100), att("n2", 100)],
            &BTreeMap::new(),
            false,
            500,
        )
        .unwrap();
        assert_eq!(p.excluded.len(), 1);
        assert_eq!(p.excluded[0].node, "n3");
        assert!(p.excluded[0].reason.contains("not attached"));
    }

    #[test]
    fn auto_fence_excludes_only_attachments_older_than_two_leases() {
        let members = names(&["n1", "n2"]);
        let attached = [att("n1", 10_000), att("n2", 10_000)];
        // 1.5 leases without renewal: the node may still be writing.
        let r = plan(
            "n1",
            &members,
            &set(&[]),
            &attached,
            &BTreeMap::new(),
            true,
            11_500,
        );
        assert!(r.is_err(), "{r:?}");
        // Past two leases it stopped writing a lease ago (self-fencing).
        let p = plan(
            "n1",
            &members,
            &set(&[]),
            &attached,
            &BTreeMap::new(),
            true,
            12_001,
        )
        .unwrap();
        assert_eq!(p.auto_fence, vec!["n2".to_string()]);
        // Without auto_fence the operator must decide.
        assert!(plan(
            "n1",
            &members,
            &set(&[]),
            &attached,
            &BTreeMap::new(),
            false,
            99_000
        )
        .is_err());
    }

    #[test]
    fn records_round_trip_and_a_damaged_one_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        store(d.path(), &att("n2", 5)).unwrap();
        store(d.path(), &att("n1", 7)).unwrap();
        assert_eq!(list(d.path()).unwrap(), vec![att("n1", 7), att("n2", 5)]);
        remove(d.path(), "n2").unwrap();
        remove(d.path(), "n2").unwrap();
        assert_eq!(list(d.path()).unwrap(), vec![att("n1", 7)]);
        std::fs::write(d.path().join("attach/n3.json"), b"{not json").unwrap();
        let e = list(d.path()).unwrap_err().to_string();
        assert!(e.contains("n3.json"), "{e}");
        assert!(store(d.path(), &att("../evil", 1)).is_err());
    }
}
