//! The checksummed envelope every freezeframe state file is wrapped in.
//!
//! ```text
//!  0        8          12          16                16+len        16+len+32
//!  +--------+----------+-----------+-----------------+-------------+
//!  | magic  | version  | length    | payload         | blake3      |
//!  | 8 B    | u32 LE   | u32 LE    | `length` bytes  | 32 B        |
//!  +--------+----------+-----------+-----------------+-------------+
//!                                    blake3 covers bytes 0 .. 16+len
//! ```
//!
//! The magic names the kind of file (catalog, map header, ...), so a file put
//! in the wrong place is refused by name. `length` is checked against
//! [`MAX_PAYLOAD`] before anything is allocated. Decoding never panics on any
//! input: every failure is a [`FormatProblem`], which the caller wraps with
//! the file name in [`crate::Error::Format`].

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Bytes before the payload: magic, version, length.
pub const HEADER_LEN: usize = 16;
/// Bytes of the trailing blake3 checksum.
pub const CHECKSUM_LEN: usize = 32;
/// The largest payload any state file may carry (16 MiB).
pub const MAX_PAYLOAD: usize = 16 << 20;

/// What kind of state file, and the one format version this build reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub magic: [u8; 8],
    pub version: u32,
}

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatProblem {
    WrongMagic { expected: [u8; 8], found: [u8; 8] },
    UnsupportedVersion { supported: u32, found: u32 },
    Truncated { needed: u64, found: u64 },
    TooLarge { length: u64, limit: u64 },
    ChecksumMismatch,
    Payload(String),
}

impl fmt::Display for FormatProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatProblem::WrongMagic { expected, found } => write!(
                f,
                "wrong magic {} (expected {}): not this kind of freezeframe file",
                String::from_utf8_lossy(found).escape_debug(),
                String::from_utf8_lossy(expected).escape_debug()
            ),
            FormatProblem::UnsupportedVersion { supported, found } => {
                write!(
                    f,
                    "unsupported format version {found} (this build reads version {supported})"
                )
            }
            FormatProblem::Truncated { needed, found } => {
                write!(f, "truncated: {found} bytes, the envelope needs {needed}")
            }
            FormatProblem::TooLarge { length, limit } => {
                write!(
                    f,
                    "payload length {length} exceeds the limit of {limit} bytes"
                )
            }
            FormatProblem::ChecksumMismatch => write!(f, "checksum mismatch: the file is damaged"),
            FormatProblem::Payload(why) => write!(f, "bad payload: {why}"),
        }
    }
}

/// Wraps `payload` in an envelope of `kind`.
pub fn encode(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    out.extend_from_slice(&kind.magic);
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decodes the envelope at the start of `bytes`; returns the payload and the
/// envelope's total length (bytes after it belong to the caller, e.g. map records).
pub fn decode(kind: Kind, bytes: &[u8]) -> std::result::Result<(&[u8], usize), FormatProblem> {
    if bytes.len() < HEADER_LEN {
        return Err(FormatProblem::Truncated {
            needed: HEADER_LEN as u64,
            found: bytes.len() as u64,
        });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&bytes[..8]);
    if magic != kind.magic {
        return Err(FormatProblem::WrongMagic {
            expected: kind.magic,
            found: magic,
        });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != kind.version {
        return Err(FormatProblem::UnsupportedVersion {
            supported: kind.version,
            found: version,
        });
    }
    let length = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
    if length > MAX_PAYLOAD {
        return Err(FormatProblem::TooLarge {
            length: length as u64,
            limit: MAX_PAYLOAD as u64,
        });
    }
    let total = HEADER_LEN + length + CHECKSUM_LEN;
    if bytes.len() < total {
        return Err(FormatProblem::Truncated {
            needed: total as u64,
            found: bytes.len() as u64,
        });
    }
    let body = &bytes[..HEADER_LEN + length];
    if blake3::hash(body).as_bytes()[..] != bytes[HEADER_LEN + length..total] {
        return Err(FormatProblem::ChecksumMismatch);
    }
    Ok((&bytes[HEADER_LEN..HEADER_LEN + length], total))
}

/// Encodes a serde value as a JSON payload in an envelope.
pub fn encode_json<T: serde::Serialize>(kind: Kind, value: &T) -> Vec<u8> {
    // Serializing our own plain structs to a Vec cannot fail.
    let payload = serde_json::to_vec(value).unwrap_or_default();
    encode(kind, &payload)
}

/// Decodes an envelope holding a JSON payload; errors name `file`.
pub fn decode_json<T: serde::de::DeserializeOwned>(
    kind: Kind,
    bytes: &[u8],
    file: &Path,
) -> Result<(T, usize)> {
    let fail = |problem| Error::Format {
        file: file.to_path_buf(),
        problem,
    };
    let (payload, used) = decode(kind, bytes).map_err(fail)?;
    let value =
        serde_json::from_slice(payload).map_err(|e| fail(FormatProblem::Payload(e.to_string())))?;
    Ok((value, used))
}

/// Reads a whole state file, refusing files larger than an envelope can be.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = File::open(path).map_err(|e| Error::io("open", path, e))?;
    let limit = (HEADER_LEN + MAX_PAYLOAD + CHECKSUM_LEN) as u64;
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("read", path, e))?;
    if buf.len() as u64 > limit {
        return Err(Error::Format {
            file: path.to_path_buf(),
            problem: FormatProblem::TooLarge {
                length: buf.len() as u64,
                limit,
            },
        });
    }
    Ok(buf)
}

/// Replaces `path` atomically: write a temp file beside it, fsync, rename, fsync the directory.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = crate::perms::private_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io("create", &tmp, e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
    sync_dir(dir)
}

/// fsyncs a directory so a rename or create in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::io("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| Error::io("fsync directory", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Kind = Kind {
        magic: *b"FFTEST01",
        version: 1,
    };

    #[test]
    fn an_envelope_round_trips_and_reports_its_length() {
        let mut bytes = encode(K, b"hello");
        bytes.extend_from_slice(b"trailer");
        let (payload, used) = decode(K, &bytes).expect("decodes");
        assert_eq!(payload, b"hello");
        assert_eq!(&bytes[used..], b"trailer");
    }

    #[test]
    fn each_kind_of_damage_is_named() {
        let good = encode(K, b"payload");
        let other = Kind {
            magic: *b"FFOTHER1",
            version: 1,
        };
        assert!(matches!(
            decode(other, &good),
            Err(FormatProblem::WrongMagic { .. })
        ));
        let newer = Kind {
            magic: K.magic,
            version: 2,
        };
        assert!(matches!(
            decode(newer, &good),
            Err(FormatProblem::UnsupportedVersion { found: 1, .. })
        ));
        assert!(matches!(
            decode(K, &good[..good.len() - 1]),
            Err(FormatProblem::Truncated { .. })
        ));
        assert!(matches!(
            decode(K, &good[..5]),
            Err(FormatProblem::Truncated { .. })
        ));
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 2] ^= 1;
        assert_eq!(decode(K, &flipped), Err(FormatProblem::ChecksumMismatch));
        let mut huge = good;
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(K, &huge),
            Err(FormatProblem::TooLarge { .. })
        ));
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let good = encode(K, b"some payload bytes");
        for _ in 0..5000 {
            let mut b = good.clone();
            let n = rng.gen_range(0..4);
            for _ in 0..n {
                let i = rng.gen_range(0..b.len());
                b[i] = rng.gen();
            }
            b.truncate(rng.gen_range(0..=b.len()));
            let _ = decode(K, &b);
        }
    }
}
