//! Replicas of a volume's snapshots on a secondary host (seed 004, "synchronizing
//! snapshot volumes across hosts"): the first transfer sends the whole image, every
//! later one only the blocks that changed since a snapshot the secondary already
//! holds, and the secondary builds the new snapshot from its copy of that base.
//!
//! Nothing here opens a socket: the binary's `replica` commands move the
//! [`wire`] messages over QUIC; this module decides what to send ([`source`]),
//! and stores, checks and serves what arrives ([`store`], [`journal`]).
//!
//! # Hashes: one blake3 tree, cut at block boundaries
//!
//! blake3 hashes an input as a binary tree of 1 KiB chunks. A volume block is a
//! power-of-two number of chunks at a block-aligned offset, so it is a whole
//! subtree, and its *chaining value* (CV) is the block's hash at that position
//! ([`block_cv`]). The whole-image blake3 — the same value `snapshot verify`
//! records — is the tree of the blocks' CVs ([`image_root`]). Hence:
//! - every block travels with its CV and the secondary checks each;
//! - the secondary keeps every block's CV, so for an incremental snapshot it
//!   recomputes the image hash from its base's CVs plus the new blocks' CVs and
//!   compares it with the sender's, without re-reading unchanged data;
//! - the sender keeps the CVs of what it pushed (see [`source`]), so after the
//!   first push it hashes only the changed blocks too.
//!
//! # Layout
//! - [`wire`]: the request/reply messages of `replica serve`/`push`/`list`.
//! - [`journal`]: the per-snapshot block journal (also the finished snapshot's index).
//! - [`store`]: the replica directory on the secondary, incoming transfers, reading.
//! - [`source`]: the sender side: which snapshot, which base, which blocks, their CVs.

pub mod journal;
pub mod source;
pub mod store;
pub mod wire;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

use crate::error::Result;

/// A block's chaining value: its blake3 subtree hash at its place in the image.
pub type BlockCv = [u8; 32];

/// The chaining value of block `block` holding `data` (exactly one block) in an
/// image of more than one block.
pub fn block_cv(data: &[u8], block: u64, block_size: u32) -> BlockCv {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(block * block_size as u64);
    h.update(data);
    h.finalize_non_root()
}

/// Chaining values of consecutive blocks, hashed on up to `threads` threads.
/// `data` holds `data.len() / block_size` whole blocks starting at `first`.
pub fn block_cvs_parallel(
    data: &[u8],
    first: u64,
    block_size: u32,
    threads: usize,
) -> Vec<BlockCv> {
    let bs = block_size as usize;
    let n = data.len() / bs;
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 || n < 4 {
        return (0..n)
            .map(|i| block_cv(&data[i * bs..(i + 1) * bs], first + i as u64, block_size))
            .collect();
    }
    let per = n.div_ceil(threads);
    let mut out = vec![[0u8; 32]; n];
    std::thread::scope(|s| {
        for (t, chunk) in out.chunks_mut(per).enumerate() {
            s.spawn(move || {
                for (k, cv) in chunk.iter_mut().enumerate() {
                    let i = t * per + k;
                    *cv = block_cv(&data[i * bs..(i + 1) * bs], first + i as u64, block_size);
                }
            });
        }
    });
    out
}

/// The whole-image blake3 (hex) of an image of `blocks` blocks (at least two),
/// from the blocks' chaining values. `cv(b)` is asked once per block, in order.
///
/// The tree shape is blake3's: the left subtree holds the largest power of two
/// of blocks smaller than the whole (blocks are power-of-two chunk counts, so
/// blake3's split always falls on a block boundary).
pub fn image_root(blocks: u64, mut cv: impl FnMut(u64) -> Result<BlockCv>) -> Result<String> {
    fn subtree(
        lo: u64,
        n: u64,
        cv: &mut dyn FnMut(u64) -> Result<BlockCv>,
    ) -> Result<ChainingValue> {
        if n == 1 {
            return cv(lo);
        }
        let left = left_blocks(n);
        let l = subtree(lo, left, cv)?;
        let r = subtree(lo + left, n - left, cv)?;
        Ok(merge_subtrees_non_root(&l, &r, Mode::Hash))
    }
    debug_assert!(blocks >= 2, "a one-block image has no tree; hash its data");
    let left = left_blocks(blocks);
    let l = subtree(0, left, &mut cv)?;
    let r = subtree(left, blocks - left, &mut cv)?;
    Ok(merge_subtrees_root(&l, &r, Mode::Hash).to_hex().to_string())
}

/// Blocks in the left subtree of a tree over `n >= 2` blocks.
fn left_blocks(n: u64) -> u64 {
    // Largest power of two strictly below n.
    let p = n.next_power_of_two();
    if p == n {
        n / 2
    } else {
        p / 2
    }
}

/// Hex of a chaining value, as it travels and is printed.
pub fn hex(cv: &BlockCv) -> String {
    cv.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits; `None` if it is anything else.
pub fn parse_hex(s: &str) -> Option<BlockCv> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_hash_from_block_cvs_equals_plain_blake3_for_every_block_count() {
        let bs = 4096u32;
        for blocks in [2u64, 3, 4, 5, 7, 8, 9, 16, 17, 31] {
            let data: Vec<u8> = (0..blocks * bs as u64)
                .map(|i| (i * 7 + i / 4096) as u8)
                .collect();
            let cvs = block_cvs_parallel(&data, 0, bs, 2);
            let root = image_root(blocks, |b| Ok(cvs[b as usize])).expect("root");
            assert_eq!(
                root,
                blake3::hash(&data).to_hex().to_string(),
                "{blocks} blocks"
            );
        }
    }

    #[test]
    fn hex_round_trips_and_refuses_garbage() {
        let cv = block_cv(&[1u8; 4096], 3, 4096);
        assert_eq!(parse_hex(&hex(&cv)), Some(cv));
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex(&"g".repeat(64)), None);
    }
}
