//! The two providers the coordinator can commit through (seed 001, \[0050\],
//! \[0058\]): the [`StorageProvider`] on the initiator asks the driver to make the
//! real block snapshot; the [`HelperProvider`] on every other node stands in
//! for it: it tells the cluster service that the node is committed (frozen and
//! flushed), then blocks until the initiator's post-snapshot.
//!
//! Both do flush-and-hold the same way ([`IoHold`]): hold the node's live I/O
//! through the engine, then flush it. The seed routes flush-and-hold on the
//! other nodes nowhere; here each node's engine handle may still buffer writes
//! that must reach shared storage before the initiator commits, and its non-
//! writer I/O must stay held until the snapshot exists, so every node holds.
//!
//! Call order (by the coordinator): `FlushAndHold` → `Commit` → `Release` →
//! `Complete`, or `Abort` at any point. `FlushAndHold`, `Commit` and
//! `Complete` return through [`ProvOut::Return`].

use super::types::SnapshotId;
use std::collections::VecDeque;
use std::fmt;

/// Which provider a run commits through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    Storage,
    Helper,
}

impl ProviderKind {
    /// The name of the phase the coordinator is in while this provider
    /// flushes, holds and commits: `committing` when a block snapshot is made
    /// here, `frozen` when the node only waits for the initiator.
    pub fn commit_phase(self) -> super::Phase {
        match self {
            ProviderKind::Storage => super::Phase::Committing,
            ProviderKind::Helper => super::Phase::Frozen,
        }
    }

    /// Whether a run through this provider knows the snapshot's outcome when
    /// it ends: the storage provider sealed it; the helper provider only
    /// stood in, and the outcome comes later from the initiator.
    pub fn decides_outcome(self) -> bool {
        self == ProviderKind::Storage
    }
}

/// A call from the coordinator to its provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderCall {
    FlushAndHold,
    Commit,
    Release,
    /// After post-snapshot: make the snapshot final (seal it).
    Complete,
    Abort,
}

impl fmt::Display for ProviderCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProviderCall::FlushAndHold => "flush-and-hold",
            ProviderCall::Commit => "commit",
            ProviderCall::Release => "release",
            ProviderCall::Complete => "complete",
            ProviderCall::Abort => "abort",
        })
    }
}

/// An engine action a provider asks the driver for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineOp {
    HoldIo,
    ReleaseIo,
    FlushVolume,
    CreateSnapshot,
    SealSnapshot,
    DeleteSnapshot,
}

/// What a provider produces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProvOut {
    Engine {
        snapshot: SnapshotId,
        op: EngineOp,
    },
    /// Return from a call to the coordinator.
    Return {
        snapshot: SnapshotId,
        call: ProviderCall,
        result: Result<(), String>,
    },
    /// Helper provider → cluster service: the coordinator committed; this
    /// node is frozen and flushed.
    Committed {
        snapshot: SnapshotId,
    },
}

/// Hold-then-flush of one node's live I/O, and its release.
#[derive(Debug, Default)]
pub struct IoHold {
    /// Hold asked of the driver and not yet released.
    held: bool,
    /// Waiting for the hold to take effect, then for the flush.
    step: Option<HoldStep>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HoldStep {
    Holding,
    Flushing,
}

impl IoHold {
    fn start(&mut self, snapshot: SnapshotId, out: &mut VecDeque<ProvOut>) {
        self.held = true;
        self.step = Some(HoldStep::Holding);
        out.push_back(ProvOut::Engine {
            snapshot,
            op: EngineOp::HoldIo,
        });
    }

    fn hold_done(&mut self, snapshot: SnapshotId, out: &mut VecDeque<ProvOut>) {
        if self.step == Some(HoldStep::Holding) {
            self.step = Some(HoldStep::Flushing);
            out.push_back(ProvOut::Engine {
                snapshot,
                op: EngineOp::FlushVolume,
            });
        }
    }

    fn flush_done(
        &mut self,
        snapshot: SnapshotId,
        result: Result<(), String>,
        out: &mut VecDeque<ProvOut>,
    ) {
        if self.step == Some(HoldStep::Flushing) {
            self.step = None;
            let result = result.map_err(|e| format!("flushing the volume failed: {e}"));
            out.push_back(ProvOut::Return {
                snapshot,
                call: ProviderCall::FlushAndHold,
                result,
            });
        }
    }

    fn release(&mut self, snapshot: SnapshotId, out: &mut VecDeque<ProvOut>) {
        self.step = None;
        if std::mem::take(&mut self.held) {
            out.push_back(ProvOut::Engine {
                snapshot,
                op: EngineOp::ReleaseIo,
            });
        }
    }

