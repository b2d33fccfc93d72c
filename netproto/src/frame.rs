//! Length-prefixed frames: how messages and data travel on a byte stream.
//!
//! Every message between nodes (and between a node and its replica
//! secondary) is one frame. The format is the same on a QUIC stream and on a
//! Unix socket, because the helpers here are generic over tokio's
//! `AsyncRead`/`AsyncWrite`.
//!
//! ```text
//!  0      1      2         3        4                               8
//!  +------+------+---------+--------+-------------------------------+------------------+
//!  | 'F'  | 'Z'  | version |  kind  |  payload length (u32, BE)     |  payload ...     |
//!  | 0x46 | 0x5A |   0x01  |  1..3  |  <= the receiver's max_len    |  length bytes    |
//!  +------+------+---------+--------+-------------------------------+------------------+
//!
//!  kind 1  json            payload = one UTF-8 JSON document (a control message)
//!  kind 2  binary          payload = raw bytes (bulk data)
//!  kind 3  json + binary   payload = json_len (u32, BE) | JSON document | raw bytes
//! ```
//!
//! Why it looks like this:
//! - The magic and version come *before* the length so that a stream of
//!   garbage is rejected on its first bytes, without trusting a length it
//!   happens to contain.
//! - The length is checked against the receiver's limit ([`FrameCodec`])
//!   before a single payload byte is read or allocated; a peer cannot make us
//!   reserve more than `max_len` per stream.
//! - There is no per-frame checksum: on QUIC every byte is already
//!   authenticated by the AEAD of the TLS 1.3 session, a Unix socket does not
//!   corrupt data, and bulk data (replica blocks) carries its own blake3 at
//!   the layer that knows what a block is.
//! - After a framing error (bad magic, bad version, oversize, truncation) the
//!   stream cannot be resynchronised, so [`FramedRecv`] refuses further reads
//!   on it; the connection and its other streams are unaffected. A JSON
//!   document that does not decode to the expected type leaves the stream in
//!   sync, so the receiver may answer with an error and carry on.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"FZ";
/// The frame format version this build writes and accepts.
pub const VERSION: u8 = 1;
/// Size of the fixed header before the payload.
pub const HEADER_LEN: usize = 8;

/// What a frame's payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A serde_json control message.
    Json,
    /// Raw bytes.
    Binary,
    /// A serde_json header followed by raw bytes (e.g. a block and its address).
    JsonWithData,
}

impl FrameKind {
    fn to_byte(self) -> u8 {
        match self {
            FrameKind::Json => 1,
            FrameKind::Binary => 2,
            FrameKind::JsonWithData => 3,
        }
    }

    fn from_byte(b: u8) -> Option<FrameKind> {
        match b {
            1 => Some(FrameKind::Json),
            2 => Some(FrameKind::Binary),
            3 => Some(FrameKind::JsonWithData),
            _ => None,
        }
    }

    /// The name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Json => "json",
            FrameKind::Binary => "binary",
            FrameKind::JsonWithData => "json+binary",
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A JSON document, not yet decoded to a type.
    Json(Vec<u8>),
    /// Raw bytes.
    Binary(Vec<u8>),
    /// A JSON header and the raw bytes that follow it.
    JsonWithData { json: Vec<u8>, data: Vec<u8> },
}

impl Frame {
    /// The kind byte this frame travels with.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Json(_) => FrameKind::Json,
            Frame::Binary(_) => FrameKind::Binary,
            Frame::JsonWithData { .. } => FrameKind::JsonWithData,
        }
    }
}

/// The frame format with a size limit; the receiver's limit is the one that
/// protects it, the sender's limit only stops it from sending what the peer
/// would refuse anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCodec {
    /// Largest payload (bytes after the header) accepted or sent.
    pub max_len: u32,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::CONTROL
    }
}

impl FrameCodec {
    /// Control messages: the snapshot protocol, status, acks. 1 MiB.
    pub const CONTROL: FrameCodec = FrameCodec { max_len: 1 << 20 };
    /// Bulk data streams (replica blocks): 16 MiB, room for a batch of
    /// 64 KiB blocks with their hashes.
    pub const DATA: FrameCodec = FrameCodec { max_len: 16 << 20 };

    /// A codec with a custom payload limit.
    pub fn new(max_len: u32) -> FrameCodec {
        FrameCodec { max_len }
    }

    /// Builds the 8-byte header for a payload of `len` bytes, refusing one
    /// that exceeds this codec's limit.
    pub fn encode_header(&self, kind: FrameKind, len: usize) -> Result<[u8; HEADER_LEN]> {
        if len > self.max_len as usize {
            return Err(Error::FrameTooLarge {
                len: len as u64,
                max: self.max_len,
                context: Some("(refused before sending)".to_string()),
            });
        }
        let len = len as u32; // fits: max_len is a u32
        let l = len.to_be_bytes();
        Ok([MAGIC[0], MAGIC[1], VERSION, kind.to_byte(), l[0], l[1], l[2], l[3]])
    }

