//! Pack files: many blocks' data in one file, so a repository holds a few
//! hundred files rather than millions.
//!
//! ```text
//! offset         size    field
//! 0              8       magic "FFBKPACK"
//! 8              4       version u32 LE (1)
//! 12             4       reserved, 0
//! 16             ...     blob data, back to back, raw (no compression)
//! T              44 * n  trailer entries: blake3 (32) | offset u64 LE | len u32 LE
//! T + 44n        4       n, u32 LE
//! T + 44n + 4    32      blake3 of the trailer entries
//! end - 8        8       magic "FFPKTAIL"
//! ```
//!
//! A pack is written under a temporary name, fsynced, renamed to
//! `packs/<id>.pack` (id = first 16 bytes of the trailer checksum, hex) and
//! the directory fsynced; only then is its index file written. So an index
//! never names a pack that is not durable, and a pack without an index is
//! ignored until gc removes it. The trailer duplicates the index so gc and
//! verify can check one against the other.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::envelope::Reader;
use super::fsutil::{io_err, sync_dir, temp_path};
use super::hash::BlockHash;
use super::index::{write_index_file, IndexEntry};
use crate::error::{Error, Result};

pub(crate) const PACK_MAGIC: &[u8; 8] = b"FFBKPACK";
const TAIL_MAGIC: &[u8; 8] = b"FFPKTAIL";
pub(crate) const PACK_VERSION: u32 = 1;
pub(crate) const PACK_HEADER: u64 = 16;
const ENTRY: usize = 44;
const TAIL: usize = 4 + 32 + 8;
/// Refuse trailers claiming more entries than this (a 64 MiB pack of 512-byte blocks).
const MAX_ENTRIES: u32 = 1 << 17;
/// Largest blob we accept (the largest block size a volume may have).
pub(crate) const MAX_BLOB: u32 = 64 << 20;

/// Writes blobs into packs of about `target` bytes, sealing each pack and
/// its index file durably before starting the next.
pub(crate) struct PackWriter {
    packs_dir: PathBuf,
    index_dir: PathBuf,
    target: u64,
    open: Option<OpenPack>,
    /// Ids of the packs sealed so far.
    sealed: Vec<String>,
}

struct OpenPack {
    file: File,
    tmp: PathBuf,
    pos: u64,
    /// Start of the range not yet handed to writeback.
    flushed: u64,
    entries: Vec<IndexEntry>,
}

impl PackWriter {
    pub(crate) fn new(repo: &Path, target: u64) -> PackWriter {
        PackWriter {
            packs_dir: repo.join("packs"),
            index_dir: repo.join("index"),
            target,
            open: None,
            sealed: Vec::new(),
        }
    }

    /// Appends the blobs `items` (hash, start, len) found in `buf`.
    /// Adjacent blobs go out in one write call.
    pub(crate) fn add(&mut self, buf: &[u8], items: &[(BlockHash, usize, usize)]) -> Result<()> {
        let target = self.target;
        let mut i = 0;
        while i < items.len() {
            let pack = self.open_pack()?;
            // The run of items contiguous in `buf`, stopping once the pack is full.
            let run_start = items[i].1;
            let mut run_end = run_start;
            let mut j = i;
            while j < items.len()
                && items[j].1 == run_end
                && (pack.pos + (run_end - run_start) as u64) < target
            {
                let (hash, start, len) = items[j];
                pack.entries.push(IndexEntry {
                    hash,
                    offset: pack.pos + (start - run_start) as u64,
                    len: len as u32,
                });
                run_end = start + len;
                j += 1;
            }
            pack.file
                .write_all(&buf[run_start..run_end])
                .map_err(io_err("write", &pack.tmp))?;
            pack.pos += (run_end - run_start) as u64;
            start_writeback(pack);
            i = j;
            if pack.pos >= target {
                self.seal_open()?;
            }
        }
        Ok(())
    }

    /// Seals the pack being written (if any); returns the ids of every pack sealed.
    pub(crate) fn finish(mut self) -> Result<Vec<String>> {
        self.seal_open()?;
        Ok(std::mem::take(&mut self.sealed))
    }

