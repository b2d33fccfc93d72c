//! Every decoder of freezeframe-core's file and wire formats, behind one
//! bytes-in entry point each, for the cargo-fuzz targets (`fuzz/`) and the
//! property tests (`core/tests/decoder_properties.rs`). Not an API for
//! anything else.
//!
//! Each entry returns the decoded value in a printable form (so a property can
//! compare "exactly the original value") or the crate's typed [`Error`].
//! [`samples`] gives a valid encoding of each checksummed format, for the
//! "one flipped byte" property and as fuzz seeds.

use std::path::Path;

use crate::error::{Error, Result};

/// One decoder: its name and its bytes-in entry point.
pub type Decoder = fn(&[u8]) -> Result<String>;

/// The decoders of checksummed formats: a flipped byte in a valid encoding
/// must give the original value or an error.
pub const CHECKSUMMED: &[(&str, Decoder)] = &[
    ("state_envelope", state_envelope),
    ("catalog", catalog),
    ("map", map),
    ("backup_envelope", backup_envelope),
    ("backup_index", backup_index),
    ("backup_manifest", backup_manifest),
    ("backup_pack", backup_pack),
    ("replica_journal", replica_journal),
    ("snapshot_manifest", snapshot_manifest),
    ("replica_cvs", replica_cvs),
];

/// Decoders of formats without a checksum of their own (plain JSON files and
/// wire messages; the wire is authenticated by TLS): arbitrary bytes must
/// give a value or a typed error, never a panic or an unbounded allocation.
pub const UNCHECKSUMMED: &[(&str, Decoder)] = &[
    ("peer_message", peer_message),
    ("replica_wire", replica_wire),
    ("replica_journal_in_progress", replica_journal_in_progress),
];

const STATE_KIND: crate::format::Kind = crate::format::Kind {
    magic: *b"FFSTATE1",
    version: 1,
};

/// The state envelope ([`crate::format`]) around every engine state file.
pub fn state_envelope(bytes: &[u8]) -> Result<String> {
    let (payload, used) =
        crate::format::decode(STATE_KIND, bytes).map_err(|problem| Error::Format {
            file: "<state>".into(),
            problem,
        })?;
    Ok(format!("{payload:?} {used}"))
}

/// A catalog slot (`catalog.a` / `catalog.b`).
pub fn catalog(bytes: &[u8]) -> Result<String> {
    crate::volume::decode::catalog_debug(bytes)
}

/// A whole snapshot map file (`snap-N.map`).
pub fn map(bytes: &[u8]) -> Result<String> {
    crate::volume::decode::map_file(bytes)
}

/// A snapshot manifest (`manifests/N.json`, plain JSON).
pub fn snapshot_manifest(bytes: &[u8]) -> Result<String> {
    crate::manifest::parse(Path::new("<manifest>"), bytes).map(|m| format!("{m:?}"))
}

const BACKUP_MAGIC: &[u8; 8] = b"FFBKTEST";

/// The backup repository's envelope (config, index, manifest).
pub fn backup_envelope(bytes: &[u8]) -> Result<String> {
    crate::backup::envelope::open(Path::new("<backup>"), BACKUP_MAGIC, 1, bytes)
        .map(|p| format!("{p:?}"))
}

/// A backup index file (`index/<id>.idx`).
pub fn backup_index(bytes: &[u8]) -> Result<String> {
    crate::backup::index::decode_index(Path::new("<index>"), bytes).map(|v| format!("{v:?}"))
}

/// A backup manifest (`backups/<id>.backup`).
pub fn backup_manifest(bytes: &[u8]) -> Result<String> {
    crate::backup::manifest::Manifest::decode(Path::new("<backup manifest>"), bytes)
        .map(|m| format!("{m:?}"))
}

