//! Making a backup: full the first time, express-full afterwards.
//!
//! The pipeline has three stages on their own threads so disk reads,
//! hashing and pack writes overlap:
//!
//! ```text
//! reader ──chunks of up to 8 MiB──▶ hasher (blocks hashed in parallel) ──new blobs──▶ pack writer
//!    ▲                                                                                    │
//!    └──────────────────────────────── buffers recycled ──────────────────────────────────┘
//! ```
//!
//! The hasher decides deduplication (index lookup plus the hashes already
//! sent in this run), so the writer only ever sees data the repository
//! lacks. The manifest is written last, after every pack and index it
//! relies on is durable.

use std::collections::HashSet;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::Instant;

use super::fsutil::sync_dir;
use super::hash::{now_ms, unique_hex, BlockHash, DigestBuild};
use super::index::MasterIndex;
use super::manifest::{block_count, BackupKind, BackupStats, Manifest, ManifestHeader};
use super::pack::{PackWriter, MAX_BLOB};
use super::repo::Repository;
use super::source::{BlockSource, ChangedSince};
use super::Progress;
use crate::error::{Error, Result};

/// Bytes per read request: large sequential reads, few syscalls.
const CHUNK_BYTES: usize = 8 << 20;
/// Buffers in flight between the stages (bounds memory to about 5 × 8 MiB).
const BUFFERS: usize = 5;

/// A run of consecutive blocks read in one request.
struct Chunk {
    first: u64,
    count: usize,
    buf: Vec<u8>,
}

/// New blobs for the writer: the chunk's buffer and (hash, start, len) in it.
struct Blobs {
    buf: Vec<u8>,
    items: Vec<(BlockHash, usize, usize)>,
}

impl Repository {
    /// Backs up `source` (a complete snapshot) and returns the new manifest.
    pub fn backup(&self, source: &dyn BlockSource, progress: &dyn Progress) -> Result<Manifest> {
        let started = Instant::now();
        source.check_complete()?;
        let block_size = source.block_size();
        let size = source.size();
        let identity = source.identity();
        let snapshot = source.snapshot();
        if block_size == 0 || block_size > MAX_BLOB {
            return Err(Error::SnapshotNotBackupable {
                snapshot: snapshot.id,
                source_name: identity.name,
                reason: format!("block size {block_size} is outside 1..={MAX_BLOB}"),
            });
        }
        let lock = self.lock_writer()?;
        self.remove_temps(&lock)?;
        let index = MasterIndex::load(&self.root)?;
        let n_blocks = block_count(size, block_size);

        // The last backup of this volume, if any, is the base of an express-full backup.
        // Headers are enough to choose it; only the chosen manifest is fully
        // read and checked (a damaged one means a full backup, not a failure).
        let previous = self
            .backup_ids()?
            .into_iter()
            .filter_map(|id| self.peek_header(&id))
            .filter(|h| h.source.volume_id == identity.volume_id)
            .max_by_key(|h| (h.snapshot.id, h.created_ms))
            .map(|h| (h.id.clone(), self.read_manifest_file(&h.id)));

        let (mut blocks, to_read, kind) = match previous {
            None => (
                vec![None; n_blocks as usize],
                vec![(0, n_blocks)],
                BackupKind::Full { reason: None },
            ),
            Some((id, Err(e))) => {
                let reason = format!("the last backup {id} of this volume is unreadable ({e})");
                tracing::warn!(volume = %identity.name, "full backup: {reason}");
                (
                    vec![None; n_blocks as usize],
                    vec![(0, n_blocks)],
                    BackupKind::Full {
                        reason: Some(reason),
                    },
                )
            }
            Some((_, Ok(prev))) => match express_plan(source, prev, &index, n_blocks)? {
                Ok(plan) => plan,
                Err(reason) => {
                    tracing::info!(volume = %identity.name, "full backup: {reason}");
                    (
                        vec![None; n_blocks as usize],
                        vec![(0, n_blocks)],
                        BackupKind::Full {
                            reason: Some(reason),
                        },
                    )
                }
            },
        };

        let read_blocks: u64 = to_read.iter().map(|r| r.1).sum();
        let read_bytes: u64 = to_read
            .iter()
            .map(|&(s, n)| (size.min((s + n) * u64::from(block_size))) - s * u64::from(block_size))
            .sum();
        progress.start("backup", read_bytes);
        let mut stats = BackupStats {
            blocks_total: n_blocks,
            blocks_read: read_blocks,
            bytes_read: read_bytes,
            ..Default::default()
        };
        let sealed = pipeline(
            source,
            &self.root,
            self.config.pack_size,
            &index,
            &to_read,
            &mut blocks,
            &mut stats,
            progress,
        )?;
        progress.finish();
        // The snapshot may have been invalidated while we read it (diff area
        // full); then what we read cannot be trusted and no manifest is written.
        source.check_complete()?;
        stats.packs_written = sealed as u64;
        stats.blocks_zero = blocks.iter().filter(|b| b.is_none()).count() as u64;
        stats.duration_ms = started.elapsed().as_millis() as u64;

        let header = ManifestHeader {
            id: unique_hex(),
            created_ms: now_ms(),
            source: identity,
            snapshot,
            block_size,
            image_size: size,
            kind,
            stats,
        };
        let manifest = Manifest { header, blocks };
        // Index files are already durable (each was written atomically);
        // the manifest goes in last.
        super::fsutil::write_atomic(&self.manifest_path(&manifest.header.id), &manifest.encode())?;
        sync_dir(&self.root.join("backups"))?;
        drop(lock);
        Ok(manifest)
    }
}

