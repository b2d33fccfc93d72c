//! Cross-process locks on the state directory: Linux OFD byte-range locks.
//!
//! OFD ("open file description") locks belong to an open file, not to a
//! process, so two threads using two descriptors exclude each other just as
//! two processes do. Each thread therefore opens its own descriptors of the
//! `lock` and `claims` files (kept in a thread-local table) and a guard is
//! `!Send`: it is released on the thread that took it. The kernel drops every
//! lock when the holder dies, which is what makes SIGKILL safe.
//!
//! Bytes of the `lock` file:
//!
//! | byte | name       | shared by                      | exclusive by                   |
//! |------|------------|--------------------------------|--------------------------------|
//! | 0    | gate       | every live or snapshot write   | snapshot create, seal, delete  |
//! | 1    | turnstile  | writers, briefly, before gate  | create/seal/delete, while waiting for the gate |
//! | 2    | catalog    | -                              | every catalog change           |
//! | 3    | in-flight  | -                              | `try_begin_snapshot` (non-blocking) |
//! | 4    | alloc      | -                              | diff.dat extension, map appends |
//!
//! The turnstile keeps a stream of writers from starving a snapshot create:
//! once the create holds it, new writers queue behind it while the writers
//! already inside drain. In the `claims` file, byte *b* is block *b*'s claim.
//! Lock order: turnstile → gate → claims → alloc; catalog is taken with the
//! gate held exclusively or with no gate at all, never waited on while holding
//! a lock someone waiting on the catalog needs.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Error, Result};

const GATE: u64 = 0;
const TURNSTILE: u64 = 1;
const CATALOG: u64 = 2;
const IN_FLIGHT: u64 = 3;
const ALLOC: u64 = 4;

/// The lock files of one state directory.
#[derive(Debug, Clone)]
pub(crate) struct Locks {
    lock_path: PathBuf,
    claims_path: PathBuf,
}

struct ThreadFds {
    lock: File,
    claims: File,
}

thread_local! {
    static FDS: RefCell<HashMap<PathBuf, Rc<ThreadFds>>> = RefCell::new(HashMap::new());
}

/// A held byte-range lock; released on drop.
pub(crate) struct LockGuard {
    fds: Rc<ThreadFds>,
    claims: bool,
    start: u64,
    len: u64,
    path: PathBuf,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let file = if self.claims {
            &self.fds.claims
        } else {
            &self.fds.lock
        };
        if let Err(e) = ofd(file, libc::F_UNLCK as i16, self.start, self.len, true) {
            // Unlock of a range we hold cannot fail short of a kernel bug; say so rather than hide it.
            tracing::error!(file = %self.path.display(), "unlocking bytes {}+{}: {e}", self.start, self.len);
        }
    }
}

/// The exclusive in-flight lock of `try_begin_snapshot`; it owns its own
/// descriptor, so it is `Send` and is released when dropped or when the process dies.
#[derive(Debug)]
pub struct InFlightGuard {
    _file: File,
}

fn ofd(file: &File, kind: i16, start: u64, len: u64, wait: bool) -> std::io::Result<bool> {
    // SAFETY: flock is plain data; all-zero is a valid value that we then fill in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: fcntl with a valid fd and a pointer to a live flock struct.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io("open lock file", path, e))
}

impl Locks {
    pub(crate) fn new(state_dir: &Path) -> Locks {
        Locks {
            lock_path: state_dir.join("lock"),
            claims_path: state_dir.join("claims"),
        }
    }

    fn fds(&self) -> Result<Rc<ThreadFds>> {
        FDS.with(|m| {
            let mut m = m.borrow_mut();
            if let Some(f) = m.get(&self.lock_path) {
                return Ok(f.clone());
            }
            let fds = Rc::new(ThreadFds {
                lock: open_rw(&self.lock_path)?,
                claims: open_rw(&self.claims_path)?,
            });
            m.insert(self.lock_path.clone(), fds.clone());
            Ok(fds)
        })
    }

    fn take(&self, claims: bool, exclusive: bool, start: u64, len: u64) -> Result<LockGuard> {
        let fds = self.fds()?;
        let (file, path) = if claims {
            (&fds.claims, &self.claims_path)
        } else {
            (&fds.lock, &self.lock_path)
        };
        let kind = if exclusive {
            libc::F_WRLCK
        } else {
            libc::F_RDLCK
        } as i16;
        ofd(file, kind, start, len, true).map_err(|e| Error::io("lock", path, e))?;
        Ok(LockGuard {
            fds: fds.clone(),
            claims,
            start,
            len,
            path: path.clone(),
        })
    }

    /// The gate, shared: held for the whole of one write.
    pub(crate) fn gate_shared(&self) -> Result<LockGuard> {
        let turnstile = self.take(false, false, TURNSTILE, 1)?;
        let gate = self.take(false, false, GATE, 1)?;
        drop(turnstile);
        Ok(gate)
    }

    /// The gate, exclusive: no write of any process is in progress while held.
    pub(crate) fn gate_exclusive(&self) -> Result<(LockGuard, LockGuard)> {
        let turnstile = self.take(false, true, TURNSTILE, 1)?;
        let gate = self.take(false, true, GATE, 1)?;
        Ok((gate, turnstile))
    }

    /// Claims blocks `first .. first+count` (one call, so no lock-order issue within a write).
    pub(crate) fn claim(&self, first: u64, count: u64) -> Result<LockGuard> {
        self.take(true, true, first, count)
    }

    pub(crate) fn catalog(&self) -> Result<LockGuard> {
        self.take(false, true, CATALOG, 1)
    }

    pub(crate) fn alloc(&self) -> Result<LockGuard> {
        self.take(false, true, ALLOC, 1)
    }

    /// Non-blocking: `None` when another request (any process, any thread) holds it.
    pub(crate) fn try_in_flight(&self) -> Result<Option<InFlightGuard>> {
        let f = open_rw(&self.lock_path)?;
        let got = ofd(&f, libc::F_WRLCK as i16, IN_FLIGHT, 1, false)
            .map_err(|e| Error::io("lock", &self.lock_path, e))?;
        Ok(got.then_some(InFlightGuard { _file: f }))
    }
}
