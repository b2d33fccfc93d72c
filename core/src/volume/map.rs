//! A snapshot's map: which blocks of the snapshot live in the diff area, and where.
//!
//! ```text
//!  snap-<id>.map
//!  +-------------------------------+--------+--------+--------+---
//!  | envelope FFMAPHDR v1          | record | record | record | ...   appended, never rewritten
//!  | {volume uuid, snapshot, ...}  | 48 B   | 48 B   | 48 B   |
//!  +-------------------------------+--------+--------+--------+---
//!
//!  record (48 bytes, little endian)
//!  0        8        16       20       24                40          48
//!  +--------+--------+--------+--------+-----------------+-----------+
//!  | block  | slot   | flags  | 0      | data checksum   | record    |
//!  | u64    | u64    | u32    | u32    | blake3[..16] of | checksum  |
//!  |        |        |        |        | the slot's data | blake3 of |
//!  |        |        |        |        |                 | 0..40 [..8]|
//!  +--------+--------+--------+--------+-----------------+-----------+
//!  flags: 1 COPIED (original copied before a live overwrite)
//!         2 WRITTEN (post-snapshot write, slot private to this snapshot)
//!         4 INVALID (diff area limit exceeded: the snapshot is unreadable from here on)
//! ```
//!
//! A later record for the same block supersedes an earlier one. Records are
//! appended under the alloc lock at the first record boundary at or after the
//! end of the file, so a record torn by a crash occupies its own 48 bytes and
//! fails its record checksum; such a record is skipped. A bad record at the
//! very end is not skipped yet but re-read on the next refresh, because it
//! may be an append still in progress in another process.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, FormatProblem, Kind};

use super::SnapshotId;

pub(crate) const MAP_KIND: Kind = Kind {
    magic: *b"FFMAPHDR",
    version: 1,
};
pub(crate) const RECORD_LEN: u64 = 48;
pub(crate) const COPIED: u32 = 1;
pub(crate) const WRITTEN: u32 = 2;
pub(crate) const INVALID: u32 = 4;

#[derive(Debug, Serialize, Deserialize)]
struct MapHeader {
    volume_uuid: String,
    snapshot: SnapshotId,
    block_size: u32,
    record_len: u64,
}

/// One map record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record {
    pub block: u64,
    pub slot: u64,
    pub flags: u32,
    pub data_sum: [u8; 16],
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
        let sum = blake3::hash(&b[..40]);
        b[40..48].copy_from_slice(&sum.as_bytes()[..8]);
        b
    }

    /// `None` for a torn or damaged record.
    pub(crate) fn decode(b: &[u8]) -> Option<Record> {
        if b.len() != RECORD_LEN as usize || blake3::hash(&b[..40]).as_bytes()[..8] != b[40..48] {
            return None;
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let mut data_sum = [0u8; 16];
        data_sum.copy_from_slice(&b[24..40]);
        Some(Record {
            block: u64_at(0),
            slot: u64_at(8),
            flags: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
            data_sum,
        })
    }
}

/// Where a block of the snapshot is in the diff area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub slot: u64,
    pub flags: u32,
    pub data_sum: [u8; 16],
}

/// What this process knows of a map so far.
#[derive(Debug, Default)]
pub(crate) struct MapState {
    /// File offset up to which records have been applied.
    offset: u64,
    pub entries: HashMap<u64, Entry>,
    /// Set once an INVALID record is seen; never cleared.
    pub invalid: Option<String>,
    /// Every slot any record ever named (superseded ones too), for delete.
    pub all_slots: Vec<u64>,
}

/// One snapshot's map file, open in this process.
#[derive(Debug)]
pub(crate) struct SnapMap {
    pub id: SnapshotId,
    pub path: PathBuf,
    file: File,
    records_start: u64,
    pub state: Mutex<MapState>,
}

