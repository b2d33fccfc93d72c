//! A snapshot's map: which blocks of the snapshot live in the diff area, and where.
//!
//! ```text
//!  snap-<id>.map  (format version 2)
//!  +-------------------------------+---------+--------+--------+--------+---
//!  | envelope FFMAPHDR v2          | zeros   | record | record | record | ...   appended, never rewritten
//!  | {volume uuid, snapshot, ...}  | to 4096 | 64 B   | 64 B   | 64 B   |
//!  +-------------------------------+---------+--------+--------+--------+---
//!  0                                          4096 = RECORDS_START
//!
//!  record (64 bytes, little endian)
//!  0        8        16       20       24                40       48                 64
//!  +--------+--------+--------+--------+-----------------+--------+------------------+
//!  | block  | slot   | flags  | 0      | data checksum   | 0      | record checksum  |
//!  | u64    | u64    | u32    | u32    | blake3[..16] of | u64    | blake3 of 0..48, |
//!  |        |        |        |        | the slot's data |        | first 16 bytes   |
//!  +--------+--------+--------+--------+-----------------+--------+------------------+
//!  flags: 1 COPIED (original copied before a live overwrite)
//!         2 WRITTEN (post-snapshot write, slot private to this snapshot)
//!         4 INVALID (the snapshot could not keep its copies: diff limit or no space)
//! ```
//!
//! **Damage is never skipped.** Records start at a 4 KiB boundary and are 64
//! bytes, so no record straddles a 512-byte sector or a page: a crash (SIGKILL
//! cuts a write between pages, a power loss between sectors) leaves each
//! record either whole or never written (zeros). A record position therefore
//! holds exactly one of: a record whose checksum matches; zeros (an append
//! that never reached the disk, whose live overwrite therefore never happened,
//! since the overwrite waits for the map's fdatasync); or damage. Zeros at the
//! end of the file are "not written yet" and re-read on the next refresh, and
//! the next append overwrites them. Anything else — a record failing its
//! checksum, or zeros followed by a record — is re-read under the alloc lock
//! (which every append holds) to rule out an append in progress, and then
//! makes the snapshot Invalid with a reason naming the file and offset. A
//! damaged map is never read past: its entries can no longer be trusted, and
//! reading the live volume for a block whose record was lost would serve
//! other data as the snapshot's.
//!
//! Appends preallocate (`fallocate`, keeping the size) room for one more
//! record, so the INVALID record that reports "no space" can always be written
//! on a full filesystem.
//!
//! Version 1 maps (48-byte records right after the envelope, where a damaged
//! record was skipped) are refused with "unsupported format version 1".

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, FormatProblem, Kind};

use super::locks::Locks;
use super::SnapshotId;

pub(crate) const MAP_KIND: Kind = Kind {
    magic: *b"FFMAPHDR",
    version: 2,
};
pub(crate) const RECORD_LEN: u64 = 64;
/// Offset of the first record: the header envelope is padded to one page.
pub(crate) const RECORDS_START: u64 = 4096;
pub(crate) const COPIED: u32 = 1;
pub(crate) const WRITTEN: u32 = 2;
pub(crate) const INVALID: u32 = 4;
/// Bytes preallocated past the end of a map so an INVALID record always fits.
const RESERVE: u64 = RECORD_LEN;

#[derive(Debug, Serialize, Deserialize)]
struct MapHeader {
    volume_uuid: String,
    snapshot: SnapshotId,
    block_size: u32,
    record_len: u64,
    records_start: u64,
}

/// One map record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub block: u64,
    pub slot: u64,
    pub flags: u32,
    pub data_sum: [u8; 16],
}

/// What one record position of a map file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Record(Record),
    /// All zeros: never written.
    Blank,
    /// Anything else: checksum mismatch or nonzero reserved bytes.
    Damaged,
}

/// Checksum of one block of data as a record stores it.
pub(crate) fn data_sum(data: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(data).as_bytes()[..16]);
    out
}

impl Record {
    pub(crate) fn encode(&self) -> [u8; RECORD_LEN as usize] {
        let mut b = [0u8; RECORD_LEN as usize];
        b[0..8].copy_from_slice(&self.block.to_le_bytes());
        b[8..16].copy_from_slice(&self.slot.to_le_bytes());
        b[16..20].copy_from_slice(&self.flags.to_le_bytes());
        b[24..40].copy_from_slice(&self.data_sum);
        let sum = blake3::hash(&b[..48]);
        b[48..64].copy_from_slice(&sum.as_bytes()[..16]);
        b
    }