    /// Checks an 8-byte header and returns its kind and payload length.
    /// Rejects an oversized length here, before anything is allocated for it.
    pub fn decode_header(&self, h: &[u8; HEADER_LEN]) -> Result<(FrameKind, u32)> {
        if h[0..2] != MAGIC {
            return Err(Error::MalformedFrame {
                reason: format!(
                    "bad magic {:02x} {:02x} (expected {:02x} {:02x}, \"FZ\")",
                    h[0], h[1], MAGIC[0], MAGIC[1]
                ),
                context: None,
            });
        }
        if h[2] != VERSION {
            return Err(Error::UnsupportedVersion {
                got: h[2],
                supported: VERSION,
                context: None,
            });
        }
        let kind = FrameKind::from_byte(h[3]).ok_or_else(|| Error::MalformedFrame {
            reason: format!("unknown frame kind {}", h[3]),
            context: None,
        })?;
        let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        if len > self.max_len {
            return Err(Error::FrameTooLarge {
                len: u64::from(len),
                max: self.max_len,
                context: None,
            });
        }
        if kind == FrameKind::JsonWithData && len < 4 {
            return Err(Error::MalformedFrame {
                reason: format!("json+binary frame of {len} bytes has no room for its json length"),
                context: None,
            });
        }
        Ok((kind, len))
    }

    /// Encodes a JSON message as one complete frame (header included).
    pub fn encode_json<T: Serialize>(&self, msg: &T) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; HEADER_LEN];
        serde_json::to_writer(&mut buf, msg).map_err(|source| Error::Encode {
            type_name: std::any::type_name::<T>(),
            source,
        })?;
        let header = self.encode_header(FrameKind::Json, buf.len() - HEADER_LEN)?;
        buf[..HEADER_LEN].copy_from_slice(&header);
        Ok(buf)
    }

    /// Decodes one complete frame held in memory (header and payload, no
    /// trailing bytes). Never panics, whatever the bytes.
    pub fn decode(&self, bytes: &[u8]) -> Result<Frame> {
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Err(Error::Truncated {
                got: bytes.len(),
                wanted: HEADER_LEN,
                context: None,
            });
        };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(header);
        let (kind, len) = self.decode_header(&h)?;
        let payload = &bytes[HEADER_LEN..];
        if payload.len() != len as usize {
            return Err(Error::Truncated {
                got: payload.len(),
                wanted: len as usize,
                context: None,
            });
        }
        match kind {
            FrameKind::Json => Ok(Frame::Json(payload.to_vec())),
            FrameKind::Binary => Ok(Frame::Binary(payload.to_vec())),
            FrameKind::JsonWithData => {
                let (jl, rest) = payload.split_at(4);
                let json_len = u32::from_be_bytes([jl[0], jl[1], jl[2], jl[3]]) as usize;
                if json_len > rest.len() {
                    return Err(bad_json_len(json_len, rest.len()));
                }
                let (json, data) = rest.split_at(json_len);
                Ok(Frame::JsonWithData {
                    json: json.to_vec(),
                    data: data.to_vec(),
                })
            }
        }
    }

    /// Reads one frame. `Ok(None)` when the stream ended cleanly on a frame
    /// boundary; an error for anything else, including a stream cut inside a
    /// frame.
    pub async fn read_frame<R: AsyncRead + Unpin>(&self, r: &mut R) -> Result<Option<Frame>> {
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(r, &mut h).await?;
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_LEN {
            // Check what we have so that garbage is reported as garbage,
            // not as a short read.
            if got >= 2 && h[0..2] != MAGIC {
                let mut padded = h;
                padded[got..].fill(0);
                self.decode_header(&padded)?;
            }
            return Err(Error::Truncated {
                got,
                wanted: HEADER_LEN,
                context: None,
            });
        }
        let (kind, len) = self.decode_header(&h)?;
        let len = len as usize;
        match kind {
            FrameKind::Json => Ok(Some(Frame::Json(read_payload(r, len).await?))),
            FrameKind::Binary => Ok(Some(Frame::Binary(read_payload(r, len).await?))),
            FrameKind::JsonWithData => {
                let mut jl = [0u8; 4];
                let got = read_full(r, &mut jl).await?;
                if got < 4 {
                    return Err(Error::Truncated {
                        got,
                        wanted: len,
                        context: None,
                    });
                }
                let json_len = u32::from_be_bytes(jl) as usize;
                let rest = len - 4;
                if json_len > rest {
                    return Err(bad_json_len(json_len, rest));
                }
                let json = read_payload(r, json_len).await?;
                let data = read_payload(r, rest - json_len).await?;
                Ok(Some(Frame::JsonWithData { json, data }))
            }
        }
    }

    /// Writes one frame made of `parts` (concatenated as the payload).
    async fn write_parts<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        kind: FrameKind,
        parts: &[&[u8]],
    ) -> Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let header = self.encode_header(kind, len)?;
        w.write_all(&header).await.map_err(io_err)?;
        for p in parts {
            w.write_all(p).await.map_err(io_err)?;
        }
        Ok(())
    }
}

