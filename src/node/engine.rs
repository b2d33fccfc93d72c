//! The engine worker: one thread that runs, in the order the protocol asked,
//! every engine action of the snapshot protocol (hold, flush, create, seal,
//! delete, resolve).
//!
//! Order matters: a delete asked for after a create that is still running
//! must wait for it, or the create would land after the delete and leave a
//! snapshot nobody owns. One queue, one thread, so the driver task never
//! blocks on the disk and the actions never overtake each other.

use std::sync::mpsc;

use freezeframe_core::volume::Volume;

type Job = Box<dyn FnOnce(&Volume) + Send>;

/// Handle to the worker; dropping every handle ends the thread after the
/// queued jobs ran.
#[derive(Clone)]
pub struct EngineWorker {
    tx: mpsc::Sender<Job>,
}

impl EngineWorker {
    pub fn start(volume: Volume) -> std::io::Result<EngineWorker> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("ff-engine".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&volume);
                }
            })?;
        Ok(EngineWorker { tx })
    }

    /// Queues `job`; it runs after every job queued before it.
    pub fn run(&self, job: impl FnOnce(&Volume) + Send + 'static) {
        if self.tx.send(Box::new(job)).is_err() {
            tracing::error!("the engine worker is gone; an engine action was dropped");
        }
    }
}

impl std::fmt::Debug for EngineWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineWorker")
    }
}

/// The node's live-I/O hold as the driver keeps it, tagged with the snapshot
/// that asked for it. Taking a hold waits for live writes in flight, so it
/// completes on the engine worker some time after it was asked for; if the
/// run ended meanwhile (an abort overtook it), the hold that arrives late
/// must be let go at once, or every live write on the node hangs until some
/// later snapshot releases it.
#[derive(Default)]
pub struct HoldSlot {
    wanted: Option<u64>,
    guard: Option<freezeframe_core::volume::HoldGuard>,
}

impl HoldSlot {
    /// The machine asked for a hold for `snapshot`.
    pub fn want(&mut self, snapshot: u64) {
        self.wanted = Some(snapshot);
    }

    /// The machine released the hold (or the run ended).
    pub fn release(&mut self) {
        self.wanted = None;
        self.guard = None;
    }

    /// A hold for `snapshot` was taken. Kept (true) if that is still the hold
    /// the machine wants; otherwise dropped at once (false).
    pub fn arrived(&mut self, snapshot: u64, guard: freezeframe_core::volume::HoldGuard) -> bool {
        if self.wanted == Some(snapshot) {
            self.guard = Some(guard);
            true
        } else {
            drop(guard);
            false
        }
    }

    #[cfg(test)]
    pub fn held(&self) -> bool {
        self.guard.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn volume(dir: &std::path::Path) -> Volume {
        Volume::create(&dir.join("vol.img"), 4 << 16, 1 << 16, None).expect("volume")
    }

    /// Writes through the engine in a thread; true if it finished in time.
    fn write_finishes(v: &Volume) -> bool {
        let v = v.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(v.write_at(&[7u8; 4096], 0).is_ok());
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap_or(false)
    }

    #[test]
    fn a_hold_that_arrives_after_its_run_ended_is_released_at_once() {
        let d = tempfile::tempdir().unwrap();
        let v = volume(d.path());
        let mut slot = HoldSlot::default();
        slot.want(3);
        // The abort overtakes the hold being taken.
        slot.release();
        assert!(!slot.arrived(3, v.hold()), "a late hold is not kept");
        assert!(!slot.held());
        assert!(write_finishes(&v), "live writes go on");
    }

    #[test]
    fn a_hold_for_another_snapshot_is_not_kept() {
        let d = tempfile::tempdir().unwrap();
        let v = volume(d.path());
        let mut slot = HoldSlot::default();
        slot.want(4);
        assert!(!slot.arrived(3, v.hold()), "the hold of an earlier run");
        assert!(write_finishes(&v));
        assert!(slot.arrived(4, v.hold()));
        assert!(slot.held());
        slot.release();
        assert!(write_finishes(&v), "released with the run");
    }

    #[test]
    fn engine_jobs_run_in_the_order_queued() {
        let d = tempfile::tempdir().unwrap();
        let w = EngineWorker::start(volume(d.path())).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..50 {
            let tx = tx.clone();
            w.run(move |_| {
                if i == 0 {
                    // A slow first job (a create) must not be overtaken.
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = tx.send(i);
            });
        }
        let got: Vec<i32> = (0..50)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
    }
}