    /// `None` for anything but a whole, intact record.
    pub(crate) fn decode(b: &[u8]) -> Option<Record> {
        match classify(b) {
            Slot::Record(r) => Some(r),
            _ => None,
        }
    }
}

/// Classifies one record position (`b` must be exactly [`RECORD_LEN`] bytes to be a record).
pub(crate) fn classify(b: &[u8]) -> Slot {
    if b.len() != RECORD_LEN as usize {
        return Slot::Damaged;
    }
    if b.iter().all(|x| *x == 0) {
        return Slot::Blank;
    }
    if blake3::hash(&b[..48]).as_bytes()[..16] != b[48..64]
        || b[20..24] != [0; 4]
        || b[40..48] != [0; 8]
    {
        return Slot::Damaged;
    }
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let mut data_sum = [0u8; 16];
    data_sum.copy_from_slice(&b[24..40]);
    let flags = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
    if flags == 0 || flags & !(COPIED | WRITTEN | INVALID) != 0 {
        return Slot::Damaged;
    }
    Slot::Record(Record {
        block: u64_at(0),
        slot: u64_at(8),
        flags,
        data_sum,
    })
}

/// Where a block of the snapshot is in the diff area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub slot: u64,
    pub flags: u32,
    pub data_sum: [u8; 16],
}

/// Why a map makes its snapshot unreadable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Invalidity {
    /// An INVALID record: the snapshot could not keep its copies (its reason is in the catalog).
    Overflow,
    /// The map file is damaged: never read past this.
    Damaged(String),
}

impl Invalidity {
    pub(crate) fn reason(&self) -> String {
        match self {
            Invalidity::Overflow => {
                "its diff area could not keep the original blocks (diff limit or no space), so they were not kept".into()
            }
            Invalidity::Damaged(why) => why.clone(),
        }
    }
}

/// What this process knows of a map so far.
#[derive(Debug, Default)]
pub(crate) struct MapState {
    /// File offset up to which records have been applied.
    offset: u64,
    pub entries: HashMap<u64, Entry>,
    /// Set once an INVALID record or damage is seen; never cleared.
    pub invalid: Option<Invalidity>,
    /// Every slot any record ever named (superseded ones too), for delete.
    pub all_slots: Vec<u64>,
    /// Records applied (for `volume check`).
    pub records: u64,
}

/// Why an append failed: space (the caller sacrifices a snapshot) or anything else.
#[derive(Debug)]
pub(crate) enum AppendError {
    NoSpace(Error),
    Other(Error),
}

/// True for the errors that mean "the filesystem (or quota) is full".
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Reserves `len` bytes at `at` without changing the size; unsupported filesystems are not an error.
fn preallocate(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a valid fd with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(e),
    }
}

/// One snapshot's map file, open in this process.
#[derive(Debug)]
pub(crate) struct SnapMap {
    pub path: PathBuf,
    file: File,
    locks: Locks,
    pub state: Mutex<MapState>,
}

impl SnapMap {
    /// Creates an empty map (header page only), durable before it returns.
    /// On failure nothing is left behind.
    pub(crate) fn create(path: &Path, uuid: &str, id: SnapshotId, block_size: u32) -> Result<()> {
        let header = MapHeader {
            volume_uuid: uuid.to_string(),
            snapshot: id,
            block_size,
            record_len: RECORD_LEN,
            records_start: RECORDS_START,
        };
        let mut bytes = format::encode_json(MAP_KIND, &header);
        if bytes.len() as u64 > RECORDS_START {
            return Err(Error::Format {
                file: path.to_path_buf(),
                problem: FormatProblem::TooLarge {
                    length: bytes.len() as u64,
                    limit: RECORDS_START,
                },
            });
        }
        bytes.resize(RECORDS_START as usize, 0);
        let f = crate::perms::private_file_options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create", path, e))?;
        let done = f
            .write_all_at(&bytes, 0)
            .map_err(|e| Error::io("write", path, e))
            .and_then(|()| {
                preallocate(&f, RECORDS_START, RESERVE)
                    .map_err(|e| Error::io("preallocate", path, e))
            })
            .and_then(|()| f.sync_all().map_err(|e| Error::io("fsync", path, e)));
        if done.is_err() {
            let _ = std::fs::remove_file(path);
        }
        done
    }