    /// Is the node's live I/O held right now (asked and not released)?
    pub fn held(&self) -> bool {
        self.held
    }
}

/// The initiator's provider: makes, seals, and on abort deletes, the block
/// snapshot through the driver.
#[derive(Debug, Default)]
pub struct StorageProvider {
    snapshot: Option<SnapshotId>,
    pub(crate) io: IoHold,
    /// CreateSnapshot was asked of the driver and its result not yet seen.
    create_pending: bool,
    created: bool,
    seal_pending: bool,
    out: VecDeque<ProvOut>,
}

impl StorageProvider {
    /// A call from the coordinator.
    pub fn call(&mut self, snapshot: SnapshotId, call: ProviderCall) {
        match call {
            ProviderCall::FlushAndHold => {
                // A new run: forget everything of the last one.
                self.reset();
                self.snapshot = Some(snapshot);
                self.io.start(snapshot, &mut self.out);
            }
            ProviderCall::Commit => {
                self.create_pending = true;
                self.out.push_back(ProvOut::Engine {
                    snapshot,
                    op: EngineOp::CreateSnapshot,
                });
            }
            ProviderCall::Release => self.io.release(snapshot, &mut self.out),
            ProviderCall::Complete => {
                self.seal_pending = true;
                self.out.push_back(ProvOut::Engine {
                    snapshot,
                    op: EngineOp::SealSnapshot,
                });
            }
            ProviderCall::Abort => {
                self.io.release(snapshot, &mut self.out);
                // A create still in flight may yet succeed: delete after it
                // (the driver runs actions in order), so nothing half-made stays.
                if self.created || self.create_pending {
                    self.out.push_back(ProvOut::Engine {
                        snapshot,
                        op: EngineOp::DeleteSnapshot,
                    });
                }
                self.reset();
            }
        }
    }

    fn reset(&mut self) {
        self.snapshot = None;
        self.io = IoHold::default();
        self.create_pending = false;
        self.created = false;
        self.seal_pending = false;
    }

    pub fn hold_done(&mut self, snapshot: SnapshotId) {
        if self.snapshot == Some(snapshot) {
            self.io.hold_done(snapshot, &mut self.out);
        }
    }

    pub fn flush_done(&mut self, snapshot: SnapshotId, result: Result<(), String>) {
        if self.snapshot == Some(snapshot) {
            self.io.flush_done(snapshot, result, &mut self.out);
        }
    }

    /// The driver's answer to CreateSnapshot.
    pub fn created(&mut self, snapshot: SnapshotId, result: Result<(), String>) {
        if self.snapshot != Some(snapshot) || !std::mem::take(&mut self.create_pending) {
            return;
        }
        self.created = result.is_ok();
        let result = result.map_err(|e| format!("creating snapshot {snapshot} failed: {e}"));
        self.out.push_back(ProvOut::Return {
            snapshot,
            call: ProviderCall::Commit,
            result,
        });
    }

    /// The driver's answer to SealSnapshot.
    pub fn sealed(&mut self, snapshot: SnapshotId, result: Result<(), String>) {
        if self.snapshot != Some(snapshot) || !std::mem::take(&mut self.seal_pending) {
            return;
        }
        let result = result.map_err(|e| format!("sealing snapshot {snapshot} failed: {e}"));
        if result.is_ok() {
            // Sealed: the run is over for the provider.
            self.snapshot = None;
            self.created = false;
        }
        self.out.push_back(ProvOut::Return {
            snapshot,
            call: ProviderCall::Complete,
            result,
        });
    }

    pub fn poll(&mut self) -> Option<ProvOut> {
        self.out.pop_front()
    }
}

/// The provider on every node but the initiator. Its commit makes nothing: it
/// reports "committed" to the cluster service and blocks until the
/// initiator's post-snapshot ([`HelperProvider::post_snapshot`]).
#[derive(Debug, Default)]
pub struct HelperProvider {
    snapshot: Option<SnapshotId>,
    pub(crate) io: IoHold,
    blocked_in_commit: bool,
    out: VecDeque<ProvOut>,
}

impl HelperProvider {
    pub fn call(&mut self, snapshot: SnapshotId, call: ProviderCall) {
        match call {
            ProviderCall::FlushAndHold => {
                self.snapshot = Some(snapshot);
                self.blocked_in_commit = false;
                self.io.start(snapshot, &mut self.out);
            }
            ProviderCall::Commit => {
                self.blocked_in_commit = true;
                self.out.push_back(ProvOut::Committed { snapshot });
            }
            ProviderCall::Release => self.io.release(snapshot, &mut self.out),
            ProviderCall::Complete => {
                self.snapshot = None;
                let ret = ProvOut::Return {
                    snapshot,
                    call: ProviderCall::Complete,
                    result: Ok(()),
                };
                self.out.push_back(ret);
            }
            ProviderCall::Abort => {
                self.io.release(snapshot, &mut self.out);
                self.blocked_in_commit = false;
                self.snapshot = None;
            }
        }
    }