impl SnapMap {
    /// Creates an empty map (header only), durable before it returns.
    pub(crate) fn create(path: &Path, uuid: &str, id: SnapshotId, block_size: u32) -> Result<()> {
        let header = MapHeader {
            volume_uuid: uuid.to_string(),
            snapshot: id,
            block_size,
            record_len: RECORD_LEN,
        };
        let bytes = format::encode_json(MAP_KIND, &header);
        let f = crate::perms::private_file_options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create", path, e))?;
        f.write_all_at(&bytes, 0)
            .map_err(|e| Error::io("write", path, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", path, e))
    }

    /// Opens a map, checks its header belongs to this volume and snapshot, and loads its records.
    pub(crate) fn open(
        path: &Path,
        uuid: &str,
        id: SnapshotId,
        block_size: u32,
    ) -> Result<SnapMap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let mut head =
            vec![
                0u8;
                format::HEADER_LEN + format::MAX_PAYLOAD.min(64 << 10) + format::CHECKSUM_LEN
            ];
        let n = read_up_to(&file, &mut head, 0).map_err(|e| Error::io("read", path, e))?;
        let (header, records_start): (MapHeader, usize) =
            format::decode_json(MAP_KIND, &head[..n], path)?;
        let mismatch = |why: String| Error::Format {
            file: path.to_path_buf(),
            problem: FormatProblem::Payload(why),
        };
        if header.volume_uuid != uuid {
            return Err(mismatch(format!(
                "belongs to volume {} , not {uuid}",
                header.volume_uuid
            )));
        }
        if header.snapshot != id
            || header.block_size != block_size
            || header.record_len != RECORD_LEN
        {
            return Err(mismatch(format!(
                "header says snapshot {} block size {} record length {}, expected snapshot {id} block size {block_size} record length {RECORD_LEN}",
                header.snapshot, header.block_size, header.record_len
            )));
        }
        let map = SnapMap {
            id,
            path: path.to_path_buf(),
            file,
            records_start: records_start as u64,
            state: Mutex::new(MapState {
                offset: records_start as u64,
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

    /// Applies records appended since the last refresh (cheap when nothing changed: one fstat).
    pub(crate) fn refresh(&self, st: &mut MapState) -> Result<()> {
        let size = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .len();
        if size < st.offset {
            return Err(Error::Format {
                file: self.path.clone(),
                problem: FormatProblem::Truncated {
                    needed: st.offset,
                    found: size,
                },
            });
        }
        let whole = (size - st.offset) / RECORD_LEN * RECORD_LEN;
        if whole == 0 {
            return Ok(());
        }
        let mut buf = vec![0u8; whole as usize];
        self.file
            .read_exact_at(&mut buf, st.offset)
            .map_err(|e| Error::io("read", &self.path, e))?;
        let mut applied = 0u64;
        for (i, chunk) in buf.chunks_exact(RECORD_LEN as usize).enumerate() {
            let Some(r) = Record::decode(chunk) else {
                continue;
            };
            applied = (i as u64 + 1) * RECORD_LEN;
            if r.flags & INVALID != 0 {
                st.invalid.get_or_insert_with(|| {
                    "its diff area limit was exceeded, so original blocks were not kept".into()
                });
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
        st.offset += applied;
        Ok(())
    }

    /// Appends records at the first record boundary at or after the end of the
    /// file. The caller holds the alloc lock (so appends of all processes are
    /// serialized) and fdatasyncs afterwards.
    pub(crate) fn append(&self, records: &[Record]) -> Result<()> {
        let size = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", &self.path, e))?
            .len();
        let body = size.saturating_sub(self.records_start);
        let at = self.records_start + body.div_ceil(RECORD_LEN) * RECORD_LEN;
        let mut buf = Vec::with_capacity(records.len() * RECORD_LEN as usize);
        for r in records {
            buf.extend_from_slice(&r.encode());
        }
        self.file
            .write_all_at(&buf, at)
            .map_err(|e| Error::io("append to", &self.path, e))
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))
    }
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
            assert_eq!(Record::decode(&d), None, "flip at byte {i} went unnoticed");
        }
        assert_eq!(Record::decode(&b[..47]), None);
    }
}
