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