/// Block hashes to start from, blocks to read, and the kind of backup.
type Plan = (Vec<Option<BlockHash>>, Vec<(u64, u64)>, BackupKind);

/// Plans an express-full backup on top of `prev`, or says why it must be full.
fn express_plan(
    source: &dyn BlockSource,
    prev: Manifest,
    index: &MasterIndex,
    n_blocks: u64,
) -> Result<std::result::Result<Plan, String>> {
    let h = &prev.header;
    let snapshot = source.snapshot();
    if h.block_size != source.block_size() || h.image_size != source.size() {
        return Ok(Err(format!(
            "the volume's geometry changed since backup {} ({} bytes in {}-byte blocks, now {} in {})",
            h.id,
            h.image_size,
            h.block_size,
            source.size(),
            source.block_size()
        )));
    }
    if h.snapshot.id > snapshot.id {
        return Ok(Err(format!(
            "snapshot {} is older than snapshot {} of the last backup {}",
            snapshot.id, h.snapshot.id, h.id
        )));
    }
    let mut want = match source.changed_since(&h.snapshot)? {
        ChangedSince::Unknown { reason } => return Ok(Err(reason)),
        ChangedSince::Blocks(changed) => changed,
    };
    if let Some(bad) = want.iter().find(|&&b| b >= n_blocks) {
        return Err(Error::SourceRead {
            snapshot: snapshot.id,
            block: *bad,
            source_name: source.identity().name,
            detail: format!(
                "the changed-block list names block {bad} of an image of {n_blocks} blocks"
            ),
        });
    }
    // A block whose data the index no longer has (damaged or lost pack) is
    // read again rather than referenced blindly.
    for (i, b) in prev.blocks.iter().enumerate() {
        if let Some(hash) = b {
            if index.get(hash).is_none() {
                want.push(i as u64);
            }
        }
    }
    want.sort_unstable();
    want.dedup();
    let kind = BackupKind::Incremental {
        parent: h.id.clone(),
        parent_snapshot: h.snapshot.id,
    };
    Ok(Ok((prev.blocks, runs(&want), kind)))
}