fn bad_json_len(json_len: usize, room: usize) -> Error {
    Error::MalformedFrame {
        reason: format!("json+binary frame announces {json_len} bytes of json but holds only {room}"),
        context: None,
    }
}

fn io_err(source: std::io::Error) -> Error {
    Error::Io {
        context: None,
        source,
    }
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await.map_err(io_err)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads exactly `len` payload bytes; `len` has already been checked
/// against the codec's limit by the caller.
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let got = read_full(r, &mut buf).await?;
    if got < len {
        return Err(Error::Truncated {
            got,
            wanted: len,
            context: None,
        });
    }
    Ok(buf)
}

fn decode_json<T: DeserializeOwned>(json: &[u8]) -> Result<T> {
    serde_json::from_slice(json).map_err(|source| Error::Decode {
        type_name: std::any::type_name::<T>(),
        context: None,
        source,
    })
}

/// The sending half of a framed stream.
#[derive(Debug)]
pub struct FramedSend<W> {
    inner: W,
    codec: FrameCodec,
    /// "to node n2 at 127.0.0.1:7001", added to errors.
    context: Option<String>,
}

impl<W: AsyncWrite + Unpin> FramedSend<W> {
    /// Frames writes to `inner` with the given codec.
    pub fn new(inner: W, codec: FrameCodec) -> FramedSend<W> {
        FramedSend {
            inner,
            codec,
            context: None,
        }
    }

    /// Names the peer in this stream's errors.
    pub fn with_context(mut self, context: impl Into<String>) -> FramedSend<W> {
        self.context = Some(context.into());
        self
    }

    /// Changes the size limit (e.g. to [`FrameCodec::DATA`] on a bulk stream).
    pub fn set_codec(&mut self, codec: FrameCodec) {
        self.codec = codec;
    }

    /// The codec in use.
    pub fn codec(&self) -> FrameCodec {
        self.codec
    }

    fn ctx(&self, e: Error) -> Error {
        match &self.context {
            Some(c) => e.with_context(c),
            None => e,
        }
    }

    /// Sends one control message as a JSON frame.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        let frame = self.codec.encode_json(msg).map_err(|e| self.ctx(e))?;
        let res = self.inner.write_all(&frame).await.map_err(io_err);
        res.map_err(|e| self.ctx(e))
    }

    /// Sends raw bytes as a binary frame.
    pub async fn send_bytes(&mut self, data: &[u8]) -> Result<()> {
        let res = self
            .codec
            .write_parts(&mut self.inner, FrameKind::Binary, &[data])
            .await;
        res.map_err(|e| self.ctx(e))
    }

    /// Sends a JSON header and raw bytes in one frame.
    pub async fn send_with_data<T: Serialize>(&mut self, header: &T, data: &[u8]) -> Result<()> {
        let json = serde_json::to_vec(header)
            .map_err(|source| Error::Encode {
                type_name: std::any::type_name::<T>(),
                source,
            })
            .map_err(|e| self.ctx(e))?;
        let json_len = u32::try_from(json.len())
            .map_err(|_| Error::FrameTooLarge {
                len: json.len() as u64,
                max: self.codec.max_len,
                context: Some("(refused before sending)".to_string()),
            })
            .map_err(|e| self.ctx(e))?;
        let res = self
            .codec
            .write_parts(
                &mut self.inner,
                FrameKind::JsonWithData,
                &[&json_len.to_be_bytes(), &json, data],
            )
            .await;
        res.map_err(|e| self.ctx(e))
    }

    /// Flushes buffered bytes.
    pub async fn flush(&mut self) -> Result<()> {
        let res = self.inner.flush().await.map_err(io_err);
        res.map_err(|e| self.ctx(e))
    }

    /// Ends the stream cleanly (on QUIC: FIN after all data). The peer's
    /// next receive sees the end of the stream.
    pub async fn finish(&mut self) -> Result<()> {
        let res = self.inner.shutdown().await.map_err(io_err);
        res.map_err(|e| self.ctx(e))
    }

    /// Gives back the underlying stream.
    pub fn into_inner(self) -> W {
        self.inner
    }

    /// The underlying stream, for writes outside the frame format (tests
    /// that play a hostile peer).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// The receiving half of a framed stream.
