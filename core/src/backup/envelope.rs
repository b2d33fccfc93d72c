//! The checksummed envelope around every repository state file (config,
//! index, manifest).
//!
//! ```text
//! offset  size  field
//! 0       8     magic        ("FFBKCONF", "FFBKINDX", "FFBKMANI")
//! 8       4     version      u32 little-endian, currently 1
//! 12      8     payload_len  u64 little-endian
//! 20      n     payload
//! 20+n    32    blake3 of bytes [0, 20+n)
//! ```
//!
//! Decoding checks the length first and the checksum second, so a torn,
//! truncated or bit-flipped file is refused before its payload is parsed.

use std::path::Path;

use crate::error::{Error, Result};

const HEADER: usize = 20;
const TRAILER: usize = 32;

/// Wraps `payload` in an envelope with `magic` and `version`.
pub(crate) fn seal(magic: &[u8; 8], version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len() + TRAILER);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Checks an envelope read from `path` and returns its payload.
pub(crate) fn open<'a>(
    path: &Path,
    magic: &[u8; 8],
    version: u32,
    bytes: &'a [u8],
) -> Result<&'a [u8]> {
    let corrupt = |detail: String| Error::RepoCorrupt {
        path: path.to_path_buf(),
        detail,
    };
    if bytes.len() < HEADER + TRAILER {
        return Err(corrupt(format!(
            "only {} bytes, shorter than an empty envelope",
            bytes.len()
        )));
    }
    if &bytes[..8] != magic {
        return Err(corrupt(format!(
            "wrong magic {:?}, expected {:?}",
            String::from_utf8_lossy(&bytes[..8]),
            String::from_utf8_lossy(magic)
        )));
    }
    let got_version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len8);
    if len != (bytes.len() - HEADER - TRAILER) as u64 {
        return Err(corrupt(format!(
            "payload length field says {len} bytes but the file holds {} (truncated or torn write)",
            bytes.len() - HEADER - TRAILER
        )));
    }
    let body_end = bytes.len() - TRAILER;
    let sum = blake3::hash(&bytes[..body_end]);
    if sum.as_bytes() != &bytes[body_end..] {
        return Err(corrupt(
            "checksum mismatch (the file was damaged after it was written)".into(),
        ));
    }
    if got_version != version {
        return Err(corrupt(format!(
            "format version {got_version}, this freezeframe reads version {version}"
        )));
    }
    Ok(&bytes[HEADER..body_end])
}

/// A bounds-checked little-endian reader over untrusted bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        let s = self.take(4)?;
        Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Some(u64::from_le_bytes(a))
    }

    pub(crate) fn hash(&mut self) -> Option<[u8; 32]> {
        let s = self.take(32)?;
        let mut a = [0u8; 32];
        a.copy_from_slice(s);
        Some(a)
    }

    /// LEB128 unsigned varint, at most 10 bytes.
    pub(crate) fn varint(&mut self) -> Option<u64> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = *self.bytes.get(self.pos)?;
            self.pos += 1;
            v |= u64::from(b & 0x7f).checked_shl(7 * i)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
}

/// Appends a LEB128 unsigned varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let sealed = seal(b"FFBKTEST", 1, b"hello payload");
        let p = Path::new("x");
        assert_eq!(
            open(p, b"FFBKTEST", 1, &sealed).expect("intact envelope opens"),
            b"hello payload"
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x10;
            assert!(
                open(p, b"FFBKTEST", 1, &bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        assert!(open(p, b"FFBKTEST", 1, &sealed[..sealed.len() - 1]).is_err());
    }

    #[test]
    fn varints_round_trip_and_overlong_ones_are_refused() {
        let mut out = Vec::new();
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            out.clear();
            put_varint(&mut out, v);
            assert_eq!(Reader::new(&out).varint(), Some(v));
        }
        assert_eq!(Reader::new(&[0xff; 11]).varint(), None);
    }
}