/// A backup pack's header and trailer (`packs/<id>.pack`).
pub fn backup_pack(bytes: &[u8]) -> Result<String> {
    let path = Path::new("<pack>");
    crate::backup::pack::decode_trailer(path, bytes.len() as u64, |buf, at| {
        let src = usize::try_from(at)
            .ok()
            .and_then(|a| bytes.get(a..a.checked_add(buf.len())?))
            .ok_or_else(|| Error::RepoCorrupt {
                path: path.to_path_buf(),
                detail: format!("read of {} bytes at {at} is past the end", buf.len()),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    })
    .map(|v| format!("{v:?}"))
}

/// A complete replica snapshot's journal.
pub fn replica_journal(bytes: &[u8]) -> Result<String> {
    crate::replica::journal::decode(Path::new("<journal>"), bytes, false)
        .map(|l| format!("{:?} {:?} {}", l.header, l.entries, l.valid_len))
}

/// An in-progress replica journal (a damaged last record is dropped as torn).
pub fn replica_journal_in_progress(bytes: &[u8]) -> Result<String> {
    crate::replica::journal::decode(Path::new("<journal>"), bytes, true)
        .map(|l| format!("{:?} {}", l.entries.len(), l.dropped_tail))
}

/// The replica protocol's messages (JSON documents inside netproto frames).
pub fn replica_wire(bytes: &[u8]) -> Result<String> {
    use crate::replica::wire::{Blocks, Reply, Request};
    let bad = |e: serde_json::Error| Error::ManifestCorrupt {
        path: "<replica wire message>".into(),
        reason: e.to_string(),
    };
    let req = serde_json::from_slice::<Request>(bytes).map(|r| format!("{r:?}"));
    let rep = serde_json::from_slice::<Reply>(bytes).map(|r| format!("{r:?}"));
    let blk = serde_json::from_slice::<Blocks>(bytes).map(|r| format!("{r:?}"));
    match (req, rep, blk) {
        (Ok(v), _, _) | (_, Ok(v), _) | (_, _, Ok(v)) => Ok(v),
        (Err(e), _, _) => Err(bad(e)),
    }
}

/// A peer protocol message (JSON inside a frame; the frame itself is
/// netproto's decoder).
pub fn peer_message(bytes: &[u8]) -> Result<String> {
    serde_json::from_slice::<crate::protocol::PeerMessage>(bytes)
        .map(|m| format!("{m:?}"))
        .map_err(|e| Error::ManifestCorrupt {
            path: "<peer message>".into(),
            reason: e.to_string(),
        })
}

/// The geometry [`replica_cvs`] decodes for: snapshot 9, 4 blocks of 64 KiB.
const CVS_SAMPLE: (u64, u64, u32) = (9, 4, 65_536);

/// A replica chaining-values file (`replica-cvs/<id>.cvs`).
pub fn replica_cvs(bytes: &[u8]) -> Result<String> {
    let (id, blocks, bs) = CVS_SAMPLE;
    crate::replica::source::parse_cvs(Path::new("<replica cvs>"), bytes, id, blocks, bs)
        .map(|v| format!("{v:?}"))
}

/// The checksummed formats [`seal`] can wrap an arbitrary payload for.
pub const SEALABLE: &[&str] = &[
    "state_envelope",
    "catalog",
    "map",
    "backup_envelope",
    "backup_index",
    "backup_manifest",
];

/// `payload` wrapped in format `name` with a valid checksum, so that the
/// payload parser (not only the checksum) sees arbitrary input. For `map`,
/// the payload is a sequence of 48-byte record bodies.
pub fn seal(name: &str, payload: &[u8]) -> Option<Vec<u8>> {
    use crate::backup::envelope;
    Some(match name {
        "state_envelope" => crate::format::encode(STATE_KIND, payload),
        "catalog" => crate::volume::decode::seal_catalog(payload),
        "map" => crate::volume::decode::seal_map_records(payload),
        "backup_envelope" => envelope::seal(BACKUP_MAGIC, 1, payload),
        "backup_index" => envelope::seal(b"FFBKINDX", 1, payload),
        "backup_manifest" => envelope::seal(b"FFBKMANI", 1, payload),
        _ => return None,
    })
}

/// The decoder of format `name`.
pub fn decoder(name: &str) -> Option<Decoder> {
    CHECKSUMMED
        .iter()
        .chain(UNCHECKSUMMED)
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
}

/// A valid encoding of each checksummed format, by decoder name.
pub fn samples() -> Vec<(&'static str, Vec<u8>)> {
    use crate::backup::hash::BlockHash;
    use crate::backup::index::IndexEntry;
    use crate::backup::manifest::{
        BackupKind, BackupStats, Manifest, ManifestHeader, SnapshotRef, SourceIdentity,
    };
    use crate::replica::journal::{encode_header, encode_record, Entry, JournalHeader};

    let state = crate::format::encode(STATE_KIND, b"{\"some\":\"state\",\"n\":42}");
    let backup_env = crate::backup::envelope::seal(BACKUP_MAGIC, 1, b"a backup payload");

    let entries: Vec<IndexEntry> = (0..4u64)
        .map(|k| IndexEntry {
            hash: BlockHash::of(&k.to_le_bytes()),
            offset: 16 + k * 100,
            len: 100,
        })
        .collect();
    let mut payload = Vec::new();
    payload.extend_from_slice(&(16u64 + 400).to_le_bytes());
    payload.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in &entries {
        payload.extend_from_slice(&e.hash.0);
        payload.extend_from_slice(&e.offset.to_le_bytes());
        payload.extend_from_slice(&e.len.to_le_bytes());
    }
    let index = crate::backup::envelope::seal(b"FFBKINDX", 1, &payload);

    let mut pack = Vec::new();
    pack.extend_from_slice(crate::backup::pack::PACK_MAGIC);
    pack.extend_from_slice(&crate::backup::pack::PACK_VERSION.to_le_bytes());
    pack.extend_from_slice(&[0u8; 4]);
    pack.extend_from_slice(&[7u8; 400]);
    pack.extend_from_slice(&crate::backup::pack::encode_trailer(&entries));

    let h = |k: u8| Some(BlockHash::of(&[k]));
    let manifest = Manifest {
        header: ManifestHeader {
            id: "20260101-000000-abcd".into(),
            created_ms: 1_700_000_000_000,
            source: SourceIdentity {
                volume_id: "/srv/vol.img".into(),
                name: "vol".into(),
            },
            snapshot: SnapshotRef {
                id: 4,
                created_ms: 1_699_999_999_000,
            },
            block_size: 4096,
            image_size: 6 * 4096,
            kind: BackupKind::Full { reason: None },
            stats: BackupStats::default(),
        },
        blocks: vec![h(1), None, None, h(2), h(1), h(3)],
    }
    .encode();

    let mut journal = encode_header(&JournalHeader {
        snapshot: 9,
        block_size: 4096,
        base: Some(8),
        blocks: 3,
    })
    .to_vec();
    for k in 0..3u64 {
        journal.extend_from_slice(&encode_record(&Entry {
            block: k,
            offset: k * 4096,
            zero: k == 1,
            cv: *blake3::hash(&k.to_le_bytes()).as_bytes(),
        }));
    }

    vec![
        ("state_envelope", state),
        ("catalog", crate::volume::decode::sample_catalog(3)),
        ("map", crate::volume::decode::sample_map(5)),
        ("backup_envelope", backup_env),
        ("backup_index", index),
        ("backup_manifest", manifest),
        ("backup_pack", pack),
        ("replica_journal", journal),
        (
            "snapshot_manifest",
            crate::manifest::encode(&crate::manifest::SnapshotManifest::bare(
                7,
                1_795_000_000_000,
                crate::manifest::ManifestStatus::Sealed,
                65_536,
                1 << 30,
            )),
        ),
        ("replica_cvs", {
            let (id, blocks, bs) = CVS_SAMPLE;
            let cvs: Vec<[u8; 32]> = (0..blocks)
                .map(|b| *blake3::hash(&b.to_le_bytes()).as_bytes())
                .collect();
            crate::replica::source::encode_cvs(id, bs, &cvs)
        }),
    ]
}