#[derive(Debug)]
pub struct FramedRecv<R> {
    inner: R,
    codec: FrameCodec,
    /// "from node n2 at 127.0.0.1:7001", added to errors.
    context: Option<String>,
    /// Set after a framing error: the byte position is lost, further frames
    /// cannot be found.
    broken: bool,
}

impl<R: AsyncRead + Unpin> FramedRecv<R> {
    /// Frames reads from `inner` with the given codec.
    pub fn new(inner: R, codec: FrameCodec) -> FramedRecv<R> {
        FramedRecv {
            inner,
            codec,
            context: None,
            broken: false,
        }
    }

    /// Names the peer in this stream's errors.
    pub fn with_context(mut self, context: impl Into<String>) -> FramedRecv<R> {
        self.context = Some(context.into());
        self
    }

    /// Changes the size limit (e.g. to [`FrameCodec::DATA`] on a bulk stream).
    pub fn set_codec(&mut self, codec: FrameCodec) {
        self.codec = codec;
    }

    /// The codec in use.
    pub fn codec(&self) -> FrameCodec {
        self.codec
    }

    /// True once a framing error made this stream unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn ctx(&self, e: Error) -> Error {
        match &self.context {
            Some(c) => e.with_context(c),
            None => e,
        }
    }

    /// Receives the next frame; `Ok(None)` when the peer finished the stream.
    pub async fn recv_frame(&mut self) -> Result<Option<Frame>> {
        if self.broken {
            return Err(self.ctx(Error::StreamBroken { context: None }));
        }
        match self.codec.read_frame(&mut self.inner).await {
            Ok(f) => Ok(f),
            Err(e) => {
                self.broken = true;
                Err(self.ctx(e))
            }
        }
    }

    async fn next_frame(&mut self) -> Result<Frame> {
        match self.recv_frame().await? {
            Some(f) => Ok(f),
            None => Err(self.ctx(Error::StreamFinished { context: None })),
        }
    }

    fn unexpected(&self, expected: FrameKind, got: &Frame) -> Error {
        self.ctx(Error::UnexpectedKind {
            expected: expected.name(),
            got: got.kind().name(),
            context: None,
        })
    }

    /// Receives one control message of type `T`. The end of the stream is
    /// [`Error::StreamFinished`]; use [`FramedRecv::recv_opt`] where an end
    /// is expected.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T> {
        match self.next_frame().await? {
            Frame::Json(json) => decode_json(&json).map_err(|e| self.ctx(e)),
            other => Err(self.unexpected(FrameKind::Json, &other)),
        }
    }

    /// Like [`FramedRecv::recv`] but `Ok(None)` when the peer finished the stream.
    pub async fn recv_opt<T: DeserializeOwned>(&mut self) -> Result<Option<T>> {
        match self.recv_frame().await? {
            None => Ok(None),
            Some(Frame::Json(json)) => decode_json(&json).map(Some).map_err(|e| self.ctx(e)),
            Some(other) => Err(self.unexpected(FrameKind::Json, &other)),
        }
    }

    /// Receives one binary frame.
    pub async fn recv_bytes(&mut self) -> Result<Vec<u8>> {
        match self.next_frame().await? {
            Frame::Binary(data) => Ok(data),
            other => Err(self.unexpected(FrameKind::Binary, &other)),
        }
    }

    /// Receives one json+binary frame.
    pub async fn recv_with_data<T: DeserializeOwned>(&mut self) -> Result<(T, Vec<u8>)> {
        match self.next_frame().await? {
            Frame::JsonWithData { json, data } => {
                let header = decode_json(&json).map_err(|e| self.ctx(e))?;
                Ok((header, data))
            }
            other => Err(self.unexpected(FrameKind::JsonWithData, &other)),
        }
    }

    /// Gives back the underlying stream.
    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_limits() {
        let c = FrameCodec::new(100);
        let h = c.encode_header(FrameKind::Binary, 100).expect("within limit");
        assert_eq!(c.decode_header(&h).expect("valid"), (FrameKind::Binary, 100));
        assert!(matches!(
            c.encode_header(FrameKind::Binary, 101),
            Err(Error::FrameTooLarge { len: 101, max: 100, .. })
        ));
    }

    #[test]
    fn every_two_byte_prefix_and_every_header_byte_decodes_without_panic() {
        let c = FrameCodec::CONTROL;
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let _ = c.decode(&[a, b]);
                let _ = c.decode(&[b'F', b'Z', VERSION, a, b, 0, 0, 0]);
                let _ = c.decode(&[b'F', b'Z', VERSION, 3, 0, 0, a, b, 0, 0, 0, 9]);
            }
        }
    }
}
