//! The block journal of one replica snapshot (`<id>.journal`).
//!
//! While a transfer runs it records which blocks are durably in the snapshot's
//! data file, so a reconnecting sender skips them; once the snapshot is
//! complete the same file is its block index (block → place in `<id>.data`,
//! or "all zero", and the block's blake3 chaining value).
//!
//! ```text
//!  header, 64 bytes
//!  +----------+-----------+------------+-------+-----------+-----------+--------+---------+
//!  | FFRJRNL1 | snapshot  | block_size | 0     | base id   | blocks    | 0 x16  | check   |
//!  | 8 bytes  | u64 LE    | u32 LE     | u32   | u64 LE    | planned   |        | 8 bytes |
//!  +----------+-----------+------------+-------+-----------+-----------+--------+---------+
//!  base id = u64::MAX when the snapshot is a full copy.
//!
//!  record, 64 bytes, appended in batches after the data they name is fsynced
//!  +-----------+-------------+--------+-------+-------------------+---------+
//!  | block     | data offset | flags  | 0     | chaining value    | check   |
//!  | u64 LE    | u64 LE      | u32 LE | u32   | 32 bytes          | 8 bytes |
//!  +-----------+-------------+--------+-------+-------------------+---------+
//!  flags bit 0 = the block is all zeros (no data stored)
//!  check = the first 8 bytes of blake3 of the 56 bytes before it
//! ```
//!
//! A record is appended only after the data it names is fsynced, and the
//! journal is fsynced before the batch counts as received, so a record on disk
//! always names durable data. A crash can tear the last record; an in-progress
//! journal drops a torn tail (those blocks are simply sent again), a complete
//! snapshot's journal must be whole.

use std::path::Path;

use super::BlockCv;
use crate::error::{Error, Result};

/// Bytes of the header and of each record.
pub const RECORD_LEN: usize = 64;
const MAGIC: &[u8; 8] = b"FFRJRNL1";
const FLAG_ZERO: u32 = 1;
/// A journal larger than this is not one (2^26 records: 4 TiB of 64 KiB blocks).
pub const MAX_JOURNAL_BYTES: u64 = (RECORD_LEN as u64) << 26;

/// What the header records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHeader {
    pub snapshot: u64,
    pub block_size: u32,
    /// The replica snapshot this one is built on; `None` for a full copy.
    pub base: Option<u64>,
    /// Blocks the transfer plans to send.
    pub blocks: u64,
}

/// One block of the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub block: u64,
    /// Where its data starts in `<id>.data` (unused when `zero`).
    pub offset: u64,
    pub zero: bool,
    pub cv: BlockCv,
}

fn check(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(&bytes[..56]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h.as_bytes()[..8]);
    c
}

/// The 64 header bytes.
pub fn encode_header(h: &JournalHeader) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&h.snapshot.to_le_bytes());
    b[16..20].copy_from_slice(&h.block_size.to_le_bytes());
    b[24..32].copy_from_slice(&h.base.unwrap_or(u64::MAX).to_le_bytes());
    b[32..40].copy_from_slice(&h.blocks.to_le_bytes());
    let c = check(&b);
    b[56..].copy_from_slice(&c);
    b
}

/// The 64 bytes of one record.
pub fn encode_record(e: &Entry) -> [u8; RECORD_LEN] {
    let mut b = [0u8; RECORD_LEN];
    b[..8].copy_from_slice(&e.block.to_le_bytes());
    b[8..16].copy_from_slice(&e.offset.to_le_bytes());
    b[16..20].copy_from_slice(&(if e.zero { FLAG_ZERO } else { 0 }).to_le_bytes());
    b[24..56].copy_from_slice(&e.cv);
    let c = check(&b);
    b[56..].copy_from_slice(&c);
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// A journal as read back.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub header: JournalHeader,
    pub entries: Vec<Entry>,
    /// Bytes up to the end of the last good record (where the next append goes).
    pub valid_len: u64,
    /// True if a torn or damaged last record was dropped.
    pub dropped_tail: bool,
}