    pub fn hold_done(&mut self, snapshot: SnapshotId) {
        if self.snapshot == Some(snapshot) {
            self.io.hold_done(snapshot, &mut self.out);
        }
    }

    pub fn flush_done(&mut self, snapshot: SnapshotId, result: Result<(), String>) {
        if self.snapshot == Some(snapshot) {
            self.io.flush_done(snapshot, result, &mut self.out);
        }
    }

    /// Cluster service → helper: the initiator sent post-snapshot; return from
    /// commit.
    pub fn post_snapshot(&mut self, snapshot: SnapshotId) {
        if self.snapshot == Some(snapshot) && std::mem::take(&mut self.blocked_in_commit) {
            self.out.push_back(ProvOut::Return {
                snapshot,
                call: ProviderCall::Commit,
                result: Ok(()),
            });
        }
    }

    pub fn poll(&mut self) -> Option<ProvOut> {
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut StorageProvider) -> Vec<ProvOut> {
        std::iter::from_fn(|| p.poll()).collect()
    }

    fn engine(op: EngineOp) -> ProvOut {
        ProvOut::Engine { snapshot: 2, op }
    }

    #[test]
    fn abort_while_create_is_in_flight_deletes_after_it_and_releases_the_hold() {
        let mut p = StorageProvider::default();
        p.call(2, ProviderCall::FlushAndHold);
        p.hold_done(2);
        p.flush_done(2, Ok(()));
        p.call(2, ProviderCall::Commit);
        drain(&mut p);
        p.call(2, ProviderCall::Abort);
        assert_eq!(
            drain(&mut p),
            vec![
                engine(EngineOp::ReleaseIo),
                engine(EngineOp::DeleteSnapshot)
            ]
        );
        p.created(2, Ok(()));
        assert_eq!(
            drain(&mut p),
            vec![],
            "the late result of an aborted create is ignored"
        );
    }

    #[test]
    fn abort_before_commit_creates_nothing_to_delete() {
        let mut p = StorageProvider::default();
        p.call(2, ProviderCall::FlushAndHold);
        p.call(2, ProviderCall::Abort);
        assert_eq!(
            drain(&mut p),
            vec![engine(EngineOp::HoldIo), engine(EngineOp::ReleaseIo)]
        );
    }

    #[test]
    fn flush_failure_returns_from_flush_and_hold_with_the_reason() {
        let mut p = StorageProvider::default();
        p.call(2, ProviderCall::FlushAndHold);
        p.flush_done(2, Ok(()));
        assert_eq!(
            drain(&mut p),
            vec![engine(EngineOp::HoldIo)],
            "no flush result before the hold took effect"
        );
        p.hold_done(2);
        p.flush_done(2, Err("EIO".into()));
        let result = Err("flushing the volume failed: EIO".to_string());
        assert_eq!(
            drain(&mut p),
            vec![
                engine(EngineOp::FlushVolume),
                ProvOut::Return {
                    snapshot: 2,
                    call: ProviderCall::FlushAndHold,
                    result
                }
            ]
        );
    }

    #[test]
    fn helper_commit_blocks_until_post_snapshot() {
        let mut h = HelperProvider::default();
        h.call(2, ProviderCall::FlushAndHold);
        h.hold_done(2);
        h.flush_done(2, Ok(()));
        h.call(2, ProviderCall::Commit);
        let out: Vec<ProvOut> = std::iter::from_fn(|| h.poll()).collect();
        assert_eq!(out.last(), Some(&ProvOut::Committed { snapshot: 2 }));
        h.post_snapshot(3);
        assert_eq!(
            h.poll(),
            None,
            "another snapshot's post-snapshot does not release it"
        );
        h.post_snapshot(2);
        assert_eq!(
            h.poll(),
            Some(ProvOut::Return {
                snapshot: 2,
                call: ProviderCall::Commit,
                result: Ok(())
            })
        );
    }
}