    /// Opens a map, checks its header belongs to this volume and snapshot, and loads its records.
    pub(crate) fn open(
        path: &Path,
        uuid: &str,
        id: SnapshotId,
        block_size: u32,
        locks: &Locks,
    ) -> Result<SnapMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let mut head = vec![0u8; RECORDS_START as usize];
        let n = read_up_to(&file, &mut head, 0).map_err(|e| Error::io("read", path, e))?;
        let header = decode_header(&head[..n], path)?;
        let mismatch = |why: String| Error::Format {
            file: path.to_path_buf(),
            problem: FormatProblem::Payload(why),
        };
        if header.volume_uuid != uuid {
            return Err(mismatch(format!(
                "belongs to volume {}, not {uuid}",
                header.volume_uuid
            )));
        }
        if header.snapshot != id || header.block_size != block_size {
            return Err(mismatch(format!(
                "header says snapshot {} block size {}, expected snapshot {id} block size {block_size}",
                header.snapshot, header.block_size
            )));
        }
        let map = SnapMap {
            path: path.to_path_buf(),
            file,
            locks: locks.clone(),
            state: Mutex::new(MapState {
                offset: RECORDS_START,
                ..MapState::default()
            }),
        };
        {
            let mut st = map.lock();
            map.refresh(&mut st)?;
        }
        Ok(map)
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, MapState> {
        // A panic while holding this lock cannot leave MapState half-updated in a
        // way that matters (refresh re-reads the file), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn size(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .len())
    }

    /// Reads the whole records from `from` to the end of the file.
    fn read_records(&self, from: u64) -> Result<Vec<u8>> {
        let size = self.size()?;
        let whole = size.saturating_sub(from) / RECORD_LEN * RECORD_LEN;
        let mut buf = vec![0u8; whole as usize];
        if whole > 0 {
            self.file
                .read_exact_at(&mut buf, from)
                .map_err(|e| Error::io("read", &self.path, e))?;
        }
        Ok(buf)
    }