/// Reads `path`. With `in_progress`, a torn or damaged *last* record is dropped
/// (it was being written when the process died); damage anywhere else, or in a
/// complete snapshot's journal, is an error naming the file and the record.
pub fn load(path: &Path, in_progress: bool) -> Result<Loaded> {
    let corrupt = |why: String| Error::ReplicaCorrupt {
        file: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
    if meta.len() > MAX_JOURNAL_BYTES {
        return Err(corrupt(format!(
            "{} bytes is more than a journal can hold ({MAX_JOURNAL_BYTES})",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    decode(path, &bytes, in_progress)
}

/// Decodes a journal's bytes (read from `path`, which errors name); see [`load`].
pub fn decode(path: &Path, bytes: &[u8], in_progress: bool) -> Result<Loaded> {
    let corrupt = |why: String| Error::ReplicaCorrupt {
        file: path.to_path_buf(),
        why,
    };
    if bytes.len() as u64 > MAX_JOURNAL_BYTES {
        return Err(corrupt(format!(
            "{} bytes is more than a journal can hold ({MAX_JOURNAL_BYTES})",
            bytes.len()
        )));
    }
    if bytes.len() < RECORD_LEN {
        return Err(corrupt(format!(
            "{} bytes, shorter than the {RECORD_LEN}-byte header",
            bytes.len()
        )));
    }
    let head = &bytes[..RECORD_LEN];
    if &head[..8] != MAGIC {
        return Err(corrupt("not a replica journal (wrong magic)".into()));
    }
    if head[56..] != check(head) {
        return Err(corrupt("header fails its checksum".into()));
    }
    let base = u64_at(head, 24);
    let header = JournalHeader {
        snapshot: u64_at(head, 8),
        block_size: u32_at(head, 16),
        base: (base != u64::MAX).then_some(base),
        blocks: u64_at(head, 32),
    };
    let body = &bytes[RECORD_LEN..];
    let whole = body.len() / RECORD_LEN;
    let mut entries = Vec::with_capacity(whole);
    let mut dropped_tail = body.len() % RECORD_LEN != 0;
    for (i, r) in body.chunks_exact(RECORD_LEN).enumerate() {
        if r[56..] != check(r) {
            if in_progress && i + 1 == whole {
                dropped_tail = true;
                break;
            }
            return Err(corrupt(format!(
                "record {i} (byte {}) fails its checksum",
                RECORD_LEN * (i + 1)
            )));
        }
        entries.push(Entry {
            block: u64_at(r, 0),
            offset: u64_at(r, 8),
            zero: u32_at(r, 16) & FLAG_ZERO != 0,
            cv: r[24..56].try_into().unwrap_or([0; 32]),
        });
    }
    if dropped_tail && !in_progress {
        return Err(corrupt(format!(
            "{} bytes is not a whole number of records (truncated or torn)",
            bytes.len()
        )));
    }
    let valid_len = (RECORD_LEN * (entries.len() + 1)) as u64;
    Ok(Loaded {
        header,
        entries,
        valid_len,
        dropped_tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_record_is_dropped_in_progress_and_refused_when_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("5.journal");
        let h = JournalHeader {
            snapshot: 5,
            block_size: 4096,
            base: Some(3),
            blocks: 2,
        };
        let e1 = Entry {
            block: 7,
            offset: 0,
            zero: false,
            cv: [9; 32],
        };
        let e2 = Entry {
            block: 8,
            offset: 0,
            zero: true,
            cv: [1; 32],
        };
        let mut bytes = encode_header(&h).to_vec();
        bytes.extend_from_slice(&encode_record(&e1));
        bytes.extend_from_slice(&encode_record(&e2)[..30]);
        std::fs::write(&p, &bytes).expect("write");
        let l = load(&p, true).expect("in progress loads");
        assert_eq!(l.header, h);
        assert_eq!(l.entries, vec![e1]);
        assert!(l.dropped_tail);
        assert_eq!(l.valid_len, 128);
        let err = load(&p, false)
            .expect_err("complete must be whole")
            .to_string();
        assert!(
            err.contains("5.journal") && err.contains("truncated"),
            "{err}"
        );
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("2.journal");
        let h = JournalHeader {
            snapshot: 2,
            block_size: 4096,
            base: None,
            blocks: 3,
        };
        let mut bytes = encode_header(&h).to_vec();
        for b in 0..3 {
            bytes.extend_from_slice(&encode_record(&Entry {
                block: b,
                offset: b * 4096,
                zero: false,
                cv: [b as u8; 32],
            }));
        }
        bytes[RECORD_LEN + 3] ^= 0xff;
        std::fs::write(&p, &bytes).expect("write");
        let err = load(&p, true).expect_err("middle damage").to_string();
        assert!(err.contains("record 0"), "{err}");
        std::fs::write(&p, b"garbage").expect("write");
        assert!(load(&p, true)
            .expect_err("garbage")
            .to_string()
            .contains("shorter than"));
    }
}