/// Sorted block indices as (first, count) runs.
fn runs(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in sorted {
        match out.last_mut() {
            Some((s, n)) if *s + *n == b => *n += 1,
            _ => out.push((b, 1)),
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn pipeline(
    source: &dyn BlockSource,
    root: &std::path::Path,
    pack_size: u64,
    index: &MasterIndex,
    to_read: &[(u64, u64)],
    blocks: &mut [Option<BlockHash>],
    stats: &mut BackupStats,
    progress: &dyn Progress,
) -> Result<usize> {
    let bs = source.block_size() as usize;
    let size = source.size();
    let per_chunk = (CHUNK_BYTES / bs).max(1);
    let zero_full = BlockHash::of(&vec![0u8; bs]);
    let tail_len = (size % bs as u64) as usize;
    let zero_tail = BlockHash::of(&vec![0u8; tail_len]);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8);

    let (pool_tx, pool_rx) = mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        let _ = pool_tx.send(Vec::with_capacity(per_chunk * bs));
    }
    let (chunk_tx, chunk_rx) = mpsc::sync_channel::<Result<Chunk>>(2);
    let (blob_tx, blob_rx) = mpsc::sync_channel::<Blobs>(2);

    std::thread::scope(|scope| {
        let reader = scope.spawn(move || read_stage(source, to_read, per_chunk, pool_rx, chunk_tx));
        let writer_pool = pool_tx.clone();
        let writer = scope.spawn(move || write_stage(root, pack_size, blob_rx, writer_pool));

        let mut sent: HashSet<BlockHash, DigestBuild> = HashSet::default();
        let mut hash_result: Result<()> = Ok(());
        for chunk in chunk_rx.iter() {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    hash_result = Err(e);
                    break;
                }
            };
            let lens: Vec<usize> = (0..chunk.count)
                .map(|k| {
                    let start = (chunk.first + k as u64) * bs as u64;
                    (size - start).min(bs as u64) as usize
                })
                .collect();
            let hashes = hash_blocks(&chunk.buf, bs, &lens, threads);
            let mut items = Vec::new();
            for (k, h) in hashes.into_iter().enumerate() {
                let len = lens[k];
                let zero = if len == bs { zero_full } else { zero_tail };
                let idx = chunk.first as usize + k;
                if h == zero {
                    blocks[idx] = None;
                    continue;
                }
                blocks[idx] = Some(h);
                if index.get(&h).is_none() && sent.insert(h) {
                    items.push((h, k * bs, len));
                    stats.blocks_stored += 1;
                    stats.bytes_stored += len as u64;
                }
            }
            progress.advance(lens.iter().sum::<usize>() as u64);
            if items.is_empty() {
                let _ = pool_tx.send(chunk.buf);
            } else if blob_tx
                .send(Blobs {
                    buf: chunk.buf,
                    items,
                })
                .is_err()
            {
                // The writer failed; its error is collected below.
                break;
            }
        }
        drop(chunk_rx);
        drop(blob_tx);
        drop(pool_tx);
        let read_result = reader
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let write_result = writer
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        // Report the first real cause: a read error ends the stream early.
        hash_result?;
        let sealed = write_result?;
        read_result?;
        Ok(sealed)
    })
}

fn read_stage(
    source: &dyn BlockSource,
    to_read: &[(u64, u64)],
    per_chunk: usize,
    pool: Receiver<Vec<u8>>,
    out: SyncSender<Result<Chunk>>,
) -> Result<()> {
    let bs = source.block_size() as u64;
    let size = source.size();
    for &(first, count) in to_read {
        let mut b = first;
        while b < first + count {
            let n = ((first + count - b) as usize).min(per_chunk);
            let Ok(mut buf) = pool.recv() else {
                return Ok(());
            };
            let start = b * bs;
            let end = size.min((b + n as u64) * bs);
            buf.resize((end - start) as usize, 0);
            let result = source.read_at(&mut buf, start).map(|()| Chunk {
                first: b,
                count: n,
                buf,
            });
            let failed = result.is_err();
            if out.send(result).is_err() || failed {
                return Ok(());
            }
            b += n as u64;
        }
    }
    Ok(())
}

fn write_stage(
    root: &std::path::Path,
    pack_size: u64,
    input: Receiver<Blobs>,
    pool: SyncSender<Vec<u8>>,
) -> Result<usize> {
    let mut writer = PackWriter::new(root, pack_size);
    for blobs in input.iter() {
        writer.add(&blobs.buf, &blobs.items)?;
        let _ = pool.try_send(blobs.buf);
    }
    Ok(writer.finish()?.len())
}

/// Hashes the blocks of one chunk, split across `threads` threads.
fn hash_blocks(buf: &[u8], bs: usize, lens: &[usize], threads: usize) -> Vec<BlockHash> {
    let n = lens.len();
    let hash_one = |k: usize| BlockHash::of(&buf[k * bs..k * bs + lens[k]]);
    if threads <= 1 || n < 2 {
        return (0..n).map(hash_one).collect();
    }
    let per = n.div_ceil(threads);
    let mut out = vec![BlockHash([0; 32]); n];
    std::thread::scope(|s| {
        for (t, slot) in out.chunks_mut(per).enumerate() {
            let hash_one = &hash_one;
            s.spawn(move || {
                for (j, h) in slot.iter_mut().enumerate() {
                    *h = hash_one(t * per + j);
                }
            });
        }
    });
    out
}