    /// Applies records appended since the last refresh (cheap when nothing
    /// changed: one fstat). Damage makes the map invalid for good (see the module doc).
    pub(crate) fn refresh(&self, st: &mut MapState) -> Result<()> {
        if matches!(st.invalid, Some(Invalidity::Damaged(_))) {
            return Ok(());
        }
        let size = self.size()?;
        if size < st.offset {
            st.invalid = Some(Invalidity::Damaged(format!(
                "map {} shrank to {size} bytes after {} bytes of records were read: records were lost",
                self.path.display(),
                st.offset
            )));
            return Ok(());
        }
        if size - st.offset < RECORD_LEN {
            return Ok(());
        }
        let buf = self.read_records(st.offset)?;
        match scan(&buf) {
            Scan::Clean(n) => self.apply(st, &buf[..n]),
            Scan::Suspect(_) => {
                // Maybe an append in progress: every append holds the alloc
                // lock, so under it what is there is final.
                let _a = self.locks.alloc()?;
                let buf = self.read_records(st.offset)?;
                match scan(&buf) {
                    Scan::Clean(n) => self.apply(st, &buf[..n]),
                    Scan::Suspect(k) => {
                        let good = k * RECORD_LEN as usize;
                        self.apply(st, &buf[..good]);
                        let at = st.offset;
                        let what = match classify(&buf[good..good + RECORD_LEN as usize]) {
                            Slot::Blank => "is blank but records follow it",
                            _ => "fails its checksum",
                        };
                        st.invalid = Some(Invalidity::Damaged(format!(
                            "map {} is damaged: the record at offset {at} {what}",
                            self.path.display()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn apply(&self, st: &mut MapState, buf: &[u8]) {
        for chunk in buf.chunks_exact(RECORD_LEN as usize) {
            let Slot::Record(r) = classify(chunk) else {
                break;
            };
            st.offset += RECORD_LEN;
            st.records += 1;
            if r.flags & INVALID != 0 {
                st.invalid.get_or_insert(Invalidity::Overflow);
                continue;
            }
            st.all_slots.push(r.slot);
            st.entries.insert(
                r.block,
                Entry {
                    slot: r.slot,
                    flags: r.flags,
                    data_sum: r.data_sum,
                },
            );
        }
    }

    /// Where the next append goes: after the last record, over trailing blanks
    /// (appends that never reached the disk). Caller holds the alloc lock.
    fn append_position(&self) -> Result<u64> {
        let size = self.size()?.max(RECORDS_START);
        let mut end = RECORDS_START + (size - RECORDS_START).div_ceil(RECORD_LEN) * RECORD_LEN;
        let mut rec = [0u8; RECORD_LEN as usize];
        while end > RECORDS_START {
            let n = read_up_to(&self.file, &mut rec, end - RECORD_LEN)
                .map_err(|e| Error::io("read", &self.path, e))?;
            if rec[..n].iter().any(|x| *x != 0) {
                break;
            }
            end -= RECORD_LEN;
        }
        Ok(end)
    }

    /// Appends records after the last one. The caller holds the alloc lock (so
    /// appends of all processes are serialized) and fdatasyncs afterwards.
    /// Room for one more record is preallocated first, so an INVALID record
    /// (`records` = one INVALID) is written into space reserved earlier.
    pub(crate) fn append(&self, records: &[Record]) -> std::result::Result<(), AppendError> {
        let at = self.append_position().map_err(AppendError::Other)?;
        let len = records.len() as u64 * RECORD_LEN;
        let only_invalid = records.iter().all(|r| r.flags & INVALID != 0);
        if !only_invalid {
            preallocate(&self.file, at, len + RESERVE).map_err(|e| {
                let err = Error::io("preallocate", &self.path, e);
                match &err {
                    Error::Io { source, .. } if is_no_space(source) => AppendError::NoSpace(err),
                    _ => AppendError::Other(err),
                }
            })?;
        }
        let mut buf = Vec::with_capacity(len as usize);
        for r in records {
            buf.extend_from_slice(&r.encode());
        }
        self.file.write_all_at(&buf, at).map_err(|e| {
            let no_space = is_no_space(&e);
            let err = Error::io("append to", &self.path, e);
            if no_space {
                AppendError::NoSpace(err)
            } else {
                AppendError::Other(err)
            }
        })
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))
    }
}

impl From<AppendError> for Error {
    fn from(e: AppendError) -> Error {
        match e {
            AppendError::NoSpace(e) | AppendError::Other(e) => e,
        }
    }
}

/// Result of scanning record positions.
enum Scan {
    /// The first `n` bytes are intact records; what follows is only blanks.
    Clean(usize),
    /// Position `k` is damaged, or blank with a non-blank position after it.
    Suspect(usize),
}

fn scan(buf: &[u8]) -> Scan {
    let mut first_blank = None;
    for (k, chunk) in buf.chunks_exact(RECORD_LEN as usize).enumerate() {
        match classify(chunk) {
            Slot::Record(_) => {
                if let Some(b) = first_blank {
                    return Scan::Suspect(b);
                }
            }
            Slot::Blank => {
                first_blank.get_or_insert(k);
            }
            Slot::Damaged => return Scan::Suspect(first_blank.unwrap_or(k)),
        }
    }
    Scan::Clean(first_blank.unwrap_or(buf.len() / RECORD_LEN as usize) * RECORD_LEN as usize)
}

fn decode_header(head: &[u8], path: &Path) -> Result<MapHeader> {
    let (header, used): (MapHeader, usize) = format::decode_json(MAP_KIND, head, path)?;
    let bad = |why: String| Error::Format {
        file: path.to_path_buf(),
        problem: FormatProblem::Payload(why),
    };
    if header.record_len != RECORD_LEN || header.records_start != RECORDS_START {
        return Err(bad(format!(
            "header says record length {} starting at {}, this build writes {RECORD_LEN} at {RECORDS_START}",
            header.record_len, header.records_start
        )));
    }
    // The padding is covered by no checksum: it must be zeros, or the file was written over.
    if head.len() < RECORDS_START as usize {
        return Err(Error::Format {
            file: path.to_path_buf(),
            problem: FormatProblem::Truncated {
                needed: RECORDS_START,
                found: head.len() as u64,
            },
        });
    }
    if head[used..].iter().any(|b| *b != 0) {
        return Err(bad(format!(
            "bytes {used}..{RECORDS_START} after the header must be zero"
        )));
    }
    Ok(header)
}

/// What `volume check` learns from one map file without a volume open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MapCheck {
    pub records: u64,
    pub entries: HashMap<u64, Entry>,
    pub all_slots: Vec<u64>,
    pub invalid: Option<Invalidity>,
}

/// Reads a whole map for `volume check` (no locks: the caller holds the catalog lock).
pub(crate) fn check(
    path: &Path,
    uuid: &str,
    id: SnapshotId,
    block_size: u32,
    locks: &Locks,
) -> Result<MapCheck> {
    let m = SnapMap::open(path, uuid, id, block_size, locks)?;
    let st = m.lock();
    Ok(MapCheck {
        records: st.records,
        entries: st.entries.clone(),
        all_slots: st.all_slots.clone(),
        invalid: st.invalid.clone(),
    })
}

/// Decodes a map file's bytes as a reader does (for the fuzz targets and
/// properties): the header, then every record up to the first blank; a
/// damaged record, or a record after a blank, is an error. Returns the
/// header and the records, in a printable form.
pub(crate) fn decode_map_bytes(bytes: &[u8]) -> Result<String> {
    let path = Path::new("<map>");
    let head = &bytes[..bytes.len().min(RECORDS_START as usize)];
    let header = decode_header(head, path)?;
    let body = &bytes[head.len()..];
    let whole = body.len() / RECORD_LEN as usize * RECORD_LEN as usize;
    match scan(&body[..whole]) {
        Scan::Clean(n) => {
            let records: Vec<Record> = body[..n]
                .chunks_exact(RECORD_LEN as usize)
                .filter_map(Record::decode)
                .collect();
            Ok(format!("{header:?} {records:?}"))
        }
        Scan::Suspect(k) => Err(Error::Format {
            file: path.to_path_buf(),
            problem: FormatProblem::Payload(format!(
                "the record at offset {} is damaged",
                RECORDS_START + k as u64 * RECORD_LEN
            )),
        }),
    }
}

/// A valid map file with `n` records, for properties and fuzz seeds.
pub(crate) fn sample_map_bytes(n: u64) -> Vec<u8> {
    let header = MapHeader {
        volume_uuid: "0123456789abcdef0123456789abcdef".into(),
        snapshot: 3,
        block_size: 4096,
        record_len: RECORD_LEN,
        records_start: RECORDS_START,
    };
    let mut bytes = format::encode_json(MAP_KIND, &header);
    bytes.resize(RECORDS_START as usize, 0);
    for k in 0..n {
        let r = Record {
            block: k * 3,
            slot: k,
            flags: if k % 2 == 0 { COPIED } else { WRITTEN },
            data_sum: data_sum(&k.to_le_bytes()),
        };
        bytes.extend_from_slice(&r.encode());
    }
    bytes
}

fn read_up_to(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_flipped_bit_is_caught() {
        let r = Record {
            block: 7,
            slot: 42,
            flags: COPIED,
            data_sum: data_sum(b"x"),
        };
        let b = r.encode();
        assert_eq!(Record::decode(&b), Some(r));
        for i in 0..b.len() {
            let mut d = b;
            d[i] ^= 0x10;
            assert_eq!(
                classify(&d),
                Slot::Damaged,
                "flip at byte {i} went unnoticed"
            );
        }
        assert_eq!(Record::decode(&b[..63]), None);
        assert_eq!(classify(&[0u8; 64]), Slot::Blank);
    }

    #[test]
    fn a_blank_followed_by_a_record_is_suspect_but_trailing_blanks_are_pending() {
        let r = Record {
            block: 1,
            slot: 2,
            flags: COPIED,
            data_sum: [3; 16],
        }
        .encode();
        let mut buf = Vec::new();
        buf.extend_from_slice(&r);
        buf.extend_from_slice(&[0; 64]);
        assert!(matches!(scan(&buf), Scan::Clean(64)));
        buf.extend_from_slice(&r);
        assert!(matches!(scan(&buf), Scan::Suspect(1)));
    }
}
