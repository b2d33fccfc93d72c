//! The control socket: how the CLI and the console talk to their node.
//!
//! A Unix stream socket (`run/control.sock`, mode 0600) carrying
//! newline-delimited JSON. The client sends one [`ControlRequest`] per line;
//! the node answers each with one [`ControlResponse`] line, in order. After
//! `{"op":"events"}` the node instead streams one [`ControlResponse`] holding
//! an event per line until the client hangs up. Lines are limited to
//! [`MAX_LINE`] bytes; a longer or malformed line gets an error reply and the
//! connection stays usable.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::{Error, Result};

/// Longest request or response line accepted, in bytes.
pub const MAX_LINE: usize = 4 << 20;

/// A request to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// This node, its peers, writers and the snapshot in flight.
    Status,
    /// Take a cluster-wide snapshot with this node as initiator; the answer
    /// comes when it completed or failed.
    SnapshotCreate {
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    SnapshotList,
    SnapshotShow {
        id: u64,
    },
    SnapshotDelete {
        id: u64,
    },
    /// Hash the snapshot image and compare it with the hash recorded at seal time
    /// (recording one only when none exists).
    SnapshotVerify {
        id: u64,
    },
    /// Follow the phase event stream.
    Events,
    /// Record that `node` is fenced off the volume: its live writes fail from
    /// now on, and snapshots go on without it (DESIGN.md §9).
    NodeFence {
        node: String,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Lift the fence on `node`; it takes part in the next snapshot.
    NodeUnfence {
        node: String,
    },
}

/// One answer line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ControlResponse {
    pub fn ok(result: serde_json::Value) -> Self {
        ControlResponse {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        ControlResponse {
            ok: false,
            result: None,
            error: Some(msg.into()),
        }
    }
}

/// Reads newline-delimited JSON values with a line-length limit.
#[derive(Debug)]
pub struct LineReader<R> {
    inner: BufReader<R>,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(r: R) -> Self {
        LineReader {
            inner: BufReader::new(r),
            buf: Vec::new(),
        }
    }

    /// The next line without its newline; `Ok(None)` at end of stream.
    /// A line longer than `max` is consumed and reported as an error.
    pub async fn next_line(&mut self, max: usize) -> Result<Option<String>> {
        self.buf.clear();
        let mut too_long = false;
        loop {
            let avail = self
                .inner
                .fill_buf()
                .await
                .map_err(Error::io("reading a line"))?;
            if avail.is_empty() {
                if self.buf.is_empty() && !too_long {
                    return Ok(None);
                }
                break;
            }
            let (chunk, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (&avail[..i], Some(i + 1)),
                None => (avail, None),
            };
            if !too_long {
                if self.buf.len() + chunk.len() > max {
                    too_long = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            let n = done.unwrap_or(avail.len());
            self.inner.consume(n);
            if done.is_some() {
                break;
            }
        }
        if too_long {
            return Err(Error::LineTooLong { max });
        }
        String::from_utf8(std::mem::take(&mut self.buf))
            .map(Some)
            .map_err(|_| Error::Malformed("line is not UTF-8".into()))
    }
}

/// Writes one value as a JSON line and flushes.
pub async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, value: &T) -> Result<()> {
    let mut line = serde_json::to_vec(value).map_err(|e| Error::Malformed(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line)
        .await
        .map_err(Error::io("writing a line"))?;
    w.flush().await.map_err(Error::io("writing a line"))?;
    Ok(())
}

/// A client of a node's control socket.
#[derive(Debug)]
pub struct ControlClient {
    reader: LineReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    path: std::path::PathBuf,
}

impl ControlClient {
    pub async fn connect(path: &std::path::Path) -> Result<ControlClient> {
        let stream =
            tokio::net::UnixStream::connect(path)
                .await
                .map_err(|e| Error::NodeUnreachable {
                    path: path.to_path_buf(),
                    cause: e,
                })?;
        let (r, w) = stream.into_split();
        Ok(ControlClient {
            reader: LineReader::new(r),
            writer: w,
            path: path.to_path_buf(),
        })
    }

    /// Sends a request and waits for its answer; a node-side failure becomes `Error::Remote`.
    pub async fn call(&mut self, req: &ControlRequest) -> Result<serde_json::Value> {
        write_line(&mut self.writer, req).await?;
        let resp = self
            .next_response()
            .await?
            .ok_or_else(|| Error::NodeClosed {
                path: self.path.clone(),
            })?;
        if resp.ok {
            Ok(resp.result.unwrap_or(serde_json::Value::Null))
        } else {
            Err(Error::Remote(
                resp.error.unwrap_or_else(|| "unknown error".into()),
            ))
        }
    }

    /// Subscribes to the event stream; read events with [`ControlClient::next_event`].
    pub async fn subscribe(&mut self) -> Result<()> {
        write_line(&mut self.writer, &ControlRequest::Events).await
    }

    /// The next streamed event, `None` when the node closed the stream.
    pub async fn next_event(&mut self) -> Result<Option<serde_json::Value>> {
        match self.next_response().await? {
            None => Ok(None),
            Some(r) if r.ok => Ok(r.result),
            Some(r) => Err(Error::Remote(r.error.unwrap_or_default())),
        }
    }

    async fn next_response(&mut self) -> Result<Option<ControlResponse>> {
        match self.reader.next_line(MAX_LINE).await? {
            None => Ok(None),
            Some(line) => serde_json::from_str(&line)
                .map(Some)
                .map_err(|e| Error::Malformed(format!("control response: {e}"))),
        }
    }
}