    fn open_pack(&mut self) -> Result<&mut OpenPack> {
        if self.open.is_none() {
            let tmp = temp_path(&self.packs_dir, "pack");
            let mut file = crate::perms::private_file_options()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            let mut header = [0u8; PACK_HEADER as usize];
            header[..8].copy_from_slice(PACK_MAGIC);
            header[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
            file.write_all(&header).map_err(io_err("write", &tmp))?;
            self.open = Some(OpenPack {
                file,
                tmp,
                pos: PACK_HEADER,
                flushed: 0,
                entries: Vec::new(),
            });
        }
        match self.open.as_mut() {
            Some(p) => Ok(p),
            None => unreachable!("open pack was just created"),
        }
    }

    fn seal_open(&mut self) -> Result<()> {
        let Some(mut pack) = self.open.take() else {
            return Ok(());
        };
        let result = (|| {
            let trailer = encode_trailer(&pack.entries);
            pack.file
                .write_all(&trailer)
                .map_err(io_err("write", &pack.tmp))?;
            pack.pos += trailer.len() as u64;
            pack.file.sync_all().map_err(io_err("fsync", &pack.tmp))?;
            let sum_at = trailer.len() - TAIL + 4;
            let id = super::hash::hex(&trailer[sum_at..sum_at + 16]);
            let path = self.packs_dir.join(format!("{id}.pack"));
            fs::rename(&pack.tmp, &path).map_err(io_err("rename into place", &path))?;
            sync_dir(&self.packs_dir)?;
            write_index_file(&self.index_dir, &id, pack.pos, &pack.entries)?;
            self.sealed.push(id);
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&pack.tmp);
        }
        result
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // An unfinished pack was never indexed; remove it rather than leave it for gc.
        if let Some(pack) = self.open.take() {
            let _ = fs::remove_file(&pack.tmp);
        }
    }
}

/// Asks the kernel to start writing out what we wrote so far, so the
/// fsync at seal time has little left to do and disk writes overlap with
/// reading and hashing.
fn start_writeback(pack: &mut OpenPack) {
    const STEP: u64 = 8 << 20;
    if pack.pos - pack.flushed < STEP {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an fd we own; a failure only loses the hint.
        unsafe {
            libc::sync_file_range(
                pack.file.as_raw_fd(),
                pack.flushed as libc::off64_t,
                (pack.pos - pack.flushed) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    pack.flushed = pack.pos;
}

pub(crate) fn encode_trailer(entries: &[IndexEntry]) -> Vec<u8> {
    let mut t = Vec::with_capacity(entries.len() * ENTRY + TAIL);
    for e in entries {
        t.extend_from_slice(&e.hash.0);
        t.extend_from_slice(&e.offset.to_le_bytes());
        t.extend_from_slice(&e.len.to_le_bytes());
    }
    let sum = blake3::hash(&t);
    t.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    t.extend_from_slice(sum.as_bytes());
    t.extend_from_slice(TAIL_MAGIC);
    t
}

/// Reads and checks a pack's header and trailer; returns its entries.
pub(crate) fn read_trailer(path: &Path) -> Result<Vec<IndexEntry>> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let size = file.metadata().map_err(io_err("stat", path))?.len();
    decode_trailer(path, size, |buf, at| {
        file.read_exact_at(buf, at).map_err(io_err("read", path))
    })
}

/// Checks a pack of `size` bytes, read through `read_at`, whose errors name `path`.
pub(crate) fn decode_trailer(
    path: &Path,
    size: u64,
    read_at: impl Fn(&mut [u8], u64) -> Result<()>,
) -> Result<Vec<IndexEntry>> {
    let corrupt = |detail: String| Error::RepoCorrupt {
        path: path.to_path_buf(),
        detail,
    };
    if size < PACK_HEADER + TAIL as u64 {
        return Err(corrupt(format!(
            "pack is only {size} bytes, too short for header and trailer"
        )));
    }
    let mut header = [0u8; PACK_HEADER as usize];
    read_at(&mut header, 0)?;
    if &header[..8] != PACK_MAGIC {
        return Err(corrupt("pack header magic is wrong".into()));
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != PACK_VERSION {
        return Err(corrupt(format!(
            "pack format version {version}, this freezeframe reads {PACK_VERSION}"
        )));
    }
    let mut tail = [0u8; TAIL];
    read_at(&mut tail, size - TAIL as u64)?;
    if &tail[36..44] != TAIL_MAGIC {
        return Err(corrupt(
            "pack trailer magic is wrong (pack truncated or damaged)".into(),
        ));
    }
    let n = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if n > MAX_ENTRIES {
        return Err(corrupt(format!(
            "pack trailer claims {n} blobs, more than the {MAX_ENTRIES} allowed"
        )));
    }
    let table_len = n as u64 * ENTRY as u64;
    if table_len + TAIL as u64 + PACK_HEADER > size {
        return Err(corrupt(format!(
            "pack trailer claims {n} blobs, more than fit in {size} bytes"
        )));
    }
    let table_at = size - TAIL as u64 - table_len;
    let mut table = vec![0u8; table_len as usize];
    read_at(&mut table, table_at)?;
    if blake3::hash(&table).as_bytes() != &tail[4..36] {
        return Err(corrupt("pack trailer checksum mismatch".into()));
    }
    let mut r = Reader::new(&table);
    let mut entries = Vec::with_capacity(n as usize);
    for i in 0..n {
        let (Some(hash), Some(offset), Some(len)) = (r.hash(), r.u64(), r.u32()) else {
            return Err(corrupt(format!("pack trailer entry {i} is cut short")));
        };
        if offset < PACK_HEADER
            || offset.saturating_add(u64::from(len)) > table_at
            || len > MAX_BLOB
        {
            return Err(corrupt(format!(
                "pack trailer entry {i} points outside the data area ({offset}+{len})"
            )));
        }
        entries.push(IndexEntry {
            hash: BlockHash(hash),
            offset,
            len,
        });
    }
    Ok(entries)
}
