//! Test volumes for the backup store: an in-memory volume with snapshots
//! and a changed-block list per snapshot (what the volume engine keeps in
//! its diff area), and helpers to mutate, back up and compare.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use freezeframe_core::backup::{BlockSource, ChangedSince, SnapshotRef, SourceIdentity};
use freezeframe_core::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// How a test snapshot presents itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Sealed,
    Open,
    Invalid(String),
}

/// A volume in memory: live data plus frozen snapshots.
pub struct TestVolume {
    pub name: String,
    pub block_size: u32,
    pub data: Vec<u8>,
    /// id -> (created_ms, image, blocks changed since the previous snapshot).
    pub snapshots: BTreeMap<u64, (u64, Vec<u8>, Vec<u64>)>,
    /// Blocks written since the last snapshot.
    pending: Vec<u64>,
    next_id: u64,
    pub rng: StdRng,
}

impl TestVolume {
    /// A volume of `blocks` blocks of random data, with some zero blocks.
    pub fn random(name: &str, block_size: u32, blocks: u64, seed: u64) -> TestVolume {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut data = vec![0u8; (blocks * u64::from(block_size)) as usize];
        rng.fill_bytes(&mut data);
        for b in 0..blocks {
            if b % 7 == 3 {
                let s = (b * u64::from(block_size)) as usize;
                data[s..s + block_size as usize].fill(0);
            }
        }
        TestVolume {
            name: name.into(),
            block_size,
            data,
            snapshots: BTreeMap::new(),
            pending: Vec::new(),
            next_id: 1,
            rng,
        }
    }

    pub fn blocks(&self) -> u64 {
        (self.data.len() as u64).div_ceil(u64::from(self.block_size))
    }

    /// Overwrites `n` random blocks with random data (some with zeros, some with copies of other blocks).
    pub fn change_random_blocks(&mut self, n: usize) -> Vec<u64> {
        let bs = self.block_size as usize;
        let mut changed = Vec::new();
        for k in 0..n {
            let b = self.rng.gen_range(0..self.blocks());
            let s = b as usize * bs;
            let e = (s + bs).min(self.data.len());
            match k % 5 {
                0 => self.data[s..e].fill(0),
                1 => {
                    let other = self.rng.gen_range(0..self.blocks() - 1) as usize * bs;
                    let copy = self.data[other..other + (e - s)].to_vec();
                    self.data[s..e].copy_from_slice(&copy);
                }
                _ => self.rng.fill_bytes(&mut self.data[s..e]),
            }
            changed.push(b);
        }
        self.pending.extend(&changed);
        changed
    }

    /// Writes `bytes` at block `b` (tracked as a change).
    pub fn write_block(&mut self, b: u64, bytes: &[u8]) {
        let s = (b * u64::from(self.block_size)) as usize;
        self.data[s..s + bytes.len()].copy_from_slice(bytes);
        self.pending.push(b);
    }

    /// Freezes the current data as a new snapshot; returns its id.
    pub fn snapshot(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut changed = std::mem::take(&mut self.pending);
        changed.sort_unstable();
        changed.dedup();
        self.snapshots
            .insert(id, (1000 + id, self.data.clone(), changed));
        id
    }

    pub fn image(&self, id: u64) -> &[u8] {
        &self.snapshots[&id].1
    }

    /// The snapshot as a backup source.
    pub fn source(&self, id: u64) -> TestSnapshot<'_> {
        TestSnapshot {
            volume: self,
            id,
            state: State::Sealed,
        }
    }
}

/// One snapshot of a [`TestVolume`].
pub struct TestSnapshot<'a> {
    pub volume: &'a TestVolume,
    pub id: u64,
    pub state: State,
}

impl BlockSource for TestSnapshot<'_> {
    fn identity(&self) -> SourceIdentity {
        SourceIdentity {
            volume_id: format!("test:{}", self.volume.name),
            name: self.volume.name.clone(),
        }
    }
    fn snapshot(&self) -> SnapshotRef {
        SnapshotRef {
            id: self.id,
            created_ms: self.volume.snapshots[&self.id].0,
        }
    }
    fn block_size(&self) -> u32 {
        self.volume.block_size
    }
    fn size(&self) -> u64 {
        self.volume.image(self.id).len() as u64
    }
    fn check_complete(&self) -> Result<()> {
        let reason = match &self.state {
            State::Sealed => return Ok(()),
            State::Open => {
                "it is still open (post-snapshot processing has not finished)".to_string()
            }
            State::Invalid(why) => format!("it is invalid: {why}"),
        };
        Err(Error::SnapshotNotBackupable {
            snapshot: self.id,
            source_name: self.volume.name.clone(),
            reason,
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let img = self.volume.image(self.id);
        buf.copy_from_slice(&img[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn changed_since(&self, earlier: &SnapshotRef) -> Result<ChangedSince> {
        match self.volume.snapshots.get(&earlier.id) {
            Some((created, _, _)) if *created == earlier.created_ms => {}
            _ => {
                return Ok(ChangedSince::Unknown {
                    reason: format!("snapshot {} is no longer in the catalog", earlier.id),
                })
            }
        }
        if earlier.id >= self.id {
            return Ok(ChangedSince::Blocks(Vec::new()));
        }
        let mut all: Vec<u64> = self
            .volume
            .snapshots
            .range(earlier.id + 1..=self.id)
            .flat_map(|(_, (_, _, c))| c.iter().copied())
            .collect();
        all.sort_unstable();
        all.dedup();
        Ok(ChangedSince::Blocks(all))
    }
}

/// Reads a restored image file.
pub fn read_image(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("restored image is readable")
}

/// Total bytes of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("list dir") {
        let e = e.expect("dir entry");
        let m = e.metadata().expect("stat");
        n += if m.is_dir() {
            dir_bytes(&e.path())
        } else {
            m.len()
        };
    }
    n
}

/// Bytes in `REPO/packs`.
pub fn pack_bytes(repo: &Path) -> u64 {
    dir_bytes(&repo.join("packs"))
}
